//! The daemon's server: accept loop, one task per connection, bounded
//! pipelining, ordered answers, stats, and a draining shutdown.
//!
//! [`run`] takes an already bound [`UnixListener`] (the mini-redis shape), so
//! tests, a path the daemon binds itself, and a socket passed in by systemd all
//! share one code path. It knows nothing of llama.cpp: it talks to an
//! [`Engine`] handle.

use std::collections::BTreeMap;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::engine::{ms, Engine, JobResult};
use crate::protocol::{
    decode_line, encode_line, Command, ErrorResponse, ErrorType, Frame, Label, LatencyMs,
    LineCodec, Request, RequestError, Verdict,
};
use crate::registry::{Outcome, Registry};

/// Limits and timing of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Longest accepted request line in bytes; longer lines get `line_too_long`.
    pub max_line_bytes: usize,
    /// Requests one connection may have in flight (read, not yet answered);
    /// past it the connection is not read until an answer is written.
    pub max_in_flight_per_connection: usize,
    /// After a shutdown signal, how long to wait for in-flight requests.
    pub shutdown_grace: Duration,
    /// After a shutdown signal, a connection's lines already sent are still read
    /// until it is quiet for this long.
    pub drain_quiet: Duration,
    /// Deadline from reading a request to its answer; past it the answer is `timeout`.
    pub request_timeout: Duration,
    /// What an answer looks like when a request cannot be scored.
    pub on_error: OnError,
    /// Connections served at once; more are answered `too_many_connections` and closed.
    pub max_connections: usize,
    /// A connection with nothing in flight and no new line for this long is closed (`idle_timeout`).
    pub idle_timeout: Duration,
    /// A line must arrive complete within this long of its first byte (`slow_client`).
    pub line_timeout: Duration,
    /// Peers allowed by uid (SO_PEERCRED); empty with `allow_gids` empty: everyone
    /// who can open the socket (its file mode decides).
    pub allow_uids: Vec<u32>,
    /// Peers allowed by primary gid.
    pub allow_gids: Vec<u32>,
    /// Bounds on the one-sentence reason a request asks for with `"explain": true`.
    pub explain_limits: crate::engine::ExplainLimits,
}

/// The fail-closed policy: an answer that is not a verdict is never benign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Answer an error line (`{"id","error"}`) without a label; the client must
    /// not pass the prompt on. The default.
    #[default]
    Refuse,
    /// Answer the error line with `"label": "malicious"` and `"score": 1.0`
    /// added, for clients that read only the label.
    Flag,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_line_bytes: crate::protocol::DEFAULT_MAX_LINE_BYTES,
            max_in_flight_per_connection: 16,
            shutdown_grace: Duration::from_secs(30),
            drain_quiet: Duration::from_millis(100),
            request_timeout: Duration::from_secs(30),
            on_error: OnError::Refuse,
            max_connections: 1024,
            idle_timeout: Duration::from_secs(300),
            line_timeout: Duration::from_secs(10),
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            explain_limits: crate::engine::ExplainLimits::default(),
        }
    }
}

