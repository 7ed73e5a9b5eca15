//! Speculative decoding: a proposer guesses the next few tokens of a
//! decoding sequence, and the target model checks all of them in one forward
//! pass (vLLM's `--speculative-config`).
//!
//! A decode that carries `k` draft tokens computes `k + 1` positions (its
//! last token, then the drafts) and samples at every one of them with the
//! sequence's own parameters: row `i` samples the token that follows the
//! sequence plus drafts `1..=i`, with the random-stream counter that token
//! would have without speculation. The sequence keeps the drafts up to the
//! first one that differs from the sample of the row before it, then that
//! row's sample (the bonus token when every draft is accepted); the slots of
//! the rest go back to the allocator.
//!
//! Both proposers here are deterministic: a draft is a point mass `q`, and
//! rejection sampling against a point mass (accept `d` with probability
//! `p(d)`; else sample the residual `(p - q)+`, which is `p` without `d`)
//! is exactly "sample from `p`, accept if it equals `d`". So the tokens a
//! request gets, greedy or sampled, seeded or not, are the ones it gets
//! without speculation: the samples are drawn from the same distributions
//! with the same counters. A proposer with a distribution of its own (a
//! sampled draft model) would need the general rule; none is built.

use std::time::Instant;

use pagoda_scheduler::{SeqId, TokenId};
use serde::Deserialize;

use crate::error::EngineError;

/// Which proposer drafts the tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpeculativeMethod {
    /// Prompt lookup: the tokens that followed the latest earlier occurrence
    /// of the sequence's last `n` tokens (`prompt_lookup_max >= n >=
    /// prompt_lookup_min`, longest first), in its prompt or output.
    Ngram { prompt_lookup_min: usize, prompt_lookup_max: usize },
    /// A smaller model of the same vocabulary, decoding greedily on the same
    /// backend with its own KV cache.
    DraftModel { model: String },
}

/// Speculative decoding settings, parsed from vLLM's `--speculative-config`
/// JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct SpeculativeConfig {
    pub method: SpeculativeMethod,
    /// Drafts per decode (`k`; the verification computes `k + 1` positions).
    pub num_speculative_tokens: usize,
    /// No speculation in a step with more decoding sequences than this
    /// (speculation trades compute for latency; a large batch has no spare
    /// compute).
    pub disable_by_batch_size: Option<usize>,
    /// Speculation pauses while the recent mean of accepted tokens per
    /// verified draft (the acceptance rate) is below this, or after a few
    /// steps in which the proposer drafted nothing, probing again now and
    /// then (see [`Speculation`]); 0 never pauses.
    pub min_acceptance_rate: f64,
}

/// The JSON object of `--speculative-config`, field names as vLLM has them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpeculativeConfig {
    method: Option<String>,
    model: Option<String>,
    num_speculative_tokens: Option<usize>,
    prompt_lookup_max: Option<usize>,
    prompt_lookup_min: Option<usize>,
    disable_by_batch_size: Option<usize>,
    /// Pagoda's own: the acceptance rate below which speculation pauses.
    min_acceptance_rate: Option<f64>,
}

/// Most drafts per decode: the verification rows of a sequence stay a small
/// multiple of a decode's one.
pub const MAX_SPECULATIVE_TOKENS: usize = 16;

