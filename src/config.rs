//! Command-line interface: one clap struct per subcommand. Every flag is also
//! an environment variable `PROMPTGATE_*` (the text-embeddings-inference habit),
//! so a systemd unit can configure the daemon with `Environment=` lines.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// promptgate: screens prompts for injection, jailbreaks and harmful requests
/// with a small GGUF model, before an AI agent sees them.
#[derive(Debug, Parser)]
#[command(name = "promptgate", version, about, long_about = None)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "PROMPTGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, in `tracing` env-filter syntax (e.g. `info`, `promptgate=debug`).
    #[arg(
        long,
        global = true,
        env = "PROMPTGATE_LOG",
        default_value = "info,llama-cpp-2=warn"
    )]
    pub log: String,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Commands,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Classify prompts once and print one JSON line each. Exit 0: all benign;
    /// 1: any malicious; 2: error.
    Classify(ClassifyArgs),
    /// Run the daemon on a Unix socket.
    Serve(ServeArgs),
    /// Measure detection quality on labelled JSONL through the daemon's scoring path.
    Eval(EvalArgs),
    /// Fit a detector (a classifier head on the base model's hidden states)
    /// and write it as OUT.detector.json; serve it from the base GGUF's directory.
    Train(TrainArgs),
    /// Measure latency, throughput, start-up and memory of the real daemon
    /// over its socket, side by side with llama-server on the same GGUF.
    Bench(BenchArgs),
}

/// `promptgate bench` (see docs/performance.md).
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Directory holding the models.
    #[arg(long, env = "PROMPTGATE_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// Models to measure, by name in --models-dir (comma-separated or
    /// repeated); default: every detector file, then every GGUF.
    #[arg(long = "model", env = "PROMPTGATE_BENCH_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,
    /// CPU threads, given to both promptgate and llama-server (default: all cores).
    #[arg(long, env = "PROMPTGATE_THREADS")]
    pub threads: Option<usize>,
    /// The llama-server binary to measure side by side (build it with
    /// benches/peer/build-llama-server.sh); without it only promptgate runs.
    #[arg(long, env = "PROMPTGATE_LLAMA_SERVER")]
    pub llama_server: Option<PathBuf>,
    /// llama-server's `--parallel` (slots).
    #[arg(long, env = "PROMPTGATE_BENCH_PEER_PARALLEL", default_value_t = 4)]
    pub peer_parallel: usize,
    /// Prompt sizes: short (~20 tokens), medium (~150), long (~1,500).
    #[arg(
        long,
        env = "PROMPTGATE_BENCH_SIZES",
        value_parser = EnumListItem::<crate::bench::Size>::new(),
        value_delimiter = ',',
        default_value = "short,medium,long"
    )]
    pub sizes: Vec<crate::bench::Size>,
    /// Concurrent clients, each with one request in flight.
    #[arg(
        long,
        env = "PROMPTGATE_BENCH_CONCURRENCY",
        value_delimiter = ',',
        default_value = "1,4,16"
    )]
    pub concurrency: Vec<usize>,
    /// Requests per server per cell (0: 64 short, 32 medium, 8 long, and at
    /// least one per client). Rounds that cannot give every client one
    /// request are merged.
    #[arg(long, env = "PROMPTGATE_BENCH_REQUESTS", default_value_t = 0)]
    pub requests: usize,
    /// Rounds each cell alternates between the two servers.
    #[arg(long, env = "PROMPTGATE_BENCH_ROUNDS", default_value_t = 2)]
    pub rounds: usize,
    /// Skip the in-process prompt-processing comparison.
    #[arg(long, env = "PROMPTGATE_BENCH_NO_PP")]
    pub no_pp: bool,
    /// Write the report as JSON here.
    #[arg(long, env = "PROMPTGATE_BENCH_JSON")]
    pub json: Option<PathBuf>,
}

