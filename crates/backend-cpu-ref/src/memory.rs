//! Allocation and host <-> "device" copies. The CPU keeps every float as f32:
//! F16/BF16 host data is widened at upload, and F16/BF16 tensors are refused.
//! F8E4M3 tensors hold their codes' values as f32: E4M3 bytes are decoded at
//! upload, float data is rounded to the nearest code, and a download encodes
//! the values back into the same bytes.

use half::{bf16, f16};
use pagoda_backend::fp8::{e4m3_from_f32, e4m3_round, e4m3_to_f32};
use pagoda_backend::{BackendError, DType, HostSlice, HostVec, Result, Shape};
use rayon::prelude::*;

use crate::storage::{range_in, CpuBuffer, CpuStorage, CpuTensor};

/// Below this many elements a conversion is not worth splitting across threads.
const PARALLEL_CONVERT_MIN: usize = 1 << 16;

/// The buffer a new tensor of `dtype` gets. Floats start as NaN and integers
/// as their minimum: contents are unspecified by the trait, and poison makes a
/// read of never-written memory visible in the reference instead of silently 0.
pub(crate) fn poisoned_buffer(op: &'static str, dtype: DType, len: usize) -> Result<CpuBuffer> {
    fn filled<T: Copy>(value: T, len: usize) -> Result<Vec<T>> {
        let mut v = Vec::new();
        // An impossible size is an error for the caller, not an abort.
        v.try_reserve_exact(len).map_err(|_| BackendError::OutOfMemory {
            bytes: (len as u64).saturating_mul(std::mem::size_of::<T>() as u64),
        })?;
        v.resize(len, value);
        Ok(v)
    }
    match dtype {
        DType::F32 => Ok(CpuBuffer::F32(filled(f32::NAN, len)?)),
        DType::I32 => Ok(CpuBuffer::I32(filled(i32::MIN, len)?)),
        DType::I64 => Ok(CpuBuffer::I64(filled(i64::MIN, len)?)),
        // NaN is an E4M3 value too (code 0x7F).
        DType::F8E4M3 => Ok(CpuBuffer::F8E4M3(filled(f32::NAN, len)?)),
        DType::F16 | DType::BF16 => Err(BackendError::DType { op, dtype }),
    }
}

pub(crate) fn alloc(shape: &[usize], dtype: DType) -> Result<CpuTensor> {
    let shape = Shape::from(shape);
    let buffer = poisoned_buffer("alloc", dtype, shape.numel())?;
    Ok(CpuTensor::from_parts(CpuStorage::new(buffer), 0, shape, dtype))
}

pub(crate) fn upload(data: HostSlice<'_>, shape: &[usize], dtype: DType) -> Result<CpuTensor> {
    const OP: &str = "upload";
    let shape = Shape::from(shape);
    check_len(OP, &data, shape.numel())?;
    let mut buffer = poisoned_buffer(OP, dtype, shape.numel())?;
    copy_into(OP, &data, &mut buffer, 0..shape.numel())?;
    Ok(CpuTensor::from_parts(CpuStorage::new(buffer), 0, shape, dtype))
}

pub(crate) fn write(dst: &CpuTensor, data: HostSlice<'_>) -> Result<()> {
    const OP: &str = "write";
    check_len(OP, &data, dst.numel())?;
    let mut buffer = dst.storage().write();
    if buffer.dtype() != dst.dtype() {
        return Err(BackendError::DType { op: OP, dtype: dst.dtype() });
    }
    let range = range_in(OP, dst, buffer_len(&buffer))?;
    copy_into(OP, &data, &mut buffer, range)
}

pub(crate) fn download(src: &CpuTensor) -> Result<HostVec> {
    const OP: &str = "download";
    let buffer = src.storage().read();
    if buffer.dtype() != src.dtype() {
        return Err(BackendError::DType { op: OP, dtype: src.dtype() });
    }
    let range = range_in(OP, src, buffer_len(&buffer))?;
    Ok(match &*buffer {
        CpuBuffer::F32(v) => HostVec::F32(v[range].to_vec()),
        CpuBuffer::I32(v) => HostVec::I32(v[range].to_vec()),
        CpuBuffer::I64(v) => HostVec::I64(v[range].to_vec()),
        CpuBuffer::F8E4M3(v) => HostVec::F8E4M3(v[range].iter().map(|&x| e4m3_from_f32(x)).collect()),
    })
}

