//! Data: image preprocessing (CLIP and SAM), datasets and loaders.

pub mod preprocess;
