use pagoda_paged_kv::{ContiguousAllocator, ContiguousConfig, PagedAllocator, PagedConfig, Reservation};

use super::*;
use crate::output::BlockTableUpdate;
use crate::policy::Policy;

fn paged(blocks: usize, cpu: usize, b: usize, caching: bool) -> PagedAllocator {
    PagedAllocator::new(PagedConfig {
        num_gpu_blocks: blocks,
        num_cpu_blocks: cpu,
        block_size: b,
        enable_prefix_caching: caching,
    })
    .unwrap()
}

fn config(batched: usize, seqs: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_batched_tokens: batched,
        max_num_seqs: seqs,
        max_model_len: 256,
        ..Default::default()
    }
}

fn req(id: u64, prompt_len: usize, max_tokens: usize) -> NewRequest {
    NewRequest::new(RequestId(id), (0..prompt_len as u32).map(|t| t + 100 * id as u32).collect(), max_tokens)
}

/// One engine step: schedule, "sample" `token` for every sampling sequence,
/// apply. Checks the invariants after.
fn step<A: KvAllocator>(s: &mut Scheduler<A>, token: TokenId) -> (SchedulerOutput, Vec<SeqUpdate>) {
    let out = s.schedule().unwrap();
    let sampled: Vec<(SeqId, TokenId)> = out.sampling_seqs().map(|id| (id, token)).collect();
    let updates = if out.is_empty() { Vec::new() } else { s.update_from_output(&out, &sampled).unwrap() };
    s.check_invariants().unwrap();
    (out, updates)
}

fn run_to_end<A: KvAllocator>(s: &mut Scheduler<A>, max_steps: usize) -> usize {
    for i in 0..max_steps {
        if !s.has_unfinished() {
            return i;
        }
        step(s, 1);
    }
    panic!("not finished after {max_steps} steps");
}

#[test]
fn add_request_refuses_what_could_never_run() {
    let mut s = Scheduler::new(config(64, 4), paged(4, 0, 4, false)).unwrap();
    let e = |s: &mut Scheduler<_>, r| s.add_request(r).unwrap_err();
    assert_eq!(e(&mut s, req(1, 0, 1)), AddRequestError::EmptyPrompt);
    assert_eq!(e(&mut s, req(1, 257, 1)), AddRequestError::PromptTooLong { len: 257, max_model_len: 256 });
    assert_eq!(e(&mut s, req(1, 4, 0)), AddRequestError::ZeroMaxTokens);
    assert_eq!(
        e(&mut s, NewRequest { min_tokens: 5, ..req(1, 4, 4) }),
        AddRequestError::MinTokensExceedsMax { min_tokens: 5, max_tokens: 4 }
    );
    assert_eq!(e(&mut s, NewRequest { n: 0, ..req(1, 4, 4) }), AddRequestError::ZeroSamples);
    assert_eq!(
        e(&mut s, NewRequest { n: 5, ..req(1, 4, 4) }),
        AddRequestError::TooManySamples { n: 5, max_num_seqs: 4 }
    );
    // 16 slots in the pool: prompt 10 + 7 new tokens can never fit.
    assert_eq!(e(&mut s, req(1, 10, 7)), AddRequestError::CannotFit { tokens: 17, capacity_tokens: 16 });
    s.add_request(req(1, 10, 6)).unwrap();
    assert_eq!(e(&mut s, req(1, 1, 1)), AddRequestError::DuplicateRequest(RequestId(1)));
    assert_eq!(s.num_waiting(), 1);
    assert!(
        Scheduler::new(SchedulerConfig { max_num_seqs: 0, ..config(1, 1) }, paged(1, 0, 1, false)).is_err()
    );
    assert!(Scheduler::new(
        SchedulerConfig { enable_chunked_prefill: false, ..config(64, 4) },
        paged(1, 0, 1, false)
    )
    .is_err());
}

#[test]
fn one_request_prefills_then_decodes_until_max_tokens() {
    let mut s = Scheduler::new(config(64, 4), paged(8, 0, 4, false)).unwrap();
    s.add_request(req(1, 6, 3)).unwrap();
    let (out, up) = step(&mut s, 7);
    assert_eq!(out.scheduled.len(), 1);
    let e = &out.scheduled[0];
    assert_eq!((e.start_position, e.token_ids.len(), e.seq_len()), (0, 6, 6));
    assert_eq!(e.table_update.keep, 0, "a new sequence's whole table is sent");
    assert_eq!(e.table_update.append.len(), 2);
    let b = e.table_update.append.clone();
    assert_eq!(
        e.slot_mapping,
        vec![
            b[0] as i64 * 4,
            b[0] as i64 * 4 + 1,
            b[0] as i64 * 4 + 2,
            b[0] as i64 * 4 + 3,
            b[1] as i64 * 4,
            b[1] as i64 * 4 + 1
        ]
    );
    assert_eq!(e.sample_for, vec![e.seq_id]);
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].finish_reason, None);
    let id = e.seq_id;
    let (out, _) = step(&mut s, 8);
    assert_eq!(out.num_decodes, 1);
    assert_eq!(out.scheduled[0].token_ids, vec![7]);
    assert_eq!(out.scheduled[0].start_position, 6);
    let (_, up) = step(&mut s, 9);
    assert_eq!(up[0].finish_reason, Some(FinishReason::Length));
    assert_eq!(s.seq(id).map(|x| x.output_token_ids().to_vec()), None, "finished sequences are forgotten");
    assert!(!s.has_unfinished());
    assert_eq!(s.kv_usage().used_blocks, 0, "blocks freed at once");
}

#[test]
fn stop_conditions() {
    let mut s = Scheduler::new(config(64, 8), paged(32, 0, 4, false)).unwrap();
    let base = |id| NewRequest { eos_token_ids: vec![2], stop_token_ids: vec![5], ..req(id, 3, 10) };
    s.add_request(base(1)).unwrap();
    s.add_request(NewRequest { ignore_eos: true, ..base(2) }).unwrap();
    s.add_request(NewRequest { min_tokens: 2, ..base(3) }).unwrap();
    let (_, up) = step(&mut s, 2); // everyone samples EOS as the first token
    let reason =
        |up: &[SeqUpdate], r| up.iter().find(|u| u.request_id == RequestId(r)).and_then(|u| u.finish_reason);
    assert_eq!(reason(&up, 1), Some(FinishReason::Eos(2)));
    assert_eq!(reason(&up, 2), None, "ignore_eos");
    assert_eq!(reason(&up, 3), None, "min_tokens not reached");
    let (_, up) = step(&mut s, 5); // a stop token
    assert_eq!(reason(&up, 2), Some(FinishReason::StopToken(5)), "stop tokens apply despite ignore_eos");
    assert_eq!(reason(&up, 3), Some(FinishReason::StopToken(5)));
    assert!(!s.has_unfinished());

    // The model length ends a sequence whatever max_tokens says.
    let cfg = SchedulerConfig { max_model_len: 8, ..config(64, 4) };
    let mut s = Scheduler::new(cfg, paged(8, 0, 4, false)).unwrap();
    s.add_request(req(1, 6, 100)).unwrap();
    step(&mut s, 1);
    let (_, up) = step(&mut s, 1);
    assert_eq!(up[0].finish_reason, Some(FinishReason::Length));
}

