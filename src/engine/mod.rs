//! The engine: a dedicated inference thread that owns the model and its
//! context, fed by a bounded queue, answering each job on a oneshot channel
//! (the shape of Hugging Face TEI's `BackendThread`).
//!
//! llama.cpp contexts are `!Send`, so the [`Scorer`] is built *on* the worker
//! thread by a factory closure and never leaves it. The queue is bounded:
//! [`Engine::try_submit`] refuses at once when it is full, it never waits.

pub mod llama;
pub mod profile;
pub mod windows;

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::protocol::{ErrorType, ModelRef, RequestError};

/// Default number of requests that may wait in the inference queue.
pub const DEFAULT_QUEUE_CAPACITY: usize = 256;

/// Errors of the engine layer.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model file could not be read, parsed or loaded.
    #[error("cannot load model {path}: {reason}")]
    Load {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The model loaded but cannot be used with its profile (labels not single tokens, window too small, ...).
    #[error("model {model} cannot be used: {reason}")]
    Unsupported {
        /// The model's file name.
        model: String,
        /// Why.
        reason: String,
    },
    /// The prompt has more tokens than `max_prompt_tokens`.
    #[error("prompt has {tokens} tokens; the limit is {limit} (--max-prompt-tokens)")]
    InputTooLong {
        /// Tokens in the prompt.
        tokens: usize,
        /// The configured cap.
        limit: usize,
    },
    /// llama.cpp failed while evaluating a prompt.
    #[error("inference failed: {0}")]
    Inference(String),
    /// The worker thread is gone.
    #[error("the inference worker has stopped")]
    WorkerGone,
}

impl EngineError {
    /// The wire error this engine error is reported as.
    pub fn to_request_error(&self) -> RequestError {
        let kind = match self {
            EngineError::InputTooLong { .. } => ErrorType::InputTooLong,
            _ => ErrorType::Internal,
        };
        RequestError::new(kind, self.to_string())
    }
}

/// One prompt's score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// P(malicious) in `[0, 1]`; with several windows, the highest window's.
    pub p_malicious: f64,
    /// Tokens of the user text (template excluded).
    pub tokens: usize,
    /// Windows the text was scored in.
    pub windows: usize,
}

/// Something that scores prompts. Lives on the worker thread; need not be `Send`.
pub trait Scorer {
    /// The model that answers, named in each response.
    fn model(&self) -> &ModelRef;
    /// Threshold applied when a request names none, in `[0, 1]`.
    fn default_threshold(&self) -> f64;
    /// Tokens of prompt text one window holds, when the scorer windows long prompts.
    fn window_tokens(&self) -> Option<usize> {
        None
    }
    /// Scores one prompt.
    ///
    /// # Errors
    /// [`EngineError::InputTooLong`] past the token cap; [`EngineError::Inference`] when the model fails.
    fn score(&mut self, text: &str) -> Result<Score, EngineError>;
}

/// What a finished job reports.
#[derive(Debug, Clone)]
pub struct Scored {
    /// The score.
    pub score: Score,
    /// The model that computed it.
    pub model: ModelRef,
    /// Default threshold of that model.
    pub default_threshold: f64,
    /// Milliseconds spent waiting in the queue.
    pub queue_ms: f64,
    /// Milliseconds spent scoring.
    pub infer_ms: f64,
}

/// The reply to one job.
pub type JobResult = Result<Scored, RequestError>;

struct Job {
    text: String,
    enqueued: Instant,
    reply: oneshot::Sender<JobResult>,
}

/// Static facts about the loaded model.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// The model answering.
    pub model: ModelRef,
    /// Its default threshold.
    pub default_threshold: f64,
    /// Tokens of prompt text one window holds (`None`: no windowing).
    pub window_tokens: Option<usize>,
}

/// A cloneable handle to the inference worker.
///
/// When the last handle is dropped the worker finishes the queued jobs and exits.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Job>,
    info: Arc<EngineInfo>,
    capacity: usize,
}

