//! The layer between the commands and the model, as in mistral.rs: every command that runs a
//! model goes through it. `device` picks and measures the device; `build` assembles PRS-Med from
//! a run configuration and its weights (base, TinySAM, a trained checkpoint), `random` from
//! random weights; `load` resolves a trained model's configuration and tokenizer, checks them
//! against the checkpoint, and builds it; `generate` is the one generation loop; `masks` turns
//! mask logits into what a user sees; `predict` is the engine that writes prediction folders.

pub mod build;
pub mod device;
pub mod export;
pub mod generate;
pub mod load;
pub mod masks;
pub mod predict;
pub mod random;
