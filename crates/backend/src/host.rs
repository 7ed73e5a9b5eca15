use half::{bf16, f16};

use crate::fp8::e4m3_to_f32;
use crate::DType;

/// Borrowed host data to upload. `Bytes` is little-endian raw elements of the
/// given dtype (e.g. straight from a memory-mapped safetensors file, which need
/// not be aligned for a typed slice); F8E4M3 data is always `Bytes` (one code
/// a byte).
#[derive(Clone, Copy, Debug)]
pub enum HostSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    I32(&'a [i32]),
    I64(&'a [i64]),
    Bytes(&'a [u8], DType),
}

impl HostSlice<'_> {
    /// The dtype of the elements.
    pub fn dtype(&self) -> DType {
        match self {
            HostSlice::F32(_) => DType::F32,
            HostSlice::F16(_) => DType::F16,
            HostSlice::BF16(_) => DType::BF16,
            HostSlice::I32(_) => DType::I32,
            HostSlice::I64(_) => DType::I64,
            HostSlice::Bytes(_, d) => *d,
        }
    }

    /// Number of elements (for `Bytes`, bytes / element size, rounded down).
    pub fn len(&self) -> usize {
        match self {
            HostSlice::F32(s) => s.len(),
            HostSlice::F16(s) => s.len(),
            HostSlice::BF16(s) => s.len(),
            HostSlice::I32(s) => s.len(),
            HostSlice::I64(s) => s.len(),
            HostSlice::Bytes(b, d) => b.len() / d.size_in_bytes(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw little-endian bytes of the elements.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            HostSlice::F32(s) => bytemuck::cast_slice(s),
            HostSlice::F16(s) => bytemuck::cast_slice(s),
            HostSlice::BF16(s) => bytemuck::cast_slice(s),
            HostSlice::I32(s) => bytemuck::cast_slice(s),
            HostSlice::I64(s) => bytemuck::cast_slice(s),
            HostSlice::Bytes(b, _) => b,
        }
    }

    /// Element `i` as f32 (integers converted, E4M3 codes decoded).
    pub fn get_f32(&self, i: usize) -> f32 {
        fn le<const N: usize>(b: &[u8], i: usize) -> [u8; N] {
            b[i * N..i * N + N].try_into().expect("slice of N bytes")
        }
        match self {
            HostSlice::F32(s) => s[i],
            HostSlice::F16(s) => s[i].to_f32(),
            HostSlice::BF16(s) => s[i].to_f32(),
            HostSlice::I32(s) => s[i] as f32,
            HostSlice::I64(s) => s[i] as f32,
            HostSlice::Bytes(b, d) => match d {
                DType::F32 => f32::from_le_bytes(le(b, i)),
                DType::F16 => f16::from_le_bytes(le(b, i)).to_f32(),
                DType::BF16 => bf16::from_le_bytes(le(b, i)).to_f32(),
                DType::I32 => i32::from_le_bytes(le(b, i)) as f32,
                DType::I64 => i64::from_le_bytes(le(b, i)) as f32,
                DType::F8E4M3 => e4m3_to_f32(b[i]),
            },
        }
    }

    /// All elements converted to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            HostSlice::F32(s) => s.to_vec(),
            _ => (0..self.len()).map(|i| self.get_f32(i)).collect(),
        }
    }
}

/// Owned host data, as downloaded from a device.
#[derive(Clone, Debug, PartialEq)]
pub enum HostVec {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    /// E4M3 codes, one a byte ([`crate::fp8`]); [`HostVec::to_f32`] decodes them.
    F8E4M3(Vec<u8>),
}

impl HostVec {
    pub fn as_slice(&self) -> HostSlice<'_> {
        match self {
            HostVec::F32(v) => HostSlice::F32(v),
            HostVec::F16(v) => HostSlice::F16(v),
            HostVec::BF16(v) => HostSlice::BF16(v),
            HostVec::I32(v) => HostSlice::I32(v),
            HostVec::I64(v) => HostSlice::I64(v),
            HostVec::F8E4M3(v) => HostSlice::Bytes(v, DType::F8E4M3),
        }
    }

    pub fn dtype(&self) -> DType {
        self.as_slice().dtype()
    }

    /// Converts every element to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        self.as_slice().to_f32_vec()
    }

    /// A zeroed vector of `len` elements of `dtype`.
    pub fn zeros(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::F32 => HostVec::F32(vec![0.0; len]),
            DType::F16 => HostVec::F16(vec![f16::ZERO; len]),
            DType::BF16 => HostVec::BF16(vec![bf16::ZERO; len]),
            DType::I32 => HostVec::I32(vec![0; len]),
            DType::I64 => HostVec::I64(vec![0; len]),
            DType::F8E4M3 => HostVec::F8E4M3(vec![0; len]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_typed_slices_agree() {
        let v = [1.5f32, -2.0, 3.25];
        let typed = HostSlice::F32(&v);
        let raw = HostSlice::Bytes(typed.as_bytes(), DType::F32);
        assert_eq!(raw.len(), 3);
        assert_eq!(raw.to_f32_vec(), v.to_vec());
        let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        let raw = HostSlice::Bytes(bytemuck::cast_slice(&b), DType::BF16);
        assert_eq!(raw.to_f32_vec(), v.to_vec());
    }

    #[test]
    fn e4m3_bytes_are_one_element_each_and_decode() {
        let codes = HostVec::F8E4M3(vec![0x38, 0xC0, 0x7E, 0x01]);
        assert_eq!(codes.dtype(), DType::F8E4M3);
        assert_eq!(codes.as_slice().len(), 4);
        assert_eq!(codes.to_f32(), vec![1.0, -2.0, 448.0, 2f32.powi(-9)]);
        assert_eq!(HostVec::zeros(DType::F8E4M3, 3), HostVec::F8E4M3(vec![0; 3]));
    }
}
