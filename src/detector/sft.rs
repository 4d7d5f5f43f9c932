//! `promptgate train --method sft`: supervised fine-tuning of the base model
//! itself, through llama.cpp's own training API (`llama_opt_init` /
//! `llama_opt_epoch`, ggml-opt's AdamW), on the raw `llama-cpp-sys-2` bindings.
//!
//! The model learns to answer the fixed instruction [`SFT_SYSTEM`] with one
//! verdict token (`Yes`: attack, `No`: benign) right after the assistant
//! header. The result is an ordinary GGUF, served by the same path as any
//! model: the profile [`crate::engine::profile::sft`] (chosen from the GGUF's
//! `promptgate.profile` key) scores it from the two label tokens' logits, with
//! the threshold chosen on dev and stored as `promptgate.threshold`.
//!
//! How (the sequence and its workarounds follow ../shared/guide/training.md,
//! which measured it on this 2-core machine class):
//! 1. The base GGUF is dequantised to F32 (`llama_model_quantize`, ftype
//!    `ALL_F32`): ggml-opt trains F32 weights only. It is loaded without mmap
//!    so the weights are writable.
//! 2. A training context holds one window of [`WINDOW`] tokens
//!    (`n_ctx = n_batch = n_ubatch`, F32 KV cache, flash attention off):
//!    one window per optimizer step. Examples (template + prompt + verdict
//!    position) are packed into windows as pairs, one malicious and one
//!    benign in random order; a window's later examples attend to the earlier
//!    ones (the API has no per-example mask).
//! 3. **Loss on the verdict only.** ggml-opt puts a one-hot label on every
//!    position. The eval callback waits for the logits, then overwrites every
//!    row but the verdict rows: logits with zeros, label with the uniform
//!    distribution, so its gradient (softmax − label) is zero (see
//!    [`MaskState`]). ggml's own loss is then meaningless; the verdict loss
//!    and accuracy are computed here.
//! 4. Learning rate: linear warm-up then cosine decay, through ggml-opt's
//!    per-step `get_opt_pars` callback.
//! 5. A held-apart slice of the training rows (never trained on) is scored
//!    every `--eval-every` steps by a second, ordinary context on the same
//!    weights; the best step by its AUROC is kept, and training stops after
//!    `--patience` evaluations without improvement or after
//!    `--max-train-seconds` of steps.
//! 6. Checkpoints (the F32 weights and a JSON state) are written at every
//!    evaluation; `--resume` continues from the last one with the same step
//!    count and data order. AdamW's moments are not part of llama.cpp's API
//!    and restart at zero on resume.
//! 7. The best weights are quantised (`--quant`, Q8_0 by default, or Q4_K_M),
//!    scored on dev through the daemon's own scorer, and written again with
//!    the chosen threshold and the run's provenance as `promptgate.*` keys.
//!
//! Gemma 3 cannot be trained this way (ggml has no backward pass for its
//! GEGLU feed-forward); it is refused before any work. Llama-style models
//! (SmolLM2, Qwen) work.

use std::collections::HashSet;
use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use llama_cpp_sys_2 as sys;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::eval::{read_rows, Row};
use super::metrics::{auroc, best_f1_threshold, recall_at_fpr, Confusion, Scored};
use super::train::{sample_per_group, sample_stratified, text_hash};
use crate::engine::llama::{sha256_file, LlamaConfig, LlamaScorer};
use crate::engine::profile::{self, SFT_PROFILE, SFT_SYSTEM, TEXT_SLOT};
use crate::engine::Scorer;

/// Tokens per training window (one optimizer step). llama.cpp rounds a
/// context up to a multiple of 256, and a training context must see exactly
/// `n_ctx` tokens per batch (training.md).
pub const WINDOW: usize = 256;

/// GGUF keys written on the result.
pub mod keys {
    /// The profile the GGUF is served with ([`super::SFT_PROFILE`]).
    pub const PROFILE: &str = "promptgate.profile";
    /// Threshold on P(malicious) chosen on dev, decimal text.
    pub const THRESHOLD: &str = "promptgate.threshold";
    /// The llama.cpp built-in chat template the model was trained with
    /// (llama.cpp's GGUF writer drops `tokenizer.chat_template`).
    pub const TEMPLATE: &str = "promptgate.template";
    /// Hex sha256 of the base GGUF the weights started from.
    pub const BASE_SHA256: &str = "promptgate.sft.base_sha256";
    /// File name of the base GGUF.
    pub const BASE_FILE: &str = "promptgate.sft.base_file";
    /// Optimizer steps taken (windows of [`super::WINDOW`] tokens), decimal text.
    pub const STEPS: &str = "promptgate.sft.steps";
    /// The step whose weights were kept (best held-apart AUROC), decimal text.
    pub const BEST_STEP: &str = "promptgate.sft.best_step";
    /// Peak learning rate, decimal text.
    pub const LR: &str = "promptgate.sft.lr";
    /// Sampling and order seed, decimal text.
    pub const SEED: &str = "promptgate.sft.seed";
    /// sha256 over the training files' sha256s, in order.
    pub const DATA_SHA256: &str = "promptgate.sft.data_sha256";
    /// Quantisation of the weights (`q8_0`, `q4_k_m`, `f32`).
    pub const QUANT: &str = "promptgate.sft.quant";
}

/// Weight type of the written GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quant {
    /// 8-bit (`LLAMA_FTYPE_MOSTLY_Q8_0`): 1.06 bytes a weight, near-lossless.
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit k-quant mix (`LLAMA_FTYPE_MOSTLY_Q4_K_M`).
    #[value(name = "q4_k_m")]
    Q4KM,
    /// Unquantised (as trained).
    #[value(name = "f32")]
    F32,
}

impl Quant {
    fn ftype(self) -> sys::llama_ftype {
        match self {
            Quant::Q8_0 => sys::LLAMA_FTYPE_MOSTLY_Q8_0,
            Quant::Q4KM => sys::LLAMA_FTYPE_MOSTLY_Q4_K_M,
            Quant::F32 => sys::LLAMA_FTYPE_ALL_F32,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Quant::Q8_0 => "q8_0",
            Quant::Q4KM => "q4_k_m",
            Quant::F32 => "f32",
        }
    }
}

/// Settings of one fine-tuning run (the `train --method sft` flags).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftOptions {
    /// Training files (JSON Lines rows as for `eval`).
    pub data: Vec<PathBuf>,
    /// Dev file: the threshold is chosen on it.
    pub dev: PathBuf,
    /// Base GGUF.
    pub base: PathBuf,
    /// Output path; `.gguf` is appended unless present.
    pub out: PathBuf,
    /// At most this many training rows per (source, label) group (0: all).
    pub per_group: usize,
    /// At most this many dev rows, stratified (0: all).
    pub dev_limit: usize,
    /// Training rows held apart for early stopping (stratified).
    pub holdout: usize,
    /// Seed for sampling and order.
    pub seed: u64,
    /// Peak learning rate (AdamW).
    pub lr: f32,
    /// Warm-up steps (linear from 0 to `lr`).
    pub warmup_steps: u64,
    /// AdamW weight decay.
    pub weight_decay: f32,
    /// Passes over the training rows.
    pub epochs: u32,
    /// Stop after this many steps (0: no limit).
    pub max_steps: u64,
    /// Stop once this invocation's training loop (steps, held-apart
    /// evaluations and checkpoints; wall time, counted afresh on `--resume`)
    /// has run this many seconds (0: no limit). The step it stops on is
    /// evaluated like an `eval_every` step, so the kept weights are still the
    /// best evaluated ones.
    #[serde(default)]
    pub max_train_seconds: u64,
    /// Score the held-apart rows and checkpoint every this many steps.
    pub eval_every: u64,
    /// Stop after this many evaluations without a better held-apart AUROC (0: never).
    pub patience: u32,
    /// Prompt tokens kept per training example (longer prompts are cut for
    /// training only; serving scores every window).
    pub prompt_tokens: usize,
    /// Train only the last N transformer blocks (0: all, plus the output norm).
    pub train_blocks: u32,
    /// Weight type of the result.
    pub quant: Quant,
    /// The threshold maximises dev F1 subject to dev FPR at most this.
    pub max_fpr: f64,
    /// Checkpoints and the F32 copy live here.
    pub work_dir: PathBuf,
    /// Continue from the checkpoint in `work_dir`.
    pub resume: bool,
    /// CPU threads.
    pub threads: usize,
}

