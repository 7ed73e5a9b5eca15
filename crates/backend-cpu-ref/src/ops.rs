//! The row-wise ops of the forward pass: embedding, RMSNorm (plain and with
//! the fused residual add), SiLU-and-mul and row gathers. Each is the formula
//! in the trait's doc comment, one row at a time.

use pagoda_backend::{BackendError, Result};
use rayon::prelude::*;

use crate::storage::{with_operands, CpuTensor};

/// Below this many output elements, splitting rows across threads costs more
/// than it saves (a decode step's rows are a few hundred floats).
const PARALLEL_MIN_ELEMENTS: usize = 1 << 14;

/// Runs `f(row_index, row)` over the rows of `out`, in parallel when large.
pub(crate) fn for_each_row(out: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if cols == 0 {
        return;
    }
    if out.len() >= PARALLEL_MIN_ELEMENTS {
        out.par_chunks_mut(cols).enumerate().for_each(|(r, row)| f(r, row));
    } else {
        out.chunks_mut(cols).enumerate().for_each(|(r, row)| f(r, row));
    }
}

pub(crate) fn embedding(token_ids: &CpuTensor, table: &CpuTensor, out: &CpuTensor) -> Result<()> {
    const OP: &str = "embedding";
    let (vocab, hidden) = table.dims2(OP)?;
    let tokens = token_ids.numel();
    out.expect_rows_cols(OP, "out", tokens, hidden)?;
    with_operands(OP, &[token_ids, table], &[out], |ins, outs| {
        let ids = ins.i32(token_ids)?;
        let table = ins.f32(table)?;
        if let Some((t, &id)) = ids.iter().enumerate().find(|&(_, &id)| id < 0 || id as usize >= vocab) {
            return Err(BackendError::Index {
                op: OP,
                detail: format!("token {t}: id {id} outside the vocabulary of {vocab}"),
            });
        }
        for_each_row(outs[0], hidden, |t, row| {
            let id = ids[t] as usize;
            row.copy_from_slice(&table[id * hidden..(id + 1) * hidden]);
        });
        Ok(())
    })
}

/// `out = x / sqrt(mean(x^2) + eps) * weight`; the mean square in f64.
pub(crate) fn rms_norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_square = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len().max(1) as f64;
    let inv_rms = 1.0 / (mean_square + eps as f64).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = (v as f64 * inv_rms) as f32 * w;
    }
}

fn norm_shapes(op: &'static str, x: &CpuTensor, weight: &CpuTensor, out: &CpuTensor) -> Result<usize> {
    let (_, hidden) = x.rows_cols(op, "x")?;
    weight.expect_dims(op, "weight", &[hidden])?;
    out.expect_dims(op, "out", x.dims())?;
    Ok(hidden)
}

pub(crate) fn rms_norm(x: &CpuTensor, weight: &CpuTensor, eps: f32, out: &CpuTensor) -> Result<()> {
    const OP: &str = "rms_norm";
    let hidden = norm_shapes(OP, x, weight, out)?;
    with_operands(OP, &[x, weight], &[out], |ins, outs| {
        let (xs, w) = (ins.f32(x)?, ins.f32(weight)?);
        for_each_row(outs[0], hidden, |t, row| rms_norm_row(&xs[t * hidden..(t + 1) * hidden], w, eps, row));
        Ok(())
    })
}

