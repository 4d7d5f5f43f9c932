//! Hidden states of chosen layers, read through llama.cpp's eval callback.
//!
//! llama.cpp names each layer's output tensor `l_out-{il}` (`il` counted from
//! 0) in every architecture's graph builder. Its `cb_eval` callback
//! (`ggml_backend_sched_eval_callback`) is asked, node by node, whether the
//! caller wants to see a tensor (`ask = true`); for a wanted tensor it is
//! called again once computed (`ask = false`) and may return `false` to end
//! the graph compute there (`ggml_backend_sched_compute_splits`). The
//! detector uses both: it copies the rows of the layers it reads and stops
//! the forward pass after the deepest one, so the layers above it and the
//! output projection are never computed.
//!
//! The safe `llama-cpp-2` wrapper does not expose `cb_eval`;
//! [`with_eval_callback`] sets it on the raw `llama_context_params` inside
//! [`LlamaContextParams`] (a single-field wrapper, checked at compile time and
//! at run time).

use std::ffi::{c_void, CStr};

use llama_cpp_2::context::params::LlamaContextParams;

use super::llama::{FeatureHead, Pooling};

/// What [`Capture`] collects from one layer's output over one decode.
#[derive(Debug, Clone, Default)]
pub struct LayerRows {
    /// Layer index (`il`, from 0).
    pub layer: u32,
    /// Hidden state of the last token of the decode, `n_embd` floats.
    pub last: Vec<f32>,
    /// Sum of the hidden states of the tokens in `mean_range`, `n_embd` floats.
    pub sum: Vec<f32>,
    /// Element-wise maximum of the same tokens' states, `n_embd` floats.
    pub max: Vec<f32>,
    /// How many tokens `sum` holds.
    pub count: usize,
    /// Tokens of this decode seen so far (several ubatches may feed one decode).
    seen: usize,
}

/// An early-exit rule: a second, shallower head that decides a window as
/// soon as its deepest layer is computed, when it is confident.
///
/// The idea is the early-exit classifier's (Kaya et al., "Shallow-Deep
/// Networks", ICML 2019; Xin et al., "DeeBERT", ACL 2020): most inputs are
/// easy, and a head on a middle layer already decides them; only the rest
/// pay for the deeper layers. `promptgate train --early-exit` fits the head
/// and chooses the two bounds on dev so that the exit changes few of the full
/// head's verdicts (see docs/detector.md).
pub struct ExitRule {
    /// Layers the exit head reads, a subset of the capture's, in the order
    /// of its feature vector.
    pub layers: Vec<u32>,
    /// Poolings of each layer, in the order of its feature vector.
    pub pooling: Vec<Pooling>,
    /// The exit head: features to P(malicious).
    pub head: Box<dyn FeatureHead>,
    /// Exit as benign when the exit head's P(malicious) is below this.
    pub benign_below: f64,
    /// Exit as malicious when the exit head's P(malicious) is above this.
    pub malicious_above: f64,
}

impl std::fmt::Debug for ExitRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitRule")
            .field("layers", &self.layers)
            .field("pooling", &self.pooling)
            .field("benign_below", &self.benign_below)
            .field("malicious_above", &self.malicious_above)
            .finish_non_exhaustive()
    }
}

/// The feature vector of `layers` x `pooling` from collected rows: for each
/// layer (in the given order) and each pooling, `n_embd` floats.
///
/// # Errors
/// The first layer with no rows (its tensor was not seen in the graph).
pub fn pooled(rows: &[LayerRows], layers: &[u32], pooling: &[Pooling]) -> Result<Vec<f32>, u32> {
    let mut out = Vec::new();
    for layer in layers {
        let r = rows
            .iter()
            .find(|r| r.layer == *layer)
            .filter(|r| !r.last.is_empty())
            .ok_or(*layer)?;
        for p in pooling {
            match p {
                Pooling::Last => out.extend_from_slice(&r.last),
                Pooling::Mean => {
                    let n = r.count.max(1) as f32;
                    out.extend(r.sum.iter().map(|v| v / n));
                }
                // No token in range (cannot happen for a non-empty window):
                // zeros, like the mean of nothing.
                Pooling::Max if r.count == 0 => out.extend(std::iter::repeat_n(0.0, r.sum.len())),
                Pooling::Max => out.extend_from_slice(&r.max),
            }
        }
    }
    Ok(out)
}