impl SpeculativeConfig {
    /// Parses `--speculative-config`. Refuses unknown fields and methods by
    /// name, and values out of range.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: RawSpeculativeConfig =
            serde_json::from_str(text).map_err(|e| format!("--speculative-config: {e}"))?;
        let method = match (raw.method.as_deref(), raw.model) {
            (Some("ngram"), None) | (Some("[ngram]"), None) => {
                let max = raw.prompt_lookup_max.or(raw.prompt_lookup_min).unwrap_or(4);
                let min = raw.prompt_lookup_min.unwrap_or(max.min(2));
                if min == 0 || min > max {
                    return Err(format!(
                        "--speculative-config: prompt_lookup_min ({min}) must be at least 1 and at most prompt_lookup_max ({max})"
                    ));
                }
                SpeculativeMethod::Ngram { prompt_lookup_min: min, prompt_lookup_max: max }
            }
            (Some("ngram"), Some(_)) => {
                return Err("--speculative-config: method \"ngram\" takes no model".into());
            }
            (None | Some("draft_model"), Some(model)) => {
                if raw.prompt_lookup_max.is_some() || raw.prompt_lookup_min.is_some() {
                    return Err(
                        "--speculative-config: prompt_lookup_min/max apply to method \"ngram\" only".into()
                    );
                }
                SpeculativeMethod::DraftModel { model }
            }
            (None | Some("draft_model"), None) => {
                return Err("--speculative-config: give \"method\": \"ngram\" or a draft \"model\"".into());
            }
            (Some(other), _) => {
                return Err(format!(
                    "--speculative-config: method {other:?} is not supported (ngram, draft_model)"
                ));
            }
        };
        let k =
            raw.num_speculative_tokens.ok_or("--speculative-config: num_speculative_tokens is required")?;
        if k == 0 || k > MAX_SPECULATIVE_TOKENS {
            return Err(format!(
                "--speculative-config: num_speculative_tokens must be between 1 and {MAX_SPECULATIVE_TOKENS}, got {k}"
            ));
        }
        if raw.disable_by_batch_size == Some(0) {
            return Err("--speculative-config: disable_by_batch_size must be at least 1".into());
        }
        let min_acceptance_rate = raw.min_acceptance_rate.unwrap_or(DEFAULT_MIN_ACCEPTANCE_RATE);
        if !(0.0..=1.0).contains(&min_acceptance_rate) {
            return Err(format!(
                "--speculative-config: min_acceptance_rate must be between 0 and 1, got {min_acceptance_rate}"
            ));
        }
        Ok(Self {
            method,
            num_speculative_tokens: k,
            disable_by_batch_size: raw.disable_by_batch_size,
            min_acceptance_rate,
        })
    }
}

/// Below one accepted token in ten drafted, a verification step (which costs
/// more than a decode) rarely gives back what it costs.
pub const DEFAULT_MIN_ACCEPTANCE_RATE: f64 = 0.1;

/// While paused, a probe step speculates again to re-measure: a draft model
/// after this many steps. Its probe costs its catch-up over every token since
/// the last and `k` forward passes (several decode steps of the target).
pub const PROBE_INTERVAL: u64 = 256;

/// A host proposer's (prompt lookup's) first probe comes after this many
/// paused steps, each probe that does not resume speculation doubling the
/// wait up to [`PROBE_INTERVAL`]: its probe costs nothing but the step's
/// overlap with the one before, and whether the text repeats itself changes
/// within a few tokens.
pub const MIN_PROBE_INTERVAL: u64 = 16;

/// At most this many sequences draft in a probe step, and in the steps before
/// any acceptance was measured: a probe at a large batch does not make a draft
/// model catch up on every prompt, nor verify drafts for every sequence.
pub const PROBE_SEQS: usize = 4;

/// Speculating steps in a row without a single draft before speculation
/// pauses (until a probe step drafts again).
pub const MAX_STEPS_WITHOUT_DRAFTS: u32 = 4;

/// What a proposer sees of one decoding sequence.
#[derive(Clone, Copy, Debug)]
pub struct DraftRequest<'a> {
    pub seq_id: SeqId,
    /// Prompt then output: the drafts follow the last of them.
    pub tokens: &'a [TokenId],
    /// The most drafts this sequence can verify now.
    pub max_drafts: usize,
}

/// Proposes draft tokens for decoding sequences.
pub trait Proposer: Send {
    fn name(&self) -> &str;

