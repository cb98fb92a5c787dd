//! The routing core shared by the HTTP server and the library [`Controller`](crate::Controller):
//! parse the request, score the prompt, pick a model, rewrite `model`, forward.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName};

use crate::affinity::ResponseAffinity;
use crate::api_keys::ApiKey;
use crate::cache::{CacheKey, CacheOutcome, CachedAnswer, Directive, Flight, Joined, ResponseCache};
use crate::config::{Config, MAX_SCORED_TURNS, OnRouterError, OnUpstreamError, ScoreTurns};
use crate::config::{PassthroughConfig, PassthroughTo};
use crate::deployments::{DeploymentId, Pool};
use crate::error::Error;
use crate::metrics::RouterStats;
use crate::model_name::{self, ModelTarget};
use crate::prompt_log::PromptLog;
use crate::providers;
use crate::request::{Api, ModelRequest};
use crate::routers::{self, Router, ScoringCost};
use crate::shared_state::SharedState;
use crate::strong_share::{MIN_TRACKED_SCORES, ScoreWindow};
use crate::upstream::{EchoInput, Reply, Upstream, UpstreamRequest};

/// Which of the two models a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Strong,
    Weak,
}

impl Tier {
    #[must_use]
    pub fn other(self) -> Tier {
        match self {
            Tier::Strong => Tier::Weak,
            Tier::Weak => Tier::Strong,
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Strong => "strong",
            Tier::Weak => "weak",
        }
    }
}

/// The outcome of scoring one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteDecision {
    pub router: String,
    pub threshold: f64,
    /// The router's score; NaN when it could not score (`fallback`).
    pub win_rate: f64,
    pub tier: Tier,
    /// The configured name of the model that answered (or was chosen, for [`Gateway::route`]).
    pub model: String,
    /// The router failed to score the prompt and `on_router_error` chose the tier (only
    /// when serving chat completions; [`Gateway::route`] returns the error instead).
    pub fallback: bool,
    /// The model the router chose was unavailable and, with `on_upstream_error:
    /// other_model`, the other one answered: `tier` and `model` name the one that did.
    pub upstream_fallback: bool,
    /// A Responses request continuing an answer (`previous_response_id`) that one model's
    /// provider stored went to that model, whatever the score (see [`crate::affinity`]).
    pub pinned: bool,
}

/// A forwarded request's answer, with what the proxy decided and what that cost.
pub struct Completion {
    /// `None` when the client named a model directly.
    pub decision: Option<RouteDecision>,
    /// The configured name of the model that answered.
    pub model: String,
    /// Which of the two configured models answered (for a model named directly too).
    pub answered_by: Tier,
    /// Which of that tier's deployments answered (0 unless it lists several).
    pub deployment: usize,
    /// What the deployment that answered charges, if configured.
    pub price: Option<crate::config::Price>,
    pub reply: Reply,
    /// Time spent waiting for the upstream's headers (and, for streams, first bytes).
    pub upstream_time: Duration,
    /// What the response cache did, when it is on and the API is cached.
    pub cache: Option<CacheOutcome>,
}

impl Completion {
    /// A cached answer given again, stored `age` ago.
    fn from_cache(answer: &CachedAnswer, age: Duration) -> Self {
        let (status, headers) = (axum::http::StatusCode::OK, Self::cached_headers(answer));
        let body = answer.body.clone();
        Self::hit(answer, Reply::Complete { status, headers, body }, age)
    }

    /// An identical stream's answer, read as the model writes it (see [`crate::cache::Tape`]).
    fn from_tape(tape: &crate::cache::Tape, body: crate::upstream::ByteStream) -> Self {
        let answer = tape.answer();
        let (status, headers) = (axum::http::StatusCode::OK, Self::cached_headers(answer));
        Self::hit(answer, Reply::Stream { status, headers, body }, Duration::ZERO)
    }

    fn cached_headers(answer: &CachedAnswer) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(content_type) = &answer.content_type {
            headers.insert(axum::http::header::CONTENT_TYPE, content_type.clone());
        }
        headers
    }

    fn hit(answer: &CachedAnswer, reply: Reply, age: Duration) -> Self {
        Self {
            decision: answer.decision.clone(),
            model: answer.model.clone(),
            answered_by: answer.answered_by,
            deployment: answer.deployment,
            price: answer.price,
            reply,
            upstream_time: Duration::ZERO,
            cache: Some(CacheOutcome::Hit { age }),
        }
    }
}

/// What a running server takes from a changed config file ([`Gateway::reload`], SIGHUP):
/// who may call it and how requests are routed, with the routers it routes by (the
/// `routers` list; each rebuilt when its `router_settings` change). Models, listeners and
/// the rest are fixed at start.
pub struct Policy {
    /// Default thresholds, for `router-<name>` without one.
    thresholds: BTreeMap<String, f64>,
    /// `strong_share`: routers whose default threshold follows their live scores.
    strong_share: BTreeMap<String, f64>,
    /// `model_aliases`: each a router (and threshold) or a configured model.
    model_aliases: BTreeMap<String, String>,
    /// Client keys with their limits and usage (usage carries over reloads by key name).
    api_keys: Vec<ApiKey>,
    on_router_error: OnRouterError,
    on_upstream_error: OnUpstreamError,
    score_turns: ScoreTurns,
    /// `scoring_timeout_ms`: how long a request waits for its score.
    scoring_timeout: Option<Duration>,
    /// The served routers, in the policy so a reload that replaces one (a new artifact in
    /// `router_settings`) swaps it together with the thresholds calibrated for it.
    routers: Arc<Routers>,
    /// The `router_settings` and `routers_dir` those routers were built with.
    router_settings: crate::config::RouterSettings,
    routers_dir: std::path::PathBuf,
}

/// Routers by name.
pub type Routers = BTreeMap<String, Arc<dyn Router>>;

/// What a reload does to the served routers: those it builds (new to the `routers` list,
/// or with changed settings) and those it stops serving.
#[derive(Debug, Default)]
struct RouterChanges {
    built: Vec<String>,
    removed: Vec<String>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Policy")
            .field("thresholds", &self.thresholds)
            .field("strong_share", &self.strong_share)
            .field("model_aliases", &self.model_aliases)
            .field("api_keys", &self.api_keys.iter().map(ApiKey::name).collect::<Vec<_>>())
            .field("on_router_error", &self.on_router_error)
            .field("on_upstream_error", &self.on_upstream_error)
            .field("score_turns", &self.score_turns)
            .field("scoring_timeout", &self.scoring_timeout)
            .field("routers", &self.routers.keys().collect::<Vec<_>>())
            .field("router_settings", &self.router_settings)
            .field("routers_dir", &self.routers_dir)
            .finish()
    }
}

impl Policy {
    /// The served routers' names, for messages: `a, b, c`.
    fn router_names(&self) -> String {
        self.routers.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
    }

    fn from_config(config: &Config, routers: Arc<Routers>, shared_state: Option<&Arc<SharedState>>) -> Self {
        Self {
            routers,
            router_settings: config.router_settings.clone(),
            routers_dir: config.routers_dir.clone(),
            thresholds: config.thresholds.clone(),
            strong_share: config.strong_share.clone(),
            model_aliases: config.model_aliases.clone(),
            api_keys: crate::api_keys::build(&config.api_keys, shared_state),
            on_router_error: config.on_router_error,
            on_upstream_error: config.on_upstream_error,
            score_turns: config.score_turns,
            scoring_timeout: config.scoring_timeout,
        }
    }

    /// A router's configured default threshold, used for `router-<name>` without one
    /// (with `strong_share`, only until the router has scored enough requests: see
    /// [`Gateway::default_threshold_under`]).
    #[must_use]
    pub fn default_threshold(&self, router: &str) -> Option<f64> {
        self.thresholds.get(router).copied()
    }

    /// The share of `router`'s traffic its default threshold keeps on the strong model,
    /// when `strong_share` sets one.
    #[must_use]
    pub fn strong_share(&self, router: &str) -> Option<f64> {
        self.strong_share.get(router).copied()
    }

    /// The configured aliases, by name.
    #[must_use]
    pub fn model_aliases(&self) -> &BTreeMap<String, String> {
        &self.model_aliases
    }

    /// The client keys in force, with their usage.
    #[must_use]
    pub fn api_keys(&self) -> &[ApiKey] {
        &self.api_keys
    }

    /// Checks a request's `Authorization` header against the configured proxy keys: the
    /// key it presented, or `None` when no keys are configured.
    pub fn authorize(&self, authorization: Option<&str>) -> Result<Option<ApiKey>, Error> {
        if self.api_keys.is_empty() {
            return Ok(None);
        }
        let Some(presented) = authorization.and_then(|value| value.strip_prefix("Bearer ")) else {
            return Err(Error::Unauthorized(
                "You didn't provide an API key. Provide it in the Authorization header as `Bearer <key>`.",
            ));
        };
        let presented = presented.trim().as_bytes();
        // Compare every key in full so the time taken does not reveal how much of a key matched.
        let mut matched = None;
        for key in &self.api_keys {
            if constant_time_eq(key.spec().key.expose().as_bytes(), presented) {
                matched = Some(key);
            }
        }
        matched
            .cloned()
            .map(Some)
            .ok_or(Error::Unauthorized("Incorrect API key provided."))
    }
}

/// Everything needed to serve requests: routers, upstreams and the shared HTTP client.
pub struct Gateway {
    /// Decisions and scores per router, for `/metrics`.
    router_stats: BTreeMap<String, Arc<RouterStats>>,
    /// Each router's latest scores, for `strong_share`; kept for every router so a
    /// reload that sets a share starts from the traffic already seen.
    score_windows: BTreeMap<String, ScoreWindow>,
    /// Swapped whole by [`Gateway::reload`]; requests hold the one they started with.
    policy: RwLock<Arc<Policy>>,
    /// Reloads applied and refused, for `/metrics`.
    reloads: [AtomicU64; 2],
    /// The strong and the weak tier's deployments.
    pools: [Pool; 2],
    client: reqwest::Client,
    cors_allowed_origins: Vec<String>,
    request_timeout: Duration,
    /// A stream's budget for its head and first event (`upstream.stream_first_event_timeout_secs`).
    stream_first_event_timeout: Duration,
    /// Client request headers passed on to the models (`upstream.forward_headers`).
    forward_headers: Vec<HeaderName>,
    max_request_bytes: usize,
    client_timeout: Duration,
    shutdown_timeout: Duration,
    /// Permits for CPU-bound scoring (see [`score`]).
    scoring_slots: Arc<tokio::sync::Semaphore>,
    /// Scored prompts of a sample of routed requests, when `prompt_log` is configured.
    prompt_log: Option<PromptLog>,
    /// Other endpoints below `/v1` passed to one model unrouted.
    passthrough: PassthroughConfig,
    /// Which deployment produced recent Responses answers, when the deployments do not all
    /// share storage (different endpoints or keys).
    affinity: Option<Arc<ResponseAffinity>>,
    /// Where client keys' spend is kept across restarts (`spend_file`).
    spend_file: Option<std::path::PathBuf>,
    /// Identical requests answered again from memory (`response_cache`).
    cache: Option<Arc<ResponseCache>>,
    /// Where keys' limits and spend are shared with other replicas (`shared_state`).
    shared_state: Option<Arc<SharedState>>,
    /// What the server started with: a reload says which of its restart-only settings moved.
    started_with: Box<Config>,
    /// Whether a reload may rebuild routers from `router_settings` (they were built from
    /// the config, not handed in by the caller).
    rebuilds_routers: bool,
    started_at: u64,
}

