//! Property tests: random operation sequences against both allocators, with a
//! shadow copy of GPU and CPU cache memory. Every plan the allocator returns
//! (copy-on-write copies, swap-outs, swap-ins) is applied to the shadow, and
//! every write goes through the block table, exactly as a runner would do it.
//! After each operation the test reads every resident sequence's tokens back
//! through its block table: if a block were shared when it should not be,
//! freed while held, or copied wrongly, the read-back would differ.

use std::collections::BTreeMap;

use pagoda_paged_kv::{
    slot_of, AllocError, ContiguousAllocator, ContiguousConfig, KvAllocator, KvUsage, PagedAllocator,
    PagedConfig, PrefixHit, Reservation, SeqId, SeqStart, TokenId,
};
use proptest::prelude::*;

/// What one cache slot holds: a token written under an extra key.
type Cell = Option<(TokenId, Option<u64>)>;

#[derive(Clone, Debug)]
enum Op {
    /// `lookup: false` skips the prefix cache, which leaves duplicate
    /// (uncached) copies of cached contents around.
    Start {
        base: usize,
        prefix_len: usize,
        tail: Vec<TokenId>,
        key: Option<u64>,
        lookup: bool,
    },
    Append {
        seq: usize,
        tokens: Vec<TokenId>,
    },
    Fork {
        seq: usize,
    },
    Free {
        seq: usize,
    },
    SwapOut {
        seq: usize,
    },
    SwapIn {
        seq: usize,
        tokens: Vec<TokenId>,
    },
    /// A decode slot whose token a running step samples: the "device" writes
    /// `token` into the slot now, the allocator learns it at `SetPending`.
    AppendPending {
        seq: usize,
        token: TokenId,
    },
    SetPending {
        seq: usize,
    },
    /// A verification step's draft slots: the "device" writes the draft
    /// tokens now; `AcceptDrafts` keeps a prefix of them.
    AppendDrafts {
        seq: usize,
        tokens: Vec<TokenId>,
    },
    AcceptDrafts {
        seq: usize,
        accepted: usize,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let tokens = |max| prop::collection::vec(0u32..3, 1..max);
    prop_oneof![
        4 => (0usize..3, 0usize..24, prop::collection::vec(0u32..3, 0..6), prop::option::of(0u64..2), prop::bool::weighted(0.8))
            .prop_map(|(base, prefix_len, tail, key, lookup)| Op::Start { base, prefix_len, tail, key, lookup }),
        6 => (any::<usize>(), tokens(6)).prop_map(|(seq, tokens)| Op::Append { seq, tokens }),
        2 => any::<usize>().prop_map(|seq| Op::Fork { seq }),
        3 => any::<usize>().prop_map(|seq| Op::Free { seq }),
        2 => any::<usize>().prop_map(|seq| Op::SwapOut { seq }),
        2 => (any::<usize>(), prop::collection::vec(0u32..3, 0..3)).prop_map(|(seq, tokens)| Op::SwapIn { seq, tokens }),
        3 => (any::<usize>(), 0u32..3).prop_map(|(seq, token)| Op::AppendPending { seq, token }),
        3 => any::<usize>().prop_map(|seq| Op::SetPending { seq }),
        3 => (any::<usize>(), prop::collection::vec(0u32..3, 0..6)).prop_map(|(seq, tokens)| Op::AppendDrafts { seq, tokens }),
        3 => (any::<usize>(), 0usize..7).prop_map(|(seq, accepted)| Op::AcceptDrafts { seq, accepted }),
    ]
}

/// Three base prompts from a tiny alphabet, so that prefixes repeat often.
fn base_prompt(base: usize) -> Vec<TokenId> {
    (0..24u32).map(|i| (i * (base as u32 + 1) / 3) % 3).collect()
}

struct Model<A: KvAllocator> {
    kv: A,
    gpu: Vec<Cell>,
    cpu: Vec<Cell>,
    /// Live sequences and the (token, key) cells they must read back.
    seqs: BTreeMap<SeqId, Vec<(TokenId, Option<u64>)>>,
    /// Each live sequence's extra key (what its blocks are hashed under).
    keys: BTreeMap<SeqId, Option<u64>>,
    /// Sequences whose newest slot's token the allocator has not been told.
    pending: BTreeMap<SeqId, TokenId>,
    /// Sequences holding unverified draft slots, and their draft tokens.
    drafts: BTreeMap<SeqId, Vec<TokenId>>,
    next_id: u64,
}

type Snapshot = (KvUsage, Vec<(SeqId, Vec<u32>, Option<usize>, bool)>);

impl<A: KvAllocator> Model<A> {
    fn new(kv: A) -> Self {
        let b = kv.block_size();
        let gpu = vec![None; kv.num_gpu_blocks() * b];
        let cpu = vec![None; kv.num_cpu_blocks() * b];
        Self {
            kv,
            gpu,
            cpu,
            seqs: BTreeMap::new(),
            keys: BTreeMap::new(),
            pending: BTreeMap::new(),
            drafts: BTreeMap::new(),
            next_id: 0,
        }
    }

