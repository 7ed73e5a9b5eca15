//! Engine metrics in Prometheus form, named like vLLM's (`pagoda:` instead of
//! `vllm:`) so existing dashboards translate: the same families, units and
//! meanings, every series labelled with the served `model_name` when the
//! server renders them ([`EngineMetrics::render_labelled`]). The engine
//! thread updates them; the server renders the registry at `/metrics`.

use prometheus::proto::LabelPair;
use prometheus::{
    exponential_buckets, Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// 1, 2, 5, 10, 20, 50... up to `max` (vLLM's buckets for token counts).
fn buckets_1_2_5(max: usize) -> Vec<f64> {
    let mut buckets = Vec::new();
    let mut exponent = 1.0;
    loop {
        for mantissa in [1.0, 2.0, 5.0] {
            let value = mantissa * exponent;
            if value > max as f64 {
                return buckets;
            }
            buckets.push(value);
        }
        exponent *= 10.0;
    }
}

/// Seconds buckets of the per-request phase times (vLLM's).
const PHASE_SECONDS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
];

/// All engine metrics, registered in one registry.
pub struct EngineMetrics {
    registry: Registry,
    pub requests_running: IntGauge,
    pub requests_waiting: IntGauge,
    pub requests_swapped: IntGauge,
    /// vLLM's `lora_requests_info`: one series, its value the time of the
    /// update, its labels the adapters of running and of waiting requests
    /// (comma-separated names) and `max_lora`. Only with LoRA on.
    pub lora_requests_info: GaugeVec,
    /// The label values of the series `lora_requests_info` holds now.
    lora_info_labels: std::sync::Mutex<Option<[String; 3]>>,
    pub kv_blocks_total: IntGauge,
    pub kv_blocks_used: IntGauge,
    pub kv_blocks_free: IntGauge,
    pub kv_blocks_cached: IntGauge,
    /// Fraction of KV blocks in use, 0..1 (vLLM's `kv_cache_usage_perc`).
    pub kv_cache_usage: prometheus::Gauge,
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    pub preemptions: IntCounter,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    /// One per finished request (all its samples), by the finish reason of
    /// its first sample (`abort` if it was aborted).
    pub request_success: IntCounterVec,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    /// vLLM's older name of the inter-token latency, kept for dashboards that read it.
    pub time_per_output_token: Histogram,
    pub e2e_request_latency: Histogram,
    pub request_queue_time: Histogram,
    /// First scheduled to first token.
    pub request_prefill_time: Histogram,
    /// First token to last token.
    pub request_decode_time: Histogram,
    /// First scheduled to last token.
    pub request_inference_time: Histogram,
    /// Per request: (end-to-end latency - TTFT) / (output tokens of its longest sample - 1).
    pub request_time_per_output_token: Histogram,
    pub request_prompt_tokens: Histogram,
    /// Output tokens of a request, all samples together.
    pub request_generation_tokens: Histogram,
    /// Output tokens of a request's longest sample.
    pub request_max_num_generation_tokens: Histogram,
    pub request_params_n: Histogram,
    pub request_params_max_tokens: Histogram,
    /// Tokens (prompt and output) per engine step.
    pub iteration_tokens: Histogram,
    pub engine_steps: IntCounter,
    /// Speculative decoding (vLLM's `spec_decode_*`): verifications (decodes
    /// that carried drafts), draft tokens verified, drafts accepted, and
    /// accepted drafts by their position in the proposal.
    pub spec_decode_num_drafts: IntCounter,
    pub spec_decode_num_draft_tokens: IntCounter,
    pub spec_decode_num_accepted_tokens: IntCounter,
    pub spec_decode_num_accepted_tokens_per_pos: IntCounterVec,
    /// Structured outputs' fast-forward: tokens a grammar forced, proposed
    /// as drafts, and those the model's own samples confirmed.
    pub fast_forward_draft_tokens: IntCounter,
    pub fast_forward_accepted_tokens: IntCounter,
}