#[test]
fn the_finish_reason_names_the_stop_that_matched() {
    let mut s = Scheduler::new(config(64, 8), paged(32, 0, 4, false)).unwrap();
    // Two EOS ids (a model's generation config may list several); 3 is also a stop token.
    let base = |id| NewRequest { eos_token_ids: vec![2, 3], stop_token_ids: vec![3, 5], ..req(id, 3, 10) };
    for id in 1..=3 {
        s.add_request(base(id)).unwrap();
    }
    let out = s.schedule().unwrap();
    let sampled: Vec<(SeqId, TokenId)> =
        out.scheduled.iter().zip([2, 3, 5]).map(|(e, t)| (e.sample_for[0], t)).collect();
    let up = s.update_from_output(&out, &sampled).unwrap();
    let reason =
        |r| up.iter().find(|u: &&SeqUpdate| u.request_id == RequestId(r)).and_then(|u| u.finish_reason);
    assert_eq!(reason(1), Some(FinishReason::Eos(2)));
    assert_eq!(reason(2), Some(FinishReason::StopToken(3)), "a token in both lists is the request's stop");
    assert_eq!(reason(3), Some(FinishReason::StopToken(5)));
    // Any EOS id ends a sample, and none does under ignore_eos.
    s.add_request(NewRequest { eos_token_ids: vec![2, 3], ..req(4, 3, 10) }).unwrap();
    s.add_request(NewRequest { eos_token_ids: vec![2, 3], ignore_eos: true, ..req(5, 3, 10) }).unwrap();
    let (_, up) = step(&mut s, 3);
    let reason = |r| up.iter().find(|u| u.request_id == RequestId(r)).and_then(|u| u.finish_reason);
    assert_eq!(reason(4), Some(FinishReason::Eos(3)));
    assert_eq!(reason(5), None);
}

#[test]
fn chunked_prefill_splits_a_long_prompt_and_samples_only_at_its_end() {
    let mut s = Scheduler::new(config(8, 4), paged(16, 0, 4, false)).unwrap();
    s.add_request(req(1, 20, 2)).unwrap();
    let mut starts = vec![];
    for _ in 0..3 {
        let (out, up) = step(&mut s, 1);
        let e = &out.scheduled[0];
        starts.push((e.start_position, e.token_ids.len(), e.sample_for.len()));
        assert_eq!(up.len(), e.sample_for.len());
        assert!(out.num_batched_tokens <= 8);
    }
    assert_eq!(starts, vec![(0, 8, 0), (8, 8, 0), (16, 4, 1)]);
}

#[test]
fn decodes_go_first_and_a_prefill_takes_what_is_left() {
    let mut s = Scheduler::new(config(10, 8), paged(64, 0, 4, false)).unwrap();
    for id in 0..3 {
        s.add_request(req(id, 2, 10)).unwrap();
    }
    step(&mut s, 1); // three 2-token prefills
    s.add_request(req(9, 30, 2)).unwrap();
    let (out, _) = step(&mut s, 1);
    assert_eq!(out.num_decodes, 3);
    assert!(out.scheduled[..3].iter().all(|e| e.token_ids.len() == 1));
    assert_eq!(out.scheduled[3].token_ids.len(), 7, "the prefill gets the 7 tokens left");
    assert_eq!(out.num_batched_tokens, 10);
}

#[test]
fn max_num_seqs_and_budget_are_never_exceeded() {
    let mut s = Scheduler::new(config(6, 2), paged(64, 0, 4, false)).unwrap();
    for id in 0..5 {
        s.add_request(req(id, 3, 4)).unwrap();
    }
    let (out, _) = step(&mut s, 1);
    assert_eq!(out.scheduled.len(), 2);
    assert_eq!(out.num_batched_tokens, 6);
    assert_eq!(s.num_running(), 2);
    assert_eq!(s.num_waiting(), 3);
    let steps = run_to_end(&mut s, 100);
    assert!(steps > 5);
}

#[test]
fn without_chunking_a_prompt_waits_for_a_budget_that_holds_it_whole() {
    let cfg = SchedulerConfig { enable_chunked_prefill: false, max_model_len: 16, ..config(16, 4) };
    let mut s = Scheduler::new(cfg, paged(64, 0, 4, false)).unwrap();
    s.add_request(req(1, 10, 4)).unwrap();
    s.add_request(req(2, 10, 4)).unwrap();
    let (out, _) = step(&mut s, 1);
    assert_eq!(out.scheduled.len(), 1, "the second prompt does not fit in the 6 tokens left");
    let (out, _) = step(&mut s, 1);
    assert_eq!(out.scheduled.len(), 2);
    assert_eq!(out.scheduled[1].token_ids.len(), 10);
}

#[test]
fn long_prefill_threshold_caps_each_chunk() {
    let cfg = SchedulerConfig { long_prefill_token_threshold: Some(5), ..config(64, 4) };
    let mut s = Scheduler::new(cfg, paged(64, 0, 4, false)).unwrap();
    s.add_request(req(1, 12, 2)).unwrap();
    s.add_request(req(2, 3, 2)).unwrap();
    let (out, _) = step(&mut s, 1);
    let lens: Vec<usize> = out.scheduled.iter().map(|e| e.token_ids.len()).collect();
    assert_eq!(lens, vec![5, 3]);
}

/// Two requests whose growth overflows an 6-block pool of 4-token blocks.
fn tight_pool(mode: PreemptionMode, cpu_blocks: usize) -> Scheduler<PagedAllocator> {
    let cfg = SchedulerConfig { preemption_mode: mode, ..config(64, 4) };
    let mut s = Scheduler::new(cfg, paged(6, cpu_blocks, 4, false)).unwrap();
    s.add_request(req(1, 8, 12)).unwrap();
    s.add_request(req(2, 8, 12)).unwrap();
    s
}

