//! Host side of on-device sampling: packs each row's parameters and token
//! history for the kernels, runs them, and reads back only the chosen ids and
//! logprobs (`PagodaSampleOut` records), never the logits. Sampling is
//! asynchronous ([`CudaSampled`]): the records stay on the device, where
//! `feed_sampled_tokens` copies ids into the next step's input, while their
//! copy to the host is waited for only by `finish_sample`.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use cust::event::{Event, EventFlags};
use pagoda_backend::{Backend, BackendError, Result, SampledToken, SamplingRow, Tensor};
use pagoda_sampler::TokenId;

use crate::backend::{dtype_to_code, tensor_ptr, CudaBackend};
use crate::device::{CudaStorage, DeviceInner, PinnedHost};
use crate::error::{CudaError, DriverContext};
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

/// Appends one row's merged allowed-token mask to `words` (`vocab.div_ceil(32)`
/// words, bit `t % 32` of word `t / 32`) and returns where it starts, or
/// returns `None` (appending nothing) when nothing in the row bans a token.
///
/// The mask is the intersection of the grammar mask (`allowed_tokens`; ids
/// past its end not allowed), `allowed_token_ids`, and the complement of every
/// bad word's last token whose other tokens end the output so far: each of
/// those only sends logits to -inf, so in any order they leave the same row
/// as the reference's steps, one after the other.
fn merged_mask(row: &SamplingRow<'_>, vocab: usize, words: &mut Vec<u32>) -> Option<usize> {
    let p = row.params;
    let banned_words: Vec<usize> = p
        .bad_words
        .iter()
        .filter_map(|word| {
            let (&last, prefix) = word.split_last()?;
            (row.output_tokens.ends_with(prefix) && (last as usize) < vocab).then_some(last as usize)
        })
        .collect();
    if row.allowed_tokens.is_none() && p.allowed_token_ids.is_none() && banned_words.is_empty() {
        return None;
    }
    let n = vocab.div_ceil(32);
    let start = words.len();
    match row.allowed_tokens {
        Some(mask) => words.extend((0..n).map(|w| mask.get(w).copied().unwrap_or(0))),
        None => words.resize(start + n, u32::MAX),
    }
    let mask = &mut words[start..];
    if let Some(allowed) = &p.allowed_token_ids {
        let mut keep = vec![0u32; n];
        for &t in allowed {
            if (t as usize) < vocab {
                keep[t as usize / 32] |= 1 << (t % 32);
            }
        }
        for (w, k) in mask.iter_mut().zip(keep) {
            *w &= k;
        }
    }
    for t in banned_words {
        mask[t / 32] &= !(1u32 << (t % 32));
    }
    Some(start)
}

/// Appends one row's `logit_bias` entries for tokens inside the vocabulary,
/// ordered by token (stably, so the kernel adds a repeated token's biases in
/// the request's order, as the reference does).
fn bias_entries(row: &SamplingRow<'_>, vocab: usize, tokens: &mut Vec<i32>, values: &mut Vec<f32>) {
    let mut entries: Vec<(TokenId, f32)> =
        row.params.logit_bias.iter().copied().filter(|&(t, _)| (t as usize) < vocab).collect();
    entries.sort_by_key(|&(t, _)| t);
    for (t, b) in entries {
        tokens.push(t as i32);
        values.push(b);
    }
}

/// Tokens sampled on the device by [`CudaBackend`]'s `sample_async`.
///
/// The kernels' `PagodaSampleOut` records stay on the device for as long as
/// the handle lives (`feed_sampled_tokens` reads them there), while a copy of
/// them and of the status word travels to page-locked host memory the handle
/// owns; `finish_sample` waits for that copy alone (an event), not for the
/// whole stream. Dropping a handle unfinished waits for the copy before its
/// host memory is reused; an index error it would have reported is reported
/// by the backend's next wait instead.
pub struct CudaSampled {
    device: Arc<DeviceInner>,
    /// Packed inputs followed by the output records (`None` with no rows);
    /// freed on the stream when the handle drops, after every queued reader.
    buffer: Option<CudaStorage>,
    /// Byte offset of the records in `buffer`.
    records_at: u64,
    /// Top logprobs to return per row (already capped by the vocabulary).
    top_n: Vec<usize>,
    /// Byte offset of the status word in the host copy.
    status_at: usize,
    /// Where the copies land, until `finish_sample` takes it back.
    readback: Option<Readback>,
    pool: Arc<Readbacks>,
}