pub(crate) fn add_rms_norm(
    x: &CpuTensor,
    residual: &CpuTensor,
    weight: &CpuTensor,
    eps: f32,
    out: &CpuTensor,
) -> Result<()> {
    const OP: &str = "add_rms_norm";
    let hidden = norm_shapes(OP, x, weight, out)?;
    residual.expect_dims(OP, "residual", x.dims())?;
    // `residual` is the one operand both read and written: it is an output here.
    with_operands(OP, &[x, weight], &[residual, out], |ins, outs| {
        let (xs, w) = (ins.f32(x)?, ins.f32(weight)?);
        let [res, out] = outs else {
            return Err(BackendError::Device(format!("{OP}: expected two outputs")));
        };
        if hidden == 0 {
            return Ok(());
        }
        let one_row = |(t, (res_row, out_row)): (usize, (&mut [f32], &mut [f32]))| {
            for (r, &v) in res_row.iter_mut().zip(&xs[t * hidden..(t + 1) * hidden]) {
                *r += v;
            }
            rms_norm_row(res_row, w, eps, out_row);
        };
        if xs.len() >= PARALLEL_MIN_ELEMENTS {
            res.par_chunks_mut(hidden).zip(out.par_chunks_mut(hidden)).enumerate().for_each(one_row);
        } else {
            res.chunks_mut(hidden).zip(out.chunks_mut(hidden)).enumerate().for_each(one_row);
        }
        Ok(())
    })
}

/// `out = silu(gate) * up`, elementwise.
pub(crate) fn silu_and_mul_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

pub(crate) fn silu_and_mul(x: &CpuTensor, out: &CpuTensor) -> Result<()> {
    const OP: &str = "silu_and_mul";
    let (tokens, width) = x.rows_cols(OP, "x")?;
    if width % 2 != 0 {
        return Err(BackendError::shape(OP, format!("x: row of {width} is not [gate | up]")));
    }
    let inter = width / 2;
    out.expect_rows_cols(OP, "out", tokens, inter)?;
    with_operands(OP, &[x], &[out], |ins, outs| {
        let xs = ins.f32(x)?;
        for_each_row(outs[0], inter, |t, row| {
            let (gate, up) = xs[t * width..(t + 1) * width].split_at(inter);
            silu_and_mul_row(gate, up, row);
        });
        Ok(())
    })
}