#[test]
fn recompute_preemption_requeues_the_latest_and_resumes_it_first() {
    let mut s = tight_pool(PreemptionMode::Recompute, 0);
    let (out, _) = step(&mut s, 1);
    assert_eq!(out.scheduled.len(), 2); // 4 blocks used
    let victim = out.scheduled[1].seq_id;
    let mut preempted_at = None;
    for i in 0..8 {
        let (out, _) = step(&mut s, 1);
        if !out.preempted.is_empty() {
            assert_eq!(out.preempted, vec![victim], "the later request is the victim");
            assert!(out.scheduled.iter().all(|e| e.seq_id != victim));
            preempted_at = Some(i);
            break;
        }
    }
    assert!(preempted_at.is_some());
    let seq = s.seq(victim).unwrap();
    assert_eq!(seq.status(), SeqStatus::Waiting);
    assert_eq!(seq.num_computed_tokens(), 0);
    let kept = seq.output_token_ids().len();
    assert!(kept > 0, "generated tokens are kept");
    // A newer request arrives; the preempted one still goes first.
    s.add_request(req(3, 2, 1)).unwrap();
    let mut resumed = false;
    for _ in 0..40 {
        let (out, _) = step(&mut s, 1);
        let victim_entry = out.scheduled.iter().position(|e| e.seq_id == victim && e.start_position == 0);
        let newer_entry = out.scheduled.iter().position(|e| e.request_id == RequestId(3));
        if let Some(v) = victim_entry {
            // Its prefill recomputes prompt and kept outputs together.
            assert_eq!(out.scheduled[v].token_ids.len(), 8 + kept);
            // With a new table, sent whole.
            let table = s.allocator().block_table(victim).unwrap();
            assert_eq!(out.scheduled[v].table_update, BlockTableUpdate { keep: 0, append: table.to_vec() });
            resumed = true;
            break;
        }
        assert_eq!(newer_entry, None, "the newer request must not overtake the preempted one");
    }
    assert!(resumed);
    run_to_end(&mut s, 100);
    assert_eq!(s.stats().num_recompute_preemptions, s.stats().num_preemptions);
    assert_eq!(s.kv_usage().used_blocks, 0);
}

#[test]
fn swap_preemption_moves_blocks_out_and_back() {
    let mut s = tight_pool(PreemptionMode::Swap, 16);
    step(&mut s, 1);
    let mut swapped_out = None;
    for _ in 0..10 {
        let (out, _) = step(&mut s, 1);
        if !out.blocks_to_swap_out.is_empty() {
            assert!(out.blocks_to_swap_in.is_empty(), "never both in one step");
            swapped_out = Some(out.preempted[0]);
            break;
        }
    }
    let victim = swapped_out.expect("a swap-out happened");
    assert_eq!(s.seq(victim).unwrap().status(), SeqStatus::Swapped);
    assert_eq!(s.num_swapped(), 1);
    let mut swapped_in = false;
    for _ in 0..40 {
        let (out, _) = step(&mut s, 1);
        if !out.blocks_to_swap_in.is_empty() {
            let e = out.scheduled.iter().find(|e| e.seq_id == victim).unwrap();
            assert_eq!(e.token_ids.len(), 1, "a swapped sequence resumes decoding");
            let table = s.allocator().block_table(victim).unwrap();
            assert_eq!(e.table_update, BlockTableUpdate { keep: 0, append: table.to_vec() });
            swapped_in = true;
            break;
        }
    }
    assert!(swapped_in);
    run_to_end(&mut s, 100);
    assert_eq!(s.stats().num_swap_preemptions, 1);
    let u = s.kv_usage();
    assert_eq!((u.used_blocks, u.used_cpu_blocks), (0, 0));
}

#[test]
fn swap_falls_back_to_recompute_when_the_cpu_pool_is_full() {
    let mut s = tight_pool(PreemptionMode::Swap, 1);
    for _ in 0..10 {
        let (out, _) = step(&mut s, 1);
        assert!(out.blocks_to_swap_out.is_empty());
    }
    assert!(s.stats().num_recompute_preemptions >= 1);
    assert_eq!(s.stats().num_swap_preemptions, 0);
    run_to_end(&mut s, 100);
}

#[test]
fn priority_policy_serves_and_protects_the_most_urgent() {
    let cfg = SchedulerConfig { policy: Policy::Priority, ..config(64, 1) };
    let mut s = Scheduler::new(cfg, paged(64, 0, 4, false)).unwrap();
    s.add_request(NewRequest { priority: 5, ..req(1, 4, 2) }).unwrap();
    s.add_request(NewRequest { priority: -1, ..req(2, 4, 2) }).unwrap();
    let (out, _) = step(&mut s, 1);
    assert_eq!(out.scheduled[0].request_id, RequestId(2));
    assert_eq!(s.policy_name(), "priority");

    // Under memory pressure the worst priority is preempted even if it came first.
    let cfg = SchedulerConfig { policy: Policy::Priority, ..config(64, 4) };
    let mut s = Scheduler::new(cfg, paged(6, 0, 4, false)).unwrap();
    s.add_request(NewRequest { priority: 9, ..req(1, 8, 12) }).unwrap();
    s.add_request(NewRequest { priority: 0, ..req(2, 8, 12) }).unwrap();
    let mut victim = None;
    for _ in 0..10 {
        let (out, _) = step(&mut s, 1);
        if let Some(&v) = out.preempted.first() {
            victim = Some(s.seq(v).unwrap().request_id());
            break;
        }
    }
    assert_eq!(victim, Some(RequestId(1)));
}

#[derive(Debug)]
struct ShortestPromptFirst;

impl SchedulingPolicy for ShortestPromptFirst {
    fn name(&self) -> &str {
        "spf"
    }
    fn rank(&self, r: &RequestView) -> RankKey {
        RankKey(r.num_prompt_tokens as i64, r.arrival_index)
    }
}

#[test]
fn a_custom_policy_plugs_in() {
    let mut s =
        Scheduler::with_policy(config(64, 1), paged(64, 0, 4, false), Box::new(ShortestPromptFirst)).unwrap();
    s.add_request(req(1, 9, 1)).unwrap();
    s.add_request(req(2, 3, 1)).unwrap();
    let (out, _) = step(&mut s, 1);
    assert_eq!(out.scheduled[0].request_id, RequestId(2));
}

#[test]
fn prefix_cache_skips_computed_blocks() {
    let mut s = Scheduler::new(config(64, 4), paged(32, 0, 4, true)).unwrap();
    s.add_request(req(1, 10, 1)).unwrap();
    run_to_end(&mut s, 10);
    let mut again = req(2, 10, 1);
    again.prompt_token_ids = req(1, 10, 1).prompt_token_ids;
    s.add_request(again).unwrap();
    let (out, _) = step(&mut s, 1);
    assert_eq!(out.scheduled[0].start_position, 8);
    assert_eq!(out.scheduled[0].token_ids.len(), 2);
    let stats = s.prefix_cache_stats();
    assert_eq!((stats.queried_tokens, stats.hit_tokens), (20, 8));
    // A different salt shares nothing.
    let mut salted = req(3, 10, 1);
    salted.prompt_token_ids = req(1, 10, 1).prompt_token_ids;
    salted.cache_salt = Some(42);
    s.add_request(salted).unwrap();
    let (out, _) = step(&mut s, 1);
    assert_eq!(out.scheduled[0].start_position, 0);
}

