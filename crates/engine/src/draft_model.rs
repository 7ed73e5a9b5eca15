//! The draft-model proposer of speculative decoding: a smaller model of the
//! target's vocabulary, on the same backend, with a paged KV cache and an
//! allocator of its own, proposing greedily (its drafts are point masses, so
//! the target's rejection rule is "sample, accept if equal": see
//! `speculative.rs`).
//!
//! Per proposal round, for every sequence in one batch: first a chunk with
//! the tokens the draft's cache lacks (the whole sequence the first time;
//! afterwards the drafts the target accepted beyond the ones cached and the
//! token it sampled), whose last row gives draft 1; then `k - 1` one-token
//! decodes, each feeding the previous draft. The draft cache keeps drafts
//! `1..k-1` in draft slots of its allocator; the next round keeps those the
//! target accepted and releases the rest, as the target's cache does.

use pagoda_backend::{AttentionHostMetadata, Backend, DType, SamplingParams, SamplingRow};
use pagoda_models::{ForwardBatch, KvCache, LlamaModel};
use pagoda_paged_kv::{KvAllocator, PagedAllocator, PagedConfig, PrefixHit, SeqStart};
use pagoda_scheduler::{SeqId, TokenId};
use rustc_hash::FxHashMap;

use crate::error::EngineError;
use crate::speculative::DraftRequest;

/// What the draft cache holds for one sequence.
#[derive(Debug, Default)]
struct DraftSeq {
    /// Tokens whose KV the draft cache holds (a prefix of the sequence).
    cached: Vec<TokenId>,
    /// Drafts of the last round held in draft slots after `cached`.
    in_slots: Vec<TokenId>,
}

/// A draft model and its cache. See the module docs.
pub struct DraftModel<B: Backend> {
    model: LlamaModel<B>,
    kv: KvCache<B>,
    alloc: PagedAllocator,
    block_size: usize,
    seqs: FxHashMap<SeqId, DraftSeq>,
    greedy: SamplingParams,
}

/// One sequence's part of a forward pass of the draft.
struct Row {
    seq: SeqId,
    tokens: Vec<TokenId>,
    start: usize,
}

impl<B: Backend> DraftModel<B> {
    /// A draft of `num_blocks` KV blocks of `block_size` tokens, of
    /// `kv_cache_dtype` (the target's: the model's dtype or F8E4M3).
    pub fn new(
        backend: &B,
        model: LlamaModel<B>,
        num_blocks: usize,
        block_size: usize,
        kv_cache_dtype: DType,
    ) -> Result<Self, EngineError> {
        let kv = model.alloc_kv_cache(backend, num_blocks, block_size, kv_cache_dtype)?;
        let alloc = PagedAllocator::new(PagedConfig {
            num_gpu_blocks: num_blocks,
            num_cpu_blocks: 0,
            block_size,
            enable_prefix_caching: false,
        })
        .map_err(|e| EngineError::Config(format!("draft model KV cache: {e}")))?;
        Ok(Self {
            model,
            kv,
            alloc,
            block_size,
            seqs: FxHashMap::default(),
            greedy: SamplingParams::greedy(),
        })
    }

    /// Drops a sequence's draft cache.
    pub fn forget(&mut self, seq: SeqId) {
        if self.seqs.remove(&seq).is_some() {
            let _ = self.alloc.free(seq);
        }
    }