/// What a run did (also written as `OUT.sft.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftReport {
    /// The written GGUF.
    pub gguf: PathBuf,
    /// Optimizer steps taken in total (resumed steps included).
    pub steps: u64,
    /// Steps taken by this invocation.
    pub steps_this_run: u64,
    /// Step the run resumed from (0: fresh).
    pub resumed_from: u64,
    /// The step whose weights were kept.
    pub best_step: u64,
    /// Verdict loss (mean −log P(true label) over the two labels) on the
    /// held-apart rows before training.
    pub holdout_loss_start: f64,
    /// The same at the kept step.
    pub holdout_loss_best: f64,
    /// Held-apart AUROC at the kept step.
    pub holdout_auroc_best: Option<f64>,
    /// Verdict loss on a probe of up to 16 training examples before this
    /// invocation's first step (the fit, as opposed to the held-apart loss).
    pub train_probe_loss_start: f64,
    /// The same after its last step.
    pub train_probe_loss_end: f64,
    /// Training verdict loss, mean over each evaluation interval, in order.
    pub train_loss: Vec<(u64, f64)>,
    /// Held-apart verdict loss at each evaluation, in order.
    pub holdout_loss: Vec<(u64, f64)>,
    /// Held-apart AUROC at each evaluation, in order (what picks the kept step).
    #[serde(default)]
    pub holdout_auroc: Vec<(u64, f64)>,
    /// Training examples (verdict positions) seen.
    pub examples_seen: u64,
    /// Window tokens per second of training (padding included).
    pub tokens_per_s: f64,
    /// Real (non-padding) tokens per second of training.
    pub real_tokens_per_s: f64,
    /// Threshold chosen on dev.
    pub threshold: f64,
    /// Dev F1 at the threshold.
    pub dev_f1: Option<f64>,
    /// Dev FPR at the threshold.
    pub dev_fpr: Option<f64>,
    /// Dev AUROC.
    pub dev_auroc: Option<f64>,
    /// Dev recall at 1 % FPR.
    pub dev_recall_at_1pct_fpr: Option<f64>,
    /// Dev rows scored.
    pub dev_rows: usize,
    /// Wall seconds of this invocation's training loop: its steps and its
    /// held-apart evaluations and checkpoints (what `--max-train-seconds`
    /// bounds).
    pub train_seconds: f64,
    /// Seconds in all.
    pub total_seconds: f64,
    /// The settings.
    pub options: SftOptions,
}

/// Checkpoint state, `WORK/state.json` beside `WORK/checkpoint.gguf`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    /// Hash of the settings that fix the data order (a resume must match).
    key: String,
    step: u64,
    best_step: u64,
    best_loss: f64,
    #[serde(default)]
    best_auroc: Option<f64>,
    start_loss: f64,
    evals_since_best: u32,
    examples_seen: u64,
    train_loss: Vec<(u64, f64)>,
    holdout_loss: Vec<(u64, f64)>,
    #[serde(default)]
    holdout_auroc: Vec<(u64, f64)>,
    train_seconds: f64,
    window_tokens: u64,
    real_tokens: u64,
}

/// `OUT` → `OUT.gguf` (unchanged if it already ends so).
pub fn gguf_out_path(out: &Path) -> PathBuf {
    if out.extension().is_some_and(|e| e == "gguf") {
        out.to_path_buf()
    } else {
        PathBuf::from(format!("{}.gguf", out.display()))
    }
}

fn cstring(p: &Path) -> anyhow::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes()).context("path holds a NUL byte")
}

// ---------------------------------------------------------------- raw handles

struct Model(*mut sys::llama_model);

impl Model {
    fn load(path: &Path) -> anyhow::Result<Model> {
        crate::engine::llama::backend().map_err(|e| anyhow::anyhow!("{e}"))?;
        let c = cstring(path)?;
        // SAFETY: default params with mmap off; the pointer is checked and freed in Drop.
        let m = unsafe {
            let mut p = sys::llama_model_default_params();
            p.load_mode = sys::LLAMA_LOAD_MODE_NONE;
            p.n_gpu_layers = 999;
            sys::llama_model_load_from_file(c.as_ptr(), p)
        };
        ensure!(!m.is_null(), "llama.cpp could not load {}", path.display());
        Ok(Model(m))
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: live model.
        unsafe { sys::llama_model_get_vocab(self.0) }
    }

    fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<i32> {
        let len = i32::try_from(text.len()).unwrap_or(i32::MAX);
        let mut out = vec![0i32; text.len() + 8];
        // The first call may report (negated) a larger size needed; the second fits.
        for _ in 0..2 {
            // SAFETY: text and output buffer with their lengths.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab(),
                    text.as_ptr().cast(),
                    len,
                    out.as_mut_ptr(),
                    i32::try_from(out.len()).unwrap_or(i32::MAX),
                    add_special,
                    parse_special,
                )
            };
            match usize::try_from(n) {
                Ok(n) => {
                    out.truncate(n);
                    return out;
                }
                Err(_) => out.resize(n.unsigned_abs() as usize, 0),
            }
        }
        Vec::new()
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: allocated by llama_model_load_from_file, freed once, after every context.
        unsafe { sys::llama_model_free(self.0) };
    }
}

struct Ctx(*mut sys::llama_context);

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: allocated by llama_init_from_model, freed once.
        unsafe { sys::llama_free(self.0) };
    }
}

struct Batch(sys::llama_batch, usize);

impl Batch {
    fn new(n: usize) -> Batch {
        // SAFETY: token batch of capacity n, one sequence id per token.
        Batch(
            unsafe { sys::llama_batch_init(i32::try_from(n).unwrap_or(i32::MAX), 0, 1) },
            n,
        )
    }

    /// Fills the batch with `tokens` at positions 0.., logits for the last only.
    fn fill(&mut self, tokens: &[i32]) {
        assert!(tokens.len() <= self.1);
        // SAFETY: indices < capacity; arrays allocated by llama_batch_init.
        unsafe {
            for (i, &t) in tokens.iter().enumerate() {
                *self.0.token.add(i) = t;
                *self.0.pos.add(i) = i32::try_from(i).unwrap_or(i32::MAX);
                *self.0.n_seq_id.add(i) = 1;
                *(*self.0.seq_id.add(i)) = 0;
                *self.0.logits.add(i) = i8::from(i + 1 == tokens.len());
            }
        }
        self.0.n_tokens = i32::try_from(tokens.len()).unwrap_or(i32::MAX);
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: allocated by llama_batch_init, freed once.
        unsafe { sys::llama_batch_free(self.0) };
    }
}

fn context(
    model: &Model,
    n_ctx: usize,
    threads: usize,
    cb: Option<*mut MaskState>,
) -> anyhow::Result<Ctx> {
    let n = u32::try_from(n_ctx)?;
    // SAFETY: default params adjusted; the callback's user data outlives the context (the caller keeps it boxed).
    let c = unsafe {
        let mut p = sys::llama_context_default_params();
        p.n_ctx = n;
        p.n_batch = n;
        p.n_ubatch = n;
        p.n_seq_max = 1;
        p.n_threads = i32::try_from(threads).unwrap_or(1);
        p.n_threads_batch = p.n_threads;
        p.type_k = sys::GGML_TYPE_F32;
        p.type_v = sys::GGML_TYPE_F32;
        p.flash_attn_type = sys::LLAMA_FLASH_ATTN_TYPE_DISABLED;
        p.no_perf = true;
        if let Some(state) = cb {
            p.cb_eval = Some(mask_callback);
            p.cb_eval_user_data = state.cast::<c_void>();
        }
        sys::llama_init_from_model(model.0, p)
    };
    ensure!(!c.is_null(), "llama.cpp could not create a context");
    Ok(Ctx(c))
}

