//! Client keys' rate limits and budgets kept in Redis (`shared_state`), so that every
//! replica behind a load balancer admits and charges against the same buckets and spend:
//! a key with `requests_per_minute: 600` gets 600 a minute in all, not 600 per replica.
//!
//! An admission is one Lua script that Redis runs atomically on its own clock: it refills
//! the key's buckets, checks the budget and both rates, and spends one request — the same
//! rules as the per-process buckets in [`crate::api_keys`]. An answer's charge is a second
//! script (tokens off the token bucket, cost onto the period's spend). A bucket that has
//! refilled expires, so Redis holds only keys in use; a period's spend expires a day
//! after the period ends.
//!
//! Every reply is mirrored into the key's local buckets and spend. When Redis cannot be
//! reached (or answers later than `timeout_ms`) a replica goes on from what it last saw,
//! with its own buckets (`on_failure: local`, the default: availability over exactness),
//! or refuses with 503 (`refuse`); it asks Redis again after [`RETRY_AFTER`], and charges
//! it could not send are kept and sent with the next one that goes through.
//!
//! The same Redis carries two more things replicas share: the deployments one of them found
//! unavailable ([`SharedState::announce_cooldown`], read by the others every second), and,
//! with `response_cache.redis`, cached answers ([`crate::cache`]).
//!
//! With `cluster: true` the URL is one node of a Redis Cluster: the client learns the slot
//! map from it and sends each command to the node holding its key. Everything a script
//! touches shares one slot (the client key's name is a hash tag), so both scripts run on a
//! cluster unchanged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use serde::Deserialize;

use crate::config::Secret;
use crate::error::Error;

/// How long after a failure Redis is left alone: requests meanwhile are decided locally at
/// once instead of each waiting out the timeout.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The default prefix of every Redis key the proxy writes.
const DEFAULT_KEY_PREFIX: &str = "routellm";
const DEFAULT_TIMEOUT_MS: u64 = 100;
const MAX_TIMEOUT_MS: u64 = 10_000;

/// What a request gets while Redis cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Decided by this replica's own buckets, which start from what Redis last said.
    #[default]
    Local,
    /// Refused with 503 `limits_unavailable` until Redis answers again.
    Refuse,
}

/// The `shared_state` section of the config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedStateConfig {
    /// `redis://[user:password@]host[:port][/db]`, `rediss://` for TLS (or
    /// `redis+unix:///path`); `${VAR}` reads the environment. Never logged: it may hold a
    /// password.
    pub redis_url: Secret,
    /// For `rediss://`: the PEM certificates to trust instead of the system's (a private CA).
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// The URL is one node of a Redis Cluster (or of a managed service in cluster mode); the
    /// other nodes are found from it. The URL's database must be 0, the only one a cluster has.
    #[serde(default)]
    pub cluster: bool,
    /// What every Redis key the proxy writes begins with, so deployments can share a Redis.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// How long a request waits for Redis before `on_failure` decides.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub on_failure: OnFailure,
}

