//! Client API keys: who may call the proxy, the name each caller is counted under, and how
//! much each may use — requests and tokens per minute, answered past the limit with
//! OpenAI's own 429 `rate_limit_exceeded` (so SDKs back off and retry by themselves), and
//! the model names a key may ask for.
//!
//! Limits are token buckets that refill continuously, as OpenAI's do: a key with
//! `requests_per_minute: 60` may send a burst of 60 and then one a second. Requests are
//! counted when admitted; tokens once the answer reports them (prompt plus completion), so
//! a key over its token rate is refused until the debt has refilled. An answer that reports
//! no usage (a Chat Completions stream without `stream_options.include_usage`, a provider
//! that omits it) is charged an estimate rather than nothing: a token per four bytes of the
//! request, plus a token per four bytes of a complete answer or per streamed event.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};

use crate::budgets::{Budget, BudgetExceeded, Spend};
use crate::config::{Price, Secret};
use crate::error::Error;
use crate::model_name::ModelTarget;
use crate::shared_state::{Charge, Levels, Limits, SharedState, Unavailable, Verdict};

/// The longest key name: it labels metrics and log lines.
const MAX_NAME_CHARS: usize = 64;

/// An entry of `api_keys` as the file gives it: the key alone, or the key with a name,
/// limits and the models it may use.
#[derive(Debug, Clone)]
pub enum ApiKeyEntry {
    Bare(Secret),
    Full(ApiKeyFile),
}

/// The long form of an `api_keys` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyFile {
    key: Secret,
    name: Option<String>,
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    models: Option<Vec<String>>,
    budget: Option<Budget>,
}

impl<'de> Deserialize<'de> for ApiKeyEntry {
    // By hand rather than `untagged`: a typo in the long form then gets serde's own message
    // (`unknown field ...`) instead of "did not match any variant".
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match serde_norway::Value::deserialize(deserializer)? {
            serde_norway::Value::String(key) => Ok(Self::Bare(Secret::new(key))),
            other => serde_norway::from_value(other)
                .map(Self::Full)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// A validated `api_keys` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeySpec {
    /// The key itself, `${VAR}` references expanded.
    pub key: Secret,
    /// What metrics and logs call this caller; never the key. Defaults to `key-` and the
    /// first eight hex digits of the key's SHA-256, stable across restarts and reloads.
    pub name: String,
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    /// The `model` names this key may send (aliases, `router-<name>` for a router at any
    /// threshold, a configured model's name); every name when `None`.
    pub models: Option<BTreeSet<String>>,
    /// How much its answers may cost per day, month or in total; unlimited when `None`.
    pub budget: Option<Budget>,
}

impl ApiKeySpec {
    /// Whether a request for `requested` (which resolved to `target`) may be served to this key.
    #[must_use]
    pub fn allows(&self, requested: &str, target: &ModelTarget<'_>) -> bool {
        let Some(models) = &self.models else {
            return true;
        };
        models.contains(requested)
            || match target {
                ModelTarget::Routed { router, .. } => models.contains(&format!("router-{router}")),
                ModelTarget::Direct(model) => models.contains(*model),
            }
    }

    /// Whether either rate is limited.
    #[must_use]
    pub fn is_limited(&self) -> bool {
        self.requests_per_minute.is_some() || self.tokens_per_minute.is_some()
    }
}

/// Validates the file's entries: keys expanded (`${VAR}` from `env`) and non-empty, names
/// and keys unique, limits positive.
pub fn validate(entries: Vec<ApiKeyEntry>, env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<ApiKeySpec>, Error> {
    let mut specs: Vec<ApiKeySpec> = Vec::with_capacity(entries.len());
    for (index, entry) in entries.into_iter().enumerate() {
        let setting = format!("api_keys[{index}]");
        let file = match entry {
            ApiKeyEntry::Bare(key) => ApiKeyFile {
                key,
                name: None,
                requests_per_minute: None,
                tokens_per_minute: None,
                models: None,
                budget: None,
            },
            ApiKeyEntry::Full(file) => file,
        };
        let key = crate::providers::expand_env(&setting, file.key.expose(), env)?;
        if key.trim().is_empty() {
            return Err(Error::Config(format!("{setting}: the key is empty")));
        }
        let name = match file.name {
            Some(name) => {
                let usable = !name.is_empty()
                    && name.chars().count() <= MAX_NAME_CHARS
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
                if !usable {
                    return Err(Error::Config(format!(
                        "{setting}: name `{name}` must be 1 to {MAX_NAME_CHARS} letters, digits, `-`, `_`, `.` or `@`"
                    )));
                }
                name
            }
            None => default_name(&key),
        };
        for (limit, value) in [
            ("requests_per_minute", file.requests_per_minute),
            ("tokens_per_minute", file.tokens_per_minute),
        ] {
            if value == Some(0) {
                return Err(Error::Config(format!(
                    "{setting} ({name}): {limit} must be at least 1 (leave it out for no limit)"
                )));
            }
        }
        if let Some(budget) = file.budget
            && !(budget.limit.is_finite() && budget.limit > 0.0)
        {
            return Err(Error::Config(format!(
                "{setting} ({name}): budget.limit must be a positive amount in the models' price currency"
            )));
        }
        let models = match file.models {
            Some(models) if models.is_empty() => {
                return Err(Error::Config(format!(
                    "{setting} ({name}): models is empty, so the key could call nothing; leave it out to allow every model"
                )));
            }
            models => models.map(|models| models.into_iter().collect::<BTreeSet<_>>()),
        };
        if specs.iter().any(|earlier| earlier.name == name) {
            return Err(Error::Config(format!("api_keys: two keys are named `{name}`")));
        }
        if specs.iter().any(|earlier| earlier.key.expose() == key) {
            // Not echoing the key: only which entries clash.
            return Err(Error::Config(format!(
                "{setting} ({name}): the same key is listed twice"
            )));
        }
        specs.push(ApiKeySpec {
            key: Secret::new(key),
            name,
            requests_per_minute: file.requests_per_minute,
            tokens_per_minute: file.tokens_per_minute,
            models,
            budget: file.budget,
        });
    }
    Ok(specs)
}

/// `key-` and eight hex digits of the key's SHA-256: tells keys apart in metrics without
/// revealing any of them.
fn default_name(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut name = String::from("key-");
    for byte in &digest[..4] {
        let _ = write!(name, "{byte:02x}");
    }
    name
}

/// Which of a key's two rates a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Tokens,
}

impl Limit {
    /// OpenAI's error `type` for this limit, also the `limit` label in `/metrics`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::Tokens => "tokens",
        }
    }

    fn index(self) -> usize {
        match self {
            Limit::Requests => 0,
            Limit::Tokens => 1,
        }
    }
}

