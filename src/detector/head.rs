//! The classifier head on frozen hidden-state features: L2-regularised
//! logistic regression on standardised features, optionally through one ReLU
//! hidden layer (a small MLP).
//!
//! The logistic head is fit by full-batch Adam (deterministic: no sampling,
//! fixed order), with per-row weights so that every (source, label) group and
//! both classes carry the weight the caller chose. P(malicious) =
//! sigmoid(w · z + b) with z = (x - mean) / scale. With a hidden layer,
//! P(malicious) = sigmoid(w · relu(W z + c) + b), fit by mini-batch Adam
//! ([`fit_mlp`], the recipe of scikit-learn's `MLPClassifier`: Glorot-uniform
//! initialisation, Adam at 1e-3, batches of 200), seeded and deterministic.

use serde::{Deserialize, Serialize};

use crate::engine::llama::FeatureHead;

/// A fitted head: logistic regression on the standardised features, or on
/// the ReLU outputs of one hidden layer over them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogisticHead {
    /// Per-feature mean of the training rows (`dim` floats).
    pub mean: Vec<f32>,
    /// Per-feature standard deviation of the training rows, floored at 1e-6.
    pub scale: Vec<f32>,
    /// Output weights: on the standardised features (`dim` floats), or on
    /// the hidden layer's outputs (`units` floats) when there is one.
    pub weights: Vec<f32>,
    /// Output intercept.
    pub bias: f32,
    /// The optional hidden layer. Files without it hold a plain logistic
    /// regression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<HiddenLayer>,
}

/// One fully connected ReLU layer between the standardised features and the
/// logistic output: `h = relu(W z + c)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiddenLayer {
    /// `W`: `units × dim` floats, row-major (row k is unit k's weights on z).
    /// In the file, the base64 of those floats as little-endian f32 (exact,
    /// and a quarter of the size of decimal numbers); a JSON array of numbers
    /// is read as well.
    #[serde(with = "f32_base64")]
    pub weights: Vec<f32>,
    /// `c`: `units` floats.
    pub bias: Vec<f32>,
}

/// Serde for a long `Vec<f32>` as base64 of little-endian f32 (written), or a
/// string of that form or an array of numbers (read).
mod f32_base64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Base64(String),
        Numbers(Vec<f32>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        match Form::deserialize(d)? {
            Form::Numbers(v) => Ok(v),
            Form::Base64(s) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(s.as_bytes())
                    .map_err(serde::de::Error::custom)?;
                if bytes.len() % 4 != 0 {
                    return Err(serde::de::Error::custom(format!(
                        "{} bytes of base64 f32 weights, not a multiple of 4",
                        bytes.len()
                    )));
                }
                Ok(bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            }
        }
    }
}

impl LogisticHead {
    /// Feature dimension (floats per feature vector).
    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// Hidden units (0 for a plain logistic regression).
    pub fn units(&self) -> usize {
        self.hidden.as_ref().map_or(0, |h| h.bias.len())
    }

    /// The output logit of one feature vector: w · z + b, or
    /// w · relu(W z + c) + b with a hidden layer.
    pub fn logit(&self, x: &[f32]) -> f64 {
        match &self.hidden {
            None => {
                let mut acc = f64::from(self.bias);
                for (((&v, &m), &s), &w) in
                    x.iter().zip(&self.mean).zip(&self.scale).zip(&self.weights)
                {
                    acc += f64::from(w) * f64::from((v - m) / s);
                }
                acc
            }
            Some(h) => {
                let z: Vec<f32> = x
                    .iter()
                    .zip(&self.mean)
                    .zip(&self.scale)
                    .map(|((&v, &m), &s)| (v - m) / s)
                    .collect();
                let dim = z.len();
                let mut acc = f64::from(self.bias);
                for (k, (&c, &w)) in h.bias.iter().zip(&self.weights).enumerate() {
                    let a = dot(&h.weights[k * dim..(k + 1) * dim], &z) + c;
                    if a > 0.0 {
                        acc += f64::from(w) * f64::from(a);
                    }
                }
                acc
            }
        }
    }

