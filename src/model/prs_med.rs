//! PRS-Med assembled: CLIP tower + projector + Mistral (LoRA) for the text, TinySAM + the prompted
//! mask decoder for the mask, a modality classifier on the TinySAM features.
//!
//! One LLM forward over [BOS, image, prompt, answer, EOS] gives both the LM loss (answer + EOS
//! only) and the hidden states the decoder reads; the decoder's key mask keeps it on the prompt
//! positions (causal attention means those never saw the answer).

use anyhow::{bail, ensure, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::clip::{ClipVisionConfig, ClipVisionTower};
use super::decoder::{DecoderConfig, ModalityClassifier, PromptedMaskDecoder};
use super::llava::Projector;
use super::losses::{cross_entropy_sum, structure_loss_per_image, LossCompat};
use super::mistral::{Mistral, MistralConfig};
use super::tinysam::{TinySam, TinySamConfig};
use crate::nn::checkpoint::{backward_from, detach_grads, Checkpointer};
use crate::nn::param::{ParamBuilder, TrainedParams};
use crate::nn::splice::splice_rows;
use crate::phases::BackwardPart;
use crate::tokenizer::{PromptIds, EOS_ID, PAD_ID};

/// LLaVA-Med's `config.json`: the Mistral fields plus the multimodal ones.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LlavaMedConfig {
    #[serde(flatten)]
    pub llm: MistralConfig,
    pub mm_vision_tower: String,
    pub mm_hidden_size: usize,
    #[serde(default = "default_projector")]
    pub mm_projector_type: String,
    #[serde(default = "default_select_layer")]
    pub mm_vision_select_layer: i64,
    #[serde(default = "default_select_feature")]
    pub mm_vision_select_feature: String,
    #[serde(default = "default_aspect")]
    pub image_aspect_ratio: String,
    /// Our extension for random tiny models: the tower's config inline. Real LLaVA-Med
    /// checkpoints name `openai/clip-vit-large-patch14-336` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mm_vision_config: Option<ClipVisionConfig>,
}

fn default_projector() -> String {
    "mlp2x_gelu".into()
}
fn default_select_layer() -> i64 {
    -2
}
fn default_select_feature() -> String {
    "patch".into()
}
fn default_aspect() -> String {
    "pad".into()
}

impl LlavaMedConfig {
    /// The positions a prompt may use: image vectors and the LLM's position limit.
    pub fn prompt_limits(&self) -> Result<crate::tokenizer::PromptLimits> {
        let v = self.vision_config()?;
        ensure!(v.patch_size > 0, "vision config: patch_size is 0");
        Ok(crate::tokenizer::PromptLimits {
            image_tokens: v.num_patches(),
            max_positions: self.llm.max_position_embeddings,
        })
    }

    pub fn vision_config(&self) -> Result<ClipVisionConfig> {
        if let Some(v) = &self.mm_vision_config {
            return Ok(v.clone());
        }
        if self.mm_vision_tower.contains("clip-vit-large-patch14-336") {
            return Ok(ClipVisionConfig::default());
        }
        bail!(
            "unknown vision tower `{}`: only openai/clip-vit-large-patch14-336 is built in \
             (or give `mm_vision_config` in config.json)",
            self.mm_vision_tower
        )
    }

    pub fn validate(&self) -> Result<()> {
        if self.mm_vision_select_feature != "patch" {
            bail!("mm_vision_select_feature `{}` is not supported (only `patch`)", self.mm_vision_select_feature);
        }
        if self.mm_hidden_size != self.vision_config()?.hidden_size {
            bail!("mm_hidden_size {} != vision hidden size {}", self.mm_hidden_size, self.vision_config()?.hidden_size);
        }
        self.llm.validate()
    }
}

/// Which parts of a training step recompute their activations in backward instead of keeping
/// them (`train.gradient_checkpointing`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    /// Every activation is kept.
    #[default]
    #[value(alias = "false", alias = "no")]
    Off,
    /// One checkpoint per LLM decoder layer (PyTorch's reference setting).
    Llm,
    /// The LLM layers and each TinySAM block (what the bare `--gradient-checkpointing` flag and
    /// `true` mean). The mask decoder's attention keeps only its output in every mode.
    #[value(alias = "on", alias = "true", alias = "yes")]
    All,
}