impl CudaSampled {
    /// Rows sampled (one token each).
    pub fn num_rows(&self) -> usize {
        self.top_n.len()
    }

    fn records_ptr(&self) -> u64 {
        self.buffer.as_ref().map_or(0, |b| b.ptr() + self.records_at)
    }

    /// The copies' destination: records first, the status word at `status_at`.
    fn landed<'a>(&self, readback: &'a Readback) -> &'a [u8] {
        readback.host.bytes(self.status_at + 4)
    }

    fn status_word(&self, landed: &[u8]) -> u32 {
        let w = &landed[self.status_at..self.status_at + 4];
        u32::from_le_bytes([w[0], w[1], w[2], w[3]])
    }

    /// Waits for the copies (the event only) and takes the host memory they
    /// landed in; on failure the handle keeps it, for its drop to deal with.
    fn take_landed(&mut self) -> Result<Readback> {
        let readback = self
            .readback
            .take()
            .ok_or_else(|| BackendError::Device("sampled tokens already taken".into()))?;
        if let Err(e) = readback.event.synchronize() {
            self.readback = Some(readback);
            return Err(CudaError::Driver { call: "cuEventSynchronize", source: e }.into());
        }
        Ok(readback)
    }
}

impl std::fmt::Debug for CudaSampled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaSampled({} rows at {:#x})", self.num_rows(), self.records_ptr())
    }
}

impl Drop for CudaSampled {
    fn drop(&mut self) {
        let Some(readback) = self.readback.take() else { return };
        // The copies into the host memory may still be running: wait for them
        // before the memory goes back to the pool (or is freed).
        if self.device.bind().is_ok() && readback.event.synchronize().is_ok() {
            let word = self.status_word(self.landed(&readback));
            self.pool.orphaned_status.fetch_or(word, Ordering::AcqRel);
            self.pool.give_back(readback);
        } else {
            // The device failed; whether a copy may still land is unknown, so
            // the host memory is never reused or freed.
            std::mem::forget(readback);
        }
    }
}

/// Page-locked memory a handle's records and status word are copied into, and
/// the event recorded after those copies.
pub(crate) struct Readback {
    // The event goes first: `host` may hold the last reference to the context.
    event: Event,
    host: PinnedHost,
}

/// The backend's free [`Readback`]s (so steady state allocates no pinned
/// memory), and the status bits of handles dropped unfinished.
#[derive(Default)]
pub(crate) struct Readbacks {
    free: Mutex<Vec<Readback>>,
    orphaned_status: AtomicU32,
}

impl Readbacks {
    /// Status bits that dropped handles read back and could not report.
    pub(crate) fn take_orphaned_status(&self) -> u32 {
        self.orphaned_status.swap(0, Ordering::AcqRel)
    }

    /// A readback of at least `len` bytes: a free one (preferably large
    /// enough already), else a new one. The context must be current.
    fn take(&self, device: &Arc<DeviceInner>, len: usize) -> Result<Readback> {
        let reused = {
            let mut free = self.free.lock().map_err(|_| CudaError::Poisoned("sampling readbacks"))?;
            let i = free.iter().position(|r| r.host.capacity() >= len).or(free.len().checked_sub(1));
            i.map(|i| free.swap_remove(i))
        };
        let mut readback = match reused {
            Some(r) => r,
            None => Readback {
                event: Event::new(EventFlags::DISABLE_TIMING).during("cuEventCreate")?,
                host: PinnedHost::new(device.clone()),
            },
        };
        readback.host.slice(len)?;
        Ok(readback)
    }

    fn give_back(&self, readback: Readback) {
        if let Ok(mut free) = self.free.lock() {
            free.push(readback);
        }
    }
}

