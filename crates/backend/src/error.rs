use thiserror::Error;

use crate::DType;

/// What can go wrong in a backend call.
#[derive(Debug, Error)]
pub enum BackendError {
    /// Operand shapes do not fit the op's contract.
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },
    /// The op does not support this dtype (or combination of dtypes).
    #[error("{op}: unsupported dtype {dtype:?}")]
    DType { op: &'static str, dtype: DType },
    /// An output shares storage with an input where the op forbids it.
    #[error("{op}: output aliases an input")]
    Aliasing { op: &'static str },
    /// An index (token id, block id, slot) is out of range.
    #[error("{op}: index out of range: {detail}")]
    Index { op: &'static str, detail: String },
    /// The device has no memory left for this allocation.
    #[error("out of device memory allocating {bytes} bytes")]
    OutOfMemory { bytes: u64 },
    /// This backend does not offer the operation (e.g. graph capture on the CPU).
    #[error("{op} is not supported by the {backend} backend")]
    Unsupported { op: &'static str, backend: String },
    /// A device or driver call failed.
    #[error("device error: {0}")]
    Device(String),
}

pub type Result<T, E = BackendError> = std::result::Result<T, E>;

impl BackendError {
    /// Shorthand for a [`BackendError::Shape`].
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Self::Shape { op, detail: detail.into() }
    }
}
