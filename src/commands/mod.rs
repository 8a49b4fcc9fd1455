//! One file per subcommand; each reads top to bottom.

pub mod tokenize;
