//! Prometheus metrics for operators, served at `GET /metrics`: requests by tier and
//! status class, tokens by tier (from the answers' own `usage`), requests answered without
//! a score (`on_router_error`), and a histogram of the proxy's own overhead per request
//! (time spent outside the upstream call), as TensorZero and LiteLLM expose theirs.
//!
//! Plain atomics and a hand-written exposition: a few counters do not justify a metrics
//! framework on the hot path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::gateway::Tier;
use crate::usage::Usage;

/// Which model a request went to, for labelling.
#[derive(Debug, Clone, Copy)]
pub enum TierLabel {
    Strong = 0,
    Weak = 1,
    /// A configured model named directly, without routing.
    Direct = 2,
    /// Rejected before a model was chosen.
    None = 3,
}

const TIERS: [&str; 4] = ["strong", "weak", "direct", "none"];
const CLASSES: [&str; 3] = ["2xx", "4xx", "5xx"];
/// Overhead histogram bucket bounds in microseconds.
const BUCKETS_US: [u64; 9] = [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000];

#[derive(Default)]
pub struct Metrics {
    requests: [[AtomicU64; 3]; 4],
    overhead_buckets: [AtomicU64; BUCKETS_US.len()],
    overhead_count: AtomicU64,
    overhead_sum_us: AtomicU64,
    router_fallbacks: AtomicU64,
    /// Routed requests answered by the other model, by the tier that was unavailable.
    upstream_fallbacks: [AtomicU64; 2],
    /// Prompt and completion tokens per tier (`none` never has any).
    tokens: [[AtomicU64; 2]; 4],
}

