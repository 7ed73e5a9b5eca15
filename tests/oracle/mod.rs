//! The oracle check of issue 15: Pagoda's greedy tokens and logprobs against Hugging Face
//! transformers' (written by `scripts/gpu/oracle.py`), in the discipline of vLLM's
//! `check_logprobs_close`, with bounds derived from floating-point arithmetic before any
//! run. Shared by `tests/cuda_model.rs` (the GPU) and `tests/oracle_cpu.rs` (unit tests on
//! synthetic references, and the CPU reference backend's dry run of the whole flow).
//!
//! # The discipline
//! Both engines generate greedily (EOS ignored) from the same prompt ids, each on its own
//! history. For each prompt, position by position:
//! - while the tokens agree, Pagoda's logprob of the token must be within the bound
//!   `B(t)` of the reference's;
//! - at the first position where they differ, each engine's token must be among the
//!   other's top-5 (vLLM's rule), and the reference's token's logprob as Pagoda reports it
//!   (from its top-5) must be within `B(t)` of the reference's, so that a divergence is
//!   excused only at a near-tie that the arithmetic can explain. The comparison of that
//!   prompt stops there: the histories differ from then on.
//!
//! A failure prints the prompt, the position, both tokens, both top-5 lists and the bound.
//!
//! # The bound, derived before any run
//! An engine that stores a value `x` in a format of unit roundoff `u` (bf16, 8 significant
//! bits: `u = 2^-8`; f16: `2^-11`; f32: `2^-24`) stores `x(1 + d)` with `|d| <= u`. With
//! round to nearest, the error is spread evenly over +-ulp/2 and `ulp(x) <= 2u|x|`, so
//! `Var(x d) <= u^2 x^2 / 3`. Both engines accumulate dot products and the sums of RMSNorm
//! and softmax in f32; a sum of `n` terms adds at most `n` further f32 roundings of the
//! result's size (the random walk of the partial sums: variance `<= n u32^2 x^2 / 3`). Where
//! one sum scales a whole row (RMSNorm's mean of squares over `hidden` values, softmax's
//! denominator over `seq_len` keys), the row moves together, and by Cauchy-Schwarz its
//! effect is at most the row length times the elementwise one: reduction lengths
//! `hidden^2` and `seq_len^2`.
//!
//! To first order, the logprob `lp_t` of a chosen token moves by `sum_i (dlp_t/dx_i) x_i d_i`
//! over every stored value `x_i` of the forward pass (every layer, every earlier token's
//! K and V). The oracle computes, per class `c` of value ([`CLASSES`]) and position `t`,
//! `S_c(t)^2 = sum over x of class c of (dlp_t/dx * x)^2` by autograd through a float32
//! Llama forward pass: a property of the model and the token sequence, not of either
//! engine's error. Treating the `d_i` as independent (each engine rounds its own values;
//! where both round the same value the same way, the difference only shrinks), the
//! difference of engines A and B has variance
//!
//! ```text
//! sigma_t^2 = sum_c S_c(t)^2 [m_A(c) u_A^2 + m_B(c) u_B^2 + 2 n_c(t) u32^2] / 3  +  2 V u32^2 / 3
//! ```
//!
//! with `m_E(c)` the number of times engine E rounds a class-`c` value to its storage
//! format ([`Arithmetic`]: read from transformers' Llama code and Pagoda's kernels, at
//! the larger count wherever a path differs), `n_c(t)` the reduction length behind class
//! `c` ([`Shape::reduction_length`]), and the last term each engine's f32 log-softmax over
//! `V` positive terms. `B(t) = K sigma_t`, `K = 5`: a sum of thousands of independent,
//! bounded terms is close to Gaussian, whose two-sided tail beyond 5 sigma is 5.7e-7; over
//! the ~2,000 positions of a run a correct engine fails with probability ~1e-3. Each term
//! is taken at its upper end (`u^2/3` is the variance at the bottom of a binade; Pagoda is
//! counted as rounding every kernel output), so `B` leans wide.
//!
//! The same formula, with the reference against its own float32 run, checks the error
//! model itself ([`self_check`]): if transformers bf16 strays from float32 by more than
//! its own bound, the model of the arithmetic is wrong, and so is any verdict on Pagoda.

#![allow(clippy::needless_range_loop)] // positions index several parallel lists

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use pagoda_backend::Backend;
use pagoda_engine::{EngineConfig, GenerationRequest, LlmEngine, SamplingParams, TokenLogprob};
use pagoda_models::{LoadOptions, LoadedModel, ModelConfig, ModelFiles};
use serde::Deserialize;
use serde_json::{json, Value};

