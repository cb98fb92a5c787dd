//! The OpenAI-compatible HTTP server: `POST /v1/chat/completions` and `POST /v1/responses`
//! (routed alike), `GET /v1/models` and `/v1/models/{id}`, `GET /health`, `GET /metrics`, with OpenAI-shaped
//! errors for everything else.
//!
//! [`run`] serves on a listener it is given and never binds one itself, so the binary
//! chooses the address and tests use `127.0.0.1:0`.

use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;
use tokio::net::TcpListener;

use crate::api_keys::{ApiKey, RateSnapshot, StreamCharge};
use crate::cache::CacheOutcome;
use crate::error::Error;
use crate::gateway::{Completion, Gateway, Policy, RouteDecision, Tier};
use crate::metrics::{
    Metrics, TierLabel, render_api_keys, render_deployments, render_policy, render_prompt_log, render_router_stats,
};
use crate::request::Api;
use crate::upstream::{ByteStream, PassedAnswer, Reply, WholeAnswer};
use crate::usage::{self, SseUsageScanner};

/// Shared, cheaply clonable server state.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

struct Shared {
    gateway: Gateway,
    metrics: Metrics,
}

impl AppState {
    #[must_use]
    pub fn new(gateway: Gateway) -> Self {
        let prices = gateway
            .deployments()
            .map(|(_, deployment)| deployment.upstream.model.price)
            .collect::<Vec<_>>();
        let metrics = Metrics::with_prices(gateway.upstream(Tier::Strong).model.price, prices);
        Self(Arc::new(Shared { gateway, metrics }))
    }

    #[must_use]
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }
}

impl Deref for AppState {
    type Target = Gateway;

    fn deref(&self) -> &Gateway {
        &self.0.gateway
    }
}

/// Response headers that tell the client what the proxy decided.
pub const HEADER_ROUTER: &str = "x-routellm-router";
pub const HEADER_THRESHOLD: &str = "x-routellm-threshold";
pub const HEADER_WIN_RATE: &str = "x-routellm-win-rate";
pub const HEADER_TIER: &str = "x-routellm-tier";
pub const HEADER_MODEL: &str = "x-routellm-model";
/// Present when the proxy chose the model some other way than by the router's score:
/// `router_error` (the router could not score the prompt, `on_router_error` chose; the
/// win-rate header is then absent), `upstream_error` (the chosen model was unavailable,
/// `on_upstream_error` asked the other one), `previous_response` (a Responses request
/// continuing an answer went to the model whose provider stored it), comma-separated.
pub const HEADER_FALLBACK: &str = "x-routellm-fallback";
/// With `response_cache` on, on Chat Completions and Completions answers: `hit` (given
/// again from the cache, with `age` in seconds), `miss`, `refresh` (`Cache-Control:
/// no-cache`) or `bypass` (`no-store`).
pub const HEADER_CACHE: &str = "x-routellm-cache";
/// Microseconds the proxy itself spent on the request, outside the upstream call.
pub const HEADER_OVERHEAD: &str = "x-routellm-overhead-us";
/// The client's request id, logged with its request in the access log.
const REQUEST_ID: &str = "x-request-id";
/// On every answer of the three APIs, errors included: the client's `x-request-id`, or one
/// made up when it sent none, as the access log records it, so a client can quote it. The
/// model's own `x-request-id` passes back untouched beside it.
pub const HEADER_REQUEST_ID: &str = "x-routellm-request-id";

