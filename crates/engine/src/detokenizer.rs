//! Incremental detokenization: turns a growing list of token ids into text
//! deltas that are valid UTF-8 and respect BPE merges across token boundaries.
//!
//! Decoding one token at a time is wrong for byte-level BPE: a multi-byte
//! character may span tokens, and some tokenizers change leading spaces
//! depending on what comes before. So, like vLLM, we decode a short window
//! `tokens[prefix_offset..]` and compare it with the already-emitted part
//! `tokens[prefix_offset..read_offset]`; the difference is the new text, held
//! back while it ends in an incomplete character (U+FFFD).

/// Anything that can turn token ids into text (the model's tokenizer).
pub trait TokenDecoder {
    fn decode_tokens(&self, ids: &[u32]) -> String;
}

impl<F: Fn(&[u32]) -> String> TokenDecoder for F {
    fn decode_tokens(&self, ids: &[u32]) -> String {
        self(ids)
    }
}

/// How many prompt tokens of context to decode with the first outputs.
const PROMPT_CONTEXT_TOKENS: usize = 5;

/// The detokenization state of one sequence.
#[derive(Clone, Debug)]
pub struct IncrementalDetokenizer {
    tokens: Vec<u32>,
    /// Start of the decode window.
    prefix_offset: usize,
    /// End of the part already turned into emitted text.
    read_offset: usize,
}

impl IncrementalDetokenizer {
    /// Starts after `prompt`, whose last few tokens give the first outputs their context.
    pub fn new(prompt: &[u32]) -> Self {
        let context = &prompt[prompt.len().saturating_sub(PROMPT_CONTEXT_TOKENS)..];
        Self { tokens: context.to_vec(), prefix_offset: 0, read_offset: context.len() }
    }

    /// Appends one token and returns the text it completes (possibly empty).
    pub fn push(&mut self, token: u32, decoder: &impl TokenDecoder) -> String {
        self.tokens.push(token);
        self.take_new_text(decoder, false)
    }

    /// Emits whatever is still held back (an incomplete character at the end
    /// of a finished sequence is emitted as U+FFFD, as HF does).
    pub fn flush(&mut self, decoder: &impl TokenDecoder) -> String {
        self.take_new_text(decoder, true)
    }

    fn take_new_text(&mut self, decoder: &impl TokenDecoder, force: bool) -> String {
        if self.read_offset >= self.tokens.len() {
            return String::new();
        }
        let prefix_text = decoder.decode_tokens(&self.tokens[self.prefix_offset..self.read_offset]);
        let full_text = decoder.decode_tokens(&self.tokens[self.prefix_offset..]);
        if !force && (full_text.len() <= prefix_text.len() || full_text.ends_with('\u{FFFD}')) {
            return String::new();
        }
        let new_text = match full_text.strip_prefix(prefix_text.as_str()) {
            Some(rest) => rest.to_string(),
            // The window re-decoded differently (a merge changed earlier text):
            // emit from the first char boundary past the emitted length.
            None => {
                let mut cut = prefix_text.len().min(full_text.len());
                while !full_text.is_char_boundary(cut) {
                    cut += 1;
                }
                full_text[cut..].to_string()
            }
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        // Keep the window short: only the last emitted token's context matters.
        if self.prefix_offset > 0 {
            self.tokens.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
        new_text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level toy tokenizer: token id = one byte; decoding is lossy
    /// UTF-8, exactly the situation of byte-level BPE.
    fn bytes_decoder(ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn multibyte_characters_are_emitted_whole() {
        let text = "héllo, 世界 🌏!";
        let mut d = IncrementalDetokenizer::new(&[b'>' as u32]);
        let mut out = String::new();
        for &b in text.as_bytes() {
            let delta = d.push(b as u32, &bytes_decoder);
            assert!(!delta.contains('\u{FFFD}'), "{delta:?}");
            out.push_str(&delta);
        }
        out.push_str(&d.flush(&bytes_decoder));
        assert_eq!(out, text);
    }

    #[test]
    fn truncated_character_is_flushed_as_replacement() {
        let mut d = IncrementalDetokenizer::new(&[]);
        let euro = "€".as_bytes();
        assert_eq!(d.push(b'a' as u32, &bytes_decoder), "a");
        assert_eq!(d.push(euro[0] as u32, &bytes_decoder), "");
        assert_eq!(d.push(euro[1] as u32, &bytes_decoder), "");
        assert_eq!(d.flush(&bytes_decoder), "\u{FFFD}");
    }

    #[test]
    fn context_dependent_decoding_uses_the_window() {
        // A tokenizer that drops the leading space of the first word of a
        // decode: the prompt context keeps it right.
        let vocab = ["Hello", " world", "!"];
        let dec = |ids: &[u32]| {
            let s: String = ids.iter().map(|&i| vocab[i as usize]).collect();
            s.trim_start().to_string()
        };
        let mut d = IncrementalDetokenizer::new(&[0]);
        let mut out = String::new();
        for t in [1, 2] {
            out.push_str(&d.push(t, &dec));
        }
        assert_eq!(out, " world!");
    }
}
