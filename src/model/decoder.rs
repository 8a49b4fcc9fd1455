//! PRS-Med mask decoder ("PromptedMaskDecoder") and the modality classifier.
//!
//! Layer list and state-dict names follow the authors' checkpoints (reference section 2):
//! prompt projection -> cross-attention (image tokens attend to the prompt states) -> norm1 ->
//! one post-norm transformer encoder layer -> FFN -> + TinySAM features -> three conv blocks ->
//! 1x1 conv -> bilinear x16 upsampling (align_corners = true). Everything runs in f32.
//!
//! Unlike the authors, the cross-attention takes a key mask: the decoder attends to prompt
//! positions only (reference section 4), never to answer or padding tokens. The authors'
//! forward also clamps inputs to +-1e4 and the final logits to +-10 and swaps NaN activations
//! for fallbacks; none of that is part of the reference layer list, so none of it is here.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::nn::attention::{chunked_attention, SCORE_CHUNK_ELEMS};
use crate::nn::linear::{frozen_matmul, Linear};
use crate::nn::norm::LayerNorm;
use crate::nn::ops;
use crate::nn::param::{Init, Param, ParamBuilder};
use crate::nn::upsample::upsample_bilinear_ac;

/// Sizes of the decoder; `Default` is the released model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DecoderConfig {
    /// Width of the LLM hidden states fed as prompt.
    pub llm_hidden: usize,
    /// Hidden width of the prompt projection MLP.
    pub prompt_hidden: usize,
    /// Token width = TinySAM feature channels.
    pub dim: usize,
    pub cross_heads: usize,
    pub self_heads: usize,
    /// Feed-forward width of the encoder layer.
    pub ffn_dim: usize,
    /// Dropout of the encoder layer (attention weights, feed-forward, both residuals).
    pub dropout: f32,
    /// Image tokens per side (TinySAM map size).
    pub grid: usize,
    /// Bilinear upsampling factor of the logits.
    pub upsample: usize,
    /// Modality classes of the classifier.
    pub num_classes: usize,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self {
            llm_hidden: 4096,
            prompt_hidden: 512,
            dim: 256,
            cross_heads: 8,
            self_heads: 16,
            ffn_dim: 512,
            dropout: 0.1,
            grid: 64,
            upsample: 16,
            num_classes: 6,
        }
    }
}

impl DecoderConfig {
    /// (in, out) channels of the three mask-generation blocks.
    pub fn block_channels(&self) -> [(usize, usize); 3] {
        let d = self.dim;
        [(d, d), (d, d / 2), (d / 2, d / 4)]
    }

    fn validate(&self) -> Result<()> {
        if !self.dim.is_multiple_of(self.cross_heads) || !self.dim.is_multiple_of(self.self_heads) {
            bail!("decoder dim {} must be divisible by the head counts", self.dim);
        }
        if !self.dim.is_multiple_of(4) || self.dim < 4 {
            bail!("decoder dim {} must be a multiple of 4 (blocks go to dim/4)", self.dim);
        }
        Ok(())
    }
}

/// Checkpoint tensors the authors' state dict carries that the forward never uses
/// (`ffn.norm1`), with their shapes; a checkpoint writer adds them back for their loader.
pub fn unused_checkpoint_tensors(cfg: &DecoderConfig) -> Vec<(String, Vec<usize>)> {
    vec![("ffn.norm1.weight".into(), vec![cfg.dim]), ("ffn.norm1.bias".into(), vec![cfg.dim])]
}

const SITE: &str = "mask_decoder";

/// `x @ w^T + b` for a weight slice that may be trained (ordinary matmul, gradient for w)
/// or frozen (no dead weight gradient).
fn affine(x: &Tensor, w: &Tensor, b: &Tensor, trained: bool) -> Result<Tensor> {
    let y = if trained { x.broadcast_matmul(&w.t()?)? } else { frozen_matmul(x, &w.contiguous()?)? };
    Ok(y.broadcast_add(b)?)
}

/// InstanceNorm2d(affine=True): per-sample, per-channel statistics in train and eval.
#[derive(Clone, Debug)]
struct InstanceNorm {
    weight: Param,
    bias: Param,
}

