//! Token logprobs in the two shapes of the API: completions' legacy
//! `{tokens, token_logprobs, top_logprobs, text_offset}` and chat's
//! `{content: [{token, logprob, bytes, top_logprobs}]}`.

use pagoda_engine::{PromptLogprob, TokenLogprob};
use pagoda_models::Tokenizer;

use crate::protocol::{
    finite_logprob, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs, PromptLogprobMap,
    PromptLogprobsOut, TopLogprobMap,
};

/// Turns token ids into the text shown for them: each token decoded alone,
/// special tokens included (so EOS shows as itself rather than nothing), or
/// `token_id:{id}` when the client asked for ids (vLLM's
/// `return_tokens_as_token_ids`, for tokens whose text is not valid UTF-8).
pub struct TokenTexts<'a> {
    tokenizer: &'a Tokenizer,
    as_token_ids: bool,
}

impl<'a> TokenTexts<'a> {
    pub fn new(tokenizer: &'a Tokenizer, as_token_ids: bool) -> Self {
        Self { tokenizer, as_token_ids }
    }

    pub fn text(&self, token: u32) -> String {
        if self.as_token_ids {
            return format!("token_id:{token}");
        }
        self.tokenizer.decode(&[token], false).unwrap_or_default()
    }

    /// Completions' shape. `text_offset` continues from `*offset` (characters
    /// of the choice's text before these tokens) and advances it. The chosen
    /// token is always among the top entries, as in vLLM.
    pub fn completion(&self, logprobs: &[TokenLogprob], offset: &mut usize) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        for lp in logprobs {
            let text = self.text(lp.token);
            let mut top: Vec<(String, f32)> = Vec::with_capacity(lp.top.len() + 1);
            if !lp.top.iter().any(|&(t, _)| t == lp.token) {
                top.push((text.clone(), finite_logprob(lp.logprob)));
            }
            top.extend(lp.top.iter().map(|&(t, l)| (self.text(t), finite_logprob(l))));
            top.sort_by(|a, b| b.1.total_cmp(&a.1));
            out.text_offset.push(*offset);
            *offset += text.chars().count();
            out.tokens.push(text);
            out.token_logprobs.push(Some(finite_logprob(lp.logprob)));
            out.top_logprobs.push(Some(TopLogprobMap(top)));
        }
        out
    }

    /// Completions' shape for an echoed prompt (`prompt` its token ids,
    /// `logprobs` the engine's prompt logprobs): the first token's logprob
    /// and top entries are `null`; the others list the token and its top
    /// alternatives, as for generated tokens. `offset` as in [`Self::completion`].
    pub fn echoed_prompt(
        &self,
        prompt: &[u32],
        logprobs: &[Option<PromptLogprob>],
        offset: &mut usize,
    ) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        for (i, &token) in prompt.iter().enumerate() {
            let text = self.text(token);
            out.text_offset.push(*offset);
            *offset += text.chars().count();
            out.tokens.push(text);
            match logprobs.get(i).and_then(Option::as_ref) {
                Some(lp) => {
                    let as_token = TokenLogprob { token: lp.token, logprob: lp.logprob, top: lp.top.clone() };
                    let one = self.completion(std::slice::from_ref(&as_token), &mut 0);
                    out.token_logprobs.extend(one.token_logprobs);
                    out.top_logprobs.extend(one.top_logprobs);
                }
                None => {
                    out.token_logprobs.push(None);
                    out.top_logprobs.push(None);
                }
            }
        }
        out
    }

    /// vLLM's `prompt_logprobs`: per prompt token `{id: {logprob, rank,
    /// decoded_token}}`, the token itself first, then its top alternatives
    /// (ranked 1, 2, ...).
    pub fn prompt_logprobs(&self, logprobs: &[Option<PromptLogprob>]) -> PromptLogprobsOut {
        logprobs
            .iter()
            .map(|entry| {
                entry.as_ref().map(|lp| {
                    let mut map = vec![(lp.token, finite_logprob(lp.logprob), lp.rank, self.text(lp.token))];
                    for (i, &(t, l)) in lp.top.iter().enumerate() {
                        if t != lp.token {
                            map.push((t, finite_logprob(l), i as u32 + 1, self.text(t)));
                        }
                    }
                    PromptLogprobMap(map)
                })
            })
            .collect()
    }

    /// Chat's shape: `top_logprobs` holds exactly the `k` alternatives asked for.
    pub fn chat(&self, logprobs: &[TokenLogprob]) -> Vec<ChatTokenLogprob> {
        logprobs
            .iter()
            .map(|lp| {
                let token = self.text(lp.token);
                ChatTokenLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob: finite_logprob(lp.logprob),
                    top_logprobs: lp
                        .top
                        .iter()
                        .map(|&(t, l)| {
                            let token = self.text(t);
                            ChatTopLogprob {
                                bytes: token.as_bytes().to_vec(),
                                token,
                                logprob: finite_logprob(l),
                            }
                        })
                        .collect(),
                }
            })
            .collect()
    }
}