pub(crate) fn gather_rows(x: &CpuTensor, indices: &CpuTensor, out: &CpuTensor) -> Result<()> {
    const OP: &str = "gather_rows";
    let (rows, width) = x.rows_cols(OP, "x")?;
    out.expect_rows_cols(OP, "out", indices.numel(), width)?;
    with_operands(OP, &[x, indices], &[out], |ins, outs| {
        let (xs, idx) = (ins.f32(x)?, ins.i32(indices)?);
        if let Some((m, &i)) = idx.iter().enumerate().find(|&(_, &i)| i < 0 || i as usize >= rows) {
            return Err(BackendError::Index {
                op: OP,
                detail: format!("index {m} is {i}, x has {rows} rows"),
            });
        }
        for_each_row(outs[0], width, |m, row| {
            let i = idx[m] as usize;
            row.copy_from_slice(&xs[i * width..(i + 1) * width]);
        });
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use pagoda_backend::{Backend, DType, HostSlice};

    use crate::CpuBackend;

    use super::*;

    fn f32s(cpu: &CpuBackend, v: &[f32], dims: &[usize]) -> CpuTensor {
        cpu.upload(HostSlice::F32(v), dims, DType::F32).unwrap()
    }

    #[test]
    fn embedding_copies_rows_and_rejects_out_of_vocab_ids() {
        let cpu = CpuBackend::new();
        let table = f32s(&cpu, &[0.0, 1.0, 10.0, 11.0, 20.0, 21.0], &[3, 2]);
        let ids = cpu.upload(HostSlice::I32(&[2, 0, 2]), &[3], DType::I32).unwrap();
        let out = cpu.alloc(&[3, 2], DType::F32).unwrap();
        cpu.embedding(&ids, &table, &out).unwrap();
        assert_eq!(cpu.download_f32(&out).unwrap(), vec![20.0, 21.0, 0.0, 1.0, 20.0, 21.0]);
        for bad in [3, -1] {
            let ids = cpu.upload(HostSlice::I32(&[0, bad, 1]), &[3], DType::I32).unwrap();
            assert!(matches!(cpu.embedding(&ids, &table, &out), Err(BackendError::Index { .. })));
        }
        let wrong = cpu.alloc(&[3, 3], DType::F32).unwrap();
        assert!(matches!(cpu.embedding(&ids, &table, &wrong), Err(BackendError::Shape { .. })));
        let float_ids = f32s(&cpu, &[0.0, 1.0, 2.0], &[3]);
        assert!(matches!(cpu.embedding(&float_ids, &table, &out), Err(BackendError::DType { .. })));
    }

    #[test]
    fn rms_norm_matches_the_hand_computed_value() {
        let cpu = CpuBackend::new();
        // Row [3, 4]: mean square 12.5, rms sqrt(12.5 + 0.5) = sqrt(13).
        let x = f32s(&cpu, &[3.0, 4.0, 0.0, 0.0], &[2, 2]);
        let w = f32s(&cpu, &[1.0, 2.0], &[2]);
        let out = cpu.alloc(&[2, 2], DType::F32).unwrap();
        cpu.rms_norm(&x, &w, 0.5, &out).unwrap();
        let r = 13f32.sqrt();
        let got = cpu.download_f32(&out).unwrap();
        let want = [3.0 / r, 8.0 / r, 0.0, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        assert!(matches!(cpu.rms_norm(&x, &w, 0.5, &x), Err(BackendError::Aliasing { .. })));
        let bad_w = f32s(&cpu, &[1.0; 3], &[3]);
        assert!(matches!(cpu.rms_norm(&x, &bad_w, 0.5, &out), Err(BackendError::Shape { .. })));
    }

    #[test]
    fn add_rms_norm_updates_the_residual_in_place() {
        let cpu = CpuBackend::new();
        let x = f32s(&cpu, &[1.0, 2.0], &[1, 2]);
        let residual = f32s(&cpu, &[2.0, 2.0], &[1, 2]);
        let w = f32s(&cpu, &[1.0, 1.0], &[2]);
        let out = cpu.alloc(&[1, 2], DType::F32).unwrap();
        cpu.add_rms_norm(&x, &residual, &w, 0.0, &out).unwrap();
        assert_eq!(cpu.download_f32(&residual).unwrap(), vec![3.0, 4.0]);
        let r = 12.5f32.sqrt();
        let got = cpu.download_f32(&out).unwrap();
        assert!((got[0] - 3.0 / r).abs() < 1e-6 && (got[1] - 4.0 / r).abs() < 1e-6);
        assert!(matches!(cpu.add_rms_norm(&x, &x, &w, 0.0, &out), Err(BackendError::Aliasing { .. })));
        assert!(matches!(
            cpu.add_rms_norm(&x, &residual, &w, 0.0, &residual),
            Err(BackendError::Aliasing { .. })
        ));
    }

    #[test]
    fn silu_and_mul_and_gather_rows() {
        let cpu = CpuBackend::new();
        let x = f32s(&cpu, &[0.0, 2.0, 5.0, 3.0], &[1, 4]);
        let out = cpu.alloc(&[1, 2], DType::F32).unwrap();
        cpu.silu_and_mul(&x, &out).unwrap();
        let silu2 = 2.0 / (1.0 + (-2.0f32).exp());
        assert_eq!(cpu.download_f32(&out).unwrap(), vec![0.0, silu2 * 3.0]);
        let odd = f32s(&cpu, &[0.0; 3], &[1, 3]);
        assert!(matches!(cpu.silu_and_mul(&odd, &out), Err(BackendError::Shape { .. })));

        let rows = f32s(&cpu, &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], &[3, 2]);
        let idx = cpu.upload(HostSlice::I32(&[2, 2, 0]), &[3], DType::I32).unwrap();
        let out = cpu.alloc(&[3, 2], DType::F32).unwrap();
        cpu.gather_rows(&rows, &idx, &out).unwrap();
        assert_eq!(cpu.download_f32(&out).unwrap(), vec![4.0, 5.0, 4.0, 5.0, 0.0, 1.0]);
        let idx = cpu.upload(HostSlice::I32(&[3]), &[1], DType::I32).unwrap();
        let out = cpu.alloc(&[1, 2], DType::F32).unwrap();
        assert!(matches!(cpu.gather_rows(&rows, &idx, &out), Err(BackendError::Index { .. })));
    }
}