/// State shared with the eval callback during `llama_decode`.
///
/// Lives in a `Box` whose pointer is the callback's `user_data`; it must
/// outlive the context (see [`CaptureBox`]).
#[derive(Debug, Default)]
pub struct Capture {
    /// Names (`l_out-{il}`) of the wanted tensors, in layer order.
    names: Vec<String>,
    /// One entry per wanted layer, same order as `names`.
    pub rows: Vec<LayerRows>,
    /// Whether to copy rows in the current decode (false: only stop early).
    pub record: bool,
    /// Whether to stop after the deepest wanted layer. Off for decodes that
    /// need the logits (generation), on for feature decodes.
    pub stop_early: bool,
    /// Token indices of the current decode whose states are averaged.
    pub mean_range: std::ops::Range<usize>,
    /// Set once the deepest wanted layer was seen in the current decode.
    done: bool,
    /// Set if a wanted tensor had an unexpected type or shape.
    pub error: Option<String>,
    /// The early-exit rule, if the detector has one.
    pub exit: Option<ExitRule>,
    /// Whether the exit rule applies to the current decode (scoring, not
    /// feature extraction).
    exit_armed: bool,
    /// The exit head's P(malicious) when the current decode exited early.
    pub exited: Option<f64>,
}

impl Capture {
    /// A capture of `layers` (each `il` from 0).
    pub fn new(layers: &[u32]) -> Capture {
        let mut layers = layers.to_vec();
        layers.sort_unstable();
        layers.dedup();
        Capture {
            names: layers.iter().map(|l| format!("l_out-{l}")).collect(),
            rows: layers
                .iter()
                .map(|&layer| LayerRows {
                    layer,
                    ..LayerRows::default()
                })
                .collect(),
            record: false,
            stop_early: false,
            mean_range: 0..0,
            done: false,
            error: None,
            exit: None,
            exit_armed: false,
            exited: None,
        }
    }

    /// Clears the collected rows before a decode. `early_exit` arms the exit
    /// rule (if any) for this decode; it needs `record` and `stop_early`.
    pub fn begin(
        &mut self,
        record: bool,
        stop_early: bool,
        mean_range: std::ops::Range<usize>,
        early_exit: bool,
    ) {
        self.record = record;
        self.stop_early = stop_early && !self.names.is_empty();
        self.mean_range = mean_range;
        self.done = false;
        self.error = None;
        self.exit_armed = early_exit && record && self.stop_early && self.exit.is_some();
        self.exited = None;
        for r in &mut self.rows {
            r.last.clear();
            r.sum.clear();
            r.max.clear();
            r.count = 0;
            r.seen = 0;
        }
    }

    fn observe(&mut self, idx: usize, t: &llama_cpp_sys_2::ggml_tensor) {
        if t.type_ != llama_cpp_sys_2::GGML_TYPE_F32 {
            self.error = Some(format!("layer output has ggml type {}, not F32", t.type_));
            return;
        }
        let n_embd = usize::try_from(t.ne[0]).unwrap_or(0);
        let n_tokens = usize::try_from(t.ne[1]).unwrap_or(0);
        if n_embd == 0 || t.ne[2] != 1 || t.ne[3] != 1 || t.nb[0] != 4 {
            self.error = Some(format!("unexpected layer output shape {:?}", t.ne));
            return;
        }
        let mut data = vec![0f32; n_embd * n_tokens];
        let row_bytes = n_embd * 4;
        for tok in 0..n_tokens {
            // SAFETY: the tensor was just computed (ask = false); row `tok`
            // lies at offset nb[1] * tok and holds n_embd F32 values.
            unsafe {
                llama_cpp_sys_2::ggml_backend_tensor_get(
                    t,
                    data[tok * n_embd..].as_mut_ptr().cast::<c_void>(),
                    t.nb[1] * tok,
                    row_bytes,
                );
            }
        }
        let range = self.mean_range.clone();
        let rows = &mut self.rows[idx];
        if rows.sum.len() != n_embd {
            rows.sum = vec![0.0; n_embd];
            rows.max = vec![f32::NEG_INFINITY; n_embd];
        }
        for tok in 0..n_tokens {
            let global = rows.seen + tok;
            if range.contains(&global) {
                let row = &data[tok * n_embd..(tok + 1) * n_embd];
                for ((s, m), v) in rows.sum.iter_mut().zip(rows.max.iter_mut()).zip(row) {
                    *s += v;
                    *m = m.max(*v);
                }
                rows.count += 1;
            }
        }
        if n_tokens > 0 {
            rows.last = data[(n_tokens - 1) * n_embd..].to_vec();
        }
        rows.seen += n_tokens;
    }

