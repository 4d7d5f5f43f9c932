//! The detector file: a trained head on a base GGUF, as one JSON document
//! (`NAME.detector.json`). Format in docs/detector.md.
//!
//! A detector file plus its base GGUF is one servable unit. The base is found
//! by file name next to the detector file (or in the models directory) and
//! must have the sha256 recorded here; a missing or different base is refused
//! with a reason, never served.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::head::LogisticHead;
use super::train::Candidate;
use crate::engine::capture::ExitRule;
use crate::engine::llama::{sha256_file, DetectorParts, FeatureSpec, Pooling};
use crate::protocol::ModelRef;

/// The `format` string of this version of the file.
pub const FORMAT: &str = "promptgate-detector/1";

/// File-name suffix of detector files.
pub const SUFFIX: &str = ".detector.json";

/// `OUT` to `OUT.detector.json` (unchanged if it already ends so).
pub fn detector_path(out: &Path) -> PathBuf {
    let s = out.as_os_str().to_string_lossy();
    if s.ends_with(SUFFIX) {
        out.to_path_buf()
    } else {
        PathBuf::from(format!("{s}{SUFFIX}"))
    }
}

/// Whether `path` names a detector file.
pub fn is_detector_path(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().ends_with(SUFFIX))
}

/// The base GGUF a detector reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    /// File name of the GGUF.
    pub file: String,
    /// Its hex sha256.
    pub sha256: String,
}

/// A data file used in training.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRef {
    /// File name.
    pub file: String,
    /// Hex sha256 of the file.
    pub sha256: String,
    /// Rows in the file.
    pub rows: usize,
}

/// How features are taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureInfo {
    /// Layers, pooling and window size.
    #[serde(flatten)]
    pub spec: FeatureSpec,
    /// Tokens shared by consecutive windows of a long prompt.
    pub window_overlap: usize,
    /// The profile (instruction template) the prompt is wrapped in.
    pub profile: String,
    /// sha256 of the template's tokens ([`crate::engine::llama::LlamaScorer::template_sha256`]).
    pub template_sha256: String,
    /// Version of the text normalisation and feature layout.
    pub normalization: String,
    /// Which windows of a training row were used.
    pub training_windows: String,
}

/// Provenance of the fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingInfo {
    /// Training files.
    pub data: Vec<DataRef>,
    /// The dev file (threshold and candidate choice).
    pub dev: DataRef,
    /// Training rows used after per-group sampling (and scoring).
    pub rows_used: usize,
    /// Dev rows used.
    pub dev_rows_used: usize,
    /// Cap per (source, label) group.
    pub per_group: usize,
    /// Sampling seed.
    pub seed: u64,
    /// L2 penalty of the chosen head.
    pub l2: f64,
    /// The threshold's bound on the dev false-positive rate.
    pub max_fpr: f64,
    /// Seconds spent extracting features (0-ish when cached).
    pub extract_seconds: f64,
    /// Seconds for the whole run.
    pub total_seconds: f64,
    /// The command line.
    pub command: String,
}

/// A detector file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorFile {
    /// [`FORMAT`].
    pub format: String,
    /// Detector name.
    pub name: String,
    /// The base GGUF.
    pub base: Base,
    /// How features are taken.
    pub features: FeatureInfo,
    /// The logistic head.
    pub head: LogisticHead,
    /// Threshold on P(malicious), chosen on dev.
    pub threshold: f64,
    /// Provenance.
    pub training: TrainingInfo,
    /// Dev figures of the chosen head.
    pub dev_metrics: serde_json::Value,
    /// Every candidate tried, with its dev figures.
    #[serde(default)]
    pub candidates: Vec<Candidate>,
    /// The early-exit head, if the detector was trained with one
    /// (`train --early-exit LAYERS`). Files without it are read as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_exit: Option<EarlyExit>,
}

/// A shallower head that decides a window as soon as its deepest layer is
/// computed, when it is confident (see [`ExitRule`]): P(malicious) below
/// `benign_below` or above `malicious_above`. Other windows go on to the
/// detector's own head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyExit {
    /// Layers it reads: a subset of `features.layers`, below the deepest.
    pub layers: Vec<u32>,
    /// Poolings of each layer.
    pub pooling: Vec<Pooling>,
    /// The logistic head, on `layers.len() * pooling.len() * n_embd` features.
    pub head: LogisticHead,
    /// Its L2 penalty, chosen by dev AUROC.
    pub l2: f64,
    /// Exit as benign below this P(malicious); at most `threshold`.
    pub benign_below: f64,
    /// Exit as malicious above this P(malicious); at least `threshold`.
    pub malicious_above: f64,
    /// The bound on changed verdicts `benign_below` was chosen for: at most
    /// this fraction of the dev rows the full head calls malicious exit as
    /// benign.
    pub tolerance: f64,
    /// The same for `malicious_above`: at most this fraction of the dev rows
    /// the full head calls benign exit as malicious.
    #[serde(default)]
    pub tolerance_malicious: f64,
    /// Dev figures: exit rates, verdicts changed, and the cascade's metrics.
    pub dev: serde_json::Value,
}