    /// Up to `max_drafts` greedy drafts per sequence (see the module docs).
    /// A sequence the draft cache cannot hold gets none.
    pub fn propose(
        &mut self,
        backend: &B,
        requests: &[DraftRequest<'_>],
    ) -> Result<Vec<Vec<TokenId>>, EngineError> {
        let mut drafts: Vec<Vec<TokenId>> = vec![Vec::new(); requests.len()];
        // Round 1: catch each sequence up, and take draft 1 from its last row.
        let mut rows: Vec<(usize, Row)> = Vec::new();
        for (i, req) in requests.iter().enumerate() {
            if req.max_drafts == 0 {
                continue;
            }
            if let Some(row) = self.catch_up(req)? {
                rows.push((i, row));
            }
        }
        if rows.is_empty() {
            return Ok(drafts);
        }
        // Decodes (one token) first, as the attention metadata wants.
        rows.sort_by_key(|(_, r)| r.tokens.len() != 1);
        let first = self.forward_greedy(backend, &rows)?;
        for ((i, row), token) in rows.iter().zip(first) {
            drafts[*i].push(token);
            let state = self.seqs.get_mut(&row.seq).expect("caught up above");
            state.cached.extend_from_slice(&row.tokens);
        }
        // Slots for drafts 1..k-1 (fed back in the rounds that follow).
        let mut live: Vec<(usize, SeqId)> = Vec::new();
        for &(i, ref row) in &rows {
            let k = requests[i].max_drafts;
            if k < 2 {
                continue;
            }
            let mut copies = Vec::new();
            match self.alloc.append_draft_slots(row.seq, k - 1, &mut copies) {
                Ok(()) => live.push((i, row.seq)),
                Err(e) if e.is_out_of_memory() => {}
                Err(e) => return Err(EngineError::Internal(format!("draft model cache: {e}"))),
            }
        }
        for round in 1.. {
            live.retain(|&(i, _)| requests[i].max_drafts > round);
            if live.is_empty() {
                break;
            }
            let step: Vec<(usize, Row)> = live
                .iter()
                .map(|&(i, seq)| {
                    let start = self.seqs[&seq].cached.len() + round - 1;
                    (i, Row { seq, tokens: vec![drafts[i][round - 1]], start })
                })
                .collect();
            let next = self.forward_greedy(backend, &step)?;
            for ((i, _), token) in step.iter().zip(next) {
                drafts[*i].push(token);
            }
        }
        for (i, row) in &rows {
            let (i, seq) = (*i, row.seq);
            let held = self.alloc.num_draft_slots(seq);
            if let Some(state) = self.seqs.get_mut(&seq) {
                state.in_slots = drafts[i][..held.min(drafts[i].len())].to_vec();
            }
        }
        Ok(drafts)
    }

    /// Reconciles a sequence's draft cache with its tokens now (keeping the
    /// drafts of the last round the target accepted) and allocates slots for
    /// the tokens it lacks. `None` when it lacks none or the cache is full.
    fn catch_up(&mut self, req: &DraftRequest<'_>) -> Result<Option<Row>, EngineError> {
        let internal =
            |e: pagoda_paged_kv::AllocError| EngineError::Internal(format!("draft model cache: {e}"));
        let state = self.seqs.entry(req.seq_id).or_default();
        if !state.in_slots.is_empty() || self.alloc.num_draft_slots(req.seq_id) > 0 {
            let base = state.cached.len();
            let after = req.tokens.get(base..).unwrap_or(&[]);
            let kept = state.in_slots.iter().zip(after).take_while(|(d, t)| d == t).count();
            self.alloc.accept_draft_tokens(req.seq_id, &state.in_slots[..kept]).map_err(internal)?;
            state.cached.extend_from_slice(&state.in_slots[..kept]);
            state.in_slots.clear();
        }
        let start_over = !req.tokens.starts_with(&state.cached) || state.cached.len() >= req.tokens.len();
        if start_over {
            // Not a prefix (cannot happen while tokens only grow), or
            // nothing to compute: start over.
            self.forget(req.seq_id);
            self.seqs.insert(req.seq_id, DraftSeq::default());
        }
        let state = self.seqs.get_mut(&req.seq_id).expect("inserted above");
        let start = state.cached.len();
        let tokens = req.tokens[start..].to_vec();
        let mut copies = Vec::new();
        let allocated = if start == 0 {
            let start = SeqStart {
                tokens: &tokens,
                prefix: PrefixHit::miss(tokens.len()),
                extra_key: None,
                max_total_tokens: tokens.len() + req.max_drafts,
            };
            self.alloc.start_seq(req.seq_id, start)
        } else {
            self.alloc.append_slots(req.seq_id, &tokens, &mut copies)
        };
        match allocated {
            Ok(()) => Ok(Some(Row { seq: req.seq_id, tokens, start })),
            Err(e) if e.is_out_of_memory() => {
                self.forget(req.seq_id);
                Ok(None)
            }
            Err(e) => Err(internal(e)),
        }
    }

    /// One forward pass of the draft over `rows` (decodes first), returning
    /// the greedy token after each row's last position.
    fn forward_greedy(&self, backend: &B, rows: &[(usize, Row)]) -> Result<Vec<TokenId>, EngineError> {
        let b = self.block_size;
        let mut token_ids = Vec::new();
        let mut positions = Vec::new();
        let mut attn = AttentionHostMetadata { query_start_loc: vec![0], ..AttentionHostMetadata::default() };
        let mut logits_indices = Vec::with_capacity(rows.len());
        let tables: Vec<&[u32]> =
            rows.iter().map(|(_, r)| self.alloc.block_table(r.seq).unwrap_or(&[])).collect();
        let width = tables.iter().map(|t| t.len()).max().unwrap_or(1).max(1);
        for ((_, row), table) in rows.iter().zip(&tables) {
            for (offset, &token) in row.tokens.iter().enumerate() {
                let pos = row.start + offset;
                let slot = pagoda_paged_kv::slot_of(table, b, pos).ok_or_else(|| {
                    EngineError::Internal(format!("draft model: no slot for position {pos}"))
                })?;
                token_ids.push(token);
                positions.push(pos as i32);
                attn.slot_mapping.push(slot);
            }
            attn.query_start_loc.push(token_ids.len() as i32);
            attn.seq_lens.push((row.start + row.tokens.len()) as i32);
            attn.block_tables.extend(table.iter().map(|&x| x as i32));
            attn.block_tables.resize(attn.block_tables.len() + width - table.len(), 0);
            logits_indices.push(token_ids.len() as i32 - 1);
        }
        attn.max_blocks_per_seq = width;
        attn.num_decode_seqs = rows.iter().take_while(|(_, r)| r.tokens.len() == 1).count();
        let batch = ForwardBatch::upload(backend, &token_ids, &positions, attn, &logits_indices)?;
        let logits = self.model.forward(backend, &batch, &self.kv)?;
        let sampling: Vec<SamplingRow<'_>> = rows
            .iter()
            .map(|_| SamplingRow {
                params: &self.greedy,
                seed: 0,
                step: 0,
                prompt_tokens: &[],
                output_tokens: &[],
                allowed_tokens: None,
            })
            .collect();
        Ok(backend.sample(&logits, &sampling)?.into_iter().map(|t| t.token).collect())
    }
}