    /// Up to `max_drafts` tokens to follow each sequence's tokens, one list
    /// per request, in order (empty: no proposal for it).
    fn propose(&mut self, seqs: &[DraftRequest<'_>]) -> Result<Vec<Vec<TokenId>>, EngineError>;

    /// The sequence ended: drop whatever the proposer keeps for it.
    fn forget(&mut self, _seq: SeqId) {}
}

/// Prompt lookup (n-gram) proposals: no model, no device work.
#[derive(Clone, Debug)]
pub struct NgramProposer {
    min_n: usize,
    max_n: usize,
}

impl NgramProposer {
    pub fn new(prompt_lookup_min: usize, prompt_lookup_max: usize) -> Self {
        Self { min_n: prompt_lookup_min.max(1), max_n: prompt_lookup_max.max(prompt_lookup_min.max(1)) }
    }

    /// The tokens after the latest earlier occurrence of the longest suffix
    /// of `tokens` of `min_n..=max_n` tokens, at most `k` of them.
    pub fn lookup(&self, tokens: &[TokenId], k: usize) -> Vec<TokenId> {
        let len = tokens.len();
        if k == 0 || len < self.min_n + 1 {
            return Vec::new();
        }
        for n in (self.min_n..=self.max_n.min(len - 1)).rev() {
            let suffix = &tokens[len - n..];
            // Latest match first: it continues what the sequence does now.
            // A match must end before the suffix starts being itself.
            for start in (0..len - n).rev() {
                if &tokens[start..start + n] == suffix {
                    let from = start + n;
                    let to = (from + k).min(len);
                    return tokens[from..to].to_vec();
                }
            }
        }
        Vec::new()
    }
}

impl Proposer for NgramProposer {
    fn name(&self) -> &str {
        "ngram"
    }

    fn propose(&mut self, seqs: &[DraftRequest<'_>]) -> Result<Vec<Vec<TokenId>>, EngineError> {
        Ok(seqs.iter().map(|s| self.lookup(s.tokens, s.max_drafts)).collect())
    }
}

/// Counters of speculative decoding, cumulative.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecDecodeStats {
    /// Verifications: decodes that carried drafts.
    pub num_drafts: u64,
    pub num_draft_tokens: u64,
    pub num_accepted_tokens: u64,
    /// Per draft position `i` (0-based): how many times the draft at that
    /// position was accepted.
    pub accepted_per_position: Vec<u64>,
    /// Per draft position: how many verifications had a draft there.
    pub drafted_per_position: Vec<u64>,
    /// Steps in which speculation was off: the batch was too large, or the
    /// acceptance too low.
    pub steps_disabled_by_batch: u64,
    pub steps_paused_by_acceptance: u64,
    /// Steps without speculation because the proposer had drafted nothing
    /// for a while (no prompt-lookup match).
    pub steps_paused_without_drafts: u64,
    /// Host time spent proposing.
    pub propose_time: std::time::Duration,
}

impl SpecDecodeStats {
    /// Accepted drafts over drafted ones (0 before any).
    pub fn acceptance_rate(&self) -> f64 {
        if self.num_draft_tokens == 0 {
            0.0
        } else {
            self.num_accepted_tokens as f64 / self.num_draft_tokens as f64
        }
    }

    /// Tokens a verification gives on average: accepted drafts plus the one
    /// sampled after them (vLLM's "mean acceptance length").
    pub fn mean_accepted_length(&self) -> f64 {
        if self.num_drafts == 0 {
            0.0
        } else {
            1.0 + self.num_accepted_tokens as f64 / self.num_drafts as f64
        }
    }

    fn record(&mut self, drafted: usize, accepted: usize) {
        self.num_drafts += 1;
        self.num_draft_tokens += drafted as u64;
        self.num_accepted_tokens += accepted as u64;
        if self.drafted_per_position.len() < drafted {
            self.drafted_per_position.resize(drafted, 0);
            self.accepted_per_position.resize(drafted, 0);
        }
        for i in 0..drafted {
            self.drafted_per_position[i] += 1;
            if i < accepted {
                self.accepted_per_position[i] += 1;
            }
        }
    }
}

/// The engine core's speculative decoding: the proposer, when to use it,
/// and what it achieved.
pub(crate) struct Speculator {
    config: SpeculativeConfig,
    /// `None`: the runner's draft model proposes.
    proposer: Option<Box<dyn Proposer>>,
    stats: SpecDecodeStats,
    /// Recent acceptance rate: a moving average over verified drafts.
    recent_acceptance: f64,
    steps: u64,
    /// While paused, the step of the next probe (`None`: not paused); and
    /// the wait before the probe after it.
    next_probe: Option<u64>,
    probe_interval: u64,
    /// Consecutive speculating steps whose proposer drafted nothing (prompt
    /// lookup without a match): a step that speculates waits for the one
    /// before, so after a few such steps speculation pauses as it does for
    /// low acceptance.
    steps_without_drafts: u32,
}

/// The moving average of the acceptance rate weighs a step by its drafts: a
/// step of `d` verified drafts moves it by `1 - (1 - w)^d` of the way to the
/// step's rate, so 4 drafts weigh 0.34 and 16 weigh 0.81. It starts at 0.25:
/// three verifications of 4 drafts that accept nothing pause speculation, as
/// does one probe of 4 sequences (16 drafts), while a proposer right three
/// times in four keeps it near 0.75 through a run of rejections. A useless
/// draft model costs a few steps: on an H100 with the Llama-3-8B shape, a
/// step that verifies 4 drafts of a 1B draft costs about 3.5 decode steps.
const ACCEPTANCE_WEIGHT_PER_DRAFT: f64 = 0.1;
const ACCEPTANCE_START: f64 = 0.25;

/// What the next step does with speculation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Speculation {
    /// No drafts (paused, above `disable_by_batch_size`, or nothing decoding).
    Off,
    /// Drafts for at most [`PROBE_SEQS`] sequences: a probe while paused, or
    /// a first measurement.
    Probe,
    /// Drafts for every decoding sequence that may speculate.
    Full,
}

impl Speculator {
    pub fn new(config: SpeculativeConfig, proposer: Option<Box<dyn Proposer>>) -> Self {
        Self {
            config,
            proposer,
            stats: SpecDecodeStats::default(),
            recent_acceptance: ACCEPTANCE_START,
            steps: 0,
            next_probe: None,
            probe_interval: 0,
            steps_without_drafts: 0,
        }
    }

