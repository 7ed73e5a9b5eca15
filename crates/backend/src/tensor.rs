use std::fmt;
use std::sync::Arc;

use crate::{Backend, BackendError, Result};

/// Element types a tensor may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    I64,
    /// FP8 E4M3 codes ([`crate::fp8`]), one byte each: a storage format (the
    /// KV cache's, with a scale), not a compute float. No op computes in it;
    /// [`Backend::rotary_and_cache`] writes it and [`Backend::attention`] reads it.
    F8E4M3,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F8E4M3 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
        }
    }

    /// The compute floats (F32, F16, BF16): activations, weights, logits.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// Whether elements are numbers that convert to and from f32: the
    /// compute floats and F8E4M3 (which decodes exactly and encodes by
    /// rounding to the nearest code, saturating at ±448).
    pub fn holds_reals(self) -> bool {
        self.is_float() || self == DType::F8E4M3
    }
}

/// A row-major shape.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }

    /// Elements per step of the leading dimension.
    pub fn row_numel(&self) -> usize {
        self.0.iter().skip(1).product()
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(d.to_vec())
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Shape(d.to_vec())
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A dense row-major view on backend storage. Cloning is cheap (the storage
/// is shared); views made by [`narrow`](Tensor::narrow) and
/// [`reshape`](Tensor::reshape) share it too.
pub struct Tensor<B: Backend> {
    storage: Arc<B::Storage>,
    /// Offset of the first element, in elements of `dtype`.
    offset: usize,
    shape: Shape,
    dtype: DType,
}

impl<B: Backend> Clone for Tensor<B> {
    fn clone(&self) -> Self {
        Self {
            storage: self.storage.clone(),
            offset: self.offset,
            shape: self.shape.clone(),
            dtype: self.dtype,
        }
    }
}

impl<B: Backend> fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({:?}, {:?}, offset {})", self.dtype, self.shape, self.offset)
    }
}

impl<B: Backend> Tensor<B> {
    /// For backends: wraps storage. `offset + shape.numel()` must fit in it.
    pub fn from_parts(storage: Arc<B::Storage>, offset: usize, shape: Shape, dtype: DType) -> Self {
        Self { storage, offset, shape, dtype }
    }

    pub fn storage(&self) -> &Arc<B::Storage> {
        &self.storage
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// Size of dimension `i` (panics if `i >= rank`, a programming error).
    pub fn dim(&self, i: usize) -> usize {
        self.shape.dims()[i]
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }

    /// Whether both views sit on the same storage.
    pub fn shares_storage(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    /// Rows `start..start + len` of the leading dimension.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        let rows =
            *self.shape.dims().first().ok_or_else(|| BackendError::shape("narrow", "rank-0 tensor"))?;
        if start + len > rows {
            return Err(BackendError::shape("narrow", format!("rows {start}..{} of {rows}", start + len)));
        }
        let mut dims = self.shape.dims().to_vec();
        dims[0] = len;
        Ok(Self {
            storage: self.storage.clone(),
            offset: self.offset + start * self.shape.row_numel(),
            shape: Shape(dims),
            dtype: self.dtype,
        })
    }

    /// The same elements under another shape of equal element count.
    pub fn reshape(&self, dims: &[usize]) -> Result<Self> {
        let shape = Shape::from(dims);
        if shape.numel() != self.numel() {
            return Err(BackendError::shape("reshape", format!("{:?} to {:?}", self.shape, shape)));
        }
        Ok(Self { storage: self.storage.clone(), offset: self.offset, shape, dtype: self.dtype })
    }

    /// Checks the exact shape, naming the op and operand in the error.
    pub fn expect_dims(&self, op: &'static str, what: &str, dims: &[usize]) -> Result<()> {
        if self.dims() != dims {
            return Err(BackendError::shape(op, format!("{what}: expected {dims:?}, got {:?}", self.shape)));
        }
        Ok(())
    }

    /// Checks the dtype, naming the op in the error.
    pub fn expect_dtype(&self, op: &'static str, dtype: DType) -> Result<()> {
        if self.dtype != dtype {
            return Err(BackendError::DType { op, dtype: self.dtype });
        }
        Ok(())
    }

    /// The sizes of a rank-2 tensor.
    pub fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        match *self.dims() {
            [a, b] => Ok((a, b)),
            _ => Err(BackendError::shape(op, format!("expected rank 2, got {:?}", self.shape))),
        }
    }

    /// `(rows, elements per row)`: the leading dimension and the product of
    /// the others, for a tensor of rank >= 1 (`[T, H, D]` is T rows of H·D).
    pub fn rows_cols(&self, op: &'static str, what: &str) -> Result<(usize, usize)> {
        match self.dims().first() {
            Some(&rows) => Ok((rows, self.shape.row_numel())),
            None => Err(BackendError::shape(op, format!("{what}: expected rank >= 1, got a scalar"))),
        }
    }

    /// Checks `rows` rows of `cols` elements in the sense of [`Tensor::rows_cols`],
    /// naming the op and operand in the error.
    pub fn expect_rows_cols(&self, op: &'static str, what: &str, rows: usize, cols: usize) -> Result<()> {
        if self.rows_cols(op, what)? != (rows, cols) {
            return Err(BackendError::shape(
                op,
                format!("{what}: expected {rows} rows of {cols}, got {:?}", self.shape),
            ));
        }
        Ok(())
    }

    /// Whether both views sit on the same storage with overlapping bytes.
    pub fn overlaps(&self, other: &Self) -> bool {
        let bytes = |t: &Self| {
            let size = t.dtype.size_in_bytes();
            t.offset * size..(t.offset + t.numel()) * size
        };
        let (a, b) = (bytes(self), bytes(other));
        self.shares_storage(other) && a.start < b.end && b.start < a.end
    }
}