/// Builds the HTTP routes over `state`.
pub fn app(state: AppState) -> Router {
    let cors = cors_layer(state.cors_allowed_origins());
    let router = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/chat/completions", post(chat_completions))
        .route("/v1/responses", post(responses))
        .route("/responses", post(responses))
        .route("/v1/completions", post(completions))
        .route("/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/models", get(list_models))
        .route("/v1/models/{*id}", get(retrieve_model))
        .route("/models/{*id}", get(retrieve_model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(other_route)
        .method_not_allowed_fallback(unknown_route)
        .with_state(state);
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// CORS for browser clients, when origins are configured: preflights are answered before
/// authentication (browsers never send credentials with them), the headers a client asks
/// for are allowed (the OpenAI SDKs send their own `x-stainless-*`), and the routing
/// headers are exposed so a page can read which model answered.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.iter().any(|origin| origin == "*") {
        AllowOrigin::any()
    } else {
        // Validated as header values with the configuration.
        AllowOrigin::list(origins.iter().filter_map(|origin| HeaderValue::from_str(origin).ok()))
    };
    let exposed = [
        HEADER_ROUTER,
        HEADER_THRESHOLD,
        HEADER_WIN_RATE,
        HEADER_TIER,
        HEADER_MODEL,
        HEADER_FALLBACK,
        HEADER_CACHE,
        HEADER_OVERHEAD,
        HEADER_REQUEST_ID,
        REQUEST_ID,
    ]
    .map(HeaderName::from_static);
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers(exposed)
            .max_age(Duration::from_secs(7200)),
    )
}

/// Serves `state` on `listener` until `shutdown` resolves, then drains open requests for
/// up to `shutdown_timeout_secs` and returns, closing what is still open.
///
/// Why not `axum::serve`: it installs no timer in hyper, so hyper's header-read timeout
/// never fires and a client that sends half a request head holds its connection for
/// ever (slowloris), and its graceful shutdown waits for every stream however long.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let shutdown_timeout = state.shutdown_timeout();
    let cooldowns = take_shared_cooldowns(state.clone());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.client_timeout());
    builder.http2().timer(TokioTimer::new());
    let service = TowerToHyperService::new(app(state));
    let connections = GracefulShutdown::new();
    // The connections' tasks, so those still open at the deadline can be stopped.
    let mut tasks = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        while tasks.try_join_next().is_some() {}
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    accept_failed(&error).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Streamed tokens go out as they come, not when Nagle's algorithm has gathered a packet.
        let _ = stream.set_nodelay(true);
        let connection = builder
            .serve_connection(TokioIo::new(stream), service.clone())
            .into_owned();
        let connection = connections.watch(connection);
        tasks.spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let open = connections.count();
    if open > 0 {
        tracing::info!(open, "waiting for open connections to finish");
    }
    if tokio::time::timeout(shutdown_timeout, connections.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tasks.len(),
            seconds = shutdown_timeout.as_secs_f64(),
            "requests still open after shutdown_timeout_secs are cut off"
        );
    }
    tasks.shutdown().await;
    cooldowns.abort();
    Ok(())
}

/// How often a replica reads the cooldowns the others announced (see
/// [`Gateway::take_shared_cooldowns`]): one Redis call a second, and an unavailable
/// deployment passed over by every replica within about that.
pub const SHARED_COOLDOWN_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads the other replicas' deployment cooldowns every [`SHARED_COOLDOWN_POLL`] while the
/// server runs, when there are any to read.
fn take_shared_cooldowns(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(SHARED_COOLDOWN_POLL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if !state.take_shared_cooldowns().await {
                return;
            }
        }
    })
}

/// A failed `accept`: a client that gave up is nothing; anything else (out of file
/// descriptors, say) is logged and retried after a pause rather than spinning.
async fn accept_failed(error: &std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    tracing::error!(error = %error, "accepting a connection failed");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
}

/// The raw request body, read under the configured limit, with an OpenAI-shaped error otherwise.
pub struct BodyBytes(pub Bytes);

impl FromRequest<AppState> for BodyBytes {
    type Rejection = Error;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Error> {
        let limit = state.max_request_bytes();
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<usize>().ok());
        if declared.is_some_and(|length| length > limit) {
            return Err(Error::PayloadTooLarge { limit });
        }
        let timeout = state.client_timeout();
        tokio::time::timeout(timeout, axum::body::to_bytes(request.into_body(), limit))
            .await
            .map_err(|_| Error::ClientTimeout {
                seconds: timeout.as_secs_f64(),
            })?
            .map(BodyBytes)
            .map_err(|error| {
                if std::error::Error::source(&error)
                    .is_some_and(<dyn std::error::Error>::is::<http_body_util::LengthLimitError>)
                {
                    Error::PayloadTooLarge { limit }
                } else {
                    Error::invalid(format!("Could not read the request body: {error}"))
                }
            })
    }
}

