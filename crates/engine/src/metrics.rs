//! Engine metrics in Prometheus form, named like vLLM's (`pagoda:` instead of
//! `vllm:`) so existing dashboards translate. The engine thread updates them;
//! the server renders the registry at `/metrics`.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// All engine metrics, registered in one registry.
pub struct EngineMetrics {
    registry: Registry,
    pub requests_running: IntGauge,
    pub requests_waiting: IntGauge,
    pub requests_swapped: IntGauge,
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
    pub request_success: IntCounterVec,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_request_latency: Histogram,
    pub request_queue_time: Histogram,
    pub engine_steps: IntCounter,
}

impl EngineMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            r.register(Box::new(m.clone())).expect("metric names are unique and valid");
            m
        }
        let gauge = |name: &str, help: &str| reg(&registry, IntGauge::new(name, help).expect("valid metric"));
        let counter =
            |name: &str, help: &str| reg(&registry, IntCounter::new(name, help).expect("valid metric"));
        let latency = |name: &str, help: &str| {
            let opts =
                HistogramOpts::new(name, help).buckets(exponential_buckets(0.001, 2.0, 18).expect("buckets"));
            reg(&registry, Histogram::with_opts(opts).expect("valid metric"))
        };
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
            e2e_request_latency: latency(
                "pagoda:e2e_request_latency_seconds",
                "Time from arrival to the last token.",
            ),
            request_queue_time: latency(
                "pagoda:request_queue_time_seconds",
                "Time from arrival to the first scheduling.",
            ),
            engine_steps: counter("pagoda:engine_steps_total", "Engine steps run."),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let m = EngineMetrics::new();
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
