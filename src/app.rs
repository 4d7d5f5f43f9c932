//! The subcommands, wired from their parts. `main` calls one function here per
//! subcommand and turns its [`ExitCode`] into the process status.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

use crate::config::{ClassifyArgs, EvalArgs, ModelArgs, OnErrorArg, ServeArgs, WatchArg};
use crate::engine::llama::{LlamaConfig, LlamaScorer};
use crate::engine::{ms, Scorer};
use crate::protocol::{
    encode_line, ErrorResponse, ErrorType, Label, LatencyMs, RequestError, Verdict,
};
use crate::registry::{Loader, Registry, RegistryConfig, WatchMode};
use crate::server::{OnError, ServerConfig};
use tokio_util::sync::CancellationToken;

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
            early_exit: !self.no_early_exit,
        }
    }

    /// Loads the model the registry's rule picks, trying the next candidate
    /// when one fails (the same rule as `serve`).
    fn load(&self) -> anyhow::Result<LlamaScorer> {
        let mut refused = Vec::new();
        for path in crate::registry::candidates_by_rule(&self.models_dir, self.model.as_deref())? {
            let loaded =
                load_model(&path, &self.models_dir, self.llama_config()).and_then(|mut s| {
                    crate::engine::warm_up(&mut s)?;
                    Ok(s)
                });
            match loaded {
                Ok(s) => return Ok(s),
                Err(e) => {
                    tracing::warn!(error = %e, "model refused");
                    refused.push(e.to_string());
                }
            }
        }
        anyhow::bail!("no model could be loaded: {}", refused.join("; "))
    }
}

