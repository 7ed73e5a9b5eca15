//! Request traces: a synthetic ShareGPT-like generator and a JSONL reader.

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

use super::SimError;

/// One request of a trace.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// Seconds since the start of the trace.
    pub arrival: f64,
    pub prompt_len: usize,
    /// Tokens the request generates (the simulator ignores EOS and stops
    /// exactly here).
    pub output_len: usize,
}

/// Requests in arrival order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    pub requests: Vec<TraceRequest>,
}

/// A synthetic trace: Poisson arrivals, log-normal prompt and output lengths.
///
/// The defaults follow the ShareGPT statistics the vLLM paper reports (mean
/// input 161 and output 338 tokens, long-tailed), with sequences capped at
/// the model length as in its experiments.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SyntheticTrace {
    pub num_requests: usize,
    /// Mean arrivals per second; infinite puts every request at time 0.
    pub request_rate: f64,
    pub mean_prompt_len: f64,
    pub mean_output_len: f64,
    /// Standard deviation of the lengths' logarithms (spread of the tail).
    pub sigma_prompt: f64,
    pub sigma_output: f64,
    /// Prompt plus output never exceeds this.
    pub max_model_len: usize,
    pub seed: u64,
}

impl Default for SyntheticTrace {
    fn default() -> Self {
        Self {
            num_requests: 1000,
            request_rate: 2.0,
            mean_prompt_len: 161.0,
            mean_output_len: 338.0,
            sigma_prompt: 1.0,
            sigma_output: 1.0,
            max_model_len: 2048,
            seed: 0,
        }
    }
}

/// SplitMix64: a small, fast, well-mixed generator, so that traces are
/// identical on every platform and dependency version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so its logarithm is finite.
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.unit(), self.unit());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Log-normal with the given mean and log-space standard deviation.
    fn lognormal(&mut self, mean: f64, sigma: f64) -> f64 {
        let mu = mean.ln() - sigma * sigma / 2.0;
        (mu + sigma * self.normal()).exp()
    }
}

impl SyntheticTrace {
    pub fn generate(&self) -> Result<Trace, SimError> {
        if self.max_model_len < 2 {
            return Err(SimError::InvalidTrace("max_model_len must be at least 2".into()));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !(positive(self.mean_prompt_len) && positive(self.mean_output_len)) {
            return Err(SimError::InvalidTrace("mean lengths must be positive".into()));
        }
        let spread = |x: f64| x.is_finite() && x >= 0.0;
        if !(spread(self.sigma_prompt) && spread(self.sigma_output)) {
            return Err(SimError::InvalidTrace("sigmas must be non-negative".into()));
        }
        if self.request_rate.is_nan() || self.request_rate <= 0.0 {
            return Err(SimError::InvalidTrace("request rate must be positive".into()));
        }
        let mut rng = SplitMix64(self.seed);
        let mut t = 0.0;
        let mut requests = Vec::with_capacity(self.num_requests);
        for _ in 0..self.num_requests {
            if self.request_rate.is_finite() {
                t += -rng.unit().ln() / self.request_rate;
            }
            let prompt = rng.lognormal(self.mean_prompt_len, self.sigma_prompt).round() as usize;
            let prompt_len = prompt.clamp(1, self.max_model_len - 1);
            let output = rng.lognormal(self.mean_output_len, self.sigma_output).round() as usize;
            let output_len = output.clamp(1, self.max_model_len - prompt_len);
            requests.push(TraceRequest { arrival: t, prompt_len, output_len });
        }
        Ok(Trace { requests })
    }
}

impl Trace {
    /// Reads one JSON object per line: `{"arrival": 0.5, "prompt_len": 161,
    /// "output_len": 338}` (other fields are ignored; blank lines skipped).
    /// Requests are sorted by arrival.
    pub fn from_jsonl(reader: impl BufRead) -> Result<Trace, SimError> {
        let mut requests = Vec::new();
        for (i, line) in reader.lines().enumerate() {
            let line = line.map_err(|e| SimError::Io(e.to_string()))?;
            if line.trim().is_empty() {
                continue;
            }
            let bad = |message: String| SimError::TraceLine { line: i + 1, message };
            let r: TraceRequest = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
            if !(r.arrival.is_finite() && r.arrival >= 0.0) {
                return Err(bad(format!("arrival must be a finite, non-negative time, got {}", r.arrival)));
            }
            if r.prompt_len == 0 || r.output_len == 0 {
                return Err(bad("prompt_len and output_len must be at least 1".into()));
            }
            requests.push(r);
        }
        requests.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
        Ok(Trace { requests })
    }

