//! Mock upstreams and a proxy on `127.0.0.1:0`, shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used)] // shared test helpers: a panic is the failure report

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{AppendHeaders, IntoResponse, Response};
use axum::routing::post;
use routellm::Gateway;
use routellm::config::{Config, FileConfig, Overrides};
use routellm::routers::{Router as RouterTrait, RouterError};
use routellm::server::{self, AppState};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

/// One request as the mock upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The endpoint asked, below `/v1`: `chat/completions`, `responses` or `completions`.
    pub endpoint: &'static str,
    pub body: Bytes,
    pub headers: HeaderMap,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A fake OpenAI-compatible upstream. Its behaviour is chosen per request by the
/// vendor field `mock` in the body, which also proves unknown fields pass through.
#[derive(Clone, Default)]
pub struct MockState {
    pub name: &'static str,
    pub received: Arc<Mutex<Vec<Received>>>,
    /// Released by the test to let a gated stream send its second chunk.
    pub gate: Arc<Notify>,
    /// Fires when a stream body is dropped (client went away).
    pub dropped: Arc<Mutex<Option<oneshot::Sender<()>>>>,
    /// When set, every request is answered with this status and an OpenAI error body, as
    /// an overloaded or rate-limited provider answers (unlike `mock`, this is per upstream).
    pub unavailable: Arc<Mutex<Option<StatusCode>>>,
    /// When set, every chat answer (its head too) waits this long first, as a stuck or
    /// overloaded replica's does.
    pub delay: Arc<Mutex<Option<Duration>>>,
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    pub state: MockState,
}

impl MockUpstream {
    pub async fn start(name: &'static str) -> Self {
        let state = MockState {
            name,
            ..MockState::default()
        };
        let app = Router::new()
            .route("/v1/chat/completions", post(mock_chat))
            .route("/v1/responses", post(mock_responses))
            .route("/v1/completions", post(mock_completions))
            .fallback(mock_other)
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// From now on, wait `delay` before each chat answer (`None`: answer at once again).
    pub fn set_delay(&self, delay: Option<Duration>) {
        *self.state.delay.lock().unwrap() = delay;
    }

    /// From now on, answer every request with `status` (`None`: answer normally again).
    pub fn set_unavailable(&self, status: Option<StatusCode>) {
        *self.state.unavailable.lock().unwrap() = status;
    }
}

struct DropSignal(Option<oneshot::Sender<()>>);
impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(sender) = self.0.take() {
            let _ = sender.send(());
        }
    }
}

fn chunk(model: &str, content: &str) -> Bytes {
    let event = json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}],
    });
    Bytes::from(format!("data: {event}\n\n"))
}

/// A header with two values, as `set-cookie` or `vary` can come: answers carry both.
const TWO_VALUED: [(&str, &str); 2] = [("x-mock-multi", "one"), ("x-mock-multi", "two")];

/// Records the request; answers for the mock as a whole when it is set unavailable.
fn receive(state: &MockState, endpoint: &'static str, headers: HeaderMap, body: &Bytes) -> Option<Response> {
    state.received.lock().unwrap().push(Received {
        endpoint,
        body: body.clone(),
        headers,
    });
    let status = (*state.unavailable.lock().unwrap())?;
    let error = json!({"error": {"message": format!("{} is unavailable", state.name), "type": "server_error", "param": null, "code": null}});
    // As OpenAI's 429s do, say when to come back.
    let retry_after = (status == StatusCode::TOO_MANY_REQUESTS).then_some([("retry-after-ms", "600")]);
    Some((status, retry_after, axum::Json(error)).into_response())
}