    pub fn config(&self) -> &SpeculativeConfig {
        &self.config
    }

    /// The proposer's name ("ngram", "draft_model", or a custom one's).
    pub fn proposer_name(&self) -> &str {
        self.proposer.as_ref().map_or("draft_model", |p| p.name())
    }

    pub fn stats(&self) -> &SpecDecodeStats {
        &self.stats
    }

    /// What this step does, for `num_decoding` decoding sequences. Counts
    /// the step.
    pub fn active(&mut self, num_decoding: usize) -> Speculation {
        self.steps += 1;
        if num_decoding == 0 {
            return Speculation::Off;
        }
        if self.config.disable_by_batch_size.is_some_and(|max| num_decoding > max) {
            self.stats.steps_disabled_by_batch += 1;
            return Speculation::Off;
        }
        let low = self.recent_acceptance < self.config.min_acceptance_rate;
        let pauses = self.config.min_acceptance_rate > 0.0;
        let idle = pauses && self.steps_without_drafts >= MAX_STEPS_WITHOUT_DRAFTS;
        let min_interval = if self.proposer.is_some() { MIN_PROBE_INTERVAL } else { PROBE_INTERVAL };
        if !(low || idle) {
            self.next_probe = None;
            self.probe_interval = min_interval;
            return match self.stats.num_drafts {
                0 => Speculation::Probe,
                _ => Speculation::Full,
            };
        }
        let next_probe = *self.next_probe.get_or_insert_with(|| {
            self.probe_interval = self.probe_interval.max(min_interval);
            self.steps + self.probe_interval
        });
        if self.steps >= next_probe {
            self.probe_interval = (self.probe_interval * 2).min(PROBE_INTERVAL);
            self.next_probe = Some(self.steps + self.probe_interval);
            return Speculation::Probe;
        }
        if low {
            self.stats.steps_paused_by_acceptance += 1;
        } else {
            self.stats.steps_paused_without_drafts += 1;
        }
        Speculation::Off
    }

    /// Records whether a speculating step's proposer drafted anything.
    pub fn note_proposals(&mut self, any: bool) {
        self.steps_without_drafts = if any { 0 } else { self.steps_without_drafts.saturating_add(1) };
    }