    fn pick(&self, i: usize) -> Option<SeqId> {
        if self.seqs.is_empty() {
            return None;
        }
        self.seqs.keys().nth(i % self.seqs.len()).copied()
    }

    fn snapshot(&self) -> Snapshot {
        let tables = self
            .seqs
            .keys()
            .map(|&s| {
                (
                    s,
                    self.kv.block_table(s).unwrap_or(&[]).to_vec(),
                    self.kv.num_tokens(s),
                    self.kv.is_swapped(s),
                )
            })
            .collect();
        (self.kv.usage(), tables)
    }

    fn write(&mut self, seq: SeqId, start: usize, cells: &[(TokenId, Option<u64>)]) {
        let b = self.kv.block_size();
        let table = self.kv.block_table(seq).unwrap().to_vec();
        for (i, &cell) in cells.iter().enumerate() {
            let slot = slot_of(&table, b, start + i).expect("table covers every new token");
            self.gpu[slot as usize] = Some(cell);
        }
    }

    /// Runs a plan's copy-on-write copies on the shadow memory.
    fn apply_copies(&mut self, copies: &[(u32, u32)]) {
        let b = self.kv.block_size();
        for &(src, dst) in copies {
            let gpu = self.gpu.clone();
            Self::copy_blocks(&gpu, &mut self.gpu, src, dst, b);
        }
    }

    /// Writes `tokens` after a sequence's cells, through its table.
    fn append_cells(&mut self, seq: SeqId, tokens: &[TokenId]) {
        let key = self.keys[&seq];
        let cells: Vec<_> = tokens.iter().map(|&t| (t, key)).collect();
        let start = self.seqs[&seq].len();
        self.write(seq, start, &cells);
        self.seqs.get_mut(&seq).unwrap().extend(cells);
    }