/// For `?mock=stream`: a run's events (`.../runs`, SSE) or else a file's contents (bytes)
/// in two parts, the second only once the test releases the gate; with `?mock=break` the
/// connection breaks there instead.
fn passthrough_stream(state: &MockState, uri: &axum::http::Uri) -> Response {
    let events = uri.path().ends_with("/runs");
    let (content_type, first, second) = if events {
        (
            "text/event-stream",
            "event: thread.run.created\ndata: {\"id\":\"run_1\"}\n\n",
            "event: done\ndata: [DONE]\n\n",
        )
    } else {
        ("application/octet-stream", "part-one;", "part-two")
    };
    let broken = uri.query().is_some_and(|query| query.contains("mock=break"));
    let gate = state.gate.clone();
    let frames = futures_util::stream::unfold(0_u8, move |step| {
        let gate = gate.clone();
        async move {
            let frame: Result<Bytes, std::io::Error> = match step {
                0 => Ok(Bytes::from_static(first.as_bytes())),
                1 => {
                    gate.notified().await;
                    if broken {
                        Err(std::io::Error::other("upstream died"))
                    } else {
                        Ok(Bytes::from_static(second.as_bytes()))
                    }
                }
                _ => return None,
            };
            Some((frame, step + 1))
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from_stream(frames))
        .unwrap()
}

/// Any other endpoint (what `passthrough` sends on): records it as `other` and answers
/// with the method and URI it saw, and for embeddings a usage of 8 prompt tokens; file
/// contents and run events are streamed when asked (see [`passthrough_stream`]).
async fn mock_other(
    State(state): State<MockState>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(unavailable) = receive(&state, "other", headers, &body) {
        return unavailable;
    }
    if uri.query().is_some_and(|query| query.contains("mock=")) {
        return passthrough_stream(&state, &uri);
    }
    let mut answer = json!({"object": "mock", "method": method.as_str(), "uri": uri.to_string(), "from": state.name});
    if uri.path().ends_with("/embeddings") {
        answer["object"] = json!("list");
        answer["data"] = json!([{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}]);
        answer["usage"] = json!({"prompt_tokens": 8, "total_tokens": 8});
    }
    (
        AppendHeaders(TWO_VALUED),
        [("x-ratelimit-remaining-requests", "4999")],
        axum::Json(answer),
    )
        .into_response()
}

/// A Responses API answer; streamed as named events, the usage in `response.completed`.
/// `mock: "break_soon"` kills the stream after its first event; `"truncated"` closes it
/// cleanly there.
async fn mock_responses(State(state): State<MockState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(unavailable) = receive(&state, "responses", headers, &body) {
        return unavailable;
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = request["model"].as_str().unwrap_or("?").to_owned();
    let text = format!("response from {}", state.name);
    let completed = json!({
        "id": format!("resp_{}", state.name), "object": "response", "created_at": 1, "status": "completed", "model": model,
        "output": [{"type": "message", "id": "msg_mock", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": {"input_tokens": 6, "output_tokens": 3, "total_tokens": 9},
    });
    if !request["stream"].as_bool().unwrap_or(false) {
        return axum::Json(completed).into_response();
    }
    let event = |kind: &str, number: usize, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(number);
        Ok::<_, std::io::Error>(Bytes::from(format!("event: {kind}\ndata: {data}\n\n")))
    };
    let delta = json!({"item_id": "msg_mock", "output_index": 0, "content_index": 0, "delta": text});
    let mut frames = vec![event("response.output_text.delta", 0, delta)];
    if request["mock"] == "break_soon" {
        frames.push(Err(std::io::Error::other("upstream died")));
    } else if request["mock"] == "truncated" {
        // Ends cleanly without `response.completed`.
    } else {
        frames.push(event("response.completed", 1, json!({"response": completed})));
    }
    spaced_event_stream(frames)
}

/// A legacy Completions answer; streamed as two `text_completion` chunks (the second with
/// `finish_reason`), the usage chunk when asked for, then `[DONE]`. `mock: "break_soon"`
/// kills the stream after its first chunk; `"truncated"` closes it cleanly there.
async fn mock_completions(State(state): State<MockState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(unavailable) = receive(&state, "completions", headers, &body) {
        return unavailable;
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = request["model"].as_str().unwrap_or("?").to_owned();
    let completion = |text: &str, finish_reason: Value, usage: Option<Value>| {
        let mut completion = json!({
            "id": "cmpl-mock", "object": "text_completion", "created": 1, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish_reason}],
        });
        if let Some(usage) = usage {
            completion["usage"] = usage;
        }
        completion
    };
    let usage = json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5});
    if !request["stream"].as_bool().unwrap_or(false) {
        let text = format!("completion from {}", state.name);
        return axum::Json(completion(&text, json!("stop"), Some(usage))).into_response();
    }
    let frame = |event: Value| Ok::<_, std::io::Error>(Bytes::from(format!("data: {event}\n\n")));
    let mut frames = vec![frame(completion(
        &format!("completion from {}", state.name),
        Value::Null,
        None,
    ))];
    if request["mock"] == "break_soon" {
        frames.push(Err(std::io::Error::other("upstream died")));
    } else if request["mock"] == "truncated" {
        // Ends cleanly before any finish_reason or [DONE].
    } else {
        frames.push(frame(completion(" done", json!("stop"), None)));
        if request["stream_options"]["include_usage"] == true {
            let mut last = completion("", Value::Null, Some(usage));
            last["choices"] = json!([]);
            frames.push(frame(last));
        }
        frames.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
    }
    spaced_event_stream(frames)
}

/// An SSE answer of `frames`, 100 ms apart, so the proxy has flushed one before the next
/// (or the failure) arrives.
fn spaced_event_stream(frames: Vec<Result<Bytes, std::io::Error>>) -> Response {
    let frames = futures_util::StreamExt::then(futures_util::stream::iter(frames), |frame| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        frame
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(frames))
        .unwrap()
}

/// The upstream errors a test can ask for with `"mock": "<behaviour>"`.
fn scripted_refusal(behaviour: &str) -> Option<Response> {
    match behaviour {
        "rate_limited" => {
            let error = json!({"error": {"message": "Rate limit reached", "type": "requests", "param": null, "code": "rate_limit_exceeded"}});
            Some(
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("x-ratelimit-remaining-requests", "0")],
                    axum::Json(error),
                )
                    .into_response(),
            )
        }
        "bad_request" => {
            let error = json!({"error": {"message": "Invalid 'temperature'", "type": "invalid_request_error", "param": "temperature", "code": null}});
            Some((StatusCode::BAD_REQUEST, axum::Json(error)).into_response())
        }
        _ => None,
    }
}