/// Queues sampling of every row and the copy of its results to the host;
/// returns without waiting. See [`CudaSampled`].
pub(crate) fn sample_async(
    backend: &CudaBackend,
    logits: &Tensor<CudaBackend>,
    rows: &[SamplingRow<'_>],
) -> Result<CudaSampled> {
    let (m, vocab) = logits.dims2(OP)?;
    if rows.len() != m {
        return Err(BackendError::shape(OP, format!("{} sampling rows for {m} logit rows", rows.len())));
    }
    if !logits.dtype().is_float() {
        return Err(BackendError::DType { op: OP, dtype: logits.dtype() });
    }
    if m > 0 && (vocab == 0 || vocab > i32::MAX as usize) {
        return Err(BackendError::shape(OP, format!("vocabulary of {vocab}")));
    }
    let device = backend.device();
    device.bind()?;
    let out_bytes = m * std::mem::size_of::<ffi::PagodaSampleOut>();
    let mut packed = Vec::with_capacity(m);
    let (mut buffer, mut records_at) = (None, 0);
    if m > 0 {
        let (inputs, offsets) = pack_rows(rows, &mut packed, vocab)?;
        records_at = (inputs.len() as u64).next_multiple_of(SCRATCH_ALIGN as u64);
        // One allocation for the packed inputs and the records the handle
        // keeps (the workspace, much larger, is freed as soon as the kernels
        // are done), and one upload.
        let inputs_dev = device.alloc(records_at as usize + out_bytes)?;
        device.copy_to_device(inputs_dev.ptr(), &inputs)?;
        launch(backend, logits, &packed, &inputs_dev, offsets, records_at, vocab)?;
        buffer = Some(inputs_dev);
    }
    let status_at = out_bytes.next_multiple_of(16);
    let pool = backend.sample_readbacks().clone();
    let mut readback = pool.take(device, status_at + 4)?;
    let queued =
        queue_readback(backend, &mut readback, buffer.as_ref().map(|b| b.ptr() + records_at), out_bytes);
    if let Err(e) = queued {
        // A copy may be queued into the host memory: let it land first.
        let _ = device.synchronize();
        pool.give_back(readback);
        return Err(e);
    }
    let top_n = packed.iter().map(|r| (r.num_logprobs.max(0) as usize).min(vocab)).collect();
    Ok(CudaSampled {
        device: device.clone(),
        buffer,
        records_at,
        top_n,
        status_at,
        readback: Some(readback),
        pool,
    })
}

/// Byte offsets of the arrays in the packed upload (the rows start it).
#[derive(Debug)]
struct InputOffsets {
    tokens: u64,
    counts: u64,
    mask_words: u64,
    bias_tokens: u64,
    bias_values: u64,
    /// Whether any row has a mask or bias entries.
    has_constraints: bool,
}

/// Packs every row's parameters (into `packed`), penalty entries, merged
/// masks and bias entries into one upload: rows, penalty tokens, penalty
/// counts, mask words, bias tokens, bias values.
fn pack_rows(
    rows: &[SamplingRow<'_>],
    packed: &mut Vec<ffi::PagodaSampleRow>,
    vocab: usize,
) -> Result<(Vec<u8>, InputOffsets)> {
    let (mut tokens, mut counts) = (Vec::new(), Vec::new());
    let (mut mask_words, mut bias_tokens, mut bias_values) = (Vec::new(), Vec::new(), Vec::new());
    let mut num_draw = 0i32;
    let too_many = |what: &str| BackendError::shape(OP, format!("the rows' {what} exceed i32 offsets"));
    for row in rows {
        let p = row.params;
        let start = tokens.len() as i32;
        if p.has_penalties() {
            penalty_entries(row, &mut tokens, &mut counts);
        }
        let mask_start = match merged_mask(row, vocab, &mut mask_words) {
            Some(at) => i32::try_from(at).map_err(|_| too_many("masks"))?,
            None => -1,
        };
        let bias_start = bias_tokens.len();
        bias_entries(row, vocab, &mut bias_tokens, &mut bias_values);
        let bias_start = i32::try_from(bias_start).map_err(|_| too_many("bias entries"))?;
        let bias_end = i32::try_from(bias_tokens.len()).map_err(|_| too_many("bias entries"))?;
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
            mask_start,
            bias_start,
            bias_end,
        });
    }
    if (num_draw as usize) * vocab > i32::MAX as usize {
        return Err(BackendError::shape(OP, format!("{num_draw} drawing rows of {vocab} exceed the sorter")));
    }
    let has_constraints = !mask_words.is_empty() || !bias_tokens.is_empty();
    // Keep the device arrays non-empty so their pointers are valid.
    tokens.push(-1);
    counts.push(0);
    mask_words.push(0);
    bias_tokens.push(-1);
    bias_values.push(0.0);
    let mut inputs = Vec::new();
    push_aligned(&mut inputs, bytemuck::cast_slice::<ffi::PagodaSampleRow, u8>(packed));
    let tokens_at = push_aligned(&mut inputs, bytemuck::cast_slice(&tokens));
    let counts_at = push_aligned(&mut inputs, bytemuck::cast_slice(&counts));
    let mask_at = push_aligned(&mut inputs, bytemuck::cast_slice(&mask_words));
    let bias_tokens_at = push_aligned(&mut inputs, bytemuck::cast_slice(&bias_tokens));
    let bias_values_at = push_aligned(&mut inputs, bytemuck::cast_slice(&bias_values));
    Ok((
        inputs,
        InputOffsets {
            tokens: tokens_at,
            counts: counts_at,
            mask_words: mask_at,
            bias_tokens: bias_tokens_at,
            bias_values: bias_values_at,
            has_constraints,
        },
    ))
}

