//! TinySAM image encoder: TinyViT-5M exactly as MobileSAM builds it (and TinySAM ships it).
//!
//! Stem (two Conv+BatchNorm, stride 4) -> stage 0: MBConv blocks -> stages 1..: windowed
//! attention blocks (LeViT-style attention biases, depthwise "local conv" between attention and
//! MLP) -> PatchMerging between stages (stride 2, except the last one: stride 1, so the output
//! grid is S/16 with the released four stages, S/8 with three) -> neck (conv1x1, LayerNorm2d,
//! conv3x3, LayerNorm2d).
//!
//! Every op is differentiable (exact erf GELU, f32 norms and softmax from `nn::ops`); the
//! encoder is trained or frozen as a whole by the builder's train flag. Module prefixes mirror
//! the checkpoint keys under `image_encoder.`; `attention_bias_idxs`, `num_batches_tracked` and
//! the unused classifier head (`norm_head`, `head`) are not read.
//!
//! BatchNorm follows PyTorch: in training mode (`nn::ops::is_training()`) a trainable encoder
//! normalises with the statistics of the batch it sees and updates its running statistics; in
//! eval mode, and always when frozen, it uses the running statistics. With gradient
//! accumulation the statistics are those of each MICRO-batch (smaller batches give noisier
//! normalisation than the effective batch suggests) and the running statistics take one
//! momentum step per micro-batch forward, not per optimizer step. A recomputation of the
//! forward (gradient checkpointing) must run under [`KeepRunningStats`] so that it normalises
//! identically without stepping the running statistics a second time.

use std::cell::Cell;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};

use crate::nn::attention::{chunked_attention, SCORE_CHUNK_ELEMS};
use crate::nn::checkpoint::Checkpointer;
use crate::nn::conv::{conv2d, conv2d_const_input, pad_zeros};
use crate::nn::depthwise::depthwise_conv2d;
use crate::nn::fused::{batch_norm_train, mean_keepdims};
use crate::nn::norm::LayerNorm;
use crate::nn::param::{Init, Param, ParamBuilder};
use crate::nn::{add_any, mul_any, ops, Linear};

/// One block's forward, as a checkpoint runs it.
type BlockFn = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// Hyper-parameters of the encoder. `tinyvit_5m()` (= `Default`) is the released model.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TinySamConfig {
    /// Input side length S (square images); the output grid is S/16.
    pub img_size: usize,
    pub in_chans: usize,
    /// Width of each stage; stage 0 is convolutional (MBConv), the others attention.
    pub embed_dims: Vec<usize>,
    pub depths: Vec<usize>,
    /// Attention heads per stage (the entry of stage 0 is unused).
    pub num_heads: Vec<usize>,
    /// Attention window side per stage (the entry of stage 0 is unused).
    pub window_sizes: Vec<usize>,
    pub mlp_ratio: f64,
    /// Neck width (256 in the released model).
    pub out_chans: usize,
    #[serde(default = "default_expand")]
    pub mbconv_expand_ratio: f64,
    #[serde(default = "default_local_conv")]
    pub local_conv_size: usize,
}

fn default_expand() -> f64 {
    4.0
}
fn default_local_conv() -> usize {
    3
}

impl TinySamConfig {
    pub fn tinyvit_5m() -> Self {
        Self {
            img_size: 1024,
            in_chans: 3,
            embed_dims: vec![64, 128, 160, 320],
            depths: vec![2, 2, 6, 2],
            num_heads: vec![2, 4, 5, 10],
            window_sizes: vec![7, 7, 14, 7],
            mlp_ratio: 4.0,
            out_chans: 256,
            mbconv_expand_ratio: 4.0,
            local_conv_size: 3,
        }
    }

    pub fn num_stages(&self) -> usize {
        self.depths.len()
    }

    /// Total downsampling: 4 (stem) x 2 per merge, the last merge keeping the resolution.
    pub fn total_stride(&self) -> usize {
        4 << self.num_stages().saturating_sub(2)
    }