    /// Checks the vectors agree in length and hold finite numbers.
    ///
    /// # Errors
    /// A message naming the first problem.
    pub fn validate(&self, dim: usize) -> Result<(), String> {
        let outputs = match &self.hidden {
            None => dim,
            Some(h) => h.bias.len(),
        };
        if self.weights.len() != outputs || self.mean.len() != dim || self.scale.len() != dim {
            return Err(format!(
                "head has {} weights, {} means and {} scales; they must have {outputs}, {dim} and {dim}",
                self.weights.len(),
                self.mean.len(),
                self.scale.len()
            ));
        }
        if let Some(h) = &self.hidden {
            if h.bias.is_empty() || h.weights.len() != h.bias.len() * dim {
                return Err(format!(
                    "hidden layer has {} weights and {} biases; it needs units x {dim} weights and units >= 1 biases",
                    h.weights.len(),
                    h.bias.len()
                ));
            }
        }
        let hidden = self
            .hidden
            .iter()
            .flat_map(|h| h.weights.iter().chain(&h.bias));
        let mut all = (self.weights.iter())
            .chain(&self.mean)
            .chain(&self.scale)
            .chain(hidden)
            .chain([&self.bias]);
        if !all.all(|x| x.is_finite()) {
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
        if features.len() != self.dim() {
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
    let (mean, scale) = standardisation(x, w);
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
        hidden: None,
    }
}

/// Weighted per-feature mean and standard deviation (floored at 1e-6).
fn standardisation(x: &[Vec<f32>], w: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let dim = x[0].len();
    let wsum: f64 = w.iter().sum();
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
    let scale = var.iter().map(|v| (v / wsum).sqrt().max(1e-6)).collect();
    (mean, scale)
}

/// Dot product of two equal-length slices, in eight independent lanes (so
/// the compiler vectorises it).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Settings of [`fit_mlp`].
#[derive(Debug, Clone, Copy)]
pub struct MlpParams {
    /// Hidden units.
    pub units: usize,
    /// L2 penalty λ on both weight matrices (not the biases): loss = weighted
    /// mean cross-entropy of the batch + λ/2 · (‖W‖² + ‖w‖²). scikit-learn's
    /// `alpha` is λ times its batch size (λ = 5e-4 is its alpha 0.1 at 200).
    pub l2: f64,
    /// Passes over the rows.
    pub epochs: usize,
    /// Adam learning rate at the first step; it decays linearly to 0 at the
    /// last.
    pub lr: f64,
    /// Rows per Adam step.
    pub batch: usize,
    /// Seed of the initial weights and of each epoch's row order.
    pub seed: u64,
}

impl Default for MlpParams {
    fn default() -> Self {
        MlpParams {
            units: 256,
            l2: 5e-4,
            epochs: 20,
            lr: 1e-3,
            batch: 200,
            seed: 42,
        }
    }
}

/// A batch is cut into this many slices, computed on as many threads and
/// summed in order: a fixed count, so the fit is the same on any machine.
const MLP_SLICES: usize = 4;

/// Gradient of one slice of a batch.
struct MlpGrad {
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: f32,
}

/// Fits a head with one ReLU hidden layer on rows `x` (each `dim` floats),
/// labels `y` (`true` = malicious) and row weights `w` (any positive scale;
/// normalised to mean 1), by mini-batch Adam. Deterministic for a seed.
///
/// # Panics
/// If the slices differ in length, `x` is empty or `params.units` is 0.
pub fn fit_mlp(x: &[Vec<f32>], y: &[bool], w: &[f64], params: MlpParams) -> LogisticHead {
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    assert!(!x.is_empty() && x.len() == y.len() && y.len() == w.len() && params.units > 0);
    let n = x.len();
    let dim = x[0].len();
    let units = params.units;
    let (mean, scale) = standardisation(x, w);
    let z: Vec<f32> = x
        .iter()
        .flat_map(|row| {
            row.iter()
                .zip(&mean)
                .zip(&scale)
                .map(|((&v, m), s)| ((f64::from(v) - m) / s) as f32)
        })
        .collect();
    let wsum: f64 = w.iter().sum();
    let wn: Vec<f32> = w.iter().map(|wi| (wi * n as f64 / wsum) as f32).collect();
    let target: Vec<f32> = y.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(params.seed);
    let bound1 = (6.0 / (dim + units) as f64).sqrt() as f32;
    let bound2 = (6.0 / (units + 1) as f64).sqrt() as f32;
    let mut w1: Vec<f32> = (0..units * dim)
        .map(|_| rng.gen_range(-bound1..bound1))
        .collect();
    let mut b1 = vec![0f32; units];
    let mut w2: Vec<f32> = (0..units).map(|_| rng.gen_range(-bound2..bound2)).collect();
    let mut b2 = 0f32;
    // Adam moments, in the order w1, b1, w2, b2.
    let mut m = vec![0f32; units * dim + 2 * units + 1];
    let mut v = m.clone();
    let (beta1, beta2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    let lr = params.lr as f32;
    let l2 = params.l2 as f32;
    let mut grads: Vec<MlpGrad> = (0..MLP_SLICES)
        .map(|_| MlpGrad {
            w1: vec![0.0; units * dim],
            b1: vec![0.0; units],
            w2: vec![0.0; units],
            b2: 0.0,
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    let total_steps = (params.epochs * n.div_ceil(params.batch.max(1))).max(1) as f32;
    let mut t = 0i32;
    for _ in 0..params.epochs {
        order.shuffle(&mut rng);
        for batch in order.chunks(params.batch.max(1)) {
            let per = batch.len().div_ceil(MLP_SLICES);
            std::thread::scope(|s| {
                for (g, rows) in grads
                    .iter_mut()
                    .zip(batch.chunks(per.max(1)).chain(std::iter::repeat(&[][..])))
                {
                    let (w1, b1, w2, b2) = (&w1, &b1, &w2, b2);
                    let (z, wn, target) = (&z, &wn, &target);
                    s.spawn(move || {
                        g.w1.iter_mut().for_each(|x| *x = 0.0);
                        g.b1.iter_mut().for_each(|x| *x = 0.0);
                        g.w2.iter_mut().for_each(|x| *x = 0.0);
                        g.b2 = 0.0;
                        let mut h = vec![0f32; units];
                        for &i in rows {
                            let zi = &z[i * dim..(i + 1) * dim];
                            let mut o = b2;
                            for k in 0..units {
                                let a = dot(&w1[k * dim..(k + 1) * dim], zi) + b1[k];
                                h[k] = a.max(0.0);
                                o += w2[k] * h[k];
                            }
                            let p = 1.0 / (1.0 + (-o).exp());
                            let r = wn[i] * (p - target[i]);
                            g.b2 += r;
                            for k in 0..units {
                                g.w2[k] += r * h[k];
                                if h[k] > 0.0 {
                                    let d = r * w2[k];
                                    g.b1[k] += d;
                                    for (gw, &zv) in g.w1[k * dim..(k + 1) * dim].iter_mut().zip(zi)
                                    {
                                        *gw += d * zv;
                                    }
                                }
                            }
                        }
                    });
                }
            });
            let (first, rest) = grads.split_first_mut().expect("slices");
            for g in rest.iter() {
                first.w1.iter_mut().zip(&g.w1).for_each(|(a, b)| *a += b);
                first.b1.iter_mut().zip(&g.b1).for_each(|(a, b)| *a += b);
                first.w2.iter_mut().zip(&g.w2).for_each(|(a, b)| *a += b);
                first.b2 += g.b2;
            }
            let inv = 1.0 / batch.len() as f32;
            // Linear decay of the rate to 0 over the run, so the last
            // epochs settle instead of ending on one noisy batch's step.
            let lr = lr * (1.0 - t as f32 / total_steps);
            t += 1;
            let (c1, c2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
            let mut update = |p: &mut f32, g: f32, j: usize| {
                m[j] = beta1 * m[j] + (1.0 - beta1) * g;
                v[j] = beta2 * v[j] + (1.0 - beta2) * g * g;
                *p -= lr * (m[j] / c1) / ((v[j] / c2).sqrt() + eps);
            };
            let mut j = 0;
            for (p, &g) in w1.iter_mut().zip(&first.w1) {
                let g = g * inv + l2 * *p;
                update(p, g, j);
                j += 1;
            }
            for (p, &g) in b1.iter_mut().zip(&first.b1) {
                update(p, g * inv, j);
                j += 1;
            }
            for (p, &g) in w2.iter_mut().zip(&first.w2) {
                let g = g * inv + l2 * *p;
                update(p, g, j);
                j += 1;
            }
            update(&mut b2, first.b2 * inv, j);
        }
    }
    LogisticHead {
        mean: mean.iter().map(|&v| v as f32).collect(),
        scale: scale.iter().map(|&v| v as f32).collect(),
        weights: w2,
        bias: b2,
        hidden: Some(HiddenLayer {
            weights: w1,
            bias: b1,
        }),
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
    fn hidden_layer_fits_what_a_logistic_head_cannot() {
        // XOR of the signs of two features: no linear boundary separates it.
        let x: Vec<Vec<f32>> = (0..400)
            .map(|i| {
                let a = if i % 2 == 0 { 1.0 } else { -1.0 };
                let b = if (i / 2) % 2 == 0 { 1.0 } else { -1.0 };
                vec![a + (i % 5) as f32 * 0.05, b - (i % 3) as f32 * 0.05]
            })
            .collect();
        let y: Vec<bool> = x.iter().map(|r| (r[0] > 0.0) != (r[1] > 0.0)).collect();
        let w = vec![1.0; x.len()];
        let right = |h: &LogisticHead| {
            x.iter()
                .zip(&y)
                .filter(|(r, &m)| (h.predict(r) >= 0.5) == m)
                .count()
        };
        let linear = fit_logistic(&x, &y, &w, FitParams::default());
        assert!(
            right(&linear) <= 300,
            "logistic got {} of 400",
            right(&linear)
        );
        let params = MlpParams {
            units: 8,
            l2: 1e-4,
            epochs: 200,
            lr: 1e-2,
            batch: 32,
            seed: 7,
        };
        let mlp = fit_mlp(&x, &y, &w, params);
        mlp.validate(2).unwrap();
        assert_eq!(mlp.units(), 8);
        assert_eq!(right(&mlp), 400);
        // Deterministic for a seed; another seed starts elsewhere.
        assert_eq!(mlp, fit_mlp(&x, &y, &w, params));
        assert_ne!(mlp, fit_mlp(&x, &y, &w, MlpParams { seed: 8, ..params }));
        // A file that round-trips keeps its scores; a bad shape is refused.
        let json = serde_json::to_value(&mlp).unwrap();
        assert!(json["hidden"]["weights"].is_string(), "{json}");
        let back: LogisticHead = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, mlp);
        // The same weights as an array of numbers read the same.
        let mut numbers = json;
        numbers["hidden"]["weights"] = serde_json::json!(mlp.hidden.as_ref().unwrap().weights);
        assert_eq!(
            serde_json::from_value::<LogisticHead>(numbers).unwrap(),
            mlp
        );
        let mut bad = mlp.clone();
        bad.hidden.as_mut().unwrap().weights.pop();
        assert!(bad.validate(2).unwrap_err().contains("hidden layer"));
    }

    #[test]
    fn wrong_dimension_scores_nan_so_the_scorer_fails_closed() {
        let head = LogisticHead {
            mean: vec![0.0],
            scale: vec![1.0],
            weights: vec![1.0],
            bias: 0.0,
            hidden: None,
        };
        assert!(head.predict(&[1.0, 2.0]).is_nan());
        assert!(head.validate(2).is_err());
    }
}