async fn chat_completions(state: State<AppState>, headers: HeaderMap, body: Result<BodyBytes, Error>) -> Response {
    complete(Api::ChatCompletions, state, &headers, body).await
}

async fn responses(state: State<AppState>, headers: HeaderMap, body: Result<BodyBytes, Error>) -> Response {
    complete(Api::Responses, state, &headers, body).await
}

async fn completions(state: State<AppState>, headers: HeaderMap, body: Result<BodyBytes, Error>) -> Response {
    complete(Api::Completions, state, &headers, body).await
}

async fn complete(
    api: Api,
    State(state): State<AppState>,
    headers: &HeaderMap,
    body: Result<BodyBytes, Error>,
) -> Response {
    let received = Instant::now();
    let policy = state.policy();
    let answer = async {
        let admitted = admit(&policy, headers).await?;
        let BodyBytes(body) = body?;
        let completion = state
            .complete_under(&policy, admitted.as_ref().map(|(key, _)| key), api, &body, headers)
            .await?;
        Ok::<_, Error>((completion, admitted.map(|admitted| Caller::new(admitted, body.len()))))
    }
    .await;
    let request_id = request_id(headers);
    let mut response = match answer {
        Ok((completion, caller)) => respond(api, completion, caller.as_ref(), received, &request_id, &state),
        Err(error) => {
            let status = error.status();
            state.metrics().record(TierLabel::None, status.as_u16(), None);
            tracing::info!(
                target: "routellm::access",
                api = api.path(),
                request_id = request_id.to_str().ok(),
                status = status.as_u16(),
                error = %error,
                "request refused"
            );
            error.into_response()
        }
    };
    response
        .headers_mut()
        .insert(HeaderName::from_static(HEADER_REQUEST_ID), request_id);
    response
}

/// The id a request is known by: the client's `x-request-id` when it is a plausible id
/// (visible ASCII, at most 200 bytes), else `req_` and 32 hex digits, unique in practice.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    static IDS: std::sync::OnceLock<crate::rng::AtomicSplitMix> = std::sync::OnceLock::new();
    if let Some(id) = headers.get(REQUEST_ID)
        && !id.is_empty()
        && id.len() <= 200
        && id.as_bytes().iter().all(u8::is_ascii_graphic)
    {
        return id.clone();
    }
    // Seeded from entropy, so ids from two replicas or two runs do not collide.
    let ids = IDS.get_or_init(crate::rng::AtomicSplitMix::from_entropy);
    let (high, low) = (ids.next_u64(), ids.next_u64());
    // Hex digits are always a valid header value.
    HeaderValue::from_str(&format!("req_{high:016x}{low:016x}")).unwrap_or(HeaderValue::from_static("req_unknown"))
}

/// The API key a request was admitted under, with its rates at admission and what the
/// request's size tells about its tokens.
struct Caller {
    key: ApiKey,
    rates: RateSnapshot,
    request_bytes: usize,
}

impl Caller {
    fn new((key, rates): (ApiKey, RateSnapshot), request_bytes: usize) -> Self {
        Self {
            key,
            rates,
            request_bytes,
        }
    }

    /// Charges a complete answer: its reported usage, else the estimate; at `price` (the
    /// answering model's) to the key's spend.
    fn charge(&self, reported: Option<usage::Usage>, answer_bytes: usize, price: Option<crate::config::Price>) {
        self.key
            .charge_answer(reported, self.request_bytes, (answer_bytes as u64).div_ceil(4), price);
    }

    /// Puts this key's rate headers in place of the provider's: the client's limits are
    /// the key's, not those of the provider account behind the proxy.
    fn replace_rate_headers(&self, headers: &mut HeaderMap) {
        if !self.key.spec().is_limited() {
            return;
        }
        let providers: Vec<HeaderName> = headers
            .keys()
            .filter(|name| name.as_str().starts_with("x-ratelimit-"))
            .cloned()
            .collect();
        for name in providers {
            headers.remove(name);
        }
        for (name, value) in self.rates.headers() {
            insert(headers, name, &value);
        }
    }
}

