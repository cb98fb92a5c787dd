//! Configuration: the YAML file, then environment variables, then command-line flags,
//! merged and validated once at start-up.
//!
//! Command-line flags and their `ROUTELLM_*` environment variables arrive together as
//! [`Overrides`] (clap resolves flag-over-variable); the file fills whatever they leave
//! unset. Unknown keys in the file are errors, so a typo cannot silently fall back to a
//! default. Secrets are wrapped in [`Secret`], whose `Debug` never shows them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue};
use serde::Deserialize;

use crate::error::Error;
use crate::providers::GlobalOverrides;

/// RouteLLM's defaults, so its users' commands behave the same here.
pub const DEFAULT_STRONG_MODEL: &str = "gpt-4-1106-preview";
pub const DEFAULT_WEAK_MODEL: &str = "anyscale/mistralai/Mixtral-8x7B-Instruct-v0.1";
pub const DEFAULT_PORT: u16 = 6060;
pub const DEFAULT_HOST: &str = "0.0.0.0";
const DEFAULT_MAX_REQUEST_BYTES: usize = 32 * 1024 * 1024;
const DEFAULT_CONNECT_TIMEOUT_SECS: f64 = 10.0;
const DEFAULT_REQUEST_TIMEOUT_SECS: f64 = 600.0;
/// A client's time to send a request head, and then its body: 32 MiB (the size limit) at
/// about 0.5 MB/s, far beyond what any SDK on a working link needs.
const DEFAULT_CLIENT_TIMEOUT_SECS: f64 = 60.0;
/// Kubernetes' default termination grace period: a pod is killed after it anyway.
const DEFAULT_SHUTDOWN_TIMEOUT_SECS: f64 = 30.0;
/// The longest interval between looks at the config file (a day).
const MAX_WATCH_CONFIG_SECS: u64 = 86_400;
/// The longest `scoring_timeout_ms`: beyond it the upstream timeout is the real bound.
const MAX_SCORING_TIMEOUT_MS: u64 = 600_000;

/// A credential: deserialised like a string, never printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    #[must_use]
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret itself, for the one place that must send it.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Secret([redacted])")
    }
}

/// The models the file gives as tier `key`: one model, or a list of deployments serving it;
/// each a bare name or a name with its own endpoint. By hand rather than `untagged`: a typo
/// in a model's long form then gets serde's own message (`unknown field ...`), with the
/// setting and the deployment it is in, instead of "did not match any variant".
fn tier_models(value: serde_norway::Value, key: &str) -> Result<Vec<ModelConfig>, String> {
    let model = |value: serde_norway::Value| match value {
        serde_norway::Value::String(name) => Ok(ModelConfig::named(name)),
        other => serde_norway::from_value::<ModelConfig>(other).map_err(|error| error.to_string()),
    };
    match value {
        serde_norway::Value::Sequence(items) => items
            .into_iter()
            .enumerate()
            .map(|(index, item)| model(item).map_err(|error| format!("{key}, deployment {}: {error}", index + 1)))
            .collect(),
        other => model(other)
            .map(|one| vec![one])
            .map_err(|error| format!("{key}: {error}")),
    }
}

fn strong_tier<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<ModelConfig>>, D::Error> {
    let value = serde_norway::Value::deserialize(deserializer)?;
    tier_models(value, "strong_model")
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn weak_tier<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<ModelConfig>>, D::Error> {
    let value = serde_norway::Value::deserialize(deserializer)?;
    tier_models(value, "weak_model")
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// The most deployments one tier may list: each unavailable one can cost a request a
/// whole `request_timeout_secs` before the next is tried.
pub const MAX_DEPLOYMENTS: usize = 16;

/// The deployments serving one tier (strong or weak): at least one, the first the primary
/// (its price is the tier's, its endpoint serves `passthrough`).
#[derive(Debug, Clone, PartialEq)]
pub struct Deployments(Vec<ModelConfig>);

impl Deployments {
    /// `models` as one tier's deployments; refused when empty or longer than [`MAX_DEPLOYMENTS`].
    pub fn new(tier: &str, models: Vec<ModelConfig>) -> Result<Self, Error> {
        if models.is_empty() {
            return Err(Error::Config(format!("{tier}: list at least one model")));
        }
        if models.len() > MAX_DEPLOYMENTS {
            return Err(Error::Config(format!(
                "{tier}: {} deployments; at most {MAX_DEPLOYMENTS}",
                models.len()
            )));
        }
        Ok(Self(models))
    }

    /// One deployment: the usual setup.
    #[must_use]
    pub fn single(model: ModelConfig) -> Self {
        Self(vec![model])
    }

    /// The first deployment listed.
    #[must_use]
    pub fn primary(&self) -> &ModelConfig {
        // `new` and `single` never build an empty list.
        &self.0[0]
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ModelConfig> {
        self.0.iter()
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false; here for clippy's `len_without_is_empty`.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a Deployments {
    type Item = &'a ModelConfig;
    type IntoIter = std::slice::Iter<'a, ModelConfig>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl Deployments {
    /// The tier called `key`: the flag's one model, else the file's, else `default`.
    fn merge(flag: Option<String>, file: Option<Vec<ModelConfig>>, key: &str, default: &str) -> Result<Self, Error> {
        match (flag, file) {
            (Some(name), _) => Ok(Self::single(ModelConfig::named(name))),
            (None, Some(models)) => Self::new(key, models),
            (None, None) => Ok(Self::single(ModelConfig::named(default.to_owned()))),
        }
    }
}

/// How a tier with several deployments spreads its requests over them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The first available deployment in the order listed answers; the next ones stand by
    /// for when it is unavailable (a primary and its backups).
    #[default]
    Failover,
    /// Requests take turns over the available deployments (replicas sharing the load),
    /// each taking turns in proportion to its `weight`.
    RoundRobin,
    /// Each request goes to the available deployment with the fewest requests in flight
    /// (streams until they end) for its `weight`: replicas whose answers take very
    /// different times, as self-hosted models' do.
    LeastBusy,
}

/// The largest `weight` a deployment may have.
pub const MAX_WEIGHT: u32 = 1000;

/// `load_balancing`: how requests are spread over a tier's deployments, and how long one
/// that was unavailable is passed over.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancing {
    #[serde(default)]
    pub strategy: Strategy,
    /// How long a deployment that was unavailable (429, 5xx, unreachable, too slow) is
    /// passed over while others are available; a 429's `retry-after` replaces it.
    #[serde(default = "LoadBalancing::default_cooldown_secs")]
    pub cooldown_secs: f64,
}

impl LoadBalancing {
    fn default_cooldown_secs() -> f64 {
        10.0
    }

    /// The cooldown as a duration.
    #[must_use]
    pub fn cooldown(&self) -> Duration {
        Duration::from_secs_f64(self.cooldown_secs)
    }
}

impl Default for LoadBalancing {
    fn default() -> Self {
        Self {
            strategy: Strategy::default(),
            cooldown_secs: Self::default_cooldown_secs(),
        }
    }
}

/// One of the two models a router chooses between.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `<provider>/<model>` or a bare OpenAI model name.
    pub name: String,
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// Extra headers sent with every request to this model, over its provider's `headers`.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// What the model charges, for the cost counters at `/metrics`.
    #[serde(default)]
    pub price_per_million_tokens: Option<Price>,
    /// Its share of the tier's requests relative to the others' (`round_robin`,
    /// `least_busy`); 1 unless set.
    #[serde(default)]
    pub weight: Option<u32>,
}

/// A model's price per million tokens, in any one currency (the cost counters are in it).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Per million prompt (input) tokens.
    pub input: f64,
    /// Per million completion (output) tokens.
    pub output: f64,
}

impl Price {
    /// What `input_tokens` and `output_tokens` cost at this price.
    #[must_use]
    #[allow(clippy::cast_precision_loss)] // token counts stay far below 2^53
    pub fn cost(self, input_tokens: u64, output_tokens: u64) -> f64 {
        (input_tokens as f64 * self.input + output_tokens as f64 * self.output) / 1e6
    }
}

impl ModelConfig {
    #[must_use]
    pub fn named(name: String) -> Self {
        Self {
            name,
            base_url: None,
            api_key: None,
            headers: BTreeMap::new(),
            price_per_million_tokens: None,
            weight: None,
        }
    }
}

/// A provider's endpoint, overriding a built-in one or adding a new prefix.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// The environment variable holding the key, so the file itself holds no secret.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Extra headers sent with every request to this provider's models (a gateway's own
    /// credentials, attribution headers); `${VAR}` in a value reads the environment.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// What a routed request gets when its router cannot score the prompt (an embeddings