#[test]
fn parallel_samples_fork_after_the_prompt_and_copy_on_write() {
    let mut s = Scheduler::new(config(64, 4), paged(32, 0, 4, false)).unwrap();
    s.add_request(NewRequest { n: 3, ..req(1, 6, 3) }).unwrap();
    let out = s.schedule().unwrap();
    assert_eq!(out.scheduled.len(), 1, "the prompt is prefilled once");
    let e = &out.scheduled[0];
    assert_eq!(e.sample_for.len(), 3);
    assert_eq!(e.sample_for[0], e.seq_id);
    let sampled: Vec<_> = e.sample_for.iter().enumerate().map(|(i, &id)| (id, 10 + i as u32)).collect();
    let up = s.update_from_output(&out, &sampled).unwrap();
    assert_eq!(
        up.iter().map(|u| (u.sample_index, u.new_token)).collect::<Vec<_>>(),
        vec![(0, 10), (1, 11), (2, 12)]
    );
    s.check_invariants().unwrap();
    assert_eq!(s.num_running(), 3);
    assert_eq!(s.kv_usage().used_blocks, 2, "all samples share the prompt's blocks");
    let (out, _) = step(&mut s, 1);
    assert_eq!(out.num_decodes, 3);
    // The last block (2 of 4 slots filled) is shared: two of the three get a copy.
    assert_eq!(out.blocks_to_copy.len(), 2);
    let tables: Vec<_> =
        out.scheduled.iter().map(|e| s.allocator().block_table(e.seq_id).unwrap().to_vec()).collect();
    assert!(tables.iter().all(|t| t[0] == tables[0][0]), "full blocks stay shared");
    // Only the change is sent: the two copies replace the last entry of the
    // table the runner copied from the parent; the third sample's is unchanged.
    let mut updates: Vec<_> =
        out.scheduled.iter().map(|e| (e.table_update.keep, e.table_update.append.len())).collect();
    updates.sort();
    assert_eq!(updates, vec![(1, 1), (1, 1), (2, 0)]);
    // Each sample keeps its own first token.
    for (i, &id) in sampled.iter().map(|(id, _)| id).enumerate() {
        assert_eq!(s.seq(id).unwrap().output_token_ids(), &[10 + i as u32, 1]);
    }
    // Finishing one sample leaves the request alive.
    assert!(s.finish_seq(sampled[1].0));
    assert!(s.has_unfinished());
    assert_eq!(s.request_seqs(RequestId(1)).len(), 2);
    run_to_end(&mut s, 10);
    assert_eq!(s.kv_usage().used_blocks, 0);
    assert_eq!(s.stats().num_requests_finished, 1);
}

#[test]
fn parallel_samples_without_sharing_recompute_the_prompt() {
    let kv = ContiguousAllocator::new(ContiguousConfig {
        num_gpu_blocks: 64,
        num_cpu_blocks: 0,
        block_size: 4,
        reservation: Reservation::Fixed(64),
    })
    .unwrap();
    let cfg = SchedulerConfig { max_model_len: 64, ..config(64, 4) };
    let mut s = Scheduler::new(cfg, kv).unwrap();
    s.add_request(NewRequest { n: 2, ..req(1, 6, 3) }).unwrap();
    step(&mut s, 5);
    assert_eq!(s.num_running(), 1);
    assert_eq!(s.num_waiting(), 1, "the second sample could not share the prompt's blocks");
    let (out, _) = step(&mut s, 1);
    let re = out.scheduled.iter().find(|e| e.start_position == 0).unwrap();
    assert_eq!(re.token_ids.len(), 7, "prompt plus its first sampled token");
    run_to_end(&mut s, 10);
}

#[test]
fn abort_frees_everything_at_once_from_any_queue() {
    let mut s = tight_pool(PreemptionMode::Swap, 16);
    s.add_request(req(3, 4, 4)).unwrap();
    for _ in 0..6 {
        step(&mut s, 1);
    }
    for r in 1..=3 {
        let ids = s.abort_request(RequestId(r));
        assert!(ids.iter().all(|&id| s.seq(id).is_none()));
        s.check_invariants().unwrap();
    }
    assert!(!s.has_unfinished());
    let u = s.kv_usage();
    assert_eq!((u.used_blocks, u.used_cpu_blocks), (0, 0));
    assert!(s.abort_request(RequestId(1)).is_empty());
}

#[test]
fn abort_between_schedule_and_update_is_harmless() {
    let mut s = Scheduler::new(config(64, 4), paged(16, 0, 4, false)).unwrap();
    s.add_request(req(1, 5, 4)).unwrap();
    s.add_request(req(2, 5, 4)).unwrap();
    let out = s.schedule().unwrap();
    s.abort_request(RequestId(1));
    let sampled: Vec<_> = out.sampling_seqs().map(|id| (id, 3)).collect();
    let up = s.update_from_output(&out, &sampled).unwrap();
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].request_id, RequestId(2));
    s.check_invariants().unwrap();
}

#[test]
fn update_validates_before_applying() {
    let mut s = Scheduler::new(config(64, 4), paged(16, 0, 4, false)).unwrap();
    s.add_request(req(1, 5, 4)).unwrap();
    let out = s.schedule().unwrap();
    let id = out.scheduled[0].seq_id;
    assert_eq!(s.schedule().unwrap_err(), SchedulerError::StepNotApplied(1));
    assert_eq!(s.update_from_output(&out, &[]), Err(UpdateError::MissingSample(id)));
    assert_eq!(s.update_from_output(&out, &[(SeqId(99), 1)]), Err(UpdateError::UnexpectedSample(SeqId(99))));
    assert_eq!(s.update_from_output(&out, &[(id, 1), (id, 2)]), Err(UpdateError::DuplicateSample(id)));
    let stale = SchedulerOutput { step: 7, ..out.clone() };
    assert_eq!(
        s.update_from_output(&stale, &[(id, 1)]),
        Err(UpdateError::StaleOutput { got: 7, expected: 1 })
    );
    assert!(s.seq(id).unwrap().output_token_ids().is_empty(), "nothing applied");
    assert_eq!(s.seq(id).unwrap().num_awaited_tokens(), 1);
    s.update_from_output(&out, &[(id, 1)]).unwrap();
    assert_eq!(s.update_from_output(&out, &[(id, 1)]), Err(UpdateError::AlreadyApplied(1)));
    assert_eq!(s.seq(id).unwrap().output_token_ids(), [1]);
    assert_eq!(s.seq(id).unwrap().num_awaited_tokens(), 0);
}

