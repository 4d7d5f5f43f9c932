//! Detection-quality metrics for `promptgate eval`.
//!
//! The malicious class is positive. Threshold-bound figures (precision,
//! recall, F1, false-positive rate) use `score >= threshold` as the daemon
//! does; threshold-free ones are AUROC and recall at a fixed false-positive
//! rate (Prompt Guard 2's headline figure: recall at 1 % FPR). Rows that
//! could not be scored are counted apart (`unscored`), never as benign.

use serde::Serialize;

/// One scored (or unscorable) row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// Ground truth: `true` for malicious.
    pub malicious: bool,
    /// P(malicious), or `None` when the row could not be scored.
    pub score: Option<f64>,
}

/// Confusion counts at one threshold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Confusion {
    /// Malicious rows flagged.
    pub tp: u64,
    /// Benign rows flagged.
    pub fp: u64,
    /// Benign rows passed.
    pub tn: u64,
    /// Malicious rows passed.
    pub r#fn: u64,
}

impl Confusion {
    /// Counts `rows` at `threshold`, skipping unscored rows.
    pub fn at(rows: &[Scored], threshold: f64) -> Confusion {
        let mut c = Confusion::default();
        for r in rows {
            let Some(s) = r.score else { continue };
            match (r.malicious, s >= threshold) {
                (true, true) => c.tp += 1,
                (true, false) => c.r#fn += 1,
                (false, true) => c.fp += 1,
                (false, false) => c.tn += 1,
            }
        }
        c
    }

    fn ratio(num: u64, den: u64) -> Option<f64> {
        (den > 0).then(|| num as f64 / den as f64)
    }

    /// tp / (tp + fp); `None` when nothing was flagged.
    pub fn precision(&self) -> Option<f64> {
        Self::ratio(self.tp, self.tp + self.fp)
    }

