//! Host memory behind CPU tensors, and the locking discipline that makes
//! `&Tensor` outputs sound.
//!
//! Every storage is one `RwLock` around a typed buffer. An op declares its
//! inputs and outputs up front; [`with_operands`] then takes one read lock per
//! distinct input storage and one write lock per distinct output storage, in
//! address order (so two threads running ops on the same tensors cannot
//! deadlock), and hands the op plain slices. An output whose storage is also an
//! input's is refused with [`BackendError::Aliasing`], as the trait requires;
//! several outputs may share one storage when their element ranges are
//! disjoint (e.g. K and V caches narrowed out of one allocation).

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use pagoda_backend::{BackendError, DType, Result, Tensor};

use crate::CpuBackend;

/// The elements of one CPU allocation. Floats are always held as f32.
#[derive(Debug)]
pub(crate) enum CpuBuffer {
    F32(Vec<f32>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    /// An F8E4M3 tensor, held as the f32 values of its codes: every element
    /// is exactly an E4M3 value (NaN included), so reading it needs no
    /// decoding and downloading it encodes back exactly. Only uploads, `fill`
    /// and the cache writes of `rotary_and_cache` (which round) write it.
    F8E4M3(Vec<f32>),
}

impl CpuBuffer {
    pub(crate) fn dtype(&self) -> DType {
        match self {
            CpuBuffer::F32(_) => DType::F32,
            CpuBuffer::I32(_) => DType::I32,
            CpuBuffer::I64(_) => DType::I64,
            CpuBuffer::F8E4M3(_) => DType::F8E4M3,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            CpuBuffer::F32(v) | CpuBuffer::F8E4M3(v) => v.len(),
            CpuBuffer::I32(v) => v.len(),
            CpuBuffer::I64(v) => v.len(),
        }
    }
}

/// Storage of a [`CpuBackend`] tensor: a buffer of f32, i32 or i64 elements.
#[derive(Debug)]
pub struct CpuStorage {
    buffer: RwLock<CpuBuffer>,
}

impl CpuStorage {
    pub(crate) fn new(buffer: CpuBuffer) -> Arc<Self> {
        Arc::new(Self { buffer: RwLock::new(buffer) })
    }

    /// Elements held (of the storage's own dtype).
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dtype the storage holds.
    pub fn dtype(&self) -> DType {
        self.read().dtype()
    }

