//! The llama.cpp scorer: one GGUF model, one context, one sequence.
//!
//! Request path: tokenize the user text (special tokens *not* parsed, so a
//! prompt cannot forge `<|im_end|>`), cover it with windows, and for each
//! window decode `window ++ suffix` after the cached instruction prefix; read
//! the logits at the last position (the verdict position) and turn the label
//! tokens' logits into P(malicious).
//!
//! The instruction prefix (system message and the start of the user turn) is
//! evaluated once per loaded model and kept in sequence 0 of the KV cache;
//! after each window the sequence is trimmed back to the prefix with
//! `llama_memory_seq_rm`, so no request pays for the prefix again and no copy
//! of the cache is made.

use std::io::Read;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use sha2::{Digest, Sha256};

use super::capture::{self, Capture, CaptureBox, ExitRule};
use super::guard::{self, Parsed};
use super::profile::{self, Format, LabelTokens, ModelMeta, Profile, TemplateSource};
use super::reason::{one_sentence, ExplainLimits, Reason, ReasonSource, Stop};
use super::windows::windows;
use super::{EngineError, ExplainRequest, Score, Scorer};
use crate::protocol::{Label, ModelRef};

/// Settings of the llama.cpp engine.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// CPU threads for decoding (llama.cpp `n_threads` and `n_threads_batch`).
    pub threads: usize,
    /// Context size in tokens (`n_ctx`), clamped to the model's `n_ctx_train`.
    /// Template and prompt window share it.
    pub n_ctx: u32,
    /// Tokens shared by consecutive windows of a long prompt.
    pub window_overlap: usize,
    /// Prompts with more tokens than this are refused with `input_too_long`.
    pub max_prompt_tokens: usize,
    /// Whether a detector's early-exit head (if it has one) decides the
    /// windows it is confident on; `false` scores every window with the full
    /// head.
    pub early_exit: bool,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        LlamaConfig {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            n_ctx: 2048,
            window_overlap: 64,
            max_prompt_tokens: 32_768,
            early_exit: true,
        }
    }
}

/// How hidden states are pooled over one window into a feature vector.
///
/// The variants' order (last, mean, max; `Ord`) is the canonical order of
/// poolings in a feature vector, a feature cache row and a detector file.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The state at the verdict position: the last token of the instruction
    /// template, after the prompt (instruction-templated last token).
    Last,
    /// The mean of the states of the prompt's own tokens in the window.
    Mean,
    /// The element-wise maximum of the states of the prompt's own tokens in
    /// the window: a few attack tokens after harmless filler keep their
    /// peaks, where the mean dilutes them (max-over-time pooling, as in
    /// Collobert et al. 2011 and Kim 2014's CNN text classifiers).
    Max,
}

/// Which hidden states make a detector's features.
///
/// The feature vector of one window is, for each layer in `layers` (in the
/// given order) and each pooling in `pooling` (in the given order), that
/// layer's `n_embd` floats: `layers.len() * pooling.len() * n_embd` floats.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FeatureSpec {
    /// Layer indices (`il`, from 0, below `n_layer - 1`): the output of that
    /// transformer block (`l_out-{il}` in llama.cpp's graph).
    pub layers: Vec<u32>,
    /// Poolings taken of each layer.
    pub pooling: Vec<Pooling>,
    /// Prompt tokens per window. Longer prompts are covered by overlapping
    /// windows (see [`super::windows`]) and the highest window score wins.
    pub window_tokens: usize,
}

/// A head that maps one window's features to P(malicious).
pub trait FeatureHead: Send {
    /// P(malicious) in `[0, 1]` for one feature vector.
    fn predict(&self, features: &[f32]) -> f64;
}

/// A trained detector for [`LlamaScorer::load_detector`]: features, head,
/// and how it is named in answers.
pub struct DetectorParts {
    /// Which hidden states to read.
    pub features: FeatureSpec,
    /// The head applied to each window's features.
    pub head: Box<dyn FeatureHead>,
    /// The threshold chosen on dev data.
    pub threshold: f64,
    /// Named in answers: the detector file and its sha256.
    pub model_ref: ModelRef,
    /// The base GGUF's sha256 when the caller has already hashed it (the
    /// detector file's check), so the base is not read twice; `None`: hash it.
    pub base_sha256: Option<String>,
    /// A shallower head that decides confident windows before the deepest
    /// layer is computed; its layers must be a subset of `features.layers`,
    /// its deepest shallower than theirs.
    pub early_exit: Option<ExitRule>,
}

/// The process-wide llama.cpp backend: `llama_backend_init` may run only once.
///
/// # Errors
/// [`EngineError::Load`] if llama.cpp could not be initialised.
pub fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Load {
            path: String::new(),
            reason: format!("llama.cpp backend init failed: {e}"),
        })
}