/// Loads a servable unit: a detector file (with its base GGUF, found next to
/// it or in `models_dir`) or a bare GGUF with its zero-shot profile.
///
/// # Errors
/// The engine's load errors; a detector whose base is missing or differs.
pub fn load_model(
    path: &Path,
    models_dir: &Path,
    config: LlamaConfig,
) -> Result<LlamaScorer, crate::engine::EngineError> {
    if crate::detector::file::is_detector_path(path) {
        crate::detector::file::load_scorer(path, Some(models_dir), config)
    } else {
        LlamaScorer::load(path, config)
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
    let explain = args.explain.then(|| args.model.explain_limits());
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
                Ok(text) => classify_one(&mut scorer, threshold, explain, id, text),
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
            explain,
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
    explain: Option<crate::engine::ExplainLimits>,
    id: Value,
    text: &str,
) -> (Vec<u8>, ExitCode) {
    let started = Instant::now();
    let normalized = match crate::normalize::prepare(text) {
        Ok(n) => n,
        Err(err) => return error_line(id, err),
    };
    match scorer.score(&normalized.text) {
        Err(e) => error_line(id, e.to_request_error()),
        Ok(score) => {
            let label = Label::from_score(score.p_malicious, threshold);
            let infer = ms(started.elapsed());
            let reason = explain.map(|limits| {
                let ask = crate::engine::ExplainRequest {
                    label,
                    p_malicious: score.p_malicious,
                    threshold,
                    limits,
                };
                scorer
                    .explain(&normalized.text, &ask)
                    .map_err(|e| e.to_string())
            });
            let total = ms(started.elapsed());
            let line = encode_line(&Verdict {
                id,
                label,
                score: score.p_malicious,
                threshold,
                model: scorer.model().clone(),
                tokens: score.tokens,
                windows: score.windows,
                early_exit_windows: score.early_exit_windows,
                normalized: normalized.changes,
                latency_ms: LatencyMs {
                    queue: 0.0,
                    infer,
                    total,
                },
                explained: crate::engine::reason::explained(reason.as_ref()),
            });
            let outcome = match label {
                Label::Malicious => ExitCode::Malicious,
                Label::Benign => ExitCode::Ok,
            };
            (line, outcome)
        }
    }
}

/// Runs `promptgate train`: fits a detector and writes its file.
///
/// # Errors
/// Unreadable data or base model, or an unwritable output.
pub fn train(args: &crate::config::TrainArgs) -> anyhow::Result<ExitCode> {
    if args.method == crate::config::TrainMethod::Sft {
        let threads = args
            .threads
            .unwrap_or(crate::engine::llama::LlamaConfig::default().threads);
        let o = crate::detector::sft::SftOptions {
            data: args.data.clone(),
            dev: args.dev.clone(),
            base: args.base.clone(),
            out: args.out.clone(),
            per_group: args.per_group,
            dev_limit: args.dev_limit,
            holdout: args.holdout,
            seed: args.seed,
            lr: args.lr,
            warmup_steps: args.warmup_steps,
            weight_decay: args.weight_decay,
            epochs: args.epochs,
            max_steps: args.max_steps,
            max_train_seconds: args.max_train_seconds,
            eval_every: args.eval_every,
            patience: args.patience,
            prompt_tokens: args.prompt_tokens,
            train_blocks: args.train_blocks,
            quant: args.quant,
            max_fpr: args.max_fpr,
            work_dir: args.work_dir.clone(),
            resume: args.resume,
            threads,
        };
        let r = crate::detector::sft::run(&o)?;
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        eprintln!(
            "wrote {} ({} steps, kept step {}; held-apart loss {:.4} -> {:.4}; \
             {:.0} tok/s; threshold {:.4}: dev F1 {} FPR {} AUROC {} on {} rows)",
            r.gguf.display(),
            r.steps,
            r.best_step,
            r.holdout_loss_start,
            r.holdout_loss_best,
            r.tokens_per_s,
            r.threshold,
            f(r.dev_f1),
            f(r.dev_fpr),
            f(r.dev_auroc),
            r.dev_rows
        );
        return Ok(ExitCode::Ok);
    }
    crate::detector::train::run(args)?;
    Ok(ExitCode::Ok)
}

/// `promptgate eval`: scores labelled rows, prints a table, writes JSON.
///
/// # Errors
/// Unreadable data, model load failures, or an unwritable `--json` path.
pub fn eval(args: &EvalArgs) -> anyhow::Result<ExitCode> {
    if let Some(t) = args.threshold {
        anyhow::ensure!(
            (0.0..=1.0).contains(&t),
            "--threshold must be in [0, 1], got {t}"
        );
    }
    let mut rows = crate::detector::eval::read_rows(&args.data)?;
    if args.limit > 0 && rows.len() > args.limit {
        // Every k-th row: deterministic and spread over the whole file.
        let step = rows.len().div_ceil(args.limit);
        rows = rows.into_iter().step_by(step).collect();
    }
    // Output paths are checked before any row is scored, not after.
    for out in [&args.json, &args.plot].into_iter().flatten() {
        let dir = out.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            anyhow::ensure!(
                dir.is_dir(),
                "cannot write {}: directory {} does not exist",
                out.display(),
                dir.display()
            );
        }
    }
    anyhow::ensure!(!rows.is_empty(), "{} holds no rows", args.data.display());
    let mut scorer = args.model.load()?;
    let bar = crate::detector::train::progress_bar(rows.len() as u64, "eval");
    let (report, scored) = crate::detector::eval::evaluate(
        &mut scorer,
        &rows,
        args.threshold,
        &args.data.display().to_string(),
        |done, _| bar.set_position(done as u64),
    );
    bar.finish_and_clear();
    print!("{}", crate::detector::eval::table(&report));
    if args.sweep {
        match crate::detector::metrics::best_f1_threshold(&scored, 0.05) {
            Some((t, f1)) => {
                println!("sweep: threshold {t:.4} maximises F1 ({f1:.3}) with FPR <= 5 %")
            }
            None => println!("sweep: no threshold keeps FPR <= 5 % with a defined F1"),
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        crate::detector::plot::write_svg(path, &scored, report.threshold, &report.model.name)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::Ok)
}

/// `promptgate serve`: loads the model, takes or binds the socket, serves
/// until SIGTERM or SIGINT, answers what was received, and removes the socket.
///
/// # Errors
/// Model, socket or runtime failures at start-up.
pub fn serve(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    limit_malloc_arenas();
    // Settings that can be wrong are checked before the model loads.
    let socket_gid = match &args.socket_group {
        Some(g) => Some(crate::listener::resolve_group(g).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let config = args.model.llama_config();
    let models_dir = args.model.models_dir.clone();
    let loader: Loader = Arc::new(move |path: &Path| {
        Ok(Box::new(load_model(path, &models_dir, config.clone())?) as Box<dyn Scorer>)
    });
    let watch = match args.watch {
        WatchArg::Notify => WatchMode::Notify,
        WatchArg::Poll => WatchMode::Poll(Duration::from_secs_f64(args.poll_interval.max(0.05))),
        WatchArg::Off => WatchMode::Off,
    };
    let registry_config = RegistryConfig {
        dir: args.model.models_dir.clone(),
        pinned: args.model.model.clone(),
        watch,
        debounce: Duration::from_millis(args.debounce_ms),
    };
    // Load before binding: clients never meet a socket without a model behind it.
    let (registry, engine) = Registry::start(registry_config, loader, args.queue_capacity)?;
    let mut bound = match crate::listener::from_systemd()? {
        Some(b) => {
            tracing::info!("listening on the socket passed by systemd");
            b
        }
        None => {
            let b = crate::listener::bind(&args.socket, args.socket_mode, socket_gid)?;
            tracing::info!(socket = %args.socket.display(), mode = format!("{:o}", args.socket_mode), "listening");
            b
        }
    };
    let seconds = |s: f64| Duration::from_secs_f64(s.max(0.0));
    let server_config = ServerConfig {
        max_line_bytes: args.max_line_bytes,
        max_in_flight_per_connection: args.max_in_flight,
        shutdown_grace: seconds(args.shutdown_grace),
        request_timeout: seconds(args.request_timeout),
        on_error: match args.on_error {
            OnErrorArg::Refuse => OnError::Refuse,
            OnErrorArg::Flag => OnError::Flag,
        },
        max_connections: args.max_connections,
        idle_timeout: seconds(args.idle_timeout),
        line_timeout: seconds(args.line_timeout),
        allow_uids: args.allow_uid.clone(),
        allow_gids: args.allow_gid.clone(),
        explain_limits: args.model.explain_limits(),
        ..ServerConfig::default()
    };
    raise_fd_limit(args.max_connections);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let finished = runtime.block_on(async {
        let std_listener = bound
            .listener
            .take()
            .context("the listener was already taken")?;
        let listener =
            tokio::net::UnixListener::from_std(std_listener).context("registering the listener")?;
        let stop_watch = CancellationToken::new();
        tokio::spawn(registry.clone().watch(stop_watch.clone()));
        tokio::spawn(reload_on_sighup(registry.clone()));
        crate::systemd::ready(&format!("serving {}", engine.info().model.name));
        let finished = crate::server::run_with_registry(
            listener,
            engine,
            Some(registry.clone()),
            server_config,
            shutdown_signal(),
        )
        .await;
        stop_watch.cancel();
        // A SIGHUP's scan may still be loading a model on a blocking thread;
        // exiting under it could crash in llama.cpp's teardown.
        registry.stop().await;
        finished
    })?;
    drop(bound);
    runtime.shutdown_timeout(Duration::from_secs(1));
    tracing::info!("stopped");
    Ok(if finished {
        ExitCode::Ok
    } else {
        ExitCode::Error
    })
}

/// Caps glibc's malloc arenas at 2. Each model swap starts a new inference
/// thread; with per-thread arenas (up to 8 per core) a new thread may land on
/// a fresh arena and RSS wanders by an arena's size from swap to swap. Two
/// arenas keep the footprint steady; the daemon's threads rarely allocate
/// concurrently. `MALLOC_ARENA_MAX` in the environment still wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before the
        // inference threads start.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Raises the soft open-file limit towards the hard one, so that
/// `max_connections` clients (one fd each) plus the daemon's own files fit.
fn raise_fd_limit(max_connections: usize) {
    let want = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(64);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= want {
            return;
        }
        let before = lim.rlim_cur;
        lim.rlim_cur = want.min(lim.rlim_max);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
            tracing::debug!(
                from = before,
                to = lim.rlim_cur,
                "raised the open-file limit"
            );
        }
        if lim.rlim_cur < want {
            tracing::warn!(
                limit = lim.rlim_cur,
                max_connections,
                "the open-file limit is below --max-connections; accept() will fail before the cap"
            );
        }
    }
}

/// Re-scans the models directory on every SIGHUP (`systemctl reload`).
async fn reload_on_sighup(registry: Arc<Registry>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install the SIGHUP handler; use {{\"cmd\": \"reload\"}}");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP received: re-scanning the models directory");
        let outcome = registry.rescan().await;
        tracing::info!(?outcome, "re-scan done");
    }
}

/// Resolves on the first SIGTERM or SIGINT (shared with the soak harness).
pub async fn shutdown_signal() {
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