/// `promptgate train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Labelled training rows (JSON Lines, as for `eval`); repeat to add files.
    #[arg(
        long,
        env = "PROMPTGATE_TRAIN_DATA",
        value_delimiter = ',',
        required = true
    )]
    pub data: Vec<PathBuf>,
    /// Labelled rows from the same sources, held apart: candidates and the threshold are chosen on them.
    #[arg(long, env = "PROMPTGATE_TRAIN_DEV")]
    pub dev: PathBuf,
    /// The base GGUF whose hidden states are the features.
    #[arg(long, env = "PROMPTGATE_TRAIN_BASE")]
    pub base: PathBuf,
    /// Output path without extension: writes OUT.detector.json.
    #[arg(long, env = "PROMPTGATE_TRAIN_OUT")]
    pub out: PathBuf,
    /// Candidate layers (il, from 0), all extracted in one pass; the head is fitted on each.
    #[arg(long, env = "PROMPTGATE_TRAIN_LAYERS", value_delimiter = ',')]
    pub layers: Option<Vec<u32>>,
    /// Poolings extracted from each candidate layer: `last` (the verdict
    /// position), `mean` and `max` (element-wise, over the prompt's tokens).
    /// Candidates take each alone, `last` with each other, and all together.
    #[arg(
        long,
        env = "PROMPTGATE_TRAIN_POOLINGS",
        value_parser = EnumListItem::<crate::engine::llama::Pooling>::new(),
        value_delimiter = ',',
        default_value = "last,mean"
    )]
    pub poolings: Vec<crate::engine::llama::Pooling>,
    /// Prompt tokens per window.
    #[arg(long, env = "PROMPTGATE_TRAIN_WINDOW_TOKENS", default_value_t = 256)]
    pub window_tokens: usize,
    /// At most this many training rows per (source, label) group (0: all), drawn with --seed.
    #[arg(long, env = "PROMPTGATE_TRAIN_PER_GROUP", default_value_t = 400)]
    pub per_group: usize,
    /// At most this many dev rows (0: all), stratified by (source, label), drawn with --seed.
    #[arg(long, env = "PROMPTGATE_TRAIN_DEV_LIMIT", default_value_t = 0)]
    pub dev_limit: usize,
    /// Seed for sampling rows.
    #[arg(long, env = "PROMPTGATE_TRAIN_SEED", default_value_t = 42)]
    pub seed: u64,
    /// L2 penalties tried for the head.
    #[arg(
        long,
        env = "PROMPTGATE_TRAIN_L2",
        value_delimiter = ',',
        default_value = "0.0001,0.001,0.01,0.1"
    )]
    pub l2: Vec<f64>,
    /// The threshold maximises dev F1 subject to a dev false-positive rate at most this.
    #[arg(long, env = "PROMPTGATE_TRAIN_MAX_FPR", default_value_t = 0.03)]
    pub max_fpr: f64,
    /// Trade dev F1 for speed: ship the candidate whose deepest layer is
    /// shallowest among those within this much of the best dev F1 (0: the
    /// best dev F1 wins).
    #[arg(long, env = "PROMPTGATE_TRAIN_F1_TOLERANCE", default_value_t = 0.0)]
    pub f1_tolerance: f64,
    /// Also fit heads with one ReLU hidden layer of this many units (a small
    /// MLP) on every candidate layer together with every `--poolings`, one per
    /// `--hidden-l2`; they compete with the logistic heads on dev F1. 0: none.
    #[arg(long, env = "PROMPTGATE_TRAIN_HIDDEN", default_value_t = 0)]
    pub hidden: usize,
    /// L2 penalties tried for the hidden-layer heads (per-row λ; see
    /// `MlpParams::l2`).
    #[arg(
        long,
        env = "PROMPTGATE_TRAIN_HIDDEN_L2",
        value_delimiter = ',',
        default_value = "0.0005,0.002"
    )]
    pub hidden_l2: Vec<f64>,
    /// Passes over the training rows for each hidden-layer head.
    #[arg(long, env = "PROMPTGATE_TRAIN_HIDDEN_EPOCHS", default_value_t = 20)]
    pub hidden_epochs: usize,
    /// Also fit an early-exit head on these layers (a subset of the chosen
    /// head's, below its deepest): it decides the windows it is confident on
    /// as soon as its deepest layer is computed, so they skip the rest of the
    /// forward pass. Off when not given.
    #[arg(long, env = "PROMPTGATE_TRAIN_EARLY_EXIT", value_delimiter = ',')]
    pub early_exit: Option<Vec<u32>>,
    /// The early exit's benign bound is chosen on dev so that at most this
    /// fraction of the rows the full head calls malicious exit as benign.
    #[arg(long, env = "PROMPTGATE_TRAIN_EXIT_TOLERANCE", default_value_t = 0.005)]
    pub exit_tolerance: f64,
    /// The same for the malicious bound: at most this fraction of the rows
    /// the full head calls benign exit as malicious. 0 by default, so the
    /// exit adds no false positive on dev: a shallow head over-defends more
    /// ("Summarize the following email for me." scored 0.986 by blocks 8+12).
    #[arg(
        long,
        env = "PROMPTGATE_TRAIN_EXIT_TOLERANCE_MALICIOUS",
        default_value_t = 0.0
    )]
    pub exit_tolerance_malicious: f64,
    /// Where extracted features are cached (keyed by model sha256, settings and text).
    #[arg(
        long,
        env = "PROMPTGATE_FEATURE_CACHE",
        default_value = ".cache/features"
    )]
    pub cache_dir: PathBuf,
    /// CPU threads for the base model (default: all cores).
    #[arg(long, env = "PROMPTGATE_THREADS")]
    pub threads: Option<usize>,
    /// Only extract (and cache) features; fit nothing.
    #[arg(long, env = "PROMPTGATE_TRAIN_EXTRACT_ONLY")]
    pub extract_only: bool,
    /// `head`: a classifier head on the frozen model's hidden states (writes
    /// OUT.detector.json). `sft`: fine-tune the model itself to answer with a
    /// verdict token (writes OUT.gguf; docs/detector.md).
    #[arg(long, env = "PROMPTGATE_TRAIN_METHOD", value_enum, default_value_t = TrainMethod::Head)]
    pub method: TrainMethod,
    /// sft: peak learning rate (AdamW).
    #[arg(long, env = "PROMPTGATE_SFT_LR", default_value_t = 1e-5)]
    pub lr: f32,
    /// sft: linear warm-up steps.
    #[arg(long, env = "PROMPTGATE_SFT_WARMUP_STEPS", default_value_t = 20)]
    pub warmup_steps: u64,
    /// sft: AdamW weight decay.
    #[arg(long, env = "PROMPTGATE_SFT_WEIGHT_DECAY", default_value_t = 0.0)]
    pub weight_decay: f32,
    /// sft: passes over the training rows.
    #[arg(long, env = "PROMPTGATE_SFT_EPOCHS", default_value_t = 1)]
    pub epochs: u32,
    /// sft: stop after this many optimizer steps (one 256-token window each; 0: no limit).
    #[arg(long, env = "PROMPTGATE_SFT_MAX_STEPS", default_value_t = 0)]
    pub max_steps: u64,
    /// sft: stop training once this run's training loop (steps, held-apart
    /// evaluations and checkpoints; wall time, counted afresh on --resume)
    /// has run this many seconds (0: no limit); the step it stops on is
    /// evaluated and the best evaluated step kept as usual.
    #[arg(long, env = "PROMPTGATE_SFT_MAX_TRAIN_SECONDS", default_value_t = 0)]
    pub max_train_seconds: u64,
    /// sft: score the held-apart rows and write a checkpoint every this many steps.
    #[arg(long, env = "PROMPTGATE_SFT_EVAL_EVERY", default_value_t = 50)]
    pub eval_every: u64,
    /// sft: stop after this many evaluations without a better held-apart AUROC (0: never).
    #[arg(long, env = "PROMPTGATE_SFT_PATIENCE", default_value_t = 4)]
    pub patience: u32,
    /// sft: training rows held apart (stratified) for early stopping.
    #[arg(long, env = "PROMPTGATE_SFT_HOLDOUT", default_value_t = 200)]
    pub holdout: usize,
    /// sft: prompt tokens kept per training example, at most half a window
    /// minus the template (serving scores every window).
    #[arg(long, env = "PROMPTGATE_SFT_PROMPT_TOKENS", default_value_t = 160)]
    pub prompt_tokens: usize,
    /// sft: train only the last N transformer blocks (0: every block).
    #[arg(long, env = "PROMPTGATE_SFT_TRAIN_BLOCKS", default_value_t = 0)]
    pub train_blocks: u32,
    /// sft: weight type of the written GGUF.
    #[arg(long, env = "PROMPTGATE_SFT_QUANT", value_enum, default_value_t = crate::detector::sft::Quant::Q8_0)]
    pub quant: crate::detector::sft::Quant,
    /// sft: checkpoints and the F32 copy of the base go here.
    #[arg(long, env = "PROMPTGATE_SFT_WORK_DIR", default_value = ".cache/sft")]
    pub work_dir: PathBuf,
    /// sft: continue from the checkpoint in --work-dir (same data and settings).
    #[arg(long, env = "PROMPTGATE_SFT_RESUME")]
    pub resume: bool,
}

