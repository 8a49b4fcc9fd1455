//! Data: image preprocessing (CLIP and SAM), datasets and loaders.

pub mod check;
pub mod dataset;
pub mod loader;
pub mod position;
pub mod prepare;
pub mod preprocess;
pub mod sample;
pub mod synth;
