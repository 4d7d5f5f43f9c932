//! The daemon without llama.cpp: the same server, queue, protocol, limits and
//! drain as `promptgate serve`, with a fake scorer of fixed small cost behind
//! the `Scorer` trait. It is the harness for soaking the daemon's own wire,
//! memory and file-descriptor behaviour (`scripts/soak.py`,
//! `docs/reliability.md`); it is a cargo example, not part of the shipped binary.
//!
//! ```sh
//! cargo build --release --example fake_daemon
//! target/release/examples/fake_daemon /tmp/pg-fake.sock --max-in-flight 8 &
//! ```
//!
//! The first argument is the socket path. The server flags have the names,
//! defaults and `PROMPTGATE_*` variables of `promptgate serve`. The scorer:
//!
//! - `FAKE_COST_US` (default 200): microseconds of busy loop per prompt, on
//!   the one inference thread, like a model would spend;
//! - the score is 0.9 for a text containing "ignore" (any case), else 0.1; the
//!   model is named `fake.gguf`.
//!
//! SIGTERM or SIGINT drains like the real daemon: exit 0 when every request
//! read was answered within `--shutdown-grace`, 2 otherwise (as `serve`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use promptgate::engine::{Engine, EngineError, Score, Scorer};
use promptgate::protocol::ModelRef;
use promptgate::server::{OnError, ServerConfig};

/// The daemon with a fake scorer, for soak tests.
#[derive(Debug, Parser)]
#[command(name = "fake_daemon")]
struct Args {
    /// Unix socket path to bind.
    socket: PathBuf,
    /// Microseconds of busy loop per scored prompt.
    #[arg(long, env = "FAKE_COST_US", default_value_t = 200)]
    cost_us: u64,
    /// File mode of the socket, in octal.
    #[arg(long, env = "PROMPTGATE_SOCKET_MODE", default_value = "600")]
    socket_mode: String,
    /// Requests that may wait in the inference queue.
    #[arg(long, env = "PROMPTGATE_QUEUE_CAPACITY", default_value_t = promptgate::engine::DEFAULT_QUEUE_CAPACITY)]
    queue_capacity: usize,
    /// Longest request line in bytes.
    #[arg(long, env = "PROMPTGATE_MAX_LINE_BYTES", default_value_t = promptgate::protocol::DEFAULT_MAX_LINE_BYTES)]
    max_line_bytes: usize,
    /// Requests one connection may have in flight.
    #[arg(long, env = "PROMPTGATE_MAX_IN_FLIGHT", default_value_t = 16)]
    max_in_flight: usize,
    /// Seconds to finish in-flight requests after SIGTERM or SIGINT.
    #[arg(long, env = "PROMPTGATE_SHUTDOWN_GRACE", default_value_t = 30.0)]
    shutdown_grace: f64,
    /// Seconds from reading a request to its answer.
    #[arg(long, env = "PROMPTGATE_REQUEST_TIMEOUT", default_value_t = 30.0)]
    request_timeout: f64,
    /// `refuse` or `flag`.
    #[arg(long, env = "PROMPTGATE_ON_ERROR", default_value = "refuse")]
    on_error: String,
    /// Connections served at once.
    #[arg(long, env = "PROMPTGATE_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Seconds a connection with nothing in flight may stay silent.
    #[arg(long, env = "PROMPTGATE_IDLE_TIMEOUT", default_value_t = 300.0)]
    idle_timeout: f64,
    /// Seconds a request line may take from its first byte to its newline.
    #[arg(long, env = "PROMPTGATE_LINE_TIMEOUT", default_value_t = 10.0)]
    line_timeout: f64,
}

/// A scorer that burns a fixed amount of CPU per prompt.
struct Fake {
    model: ModelRef,
    cost: Duration,
}

impl Scorer for Fake {
    fn model(&self) -> &ModelRef {
        &self.model
    }

    fn default_threshold(&self) -> f64 {
        0.5
    }

    fn score(&mut self, text: &str) -> Result<Score, EngineError> {
        let started = Instant::now();
        while started.elapsed() < self.cost {
            std::hint::spin_loop();
        }
        let p = if text.to_lowercase().contains("ignore") {
            0.9
        } else {
            0.1
        };
        Ok(Score {
            p_malicious: p,
            tokens: text.split_whitespace().count(),
            windows: 1,
            early_exit_windows: 0,
        })
    }
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PROMPTGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let seconds = |s: f64| Duration::from_secs_f64(s.max(0.0));
    let on_error = match args.on_error.as_str() {
        "refuse" => OnError::Refuse,
        "flag" => OnError::Flag,
        other => anyhow::bail!("--on-error must be refuse or flag, got {other:?}"),
    };
    let config = ServerConfig {
        max_line_bytes: args.max_line_bytes,
        max_in_flight_per_connection: args.max_in_flight,
        shutdown_grace: seconds(args.shutdown_grace),
        request_timeout: seconds(args.request_timeout),
        on_error,
        max_connections: args.max_connections,
        idle_timeout: seconds(args.idle_timeout),
        line_timeout: seconds(args.line_timeout),
        ..ServerConfig::default()
    };
    let mode = u32::from_str_radix(args.socket_mode.trim_start_matches("0o"), 8)
        .context("--socket-mode is not an octal mode")?;
    let cost = Duration::from_micros(args.cost_us);
    let engine = Engine::spawn(args.queue_capacity, move || {
        Ok(Box::new(Fake {
            model: ModelRef {
                name: "fake.gguf".into(),
                sha256: "00".repeat(32),
            },
            cost,
        }) as Box<dyn Scorer>)
    })?;
    // The daemon's own binding rules: stale socket replaced, live one kept,
    // mode set, file removed on drop.
    let mut bound = promptgate::listener::bind(&args.socket, mode, None)?;
    let std_listener = bound.listener.take().context("no listener")?;
    // The same runtime shape as `promptgate serve`.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    tracing::info!(socket = %args.socket.display(), cost_us = args.cost_us, ?config, "listening");
    let finished = runtime.block_on(async {
        let listener =
            tokio::net::UnixListener::from_std(std_listener).context("registering the listener")?;
        promptgate::server::run(listener, engine, config, promptgate::app::shutdown_signal()).await
    });
    drop(bound);
    let finished = finished?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    tracing::info!(drained = finished, "stopped");
    Ok(std::process::ExitCode::from(if finished { 0 } else { 2 }))
}