    // A panic in another op while it held the lock leaves plain numbers behind,
    // never a broken invariant, so a poisoned lock is simply taken over.
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, CpuBuffer> {
        self.buffer.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, CpuBuffer> {
        self.buffer.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub(crate) type CpuTensor = Tensor<CpuBackend>;

/// The element range of `t` inside its storage, checked against the buffer.
pub(crate) fn range_in(op: &'static str, t: &CpuTensor, buffer_len: usize) -> Result<std::ops::Range<usize>> {
    let start = t.offset();
    let end = start.checked_add(t.numel()).filter(|&end| end <= buffer_len).ok_or_else(|| {
        BackendError::shape(
            op,
            format!("view {:?} at offset {start} exceeds its storage of {buffer_len}", t.shape()),
        )
    })?;
    Ok(start..end)
}

fn dtype_matches(op: &'static str, t: &CpuTensor, buffer: &CpuBuffer) -> Result<()> {
    if t.dtype() != buffer.dtype() {
        // A tensor built with `from_parts` over storage of another dtype.
        return Err(BackendError::DType { op, dtype: t.dtype() });
    }
    Ok(())
}

/// Read access to an op's inputs.
pub(crate) struct Inputs<'a> {
    op: &'static str,
    /// (storage address, guard): the address only identifies the storage.
    guards: Vec<(usize, RwLockReadGuard<'a, CpuBuffer>)>,
}

impl Inputs<'_> {
    fn buffer(&self, t: &CpuTensor) -> Result<&CpuBuffer> {
        let key = Arc::as_ptr(t.storage()) as usize;
        self.guards
            .iter()
            .find(|(p, _)| *p == key)
            .map(|(_, g)| &**g)
            .ok_or_else(|| BackendError::Device(format!("{}: operand was not declared as an input", self.op)))
    }

    pub(crate) fn f32(&self, t: &CpuTensor) -> Result<&[f32]> {
        t.expect_dtype(self.op, DType::F32)?;
        match self.buffer(t)? {
            CpuBuffer::F32(v) => Ok(&v[range_in(self.op, t, v.len())?]),
            other => Err(BackendError::DType { op: self.op, dtype: other.dtype() }),
        }
    }

    /// The values of a KV cache: F32, or F8E4M3 (its codes' values, which
    /// the caller scales).
    pub(crate) fn cache_values(&self, t: &CpuTensor) -> Result<&[f32]> {
        dtype_matches(self.op, t, self.buffer(t)?)?;
        match self.buffer(t)? {
            CpuBuffer::F32(v) | CpuBuffer::F8E4M3(v) => Ok(&v[range_in(self.op, t, v.len())?]),
            other => Err(BackendError::DType { op: self.op, dtype: other.dtype() }),
        }
    }

    pub(crate) fn i32(&self, t: &CpuTensor) -> Result<&[i32]> {
        t.expect_dtype(self.op, DType::I32)?;
        match self.buffer(t)? {
            CpuBuffer::I32(v) => Ok(&v[range_in(self.op, t, v.len())?]),
            other => Err(BackendError::DType { op: self.op, dtype: other.dtype() }),
        }
    }

    pub(crate) fn i64(&self, t: &CpuTensor) -> Result<&[i64]> {
        t.expect_dtype(self.op, DType::I64)?;
        match self.buffer(t)? {
            CpuBuffer::I64(v) => Ok(&v[range_in(self.op, t, v.len())?]),
            other => Err(BackendError::DType { op: self.op, dtype: other.dtype() }),
        }
    }
}

/// Locks the operands of `op` and runs `body` with the inputs readable and the
/// outputs (which must be F32) as disjoint mutable slices, in the order given.
pub(crate) fn with_operands<R>(
    op: &'static str,
    inputs: &[&CpuTensor],
    outputs: &[&CpuTensor],
    body: impl FnOnce(&Inputs<'_>, &mut [&mut [f32]]) -> Result<R>,
) -> Result<R> {
    with_operands_of(op, inputs, outputs, false, body)
}

/// [`with_operands`] whose outputs may also be F8E4M3 (KV caches): `body`
/// then gets their values and must write only E4M3 values into them.
pub(crate) fn with_cache_operands<R>(
    op: &'static str,
    inputs: &[&CpuTensor],
    outputs: &[&CpuTensor],
    body: impl FnOnce(&Inputs<'_>, &mut [&mut [f32]]) -> Result<R>,
) -> Result<R> {
    with_operands_of(op, inputs, outputs, true, body)
}

fn with_operands_of<R>(
    op: &'static str,
    inputs: &[&CpuTensor],
    outputs: &[&CpuTensor],
    fp8_outputs: bool,
    body: impl FnOnce(&Inputs<'_>, &mut [&mut [f32]]) -> Result<R>,
) -> Result<R> {
    let mut storages: Vec<(&Arc<CpuStorage>, bool)> = Vec::new(); // (storage, written)
    for t in outputs {
        if inputs.iter().any(|i| i.shares_storage(t)) {
            return Err(BackendError::Aliasing { op });
        }
        if !storages.iter().any(|(s, _)| Arc::ptr_eq(s, t.storage())) {
            storages.push((t.storage(), true));
        }
    }
    for t in inputs {
        if !storages.iter().any(|(s, _)| Arc::ptr_eq(s, t.storage())) {
            storages.push((t.storage(), false));
        }
    }
    // One global lock order (by address) rules out lock-order deadlocks.
    storages.sort_by_key(|(s, _)| Arc::as_ptr(s) as usize);
    let mut reads = Vec::new();
    let mut writes = Vec::new();
    for (storage, written) in storages {
        let key = Arc::as_ptr(storage) as usize;
        if written {
            writes.push((key, storage.write()));
        } else {
            reads.push((key, storage.read()));
        }
    }
    let inputs_view = Inputs { op, guards: reads };

    // Carve each written buffer into the outputs it holds, by ascending offset.
    let mut slots: Vec<Option<&mut [f32]>> = (0..outputs.len()).map(|_| None).collect();
    for (key, guard) in writes.iter_mut() {
        let buffer: &mut CpuBuffer = guard;
        let mut mine: Vec<usize> =
            (0..outputs.len()).filter(|&i| Arc::as_ptr(outputs[i].storage()) as usize == *key).collect();
        for &i in &mine {
            dtype_matches(op, outputs[i], buffer)?;
            if !(fp8_outputs && outputs[i].dtype() == DType::F8E4M3) {
                outputs[i].expect_dtype(op, DType::F32)?;
            }
        }
        let (CpuBuffer::F32(data) | CpuBuffer::F8E4M3(data)) = buffer else {
            return Err(BackendError::DType { op, dtype: buffer.dtype() });
        };
        let len = data.len();
        mine.sort_by_key(|&i| outputs[i].offset());
        let mut rest: &mut [f32] = data.as_mut_slice();
        let mut consumed = 0;
        for &i in &mine {
            let range = range_in(op, outputs[i], len)?;
            if range.start < consumed {
                return Err(BackendError::Aliasing { op });
            }
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(range.start - consumed);
            let (this, tail) = tail.split_at_mut(range.len());
            slots[i] = Some(this);
            rest = tail;
            consumed = range.end;
        }
    }
    let mut out_slices: Vec<&mut [f32]> = slots.into_iter().flatten().collect();
    if out_slices.len() != outputs.len() {
        return Err(BackendError::Device(format!("{op}: lost track of an output")));
    }
    body(&inputs_view, &mut out_slices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagoda_backend::{Backend, HostSlice};

    #[test]
    fn disjoint_outputs_on_one_storage_are_allowed_overlapping_ones_are_not() {
        let cpu = CpuBackend::new();
        let whole = cpu.upload(HostSlice::F32(&[0.0; 8]), &[4, 2], DType::F32).unwrap();
        let a = whole.narrow(0, 2).unwrap();
        let b = whole.narrow(2, 2).unwrap();
        with_operands("test", &[], &[&b, &a], |_, outs| {
            outs[0].fill(2.0);
            outs[1].fill(1.0);
            Ok(())
        })
        .unwrap();
        assert_eq!(cpu.download_f32(&whole).unwrap(), vec![1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]);

        let c = whole.narrow(1, 2).unwrap();
        let err = with_operands("test", &[], &[&a, &c], |_, _| Ok(())).unwrap_err();
        assert!(matches!(err, BackendError::Aliasing { .. }));
        let err = with_operands("test", &[&a], &[&b], |_, _| Ok(())).unwrap_err();
        assert!(matches!(err, BackendError::Aliasing { .. }));
    }

    #[test]
    fn an_input_used_twice_is_locked_once() {
        let cpu = CpuBackend::new();
        let x = cpu.upload(HostSlice::F32(&[1.0, 2.0]), &[2], DType::F32).unwrap();
        let y = x.narrow(1, 1).unwrap();
        let out = cpu.alloc(&[1], DType::F32).unwrap();
        let sum = with_operands("test", &[&x, &y], &[&out], |ins, _| Ok(ins.f32(&x)?[0] + ins.f32(&y)?[0]));
        assert_eq!(sum.unwrap(), 3.0);
    }

    #[test]
    fn views_past_their_storage_are_refused() {
        let cpu = CpuBackend::new();
        let x = cpu.upload(HostSlice::F32(&[1.0, 2.0]), &[2], DType::F32).unwrap();
        let bad = CpuTensor::from_parts(x.storage().clone(), 1, [2].into(), DType::F32);
        let out = cpu.alloc(&[1], DType::F32).unwrap();
        let err = with_operands("test", &[&bad], &[&out], |ins, _| ins.f32(&bad).map(|_| ())).unwrap_err();
        assert!(matches!(err, BackendError::Shape { .. }));
        let wrong_dtype = CpuTensor::from_parts(x.storage().clone(), 0, [2].into(), DType::I32);
        let err = with_operands("test", &[&wrong_dtype], &[&out], |ins, _| ins.i32(&wrong_dtype).map(|_| ()))
            .unwrap_err();
        assert!(matches!(err, BackendError::DType { .. }));
    }
}
