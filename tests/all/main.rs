//! The integration tests, in one binary: each file below was its own test binary, and linking
//! candle into each of them cost minutes on two cores. Run one file's tests with
//! `cargo test --test all -- finetune::` (the module name is the file name).

// Test code indexes and spells out tuples where that reads more plainly than the lint's form.
#![allow(clippy::type_complexity, clippy::needless_range_loop, clippy::explicit_counter_loop)]

mod attention;
mod cli;
mod cli_help;
mod clip;
mod common;
mod data;
mod data_check;
mod decoder;
mod dist;
mod dropout;
mod evaluate;
mod export;
mod finetune;
mod grad_checkpoint;
mod infer_setup;
mod input_checks;
mod kernel_emu;
mod launches;
mod logs;
mod losses;
mod metrics;
mod mistral;
mod ops_grad;
mod optim;
mod predict;
mod preprocess;
mod profile_memory;
mod prs_med;
mod quant;
mod report;
mod serve;
mod tinysam;
mod tokenizer;
mod upsample_epilogue;
mod weights_io;
