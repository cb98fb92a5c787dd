//! Prometheus metrics for operators, served at `GET /metrics`: requests by tier and
//! status class, tokens by tier (from the answers' own `usage`) and, with prices
//! configured, their cost and what they would have cost at the strong model's price,
//! requests answered without a score (`on_router_error`), and a histogram of the proxy's
//! own overhead per request (time spent outside the upstream call), as TensorZero and
//! LiteLLM expose theirs. Per router ([`RouterStats`]): decisions by tier and a histogram
//! of its scores, so each router's strong share and the drift of its scores are visible,
//! and the threshold for a wanted share can be read off live traffic.
//!
//! Plain atomics and a hand-written exposition: a few counters do not justify a metrics
//! framework on the hot path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::Price;
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
    /// Answered from the response cache, with no model call.
    Cache = 4,
}

const TIERS: [&str; 5] = ["strong", "weak", "direct", "none", "cache"];
const CLASSES: [&str; 3] = ["2xx", "4xx", "5xx"];
/// Overhead histogram bucket bounds in microseconds.
const BUCKETS_US: [u64; 9] = [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000];
/// Upstream wait bucket bounds in microseconds (50 ms to 5 min): a model's time to its
/// first bytes runs from tens of milliseconds (a cached short answer) to minutes (a long
/// answer, not streamed).
const UPSTREAM_BUCKETS_US: [u64; 12] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
    300_000_000,
];
/// Score histogram buckets: upper bounds 0.01, 0.02, …, 1.00. Hundredths because a
/// threshold read off them (`histogram_quantile`) is then good to about 0.005, finer than
/// the share of traffic it moves can be told from a day's requests at most sites.
const SCORE_BUCKETS: usize = 100;

/// One router's decisions and scores. Scores failing to come (`on_router_error`) count as
/// decisions only.
pub struct RouterStats {
    /// Decisions for the strong and the weak model.
    decisions: [AtomicU64; 2],
    /// Observations per score bucket, not cumulative (one add per request); cumulated
    /// when rendered.
    scores: [AtomicU64; SCORE_BUCKETS],
    /// Sum of the scores, f64 bits.
    score_sum: AtomicU64,
    /// Requests that gave up waiting for a score (`scoring_timeout_ms`).
    timeouts: AtomicU64,
    /// A moving average of how long one scoring takes off the async workers, in
    /// nanoseconds (0 until measured): how much of a request's scoring budget it must
    /// have left when it starts.
    scoring_nanos: AtomicU64,
}

impl Default for RouterStats {
    fn default() -> Self {
        Self {
            decisions: [AtomicU64::new(0), AtomicU64::new(0)],
            scores: std::array::from_fn(|_| AtomicU64::new(0)),
            score_sum: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            scoring_nanos: AtomicU64::new(0),
        }
    }
}

impl RouterStats {
    /// Counts one routing decision; `score` is `None` when the router could not score and
    /// `on_router_error` chose the tier.
    pub fn record(&self, tier: Tier, score: Option<f64>) {
        self.decisions[tier_index(tier)].fetch_add(1, Ordering::Relaxed);
        if let Some(score) = score.filter(|score| (0.0..=1.0).contains(score)) {
            self.scores[score_bucket(score)].fetch_add(1, Ordering::Relaxed);
            add_f64(&self.score_sum, score);
        }
    }

    /// Counts a request that stopped waiting for its score after `scoring_timeout_ms`.
    pub fn record_timeout(&self) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests that stopped waiting for a score so far.
    #[must_use]
    pub fn timeouts(&self) -> u64 {
        self.timeouts.load(Ordering::Relaxed)
    }

    /// Folds one measured scoring time into the moving average (weight 1/8: a few
    /// scorings follow a change of load, one outlier moves it little). Concurrent updates
    /// may lose one another's step, which an average of this kind tolerates.
    pub fn record_scoring_time(&self, took: std::time::Duration) {
        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let average = self.scoring_nanos.load(Ordering::Relaxed);
        let next = if average == 0 {
            took
        } else {
            average - average / 8 + took / 8
        };
        self.scoring_nanos.store(next, Ordering::Relaxed);
    }

    /// How long one scoring typically takes (zero until one was measured).
    #[must_use]
    pub fn typical_scoring_time(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.scoring_nanos.load(Ordering::Relaxed))
    }

    /// Forgets the measured scoring time: a router replaced by a reload (another embedder,
    /// another artifact) may take far more or less, and budgeting it by the old one's
    /// time would skip or wait for it wrongly until the average caught up.
    pub fn forget_scoring_time(&self) {
        self.scoring_nanos.store(0, Ordering::Relaxed);
    }

    /// Whether any request was routed or timed out by this router.
    #[must_use]
    pub fn has_served(&self) -> bool {
        self.decisions.iter().any(|count| count.load(Ordering::Relaxed) > 0) || self.timeouts() > 0
    }
}

