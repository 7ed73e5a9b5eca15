//! From a `--model PATH` to a model on a device: find the files, read the
//! config, tokenizer, chat template and generation defaults, then upload the
//! weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pagoda_backend::{Backend, Communicator};

use crate::chat_template::ChatTemplate;
use crate::config::{ModelConfig, RopeScaling};
use crate::dequant::dequantize;
use crate::dummy::{DummyWeights, DEFAULT_DUMMY_SEED};
use crate::error::{ModelError, Result};
use crate::generation::GenerationConfig;
use crate::gguf::{GgufError, GgufFile};
use crate::llama::{LlamaModel, LoadOptions};
use crate::tokenizer::Tokenizer;
use crate::weights::{GgufWeights, SafetensorsWeights, WeightSource};

/// Where a model's files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face folder: `config.json`, `*.safetensors`, `tokenizer.json`...
    HuggingFace(PathBuf),
    /// One GGUF file holding weights, config and tokenizer.
    Gguf(PathBuf),
}

impl ModelSource {
    /// Interprets `--model PATH`: a Hugging Face folder (it has `config.json`),
    /// a folder holding exactly one `.gguf`, or a `.gguf` file.
    pub fn resolve(path: &Path) -> Result<Self> {
        let err = |detail: String| ModelError::ModelPath { path: path.to_path_buf(), detail };
        if !path.exists() {
            return Err(err("does not exist".into()));
        }
        if path.is_file() {
            let is_gguf = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
            return if is_gguf {
                Ok(Self::Gguf(path.to_path_buf()))
            } else {
                Err(err("is a file but not a .gguf; pass a .gguf file or a model folder".into()))
            };
        }
        if path.join("config.json").is_file() {
            return Ok(Self::HuggingFace(path.to_path_buf()));
        }
        let entries = std::fs::read_dir(path).map_err(|e| ModelError::io(path, e))?;
        let mut ggufs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")))
            .collect();
        ggufs.sort();
        match ggufs.len() {
            1 => Ok(Self::Gguf(ggufs.remove(0))),
            0 => Err(err("holds neither config.json (a Hugging Face model) nor a .gguf file".into())),
            _ => Err(err(format!(
                "holds {} .gguf files ({}); pass the one to load",
                ggufs.len(),
                ggufs
                    .iter()
                    .filter_map(|p| p.file_name())
                    .map(|n| n.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::HuggingFace(p) | Self::Gguf(p) => p,
        }
    }
}

/// How the weights of `--model PATH` are read (vLLM's `--load-format`, the
/// formats this engine has). vLLM's other formats (`pt`, `npcache`,
/// `bitsandbytes`, ...) are refused by name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadFormat {
    /// What the path holds: a Hugging Face folder's safetensors, or a GGUF file.
    #[default]
    Auto,
    /// A Hugging Face folder's safetensors (a GGUF path is refused).
    Safetensors,
    /// A GGUF file, or a folder holding one (a Hugging Face folder is refused).
    Gguf,
    /// Seeded random weights ([`DummyWeights`]) for the shape of the folder's
    /// `config.json`, made on the device: no weight file is read, or needed.
    Dummy,
}

impl LoadFormat {
    /// vLLM's `--load-format` values that Pagoda does not load.
    const UNSUPPORTED: [&'static str; 10] = [
        "pt",
        "npcache",
        "tensorizer",
        "sharded_state",
        "bitsandbytes",
        "mistral",
        "runai_streamer",
        "runai_streamer_sharded",
        "fastsafetensors",
        "extensible",
    ];
}

impl std::str::FromStr for LoadFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "safetensors" => Ok(Self::Safetensors),
            "gguf" => Ok(Self::Gguf),
            "dummy" => Ok(Self::Dummy),
            other if Self::UNSUPPORTED.contains(&other) => Err(format!(
                "--load-format {other} is not supported: Pagoda loads auto, safetensors, gguf or dummy"
            )),
            other => Err(format!("--load-format {other:?}: expected auto, safetensors, gguf or dummy")),
        }
    }
}

impl std::fmt::Display for LoadFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Safetensors => "safetensors",
            Self::Gguf => "gguf",
            Self::Dummy => "dummy",
        })
    }
}

