//! Launchers of the crate's CUDA kernels: PTX compiled from `kernels/*.cu` by build.rs and
//! launched through candle's re-exported cudarc on the tensor's device and stream.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result};
use half::{bf16, f16};

use super::{axis_scale, upsample_fwd_plan, Epilogue, Launch, UpsampleBwdPlan, UpsampleDims, UpsampleFwdPlan};

/// PTX of `kernels/mask_upsample.cu`.
pub const MASK_UPSAMPLE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/mask_upsample.ptx"));
const MASK_UPSAMPLE_MODULE: &str = "prs_mask_upsample";

const THREADS: u32 = 256;

/// A plan's launch as cudarc takes it (the launchers of every kernel file use this).
pub(super) fn config(l: &Launch) -> LaunchConfig {
    LaunchConfig { grid_dim: l.grid, block_dim: l.block, shared_mem_bytes: l.shared_mem_bytes }
}

fn as_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("mask upsample kernel: {what} {v} exceeds i32")))
}

/// Integer and scale arguments shared by every kernel of the module.
struct Args {
    planes: i32,
    h: i32,
    w: i32,
    ho: i32,
    wo: i32,
    sy: f64,
    sx: f64,
}

impl Args {
    fn new(d: UpsampleDims) -> Result<Self> {
        Ok(Self {
            planes: as_i32(d.planes, "planes")?,
            h: as_i32(d.h, "height")?,
            w: as_i32(d.w, "width")?,
            ho: as_i32(d.ho(), "output height")?,
            wo: as_i32(d.wo(), "output width")?,
            sy: axis_scale(d.h, d.ho()),
            sx: axis_scale(d.w, d.wo()),
        })
    }
}