/// How `promptgate train` builds a detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TrainMethod {
    /// A head on frozen hidden states: logistic, or with one hidden layer (`--hidden`).
    Head,
    /// Supervised fine-tuning of the model (llama.cpp's training API).
    Sft,
}

/// `promptgate eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Labelled rows: JSON Lines of `{"text", "label": "malicious"|"benign", "source"?, "category"?}`.
    #[arg(long, env = "PROMPTGATE_EVAL_DATA")]
    pub data: std::path::PathBuf,
    /// Threshold on P(malicious); the model's default when absent.
    #[arg(long, env = "PROMPTGATE_THRESHOLD")]
    pub threshold: Option<f64>,
    /// Write the report as JSON to this path.
    #[arg(long, env = "PROMPTGATE_EVAL_JSON")]
    pub json: Option<std::path::PathBuf>,
    /// Draw the ROC curve and the score histogram per label to this SVG file.
    #[arg(long, env = "PROMPTGATE_EVAL_PLOT")]
    pub plot: Option<std::path::PathBuf>,
    /// Also print the threshold that maximises F1 with a false-positive rate of at most 5 %.
    #[arg(long, env = "PROMPTGATE_EVAL_SWEEP")]
    pub sweep: bool,
    /// Score only every k-th row so that about this many rows are used (0: all).
    #[arg(long, env = "PROMPTGATE_EVAL_LIMIT", default_value_t = 0)]
    pub limit: usize,
}

