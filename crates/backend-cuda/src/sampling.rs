//! Host side of on-device sampling: packs each row's parameters and token
//! history for the kernels, runs them, and reads back only the chosen ids and
//! logprobs (`PagodaSampleOut` records), never the logits.

use std::collections::HashMap;

use pagoda_backend::{Backend, BackendError, Result, SampledToken, SamplingRow, Tensor};
use pagoda_sampler::TokenId;

use crate::backend::{dtype_to_code, tensor_ptr, CudaBackend};
use crate::ffi::{self, check};

const OP: &str = "sample";

/// Penalty inputs of one row: each distinct token of prompt + output once,
/// with its number of occurrences in the output.
fn penalty_entries(row: &SamplingRow<'_>, tokens: &mut Vec<i32>, counts: &mut Vec<i32>) {
    let mut seen: HashMap<TokenId, i32> = HashMap::new();
    let mut order = Vec::new();
    for &t in row.prompt_tokens {
        seen.entry(t).or_insert_with(|| {
            order.push(t);
            0
        });
    }
    for &t in row.output_tokens {
        *seen.entry(t).or_insert_with(|| {
            order.push(t);
            0
        }) += 1;
    }
    for t in order {
        // Ids past i32::MAX cannot index a vocabulary; -1 makes the kernel skip them.
        tokens.push(i32::try_from(t).unwrap_or(-1));
        counts.push(seen[&t]);
    }
}

