//! `promptgate bench`: the real daemon measured over its socket, side by side
//! with llama.cpp's own `llama-server` serving the same GGUF.
//!
//! For each model (a detector file or a GGUF): start-up time to the first
//! answer, latency p50/p95/p99 and throughput for short (about 20 tokens),
//! medium (about 150) and long (about 1,500) prompts at 1, 4 and 16
//! concurrent clients, and peak RSS (`VmHWM`). With `--llama-server BIN`,
//! the peer serves the detector's base GGUF on 127.0.0.1 and is sent, through
//! `/completion` (`n_predict: 1`, `n_probs`, `cache_prompt: true`), exactly
//! the token ids of promptgate's classification prompt (template prefix,
//! prompt, template suffix). Each (size, clients) cell alternates the two
//! servers round by round, so both see the same machine state, and the
//! ratios promptgate / llama-server come from the same run.
//!
//! Also measured in process, through the same `llama-cpp-2` crate: prompt
//! processing in tokens per second of one plain `llama_decode` of a long
//! classification prompt against promptgate's own scoring of that prompt
//! (issue 7's "within 10 % of llama.cpp's own tokens per second").
//!
//! The prompts are built from the project's own `data/hard_negatives.jsonl`
//! (compiled in), so the bench needs nothing outside the binary and the models.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::BenchArgs;
use crate::engine::llama::{LlamaConfig, LlamaScorer};
use crate::engine::Scorer;

/// The project's own prompts (source `promptgate_hard`), the bench's corpus.
const CORPUS: &str = include_str!("../data/hard_negatives.jsonl");

/// Target ratios of issue 7 (promptgate / llama-server, same run).
const TARGET_P50_RATIO: f64 = 0.5;
const TARGET_RPS_RATIO: f64 = 1.5;
const TARGET_PP_RATIO: f64 = 0.9;

/// A prompt length class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    /// About 20 tokens: one corpus row.
    Short,
    /// About 150 tokens: rows joined.
    Medium,
    /// About 1,500 tokens: rows joined.
    Long,
}

impl Size {
    /// Prompt tokens aimed at (at least this many, from whole rows).
    fn min_tokens(self) -> usize {
        match self {
            Size::Short => 14,
            Size::Medium => 150,
            Size::Long => 1500,
        }
    }

    /// Requests per (size, clients) cell when `--requests` is 0: at least
    /// one per client.
    fn default_requests(self, clients: usize) -> usize {
        let base = match self {
            Size::Short => 64,
            Size::Medium => 32,
            Size::Long => 8,
        };
        base.max(clients)
    }
}

/// Latency and throughput of one server in one cell.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// Requests answered.
    pub requests: usize,
    /// Requests that got an error or no answer.
    pub errors: usize,
    /// Latency percentiles over answered requests, ms.
    pub p50_ms: f64,
    /// 95th percentile, ms.
    pub p95_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Answered requests per second of wall time, over all rounds.
    pub rps: f64,
    /// llama-server only: prompt tokens it evaluated per request, p50
    /// (what its prompt cache did not cover).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evaluated_tokens_p50: Option<f64>,
}

/// One (size, clients) cell.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Prompt length class.
    pub size: Size,
    /// Prompt tokens (the text's own, without template), p50 over the prompts.
    pub prompt_tokens_p50: usize,
    /// Concurrent clients, each with one request in flight.
    pub clients: usize,
    /// promptgate's figures.
    pub promptgate: Side,
    /// llama-server's figures, when it ran.
    pub llama_server: Option<Side>,
    /// promptgate p50 / llama-server p50 (lower is better; target <= 0.5).
    pub p50_ratio: Option<f64>,
    /// promptgate rps / llama-server rps (higher is better; target >= 1.5 at 16 clients).
    pub rps_ratio: Option<f64>,
}