/// Upper bound of score bucket `index` (0-based); one function for both the comparison
/// and the label, so a score equal to a printed bound lands in that bound's bucket.
fn score_bound(index: usize) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let hundredths = (index + 1) as f64;
    hundredths / 100.0
}

/// The first bucket whose upper bound is at least `score` (in [0, 1]).
fn score_bucket(score: f64) -> usize {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let estimate = ((score * 100.0).ceil() as usize).clamp(1, SCORE_BUCKETS) - 1;
    // `score * 100` may round up past an exact bound (0.07 * 100 = 7.000000000000001).
    if estimate > 0 && score <= score_bound(estimate - 1) {
        estimate - 1
    } else {
        estimate
    }
}

/// The prompt log's counters, when one is configured.
#[must_use]
pub fn render_prompt_log(written: u64, dropped: u64) -> String {
    format!(
        "# HELP routellm_prompt_log_entries_total Routed requests whose scored prompts were written to the prompt log.\n\
         # TYPE routellm_prompt_log_entries_total counter\n\
         routellm_prompt_log_entries_total {written}\n\
         # HELP routellm_prompt_log_dropped_total Sampled requests left out of the prompt log: its queue was full or the file could not be written.\n\
         # TYPE routellm_prompt_log_dropped_total counter\n\
         routellm_prompt_log_dropped_total {dropped}\n"
    )
}

/// The shared state's health: whether Redis answered last, its failed calls, and the
/// requests this replica decided alone meanwhile.
#[must_use]
pub fn render_shared_state((up, errors, local_decisions): (bool, u64, u64)) -> String {
    format!(
        "# HELP routellm_shared_state_up Whether the last call to the shared state (Redis) went through.\n\
         # TYPE routellm_shared_state_up gauge\n\
         routellm_shared_state_up {}\n\
         # HELP routellm_shared_state_errors_total Calls to the shared state that failed or timed out.\n\
         # TYPE routellm_shared_state_errors_total counter\n\
         routellm_shared_state_errors_total {errors}\n\
         # HELP routellm_shared_state_local_decisions_total Limited keys' requests this replica admitted or refused by its own buckets while the shared state was unavailable.\n\
         # TYPE routellm_shared_state_local_decisions_total counter\n\
         routellm_shared_state_local_decisions_total {local_decisions}\n",
        u8::from(up)
    )
}

/// The response cache's lookups by outcome, what its hits saved, and its memory.
#[must_use]
pub fn render_cache(stats: &crate::cache::CacheStats) -> String {
    let mut out = String::with_capacity(1024);
    out.push_str(
        "# HELP routellm_cache_requests_total Cacheable requests by what the response cache did: hit (answered from it), miss (a model answered), refresh (Cache-Control: no-cache), bypass (no-store).\n\
         # TYPE routellm_cache_requests_total counter\n",
    );
    for (result, count) in [
        ("hit", stats.hits),
        ("miss", stats.misses),
        ("refresh", stats.refreshes),
        ("bypass", stats.bypasses),
    ] {
        write_sample(&mut out, "routellm_cache_requests_total", [("result", result)], count);
    }
    let _ = write!(
        out,
        "# HELP routellm_cache_coalesced_total Of the hits, those that waited for an identical request being answered instead of calling the model too.\n\
         # TYPE routellm_cache_coalesced_total counter\n\
         routellm_cache_coalesced_total {}\n\
         # HELP routellm_cache_shared_hits_total Of the hits, those on answers found in the shared state's Redis (with response_cache.redis): kept by another replica, or before a restart.\n\
         # TYPE routellm_cache_shared_hits_total counter\n\
         routellm_cache_shared_hits_total {}\n",
        stats.coalesced, stats.shared_hits
    );
    out.push_str(
        "# HELP routellm_cache_saved_tokens_total Tokens the cached answers reported, counted again for each hit: what the models did not have to spend.\n\
         # TYPE routellm_cache_saved_tokens_total counter\n",
    );
    for (kind, count) in [
        ("prompt", stats.saved_prompt_tokens),
        ("completion", stats.saved_completion_tokens),
    ] {
        write_sample(&mut out, "routellm_cache_saved_tokens_total", [("kind", kind)], count);
    }
    let _ = write!(
        out,
        "# HELP routellm_cache_saved_cost_total What those tokens would have cost at the answering model's price_per_million_tokens.\n\
         # TYPE routellm_cache_saved_cost_total counter\n\
         routellm_cache_saved_cost_total {}\n\
         # HELP routellm_cache_entries Answers in the response cache.\n\
         # TYPE routellm_cache_entries gauge\n\
         routellm_cache_entries {}\n\
         # HELP routellm_cache_bytes Memory the cached answers take, of routellm_cache_capacity_bytes (max_mb).\n\
         # TYPE routellm_cache_bytes gauge\n\
         routellm_cache_bytes {}\n\
         # HELP routellm_cache_capacity_bytes The response cache's memory bound.\n\
         # TYPE routellm_cache_capacity_bytes gauge\n\
         routellm_cache_capacity_bytes {}\n\
         # HELP routellm_cache_evictions_total Answers taken out to stay within the memory bound (expired ones are not counted).\n\
         # TYPE routellm_cache_evictions_total counter\n\
         routellm_cache_evictions_total {}\n",
        stats.saved_cost, stats.entries, stats.bytes, stats.capacity_bytes, stats.evictions
    );
    out
}