fn default_key_prefix() -> String {
    DEFAULT_KEY_PREFIX.to_owned()
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

impl SharedStateConfig {
    /// The client for the URL (and CA file), by the client's own parse, so a config that
    /// validates also connects; messages never repeat the URL, which may hold a password.
    fn client(&self) -> Result<redis::Client, Error> {
        let url = self.redis_url.expose();
        let client = match self.certificates()? {
            Some(certificates) => redis::Client::build_with_tls(url, certificates),
            None => redis::Client::open(url),
        };
        client.map_err(|error| {
            Error::Config(format!(
                "shared_state.redis_url is not a Redis URL (redis://host:port/db or rediss:// for TLS): {error}"
            ))
        })
    }

    /// The cluster client seeded by the URL; its password, user and TLS come from the URL.
    fn cluster_client(&self) -> Result<ClusterClient, Error> {
        let mut builder = ClusterClient::builder([self.redis_url.expose()])
            // A request waits `timeout_ms` at most; retrying beyond that only piles up work.
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(u64::try_from(RETRY_AFTER.as_millis()).unwrap_or(u64::MAX));
        if let Some(certificates) = self.certificates()? {
            builder = builder.certs(certificates);
        }
        builder
            .build()
            .map_err(|error| Error::Config(format!("shared_state.redis_url is not a cluster node's URL: {error}")))
    }

    fn certificates(&self) -> Result<Option<redis::TlsCertificates>, Error> {
        let Some(path) = &self.tls_ca_file else {
            return Ok(None);
        };
        let pem = std::fs::read(path)
            .map_err(|error| Error::Config(format!("shared_state.tls_ca_file {}: {error}", path.display())))?;
        Ok(Some(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        }))
    }

    /// The section with only a URL (`--redis-url`), the rest at its defaults.
    #[must_use]
    pub fn at(redis_url: Secret) -> Self {
        Self {
            redis_url,
            tls_ca_file: None,
            cluster: false,
            key_prefix: default_key_prefix(),
            timeout_ms: default_timeout_ms(),
            on_failure: OnFailure::default(),
        }
    }

    /// Expands `${VAR}` in the URL from `env` and checks every setting.
    pub fn validate(mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let url = crate::providers::expand_env("shared_state.redis_url", self.redis_url.expose(), env)?;
        self.redis_url = Secret::new(url);
        if let Some(path) = &self.tls_ca_file
            && !self.redis_url.expose().starts_with("rediss://")
        {
            return Err(Error::Config(format!(
                "shared_state.tls_ca_file ({}) is for TLS: the URL must start with rediss://",
                path.display()
            )));
        }
        let client = self.client()?;
        if self.cluster {
            let info = client.get_connection_info();
            if matches!(info.addr(), redis::ConnectionAddr::Unix(_)) {
                return Err(Error::Config(
                    "shared_state.cluster needs a node's host and port, not a socket path".to_owned(),
                ));
            }
            if info.redis_settings().db() != 0 {
                return Err(Error::Config(format!(
                    "shared_state.cluster: a cluster has only database 0, the URL names database {}",
                    info.redis_settings().db()
                )));
            }
            self.cluster_client()?;
        }
        let prefix_ok = !self.key_prefix.is_empty()
            && self.key_prefix.len() <= 64
            && self
                .key_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
        if !prefix_ok {
            return Err(Error::Config(format!(
                "shared_state.key_prefix `{}` must be 1 to 64 letters, digits, `-`, `_`, `.` or `:`",
                self.key_prefix
            )));
        }
        if !(1..=MAX_TIMEOUT_MS).contains(&self.timeout_ms) {
            return Err(Error::Config(format!(
                "shared_state.timeout_ms = {} is outside [1, {MAX_TIMEOUT_MS}]",
                self.timeout_ms
            )));
        }
        Ok(self)
    }
}

/// Functions both scripts use. A bucket is a hash of its `limit` per minute, its `level`
/// (what may still be spent; below zero after an answer used more tokens than were left)
/// and when that was (`at`, ms on Redis's clock); a missing bucket is full.
const SCRIPT_PRELUDE: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function level_of(key, per_minute)
  local stored = redis.call('HMGET', key, 'limit', 'level', 'at')
  local limit, level, at = tonumber(stored[1]), tonumber(stored[2]), tonumber(stored[3])
  if not (limit and level and at) then return per_minute end
  level = math.min(limit, level + math.max(0, now - at) * limit / 60000)
  -- A new limit keeps what was spent: the level moves by the change.
  if limit ~= per_minute then level = math.min(per_minute, level + per_minute - limit) end
  return level
end

local function store(key, per_minute, level)
  redis.call('HSET', key, 'limit', per_minute, 'level', string.format('%.17g', level), 'at', now)
  -- Once refilled it is the same as missing, so it may go then.
  redis.call('PEXPIRE', key, math.ceil((per_minute - level) * 60000 / per_minute) + 1000)
end