/// Integer tensors get `value` converted with Rust's saturating `as` (so -1.0
/// is -1 and 2.7 is 2).
pub(crate) fn fill(dst: &CpuTensor, value: f32) -> Result<()> {
    const OP: &str = "fill";
    let mut buffer = dst.storage().write();
    if buffer.dtype() != dst.dtype() {
        return Err(BackendError::DType { op: OP, dtype: dst.dtype() });
    }
    let range = range_in(OP, dst, buffer_len(&buffer))?;
    match &mut *buffer {
        CpuBuffer::F32(v) => v[range].fill(value),
        CpuBuffer::F8E4M3(v) => v[range].fill(e4m3_round(value)),
        CpuBuffer::I32(v) => v[range].fill(value as i32),
        CpuBuffer::I64(v) => v[range].fill(value as i64),
    }
    Ok(())
}

fn buffer_len(b: &CpuBuffer) -> usize {
    b.len()
}

/// The host data must hold exactly `numel` elements (for raw bytes: exactly
/// `numel * element size` bytes, so a truncated file is caught here).
fn check_len(op: &'static str, data: &HostSlice<'_>, numel: usize) -> Result<()> {
    let ok = match data {
        HostSlice::Bytes(b, d) => b.len() == numel * d.size_in_bytes(),
        _ => data.len() == numel,
    };
    if !ok {
        let got = match data {
            HostSlice::Bytes(b, _) => format!("{} bytes", b.len()),
            _ => format!("{} elements", data.len()),
        };
        return Err(BackendError::shape(op, format!("expected {numel} elements of data, got {got}")));
    }
    Ok(())
}

