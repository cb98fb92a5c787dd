//! The response cache (`response_cache`): an identical request answered again from memory.
//!
//! Evaluation runs, retried jobs and agents that re-ask the same question send the same
//! request many times; each costs a model call. With the cache on, a successful Chat
//! Completions or legacy Completions answer (a stream too, once it has ended with
//! `data: [DONE]`) is kept for `ttl_secs`, and the same request — same fields and values,
//! asking the same router and threshold (or the same model), from the same API key unless
//! the cache is `shared` — gets it back without scoring or a model call. Responses API
//! requests are never cached: each answer there is a stored conversation with its own id.
//!
//! Memory is bounded by `max_mb`: the least recently used answers go first, and no answer
//! larger than an eighth of it is kept. A client sends `Cache-Control: no-cache` to get a
//! fresh answer (which then replaces the cached one) or `no-store` to leave the cache out.
//! Answers the proxy could only give by a fallback (`on_router_error`, `on_upstream_error`)
//! are not kept, so a passing outage is not served again for `ttl_secs`.
//!
//! Identical requests that arrive together are coalesced (`coalesce`, on by default): while
//! the first is being answered, the others wait for its answer and get it from the cache
//! instead of each paying for the same call (a burst of retries, a popular prompt the moment
//! its answer expires). If the first one's answer is not kept — an error, a fallback, a
//! client that left — the waiting requests go to the model themselves, all at once.
//! Identical streams are coalesced live: the first one's stream is recorded on a [`Tape`]
//! as it passes, and the others read that tape from its start and then as it grows, so
//! each gets every event as soon as the first one does, from one model call. If the first
//! client leaves while others still read, its stream is read on to the end for them.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, header};
use bytes::Bytes;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::config::Price;
use crate::error::Error;
use crate::gateway::{RouteDecision, Tier};
use crate::model_name::ModelTarget;
use crate::request::{Api, ModelRequest};
use crate::shared_state::SharedState;
use crate::upstream::ByteStream;
use crate::usage::{SseUsageScanner, Usage};

/// The longest `ttl_secs`: thirty days.
const MAX_TTL_SECS: u64 = 30 * 86_400;
/// The largest `max_mb`: 64 GiB.
const MAX_MB: u64 = 65_536;
/// What an entry costs besides its body (key, bookkeeping, decision), for the memory bound.
const ENTRY_OVERHEAD_BYTES: usize = 256;

/// `response_cache` in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// How long an answer is served again, in seconds.
    #[serde(default = "default_ttl_secs")]
    pub ttl_secs: u64,
    /// The memory the cached answers may take, in MiB.
    #[serde(default = "default_max_mb")]
    pub max_mb: u64,
    /// Whose requests may be answered by whose cached answers.
    #[serde(default)]
    pub scope: CacheScope,
    /// Whether an identical request waits for one already being answered (a stream reads
    /// that one's stream as it is written).
    #[serde(default = "default_coalesce")]
    pub coalesce: bool,
    /// Whether answers are also kept in the shared state's Redis, so every replica answers
    /// from what any of them was answered (needs `shared_state`).
    #[serde(default)]
    pub redis: bool,
}

fn default_coalesce() -> bool {
    true
}

fn default_ttl_secs() -> u64 {
    3600
}

fn default_max_mb() -> u64 {
    256
}

impl CacheConfig {
    pub fn validate(&self) -> Result<(), Error> {
        if !(1..=MAX_TTL_SECS).contains(&self.ttl_secs) {
            return Err(Error::Config(format!(
                "response_cache.ttl_secs = {} is outside [1, {MAX_TTL_SECS}] (thirty days)",
                self.ttl_secs
            )));
        }
        if !(1..=MAX_MB).contains(&self.max_mb) {
            return Err(Error::Config(format!(
                "response_cache.max_mb = {} is outside [1, {MAX_MB}]",
                self.max_mb
            )));
        }
        Ok(())
    }
}

/// Whose cached answers a request may get.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheScope {
    /// Each API key its own answers: one team's prompts and answers never reach another.
    #[default]
    Key,
    /// Every caller the same answers (one team, or no API keys at all).
    Shared,
}

/// What a client asked of the cache in `Cache-Control`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    /// Answer from the cache if it can, and keep a new answer.
    Use,
    /// `no-cache`: a fresh answer, which then replaces the cached one.
    Refresh,
    /// `no-store`: leave the cache out entirely.
    Bypass,
}

impl Directive {
    #[must_use]
    pub fn of(headers: &HeaderMap) -> Self {
        let mut directive = Self::Use;
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split(',') {
                let token = token.trim();
                if token.eq_ignore_ascii_case("no-store") {
                    return Self::Bypass;
                }
                if token.eq_ignore_ascii_case("no-cache") || token.eq_ignore_ascii_case("max-age=0") {
                    directive = Self::Refresh;
                }
            }
        }
        directive
    }
}

/// What the cache did for a request, as the `x-routellm-cache` header says it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheOutcome {
    /// Answered from the cache; the answer was stored `age` ago.
    Hit { age: Duration },
    /// Not in the cache: the model answered (and the answer is kept if it can be).
    Miss,
    /// `Cache-Control: no-cache`: the model answered, replacing any cached answer.
    Refresh,
    /// `Cache-Control: no-store`: the cache was left out.
    Bypass,
}

impl CacheOutcome {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit { .. } => "hit",
            Self::Miss => "miss",
            Self::Refresh => "refresh",
            Self::Bypass => "bypass",
        }
    }
}

/// A request's identity in the cache: a SHA-256 of who asks, which API, what the request
/// asks to be routed by (or which model), and every other field of the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// In hex: its name in Redis.
    fn hex(&self) -> String {
        use std::fmt::Write as _;
        self.0.iter().fold(String::with_capacity(64), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
    }
}

/// One cached answer and what the proxy had decided for it.
#[derive(Debug, Clone)]
pub struct CachedAnswer {
    pub body: Bytes,
    pub content_type: Option<HeaderValue>,
    pub decision: Option<RouteDecision>,
    /// The configured name of the model that answered.
    pub model: String,
    pub answered_by: Tier,
    pub deployment: usize,
    pub price: Option<Price>,
    /// The tokens the model reported for it: what each hit saves.
    pub usage: Option<Usage>,
}

