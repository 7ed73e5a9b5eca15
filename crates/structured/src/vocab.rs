//! The model's vocabulary as llguidance sees it: every token id's exact bytes
//! (in a token trie) and a tokenizer for the bytes a grammar forces.

use std::collections::HashMap;

use pagoda_models::Tokenizer;
use toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::GrammarError;

/// How a vocabulary spells bytes in its token strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VocabStyle {
    /// GPT-2 byte-level BPE: each byte is one printable stand-in character (`Ġ` for a space).
    ByteLevel,
    /// SentencePiece: `▁` for a space, `<0xNN>` for a raw byte.
    SentencePiece,
    /// Token strings are the text itself.
    Plain,
}

/// GPT-2's `bytes_to_unicode`, inverted: stand-in character to byte.
fn byte_level_decoder() -> HashMap<char, u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut map = HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let c = if printable(b) {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).expect("below the surrogates")
        };
        map.insert(c, b);
    }
    map
}

/// `<0x0A>` to 0x0A.
fn sentencepiece_byte(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

fn detect_style(inner: &tokenizers::Tokenizer, vocab: &HashMap<String, u32>) -> VocabStyle {
    // The decoder says it outright for tokenizer.json and GGUF tokenizers alike.
    let decoder = inner.get_decoder().and_then(|d| serde_json::to_string(d).ok()).unwrap_or_default();
    if decoder.contains("\"ByteLevel\"") {
        return VocabStyle::ByteLevel;
    }
    if decoder.contains("\"Metaspace\"") || decoder.contains("\"ByteFallback\"") {
        return VocabStyle::SentencePiece;
    }
    // No decoder: the vocabulary's own spelling decides.
    if vocab.contains_key("<0x0A>") || vocab.keys().any(|t| t.starts_with('▁')) {
        VocabStyle::SentencePiece
    } else if vocab.contains_key("Ġ") {
        VocabStyle::ByteLevel
    } else {
        VocabStyle::Plain
    }
}

/// The bytes of every token id below `vocab_size`; ids the tokenizer does not
/// have (padding up to the logits width) get no bytes, so no grammar allows them.
/// Special tokens get llguidance's marker byte (0xFF) before their text, so
/// grammar text can never produce them by accident.
fn token_bytes(inner: &tokenizers::Tokenizer, vocab_size: usize) -> (Vec<Vec<u8>>, VocabStyle) {
    let vocab = inner.get_vocab(true);
    let style = detect_style(inner, &vocab);
    let byte_level = byte_level_decoder();
    let added = inner.get_added_tokens_decoder();

    let mut words = vec![Vec::new(); vocab_size];
    for (text, &id) in &vocab {
        let Some(slot) = words.get_mut(id as usize) else { continue };
        *slot = match added.get(&id) {
            Some(tok) if tok.special => {
                let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                b.extend_from_slice(tok.content.as_bytes());
                b
            }
            // Added non-special tokens are matched and decoded as their literal text.
            Some(tok) => tok.content.as_bytes().to_vec(),
            None => match style {
                VocabStyle::ByteLevel => {
                    let bytes: Option<Vec<u8>> = text.chars().map(|c| byte_level.get(&c).copied()).collect();
                    bytes.unwrap_or_else(|| text.as_bytes().to_vec())
                }
                VocabStyle::SentencePiece => match sentencepiece_byte(text) {
                    Some(b) => vec![b],
                    None => text.replace('▁', " ").into_bytes(),
                },
                VocabStyle::Plain => text.as_bytes().to_vec(),
            },
        };
    }
    (words, style)
}

/// llguidance's view of the tokenizer: the trie, plus the real tokenizer for
/// turning forced bytes into the tokens the model would have produced.
pub(crate) struct ModelTokEnv {
    trie: TokTrie,
    tokenizer: Tokenizer,
    /// Only a byte-level BPE tokenizes any byte string to tokens spelling
    /// exactly those bytes; SentencePiece adds a leading space, so there
    /// llguidance must not force tokens from our tokenization.
    canonical: bool,
}

impl ModelTokEnv {
    pub(crate) fn new(
        tokenizer: &Tokenizer,
        eos_token_ids: &[u32],
        vocab_size: usize,
    ) -> Result<Self, GrammarError> {
        let inner = tokenizer.inner().ok_or_else(|| {
            GrammarError::new("structured output needs the model's tokenizer, and this model has none")
        })?;
        if vocab_size == 0 || vocab_size > u32::MAX as usize {
            return Err(GrammarError::new(format!("vocabulary size {vocab_size} is out of range")));
        }
        let (words, style) = token_bytes(inner, vocab_size);
        let mut eos: Vec<TokenId> =
            eos_token_ids.iter().copied().filter(|&t| (t as usize) < vocab_size).collect();
        if eos.is_empty() {
            eos.extend(tokenizer.eos_token_id().filter(|&t| (t as usize) < vocab_size));
        }
        if eos.is_empty() {
            return Err(GrammarError::new(
                "structured output needs an end-of-sequence token id within the vocabulary",
            ));
        }
        let mut info = TokRxInfo::new(vocab_size as u32, eos[0]);
        info.tok_bos = tokenizer.bos_token_id().filter(|&t| (t as usize) < vocab_size);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos);
        Ok(Self { trie, tokenizer: tokenizer.clone(), canonical: style == VocabStyle::ByteLevel })
    }
}

