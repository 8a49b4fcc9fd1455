//! `prs synth-data`: write a small synthetic dataset in the authors' layout.

use std::path::PathBuf;

use anyhow::Result;

use crate::data::dataset::Position;
use crate::data::synth::{generate, SynthConfig};

#[derive(clap::Args, Debug)]
pub struct SynthDataArgs {
    /// Output folder (written as OUT.tmp, then renamed).
    #[arg(long)]
    pub out: PathBuf,
    /// Training images per modality (three modalities).
    #[arg(long, default_value_t = 40)]
    pub train: usize,
    /// Validation images per modality.
    #[arg(long, default_value_t = 10)]
    pub val: usize,
    /// Test images per modality.
    #[arg(long, default_value_t = 10)]
    pub test: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 128)]
    pub size: u32,
    /// Seed of the blobs and their positions.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &SynthDataArgs) -> Result<()> {
    let cfg = SynthConfig { train: args.train, val: args.val, test: args.test, size: args.size, seed: args.seed };
    let summary = generate(&args.out, &cfg, args.force)?;
    let counts: Vec<String> =
        Position::ALL.iter().zip(summary.per_position).map(|(p, n)| format!("{p}: {n}")).collect();
    println!("wrote {} rows to {} ({})", summary.rows, summary.out.display(), counts.join(", "));
    Ok(())
}
