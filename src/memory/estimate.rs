//! Analytic peak memory of one training step, per component, from the architecture alone.
//!
//! The model follows this crate's implementation, not PyTorch's: candle keeps every tensor that a
//! tracked op read until the graph holding it is dropped, so the activation terms count, op by
//! op, the outputs that stay referenced by the graph (casts, contiguous copies, norm and softmax
//! intermediates in f32, dropout outputs). The training step cuts its graph after the LLM and
//! after TinySAM and frees each part once its backward ran (`PrsMed::backward_staged`), so the
//! backward has three phases with different live activations. Frozen parts run untracked and
//! only cost a transient. Peak = persistent state + the largest of the CLIP transient (early in
//! the forward) and each backward phase's activations plus its largest temporaries.

use anyhow::Result;
use serde::Serialize;

use super::{Precision, SeqShape};
use crate::config::{BaseQuant, Checkpointing, MaskPrecision};
use crate::model::llava::ProjectorKind;
use crate::model::prs_med::PrsMedSpec;
use crate::nn::attention::{chunk_rows, SCORE_CHUNK_ELEMS};

/// Device memory outside candle's pool once a training step ran: the CUDA context (595 MiB
/// bare, docs/gpu.md) plus the loaded kernel modules; with the cuBLAS allowance below this is
/// the 1.17 GB measured on an H100 (driver 580) by `prs profile-memory --measure`.
pub const CUDA_CONTEXT_BYTES: u64 = 1056 << 20;
/// cuBLAS/cuBLASLt workspaces allocated outside candle's pool (an allowance).
pub const CUBLAS_WORKSPACE_BYTES: u64 = 64 << 20;
/// Resident size of an idle `prs` process when nothing was measured (an allowance).
pub const CPU_PROCESS_BYTES: u64 = 24 << 20;
/// What a CPU process adds once it computes, on top of the idle baseline: thread pools and the
/// matmul packing buffers (the constant part of the tiny sweep's error, about 8 MB).
pub const CPU_COMPUTE_SCRATCH_BYTES: u64 = 8 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// What to estimate.
#[derive(Clone, Debug)]
pub struct EstimateInput<'a> {
    pub spec: &'a PrsMedSpec,
    pub train_tinysam: bool,
    pub train_projector: bool,
    pub batch: usize,
    pub seq: SeqShape,
    pub precision: Precision,
    /// Storage of the frozen LLM projections.
    pub base_quant: BaseQuant,
    pub checkpointing: Checkpointing,
    /// Where the step runs (the activation model is the same; the overhead differs).
    pub device: DeviceKind,
    /// Process/context overhead (CUDA context + workspaces, or the idle process RSS on CPU).
    pub context_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Item {
    pub name: String,
    pub bytes: u64,
}

/// Predicted peak and its parts.
#[derive(Clone, Debug, Serialize)]
pub struct Estimate {
    /// What is alive at the peak.
    pub items: Vec<Item>,
    pub peak_bytes: u64,
    /// Which phase holds the peak: "clip-forward" or one of the backward's stages.
    pub peak_phase: String,
    /// Every phase's own peak, in the order they run.
    pub phase_peaks: Vec<(String, u64)>,
    pub trained_params: u64,
    pub frozen_params: u64,
}

/// Parameter counts per component (elements), for the weight terms and for checks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    pub llm: u64,
    pub lora: u64,
    pub clip: u64,
    pub projector: u64,
    /// TinySAM optimised tensors, and its BatchNorm running statistics (buffers).
    pub tinysam: u64,
    pub tinysam_buffers: u64,
    pub decoder: u64,
    pub classifier: u64,
}

fn u(x: usize) -> u64 {
    x as u64
}

