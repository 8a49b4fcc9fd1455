//! A frozen weight stored quantised (a QLoRA-style base): quantised at load from the usual dense
//! tensor into one of candle's ggml block formats, and dequantised to the compute dtype inside
//! each matmul that reads it (`linear::FrozenWeight`), so no dense copy outlives its matmul.
//!
//! Why candle's formats and not NF4: they have CPU and CUDA dequantisation kernels in candle
//! already, and their measured error is lower at the same size (BENCHMARKS.md, "Quantised base").

use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How the frozen LLM projections are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
pub enum BaseQuant {
    /// The compute dtype, as read.
    #[default]
    #[serde(rename = "none", alias = "off")]
    #[value(name = "none", alias = "off")]
    None,
    /// ggml Q8_0: blocks of 32 int8 values with one f16 scale (8.5 bits per weight).
    #[serde(rename = "8bit", alias = "int8", alias = "q8_0")]
    #[value(name = "8bit", alias = "int8", alias = "q8_0")]
    Int8,
    /// ggml Q4_K: super-blocks of 256 4-bit values, 8 sub-block scales and minimums (4.5 bits
    /// per weight).
    #[serde(rename = "4bit", alias = "int4", alias = "q4_k")]
    #[value(name = "4bit", alias = "int4", alias = "q4_k")]
    Int4,
}

impl BaseQuant {
    /// The block format, None for an unquantised base.
    pub fn ggml(self) -> Option<GgmlDType> {
        match self {
            Self::None => None,
            Self::Int8 => Some(GgmlDType::Q8_0),
            Self::Int4 => Some(GgmlDType::Q4K),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Int8 => "8bit",
            Self::Int4 => "4bit",
        }
    }

    /// Bytes of a quantised (out, in) weight, scales included; None when `in_dim` is not a
    /// multiple of the block (such a weight stays dense, see [`QuantWeight::quantize`]).
    pub fn weight_bytes(self, out_dim: usize, in_dim: usize) -> Option<u64> {
        let g = self.ggml()?;
        in_dim.is_multiple_of(g.block_size()).then(|| (out_dim * in_dim / g.block_size() * g.type_size()) as u64)
    }
}

impl std::fmt::Display for BaseQuant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A frozen (out, in) weight in a block format, and the dtype its matmuls compute in.
#[derive(Clone)]
pub struct QuantWeight {
    q: Arc<QTensor>,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for QuantWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantWeight[{:?}; {:?} -> {:?}]", self.q.shape(), self.q.dtype(), self.dtype)
    }
}

/// Rows quantised per parallel task (candle quantises a tensor on one thread).
const ROWS_PER_TASK: usize = 64;

impl QuantWeight {
    /// Quantises `w` (out, in) with `mode`; dequantised copies come back in `w`'s dtype on `w`'s
    /// device. None when `mode` is `none`, or when `in` is not a multiple of the format's block
    /// (32 for 8bit, 256 for 4bit): blocks run along a row, so such a weight stays dense.
    pub fn quantize(w: &Tensor, mode: BaseQuant) -> Result<Option<Self>> {
        let Some(g) = mode.ggml() else { return Ok(None) };
        let (out_dim, in_dim) = w.dims2()?;
        if !in_dim.is_multiple_of(g.block_size()) {
            return Ok(None);
        }
        // Host quantisation in parallel over row chunks (candle's CUDA quantiser copies to the
        // host and runs single-threaded), then one upload of the blocks.
        let host: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let chunks: Vec<Vec<u8>> = (0..out_dim.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .map(|c| -> Result<Vec<u8>> {
                let (r0, r1) = (c * ROWS_PER_TASK, ((c + 1) * ROWS_PER_TASK).min(out_dim));
                // A tensor of its own: candle quantises a view's whole storage.
                let rows = Tensor::from_slice(&host[r0 * in_dim..r1 * in_dim], (r1 - r0, in_dim), &Device::Cpu)?;
                Ok(QTensor::quantize(&rows, g)?.data()?.into_owned())
            })
            .collect::<Result<_>>()?;
        drop(host);
        let n: usize = chunks.iter().map(Vec::len).sum();
        // u64 storage: the block structs need their alignment when candle views the bytes.
        let mut buf = vec![0u64; n.div_ceil(8)];
        // SAFETY: the byte view covers exactly the u64 buffer's first n bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, n) };
        let mut at = 0;
        for c in &chunks {
            bytes[at..at + c.len()].copy_from_slice(c);
            at += c.len();
        }
        drop(chunks);
        let storage = QStorage::from_data(std::borrow::Cow::Borrowed(&*bytes), w.device(), g)?;
        let q = QTensor::new(storage, (out_dim, in_dim)).context("quantised weight")?;
        Ok(Some(Self { q: Arc::new(q), dtype: w.dtype(), device: w.device().clone() }))
    }

    pub fn dims2(&self) -> Result<(usize, usize)> {
        Ok(self.q.shape().dims2()?)
    }

    pub fn format(&self) -> GgmlDType {
        self.q.dtype()
    }

    /// The dtype dequantised copies come in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes held (blocks and their scales).
    pub fn storage_bytes(&self) -> usize {
        self.q.storage_size_in_bytes()
    }

    /// The blocks as stored, in ggml's layout (row-major, blocks along each row).
    pub fn blocks(&self) -> Result<Vec<u8>> {
        Ok(self.q.data()?.into_owned())
    }

    /// A dense (out, in) copy in `dtype`, untracked; the caller drops it after its matmul.
    pub fn dequantize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        if dtype == DType::F16 {
            return self.q.dequantize_f16(&self.device);
        }
        self.q.dequantize(&self.device)?.to_dtype(dtype)
    }
}