impl Gateway {
    /// Loads every configured router and resolves both models; fails rather than serving half a setup.
    pub fn from_config(config: &Config) -> Result<Self, Error> {
        let mut routers = BTreeMap::new();
        for name in &config.routers {
            routers.insert(name.clone(), build_router(name, config)?);
        }
        let mut gateway = Self::with_routers(config, routers)?;
        gateway.rebuilds_routers = true;
        Ok(gateway)
    }

    /// Like [`Gateway::from_config`] with routers built by the caller (tests, custom routers).
    pub fn with_routers(config: &Config, routers: BTreeMap<String, Arc<dyn Router>>) -> Result<Self, Error> {
        let env = |name: &str| std::env::var(name).ok();
        let resolve = |deployments: &crate::config::Deployments| {
            deployments
                .iter()
                .map(|model| providers::resolve(model, &config.global, &config.providers, &env))
                .collect::<Result<Vec<_>, Error>>()
        };
        let strong = resolve(&config.strong_model)?;
        let weak = resolve(&config.weak_model)?;
        crate::upstream::install_crypto_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .user_agent(concat!("routellm/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| Error::Config(format!("HTTP client: {error}")))?;
        let all: Vec<&providers::ResolvedModel> = strong.iter().chain(&weak).collect();
        // Sharing storage is having the same endpoint, key and headers: an equivalence.
        let one_storage = all.windows(2).all(|pair| pair[0].shares_storage_with(pair[1]));
        let affinity = (!one_storage).then(|| Arc::new(ResponseAffinity::new(crate::affinity::CAPACITY)));
        let pool = |models: Vec<providers::ResolvedModel>| {
            let upstreams = models
                .into_iter()
                .map(Upstream::new)
                .collect::<Result<Vec<_>, Error>>()?;
            Pool::new(upstreams, config.load_balancing)
        };
        // Every router a reload could add has its counters and window from the start, so
        // requests never wait on a lock to find them.
        let known: std::collections::BTreeSet<&str> = routers
            .keys()
            .map(String::as_str)
            .chain(routers::AVAILABLE.iter().copied())
            .collect();
        let shared_state = config
            .shared_state
            .as_ref()
            .map(SharedState::new)
            .transpose()?
            .map(Arc::new);
        let gateway = Self {
            router_stats: known
                .iter()
                .map(|name| ((*name).to_owned(), Arc::new(RouterStats::default())))
                .collect(),
            score_windows: known
                .iter()
                .map(|name| ((*name).to_owned(), ScoreWindow::new(config.strong_share_window)))
                .collect(),
            policy: RwLock::new(Arc::new(Policy::from_config(
                config,
                Arc::new(routers),
                shared_state.as_ref(),
            ))),
            rebuilds_routers: false,
            reloads: [AtomicU64::new(0), AtomicU64::new(0)],
            pools: [pool(strong)?, pool(weak)?],
            client,
            cors_allowed_origins: config.cors_allowed_origins.clone(),
            request_timeout: config.request_timeout,
            stream_first_event_timeout: config.stream_first_event_timeout.unwrap_or(config.request_timeout),
            forward_headers: config.forward_headers.clone(),
            max_request_bytes: config.max_request_bytes,
            client_timeout: config.client_timeout,
            shutdown_timeout: config.shutdown_timeout,
            scoring_slots: Arc::new(tokio::sync::Semaphore::new(config.scoring_concurrency)),
            prompt_log: config.prompt_log.as_ref().map(PromptLog::open).transpose()?,
            passthrough: config.passthrough.clone(),
            affinity,
            spend_file: config.spend_file.clone(),
            cache: config.response_cache.as_ref().map(|cache| {
                let local = ResponseCache::new(cache);
                Arc::new(match shared_state.as_ref().filter(|_| cache.redis) {
                    Some(shared) => local.sharing(Arc::clone(shared)),
                    None => local,
                })
            }),
            shared_state,
            started_with: Box::new(config.clone()),
            started_at: crate::unix_now(),
        };
        gateway.check(&gateway.policy())?;
        if let Some(path) = &gateway.spend_file {
            crate::api_keys::restore_spend(gateway.policy().api_keys(), &crate::budgets::load(path)?);
        }
        if !gateway.passthrough.paths.is_empty() && gateway.passthrough_upstream().is_echo() {
            return Err(Error::Config(format!(
                "passthrough: `{}` is the built-in echo model, which serves no other endpoints",
                gateway.passthrough_upstream().model.name
            )));
        }
        Ok(gateway)
    }

    /// Where keys' limits and spend are shared with other replicas, if they are.
    #[must_use]
    pub fn shared_state(&self) -> Option<&SharedState> {
        self.shared_state.as_deref()
    }

    /// Sends the charges Redis has not taken yet (it was unavailable when they were made),
    /// at a graceful stop; logs what could still not be sent.
    pub async fn send_shared_charges(&self) {
        let policy = self.policy();
        for key in policy.api_keys() {
            if let Some((tokens, cost)) = key.send_charges().await {
                tracing::warn!(
                    key = %key.name(),
                    tokens,
                    cost,
                    "charges this replica made while the shared state was unavailable were not sent to it"
                );
            }
        }
    }

    /// What passthrough calls' tokens cost (`passthrough.price_per_million_tokens`).
    #[must_use]
    pub fn passthrough_price(&self) -> Option<crate::config::Price> {
        self.passthrough.price_per_million_tokens
    }

    /// The model that serves `passthrough` paths: its tier's first deployment, where files
    /// and the like that clients upload are kept.
    fn passthrough_upstream(&self) -> &Upstream {
        match self.passthrough.to {
            PassthroughTo::Strong => self.upstream(Tier::Strong),
            PassthroughTo::Weak => self.upstream(Tier::Weak),
        }
    }

    /// Whether a request to `path` below `/v1` (no query) is passed through to a model.
    #[must_use]
    pub fn passes_through(&self, path: &str) -> bool {
        self.passthrough.allows(path)
    }

    /// Sends a request for an allowed `passthrough` path (see [`Gateway::passes_through`]),
    /// unrouted and unchanged, to the configured model with its credentials; returns that
    /// model's name and answer.
    pub async fn pass_through(
        &self,
        method: axum::http::Method,
        path_and_query: &str,
        client_headers: &HeaderMap,
        body: bytes::Bytes,
    ) -> Result<(&str, crate::upstream::PassedAnswer), Error> {
        let upstream = self.passthrough_upstream();
        // What the body is and what the client accepts, with the configured forward_headers.
        let mut sent = self.forwarded(client_headers);
        for name in [axum::http::header::CONTENT_TYPE, axum::http::header::ACCEPT] {
            if let Some(value) = client_headers.get(&name) {
                sent.insert(name, value.clone());
            }
        }
        let answer = upstream
            .send_unrouted(&self.client, method, path_and_query, &sent, body, self.request_timeout)
            .await?;
        Ok((&upstream.model.name, answer))
    }

    /// The routing policy in force; a request keeps the one it started with.
    #[must_use]
    pub fn policy(&self) -> Arc<Policy> {
        // Only a whole `Arc` is ever written, so a poisoned lock still holds a valid one.
        Arc::clone(&self.policy.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Takes the policy settings of `config` (thresholds, `strong_share`, aliases, API keys, the
    /// `on_*_error` choices, `score_turns`, `scoring_timeout_ms`) and its `routers` (loading new
    /// ones, rebuilding changed ones) for requests from now on, once they check out against
    /// the routers and models this server runs; on error the running policy stays.
    /// Returns the settings of `config` that differ and need a restart to take effect.
    pub fn reload(&self, config: &Config) -> Result<Vec<&'static str>, Error> {
        let refused = |error| {
            self.reloads[1].fetch_add(1, Ordering::Relaxed);
            Err(error)
        };
        // One snapshot of what runs, for the routers and the keys alike.
        let previous = self.policy();
        let (routers, RouterChanges { built, removed }) = match self.routers_under(&previous, config) {
            Ok(found) => found,
            Err(error) => return refused(error),
        };
        let mut policy = Policy::from_config(config, routers, self.shared_state.as_ref());
        if let Err(error) = self.check(&policy) {
            return refused(error);
        }
        // A key kept by name keeps what it has used, so a reload is no way around a limit;
        // one that comes back after a reload without it finds its spend in the spend file.
        crate::api_keys::carry_over(&mut policy.api_keys, &previous.api_keys);
        let returning: Vec<&ApiKey> = policy
            .api_keys
            .iter()
            .filter(|key| key.spec().budget.is_some() && !previous.api_keys.iter().any(|p| p.name() == key.name()))
            .collect();
        if let (Some(path), false) = (&self.spend_file, returning.is_empty()) {
            // An unreadable file must not refuse the new policy: those keys start from zero.
            let spent = crate::budgets::load(path).unwrap_or_else(|error| {
                tracing::warn!(error = %error, "spend_file unreadable; keys back in the config start from zero");
                BTreeMap::new()
            });
            crate::api_keys::restore_spend(returning, &spent);
        }
        self.reloads[0].fetch_add(1, Ordering::Relaxed);
        *self.policy.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
        for name in &built {
            // `strong_share` learns a new router's scores afresh (a replaced one's are on
            // another scale), and its scoring budget its own time.
            if let Some(window) = self.score_windows.get(name) {
                window.clear();
            }
            if let Some(stats) = self.router_stats.get(name) {
                stats.forget_scoring_time();
            }
        }
        if !built.is_empty() || !removed.is_empty() {
            tracing::info!(built = ?built, removed = ?removed, "routers changed by the reload");
        }
        let mut changes = config.restart_changes(&self.started_with);
        if self.rebuilds_routers {
            changes.retain(|setting| !matches!(*setting, "routers" | "router_settings" | "routers_dir"));
        }
        Ok(changes)
    }

    /// The routers a reload of `config` serves: its `routers` list, each kept from the
    /// running ones unless it is new or its settings (or the artifacts folder) changed since
    /// it was built. A router that does not build refuses the reload, so nothing is
    /// half-replaced.
    fn routers_under(&self, running: &Policy, config: &Config) -> Result<(Arc<Routers>, RouterChanges), Error> {
        if !self.rebuilds_routers {
            return Ok((Arc::clone(&running.routers), RouterChanges::default()));
        }
        let (built_with, wanted) = (&running.router_settings, &config.router_settings);
        let stale = |name: &str| {
            let settings_moved = match name {
                "mf" => built_with.mf != wanted.mf,
                "sw_ranking" => built_with.sw_ranking != wanted.sw_ranking,
                "bert" => built_with.bert != wanted.bert,
                _ => false,
            };
            settings_moved || (running.routers_dir != config.routers_dir && routers::uses_artifacts(name))
        };
        let changes = RouterChanges {
            built: (config.routers.iter())
                .filter(|name| !running.routers.contains_key(*name) || stale(name))
                .cloned()
                .collect(),
            removed: (running.routers.keys())
                .filter(|name| !config.routers.contains(name))
                .cloned()
                .collect(),
        };
        if changes.built.is_empty() && changes.removed.is_empty() {
            return Ok((Arc::clone(&running.routers), changes));
        }
        let mut next: Routers = (running.routers.iter())
            .filter(|(name, _)| config.routers.contains(name))
            .map(|(name, router)| (name.clone(), Arc::clone(router)))
            .collect();
        for name in &changes.built {
            next.insert(name.clone(), build_router(name, config)?);
        }
        Ok((Arc::new(next), changes))
    }

    /// [`Gateway::reload`] from the config file (if any) with `overrides` on top, as at
    /// start-up; a file that does not load counts as a refused reload too.
    pub fn reload_file(
        &self,
        file: Option<&std::path::Path>,
        overrides: crate::config::Overrides,
    ) -> Result<Vec<&'static str>, Error> {
        match Config::load(file, overrides) {
            Ok(config) => self.reload(&config),
            Err(error) => {
                self.reloads[1].fetch_add(1, Ordering::Relaxed);
                Err(error)
            }
        }
    }

    /// Writes what each client key with a budget has spent to `spend_file`, if one is
    /// configured (periodically and at shutdown, so a restart keeps the budgets' state).
    pub fn save_spend(&self) -> Result<(), Error> {
        let Some(path) = &self.spend_file else {
            return Ok(());
        };
        // Keys no longer configured keep their entries, so one removed and added back by
        // reloads takes up its spend again (see `reload`).
        let mut spent = crate::budgets::load(path).unwrap_or_default();
        for key in self.policy().api_keys.iter().filter(|key| key.spec().budget.is_some()) {
            spent.insert(key.name().to_owned(), key.spend());
        }
        crate::budgets::save(path, spent)
    }

    /// How many reloads were applied and how many refused.
    #[must_use]
    pub fn reloads(&self) -> (u64, u64) {
        (
            self.reloads[0].load(Ordering::Relaxed),
            self.reloads[1].load(Ordering::Relaxed),
        )
    }

    /// Refuses a policy a request could not use: a threshold or alias naming a router
    /// nothing knows, an alias of a loaded router without a threshold to apply, or of a
    /// model that is not configured. A known router this server does not load may keep its
    /// threshold and aliases (one config file serves deployments with different
    /// `--routers`); requests for it are refused.
    fn check(&self, policy: &Policy) -> Result<(), Error> {
        let unknown = (policy.thresholds.keys().map(|name| ("thresholds", name)))
            .chain(policy.strong_share.keys().map(|name| ("strong_share", name)))
            .find(|(_, name)| !policy.routers.contains_key(*name) && !routers::AVAILABLE.contains(&name.as_str()));
        if let Some((section, router)) = unknown {
            return Err(Error::Config(format!(
                "{section}.{router}: no router is called `{router}` (available: {})",
                routers::AVAILABLE.join(", ")
            )));
        }
        // A share is kept by moving a threshold, which needs a configured one to start from.
        if let Some((router, share)) = policy
            .strong_share
            .iter()
            .find(|(router, _)| !policy.thresholds.contains_key(*router))
        {
            return Err(Error::Config(format!(
                "strong_share.{router} needs thresholds.{router}, the threshold it applies until it has scored \
                 {MIN_TRACKED_SCORES} requests (`routellm calibrate --routers {router} --strong-model-pct {share}` \
                 gives one for that share)"
            )));
        }
        for (alias, target) in &policy.model_aliases {
            let usable = match model_name::parse(target)? {
                ModelTarget::Routed { router, .. }
                    if !policy.routers.contains_key(router) && routers::AVAILABLE.contains(&router) =>
                {
                    Ok(())
                }
                ModelTarget::Routed { router, threshold } => self.resolve(policy, router, threshold).map(|_| ()),
                ModelTarget::Direct(model) => self
                    .direct_tier(model)
                    .map(|_| ())
                    .ok_or_else(|| Error::ModelNotFound(model.to_owned())),
            };
            usable.map_err(|error| {
                Error::Config(format!(
                    "model_aliases.{alias}: `{target}` cannot be served here: {}",
                    match error {
                        Error::ModelNotFound(_) => "it is neither a router nor the strong or weak model".to_owned(),
                        other => other.to_string(),
                    }
                ))
            })?;
        }
        let unpriced = self
            .deployments()
            .map(|(_, deployment)| deployment)
            .find(|deployment| deployment.upstream.model.price.is_none());
        let budgeted = policy.api_keys.iter().find(|key| key.spec().budget.is_some());
        if let (Some(key), Some(unpriced)) = (budgeted, unpriced) {
            return Err(Error::Config(format!(
                "api_keys ({}): a budget is spent at the models' price_per_million_tokens, and `{}` has none",
                key.name(),
                unpriced.upstream.model.name
            )));
        }
        if let Some(key) = budgeted
            && !self.passthrough.paths.is_empty()
            && self.passthrough.price_per_million_tokens.is_none()
        {
            // Otherwise a budgeted key could spend without limit on embeddings and the like.
            return Err(Error::Config(format!(
                "api_keys ({}): a budget is spent on passthrough paths too, at passthrough.price_per_million_tokens, \
                 which is not set (give the price of what they call, or {{input: 0, output: 0}} if it is free)",
                key.name()
            )));
        }
        for key in &policy.api_keys {
            for model in key.spec().models.iter().flatten() {
                let known = policy.model_aliases.contains_key(model)
                    || match model_name::parse(model) {
                        Ok(ModelTarget::Routed { router, .. }) => {
                            policy.routers.contains_key(router) || routers::AVAILABLE.contains(&router)
                        }
                        Ok(ModelTarget::Direct(name)) => self.direct_tier(name).is_some(),
                        Err(_) => false,
                    };
                if !known {
                    return Err(Error::Config(format!(
                        "api_keys ({}): models: `{model}` is neither an alias, a router (`router-<name>`) nor the \
                         strong or weak model",
                        key.name()
                    )));
                }
            }
        }
        Ok(())
    }

    /// What a request's `model` asks for under `policy`, its alias resolved.
    pub fn target<'m>(&self, policy: &'m Policy, model: &'m str) -> Result<ModelTarget<'m>, Error> {
        let Some(target) = policy.model_aliases.get(model) else {
            return model_name::parse(model);
        };
        let resolved = model_name::parse(target)?;
        if let ModelTarget::Routed { router, .. } = resolved
            && !policy.routers.contains_key(router)
        {
            return Err(Error::InvalidRequest {
                message: format!(
                    "Model `{model}` stands for `{target}`, but this server does not load router `{router}`. \
                     Available routers: {}.",
                    policy.router_names()
                ),
                param: Some("model"),
                code: Some("invalid_model"),
            });
        }
        Ok(resolved)
    }

    /// The response cache, when `response_cache` is configured.
    #[must_use]
    pub fn cache(&self) -> Option<&ResponseCache> {
        self.cache.as_deref()
    }

    /// The served routers by name, as the policy in force has them.
    #[must_use]
    pub fn routers(&self) -> Arc<Routers> {
        Arc::clone(&self.policy().routers)
    }

    /// How long a client may take to send a request's head, and then its body.
    #[must_use]
    pub fn client_timeout(&self) -> Duration {
        self.client_timeout
    }

    /// How long open requests may run on after a shutdown signal.
    #[must_use]
    pub fn shutdown_timeout(&self) -> Duration {
        self.shutdown_timeout
    }

    /// Each served router's decisions and scores so far, and those of routers a reload
    /// took out that served before (their counters stop, they do not vanish).
    #[must_use]
    pub fn router_stats(&self) -> Vec<(&str, &RouterStats)> {
        let served = self.routers();
        self.router_stats
            .iter()
            .filter(|(name, stats)| served.contains_key(*name) || stats.has_served())
            .map(|(name, stats)| (name.as_str(), stats.as_ref()))
            .collect()
    }

    /// A router's default threshold now, used for `router-<name>` without one.
    #[must_use]
    pub fn default_threshold(&self, router: &str) -> Option<f64> {
        self.default_threshold_under(&self.policy(), router)
    }

    /// A router's default threshold under `policy`: with `strong_share`, the one that would
    /// have sent that share of its latest scores to the strong model (once there are
    /// enough of them), else the configured one.
    #[must_use]
    pub fn default_threshold_under(&self, policy: &Policy, router: &str) -> Option<f64> {
        policy
            .strong_share(router)
            .and_then(|share| self.score_windows.get(router)?.threshold(share))
            .or_else(|| policy.default_threshold(router))
    }

    #[must_use]
    pub fn strong(&self) -> &Upstream {
        self.upstream(Tier::Strong)
    }

    #[must_use]
    pub fn weak(&self) -> &Upstream {
        self.upstream(Tier::Weak)
    }

    #[must_use]
    pub fn max_request_bytes(&self) -> usize {
        self.max_request_bytes
    }

    /// Origins whose browser pages may call the API (`*` for any); empty: no CORS.
    #[must_use]
    pub fn cors_allowed_origins(&self) -> &[String] {
        &self.cors_allowed_origins
    }

    /// The prompt log, when one is configured.
    #[must_use]
    pub fn prompt_log(&self) -> Option<&PromptLog> {
        self.prompt_log.as_ref()
    }

    /// Unix time of start-up, reported as `created` in `/v1/models`.
    #[must_use]
    pub fn started_at(&self) -> u64 {
        self.started_at
    }

    /// Checks a request's `Authorization` header against the proxy keys in force.
    pub fn authorize(&self, authorization: Option<&str>) -> Result<Option<ApiKey>, Error> {
        self.policy().authorize(authorization)
    }

    /// Scores `prompt` with `router` and picks the model for `threshold` (or the router's default).
    pub async fn route(
        &self,
        router_name: &str,
        threshold: Option<f64>,
        prompt: String,
    ) -> Result<RouteDecision, Error> {
        self.route_or(
            &self.policy(),
            router_name,
            threshold,
            vec![prompt],
            OnRouterError::Error,
        )
        .await
    }

    /// [`Gateway::route`] on the highest score among `prompts`, except that when the router
    /// fails to score, `on_error` may pick the model (chat completions are answered even
    /// then); the failure is logged, and the decision says so for the response header and
    /// the metrics.
    async fn route_or(
        &self,
        policy: &Policy,
        router_name: &str,
        threshold: Option<f64>,
        prompts: Vec<String>,
        on_error: OnRouterError,
    ) -> Result<RouteDecision, Error> {
        let (router, threshold) = self.resolve(policy, router_name, threshold)?;
        let stats = self.router_stats.get(router_name);
        let budget = policy.scoring_timeout.map(|limit| {
            let deadline = tokio::time::Instant::now() + limit;
            let typical = stats.map_or(Duration::ZERO, |stats| stats.typical_scoring_time());
            ScoringBudget {
                limit,
                deadline,
                // Under a burst, a request that gets its slot too late to finish in time
                // would spend the slot on a score nobody waits for, and make the next
                // request late too: it starts only with a typical scoring's time left.
                // A free slot is still taken at once, so however slow the average
                // (after one slow first scoring, say), new measurements keep coming.
                start_by: deadline.checked_sub(typical).unwrap_or(deadline),
            }
        });
        let scored = score(
            router,
            router_name,
            prompts,
            &self.scoring_slots,
            stats,
            budget.as_ref(),
        );
        let scored = match &budget {
            // Dropping the scoring future gives up a queued slot at once; scoring already
            // running finishes on its thread (and keeps its slot until then), unobserved.
            Some(budget) => tokio::time::timeout_at(budget.deadline, scored)
                .await
                .unwrap_or_else(|_| Err(budget.exceeded(router_name))),
            None => scored.await,
        };
        if let (Err(Error::RouterTimeout { .. }), Some(stats)) = (&scored, stats) {
            stats.record_timeout();
        }
        let (win_rate, tier, fallback) = match scored {
            Ok(win_rate) => (win_rate, tier_for(win_rate, threshold), false),
            Err(error) => {
                let tier = match on_error {
                    OnRouterError::Strong => Tier::Strong,
                    OnRouterError::Weak => Tier::Weak,
                    OnRouterError::Error => return Err(error),
                };
                if matches!(error, Error::RouterTimeout { .. }) {
                    // Expected under a burst once a timeout is set, possibly for most
                    // requests: a line each would flood the log; the metric counts them.
                    tracing::debug!(
                        router = router_name,
                        tier = tier.as_str(),
                        "no score within scoring_timeout_ms; on_router_error chose the model"
                    );
                } else {
                    tracing::warn!(
                        router = router_name,
                        error = %error,
                        tier = tier.as_str(),
                        "the router could not score the prompt; on_router_error chose the model"
                    );
                }
                (f64::NAN, tier, true)
            }
        };
        if let Some(stats) = stats {
            stats.record(tier, (!fallback).then_some(win_rate));
        }
        if let Some(window) = self.score_windows.get(router_name) {
            window.record(win_rate);
        }
        Ok(RouteDecision {
            router: router_name.to_owned(),
            threshold,
            win_rate,
            tier,
            model: self.upstream(tier).model.name.clone(),
            fallback,
            upstream_fallback: false,
            pinned: false,
        })
    }

    /// The router called `router_name` and the threshold to use: `threshold`, or its default.
    fn resolve<'p>(
        &self,
        policy: &'p Policy,
        router_name: &str,
        threshold: Option<f64>,
    ) -> Result<(&'p Arc<dyn Router>, f64), Error> {
        let router = policy.routers.get(router_name).ok_or_else(|| Error::InvalidRequest {
            message: format!(
                "Unknown router `{router_name}`. Available routers: {}.",
                policy.router_names()
            ),
            param: Some("model"),
            code: Some("invalid_model"),
        })?;
        let threshold = threshold
            .or_else(|| self.default_threshold_under(policy, router_name))
            .ok_or_else(|| Error::InvalidRequest {
                message: format!(
                    "Router `{router_name}` has no default threshold: use `router-{router_name}-<threshold>` with a \
                     threshold in [0, 1], or set `thresholds.{router_name}` in the config (see `routellm calibrate`)."
                ),
                param: Some("model"),
                code: Some("invalid_model"),
            })?;
        Ok((router, threshold))
    }

    /// The model of `tier`: its first deployment, when it lists several.
    #[must_use]
    pub fn upstream(&self, tier: Tier) -> &Upstream {
        self.pool(tier).primary()
    }

    /// Every deployment of both tiers, strong first, each with its id.
    pub fn deployments(&self) -> impl Iterator<Item = (DeploymentId, &crate::deployments::Deployment)> {
        [Tier::Strong, Tier::Weak].into_iter().flat_map(move |tier| {
            self.pool(tier)
                .deployments()
                .iter()
                .enumerate()
                .map(move |(index, deployment)| (DeploymentId { tier, index }, deployment))
        })
    }

    /// The deployments of `tier`.
    #[must_use]
    pub fn pool(&self, tier: Tier) -> &Pool {
        match tier {
            Tier::Strong => &self.pools[0],
            Tier::Weak => &self.pools[1],
        }
    }

    /// Which configured model a directly named one is, by configured or provider name.
    #[must_use]
    pub fn direct_tier(&self, model: &str) -> Option<Tier> {
        self.direct(model).map(|deployment| deployment.tier)
    }

    /// The deployment a directly named model is (the first of that name).
    #[must_use]
    pub fn direct(&self, model: &str) -> Option<DeploymentId> {
        [Tier::Strong, Tier::Weak]
            .into_iter()
            .find_map(|tier| self.pool(tier).find(model).map(|index| DeploymentId { tier, index }))
    }

    /// Routes (or directly forwards) a chat-completion request body and returns the model's answer.
    pub async fn chat_completion(&self, body: &[u8]) -> Result<Completion, Error> {
        self.complete(Api::ChatCompletions, body).await
    }

    /// Routes (or directly forwards) a request body for `api` and returns the model's answer.
    pub async fn complete(&self, api: Api, body: &[u8]) -> Result<Completion, Error> {
        self.complete_with_headers(api, body, &HeaderMap::new()).await
    }

    /// As [`Gateway::complete`], passing on those of the client's `headers` that
    /// `upstream.forward_headers` names.
    pub async fn complete_with_headers(
        &self,
        api: Api,
        body: &[u8],
        client_headers: &HeaderMap,
    ) -> Result<Completion, Error> {
        self.complete_under(&self.policy(), None, api, body, client_headers)
            .await
    }

    /// As [`Gateway::complete_with_headers`] under `policy`, for `caller` (the key that
    /// admitted the request, whose `models` it must be allowed): the server takes one
    /// snapshot when a request arrives, so the keys that admitted it also route it,
    /// whatever a reload changes meanwhile.
    pub async fn complete_under(
        &self,
        policy: &Policy,
        caller: Option<&ApiKey>,
        api: Api,
        body: &[u8],
        client_headers: &HeaderMap,
    ) -> Result<Completion, Error> {
        let forwarded = self.forwarded(client_headers);
        let request = ModelRequest::parse(api, body)?;
        let target = self.target(policy, request.model())?;
        if caller.is_some_and(|key| !key.spec().allows(request.model(), &target)) {
            // OpenAI's answer for a model a key has no access to.
            return Err(Error::ModelNotFound(request.model().to_owned()));
        }
        // Held to the end: requests waiting on this one (its flight) wake once its answer
        // is in the cache, or it has none to give.
        let mut miss = match self.look_up(policy, caller, client_headers, &target, &request).await {
            Lookup::Hit(completion) => return Ok(*completion),
            Lookup::Miss(miss) => miss,
        };
        let (mut decision, tier, route) = match target {
            ModelTarget::Routed { router, threshold } => {
                let prompts = match policy.score_turns {
                    ScoreTurns::Last => vec![request.last_user_prompt()?],
                    ScoreTurns::Max => request.user_prompts(MAX_SCORED_TURNS)?,
                };
                // Cloned only for the sample that is logged.
                let logged = self
                    .prompt_log
                    .as_ref()
                    .filter(|log| log.sampled())
                    .map(|log| (log, prompts.clone()));
                let mut decision = self
                    .route_or(policy, router, threshold, prompts, policy.on_router_error)
                    .await?;
                let pinned = self.pin_continuation(&request, &mut decision);
                if let Some((log, prompts)) = logged {
                    log.record(&request, caller.map(ApiKey::name), &decision, &prompts);
                }
                let tier = decision.tier;
                let route = pinned.map_or(Candidates::Any { preferred: None }, Candidates::Only);
                (Some(decision), tier, route)
            }
            ModelTarget::Direct(model) => {
                let named = self
                    .direct(model)
                    .ok_or_else(|| Error::ModelNotFound(model.to_owned()))?;
                (
                    None,
                    named.tier,
                    Candidates::Any {
                        preferred: Some(named.index),
                    },
                )
            }
        };
        let mut upstream_time = Duration::ZERO;
        let sending = Sending {
            request: &request,
            body,
            forwarded: &forwarded,
        };
        let (mut answer, mut index) = self
            .forward_to_tier(&sending, decision.as_ref(), tier, route, &mut upstream_time)
            .await;
        // Only a routed request may change model: a client that named one gets that one, and
        // a continuation can only be answered where its conversation is stored.
        if let Some(routed) = decision.as_mut().filter(|routed| !routed.pinned)
            && policy.on_upstream_error == OnUpstreamError::OtherModel
            && let Some(reason) = unavailable(&answer)
        {
            let other = routed.tier.other();
            tracing::warn!(
                tier = tier.as_str(),
                reason = %reason,
                answered_by = %self.upstream(other).model.name,
                "the routed model is unavailable; on_upstream_error sends the request to the other model"
            );
            routed.tier = other;
            routed.upstream_fallback = true;
            (answer, index) = self
                .forward_to_tier(
                    &sending,
                    Some(routed),
                    other,
                    Candidates::Any { preferred: None },
                    &mut upstream_time,
                )
                .await;
        }
        // A fallback to the other model changed the decision's tier.
        let answered_by = decision.as_ref().map_or(tier, |routed| routed.tier);
        let deployment = DeploymentId {
            tier: answered_by,
            index,
        };
        let answering = self.deployment(deployment);
        if let Some(routed) = decision.as_mut() {
            routed.model.clone_from(&answering.model.name);
        }
        let reply = self.remember_response(api, deployment, answer?);
        let reply = keep(&mut miss, api, decision.as_ref(), answering, deployment, reply);
        Ok(Completion {
            answered_by,
            deployment: index,
            price: answering.model.price,
            model: answering.model.name.clone(),
            decision,
            reply,
            upstream_time,
            cache: miss.outcome,
        })
    }

    /// Looks `request` up in the response cache, if it is on for its API and the client
    /// did not leave it out; a miss says where the answer is to be kept. While an identical
    /// request is being answered, waits for its answer first.
    async fn look_up(
        &self,
        policy: &Policy,
        caller: Option<&ApiKey>,
        client_headers: &HeaderMap,
        target: &ModelTarget<'_>,
        request: &ModelRequest<'_>,
    ) -> Lookup {
        let Some(cache) = self.cache.as_ref().filter(|_| ResponseCache::caches(request.api())) else {
            return Lookup::Miss(CacheMiss {
                outcome: None,
                storing: None,
                flight: None,
            });
        };
        let directive = Directive::of(client_headers);
        let outcome = match directive {
            Directive::Use => CacheOutcome::Miss,
            Directive::Refresh => CacheOutcome::Refresh,
            Directive::Bypass => CacheOutcome::Bypass,
        };
        let storing = (directive != Directive::Bypass).then(|| {
            // A default threshold is part of what is asked: when it moves (a reload, or
            // `strong_share`), earlier answers routed under the old one are not reused.
            let resolved = match *target {
                ModelTarget::Routed { router, threshold } => ModelTarget::Routed {
                    router,
                    threshold: threshold.or_else(|| self.default_threshold_under(policy, router)),
                },
                direct @ ModelTarget::Direct(_) => direct,
            };
            (
                Arc::clone(cache),
                cache.key(caller.map(ApiKey::name), &resolved, request),
            )
        });
        let mut flight = None;
        if let Some((_, key)) = storing.as_ref().filter(|_| directive == Directive::Use) {
            if let Some((answer, age)) = cache.get(key) {
                return Lookup::Hit(Box::new(Completion::from_cache(&answer, age)));
            }
            if let Some((answer, age)) = cache.get_remote(key).await {
                return Lookup::Hit(Box::new(Completion::from_cache(&answer, age)));
            }
            match cache.join_flight(*key) {
                Some(Joined::Lead(leading)) => flight = Some(leading),
                Some(Joined::Wait(waiting)) => {
                    if let Some(tape) = waiting.done().await {
                        // An identical stream has begun: read it along, live.
                        if let Some(body) = tape.read() {
                            cache.count_coalesced_stream();
                            return Lookup::Hit(Box::new(Completion::from_tape(&tape, body)));
                        }
                    } else if let Some((answer, age)) = cache.get_coalesced(key) {
                        return Lookup::Hit(Box::new(Completion::from_cache(&answer, age)));
                    }
                    // The first one's answer was not kept: this one asks the model itself.
                }
                None => {}
            }
        }
        cache.count(outcome);
        Lookup::Miss(CacheMiss {
            outcome: Some(outcome),
            storing,
            flight,
        })
    }

    /// The upstream of `deployment` (the tier's first for an index it does not have).
    #[must_use]
    pub fn deployment(&self, deployment: DeploymentId) -> &Upstream {
        let pool = self.pool(deployment.tier);
        pool.get(deployment.index)
            .map_or_else(|| pool.primary(), |found| &found.upstream)
    }

    /// Sends the request to `tier`'s deployments in turn until one is available, and
    /// returns its answer (or the last one's error) and which deployment that was.
    async fn forward_to_tier(
        &self,
        sending: &Sending<'_>,
        decision: Option<&RouteDecision>,
        tier: Tier,
        route: Candidates,
        upstream_time: &mut Duration,
    ) -> (Result<Reply, Error>, usize) {
        let pool = self.pool(tier);
        let order = match route {
            Candidates::Only(index) => vec![index],
            Candidates::Any { preferred } => pool.order(preferred),
        };
        let mut remaining = order.into_iter().peekable();
        let mut index = 0;
        let mut answer = Err(Error::Internal(format!("the {} tier has no deployment", tier.as_str())));
        while let Some(next) = remaining.next() {
            index = next;
            let upstream = self.deployment(DeploymentId { tier, index });
            let in_flight = pool.start(index);
            answer = self.forward(sending, decision, upstream, upstream_time).await;
            let Some(reason) = unavailable(&answer) else {
                if pool.record_answered(index) {
                    self.withdraw_cooldown(DeploymentId { tier, index });
                }
                answer = answer.map(|reply| crate::deployments::hold_until_done(reply, in_flight));
                break;
            };
            let wait = pool.record_unavailable(
                index,
                answer
                    .as_ref()
                    .ok()
                    .and_then(|reply| crate::deployments::retry_after(reply.headers())),
            );
            self.announce_cooldown(DeploymentId { tier, index }, wait);
            if let Some(&following) = remaining.peek() {
                tracing::warn!(
                    tier = tier.as_str(),
                    deployment = index,
                    model = %upstream.model.name,
                    reason = %reason,
                    next = following,
                    "a deployment is unavailable; the request goes to the next of its tier"
                );
            }
        }
        (answer, index)
    }

    /// Tells the other replicas (through the shared state, when there is one and the tier
    /// has deployments to pass over) that `deployment` is unavailable for `wait`.
    fn announce_cooldown(&self, deployment: DeploymentId, wait: Duration) {
        let (Some(shared), Ok(runtime)) = (&self.shared_state, tokio::runtime::Handle::try_current()) else {
            return;
        };
        if !self.shares_cooldowns(deployment.tier) {
            return;
        }
        let (shared, id) = (Arc::clone(shared), self.shared_deployment_id(deployment));
        let until = crate::unix_now_millis().saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        runtime.spawn(async move { shared.announce_cooldown(&id, until, wait).await });
    }

    /// Takes up the cooldowns other replicas announced: their unavailable deployments are
    /// passed over here too. Nothing to do without a shared state or a tier of several
    /// deployments (`false`: no need to call again).
    pub async fn take_shared_cooldowns(&self) -> bool {
        let Some(shared) = &self.shared_state else {
            return false;
        };
        let deployments: Vec<DeploymentId> = [Tier::Strong, Tier::Weak]
            .into_iter()
            .filter(|tier| self.shares_cooldowns(*tier))
            .flat_map(|tier| (0..self.pool(tier).deployments().len()).map(move |index| DeploymentId { tier, index }))
            .collect();
        if deployments.is_empty() {
            return false;
        }
        let ids: Vec<String> = deployments.iter().map(|id| self.shared_deployment_id(*id)).collect();
        if let Ok(until) = shared.cooldowns(&ids).await {
            let now = crate::unix_now_millis();
            for (deployment, until) in deployments.iter().zip(until) {
                let remaining = until
                    .filter(|until| *until > now)
                    .map(|until| Duration::from_millis(until - now));
                self.pool(deployment.tier).take_announced(deployment.index, remaining);
            }
        }
        true
    }

    /// Tells the other replicas that `deployment`, passed over here, answered again.
    fn withdraw_cooldown(&self, deployment: DeploymentId) {
        let (Some(shared), Ok(runtime)) = (&self.shared_state, tokio::runtime::Handle::try_current()) else {
            return;
        };
        if !self.shares_cooldowns(deployment.tier) {
            return;
        }
        let (shared, id) = (Arc::clone(shared), self.shared_deployment_id(deployment));
        runtime.spawn(async move { shared.withdraw_cooldown(&id).await });
    }

    /// Whether replicas tell each other about `tier`'s deployments: only a tier with another
    /// deployment to turn to gains from passing one over.
    fn shares_cooldowns(&self, tier: Tier) -> bool {
        self.pool(tier).deployments().len() > 1
    }

    /// A deployment's name among replicas: its tier and place, and a hash of its model and
    /// endpoint, so replicas configured differently do not take each other's cooldowns.
    fn shared_deployment_id(&self, deployment: DeploymentId) -> String {
        let model = &self.deployment(deployment).model;
        let endpoint = match &model.endpoint {
            providers::Endpoint::Http { base_url, .. } => base_url.as_str(),
            providers::Endpoint::Echo => "echo",
        };
        let hash = [model.name.as_bytes(), b"\n", endpoint.as_bytes()]
            .into_iter()
            .fold(crate::rng::FNV_OFFSET, crate::rng::fnv1a);
        format!("{}:{}:{hash:016x}", deployment.tier.as_str(), deployment.index)
    }

    /// Sends a Responses request that continues a remembered answer to the deployment that
    /// produced it (when the deployments do not all share storage); returns its index.
    fn pin_continuation(&self, request: &ModelRequest<'_>, decision: &mut RouteDecision) -> Option<usize> {
        let stored_at = self
            .affinity
            .as_ref()
            .zip(request.previous_response_id())
            .and_then(|(affinity, id)| affinity.deployment_of(id))?;
        decision.pinned = true;
        decision.tier = stored_at.tier;
        decision.model.clone_from(&self.deployment(stored_at).model.name);
        Some(stored_at.index)
    }

    /// Notes which model produced a Responses answer (a stream's id is read as it passes),
    /// so a continuation of it can be sent there.
    fn remember_response(&self, api: Api, answered_by: DeploymentId, reply: Reply) -> Reply {
        let Some(affinity) = self
            .affinity
            .as_ref()
            .filter(|_| api == Api::Responses && reply.status().is_success())
        else {
            return reply;
        };
        match reply {
            Reply::Complete { status, headers, body } => {
                if let Some(id) = crate::affinity::id_of_answer(&body) {
                    affinity.remember(&id, answered_by);
                }
                Reply::Complete { status, headers, body }
            }
            Reply::Stream { status, headers, body } => {
                let affinity = Arc::clone(affinity);
                let mut scanner = Some(crate::affinity::StreamIdScanner::default());
                let body = Box::pin(futures_util::StreamExt::map(body, move |chunk| {
                    if let (Ok(bytes), Some(active)) = (&chunk, scanner.as_mut())
                        && let Some(id) = active.feed(bytes)
                    {
                        affinity.remember(&id, answered_by);
                        scanner = None;
                    }
                    chunk
                }));
                Reply::Stream { status, headers, body }
            }
        }
    }

    /// The client's headers that are configured to pass on, every value of each.
    fn forwarded(&self, client_headers: &HeaderMap) -> HeaderMap {
        let mut forwarded = HeaderMap::new();
        for name in &self.forward_headers {
            for value in client_headers.get_all(name) {
                forwarded.append(name.clone(), value.clone());
            }
        }
        forwarded
    }

    /// Sends a Chat Completions `body` to `upstream`, a model outside the two tiers (the
    /// judge of `routellm label`), with this gateway's client and timeouts.
    pub async fn ask(&self, upstream: &Upstream, body: &[u8]) -> Result<Reply, Error> {
        let request = ModelRequest::parse(Api::ChatCompletions, body)?;
        let sending = Sending {
            request: &request,
            body,
            forwarded: &HeaderMap::new(),
        };
        let mut waited = Duration::ZERO;
        self.forward(&sending, None, upstream, &mut waited).await
    }

    /// Sends the request, rewritten for `upstream`'s model, and returns its answer; the
    /// time spent waiting on the model is added to `upstream_time`.
    async fn forward(
        &self,
        sending: &Sending<'_>,
        decision: Option<&RouteDecision>,
        upstream: &Upstream,
        upstream_time: &mut Duration,
    ) -> Result<Reply, Error> {
        let Sending {
            request,
            body,
            forwarded,
        } = *sending;
        let rewritten = request.rewrite_model(&upstream.model.provider_model);
        let echo_prompt;
        let echo_note;
        let echo = if upstream.is_echo() {
            echo_prompt = request.last_user_prompt().unwrap_or_default();
            echo_note = describe(decision, upstream);
            EchoInput {
                prompt: &echo_prompt,
                route_note: &echo_note,
                include_usage: wants_usage(body),
            }
        } else {
            EchoInput {
                prompt: "",
                route_note: "",
                include_usage: false,
            }
        };
        let started = Instant::now();
        let answer = upstream
            .send(
                &self.client,
                request.api(),
                rewritten,
                UpstreamRequest {
                    stream: request.stream(),
                    timeout: self.request_timeout,
                    first_event_timeout: self.stream_first_event_timeout,
                    forwarded,
                    echo: &echo,
                },
            )
            .await;
        *upstream_time += started.elapsed();
        answer
    }
}

/// What the response cache had for a request.
enum Lookup {
    Hit(Box<Completion>),
    Miss(CacheMiss),
}

/// The model is to answer; `storing` is where its answer goes, unless the client left the
/// cache out (or it is off).
struct CacheMiss {
    outcome: Option<CacheOutcome>,
    storing: Option<(Arc<ResponseCache>, CacheKey)>,
    /// While this request leads identical ones, they wait until it drops (a stream's goes
    /// with its body, to the end of the stream).
    flight: Option<Flight>,
}

/// Router `name` as `config` sets it up, its errors naming it.
fn build_router(name: &str, config: &Config) -> Result<Arc<dyn Router>, Error> {
    routers::build(name, config).map_err(|source| Error::Config(format!("router `{name}`: {source}")))
}

/// Keeps a successful answer that `deployment` gave by the router's choice in the cache
/// (when the miss says where): a whole one now, a stream once it has ended well (handing
/// the stream the miss's flight, so identical streams read it live). Fallback answers are
/// not kept, so a passing outage is not served again.
fn keep(
    miss: &mut CacheMiss,
    api: Api,
    decision: Option<&RouteDecision>,
    answering: &Upstream,
    deployment: DeploymentId,
    reply: Reply,
) -> Reply {
    let chosen = decision.is_none_or(|routed| !(routed.fallback || routed.upstream_fallback || routed.pinned));
    let Some((cache, key)) = (miss.storing.as_ref()).filter(|_| chosen && reply.status() == axum::http::StatusCode::OK)
    else {
        return reply;
    };
    let key = *key;
    let mut answer = CachedAnswer {
        body: bytes::Bytes::new(),
        content_type: reply.headers().get(axum::http::header::CONTENT_TYPE).cloned(),
        decision: decision.cloned(),
        model: answering.model.name.clone(),
        answered_by: deployment.tier,
        deployment: deployment.index,
        price: answering.model.price,
        usage: None,
    };
    match reply {
        Reply::Complete { status, headers, body } => {
            answer.usage = crate::usage::of_body(&body);
            answer.body = body.clone();
            cache.insert(key, answer);
            Reply::Complete { status, headers, body }
        }
        Reply::Stream { status, headers, body } => Reply::Stream {
            status,
            headers,
            body: cache.record_stream(key, answer, body, api, miss.flight.take()),
        },
    }
}

/// One request on its way to the models: parsed, as the client sent it, and the client
/// headers that pass on.
struct Sending<'a> {
    request: &'a ModelRequest<'a>,
    body: &'a [u8],
    forwarded: &'a HeaderMap,
}

/// Which of a tier's deployments may answer a request.
#[derive(Clone, Copy)]
enum Candidates {
    /// Any, in the pool's order, `preferred` (a deployment the client named) first.
    Any { preferred: Option<usize> },
    /// This one alone: it holds the conversation a Responses request continues.
    Only(usize),
}

/// Why an answer means its model is unavailable (rate-limited, failing, unreachable, too
/// slow), as opposed to answering or refusing the request itself; `None` if it is not.
fn unavailable(answer: &Result<Reply, Error>) -> Option<String> {
    match answer {
        Ok(reply) => {
            let status = reply.status();
            (status == axum::http::StatusCode::TOO_MANY_REQUESTS || status.is_server_error())
                .then(|| format!("it answered {status}"))
        }
        Err(
            error
            @ (Error::UpstreamUnreachable { .. } | Error::UpstreamTimeout { .. } | Error::UpstreamProtocol { .. }),
        ) => Some(error.to_string()),
        Err(_) => None,
    }
}

/// At or above the threshold, the strong model.
fn tier_for(win_rate: f64, threshold: f64) -> Tier {
    if win_rate >= threshold {
        Tier::Strong
    } else {
        Tier::Weak
    }
}

/// `scoring_timeout_ms` for one request: when its score must be in, and when its scoring
/// must have started to make that.
struct ScoringBudget {
    limit: Duration,
    deadline: tokio::time::Instant,
    start_by: tokio::time::Instant,
}

impl ScoringBudget {
    fn exceeded(&self, router: &str) -> Error {
        Error::RouterTimeout {
            router: router.to_owned(),
            limit_ms: self.limit.as_millis(),
        }
    }
}

/// Runs the router where its cost allows: inline when trivial, else on the blocking pool
/// so a slow model never stalls the async workers serving other connections. Blocking
/// scoring takes one of `slots` first: a burst then queues in arrival order (tokio's
/// semaphore is fair), each request scored at full speed, and a request whose client has
/// gone before its turn costs nothing, instead of hundreds of threads sharing two cores.
/// A router that mostly waits on the network (`Remote`) needs no CPU slot: it would only
/// queue behind the cores for a round trip. Several prompts (the turns of a conversation)
/// are scored in one batch, one job and one permit, and the highest score counts.
async fn score(
    router: &Arc<dyn Router>,
    name: &str,
    prompts: Vec<String>,
    slots: &Arc<tokio::sync::Semaphore>,
    stats: Option<&Arc<RouterStats>>,
    budget: Option<&ScoringBudget>,
) -> Result<f64, Error> {
    let cost = router.scoring_cost();
    let result = if cost == ScoringCost::Inline {
        score_all(router.as_ref(), &prompts)
    } else {
        let permit = if cost == ScoringCost::Blocking {
            let acquire = Arc::clone(slots).acquire_owned();
            let permit = match budget {
                Some(budget) => tokio::time::timeout_at(budget.start_by, acquire)
                    .await
                    .map_err(|_| budget.exceeded(name))?,
                None => acquire.await,
            };
            Some(permit.map_err(|_| Error::Internal("the scoring pool is closed".into()))?)
        } else {
            None
        };
        let router = Arc::clone(router);
        let stats = stats.cloned();
        tokio::task::spawn_blocking(move || {
            // Held until scoring ends, even if the request is dropped meanwhile.
            let _permit = permit;
            let started = Instant::now();
            let scores = score_all(router.as_ref(), &prompts);
            // Measured here, so a scoring whose request gave up still counts.
            if let Some(stats) = stats {
                stats.record_scoring_time(started.elapsed());
            }
            scores
        })
        .await
        .map_err(|error| Error::Internal(format!("router `{name}` crashed: {error}")))?
    };
    let scores = result.map_err(|cause| Error::router(name, cause))?;
    let mut highest: Option<f64> = None;
    for score in scores {
        let score = crate::scoring::in_range(name, score, None)?;
        highest = Some(highest.map_or(score, |best| best.max(score)));
    }
    highest.ok_or_else(|| Error::Internal(format!("router `{name}` returned no score")))
}

/// The scores of `prompts`: one call for one prompt, the router's batch call for several.
fn score_all(router: &dyn Router, prompts: &[String]) -> Result<Vec<f64>, crate::routers::RouterError> {
    if let [prompt] = prompts {
        return router.strong_win_rate(prompt).map(|score| vec![score]);
    }
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let scores = router.strong_win_rates(&prompts)?;
    if scores.len() == prompts.len() {
        Ok(scores)
    } else {
        Err(crate::routers::RouterError::Score(format!(
            "{} scores for {} prompts",
            scores.len(),
            prompts.len()
        )))
    }
}

fn describe(decision: Option<&RouteDecision>, upstream: &Upstream) -> String {
    match decision {
        Some(decision) if decision.upstream_fallback => format!(
            "Router {}'s choice was unavailable, so the {} model {} answered (on_upstream_error)",
            decision.router,
            decision.tier.as_str(),
            upstream.model.name
        ),
        Some(decision) if decision.fallback => format!(
            "Router {} could not score the prompt, so the {} model {} answered (on_router_error)",
            decision.router,
            decision.tier.as_str(),
            upstream.model.name
        ),
        Some(decision) => format!(
            "Router {} scored a strong win rate of {:.4} against threshold {}, so the {} model {} answered",
            decision.router,
            decision.win_rate,
            decision.threshold,
            decision.tier.as_str(),
            upstream.model.name
        ),
        None => format!("{} was requested directly, without routing", upstream.model.name),
    }
}

/// Whether a streaming request asked for a final usage chunk (`stream_options.include_usage`).
fn wants_usage(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Options {
        #[serde(default)]
        stream_options: Option<StreamOptions>,
    }
    #[derive(serde::Deserialize)]
    struct StreamOptions {
        #[serde(default)]
        include_usage: Option<bool>,
    }
    serde_json::from_slice::<Options>(body)
        .ok()
        .and_then(|options| options.stream_options)
        .and_then(|options| options.include_usage)
        .unwrap_or(false)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0_u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileConfig, Overrides};
    use crate::routers::RouterError;

