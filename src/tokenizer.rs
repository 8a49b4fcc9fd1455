//! Mistral's SentencePiece `tokenizer.model` as a `tokenizers` BPE, and PRS-Med's LLaVA-style prompt.
//!
//! LLaVA-Med ships only `tokenizer.model`, so [`from_sentencepiece`] converts it the way transformers
//! 4.40 does for Llama-family models (reference section 7): BPE with byte fallback, a "▁" prepended to
//! the text and spaces turned into "▁", no pre-tokenizer (the whole text is one BPE word), `<s>` added
//! in front. It matches SentencePiece itself on every string of the fixture set.
//!
//! Literal special-token text: a user string containing `</s>` (or `<s>`, `<unk>`) is encoded as
//! plain text, exactly as SentencePiece does, never as the special token. Hugging Face's tokenizers
//! would turn it into EOS, which lets a question end the sequence early or fake a turn boundary; the
//! special ids are only ever added by code (BOS here, EOS by the trainer). [`load`] applies the same
//! rule to a `tokenizer.json`, so both sources encode identically.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use sentencepiece_model::{SentencePieceModel, Type as PieceType};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, Tokenizer};

/// `<unk>`; also the padding id (Mistral has no pad token; LLaVA pads with `<unk>`).
pub const UNK_ID: u32 = 0;
/// `<s>`, put in front of every sequence.
pub const BOS_ID: u32 = 1;
/// `</s>`, appended to the answer by the trainer and the stop token of generation.
pub const EOS_ID: u32 = 2;
/// Padding id used by LLaVA for Mistral.
pub const PAD_ID: u32 = UNK_ID;
/// The image placeholder in the prompt; its tokens are replaced by the projected image vectors.
pub const IMAGE_MARKER: &str = "<image>";
/// The PRS-Med authors' training prompt. The inference prompt is the text before `{answer}`.
pub const DEFAULT_PROMPT_TEMPLATE: &str = "<image>\n### User: {question} \n### Assistant: \n{answer}";

const SPIECE_UNDERLINE: &str = "▁";
/// A private-use character: absent from the vocabulary, so byte fallback turns it into byte tokens
/// that merge with nothing. Encoding it in front of a text isolates the text from the "▁" prefix.
const BARRIER: char = '\u{E000}';

fn tk<T>(r: tokenizers::Result<T>) -> Result<T> {
    r.map_err(|e| anyhow!(e))
}

