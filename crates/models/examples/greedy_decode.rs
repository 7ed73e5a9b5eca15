//! Single-sequence greedy decoding on the CPU reference backend, timed.
//!
//! ```text
//! bash scripts/fetch-model.sh
//! cargo run --release -p pagoda-models --example greedy_decode -- \
//!     [--model models/smollm2-135m-instruct] [--tokens 128] [--prompt "..."]
//! ```
//! Prints the completion, then prefill and decode throughput.

use std::time::Instant;

use pagoda_backend::{Backend, SamplingParams, SamplingRow, Tensor, TokenId};
use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_models::{ChatMessage, LoadOptions, ModelFiles, SingleSequence};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut model_path = "models/smollm2-135m-instruct".to_string();
    let mut new_tokens = 128usize;
    let mut prompt = "Write a short story about a lighthouse keeper.".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--model" => model_path = value,
            "--tokens" => new_tokens = value.parse()?,
            "--prompt" => prompt = value,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }

    let cpu = CpuBackend::new();
    let t0 = Instant::now();
    let files = ModelFiles::open(&model_path)?;
    let model = files.load_model(
        &cpu,
        &LoadOptions { max_positions: Some(4096), ..Default::default() },
        &mut |_, _| {},
    )?;
    eprintln!("loaded {} in {:.2?}", files.source.path().display(), t0.elapsed());

    let text = match &files.chat_template {
        Some(t) => t.render(&[ChatMessage::new("user", prompt)], true)?,
        None => prompt,
    };
    let ids = files.tokenizer.encode(&text, true)?;
    let mut seq = SingleSequence::new(&cpu, &model, ids.len() + new_tokens + 1, 16)?;
    let params = SamplingParams::greedy();
    let sample =
        |logits: &Tensor<CpuBackend>, out: &[TokenId]| -> Result<TokenId, Box<dyn std::error::Error>> {
            let row = SamplingRow {
                params: &params,
                seed: 0,
                step: 0,
                prompt_tokens: &[],
                output_tokens: out,
                allowed_tokens: None,
            };
            Ok(cpu.sample(logits, &[row])?[0].token)
        };

    let t_prefill = Instant::now();
    let logits = seq.step(&cpu, &ids, 1)?;
    let mut out = vec![sample(&logits, &[])?];
    let prefill = t_prefill.elapsed();

    // Decode ignores EOS so every run times the same number of steps.
    let t_decode = Instant::now();
    while out.len() < new_tokens {
        let last = *out.last().unwrap_or(&0);
        let logits = seq.step(&cpu, &[last], 1)?;
        out.push(sample(&logits, &out)?);
    }
    let decode = t_decode.elapsed();

    let eos = &files.generation.eos_token_ids;
    let shown: Vec<TokenId> = out.iter().copied().take_while(|t| !eos.contains(t)).collect();
    println!("{}", files.tokenizer.decode(&shown, true)?);
    println!(
        "prompt {} tokens: prefill {:.1} ms ({:.0} tok/s); decode {} tokens in {:.2} s = {:.1} tok/s ({:.1} ms/token); {} threads",
        ids.len(),
        prefill.as_secs_f64() * 1e3,
        ids.len() as f64 / prefill.as_secs_f64(),
        out.len() - 1,
        decode.as_secs_f64(),
        (out.len() - 1) as f64 / decode.as_secs_f64(),
        decode.as_secs_f64() * 1e3 / (out.len() - 1) as f64,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    );
    Ok(())
}
