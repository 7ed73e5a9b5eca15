//! Structured output: turns a request's JSON schema, regex, choice list or
//! grammar into the set of tokens each sequence may sample next.
//!
//! A [`GrammarCompiler`] is built once per model from its tokenizer (the
//! token trie is the expensive part). Each request's [`GrammarSpec`] compiles
//! to a [`CompiledGrammar`]; each of its sequences gets a [`GrammarMatcher`]
//! that writes allowed-token bitmasks and advances over sampled tokens.
//! The grammar engine is llguidance (Earley parser over a lexer, with masks
//! computed by walking the token trie).

mod gbnf;
mod vocab;

use std::fmt;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use toktrie::{SimpleVob, TokEnv};

/// What a request constrains its output to.
#[derive(Clone, Debug, PartialEq)]
pub enum GrammarSpec {
    /// JSON matching this schema (`response_format` `json_schema`, `structured_outputs.json`, `guided_json`).
    JsonSchema(serde_json::Value),
    /// Any JSON object (`response_format` `{"type": "json_object"}`).
    JsonObject,
    /// Text the regex matches in full (`structured_outputs.regex`, `guided_regex`).
    Regex(String),
    /// Exactly one of these strings (`structured_outputs.choice`, `guided_choice`).
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark syntax, or GBNF (`::=` rules) as vLLM
    /// accepts (`structured_outputs.grammar`, `guided_grammar`).
    Grammar(String),
}

/// A spec that does not compile (bad schema, regex or grammar), or a matcher
/// that cannot go on. The message is meant for the client (an HTTP 400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct GrammarError {
    message: String,
}

impl GrammarError {
    fn new(message: impl Into<String>) -> Self {
        Self { message: message.into() }
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Shared by a compiler and everything it compiles.
struct Shared {
    factory: ParserFactory,
    vocab_size: usize,
    eos_token_ids: Vec<u32>,
}

/// Compiles [`GrammarSpec`]s for one model. Built once per model from its
/// tokenizer; cheap to clone.
#[derive(Clone)]
pub struct GrammarCompiler {
    shared: Arc<Shared>,
}

impl fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("vocab_size", &self.shared.vocab_size)
            .field("eos_token_ids", &self.shared.eos_token_ids)
            .finish()
    }
}

/// JSON with fixed separators and no free whitespace: a small model given
/// the choice can emit spaces or newlines forever.
fn compact_json_options() -> JsonCompileOptions {
    JsonCompileOptions {
        item_separator: ",".into(),
        key_separator: ":".into(),
        whitespace_flexible: false,
        ..JsonCompileOptions::default()
    }
}

/// llguidance panics on some malformed input; a request must get an error instead.
fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T, GrammarError>) -> Result<T, GrammarError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(GrammarError::new(format!("{what}: the grammar engine failed on it"))))
}