/// Converts a SentencePiece BPE model file (e.g. LLaVA-Med's `tokenizer.model`) into a `tokenizers`
/// tokenizer, following the verified recipe of reference section 7.
pub fn from_sentencepiece(path: &Path) -> Result<Tokenizer> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read SentencePiece tokenizer model {}", path.display()))?;
    let spm = SentencePieceModel::from_slice(&bytes).map_err(|e| {
        anyhow!("{} is not a valid SentencePiece model (protobuf decode failed: {e}); re-download it", path.display())
    })?;
    let bad = |why: String| anyhow!("{} is not a usable SentencePiece BPE model: {why}", path.display());
    let pieces = spm.pieces();
    if pieces.is_empty() {
        return Err(bad("it has no pieces (corrupt or not a tokenizer.model)".into()));
    }
    let trainer = spm.trainer().ok_or_else(|| bad("no trainer_spec".into()))?;
    if trainer.model_type() != sentencepiece_model::ModelType::Bpe {
        return Err(bad(format!("model type {:?}, only BPE is supported", trainer.model_type())));
    }
    let (add_dummy_prefix, byte_fallback) =
        (spm.normalizer().is_none_or(|n| n.add_dummy_prefix()), trainer.byte_fallback());
    if let Some(n) = spm.normalizer() {
        // Only the identity normalizer is reproduced; NFKC & co would need the precompiled charsmap.
        if n.name() != "identity" || !n.precompiled_charsmap().is_empty() || n.remove_extra_whitespaces() {
            return Err(bad(format!(
                "normalizer '{}' (remove_extra_whitespaces {}) is not supported, only 'identity'",
                n.name(),
                n.remove_extra_whitespaces()
            )));
        }
    }

    // Step 1: vocabulary in id order.
    let mut vocab: HashMap<&str, u32> = HashMap::with_capacity(pieces.len());
    for (id, p) in pieces.iter().enumerate() {
        if vocab.insert(p.piece(), id as u32).is_some() {
            return Err(bad(format!("piece {:?} appears twice", p.piece())));
        }
    }
    // Step 2: every split of a piece into two known pieces is a merge ranked by that piece's score;
    // within a piece, candidates are ordered by the ids of their halves.
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    let mut local: Vec<(u32, u32, &str, &str)> = Vec::new();
    for p in pieces {
        let s = p.piece();
        local.clear();
        for (i, _) in s.char_indices().skip(1) {
            let (l, r) = s.split_at(i);
            if let (Some(&il), Some(&ir)) = (vocab.get(l), vocab.get(r)) {
                local.push((il, ir, l, r));
            }
        }
        local.sort_unstable_by_key(|&(il, ir, _, _)| (il, ir));
        merges.extend(local.iter().map(|&(_, _, l, r)| (l, r, p.score())));
    }
    // Step 3: stable sort by score, highest first (ties keep the order above).
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));

    let unk = pieces
        .iter()
        .find(|p| p.r#type() == PieceType::Unknown)
        .map(|p| p.piece().to_string())
        .ok_or_else(|| bad("no <unk> piece".into()))?;
    let bpe_vocab: Vocab = vocab.iter().map(|(k, &v)| (k.to_string(), v)).collect();
    let bpe_merges = merges.iter().map(|&(l, r, _)| (l.to_string(), r.to_string())).collect();
    let bpe = tk(BPE::builder()
        .vocab_and_merges(bpe_vocab, bpe_merges)
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(byte_fallback)
        .build())
    .with_context(|| format!("building the BPE model from {}", path.display()))?;

    let mut tok = Tokenizer::new(bpe);
    let mut norms: Vec<NormalizerWrapper> = Vec::new();
    if add_dummy_prefix {
        norms.push(Prepend::new(SPIECE_UNDERLINE.into()).into());
    }
    norms.push(tk(Replace::new(" ", SPIECE_UNDERLINE))?.into());
    tk(tok.with_normalizer(Some(NormalizerSequence::new(norms))))?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        DecoderWrapper::Replace(tk(Replace::new(SPIECE_UNDERLINE, " "))?),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_dummy_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(decoders)));

    // Control pieces (<s>, </s>) and <unk> are special tokens; user-defined pieces are matched in the
    // text like SentencePiece does. Added in id order so their ids are the SentencePiece ids.
    let specials: Vec<AddedToken> = pieces
        .iter()
        .filter(|p| matches!(p.r#type(), PieceType::Control | PieceType::Unknown))
        .map(|p| AddedToken::from(p.piece(), true).normalized(false))
        .collect();
    tk(tok.add_special_tokens(specials))?;
    let user: Vec<AddedToken> = pieces
        .iter()
        .filter(|p| p.r#type() == PieceType::UserDefined)
        .map(|p| AddedToken::from(p.piece(), false).normalized(false))
        .collect();
    tk(tok.add_tokens(user))?;

    let bos = usize::try_from(trainer.bos_id()).ok().and_then(|i| pieces.get(i));
    if let Some(bos) = bos {
        let b = bos.piece();
        let post = TemplateProcessing::builder()
            .try_single(format!("{b}:0 $A:0"))
            .and_then(|t| t.try_pair(format!("{b}:0 $A:0 {b}:1 $B:1")))
            .map_err(|e| anyhow!("post-processor template: {e}"))?
            .special_tokens(vec![(b.to_string(), vocab[b])])
            .build()
            .map_err(|e| anyhow!("post-processor: {e}"))?;
        tok.with_post_processor(Some(post));
    }
    tok.set_encode_special_tokens(true);
    Ok(tok)
}

/// Loads the tokenizer of a model directory: `tokenizer.json` when present (faster, and what a
/// previous conversion may have saved), else a conversion of `tokenizer.model`. Checks the special ids.
pub fn load(model_dir: &Path) -> Result<Tokenizer> {
    let json = model_dir.join("tokenizer.json");
    let spm = model_dir.join("tokenizer.model");
    let tok = if json.is_file() {
        load_json(&json)?
    } else if spm.is_file() {
        from_sentencepiece(&spm)?
    } else if !model_dir.is_dir() {
        bail!("model directory {} does not exist", model_dir.display())
    } else {
        bail!("{} has neither tokenizer.json nor tokenizer.model", model_dir.display())
    };
    check_special_ids(&tok).with_context(|| format!("tokenizer of {}", model_dir.display()))?;
    Ok(tok)
}

/// Like [`load`], but `path` may also be a `tokenizer.json` (any `*.json`) or a SentencePiece file.
pub fn load_path(path: &Path) -> Result<Tokenizer> {
    if path.is_dir() {
        return load(path);
    }
    let tok = if path.extension().is_some_and(|e| e == "json") { load_json(path)? } else { from_sentencepiece(path)? };
    check_special_ids(&tok).with_context(|| format!("tokenizer {}", path.display()))?;
    Ok(tok)
}

fn load_json(path: &Path) -> Result<Tokenizer> {
    let mut tok = Tokenizer::from_file(path).map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
    // Not stored in tokenizer.json: re-apply the "special-token text is plain text" rule.
    tok.set_encode_special_tokens(true);
    Ok(tok)
}

/// Errors unless `<unk>`, `<s>`, `</s>` have the ids PRS-Med (Mistral) uses.
pub fn check_special_ids(tok: &Tokenizer) -> Result<()> {
    for (piece, want) in [("<unk>", UNK_ID), ("<s>", BOS_ID), ("</s>", EOS_ID)] {
        let got = tok.token_to_id(piece);
        ensure!(got == Some(want), "{piece} has id {got:?}, expected {want} (not a Mistral/Llama tokenizer?)");
    }
    Ok(())
}

fn encode(tok: &Tokenizer, text: &str, bos: bool) -> Result<Vec<u32>> {
    let enc = tk(tok.encode(text, bos)).with_context(|| format!("encoding {text:?}"))?;
    Ok(enc.get_ids().to_vec())
}

/// Ids of `text` as it reads when it continues earlier text: no BOS and no "▁" prepended (the
/// normalizer's dummy prefix belongs to the start of a sequence). A leading space stays a "▁".
pub fn encode_continuation(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let barrier = encode(tok, &BARRIER.to_string(), false)?;
    let ids = encode(tok, &format!("{BARRIER}{text}"), false)?;
    ensure!(
        ids.starts_with(&barrier),
        "tokenizer merges the barrier character U+E000 with {text:?}: cannot encode it as a continuation"
    );
    Ok(ids[barrier.len()..].to_vec())
}

/// Token ids of one PRS-Med prompt. The LLM input is `before_image`, then the image vectors, then
/// `after_image`, then `answer` (the trainer appends [`EOS_ID`] to the answer). Training supervises
/// `answer` (+ EOS) only; inference feeds the first three and generates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptIds {
    /// Starts with BOS (the text before the marker; the empty string for the default template).
    pub before_image: Vec<u32>,
    /// Text between the marker and the answer, without a BOS.
    pub after_image: Vec<u32>,
    /// What the model must generate after the inference prompt; empty without an answer.
    pub answer: Vec<u32>,
}

impl PromptIds {
    /// Number of text tokens before the answer (excluding the image vectors).
    pub fn prompt_text_len(&self) -> usize {
        self.before_image.len() + self.after_image.len()
    }

    /// All text ids with the image position marked by `marker` (LLaVA uses -200): for inspection.
    pub fn with_marker(&self, marker: i64) -> Vec<i64> {
        let ids = |v: &[u32]| v.iter().map(|&i| i as i64).collect::<Vec<_>>();
        let mut out = ids(&self.before_image);
        out.push(marker);
        out.extend(ids(&self.after_image));
        out.extend(ids(&self.answer));
        out
    }
}

/// A prompt template split at its placeholders: `head{question}mid{answer}tail`.
struct Template<'a> {
    head: &'a str,
    mid: &'a str,
    tail: &'a str,
}

