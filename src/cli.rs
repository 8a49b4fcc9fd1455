//! Command-line interface (clap). Each subcommand's flags live beside its pipeline in
//! `commands/`; this file lists the subcommands, their worked examples (a test parses every
//! example line, so they stay valid) and the flags every command has.

use clap::{ArgAction, CommandFactory, Parser, Subcommand};

use crate::commands;

#[derive(Parser, Debug)]
#[command(
    name = "prs",
    version,
    about = "Fine-tune and run PRS-Med (position reasoning segmentation) with Candle",
    after_help = TOP_HELP
)]
pub struct Cli {
    /// More detail on stderr: -v adds debug lines, -vv trace lines.
    #[arg(short, long, global = true, action = ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Only results (stdout) and errors: no status lines, warnings or progress bars.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// `prs --help`'s closing text: a first session, then the exit statuses.
const TOP_HELP: &str = concat!(
    "Examples:
  prs demo --out demo
  prs finetune --config configs/tiny.toml --data-root data/synth --out runs/tiny

",
    crate::exit::exit_codes_help!()
);

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Time training steps or predictions with random weights (no download).
    #[command(
        after_help = "Examples:\n  prs bench train --config configs/tiny.toml --device cpu --steps 3 --phases\n  prs bench predict --config configs/prs-med-7b.toml --device cuda:0 --max-new-tokens 32"
    )]
    Bench(commands::bench::BenchArgs),
    /// The whole pipeline on the embedded tiny model and a synthetic dataset (CPU, minutes).
    #[command(after_help = "Examples:\n  prs demo --out demo\n  prs demo --out demo-small --train-images 40")]
    Demo(commands::demo::DemoArgs),
    /// LoRA fine-tuning of PRS-Med (LLM adapter, TinySAM, mask decoder).
    #[command(visible_alias = "train")]
    #[command(
        after_help = "Examples:\n  prs finetune --config configs/tiny.toml --data-root data/synth --out runs/tiny\n  prs finetune --resume runs/tiny --max-steps 200"
    )]
    Finetune(commands::finetune::FinetuneArgs),
    /// Mask, probability map, overlay and answer for one image (or a folder / CSV of them).
    #[command(
        after_help = "Examples:\n  prs predict --checkpoint runs/tiny/best --image scan.png --question \"Where is the tumour?\" --out pred\n  prs predict --checkpoint runs/tiny/best --images scans/ --question \"Where is the lesion?\" --out preds --batch-size 4"
    )]
    Predict(commands::predict::PredictArgs),
    /// Score a test split (or existing probability maps): Dice/IoU, the authors' protocol, HD95, position accuracy.
    #[command(
        after_help = "Examples:\n  prs evaluate --checkpoint runs/tiny/best --data-root data/synth --out eval --hd95\n  prs evaluate --pred-dir preds --data-root data/synth --protocol prsmed --out eval-prsmed"
    )]
    Evaluate(commands::evaluate::EvaluateArgs),
    /// Write random base weights in the real checkpoint layouts (LLaVA-Med folder + TinySAM .pth).
    #[command(after_help = "Examples:\n  prs init --config configs/tiny.toml --out models/llava-med-tiny")]
    Init(commands::init::InitArgs),
    /// Print the token ids the model sees for some text.
    #[command(after_help = "Examples:\n  prs tokenize --model models/llava-med-tiny \"Where is the lesion?\"")]
    Tokenize(commands::tokenize::TokenizeArgs),
    /// Generate a synthetic dataset in the authors' layout (blobs at the five positions).
    #[command(after_help = "Examples:\n  prs synth-data --out data/synth --train 40 --val 10 --test 10")]
    SynthData(commands::synth_data::SynthDataArgs),
    /// Predict and measure the peak memory of a training step; recommend batch, accumulation,
    /// precision and gradient checkpointing.
    #[command(visible_alias = "memory-profile")]
    #[command(
        after_help = "Examples:\n  prs profile-memory --config configs/prs-med-7b.toml --device cuda:0 --gpu-memory 24GiB --emit-config fits.toml\n  prs profile-memory --config configs/tiny.toml --predict-only --json"
    )]
    ProfileMemory(commands::profile_memory::ProfileMemoryArgs),
    /// A local web page and HTTP API for a trained model: drop a scan, ask, see the mask.
    #[command(
        after_help = "Examples:\n  prs serve --checkpoint runs/tiny/best\n  prs serve --checkpoint runs/7b/best --device cuda:0 --port 8080 --save-dir served\n  PRS_SERVE_TOKEN=change-me prs serve --checkpoint runs/7b/best --host 0.0.0.0"
    )]
    Serve(commands::serve::ServeArgs),
    /// Dataset tools: `prs data check` verifies every row and summarises the dataset.
    #[command(after_help = "Examples:\n  prs data check --data-root data/synth --json report.json")]
    Data(commands::data::DataArgs),
    /// Write a trained checkpoint as a merged model folder (--merge-lora) or in the authors' layout.
    #[command(
        after_help = "Examples:\n  prs export --checkpoint runs/tiny/best --merge-lora --out merged\n  prs export --checkpoint runs/tiny/best --format authors --out release"
    )]
    Export(commands::export::ExportArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    #[command(
        after_help = "Examples:\n  prs completions bash > ~/.local/share/bash-completion/completions/prs\n  prs completions zsh > ~/.zfunc/_prs"
    )]
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench(a) => commands::bench::run(&a),
        Command::Demo(a) => commands::demo::run(&a),
        Command::Finetune(a) => commands::finetune::run(&a),
        Command::Init(a) => commands::init::run(&a),
        Command::Predict(a) => commands::predict::run(&a),
        Command::Evaluate(a) => commands::evaluate::run(&a),
        Command::Tokenize(a) => commands::tokenize::run(&a),
        Command::SynthData(a) => commands::synth_data::run(&a),
        Command::ProfileMemory(a) => commands::profile_memory::run(&a),
        Command::Export(a) => commands::export::run(&a),
        Command::Serve(a) => commands::serve::run(&a),
        Command::Data(a) => commands::data::run(&a),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "prs", &mut std::io::stdout());
            Ok(())
        }
    }
}

/// The exit status of a failed command: [`crate::exit::classify`], plus the data layer's own
/// error types (a dataset's row problems, an unreadable mask), which that low module cannot see.
pub fn exit_kind(e: &anyhow::Error) -> crate::exit::ExitKind {
    use crate::data::dataset::{MaskError, ValidationError};
    use crate::exit::{classify, ExitKind};
    match classify(e) {
        ExitKind::Internal if e.chain().any(|c| c.is::<ValidationError>() || c.is::<MaskError>()) => ExitKind::Input,
        kind => kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::{Problem, ValidationError};
    use crate::exit::ExitKind;

    #[test]
    fn a_dataset_problem_is_bad_input() {
        let problem = Problem { csv: "train.csv".into(), line: 3, message: "no such image".into(), fatal: true };
        let e = anyhow::Error::new(ValidationError { problems: vec![problem] }).context("finetune");
        assert_eq!(exit_kind(&e), ExitKind::Input);
        assert_eq!(exit_kind(&anyhow::anyhow!("a shape mismatch")), ExitKind::Internal);
    }
}
