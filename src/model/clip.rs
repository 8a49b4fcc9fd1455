//! CLIP vision tower as LLaVA uses it: the patch features of one intermediate encoder layer
//! (`mm_vision_select_layer`, -2 = output of layer 23 of 24), CLS token dropped, no post-layernorm.
//!
//! Written here rather than taken from candle-transformers because that model silently creates a
//! random `class_embedding` when the key is missing and its `-2` selection picks the wrong layer.
//! Only the layers up to the selected one are built: later layers are never read from the
//! checkpoint (they would only cost memory).

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::nn::norm::LayerNorm;
use crate::nn::ops;
use crate::nn::param::{Init, Param, ParamBuilder};
use crate::nn::{frozen_matmul, scaled_masked_softmax, Linear};

/// HF `CLIPVisionConfig` fields we use (other fields of a config.json are ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
}

impl Default for ClipVisionConfig {
    /// openai/clip-vit-large-patch14-336 (LLaVA-Med v1.5's tower).
    fn default() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            image_size: 336,
            patch_size: 14,
            layer_norm_eps: 1e-5,
            hidden_act: "quick_gelu".into(),
        }
    }
}

impl ClipVisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Patch tokens per image (576 for ViT-L/14-336).
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            self.patch_size > 0 && self.image_size.is_multiple_of(self.patch_size),
            "clip: image_size {} is not a multiple of patch_size {}",
            self.image_size,
            self.patch_size
        );
        ensure!(
            self.num_attention_heads > 0 && self.hidden_size.is_multiple_of(self.num_attention_heads),
            "clip: hidden_size {} is not divisible by num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        Activation::parse(&self.hidden_act)?;
        Ok(())
    }

    /// Number of encoder layers to run for an HF `hidden_states[select_layer]` index
    /// (`hidden_states[0]` is the embedding output after `pre_layrnorm`).
    pub fn layers_for_select(&self, select_layer: i64) -> Result<usize> {
        let n = self.num_hidden_layers as i64;
        let idx = if select_layer < 0 { n + 1 + select_layer } else { select_layer };
        ensure!(
            (0..=n).contains(&idx),
            "clip: select_layer {select_layer} is out of range for {n} layers (valid: {} ..= {n})",
            -(n + 1)
        );
        Ok(idx as usize)
    }
}

#[derive(Clone, Copy, Debug)]
enum Activation {
    QuickGelu,
    GeluErf,
}

impl Activation {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::GeluErf,
            other => bail!("clip: unsupported hidden_act `{other}` (supported: quick_gelu, gelu)"),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => ops::quick_gelu(x),
            Activation::GeluErf => ops::gelu_erf(x),
        }
    }
}

/// `embeddings.*`: patchify (a stride-p conv without bias) + CLS + learned absolute positions.
#[derive(Clone, Debug)]
struct Embeddings {
    class_embedding: Param,
    patch_embedding: Param,
    position_embedding: Param,
    patch_size: usize,
    image_size: usize,
}

impl Embeddings {
    fn new(pb: &ParamBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let (c, p) = (cfg.hidden_size, cfg.patch_size);
        Ok(Self {
            class_embedding: pb.get(c, "class_embedding", Init::Normal(0.02))?,
            patch_embedding: pb.pp("patch_embedding").get((c, 3, p, p), "weight", Init::Normal(0.02))?,
            position_embedding: pb.pp("position_embedding").get(
                (cfg.num_patches() + 1, c),
                "weight",
                Init::Normal(0.02),
            )?,
            patch_size: p,
            image_size: cfg.image_size,
        })
    }

    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let dt = pixels.dtype();
        let (b, _, h, w) = pixels.dims4()?;
        ensure!(
            h == self.image_size && w == self.image_size,
            "clip: expected {s}x{s} pixels, got {h}x{w}",
            s = self.image_size
        );
        // Non-overlapping patches: the stride-p conv is one GEMM over unfolded patches (candle's
        // CPU conv2d has no bf16 kernel); patch vectors are ordered (channel, y, x) as the weight.
        let (g, p) = (h / self.patch_size, self.patch_size);
        let cols =
            pixels.reshape((b, 3, g, p, g, p))?.permute(vec![0, 2, 4, 1, 3, 5])?.reshape((b, g * g, 3 * p * p))?;
        let w = self.patch_embedding.cast(dt)?;
        let w = w.reshape((w.dim(0)?, 3 * p * p))?;
        let patches = match &self.patch_embedding {
            Param::Frozen(_) => frozen_matmul(&cols, &w)?,
            Param::Trained(_) => cols.broadcast_matmul(&w.t()?)?,
        }; // (B,N,C)
        let c = patches.dim(2)?;
        let cls = self.class_embedding.cast(dt)?.reshape((1, 1, c))?.broadcast_as((b, 1, c))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?;
        Ok(x.broadcast_add(&self.position_embedding.cast(dt)?.unsqueeze(0)?)?)
    }
}