impl InstanceNorm {
    fn new(pb: &ParamBuilder, c: usize) -> Result<Self> {
        Ok(Self { weight: pb.get(c, "weight", Init::Ones)?, bias: pb.get(c, "bias", Init::Zeros)? })
    }

    /// Statistics and the affine map in f32, the output in the input's dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let dt = x.dtype();
        let x = x.reshape((b, c, h * w))?.to_dtype(DType::F32)?;
        let xc = x.broadcast_sub(&x.mean_keepdim(2)?)?;
        let var = xc.sqr()?.mean_keepdim(2)?;
        let y = xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        let y = y
            .broadcast_mul(&self.weight.cast(DType::F32)?.reshape((1, c, 1))?)?
            .broadcast_add(&self.bias.cast(DType::F32)?.reshape((1, c, 1))?)?;
        Ok(y.reshape((b, c, h, w))?.to_dtype(dt)?)
    }
}

#[derive(Clone, Debug)]
struct Conv2d {
    weight: Param,
    bias: Param,
    padding: usize,
}

impl Conv2d {
    fn new(pb: &ParamBuilder, cin: usize, cout: usize, k: usize, padding: usize) -> Result<Self> {
        let init = Init::torch_default(cin * k * k);
        Ok(Self { weight: pb.get((cout, cin, k, k), "weight", init)?, bias: pb.get(cout, "bias", init)?, padding })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.cast(x.dtype())?;
        let y = crate::nn::conv::conv2d(x, &w, 1, self.padding)?;
        let c = w.dim(0)?;
        Ok(y.broadcast_add(&self.bias.cast(x.dtype())?.reshape((1, c, 1, 1))?)?)
    }
}

/// nn.MultiheadAttention (packed in_proj, batch first); dropout on the attention weights.
#[derive(Clone, Debug)]
struct MultiheadAttention {
    in_proj_weight: Param,
    in_proj_bias: Param,
    out_proj: Linear,
    heads: usize,
    dim: usize,
    dropout: f32,
    site: String,
}

impl MultiheadAttention {
    fn new(pb: &ParamBuilder, dim: usize, heads: usize, dropout: f32) -> Result<Self> {
        let bound = (6.0 / (dim + 3 * dim) as f64).sqrt(); // xavier_uniform, as PyTorch
        Ok(Self {
            in_proj_weight: pb.get((3 * dim, dim), "in_proj_weight", Init::Uniform(bound))?,
            in_proj_bias: pb.get(3 * dim, "in_proj_bias", Init::Zeros)?,
            out_proj: Linear::new(&pb.pp("out_proj"), dim, dim, true)?,
            heads,
            dim,
            dropout,
            site: format!("{SITE}.{}", pb.key("attn_dropout")),
        })
    }

    /// Rows `[part*dim, (part+n)*dim)` of the packed projection applied to `x`.
    fn project(&self, x: &Tensor, part: usize, n: usize) -> Result<Tensor> {
        let w = self.in_proj_weight.cast(x.dtype())?.narrow(0, part * self.dim, n * self.dim)?;
        let b = self.in_proj_bias.cast(x.dtype())?.narrow(0, part * self.dim, n * self.dim)?;
        affine(x, &w, &b, self.in_proj_weight.is_trained())
    }

