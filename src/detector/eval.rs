//! `promptgate eval`: runs labelled rows through exactly the daemon's scoring
//! path (normalisation, then the scorer) and reports detection quality,
//! overall and per `source` and `category`.
//!
//! Input: JSON Lines, one `{"text", "label": "malicious"|"benign",
//! "category"?, "source"?}` per line (the format of `../shared/data/`).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::metrics::{auroc, percentile, recall_at_fpr, Confusion, Scored};
use crate::engine::Scorer;

/// One labelled row.
#[derive(Debug, Clone, Deserialize)]
pub struct Row {
    /// The prompt.
    pub text: String,
    /// `malicious` or `benign`.
    pub label: String,
    /// The source's own category, if any.
    #[serde(default)]
    pub category: Option<String>,
    /// Which data set the row comes from.
    #[serde(default)]
    pub source: Option<String>,
}

/// Reads a JSONL file of rows.
///
/// # Errors
/// Unreadable file, a line that is not a row, or a label other than `malicious`/`benign`.
pub fn read_rows(path: &Path) -> anyhow::Result<Vec<Row>> {
    let f = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let row: Row = serde_json::from_str(&line).map_err(|e| {
            anyhow::anyhow!("{}:{}: not a labelled row: {e}", path.display(), i + 1)
        })?;
        anyhow::ensure!(
            row.label == "malicious" || row.label == "benign",
            "{}:{}: label must be \"malicious\" or \"benign\", got {:?}",
            path.display(),
            i + 1,
            row.label
        );
        rows.push(row);
    }
    Ok(rows)
}

/// Figures for one set of rows. Ratios are `null` when undefined (e.g. FPR without benign rows).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Rows in the set, scored or not.
    pub n: usize,
    /// Malicious rows flagged.
    pub tp: u64,
    /// Benign rows flagged.
    pub fp: u64,
    /// Benign rows passed.
    pub tn: u64,
    /// Malicious rows passed.
    pub r#fn: u64,
    /// tp / (tp + fp).
    pub precision: Option<f64>,
    /// tp / (tp + fn).
    pub recall: Option<f64>,
    /// F1 of the malicious class.
    pub f1: Option<f64>,
    /// False-positive rate on benign rows.
    pub fpr: Option<f64>,
    /// (tp + tn) / scored.
    pub accuracy: Option<f64>,
    /// Mean of recall and specificity.
    pub balanced_accuracy: Option<f64>,
    /// Area under the ROC curve.
    pub auroc: Option<f64>,
    /// Best recall with FPR at most 1 %.
    pub recall_at_1pct_fpr: Option<f64>,
    /// Best recall with FPR at most 5 %.
    pub recall_at_5pct_fpr: Option<f64>,
    /// Rows that could not be scored (never counted as benign).
    pub unscored: usize,
    /// Median scoring latency per row, milliseconds.
    pub latency_ms_p50: Option<f64>,
    /// 95th-percentile scoring latency, milliseconds.
    pub latency_ms_p95: Option<f64>,
    /// Median prompt length in tokens.
    pub prompt_tokens_p50: Option<f64>,
    /// Windows scored, over the scored rows.
    pub windows: usize,
    /// Of those, windows decided by the detector's early-exit head (0
    /// without one; docs/detector.md).
    pub early_exit_windows: usize,
}

/// The whole evaluation: overall figures plus per-source and per-category maps.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The model that scored.
    pub model: crate::protocol::ModelRef,
    /// The threshold applied.
    pub threshold: f64,
    /// The data file.
    pub data: String,
    /// Overall figures (flattened into the top level of the JSON).
    #[serde(flatten)]
    pub overall: Report,
    /// Figures per `source`.
    pub by_source: BTreeMap<String, Report>,
    /// Figures per `category`.
    pub by_category: BTreeMap<String, Report>,
}

struct Outcome {
    scored: Scored,
    latency_ms: f64,
    tokens: Option<f64>,
    /// (windows, early-exit windows) of a scored row.
    windows: (usize, usize),
}

