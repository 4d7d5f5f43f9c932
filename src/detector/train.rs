//! `promptgate train`: fit a head on a base GGUF's hidden states.
//!
//! 1. Rows are read from `--data` files and drawn per (source, label) group,
//!    at most `--per-group` each (seeded), so no single source dominates; row
//!    weights then give every group of a class the same total weight and the
//!    two classes equal weight.
//! 2. Features of every candidate layer (last token at the verdict position,
//!    and the mean over the prompt's tokens) are extracted in one forward pass
//!    per row through exactly the daemon's path (normalisation, template,
//!    prefix KV cache, windows) and cached on disk (see [`FeatureCache`]).
//!    Training uses the first window of a long prompt; serving scores every
//!    window and takes the highest.
//! 3. For each candidate (layer, pooling, L2 penalty) a logistic head is
//!    fitted and scored on dev; the best dev F1 at a threshold whose dev
//!    false-positive rate is at most `--max-fpr` wins (ties: higher AUROC).
//! 4. With `--early-exit LAYERS`, a second head on those layers (some of the
//!    chosen head's, below its deepest) is fitted, and two bounds on its
//!    P(malicious) are chosen on dev (see [`exit_bounds`]): a served window on
//!    which it is that confident is decided after its layers, and the rest of
//!    the forward pass is skipped.
//! 5. The detector file is written with the chosen features, head, threshold,
//!    provenance and every candidate's dev figures.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::eval::{read_rows, Row};
use super::file::{Base, DataRef, DetectorFile, EarlyExit, FeatureInfo, TrainingInfo, FORMAT};
use super::head::{fit_logistic, fit_mlp, FitParams, LogisticHead, MlpParams};
use super::metrics::{auroc, best_f1_threshold, recall_at_fpr, Confusion, Scored};
use crate::engine::llama::{sha256_file, FeatureSpec, LlamaConfig, LlamaScorer, Pooling};

/// Version of the text normalisation and feature layout, part of the cache key.
pub const FEATURE_VERSION: &str = "promptgate-features/1";

/// A group key: (source, label).
type Group = (String, String);

/// Rows by (source, label), in key order.
fn by_group(rows: &[Row]) -> BTreeMap<Group, Vec<&Row>> {
    let mut groups: BTreeMap<Group, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        groups
            .entry((r.source.clone().unwrap_or_default(), r.label.clone()))
            .or_default()
            .push(r);
    }
    groups
}

/// Draws at most `per_group` rows of each (source, label) group with a
/// seeded shuffle (0 keeps all). The result is in a stable order.
pub fn sample_per_group(rows: &[Row], per_group: usize, seed: u64) -> Vec<Row> {
    let groups = by_group(rows);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for (_, mut g) in groups {
        g.shuffle(&mut rng);
        if per_group > 0 {
            g.truncate(per_group);
        }
        out.extend(g.into_iter().cloned());
    }
    out
}

/// A stratified sample of about `limit` rows (0 keeps all): each
/// (source, label) group keeps its share, at least one row.
pub fn sample_stratified(rows: &[Row], limit: usize, seed: u64) -> Vec<Row> {
    if limit == 0 || limit >= rows.len() {
        return rows.to_vec();
    }
    let groups = by_group(rows);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x05ee_dde7);
    let mut out = Vec::new();
    for (_, mut g) in groups {
        g.shuffle(&mut rng);
        let keep = ((g.len() * limit) as f64 / rows.len() as f64)
            .ceil()
            .max(1.0) as usize;
        g.truncate(keep);
        out.extend(g.into_iter().cloned());
    }
    out
}

/// Row weights: each (source, label) group of a class gets the same total,
/// and the two classes get equal totals. Weights sum to the row count.
pub fn balance_weights(rows: &[Row]) -> Vec<f64> {
    let mut counts: HashMap<Group, usize> = HashMap::new();
    for r in rows {
        *counts
            .entry((r.source.clone().unwrap_or_default(), r.label.clone()))
            .or_default() += 1;
    }
    let groups_per_label = |label: &str| counts.keys().filter(|(_, l)| l == label).count().max(1);
    let raw: Vec<f64> = rows
        .iter()
        .map(|r| {
            let n = counts[&(r.source.clone().unwrap_or_default(), r.label.clone())];
            0.5 / (groups_per_label(&r.label) as f64 * n as f64)
        })
        .collect();
    let total: f64 = raw.iter().sum();
    raw.iter().map(|w| w * rows.len() as f64 / total).collect()
}

/// Features extracted before, on disk: one append-only file per (model
/// sha256, feature settings), records of `sha256(normalised text)` (32 bytes),
/// the token count (u32 LE) and `dim` f32 LE values (the first window).
pub struct FeatureCache {
    path: PathBuf,
    dim: usize,
    map: HashMap<[u8; 32], (u32, Vec<f32>)>,
    writer: Option<BufWriter<std::fs::File>>,
}

impl FeatureCache {
    /// Opens (or creates) the cache for `key` under `dir`, reading what it holds.
    /// A torn last record (an interrupted run) is ignored.
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(dir: &Path, key: &str, dim: usize) -> anyhow::Result<FeatureCache> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("{key}.bin"));
        let mut map = HashMap::new();
        let rec = 32 + 4 + dim * 4;
        if let Ok(f) = std::fs::File::open(&path) {
            let mut r = BufReader::new(f);
            let mut buf = vec![0u8; rec];
            while r.read_exact(&mut buf).is_ok() {
                let mut h = [0u8; 32];
                h.copy_from_slice(&buf[..32]);
                let tokens = u32::from_le_bytes(buf[32..36].try_into().expect("4 bytes"));
                let v = buf[36..]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect();
                map.insert(h, (tokens, v));
            }
        }
        // Drop a torn tail so appends stay aligned.
        if let Ok(meta) = std::fs::metadata(&path) {
            let whole = meta.len() - meta.len() % rec as u64;
            if whole != meta.len() {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(whole)?;
            }
        }
        Ok(FeatureCache {
            path,
            dim,
            map,
            writer: None,
        })
    }

    /// Cached features of a text hash.
    pub fn get(&self, h: &[u8; 32]) -> Option<&(u32, Vec<f32>)> {
        self.map.get(h)
    }

    /// Records features of a text hash.
    ///
    /// # Errors
    /// I/O errors, or a vector of the wrong length.
    pub fn put(&mut self, h: [u8; 32], tokens: u32, v: Vec<f32>) -> anyhow::Result<()> {
        anyhow::ensure!(
            v.len() == self.dim,
            "feature vector has {} values, expected {}",
            v.len(),
            self.dim
        );
        if self.writer.is_none() {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.writer = Some(BufWriter::new(f));
        }
        let w = self.writer.as_mut().expect("opened above");
        w.write_all(&h)?;
        w.write_all(&tokens.to_le_bytes())?;
        for x in &v {
            w.write_all(&x.to_le_bytes())?;
        }
        self.map.insert(h, (tokens, v));
        Ok(())
    }

    /// Flushes appended records.
    ///
    /// # Errors
    /// I/O errors.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        if let Some(w) = self.writer.as_mut() {
            w.flush()?;
        }
        Ok(())
    }

    /// The cache file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// sha256 of a text as scored (after normalisation).
