//! Text to token ids and back: a Hugging Face `tokenizers::Tokenizer`, read
//! from `tokenizer.json` or built from GGUF metadata, plus the special tokens
//! and flags `tokenizer_config.json` adds.

use std::path::Path;

use ahash::AHashMap;
use pagoda_backend::TokenId;
use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{ModelError, Result};
use crate::gguf::{GgufError, GgufHeader};

/// Special tokens and flags from `tokenizer_config.json` (or GGUF metadata).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// Prepend BOS when encoding with special tokens.
    pub add_bos_token: bool,
    /// Append EOS when encoding with special tokens.
    pub add_eos_token: bool,
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
}

impl TokenizerConfig {
    /// Reads `tokenizer_config.json` from a Hugging Face folder (absent: all
    /// defaults), and `chat_template.jinja` beside it, which transformers 5
    /// writes instead of the JSON field.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let mut config = if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
            let json: Value =
                serde_json::from_str(&text).map_err(|e| ModelError::config(&path, e.to_string()))?;
            Self::from_json(&json)
        } else {
            Self::default()
        };
        let jinja = dir.join("chat_template.jinja");
        if config.chat_template.is_none() && jinja.is_file() {
            config.chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?);
        }
        Ok(config)
    }

    /// From the JSON of a `tokenizer_config.json`.
    pub fn from_json(json: &Value) -> Self {
        // A special token is a string or an AddedToken object with `content`.
        let token = |key: &str| match json.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        // A template is a string, or a list of named ones of which we take "default".
        let chat_template = match json.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => {
                let named =
                    |name: &str| list.iter().find(|t| t.get("name").and_then(Value::as_str) == Some(name));
                named("default")
                    .or(list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            }
            _ => None,
        };
        Self {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            pad_token: token("pad_token"),
            unk_token: token("unk_token"),
            add_bos_token: json.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false),
            add_eos_token: json.get("add_eos_token").and_then(Value::as_bool).unwrap_or(false),
            chat_template,
        }
    }
}

