//! Reproducible inputs: a counter-based generator seeded per case, values
//! rounded to the device's activation dtype, and the error measures.

use half::{bf16, f16};
use pagoda_backend::DType;
use rayon::prelude::*;

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// SplitMix64 stream for one case.
#[derive(Clone, Debug)]
pub(crate) struct CaseRng {
    state: u64,
}

/// Values generated per parallel chunk (each chunk has its own stream, so
/// the result does not depend on the thread count).
const CHUNK: usize = 1 << 14;

impl CaseRng {
    /// A stream from the grid seed and the case's label.
    pub(crate) fn new(seed: u64, label: &str) -> Self {
        // FNV-1a over the label, then mixed with the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in label.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        Self { state: mix64(seed ^ mix64(h)) }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A standard normal draw (Box-Muller).
    pub(crate) fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// `len` normal values times `scale`, rounded to `dtype`; generated in
    /// parallel chunks, each from a seed drawn here.
    pub(crate) fn normals(&mut self, len: usize, scale: f32, dtype: DType) -> Vec<f32> {
        let base = self.next_u64();
        let mut out = vec![0.0f32; len];
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
            let mut rng = CaseRng { state: mix64(base ^ c as u64) };
            for v in chunk.iter_mut() {
                *v = round_to(dtype, rng.normal() as f32 * scale);
            }
        });
        out
    }

    /// A random permutation of `0..n`.
    pub(crate) fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            v.swap(i, self.below(i + 1));
        }
        v
    }
}

/// `x` as the device would store it in `dtype` (round to nearest even).
pub(crate) fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_f32(x).to_f32(),
        DType::F16 => f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// Error of a device output against the reference, as relative L2 norms.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Errors {
    pub rel: f64,
    pub worst_row: f64,
    /// Every element of both outputs is finite.
    pub finite: bool,
}

fn rel(diff_sq: f64, ref_sq: f64) -> f64 {
    if diff_sq == 0.0 {
        0.0
    } else {
        (diff_sq / ref_sq.max(f64::MIN_POSITIVE)).sqrt()
    }
}

/// `||d - r|| / ||r||` over everything and per row of `row_len` elements.
pub(crate) fn errors(reference: &[f32], device: &[f32], row_len: usize) -> Errors {
    let row_len = row_len.max(1);
    let per_row: Vec<(f64, f64, bool)> = reference
        .par_chunks(row_len)
        .zip(device.par_chunks(row_len))
        .map(|(r, d)| {
            let mut diff_sq = 0.0f64;
            let mut ref_sq = 0.0f64;
            let mut finite = true;
            for (&a, &b) in r.iter().zip(d) {
                finite &= a.is_finite() && b.is_finite();
                diff_sq += (b as f64 - a as f64).powi(2);
                ref_sq += (a as f64).powi(2);
            }
            (diff_sq, ref_sq, finite)
        })
        .collect();
    let finite = reference.len() == device.len() && per_row.iter().all(|r| r.2);
    let (diff_sq, ref_sq) = per_row.iter().fold((0.0, 0.0), |acc, r| (acc.0 + r.0, acc.1 + r.1));
    let worst_row = per_row.iter().map(|r| rel(r.0, r.1)).fold(0.0, f64::max);
    if !finite {
        return Errors { rel: f64::NAN, worst_row: f64::NAN, finite };
    }
    Errors { rel: rel(diff_sq, ref_sq), worst_row, finite }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_relative_and_nan_never_passes() {
        let e = errors(&[3.0, 4.0, 0.0, 1.0], &[3.0, 4.0, 0.0, 1.5], 2);
        assert!((e.rel - 0.5 / 26f64.sqrt()).abs() < 1e-12);
        assert!((e.worst_row - 0.5).abs() < 1e-12);
        assert!(e.finite);
        let e = errors(&[1.0, 2.0], &[1.0, f32::NAN], 2);
        assert!(!e.finite && e.rel.is_nan());
        assert_eq!(errors(&[0.0, 0.0], &[0.0, 0.0], 1).rel, 0.0);
        assert!(errors(&[0.0], &[1e-3], 1).rel > 1.0);
    }

    #[test]
    fn streams_are_reproducible_and_distinct_per_label() {
        let a = CaseRng::new(1, "x").normals(40_000, 1.0, DType::F32);
        assert_eq!(a, CaseRng::new(1, "x").normals(40_000, 1.0, DType::F32));
        assert_ne!(a, CaseRng::new(1, "y").normals(40_000, 1.0, DType::F32));
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.03, "{mean} {var}");
        let b = CaseRng::new(2, "x").normals(10, 1.0, DType::BF16);
        assert!(b.iter().all(|&x| round_to(DType::BF16, x) == x));
    }
}
