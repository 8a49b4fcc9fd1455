//! LLaVA's multimodal projector (`model.mm_projector.*`): maps CLIP patch features into the
//! LLM's embedding space.

use anyhow::{bail, ensure, Result};
use candle_core::Tensor;

use super::clip::ClipVisionConfig;
use crate::nn::{ops, Linear, ParamBuilder};

/// Prefix of the CLIP tower inside LLaVA-Med checkpoints.
pub const CLIP_PREFIX: &str = "model.vision_tower.vision_tower.vision_model";
/// Prefix of the multimodal projector inside LLaVA-Med checkpoints.
pub const PROJECTOR_PREFIX: &str = "model.mm_projector";

/// The projector types LLaVA's `build_vision_projector` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjectorKind {
    /// `linear`: one Linear; keys `weight`/`bias` directly under the projector prefix.
    Linear,
    /// `mlp{depth}x_gelu`: Linear, then (GELU, Linear) x (depth-1); Sequential keys 0, 2, 4, ...
    MlpGelu { depth: usize },
    /// `identity`: no parameters.
    Identity,
}

impl ProjectorKind {
    pub fn parse(s: &str) -> Result<Self> {
        if s == "linear" {
            return Ok(Self::Linear);
        }
        if s == "identity" {
            return Ok(Self::Identity);
        }
        if let Some(depth) = s.strip_prefix("mlp").and_then(|r| r.strip_suffix("x_gelu")) {
            if let Ok(depth) = depth.parse::<usize>() {
                if depth >= 1 {
                    return Ok(Self::MlpGelu { depth });
                }
            }
        }
        bail!("unsupported mm_projector_type `{s}` (supported: linear, identity, mlp<N>x_gelu e.g. mlp2x_gelu)")
    }
}

/// The projector; exact (erf) GELU between the Linears, as `nn.GELU()`.
#[derive(Clone, Debug)]
pub struct Projector {
    kind: ProjectorKind,
    layers: Vec<Linear>,
}

impl Projector {
    /// `pb` is rooted at `model.mm_projector`; `kind` is `mm_projector_type`.
    pub fn new(pb: &ParamBuilder, mm_hidden: usize, hidden: usize, kind: &str) -> Result<Self> {
        let kind = ProjectorKind::parse(kind)?;
        let layers = match kind {
            ProjectorKind::Linear => vec![Linear::new(pb, mm_hidden, hidden, true)?],
            ProjectorKind::Identity => {
                ensure!(
                    mm_hidden == hidden,
                    "identity projector needs mm_hidden_size == hidden_size ({mm_hidden} != {hidden})"
                );
                vec![]
            }
            ProjectorKind::MlpGelu { depth } => (0..depth)
                .map(|i| Linear::new(&pb.pp(2 * i), if i == 0 { mm_hidden } else { hidden }, hidden, true))
                .collect::<Result<Vec<_>>>()?,
        };
        Ok(Self { kind, layers })
    }

    pub fn kind(&self) -> ProjectorKind {
        self.kind
    }

    /// (..., mm_hidden) -> (..., hidden), in the input's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            if i > 0 {
                x = ops::gelu_erf(&x)?;
            }
            x = l.forward(&x)?;
        }
        Ok(x)
    }
}

/// Number of image positions one image takes in the LLM input ((S/patch)^2 = 576 for
/// ViT-L/14-336 with "patch" features).
pub fn image_token_count(cfg: &ClipVisionConfig) -> usize {
    cfg.num_patches()
}
