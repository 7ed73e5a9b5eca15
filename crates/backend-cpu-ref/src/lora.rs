//! LoRA's two products, each token by its own adapter slot (see
//! [`LoraShrinkArgs`] and [`LoraExpandArgs`] for the formulas):
//! - shrink: `out[t, j] = Σ_k a[slot_t, j, k] · x[t, k]`, zeros for a token
//!   without an adapter;
//! - expand: `out[t, o + n] += Σ_r u[t, i + r] · b[slot_t, n, r]`, the sum
//!   formed in f32 and added to `out` once; rows without an adapter stay.
//!
//! Slots are checked before anything is written: one at or past the slot
//! count is a [`BackendError::Index`] and leaves the output as it was. So are
//! [`LoraGroups`] when given: the reference computes token by token, and
//! checks that the groups a faster backend would read agree with the slots.

use pagoda_backend::{
    check_lora_token_groups, BackendError, DType, LoraExpandArgs, LoraGroups, LoraShrinkArgs, Result, Tensor,
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

pub(crate) fn lora_shrink(args: &LoraShrinkArgs<'_, CpuBackend>) -> Result<()> {
    const OP: &str = "lora_shrink";
    let (_, k, slots, u) = args.check(DType::F32)?;
    with_operands(
        OP,
        &operands(&[args.x, args.a, args.token_slots], &args.groups),
        &[args.out],
        |ins, outs| {
            let (x, a) = (ins.f32(args.x)?, ins.f32(args.a)?);
            let slot = checked_slots(OP, ins, args.token_slots, &args.groups, slots)?;
            for_each_row(outs[0], u, |t, row| {
                let Some(s) = slot[t] else {
                    row.fill(0.0);
                    return;
                };
                let xt = &x[t * k..(t + 1) * k];
                for (j, o) in row.iter_mut().enumerate() {
                    let aj = &a[(s * u + j) * k..(s * u + j + 1) * k];
                    *o = aj.iter().zip(xt).map(|(&w, &v)| w * v).sum();
                }
            });
            Ok(())
        },
    )
}

pub(crate) fn lora_expand(args: &LoraExpandArgs<'_, CpuBackend>) -> Result<()> {
    const OP: &str = "lora_expand";
    let (_, slots, n, r) = args.check(DType::F32)?;
    let (u_cols, o_cols) = (args.u.dim(1), args.out.dim(1));
    let (u_offset, out_offset) = (args.u_offset, args.out_offset);
    with_operands(
        OP,
        &operands(&[args.u, args.b, args.token_slots], &args.groups),
        &[args.out],
        |ins, outs| {
            let (u, b) = (ins.f32(args.u)?, ins.f32(args.b)?);
            let slot = checked_slots(OP, ins, args.token_slots, &args.groups, slots)?;
            for_each_row(outs[0], o_cols, |t, row| {
                let Some(s) = slot[t] else { return };
                let ut = &u[t * u_cols + u_offset..][..r];
                // b[s] is Bᵀ: R rows of N; column j of the output reads column j.
                let bs = &b[s * r * n..(s + 1) * r * n];
                for (j, o) in row[out_offset..out_offset + n].iter_mut().enumerate() {
                    let sum: f32 = ut.iter().enumerate().map(|(i, &v)| v * bs[i * n + j]).sum();
                    *o += sum;
                }
            });
            Ok(())
        },
    )
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // index loops, as the formulas read
mod tests {
    use pagoda_backend::{
        lora_group_capacity, lora_token_groups, Backend, BackendError, DType, HostSlice, LoraExpandArgs,
        LoraGroups, LoraShrinkArgs, Tensor,
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

    /// The shrink of every part at once, then each part's expand into its
    /// columns, against naive f64 loops; slots mixed with -1.
    #[test]
    fn shrink_and_expand_match_naive_loops() {
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
            let u_cols = parts * r;
            let o_cols = lead + parts * n + 3;
            let x = g.values(t * k, 1.0);
            let a = g.values(s * u_cols * k, 0.2);
            let slots = g.slots(t, s);
            let slots_t = ints(&cpu, &slots);
            let shrunk = cpu.alloc(&[t, u_cols], DType::F32).unwrap();
            cpu.fill(&shrunk, f32::NAN).unwrap();
            let args = LoraShrinkArgs {
                x: &up(&cpu, &x, &[t, k]),
                a: &up(&cpu, &a, &[s, u_cols, k]),
                token_slots: &slots_t,
                out: &shrunk,
                groups: None,
            };
            cpu.lora_shrink(&args).unwrap();
            let got_u = cpu.download_f32(&shrunk).unwrap();
            let mut want_u = vec![0.0f64; t * u_cols];
            for tok in 0..t {
                if slots[tok] < 0 {
                    continue;
                }
                let sl = slots[tok] as usize;
                for j in 0..u_cols {
                    for i in 0..k {
                        want_u[tok * u_cols + j] +=
                            a[(sl * u_cols + j) * k + i] as f64 * x[tok * k + i] as f64;
                    }
                }
            }
            let what = format!("T{t} K{k} N{n} r{r} parts{parts}");
            assert_close(&format!("{what}: shrink"), &want_u, &got_u);

            let base = g.values(t * o_cols, 1.0);
            let out = up(&cpu, &base, &[t, o_cols]);
            let mut want: Vec<f64> = base.iter().map(|&v| v as f64).collect();
            for p in 0..parts {
                let b = g.values(s * n * r, 0.3);
                let args = LoraExpandArgs {
                    u: &shrunk,
                    u_offset: p * r,
                    b: &up(&cpu, &b, &[s, r, n]),
                    token_slots: &slots_t,
                    out: &out,
                    out_offset: lead + p * n,
                    groups: None,
                };
                cpu.lora_expand(&args).unwrap();
                for tok in 0..t {
                    if slots[tok] < 0 {
                        continue;
                    }
                    let sl = slots[tok] as usize;
                    for col in 0..n {
                        let mut sum = 0.0f64;
                        for i in 0..r {
                            sum += got_u[tok * u_cols + p * r + i] as f64 * b[(sl * r + i) * n + col] as f64;
                        }
                        want[tok * o_cols + lead + p * n + col] += sum;
                    }
                }
            }
            let got = cpu.download_f32(&out).unwrap();
            assert_close(&format!("{what}: expand"), &want, &got);
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
        let (t, k, u, s) = (40, 16, 8, 3);
        let x = up(&cpu, &g.values(t * k, 1.0), &[t, k]);
        let a = up(&cpu, &g.values(s * u * k, 0.3), &[s, u, k]);
        let slots = g.slots(t, s);
        let slots_t = ints(&cpu, &slots);
        let plain = cpu.alloc(&[t, u], DType::F32).unwrap();
        cpu.lora_shrink(&LoraShrinkArgs { x: &x, a: &a, token_slots: &slots_t, out: &plain, groups: None })
            .unwrap();
        let (order, groups) = lora_token_groups(&slots, Some(lora_group_capacity(t, s)));
        let order_t = ints(&cpu, &order);
        let grouped_out = cpu.alloc(&[t, u], DType::F32).unwrap();
        let shrink = |groups: &[i32], out: &T| {
            let groups_t = cpu.upload(HostSlice::I32(groups), &[groups.len() / 3, 3], DType::I32).unwrap();
            let groups = Some(LoraGroups { order: &order_t, groups: &groups_t });
            cpu.lora_shrink(&LoraShrinkArgs { x: &x, a: &a, token_slots: &slots_t, out, groups })
        };
        shrink(&groups, &grouped_out).unwrap();
        assert_eq!(cpu.download_f32(&plain).unwrap(), cpu.download_f32(&grouped_out).unwrap());
        let mut wrong = groups.clone();
        wrong[0] = wrong[0].max(0) + 1; // the first group's slot
        let untouched = up(&cpu, &vec![5.0; t * u], &[t, u]);
        assert!(matches!(shrink(&wrong, &untouched), Err(BackendError::Index { .. })));
        assert_eq!(cpu.download_f32(&untouched).unwrap(), vec![5.0; t * u]);
    }

    /// The expand forms the sum over r, then adds it to out once: with out at
    /// 1 and the terms 2^-24 each, adding term by term would round every
    /// addition back to 1.
    #[test]
    fn expand_adds_the_whole_sum_once() {
        let cpu = CpuBackend::new();
        let r = 4;
        let u = up(&cpu, &[1.0; 4], &[1, r]);
        let b = up(&cpu, &[2f32.powi(-24); 4], &[1, r, 1]);
        let out = up(&cpu, &[1.0], &[1, 1]);
        let slots = ints(&cpu, &[0]);
        let args = LoraExpandArgs {
            u: &u,
            u_offset: 0,
            b: &b,
            token_slots: &slots,
            out: &out,
            out_offset: 0,
            groups: None,
        };
        cpu.lora_expand(&args).unwrap();
        assert_eq!(cpu.download_f32(&out).unwrap(), vec![1.0 + 2f32.powi(-22)]);
    }

    #[test]
    fn slots_past_the_count_are_index_errors_and_write_nothing() {
        let cpu = CpuBackend::new();
        let (t, k, u, s) = (3, 8, 4, 2);
        let x = up(&cpu, &[1.0; 24], &[t, k]);
        let a = up(&cpu, &[1.0; 64], &[s, u, k]);
        let out = up(&cpu, &[5.0; 12], &[t, u]);
        let slots = ints(&cpu, &[0, -1, 2]);
        let args = LoraShrinkArgs { x: &x, a: &a, token_slots: &slots, out: &out, groups: None };
        assert!(matches!(cpu.lora_shrink(&args), Err(BackendError::Index { .. })));
        assert_eq!(cpu.download_f32(&out).unwrap(), vec![5.0; 12]);

        let b = up(&cpu, &[1.0; 16], &[s, u, 2]);
        let dst = up(&cpu, &[5.0; 6], &[t, 2]);
        let args = LoraExpandArgs {
            u: &out,
            u_offset: 0,
            b: &b,
            token_slots: &slots,
            out: &dst,
            out_offset: 0,
            groups: None,
        };
        assert!(matches!(cpu.lora_expand(&args), Err(BackendError::Index { .. })));
        assert_eq!(cpu.download_f32(&dst).unwrap(), vec![5.0; 6]);
        // The same calls with valid slots go through.
        let ok = ints(&cpu, &[1, -1, 0]);
        cpu.lora_shrink(&LoraShrinkArgs { x: &x, a: &a, token_slots: &ok, out: &out, groups: None }).unwrap();
        assert_eq!(cpu.download_f32(&out).unwrap(), [[8.0; 4], [0.0; 4], [8.0; 4]].concat());
        cpu.lora_expand(&LoraExpandArgs {
            u: &out,
            u_offset: 0,
            b: &b,
            token_slots: &ok,
            out: &dst,
            out_offset: 0,
            groups: None,
        })
        .unwrap();
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
        let (x, a, out) = (z(&[2, 8]), z(&[3, 4, 8]), z(&[2, 4]));
        let shrink = |x: &T, a: &T, slots: &T, out: &T| {
            cpu.lora_shrink(&LoraShrinkArgs { x, a, token_slots: slots, out, groups: None })
        };
        let is_shape = |r: pagoda_backend::Result<()>| matches!(r, Err(BackendError::Shape { .. }));
        shrink(&x, &a, &slots, &out).unwrap();
        assert!(is_shape(shrink(&x, &z(&[3, 4, 9]), &slots, &out)), "a's K");
        assert!(is_shape(shrink(&x, &z(&[4, 8]), &slots, &out)), "a of rank 2");
        assert!(is_shape(shrink(&x, &a, &slots, &z(&[2, 5]))), "out's U");
        assert!(is_shape(shrink(&x, &a, &slots, &z(&[3, 4]))), "out's T");
        assert!(is_shape(shrink(&x, &a, &ints(&cpu, &[0, 0, 0]), &out)), "slots' T");
        let float_slots = z(&[2]);
        assert!(matches!(shrink(&x, &a, &float_slots, &out), Err(BackendError::DType { .. })));
        let wide = z(&[2, 12]);
        let x_view = wide.reshape(&[3, 8]).unwrap().narrow(0, 2).unwrap();
        let out_view = wide.reshape(&[6, 4]).unwrap().narrow(4, 2).unwrap();
        assert!(matches!(shrink(&x_view, &a, &slots, &out_view), Err(BackendError::Aliasing { .. })));

        let (u, b, dst) = (z(&[2, 8]), z(&[3, 4, 5]), z(&[2, 12]));
        let expand = |u: &T, u_offset, b: &T, out: &T, out_offset| {
            cpu.lora_expand(&LoraExpandArgs {
                u,
                u_offset,
                b,
                token_slots: &slots,
                out,
                out_offset,
                groups: None,
            })
        };
        expand(&u, 4, &b, &dst, 7).unwrap();
        assert!(is_shape(expand(&u, 5, &b, &dst, 0)), "u_offset + R past U");
        assert!(is_shape(expand(&u, 0, &b, &dst, 8)), "out_offset + N past O");
        assert!(is_shape(expand(&u, 0, &b, &z(&[3, 12]), 0)), "out's T");
        assert!(is_shape(expand(&u, 0, &z(&[5, 4]), &dst, 0)), "b of rank 2");
        assert!(is_shape(expand(&u, 0, &b, &z(&[2, 3, 4]), 0)), "out of rank 3");
        assert!(matches!(expand(&u, 0, &b, &u, 0), Err(BackendError::Aliasing { .. })));
    }
}