/// Why a detector cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    /// Unreadable or malformed file.
    #[error("detector {path}: {reason}")]
    Invalid {
        /// The detector file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The base GGUF is missing or is another file.
    #[error("detector {path}: {reason}")]
    Base {
        /// The detector file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl DetectorFile {
    /// Writes the file atomically (temporary file, then rename).
    ///
    /// # Errors
    /// I/O errors.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.part");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Reads and validates a detector file.
    ///
    /// # Errors
    /// [`DetectorError::Invalid`] for unreadable JSON, another format, or an
    /// inconsistent head.
    pub fn read(path: &Path) -> Result<DetectorFile, DetectorError> {
        let invalid = |reason: String| DetectorError::Invalid {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| invalid(e.to_string()))?;
        let file: DetectorFile = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(format!("not a detector file: {e}")))?;
        if file.format != FORMAT {
            return Err(invalid(format!(
                "format {:?}, this build reads {FORMAT:?}",
                file.format
            )));
        }
        if !(0.0..=1.0).contains(&file.threshold) {
            return Err(invalid(format!(
                "threshold {} is outside [0, 1]",
                file.threshold
            )));
        }
        let spec = &file.features.spec;
        if spec.layers.is_empty() || spec.pooling.is_empty() || spec.window_tokens == 0 {
            return Err(invalid("features name no layer, pooling or window".into()));
        }
        if file.features.normalization != super::train::FEATURE_VERSION {
            return Err(invalid(format!(
                "features are {:?}; this build computes {:?}",
                file.features.normalization,
                super::train::FEATURE_VERSION
            )));
        }
        let mut layers = spec.layers.clone();
        layers.sort_unstable();
        layers.dedup();
        if layers.len() != spec.layers.len() {
            return Err(invalid(format!(
                "features name a layer twice: {:?}",
                spec.layers
            )));
        }
        if !canonical_pooling(&spec.pooling) {
            return Err(invalid(format!(
                "features.pooling {:?} must list each of last, mean, max at most once, in that order (the head's weights follow it)",
                spec.pooling
            )));
        }
        if file.features.window_overlap * 2 > spec.window_tokens {
            return Err(invalid(format!(
                "window_overlap {} is more than half of window_tokens {}",
                file.features.window_overlap, spec.window_tokens
            )));
        }
        if file.base.file.is_empty()
            || Path::new(&file.base.file).components().count() != 1
            || file.base.file.starts_with('.')
        {
            return Err(invalid(format!(
                "base.file {:?} must be a plain file name",
                file.base.file
            )));
        }
        let dim = file.head.dim();
        if dim == 0 || !dim.is_multiple_of(spec.layers.len() * spec.pooling.len()) {
            return Err(invalid(format!(
                "head has {dim} weights, not a multiple of {} layer-poolings",
                spec.layers.len() * spec.pooling.len()
            )));
        }
        file.head.validate(dim).map_err(invalid)?;
        if let Some(e) = &file.early_exit {
            let n_embd = dim / (spec.layers.len() * spec.pooling.len());
            let deepest = spec.layers.iter().max().copied().unwrap_or(0);
            if !canonical_pooling(&e.pooling) {
                return Err(invalid(format!(
                    "early_exit.pooling {:?} must list each of last, mean, max at most once, in that order",
                    e.pooling
                )));
            }
            if e.layers.is_empty()
                || e.pooling.is_empty()
                || e.layers
                    .iter()
                    .any(|l| !spec.layers.contains(l) || *l >= deepest)
            {
                return Err(invalid(format!(
                    "early_exit.layers {:?} must be some of features.layers {:?}, below the deepest",
                    e.layers, spec.layers
                )));
            }
            if !(0.0 <= e.benign_below
                && e.benign_below <= file.threshold
                && file.threshold <= e.malicious_above
                && e.malicious_above <= 1.0)
            {
                return Err(invalid(format!(
                    "early_exit bounds {} and {} must hold the threshold {} between them, within [0, 1]",
                    e.benign_below, e.malicious_above, file.threshold
                )));
            }
            e.head
                .validate(e.layers.len() * e.pooling.len() * n_embd)
                .map_err(|r| invalid(format!("early_exit: {r}")))?;
        }
        Ok(file)
    }

    /// Finds the base GGUF: next to the detector file, then in `models_dir`,
    /// and checks its sha256.
    ///
    /// # Errors
    /// [`DetectorError::Base`] when it is missing or its sha256 differs.
    pub fn find_base(
        &self,
        detector: &Path,
        models_dir: Option<&Path>,
    ) -> Result<PathBuf, DetectorError> {
        let err = |reason: String| DetectorError::Base {
            path: detector.display().to_string(),
            reason,
        };
        let mut tried = Vec::new();
        let mut dirs: Vec<PathBuf> = [detector.parent(), models_dir]
            .into_iter()
            .flatten()
            .map(|d| {
                if d.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    d.to_path_buf()
                }
            })
            .collect();
        dirs.dedup_by(|a, b| {
            a.canonicalize()
                .ok()
                .is_some_and(|a| Some(a) == b.canonicalize().ok())
        });
        for dir in dirs {
            let candidate = dir.join(&self.base.file);
            if candidate.is_file() {
                let sha = sha256_file(&candidate).map_err(|e| {
                    err(format!(
                        "cannot read base GGUF {}: {e}",
                        candidate.display()
                    ))
                })?;
                if sha != self.base.sha256 {
                    return Err(err(format!(
                        "base GGUF {} has sha256 {sha}, but the detector was trained on {} with sha256 {}",
                        candidate.display(),
                        self.base.file,
                        self.base.sha256
                    )));
                }
                return Ok(candidate);
            }
            tried.push(candidate.display().to_string());
        }
        Err(err(format!(
            "base GGUF {} (sha256 {}) not found; looked for {}",
            self.base.file,
            self.base.sha256,
            tried.join(", ")
        )))
    }

    /// The parts the engine needs; `detector_sha256` names it in answers.
    pub fn parts(&self, detector: &Path, detector_sha256: String) -> DetectorParts {
        let name = detector
            .file_name()
            .map_or_else(|| self.name.clone(), |n| n.to_string_lossy().into_owned());
        DetectorParts {
            features: self.features.spec.clone(),
            head: Box::new(self.head.clone()),
            threshold: self.threshold,
            model_ref: ModelRef {
                name,
                sha256: detector_sha256,
            },
            base_sha256: Some(self.base.sha256.clone()),
            early_exit: self.early_exit.as_ref().map(|e| ExitRule {
                layers: e.layers.clone(),
                pooling: e.pooling.clone(),
                head: Box::new(e.head.clone()),
                benign_below: e.benign_below,
                malicious_above: e.malicious_above,
            }),
        }
    }
}