    /// (B, L, C) -> (B, H, L, C/H), contiguous.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        Ok(x.reshape((b, l, self.heads, self.dim / self.heads))?.transpose(1, 2)?.contiguous()?)
    }

    /// `query` (B, N, C) attends to `kv` (B, T, C) (`None`: self-attention). `key_bias` is an
    /// additive (B, 1, 1, T) mask, 0 = attend. The attention keeps only its output: each chunk
    /// of query rows' scores exist only while that chunk runs, forward and backward
    /// (`nn::attention`), so neither the scores nor per-chunk copies of K and V are kept.
    fn forward(&self, query: &Tensor, kv: Option<&Tensor>, key_bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, c) = query.dims3()?;
        let (q, k, v) = match kv {
            None => {
                let qkv = self.project(query, 0, 3)?;
                (qkv.narrow(2, 0, c)?, qkv.narrow(2, c, c)?, qkv.narrow(2, 2 * c, c)?)
            }
            Some(kv) => {
                let q = self.project(query, 0, 1)?;
                let kvp = self.project(kv, 1, 2)?;
                (q, kvp.narrow(2, 0, c)?, kvp.narrow(2, c, c)?)
            }
        };
        let scale = 1.0 / ((c / self.heads) as f64).sqrt();
        let q = (self.split_heads(&q)? * scale)?;
        let k = self.split_heads(&k)?;
        let v = self.split_heads(&v)?;
        let o = chunked_attention(&q, &k, &v, key_bias, self.dropout, &self.site, SCORE_CHUNK_ELEMS)?;
        let o = o.transpose(1, 2)?.reshape((b, n, c))?;
        self.out_proj.forward(&o)
    }
}

/// nn.TransformerEncoderLayer, post-norm, ReLU, batch first.
#[derive(Clone, Debug)]
struct EncoderLayer {
    self_attn: MultiheadAttention,
    linear1: Linear,
    linear2: Linear,
    norm1: LayerNorm,
    norm2: LayerNorm,
    dropout: f32,
    site: String,
}