/// Prompt processing through the same crate, in process.
#[derive(Debug, Clone, Serialize)]
pub struct PromptProcessing {
    /// Tokens decoded (template and prompt).
    pub tokens: usize,
    /// One plain `llama_decode` of those tokens, tokens per second (median of runs).
    pub llama_cpp_tps: f64,
    /// promptgate's uncached scoring of the same prompt, tokens per second.
    pub promptgate_tps: f64,
    /// promptgate / llama.cpp (target >= 0.9).
    pub ratio: f64,
    /// Batching: short classification prompts (template and text, each in
    /// its own sequence) decoded together in one `llama_decode`, as
    /// (sequences, tokens per second). Whether batching concurrent requests
    /// could pay: it does only if tokens per second grow with sequences.
    pub batched_tps: Vec<(usize, f64)>,
}

/// Everything measured for one model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelRun {
    /// The model as named on the command line.
    pub model: String,
    /// The GGUF the peer served (a detector's base).
    pub gguf: String,
    /// Start-up to the first answer, ms.
    pub startup_ms: StartPair,
    /// Peak resident memory (VmHWM), MiB.
    pub peak_rss_mib: StartPair,
    /// In-process prompt processing, for a GGUF served zero-shot.
    pub prompt_processing: Option<PromptProcessing>,
    /// The cells.
    pub cells: Vec<Cell>,
}

/// One figure for each server.
#[derive(Debug, Clone, Serialize)]
pub struct StartPair {
    /// promptgate's.
    pub promptgate: f64,
    /// llama-server's, when it ran.
    pub llama_server: Option<f64>,
}

/// The whole report (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// CPU model and core count, from /proc/cpuinfo.
    pub machine: String,
    /// `--threads` given to both servers.
    pub threads: usize,
    /// llama-server's `--parallel`.
    pub peer_parallel: usize,
    /// One entry per model.
    pub runs: Vec<ModelRun>,
}

/// Runs `promptgate bench`.
///
/// # Errors
/// A model that cannot be loaded, a server that does not start within its
/// timeout, or an unwritable `--json` path. Request errors are counted, not fatal.
pub fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    if args.concurrency.contains(&0) || args.rounds == 0 || args.peer_parallel == 0 {
        bail!("--concurrency, --rounds and --peer-parallel must be at least 1");
    }
    // Fail before measuring, not after: the --json path must be writable.
    if let Some(path) = &args.json {
        std::fs::write(path, b"").with_context(|| format!("cannot write {}", path.display()))?;
    }
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
    });
    let models = if args.models.is_empty() {
        default_models(&args.models_dir)?
    } else {
        args.models.clone()
    };
    let dir = TempDir::new()?;
    let mut report = Report {
        machine: machine(),
        threads,
        peer_parallel: args.peer_parallel,
        runs: Vec::new(),
    };
    for name in &models {
        let run = bench_model(args, name, threads, &dir.0)?;
        print_run(&run);
        report.runs.push(run);
    }
    print_summary(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(report)
}

/// The shipped detectors, then every GGUF in `dir`, by file name.
fn default_models(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut detectors = Vec::new();
    let mut ggufs = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".detector.json") {
            detectors.push(name);
        } else if name.ends_with(".gguf") {
            ggufs.push(name);
        }
    }
    detectors.sort();
    ggufs.sort();
    detectors.extend(ggufs);
    if detectors.is_empty() {
        bail!("no detector or GGUF in {}", dir.display());
    }
    Ok(detectors)
}

/// The bench's socket and log directory, removed on every exit but a kill.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("promptgate-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes `cmd`'s process get SIGTERM when the bench dies, however it dies
/// (Linux `PR_SET_PDEATHSIG`), so no server outlives an interrupted bench.
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        })
    }
}

/// The corpus rows' texts.
fn corpus() -> Vec<String> {
    CORPUS
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("text").and_then(Value::as_str).map(str::to_string))
        .collect()
}

