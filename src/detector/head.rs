//! The classifier head on frozen hidden-state features: L2-regularised
//! logistic regression on standardised features.
//!
//! Fit by full-batch Adam (deterministic: no sampling, fixed order), with
//! per-row weights so that every (source, label) group and both classes carry
//! the weight the caller chose. P(malicious) = sigmoid(w · z + b) with
//! z = (x - mean) / scale.

use serde::{Deserialize, Serialize};

use crate::engine::llama::FeatureHead;

/// A fitted logistic-regression head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogisticHead {
    /// Per-feature mean of the training rows (`dim` floats).
    pub mean: Vec<f32>,
    /// Per-feature standard deviation of the training rows, floored at 1e-6.
    pub scale: Vec<f32>,
    /// Weights on the standardised features (`dim` floats).
    pub weights: Vec<f32>,
    /// Intercept.
    pub bias: f32,
}

impl LogisticHead {
    /// Feature dimension.
    pub fn dim(&self) -> usize {
        self.weights.len()
    }

    /// The logit w · z + b of one feature vector.
    pub fn logit(&self, x: &[f32]) -> f64 {
        let mut acc = f64::from(self.bias);
        for (((&v, &m), &s), &w) in x.iter().zip(&self.mean).zip(&self.scale).zip(&self.weights) {
            acc += f64::from(w) * f64::from((v - m) / s);
        }
        acc
    }

    /// Checks the vectors agree in length and hold finite numbers.
    ///
    /// # Errors
    /// A message naming the first problem.
    pub fn validate(&self, dim: usize) -> Result<(), String> {
        if self.weights.len() != dim || self.mean.len() != dim || self.scale.len() != dim {
            return Err(format!(
                "head has {} weights, {} means and {} scales; they must all have {dim}",
                self.weights.len(),
                self.mean.len(),
                self.scale.len()
            ));
        }
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        if !finite(&self.weights)
            || !finite(&self.mean)
            || !finite(&self.scale)
            || !self.bias.is_finite()
        {
            return Err("head holds a non-finite number".into());
        }
        if self.scale.iter().any(|&s| s <= 0.0) {
            return Err("head has a non-positive scale".into());
        }
        Ok(())
    }
}

impl FeatureHead for LogisticHead {
    fn predict(&self, features: &[f32]) -> f64 {
        if features.len() != self.weights.len() {
            return f64::NAN;
        }
        sigmoid(self.logit(features))
    }
}

/// The logistic function.
pub fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Settings of [`fit_logistic`].
#[derive(Debug, Clone, Copy)]
pub struct FitParams {
    /// L2 penalty λ on the weights (not the bias): loss = weighted mean
    /// cross-entropy + λ/2 · ‖w‖².
    pub l2: f64,
    /// Full-batch Adam steps.
    pub steps: usize,
    /// Adam learning rate.
    pub lr: f64,
}

impl Default for FitParams {
    fn default() -> Self {
        FitParams {
            l2: 1e-3,
            steps: 400,
            lr: 0.05,
        }
    }
}