    struct Fixed(f64);
    impl Router for Fixed {
        fn strong_win_rate(&self, _prompt: &str) -> Result<f64, RouterError> {
            Ok(self.0)
        }
    }

    /// `yaml` with the two offline echo models.
    fn echo_config(yaml: &str) -> Result<Config, Error> {
        Config::merge(
            FileConfig::from_yaml(yaml)?,
            Overrides {
                strong_model: Some("echo/strong".into()),
                weak_model: Some("echo/weak".into()),
                ..Overrides::default()
            },
        )
    }

    /// A gateway between the echo models serving `router` as `name`, configured by `yaml`.
    fn gateway_serving(name: &str, router: Arc<dyn Router>, yaml: &str) -> Result<Gateway, Error> {
        let mut routers: BTreeMap<String, Arc<dyn Router>> = BTreeMap::new();
        routers.insert(name.into(), router);
        Gateway::with_routers(&echo_config(yaml)?, routers)
    }

    fn gateway(rate: f64, yaml: &str) -> Gateway {
        gateway_serving("random", Arc::new(Fixed(rate)), yaml).unwrap()
    }

    #[tokio::test]
    async fn threshold_is_inclusive_for_strong() {
        let gateway = gateway(0.5, "");
        let at = gateway.route("random", Some(0.5), String::new()).await.unwrap();
        assert_eq!((at.tier, at.model.as_str()), (Tier::Strong, "echo/strong"));
        let above = gateway.route("random", Some(0.500_001), String::new()).await.unwrap();
        assert_eq!((above.tier, above.model.as_str()), (Tier::Weak, "echo/weak"));
    }

