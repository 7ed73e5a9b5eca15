//! Rotary position embedding fused with the paged-cache write.

use pagoda_backend::{BackendError, Result, RopeStyle, RotaryCacheArgs, RotaryShape};

use crate::ops::for_each_row;
use crate::storage::with_operands;
use crate::CpuBackend;

/// Rotates the first `rotary_dim` elements of one head in place.
///
/// With `c = cos[i]`, `s = sin[i]` for `i < rotary_dim / 2` and the pair
/// `(a, b)` (Neox: elements `i` and `i + rotary_dim/2`; Interleaved: `2i` and
/// `2i+1`): `a' = a·c − b·s`, `b' = b·c + a·s`.
pub(crate) fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = cos.len();
    for i in 0..half {
        let (ia, ib) = match style {
            RopeStyle::Neox => (i, i + half),
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
        };
        let (a, b) = (head[ia], head[ib]);
        head[ia] = a * cos[i] - b * sin[i];
        head[ib] = b * cos[i] + a * sin[i];
    }
}

pub(crate) fn rotary_and_cache(args: &RotaryCacheArgs<'_, CpuBackend>) -> Result<()> {
    const OP: &str = "rotary_and_cache";
    let RotaryShape { max_positions, cache, .. } = args.check()?;
    let RotaryCacheArgs { qkv, positions, cos_sin, q_out, k_cache, v_cache, slot_mapping, .. } = *args;
    let (hq, hkv, d, rd) = (args.num_q_heads, args.num_kv_heads, args.head_dim, args.rotary_dim);
    let width = (hq + 2 * hkv) * d;
    let block_size = cache.block_size;
    let num_slots = cache.num_blocks * block_size;

    with_operands(OP, &[qkv, positions, cos_sin, slot_mapping], &[q_out, k_cache, v_cache], |ins, outs| {
        let (xs, pos, table, slots) =
            (ins.f32(qkv)?, ins.i32(positions)?, ins.f32(cos_sin)?, ins.i64(slot_mapping)?);
        if let Some((t, &p)) = pos.iter().enumerate().find(|&(_, &p)| p < 0 || p as usize >= max_positions) {
            return Err(BackendError::Index {
                op: OP,
                detail: format!("token {t}: position {p} outside the cos/sin table of {max_positions}"),
            });
        }
        if let Some((t, &s)) = slots.iter().enumerate().find(|&(_, &s)| s >= num_slots as i64) {
            return Err(BackendError::Index {
                op: OP,
                detail: format!("token {t}: slot {s} outside the cache of {num_slots} slots"),
            });
        }
        let cos_sin_of = |t: usize| {
            let row = &table[pos[t] as usize * rd..][..rd];
            row.split_at(rd / 2)
        };
        let [q_out, k_cache, v_cache] = outs else {
            return Err(BackendError::Device(format!("{OP}: expected three outputs")));
        };
        for_each_row(q_out, hq * d, |t, q_row| {
            q_row.copy_from_slice(&xs[t * width..][..hq * d]);
            let (cos, sin) = cos_sin_of(t);
            q_row.chunks_mut(d).for_each(|head| rotate(&mut head[..rd], cos, sin, args.style));
        });
        // Cache writes in token order: a duplicated slot keeps the last token's values.
        for (t, &slot) in slots.iter().enumerate() {
            if slot < 0 {
                continue;
            }
            let (block, offset) = (slot as usize / block_size, slot as usize % block_size);
            let (cos, sin) = cos_sin_of(t);
            let k_all = &xs[t * width + hq * d..][..hkv * d];
            let v_all = &xs[t * width + (hq + hkv) * d..][..hkv * d];
            for h in 0..hkv {
                let at = ((block * hkv + h) * block_size + offset) * d;
                let k_dst = &mut k_cache[at..at + d];
                k_dst.copy_from_slice(&k_all[h * d..(h + 1) * d]);
                rotate(&mut k_dst[..rd], cos, sin, args.style);
                v_cache[at..at + d].copy_from_slice(&v_all[h * d..(h + 1) * d]);
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use pagoda_backend::{Backend, DType, HostSlice, Tensor};

    use super::*;

    struct Setup {
        cpu: CpuBackend,
        qkv: Tensor<CpuBackend>,
        positions: Tensor<CpuBackend>,
        cos_sin: Tensor<CpuBackend>,
        q_out: Tensor<CpuBackend>,
        k_cache: Tensor<CpuBackend>,
        v_cache: Tensor<CpuBackend>,
    }

    /// One q head, one kv head, D = 4, rotary_dim 4; 2 blocks of 2 slots.
    fn setup(positions: &[i32]) -> Setup {
        let cpu = CpuBackend::new();
        let t = positions.len();
        let qkv: Vec<f32> = (0..t * 12).map(|i| i as f32).collect();
        let qkv = cpu.upload(HostSlice::F32(&qkv), &[t, 12], DType::F32).unwrap();
        let positions = cpu.upload(HostSlice::I32(positions), &[t], DType::I32).unwrap();
        // Angle table for theta = 1 on two frequencies: angle = p * [1, 0.5].
        let mut table = Vec::new();
        for p in 0..4 {
            let angles = [p as f32, p as f32 * 0.5];
            table.extend(angles.iter().map(|a| a.cos()));
            table.extend(angles.iter().map(|a| a.sin()));
        }
        let cos_sin = cpu.upload(HostSlice::F32(&table), &[4, 4], DType::F32).unwrap();
        let q_out = cpu.alloc(&[t, 4], DType::F32).unwrap();
        let k_cache = cpu.upload(HostSlice::F32(&[-7.0; 16]), &[2, 1, 2, 4], DType::F32).unwrap();
        let v_cache = cpu.upload(HostSlice::F32(&[-7.0; 16]), &[2, 1, 2, 4], DType::F32).unwrap();
        Setup { cpu, qkv, positions, cos_sin, q_out, k_cache, v_cache }
    }

    fn args<'a>(
        s: &'a Setup,
        slots: &'a Tensor<CpuBackend>,
        style: RopeStyle,
    ) -> RotaryCacheArgs<'a, CpuBackend> {
        RotaryCacheArgs {
            qkv: &s.qkv,
            positions: &s.positions,
            cos_sin: &s.cos_sin,
            q_out: &s.q_out,
            k_cache: &s.k_cache,
            v_cache: &s.v_cache,
            slot_mapping: slots,
            num_q_heads: 1,
            num_kv_heads: 1,
            head_dim: 4,
            rotary_dim: 4,
            style,
        }
    }

    #[test]
    fn neox_and_interleaved_rotate_by_hand_computed_angles_and_fill_the_slots() {
        for style in [RopeStyle::Neox, RopeStyle::Interleaved] {
            let s = setup(&[0, 3]);
            let slots = s.cpu.upload(HostSlice::I64(&[3, -1]), &[2], DType::I64).unwrap();
            s.cpu.rotary_and_cache(&args(&s, &slots, style)).unwrap();
            let q = s.cpu.download_f32(&s.q_out).unwrap();
            // Position 0 is the identity.
            assert_eq!(&q[..4], &[0.0, 1.0, 2.0, 3.0]);
            // Token 1 (q = [12, 13, 14, 15]) at position 3, angles [3, 1.5].
            let (x, a) = ([12.0f32, 13.0, 14.0, 15.0], [3.0f32, 1.5]);
            let want = match style {
                RopeStyle::Neox => [
                    x[0] * a[0].cos() - x[2] * a[0].sin(),
                    x[1] * a[1].cos() - x[3] * a[1].sin(),
                    x[2] * a[0].cos() + x[0] * a[0].sin(),
                    x[3] * a[1].cos() + x[1] * a[1].sin(),
                ],
                RopeStyle::Interleaved => [
                    x[0] * a[0].cos() - x[1] * a[0].sin(),
                    x[1] * a[0].cos() + x[0] * a[0].sin(),
                    x[2] * a[1].cos() - x[3] * a[1].sin(),
                    x[3] * a[1].cos() + x[2] * a[1].sin(),
                ],
            };
            for (g, w) in q[4..].iter().zip(want) {
                assert!((g - w).abs() < 1e-5, "{style:?}: {q:?} vs {want:?}");
            }
            // Token 0 went to slot 3 = block 1, offset 1 (unrotated at position 0);
            // token 1 was skipped, every other slot is untouched.
            let k = s.cpu.download_f32(&s.k_cache).unwrap();
            let v = s.cpu.download_f32(&s.v_cache).unwrap();
            assert_eq!(&k[12..], &[4.0, 5.0, 6.0, 7.0]);
            assert_eq!(&v[12..], &[8.0, 9.0, 10.0, 11.0]);
            assert!(k[..12].iter().chain(&v[..12]).all(|&x| x == -7.0));
        }
    }

    #[test]
    fn partial_rotary_dim_leaves_the_tail() {
        let s = setup(&[2]);
        let slots = s.cpu.upload(HostSlice::I64(&[0]), &[1], DType::I64).unwrap();
        let cos_sin = s.cpu.upload(HostSlice::F32(&[2f32.cos(), 2f32.sin()]), &[1, 2], DType::F32).unwrap();
        let positions = s.cpu.upload(HostSlice::I32(&[0]), &[1], DType::I32).unwrap();
        let a = RotaryCacheArgs {
            rotary_dim: 2,
            cos_sin: &cos_sin,
            positions: &positions,
            ..args(&s, &slots, RopeStyle::Neox)
        };
        s.cpu.rotary_and_cache(&a).unwrap();
        let q = s.cpu.download_f32(&s.q_out).unwrap();
        assert!((q[0] - (0.0 * 2f32.cos() - 1.0 * 2f32.sin())).abs() < 1e-6);
        assert!((q[1] - (1.0 * 2f32.cos() + 0.0 * 2f32.sin())).abs() < 1e-6);
        assert_eq!(&q[2..], &[2.0, 3.0]);
    }

    #[test]
    fn bad_positions_slots_and_shapes_are_errors() {
        let s = setup(&[0, 4]);
        let slots = s.cpu.upload(HostSlice::I64(&[0, 1]), &[2], DType::I64).unwrap();
        assert!(matches!(
            s.cpu.rotary_and_cache(&args(&s, &slots, RopeStyle::Neox)),
            Err(BackendError::Index { .. })
        ));
        let s = setup(&[0, 1]);
        let slots = s.cpu.upload(HostSlice::I64(&[0, 4]), &[2], DType::I64).unwrap();
        assert!(matches!(
            s.cpu.rotary_and_cache(&args(&s, &slots, RopeStyle::Neox)),
            Err(BackendError::Index { .. })
        ));
        let slots = s.cpu.upload(HostSlice::I64(&[0, 1]), &[2], DType::I64).unwrap();
        let a = RotaryCacheArgs { rotary_dim: 3, ..args(&s, &slots, RopeStyle::Neox) };
        assert!(matches!(s.cpu.rotary_and_cache(&a), Err(BackendError::Shape { .. })));
        let a = RotaryCacheArgs { num_kv_heads: 2, ..args(&s, &slots, RopeStyle::Neox) };
        assert!(matches!(s.cpu.rotary_and_cache(&a), Err(BackendError::Shape { .. })));
        let a = RotaryCacheArgs { q_out: &s.qkv, ..args(&s, &slots, RopeStyle::Neox) };
        assert!(matches!(s.cpu.rotary_and_cache(&a), Err(BackendError::Shape { .. })));
        let same = RotaryCacheArgs { v_cache: &s.k_cache, ..args(&s, &slots, RopeStyle::Neox) };
        assert!(matches!(s.cpu.rotary_and_cache(&same), Err(BackendError::Aliasing { .. })));
    }
}
