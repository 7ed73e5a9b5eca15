//! Where the weights come from: memory-mapped safetensors (one file or
//! shards) or a GGUF file, both addressed by Hugging Face tensor names, or
//! random values made on the device ([`DummyWeights`]).
//!
//! Safetensors data is handed out as borrowed bytes straight from the map,
//! so a tensor is never copied on the host before the backend uploads it.
//! GGUF data is dequantised to f32 one tensor at a time.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use pagoda_backend::DType;
use safetensors::tensor::Metadata;
use safetensors::{Dtype as StDtype, SafeTensors};
use serde_json::Value;

use crate::config::Architecture;
use crate::dequant::dequantize;
use crate::dummy::DummyWeights;
use crate::error::{ModelError, Result};
use crate::gguf::{GgufError, GgufFile};

/// A tensor's elements, as borrowed file bytes or as an owned f32 buffer.
pub enum WeightData<'a> {
    /// Little-endian elements of the dtype, borrowed from the file's map.
    Borrowed(&'a [u8], DType),
    /// Dequantised (or otherwise converted) values.
    Owned(Vec<f32>),
}

/// One tensor, row-major, under its Hugging Face name.
pub struct WeightTensor<'a> {
    pub shape: Vec<usize>,
    pub data: WeightData<'a>,
}

/// A store of named tensors.
pub trait WeightSource {
    /// Whether a tensor of this (Hugging Face) name exists.
    fn contains(&self, name: &str) -> bool {
        self.shape(name).is_some()
    }
    /// The row-major shape of a tensor, if it exists (no data is read).
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Bytes the tensor takes in the file (what loading progress counts).
    fn file_bytes(&self, name: &str) -> u64;
    /// The tensor, or [`ModelError::MissingTensor`].
    fn tensor(&self, name: &str) -> Result<WeightTensor<'_>>;
    /// Weights a backend makes itself, on its device, instead of uploading
    /// [`WeightSource::tensor`]'s data: `Some` for random weights
    /// (`--load-format dummy`), which the loader then fills in place.
    fn on_device(&self) -> Option<&DummyWeights> {
        None
    }
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// One or more memory-mapped safetensors files.
pub struct SafetensorsWeights {
    shards: Vec<Shard>,
    /// Tensor name to index in `shards`.
    index: HashMap<String, usize>,
}

impl SafetensorsWeights {
    /// Opens `model.safetensors`, or the shards `model.safetensors.index.json` lists,
    /// in a Hugging Face folder.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let json: Value =
                serde_json::from_str(&text).map_err(|e| ModelError::config(&index_path, e.to_string()))?;
            let map = json
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| ModelError::config(&index_path, "no `weight_map` object"))?;
            let mut files: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    ModelError::config(&index_path, format!("{tensor}: file is not a string"))
                })?;
                files.entry(file).or_default().push(tensor);
            }
            let paths: Vec<PathBuf> = files.keys().map(|f| dir.join(f)).collect();
            let weights = Self::open_files(&paths)?;
            // Every tensor the index promises must be in the shard it names.
            for (file, tensors) in files {
                for t in tensors {
                    let found = weights.index.get(t).map(|&i| weights.shards[i].path.ends_with(file));
                    if found != Some(true) {
                        return Err(ModelError::Safetensors {
                            path: dir.join(file),
                            detail: format!("index lists tensor {t:?}, which the file does not hold"),
                        });
                    }
                }
            }
            Ok(weights)
        } else if single.is_file() {
            Self::open_files(&[single])
        } else {
            Err(ModelError::ModelPath {
                path: dir.to_path_buf(),
                detail: "no model.safetensors or model.safetensors.index.json \
                         (--load-format dummy makes random weights from config.json alone)"
                    .into(),
            })
        }
    }

    /// Opens and validates the given files (headers parsed, sizes checked).
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
            // SAFETY: read-only map; the file must not be truncated while mapped.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| ModelError::Safetensors { path: path.clone(), detail: e.to_string() })?;
            for name in metadata.tensors().keys() {
                if index.insert(name.clone(), shards.len()).is_some() {
                    return Err(ModelError::Safetensors {
                        path: path.clone(),
                        detail: format!("tensor {name:?} appears in more than one file"),
                    });
                }
            }
            shards.push(Shard { path: path.clone(), mmap, header_len, metadata });
        }
        Ok(Self { shards, index })
    }

    /// Names of all tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }
}