/// Counters and latency percentiles reported by `{"cmd": "stats"}`.
pub struct Stats {
    started: Instant,
    benign: AtomicU64,
    malicious: AtomicU64,
    connections_total: AtomicU64,
    connections_open: AtomicU64,
    /// Requests read but never answered: their client hung up first.
    abandoned: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Requests per peer uid.
    by_uid: Mutex<BTreeMap<u32, u64>>,
    /// Total latency of answered classifications, in microseconds.
    latency_us: Mutex<hdrhistogram::Histogram<u64>>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            started: Instant::now(),
            benign: AtomicU64::new(0),
            malicious: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            by_uid: Mutex::new(BTreeMap::new()),
            latency_us: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
                    .expect("static histogram bounds are valid"),
            ),
        }
    }

    fn record_abandoned(&self, n: u64) {
        self.abandoned.fetch_add(n, Ordering::Relaxed);
    }

    fn record_error(&self, kind: ErrorType) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind.as_str())
            .or_insert(0) += 1;
    }

    fn record_uid(&self, uid: Option<u32>) {
        if let Some(uid) = uid {
            *self
                .by_uid
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(uid)
                .or_insert(0) += 1;
        }
    }

    fn record_verdict(&self, label: Label, total: Duration) {
        match label {
            Label::Benign => &self.benign,
            Label::Malicious => &self.malicious,
        }
        .fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(total.as_micros()).unwrap_or(u64::MAX).max(1);
        self.latency_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(us);
    }

    fn to_json(&self, engine: &Engine) -> Value {
        let errors = self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let error_total: u64 = errors.values().sum();
        let (p50, p95, p99) = {
            let h = self.latency_us.lock().unwrap_or_else(|e| e.into_inner());
            let q = |x: f64| h.value_at_quantile(x) as f64 / 1000.0;
            (q(0.50), q(0.95), q(0.99))
        };
        let benign = self.benign.load(Ordering::Relaxed);
        let malicious = self.malicious.load(Ordering::Relaxed);
        json!({
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "requests": benign + malicious + error_total,
            "classified": {"benign": benign, "malicious": malicious},
            "errors": errors,
            "errors_total": error_total,
            "abandoned": self.abandoned.load(Ordering::Relaxed),
            "queue_depth": engine.queue_depth(),
            "queue_capacity": engine.queue_capacity(),
            "connections": {
                "open": self.connections_open.load(Ordering::Relaxed),
                "total": self.connections_total.load(Ordering::Relaxed),
            },
            "latency_ms": {"p50": p50, "p95": p95, "p99": p99},
            "requests_by_uid": self
                .by_uid
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(uid, n)| (uid.to_string(), *n))
                .collect::<BTreeMap<String, u64>>(),
        })
    }
}

struct Shared {
    engine: Engine,
    registry: Option<Arc<Registry>>,
    config: ServerConfig,
    stats: Stats,
    draining: CancellationToken,
}