/// `self_attn.*`: plain bidirectional multi-head attention, no mask.
#[derive(Clone, Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(pb: &ParamBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let c = cfg.hidden_size;
        Ok(Self {
            q_proj: Linear::new(&pb.pp("q_proj"), c, c, true)?,
            k_proj: Linear::new(&pb.pp("k_proj"), c, c, true)?,
            v_proj: Linear::new(&pb.pp("v_proj"), c, c, true)?,
            out_proj: Linear::new(&pb.pp("out_proj"), c, c, true)?,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n, self.num_heads, self.head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        // HF scales q before the product; same numbers in low precision.
        let q = heads((self.q_proj.forward(x)? * (self.head_dim as f64).powf(-0.5))?)?;
        let k = heads(self.k_proj.forward(x)?)?;
        let v = heads(self.v_proj.forward(x)?)?;
        let scores = q.matmul(&k.t()?.contiguous()?)?; // (B,H,N,N)
        let probs = scaled_masked_softmax(&scores, 1.0, None)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.out_proj.forward(&out)
    }
}

/// `mlp.*`: fc1 - activation - fc2.
#[derive(Clone, Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    fn new(pb: &ParamBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(&pb.pp("fc1"), cfg.hidden_size, cfg.intermediate_size, true)?,
            fc2: Linear::new(&pb.pp("fc2"), cfg.intermediate_size, cfg.hidden_size, true)?,
            act: Activation::parse(&cfg.hidden_act)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)?)?)
    }
}

/// `encoder.layers.{i}.*`: pre-LN transformer block.
#[derive(Clone, Debug)]
struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: LayerNorm,
    mlp: Mlp,
    layer_norm2: LayerNorm,
}

impl EncoderLayer {
    fn new(pb: &ParamBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let (c, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            self_attn: Attention::new(&pb.pp("self_attn"), cfg)?,
            layer_norm1: LayerNorm::new(&pb.pp("layer_norm1"), c, eps)?,
            mlp: Mlp::new(&pb.pp("mlp"), cfg)?,
            layer_norm2: LayerNorm::new(&pb.pp("layer_norm2"), c, eps)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?)?)?;
        Ok((&x + self.mlp.forward(&self.layer_norm2.forward(&x)?)?)?)
    }
}

/// The vision tower, truncated after the selected layer.
#[derive(Clone, Debug)]
pub struct ClipVisionTower {
    embeddings: Embeddings,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    cfg: ClipVisionConfig,
    dtype: DType,
}

impl ClipVisionTower {
    /// `pb` is rooted at the checkpoint's `vision_model` prefix (in LLaVA checkpoints
    /// `model.vision_tower.vision_tower.vision_model`). `select_layer` indexes HF's
    /// `hidden_states` like `mm_vision_select_layer` (-2 for LLaVA).
    pub fn new(pb: &ParamBuilder, cfg: &ClipVisionConfig, select_layer: i64) -> Result<Self> {
        cfg.validate()?;
        let n_layers = cfg.layers_for_select(select_layer)?;
        let embeddings = Embeddings::new(&pb.pp("embeddings"), cfg).context("clip embeddings")?;
        let pre_layrnorm = LayerNorm::new(&pb.pp("pre_layrnorm"), cfg.hidden_size, cfg.layer_norm_eps)?;
        let lpb = pb.pp("encoder").pp("layers");
        let layers = (0..n_layers)
            .map(|i| EncoderLayer::new(&lpb.pp(i), cfg).with_context(|| format!("clip encoder layer {i}")))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { embeddings, pre_layrnorm, layers, cfg: cfg.clone(), dtype: pb.dtype() })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    /// Number of encoder layers that run (and were loaded).
    pub fn num_layers_run(&self) -> usize {
        self.layers.len()
    }

    /// pixels (B,3,S,S), any float dtype -> patch features (B, S/p * S/p, hidden) in the
    /// builder's dtype.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = pixels.to_dtype(self.dtype)?;
        let mut x = self.pre_layrnorm.forward(&self.embeddings.forward(&x)?)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        let n = x.dim(1)?;
        Ok(x.narrow(1, 1, n - 1)?) // drop CLS ("patch" features)
    }
}