/// A tokenizer with its special tokens.
///
/// A model folder without `tokenizer.json` (random-weight benchmark models)
/// gets an *absent* tokenizer, like vLLM's `--skip-tokenizer-init`: token-id
/// requests work, and every encode or decode is a clear error.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Option<tokenizers::Tokenizer>,
    /// Why `inner` is absent.
    absent_reason: String,
    config: TokenizerConfig,
    bos_token_id: Option<TokenId>,
    eos_token_id: Option<TokenId>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.config.bos_token)
            .field("eos_token", &self.config.eos_token)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Wraps a built tokenizer; special-token ids are looked up by name.
    pub fn new(inner: tokenizers::Tokenizer, config: TokenizerConfig) -> Self {
        let id = |t: &Option<String>| t.as_deref().and_then(|t| inner.token_to_id(t));
        let (bos_token_id, eos_token_id) = (id(&config.bos_token), id(&config.eos_token));
        Self { inner: Some(inner), absent_reason: String::new(), config, bos_token_id, eos_token_id }
    }

    /// No tokenizer: `reason` says why (e.g. the folder has no tokenizer.json).
    pub fn absent(reason: impl Into<String>, config: TokenizerConfig) -> Self {
        Self { inner: None, absent_reason: reason.into(), config, bos_token_id: None, eos_token_id: None }
    }

    /// Whether there is a real tokenizer.
    pub fn is_present(&self) -> bool {
        self.inner.is_some()
    }

    fn present(&self) -> Result<&tokenizers::Tokenizer> {
        self.inner.as_ref().ok_or_else(|| {
            ModelError::Tokenizer(format!(
                "this model has no tokenizer ({}): send token ids",
                self.absent_reason
            ))
        })
    }

    /// `tokenizer.json` and `tokenizer_config.json` of a Hugging Face folder.
    /// Whether encoding adds BOS is up to `tokenizer.json`'s post-processor,
    /// as in transformers. A folder without `tokenizer.json` gets an
    /// [absent](Self::absent) tokenizer.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            let reason = format!("{} has no tokenizer.json", dir.display());
            return Ok(Self::absent(reason, TokenizerConfig::from_hf_dir(dir)?));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self::new(inner, TokenizerConfig::from_hf_dir(dir)?))
    }

    /// Builds the tokenizer a GGUF file describes. Byte-level BPE
    /// (`tokenizer.ggml.model = gpt2`) is supported, with the pre-tokenizers of
    /// SmolLM, GPT-2, Llama 3 and Qwen2.
    pub fn from_gguf(header: &GgufHeader) -> Result<Self, GgufError> {
        let meta_err = |key: &str, detail: String| GgufError::Metadata { key: key.into(), detail };
        let model = header.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(meta_err(
                "tokenizer.ggml.model",
                format!("tokenizer {model:?} is not supported (only byte-level BPE, \"gpt2\")"),
            ));
        }
        let tokens = header.get_str_array("tokenizer.ggml.tokens")?;
        let merges = header.get_str_array("tokenizer.ggml.merges")?;
        let token_types: Vec<i64> = match header.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
            Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(1.0) as i64).collect(),
            None => vec![1; tokens.len()],
        };

        let vocab: AHashMap<String, u32> =
            tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| {
                    meta_err("tokenizer.ggml.merges", format!("merge {m:?} is not two tokens"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| meta_err("tokenizer.ggml.merges", e.to_string()))?;

        let pre = header.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
        let pre_tokenizer = byte_level_pre_tokenizer(pre).map_err(|d| meta_err("tokenizer.ggml.pre", d))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        // Control tokens (type 3) are special: matched whole, skippable on decode.
        // User-defined ones (type 4) are matched whole but decoded as text.
        let control: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(_, &ty)| ty == 3)
            .map(|(t, _)| AddedToken::from(t.to_string(), true).normalized(false))
            .collect();
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(_, &ty)| ty == 4)
            .map(|(t, _)| AddedToken::from(t.to_string(), false).normalized(false))
            .collect();
        inner
            .add_special_tokens(control)
            .map_err(|e| meta_err("tokenizer.ggml.token_type", e.to_string()))?;
        inner.add_tokens(user).map_err(|e| meta_err("tokenizer.ggml.token_type", e.to_string()))?;

        let token_at = |key: &str| {
            header
                .get(key)
                .and_then(|v| v.as_u64())
                .and_then(|i| tokens.get(i as usize))
                .map(|t| t.to_string())
        };
        let config = TokenizerConfig {
            bos_token: token_at("tokenizer.ggml.bos_token_id"),
            eos_token: token_at("tokenizer.ggml.eos_token_id"),
            pad_token: token_at("tokenizer.ggml.padding_token_id"),
            unk_token: token_at("tokenizer.ggml.unknown_token_id"),
            add_bos_token: header
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            add_eos_token: header
                .get("tokenizer.ggml.add_eos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            chat_template: header.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_string),
        };

        // BOS/EOS on encode, as transformers sets it up for a GGUF tokenizer.
        let bos = config.bos_token.clone().filter(|_| config.add_bos_token);
        let eos = config.eos_token.clone().filter(|_| config.add_eos_token);
        if bos.is_some() || eos.is_some() {
            let mut single = Vec::new();
            let mut specials = Vec::new();
            for t in [&bos, &eos].into_iter().flatten() {
                if let Some(id) = inner.token_to_id(t) {
                    specials.push((t.clone(), id));
                }
            }
            if let Some(b) = &bos {
                single.push(b.clone());
            }
            single.push("$A".to_string());
            if let Some(e) = &eos {
                single.push(e.clone());
            }
            let processor = TemplateProcessing::builder()
                .try_single(single.join(" "))
                .map_err(|e| meta_err("tokenizer.ggml.add_bos_token", e.to_string()))?
                .special_tokens(specials)
                .build()
                .map_err(|e| meta_err("tokenizer.ggml.add_bos_token", e.to_string()))?;
            inner.with_post_processor(Some(processor));
        }
        Ok(Self::new(inner, config))
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor
    /// (BOS/EOS where the model wants them). Special-token text such as
    /// `<|im_start|>` is always matched whole.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenId>> {
        let enc = self.present()?.encode(text, add_special_tokens).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; `skip_special_tokens` drops control tokens.
    pub fn decode(&self, ids: &[TokenId], skip_special_tokens: bool) -> Result<String> {
        let inner = self.present()?;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size()) {
            return Err(ModelError::Tokenizer(format!("token id {bad} is outside the vocabulary")));
        }
        inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    pub fn token_to_id(&self, token: &str) -> Option<TokenId> {
        self.inner.as_ref()?.token_to_id(token)
    }

    pub fn id_to_token(&self, id: TokenId) -> Option<String> {
        self.inner.as_ref()?.id_to_token(id)
    }

    /// Vocabulary size including added tokens (0 when absent).
    pub fn vocab_size(&self) -> usize {
        self.inner.as_ref().map_or(0, |t| t.get_vocab_size(true))
    }

    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    pub fn bos_token_id(&self) -> Option<TokenId> {
        self.bos_token_id
    }

    pub fn eos_token_id(&self) -> Option<TokenId> {
        self.eos_token_id
    }

    /// The underlying `tokenizers` tokenizer, if present.
    pub fn inner(&self) -> Option<&tokenizers::Tokenizer> {
        self.inner.as_ref()
    }
}

/// The split pattern of Llama 3's tokenizer (tiktoken's cl100k style).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: as Llama 3's, but digits split one by one.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer of a byte-level BPE vocabulary, by llama.cpp's `pre` name.
fn byte_level_pre_tokenizer(pre: &str) -> std::result::Result<PreTokenizerWrapper, String> {
    let regex_then_bytes = |pattern: &str| -> std::result::Result<PreTokenizerWrapper, String> {
        let split = Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| e.to_string())?;
        Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
    };
    match pre {
        // SmolLM's (and StarCoder's) tokenizer.json: every digit on its own, then GPT-2's split.
        "smollm" | "starcoder" => {
            Ok(Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into())
        }
        "default" | "gpt2" | "gpt-2" => Ok(ByteLevel::new(false, true, true).into()),
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" | "falcon3" => {
            regex_then_bytes(LLAMA3_SPLIT)
        }
        "qwen2" | "deepseek-r1-qwen" => regex_then_bytes(QWEN2_SPLIT),
        other => Err(format!(
            "pre-tokenizer {other:?} is not supported (supported: smollm, starcoder, gpt2, llama-bpe, qwen2)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_reads_strings_objects_and_template_lists() {
        let j = json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "add_bos_token": true,
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
        });
        let c = TokenizerConfig::from_json(&j);
        assert_eq!(c.bos_token.as_deref(), Some("<s>"));
        assert_eq!(c.eos_token.as_deref(), Some("</s>"));
        assert!(c.add_bos_token && !c.add_eos_token);
        assert_eq!(c.chat_template.as_deref(), Some("D"));
    }

    #[test]
    fn unknown_pre_tokenizers_are_refused() {
        assert!(byte_level_pre_tokenizer("smollm").is_ok());
        assert!(byte_level_pre_tokenizer("llama-bpe").is_ok());
        assert!(byte_level_pre_tokenizer("qwen2").is_ok());
        assert!(byte_level_pre_tokenizer("chatglm-bpe").is_err());
    }
}