impl Engine {
    /// Starts the worker thread, builds the scorer there with `factory`, and
    /// waits until it is loaded.
    ///
    /// `capacity` bounds the jobs waiting in the queue (at least 1).
    ///
    /// # Errors
    /// Whatever `factory` returned, or [`EngineError::WorkerGone`] if it panicked.
    pub fn spawn<F>(capacity: usize, factory: F) -> Result<Engine, EngineError>
    where
        F: FnOnce() -> Result<Box<dyn Scorer>, EngineError> + Send + 'static,
    {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel::<Job>(capacity);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("promptgate-inference".into())
            .spawn(move || {
                let mut scorer = match factory() {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let info = EngineInfo {
                    model: scorer.model().clone(),
                    default_threshold: scorer.default_threshold(),
                    window_tokens: scorer.window_tokens(),
                };
                let _ = ready_tx.send(Ok(info));
                drop(ready_tx);
                worker_loop(scorer.as_mut(), rx);
            })
            .map_err(|e| EngineError::Inference(format!("cannot start worker thread: {e}")))?;
        let info = ready_rx.recv().map_err(|_| EngineError::WorkerGone)??;
        Ok(Engine {
            tx,
            info: Arc::new(info),
            capacity,
        })
    }

    /// Queues `text` for scoring and returns the receiver of its result.
    ///
    /// # Errors
    /// `overloaded` at once when the queue is full; `internal` when the worker is gone.
    pub fn try_submit(&self, text: String) -> Result<oneshot::Receiver<JobResult>, RequestError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            text,
            enqueued: Instant::now(),
            reply,
        };
        match self.tx.try_send(job) {
            Ok(()) => Ok(rx),
            Err(mpsc::error::TrySendError::Full(_)) => Err(RequestError::new(
                ErrorType::Overloaded,
                format!(
                    "the inference queue is full ({} waiting); retry later",
                    self.capacity
                ),
            )),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(EngineError::WorkerGone.to_request_error())
            }
        }
    }

    /// Jobs waiting in the queue now.
    pub fn queue_depth(&self) -> usize {
        self.capacity - self.tx.capacity()
    }

    /// The queue's capacity.
    pub fn queue_capacity(&self) -> usize {
        self.capacity
    }

    /// The loaded model's facts.
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }
}

fn worker_loop(scorer: &mut dyn Scorer, mut rx: mpsc::Receiver<Job>) {
    while let Some(job) = rx.blocking_recv() {
        if job.reply.is_closed() {
            // The client went away while the job waited: skip the work.
            continue;
        }
        let started = Instant::now();
        let queue_ms = ms(started - job.enqueued);
        // A panic inside the model code answers `internal` for this job and
        // leaves the worker serving, rather than killing the queue.
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scorer.score(&job.text)))
                .unwrap_or_else(|_| Err(EngineError::Inference("the scorer panicked".into())));
        let result = outcome
            .map(|score| Scored {
                score,
                model: scorer.model().clone(),
                default_threshold: scorer.default_threshold(),
                queue_ms,
                infer_ms: ms(started.elapsed()),
            })
            .map_err(|e| {
                tracing::warn!(error = %e, "scoring failed");
                e.to_request_error()
            });
        let _ = job.reply.send(result);
    }
    tracing::debug!("inference worker stopped");
}

/// A duration in milliseconds as `f64`.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(ModelRef);
    impl Scorer for Fixed {
        fn model(&self) -> &ModelRef {
            &self.0
        }
        fn default_threshold(&self) -> f64 {
            0.5
        }
        fn score(&mut self, text: &str) -> Result<Score, EngineError> {
            if text == "slow" {
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            Ok(Score {
                p_malicious: 0.75,
                tokens: text.len(),
                windows: 1,
            })
        }
    }

    fn fixed() -> Box<dyn Scorer> {
        Box::new(Fixed(ModelRef {
            name: "fixed".into(),
            sha256: "00".into(),
        }))
    }

    #[tokio::test]
    async fn jobs_are_answered() {
        let engine = Engine::spawn(4, || Ok(fixed())).unwrap();
        let rx = engine.try_submit("abc".into()).unwrap();
        let scored = rx.await.unwrap().unwrap();
        assert_eq!(scored.score.tokens, 3);
        assert_eq!(scored.model.name, "fixed");
    }

    #[tokio::test]
    async fn full_queue_is_refused_at_once() {
        let engine = Engine::spawn(1, || Ok(fixed())).unwrap();
        // The first job occupies the worker, the second fills the queue of one.
        let first = engine.try_submit("slow".into()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let second = engine.try_submit("slow".into()).unwrap();
        let third = engine.try_submit("x".into()).unwrap_err();
        assert_eq!(third.kind, ErrorType::Overloaded);
        assert!(first.await.unwrap().is_ok());
        assert!(second.await.unwrap().is_ok());
    }

    #[test]
    fn factory_error_is_returned() {
        let err = Engine::spawn(1, || {
            Err(EngineError::Load {
                path: "x".into(),
                reason: "bad".into(),
            })
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("bad"));
    }
}