/// Allocates the output, launches the forward kernel `name(src, dst, planes, h, w, ho, wo, sy, sx, thr)`.
fn launch<I: CudaDType + DeviceRepr, O: CudaDType + DeviceRepr>(
    s: &CudaStorage,
    l: &Layout,
    plan: &UpsampleFwdPlan,
    n_out: usize,
    a: &Args,
    thr: f32,
) -> Result<CudaStorage> {
    let Some((o0, o1)) = l.contiguous_offsets() else { bail!("mask upsample kernel: input must be contiguous") };
    let func = s.device.get_or_load_custom_func(&plan.name, MASK_UPSAMPLE_MODULE, MASK_UPSAMPLE_PTX)?;
    let src = s.as_cuda_slice::<I>()?.slice(o0..o1);
    // SAFETY: every element is written by the kernel before it is read.
    let mut dst = unsafe { s.device.alloc::<O>(n_out)? };
    {
        let mut b = func.builder();
        b.arg(&src).arg(&mut dst);
        b.arg(&a.planes).arg(&a.h).arg(&a.w).arg(&a.ho).arg(&a.wo).arg(&a.sy).arg(&a.sx).arg(&thr);
        // SAFETY: argument list and types match the kernel's signature in mask_upsample.cu.
        unsafe { b.launch(config(&plan.launch)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(dst, s.device.clone()))
}

/// Forward: contiguous (planes, h, w) -> (planes, h*f, w*f) in `ep.out_dtype(input)`.
pub fn upsample_fwd(s: &CudaStorage, l: &Layout, d: UpsampleDims, ep: Epilogue) -> Result<CudaStorage> {
    let a = Args::new(d)?;
    let dt = s.dtype();
    let plan = upsample_fwd_plan(d, dt, ep)?;
    let n_out = d.planes * d.ho() * d.wo();
    let thr = match ep {
        Epilogue::Threshold(t) => t,
        _ => 0.0,
    };
    match (dt, ep.out_dtype(dt)) {
        (DType::F16, DType::F16) => launch::<f16, f16>(s, l, &plan, n_out, &a, thr),
        (DType::F16, DType::F32) => launch::<f16, f32>(s, l, &plan, n_out, &a, thr),
        (DType::BF16, DType::BF16) => launch::<bf16, bf16>(s, l, &plan, n_out, &a, thr),
        (DType::BF16, DType::F32) => launch::<bf16, f32>(s, l, &plan, n_out, &a, thr),
        (DType::F32, DType::F32) => launch::<f32, f32>(s, l, &plan, n_out, &a, thr),
        (DType::F64, DType::F64) => launch::<f64, f64>(s, l, &plan, n_out, &a, thr),
        (DType::F16, DType::U8) => launch::<f16, u8>(s, l, &plan, n_out, &a, thr),
        (DType::BF16, DType::U8) => launch::<bf16, u8>(s, l, &plan, n_out, &a, thr),
        (DType::F32, DType::U8) => launch::<f32, u8>(s, l, &plan, n_out, &a, thr),
        (DType::F64, DType::U8) => launch::<f64, u8>(s, l, &plan, n_out, &a, thr),
        (i, o) => bail!("mask upsample kernel: no variant {i:?} -> {o:?}"),
    }
}

/// Backward (adjoint): contiguous (planes, h*f, w*f) -> (planes, h, w), in the plan's two
/// launches: the tap tables, then the gather.
pub fn upsample_bwd(s: &CudaStorage, l: &Layout, d: UpsampleDims, plan: &UpsampleBwdPlan) -> Result<CudaStorage> {
    let a = Args::new(d)?;
    let Some((o0, o1)) = l.contiguous_offsets() else { bail!("mask upsample kernel: input must be contiguous") };
    let dev = &s.device;
    // SAFETY: the taps kernel writes every table entry the gather reads (padding is never read).
    let mut tabs = unsafe { dev.alloc::<u8>(plan.table_bytes)? };
    {
        let func = dev.get_or_load_custom_func(plan.taps_name, MASK_UPSAMPLE_MODULE, MASK_UPSAMPLE_PTX)?;
        let mut b = func.builder();
        b.arg(&mut tabs).arg(&a.h).arg(&a.w).arg(&a.ho).arg(&a.wo).arg(&a.sy).arg(&a.sx);
        // SAFETY: argument list and types match `mask_up_taps_*` in mask_upsample.cu.
        unsafe { b.launch(config(&plan.taps)) }.w()?;
    }
    let tile = as_i32(plan.tile, "tile")?;
    let n_out = d.planes * d.h * d.w;
    fn go<T: CudaDType + DeviceRepr>(
        s: &CudaStorage,
        range: std::ops::Range<usize>,
        plan: &UpsampleBwdPlan,
        tabs: &candle_core::cuda_backend::cudarc::driver::CudaSlice<u8>,
        (a, tile, n_out): (&Args, i32, usize),
    ) -> Result<CudaStorage> {
        let func = s.device.get_or_load_custom_func(&plan.name, MASK_UPSAMPLE_MODULE, MASK_UPSAMPLE_PTX)?;
        let g = s.as_cuda_slice::<T>()?.slice(range);
        // SAFETY: every element is written by the kernel before it is read.
        let mut dst = unsafe { s.device.alloc::<T>(n_out)? };
        let mut b = func.builder();
        b.arg(&g).arg(&mut dst).arg(tabs);
        b.arg(&a.planes).arg(&a.h).arg(&a.w).arg(&a.ho).arg(&a.wo).arg(&tile);
        // SAFETY: argument list and types match `mask_up_grad_*` in mask_upsample.cu.
        unsafe { b.launch(config(&plan.launch)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dst, s.device.clone()))
    }
    match s.dtype() {
        DType::F16 => go::<f16>(s, o0..o1, plan, &tabs, (&a, tile, n_out)),
        DType::BF16 => go::<bf16>(s, o0..o1, plan, &tabs, (&a, tile, n_out)),
        DType::F32 => go::<f32>(s, o0..o1, plan, &tabs, (&a, tile, n_out)),
        DType::F64 => go::<f64>(s, o0..o1, plan, &tabs, (&a, tile, n_out)),
        other => bail!("mask upsample grad kernel: unsupported dtype {other:?}"),
    }
}

/// PTX of `kernels/dropout.cu`.
pub const DROPOUT_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx"));
const DROPOUT_MODULE: &str = "prs_dropout";

/// Dropout of a contiguous tensor (see `nn::dropout`): `y = keep(seed, i) ? x * scale : 0`.
pub fn dropout(s: &CudaStorage, l: &Layout, seed: u64, threshold: u64, scale: f64) -> Result<CudaStorage> {
    let Some((o0, o1)) = l.contiguous_offsets() else { bail!("dropout kernel: input must be contiguous") };
    let n = o1 - o0;
    // A grid-stride loop: enough blocks to fill the card, each thread several elements.
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 65_536) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    fn go<T: CudaDType + DeviceRepr, S: DeviceRepr>(
        s: &CudaStorage,
        (o0, o1): (usize, usize),
        name: &str,
        cfg: LaunchConfig,
        (seed, threshold, scale): (u64, u64, S),
    ) -> Result<CudaStorage> {
        let func = s.device.get_or_load_custom_func(name, DROPOUT_MODULE, DROPOUT_PTX)?;
        let src = s.as_cuda_slice::<T>()?.slice(o0..o1);
        let n = (o1 - o0) as u64;
        // SAFETY: the kernel writes every element before it is read.
        let mut dst = unsafe { s.device.alloc::<T>(o1 - o0)? };
        {
            let mut b = func.builder();
            b.arg(&src).arg(&mut dst).arg(&n).arg(&seed).arg(&threshold).arg(&scale);
            // SAFETY: argument list and types match the kernel's signature in dropout.cu.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(dst, s.device.clone()))
    }
    let (sc32, off) = (scale as f32, (o0, o1));
    match s.dtype() {
        DType::F32 => go::<f32, f32>(s, off, "dropout_f32", cfg, (seed, threshold, sc32)),
        DType::F16 => go::<f16, f32>(s, off, "dropout_f16", cfg, (seed, threshold, sc32)),
        DType::BF16 => go::<bf16, f32>(s, off, "dropout_bf16", cfg, (seed, threshold, sc32)),
        DType::F64 => go::<f64, f64>(s, off, "dropout_f64", cfg, (seed, threshold, scale)),
        other => bail!("dropout kernel: unsupported dtype {other:?} ({n} elements)"),
    }
}