/// Loads a detector and its base as a scorer.
///
/// # Errors
/// [`crate::engine::EngineError::Load`] with the detector's reason, or the
/// engine's own load errors (a template that differs from the one trained on
/// is refused).
pub fn load_scorer(
    detector: &Path,
    models_dir: Option<&Path>,
    config: crate::engine::llama::LlamaConfig,
) -> Result<crate::engine::llama::LlamaScorer, crate::engine::EngineError> {
    let load_err = |reason: String| crate::engine::EngineError::Load {
        path: detector.display().to_string(),
        reason,
    };
    let file = DetectorFile::read(detector).map_err(|e| load_err(e.to_string()))?;
    let base = file
        .find_base(detector, models_dir)
        .map_err(|e| load_err(e.to_string()))?;
    let sha = sha256_file(detector).map_err(|e| load_err(e.to_string()))?;
    let config = crate::engine::llama::LlamaConfig {
        window_overlap: file.features.window_overlap,
        ..config
    };
    let scorer =
        crate::engine::llama::LlamaScorer::load_detector(&base, config, file.parts(detector, sha))?;
    if scorer.profile().name != file.features.profile
        || scorer.template_sha256() != file.features.template_sha256
    {
        return Err(load_err(format!(
            "the base model's template (profile {}, sha256 {}) differs from the one the detector was trained with (profile {}, sha256 {})",
            scorer.profile().name,
            scorer.template_sha256(),
            file.features.profile,
            file.features.template_sha256
        )));
    }
    let n_embd = usize::try_from(scorer.model_handle().n_embd()).unwrap_or(0);
    let expected = file.features.spec.layers.len() * file.features.spec.pooling.len() * n_embd;
    if file.head.dim() != expected {
        return Err(load_err(format!(
            "the head has {} weights; {} layers x {} poolings x n_embd {n_embd} of the base model make {expected}",
            file.head.dim(),
            file.features.spec.layers.len(),
            file.features.spec.pooling.len()
        )));
    }
    Ok(scorer)
}