/// Per client API key (by its name, never the key): requests admitted, requests refused
/// by each rate limit, and tokens charged, so a dashboard shows who uses what and who is
/// held back. Counts survive reloads that keep the key's name.
#[must_use]
pub fn render_api_keys(keys: &[crate::api_keys::ApiKey]) -> String {
    use crate::api_keys::Limit;
    let mut out = String::with_capacity(256 + keys.len() * 192);
    write_key_counter(
        &mut out,
        "routellm_key_requests_total",
        "Requests admitted per client API key (its configured name).",
        keys,
        |key| key.counts().0,
    );
    out.push_str(
        "# HELP routellm_key_rate_limited_total Requests refused with 429 because the key was over its requests or tokens per minute (limit requests|tokens) or had spent its budget (limit budget).\n\
         # TYPE routellm_key_rate_limited_total counter\n",
    );
    for key in keys {
        let [requests, tokens, budget] = key.counts().1;
        for (limit, count) in [
            (Limit::Requests.as_str(), requests),
            (Limit::Tokens.as_str(), tokens),
            ("budget", budget),
        ] {
            write_sample(
                &mut out,
                "routellm_key_rate_limited_total",
                [("key", key.name()), ("limit", limit)],
                count,
            );
        }
    }
    out.push_str(
        "# HELP routellm_key_spend What a key's answers cost at the answering models' price_per_million_tokens in its budget's current period (in total without a budget).\n\
         # TYPE routellm_key_spend gauge\n",
    );
    for key in keys {
        let spend = key.spend();
        write_sample(
            &mut out,
            "routellm_key_spend",
            [("key", key.name()), ("period", spend.period.as_str())],
            spend.spent,
        );
    }
    write_key_counter(
        &mut out,
        "routellm_key_tokens_total",
        "Tokens charged to a key: prompt plus completion as answers report them, estimated where they do not.",
        keys,
        |key| key.counts().2,
    );
    out
}

/// A counter with one sample per client key: its HELP and TYPE lines, then `name{key} value`.
fn write_key_counter(
    out: &mut String,
    name: &str,
    help: &str,
    keys: &[crate::api_keys::ApiKey],
    value: impl Fn(&crate::api_keys::ApiKey) -> u64,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for key in keys {
        write_sample(out, name, [("key", key.name())], value(key));
    }
}