fn respond(
    api: Api,
    completion: Completion,
    caller: Option<&Caller>,
    received: Instant,
    request_id: &HeaderValue,
    state: &AppState,
) -> Response {
    let metrics = state.metrics();
    let Completion {
        decision,
        model,
        answered_by,
        deployment,
        price,
        reply,
        upstream_time,
        cache,
    } = completion;
    let overhead = received.elapsed().saturating_sub(upstream_time);
    let status = reply.status();
    let hit_age = match cache {
        Some(CacheOutcome::Hit { age }) => Some(age),
        _ => None,
    };
    let tier = match (hit_age, decision.as_ref().map(|d| d.tier)) {
        (Some(_), _) => TierLabel::Cache,
        (None, Some(Tier::Strong)) => TierLabel::Strong,
        (None, Some(Tier::Weak)) => TierLabel::Weak,
        (None, None) => TierLabel::Direct,
    };
    metrics.record(tier, status.as_u16(), Some(overhead));
    if hit_age.is_none() {
        metrics.record_upstream_time(answered_by, upstream_time);
    }
    if decision.as_ref().is_some_and(|d| d.fallback) {
        metrics.record_router_fallback();
    }
    if let Some(routed) = decision.as_ref().filter(|d| d.upstream_fallback) {
        metrics.record_upstream_fallback(routed.tier.other());
    }
    if decision.as_ref().is_some_and(|d| d.pinned) {
        metrics.record_previous_response_pin();
    }
    // The access log is off unless asked for (`access_log`): at thousands of requests a
    // second a line each costs more than the routing itself. Errors are logged where they happen.
    tracing::info!(
        target: "routellm::access",
        api = api.path(),
        request_id = request_id.to_str().ok(),
        key = caller.map(|caller| caller.key.name()),
        router = decision.as_ref().map(|d| d.router.as_str()),
        win_rate = decision.as_ref().filter(|d| !d.fallback).map(|d| d.win_rate),
        threshold = decision.as_ref().map(|d| d.threshold),
        tier = decision.as_ref().map(|d| d.tier.as_str()),
        fallback = decision.as_ref().and_then(fallback_note),
        model = %model,
        deployment,
        cache = cache.map(CacheOutcome::as_str),
        status = status.as_u16(),
        upstream_ms = upstream_time.as_secs_f64() * 1e3,
        overhead_us = overhead.as_micros(),
        "request"
    );
    let (mut response, mut extra) = match reply {
        // A cached answer spent no tokens: nothing to count or charge (the cache counts what it saved).
        Reply::Complete { status, headers, body } if hit_age.is_some() => {
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = status;
            (response, headers)
        }
        Reply::Complete { status, headers, body } => {
            let reported = usage::of_body(&body).filter(|_| status.is_success());
            if let Some(usage) = reported {
                metrics.record_usage(tier, price, usage);
            }
            if let Some(caller) = caller.filter(|_| status.is_success()) {
                caller.charge(reported, body.len(), price);
            }
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = status;
            (response, headers)
        }
        // An identical stream read along (see `cache::Tape`): the first request's answer, spent once.
        Reply::Stream { status, headers, body } if hit_age.is_some() => {
            let mut response = Response::new(Body::from_stream(body));
            *response.status_mut() = status;
            (response, headers)
        }
        Reply::Stream { status, headers, body } => {
            let charge = caller
                .filter(|_| status.is_success())
                .map(|caller| StreamCharge::new(caller.key.clone(), caller.request_bytes, price));
            let mut response = Response::new(Body::from_stream(counting_usage(
                body,
                state.clone(),
                tier,
                price,
                charge,
            )));
            *response.status_mut() = status;
            (response, headers)
        }
    };
    insert_decision(&mut extra, decision.as_ref(), &model, cache);
    insert(&mut extra, HEADER_OVERHEAD, &overhead.as_micros().to_string());
    if let Some(caller) = caller {
        caller.replace_rate_headers(&mut extra);
    }
    append_headers(&mut response, extra);
    response
}