/// Which model to load and how to run it.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Directory holding GGUF models.
    #[arg(long, env = "PROMPTGATE_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// Pin the model: a detector file or a GGUF, by name in --models-dir or
    /// by path. Without it a detector file in the directory serves before any
    /// bare GGUF, and the newest valid one of its kind (see docs/models.md).
    #[arg(long, env = "PROMPTGATE_MODEL")]
    pub model: Option<String>,
    /// CPU threads for inference (default: all cores).
    #[arg(long, env = "PROMPTGATE_THREADS")]
    pub threads: Option<usize>,
    /// Context size in tokens (n_ctx): template plus one window of the prompt.
    #[arg(long, env = "PROMPTGATE_N_CTX", default_value_t = 2048)]
    pub n_ctx: u32,
    /// Tokens shared by consecutive windows when a prompt is longer than one window.
    #[arg(long, env = "PROMPTGATE_WINDOW_OVERLAP", default_value_t = 64)]
    pub window_overlap: usize,
    /// Longest prompt accepted, in tokens; longer ones get `input_too_long`.
    /// At least 64: the warm-up canaries a model must pass are up to 17 tokens.
    #[arg(long, env = "PROMPTGATE_MAX_PROMPT_TOKENS", default_value_t = 32_768,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(64..))]
    pub max_prompt_tokens: usize,
    /// Score every window with the detector's full head, never with its
    /// early-exit head (slower; see docs/detector.md).
    #[arg(long, env = "PROMPTGATE_NO_EARLY_EXIT")]
    pub no_early_exit: bool,
    /// Most tokens generated for one reason (`"explain": true`, `--explain`).
    #[arg(long, env = "PROMPTGATE_EXPLAIN_MAX_TOKENS", default_value_t = crate::engine::reason::DEFAULT_EXPLAIN_MAX_TOKENS, value_parser = parse_max_tokens)]
    pub explain_max_tokens: usize,
    /// Most milliseconds spent writing one reason, its prompt's evaluation included.
    #[arg(long, env = "PROMPTGATE_EXPLAIN_MAX_MS", default_value_t = crate::engine::reason::DEFAULT_EXPLAIN_MAX_MS)]
    pub explain_max_ms: u64,
}