/// endpoint down, a router bug): a production gateway keeps serving by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnRouterError {
    /// The strong model answers: the request is served at the strong model's price.
    #[default]
    Strong,
    /// The weak model answers.
    Weak,
    /// The client gets a 500 `router_error`.
    Error,
}

/// Which user turns of a multi-turn request a router scores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScoreTurns {
    /// The last user message only, as RouteLLM.
    #[default]
    Last,
    /// Each of the last 8 user messages (`MAX_SCORED_TURNS`), routing on the highest score:
    /// a conversation that needed the strong model keeps it for its short follow-ups
    /// ("now commit it") instead of bouncing to the weak model mid-task.
    Max,
}

/// How many user turns `score_turns: max` scores at most (the most recent ones), which
/// bounds the cost of a long conversation to that many scorings.
pub const MAX_SCORED_TURNS: usize = 8;

/// What a routed request gets when the model it was routed to is unavailable: rate-limited
/// (429), failing (5xx), unreachable or too slow, before any of its answer was sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OnUpstreamError {
    /// The client gets that model's error (its status and body, or a 502/504): routing
    /// decisions are never changed behind the client's back unless asked for.
    #[default]
    Fail,
    /// The other model is asked once; its answer (or error) is the response.
    #[value(name = "other_model")]
    OtherModel,
}

/// Which of the two models serves the OpenAI endpoints the proxy does not route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PassthroughTo {
    #[default]
    Strong,
    Weak,
}

/// `passthrough`: other endpoints below `/v1` (embeddings, moderations, ...) that clients
/// may call through the proxy, unrouted, on one model's endpoint and key.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassthroughConfig {
    /// Paths below `/v1`, e.g. `embeddings`; `files/*` for everything below `files/`.
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub to: PassthroughTo,
    /// What a passthrough call's tokens cost, for client keys' budgets: an embedding
    /// model's price is not the chat model's. Required when a key has a budget (0 for free).
    #[serde(default)]
    pub price_per_million_tokens: Option<Price>,
}

/// The endpoints the proxy serves itself, which `passthrough` cannot take over.
const SERVED_PATHS: [&str; 4] = ["chat/completions", "responses", "completions", "models"];

impl PassthroughConfig {
    /// Whether a request path below `/v1` (without the query) may be passed through.
    #[must_use]
    pub fn allows(&self, path: &str) -> bool {
        safe_relative_path(path)
            && self.paths.iter().any(|allowed| match allowed.strip_suffix("/*") {
                Some(prefix) => path
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.len() > 1 && rest.starts_with('/')),
                None => path == allowed,
            })
    }

    fn validate(&self) -> Result<(), Error> {
        for path in &self.paths {
            let literal = path.strip_suffix("/*").unwrap_or(path);
            if path.starts_with('/') || path.starts_with("v1/") {
                return Err(Error::Config(format!(
                    "passthrough.paths: `{path}`: paths are below /v1, e.g. `embeddings` for /v1/embeddings"
                )));
            }
            if !safe_relative_path(literal) {
                return Err(Error::Config(format!(
                    "passthrough.paths: `{path}` is not a plain path (segments of letters, digits, `-`, `_` or `.`, \
                     optionally ending in `/*`)"
                )));
            }
            if SERVED_PATHS.contains(&path.as_str()) {
                return Err(Error::Config(format!(
                    "passthrough.paths: `{path}` is served by the proxy itself"
                )));
            }
        }
        Ok(())
    }
}

/// A path below `/v1` that cannot climb out of it once joined to a base URL: non-empty
/// segments of URL-safe characters, none of them `.` or `..` (URL parsers resolve those,
/// percent-encoded ones too, so `%` is not allowed at all).
fn safe_relative_path(path: &str) -> bool {
    !path.is_empty()
        && path.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '~'))
        })
}

/// Upstream HTTP behaviour.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamFile {
    connect_timeout_secs: Option<f64>,
    request_timeout_secs: Option<f64>,
    stream_first_event_timeout_secs: Option<f64>,
    #[serde(default)]
    forward_headers: Vec<String>,
}

impl UpstreamFile {
    /// The connect, request and stream-first-event timeouts, defaults filled in.
    fn timeouts(&self) -> Result<(Duration, Duration, Option<Duration>), Error> {
        Ok((
            seconds(
                "upstream.connect_timeout_secs",
                self.connect_timeout_secs.unwrap_or(DEFAULT_CONNECT_TIMEOUT_SECS),
            )?,
            seconds(
                "upstream.request_timeout_secs",
                self.request_timeout_secs.unwrap_or(DEFAULT_REQUEST_TIMEOUT_SECS),
            )?,
            self.stream_first_event_timeout_secs
                .map(|secs| seconds("upstream.stream_first_event_timeout_secs", secs))
                .transpose()?,
        ))
    }
}

/// The YAML file, every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    host: Option<String>,
    port: Option<u16>,
    routers: Option<Vec<String>>,
    #[serde(default, deserialize_with = "strong_tier")]
    strong_model: Option<Vec<ModelConfig>>,
    #[serde(default, deserialize_with = "weak_tier")]
    weak_model: Option<Vec<ModelConfig>>,
    #[serde(default)]
    load_balancing: LoadBalancing,
    base_url: Option<String>,
    api_key: Option<Secret>,
    #[serde(default)]
    thresholds: BTreeMap<String, f64>,
    #[serde(default)]
    strong_share: BTreeMap<String, f64>,
    strong_share_window: Option<usize>,
    #[serde(default)]
    providers: BTreeMap<String, ProviderConfig>,
    #[serde(default)]
    upstream: UpstreamFile,
    max_request_bytes: Option<usize>,
    client_timeout_secs: Option<f64>,
    shutdown_timeout_secs: Option<f64>,
    scoring_concurrency: Option<usize>,
    scoring_timeout_ms: Option<u64>,
    #[serde(default)]
    api_keys: Vec<crate::api_keys::ApiKeyEntry>,
    #[serde(default)]
    cors_allowed_origins: Vec<String>,
    #[serde(default)]
    model_aliases: BTreeMap<String, String>,
    routers_dir: Option<PathBuf>,
    log_format: Option<LogFormat>,
    access_log: Option<bool>,
    on_router_error: Option<OnRouterError>,
    on_upstream_error: Option<OnUpstreamError>,
    score_turns: Option<ScoreTurns>,
    prompt_log: Option<crate::prompt_log::PromptLogConfig>,
    #[serde(default)]
    passthrough: PassthroughConfig,
    watch_config_secs: Option<u64>,
    spend_file: Option<PathBuf>,
    shared_state: Option<crate::shared_state::SharedStateConfig>,
    response_cache: Option<crate::cache::CacheConfig>,
    #[serde(default)]
    router_settings: RouterSettings,
}

/// Per-router settings (`router_settings:` in the file).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSettings {
    #[serde(default)]
    pub mf: crate::routers::EmbeddingRouterSettings,
    #[serde(default)]
    pub sw_ranking: crate::routers::EmbeddingRouterSettings,
    #[serde(default)]
    pub bert: crate::routers::BertSettings,
}

impl FileConfig {
    /// Parses the YAML text of a config file.
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_norway::from_str(text).map_err(|error| Error::Config(error.to_string()))
    }

    /// The `host` and `port` the file sets, if it does.
    #[must_use]
    pub fn listen(&self) -> (Option<&str>, Option<u16>) {
        (self.host.as_deref(), self.port)
    }

    /// Reads and parses a config file.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|error| Error::io(path.display().to_string(), error))?;
        Self::from_yaml(&text).map_err(|error| match error {
            // Not "invalid configuration: <file>: invalid configuration: ...".
            Error::Config(message) => Error::Config(format!("{}: {message}", path.display())),
            other => other,
        })
    }
}

/// Values from command-line flags or their environment variables; `None` defers to the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub routers: Option<Vec<String>>,
    pub strong_model: Option<String>,
    pub weak_model: Option<String>,
    pub base_url: Option<String>,
    pub api_key: Option<Secret>,
    pub routers_dir: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub access_log: Option<bool>,
    pub on_router_error: Option<OnRouterError>,
    pub on_upstream_error: Option<OnUpstreamError>,
    pub score_turns: Option<ScoreTurns>,
    /// `--prompt-log`: the file routed prompts are logged to (the file's other
    /// `prompt_log` settings still apply).
    pub prompt_log: Option<PathBuf>,
    /// `--model-alias NAME=MODEL`: added to the file's `model_aliases`, replacing any of the same name.
    pub model_aliases: Vec<(String, String)>,
    /// `--redis-url`: keys' limits and budgets shared in this Redis (the file's other
    /// `shared_state` settings still apply).
    pub redis_url: Option<Secret>,
    /// `--redis-cluster`: that Redis (the flag's or the file's) is a cluster node.
    pub redis_cluster: Option<bool>,
}

