//! Multi-LoRA on the real default model (SmolLM2-135M-Instruct, CPU
//! reference backend): a batch mixing base-model requests and three adapters
//! (more adapters than slots, so the scheduler holds some back and slots are
//! reloaded) gives every request exactly the tokens it gets alone, greedy
//! and seeded; and a request naming an adapter the engine cannot read fails
//! alone, with the adapter's name.

use pagoda_backend::SamplingParams;
use pagoda_engine::{EngineConfig, EngineError, GenerationRequest, LoraConfig, LoraRequest};
use pagoda_models::{LoraModule, ModelFiles, SyntheticLora};
use serde_json::Value;

mod common;
use common::{engine, ids, model_path, serial, workspace_root};

fn prompts() -> Vec<Vec<u32>> {
    let path = workspace_root().join("tests/fixtures/smollm2/golden.json");
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("golden")).expect("json");
    golden["prompts"].as_array().expect("prompts").iter().take(2).map(|p| ids(&p["prompt_ids"])).collect()
}

/// Three adapters of different ranks and projections, written as PEFT writes them.
fn write_adapters(dir: &std::path::Path) -> Vec<LoraRequest> {
    let config = ModelFiles::open(model_path()).expect("model").config;
    // q/v alone move the output less: a larger B for that one.
    let adapters = [
        (8, LoraModule::ALL.to_vec(), false, 0.05),
        (4, vec![LoraModule::Q, LoraModule::V], true, 0.2),
        (16, vec![LoraModule::Gate, LoraModule::Up, LoraModule::Down], false, 0.05),
    ];
    adapters
        .into_iter()
        .enumerate()
        .map(|(i, (rank, modules, use_rslora, b_amp))| {
            let path = dir.join(format!("adapter{i}"));
            let adapter = SyntheticLora {
                seed: 100 + i as u64,
                rank,
                alpha: 2.0 * rank as f64,
                use_rslora,
                modules,
                b_amp,
            };
            adapter.write(&path, &config, "smollm2").expect("write adapter");
            LoraRequest { name: format!("adapter{i}"), id: i as u32 + 1, path }
        })
        .collect()
}

fn lora_config() -> EngineConfig {
    EngineConfig {
        lora: Some(LoraConfig { max_loras: 2, max_lora_rank: 16, max_cpu_loras: 2 }),
        ..EngineConfig::default()
    }
}

fn request(
    id: usize,
    prompt: &[u32],
    lora: Option<&LoraRequest>,
    sampling: SamplingParams,
) -> GenerationRequest {
    let mut r = GenerationRequest::new(format!("r{id}"), prompt.to_vec());
    r.sampling = sampling;
    r.max_tokens = Some(12);
    r.ignore_eos = true;
    r.lora = lora.cloned();
    r
}

#[test]
fn mixed_adapters_in_one_batch_give_each_request_what_it_gets_alone() {
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("tempdir");
    let adapters = write_adapters(tmp.path());
    let mut engine = engine(lora_config());
    let prompts = prompts();
    let samplings = [
        SamplingParams::greedy(),
        SamplingParams { temperature: 0.8, seed: Some(7), ..SamplingParams::default() },
    ];
    // Base, then each adapter, for each prompt and sampling.
    let mut cases = Vec::new();
    for sampling in &samplings {
        for prompt in &prompts {
            for lora in std::iter::once(None).chain(adapters.iter().map(Some)) {
                cases.push((prompt.clone(), lora, sampling.clone()));
            }
        }
    }
    let batch = || -> Vec<GenerationRequest> {
        cases.iter().enumerate().map(|(i, (p, l, s))| request(i, p, *l, s.clone())).collect()
    };
    let together: Vec<Vec<u32>> =
        engine.generate(batch()).expect("batch").into_iter().map(|r| r.seqs[0].token_ids.clone()).collect();
    let slots = engine.runner().lora_slot_table().expect("LoRA on");
    assert!(slots.loads > 2, "3 adapters over 2 slots must reload a slot ({} loads)", slots.loads);
    for (i, (prompt, lora, sampling)) in cases.iter().enumerate() {
        let alone = engine.generate(vec![request(1000 + i, prompt, *lora, sampling.clone())]).expect("alone");
        assert_eq!(alone[0].seqs[0].token_ids, together[i], "case {i} (adapter {:?})", lora.map(|l| &l.name));
    }
    // Every adapter changes what the model writes: the cases are not vacuous.
    for (i, chunk) in together.chunks(4).enumerate() {
        for (a, tokens) in chunk[1..].iter().enumerate() {
            assert_ne!(
                tokens, &chunk[0],
                "prompt/sampling group {i}: adapter {a} wrote what the base model wrote"
            );
        }
    }
    assert_eq!(engine.scheduler().kv_usage().used_blocks, 0);

    // The same batch with decodes padded into the graph buffers (each token's
    // slot read from the fixed slot buffer, padding rows without an adapter).
    drop(engine);
    let mut padded = common::engine(lora_config());
    padded.force_decode_graphs().expect("padded decode buffers");
    let again: Vec<Vec<u32>> =
        padded.generate(batch()).expect("batch").into_iter().map(|r| r.seqs[0].token_ids.clone()).collect();
    assert_eq!(again, together, "padded decode steps with adapters");
    assert!(padded.runner().timings().graphs.steps > 0, "no step ran padded");
}

#[test]
fn an_adapter_that_cannot_be_read_fails_its_request_alone() {
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("tempdir");
    let adapters = write_adapters(tmp.path());
    let mut engine = engine(lora_config());
    let missing = LoraRequest { name: "gone".into(), id: 9, path: tmp.path().join("nowhere") };
    let prompt = &prompts()[0];
    let err = engine.add_request(request(0, prompt, Some(&missing), SamplingParams::greedy())).unwrap_err();
    assert!(matches!(&err, EngineError::Lora(m) if m.contains("gone")), "{err}");
    // Without LoRA enabled, asking for an adapter is the client's error.
    drop(engine);
    let mut plain = common::engine(EngineConfig::default());
    let err =
        plain.add_request(request(1, prompt, Some(&adapters[0]), SamplingParams::greedy())).unwrap_err();
    assert!(err.to_string().contains("--enable-lora"), "{err}");
    let done =
        plain.generate(vec![request(2, prompt, None, SamplingParams::greedy())]).expect("base request");
    assert_eq!(done[0].seqs[0].token_ids.len(), 12);
}