/// Standard deviations of the bound: see the module docs.
pub const K_SIGMA: f64 = 5.0;
/// bf16's unit roundoff: 8 significant bits.
pub const BF16_U: f64 = 1.0 / 256.0;
/// f16's unit roundoff: 11 significant bits.
pub const F16_U: f64 = 1.0 / 2048.0;
/// f32's unit roundoff: 24 significant bits. Every engine here accumulates in f32.
pub const F32_U: f64 = 1.0 / 16_777_216.0;

/// The classes of stored value the oracle reports sensitivities for, in its order
/// (scripts/gpu/oracle.py `CLASSES`).
pub const CLASSES: [&str; 19] = [
    "norm_hat",   // x * rsqrt(mean(x^2) + eps)
    "norm_out",   // ... times the norm's weight
    "q",          // the projections
    "k",          //
    "v",          //
    "rope_table", // cos and sin, one table shared by every layer
    "rope_mul",   // q * cos and rotate_half(q) * sin (and k's)
    "rope_out",   // their sum: q and k as attention reads them
    "scores",     // q.k / sqrt(head_dim)
    "probs",      // softmax of the scores
    "attn",       // P.V
    "o_proj",     // the output projection
    "residual",   // the residual stream after each add
    "gate",       //
    "up",         //
    "silu",       // silu(gate)
    "act",        // silu(gate) * up
    "down",       //
    "logits",     //
];

/// How one engine computes: its storage format's unit roundoff and how often it rounds
/// each class of value ([`CLASSES`] order) to that format. All accumulate in f32.
#[derive(Clone, Copy, Debug)]
pub struct Arithmetic {
    pub name: &'static str,
    pub unit_roundoff: f64,
    pub roundings: [u8; 19],
}

/// transformers' Llama in bfloat16 with SDPA (flash or memory-efficient), as
/// `modeling_llama.py` computes it: RMSNorm casts `x * rsqrt(var + eps)` to bf16, then
/// multiplies by the bf16 weight (2 roundings); `rotary_emb` casts cos/sin to bf16 once for
/// every layer; `apply_rotary_pos_emb` rounds `q * cos`, `rotate_half(q) * sin` and their sum;
/// SDPA keeps the scores and softmax in f32 and rounds P before P.V and its output; every
/// nn.Linear, the residual adds, `act_fn(gate)`, its product with `up` and the logits are
/// bf16 tensors.
pub const TRANSFORMERS_BF16: Arithmetic = Arithmetic {
    name: "transformers bf16",
    unit_roundoff: BF16_U,
    //          nh nout q  k  v  tbl mul out sc pr at o  res g  u  silu act d  logits
    roundings: [1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
};

/// Pagoda's CUDA kernels in bf16: each computes in f32 from bf16 inputs and rounds its
/// output once. RMSNorm's normalised row stays in f32 inside the norm (or the fused
/// norm+GEMV); the rotary table is f32; RoPE is fused with the cache write (one rounding of
/// q and k); attention keeps scores in f32 and rounds P to bf16 for the P.V mma in prefill;
/// `silu_and_mul` rounds only its product; logits are f32. Where a path skips a store (the
/// fused decode GEMVs never store the normed row, gate or up; the residual add folded into
/// the output and down projections never stores them alone), the larger count is kept.
pub const PAGODA_BF16: Arithmetic = Arithmetic {
    name: "Pagoda CUDA bf16",
    unit_roundoff: BF16_U,
    //          nh nout q  k  v  tbl mul out sc pr at o  res g  u  silu act d  logits
    roundings: [0, 1, 1, 1, 1, 0, 0, 1, 0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0],
};

/// The same kernels with f16 activations.
pub const PAGODA_F16: Arithmetic =
    Arithmetic { name: "Pagoda CUDA f16", unit_roundoff: F16_U, ..PAGODA_BF16 };

/// An engine that holds every intermediate value in f32: transformers float32 (eager
/// attention, TF32 off), the oracle's own float32 forward pass, the CPU reference backend.
pub const ALL_F32: Arithmetic = Arithmetic { name: "float32", unit_roundoff: F32_U, roundings: [1; 19] };
pub const TRANSFORMERS_F32: Arithmetic = Arithmetic { name: "transformers f32", ..ALL_F32 };
pub const PAGODA_CPU_F32: Arithmetic = Arithmetic { name: "Pagoda CPU f32", ..ALL_F32 };
pub const PROBED_F32: Arithmetic = Arithmetic { name: "oracle.py's float32 forward", ..ALL_F32 };

/// What the reduction lengths depend on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub hidden: usize,
    pub intermediate: usize,
    /// Query heads times head dim: the output projection's input.
    pub q_size: usize,
    pub head_dim: usize,
    pub vocab: usize,
}