fn report(outcomes: &[&Outcome], threshold: f64) -> Report {
    let rows: Vec<Scored> = outcomes.iter().map(|o| o.scored).collect();
    let c = Confusion::at(&rows, threshold);
    let latencies: Vec<f64> = outcomes.iter().map(|o| o.latency_ms).collect();
    let tokens: Vec<f64> = outcomes.iter().filter_map(|o| o.tokens).collect();
    Report {
        n: rows.len(),
        tp: c.tp,
        fp: c.fp,
        tn: c.tn,
        r#fn: c.r#fn,
        precision: c.precision(),
        recall: c.recall(),
        f1: c.f1(),
        fpr: c.fpr(),
        accuracy: c.accuracy(),
        balanced_accuracy: c.balanced_accuracy(),
        auroc: auroc(&rows),
        recall_at_1pct_fpr: recall_at_fpr(&rows, 0.01),
        recall_at_5pct_fpr: recall_at_fpr(&rows, 0.05),
        unscored: rows.iter().filter(|r| r.score.is_none()).count(),
        latency_ms_p50: percentile(&latencies, 50.0),
        latency_ms_p95: percentile(&latencies, 95.0),
        prompt_tokens_p50: percentile(&tokens, 50.0),
        windows: outcomes.iter().map(|o| o.windows.0).sum(),
        early_exit_windows: outcomes.iter().map(|o| o.windows.1).sum(),
    }
}

/// Scores every row with `scorer` and builds the report at `threshold`
/// (the scorer's default when `None`). `progress` is called after each row
/// with (done, total).
pub fn evaluate(
    scorer: &mut dyn Scorer,
    rows: &[Row],
    threshold: Option<f64>,
    data: &str,
    mut progress: impl FnMut(usize, usize),
) -> (EvalReport, Vec<Scored>) {
    let threshold = threshold.unwrap_or(scorer.default_threshold());
    let mut outcomes = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let started = Instant::now();
        // The daemon's own checks: a row it would refuse is unscored here.
        let result = match crate::normalize::prepare(&row.text) {
            Ok(normalized) => scorer.score(&normalized.text).map_err(|e| e.to_string()),
            Err(e) => Err(format!("{}: {}", e.kind.as_str(), e.message)),
        };
        let latency_ms = crate::engine::ms(started.elapsed());
        let (score, tokens, windows) = match result {
            Ok(s) => (
                Some(s.p_malicious),
                Some(s.tokens as f64),
                (s.windows, s.early_exit_windows),
            ),
            Err(e) => {
                tracing::debug!(row = i + 1, error = %e, "row not scored");
                (None, None, (0, 0))
            }
        };
        outcomes.push(Outcome {
            scored: Scored {
                malicious: row.label == "malicious",
                score,
            },
            latency_ms,
            tokens,
            windows,
        });
        progress(i + 1, rows.len());
    }
    let all: Vec<&Outcome> = outcomes.iter().collect();
    let group = |key: &dyn Fn(&Row) -> Option<&String>| -> BTreeMap<String, Report> {
        let mut groups: BTreeMap<String, Vec<&Outcome>> = BTreeMap::new();
        for (row, o) in rows.iter().zip(&outcomes) {
            let k = key(row).cloned().unwrap_or_else(|| "(none)".into());
            groups.entry(k).or_default().push(o);
        }
        groups
            .into_iter()
            .map(|(k, v)| (k, report(&v, threshold)))
            .collect()
    };
    let eval = EvalReport {
        model: scorer.model().clone(),
        threshold,
        data: data.to_string(),
        overall: report(&all, threshold),
        by_source: group(&|r: &Row| r.source.as_ref()),
        by_category: group(&|r: &Row| r.category.as_ref()),
    };
    (eval, outcomes.into_iter().map(|o| o.scored).collect())
}

fn fmt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.3}"))
}

/// A readable table: the overall line, then one line per source.
pub fn table(r: &EvalReport) -> String {
    let mut out = format!(
        "model {} · threshold {:.3} · {}\n{:<28} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>7} {:>6} {:>5}\n",
        r.model.name,
        r.threshold,
        r.data,
        "set",
        "n",
        "prec",
        "recall",
        "f1",
        "fpr",
        "acc",
        "auroc",
        "r@1%fpr",
        "p50ms",
        "unsc"
    );
    let line = |name: &str, x: &Report| {
        format!(
            "{:<28} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>7} {:>6} {:>5}\n",
            name,
            x.n,
            fmt(x.precision),
            fmt(x.recall),
            fmt(x.f1),
            fmt(x.fpr),
            fmt(x.accuracy),
            fmt(x.auroc),
            fmt(x.recall_at_1pct_fpr),
            x.latency_ms_p50
                .map_or_else(|| "-".into(), |v| format!("{v:.0}")),
            x.unscored
        )
    };
    out.push_str(&line("ALL", &r.overall));
    for (k, v) in &r.by_source {
        out.push_str(&line(&format!("  {k}"), v));
    }
    let o = &r.overall;
    if o.early_exit_windows > 0 {
        out.push_str(&format!(
            "early exit: {} of {} windows ({:.1} %) decided before the deepest layer\n",
            o.early_exit_windows,
            o.windows,
            100.0 * o.early_exit_windows as f64 / o.windows.max(1) as f64
        ));
    }
    out
}
