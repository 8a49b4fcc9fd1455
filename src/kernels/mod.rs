//! The crate's own CUDA kernels (feature `cuda`, in `cuda`, `cuda_fused`, `cuda_depthwise`, `cuda_adamw` and `cuda_dequant`) and what their
//! callers choose between. The ops that use them, and their CPU references, live in
//! `nn::upsample`, `nn::dropout`, `nn::softmax`, `nn::fused`, `nn::depthwise`, `nn::quant` and `train::fused_adamw`; this module
//! imports nothing of `nn` or `train`, so the layers stay one-way.

use candle_core::DType;

mod plan;
pub use plan::*;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub use cuda::*;
#[cfg(feature = "cuda")]
mod cuda_fused;
#[cfg(feature = "cuda")]
pub use cuda_fused::*;
#[cfg(feature = "cuda")]
mod cuda_depthwise;
#[cfg(feature = "cuda")]
pub use cuda_depthwise::*;
#[cfg(feature = "cuda")]
mod cuda_adamw;
#[cfg(feature = "cuda")]
pub use cuda_adamw::*;
#[cfg(feature = "cuda")]
mod cuda_dequant;
#[cfg(feature = "cuda")]
pub use cuda_dequant::*;

/// One tensor of a multi-tensor AdamW launch (`kernels/adamw.cu`'s `AdamWTensor`, field for
/// field, `repr(C)`): device addresses of its f32 parameter, gradient and moments, its length,
/// the blocks of the tensors before it, and its per-tensor constants.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdamWTensor {
    pub p: u64,
    pub g: u64,
    pub m: u64,
    pub v: u64,
    pub n: i64,
    pub first_block: i64,
    pub decay: f32,
    pub step: f32,
    pub inv_bias2: f32,
    pub apply_decay: i32,
}

/// Elements per block of the multi-tensor AdamW kernels (their `CHUNK`).
pub const ADAMW_CHUNK: i64 = 4096;

/// Blocks of the multi-tensor AdamW kernels over a tensor of `n` elements.
pub fn adamw_blocks(n: i64) -> i64 {
    (n.max(0) as u64).div_ceil(ADAMW_CHUNK as u64) as i64
}

/// The constants every tensor of an AdamW launch shares.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    pub coef: f32,
    pub apply_coef: i32,
    pub one_minus_b1: f32,
    pub b2: f32,
    pub one_minus_b2: f32,
    pub eps: f32,
}

/// What an upsampling pass writes besides plain logits (fused into one pass on CUDA).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Epilogue {
    /// Logits in the input dtype (what `MaskUpsample` writes).
    Logits,
    /// Logits in f32 (f64 input stays f64): feeds an f32 loss without a cast pass.
    LogitsWide,
    /// sigmoid(logits) in the input dtype.
    Sigmoid,
    /// `sigmoid(logits) >= threshold` as u8 0/1, the metrics' foreground rule.
    Threshold(f32),
}

impl Epilogue {
    pub fn out_dtype(&self, input: DType) -> DType {
        match self {
            Epilogue::Logits | Epilogue::Sigmoid => input,
            Epilogue::LogitsWide if input == DType::F64 => DType::F64,
            Epilogue::LogitsWide => DType::F32,
            Epilogue::Threshold(_) => DType::U8,
        }
    }
}

/// Whether the fused row and element-wise kernels (`kernels/fused.cu`) take this storage dtype.
pub fn fused_kernel_dtype(dt: DType) -> bool {
    matches!(dt, DType::F32 | DType::BF16 | DType::F16)
}

/// Causal masking computed from indices: query `i` (a row's index along the second-to-last
/// dimension) sees keys `j <= i + past`; hidden keys get `fill` as their additive mask value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CausalFill {
    pub past: usize,
    pub fill: f32,
}

/// How row `r` of a row-wise kernel's input (its leading dimensions flattened, row-major) finds
/// the matching row of a mask that broadcasts to it: `kernels/fused.cu`'s `RowMap`, field for
/// field (`repr(C)`, nine i64).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowMap {
    /// The input's leading dimensions (all but the last), front-padded with 1.
    pub dims: [i64; 4],
    /// The mask's element stride along each of them, 0 where it broadcasts.
    pub strides: [i64; 4],
    /// The mask's stride along the last dimension: 1, or 0 where it broadcasts.
    pub last: i64,
}

