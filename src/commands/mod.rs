//! One file per subcommand; each reads top to bottom.

pub mod finetune;
pub mod init;
pub mod profile_memory;
pub mod tokenize;
pub mod synth_data;
pub mod predict;
pub mod bench;
pub mod demo;
pub mod evaluate;