local function text(value)
  if value == nil then return '' end
  return string.format('%.17g', value)
end
";

/// KEYS: the requests bucket, the tokens bucket, the period's spend. ARGV: requests and
/// tokens per minute (0: no limit), the budget (empty: none). Budget first, then tokens,
/// then requests, as the local check does; a refusal spends nothing.
const ADMIT_SCRIPT: &str = r"
local requests_limit, tokens_limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local spent = nil
if ARGV[3] ~= '' then
  spent = tonumber(redis.call('GET', KEYS[3]) or '0')
  if spent >= tonumber(ARGV[3]) then return {'budget', text(spent), '', ''} end
end
local requests, tokens = nil, nil
if requests_limit > 0 then requests = level_of(KEYS[1], requests_limit) end
if tokens_limit > 0 then tokens = level_of(KEYS[2], tokens_limit) end
if tokens ~= nil and tokens < 1 then return {'tokens', text(spent), text(requests), text(tokens)} end
if requests ~= nil and requests < 1 then return {'requests', text(spent), text(requests), text(tokens)} end
if requests ~= nil then
  requests = requests - 1
  store(KEYS[1], requests_limit, requests)
end
return {'admitted', text(spent), text(requests), text(tokens)}
";

/// KEYS: the tokens bucket, the period's spend. ARGV: tokens per minute (0: no limit), the
/// tokens to charge, the cost (empty: none), when the spend may expire (unix s, 0: never).
const CHARGE_SCRIPT: &str = r"
local tokens_limit = tonumber(ARGV[1])
local tokens = nil
if tokens_limit > 0 then
  tokens = level_of(KEYS[1], tokens_limit) - tonumber(ARGV[2])
  store(KEYS[1], tokens_limit, tokens)
end
local spent = ''
if ARGV[3] ~= '' then
  spent = redis.call('INCRBYFLOAT', KEYS[2], ARGV[3])
  if tonumber(ARGV[4]) > 0 then redis.call('EXPIREAT', KEYS[2], ARGV[4]) end
end
return {spent, text(tokens)}
";

/// What Redis decided about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admitted,
    OverBudget,
    OutOfTokens,
    OutOfRequests,
}

/// A key's shared state as Redis left it: the levels of the buckets it has and, when asked
/// about, the period's spend.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Levels {
    pub requests: Option<f64>,
    pub tokens: Option<f64>,
    pub spent: Option<f64>,
}

/// A key's limits, as one admission asks Redis about them.
#[derive(Debug, Clone, Copy)]
pub struct Limits<'a> {
    pub name: &'a str,
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    /// The budget's limit and the label of its current period (`2026-12-07`).
    pub budget: Option<(f64, &'a str)>,
}

/// What one answer costs a key.
#[derive(Debug, Clone, Copy)]
pub struct Charge<'a> {
    pub name: &'a str,
    pub tokens_per_minute: Option<u64>,
    pub tokens: u64,
    /// The cost, the period it is spent in and when that period ends (unix s).
    pub cost: Option<(f64, &'a str, Option<u64>)>,
}

/// Redis did not answer, or not in time; the reason is in the server log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shared state (Redis) is unavailable")]
pub struct Unavailable;

/// One Redis, or the nodes of a cluster.
#[allow(clippy::large_enum_variant, reason = "one per process, made once")]
enum Backend {
    Single(redis::Client),
    Cluster(ClusterClient),
}

/// A connection to either: both reconnect by themselves, and a clone shares the connection.
#[derive(Clone)]
enum Link {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, command: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(command),
            Self::Cluster(connection) => connection.req_packed_command(command),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

/// The connection to Redis and the scripts that keep keys' limits and spend there.
pub struct SharedState {
    backend: Backend,
    /// Made on first use: the connection needs a running Tokio runtime, and a gateway is
    /// also built outside one (`route`, library callers).
    connection: tokio::sync::OnceCell<Link>,
    /// `host:port` (or the socket path; `cluster via host:port`), for logs: never the URL,
    /// which may hold a password.
    address: String,
    key_prefix: String,
    timeout: Duration,
    on_failure: OnFailure,
    admit_script: redis::Script,
    charge_script: redis::Script,
    /// Milliseconds since `epoch` before which Redis is not asked (see [`RETRY_AFTER`]).
    paused_until_ms: AtomicU64,
    epoch: Instant,
    up: AtomicBool,
    errors: AtomicU64,
    local_decisions: AtomicU64,
}

impl std::fmt::Debug for SharedState {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SharedState")
            .field("address", &self.address)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("on_failure", &self.on_failure)
            .finish_non_exhaustive()
    }
}