/// `count` distinct prompts of one size, with their token counts. Prompt `i`
/// starts at corpus row `i` and joins the rows after it (by newlines) until
/// it has at least `size.min_tokens()` tokens; short prompts (one or two
/// rows) must also stay within 32 tokens, or that start is skipped. Every
/// request of a run gets its own prompt, so no server can answer from a
/// cache of whole prompts (llama-server keeps finished prompts' KV state in
/// its slots and in RAM, `--cache-ram`); only the template prefix is shared.
/// When the corpus runs out of starts, prompts repeat.
fn prompts(scorer: &LlamaScorer, size: Size, count: usize) -> Vec<(String, usize)> {
    let rows = corpus();
    let row_tokens: Vec<usize> = rows.iter().map(|r| scorer.tokenize_text(r).len()).collect();
    let mut out: Vec<(String, usize)> = Vec::new();
    for start in 0..rows.len() {
        if out.len() >= count {
            break;
        }
        let (mut text, mut estimate) = (String::new(), 0usize);
        for k in 0..rows.len() {
            let j = (start + k) % rows.len();
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(&rows[j]);
            estimate += row_tokens[j] + 1;
            if estimate >= size.min_tokens() {
                break;
            }
        }
        let n = scorer.tokenize_text(&text).len();
        if n < size.min_tokens() || (size == Size::Short && n > 32) {
            continue;
        }
        out.push((text, n));
    }
    let unique = out.len();
    for i in 0..count.saturating_sub(unique) {
        out.push(out[i % unique.max(1)].clone());
    }
    out
}

fn bench_model(
    args: &BenchArgs,
    name: &str,
    threads: usize,
    dir: &Path,
) -> anyhow::Result<ModelRun> {
    let path = crate::registry::candidates_by_rule(&args.models_dir, Some(name))?
        .into_iter()
        .next()
        .with_context(|| format!("no model {name} in {}", args.models_dir.display()))?;
    let config = LlamaConfig {
        threads,
        ..LlamaConfig::default()
    };
    // The GGUF the peer serves (a detector's base, found as the daemon finds
    // it; the daemon itself checks its sha256). Its zero-shot scorer gives the
    // tokenizer and the classification template (a detector reads the same
    // template).
    let gguf = if crate::detector::file::is_detector_path(&path) {
        crate::detector::file::DetectorFile::read(&path)?
            .find_base(&path, Some(&args.models_dir))?
    } else {
        path.clone()
    };
    let mut zero_shot = LlamaScorer::load(&gguf, config.clone())?;
    let prompt_processing = if args.no_pp || crate::detector::file::is_detector_path(&path) {
        None
    } else {
        Some(prompt_processing_of(&mut zero_shot, threads)?)
    };
    eprintln!("bench: {name} (GGUF {})", gguf.display());

    let socket = dir.join("promptgate.sock");
    let started = Instant::now();
    let mut pg = Server::spawn_promptgate(args, name, threads, &socket)?;
    let first = prompts(&zero_shot, Size::Short, 1);
    let first_text = &first.first().context("no short prompt in the corpus")?.0;
    let pg_startup = pg.wait_first_answer(first_text, &zero_shot, started)?;

    let mut peer = match &args.llama_server {
        Some(bin) => {
            let started = Instant::now();
            let mut s = Server::spawn_llama_server(
                bin,
                &gguf,
                threads,
                args.peer_parallel,
                &dir.join("llama-server.log"),
            )?;
            let ms = s.wait_first_answer(first_text, &zero_shot, started)?;
            Some((s, ms))
        }
        None => None,
    };

    let mut cells = Vec::new();
    for &size in &args.sizes {
        // The plan of every cell at this size, to give each request its own prompt.
        let plan: Vec<(usize, usize, usize)> = args
            .concurrency
            .iter()
            .map(|&clients| {
                let requests = if args.requests == 0 {
                    size.default_requests(clients)
                } else {
                    args.requests.max(clients)
                };
                // Every round keeps all clients busy, so fewer rounds when
                // the requests cannot fill each of them.
                let rounds = args.rounds.clamp(1, (requests / clients).max(1));
                (clients, rounds, requests.div_ceil(rounds).max(clients))
            })
            .collect();
        let warm = |clients: usize| clients.max(args.peer_parallel);
        let needed: usize = plan
            .iter()
            .map(|&(clients, rounds, per_round)| warm(clients) + rounds * per_round)
            .sum();
        let set = prompts(&zero_shot, size, needed);
        if set.is_empty() {
            bail!("the corpus cannot make {size:?} prompts");
        }
        let mut tokens: Vec<usize> = set.iter().map(|(_, n)| *n).collect();
        tokens.sort_unstable();
        let bodies: Vec<Body> = set
            .iter()
            .map(|(text, _)| Body::new(text, &zero_shot))
            .collect();
        let mut cursor = 0usize;
        let mut take = |n: usize| {
            let slice = &bodies[cursor..cursor + n];
            cursor += n;
            slice
        };
        for &(clients, rounds, per_round) in &plan {
            // Warm-up, not counted: every slot of the peer and the daemon's
            // prefix cache see the template once at this size.
            let warm_up = take(warm(clients));
            pg.drive(warm_up, clients, clients)?;
            if let Some((s, _)) = &mut peer {
                s.drive(warm_up, warm(clients), warm(clients))?;
            }
            let mut pg_all = Samples::default();
            let mut peer_all = Samples::default();
            for _ in 0..rounds {
                // Both servers get the same prompts in each round.
                let round = take(per_round);
                pg_all.extend(pg.drive(round, clients, per_round)?);
                if let Some((s, _)) = &mut peer {
                    peer_all.extend(s.drive(round, clients, per_round)?);
                }
            }
            let promptgate = pg_all.side();
            let llama_server = peer.as_ref().map(|_| peer_all.side());
            let cell = Cell {
                size,
                prompt_tokens_p50: tokens[tokens.len() / 2],
                clients,
                p50_ratio: llama_server.as_ref().map(|l| promptgate.p50_ms / l.p50_ms),
                rps_ratio: llama_server.as_ref().map(|l| promptgate.rps / l.rps),
                promptgate,
                llama_server,
            };
            eprintln!("bench: {}", cell_line(&cell));
            cells.push(cell);
        }
    }
    let pg_rss = pg.peak_rss_mib();
    let peer_rss = peer.as_ref().map(|(s, _)| s.peak_rss_mib());
    drop(pg);
    let peer_startup = peer.as_ref().map(|(_, ms)| *ms);
    drop(peer);
    Ok(ModelRun {
        model: name.to_string(),
        gguf: gguf.display().to_string(),
        startup_ms: StartPair {
            promptgate: pg_startup,
            llama_server: peer_startup,
        },
        peak_rss_mib: StartPair {
            promptgate: pg_rss,
            llama_server: peer_rss,
        },
        prompt_processing,
        cells,
    })
}