impl ModelArgs {
    /// The bounds on one reason, from `--explain-max-tokens` and `--explain-max-ms`.
    pub fn explain_limits(&self) -> crate::engine::ExplainLimits {
        crate::engine::ExplainLimits {
            max_tokens: self.explain_max_tokens.max(1),
            max_time: std::time::Duration::from_millis(self.explain_max_ms),
        }
    }
}

/// `promptgate classify`.
#[derive(Debug, Args)]
pub struct ClassifyArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Threshold on P(malicious); the model's default when absent.
    #[arg(long, env = "PROMPTGATE_THRESHOLD")]
    pub threshold: Option<f64>,
    /// Add a one-sentence `reason` (and `reason_source`) to each answer.
    #[arg(long, env = "PROMPTGATE_EXPLAIN")]
    pub explain: bool,
    /// The prompt, or `-` to read one prompt per line from standard input.
    pub text: String,
}

/// `promptgate serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Unix socket path to bind (ignored when systemd passes a socket in LISTEN_FDS).
    #[arg(
        long,
        env = "PROMPTGATE_SOCKET",
        default_value = "/run/promptgate/promptgate.sock"
    )]
    pub socket: PathBuf,
    /// File mode of the socket, in octal.
    #[arg(long, env = "PROMPTGATE_SOCKET_MODE", default_value = "660", value_parser = parse_octal)]
    pub socket_mode: u32,
    /// Group of the socket file (name or gid), for clients that are not the daemon's user.
    #[arg(long, env = "PROMPTGATE_SOCKET_GROUP")]
    pub socket_group: Option<String>,
    /// Requests that may wait in the inference queue; past it, `overloaded` at once.
    #[arg(long, env = "PROMPTGATE_QUEUE_CAPACITY", default_value_t = crate::engine::DEFAULT_QUEUE_CAPACITY)]
    pub queue_capacity: usize,
    /// Longest request line in bytes; longer lines get `line_too_long`.
    #[arg(long, env = "PROMPTGATE_MAX_LINE_BYTES", default_value_t = crate::protocol::DEFAULT_MAX_LINE_BYTES)]
    pub max_line_bytes: usize,
    /// Requests one connection may have in flight before the daemon stops reading it.
    #[arg(long, env = "PROMPTGATE_MAX_IN_FLIGHT", default_value_t = 16)]
    pub max_in_flight: usize,
    /// Seconds to finish in-flight requests after SIGTERM or SIGINT.
    #[arg(long, env = "PROMPTGATE_SHUTDOWN_GRACE", default_value_t = 30.0)]
    pub shutdown_grace: f64,
    /// How to notice new model files: inotify, polling, or only SIGHUP and `{"cmd":"reload"}`.
    #[arg(long, env = "PROMPTGATE_WATCH", value_enum, default_value_t = WatchArg::Notify)]
    pub watch: WatchArg,
    /// Seconds between directory listings with `--watch poll`.
    #[arg(long, env = "PROMPTGATE_POLL_INTERVAL", default_value_t = 2.0)]
    pub poll_interval: f64,
    /// Quiet milliseconds after the last file event before the directory is re-scanned.
    #[arg(long, env = "PROMPTGATE_DEBOUNCE_MS", default_value_t = 500)]
    pub debounce_ms: u64,
    /// Seconds from reading a request to its answer; past it the answer is `timeout`.
    #[arg(long, env = "PROMPTGATE_REQUEST_TIMEOUT", default_value_t = 30.0)]
    pub request_timeout: f64,
    /// Answer to a request that cannot be scored: `refuse` (an error line, no
    /// label) or `flag` (the error line plus `"label":"malicious"`, `"score":1.0`).
    /// Never benign.
    #[arg(long, env = "PROMPTGATE_ON_ERROR", value_enum, default_value_t = OnErrorArg::Refuse)]
    pub on_error: OnErrorArg,
    /// Connections served at once; more get `too_many_connections` and are closed.
    #[arg(long, env = "PROMPTGATE_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a connection with nothing in flight may stay silent before it is closed.
    #[arg(long, env = "PROMPTGATE_IDLE_TIMEOUT", default_value_t = 300.0)]
    pub idle_timeout: f64,
    /// Seconds a request line may take from its first byte to its newline.
    #[arg(long, env = "PROMPTGATE_LINE_TIMEOUT", default_value_t = 10.0)]
    pub line_timeout: f64,
    /// Allow only these peer uids (SO_PEERCRED), comma-separated; others get `forbidden`.
    #[arg(long, env = "PROMPTGATE_ALLOW_UID", value_delimiter = ',')]
    pub allow_uid: Vec<u32>,
    /// Allow only these peer gids, comma-separated; others get `forbidden`.
    #[arg(long, env = "PROMPTGATE_ALLOW_GID", value_delimiter = ',')]
    pub allow_gid: Vec<u32>,
}

