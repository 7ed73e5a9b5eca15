//! Multi-LoRA on the real default model (SmolLM2-135M-Instruct, CPU
//! reference backend): three PEFT adapters against transformers + PEFT
//! (tests/fixtures/smollm2/lora, built by scripts/make_lora_golden.py: the
//! adapters' values come from a generator both sides compute, so no weights
//! are committed); a batch mixing base-model requests and three adapters
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
    // vLLM's lora_requests_info: two adapters run (two slots), the third waits.
    for (i, lora) in adapters.iter().enumerate() {
        engine.add_request(request(10 + i, prompt, Some(lora), SamplingParams::greedy())).expect("add");
    }
    // Two steps: under asynchronous scheduling the first is applied (and the gauges set) by the second.
    engine.step().expect("step");
    engine.step().expect("step");
    let metrics = engine.metrics().render();
    let info =
        metrics.lines().find(|l| l.starts_with("pagoda:lora_requests_info{")).expect("lora_requests_info");
    assert!(
        info.contains(r#"max_lora="2""#)
            && info.contains(r#"running_lora_adapters="adapter0,adapter1""#)
            && info.contains(r#"waiting_lora_adapters="adapter2""#),
        "{info}"
    );
    while engine.has_unfinished_requests() {
        engine.step().expect("step");
    }
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

/// The fixture's adapters, written from the generator beside their PEFT
/// configs, after checking the generator against the values PEFT saved
/// (every tensor's name, shape, sum and sum of squares).
fn fixture_adapters(dir: &std::path::Path) -> Vec<LoraRequest> {
    let fixtures = workspace_root().join("tests/fixtures/smollm2/lora");
    let config = ModelFiles::open(model_path()).expect("model").config;
    let golden = read_json(&fixtures.join("golden.json"));
    golden["adapters"]
        .as_array()
        .expect("adapters")
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let name = a["name"].as_str().or_else(|| a.as_str()).expect("adapter name");
            let spec = read_json(&fixtures.join(name).join("tensors.json"));
            let modules: Vec<LoraModule> = LoraModule::ALL
                .into_iter()
                .filter(|m| {
                    spec["tensors"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|t| t[0].as_str().unwrap().contains(m.name()))
                })
                .collect();
            let adapter = SyntheticLora {
                seed: spec["generator"]["seed"].as_u64().expect("seed"),
                rank: spec["r"].as_u64().expect("r") as usize,
                alpha: spec["lora_alpha"].as_f64().expect("alpha"),
                use_rslora: spec["use_rslora"].as_bool().expect("use_rslora"),
                modules,
                b_amp: spec["generator"]["b_amp"].as_f64().expect("b_amp"),
            };
            for t in spec["tensors"].as_array().expect("tensors") {
                let tensor = t[0].as_str().unwrap();
                let (layer, module, is_b) = parse_name(tensor);
                let values = adapter.matrix(layer, module, is_b, &config);
                let (in_f, out_f) = module.dims(&config);
                let shape: Vec<usize> =
                    if is_b { vec![out_f, adapter.rank] } else { vec![adapter.rank, in_f] };
                let want_shape: Vec<usize> =
                    t[1].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
                assert_eq!(shape, want_shape, "{tensor}");
                assert_eq!(SyntheticLora::tensor_name(layer, module, is_b), tensor);
                let sum: f64 = values.iter().map(|&v| v as f64).sum();
                let squares: f64 = values.iter().map(|&v| (v as f64) * (v as f64)).sum();
                // Both sides sum the same f32 values in f64: only the order differs.
                assert!((sum - t[2].as_f64().unwrap()).abs() < 1e-9 * (1.0 + squares), "{tensor}: sum {sum}");
                assert!(
                    (squares - t[3].as_f64().unwrap()).abs() < 1e-9 * (1.0 + squares),
                    "{tensor}: squares"
                );
            }
            let path = dir.join(name);
            adapter.write(&path, &config, "smollm2").expect("write adapter");
            // PEFT's own config, not ours, is what the loader reads.
            std::fs::copy(fixtures.join(name).join("adapter_config.json"), path.join("adapter_config.json"))
                .expect("copy config");
            LoraRequest { name: name.to_string(), id: i as u32 + 1, path }
        })
        .collect()
}

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .expect("json")
}

/// `base_model.model.model.layers.{l}.{parent}.{module}.lora_{A|B}.weight`.
fn parse_name(name: &str) -> (usize, LoraModule, bool) {
    let parts: Vec<&str> = name.split('.').collect();
    let layer = parts[4].parse().expect("layer");
    let module = LoraModule::ALL.into_iter().find(|m| m.name() == parts[6]).expect("module");
    (layer, module, parts[7] == "lora_B")
}

/// transformers + PEFT's greedy tokens and their logprobs for every prompt,
/// for the base model and each adapter, all in one batch. The CPU reference
/// reproduces transformers' SmolLM2 logits within 1e-3 (crates/models'
/// smollm2 test: observed 2.7e-5); a logprob is a logit minus a
/// log-sum-exp, each within that, so within 2e-3. Tokens must match exactly
/// up to the first step whose top-2 margin is under 4e-3 (where 2e-3 errors
/// on both could swap them): none of the fixture's is.
#[test]
fn adapters_match_transformers_and_peft() {
    const LOGPROB_TOL: f64 = 2e-3;
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("tempdir");
    let adapters = fixture_adapters(tmp.path());
    let golden = read_json(&workspace_root().join("tests/fixtures/smollm2/lora/golden.json"));
    let n_tokens = golden["n_tokens"].as_u64().expect("n_tokens") as usize;
    let mut engine = engine(EngineConfig {
        lora: Some(LoraConfig { max_loras: 3, max_lora_rank: 16, max_cpu_loras: 3 }),
        ..EngineConfig::default()
    });
    let mut requests = Vec::new();
    let mut expected = Vec::new();
    for (p, prompt) in golden["prompts"].as_array().expect("prompts").iter().enumerate() {
        let ids = ids(&prompt["prompt_ids"]);
        for lora in std::iter::once(None).chain(adapters.iter().map(Some)) {
            let name = lora.map_or("base", |l| l.name.as_str());
            let mut r = request(
                requests.len(),
                &ids,
                lora,
                SamplingParams { logprobs: Some(0), ..SamplingParams::greedy() },
            );
            r.max_tokens = Some(n_tokens);
            requests.push(r);
            expected.push((p, name, prompt["outputs"][name].clone()));
        }
    }
    let done = engine.generate(requests).expect("generate");
    let mut worst: f64 = 0.0;
    for (out, (p, name, want)) in done.iter().zip(&expected) {
        let seq = &out.seqs[0];
        let want_tokens = ids(&want["tokens"]);
        let margins: Vec<f64> =
            want["top2_margins"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect();
        let comparable = margins.iter().position(|&m| m < 2.0 * LOGPROB_TOL).map_or(n_tokens, |i| i + 1);
        assert_eq!(
            seq.token_ids[..comparable],
            want_tokens[..comparable],
            "prompt {p}, {name}: greedy tokens differ from transformers + PEFT"
        );
        for (step, (got, want)) in
            seq.logprobs.iter().zip(want["logprobs"].as_array().unwrap()).take(comparable).enumerate()
        {
            let diff = (got.logprob as f64 - want.as_f64().unwrap()).abs();
            worst = worst.max(diff);
            assert!(diff <= LOGPROB_TOL, "prompt {p}, {name}, step {step}: logprob off by {diff:e}");
        }
    }
    eprintln!("largest |Δ logprob| against transformers + PEFT: {worst:.2e}");
}
