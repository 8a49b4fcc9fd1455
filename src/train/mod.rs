//! Training: losses (and, with `prs finetune`, the loop, optimizer and resumable state).

pub mod losses;
