//! A frozen weight stored quantised (a QLoRA-style base): quantised at load from the usual dense
//! tensor into one of candle's ggml block formats, and dequantised to the compute dtype inside
//! each matmul that reads it (`linear::FrozenWeight`), so no dense copy outlives its matmul.
//! Dequantisation writes the compute dtype in one pass (candle's goes through f32, then a cast:
//! three times the traffic and an f32 copy of the weight in between).
//!
//! Why candle's formats and not NF4: they have CPU and CUDA dequantisation kernels in candle
//! already, and their measured error is lower at the same size (BENCHMARKS.md, "Quantised base").

use anyhow::{Context, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, DType, Device, Layout, Shape, Tensor};
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

/// A frozen (out, in) weight in a block format, and the dtype its matmuls compute in. The blocks
/// are a u8 tensor on the weight's device, in ggml's layout (row-major, blocks along each row).
#[derive(Clone)]
pub struct QuantWeight {
    blocks: Tensor,
    format: GgmlDType,
    dims: (usize, usize),
    dtype: DType,
}

impl std::fmt::Debug for QuantWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantWeight[{:?}; {:?} -> {:?}]", self.dims, self.format, self.dtype)
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
        let bytes: Vec<u8> = chunks.concat();
        let n = bytes.len();
        let blocks = Tensor::from_vec(bytes, n, &Device::Cpu)?.to_device(w.device()).context("quantised weight")?;
        Ok(Some(Self { blocks, format: g, dims: (out_dim, in_dim), dtype: w.dtype() }))
    }

    pub fn dims2(&self) -> Result<(usize, usize)> {
        Ok(self.dims)
    }

    pub fn format(&self) -> GgmlDType {
        self.format
    }

    /// The dtype dequantised copies come in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes held (blocks and their scales).
    pub fn storage_bytes(&self) -> usize {
        self.blocks.elem_count()
    }

    /// The blocks as stored, in ggml's layout (row-major, blocks along each row).
    pub fn blocks(&self) -> Result<Vec<u8>> {
        Ok(self.blocks.to_vec1::<u8>()?)
    }

    /// A dense (out, in) copy in `dtype`, untracked; the caller drops it after its matmul. One
    /// pass from the blocks straight to `dtype` (on CUDA one kernel, `kernels/dequant.cu`),
    /// each value computed as candle's f32 dequantisation computes it, then rounded once.
    pub fn dequantize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        self.blocks.apply_op1_no_bwd(&Dequantize { format: self.format, dims: self.dims, dtype })
    }
}

/// ggml block sizes in bytes: Q4_K (f16 d, f16 dmin, 12 bytes of 6-bit scales and minimums,
/// 128 bytes of 4-bit values for 256 weights) and Q8_0 (f16 d, 32 int8 values).
const Q4K_BYTES: usize = 144;
const Q8_0_BYTES: usize = 34;

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Element `r` (0..256) of one Q4_K block, as candle's (llama.cpp's) `to_float`: 64-value
/// groups, the first 32 from the low nibbles and the next 32 from the high nibbles of the same
/// 32 bytes, each half with its own 6-bit scale and minimum.
#[inline(always)]
fn q4k_value(b: &[u8], r: usize) -> f32 {
    let (d, dmin, sc, qs) = (f16_at(b, 0), f16_at(b, 2), &b[4..16], &b[16..]);
    let (g, hi, k) = (r / 64, (r % 64) >= 32, r % 32);
    let is = 2 * g + usize::from(hi);
    let (s, m) = if is < 4 {
        (sc[is] & 63, sc[is + 4] & 63)
    } else {
        ((sc[is + 4] & 0xF) | ((sc[is - 4] >> 6) << 4), (sc[is + 4] >> 4) | ((sc[is] >> 6) << 4))
    };
    let q = qs[32 * g + k];
    let v = if hi { q >> 4 } else { q & 0xF };
    let (d1, m1) = (d * s as f32, dmin * m as f32);
    d1 * v as f32 - m1
}

#[inline(always)]
fn q8_0_value(b: &[u8], r: usize) -> f32 {
    (b[2 + r] as i8) as f32 * f16_at(b, 0)
}

/// Value `r` of one block.
type BlockValue = fn(&[u8], usize) -> f32;

/// The blocks as f32 values, in parallel over blocks.
fn dequantize_cpu(bytes: &[u8], format: GgmlDType) -> candle_core::Result<Vec<f32>> {
    let (block_bytes, per_block, value): (usize, usize, BlockValue) = match format {
        GgmlDType::Q4K => (Q4K_BYTES, 256, q4k_value),
        GgmlDType::Q8_0 => (Q8_0_BYTES, 32, q8_0_value),
        other => candle_core::bail!("dequantize: format {other:?} is not one prs stores"),
    };
    if !bytes.len().is_multiple_of(block_bytes) {
        candle_core::bail!("dequantize: {} bytes are not whole {format:?} blocks", bytes.len());
    }
    let mut out = vec![0f32; bytes.len() / block_bytes * per_block];
    out.par_chunks_mut(per_block).zip(bytes.par_chunks(block_bytes)).for_each(|(o, b)| {
        for (r, v) in o.iter_mut().enumerate() {
            *v = value(b, r);
        }
    });
    Ok(out)
}

/// Blocks (u8) -> dense (out, in) values in `dtype`.
struct Dequantize {
    format: GgmlDType,
    dims: (usize, usize),
    dtype: DType,
}

impl candle_core::CustomOp1 for Dequantize {
    fn name(&self) -> &'static str {
        "dequantize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("dequantize: blocks not contiguous") };
        let v = dequantize_cpu(&s.as_slice::<u8>()?[a..b], self.format)?;
        if v.len() != self.dims.0 * self.dims.1 {
            candle_core::bail!("dequantize: {} values for a {:?} weight", v.len(), self.dims);
        }
        let out = match self.dtype {
            DType::F32 => CpuStorage::F32(v),
            DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
            DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
            DType::F64 => CpuStorage::F64(v.into_iter().map(f64::from).collect()),
            other => candle_core::bail!("dequantize: to {other:?}"),
        };
        Ok((out, Shape::from(self.dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let root = match self.format {
            GgmlDType::Q4K => "dequant_q4k",
            GgmlDType::Q8_0 => "dequant_q8_0",
            other => candle_core::bail!("dequantize: format {other:?} is not one prs stores"),
        };
        let out = crate::kernels::dequantize(s, l, root, self.dims.0 * self.dims.1, self.dtype)?;
        Ok((out, Shape::from(self.dims)))
    }
}
