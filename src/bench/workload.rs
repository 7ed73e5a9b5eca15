//! Benchmark workloads: a JSONL file of `{"prompt_token_ids": [...],
//! "max_tokens": N}` lines (the format the peers in scripts/peers/ read and
//! write, so Pagoda, vLLM and transformers run the very same requests), or
//! requests generated with fixed lengths, log-normal lengths, ShareGPT-like
//! mixed lengths, or a few long system prompts shared by many requests.
//! `pagoda bench workload` writes a generated one without loading a model.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Lengths {
    /// Every prompt --input-len tokens, every output --output-len.
    Fixed,
    /// Log-normal (sigma 0.8) around the medians --input-len and --output-len,
    /// both clamped to 4..=--max-len.
    Lognormal,
    /// ShareGPT-like: log-normal (sigma 1.0) around the medians --input-len and
    /// --output-len, so short and long prompts mix; prompts clamped to
    /// 4..=--max-len, outputs to 8..=768 tokens.
    Sharegpt,
    /// --num-prefixes system prompts of --prefix-len tokens, each request one
    /// of them (drawn at random) followed by its own --input-len tokens, and
    /// --output-len output tokens: what prefix caching is for.
    SharedPrefix,
}

/// Output lengths of the ShareGPT-like workload: from 8 to 768 tokens.
pub const SHAREGPT_OUTPUT_LENS: std::ops::RangeInclusive<usize> = 8..=768;

#[derive(Args, Debug, Clone)]
pub struct WorkloadArgs {
    /// Read requests from this JSONL file instead of generating them.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Generated workload: number of requests.
    #[arg(long, default_value_t = 256)]
    pub num_prompts: usize,
    /// Generated workload: prompt length (the mean for log-normal lengths).
    #[arg(long, default_value_t = 512)]
    pub input_len: usize,
    /// Generated workload: output length (the mean for log-normal lengths).
    #[arg(long, default_value_t = 256)]
    pub output_len: usize,
    #[arg(long, value_enum, default_value_t = Lengths::Fixed)]
    pub lengths: Lengths,
    /// Generated workload: cap on log-normal lengths.
    #[arg(long, default_value_t = 4096)]
    pub max_len: usize,
    /// Shared-prefix workload: how many distinct system prompts.
    #[arg(long, default_value_t = 4)]
    pub num_prefixes: usize,
    /// Shared-prefix workload: tokens in each system prompt.
    #[arg(long, default_value_t = 1536)]
    pub prefix_len: usize,
    /// Generated workload: this fraction of the requests (spread evenly
    /// through the sequence) are short ones of --short-input-len /
    /// --short-output-len tokens, the rest as above: a stream of long prompts
    /// with short requests among them.
    #[arg(long, default_value_t = 0.0)]
    pub short_fraction: f64,
    /// Generated workload: prompt length of the short requests.
    #[arg(long, default_value_t = 8)]
    pub short_input_len: usize,
    /// Generated workload: output length of the short requests.
    #[arg(long, default_value_t = 8)]
    pub short_output_len: usize,
    /// Generated workload: seed of the lengths and token ids.
    #[arg(long, default_value_t = 0)]
    pub workload_seed: u64,
    /// Also write the requests used to this JSONL file.
    #[arg(long)]
    pub write_dataset: Option<PathBuf>,
}

/// One benchmark request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadRequest {
    pub prompt_token_ids: Vec<u32>,
    pub max_tokens: usize,
}

impl WorkloadArgs {
    /// The requests, with token ids checked against the vocabulary.
    pub fn load(&self, vocab_size: usize) -> anyhow::Result<Vec<WorkloadRequest>> {
        if !(0.0..=1.0).contains(&self.short_fraction) {
            bail!("--short-fraction must be between 0 and 1, got {}", self.short_fraction);
        }
        if self.dataset.is_none() && self.lengths == Lengths::SharedPrefix && self.num_prefixes == 0 {
            bail!("--num-prefixes must be at least 1 for --lengths shared-prefix");
        }
        let requests = match &self.dataset {
            Some(path) => read_jsonl(path)?,
            None => self.generate(vocab_size),
        };
        for (i, r) in requests.iter().enumerate() {
            if r.prompt_token_ids.is_empty() || r.max_tokens == 0 {
                bail!("request {i}: empty prompt or max_tokens 0");
            }
            if let Some(t) = r.prompt_token_ids.iter().find(|&&t| t as usize >= vocab_size) {
                bail!("request {i}: token id {t} is outside the model's vocabulary of {vocab_size}");
            }
        }
        if let Some(path) = &self.write_dataset {
            let mut f =
                std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
            for r in &requests {
                writeln!(f, "{}", serde_json::to_string(r)?)?;
            }
        }
        Ok(requests)
    }