/// An answer that will be written in its turn.
enum Pending {
    Ready(Vec<u8>),
    /// A command run in its turn (`reload`). It is a barrier on its
    /// connection: the lines after it are read only once it has run, so they
    /// are scored by the model it leaves serving (see [`Pending::barrier`]).
    Later(futures::future::BoxFuture<'static, Vec<u8>>),
    Scoring {
        id: Value,
        threshold: Option<f64>,
        normalized: Vec<crate::normalize::Change>,
        received: Instant,
        rx: oneshot::Receiver<JobResult>,
    },
}

impl Pending {
    /// For [`Pending::Later`], the same command wrapped to signal when it has
    /// run, and the receiver the reader waits on before it reads on; other
    /// answers unchanged, with `None`.
    fn barrier(self) -> (Pending, Option<oneshot::Receiver<()>>) {
        match self {
            Pending::Later(fut) => {
                let (done, ran) = oneshot::channel();
                let fut = Box::pin(async move {
                    let bytes = fut.await;
                    let _ = done.send(());
                    bytes
                });
                (Pending::Later(fut), Some(ran))
            }
            other => (other, None),
        }
    }
}

/// Serves `listener` until `shutdown` completes, then stops accepting,
/// answers every request already read, and returns.
///
/// Returns `Ok(true)` when every in-flight request was answered within
/// [`ServerConfig::shutdown_grace`], `Ok(false)` when the grace ran out.
///
/// # Errors
/// None at present; the `Result` leaves room for listener faults that must stop the daemon.
pub async fn run(
    listener: UnixListener,
    engine: Engine,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<bool> {
    run_with_registry(listener, engine, None, config, shutdown).await
}

/// [`run`], with a models [`Registry`] behind `{"cmd": "reload"}` and
/// `{"cmd": "models"}`, and its reload status in `health` and `stats`.
///
/// # Errors
/// As [`run`].
pub async fn run_with_registry(
    listener: UnixListener,
    engine: Engine,
    registry: Option<Arc<Registry>>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<bool> {
    let grace = config.shutdown_grace;
    let shared = Arc::new(Shared {
        engine,
        registry,
        config,
        stats: Stats::new(),
        draining: CancellationToken::new(),
    });
    let tracker = TaskTracker::new();
    let connection_slots = Arc::new(Semaphore::new(shared.config.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    let slot = connection_slots.clone().try_acquire_owned();
                    tracker.spawn(async move {
                        shared.stats.connections_total.fetch_add(1, Ordering::Relaxed);
                        let Ok(_slot) = slot else {
                            let msg = format!(
                                "the daemon serves {} connections already (--max-connections); retry later",
                                shared.config.max_connections
                            );
                            refuse(stream, &shared, ErrorType::TooManyConnections, msg).await;
                            return;
                        };
                        let peer = Peer::of(&stream);
                        if !peer.allowed(&shared.config) {
                            tracing::warn!(uid = ?peer.uid, gid = ?peer.gid, pid = ?peer.pid, "peer refused");
                            let msg = "this peer's uid/gid is not allowed (--allow-uid, --allow-gid)".to_string();
                            refuse(stream, &shared, ErrorType::Forbidden, msg).await;
                            return;
                        }
                        shared.stats.connections_open.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = handle_connection(stream, &shared, peer).await {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        shared.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    drop(listener);
    tracing::info!(
        connections = shared.stats.connections_open.load(Ordering::Relaxed),
        "shutting down: no new connections, answering requests in flight"
    );
    shared.draining.cancel();
    crate::systemd::stopping();
    tracker.close();
    let finished = tokio::time::timeout(grace, tracker.wait()).await.is_ok();
    if !finished {
        tracing::error!(
            grace_s = grace.as_secs_f64(),
            "shutdown grace ran out with requests in flight"
        );
    }
    Ok(finished)
}

/// Bytes waiting in the socket's receive queue (FIONREAD); 0 if unknown.
fn queued_bytes(stream: &UnixStream) -> usize {
    use std::os::unix::io::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through a valid pointer.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

/// The peer's credentials from SO_PEERCRED.
#[derive(Debug, Clone, Copy, Default)]
struct Peer {
    uid: Option<u32>,
    gid: Option<u32>,
    pid: Option<i32>,
}

impl Peer {
    fn of(stream: &UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(c) => Peer {
                uid: Some(c.uid()),
                gid: Some(c.gid()),
                pid: c.pid(),
            },
            Err(_) => Peer::default(),
        }
    }

    fn allowed(&self, config: &ServerConfig) -> bool {
        if config.allow_uids.is_empty() && config.allow_gids.is_empty() {
            return true;
        }
        self.uid.is_some_and(|u| config.allow_uids.contains(&u))
            || self.gid.is_some_and(|g| config.allow_gids.contains(&g))
    }
}

/// Answers one error line to a connection that will not be served, and closes it.
async fn refuse(mut stream: UnixStream, shared: &Shared, kind: ErrorType, message: String) {
    shared.stats.record_error(kind);
    let line = encode_line(&with_policy(
        shared,
        ErrorResponse::new(Value::Null, RequestError::new(kind, message)),
    ));
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&line).await;
        let _ = stream.shutdown().await;
        // Read (and drop) what the client already sent, briefly: closing with
        // unread data resets the peer, which can lose the line just written.
        let mut sink = [0u8; 8192];
        let mut budget: usize = 64 * 1024;
        while budget > 0 {
            match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => budget = budget.saturating_sub(n),
                _ => break,
            }
        }
    })
    .await;
}

/// Applies the `--on-error` policy to an error answer.
fn with_policy(shared: &Shared, mut response: ErrorResponse) -> ErrorResponse {
    if shared.config.on_error == OnError::Flag {
        response.label = Some(Label::Malicious);
        response.score = Some(1.0);
    }
    response
}

async fn handle_connection(
    stream: UnixStream,
    shared: &Arc<Shared>,
    peer: Peer,
) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut frames = FramedRead::new(reader, LineCodec::new(shared.config.max_line_bytes));
    // One permit per request read and not yet answered: at most
    // `max_in_flight_per_connection`; past it the connection is not read.
    let permits = Arc::new(Semaphore::new(
        shared.config.max_in_flight_per_connection.max(1),
    ));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Pending, OwnedSemaphorePermit)>();
    let written = Arc::new(tokio::sync::Notify::new());

    let writer_shared = shared.clone();
    let writer_written = written.clone();
    let writer_task = async move {
        let fd = writer.as_ref().as_raw_fd();
        while let Some((pending, permit)) = rx.recv().await {
            let Some(bytes) = resolve(pending, &writer_shared, fd).await else {
                // The client closed its socket: nobody will read the answers.
                // Dropping the queue drops every reply channel, so queued jobs
                // are skipped and a running one stops at its next window.
                drop(permit);
                rx.close();
                let mut abandoned = 1;
                while rx.try_recv().is_ok() {
                    abandoned += 1;
                }
                writer_shared.stats.record_abandoned(abandoned);
                tracing::info!(abandoned, "client hung up; its requests are abandoned");
                return Ok(());
            };
            writer.write_all(&bytes).await?;
            drop(permit);
            writer_written.notify_one();
        }
        writer.shutdown().await
    };
    let max_in_flight = shared.config.max_in_flight_per_connection.max(1);

    let reader_task = async move {
        let mut idle_since = Instant::now();
        let mut drain_budget: Option<usize> = None;
        loop {
            // Wait for a slot; if shutdown starts meanwhile, fix the drain
            // budget now, not when a slot frees.
            let permit = loop {
                tokio::select! {
                    biased;
                    p = permits.clone().acquire_owned() => break p,
                    () = shared.draining.cancelled(), if drain_budget.is_none() => {
                        drain_budget = Some(
                            queued_bytes(frames.get_ref().as_ref()) + frames.read_buffer().len(),
                        );
                    }
                }
            };
            let Ok(permit) = permit else {
                break;
            };
            let frame = if shared.draining.is_cancelled() {
                // Shutting down: answer exactly the bytes this connection had
                // received when the drain began (kernel queue plus our buffer).
                let budget = drain_budget.get_or_insert_with(|| {
                    queued_bytes(frames.get_ref().as_ref()) + frames.read_buffer().len()
                });
                if *budget == 0 {
                    break;
                }
                match tokio::time::timeout(shared.config.drain_quiet, frames.next()).await {
                    Ok(f) => {
                        let used = match &f {
                            Some(Ok(Frame::Line(line))) => line.len() + 1,
                            _ => usize::MAX,
                        };
                        *budget = budget.saturating_sub(used);
                        f
                    }
                    Err(_) => break,
                }
            } else {
                // Wait for a line, closing slow senders and idle connections.
                let waited = loop {
                    let in_flight = max_in_flight - permits.available_permits() - 1;
                    let deadline = match frames.decoder().partial_since() {
                        Some(t) => Some((t + shared.config.line_timeout, ErrorType::SlowClient)),
                        None if in_flight == 0 => Some((
                            idle_since + shared.config.idle_timeout,
                            ErrorType::IdleTimeout,
                        )),
                        None => None,
                    };
                    // Without a partial line, wake at least every line_timeout to
                    // notice one that started meanwhile.
                    let recheck = Instant::now() + shared.config.line_timeout;
                    let sleep_until = match deadline {
                        Some((at, ErrorType::SlowClient)) => at,
                        Some((at, _)) => at.min(recheck),
                        None => recheck,
                    };
                    tokio::select! {
                        // A line already buffered wins over an expired timer.
                        biased;
                        f = frames.next() => break Ok(f),
                        () = tokio::time::sleep_until(sleep_until.into()) => {
                            if let Some((at, kind)) = deadline {
                                let still = match kind {
                                    ErrorType::SlowClient => frames.decoder().partial_since().is_some(),
                                    _ => frames.decoder().partial_since().is_none(),
                                };
                                if still && Instant::now() >= at {
                                    break Err(kind);
                                }
                            }
                        }
                        () = written.notified() => idle_since = Instant::now(),
                        () = shared.draining.cancelled() => break Err(ErrorType::ShuttingDown),
                    }
                };
                match waited {
                    Ok(f) => f,
                    Err(ErrorType::ShuttingDown) => continue, // re-enter in drain mode
                    Err(kind) => {
                        let message = match kind {
                            ErrorType::SlowClient => format!(
                                "a line took longer than {:.1} s to arrive (--line-timeout); closing",
                                shared.config.line_timeout.as_secs_f64()
                            ),
                            _ => format!(
                                "no request for {:.1} s (--idle-timeout); closing",
                                shared.config.idle_timeout.as_secs_f64()
                            ),
                        };
                        tracing::debug!(uid = ?peer.uid, pid = ?peer.pid, kind = kind.as_str(), "closing connection");
                        let pending =
                            error_pending(shared, Value::Null, RequestError::new(kind, message));
                        let _ = tx.send((pending, permit));
                        break;
                    }
                }
            };
            idle_since = Instant::now();
            // One near-limit line must not pin a megabyte to an idle
            // connection: give back a large read buffer once it is empty.
            let buffer = frames.read_buffer_mut();
            if buffer.is_empty() && buffer.capacity() > 64 * 1024 {
                *buffer = bytes::BytesMut::new();
            }
            let pending = match frame {
                None => break,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "read failed");
                    break;
                }
                Some(Ok(frame)) => {
                    tracing::debug!(uid = ?peer.uid, gid = ?peer.gid, pid = ?peer.pid, "request");
                    shared.stats.record_uid(peer.uid);
                    handle_frame(frame, shared)
                }
            };
            let (pending, barrier) = pending.barrier();
            if tx.send((pending, permit)).is_err() {
                // Writer gone: the client hung up while this line was read
                // (behind a reload, say). Dropping it skips its job.
                shared.stats.record_abandoned(1);
                break;
            }
            // A pipelined request behind a `reload` was once scored by the
            // model the reload replaced: it was submitted when read.
            if let Some(ran) = barrier {
                tokio::select! {
                    r = ran => if r.is_err() {
                        break; // writer gone before the command ran
                    },
                    // The client hung up: the command goes on without us.
                    () = tx.closed() => break,
                }
            }
        }
    };
    let (_, written) = tokio::join!(reader_task, writer_task);
    written
}

