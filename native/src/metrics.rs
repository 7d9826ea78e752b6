//! The server's Prometheus metrics (`GET /metrics`, the OpenMetrics text format), kept
//! with the `prometheus-client` crate: the engine and the HTTP side update them, a scrape
//! encodes them.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

pub struct Metrics {
    registry: Registry,
    /// Requests accepted and waiting for a slot.
    pub queue_depth: Gauge,
    /// Requests being answered.
    pub running: Gauge,
    /// Requests by outcome: ok, cancelled (the client left), invalid, error, rejected
    /// (queue full), unauthorized.
    requests: Family<Labels, Counter>,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    /// Tokens a second over the running requests, at the last batched decode step.
    pub decode_tok_s: Gauge<f64, AtomicU64>,
    /// From a request's arrival to its first token.
    pub ttft: Histogram,
    media_cache: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vidllm");
        let queue_depth = Gauge::default();
        let running = Gauge::default();
        let requests = Family::<Labels, Counter>::default();
        let prompt_tokens = Counter::default();
        let generated_tokens = Counter::default();
        let decode_tok_s = Gauge::<f64, AtomicU64>::default();
        let ttft = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        let media_cache = Family::<Labels, Counter>::default();
        registry.register("queue_depth", "Requests waiting for a slot", queue_depth.clone());
        registry.register("running_requests", "Requests being answered", running.clone());
        registry.register("requests", "Requests by outcome", requests.clone());
        registry.register("prompt_tokens", "Prompt tokens prefilled (visual tokens included)", prompt_tokens.clone());
        registry.register("generated_tokens", "Tokens generated", generated_tokens.clone());
        registry.register("decode_tokens_per_second", "Tokens a second of the last batched decode step", decode_tok_s.clone());
        registry.register("time_to_first_token_seconds", "From a request's arrival to its first token", ttft.clone());
        registry.register("media_cache", "Encoded video and image lookups by result (hit, miss)", media_cache.clone());
        Self { registry, queue_depth, running, requests, prompt_tokens, generated_tokens, decode_tok_s, ttft, media_cache }
    }

    pub fn request(&self, outcome: &'static str) {
        self.requests.get_or_create(&vec![("outcome", outcome)]).inc();
    }

    pub fn media_cache(&self, result: &'static str) {
        self.media_cache.get_or_create(&vec![("result", result)]).inc();
    }

    /// The metrics in the text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