/// A rate that refills continuously up to one minute's worth.
#[derive(Debug)]
struct Bucket {
    per_minute: f64,
    /// What may still be spent; below zero after an answer used more tokens than were left.
    level: f64,
    updated: Instant,
}

impl Bucket {
    #[allow(clippy::cast_precision_loss)] // limits are far below 2^52
    fn full(per_minute: u64, now: Instant) -> Self {
        Self {
            per_minute: per_minute as f64,
            level: per_minute as f64,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.per_minute / 60.0).min(self.per_minute);
        self.updated = now;
    }

    /// How long until `amount` more is available.
    fn wait_for(&self, amount: f64) -> Duration {
        Duration::from_secs_f64(((amount - self.level) * 60.0 / self.per_minute).max(0.0))
    }

    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // floored, clamped to [0, limit]
    fn state(&self) -> RateState {
        RateState {
            #[allow(clippy::cast_precision_loss)]
            limit: self.per_minute as u64,
            remaining: self.level.max(0.0).floor() as u64,
            reset: self.wait_for(self.per_minute),
        }
    }

    /// A new limit keeps what was spent: the level moves by the change, clamped to the new limit.
    #[allow(clippy::cast_precision_loss)]
    fn set_limit(&mut self, per_minute: u64, now: Instant) {
        self.refill(now);
        let per_minute = per_minute as f64;
        self.level = (self.level + per_minute - self.per_minute).min(per_minute);
        self.per_minute = per_minute;
    }
}

/// One rate as OpenAI's `x-ratelimit-*` headers report it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateState {
    pub limit: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// A key's rates right after it was admitted, for the response headers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateSnapshot {
    pub requests: Option<RateState>,
    pub tokens: Option<RateState>,
}

impl RateSnapshot {
    /// The headers OpenAI sends (`x-ratelimit-limit-requests` and so on), for the rates this
    /// key has.
    #[must_use]
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::new();
        if let Some(rate) = self.requests {
            headers.push(("x-ratelimit-limit-requests", rate.limit.to_string()));
            headers.push(("x-ratelimit-remaining-requests", rate.remaining.to_string()));
            headers.push(("x-ratelimit-reset-requests", format_reset(rate.reset)));
        }
        if let Some(rate) = self.tokens {
            headers.push(("x-ratelimit-limit-tokens", rate.limit.to_string()));
            headers.push(("x-ratelimit-remaining-tokens", rate.remaining.to_string()));
            headers.push(("x-ratelimit-reset-tokens", format_reset(rate.reset)));
        }
        headers
    }
}

/// A duration as OpenAI writes its reset headers: `250ms`, `1.5s`, `6m0s`.
#[must_use]
pub fn format_reset(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis < 1000 {
        format!("{millis}ms")
    } else if millis < 60_000 {
        let seconds = format!("{:.3}", duration.as_secs_f64());
        format!("{}s", seconds.trim_end_matches('0').trim_end_matches('.'))
    } else {
        let seconds = duration.as_secs();
        format!("{}m{}s", seconds / 60, seconds % 60)
    }
}

/// A request a key's limit refused.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimited {
    pub key: String,
    pub limit: Limit,
    pub per_minute: u64,
    /// When the request would be admitted, if nothing else is spent meanwhile.
    pub retry_after: Duration,
}

