//! RouteLLM-rs: an OpenAI-compatible proxy that scores each prompt locally and sends it
//! to a strong or a weak model.
//!
//! Module map:
//! - [`server`]: the axum HTTP server (`/v1/chat/completions`, `/v1/responses`, `/v1/completions`, `/v1/models`, `/health`, `/metrics`, configured passthrough paths) and [`server::run`].
//! - [`affinity`]: Responses continuations (`previous_response_id`) sent to the model whose provider stored the conversation.
//! - [`api_keys`]: client API keys: names, per-key request and token rate limits (OpenAI's 429s), allowed models.
//! - [`budgets`]: client keys' spending budgets per day, month or in total, kept across restarts in `spend_file`.
//! - [`shared_state`]: keys' rate limits and budgets kept in Redis, so replicas share them (`shared_state`).
//! - [`gateway`]: the routing core shared by the server and the library: score, choose, rewrite, forward; the reloadable routing policy (thresholds, aliases, keys).
//! - [`cache`]: the opt-in response cache: an identical request answered again from memory, bounded, per key;
//!   identical requests in flight wait for one answer (streams read it live); with `redis`, shared by replicas.
//! - [`deployments`]: several endpoints for one tier's model: failover, weighted round robin or least busy, cooldowns after failures, requests in flight.
//! - [`strong_share`]: default thresholds that follow a router's live scores to keep a chosen share on the strong model.
//! - [`model_name`]: parsing `router-<name>-<threshold>` (aliases are resolved by the gateway first).
//! - [`controller`]: routing from Rust code without HTTP ([`Controller`]).
//! - [`metrics`]: Prometheus counters and the overhead histogram at `GET /metrics`.
//! - [`sse`]: server-sent events as they pass: bounded line splitting, and whether a stream reached its final event.
//! - [`usage`]: token usage read off answers and streams as they pass, for the per-tier token counters.
//! - [`routers`]: the [`Router`] trait and the routers (`random`, ...), one file each.
//! - [`request`]: reading a Chat Completions, Responses or legacy Completions request just enough to route it; rewriting `model` byte-exactly.
//! - [`providers`]: LiteLLM-style `<provider>/<model>` names resolved to OpenAI-compatible endpoints.
//! - [`upstream`]: forwarding to a model, streaming passthrough, SSE error events.
//! - [`echo`]: the offline `echo/<name>` provider for trying the router without keys.
//! - [`eval`]: `routellm eval`: benchmarks, metrics (APGR, AUC, CPT, bootstrap CIs), plots.
//! - [`scoring`]: batch scoring on all cores and threshold calibration (`score`, `calibrate`).
//! - [`prompts`]: reading prompt files (JSONL `prompt`/`messages`, or plain text).
//! - [`label`]: `routellm label`: a team's own prompts answered by both models and judged by a third, as battles for `train` and rows for `eval`.
//! - [`prompt_log`]: the opt-in log of what routers scored on live traffic, in the prompt-file format, for recalibrating
//!   (and, with `conversations`, the whole conversation, for `label`).
//! - [`progress`]: a progress bar for long scoring runs.
//! - [`embed`]: the `Embedder` trait: static table (default), MiniLM (own BERT forward pass, and the
//!   backward pass of its top layer for fine-tuning), OpenAI-compatible API.
//! - [`features`]: hand-made prompt features (length, structure, code/maths markers).
//! - [`train`]: `routellm train mf | sw_ranking | bert`: battles and correctness data, fitting, validation, artifacts.
//! - [`config`]: YAML, environment and flags merged and validated once.
//! - [`error`]: the one error enum and its OpenAI-shaped JSON.
//! - [`mock_upstream`]: a canned upstream for load tests (`routellm mock-upstream`).
//! - [`rng`]: SplitMix64 and FNV-1a, the deterministic draws and hashes everything shares.
//! - [`artifact`]: safetensors reading and writing shared by every artifact under `routers/`.
//! - [`cli`]: the `routellm` command line.

pub mod affinity;
pub mod api_keys;
pub mod artifact;
pub mod budgets;
pub mod cache;
pub mod cli;
pub mod config;
pub mod controller;
pub mod deployments;
pub mod echo;
pub mod embed;
pub mod error;
pub mod eval;
pub mod features;
pub mod gateway;
pub mod label;
pub mod metrics;
pub mod mock_upstream;
pub mod model_name;
pub mod progress;
pub mod prompt_log;
pub mod prompts;
pub mod providers;
pub mod request;
pub mod rng;
pub mod routers;
pub mod scoring;
pub mod server;
pub mod shared_state;
pub mod sse;
pub mod strong_share;
pub mod train;
pub mod upstream;
pub mod usage;

/// Seconds since the Unix epoch (0 on a clock set before it): timestamps in answers and
/// logs, and the calendar the budgets' periods follow.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Milliseconds since the Unix epoch: what replicas sharing state (`shared_state`) tell each
/// other times in.
pub(crate) fn unix_now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
}

pub use config::Config;
pub use controller::Controller;
pub use error::Error;
pub use gateway::{Gateway, RouteDecision, Tier};
pub use routers::Router;