impl Shape {
    pub fn of(c: &ModelConfig) -> Self {
        Self {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            q_size: c.q_size(),
            head_dim: c.head_dim,
            vocab: c.vocab_size,
        }
    }

    /// The number of f32 additions behind one value of `class` when the query sees
    /// `seq_len` keys (0 for elementwise values); row-wide factors count the row's length
    /// once more (see the module docs).
    pub fn reduction_length(&self, class: &str, seq_len: usize) -> f64 {
        let n = match class {
            "norm_hat" => self.hidden * self.hidden,
            "q" | "k" | "v" | "gate" | "up" | "logits" => self.hidden,
            "scores" => self.head_dim,
            "probs" => seq_len * seq_len,
            "attn" => seq_len,
            "o_proj" => self.q_size,
            "down" => self.intermediate,
            "norm_out" | "rope_table" | "rope_mul" | "rope_out" | "residual" | "silu" | "act" => 0,
            other => panic!("no reduction length for class {other}"),
        };
        n as f64
    }
}

/// `B(t)` for one position: `sens[c]` is `S_c(t)` in [`CLASSES`] order.
pub fn bound(sens: &[f64; 19], a: &Arithmetic, b: &Arithmetic, shape: &Shape, seq_len: usize) -> f64 {
    let mut var = 2.0 * shape.vocab as f64 * F32_U * F32_U / 3.0;
    for (i, class) in CLASSES.iter().enumerate() {
        let per_value = f64::from(a.roundings[i]) * a.unit_roundoff.powi(2)
            + f64::from(b.roundings[i]) * b.unit_roundoff.powi(2)
            + 2.0 * shape.reduction_length(class, seq_len) * F32_U * F32_U;
        var += sens[i] * sens[i] * per_value / 3.0;
    }
    K_SIGMA * var.sqrt()
}

// ------------------------------------------------------------------------------ the JSON

/// What `scripts/gpu/oracle.py` writes.
#[derive(Debug, Deserialize)]
pub struct OracleFile {
    pub model: String,
    pub vocab_size: usize,
    pub max_tokens: usize,
    pub top: usize,
    pub transformers: String,
    pub torch: String,
    pub device: String,
    pub classes: Vec<String>,
    pub checks: Vec<OracleCheck>,
}

/// One reference run: `bf16` (transformers bf16), `f16` (transformers f32 on the f16-rounded
/// weights) or `f32` (transformers f32).
#[derive(Debug, Deserialize)]
pub struct OracleCheck {
    pub name: String,
    pub reference: String,
    pub weights: String,
    pub prompts: Vec<ReferencePrompt>,
}

/// One prompt's reference generation.
#[derive(Clone, Debug, Deserialize)]
pub struct ReferencePrompt {
    pub prompt_ids: Vec<u32>,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f64>,
    pub top: Vec<Vec<(u32, f64)>>,
    /// The same tokens' logprobs from the oracle's float32 forward pass.
    pub exact_logprobs: Vec<f64>,
    /// `S_c(t)`: class name -> one value per position.
    pub sensitivity: BTreeMap<String, Vec<f64>>,
}

impl OracleFile {
    pub fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let file: Self = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(file.classes, CLASSES, "{}: the oracle's classes are not this test's", path.display());
        file
    }

    /// The file `PAGODA_ORACLE_JSON` names.
    pub fn from_env() -> Self {
        let path = std::env::var("PAGODA_ORACLE_JSON").expect(
            "PAGODA_ORACLE_JSON must name the JSON of scripts/gpu/oracle.py (scripts/gpu/session.sh oracle runs both)",
        );
        Self::read(Path::new(&path))
    }

    pub fn check(&self, name: &str) -> &OracleCheck {
        self.checks.iter().find(|c| c.name == name).unwrap_or_else(|| {
            let have: Vec<_> = self.checks.iter().map(|c| c.name.as_str()).collect();
            panic!("the oracle JSON has no {name} check (it has {have:?}); run oracle.py --checks {name}")
        })
    }
}

