//! Rotary position embedding fused with the paged-cache write. An F8E4M3
//! cache gets `e4m3(x / scale)` of the f32 value an F32 cache would get.

use pagoda_backend::fp8::e4m3_round;
use pagoda_backend::{BackendError, DType, Result, RopeStyle, RotaryCacheArgs, RotaryShape, Tensor};

use crate::ops::for_each_row;
use crate::storage::{with_cache_operands, Inputs};
use crate::CpuBackend;

/// The K and V scales of an op's F8E4M3 caches (1.0 without a tensor),
/// checked: an E4M3 cache is only meaningful with positive, finite scales.
pub(crate) fn kv_scales(
    op: &'static str,
    ins: &Inputs<'_>,
    scales: Option<&Tensor<CpuBackend>>,
) -> Result<(f32, f32)> {
    let Some(t) = scales else { return Ok((1.0, 1.0)) };
    let s = ins.f32(t)?;
    let (k, v) = (s[0], s[1]);
    if !(k.is_finite() && k > 0.0 && v.is_finite() && v > 0.0) {
        return Err(BackendError::shape(
            op,
            format!("kv_scales [{k}, {v}]: both must be positive and finite"),
        ));
    }
    Ok((k, v))
}

/// What a cache of `dtype` stores for the value `x`: `x` itself in an F32
/// cache, the E4M3 value nearest `x / scale` (an f32 division) in an F8E4M3 one.
fn cache_value(dtype: DType, x: f32, scale: f32) -> f32 {
    match dtype {
        DType::F8E4M3 => e4m3_round(x / scale),
        _ => x,
    }
}

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
    let RotaryCacheArgs {
        qkv,
        positions,
        cos_sin,
        q_out,
        k_cache,
        v_cache,
        kv_scales: scales,
        slot_mapping,
        ..
    } = *args;
    let cache_dtype = k_cache.dtype();
    let (hq, hkv, d, rd) = (args.num_q_heads, args.num_kv_heads, args.head_dim, args.rotary_dim);
    let width = (hq + 2 * hkv) * d;
    let block_size = cache.block_size;
    let num_slots = cache.num_blocks * block_size;

    let mut inputs = vec![qkv, positions, cos_sin, slot_mapping];
    inputs.extend(scales);
    with_cache_operands(OP, &inputs, &[q_out, k_cache, v_cache], |ins, outs| {
        let (xs, pos, table, slots) =
            (ins.f32(qkv)?, ins.i32(positions)?, ins.f32(cos_sin)?, ins.i64(slot_mapping)?);
        let (k_scale, v_scale) = kv_scales(OP, ins, scales)?;
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
                k_dst.iter_mut().for_each(|x| *x = cache_value(cache_dtype, *x, k_scale));
                let v_dst = &mut v_cache[at..at + d];
                for (dst, &x) in v_dst.iter_mut().zip(&v_all[h * d..(h + 1) * d]) {
                    *dst = cache_value(cache_dtype, x, v_scale);
                }
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use pagoda_backend::{Backend, HostSlice};

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
            kv_scales: None,
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

    #[test]
    fn fp8_caches_store_the_nearest_code_of_the_scaled_values() {
        let s = setup(&[0, 3]);
        let k8 = s.cpu.alloc(&[2, 1, 2, 4], DType::F8E4M3).unwrap();
        let v8 = s.cpu.alloc(&[2, 1, 2, 4], DType::F8E4M3).unwrap();
        let slots = s.cpu.upload(HostSlice::I64(&[1, 2]), &[2], DType::I64).unwrap();
        let scales = s.cpu.upload(HostSlice::F32(&[0.5, 3.0]), &[2], DType::F32).unwrap();
        let fp8 = RotaryCacheArgs {
            k_cache: &k8,
            v_cache: &v8,
            kv_scales: Some(&scales),
            ..args(&s, &slots, RopeStyle::Neox)
        };
        s.cpu.rotary_and_cache(&fp8).unwrap();
        // The same step into F32 caches gives the values that were quantized.
        s.cpu.rotary_and_cache(&args(&s, &slots, RopeStyle::Neox)).unwrap();
        let (k, v) = (s.cpu.download_f32(&s.k_cache).unwrap(), s.cpu.download_f32(&s.v_cache).unwrap());
        let (k8s, v8s) = (s.cpu.download_f32(&k8).unwrap(), s.cpu.download_f32(&v8).unwrap());
        for at in 4..12 {
            assert_eq!(k8s[at], e4m3_round(k[at] / 0.5), "k {at}");
            assert_eq!(v8s[at], e4m3_round(v[at] / 3.0), "v {at}");
        }
        // Token 0 (position 0): k = [4, 5, 6, 7] / 0.5 = [8, 10, 12, 14], all E4M3 values;
        // v = [8, 9, 10, 11] / 3 rounds to [2.75, 3, 3.25, 3.75].
        assert_eq!(&k8s[4..8], &[8.0, 10.0, 12.0, 14.0]);
        assert_eq!(&v8s[4..8], &[2.75, 3.0, 3.25, 3.75]);
        assert!(k8s[..4].iter().chain(&k8s[12..]).all(|x| x.is_nan()), "unwritten slots stay as they were");

        // Scales must be positive and finite; FP8 without scales means 1.0.
        let bad = s.cpu.upload(HostSlice::F32(&[0.0, 1.0]), &[2], DType::F32).unwrap();
        let r = s.cpu.rotary_and_cache(&RotaryCacheArgs { kv_scales: Some(&bad), ..fp8 });
        assert!(matches!(r, Err(BackendError::Shape { .. })));
        s.cpu.rotary_and_cache(&RotaryCacheArgs { kv_scales: None, ..fp8 }).unwrap();
        assert_eq!(&s.cpu.download_f32(&v8).unwrap()[4..8], &[8.0, 9.0, 10.0, 11.0]);
    }
}
