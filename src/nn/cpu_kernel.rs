//! What the crate's CPU kernels (`nn::depthwise`, `nn::rope`) share: their arithmetic type (f32
//! for f32/f16/bf16 storage, f64 for f64) and the conversions of contiguous storage to it and
//! back, one rounding at the end.

use std::borrow::Cow;
use std::ops::{Add, Mul, Neg};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout};
use half::{bf16, f16};

/// The arithmetic the CPU kernels run in.
pub trait Real:
    Copy + Default + Send + Sync + Add<Output = Self> + Mul<Output = Self> + Neg<Output = Self> + 'static
{
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

impl Real for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Real for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// The contiguous elements of a CPU storage in f32: borrowed when they already are.
fn as_f32<'a>(what: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<Cow<'a, [f32]>> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{what}: input must be contiguous") };
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(&v[a..b]),
        CpuStorage::F16(v) => Cow::Owned(v[a..b].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::BF16(v) => Cow::Owned(v[a..b].iter().map(|x| x.to_f32()).collect()),
        other => candle_core::bail!("{what}: unsupported dtype {:?}", other.dtype()),
    })
}

fn as_f64<'a>(what: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f64]> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{what}: input must be contiguous") };
    Ok(&s.as_slice::<f64>()?[a..b])
}

fn store(v: Vec<f32>, dt: DType) -> CpuStorage {
    match dt {
        DType::F16 => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        _ => CpuStorage::F32(v),
    }
}

/// A kernel over same-dtype contiguous CPU inputs, written once for both arithmetic types.
pub trait CpuKernel {
    fn run<A: Real>(&self, inputs: &[&[A]]) -> Vec<A>;
}

/// Runs `kernel` on the inputs in their arithmetic type and stores its output in their dtype.
pub fn run_cpu(
    what: &str,
    inputs: &[(&CpuStorage, &Layout)],
    kernel: &impl CpuKernel,
) -> candle_core::Result<CpuStorage> {
    let dt = inputs[0].0.dtype();
    if let Some((s, _)) = inputs.iter().find(|(s, _)| s.dtype() != dt) {
        candle_core::bail!("{what}: mixed dtypes {dt:?} and {:?}", s.dtype());
    }
    if dt == DType::F64 {
        let xs = inputs.iter().map(|(s, l)| as_f64(what, s, l)).collect::<candle_core::Result<Vec<_>>>()?;
        return Ok(CpuStorage::F64(kernel.run(&xs)));
    }
    let xs = inputs.iter().map(|(s, l)| as_f32(what, s, l)).collect::<candle_core::Result<Vec<_>>>()?;
    let views: Vec<&[f32]> = xs.iter().map(|c| c.as_ref()).collect();
    Ok(store(kernel.run(&views), dt))
}