/// Copies `data` into `buffer[range]`, converting floats to f32 (and E4M3
/// codes to their values, floats to the nearest code's value for an F8E4M3
/// buffer). Integer data must match the buffer's dtype exactly; floats never
/// go into integer buffers.
fn copy_into(
    op: &'static str,
    data: &HostSlice<'_>,
    buffer: &mut CpuBuffer,
    range: std::ops::Range<usize>,
) -> Result<()> {
    let src_dtype = data.dtype();
    match buffer {
        CpuBuffer::F32(v) => {
            if !src_dtype.holds_reals() {
                return Err(BackendError::DType { op, dtype: src_dtype });
            }
            widen_to_f32(data, &mut v[range]);
        }
        CpuBuffer::F8E4M3(v) => {
            if !src_dtype.holds_reals() {
                return Err(BackendError::DType { op, dtype: src_dtype });
            }
            let v = &mut v[range];
            widen_to_f32(data, v);
            // E4M3 data decoded exactly; floats rounded to their nearest code.
            if src_dtype != DType::F8E4M3 {
                v.iter_mut().for_each(|x| *x = e4m3_round(*x));
            }
        }
        CpuBuffer::I32(v) => match data {
            HostSlice::I32(s) => v[range].copy_from_slice(s),
            HostSlice::Bytes(b, DType::I32) => {
                for (d, c) in v[range].iter_mut().zip(b.chunks_exact(4)) {
                    *d = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            _ => return Err(BackendError::DType { op, dtype: src_dtype }),
        },
        CpuBuffer::I64(v) => match data {
            HostSlice::I64(s) => v[range].copy_from_slice(s),
            HostSlice::Bytes(b, DType::I64) => {
                for (d, c) in v[range].iter_mut().zip(b.chunks_exact(8)) {
                    let mut le = [0u8; 8];
                    le.copy_from_slice(c);
                    *d = i64::from_le_bytes(le);
                }
            }
            _ => return Err(BackendError::DType { op, dtype: src_dtype }),
        },
    }
    Ok(())
}

/// Widens float host data (typed or raw little-endian bytes) into `dst`.
/// The caller has checked that `data` is a float slice of `dst.len()` elements.
fn widen_to_f32(data: &HostSlice<'_>, dst: &mut [f32]) {
    fn convert<S: Sync>(src: &[S], dst: &mut [f32], f: impl Fn(&S) -> f32 + Sync) {
        if dst.len() >= PARALLEL_CONVERT_MIN {
            dst.par_iter_mut().zip(src.par_iter()).for_each(|(d, s)| *d = f(s));
        } else {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d = f(s));
        }
    }
    fn convert_bytes<const N: usize>(src: &[u8], dst: &mut [f32], f: impl Fn([u8; N]) -> f32 + Sync) {
        let one = |d: &mut f32, c: &[u8]| {
            let mut le = [0u8; N];
            le.copy_from_slice(c);
            *d = f(le);
        };
        if dst.len() >= PARALLEL_CONVERT_MIN {
            dst.par_iter_mut().zip(src.par_chunks_exact(N)).for_each(|(d, c)| one(d, c));
        } else {
            dst.iter_mut().zip(src.chunks_exact(N)).for_each(|(d, c)| one(d, c));
        }
    }
    match *data {
        HostSlice::F32(s) => dst.copy_from_slice(s),
        HostSlice::F16(s) => convert(s, dst, |x| x.to_f32()),
        HostSlice::BF16(s) => convert(s, dst, |x| x.to_f32()),
        HostSlice::Bytes(b, DType::F32) => convert_bytes::<4>(b, dst, f32::from_le_bytes),
        HostSlice::Bytes(b, DType::F16) => convert_bytes::<2>(b, dst, |le| f16::from_le_bytes(le).to_f32()),
        HostSlice::Bytes(b, DType::BF16) => convert_bytes::<2>(b, dst, |le| bf16::from_le_bytes(le).to_f32()),
        HostSlice::Bytes(b, DType::F8E4M3) => convert_bytes::<1>(b, dst, |[code]| e4m3_to_f32(code)),
        // Integer sources were refused by the caller.
        HostSlice::I32(_) | HostSlice::I64(_) | HostSlice::Bytes(_, DType::I32 | DType::I64) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_data_is_widened_and_half_precision_tensors_refused() {
        let vals = [1.5f32, -2.25, 1e-3, 65504.0];
        let b: Vec<bf16> = vals.iter().map(|&x| bf16::from_f32(x)).collect();
        let h: Vec<f16> = vals.iter().map(|&x| f16::from_f32(x)).collect();
        let raw_b: Vec<u8> = b.iter().flat_map(|x| x.to_le_bytes()).collect();
        let raw_h: Vec<u8> = h.iter().flat_map(|x| x.to_le_bytes()).collect();
        let expect_b: Vec<f32> = b.iter().map(|x| x.to_f32()).collect();
        let expect_h: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
        for (data, expect) in [
            (HostSlice::BF16(&b), &expect_b),
            (HostSlice::Bytes(&raw_b, DType::BF16), &expect_b),
            (HostSlice::F16(&h), &expect_h),
            (HostSlice::Bytes(&raw_h, DType::F16), &expect_h),
        ] {
            let t = upload(data, &[2, 2], DType::F32).unwrap();
            assert_eq!(download(&t).unwrap(), HostVec::F32(expect.clone()));
        }
        for dtype in [DType::BF16, DType::F16] {
            assert!(matches!(alloc(&[2], dtype), Err(BackendError::DType { .. })));
            assert!(matches!(upload(HostSlice::BF16(&b), &[4], dtype), Err(BackendError::DType { .. })));
        }
    }

    #[test]
    fn e4m3_tensors_decode_at_upload_round_floats_and_download_their_bytes() {
        // Every byte, NaNs and both zeros included, round-trips exactly.
        let codes: Vec<u8> = (0..=255).collect();
        let t = upload(HostSlice::Bytes(&codes, DType::F8E4M3), &[16, 16], DType::F8E4M3).unwrap();
        assert_eq!(download(&t).unwrap(), HostVec::F8E4M3(codes.clone()));
        let values = download(&t).unwrap().to_f32();
        assert_eq!(values[0x38], 1.0);
        // Floats round to the nearest code (saturating); write and fill too.
        let t = upload(HostSlice::F32(&[0.3, -1000.0, 1.0]), &[3], DType::F8E4M3).unwrap();
        assert_eq!(download(&t).unwrap(), HostVec::F8E4M3(vec![0x2A, 0xFE, 0x38]));
        write(&t.narrow(1, 1).unwrap(), HostSlice::Bytes(&[0x01], DType::F8E4M3)).unwrap();
        fill(&t.narrow(2, 1).unwrap(), 2.2).unwrap();
        assert_eq!(download(&t).unwrap().to_f32(), vec![0.3125, 2f32.powi(-9), 2.25]);
        // E4M3 data into an F32 tensor decodes; integers are refused either way.
        let f = upload(HostSlice::Bytes(&[0xC0], DType::F8E4M3), &[1], DType::F32).unwrap();
        assert_eq!(download(&f).unwrap(), HostVec::F32(vec![-2.0]));
        assert!(matches!(upload(HostSlice::I32(&[1]), &[1], DType::F8E4M3), Err(BackendError::DType { .. })));
        let fresh = alloc(&[2], DType::F8E4M3).unwrap();
        assert!(download(&fresh).unwrap().to_f32().iter().all(|x| x.is_nan()), "poisoned with NaN codes");
        assert!(matches!(
            upload(HostSlice::Bytes(&[0; 3], DType::F8E4M3), &[2], DType::F8E4M3),
            Err(BackendError::Shape { .. })
        ));
    }

    #[test]
    fn integers_must_match_and_lengths_must_be_exact() {
        let t = upload(HostSlice::I64(&[1, -1]), &[2], DType::I64).unwrap();
        assert_eq!(download(&t).unwrap(), HostVec::I64(vec![1, -1]));
        let raw: Vec<u8> = [7i32, -3].iter().flat_map(|x| x.to_le_bytes()).collect();
        let t = upload(HostSlice::Bytes(&raw, DType::I32), &[2], DType::I32).unwrap();
        assert_eq!(download(&t).unwrap(), HostVec::I32(vec![7, -3]));
        assert!(matches!(upload(HostSlice::I32(&[1, 2]), &[2], DType::I64), Err(BackendError::DType { .. })));
        assert!(matches!(upload(HostSlice::F32(&[1.0]), &[1], DType::I32), Err(BackendError::DType { .. })));
        assert!(matches!(upload(HostSlice::I32(&[1]), &[1], DType::F32), Err(BackendError::DType { .. })));
        assert!(matches!(upload(HostSlice::F32(&[1.0]), &[2], DType::F32), Err(BackendError::Shape { .. })));
        // 7 bytes is not 2 f32s (a truncated file), even though len() rounds down to 1.
        assert!(matches!(
            upload(HostSlice::Bytes(&[0; 7], DType::F32), &[2], DType::F32),
            Err(BackendError::Shape { .. })
        ));
    }

    #[test]
    fn write_and_fill_touch_only_the_view() {
        let t = upload(HostSlice::F32(&[0.0; 6]), &[3, 2], DType::F32).unwrap();
        write(&t.narrow(1, 1).unwrap(), HostSlice::F32(&[1.0, 2.0])).unwrap();
        fill(&t.narrow(2, 1).unwrap(), 5.0).unwrap();
        assert_eq!(download(&t).unwrap(), HostVec::F32(vec![0.0, 0.0, 1.0, 2.0, 5.0, 5.0]));
        let ids = alloc(&[3], DType::I32).unwrap();
        fill(&ids, -1.0).unwrap();
        assert_eq!(download(&ids).unwrap(), HostVec::I32(vec![-1; 3]));
        assert!(matches!(write(&ids, HostSlice::I32(&[1])), Err(BackendError::Shape { .. })));
    }

    #[test]
    fn fresh_allocations_are_poisoned_and_impossible_ones_are_errors() {
        let t = alloc(&[4], DType::F32).unwrap();
        assert!(download(&t).unwrap().to_f32().iter().all(|x| x.is_nan()));
        assert!(matches!(alloc(&[1 << 40, 1 << 20], DType::F32), Err(BackendError::OutOfMemory { .. })));
    }
}