fn parse_template(template: &str) -> Result<Template<'_>> {
    let once = |ph: &str| -> Result<usize> {
        let n = template.matches(ph).count();
        ensure!(n == 1, "prompt template must contain {ph} exactly once (found {n}): {template:?}");
        Ok(template.find(ph).unwrap_or_default())
    };
    let (q, a) = (once("{question}")?, once("{answer}")?);
    ensure!(q < a, "prompt template must put {{question}} before {{answer}}: {template:?}");
    let (head, rest) = template.split_at(q);
    let (mid, tail) = rest["{question}".len()..].split_at(a - q - "{question}".len());
    Ok(Template { head, mid, tail: &tail["{answer}".len()..] })
}

/// The prompt text: the template with the question filled in, cut before `{answer}` when `answer` is
/// None (the inference prompt), else with the answer and whatever follows `{answer}` (the training text).
pub fn render_prompt(template: &str, question: &str, answer: Option<&str>) -> Result<String> {
    let t = parse_template(template)?;
    let mut s = format!("{}{question}{}", t.head, t.mid);
    if let Some(a) = answer {
        s.push_str(a);
        s.push_str(t.tail);
    }
    Ok(s)
}

/// Encodes a PRS-Med prompt as LLaVA's `tokenizer_image_token` does: the text is split at the single
/// `<image>` marker, the first chunk is encoded with BOS, the second without (each chunk gets the
/// tokenizer's leading "▁", as in LLaVA).
///
/// Answer boundary: the training text (prompt + answer) is encoded as one chunk, as the authors did.
/// When the inference prompt's ids are a prefix of those ids (always the case for the default
/// template: the answer follows a newline, a byte token that merges with nothing), `answer` is the
/// rest, so training sees exactly the canonical encoding of its text. When a token straddles the
/// boundary (e.g. a template ending in "Assistant: {answer}": the trailing space and the answer's
/// first word merge into "▁The"), the prompt ids are kept as the inference prompt encodes them, since
/// that is what the model sees when it generates, and `answer` is the answer text encoded as a
/// continuation ([`encode_continuation`]: no BOS, no added "▁"). Either way the prompt ids never
/// depend on the answer, and decoding prompt + answer gives back the training text.
pub fn encode_prompt(tok: &Tokenizer, template: &str, question: &str, answer: Option<&str>) -> Result<PromptIds> {
    ensure!(!question.trim().is_empty(), "empty question");
    let t = parse_template(template)?;
    let prompt = render_prompt(template, question, None)?;
    let n_markers = prompt.matches(IMAGE_MARKER).count();
    ensure!(
        n_markers == 1,
        "the prompt must contain the image marker {IMAGE_MARKER} exactly once before the answer, found {n_markers} \
         (template {template:?}, question {question:?})"
    );
    let (chunk0, chunk1) = prompt.split_once(IMAGE_MARKER).unwrap_or_default();
    let before_image = encode(tok, chunk0, true)?;
    let after_image = encode(tok, chunk1, false)?;
    let answer = match answer {
        None => Vec::new(),
        Some(a) => {
            let rest = format!("{a}{}", t.tail);
            ensure!(!rest.contains(IMAGE_MARKER), "the answer part must not contain {IMAGE_MARKER}: {rest:?}");
            let full = encode(tok, &format!("{chunk1}{rest}"), false)?;
            match full.strip_prefix(after_image.as_slice()) {
                Some(tail) => tail.to_vec(),
                None => encode_continuation(tok, &rest)?,
            }
        }
    };
    Ok(PromptIds { before_image, after_image, answer })
}