    /// After layer `idx` was observed: the exit head's P(malicious) if `idx`
    /// is its deepest layer and it is confident, else `None`.
    fn exit_decision(&self, idx: usize) -> Option<f64> {
        let rule = self.exit.as_ref().filter(|_| self.exit_armed)?;
        let deepest = rule.layers.iter().max()?;
        if self.rows[idx].layer != *deepest {
            return None;
        }
        let x = pooled(&self.rows, &rule.layers, &rule.pooling).ok()?;
        let p = rule.head.predict(&x);
        (p < rule.benign_below || p > rule.malicious_above).then_some(p)
    }
}

/// The `cb_eval` callback. `user_data` is a `*mut Capture`.
///
/// # Safety
/// Called by ggml with a live tensor and the pointer given in
/// [`with_eval_callback`], on the thread running `llama_decode`.
unsafe extern "C" fn eval_callback(
    t: *mut llama_cpp_sys_2::ggml_tensor,
    ask: bool,
    user_data: *mut c_void,
) -> bool {
    if t.is_null() || user_data.is_null() {
        return false;
    }
    // SAFETY: user_data is the live Capture (see CaptureBox); no other
    // reference to it exists while llama_decode runs.
    let cap = unsafe { &mut *user_data.cast::<Capture>() };
    let tensor = unsafe { &*t };
    if cap.done {
        // Past the deepest wanted layer: ask for the first node of any later
        // split and stop there, so it computes one node, not its graph.
        return if ask { cap.stop_early } else { false };
    }
    let name = unsafe { CStr::from_ptr(tensor.name.as_ptr()) };
    let Ok(name) = name.to_str() else {
        return false;
    };
    let Some(idx) = cap.names.iter().position(|n| n == name) else {
        return false;
    };
    if ask {
        return cap.record || (cap.stop_early && idx + 1 == cap.names.len());
    }
    if cap.record {
        cap.observe(idx, tensor);
        if cap.error.is_none() {
            if let Some(p) = cap.exit_decision(idx) {
                cap.exited = Some(p);
                cap.done = true;
                return false;
            }
        }
    }
    if idx + 1 == cap.names.len() && cap.stop_early {
        cap.done = true;
        return false;
    }
    true
}

/// Owns a [`Capture`] at a stable address for the callback. Declare it after
/// the context in a struct so the context is dropped first.
pub struct CaptureBox(*mut Capture);

// SAFETY: the Capture is only touched by the thread that owns the scorer (and
// by llama.cpp's callback on that same thread, inside llama_decode).
unsafe impl Send for CaptureBox {}

impl CaptureBox {
    /// Boxes `capture`.
    pub fn new(capture: Capture) -> CaptureBox {
        CaptureBox(Box::into_raw(Box::new(capture)))
    }

    /// The raw pointer handed to llama.cpp.
    pub fn as_ptr(&self) -> *mut Capture {
        self.0
    }

    /// The capture, between decodes.
    pub fn get(&mut self) -> &mut Capture {
        // SAFETY: the pointer came from Box::into_raw and is freed only in Drop;
        // &mut self guarantees no decode is running on this scorer.
        unsafe { &mut *self.0 }
    }
}

impl Drop for CaptureBox {
    fn drop(&mut self) {
        // SAFETY: allocated by Box::into_raw in `new`, freed once.
        drop(unsafe { Box::from_raw(self.0) });
    }
}

const _: () = assert!(
    std::mem::size_of::<LlamaContextParams>()
        == std::mem::size_of::<llama_cpp_sys_2::llama_context_params>()
);

/// Sets llama.cpp's `cb_eval` to the capture callback on `params`.
///
/// # Errors
/// If the wrapper's layout is not the raw struct's (checked by a round trip
/// of `n_ctx` and `n_batch`): the crate version changed under us.
pub fn with_eval_callback(
    params: LlamaContextParams,
    capture: &CaptureBox,
) -> Result<LlamaContextParams, String> {
    let (n_ctx, n_batch) = (params.n_ctx(), params.n_batch());
    // SAFETY: LlamaContextParams is a struct with the raw params as its only
    // field (llama-cpp-2 0.1.160, `context/params.rs`); sizes are asserted
    // equal above and the fields are checked after the round trip.
    let mut raw: llama_cpp_sys_2::llama_context_params = unsafe { std::mem::transmute(params) };
    if raw.n_ctx != n_ctx.map_or(0, std::num::NonZeroU32::get) || raw.n_batch != n_batch {
        return Err("llama-cpp-2's LlamaContextParams layout is not the raw struct's".into());
    }
    raw.cb_eval = Some(eval_callback);
    raw.cb_eval_user_data = capture.as_ptr().cast::<c_void>();
    // SAFETY: as above, the inverse transmute.
    Ok(unsafe {
        std::mem::transmute::<llama_cpp_sys_2::llama_context_params, LlamaContextParams>(raw)
    })
}
