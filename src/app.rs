//! The subcommands, wired from their parts. `main` calls one function here per
//! subcommand and turns its [`ExitCode`] into the process status.

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

use crate::config::{ClassifyArgs, ModelArgs, ServeArgs};
use crate::engine::llama::{LlamaConfig, LlamaScorer};
use crate::engine::{ms, Engine, Scorer};
use crate::protocol::{
    encode_line, ErrorResponse, ErrorType, Label, LatencyMs, RequestError, Verdict,
};
use crate::server::ServerConfig;

/// Process exit status, grep-style for `classify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ExitCode {
    /// Success; for `classify`, every input benign.
    Ok = 0,
    /// `classify`: at least one input malicious.
    Malicious = 1,
    /// Any error.
    Error = 2,
}

impl ModelArgs {
    fn llama_config(&self) -> LlamaConfig {
        let d = LlamaConfig::default();
        LlamaConfig {
            threads: self.threads.unwrap_or(d.threads),
            n_ctx: self.n_ctx,
            window_overlap: self.window_overlap,
            max_prompt_tokens: self.max_prompt_tokens,
        }
    }

    fn load(&self) -> anyhow::Result<LlamaScorer> {
        let path = crate::models::resolve(&self.models_dir, self.model.as_deref())?;
        Ok(LlamaScorer::load(&path, self.llama_config())?)
    }
}

/// `promptgate classify`: scores the argument, or each line of stdin with `-`.
///
/// # Errors
/// Only for failures before any input is scored (model load); per-input
/// errors are printed as error lines and give exit status 2.
pub fn classify(args: &ClassifyArgs) -> anyhow::Result<ExitCode> {
    if let Some(t) = args.threshold {
        anyhow::ensure!(
            (0.0..=1.0).contains(&t),
            "--threshold must be in [0, 1], got {t}"
        );
    }
    let mut scorer = args.model.load()?;
    let threshold = args.threshold.unwrap_or(scorer.default_threshold());
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut status = ExitCode::Ok;
    let mut emit = |(line, outcome): (Vec<u8>, ExitCode)| -> anyhow::Result<()> {
        status = status.max(outcome);
        out.write_all(&line)?;
        out.flush()?;
        Ok(())
    };
    if args.text == "-" {
        for (i, line) in std::io::stdin().lock().split(b'\n').enumerate() {
            let line = line.context("reading standard input")?;
            let id = Value::from(i + 1);
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            emit(match std::str::from_utf8(line) {
                Ok(text) => classify_one(&mut scorer, threshold, id, text),
                Err(e) => error_line(
                    id,
                    RequestError::new(
                        ErrorType::InvalidUtf8,
                        format!("line is not valid UTF-8: {e}"),
                    ),
                ),
            })?;
        }
    } else {
        emit(classify_one(
            &mut scorer,
            threshold,
            Value::Null,
            &args.text,
        ))?;
    }
    Ok(status)
}

fn error_line(id: Value, err: RequestError) -> (Vec<u8>, ExitCode) {
    (encode_line(&ErrorResponse::new(id, err)), ExitCode::Error)
}

/// Scores one input for `classify`: its JSON line and what it means for the exit status.
fn classify_one(
    scorer: &mut dyn Scorer,
    threshold: f64,
    id: Value,
    text: &str,
) -> (Vec<u8>, ExitCode) {
    if text.trim().is_empty() {
        return error_line(
            id,
            RequestError::new(ErrorType::EmptyText, "`text` is empty"),
        );
    }
    let started = Instant::now();
    match scorer.score(text) {
        Err(e) => error_line(id, e.to_request_error()),
        Ok(score) => {
            let label = Label::from_score(score.p_malicious, threshold);
            let infer = ms(started.elapsed());
            let line = encode_line(&Verdict {
                id,
                label,
                score: score.p_malicious,
                threshold,
                model: scorer.model().clone(),
                tokens: score.tokens,
                windows: score.windows,
                latency_ms: LatencyMs {
                    queue: 0.0,
                    infer,
                    total: infer,
                },
            });
            let outcome = match label {
                Label::Malicious => ExitCode::Malicious,
                Label::Benign => ExitCode::Ok,
            };
            (line, outcome)
        }
    }
}

/// `promptgate serve`: loads the model, takes or binds the socket, serves
/// until SIGTERM or SIGINT, answers what was received, and removes the socket.
///
/// # Errors
/// Model, socket or runtime failures at start-up.
pub fn serve(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let path = crate::models::resolve(&args.model.models_dir, args.model.model.as_deref())?;
    let config = args.model.llama_config();
    let load_path = path.clone();
    let engine = Engine::spawn(args.queue_capacity, move || {
        Ok(Box::new(LlamaScorer::load(&load_path, config)?) as Box<dyn Scorer>)
    })?;
    tracing::info!(model = %engine.info().model.name, sha256 = %engine.info().model.sha256, "model ready");
    let bound = match crate::listener::from_systemd()? {
        Some(b) => {
            tracing::info!("listening on the socket passed by systemd");
            b
        }
        None => {
            let b = crate::listener::bind(&args.socket, args.socket_mode)?;
            tracing::info!(socket = %args.socket.display(), mode = format!("{:o}", args.socket_mode), "listening");
            b
        }
    };
    let server_config = ServerConfig {
        max_line_bytes: args.max_line_bytes,
        max_in_flight_per_connection: args.max_in_flight,
        shutdown_grace: Duration::from_secs_f64(args.shutdown_grace.max(0.0)),
        ..ServerConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let finished = runtime.block_on(async {
        let std_listener = bound.listener.try_clone().context("cloning the listener")?;
        let listener =
            tokio::net::UnixListener::from_std(std_listener).context("registering the listener")?;
        crate::server::run(listener, engine, server_config, shutdown_signal()).await
    })?;
    drop(bound);
    tracing::info!("stopped");
    Ok(if finished {
        ExitCode::Ok
    } else {
        ExitCode::Error
    })
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the daemon with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
