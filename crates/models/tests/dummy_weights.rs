//! `--load-format dummy`: a folder holding only config.json loads with seeded
//! random weights made by the backend ([`Backend::fill_uniform`]), generates
//! finite, varied tokens, is deterministic for a seed, and a tensor-parallel
//! rank makes exactly its shard of the same model; formats that do not fit
//! the path are refused by name.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::thread;

use common::{argmax, fixture};
use pagoda_backend::{Backend, Communicator, TokenId};
use pagoda_backend_cpu_ref::{CpuBackend, InProcessGroup};
use pagoda_models::weights::{WeightSource, WeightTensor};
use pagoda_models::{
    DummyWeights, LlamaModel, LoadFormat, LoadOptions, ModelConfig, ModelError, ModelFiles, SingleSequence,
    DEFAULT_DUMMY_SEED,
};

/// A tiny Llama with every optional tensor (q/k/v and o biases, an untied
/// lm_head): 4 query heads over 2 KV heads, so it splits 2 and 4 ways.
fn tiny_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 320,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": true,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2
    })
}

/// A folder holding only this config.json.
fn config_folder(config: &serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary folder");
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("config.json written");
    dir
}

const PROMPT: [TokenId; 9] = [1, 17, 42, 99, 7, 123, 250, 3, 64];

/// The logits before each of `steps` greedy tokens (prompt in one step, then
/// one token a step), and the tokens.
fn greedy(cpu: &CpuBackend, model: &LlamaModel<CpuBackend>, steps: usize) -> (Vec<Vec<f32>>, Vec<TokenId>) {
    let mut seq = SingleSequence::new(cpu, model, PROMPT.len() + steps, 4).expect("a sequence");
    let mut logits = cpu.download_f32(&seq.step(cpu, &PROMPT, 1).expect("prefill")).expect("logits");
    let (mut rows, mut tokens) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let token = argmax(&logits);
        tokens.push(token);
        rows.push(std::mem::take(&mut logits));
        logits = cpu.download_f32(&seq.step(cpu, &[token], 1).expect("decode")).expect("logits");
    }
    (rows, tokens)
}

fn load(cpu: &CpuBackend, files: &ModelFiles) -> LlamaModel<CpuBackend> {
    files.load_model(cpu, &LoadOptions::default(), &mut |_, _| {}).expect("dummy weights load")
}

#[test]
fn a_config_only_folder_loads_with_dummy_weights_and_generates() {
    let dir = config_folder(&tiny_config());
    let files = ModelFiles::open_with(dir.path(), LoadFormat::Dummy).expect("opens with config.json alone");
    assert!(!files.tokenizer.is_present(), "no tokenizer.json: token ids only");
    let cpu = CpuBackend::new();
    let mut progress = (0, 0);
    let model = files.load_model(&cpu, &LoadOptions::default(), &mut |d, t| progress = (d, t)).unwrap();
    // Progress counts the bytes a bf16 checkpoint of this shape would hold.
    let c = model.config();
    let per_layer = 2 * c.hidden_size
        + 2 * c.hidden_size * (c.q_size() + c.kv_size())
        + 3 * c.hidden_size * c.intermediate_size
        + c.q_size()
        + 2 * c.kv_size()
        + c.hidden_size;
    let numel = 2 * c.vocab_size * c.hidden_size + c.hidden_size + c.num_layers * per_layer;
    assert_eq!(progress, (2 * numel as u64, 2 * numel as u64));

    let (logits, tokens) = greedy(&cpu, &model, 24);
    assert!(logits.iter().flatten().all(|x| x.is_finite()), "finite logits");
    let spread = logits[0].iter().map(|x| x * x).sum::<f32>() / logits[0].len() as f32;
    assert!(spread.sqrt() > 0.1, "logits of order one, not a flat row (RMS {})", spread.sqrt());
    let mut distinct = tokens.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() >= 6, "greedy tokens vary: {tokens:?}");

    // The same seed makes the same model; another seed another one.
    let again = ModelFiles::open_with(dir.path(), LoadFormat::Dummy).unwrap();
    assert_eq!(greedy(&cpu, &load(&cpu, &again), 24), (logits.clone(), tokens));
    let seeded = ModelFiles::open_dummy(dir.path(), DEFAULT_DUMMY_SEED + 1).unwrap();
    let (other, _) = greedy(&cpu, &load(&cpu, &seeded), 1);
    assert_ne!(other[0], logits[0], "another seed, other weights");
}

/// The dummy weights as plain host data: [`WeightSource::tensor`]'s values
/// uploaded (and cut into shards on the host), as a file's would be.
struct OnTheHost(DummyWeights);

impl WeightSource for OnTheHost {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.0.shape(name)
    }
    fn file_bytes(&self, name: &str) -> u64 {
        self.0.file_bytes(name)
    }
    fn tensor(&self, name: &str) -> Result<WeightTensor<'_>, ModelError> {
        self.0.tensor(name)
    }
}