    pub fn write_jsonl(&self, mut w: impl Write) -> Result<(), SimError> {
        for r in &self.requests {
            let line = serde_json::to_string(r).map_err(|e| SimError::Io(e.to_string()))?;
            writeln!(w, "{line}").map_err(|e| SimError::Io(e.to_string()))?;
        }
        Ok(())
    }

    pub fn mean_prompt_len(&self) -> f64 {
        mean(self.requests.iter().map(|r| r.prompt_len))
    }

    pub fn mean_output_len(&self) -> f64 {
        mean(self.requests.iter().map(|r| r.output_len))
    }
}

fn mean(xs: impl ExactSizeIterator<Item = usize>) -> f64 {
    let n = xs.len();
    if n == 0 {
        0.0
    } else {
        xs.sum::<usize>() as f64 / n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_lengths_match_the_requested_means_and_caps() {
        let t = SyntheticTrace { num_requests: 20_000, ..Default::default() }.generate().unwrap();
        assert_eq!(t.requests.len(), 20_000);
        // Capping at the model length trims the tail a little.
        assert!((t.mean_prompt_len() - 161.0).abs() < 10.0, "{}", t.mean_prompt_len());
        assert!((t.mean_output_len() - 338.0).abs() < 20.0, "{}", t.mean_output_len());
        assert!(t
            .requests
            .iter()
            .all(|r| r.prompt_len >= 1 && r.output_len >= 1 && r.prompt_len + r.output_len <= 2048));
        assert!(t.requests.windows(2).all(|w| w[0].arrival <= w[1].arrival));
        // Poisson at 2/s: 20000 requests take about 10000 s.
        let span = t.requests.last().unwrap().arrival;
        assert!((span - 10_000.0).abs() < 500.0, "{span}");
        // Same seed, same trace.
        assert_eq!(t, SyntheticTrace { num_requests: 20_000, ..Default::default() }.generate().unwrap());
    }

    #[test]
    fn infinite_rate_puts_everything_at_zero() {
        let t = SyntheticTrace { num_requests: 5, request_rate: f64::INFINITY, ..Default::default() };
        assert!(t.generate().unwrap().requests.iter().all(|r| r.arrival == 0.0));
        assert!(SyntheticTrace { request_rate: 0.0, ..Default::default() }.generate().is_err());
    }

    #[test]
    fn jsonl_round_trip_and_errors_name_the_line() {
        let t = SyntheticTrace { num_requests: 10, ..Default::default() }.generate().unwrap();
        let mut buf = Vec::new();
        t.write_jsonl(&mut buf).unwrap();
        assert_eq!(Trace::from_jsonl(&buf[..]).unwrap(), t);
        let text = "{\"arrival\": 1.0, \"prompt_len\": 3, \"output_len\": 2, \"note\": \"x\"}\n\n\
                    {\"arrival\": 0.5, \"prompt_len\": 4, \"output_len\": 1}\n";
        let t = Trace::from_jsonl(text.as_bytes()).unwrap();
        assert_eq!(t.requests[0].prompt_len, 4, "sorted by arrival");
        let bad = "{\"arrival\": 1.0, \"prompt_len\": 3, \"output_len\": 2}\n{\"arrival\": 1.0}\n";
        assert!(matches!(Trace::from_jsonl(bad.as_bytes()), Err(SimError::TraceLine { line: 2, .. })));
        let zero = "{\"arrival\": 1.0, \"prompt_len\": 0, \"output_len\": 2}\n";
        assert!(matches!(Trace::from_jsonl(zero.as_bytes()), Err(SimError::TraceLine { line: 1, .. })));
    }
}
