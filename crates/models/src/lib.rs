//! Pagoda's models: loading Llama-family checkpoints (Hugging Face folders of
//! safetensors, or GGUF files), their tokenizers and chat templates, and the
//! forward pass over the [`Backend`](pagoda_backend::Backend) trait.
//!
//! - [`ModelFiles::open`] takes a `--model PATH` (a Hugging Face folder, a
//!   folder with one `.gguf`, or a `.gguf` file) and reads the
//!   [`ModelConfig`], [`Tokenizer`], [`ChatTemplate`] and
//!   [`GenerationConfig`]; weights stay memory-mapped.
//! - [`ModelFiles::load_model`] uploads the weights tensor by tensor in the
//!   backend's activation dtype (safetensors bytes go straight from the map;
//!   GGUF blocks are dequantised to f32 one tensor at a time).
//! - [`ModelFiles::open_with`] [`LoadFormat::Dummy`] needs only `config.json`:
//!   the weights are seeded random values ([`DummyWeights`]) that the backend
//!   makes in place, so shapes larger than any disk load in seconds.
//! - [`LlamaModel::forward`] runs one step of a batch over a paged KV cache
//!   and returns the logits of the rows asked for.
//! - [`LlamaModel::load_sharded`] loads one rank's tensor-parallel shard
//!   ([`TpShard`]); its forward pass meets the other ranks' through a
//!   [`Communicator`](pagoda_backend::Communicator).
//!
//! RoPE: the whole crate uses Hugging Face's `rotate_half` layout
//! ([`RopeStyle::Neox`](pagoda_backend::RopeStyle::Neox)); the row
//! permutation llama.cpp applies to Llama q/k weights in GGUF files is undone
//! at load.
//!
//! ```no_run
//! use pagoda_backend_cpu_ref::CpuBackend;
//! use pagoda_models::{ChatMessage, LoadOptions, ModelFiles, SingleSequence};
//!
//! let files = ModelFiles::open("models/smollm2-135m-instruct")?;
//! let backend = CpuBackend::new();
//! let model = files.load_model(&backend, &LoadOptions::default(), &mut |done, total| {
//!     eprint!("\rloading {done}/{total} bytes");
//! })?;
//! let template = files.chat_template.as_ref().expect("SmolLM2 has a chat template");
//! let prompt = template.render(&[ChatMessage::new("user", "What is 2+2?")], true)?;
//! let ids = files.tokenizer.encode(&prompt, true)?;
//! let mut seq = SingleSequence::new(&backend, &model, 256, 16)?;
//! let out = seq.generate_greedy(&backend, &ids, 32, &files.generation.eos_token_ids)?;
//! println!("{}", files.tokenizer.decode(&out, true)?);
//! # Ok::<(), pagoda_models::ModelError>(())
//! ```

mod chat_template;
mod config;
pub mod dequant;
mod dummy;
mod error;
mod generation;
pub mod gguf;
mod llama;
mod loader;
mod lora;
mod quantization;
pub mod rope;
mod sequence;
mod tensor_parallel;
mod tokenizer;
pub mod weights;

pub use chat_template::{cut_after_final_message, ChatMessage, ChatTemplate};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use dummy::{DummyWeights, DEFAULT_DUMMY_SEED};
pub use error::{ModelError, Result};
pub use generation::GenerationConfig;
pub use gguf::{GgmlType, GgufError, GgufFile, GgufHeader, GgufValue};
pub use llama::{ForwardBatch, KvCache, LlamaModel, LoadOptions, LoraTokens};
pub use loader::{load_model, LoadFormat, LoadedModel, ModelFiles, ModelSource};
pub use lora::{splitmix64, LoraAdapter, LoraModule, LoraPair, LoraSlots, SyntheticLora};
pub use quantization::{ActivationScheme, CheckpointQuantization, Fp8CheckpointFormat, Quantization};
pub use sequence::SingleSequence;
pub use tensor_parallel::TpShard;
pub use tokenizer::{Tokenizer, TokenizerConfig};