/// A model's files, opened and parsed, with the weights memory-mapped but
/// not yet on any device.
pub struct ModelFiles {
    pub source: ModelSource,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub generation: GenerationConfig,
    /// Shared so that the ranks of a tensor-parallel group can each load
    /// their shard from one mapping, on threads of their own.
    weights: Arc<dyn WeightSource + Send + Sync>,
}

impl std::fmt::Debug for ModelFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFiles")
            .field("source", &self.source)
            .field("config", &self.config)
            .field("tokenizer", &self.tokenizer)
            .finish_non_exhaustive()
    }
}

impl ModelFiles {
    /// Resolves `path` (see [`ModelSource::resolve`]) and opens what it holds.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, LoadFormat::Auto)
    }

    /// [`ModelFiles::open`] in a given [`LoadFormat`]: a path that does not
    /// hold what the format reads is refused, naming the flag.
    /// [`LoadFormat::Dummy`] seeds its weights with [`DEFAULT_DUMMY_SEED`].
    pub fn open_with(path: impl AsRef<Path>, format: LoadFormat) -> Result<Self> {
        let path = path.as_ref();
        let refuse = |detail: &str| {
            Err(ModelError::ModelPath {
                path: path.to_path_buf(),
                detail: format!("--load-format {format}: {detail}"),
            })
        };
        match (format, ModelSource::resolve(path)?) {
            (LoadFormat::Auto | LoadFormat::Safetensors, ModelSource::HuggingFace(dir)) => {
                Self::open_hf(dir, None)
            }
            (LoadFormat::Auto | LoadFormat::Gguf, ModelSource::Gguf(file)) => Self::open_gguf(file),
            (LoadFormat::Dummy, ModelSource::HuggingFace(dir)) => {
                Self::open_hf(dir, Some(DEFAULT_DUMMY_SEED))
            }
            (LoadFormat::Safetensors, ModelSource::Gguf(_)) => {
                refuse("this is a GGUF model, not a folder of safetensors (use gguf or auto)")
            }
            (LoadFormat::Gguf, ModelSource::HuggingFace(_)) => refuse(
                "this is a Hugging Face folder (config.json), not a GGUF file (use safetensors or auto)",
            ),
            (LoadFormat::Dummy, ModelSource::Gguf(_)) => {
                refuse("dummy weights take their shape from a folder's config.json; this is a GGUF file")
            }
        }
    }

    /// A Hugging Face folder with random weights for its `config.json`
    /// ([`DummyWeights`], seeded by `seed`): no weight file is opened.
    pub fn open_dummy(dir: impl AsRef<Path>, seed: u64) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.join("config.json").is_file() {
            return Err(ModelError::ModelPath {
                path: dir.to_path_buf(),
                detail: "--load-format dummy needs a folder holding config.json".into(),
            });
        }
        Self::open_hf(dir.to_path_buf(), Some(seed))
    }

    /// A Hugging Face folder; `dummy_seed` makes random weights instead of
    /// opening the safetensors.
    fn open_hf(dir: PathBuf, dummy_seed: Option<u64>) -> Result<Self> {
        let config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
        let tokenizer = Tokenizer::from_hf_dir(&dir)?;
        let chat_template = ChatTemplate::from_tokenizer_config(tokenizer.config())?;
        let mut generation = GenerationConfig::from_hf_dir(&dir)?;
        generation
            .validate_token_ids(config.vocab_size)
            .map_err(|detail| ModelError::config(dir.join("generation_config.json"), detail))?;
        generation.add_eos_tokens(config.eos_token_ids.iter().copied());
        generation.add_eos_tokens(tokenizer.eos_token_id());
        if generation.bos_token_id.is_none() {
            generation.bos_token_id = config.bos_token_id;
        }
        let weights: Arc<dyn WeightSource + Send + Sync> = match dummy_seed {
            Some(seed) => Arc::new(
                DummyWeights::new(&config, seed)
                    .map_err(|detail| ModelError::config(dir.join("config.json"), detail))?,
            ),
            None => Arc::new(SafetensorsWeights::open_dir(&dir)?),
        };
        Ok(Self {
            source: ModelSource::HuggingFace(dir),
            config,
            tokenizer,
            chat_template,
            generation,
            weights,
        })
    }

    fn open_gguf(path: PathBuf) -> Result<Self> {
        let file = GgufFile::open(&path)?;
        let header = file.header();
        let mut config = ModelConfig::from_gguf(header, header.tensor("output.weight").is_some())
            .map_err(|e| file.err(e))?;
        // Llama 3.1 GGUFs carry their rope scaling as one divisor per frequency.
        if let Some(info) = header.tensor("rope_freqs.weight") {
            let mut factors = vec![0f32; info.numel() as usize];
            dequantize(&info.name, info.ggml_type, file.tensor_bytes(info), &mut factors)
                .map_err(|e| file.err(e))?;
            config.rope_scaling = RopeScaling::PerFrequency(factors.iter().map(|&f| f as f64).collect());
        }
        let tokenizer = Tokenizer::from_gguf(header).map_err(|e| file.err(e))?;
        let chat_template = ChatTemplate::from_tokenizer_config(tokenizer.config())?;
        let mut generation = GenerationConfig {
            bos_token_id: config.bos_token_id,
            eos_token_ids: config.eos_token_ids.clone(),
            ..GenerationConfig::default()
        };
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            let id = header.get(key).and_then(|v| v.as_u64());
            if let Some(id) = id.filter(|&id| id >= config.vocab_size as u64) {
                return Err(file.err(GgufError::Metadata {
                    key: key.into(),
                    detail: format!("{id} is outside the vocabulary of {} tokens", config.vocab_size),
                }));
            }
            generation.add_eos_tokens(id.map(|v| v as u32));
        }
        let weights =
            GgufWeights::new(file, config.architecture, config.num_attention_heads, config.num_kv_heads);
        Ok(Self {
            source: ModelSource::Gguf(path),
            config,
            tokenizer,
            chat_template,
            generation,
            weights: Arc::new(weights),
        })
    }

    /// The weights, by Hugging Face tensor name.
    pub fn weights(&self) -> &dyn WeightSource {
        self.weights.as_ref()
    }

    /// The weights, shared: what a tensor-parallel rank on another thread
    /// loads its shard from ([`LlamaModel::load_sharded`]) while the text
    /// side (tokenizer, templates) stays with these files.
    pub fn shared_weights(&self) -> Arc<dyn WeightSource + Send + Sync> {
        self.weights.clone()
    }

    /// Uploads the weights to `backend`; `progress(done_bytes, total_bytes)`
    /// is called after every tensor.
    pub fn load_model<B: Backend>(
        &self,
        backend: &B,
        options: &LoadOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<LlamaModel<B>> {
        LlamaModel::load(backend, self.config.clone(), self.weights.as_ref(), options, progress)
    }

    /// Uploads rank `comm.rank()`'s tensor-parallel shard of the weights
    /// ([`LlamaModel::load_sharded`]). The files are shared: every rank may
    /// load from one `ModelFiles` at once.
    pub fn load_model_sharded<B: Backend>(
        &self,
        backend: &B,
        options: &LoadOptions,
        comm: Arc<dyn Communicator<B>>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<LlamaModel<B>> {
        LlamaModel::load_sharded(backend, self.config.clone(), self.weights.as_ref(), options, comm, progress)
    }

    /// The text side of these files with `model` (loaded from them): what serving needs.
    pub fn into_loaded<B: Backend>(self, model: LlamaModel<B>) -> LoadedModel<B> {
        LoadedModel {
            source: self.source,
            model,
            tokenizer: self.tokenizer,
            chat_template: self.chat_template,
            generation: self.generation,
        }
    }
}

/// Everything needed to serve a model: the weights on a device and the text side.
pub struct LoadedModel<B: Backend> {
    pub source: ModelSource,
    pub model: LlamaModel<B>,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub generation: GenerationConfig,
}

/// Opens `path` and uploads its weights to `backend` in one go.
pub fn load_model<B: Backend>(
    backend: &B,
    path: impl AsRef<Path>,
    options: &LoadOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<LoadedModel<B>> {
    let files = ModelFiles::open(path)?;
    let model = files.load_model(backend, options, progress)?;
    Ok(files.into_loaded(model))
}
