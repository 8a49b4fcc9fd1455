//! Launchers of the crate's CUDA kernels: PTX compiled from `kernels/*.cu` by build.rs and
//! launched through candle's re-exported cudarc on the tensor's device and stream.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result};
use half::{bf16, f16};

use super::Epilogue;

/// PTX of `kernels/mask_upsample.cu`.
pub const MASK_UPSAMPLE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/mask_upsample.ptx"));
const MASK_UPSAMPLE_MODULE: &str = "prs_mask_upsample";

/// Low-res columns per backward block: `BWD_TILE` in kernels/mask_upsample.cu.
pub const BWD_TILE: usize = 32;
/// Shared memory a backward block may use (the default limit without opting in).
pub const BWD_SMEM_LIMIT: usize = 48 * 1024;
const THREADS: u32 = 256;

/// Plane geometry: `planes` low-res (h, w) images upsampled by `factor`.
#[derive(Clone, Copy, Debug)]
pub struct UpsampleDims {
    pub planes: usize,
    pub h: usize,
    pub w: usize,
    pub factor: usize,
}

/// Per-axis source step, computed exactly as `Taps::new` does on the CPU.
fn axis_scale(n_in: usize, n_out: usize) -> f64 {
    if n_out > 1 {
        (n_in as f64 - 1.0) / (n_out as f64 - 1.0)
    } else {
        0.0
    }
}

fn dtype_tag(dt: DType) -> Result<&'static str> {
    Ok(match dt {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        other => bail!("mask upsample kernel: unsupported dtype {other:?}"),
    })
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
        let (ho, wo) = (d.h * d.factor, d.w * d.factor);
        Ok(Self {
            planes: as_i32(d.planes, "planes")?,
            h: as_i32(d.h, "height")?,
            w: as_i32(d.w, "width")?,
            ho: as_i32(ho, "output height")?,
            wo: as_i32(wo, "output width")?,
            sy: axis_scale(d.h, ho),
            sx: axis_scale(d.w, wo),
        })
    }
}