    #[tokio::test]
    async fn default_threshold_applies_when_absent() {
        let gateway = gateway(0.3, "thresholds: {random: 0.2}\n");
        let decision = gateway.route("random", None, String::new()).await.unwrap();
        assert_eq!((decision.threshold, decision.tier), (0.2, Tier::Strong));
        let without = self::gateway(0.3, "");
        let error = without.route("random", None, String::new()).await.unwrap_err();
        assert!(error.to_string().contains("no default threshold"), "{error}");
    }

    #[tokio::test]
    async fn out_of_range_scores_are_server_errors_not_routes() {
        let gateway = gateway(1.5, "");
        let error = gateway.route("random", Some(0.5), String::new()).await.unwrap_err();
        assert_eq!(error.status(), axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn thresholds_must_name_known_routers() {
        let config = Config::merge(
            FileConfig::from_yaml("thresholds: {fm: 0.5}\n").unwrap(),
            Overrides::default(),
        )
        .unwrap();
        let Err(error) = Gateway::from_config(&config) else {
            panic!("a threshold for a router nothing knows (a typo) must fail start-up")
        };
        assert!(error.to_string().contains("thresholds.fm"), "{error}");
        // A known router that this server does not load may keep its threshold.
        let shared = Config::merge(
            FileConfig::from_yaml("thresholds: {bert: 0.2, random: 0.5}\n").unwrap(),
            Overrides::default(),
        )
        .unwrap();
        let gateway = Gateway::from_config(&shared).unwrap();
        assert_eq!(gateway.default_threshold("random"), Some(0.5));
    }

    #[test]
    fn aliases_resolve_to_what_they_stand_for() {
        let gateway = gateway(
            0.5,
            "thresholds: {random: 0.3}\nmodel_aliases: {auto: router-random, fast: echo/weak}\n",
        );
        let policy = gateway.policy();
        assert_eq!(
            gateway.target(&policy, "auto").unwrap(),
            ModelTarget::Routed {
                router: "random",
                threshold: None
            }
        );
        assert_eq!(
            gateway.target(&policy, "fast").unwrap(),
            ModelTarget::Direct("echo/weak")
        );
        // Names that are not aliases mean what they always did.
        assert_eq!(
            gateway.target(&policy, "echo/strong").unwrap(),
            ModelTarget::Direct("echo/strong")
        );
        assert!(gateway.target(&policy, "router-random-7").is_err());
        // A known router this server does not load may keep its alias, as its threshold.
        let shared = self::gateway(0.5, "model_aliases: {auto: router-mf-0.8}\n");
        let error = shared.target(&shared.policy(), "auto").unwrap_err();
        assert_eq!(error.status(), axum::http::StatusCode::BAD_REQUEST);
        assert!(
            error
                .to_string()
                .contains("`auto` stands for `router-mf-0.8`, but this server does not load router `mf`"),
            "{error}"
        );
    }

    #[test]
    fn aliases_that_cannot_be_served_fail_start_up() {
        let config = |yaml: &str| echo_config(yaml).unwrap();
        for (yaml, why) in [
            ("model_aliases: {auto: router-fm-0.5}\n", "Unknown router `fm`"),
            ("model_aliases: {auto: router-random}\n", "no default threshold"),
            (
                "model_aliases: {auto: echo/other}\n",
                "neither a router nor the strong or weak model",
            ),
        ] {
            let mut routers: BTreeMap<String, Arc<dyn Router>> = BTreeMap::new();
            routers.insert("random".into(), Arc::new(Fixed(0.5)));
            let Err(error) = Gateway::with_routers(&config(yaml), routers) else {
                panic!("{yaml} must fail start-up")
            };
            let message = error.to_string();
            assert!(
                message.contains("model_aliases.auto") && message.contains(why),
                "{yaml}: {message}"
            );
        }
    }

    #[test]
    fn passthrough_needs_a_model_with_an_endpoint() {
        let refused = gateway_serving("random", Arc::new(Fixed(0.5)), "passthrough: {paths: [embeddings]}\n");
        let message = refused.err().map(|error| error.to_string()).unwrap_or_default();
        assert!(
            message.contains("echo model, which serves no other endpoints"),
            "{message}"
        );
        let unused = gateway_serving("random", Arc::new(Fixed(0.5)), "passthrough: {to: weak}\n").unwrap();
        assert!(!unused.passes_through("embeddings"));
    }

    #[test]
    fn a_budget_needs_every_model_priced_and_a_reload_cannot_add_one_without() {
        let budget = "api_keys: [{key: k1, name: team, budget: {limit: 5, per: day}}]\n";
        let error = gateway_serving("random", Arc::new(Fixed(0.5)), budget)
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("a budget is spent at the models' price_per_million_tokens, and `echo/strong` has none"),
            "{error}"
        );
        let gateway = gateway(0.5, "");
        let file =
            FileConfig::from_yaml(&format!("strong_model: echo/strong\nweak_model: echo/weak\n{budget}")).unwrap();
        assert!(
            gateway
                .reload(&Config::merge(file, Overrides::default()).unwrap())
                .is_err()
        );
    }

    #[test]
    fn a_key_removed_and_added_back_by_reloads_takes_up_its_spend_again() {
        let scratch = tempfile::tempdir().unwrap();
        let path = scratch.path().join("spend.json");
        let config = |keys: &str| {
            let priced = "{input: 1000000, output: 1000000}";
            let yaml = format!(
                "strong_model: {{name: echo/strong, price_per_million_tokens: {priced}}}\n\
                 weak_model: {{name: echo/weak, price_per_million_tokens: {priced}}}\n\
                 spend_file: '{}'\napi_keys: {keys}\n",
                path.display()
            );
            Config::merge(FileConfig::from_yaml(&yaml).unwrap(), Overrides::default()).unwrap()
        };
        let with_key = config("[{key: k1, name: team, budget: {limit: 3, per: total}}, other]");
        let gateway = Gateway::with_routers(&with_key, BTreeMap::new()).unwrap();
        let key = || gateway.authorize(Some("Bearer k1")).unwrap().unwrap();
        // Three tokens (8 request bytes, one event) at a unit a token: the budget of 3 is spent.
        let unit = crate::config::Price {
            input: 1e6,
            output: 1e6,
        };
        key().charge_answer(None, 8, 1, Some(unit));
        assert!(key().check_budget().is_err());
        gateway.save_spend().unwrap();
        gateway.reload(&config("[other]")).unwrap();
        gateway.save_spend().unwrap();
        gateway.reload(&with_key).unwrap();
        assert!(
            key().check_budget().is_err(),
            "still spent after leaving and coming back"
        );
    }

    #[test]
    fn a_reload_keeps_a_keys_usage_by_name_and_checks_its_models() {
        let reloaded = |gateway: &Gateway, yaml: &str| {
            let file = FileConfig::from_yaml(&format!("strong_model: echo/strong\nweak_model: echo/weak\n{yaml}"));
            gateway.reload(&Config::merge(file.unwrap(), Overrides::default()).unwrap())
        };
        let limited = "api_keys: [{key: k1, name: team, requests_per_minute: 1}]\n";
        let gateway = gateway(0.5, limited);
        let admit = |gateway: &Gateway| gateway.authorize(Some("Bearer k1")).unwrap().unwrap().admit();
        assert!(admit(&gateway).is_ok());
        assert!(admit(&gateway).is_err());
        reloaded(&gateway, limited).unwrap();
        assert!(admit(&gateway).is_err(), "a reload is no way around a limit");
        reloaded(
            &gateway,
            "api_keys: [{key: k1, name: renamed, requests_per_minute: 1}]\n",
        )
        .unwrap();
        assert!(admit(&gateway).is_ok(), "another name is another key's usage");

        let refused = reloaded(&gateway, "api_keys: [{key: k1, models: [router-random, gpt-5]}]\n").unwrap_err();
        assert!(refused.to_string().contains("`gpt-5` is neither"), "{refused}");
        for fine in ["router-random", "router-random-0.3", "echo/weak", "router-mf"] {
            reloaded(&gateway, &format!("api_keys: [{{key: k1, models: [{fine}]}}]\n")).unwrap();
        }
        reloaded(
            &gateway,
            "model_aliases: {auto: router-random-0.5}\napi_keys: [{key: k1, models: [auto]}]\n",
        )
        .unwrap();
    }

    /// A reload that changes `routers` starts serving the added ones and stops the removed
    /// ones, keeping the instances of those it keeps; with routers handed in by the caller it
    /// cannot build any, and says a restart is needed.
    #[tokio::test]
    async fn a_reload_adds_and_removes_routers() {
        let serving = |routers: &[&str], yaml: &str| {
            Config::merge(
                FileConfig::from_yaml(yaml).unwrap(),
                Overrides {
                    routers: Some(routers.iter().map(|name| (*name).to_owned()).collect()),
                    strong_model: Some("echo/strong".into()),
                    weak_model: Some("echo/weak".into()),
                    ..Overrides::default()
                },
            )
            .unwrap()
        };
        let gateway = Gateway::from_config(&serving(&["random"], "thresholds: {random: 0.5}\n")).unwrap();
        gateway.route("random", None, String::new()).await.unwrap();
        let random = Arc::clone(&gateway.routers()["random"]);

        let swapped = serving(&["length"], "thresholds: {length: 0.5}\n");
        assert_eq!(gateway.reload(&swapped).unwrap(), Vec::<&str>::new());
        assert_eq!(gateway.routers().keys().collect::<Vec<_>>(), ["length"]);
        let long_prompt = "why ".repeat(400);
        assert_eq!(
            gateway.route("length", None, long_prompt.clone()).await.unwrap().tier,
            Tier::Strong
        );
        let gone = gateway
            .route("random", None, String::new())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            gone.contains("Unknown router `random`. Available routers: length."),
            "{gone}"
        );
        // The removed router's counters stay on /metrics (stopped); nothing never served is listed.
        let listed: Vec<&str> = gateway.router_stats().into_iter().map(|(name, _)| name).collect();
        assert_eq!(listed, ["length", "random"]);

        // Back again it is a new instance; the kept one is left alone.
        let length = Arc::clone(&gateway.routers()["length"]);
        let both = serving(&["random", "length"], "thresholds: {random: 0.5, length: 0.5}\n");
        assert!(gateway.reload(&both).unwrap().is_empty());
        assert!(!Arc::ptr_eq(&random, &gateway.routers()["random"]));
        assert!(Arc::ptr_eq(&length, &gateway.routers()["length"]));
        assert_eq!(gateway.reloads(), (2, 0));

        // Routers a library caller handed in are not rebuilt from names: a restart is.
        let handed_in = gateway_serving("random", Arc::new(Spelled), "thresholds: {random: 0.5}\n").unwrap();
        assert_eq!(handed_in.reload(&both).unwrap(), ["routers"]);
        assert_eq!(handed_in.routers().keys().collect::<Vec<_>>(), ["random"]);
    }