/// Runs the sampling kernels over the uploaded inputs; the records go to
/// `inputs_dev` at `records_at`.
fn launch(
    backend: &CudaBackend,
    logits: &Tensor<CudaBackend>,
    packed: &[ffi::PagodaSampleRow],
    inputs_dev: &CudaStorage,
    offsets: InputOffsets,
    records_at: u64,
    vocab: usize,
) -> Result<()> {
    let m = packed.len();
    let num_draw = packed.iter().filter(|r| r.draw_index >= 0).count() as i32;
    let mut workspace_bytes = 0usize;
    // SAFETY: a pure size computation.
    check("pagoda_sample_workspace_bytes", unsafe {
        ffi::pagoda_sample_workspace_bytes(m as i32, num_draw, vocab as i32, &mut workspace_bytes)
    })?;
    // Freed on the stream when it drops at the end of this function, after the kernels.
    let workspace = backend.device().alloc(workspace_bytes)?;
    let args = ffi::PagodaSampleArgs {
        logits: tensor_ptr(logits) as *const c_void,
        rows: inputs_dev.ptr() as *const ffi::PagodaSampleRow,
        penalty_tokens: (inputs_dev.ptr() + offsets.tokens) as *const i32,
        penalty_counts: (inputs_dev.ptr() + offsets.counts) as *const i32,
        out: (inputs_dev.ptr() + records_at) as *mut ffi::PagodaSampleOut,
        mask_words: (inputs_dev.ptr() + offsets.mask_words) as *const u32,
        bias_tokens: (inputs_dev.ptr() + offsets.bias_tokens) as *const i32,
        bias_values: (inputs_dev.ptr() + offsets.bias_values) as *const f32,
        workspace: workspace.ptr() as *mut c_void,
        workspace_bytes,
        logits_dtype: dtype_to_code(logits.dtype()),
        num_rows: m as i32,
        num_draw_rows: num_draw,
        vocab: vocab as i32,
        greedy_only: (!offsets.has_constraints
            && packed
                .iter()
                .all(|r| r.draw_index < 0 && r.penalty_start == r.penalty_end && r.num_logprobs == 0))
            as i32,
        has_constraints: offsets.has_constraints as i32,
    };
    // SAFETY: every device buffer above is sized for these arguments and lives past the launch.
    check("pagoda_sample", unsafe {
        ffi::pagoda_sample(&args, backend.launch_policy(), backend.raw_stream())
    })?;
    Ok(())
}

/// Queues the copies of the records (at device address `records`, `out_bytes`
/// of them) and of the status word into `readback`, clears the status word,
/// and records the readback's event after them.
///
/// The word is cleared in stream order right after its copy, so every index
/// error is reported exactly once: by the first wait (a `finish_sample`, or
/// `synchronize`/`download` through the backend's own copy) whose copy of
/// the word follows the kernel that recorded it.
fn queue_readback(
    backend: &CudaBackend,
    readback: &mut Readback,
    records: Option<u64>,
    out_bytes: usize,
) -> Result<()> {
    let device = backend.device();
    let status_at = out_bytes.next_multiple_of(16);
    let host = readback.host.slice(status_at + 4)?;
    let (records_host, status_host) = host.split_at_mut(status_at);
    // SAFETY: the host memory belongs to `readback`, which the handle keeps
    // until the event recorded below has completed (`finish_sample` and the
    // handle's drop wait for it), and nothing reads or writes it before that.
    unsafe {
        if let Some(src) = records {
            device.copy_to_host_async(&mut records_host[..out_bytes], src)?;
        }
        device.copy_to_host_async(&mut status_host[..4], backend.status_ptr() as u64)?;
    }
    device.memset_u32(backend.status_ptr() as u64, 0, 1)?;
    readback.event.record(device.stream()).during("cuEventRecord")?;
    Ok(())
}

