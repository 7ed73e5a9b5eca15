//! The KV view the dashboard polls, through the async engine on the tiny
//! Llama fixture: answered while idle and while busy, rebuilt at most once
//! per `KvViewSource::MIN_INTERVAL`, and in agreement with the engine's
//! metrics once the engine is idle.

use std::path::PathBuf;
use std::time::Instant;

use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_engine::{
    load_engine, AsyncEngine, AsyncEngineOptions, EngineConfig, GenerationRequest, KvViewSource,
    SamplingParams, SeqStatus,
};

fn tiny_llama() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama")
}

fn request(id: &str, max_tokens: usize) -> GenerationRequest {
    let mut r = GenerationRequest::new(id, (1..40).collect());
    r.sampling = SamplingParams::greedy();
    r.max_tokens = Some(max_tokens);
    r.ignore_eos = true;
    r
}

#[test]
fn views_follow_the_engine_and_agree_with_its_metrics() {
    let engine = AsyncEngine::start(
        || load_engine(CpuBackend::new(), tiny_llama(), EngineConfig::default(), |_, _| {}),
        AsyncEngineOptions::default(),
    )
    .expect("the tiny model loads");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let idle = engine.kv_view().await.expect("an idle engine answers");
        assert!(idle.seqs.is_empty());
        assert_eq!(idle.counts.free + idle.counts.cached, idle.num_gpu_blocks);
        let asked = Instant::now();
        let again = engine.kv_view().await.unwrap();
        assert!(
            again.view_id == idle.view_id || asked.elapsed() >= KvViewSource::MIN_INTERVAL,
            "a view younger than the interval is handed out again"
        );

        // Let the idle view age out, so that the next ask builds a fresh one.
        tokio::time::sleep(KvViewSource::MIN_INTERVAL).await;
        let mut streams: Vec<_> =
            (0..4).map(|i| engine.submit(request(&format!("r{i}"), 160)).expect("admitted")).collect();
        // A first token means a step has run: the request holds blocks, and has
        // more than a hundred tokens to go when the engine answers, at its next
        // step boundary.
        streams[0].next().await.expect("an output").expect("no engine error");
        let busy = engine.kv_view().await.unwrap();
        assert!(
            busy.seqs.iter().any(|s| s.status == SeqStatus::Running && !s.gpu_blocks.is_empty()),
            "a running sequence with blocks: {busy:?}"
        );
        assert!(busy.counts.used() > 0);
        assert!(busy.seqs.iter().all(|s| s.request_id.starts_with('r')));
        for stream in &mut streams {
            while let Some(out) = stream.next().await {
                out.expect("no engine error");
            }
        }
        // Wait out the interval so the next view is a fresh one.
        tokio::time::sleep(KvViewSource::MIN_INTERVAL).await;
        let done = engine.kv_view().await.unwrap();
        let m = engine.metrics();
        assert!(done.seqs.is_empty());
        assert_eq!(done.counts.used() as i64, m.kv_blocks_used.get());
        assert_eq!((done.counts.free + done.counts.cached) as i64, m.kv_blocks_free.get());
        assert_eq!(
            done.counts.cached as i64,
            m.kv_blocks_cached.get(),
            "with no holder, every cached block is evictable"
        );
        assert_eq!(done.num_gpu_blocks as i64, m.kv_blocks_total.get());
        assert_eq!(done.prefix_cache.hit_tokens, m.prefix_cache_hits.get());
        assert!(done.prefill_steps.steps > 0 && done.decode_steps.steps > 0);
    });
}
