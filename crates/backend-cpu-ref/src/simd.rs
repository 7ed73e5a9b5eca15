//! The two inner loops everything hot reduces to, a dot product and an axpy,
//! written once and compiled twice: portably (SSE2 on x86-64), and for
//! AVX2 + FMA, chosen at run time. Kernels that use them take a `const FMA:
//! bool` and are instantiated behind one `#[target_feature]` entry point each,
//! so the choice is made once per task, not per element.

/// The instruction set the row kernels run with on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Portable,
    /// x86-64 with AVX2 and FMA (every x86-64 server CPU since 2013).
    Avx2Fma,
}

impl Isa {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // The std macro caches its answer; this is a load and a branch.
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Isa::Avx2Fma;
            }
        }
        Isa::Portable
    }
}

const LANES: usize = 16;

/// `Σ a[i]·b[i]` with 16 independent accumulators (SIMD lanes; a single
/// running sum would serialise on the add latency), folded pairwise.
#[inline(always)]
pub(crate) fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let mut tail = 0.0f32;
    for (x, y) in a_chunks.remainder().iter().zip(b_chunks.remainder()) {
        tail = if FMA { x.mul_add(*y, tail) } else { tail + x * y };
    }
    for (ca, cb) in a_chunks.zip(b_chunks) {
        for i in 0..LANES {
            // `mul_add` only where FMA is compiled in: elsewhere it is a libm call.
            acc[i] = if FMA { ca[i].mul_add(cb[i], acc[i]) } else { acc[i] + ca[i] * cb[i] };
        }
    }
    let mut quad = [0.0f32; 4];
    for i in 0..4 {
        quad[i] = (acc[i] + acc[i + 4]) + (acc[i + 8] + acc[i + 12]);
    }
    (quad[0] + quad[2]) + (quad[1] + quad[3]) + tail
}

/// `y += alpha · x`.
#[inline(always)]
pub(crate) fn axpy<const FMA: bool>(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = if FMA { alpha.mul_add(v, *o) } else { *o + alpha * v };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_instantiations_match_a_plain_sum() {
        for len in [0usize, 1, 15, 16, 17, 64, 100] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot::<false>(&a, &b) as f64 - want).abs() < 1e-4);
            if Isa::detect() == Isa::Avx2Fma {
                assert!((dot::<true>(&a, &b) as f64 - want).abs() < 1e-4);
            }
            let mut y = vec![1.0f32; len];
            axpy::<false>(&mut y, 2.0, &a);
            assert!(y.iter().zip(&a).all(|(y, a)| (y - (1.0 + 2.0 * a)).abs() < 1e-6));
        }
    }
}