impl WeightSource for SafetensorsWeights {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let shard = &self.shards[*self.index.get(name)?];
        shard.metadata.info(name).map(|info| info.shape.clone())
    }

    fn file_bytes(&self, name: &str) -> u64 {
        self.index
            .get(name)
            .and_then(|&i| self.shards[i].metadata.info(name))
            .map(|info| (info.data_offsets.1 - info.data_offsets.0) as u64)
            .unwrap_or(0)
    }

    fn tensor(&self, name: &str) -> Result<WeightTensor<'_>> {
        let missing = || ModelError::MissingTensor(name.into());
        let shard = &self.shards[*self.index.get(name).ok_or_else(missing)?];
        let info = shard.metadata.info(name).ok_or_else(missing)?;
        let dtype = match info.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            // FP8 checkpoints' weights (`quantization_config`), one code a byte.
            StDtype::F8_E4M3 => DType::F8E4M3,
            other => {
                return Err(ModelError::UnsupportedDType { name: name.into(), dtype: format!("{other:?}") })
            }
        };
        // read_metadata checked the offsets cover the file exactly; check the
        // shape agrees with the byte count too, so a bad header cannot make us
        // hand the backend a short buffer.
        let (start, end) = info.data_offsets;
        let numel: usize = info.shape.iter().product();
        if end - start != numel * dtype.size_in_bytes() {
            return Err(ModelError::Safetensors {
                path: shard.path.clone(),
                detail: format!("tensor {name:?}: {} bytes for shape {:?}", end - start, info.shape),
            });
        }
        let base = 8 + shard.header_len;
        let bytes = &shard.mmap[base + start..base + end];
        Ok(WeightTensor { shape: info.shape.clone(), data: WeightData::Borrowed(bytes, dtype) })
    }
}

/// A GGUF file, seen through Hugging Face tensor names.
///
/// llama.cpp's converter reorders the rows of each Llama q and k head from
/// Hugging Face's halves layout (`rotate_half`: dimension `i` pairs with
/// `i + D/2`) to an interleaved one (`2i` pairs with `2i + 1`). We undo that
/// here, so the whole crate uses one RoPE style, [`pagoda_backend::RopeStyle::Neox`],
/// whatever the file format.
pub struct GgufWeights {
    file: GgufFile,
    architecture: Architecture,
    num_attention_heads: usize,
    num_kv_heads: usize,
}

impl GgufWeights {
    pub fn new(
        file: GgufFile,
        architecture: Architecture,
        num_attention_heads: usize,
        num_kv_heads: usize,
    ) -> Self {
        Self { file, architecture, num_attention_heads, num_kv_heads }
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The GGUF name of a Hugging Face tensor name.
    pub fn gguf_name(hf_name: &str) -> Option<String> {
        let fixed = match hf_name {
            "model.embed_tokens.weight" => Some("token_embd.weight"),
            "model.norm.weight" => Some("output_norm.weight"),
            "lm_head.weight" => Some("output.weight"),
            _ => None,
        };
        if let Some(n) = fixed {
            return Some(n.into());
        }
        let rest = hf_name.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (module, kind) = rest.rsplit_once('.')?;
        let module = match module {
            "input_layernorm" => "attn_norm",
            "post_attention_layernorm" => "ffn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            _ => return None,
        };
        Some(format!("blk.{layer}.{module}.{kind}"))
    }

    /// Heads whose rows llama.cpp permuted, if this tensor is a Llama q or k projection.
    fn permuted_heads(&self, gguf_name: &str) -> Option<usize> {
        if self.architecture != Architecture::Llama {
            return None;
        }
        let module = gguf_name.rsplit('.').nth(1)?;
        match module {
            "attn_q" => Some(self.num_attention_heads),
            "attn_k" => Some(self.num_kv_heads),
            _ => None,
        }
    }
}

impl WeightSource for GgufWeights {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        Self::gguf_name(name).and_then(|g| self.file.header().tensor(&g).map(|t| t.row_major_shape()))
    }

