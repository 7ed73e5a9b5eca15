//! FP8 E4M3 (the OCP "e4m3fn" format that Hopper's tensor cores and vLLM's
//! `fp8_e4m3` KV cache use, [`DType::F8E4M3`](crate::DType::F8E4M3)),
//! bit-exact, as the reference the device kernels' conversions are checked
//! against: 1 sign bit, 4 exponent bits (bias 7), 3
//! mantissa bits; no infinities; exponent and mantissa all ones is NaN, so the
//! largest finite magnitude is 448 (`0x7E`), the smallest normal 2^-6 and the
//! smallest subnormal 2^-9.
//!
//! Encoding rounds to the nearest representable value, ties to the even
//! mantissa, and saturates: a finite value beyond ±448 becomes ±448, as CUDA's
//! `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)` does. Infinities
//! saturate too; NaN stays NaN (`0x7F`, sign kept).

/// The largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// The value of an E4M3 byte (NaN for `0x7F` and `0xFF`, with the byte's
/// sign, so that [`e4m3_from_f32`] gives every byte back).
pub fn e4m3_to_f32(byte: u8) -> f32 {
    let sign: f32 = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = ((byte >> 3) & 0x0F) as i32;
    let mantissa = (byte & 0x07) as f32;
    if exponent == 0x0F && byte & 0x07 == 0x07 {
        return f32::NAN.copysign(sign);
    }
    let magnitude = match exponent {
        0 => mantissa / 8.0 * 2f32.powi(-6),
        _ => (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7),
    };
    sign * magnitude
}

/// The E4M3 value nearest to `x` (`e4m3_to_f32(e4m3_from_f32(x))`): what a
/// cache of E4M3 codes holds for `x`.
pub fn e4m3_round(x: f32) -> f32 {
    e4m3_to_f32(e4m3_from_f32(x))
}

