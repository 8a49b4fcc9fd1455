//! `prs data check`: verify a dataset before any training (every row, every problem listed
//! with its file and line, a summary per modality and split); no model weights are read.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::data::check::{check_dataset, DataReport};
use crate::data::dataset::{DatasetOptions, MaskRule};
use crate::exit::InputError;
use crate::files::write_atomic;

#[derive(clap::Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum DataCommand {
    /// Check every row of a dataset (files, sizes, binary masks, columns, splits, duplicates,
    /// position labels) and summarise it per modality and split; exits with status 3 on problems.
    #[command(after_help = "Examples:\n  prs data check --data-root data/synth\n  \
                            prs data check --data-root my_data.csv --mask-nonzero-is-lesion --json report.json")]
    Check(DataCheckArgs),
}

#[derive(clap::Args, Debug)]
pub struct DataCheckArgs {
    /// Dataset: the authors' layout (folder with annotations/) or a plain CSV.
    #[arg(long, alias = "data_root")]
    pub data_root: PathBuf,
    /// Also write the report (summary and every problem) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Read every non-zero mask value as lesion (class-id label masks).
    #[arg(long, alias = "mask_nonzero_is_lesion")]
    pub mask_nonzero_is_lesion: bool,
}

pub fn run(args: &DataArgs) -> Result<()> {
    match &args.command {
        DataCommand::Check(a) => {
            let opts = DatasetOptions {
                mask_rule: MaskRule::from_nonzero_is_lesion(a.mask_nonzero_is_lesion),
                ..Default::default()
            };
            check_and_report(&a.data_root, &opts, a.json.as_deref(), true)
        }
    }
}

/// Checks, prints the summary (and writes the JSON report), and fails listing every problem
/// (unless `fail` is off: `finetune --dry-run --skip-bad-rows`); shared with `prs finetune --dry-run`.
pub fn check_and_report(root: &Path, opts: &DatasetOptions, json: Option<&Path>, fail: bool) -> Result<()> {
    let report: DataReport = check_dataset(root, opts)?;
    print!("{}", report.render());
    if let Some(path) = json {
        write_atomic(path, |f| Ok(serde_json::to_writer_pretty(f, &report)?))?;
    }
    if report.problems.is_empty() {
        println!("dataset check passed");
        return Ok(());
    }
    let rows: std::collections::BTreeSet<_> = report.problems.iter().map(|p| (&p.file, p.line)).collect();
    let head = format!(
        "dataset check of {} found {} problem(s) in {} row(s)/header(s)",
        root.display(),
        report.problems.len(),
        rows.len()
    );
    if fail {
        bail!(InputError(format!("{head}:\n{}", report.problem_list().trim_end())));
    }
    println!("{head} (rows with problems are skipped):\n{}", report.problem_list().trim_end());
    Ok(())
}