/// Loads `world` shards on their own threads and returns rank 0's greedy run
/// (every rank computes the same replicated logits).
fn sharded_greedy(world: usize, weights: &(dyn WeightSource + Sync), config: &ModelConfig) -> Vec<TokenId> {
    thread::scope(|s| {
        let handles: Vec<_> = InProcessGroup::new(world)
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let cpu = CpuBackend::new();
                    let comm: Arc<dyn Communicator<CpuBackend>> = Arc::new(comm);
                    let model = LlamaModel::load_sharded(
                        &cpu,
                        config.clone(),
                        weights,
                        &LoadOptions::default(),
                        comm,
                        &mut |_, _| {},
                    )
                    .expect("a shard loads");
                    greedy(&cpu, &model, 12).1
                })
            })
            .collect();
        let mut runs = handles.into_iter().map(|h| h.join().expect("a rank panicked"));
        runs.next().expect("rank 0")
    })
}

#[test]
fn each_rank_makes_its_shard_and_tensor_parallelism_gives_the_tp1_tokens() {
    let config = ModelConfig::from_hf_json(&tiny_config()).unwrap();
    let dummy = DummyWeights::new(&config, 7).unwrap();
    let cpu = CpuBackend::new();
    let on_device = LlamaModel::load(&cpu, config.clone(), &dummy, &LoadOptions::default(), &mut |_, _| {});
    let host = OnTheHost(dummy.clone());
    let uploaded = LlamaModel::load(&cpu, config.clone(), &host, &LoadOptions::default(), &mut |_, _| {});
    let (want_logits, want) = greedy(&cpu, &on_device.unwrap(), 12);
    // Filled in place, the values are the host's, bit for bit.
    assert_eq!(greedy(&cpu, &uploaded.unwrap(), 12), (want_logits, want.clone()));
    for world in [2, 4] {
        // Each rank fills only its rows and columns of q/k/v, o, gate/up and
        // down (KV heads replicated at 4): the shards the host would cut.
        assert_eq!(sharded_greedy(world, &dummy, &config), want, "TP {world}, filled on the device");
        assert_eq!(sharded_greedy(world, &host, &config), want, "TP {world}, cut on the host");
    }
}

fn refusal(path: &Path, format: LoadFormat) -> String {
    ModelFiles::open_with(path, format).expect_err("refused").to_string()
}

#[test]
fn formats_that_do_not_fit_the_path_are_refused_by_name() {
    for name in ["pt", "npcache", "bitsandbytes"] {
        let e = name.parse::<LoadFormat>().expect_err("refused");
        assert!(e.contains(&format!("--load-format {name} is not supported")), "{e}");
    }
    assert!("safetensor"
        .parse::<LoadFormat>()
        .is_err_and(|e| e.contains("expected auto, safetensors, gguf")));
    for (name, format) in
        [("auto", LoadFormat::Auto), ("gguf", LoadFormat::Gguf), ("dummy", LoadFormat::Dummy)]
    {
        assert_eq!(name.parse::<LoadFormat>(), Ok(format));
        assert_eq!(format.to_string(), name);
    }

    let gguf = fixture("tiny-llama-gguf/tiny-llama.gguf");
    let hf = fixture("tiny-llama");
    assert!(refusal(&gguf, LoadFormat::Dummy).contains("--load-format dummy: dummy weights take their shape"));
    assert!(
        refusal(&gguf, LoadFormat::Safetensors).contains("--load-format safetensors: this is a GGUF model")
    );
    assert!(refusal(&hf, LoadFormat::Gguf).contains("--load-format gguf: this is a Hugging Face folder"));
    assert!(ModelFiles::open_with(&hf, LoadFormat::Safetensors).is_ok());
    assert!(ModelFiles::open_with(&gguf, LoadFormat::Gguf).is_ok());

    // Without weight files, auto says what would load the folder.
    let dir = config_folder(&tiny_config());
    assert!(refusal(dir.path(), LoadFormat::Auto).contains("--load-format dummy"));
    assert!(ModelFiles::open_dummy(tempfile::tempdir().unwrap().path(), 1)
        .is_err_and(|e| e.to_string().contains("needs a folder holding config.json")));

    // A config no file backs can still be impossible: bad sizes, or too large for any device.
    let mut bad = tiny_config();
    bad["num_key_value_heads"] = 3.into();
    let e = refusal(config_folder(&bad).path(), LoadFormat::Dummy);
    assert!(e.contains("num_key_value_heads"), "{e}");
    let mut huge = tiny_config();
    huge["hidden_size"] = (1u64 << 40).into();
    huge["vocab_size"] = (1u64 << 40).into();
    let e = refusal(config_folder(&huge).path(), LoadFormat::Dummy);
    assert!(e.contains("larger than 1024 TiB"), "{e}");
    let mut deep = tiny_config();
    deep["num_hidden_layers"] = (1u64 << 40).into();
    let e = refusal(config_folder(&deep).path(), LoadFormat::Dummy);
    assert!(e.contains("num_hidden_layers 1099511627776 is more than 65536"), "{e}");
}
