//! Training: losses, the optimizer and its schedule (and, with `prs finetune`, the loop and
//! resumable state).

pub mod fused_adamw;
pub mod guard;
pub mod optim;
pub mod schedule;
pub mod state;
pub mod step;
pub mod trainer;
pub mod validate;