/// Tokens per second of one plain `llama_decode` of a long classification
/// prompt (a fresh context with the scorer's own sizes) against the scorer's
/// uncached scoring of the same prompt. Median of 3 runs each, alternated.
fn prompt_processing_of(
    scorer: &mut LlamaScorer,
    threads: usize,
) -> anyhow::Result<PromptProcessing> {
    // Corpus rows joined up to 1,024 prompt tokens (or one window).
    let limit = scorer.window_tokens().unwrap_or(1024).min(1024);
    let mut text = String::new();
    for row in corpus() {
        let joined = if text.is_empty() {
            row
        } else {
            format!("{text}\n{row}")
        };
        if scorer.tokenize_text(&joined).len() > limit {
            break;
        }
        text = joined;
    }
    let tokens = scorer.classification_tokens(&text);
    let n = tokens.len();
    let model = scorer.shared_model();
    // The scorer's own ubatch size for a zero-shot model.
    let mut plain = PlainDecode::new(&model, vec![tokens], 512, threads)?;
    let mut raw = Vec::new();
    let mut ours = Vec::new();
    for _ in 0..3 {
        raw.push(plain.seconds()?);
        let t0 = Instant::now();
        scorer.score_uncached(&text)?;
        ours.push(t0.elapsed().as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let llama_cpp_tps = n as f64 / median(&mut raw);
    let promptgate_tps = n as f64 / median(&mut ours);
    drop(plain);

    let short = prompts(scorer, Size::Short, 16);
    let mut batched_tps = Vec::new();
    for seqs in [1usize, 4, 16] {
        let prompts: Vec<Vec<_>> = short
            .iter()
            .cycle()
            .take(seqs)
            .map(|(t, _)| scorer.classification_tokens(t))
            .collect();
        let total: usize = prompts.iter().map(Vec::len).sum();
        // All sequences in one ubatch: one decode, one pass over the weights.
        let mut plain = PlainDecode::new(&model, prompts, total, threads)?;
        let mut times = (0..3)
            .map(|_| plain.seconds())
            .collect::<anyhow::Result<Vec<f64>>>()?;
        batched_tps.push((seqs, total as f64 / median(&mut times)));
    }
    Ok(PromptProcessing {
        tokens: n,
        llama_cpp_tps,
        promptgate_tps,
        ratio: promptgate_tps / llama_cpp_tps,
        batched_tps,
    })
}

/// A plain `llama_decode` of some prompts, one sequence each, on a fresh
/// context of the model: llama.cpp's own speed through the same crate.
struct PlainDecode<'a> {
    ctx: llama_cpp_2::context::LlamaContext<'a>,
    batch: llama_cpp_2::llama_batch::LlamaBatch<'a>,
    prompts: Vec<Vec<llama_cpp_2::token::LlamaToken>>,
}

impl<'a> PlainDecode<'a> {
    /// A context holding all of `prompts`, decoded in ubatches of at most
    /// `n_ubatch` tokens on `threads` threads.
    fn new(
        model: &'a llama_cpp_2::model::LlamaModel,
        prompts: Vec<Vec<llama_cpp_2::token::LlamaToken>>,
        n_ubatch: usize,
        threads: usize,
    ) -> anyhow::Result<PlainDecode<'a>> {
        let total: usize = prompts.iter().map(Vec::len).sum();
        let n_ctx = u32::try_from(total + 16)?;
        let params = llama_cpp_2::context::params::LlamaContextParams::default()
            .with_n_ctx(std::num::NonZeroU32::new(n_ctx))
            .with_n_batch(n_ctx)
            .with_n_ubatch(n_ctx.min(u32::try_from(n_ubatch)?))
            .with_n_seq_max(u32::try_from(prompts.len())?)
            .with_kv_unified(true)
            .with_n_threads(i32::try_from(threads)?)
            .with_n_threads_batch(i32::try_from(threads)?);
        let ctx = model.new_context(crate::engine::llama::backend()?, params)?;
        let batch = llama_cpp_2::llama_batch::LlamaBatch::new(total, i32::try_from(prompts.len())?);
        Ok(PlainDecode {
            ctx,
            batch,
            prompts,
        })
    }

    /// Seconds of one decode of every prompt from an empty KV cache, with
    /// logits for each prompt's last token only.
    fn seconds(&mut self) -> anyhow::Result<f64> {
        self.batch.clear();
        for (s, p) in self.prompts.iter().enumerate() {
            for (i, &t) in p.iter().enumerate() {
                self.batch
                    .add(t, i32::try_from(i)?, &[i32::try_from(s)?], i + 1 == p.len())?;
            }
        }
        self.ctx.clear_kv_cache();
        let t0 = Instant::now();
        self.ctx.decode(&mut self.batch)?;
        Ok(t0.elapsed().as_secs_f64())
    }
}

