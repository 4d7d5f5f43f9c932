//! Measuring detection quality: metrics and the `eval` command.

pub mod eval;
pub mod metrics;