/// Checks that `path` starts like a GGUF file: magic `GGUF`, version 2 or 3,
/// and is large enough to hold a header. Cheap, done before llama.cpp sees it.
///
/// # Errors
/// [`EngineError::Load`] naming what is wrong.
pub fn check_gguf_header(path: &Path) -> Result<u64, EngineError> {
    let err = |reason: String| EngineError::Load {
        path: path.display().to_string(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let len = f.metadata().map_err(|e| err(e.to_string()))?.len();
    let mut head = [0u8; 24];
    f.read_exact(&mut head)
        .map_err(|_| err(format!("file is too short for a GGUF header ({len} bytes)")))?;
    if &head[0..4] != b"GGUF" {
        return Err(err("not a GGUF file (bad magic)".into()));
    }
    let version = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if !(2..=3).contains(&version) {
        return Err(err(format!("unsupported GGUF version {version}")));
    }
    check_gguf_layout(path, len).map_err(err)?;
    Ok(len)
}

/// A GGUF file's metadata and tensor table, parsed by ggml's own reader
/// (`gguf_init_from_file` with `no_alloc`: no tensor data is read); freed on drop.
pub struct GgufHeader(*mut llama_cpp_sys_2::gguf_context);

impl GgufHeader {
    /// Parses `path`; `None` if it is not a readable, well-formed GGUF header.
    pub fn open(path: &Path) -> Option<GgufHeader> {
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
        let params = llama_cpp_sys_2::gguf_init_params {
            no_alloc: true,
            ctx: std::ptr::null_mut(),
        };
        // SAFETY: a valid C string and params without a ggml context; freed in Drop.
        let ctx = unsafe { llama_cpp_sys_2::gguf_init_from_file(c_path.as_ptr(), params) };
        (!ctx.is_null()).then_some(GgufHeader(ctx))
    }

    /// The raw context, valid while `self` lives.
    pub fn as_ptr(&self) -> *mut llama_cpp_sys_2::gguf_context {
        self.0
    }
}

impl Drop for GgufHeader {
    fn drop(&mut self) {
        // SAFETY: allocated by gguf_init_from_file, freed once.
        unsafe { llama_cpp_sys_2::gguf_free(self.0) };
    }
}

/// Parses the GGUF metadata and tensor table with ggml's own reader (no tensor
/// data is read) and checks that every tensor's data lies inside the file, so a
/// half-copied file is refused with a clear reason before llama.cpp loads it.
fn check_gguf_layout(path: &Path, len: u64) -> Result<(), String> {
    let gguf = GgufHeader::open(path).ok_or("GGUF metadata is corrupt or truncated")?;
    let ctx = gguf.as_ptr();
    // SAFETY: `ctx` is a live gguf context while `gguf` lives.
    let (data_offset, needed) = unsafe {
        let data_offset = llama_cpp_sys_2::gguf_get_data_offset(ctx);
        let n = llama_cpp_sys_2::gguf_get_n_tensors(ctx);
        let end = (0..n)
            .map(|i| {
                llama_cpp_sys_2::gguf_get_tensor_offset(ctx, i)
                    .saturating_add(llama_cpp_sys_2::gguf_get_tensor_size(ctx, i))
            })
            .max()
            .unwrap_or(0);
        (data_offset, end)
    };
    let needed = u64::try_from(data_offset.saturating_add(needed)).unwrap_or(u64::MAX);
    if needed > len {
        return Err(format!(
            "truncated: its tensors need {needed} bytes, the file has {len} (still being copied?)"
        ));
    }
    Ok(())
}

/// Hex sha256 of a file, read in 1 MiB chunks.
///
/// # Errors
/// I/O errors reading the file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Scores prompts with a GGUF model through llama.cpp.
pub struct LlamaScorer {
    // Field order matters: `ctx` borrows `model` and must be dropped first.
    ctx: LlamaContext<'static>,
    batch: LlamaBatch<'static>,
    model: Arc<LlamaModel>,
    model_ref: ModelRef,
    profile: Profile,
    prefix: Vec<LlamaToken>,
    suffix: Vec<LlamaToken>,
    malicious_ids: Vec<LlamaToken>,
    benign_ids: Vec<LlamaToken>,
    window_tokens: usize,
    config: LlamaConfig,
    /// Whether sequence 0 holds exactly the evaluated prefix.
    prefix_cached: bool,
    /// False for recurrent and hybrid models, whose memory cannot be trimmed to a position.
    prefix_reuse: bool,
    path: PathBuf,
    /// Features read from hidden states, when this scorer extracts them.
    features: Option<FeatureSpec>,
    /// The head and threshold of a trained detector.
    head: Option<(Box<dyn FeatureHead>, f64)>,
    /// The chat template's text (embedded) or built-in name, for reasons.
    template: String,
    /// A reason-first model's reasoning for the last scored text: the text,
    /// and what was generated for its highest-scoring window.
    last_thought: Option<(String, Thought)>,
    /// The thought of the window just scored, with its score.
    pending_thought: Option<(f64, Thought)>,
    /// Declared after `ctx`: llama.cpp's eval callback points into it.
    capture: CaptureBox,
}

/// What a reason-first model wrote before its verdict on one window.
#[derive(Debug, Clone)]
struct Thought {
    /// The answer as generated: the answer prefix, then the reasoning.
    answer: String,
    /// Tokens generated.
    tokens: usize,
    /// Whether `think_max_tokens` cut it (`</think>` was then forced).
    cut: bool,
}

/// Text generated greedily, and why it stopped.
#[derive(Debug, Clone)]
struct Generated {
    text: String,
    tokens: usize,
    stop: Stop,
}

impl LlamaScorer {
    /// Loads `path` (fully into memory, without mmap, so that overwriting the
    /// file cannot SIGBUS the daemon), picks its profile, renders the template
    /// and evaluates the instruction prefix.
    ///
    /// # Errors
    /// [`EngineError::Load`] for unreadable or invalid files,
    /// [`EngineError::Unsupported`] when the profile cannot be applied.
    pub fn load(path: &Path, config: LlamaConfig) -> Result<LlamaScorer, EngineError> {
        Self::load_inner(path, config, None, None)
    }

    /// Loads `path` as a feature extractor: [`LlamaScorer::features`] returns
    /// the hidden states `spec` names, and the forward pass stops after the
    /// deepest layer it reads (so the logits are not computed).
    ///
    /// # Errors
    /// As [`LlamaScorer::load`]; [`EngineError::Unsupported`] when a layer is
    /// out of range.
    pub fn load_features(
        path: &Path,
        config: LlamaConfig,
        spec: FeatureSpec,
    ) -> Result<LlamaScorer, EngineError> {
        Self::load_inner(path, config, Some(spec), None)
    }

    /// Loads a trained detector on its base GGUF `path`. The caller has checked
    /// the base's sha256 against the detector file.
    ///
    /// # Errors
    /// As [`LlamaScorer::load_features`].
    pub fn load_detector(
        path: &Path,
        config: LlamaConfig,
        parts: DetectorParts,
    ) -> Result<LlamaScorer, EngineError> {
        if let Some(rule) = &parts.early_exit {
            let deepest = parts.features.layers.iter().max().copied().unwrap_or(0);
            let bad = rule.layers.is_empty()
                || rule.pooling.is_empty()
                || rule
                    .layers
                    .iter()
                    .any(|l| !parts.features.layers.contains(l) || *l >= deepest)
                || !(rule.benign_below <= parts.threshold
                    && parts.threshold <= rule.malicious_above);
            if bad {
                return Err(EngineError::Unsupported {
                    model: parts.model_ref.name.clone(),
                    reason: format!(
                        "early-exit head on layers {:?} (bounds {} and {}) must read some of the detector's layers {:?} below the deepest, with the threshold {} between its bounds",
                        rule.layers,
                        rule.benign_below,
                        rule.malicious_above,
                        parts.features.layers,
                        parts.threshold
                    ),
                });
            }
        }
        let mut scorer = Self::load_inner(path, config, Some(parts.features), parts.base_sha256)?;
        if scorer.config.early_exit {
            scorer.capture.get().exit = parts.early_exit;
        }
        scorer.head = Some((parts.head, parts.threshold));
        scorer.model_ref = parts.model_ref;
        Ok(scorer)
    }

    fn load_inner(
        path: &Path,
        config: LlamaConfig,
        features: Option<FeatureSpec>,
        known_sha256: Option<String>,
    ) -> Result<LlamaScorer, EngineError> {
        let load_err = |reason: String| EngineError::Load {
            path: path.display().to_string(),
            reason,
        };
        check_gguf_header(path)?;
        let sha256 = match known_sha256 {
            Some(sha) => sha,
            None => sha256_file(path).map_err(|e| load_err(e.to_string()))?,
        };
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let backend = backend()?;
        let params = LlamaModelParams::default().with_use_mmap(false);
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| load_err(format!("llama.cpp could not load it: {e}")))?;
        let model = Arc::new(model);
        let unsupported = |reason: String| EngineError::Unsupported {
            model: name.clone(),
            reason,
        };

        let embedded = model
            .chat_template(None)
            .ok()
            .and_then(|t| t.to_string().ok());
        let meta = ModelMeta {
            architecture: model
                .meta_val_str("general.architecture")
                .unwrap_or_default(),
            name: format!(
                "{} {} {}",
                model.meta_val_str("general.name").unwrap_or_default(),
                model.meta_val_str("general.basename").unwrap_or_default(),
                name
            ),
            has_chat_template: embedded.is_some(),
            chat_template: embedded.clone().unwrap_or_default(),
            promptgate_profile: model.meta_val_str("promptgate.profile").unwrap_or_default(),
            promptgate_threshold: model
                .meta_val_str("promptgate.threshold")
                .unwrap_or_default(),
            promptgate_template: model
                .meta_val_str("promptgate.template")
                .unwrap_or_default(),
        };
        let profile = profile::for_model(path, &meta).map_err(unsupported)?;
        let template = match &profile.template {
            TemplateSource::Embedded => {
                embedded.ok_or_else(|| unsupported("no embedded chat template".into()))?
            }
            TemplateSource::Builtin(name) => name.clone(),
        };
        let (prefix_text, suffix_text) =
            profile::render_parts(&profile, &template).map_err(unsupported)?;
        let vocab = model.vocab();
        let prefix = vocab.tokenize(prefix_text.as_bytes(), true, true);
        let suffix = vocab.tokenize(suffix_text.as_bytes(), false, true);
        let single = |labels: &[String]| -> Vec<LlamaToken> {
            let mut ids: Vec<LlamaToken> = labels
                .iter()
                .filter_map(|l| {
                    match (
                        vocab.tokenize(l.as_bytes(), false, false).as_slice(),
                        profile.label_tokens,
                    ) {
                        ([t], _) => Some(*t),
                        ([t, ..], LabelTokens::First) => Some(*t),
                        _ => None,
                    }
                })
                .collect();
            ids.sort();
            ids.dedup();
            ids
        };
        let malicious_ids = single(&profile.malicious_labels);
        let benign_ids = single(&profile.benign_labels);
        if malicious_ids.is_empty() || benign_ids.is_empty() {
            return Err(unsupported(format!(
                "profile {}: no label is a single token in this vocabulary",
                profile.name
            )));
        }
        if malicious_ids.iter().any(|m| benign_ids.contains(m)) {
            return Err(unsupported(
                "malicious and benign labels share a token".into(),
            ));
        }

        let overhead = prefix.len() + suffix.len();
        let n_ctx = match &features {
            // A detector's window is fixed by its training; the context holds
            // exactly template plus one window, decoded in one ubatch.
            Some(spec) => u32::try_from(overhead + spec.window_tokens).unwrap_or(u32::MAX),
            None => config.n_ctx,
        }
        .min(model.n_ctx_train())
        .max(1);
        let window_tokens = (n_ctx as usize).saturating_sub(overhead);
        if let Some(spec) = &features {
            let n_layer = model.n_layer();
            if spec.layers.is_empty() || spec.pooling.is_empty() {
                return Err(unsupported(
                    "a feature spec needs a layer and a pooling".into(),
                ));
            }
            if let Some(bad) = spec.layers.iter().find(|&&l| l + 1 >= n_layer) {
                return Err(unsupported(format!(
                    "layer {bad} is out of range: this model has {n_layer} layers (0..={}); the last one cannot be read, so use 0..={}",
                    n_layer.saturating_sub(1),
                    n_layer.saturating_sub(2)
                )));
            }
            if window_tokens < spec.window_tokens {
                return Err(unsupported(format!(
                    "the model's n_ctx_train {} cannot hold a {}-token window after the {overhead}-token template",
                    model.n_ctx_train(),
                    spec.window_tokens
                )));
            }
        }
        if window_tokens < 16 {
            return Err(unsupported(format!(
                "n_ctx {n_ctx} leaves {window_tokens} tokens for the prompt after the {overhead}-token template; raise --n-ctx"
            )));
        }
        let threads = i32::try_from(config.threads.max(1)).unwrap_or(i32::MAX);
        let capture = CaptureBox::new(Capture::new(
            features.as_ref().map_or(&[][..], |s| s.layers.as_slice()),
        ));
        let n_ubatch = if features.is_some() {
            n_ctx
        } else {
            n_ctx.min(512)
        };
        let ctx_params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_ctx)
            .with_n_ubatch(n_ubatch)
            .with_n_seq_max(1)
            .with_swa_full(true)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let ctx_params = if features.is_some() {
            capture::with_eval_callback(ctx_params, &capture).map_err(unsupported)?
        } else {
            ctx_params
        };
        // SAFETY: the context borrows the model, which lives in an `Arc` held by
        // the same struct and declared after `ctx`, so it outlives the context.
        let model_static: &'static LlamaModel = unsafe { &*Arc::as_ptr(&model) };
        let ctx = model_static
            .new_context(backend, ctx_params)
            .map_err(|e| load_err(format!("cannot create context: {e}")))?;
        let prefix_reuse = !(model.is_recurrent() || model.is_hybrid());
        let mut scorer = LlamaScorer {
            ctx,
            batch: LlamaBatch::new(n_ctx as usize, 1),
            model,
            model_ref: ModelRef { name, sha256 },
            profile,
            prefix,
            suffix,
            malicious_ids,
            benign_ids,
            window_tokens,
            config: LlamaConfig { n_ctx, ..config },
            prefix_cached: false,
            prefix_reuse,
            path: path.to_path_buf(),
            features,
            head: None,
            template,
            last_thought: None,
            pending_thought: None,
            capture,
        };
        if scorer.prefix_reuse {
            scorer.cache_prefix()?;
        }
        tracing::info!(
            model = %scorer.model_ref.name,
            profile = %scorer.profile.name,
            n_ctx,
            prefix_tokens = scorer.prefix.len(),
            suffix_tokens = scorer.suffix.len(),
            window_tokens,
            "model loaded"
        );
        Ok(scorer)
    }

    /// The profile in use.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Hex sha256 of the template around the prompt: the profile name and the
    /// token ids of the prefix and suffix. A detector's features are only
    /// valid under the template it was trained with.
    pub fn template_sha256(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.profile.name.as_bytes());
        for part in [&self.prefix, &self.suffix] {
            h.update((part.len() as u64).to_le_bytes());
            for t in part {
                h.update(t.0.to_le_bytes());
            }
        }
        hex::encode(h.finalize())
    }

    /// Hex sha256 of the GGUF file.
    pub fn model_sha256(&self) -> &str {
        &self.model_ref.sha256
    }

    /// Feature vectors of the first `max_windows` windows of `text` only (the
    /// training path: one window per row), and its token count.
    ///
    /// # Errors
    /// As [`LlamaScorer::features`].
    pub fn features_head(
        &mut self,
        text: &str,
        max_windows: usize,
    ) -> Result<(Vec<Vec<f32>>, usize), EngineError> {
        if self.features.is_none() {
            return Err(EngineError::Unsupported {
                model: self.model_ref.name.clone(),
                reason: "loaded without a feature spec".into(),
            });
        }
        let tokens = self.tokens_checked(text)?;
        let ranges = windows(tokens.len(), self.window_tokens, self.config.window_overlap);
        let mut out = Vec::new();
        for r in ranges.iter().take(max_windows.max(1)) {
            match self.window_features(&tokens[r.clone()], self.prefix_reuse, false)? {
                Ok(x) => out.push(x),
                Err(_) => unreachable!("the exit rule is not armed for feature extraction"),
            }
        }
        Ok((out, tokens.len()))
    }

    /// The loaded model.
    pub fn model_handle(&self) -> &LlamaModel {
        &self.model
    }

    /// The loaded model, shared (for a second context on the same weights).
    pub fn shared_model(&self) -> Arc<LlamaModel> {
        Arc::clone(&self.model)
    }

    /// The whole classification prompt of `text` as token ids, exactly as a
    /// single-window score decodes it: the template's prefix (with BOS), the
    /// text's tokens, the template's suffix. What `promptgate bench` sends a
    /// peer server so that both evaluate the same tokens.
    pub fn classification_tokens(&self, text: &str) -> Vec<LlamaToken> {
        let mut all = self.prefix.clone();
        all.extend(self.tokenize_text(text));
        all.extend_from_slice(&self.suffix);
        all
    }

    /// Tokenizes user text as the scorer does: no BOS, special tokens not parsed.
    pub fn tokenize_text(&self, text: &str) -> Vec<LlamaToken> {
        self.model.vocab().tokenize(text.as_bytes(), false, false)
    }

    /// Scores `text` with the whole template evaluated from scratch for every
    /// window, without the prefix cache: the reference the cache is tested against.
    ///
    /// # Errors
    /// As [`Scorer::score`].
    pub fn score_uncached(&mut self, text: &str) -> Result<Score, EngineError> {
        let score = self.score_with(text, false, &|| false);
        self.prefix_cached = false;
        score
    }

    fn cache_prefix(&mut self) -> Result<(), EngineError> {
        let stop = self.features.is_some();
        self.capture.get().begin(false, stop, 0..0, false);
        self.ctx.clear_kv_cache();
        self.batch.clear();
        for (i, &t) in self.prefix.iter().enumerate() {
            self.batch
                .add(t, pos(i), &[0], false)
                .map_err(|e| EngineError::Inference(e.to_string()))?;
        }
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| EngineError::Inference(format!("prefix decode: {e}")))?;
        self.prefix_cached = true;
        Ok(())
    }

    fn tokens_checked(&self, text: &str) -> Result<Vec<LlamaToken>, EngineError> {
        let tokens = self.tokenize_text(text);
        if tokens.len() > self.config.max_prompt_tokens {
            return Err(EngineError::InputTooLong {
                tokens: tokens.len(),
                limit: self.config.max_prompt_tokens,
            });
        }
        Ok(tokens)
    }

    fn score_with(
        &mut self,
        text: &str,
        use_cache: bool,
        abandoned: &dyn Fn() -> bool,
    ) -> Result<Score, EngineError> {
        if self.features.is_some() && self.head.is_none() {
            return Err(EngineError::Unsupported {
                model: self.model_ref.name.clone(),
                reason: "a feature extractor without a head cannot score".into(),
            });
        }
        let tokens = self.tokens_checked(text)?;
        let ranges = windows(tokens.len(), self.window_tokens, self.config.window_overlap);
        let mut best = 0.0f64;
        let mut best_thought: Option<Thought> = None;
        let mut early_exit_windows = 0;
        for (i, r) in ranges.iter().enumerate() {
            super::watchdog_tick();
            if i > 0 && abandoned() {
                return Err(EngineError::Cancelled {
                    windows_done: i,
                    windows: ranges.len(),
                });
            }
            let window = &tokens[r.clone()];
            let p = if self.head.is_some() {
                let p = match self.window_features(window, use_cache, true)? {
                    Ok(features) => {
                        let (head, _) = self.head.as_ref().expect("checked above");
                        head.predict(&features)
                    }
                    Err(p) => {
                        early_exit_windows += 1;
                        p
                    }
                };
                if p.is_nan() {
                    1.0 // fail closed
                } else {
                    p
                }
            } else {
                self.score_window(window, use_cache)?
            };
            if let Some((_, thought)) = self.pending_thought.take() {
                if best_thought.is_none() || p > best {
                    best_thought = Some(thought);
                }
            }
            best = best.max(p);
        }
        if let Some(t) = best_thought {
            self.last_thought = Some((text.to_string(), t));
        }
        Ok(Score {
            p_malicious: best,
            tokens: tokens.len(),
            windows: ranges.len(),
            early_exit_windows,
        })
    }

    /// The feature vectors of `text`, one per window (see [`FeatureSpec`]),
    /// and its token count.
    ///
    /// # Errors
    /// [`EngineError::Unsupported`] if this scorer was not loaded with a
    /// feature spec; otherwise as [`Scorer::score`].
    pub fn features(&mut self, text: &str) -> Result<(Vec<Vec<f32>>, usize), EngineError> {
        self.features_head(text, usize::MAX)
    }

    /// Decodes one window after the prefix (cached or not), marking only the
    /// verdict position for output. Returns the batch index where the window starts.
    fn decode_window(
        &mut self,
        window: &[LlamaToken],
        use_cache: bool,
        early_exit: bool,
    ) -> Result<usize, EngineError> {
        let infer = |e: String| EngineError::Inference(e);
        let start = if use_cache {
            if !self.prefix_cached {
                self.cache_prefix()?;
            }
            let keep = u32::try_from(self.prefix.len()).map_err(|e| infer(e.to_string()))?;
            let trimmed = self
                .ctx
                .clear_kv_cache_seq(Some(0), Some(keep), None)
                .map_err(|e| infer(e.to_string()))?;
            if !trimmed {
                // The memory refused a partial removal: rebuild the prefix.
                self.cache_prefix()?;
            }
            self.prefix.len()
        } else {
            self.ctx.clear_kv_cache();
            self.prefix_cached = false;
            0
        };
        self.batch.clear();
        let head: &[LlamaToken] = if use_cache { &[] } else { &self.prefix };
        let all = head.iter().chain(window).chain(self.suffix.iter());
        let n = head.len() + window.len() + self.suffix.len();
        for (i, &t) in all.enumerate() {
            self.batch
                .add(t, pos(start + i), &[0], i + 1 == n)
                .map_err(|e| infer(e.to_string()))?;
        }
        let text_start = head.len();
        let record = self.features.is_some();
        self.capture.get().begin(
            record,
            record,
            text_start..text_start + window.len(),
            early_exit,
        );
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| infer(format!("decode: {e}")))?;
        Ok(text_start)
    }

    /// One window's features (`Ok(Ok)`), or, when `early_exit` is set and
    /// the detector's exit head was confident, that head's P(malicious)
    /// (`Ok(Err)`): the deeper layers were then not computed.
    fn window_features(
        &mut self,
        window: &[LlamaToken],
        use_cache: bool,
        early_exit: bool,
    ) -> Result<Result<Vec<f32>, f64>, EngineError> {
        self.decode_window(window, use_cache, early_exit)?;
        let spec = self.features.clone().expect("feature scorer");
        let cap = self.capture.get();
        if let Some(e) = cap.error.take() {
            return Err(EngineError::Inference(e));
        }
        if let Some(p) = cap.exited.take() {
            return Ok(Err(p));
        }
        capture::pooled(&cap.rows, &spec.layers, &spec.pooling)
            .map(Ok)
            .map_err(|layer| {
                EngineError::Inference(format!(
                    "layer {layer}'s output (l_out-{layer}) was not seen in the graph"
                ))
            })
    }

    fn score_window(&mut self, window: &[LlamaToken], use_cache: bool) -> Result<f64, EngineError> {
        self.decode_window(window, use_cache, false)?;
        if let Format::Narasimha { think_max_tokens } = self.profile.format {
            return self.score_after_thought(window.len(), think_max_tokens);
        }
        let logits = self.ctx.get_logits_ith(self.batch.n_tokens() - 1);
        Ok(label_probability(
            logits,
            &self.malicious_ids,
            &self.benign_ids,
        ))
    }

    /// Reason-first scoring: after `decode_window` (whose suffix opens the
    /// reasoning), generates the reasoning greedily up to `</think>` or
    /// `think_max_tokens` (no time bound, so the score does not depend on the
    /// machine's speed), closes it, and reads the label logits at the verdict
    /// position after it.
    fn score_after_thought(
        &mut self,
        window_len: usize,
        think_max_tokens: usize,
    ) -> Result<f64, EngineError> {
        let n_past = self.prefix.len() + window_len + self.suffix.len();
        let limits = ExplainLimits {
            max_tokens: think_max_tokens.max(1),
            max_time: std::time::Duration::MAX,
        };
        let gen = self.continue_greedy(n_past, limits, &|t: &str| t.contains("</think>"))?;
        let closed = gen.text.contains("</think>");
        let mut n_past = n_past + gen.tokens;
        let vocab_model = self.model.clone();
        let vocab = vocab_model.vocab();
        let tail = if closed { "\n\n" } else { "\n</think>\n\n" };
        let forced = vocab.tokenize(tail.as_bytes(), false, true);
        self.batch.clear();
        for (i, &t) in forced.iter().enumerate() {
            self.batch
                .add(t, pos(n_past + i), &[0], i + 1 == forced.len())
                .map_err(|e| EngineError::Inference(e.to_string()))?;
        }
        n_past += forced.len();
        let _ = n_past;
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| EngineError::Inference(format!("decode: {e}")))?;
        let logits = self.ctx.get_logits_ith(self.batch.n_tokens() - 1);
        let answer = format!("{}{}", self.profile.answer_prefix, gen.text);
        let top = argmax(logits);
        if !self.malicious_ids.contains(&top) && !self.benign_ids.contains(&top) {
            tracing::debug!(model = %self.model_ref.name, raw = %answer, "unparsed answer");
            return Err(EngineError::Unparsed {
                why: "no label at the verdict position after the reasoning".into(),
            });
        }
        let p = label_probability(logits, &self.malicious_ids, &self.benign_ids);
        let thought = Thought {
            answer,
            tokens: gen.tokens,
            cut: !closed,
        };
        // The reason kept is the highest-scoring window's (see score_with).
        self.pending_thought = Some((p, thought));
        Ok(p)
    }

    /// Greedy generation continuing from `n_past` tokens already decoded
    /// (the last decode's last logits row is the first step's). Stops at an
    /// end-of-generation token, when `done` says the text is complete, or at
    /// a bound.
    fn continue_greedy(
        &mut self,
        mut n_past: usize,
        limits: ExplainLimits,
        done: &dyn Fn(&str) -> bool,
    ) -> Result<Generated, EngineError> {
        let started = std::time::Instant::now();
        let model = self.model.clone();
        let vocab = model.vocab();
        let room = (self.config.n_ctx as usize).saturating_sub(n_past);
        let max_tokens = limits.max_tokens.min(room);
        let mut bytes = Vec::new();
        let mut ids: Vec<LlamaToken> = Vec::new();
        let mut ends: Vec<usize> = Vec::new();
        let mut tokens = 0usize;
        let stop = loop {
            if tokens >= max_tokens || started.elapsed() >= limits.max_time {
                break Stop::Budget;
            }
            let logits = self.ctx.get_logits_ith(self.batch.n_tokens() - 1);
            let tok = argmax(logits);
            if vocab.is_eog(tok) {
                break Stop::End;
            }
            tokens += 1;
            bytes.extend(vocab.token_to_piece(tok, true, None));
            ids.push(tok);
            ends.push(bytes.len());
            if let Some(start) = repeats(&ids, REPEAT_NGRAM) {
                // Greedy decoding of a small model loops; keep what came before.
                bytes.truncate(if start == 0 { 0 } else { ends[start - 1] });
                break Stop::Budget;
            }
            if done(valid_utf8_prefix(&bytes)) {
                break Stop::Sentence;
            }
            if tokens >= max_tokens || started.elapsed() >= limits.max_time {
                break Stop::Budget;
            }
            self.batch.clear();
            self.batch
                .add(tok, pos(n_past), &[0], true)
                .map_err(|e| EngineError::Inference(e.to_string()))?;
            n_past += 1;
            self.ctx
                .decode(&mut self.batch)
                .map_err(|e| EngineError::Inference(format!("decode: {e}")))?;
        };
        Ok(Generated {
            text: valid_utf8_prefix(&bytes).to_string(),
            tokens,
            stop,
        })
    }

    /// Evaluates `prompt` from an empty cache (the prefix cache is given up
    /// and rebuilt by the next score), with the whole graph computed even for
    /// a detector, then generates greedily as [`LlamaScorer::continue_greedy`].
    fn generate(
        &mut self,
        prompt: &[LlamaToken],
        limits: ExplainLimits,
        done: &dyn Fn(&str) -> bool,
    ) -> Result<Generated, EngineError> {
        // A detector's eval callback stops the forward pass after a middle
        // layer; generation needs the logits, so nothing stops early here.
        self.capture.get().begin(false, false, 0..0, false);
        self.prefix_cached = false;
        self.ctx.clear_kv_cache();
        if prompt.is_empty() || prompt.len() >= self.config.n_ctx as usize {
            return Err(EngineError::Inference(format!(
                "the reason prompt has {} tokens; the context holds {}",
                prompt.len(),
                self.config.n_ctx
            )));
        }
        self.batch.clear();
        for (i, &t) in prompt.iter().enumerate() {
            self.batch
                .add(t, pos(i), &[0], i + 1 == prompt.len())
                .map_err(|e| EngineError::Inference(e.to_string()))?;
        }
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| EngineError::Inference(format!("reason prompt decode: {e}")))?;
        self.continue_greedy(prompt.len(), limits, done)
    }

    /// The text's tokens, cut to fit `budget` tokens: its start and its end
    /// around `…` (what a reason needs to see of a long prompt).
    fn fit_text(&self, text: &str, budget: usize) -> Vec<LlamaToken> {
        let tokens = self.tokenize_text(text);
        if tokens.len() <= budget {
            return tokens;
        }
        let gap = self.tokenize_text(" … ");
        let keep = budget.saturating_sub(gap.len());
        let head = keep / 2;
        let tail = keep - head;
        let mut out = tokens[..head].to_vec();
        out.extend(gap);
        out.extend_from_slice(&tokens[tokens.len() - tail..]);
        out
    }

    /// `prefix ++ text ++ suffix` tokens, with the text cut to leave room
    /// for `max_tokens` generated ones in the context.
    fn prompt_tokens(
        &self,
        prefix: &str,
        text: &str,
        suffix: &str,
        max_tokens: usize,
    ) -> Result<Vec<LlamaToken>, EngineError> {
        let vocab = self.model.vocab();
        let mut prompt = vocab.tokenize(prefix.as_bytes(), true, true);
        let tail = vocab.tokenize(suffix.as_bytes(), false, true);
        let budget =
            (self.config.n_ctx as usize).saturating_sub(prompt.len() + tail.len() + max_tokens + 1);
        if budget < 8 {
            return Err(EngineError::Unsupported {
                model: self.model_ref.name.clone(),
                reason: format!(
                    "n_ctx {} leaves no room for a reason of {max_tokens} tokens",
                    self.config.n_ctx
                ),
            });
        }
        prompt.extend(self.fit_text(text, budget));
        prompt.extend(tail);
        Ok(prompt)
    }

    /// A zero-shot model or a detector's base model, prompted with the
    /// verdict, writes one sentence.
    fn explain_by_prompt(
        &mut self,
        text: &str,
        ask: &ExplainRequest,
    ) -> Result<Reason, EngineError> {
        let started = std::time::Instant::now();
        let verdict = match ask.label {
            Label::Malicious => EXPLAIN_MALICIOUS,
            Label::Benign => EXPLAIN_BENIGN,
        };
        let user = EXPLAIN_USER.replace("{verdict}", verdict);
        let answer_prefix = match ask.label {
            Label::Malicious => EXPLAIN_PREFIX_MALICIOUS,
            Label::Benign => EXPLAIN_PREFIX_BENIGN,
        };
        let (prefix, suffix) =
            profile::render_messages(&self.template, EXPLAIN_SYSTEM, &user, answer_prefix)
                .map_err(|reason| EngineError::Unsupported {
                    model: self.model_ref.name.clone(),
                    reason,
                })?;
        let limits = ask.limits;
        let prompt = self.prompt_tokens(&prefix, text, &suffix, limits.max_tokens)?;
        let gen = self.generate(&prompt, limits, &|t: &str| {
            super::reason::sentence_end(t, false).is_some()
        })?;
        let written = format!("{answer_prefix}{}", gen.text);
        let sentence = one_sentence(&written, gen.stop);
        Ok(Reason {
            truncated: sentence.as_ref().is_some_and(|(_, cut)| *cut),
            text: sentence.map(|(s, _)| s),
            source: if self.head.is_some() {
                ReasonSource::BaseModel
            } else {
                ReasonSource::Model
            },
            categories: Vec::new(),
            generated_tokens: gen.tokens,
            ms: super::ms(started.elapsed()),
        })
    }

    /// A verdict-first guard model (Llama Guard 3, Qwen3Guard) writes the
    /// rest of its answer after the verdict position; the categories are
    /// parsed from it and the reason composed.
    fn explain_by_guard(
        &mut self,
        text: &str,
        ask: &ExplainRequest,
    ) -> Result<Reason, EngineError> {
        let started = std::time::Instant::now();
        let (prefix, suffix) =
            profile::render_parts(&self.profile, &self.template).map_err(|reason| {
                EngineError::Unsupported {
                    model: self.model_ref.name.clone(),
                    reason,
                }
            })?;
        let limits = ask.limits;
        let prompt = self.prompt_tokens(&prefix, text, &suffix, limits.max_tokens)?;
        // Two lines (verdict, categories) are a whole answer.
        let gen = self.generate(&prompt, limits, &|t: &str| {
            t.trim_start()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .count()
                >= 2
                && t.ends_with('\n')
        })?;
        let answer = format!("{}{}", self.profile.answer_prefix, gen.text);
        let parsed = guard::parse(&self.profile.format, &answer, gen.stop != Stop::Budget);
        let ms = super::ms(started.elapsed());
        Ok(match parsed {
            Parsed::Ok {
                verdict,
                categories,
                ..
            } => Reason {
                text: Some(guard::compose_reason(
                    &self.profile.display_name,
                    verdict,
                    &categories,
                )),
                source: ReasonSource::GuardCategories,
                categories,
                generated_tokens: gen.tokens,
                ms,
                truncated: false,
            },
            Parsed::Unparsed { why } => {
                tracing::debug!(model = %self.model_ref.name, raw = %answer, why, "unparsed answer");
                Reason {
                    text: None,
                    source: ReasonSource::Unparsed,
                    categories: Vec::new(),
                    generated_tokens: gen.tokens,
                    ms,
                    truncated: gen.stop == Stop::Budget,
                }
            }
        })
    }
}