/// The headers that say what the proxy decided (router, threshold, score, tier, fallback),
/// which model answered, and what the cache did.
fn insert_decision(
    headers: &mut HeaderMap,
    decision: Option<&RouteDecision>,
    model: &str,
    cache: Option<CacheOutcome>,
) {
    if let Some(decision) = decision {
        insert(headers, HEADER_ROUTER, &decision.router);
        insert(headers, HEADER_THRESHOLD, &decision.threshold.to_string());
        if !decision.fallback {
            insert(headers, HEADER_WIN_RATE, &decision.win_rate.to_string());
        }
        if let Some(note) = fallback_note(decision) {
            insert(headers, HEADER_FALLBACK, &note);
        }
        insert(headers, HEADER_TIER, decision.tier.as_str());
    }
    insert(headers, HEADER_MODEL, model);
    if let Some(outcome) = cache {
        insert(headers, HEADER_CACHE, outcome.as_str());
        if let CacheOutcome::Hit { age } = outcome {
            insert(headers, "age", &age.as_secs().to_string());
        }
    }
}

/// How the model was chosen other than by the router's score, if it was: `router_error`,
/// `upstream_error`, or both.
fn fallback_note(decision: &RouteDecision) -> Option<String> {
    let notes: Vec<&str> = [
        (decision.fallback, "router_error"),
        (decision.pinned, "previous_response"),
        (decision.upstream_fallback, "upstream_error"),
    ]
    .iter()
    .filter(|(happened, _)| *happened)
    .map(|(_, what)| *what)
    .collect();
    (!notes.is_empty()).then(|| notes.join(", "))
}

/// Passes the stream through unchanged, counting the tokens of its usage chunk (if the
/// client asked for one) as it goes by; `charge` bills the caller's key when the stream ends.
fn counting_usage(
    body: ByteStream,
    state: AppState,
    tier: TierLabel,
    answered_price: Option<crate::config::Price>,
    mut charge: Option<StreamCharge>,
) -> ByteStream {
    let mut scanner = Some(SseUsageScanner::default());
    Box::pin(body.map(move |chunk| {
        if let (Ok(bytes), Some(active)) = (&chunk, scanner.as_mut()) {
            let usage = active.feed(bytes);
            if let Some(charge) = charge.as_mut() {
                charge.passed(active.data_events());
                if let Some(usage) = usage {
                    charge.reported(usage);
                }
            }
            if let Some(usage) = usage {
                state.metrics().record_usage(tier, answered_price, usage);
                // One usage chunk per stream: stop looking once it has passed.
                scanner = None;
            }
        }
        chunk
    }))
}

/// Adds the upstream's and the proxy's `headers` to the response, every value of each.
fn append_headers(response: &mut Response, headers: HeaderMap) {
    let target = response.headers_mut();
    let mut current = None;
    for (name, value) in headers {
        // A header map yields a name once, then `None` for each further value of it.
        if name.is_some() {
            current = name;
        }
        if let Some(name) = &current {
            target.append(name.clone(), value);
        }
    }
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    // Model and router names come from our own validated config; a value that is not a
    // valid header (control characters) is left out rather than failing the response.
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}