impl std::fmt::Display for RateLimited {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.limit {
            Limit::Requests => "requests per min (RPM)",
            Limit::Tokens => "tokens per min (TPM)",
        };
        write!(
            formatter,
            "Rate limit reached for API key `{}` on {unit}: Limit {}. Please try again in {}.",
            self.key,
            self.per_minute,
            format_reset(Duration::from_millis(self.retry_after_millis()))
        )
    }
}

impl RateLimited {
    /// The wait in whole milliseconds, rounded up so a client that waits exactly this long is admitted.
    #[must_use]
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // at most a few minutes' worth
    pub fn retry_after_millis(&self) -> u64 {
        (self.retry_after.as_secs_f64() * 1000.0).ceil() as u64
    }
}

#[derive(Debug, Default)]
struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    /// What the answers cost in the budget's current period (kept without a budget too,
    /// so one added by a reload starts from what was spent).
    spend: Spend,
    /// Charged here but not yet in the shared state (Redis was unavailable): sent with the
    /// next charge or admission that reaches it.
    unsynced: Unsynced,
}

#[derive(Debug, Default, Clone, Copy)]
struct Unsynced {
    tokens: u64,
    cost: f64,
}

impl Unsynced {
    fn is_empty(self) -> bool {
        self.tokens == 0 && self.cost == 0.0
    }
}

impl Buckets {
    /// Takes up what the shared state says: this replica's buckets and spend go on from
    /// there (and from there alone while Redis is unavailable).
    fn mirror(&mut self, levels: &Levels, period: &str, now: Instant) {
        for (bucket, level) in [(&mut self.requests, levels.requests), (&mut self.tokens, levels.tokens)] {
            if let (Some(bucket), Some(level)) = (bucket.as_mut(), level) {
                bucket.level = level.min(bucket.per_minute);
                bucket.updated = now;
            }
        }
        if let Some(spent) = levels.spent
            && self.spend.period == period
        {
            self.spend.spent = spent;
        }
    }
}

/// What a key has used: its buckets and counters. Shared by the policies a reload swaps in,
/// so a reload neither resets a key's limits nor its counts.
#[derive(Debug, Default)]
pub struct KeyUsage {
    buckets: Mutex<Buckets>,
    admitted: AtomicU64,
    refused: [AtomicU64; 2],
    over_budget: AtomicU64,
    tokens: AtomicU64,
}

impl KeyUsage {
    fn new(spec: &ApiKeySpec, now: Instant) -> Self {
        let usage = Self::default();
        usage.set_limits(spec, now);
        usage
    }

    fn buckets(&self) -> std::sync::MutexGuard<'_, Buckets> {
        // Buckets are plain numbers, valid whatever a panicking holder left them at.
        self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_limits(&self, spec: &ApiKeySpec, now: Instant) {
        let mut guard = self.buckets();
        let Buckets { requests, tokens, .. } = &mut *guard;
        for (bucket, limit) in [(requests, spec.requests_per_minute), (tokens, spec.tokens_per_minute)] {
            match (bucket.as_mut(), limit) {
                (Some(existing), Some(limit)) => existing.set_limit(limit, now),
                (None, Some(limit)) => *bucket = Some(Bucket::full(limit, now)),
                (_, None) => *bucket = None,
            }
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    Budget(BudgetExceeded),
    Rate(RateLimited),
    /// The shared state is unavailable and `shared_state.on_failure` is `refuse`.
    Unavailable,
}

impl From<Refusal> for Error {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Budget(exceeded) => Error::BudgetExceeded(exceeded),
            Refusal::Rate(limited) => Error::RateLimited(limited),
            Refusal::Unavailable => Error::LimitsUnavailable,
        }
    }
}

/// A configured key with what it has used: what a request was admitted as.
#[derive(Debug, Clone)]
pub struct ApiKey {
    spec: Arc<ApiKeySpec>,
    usage: Arc<KeyUsage>,
    /// Where its limits and spend are shared with other replicas, if they are.
    shared: Option<Arc<SharedState>>,
}

impl ApiKey {
    #[must_use]
    pub fn new(spec: ApiKeySpec) -> Self {
        let usage = Arc::new(KeyUsage::new(&spec, Instant::now()));
        Self {
            spec: Arc::new(spec),
            usage,
            shared: None,
        }
    }

    /// The key with its limits and spend kept in `shared` (see [`crate::shared_state`]).
    #[must_use]
    pub fn sharing(spec: ApiKeySpec, shared: Arc<SharedState>) -> Self {
        Self {
            shared: Some(shared),
            ..Self::new(spec)
        }
    }

