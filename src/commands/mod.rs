//! One file per subcommand; each reads top to bottom.

pub mod init;
pub mod tokenize;
pub mod synth_data;
pub mod predict;
pub mod evaluate;