    #[tokio::test]
    async fn reload_swaps_the_policy_or_keeps_the_running_one() {
        let config = |yaml: &str, overrides: Overrides| {
            Config::merge(
                FileConfig::from_yaml(yaml).unwrap(),
                Overrides {
                    strong_model: overrides.strong_model.or(Some("echo/strong".into())),
                    weak_model: Some("echo/weak".into()),
                    ..overrides
                },
            )
            .unwrap()
        };
        let gateway = gateway(0.5, "thresholds: {random: 0.6}\n");
        let started_with = gateway.policy();
        assert_eq!(
            gateway.route("random", None, String::new()).await.unwrap().tier,
            Tier::Weak
        );

        let needs_restart = gateway
            .reload(&config(
                "thresholds: {random: 0.4}\napi_keys: [k1]\nmodel_aliases: {auto: router-random}\n",
                Overrides::default(),
            ))
            .unwrap();
        assert!(needs_restart.is_empty(), "{needs_restart:?}");
        assert_eq!(
            gateway.route("random", None, String::new()).await.unwrap().tier,
            Tier::Strong
        );
        assert!(gateway.authorize(None).is_err());
        assert!(gateway.authorize(Some("Bearer k1")).is_ok());
        assert!(gateway.target(&gateway.policy(), "auto").is_ok());
        // A request that began before the reload finishes under the policy it began with.
        assert_eq!(started_with.default_threshold("random"), Some(0.6));

        // A policy that does not check out is refused whole.
        let refused = gateway.reload(&config(
            "thresholds: {random: 0.9}\nmodel_aliases: {auto: echo/nowhere}\n",
            Overrides::default(),
        ));
        assert!(refused.unwrap_err().to_string().contains("model_aliases.auto"));
        assert_eq!(gateway.reloads(), (1, 1));
        assert_eq!(gateway.default_threshold("random"), Some(0.4));
        assert!(gateway.authorize(None).is_err());

        // Settings fixed at start are applied at the next restart, and said so.
        let moved = config(
            "",
            Overrides {
                strong_model: Some("echo/other".into()),
                routers: Some(vec!["random".into(), "mf".into()]),
                ..Overrides::default()
            },
        );
        assert_eq!(gateway.reload(&moved).unwrap(), vec!["routers", "strong_model"]);
        assert_eq!(gateway.strong().model.name, "echo/strong");
        assert!(gateway.authorize(None).is_ok());
    }

