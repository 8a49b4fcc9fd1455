//! PRS-Med assembled from parts, one file per part; VarBuilder prefixes mirror checkpoint keys.

pub mod clip;
pub mod decoder;
pub mod llava;
pub mod load;
pub mod mistral;
pub mod prs_med;
pub mod random;
pub mod tinysam;
