//! LoRA's products, each token by its own adapter slot (see [`LoraArgs`] for
//! the formula): per part `p`, `u = a[p, slot_t] · x[t]` in f32, then
//! `out[t, o_p + n] += Σ_r u[r] · b_p[slot_t, r, n]`, the sum formed in f32 and
//! added to `out` once; rows without an adapter stay, and so do the columns
//! outside the parts. The reference keeps `u` in f32 (a backend may round it).
//!
//! Slots are checked before anything is written: one at or past the slot
//! count is a [`BackendError::Index`] and leaves the output as it was. So are
//! [`LoraGroups`] when given: the reference computes token by token, and
//! checks that the groups a faster backend would read agree with the slots.

use pagoda_backend::{
    check_lora_token_groups, BackendError, DType, LoraArgs, LoraGroups, LoraShape, Result, Tensor,
};

use crate::ops::for_each_row;
use crate::storage::{with_operands, Inputs};
use crate::CpuBackend;

/// Each token's slot as an index, `None` for no adapter; an error names the
/// first token whose slot is `>= slots`.
fn slot_indices(op: &'static str, token_slots: &[i32], slots: usize) -> Result<Vec<Option<usize>>> {
    token_slots
        .iter()
        .enumerate()
        .map(|(t, &s)| match usize::try_from(s) {
            Err(_) => Ok(None),
            Ok(s) if s < slots => Ok(Some(s)),
            Ok(s) => Err(BackendError::Index { op, detail: format!("token {t}: slot {s} of {slots}") }),
        })
        .collect()
}

/// The operands to read: `fixed`, then the groups' order and triples if given.
fn operands<'a>(
    fixed: &[&'a Tensor<CpuBackend>],
    groups: &Option<LoraGroups<'a, CpuBackend>>,
) -> Vec<&'a Tensor<CpuBackend>> {
    let mut all = fixed.to_vec();
    if let Some(g) = groups {
        all.extend([g.order, g.groups]);
    }
    all
}

/// Each token's slot index (see [`slot_indices`]), after checking the
/// groups, if given, against the slots.
fn checked_slots(
    op: &'static str,
    ins: &Inputs<'_>,
    token_slots: &Tensor<CpuBackend>,
    groups: &Option<LoraGroups<'_, CpuBackend>>,
    slots: usize,
) -> Result<Vec<Option<usize>>> {
    let token_slots = ins.i32(token_slots)?;
    let slot = slot_indices(op, token_slots, slots)?;
    if let Some(g) = groups {
        check_lora_token_groups(op, token_slots, ins.i32(g.order)?, ins.i32(g.groups)?)?;
    }
    Ok(slot)
}