/// The file's `shared_state` with `--redis-url` and `--redis-cluster` applied, validated.
fn shared_state_with(
    file: Option<crate::shared_state::SharedStateConfig>,
    redis_url: Option<Secret>,
    cluster: Option<bool>,
) -> Result<Option<crate::shared_state::SharedStateConfig>, Error> {
    use crate::shared_state::SharedStateConfig;
    let shared = match (redis_url, file) {
        (Some(redis_url), Some(file)) => Some(SharedStateConfig { redis_url, ..file }),
        (Some(redis_url), None) => Some(SharedStateConfig::at(redis_url)),
        (None, file) => file,
    };
    let shared = match (shared, cluster) {
        (None, Some(true)) => {
            return Err(Error::Config(
                "--redis-cluster needs a Redis: --redis-url or shared_state in the config".to_owned(),
            ));
        }
        (Some(shared), Some(cluster)) => Some(SharedStateConfig { cluster, ..shared }),
        (shared, _) => shared,
    };
    shared
        .map(|shared| shared.validate(&|name| std::env::var(name).ok()))
        .transpose()
}

/// The validated configuration everything else is built from.
#[derive(Debug, Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub routers: Vec<String>,
    /// The strong tier's deployments (usually one model).
    pub strong_model: Deployments,
    /// The weak tier's deployments (usually one model).
    pub weak_model: Deployments,
    /// How requests are spread over a tier's deployments.
    pub load_balancing: LoadBalancing,
    /// `--base-url`/`--api-key`: applied to both models.
    pub global: GlobalOverrides,
    /// Default thresholds, used for `router-<name>` without a threshold.
    pub thresholds: BTreeMap<String, f64>,
    /// Routers whose default threshold follows their live scores so this share of their
    /// traffic goes to the strong model (`thresholds` is where each starts).
    pub strong_share: BTreeMap<String, f64>,
    /// How many of a router's latest scores `strong_share` looks at.
    pub strong_share_window: usize,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// How long a stream may take to its first event (head included) before its
    /// deployment counts as unavailable; `request_timeout` when unset.
    pub stream_first_event_timeout: Option<Duration>,
    /// Client request headers passed on to the models (tracing ids and the like); none by default.
    pub forward_headers: Vec<HeaderName>,
    pub max_request_bytes: usize,
    /// How long a client may take to send a request's head, and then its body.
    pub client_timeout: Duration,
    /// How long open requests may run on after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// How many requests a CPU-bound router (MiniLM, `sw_ranking`) scores at once; the rest
    /// wait their turn. Defaults to the machine's cores.
    pub scoring_concurrency: usize,
    /// How long a request may wait for its score (queueing for a scoring slot included)
    /// before `on_router_error` decides; none by default.
    pub scoring_timeout: Option<Duration>,
    /// When non-empty, clients must send one of these as `Authorization: Bearer <key>`;
    /// each with its name, rate limits and allowed models.
    pub api_keys: Vec<crate::api_keys::ApiKeySpec>,
    /// Origins whose browser pages may call the API (`*` for any); none by default.
    pub cors_allowed_origins: Vec<String>,
    /// Names a request's `model` may use for a router (with or without a threshold) or a
    /// configured model, so the routing policy lives in one place instead of every client.
    pub model_aliases: BTreeMap<String, String>,
    /// Where trained router artifacts live.
    pub routers_dir: PathBuf,
    pub log_format: LogFormat,
    /// One log line per request (target `routellm::access`) at info level.
    pub access_log: bool,
    /// Which model answers a routed request whose router failed to score it, or `error`.
    pub on_router_error: OnRouterError,
    /// Whether a routed request whose model is unavailable is sent to the other model.
    pub on_upstream_error: OnUpstreamError,
    /// Which user turns a router scores.
    pub score_turns: ScoreTurns,
    /// Where (and how much of) routed traffic's scored prompts are logged; off when `None`.
    pub prompt_log: Option<crate::prompt_log::PromptLogConfig>,
    /// Other endpoints below `/v1` passed to one model unrouted; none by default.
    pub passthrough: PassthroughConfig,
    /// How often `serve` looks at its config file for changes to reload (as on SIGHUP); off by default.
    pub watch_config: Option<Duration>,
    /// Where client keys' spend is kept across restarts (for their budgets); none by default.
    pub spend_file: Option<PathBuf>,
    /// Keys' rate limits and budgets kept in Redis, shared by replicas; per process when `None`.
    pub shared_state: Option<crate::shared_state::SharedStateConfig>,
    /// Identical requests answered again from memory; off when `None`.
    pub response_cache: Option<crate::cache::CacheConfig>,
    pub router_settings: RouterSettings,
}

impl Config {
    /// The settings of `self` (a reloaded file) that differ from `running` (what the server
    /// started with) and that only a restart applies — everything but the routing policy
    /// (`thresholds`, `strong_share`, `model_aliases`, `api_keys`, `on_router_error`,
    /// `on_upstream_error`, `score_turns`, `scoring_timeout_ms`), by their names in the file,
    /// so a reload never leaves a changed setting silently unapplied.
    #[must_use]
    pub fn restart_changes(&self, running: &Config) -> Vec<&'static str> {
        fn upstream(config: &Config) -> (Duration, Duration, Option<Duration>, &[HeaderName]) {
            (
                config.connect_timeout,
                config.request_timeout,
                config.stream_first_event_timeout,
                &config.forward_headers,
            )
        }
        [
            ("host", self.host != running.host),
            ("port", self.port != running.port),
            ("routers", self.routers != running.routers),
            ("strong_model", self.strong_model != running.strong_model),
            ("weak_model", self.weak_model != running.weak_model),
            ("base_url/api_key", self.global != running.global),
            ("load_balancing", self.load_balancing != running.load_balancing),
            (
                "strong_share_window",
                self.strong_share_window != running.strong_share_window,
            ),
            ("providers", self.providers != running.providers),
            ("upstream", upstream(self) != upstream(running)),
            ("max_request_bytes", self.max_request_bytes != running.max_request_bytes),
            ("client_timeout_secs", self.client_timeout != running.client_timeout),
            (
                "shutdown_timeout_secs",
                self.shutdown_timeout != running.shutdown_timeout,
            ),
            (
                "scoring_concurrency",
                self.scoring_concurrency != running.scoring_concurrency,
            ),
            (
                "cors_allowed_origins",
                self.cors_allowed_origins != running.cors_allowed_origins,
            ),
            ("routers_dir", self.routers_dir != running.routers_dir),
            ("log_format", self.log_format != running.log_format),
            ("access_log", self.access_log != running.access_log),
            ("prompt_log", self.prompt_log != running.prompt_log),
            ("passthrough", self.passthrough != running.passthrough),
            ("watch_config_secs", self.watch_config != running.watch_config),
            ("spend_file", self.spend_file != running.spend_file),
            ("shared_state", self.shared_state != running.shared_state),
            ("response_cache", self.response_cache != running.response_cache),
            ("router_settings", self.router_settings != running.router_settings),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    /// Merges the file (if any) with the overrides and validates the result.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self, Error> {
        let file = match file {
            Some(path) => FileConfig::read(path)?,
            None => FileConfig::default(),
        };
        Self::merge(file, overrides)
    }