    fn copy_blocks(from: &[Cell], to: &mut [Cell], src: u32, dst: u32, b: usize) {
        let (s, d) = (src as usize * b, dst as usize * b);
        let block: Vec<Cell> = from[s..s + b].to_vec();
        to[d..d + b].copy_from_slice(&block);
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let b = self.kv.block_size();
        let before = self.snapshot();
        let result: Result<(), AllocError> = match op {
            Op::Start { base, prefix_len, tail, key, lookup } => {
                let mut tokens = base_prompt(*base)[..*prefix_len].to_vec();
                tokens.extend(tail);
                let hit = if *lookup {
                    self.kv.lookup_prefix(&tokens, *key)
                } else {
                    PrefixHit::miss(tokens.len())
                };
                let cached = hit.num_cached_tokens;
                prop_assert!(cached < tokens.len().max(1), "the last token is never cached");
                // Prefix reuse must return identical content.
                for (i, &block) in hit.blocks.iter().enumerate() {
                    for j in 0..b {
                        let cell = self.gpu[block as usize * b + j];
                        prop_assert_eq!(cell, Some((tokens[i * b + j], *key)), "cached block content");
                    }
                }
                let seq = SeqId(self.next_id);
                let start = SeqStart {
                    tokens: &tokens,
                    prefix: hit,
                    extra_key: *key,
                    max_total_tokens: tokens.len() + 16,
                };
                let r = self.kv.start_seq(seq, start);
                if r.is_ok() {
                    self.next_id += 1;
                    let cells: Vec<_> = tokens.iter().map(|&t| (t, *key)).collect();
                    self.seqs.insert(seq, cells.clone());
                    self.keys.insert(seq, *key);
                    self.write(seq, cached, &cells[cached..]);
                }
                r
            }
            Op::Append { seq, tokens } => {
                let Some(seq) = self.pick(*seq) else { return Ok(()) };
                let mut copies = Vec::new();
                let r = self.kv.append_slots(seq, tokens, &mut copies);
                if r.is_ok() {
                    self.apply_copies(&copies);
                    self.append_cells(seq, tokens);
                } else {
                    prop_assert!(copies.is_empty());
                }
                r
            }
            Op::Fork { seq } => {
                let Some(parent) = self.pick(*seq) else { return Ok(()) };
                let child = SeqId(self.next_id);
                let r = self.kv.fork(parent, child);
                if r.is_ok() {
                    self.next_id += 1;
                    let cells = self.seqs[&parent].clone();
                    self.seqs.insert(child, cells);
                    self.keys.insert(child, self.keys[&parent]);
                }
                r
            }
            Op::Free { seq } => {
                let Some(seq) = self.pick(*seq) else { return Ok(()) };
                self.seqs.remove(&seq);
                self.keys.remove(&seq);
                self.pending.remove(&seq);
                self.drafts.remove(&seq);
                self.kv.free(seq)
            }
            Op::SwapOut { seq } => {
                let Some(seq) = self.pick(*seq) else { return Ok(()) };
                let mut plan = Vec::new();
                let r = self.kv.swap_out(seq, &mut plan);
                for &(gpu, cpu) in &plan {
                    Self::copy_blocks(&self.gpu, &mut self.cpu, gpu, cpu, b);
                }
                r
            }
            Op::SwapIn { seq, tokens } => {
                let Some(seq) = self.pick(*seq) else { return Ok(()) };
                let mut plan = Vec::new();
                let r = self.kv.swap_in(seq, tokens, &mut plan);
                for &(cpu, gpu) in &plan {
                    Self::copy_blocks(&self.cpu, &mut self.gpu, cpu, gpu, b);
                }
                if r.is_ok() {
                    self.append_cells(seq, tokens);
                }
                r
            }
            Op::AppendPending { seq, token } => {
                let Some(seq) = self.pick(*seq) else { return Ok(()) };
                let mut copies = Vec::new();
                let r = self.kv.append_pending_slot(seq, &mut copies);
                if r.is_ok() {
                    self.apply_copies(&copies);
                    let cell = (*token, self.keys[&seq]);
                    let start = self.seqs[&seq].len();
                    self.write(seq, start, &[cell]);
                    self.seqs.get_mut(&seq).unwrap().push(cell);
                    prop_assert!(self.pending.insert(seq, *token).is_none(), "two pending slots");
                } else {
                    prop_assert!(copies.is_empty());
                }
                r
            }
            Op::SetPending { seq } => {
                let Some(seq) = self.pick(*seq) else { return Ok(()) };
                let token = self.pending.get(&seq).copied();
                let r = self.kv.set_pending_token(seq, token.unwrap_or(0));
                prop_assert_eq!(r.is_ok(), token.is_some(), "set_pending_token on {}: {:?}", seq, r);
                self.pending.remove(&seq);
                r
            }
            Op::AppendDrafts { seq, tokens } => {
                let Some(seq) = self.pick(*seq) else { return Ok(()) };
                let mut copies = Vec::new();
                let r = self.kv.append_draft_slots(seq, tokens.len(), &mut copies);
                if r.is_ok() {
                    self.apply_copies(&copies);
                    self.append_cells(seq, tokens);
                    prop_assert_eq!(self.kv.num_draft_slots(seq), tokens.len());
                    if !tokens.is_empty() {
                        prop_assert!(self.drafts.insert(seq, tokens.clone()).is_none(), "two sets of drafts");
                    }
                } else {
                    prop_assert!(copies.is_empty());
                }
                r
            }
            Op::AcceptDrafts { seq, accepted } => {
                let Some(seq) = self.pick(*seq) else { return Ok(()) };
                let drafts = self.drafts.get(&seq).cloned().unwrap_or_default();
                let keep = (*accepted).min(drafts.len());
                let r = self.kv.accept_draft_tokens(seq, &drafts[..keep]);
                if drafts.is_empty() {
                    // Accepting nothing of nothing is allowed; anything more is not.
                    prop_assert_eq!(&r, &Ok(()));
                } else {
                    prop_assert_eq!(&r, &Ok(()), "accepting {} of {:?} for {}", keep, drafts, seq);
                    let cells = self.seqs.get_mut(&seq).unwrap();
                    let rejected = drafts.len() - keep;
                    cells.truncate(cells.len() - rejected);
                    self.drafts.remove(&seq);
                    prop_assert_eq!(self.kv.num_draft_slots(seq), 0);
                }
                // More than the slots held is refused.
                let too_many = vec![0; self.kv.num_draft_slots(seq) + 1];
                prop_assert!(self.kv.accept_draft_tokens(seq, &too_many).is_err());
                r
            }
        };
        if let Err(e) = &result {
            // Refusals change nothing.
            prop_assert_eq!(&before, &self.snapshot(), "state changed by refused op {:?}: {}", op, e);
        }
        self.check()
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let b = self.kv.block_size();
        if let Err(e) = self.kv.check_invariants() {
            return Err(TestCaseError::fail(e.to_string()));
        }
        for (&seq, cells) in &self.seqs {
            prop_assert_eq!(self.kv.num_tokens(seq), Some(cells.len()));
            if self.kv.is_swapped(seq) {
                continue;
            }
            let table = self.kv.block_table(seq).unwrap();
            for (pos, &cell) in cells.iter().enumerate() {
                let slot = slot_of(table, b, pos).unwrap() as usize;
                prop_assert_eq!(self.gpu[slot], Some(cell), "{} position {}", seq, pos);
            }
        }
        Ok(())
    }

