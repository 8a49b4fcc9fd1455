//! The crate's own CUDA kernels (feature `cuda`, in `cuda`) and what their callers choose
//! between. The ops that use them, and their CPU references, live in `nn::upsample` and
//! `nn::dropout`; this module imports nothing of `nn`, so the layers stay one-way.

use candle_core::DType;

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub use cuda::*;

/// What an upsampling pass writes besides plain logits (fused into one pass on CUDA).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Epilogue {
    /// Logits in the input dtype (what `MaskUpsample` writes).
    Logits,
    /// Logits in f32 (f64 input stays f64): feeds an f32 loss without a cast pass.
    LogitsWide,
    /// sigmoid(logits) in the input dtype.
    Sigmoid,
    /// `sigmoid(logits) >= threshold` as u8 0/1, the metrics' foreground rule.
    Threshold(f32),
}

impl Epilogue {
    pub fn out_dtype(&self, input: DType) -> DType {
        match self {
            Epilogue::Logits | Epilogue::Sigmoid => input,
            Epilogue::LogitsWide if input == DType::F64 => DType::F64,
            Epilogue::LogitsWide => DType::F32,
            Epilogue::Threshold(_) => DType::U8,
        }
    }
}
