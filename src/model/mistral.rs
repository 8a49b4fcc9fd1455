//! Mistral decoder (the LLM of LLaVA-Med v1.5) with LoRA, written with differentiable ops.
//!
//! Prefixes mirror the checkpoint: `model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v,o}_proj`,
//! `model.layers.{i}.mlp.{gate,up,down}_proj`, `model.layers.{i}.{input,post_attention}_layernorm`,
//! `model.norm`, `lm_head`. LoRA tensors use PEFT's names relative to `base_model.model.`
//! (`model.layers.{i}.self_attn.q_proj.lora_A.weight`), so adapters load in HF PEFT as they are.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::nn::checkpoint::{with_backward3, Checkpointer};
use crate::nn::consts::add_any;
use crate::nn::linear::{frozen_matmul, Linear, LoraConfig};
use crate::nn::ops;
use crate::nn::param::{Init, Param, ParamBuilder};
use crate::nn::rope::{rope_heads, rope_tables};
use crate::nn::softmax::{scaled_masked_softmax_causal, scaled_softmax_backward};

/// The fields of HF's `MistralConfig` (LLaVA-Med's `config.json`) that the decoder needs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MistralConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Must be null: LLaVA-Med v1.5 has no sliding window, and we do not implement one.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    1e6
}
fn default_max_pos() -> usize {
    32768
}

impl MistralConfig {
    /// Mistral-7B as in LLaVA-Med v1.5.
    pub fn mistral_7b() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 1e6,
            max_position_embeddings: 32768,
            sliding_window: None,
            head_dim: None,
            tie_word_embeddings: false,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn validate(&self) -> Result<()> {
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("head_dim {} must be even for rotary embeddings", self.head_dim());
        }
        if let Some(w) = self.sliding_window {
            if w < self.max_position_embeddings {
                bail!("sliding_window {w} is not supported (LLaVA-Med v1.5 has none)");
            }
        }
        Ok(())
    }
}

/// Keys and values of past positions, per layer, for generation. With a capacity, each layer's
/// keys and values live in buffers of that many positions, allocated at the first append and
/// filled in place, so a decoding step writes its one new position instead of copying the whole
/// cache (two kernels per layer, not four, and no traffic growing with the length). Without one,
/// or past it, the cache grows by concatenation. Not `Clone`: the buffers are written in place.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    capacity: usize,
}

/// One layer's keys and values (B, KV, positions, D), of which the first `len` positions are filled.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    fn filled(&self) -> Result<(Tensor, Tensor)> {
        Ok((self.k.narrow(2, 0, self.len)?, self.v.narrow(2, 0, self.len)?))
    }
}

impl KvCache {
    /// A cache that grows by concatenation.
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, 0)
    }

    /// A cache whose layers hold `positions` positions (prompt plus new tokens) before growing.
    pub fn with_capacity(num_layers: usize, positions: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| None).collect(), capacity: positions }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map(|l| l.len).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `k`, `v` (B, KV, T, D) to `layer` and returns all its keys and values so far.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let kv = match self.layers[layer].take() {
            Some(mut e) if e.len + t <= e.k.dim(2)? => {
                e.k.slice_set(&k.contiguous()?, 2, e.len)?;
                e.v.slice_set(&v.contiguous()?, 2, e.len)?;
                e.len += t;
                e
            }
            Some(e) => {
                let (pk, pv) = e.filled()?;
                LayerKv { k: Tensor::cat(&[&pk, k], 2)?, v: Tensor::cat(&[&pv, v], 2)?, len: e.len + t }
            }
            None if self.capacity > t => {
                let (b, h, _, d) = k.dims4()?;
                let buffer = |x: &Tensor| Tensor::zeros((b, h, self.capacity, d), x.dtype(), x.device());
                let (kb, vb) = (buffer(k)?, buffer(v)?);
                kb.slice_set(&k.contiguous()?, 2, 0)?;
                vb.slice_set(&v.contiguous()?, 2, 0)?;
                LayerKv { k: kb, v: vb, len: t }
            }
            None => LayerKv { k: k.clone(), v: v.clone(), len: t },
        };
        let out = kv.filled()?;
        self.layers[layer] = Some(kv);
        Ok(out)
    }
}

/// The projections LoRA can target (PEFT's `target_modules` names for Mistral).
pub const LORA_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

fn lora_for<'a>(
    lora: Option<(&ParamBuilder<'a>, &LoraConfig)>,
    module: &str,
) -> Option<(ParamBuilder<'a>, LoraConfig)> {
    lora.filter(|(_, c)| c.targets(module)).map(|(pb, c)| (pb.pp(module), c.clone()))
}