    fn file_bytes(&self, name: &str) -> u64 {
        Self::gguf_name(name)
            .and_then(|g| self.file.header().tensor(&g).map(|t| t.size_in_bytes()))
            .unwrap_or(0)
    }

    fn tensor(&self, name: &str) -> Result<WeightTensor<'_>> {
        let missing = || ModelError::MissingTensor(name.into());
        let gguf_name = Self::gguf_name(name).ok_or_else(missing)?;
        let info = self.file.header().tensor(&gguf_name).ok_or_else(missing)?;
        let shape = info.row_major_shape();
        let mut values = vec![0f32; info.numel() as usize];
        dequantize(&gguf_name, info.ggml_type, self.file.tensor_bytes(info), &mut values)
            .map_err(|e| self.file.err(e))?;
        if let Some(heads) = self.permuted_heads(&gguf_name) {
            values = unpermute_rotary_rows(&values, &shape, heads)
                .map_err(|detail| self.file.err(GgufError::Tensor { name: gguf_name.clone(), detail }))?;
        }
        Ok(WeightTensor { shape, data: WeightData::Owned(values) })
    }
}

/// Undoes llama.cpp's q/k row permutation: within each head of `D` rows, file
/// row `2i` is Hugging Face row `i` and file row `2i + 1` is row `i + D/2`.
/// Works for weights (`[heads * D, K]`) and biases (`[heads * D]`).
pub fn unpermute_rotary_rows(
    values: &[f32],
    shape: &[usize],
    heads: usize,
) -> std::result::Result<Vec<f32>, String> {
    let rows = *shape.first().ok_or("rank-0 tensor")?;
    let cols: usize = shape[1..].iter().product();
    if heads == 0 || rows % heads != 0 || (rows / heads) % 2 != 0 {
        return Err(format!("{rows} rows do not split into {heads} heads of even size"));
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for (file_row, hf_row) in [(2 * i, i), (2 * i + 1, i + half)] {
                let src = (h * head_dim + file_row) * cols;
                let dst = (h * head_dim + hf_row) * cols;
                out[dst..dst + cols].copy_from_slice(&values[src..src + cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names() {
        assert_eq!(
            GgufWeights::gguf_name("model.layers.3.self_attn.k_proj.bias").unwrap(),
            "blk.3.attn_k.bias"
        );
        assert_eq!(
            GgufWeights::gguf_name("model.layers.0.mlp.down_proj.weight").unwrap(),
            "blk.0.ffn_down.weight"
        );
        assert_eq!(GgufWeights::gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert_eq!(GgufWeights::gguf_name("model.layers.x.mlp.up_proj.weight"), None);
    }

    /// llama.cpp's permutation, written as the converter describes it:
    /// `reshape(heads, 2, D/2, K).swapaxes(1, 2)`.
    fn permute(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
        let d = rows / heads;
        let mut out = vec![0.0; values.len()];
        for h in 0..heads {
            for two in 0..2 {
                for i in 0..d / 2 {
                    let src = (h * d + two * (d / 2) + i) * cols;
                    let dst = (h * d + i * 2 + two) * cols;
                    out[dst..dst + cols].copy_from_slice(&values[src..src + cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        let (rows, cols, heads) = (24, 3, 3);
        let values: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let permuted = permute(&values, rows, cols, heads);
        assert_ne!(permuted, values);
        assert_eq!(unpermute_rotary_rows(&permuted, &[rows, cols], heads).unwrap(), values);
        let bias: Vec<f32> = (0..rows).map(|i| i as f32).collect();
        assert_eq!(unpermute_rotary_rows(&permute(&bias, rows, 1, heads), &[rows], heads).unwrap(), bias);
        assert!(unpermute_rotary_rows(&values, &[rows, cols], 5).is_err());
    }
}