impl CachedAnswer {
    fn bytes(&self) -> usize {
        self.body.len() + self.model.len() + ENTRY_OVERHEAD_BYTES
    }
}

struct Slot {
    answer: Arc<CachedAnswer>,
    stored_at: Instant,
    /// Its place in the recency order.
    used: u64,
    bytes: usize,
}

#[derive(Default)]
struct Entries {
    slots: HashMap<CacheKey, Slot>,
    /// Keys by last use, least recent first.
    recency: BTreeMap<u64, CacheKey>,
    clock: u64,
    bytes: usize,
}

impl Entries {
    fn remove(&mut self, key: &CacheKey) -> Option<Slot> {
        let slot = self.slots.remove(key)?;
        self.recency.remove(&slot.used);
        self.bytes -= slot.bytes;
        Some(slot)
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

/// The cached answers, bounded in memory, with the counters `/metrics` shows.
pub struct ResponseCache {
    ttl: Duration,
    capacity_bytes: usize,
    max_entry_bytes: usize,
    scope: CacheScope,
    entries: Mutex<Entries>,
    coalesce: bool,
    /// Requests being answered now by a model, by key: whoever asks the same waits on it.
    /// A streaming leader publishes its [`Tape`] there once its answer has begun.
    in_flight: Mutex<HashMap<CacheKey, watch::Receiver<Option<Arc<Tape>>>>>,
    /// Hits that waited for an identical request's answer.
    coalesced: AtomicU64,
    /// Lookups by outcome: hit, miss, refresh, bypass.
    lookups: [AtomicU64; 4],
    evictions: AtomicU64,
    /// Tokens that hits did not spend again (as the cached answers reported them).
    saved_tokens: [AtomicU64; 2],
    /// What those tokens would have cost at the answering model's price (f64 bits).
    saved_cost: AtomicU64,
    /// Where answers are also kept for other replicas (`redis: true`).
    remote: Option<Arc<SharedState>>,
    /// Hits on answers found in Redis.
    remote_hits: AtomicU64,
}

/// The cache's counters at one moment, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub refreshes: u64,
    pub bypasses: u64,
    /// Of the hits, those that waited for an identical request being answered.
    pub coalesced: u64,
    pub entries: usize,
    pub bytes: usize,
    pub capacity_bytes: usize,
    pub evictions: u64,
    pub saved_prompt_tokens: u64,
    pub saved_completion_tokens: u64,
    pub saved_cost: f64,
    /// Of the hits, those on answers found in the shared state's Redis.
    pub shared_hits: u64,
}

impl ResponseCache {
    #[must_use]
    pub fn new(config: &CacheConfig) -> Self {
        let capacity_bytes = usize::try_from(config.max_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        Self {
            ttl: Duration::from_secs(config.ttl_secs),
            capacity_bytes,
            max_entry_bytes: capacity_bytes / 8,
            scope: config.scope,
            entries: Mutex::new(Entries::default()),
            coalesce: config.coalesce,
            in_flight: Mutex::new(HashMap::new()),
            coalesced: AtomicU64::new(0),
            lookups: std::array::from_fn(|_| AtomicU64::new(0)),
            evictions: AtomicU64::new(0),
            saved_tokens: std::array::from_fn(|_| AtomicU64::new(0)),
            saved_cost: AtomicU64::new(0),
            remote: None,
            remote_hits: AtomicU64::new(0),
        }
    }

    /// The cache with its answers also kept in `shared`'s Redis, for every replica.
    #[must_use]
    pub fn sharing(self, shared: Arc<SharedState>) -> Self {
        Self {
            remote: Some(shared),
            ..self
        }
    }

    /// After a miss here: the answer another replica (or this one, before a restart) left
    /// in Redis, kept here too, counted as a hit; `None` without one or without `redis`.
    pub async fn get_remote(&self, key: &CacheKey) -> Option<(Arc<CachedAnswer>, Duration)> {
        let remote = self.remote.as_ref()?;
        let stored = remote.get_bytes(&remote.cache_key(&key.hex())).await.ok()??;
        let Some((answer, stored_at_ms)) = RemoteEntry::decode(&stored) else {
            tracing::debug!("a cached answer in Redis is not one this build reads; asking the model");
            return None;
        };
        let age = Duration::from_millis(crate::unix_now_millis().saturating_sub(stored_at_ms));
        if age >= self.ttl {
            return None;
        }
        let stored_at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        self.insert_at(*key, answer, stored_at);
        let found = self.get(key)?;
        self.remote_hits.fetch_add(1, Ordering::Relaxed);
        Some(found)
    }

    /// Whether requests to `api` are cached at all.
    #[must_use]
    pub fn caches(api: Api) -> bool {
        matches!(api, Api::ChatCompletions | Api::Completions)
    }

    /// The key of `request` from `caller` (an API key's name), asking for `target` with
    /// its threshold resolved (`None` for a router without one, which is then refused).
    #[must_use]
    pub fn key(&self, caller: Option<&str>, target: &ModelTarget<'_>, request: &ModelRequest<'_>) -> CacheKey {
        let mut hasher = Sha256::new();
        let mut part = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        part(match self.scope {
            CacheScope::Key => caller.unwrap_or("").as_bytes(),
            CacheScope::Shared => b"",
        });
        part(request.api().path().as_bytes());
        match target {
            ModelTarget::Routed { router, threshold } => {
                part(b"router");
                part(router.as_bytes());
                part(&threshold.map_or(f64::NAN, |threshold| threshold).to_le_bytes());
            }
            ModelTarget::Direct(model) => {
                part(b"model");
                part(model.as_bytes());
            }
        }
        // Field order is the SDK's business; a repeated field keeps its order (the last wins).
        let mut fields: Vec<(&str, &str)> = request.fields().filter(|(name, _)| *name != "model").collect();
        fields.sort_by(|a, b| a.0.cmp(b.0));
        for (name, value) in fields {
            part(name.as_bytes());
            part(value.as_bytes());
        }
        CacheKey(hasher.finalize().into())
    }

    /// Counts what the cache did for a request that did not hit.
    pub fn count(&self, outcome: CacheOutcome) {
        let index = match outcome {
            CacheOutcome::Hit { .. } => 0,
            CacheOutcome::Miss => 1,
            CacheOutcome::Refresh => 2,
            CacheOutcome::Bypass => 3,
        };
        self.lookups[index].fetch_add(1, Ordering::Relaxed);
    }

    /// The cached answer of `key` and how long ago it was stored, if it is there and fresh.
    /// A hit is counted, with the tokens it saved; a miss is not (see [`ResponseCache::count`]).
    pub fn get(&self, key: &CacheKey) -> Option<(Arc<CachedAnswer>, Duration)> {
        let mut entries = self.lock();
        let (stored_at, used) = {
            let slot = entries.slots.get(key)?;
            (slot.stored_at, slot.used)
        };
        let age = stored_at.elapsed();
        if age >= self.ttl {
            entries.remove(key);
            return None;
        }
        let now = entries.tick();
        entries.recency.remove(&used);
        entries.recency.insert(now, *key);
        let slot = entries.slots.get_mut(key)?;
        slot.used = now;
        let answer = Arc::clone(&slot.answer);
        drop(entries);
        self.count(CacheOutcome::Hit { age });
        if let Some(usage) = answer.usage {
            self.saved_tokens[0].fetch_add(usage.prompt_tokens, Ordering::Relaxed);
            self.saved_tokens[1].fetch_add(usage.completion_tokens, Ordering::Relaxed);
            if let Some(price) = answer.price {
                crate::metrics::add_f64(
                    &self.saved_cost,
                    price.cost(usage.prompt_tokens, usage.completion_tokens),
                );
            }
        }
        Some((answer, age))
    }

    /// For a request about to be answered by a model: the first of identical requests in
    /// flight leads (its [`Flight`] guard, held until its answer is kept or given up; a
    /// stream's until it has ended), the others are told to wait. `None` when requests are
    /// not coalesced.
    #[must_use]
    pub fn join_flight(self: &Arc<Self>, key: CacheKey) -> Option<Joined> {
        if !self.coalesce {
            return None;
        }
        let mut in_flight = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(leader) = in_flight.get(&key) {
            return Some(Joined::Wait(Waiting(leader.clone())));
        }
        let (done, watching) = watch::channel(None);
        in_flight.insert(key, watching);
        Some(Joined::Lead(Flight {
            cache: Arc::clone(self),
            key,
            done,
        }))
    }

    /// Counts a request that read an identical one's stream as it was written.
    pub fn count_coalesced_stream(&self) {
        self.coalesced.fetch_add(1, Ordering::Relaxed);
        self.count(CacheOutcome::Hit { age: Duration::ZERO });
    }

    /// After waiting: the answer the leading request left in the cache, counted as a
    /// coalesced hit.
    #[must_use]
    pub fn get_coalesced(&self, key: &CacheKey) -> Option<(Arc<CachedAnswer>, Duration)> {
        let found = self.get(key)?;
        self.coalesced.fetch_add(1, Ordering::Relaxed);
        Some(found)
    }

    /// Keeps `answer` for `key` (replacing what was there), evicting the least recently
    /// used answers past the memory bound; an answer over an eighth of it is not kept.
    /// With `redis`, it is also sent there (in a task of its own) for the other replicas.
    pub fn insert(&self, key: CacheKey, answer: CachedAnswer) {
        if answer.bytes() > self.max_entry_bytes {
            return;
        }
        if let (Some(remote), Ok(runtime)) = (&self.remote, tokio::runtime::Handle::try_current()) {
            let (remote, ttl) = (Arc::clone(remote), self.ttl);
            let (name, value) = (
                remote.cache_key(&key.hex()),
                RemoteEntry::encode(&answer, crate::unix_now_millis()),
            );
            runtime.spawn(async move { remote.set_bytes(&name, &value, ttl).await });
        }
        self.insert_at(key, answer, Instant::now());
    }

    fn insert_at(&self, key: CacheKey, answer: CachedAnswer, stored_at: Instant) {
        let bytes = answer.bytes();
        if bytes > self.max_entry_bytes {
            return;
        }
        let mut entries = self.lock();
        entries.remove(&key);
        let used = entries.tick();
        entries.recency.insert(used, key);
        entries.bytes += bytes;
        entries.slots.insert(
            key,
            Slot {
                answer: Arc::new(answer),
                stored_at,
                used,
                bytes,
            },
        );
        let mut evicted = 0;
        while entries.bytes > self.capacity_bytes {
            let Some((_, oldest)) = entries.recency.pop_first() else {
                break;
            };
            // `recency` no longer holds it, so `remove` only takes the slot and its bytes.
            if let Some(slot) = entries.slots.remove(&oldest) {
                entries.bytes -= slot.bytes;
                evicted += 1;
            }
        }
        drop(entries);
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
    }

    /// Passes `body` (a streamed answer to `api`) through unchanged while recording it;
    /// once it has ended with `data: [DONE]`, the recording is kept for `key` as `answer`'s
    /// body. A stream broken off, ended with an error event, or outgrowing an entry's bound
    /// is not kept. With the request's `flight`, identical streams waiting on it read the
    /// answer live from a [`Tape`] it publishes; the flight ends with the stream.
    #[must_use]
    pub fn record_stream(
        self: &Arc<Self>,
        key: CacheKey,
        answer: CachedAnswer,
        body: ByteStream,
        api: Api,
        flight: Option<Flight>,
    ) -> ByteStream {
        let tape = flight.as_ref().map(|flight| {
            let tape = Arc::new(Tape::new(api, answer.clone(), self.max_entry_bytes));
            flight.done.send_replace(Some(Arc::clone(&tape)));
            tape
        });
        Box::pin(Recording {
            body,
            // A tape records the stream itself: the chunks are not copied a second time.
            recorded: tape.is_none().then(Vec::new),
            pending: Some((Arc::clone(self), key, answer)),
            tape,
            flight,
        })
    }

    /// The counters and the memory in use now.
    #[must_use]
    pub fn stats(&self) -> CacheStats {
        let (entries, bytes) = {
            let entries = self.lock();
            (entries.slots.len(), entries.bytes)
        };
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        CacheStats {
            hits: load(&self.lookups[0]),
            misses: load(&self.lookups[1]),
            refreshes: load(&self.lookups[2]),
            bypasses: load(&self.lookups[3]),
            coalesced: load(&self.coalesced),
            entries,
            bytes,
            capacity_bytes: self.capacity_bytes,
            evictions: load(&self.evictions),
            saved_prompt_tokens: load(&self.saved_tokens[0]),
            saved_completion_tokens: load(&self.saved_tokens[1]),
            saved_cost: f64::from_bits(load(&self.saved_cost)),
            shared_hits: load(&self.remote_hits),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // The entries stay consistent at every await-free step, so a panic elsewhere while
        // holding the lock leaves nothing half-done worth refusing to serve over.
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A cached answer as Redis keeps it: this header as one JSON line, then the body's bytes.
#[derive(Debug, Serialize, Deserialize)]
struct RemoteEntry {
    /// This layout's version: an entry of another is not read (a miss).
    version: u32,
    stored_at_ms: u64,
    content_type: Option<String>,
    decision: Option<RemoteDecision>,
    model: String,
    answered_by: RemoteTier,
    deployment: usize,
    price: Option<[f64; 2]>,
    usage: Option<[u64; 2]>,
}

/// A cached answer's routing decision: only a router's own choices are kept (not
/// fallbacks or pinned continuations), so those flags are not stored.
#[derive(Debug, Serialize, Deserialize)]
struct RemoteDecision {
    router: String,
    threshold: f64,
    win_rate: f64,
    tier: RemoteTier,
    model: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RemoteTier {
    Strong,
    Weak,
}

impl From<Tier> for RemoteTier {
    fn from(tier: Tier) -> Self {
        match tier {
            Tier::Strong => RemoteTier::Strong,
            Tier::Weak => RemoteTier::Weak,
        }
    }
}

impl From<RemoteTier> for Tier {
    fn from(tier: RemoteTier) -> Self {
        match tier {
            RemoteTier::Strong => Tier::Strong,
            RemoteTier::Weak => Tier::Weak,
        }
    }
}

impl RemoteEntry {
    const VERSION: u32 = 1;

    fn encode(answer: &CachedAnswer, stored_at_ms: u64) -> Vec<u8> {
        let header = RemoteEntry {
            version: Self::VERSION,
            stored_at_ms,
            content_type: answer
                .content_type
                .as_ref()
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned),
            decision: answer.decision.as_ref().map(|decision| RemoteDecision {
                router: decision.router.clone(),
                threshold: decision.threshold,
                win_rate: decision.win_rate,
                tier: decision.tier.into(),
                model: decision.model.clone(),
            }),
            model: answer.model.clone(),
            answered_by: answer.answered_by.into(),
            deployment: answer.deployment,
            price: answer.price.map(|price| [price.input, price.output]),
            usage: answer.usage.map(|usage| [usage.prompt_tokens, usage.completion_tokens]),
        };
        // A struct of plain fields always serialises; compact JSON has no raw newline.
        let mut encoded = serde_json::to_vec(&header).unwrap_or_default();
        encoded.push(b'\n');
        encoded.extend_from_slice(&answer.body);
        encoded
    }

    fn decode(stored: &[u8]) -> Option<(CachedAnswer, u64)> {
        let split = memchr::memchr(b'\n', stored)?;
        let header: RemoteEntry = serde_json::from_slice(&stored[..split]).ok()?;
        if header.version != Self::VERSION {
            return None;
        }
        let answer = CachedAnswer {
            body: Bytes::copy_from_slice(&stored[split + 1..]),
            content_type: header.content_type.and_then(|value| HeaderValue::from_str(&value).ok()),
            decision: header.decision.map(|decision| RouteDecision {
                router: decision.router,
                threshold: decision.threshold,
                win_rate: decision.win_rate,
                tier: decision.tier.into(),
                model: decision.model,
                fallback: false,
                upstream_fallback: false,
                pinned: false,
            }),
            model: header.model,
            answered_by: header.answered_by.into(),
            deployment: header.deployment,
            price: header.price.map(|[input, output]| Price { input, output }),
            usage: header.usage.map(|[prompt_tokens, completion_tokens]| Usage {
                prompt_tokens,
                completion_tokens,
            }),
        };
        Some((answer, header.stored_at_ms))
    }
}

/// What [`ResponseCache::join_flight`] made of a request.
pub enum Joined {
    /// The first: it asks the model, and its answer is awaited until this is dropped.
    Lead(Flight),
    /// An identical request is being answered: wait for it, then look again.
    Wait(Waiting),
}

/// The leading request's hold on its key. Dropping it — once the answer is in the cache, or
/// the request failed or was abandoned — wakes every request waiting on it.
pub struct Flight {
    cache: Arc<ResponseCache>,
    key: CacheKey,
    /// Closed on drop, which is what the waiting requests' receivers see; a streaming
    /// leader sends its tape on it first.
    done: watch::Sender<Option<Arc<Tape>>>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        // Only this flight registered the key (a key is registered only while absent), so
        // what is removed is its own entry.
        self.cache
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// A request waiting for an identical one's answer.
pub struct Waiting(watch::Receiver<Option<Arc<Tape>>>);

impl Waiting {
    /// Returns once the leading request is done, however it ended (`None`: look in the
    /// cache), or, for a stream, once its answer has begun: the tape to read it from.
    pub async fn done(mut self) -> Option<Arc<Tape>> {
        // `changed` returns when the leader publishes its tape, or when the sender is
        // dropped, including when either happened before this was called.
        loop {
            if let Some(tape) = self.0.borrow_and_update().clone() {
                return Some(tape);
            }
            if self.0.changed().await.is_err() {
                return self.0.borrow().clone();
            }
        }
    }
}

/// How a shared stream ended, for the requests reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TapeEnd {
    /// The leader's stream ended (well, or with the error event it already carries).
    Complete,
    /// Nobody was reading on when the leader's client left: closed to new readers.
    Abandoned,
    /// Longer than an entry may be: readers get an error event where it stopped.
    Overflowed,
}

#[derive(Default)]
struct TapeState {
    chunks: Vec<Bytes>,
    bytes: usize,
    end: Option<TapeEnd>,
    readers: usize,
}

/// A streamed answer shared while it is being written: the leading request's stream
/// appends to it, identical streaming requests read it from the start and then live.
/// Bounded by the cache's entry size.
pub struct Tape {
    api: Api,
    /// What the answer says about itself (its body stays empty here).
    answer: CachedAnswer,
    max_bytes: usize,
    state: Mutex<TapeState>,
    /// Bumped on every append and at the end, so readers wake.
    grew: watch::Sender<u64>,
}

impl Tape {
    fn new(api: Api, answer: CachedAnswer, max_bytes: usize) -> Self {
        Self {
            api,
            answer,
            max_bytes,
            state: Mutex::new(TapeState::default()),
            grew: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, TapeState> {
        // Appends and ends are single steps: a panic elsewhere leaves a consistent tape.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn append(&self, chunk: &Bytes) {
        let mut state = self.lock();
        if state.end.is_some() {
            return;
        }
        if state.bytes + chunk.len() > self.max_bytes {
            state.end = Some(TapeEnd::Overflowed);
        } else {
            state.bytes += chunk.len();
            state.chunks.push(chunk.clone());
        }
        drop(state);
        self.grew.send_modify(|count| *count += 1);
    }

    fn end(&self, how: TapeEnd) {
        self.lock().end.get_or_insert(how);
        self.grew.send_modify(|count| *count += 1);
    }

    /// Ends the tape as abandoned unless someone is reading it; whether someone is.
    fn abandon_unless_read(&self) -> bool {
        let mut state = self.lock();
        if state.readers > 0 {
            return true;
        }
        state.end.get_or_insert(TapeEnd::Abandoned);
        drop(state);
        self.grew.send_modify(|count| *count += 1);
        false
    }

    fn readers(&self) -> usize {
        self.lock().readers
    }

    /// The whole stream as written, unless it outgrew the bound.
    fn recording(&self) -> Option<Vec<u8>> {
        let state = self.lock();
        (state.end != Some(TapeEnd::Overflowed)).then(|| state.chunks.concat())
    }

    /// What the answer says about itself (decision, model, content type).
    #[must_use]
    pub fn answer(&self) -> &CachedAnswer {
        &self.answer
    }

    /// The stream from its first byte, then live to its end; `None` if the leader's client
    /// left with nobody reading (the request then asks the model itself).
    #[must_use]
    pub fn read(self: &Arc<Self>) -> Option<ByteStream> {
        {
            let mut state = self.lock();
            if state.end == Some(TapeEnd::Abandoned) {
                return None;
            }
            state.readers += 1;
        }
        let reader = TapeReader {
            tape: Arc::clone(self),
            next: 0,
            grew: self.grew.subscribe(),
            finished: false,
        };
        Some(Box::pin(futures_util::stream::unfold(
            reader,
            |mut reader| async move {
                let chunk = reader.next_chunk().await?;
                Some((Ok(chunk), reader))
            },
        )))
    }
}

/// One request reading a [`Tape`]; counted among its readers while it exists.
struct TapeReader {
    tape: Arc<Tape>,
    next: usize,
    grew: watch::Receiver<u64>,
    finished: bool,
}

impl TapeReader {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if self.finished {
                return None;
            }
            {
                let state = self.tape.lock();
                if let Some(chunk) = state.chunks.get(self.next) {
                    self.next += 1;
                    return Some(chunk.clone());
                }
                match state.end {
                    Some(TapeEnd::Complete) => return None,
                    Some(TapeEnd::Abandoned | TapeEnd::Overflowed) => {
                        self.finished = true;
                        let error = Error::Internal(
                            "the answer shared with an identical request in flight could not be passed on whole".into(),
                        );
                        return Some(crate::upstream::sse_error_event(self.tape.api, &error));
                    }
                    None => {}
                }
            }
            // Marked seen under the lock above's view: a change after it wakes this.
            self.grew.borrow_and_update();
            let fresh = {
                let state = self.tape.lock();
                self.next < state.chunks.len() || state.end.is_some()
            };
            if !fresh && self.grew.changed().await.is_err() {
                return None;
            }
        }
    }
}

impl Drop for TapeReader {
    fn drop(&mut self) {
        self.tape.lock().readers -= 1;
    }
}

/// A streamed answer on its way to the client, recorded for the cache (and, with a tape,
/// for identical streams reading along).
struct Recording {
    body: ByteStream,
    /// `None` once it outgrew an entry's bound, and when `tape` records it.
    recorded: Option<Vec<u8>>,
    /// Where the recording goes when the stream ends well; taken then.
    pending: Option<(Arc<ResponseCache>, CacheKey, CachedAnswer)>,
    tape: Option<Arc<Tape>>,
    /// The leading request's hold on its key, until the stream ends.
    flight: Option<Flight>,
}

impl Drop for Recording {
    fn drop(&mut self) {
        let Some(tape) = self.tape.take() else {
            return;
        };
        let ended = tape.lock().end.is_some();
        if ended || !tape.abandon_unless_read() {
            return;
        }
        // The leader's client left, but identical requests are reading along: read the
        // model's stream on to the end for them (and for the cache), unless they all leave.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tape.end(TapeEnd::Abandoned);
            return;
        };
        let mut rest = Recording {
            body: std::mem::replace(&mut self.body, Box::pin(futures_util::stream::empty())),
            recorded: self.recorded.take(),
            pending: self.pending.take(),
            tape: Some(Arc::clone(&tape)),
            flight: self.flight.take(),
        };
        runtime.spawn(async move {
            while futures_util::StreamExt::next(&mut rest).await.is_some() {
                if tape.readers() == 0 {
                    break;
                }
            }
        });
    }
}

impl Recording {
    fn finish(&mut self) {
        let recorded = match self.tape.take() {
            Some(tape) => {
                tape.end(TapeEnd::Complete);
                tape.recording()
            }
            None => self.recorded.take(),
        };
        // Held to the end of this function: later identical requests find the answer in
        // the cache, or (when it is not kept) ask the model.
        let _flight = self.flight.take();
        let (Some(recorded), Some((cache, key, mut answer))) = (recorded, self.pending.take()) else {
            return;
        };
        if !ended_with_done(&recorded) {
            return;
        }
        let mut usage = SseUsageScanner::default();
        answer.usage = usage.feed(&recorded);
        answer.body = Bytes::from(recorded);
        cache.insert(key, answer);
    }
}

impl Stream for Recording {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.body.as_mut().poll_next(context);
        match &polled {
            Poll::Ready(Some(Ok(chunk))) => {
                if let Some(tape) = &self.tape {
                    tape.append(chunk);
                }
                let limit = self.pending.as_ref().map_or(0, |(cache, _, _)| cache.max_entry_bytes);
                if let Some(recorded) = self.recorded.as_mut() {
                    if recorded.len() + chunk.len() > limit {
                        self.recorded = None;
                    } else {
                        recorded.extend_from_slice(chunk);
                    }
                }
            }
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Err(never))) => match *never {},
            Poll::Pending => {}
        }
        polled
    }
}

/// Whether a Chat Completions or Completions stream's last event is `data: [DONE]`.
fn ended_with_done(stream: &[u8]) -> bool {
    stream
        .trim_ascii_end()
        .rsplit(|&byte| byte == b'\n')
        .next()
        .and_then(crate::sse::data_of_line)
        .is_some_and(|data| data.trim_ascii() == b"[DONE]")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(max_mb: u64, ttl_secs: u64) -> ResponseCache {
        ResponseCache::new(&CacheConfig {
            ttl_secs,
            max_mb,
            scope: CacheScope::Key,
            coalesce: true,
            redis: false,
        })
    }

    fn answer(body: &str) -> CachedAnswer {
        CachedAnswer {
            body: Bytes::copy_from_slice(body.as_bytes()),
            content_type: None,
            decision: None,
            model: "m".into(),
            answered_by: Tier::Weak,
            deployment: 0,
            price: None,
            usage: None,
        }
    }

    fn key_of(cache: &ResponseCache, caller: Option<&str>, target: &ModelTarget<'_>, body: &str) -> CacheKey {
        let request = ModelRequest::parse(Api::ChatCompletions, body.as_bytes()).unwrap();
        cache.key(caller, target, &request)
    }

    const ROUTED: ModelTarget<'static> = ModelTarget::Routed {
        router: "mf",
        threshold: Some(0.5),
    };