fn handle_frame(frame: Frame, shared: &Arc<Shared>) -> Pending {
    let received = Instant::now();
    let line = match frame {
        Frame::TooLong { max } => {
            return error_pending(
                shared,
                Value::Null,
                RequestError::new(
                    ErrorType::LineTooLong,
                    format!(
                        "the line is longer than {max} bytes (--max-line-bytes); it was discarded"
                    ),
                ),
            )
        }
        Frame::Line(line) => line,
    };
    match decode_line(&line) {
        Err((id, err)) => error_pending(shared, id, err),
        Ok(Request::Command(id, cmd)) => {
            let mut body = match cmd {
                Command::Health => health(shared),
                Command::Stats => {
                    let mut stats = shared.stats.to_json(&shared.engine);
                    merge_registry_status(shared, &mut stats);
                    stats
                }
                Command::Models | Command::Reload if shared.registry.is_none() => {
                    return error_pending(
                        shared,
                        id,
                        RequestError::new(
                            ErrorType::UnknownCommand,
                            "this daemon has no models directory",
                        ),
                    )
                }
                Command::Models => shared
                    .registry
                    .as_ref()
                    .map(|r| r.models_json())
                    .unwrap_or_default(),
                Command::Reload => {
                    let shared = shared.clone();
                    return Pending::Later(Box::pin(async move {
                        let Some(registry) = shared.registry.clone() else {
                            return Vec::new();
                        };
                        let (outcome, reason) = match registry.rescan().await {
                            Outcome::Unchanged => ("unchanged", None),
                            Outcome::Swapped { .. } => ("swapped", None),
                            Outcome::Failed(r) => ("failed", Some(r)),
                        };
                        let mut body = json!({
                            "id": id,
                            "outcome": outcome,
                            "reason": reason,
                            "model": shared.engine.info().model,
                        });
                        merge_registry_status(&shared, &mut body);
                        encode_line(&body)
                    }));
                }
            };
            body["id"] = id;
            Pending::Ready(encode_line(&body))
        }
        Ok(Request::Classify(req)) => {
            // The model sees what an attack means, not what it hides; the
            // answer says what was changed.
            let normalized = match crate::normalize::prepare(&req.text) {
                Ok(n) => n,
                Err(err) => return error_pending(shared, req.id, err),
            };
            let options = crate::engine::JobOptions {
                threshold: req.threshold,
                explain: req.explain.then_some(shared.config.explain_limits),
            };
            match shared.engine.try_submit_with(normalized.text, options) {
                Ok(rx) => Pending::Scoring {
                    id: req.id,
                    threshold: req.threshold,
                    normalized: normalized.changes,
                    received,
                    rx,
                },
                Err(err) => error_pending(shared, req.id, err),
            }
        }
    }
}