/// A byte's place in the order of E4M3 values: `+n` for the n-th value above
/// zero (bytes `0x00..=0x7E` in order), `-n` below it, so both zeros are 0 and
/// two finite codes are `|a - b|` representable steps apart.
pub fn e4m3_ordinal(byte: u8) -> i32 {
    let magnitude = (byte & 0x7F) as i32;
    if byte & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// The E4M3 byte nearest to `x` (ties to the even mantissa), saturating at
/// ±448; NaN gives `0x7F` (with `x`'s sign).
pub fn e4m3_from_f32(x: f32) -> u8 {
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return sign | 0x7F;
    }
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    // The spacing of representable values around `a`: 2^-9 below 2^-6
    // (subnormals), else an eighth of the power of two at or below `a`
    // (read from the f32 exponent field: `a` is a normal f32 there).
    let exponent = if a < 2f32.powi(-6) { -6 } else { ((a.to_bits() >> 23) & 0xFF) as i32 - 127 };
    let step = 2f64.powi(exponent - 3);
    // In steps, exactly (f64 holds every f32 and this quotient); round half to even.
    let q = a as f64 / step;
    let mut n = q.floor();
    let frac = q - n;
    if frac > 0.5 || (frac == 0.5 && n % 2.0 == 1.0) {
        n += 1.0;
    }
    let value = n * step;
    if value >= E4M3_MAX as f64 {
        return sign | 0x7E;
    }
    let n = n as u32;
    let byte = if exponent == -6 && n < 8 {
        n as u8 // subnormal: mantissa n, exponent field 0
    } else if n == 16 {
        // Rounded up to the next power of two.
        ((((exponent + 1 + 7) as u32) << 3) & 0x78) as u8
    } else {
        ((((exponent + 7) as u32) << 3) | (n - 8)) as u8
    };
    sign | byte
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every finite E4M3 value, by an independent reading of the format
    /// (the 254 bytes that are not NaN), with its byte.
    fn finite_values() -> Vec<(u8, f64)> {
        (0u8..=255)
            .filter(|b| b & 0x7F != 0x7F)
            .map(|b| {
                let e = ((b >> 3) & 0xF) as i32;
                let m = (b & 7) as f64;
                let v = if e == 0 { m * 2f64.powi(-9) } else { (8.0 + m) * 2f64.powi(e - 10) };
                (b, if b & 0x80 != 0 { -v } else { v })
            })
            .collect()
    }

    /// The nearest finite value by brute force; a tie goes to the even byte
    /// (the even mantissa), beyond 448 to ±448.
    fn nearest(x: f64) -> u8 {
        let mut best: Option<(u8, f64)> = None;
        for (b, v) in finite_values() {
            if v == 0.0 && b == 0x80 && x >= 0.0 {
                continue; // +0 for non-negative inputs
            }
            if v == 0.0 && b == 0x00 && x < 0.0 {
                continue;
            }
            let d = (x - v).abs();
            best = match best {
                Some((bb, bd)) if bd < d || (bd == d && bb & 1 == 0) => Some((bb, bd)),
                _ => Some((b, d)),
            };
        }
        best.expect("values exist").0
    }

    #[test]
    fn decoding_matches_the_format() {
        for (b, v) in finite_values() {
            assert_eq!(e4m3_to_f32(b) as f64, v, "byte {b:#04x}");
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
    }

    #[test]
    fn every_byte_round_trips() {
        for b in 0..=255u8 {
            assert_eq!(e4m3_from_f32(e4m3_to_f32(b)), b, "byte {b:#04x}");
        }
    }

    #[test]
    fn encoding_is_the_nearest_value_ties_to_even() {
        let values: Vec<f64> = finite_values().into_iter().map(|(_, v)| v).filter(|v| *v >= 0.0).collect();
        let mut probes = Vec::new();
        for w in values.windows(2) {
            let (lo, hi) = (w[0], w[1]);
            // The midpoint (a tie), just either side of it, and a quarter of the way.
            let mid = (lo + hi) / 2.0;
            probes.extend([mid, mid * (1.0 - 1e-6), mid * (1.0 + 1e-6), lo + (hi - lo) / 4.0]);
        }
        probes.extend([1e-12, 1e-3, 0.3, 1.0, 2.71, 100.0, 447.9, 450.0, 464.0, 1e6]);
        for &p in &probes {
            for x in [p, -p] {
                let x = x as f32;
                assert_eq!(e4m3_from_f32(x), nearest(x as f64), "{x:e}");
            }
        }
    }

    #[test]
    fn ordinals_count_steps_between_values() {
        let values = finite_values();
        for &(a, va) in &values {
            for &(b, vb) in &values {
                let (lo, hi) = (va.min(vb), va.max(vb));
                let between = values.iter().filter(|&&(_, v)| v > lo && v < hi).count();
                // Both zeros are one value: the steps are the distinct values between, plus one.
                let distinct_between = between - usize::from(lo < 0.0 && hi > 0.0);
                let want = if va == vb { 0 } else { distinct_between as i32 + 1 };
                assert_eq!((e4m3_ordinal(a) - e4m3_ordinal(b)).abs(), want, "{a:#04x} {b:#04x}");
            }
        }
        assert_eq!(e4m3_round(0.3), 0.3125);
        assert_eq!(e4m3_round(1000.0), 448.0);
    }

    #[test]
    fn saturation_and_specials() {
        assert_eq!(e4m3_from_f32(f32::INFINITY), 0x7E);
        assert_eq!(e4m3_from_f32(f32::NEG_INFINITY), 0xFE);
        assert_eq!(e4m3_from_f32(1e30), 0x7E);
        assert_eq!(e4m3_from_f32(-500.0), 0xFE);
        assert_eq!(e4m3_from_f32(f32::NAN) & 0x7F, 0x7F);
        assert_eq!(e4m3_from_f32(0.0), 0x00);
        assert_eq!(e4m3_from_f32(-0.0), 0x80);
        // Below half the smallest subnormal: zero; just above: the smallest subnormal.
        assert_eq!(e4m3_from_f32(2f32.powi(-11)), 0x00);
        assert_eq!(e4m3_from_f32(2f32.powi(-10) * 1.01), 0x01);
    }
}