/// A projection without bias, with LoRA when `module` is a target.
fn projection(
    pb: &ParamBuilder,
    lora: Option<(&ParamBuilder, &LoraConfig)>,
    module: &str,
    in_dim: usize,
    out_dim: usize,
) -> Result<Linear> {
    let lin = Linear::new(&pb.pp(module), in_dim, out_dim, false)?;
    match lora_for(lora, module) {
        Some((lpb, cfg)) => lin.with_lora(&lpb, &cfg),
        None => Ok(lin),
    }
}

#[derive(Clone, Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(pb: &ParamBuilder, lora: Option<(&ParamBuilder, &LoraConfig)>, cfg: &MistralConfig) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: projection(pb, lora, "q_proj", h, nh * hd)?,
            k_proj: projection(pb, lora, "k_proj", h, nkv * hd)?,
            v_proj: projection(pb, lora, "v_proj", h, nkv * hd)?,
            o_proj: projection(pb, lora, "o_proj", nh * hd, h)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        pad: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, self.head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let q = rope_heads(&self.q_proj.forward(x)?, &rope.0, &rope.1, self.num_heads)?;
        let k = rope_heads(&self.k_proj.forward(x)?, &rope.0, &rope.1, self.num_kv_heads)?;
        let v = heads(self.v_proj.forward(x)?, self.num_kv_heads)?;
        let (k, v) = match cache {
            Some((c, layer)) => c.append(layer, &k, &v)?,
            None => (k, v),
        };
        let past = k.dim(2)? - t;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let y = grouped_attention(&q, &k, &v, pad, past, scale)?; // (b, nh, t, hd)
        let y = y.transpose(1, 2)?.reshape((b, t, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&y)
    }
}

/// Causal grouped-query attention without copying K and V per query head. `q` (B, H, T, D)
/// with H = G x KV heads, head h reading kv head h / G (HF's `repeat_kv` order); `k`, `v`
/// (B, KV, P+T, D) with P cached positions; `pad` the additive key-padding mask (B,1,1,P+T).
/// `q` is viewed as (B, KV, G*T, D), so one product per kv head covers all its query heads; the
/// scores are viewed as (B, KV, G, T, P+T), which keeps the query index on the second-to-last
/// axis, so causal masking applies per group. Returns (B, H, T, D).
///
/// In training it is one autograd node that keeps only q, k, v and its output: the backward
/// recomputes the probabilities (one more product of q and k: about 1% of a 7B layer's forward
/// at 640 tokens), so no score-sized tensor stays in the graph, and the backward holds three
/// at most (the probabilities, their gradient, the scores' gradient) rather than candle's
/// chain of them.
pub fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pad: Option<&Tensor>,
    past: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let (_, nkv, tk, _) = k.dims4()?;
    if nkv == 0 || nh % nkv != 0 || tk != past + t {
        bail!("grouped attention: q {:?}, k {:?}, {past} cached positions", q.dims(), k.dims());
    }
    let g = nh / nkv;
    let pad = pad.map(|m| m.reshape((b, 1, 1, 1, tk))).transpose()?;
    // (B, KV, G*T, D) queries -> (B, KV, G*T, P+T) probabilities.
    let probs = move |q: &Tensor, k: &Tensor| -> Result<(Tensor, Tensor)> {
        let q = q.contiguous()?.reshape((b, nkv, g * t, d))?;
        let scores = q.matmul(&k.t()?)?.reshape((b, nkv, g, t, tk))?;
        // Causal masking from positions: on CUDA the softmax kernel computes it from indices.
        let p = scaled_masked_softmax_causal(&scores, scale, pad.as_ref(), past)?;
        Ok((q, p.reshape((b, nkv, g * t, tk))?))
    };
    let forward = {
        let probs = probs.clone();
        move |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> {
            Ok(probs(q, k)?.1.matmul(v)?.reshape((b, nh, t, d))?)
        }
    };
    // The products in candle's order for a matmul's gradients (dA = dC Bᵀ, dB = Aᵀ dC).
    let backward = move |q: &Tensor, k: &Tensor, v: &Tensor, dy: &Tensor, tracked: [bool; 3]| {
        let (qg, p) = probs(q, k)?;
        let dy = dy.contiguous()?.reshape((b, nkv, g * t, d))?;
        let dv = if tracked[2] { Some(p.t()?.matmul(&dy)?) } else { None };
        let dp = dy.matmul(&v.t()?)?;
        let ds = scaled_softmax_backward(&p, &dp, scale, false)?;
        drop((p, dp));
        let dq = if tracked[0] { Some(ds.matmul(k)?.reshape((b, nh, t, d))?) } else { None };
        let dk = if tracked[1] { Some(qg.t()?.matmul(&ds)?.t()?) } else { None };
        Ok([dq, dk, dv])
    };
    with_backward3(q, k, v, forward, backward)
}

