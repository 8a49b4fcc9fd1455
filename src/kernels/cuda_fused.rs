//! Launchers of `kernels/fused.cu`: the attention softmax (forward with mask and causal masking
//! computed from indices, backward), RMS normalisation, the SiLU gate, GELU's backward and the rotary head split,
//! each one kernel per direction. bf16/f16/f32 storage, f32 math. Inputs must be contiguous; the callers in `nn`
//! make them so (or fall back to their composites).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result};
use half::{bf16, f16};

use super::cuda::config;
use super::{CausalFill, RowMap};

/// PTX of `kernels/fused.cu`.
pub const FUSED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const FUSED_MODULE: &str = "prs_fused";

// SAFETY: `RowMap` is repr(C) with nine i64 fields, the layout of the kernel's `RowMap`.
unsafe impl DeviceRepr for RowMap {}

pub(super) fn tag(dt: DType) -> Result<&'static str> {
    Ok(match dt {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => bail!("fused kernels: unsupported dtype {other:?}"),
    })
}

pub(super) fn offsets(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(o) => Ok(o),
        None => bail!("fused kernel: {what} must be contiguous"),
    }
}

fn as_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("fused kernel: {what} {v} exceeds i32")))
}

/// `plan::row_launch` for a contiguous input whose last dimension is the row.
fn row_config(l: &Layout) -> Result<(LaunchConfig, i32)> {
    let dims = l.shape().dims();
    let Some(&n) = dims.last() else { bail!("fused row kernel: scalar input") };
    if n == 0 || l.shape().elem_count() == 0 {
        bail!("fused row kernel: empty input {dims:?}");
    }
    let rows = l.shape().elem_count() / n;
    as_i32(rows, "rows")?;
    Ok((config(&super::row_launch(rows, n)?), as_i32(n, "row length")?))
}

/// A grid-stride element-wise launch over `n` elements (`plan::elementwise_launch`).
pub(super) fn elementwise_config(n: usize) -> LaunchConfig {
    config(&super::elementwise_launch(n))
}

/// A scalar kernel argument.
enum Arg {
    I32(i32),
    I64(i64),
    F32(f32),
}

