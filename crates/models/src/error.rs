use std::path::PathBuf;

use pagoda_backend::BackendError;
use thiserror::Error;

use crate::gguf::GgufError;

/// What can go wrong finding, parsing or running a model.
///
/// Each message is complete on its own: a variant that wraps another error
/// prints it in its message and does not also return it as its `source()`,
/// or a chain printer (anyhow's `{:#}`) would print the cause twice.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A file could not be opened or read.
    #[error("{}: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },
    /// The model path does not hold what a model folder needs.
    #[error("{}: {detail}", path.display())]
    ModelPath { path: PathBuf, detail: String },
    /// `config.json` (or another JSON file) is not what we expect.
    #[error("{}: {detail}", path.display())]
    Config { path: PathBuf, detail: String },
    /// The architecture is not one of the Llama family this crate runs.
    #[error("unsupported architecture {0:?} (supported: Llama, Mistral, Qwen2 and the Llama-family GGUFs)")]
    UnknownArchitecture(String),
    /// A safetensors file is corrupt or truncated.
    #[error("{}: invalid safetensors file: {detail}", path.display())]
    Safetensors { path: PathBuf, detail: String },
    /// A GGUF file is corrupt, truncated or of a kind we cannot read.
    #[error("{}: {cause}", path.display())]
    Gguf { path: PathBuf, cause: GgufError },
    /// The weights lack a tensor the architecture needs.
    #[error("missing tensor {0:?} in the weights")]
    MissingTensor(String),
    /// A tensor's shape does not fit the config.
    #[error("tensor {name:?}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, found: Vec<usize> },
    /// A tensor's element type cannot be loaded.
    #[error("tensor {name:?}: unsupported dtype {dtype}")]
    UnsupportedDType { name: String, dtype: String },
    /// A tensor's values are out of what they may be (a KV-cache scale that
    /// is not positive and finite).
    #[error("tensor {name:?}: {detail}")]
    InvalidTensor { name: String, detail: String },
    /// A KV cache the model cannot run with (its dtype).
    #[error("KV cache: {0}")]
    KvCache(String),
    /// The tokenizer could not be built or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template failed to compile or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// The model cannot be split over the tensor-parallel ranks asked for
    /// (a size that does not divide), or a feature does not run sharded.
    #[error("tensor parallelism: {0}")]
    TensorParallel(String),
    /// A forward-pass input is inconsistent (the message says how).
    /// FP8 weights: a checkpoint's scales, or a feature they do not combine with.
    #[error("FP8 weights: {0}")]
    Quantization(String),

    #[error("forward: {0}")]
    Forward(String),
    /// The backend rejected an op.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), cause: source }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Self::Config { path: path.into(), detail: detail.into() }
    }
}
