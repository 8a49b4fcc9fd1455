//! Checks on every tensor read from a weight file, applied where it is materialised: the
//! `VarBuilder` backends of [`super::shards`] and [`super::pth`] wrap candle's readers.
//!
//! - dtype: a tensor requested as a float (every weight is) must be stored as F16, BF16, F32 or
//!   F64. candle would otherwise convert an integer or bool tensor silently into a "weight".
//! - values: the tensor, in the dtype it is handed out in, must be finite. A NaN in a frozen
//!   weight otherwise reaches the output as an empty mask with exit status 0.
//!
//! The value scan is one reduction per tensor on the tensor's own device ([`check_finite`]);
//! only a tensor that fails it gets a second, counting pass for the message. On the CPU it
//! adds 5-15% to reading a tensor as f32 from the page cache (what CPU runs do); reading as
//! f16/bf16 on the CPU costs 2-3x the bare read. On a GPU the sum runs on the device.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

/// The stored dtypes a weight may have, as safetensors names them.
pub const FLOAT_DTYPES: [&str; 4] = ["F16", "BF16", "F32", "F64"];

/// One tensor as its safetensors header describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    /// safetensors dtype name (`F32`, `BF16`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Index into the file list of `shards::SafetensorsFiles`.
    pub file: usize,
}

fn is_weight_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

/// A weight file that cannot be used: an I/O `InvalidData` error inside candle's, so the
/// command exits with the bad-input status (`crate::exit`) and the message is unchanged.
fn bad_weights(msg: String) -> candle_core::Error {
    candle_core::Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, msg))
}

fn dtype_error(name: &str, file: &str, stored: &str) -> candle_core::Error {
    bad_weights(format!(
        "tensor `{name}` in {file} is stored as {stored}, but a weight must be a float tensor ({}); \
         the file does not hold the weights this model expects here",
        FLOAT_DTYPES.join(", ")
    ))
}

/// Errors when `t` (a float tensor) holds a NaN or an infinity, naming `name` and `file`.
/// `source` is the tensor as stored, when `t` was converted from it: an infinity that only the
/// conversion produced (an F32 value beyond F16's range) gets its own message.
///
/// Fast path: the sum of all elements is finite exactly when no element is NaN or infinite
/// (both propagate through addition), except when finite values overflow the sum; one
/// reduction on the tensor's device, no temporary tensor. A non-finite sum is confirmed by
/// counting, so an overflowing sum of finite values passes.
pub fn check_finite(t: &Tensor, name: &str, file: &str, source: Option<&Tensor>) -> candle_core::Result<()> {
    if !t.dtype().is_float() || t.elem_count() == 0 {
        return Ok(());
    }
    // candle's CPU reductions over f16/bf16 are scalar (about 7 ns per element, several times the
    // load itself); converting to f32 and summing that costs a third. Devices sum in place.
    let sum = if t.device().is_cpu() && matches!(t.dtype(), DType::F16 | DType::BF16) {
        t.to_dtype(DType::F32)?.sum_all()?
    } else {
        t.sum_all()?
    };
    let sum = sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if sum.is_finite() {
        return Ok(());
    }
    let (nan, nonfinite) = count_nonfinite(t)?;
    if nonfinite == 0 {
        return Ok(()); // finite values whose sum overflowed
    }
    let (n, dt) = (t.elem_count(), t.dtype());
    if let Some(src) = source.filter(|s| s.dtype() != dt) {
        if count_nonfinite(src)?.1 == 0 {
            let max = src.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            return Err(bad_weights(format!(
                "tensor `{name}` in {file}: {nonfinite} of its {n} values overflow {dt:?} when converted from \
                 {:?} (largest magnitude {max:e}); use a wider compute dtype (bf16 or f32)",
                src.dtype()
            )));
        }
    }
    Err(bad_weights(format!(
        "tensor `{name}` in {file} holds {nan} NaN and {} infinite value(s) among its {n}: the file is corrupt \
         or was saved from a diverged run",
        nonfinite - nan
    )))
}

/// (NaN count, non-finite count) of a float tensor; the slow path, run only on failure.
fn count_nonfinite(t: &Tensor) -> candle_core::Result<(u64, u64)> {
    let count = |mask: Tensor| -> candle_core::Result<u64> {
        Ok(mask.to_dtype(DType::U32)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()? as u64)
    };
    let nan = count(t.ne(t)?)?;
    // x * 0 is 0 for finite x and NaN for NaN and infinities.
    let z = t.affine(0.0, 0.0)?;
    Ok((nan, count(z.ne(&z)?)?))
}

/// Where a backend's tensors come from.
enum Source {
    /// Memory-mapped safetensors with their checked headers (name -> dtype and file).
    Safetensors {
        st: candle_core::safetensors::MmapedSafetensors,
        entries: Arc<BTreeMap<String, TensorEntry>>,
        files: Vec<PathBuf>,
    },
    /// A memory-mapped PyTorch state dict.
    Pth { pth: super::pth_map::MappedPth, path: PathBuf },
}

/// A `VarBuilder` backend that reads through candle and checks dtype and values (see the
/// module documentation). Requests for a non-float dtype are passed through unchecked.
pub struct CheckedTensors {
    source: Source,
}

impl CheckedTensors {
    /// Over memory-mapped safetensors files whose headers were validated into `entries`.
    ///
    /// # Safety
    /// As `VarBuilder::from_mmaped_safetensors`: the files must not change while mapped.
    pub(crate) unsafe fn safetensors(
        files: &[PathBuf],
        entries: Arc<BTreeMap<String, TensorEntry>>,
    ) -> candle_core::Result<Self> {
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files)? };
        Ok(Self { source: Source::Safetensors { st, entries, files: files.to_vec() } })
    }

    /// Over a PyTorch state dict.
    pub(crate) fn pth(pth: super::pth_map::MappedPth, path: PathBuf) -> Self {
        Self { source: Source::Pth { pth, path } }
    }

    /// The tensor as stored and the file it is in (for messages); checks the stored dtype
    /// when `float` (before loading, from the header, for safetensors).
    fn load(&self, name: &str, dev: &Device, float: bool) -> candle_core::Result<(Tensor, String)> {
        match &self.source {
            Source::Safetensors { st, entries, files } => {
                let file = entries.get(name).map(|e| files[e.file].display().to_string()).unwrap_or_default();
                if let Some(e) = entries.get(name).filter(|e| float && !FLOAT_DTYPES.contains(&e.dtype.as_str())) {
                    return Err(dtype_error(name, &file, &e.dtype));
                }
                Ok((st.load(name, dev)?, file))
            }
            Source::Pth { pth, path } => {
                let file = path.display().to_string();
                let t = pth
                    .get(name)?
                    .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
                if float && !is_weight_dtype(t.dtype()) {
                    return Err(dtype_error(name, &file, &format!("{:?}", t.dtype()).to_uppercase()));
                }
                Ok((t.to_device(dev)?, file))
            }
        }
    }
}

impl SimpleBackend for CheckedTensors {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt())?
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let float = dtype.is_float();
        let (raw, file) = self.load(name, dev, float)?;
        let t = raw.to_dtype(dtype)?;
        if float {
            check_finite(&t, name, &file, Some(&raw))?;
        }
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match &self.source {
            Source::Safetensors { entries, .. } => entries.contains_key(name),
            Source::Pth { pth, .. } => pth.contains(name),
        }
    }
}