/// Waits for a handle's copies (its event only) and returns its tokens, or
/// the index errors recorded before it.
pub(crate) fn finish_sample(backend: &CudaBackend, mut sampled: CudaSampled) -> Result<Vec<SampledToken>> {
    same_device(backend, &sampled)?;
    backend.device().bind()?;
    let readback = sampled.take_landed()?;
    let landed = sampled.landed(&readback);
    let word = sampled.status_word(landed);
    let out_bytes = sampled.num_rows() * std::mem::size_of::<ffi::PagodaSampleOut>();
    let outs: Vec<ffi::PagodaSampleOut> = bytemuck::pod_collect_to_vec(&landed[..out_bytes]);
    sampled.pool.give_back(readback);
    backend.status_error(word)?;
    Ok(outs
        .iter()
        .zip(&sampled.top_n)
        .map(|(o, &n)| SampledToken {
            token: o.token as TokenId,
            logprob: o.logprob,
            top_logprobs: (0..n).map(|k| (o.top_ids[k] as TokenId, o.top_logprobs[k])).collect(),
        })
        .collect())
}

/// Queues `token_ids[i] = sampled id of row source_rows[i]` for rows >= 0.
pub(crate) fn feed_sampled_tokens(
    backend: &CudaBackend,
    sampled: &CudaSampled,
    source_rows: &Tensor<CudaBackend>,
    token_ids: &Tensor<CudaBackend>,
) -> Result<()> {
    const OP: &str = "feed_sampled_tokens";
    let n = pagoda_backend::check_feed_operands(source_rows, token_ids)?;
    same_device(backend, sampled)?;
    if n == 0 {
        return Ok(());
    }
    let n = i32::try_from(n).map_err(|_| BackendError::shape(OP, format!("{n} token ids exceed i32")))?;
    backend.device().bind()?;
    // SAFETY: the records hold num_rows entries and live until the handle
    // drops (freed on the stream, after this kernel); both vectors hold n i32.
    let rc = unsafe {
        ffi::pagoda_feed_sampled_tokens(
            sampled.records_ptr() as *const ffi::PagodaSampleOut,
            sampled.num_rows() as i32,
            tensor_ptr(source_rows) as *const i32,
            tensor_ptr(token_ids) as *mut i32,
            n,
            backend.status_ptr(),
            backend.launch_policy(),
            backend.raw_stream(),
        )
    };
    Ok(check("pagoda_feed_sampled_tokens", rc)?)
}