// ------------------------------------------------------------ verdict masking

/// Label id marking "no loss here" in a window's labels: no gradient flows
/// from such a position (see [`MaskState`]).
const MASK_ID: i32 = 0;

/// State of the eval callback on the training context.
///
/// ggml-opt puts a one-hot label on every position. To train on the verdict
/// positions alone, every other row of the cross-entropy node's inputs is
/// overwritten before the loss runs: its logits with zeros and its label
/// with the uniform distribution `1 / n_vocab`. The gradient of the loss with
/// respect to a row's logits is `softmax(logits) - label`, and the softmax of
/// a constant row is that same uniform distribution, so those rows carry no
/// gradient (up to float rounding). The backward pass of the output
/// projection reads that gradient and the hidden states, never the logits'
/// values, so zeroing them changes nothing else. Only the verdict rows are
/// read from the device (2 × `n_vocab` floats for a pair), and no softmax is
/// computed on the host: a step costs two `n_rows × n_vocab` writes.
struct MaskState {
    n_vocab: usize,
    yes: usize,
    no: usize,
    /// Rows (window positions) that carry a verdict this step, ascending.
    verdict_rows: Vec<usize>,
    /// Host copies written over the logits and labels: zeros and
    /// `1 / n_vocab` outside the verdict rows (those are patched per step
    /// and restored after).
    logits: Vec<f32>,
    labels: Vec<f32>,
    /// Sum of the verdict losses, verdict count and correct count since the last take.
    loss_sum: f64,
    verdicts: u64,
    correct: u64,
    /// Set when a step saw no loss node, or a verdict row's label was not the
    /// one-hot Yes or No the window put there (the masking would be wrong).
    missed: bool,
    seen_loss: bool,
    /// The logits node once the scheduler has computed it this step (null
    /// until then; reset before every step).
    computed_logits: *mut sys::ggml_tensor,
}

impl MaskState {
    fn mask(&mut self, logits: *mut sys::ggml_tensor, labels: *mut sys::ggml_tensor) {
        let nv = self.n_vocab;
        // SAFETY: both are live graph tensors of shape [n_vocab, n_rows], F32,
        // the logits computed (the callback split the graph after them); every
        // read and write stays inside `nv * rows` floats.
        unsafe {
            let rows = usize::try_from((*logits).ne[1]).unwrap_or(0);
            if usize::try_from((*logits).ne[0]).ok() != Some(nv)
                || (*labels).ne[0] != (*logits).ne[0]
                || (*labels).ne[1] != (*logits).ne[1]
                || (*logits).type_ != sys::GGML_TYPE_F32
                || (*labels).type_ != sys::GGML_TYPE_F32
                || self.verdict_rows.iter().any(|&r| r >= rows)
            {
                self.missed = true;
                return;
            }
            if self.logits.len() != nv * rows {
                self.logits = vec![0.0; nv * rows];
                self.labels = vec![1.0 / nv as f32; nv * rows];
            }
            let row_bytes = nv * 4;
            for &r in &self.verdict_rows {
                let lg = &mut self.logits[r * nv..(r + 1) * nv];
                let lb = &mut self.labels[r * nv..(r + 1) * nv];
                sys::ggml_backend_tensor_get(
                    logits,
                    lg.as_mut_ptr().cast(),
                    r * row_bytes,
                    row_bytes,
                );
                sys::ggml_backend_tensor_get(
                    labels,
                    lb.as_mut_ptr().cast(),
                    r * row_bytes,
                    row_bytes,
                );
                let malicious = lb[self.yes] == 1.0;
                if !malicious && lb[self.no] != 1.0 {
                    self.missed = true;
                }
                // Binary verdict loss over the two labels (what the score reads).
                let d = f64::from(lg[self.yes]) - f64::from(lg[self.no]);
                let p_mal = 1.0 / (1.0 + (-d).exp());
                let p_true = if malicious { p_mal } else { 1.0 - p_mal };
                self.loss_sum += -p_true.max(1e-12).ln();
                self.verdicts += 1;
                self.correct += u64::from(p_true > 0.5);
            }
            sys::ggml_backend_tensor_set(logits, self.logits.as_ptr().cast(), 0, nv * rows * 4);
            sys::ggml_backend_tensor_set(labels, self.labels.as_ptr().cast(), 0, nv * rows * 4);
        }
        for &r in &self.verdict_rows {
            self.logits[r * nv..(r + 1) * nv].fill(0.0);
            self.labels[r * nv..(r + 1) * nv].fill(1.0 / nv as f32);
        }
        self.seen_loss = true;
    }
}

/// llama.cpp's `cb_eval` on the training context: split the graph after the
/// logits (`result_output`), note when they have been computed (the
/// scheduler's second call, `ask == false`), and when it asks about the
/// cross-entropy node, mask its inputs (see [`MaskState`]). The mask is
/// written only if that node reads the logits just computed: otherwise the
/// zeros could be overwritten by a later computation of the logits while
/// the uniform labels stayed, a real gradient on every row, so the step is
/// marked missed and refused instead.
unsafe extern "C" fn mask_callback(t: *mut sys::ggml_tensor, ask: bool, ud: *mut c_void) -> bool {
    let r = std::panic::catch_unwind(|| {
        // SAFETY: `ud` is the boxed MaskState given at context creation; `t` a live node.
        unsafe {
            let state = &mut *ud.cast::<MaskState>();
            let is_logits = CStr::from_ptr(sys::ggml_get_name(t)).to_bytes() == b"result_output";
            if !ask {
                if is_logits {
                    state.computed_logits = t;
                }
                return true;
            }
            if (*t).op == sys::GGML_OP_CROSS_ENTROPY_LOSS {
                if (*t).src[0] == state.computed_logits && !state.computed_logits.is_null() {
                    state.mask((*t).src[0], (*t).src[1]);
                } else {
                    state.seen_loss = true;
                    state.missed = true;
                }
                return false;
            }
            is_logits
        }
    });
    r.unwrap_or(false)
}

// ------------------------------------------------------------ learning rate

/// Warm-up then cosine decay to a tenth of the peak. The step counter lives
/// here and advances once per optimizer step (ggml-opt calls
/// `get_opt_pars` once before each).
#[derive(Debug, Clone, Copy)]
struct Schedule {
    step: u64,
    total: u64,
    warmup: u64,
    lr: f32,
    wd: f32,
}

impl Schedule {
    fn lr_at(&self, step: u64) -> f32 {
        if self.warmup > 0 && step < self.warmup {
            return self.lr * (step + 1) as f32 / self.warmup as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let t = (step.saturating_sub(self.warmup) as f32 / span as f32).min(1.0);
        let floor = self.lr * 0.1;
        floor + (self.lr - floor) * 0.5 * (1.0 + (std::f32::consts::PI * t).cos())
    }
}

unsafe extern "C" fn schedule_callback(ud: *mut c_void) -> sys::ggml_opt_optimizer_params {
    // SAFETY: `ud` is the boxed Schedule given to llama_opt_init; it outlives training.
    unsafe {
        let s = &mut *ud.cast::<Schedule>();
        let mut p = sys::ggml_opt_get_default_optimizer_params(std::ptr::null_mut());
        p.adamw.alpha = s.lr_at(s.step).max(1e-12);
        p.adamw.wd = s.wd;
        s.step += 1;
        p
    }
}

/// Which tensors train: all, or those of the last `train_blocks` blocks and
/// the output norm. User data: a `*const u32` (the first trained block).
unsafe extern "C" fn param_filter(t: *const sys::ggml_tensor, ud: *mut c_void) -> bool {
    // SAFETY: `ud` points at a u32 that outlives llama_opt_init; `t` is a live tensor.
    unsafe {
        let first = *ud.cast::<u32>();
        if (*t).type_ != sys::GGML_TYPE_F32 {
            return false;
        }
        let name = CStr::from_ptr(sys::ggml_get_name(t)).to_string_lossy();
        match name.strip_prefix("blk.") {
            Some(rest) => rest
                .split('.')
                .next()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|b| b >= first),
            None => name.starts_with("output_norm"),
        }
    }
}

