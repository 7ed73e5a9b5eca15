//! sample: greedy tokens must match; seeded tokens must match unless the
//! reference's own decision was within float noise; logprobs within tolerance.

use std::cmp::Ordering;

use pagoda_backend::{Backend, DType, HostSlice};
use pagoda_sampler::{apply_penalties, log_softmax, uniform, SamplingRow, TokenId};

use crate::conformance::grid::SampleCase;
use crate::conformance::{cpu, dev, CheckResult, Harness};

/// Whether float rounding could make a faithful sampler pick `other` instead
/// of the reference's `chosen` for this row: their probabilities are within
/// `band` of the largest, or the draw is within `band` of the kept mass from
/// `other`'s interval of the inverse CDF (or from the top-p cut-off, when
/// `other` is the first token it dropped).
fn ambiguous(logits: &[f32], row: &SamplingRow<'_>, chosen: TokenId, other: TokenId, band: f64) -> bool {
    let p = row.params;
    let mut pen = logits.to_vec();
    apply_penalties(&mut pen, row);
    let max = pen.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(TokenId, f64)> = pen
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as TokenId, ((x as f64 - max) / p.temperature as f64).exp()))
        .collect();
    let total: f64 = probs.iter().map(|e| e.1).sum();
    probs.iter_mut().for_each(|e| e.1 /= total);
    probs.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal).then(a.0.cmp(&b.0)));
    let prob_of = |t: TokenId| probs.iter().find(|e| e.0 == t).map_or(0.0, |e| e.1);
    if (prob_of(chosen) - prob_of(other)).abs() <= band * probs[0].1 {
        return true;
    }
    // The kept prefix, as the reference truncates it.
    let mut keep = probs.len();
    if p.top_k > 0 {
        keep = keep.min(p.top_k as usize);
    }
    let mut top_p_edge = None;
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        for (i, e) in probs[..keep].iter().enumerate() {
            cum += e.1;
            if cum >= p.top_p as f64 {
                keep = i + 1;
                top_p_edge = Some(cum);
                break;
            }
        }
    }
    if p.min_p > 0.0 {
        let threshold = probs[0].1 * p.min_p as f64;
        keep = probs[..keep].iter().take_while(|e| e.1 >= threshold).count().max(1);
    }
    let Some(position) = probs.iter().position(|e| e.0 == other) else { return false };
    if position >= keep {
        // Dropped: excusable only right at the top-p cut-off.
        return position == keep && top_p_edge.is_some_and(|cum| (cum - p.top_p as f64).abs() <= band);
    }
    let mass: f64 = probs[..keep].iter().map(|e| e.1).sum();
    let target = uniform(row.seed, row.step) as f64 * mass;
    let start: f64 = probs[..position].iter().map(|e| e.1).sum();
    let end = start + probs[position].1;
    let distance = if target < start { start - target } else { (target - end).max(0.0) };
    distance <= band * mass
}

