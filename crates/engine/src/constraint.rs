//! Per-sequence constraints on the next token: the engine's side of
//! structured outputs. A request carries a [`TokenConstraintFactory`] (a
//! compiled grammar); each of its sequences gets its own
//! [`TokenConstraint`] (the grammar's matcher), kept in the runner's
//! persistent batch. Per step the runner asks every constrained row for its
//! allowed-token bitmask while the device runs the forward pass, the backend
//! applies the masks before sampling, and the sampled tokens advance the
//! matchers when the step is applied. Where the grammar forces the next
//! tokens, the engine proposes them as drafts (fast-forward): one step
//! verifies them, each row under the mask of the state after the drafts
//! before it, so the tokens are exactly those of one-at-a-time decoding.
//!
//! The engine knows only these traits; `pagoda-structured` implements them
//! with llguidance, and a test or a researcher can plug in another.

use std::fmt::Debug;

use pagoda_scheduler::TokenId;

/// One sequence's position in its constraint.
pub trait TokenConstraint: Send + Debug {
    /// Writes the tokens allowed next as a bitmask: bit `t % 32` of word
    /// `t / 32`, `words.len() == vocab_size.div_ceil(32)`. A constraint that
    /// has ended allows only the end-of-sequence tokens.
    fn fill_mask(&mut self, words: &mut [u32]);
    /// Advances over a sampled token. An error means the token was not
    /// allowed (a bug in a mask or a backend); the text says which.
    fn accept_token(&mut self, token: TokenId) -> Result<(), String>;
    /// A copy for a forked sample (`n > 1`): the fork continues independently.
    fn boxed_clone(&self) -> Box<dyn TokenConstraint>;
    /// Tokens the constraint forces next, if it knows (not accepted). The
    /// engine proposes them as drafts: verified like speculative drafts, so
    /// the output is the one without them, in fewer steps wherever the model
    /// would have picked them anyway (its own tokenization of the forced text).
    fn forced_tokens(&mut self) -> Vec<TokenId> {
        Vec::new()
    }
    /// Undoes the last `n` accepted tokens (after the masks of a
    /// verification's rows were filled along its drafts). Needed only by a
    /// constraint that forces tokens.
    fn rollback(&mut self, n: usize) -> Result<(), String> {
        match n {
            0 => Ok(()),
            _ => Err(format!("this constraint cannot undo {n} tokens")),
        }
    }
}

/// Makes the constraint of each sequence of a request.
pub trait TokenConstraintFactory: Send + Sync + Debug {
    fn new_constraint(&self) -> Box<dyn TokenConstraint>;
}

/// A constraint that allows a fixed set of tokens at every step (tests and
/// examples; vLLM's `allowed_token_ids` is applied by the sampler instead).
#[derive(Clone, Debug)]
pub struct FixedTokenSet {
    allowed: Vec<TokenId>,
}

impl FixedTokenSet {
    pub fn new(allowed: Vec<TokenId>) -> Self {
        Self { allowed }
    }
}

impl TokenConstraint for FixedTokenSet {
    fn fill_mask(&mut self, words: &mut [u32]) {
        words.fill(0);
        for &t in &self.allowed {
            if let Some(w) = words.get_mut(t as usize / 32) {
                *w |= 1 << (t % 32);
            }
        }
    }

    fn accept_token(&mut self, token: TokenId) -> Result<(), String> {
        if self.allowed.contains(&token) {
            Ok(())
        } else {
            Err(format!("token {token} is not in the allowed set"))
        }
    }

    fn boxed_clone(&self) -> Box<dyn TokenConstraint> {
        Box::new(self.clone())
    }
}

impl TokenConstraintFactory for FixedTokenSet {
    fn new_constraint(&self) -> Box<dyn TokenConstraint> {
        Box::new(self.clone())
    }
}

/// Structured outputs: a compiled grammar makes one matcher per sequence.
impl TokenConstraintFactory for pagoda_structured::CompiledGrammar {
    fn new_constraint(&self) -> Box<dyn TokenConstraint> {
        Box::new(self.matcher())
    }
}

impl TokenConstraint for pagoda_structured::GrammarMatcher {
    fn fill_mask(&mut self, words: &mut [u32]) {
        pagoda_structured::GrammarMatcher::fill_mask(self, words)
    }

    fn accept_token(&mut self, token: TokenId) -> Result<(), String> {
        pagoda_structured::GrammarMatcher::accept_token(self, token).map_err(|e| e.to_string())
    }

    fn boxed_clone(&self) -> Box<dyn TokenConstraint> {
        Box::new(self.clone())
    }

    fn forced_tokens(&mut self) -> Vec<TokenId> {
        pagoda_structured::GrammarMatcher::forced_tokens(self)
    }

    fn rollback(&mut self, n: usize) -> Result<(), String> {
        pagoda_structured::GrammarMatcher::rollback(self, n).map_err(|e| e.to_string())
    }
}
