//! Routing from Rust code, without HTTP: the counterpart of RouteLLM's Python `Controller`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), routellm::Error> {
//! use routellm::{Config, Controller, config::Overrides};
//! let config = Config::merge(Default::default(), Overrides {
//!     strong_model: Some("echo/gpt-4o".into()),
//!     weak_model: Some("echo/mixtral".into()),
//!     ..Overrides::default()
//! })?;
//! let controller = Controller::new(&config)?;
//! let decision = controller.route("Prove that sqrt(2) is irrational", "random", 0.5).await?;
//! println!("{} ({})", decision.model, decision.win_rate);
//! let answer = controller
//!     .chat_completion(&serde_json::json!({
//!         "model": "router-random-0.5",
//!         "messages": [{"role": "user", "content": "Hello"}],
//!     }))
//!     .await?;
//! println!("{}", answer["choices"][0]["message"]["content"]);
//! # Ok(()) }
//! ```

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt, stream};

use crate::config::Config;
use crate::error::Error;
use crate::gateway::{Gateway, RouteDecision};
use crate::request::Api;
use crate::upstream::Reply;

/// Routes prompts, chat completions, Responses API and legacy Completions requests between the configured strong
/// and weak models.
#[derive(Clone)]
pub struct Controller {
    gateway: Arc<Gateway>,
}

impl Controller {
    /// Loads the configured routers and resolves both models.
    pub fn new(config: &Config) -> Result<Self, Error> {
        Ok(Self::from_gateway(Gateway::from_config(config)?))
    }

    #[must_use]
    pub fn from_gateway(gateway: Gateway) -> Self {
        Self {
            gateway: Arc::new(gateway),
        }
    }

    /// Which model `router` would send `prompt` to at `threshold`.
    pub async fn route(&self, prompt: &str, router: &str, threshold: f64) -> Result<RouteDecision, Error> {
        if !threshold.is_finite() || !(0.0..=1.0).contains(&threshold) {
            return Err(Error::invalid_param(
                format!("threshold {threshold} is outside [0, 1]"),
                "threshold",
            ));
        }
        self.gateway.route(router, Some(threshold), prompt.to_owned()).await
    }

    /// A non-streaming chat completion; `request["model"]` is `router-<name>-<threshold>`
    /// or a configured model. Upstream error statuses become [`Error::UpstreamStatus`].
    pub async fn chat_completion(&self, request: &serde_json::Value) -> Result<serde_json::Value, Error> {
        self.answer(Api::ChatCompletions, request).await
    }

    /// A streaming chat completion: each item is one `chat.completion.chunk` event.
    /// An error event from the upstream (or from a broken stream) ends it with an `Err`.
    pub async fn chat_completion_stream(
        &self,
        request: &serde_json::Value,
    ) -> Result<impl Stream<Item = Result<serde_json::Value, Error>> + use<>, Error> {
        self.events(Api::ChatCompletions, request).await
    }

    /// A non-streaming Responses API request (`input` instead of `messages`), routed as
    /// [`Controller::chat_completion`] is; the answer is the `response` object.
    pub async fn response(&self, request: &serde_json::Value) -> Result<serde_json::Value, Error> {
        self.answer(Api::Responses, request).await
    }

    /// A streaming Responses API request: each item is one event (`response.created`, …,
    /// `response.completed`); an `error` event ends it with an `Err`.
    pub async fn response_stream(
        &self,
        request: &serde_json::Value,
    ) -> Result<impl Stream<Item = Result<serde_json::Value, Error>> + use<>, Error> {
        self.events(Api::Responses, request).await
    }

    /// A non-streaming legacy Completions request (`prompt` instead of `messages`), routed
    /// as [`Controller::chat_completion`] is; the answer is the `text_completion` object.
    pub async fn completion(&self, request: &serde_json::Value) -> Result<serde_json::Value, Error> {
        self.answer(Api::Completions, request).await
    }

    /// A streaming legacy Completions request: each item is one `text_completion` chunk.
    pub async fn completion_stream(
        &self,
        request: &serde_json::Value,
    ) -> Result<impl Stream<Item = Result<serde_json::Value, Error>> + use<>, Error> {
        self.events(Api::Completions, request).await
    }

