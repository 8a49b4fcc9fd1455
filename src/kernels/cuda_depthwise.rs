//! Launchers of `kernels/depthwise.cu`: the depthwise convolution's forward, input gradient and
//! kernel gradient (per-split partial sums, then one ordered sum). Inputs contiguous, of one
//! dtype (bf16/f16/f32); `nn::depthwise` makes them so.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result};
use half::{bf16, f16};

use super::cuda::config;
use super::cuda_fused::{elementwise_config, offsets, tag};
use super::DwGeom;

/// PTX of `kernels/depthwise.cu`.
pub const DEPTHWISE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/depthwise.ptx"));
const DEPTHWISE_MODULE: &str = "prs_depthwise";
// SAFETY: `DwGeom` is repr(C) with nine i64 fields, the layout of the kernel's `DwGeom`.
unsafe impl DeviceRepr for DwGeom {}

/// Launches `<root>_<dtype>(a, b, out, geom)` writing `n_out` elements of the inputs' dtype.
fn run(
    root: &str,
    cfg: LaunchConfig,
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    n_out: usize,
    g: DwGeom,
) -> Result<CudaStorage> {
    fn go<T: CudaDType + DeviceRepr>(
        name: &str,
        cfg: LaunchConfig,
        (a, al): (&CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
        n_out: usize,
        g: DwGeom,
    ) -> Result<CudaStorage> {
        let dev = &a.device;
        let func = dev.get_or_load_custom_func(name, DEPTHWISE_MODULE, DEPTHWISE_PTX)?;
        let (a0, a1) = offsets(al, name)?;
        let (b0, b1) = offsets(bl, name)?;
        let av = a.as_cuda_slice::<T>()?.slice(a0..a1);
        let bv = b.as_cuda_slice::<T>()?.slice(b0..b1);
        // SAFETY: the kernel writes every output element before anything reads it.
        let mut dst = unsafe { dev.alloc::<T>(n_out)? };
        let mut builder = func.builder();
        builder.arg(&av).arg(&bv).arg(&mut dst).arg(&g);
        // SAFETY: argument list and types match the kernel's signature in depthwise.cu.
        unsafe { builder.launch(cfg) }.w()?;
        drop(builder);
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }
    let dt = a.0.dtype();
    if b.0.dtype() != dt {
        bail!("depthwise kernel {root}: mixed dtypes {dt:?} and {:?}", b.0.dtype());
    }
    let name = format!("{root}_{}", tag(dt)?);
    match dt {
        DType::F32 => go::<f32>(&name, cfg, a, b, n_out, g),
        DType::BF16 => go::<bf16>(&name, cfg, a, b, n_out, g),
        DType::F16 => go::<f16>(&name, cfg, a, b, n_out, g),
        other => bail!("depthwise kernel {root}: unsupported dtype {other:?}"),
    }
}

/// The convolution of `x` (b, c, h, w) with `w` (c, 1, k, k): (b, c, ho, wo).
pub fn depthwise_fwd(x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout, g: DwGeom) -> Result<CudaStorage> {
    let n = (g.b * g.c * g.ho * g.wo) as usize;
    run("dw_fwd", elementwise_config(n), (x, xl), (w, wl), n, g)
}

/// The input gradient from the output gradient `dy` (b, c, ho, wo): (b, c, h, w).
pub fn depthwise_bwd_input(
    dy: &CudaStorage,
    dyl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    g: DwGeom,
) -> Result<CudaStorage> {
    let n = (g.b * g.c * g.h * g.w) as usize;
    run("dw_bwd_input", elementwise_config(n), (dy, dyl), (w, wl), n, g)
}

/// The kernel gradient (c, 1, k, k) from the input `x` and the output gradient `dy`: f32
/// partial sums per split of the (b, oy, ox) elements, then their sum in split order, so the
/// result does not depend on scheduling.
pub fn depthwise_bwd_weight(
    x: &CudaStorage,
    xl: &Layout,
    dy: &CudaStorage,
    dyl: &Layout,
    g: DwGeom,
) -> Result<CudaStorage> {
    let taps = g.c * g.k * g.k;
    let (launch, splits) = super::depthwise_weight_launch(&g)?;
    let cfg = config(&launch);
    fn go<T: CudaDType + DeviceRepr>(
        root: &str,
        (x, xl): (&CudaStorage, &Layout),
        (dy, dyl): (&CudaStorage, &Layout),
        g: DwGeom,
        (cfg, taps, splits): (LaunchConfig, i64, i64),
    ) -> Result<CudaStorage> {
        let dev = &x.device;
        let tag = tag(x.dtype())?;
        let part_fn = dev.get_or_load_custom_func(&format!("{root}_part_{tag}"), DEPTHWISE_MODULE, DEPTHWISE_PTX)?;
        let sum_fn = dev.get_or_load_custom_func(&format!("{root}_sum_{tag}"), DEPTHWISE_MODULE, DEPTHWISE_PTX)?;
        let (x0, x1) = offsets(xl, "depthwise kernel gradient input")?;
        let (d0, d1) = offsets(dyl, "depthwise kernel gradient output gradient")?;
        let xv = x.as_cuda_slice::<T>()?.slice(x0..x1);
        let dv = dy.as_cuda_slice::<T>()?.slice(d0..d1);
        // SAFETY: every partial is written by its block, every output by the sum kernel.
        let mut partial = unsafe { dev.alloc::<f32>((taps * splits) as usize)? };
        let mut dst = unsafe { dev.alloc::<T>(taps as usize)? };
        let mut b = part_fn.builder();
        b.arg(&xv).arg(&dv).arg(&mut partial).arg(&g);
        // SAFETY: argument list and types match dw_bwd_weight_part in depthwise.cu.
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        let mut b = sum_fn.builder();
        b.arg(&partial).arg(&mut dst).arg(&taps).arg(&splits);
        // SAFETY: argument list and types match dw_bwd_weight_sum in depthwise.cu.
        unsafe { b.launch(elementwise_config(taps as usize)) }.w()?;
        drop(b);
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }
    let dims = (cfg, taps, splits);
    if dy.dtype() != x.dtype() {
        bail!("depthwise kernel gradient: mixed dtypes {:?} and {:?}", x.dtype(), dy.dtype());
    }
    match x.dtype() {
        DType::F32 => go::<f32>("dw_bwd_weight", (x, xl), (dy, dyl), g, dims),
        DType::BF16 => go::<bf16>("dw_bwd_weight", (x, xl), (dy, dyl), g, dims),
        DType::F16 => go::<f16>("dw_bwd_weight", (x, xl), (dy, dyl), g, dims),
        other => bail!("depthwise kernel gradient: unsupported dtype {other:?}"),
    }
}