impl SharedState {
    /// Prepares the connection (made on first use, so a Redis that is down at start-up
    /// only delays sharing).
    pub fn new(config: &SharedStateConfig) -> Result<Self, Error> {
        let client = config.client()?;
        let node = client.get_connection_info().addr().to_string();
        let (backend, address) = if config.cluster {
            (
                Backend::Cluster(config.cluster_client()?),
                format!("cluster via {node}"),
            )
        } else {
            (Backend::Single(client), node)
        };
        Ok(Self {
            backend,
            connection: tokio::sync::OnceCell::new(),
            address,
            key_prefix: config.key_prefix.clone(),
            timeout: Duration::from_millis(config.timeout_ms),
            on_failure: config.on_failure,
            admit_script: redis::Script::new(&format!("{SCRIPT_PRELUDE}{ADMIT_SCRIPT}")),
            charge_script: redis::Script::new(&format!("{SCRIPT_PRELUDE}{CHARGE_SCRIPT}")),
            paused_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            up: AtomicBool::new(true),
            errors: AtomicU64::new(0),
            local_decisions: AtomicU64::new(0),
        })
    }

    /// Where Redis is, for logs (no credentials).
    #[must_use]
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Whether a request is refused while Redis cannot be reached.
    #[must_use]
    pub fn refuses_when_unavailable(&self) -> bool {
        self.on_failure == OnFailure::Refuse
    }

    /// Counts a request decided by this replica alone because Redis was unavailable.
    pub fn count_local_decision(&self) {
        self.local_decisions.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the last call to Redis went through, failed calls, and requests decided
    /// locally: for `/metrics`.
    #[must_use]
    pub fn stats(&self) -> (bool, u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.local_decisions.load(Ordering::Relaxed),
        )
    }

    fn key(&self, name: &str, what: &str) -> String {
        // The braces are a hash tag: a key's buckets and spend share a Redis Cluster slot.
        format!("{}:{{{name}}}:{what}", self.key_prefix)
    }

    /// Admits one request for a key with `limits` as Redis sees it, spending one request.
    pub async fn admit(&self, limits: &Limits<'_>) -> Result<(Verdict, Levels), Unavailable> {
        let (budget, period) = match limits.budget {
            Some((limit, period)) => (limit.to_string(), period),
            None => (String::new(), "total"),
        };
        let reply: Vec<String> = self
            .run(
                &self.admit_script,
                &[
                    self.key(limits.name, "requests"),
                    self.key(limits.name, "tokens"),
                    self.key(limits.name, &format!("spend:{period}")),
                ],
                &[
                    limits.requests_per_minute.unwrap_or(0).to_string(),
                    limits.tokens_per_minute.unwrap_or(0).to_string(),
                    budget,
                ],
            )
            .await?;
        let verdict = match reply.first().map(String::as_str) {
            Some("admitted") => Verdict::Admitted,
            Some("budget") => Verdict::OverBudget,
            Some("tokens") => Verdict::OutOfTokens,
            Some("requests") => Verdict::OutOfRequests,
            other => return Err(self.failed(&format!("unexpected admission reply {other:?}"))),
        };
        let levels = Levels {
            spent: number(&reply, 1),
            requests: number(&reply, 2),
            tokens: number(&reply, 3),
        };
        Ok((verdict, levels))
    }