#[test]
fn an_empty_step_needs_no_update() {
    let mut s = Scheduler::new(config(64, 4), paged(16, 0, 4, false)).unwrap();
    let out = s.schedule().unwrap();
    assert!(out.is_empty());
    assert_eq!(s.update_from_output(&out, &[]), Ok(vec![]));
    assert!(s.schedule().unwrap().is_empty());
    assert_eq!(s.stats().num_steps, 2);
}

fn async_config(batched: usize, seqs: usize) -> SchedulerConfig {
    SchedulerConfig { async_scheduling: true, ..config(batched, seqs) }
}

#[test]
fn async_scheduling_runs_one_step_ahead_of_the_tokens() {
    let mut s = Scheduler::new(async_config(64, 4), paged(8, 0, 4, true)).unwrap();
    s.add_request(req(1, 5, 4)).unwrap();
    let s1 = s.schedule().unwrap();
    let id = s1.scheduled[0].seq_id;
    assert!(s.can_schedule(), "one unapplied step is allowed");
    let s2 = s.schedule().unwrap();
    assert!(!s.can_schedule());
    assert_eq!(s.schedule().unwrap_err(), SchedulerError::StepNotApplied(1));
    let e = &s2.scheduled[0];
    assert!(e.token_from_previous_step);
    assert_eq!((e.start_position, e.token_ids.clone(), e.sample_for.clone()), (5, vec![0], vec![id]));
    assert_eq!(s.seq(id).unwrap().num_awaited_tokens(), 2);
    s.check_invariants().unwrap();
    // Steps apply in order: the newer one is not next.
    assert_eq!(s.update_from_output(&s2, &[(id, 8)]), Err(UpdateError::StaleOutput { got: 2, expected: 1 }));
    assert_eq!(s.update_from_output(&s1, &[(id, 7)]).unwrap()[0].new_token, 7);
    s.check_invariants().unwrap();
    let s3 = s.schedule().unwrap();
    assert_eq!(s3.scheduled[0].start_position, 6);
    s.update_from_output(&s2, &[(id, 8)]).unwrap();
    let s4 = s.schedule().unwrap();
    assert_eq!(s4.scheduled[0].start_position, 7);
    s.update_from_output(&s3, &[(id, 9)]).unwrap();
    // The token awaited from s4 is the fourth and last: nothing to schedule.
    let s5 = s.schedule().unwrap();
    assert!(s5.is_empty());
    let up = s.update_from_output(&s4, &[(id, 10)]).unwrap();
    assert_eq!(up[0].finish_reason, Some(FinishReason::Length));
    assert!(!s.has_unfinished());
    s.check_invariants().unwrap();
    // Blocks whose last slot was filled before its token was known are cached
    // under the right hash once it is: prompt + 3 outputs = two full blocks.
    let mut next: Vec<TokenId> = req(1, 5, 1).prompt_token_ids;
    next.extend([7, 8, 9, 42]);
    assert_eq!(s.allocator().lookup_prefix(&next, None).num_cached_tokens, 8);
}

#[test]
fn async_scheduling_drops_the_step_after_a_stop_token() {
    let mut s = Scheduler::new(async_config(64, 4), paged(8, 0, 4, false)).unwrap();
    s.add_request(NewRequest { eos_token_ids: vec![2], ..req(1, 3, 10) }).unwrap();
    s.add_request(req(2, 3, 10)).unwrap();
    let s1 = s.schedule().unwrap();
    let (a, b) = (s1.scheduled[0].seq_id, s1.scheduled[1].seq_id);
    let s2 = s.schedule().unwrap();
    assert_eq!(s2.scheduled.len(), 2);
    let up = s.update_from_output(&s1, &[(a, 2), (b, 2)]).unwrap();
    assert_eq!(up[0].finish_reason, Some(FinishReason::Eos(2)), "EOS ends the first");
    assert_eq!(up[1].finish_reason, None);
    let s3 = s.schedule().unwrap();
    assert_eq!(s3.scheduled.len(), 1, "the finished sequence is not scheduled again");
    // Its token from s2 was computed for nothing and is dropped.
    let up = s.update_from_output(&s2, &[(a, 5), (b, 5)]).unwrap();
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].seq_id, b);
    s.update_from_output(&s3, &[(b, 6)]).unwrap();
    s.check_invariants().unwrap();
    s.abort_request(RequestId(2));
    assert_eq!(s.kv_usage().used_blocks, 0);
}

#[test]
fn async_scheduling_waits_for_a_step_that_forks() {
    let mut s = Scheduler::new(async_config(64, 4), paged(8, 0, 4, false)).unwrap();
    s.add_request(NewRequest { n: 2, ..req(1, 3, 2) }).unwrap();
    let s1 = s.schedule().unwrap();
    assert!(s1.forks());
    assert!(!s.can_schedule());
    assert_eq!(s.schedule().unwrap_err(), SchedulerError::StepNotApplied(1));
    let sampled: Vec<_> = s1.sampling_seqs().map(|q| (q, 4)).collect();
    s.update_from_output(&s1, &sampled).unwrap();
    let s2 = s.schedule().unwrap();
    assert_eq!(s2.scheduled.len(), 2);
    assert!(s2.scheduled.iter().all(|e| !e.token_from_previous_step));
    assert!(s.can_schedule());
}

#[test]
fn discarding_unapplied_steps_requeues_their_sequences() {
    let mut s = Scheduler::new(async_config(64, 4), paged(8, 0, 4, true)).unwrap();
    s.add_request(req(1, 5, 6)).unwrap();
    s.add_request(req(2, 3, 6)).unwrap();
    let s1 = s.schedule().unwrap();
    let sampled: Vec<_> = s1.sampling_seqs().map(|q| (q, 1)).collect();
    s.update_from_output(&s1, &sampled).unwrap();
    let _s2 = s.schedule().unwrap();
    let _s3 = s.schedule().unwrap(); // ahead of s2, which then fails
    let requeued = s.discard_unapplied();
    assert_eq!(requeued.len(), 2);
    s.check_invariants().unwrap();
    assert_eq!(s.num_waiting(), 2);
    assert_eq!(s.kv_usage().used_blocks, 0);
    for q in requeued {
        assert_eq!(s.seq(q).unwrap().output_token_ids(), [1], "known tokens are kept");
    }
    assert_eq!(run_to_end(&mut s, 20), 5, "a recompute that samples the second token, then 4 decodes");
}

// ---- concurrent partial prefills (short prompts beside long ones) ----------

/// Budget 64, max_model_len 256: prompts above 10 tokens (4%) are long.
fn partial_config(max_num_partial_prefills: usize) -> SchedulerConfig {
    SchedulerConfig { max_num_partial_prefills, ..config(64, 8) }
}

