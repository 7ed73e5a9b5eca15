//! `pagoda generate`: offline generation of one or more prompts as one batch.
//!
//! Sampling is reproducible: as in vLLM, `--seed` is the engine's seed, from
//! which every request that gives no seed of its own (all of them here) gets
//! one, so the same `--seed`, prompts and options give the same samples.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use pagoda_backend::Backend;
use pagoda_engine::{GenerationRequest, LlmEngine, SamplingParams};
use pagoda_models::ChatMessage;

use crate::backends::{device_label, dispatch, loading_bar, BackendJob, EngineDevices};
use crate::engine_args::EngineArgs;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The prompts; several run together as one continuous batch.
    #[arg(required = true)]
    pub prompts: Vec<String>,
    /// Treat each prompt as a user message and apply the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 means greedy (the default here, so that runs are reproducible).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Samples per prompt.
    #[arg(short, long, default_value_t = 1)]
    pub n: usize,
    /// Stop strings.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    dispatch(args.engine.device, Generate(args))
}

struct Generate(GenerateArgs);

impl BackendJob for Generate {
    type Output = ();

    fn run<B: Backend>(self, devices: EngineDevices<B>) -> anyhow::Result<()> {
        let args = self.0;
        let bar = loading_bar();
        let started = Instant::now();
        let model = args.engine.model_path()?;
        let mut engine = devices
            .load_engine(model, args.engine.engine_config()?, |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .context("loading the model")?; // its errors name the file
        bar.finish_and_clear();
        let device = device_label(&engine);
        eprintln!("loaded {} on {device} in {:.1} s", model.display(), started.elapsed().as_secs_f64());

        let requests = build_requests(&engine, &args)?;
        let num_prompt_tokens: usize = requests.iter().map(|r| r.prompt_token_ids.len()).sum();
        let started = Instant::now();
        let results = if requests.len() == 1 && args.n == 1 {
            stream_one(&mut engine, requests.into_iter().next().expect("one request"))?
        } else {
            let done = engine.generate(requests)?;
            for (prompt, result) in args.prompts.iter().zip(&done) {
                println!("=== {prompt}");
                for seq in &result.seqs {
                    if result.seqs.len() > 1 {
                        println!("--- sample {}", seq.index);
                    }
                    println!("{}", seq.text);
                }
            }
            done.iter().map(|r| r.num_generated_tokens()).sum()
        };
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "{} prompt tokens, {results} generated tokens in {secs:.2} s ({:.1} generated tok/s)",
            num_prompt_tokens,
            results as f64 / secs
        );
        Ok(())
    }
}

fn build_requests<B: Backend>(
    engine: &LlmEngine<B>,
    args: &GenerateArgs,
) -> anyhow::Result<Vec<GenerationRequest>> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        // Each request's seed comes from the engine's `--seed`.
        seed: None,
        ..SamplingParams::default()
    };
    args.prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let prompt_token_ids = prompt_tokens(engine, prompt, args.chat, args.system.as_deref())?;
            let mut req = GenerationRequest::new(format!("generate-{i}"), prompt_token_ids);
            req.sampling = sampling.clone();
            req.max_tokens = Some(args.max_tokens);
            req.n = args.n;
            req.stop = args.stop.clone();
            req.ignore_eos = args.ignore_eos;
            Ok(req)
        })
        .collect()
}

/// The tokens of a text prompt: the text itself, or with `chat` a user
/// message (after an optional system one) through the model's chat template.
pub(crate) fn prompt_tokens<B: Backend>(
    engine: &LlmEngine<B>,
    text: &str,
    chat: bool,
    system: Option<&str>,
) -> anyhow::Result<Vec<u32>> {
    let rendered;
    let text = if chat {
        let Some(template) = engine.chat_template() else {
            bail!("--chat: the model has no chat template");
        };
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", text));
        rendered = template.render(&messages, true)?;
        rendered.as_str()
    } else {
        text
    };
    // A chat template already holds its special tokens.
    Ok(engine.tokenizer().encode(text, !chat)?)
}

/// Runs one request, printing text as it is produced. Returns the tokens generated.
fn stream_one<B: Backend>(engine: &mut LlmEngine<B>, request: GenerationRequest) -> anyhow::Result<usize> {
    engine.add_request(request)?;
    let mut stdout = std::io::stdout().lock();
    let mut generated = 0;
    while engine.has_unfinished_requests() {
        for out in engine.step()? {
            for delta in out.deltas {
                generated += delta.token_ids.len();
                write!(stdout, "{}", delta.text)?;
            }
        }
        stdout.flush()?;
    }
    writeln!(stdout)?;
    Ok(generated)
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use pagoda_backend_cpu_ref::CpuBackend;
    use pagoda_engine::load_engine;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenerateArgs,
    }

    /// Runs `pagoda generate` with these arguments on the tiny random-weight
    /// Llama and returns every sample's tokens, prompt by prompt.
    fn generate(extra: &[&str]) -> Vec<Vec<Vec<u32>>> {
        let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");
        let argv = ["generate", "--model", model, "--device", "cpu", "--max-tokens", "12", "--ignore-eos"];
        let args = Cli::try_parse_from(argv.iter().chain(extra).chain(&["one prompt", "another prompt"]))
            .expect("valid arguments")
            .args;
        let mut engine = load_engine(
            CpuBackend::new(),
            args.engine.model_path().unwrap(),
            args.engine.engine_config().unwrap(),
            |_, _| {},
        )
        .unwrap();
        let requests = build_requests(&engine, &args).unwrap();
        let done = engine.generate(requests).unwrap();
        done.iter().map(|r| r.seqs.iter().map(|s| s.token_ids.clone()).collect()).collect()
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let sampled = ["--temperature", "1.0", "-n", "2"];
        let first = generate(&[&sampled[..], &["--seed", "7"]].concat());
        assert_eq!(first, generate(&[&sampled[..], &["--seed", "7"]].concat()), "same --seed, same samples");
        assert_ne!(
            first,
            generate(&[&sampled[..], &["--seed", "8"]].concat()),
            "another --seed, other samples"
        );
        assert_ne!(first[0][0], first[0][1], "the two samples of a prompt differ");
    }
}
