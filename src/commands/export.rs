//! `prs export`: a trained checkpoint as a merged model folder or in the authors' release layout.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::config::BaseQuant;
use crate::pipeline::export::{export, ExportFormat, ExportOptions};
use crate::pipeline::load::{BaseQuantArgs, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Trained checkpoint: a prs checkpoint folder (e.g. RUN/best) or the authors' release.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output folder: new or empty (or an earlier export of the same kind, with --overwrite).
    #[arg(long)]
    pub out: PathBuf,
    /// Fold the LoRA into the base weights and write a complete model folder (= --format merged).
    #[arg(long, conflicts_with = "format")]
    pub merge_lora: bool,
    /// merged (a complete model folder, the LoRA folded in) or authors (lora_adapter/,
    /// image_encoder.pth, mask_decoder.pth, cls.pth).
    #[arg(long, value_enum)]
    pub format: Option<ExportFormat>,
    /// Replace --out when it holds an earlier export of the same kind.
    #[arg(long)]
    pub overwrite: bool,
    /// Base LLaVA-Med model (folder or hub id); default: the one the checkpoint records.
    #[arg(long)]
    pub base: Option<String>,
    /// Configuration file (needed for the authors' release, which records none).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// TinySAM weights overriding the configuration's.
    #[arg(long)]
    pub tinysam: Option<String>,
}

pub fn run(args: &ExportArgs) -> Result<()> {
    let format = match (args.merge_lora, args.format) {
        (true, _) => ExportFormat::Merged,
        (false, Some(f)) => f,
        (false, None) => bail!("say what to write: --merge-lora (a merged model folder) or --format authors"),
    };
    let model = ModelArgs {
        base: args.base.clone(),
        config: args.config.clone(),
        tinysam: args.tinysam.clone(),
        device: "cpu".into(),
        dtype: None,
        // LoRA merges into the base's own weights, whatever storage training used.
        quant: BaseQuantArgs { base_quant: Some(BaseQuant::None), ..Default::default() },
        no_merge_lora: false,
    };
    let opts = ExportOptions { checkpoint: &args.checkpoint, out: &args.out, format, overwrite: args.overwrite, model };
    let out = export(&opts)?;
    println!("wrote {} ({format:?} export of {})", out.display(), args.checkpoint.display());
    Ok(())
}