impl Metrics {
    /// Counts one answered request.
    pub fn record(&self, tier: TierLabel, status: u16, overhead: Option<Duration>) {
        let class = match status {
            0..=399 => 0,
            400..=499 => 1,
            _ => 2,
        };
        self.requests[tier as usize][class].fetch_add(1, Ordering::Relaxed);
        if let Some(overhead) = overhead {
            let micros = u64::try_from(overhead.as_micros()).unwrap_or(u64::MAX);
            for (bucket, bound) in self.overhead_buckets.iter().zip(BUCKETS_US) {
                if micros <= bound {
                    bucket.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.overhead_count.fetch_add(1, Ordering::Relaxed);
            self.overhead_sum_us.fetch_add(micros, Ordering::Relaxed);
        }
    }

    /// Counts one routed request whose router failed, answered by the `on_router_error` model.
    pub fn record_router_fallback(&self) {
        self.router_fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one routed request that the other model answered because the one chosen,
    /// `from`, was unavailable (`on_upstream_error: other_model`).
    pub fn record_upstream_fallback(&self, from: Tier) {
        let index = match from {
            Tier::Strong => 0,
            Tier::Weak => 1,
        };
        self.upstream_fallbacks[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts the tokens an answer from `tier` reports.
    pub fn record_usage(&self, tier: TierLabel, usage: Usage) {
        let [prompt, completion] = &self.tokens[tier as usize];
        prompt.fetch_add(usage.prompt_tokens, Ordering::Relaxed);
        completion.fetch_add(usage.completion_tokens, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        out.push_str("# HELP routellm_requests_total Chat completion requests by routed tier and status class.\n");
        out.push_str("# TYPE routellm_requests_total counter\n");
        for (tier, row) in TIERS.iter().zip(&self.requests) {
            for (class, count) in CLASSES.iter().zip(row) {
                let _ = writeln!(
                    out,
                    "routellm_requests_total{{tier=\"{tier}\",status=\"{class}\"}} {}",
                    count.load(Ordering::Relaxed)
                );
            }
        }
        out.push_str(
            "# HELP routellm_tokens_total Tokens the answering model reported in `usage`, by routed tier; Chat Completions streams report them only when the client asks (stream_options.include_usage), Responses streams always.\n",
        );
        out.push_str("# TYPE routellm_tokens_total counter\n");
        for (tier, [prompt, completion]) in TIERS.iter().zip(&self.tokens).take(3) {
            for (kind, count) in [("prompt", prompt), ("completion", completion)] {
                let _ = writeln!(
                    out,
                    "routellm_tokens_total{{tier=\"{tier}\",kind=\"{kind}\"}} {}",
                    count.load(Ordering::Relaxed)
                );
            }
        }
        out.push_str("# HELP routellm_overhead_seconds Time the proxy spent on a request outside the upstream call.\n");
        out.push_str("# TYPE routellm_overhead_seconds histogram\n");
        for (bucket, bound) in self.overhead_buckets.iter().zip(BUCKETS_US) {
            #[allow(clippy::cast_precision_loss)]
            let seconds = bound as f64 / 1e6;
            let _ = writeln!(
                out,
                "routellm_overhead_seconds_bucket{{le=\"{seconds}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.overhead_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "routellm_overhead_seconds_bucket{{le=\"+Inf\"}} {count}");
        #[allow(clippy::cast_precision_loss)]
        let sum = self.overhead_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "routellm_overhead_seconds_sum {sum}");
        let _ = writeln!(out, "routellm_overhead_seconds_count {count}");
        out.push_str(
            "# HELP routellm_router_fallbacks_total Routed requests whose router could not score the prompt, answered by the on_router_error model.\n",
        );
        out.push_str("# TYPE routellm_router_fallbacks_total counter\n");
        let _ = writeln!(
            out,
            "routellm_router_fallbacks_total {}",
            self.router_fallbacks.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP routellm_upstream_fallbacks_total Routed requests the other model answered because the chosen one was unavailable (on_upstream_error: other_model), by the unavailable tier.\n",
        );
        out.push_str("# TYPE routellm_upstream_fallbacks_total counter\n");
        for (from, count) in ["strong", "weak"].iter().zip(&self.upstream_fallbacks) {
            let _ = writeln!(
                out,
                "routellm_upstream_fallbacks_total{{from=\"{from}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_histogram_render_in_prometheus_format() {
        let metrics = Metrics::default();
        metrics.record(TierLabel::Strong, 200, Some(Duration::from_micros(80)));
        metrics.record(TierLabel::Strong, 200, Some(Duration::from_millis(3)));
        metrics.record(TierLabel::None, 400, None);
        let text = metrics.render();
        assert!(
            text.contains("routellm_requests_total{tier=\"strong\",status=\"2xx\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("routellm_requests_total{tier=\"none\",status=\"4xx\"} 1\n"));
        assert!(
            text.contains("routellm_overhead_seconds_bucket{le=\"0.0001\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("routellm_overhead_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("routellm_overhead_seconds_count 2\n"));
        assert!(text.contains("routellm_overhead_seconds_sum 0.00308\n"), "{text}");
        assert!(text.contains("routellm_router_fallbacks_total 0\n"), "{text}");
        metrics.record_router_fallback();
        assert!(metrics.render().contains("routellm_router_fallbacks_total 1\n"));
        metrics.record_usage(
            TierLabel::Weak,
            Usage {
                prompt_tokens: 7,
                completion_tokens: 5,
            },
        );
        metrics.record_usage(
            TierLabel::Weak,
            Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
            },
        );
        let text = metrics.render();
        assert!(
            text.contains("routellm_tokens_total{tier=\"weak\",kind=\"prompt\"} 8\n"),
            "{text}"
        );
        assert!(text.contains("routellm_tokens_total{tier=\"weak\",kind=\"completion\"} 7\n"));
        assert!(text.contains("routellm_tokens_total{tier=\"strong\",kind=\"prompt\"} 0\n"));
        assert!(!text.contains("tier=\"none\",kind"), "{text}");
        metrics.record_upstream_fallback(Tier::Strong);
        let text = metrics.render();
        assert!(
            text.contains("routellm_upstream_fallbacks_total{from=\"strong\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("routellm_upstream_fallbacks_total{from=\"weak\"} 0\n"),
            "{text}"
        );
    }
}