    /// Output grid side (S/16 for four stages).
    pub fn out_size(&self) -> usize {
        self.img_size / self.total_stride()
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.num_stages();
        ensure!(n >= 2, "tinysam: need at least 2 stages, got {n}");
        ensure!(
            self.embed_dims.len() == n && self.num_heads.len() == n && self.window_sizes.len() == n,
            "tinysam: embed_dims, depths, num_heads and window_sizes must have the same length"
        );
        ensure!(self.embed_dims[0].is_multiple_of(2), "tinysam: embed_dims[0] must be even (stem width is half of it)");
        for l in 1..n {
            ensure!(
                self.num_heads[l] > 0 && self.embed_dims[l].is_multiple_of(self.num_heads[l]),
                "tinysam: stage {l} width {} is not divisible by {} heads",
                self.embed_dims[l],
                self.num_heads[l]
            );
            ensure!(self.window_sizes[l] > 0, "tinysam: stage {l} window size is 0");
        }
        ensure!(
            self.img_size > 0 && self.img_size.is_multiple_of(self.total_stride()),
            "tinysam: img_size {} is not a multiple of the total stride {}",
            self.img_size,
            self.total_stride()
        );
        ensure!(self.local_conv_size % 2 == 1, "tinysam: local_conv_size must be odd");
        Ok(())
    }
}

impl Default for TinySamConfig {
    fn default() -> Self {
        Self::tinyvit_5m()
    }
}

thread_local! {
    static KEEP_RUNNING_STATS: Cell<bool> = const { Cell::new(false) };
    static USE_RUNNING_STATS: Cell<bool> = const { Cell::new(false) };
}

/// While alive, BatchNorm normalises with its running statistics even in training mode
/// (affine parameters still train): every sample is then normalised independently of its
/// micro-batch, so gradient accumulation equals the large batch exactly.
pub struct FrozenBatchNormStats {
    prev: bool,
}

impl FrozenBatchNormStats {
    pub fn enter() -> Self {
        Self { prev: USE_RUNNING_STATS.with(|k| k.replace(true)) }
    }
}

impl Drop for FrozenBatchNormStats {
    fn drop(&mut self) {
        USE_RUNNING_STATS.with(|k| k.set(self.prev));
    }
}

/// While alive, training-mode BatchNorm still normalises with batch statistics but leaves the
/// running statistics untouched (for recomputing a forward in gradient checkpointing).
pub struct KeepRunningStats {
    prev: bool,
}

impl KeepRunningStats {
    pub fn enter() -> Self {
        Self { prev: KEEP_RUNNING_STATS.with(|k| k.replace(true)) }
    }
}

impl Drop for KeepRunningStats {
    fn drop(&mut self) {
        KEEP_RUNNING_STATS.with(|k| k.set(self.prev));
    }
}

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// BatchNorm2d (eps 1e-5, momentum 0.1). Running statistics are buffers: `Var`s updated with
/// `set` (never tracked) when the encoder trains, plain tensors when it is frozen.
#[derive(Clone, Debug)]
struct BatchNorm2d {
    weight: Param,
    bias: Param,
    running_mean: Param,
    running_var: Param,
}

