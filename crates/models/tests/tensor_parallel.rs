//! Tensor parallelism on the CPU: a model split over N ranks (N threads, each
//! with its own backend, shard, KV cache and in-process communicator) gives
//! the greedy tokens of the unsharded model and logits within f32 rounding,
//! for tiny random models at 2 and 4 ranks and SmolLM2-135M at 3 (9 query
//! heads, 3 KV heads: one KV head per rank); shapes that do not divide are
//! refused by name.
//!
//! The SmolLM2 test needs the model: `bash scripts/fetch-model.sh` (or
//! `PAGODA_TEST_MODEL`).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::thread;

use common::{argmax, fixture, real_model_path, ErrorStats};
use pagoda_backend::{Backend, Communicator, SingleRank, TokenId};
use pagoda_backend_cpu_ref::{CpuBackend, InProcessGroup};
use pagoda_models::weights::{SafetensorsWeights, WeightData, WeightSource, WeightTensor};
use pagoda_models::{LlamaModel, LoadOptions, ModelConfig, ModelError, ModelFiles, SingleSequence};

const BLOCK_SIZE: usize = 4;

/// What one prompt gives: the logits before each greedy token, and the tokens.
#[derive(Debug, Default)]
struct Run {
    logits: Vec<Vec<f32>>,
    tokens: Vec<TokenId>,
}

/// Prefill in two chunks (the second reads the first from the paged cache;
/// one is short enough for the decode path of `linear`, one long enough for
/// its GEMM path), then `steps` greedy tokens.
fn generate(
    cpu: &CpuBackend,
    model: &LlamaModel<CpuBackend>,
    prompt: &[TokenId],
    steps: usize,
) -> Result<Run, ModelError> {
    let mut seq = SingleSequence::new(cpu, model, prompt.len() + steps, BLOCK_SIZE)?;
    let cut = prompt.len() / 3;
    seq.step(cpu, &prompt[..cut], 1)?;
    let mut logits = cpu.download_f32(&seq.step(cpu, &prompt[cut..], 1)?)?;
    let mut run = Run::default();
    for step in 0..steps {
        let token = argmax(&logits);
        run.tokens.push(token);
        run.logits.push(logits);
        if step + 1 == steps {
            break;
        }
        logits = cpu.download_f32(&seq.step(cpu, &[token], 1)?)?;
    }
    Ok(run)
}

/// Loads one rank's shard on its backend.
type LoadShard<'a> = dyn Fn(&CpuBackend, Arc<dyn Communicator<CpuBackend>>) -> Result<LlamaModel<CpuBackend>, ModelError>
    + Sync
    + 'a;