impl EncoderLayer {
    fn new(pb: &ParamBuilder, cfg: &DecoderConfig) -> Result<Self> {
        Ok(Self {
            self_attn: MultiheadAttention::new(&pb.pp("self_attn"), cfg.dim, cfg.self_heads, cfg.dropout)?,
            linear1: Linear::new(&pb.pp("linear1"), cfg.dim, cfg.ffn_dim, true)?,
            linear2: Linear::new(&pb.pp("linear2"), cfg.ffn_dim, cfg.dim, true)?,
            norm1: LayerNorm::new(&pb.pp("norm1"), cfg.dim, 1e-5)?,
            norm2: LayerNorm::new(&pb.pp("norm2"), cfg.dim, 1e-5)?,
            dropout: cfg.dropout,
            site: format!("{SITE}.{}", pb.key("")),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.dropout;
        let sa = self.self_attn.forward(x, None, None)?;
        let x = self.norm1.forward(&(x + ops::dropout(&sa, p, &format!("{}dropout1", self.site))?)?)?;
        let h = self.linear1.forward(&x)?.relu()?;
        let h = ops::dropout(&h, p, &format!("{}dropout", self.site))?;
        let ff = self.linear2.forward(&h)?;
        self.norm2.forward(&(x + ops::dropout(&ff, p, &format!("{}dropout2", self.site))?)?)
    }
}

/// y = LN(ReLU(fc2(ReLU(fc1(x)) + x))). The checkpoints' `ffn.norm1` is never used.
#[derive(Clone, Debug)]
struct Ffn {
    fc1: Linear,
    fc2: Linear,
    norm: LayerNorm,
}

impl Ffn {
    fn new(pb: &ParamBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(&pb.pp("fc1"), dim, dim, true)?,
            fc2: Linear::new(&pb.pp("fc2"), dim, dim, true)?,
            norm: LayerNorm::new(&pb.pp("norm"), dim, 1e-5)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = (self.fc1.forward(x)?.relu()? + x)?;
        self.norm.forward(&self.fc2.forward(&y)?.relu()?)
    }
}

/// o = ReLU(IN(conv3x3(x))) + x; o = IN(conv1x1 pad 1 (o)) (grows by 2); o = conv3x3 pad 0 (o).
#[derive(Clone, Debug)]
struct MaskBlock {
    conv1: Conv2d,
    bn1: InstanceNorm,
    conv2: Conv2d,
    bn2: InstanceNorm,
    conv3: Conv2d,
}

impl MaskBlock {
    fn new(pb: &ParamBuilder, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            conv1: Conv2d::new(&pb.pp("conv1"), cin, cin, 3, 1)?,
            bn1: InstanceNorm::new(&pb.pp("bn1"), cin)?,
            conv2: Conv2d::new(&pb.pp("conv2"), cin, cout, 1, 1)?,
            bn2: InstanceNorm::new(&pb.pp("bn2"), cout)?,
            conv3: Conv2d::new(&pb.pp("conv3"), cout, cout, 3, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let o = (self.bn1.forward(&self.conv1.forward(x)?)?.relu()? + x)?;
        let o = self.bn2.forward(&self.conv2.forward(&o)?)?;
        self.conv3.forward(&o)
    }
}

/// Builds the additive (B, 1, 1, T) key mask from a 0/1 (B, T) mask, on the mask's device. A
/// sample without a single position to attend to is an error: softmax over nothing has no
/// meaning, and every real prompt holds at least BOS and the image tokens. The check reads the
/// mask, which on a GPU would stall the stream in the middle of the step, so it runs where that
/// costs nothing (the CPU); on a GPU, `PrsMed` checks the rows on the host as it builds them.
fn key_bias(key_mask: &Tensor, b: usize, t: usize, dtype: DType) -> Result<Tensor> {
    if key_mask.dims() != [b, t] {
        bail!("decoder: key_mask has shape {:?}, expected ({b}, {t})", key_mask.dims());
    }
    let mask = key_mask.to_dtype(DType::F32)?;
    if mask.device().is_cpu() {
        for (i, row) in mask.to_vec2::<f32>()?.iter().enumerate() {
            if !row.iter().any(|&m| m > 0.5) {
                bail!("decoder: sample {i} has no prompt position to attend to (its key_mask row is all zero)");
            }
        }
    }
    // 1 -> 0 (attend), 0 -> the dtype's mask minimum; exact for 0/1 masks.
    let neg = crate::nn::softmax::mask_min(dtype);
    Ok(mask.ge(0.5)?.to_dtype(DType::F32)?.affine(-neg, neg)?.reshape((b, 1, 1, t))?.to_dtype(dtype)?)
}

/// The PRS-Med mask decoder. Prefixes mirror the authors' `mask_decoder.pth` keys.
#[derive(Clone, Debug)]
pub struct PromptedMaskDecoder {
    prompt_projection: [Linear; 2],
    prompt_projection_norms: [LayerNorm; 2],
    prompt_norm: LayerNorm,
    image_norm: LayerNorm,
    attn: MultiheadAttention,
    norm1: LayerNorm,
    encoder_layer: EncoderLayer,
    ffn: Ffn,
    mask_generation: Vec<MaskBlock>,
    out_dec: Conv2d,
    cfg: DecoderConfig,
}

impl PromptedMaskDecoder {
    pub fn new(pb: &ParamBuilder, cfg: &DecoderConfig) -> Result<Self> {
        cfg.validate()?;
        let pp = pb.pp("prompt_projection");
        let blocks = cfg
            .block_channels()
            .iter()
            .enumerate()
            .map(|(i, &(cin, cout))| MaskBlock::new(&pb.pp("mask_generation").pp(i), cin, cout))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            prompt_projection: [
                Linear::new(&pp.pp(0), cfg.llm_hidden, cfg.prompt_hidden, true)?,
                Linear::new(&pp.pp(3), cfg.prompt_hidden, cfg.dim, true)?,
            ],
            prompt_projection_norms: [
                LayerNorm::new(&pp.pp(1), cfg.prompt_hidden, 1e-5)?,
                LayerNorm::new(&pp.pp(4), cfg.dim, 1e-5)?,
            ],
            prompt_norm: LayerNorm::new(&pb.pp("prompt_norm"), cfg.dim, 1e-5)?,
            image_norm: LayerNorm::new(&pb.pp("image_norm"), cfg.dim, 1e-5)?,
            attn: MultiheadAttention::new(&pb.pp("attn"), cfg.dim, cfg.cross_heads, 0.0)?,
            norm1: LayerNorm::new(&pb.pp("norm1"), cfg.dim, 1e-5)?,
            encoder_layer: EncoderLayer::new(&pb.pp("encoder_layer"), cfg)?,
            ffn: Ffn::new(&pb.pp("ffn"), cfg.dim)?,
            mask_generation: blocks,
            out_dec: Conv2d::new(&pb.pp("out_dec"), cfg.dim / 4, 1, 1, 0)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// Logits before upsampling: (B, 1, g, g).
    /// `image_feats` (B, dim, g, g), `prompt_states` (B, T, llm_hidden), `key_mask` (B, T) with
    /// 1 = attend, 0 = ignore (answer and padding positions). Runs in `image_feats`' dtype
    /// (norm statistics and softmax in f32); the logits are f32.
    pub fn forward_low_res(&self, image_feats: &Tensor, prompt_states: &Tensor, key_mask: &Tensor) -> Result<Tensor> {
        let dt = match image_feats.dtype() {
            DType::F16 | DType::BF16 | DType::F32 => image_feats.dtype(),
            _ => DType::F32,
        };
        let img = image_feats.to_dtype(dt)?;
        let prompt = prompt_states.to_dtype(dt)?;
        let (b, c, h, w) = img.dims4().context("decoder: image_feats must be (B, C, H, W)")?;
        let (bp, t, hid) = prompt.dims3().context("decoder: prompt_states must be (B, T, hidden)")?;
        if c != self.cfg.dim || hid != self.cfg.llm_hidden || bp != b {
            bail!(
                "decoder: image_feats {:?} / prompt_states {:?} do not match dim {} and llm_hidden {}",
                img.dims(),
                prompt.dims(),
                self.cfg.dim,
                self.cfg.llm_hidden
            );
        }
        let bias = key_bias(key_mask, b, t, dt)?;

        // 1. prompt projection and its norm
        let mut p = prompt;
        for (lin, norm) in self.prompt_projection.iter().zip(&self.prompt_projection_norms) {
            p = norm.forward(&lin.forward(&p)?)?.relu()?;
        }
        let p = self.prompt_norm.forward(&p)?;
        // 2. image tokens (B, HW, C)
        let tokens = self.image_norm.forward(&img.flatten_from(2)?.transpose(1, 2)?.contiguous()?)?;
        // 3-4. cross-attention over the prompt positions only, residual, norm
        let a = self.attn.forward(&tokens, Some(&p), Some(&bias))?;
        let x = self.norm1.forward(&(a + &tokens)?)?;
        // 5-6. encoder layer, FFN
        let x = self.encoder_layer.forward(&x)?;
        let x = self.ffn.forward(&x)?;
        // 7. back to a map, residual with the TinySAM features
        let mut m = (x.transpose(1, 2)?.reshape((b, c, h, w))? + &img)?;
        // 8-9. mask generation, 1x1 conv to logits
        for block in &self.mask_generation {
            m = block.forward(&m)?;
        }
        Ok(self.out_dec.forward(&m)?.to_dtype(DType::F32)?)
    }

    /// Full-resolution logits (B, 1, g*f, g*f): `forward_low_res` then bilinear xf upsampling
    /// (align_corners = true).
    pub fn forward(&self, image_feats: &Tensor, prompt_states: &Tensor, key_mask: &Tensor) -> Result<Tensor> {
        let low = self.forward_low_res(image_feats, prompt_states, key_mask)?;
        upsample_bilinear_ac(&low, self.cfg.upsample)
    }
}

/// Modality classifier on the TinySAM features: global average pool -> Linear. Keys `2.*`
/// (the Linear is the third entry of the authors' Sequential).
#[derive(Clone, Debug)]
pub struct ModalityClassifier {
    fc: Linear,
}

impl ModalityClassifier {
    pub fn new(pb: &ParamBuilder, dim: usize, num_classes: usize) -> Result<Self> {
        Ok(Self { fc: Linear::new(&pb.pp(2), dim, num_classes, true)? })
    }

    /// `image_feats` (B, C, H, W) -> (B, num_classes) logits, f32.
    pub fn forward(&self, image_feats: &Tensor) -> Result<Tensor> {
        let pooled = image_feats.to_dtype(DType::F32)?.mean(D::Minus1)?.mean(D::Minus1)?;
        self.fc.forward(&pooled)
    }
}