    /// Merges an already parsed file with the overrides and validates the result.
    pub fn merge(file: FileConfig, overrides: Overrides) -> Result<Self, Error> {
        let strong_model = Deployments::merge(
            overrides.strong_model,
            file.strong_model,
            "strong_model",
            DEFAULT_STRONG_MODEL,
        )?;
        let weak_model = Deployments::merge(overrides.weak_model, file.weak_model, "weak_model", DEFAULT_WEAK_MODEL)?;
        let (connect_timeout, request_timeout, stream_first_event_timeout) = file.upstream.timeouts()?;
        let config = Self {
            host: overrides.host.or(file.host).unwrap_or_else(|| DEFAULT_HOST.to_owned()),
            port: overrides.port.or(file.port).unwrap_or(DEFAULT_PORT),
            routers: overrides
                .routers
                .or(file.routers)
                .unwrap_or_else(|| vec!["random".to_owned()]),
            strong_model,
            weak_model,
            load_balancing: file.load_balancing,
            global: GlobalOverrides {
                base_url: overrides.base_url.or(file.base_url),
                api_key: overrides.api_key.or(file.api_key),
            },
            thresholds: file.thresholds,
            strong_share: file.strong_share,
            strong_share_window: file.strong_share_window.unwrap_or(crate::strong_share::DEFAULT_WINDOW),
            providers: file.providers,
            connect_timeout,
            request_timeout,
            stream_first_event_timeout,
            forward_headers: forward_headers(&file.upstream.forward_headers)?,
            max_request_bytes: file.max_request_bytes.unwrap_or(DEFAULT_MAX_REQUEST_BYTES),
            client_timeout: seconds(
                "client_timeout_secs",
                file.client_timeout_secs.unwrap_or(DEFAULT_CLIENT_TIMEOUT_SECS),
            )?,
            shutdown_timeout: seconds(
                "shutdown_timeout_secs",
                file.shutdown_timeout_secs.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_SECS),
            )?,
            scoring_concurrency: file
                .scoring_concurrency
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, std::num::NonZero::get)),
            scoring_timeout: match file.scoring_timeout_ms {
                Some(0) => return Err(Error::Config("scoring_timeout_ms must be positive".into())),
                Some(ms) if ms > MAX_SCORING_TIMEOUT_MS => {
                    return Err(Error::Config(format!(
                        "scoring_timeout_ms = {ms} is over {MAX_SCORING_TIMEOUT_MS} (ten minutes)"
                    )));
                }
                ms => ms.map(Duration::from_millis),
            },
            api_keys: crate::api_keys::validate(file.api_keys, &|name| std::env::var(name).ok())?,
            cors_allowed_origins: file.cors_allowed_origins,
            model_aliases: {
                let mut aliases = file.model_aliases;
                aliases.extend(overrides.model_aliases);
                aliases
            },
            routers_dir: overrides
                .routers_dir
                .or(file.routers_dir)
                .unwrap_or_else(|| PathBuf::from("routers")),
            log_format: overrides.log_format.or(file.log_format).unwrap_or_default(),
            access_log: overrides.access_log.or(file.access_log).unwrap_or(false),
            on_router_error: overrides.on_router_error.or(file.on_router_error).unwrap_or_default(),
            on_upstream_error: overrides
                .on_upstream_error
                .or(file.on_upstream_error)
                .unwrap_or_default(),
            score_turns: overrides.score_turns.or(file.score_turns).unwrap_or_default(),
            prompt_log: match (overrides.prompt_log, file.prompt_log) {
                (Some(path), Some(file)) => Some(crate::prompt_log::PromptLogConfig { path, ..file }),
                (Some(path), None) => Some(crate::prompt_log::PromptLogConfig::at(path)),
                (None, file) => file,
            },
            passthrough: file.passthrough,
            watch_config: match file.watch_config_secs {
                Some(secs) if !(1..=MAX_WATCH_CONFIG_SECS).contains(&secs) => {
                    return Err(Error::Config(format!(
                        "watch_config_secs = {secs} is outside [1, {MAX_WATCH_CONFIG_SECS}]"
                    )));
                }
                secs => secs.map(Duration::from_secs),
            },
            spend_file: file.spend_file,
            shared_state: shared_state_with(file.shared_state, overrides.redis_url, overrides.redis_cluster)?,
            response_cache: file.response_cache,
            router_settings: file.router_settings,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), Error> {
        if let Some(prompt_log) = &self.prompt_log {
            prompt_log.validate()?;
        }
        if let Some(cache) = &self.response_cache {
            cache.validate()?;
        }
        if self.response_cache.is_some_and(|cache| cache.redis) && self.shared_state.is_none() {
            return Err(Error::Config(
                "response_cache.redis keeps answers in the shared state's Redis: configure shared_state \
                 (or --redis-url) too"
                    .into(),
            ));
        }
        if self.shared_state.is_some() && self.spend_file.is_some() {
            return Err(Error::Config(
                "spend_file keeps one process's spend, but with shared_state the keys' spend is kept in Redis:                  leave spend_file out (and let Redis persist its data)"
                    .into(),
            ));
        }
        if self.routers.is_empty() {
            return Err(Error::Config(
                "at least one router is required (e.g. --routers random)".into(),
            ));
        }
        for name in &self.routers {
            if !crate::routers::AVAILABLE.contains(&name.as_str()) {
                return Err(Error::Config(format!(
                    "unknown router `{name}`; available routers: {}",
                    crate::routers::AVAILABLE.join(", ")
                )));
            }
        }
        for (router, threshold) in &self.thresholds {
            if !threshold.is_finite() || !(0.0..=1.0).contains(threshold) {
                return Err(Error::Config(format!(
                    "thresholds.{router} = {threshold} is outside [0, 1]"
                )));
            }
        }
        for (router, share) in &self.strong_share {
            if !share.is_finite() || !(0.0..=1.0).contains(share) {
                return Err(Error::Config(format!(
                    "strong_share.{router} = {share} is outside [0, 1]"
                )));
            }
        }
        let window = crate::strong_share::MIN_TRACKED_SCORES..=crate::strong_share::MAX_WINDOW;
        if !window.contains(&self.strong_share_window) {
            return Err(Error::Config(format!(
                "strong_share_window = {} is outside [{}, {}]",
                self.strong_share_window,
                window.start(),
                window.end()
            )));
        }
        let cooldown = self.load_balancing.cooldown_secs;
        if !(cooldown.is_finite() && (0.1..=3600.0).contains(&cooldown)) {
            return Err(Error::Config(format!(
                "load_balancing.cooldown_secs = {cooldown} is outside [0.1, 3600]"
            )));
        }
        for model in self.strong_model.iter().chain(&self.weak_model) {
            match model.weight {
                Some(weight) if !(1..=MAX_WEIGHT).contains(&weight) => {
                    return Err(Error::Config(format!(
                        "weight of `{}` is {weight}, outside [1, {MAX_WEIGHT}]",
                        model.name
                    )));
                }
                Some(_) if self.load_balancing.strategy == Strategy::Failover => {
                    return Err(Error::Config(format!(
                        "weight of `{}`: weights share requests out under load_balancing.strategy round_robin or \
                         least_busy; failover (the default) takes the deployments in the order listed",
                        model.name
                    )));
                }
                _ => {}
            }
            if let Some(price) = model.price_per_million_tokens
                && !(price.input.is_finite() && price.output.is_finite() && price.input >= 0.0 && price.output >= 0.0)
            {
                return Err(Error::Config(format!(
                    "price_per_million_tokens of `{}`: input and output must be finite and not negative",
                    model.name
                )));
            }
        }
        if self.strong_model.primary().name.trim() == self.weak_model.primary().name.trim() {
            tracing::warn!(model = %self.strong_model.primary().name, "strong and weak model are the same");
        }
        if self.max_request_bytes < 1024 {
            return Err(Error::Config("max_request_bytes must be at least 1024".into()));
        }
        if self.scoring_concurrency == 0 {
            return Err(Error::Config("scoring_concurrency must be at least 1".into()));
        }
        validate_origins(&self.cors_allowed_origins)?;
        self.passthrough.validate()?;
        validate_aliases(&self.model_aliases)?;
        Ok(())
    }
}

/// The aliases' shape; whether each names a loaded router or a configured model is
/// checked when the gateway is built.
fn validate_aliases(aliases: &BTreeMap<String, String>) -> Result<(), Error> {
    for (alias, target) in aliases {
        if alias.trim().is_empty() || alias.trim() != alias {
            return Err(Error::Config(format!(
                "model_aliases: `{alias}` is not a usable model name (empty, or with spaces around it)"
            )));
        }
        // A `router-…` name already means a router; letting an alias redefine it would
        // make the same name route differently on different deployments.
        if alias.starts_with("router-") {
            return Err(Error::Config(format!(
                "model_aliases: `{alias}` starts with `router-`, which names a router and threshold by itself"
            )));
        }
        if aliases.contains_key(target) {
            return Err(Error::Config(format!(
                "model_aliases.{alias}: `{target}` is itself an alias; name the router or model directly"
            )));
        }
        crate::model_name::parse(target).map_err(|error| Error::Config(format!("model_aliases.{alias}: {error}")))?;
    }
    Ok(())
}

