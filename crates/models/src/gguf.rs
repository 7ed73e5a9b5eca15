//! A reader for GGUF files (versions 2 and 3): header, typed metadata, tensor
//! infos and the aligned data section, over a memory map.
//!
//! Layout (all little-endian): magic `GGUF`, version u32, tensor count u64,
//! metadata count u64, the metadata key/value pairs, the tensor infos, padding
//! to `general.alignment` (default 32), then the tensor data. Each tensor's
//! offset is relative to the start of the data section. Dimensions are stored
//! fastest-varying first, so a row-major `[rows, cols]` matrix has
//! `dims == [cols, rows]`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use thiserror::Error;

use crate::error::{ModelError, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// What is wrong with a GGUF file.
#[derive(Debug, Error)]
pub enum GgufError {
    #[error("not a GGUF file (magic bytes {0:02x?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (versions 2 and 3 are supported)")]
    UnsupportedVersion(u32),
    #[error("truncated file: {what} at byte {offset} runs past the end ({len} bytes)")]
    Truncated { what: String, offset: u64, len: u64 },
    #[error("metadata key {key:?}: unknown value type {value_type}")]
    BadValueType { key: String, value_type: u32 },
    #[error("tensor {name:?}: unknown ggml type {ggml_type}")]
    UnknownTensorType { name: String, ggml_type: u32 },
    #[error("tensor {name:?}: ggml type {ggml_type:?} cannot be dequantised (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K)")]
    UnsupportedTensorType { name: String, ggml_type: GgmlType },
    #[error("metadata key {key:?}: {detail}")]
    Metadata { key: String, detail: String },
    #[error("tensor {name:?}: {detail}")]
    Tensor { name: String, detail: String },
    #[error("{0}")]
    Invalid(String),
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            GgufValue::I8(v) => Some(v as f64),
            GgufValue::I16(v) => Some(v as f64),
            GgufValue::I32(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor element types (the numbering of ggml's `ggml_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
}

impl GgmlType {
    /// The type with ggml's numeric id, if it is one we know the layout of.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            24 => Self::I8,
            25 => Self::I16,
            26 => Self::I32,
            27 => Self::I64,
            28 => Self::F64,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// `(elements per block, bytes per block)`.
    pub fn block_layout(self) -> (usize, usize) {
        match self {
            Self::F32 | Self::I32 => (1, 4),
            Self::F16 | Self::BF16 | Self::I16 => (1, 2),
            Self::I8 => (1, 1),
            Self::I64 | Self::F64 => (1, 8),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q8_1 => (32, 36),
            Self::Q2_K => (256, 84),
            Self::Q3_K => (256, 110),
            Self::Q4_K => (256, 144),
            Self::Q5_K => (256, 176),
            Self::Q6_K => (256, 210),
            Self::Q8_K => (256, 292),
        }
    }

    /// Bytes holding `numel` elements, or `None` if `numel` is not a whole number of blocks.
    pub fn bytes_for(self, numel: u64) -> Option<u64> {
        let (block, bytes) = self.block_layout();
        (numel % block as u64 == 0).then(|| numel / block as u64 * bytes as u64)
    }
}

/// Where one tensor lives in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Fastest-varying first (ggml order): the row-major shape is this reversed.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the first byte from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in row-major order (slowest first), as Hugging Face writes it.
    pub fn row_major_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn size_in_bytes(&self) -> u64 {
        // Validated at parse time; 0 can only be reached by hand-built infos.
        self.ggml_type.bytes_for(self.numel()).unwrap_or(0)
    }
}

/// Everything in a GGUF file but the tensor data.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
}

impl GgufHeader {
    /// Parses the header of a whole file's bytes and checks that every
    /// tensor's data lies inside them.
    pub fn parse(bytes: &[u8]) -> Result<Self, GgufError> {
        let mut r = ByteReader { bytes, pos: 0 };
        let magic: [u8; 4] = r.take(4, "magic")?.try_into().unwrap_or([0; 4]);
        if &magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let tensor_count = r.u64("tensor count")?;
        let kv_count = r.u64("metadata count")?;
        // Every entry takes at least 8 bytes; a count beyond that is corrupt, and
        // checking it first keeps a flipped bit from asking for terabytes.
        let remaining = (bytes.len() - r.pos) as u64;
        if tensor_count > remaining / 8 || kv_count > remaining / 8 {
            return Err(GgufError::Invalid(format!(
                "implausible counts: {tensor_count} tensors, {kv_count} metadata entries in {} bytes",
                bytes.len()
            )));
        }

        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = r.string("metadata key")?;
            let value_type = r.u32("metadata value type")?;
            let value = r.value(&key, value_type, 0)?;
            metadata.insert(key, value);
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(GgufError::Metadata {
                        key: "general.alignment".into(),
                        detail: format!("must be a power of two, got {v:?}"),
                    })
                }
            },
        };

        let mut tensors = Vec::with_capacity(tensor_count as usize);
        for _ in 0..tensor_count {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor rank")?;
            if n_dims > 8 {
                return Err(GgufError::Tensor { name, detail: format!("rank {n_dims} is over 8") });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64("tensor dimension")?);
            }
            let type_id = r.u32("tensor type")?;
            let ggml_type = GgmlType::from_id(type_id)
                .ok_or_else(|| GgufError::UnknownTensorType { name: name.clone(), ggml_type: type_id })?;
            let offset = r.u64("tensor offset")?;
            tensors.push(GgufTensorInfo { name, dims, ggml_type, offset });
        }

        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;
        for t in &tensors {
            let numel = t.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let size = numel.and_then(|n| t.ggml_type.bytes_for(n)).ok_or_else(|| GgufError::Tensor {
                name: t.name.clone(),
                detail: format!(
                    "dims {:?} are not a whole number of {:?} blocks of {}",
                    t.dims,
                    t.ggml_type,
                    t.ggml_type.block_layout().0
                ),
            })?;
            if t.offset % alignment != 0 {
                return Err(GgufError::Tensor {
                    name: t.name.clone(),
                    detail: format!("offset {} is not aligned to {alignment}", t.offset),
                });
            }
            let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(size));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(GgufError::Truncated {
                        what: format!("data of tensor {:?} ({size} bytes)", t.name),
                        offset: data_offset.saturating_add(t.offset),
                        len: file_len,
                    })
                }
            }
        }
        Ok(Self { version, metadata, tensors, alignment, data_offset })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// A required unsigned integer.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| wrong_type(key, "an unsigned integer", v))
    }

    /// A required number.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| wrong_type(key, "a number", v))
    }

    /// A required string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| wrong_type(key, "a string", v))
    }

    /// A required array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let v = self.require(key)?;
        let items = v.as_array().ok_or_else(|| wrong_type(key, "an array", v))?;
        items.iter().map(|i| i.as_str().ok_or_else(|| wrong_type(key, "an array of strings", v))).collect()
    }

    fn require(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.metadata
            .get(key)
            .ok_or_else(|| GgufError::Metadata { key: key.into(), detail: "missing".into() })
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

fn wrong_type(key: &str, expected: &str, v: &GgufValue) -> GgufError {
    let shown = match v {
        GgufValue::Array(a) => format!("an array of {} values", a.len()),
        other => format!("{other:?}"),
    };
    GgufError::Metadata { key: key.into(), detail: format!("expected {expected}, found {shown}") }
}

/// A memory-mapped GGUF file with its parsed header.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    header: GgufHeader,
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        // SAFETY: the map is read-only; as with every mmap-based loader, the file
        // must not be truncated by another process while it is mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
        let header =
            GgufHeader::parse(&mmap).map_err(|cause| ModelError::Gguf { path: path.clone(), cause })?;
        Ok(Self { path, mmap, header })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    /// The raw bytes of a tensor (bounds were checked when the header was parsed).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        let start = (self.header.data_offset + info.offset) as usize;
        &self.mmap[start..start + info.size_in_bytes() as usize]
    }

    /// Wraps a header error with this file's path.
    pub fn err(&self, source: GgufError) -> ModelError {
        ModelError::Gguf { path: self.path.clone(), cause: source }
    }
}