const EXPLAIN_SYSTEM: &str = "You explain the decisions of a security filter that screens \
prompts sent to an AI assistant. Answer in one short sentence.";
const EXPLAIN_USER: &str = "Prompt:\n\"\"\"\n{text}\n\"\"\"\n\n\
The filter judged this prompt {verdict}. In one sentence, say why.";
const EXPLAIN_MALICIOUS: &str =
    "to be an attack (a prompt injection, a jailbreak, or a request for harmful content)";
const EXPLAIN_BENIGN: &str = "to be safe (not an attack)";
/// Starts the reason, so a small model answers the question instead of
/// repeating the prompt or the verdict.
const EXPLAIN_PREFIX_MALICIOUS: &str = "This prompt is an attack because";
const EXPLAIN_PREFIX_BENIGN: &str = "This prompt is safe because";

/// Length of the token sequence whose repetition ends generation.
const REPEAT_NGRAM: usize = 4;

/// When the last `n` tokens already occurred earlier in `ids`, the index
/// where their repetition starts.
fn repeats(ids: &[LlamaToken], n: usize) -> Option<usize> {
    if ids.len() < 2 * n {
        return None;
    }
    let tail = &ids[ids.len() - n..];
    ids[..ids.len() - n]
        .windows(n)
        .any(|w| w == tail)
        .then(|| ids.len() - n)
}