/// `*` alone, or origins as browsers send them: `scheme://host[:port]`, nothing after.
fn validate_origins(origins: &[String]) -> Result<(), Error> {
    if origins.iter().any(|origin| origin == "*") {
        if origins.len() > 1 {
            return Err(Error::Config(
                "cors_allowed_origins: `*` allows every origin and cannot be listed with others".into(),
            ));
        }
        return Ok(());
    }
    for origin in origins {
        let well_formed = origin.split_once("://").is_some_and(|(scheme, rest)| {
            !scheme.is_empty()
                && !rest.is_empty()
                && !rest.contains(['/', '?', '#', ' '])
                && HeaderValue::from_str(origin).is_ok()
        });
        if !well_formed {
            return Err(Error::Config(format!(
                "cors_allowed_origins: `{origin}` is not an origin (scheme://host[:port], e.g. https://app.example.com)"
            )));
        }
    }
    Ok(())
}

/// Besides the hop-by-hop headers: the body's framing, which the HTTP client sets for each
/// request itself, and `accept-encoding`, since streams are read as they pass (a compressed
/// one could not be watched for its end or its usage).
const FRAMING_HEADERS: &[&str] = &[
    "content-length",
    "content-type",
    "content-encoding",
    "host",
    "accept",
    "accept-encoding",
];

/// Why a header name cannot be configured for the models, if it cannot: the proxy sets it.
#[must_use]
pub fn reserved_header(name: &HeaderName) -> Option<&'static str> {
    match name.as_str() {
        "authorization" | "proxy-authorization" => {
            Some("the models get their own key (`api_key`); a client's Authorization is for the proxy")
        }
        other if crate::upstream::HOP_BY_HOP.contains(&other) || FRAMING_HEADERS.contains(&other) => {
            Some("the proxy sets it for each request")
        }
        _ => None,
    }
}

/// Parses a header name from the config, refusing the ones the proxy must set itself.
pub fn header_name(key: &str, name: &str) -> Result<HeaderName, Error> {
    let parsed = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| Error::Config(format!("{key}: `{name}` is not a valid header name")))?;
    match reserved_header(&parsed) {
        Some(reason) => Err(Error::Config(format!("{key}: `{name}` cannot be set: {reason}"))),
        None => Ok(parsed),
    }
}

fn forward_headers(names: &[String]) -> Result<Vec<HeaderName>, Error> {
    let mut parsed: Vec<HeaderName> = Vec::with_capacity(names.len());
    for name in names {
        let name = header_name("upstream.forward_headers", name)?;
        if !parsed.contains(&name) {
            parsed.push(name);
        }
    }
    Ok(parsed)
}