#[test]
fn a_short_prompt_starts_beside_a_long_prefill() {
    let mut s = Scheduler::new(partial_config(4), paged(128, 0, 4, false)).unwrap();
    s.add_request(req(1, 200, 2)).unwrap();
    let (out, _) = step(&mut s, 1);
    assert_eq!(out.scheduled[0].token_ids.len(), 64, "alone, a long prompt takes the whole budget");
    s.add_request(req(2, 4, 2)).unwrap();
    let (out, up) = step(&mut s, 1);
    let lens: Vec<usize> = out.scheduled.iter().map(|e| e.token_ids.len()).collect();
    assert_eq!(lens, vec![10, 4], "the long chunk is capped at the threshold; the short prompt runs whole");
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].request_id, RequestId(2), "its first token comes at once");
    let (out, _) = step(&mut s, 1);
    assert_eq!(
        out.scheduled.last().unwrap().token_ids.len(),
        63,
        "nothing waits: the long one takes the rest"
    );
}

#[test]
fn one_partial_prefill_keeps_the_fcfs_behaviour() {
    let mut s = Scheduler::new(partial_config(1), paged(128, 0, 4, false)).unwrap();
    s.add_request(req(1, 200, 2)).unwrap();
    step(&mut s, 1);
    s.add_request(req(2, 4, 2)).unwrap();
    for _ in 0..2 {
        let (out, _) = step(&mut s, 1);
        assert_eq!(out.scheduled.len(), 1, "the running prefill takes the whole budget");
        assert_eq!(out.scheduled[0].token_ids.len(), 64);
    }
}

#[test]
fn long_prompts_beyond_max_long_partial_prefills_let_short_ones_pass() {
    let mut s = Scheduler::new(partial_config(4), paged(256, 0, 4, false)).unwrap();
    s.add_request(req(1, 200, 2)).unwrap();
    s.add_request(req(2, 200, 2)).unwrap();
    s.add_request(req(3, 4, 2)).unwrap();
    let (out, _) = step(&mut s, 1);
    assert_eq!(out.scheduled.len(), 1, "the first long prompt takes the whole budget");
    let (out, _) = step(&mut s, 1);
    let reqs: Vec<u64> = out.scheduled.iter().map(|e| e.request_id.0).collect();
    assert_eq!(reqs, vec![1, 3], "the second long prompt waits; the short one behind it goes");
    assert_eq!(out.scheduled[0].token_ids.len(), 10);
    assert_eq!(s.seq(s.request_seqs(RequestId(2))[0]).unwrap().status(), SeqStatus::Waiting);
    // With two long partial prefills allowed, the second starts at once.
    let cfg = SchedulerConfig { max_long_partial_prefills: 2, ..partial_config(4) };
    let mut s = Scheduler::new(cfg, paged(256, 0, 4, false)).unwrap();
    s.add_request(req(1, 200, 2)).unwrap();
    s.add_request(req(2, 200, 2)).unwrap();
    step(&mut s, 1);
    let (out, _) = step(&mut s, 1);
    let reqs: Vec<u64> = out.scheduled.iter().map(|e| e.request_id.0).collect();
    assert_eq!(reqs, vec![1, 2]);
    run_to_end(&mut s, 200);
}

#[test]
fn partial_prefill_limits_are_validated() {
    let bad = |cfg: SchedulerConfig| Scheduler::new(cfg, paged(8, 0, 4, false)).err().unwrap();
    assert_eq!(bad(partial_config(0)), ConfigError::Zero("max_num_partial_prefills"));
    assert_eq!(
        bad(SchedulerConfig { max_long_partial_prefills: 0, ..partial_config(4) }),
        ConfigError::Zero("max_long_partial_prefills")
    );
    assert_eq!(
        bad(SchedulerConfig { max_long_partial_prefills: 5, ..partial_config(4) }),
        ConfigError::LongPartialPrefillsAboveMax {
            max_long_partial_prefills: 5,
            max_num_partial_prefills: 4
        }
    );
}

#[test]
fn block_table_updates_send_only_new_blocks() {
    let mut s = Scheduler::new(config(64, 4), paged(16, 0, 4, false)).unwrap();
    s.add_request(req(1, 6, 8)).unwrap();
    let (out, _) = step(&mut s, 1);
    let e = &out.scheduled[0];
    assert_eq!((e.table_update.keep, e.table_update.append.len()), (0, 2));
    let mut mirror = Vec::new();
    assert!(e.table_update.apply_to(&mut mirror));
    // Positions 6 and 7 fit the second block; position 8 needs a third.
    for expected in [(2, 0), (2, 0), (2, 1), (3, 0)] {
        let (out, _) = step(&mut s, 1);
        let u = &out.scheduled[0].table_update;
        assert_eq!((u.keep, u.append.len()), expected);
        assert!(u.apply_to(&mut mirror));
        assert_eq!(mirror, s.allocator().block_table(out.scheduled[0].seq_id).unwrap());
    }
    // A copy that claims more than the runner holds is refused.
    let bad = BlockTableUpdate { keep: 5, append: vec![1] };
    assert!(!bad.apply_to(&mut mirror));
    assert_eq!(mirror.len(), 3);
}

#[test]
fn ended_sequences_and_requests_are_listed_in_the_next_step() {
    let mut s = Scheduler::new(config(64, 8), paged(32, 0, 4, false)).unwrap();
    // Aborted before it ever ran: its samples-to-be are listed too.
    s.add_request(NewRequest { n: 3, ..req(1, 6, 3) }).unwrap();
    s.add_request(req(2, 4, 1)).unwrap();
    let seqs = s.request_seqs(RequestId(1)).to_vec();
    assert_eq!(s.abort_request(RequestId(1)), seqs);
    let out = s.schedule().unwrap();
    assert_eq!(out.finished_seqs.len(), 3, "the sequence and the two samples it would fork into");
    assert_eq!(out.finished_seqs[0], seqs[0]);
    assert_eq!(out.finished_requests, vec![RequestId(1)]);
    // Request 2 finishes by length at this step's update: listed once, in the next step.
    let sampled: Vec<_> = out.sampling_seqs().map(|id| (id, 1)).collect();
    let up = s.update_from_output(&out, &sampled).unwrap();
    assert_eq!(up[0].finish_reason, Some(FinishReason::Length));
    let out = s.schedule().unwrap();
    assert_eq!(out.finished_seqs, vec![up[0].seq_id]);
    assert_eq!(out.finished_requests, vec![RequestId(2)]);
    let out = s.schedule().unwrap();
    assert!(out.finished_seqs.is_empty() && out.finished_requests.is_empty());
}

// ---- speculative decoding: draft tokens verified by a decode ----------------

/// Runs a request's prompt, so that it decodes from the next step on.
fn decoding(s: &mut Scheduler<PagedAllocator>, id: u64, prompt_len: usize, max_tokens: usize) -> SeqId {
    s.add_request(req(id, prompt_len, max_tokens)).unwrap();
    let (out, _) = step(s, 7);
    out.scheduled.iter().find(|e| e.request_id == RequestId(id)).unwrap().seq_id
}