/// Launches `name(inputs..., out, scalars...)` with every input of type `T`, allocating `n_out`
/// outputs of `T`.
fn run<T: CudaDType + DeviceRepr>(
    name: &str,
    cfg: LaunchConfig,
    ins: &[(&CudaStorage, &Layout)],
    n_out: usize,
    scalars: &[Arg],
) -> Result<CudaStorage> {
    let dev = &ins[0].0.device;
    let func = dev.get_or_load_custom_func(name, FUSED_MODULE, FUSED_PTX)?;
    let views = ins
        .iter()
        .map(|(s, l)| {
            let (a, b) = offsets(l, name)?;
            Ok(s.as_cuda_slice::<T>()?.slice(a..b))
        })
        .collect::<Result<Vec<_>>>()?;
    // SAFETY: the kernel writes every output element before anything reads it.
    let mut dst = unsafe { dev.alloc::<T>(n_out)? };
    {
        let mut b = func.builder();
        for v in &views {
            b.arg(v);
        }
        b.arg(&mut dst);
        for a in scalars {
            match a {
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        // SAFETY: argument list and types match the kernel's signature in fused.cu.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
}

/// `run` with `T` and the name's `_<dtype>` suffix from the first input's dtype; every input
/// must have that dtype.
fn run_any(
    root: &str,
    cfg: LaunchConfig,
    ins: &[(&CudaStorage, &Layout)],
    n_out: usize,
    scalars: &[Arg],
) -> Result<CudaStorage> {
    let dt = ins[0].0.dtype();
    if let Some((s, _)) = ins.iter().find(|(s, _)| s.dtype() != dt) {
        bail!("fused kernel {root}: mixed dtypes {dt:?} and {:?}", s.dtype());
    }
    let name = format!("{root}_{}", tag(dt)?);
    match dt {
        DType::F32 => run::<f32>(&name, cfg, ins, n_out, scalars),
        DType::BF16 => run::<bf16>(&name, cfg, ins, n_out, scalars),
        DType::F16 => run::<f16>(&name, cfg, ins, n_out, scalars),
        other => bail!("fused kernel {root}: unsupported dtype {other:?}"),
    }
}

/// `softmax(scale * x + mask)` over the last dimension of a contiguous `x`, in `x`'s dtype.
/// `mask` has `x`'s rank and broadcasts to it; any float dtype (widened to f32 unless it is
/// `x`'s own).
pub fn softmax_fwd(
    x: &CudaStorage,
    xl: &Layout,
    mask: Option<(&CudaStorage, &Layout)>,
    scale: f32,
    causal: Option<CausalFill>,
) -> Result<CudaStorage> {
    let (cfg, n) = row_config(xl)?;
    let dims = xl.shape().dims();
    let xo = offsets(xl, "softmax input")?;
    let q_len = if dims.len() >= 2 { dims[dims.len() - 2] } else { 1 };
    let (causal_on, past, fill) = match causal {
        Some(c) => (1i32, as_i32(c.past, "past length")?, c.fill),
        None => (0, 0, 0.0),
    };
    let scalars = [as_i32(q_len, "query length")?, past];
    let dt = x.dtype();
    // The mask in `x`'s dtype or in f32 (the kernel's two variants).
    let widened;
    let (mask, map) = match mask {
        // Never read without a mask.
        None => (None, RowMap { dims: [1; 4], strides: [0; 4], last: 0 }),
        Some((m, ml)) => {
            let Some(map) = RowMap::new(dims, ml.dims()) else {
                bail!("softmax kernel: mask {:?} does not broadcast to {dims:?} (rank <= 5)", ml.dims())
            };
            let m = if m.dtype() == dt || m.dtype() == DType::F32 {
                (m, offsets(ml, "softmax mask")?)
            } else {
                widened = m.to_dtype(ml, DType::F32)?;
                (&widened, (0, ml.shape().elem_count()))
            };
            (Some(m), map)
        }
    };
    fn go<T: CudaDType + DeviceRepr, M: CudaDType + DeviceRepr>(
        name: &str,
        cfg: LaunchConfig,
        (x, xo): (&CudaStorage, (usize, usize)),
        mask: Option<(&CudaStorage, (usize, usize))>,
        (n, scale, map, causal, [q_len, past], fill): (i32, f32, RowMap, i32, [i32; 2], f32),
    ) -> Result<CudaStorage> {
        let func = x.device.get_or_load_custom_func(name, FUSED_MODULE, FUSED_PTX)?;
        let xs = x.as_cuda_slice::<T>()?.slice(xo.0..xo.1);
        // Without a mask the kernel never reads its mask pointer: pass the input again.
        let (ms, has_mask) = match mask {
            Some((m, (a, b))) => (m.as_cuda_slice::<M>()?.slice(a..b), 1i32),
            None => (x.as_cuda_slice::<M>()?.slice(xo.0..xo.1), 0),
        };
        // SAFETY: every element is written by the kernel before it is read.
        let mut dst = unsafe { x.device.alloc::<T>(xo.1 - xo.0)? };
        {
            let mut b = func.builder();
            b.arg(&xs).arg(&ms).arg(&mut dst).arg(&n).arg(&scale).arg(&has_mask).arg(&map);
            b.arg(&causal).arg(&q_len).arg(&past).arg(&fill);
            // SAFETY: argument list and types match SOFTMAX_FWD in fused.cu.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(dst, x.device.clone()))
    }
    let a = (n, scale, map, causal_on, scalars, fill);
    let wide = mask.is_some_and(|(m, _)| m.dtype() != dt);
    match (dt, wide) {
        (DType::F32, _) => go::<f32, f32>("softmax_fwd_f32", cfg, (x, xo), mask, a),
        (DType::BF16, false) => go::<bf16, bf16>("softmax_fwd_bf16", cfg, (x, xo), mask, a),
        (DType::BF16, true) => go::<bf16, f32>("softmax_fwd_bf16_mf32", cfg, (x, xo), mask, a),
        (DType::F16, false) => go::<f16, f16>("softmax_fwd_f16", cfg, (x, xo), mask, a),
        (DType::F16, true) => go::<f16, f32>("softmax_fwd_f16_mf32", cfg, (x, xo), mask, a),
        (other, _) => bail!("softmax kernel: unsupported dtype {other:?}"),
    }
}

/// Softmax backward from its output `p` and output gradient `g` (same shape and dtype):
/// `dx = scale * p * (g - sum(g * p))`.
pub fn softmax_bwd(p: &CudaStorage, pl: &Layout, g: &CudaStorage, gl: &Layout, scale: f32) -> Result<CudaStorage> {
    let (cfg, n) = row_config(pl)?;
    run_any("softmax_bwd", cfg, &[(p, pl), (g, gl)], pl.shape().elem_count(), &[Arg::I32(n), Arg::F32(scale)])
}

fn rms_scalars(n: i32, eps: f64) -> [Arg; 3] {
    // As the CPU composite's affine: `sum * (1 / n) + eps` with both constants in f32.
    [Arg::I32(n), Arg::F32((1.0 / n as f64) as f32), Arg::F32(eps as f32)]
}

/// `x / sqrt(mean(x^2) + eps)` over the last dimension.
pub fn rms_fwd(x: &CudaStorage, xl: &Layout, eps: f64) -> Result<CudaStorage> {
    let (cfg, n) = row_config(xl)?;
    run_any("rms_fwd", cfg, &[(x, xl)], xl.shape().elem_count(), &rms_scalars(n, eps))
}

/// The gradient of `rms_fwd` with respect to `x`, given the output gradient `g`.
pub fn rms_bwd(x: &CudaStorage, xl: &Layout, g: &CudaStorage, gl: &Layout, eps: f64) -> Result<CudaStorage> {
    let (cfg, n) = row_config(xl)?;
    run_any("rms_bwd", cfg, &[(x, xl), (g, gl)], xl.shape().elem_count(), &rms_scalars(n, eps))
}

/// `silu(a) * u`, element-wise.
pub fn silu_mul_fwd(a: &CudaStorage, al: &Layout, u: &CudaStorage, ul: &Layout) -> Result<CudaStorage> {
    let n = al.shape().elem_count();
    run_any("silu_mul_fwd", elementwise_config(n), &[(a, al), (u, ul)], n, &[Arg::I64(n as i64)])
}

/// The gradients of `silu(a) * u` given the output gradient `g`: `2n` elements, the gradient
/// of `a` then that of `u`.
pub fn silu_mul_bwd(
    a: &CudaStorage,
    al: &Layout,
    u: &CudaStorage,
    ul: &Layout,
    g: &CudaStorage,
    gl: &Layout,
) -> Result<CudaStorage> {
    let n = al.shape().elem_count();
    run_any("silu_mul_bwd", elementwise_config(n), &[(a, al), (u, ul), (g, gl)], 2 * n, &[Arg::I64(n as i64)])
}

/// The input gradient of `gelu_erf` from its input and output gradient (same shape and dtype).
pub fn gelu_erf_bwd(x: &CudaStorage, xl: &Layout, g: &CudaStorage, gl: &Layout) -> Result<CudaStorage> {
    let n = xl.shape().elem_count();
    run_any("gelu_erf_bwd", elementwise_config(n), &[(x, xl), (g, gl)], n, &[Arg::I64(n as i64)])
}

/// The head split and rotation of `nn::rope` (`forward`), or its transpose: `x` is the
/// projection (B, T, H*D) forward and the gradient (B, H, T, D) backward; `cos`, `sin` are
/// (B, 1, T, D); `[b, t, h, d]` the sizes.
pub fn rope_heads(
    forward: bool,
    x: (&CudaStorage, &Layout),
    cos: (&CudaStorage, &Layout),
    sin: (&CudaStorage, &Layout),
    [b, t, h, d]: [usize; 4],
) -> Result<CudaStorage> {
    let n = b * t * h * d;
    let root = if forward { "rope_heads_fwd" } else { "rope_heads_bwd" };
    let scalars = [
        Arg::I64(n as i64),
        Arg::I32(as_i32(h, "heads")?),
        Arg::I32(as_i32(t, "tokens")?),
        Arg::I32(as_i32(d, "head dim")?),
    ];
    run_any(root, elementwise_config(n), &[x, cos, sin], n, &scalars)
}