/// One request, ready for either server.
#[derive(Clone)]
struct Body {
    /// promptgate's request line (with newline), without the id.
    text: String,
    /// llama-server's `/completion` body.
    completion: String,
}

impl Body {
    fn new(text: &str, scorer: &LlamaScorer) -> Body {
        let ids: Vec<i32> = scorer
            .classification_tokens(&crate::normalize::normalize(text).text)
            .iter()
            .map(|t| t.0)
            .collect();
        Body {
            text: text.to_string(),
            completion: json!({
                "prompt": ids,
                "n_predict": 1,
                "n_probs": 10,
                "cache_prompt": true,
                "temperature": 0.0,
            })
            .to_string(),
        }
    }
}

/// Latencies (s) and wall time of some rounds.
#[derive(Default)]
struct Samples {
    latencies: Vec<f64>,
    evaluated: Vec<f64>,
    errors: usize,
    wall: f64,
}

impl Samples {
    fn extend(&mut self, other: Samples) {
        self.latencies.extend(other.latencies);
        self.evaluated.extend(other.evaluated);
        self.errors += other.errors;
        self.wall += other.wall;
    }

    fn side(&self) -> Side {
        let mut l = self.latencies.clone();
        l.sort_by(f64::total_cmp);
        let pct = |q: f64| {
            if l.is_empty() {
                f64::NAN
            } else {
                let i = ((q * l.len() as f64).ceil() as usize).clamp(1, l.len()) - 1;
                l[i] * 1e3
            }
        };
        let mut e = self.evaluated.clone();
        e.sort_by(f64::total_cmp);
        Side {
            requests: l.len(),
            errors: self.errors,
            p50_ms: pct(0.5),
            p95_ms: pct(0.95),
            p99_ms: pct(0.99),
            rps: if self.wall > 0.0 {
                l.len() as f64 / self.wall
            } else {
                0.0
            },
            evaluated_tokens_p50: (!e.is_empty()).then(|| e[e.len() / 2]),
        }
    }
}

