//! The daemon's own overhead: socket, JSON, inference queue and reply channel,
//! with a fake scorer that costs nothing.
//!
//! The real server ([`promptgate::server::run`], the `serve` runtime shape of
//! two tokio workers) listens on a Unix socket in a temp dir. 1, 4 and 16
//! clients, each its own connection, send one request line
//! (`{"id":N,"text":"..."}`), wait for its answer line, and send the next.
//! The clients run in two shapes: one thread each (like separate processes,
//! whose wake-ups compete with the daemon's on a small CPU), and all as tasks
//! on one thread (the cheapest clients, closest to the daemon's own cost).
//!
//! - criterion reports the mean round trip per request (time per iteration)
//!   and the requests per second of all clients together (throughput);
//! - then a table gives p50/p95/p99 of 20,000 individual round trips per row
//!   (hdrhistogram), and the daemon's own p50 from `{"cmd":"stats"}`: from the
//!   line being read until its answer is ready to write.
//!
//! - the last column, wall time over requests, is what each request costs the
//!   daemon and clients together when 16 are in flight; the round trip at 16
//!   clients is about 16 times it, because every client waits behind the
//!   other 15 (docs/performance.md).
//!
//! Run with `cargo bench --bench server`. Target ("Fast on a small CPU"):
//! p50 under 0.2 ms per request at 16 clients.

use std::io::{BufRead, Write as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use futures::future::join_all;
use hdrhistogram::Histogram;
use promptgate::engine::{Engine, EngineError, Score, Scorer, DEFAULT_QUEUE_CAPACITY};
use promptgate::protocol::ModelRef;
use promptgate::server::ServerConfig;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

const LEVELS: [usize; 3] = [1, 4, 16];
/// Round trips per row of the percentile table, over all its clients.
const TABLE_REQUESTS: u64 = 20_000;
const TEXT: &str = "What is the capital of France? Answer in one word.";

/// A scorer of (about) zero cost.
struct Fake(ModelRef);

impl Scorer for Fake {
    fn model(&self) -> &ModelRef {
        &self.0
    }
    fn default_threshold(&self) -> f64 {
        0.5
    }
    fn score(&mut self, text: &str) -> Result<Score, EngineError> {
        Ok(Score {
            p_malicious: 0.1,
            tokens: text.len(),
            windows: 1,
            early_exit_windows: 0,
        })
    }
}

/// The real server on its own runtime, stopped on drop.
struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<anyhow::Result<bool>>>,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("promptgate.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let engine = Engine::spawn(DEFAULT_QUEUE_CAPACITY, || {
            let model = ModelRef {
                name: "fake.gguf".into(),
                sha256: "00".repeat(32),
            };
            Ok(Box::new(Fake(model)) as Box<dyn Scorer>)
        })
        .unwrap();
        let listener = {
            let _in_runtime = runtime.enter();
            tokio::net::UnixListener::bind(&path).unwrap()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = ServerConfig {
            shutdown_grace: Duration::from_secs(2),
            ..ServerConfig::default()
        };
        let done = runtime.spawn(promptgate::server::run(listener, engine, config, async {
            let _ = stopped.await;
        }));
        Server {
            _dir: dir,
            path,
            runtime,
            stop: Some(stop),
            done: Some(done),
        }
    }

    /// The daemon's own p50 (read to answer ready) in ms, from `stats`.
    fn daemon_p50_ms(&self) -> f64 {
        let mut stream = std::os::unix::net::UnixStream::connect(&self.path).unwrap();
        stream.write_all(b"{\"cmd\":\"stats\"}\n").unwrap();
        let mut answer = String::new();
        std::io::BufReader::new(stream)
            .read_line(&mut answer)
            .unwrap();
        let stats: serde_json::Value = serde_json::from_str(&answer).unwrap();
        stats["latency_ms"]["p50"].as_f64().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        if let Some(done) = self.done.take() {
            let _ = self.runtime.block_on(done);
        }
    }
}

/// One connection, one request in flight.
struct Client {
    reader: tokio::io::BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    id: u64,
    line: Vec<u8>,
    answer: String,
}

impl Client {
    async fn connect(path: &Path) -> Client {
        let (reader, writer) = tokio::net::UnixStream::connect(path)
            .await
            .unwrap()
            .into_split();
        Client {
            reader: tokio::io::BufReader::new(reader),
            writer,
            id: 0,
            line: Vec::new(),
            answer: String::new(),
        }
    }

    /// `requests` round trips, one after the other, timed one by one (ns).
    async fn run(&mut self, requests: u64) -> Histogram<u64> {
        let mut hist = histogram();
        for _ in 0..requests {
            self.id += 1;
            self.line.clear();
            writeln!(self.line, "{{\"id\":{},\"text\":\"{TEXT}\"}}", self.id).unwrap();
            self.answer.clear();
            let sent = Instant::now();
            self.writer.write_all(&self.line).await.unwrap();
            self.reader.read_line(&mut self.answer).await.unwrap();
            hist.saturating_record(sent.elapsed().as_nanos() as u64);
            assert!(
                self.answer.contains("\"label\":\"benign\""),
                "{}",
                self.answer
            );
        }
        hist
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 3).unwrap()
}