/// The position budget of one LLM sequence: the image vectors spliced in at the marker and the
/// LLM's `max_position_embeddings`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptLimits {
    /// Image vectors per image ((image_size / patch_size)^2: 576 for CLIP-L/336).
    pub image_tokens: usize,
    /// Positions the LLM was trained for (`max_position_embeddings` of its config).
    pub max_positions: usize,
}

/// Positions the LLM input of `prompt` takes: text before the image, the image vectors, text
/// after it, and, when the prompt carries an answer (training), the answer and EOS.
pub fn prompt_positions(prompt: &PromptIds, image_tokens: usize) -> usize {
    let answer = if prompt.answer.is_empty() { 0 } else { prompt.answer.len() + 1 };
    prompt.prompt_text_len() + image_tokens + answer
}

/// Refuses a prompt whose LLM input exceeds the model's positions, and returns the positions
/// left after it (room to generate, for an inference prompt).
///
/// Refused rather than truncated: cutting the question changes what is asked, cutting a
/// training text drops the answer the loss needs, and the mask decoder reads the prompt
/// positions; beyond `max_position_embeddings` the rotary positions were never trained. A
/// prompt this long is a data error (a pasted report, a CSV quote that swallowed rows). The
/// caller names the input (`with_context`: the CSV row, the predict item).
pub fn check_prompt_length(prompt: &PromptIds, limits: PromptLimits) -> Result<usize> {
    let used = prompt_positions(prompt, limits.image_tokens);
    if used <= limits.max_positions {
        return Ok(limits.max_positions - used);
    }
    let answer =
        if prompt.answer.is_empty() { String::new() } else { format!(" + {} answer and EOS", prompt.answer.len() + 1) };
    bail!(
        "the prompt is too long: it needs {used} positions ({} text + {} image{answer}) but the model takes at most \
         {} (max_position_embeddings); shorten the question",
        prompt.prompt_text_len(),
        limits.image_tokens,
        limits.max_positions
    )
}