async fn list_models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    // One snapshot for the whole listing, so a reload cannot mix two policies in it.
    let policy = state.policy();
    let caller = match authorize(&policy, &headers) {
        Ok(caller) => caller,
        Err(error) => return error.into_response(),
    };
    let mut data: Vec<serde_json::Value> = state
        .routers()
        .keys()
        .map(|name| {
            // A threshold that follows traffic (`strong_share`) is no fixed name to pin.
            let id = match policy.default_threshold(name) {
                Some(threshold) if policy.strong_share(name).is_none() => format!("router-{name}-{threshold}"),
                _ => format!("router-{name}"),
            };
            router_model(&state, &policy, &id, name)
        })
        .collect();
    // Every deployment's model, once per name (replicas of one model share it).
    let mut listed = std::collections::HashSet::new();
    for (id, deployment) in state.deployments() {
        if listed.insert(deployment.upstream.model.name.as_str()) {
            data.push(configured_model(&state, id.tier, &deployment.upstream));
        }
    }
    // Left out: aliases of routers this server does not load (start-up checked the rest).
    data.extend(
        policy
            .model_aliases()
            .keys()
            .filter_map(|alias| model_object(&state, &policy, None, alias).ok()),
    );
    // A key limited to some models sees only those.
    if let Some(key) = &caller {
        data.retain(|model| {
            let id = model["id"].as_str().unwrap_or_default();
            state
                .target(&policy, id)
                .is_ok_and(|target| key.spec().allows(id, &target))
        });
    }
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{id}`: any name a request may use, `router-<name>` with or without a
/// threshold, a configured model by either of its names, or an alias; 404 `model_not_found` otherwise.
async fn retrieve_model(
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let policy = state.policy();
    match authorize(&policy, &headers).and_then(|caller| model_object(&state, &policy, caller.as_ref(), &id)) {
        Ok(model) => Json(model).into_response(),
        Err(error) => error.into_response(),
    }
}

/// The model object for `id`, a name a request may send as `model` (and, with a key, one
/// that key may use); an alias is described as what it stands for, under its own id, with
/// `alias_for` naming that.
fn model_object(
    state: &AppState,
    policy: &Policy,
    caller: Option<&ApiKey>,
    id: &str,
) -> Result<serde_json::Value, Error> {
    // An alias of a router this server does not load is, to a listing, no model at all.
    let target = state.target(policy, id).map_err(|error| {
        if policy.model_aliases().contains_key(id) {
            Error::ModelNotFound(id.to_owned())
        } else {
            error
        }
    })?;
    if caller.is_some_and(|key| !key.spec().allows(id, &target)) {
        return Err(Error::ModelNotFound(id.to_owned()));
    }
    let mut model = match target {
        crate::model_name::ModelTarget::Routed { router, threshold } if state.routers().contains_key(router) => {
            let mut model = router_model(state, policy, id, router);
            if let Some(threshold) = threshold {
                model["threshold"] = json!(threshold);
            }
            model
        }
        crate::model_name::ModelTarget::Routed { .. } => return Err(Error::ModelNotFound(id.to_owned())),
        crate::model_name::ModelTarget::Direct(model) => state
            .direct(model)
            .map(|named| configured_model(state, named.tier, state.deployment(named)))
            .ok_or_else(|| Error::ModelNotFound(id.to_owned()))?,
    };
    if let Some(target) = policy.model_aliases().get(id) {
        model["id"] = json!(id);
        model["alias_for"] = json!(target);
    }
    Ok(model)
}

fn authorize(policy: &Policy, headers: &HeaderMap) -> Result<Option<ApiKey>, Error> {
    policy.authorize(headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok()))
}

/// Authorizes a request that will reach a model and admits it under its key's rate limits
/// (spending one request): the key with its rates, or `None` when no keys are configured.
async fn admit(policy: &Policy, headers: &HeaderMap) -> Result<Option<(ApiKey, RateSnapshot)>, Error> {
    let Some(key) = authorize(policy, headers)? else {
        return Ok(None);
    };
    let rates = key.admit_request().await?;
    Ok(Some((key, rates)))
}

/// A router as OpenAI's model object, with its default threshold under `policy` (and the
/// share of traffic that threshold follows, with `strong_share`).
fn router_model(state: &AppState, policy: &Policy, id: &str, router: &str) -> serde_json::Value {
    let mut model = json!({
        "id": id,
        "object": "model",
        "created": state.started_at(),
        "owned_by": "routellm",
        "router": router,
        "default_threshold": state.default_threshold_under(policy, router),
    });
    if let Some(share) = policy.strong_share(router) {
        model["strong_share"] = json!(share);
    }
    model
}

/// A configured model (a deployment of `tier`) as OpenAI's model object.
fn configured_model(state: &AppState, tier: Tier, upstream: &crate::upstream::Upstream) -> serde_json::Value {
    json!({
        "id": upstream.model.name,
        "object": "model",
        "created": state.started_at(),
        "owned_by": upstream.model.provider,
        "tier": tier.as_str(),
    })
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = state.metrics().render();
    text.push_str(&render_router_stats(state.router_stats()));
    let policy = state.policy();
    let (applied, refused) = state.reloads();
    text.push_str(&render_policy(
        state
            .routers()
            .keys()
            .filter_map(|router| Some((router.as_str(), state.default_threshold_under(&policy, router)?))),
        state
            .routers()
            .keys()
            .filter_map(|router| Some((router.as_str(), policy.strong_share(router)?))),
        applied,
        refused,
    ));
    if let Some(prompt_log) = state.prompt_log() {
        text.push_str(&render_prompt_log(prompt_log.written(), prompt_log.dropped()));
    }
    if let Some(cache) = state.cache() {
        text.push_str(&crate::metrics::render_cache(&cache.stats()));
    }
    if let Some(shared) = state.shared_state() {
        text.push_str(&crate::metrics::render_shared_state(shared.stats()));
    }
    if !policy.api_keys().is_empty() {
        text.push_str(&render_api_keys(policy.api_keys()));
    }
    text.push_str(&render_deployments(&state));
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "online"}))
}

/// Anything the proxy does not serve itself: an allowed `passthrough` path (below `/v1`, or
/// below `/` for clients whose base URL has no `/v1`) goes to its model unrouted; anything
/// else is OpenAI's 404 `Invalid URL`, without reading the body.
async fn other_route(State(state): State<AppState>, request: Request) -> Response {
    let received = Instant::now();
    let (method, uri) = (request.method().clone(), request.uri().clone());
    let path = uri.path();
    let relative = path.strip_prefix("/v1/").or_else(|| path.strip_prefix('/'));
    let Some(relative) = relative.filter(|relative| state.passes_through(relative)) else {
        return unknown_route(method, uri).await.into_response();
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{relative}?{query}"),
        None => relative.to_owned(),
    };
    let headers = request.headers().clone();
    let policy = state.policy();
    let answer = async {
        let admitted = admit(&policy, &headers).await?;
        let BodyBytes(body) = BodyBytes::from_request(request, &state).await?;
        let caller = admitted.map(|admitted| Caller::new(admitted, body.len()));
        let (model, whole) = state
            .pass_through(method.clone(), &path_and_query, &headers, body)
            .await?;
        Ok::<_, Error>((model.to_owned(), whole, caller))
    }
    .await;
    let request_id = request_id(&headers);
    let status = answer
        .as_ref()
        .map_or_else(Error::status, |(_, passed, _)| passed.status());
    state.metrics().record_passthrough(status.as_u16());
    tracing::info!(
        target: "routellm::access",
        api = relative,
        method = %method,
        request_id = request_id.to_str().ok(),
        key = answer.as_ref().ok().and_then(|(_, _, caller)| caller.as_ref()).map(|caller| caller.key.name()),
        model = answer.as_ref().ok().map(|(model, _, _)| model.as_str()),
        status = status.as_u16(),
        proxy_ms = received.elapsed().as_secs_f64() * 1e3,
        "passthrough"
    );
    let mut response = match answer {
        Ok((model, passed, caller)) => {
            let (status, mut headers, body, usage) = match passed {
                PassedAnswer::Whole(WholeAnswer { status, headers, body }) => {
                    let usage = usage::of_body(&body);
                    (status, headers, Body::from(body), usage)
                }
                PassedAnswer::Streamed { status, headers, body } => (status, headers, Body::from_stream(body), None),
            };
            if let Some(caller) = caller.as_ref().filter(|_| status.is_success()) {
                // An embedding's usage is its prompt; without one, the request's size is the
                // estimate (the answer's bytes, vectors or audio, are no measure of tokens).
                // Passthrough endpoints (embeddings and the like) have prices of their own,
                // which the chat models' do not tell: `passthrough.price_per_million_tokens`.
                caller.charge(usage, 0, state.passthrough_price());
            }
            if let Some(caller) = &caller {
                caller.replace_rate_headers(&mut headers);
            }
            insert(&mut headers, HEADER_MODEL, &model);
            let mut response = Response::new(body);
            *response.status_mut() = status;
            append_headers(&mut response, headers);
            response
        }
        Err(error) => error.into_response(),
    };
    response
        .headers_mut()
        .insert(HeaderName::from_static(HEADER_REQUEST_ID), request_id);
    response
}

async fn unknown_route(method: Method, uri: Uri) -> Error {
    Error::UnknownUrl {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}