    #[test]
    fn authorization_checks_bearer_keys() {
        let open = gateway(0.5, "");
        assert!(open.authorize(None).is_ok());
        let locked = gateway(0.5, "api_keys: [k1, k2]\n");
        assert!(locked.authorize(Some("Bearer k2")).is_ok());
        assert!(locked.authorize(Some("Bearer k3")).is_err());
        assert!(locked.authorize(Some("k1")).is_err());
        assert!(locked.authorize(None).is_err());
    }

    #[test]
    fn usage_option_is_detected() {
        assert!(wants_usage(br#"{"stream_options":{"include_usage":true}}"#));
        assert!(!wants_usage(br#"{"stream_options":{}}"#));
        assert!(!wants_usage(b"{}"));
    }

    /// Scores a prompt as the number it spells, so a test chooses every score.
    struct Spelled;
    impl Router for Spelled {
        fn strong_win_rate(&self, prompt: &str) -> Result<f64, RouterError> {
            prompt
                .parse()
                .map_err(|_| RouterError::Score(format!("not a score: {prompt}")))
        }
    }

    fn spelled_gateway(yaml: &str) -> Result<Gateway, Error> {
        gateway_serving("random", Arc::new(Spelled), yaml)
    }

    async fn strong_count(gateway: &Gateway, scores: impl Iterator<Item = f64>) -> usize {
        let mut strong = 0;
        for score in scores {
            let decision = gateway.route("random", None, score.to_string()).await.unwrap();
            strong += usize::from(decision.tier == Tier::Strong);
        }
        strong
    }

    #[tokio::test]
    async fn strong_share_moves_the_default_threshold_with_the_traffic() {
        let gateway =
            spelled_gateway("thresholds: {random: 0.5}\nstrong_share: {random: 0.2}\nstrong_share_window: 100\n")
                .unwrap();
        // Until 100 scores are in, the configured threshold decides: every 0.6 goes strong.
        let early = strong_count(&gateway, std::iter::repeat_n(0.6, 99)).await;
        assert_eq!(early, 99);
        assert_eq!(gateway.default_threshold("random"), Some(0.5));
        // Traffic drifts to scores 0.70..0.79 (all above the configured 0.5): once the
        // window holds only them, a fifth of them goes strong, not all.
        let drifted = || (0..100).map(|i| 0.7 + f64::from(i % 10) / 100.0);
        let _ = strong_count(&gateway, drifted()).await;
        let threshold = gateway.default_threshold("random").unwrap();
        assert!((0.77..=0.78).contains(&threshold), "{threshold}");
        assert_eq!(strong_count(&gateway, drifted()).await, 20);
        // An explicit threshold is the client's choice and stays as asked.
        let pinned = gateway.route("random", Some(0.5), "0.7".into()).await.unwrap();
        assert_eq!((pinned.threshold, pinned.tier), (0.5, Tier::Strong));
        // Without strong_share, the same traffic is all strong at the configured threshold.
        let fixed = spelled_gateway("thresholds: {random: 0.5}\n").unwrap();
        let _ = strong_count(&fixed, drifted()).await;
        assert_eq!(strong_count(&fixed, drifted()).await, 100);
    }

    #[tokio::test]
    async fn strong_share_set_by_a_reload_starts_from_the_scores_already_seen() {
        let gateway = spelled_gateway("thresholds: {random: 0.5}\n").unwrap();
        let _ = strong_count(&gateway, (0..200).map(|i| f64::from(i) / 200.0)).await;
        assert_eq!(gateway.default_threshold("random"), Some(0.5));
        let config = echo_config("thresholds: {random: 0.5}\nstrong_share: {random: 0.1}\n").unwrap();
        assert!(gateway.reload(&config).unwrap().is_empty());
        let threshold = gateway.default_threshold("random").unwrap();
        assert!((0.895..=0.9).contains(&threshold), "{threshold}");
        assert_eq!(gateway.policy().strong_share("random"), Some(0.1));
        // A different window needs a restart, and says so.
        let resized = echo_config("thresholds: {random: 0.5}\nstrong_share_window: 5000\n").unwrap();
        assert_eq!(gateway.reload(&resized).unwrap(), vec!["strong_share_window"]);
        // So does turning the response cache on (or changing it).
        let cached = echo_config("thresholds: {random: 0.5}\nresponse_cache: {ttl_secs: 60}\n").unwrap();
        assert_eq!(gateway.reload(&cached).unwrap(), vec!["response_cache"]);
    }

    #[tokio::test]
    async fn router_failures_do_not_enter_the_window() {
        let gateway = spelled_gateway(
            "thresholds: {random: 0.5}\nstrong_share: {random: 0.5}\nstrong_share_window: 100\non_router_error: weak\n",
        )
        .unwrap();
        let request = |prompt: &str| {
            format!(r#"{{"model":"router-random","messages":[{{"role":"user","content":"{prompt}"}}]}}"#)
        };
        for _ in 0..150 {
            let answer = gateway
                .chat_completion(request("not a number").as_bytes())
                .await
                .unwrap();
            assert!(answer.decision.unwrap().fallback);
        }
        assert_eq!(gateway.score_windows["random"].len(), 0);
        assert_eq!(gateway.default_threshold("random"), Some(0.5));
    }

    #[test]
    fn strong_share_needs_a_known_router_and_a_starting_threshold() {
        let Err(error) = spelled_gateway("strong_share: {random: 0.3}\n") else {
            panic!("a share with no threshold to start from must fail start-up")
        };
        let message = error.to_string();
        assert!(
            message.contains("strong_share.random needs thresholds.random"),
            "{message}"
        );
        assert!(message.contains("--strong-model-pct 0.3"), "{message}");
        let Err(error) = spelled_gateway("thresholds: {random: 0.5}\nstrong_share: {fm: 0.3}\n") else {
            panic!("a share for a router nothing knows (a typo) must fail start-up")
        };
        assert!(error.to_string().contains("strong_share.fm: no router"), "{error}");
        for bad in ["strong_share: {random: 1.5}\n", "strong_share_window: 10\n"] {
            let Err(error) = spelled_gateway(&format!("thresholds: {{random: 0.5}}\n{bad}")) else {
                panic!("{bad} must be refused")
            };
            assert!(error.to_string().contains("outside"), "{error}");
        }
    }

    /// Takes its time, off the async workers, as MiniLM does under load; counts its scorings.
    struct Slow(Duration, AtomicU64);
    impl Router for Slow {
        fn strong_win_rate(&self, _prompt: &str) -> Result<f64, RouterError> {
            self.1.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(self.0);
            Ok(0.9)
        }
        fn scoring_cost(&self) -> ScoringCost {
            ScoringCost::Blocking
        }
    }

    fn slow_gateway(delay_ms: u64, yaml: &str) -> Gateway {
        slow_gateway_and_router(delay_ms, yaml).0
    }

    fn slow_gateway_and_router(delay_ms: u64, yaml: &str) -> (Gateway, Arc<Slow>) {
        let router = Arc::new(Slow(Duration::from_millis(delay_ms), AtomicU64::new(0)));
        (gateway_serving("bert", router.clone(), yaml).unwrap(), router)
    }

    const SLOW_REQUEST: &[u8] = br#"{"model":"router-bert-0.5","messages":[{"role":"user","content":"hi"}]}"#;

    #[tokio::test]
    async fn a_score_that_takes_too_long_is_given_up_and_on_router_error_decides() {
        let gateway = slow_gateway(1000, "scoring_timeout_ms: 50\non_router_error: weak\n");
        let started = Instant::now();
        let answer = gateway.chat_completion(SLOW_REQUEST).await.unwrap();
        // Answered without waiting for the score (which takes a second).
        assert!(
            started.elapsed() < Duration::from_millis(800),
            "{:?}",
            started.elapsed()
        );
        let decision = answer.decision.unwrap();
        assert!(decision.fallback);
        assert_eq!(decision.tier, Tier::Weak);
        assert_eq!(gateway.router_stats["bert"].timeouts(), 1);
        // Without a fallback the client gets a retryable 503 that says why.
        let strict = slow_gateway(1000, "scoring_timeout_ms: 50\non_router_error: error\n");
        let Err(error) = strict.chat_completion(SLOW_REQUEST).await else {
            panic!("the score never came")
        };
        assert_eq!(error.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(error.to_string().contains("within 50 ms"), "{error}");
        // In time, the score decides as usual.
        let patient = slow_gateway(10, "scoring_timeout_ms: 2000\non_router_error: weak\n");
        let decision = patient.chat_completion(SLOW_REQUEST).await.unwrap().decision.unwrap();
        assert_eq!((decision.fallback, decision.tier), (false, Tier::Strong));
    }

    #[tokio::test]
    async fn waiting_for_a_scoring_slot_counts_against_the_timeout() {
        // One slot, 200 ms a score, 350 ms allowed. Both requests start together; the
        // first takes the slot, so the second cannot have its score before 400 ms.
        let gateway = slow_gateway(
            200,
            "scoring_timeout_ms: 350\nscoring_concurrency: 1\non_router_error: weak\n",
        );
        let (first, second) = tokio::join!(
            gateway.chat_completion(SLOW_REQUEST),
            gateway.chat_completion(SLOW_REQUEST)
        );
        let (first, second) = (first.unwrap().decision.unwrap(), second.unwrap().decision.unwrap());
        assert_eq!((first.fallback, first.tier), (false, Tier::Strong));
        assert_eq!((second.fallback, second.tier), (true, Tier::Weak));
    }

    #[tokio::test]
    async fn a_request_that_would_start_scoring_too_late_does_not_take_a_slot() {
        let (gateway, router) = slow_gateway_and_router(
            200,
            "scoring_timeout_ms: 350\nscoring_concurrency: 1\non_router_error: weak\n",
        );
        // One scoring measured: 200 ms is typical now.
        let warm = gateway.chat_completion(SLOW_REQUEST).await.unwrap().decision.unwrap();
        assert!(!warm.fallback);
        assert!(gateway.router_stats["bert"].typical_scoring_time() >= Duration::from_millis(200));
        // Three at once: the first scores; the others would get the slot at 200 ms with
        // 150 ms left, less than a scoring takes, so they give up at 150 ms instead of
        // scoring for nobody (and holding the slot from whoever comes next).
        let (first, second, third) = tokio::join!(
            gateway.chat_completion(SLOW_REQUEST),
            gateway.chat_completion(SLOW_REQUEST),
            gateway.chat_completion(SLOW_REQUEST)
        );
        let fallbacks = [first, second, third].map(|answer| answer.unwrap().decision.unwrap().fallback);
        assert_eq!(fallbacks, [false, true, true]);
        assert_eq!(
            router.1.load(Ordering::Relaxed),
            2,
            "the warm-up and the first request only"
        );
        assert_eq!(gateway.router_stats["bert"].timeouts(), 2);
    }

    #[tokio::test]
    async fn one_slow_scoring_does_not_lock_a_router_out_of_its_budget() {
        let (gateway, router) = slow_gateway_and_router(30, "scoring_timeout_ms: 300\non_router_error: weak\n");
        // As if the first scoring had taken a second (a cold start): longer than the budget.
        gateway.router_stats["bert"].record_scoring_time(Duration::from_secs(1));
        let decision = gateway.chat_completion(SLOW_REQUEST).await.unwrap().decision.unwrap();
        assert!(!decision.fallback, "a free slot is taken whatever the average says");
        assert_eq!(router.1.load(Ordering::Relaxed), 1);
        assert!(gateway.router_stats["bert"].typical_scoring_time() < Duration::from_secs(1));
    }

    #[test]
    fn scoring_timeout_is_checked() {
        for (yaml, why) in [
            ("scoring_timeout_ms: 0\n", "must be positive"),
            ("scoring_timeout_ms: 600001\n", "over 600000"),
        ] {
            let error = Config::merge(FileConfig::from_yaml(yaml).unwrap(), Overrides::default()).unwrap_err();
            assert!(error.to_string().contains(why), "{yaml}: {error}");
        }
    }
}