    fn free_all(&mut self) -> Result<(), TestCaseError> {
        self.pending.clear();
        self.drafts.clear();
        let ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        for s in ids {
            prop_assert_eq!(self.kv.free(s), Ok(()));
        }
        self.seqs.clear();
        let u = self.kv.usage();
        prop_assert_eq!(u.used_blocks, 0, "blocks leaked");
        prop_assert_eq!(u.used_cpu_blocks, 0, "CPU blocks leaked");
        prop_assert_eq!(u.token_slots, 0);
        self.check()
    }
}

fn run<A: KvAllocator>(kv: A, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut model = Model::new(kv);
    for op in ops {
        model.apply(op)?;
    }
    model.free_all()
}

proptest! {
    // Cheap cases: many of them reach the rarer interleavings (a swap-in
    // reusing cached blocks next to evicted duplicates, say).
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn paged_allocator_never_leaks_or_corrupts(
        block_size in prop::sample::select(vec![1usize, 2, 4, 8]),
        num_gpu_blocks in 2usize..24,
        num_cpu_blocks in 0usize..24,
        caching in any::<bool>(),
        ops in prop::collection::vec(op_strategy(), 1..80),
    ) {
        let kv = PagedAllocator::new(PagedConfig { num_gpu_blocks, num_cpu_blocks, block_size, enable_prefix_caching: caching }).unwrap();
        run(kv, &ops)?;
    }

    #[test]
    fn contiguous_allocator_never_leaks_or_corrupts(
        block_size in prop::sample::select(vec![1usize, 2, 4]),
        num_gpu_blocks in 8usize..64,
        num_cpu_blocks in 0usize..24,
        reservation in prop::sample::select(vec![Reservation::Fixed(48), Reservation::NextPowerOfTwo, Reservation::Exact]),
        ops in prop::collection::vec(op_strategy(), 1..80),
    ) {
        let kv = ContiguousAllocator::new(ContiguousConfig { num_gpu_blocks, num_cpu_blocks, block_size, reservation }).unwrap();
        run(kv, &ops)?;
    }
}

/// The scenario property tests rarely hit on their own: many forks of one
/// prompt, each writing its own tokens, all reading back their own content.
#[test]
fn many_forks_each_see_their_own_tokens() {
    let kv = PagedAllocator::new(PagedConfig {
        num_gpu_blocks: 64,
        num_cpu_blocks: 8,
        block_size: 4,
        enable_prefix_caching: true,
    })
    .unwrap();
    let mut ops = vec![Op::Start { base: 1, prefix_len: 10, tail: vec![], key: Some(1), lookup: true }];
    for _ in 0..6 {
        ops.push(Op::Fork { seq: 0 });
    }
    for round in 0..9 {
        for s in 0..7 {
            ops.push(Op::Append { seq: s, tokens: vec![(s as u32 + round) % 3] });
        }
        ops.push(Op::SwapOut { seq: round as usize });
        ops.push(Op::SwapIn { seq: round as usize, tokens: vec![2] });
    }
    run(kv, &ops).unwrap();
}
