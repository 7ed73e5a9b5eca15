//! The reference sampler: plain loops over one row of logits, in the order the
//! crate documentation fixes. Backends must produce the same tokens.

use std::cmp::Ordering;
use std::collections::HashMap;

use crate::{rng::uniform, SampledToken, SamplingRow, TokenId};

/// `log_softmax(logits)`, computed in f64 for accuracy.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let log_sum = sum.ln() + max;
    logits.iter().map(|&x| (x as f64 - log_sum) as f32).collect()
}

/// Descending by value, then ascending by token id: the one order every
/// backend uses for greedy ties, top-k, top-p and the final draw.
fn by_value_desc_then_id(a: &(TokenId, f32), b: &(TokenId, f32)) -> Ordering {
    b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal).then(a.0.cmp(&b.0))
}

/// Applies the grammar mask, `allowed_token_ids`, `bad_words` and `logit_bias` in place (step
/// 2 of the crate docs).
pub fn apply_logit_constraints(logits: &mut [f32], row: &SamplingRow) {
    let p = row.params;
    if let Some(mask) = row.allowed_tokens {
        for (t, logit) in logits.iter_mut().enumerate() {
            if !crate::token_allowed(mask, t as TokenId) {
                *logit = f32::NEG_INFINITY;
            }
        }
    }
    if let Some(allowed) = &p.allowed_token_ids {
        let mut keep = vec![false; logits.len()];
        for &t in allowed {
            if let Some(k) = keep.get_mut(t as usize) {
                *k = true;
            }
        }
        for (logit, keep) in logits.iter_mut().zip(keep) {
            if !keep {
                *logit = f32::NEG_INFINITY;
            }
        }
    }
    for word in &p.bad_words {
        let (&last, prefix) = word.split_last().expect("validated: bad words are not empty");
        if row.output_tokens.ends_with(prefix) {
            if let Some(logit) = logits.get_mut(last as usize) {
                *logit = f32::NEG_INFINITY;
            }
        }
    }
    for &(t, bias) in &p.logit_bias {
        if let Some(logit) = logits.get_mut(t as usize) {
            *logit += bias;
        }
    }
}