/// Schedules one step and applies it with `accepted` drafts kept and
/// `token` sampled after them.
fn verify(
    s: &mut Scheduler<PagedAllocator>,
    seq: SeqId,
    accepted: usize,
    token: TokenId,
) -> (SchedulerOutput, Vec<SeqUpdate>) {
    let out = s.schedule().unwrap();
    let sampled: Vec<(SeqId, TokenId)> = out.sampling_seqs().map(|id| (id, token)).collect();
    let verified: Vec<(SeqId, usize)> =
        out.scheduled.iter().filter(|e| e.num_draft_tokens > 0).map(|e| (e.seq_id, accepted)).collect();
    let updates = s.update_from_verified_output(&out, &sampled, &verified).unwrap();
    s.check_invariants().unwrap();
    assert_eq!(verified.iter().any(|v| v.0 == seq), out.scheduled.iter().any(|e| e.num_draft_tokens > 0));
    (out, updates)
}

#[test]
fn drafts_are_verified_in_one_entry_and_rejected_slots_are_released() {
    let mut s = Scheduler::new(config(64, 4), paged(16, 0, 4, true)).unwrap();
    let seq = decoding(&mut s, 1, 6, 20);
    assert_eq!(s.seq(seq).unwrap().all_token_ids().len(), 7);
    s.set_draft_tokens(seq, vec![11, 12, 13, 14]);
    let out = s.schedule().unwrap();
    let e = &out.scheduled[0];
    // The last sampled token, then the four drafts, at positions 6..11.
    assert_eq!(e.token_ids, vec![7, 11, 12, 13, 14]);
    assert_eq!(e.num_draft_tokens, 4);
    assert_eq!(e.draft_token_ids(), &[11, 12, 13, 14]);
    assert_eq!(e.start_position, 6);
    assert_eq!(e.slot_mapping.len(), 5);
    assert_eq!(out.num_decodes, 0, "a verification entry is not a one-token decode");
    assert_eq!(out.num_batched_tokens, 5);
    assert_eq!(s.allocator().num_tokens(seq), Some(11));
    s.check_invariants().unwrap();
    // Nothing may be scheduled before the verification is applied.
    assert!(!s.can_schedule());
    // Two drafts accepted, then 99 sampled where the third draft was.
    let updates = s.update_from_verified_output(&out, &[(seq, 99)], &[(seq, 2)]).unwrap();
    let tokens: Vec<TokenId> = updates.iter().map(|u| u.new_token).collect();
    assert_eq!(tokens, vec![11, 12, 99]);
    assert_eq!(s.seq(seq).unwrap().output_token_ids(), &[7, 11, 12, 99]);
    assert_eq!(s.seq(seq).unwrap().num_computed_tokens(), 9);
    assert_eq!(s.allocator().num_tokens(seq), Some(9));
    assert_eq!(s.allocator().num_draft_slots(seq), 0);
    s.check_invariants().unwrap();
    // The next decode computes the sampled token at position 9.
    let (out, _) = step(&mut s, 5);
    assert_eq!(out.scheduled[0].token_ids, vec![99]);
    assert_eq!(out.scheduled[0].start_position, 9);
}

#[test]
fn drafts_are_cut_to_the_budget_and_the_request_limits() {
    let mut s = Scheduler::new(config(64, 4), paged(16, 0, 4, false)).unwrap();
    // 3 tokens left to generate after the first: at most 2 drafts.
    let seq = decoding(&mut s, 1, 4, 4);
    s.set_draft_tokens(seq, vec![1, 2, 3, 4, 5]);
    let (out, updates) = verify(&mut s, seq, 2, 9);
    assert_eq!(out.scheduled[0].num_draft_tokens, 2);
    assert_eq!(updates.len(), 3);
    assert_eq!(updates.last().unwrap().finish_reason, Some(FinishReason::Length));
    assert!(!s.has_unfinished());

    // A token budget of 3 with one other decode: one draft fits.
    let mut s = Scheduler::new(config(3, 4), paged(16, 0, 4, false)).unwrap();
    let a = decoding(&mut s, 1, 2, 30);
    let b = decoding(&mut s, 2, 2, 30);
    step(&mut s, 7); // both decode once, without drafts
    s.set_draft_tokens(a, vec![1, 2, 3]);
    s.set_draft_tokens(b, vec![1, 2, 3]);
    let out = s.schedule().unwrap();
    assert_eq!(out.num_batched_tokens, 3);
    let drafts: usize = out.scheduled.iter().map(|e| e.num_draft_tokens).sum();
    assert_eq!(drafts, 1);
    let verified: Vec<_> =
        out.scheduled.iter().filter(|e| e.num_draft_tokens > 0).map(|e| (e.seq_id, 1)).collect();
    let sampled: Vec<_> = out.sampling_seqs().map(|id| (id, 4)).collect();
    s.update_from_verified_output(&out, &sampled, &verified).unwrap();
    s.check_invariants().unwrap();
}

#[test]
fn a_stop_among_accepted_drafts_ends_the_sequence_there() {
    let mut s = Scheduler::new(config(64, 4), paged(16, 0, 4, true)).unwrap();
    s.add_request(NewRequest { eos_token_ids: vec![2], ..req(1, 4, 30) }).unwrap();
    let (out, _) = step(&mut s, 7);
    let seq = out.scheduled[0].seq_id;
    s.set_draft_tokens(seq, vec![1, 2, 3]);
    let (_, updates) = verify(&mut s, seq, 3, 9);
    let tokens: Vec<TokenId> = updates.iter().map(|u| u.new_token).collect();
    assert_eq!(tokens, vec![1, 2], "tokens after EOS are dropped");
    assert_eq!(updates[1].finish_reason, Some(FinishReason::Eos(2)));
    assert!(!s.has_unfinished());
    assert_eq!(s.kv_usage().used_blocks, 0);
}

#[test]
fn bad_acceptance_counts_are_refused_before_anything_changes() {
    let mut s = Scheduler::new(config(64, 4), paged(16, 0, 4, false)).unwrap();
    let seq = decoding(&mut s, 1, 4, 30);
    s.set_draft_tokens(seq, vec![1, 2]);
    let out = s.schedule().unwrap();
    assert!(matches!(
        s.update_from_verified_output(&out, &[(seq, 5)], &[(seq, 3)]),
        Err(UpdateError::BadAcceptance { accepted: 3, drafts: 2, .. })
    ));
    assert!(matches!(s.update_from_output(&out, &[(seq, 5)]), Err(UpdateError::BadAcceptance { .. })));
    s.check_invariants().unwrap();
    s.update_from_verified_output(&out, &[(seq, 5)], &[(seq, 0)]).unwrap();
    assert_eq!(s.seq(seq).unwrap().output_token_ids(), &[7, 5]);
    s.check_invariants().unwrap();
}