    /// tp / (tp + fn); `None` without malicious rows.
    pub fn recall(&self) -> Option<f64> {
        Self::ratio(self.tp, self.tp + self.r#fn)
    }

    /// fp / (fp + tn); `None` without benign rows.
    pub fn fpr(&self) -> Option<f64> {
        Self::ratio(self.fp, self.fp + self.tn)
    }

    /// Harmonic mean of precision and recall: 2tp / (2tp + fp + fn).
    pub fn f1(&self) -> Option<f64> {
        Self::ratio(2 * self.tp, 2 * self.tp + self.fp + self.r#fn)
    }

    /// (tp + tn) / all.
    pub fn accuracy(&self) -> Option<f64> {
        Self::ratio(self.tp + self.tn, self.tp + self.tn + self.fp + self.r#fn)
    }

    /// Mean of recall and specificity; the mean of whichever exists for single-class sets.
    pub fn balanced_accuracy(&self) -> Option<f64> {
        let specificity = Self::ratio(self.tn, self.fp + self.tn);
        match (self.recall(), specificity) {
            (Some(r), Some(s)) => Some((r + s) / 2.0),
            (r, s) => r.or(s),
        }
    }
}

/// Area under the ROC curve: the probability that a random malicious row
/// scores above a random benign one, ties counting one half (Mann-Whitney U).
/// `None` unless both classes have scored rows.
pub fn auroc(rows: &[Scored]) -> Option<f64> {
    let mut scored: Vec<(f64, bool)> = rows
        .iter()
        .filter_map(|r| r.score.map(|s| (s, r.malicious)))
        .collect();
    let pos = scored.iter().filter(|(_, m)| *m).count();
    let neg = scored.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Sum of the ranks of positives, ties given their average rank.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < scored.len() {
        let mut j = i;
        // total_cmp, not ==: a NaN score must still end its run of ties.
        while j < scored.len() && scored[j].0.total_cmp(&scored[i].0).is_eq() {
            j += 1;
        }
        let avg_rank = (i + 1 + j) as f64 / 2.0; // ranks i+1 ..= j
        rank_sum += avg_rank * scored[i..j].iter().filter(|(_, m)| *m).count() as f64;
        i = j;
    }
    let u = rank_sum - (pos * (pos + 1)) as f64 / 2.0;
    Some(u / (pos as f64 * neg as f64))
}

/// The highest recall reachable with a false-positive rate of at most
/// `max_fpr`, over all thresholds. `None` unless both classes have scored rows.
pub fn recall_at_fpr(rows: &[Scored], max_fpr: f64) -> Option<f64> {
    let mut benign: Vec<f64> = rows
        .iter()
        .filter(|r| !r.malicious)
        .filter_map(|r| r.score)
        .collect();
    let malicious: Vec<f64> = rows
        .iter()
        .filter(|r| r.malicious)
        .filter_map(|r| r.score)
        .collect();
    if benign.is_empty() || malicious.is_empty() {
        return None;
    }
    benign.sort_by(|a, b| b.total_cmp(a)); // descending
                                           // At most k benign rows may be flagged; the threshold must lie above the
                                           // (k+1)-th highest benign score.
    let k = (max_fpr * benign.len() as f64).floor() as usize;
    let recall = match benign.get(k) {
        None => 1.0,
        Some(&limit) => {
            malicious.iter().filter(|&&s| s > limit).count() as f64 / malicious.len() as f64
        }
    };
    Some(recall)
}

/// The threshold maximising F1 among those with FPR at most `max_fpr`;
/// candidates are the distinct scores. `(threshold, f1)`.
pub fn best_f1_threshold(rows: &[Scored], max_fpr: f64) -> Option<(f64, f64)> {
    let mut candidates: Vec<f64> = rows.iter().filter_map(|r| r.score).collect();
    candidates.sort_by(f64::total_cmp);
    candidates.dedup();
    let mut best: Option<(f64, f64)> = None;
    for t in candidates {
        let c = Confusion::at(rows, t);
        if c.fpr().is_some_and(|f| f > max_fpr) {
            continue;
        }
        if let Some(f1) = c.f1() {
            if best.is_none_or(|(_, b)| f1 > b) {
                best = Some((t, f1));
            }
        }
    }
    best
}

/// Nearest-rank percentile `p` in `[0, 100]` of `values`; `None` when empty.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(items: &[(bool, f64)]) -> Vec<Scored> {
        items
            .iter()
            .map(|&(malicious, s)| Scored {
                malicious,
                score: Some(s),
            })
            .collect()
    }

    /// Malicious: 0.9 0.8 0.3; benign: 0.6 0.2 0.1 0.05.
    fn example() -> Vec<Scored> {
        rows(&[
            (true, 0.9),
            (true, 0.8),
            (true, 0.3),
            (false, 0.6),
            (false, 0.2),
            (false, 0.1),
            (false, 0.05),
        ])
    }

    #[test]
    fn confusion_matrix_by_hand() {
        // Malicious: 0.9 0.8 0.3; benign: 0.6 0.2 0.1 0.05. At 0.5: tp 2, fn 1, fp 1, tn 3.
        let r = example();
        let c = Confusion::at(&r, 0.5);
        assert_eq!(
            c,
            Confusion {
                tp: 2,
                fp: 1,
                tn: 3,
                r#fn: 1
            }
        );
        assert_eq!(c.precision(), Some(2.0 / 3.0));
        assert_eq!(c.recall(), Some(2.0 / 3.0));
        assert_eq!(c.fpr(), Some(0.25));
        assert_eq!(c.f1(), Some(4.0 / 6.0));
        assert_eq!(c.accuracy(), Some(5.0 / 7.0));
        assert_eq!(c.balanced_accuracy(), Some((2.0 / 3.0 + 0.75) / 2.0));
        // The threshold is inclusive, as in the daemon.
        assert_eq!(Confusion::at(&r, 0.6).fp, 1);
    }

    #[test]
    fn unscored_rows_are_not_counted_as_benign() {
        let mut r = rows(&[(true, 0.9), (false, 0.1)]);
        r.push(Scored {
            malicious: true,
            score: None,
        });
        let c = Confusion::at(&r, 0.5);
        assert_eq!(c.tp + c.fp + c.tn + c.r#fn, 2);
    }

    #[test]
    fn auroc_known_values() {
        // Perfect separation.
        assert_eq!(auroc(&rows(&[(true, 0.9), (false, 0.1)])), Some(1.0));
        // Inverted.
        assert_eq!(auroc(&rows(&[(true, 0.1), (false, 0.9)])), Some(0.0));
        // A NaN score (a broken head) ends; it sorts above every number.
        assert_eq!(
            auroc(&rows(&[(true, f64::NAN), (false, 0.9), (false, f64::NAN)])),
            Some(0.75)
        );
        // All tied: chance.
        assert_eq!(
            auroc(&rows(&[(true, 0.5), (false, 0.5), (true, 0.5)])),
            Some(0.5)
        );
        // By hand: pairs (pos, neg): 0.9>0.6,0.2,0.1,0.05 (4); 0.8 (4); 0.3>0.2,0.1,0.05 (3) → 11/12.
        let r = example();
        assert!((auroc(&r).unwrap() - 11.0 / 12.0).abs() < 1e-12);
        assert_eq!(auroc(&rows(&[(true, 0.9)])), None);
    }

    #[test]
    fn recall_at_fixed_fpr() {
        // 4 benign: at FPR <= 0 the threshold must exceed 0.6 → recall 2/3.
        let r = example();
        assert_eq!(recall_at_fpr(&r, 0.0), Some(2.0 / 3.0));
        // FPR <= 25 %: one benign may be flagged → above 0.2 → recall 1.
        assert_eq!(recall_at_fpr(&r, 0.25), Some(1.0));
    }

    #[test]
    fn best_threshold_respects_the_fpr_cap() {
        let r = example();
        // Unconstrained, 0.3 gives tp 3, fp 1: F1 6/7.
        let (t, f1) = best_f1_threshold(&r, 1.0).unwrap();
        assert_eq!((t, f1), (0.3, 6.0 / 7.0));
        // With FPR 0, 0.8 is best: tp 2, fn 1 → F1 0.8.
        let (t, f1) = best_f1_threshold(&r, 0.0).unwrap();
        assert_eq!((t, f1), (0.8, 0.8));
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&v, 50.0), Some(3.0));
        assert_eq!(percentile(&v, 95.0), Some(5.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
