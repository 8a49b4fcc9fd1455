//! Data: image preprocessing (CLIP and SAM), datasets and loaders.

pub mod preprocess;
pub mod sample;
pub mod dataset;
pub mod position;
pub mod loader;
pub mod synth;