pub(crate) fn lora_apply(args: &LoraArgs<'_, CpuBackend>) -> Result<()> {
    const OP: &str = "lora_apply";
    let LoraShape { k, slots, rank: r, out_cols, .. } = args.check(DType::F32)?;
    let mut fixed = vec![args.x, args.a, args.token_slots];
    fixed.extend(args.parts.iter().map(|part| part.b));
    with_operands(OP, &operands(&fixed, &args.groups), &[args.out], |ins, outs| {
        let (x, a) = (ins.f32(args.x)?, ins.f32(args.a)?);
        let b: Vec<&[f32]> = args.parts.iter().map(|part| ins.f32(part.b)).collect::<Result<_>>()?;
        let slot = checked_slots(OP, ins, args.token_slots, &args.groups, slots)?;
        for_each_row(outs[0], out_cols, |t, row| {
            let Some(s) = slot[t] else { return };
            let xt = &x[t * k..(t + 1) * k];
            for (p, part) in args.parts.iter().enumerate() {
                let n = part.b.dim(2);
                // The shrink: a's rows (p, s, 0..R).
                let u: Vec<f32> = (0..r)
                    .map(|i| {
                        let row = &a[((p * slots + s) * r + i) * k..][..k];
                        row.iter().zip(xt).map(|(&w, &v)| w * v).sum()
                    })
                    .collect();
                // b[s] is Bᵀ: R rows of N; column j of the output reads column j.
                let bs = &b[p][s * r * n..(s + 1) * r * n];
                for (j, o) in row[part.out_offset..part.out_offset + n].iter_mut().enumerate() {
                    let sum: f32 = u.iter().enumerate().map(|(i, &v)| v * bs[i * n + j]).sum();
                    *o += sum;
                }
            }
        });
        Ok(())
    })
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // index loops, as the formulas read
mod tests {
    use pagoda_backend::{
        lora_group_capacity, lora_token_groups, Backend, BackendError, DType, HostSlice, LoraArgs,
        LoraGroups, LoraPart, Tensor,
    };

    use crate::CpuBackend;

    type T = Tensor<CpuBackend>;

    /// SplitMix64: values in [-1, 1) and indices.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn values(&mut self, len: usize, scale: f32) -> Vec<f32> {
            (0..len).map(|_| ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale).collect()
        }
        /// Slots in -1..slots, every value present when there are enough tokens.
        fn slots(&mut self, tokens: usize, slots: usize) -> Vec<i32> {
            (0..tokens)
                .map(|t| {
                    if t <= slots {
                        t as i32 - 1
                    } else {
                        (self.next_u64() % (slots as u64 + 1)) as i32 - 1
                    }
                })
                .collect()
        }
    }

    fn up(cpu: &CpuBackend, v: &[f32], dims: &[usize]) -> T {
        cpu.upload(HostSlice::F32(v), dims, DType::F32).unwrap()
    }

    fn ints(cpu: &CpuBackend, v: &[i32]) -> T {
        cpu.upload(HostSlice::I32(v), &[v.len()], DType::I32).unwrap()
    }

    /// Relative error of `got` against the f64 `want`, elementwise with an
    /// absolute floor: f32 sums of up to 4096 terms of order 1 stay far inside 1e-5.
    fn assert_close(what: &str, want: &[f64], got: &[f32]) {
        assert_eq!(want.len(), got.len(), "{what}: lengths");
        for (i, (&w, &g)) in want.iter().zip(got).enumerate() {
            assert!((g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what}: element {i}: {g} vs {w}");
        }
    }

    /// Every part's shrink and expand, against naive f64 loops; slots mixed
    /// with -1, the parts' B given as views of one tensor.
    #[test]
    fn apply_matches_naive_loops() {
        let cpu = CpuBackend::new();
        let mut g = Rng(7);
        // (tokens, K, N per part, rank, parts, slots, columns of out before the first part)
        for (t, k, n, r, parts, s, lead) in [
            (1, 64, 32, 8, 1, 1, 0),
            (5, 96, 40, 16, 3, 3, 5),
            (9, 130, 17, 64, 2, 4, 1),
            (20, 256, 64, 32, 3, 6, 0),
            (3, 33, 9, 24, 1, 2, 2),
        ] {
            let o_cols = lead + parts * n + 3;
            let x = g.values(t * k, 1.0);
            let a = g.values(parts * s * r * k, 0.2);
            let b = g.values(parts * s * r * n, 0.3);
            let slots = g.slots(t, s);
            let slots_t = ints(&cpu, &slots);
            let b_t = up(&cpu, &b, &[parts * s, r, n]);
            let b_parts: Vec<T> =
                (0..parts).map(|p| b_t.narrow(p * s, s).unwrap().reshape(&[s, r, n]).unwrap()).collect();
            let part_args: Vec<LoraPart<'_, CpuBackend>> =
                b_parts.iter().enumerate().map(|(p, b)| LoraPart { b, out_offset: lead + p * n }).collect();
            let base = g.values(t * o_cols, 1.0);
            let out = up(&cpu, &base, &[t, o_cols]);
            let args = LoraArgs {
                x: &up(&cpu, &x, &[t, k]),
                a: &up(&cpu, &a, &[parts, s, r, k]),
                parts: &part_args,
                token_slots: &slots_t,
                out: &out,
                groups: None,
            };
            cpu.lora_apply(&args).unwrap();
            let mut want: Vec<f64> = base.iter().map(|&v| v as f64).collect();
            for tok in 0..t {
                if slots[tok] < 0 {
                    continue;
                }
                let sl = slots[tok] as usize;
                for p in 0..parts {
                    let mut u = vec![0.0f64; r];
                    for (i, ui) in u.iter_mut().enumerate() {
                        for kk in 0..k {
                            *ui += a[((p * s + sl) * r + i) * k + kk] as f64 * x[tok * k + kk] as f64;
                        }
                    }
                    for col in 0..n {
                        let mut sum = 0.0f64;
                        for i in 0..r {
                            sum += u[i] * b[((p * s + sl) * r + i) * n + col] as f64;
                        }
                        want[tok * o_cols + lead + p * n + col] += sum;
                    }
                }
            }
            let what = format!("T{t} K{k} N{n} r{r} parts{parts}");
            let got = cpu.download_f32(&out).unwrap();
            assert_close(&what, &want, &got);
            // Rows without an adapter, and the columns around the parts, are untouched bit for bit.
            for tok in 0..t {
                for col in 0..o_cols {
                    if slots[tok] < 0 || col < lead || col >= lead + parts * n {
                        let i = tok * o_cols + col;
                        assert_eq!(got[i].to_bits(), base[i].to_bits(), "{what}: token {tok} column {col}");
                    }
                }
            }
        }
    }

    /// Groups change nothing in the reference's products, and groups that
    /// disagree with the slots are refused before anything is written.
    #[test]
    fn groups_are_checked_against_the_slots() {
        let cpu = CpuBackend::new();
        let mut g = Rng(11);
        let (t, k, r, n, s) = (40, 16, 8, 6, 3);
        let x = up(&cpu, &g.values(t * k, 1.0), &[t, k]);
        let a = up(&cpu, &g.values(s * r * k, 0.3), &[1, s, r, k]);
        let b = up(&cpu, &g.values(s * r * n, 0.3), &[s, r, n]);
        let parts = [LoraPart { b: &b, out_offset: 0 }];
        let slots = g.slots(t, s);
        let slots_t = ints(&cpu, &slots);
        let plain = up(&cpu, &vec![1.0; t * n], &[t, n]);
        let args = LoraArgs { x: &x, a: &a, parts: &parts, token_slots: &slots_t, out: &plain, groups: None };
        cpu.lora_apply(&args).unwrap();
        let (order, groups) = lora_token_groups(&slots, Some(lora_group_capacity(t, s)));
        let order_t = ints(&cpu, &order);
        let grouped_out = up(&cpu, &vec![1.0; t * n], &[t, n]);
        let apply = |groups: &[i32], out: &T| {
            let groups_t = cpu.upload(HostSlice::I32(groups), &[groups.len() / 3, 3], DType::I32).unwrap();
            let groups = Some(LoraGroups { order: &order_t, groups: &groups_t });
            cpu.lora_apply(&LoraArgs { x: &x, a: &a, parts: &parts, token_slots: &slots_t, out, groups })
        };
        apply(&groups, &grouped_out).unwrap();
        assert_eq!(cpu.download_f32(&plain).unwrap(), cpu.download_f32(&grouped_out).unwrap());
        let mut wrong = groups.clone();
        wrong[0] = wrong[0].max(0) + 1; // the first group's slot
        let untouched = up(&cpu, &vec![5.0; t * n], &[t, n]);
        assert!(matches!(apply(&wrong, &untouched), Err(BackendError::Index { .. })));
        assert_eq!(cpu.download_f32(&untouched).unwrap(), vec![5.0; t * n]);
    }

    /// The expand forms the sum over r, then adds it to out once: with out at
    /// 1 and the terms 2^-24 each, adding term by term would round every
    /// addition back to 1.
    #[test]
    fn expand_adds_the_whole_sum_once() {
        let cpu = CpuBackend::new();
        let r = 4;
        let x = up(&cpu, &[1.0], &[1, 1]);
        let a = up(&cpu, &[1.0; 4], &[1, 1, r, 1]);
        let b = up(&cpu, &[2f32.powi(-24); 4], &[1, r, 1]);
        let out = up(&cpu, &[1.0], &[1, 1]);
        let slots = ints(&cpu, &[0]);
        let parts = [LoraPart { b: &b, out_offset: 0 }];
        let args = LoraArgs { x: &x, a: &a, parts: &parts, token_slots: &slots, out: &out, groups: None };
        cpu.lora_apply(&args).unwrap();
        assert_eq!(cpu.download_f32(&out).unwrap(), vec![1.0 + 2f32.powi(-22)]);
    }

    #[test]
    fn slots_past_the_count_are_index_errors_and_write_nothing() {
        let cpu = CpuBackend::new();
        let (t, k, r, s) = (3, 8, 4, 2);
        let x = up(&cpu, &[1.0; 24], &[t, k]);
        let a = up(&cpu, &[1.0; 64], &[1, s, r, k]);
        let b = up(&cpu, &[1.0; 16], &[s, r, 2]);
        let parts = [LoraPart { b: &b, out_offset: 0 }];
        let dst = up(&cpu, &[5.0; 6], &[t, 2]);
        let slots = ints(&cpu, &[0, -1, 2]);
        let args = LoraArgs { x: &x, a: &a, parts: &parts, token_slots: &slots, out: &dst, groups: None };
        assert!(matches!(cpu.lora_apply(&args), Err(BackendError::Index { .. })));
        assert_eq!(cpu.download_f32(&dst).unwrap(), vec![5.0; 6]);
        // The same call with valid slots goes through: u = 8 per rank row, 4 rows.
        let ok = ints(&cpu, &[1, -1, 0]);
        cpu.lora_apply(&LoraArgs { token_slots: &ok, ..args }).unwrap();
        assert_eq!(cpu.download_f32(&dst).unwrap(), vec![37.0, 37.0, 5.0, 5.0, 37.0, 37.0]);
    }

    #[test]
    fn bad_shapes_dtypes_and_aliasing_are_refused() {
        let cpu = CpuBackend::new();
        let z = |dims: &[usize]| {
            let t = cpu.alloc(dims, DType::F32).unwrap();
            cpu.fill(&t, 0.0).unwrap();
            t
        };
        let slots = ints(&cpu, &[0, 0]);
        let (x, a, b, out) = (z(&[2, 8]), z(&[2, 3, 4, 8]), z(&[3, 4, 5]), z(&[2, 12]));
        let apply = |x: &T, a: &T, parts: &[(&T, usize)], slots: &T, out: &T| {
            let parts: Vec<LoraPart<'_, CpuBackend>> =
                parts.iter().map(|&(b, out_offset)| LoraPart { b, out_offset }).collect();
            cpu.lora_apply(&LoraArgs { x, a, parts: &parts, token_slots: slots, out, groups: None })
        };
        let is_shape = |r: pagoda_backend::Result<()>| matches!(r, Err(BackendError::Shape { .. }));
        apply(&x, &a, &[(&b, 0), (&b, 7)], &slots, &out).unwrap();
        assert!(is_shape(apply(&x, &z(&[2, 3, 4, 9]), &[(&b, 0), (&b, 7)], &slots, &out)), "a's K");
        assert!(is_shape(apply(&x, &z(&[6, 4, 8]), &[(&b, 0), (&b, 7)], &slots, &out)), "a of rank 3");
        assert!(is_shape(apply(&x, &a, &[(&b, 0)], &slots, &out)), "fewer parts than a's");
        assert!(is_shape(apply(&x, &a, &[(&b, 0), (&b, 4)], &slots, &out)), "overlapping parts");
        assert!(is_shape(apply(&x, &a, &[(&b, 0), (&b, 8)], &slots, &out)), "out_offset + N past O");
        assert!(is_shape(apply(&x, &a, &[(&b, 0), (&z(&[3, 5, 5]), 7)], &slots, &out)), "b's R");
        assert!(is_shape(apply(&x, &a, &[(&b, 0), (&z(&[2, 4, 5]), 7)], &slots, &out)), "b's S");
        assert!(is_shape(apply(&x, &a, &[(&b, 0), (&b, 7)], &slots, &z(&[3, 12]))), "out's T");
        assert!(is_shape(apply(&x, &a, &[(&b, 0), (&b, 7)], &ints(&cpu, &[0, 0, 0]), &out)), "slots' T");
        let float_slots = z(&[2]);
        assert!(matches!(
            apply(&x, &a, &[(&b, 0), (&b, 7)], &float_slots, &out),
            Err(BackendError::DType { .. })
        ));
        assert!(matches!(apply(&x, &a, &[(&b, 0), (&b, 7)], &slots, &b), Err(BackendError::Shape { .. })));
        let wide = z(&[2, 20]);
        let x_view = wide.reshape(&[5, 8]).unwrap().narrow(0, 2).unwrap();
        let out_view = wide.reshape(&[20, 2]).unwrap().narrow(10, 2).unwrap().reshape(&[2, 2]).unwrap();
        let b1 = z(&[3, 4, 2]);
        let a1 = z(&[1, 3, 4, 8]);
        assert!(matches!(
            apply(&x_view, &a1, &[(&b1, 0)], &slots, &out_view),
            Err(BackendError::Aliasing { .. })
        ));
    }
}