/// How the client connections are spread over threads.
#[derive(Clone, Copy)]
enum Shape {
    /// One thread per connection, like clients in separate processes: on a
    /// small CPU their own wake-ups compete with the daemon's.
    Threads,
    /// All connections on one thread (a tokio current-thread runtime): the
    /// cheapest clients, closest to the daemon's own cost.
    Tasks,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Threads => "threads",
            Shape::Tasks => "tasks",
        }
    }
}

/// `n` client connections on client threads, driven in rounds.
struct Clients {
    orders: Vec<mpsc::Sender<u64>>,
    results: mpsc::Receiver<Histogram<u64>>,
    threads: Vec<JoinHandle<()>>,
}

impl Clients {
    fn connect(path: &Path, n: usize, shape: Shape) -> Clients {
        let (threads, per_thread) = match shape {
            Shape::Threads => (n, 1),
            Shape::Tasks => (1, n),
        };
        let (result_tx, results) = mpsc::channel();
        let mut clients = Clients {
            orders: Vec::new(),
            results,
            threads: Vec::new(),
        };
        for _ in 0..threads {
            let (order_tx, orders) = mpsc::channel::<u64>();
            let (path, results) = (path.to_owned(), result_tx.clone());
            clients.orders.push(order_tx);
            clients.threads.push(std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let mut connections =
                    runtime.block_on(join_all((0..per_thread).map(|_| Client::connect(&path))));
                // Each order: every connection makes this many round trips.
                for requests in orders {
                    let hists =
                        runtime.block_on(join_all(connections.iter_mut().map(|c| c.run(requests))));
                    let mut all = histogram();
                    hists.into_iter().for_each(|h| all.add(h).unwrap());
                    results.send(all).unwrap();
                }
            }));
        }
        // Every connection accepted before the first round.
        clients.round(1);
        clients
    }

    /// Every connection makes `per_client` round trips; returns the wall time
    /// and every round trip's latency in ns.
    fn round(&self, per_client: u64) -> (Duration, Histogram<u64>) {
        let started = Instant::now();
        for order in &self.orders {
            order.send(per_client).unwrap();
        }
        let mut all = histogram();
        for _ in 0..self.orders.len() {
            all.add(self.results.recv().unwrap()).unwrap();
        }
        (started.elapsed(), all)
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.orders.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Row {
    shape: Shape,
    clients: usize,
    hist: Histogram<u64>,
    wall: Duration,
    daemon_p50_ms: f64,
}

fn main() {
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    let mut rows = Vec::new();
    let mut group = criterion.benchmark_group("server_round_trip");
    for shape in [Shape::Threads, Shape::Tasks] {
        for n in LEVELS {
            // A fresh server per level, so its `stats` cover this level alone.
            let server = Server::start();
            let clients = Clients::connect(&server.path, n, shape);
            clients.round(200); // connections and caches warm
            let (wall, hist) = clients.round(TABLE_REQUESTS / n as u64);
            let daemon_p50_ms = server.daemon_p50_ms();
            rows.push(Row {
                shape,
                clients: n,
                hist,
                wall,
                daemon_p50_ms,
            });
            // Time per iteration: one round trip of each client, in parallel,
            // i.e. the mean round trip; throughput: requests per second.
            group.throughput(Throughput::Elements(n as u64));
            group.bench_function(BenchmarkId::new(shape.name(), n), |b| {
                b.iter_custom(|iters| clients.round(iters).0)
            });
        }
    }
    group.finish();
    criterion.final_summary();

    println!();
    println!("round trip per request, {TABLE_REQUESTS} requests per row (target: p50 < 0.2 ms at 16 clients)");
    println!(
        "{:>8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>11} {:>13} {:>13}",
        "clients",
        "on",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "mean ms",
        "requests/s",
        "daemon p50 ms",
        "ms / request"
    );
    for row in &rows {
        let ms = |ns: u64| ns as f64 / 1e6;
        println!(
            "{:>8} {:>7} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>11.0} {:>13.3} {:>13.4}",
            row.clients,
            row.shape.name(),
            ms(row.hist.value_at_quantile(0.50)),
            ms(row.hist.value_at_quantile(0.95)),
            ms(row.hist.value_at_quantile(0.99)),
            ms(row.hist.max()),
            row.hist.mean() / 1e6,
            row.hist.len() as f64 / row.wall.as_secs_f64(),
            row.daemon_p50_ms,
            row.wall.as_secs_f64() * 1e3 / row.hist.len() as f64,
        );
    }
}