impl GrammarCompiler {
    /// `vocab_size` is the model's logits width; ids at or past the
    /// tokenizer's vocabulary (padding) are never allowed. `eos_token_ids`
    /// end a sequence once its grammar is complete (empty: the tokenizer's EOS).
    pub fn new(
        tokenizer: &pagoda_models::Tokenizer,
        eos_token_ids: &[u32],
        vocab_size: usize,
    ) -> Result<Self, GrammarError> {
        no_panic("building the token trie", || {
            let env = vocab::ModelTokEnv::new(tokenizer, eos_token_ids, vocab_size)?;
            let eos_token_ids = toktrie::TokenizerEnv::tok_trie(&env).eos_tokens().to_vec();
            let env: TokEnv = Arc::new(env);
            let mut factory = ParserFactory::new_simple(&env)
                .map_err(|e| GrammarError::new(format!("building the token trie: {e}")))?;
            // Errors come back to the caller; nothing goes to stderr.
            factory.quiet();
            Ok(Self { shared: Arc::new(Shared { factory, vocab_size, eos_token_ids }) })
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.shared.vocab_size
    }

    /// Compiles `spec`; an invalid schema, regex or grammar is an error
    /// whose message says what is wrong.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<CompiledGrammar, GrammarError> {
        let (what, grammar) = match spec {
            GrammarSpec::JsonSchema(schema) => ("invalid JSON schema", json_grammar(schema.clone())?),
            GrammarSpec::JsonObject => {
                ("invalid JSON schema", json_grammar(serde_json::json!({"type": "object"}))?)
            }
            GrammarSpec::Regex(rx) => ("invalid regex", TopLevelGrammar::from_regex(rx)),
            GrammarSpec::Choice(choices) => ("invalid choice", choice_grammar(choices)?),
            GrammarSpec::Grammar(text) => ("invalid grammar", grammar_from_text(text)?),
        };
        no_panic(what, || {
            let parser = self
                .shared
                .factory
                .create_parser(grammar)
                .map_err(|e| GrammarError::new(format!("{what}: {e}")))?;
            let mut proto = Matcher::new(Ok(parser));
            // The first mask is computed once here: it is shared by every
            // sequence, and a grammar that allows nothing fails now, as a 400.
            let first_mask = proto.compute_mask().map_err(|e| GrammarError::new(format!("{what}: {e}")))?;
            Ok(CompiledGrammar {
                inner: Arc::new(CompiledInner { proto, first_mask, shared: self.shared.clone() }),
            })
        })
    }
}

fn json_grammar(mut schema: serde_json::Value) -> Result<TopLevelGrammar, GrammarError> {
    let serde_json::Value::Object(obj) = &mut schema else {
        // `true` is JSON Schema's "anything"; other non-objects are not schemas.
        if schema == serde_json::Value::Bool(true) {
            return json_grammar(serde_json::json!({}));
        }
        return Err(GrammarError::new(format!("invalid JSON schema: expected an object, got {schema}")));
    };
    // The schema's own llguidance options (x-guidance), if any, win.
    if !obj.contains_key("x-guidance") {
        compact_json_options().apply_to(&mut schema);
    }
    Ok(TopLevelGrammar::from_json_schema(schema))
}

fn choice_grammar(choices: &[String]) -> Result<TopLevelGrammar, GrammarError> {
    if choices.is_empty() {
        return Err(GrammarError::new("invalid choice: the list of choices is empty"));
    }
    let alternatives: Vec<String> = choices.iter().map(|c| gbnf::lark_string(c)).collect();
    Ok(TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | "))))
}

fn grammar_from_text(text: &str) -> Result<TopLevelGrammar, GrammarError> {
    if gbnf::looks_like_gbnf(text) {
        let lark =
            gbnf::gbnf_to_lark(text).map_err(|e| GrammarError::new(format!("invalid grammar: {e}")))?;
        return Ok(TopLevelGrammar::from_lark(lark));
    }
    TopLevelGrammar::from_lark_or_grammar_list(text)
        .map_err(|e| GrammarError::new(format!("invalid grammar: {e}")))
}

struct CompiledInner {
    /// A matcher at the start of the grammar; each sequence gets a clone.
    proto: Matcher,
    first_mask: SimpleVob,
    shared: Arc<Shared>,
}

/// A compiled grammar; cheap to clone. Each sequence gets its own [`GrammarMatcher`].
#[derive(Clone)]
pub struct CompiledGrammar {
    inner: Arc<CompiledInner>,
}

impl fmt::Debug for CompiledGrammar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CompiledGrammar({} first tokens allowed)", self.inner.first_mask.num_set())
    }
}

impl CompiledGrammar {
    /// A matcher at the start of the grammar.
    pub fn matcher(&self) -> GrammarMatcher {
        GrammarMatcher {
            matcher: self.inner.proto.clone(),
            mask: Some(self.inner.first_mask.clone()),
            eos_after_end: false,
            shared: self.inner.shared.clone(),
        }
    }
}

/// One sequence's position in its grammar.
#[derive(Clone)]
pub struct GrammarMatcher {
    matcher: Matcher,
    /// The allowed tokens at the current position, once computed.
    mask: Option<SimpleVob>,
    /// EOS was accepted after llguidance had already stopped (llguidance
    /// does not see that token, but rollback must count it).
    eos_after_end: bool,
    shared: Arc<Shared>,
}

impl fmt::Debug for GrammarMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrammarMatcher")
            .field("terminated", &self.is_terminated())
            .field("error", &self.matcher.get_error())
            .finish()
    }
}

impl GrammarMatcher {
    fn err(&self, context: &str) -> GrammarError {
        let detail = self.matcher.get_error().unwrap_or_else(|| format!("{:?}", self.matcher.stop_reason()));
        GrammarError::new(format!("{context}: {detail}"))
    }

    fn is_eos(&self, token: u32) -> bool {
        self.shared.eos_token_ids.contains(&token)
    }

