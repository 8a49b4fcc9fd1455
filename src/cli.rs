//! Command-line interface (clap). Each subcommand's flags live beside its pipeline in
//! `commands/`; this file only lists the subcommands.

use clap::{Parser, Subcommand};

use crate::commands;

#[derive(Parser, Debug)]
#[command(name = "prs", version, about = "Fine-tune and run PRS-Med (position reasoning segmentation) with Candle")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Time training steps or predictions with random weights (no download).
    Bench(commands::bench::BenchArgs),
    /// The whole pipeline on the embedded tiny model and a synthetic dataset (CPU, minutes).
    Demo(commands::demo::DemoArgs),
    /// LoRA fine-tuning of PRS-Med (LLM adapter, TinySAM, mask decoder).
    #[command(visible_alias = "train")]
    Finetune(commands::finetune::FinetuneArgs),
    /// Mask, probability map, overlay and answer for one image (or a folder / CSV of them).
    Predict(commands::predict::PredictArgs),
    /// Score a test split (or existing probability maps): Dice/IoU, the authors' protocol, HD95, position accuracy.
    Evaluate(commands::evaluate::EvaluateArgs),
    /// Write random base weights in the real checkpoint layouts (LLaVA-Med folder + TinySAM .pth).
    Init(commands::init::InitArgs),
    /// Print the token ids the model sees for some text.
    Tokenize(commands::tokenize::TokenizeArgs),
    /// Generate a synthetic dataset in the authors' layout (blobs at the five positions).
    SynthData(commands::synth_data::SynthDataArgs),
    /// Predict and measure the peak memory of a training step; recommend batch, accumulation,
    /// precision and gradient checkpointing.
    #[command(visible_alias = "memory-profile")]
    ProfileMemory(commands::profile_memory::ProfileMemoryArgs),
    /// Dataset tools: `prs data check` verifies every row and summarises the dataset.
    Data(commands::data::DataArgs),
    /// Write a trained checkpoint as a merged model folder (--merge-lora) or in the authors' layout.
    Export(commands::export::ExportArgs),
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
        Command::Data(a) => commands::data::run(&a),
    }
}
