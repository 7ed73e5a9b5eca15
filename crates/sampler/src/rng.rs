//! Counter-based random numbers: the draw for `(seed, step)` is a pure
//! function, so a sequence samples the same tokens alone or in any batch, after
//! preemption and recomputation, and on any backend (the CUDA sampler computes
//! the same function on the device).

/// SplitMix64's finaliser: a bijective 64-bit mix with full avalanche.
#[inline]
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform draw in `[0, 1)` for this seed and step, with 24 bits of resolution
/// (exactly representable in f32, so every backend gets the identical value).
#[inline]
pub fn uniform(seed: u64, step: u64) -> f32 {
    let bits = mix64(mix64(seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_add(step));
    (bits >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_in_range_deterministic_and_roughly_flat() {
        let mut buckets = [0usize; 10];
        for step in 0..100_000u64 {
            let u = uniform(42, step);
            assert!((0.0..1.0).contains(&u));
            assert_eq!(u, uniform(42, step));
            buckets[(u * 10.0) as usize] += 1;
        }
        for b in buckets {
            assert!((9_000..11_000).contains(&b), "{buckets:?}");
        }
        assert_ne!(uniform(1, 0), uniform(2, 0));
    }
}