    #[must_use]
    pub fn spec(&self) -> &ApiKeySpec {
        &self.spec
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Takes over `previous`'s usage (a reload keeping a key of the same name), with this
    /// key's limits.
    pub fn continue_from(&mut self, previous: &ApiKey) {
        previous.usage.set_limits(&self.spec, Instant::now());
        self.usage = Arc::clone(&previous.usage);
    }

    /// Admits one request if the budget and both rates allow it, spending one request; a
    /// refusal spends nothing. With a shared state, Redis decides for all replicas; when it
    /// is unavailable, this replica's buckets do (or, with `on_failure: refuse`, nobody).
    pub async fn admit_request(&self) -> Result<RateSnapshot, Refusal> {
        let shared = self
            .shared
            .as_ref()
            .filter(|_| self.spec.is_limited() || self.spec.budget.is_some());
        if let Some(shared) = shared {
            let (period, ends) = self.budget_period().at(crate::unix_now());
            let limits = Limits {
                name: &self.spec.name,
                requests_per_minute: self.spec.requests_per_minute,
                tokens_per_minute: self.spec.tokens_per_minute,
                budget: self.spec.budget.map(|budget| (budget.limit, period.as_str())),
            };
            match shared.admit(&limits).await {
                Ok((verdict, levels)) => {
                    if !self.usage.buckets().unsynced.is_empty() {
                        self.send_unsynced();
                    }
                    return self.take_verdict(verdict, &levels, &period, ends);
                }
                Err(Unavailable) if shared.refuses_when_unavailable() => return Err(Refusal::Unavailable),
                Err(Unavailable) => shared.count_local_decision(),
            }
        }
        self.check_budget().map_err(Refusal::Budget)?;
        self.admit().map_err(Refusal::Rate)
    }

    /// What the shared state decided, counted and told as the local check would.
    fn take_verdict(
        &self,
        verdict: Verdict,
        levels: &Levels,
        period: &str,
        ends: Option<u64>,
    ) -> Result<RateSnapshot, Refusal> {
        let mut buckets = self.usage.buckets();
        buckets.spend.roll(self.budget_period(), crate::unix_now());
        buckets.mirror(levels, period, Instant::now());
        let refused_by = |limit: Limit, bucket: Option<&Bucket>| {
            self.usage.refused[limit.index()].fetch_add(1, Ordering::Relaxed);
            let (per_minute, retry_after) = bucket.map_or((0, Duration::ZERO), |bucket| {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let per_minute = bucket.per_minute as u64;
                (per_minute, bucket.wait_for(1.0))
            });
            Refusal::Rate(RateLimited {
                key: self.spec.name.clone(),
                limit,
                per_minute,
                retry_after,
            })
        };
        match (verdict, self.spec.budget) {
            (Verdict::OverBudget, Some(budget)) => {
                self.usage.over_budget.fetch_add(1, Ordering::Relaxed);
                Err(Refusal::Budget(BudgetExceeded {
                    key: self.spec.name.clone(),
                    budget,
                    spent: levels.spent.unwrap_or(budget.limit),
                    renews_at: ends,
                }))
            }
            (Verdict::OutOfTokens, _) => Err(refused_by(Limit::Tokens, buckets.tokens.as_ref())),
            (Verdict::OutOfRequests, _) => Err(refused_by(Limit::Requests, buckets.requests.as_ref())),
            (Verdict::Admitted | Verdict::OverBudget, _) => {
                self.usage.admitted.fetch_add(1, Ordering::Relaxed);
                Ok(RateSnapshot {
                    requests: buckets.requests.as_ref().map(Bucket::state),
                    tokens: buckets.tokens.as_ref().map(Bucket::state),
                })
            }
        }
    }

    /// The period the key's spend is summed over: its budget's, else `total`.
    fn budget_period(&self) -> crate::budgets::Period {
        self.spec
            .budget
            .map_or(crate::budgets::Period::Total, |budget| budget.per)
    }

    /// Admits one request by this replica's buckets alone, if both rates allow it, spending
    /// one request; a refusal spends nothing.
    pub fn admit(&self) -> Result<RateSnapshot, RateLimited> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Result<RateSnapshot, RateLimited> {
        let mut buckets = self.usage.buckets();
        let Buckets { requests, tokens, .. } = &mut *buckets;
        // Tokens first: a request refused for tokens must not also spend a request.
        for (bucket, limit) in [(tokens.as_mut(), Limit::Tokens), (requests.as_mut(), Limit::Requests)] {
            if let Some(bucket) = bucket {
                bucket.refill(now);
                if bucket.level < 1.0 {
                    self.usage.refused[limit.index()].fetch_add(1, Ordering::Relaxed);
                    return Err(RateLimited {
                        key: self.spec.name.clone(),
                        limit,
                        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                        per_minute: bucket.per_minute as u64,
                        retry_after: bucket.wait_for(1.0),
                    });
                }
            }
        }
        if let Some(bucket) = requests.as_mut() {
            bucket.level -= 1.0;
        }
        self.usage.admitted.fetch_add(1, Ordering::Relaxed);
        Ok(RateSnapshot {
            requests: requests.as_ref().map(Bucket::state),
            tokens: tokens.as_ref().map(Bucket::state),
        })
    }

    /// Refuses a request when the key's budget is spent for the current period; spends nothing.
    pub fn check_budget(&self) -> Result<(), BudgetExceeded> {
        let Some(budget) = self.spec.budget else {
            return Ok(());
        };
        let (spent, renews_at) = self.with_spend(|spend, renews_at| (spend.spent, renews_at));
        if spent < budget.limit {
            return Ok(());
        }
        self.usage.over_budget.fetch_add(1, Ordering::Relaxed);
        Err(BudgetExceeded {
            key: self.spec.name.clone(),
            budget,
            spent,
            renews_at,
        })
    }

    /// Charges an answer: the tokens it `reported`, else the estimate from the request's
    /// size and the answer's `answer_units` (see [`estimated_usage`]); and, at `price`
    /// (the answering model's), their cost, prompt and estimated request tokens at the
    /// input price, the rest at the output price.
    pub fn charge_answer(
        &self,
        reported: Option<crate::usage::Usage>,
        request_bytes: usize,
        answer_units: u64,
        price: Option<Price>,
    ) {
        let used = reported.unwrap_or_else(|| estimated_usage(request_bytes, answer_units));
        let tokens = used.prompt_tokens + used.completion_tokens;
        self.charge(tokens);
        let cost = price.map_or(0.0, |price| price.cost(used.prompt_tokens, used.completion_tokens));
        if price.is_some() {
            self.with_spend(|spend, _| spend.spent += cost);
        }
        // Shared only what the shared state limits: tokens per minute and the budget.
        let shared_cost = if self.spec.budget.is_some() { cost } else { 0.0 };
        let shared_tokens = if self.spec.tokens_per_minute.is_some() {
            tokens
        } else {
            0
        };
        if self.shared.is_some() && (shared_tokens > 0 || shared_cost > 0.0) {
            let mut buckets = self.usage.buckets();
            buckets.unsynced.tokens += shared_tokens;
            buckets.unsynced.cost += shared_cost;
            drop(buckets);
            self.send_unsynced();
        }
    }

    /// Sends what was charged here and not yet to the shared state, in a task of its own
    /// (answers are charged where nothing may wait, a stream's end among them); kept for a
    /// later try if Redis is unavailable, or if there is no runtime to send it from.
    fn send_unsynced(&self) {
        let (true, Ok(runtime)) = (self.shared.is_some(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let key = self.clone();
        runtime.spawn(async move { key.send_charges().await });
    }

    /// Sends what was charged here and not yet to the shared state; what Redis does not
    /// take is kept for the next try and returned (tokens, cost), nothing when all went.
    pub async fn send_charges(&self) -> Option<(u64, f64)> {
        let shared = self.shared.as_ref()?;
        let per = self.budget_period();
        let (period, ends) = per.at(crate::unix_now());
        let unsynced = std::mem::take(&mut self.usage.buckets().unsynced);
        if unsynced.is_empty() {
            return None;
        }
        let charge = Charge {
            name: &self.spec.name,
            tokens_per_minute: self.spec.tokens_per_minute,
            tokens: unsynced.tokens,
            cost: (unsynced.cost > 0.0).then_some((unsynced.cost, period.as_str(), ends)),
        };
        let result = shared.charge(&charge).await;
        let mut buckets = self.usage.buckets();
        if let Ok(levels) = result {
            buckets.spend.roll(per, crate::unix_now());
            buckets.mirror(&levels, &period, Instant::now());
            None
        } else {
            buckets.unsynced.tokens += unsynced.tokens;
            buckets.unsynced.cost += unsynced.cost;
            Some((buckets.unsynced.tokens, buckets.unsynced.cost))
        }
    }

    /// What the key has spent in its budget's current period, and the period's label.
    #[must_use]
    pub fn spend(&self) -> Spend {
        self.with_spend(|spend, _| spend.clone())
    }

    /// Takes up what was spent before (from the spend file), if it is this budget's period.
    pub fn restore_spend(&self, earlier: &Spend) {
        self.with_spend(|spend, _| {
            if spend.period == earlier.period && earlier.spent.is_finite() && earlier.spent >= 0.0 {
                spend.spent = earlier.spent;
            }
        });
    }

    /// `act` on the spend of the budget's current period (a new period starts at zero;
    /// without a budget the period is `total`), given when that period ends.
    fn with_spend<T>(&self, act: impl FnOnce(&mut Spend, Option<u64>) -> T) -> T {
        let mut buckets = self.usage.buckets();
        let ends = buckets.spend.roll(self.budget_period(), crate::unix_now());
        act(&mut buckets.spend, ends)
    }

    /// Charges the tokens an answer used.
    pub fn charge(&self, tokens: u64) {
        self.usage.tokens.fetch_add(tokens, Ordering::Relaxed);
        let mut buckets = self.usage.buckets();
        if let Some(bucket) = buckets.tokens.as_mut() {
            bucket.refill(Instant::now());
            #[allow(clippy::cast_precision_loss)]
            let spent = tokens as f64;
            bucket.level -= spent;
        }
    }

    /// Requests admitted, refused per [`Limit`] (requests, tokens) and for the budget, tokens charged.
    #[must_use]
    pub fn counts(&self) -> (u64, [u64; 3], u64) {
        let usage = &self.usage;
        (
            usage.admitted.load(Ordering::Relaxed),
            [
                usage.refused[0].load(Ordering::Relaxed),
                usage.refused[1].load(Ordering::Relaxed),
                usage.over_budget.load(Ordering::Relaxed),
            ],
            usage.tokens.load(Ordering::Relaxed),
        )
    }
}

/// The keys of a policy, built from validated specs, sharing their limits and spend in
/// `shared` if given.
#[must_use]
pub fn build(specs: &[ApiKeySpec], shared: Option<&Arc<SharedState>>) -> Vec<ApiKey> {
    specs
        .iter()
        .cloned()
        .map(|spec| match shared {
            Some(shared) => ApiKey::sharing(spec, Arc::clone(shared)),
            None => ApiKey::new(spec),
        })
        .collect()
}

/// Lets each key in `keys` continue the usage of the key of the same name in `previous`.
pub fn carry_over(keys: &mut [ApiKey], previous: &[ApiKey]) {
    let previous: BTreeMap<&str, &ApiKey> = previous.iter().map(|key| (key.name(), key)).collect();
    for key in keys {
        if let Some(earlier) = previous.get(key.name()) {
            key.continue_from(earlier);
        }
    }
}

/// Lets each key in `keys` take up what the spend file says it had `spent`, by name.
pub fn restore_spend<'a>(keys: impl IntoIterator<Item = &'a ApiKey>, spent: &BTreeMap<String, Spend>) {
    for key in keys {
        if let Some(spend) = spent.get(key.name()) {
            key.restore_spend(spend);
        }
    }
}

/// Charges a streamed answer's tokens to a key when the stream ends, or when the client
/// leaves it: the stream's reported usage, else an estimate from what has passed.
pub struct StreamCharge {
    key: ApiKey,
    request_bytes: usize,
    price: Option<Price>,
    usage: Option<crate::usage::Usage>,
    events: u64,
}

impl StreamCharge {
    #[must_use]
    pub fn new(key: ApiKey, request_bytes: usize, price: Option<Price>) -> Self {
        Self {
            key,
            request_bytes,
            price,
            usage: None,
            events: 0,
        }
    }

    /// The stream reported its usage; that is what is charged.
    pub fn reported(&mut self, usage: crate::usage::Usage) {
        self.usage = Some(usage);
    }

    /// `events` data events have passed so far (for the estimate).
    pub fn passed(&mut self, events: u64) {
        self.events = events;
    }
}

impl Drop for StreamCharge {
    fn drop(&mut self) {
        self.key
            .charge_answer(self.usage, self.request_bytes, self.events, self.price);
    }
}

/// The token estimate for an answer that reports no usage: a prompt token per four bytes of
/// the request, a completion token per answer unit (four bytes of a complete answer, or a
/// streamed event, about a token each).
#[must_use]
pub fn estimated_usage(request_bytes: usize, answer_units: u64) -> crate::usage::Usage {
    crate::usage::Usage {
        prompt_tokens: (request_bytes as u64).div_ceil(4),
        completion_tokens: answer_units,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> Result<Vec<ApiKeySpec>, Error> {
        let entries: Vec<ApiKeyEntry> = serde_norway::from_str(yaml).map_err(|e| Error::Config(e.to_string()))?;
        validate(entries, &|name| (name == "TEAM_KEY").then(|| "sk-from-env".to_owned()))
    }

    fn limited(requests: Option<u64>, tokens: Option<u64>) -> ApiKey {
        ApiKey::new(ApiKeySpec {
            key: Secret::new("k".into()),
            name: "team".into(),
            requests_per_minute: requests,
            tokens_per_minute: tokens,
            models: None,
            budget: None,
        })
    }

    #[test]
    fn a_budget_refuses_once_spent_charges_at_the_answering_price_and_restores_its_period_only() {
        let budget = Budget {
            limit: 0.01,
            per: crate::budgets::Period::Month,
        };
        let key = ApiKey::new(ApiKeySpec {
            budget: Some(budget),
            ..limited(None, None).spec().clone()
        });
        let price = Price {
            input: 2.0,
            output: 10.0,
        };
        assert!(key.check_budget().is_ok());
        // 1000 prompt tokens at 2/M and 500 completion tokens at 10/M: 0.007.
        let usage = crate::usage::Usage {
            prompt_tokens: 1000,
            completion_tokens: 500,
        };
        key.charge_answer(Some(usage), 0, 0, Some(price));
        assert!((key.spend().spent - 0.007).abs() < 1e-12, "{:?}", key.spend());
        assert!(key.check_budget().is_ok(), "0.007 of 0.01");
        // No usage reported: 4000 request bytes ~ 1000 input tokens, 300 events ~ output tokens.
        key.charge_answer(None, 4000, 300, Some(price));
        assert!((key.spend().spent - 0.012).abs() < 1e-12, "{:?}", key.spend());
        let refused = key.check_budget().unwrap_err();
        assert_eq!(refused.key, "team");
        assert!(refused.renews_at.is_some());
        let message = refused.to_string();
        assert!(
            message.contains("budget of 0.01 this month (UTC)") && message.contains("It renews at"),
            "{message}"
        );
        assert_eq!(key.counts().1, [0, 0, 1]);
        // Unpriced answers (passthrough) cost nothing.
        key.charge_answer(Some(usage), 0, 0, None);
        assert!((key.spend().spent - 0.012).abs() < 1e-12);

        let fresh = ApiKey::new(key.spec().clone());
        fresh.restore_spend(&Spend {
            period: "1999-01".into(),
            spent: 5.0,
        });
        assert!(
            fresh.spend().spent.abs() < f64::EPSILON,
            "an old period's spend is not this month's"
        );
        fresh.restore_spend(&key.spend());
        assert!(fresh.check_budget().is_err(), "restored from the spend file");

        let parsed = spec("- {key: k, name: team, budget: {limit: 50, per: day}}\n").unwrap();
        assert_eq!(
            parsed[0].budget,
            Some(Budget {
                limit: 50.0,
                per: crate::budgets::Period::Day
            })
        );
        for bad in [
            "{limit: 0, per: day}",
            "{limit: -1, per: month}",
            "{limit: .inf, per: total}",
        ] {
            let error = spec(&format!("- {{key: k, budget: {bad}}}\n")).unwrap_err().to_string();
            assert!(
                error.contains("budget.limit must be a positive amount"),
                "{bad}: {error}"
            );
        }
        assert!(spec("- {key: k, budget: {limit: 5, per: week}}\n").is_err());
    }

    #[test]
    fn both_forms_parse_and_keys_expand_from_the_environment() {
        let specs =
            spec("- plain-key\n- {key: '${TEAM_KEY}', name: team-a, requests_per_minute: 60, models: [auto]}\n")
                .unwrap();
        assert_eq!(specs[0].key.expose(), "plain-key");
        assert!(
            specs[0].name.starts_with("key-") && specs[0].name.len() == 12,
            "{}",
            specs[0].name
        );
        assert_eq!(specs[0].name, default_name("plain-key"), "stable across restarts");
        assert!(!specs[0].is_limited() && specs[0].models.is_none());
        assert_eq!(specs[1].key.expose(), "sk-from-env");
        assert_eq!(specs[1].name, "team-a");
        assert_eq!(specs[1].requests_per_minute, Some(60));
        assert!(specs[1].is_limited());
    }

    #[test]
    fn bad_entries_are_refused_without_echoing_keys() {
        for (yaml, expected) in [
            (
                "- {key: k, request_per_minute: 5}\n",
                "unknown field `request_per_minute`",
            ),
            ("- {key: '${NOT_SET}'}\n", "NOT_SET is not set"),
            ("- ''\n", "the key is empty"),
            ("- {key: k, name: 'has space'}\n", "must be 1 to 64"),
            (
                "- {key: k, tokens_per_minute: 0}\n",
                "tokens_per_minute must be at least 1",
            ),
            ("- {key: k, models: []}\n", "models is empty"),
            ("- {key: k1, name: a}\n- {key: k2, name: a}\n", "two keys are named `a`"),
            (
                "- sk-secret-one\n- {key: sk-secret-one, name: b}\n",
                "the same key is listed twice",
            ),
        ] {
            let message = spec(yaml).unwrap_err().to_string();
            assert!(message.contains(expected), "{yaml}: {message}");
            assert!(!message.contains("sk-secret"), "{message}");
        }
    }

    #[test]
    fn models_allow_names_routers_at_any_threshold_and_alias_targets() {
        let specs = spec("- {key: k, models: [auto, router-mf, strong-model]}\n").unwrap();
        let key = &specs[0];
        let routed = |router| ModelTarget::Routed {
            router,
            threshold: None,
        };
        assert!(key.allows("auto", &routed("random")), "the alias itself");
        assert!(
            key.allows("router-mf-0.3", &routed("mf")),
            "any threshold of an allowed router"
        );
        assert!(!key.allows("router-random-0.5", &routed("random")));
        assert!(key.allows("strong-model", &ModelTarget::Direct("strong-model")));
        assert!(!key.allows("weak-model", &ModelTarget::Direct("weak-model")));
        assert!(
            key.allows("gpt-4o", &ModelTarget::Direct("strong-model")),
            "an alias for an allowed model"
        );
        let open = &spec("- k\n").unwrap()[0];
        assert!(open.allows("anything", &ModelTarget::Direct("anything")));
    }

    #[test]
    fn requests_refill_continuously_and_refusals_spend_nothing() {
        let key = limited(Some(60), None);
        let start = Instant::now();
        for expected_remaining in (0..60).rev() {
            let snapshot = key.admit_at(start).unwrap();
            assert_eq!(snapshot.requests.unwrap().remaining, expected_remaining);
            assert!(snapshot.tokens.is_none());
        }
        let refused = key.admit_at(start).unwrap_err();
        assert_eq!(refused.limit, Limit::Requests);
        assert_eq!(refused.per_minute, 60);
        assert!((refused.retry_after.as_secs_f64() - 1.0).abs() < 1e-6, "{refused:?}");
        // Half a second later still nothing; a second later exactly one.
        assert!(key.admit_at(start + Duration::from_millis(500)).is_err());
        assert!(key.admit_at(start + Duration::from_secs(1)).is_ok());
        assert!(key.admit_at(start + Duration::from_secs(1)).is_err());
        assert_eq!(key.counts(), (61, [3, 0, 0], 0));
    }

    #[test]
    fn tokens_are_charged_after_the_answer_and_debt_is_paid_back() {
        let key = limited(Some(1000), Some(600));
        let start = Instant::now();
        key.admit_at(start).unwrap();
        key.charge(1200); // 600 over: ten tokens a second refill it in 60 s
        let refused = key.admit_at(Instant::now()).unwrap_err();
        assert_eq!(refused.limit, Limit::Tokens);
        assert!(
            (59.0..=60.2).contains(&refused.retry_after.as_secs_f64()),
            "{refused:?}"
        );
        let (admitted, refusals, tokens) = key.counts();
        assert_eq!((admitted, refusals, tokens), (1, [0, 1, 0], 1200));
        // A request refused for tokens left the request bucket alone.
        let requests_left = key.usage.buckets().requests.as_ref().unwrap().level;
        assert!((998.9..999.1).contains(&requests_left), "{requests_left}");
        let later = Instant::now() + Duration::from_secs(61);
        let snapshot = key.admit_at(later).unwrap();
        assert!((1..=11).contains(&snapshot.tokens.unwrap().remaining));
    }

    #[test]
    fn a_reload_keeps_usage_and_applies_new_limits() {
        let old = vec![limited(Some(10), None)];
        for _ in 0..10 {
            old[0].admit().unwrap();
        }
        assert!(old[0].admit().is_err());
        let mut raised = vec![limited(Some(20), Some(100))];
        carry_over(&mut raised, &old);
        // 10 more allowed now (the limit rose by 10), not a fresh 20.
        for _ in 0..10 {
            raised[0].admit().unwrap();
        }
        assert!(raised[0].admit().is_err());
        assert_eq!(raised[0].counts().0, 20, "counts continue");
        let mut unlimited = vec![limited(None, None)];
        carry_over(&mut unlimited, &raised);
        assert!(unlimited[0].admit().unwrap().requests.is_none());
    }

    #[test]
    fn headers_and_reset_format_follow_openai() {
        assert_eq!(format_reset(Duration::from_millis(250)), "250ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(2)), "2s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        let key = limited(Some(60), Some(1000));
        let headers = key.admit().unwrap().headers();
        let get = |name| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());
        assert_eq!(get("x-ratelimit-limit-requests"), Some("60"));
        assert_eq!(get("x-ratelimit-remaining-requests"), Some("59"));
        assert_eq!(get("x-ratelimit-reset-requests"), Some("1s"));
        assert_eq!(get("x-ratelimit-remaining-tokens"), Some("1000"));
        assert_eq!(get("x-ratelimit-reset-tokens"), Some("0ms"));
    }

    #[test]
    fn estimates_round_up() {
        let total = |usage: crate::usage::Usage| usage.prompt_tokens + usage.completion_tokens;
        assert_eq!(total(estimated_usage(0, 0)), 0);
        assert_eq!(total(estimated_usage(5, 3)), 5);
        assert_eq!(total(estimated_usage(400, 0)), 100);
        assert_eq!(
            estimated_usage(5, 3).prompt_tokens,
            2,
            "the request's bytes, rounded up"
        );
    }

    #[test]
    fn the_shared_levels_are_taken_up_within_this_keys_limits_and_its_period_only() {
        let key = limited(Some(10), Some(100));
        let now = Instant::now();
        let mut buckets = key.usage.buckets();
        buckets.spend.roll(crate::budgets::Period::Day, 86_400 * 20_000);
        let period = buckets.spend.period.clone();
        buckets.mirror(
            &Levels {
                requests: Some(3.0),
                tokens: Some(-40.0),
                spent: Some(2.5),
            },
            &period,
            now,
        );
        let requests_left = |buckets: &Buckets| buckets.requests.as_ref().map(|bucket| bucket.state().remaining);
        assert_eq!(requests_left(&buckets), Some(3));
        let tokens = buckets.tokens.as_ref().unwrap();
        assert!((tokens.level + 40.0).abs() < 1e-9, "a debt is kept: {}", tokens.level);
        assert!((buckets.spend.spent - 2.5).abs() < 1e-9);
        // Another period's spend, or a level above this key's limit (a reload lowered it
        // before Redis heard), is not taken as it is.
        buckets.mirror(
            &Levels {
                requests: Some(50.0),
                tokens: None,
                spent: Some(9.0),
            },
            "1999-01-01",
            now,
        );
        assert_eq!(requests_left(&buckets), Some(10));
        assert!(
            (buckets.tokens.as_ref().unwrap().level + 40.0).abs() < 1e-9,
            "no level: left as it was"
        );
        assert!((buckets.spend.spent - 2.5).abs() < 1e-9);
    }
}
