//! Dequantisation of ggml block formats to f32.
//!
//! Each format packs a fixed number of elements into a block with its own
//! scale (and minimum). Blocks run along the fastest dimension, so a matrix
//! row is a whole number of blocks and rows dequantise independently.

use half::{bf16, f16};

use crate::gguf::{GgmlType, GgufError};

/// Dequantises `data` (a whole number of blocks of `ty`) into `out`, which
/// must hold exactly the number of elements the blocks encode.
pub fn dequantize(name: &str, ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    let (block, block_bytes) = ty.block_layout();
    if out.len() % block != 0 || data.len() != out.len() / block * block_bytes {
        return Err(GgufError::Tensor {
            name: name.into(),
            detail: format!("{} bytes of {ty:?} cannot hold {} elements", data.len(), out.len()),
        });
    }
    let blocks = data.chunks_exact(block_bytes).zip(out.chunks_exact_mut(block));
    match ty {
        GgmlType::F32 => blocks.for_each(|(b, o)| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        GgmlType::F16 => blocks.for_each(|(b, o)| o[0] = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::BF16 => blocks.for_each(|(b, o)| o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::Q4_0 => blocks.for_each(|(b, o)| q4_0(b, o)),
        GgmlType::Q4_1 => blocks.for_each(|(b, o)| q4_1(b, o)),
        GgmlType::Q5_0 => blocks.for_each(|(b, o)| q5_0(b, o)),
        GgmlType::Q5_1 => blocks.for_each(|(b, o)| q5_1(b, o)),
        GgmlType::Q8_0 => blocks.for_each(|(b, o)| q8_0(b, o)),
        GgmlType::Q4_K => blocks.for_each(|(b, o)| q4_k(b, o)),
        GgmlType::Q6_K => blocks.for_each(|(b, o)| q6_k(b, o)),
        other => return Err(GgufError::UnsupportedTensorType { name: name.into(), ggml_type: other }),
    }
    Ok(())
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// 32 elements: f16 scale, then 16 bytes of 4-bit values offset by 8.
/// Byte `j` holds element `j` in its low nibble and element `j + 16` in its high one.
fn q4_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        out[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// 32 elements: f16 scale and f16 minimum, then nibbles as in Q4_0 (unsigned).
fn q4_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        out[j] = (q & 0x0f) as f32 * d + m;
        out[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// 32 elements: f16 scale, 32 fifth bits (u32), nibbles as in Q4_0; values offset by 16.
fn q5_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let high = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, &q) in b[6..22].iter().enumerate() {
        let lo = (q & 0x0f) as u32 | ((high >> j) & 1) << 4;
        let hi = (q >> 4) as u32 | ((high >> (j + 16)) & 1) << 4;
        out[j] = (lo as i32 - 16) as f32 * d;
        out[j + 16] = (hi as i32 - 16) as f32 * d;
    }
}

/// 32 elements: f16 scale and minimum, fifth bits, nibbles; unsigned.
fn q5_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let high = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (j, &q) in b[8..24].iter().enumerate() {
        let lo = (q & 0x0f) as u32 | ((high >> j) & 1) << 4;
        let hi = (q >> 4) as u32 | ((high >> (j + 16)) & 1) << 4;
        out[j] = lo as f32 * d + m;
        out[j + 16] = hi as f32 * d + m;
    }
}

/// 32 elements: f16 scale, 32 signed bytes.
fn q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = q as i8 as f32 * d;
    }
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) of a Q4_K block, packed
/// into 12 bytes: the first four sub-blocks use the low 6 bits of bytes 0..8,
/// the last four combine a nibble of bytes 8..12 with the top 2 bits of 0..8.
fn k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// 256 elements: f16 super-scale `d` and super-minimum `dmin`, 12 bytes of
/// 6-bit sub-block scales and minimums (8 sub-blocks of 32), 128 bytes of
/// nibbles. Each 32-byte run of nibbles covers 64 elements: low nibbles the
/// first 32, high nibbles the next 32.
fn q4_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let (sc_lo, m_lo) = k_scale_min(2 * chunk, scales);
        let (sc_hi, m_hi) = k_scale_min(2 * chunk + 1, scales);
        let (d_lo, min_lo) = (d * sc_lo as f32, dmin * m_lo as f32);
        let (d_hi, min_hi) = (d * sc_hi as f32, dmin * m_hi as f32);
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let o = &mut out[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            o[l] = d_lo * (q[l] & 0x0f) as f32 - min_lo;
            o[l + 32] = d_hi * (q[l] >> 4) as f32 - min_hi;
        }
    }
}

/// 256 elements: 128 bytes of low nibbles, 64 bytes of 2-bit high parts,
/// 16 signed 8-bit sub-block scales (16 elements each), f16 super-scale.
/// Values are 6-bit, offset by 32. Each half of 128 elements uses 64 low-nibble
/// bytes and 32 high-bit bytes; byte `l` of the high bits serves elements
/// `l`, `l+32`, `l+64`, `l+96` of the half.
fn q6_k(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        let o = &mut out[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            o[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            o[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            o[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            o[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_scales_signed_bytes() {
        let mut block = vec![0u8; 34];
        block[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block[2] = 4;
        block[3] = (-6i8) as u8;
        let mut out = vec![0.0; 32];
        dequantize("t", GgmlType::Q8_0, &block, &mut out).unwrap();
        assert_eq!(&out[..3], &[2.0, -3.0, 0.0]);
    }

    #[test]
    fn q4_1_uses_low_then_high_nibbles() {
        let mut block = vec![0u8; 20];
        block[..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        block[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        block[4] = 0x53; // element 0 = 3, element 16 = 5
        let mut out = vec![0.0; 32];
        dequantize("t", GgmlType::Q4_1, &block, &mut out).unwrap();
        assert_eq!(out[0], 5.0);
        assert_eq!(out[16], 9.0);
        assert_eq!(out[1], -1.0);
    }

    #[test]
    fn size_mismatch_and_unsupported_types_are_errors() {
        let mut out = vec![0.0; 32];
        assert!(dequantize("t", GgmlType::Q4_0, &[0u8; 17], &mut out).is_err());
        let mut out = vec![0.0; 256];
        assert!(matches!(
            dequantize("t", GgmlType::Q2_K, &[0u8; 84], &mut out),
            Err(GgufError::UnsupportedTensorType { .. })
        ));
    }
}