pub(crate) fn sample(
    backend: &CudaBackend,
    logits: &Tensor<CudaBackend>,
    rows: &[SamplingRow<'_>],
) -> Result<Vec<SampledToken>> {
    let (m, vocab) = logits.dims2(OP)?;
    if rows.len() != m {
        return Err(BackendError::shape(OP, format!("{} sampling rows for {m} logit rows", rows.len())));
    }
    if !logits.dtype().is_float() {
        return Err(BackendError::DType { op: OP, dtype: logits.dtype() });
    }
    if m == 0 {
        return Ok(Vec::new());
    }
    if vocab == 0 || vocab > i32::MAX as usize {
        return Err(BackendError::shape(OP, format!("vocabulary of {vocab}")));
    }

    let mut packed = Vec::with_capacity(m);
    let (mut tokens, mut counts) = (Vec::new(), Vec::new());
    let mut num_draw = 0i32;
    for row in rows {
        let p = row.params;
        let start = tokens.len() as i32;
        if p.has_penalties() {
            penalty_entries(row, &mut tokens, &mut counts);
        }
        let draw_index = if p.is_greedy() {
            -1
        } else {
            num_draw += 1;
            num_draw - 1
        };
        packed.push(ffi::PagodaSampleRow {
            temperature: p.temperature,
            top_k: i32::try_from(p.top_k).unwrap_or(i32::MAX),
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            num_logprobs: p.logprobs.map_or(0, |n| n.min(ffi::PAGODA_MAX_TOP_LOGPROBS) as i32),
            seed: row.seed,
            step: row.step,
            draw_index,
            penalty_start: start,
            penalty_end: tokens.len() as i32,
            reserved: 0,
        });
    }
    if (num_draw as usize) * vocab > i32::MAX as usize {
        return Err(BackendError::shape(OP, format!("{num_draw} drawing rows of {vocab} exceed the sorter")));
    }
    // Keep the device arrays non-empty so their pointers are valid.
    tokens.push(-1);
    counts.push(0);

    backend.bind_context()?;
    // One upload (rows, penalty tokens, penalty counts) and one scratch buffer
    // (outputs, workspace): every copy is a separate operation on the stream
    // that the decode step waits behind.
    let mut inputs = Vec::new();
    let rows_at = push_aligned(&mut inputs, bytemuck::cast_slice::<ffi::PagodaSampleRow, u8>(&packed));
    let tokens_at = push_aligned(&mut inputs, bytemuck::cast_slice(&tokens));
    let counts_at = push_aligned(&mut inputs, bytemuck::cast_slice(&counts));
    let inputs_dev = backend.upload_bytes(&inputs)?;
    let out_bytes = m * std::mem::size_of::<ffi::PagodaSampleOut>();
    let mut workspace_bytes = 0usize;
    // SAFETY: a pure size computation.
    check("pagoda_sample_workspace_bytes", unsafe {
        ffi::pagoda_sample_workspace_bytes(m as i32, num_draw, vocab as i32, &mut workspace_bytes)
    })?;
    let workspace_at = out_bytes.next_multiple_of(SCRATCH_ALIGN);
    let scratch = backend.scratch_bytes(workspace_at + workspace_bytes)?;
    let args = ffi::PagodaSampleArgs {
        logits: tensor_ptr(logits) as *const std::ffi::c_void,
        rows: (inputs_dev.ptr() + rows_at) as *const ffi::PagodaSampleRow,
        penalty_tokens: (inputs_dev.ptr() + tokens_at) as *const i32,
        penalty_counts: (inputs_dev.ptr() + counts_at) as *const i32,
        out: scratch.ptr() as *mut ffi::PagodaSampleOut,
        workspace: (scratch.ptr() + workspace_at as u64) as *mut std::ffi::c_void,
        workspace_bytes,
        logits_dtype: dtype_to_code(logits.dtype()),
        num_rows: m as i32,
        num_draw_rows: num_draw,
        vocab: vocab as i32,
        greedy_only: packed
            .iter()
            .all(|r| r.draw_index < 0 && r.penalty_start == r.penalty_end && r.num_logprobs == 0)
            as i32,
    };
    // SAFETY: every device buffer above is sized for these arguments and lives past the launch.
    check("pagoda_sample", unsafe { ffi::pagoda_sample(&args, backend.raw_stream()) })?;

    let mut raw = vec![0u8; out_bytes];
    backend.download_bytes(&mut raw, scratch.ptr())?;
    let outs: Vec<ffi::PagodaSampleOut> = bytemuck::pod_collect_to_vec(&raw);
    Ok(outs
        .iter()
        .zip(&packed)
        .map(|(o, r)| SampledToken {
            token: o.token as TokenId,
            logprob: o.logprob,
            top_logprobs: (0..r.num_logprobs.min(vocab as i32) as usize)
                .map(|k| (o.top_ids[k] as TokenId, o.top_logprobs[k]))
                .collect(),
        })
        .collect())
}

/// Alignment of each array inside the packed upload and of the workspace in
/// the scratch buffer (the device allocator's pointers are at least this aligned).
const SCRATCH_ALIGN: usize = 256;

/// Appends `bytes` at the next aligned offset of `buf`; returns that offset.
fn push_aligned(buf: &mut Vec<u8>, bytes: &[u8]) -> u64 {
    let at = buf.len().next_multiple_of(SCRATCH_ALIGN);
    buf.resize(at, 0);
    buf.extend_from_slice(bytes);
    at as u64
}

// The kernels read these records directly: their layout must be plain data.
// SAFETY: bindgen structs of integers and floats with no padding-sensitive invariants.
unsafe impl bytemuck::Zeroable for ffi::PagodaSampleRow {}
unsafe impl bytemuck::Pod for ffi::PagodaSampleRow {}
unsafe impl bytemuck::Zeroable for ffi::PagodaSampleOut {}
unsafe impl bytemuck::Pod for ffi::PagodaSampleOut {}

// The backend trait object is used through the generic API only.
const _: fn() = || {
    fn assert_backend<B: Backend>() {}
    assert_backend::<CudaBackend>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use pagoda_backend::SamplingParams;

    #[test]
    fn penalty_entries_list_each_token_once_with_output_counts() {
        let params = SamplingParams { repetition_penalty: 1.2, ..SamplingParams::default() };
        let row = SamplingRow {
            params: &params,
            seed: 0,
            step: 0,
            prompt_tokens: &[5, 3, 5],
            output_tokens: &[3, 9, 9],
        };
        let (mut t, mut c) = (Vec::new(), Vec::new());
        penalty_entries(&row, &mut t, &mut c);
        assert_eq!(t, vec![5, 3, 9]);
        assert_eq!(c, vec![0, 1, 2]);
    }
}