fn merge_registry_status(shared: &Shared, body: &mut Value) {
    if let (Some(registry), Some(obj)) = (&shared.registry, body.as_object_mut()) {
        if let Value::Object(extra) = registry.status_json() {
            obj.extend(extra);
        }
    }
}

fn health(shared: &Shared) -> Value {
    let status = if shared.draining.is_cancelled() {
        "draining"
    } else {
        "ok"
    };
    let mut body = json!({
        "status": status,
        "model": shared.engine.info().model,
        "default_threshold": shared.engine.info().default_threshold,
        "window_tokens": shared.engine.info().window_tokens,
        "queue_depth": shared.engine.queue_depth(),
        "uptime_s": shared.stats.started.elapsed().as_secs_f64(),
    });
    merge_registry_status(shared, &mut body);
    body
}

fn error_pending(shared: &Shared, id: Value, err: RequestError) -> Pending {
    shared.stats.record_error(err.kind);
    Pending::Ready(encode_line(&with_policy(
        shared,
        ErrorResponse::new(id, err),
    )))
}

/// How often a connection waiting for a score checks whether its client hung up.
const HANGUP_POLL: Duration = Duration::from_millis(100);

/// Whether the peer of the Unix stream socket `fd` has closed it entirely.
///
/// Linux reports `POLLHUP` on a stream socket once both directions are shut:
/// when the peer calls `close` (or exits), not when it only shuts its write
/// side (`nc -N`, `shutdown(SHUT_WR)`), which still wants its answers.
fn peer_hung_up(fd: std::os::fd::RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout; `fd` is owned by the caller's
    // socket for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// `fut`'s output, or `None` once the client of socket `fd` has hung up
/// (checked every [`HANGUP_POLL`]); `fut` is then left unfinished.
async fn unless_hung_up<F: Future + Unpin>(
    fut: &mut F,
    fd: std::os::fd::RawFd,
) -> Option<F::Output> {
    loop {
        tokio::select! {
            out = &mut *fut => return Some(out),
            () = tokio::time::sleep(HANGUP_POLL) => {
                if peer_hung_up(fd) {
                    return None;
                }
            }
        }
    }
}

/// The answer line for `pending`, or `None` when the client hung up while its
/// request was being scored or its `reload` ran (see [`peer_hung_up`]).
/// Dropping the reply channel stops a scoring job before its next window; a
/// reload cannot be cut short, so it is left to finish on its own task.
async fn resolve(pending: Pending, shared: &Shared, fd: std::os::fd::RawFd) -> Option<Vec<u8>> {
    let (id, threshold, normalized, received, mut rx) = match pending {
        Pending::Ready(bytes) => return Some(bytes),
        Pending::Later(mut fut) => {
            let bytes = unless_hung_up(&mut fut, fd).await;
            if bytes.is_none() {
                // A reload cannot be cut short; let it finish unowned.
                tokio::spawn(fut);
            }
            return bytes;
        }
        Pending::Scoring {
            id,
            threshold,
            normalized,
            received,
            rx,
        } => (id, threshold, normalized, received, rx),
    };
    let deadline = received + shared.config.request_timeout;
    let waited = match tokio::time::timeout_at(deadline.into(), unless_hung_up(&mut rx, fd)).await {
        Ok(None) => return None,
        Ok(Some(r)) => Ok(r),
        Err(_) => Err(()),
    };
    // Dropping the receiver makes the worker skip the job if it is still queued,
    // or stop it at its next window.
    drop(rx);
    let result = match waited {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(RequestError::new(
            ErrorType::Internal,
            "the inference worker dropped the request",
        )),
        Err(()) => Err(RequestError::new(
            ErrorType::Timeout,
            format!(
                "not scored within {:.1} s (--request-timeout)",
                shared.config.request_timeout.as_secs_f64()
            ),
        )),
    };
    Some(match result {
        Err(err) => {
            shared.stats.record_error(err.kind);
            encode_line(&with_policy(shared, ErrorResponse::new(id, err)))
        }
        Ok(scored) => {
            let threshold = threshold.unwrap_or(scored.default_threshold);
            let label = Label::from_score(scored.score.p_malicious, threshold);
            let total = received.elapsed();
            shared.stats.record_verdict(label, total);
            encode_line(&Verdict {
                id,
                label,
                score: scored.score.p_malicious,
                threshold,
                model: scored.model,
                tokens: scored.score.tokens,
                windows: scored.score.windows,
                early_exit_windows: scored.score.early_exit_windows,
                normalized,
                latency_ms: LatencyMs {
                    queue: scored.queue_ms,
                    infer: scored.infer_ms,
                    total: ms(total),
                },
                explained: crate::engine::reason::explained(scored.reason.as_ref()),
            })
        }
    })
}
