//! Launcher of `kernels/dequant.cu`: ggml blocks (a contiguous u8 storage) to dense values in
//! f32, bf16 or f16, one kernel.

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result};
use half::{bf16, f16};

use super::cuda_fused::{elementwise_config, offsets, tag};

/// PTX of `kernels/dequant.cu`.
pub const DEQUANT_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dequant.ptx"));
const DEQUANT_MODULE: &str = "prs_dequant";

/// `<root>_<dtype>(blocks, out, n)`: `n` values in `dtype` from the blocks under `l`.
pub fn dequantize(blocks: &CudaStorage, l: &Layout, root: &str, n: usize, dtype: DType) -> Result<CudaStorage> {
    fn go<T: CudaDType + DeviceRepr>(name: &str, blocks: &CudaStorage, l: &Layout, n: usize) -> Result<CudaStorage> {
        let dev = &blocks.device;
        let func = dev.get_or_load_custom_func(name, DEQUANT_MODULE, DEQUANT_PTX)?;
        let (a, b) = offsets(l, name)?;
        let src = blocks.as_cuda_slice::<u8>()?.slice(a..b);
        // SAFETY: the kernel writes every output value.
        let mut dst = unsafe { dev.alloc::<T>(n)? };
        let count = n as i64;
        let mut builder = func.builder();
        builder.arg(&src).arg(&mut dst).arg(&count);
        // SAFETY: argument list and types match the kernel's signature in dequant.cu.
        unsafe { builder.launch(elementwise_config(n)) }.w()?;
        drop(builder);
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }
    let name = format!("{root}_{}", tag(dtype)?);
    match dtype {
        DType::F32 => go::<f32>(&name, blocks, l, n),
        DType::BF16 => go::<bf16>(&name, blocks, l, n),
        DType::F16 => go::<f16>(&name, blocks, l, n),
        other => candle_core::bail!("dequantize: to {other:?} on CUDA"),
    }
}