    /// Charges an answer's tokens and cost to a key in Redis.
    pub async fn charge(&self, charge: &Charge<'_>) -> Result<Levels, Unavailable> {
        let (cost, period, expires) = match charge.cost {
            // A day past the period's end, for replicas whose clocks run behind.
            Some((cost, period, ends)) => (cost.to_string(), period, ends.map_or(0, |ends| ends + 86_400)),
            None => (String::new(), "total", 0),
        };
        let reply: Vec<String> = self
            .run(
                &self.charge_script,
                &[
                    self.key(charge.name, "tokens"),
                    self.key(charge.name, &format!("spend:{period}")),
                ],
                &[
                    charge.tokens_per_minute.unwrap_or(0).to_string(),
                    charge.tokens.to_string(),
                    cost,
                    expires.to_string(),
                ],
            )
            .await?;
        Ok(Levels {
            spent: number(&reply, 0),
            tokens: number(&reply, 1),
            requests: None,
        })
    }

    /// Asks Redis whether it is there (for start-up's log line).
    pub async fn ping(&self) -> Result<(), Unavailable> {
        // Given a second at least: the first connection is made here.
        self.call(self.timeout.max(Duration::from_secs(1)), |mut connection| async move {
            redis::cmd("PING").query_async::<String>(&mut connection).await
        })
        .await
        .map(drop)
    }

    async fn connection(&self) -> Result<&Link, Unavailable> {
        let timeout = self.timeout;
        self.connection
            .get_or_try_init(|| async {
                match &self.backend {
                    Backend::Single(client) => {
                        let config = ConnectionManagerConfig::new()
                            .set_connection_timeout(Some(timeout))
                            .set_response_timeout(Some(timeout))
                            // Reconnects in the background; requests meanwhile are decided locally.
                            .set_number_of_retries(2)
                            .set_max_delay(RETRY_AFTER);
                        ConnectionManager::new_lazy_with_config(client.clone(), config).map(Link::Single)
                    }
                    Backend::Cluster(client) => {
                        let config = redis::cluster::ClusterConfig::new()
                            .set_connection_timeout(timeout)
                            .set_response_timeout(timeout);
                        // Connects (and reads the slot map) in the background, as the manager does.
                        Ok(Link::Cluster(client.get_pending_async_connection_with_config(config)))
                    }
                }
            })
            .await
            .map_err(|error| self.failed(&error.to_string()))
    }

    /// The Redis key of a cached answer (see [`crate::cache`]), by its cache key in hex.
    #[must_use]
    pub fn cache_key(&self, hex: &str) -> String {
        format!("{}:cache:{hex}", self.key_prefix)
    }

    /// Tells the other replicas that a deployment (by `id`, see the gateway) is unavailable
    /// until `until_unix_ms`.
    pub async fn announce_cooldown(&self, id: &str, until_unix_ms: u64, wait: Duration) -> Result<(), Unavailable> {
        let millis = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        let command = redis::cmd("SET")
            .arg(self.cooldown_key(id))
            .arg(until_unix_ms)
            .arg("PX")
            .arg(millis)
            .clone();
        self.call(self.timeout, |mut connection| async move {
            command.query_async::<()>(&mut connection).await
        })
        .await
    }

    /// Withdraws what was announced for a deployment (it answered again).
    pub async fn withdraw_cooldown(&self, id: &str) -> Result<(), Unavailable> {
        let command = redis::cmd("DEL").arg(self.cooldown_key(id)).clone();
        self.call(self.timeout, |mut connection| async move {
            command.query_async::<()>(&mut connection).await
        })
        .await
    }

    fn cooldown_key(&self, id: &str) -> String {
        format!("{}:cooldown:{id}", self.key_prefix)
    }

    /// Until when (unix ms) each deployment of `ids` is announced unavailable, if it is. On a
    /// cluster the keys lie in several slots: the client splits the MGET by node.
    pub async fn cooldowns(&self, ids: &[String]) -> Result<Vec<Option<u64>>, Unavailable> {
        let mut command = redis::cmd("MGET");
        for id in ids {
            command.arg(self.cooldown_key(id));
        }
        self.call(self.timeout, |mut connection| async move {
            command.query_async(&mut connection).await
        })
        .await
    }