/// Runs every prompt on `world` ranks, one thread each, and returns rank 0's
/// runs after checking every rank got the same logits, bit for bit (the
/// residual is all-reduced and the lm_head replicated).
fn run_sharded(world: usize, load: &LoadShard<'_>, prompts: &[Vec<TokenId>], steps: usize) -> Vec<Run> {
    let per_rank: Vec<Vec<Run>> = thread::scope(|s| {
        let handles: Vec<_> = InProcessGroup::new(world)
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                s.spawn(move || {
                    let cpu = CpuBackend::new();
                    // A rank that fails drops its communicator, so the others
                    // fail too instead of waiting for it.
                    let model = load(&cpu, Arc::new(comm)).unwrap_or_else(|e| panic!("rank {rank}: {e}"));
                    assert_eq!(model.tp_shard().rank(), rank);
                    prompts
                        .iter()
                        .map(|p| {
                            generate(&cpu, &model, p, steps).unwrap_or_else(|e| panic!("rank {rank}: {e}"))
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
    });
    let bits = |runs: &[Run]| -> Vec<Vec<u32>> {
        runs.iter().flat_map(|r| r.logits.iter().map(|l| l.iter().map(|x| x.to_bits()).collect())).collect()
    };
    for (rank, runs) in per_rank.iter().enumerate().skip(1) {
        assert!(bits(runs) == bits(&per_rank[0]), "rank {rank}'s logits differ from rank 0's");
    }
    per_rank.into_iter().next().expect("at least one rank")
}

/// The bound on `|logit_TP1 − logit_TPN|` relative to the row's largest
/// |logit| (what [`ErrorStats::max_rel`] measures), from f32 arithmetic:
///
/// - The ranks compute the same column-parallel products, norms, rotary and
///   per-head attention on the same inputs as the unsharded model does. What
///   changes is the order of the additions in the row-parallel o and down
///   products: unsharded, `residual + Σ_k a_k·w_k` over all `K` input
///   features at once; sharded, `N` partial sums of `K/N` terms added in rank
///   order.
/// - Any order of summing `K + 1` f32 terms is within `γ_K · S` of the exact
///   sum, `S = |residual| + Σ_k |a_k·w_k|`, with `γ_K = K·u / (1 − K·u)` and
///   `u = 2⁻²⁴`; so the two orders differ by at most `2·γ_K·S`, i.e. by
///   `2·γ_K` relative to the scale of the stream, after every one of the
///   `2·L` row-parallel products (`K` the larger of `Hq·D` and `I`).
/// - Each block's input is RMS-normed, so a relative error of the stream
///   enters the next layers (and the final norm and lm_head) as the same
///   relative error: summed, not compounded, over the `2·L` products. This
///   first-order model is not a proof, but the worst case `γ_K` (linear in
///   `K`, where rounding errors grow as `√K` in practice) leaves it ample
///   room for the layers' gains.
///
/// So the bound is `2L · 2γ_K`: SmolLM2 (L 30, K 1536) 1.1e-2, the tiny
/// models (L 2, K 128) 6.1e-5.
fn logits_bound(c: &ModelConfig) -> f32 {
    let k = c.q_size().max(c.intermediate_size) as f64;
    let u = f64::from(f32::EPSILON) / 2.0;
    let gamma = k * u / (1.0 - k * u);
    (2.0 * c.num_layers as f64 * 2.0 * gamma) as f32
}

/// The sharded runs give the unsharded runs' greedy tokens exactly and
/// their logits within [`logits_bound`].
fn assert_close(label: &str, config: &ModelConfig, want: &[Run], got: &[Run]) {
    let bound = logits_bound(config);
    let mut stats = ErrorStats::default();
    let mut min_margin = f32::INFINITY;
    for (p, (w, g)) in want.iter().zip(got).enumerate() {
        assert_eq!(g.tokens, w.tokens, "{label}: greedy tokens of prompt {p}");
        for (gl, wl) in g.logits.iter().zip(&w.logits) {
            stats.update(gl, wl);
            let mut sorted = wl.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            min_margin = min_margin.min(sorted[0] - sorted[1]);
        }
    }
    eprintln!(
        "{label}: max |Δlogit| {:.2e}, max rel {:.2e} (bound {bound:.1e}); smallest top-2 margin {min_margin:.2e}",
        stats.max_abs, stats.max_rel
    );
    assert!(
        stats.max_rel <= bound,
        "{label}: logits differ by {:e} relative (bound {bound:e})",
        stats.max_rel
    );
}

/// Prompts of in-vocabulary ids for the tiny models (vocabulary 320).
fn tiny_prompts() -> Vec<Vec<TokenId>> {
    vec![(0..20).map(|i| 3 + (i * 37) % 300).collect(), (0..13).map(|i| 5 + (i * 101) % 310).collect()]
}

fn check_tiny(rel: &str, worlds: &[usize]) {
    let files = ModelFiles::open(fixture(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let cpu = CpuBackend::new();
    let prompts = tiny_prompts();
    let opts = LoadOptions::default();
    let whole = files.load_model(&cpu, &opts, &mut |_, _| {}).unwrap();
    let want: Vec<Run> = prompts.iter().map(|p| generate(&cpu, &whole, p, 8).unwrap()).collect();
    for &world in worlds {
        let got = run_sharded(
            world,
            &|cpu, comm| files.load_model_sharded(cpu, &opts, comm, &mut |_, _| {}),
            &prompts,
            8,
        );
        assert_close(&format!("{rel} at TP {world}"), &files.config, &want, &got);
    }
}

#[test]
fn tiny_llama_at_tp_2_and_4_gives_the_tp_1_tokens() {
    // 4 query and 2 KV heads: at 4 ranks each KV head is held by two ranks.
    check_tiny("tiny-llama", &[2, 4]);
}

#[test]
fn tiny_qwen2_with_qkv_biases_and_f16_weights_at_tp_2_and_4() {
    check_tiny("tiny-qwen2", &[2, 4]);
}

#[test]
fn tiny_mistral_with_sliding_window_at_tp_2() {
    check_tiny("tiny-mistral", &[2]);
}

/// The tiny Llama's weights plus q/k/v and o biases (`attention_bias`), as
/// owned f32 (the path GGUF weights take): o's bias must be added once, not
/// once per rank.
struct WithAttentionBias {
    base: SafetensorsWeights,
    biases: HashMap<String, Vec<f32>>,
}

impl WithAttentionBias {
    fn new(c: &ModelConfig) -> Self {
        let base = SafetensorsWeights::open_dir(&fixture("tiny-llama")).unwrap();
        let mut biases = HashMap::new();
        for l in 0..c.num_layers {
            for (m, len) in [("q", c.q_size()), ("k", c.kv_size()), ("v", c.kv_size()), ("o", c.hidden_size)]
            {
                let values =
                    (0..len).map(|i| ((l * 131 + i * 17 + m.len()) % 29) as f32 / 29.0 - 0.5).collect();
                biases.insert(format!("model.layers.{l}.self_attn.{m}_proj.bias"), values);
            }
        }
        Self { base, biases }
    }
}

impl WeightSource for WithAttentionBias {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.biases.get(name).map(|b| vec![b.len()]).or_else(|| self.base.shape(name))
    }
    fn file_bytes(&self, name: &str) -> u64 {
        self.biases.get(name).map_or_else(|| self.base.file_bytes(name), |b| 4 * b.len() as u64)
    }
    fn tensor(&self, name: &str) -> Result<WeightTensor<'_>, ModelError> {
        match self.biases.get(name) {
            Some(b) => Ok(WeightTensor { shape: vec![b.len()], data: WeightData::Owned(b.clone()) }),
            None => self.base.tensor(name),
        }
    }
}

#[test]
fn attention_biases_are_added_once_at_tp_2_and_4() {
    let mut config = ModelFiles::open(fixture("tiny-llama")).unwrap().config;
    (config.qkv_bias, config.o_bias) = (true, true);
    let weights = WithAttentionBias::new(&config);
    let cpu = CpuBackend::new();
    let opts = LoadOptions::default();
    let whole = LlamaModel::load(&cpu, config.clone(), &weights, &opts, &mut |_, _| {}).unwrap();
    let prompts = tiny_prompts();
    let want: Vec<Run> = prompts.iter().map(|p| generate(&cpu, &whole, p, 8).unwrap()).collect();
    for world in [2, 4] {
        let load = |cpu: &CpuBackend, comm| {
            LlamaModel::load_sharded(cpu, config.clone(), &weights, &opts, comm, &mut |_, _| {})
        };
        let got = run_sharded(world, &load, &prompts, 8);
        assert_close(&format!("tiny Llama with attention biases at TP {world}"), &config, &want, &got);
    }
}

#[test]
fn a_group_of_one_is_the_unsharded_model_bit_for_bit() {
    let files = ModelFiles::open(fixture("tiny-llama")).unwrap();
    let cpu = CpuBackend::new();
    let opts = LoadOptions::default();
    let whole = files.load_model(&cpu, &opts, &mut |_, _| {}).unwrap();
    let single = files.load_model_sharded(&cpu, &opts, Arc::new(SingleRank), &mut |_, _| {}).unwrap();
    for prompt in tiny_prompts() {
        let (a, b) =
            (generate(&cpu, &whole, &prompt, 4).unwrap(), generate(&cpu, &single, &prompt, 4).unwrap());
        assert_eq!(a.tokens, b.tokens);
        assert!(a
            .logits
            .iter()
            .flatten()
            .zip(b.logits.iter().flatten())
            .all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

#[test]
fn smollm2_at_tp_3_gives_the_tp_1_tokens() {
    let files = ModelFiles::open(real_model_path()).expect("open SmolLM2");
    assert_eq!((files.config.num_attention_heads, files.config.num_kv_heads), (9, 3));
    let cpu = CpuBackend::new();
    let opts = LoadOptions { max_positions: Some(256), ..Default::default() };
    let prompts: Vec<Vec<TokenId>> =
        ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th"]
            .iter()
            .map(|text| files.tokenizer.encode(text, true).unwrap())
            .collect();
    let want: Vec<Run> = {
        let whole = files.load_model(&cpu, &opts, &mut |_, _| {}).unwrap();
        prompts.iter().map(|p| generate(&cpu, &whole, p, 6).unwrap()).collect()
    };
    let got =
        run_sharded(3, &|cpu, comm| files.load_model_sharded(cpu, &opts, comm, &mut |_, _| {}), &prompts, 6);
    assert_close("SmolLM2 at TP 3", &files.config, &want, &got);
}

/// Loads rank 0 of `world` with `config` over the tiny Llama's weights.
fn load_rank_0(config: ModelConfig, world: usize) -> Result<LlamaModel<CpuBackend>, ModelError> {
    let weights = SafetensorsWeights::open_dir(&fixture("tiny-llama")).unwrap();
    let comm = InProcessGroup::new(world).into_iter().next().unwrap();
    LlamaModel::load_sharded(
        &CpuBackend::new(),
        config,
        &weights,
        &LoadOptions::default(),
        Arc::new(comm),
        &mut |_, _| {},
    )
}

#[test]
fn shapes_that_do_not_divide_are_refused_by_name() {
    let base = ModelFiles::open(fixture("tiny-llama")).unwrap().config;
    let refused = |config: ModelConfig, world: usize| match load_rank_0(config, world) {
        Err(e @ ModelError::TensorParallel(_)) => e.to_string(),
        Err(e) => panic!("expected a tensor parallelism error, got {e}"),
        Ok(_) => panic!("a shard of TP {world} was loaded"),
    };
    let e = refused(base.clone(), 3);
    assert!(e.contains("num_attention_heads 4 is not divisible by tensor parallel size 3"), "{e}");
    // Checked before any weight is read, so these configs need no matching weights.
    let e = refused(ModelConfig { num_attention_heads: 12, num_kv_heads: 3, ..base.clone() }, 2);
    assert!(e.contains("num_kv_heads 3 and tensor parallel size 2"), "{e}");
    let e = refused(ModelConfig { intermediate_size: 130, ..base.clone() }, 4);
    assert!(e.contains("intermediate_size 130 is not divisible by tensor parallel size 4"), "{e}");
}

#[test]
fn lora_on_a_sharded_model_is_refused() {
    let config = ModelFiles::open(fixture("tiny-llama")).unwrap().config;
    let mut model = load_rank_0(config, 2).unwrap();
    let err = model.enable_lora(&CpuBackend::new(), 2, 4).unwrap_err();
    assert!(matches!(err, ModelError::TensorParallel(_)) && err.to_string().contains("LoRA"), "{err}");
}

#[test]
fn a_rank_that_left_fails_the_others_forward_instead_of_hanging() {
    let files = ModelFiles::open(fixture("tiny-llama")).unwrap();
    let cpu = CpuBackend::new();
    let mut comms = InProcessGroup::new(2).into_iter();
    let rank_0 = comms.next().unwrap();
    let model =
        files.load_model_sharded(&cpu, &LoadOptions::default(), Arc::new(rank_0), &mut |_, _| {}).unwrap();
    drop(comms); // rank 1 is gone
    let err = generate(&cpu, &model, &[5, 6, 7, 8], 1).unwrap_err().to_string();
    assert!(err.contains("rank 1 left the group"), "{err}");
    // The group stays broken.
    assert!(generate(&cpu, &model, &[5, 6, 7, 8], 1).is_err());
}