pub fn text_hash(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// Extracts (or reads from the cache) the first-window features of `rows`.
/// Rows that cannot be scored get `None`.
///
/// # Errors
/// Cache I/O errors.
pub fn extract(
    scorer: &mut LlamaScorer,
    cache: &mut FeatureCache,
    rows: &[Row],
    label: &str,
) -> anyhow::Result<Vec<Option<Vec<f32>>>> {
    // Normalise and hash each row once. A row the daemon would refuse (NUL,
    // or nothing left after normalisation: `invalid_request`, `empty_text`)
    // is left out, as `eval` leaves it unscored.
    let texts: Vec<Option<(String, [u8; 32])>> = rows
        .iter()
        .map(|r| match crate::normalize::prepare(&r.text) {
            Ok(n) => {
                let h = text_hash(&n.text);
                Some((n.text, h))
            }
            Err(e) => {
                tracing::warn!(error = %e.message, "row refused as the daemon would; left out");
                None
            }
        })
        .collect();
    let todo = texts
        .iter()
        .flatten()
        .filter(|(_, h)| cache.get(h).is_none())
        .count();
    let bar = progress_bar(todo as u64, label);
    let mut out = Vec::with_capacity(rows.len());
    let mut since_flush = 0;
    for entry in texts {
        let Some((text, h)) = entry else {
            out.push(None);
            continue;
        };
        if let Some((_, v)) = cache.get(&h) {
            out.push(Some(v.clone()));
            continue;
        }
        match scorer.features_head(&text, 1) {
            Ok((mut windows, tokens)) => {
                let v = windows.swap_remove(0);
                cache.put(h, u32::try_from(tokens).unwrap_or(u32::MAX), v.clone())?;
                out.push(Some(v));
            }
            Err(e) => {
                tracing::warn!(error = %e, "row not scored; left out of training");
                out.push(None);
            }
        }
        bar.inc(1);
        if bar.is_hidden() && bar.position().is_multiple_of(250) {
            let rate = bar.position() as f64 / bar.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(
                done = bar.position(),
                of = todo,
                rows_per_s = format!("{rate:.2}"),
                eta_s = format!(
                    "{:.0}",
                    (todo as f64 - bar.position() as f64) / rate.max(1e-9)
                ),
                "{label}: extracting"
            );
        }
        since_flush += 1;
        if since_flush >= 50 {
            cache.flush()?;
            since_flush = 0;
        }
    }
    cache.flush()?;
    bar.finish_and_clear();
    Ok(out)
}

/// A visible progress bar of `len` with an indicatif `template`, in the
/// project's one bar style.
pub fn styled_bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// A progress bar with ETA on a terminal; hidden otherwise (logs say the rest).
pub fn progress_bar(len: u64, label: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() || len == 0 {
        tracing::info!(rows = len, "{label}: rows to score");
        // Hidden, but it still counts: callers log progress from it.
        let bar = indicatif::ProgressBar::hidden();
        bar.set_length(len);
        return bar;
    }
    let bar = styled_bar(
        len,
        "{msg:>12} [{bar:40}] {pos}/{len} rows, {per_sec}, ETA {eta}",
    );
    bar.set_message(label.to_string());
    bar
}

/// Dev rows of each label below which a threshold is called thin: with 100
/// benign rows one false positive moves the FPR by a whole point.
pub const THIN_DEV_ROWS: usize = 100;

/// The 95 % Wilson score interval of a proportion `k` of `n`, in [0, 1]
/// (Wilson 1927; unlike `p ± 1.96·SE` it is not empty at `k = 0` or `k = n`).
fn wilson(k: u64, n: u64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (z, n) = (1.96_f64, n as f64);
    let p = k as f64 / n;
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / (1.0 + z * z / n);
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Why the threshold chosen on `scored` should not be trusted on new data,
/// or `None`: it was chosen on fewer than [`THIN_DEV_ROWS`] scored dev rows
/// of a label. The message gives the dev FPR and recall at the threshold as
/// counts, percentages and 95 % Wilson intervals.
pub fn thin_threshold(scored: &[Scored], threshold: f64) -> Option<String> {
    let c = Confusion::at(scored, threshold);
    let (n_mal, n_ben) = (c.tp + c.r#fn, c.fp + c.tn);
    if n_mal as usize >= THIN_DEV_ROWS && n_ben as usize >= THIN_DEV_ROWS {
        return None;
    }
    let rate = |k: u64, n: u64| {
        let (lo, hi) = wilson(k, n);
        format!(
            "{k} of {n} ({:.1} %, 95 % interval {:.1}-{:.1} %)",
            100.0 * k as f64 / n.max(1) as f64,
            100.0 * lo,
            100.0 * hi
        )
    };
    Some(format!(
        "threshold {threshold:.4} is thin: it was chosen on {n_mal} malicious and {n_ben} benign dev rows (fewer than {THIN_DEV_ROWS} of a label); at it, dev false positives {} and recall {}; give --dev (or --dev-limit) more rows before serving it",
        rate(c.fp, n_ben),
        rate(c.tp, n_mal),
    ))
}

/// Whether a head reading `layers` can host an early exit on `exit`: it
/// reads every exit layer and goes deeper than all of them.
fn hosts_exit(exit: &[u32], layers: &[u32]) -> bool {
    let deepest = layers.iter().max().copied().unwrap_or(0);
    !exit.is_empty() && exit.iter().all(|l| layers.contains(l) && *l < deepest)
}

/// The candidate to ship: among those within `f1_tolerance` of the best dev
/// F1, the one whose deepest layer is shallowest (the forward pass stops
/// there, so it is the cheapest to serve); ties go to the higher dev F1, then
/// the higher dev AUROC, then the earlier candidate. Tolerance 0 is plain
/// "best dev F1". Candidates without a threshold on dev are never chosen.
pub fn choose<H>(fitted: Vec<(Candidate, H)>, f1_tolerance: f64) -> Option<(Candidate, H)> {
    let best_f1 = fitted
        .iter()
        .filter_map(|(c, _)| c.f1)
        .fold(f64::NEG_INFINITY, f64::max);
    let depth = |c: &Candidate| c.layers.iter().copied().max().unwrap_or(0);
    let mut pick: Option<(Candidate, H)> = None;
    for (c, h) in fitted {
        let Some(f) = c.f1 else { continue };
        if f < best_f1 - f1_tolerance.max(0.0) - 1e-9 {
            continue;
        }
        let better = match &pick {
            None => true,
            Some((b, _)) => {
                let (bf, ba) = (b.f1.unwrap_or(-1.0), b.auroc.unwrap_or(0.0));
                let a = c.auroc.unwrap_or(0.0);
                depth(&c) < depth(b)
                    || (depth(&c) == depth(b)
                        && (f > bf + 1e-9 || ((f - bf).abs() <= 1e-9 && a > ba)))
            }
        };
        if better {
            pick = Some((c, h));
        }
    }
    pick
}

/// The early-exit bounds `(benign_below, malicious_above)` on the exit head's
/// P(malicious), from dev rows' full-head scores `full` and exit-head scores
/// `exit` (same rows, same order).
///
/// A row the full head calls malicious (`full >= threshold`) but the exit head
/// scores below `benign_below` would have its verdict changed by the exit;
/// `benign_below` is the highest bound that changes at most
/// `floor(tol_benign * n)` of those `n` rows, and never above `threshold`.
/// `malicious_above` is the same for the rows the full head calls benign,
/// with `tol_malicious`, and never below `threshold`. The bounds are chosen against the full
/// head's verdicts, not the labels, so the exit approximates the full head
/// rather than refitting its threshold. With no row of a side, that side
/// never exits (bound `0` or `1`).
pub fn exit_bounds(
    full: &[f64],
    exit: &[f64],
    threshold: f64,
    tol_benign: f64,
    tol_malicious: f64,
) -> (f64, f64) {
    let mut mal: Vec<f64> = Vec::new();
    let mut ben: Vec<f64> = Vec::new();
    for (&f, &e) in full.iter().zip(exit) {
        if e.is_nan() {
            continue;
        }
        if f >= threshold {
            mal.push(e);
        } else {
            ben.push(e);
        }
    }
    let allowed = |tol: f64, n: usize| (tol.clamp(0.0, 1.0) * n as f64).floor() as usize;
    mal.sort_by(f64::total_cmp);
    ben.sort_by(|a, b| b.total_cmp(a));
    // Rows strictly below mal[k] number at most k.
    let lo = mal
        .get(allowed(tol_benign, mal.len()))
        .map_or(0.0, |&v| v.min(threshold));
    // Rows strictly above ben[k] number at most k.
    let hi = ben
        .get(allowed(tol_malicious, ben.len()))
        .map_or(1.0, |&v| v.max(threshold));
    (lo, hi)
}

/// The score a served window gets when an exit head with bounds `lo`, `hi`
/// precedes the full head: the exit head's when it is confident, else the
/// full head's.
pub fn cascade_score(full: f64, exit: f64, lo: f64, hi: f64) -> f64 {
    if exit < lo || exit > hi {
        exit
    } else {
        full
    }
}

/// One candidate's dev figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Layers read.
    pub layers: Vec<u32>,
    /// Poolings of each layer.
    pub pooling: Vec<Pooling>,
    /// L2 penalty.
    pub l2: f64,
    /// Hidden units of the head (0, left out of the file: logistic regression).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hidden: usize,
    /// Dev AUROC.
    pub auroc: Option<f64>,
    /// Threshold chosen on dev (best F1 with FPR <= max_fpr).
    pub threshold: Option<f64>,
    /// Dev F1 at that threshold.
    pub f1: Option<f64>,
    /// Dev false-positive rate at that threshold.
    pub fpr: Option<f64>,
    /// Dev recall at 1 % FPR.
    pub recall_at_1pct_fpr: Option<f64>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The columns of `layers` x `pooling` from one cached row, which holds, per
/// extracted layer (`all.layers`, sorted), each of `all.pooling` in order.
fn columns(
    x: &[f32],
    n_embd: usize,
    all: &FeatureSpec,
    layers: &[u32],
    pooling: &[Pooling],
) -> Vec<f32> {
    let mut out = Vec::with_capacity(layers.len() * pooling.len() * n_embd);
    let per_layer = all.pooling.len();
    for l in layers {
        let li = all
            .layers
            .iter()
            .position(|a| a == l)
            .expect("candidate layer");
        for p in pooling {
            let pi = all
                .pooling
                .iter()
                .position(|a| a == p)
                .expect("extracted pooling");
            let start = (li * per_layer + pi) * n_embd;
            out.extend_from_slice(&x[start..start + n_embd]);
        }
    }
    out
}

/// Every pooling, in canonical order ([`Pooling`]'s `Ord`), as a feature
/// cache with max holds them.
const ALL_POOLINGS: [Pooling; 3] = [Pooling::Last, Pooling::Mean, Pooling::Max];

/// The pooling sets fitted as candidates from the extracted `all` (in the
/// canonical order last, mean, max): each alone, `last` with each other, and
/// all together, without repeats.
fn pooling_sets(all: &[Pooling]) -> Vec<Vec<Pooling>> {
    let mut sets: Vec<Vec<Pooling>> = all.iter().map(|&p| vec![p]).collect();
    if all.contains(&Pooling::Last) {
        for &p in all.iter().filter(|&&p| p != Pooling::Last) {
            sets.push(vec![Pooling::Last, p]);
        }
    }
    sets.push(all.to_vec());
    let mut out: Vec<Vec<Pooling>> = Vec::new();
    for s in sets {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// The head's P(malicious) for each feature row, with the rows' labels.
fn score_rows(head: &LogisticHead, x: &[Vec<f32>], rows: &[Row]) -> Vec<Scored> {
    x.iter()
        .zip(rows)
        .map(|(x, r)| Scored {
            malicious: r.label == "malicious",
            score: Some(crate::engine::llama::FeatureHead::predict(head, x)),
        })
        .collect()
}

/// Precision, recall, F1 and FPR at `threshold`, AUROC and recall at 1 % FPR
/// of scored dev rows, as a JSON object (the detector file's `dev_metrics`).
fn figures(scored: &[Scored], threshold: f64) -> serde_json::Value {
    let c = Confusion::at(scored, threshold);
    serde_json::json!({
        "precision": c.precision(),
        "recall": c.recall(),
        "f1": c.f1(),
        "fpr": c.fpr(),
        "auroc": auroc(scored),
        "recall_at_1pct_fpr": recall_at_fpr(scored, 0.01),
    })
}

/// The training and dev features an early-exit head is fitted and scored on.
struct ExitData<'a> {
    train_x: &'a [Vec<f32>],
    y: &'a [bool],
    weights: &'a [f64],
    dev_x: &'a [Vec<f32>],
    dev: &'a [Row],
    n_embd: usize,
    all: &'a FeatureSpec,
}

/// Fits the early-exit head on `want` (the chosen head's pooling, each
/// `--l2`, best dev AUROC; heads already fitted as candidates are reused),
/// chooses its bounds on dev with [`exit_bounds`] and measures the cascade on
/// the dev rows. `scored`: the chosen head's dev scores.
///
/// # Errors
/// `want` names a layer the chosen head does not read, or its deepest.
#[allow(clippy::too_many_arguments)]
fn fit_early_exit(
    want: &[u32],
    chosen: &Candidate,
    threshold: f64,
    scored: &[Scored],
    fitted: Vec<(Candidate, LogisticHead)>,
    d: &ExitData<'_>,
    args: &crate::config::TrainArgs,
) -> anyhow::Result<Option<EarlyExit>> {
    let mut layers = want.to_vec();
    layers.sort_unstable();
    layers.dedup();
    anyhow::ensure!(
        hosts_exit(&layers, &chosen.layers),
        "--early-exit {layers:?}: the chosen head reads layers {:?}; the early-exit layers must be some of them, below the deepest",
        chosen.layers
    );
    for (flag, v) in [
        ("--exit-tolerance", args.exit_tolerance),
        ("--exit-tolerance-malicious", args.exit_tolerance_malicious),
    ] {
        anyhow::ensure!(
            (0.0..=1.0).contains(&v),
            "{flag} must be in [0, 1], got {v}"
        );
    }
    let dx: Vec<Vec<f32>> = d
        .dev_x
        .iter()
        .map(|x| columns(x, d.n_embd, d.all, &layers, &chosen.pooling))
        .collect();
    let mut best: Option<(f64, f64, LogisticHead)> = None;
    for &l2 in &args.l2 {
        let head = match fitted
            .iter()
            .find(|(c, _)| c.pooling == chosen.pooling && c.l2 == l2)
        {
            Some((_, h)) => h.clone(),
            None => {
                let tx: Vec<Vec<f32>> = d
                    .train_x
                    .iter()
                    .map(|x| columns(x, d.n_embd, d.all, &layers, &chosen.pooling))
                    .collect();
                fit_logistic(
                    &tx,
                    d.y,
                    d.weights,
                    FitParams {
                        l2,
                        ..FitParams::default()
                    },
                )
            }
        };
        let a = auroc(&score_rows(&head, &dx, d.dev)).unwrap_or(0.0);
        if best.as_ref().is_none_or(|(ba, _, _)| a > *ba) {
            best = Some((a, l2, head));
        }
    }
    let Some((exit_auroc, l2, head)) = best else {
        return Ok(None);
    };
    let full: Vec<f64> = scored.iter().map(|s| s.score.unwrap_or(1.0)).collect();
    let exit: Vec<f64> = score_rows(&head, &dx, d.dev)
        .iter()
        .map(|s| s.score.unwrap_or(f64::NAN))
        .collect();
    let (lo, hi) = exit_bounds(
        &full,
        &exit,
        threshold,
        args.exit_tolerance,
        args.exit_tolerance_malicious,
    );
    let cascade: Vec<Scored> = scored
        .iter()
        .zip(&exit)
        .map(|(s, &e)| Scored {
            malicious: s.malicious,
            score: Some(cascade_score(s.score.unwrap_or(1.0), e, lo, hi)),
        })
        .collect();
    let n = full.len().max(1) as f64;
    let exits_benign = exit.iter().filter(|&&e| e < lo).count();
    let exits_malicious = exit.iter().filter(|&&e| e > hi).count();
    let changed = full
        .iter()
        .zip(&cascade)
        .filter(|(&f, c)| (f >= threshold) != (c.score.unwrap_or(1.0) >= threshold))
        .count();
    let c = Confusion::at(&cascade, threshold);
    let dev = serde_json::json!({
        "rows": full.len(),
        "exit_auroc": exit_auroc,
        "exit_rate": (exits_benign + exits_malicious) as f64 / n,
        "exits_benign": exits_benign,
        "exits_malicious": exits_malicious,
        "verdicts_changed": changed,
        "cascade": figures(&cascade, threshold),
        "note": "first-window features of the dev rows used for selection",
    });
    eprintln!(
        "early exit on layers {layers:?}: l2 {l2}, dev AUROC {exit_auroc:.4}, benign below {lo:.4}, malicious above {hi:.4}: {:.1} % of dev rows exit ({exits_benign} benign, {exits_malicious} malicious), {changed} verdicts changed, cascade F1 {:.4} FPR {:.4}",
        100.0 * (exits_benign + exits_malicious) as f64 / n,
        c.f1().unwrap_or(f64::NAN),
        c.fpr().unwrap_or(f64::NAN),
    );
    Ok(Some(EarlyExit {
        layers,
        pooling: chosen.pooling.clone(),
        head,
        l2,
        benign_below: lo,
        malicious_above: hi,
        tolerance: args.exit_tolerance,
        tolerance_malicious: args.exit_tolerance_malicious,
        dev,
    }))
}

/// Runs `promptgate train`.
///
/// # Errors
/// Unreadable data or model, no usable rows, or an unwritable output.
pub fn run(args: &crate::config::TrainArgs) -> anyhow::Result<PathBuf> {
    let started = std::time::Instant::now();
    anyhow::ensure!(
        args.l2.iter().all(|l| l.is_finite() && *l >= 0.0),
        "--l2 values must be finite and >= 0, got {:?}",
        args.l2
    );
    anyhow::ensure!(
        args.hidden_l2.iter().all(|l| l.is_finite() && *l >= 0.0),
        "--hidden-l2 values must be finite and >= 0, got {:?}",
        args.hidden_l2
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.max_fpr),
        "--max-fpr must be in [0, 1], got {}",
        args.max_fpr
    );
    anyhow::ensure!(args.window_tokens > 0, "--window-tokens must be positive");
    let mut train_rows = Vec::new();
    let mut data_refs = Vec::new();
    for p in &args.data {
        let rows = read_rows(p)?;
        data_refs.push(DataRef {
            file: p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256: sha256_file(p)?,
            rows: rows.len(),
        });
        train_rows.extend(rows);
    }
    let dev_all = read_rows(&args.dev)?;
    let dev_ref = DataRef {
        file: args
            .dev
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        sha256: sha256_file(&args.dev)?,
        rows: dev_all.len(),
    };
    let train = sample_per_group(&train_rows, args.per_group, args.seed);
    let dev = sample_stratified(&dev_all, args.dev_limit, args.seed);
    for (what, rows) in [
        ("training rows (--data)", &train),
        ("dev rows (--dev)", &dev),
    ] {
        let malicious = rows.iter().filter(|r| r.label == "malicious").count();
        anyhow::ensure!(
            malicious > 0 && malicious < rows.len(),
            "the {what} hold {malicious} malicious and {} benign rows: both labels are needed",
            rows.len() - malicious
        );
    }

    let config = LlamaConfig {
        threads: args.threads.unwrap_or(LlamaConfig::default().threads),
        ..LlamaConfig::default()
    };
    // Default candidates: layers spread over the model's depth.
    let mut probe_layers = match &args.layers {
        Some(l) => l.clone(),
        None => vec![0],
    };
    probe_layers.sort_unstable();
    probe_layers.dedup();
    // Candidates' poolings in canonical order (last, mean, max), each once.
    // The cache holds last+mean (the layout from before max pooling, so
    // those caches stay valid) or, once max is asked for, all three; either
    // serves any subset of its poolings.
    let mut poolings = args.poolings.clone();
    poolings.sort_unstable();
    poolings.dedup();
    anyhow::ensure!(!poolings.is_empty(), "--poolings names no pooling");
    let extracted = if poolings.contains(&Pooling::Max) {
        ALL_POOLINGS.to_vec()
    } else {
        vec![Pooling::Last, Pooling::Mean]
    };
    let mut spec = FeatureSpec {
        layers: probe_layers,
        pooling: extracted,
        window_tokens: args.window_tokens,
    };
    let mut scorer = LlamaScorer::load_features(&args.base, config.clone(), spec.clone())?;
    let n_layer = scorer.model_handle().n_layer();
    if args.layers.is_none() {
        // Every fifth of the depth, from a sixth up to the second-to-last block.
        let cands: Vec<u32> = [1, 2, 3, 4, 5]
            .iter()
            .map(|k| (n_layer * k / 6).min(n_layer.saturating_sub(2)))
            .collect();
        let mut cands = cands;
        cands.dedup();
        spec.layers = cands;
        scorer = LlamaScorer::load_features(&args.base, config.clone(), spec.clone())?;
    }
    if let Some(exit) = &args.early_exit {
        anyhow::ensure!(
            exit.iter().all(|l| spec.layers.contains(l)),
            "--early-exit {exit:?} names a layer that is not among the extracted --layers {:?}",
            spec.layers
        );
        // Checked now, not after every head is fitted: the exit head is a
        // logistic candidate (one layer, or the shallowest few) and must
        // stop below the deepest layer of the head it serves.
        let mut want = exit.clone();
        want.sort_unstable();
        want.dedup();
        let deepest = spec.layers.iter().max().copied().unwrap_or(0);
        anyhow::ensure!(
            (want.len() == 1 || spec.layers.starts_with(&want))
                && want.iter().all(|&l| l < deepest),
            "--early-exit {want:?}: the exit head reads one of --layers {:?} or the shallowest few of them, below the deepest ({deepest})",
            spec.layers
        );
    }
    let n_embd = usize::try_from(scorer.model_handle().n_embd()).unwrap_or(0);
    let dim = spec.layers.len() * spec.pooling.len() * n_embd;
    let mut key_src = serde_json::json!({
        "version": FEATURE_VERSION,
        "model_sha256": scorer.model_sha256(),
        "template_sha256": scorer.template_sha256(),
        "layers": spec.layers,
        "window_tokens": spec.window_tokens,
        "window_overlap": config.window_overlap,
    });
    if spec.pooling.contains(&Pooling::Max) {
        key_src["pooling"] = serde_json::to_value(&spec.pooling)?;
    }
    let key = format!(
        "{}-{}",
        &scorer.model_sha256()[..16],
        &hex::encode(Sha256::digest(key_src.to_string().as_bytes()))[..16]
    );
    let mut cache = FeatureCache::open(&args.cache_dir, &key, dim)?;
    tracing::info!(
        train_rows = train.len(),
        dev_rows = dev.len(),
        layers = ?spec.layers,
        n_layer,
        n_embd,
        cache = %cache.path().display(),
        "extracting features"
    );
    let train_x = extract(&mut scorer, &mut cache, &train, "train (not cached)")?;
    let dev_x = extract(&mut scorer, &mut cache, &dev, "dev (not cached)")?;
    let extract_s = started.elapsed().as_secs_f64();
    if args.extract_only {
        eprintln!(
            "features cached in {} ({extract_s:.0} s)",
            cache.path().display()
        );
        return Ok(cache.path().to_path_buf());
    }

    let keep = |rows: &[Row], x: Vec<Option<Vec<f32>>>| -> (Vec<Row>, Vec<Vec<f32>>) {
        rows.iter()
            .zip(x)
            .filter_map(|(r, v)| v.map(|v| (r.clone(), v)))
            .unzip()
    };
    let (train, train_x) = keep(&train, train_x);
    let (dev, dev_x) = keep(&dev, dev_x);
    let weights = balance_weights(&train);
    let y: Vec<bool> = train.iter().map(|r| r.label == "malicious").collect();

    let pools = pooling_sets(&poolings);
    let mut candidates = Vec::new();
    let mut fitted: Vec<(Candidate, LogisticHead)> = Vec::new();
    // Each candidate layer alone, then the shallowest two, three, ... all of
    // them concatenated (a forward pass stops after its deepest layer, so a
    // set's cost is set by its deepest layer).
    let mut layer_sets: Vec<Vec<u32>> = spec.layers.iter().map(|&l| vec![l]).collect();
    for n in 2..=spec.layers.len() {
        layer_sets.push(spec.layers[..n].to_vec());
    }
    // The hidden-layer heads read every candidate layer with all of --poolings.
    let mut plan: Vec<(Vec<u32>, Vec<Pooling>, usize)> = Vec::new();
    for layers in &layer_sets {
        for pooling in &pools {
            plan.push((layers.clone(), pooling.clone(), 0));
        }
    }
    if args.hidden > 0 {
        plan.push((spec.layers.clone(), poolings.clone(), args.hidden));
    }
    for (layers, pooling, hidden) in &plan {
        let hidden = *hidden;
        let tx: Vec<Vec<f32>> = train_x
            .iter()
            .map(|x| columns(x, n_embd, &spec, layers, pooling))
            .collect();
        let dx: Vec<Vec<f32>> = dev_x
            .iter()
            .map(|x| columns(x, n_embd, &spec, layers, pooling))
            .collect();
        let penalties = if hidden > 0 {
            &args.hidden_l2
        } else {
            &args.l2
        };
        for &l2 in penalties {
            let head = if hidden > 0 {
                fit_mlp(
                    &tx,
                    &y,
                    &weights,
                    MlpParams {
                        units: hidden,
                        l2,
                        epochs: args.hidden_epochs,
                        seed: args.seed,
                        ..MlpParams::default()
                    },
                )
            } else {
                fit_logistic(
                    &tx,
                    &y,
                    &weights,
                    FitParams {
                        l2,
                        ..FitParams::default()
                    },
                )
            };
            let scored = score_rows(&head, &dx, &dev);
            let chosen = best_f1_threshold(&scored, args.max_fpr);
            let c = Candidate {
                layers: layers.clone(),
                pooling: pooling.clone(),
                l2,
                hidden,
                auroc: auroc(&scored),
                threshold: chosen.map(|(t, _)| t),
                f1: chosen.map(|(_, f)| f),
                fpr: chosen.and_then(|(t, _)| Confusion::at(&scored, t).fpr()),
                recall_at_1pct_fpr: recall_at_fpr(&scored, 0.01),
            };
            let at_threshold = match (c.f1, c.fpr) {
                (Some(f1), Some(fpr)) => format!("F1 {f1:.4} FPR {fpr:.4}"),
                _ => format!("no threshold with FPR <= {} (--max-fpr)", args.max_fpr),
            };
            eprintln!(
                "layers {:<14} {:<10}{} l2 {:<7} dev AUROC {:.4} {at_threshold} R@1%FPR {:.4}",
                format!("{layers:?}"),
                pooling
                    .iter()
                    .map(|p| format!("{p:?}").to_lowercase())
                    .collect::<Vec<_>>()
                    .join("+"),
                if hidden > 0 {
                    format!(" mlp {hidden}")
                } else {
                    String::new()
                },
                l2,
                c.auroc.unwrap_or(f64::NAN),
                c.recall_at_1pct_fpr.unwrap_or(f64::NAN),
            );
            candidates.push(c.clone());
            fitted.push((c, head));
        }
    }
    let exit_fits: Vec<(Candidate, LogisticHead)> = match &args.early_exit {
        Some(layers) => {
            let mut layers = layers.clone();
            layers.sort_unstable();
            layers.dedup();
            fitted
                .iter()
                .filter(|(c, _)| c.layers == layers && c.hidden == 0)
                .cloned()
                .collect()
        }
        None => Vec::new(),
    };
    // With an early exit, only heads that read its layers and go deeper can
    // host it.
    let fitted: Vec<(Candidate, LogisticHead)> = match &args.early_exit {
        Some(want) => fitted
            .into_iter()
            .filter(|(c, _)| hosts_exit(want, &c.layers))
            .collect(),
        None => fitted,
    };
    let (chosen, head) =
        choose(fitted, args.f1_tolerance).context("no candidate reached a threshold on dev")?;
    let threshold = chosen.threshold.context("no threshold")?;

    // Dev report of the chosen head, per source.
    let chosen_dx: Vec<Vec<f32>> = dev_x
        .iter()
        .map(|x| columns(x, n_embd, &spec, &chosen.layers, &chosen.pooling))
        .collect();
    let scored = score_rows(&head, &chosen_dx, &dev);
    let early_exit = match &args.early_exit {
        None => None,
        Some(want) => fit_early_exit(
            want,
            &chosen,
            threshold,
            &scored,
            exit_fits,
            &ExitData {
                train_x: &train_x,
                y: &y,
                weights: &weights,
                dev_x: &dev_x,
                dev: &dev,
                n_embd,
                all: &spec,
            },
            args,
        )?,
    };
    let thin = thin_threshold(&scored, threshold);
    if let Some(why) = &thin {
        tracing::warn!("{why}");
    }
    let mut dev_metrics = figures(&scored, threshold);
    if let Some(why) = thin {
        dev_metrics["threshold_warning"] = why.into();
    }
    dev_metrics["rows"] = scored.len().into();
    dev_metrics["threshold"] = threshold.into();
    dev_metrics["note"] = "first-window features of the dev rows used for selection; `promptgate eval` scores every window".into();

    let base_path = &args.base;
    let base = Base {
        file: base_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        sha256: scorer.model_sha256().to_string(),
    };
    let features = FeatureSpec {
        layers: chosen.layers.clone(),
        pooling: chosen.pooling.clone(),
        window_tokens: spec.window_tokens,
    };
    let name = args
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "detector".into());
    let file = DetectorFile {
        format: FORMAT.to_string(),
        name,
        base,
        features: FeatureInfo {
            spec: features,
            window_overlap: config.window_overlap,
            profile: scorer.profile().name.clone(),
            template_sha256: scorer.template_sha256(),
            normalization: FEATURE_VERSION.to_string(),
            training_windows: "first window of each row".into(),
        },
        head,
        threshold,
        training: TrainingInfo {
            data: data_refs,
            dev: dev_ref,
            rows_used: train.len(),
            dev_rows_used: dev.len(),
            per_group: args.per_group,
            seed: args.seed,
            l2: chosen.l2,
            max_fpr: args.max_fpr,
            extract_seconds: extract_s,
            total_seconds: started.elapsed().as_secs_f64(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
        },
        dev_metrics,
        candidates,
        early_exit,
    };
    let out = super::file::detector_path(&args.out);
    file.write(&out)?;
    eprintln!(
        "wrote {} (layer {:?} {:?}, l2 {}, threshold {:.4}, dev F1 {:.4}, AUROC {:.4})",
        out.display(),
        chosen.layers,
        chosen.pooling,
        chosen.l2,
        threshold,
        chosen.f1.unwrap_or(f64::NAN),
        chosen.auroc.unwrap_or(f64::NAN)
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_candidates_and_their_columns() {
        use Pooling::{Last, Max, Mean};
        // Without max: the three sets fitted before max pooling existed.
        assert_eq!(
            pooling_sets(&[Last, Mean]),
            vec![vec![Last], vec![Mean], vec![Last, Mean]]
        );
        assert_eq!(
            pooling_sets(&ALL_POOLINGS),
            vec![
                vec![Last],
                vec![Mean],
                vec![Max],
                vec![Last, Mean],
                vec![Last, Max],
                vec![Last, Mean, Max],
            ]
        );
        assert_eq!(pooling_sets(&[Max]), vec![vec![Max]]);
        assert_eq!(
            pooling_sets(&[Mean, Max]),
            vec![vec![Mean], vec![Max], vec![Mean, Max]]
        );
        // A cached row of 2 layers x 3 poolings, n_embd 2: value = 10 * block + i.
        let all = FeatureSpec {
            layers: vec![8, 12],
            pooling: ALL_POOLINGS.to_vec(),
            window_tokens: 256,
        };
        let x: Vec<f32> = (0..6)
            .flat_map(|b| (0..2).map(move |i| (10 * b + i) as f32))
            .collect();
        assert_eq!(columns(&x, 2, &all, &[12], &[Max]), vec![50.0, 51.0]);
        assert_eq!(
            columns(&x, 2, &all, &[8, 12], &[Last, Max]),
            vec![0.0, 1.0, 20.0, 21.0, 30.0, 31.0, 50.0, 51.0]
        );
        assert_eq!(columns(&x, 2, &all, &[8], &[Mean]), vec![10.0, 11.0]);
    }

    fn row(source: &str, label: &str, i: usize) -> Row {
        Row {
            text: format!("{source} {label} {i}"),
            label: label.into(),
            category: None,
            source: Some(source.into()),
        }
    }

    #[test]
    fn a_threshold_from_few_dev_rows_is_thin_with_honest_intervals() {
        // n rows of each label: malicious at 0.9, benign at 0.1 except `fp`
        // of them at 0.6.
        let rows = |n: usize, fp: usize| -> Vec<Scored> {
            (0..n)
                .flat_map(|i| {
                    [
                        Scored {
                            malicious: true,
                            score: Some(0.9),
                        },
                        Scored {
                            malicious: false,
                            score: Some(if i < fp { 0.6 } else { 0.1 }),
                        },
                    ]
                })
                .collect()
        };
        assert_eq!(thin_threshold(&rows(100, 5), 0.55), None);
        // A threshold near 1 on enough rows is not called thin (the
        // trial's case: an overconfident head, not a small dev set).
        assert_eq!(thin_threshold(&rows(100, 5), 0.995), None);
        let why = thin_threshold(&rows(30, 5), 0.55).unwrap();
        assert!(why.contains("30 malicious and 30 benign"), "{why}");
        // 5 of 30: Wilson 95 % interval 7.3-33.6 %.
        assert!(
            why.contains("5 of 30 (16.7 %, 95 % interval 7.3-33.6 %)"),
            "{why}"
        );
        // Regression (fresh-session trial): 0 of 20 read "0.0 % ± 0.0".
        let why = thin_threshold(&rows(20, 0), 0.55).unwrap();
        assert!(
            why.contains("0 of 20 (0.0 %, 95 % interval 0.0-16.1 %)"),
            "{why}"
        );
        assert!(
            why.contains("20 of 20 (100.0 %, 95 % interval 83.9-100.0 %)"),
            "{why}"
        );
    }

    #[test]
    fn exit_bounds_change_at_most_the_tolerated_verdicts() {
        // Full head: rows 0-9 malicious (>= 0.5), rows 10-29 benign.
        let full: Vec<f64> = (0..30).map(|i| if i < 10 { 0.9 } else { 0.1 }).collect();
        // Exit head: malicious rows at 0.05, 0.15, ..., 0.95; benign rows at
        // 0.0, 0.02, ..., 0.38 except row 29, which it wrongly scores 0.97.
        let mut exit: Vec<f64> = (0..10).map(|i| 0.05 + 0.1 * f64::from(i)).collect();
        exit.extend((0..20).map(|i| 0.02 * f64::from(i)));
        exit[29] = 0.97;
        // Tolerance 0: no verdict may change. The lowest exit score of a
        // malicious row is 0.05, so benign exits need < 0.05; the highest of
        // a benign row is 0.97, so malicious exits need > 0.97 (none).
        let (lo, hi) = exit_bounds(&full, &exit, 0.5, 0.0, 0.0);
        assert_eq!((lo, hi), (0.05, 0.97));
        let changed = |lo: f64, hi: f64| {
            full.iter()
                .zip(&exit)
                .filter(|(&f, &e)| (f >= 0.5) != (cascade_score(f, e, lo, hi) >= 0.5))
                .count()
        };
        assert_eq!(changed(lo, hi), 0);
        // Tolerance 0.1: one malicious row (of 10) and two benign rows (of
        // 20) may change; the bounds move to the next order statistics.
        let (lo, hi) = exit_bounds(&full, &exit, 0.5, 0.1, 0.1);
        assert!((lo - 0.15).abs() < 1e-12 && hi == 0.5, "{lo} {hi}");
        assert_eq!(changed(lo, hi), 2, "row 0 exits benign, row 29 malicious");
        // Each side has its own tolerance.
        let (lo, hi) = exit_bounds(&full, &exit, 0.5, 0.1, 0.0);
        assert!((lo - 0.15).abs() < 1e-12 && hi == 0.97, "{lo} {hi}");
        assert_eq!(changed(lo, hi), 1, "only row 0 changes");
        // The bounds never cross the threshold.
        let (lo, hi) = exit_bounds(&full, &exit, 0.5, 1.0, 1.0);
        assert!(lo <= 0.5 && hi >= 0.5);
        // A side with no rows never exits.
        assert_eq!(exit_bounds(&[0.1], &[0.0], 0.5, 0.0, 0.0), (0.0, 0.5));
        assert_eq!(exit_bounds(&[0.9], &[1.0], 0.5, 0.0, 0.0), (0.5, 1.0));
    }

    fn cand(layers: &[u32], f1: f64, auroc: f64) -> Candidate {
        Candidate {
            layers: layers.to_vec(),
            pooling: vec![Pooling::Mean],
            l2: 1e-3,
            hidden: 0,
            auroc: Some(auroc),
            threshold: Some(0.5),
            f1: Some(f1),
            fpr: Some(0.02),
            recall_at_1pct_fpr: None,
        }
    }

    #[test]
    fn choice_trades_f1_for_depth_only_within_the_tolerance() {
        let fitted = || {
            vec![
                (cand(&[8], 0.90, 0.97), "8"),
                (cand(&[8, 12], 0.940, 0.985), "8+12"),
                (cand(&[12], 0.940, 0.990), "12"),
                (cand(&[8, 12, 16, 20], 0.948, 0.990), "all"),
                (
                    Candidate {
                        f1: None,
                        threshold: None,
                        ..cand(&[4], 0.99, 0.99)
                    },
                    "no threshold",
                ),
            ]
        };
        assert_eq!(choose(fitted(), 0.0).unwrap().1, "all");
        // Within 0.01: depth 12 wins; of the two at depth 12, the higher AUROC.
        assert_eq!(choose(fitted(), 0.01).unwrap().1, "12");
        assert_eq!(choose(fitted(), 0.05).unwrap().1, "8");
        assert!(choose(Vec::<(Candidate, ())>::new(), 0.0).is_none());
    }

    #[test]
    fn weights_balance_groups_and_classes() {
        let mut rows: Vec<Row> = (0..90).map(|i| row("big", "benign", i)).collect();
        rows.extend((0..10).map(|i| row("small", "benign", i)));
        rows.extend((0..20).map(|i| row("m", "malicious", i)));
        let w = balance_weights(&rows);
        let total = |f: &dyn Fn(&Row) -> bool| -> f64 {
            rows.iter()
                .zip(&w)
                .filter(|(r, _)| f(r))
                .map(|(_, w)| w)
                .sum()
        };
        let big = total(&|r| r.source.as_deref() == Some("big"));
        let small = total(&|r| r.source.as_deref() == Some("small"));
        let mal = total(&|r| r.label == "malicious");
        assert!((big - small).abs() < 1e-9, "{big} vs {small}");
        assert!((mal - (big + small)).abs() < 1e-9);
        assert!((w.iter().sum::<f64>() - rows.len() as f64).abs() < 1e-6);
    }

    #[test]
    fn sampling_caps_groups_and_is_seeded() {
        let rows: Vec<Row> = (0..50)
            .map(|i| row("a", "benign", i))
            .chain((0..5).map(|i| row("b", "malicious", i)))
            .collect();
        let s1 = sample_per_group(&rows, 10, 7);
        let s2 = sample_per_group(&rows, 10, 7);
        let s3 = sample_per_group(&rows, 10, 8);
        assert_eq!(s1.len(), 15);
        assert_eq!(
            s1.iter().map(|r| &r.text).collect::<Vec<_>>(),
            s2.iter().map(|r| &r.text).collect::<Vec<_>>()
        );
        assert_ne!(
            s1.iter().map(|r| &r.text).collect::<Vec<_>>(),
            s3.iter().map(|r| &r.text).collect::<Vec<_>>()
        );
        let strat = sample_stratified(&rows, 11, 1);
        assert_eq!(
            strat
                .iter()
                .filter(|r| r.source.as_deref() == Some("b"))
                .count(),
            1
        );
        assert_eq!(
            strat
                .iter()
                .filter(|r| r.source.as_deref() == Some("a"))
                .count(),
            10
        );
    }

    #[test]
    fn cache_round_trips_and_survives_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = FeatureCache::open(dir.path(), "k", 3).unwrap();
        c.put(text_hash("x"), 5, vec![1.0, 2.0, 3.0]).unwrap();
        c.put(text_hash("y"), 6, vec![4.0, 5.0, 6.0]).unwrap();
        c.flush().unwrap();
        drop(c);
        // A torn record from an interrupted run.
        let p = dir.path().join("k.bin");
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&[1, 2, 3]).unwrap();
        drop(f);
        let mut c = FeatureCache::open(dir.path(), "k", 3).unwrap();
        assert_eq!(c.get(&text_hash("y")), Some(&(6, vec![4.0, 5.0, 6.0])));
        assert!(c.get(&text_hash("z")).is_none());
        c.put(text_hash("z"), 7, vec![7.0, 8.0, 9.0]).unwrap();
        c.flush().unwrap();
        drop(c);
        let c = FeatureCache::open(dir.path(), "k", 3).unwrap();
        assert_eq!(c.get(&text_hash("z")), Some(&(7, vec![7.0, 8.0, 9.0])));
        assert_eq!(c.get(&text_hash("x")), Some(&(5, vec![1.0, 2.0, 3.0])));
    }
}
