//! PRS-Med assembled from parts, one file per part; VarBuilder prefixes mirror checkpoint keys.
//! The losses live here too, beside the outputs they score.

pub mod clip;
pub mod decoder;
pub mod llava;
pub mod losses;
pub mod mistral;
pub mod prs_med;
pub mod tinysam;