// ------------------------------------------------------------------ examples

/// One training example: its tokens and whether it is an attack.
struct Example {
    tokens: Vec<i32>,
    malicious: bool,
}

/// A packed window: [`WINDOW`] tokens and their labels (next token at each
/// verdict position, [`MASK_ID`] elsewhere).
struct Window {
    tokens: Vec<i32>,
    labels: Vec<i32>,
    examples: u32,
    real: usize,
}

struct Template {
    /// llama.cpp built-in template name equal to the base's embedded one.
    builtin: String,
    prefix: Vec<i32>,
    suffix: Vec<i32>,
    yes: i32,
    no: i32,
    pad: i32,
}

/// The training template: the base GGUF's chat template `tmpl` (read from
/// the base, since checkpoints written by llama.cpp carry none), tokenized
/// with `model`'s vocabulary.
fn template(model: &Model, tmpl: &str) -> anyhow::Result<Template> {
    let builtin = builtin_equal_to(tmpl).with_context(|| {
        "the base's chat template renders like none of llama.cpp's built-in templates; \
         the fine-tuned GGUF could not name the template it was trained with"
    })?;
    let (pre, suf) = profile::render_messages(&builtin, SFT_SYSTEM, TEXT_SLOT, "")
        .map_err(|e| anyhow::anyhow!("chat template: {e}"))?;
    let single = |s: &str| -> anyhow::Result<i32> {
        match model.tokenize(s, false, false).as_slice() {
            [t] if *t != MASK_ID => Ok(*t),
            other => bail!("label {s:?} is not one token in this vocabulary ({other:?})"),
        }
    };
    // SAFETY: live vocabulary.
    let pad = unsafe { sys::llama_vocab_eos(model.vocab()) };
    Ok(Template {
        builtin,
        prefix: model.tokenize(&pre, true, true),
        suffix: model.tokenize(&suf, false, true),
        yes: single("Yes")?,
        no: single("No")?,
        pad: if pad >= 0 { pad } else { 0 },
    })
}

/// The first of llama.cpp's built-in chat templates that renders a system
/// and user turn exactly as `embedded` does. llama.cpp's GGUF writer does not
/// carry the chat template over, so the result names it
/// (`promptgate.sft.template`) and the daemon renders with the built-in.
fn builtin_equal_to(embedded: &str) -> Option<String> {
    let msgs = [("system", "S y s"), ("user", "U s e r")];
    let want = profile::apply_template(embedded, &msgs).ok()?;
    let mut names: Vec<*const std::os::raw::c_char> = vec![std::ptr::null(); 128];
    // SAFETY: the array has room for `names.len()` pointers; llama.cpp fills
    // them with static strings and returns how many there are.
    let n = unsafe { sys::llama_chat_builtin_templates(names.as_mut_ptr(), names.len()) };
    let n = usize::try_from(n).ok()?.min(names.len());
    names[..n]
        .iter()
        // SAFETY: static NUL-terminated strings from llama.cpp.
        .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        .find(|name| profile::apply_template(name, &msgs).ok().as_deref() == Some(&want))
}

fn example(model: &Model, t: &Template, row: &Row, prompt_tokens: usize) -> Example {
    let text = crate::normalize::normalize(&row.text).text;
    let mut p = model.tokenize(&text, false, false);
    p.truncate(prompt_tokens);
    let mut tokens = t.prefix.clone();
    tokens.extend(p);
    tokens.extend_from_slice(&t.suffix);
    Example {
        tokens,
        malicious: row.label == "malicious",
    }
}

/// The order of examples over `epochs` passes, as pairs: every pair holds
/// one malicious and one benign example, in a random order within the pair.
/// Each class cycles through its shuffled rows (the smaller class repeats
/// within a pass); a pass ends when the larger class has been used once.
///
/// Why pairs: with one or two examples per optimizer step and AdamW, a step
/// of one class pushes every verdict towards that class; a first run with an
/// independent coin flip per example swung between confidently wrong answers
/// of either class (per-step verdict losses of 2-4) and its held-apart loss
/// rose above the start. A pair's two gradients cancel in the shared "say
/// Yes" direction and keep the discriminative one. The verdict token itself
/// is never an input (only its label is), so an earlier example in a window
/// does not show the later one its answer.
fn order(examples: &[Example], epochs: u32, seed: u64) -> Vec<usize> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5f7);
    let (mal, ben): (Vec<usize>, Vec<usize>) =
        (0..examples.len()).partition(|&i| examples[i].malicious);
    if mal.is_empty() || ben.is_empty() {
        return Vec::new();
    }
    let pairs_per_pass = mal.len().max(ben.len());
    let mut out = Vec::with_capacity(pairs_per_pass * 2 * epochs as usize);
    let pools = [mal, ben];
    let mut queues = [Vec::new(), Vec::new()];
    let mut pos = [0usize, 0usize];
    let mut next = |c: usize, rng: &mut rand_chacha::ChaCha8Rng| -> usize {
        if pos[c] >= queues[c].len() {
            queues[c] = pools[c].clone();
            queues[c].shuffle(rng);
            pos[c] = 0;
        }
        pos[c] += 1;
        queues[c][pos[c] - 1]
    };
    for _ in 0..epochs {
        for _ in 0..pairs_per_pass {
            let (m, b) = (next(0, &mut rng), next(1, &mut rng));
            if rng.gen_bool(0.5) {
                out.extend([m, b]);
            } else {
                out.extend([b, m]);
            }
        }
    }
    out
}

/// Packs examples (in order, two at a time: the pairs of [`order`]) into
/// windows of [`WINDOW`] tokens; a pair is never split across windows. The
/// rest of a window is padding with masked labels. Each example must be at
/// most `WINDOW / 2` tokens.
fn pack(examples: &[Example], order: &[usize], t: &Template) -> Vec<Window> {
    let mut out = Vec::new();
    let mut cur = Window {
        tokens: Vec::with_capacity(WINDOW),
        labels: Vec::with_capacity(WINDOW),
        examples: 0,
        real: 0,
    };
    let finish = |w: &mut Window, out: &mut Vec<Window>| {
        if w.examples == 0 {
            return;
        }
        w.real = w.tokens.len();
        w.tokens.resize(WINDOW, t.pad);
        w.labels.resize(WINDOW, MASK_ID);
        out.push(std::mem::replace(
            w,
            Window {
                tokens: Vec::with_capacity(WINDOW),
                labels: Vec::with_capacity(WINDOW),
                examples: 0,
                real: 0,
            },
        ));
    };
    for pair in order.chunks(2) {
        let n: usize = pair
            .iter()
            .map(|&i| examples[i].tokens.len().min(WINDOW / 2))
            .sum();
        if cur.tokens.len() + n > WINDOW {
            finish(&mut cur, &mut out);
        }
        for &i in pair {
            let e = &examples[i];
            let n = e.tokens.len().min(WINDOW / 2);
            cur.tokens.extend_from_slice(&e.tokens[..n]);
            cur.labels.extend(std::iter::repeat_n(MASK_ID, n - 1));
            cur.labels.push(if e.malicious { t.yes } else { t.no });
            cur.examples += 1;
        }
    }
    finish(&mut cur, &mut out);
    out
}

