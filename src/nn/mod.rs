//! Differentiable building blocks that candle does not provide (or provides without a backward).
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope` silently cut the autograd
//! graph, so every model file uses the versions here instead.

pub mod checkpoint;
pub mod consts;
pub mod conv;
pub mod dropout;
pub mod fused;
pub mod linear;
pub mod ops;
pub mod param;
pub mod splice;
pub mod upsample;

pub use consts::{add_any, add_const, masked_add, mul_any, mul_const};
pub use linear::{frozen_matmul, Linear};
pub use param::{Param, ParamBuilder, TrainedParams};
pub use fused::{rms_normalize, scaled_masked_softmax};
