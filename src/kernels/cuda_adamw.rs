//! Launchers of `kernels/adamw.cu`: the AdamW update of many f32 tensors in one launch (in place,
//! through the device addresses in a table) and the sum of squares of many gradients in one
//! launch. `train::fused_adamw` builds the tables.

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result};

use super::cuda_fused::offsets;
use super::{adamw_blocks, AdamWScalars, AdamWTensor};

/// PTX of `kernels/adamw.cu`.
pub const ADAMW_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));
const ADAMW_MODULE: &str = "prs_adamw";
/// The kernels' `THREADS` (the norm's reduction assumes exactly this many).
const THREADS: u32 = 256;

// SAFETY: `AdamWTensor` is repr(C) with the field order and types of the kernel's struct.
unsafe impl DeviceRepr for AdamWTensor {}

/// The device address of a contiguous f32 storage's first element under `l`.
pub fn f32_device_ptr(s: &CudaStorage, l: &Layout) -> Result<u64> {
    let (start, _) = offsets(l, "AdamW tensor")?;
    let slice = s.as_cuda_slice::<f32>()?;
    let stream = s.device.cuda_stream();
    let (base, _sync) = slice.device_ptr(&stream);
    Ok(base + (start * std::mem::size_of::<f32>()) as u64)
}

/// The blocks a table covers (its last tensor's first block plus that tensor's blocks).
fn blocks(table: &[AdamWTensor]) -> Result<u32> {
    let Some(last) = table.last() else { bail!("multi-tensor kernel: empty table") };
    let n = last.first_block + adamw_blocks(last.n);
    if n <= 0 || n > i64::from(i32::MAX) {
        bail!("multi-tensor kernel: {n} blocks");
    }
    Ok(n as u32)
}

fn launch_config(table: &[AdamWTensor]) -> Result<LaunchConfig> {
    Ok(LaunchConfig { grid_dim: (blocks(table)?, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// Updates every tensor of `table` in place (parameter, first and second moment).
pub fn adamw_multi(dev: &CudaDevice, table: &[AdamWTensor], s: &AdamWScalars) -> Result<()> {
    let cfg = launch_config(table)?;
    let stream = dev.cuda_stream();
    let rows = stream.clone_htod(table).w()?;
    let func = dev.get_or_load_custom_func("adamw_multi", ADAMW_MODULE, ADAMW_PTX)?;
    let count = table.len() as i32;
    let mut b = func.builder();
    b.arg(&rows).arg(&count).arg(&s.coef).arg(&s.apply_coef).arg(&s.one_minus_b1).arg(&s.b2);
    b.arg(&s.one_minus_b2).arg(&s.eps);
    // SAFETY: argument list and types match `adamw_multi` in adamw.cu; the addresses in the
    // table point into live f32 storages of the lengths recorded (the caller holds them).
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// One f64 partial sum of squares per block, over the f32 tensors at `g` in `table` (only `g`,
/// `n` and `first_block` are read), copied to the host.
pub fn sumsq_multi(dev: &CudaDevice, table: &[AdamWTensor]) -> Result<Vec<f64>> {
    let cfg = launch_config(table)?;
    let stream = dev.cuda_stream();
    let rows = stream.clone_htod(table).w()?;
    let func = dev.get_or_load_custom_func("sumsq_multi", ADAMW_MODULE, ADAMW_PTX)?;
    // SAFETY: the kernel writes every partial before it is read.
    let mut partial = unsafe { dev.alloc::<f64>(cfg.grid_dim.0 as usize)? };
    let count = table.len() as i32;
    {
        let mut b = func.builder();
        b.arg(&rows).arg(&count).arg(&mut partial);
        // SAFETY: argument list and types match `sumsq_multi` in adamw.cu.
        unsafe { b.launch(cfg) }.w()?;
    }
    dev.clone_dtoh(&partial)
}