// ------------------------------------------------------------------ scoring

/// P(malicious) of each example from a plain decode on `ctx` (the label
/// tokens' logits at the verdict position, as the daemon reads them).
fn score_examples(
    ctx: &Ctx,
    batch: &mut Batch,
    t: &Template,
    examples: &[Example],
    n_vocab: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(examples.len());
    for e in examples {
        let n = e.tokens.len().min(batch.1);
        batch.fill(&e.tokens[..n]);
        // SAFETY: live context and a filled batch; logits of the last token requested.
        unsafe {
            sys::llama_memory_clear(sys::llama_get_memory(ctx.0), true);
            let rc = sys::llama_decode(ctx.0, batch.0);
            ensure!(rc == 0, "llama_decode failed ({rc})");
            let lg = sys::llama_get_logits_ith(ctx.0, -1);
            ensure!(!lg.is_null(), "no logits");
            let lg = std::slice::from_raw_parts(lg, n_vocab);
            let d = f64::from(lg[t.yes as usize]) - f64::from(lg[t.no as usize]);
            out.push(1.0 / (1.0 + (-d).exp()));
        }
    }
    Ok(out)
}

fn verdict_loss(scores: &[f64], examples: &[Example]) -> f64 {
    let n = scores.len().max(1) as f64;
    scores
        .iter()
        .zip(examples)
        .map(|(&p, e)| -(if e.malicious { p } else { 1.0 - p }).max(1e-12).ln())
        .sum::<f64>()
        / n
}

fn scored(scores: &[f64], examples: &[Example]) -> Vec<Scored> {
    scores
        .iter()
        .zip(examples)
        .map(|(&s, e)| Scored {
            malicious: e.malicious,
            score: Some(s),
        })
        .collect()
}

// ------------------------------------------------------------------ files

/// A GGUF key's value written by [`quantize`].
enum Kv {
    /// A string (at most 127 bytes).
    Str(String),
    /// An unsigned 32-bit integer (llama.cpp writes integer overrides as u32).
    U32(u32),
}

/// `llama_model_quantize` from `input` to `output`: to `quant`, or a plain
/// copy when `None`; every `kv` pair is set on the output's metadata.
fn quantize(
    input: &Path,
    output: &Path,
    quant: Option<Quant>,
    kv: &[(String, Kv)],
    threads: usize,
) -> anyhow::Result<()> {
    let mut overrides: Vec<sys::llama_model_kv_override> = Vec::with_capacity(kv.len() + 1);
    for (k, v) in kv {
        ensure!(k.len() < 128, "GGUF key {k} too long");
        // SAFETY: a zeroed override is valid (tag INT, empty key); the key is
        // copied NUL-terminated within its 128-byte array.
        let mut o: sys::llama_model_kv_override = unsafe { std::mem::zeroed() };
        for (d, s) in o.key.iter_mut().zip(k.bytes()) {
            *d = s as std::os::raw::c_char;
        }
        match v {
            Kv::Str(v) => {
                ensure!(v.len() < 128, "GGUF value of {k} too long");
                o.tag = sys::LLAMA_KV_OVERRIDE_TYPE_STR;
                // SAFETY: writing the string member of the union, NUL-terminated.
                unsafe {
                    for (d, s) in o.__bindgen_anon_1.val_str.iter_mut().zip(v.bytes()) {
                        *d = s as std::os::raw::c_char;
                    }
                }
            }
            Kv::U32(n) => {
                o.tag = sys::LLAMA_KV_OVERRIDE_TYPE_INT;
                o.__bindgen_anon_1.val_i64 = i64::from(*n);
            }
        }
        overrides.push(o);
    }
    // SAFETY: the terminator: an override with an empty key.
    overrides.push(unsafe { std::mem::zeroed() });
    let (ci, co) = (cstring(input)?, cstring(output)?);
    // SAFETY: valid paths; `overrides` outlives the call and ends with an empty key.
    let rc = unsafe {
        let mut p = sys::llama_model_quantize_default_params();
        p.nthread = i32::try_from(threads).unwrap_or(1);
        match quant {
            Some(q) => {
                p.ftype = q.ftype();
                p.allow_requantize = true;
            }
            None => p.only_copy = true,
        }
        p.kv_overrides = overrides.as_ptr();
        sys::llama_model_quantize(ci.as_ptr(), co.as_ptr(), &p)
    };
    ensure!(
        rc == 0,
        "llama_model_quantize {} -> {} failed ({rc})",
        input.display(),
        output.display()
    );
    Ok(())
}