/// Each deployment of each tier (by its place in the tier's list and its model's name):
/// whether it takes requests or is passed over after being unavailable, and the requests
/// it answered or was unavailable for, so an alert can catch a failing endpoint that the
/// others cover for.
#[must_use]
pub fn render_deployments(gateway: &crate::gateway::Gateway) -> String {
    let mut out = String::with_capacity(1024);
    // Each deployment once, with its labels escaped once.
    let deployments: Vec<_> = gateway
        .deployments()
        .map(|(id, deployment)| {
            let labels = (
                id.tier.as_str(),
                id.index.to_string(),
                label_value(&deployment.upstream.model.name),
            );
            let available = gateway.pool(id.tier).is_available(id.index);
            (labels, available, deployment.attempts(), deployment.in_flight())
        })
        .collect();
    out.push_str(
        "# HELP routellm_deployment_available Whether a deployment takes requests (1) or is passed over after it was unavailable (0, for load_balancing.cooldown_secs or its 429's retry-after, while another is available).\n\
         # TYPE routellm_deployment_available gauge\n",
    );
    for ((tier, index, model), available, _, _) in &deployments {
        write_sample(
            &mut out,
            "routellm_deployment_available",
            [("tier", *tier), ("deployment", index), ("model", model)],
            u8::from(*available),
        );
    }
    out.push_str(
        "# HELP routellm_deployment_attempts_total Requests sent to a deployment, by whether it answered (any status but the ones below) or was unavailable (429, 5xx, unreachable, too slow) and the request went on to the next deployment or failed.\n\
         # TYPE routellm_deployment_attempts_total counter\n",
    );
    for ((tier, index, model), _, (answered, unavailable), _) in &deployments {
        for (outcome, count) in [("answered", answered), ("unavailable", unavailable)] {
            write_sample(
                &mut out,
                "routellm_deployment_attempts_total",
                [
                    ("tier", *tier),
                    ("deployment", index),
                    ("model", model),
                    ("outcome", outcome),
                ],
                count,
            );
        }
    }
    out.push_str(
        "# HELP routellm_deployment_in_flight Requests sent to a deployment whose answer has not ended yet (a stream until its last byte or the client leaving): what load_balancing least_busy compares.\n\
         # TYPE routellm_deployment_in_flight gauge\n",
    );
    for ((tier, index, model), _, _, in_flight) in &deployments {
        write_sample(
            &mut out,
            "routellm_deployment_in_flight",
            [("tier", *tier), ("deployment", index), ("model", model)],
            in_flight,
        );
    }
    out
}

/// The routing policy in force and how its reloads went: the default threshold of each
/// loaded router that has one, the `strong_share` targets, and `SIGHUP` reloads applied
/// and refused, so a dashboard shows which thresholds serve and an alert can catch a
/// config that did not take.
#[must_use]
pub fn render_policy<'a>(
    thresholds: impl IntoIterator<Item = (&'a str, f64)>,
    strong_shares: impl IntoIterator<Item = (&'a str, f64)>,
    applied: u64,
    refused: u64,
) -> String {
    let mut out = String::with_capacity(512);
    write_router_gauge(
        &mut out,
        "routellm_router_default_threshold",
        "The threshold a router applies to `router-<name>` without one (and to aliases without one).",
        thresholds,
    );
    write_router_gauge(
        &mut out,
        "routellm_router_strong_share_target",
        "The share of a router's latest scores its default threshold sends to the strong model (strong_share).",
        strong_shares,
    );
    out.push_str(
        "# HELP routellm_config_reloads_total Configuration reloads on SIGHUP, by whether the new routing policy was applied or refused.\n\
         # TYPE routellm_config_reloads_total counter\n",
    );
    write_sample(
        &mut out,
        "routellm_config_reloads_total",
        [("result", "applied")],
        applied,
    );
    write_sample(
        &mut out,
        "routellm_config_reloads_total",
        [("result", "refused")],
        refused,
    );
    out
}

/// A gauge with one sample per router: its HELP and TYPE lines, then `name{router} value`.
fn write_router_gauge<'a>(out: &mut String, name: &str, help: &str, values: impl IntoIterator<Item = (&'a str, f64)>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (router, value) in values {
        write_sample(out, name, [("router", &label_value(router))], value);
    }
}

/// The per-router series: `routellm_router_decisions_total{router, tier}` and the
/// `routellm_router_score{router}` histogram.
#[must_use]
pub fn render_router_stats<'a>(routers: impl IntoIterator<Item = (&'a str, &'a RouterStats)> + Clone) -> String {
    let mut out = String::with_capacity(4096);
    out.push_str(
        "# HELP routellm_router_decisions_total Routed requests by router and the model tier it chose (by score, or by on_router_error when it could not score), before any on_upstream_error fallback.\n",
    );
    out.push_str("# TYPE routellm_router_decisions_total counter\n");
    for (name, stats) in routers.clone() {
        let name = label_value(name);
        for (tier, count) in ["strong", "weak"].iter().zip(&stats.decisions) {
            write_sample(
                &mut out,
                "routellm_router_decisions_total",
                [("router", name.as_str()), ("tier", tier)],
                count.load(Ordering::Relaxed),
            );
        }
    }
    out.push_str(
        "# HELP routellm_router_score Each router's scores (the strong model's predicted win rate) in hundredths; histogram_quantile(1 - share, ...) is the threshold that would have sent that share of these requests to the strong model.\n",
    );
    out.push_str("# TYPE routellm_router_score histogram\n");
    let for_timeouts = routers.clone();
    for (name, stats) in routers {
        let name = label_value(name);
        let mut cumulative = 0_u64;
        for (index, bucket) in stats.scores.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "routellm_router_score_bucket{{router=\"{name}\",le=\"{}\"}} {cumulative}",
                score_bound(index)
            );
        }
        let _ = writeln!(
            out,
            "routellm_router_score_bucket{{router=\"{name}\",le=\"+Inf\"}} {cumulative}"
        );
        let sum = f64::from_bits(stats.score_sum.load(Ordering::Relaxed));
        let _ = writeln!(out, "routellm_router_score_sum{{router=\"{name}\"}} {sum}");
        let _ = writeln!(out, "routellm_router_score_count{{router=\"{name}\"}} {cumulative}");
    }
    out.push_str(
        "# HELP routellm_router_timeouts_total Routed requests that stopped waiting for their router's score after scoring_timeout_ms (on_router_error then decided).\n\
         # TYPE routellm_router_timeouts_total counter\n",
    );
    for (name, stats) in for_timeouts {
        write_sample(
            &mut out,
            "routellm_router_timeouts_total",
            [("router", label_value(name).as_str())],
            stats.timeouts.load(Ordering::Relaxed),
        );
    }
    out
}

