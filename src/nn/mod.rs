//! Differentiable building blocks that candle does not provide (or provides without a backward).
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope` silently cut the autograd
//! graph, so every model file uses the versions here instead.

/// `cpu_fwd` and `cuda_fwd` of a `CustomOp1` (or, with `two:`, a `CustomOp2`) whose forward is one
/// closure over the backend storage, expanded once per backend. Defined ahead of the modules so
/// that every one of them can expand it.
macro_rules! same_forward_on_every_backend {
    ($fwd:expr) => {
        fn cpu_fwd(
            &self,
            s: &candle_core::CpuStorage,
            l: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $fwd(self, s, l)
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            s: &candle_core::CudaStorage,
            l: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            $fwd(self, s, l)
        }
    };
    (two: $fwd:expr) => {
        fn cpu_fwd(
            &self,
            a: &candle_core::CpuStorage,
            al: &candle_core::Layout,
            b: &candle_core::CpuStorage,
            bl: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $fwd(self, (a, al), (b, bl))
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            a: &candle_core::CudaStorage,
            al: &candle_core::Layout,
            b: &candle_core::CudaStorage,
            bl: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            $fwd(self, (a, al), (b, bl))
        }
    };
    (three: $fwd:expr) => {
        fn cpu_fwd(
            &self,
            a: &candle_core::CpuStorage,
            al: &candle_core::Layout,
            b: &candle_core::CpuStorage,
            bl: &candle_core::Layout,
            c: &candle_core::CpuStorage,
            cl: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $fwd(self, (a, al), (b, bl), (c, cl))
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            a: &candle_core::CudaStorage,
            al: &candle_core::Layout,
            b: &candle_core::CudaStorage,
            bl: &candle_core::Layout,
            c: &candle_core::CudaStorage,
            cl: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            $fwd(self, (a, al), (b, bl), (c, cl))
        }
    };
}

/// `cpu_fwd` / `cuda_fwd` of an op that only our CUDA kernels compute (a fused backward, whose
/// CPU path is the composite and never builds this op): the CPU forward is an error, the CUDA
/// one a closure over the inputs' storages and layouts, `two:` or `three:` of them.
macro_rules! kernel_only_forward {
    (two: $name:expr, $fwd:expr) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            crate::kernels::cuda_only($name)
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            a: &candle_core::CudaStorage,
            al: &candle_core::Layout,
            b: &candle_core::CudaStorage,
            bl: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            $fwd(self, (a, al), (b, bl))
        }
    };
    (three: $name:expr, $fwd:expr) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            crate::kernels::cuda_only($name)
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            a: &candle_core::CudaStorage,
            al: &candle_core::Layout,
            b: &candle_core::CudaStorage,
            bl: &candle_core::Layout,
            c: &candle_core::CudaStorage,
            cl: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            $fwd(self, (a, al), (b, bl), (c, cl))
        }
    };
}

/// The storage of a tensor an op holds (a constant operand, a saved output) on the backend the
/// op runs on, so that one generic forward serves every backend.
pub(crate) trait OnBackend: candle_core::backend::BackendStorage {
    fn of(s: &candle_core::Storage) -> candle_core::Result<&Self>;
}

impl OnBackend for candle_core::CpuStorage {
    fn of(s: &candle_core::Storage) -> candle_core::Result<&Self> {
        match s {
            candle_core::Storage::Cpu(s) => Ok(s),
            _ => candle_core::bail!("an operand held by the op is not on the cpu"),
        }
    }
}

#[cfg(feature = "cuda")]
impl OnBackend for candle_core::CudaStorage {
    fn of(s: &candle_core::Storage) -> candle_core::Result<&Self> {
        match s {
            candle_core::Storage::Cuda(s) => Ok(s),
            _ => candle_core::bail!("an operand held by the op is not on the gpu"),
        }
    }
}

pub mod attention;
pub mod checkpoint;
pub mod consts;
pub mod conv;
pub mod cpu_kernel;
pub mod depthwise;
pub mod dropout;
pub mod fused;
pub mod linear;
pub mod norm;
pub mod ops;
pub mod param;
pub mod quant;
pub mod rope;
pub mod softmax;
pub mod splice;
pub mod upsample;

pub use consts::{add_any, add_const, masked_add, mul_any, mul_const};
pub use fused::rms_normalize;
pub use linear::{frozen_matmul, Linear};
pub use param::{Param, ParamBuilder, TrainedParams};
pub use softmax::scaled_masked_softmax;