    fn generate(&self, vocab_size: usize) -> Vec<WorkloadRequest> {
        let mut rng = StdRng::seed_from_u64(self.workload_seed);
        // The shared system prompts, drawn before any request.
        let prefixes: Vec<Vec<u32>> = match self.lengths {
            Lengths::SharedPrefix => (0..self.num_prefixes)
                .map(|_| random_tokens(self.prefix_len, vocab_size, rng.random()))
                .collect(),
            _ => Vec::new(),
        };
        (0..self.num_prompts)
            .map(|i| {
                let mut prefix: &[u32] = &[];
                let (input, output) = match self.lengths {
                    _ if self.is_short(i) => (self.short_input_len, self.short_output_len),
                    Lengths::Fixed => (self.input_len, self.output_len),
                    Lengths::Lognormal => (
                        lognormal(&mut rng, self.input_len as f64, 0.8).clamp(4, self.max_len),
                        lognormal(&mut rng, self.output_len as f64, 0.8).clamp(4, self.max_len),
                    ),
                    Lengths::Sharegpt => (
                        lognormal(&mut rng, self.input_len as f64, 1.0).clamp(4, self.max_len.max(4)),
                        lognormal(&mut rng, self.output_len as f64, 1.0)
                            .clamp(*SHAREGPT_OUTPUT_LENS.start(), *SHAREGPT_OUTPUT_LENS.end()),
                    ),
                    Lengths::SharedPrefix => {
                        prefix = &prefixes[rng.random_range(0..prefixes.len())];
                        (self.input_len, self.output_len)
                    }
                };
                let seed = rng.random();
                WorkloadRequest {
                    prompt_token_ids: [prefix, &random_tokens(input, vocab_size, seed)].concat(),
                    max_tokens: output,
                }
            })
            .collect()
    }
}

impl WorkloadArgs {
    /// Whether generated request `i` is a short one: the shorts are spread
    /// evenly, `short_fraction` of every stretch of requests.
    fn is_short(&self, i: usize) -> bool {
        let shorts_before = |n: usize| (n as f64 * self.short_fraction).floor() as usize;
        shorts_before(i + 1) > shorts_before(i)
    }
}

/// `pagoda bench workload`: a generated workload written as JSONL, with no
/// model loaded, for every engine of a comparison to read with `--dataset`.
#[derive(Args, Debug)]
pub struct WriteWorkloadArgs {
    /// Token ids are drawn below this: the model's vocabulary size (Llama 3: 128256).
    #[arg(long)]
    pub vocab_size: usize,
    #[command(flatten)]
    pub workload: WorkloadArgs,
}

/// Writes the workload to `--write-dataset` and prints what it holds.
pub fn write(args: WriteWorkloadArgs) -> anyhow::Result<()> {
    let Some(path) = &args.workload.write_dataset else {
        bail!("--write-dataset FILE is required: where to write the requests");
    };
    let requests = args.workload.load(args.vocab_size)?;
    println!("{}: {}", path.display(), WorkloadSummary::of(&requests));
    Ok(())
}

/// Sizes of a workload's requests, for a one-line description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSummary {
    pub requests: usize,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// (min, median, max) of the prompt lengths.
    pub prompt_lens: (usize, usize, usize),
    /// (min, median, max) of `max_tokens`.
    pub output_lens: (usize, usize, usize),
}

impl WorkloadSummary {
    pub fn of(requests: &[WorkloadRequest]) -> Self {
        fn spread(mut v: Vec<usize>) -> (usize, usize, usize) {
            v.sort_unstable();
            match v.len() {
                0 => (0, 0, 0),
                n => (v[0], v[n / 2], v[n - 1]),
            }
        }
        Self {
            requests: requests.len(),
            prompt_tokens: requests.iter().map(|r| r.prompt_token_ids.len()).sum(),
            output_tokens: requests.iter().map(|r| r.max_tokens).sum(),
            prompt_lens: spread(requests.iter().map(|r| r.prompt_token_ids.len()).collect()),
            output_lens: spread(requests.iter().map(|r| r.max_tokens).collect()),
        }
    }
}

impl std::fmt::Display for WorkloadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (pmin, pmed, pmax) = self.prompt_lens;
        let (omin, omed, omax) = self.output_lens;
        write!(
            f,
            "{} requests; prompts {} tokens (min {pmin}, median {pmed}, max {pmax}); \
             outputs {} tokens (min {omin}, median {omed}, max {omax})",
            self.requests, self.prompt_tokens, self.output_tokens
        )
    }
}

/// `len` token ids drawn uniformly from the vocabulary, away from its ends
/// (where special tokens live).
pub fn random_tokens(len: usize, vocab_size: usize, seed: u64) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (lo, hi) = if vocab_size > 40 { (10, vocab_size - 10) } else { (0, vocab_size) };
    (0..len).map(|_| rng.random_range(lo..hi) as u32).collect()
}

/// A log-normal draw whose median is `median` (as hf_peer.py draws them).
fn lognormal(rng: &mut StdRng, median: f64, sigma: f64) -> usize {
    // Box-Muller.
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    (median.ln() + sigma * z).exp() as usize
}

