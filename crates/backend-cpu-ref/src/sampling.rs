//! Sampling on the CPU: every row through [`pagoda_sampler::sample_row`]
//! unchanged, rows in parallel. The CPU has nothing to overlap, so
//! `sample_async` computes the tokens at once and the handle only holds them.

use pagoda_backend::{BackendError, Result, SampledToken, SamplingRow};
use rayon::prelude::*;

use crate::storage::{self, CpuBuffer, CpuTensor};

/// Tokens sampled by the CPU backend's `sample_async`: already computed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuSampled {
    tokens: Vec<SampledToken>,
}

impl CpuSampled {
    /// Rows sampled (one token each).
    pub fn num_rows(&self) -> usize {
        self.tokens.len()
    }

    pub(crate) fn into_tokens(self) -> Vec<SampledToken> {
        self.tokens
    }
}

pub(crate) fn sample_async(logits: &CpuTensor, rows: &[SamplingRow<'_>]) -> Result<CpuSampled> {
    const OP: &str = "sample";
    let (m, vocab) = logits.dims2(OP)?;
    if rows.len() != m {
        return Err(BackendError::shape(OP, format!("{} sampling rows for {m} logit rows", rows.len())));
    }
    if vocab == 0 && m > 0 {
        return Err(BackendError::shape(OP, "empty vocabulary"));
    }
    let tokens = storage::with_operands(OP, &[logits], &[], |ins, _| {
        let all = ins.f32(logits)?;
        Ok(rows
            .par_iter()
            .enumerate()
            .map(|(i, row)| pagoda_sampler::sample_row(&all[i * vocab..(i + 1) * vocab], row))
            .collect())
    })?;
    Ok(CpuSampled { tokens })
}

/// `token_ids[i] = sampled[source_rows[i]].token` where `source_rows[i] >= 0`.
/// Every valid entry is written before an out-of-range row is reported, as a
/// device that records the error and skips the entry leaves them.
pub(crate) fn feed_sampled_tokens(
    sampled: &CpuSampled,
    source_rows: &CpuTensor,
    token_ids: &CpuTensor,
) -> Result<()> {
    const OP: &str = "feed_sampled_tokens";
    pagoda_backend::check_feed_operands(source_rows, token_ids)?;
    // Copied out first, so that no two storage locks are ever held together.
    let rows: Vec<i32> = {
        let buffer = source_rows.storage().read();
        let CpuBuffer::I32(v) = &*buffer else {
            return Err(BackendError::DType { op: OP, dtype: buffer.dtype() });
        };
        v[storage::range_in(OP, source_rows, v.len())?].to_vec()
    };
    let mut buffer = token_ids.storage().write();
    let CpuBuffer::I32(v) = &mut *buffer else {
        return Err(BackendError::DType { op: OP, dtype: buffer.dtype() });
    };
    let range = storage::range_in(OP, token_ids, v.len())?;
    let mut bad = None;
    for (i, (dst, &row)) in v[range].iter_mut().zip(&rows).enumerate() {
        let Ok(row) = usize::try_from(row) else { continue };
        match sampled.tokens.get(row).map(|t| i32::try_from(t.token)) {
            Some(Ok(id)) => *dst = id,
            _ => bad = bad.or(Some((i, row))),
        }
    }
    match bad {
        None => Ok(()),
        Some((i, row)) => Err(BackendError::Index {
            op: OP,
            detail: format!("entry {i}: source row {row} of {} sampled rows", sampled.tokens.len()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use pagoda_backend::{Backend, DType, HostSlice};
    use pagoda_sampler::SamplingParams;

    use crate::CpuBackend;

    use super::*;

    /// Two rows of three logits: greedy picks 1, then 0.
    const LOGITS: [f32; 6] = [0.0, 3.0, 1.0, 5.0, -1.0, 0.0];

    /// Greedy tokens of the first `m` rows of [`LOGITS`].
    fn greedy_sampled(cpu: &CpuBackend, m: usize) -> CpuSampled {
        let t = cpu.upload(HostSlice::F32(&LOGITS[..3 * m]), &[m, 3], DType::F32).unwrap();
        let greedy = SamplingParams::greedy();
        let row = SamplingRow {
            params: &greedy,
            seed: 0,
            step: 0,
            prompt_tokens: &[],
            output_tokens: &[],
            allowed_tokens: None,
        };
        cpu.sample_async(&t, &vec![row; m]).unwrap()
    }

    #[test]
    fn sample_calls_the_reference_per_row() {
        let cpu = CpuBackend::new();
        let t = cpu.upload(HostSlice::F32(&LOGITS), &[2, 3], DType::F32).unwrap();
        let greedy = SamplingParams::greedy();
        let seeded = SamplingParams { temperature: 0.7, logprobs: Some(2), ..Default::default() };
        let rows = [
            SamplingRow {
                params: &greedy,
                seed: 0,
                step: 0,
                prompt_tokens: &[],
                output_tokens: &[],
                allowed_tokens: None,
            },
            SamplingRow {
                params: &seeded,
                seed: 11,
                step: 4,
                prompt_tokens: &[1],
                output_tokens: &[0],
                allowed_tokens: None,
            },
        ];
        let got = cpu.sample(&t, &rows).unwrap();
        assert_eq!(got[0], pagoda_sampler::sample_row(&LOGITS[..3], &rows[0]));
        assert_eq!(got[1], pagoda_sampler::sample_row(&LOGITS[3..], &rows[1]));
        assert_eq!(got[0].token, 1);
        let handle = cpu.sample_async(&t, &rows).unwrap();
        assert_eq!(handle.num_rows(), 2);
        assert_eq!(cpu.finish_sample(handle).unwrap(), got);
        assert!(matches!(cpu.sample(&t, &rows[..1]), Err(BackendError::Shape { .. })));
    }

    #[test]
    fn feed_copies_sampled_ids_and_leaves_negative_rows_alone() {
        let cpu = CpuBackend::new();
        let sampled = greedy_sampled(&cpu, 2);
        let ids = cpu.upload(HostSlice::I32(&[7, 8, 9, 10, 11]), &[5], DType::I32).unwrap();
        let src = cpu.upload(HostSlice::I32(&[1, -1, 0, 1, -5]), &[5], DType::I32).unwrap();
        cpu.feed_sampled_tokens(&sampled, &src, &ids).unwrap();
        assert_eq!(cpu.download(&ids).unwrap().to_f32(), vec![0.0, 8.0, 1.0, 0.0, 11.0]);
        // A view is written in place.
        let tail = ids.narrow(3, 2).unwrap();
        let src2 = cpu.upload(HostSlice::I32(&[0, 0]), &[2], DType::I32).unwrap();
        cpu.feed_sampled_tokens(&sampled, &src2, &tail).unwrap();
        assert_eq!(cpu.download(&ids).unwrap().to_f32(), vec![0.0, 8.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn feed_reports_an_out_of_range_row_and_writes_the_others() {
        let cpu = CpuBackend::new();
        let sampled = greedy_sampled(&cpu, 1);
        let ids = cpu.upload(HostSlice::I32(&[7, 8, 9]), &[3], DType::I32).unwrap();
        let src = cpu.upload(HostSlice::I32(&[0, 1, 0]), &[3], DType::I32).unwrap();
        let err = cpu.feed_sampled_tokens(&sampled, &src, &ids).unwrap_err();
        assert!(matches!(err, BackendError::Index { .. }), "{err}");
        assert_eq!(cpu.download(&ids).unwrap().to_f32(), vec![1.0, 8.0, 1.0]);
    }

    #[test]
    fn feed_checks_dtypes_lengths_and_aliasing() {
        let cpu = CpuBackend::new();
        let sampled = CpuSampled::default();
        let ids = cpu.upload(HostSlice::I32(&[7, 8]), &[2], DType::I32).unwrap();
        let short = cpu.upload(HostSlice::I32(&[-1]), &[1], DType::I32).unwrap();
        let wide = cpu.upload(HostSlice::I64(&[-1, -1]), &[2], DType::I64).unwrap();
        let floats = cpu.upload(HostSlice::F32(&[0.0, 0.0]), &[2], DType::F32).unwrap();
        let feed = |src, dst| cpu.feed_sampled_tokens(&sampled, src, dst);
        assert!(matches!(feed(&short, &ids), Err(BackendError::Shape { .. })));
        assert!(matches!(feed(&wide, &ids), Err(BackendError::DType { .. })));
        assert!(matches!(feed(&ids, &floats), Err(BackendError::DType { .. })));
        assert!(matches!(feed(&ids, &ids), Err(BackendError::Aliasing { .. })));
        // Nothing to feed from an empty sample is fine while every row is negative.
        let none = cpu.upload(HostSlice::I32(&[-1, -1]), &[2], DType::I32).unwrap();
        feed(&none, &ids).unwrap();
        assert_eq!(cpu.download(&ids).unwrap().to_f32(), vec![7.0, 8.0]);
    }
}