/// The longest prefix of `bytes` that is valid UTF-8 (a token may end inside a character).
fn valid_utf8_prefix(bytes: &[u8]) -> &str {
    match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
    }
}

/// The token with the highest logit (NaN logits never win); greedy decoding.
fn argmax(logits: &[f32]) -> LlamaToken {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    LlamaToken(i32::try_from(best).unwrap_or(0))
}

impl Scorer for LlamaScorer {
    fn model(&self) -> &ModelRef {
        &self.model_ref
    }

    fn default_threshold(&self) -> f64 {
        self.head
            .as_ref()
            .map_or(self.profile.threshold, |(_, t)| *t)
    }

    fn is_trained(&self) -> bool {
        self.head.is_some() || self.profile.name == profile::SFT_PROFILE
    }

    /// `n_ctx` minus the template's tokens.
    fn window_tokens(&self) -> Option<usize> {
        Some(self.window_tokens)
    }

    fn explain(&mut self, text: &str, ask: &ExplainRequest) -> Result<Reason, EngineError> {
        if self.features.is_some() && self.head.is_none() {
            return Err(EngineError::Unsupported {
                model: self.model_ref.name.clone(),
                reason: "a feature extractor gives no verdict to explain".into(),
            });
        }
        let reason = match &self.profile.format {
            Format::Narasimha { .. } => {
                // Written while scoring: the reason is the model's own.
                return match &self.last_thought {
                    Some((t, thought)) if t == text => {
                        let parsed = guard::parse(
                            &self.profile.format,
                            &format!("{}</think>", thought.answer),
                            true,
                        );
                        let sentence = match parsed {
                            Parsed::Ok { reason, .. } => reason,
                            Parsed::Unparsed { .. } => None,
                        };
                        Ok(Reason {
                            source: if sentence.is_some() {
                                ReasonSource::GuardModel
                            } else {
                                ReasonSource::Unparsed
                            },
                            text: sentence,
                            categories: Vec::new(),
                            generated_tokens: thought.tokens,
                            ms: 0.0,
                            truncated: thought.cut,
                        })
                    }
                    _ => Err(EngineError::Inference(
                        "no reasoning kept for this text".into(),
                    )),
                };
            }
            Format::Qwen3Guard { .. } | Format::LlamaGuard3 => self.explain_by_guard(text, ask),
            Format::YesNo if self.profile.name.starts_with("granite-guardian") => {
                // Granite Guardian answers only Yes or No: its verdict is the reason.
                let verdict = match ask.label {
                    Label::Malicious => guard::GuardVerdict::Malicious,
                    Label::Benign => guard::GuardVerdict::Benign,
                };
                return Ok(Reason {
                    text: Some(guard::compose_reason(
                        &self.profile.display_name,
                        verdict,
                        &[],
                    )),
                    source: ReasonSource::GuardCategories,
                    categories: Vec::new(),
                    generated_tokens: 0,
                    ms: 0.0,
                    truncated: false,
                });
            }
            Format::YesNo => self.explain_by_prompt(text, ask),
        };
        // The cache no longer holds the prefix; the next score rebuilds it.
        self.prefix_cached = false;
        if let Err(EngineError::Inference(e)) = &reason {
            tracing::error!(model = %self.path.display(), error = %e, "reason failed");
        }
        reason
    }

