//! `prs tokenize`: show the token ids (and pieces) the model sees for each text, like llama-tokenize.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};

use crate::tokenizer;

#[derive(clap::Args, Debug)]
pub struct TokenizeArgs {
    /// Model directory (its tokenizer.json, else its tokenizer.model), or a tokenizer.json /
    /// SentencePiece tokenizer.model file.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// One JSON object per text: {"text", "ids", "tokens"}.
    #[arg(long)]
    pub json: bool,
    /// Leave out the BOS token the model sees at the start of a sequence.
    #[arg(long)]
    pub no_bos: bool,
    /// Texts to tokenize (each is a separate sequence).
    #[arg(required = true, value_name = "TEXT")]
    pub text: Vec<String>,
}

pub fn run(args: &TokenizeArgs) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run_to(args, &mut out)
}

/// [`run`] writing to `out` (tests capture it).
pub fn run_to(args: &TokenizeArgs, out: &mut dyn Write) -> Result<()> {
    let tok = tokenizer::load_path(&args.model)?;
    for text in &args.text {
        let enc = tok.encode(text.as_str(), !args.no_bos).map_err(|e| anyhow!("encoding {text:?}: {e}"))?;
        let (ids, tokens) = (enc.get_ids(), enc.get_tokens());
        if args.json {
            let obj = serde_json::json!({ "text": text, "ids": ids, "tokens": tokens });
            writeln!(out, "{obj}")?;
        } else {
            writeln!(out, "{text:?}: {} tokens", ids.len())?;
            for (id, piece) in ids.iter().zip(tokens) {
                writeln!(out, "{id:>6} -> '{piece}'")?;
            }
        }
    }
    out.flush().context("writing tokenize output")
}