/// Whether `pooling` lists each of last, mean, max at most once, in that
/// order ([`Pooling`]'s `Ord`): the order `train` writes, which the head's
/// weights follow. A hand-edited order would read the weights against the
/// wrong features.
fn canonical_pooling(pooling: &[Pooling]) -> bool {
    pooling.windows(2).all(|w| w[0] < w[1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::llama::Pooling;

    fn sample(dim: usize) -> DetectorFile {
        DetectorFile {
            format: FORMAT.into(),
            name: "t".into(),
            base: Base {
                file: "base.gguf".into(),
                sha256: "ab".repeat(32),
            },
            features: FeatureInfo {
                spec: FeatureSpec {
                    layers: vec![3],
                    pooling: vec![Pooling::Last, Pooling::Mean],
                    window_tokens: 128,
                },
                window_overlap: 16,
                profile: "p".into(),
                template_sha256: "cd".repeat(32),
                normalization: crate::detector::train::FEATURE_VERSION.into(),
                training_windows: "first".into(),
            },
            head: LogisticHead {
                mean: vec![0.5; dim],
                scale: vec![2.0; dim],
                weights: (0..dim).map(|i| i as f32 * 0.25).collect(),
                bias: -0.125,
                hidden: None,
            },
            threshold: 0.42,
            training: TrainingInfo {
                data: vec![DataRef {
                    file: "train.jsonl".into(),
                    sha256: "ef".repeat(32),
                    rows: 10,
                }],
                dev: DataRef {
                    file: "dev.jsonl".into(),
                    sha256: "01".repeat(32),
                    rows: 5,
                },
                rows_used: 10,
                dev_rows_used: 5,
                per_group: 3,
                seed: 7,
                l2: 0.01,
                max_fpr: 0.03,
                extract_seconds: 1.5,
                total_seconds: 2.0,
                command: "promptgate train".into(),
            },
            dev_metrics: serde_json::json!({"f1": 0.9}),
            candidates: vec![],
            early_exit: None,
        }
    }

    #[test]
    fn round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = detector_path(&dir.path().join("m"));
        assert!(p.to_string_lossy().ends_with("m.detector.json"));
        assert!(is_detector_path(&p));
        let f = sample(4);
        f.write(&p).unwrap();
        assert_eq!(DetectorFile::read(&p).unwrap(), f);
    }

    #[test]
    fn malformed_files_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.detector.json");
        let reason = |f: &DetectorFile| {
            f.write(&p).unwrap();
            DetectorFile::read(&p).unwrap_err().to_string()
        };
        let mut f = sample(4);
        f.format = "other/9".into();
        assert!(reason(&f).contains("format"));
        let mut f = sample(3); // not a multiple of 2 layer-poolings
        f.head.mean.truncate(3);
        assert!(reason(&f).contains("multiple"));
        let mut f = sample(4);
        f.head.scale[1] = 0.0;
        assert!(reason(&f).contains("scale"));
        let mut f = sample(4);
        f.threshold = 1.5;
        assert!(reason(&f).contains("threshold"));
        // Regression (fresh-session trial): a hand-reordered pooling list
        // passed validation and read the weights against the wrong features.
        let mut f = sample(4);
        f.features.spec.pooling = vec![Pooling::Mean, Pooling::Last];
        assert!(reason(&f).contains("in that order"), "{}", reason(&f));
        f.features.spec.pooling = vec![Pooling::Last, Pooling::Last];
        assert!(reason(&f).contains("at most once"));
        std::fs::write(&p, b"{\"format\": ").unwrap();
        assert!(DetectorFile::read(&p)
            .unwrap_err()
            .to_string()
            .contains("not a detector file"));
    }

    #[test]
    fn base_is_found_next_to_the_detector_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let det = dir.path().join("m.detector.json");
        let base = dir.path().join("base.gguf");
        std::fs::write(&base, b"weights").unwrap();
        let mut f = sample(4);
        f.base.sha256 = crate::engine::llama::sha256_file(&base).unwrap();
        assert_eq!(f.find_base(&det, None).unwrap(), base);
        std::fs::write(&base, b"other weights").unwrap();
        let e = f.find_base(&det, None).unwrap_err().to_string();
        assert!(e.contains("has sha256") && e.contains("trained on"), "{e}");
        std::fs::remove_file(&base).unwrap();
        assert!(f
            .find_base(&det, None)
            .unwrap_err()
            .to_string()
            .contains("not found"));
    }
}