    fn score(&mut self, text: &str) -> Result<Score, EngineError> {
        self.score_unless(text, &|| false)
    }

    fn score_unless(
        &mut self,
        text: &str,
        abandoned: &dyn Fn() -> bool,
    ) -> Result<Score, EngineError> {
        let use_cache = self.prefix_reuse;
        self.last_thought = None;
        self.pending_thought = None;
        self.score_with(text, use_cache, abandoned).map_err(|e| {
            if let EngineError::Inference(_) = e {
                tracing::error!(model = %self.path.display(), error = %e, "inference failed");
                self.prefix_cached = false;
            }
            e
        })
    }
}

fn pos(i: usize) -> i32 {
    i32::try_from(i).unwrap_or(i32::MAX)
}

/// P(malicious) from one logits row: the two label groups are compared by the
/// log-sum-exp of their tokens' logits (a softmax restricted to the labels).
///
/// `logits` has `n_vocab` entries; the ids index into it.
pub fn label_probability(logits: &[f32], malicious: &[LlamaToken], benign: &[LlamaToken]) -> f64 {
    let lse = |ids: &[LlamaToken]| -> f64 {
        let vals: Vec<f64> = ids
            .iter()
            .filter_map(|t| usize::try_from(t.0).ok().and_then(|i| logits.get(i)))
            .map(|&v| f64::from(v))
            .collect();
        if vals.iter().any(|v| v.is_nan()) {
            return f64::NAN;
        }
        let max = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if !max.is_finite() {
            return max;
        }
        max + vals.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
    };
    let (m, b) = (lse(malicious), lse(benign));
    if m.is_nan() || b.is_nan() {
        return 1.0; // fail closed on garbage logits
    }
    1.0 / (1.0 + (b - m).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_probability_is_a_softmax_over_groups() {
        let logits = [0.0f32, 2.0, 0.0, 1.0];
        let p = label_probability(&logits, &[LlamaToken(1)], &[LlamaToken(3)]);
        let expected = 1.0 / (1.0 + (-1.0f64).exp());
        assert!((p - expected).abs() < 1e-12);
        // Two benign tokens of equal logit double the benign mass.
        let p2 = label_probability(
            &[1.0, 1.0, 1.0],
            &[LlamaToken(0)],
            &[LlamaToken(1), LlamaToken(2)],
        );
        assert!((p2 - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn repetition_is_found_where_it_starts() {
        let t = |v: &[i32]| v.iter().map(|&i| LlamaToken(i)).collect::<Vec<_>>();
        assert_eq!(repeats(&t(&[1, 2, 3, 4, 5, 1, 2, 3, 4]), 4), Some(5));
        assert_eq!(repeats(&t(&[1, 2, 3, 4, 5, 6, 7, 8]), 4), None);
        assert_eq!(repeats(&t(&[1, 2, 3]), 4), None);
        assert_eq!(argmax(&[0.5, f32::NAN, 2.0, 1.0]), LlamaToken(2));
        assert_eq!(valid_utf8_prefix(&[b'a', 0xC3]), "a");
    }

    #[test]
    fn garbage_logits_fail_closed() {
        let p = label_probability(&[f32::NAN, 0.0], &[LlamaToken(0)], &[LlamaToken(1)]);
        assert_eq!(p, 1.0);
    }

    #[test]
    fn header_check_rejects_non_gguf() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        std::fs::write(&p, b"not a gguf file at all, really not").unwrap();
        assert!(check_gguf_header(&p)
            .unwrap_err()
            .to_string()
            .contains("bad magic"));
        std::fs::write(&p, b"GGUF").unwrap();
        assert!(check_gguf_header(&p)
            .unwrap_err()
            .to_string()
            .contains("too short"));
        // A header with zero tensors and zero keys is a complete, empty GGUF.
        let mut ok = b"GGUF".to_vec();
        ok.extend_from_slice(&3u32.to_le_bytes());
        ok.extend_from_slice(&[0u8; 16]);
        std::fs::write(&p, &ok).unwrap();
        assert_eq!(check_gguf_header(&p).unwrap(), 24);
        // A header that promises one tensor it does not contain.
        let mut bad = b"GGUF".to_vec();
        bad.extend_from_slice(&3u32.to_le_bytes());
        bad.extend_from_slice(&1u64.to_le_bytes());
        bad.extend_from_slice(&0u64.to_le_bytes());
        std::fs::write(&p, &bad).unwrap();
        assert!(check_gguf_header(&p)
            .unwrap_err()
            .to_string()
            .contains("corrupt or truncated"));
    }
}
