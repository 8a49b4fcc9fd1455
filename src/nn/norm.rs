//! LayerNorm with weight and bias (`weight`, `bias` keys), as CLIP, TinySAM and the mask decoder
//! use it: statistics in f32 (`fused::layer_norm_fused`), the output in the input's dtype.

use anyhow::Result;
use candle_core::Tensor;

use super::param::{Init, Param, ParamBuilder};

#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Param,
    bias: Param,
    eps: f64,
}

impl LayerNorm {
    pub fn new(pb: &ParamBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: pb.get(dim, "weight", Init::Ones)?, bias: pb.get(dim, "bias", Init::Zeros)?, eps })
    }

    /// Over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::fused::layer_norm_fused(x, self.weight.tensor(), self.bias.tensor(), self.eps)
    }

    /// Over the channels of (B,C,H,W) (SAM's LayerNorm2d).
    pub fn forward_2d(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward(&x.permute((0, 2, 3, 1))?)?.permute((0, 3, 1, 2))?)
    }
}