struct ByteReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> ByteReader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            GgufError::Truncated { what: what.into(), offset: self.pos as u64, len: self.bytes.len() as u64 }
        })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).map_err(|_| GgufError::Invalid(format!("{what}: length {len}")))?;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| GgufError::Invalid(format!("{what} at byte {} is not UTF-8", self.pos - len)))
    }

    fn value(&mut self, key: &str, value_type: u32, depth: usize) -> Result<GgufValue, GgufError> {
        let what = || format!("value of {key:?}");
        Ok(match value_type {
            0 => GgufValue::U8(self.array::<1>(&what())?[0]),
            1 => GgufValue::I8(self.array::<1>(&what())?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(&what())?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(&what())?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(&what())?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(&what())?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(&what())?)),
            7 => {
                let b = self.array::<1>(&what())?[0];
                if b > 1 {
                    return Err(GgufError::Metadata { key: key.into(), detail: format!("bool byte {b}") });
                }
                GgufValue::Bool(b == 1)
            }
            8 => GgufValue::String(self.string(&what())?),
            9 => {
                if depth > 4 {
                    return Err(GgufError::Metadata {
                        key: key.into(),
                        detail: "arrays nested too deep".into(),
                    });
                }
                let item_type = self.u32(&what())?;
                let len = self.u64(&what())?;
                // Each item takes at least one byte: bound the allocation by what is left.
                if len > (self.bytes.len() - self.pos) as u64 {
                    return Err(GgufError::Truncated {
                        what: format!("array of {len} items for {key:?}"),
                        offset: self.pos as u64,
                        len: self.bytes.len() as u64,
                    });
                }
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(key, item_type, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(&what())?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(&what())?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(&what())?)),
            other => return Err(GgufError::BadValueType { key: key.into(), value_type: other }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal writer for hand-made headers in tests.
    #[derive(Default)]
    struct Writer(Vec<u8>);

    impl Writer {
        fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.u64(s.len() as u64);
            self.0.extend_from_slice(s.as_bytes());
            self
        }
    }

    fn header_with_one_f32_tensor() -> Vec<u8> {
        header_and_type_offset().0
    }

    /// The bytes, and where the tensor's ggml type id sits in them.
    fn header_and_type_offset() -> (Vec<u8>, usize) {
        let mut w = Writer::default();
        w.0.extend_from_slice(b"GGUF");
        w.u32(3).u64(1).u64(3);
        w.str("general.architecture").u32(8).str("llama");
        w.str("list").u32(9).u32(4).u64(3).u32(7).u32(8).u32(9);
        w.str("pi").u32(12);
        w.0.extend_from_slice(&std::f64::consts::PI.to_le_bytes());
        w.str("t").u32(2).u64(2).u64(3);
        let type_at = w.0.len();
        w.u32(0).u64(0);
        while w.0.len() % 32 != 0 {
            w.0.push(0);
        }
        for i in 0..6 {
            w.0.extend_from_slice(&(i as f32).to_le_bytes());
        }
        (w.0, type_at)
    }

    #[test]
    fn parses_metadata_and_tensor_infos() {
        let bytes = header_with_one_f32_tensor();
        let h = GgufHeader::parse(&bytes).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.get_str("general.architecture").unwrap(), "llama");
        let list: Vec<u64> =
            h.get("list").unwrap().as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(list, [7, 8, 9]);
        assert_eq!(h.get_f64("pi").unwrap(), std::f64::consts::PI);
        let t = h.tensor("t").unwrap();
        assert_eq!(t.row_major_shape(), [3, 2]);
        assert_eq!(t.size_in_bytes(), 24);
        assert_eq!(h.data_offset % 32, 0);
        assert!(matches!(h.get_u64("missing"), Err(GgufError::Metadata { .. })));
        assert!(matches!(h.get_str("pi"), Err(GgufError::Metadata { .. })));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = header_with_one_f32_tensor();
        for len in 0..bytes.len() {
            let err = GgufHeader::parse(&bytes[..len]).unwrap_err();
            assert!(matches!(err, GgufError::Truncated { .. } | GgufError::Invalid(_)), "len {len}: {err:?}");
        }
    }

    #[test]
    fn rejects_bad_magic_version_and_types() {
        let good = header_with_one_f32_tensor();
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(GgufHeader::parse(&b), Err(GgufError::BadMagic(_))));
        let mut b = good.clone();
        b[4] = 1;
        assert!(matches!(GgufHeader::parse(&b), Err(GgufError::UnsupportedVersion(1))));
        // The value type of the first metadata entry sits after magic, version,
        // two counts and the key string.
        let at = 4 + 4 + 8 + 8 + 8 + "general.architecture".len();
        let mut b = good.clone();
        b[at] = 13;
        assert!(matches!(GgufHeader::parse(&b), Err(GgufError::BadValueType { value_type: 13, .. })));
        let (good, type_at) = header_and_type_offset();
        let mut b = good.clone();
        b[type_at] = 4; // a retired ggml type id
        assert!(matches!(GgufHeader::parse(&b), Err(GgufError::UnknownTensorType { ggml_type: 4, .. })));
        let mut b = good.clone();
        b[type_at] = 2; // Q4_0: 6 elements are not a whole block
        assert!(matches!(GgufHeader::parse(&b), Err(GgufError::Tensor { .. })));
    }

    #[test]
    fn ggml_block_sizes() {
        assert_eq!(GgmlType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(GgmlType::Q8_0.bytes_for(33), None);
        assert_eq!(GgmlType::from_id(30), Some(GgmlType::BF16));
        assert_eq!(GgmlType::from_id(4), None);
    }
}