impl ReferencePrompt {
    /// `S_c(t)` of every class at position `t`.
    pub fn sensitivities(&self, t: usize) -> [f64; 19] {
        assert_eq!(
            self.sensitivity.len(),
            CLASSES.len(),
            "sensitivity classes {:?}",
            self.sensitivity.keys().collect::<Vec<_>>()
        );
        let mut out = [0.0; 19];
        for (o, class) in out.iter_mut().zip(CLASSES) {
            let values = self.sensitivity.get(class).unwrap_or_else(|| panic!("no sensitivity of {class}"));
            *o = values[t];
            assert!(o.is_finite() && *o >= 0.0, "sensitivity of {class} at {t}: {o}");
        }
        out
    }

    /// `B(t)` for every position of this prompt.
    pub fn bounds(&self, a: &Arithmetic, b: &Arithmetic, shape: &Shape) -> Vec<f64> {
        (0..self.tokens.len())
            .map(|t| bound(&self.sensitivities(t), a, b, shape, self.prompt_ids.len() + t))
            .collect()
    }
}

// ------------------------------------------------------------------------ the comparison

/// One engine's greedy generation with its logprobs.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineSeq {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f64>,
    pub top: Vec<Vec<(u32, f64)>>,
}

impl EngineSeq {
    pub fn from_logprobs(tokens: &[u32], logprobs: &[TokenLogprob]) -> Self {
        assert_eq!(tokens.len(), logprobs.len(), "one logprob per token");
        Self {
            tokens: tokens.to_vec(),
            logprobs: logprobs.iter().map(|l| f64::from(l.logprob)).collect(),
            top: logprobs.iter().map(|l| l.top.iter().map(|&(t, p)| (t, f64::from(p))).collect()).collect(),
        }
    }
}

/// The largest `|difference| / bound` seen in a prompt.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Margin {
    pub ratio: f64,
    pub position: usize,
    pub diff: f64,
    pub bound: f64,
}

/// The verdict on one prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptVerdict {
    pub prompt: usize,
    /// Positions whose logprobs were compared (the divergence position included).
    pub compared: usize,
    pub diverged_at: Option<usize>,
    pub worst: Margin,
    pub failure: Option<String>,
}

fn fmt_top(top: &[(u32, f64)]) -> String {
    let items: Vec<String> = top.iter().map(|(t, p)| format!("{t}:{p:.4}")).collect();
    format!("[{}]", items.join(", "))
}

/// Compares one prompt's generation by Pagoda (`got`) with the reference's, with `bounds[t]`
/// at position `t` (the module docs give the rules).
pub fn compare_prompt(
    prompt: usize,
    want: &ReferencePrompt,
    got: &EngineSeq,
    bounds: &[f64],
) -> PromptVerdict {
    let n = want.tokens.len();
    let mut v =
        PromptVerdict { prompt, compared: 0, diverged_at: None, worst: Margin::default(), failure: None };
    let fail = |t: usize, why: String| {
        format!(
            "prompt {prompt}, position {t}: {why}\n  Pagoda    token {:?} logprob {:?} top {}\n  reference token {} \
             logprob {:.5} top {}\n  bound {:.5}",
            got.tokens.get(t),
            got.logprobs.get(t),
            got.top.get(t).map_or("[]".into(), |x| fmt_top(x)),
            want.tokens[t],
            want.logprobs[t],
            fmt_top(&want.top[t]),
            bounds[t],
        )
    };
    for t in 0..n {
        if t >= got.tokens.len() {
            v.failure = Some(fail(
                t,
                format!("Pagoda stopped after {} tokens, the reference made {n}", got.tokens.len()),
            ));
            return v;
        }
        let (r, p) = (want.tokens[t], got.tokens[t]);
        let pagoda_lp_of_r = if r == p {
            got.logprobs[t]
        } else {
            let in_ref = want.top[t].iter().any(|&(id, _)| id == p);
            let in_pagoda = got.top[t].iter().find(|&&(id, _)| id == r);
            match (in_ref, in_pagoda) {
                (true, Some(&(_, lp))) => lp,
                (in_ref, in_pagoda) => {
                    let mut why = String::from("the tokens differ and");
                    if !in_ref {
                        why += &format!(
                            " Pagoda's token {p} is not in the reference's top-{}",
                            want.top[t].len()
                        );
                    }
                    if in_pagoda.is_none() {
                        if !in_ref {
                            why += " and";
                        }
                        why += &format!(
                            " the reference's token {r} is not in Pagoda's top-{}",
                            got.top[t].len()
                        );
                    }
                    v.compared = t + 1;
                    v.diverged_at = Some(t);
                    v.failure = Some(fail(t, why));
                    return v;
                }
            }
        };
        let diff = (pagoda_lp_of_r - want.logprobs[t]).abs();
        let ratio = diff / bounds[t];
        v.compared = t + 1;
        if ratio > v.worst.ratio || ratio.is_nan() {
            v.worst = Margin { ratio, position: t, diff, bound: bounds[t] };
        }
        if diff > bounds[t] || diff.is_nan() {
            let what = if r == p { "the same token" } else { "at the divergence, the reference's token" };
            v.failure = Some(fail(
                t,
                format!(
                    "{what} {r}: Pagoda's logprob {pagoda_lp_of_r:.5} differs from the reference's by {diff:.5}, \
                     more than the bound {:.5}",
                    bounds[t]
                ),
            ));
            if r != p {
                v.diverged_at = Some(t);
            }
            return v;
        }
        if r != p {
            v.diverged_at = Some(t);
            return v;
        }
    }
    v
}