/// Fits a logistic head on rows `x` (each `dim` floats), labels `y`
/// (`true` = malicious) and row weights `w` (any positive scale).
///
/// # Panics
/// If the slices differ in length or `x` is empty.
pub fn fit_logistic(x: &[Vec<f32>], y: &[bool], w: &[f64], params: FitParams) -> LogisticHead {
    assert!(!x.is_empty() && x.len() == y.len() && y.len() == w.len());
    let n = x.len();
    let dim = x[0].len();
    let wsum: f64 = w.iter().sum();
    // Weighted standardisation statistics.
    let mut mean = vec![0f64; dim];
    for (row, &wi) in x.iter().zip(w) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += wi * f64::from(v);
        }
    }
    mean.iter_mut().for_each(|m| *m /= wsum);
    let mut var = vec![0f64; dim];
    for (row, &wi) in x.iter().zip(w) {
        for ((s, &v), m) in var.iter_mut().zip(row).zip(&mean) {
            let d = f64::from(v) - m;
            *s += wi * d * d;
        }
    }
    let scale: Vec<f64> = var.iter().map(|v| (v / wsum).sqrt().max(1e-6)).collect();
    let z: Vec<Vec<f64>> = x
        .iter()
        .map(|row| {
            row.iter()
                .zip(&mean)
                .zip(&scale)
                .map(|((&v, m), s)| (f64::from(v) - m) / s)
                .collect()
        })
        .collect();
    let target: Vec<f64> = y.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
    let wn: Vec<f64> = w.iter().map(|wi| wi / wsum).collect();

    let mut coef = vec![0f64; dim + 1]; // last = bias
    let (mut m1, mut m2) = (vec![0f64; dim + 1], vec![0f64; dim + 1]);
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let mut grad = vec![0f64; dim + 1];
    for step in 1..=params.steps {
        grad.iter_mut().for_each(|g| *g = 0.0);
        for i in 0..n {
            let zi = &z[i];
            let mut logit = coef[dim];
            for j in 0..dim {
                logit += coef[j] * zi[j];
            }
            let r = wn[i] * (sigmoid(logit) - target[i]);
            for j in 0..dim {
                grad[j] += r * zi[j];
            }
            grad[dim] += r;
        }
        for j in 0..dim {
            grad[j] += params.l2 * coef[j];
        }
        let (c1, c2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
        for j in 0..=dim {
            m1[j] = b1 * m1[j] + (1.0 - b1) * grad[j];
            m2[j] = b2 * m2[j] + (1.0 - b2) * grad[j] * grad[j];
            coef[j] -= params.lr * (m1[j] / c1) / ((m2[j] / c2).sqrt() + eps);
        }
    }
    LogisticHead {
        mean: mean.iter().map(|&v| v as f32).collect(),
        scale: scale.iter().map(|&v| v as f32).collect(),
        weights: coef[..dim].iter().map(|&v| v as f32).collect(),
        bias: coef[dim] as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separates_a_linearly_separable_set() {
        // Feature 0 carries the label, feature 1 is noise on another scale.
        let x: Vec<Vec<f32>> = (0..200)
            .map(|i| {
                let m = i % 2 == 0;
                vec![
                    if m { 1.0 } else { -1.0 } + (i % 7) as f32 * 0.01,
                    (i % 13) as f32 * 100.0,
                ]
            })
            .collect();
        let y: Vec<bool> = (0..200).map(|i| i % 2 == 0).collect();
        let w = vec![1.0; 200];
        let head = fit_logistic(&x, &y, &w, FitParams::default());
        head.validate(2).unwrap();
        for (row, &m) in x.iter().zip(&y) {
            let p = head.predict(row);
            assert_eq!(p >= 0.5, m, "p={p} for {row:?}");
        }
        assert!(head.weights[0].abs() > 5.0 * head.weights[1].abs());
    }

    #[test]
    fn row_weights_move_the_decision() {
        // Identical features, conflicting labels: the heavier label wins.
        let x = vec![vec![0.5f32]; 4];
        let y = vec![true, false, false, false];
        let equal = fit_logistic(&x, &y, &[1.0, 1.0, 1.0, 1.0], FitParams::default());
        let heavy = fit_logistic(&x, &y, &[9.0, 1.0, 1.0, 1.0], FitParams::default());
        assert!(equal.predict(&x[0]) < 0.5);
        assert!(heavy.predict(&x[0]) > 0.5);
        // Deterministic: the same inputs give the same head.
        assert_eq!(
            heavy,
            fit_logistic(&x, &y, &[9.0, 1.0, 1.0, 1.0], FitParams::default())
        );
    }

    #[test]
    fn wrong_dimension_scores_nan_so_the_scorer_fails_closed() {
        let head = LogisticHead {
            mean: vec![0.0],
            scale: vec![1.0],
            weights: vec![1.0],
            bias: 0.0,
        };
        assert!(head.predict(&[1.0, 2.0]).is_nan());
        assert!(head.validate(2).is_err());
    }
}
