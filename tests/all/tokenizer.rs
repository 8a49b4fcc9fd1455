//! Tokenizer conversion (SentencePiece -> tokenizers BPE) against SentencePiece's own ids, prompt
//! encoding against LLaVA's `tokenizer_image_token`, error paths, and `prs tokenize`.
//! Fixture: tests/fixtures/tokenizer/cases.json from scripts/fixtures/gen_tokenizer.py.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clap::Parser;
use prs::commands::tokenize::{run_to, TokenizeArgs};
use prs::tokenizer::{
    self, encode_continuation, encode_prompt, from_sentencepiece, render_prompt, PromptIds, BOS_ID,
    DEFAULT_PROMPT_TEMPLATE, EOS_ID, PAD_ID, UNK_ID,
};
use serde_json::Value;
use tokenizers::Tokenizer;

/// The real Mistral v1 tokenizer.model: $PRS_TOKENIZER_MODEL (set by `make test`), else the
/// `make assets` download. Missing = failure, never a skip.
fn model_path() -> PathBuf {
    let p = match std::env::var_os("PRS_TOKENIZER_MODEL") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/assets/tokenizer.model.v1"),
    };
    assert!(
        p.is_file(),
        "Mistral tokenizer.model not found at {} (PRS_TOKENIZER_MODEL or .cache/assets): run `make assets`",
        p.display()
    );
    p
}

fn tok() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| from_sentencepiece(&model_path()).expect("converting tokenizer.model"))
}

fn fixture() -> &'static Value {
    static FIX: OnceLock<Value> = OnceLock::new();
    FIX.get_or_init(|| {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/cases.json");
        serde_json::from_str(&std::fs::read_to_string(&p).expect("read cases.json")).expect("parse cases.json")
    })
}