impl RowMap {
    /// Supports inputs of rank 1 to 5; `mask` has `input`'s rank (size 1 where it broadcasts)
    /// and is contiguous. None when the ranks differ, a size neither matches nor is 1, or the
    /// rank is out of range.
    pub fn new(input: &[usize], mask: &[usize]) -> Option<Self> {
        let r = input.len();
        if r == 0 || r > 5 || mask.len() != r || input.iter().zip(mask).any(|(&i, &m)| m != i && m != 1) {
            return None;
        }
        let mut stride = 1i64;
        let mut mstrides = vec![0i64; r];
        for d in (0..r).rev() {
            mstrides[d] = if mask[d] == 1 { 0 } else { stride };
            stride *= mask[d] as i64;
        }
        let (mut dims, mut strides) = ([1i64; 4], [0i64; 4]);
        for d in 0..r - 1 {
            dims[4 - (r - 1) + d] = input[d] as i64;
            strides[4 - (r - 1) + d] = mstrides[d];
        }
        Some(Self { dims, strides, last: mstrides[r - 1] })
    }

    /// Offset of row `r`'s first mask element, as the kernel computes it.
    pub fn mask_row(&self, mut r: i64) -> i64 {
        let mut off = 0;
        for d in (0..4).rev() {
            off += (r % self.dims[d]) * self.strides[d];
            r /= self.dims[d];
        }
        off
    }
}

/// The geometry of a depthwise convolution: `kernels/depthwise.cu`'s `DwGeom`, field for field
/// (`repr(C)`, nine i64). Input (b, c, h, w), output (b, c, ho, wo), a (c, 1, k, k) kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DwGeom {
    pub b: i64,
    pub c: i64,
    pub h: i64,
    pub w: i64,
    pub ho: i64,
    pub wo: i64,
    pub k: i64,
    pub stride: i64,
    pub pad: i64,
}

/// Whether `t` goes to the kernels of `kernels/fused.cu`: built (feature `cuda`), a CUDA
/// tensor of a kernel dtype, not empty.
pub fn use_fused_kernel(t: &candle_core::Tensor) -> bool {
    cfg!(feature = "cuda") && t.device().is_cuda() && fused_kernel_dtype(t.dtype()) && t.elem_count() > 0
}

/// The error of a kernel-only op's CPU path, which the wrappers never take.
pub fn cuda_only<T>(what: &str) -> candle_core::Result<T> {
    Err(candle_core::Error::Msg(format!("{what}: the fused kernel runs on CUDA only (the CPU path is the composite)")))
}

#[cfg(test)]
mod tests {
    use super::RowMap;

    /// Every element's mask offset, from the row map, equals numpy-style broadcast indexing.
    #[test]
    fn row_map_indexes_the_broadcast_mask() {
        for (input, mask) in [
            (vec![2usize, 3, 4, 5, 6], vec![2usize, 1, 1, 5, 6]),
            (vec![2, 3, 4, 5], vec![2, 1, 1, 5]),
            (vec![2, 3, 4, 5], vec![1, 3, 4, 1]),
            (vec![7, 5], vec![1, 5]),
            (vec![9], vec![9]),
        ] {
            let map = RowMap::new(&input, &mask).expect("supported shape");
            let n: usize = input.iter().product();
            let last = input[input.len() - 1];
            for flat in 0..n {
                let (row, col) = (flat / last, flat % last);
                // Multi-index of `flat`, then the mask's contiguous offset with broadcast dims at 0.
                let (mut rem, mut idx) = (flat, vec![0; input.len()]);
                for d in (0..input.len()).rev() {
                    idx[d] = rem % input[d];
                    rem /= input[d];
                }
                let want = idx.iter().zip(&mask).fold(0, |acc, (&i, &m)| acc * m + if m == 1 { 0 } else { i });
                let got = map.mask_row(row as i64) + col as i64 * map.last;
                assert_eq!(got, want as i64, "{input:?} / {mask:?} at {flat}");
            }
        }
        assert!(RowMap::new(&[2, 3], &[3, 3]).is_none());
        assert!(RowMap::new(&[1, 2, 3, 4, 5, 6], &[1, 2, 3, 4, 5, 6]).is_none());
    }
}