    /// The value at `key`, if there is one.
    pub async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, Unavailable> {
        let command = redis::cmd("GET").arg(key).clone();
        self.call(self.timeout, |mut connection| async move {
            command.query_async(&mut connection).await
        })
        .await
    }

    /// Sets `key` to `value` for `ttl`. Given longer than a request waits (at least 2 s): a
    /// large answer takes a while to send, and nobody is waiting on it.
    pub async fn set_bytes(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), Unavailable> {
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let command = redis::cmd("SET").arg(key).arg(value).arg("PX").arg(millis).clone();
        self.call(self.timeout.max(Duration::from_secs(2)), |mut connection| async move {
            command.query_async::<()>(&mut connection).await
        })
        .await
    }

    async fn run(&self, script: &redis::Script, keys: &[String], args: &[String]) -> Result<Vec<String>, Unavailable> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        self.call(self.timeout, |mut connection| async move {
            invocation.invoke_async::<Vec<String>>(&mut connection).await
        })
        .await
    }

    /// Runs `call` on the connection within `timeout`, unless Redis is being left alone
    /// after a failure; a failure (or no answer in time) pauses it for [`RETRY_AFTER`].
    async fn call<T, F, Answer>(&self, timeout: Duration, call: F) -> Result<T, Unavailable>
    where
        F: FnOnce(Link) -> Answer,
        Answer: Future<Output = redis::RedisResult<T>>,
    {
        if self.millis_since_epoch() < self.paused_until_ms.load(Ordering::Relaxed) {
            return Err(Unavailable);
        }
        let connection = self.connection().await?.clone();
        match tokio::time::timeout(timeout, call(connection)).await {
            Ok(Ok(reply)) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(redis = %self.address, "shared state reachable again: limits and budgets are shared");
                }
                Ok(reply)
            }
            Ok(Err(error)) => Err(self.failed(&error.to_string())),
            Err(_) => Err(self.failed(&format!("no answer within {} ms", timeout.as_millis()))),
        }
    }

    fn failed(&self, reason: &str) -> Unavailable {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let until = self.millis_since_epoch() + u64::try_from(RETRY_AFTER.as_millis()).unwrap_or(u64::MAX);
        self.paused_until_ms.store(until, Ordering::Relaxed);
        // Logged when it goes down, not for every request while it is.
        if self.up.swap(false, Ordering::Relaxed) {
            let fallback = match self.on_failure {
                OnFailure::Local => "each replica decides with its own buckets until it answers",
                OnFailure::Refuse => "limited keys are refused (503) until it answers",
            };
            tracing::warn!(redis = %self.address, reason, "shared state unavailable: {fallback}");
        }
        Unavailable
    }

    fn millis_since_epoch(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Field `index` of a script's reply as a number; absent or empty when the key has no such
/// bucket (or its spend was not asked about).
fn number(reply: &[String], index: usize) -> Option<f64> {
    reply
        .get(index)
        .filter(|text| !text.is_empty())
        .and_then(|text| text.parse::<f64>().ok())
        .filter(|value| value.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Result<SharedStateConfig, Error> {
        let parsed: SharedStateConfig =
            serde_norway::from_str(yaml).map_err(|error| Error::Config(error.to_string()))?;
        parsed.validate(&|name| (name == "REDIS_URL").then(|| "redis://:hunter2@10.0.0.5:6380/2".to_owned()))
    }

    #[test]
    fn the_section_is_validated_and_its_url_never_shown() {
        let parsed = config("redis_url: ${REDIS_URL}").unwrap();
        assert_eq!(parsed.key_prefix, "routellm");
        assert_eq!(parsed.timeout_ms, 100);
        assert_eq!(parsed.on_failure, OnFailure::Local);
        assert_eq!(parsed.redis_url.expose(), "redis://:hunter2@10.0.0.5:6380/2");
        assert!(!format!("{parsed:?}").contains("hunter2"));
        let state = SharedState::new(&parsed).unwrap();
        assert_eq!(state.address(), "10.0.0.5:6380");
        assert!(!format!("{state:?}").contains("hunter2"));

        let cluster = config("{redis_url: 'redis://:hunter2@10.0.0.7:7000', cluster: true}").unwrap();
        let state = SharedState::new(&cluster).unwrap();
        assert_eq!(state.address(), "cluster via 10.0.0.7:7000");
        assert!(!format!("{state:?}").contains("hunter2"));

        let refuse = config("{redis_url: 'redis://127.0.0.1', on_failure: refuse, key_prefix: 'team:a'}").unwrap();
        assert!(SharedState::new(&refuse).unwrap().refuses_when_unavailable());
        for (yaml, says) in [
            ("redis_url: 'http://127.0.0.1'", "not a Redis URL"),
            ("{redis_url: 'redis://127.0.0.1', timeout_ms: 0}", "timeout_ms"),
            ("{redis_url: 'redis://127.0.0.1', key_prefix: 'a b'}", "key_prefix"),
            ("{redis_url: 'redis://127.0.0.1', on_failure: maybe}", "unknown variant"),
            ("{redis_url: 'redis://127.0.0.1', prefix: x}", "unknown field"),
            ("redis_url: ${UNSET_VARIABLE}", "UNSET_VARIABLE"),
            (
                "{redis_url: '${REDIS_URL}', cluster: true}",
                "only database 0, the URL names database 2",
            ),
            (
                "{redis_url: 'redis+unix:///run/redis.sock', cluster: true}",
                "not a socket path",
            ),
            (
                "{redis_url: 'redis://127.0.0.1', tls_ca_file: /etc/ssl/ca.pem}",
                "must start with rediss://",
            ),
            (
                "{redis_url: 'rediss://127.0.0.1', tls_ca_file: /nonexistent/ca.pem}",
                "tls_ca_file /nonexistent/ca.pem",
            ),
        ] {
            let message = config(yaml).unwrap_err().to_string();
            assert!(message.contains(says), "{yaml}: {message}");
        }
        // A malformed URL with a password is refused without echoing it.
        let message = config("redis_url: 'redis://:hunter2@host:notaport'")
            .unwrap_err()
            .to_string();
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn keys_share_a_hash_tag_per_client_key() {
        let state = SharedState::new(&config("{redis_url: 'redis://127.0.0.1', key_prefix: 'prod'}").unwrap()).unwrap();
        assert_eq!(state.key("team-a", "requests"), "prod:{team-a}:requests");
        assert_eq!(state.key("team-a", "spend:2026-12"), "prod:{team-a}:spend:2026-12");
    }

    #[test]
    fn replies_are_read_as_numbers_where_there_are_some() {
        let reply = vec!["admitted".to_owned(), String::new(), "4.5".to_owned(), "-12".to_owned()];
        assert_eq!(number(&reply, 1), None);
        assert_eq!(number(&reply, 2), Some(4.5));
        assert_eq!(number(&reply, 3), Some(-12.0));
        assert_eq!(number(&reply, 9), None);
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_reported_then_left_alone_for_a_while() {
        // A port nothing listens on: bound, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let state =
            SharedState::new(&config(&format!("{{redis_url: 'redis://127.0.0.1:{port}', timeout_ms: 200}}")).unwrap())
                .unwrap();
        let limits = Limits {
            name: "team",
            requests_per_minute: Some(1),
            tokens_per_minute: None,
            budget: None,
        };
        assert_eq!(state.admit(&limits).await, Err(Unavailable));
        assert_eq!(state.stats(), (false, 1, 0));
        let started = Instant::now();
        assert_eq!(state.admit(&limits).await, Err(Unavailable));
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "paused: not asked again at once"
        );
        assert_eq!(state.stats().1, 1, "the paused call is not another error");
    }
}
