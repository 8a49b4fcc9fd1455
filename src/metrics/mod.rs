//! Evaluation metrics for `prs evaluate` and training-time validation, on host masks.
//!
//! * [`seg`]: MONAI / nnU-Net style Dice, IoU, precision, recall at one threshold with an
//!   explicit empty-mask policy, per-image means (gIoU) beside pooled values (cIoU).
//! * [`prsmed`]: the PRS-Med authors' 256-threshold protocol and their CSV columns.
//! * [`hd95`]: exact Euclidean distance transform and MONAI's 95th-percentile Hausdorff distance.
//! * [`position`]: answer -> position label parsing and a confusion matrix.
//!
//! Masks are row-major slices (`h * w`); work is parallel across images (rayon).

pub mod hd95;
pub mod position;
pub mod prsmed;
pub mod seg;

pub use hd95::{hd95, hd95_batch, Hd95Summary, MaskPair};
pub use position::{parse_position, position_from_mask, PositionConfusion, PositionLabel};
pub use prsmed::{evaluate_dataset as prsmed_dataset, summarize as prsmed_summarize, PrsmedImage, PrsmedSummary};
pub use seg::{evaluate_batch, Confusion, EmptyPolicy, ImageScores, SegAccumulator, SegPair, SegSummary, Stats};