/// The verdict on one check (every prompt), with what the report prints.
#[derive(Clone, Debug)]
pub struct CheckVerdict {
    pub label: String,
    pub prompts: Vec<PromptVerdict>,
    pub max_tokens: usize,
}

impl CheckVerdict {
    pub fn passed(&self) -> bool {
        self.prompts.iter().all(|p| p.failure.is_none())
    }

    pub fn worst(&self) -> (usize, Margin) {
        self.prompts.iter().map(|p| (p.prompt, p.worst)).fold((0, Margin::default()), |best, x| {
            if x.1.ratio > best.1.ratio {
                x
            } else {
                best
            }
        })
    }

    pub fn failures(&self) -> Vec<&str> {
        self.prompts.iter().filter_map(|p| p.failure.as_deref()).collect()
    }

    /// One line per prompt, then the totals.
    pub fn report(&self) -> String {
        let mut s = format!(
            "{}\n  prompt  compared  diverged  worst |dlp|/bound  (position: |dlp| vs bound)\n",
            self.label
        );
        for p in &self.prompts {
            let _ = writeln!(
                s,
                "  {:>6}  {:>8}  {:>8}  {:>17.3}  ({}: {:.2e} vs {:.2e}){}",
                p.prompt,
                p.compared,
                p.diverged_at.map_or("-".into(), |t| t.to_string()),
                p.worst.ratio,
                p.worst.position,
                p.worst.diff,
                p.worst.bound,
                if p.failure.is_some() { "  FAIL" } else { "" }
            );
        }
        let compared: usize = self.prompts.iter().map(|p| p.compared).sum();
        let whole = self.prompts.iter().filter(|p| p.diverged_at.is_none() && p.failure.is_none()).count();
        let (wp, w) = self.worst();
        let _ = writeln!(
            s,
            "  {}: {} prompts, {compared} positions compared, {whole} identical for all {} tokens, worst margin \
             {:.3} (prompt {wp}, position {}: |dlp| {:.2e}, bound {:.2e})",
            if self.passed() { "PASS" } else { "FAIL" },
            self.prompts.len(),
            self.max_tokens,
            w.ratio,
            w.position,
            w.diff,
            w.bound
        );
        for f in self.failures() {
            let _ = writeln!(s, "  {f}");
        }
        s
    }