/// `--on-error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnErrorArg {
    /// An error line without a label.
    Refuse,
    /// An error line labelled malicious with score 1.0.
    Flag,
}

/// How `serve` watches its models directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WatchArg {
    /// inotify (close-after-write, rename, delete), debounced.
    Notify,
    /// List the directory every --poll-interval; a file must be unchanged across two polls.
    Poll,
    /// No watching: SIGHUP and `{"cmd":"reload"}` only.
    Off,
}

/// clap value parser for one item of a comma-separated [`clap::ValueEnum`]
/// list (`--poolings`, `--sizes`). clap's own enum parser words an empty
/// item (`last,,mean`) as "a value is required … but none was supplied", as
/// if the whole flag were missing; this one names the empty item. Other
/// items, and the possible values shown by `--help`, are clap's own.
#[derive(Clone)]
struct EnumListItem<T>(std::marker::PhantomData<T>);

impl<T> EnumListItem<T> {
    const fn new() -> Self {
        EnumListItem(std::marker::PhantomData)
    }
}

impl<T: clap::ValueEnum + Clone + Send + Sync + 'static> clap::builder::TypedValueParser
    for EnumListItem<T>
{
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        if value.is_empty() {
            let possible = self
                .possible_values()
                .into_iter()
                .flatten()
                .map(|p| p.get_name().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let name = arg.map_or_else(|| "the list".to_string(), |a| format!("'{a}'"));
            return Err(clap::Error::raw(
                clap::error::ErrorKind::InvalidValue,
                format!(
                    "empty item in the comma-separated list for {name} (two commas in a row, \
                     or one at an end)\n  [possible values: {possible}]\n"
                ),
            )
            .with_cmd(cmd));
        }
        clap::builder::EnumValueParser::<T>::new().parse_ref(cmd, arg, value)
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(
            T::value_variants()
                .iter()
                .filter_map(clap::ValueEnum::to_possible_value),
        ))
    }
}

fn parse_max_tokens(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=512).contains(&n) => Ok(n),
        _ => Err(format!("must be a whole number from 1 to 512, got {s:?}")),
    }
}

fn parse_octal(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|e| format!("not an octal mode: {e}"))?;
    if mode > 0o777 {
        return Err("mode must be at most 777".into());
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_an_env_var() {
        fn walk(cmd: &clap::Command) {
            for arg in cmd.get_arguments() {
                let positional = arg.get_long().is_none();
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !positional && !builtin {
                    let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                    assert!(
                        env.as_deref().is_some_and(|e| e.starts_with("PROMPTGATE_")),
                        "--{} has no PROMPTGATE_* variable",
                        arg.get_id()
                    );
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub);
            }
        }
        walk(&Cli::command());
    }

    #[test]
    fn regression_empty_item_in_poolings_said_no_value_was_supplied() {
        let err = |list: &str| {
            Cli::try_parse_from([
                "promptgate",
                "train",
                "--data",
                "t.jsonl",
                "--dev",
                "d.jsonl",
                "--base",
                "b.gguf",
                "--out",
                "o",
                "--poolings",
                list,
            ])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
        };
        let e = err("last,,mean");
        assert!(
            e.contains("empty item") && e.contains("last, mean, max"),
            "{e}"
        );
        assert!(!e.contains("none was supplied"), "{e}");
        let e = err("last,avg");
        assert!(e.contains("'avg'") && e.contains("last, mean, max"), "{e}");
        assert_eq!(err("last,max"), "");
    }

    #[test]
    fn socket_mode_is_octal() {
        assert_eq!(parse_octal("660").unwrap(), 0o660);
        assert_eq!(parse_octal("0o600").unwrap(), 0o600);
        assert!(parse_octal("999").is_err());
        assert!(parse_octal("1777").is_err());
    }
}