async fn mock_chat(State(state): State<MockState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(unavailable) = receive(&state, "chat/completions", headers, &body) {
        return unavailable;
    }
    let delay = *state.delay.lock().unwrap();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = request["model"].as_str().unwrap_or("?").to_owned();
    let behaviour = request["mock"].as_str().unwrap_or("ok").to_owned();
    let stream = request["stream"].as_bool().unwrap_or(false);
    let include_usage = request["stream_options"]["include_usage"].as_bool().unwrap_or(false);
    if let Some(refusal) = scripted_refusal(&behaviour) {
        return refusal;
    }
    if behaviour == "slow" {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    if !stream {
        let answer = json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("answer from {}", state.name)}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
        });
        return (
            AppendHeaders(TWO_VALUED),
            [("x-request-id", "req-mock")],
            axum::Json(answer),
        )
            .into_response();
    }
    let first = chunk(&model, &format!("from {}", state.name));
    let second = chunk(&model, " done");
    let gate = state.gate.clone();
    let drop_signal = DropSignal(state.dropped.lock().unwrap().take());
    let frames = futures_util::stream::unfold(0_u8, move |step| {
        let gate = gate.clone();
        let first = first.clone();
        let second = second.clone();
        let behaviour = behaviour.clone();
        async move {
            let frame: Result<Bytes, std::io::Error> = match (step, behaviour.as_str()) {
                (0, _) => Ok(first),
                (1, "gated") => {
                    gate.notified().await;
                    Ok(second)
                }
                (1 | 2, "endless") => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(Bytes::from_static(b": keep-alive\n\n"))
                }
                (1, "break_soon") => {
                    // Long enough for the first chunk to be flushed before the connection dies.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Err(std::io::Error::other("upstream died"))
                }
                (1, "break") => {
                    gate.notified().await;
                    Err(std::io::Error::other("upstream died"))
                }
                // Closes cleanly, as a server that swallowed its own failure would, before
                // any finish_reason or [DONE].
                (1, "truncated") => return None,
                (1, "stall") => std::future::pending().await,
                (1, _) => Ok(second),
                // The usage chunk, as OpenAI sends it when asked, split across two writes.
                (2, _) if include_usage => Ok(Bytes::from_static(
                    b"data: {\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tok",
                )),
                (3, _) => Ok(Bytes::from_static(
                    b"ens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n",
                )),
                (2 | 4, _) => Ok(Bytes::from_static(b"data: [DONE]\n\n")),
                _ => return None,
            };
            let next = match (step, behaviour.as_str()) {
                (1.., "endless") => 2,
                (2, _) if !include_usage => 5,
                _ => step + 1,
            };
            Some((frame, next))
        }
    });
    let frames = futures_util::StreamExt::map(frames, move |frame| {
        let _keep = &drop_signal;
        frame
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(frames))
        .unwrap()
}

/// A router that always answers the same win rate, so tests choose the tier exactly.
pub struct FixedRouter(pub f64);
impl RouterTrait for FixedRouter {
    fn strong_win_rate(&self, _prompt: &str) -> Result<f64, RouterError> {
        Ok(self.0)
    }
}

/// A router whose scoring always fails, as one behind an unreachable embeddings endpoint does.
pub struct FailingRouter;
impl RouterTrait for FailingRouter {
    fn strong_win_rate(&self, _prompt: &str) -> Result<f64, RouterError> {
        Err(RouterError::Score("embeddings endpoint unreachable".into()))
    }
}