impl EngineMetrics {
    /// Metrics for an engine of `max_model_len` tokens of context and a step
    /// budget of `max_num_batched_tokens` (bucket bounds of the token histograms).
    pub fn new(max_model_len: usize, max_num_batched_tokens: usize) -> Self {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            r.register(Box::new(m.clone())).expect("metric names are unique and valid");
            m
        }
        let gauge = |name: &str, help: &str| reg(&registry, IntGauge::new(name, help).expect("valid metric"));
        let counter =
            |name: &str, help: &str| reg(&registry, IntCounter::new(name, help).expect("valid metric"));
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let opts = HistogramOpts::new(name, help).buckets(buckets);
            reg(&registry, Histogram::with_opts(opts).expect("valid metric"))
        };
        let latency = |name: &str, help: &str| {
            histogram(name, help, exponential_buckets(0.001, 2.0, 18).expect("buckets"))
        };
        let phase = |name: &str, help: &str| histogram(name, help, PHASE_SECONDS.to_vec());
        let tokens = |name: &str, help: &str| histogram(name, help, buckets_1_2_5(max_model_len.max(1)));
        let mut step_buckets: Vec<f64> = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
            .iter()
            .map(|&b| b as f64)
            .collect();
        step_buckets.retain(|&b| b < max_num_batched_tokens as f64);
        step_buckets.push(max_num_batched_tokens.max(1) as f64);
        Self {
            requests_running: gauge("pagoda:num_requests_running", "Sequences running on the device."),
            requests_waiting: gauge("pagoda:num_requests_waiting", "Sequences waiting to be scheduled."),
            requests_swapped: gauge("pagoda:num_requests_swapped", "Sequences swapped out to the CPU pool."),
            kv_blocks_total: gauge("pagoda:kv_cache_blocks_total", "KV cache blocks on the device."),
            kv_blocks_used: gauge("pagoda:kv_cache_blocks_used", "KV cache blocks held by sequences."),
            kv_blocks_free: gauge(
                "pagoda:kv_cache_blocks_free",
                "KV cache blocks free (cached ones included).",
            ),
            kv_blocks_cached: gauge(
                "pagoda:kv_cache_blocks_cached",
                "Free KV cache blocks still holding a reusable prefix.",
            ),
            kv_cache_usage: reg(
                &registry,
                prometheus::Gauge::new("pagoda:kv_cache_usage_perc", "KV cache usage, 1 means 100 percent.")
                    .expect("valid metric"),
            ),
            prefix_cache_queries: counter(
                "pagoda:prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
            ),
            prefix_cache_hits: counter(
                "pagoda:prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache.",
            ),
            preemptions: counter("pagoda:num_preemptions_total", "Sequences preempted."),
            prompt_tokens: counter("pagoda:prompt_tokens_total", "Prompt tokens processed."),
            generation_tokens: counter("pagoda:generation_tokens_total", "Tokens generated."),
            request_success: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new("pagoda:request_success_total", "Finished requests by finish reason."),
                    &["finished_reason"],
                )
                .expect("valid metric"),
            ),
            time_to_first_token: latency(
                "pagoda:time_to_first_token_seconds",
                "Time from arrival to the first token.",
            ),
            inter_token_latency: latency("pagoda:inter_token_latency_seconds", "Time between output tokens."),
            time_per_output_token: latency(
                "pagoda:time_per_output_token_seconds",
                "Time between output tokens (the older name of the inter-token latency).",
            ),
            request_prefill_time: phase(
                "pagoda:request_prefill_time_seconds",
                "Time from a request's first scheduling to its first token.",
            ),
            request_decode_time: phase(
                "pagoda:request_decode_time_seconds",
                "Time from a request's first token to its last.",
            ),
            request_inference_time: phase(
                "pagoda:request_inference_time_seconds",
                "Time from a request's first scheduling to its last token.",
            ),
            request_time_per_output_token: latency(
                "pagoda:request_time_per_output_token_seconds",
                "Per request, the mean time between its output tokens after the first.",
            ),
            request_prompt_tokens: tokens(
                "pagoda:request_prompt_tokens",
                "Prompt tokens of a finished request.",
            ),
            request_generation_tokens: tokens(
                "pagoda:request_generation_tokens",
                "Output tokens of a finished request (all samples).",
            ),
            request_max_num_generation_tokens: tokens(
                "pagoda:request_max_num_generation_tokens",
                "Output tokens of a finished request's longest sample.",
            ),
            request_params_n: histogram(
                "pagoda:request_params_n",
                "The n parameter of finished requests.",
                vec![1.0, 2.0, 5.0, 10.0, 20.0],
            ),
            request_params_max_tokens: tokens(
                "pagoda:request_params_max_tokens",
                "The max_tokens parameter of finished requests.",
            ),
            iteration_tokens: histogram(
                "pagoda:iteration_tokens_total",
                "Tokens (prompt and output) per engine step.",
                step_buckets,
            ),
            e2e_request_latency: latency(
                "pagoda:e2e_request_latency_seconds",
                "Time from arrival to the last token.",
            ),
            request_queue_time: latency(
                "pagoda:request_queue_time_seconds",
                "Time from arrival to the first scheduling.",
            ),
            engine_steps: counter("pagoda:engine_steps_total", "Engine steps run."),
            spec_decode_num_drafts: counter(
                "pagoda:spec_decode_num_drafts_total",
                "Speculative decoding: decodes that verified draft tokens.",
            ),
            spec_decode_num_draft_tokens: counter(
                "pagoda:spec_decode_num_draft_tokens_total",
                "Speculative decoding: draft tokens verified.",
            ),
            spec_decode_num_accepted_tokens: counter(
                "pagoda:spec_decode_num_accepted_tokens_total",
                "Speculative decoding: draft tokens accepted.",
            ),
            fast_forward_draft_tokens: counter(
                "pagoda:structured_output_fast_forward_draft_tokens_total",
                "Structured outputs: tokens a grammar forced, proposed as drafts.",
            ),
            fast_forward_accepted_tokens: counter(
                "pagoda:structured_output_fast_forward_accepted_tokens_total",
                "Structured outputs: forced tokens accepted (the model sampled them too).",
            ),
            lora_requests_info: GaugeVec::new(
                Opts::new("pagoda:lora_requests_info", "Running stats on LoRA requests."),
                &["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            )
            .expect("valid metric"),
            lora_info_labels: std::sync::Mutex::new(None),
            spec_decode_num_accepted_tokens_per_pos: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "pagoda:spec_decode_num_accepted_tokens_per_pos_total",
                        "Speculative decoding: draft tokens accepted, by position in the proposal (0-based).",
                    ),
                    &["position"],
                )
                .expect("valid metric"),
            ),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    /// Registers `lora_requests_info` (an engine that serves LoRA adapters).
    pub(crate) fn enable_lora_info(&self) {
        self.registry.register(Box::new(self.lora_requests_info.clone())).expect("registered once");
    }

    /// Sets `lora_requests_info` to the adapters of running and waiting
    /// requests (its one series replaced when they change).
    pub(crate) fn set_lora_info(&self, max_lora: usize, running: &[&str], waiting: &[&str]) {
        let labels = [max_lora.to_string(), running.join(","), waiting.join(",")];
        let mut held = self.lora_info_labels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = held.as_ref().filter(|old| **old != labels) {
            let _ = self.lora_requests_info.remove_label_values(&[&old[0], &old[1], &old[2]]);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.lora_requests_info.with_label_values(&[&labels[0], &labels[1], &labels[2]]).set(now);
        *held = Some(labels);
    }

    /// Counts a step's verifications: `(drafted, accepted)` each.
    pub(crate) fn record_speculation(&self, verifications: &[(usize, usize)]) {
        for &(drafted, accepted) in verifications {
            self.spec_decode_num_drafts.inc();
            self.spec_decode_num_draft_tokens.inc_by(drafted as u64);
            self.spec_decode_num_accepted_tokens.inc_by(accepted as u64);
            for position in 0..accepted {
                self.spec_decode_num_accepted_tokens_per_pos
                    .with_label_values(&[&position.to_string()])
                    .inc();
            }
        }
    }

    pub fn render(&self) -> String {
        self.render_labelled(&[])
    }

    /// The exposition with `labels` added to every series (the server adds
    /// `model_name`, as vLLM's series carry it).
    pub fn render_labelled(&self, labels: &[(&str, &str)]) -> String {
        let mut families = self.registry.gather();
        for family in &mut families {
            for metric in family.mut_metric() {
                let mut pairs = metric.take_label();
                for (name, value) in labels {
                    let mut pair = LabelPair::default();
                    pair.set_name(name.to_string());
                    pair.set_value(value.to_string());
                    pairs.push(pair);
                }
                metric.set_label(pairs);
            }
        }
        let mut buf = Vec::new();
        TextEncoder::new().encode(&families, &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_buckets_go_1_2_5_up_to_the_limit() {
        assert_eq!(buckets_1_2_5(60), vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0]);
        assert_eq!(buckets_1_2_5(1), vec![1.0]);
    }

    #[test]
    fn every_series_can_carry_the_model_name() {
        let m = EngineMetrics::new(512, 256);
        m.request_success.with_label_values(&["stop"]).inc();
        m.iteration_tokens.observe(300.0);
        let text = m.render_labelled(&[("model_name", "m")]);
        assert!(text.contains("pagoda:num_requests_running{model_name=\"m\"} 0"), "{text}");
        assert!(
            text.contains("pagoda:request_success_total{finished_reason=\"stop\",model_name=\"m\"} 1"),
            "{text}"
        );
        // The step budget is the top bucket below +Inf.
        assert!(
            text.contains("pagoda:iteration_tokens_total_bucket{model_name=\"m\",le=\"256\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("pagoda:iteration_tokens_total_bucket{model_name=\"m\",le=\"+Inf\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn renders_every_family() {
        let m = EngineMetrics::new(512, 256);
        m.prompt_tokens.inc_by(7);
        m.request_success.with_label_values(&["stop"]).inc();
        m.time_to_first_token.observe(0.02);
        let text = m.render();
        assert!(text.contains("pagoda:prompt_tokens_total 7"));
        assert!(text.contains("pagoda:request_success_total{finished_reason=\"stop\"} 1"));
        assert!(text.contains("pagoda:time_to_first_token_seconds_bucket"));
        assert!(text.contains("pagoda:num_requests_running 0"));
    }
}