pub fn param_counts(spec: &PrsMedSpec) -> Result<ParamCounts> {
    let l = &spec.llava.llm;
    let (h, i, v, hd) = (u(l.hidden_size), u(l.intermediate_size), u(l.vocab_size), u(l.head_dim()));
    let (qd, kvd) = (u(l.num_attention_heads) * hd, u(l.num_key_value_heads) * hd);
    let per_layer = h * qd + 2 * h * kvd + qd * h + 3 * h * i + 2 * h;
    let heads = if l.tie_word_embeddings { 1 } else { 2 };
    let llm = heads * v * h + u(l.num_hidden_layers) * per_layer + h;
    let r = u(spec.lora.r);
    let lora_layer: u64 = [("q_proj", h, qd), ("k_proj", h, kvd), ("v_proj", h, kvd), ("o_proj", qd, h)]
        .into_iter()
        .chain([("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)])
        .filter(|(m, _, _)| spec.lora.targets(m))
        .map(|(_, a, b)| r * (a + b))
        .sum();
    let lora = lora_layer * u(l.num_hidden_layers);

    let vc = spec.llava.vision_config()?;
    let (c, ic, p) = (u(vc.hidden_size), u(vc.intermediate_size), u(vc.patch_size));
    let n_run = u(vc.layers_for_select(spec.llava.mm_vision_select_layer)?);
    let clip = c * 3 * p * p
        + c
        + (u(vc.num_patches()) + 1) * c
        + 2 * c
        + n_run * (4 * (c * c + c) + 2 * c * ic + ic + c + 4 * c);

    let cm = u(spec.llava.mm_hidden_size);
    let projector = match ProjectorKind::parse(&spec.llava.mm_projector_type)? {
        ProjectorKind::Linear => cm * h + h,
        ProjectorKind::Identity => 0,
        ProjectorKind::MlpGelu { depth } => cm * h + h + u(depth - 1) * (h * h + h),
    };

    // TinySAM: Conv_BN = kernel + BN weight/bias (trained) + running mean/var (buffers).
    let t = &spec.tinysam;
    let (mut ts, mut tb) = (0u64, 0u64);
    let mut conv_bn = |cin: u64, cout: u64, k: u64, groups: u64| {
        ts += cout * (cin / groups) * k * k + 2 * cout;
        tb += 2 * cout;
    };
    let d: Vec<u64> = t.embed_dims.iter().map(|&x| u(x)).collect();
    conv_bn(u(t.in_chans), d[0] / 2, 3, 1);
    conv_bn(d[0] / 2, d[0], 3, 1);
    let ns = t.depths.len();
    let mut attn_params = 0u64;
    for st in 0..ns {
        let dim = d[st];
        if st == 0 {
            let hid = (dim as f64 * t.mbconv_expand_ratio) as u64;
            for _ in 0..t.depths[0] {
                conv_bn(dim, hid, 1, 1);
                conv_bn(hid, hid, 3, hid);
                conv_bn(hid, dim, 1, 1);
            }
        } else {
            let hid = (dim as f64 * t.mlp_ratio) as u64;
            let ws = u(t.window_sizes[st]);
            let lk = u(t.local_conv_size);
            for _ in 0..t.depths[st] {
                attn_params += 2 * dim + 3 * dim * dim + 3 * dim + dim * dim + dim + u(t.num_heads[st]) * ws * ws;
                conv_bn(dim, dim, lk, dim);
                attn_params += 2 * dim + dim * hid + hid + hid * dim + dim;
            }
        }
        if st + 1 < ns {
            let out = d[st + 1];
            conv_bn(dim, out, 1, 1);
            conv_bn(out, out, 3, out);
            conv_bn(out, out, 1, 1);
        }
    }
    let oc = u(t.out_chans);
    let tinysam = ts + attn_params + oc * d[ns - 1] + 2 * oc + oc * oc * 9 + 2 * oc;

    let dc = &spec.decoder;
    let (dm, ph, ff, lh) = (u(dc.dim), u(dc.prompt_hidden), u(dc.ffn_dim), u(dc.llm_hidden));
    let mha = 4 * dm * dm + 4 * dm;
    let mut decoder = lh * ph + ph + ph * dm + dm + 2 * ph + 2 * dm; // prompt projection + its norms
    decoder += 4 * dm; // prompt_norm, image_norm
    decoder += mha + 2 * dm; // cross-attention, norm1
    decoder += mha + dm * ff + ff + ff * dm + dm + 4 * dm; // encoder layer
    decoder += 2 * (dm * dm + dm) + 2 * dm; // ffn
    for (ci, co) in dc.block_channels() {
        let (ci, co) = (u(ci), u(co));
        decoder += ci * ci * 9 + ci + 2 * ci + co * ci + co + 2 * co + co * co * 9 + co;
    }
    decoder += dm / 4 + 1;
    let classifier = dm * u(spec.num_modalities) + u(spec.num_modalities);
    Ok(ParamCounts { llm, lora, clip, projector, tinysam, tinysam_buffers: tb, decoder, classifier })
}

/// The seven projections of one Mistral layer, (out, in) each.
fn llm_projections(spec: &PrsMedSpec) -> [(usize, usize); 7] {
    let l = &spec.llava.llm;
    let (h, i) = (l.hidden_size, l.intermediate_size);
    let (qd, kvd) = (l.num_attention_heads * l.head_dim(), l.num_key_value_heads * l.head_dim());
    [(qd, h), (kvd, h), (kvd, h), (h, qd), (i, h), (i, h), (h, i)]
}

/// Bytes of the frozen LLM's weights stored with `quant` (scales included; a projection whose
/// in-features are not a multiple of the block stays dense, as the loader keeps it), and the
/// elements of its largest quantised projection (0 when none is).
pub fn llm_weight_bytes(spec: &PrsMedSpec, quant: BaseQuant, s: u64) -> Result<(u64, u64)> {
    let total = param_counts(spec)?.llm;
    let layers = u(spec.llava.llm.num_hidden_layers);
    let (mut dense, mut stored, mut largest) = (total, 0u64, 0u64);
    for (o, i) in llm_projections(spec) {
        let n = u(o * i);
        if let Some(b) = quant.weight_bytes(o, i) {
            dense -= layers * n;
            stored += layers * b;
            largest = largest.max(n);
        }
    }
    Ok((dense * s + stored, largest))
}

/// Bytes kept per token by one Mistral layer's graph (no checkpointing).
fn llm_layer_bytes_per_token(spec: &PrsMedSpec, s: u64) -> f64 {
    let l = &spec.llava.llm;
    let (h, i, hd) = (u(l.hidden_size), u(l.intermediate_size), u(l.head_dim()));
    let (nh, nkv) = (u(l.num_attention_heads), u(l.num_key_value_heads));
    let (qd, kvd) = (nh * hd, nkv * hd);
    // Each projection keeps its output alone (frozen, or frozen with a trained adapter as one
    // node that recomputes the adapter's narrow product and dropout mask in backward:
    // `nn::linear::lora_linear`).
    // normalised (fused op, in the compute dtype), scaled by the weight
    let rms = 2 * s * h;
    let attn = s * (qd + 2 * kvd) // q, k, v projections
        + s * (qd + 2 * kvd) // q and k split into heads and rotated (one op each), v's heads
        + 2 * s * qd // the attention's output (its op keeps no scores), heads merged
        + s * h; // o_proj
    let mlp = s * (2 * i) + s * i + s * h; // gate and up, the fused silu * up, down
    (2 * rms + attn + mlp + 2 * s * h) as f64
}

/// A TinySAM block's backward working set in units of the block's graph (its elements as
/// counted in `tinysam_graph_elems`): measured on the CPU with the 7B's TinySAM at 512 px
/// (peak RSS at batch 1 and 2, with and without checkpointing; BENCHMARKS.md, session 12).
const TINYSAM_BLOCK_BACKWARD: f64 = 0.75;

/// TinySAM's graph when it trains, elements per sample in the mask branch's dtype.
struct TinySamElems {
    /// Kept for backward without checkpointing.
    full: f64,
    /// Kept with per-block checkpointing: stem, block and PatchMerging outputs, layout copies,
    /// neck.
    checkpointed: f64,
    /// The largest block (or PatchMerging): rebuilt while its backward runs with
    /// checkpointing, and the unit of its backward's working set either way.
    recomputed_block: f64,
    /// The largest depthwise convolution's backward working set.
    depthwise_backward: f64,
    /// The largest single tensor.
    largest: f64,
    /// The features TinySAM hands the decoder.
    output: f64,
}

fn tinysam_graph_elems(spec: &PrsMedSpec) -> TinySamElems {
    let t = &spec.tinysam;
    let s = t.img_size as f64;
    let d: Vec<f64> = t.embed_dims.iter().map(|&x| x as f64).collect();
    // Fused BatchNorm and LayerNorm: their output, in the mask dtype (the op keeps its input,
    // which its producer keeps anyway; the f32 statistics are per channel or row).
    let bn = 1.0;
    let ln = 1.0;
    let total = std::cell::Cell::new(0.0f64);
    let largest = std::cell::Cell::new(0.0f64);
    let add = |e: f64, big: f64| {
        total.set(total.get() + e);
        largest.set(largest.get().max(big));
    };
    // stem: im2col of the image (untracked input), matmul, layout copy, BN, GELU; conv, BN
    let p0 = (s / 2.0).powi(2);
    let c0 = d[0] / 2.0;
    add(9.0 * t.in_chans as f64 * p0 + c0 * p0 * (2.0 + bn + 1.0), c0 * p0);
    let mut p = (s / 4.0).powi(2);
    add(d[0] * p * (1.0 + bn), d[0] * p);
    // Depthwise 3x3: one op per direction (`nn::depthwise`) that keeps its input, counted as
    // its producer's output. Its backward holds dx and, while candle adds dx into the gradient
    // store, the store's zeros and the sum: three input-sized maps.
    let dw_backward = std::cell::Cell::new(0.0f64);
    let dw = |c: f64, pin: f64, pout: f64| {
        dw_backward.set(dw_backward.get().max(3.0 * c * pin));
        c * pout
    };
    let mut side = s / 4.0;
    let ns = t.depths.len();
    let stem_total = total.get();
    // Checkpointed: what stays between blocks (outputs, layout copies) and the largest block.
    let (mut kept, mut unit) = (0.0f64, 0.0f64);
    let mut block = |e: f64, big: f64, out: f64| {
        add(e, big);
        kept += out;
        unit = unit.max(e);
    };
    for st in 0..ns {
        let c = d[st];
        if st == 0 {
            let hid = c * t.mbconv_expand_ratio;
            for _ in 0..t.depths[0] {
                let e = hid * p * (1.0 + bn + 1.0) + dw(hid, p, p) + hid * p * (bn + 1.0) + c * p * (1.0 + bn + 2.0);
                block(e, hid * p, c * p);
            }
        } else {
            let ws = t.window_sizes[st] as f64;
            let padded = (side / ws).ceil() * ws;
            let lp = padded * padded;
            let pad = if padded > side { 2.0 * c * lp + c * p } else { 0.0 };
            let heads = t.num_heads[st] as f64;
            let hid = c * t.mlp_ratio;
            let e_blk = pad
                // window copy, norm, qkv, q/k/v, scaled q, [k | v], the attention's output (its op
                // keeps no scores), proj, merge
                + c * lp * (1.0 + ln + 6.0 + 3.0 + 1.0 + 2.0 + 1.0 + 2.0 + 1.0)
                + c * p * (1.0 + 1.0 + bn + ln + 2.0 + 1.0) // residual, map copy, local conv BN, MLP norm, fc2, residual
                + dw(c, p, p)
                + hid * p * 3.0; // fc1, GELU
            for _ in 0..t.depths[st] {
                block(e_blk, heads * ws * ws * lp, c * p);
            }
            block(c * p, 0.0, 2.0 * c * p); // tokens made contiguous at the stage entry, and back to a map
        }
        if st + 1 < ns {
            let out = d[st + 1];
            let stride = if st + 2 == ns { 1.0 } else { 2.0 };
            let p2 = p / (stride * stride);
            let phases = if stride > 1.0 { out * p } else { 0.0 };
            let e = out * p * (1.0 + bn + 1.0) + phases + dw(out, p, p2) + out * p2 * (bn + 1.0 + 1.0 + bn);
            block(e, out * p, out * p2);
            p = p2;
            side /= stride;
        }
    }
    let oc = t.out_chans as f64;
    let neck = oc * p * (1.0 + ln + 1.0 + 1.0 + ln);
    add(neck, oc * p);
    TinySamElems {
        full: total.get(),
        checkpointed: stem_total + kept + neck,
        recomputed_block: unit,
        depthwise_backward: dw_backward.get(),
        largest: largest.get(),
        output: oc * p,
    }
}

/// The decoder's graph per sample: (elements kept for backward in the mask dtype, elements
/// kept in f32 (logits, upsampling, loss terms), the largest transient of its backward in the
/// mask dtype). `cast_prompt`: the LLM's states change dtype.
fn decoder_graph_elems(spec: &PrsMedSpec, t: f64, batch: f64, cast_prompt: bool) -> (f64, f64, f64) {
    let dc = &spec.decoder;
    let (d, ph, ff, lh) = (dc.dim as f64, dc.prompt_hidden as f64, dc.ffn_dim as f64, dc.llm_hidden as f64);
    let m = (dc.grid * dc.grid) as f64;
    let ln = 1.0; // fused LayerNorm: its output
    let drop = if dc.dropout > 0.0 { 1.0 } else { 0.0 }; // its output (the mask is recomputed)
    let mut e = if cast_prompt { t * lh } else { 0.0 }; // prompt states in the mask dtype
    e += t * ph * (2.0 + ln + 1.0) + t * d * (2.0 + ln + 1.0 + ln); // prompt projection, norms
    e += m * d * (1.0 + ln); // image tokens, norm
                             // Cross-attention: q, packed kv, heads, scaled q, output (the attention op keeps no
                             // scores), merge, out.
    e += m * d * 2.0 + t * 2.0 * d * 2.0 + (m + 2.0 * t) * d + m * d + m * d * 4.0;
    e += m * d * (1.0 + ln); // residual, norm1
                             // Encoder layer: packed qkv, heads, scaled q, the attention's output, merge, out, dropouts,
                             // residuals, norms, feed-forward.
    let hs = dc.self_heads as f64;
    let chunk = chunk_rows((batch * hs) as usize, m as usize, m as usize, SCORE_CHUNK_ELEMS) as f64;
    // The attention op keeps only its output; its backward holds one chunk's scores,
    // probabilities (+ dropout) and their gradients at a time.
    let transient_scores = (5.0 + drop) * hs * chunk * m;
    e += m * 3.0 * d * 2.0 + 3.0 * m * d + m * d + m * d * (1.0 + 1.0 + 2.0);
    e += m * d * (drop + 1.0 + ln) + m * ff * (2.0 + 1.0 + drop) + m * d * (2.0 + drop + 1.0 + ln);
    e += m * d * (2.0 + 1.0 + 1.0 + 2.0 + 1.0 + ln); // ffn
    e += m * d * 2.0; // back to a map, + features
    let g2 = ((dc.grid + 2) * (dc.grid + 2)) as f64;
    for (ci, co) in dc.block_channels() {
        let (ci, co) = (ci as f64, co as f64);
        e += ci * m * (2.0 + ln + 2.0) + co * g2 * (2.0 + ln) + co * m * 2.0;
    }
    e += m; // 1x1 conv to logits
    let s_out = (dc.grid * dc.upsample) as f64;
    let hw = s_out * s_out;
    // The logits in f32, bilinear upsampling (one custom op), the structure loss terms and
    // their constant weights.
    let e_f32 = m + hw + 15.0 * hw;
    (e, e_f32, transient_scores.max(3.0 * hw))
}

/// The analytic peak of one training step (forward, backward, AdamW).
pub fn estimate(inp: &EstimateInput) -> Result<Estimate> {
    let spec = inp.spec;
    let pc = param_counts(spec)?;
    let s = inp.precision.bytes();
    let b = u(inp.batch);
    let vc = spec.llava.vision_config()?;
    let n_img = u(vc.num_patches());
    let t = u(inp.seq.total(n_img as usize));
    let l = &spec.llava.llm;
    let (h, v, layers) = (u(l.hidden_size), u(l.vocab_size), u(l.num_hidden_layers));
    let tok = b * t;
    let mut items: Vec<Item> = vec![];
    let mut push = |name: &str, bytes: f64| items.push(Item { name: name.into(), bytes: bytes.max(0.0) as u64 });

    // Persistent state.
    let (llm_bytes, largest_quant) = llm_weight_bytes(spec, inp.base_quant, s)?;
    let quant_note = match inp.base_quant {
        BaseQuant::None => String::new(),
        q => format!(", projections {q} with scales"),
    };
    push(&format!("weights: LLM (frozen{quant_note})"), llm_bytes as f64);
    push("weights: CLIP (frozen)", (pc.clip * s) as f64);
    let (mut trained, mut frozen) = (pc.lora + pc.decoder + pc.classifier, pc.llm + pc.clip);
    if inp.train_projector {
        trained += pc.projector;
    } else {
        frozen += pc.projector;
        push("weights: projector (frozen)", (pc.projector * s) as f64);
    }
    if inp.train_tinysam {
        trained += pc.tinysam;
        push("TinySAM BatchNorm statistics (f32)", (pc.tinysam_buffers * 4) as f64);
    } else {
        frozen += pc.tinysam + pc.tinysam_buffers;
        push("weights: TinySAM (frozen)", ((pc.tinysam + pc.tinysam_buffers) * s) as f64);
    }
    push("trained: f32 master copies", (trained * 4) as f64);
    push(GRADIENTS_ITEM, (trained * 4) as f64);
    push("trained: AdamW moments (2 x f32)", (trained * 8) as f64);
    let sam = u(spec.tinysam.img_size);
    let sc = u(vc.image_size);
    let inputs = b * (3 * sc * sc + 4 * sam * sam) * 4 + b * t * t * s;
    push("batch inputs and attention mask", inputs as f64);

    push("context and workspaces", inp.context_bytes as f64);
    if inp.device == DeviceKind::Cpu {
        push("CPU threads and matmul buffers", CPU_COMPUTE_SCRATCH_BYTES as f64);
    }
    let persistent = items.clone();

    // Graph, by the part that holds it. The backward runs in stages (`PrsMed::backward_staged`):
    // the losses, LM head and decoder first, with every part's activations alive; then the LLM,
    // with TinySAM's still alive; then TinySAM alone. Each stage's peak is its activations plus
    // its largest backward transient; the step's peak is the largest stage.
    let per_tok = llm_layer_bytes_per_token(spec, s);
    let embeds = (3 * tok * h * s + b * n_img * h * s) as f64; // text, spliced, image
    let (ck_llm, ck_vision) = (inp.checkpointing.llm(), inp.checkpointing.vision());
    let (llm_graph, recompute) = if ck_llm {
        ((layers * tok * h * s) as f64, per_tok * tok as f64)
    } else {
        (per_tok * (layers * tok) as f64, 0.0)
    };
    // The final norm belongs to the LLM's part of the graph (the cut is after it).
    let rms_final = 2 * s * h; // fused normalisation + weight, as in the layers
    let llm_acts = Item::new("activations: LLM layers, final norm", llm_graph + embeds + (tok * rms_final) as f64);
    let rows = b * u(inp.seq.answer + 1);
    let head = rows * (h * s + v * s + if s == 4 { 0 } else { 4 * v } + 12 * v);
    let head_acts = Item::new("activations: LM head, cross-entropy", head as f64);
    // The mask branch's dtype (`model.mask_precision`).
    let (mask_bytes, mask_name) = match spec.mask_precision {
        MaskPrecision::Compute => (s, inp.precision.as_str()),
        MaskPrecision::F32 => (4, "f32"),
    };
    let ts = tinysam_graph_elems(spec);
    let ts_e = if ck_vision { ts.checkpointed } else { ts.full };
    let per_sample = |e: f64| if inp.train_tinysam { e * (mask_bytes * b) as f64 } else { 0.0 };
    let ts_acts = Item::new(&format!("activations: TinySAM ({mask_name})"), per_sample(ts_e));
    let (dec_e, dec_f32, dec_transient) = decoder_graph_elems(spec, t as f64, b as f64, mask_bytes != s);
    let dec_acts = Item::new(
        &format!("activations: decoder attention over image tokens, mask head ({mask_name}), losses (f32)"),
        (dec_e * mask_bytes as f64 + dec_f32 * 4.0) * b as f64,
    );
    // The cuts: the LLM's and TinySAM's outputs as leaf copies the heads read, and later the
    // gradient each part's backward starts from (the same sizes).
    let hidden_bytes = (tok * h * s) as f64;
    let feats_bytes = per_sample(ts.output);

    // Transients. Through the cross-entropy over the vocabulary about six (R, V) f32 tensors
    // coexist (gradients of the log-softmax output, the shifted logits, exp, their sum and the
    // logits); elsewhere an op's backward holds about three tensors the size of its largest input.
    let heads_transient = largest(vec![
        ("cross-entropy backward", (6 * rows * v * 4) as f64),
        ("decoder attention backward", dec_transient * (mask_bytes * b) as f64),
    ]);
    // The attention's backward holds the recomputed probabilities, their gradient and the
    // scores' gradient.
    let llm_scores = (b * u(l.num_attention_heads) * t * t * s) as f64;
    let llm_transient = if ck_llm {
        ("one LLM layer recomputed + its backward", recompute + 3.0 * llm_scores)
    } else {
        ("LLM backward temporaries", 3.0 * llm_scores)
    };
    // A TinySAM block's backward: the gradients of its nodes that are alive together (the
    // residual's across the whole block) and its ops' temporaries, or a depthwise convolution's
    // backward, whichever is larger. With checkpointing the block is rebuilt first.
    let block_backward = (TINYSAM_BLOCK_BACKWARD * ts.recomputed_block).max(ts.depthwise_backward);
    let ts_transient = largest(vec![
        if ck_vision {
            ("one TinySAM block recomputed + its backward", per_sample(ts.recomputed_block + block_backward))
        } else {
            ("one TinySAM block's backward", per_sample(block_backward))
        },
        ("TinySAM backward temporaries", 3.0 * per_sample(ts.largest)),
    ]);
    let transient = |(what, bytes): (&str, f64)| Item::new(&format!("backward transient (largest: {what})"), bytes);
    let mut phases = vec![
        (
            "backward: losses, LM head, decoder, classifier",
            vec![
                llm_acts.clone(),
                head_acts,
                ts_acts.clone(),
                dec_acts,
                Item::new(
                    "LLM and TinySAM outputs: the leaf copies the heads read, their gradients",
                    2.0 * (hidden_bytes + feats_bytes),
                ),
                transient(heads_transient),
            ],
        ),
        (
            "backward: LLM",
            vec![
                llm_acts,
                ts_acts.clone(),
                Item::new("gradient of the LLM's output", hidden_bytes),
                Item::new("TinySAM's output: its leaf copy and gradient, waiting", 2.0 * feats_bytes),
                transient(llm_transient),
            ],
        ),
    ];
    // A quantised projection is dequantised inside each matmul that reads it, forward and
    // backward, and dropped after: one copy at a time, written straight in the compute dtype
    // (`nn::quant`).
    if largest_quant > 0 {
        let per = if inp.precision == Precision::F32 { 4 } else { s };
        phases[1].1.push(Item::new("dequantised copy of one projection (transient)", (largest_quant * per) as f64));
    }
    if inp.train_tinysam {
        phases.push((
            "backward: TinySAM",
            vec![ts_acts, Item::new("gradient of TinySAM's output", feats_bytes), transient(ts_transient)],
        ));
    }

    // CLIP runs untracked before the graph exists, and before any gradient does.
    let (c, ic, hc) = (u(vc.hidden_size), u(vc.intermediate_size), u(vc.num_attention_heads));
    let n = n_img + 1;
    let clip_transient = (b * hc * n * n * (2 * s + 12) + b * n * (4 * c * s + 2 * ic * s)) as f64;
    let clip_phase = persistent
        .iter()
        .filter(|i| i.name != GRADIENTS_ITEM)
        .cloned()
        .chain([Item::new("CLIP forward transient", clip_transient)])
        .collect::<Vec<_>>();

    let total = |items: &[Item]| items.iter().map(|i| i.bytes).sum::<u64>();
    let mut best = ("clip-forward".to_string(), clip_phase);
    let mut phase_peaks = vec![(best.0.clone(), total(&best.1))];
    for (name, graph) in phases {
        let all: Vec<Item> = persistent.iter().cloned().chain(graph.into_iter().filter(|i| i.bytes > 0)).collect();
        phase_peaks.push((name.to_string(), total(&all)));
        if total(&all) > total(&best.1) {
            best = (name.to_string(), all);
        }
    }
    let peak_bytes = total(&best.1);
    Ok(Estimate {
        items: best.1,
        peak_bytes,
        peak_phase: best.0,
        phase_peaks,
        trained_params: trained,
        frozen_params: frozen,
    })
}

/// The trained tensors' gradients: persistent, but not yet allocated while CLIP runs.
const GRADIENTS_ITEM: &str = "trained: gradients (f32)";

/// The largest of a stage's transients (they do not coexist).
fn largest(candidates: Vec<(&'static str, f64)>) -> (&'static str, f64) {
    candidates.into_iter().fold(("", 0.0), |a, t| if t.1 > a.1 { t } else { a })
}

impl Item {
    fn new(name: &str, bytes: f64) -> Self {
        Self { name: name.into(), bytes: bytes.max(0.0) as u64 }
    }
}