fn read_jsonl(path: &PathBuf) -> anyhow::Result<Vec<WorkloadRequest>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in BufReader::new(f).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let r: WorkloadRequest = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a workload request", path.display(), n + 1))?;
        out.push(r);
    }
    if out.is_empty() {
        bail!("{}: no requests", path.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> WorkloadArgs {
        WorkloadArgs {
            dataset: None,
            num_prompts: 50,
            input_len: 100,
            output_len: 20,
            lengths: Lengths::Lognormal,
            max_len: 300,
            num_prefixes: 4,
            prefix_len: 64,
            short_fraction: 0.0,
            short_input_len: 8,
            short_output_len: 8,
            workload_seed: 3,
            write_dataset: None,
        }
    }

    #[test]
    fn a_mixed_workload_spreads_its_short_requests() {
        let mixed = WorkloadArgs { lengths: Lengths::Fixed, num_prompts: 12, short_fraction: 0.25, ..args() };
        let lens: Vec<usize> = mixed.load(1000).unwrap().iter().map(|r| r.prompt_token_ids.len()).collect();
        assert_eq!(lens, [100, 100, 100, 8, 100, 100, 100, 8, 100, 100, 100, 8]);
        assert!(WorkloadArgs { short_fraction: 1.5, ..args() }.load(1000).is_err());
    }

    #[test]
    fn generated_workloads_are_reproducible_and_in_range() {
        let a = args().load(1000).unwrap();
        assert_eq!(a, args().load(1000).unwrap());
        assert_eq!(a.len(), 50);
        assert!(a.iter().all(|r| (4..=300).contains(&r.prompt_token_ids.len())));
        assert!(a.iter().flat_map(|r| &r.prompt_token_ids).all(|&t| (10..990).contains(&t)));
    }

    #[test]
    fn jsonl_round_trip_and_vocab_check() {
        let dir = std::env::temp_dir().join(format!("pagoda-workload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.jsonl");
        let written = WorkloadArgs { write_dataset: Some(path.clone()), lengths: Lengths::Fixed, ..args() };
        let a = written.load(1000).unwrap();
        let read = WorkloadArgs { dataset: Some(path.clone()), ..args() };
        assert_eq!(read.load(1000).unwrap(), a);
        assert!(read.load(50).is_err(), "ids beyond a 50-token vocabulary must be refused");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_sharegpt_workload_mixes_short_and_long_requests() {
        let w = WorkloadArgs {
            lengths: Lengths::Sharegpt,
            num_prompts: 1000,
            input_len: 160,
            output_len: 128,
            max_len: 2048,
            ..args()
        };
        let a = w.load(128256).unwrap();
        assert_eq!(a, w.load(128256).unwrap(), "seeded");
        let s = WorkloadSummary::of(&a);
        assert!(a.iter().all(|r| SHAREGPT_OUTPUT_LENS.contains(&r.max_tokens)), "{s:?}");
        assert!(a.iter().all(|r| (4..=2048).contains(&r.prompt_token_ids.len())), "{s:?}");
        // Medians near the asked ones; both tails present (sigma 1.0: 5% under 0.19x, 5% over 5.2x).
        assert!((130..=190).contains(&s.prompt_lens.1) && (105..=155).contains(&s.output_lens.1), "{s:?}");
        assert!(s.prompt_lens.0 < 40 && s.prompt_lens.2 > 1000, "{s:?}");
        assert!(s.output_lens.0 < 30 && s.output_lens.2 == 768, "{s:?}");
        assert!(a.iter().flat_map(|r| &r.prompt_token_ids).all(|&t| (10..128246).contains(&t)));
    }

    #[test]
    fn a_shared_prefix_workload_reuses_a_few_system_prompts() {
        let w = WorkloadArgs { lengths: Lengths::SharedPrefix, num_prompts: 64, input_len: 16, ..args() };
        let a = w.load(1000).unwrap();
        assert_eq!(a, w.load(1000).unwrap(), "seeded");
        assert!(a.iter().all(|r| r.prompt_token_ids.len() == 64 + 16 && r.max_tokens == 20));
        let mut prefixes: Vec<&[u32]> = a.iter().map(|r| &r.prompt_token_ids[..64]).collect();
        prefixes.sort();
        prefixes.dedup();
        assert_eq!(prefixes.len(), 4, "every one of the 4 system prompts is used, and no other");
        // The requests' own parts differ.
        let mut own: Vec<&[u32]> = a.iter().map(|r| &r.prompt_token_ids[64..]).collect();
        own.sort();
        own.dedup();
        assert_eq!(own.len(), 64);
        let none = WorkloadArgs { num_prefixes: 0, ..w };
        assert!(none.load(1000).is_err());
    }

    #[test]
    fn the_summary_names_the_sizes() {
        let w = WorkloadArgs { lengths: Lengths::Fixed, num_prompts: 3, ..args() };
        let s = WorkloadSummary::of(&w.load(1000).unwrap());
        assert_eq!(s.to_string(), "3 requests; prompts 300 tokens (min 100, median 100, max 100); outputs 60 tokens (min 20, median 20, max 20)");
    }
}