/// A server child process and how to ask it.
struct Server {
    child: Child,
    kind: Kind,
}

enum Kind {
    Promptgate(PathBuf),
    /// Base URL and the file its stderr goes to.
    LlamaServer(String, PathBuf),
}

impl Server {
    fn spawn_promptgate(
        args: &BenchArgs,
        name: &str,
        threads: usize,
        socket: &Path,
    ) -> anyhow::Result<Server> {
        let _ = std::fs::remove_file(socket);
        let child = die_with_parent(&mut Command::new(std::env::current_exe()?))
            .arg("--log")
            .arg("warn")
            .arg("serve")
            .arg("--socket")
            .arg(socket)
            .arg("--models-dir")
            .arg(&args.models_dir)
            .arg("--model")
            .arg(name)
            .arg("--threads")
            .arg(threads.to_string())
            .arg("--watch")
            .arg("off")
            // 16 queued long prompts take longer than the default 30 s
            // deadline; the bench measures waiting, it does not time it out.
            .args(["--request-timeout", "3600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start promptgate serve")?;
        Ok(Server {
            child,
            kind: Kind::Promptgate(socket.to_path_buf()),
        })
    }

    fn spawn_llama_server(
        bin: &Path,
        gguf: &Path,
        threads: usize,
        parallel: usize,
        log: &Path,
    ) -> anyhow::Result<Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        // Every slot holds a long prompt (1,500 tokens plus template).
        let n_ctx = 2048 * parallel.max(1);
        let child = die_with_parent(&mut Command::new(bin))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("-m")
            .arg(gguf)
            .args(["-t", &threads.to_string(), "-tb", &threads.to_string()])
            .args(["-c", &n_ctx.to_string(), "-np", &parallel.to_string()])
            .args(["-b", "2048", "-ub", "512", "--no-warmup"])
            // Full-size KV for sliding-window layers (Gemma 3): without it
            // llama-server cannot reuse a cached prefix on such models and
            // re-evaluates the whole template per request, which would flatter
            // promptgate. No effect on models without SWA.
            .arg("--swa-full")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(Server {
            child,
            kind: Kind::LlamaServer(format!("http://127.0.0.1:{port}"), log.to_path_buf()),
        })
    }

    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Promptgate(_) => "promptgate",
            Kind::LlamaServer(..) => "llama-server",
        }
    }

    /// Retries one short request until it is answered; ms since `started`.
    fn wait_first_answer(
        &mut self,
        text: &str,
        scorer: &LlamaScorer,
        started: Instant,
    ) -> anyhow::Result<f64> {
        let body = Body::new(text, scorer);
        let deadline = started + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait()? {
                let log = match &self.kind {
                    Kind::LlamaServer(_, log) => std::fs::read_to_string(log).unwrap_or_default(),
                    Kind::Promptgate(_) => String::new(),
                };
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "{} exited at start-up: {status}{}{}",
                    self.name(),
                    if tail.is_empty() { "" } else { ": " },
                    tail.join(" | ")
                );
            }
            if let Ok(mut client) = self.client() {
                if client.ask(&body, 0).is_ok() {
                    return Ok(started.elapsed().as_secs_f64() * 1e3);
                }
            }
            if Instant::now() > deadline {
                bail!("{} did not answer within 120 s of its start", self.name());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn client(&self) -> anyhow::Result<Client> {
        Ok(match &self.kind {
            Kind::Promptgate(socket) => {
                let stream = UnixStream::connect(socket)?;
                Client::Promptgate(BufReader::new(stream.try_clone()?), stream)
            }
            Kind::LlamaServer(base, _) => Client::LlamaServer(
                ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(600))
                    .build(),
                format!("{base}/completion"),
            ),
        })
    }

    /// `requests` requests over `clients` connections, each with one in flight.
    fn drive(
        &mut self,
        bodies: &[Body],
        clients: usize,
        requests: usize,
    ) -> anyhow::Result<Samples> {
        let next = AtomicUsize::new(0);
        let out = Mutex::new(Samples::default());
        let t0 = Instant::now();
        std::thread::scope(|s| -> anyhow::Result<()> {
            let mut handles = Vec::new();
            for _ in 0..clients {
                let mut client = self.client()?;
                let (next, out) = (&next, &out);
                handles.push(s.spawn(move || {
                    let mut local = Samples::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= requests {
                            break;
                        }
                        let t = Instant::now();
                        match client.ask(&bodies[i % bodies.len()], i) {
                            Ok(evaluated) => {
                                local.latencies.push(t.elapsed().as_secs_f64());
                                local.evaluated.extend(evaluated);
                            }
                            Err(e) => {
                                if local.errors == 0 {
                                    eprintln!("bench: request error: {e:#}");
                                }
                                local.errors += 1;
                            }
                        }
                    }
                    out.lock().expect("samples").extend(local);
                }));
            }
            for h in handles {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
            }
            Ok(())
        })?;
        let mut samples = out.into_inner().expect("samples");
        samples.wall = t0.elapsed().as_secs_f64();
        Ok(samples)
    }

    /// Peak resident set (VmHWM) of the child, MiB.
    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM: the daemon drains and exits; then reap it.
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum Client {
    Promptgate(BufReader<UnixStream>, UnixStream),
    LlamaServer(ureq::Agent, String),
}