impl Checkpointing {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Llm => "llm",
            Self::All => "all",
        }
    }

    pub fn llm(self) -> bool {
        self != Self::Off
    }

    /// TinySAM blocks too.
    pub fn vision(self) -> bool {
        self == Self::All
    }
}

/// The dtype of the mask branch (`model.mask_precision`): the compute dtype, or f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskPrecision {
    #[default]
    Compute,
    F32,
}

impl std::fmt::Display for Checkpointing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `off | llm | all`, and the booleans of older configs (true = all).
impl<'de> Deserialize<'de> for Checkpointing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Bool(bool),
            Name(String),
        }
        match Repr::deserialize(d)? {
            Repr::Bool(b) => Ok(if b { Self::All } else { Self::Off }),
            Repr::Name(s) => <Self as clap::ValueEnum>::from_str(s.trim(), true).map_err(|_| {
                serde::de::Error::custom(format!("unknown checkpointing `{s}` (expected off, llm or all)"))
            }),
        }
    }
}

/// Builders for every component (each a checkpoint source or a fresh one).
pub struct Builders<'a> {
    /// Rooted at the LLaVA-Med checkpoint root (`model.*`, `lm_head.*`).
    pub llava: ParamBuilder<'a>,
    /// Rooted at the CLIP `vision_model` prefix.
    pub clip: ParamBuilder<'a>,
    /// Rooted at PEFT's `base_model.model`.
    pub lora: ParamBuilder<'a>,
    pub tinysam: ParamBuilder<'a>,
    pub decoder: ParamBuilder<'a>,
    pub classifier: ParamBuilder<'a>,
    pub projector: ParamBuilder<'a>,
}

/// Everything needed to build the model besides the weights.
#[derive(Clone, Debug)]
pub struct PrsMedSpec {
    pub llava: LlavaMedConfig,
    pub lora: crate::nn::linear::LoraConfig,
    pub tinysam: TinySamConfig,
    pub decoder: DecoderConfig,
    pub num_modalities: usize,
    pub mask_precision: MaskPrecision,
}

pub struct PrsMed {
    pub clip: ClipVisionTower,
    pub projector: Projector,
    pub llm: Mistral,
    pub tinysam: TinySam,
    pub decoder: PromptedMaskDecoder,
    pub classifier: ModalityClassifier,
    pub spec: PrsMedSpec,
    pub trained: TrainedParams,
    /// Gradient checkpointing (training only): the checkpointer and which parts use it.
    checkpointer: Option<Checkpointer>,
    checkpointing: Checkpointing,
    dtype: DType,
    device: Device,
}

/// Inputs of one batch, as the data pipeline prepares them.
#[derive(Clone)]
pub struct ModelBatch {
    /// (B,3,Sc,Sc) CLIP-normalised pixels.
    pub clip_pixels: Tensor,
    /// (B,3,S,S) SAM-normalised pixels.
    pub sam_pixels: Tensor,
    /// Token ids per sample; `answer` is empty at inference.
    pub prompts: Vec<PromptIds>,
    /// (B,1,S,S) binary masks (training / evaluation).
    pub masks: Option<Tensor>,
    /// (B) u32 modality class ids.
    pub modality: Option<Tensor>,
}

/// The LLM's view of a batch: embeddings with the image spliced in, and the index sets the
/// losses and the decoder need.
pub struct LlmInputs {
    pub embeds: Tensor,
    /// (B,T) 1 for real tokens, 0 for padding.
    pub key_valid: Tensor,
    pub position_ids: Tensor,
    /// (B,T) 1 for BOS, image and prompt positions: what the mask decoder may attend to.
    pub prompt_valid: Tensor,
    /// Flat (b*T + t) indices of positions whose next token is supervised, and the targets.
    pub lm_rows: Vec<u32>,
    pub lm_targets: Vec<u32>,
}