    /// Drafts for the given sequences, timed: from the host proposer, or
    /// from `draft_model` when there is none.
    pub fn propose(
        &mut self,
        seqs: &[DraftRequest<'_>],
        draft_model: impl FnOnce(&[DraftRequest<'_>]) -> Result<Vec<Vec<TokenId>>, EngineError>,
    ) -> Result<Vec<Vec<TokenId>>, EngineError> {
        let started = Instant::now();
        let drafts = match self.proposer.as_mut() {
            Some(p) => p.propose(seqs)?,
            None => draft_model(seqs)?,
        };
        self.stats.propose_time += started.elapsed();
        if drafts.len() != seqs.len() {
            return Err(EngineError::Internal(format!(
                "the {} proposer gave {} proposals for {} sequences",
                self.proposer.as_ref().map_or("draft model", |p| p.name()),
                drafts.len(),
                seqs.len()
            )));
        }
        Ok(drafts)
    }

    /// Records one step's verifications: per verification, `(drafted,
    /// accepted)`. The step's acceptance rate moves the recent average.
    pub fn record_step(&mut self, verifications: impl IntoIterator<Item = (usize, usize)>) {
        let (mut drafted_total, mut accepted_total) = (0, 0);
        for (drafted, accepted) in verifications {
            if drafted == 0 {
                continue;
            }
            self.stats.record(drafted, accepted);
            drafted_total += drafted;
            accepted_total += accepted;
        }
        if drafted_total > 0 {
            let rate = accepted_total as f64 / drafted_total as f64;
            let weight = 1.0 - (1.0 - ACCEPTANCE_WEIGHT_PER_DRAFT).powi(drafted_total.min(1 << 16) as i32);
            self.recent_acceptance += weight * (rate - self.recent_acceptance);
        }
    }

    pub fn forget(&mut self, seq: SeqId) {
        if let Some(p) = self.proposer.as_mut() {
            p.forget(seq);
        }
    }
}

/// How many of a verification's drafts are accepted: the leading drafts
/// equal to the sample of the row before them. `samples[i]` is row `i`'s
/// token (`drafts.len() + 1` rows).
pub fn accepted_prefix(drafts: &[TokenId], samples: &[TokenId]) -> usize {
    drafts.iter().zip(samples).take_while(|(d, s)| d == s).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_vllm_spellings_and_refuses_the_rest_by_name() {
        let c = SpeculativeConfig::from_json(
            r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}"#,
        )
        .unwrap();
        assert_eq!(c.method, SpeculativeMethod::Ngram { prompt_lookup_min: 2, prompt_lookup_max: 4 });
        assert_eq!(c.num_speculative_tokens, 4);
        let c =
            SpeculativeConfig::from_json(r#"{"model": "/m/draft", "num_speculative_tokens": 3}"#).unwrap();
        assert_eq!(c.method, SpeculativeMethod::DraftModel { model: "/m/draft".into() });
        let c = SpeculativeConfig::from_json(
            r#"{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 8}"#,
        )
        .unwrap();
        assert_eq!(c.disable_by_batch_size, Some(8));
        assert_eq!(c.method, SpeculativeMethod::Ngram { prompt_lookup_min: 2, prompt_lookup_max: 4 });

        let err = |s: &str| SpeculativeConfig::from_json(s).unwrap_err();
        assert!(err(r#"{"method": "eagle", "num_speculative_tokens": 2}"#).contains("\"eagle\""));
        assert!(err(r#"{"method": "ngram"}"#).contains("num_speculative_tokens"));
        assert!(err(r#"{"method": "ngram", "num_speculative_tokens": 0}"#).contains("num_speculative_tokens"));
        assert!(err(r#"{"method": "ngram", "num_speculative_tokens": 2, "bogus": 1}"#).contains("bogus"));
        assert!(err(r#"{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3}"#)
            .contains("prompt_lookup_min"));
        assert!(err(r#"{"num_speculative_tokens": 2}"#).contains("method"));
        assert!(err("not json").contains("--speculative-config"));
    }

    #[test]
    fn ngram_lookup_continues_the_latest_match_of_the_longest_suffix() {
        let p = NgramProposer::new(1, 3);
        // "1 2 3 9 ... 1 2 3" -> continues with what followed "1 2 3": 9, 8.
        assert_eq!(p.lookup(&[1, 2, 3, 9, 8, 5, 1, 2, 3], 2), vec![9, 8]);
        // The longest suffix wins over a later shorter match.
        assert_eq!(p.lookup(&[1, 2, 3, 7, 6, 3, 4, 1, 2, 3], 2), vec![7, 6]);
        // Of equal matches, the latest one.
        assert_eq!(p.lookup(&[5, 1, 6, 5, 1, 7, 5, 1], 1), vec![7]);
        // The drafts stop at the end of the sequence.
        assert_eq!(p.lookup(&[4, 4, 4], 5), vec![4]);
        // No match, or too short.
        assert!(p.lookup(&[1, 2, 3, 4], 3).is_empty());
        assert!(p.lookup(&[1], 3).is_empty());
        assert!(NgramProposer::new(2, 2).lookup(&[1, 2, 1], 3).is_empty());
        assert!(p.lookup(&[1, 2, 1, 2], 0).is_empty());
    }

    #[test]
    fn acceptance_is_the_leading_run_of_matching_drafts() {
        assert_eq!(accepted_prefix(&[1, 2, 3], &[1, 2, 3, 4]), 3);
        assert_eq!(accepted_prefix(&[1, 2, 3], &[1, 5, 3, 4]), 1);
        assert_eq!(accepted_prefix(&[1, 2, 3], &[0, 2, 3, 4]), 0);
        assert_eq!(accepted_prefix(&[], &[7]), 0);
    }

    #[test]
    fn low_acceptance_pauses_speculation_and_probes_again() {
        let config = SpeculativeConfig::from_json(
            r#"{"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": 4}"#,
        )
        .unwrap();
        let mut s = Speculator::new(config.clone(), Some(Box::new(NgramProposer::new(2, 4))));
        assert_eq!(s.active(1), Speculation::Probe, "nothing measured yet: a few sequences draft");
        assert_eq!(s.active(5), Speculation::Off, "above disable_by_batch_size");
        assert_eq!(s.active(0), Speculation::Off);
        for i in 0..3 {
            assert_ne!(s.active(1), Speculation::Off, "not paused yet ({i})");
            s.record_step([(4, 0)]);
        }
        // Paused: a host proposer probes after 16 steps, then waits twice as
        // long after each probe that does not resume, up to PROBE_INTERVAL.
        let probes: Vec<u64> = (1..=1000).filter(|_| s.active(1) == Speculation::Probe).collect();
        assert_eq!(probes, vec![17, 49, 113, 241, 497, 753]);
        assert_eq!(s.stats().steps_paused_by_acceptance, 1000 - 6);
        // A probe that accepts resumes at once, and the wait starts over.
        s.record_step([(4, 4)]);
        assert_eq!(s.active(1), Speculation::Full);
        // A proposer that drafts nothing pauses too, until a probe drafts.
        for _ in 0..MAX_STEPS_WITHOUT_DRAFTS {
            assert_eq!(s.active(1), Speculation::Full);
            s.note_proposals(false);
        }
        let first = (1..=100).find(|_| s.active(1) == Speculation::Probe);
        assert_eq!(first, Some(MIN_PROBE_INTERVAL + 1));
        s.note_proposals(true);
        assert_eq!(s.active(1), Speculation::Full);
        let stats = s.stats();
        assert_eq!((stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens), (4, 16, 4));
        assert_eq!(stats.steps_paused_without_drafts, MIN_PROBE_INTERVAL);

        // A draft model probes every PROBE_INTERVAL steps; one probe of 4
        // sequences (16 drafts) that accepts nothing pauses it.
        let mut s = Speculator::new(config, None);
        assert_eq!(s.active(3), Speculation::Probe);
        s.record_step([(4, 0), (4, 0), (4, 0), (4, 0)]);
        let probes: Vec<u64> = (1..=600).filter(|_| s.active(3) == Speculation::Probe).collect();
        assert_eq!(probes, vec![PROBE_INTERVAL + 1, 2 * PROBE_INTERVAL + 1]);
    }
}