impl Client {
    /// Sends one request and waits for its answer. Returns, for llama-server,
    /// the prompt tokens it evaluated (`timings.prompt_n`).
    fn ask(&mut self, body: &Body, id: usize) -> anyhow::Result<Option<f64>> {
        match self {
            Client::Promptgate(reader, writer) => {
                let line = json!({"id": id, "text": body.text}).to_string() + "\n";
                writer.write_all(line.as_bytes())?;
                let mut answer = String::new();
                if reader.read_line(&mut answer)? == 0 {
                    bail!("promptgate closed the connection");
                }
                let v: Value = serde_json::from_str(&answer)?;
                if v.get("label").is_none() {
                    bail!("promptgate answered {}", answer.trim());
                }
                Ok(None)
            }
            Client::LlamaServer(agent, url) => {
                let v: Value = agent
                    .post(url)
                    .set("Content-Type", "application/json")
                    .send_string(&body.completion)?
                    .into_json()?;
                if v.get("completion_probabilities").is_none() {
                    bail!("llama-server answered without completion_probabilities");
                }
                Ok(v.pointer("/timings/prompt_n").and_then(Value::as_f64))
            }
        }
    }
}

fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get);
    format!("{name}, {cores} cores")
}

fn fmt_side(s: Option<&Side>) -> String {
    match s {
        Some(s) => format!(
            "{:>8.1} {:>8.1} {:>8.1} {:>7.2}{}",
            s.p50_ms,
            s.p95_ms,
            s.p99_ms,
            s.rps,
            if s.errors > 0 {
                format!(" ({} errors)", s.errors)
            } else {
                String::new()
            }
        ),
        None => format!("{:>8} {:>8} {:>8} {:>7}", "-", "-", "-", "-"),
    }
}