    pub fn summary_json(&self) -> Value {
        let (wp, w) = self.worst();
        json!({
            "label": self.label,
            "passed": self.passed(),
            "prompts": self.prompts.len(),
            "positions_compared": self.prompts.iter().map(|p| p.compared).sum::<usize>(),
            "identical_prompts": self.prompts.iter().filter(|p| p.diverged_at.is_none() && p.failure.is_none()).count(),
            "worst_margin": { "ratio": w.ratio, "prompt": wp, "position": w.position, "abs_diff": w.diff, "bound": w.bound },
            "per_prompt": self.prompts.iter().map(|p| json!({
                "prompt": p.prompt, "compared": p.compared, "diverged_at": p.diverged_at,
                "worst_ratio": p.worst.ratio, "worst_position": p.worst.position,
                "worst_abs_diff": p.worst.diff, "bound_there": p.worst.bound, "failure": p.failure,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Compares Pagoda's generations (one per prompt, in order) with a reference check.
pub fn compare_check(
    label: impl Into<String>,
    reference: &OracleCheck,
    got: &[EngineSeq],
    pagoda: &Arithmetic,
    transformers: &Arithmetic,
    shape: &Shape,
) -> CheckVerdict {
    assert_eq!(got.len(), reference.prompts.len(), "one Pagoda generation per reference prompt");
    let prompts = reference
        .prompts
        .iter()
        .zip(got)
        .enumerate()
        .map(|(i, (want, got))| compare_prompt(i, want, got, &want.bounds(pagoda, transformers, shape)))
        .collect();
    let max_tokens = reference.prompts.first().map_or(0, |p| p.tokens.len());
    CheckVerdict { label: label.into(), prompts, max_tokens }
}

/// The error model's own test: the reference's logprobs against the oracle's float32 forward
/// pass on the same tokens, every position, with the reference's arithmetic against f32's.
pub fn self_check(reference: &OracleCheck, transformers: &Arithmetic, shape: &Shape) -> CheckVerdict {
    let exact: Vec<EngineSeq> = reference
        .prompts
        .iter()
        .map(|p| EngineSeq {
            tokens: p.tokens.clone(),
            logprobs: p.exact_logprobs.clone(),
            top: p.top.clone(),
        })
        .collect();
    compare_check(
        format!("self-check: {} against the oracle's float32 forward pass", reference.reference),
        reference,
        &exact,
        &PROBED_F32,
        transformers,
        shape,
    )
}

/// Writes `value` as `name` into the folder `PAGODA_ORACLE_REPORT` names, if it is set.
pub fn write_report(name: &str, value: &Value) {
    if let Ok(dir) = std::env::var("PAGODA_ORACLE_REPORT") {
        let path = Path::new(&dir).join(name);
        std::fs::create_dir_all(&dir).expect("report folder");
        std::fs::write(&path, serde_json::to_string_pretty(value).expect("json")).expect("write report");
        println!("wrote {}", path.display());
    }
}

// --------------------------------------------------------------------------- running Pagoda

/// The planted fault: `PAGODA_ORACLE_FAULT_ROPE=F` multiplies the model's `rope_theta` by
/// `F` (read only by these tests), so the check can be seen to fail.
pub fn rope_fault_from_env() -> Option<f64> {
    let v = std::env::var("PAGODA_ORACLE_FAULT_ROPE").ok()?;
    let f: f64 = v.parse().unwrap_or_else(|_| panic!("PAGODA_ORACLE_FAULT_ROPE={v}: not a number"));
    println!("PLANTED FAULT: rope_theta multiplied by {f}; the check is expected to FAIL");
    Some(f)
}

/// Loads `model` on `backend` (its `rope_theta` times `rope_fault`, if given), generates
/// `max_tokens` greedy tokens (EOS ignored) with `top` logprobs from every prompt in one
/// batch, and returns them with the model's shape.
pub fn pagoda_greedy<B: Backend>(
    backend: B,
    model: &Path,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    top: usize,
    config: EngineConfig,
    rope_fault: Option<f64>,
) -> (Vec<EngineSeq>, Shape) {
    let mut files = ModelFiles::open(model).unwrap_or_else(|e| panic!("{}: {e}", model.display()));
    if let Some(f) = rope_fault {
        files.config.rope_theta *= f;
    }
    let shape = Shape::of(&files.config);
    config.check_max_model_len(&files.config).expect("max model len");
    let options =
        LoadOptions { max_positions: Some(config.max_model_len(&files.config)), ..Default::default() };
    let weights = files.load_model(&backend, &options, &mut |_, _| {}).expect("load the model");
    let loaded = LoadedModel {
        source: files.source,
        model: weights,
        tokenizer: files.tokenizer,
        chat_template: files.chat_template,
        generation: files.generation,
    };
    let mut engine = LlmEngine::new(backend, loaded, config).expect("engine");
    let requests = prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let mut r = GenerationRequest::new(format!("oracle{i}"), prompt.clone());
            r.sampling = SamplingParams { logprobs: Some(top as u32), ..SamplingParams::greedy() };
            r.max_tokens = Some(max_tokens);
            r.ignore_eos = true;
            r.detokenize = false;
            r
        })
        .collect();
    let done = engine.generate(requests).expect("generate");
    let seqs =
        done.iter().map(|r| EngineSeq::from_logprobs(&r.seqs[0].token_ids, &r.seqs[0].logprobs)).collect();
    (seqs, shape)
}

/// The prompt ids of a reference check.
pub fn prompt_ids(check: &OracleCheck) -> Vec<Vec<u32>> {
    check.prompts.iter().map(|p| p.prompt_ids.clone()).collect()
}
