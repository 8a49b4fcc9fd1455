//! prs: fine-tune and run PRS-Med (position reasoning segmentation) with Candle.
//!
//! Data flows one way: `cli` -> `commands` (one pipeline per subcommand) -> `model` + `data`
//! -> `nn` (differentiable building blocks candle lacks) and `weights` (checkpoint I/O).

pub mod cli;
pub mod commands;
pub mod config;
pub mod data;
pub mod files;
pub mod infer;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod phases;
pub mod process;
pub mod report;
pub mod tokenizer;
pub mod train;
pub mod weights;