impl BatchNorm2d {
    fn new(pb: &ParamBuilder, c: usize, weight_init: Init) -> Result<Self> {
        Ok(Self {
            weight: pb.get(c, "weight", weight_init)?,
            bias: pb.get(c, "bias", Init::Zeros)?,
            running_mean: pb.buffer(c, "running_mean", Init::Zeros)?,
            running_var: pb.buffer(c, "running_var", Init::Ones)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = x.dims4()?;
        let dt = x.dtype();
        let w = self.weight.cast(DType::F32)?.reshape((1, c, 1, 1))?;
        let b = self.bias.cast(DType::F32)?.reshape((1, c, 1, 1))?;
        if let (Param::Trained(rm), Param::Trained(rv)) = (&self.running_mean, &self.running_var) {
            if ops::is_training() && !USE_RUNNING_STATS.with(|k| k.get()) {
                let y = batch_norm_train(x, &w, &b, BN_EPS)?;
                // A checkpointed stage's recomputation must not update the statistics twice.
                if !KEEP_RUNNING_STATS.with(|k| k.get()) && !crate::nn::checkpoint::is_recomputing() {
                    let n = (x.elem_count() / c) as f64;
                    let x32 = x.detach().to_dtype(DType::F32)?;
                    let mean = mean_keepdims(&x32, &[0, 2, 3])?;
                    let var = mean_keepdims(&x32.broadcast_sub(&mean)?.sqr()?, &[0, 2, 3])?;
                    let mean = mean.flatten_all()?;
                    let var_unbiased = (var.flatten_all()? * (n / (n - 1.0)))?;
                    rm.set(&((rm.as_tensor().detach() * (1.0 - BN_MOMENTUM))? + (mean * BN_MOMENTUM)?)?)?;
                    rv.set(&((rv.as_tensor().detach() * (1.0 - BN_MOMENTUM))? + (var_unbiased * BN_MOMENTUM)?)?)?;
                }
                return Ok(y);
            }
        }
        // Running statistics fold into one per-channel affine map.
        // Detached: buffers are state, not optimised (no gradient for them).
        let rm = self.running_mean.tensor().detach().to_dtype(DType::F32)?.reshape((1, c, 1, 1))?;
        let rv = self.running_var.tensor().detach().to_dtype(DType::F32)?.reshape((1, c, 1, 1))?;
        let scale = w.broadcast_div(&(rv + BN_EPS)?.sqrt()?)?;
        let shift = b.broadcast_sub(&rm.broadcast_mul(&scale)?)?;
        add_any(&mul_any(x, &scale.to_dtype(dt)?)?, &shift.to_dtype(dt)?)
    }
}

/// Conv2d without bias followed by BatchNorm (`Conv2d_BN`: keys `c.weight`, `bn.*`).
#[derive(Clone, Debug)]
struct ConvBn {
    weight: Param,
    bn: BatchNorm2d,
    stride: usize,
    pad: usize,
    groups: usize,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        pb: &ParamBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        groups: usize,
        bn_weight_init: Init,
    ) -> Result<Self> {
        let fan_in = cin / groups * k * k;
        let weight = pb.pp("c").get((cout, cin / groups, k, k), "weight", Init::torch_default(fan_in))?;
        let bn = BatchNorm2d::new(&pb.pp("bn"), cout, bn_weight_init)?;
        Ok(Self { weight, bn, stride, pad, groups })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.cast(x.dtype())?;
        let c = x.dim(1)?;
        let y = if self.groups > 1 && self.groups == c && w.dim(0)? == c {
            depthwise_conv2d(x, &w, self.stride, self.pad)?
        } else if self.groups == 1 && w.track_op() && !x.track_op() {
            conv2d_const_input(x, &w, self.stride, self.pad)?
        } else {
            ensure!(self.groups == 1, "tinysam: grouped convolution with {} groups on {c} channels", self.groups);
            conv2d(x, &w, self.stride, self.pad)?
        };
        self.bn.forward(&y)
    }
}

fn gelu(x: &Tensor) -> Result<Tensor> {
    ops::gelu_erf(x)
}

/// Stem: Conv_BN(in, d/2, 3, s2) - GELU - Conv_BN(d/2, d, 3, s2); keys `seq.0`, `seq.2`.
#[derive(Clone, Debug)]
struct PatchEmbed {
    conv0: ConvBn,
    conv2: ConvBn,
}

impl PatchEmbed {
    fn new(pb: &ParamBuilder, cin: usize, d: usize) -> Result<Self> {
        let pb = pb.pp("seq");
        Ok(Self {
            conv0: ConvBn::new(&pb.pp(0), cin, d / 2, 3, 2, 1, 1, Init::Ones)?,
            conv2: ConvBn::new(&pb.pp(2), d / 2, d, 3, 2, 1, 1, Init::Ones)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv2.forward(&gelu(&self.conv0.forward(x)?)?)
    }
}

/// Inverted residual: 1x1 expand - GELU - depthwise 3x3 - GELU - 1x1 - (+x) - GELU.
#[derive(Clone, Debug)]
struct MbConv {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
}

impl MbConv {
    fn new(pb: &ParamBuilder, d: usize, expand: f64) -> Result<Self> {
        let hid = (d as f64 * expand) as usize;
        Ok(Self {
            conv1: ConvBn::new(&pb.pp("conv1"), d, hid, 1, 1, 0, 1, Init::Ones)?,
            conv2: ConvBn::new(&pb.pp("conv2"), hid, hid, 3, 1, 1, hid, Init::Ones)?,
            // Zero-initialised last BatchNorm: a fresh block starts as the identity (as TinyViT).
            conv3: ConvBn::new(&pb.pp("conv3"), hid, d, 1, 1, 0, 1, Init::Zeros)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = gelu(&self.conv1.forward(x)?)?;
        let y = gelu(&self.conv2.forward(&y)?)?;
        let y = self.conv3.forward(&y)?;
        gelu(&(y + x)?)
    }
}

/// Conv_BN 1x1 - GELU - depthwise Conv_BN 3x3 (stride) - GELU - Conv_BN 1x1, on (B,C,H,W).
#[derive(Clone, Debug)]
struct PatchMerging {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
}

impl PatchMerging {
    fn new(pb: &ParamBuilder, d: usize, out: usize, stride: usize) -> Result<Self> {
        Ok(Self {
            conv1: ConvBn::new(&pb.pp("conv1"), d, out, 1, 1, 0, 1, Init::Ones)?,
            conv2: ConvBn::new(&pb.pp("conv2"), out, out, 3, stride, 1, out, Init::Ones)?,
            conv3: ConvBn::new(&pb.pp("conv3"), out, out, 1, 1, 0, 1, Init::Ones)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = gelu(&self.conv1.forward(x)?)?;
        let y = gelu(&self.conv2.forward(&y)?)?;
        self.conv3.forward(&y)
    }
}

/// Multi-head attention inside one window, with a learned bias per head and per relative
/// offset (|dy|, |dx|) between the two positions.
#[derive(Clone, Debug)]
struct Attention {
    norm: LayerNorm,
    qkv: Linear,
    proj: Linear,
    attention_biases: Param,
    /// (T*T) index of the offset of each query/key pair into `attention_biases`, T = window².
    bias_idx: Tensor,
    heads: usize,
    key_dim: usize,
    tokens: usize,
}

impl Attention {
    fn new(pb: &ParamBuilder, dim: usize, heads: usize, window: usize) -> Result<Self> {
        let key_dim = dim / heads;
        let t = window * window;
        // TinyViT numbers offsets by first appearance over (p1, p2) in row-major order; p1 = (0,0)
        // already meets every offset, in row-major order, so offset (a, b) has index a*window + b.
        let mut idx = Vec::with_capacity(t * t);
        for p1 in 0..t {
            for p2 in 0..t {
                let dy = (p1 / window).abs_diff(p2 / window);
                let dx = (p1 % window).abs_diff(p2 % window);
                idx.push((dy * window + dx) as u32);
            }
        }
        Ok(Self {
            norm: LayerNorm::new(&pb.pp("norm"), dim, 1e-5)?,
            qkv: Linear::new(&pb.pp("qkv"), dim, 3 * dim, true)?,
            proj: Linear::new(&pb.pp("proj"), dim, dim, true)?,
            attention_biases: pb.get((heads, t), "attention_biases", Init::Zeros)?,
            bias_idx: Tensor::from_vec(idx, t * t, pb.device())?,
            heads,
            key_dim,
            tokens: t,
        })
    }

    /// x: (N, T, C) windows -> (N, T, C).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, t, c) = x.dims3()?;
        ensure!(t == self.tokens, "attention: {t} tokens per window, expected {}", self.tokens);
        let (h, kd) = (self.heads, self.key_dim);
        let qkv = self.qkv.forward(&self.norm.forward(x)?)?.reshape((n, t, h, 3 * kd))?;
        // Per head the features are [q | k | v].
        let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(3, i * kd, kd)?.transpose(1, 2)?.contiguous()?) };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let bias = self.attention_biases.cast(x.dtype())?.index_select(&self.bias_idx, 1)?.reshape((h, t, t))?;
        // One op that keeps only its output (the scores of every window exist one chunk at a
        // time); the relative position bias gets its gradient through it.
        let q = (q * (kd as f64).powf(-0.5))?;
        let y = chunked_attention(&q, &k, &v, Some(&bias), 0.0, "tinysam.attention", SCORE_CHUNK_ELEMS)?;
        let y = y.transpose(1, 2)?.reshape((n, t, c))?;
        self.proj.forward(&y)
    }
}

/// LayerNorm - fc1 - GELU - fc2.
#[derive(Clone, Debug)]
struct Mlp {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(pb: &ParamBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            norm: LayerNorm::new(&pb.pp("norm"), dim, 1e-5)?,
            fc1: Linear::new(&pb.pp("fc1"), dim, hidden, true)?,
            fc2: Linear::new(&pb.pp("fc2"), hidden, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&gelu(&self.fc1.forward(&self.norm.forward(x)?)?)?)
    }
}

/// x + WindowAttention(x); depthwise local conv (+BN); x + Mlp(x). Tokens (B, H*W, C).
#[derive(Clone, Debug)]
struct TinyVitBlock {
    attn: Attention,
    local_conv: ConvBn,
    mlp: Mlp,
    window: usize,
}

impl TinyVitBlock {
    fn new(pb: &ParamBuilder, cfg: &TinySamConfig, l: usize) -> Result<Self> {
        let (dim, window, ks) = (cfg.embed_dims[l], cfg.window_sizes[l], cfg.local_conv_size);
        Ok(Self {
            attn: Attention::new(&pb.pp("attn"), dim, cfg.num_heads[l], window)?,
            local_conv: ConvBn::new(&pb.pp("local_conv"), dim, dim, ks, 1, ks / 2, dim, Init::Ones)?,
            mlp: Mlp::new(&pb.pp("mlp"), dim, (dim as f64 * cfg.mlp_ratio) as usize)?,
            window,
        })
    }

    fn forward(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (b, l, c) = x.dims3()?;
        let ws = self.window;
        let a = if h == ws && w == ws {
            self.attn.forward(x)?
        } else {
            // Zero-pad to whole windows (the padded tokens are normalised and attended, as in
            // TinyViT), partition, attend, merge, crop.
            let (pb_, pr) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
            let (ph, pw) = (h + pb_, w + pr);
            let (nh, nw) = (ph / ws, pw / ws);
            let xw = pad_zeros(&pad_zeros(&x.reshape((b, h, w, c))?, 1, 0, pb_)?, 2, 0, pr)?;
            let xw = xw.reshape((b, nh, ws, nw, ws, c))?.transpose(2, 3)?.reshape((b * nh * nw, ws * ws, c))?;
            let y = self.attn.forward(&xw)?;
            let y = y.reshape((b, nh, nw, ws, ws, c))?.transpose(2, 3)?.reshape((b, ph, pw, c))?;
            let y = if pb_ > 0 || pr > 0 { y.narrow(1, 0, h)?.narrow(2, 0, w)? } else { y };
            y.reshape((b, l, c))?
        };
        let x = (x + a)?;
        let x = x.transpose(1, 2)?.reshape((b, c, h, w))?;
        let x = self.local_conv.forward(&x)?.reshape((b, c, l))?.transpose(1, 2)?;
        let y = self.mlp.forward(&x)?;
        Ok((x + y)?)
    }
}

#[derive(Clone, Debug)]
enum Blocks {
    Conv(Vec<MbConv>),
    Attn(Vec<TinyVitBlock>),
}

/// One `layers.{l}`: its blocks and the PatchMerging into the next stage (if any).
#[derive(Clone, Debug)]
struct Stage {
    blocks: Blocks,
    downsample: Option<PatchMerging>,
}

impl Stage {
    fn new(pb: &ParamBuilder, cfg: &TinySamConfig, l: usize) -> Result<Self> {
        let n = cfg.num_stages();
        let bpb = pb.pp("blocks");
        let blocks = if l == 0 {
            let d = cfg.embed_dims[0];
            Blocks::Conv(
                (0..cfg.depths[0])
                    .map(|i| MbConv::new(&bpb.pp(i), d, cfg.mbconv_expand_ratio))
                    .collect::<Result<_>>()?,
            )
        } else {
            Blocks::Attn((0..cfg.depths[l]).map(|i| TinyVitBlock::new(&bpb.pp(i), cfg, l)).collect::<Result<_>>()?)
        };
        let downsample = if l + 1 < n {
            // MobileSAM keeps the resolution in the last merge (output stride 16).
            let stride = if l + 2 == n { 1 } else { 2 };
            Some(PatchMerging::new(&pb.pp("downsample"), cfg.embed_dims[l], cfg.embed_dims[l + 1], stride)?)
        } else {
            None
        };
        Ok(Self { blocks, downsample })
    }

    /// Blocks, then the PatchMerging. With checkpointing each of them is its own checkpoint:
    /// backward then rebuilds one block at a time (a whole stage 0 at 1024 px is about 3.6 GB
    /// per sample).
    fn forward_with(&self, x: &Tensor, ckpt: Option<&Checkpointer>) -> Result<Tensor> {
        let unit = |x: &Tensor, f: BlockFn| match ckpt {
            Some(c) => c.run(x, f),
            None => f(x),
        };
        let mut x = x.clone();
        match &self.blocks {
            Blocks::Conv(blocks) => {
                for blk in blocks {
                    let blk = blk.clone();
                    x = unit(&x, Box::new(move |x| blk.forward(x)))?;
                }
            }
            Blocks::Attn(blocks) if !blocks.is_empty() => {
                let (b, c, h, w) = x.dims4()?;
                let mut t = x.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
                for blk in blocks {
                    let blk = blk.clone();
                    t = unit(&t, Box::new(move |t| blk.forward(t, h, w)))?;
                }
                x = t.transpose(1, 2)?.reshape((b, c, h, w))?;
            }
            Blocks::Attn(_) => {}
        }
        match &self.downsample {
            Some(d) => {
                let d = d.clone();
                unit(&x, Box::new(move |x| d.forward(x)))
            }
            None => Ok(x),
        }
    }
}

/// conv1x1 (no bias) - LayerNorm2d - conv3x3 (no bias) - LayerNorm2d; keys `neck.{0,1,2,3}`.
#[derive(Clone, Debug)]
struct Neck {
    conv0: Param,
    norm1: LayerNorm,
    conv2: Param,
    norm3: LayerNorm,
}

impl Neck {
    fn new(pb: &ParamBuilder, d: usize, out: usize) -> Result<Self> {
        Ok(Self {
            conv0: pb.pp(0).get((out, d, 1, 1), "weight", Init::torch_default(d))?,
            norm1: LayerNorm::new(&pb.pp(1), out, 1e-6)?,
            conv2: pb.pp(2).get((out, out, 3, 3), "weight", Init::torch_default(out * 9))?,
            norm3: LayerNorm::new(&pb.pp(3), out, 1e-6)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = conv2d(x, &self.conv0.cast(x.dtype())?, 1, 0)?;
        let x = self.norm1.forward_2d(&x)?;
        let x = conv2d(&x, &self.conv2.cast(x.dtype())?, 1, 1)?;
        self.norm3.forward_2d(&x)
    }
}

/// The image encoder; construct with a builder rooted at `image_encoder`.
#[derive(Clone, Debug)]
pub struct TinySam {
    patch_embed: PatchEmbed,
    layers: Vec<Stage>,
    neck: Neck,
    cfg: TinySamConfig,
}

impl TinySam {
    pub fn new(pb: &ParamBuilder, cfg: &TinySamConfig) -> Result<Self> {
        cfg.validate()?;
        let patch_embed = PatchEmbed::new(&pb.pp("patch_embed"), cfg.in_chans, cfg.embed_dims[0])?;
        let lpb = pb.pp("layers");
        let layers = (0..cfg.num_stages()).map(|l| Stage::new(&lpb.pp(l), cfg, l)).collect::<Result<Vec<_>>>()?;
        let neck = Neck::new(&pb.pp("neck"), *cfg.embed_dims.last().unwrap(), cfg.out_chans)?;
        Ok(Self { patch_embed, layers, neck, cfg: cfg.clone() })
    }

    pub fn config(&self) -> &TinySamConfig {
        &self.cfg
    }

    pub fn num_stages(&self) -> usize {
        self.layers.len()
    }

    /// Stem: (B, in_chans, S, S) -> (B, embed_dims[0], S/4, S/4).
    pub fn patch_embed(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4().context("tinysam: input must be (B, C, S, S)")?;
        let s = self.cfg.img_size;
        if c != self.cfg.in_chans || h != s || w != s {
            bail!("tinysam: input is {:?}, expected (B, {}, {s}, {s})", x.dims(), self.cfg.in_chans);
        }
        self.patch_embed.forward(x)
    }

    /// Stage `l` (`layers.{l}`: its blocks, then its PatchMerging) on a (B, C, H, W) map.
    pub fn forward_stage(&self, l: usize, x: &Tensor) -> Result<Tensor> {
        let stage = self.layers.get(l).with_context(|| format!("tinysam: no stage {l}"))?;
        stage.forward_with(x, None)
    }

    /// Neck: (B, embed_dims[last], S/16, S/16) -> (B, out_chans, S/16, S/16).
    pub fn neck(&self, x: &Tensor) -> Result<Tensor> {
        self.neck.forward(x)
    }

    /// (B, in_chans, S, S) -> (B, out_chans, S/16, S/16), contiguous.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None)
    }

    /// `forward` with gradient checkpointing per block (each block of `layers.{l}.blocks` and
    /// each PatchMerging).
    pub fn forward_with(&self, x: &Tensor, ckpt: Option<&Checkpointer>) -> Result<Tensor> {
        let mut x = self.patch_embed(x)?;
        for stage in &self.layers {
            x = stage.forward_with(&x, ckpt)?;
        }
        Ok(self.neck(&x)?.contiguous()?)
    }
}
