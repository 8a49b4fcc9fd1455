//! Training: optimizer, learning-rate schedule.

pub mod optim;
pub mod schedule;