pub struct Outputs {
    /// (B,1,S,S) mask logits at the SAM input resolution.
    pub mask_logits: Tensor,
    /// (B,num_modalities).
    pub class_logits: Tensor,
    /// (R,V) logits at the supervised positions (training only).
    pub answer_logits: Option<Tensor>,
    pub answer_targets: Option<Tensor>,
}

/// A point where a training graph is cut: the consumers of a part's output read a leaf copy of
/// it, so that [`PrsMed::backward_staged`] can backpropagate and free everything above the cut
/// before the part below it runs its own backward (with its recomputations).
pub struct GraphCut {
    part: BackwardPart,
    /// The part's output, with the part's graph.
    output: Tensor,
    /// What the consumers read; its gradient seeds the part's backward.
    leaf: Var,
}

/// The cuts of one staged training forward, in the order their parts' backward runs.
#[derive(Default)]
pub struct GraphCuts(Vec<GraphCut>);

impl GraphCuts {
    /// `t` as its consumers should read it: a leaf copy when `t` carries a graph (the copy is
    /// the part's output size, small next to the part's activations).
    fn cut(&mut self, part: BackwardPart, t: Tensor) -> Result<Tensor> {
        if !t.track_op() {
            return Ok(t);
        }
        let leaf = Var::from_tensor(&t.detach())?;
        let read = leaf.as_tensor().clone();
        self.0.push(GraphCut { part, output: t, leaf });
        Ok(read)
    }
}

/// Loss terms of one batch (scalars, f32).
pub struct Losses {
    pub total: Tensor,
    pub seg: Tensor,
    pub lm: Tensor,
    pub cls: Tensor,
}

/// Denominators of the loss terms: the number of images and of supervised answer tokens in
/// the whole optimizer step (all accumulated micro-batches), so that accumulation equals one
/// large batch. `None` in `losses` means "this batch alone".
#[derive(Clone, Copy, Debug)]
pub struct LossNorm {
    pub images: usize,
    pub tokens: usize,
}

impl LossNorm {
    /// The counts of one batch on its own: its images and its answer tokens + EOS.
    pub fn of(batch: &ModelBatch) -> Self {
        Self { images: batch.prompts.len(), tokens: batch.prompts.iter().map(|p| p.answer.len() + 1).sum() }
    }
}

/// Weights of the loss terms.
#[derive(Clone, Copy, Debug)]
pub struct LossWeights {
    pub seg: f64,
    pub lm: f64,
    /// 0 after the classifier cut-off epoch.
    pub cls: f64,
    pub compat: LossCompat,
}

impl Default for LossWeights {
    fn default() -> Self {
        Self { seg: 1.0, lm: 1.0, cls: 0.5, compat: LossCompat::Intended }
    }
}