fn save(model: &Model, path: &Path) -> anyhow::Result<()> {
    let tmp = path.with_extension("gguf.tmp");
    let c = cstring(&tmp)?;
    // SAFETY: live model and a valid path.
    unsafe { sys::llama_model_save_to_file(model.0, c.as_ptr()) };
    ensure!(tmp.exists(), "llama.cpp wrote no {}", tmp.display());
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Reads the `promptgate.*` keys (and any other string keys) of a GGUF
/// header without loading tensors.
///
/// # Errors
/// Not a readable GGUF.
pub fn read_string_keys(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let g = crate::engine::llama::GgufHeader::open(path)
        .with_context(|| format!("{}: not a readable GGUF", path.display()))?;
    let ctx = g.as_ptr();
    let mut out = Vec::new();
    // SAFETY: live gguf context while `g` lives; strings copied at once.
    unsafe {
        for i in 0..sys::gguf_get_n_kv(ctx) {
            if sys::gguf_get_kv_type(ctx, i) != sys::GGUF_TYPE_STRING {
                continue;
            }
            let k = CStr::from_ptr(sys::gguf_get_key(ctx, i))
                .to_string_lossy()
                .into_owned();
            let v = CStr::from_ptr(sys::gguf_get_val_str(ctx, i))
                .to_string_lossy()
                .into_owned();
            out.push((k, v));
        }
    }
    Ok(out)
}

// ------------------------------------------------------------------ run

/// Runs supervised fine-tuning as [`SftOptions`] says and writes the GGUF
/// (plus `OUT.sft.json`, the [`SftReport`]).
///
/// # Errors
/// Unreadable data or models, an architecture without a backward pass
/// (Gemma 3), labels that are not single tokens, a resume whose settings
/// differ from the checkpoint's, or a failing llama.cpp call.
pub fn run(o: &SftOptions) -> anyhow::Result<SftReport> {
    let started = Instant::now();
    crate::engine::llama::backend().map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(o.lr > 0.0 && o.lr.is_finite(), "--lr must be positive");
    ensure!(o.epochs > 0, "--epochs must be at least 1");
    ensure!(o.eval_every > 0, "--eval-every must be at least 1");
    ensure!(o.prompt_tokens > 0, "--prompt-tokens must be positive");
    ensure!(o.holdout > 0, "--holdout must be at least 1 row");
    ensure!(
        (0.0..=1.0).contains(&o.max_fpr),
        "--max-fpr must be in [0, 1]"
    );
    let out = gguf_out_path(&o.out);

    // Rows: per-group sample, then a stratified held-apart slice.
    let mut rows = Vec::new();
    let mut data_hash = sha2::Sha256::default();
    for p in &o.data {
        rows.extend(read_rows(p)?);
        sha2::Digest::update(&mut data_hash, sha256_file(p)?.as_bytes());
    }
    let data_sha = hex::encode(sha2::Digest::finalize(data_hash));
    let sampled = sample_per_group(&rows, o.per_group, o.seed);
    ensure!(
        o.holdout * 2 <= sampled.len(),
        "--holdout {} would hold apart half or more of the {} training rows; lower it",
        o.holdout,
        sampled.len()
    );
    let holdout_rows = sample_stratified(&sampled, o.holdout, o.seed ^ 0x401d);
    let held: HashSet<[u8; 32]> = holdout_rows.iter().map(|r| text_hash(&r.text)).collect();
    let train_rows: Vec<Row> = sampled
        .into_iter()
        .filter(|r| !held.contains(&text_hash(&r.text)))
        .collect();
    let dev_all = read_rows(&o.dev)?;
    let dev_rows = sample_stratified(&dev_all, o.dev_limit, o.seed);
    for (what, rows) in [("training rows", &train_rows), ("dev rows", &dev_rows)] {
        let m = rows.iter().filter(|r| r.label == "malicious").count();
        ensure!(
            m > 0 && m < rows.len(),
            "the {what} hold {m} malicious and {} benign rows: both labels are needed",
            rows.len() - m
        );
    }

    // The base: refuse what cannot train before spending minutes.
    let base_sha = sha256_file(&o.base)?;
    let base_meta = profile::read_meta(&o.base).map_err(|e| anyhow::anyhow!(e))?;
    if base_meta.architecture.starts_with("gemma") {
        bail!(
            "{}: architecture {} cannot be fine-tuned through llama.cpp's training API \
             (ggml has no backward pass for its GEGLU feed-forward); use a Llama-style \
             model such as SmolLM2 or Qwen, or `--method head`",
            o.base.display(),
            base_meta.architecture
        );
    }
    ensure!(
        base_meta.has_chat_template,
        "{}: the base GGUF has no chat template",
        o.base.display()
    );

    std::fs::create_dir_all(&o.work_dir)?;
    let f32_path = o.work_dir.join("base-f32.gguf");
    let ckpt_path = o.work_dir.join("checkpoint.gguf");
    let best_path = o.work_dir.join("best.gguf");
    let state_path = o.work_dir.join("state.json");
    let key_src = serde_json::json!({
        "base": base_sha, "data": data_sha, "per_group": o.per_group, "holdout": o.holdout,
        "seed": o.seed, "epochs": o.epochs, "prompt_tokens": o.prompt_tokens,
        "window": WINDOW, "system": SFT_SYSTEM,
    });
    let key = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        key_src.to_string().as_bytes(),
    ));
    let mut state = if o.resume && state_path.exists() && ckpt_path.exists() {
        let s: State = serde_json::from_slice(&std::fs::read(&state_path)?)
            .with_context(|| format!("reading {}", state_path.display()))?;
        ensure!(
            s.key == key,
            "{} was written by a run with other data or settings; start afresh without --resume \
             or use another --work-dir",
            state_path.display()
        );
        Some(s)
    } else {
        if o.resume {
            tracing::warn!(dir = %o.work_dir.display(), "--resume: no checkpoint, starting afresh");
        }
        None
    };

    if state.is_none() {
        let t = Instant::now();
        quantize(&o.base, &f32_path, Some(Quant::F32), &[], o.threads)?;
        tracing::info!(secs = t.elapsed().as_secs_f64(), path = %f32_path.display(), "base dequantised to F32");
    }
    let start_weights = if state.is_some() {
        &ckpt_path
    } else {
        &f32_path
    };
    let model = Model::load(start_weights)?;
    // SAFETY: live model.
    let (n_vocab, n_layer) = unsafe {
        (
            usize::try_from(sys::llama_vocab_n_tokens(model.vocab())).unwrap_or(0),
            u32::try_from(sys::llama_model_n_layer(model.0)).unwrap_or(0),
        )
    };
    let tpl = template(&model, &base_meta.chat_template)?;
    ensure!(
        tpl.prefix.len() + tpl.suffix.len() + 8 <= WINDOW / 2,
        "the template alone takes {} tokens of a {WINDOW}-token window",
        tpl.prefix.len() + tpl.suffix.len()
    );
    // Two examples (a pair) must fit one window.
    let prompt_cap = o
        .prompt_tokens
        .min(WINDOW / 2 - tpl.prefix.len() - tpl.suffix.len());
    let examples: Vec<Example> = train_rows
        .iter()
        .map(|r| example(&model, &tpl, r, prompt_cap))
        .collect();
    let holdout: Vec<Example> = holdout_rows
        .iter()
        .map(|r| example(&model, &tpl, r, prompt_cap))
        .collect();
    let windows = pack(&examples, &order(&examples, o.epochs, o.seed), &tpl);
    let total_steps = if o.max_steps > 0 {
        o.max_steps.min(windows.len() as u64)
    } else {
        windows.len() as u64
    };
    tracing::info!(
        train_rows = examples.len(),
        holdout_rows = holdout.len(),
        dev_rows = dev_rows.len(),
        windows = windows.len(),
        steps = total_steps,
        examples_per_window =
            examples.len() as f64 * f64::from(o.epochs) / windows.len().max(1) as f64,
        "fine-tuning"
    );

    // Contexts: an ordinary one for scoring the held-apart rows, and the
    // training one with the masking callback.
    let max_example = holdout.iter().map(|e| e.tokens.len()).max().unwrap_or(1);
    let eval_ctx = context(&model, max_example.max(WINDOW), o.threads, None)?;
    let mut eval_batch = Batch::new(max_example.max(WINDOW));
    let mut mask = Box::new(MaskState {
        n_vocab,
        yes: usize::try_from(tpl.yes)?,
        no: usize::try_from(tpl.no)?,
        verdict_rows: Vec::new(),
        logits: Vec::new(),
        labels: Vec::new(),
        loss_sum: 0.0,
        verdicts: 0,
        correct: 0,
        missed: false,
        seen_loss: false,
        computed_logits: std::ptr::null_mut(),
    });
    let mask_ptr: *mut MaskState = &mut *mask;
    let train_ctx = context(&model, WINDOW, o.threads, Some(mask_ptr))?;

    let h0 = score_examples(&eval_ctx, &mut eval_batch, &tpl, &holdout, n_vocab)?;
    let (h0_loss, h0_auroc) = (verdict_loss(&h0, &holdout), auroc(&scored(&h0, &holdout)));
    let mut st = state.take().unwrap_or_else(|| State {
        key: key.clone(),
        step: 0,
        best_step: 0,
        best_loss: h0_loss,
        best_auroc: h0_auroc,
        start_loss: h0_loss,
        evals_since_best: 0,
        examples_seen: 0,
        train_loss: Vec::new(),
        holdout_loss: vec![(0, h0_loss)],
        holdout_auroc: h0_auroc.map(|a| vec![(0, a)]).unwrap_or_default(),
        train_seconds: 0.0,
        window_tokens: 0,
        real_tokens: 0,
    });
    let resumed_from = st.step;
    // A fixed probe of training examples: the fit itself, start and end.
    let mut probe_ids: Vec<usize> = Vec::new();
    for i in order(&examples, 1, o.seed) {
        if !probe_ids.contains(&i) {
            probe_ids.push(i);
        }
        if probe_ids.len() == 16 {
            break;
        }
    }
    let probe: Vec<Example> = probe_ids
        .iter()
        .map(|&i| Example {
            tokens: examples[i].tokens.clone(),
            malicious: examples[i].malicious,
        })
        .collect();
    let probe_start = verdict_loss(
        &score_examples(&eval_ctx, &mut eval_batch, &tpl, &probe, n_vocab)?,
        &probe,
    );
    if resumed_from == 0 {
        save(&model, &best_path)?;
    }
    tracing::info!(
        step = st.step,
        holdout_loss = h0_loss,
        holdout_auroc = h0_auroc.unwrap_or(f64::NAN),
        "held-apart rows before this run"
    );

    let mut schedule = Box::new(Schedule {
        step: st.step,
        total: total_steps,
        warmup: o.warmup_steps,
        lr: o.lr,
        wd: o.weight_decay,
    });
    let first_block: Box<u32> = Box::new(if o.train_blocks == 0 {
        0
    } else {
        n_layer.saturating_sub(o.train_blocks)
    });
    // SAFETY: live context and model; the callbacks' user data (boxed) outlive them.
    unsafe {
        let mut p = sys::llama_opt_params {
            n_ctx_train: 0,
            param_filter: Some(if o.train_blocks == 0 {
                sys::llama_opt_param_filter_all
            } else {
                param_filter
            }),
            param_filter_ud: (&*first_block as *const u32).cast_mut().cast(),
            get_opt_pars: Some(schedule_callback),
            get_opt_pars_ud: (&mut *schedule as *mut Schedule).cast(),
            optimizer_type: sys::GGML_OPT_OPTIMIZER_TYPE_ADAMW,
        };
        if o.train_blocks == 0 {
            p.param_filter_ud = std::ptr::null_mut();
        }
        sys::llama_opt_init(train_ctx.0, model.0, p);
        // One plain decode of exactly n_ctx tokens restores the eval callback
        // and the thread count on the rebuilt scheduler (training.md, step 7).
        let mut b = Batch::new(WINDOW);
        b.fill(
            &windows
                .first()
                .map_or(vec![tpl.pad; WINDOW], |w| w.tokens.clone()),
        );
        let rc = sys::llama_decode(train_ctx.0, b.0);
        ensure!(rc == 0, "warm-up decode failed ({rc})");
        sys::llama_memory_clear(sys::llama_get_memory(train_ctx.0), true);
    }

    // SAFETY: a one-window dataset, refilled for every step; freed below.
    let dataset = unsafe {
        sys::ggml_opt_dataset_init(
            sys::GGML_TYPE_I32,
            sys::GGML_TYPE_I32,
            WINDOW as i64,
            WINDOW as i64,
            1,
            1,
        )
    };
    ensure!(!dataset.is_null(), "ggml_opt_dataset_init failed");
    // SAFETY: results freed below.
    let (res_train, res_eval) =
        unsafe { (sys::ggml_opt_result_init(), sys::ggml_opt_result_init()) };

    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = if tty {
        super::train::styled_bar(
            total_steps,
            "fine-tuning [{bar:30}] {pos}/{len} steps ({msg}), ETA {eta}",
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_position(st.step);
    let mut interval_loss = (0.0f64, 0u64);
    let t_run = Instant::now();
    let mut steps_this_run = 0u64;
    let outcome: anyhow::Result<()> = (|| {
        while st.step < total_steps {
            let w = &windows[usize::try_from(st.step)?];
            let t_step = Instant::now();
            mask.seen_loss = false;
            mask.computed_logits = std::ptr::null_mut();
            mask.verdict_rows.clear();
            mask.verdict_rows.extend(
                w.labels
                    .iter()
                    .enumerate()
                    .filter(|(_, &l)| l != MASK_ID)
                    .map(|(i, _)| i),
            );
            // SAFETY: the dataset's tensors hold WINDOW i32 each; live context.
            unsafe {
                let data = sys::ggml_get_data(sys::ggml_opt_dataset_data(dataset)).cast::<i32>();
                let labels =
                    sys::ggml_get_data(sys::ggml_opt_dataset_labels(dataset)).cast::<i32>();
                std::ptr::copy_nonoverlapping(w.tokens.as_ptr(), data, WINDOW);
                std::ptr::copy_nonoverlapping(w.labels.as_ptr(), labels, WINDOW);
                sys::llama_opt_epoch(train_ctx.0, dataset, res_train, res_eval, 1, None, None);
                sys::ggml_opt_result_reset(res_train);
            }
            ensure!(
                mask.seen_loss && !mask.missed,
                "the verdict-only loss mask did not run as it must on step {}: stopping rather \
                 than train on every position (this step's update is discarded with everything \
                 after the last checkpoint, step {})",
                st.step,
                st.holdout_loss.last().map_or(0, |h| h.0)
            );
            st.step += 1;
            steps_this_run += 1;
            st.examples_seen += u64::from(w.examples);
            st.window_tokens += WINDOW as u64;
            st.real_tokens += w.real as u64;
            st.train_seconds += t_step.elapsed().as_secs_f64();
            interval_loss.0 += mask.loss_sum;
            interval_loss.1 += mask.verdicts;
            let shown = mask.loss_sum / mask.verdicts.max(1) as f64;
            mask.loss_sum = 0.0;
            mask.verdicts = 0;
            mask.correct = 0;
            let tok_s = st.window_tokens as f64 / st.train_seconds.max(1e-9);
            let lr_now = schedule.lr_at(st.step.saturating_sub(1));
            bar.set_position(st.step);
            bar.set_message(format!("loss {shown:.3} lr {lr_now:.1e} {tok_s:.0} tok/s"));
            if !tty && (st.step % 10 == 0 || steps_this_run == 1) {
                let per_step =
                    st.train_seconds / st.step.saturating_sub(resumed_from).max(1) as f64;
                tracing::info!(
                    step = st.step,
                    of = total_steps,
                    loss = shown,
                    lr = lr_now,
                    tokens_per_s = tok_s,
                    eta_s = (per_step * (total_steps - st.step) as f64).round(),
                    "fine-tuning"
                );
            }
            let out_of_time =
                o.max_train_seconds > 0 && t_run.elapsed().as_secs() >= o.max_train_seconds;
            if st.step % o.eval_every == 0 || st.step == total_steps || out_of_time {
                let tl = interval_loss.0 / interval_loss.1.max(1) as f64;
                st.train_loss.push((st.step, tl));
                interval_loss = (0.0, 0);
                let h = score_examples(&eval_ctx, &mut eval_batch, &tpl, &holdout, n_vocab)?;
                let hl = verdict_loss(&h, &holdout);
                st.holdout_loss.push((st.step, hl));
                // The kept step: best held-apart AUROC (the threshold is
                // chosen on dev afterwards, so ranking is what counts), ties
                // broken by the verdict loss.
                let ha_defined = auroc(&scored(&h, &holdout));
                let ha = ha_defined.unwrap_or(0.0);
                st.holdout_auroc.push((st.step, ha));
                let best_a = st.best_auroc.unwrap_or(0.0);
                let better =
                    ha > best_a + 1e-9 || ((ha - best_a).abs() <= 1e-9 && hl < st.best_loss);
                if better {
                    st.best_loss = hl;
                    st.best_auroc = Some(ha);
                    st.best_step = st.step;
                    st.evals_since_best = 0;
                    save(&model, &best_path)?;
                } else {
                    st.evals_since_best += 1;
                }
                save(&model, &ckpt_path)?;
                write_json(&state_path, &st)?;
                bar.suspend(|| {
                    tracing::info!(
                        step = st.step,
                        train_loss = tl,
                        holdout_loss = hl,
                        holdout_auroc = ha_defined.unwrap_or(f64::NAN),
                        best_step = st.best_step,
                        "evaluated"
                    );
                });
                if out_of_time {
                    bar.suspend(|| {
                        tracing::info!(
                            step = st.step,
                            best_step = st.best_step,
                            "--max-train-seconds reached"
                        );
                    });
                    break;
                }
                if o.patience > 0 && st.evals_since_best >= o.patience {
                    bar.suspend(|| {
                        tracing::info!(step = st.step, best_step = st.best_step, "early stop");
                    });
                    break;
                }
            }
        }
        Ok(())
    })();
    bar.finish_and_clear();
    // SAFETY: allocated above, freed once.
    unsafe {
        sys::ggml_opt_result_free(res_train);
        sys::ggml_opt_result_free(res_eval);
        sys::ggml_opt_dataset_free(dataset);
    }
    outcome?;
    let probe_end = verdict_loss(
        &score_examples(&eval_ctx, &mut eval_batch, &tpl, &probe, n_vocab)?,
        &probe,
    );
    drop(train_ctx);
    drop(eval_ctx);
    drop(model);
    let train_s = t_run.elapsed().as_secs_f64();

    // The kept weights: quantised, scored on dev by the daemon's scorer,
    // then written with the threshold.
    let arch = base_meta.architecture.clone();
    let strings: Vec<(&str, String)> = vec![
        (keys::PROFILE, SFT_PROFILE.to_string()),
        (keys::TEMPLATE, tpl.builtin.clone()),
        (keys::BASE_SHA256, base_sha.clone()),
        (
            keys::BASE_FILE,
            o.base
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
        (keys::STEPS, st.step.to_string()),
        (keys::BEST_STEP, st.best_step.to_string()),
        (keys::LR, o.lr.to_string()),
        (keys::SEED, o.seed.to_string()),
        (keys::DATA_SHA256, data_sha.clone()),
        (keys::QUANT, o.quant.name().to_string()),
    ];
    let mut kv: Vec<(String, Kv)> = strings
        .into_iter()
        .map(|(k, v)| (k.to_string(), Kv::Str(v)))
        .collect();
    if let Some(n) = base_context_length(&o.base, &arch) {
        // llama_opt_init sets the model's n_ctx_train to the training window;
        // the written GGUF gets the base's context length back.
        kv.push((format!("{arch}.context_length"), Kv::U32(n)));
    }
    let staged = o.work_dir.join(format!("staged-{}.gguf", o.quant.name()));
    quantize(&best_path, &staged, Some(o.quant), &kv, o.threads)?;
    let config = LlamaConfig {
        threads: o.threads,
        ..LlamaConfig::default()
    };
    let mut scorer = LlamaScorer::load(&staged, config).map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(
        scorer.profile().name == SFT_PROFILE,
        "the staged GGUF was not recognised as an SFT detector"
    );
    let bar = super::train::progress_bar(dev_rows.len() as u64, "dev");
    let mut dev_scored = Vec::with_capacity(dev_rows.len());
    for r in &dev_rows {
        let text = crate::normalize::normalize(&r.text).text;
        let s = scorer.score(&text).ok().map(|s| s.p_malicious);
        dev_scored.push(Scored {
            malicious: r.label == "malicious",
            score: s,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    drop(scorer);
    let (threshold, dev_f1) =
        best_f1_threshold(&dev_scored, o.max_fpr).map_or((0.5, None), |(t, f)| (t, Some(f)));
    kv.push((
        keys::THRESHOLD.to_string(),
        Kv::Str(format!("{threshold:.6}")),
    ));
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp_out = out.with_extension("gguf.partial");
    quantize(&staged, &tmp_out, None, &kv, o.threads)?;
    std::fs::rename(&tmp_out, &out)?;
    let _ = std::fs::remove_file(&staged);

    let report = SftReport {
        gguf: out.clone(),
        steps: st.step,
        steps_this_run,
        resumed_from,
        best_step: st.best_step,
        holdout_loss_start: st.start_loss,
        holdout_loss_best: st.best_loss,
        holdout_auroc_best: st.best_auroc,
        train_probe_loss_start: probe_start,
        train_probe_loss_end: probe_end,
        train_loss: st.train_loss.clone(),
        holdout_loss: st.holdout_loss.clone(),
        holdout_auroc: st.holdout_auroc.clone(),
        examples_seen: st.examples_seen,
        tokens_per_s: st.window_tokens as f64 / st.train_seconds.max(1e-9),
        real_tokens_per_s: st.real_tokens as f64 / st.train_seconds.max(1e-9),
        threshold,
        dev_f1,
        dev_fpr: Confusion::at(&dev_scored, threshold).fpr(),
        dev_auroc: auroc(&dev_scored),
        dev_recall_at_1pct_fpr: recall_at_fpr(&dev_scored, 0.01),
        dev_rows: dev_scored.len(),
        train_seconds: train_s,
        total_seconds: started.elapsed().as_secs_f64(),
        options: o.clone(),
    };
    write_json(&out.with_extension("sft.json"), &report)?;
    Ok(report)
}

/// `{arch}.context_length` of a GGUF, if it has one.
fn base_context_length(path: &Path, arch: &str) -> Option<u32> {
    let g = crate::engine::llama::GgufHeader::open(path)?;
    let k = CString::new(format!("{arch}.context_length")).ok()?;
    // SAFETY: live header; the type is checked before reading.
    unsafe {
        let id = sys::gguf_find_key(g.as_ptr(), k.as_ptr());
        if id < 0 || sys::gguf_get_kv_type(g.as_ptr(), id) != sys::GGUF_TYPE_UINT32 {
            return None;
        }
        Some(sys::gguf_get_val_u32(g.as_ptr(), id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n: usize, malicious: bool) -> Example {
        Example {
            tokens: (1..=i32::try_from(n).unwrap()).collect(),
            malicious,
        }
    }

    fn tpl() -> Template {
        Template {
            builtin: "chatml".into(),
            prefix: vec![],
            suffix: vec![],
            yes: 7,
            no: 9,
            pad: 2,
        }
    }

    #[test]
    fn packing_masks_all_but_the_verdict_positions() {
        let examples = vec![ex(100, true), ex(100, false), ex(60, true), ex(30, false)];
        let w = pack(&examples, &[0, 1, 3, 2], &tpl());
        assert_eq!(
            w.len(),
            2,
            "a pair is never split: the second pair starts a new window"
        );
        assert_eq!(w[0].examples, 2);
        assert_eq!(w[0].real, 200);
        assert_eq!((w[1].examples, w[1].real), (2, 90));
        assert_eq!(w[1].labels[29], 9);
        assert_eq!(w[1].labels[89], 7);
        assert_eq!(w[0].tokens.len(), WINDOW);
        assert_eq!(w[0].labels.len(), WINDOW);
        let verdicts: Vec<(usize, i32)> = w[0]
            .labels
            .iter()
            .enumerate()
            .filter(|(_, &l)| l != MASK_ID)
            .map(|(i, &l)| (i, l))
            .collect();
        assert_eq!(verdicts, vec![(99, 7), (199, 9)]);
        assert!(w[0].tokens[200..].iter().all(|&t| t == 2), "padding");
    }

    #[test]
    fn order_is_balanced_deterministic_and_covers_the_larger_class() {
        let mut examples: Vec<Example> = (0..300).map(|_| ex(5, false)).collect();
        examples.extend((0..100).map(|_| ex(5, true)));
        let a = order(&examples, 1, 42);
        assert_eq!(a, order(&examples, 1, 42));
        assert_ne!(a, order(&examples, 1, 43));
        assert_eq!(
            a.len(),
            600,
            "one pass: every benign row once, in 300 pairs"
        );
        for pair in a.chunks(2) {
            assert_ne!(
                examples[pair[0]].malicious, examples[pair[1]].malicious,
                "every pair holds one of each class"
            );
        }
        let first_malicious = a.chunks(2).filter(|p| examples[p[0]].malicious).count();
        assert!(
            (120..180).contains(&first_malicious),
            "{first_malicious} of 300"
        );
        let benign_seen: HashSet<usize> = a.iter().copied().filter(|&i| i < 300).collect();
        assert_eq!(benign_seen.len(), 300);
        let malicious_seen: HashSet<usize> = a.iter().copied().filter(|&i| i >= 300).collect();
        assert_eq!(malicious_seen.len(), 100, "the smaller class cycles");
    }

    #[test]
    fn schedule_warms_up_then_decays_to_a_tenth() {
        let s = Schedule {
            step: 0,
            total: 110,
            warmup: 10,
            lr: 1e-4,
            wd: 0.0,
        };
        assert!((s.lr_at(0) - 1e-5).abs() < 1e-9);
        assert!((s.lr_at(9) - 1e-4).abs() < 1e-9);
        assert!((s.lr_at(10) - 1e-4).abs() < 1e-9);
        assert!(s.lr_at(60) < 1e-4 && s.lr_at(60) > 1e-5);
        assert!((s.lr_at(110) - 1e-5).abs() < 1e-9);
    }
}