#[derive(Clone, Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(pb: &ParamBuilder, lora: Option<(&ParamBuilder, &LoraConfig)>, cfg: &MistralConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: projection(pb, lora, "gate_proj", h, i)?,
            up_proj: projection(pb, lora, "up_proj", h, i)?,
            down_proj: projection(pb, lora, "down_proj", i, h)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = crate::nn::fused::silu_mul(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }
}

/// One pre-norm decoder layer.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: Param,
    post_attention_layernorm: Param,
    eps: f64,
}

impl DecoderLayer {
    fn new(pb: &ParamBuilder, lora: Option<(&ParamBuilder, &LoraConfig)>, cfg: &MistralConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let lora_attn = lora.map(|(p, c)| (p.pp("self_attn"), c));
        let lora_mlp = lora.map(|(p, c)| (p.pp("mlp"), c));
        Ok(Self {
            self_attn: Attention::new(&pb.pp("self_attn"), lora_attn.as_ref().map(|(p, c)| (p, *c)), cfg)?,
            mlp: Mlp::new(&pb.pp("mlp"), lora_mlp.as_ref().map(|(p, c)| (p, *c)), cfg)?,
            input_layernorm: pb.pp("input_layernorm").get(h, "weight", Init::Ones)?,
            post_attention_layernorm: pb.pp("post_attention_layernorm").get(h, "weight", Init::Ones)?,
            eps: cfg.rms_norm_eps,
        })
    }

    /// The seven projections (q, k, v, o, gate, up, down).
    pub fn projections(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
    }

    fn projections_mut(&mut self) -> [&mut Linear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj, &mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]
    }

    /// `x` (B,T,H) -> (B,T,H), causal over the cached and new positions. `pad` is the additive
    /// key-padding mask (B,1,1,T_keys) of [`Mistral::key_padding_mask`].
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        pad: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let dt = x.dtype();
        let h = ops::rms_norm(x, &self.input_layernorm.cast(dt)?, self.eps)?;
        let x = add_any(x, &self.self_attn.forward(&h, rope, pad, cache)?)?;
        let h = ops::rms_norm(&x, &self.post_attention_layernorm.cast(dt)?, self.eps)?;
        add_any(&x, &self.mlp.forward(&h)?)
    }
}

/// See [`Mistral::quant_summary`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuantSummary {
    pub quantized: usize,
    pub dense: usize,
    pub bytes: usize,
}

/// The decoder, from input embeddings to final-norm hidden states (and logits on request).
#[derive(Clone, Debug)]
pub struct Mistral {
    embed_tokens: Param,
    layers: Vec<DecoderLayer>,
    norm: Param,
    lm_head: Param,
    cfg: MistralConfig,
    dtype: DType,
}