impl PrsMed {
    pub fn new(b: &Builders, spec: &PrsMedSpec) -> Result<Self> {
        spec.llava.validate()?;
        let vcfg = spec.llava.vision_config()?;
        let h = spec.llava.llm.hidden_size;
        let clip = ClipVisionTower::new(&b.clip, &vcfg, spec.llava.mm_vision_select_layer)?;
        let projector = Projector::new(&b.projector, spec.llava.mm_hidden_size, h, &spec.llava.mm_projector_type)?;
        let llm = Mistral::new(&b.llava, &spec.llava.llm, Some((&b.lora, &spec.lora)))?;
        let tinysam = TinySam::new(&b.tinysam, &spec.tinysam)?;
        ensure!(spec.decoder.llm_hidden == h, "decoder llm_hidden {} != LLM hidden size {h}", spec.decoder.llm_hidden);
        let decoder = PromptedMaskDecoder::new(&b.decoder, &spec.decoder)?;
        let classifier = ModalityClassifier::new(&b.classifier, spec.decoder.dim, spec.num_modalities)?;
        Ok(Self {
            clip,
            projector,
            llm,
            tinysam,
            decoder,
            classifier,
            spec: spec.clone(),
            trained: b.llava.registry().clone(),
            checkpointer: None,
            checkpointing: Checkpointing::Off,
            dtype: b.llava.dtype(),
            device: b.llava.device().clone(),
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Switches gradient checkpointing on (`Checkpointing::All`: one checkpoint per LLM decoder
    /// layer and per TinySAM block) or off. Take gradients
    /// with [`PrsMed::backward`], which merges the checkpointed blocks' parameter gradients.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.set_checkpointing(if on { Checkpointing::All } else { Checkpointing::Off });
    }

    /// Gradient checkpointing of the parts `mode` names.
    pub fn set_checkpointing(&mut self, mode: Checkpointing) {
        self.checkpointing = mode;
        self.checkpointer = (mode != Checkpointing::Off).then(|| Checkpointer::new(&self.trained));
    }

    pub fn gradient_checkpointing(&self) -> bool {
        self.checkpointer.is_some()
    }

    pub fn checkpointing(&self) -> Checkpointing {
        self.checkpointing
    }

    /// Gradients of `loss` for training: candle's backward, the parameter gradients of
    /// checkpointed blocks merged in, and every gradient detached so that the activations are
    /// freed now rather than when the store is dropped (`nn::checkpoint::detach_grads`).
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        self.merge_checkpoint_grads(&mut grads)?;
        detach_grads(&mut grads);
        Ok(grads)
    }

    /// [`Self::backward`] of a [`Self::forward_staged`] graph, one part at a time: the losses,
    /// LM head, decoder and classifier first, then the LLM, then TinySAM, each part's graph freed
    /// before the next part's backward (and its checkpoint recomputations) runs. The caller must
    /// have dropped every other tensor of the forward (its `Outputs` and loss terms), or their
    /// graphs stay alive. The gradients equal [`Self::backward`]'s: each part receives the same
    /// gradient of its output, and no parameter is shared between parts.
    pub fn backward_staged(&self, loss: Tensor, cuts: GraphCuts) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        drop(loss);
        detach_grads(&mut grads);
        crate::phases::mark(&self.device, "backward: losses, LM head, decoder, classifier");
        for GraphCut { part, output, leaf } in cuts.0 {
            let Some(g) = grads.remove(leaf.as_tensor()) else { continue };
            drop(leaf);
            let _named = part.enter();
            let mut part_grads = backward_from(&output, &g)?;
            drop((output, g));
            detach_grads(&mut part_grads);
            grads.extend(part_grads)?;
            crate::phases::mark(&self.device, part.backward_phase());
        }
        self.merge_checkpoint_grads(&mut grads)?;
        detach_grads(&mut grads);
        Ok(grads)
    }

    /// Moves the parameter gradients collected by checkpointed blocks into `grads`.
    pub fn merge_checkpoint_grads(&self, grads: &mut candle_core::backprop::GradStore) -> Result<()> {
        match &self.checkpointer {
            Some(c) => c.merge_into(grads),
            None => Ok(()),
        }
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of image vectors spliced into the prompt (576 for CLIP-L/336).
    pub fn image_tokens(&self) -> Result<usize> {
        let v = self.spec.llava.vision_config()?;
        Ok((v.image_size / v.patch_size).pow(2))
    }

    /// The position budget of one sequence (see [`crate::tokenizer::check_prompt_length`]).
    pub fn prompt_limits(&self) -> Result<crate::tokenizer::PromptLimits> {
        self.spec.llava.prompt_limits()
    }

    /// (B,3,Sc,Sc) -> (B,N,H) projected image embeddings in the compute dtype.
    pub fn encode_image(&self, clip_pixels: &Tensor) -> Result<Tensor> {
        let feats = self.clip.forward(&clip_pixels.to_dtype(self.dtype)?)?;
        self.projector.forward(&feats)
    }

    /// Lays out [before, image, after, answer (+EOS when `train`)] per sample, right-padded.
    pub fn llm_inputs(&self, prompts: &[PromptIds], image_embeds: &Tensor, train: bool) -> Result<LlmInputs> {
        let (b, n, _) = image_embeds.dims3()?;
        ensure!(prompts.len() == b, "{} prompts for {b} images", prompts.len());
        let a = prompts[0].before_image.len();
        ensure!(
            prompts.iter().all(|p| p.before_image.len() == a),
            "every prompt must have the same text before the image marker"
        );
        let len = |p: &PromptIds| a + n + p.after_image.len() + if train { p.answer.len() + 1 } else { 0 };
        // The last guard for every path (callers check each input by name first, with
        // `tokenizer::check_prompt_length`): positions past the limit were never trained.
        let max_pos = self.llm.config().max_position_embeddings;
        if let Some((i, l)) = prompts.iter().map(len).enumerate().find(|&(_, l)| l > max_pos) {
            bail!(
                "sample {i} of the batch needs {l} LLM positions (its prompt{} and {n} image vectors) but \
                 max_position_embeddings is {max_pos}: shorten the question",
                if train { ", answer, EOS" } else { "" }
            );
        }
        let t = prompts.iter().map(len).max().unwrap_or(0);
        let mut ids = vec![PAD_ID; b * t];
        let mut valid = vec![0f32; b * t];
        let mut prompt = vec![0f32; b * t];
        let (mut lm_rows, mut lm_targets) = (vec![], vec![]);
        for (i, p) in prompts.iter().enumerate() {
            let row = &mut ids[i * t..(i + 1) * t];
            row[..a].copy_from_slice(&p.before_image);
            let s = a + n;
            row[s..s + p.after_image.len()].copy_from_slice(&p.after_image);
            let prompt_end = s + p.after_image.len();
            // What the mask decoder attends to (its key mask; the decoder cannot check it on a
            // GPU without stalling the step).
            ensure!(prompt_end > 0, "sample {i} has no prompt position for the mask decoder to attend to");
            let li = len(p);
            if train {
                ensure!(!p.answer.is_empty(), "sample {i} has an empty answer");
                row[prompt_end..prompt_end + p.answer.len()].copy_from_slice(&p.answer);
                row[li - 1] = EOS_ID;
                // Position q predicts token q + 1: answer tokens and EOS are supervised.
                for q in prompt_end - 1..li - 1 {
                    lm_rows.push((i * t + q) as u32);
                    lm_targets.push(row[q + 1]);
                }
            }
            valid[i * t..i * t + li].iter_mut().for_each(|v| *v = 1.0);
            prompt[i * t..i * t + prompt_end].iter_mut().for_each(|v| *v = 1.0);
        }
        let dev = &self.device;
        let ids = Tensor::from_vec(ids, (b, t), dev)?;
        let text = self.llm.embed(&ids)?;
        let embeds = splice_rows(&text, image_embeds, a)?;
        let position_ids = Tensor::arange(0u32, t as u32, dev)?.unsqueeze(0)?.repeat((b, 1))?;
        Ok(LlmInputs {
            embeds,
            key_valid: Tensor::from_vec(valid, (b, t), dev)?,
            position_ids,
            prompt_valid: Tensor::from_vec(prompt, (b, t), dev)?,
            lm_rows,
            lm_targets,
        })
    }

    /// Full forward for training and evaluation (teacher-forced answer when `train`).
    pub fn forward(&self, batch: &ModelBatch, train: bool) -> Result<Outputs> {
        self.forward_cut(batch, train, None)
    }

    /// A training forward whose graph is cut after the LLM and after TinySAM, for
    /// [`Self::backward_staged`]: the peak of a step is then the largest part's backward with
    /// only the activations still needed, not every part's activations at once.
    pub fn forward_staged(&self, batch: &ModelBatch) -> Result<(Outputs, GraphCuts)> {
        let mut cuts = GraphCuts::default();
        let out = self.forward_cut(batch, true, Some(&mut cuts))?;
        Ok((out, cuts))
    }

    fn forward_cut(&self, batch: &ModelBatch, train: bool, cuts: Option<&mut GraphCuts>) -> Result<Outputs> {
        let image = self.encode_image(&batch.clip_pixels)?;
        crate::phases::mark(&self.device, "CLIP + projector");
        self.forward_parts(batch, &image, train, cuts)
    }

    /// [`Self::forward`] from image embeddings already computed by [`Self::encode_image`].
    pub fn forward_from_image(&self, batch: &ModelBatch, image: &Tensor, train: bool) -> Result<Outputs> {
        self.forward_parts(batch, image, train, None)
    }

    fn forward_parts(
        &self,
        batch: &ModelBatch,
        image: &Tensor,
        train: bool,
        mut cuts: Option<&mut GraphCuts>,
    ) -> Result<Outputs> {
        let mark = |name| crate::phases::mark(&self.device, name);
        let mut cut = |part, t: Tensor| match cuts.as_deref_mut() {
            Some(c) => c.cut(part, t),
            None => Ok(t),
        };
        let inp = self.llm_inputs(&batch.prompts, image, train)?;
        let ck_llm = self.checkpointer.as_ref().filter(|_| self.checkpointing.llm());
        let ck = self.checkpointer.as_ref().filter(|_| self.checkpointing.vision());
        let hidden =
            self.llm.forward_embeds_with(&inp.embeds, Some(&inp.key_valid), &inp.position_ids, None, ck_llm)?;
        let hidden = cut(BackwardPart::Llm, hidden)?;
        mark("LLM forward");
        let (answer_logits, answer_targets) = if train {
            let (b, t, h) = hidden.dims3()?;
            let rows = Tensor::new(inp.lm_rows.as_slice(), &self.device)?;
            let sel = hidden.reshape((b * t, h))?.index_select(&rows, 0)?;
            let targets = Tensor::new(inp.lm_targets.as_slice(), &self.device)?;
            (Some(self.llm.logits(&sel)?), Some(targets))
        } else {
            (None, None)
        };
        mark("LM head");
        let feats = self.tinysam.forward_with(&batch.sam_pixels.to_dtype(self.mask_dtype())?, ck)?;
        let feats = cut(BackwardPart::TinySam, feats)?;
        mark("TinySAM forward");
        let mask_logits = self.decoder.forward(&feats, &hidden, &inp.prompt_valid)?;
        mark("mask decoder forward");
        let class_logits = self.classifier.forward(&feats)?;
        mark("classifier");
        Ok(Outputs { mask_logits, class_logits, answer_logits, answer_targets })
    }

    /// The dtype of the mask branch (TinySAM, decoder, classifier): `model.mask_precision`.
    pub fn mask_dtype(&self) -> DType {
        match self.spec.mask_precision {
            MaskPrecision::Compute => self.dtype,
            MaskPrecision::F32 => DType::F32,
        }
    }

    /// Loss terms of a training forward (sums over this batch divided by `norm`'s counts).
    pub fn losses(&self, batch: &ModelBatch, out: &Outputs, w: &LossWeights) -> Result<Losses> {
        self.losses_normed(batch, out, w, None)
    }

    pub fn losses_normed(
        &self,
        batch: &ModelBatch,
        out: &Outputs,
        w: &LossWeights,
        norm: Option<LossNorm>,
    ) -> Result<Losses> {
        let masks = batch.masks.as_ref().ok_or_else(|| anyhow::anyhow!("training batch without masks"))?;
        let (logits, targets) = match (&out.answer_logits, &out.answer_targets) {
            (Some(l), Some(t)) => (l, t),
            _ => bail!("training losses need a forward with train = true"),
        };
        let norm = norm.unwrap_or(LossNorm { images: masks.dim(0)?, tokens: targets.dim(0)? });
        let per_image = 1.0 / norm.images as f64;
        let seg = (structure_loss_per_image(&out.mask_logits, masks, w.compat)?.sum_all()? * per_image)?;
        let lm = (cross_entropy_sum(logits, targets)? / norm.tokens as f64)?;
        let cls = match &batch.modality {
            Some(m) => (cross_entropy_sum(&out.class_logits, m)? * per_image)?,
            None => Tensor::zeros((), DType::F32, &self.device)?,
        };
        let mut total = ((&seg * w.seg)? + (&lm * w.lm)?)?;
        if w.cls > 0.0 && batch.modality.is_some() {
            total = (total + (&cls * w.cls)?)?;
        }
        Ok(Losses { total, seg, lm, cls })
    }
}