fn cell_line(c: &Cell) -> String {
    let ratio = |r: Option<f64>| r.map_or_else(|| "-".to_string(), |r| format!("{r:.2}"));
    format!(
        "{:<6} {:>6} {:>7} | {} | {} | {:>5} {:>5}",
        format!("{:?}", c.size).to_lowercase(),
        c.prompt_tokens_p50,
        c.clients,
        fmt_side(Some(&c.promptgate)),
        fmt_side(c.llama_server.as_ref()),
        ratio(c.p50_ratio),
        ratio(c.rps_ratio),
    )
}

fn print_run(run: &ModelRun) {
    let opt =
        |v: Option<f64>, unit: &str| v.map_or_else(|| "-".into(), |v| format!("{v:.0} {unit}"));
    println!("\n## {}  (GGUF {})", run.model, run.gguf);
    println!(
        "start-up to first answer: promptgate {:.0} ms, llama-server {}",
        run.startup_ms.promptgate,
        opt(run.startup_ms.llama_server, "ms")
    );
    println!(
        "peak RSS: promptgate {:.0} MiB, llama-server {}",
        run.peak_rss_mib.promptgate,
        opt(run.peak_rss_mib.llama_server, "MiB")
    );
    if let Some(pp) = &run.prompt_processing {
        println!(
            "prompt processing, {} tokens: llama.cpp {:.0} tok/s, promptgate {:.0} tok/s, ratio {:.3}",
            pp.tokens, pp.llama_cpp_tps, pp.promptgate_tps, pp.ratio
        );
        let batched: Vec<String> = pp
            .batched_tps
            .iter()
            .map(|(n, tps)| format!("{n} seq {tps:.0} tok/s"))
            .collect();
        println!("batched decode of short prompts: {}", batched.join(", "));
    }
    println!(
        "{:<6} {:>6} {:>7} | {:>8} {:>8} {:>8} {:>7} | {:>8} {:>8} {:>8} {:>7} | {:>5} {:>5}",
        "size",
        "tokens",
        "clients",
        "pg p50",
        "p95",
        "p99",
        "rps",
        "ls p50",
        "p95",
        "p99",
        "rps",
        "p50÷",
        "rps÷"
    );
    for c in &run.cells {
        println!("{}", cell_line(c));
    }
}

/// The targets, checked on every cell that has a peer figure.
fn print_summary(report: &Report) {
    println!("\n## targets (promptgate / llama-server, same run)");
    if report
        .runs
        .iter()
        .all(|r| r.cells.iter().all(|c| c.llama_server.is_none()) && r.prompt_processing.is_none())
    {
        println!("nothing to compare: no --llama-server and no prompt-processing run");
    }
    for run in &report.runs {
        for c in &run.cells {
            if c.size == Size::Short && c.clients == 1 {
                if let Some(r) = c.p50_ratio {
                    let ok = r <= TARGET_P50_RATIO;
                    println!(
                        "{} short p50 ratio, one client: {r:.2} (target <= {TARGET_P50_RATIO}) {}",
                        run.model,
                        if ok { "met" } else { "NOT met" }
                    );
                }
            }
            if c.clients == 16 {
                if let Some(r) = c.rps_ratio {
                    let ok = r >= TARGET_RPS_RATIO;
                    println!(
                        "{} {} throughput ratio at 16 clients: {r:.2} (target >= {TARGET_RPS_RATIO}) {}",
                        run.model,
                        format!("{:?}", c.size).to_lowercase(),
                        if ok { "met" } else { "NOT met" }
                    );
                }
            }
        }
        if let Some(pp) = &run.prompt_processing {
            println!(
                "{} prompt processing vs llama.cpp: {:.3} (target >= {TARGET_PP_RATIO}) {}",
                run.model,
                pp.ratio,
                if pp.ratio >= TARGET_PP_RATIO {
                    "met"
                } else {
                    "NOT met"
                }
            );
        }
    }
}