impl Mistral {
    /// `pb` is rooted at the checkpoint root (holding `model.*` and `lm_head.*`); `lora` is a
    /// builder rooted at PEFT's `base_model.model` (an adapter file or a fresh source) and the
    /// LoRA hyper-parameters.
    pub fn new(pb: &ParamBuilder, cfg: &MistralConfig, lora: Option<(&ParamBuilder, &LoraConfig)>) -> Result<Self> {
        cfg.validate()?;
        if let Some((_, l)) = lora {
            l.check(&LORA_TARGETS)?;
        }
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let m = pb.pp("model");
        let embed_tokens = m.pp("embed_tokens").get((v, h), "weight", Init::Normal(0.02))?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            pb.pp("lm_head").get((v, h), "weight", Init::Normal(0.02))?
        };
        let lora_m = lora.map(|(p, c)| (p.pp("model").pp("layers"), c));
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = lora_m.as_ref().map(|(p, c)| (p.pp(i), *c));
            layers.push(DecoderLayer::new(&m.pp("layers").pp(i), l.as_ref().map(|(p, c)| (p, *c)), cfg)?);
        }
        let norm = m.pp("norm").get(h, "weight", Init::Ones)?;
        Ok(Self { embed_tokens, layers, norm, lm_head, cfg: cfg.clone(), dtype: pb.dtype() })
    }

    pub fn config(&self) -> &MistralConfig {
        &self.cfg
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// Folds every frozen LoRA adapter into its dense base weight ([`Linear::merge_lora`]) for
    /// inference; returns how many projections were merged.
    pub fn merge_lora(&mut self) -> Result<usize> {
        let mut merged = 0;
        for layer in &mut self.layers {
            for p in layer.projections_mut() {
                merged += usize::from(p.merge_lora()?);
            }
        }
        Ok(merged)
    }

    /// How the layers' projections are stored: the number quantised, the number kept dense (a
    /// quantised base whose in-features are not a multiple of the block), and the bytes of the
    /// quantised ones. Embeddings, lm_head and norms are never quantised.
    pub fn quant_summary(&self) -> QuantSummary {
        let mut s = QuantSummary::default();
        for p in self.layers.iter().flat_map(|l| l.projections()) {
            match p.quantized() {
                Some(q) => {
                    s.quantized += 1;
                    s.bytes += q.storage_bytes();
                }
                None => s.dense += 1,
            }
        }
        s
    }

    /// Token embeddings (B,T) u32 -> (B,T,H) in the compute dtype.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let w = self.embed_tokens.cast(self.dtype)?;
        let (b, t) = ids.dims2()?;
        Ok(w.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.hidden_size))?)
    }

    /// Additive key-padding mask (B,1,1,P+T) from `key_valid` (B,P+T), 1 = real token, in the
    /// compute dtype; None without `key_valid`. Padding keys get a large negative (not -inf,
    /// so a fully masked padding row stays finite; in f16 it rounds to -inf). The layers add
    /// causal masking over the P cached + T new positions (the same value for hidden keys).
    pub fn key_padding_mask(&self, key_valid: Option<&Tensor>, b: usize, tk: usize) -> Result<Option<Tensor>> {
        let Some(kv) = key_valid else { return Ok(None) };
        let kv = kv.to_dtype(DType::F32)?;
        if kv.dims() != [b, tk] {
            bail!("attention mask has shape {:?}, expected ({b}, {tk})", kv.dims());
        }
        let neg = crate::nn::softmax::mask_min(DType::F32);
        let pad = ((kv - 1.0)? * (-neg))?.clamp(neg as f32, 0f32)?; // 0 or neg
        Ok(Some(pad.reshape((b, 1, 1, tk))?.to_dtype(self.dtype)?))
    }

    /// Runs the layers over input embeddings (B,T,H) and returns the final-norm hidden states
    /// (B,T,H). `key_valid` (B,P+T) marks real tokens (None = all real), `position_ids` (B,T).
    /// With a cache, `key_valid` covers the cached positions too.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        key_valid: Option<&Tensor>,
        position_ids: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.forward_embeds_with(embeds, key_valid, position_ids, cache, None)
    }

    /// `forward_embeds` with gradient checkpointing: each decoder layer is one checkpointed
    /// block (recomputed in backward). Incompatible with a KV cache (generation needs none).
    pub fn forward_embeds_with(
        &self,
        embeds: &Tensor,
        key_valid: Option<&Tensor>,
        position_ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        ckpt: Option<&Checkpointer>,
    ) -> Result<Tensor> {
        if ckpt.is_some_and(|c| c.is_enabled()) && cache.is_some() {
            bail!("gradient checkpointing cannot be combined with a KV cache");
        }
        let (b, t, _) = embeds.dims3()?;
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let pad = self.key_padding_mask(key_valid, b, past + t)?;
        let rope = rope_tables(position_ids, self.cfg.head_dim(), self.cfg.rope_theta, self.dtype)?;
        let mut x = embeds.to_dtype(self.dtype)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = match ckpt {
                Some(c) if c.is_enabled() => {
                    let (layer, rope, pad) = (layer.clone(), rope.clone(), pad.clone());
                    c.run(&x, move |x| layer.forward(x, &rope, pad.as_ref(), None))?
                }
                _ => layer.forward(&x, &rope, pad.as_ref(), cache.as_deref_mut().map(|c| (c, i)))?,
            };
        }
        ops::rms_norm(&x, &self.norm.cast(self.dtype)?, self.cfg.rms_norm_eps)
    }

    /// Logits in f32 for hidden states (..., H).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = self.lm_head.cast(hidden.dtype())?;
        Ok(frozen_matmul(hidden, &w)?.to_dtype(DType::F32)?)
    }

    /// Hidden size, for callers building embeddings.
    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// Convenience: logits of the last position of each row for generation, (B, V).
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let t = hidden.dim(1)?;
        self.logits(&hidden.narrow(1, t - 1, 1)?.squeeze(1)?)
    }
}