#[test]
fn drafts_that_do_not_fit_are_dropped_without_preempting() {
    // 4 blocks of 4: after a few decodes two sequences hold 3 of them.
    let mut s = Scheduler::new(config(64, 4), paged(4, 0, 4, false)).unwrap();
    let a = decoding(&mut s, 1, 4, 8);
    let b = decoding(&mut s, 2, 3, 8);
    step(&mut s, 7);
    s.set_draft_tokens(a, vec![1, 2, 3, 4, 5, 6, 7, 8]);
    s.set_draft_tokens(b, vec![1, 2, 3, 4, 5, 6, 7, 8]);
    let out = s.schedule().unwrap();
    assert!(out.preempted.is_empty(), "drafts never preempt");
    assert_eq!(out.scheduled.len(), 2, "both still decode");
    let sampled: Vec<_> = out.sampling_seqs().map(|id| (id, 4)).collect();
    let verified: Vec<_> = out
        .scheduled
        .iter()
        .filter(|e| e.num_draft_tokens > 0)
        .map(|e| (e.seq_id, e.num_draft_tokens))
        .collect();
    s.update_from_verified_output(&out, &sampled, &verified).unwrap();
    s.check_invariants().unwrap();
}

#[test]
fn a_block_released_by_rejected_drafts_is_sent_again_when_regrown() {
    let mut s = Scheduler::new(config(64, 4), paged(16, 0, 4, false)).unwrap();
    let seq = decoding(&mut s, 1, 3, 30); // 4 tokens: block 0 full after the next decode
    s.set_draft_tokens(seq, vec![1, 2, 3, 4, 5]); // positions 4..9: two more blocks
    let (out, _) = verify(&mut s, seq, 0, 9);
    assert_eq!(out.scheduled[0].table_update.new_len(), 3);
    // Rejected: the table is back to one block; the next decode (position 4)
    // takes a new second block, which the runner must be sent.
    let (out, _) = step(&mut s, 5);
    let update = &out.scheduled[0].table_update;
    assert_eq!(update.keep, 1);
    assert_eq!(update.append, s.allocator().block_table(seq).unwrap()[1..].to_vec());
}

fn lora_req(id: u64, lora: Option<u32>, max_tokens: usize) -> NewRequest {
    NewRequest { lora, ..req(id, 4, max_tokens) }
}

/// One step ([`step`]), returning the adapters and requests it scheduled
/// (read before the step is applied: sequences it finishes are gone after).
fn lora_step<A: KvAllocator>(s: &mut Scheduler<A>) -> (BTreeSet<u32>, BTreeSet<RequestId>) {
    let out = s.schedule().unwrap();
    let loras = out.scheduled.iter().filter_map(|e| s.lora_of(e.seq_id)).collect();
    let requests = out.scheduled.iter().map(|e| s.seqs[&e.seq_id].request_id).collect();
    let sampled: Vec<(SeqId, TokenId)> = out.sampling_seqs().map(|id| (id, 1)).collect();
    if !out.is_empty() {
        s.update_from_output(&out, &sampled).unwrap();
    }
    s.check_invariants().unwrap();
    (loras, requests)
}

#[test]
fn a_step_holds_at_most_max_loras_adapters_and_base_requests_pass() {
    let cfg = SchedulerConfig { max_loras: Some(2), ..config(256, 8) };
    let mut s = Scheduler::new(cfg, paged(64, 0, 4, false)).unwrap();
    s.add_request(lora_req(0, Some(1), 4)).unwrap();
    s.add_request(lora_req(1, Some(2), 4)).unwrap();
    s.add_request(lora_req(2, Some(3), 4)).unwrap();
    s.add_request(lora_req(3, None, 4)).unwrap();
    s.add_request(lora_req(4, Some(1), 4)).unwrap();
    let (loras, started) = lora_step(&mut s);
    assert_eq!(loras, BTreeSet::from([1, 2]));
    // Adapter 3 waits; the base request behind it starts, and so does adapter
    // 1's second request (its adapter is running).
    assert_eq!(started, BTreeSet::from([RequestId(0), RequestId(1), RequestId(3), RequestId(4)]));
    run_to_end(&mut s, 32);
}

#[test]
fn an_adapter_over_the_limit_starts_while_others_keep_arriving() {
    // One slot, adapter 1 busy with a stream of requests that keep joining it:
    // after LORA_FAIRNESS_STEPS none may, and adapter 2's request starts once
    // the adapter-1 requests running then finish (3 tokens each).
    let cfg = SchedulerConfig { max_loras: Some(1), ..config(256, 8) };
    let mut s = Scheduler::new(cfg, paged(256, 0, 4, false)).unwrap();
    s.add_request(lora_req(0, Some(1), 3)).unwrap();
    lora_step(&mut s);
    s.add_request(lora_req(1, Some(2), 3)).unwrap();
    let mut started_at = None;
    for i in 0..LORA_FAIRNESS_STEPS + 10 {
        s.add_request(lora_req(2 + i, Some(1), 3)).unwrap();
        let (loras, started) = lora_step(&mut s);
        assert!(loras.len() <= 1);
        if started.contains(&RequestId(1)) {
            started_at = Some(i);
            break;
        }
    }
    // Refused first at step 2; from step 2 + LORA_FAIRNESS_STEPS + 1 nothing joins
    // adapter 1, whose requests then need at most 3 more steps.
    let started_at = started_at.expect("adapter 2 never started");
    assert!(started_at > 2, "adapter 2 started while adapter 1 held the slot");
    assert!(started_at <= LORA_FAIRNESS_STEPS + 4, "adapter 2 waited {started_at} steps");
    run_to_end(&mut s, 128);
}

#[test]
fn adapters_never_share_prefix_cached_blocks() {
    let cfg = SchedulerConfig { max_loras: Some(4), ..config(256, 8) };
    let mut s = Scheduler::new(cfg, paged(64, 0, 4, true)).unwrap();
    let prompt: Vec<TokenId> = (0..16).collect();
    let with = |id, lora| NewRequest { lora, ..NewRequest::new(RequestId(id), prompt.clone(), 1) };
    s.add_request(with(0, Some(1))).unwrap();
    run_to_end(&mut s, 8);
    for (id, lora, hit) in [(1, Some(2), false), (2, None, false), (3, Some(1), true)] {
        s.add_request(with(id, lora)).unwrap();
        let before = s.prefix_cache_stats();
        run_to_end(&mut s, 8);
        let after = s.prefix_cache_stats();
        assert_eq!(after.hit_tokens > before.hit_tokens, hit, "request {id} with adapter {lora:?}");
    }
}