    #[test]
    fn the_key_is_the_request_whatever_its_field_order_and_model_spelling() {
        let cache = cache(1, 60);
        let body = r#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"temperature":0}"#;
        let reordered = r#"{"temperature":0,"messages":[{"role":"user","content":"hi"}],"model":"router-mf-0.5"}"#;
        let key = key_of(&cache, None, &ROUTED, body);
        // An alias and the name it stands for ask the same thing once resolved.
        assert_eq!(key, key_of(&cache, None, &ROUTED, reordered));
        let differs = [
            key_of(&cache, None, &ROUTED, &body.replace("\"hi\"", "\"hello\"")),
            key_of(&cache, None, &ROUTED, &body.replace(":0}", ":1}")),
            key_of(&cache, Some("team-a"), &ROUTED, body),
            key_of(
                &cache,
                None,
                &ModelTarget::Routed {
                    router: "mf",
                    threshold: Some(0.6),
                },
                body,
            ),
            key_of(&cache, None, &ModelTarget::Direct("gpt-4o"), body),
        ];
        for other in differs {
            assert_ne!(key, other);
        }
        // The same fields sent to another API are another request.
        let fields = r#"{"model":"auto","prompt":"hi","messages":[{"role":"user","content":"hi"}]}"#;
        let as_chat = ModelRequest::parse(Api::ChatCompletions, fields.as_bytes()).unwrap();
        let as_completion = ModelRequest::parse(Api::Completions, fields.as_bytes()).unwrap();
        assert_ne!(
            cache.key(None, &ROUTED, &as_chat),
            cache.key(None, &ROUTED, &as_completion)
        );
    }

