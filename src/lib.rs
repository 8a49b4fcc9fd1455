//! prs: fine-tune and run PRS-Med (position reasoning segmentation) with Candle.
//!
//! Data flows one way: `cli` -> `commands` (one file per subcommand) -> `memory`, `train` ->
//! `pipeline` (loading, generation, prediction) -> `metrics`, `data`, `model` -> `weights`
//! (checkpoint I/O) -> `nn` (differentiable building blocks candle lacks); `dist` (ranks and
//! collectives for data-parallel training) sits under `train`. docs/architecture.md draws it.

pub mod cli;
pub mod commands;
pub mod config;
pub mod data;
pub mod dist;
pub mod exit;
pub mod files;
pub mod hash;
pub mod kernels;
pub mod launches;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod phases;
pub mod pipeline;
pub mod process;
pub mod report;
pub mod serve;
pub mod tokenizer;
pub mod train;
pub mod weights;