/// Applies repetition, frequency and presence penalties in place (step 3 of
/// the crate docs); public so conformance checks can rebuild the distribution.
pub fn apply_penalties(logits: &mut [f32], row: &SamplingRow) {
    let p = row.params;
    if p.repetition_penalty != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &t in row.prompt_tokens.iter().chain(row.output_tokens) {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        for (logit, seen) in logits.iter_mut().zip(seen) {
            if seen {
                *logit =
                    if *logit > 0.0 { *logit / p.repetition_penalty } else { *logit * p.repetition_penalty };
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        let mut counts: HashMap<TokenId, u32> = HashMap::new();
        for &t in row.output_tokens {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(logit) = logits.get_mut(t as usize) {
                *logit -= p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
    }
}

/// Samples one token from one row of logits. See the crate docs for the order
/// of operations; `logits.len()` is the vocabulary size.
pub fn sample_row(logits: &[f32], row: &SamplingRow) -> SampledToken {
    assert!(!logits.is_empty(), "sample_row: empty logits row");
    let p = row.params;
    let raw_logprobs = log_softmax(logits);

    let mut penalised = logits.to_vec();
    apply_logit_constraints(&mut penalised, row);
    apply_penalties(&mut penalised, row);

    let token = if p.is_greedy() { argmax(&penalised) } else { draw(&penalised, row) };

    let top_logprobs = match p.logprobs {
        Some(n) if n > 0 => {
            let mut all: Vec<(TokenId, f32)> =
                raw_logprobs.iter().enumerate().map(|(i, &l)| (i as TokenId, l)).collect();
            let n = (n as usize).min(all.len());
            all.select_nth_unstable_by(n - 1, by_value_desc_then_id);
            all.truncate(n);
            all.sort_by(by_value_desc_then_id);
            all
        }
        _ => Vec::new(),
    };
    SampledToken { token, logprob: raw_logprobs[token as usize], top_logprobs }
}

/// Arg-max with ties to the lowest token id; NaNs never win.
fn argmax(logits: &[f32]) -> TokenId {
    let mut best = 0usize;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as TokenId
}

/// Temperature, softmax, top-k, top-p, min-p, then an inverse-CDF draw.
fn draw(logits: &[f32], row: &SamplingRow) -> TokenId {
    let p = row.params;
    let inv_t = 1.0 / p.temperature as f64;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if max == f64::NEG_INFINITY {
        // Constraints banned every token: nothing to draw from, so the arg-max rule decides.
        return argmax(logits);
    }
    let mut probs: Vec<(TokenId, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as TokenId, ((x as f64 - max) * inv_t).exp() as f32))
        .collect();
    let total: f64 = probs.iter().map(|&(_, q)| q as f64).sum();
    for e in probs.iter_mut() {
        e.1 = (e.1 as f64 / total) as f32;
    }
    probs.sort_by(by_value_desc_then_id);

    let mut keep = probs.len();
    if p.top_k > 0 {
        keep = keep.min(p.top_k as usize);
    }
    if p.top_p < 1.0 {
        let mut cum = 0.0f64;
        for (i, &(_, q)) in probs[..keep].iter().enumerate() {
            cum += q as f64;
            if cum >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    if p.min_p > 0.0 {
        let threshold = probs[0].1 * p.min_p;
        keep = probs[..keep].iter().take_while(|&&(_, q)| q >= threshold).count().max(1);
    }
    let kept = &probs[..keep.max(1)];
    let mass: f64 = kept.iter().map(|&(_, q)| q as f64).sum();
    let target = uniform(row.seed, row.step) as f64 * mass;
    let mut cum = 0.0f64;
    for &(t, q) in kept {
        cum += q as f64;
        if cum > target {
            return t;
        }
    }
    kept[kept.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SamplingParams;

    fn row<'a>(params: &'a SamplingParams, output: &'a [TokenId]) -> SamplingRow<'a> {
        SamplingRow {
            params,
            seed: 7,
            step: 0,
            prompt_tokens: &[],
            output_tokens: output,
            allowed_tokens: None,
        }
    }

    #[test]
    fn logit_bias_moves_the_choice_and_logprobs_stay_raw() {
        let logits = [1.0, 3.0, 2.0];
        let params =
            SamplingParams { logit_bias: vec![(0, 5.0)], logprobs: Some(1), ..SamplingParams::greedy() };
        let out = sample_row(&logits, &row(&params, &[]));
        assert_eq!(out.token, 0);
        // Logprobs come from the raw logits, as vLLM v1 reports them.
        assert_eq!(out.logprob, log_softmax(&logits)[0]);
        assert_eq!(out.top_logprobs[0].0, 1);
    }

    #[test]
    fn only_allowed_tokens_are_drawn() {
        let logits = [5.0, 1.0, 4.0, 0.5];
        let greedy = SamplingParams { allowed_token_ids: Some(vec![1, 3]), ..SamplingParams::greedy() };
        assert_eq!(sample_row(&logits, &row(&greedy, &[])).token, 1);
        let sampled = SamplingParams { allowed_token_ids: Some(vec![1, 3]), ..SamplingParams::default() };
        for step in 0..50 {
            let r = SamplingRow { step, ..row(&sampled, &[]) };
            assert!([1, 3].contains(&sample_row(&logits, &r).token));
        }
    }

    #[test]
    fn a_grammar_mask_limits_the_draw_and_combines_with_allowed_token_ids() {
        // 40 tokens: the mask spans two words; it allows 3 and 33 only.
        let mut logits = vec![0.0f32; 40];
        logits[0] = 9.0;
        logits[33] = 1.0;
        let mask = [1u32 << 3, 1u32 << 1];
        let greedy = SamplingParams::greedy();
        let masked = SamplingRow { allowed_tokens: Some(&mask), ..row(&greedy, &[]) };
        assert_eq!(sample_row(&logits, &masked).token, 33);
        let sampled = SamplingParams::default();
        for step in 0..50 {
            let r = SamplingRow { step, allowed_tokens: Some(&mask), ..row(&sampled, &[]) };
            assert!([3, 33].contains(&sample_row(&logits, &r).token));
        }
        // Both constraints hold: only their intersection can be drawn.
        let both = SamplingParams { allowed_token_ids: Some(vec![3, 7]), ..SamplingParams::greedy() };
        let r = SamplingRow { allowed_tokens: Some(&mask), ..row(&both, &[]) };
        assert_eq!(sample_row(&logits, &r).token, 3);
        // A mask shorter than the vocabulary allows nothing past its end.
        assert!(!crate::token_allowed(&mask, 64));
    }

    #[test]
    fn a_bad_word_is_banned_only_where_its_prefix_ends_the_output() {
        let logits = [0.0, 1.0, 9.0];
        // One token: always banned.
        let single = SamplingParams { bad_words: vec![vec![2]], ..SamplingParams::greedy() };
        assert_eq!(sample_row(&logits, &row(&single, &[])).token, 1);
        // Two tokens [0, 2]: token 2 is banned right after a 0 only.
        let pair = SamplingParams { bad_words: vec![vec![0, 2]], ..SamplingParams::greedy() };
        assert_eq!(sample_row(&logits, &row(&pair, &[1, 0])).token, 1);
        assert_eq!(sample_row(&logits, &row(&pair, &[0, 1])).token, 2);
    }

    #[test]
    fn constraints_come_before_penalties() {
        // Bias first, then the repetition penalty divides the biased logit (vLLM's order).
        let params = SamplingParams {
            logit_bias: vec![(0, 2.0)],
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let mut l = vec![1.0, 1.4];
        let r = row(&params, &[0]);
        apply_logit_constraints(&mut l, &r);
        apply_penalties(&mut l, &r);
        assert_eq!(l, vec![1.5, 1.4]);
        assert_eq!(sample_row(&[1.0, 1.4], &r).token, 0);
    }

    #[test]
    fn banning_every_token_falls_back_to_the_arg_max_rule() {
        let params = SamplingParams { bad_words: vec![vec![0], vec![1]], ..SamplingParams::default() };
        assert_eq!(sample_row(&[1.0, 2.0], &row(&params, &[])).token, 0);
    }

    #[test]
    fn greedy_picks_max_and_breaks_ties_low() {
        let g = SamplingParams::greedy();
        assert_eq!(sample_row(&[1.0, 3.0, 3.0, 2.0], &row(&g, &[])).token, 1);
    }

    #[test]
    fn logprobs_are_raw_and_sorted() {
        let params = SamplingParams { logprobs: Some(2), ..SamplingParams::greedy() };
        let out = sample_row(&[0.0, 1.0, 2.0], &row(&params, &[]));
        let lsm = log_softmax(&[0.0, 1.0, 2.0]);
        assert_eq!(out.token, 2);
        assert_eq!(out.logprob, lsm[2]);
        assert_eq!(out.top_logprobs, vec![(2, lsm[2]), (1, lsm[1])]);
        let sum: f64 = lsm.iter().map(|&l| (l as f64).exp()).sum();
        assert!((sum - 1.0).abs() < 1e-6);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let params = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() };
        let mut l = vec![4.0, -1.0, 3.0];
        apply_penalties(&mut l, &row(&params, &[0, 1]));
        assert_eq!(l, vec![2.0, -2.0, 3.0]);
        assert_eq!(sample_row(&[4.0, -1.0, 3.0], &row(&params, &[0, 1])).token, 2);
    }

    #[test]
    fn frequency_and_presence_penalties_count_output_tokens() {
        let params =
            SamplingParams { frequency_penalty: 0.5, presence_penalty: 1.0, ..SamplingParams::greedy() };
        let mut l = vec![0.0; 3];
        apply_penalties(&mut l, &row(&params, &[1, 1, 2]));
        assert_eq!(l, vec![0.0, -2.0, -1.5]);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_small_keeps_the_best() {
        let logits = [0.5, 2.0, 1.9, -3.0];
        for step in 0..50 {
            let k1 = SamplingParams { top_k: 1, ..Default::default() };
            let r = SamplingRow { step, ..row(&k1, &[]) };
            assert_eq!(sample_row(&logits, &r).token, 1);
            let p = SamplingParams { top_p: 0.01, ..Default::default() };
            let r = SamplingRow { step, ..row(&p, &[]) };
            assert_eq!(sample_row(&logits, &r).token, 1);
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let logits = [5.0, 4.9, -10.0, -10.0];
        let params = SamplingParams { min_p: 0.5, ..Default::default() };
        for step in 0..200 {
            let r = SamplingRow { step, ..row(&params, &[]) };
            assert!(sample_row(&logits, &r).token < 2);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let params = SamplingParams::default();
        let ones = (0..20_000)
            .filter(|&step| sample_row(&logits, &SamplingRow { step, ..row(&params, &[]) }).token == 1)
            .count();
        let frac = ones as f64 / 20_000.0;
        assert!((frac - 0.75).abs() < 0.015, "{frac}");
    }

    #[test]
    fn same_seed_and_step_same_token() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let params = SamplingParams { temperature: 0.8, top_p: 0.9, ..Default::default() };
        for step in 0..20 {
            let r = SamplingRow { step, ..row(&params, &[]) };
            assert_eq!(sample_row(&logits, &r), sample_row(&logits, &r));
        }
    }
}