/// One sample line, `name{label="value",…} value`, with label values already escaped.
fn write_sample<const N: usize>(
    out: &mut String,
    name: &str,
    labels: [(&str, &str); N],
    value: impl std::fmt::Display,
) {
    out.push_str(name);
    for (index, (label, label_value)) in labels.iter().enumerate() {
        out.push(if index == 0 { '{' } else { ',' });
        let _ = write!(out, "{label}=\"{label_value}\"");
    }
    if N > 0 {
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// A label value as the exposition format wants it (routers added through the library
/// may have any name).
fn label_value(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Index of a status in [`CLASSES`].
fn status_class(status: u16) -> usize {
    match status {
        0..=399 => 0,
        400..=499 => 1,
        _ => 2,
    }
}

/// Index of `tier` in the per-tier arrays that hold the strong and the weak model only.
fn tier_index(tier: Tier) -> usize {
    match tier {
        Tier::Strong => 0,
        Tier::Weak => 1,
    }
}

/// A Prometheus histogram of durations over `N` bucket bounds given in microseconds (the
/// bounds are passed in, so one array constant serves every histogram of a kind).
struct DurationHistogram<const N: usize> {
    /// Observations per bucket, not cumulative (one add each); cumulated when rendered.
    buckets: [AtomicU64; N],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl<const N: usize> Default for DurationHistogram<N> {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> DurationHistogram<N> {
    fn observe(&self, bounds_us: &[u64; N], took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        // Past the last bound an observation counts only in `+Inf` (the count).
        if let Some(bucket) = bounds_us.iter().position(|bound| micros <= *bound) {
            self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(micros, Ordering::Relaxed);
    }

    /// The `_bucket`, `_sum` and `_count` lines of `name`, with `label` (already escaped)
    /// on each when given.
    fn render(&self, out: &mut String, name: &str, label: Option<(&str, &str)>, bounds_us: &[u64; N]) {
        let label = label.map_or_else(String::new, |(key, value)| format!("{key}=\"{value}\""));
        let bucket_prefix = if label.is_empty() {
            String::new()
        } else {
            format!("{label},")
        };
        let mut cumulative = 0_u64;
        for (bucket, bound) in self.buckets.iter().zip(bounds_us) {
            cumulative += bucket.load(Ordering::Relaxed);
            #[allow(clippy::cast_precision_loss)]
            let seconds = *bound as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{{bucket_prefix}le=\"{seconds}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{bucket_prefix}le=\"+Inf\"}} {count}");
        let labels = if label.is_empty() {
            String::new()
        } else {
            format!("{{{label}}}")
        };
        #[allow(clippy::cast_precision_loss)]
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{labels} {sum}");
        let _ = writeln!(out, "{name}_count{labels} {count}");
    }
}

#[derive(Default)]
pub struct Metrics {
    requests: [[AtomicU64; 3]; 5],
    overhead: DurationHistogram<{ BUCKETS_US.len() }>,
    /// Time spent waiting on the model that answered, per tier (strong, weak).
    upstream: [DurationHistogram<{ UPSTREAM_BUCKETS_US.len() }>; 2],
    router_fallbacks: AtomicU64,
    /// Routed requests answered by the other model, by the tier that was unavailable.
    upstream_fallbacks: [AtomicU64; 2],
    /// Prompt and completion tokens per tier (`none` and `cache` never have any).
    tokens: [[AtomicU64; 2]; 5],
    /// The strong model's configured price (its first deployment's), which every answer's
    /// tokens are also priced at.
    strong_price: Option<Price>,
    /// Whether any deployment has a price (else no cost lines are shown).
    priced: bool,
    /// Per tier (strong, weak, direct): what the answers cost at the answering model's
    /// price, and what their tokens cost at the strong model's; f64 bits.
    cost: [AtomicU64; 3],
    cost_at_strong_prices: [AtomicU64; 3],
    /// Requests to `passthrough` paths by status class.
    passthrough: [AtomicU64; 3],
    /// Routed Responses continuations sent to the model that stored their conversation.
    previous_response_pins: AtomicU64,
}

impl Metrics {
    /// Metrics that also price the answers' tokens: `strong` is the strong model's price
    /// (`None`: it has none), `all` every deployment's, whose answers are priced as they come.
    #[must_use]
    pub fn with_prices(strong: Option<Price>, all: impl IntoIterator<Item = Option<Price>>) -> Self {
        Self {
            strong_price: strong,
            priced: strong.is_some() || all.into_iter().any(|price| price.is_some()),
            ..Self::default()
        }
    }

    /// Counts one answered request.
    pub fn record(&self, tier: TierLabel, status: u16, overhead: Option<Duration>) {
        self.requests[tier as usize][status_class(status)].fetch_add(1, Ordering::Relaxed);
        if let Some(overhead) = overhead {
            self.overhead.observe(&BUCKETS_US, overhead);
        }
    }

    /// Counts one routed Responses request sent to the model that stored the answer it continues.
    pub fn record_previous_response_pin(&self) {
        self.previous_response_pins.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one request to a `passthrough` path (answered or refused).
    pub fn record_passthrough(&self, status: u16) {
        self.passthrough[status_class(status)].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds the time a request spent waiting on the models (its headers, or for a stream
    /// its first bytes) to the histogram of the tier that answered.
    pub fn record_upstream_time(&self, answered_by: Tier, waited: Duration) {
        self.upstream[tier_index(answered_by)].observe(&UPSTREAM_BUCKETS_US, waited);
    }

    /// Counts one routed request whose router failed, answered by the `on_router_error` model.
    pub fn record_router_fallback(&self) {
        self.router_fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one routed request that the other model answered because the one chosen,
    /// `from`, was unavailable (`on_upstream_error: other_model`).
    pub fn record_upstream_fallback(&self, from: Tier) {
        self.upstream_fallbacks[tier_index(from)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts the tokens an answer reports, and prices them: `tier` is how the request
    /// was labelled, `answered_price` the price of the deployment that answered it.
    pub fn record_usage(&self, tier: TierLabel, answered_price: Option<Price>, usage: Usage) {
        let [prompt, completion] = &self.tokens[tier as usize];
        prompt.fetch_add(usage.prompt_tokens, Ordering::Relaxed);
        completion.fetch_add(usage.completion_tokens, Ordering::Relaxed);
        let Some(slot) = self.cost.get(tier as usize) else {
            return;
        };
        let priced = |price: Option<Price>| price.map(|price| price.cost(usage.prompt_tokens, usage.completion_tokens));
        if let Some(cost) = priced(answered_price) {
            add_f64(slot, cost);
        }
        if let Some(cost) = priced(self.strong_price) {
            add_f64(&self.cost_at_strong_prices[tier as usize], cost);
        }
    }

    /// The Prometheus text exposition.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        out.push_str("# HELP routellm_requests_total Chat completion requests by routed tier and status class.\n");
        out.push_str("# TYPE routellm_requests_total counter\n");
        for (tier, row) in TIERS.iter().zip(&self.requests) {
            for (class, count) in CLASSES.iter().zip(row) {
                write_sample(
                    &mut out,
                    "routellm_requests_total",
                    [("tier", tier), ("status", class)],
                    count.load(Ordering::Relaxed),
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
        if self.priced {
            out.push_str(
                "# HELP routellm_cost_total What the answers cost at the answering model's price_per_million_tokens (in the prices' currency), by routed tier; answers from a model without a price add nothing.\n",
            );
            out.push_str("# TYPE routellm_cost_total counter\n");
            render_by_tier(&mut out, "routellm_cost_total", &self.cost);
        }
        if self.strong_price.is_some() {
            out.push_str(
                "# HELP routellm_cost_at_strong_prices_total The same answers' tokens at the strong model's prices: what sending them all to the strong model would have cost, had it used as many tokens. 1 - cost / this is what routing saved.\n",
            );
            out.push_str("# TYPE routellm_cost_at_strong_prices_total counter\n");
            render_by_tier(
                &mut out,
                "routellm_cost_at_strong_prices_total",
                &self.cost_at_strong_prices,
            );
        }
        out.push_str("# HELP routellm_overhead_seconds Time the proxy spent on a request outside the upstream call.\n");
        out.push_str("# TYPE routellm_overhead_seconds histogram\n");
        self.overhead
            .render(&mut out, "routellm_overhead_seconds", None, &BUCKETS_US);
        out.push_str(
            "# HELP routellm_upstream_seconds Time a request waited on the model that answered it (the whole answer, or a stream's first bytes), by tier.\n\
             # TYPE routellm_upstream_seconds histogram\n",
        );
        for (histogram, tier) in self.upstream.iter().zip(["strong", "weak"]) {
            histogram.render(
                &mut out,
                "routellm_upstream_seconds",
                Some(("tier", tier)),
                &UPSTREAM_BUCKETS_US,
            );
        }
        self.render_detours(&mut out);
        out
    }

    /// Requests that went elsewhere than a router's score alone says: router and upstream
    /// fallbacks, Responses continuations pinned to their conversation's model, and the
    /// unrouted passthrough requests.
    fn render_detours(&self, out: &mut String) {
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
        out.push_str(
            "# HELP routellm_passthrough_requests_total Requests to other endpoints passed to a model unrouted (passthrough), by status class.\n\
             # TYPE routellm_passthrough_requests_total counter\n",
        );
        for (class, count) in CLASSES.iter().zip(&self.passthrough) {
            write_sample(
                out,
                "routellm_passthrough_requests_total",
                [("status", class)],
                count.load(Ordering::Relaxed),
            );
        }
        out.push_str(
            "# HELP routellm_previous_response_pins_total Routed Responses requests continuing an answer (previous_response_id) sent to the model whose provider stored it, whatever the score.\n\
             # TYPE routellm_previous_response_pins_total counter\n",
        );
        write_sample(
            out,
            "routellm_previous_response_pins_total",
            [],
            self.previous_response_pins.load(Ordering::Relaxed),
        );
    }
}

/// Adds to an f64 kept as bits in an atomic (no atomic float in std).
pub(crate) fn add_f64(slot: &AtomicU64, value: f64) {
    let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
        Some((f64::from_bits(bits) + value).to_bits())
    });
}

fn render_by_tier(out: &mut String, name: &str, values: &[AtomicU64; 3]) {
    for (tier, value) in TIERS.iter().zip(values) {
        let _ = writeln!(
            out,
            "{name}{{tier=\"{tier}\"}} {}",
            f64::from_bits(value.load(Ordering::Relaxed))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_waits_are_a_histogram_per_answering_tier() {
        let metrics = Metrics::default();
        metrics.record_upstream_time(Tier::Strong, Duration::from_millis(80));
        metrics.record_upstream_time(Tier::Strong, Duration::from_secs(2));
        metrics.record_upstream_time(Tier::Weak, Duration::from_millis(30));
        metrics.record_upstream_time(Tier::Weak, Duration::from_secs(600));
        let text = metrics.render();
        for expected in [
            "routellm_upstream_seconds_bucket{tier=\"strong\",le=\"0.05\"} 0\n",
            "routellm_upstream_seconds_bucket{tier=\"strong\",le=\"0.1\"} 1\n",
            "routellm_upstream_seconds_bucket{tier=\"strong\",le=\"2.5\"} 2\n",
            "routellm_upstream_seconds_bucket{tier=\"strong\",le=\"+Inf\"} 2\n",
            "routellm_upstream_seconds_sum{tier=\"strong\"} 2.08\n",
            "routellm_upstream_seconds_bucket{tier=\"weak\",le=\"0.05\"} 1\n",
            // Ten minutes is past the last bucket: counted only in +Inf.
            "routellm_upstream_seconds_bucket{tier=\"weak\",le=\"300\"} 1\n",
            "routellm_upstream_seconds_bucket{tier=\"weak\",le=\"+Inf\"} 2\n",
            "routellm_upstream_seconds_count{tier=\"weak\"} 2\n",
        ] {
            assert!(text.contains(expected), "{expected} in {text}");
        }
    }

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
        assert!(
            text.contains("routellm_upstream_seconds_count{tier=\"strong\"} 0\n"),
            "{text}"
        );
        metrics.record_router_fallback();
        assert!(metrics.render().contains("routellm_router_fallbacks_total 1\n"));
        metrics.record_usage(
            TierLabel::Weak,
            None,
            Usage {
                prompt_tokens: 7,
                completion_tokens: 5,
            },
        );
        metrics.record_usage(
            TierLabel::Weak,
            None,
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
        assert!(
            !text.contains("routellm_cost"),
            "no prices configured, no cost lines: {text}"
        );
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

    #[test]
    fn scores_land_in_the_hundredth_whose_printed_bound_holds_them() {
        for hundredths in 1..=100_u32 {
            let bound = f64::from(hundredths) / 100.0;
            let index = usize::try_from(hundredths).unwrap() - 1;
            assert_eq!(score_bucket(bound), index, "{bound}");
            assert_eq!(format!("{}", score_bound(index)), format!("{bound}"));
            if hundredths < 100 {
                assert_eq!(score_bucket(bound + 1e-12), index + 1, "just above {bound}");
            }
        }
        assert_eq!(score_bucket(0.0), 0);

        let stats = RouterStats::default();
        for score in [0.0, 0.07, 0.071, 0.5, 1.0] {
            stats.record(Tier::Weak, Some(score));
        }
        stats.record(Tier::Strong, None);
        stats.record(Tier::Strong, Some(f64::NAN));
        let text = render_router_stats([("sw \"x\"", &stats)]);
        let name = "router=\"sw \\\"x\\\"\"";
        for expected in [
            format!("routellm_router_decisions_total{{{name},tier=\"strong\"}} 2\n"),
            format!("routellm_router_decisions_total{{{name},tier=\"weak\"}} 5\n"),
            format!("routellm_router_score_bucket{{{name},le=\"0.01\"}} 1\n"),
            format!("routellm_router_score_bucket{{{name},le=\"0.07\"}} 2\n"),
            format!("routellm_router_score_bucket{{{name},le=\"0.08\"}} 3\n"),
            format!("routellm_router_score_bucket{{{name},le=\"0.5\"}} 4\n"),
            format!("routellm_router_score_bucket{{{name},le=\"0.99\"}} 4\n"),
            format!("routellm_router_score_bucket{{{name},le=\"1\"}} 5\n"),
            format!("routellm_router_score_count{{{name}}} 5\n"),
        ] {
            assert!(text.contains(&expected), "{expected} in {text}");
        }
        assert_eq!(text.matches("routellm_router_score_bucket{").count(), SCORE_BUCKETS + 1);
    }

    #[test]
    fn answers_are_priced_at_the_answering_model_and_at_the_strong_model() {
        let strong = Price {
            input: 10.0,
            output: 30.0,
        };
        let weak = Price {
            input: 0.5,
            output: 1.5,
        };
        let metrics = Metrics::with_prices(Some(strong), [Some(strong), Some(weak)]);
        let usage = Usage {
            prompt_tokens: 1_000,
            completion_tokens: 2_000,
        };
        metrics.record_usage(TierLabel::Strong, Some(strong), usage);
        metrics.record_usage(TierLabel::Weak, Some(weak), usage);
        metrics.record_usage(TierLabel::Weak, Some(weak), usage);
        // A model named directly is priced as the model it is.
        metrics.record_usage(TierLabel::Direct, Some(weak), usage);
        let text = metrics.render();
        // strong: 1000 * 10 / 1e6 + 2000 * 30 / 1e6 = 0.07; weak: 0.0005 + 0.003 = 0.0035 each.
        assert!(text.contains("routellm_cost_total{tier=\"strong\"} 0.07\n"), "{text}");
        assert!(text.contains("routellm_cost_total{tier=\"weak\"} 0.007\n"), "{text}");
        assert!(text.contains("routellm_cost_total{tier=\"direct\"} 0.0035\n"), "{text}");
        assert!(
            text.contains("routellm_cost_at_strong_prices_total{tier=\"weak\"} 0.14\n"),
            "{text}"
        );
        assert!(
            text.contains("routellm_cost_at_strong_prices_total{tier=\"strong\"} 0.07\n"),
            "{text}"
        );
        assert!(!text.contains("tier=\"none\"} "), "{text}");

        // Without the strong model's price there is nothing to compare against.
        let metrics = Metrics::with_prices(None, [None, Some(weak)]);
        metrics.record_usage(TierLabel::Strong, None, usage);
        metrics.record_usage(TierLabel::Weak, Some(weak), usage);
        let text = metrics.render();
        assert!(text.contains("routellm_cost_total{tier=\"strong\"} 0\n"), "{text}");
        assert!(text.contains("routellm_cost_total{tier=\"weak\"} 0.0035\n"), "{text}");
        assert!(!text.contains("routellm_cost_at_strong_prices_total"), "{text}");
    }
}
