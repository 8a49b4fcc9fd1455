//! One file per subcommand; each reads top to bottom.

pub mod args;
pub mod bench;
pub mod data;
pub mod demo;
pub mod evaluate;
pub mod export;
pub mod finetune;
pub mod init;
pub mod predict;
pub mod profile_memory;
pub mod serve;
pub mod synth_data;
pub mod tokenize;