/// Allocates the output, launches `name(src, dst, planes, h, w, ho, wo, sy, sx[, thr])`.
fn launch<I: CudaDType + DeviceRepr, O: CudaDType + DeviceRepr>(
    s: &CudaStorage,
    l: &Layout,
    name: &str,
    cfg: LaunchConfig,
    n_out: usize,
    a: &Args,
    thr: Option<f32>,
) -> Result<CudaStorage> {
    let Some((o0, o1)) = l.contiguous_offsets() else { bail!("mask upsample kernel: input must be contiguous") };
    let func = s.device.get_or_load_custom_func(name, MASK_UPSAMPLE_MODULE, MASK_UPSAMPLE_PTX)?;
    let src = s.as_cuda_slice::<I>()?.slice(o0..o1);
    // SAFETY: every element is written by the kernel before it is read.
    let mut dst = unsafe { s.device.alloc::<O>(n_out)? };
    {
        let mut b = func.builder();
        b.arg(&src).arg(&mut dst);
        b.arg(&a.planes).arg(&a.h).arg(&a.w).arg(&a.ho).arg(&a.wo).arg(&a.sy).arg(&a.sx);
        if let Some(t) = thr.as_ref() {
            b.arg(t);
        }
        // SAFETY: argument list and types match the kernel's signature in mask_upsample.cu.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(dst, s.device.clone()))
}

/// Forward: contiguous (planes, h, w) -> (planes, h*f, w*f) in `ep.out_dtype(input)`.
pub fn upsample_fwd(s: &CudaStorage, l: &Layout, d: UpsampleDims, ep: Epilogue) -> Result<CudaStorage> {
    let a = Args::new(d)?;
    let dt = s.dtype();
    let tag = dtype_tag(dt)?;
    let out_dt = ep.out_dtype(dt);
    let root = match ep {
        Epilogue::Logits | Epilogue::LogitsWide => format!("mask_up_{tag}_{}", dtype_tag(out_dt)?),
        Epilogue::Sigmoid => format!("mask_up_sigmoid_{tag}"),
        Epilogue::Threshold(_) => format!("mask_up_mask_{tag}"),
    };
    // One 16-byte store per thread when rows split into whole vectors, else one element.
    let vec = 16 / out_dt.size_in_bytes();
    let n_out = d.planes * d.h * d.factor * d.w * d.factor;
    let (name, per_thread) = if (d.w * d.factor) % vec == 0 { (root + "_v", vec) } else { (root + "_s", 1) };
    let blocks = (n_out / per_thread).div_ceil(THREADS as usize);
    let cfg = LaunchConfig {
        grid_dim: (
            u32::try_from(blocks).map_err(|_| candle_core::Error::Msg("mask upsample: output too large".into()))?,
            1,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let thr = Some(match ep {
        Epilogue::Threshold(t) => t,
        _ => 0.0,
    });
    match (dt, out_dt) {
        (DType::F16, DType::F16) => launch::<f16, f16>(s, l, &name, cfg, n_out, &a, thr),
        (DType::F16, DType::F32) => launch::<f16, f32>(s, l, &name, cfg, n_out, &a, thr),
        (DType::BF16, DType::BF16) => launch::<bf16, bf16>(s, l, &name, cfg, n_out, &a, thr),
        (DType::BF16, DType::F32) => launch::<bf16, f32>(s, l, &name, cfg, n_out, &a, thr),
        (DType::F32, DType::F32) => launch::<f32, f32>(s, l, &name, cfg, n_out, &a, thr),
        (DType::F64, DType::F64) => launch::<f64, f64>(s, l, &name, cfg, n_out, &a, thr),
        (DType::F16, DType::U8) => launch::<f16, u8>(s, l, &name, cfg, n_out, &a, thr),
        (DType::BF16, DType::U8) => launch::<bf16, u8>(s, l, &name, cfg, n_out, &a, thr),
        (DType::F32, DType::U8) => launch::<f32, u8>(s, l, &name, cfg, n_out, &a, thr),
        (DType::F64, DType::U8) => launch::<f64, u8>(s, l, &name, cfg, n_out, &a, thr),
        (i, o) => bail!("mask upsample kernel: no variant {i:?} -> {o:?}"),
    }
}

/// Shared memory of a backward block whose widest tile spans `span` output columns.
pub fn bwd_smem_bytes(dtype: DType, span: usize) -> usize {
    span * if dtype == DType::F64 { 8 } else { 4 }
}

/// Backward (adjoint): contiguous (planes, h*f, w*f) -> (planes, h, w). `span` is the widest
/// range of output columns any `BWD_TILE`-column tile reads (from the CPU taps).
pub fn upsample_bwd(s: &CudaStorage, l: &Layout, d: UpsampleDims, span: usize) -> Result<CudaStorage> {
    let a = Args::new(d)?;
    let dt = s.dtype();
    let smem = bwd_smem_bytes(dt, span);
    if smem > BWD_SMEM_LIMIT {
        bail!("mask upsample grad kernel: {smem} bytes of shared memory exceed {BWD_SMEM_LIMIT}");
    }
    let blocks = d.planes * d.h * d.w.div_ceil(BWD_TILE);
    let cfg = LaunchConfig {
        grid_dim: (
            u32::try_from(blocks).map_err(|_| candle_core::Error::Msg("mask upsample grad: input too large".into()))?,
            1,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let name = format!("mask_up_grad_{}", dtype_tag(dt)?);
    let n_out = d.planes * d.h * d.w;
    match dt {
        DType::F16 => launch::<f16, f16>(s, l, &name, cfg, n_out, &a, None),
        DType::BF16 => launch::<bf16, bf16>(s, l, &name, cfg, n_out, &a, None),
        DType::F32 => launch::<f32, f32>(s, l, &name, cfg, n_out, &a, None),
        DType::F64 => launch::<f64, f64>(s, l, &name, cfg, n_out, &a, None),
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