fn same_device(backend: &CudaBackend, sampled: &CudaSampled) -> Result<()> {
    if !Arc::ptr_eq(backend.device(), &sampled.device) {
        return Err(BackendError::Device("sampled tokens of another CUDA backend".into()));
    }
    Ok(())
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
            allowed_tokens: None,
        };
        let (mut t, mut c) = (Vec::new(), Vec::new());
        penalty_entries(&row, &mut t, &mut c);
        assert_eq!(t, vec![5, 3, 9]);
        assert_eq!(c, vec![0, 1, 2]);
    }

    fn row<'a>(
        params: &'a SamplingParams,
        output: &'a [TokenId],
        mask: Option<&'a [u32]>,
    ) -> SamplingRow<'a> {
        SamplingRow {
            params,
            seed: 0,
            step: 0,
            prompt_tokens: &[],
            output_tokens: output,
            allowed_tokens: mask,
        }
    }

    /// The tokens of a packed mask of `vocab` bits that are allowed.
    fn allowed(words: &[u32], vocab: usize) -> Vec<u32> {
        (0..vocab as u32).filter(|&t| pagoda_sampler::token_allowed(words, t)).collect()
    }

    #[test]
    fn masks_merge_the_grammar_allowed_ids_and_bad_words() {
        let vocab = 70; // three words, the last one partly used
                        // Grammar: tokens 0..40 and 65 (a mask one word short: 64.. are not allowed, so 65 is out).
        let grammar = [u32::MAX, 0xff];
        let params = SamplingParams {
            allowed_token_ids: Some(vec![1, 5, 9, 39, 40, 65, 69, 100]),
            bad_words: vec![vec![5], vec![9, 39], vec![7, 1], vec![3, 9, 9]],
            ..SamplingParams::greedy()
        };
        let mut words = vec![7u32]; // earlier rows' words stay
        let at = merged_mask(&row(&params, &[2, 3, 9], Some(&grammar)), vocab, &mut words).unwrap();
        assert_eq!(at, 1);
        assert_eq!(words.len(), 1 + 3);
        // Grammar and ids leave 1, 5, 9, 39 (40 is outside the grammar, 65 past its words). Then the
        // bad words: 5 alone; 39 (the output ends with 9); 9 (it ends with 3, 9); 1 stays (no 7).
        assert_eq!(allowed(&words[1..], vocab), vec![1]);

        // No grammar: allowed_token_ids alone, ids past the vocabulary ignored.
        let only_ids =
            SamplingParams { allowed_token_ids: Some(vec![69, 0, 200]), ..SamplingParams::greedy() };
        let mut words = Vec::new();
        assert_eq!(merged_mask(&row(&only_ids, &[], None), vocab, &mut words), Some(0));
        assert_eq!(allowed(&words, vocab), vec![0, 69]);

        // A bad word whose prefix does not end the output bans nothing: no mask at all.
        let unmatched = SamplingParams { bad_words: vec![vec![4, 2]], ..SamplingParams::greedy() };
        let mut words = Vec::new();
        assert_eq!(merged_mask(&row(&unmatched, &[2, 4, 1], None), vocab, &mut words), None);
        assert!(words.is_empty());
        // Once it does, only its last token goes.
        assert_eq!(merged_mask(&row(&unmatched, &[1, 4], None), vocab, &mut words), Some(0));
        assert_eq!(allowed(&words, vocab), (0..70).filter(|&t| t != 2).collect::<Vec<_>>());
    }

    #[test]
    fn packed_rows_point_at_their_masks_and_bias_entries() {
        let vocab = 40; // two words
        let plain = SamplingParams { temperature: 0.7, ..SamplingParams::default() };
        let biased = SamplingParams {
            logit_bias: vec![(3, 1.5), (50, 2.0), (1, -1.0), (3, 0.25)],
            allowed_token_ids: Some(vec![1, 3, 33]),
            ..SamplingParams::greedy()
        };
        let grammar = [0b1010u32, 1 << 1];
        let rows = [row(&plain, &[], None), row(&biased, &[], None), row(&plain, &[], Some(&grammar))];
        let mut packed = Vec::new();
        let (inputs, at) = pack_rows(&rows, &mut packed, vocab).unwrap();
        assert!(at.has_constraints);
        let ranges: Vec<_> = packed.iter().map(|r| (r.mask_start, r.bias_start, r.bias_end)).collect();
        assert_eq!(ranges, vec![(-1, 0, 0), (0, 0, 3), (2, 3, 3)]);
        let words: &[u32] = bytemuck::cast_slice(&inputs[at.mask_words as usize..][..4 * 4]);
        assert_eq!(allowed(&words[0..2], vocab), vec![1, 3, 33]);
        assert_eq!(allowed(&words[2..4], vocab), vec![1, 3, 33]);
        // Bias entries by token, a repeated token's in the request's order, ids past the vocabulary dropped.
        let tokens: &[i32] = bytemuck::cast_slice(&inputs[at.bias_tokens as usize..][..3 * 4]);
        let values: &[f32] = bytemuck::cast_slice(&inputs[at.bias_values as usize..][..3 * 4]);
        assert_eq!(tokens, &[1, 3, 3]);
        assert_eq!(values, &[-1.0, 1.5, 0.25]);

        // Without constraints the call says so (the kernels then read no constraint field).
        let mut packed = Vec::new();
        let (_, at) = pack_rows(&[row(&plain, &[], None)], &mut packed, vocab).unwrap();
        assert!(!at.has_constraints);
        assert_eq!(packed[0].mask_start, -1);
    }
}