    /// Writes the allowed-token bitmask for the next token: bit `t % 32` of
    /// word `t / 32`; `words.len()` must be `vocab_size.div_ceil(32)`. Once
    /// the grammar is complete (or cannot go on), only the EOS ids are allowed.
    pub fn fill_mask(&mut self, words: &mut [u32]) {
        let vocab_size = self.shared.vocab_size;
        assert_eq!(words.len(), vocab_size.div_ceil(32), "mask length for a vocabulary of {vocab_size}");
        words.fill(0);
        let allow_eos_only = |words: &mut [u32], eos: &[u32]| {
            for &t in eos {
                words[t as usize / 32] |= 1 << (t % 32);
            }
        };
        if self.is_terminated() {
            return allow_eos_only(words, &self.shared.eos_token_ids);
        }
        if self.mask.is_none() {
            // An error (nothing allowed, parser limits) stops the matcher: EOS ends the sequence.
            self.mask = self.matcher.compute_mask().ok();
        }
        match &self.mask {
            Some(mask) => {
                for (w, &m) in words.iter_mut().zip(mask.as_slice()) {
                    *w = m;
                }
                // The trie spans exactly the logits width; clear any bits past it.
                if vocab_size % 32 != 0 {
                    words[vocab_size / 32] &= (1u32 << (vocab_size % 32)) - 1;
                }
            }
            None => allow_eos_only(words, &self.shared.eos_token_ids),
        }
    }

    /// Advances over a sampled token; an error if the grammar did not allow it.
    pub fn accept_token(&mut self, token: u32) -> Result<(), GrammarError> {
        if token as usize >= self.shared.vocab_size {
            return Err(GrammarError::new(format!("token {token} is outside the vocabulary")));
        }
        if self.eos_after_end {
            return Err(GrammarError::new(format!("token {token} after the grammar's end-of-sequence")));
        }
        if self.matcher.is_stopped() {
            if self.is_eos(token) {
                self.eos_after_end = true;
                return Ok(());
            }
            return Err(self.err(&format!("token {token} after the grammar ended")));
        }
        match &self.mask {
            Some(mask) if !mask.is_allowed(token) => {
                return Err(GrammarError::new(format!("token {token} is not allowed by the grammar here")));
            }
            Some(_) => self.matcher.consume_token(token).map_err(|e| GrammarError::new(e.to_string()))?,
            // No mask yet: check first, so a refused token leaves the matcher usable.
            None => {
                let consumed = self
                    .matcher
                    .try_consume_tokens(&[token])
                    .map_err(|e| GrammarError::new(e.to_string()))?;
                if consumed == 0 {
                    return Err(GrammarError::new(format!(
                        "token {token} is not allowed by the grammar here"
                    )));
                }
            }
        }
        self.mask = None;
        Ok(())
    }

    /// True once the grammar has ended: it is complete and allows nothing
    /// but EOS, EOS was accepted, or it cannot go on. The sequence should stop.
    pub fn is_terminated(&self) -> bool {
        self.eos_after_end || self.matcher.is_stopped()
    }

    /// Tokens the grammar forces next (empty if none). They are not accepted:
    /// pass each to [`accept_token`](Self::accept_token).
    pub fn forced_tokens(&mut self) -> Vec<u32> {
        if self.is_terminated() {
            return Vec::new();
        }
        self.matcher.compute_ff_tokens()
    }

    /// Undoes the last `n` accepted tokens.
    pub fn rollback(&mut self, n: usize) -> Result<(), GrammarError> {
        let mut n = n;
        if n > 0 && self.eos_after_end {
            self.eos_after_end = false;
            n -= 1;
        }
        if n > 0 {
            self.matcher.rollback(n).map_err(|e| GrammarError::new(format!("rollback: {e}")))?;
        }
        self.mask = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send + Clone>() {}

    #[test]
    fn thread_safety() {
        assert_send_sync::<GrammarCompiler>();
        assert_send_sync::<CompiledGrammar>();
        assert_send::<GrammarMatcher>();
    }

    #[test]
    fn sentencepiece_vocabulary_walk() {
        let tok = vocab::tests::sentencepiece_tokenizer();
        let compiler = GrammarCompiler::new(&tok, &[2], 40).unwrap();
        let mut m = compiler.compile(&GrammarSpec::Regex(" the\na".into())).unwrap().matcher();
        let mut words = vec![0u32; 2];
        // " the" or " " may start it (any tokenization of the text is allowed), then "\n", "a", EOS.
        for (allowed, token) in [((1 << 4) | (1 << 5), 4), (1 << 3, 3), (1 << 6, 6), (1 << 2, 2)] {
            m.fill_mask(&mut words);
            assert_eq!(words, [allowed, 0]);
            m.accept_token(token).unwrap();
        }
        assert!(m.is_terminated());
    }

    #[test]
    fn choice_alternatives_are_quoted() {
        let g = choice_grammar(&["a\"b".into(), "c".into()]).unwrap();
        assert_eq!(g.grammars[0].lark_grammar.as_deref(), Some(r#"start: "a\"b" | "c""#));
        assert!(choice_grammar(&[]).is_err());
    }
}