    async fn answer(&self, api: Api, request: &serde_json::Value) -> Result<serde_json::Value, Error> {
        let body = serde_json::to_vec(request).map_err(|error| Error::Internal(error.to_string()))?;
        let completion = self.gateway.complete(api, &body).await?;
        let model = completion.model;
        let body = match completion.reply {
            Reply::Complete { status, body, .. } if status.is_success() => body,
            Reply::Complete { status, body, .. } => {
                return Err(Error::UpstreamStatus {
                    model,
                    status,
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
            }
            Reply::Stream { .. } => {
                let method = match api {
                    Api::ChatCompletions => "chat_completion_stream",
                    Api::Responses => "response_stream",
                    Api::Completions => "completion_stream",
                };
                return Err(Error::invalid_param(
                    format!("this request asks for a stream: use {method}"),
                    "stream",
                ));
            }
        };
        serde_json::from_slice(&body).map_err(|error| Error::UpstreamProtocol {
            model,
            reason: format!("the answer is not JSON: {error}"),
        })
    }

    async fn events(
        &self,
        api: Api,
        request: &serde_json::Value,
    ) -> Result<impl Stream<Item = Result<serde_json::Value, Error>> + use<>, Error> {
        let mut request = request.clone();
        if let Some(object) = request.as_object_mut() {
            object.insert("stream".into(), serde_json::Value::Bool(true));
        }
        let body = serde_json::to_vec(&request).map_err(|error| Error::Internal(error.to_string()))?;
        let completion = self.gateway.complete(api, &body).await?;
        let model = completion.model;
        let bytes = match completion.reply {
            Reply::Stream { body, .. } => body,
            Reply::Complete { status, body, .. } => {
                return Err(Error::UpstreamStatus {
                    model,
                    status,
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
            }
        };
        Ok(
            sse_events(bytes.map(|chunk| chunk.unwrap_or_else(|never| match never {})))
                .map(move |data| event_or_error(&model, &data)),
        )
    }
}

/// One stream event's JSON, or the error it reports: Chat Completions streams report errors
/// as `{"error": {…}}`, Responses streams as an event of type `error`.
fn event_or_error(model: &str, data: &[u8]) -> Result<serde_json::Value, Error> {
    let event: serde_json::Value = serde_json::from_slice(data).map_err(|error| Error::UpstreamProtocol {
        model: model.to_owned(),
        reason: format!("a stream event is not JSON: {error}"),
    })?;
    let error = match event.get("error") {
        Some(error) if !error.is_null() => Some(error),
        _ if event["type"] == "error" => Some(&event),
        _ => None,
    };
    match error {
        Some(error) => Err(Error::UpstreamProtocol {
            model: model.to_owned(),
            reason: error.to_string(),
        }),
        None => Ok(event),
    }
}

/// The `data:` payloads of an SSE byte stream, up to (not including) `[DONE]`.
fn sse_events(bytes: impl Stream<Item = Bytes> + Send + 'static) -> impl Stream<Item = Bytes> + Send {
    let source: Option<std::pin::Pin<Box<dyn Stream<Item = Bytes> + Send>>> = Some(Box::pin(bytes));
    stream::unfold((source, BytesMut::new()), |(mut source, mut buffer)| async move {
        loop {
            if let Some((event_end, separator_end)) = find_event_end(&buffer) {
                let event = buffer.split_to(separator_end);
                let data = event_data(&event[..event_end]);
                if data.as_ref() == b"[DONE]" {
                    return None;
                }
                if !data.is_empty() {
                    return Some((data, (source, buffer)));
                }
                continue;
            }
            let next = source.as_mut()?.next().await;
            if let Some(chunk) = next {
                buffer.extend_from_slice(&chunk);
            } else {
                // A last event without its blank line still counts.
                source = None;
                if buffer.iter().all(u8::is_ascii_whitespace) {
                    return None;
                }
                buffer.extend_from_slice(b"\n\n");
            }
        }
    })
}

/// The joined `data:` lines of one event; comments and other fields are skipped.
fn event_data(event: &[u8]) -> Bytes {
    let mut data = Vec::new();
    for line in event.split(|byte| *byte == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(payload) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(payload.strip_prefix(b" ").unwrap_or(payload));
        }
    }
    Bytes::from(data)
}

/// The end of the first complete event (blank line), as (event end, separator end).
fn find_event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer
        .windows(2)
        .position(|pair| pair == b"\n\n")
        .map(|at| (at, at + 2));
    let crlf = buffer
        .windows(4)
        .position(|quad| quad == b"\r\n\r\n")
        .map(|at| (at, at + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileConfig, Overrides};

    fn controller() -> Controller {
        let config = Config::merge(
            FileConfig::default(),
            Overrides {
                strong_model: Some("echo/big".into()),
                weak_model: Some("echo/small".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        Controller::new(&config).unwrap()
    }

    #[tokio::test]
    async fn route_respects_extreme_thresholds() {
        let controller = controller();
        assert_eq!(controller.route("x", "random", 0.0).await.unwrap().model, "echo/big");
        assert_eq!(controller.route("x", "random", 1.0).await.unwrap().model, "echo/small");
        assert!(controller.route("x", "random", 2.0).await.is_err());
        assert!(controller.route("x", "nope", 0.5).await.is_err());
    }

    #[tokio::test]
    async fn chat_completion_answers_from_the_routed_model() {
        let answer = controller()
            .chat_completion(&serde_json::json!({
                "model": "router-random-0",
                "messages": [{"role": "user", "content": "hi"}],
            }))
            .await
            .unwrap();
        assert_eq!(answer["model"], "big");
    }

    #[tokio::test]
    async fn stream_yields_chunks_until_done() {
        let chunks: Vec<_> = controller()
            .chat_completion_stream(&serde_json::json!({
                "model": "router-random-1",
                "messages": [{"role": "user", "content": "hello world"}],
            }))
            .await
            .unwrap()
            .collect()
            .await;
        assert!(chunks.len() > 2);
        let text: String = chunks
            .iter()
            .map(|chunk| chunk.as_ref().unwrap())
            .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert!(text.contains("echo/small") && text.contains("hello world"), "{text}");
    }

    #[tokio::test]
    async fn sse_parser_handles_split_chunks_crlf_and_trailing_event() {
        let pieces = vec![
            Bytes::from_static(b"data: {\"a\""),
            Bytes::from_static(b":1}\n\n: comment\n\ndata: {\"b\":2}\r\n\r\ndata: {\"c\":3}"),
        ];
        let events: Vec<Bytes> = sse_events(stream::iter(pieces)).collect().await;
        assert_eq!(events, vec![&b"{\"a\":1}"[..], &b"{\"b\":2}"[..], &b"{\"c\":3}"[..]]);
        let done = vec![Bytes::from_static(
            b"data: {\"a\":1}\n\ndata: [DONE]\n\ndata: {\"late\":1}\n\n",
        )];
        let events: Vec<Bytes> = sse_events(stream::iter(done)).collect().await;
        assert_eq!(events.len(), 1);
    }

    #[tokio::test]
    async fn responses_are_answered_and_streamed_by_the_routed_model() {
        let controller = controller();
        let answer = controller
            .response(&serde_json::json!({"model": "router-random-0", "input": "hi"}))
            .await
            .unwrap();
        assert_eq!(answer["object"], "response");
        assert_eq!(answer["model"], "big");
        let events: Vec<serde_json::Value> = controller
            .response_stream(&serde_json::json!({"model": "router-random-1", "input": "hello world"}))
            .await
            .unwrap()
            .map(Result::unwrap)
            .collect()
            .await;
        let text: String = events
            .iter()
            .filter(|event| event["type"] == "response.output_text.delta")
            .filter_map(|event| event["delta"].as_str())
            .collect();
        assert!(text.contains("echo/small") && text.contains("hello world"), "{text}");
        assert_eq!(events.last().unwrap()["type"], "response.completed");
        let error = controller
            .response(&serde_json::json!({"model": "router-random-0", "input": "hi", "stream": true}))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("response_stream"), "{error}");
    }

    #[tokio::test]
    async fn legacy_completions_are_answered_and_streamed_by_the_routed_model() {
        let controller = controller();
        let answer = controller
            .completion(&serde_json::json!({"model": "router-random-0", "prompt": "hi"}))
            .await
            .unwrap();
        assert_eq!(answer["object"], "text_completion");
        assert_eq!(answer["model"], "big");
        let chunks: Vec<serde_json::Value> = controller
            .completion_stream(&serde_json::json!({"model": "router-random-1", "prompt": ["hello world"]}))
            .await
            .unwrap()
            .map(Result::unwrap)
            .collect()
            .await;
        let text: String = chunks
            .iter()
            .filter_map(|chunk| chunk["choices"][0]["text"].as_str())
            .collect();
        assert!(text.contains("echo/small") && text.contains("hello world"), "{text}");
        let error = controller
            .completion(&serde_json::json!({"model": "router-random-0", "prompt": [50256]}))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("token ids"), "{error}");
    }

    #[test]
    fn error_events_of_either_api_become_errs() {
        let chat = event_or_error("m", br#"{"error":{"message":"boom","type":"upstream_error"}}"#).unwrap_err();
        assert!(chat.to_string().contains("boom"), "{chat}");
        let responses = event_or_error(
            "m",
            br#"{"type":"error","code":"upstream_unreachable","message":"boom"}"#,
        )
        .unwrap_err();
        assert!(responses.to_string().contains("boom"), "{responses}");
        let ordinary = event_or_error("m", br#"{"type":"response.completed","response":{"error":null}}"#).unwrap();
        assert_eq!(ordinary["type"], "response.completed");
        assert!(event_or_error("m", br#"{"choices":[],"error":null}"#).is_ok());
        assert!(event_or_error("m", b"not json").is_err());
    }
}