fn cases() -> Vec<(String, Vec<u32>)> {
    fixture()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            (c["text"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

fn ids(t: &Tokenizer, text: &str) -> Vec<u32> {
    t.encode(text, true).unwrap().get_ids().to_vec()
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

#[test]
fn known_encodings_from_reference() {
    let t = tok();
    assert_eq!(ids(t, "3"), vec![1, 28705, 28770]);
    assert_eq!(
        ids(t, "The MRI demonstrates a hyperintense lesion in the right temporal lobe, consistent with glioblastoma."),
        vec![
            1, 415, 351, 8671, 6695, 1002, 264, 11503, 501, 1058, 1514, 296, 297, 272, 1103, 26569, 305, 8898, 28725,
            10652, 395, 9973, 598, 4081, 6943, 28723
        ]
    );
    // Digits always split one by one, each number led by a lone "▁".
    assert_eq!(ids(t, "2024"), vec![1, 28705, 28750, 28734, 28750, 28781]);
}

#[test]
fn vocab_merges_and_special_ids() {
    let t = tok();
    assert_eq!(t.get_vocab_size(true), 32000);
    assert_eq!(t.get_vocab_size(false), 32000);
    assert_eq!((UNK_ID, BOS_ID, EOS_ID, PAD_ID), (0, 1, 2, 0));
    tokenizer::check_special_ids(t).unwrap();
    assert_eq!(t.id_to_token(13).as_deref(), Some("<0x0A>"));
    // The reference conversion has 58,980 merges.
    let json: Value = serde_json::from_str(&t.to_string(false).unwrap()).unwrap();
    assert_eq!(json["model"]["merges"].as_array().unwrap().len(), 58_980);
    assert_eq!(json["model"]["byte_fallback"], Value::Bool(true));
}

#[test]
fn all_fixture_cases_match_sentencepiece() {
    let t = tok();
    let cases = cases();
    assert!(cases.len() >= 300, "fixture has {} cases", cases.len());
    let bad: Vec<_> = cases
        .iter()
        .filter_map(|(text, want)| {
            let got = ids(t, text);
            (&got != want).then(|| format!("{text:?}: got {got:?}, want {want:?}"))
        })
        .collect();
    assert!(bad.is_empty(), "{} of {} cases differ:\n{}", bad.len(), cases.len(), bad[..bad.len().min(10)].join("\n"));
}

#[test]
fn literal_special_token_text_is_plain_text() {
    let t = tok();
    for text in ["</s>", "a </s> b", "<s>", "<unk>"] {
        let got = ids(t, text);
        assert_eq!(got[0], BOS_ID);
        assert!(!got[1..].iter().any(|&i| i <= EOS_ID), "{text:?} -> {got:?}");
    }
    // The fixture records where Hugging Face differs: only on such texts, where it emits the special id.
    for c in fixture()["cases"].as_array().unwrap().iter().filter(|c| c.get("hf_ids").is_some()) {
        let text = c["text"].as_str().unwrap();
        assert!(["<s>", "</s>", "<unk>"].iter().any(|s| text.contains(s)), "unexpected HF difference on {text:?}");
    }
}

#[test]
fn decode_round_trips_fixture_cases() {
    let t = tok();
    let mut lossy = 0;
    for (c, (text, ids)) in fixture()["cases"].as_array().unwrap().iter().zip(cases()) {
        // SentencePiece's own decoding; it differs from the text only where the text has a literal "▁".
        let want = match c.get("decoded") {
            Some(d) => {
                lossy += 1;
                assert_eq!(d.as_str().unwrap(), text.replace('▁', " "));
                d.as_str().unwrap().to_string()
            }
            None => text,
        };
        assert_eq!(t.decode(&ids, true).unwrap(), want, "decode of {ids:?}");
    }
    assert!(lossy < 50, "{lossy} lossy cases");
}

#[test]
fn tokenizer_json_is_preferred_and_equivalent() {
    let dir = tempfile::tempdir().unwrap();
    tok().save(dir.path().join("tokenizer.json"), false).unwrap();
    // A broken tokenizer.model next to it: loading succeeds only if tokenizer.json wins.
    std::fs::write(dir.path().join("tokenizer.model"), b"not a model").unwrap();
    let loaded = tokenizer::load(dir.path()).unwrap();
    for (text, want) in cases() {
        assert_eq!(ids(&loaded, &text), want, "tokenizer.json on {text:?}");
    }
    // load_path accepts the file itself too.
    let direct = tokenizer::load_path(&dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(ids(&direct, "a </s> b"), ids(tok(), "a </s> b"));
    // Without tokenizer.json the (broken) tokenizer.model is used and its error names it.
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let e = err_text(tokenizer::load(dir.path()));
    assert!(e.contains("tokenizer.model") && e.contains("not a valid SentencePiece model"), "{e}");
}

#[test]
fn load_converts_tokenizer_model_in_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(model_path(), dir.path().join("tokenizer.model")).unwrap();
    let loaded = tokenizer::load(dir.path()).unwrap();
    assert_eq!(ids(&loaded, "Where is the tumour?"), ids(tok(), "Where is the tumour?"));
    let e = err_text(tokenizer::load(&dir.path().join("nope")));
    assert!(e.contains("does not exist"), "{e}");
    std::fs::remove_file(dir.path().join("tokenizer.model")).unwrap();
    let e = err_text(tokenizer::load(dir.path()));
    assert!(e.contains("neither tokenizer.json nor tokenizer.model"), "{e}");
}

#[test]
fn missing_and_corrupt_model_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.model");
    let e = err_text(from_sentencepiece(&missing));
    assert!(e.contains("missing.model") && e.contains("cannot read"), "{e}");

    let bytes = std::fs::read(model_path()).unwrap();
    let truncated = dir.path().join("truncated.model");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2 + 7]).unwrap();
    let e = err_text(from_sentencepiece(&truncated));
    assert!(e.contains("truncated.model") && e.contains("not a valid SentencePiece model"), "{e}");

    // Garbage: deterministic pseudo-random bytes, and plain text.
    let mut x = 0x1234_5678_u32;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    for (name, data) in [("noise.model", noise), ("text.model", b"hello, I am not a tokenizer\n".to_vec())] {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        let e = err_text(from_sentencepiece(&p));
        assert!(e.contains(name), "{e}");
    }
    let empty = dir.path().join("empty.model");
    std::fs::write(&empty, b"").unwrap();
    let e = err_text(from_sentencepiece(&empty));
    assert!(e.contains("empty.model") && e.contains("no pieces"), "{e}");
}

fn prompt_fixture() -> Vec<(String, String, Vec<i64>, Vec<i64>)> {
    let v = |x: &Value| x.as_array().unwrap().iter().map(|i| i.as_i64().unwrap()).collect::<Vec<_>>();
    fixture()["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["question"].as_str().unwrap().to_string(),
                p["answer"].as_str().unwrap().to_string(),
                v(&p["inference_ids"]),
                v(&p["training_ids"]),
            )
        })
        .collect()
}