/// Routers `random` (seeded) and `fixed_high` (0.8).
fn default_routers() -> BTreeMap<String, Arc<dyn RouterTrait>> {
    let mut routers: BTreeMap<String, Arc<dyn RouterTrait>> = BTreeMap::new();
    routers.insert("random".into(), Arc::new(routellm::routers::RandomRouter::with_seed(3)));
    routers.insert("fixed_high".into(), Arc::new(FixedRouter(0.8)));
    routers
}

/// A gateway in front of `strong` and `weak` base URLs, configured by `yaml` after the two models.
fn gateway(strong: &str, weak: &str, yaml: &str, routers: BTreeMap<String, Arc<dyn RouterTrait>>) -> Gateway {
    let file = FileConfig::from_yaml(&format!(
        "strong_model: {{name: openai/strong-model, base_url: '{strong}', api_key: sk-strong}}\n\
         weak_model: {{name: together_ai/weak-model, base_url: '{weak}', api_key: sk-weak}}\n{yaml}"
    ))
    .unwrap();
    let config = Config::merge(file, Overrides::default()).unwrap();
    Gateway::with_routers(&config, routers).unwrap()
}

/// The proxy under test, on its own port, in front of `strong` and `weak` base URLs.
pub struct Proxy {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
}

impl Proxy {
    /// The proxy with routers `random` (seeded) and `fixed_high` (0.8).
    pub async fn start(strong: &str, weak: &str, yaml: &str) -> Self {
        Self::start_with(strong, weak, yaml, default_routers()).await
    }

    /// The proxy serving `routers`, configured by `yaml` after the two models.
    pub async fn start_with(
        strong: &str,
        weak: &str,
        yaml: &str,
        routers: BTreeMap<String, Arc<dyn RouterTrait>>,
    ) -> Self {
        Self::with_gateway(gateway(strong, weak, yaml, routers)).await
    }

    /// The proxy with routers `random` (seeded) and `fixed_high` (0.8), configured by
    /// `yaml` alone (the models included).
    pub async fn start_config(yaml: &str) -> Self {
        let config = Config::merge(FileConfig::from_yaml(yaml).unwrap(), Overrides::default()).unwrap();
        Self::with_gateway(Gateway::with_routers(&config, default_routers()).unwrap()).await
    }

    /// The Prometheus text at `/metrics`.
    pub async fn metrics(&self) -> String {
        let response = self.client.get(self.url("/metrics")).send().await.unwrap();
        response.text().await.unwrap()
    }

    pub async fn with_gateway(gateway: Gateway) -> Self {
        Self::serve_until(gateway, std::future::pending()).await.0
    }

    /// As [`Proxy::start`], but the server shuts down gracefully when `shutdown` resolves;
    /// the handle finishes once it has stopped and drained.
    pub async fn start_until(
        strong: &str,
        weak: &str,
        yaml: &str,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> (Self, JoinHandle<std::io::Result<()>>) {
        Self::serve_until(gateway(strong, weak, yaml, default_routers()), shutdown).await
    }

    async fn serve_until(
        gateway: Gateway,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> (Self, JoinHandle<std::io::Result<()>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(server::run(listener, AppState::new(gateway), shutdown));
        let proxy = Self {
            addr,
            client: reqwest::Client::new(),
        };
        (proxy, server)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The JSON answer to `GET path`.
    pub async fn get_json(&self, path: &str) -> Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn post_chat(&self, body: &str) -> reqwest::Response {
        self.post_json("/v1/chat/completions", body).await
    }

    pub async fn post_json(&self, path: &str, body: &str) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }
}

/// Asserts the OpenAI error shape and returns the error object.
pub async fn openai_error(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    let error = body["error"].clone();
    for key in ["message", "type", "param", "code"] {
        assert!(error.get(key).is_some(), "missing {key} in {body}");
    }
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    error
}

/// The next chunk of a streamed answer, which must arrive within `limit` while the mock
/// upstream still holds the rest back: its arrival proves the proxy passes bytes on as they
/// come instead of waiting for the whole answer.
pub async fn chunk_before_the_rest(
    chunks: &mut (impl futures_util::Stream<Item = reqwest::Result<Bytes>> + Unpin),
    limit: Duration,
) -> Bytes {
    tokio::time::timeout(limit, futures_util::StreamExt::next(chunks))
        .await
        .expect("the first part arrives while the upstream still holds the rest")
        .expect("the stream has a first part")
        .unwrap()
}

/// A port nothing listens on.
pub async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

/// The value of one series (name and labels) in a Prometheus text exposition.
pub fn metric<T: std::str::FromStr<Err: std::fmt::Debug>>(text: &str, series: &str) -> T {
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {series} in {text}"))
        .parse()
        .unwrap()
}