pub(crate) fn run<B: Backend>(h: &mut Harness<'_, B>, cases: &[SampleCase]) {
    for c in cases {
        let label = c.label();
        h.case("sample", &label, |h, rng| {
            if c.params.is_empty() || c.vocab == 0 {
                return Err("grid case: no params or empty vocabulary".into());
            }
            let (m, v) = (c.rows, c.vocab);
            let dtype = if c.f32_logits { DType::F32 } else { h.dtype };
            let logits = rng.normals(m * v, c.logit_scale, dtype);
            let logits_r = cpu(h.cpu.upload(HostSlice::F32(&logits), &[m, v], DType::F32))?;
            let logits_d = dev(h.device.upload(HostSlice::F32(&logits), &[m, v], dtype))?;
            // Histories that hit likely tokens, so penalties change the outcome.
            let mut histories = Vec::with_capacity(m);
            for i in 0..m {
                let row = &logits[i * v..(i + 1) * v];
                let best = (0..v).max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a))).unwrap_or(0);
                let draw = |rng: &mut crate::conformance::random::CaseRng, j: usize| {
                    if j % 3 == 0 {
                        best as TokenId
                    } else {
                        rng.below(v) as TokenId
                    }
                };
                let prompt: Vec<TokenId> = (0..c.history).map(|j| draw(rng, j + 1)).collect();
                let output: Vec<TokenId> = (0..c.history).map(|j| draw(rng, j)).collect();
                histories.push((prompt, output, rng.next_u64(), rng.below(10_000) as u64));
            }
            let rows: Vec<SamplingRow<'_>> = histories
                .iter()
                .enumerate()
                .map(|(i, (prompt, output, seed, step))| SamplingRow {
                    params: &c.params[i % c.params.len()],
                    seed: *seed,
                    step: *step,
                    prompt_tokens: prompt,
                    output_tokens: output,
                    allowed_tokens: None,
                })
                .collect();
            let want = cpu(h.cpu.sample(&logits_r, &rows))?;
            let got = dev(h.device.sample(&logits_d, &rows))?;
            if got.len() != m {
                return Err(format!("device returned {} tokens for {m} rows", got.len()));
            }

            let (mut wrong, mut excused, mut logprob_err, mut bad_ids) = (0usize, 0usize, 0.0f64, 0usize);
            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                let row_logits = &logits[i * v..(i + 1) * v];
                let row = &rows[i];
                if g.token as usize >= v {
                    wrong += 1;
                    continue;
                }
                if w.token != g.token {
                    let band = h.tol.sampling_ambiguity;
                    if !row.params.is_greedy() && ambiguous(row_logits, row, w.token, g.token, band) {
                        excused += 1;
                    } else {
                        wrong += 1;
                    }
                }
                // The returned logprob is the device token's raw log-softmax.
                let raw = log_softmax(row_logits);
                logprob_err = logprob_err.max((g.logprob as f64 - raw[g.token as usize] as f64).abs());
                if g.top_logprobs.len() != w.top_logprobs.len() {
                    bad_ids += 1;
                    continue;
                }
                for (&(wt, wl), &(gt, gl)) in w.top_logprobs.iter().zip(&g.top_logprobs) {
                    logprob_err = logprob_err.max((gl as f64 - wl as f64).abs());
                    // Another id at this rank is fine only if it is (nearly) tied.
                    let tied =
                        (gt as usize) < v && (raw[gt as usize] as f64 - wl as f64).abs() <= h.tol.logprob;
                    if wt != gt && !tied {
                        bad_ids += 1;
                    }
                }
            }
            let mut note = format!("{excused} of {m} excused as ambiguous");
            if wrong > 0 {
                note = format!("{wrong} of {m} tokens differ; {note}");
            }
            let tokens = CheckResult {
                op: "sample/tokens".into(),
                case: label.clone(),
                rel_err: wrong as f64 / m.max(1) as f64,
                max_row_err: wrong as f64 / m.max(1) as f64,
                tolerance: 0.0,
                passed: wrong == 0,
                note: if excused > 0 || wrong > 0 { note } else { String::new() },
            };
            let logprobs = CheckResult {
                op: "sample/logprobs".into(),
                case: label.clone(),
                rel_err: logprob_err,
                max_row_err: logprob_err,
                tolerance: h.tol.logprob,
                passed: logprob_err <= h.tol.logprob && bad_ids == 0,
                note: if bad_ids > 0 {
                    format!("{bad_ids} top-logprob entries differ")
                } else {
                    String::new()
                },
            };
            Ok(vec![tokens, logprobs])
        });
    }
}

#[cfg(test)]
mod tests {
    use pagoda_sampler::SamplingParams;

    use super::*;

    fn row(params: &SamplingParams, step: u64) -> SamplingRow<'_> {
        SamplingRow { params, seed: 3, step, prompt_tokens: &[], output_tokens: &[], allowed_tokens: None }
    }

    #[test]
    fn near_ties_are_ambiguous_clear_differences_are_not() {
        let params = SamplingParams::default();
        // Tokens 0 and 1 tie exactly; token 2 is far less likely.
        let logits = [2.0f32, 2.0, -3.0];
        assert!(ambiguous(&logits, &row(&params, 0), 0, 1, 1e-3));
        // Clearly separated probabilities: a token whose CDF interval is far
        // from the draw is never excused.
        let logits = [3.0f32, 0.0, -3.0];
        let weights = [1.0, (-3f64).exp(), (-6f64).exp()];
        let total: f64 = weights.iter().sum();
        let bounds = [0.0, weights[0] / total, (weights[0] + weights[1]) / total, 1.0];
        let mut checked = 0;
        for step in 0..200 {
            let r = row(&params, step);
            let u = uniform(r.seed, step) as f64;
            let chosen = (0..3).find(|&t| u < bounds[t + 1]).unwrap_or(2) as TokenId;
            for other in 0..3u32 {
                let (lo, hi) = (bounds[other as usize], bounds[other as usize + 1]);
                let distance = if u < lo { lo - u } else { (u - hi).max(0.0) };
                if other != chosen && distance > 0.01 {
                    assert!(!ambiguous(&logits, &r, chosen, other, 1e-3), "step {step}, {chosen} vs {other}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 100);
    }
}