fn seconds(key: &str, value: f64) -> Result<Duration, Error> {
    // `try_from`: `Duration::from_secs_f64` panics past u64::MAX seconds, which YAML's `1e300` reaches.
    match Duration::try_from_secs_f64(value) {
        Ok(duration) if value > 0.0 => Ok(duration),
        _ => Err(Error::Config(format!("{key} must be a positive number of seconds"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_must_be_positive_and_representable() {
        let with = |value: &str| {
            let file = FileConfig::from_yaml(&format!("upstream:\n  request_timeout_secs: {value}\n")).unwrap();
            Config::merge(file, Overrides::default())
        };
        assert_eq!(with("2.5").unwrap().request_timeout, Duration::from_millis(2500));
        assert_eq!(with("2.5").unwrap().stream_first_event_timeout, None);
        let first_event = |value: &str| {
            let file =
                FileConfig::from_yaml(&format!("upstream:\n  stream_first_event_timeout_secs: {value}\n")).unwrap();
            Config::merge(file, Overrides::default())
        };
        assert_eq!(
            first_event("15").unwrap().stream_first_event_timeout,
            Some(Duration::from_secs(15))
        );
        let error = first_event("0").unwrap_err().to_string();
        assert!(
            error.contains("upstream.stream_first_event_timeout_secs must be a positive number"),
            "{error}"
        );
        for bad in ["0", "-1", ".nan", ".inf", "1e300"] {
            let error = with(bad).unwrap_err().to_string();
            assert!(
                error.contains("upstream.request_timeout_secs must be a positive number"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn forward_headers_are_checked_once_at_start_up() {
        let with = |names: &str| {
            let file = FileConfig::from_yaml(&format!("upstream:\n  forward_headers: {names}\n")).unwrap();
            Config::merge(file, Overrides::default())
        };
        let config = with("[X-Request-Id, traceparent, x-request-id]").unwrap();
        let names: Vec<&str> = config.forward_headers.iter().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-request-id", "traceparent"]);
        let error = with("[Authorization]").unwrap_err().to_string();
        assert!(
            error.contains("upstream.forward_headers") && error.contains("api_key"),
            "{error}"
        );
        for framing in ["content-type", "Host", "accept-encoding", "transfer-encoding"] {
            let error = with(&format!("[{framing}]")).unwrap_err().to_string();
            assert!(error.contains("the proxy sets it"), "{framing}: {error}");
        }
        let error = with("['x y']").unwrap_err().to_string();
        assert!(error.contains("not a valid header name"), "{error}");
        assert!(
            Config::merge(FileConfig::default(), Overrides::default())
                .unwrap()
                .forward_headers
                .is_empty()
        );
    }

    #[test]
    fn prices_are_per_million_tokens_and_must_be_sane() {
        let with = |price: &str| {
            let file = FileConfig::from_yaml(&format!(
                "strong_model: {{name: openai/gpt-4o, price_per_million_tokens: {price}}}\n"
            ))
            .unwrap();
            Config::merge(file, Overrides::default())
        };
        let config = with("{input: 2.5, output: 10}").unwrap();
        let price = config.strong_model.primary().price_per_million_tokens.unwrap();
        assert!((price.cost(1_000_000, 500_000) - 7.5).abs() < 1e-12);
        assert_eq!(config.weak_model.primary().price_per_million_tokens, None);
        for bad in [
            "{input: -1, output: 1}",
            "{input: .nan, output: 1}",
            "{input: 1, output: .inf}",
        ] {
            let error = with(bad).unwrap_err().to_string();
            assert!(
                error.contains("price_per_million_tokens of `openai/gpt-4o`"),
                "{bad}: {error}"
            );
        }
        assert!(FileConfig::from_yaml("strong_model: {name: x, price_per_million_tokens: {input: 1}}").is_err());
    }

    #[test]
    fn a_tier_lists_one_model_or_several_deployments_with_how_to_balance_them() {
        let merge = |yaml: &str| Config::merge(FileConfig::from_yaml(yaml).unwrap(), Overrides::default());
        let config = merge(
            "strong_model: [openai/gpt-4o, {name: groq/gpt-4o, api_key: k, price_per_million_tokens: {input: 1, output: 2}}]\n\
             weak_model: echo/small\nload_balancing: {strategy: round_robin, cooldown_secs: 2.5}\n",
        )
        .unwrap();
        let names: Vec<&str> = config.strong_model.iter().map(|model| model.name.as_str()).collect();
        assert_eq!(names, ["openai/gpt-4o", "groq/gpt-4o"]);
        assert_eq!(config.strong_model.primary().name, "openai/gpt-4o");
        assert_eq!(config.weak_model.len(), 1);
        assert_eq!(config.load_balancing.strategy, Strategy::RoundRobin);
        assert_eq!(config.load_balancing.cooldown(), Duration::from_millis(2500));
        let default = merge("").unwrap().load_balancing;
        assert_eq!((default.strategy, default.cooldown_secs), (Strategy::Failover, 10.0));

        // The flag names one model, replacing the file's list.
        let flag = Overrides {
            strong_model: Some("openai/gpt-4.1".into()),
            ..Overrides::default()
        };
        let file = FileConfig::from_yaml("strong_model: [openai/gpt-4o, groq/gpt-4o]\n").unwrap();
        let config = Config::merge(file, flag).unwrap();
        assert_eq!(config.strong_model.len(), 1);
        assert_eq!(config.strong_model.primary().name, "openai/gpt-4.1");

        let error = merge("weak_model: []\n").unwrap_err().to_string();
        assert!(error.contains("weak_model: list at least one model"), "{error}");
        let seventeen = format!("strong_model: [{}]\n", vec!["openai/gpt-4o"; 17].join(", "));
        let error = merge(&seventeen).unwrap_err().to_string();
        assert!(error.contains("at most 16"), "{error}");
        for bad in [
            "load_balancing: {cooldown_secs: 0}\n",
            "load_balancing: {cooldown_secs: 3601}\n",
        ] {
            let error = merge(bad).unwrap_err().to_string();
            assert!(error.contains("outside [0.1, 3600]"), "{bad}: {error}");
        }
        // Each deployment's price is checked, not only the first's.
        let error =
            merge("strong_model: [openai/a, {name: openai/b, price_per_million_tokens: {input: -1, output: 1}}]\n")
                .unwrap_err()
                .to_string();
        assert!(error.contains("`openai/b`"), "{error}");
        // A typo says where it is and what was meant, not "did not match any variant".
        for (yaml, expected) in [
            (
                "strong_model: {name: openai/x, bogus: 1}\n",
                "strong_model: unknown field `bogus`, expected one of",
            ),
            (
                "weak_model: [openai/x, {name: openai/y, bas_url: z}]\n",
                "weak_model, deployment 2: unknown field `bas_url`",
            ),
            ("strong_model: 5\n", "strong_model: invalid type: integer `5`"),
        ] {
            let error = FileConfig::from_yaml(yaml).unwrap_err().to_string();
            assert!(error.contains(expected), "{yaml}: {error}");
        }
        assert!(FileConfig::from_yaml("load_balancing: {strategy: random}\n").is_err());
        assert!(FileConfig::from_yaml("load_balancing: {retries: 3}\n").is_err());

        // The example documents the keys; uncommented, they load.
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.yaml")).unwrap();
        let uncommented = text
            .replace("strong_model: echo/gpt-4o\n", "")
            .replace(
                "# strong_model:\n#   - {name: openai/gpt-4o}\n#   - {name: azure/gpt-4o, headers: {api-key: \"${AZURE_OPENAI_API_KEY}\"}}",
                "strong_model:\n  - {name: openai/gpt-4o}\n  - {name: acme/gpt-4o}",
            )
            .replace("# load_balancing:\n#   strategy: failover", "load_balancing:\n  strategy: failover")
            .replace("#   cooldown_secs: 10", "  cooldown_secs: 10");
        let config = merge(&uncommented).unwrap();
        assert_eq!(config.strong_model.len(), 2, "{uncommented}");
        assert_eq!(config.load_balancing, LoadBalancing::default());
    }

    #[test]
    fn example_config_parses_and_validates() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.yaml")).unwrap();
        let file = FileConfig::from_yaml(&text).unwrap();
        let config = Config::merge(file, Overrides::default()).unwrap();
        assert_eq!(config.port, 6060);
        assert!(config.routers.contains(&"random".to_owned()));
        assert!(config.thresholds.contains_key("random"));
        assert!(!config.providers.is_empty());
    }

    #[test]
    fn strong_share_is_read_with_its_window_and_range_checked() {
        let merge = |yaml: &str| Config::merge(FileConfig::from_yaml(yaml).unwrap(), Overrides::default());
        let config = merge("strong_share: {mf: 0.3}\n").unwrap();
        assert_eq!(config.strong_share["mf"], 0.3);
        assert_eq!(config.strong_share_window, crate::strong_share::DEFAULT_WINDOW);
        assert_eq!(merge("strong_share_window: 250\n").unwrap().strong_share_window, 250);
        for bad in [
            "strong_share: {mf: -0.1}\n",
            "strong_share: {mf: .nan}\n",
            "strong_share_window: 99\n",
            "strong_share_window: 1000001\n",
        ] {
            let error = merge(bad).unwrap_err();
            assert!(error.to_string().contains("outside"), "{bad}: {error}");
        }
        // The example documents the keys; uncommented, they load.
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.yaml")).unwrap();
        let uncommented = text
            .replace("# strong_share:\n#   mf: 0.3", "strong_share:\n  mf: 0.3")
            .replace("# strong_share_window: 1000", "strong_share_window: 1000")
            .replace("# scoring_timeout_ms: 250", "scoring_timeout_ms: 250")
            .replace("# watch_config_secs: 10", "watch_config_secs: 10")
            .replace(
                "# passthrough:\n#   paths: [embeddings, moderations]\n#   to: strong            # or weak\n#   price",
                "passthrough:\n  paths: [embeddings, moderations]\n  to: strong\n  price",
            );
        assert_ne!(uncommented, text);
        let config = Config::merge(FileConfig::from_yaml(&uncommented).unwrap(), Overrides::default()).unwrap();
        assert_eq!((config.strong_share["mf"], config.strong_share_window), (0.3, 1000));
        assert_eq!(config.scoring_timeout, Some(Duration::from_millis(250)));
        assert!(config.passthrough.allows("moderations"));
        assert!(config.passthrough.price_per_million_tokens.is_some());
        assert_eq!(config.watch_config, Some(Duration::from_secs(10)));
        for bad in ["watch_config_secs: 0\n", "watch_config_secs: 86401\n"] {
            assert!(
                merge(bad).unwrap_err().to_string().contains("outside [1, 86400]"),
                "{bad}"
            );
        }
    }

    #[test]
    fn passthrough_paths_are_plain_and_cannot_climb_out() {
        let merge = |yaml: &str| Config::merge(FileConfig::from_yaml(yaml).unwrap(), Overrides::default());
        let config = merge("passthrough: {paths: [embeddings, files/*, audio/transcriptions]}\n").unwrap();
        let passthrough = &config.passthrough;
        assert_eq!(passthrough.to, PassthroughTo::Strong, "the default");
        for (path, allowed) in [
            ("embeddings", true),
            ("embeddings/x", false),
            ("files/file-1", true),
            ("files/file-1/content", true),
            ("files", false),
            ("files/", false),
            ("filesx/1", false),
            ("files/../fine_tuning/jobs", false),
            ("files/./x", false),
            ("files/%2e%2e/x", false),
            ("files//x", false),
            ("audio/transcriptions", true),
            ("moderations", false),
        ] {
            assert_eq!(passthrough.allows(path), allowed, "{path}");
        }
        for (bad, why) in [
            ("[/v1/embeddings]", "paths are below /v1"),
            ("[v1/embeddings]", "paths are below /v1"),
            ("[chat/completions]", "served by the proxy itself"),
            ("[models]", "served by the proxy itself"),
            ("['files/../x']", "not a plain path"),
            ("['a*b']", "not a plain path"),
            ("['']", "not a plain path"),
        ] {
            let error = merge(&format!("passthrough: {{paths: {bad}}}\n")).unwrap_err();
            assert!(error.to_string().contains(why), "{bad}: {error}");
        }
        assert!(FileConfig::from_yaml("passthrough: {paths: [x], to: other}\n").is_err());
    }

    #[test]
    fn example_api_keys_load_when_uncommented() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.yaml")).unwrap();
        let start = text.find("# api_keys:\n").unwrap();
        // The `# api_keys:` line and its indented entries.
        let mut block = String::new();
        for (index, line) in text[start..].lines().enumerate() {
            if index > 0 && !line.starts_with("#   ") {
                break;
            }
            block.push_str(&line[2..]);
            block.push('\n');
        }
        let file = FileConfig::from_yaml(&block).unwrap();
        let specs = crate::api_keys::validate(file.api_keys, &|name| {
            (name == "TEAM_A_PROXY_KEY").then(|| "sk-team-a".to_owned())
        })
        .unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(
            (
                specs[1].name.as_str(),
                specs[1].key.expose(),
                specs[1].requests_per_minute
            ),
            ("team-a", "sk-team-a", Some(600))
        );
    }

    #[test]
    fn model_aliases_merge_flags_over_the_file_and_are_checked_for_shape() {
        let file = FileConfig::from_yaml("model_aliases: {auto: router-mf-0.8, cheap: groq/llama3}\n").unwrap();
        let overrides = Overrides {
            model_aliases: vec![("auto".into(), "router-random-0.5".into())],
            ..Overrides::default()
        };
        let config = Config::merge(file, overrides).unwrap();
        assert_eq!(config.model_aliases["auto"], "router-random-0.5");
        assert_eq!(config.model_aliases["cheap"], "groq/llama3");
        for (bad, why) in [
            ("{router-x: router-random-0.5}", "starts with `router-`"),
            ("{'': router-random-0.5}", "not a usable model name"),
            ("{' auto': router-random-0.5}", "not a usable model name"),
            ("{a: b, b: router-random}", "itself an alias"),
            ("{auto: router-random-2}", "outside [0, 1]"),
        ] {
            let error = Config::merge(
                FileConfig::from_yaml(&format!("model_aliases: {bad}\n")).unwrap(),
                Overrides::default(),
            )
            .unwrap_err();
            assert!(error.to_string().contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let file = FileConfig::from_yaml(
            "port: 7000\nhost: 127.0.0.1\nstrong_model: openai/gpt-4o\nweak_model: {name: groq/llama3, base_url: http://x/v1}\n",
        )
        .unwrap();
        let overrides = Overrides {
            port: Some(8000),
            ..Overrides::default()
        };
        let config = Config::merge(file, overrides).unwrap();
        assert_eq!(config.port, 8000);
        assert_eq!(config.host, "127.0.0.1");
        assert_eq!(config.strong_model.primary().name, "openai/gpt-4o");
        assert_eq!(config.weak_model.primary().base_url.as_deref(), Some("http://x/v1"));
    }

    #[test]
    fn defaults_match_routellm() {
        let config = Config::merge(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(config.port, DEFAULT_PORT);
        assert_eq!(config.strong_model.primary().name, DEFAULT_STRONG_MODEL);
        assert_eq!(config.weak_model.primary().name, DEFAULT_WEAK_MODEL);
        assert!(config.scoring_concurrency >= 1);
        let file = FileConfig::from_yaml("scoring_concurrency: 3\n").unwrap();
        assert_eq!(
            Config::merge(file, Overrides::default()).unwrap().scoring_concurrency,
            3
        );
    }

    #[test]
    fn an_unavailable_model_fails_the_request_unless_other_model_is_chosen() {
        let default = Config::merge(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(default.on_upstream_error, OnUpstreamError::Fail);
        let file = || FileConfig::from_yaml("on_upstream_error: other_model\n").unwrap();
        assert_eq!(
            Config::merge(file(), Overrides::default()).unwrap().on_upstream_error,
            OnUpstreamError::OtherModel
        );
        let flag = Overrides {
            on_upstream_error: Some(OnUpstreamError::Fail),
            ..Overrides::default()
        };
        assert_eq!(
            Config::merge(file(), flag).unwrap().on_upstream_error,
            OnUpstreamError::Fail
        );
        let error = FileConfig::from_yaml("on_upstream_error: retry\n").unwrap_err();
        assert!(error.to_string().contains("retry"), "{error}");
    }

    #[test]
    fn client_and_shutdown_timeouts_have_defaults_and_must_be_positive() {
        let default = Config::merge(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(default.client_timeout, Duration::from_secs(60));
        assert_eq!(default.shutdown_timeout, Duration::from_secs(30));
        let file = FileConfig::from_yaml("client_timeout_secs: 5\nshutdown_timeout_secs: 0.5\n").unwrap();
        let config = Config::merge(file, Overrides::default()).unwrap();
        assert_eq!(config.client_timeout, Duration::from_secs(5));
        assert_eq!(config.shutdown_timeout, Duration::from_millis(500));
        for key in ["client_timeout_secs", "shutdown_timeout_secs"] {
            let file = FileConfig::from_yaml(&format!("{key}: 0\n")).unwrap();
            let error = Config::merge(file, Overrides::default()).unwrap_err().to_string();
            assert!(error.contains(key), "{error}");
        }
    }

    #[test]
    fn routers_score_the_last_turn_unless_configured_otherwise() {
        let default = Config::merge(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(default.score_turns, ScoreTurns::Last);
        let file = || FileConfig::from_yaml("score_turns: max\n").unwrap();
        assert_eq!(
            Config::merge(file(), Overrides::default()).unwrap().score_turns,
            ScoreTurns::Max
        );
        let flag = Overrides {
            score_turns: Some(ScoreTurns::Last),
            ..Overrides::default()
        };
        assert_eq!(Config::merge(file(), flag).unwrap().score_turns, ScoreTurns::Last);
        let error = FileConfig::from_yaml("score_turns: all\n").unwrap_err();
        assert!(error.to_string().contains("all"), "{error}");
    }

    #[test]
    fn cors_origins_are_star_alone_or_bare_origins() {
        let merge = |yaml: &str| Config::merge(FileConfig::from_yaml(yaml).unwrap(), Overrides::default());
        assert!(merge("").unwrap().cors_allowed_origins.is_empty());
        let config = merge("cors_allowed_origins: ['https://app.example.com', 'http://localhost:3000']\n").unwrap();
        assert_eq!(config.cors_allowed_origins.len(), 2);
        assert!(merge("cors_allowed_origins: ['*']\n").is_ok());
        for bad in [
            "['*', 'https://a.example']",
            "['app.example.com']",
            "['https://app.example.com/']",
            "['https://']",
        ] {
            let error = merge(&format!("cors_allowed_origins: {bad}\n")).unwrap_err();
            assert!(error.to_string().contains("cors_allowed_origins"), "{bad}: {error}");
        }
    }

    #[test]
    fn weights_share_requests_under_round_robin_and_least_busy_only() {
        let merge = |yaml: &str| Config::merge(FileConfig::from_yaml(yaml).unwrap(), Overrides::default());
        let tier = |strategy: &str, weight: u32| {
            format!(
                "strong_model: [{{name: echo/a, weight: {weight}}}, echo/b]\nload_balancing: {{strategy: {strategy}}}\n"
            )
        };
        for strategy in ["round_robin", "least_busy"] {
            let config = merge(&tier(strategy, 3)).unwrap();
            let weights: Vec<Option<u32>> = config.strong_model.iter().map(|model| model.weight).collect();
            assert_eq!(weights, [Some(3), None]);
        }
        for (yaml, expected) in [
            (
                tier("failover", 3),
                "weights share requests out under load_balancing.strategy round_robin",
            ),
            (tier("round_robin", 0), "weight of `echo/a` is 0, outside [1, 1000]"),
            (tier("least_busy", 1001), "weight of `echo/a` is 1001"),
        ] {
            let error = merge(&yaml).unwrap_err().to_string();
            assert!(error.contains(expected), "{yaml}: {error}");
        }
    }

    #[test]
    fn a_reload_names_every_changed_setting_that_needs_a_restart_and_no_policy_setting() {
        let merge = |yaml: &str| Config::merge(FileConfig::from_yaml(yaml).unwrap(), Overrides::default()).unwrap();
        let running = merge("routers: [random]\nthresholds: {random: 0.5}\n");
        // The routing policy is what a reload applies: nothing to restart for.
        let policy = merge(
            "routers: [random]\nthresholds: {random: 0.3}\nstrong_share: {random: 0.2}\n\
             model_aliases: {auto: router-random}\non_router_error: weak\non_upstream_error: other_model\n\
             score_turns: max\nscoring_timeout_ms: 50\n",
        );
        assert_eq!(policy.restart_changes(&running), Vec::<&str>::new());
        for (yaml, expected) in [
            ("port: 7070\n", "port"),
            (
                "weak_model: {name: echo/weak, price_per_million_tokens: {input: 1, output: 2}}\n",
                "weak_model",
            ),
            ("upstream: {request_timeout_secs: 30}\n", "upstream"),
            ("upstream: {forward_headers: [traceparent]}\n", "upstream"),
            ("cors_allowed_origins: ['*']\n", "cors_allowed_origins"),
            ("passthrough: {paths: [embeddings]}\n", "passthrough"),
            ("response_cache: {ttl_secs: 60}\n", "response_cache"),
            ("shared_state: {redis_url: 'redis://127.0.0.1:6379'}\n", "shared_state"),
            ("router_settings: {mf: {artifact: mf-ours}}\n", "router_settings"),
            (
                "providers: {acme: {base_url: 'https://acme.example/v1'}}\n",
                "providers",
            ),
            ("access_log: true\n", "access_log"),
        ] {
            let edited = merge(&format!("routers: [random]\nthresholds: {{random: 0.5}}\n{yaml}"));
            assert_eq!(edited.restart_changes(&running), [expected], "{yaml}");
        }
        let more_routers = merge("routers: [random, length]\nthresholds: {random: 0.5}\n");
        assert_eq!(more_routers.restart_changes(&running), ["routers"]);
    }

    #[test]
    fn shared_state_from_the_example_the_flag_and_not_beside_a_spend_file() {
        let merge = |yaml: &str, overrides: Overrides| Config::merge(FileConfig::from_yaml(yaml).unwrap(), overrides);
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.yaml")).unwrap();
        let uncommented = text
            .replace("# shared_state:\n", "shared_state:\n")
            .replace(
                "#   redis_url: ${ROUTELLM_REDIS_URL}",
                "  redis_url: redis://:pw@redis.internal:6379/1",
            )
            .replace("#   cluster: false", "  cluster: false")
            .replace("#   key_prefix: routellm", "  key_prefix: routellm")
            .replace("#   timeout_ms: 100", "  timeout_ms: 100")
            .replace("#   on_failure: local", "  on_failure: local");
        let shared = merge(&uncommented, Overrides::default())
            .unwrap()
            .shared_state
            .expect("the example's block loads");
        assert_eq!(
            shared,
            crate::shared_state::SharedStateConfig::at(Secret::new("redis://:pw@redis.internal:6379/1".into()))
        );
        // The flag alone, or in place of the file's URL with its other settings kept.
        let flag = || Overrides {
            redis_url: Some(Secret::new("redis://10.0.0.9".into())),
            ..Overrides::default()
        };
        let alone = merge("", flag()).unwrap().shared_state.unwrap();
        assert_eq!(alone.redis_url.expose(), "redis://10.0.0.9");
        let kept = merge("shared_state: {redis_url: 'redis://file', timeout_ms: 40}\n", flag())
            .unwrap()
            .shared_state
            .unwrap();
        assert_eq!((kept.redis_url.expose(), kept.timeout_ms), ("redis://10.0.0.9", 40));
        // --redis-cluster with either URL; the file's setting stands without the flag, and
        // the flag without any Redis is refused.
        let cluster = |redis_url: Option<&str>, on: bool| Overrides {
            redis_url: redis_url.map(|url| Secret::new(url.into())),
            redis_cluster: Some(on),
            ..Overrides::default()
        };
        let file_cluster = "shared_state: {redis_url: 'redis://file', cluster: true}\n";
        let is_cluster =
            |yaml: &str, overrides: Overrides| merge(yaml, overrides).unwrap().shared_state.unwrap().cluster;
        assert!(is_cluster("", cluster(Some("redis://10.0.0.9"), true)));
        assert!(is_cluster(
            "shared_state: {redis_url: 'redis://file'}\n",
            cluster(None, true)
        ));
        assert!(is_cluster(file_cluster, Overrides::default()));
        assert!(is_cluster(file_cluster, flag()));
        assert!(!is_cluster(file_cluster, cluster(None, false)));
        let alone = merge("", cluster(None, true)).unwrap_err().to_string();
        assert!(alone.contains("--redis-cluster needs a Redis"), "{alone}");
        assert_eq!(merge("", cluster(None, false)).unwrap().shared_state, None);
        assert_eq!(merge("", Overrides::default()).unwrap().shared_state, None);
        let both = merge(
            "shared_state: {redis_url: 'redis://127.0.0.1'}\nspend_file: /tmp/spend.json\n",
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(both.contains("leave spend_file out"), "{both}");
    }

    #[test]
    fn response_cache_from_the_example_and_its_bounds() {
        let merge = |yaml: &str| Config::merge(FileConfig::from_yaml(yaml).unwrap(), Overrides::default());
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.yaml")).unwrap();
        let uncommented = text
            .replace("# response_cache:\n", "response_cache:\n")
            .replace("#   ttl_secs: 3600", "  ttl_secs: 3600")
            .replace("#   max_mb: 256", "  max_mb: 256")
            .replace("#   scope: key", "  scope: key")
            .replace("#   coalesce: true", "  coalesce: true")
            .replace("#   redis: false", "  redis: false");
        let cache = merge(&uncommented)
            .unwrap()
            .response_cache
            .expect("the example's block loads");
        assert_eq!(
            cache,
            crate::cache::CacheConfig {
                ttl_secs: 3600,
                max_mb: 256,
                scope: crate::cache::CacheScope::Key,
                coalesce: true,
                redis: false,
            }
        );
        assert_eq!(merge("response_cache: {}\n").unwrap().response_cache, Some(cache));
        let uncoalesced = merge("response_cache: {coalesce: false}\n").unwrap().response_cache;
        assert_eq!(uncoalesced.map(|cache| cache.coalesce), Some(false));
        assert_eq!(merge("").unwrap().response_cache, None);
        for (yaml, expected) in [
            ("response_cache: {ttl_secs: 0}\n", "response_cache.ttl_secs = 0"),
            (
                "response_cache: {ttl_secs: 2592001}\n",
                "response_cache.ttl_secs = 2592001",
            ),
            ("response_cache: {max_mb: 0}\n", "response_cache.max_mb = 0"),
        ] {
            let error = merge(yaml).unwrap_err().to_string();
            assert!(error.contains(expected), "{yaml}: {error}");
        }
        let unshared = merge("response_cache: {redis: true}\n").unwrap_err().to_string();
        assert!(unshared.contains("configure shared_state"), "{unshared}");
        let shared = merge("response_cache: {redis: true}\nshared_state: {redis_url: 'redis://127.0.0.1'}\n").unwrap();
        assert_eq!(shared.response_cache.map(|cache| cache.redis), Some(true));
        assert!(FileConfig::from_yaml("response_cache: {scope: global}\n").is_err());
        assert!(FileConfig::from_yaml("response_cache: {ttl: 60}\n").is_err());
    }

    #[test]
    fn prompt_log_from_the_file_with_the_flag_naming_the_file() {
        assert!(
            Config::merge(FileConfig::default(), Overrides::default())
                .unwrap()
                .prompt_log
                .is_none()
        );
        let file = || FileConfig::from_yaml("prompt_log: {path: a.jsonl, sample_rate: 0.1}\n").unwrap();
        let config = Config::merge(file(), Overrides::default()).unwrap();
        let log = config.prompt_log.unwrap();
        assert_eq!((log.path.to_str(), log.sample_rate), (Some("a.jsonl"), 0.1));
        assert_eq!(log.max_bytes, crate::prompt_log::DEFAULT_MAX_BYTES);
        let flag = Overrides {
            prompt_log: Some(PathBuf::from("b.jsonl")),
            ..Overrides::default()
        };
        let log = Config::merge(file(), flag.clone()).unwrap().prompt_log.unwrap();
        assert_eq!(
            (log.path.to_str(), log.sample_rate),
            (Some("b.jsonl"), 0.1),
            "the file's rate stays"
        );
        let log = Config::merge(FileConfig::default(), flag).unwrap().prompt_log.unwrap();
        assert_eq!(log.sample_rate, 1.0);
        let bad = FileConfig::from_yaml("prompt_log: {path: a.jsonl, sample_rate: 0}\n").unwrap();
        let error = Config::merge(bad, Overrides::default()).unwrap_err();
        assert!(error.to_string().contains("sample_rate"), "{error}");
        assert!(FileConfig::from_yaml("prompt_log: {path: a.jsonl, rate: 1}\n").is_err());
    }

    #[test]
    fn a_failing_router_falls_back_to_strong_unless_configured_otherwise() {
        let default = Config::merge(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(default.on_router_error, OnRouterError::Strong);
        let file = FileConfig::from_yaml("on_router_error: error\n").unwrap();
        let flag = Overrides {
            on_router_error: Some(OnRouterError::Weak),
            ..Overrides::default()
        };
        assert_eq!(Config::merge(file, flag).unwrap().on_router_error, OnRouterError::Weak);
        let error = FileConfig::from_yaml("on_router_error: maybe\n").unwrap_err();
        assert!(error.to_string().contains("maybe"), "{error}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let error = FileConfig::from_yaml("prot: 6060\n").unwrap_err();
        assert!(error.to_string().contains("prot"), "{error}");
        let error = FileConfig::from_yaml("providers: {acme: {base: x}}\n").unwrap_err();
        assert!(error.to_string().contains("base"), "{error}");
    }

    #[test]
    fn invalid_values_are_rejected() {
        for yaml in [
            "routers: [nope]\n",
            "routers: []\n",
            "thresholds: {random: 1.5}\n",
            "upstream: {request_timeout_secs: 0}\n",
            "max_request_bytes: 10\n",
            "scoring_concurrency: 0\n",
            "api_keys: ['']\n",
        ] {
            let file = FileConfig::from_yaml(yaml).unwrap();
            assert!(Config::merge(file, Overrides::default()).is_err(), "{yaml}");
        }
    }

    #[test]
    fn secrets_are_not_debug_printed() {
        let file = FileConfig::from_yaml("api_key: sk-very-secret\napi_keys: [proxy-secret]\n").unwrap();
        let config = Config::merge(file, Overrides::default()).unwrap();
        let printed = format!("{config:?}");
        assert!(
            !printed.contains("sk-very-secret") && !printed.contains("proxy-secret"),
            "{printed}"
        );
        assert_eq!(
            config.global.api_key.as_ref().map(Secret::expose),
            Some("sk-very-secret")
        );
    }
}