#[test]
fn prompt_ids_match_llava_tokenizer_image_token() {
    assert_eq!(fixture()["prompt_template"].as_str(), Some(DEFAULT_PROMPT_TEMPLATE));
    let prompts = prompt_fixture();
    assert!(prompts.len() >= 5);
    for (q, a, infer_ref, train_ref) in prompts {
        let infer = encode_prompt(tok(), DEFAULT_PROMPT_TEMPLATE, &q, None).unwrap();
        let train = encode_prompt(tok(), DEFAULT_PROMPT_TEMPLATE, &q, Some(&a)).unwrap();
        assert_eq!(infer.with_marker(-200), infer_ref, "inference prompt for {q:?}");
        assert_eq!(train.with_marker(-200), train_ref, "training text for {q:?} / {a:?}");
        assert_eq!(infer.before_image, vec![BOS_ID]);
        assert!(infer.answer.is_empty());
    }
}

#[test]
fn inference_prompt_is_a_prefix_of_the_training_prompt() {
    let t = tok();
    let pairs = [
        ("Where is the tumour in this CT image?", "The tumour is at the top right."),
        ("Where is it?", " It is near the center."),
        ("Where is the polyp?", "\n\nbottom left"),
        ("What about 3 lesions?", "12 mm"),
        ("病变在哪里？", "左上方"),
    ];
    for (q, a) in pairs {
        let infer = encode_prompt(t, DEFAULT_PROMPT_TEMPLATE, q, None).unwrap();
        let train = encode_prompt(t, DEFAULT_PROMPT_TEMPLATE, q, Some(a)).unwrap();
        assert_eq!((&train.before_image, &train.after_image), (&infer.before_image, &infer.after_image));
        assert!(!train.answer.is_empty());
        // Default template: the boundary is clean, so prompt + answer is the canonical encoding.
        let text = render_prompt(DEFAULT_PROMPT_TEMPLATE, q, Some(a)).unwrap();
        let after_marker = text.split_once("<image>").unwrap().1;
        let canonical = t.encode(after_marker, false).unwrap().get_ids().to_vec();
        assert_eq!([train.after_image.clone(), train.answer.clone()].concat(), canonical, "{q:?} / {a:?}");
        assert!(!train.answer.contains(&EOS_ID), "EOS is the trainer's job");
        let back = t.decode(&[train.after_image.clone(), train.answer.clone()].concat(), true).unwrap();
        assert_eq!(back, after_marker);
        assert_eq!(t.decode(&train.answer, true).unwrap().trim_start(), a.trim_start());
    }
}

#[test]
fn straddling_boundary_keeps_prompt_ids_and_encodes_answer_as_continuation() {
    let t = tok();
    // No newline before the answer: "Assistant: " ends in a lone "▁" that merges with "The" in the
    // training text, so the inference prompt ids are not a prefix of its canonical encoding.
    let template = "<image>\n### User: {question} \n### Assistant: {answer}";
    let (q, a) = ("Where is the tumour?", "The tumour is at the top left.");
    let text = render_prompt(template, q, Some(a)).unwrap();
    let canonical = t.encode(text.split_once("<image>").unwrap().1, false).unwrap().get_ids().to_vec();
    let infer = encode_prompt(t, template, q, None).unwrap();
    assert!(!canonical.starts_with(&infer.after_image), "test premise: boundary must straddle a token");

    let train = encode_prompt(t, template, q, Some(a)).unwrap();
    assert_eq!((&train.before_image, &train.after_image), (&infer.before_image, &infer.after_image));
    assert_eq!(train.answer, encode_continuation(t, a).unwrap());
    // "The" without the word-start "▁": it continues the prompt's trailing "▁".
    assert_eq!(t.id_to_token(*infer.after_image.last().unwrap()).as_deref(), Some("▁"));
    assert_eq!(t.id_to_token(train.answer[0]).as_deref(), Some("The"));
    let back = t.decode(&[train.after_image.clone(), train.answer.clone()].concat(), true).unwrap();
    assert_eq!(back, text.split_once("<image>").unwrap().1);
}

#[test]
fn continuation_has_no_dummy_prefix() {
    let t = tok();
    let cont = encode_continuation(t, "tumour").unwrap();
    assert_eq!(t.decode(&cont, false).unwrap(), "tumour");
    assert_ne!(cont, t.encode("tumour", false).unwrap().get_ids().to_vec());
    let spaced = encode_continuation(t, " tumour").unwrap();
    assert_eq!(spaced, t.encode("tumour", false).unwrap().get_ids().to_vec());
    assert!(encode_continuation(t, "").unwrap().is_empty());
}

