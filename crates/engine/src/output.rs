//! Folding streamed deltas into finished results (offline generation and
//! non-streaming API responses).

use crate::request::{FinishReason, PromptLogprob, RequestOutput, StopReason, TokenLogprob};

/// One finished sample.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompletedSeq {
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
}

/// A finished request: its `n` samples in index order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompletedRequest {
    pub request_id: String,
    pub seqs: Vec<CompletedSeq>,
    pub num_prompt_tokens: usize,
    pub num_cached_tokens: usize,
    /// When asked for: per prompt token, the first `None`.
    pub prompt_logprobs: Option<Vec<Option<PromptLogprob>>>,
}

impl CompletedRequest {
    pub fn new(request_id: impl Into<String>, n: usize) -> Self {
        Self {
            request_id: request_id.into(),
            seqs: (0..n).map(|index| CompletedSeq { index, ..Default::default() }).collect(),
            num_prompt_tokens: 0,
            num_cached_tokens: 0,
            prompt_logprobs: None,
        }
    }

    /// Adds one streamed update.
    pub fn absorb(&mut self, out: RequestOutput) {
        self.num_prompt_tokens = out.num_prompt_tokens;
        self.num_cached_tokens = out.num_cached_tokens;
        if out.prompt_logprobs.is_some() {
            self.prompt_logprobs = out.prompt_logprobs;
        }
        for d in out.deltas {
            if d.index >= self.seqs.len() {
                self.seqs.resize_with(d.index + 1, Default::default);
                self.seqs[d.index].index = d.index;
            }
            let seq = &mut self.seqs[d.index];
            seq.text.push_str(&d.text);
            seq.token_ids.extend(d.token_ids);
            seq.logprobs.extend(d.logprobs);
            if d.finish_reason.is_some() {
                seq.finish_reason = d.finish_reason;
                seq.stop_reason = d.stop_reason;
            }
        }
    }

    /// Generated tokens over all samples.
    pub fn num_generated_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.token_ids.len()).sum()
    }
}
