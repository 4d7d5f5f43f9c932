//! The detector: a head on a base model's hidden states (training, the
//! detector file) and measuring detection quality (metrics, `eval`).

pub mod eval;
pub mod file;
pub mod head;
pub mod metrics;
pub mod plot;
pub mod sft;
pub mod train;