#[test]
fn custom_template_with_text_before_the_image() {
    let t = tok();
    let template = "You are a radiologist. <image>\nQ: {question}\nA: {answer}\n";
    let p = encode_prompt(t, template, "Where?", Some("Center.")).unwrap();
    assert_eq!(p.before_image, ids(t, "You are a radiologist. "));
    assert_eq!(p.after_image, t.encode("\nQ: Where?\nA: ", false).unwrap().get_ids().to_vec());
    // The text after {answer} belongs to the answer target; the inference prompt stops at {answer}.
    assert_eq!(t.decode(&p.answer, true).unwrap(), "Center.\n");
    assert_eq!(render_prompt(template, "Where?", None).unwrap(), "You are a radiologist. <image>\nQ: Where?\nA: ");
    let infer = encode_prompt(t, template, "Where?", None).unwrap();
    assert_eq!(infer.prompt_text_len(), p.prompt_text_len());
}

#[test]
fn prompt_errors() {
    let t = tok();
    let d = DEFAULT_PROMPT_TEMPLATE;
    assert!(err_text(encode_prompt(t, d, "", None)).contains("empty question"));
    assert!(err_text(encode_prompt(t, d, " \n\t", Some("x"))).contains("empty question"));
    let e = err_text(encode_prompt(t, "### User: {question} \n### Assistant: {answer}", "Where?", None));
    assert!(e.contains("<image>") && e.contains("found 0"), "{e}");
    let e = err_text(encode_prompt(t, d, "Where is <image> this?", None));
    assert!(e.contains("found 2"), "{e}");
    let e = err_text(encode_prompt(t, "<image> {question} {answer} <image>", "Where?", Some("x")));
    assert!(e.contains("answer part must not contain"), "{e}");
    let e = err_text(encode_prompt(t, d, "Where?", Some("see <image>")));
    assert!(e.contains("answer part must not contain"), "{e}");
    let e = err_text(encode_prompt(t, "<image> {answer}", "Where?", None));
    assert!(e.contains("{question} exactly once"), "{e}");
    let e = err_text(encode_prompt(t, "<image> {question} {answer}{answer}", "Where?", None));
    assert!(e.contains("{answer} exactly once"), "{e}");
    let e = err_text(encode_prompt(t, "<image> {answer} {question}", "Where?", None));
    assert!(e.contains("before {answer}"), "{e}");
    // A question that itself contains "{answer}" is just text.
    let p = encode_prompt(t, d, "What is {answer}?", Some("Nothing.")).unwrap();
    assert_eq!(t.decode(&p.answer, true).unwrap(), "Nothing.");
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: TokenizeArgs,
}

fn run_cli(argv: &[&str]) -> String {
    let cli = Cli::try_parse_from(std::iter::once("prs-tokenize").chain(argv.iter().copied())).unwrap();
    let mut out = Vec::new();
    run_to(&cli.args, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn tokenize_command_prints_ids_and_pieces() {
    let model = model_path();
    let model = model.to_str().unwrap();
    let out = run_cli(&["--model", model, "--json", "3", "a </s> b"]);
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["text"], "3");
    assert_eq!(lines[0]["ids"], serde_json::json!([1, 28705, 28770]));
    assert_eq!(lines[0]["tokens"], serde_json::json!(["<s>", "▁", "3"]));
    assert_eq!(lines[1]["ids"], serde_json::json!(ids(tok(), "a </s> b")));

    let out = run_cli(&["--model", model, "--no-bos", "3"]);
    assert_eq!(out, "\"3\": 2 tokens\n 28705 -> '▁'\n 28770 -> '3'\n");
    // A directory works too, and a missing path is an error naming it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(model_path(), dir.path().join("tokenizer.model")).unwrap();
    let out = run_cli(&["--model", dir.path().to_str().unwrap(), "--json", "hi"]);
    assert!(out.starts_with("{") && out.contains("\"ids\":[1,"), "{out}");
    let args = TokenizeArgs { model: dir.path().join("none"), json: false, no_bos: false, text: vec!["x".into()] };
    let e = format!("{:#}", run_to(&args, &mut Vec::new()).unwrap_err());
    assert!(e.contains("none"), "{e}");
    assert!(Cli::try_parse_from(["prs-tokenize", "--model", model]).is_err(), "TEXT is required");
}

#[test]
fn prompt_ids_struct_helpers() {
    let p = PromptIds { before_image: vec![1], after_image: vec![5, 6], answer: vec![7] };
    assert_eq!(p.with_marker(-200), vec![1, -200, 5, 6, 7]);
    assert_eq!(p.prompt_text_len(), 3);
}