impl TokenizerEnv for ModelTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let vocab_size = self.trie.vocab_size();
        self.trie.tokenize_with_greedy_fallback(s, |text| match self.tokenizer.encode(text, false) {
            Ok(ids) if ids.iter().all(|&t| (t as usize) < vocab_size) => ids,
            // An id past the logits width (or a failed encode) cannot be forced.
            _ => self.trie.greedy_tokenize(text.as_bytes()),
        })
    }

    fn tokenize_is_canonical(&self) -> bool {
        self.canonical
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A Llama-2-style (SentencePiece, byte fallback) tokenizer with a tiny vocabulary.
    pub(crate) fn sentencepiece_tokenizer() -> Tokenizer {
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        };
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}
            ]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "▁the": 4, "▁": 5, "a": 6},
                "merges": []}
        });
        let inner: tokenizers::Tokenizer = json.to_string().parse().expect("tokenizer JSON");
        let config = pagoda_models::TokenizerConfig {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            ..Default::default()
        };
        Tokenizer::new(inner, config)
    }

    #[test]
    fn sentencepiece_vocabulary_bytes() {
        let tok = sentencepiece_tokenizer();
        let (words, style) = token_bytes(tok.inner().unwrap(), 9);
        assert_eq!(style, VocabStyle::SentencePiece);
        let special = |s: &str| [&[0xFF][..], s.as_bytes()].concat();
        let want: Vec<Vec<u8>> = vec![
            special("<unk>"),
            special("<s>"),
            special("</s>"),
            b"\n".to_vec(),
            b" the".to_vec(),
            b" ".to_vec(),
            b"a".to_vec(),
            vec![],
            vec![],
        ];
        assert_eq!(words, want);
        let env = ModelTokEnv::new(&tok, &[], 9).unwrap();
        assert!(!env.tokenize_is_canonical(), "SentencePiece adds a leading space: no forcing from it");
        assert_eq!(env.tok_trie().eos_tokens(), &[2], "the tokenizer's EOS when none is given");
    }

    #[test]
    fn byte_level_stand_ins_map_back_to_bytes() {
        let map = byte_level_decoder();
        assert_eq!(map.len(), 256);
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'Ċ'], b'\n');
        assert_eq!(map[&'a'], b'a');
        assert_eq!(map[&'ÿ'], 0xFF);
    }

    #[test]
    fn sentencepiece_byte_tokens() {
        assert_eq!(sentencepiece_byte("<0x0A>"), Some(b'\n'));
        assert_eq!(sentencepiece_byte("<0xFF>"), Some(0xFF));
        assert_eq!(sentencepiece_byte("<0x0>"), None);
        assert_eq!(sentencepiece_byte("<s>"), None);
    }
}