    #[test]
    fn a_shared_cache_answers_every_caller_alike() {
        let shared = ResponseCache::new(&CacheConfig {
            ttl_secs: 60,
            max_mb: 1,
            scope: CacheScope::Shared,
            coalesce: true,
            redis: false,
        });
        let body = r#"{"model":"a","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(
            key_of(&shared, Some("team-a"), &ROUTED, body),
            key_of(&shared, Some("team-b"), &ROUTED, body)
        );
    }

    #[test]
    fn answers_expire_and_the_least_recently_used_go_first() {
        let cache = cache(1, 60);
        let body = |n: usize| format!(r#"{{"model":"a","messages":[{{"role":"user","content":"{n}"}}]}}"#);
        // An eighth of a MiB each less a little: eight fit, the ninth evicts one.
        let big = "x".repeat((1 << 17) - ENTRY_OVERHEAD_BYTES - 1);
        let keys: Vec<CacheKey> = (0..9).map(|n| key_of(&cache, None, &ROUTED, &body(n))).collect();
        for key in &keys[..8] {
            cache.insert(*key, answer(&big));
        }
        assert_eq!(cache.stats().entries, 8);
        // Using the oldest makes the second the least recently used.
        assert!(cache.get(&keys[0]).is_some());
        cache.insert(keys[8], answer(&big));
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.evictions, stats.hits), (8, 1, 1));
        assert!(stats.bytes <= stats.capacity_bytes);
        assert!(cache.get(&keys[1]).is_none());
        assert!(cache.get(&keys[0]).is_some() && cache.get(&keys[8]).is_some());
        // Larger than an eighth of the bound: not kept at all.
        cache.insert(keys[1], answer(&"x".repeat(1 << 17)));
        assert!(cache.get(&keys[1]).is_none());

        let brief = ResponseCache::new(&CacheConfig {
            ttl_secs: 1,
            max_mb: 1,
            scope: CacheScope::Key,
            coalesce: true,
            redis: false,
        });
        brief.insert(keys[0], answer("{}"));
        assert!(brief.get(&keys[0]).is_some());
        {
            // Stored a second ago: expired, and taken out on the lookup.
            let mut entries = brief.lock();
            let slot = entries.slots.get_mut(&keys[0]).unwrap();
            slot.stored_at -= Duration::from_secs(1);
        }
        assert!(brief.get(&keys[0]).is_none());
        assert_eq!(brief.stats().entries, 0);
        assert_eq!(brief.stats().bytes, 0);
    }

    #[test]
    fn a_hit_counts_the_tokens_and_cost_it_saved() {
        let cache = cache(1, 60);
        let key = key_of(
            &cache,
            None,
            &ROUTED,
            r#"{"model":"a","messages":[{"role":"user","content":"q"}]}"#,
        );
        let mut priced = answer("{}");
        priced.usage = Some(Usage {
            prompt_tokens: 1000,
            completion_tokens: 2000,
        });
        priced.price = Some(Price {
            input: 10.0,
            output: 30.0,
        });
        cache.insert(key, priced);
        cache.get(&key);
        cache.get(&key);
        let stats = cache.stats();
        assert_eq!(
            (stats.hits, stats.saved_prompt_tokens, stats.saved_completion_tokens),
            (2, 2000, 4000)
        );
        assert!((stats.saved_cost - 0.14).abs() < 1e-12, "{}", stats.saved_cost);
    }

    #[test]
    fn cache_control_asks_for_a_fresh_answer_or_no_cache() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_str(value).unwrap());
            Directive::of(&headers)
        };
        assert_eq!(Directive::of(&HeaderMap::new()), Directive::Use);
        assert_eq!(with("No-Cache"), Directive::Refresh);
        assert_eq!(with("max-age=0"), Directive::Refresh);
        assert_eq!(with("no-cache, no-store"), Directive::Bypass);
        assert_eq!(with("max-age=60"), Directive::Use);
    }

    #[tokio::test]
    async fn the_first_of_identical_requests_leads_and_the_others_wait_until_it_is_done() {
        let cache = Arc::new(cache(1, 60));
        let key = key_of(
            &cache,
            None,
            &ROUTED,
            r#"{"model":"a","messages":[{"role":"user","content":"hi"}]}"#,
        );
        let Some(Joined::Lead(flight)) = cache.join_flight(key) else {
            panic!("the first request leads");
        };
        let Some(Joined::Wait(waiting)) = cache.join_flight(key) else {
            panic!("an identical request waits");
        };
        cache.insert(key, answer("{}"));
        drop(flight);
        // The leader finished before this one began to wait: it returns at once, with no
        // tape (it was not a stream), so the answer is in the cache.
        let tape = tokio::time::timeout(Duration::from_secs(5), waiting.done())
            .await
            .unwrap();
        assert!(tape.is_none());
        assert!(cache.get_coalesced(&key).is_some());
        assert_eq!(cache.stats().coalesced, 1);
        // The key is free again, and with coalescing off nothing leads or waits.
        assert!(matches!(cache.join_flight(key), Some(Joined::Lead(_))));
        let off = Arc::new(ResponseCache::new(&CacheConfig {
            ttl_secs: 60,
            max_mb: 1,
            scope: CacheScope::Key,
            coalesce: false,
            redis: false,
        }));
        assert!(off.join_flight(key).is_none());
    }

    /// A stream's chunks as the leader's client would get them, from a channel the test feeds.
    fn fed_stream() -> (tokio::sync::mpsc::UnboundedSender<&'static str>, ByteStream) {
        let (feed, chunks) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
        let body = futures_util::stream::unfold(chunks, |mut chunks| async move {
            let chunk = chunks.recv().await?;
            Some((Ok(Bytes::from_static(chunk.as_bytes())), chunks))
        });
        (feed, Box::pin(body))
    }

    const STREAMED: &str = r#"{"model":"a","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

    /// A streaming request leading on `key`, its model's stream fed by the test, and an
    /// identical request waiting on it.
    fn leader_and_follower(
        cache: &Arc<ResponseCache>,
        key: CacheKey,
    ) -> (tokio::sync::mpsc::UnboundedSender<&'static str>, ByteStream, Waiting) {
        let Some(Joined::Lead(flight)) = cache.join_flight(key) else {
            panic!("the first stream leads");
        };
        let Some(Joined::Wait(waiting)) = cache.join_flight(key) else {
            panic!("an identical stream waits");
        };
        let (feed, body) = fed_stream();
        let leader = cache.record_stream(key, answer(""), body, Api::ChatCompletions, Some(flight));
        (feed, leader, waiting)
    }

    /// Reads `stream` until it has given `bytes` bytes, within a few seconds.
    async fn read_bytes(stream: &mut ByteStream, bytes: usize) -> Vec<u8> {
        use futures_util::StreamExt;
        let mut read = Vec::new();
        while read.len() < bytes {
            let next = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
            match next.expect("the next chunk in time") {
                Some(Ok(chunk)) => read.extend_from_slice(&chunk),
                None => break,
            }
        }
        read
    }

    #[tokio::test]
    async fn identical_streams_read_the_first_ones_answer_live_even_after_its_client_leaves() {
        let cache = Arc::new(cache(1, 60));
        let key = key_of(&cache, None, &ROUTED, STREAMED);
        let (feed, mut leader, early) = leader_and_follower(&cache, key);
        let tape = early.done().await.expect("a stream publishes its tape when it begins");
        let mut first = tape.read().unwrap();
        let event = "data: {\"n\":1}\n\n";
        feed.send(event).unwrap();
        assert_eq!(read_bytes(&mut leader, event.len()).await, event.as_bytes());
        // Live: the reader has the first event before the second exists.
        assert_eq!(read_bytes(&mut first, event.len()).await, event.as_bytes());
        // One that arrives later still reads from the start.
        let Some(Joined::Wait(late)) = cache.join_flight(key) else {
            panic!("the stream is still in flight");
        };
        let mut second = late.done().await.unwrap().read().unwrap();
        // The leader's client leaves; the model's stream is read on for the others.
        drop(leader);
        feed.send("data: [DONE]\n\n").unwrap();
        drop(feed);
        let whole = format!("{event}data: [DONE]\n\n").into_bytes();
        assert_eq!(read_bytes(&mut first, usize::MAX).await, &whole[event.len()..]);
        assert_eq!(read_bytes(&mut second, usize::MAX).await, whole);
        // ... and kept: the next identical request is an ordinary hit, and leads nothing.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(cache.get(&key).unwrap().0.body, whole);
        assert!(matches!(cache.join_flight(key), Some(Joined::Lead(_))));
    }

    #[tokio::test]
    async fn a_stream_nobody_reads_stops_with_its_client_and_an_overlong_one_ends_in_an_error_event() {
        let cache = Arc::new(ResponseCache::new(&CacheConfig {
            ttl_secs: 60,
            max_mb: 1,
            scope: CacheScope::Key,
            coalesce: true,
            redis: false,
        }));
        let key = key_of(&cache, None, &ROUTED, STREAMED);
        let (feed, leader, waiting) = leader_and_follower(&cache, key);
        let tape = waiting.done().await.unwrap();
        drop(leader);
        // Nobody was reading: the tape is closed, and a request that finds it asks the model.
        assert!(tape.read().is_none());
        assert!(feed.send("data: {}\n\n").is_err(), "the model's stream was dropped");
        assert!(matches!(cache.join_flight(key), Some(Joined::Lead(_))));

        // Longer than an entry may be (an eighth of 1 MiB): readers get an error event.
        let (feed, mut leader, waiting) = leader_and_follower(&cache, key);
        let mut reader = waiting.done().await.unwrap().read().unwrap();
        let big: &'static str = Box::leak("x".repeat(100 * 1024).into_boxed_str());
        for _ in 0..2 {
            feed.send(big).unwrap();
        }
        feed.send("data: [DONE]\n\n").unwrap();
        drop(feed);
        let passed = read_bytes(&mut leader, usize::MAX).await;
        assert_eq!(
            passed.len(),
            200 * 1024 + 14,
            "the leader's client gets its whole stream"
        );
        let read = String::from_utf8(read_bytes(&mut reader, usize::MAX).await).unwrap();
        assert!(read.starts_with(big), "the part that fit");
        assert!(
            read.ends_with("}\n\n") && read.contains("\"error\""),
            "then an error event"
        );
        assert!(cache.get(&key).is_none(), "too long to keep, though it ended well");
    }

    #[tokio::test]
    async fn a_stream_is_kept_only_once_it_has_ended_with_done() {
        use futures_util::StreamExt;
        let cache = Arc::new(cache(1, 60));
        let stream_of = |parts: &[&'static str]| -> ByteStream {
            let chunks: Vec<Result<Bytes, std::convert::Infallible>> = parts
                .iter()
                .map(|part| Ok(Bytes::from_static(part.as_bytes())))
                .collect();
            Box::pin(futures_util::stream::iter(chunks))
        };
        let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n";
        let whole = ["data: {\"choices\":[]}\n\n", usage, "data: [DONE]\n\n"];
        let broken = ["data: {\"choices\":[]}\n\n", "event: error\ndata: {\"error\":{}}\n\n"];
        let keys: Vec<CacheKey> = (0..2)
            .map(|n| {
                key_of(
                    &cache,
                    None,
                    &ROUTED,
                    &format!(r#"{{"model":"a","n":{n},"messages":[{{"role":"user","content":"q"}}]}}"#),
                )
            })
            .collect();
        for (key, parts) in keys.iter().zip([&whole[..], &broken[..]]) {
            let passed: Vec<Bytes> = cache
                .record_stream(*key, answer(""), stream_of(parts), Api::ChatCompletions, None)
                .map(|chunk| chunk.unwrap())
                .collect()
                .await;
            // The client gets the stream as it was, whether or not it is kept.
            assert_eq!(passed.concat(), parts.concat().as_bytes());
        }
        let (kept, _) = cache.get(&keys[0]).unwrap();
        assert_eq!(kept.body, whole.concat().as_bytes());
        assert_eq!(
            kept.usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 4
            })
        );
        assert!(cache.get(&keys[1]).is_none());
        // A stream dropped before its end (the client went away) is not kept either.
        let key = key_of(
            &cache,
            None,
            &ROUTED,
            r#"{"model":"a","n":9,"messages":[{"role":"user","content":"q"}]}"#,
        );
        let mut partial = cache.record_stream(key, answer(""), stream_of(&whole), Api::ChatCompletions, None);
        partial.next().await;
        drop(partial);
        assert!(cache.get(&key).is_none());
    }

    #[test]
    fn an_answer_kept_in_redis_reads_back_as_it_was_kept() {
        let mut kept = answer("line one\nline two\u{0}\u{fffd}");
        kept.content_type = Some(HeaderValue::from_static("text/event-stream"));
        kept.decision = Some(RouteDecision {
            router: "mf".into(),
            threshold: 0.116,
            win_rate: 0.421_875,
            tier: Tier::Strong,
            model: "openai/gpt-4o".into(),
            fallback: false,
            upstream_fallback: false,
            pinned: false,
        });
        (kept.answered_by, kept.deployment) = (Tier::Strong, 1);
        kept.price = Some(Price {
            input: 2.5,
            output: 10.0,
        });
        kept.usage = Some(Usage {
            prompt_tokens: 12,
            completion_tokens: 34,
        });
        let encoded = RemoteEntry::encode(&kept, 1_765_000_000_123);
        let (read, stored_at_ms) = RemoteEntry::decode(&encoded).unwrap();
        assert_eq!(stored_at_ms, 1_765_000_000_123);
        assert_eq!(read.body, kept.body);
        assert_eq!(read.content_type, kept.content_type);
        assert_eq!(read.decision, kept.decision);
        assert_eq!(
            (read.model, read.answered_by, read.deployment),
            (kept.model.clone(), kept.answered_by, kept.deployment)
        );
        assert_eq!(read.price, kept.price);
        assert_eq!(read.usage, kept.usage);
        // Another layout's entry, or no entry at all, is a miss.
        let newer = String::from_utf8_lossy(&encoded).replacen("\"version\":1", "\"version\":2", 1);
        assert!(RemoteEntry::decode(newer.as_bytes()).is_none());
        assert!(RemoteEntry::decode(b"not an entry").is_none());
        assert!(RemoteEntry::decode(b"{}\nbody").is_none());
    }
}
