//! Forwarding a rewritten request to the chosen model and bringing its answer back.
//!
//! Non-streaming answers are read whole (bounded) so a broken upstream becomes a clean
//! 502 instead of a truncated body. Streams wait for the upstream's first bytes before
//! a status is committed, then pass bytes through as they arrive; a failure after that
//! point — a broken connection, a silence longer than the request timeout, or a clean
//! close before the API's final event — is sent to the client as an SSE error event,
//! never as a silent truncation. Passthrough answers that are not JSON (file contents,
//! audio, event streams) stream the same way; a binary one broken off fails the transfer.

use std::convert::Infallible;
use std::pin::Pin;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt, stream};

use crate::echo;
use crate::error::Error;
use crate::providers::{Endpoint, ResolvedModel};
use crate::request::Api;
use crate::sse::StreamEnd;

/// A body stream handed to the HTTP layer; errors have already become SSE events.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, Infallible>> + Send>>;

/// Non-streaming answers larger than this are refused rather than held in memory.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Headers that describe one connection, not the message (RFC 9110 section 7.6.1, and
/// the non-standard `keep-alive` and `proxy-connection`): never passed on in either direction.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Response headers not passed back besides the hop-by-hop ones: the body's length is the
/// proxy's to frame, and a proxy challenge was meant for this hop.
const NOT_PASSED_BACK: &[&str] = &["content-length", "proxy-authenticate"];

/// What came back from the model.
pub enum Reply {
    /// A whole body: a non-streaming answer, or any error status.
    Complete {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    /// A stream whose first bytes have arrived.
    Stream {
        status: StatusCode,
        headers: HeaderMap,
        body: ByteStream,
    },
}

/// An answer read whole: what a non-streamed reply and a JSON passthrough answer get.
pub struct WholeAnswer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A passthrough answer: JSON (and every error) read whole, so its `usage` can be
/// charged; anything else — audio, file contents, event streams — passed on as it arrives.
pub enum PassedAnswer {
    Whole(WholeAnswer),
    Streamed {
        status: StatusCode,
        headers: HeaderMap,
        /// Fails (and the HTTP layer aborts the response) if the upstream breaks off a
        /// binary body; an event stream ends with an `event: error` event instead.
        body: Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>,
    },
}

impl PassedAnswer {
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            PassedAnswer::Whole(whole) => whole.status,
            PassedAnswer::Streamed { status, .. } => *status,
        }
    }
}

impl From<WholeAnswer> for Reply {
    fn from(WholeAnswer { status, headers, body }: WholeAnswer) -> Self {
        Reply::Complete { status, headers, body }
    }
}

impl Reply {
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Reply::Complete { status, .. } | Reply::Stream { status, .. } => *status,
        }
    }
    /// The model's response headers (as passed back to the client).
    #[must_use]
    pub fn headers(&self) -> &HeaderMap {
        match self {
            Reply::Complete { headers, .. } | Reply::Stream { headers, .. } => headers,
        }
    }
}

/// What the offline echo provider needs to describe the decision it stands for.
pub struct EchoInput<'a> {
    pub prompt: &'a str,
    pub route_note: &'a str,
    /// The client asked a Chat Completions stream for its usage chunk (Responses streams
    /// always end with usage, so the echo model ignores this for them).
    pub include_usage: bool,
}

/// How to send one request, beside its body.
pub struct UpstreamRequest<'a> {
    pub stream: bool,
    /// Budget for a whole answer and for each silence between a stream's events.
    pub timeout: Duration,
    /// Budget for a stream's head and first event together: past it, the model counts
    /// as unavailable (and the next deployment is tried) before the client saw a byte.
    pub first_event_timeout: Duration,
    /// Client headers to pass on (`upstream.forward_headers`); usually empty.
    pub forwarded: &'a HeaderMap,
    pub echo: &'a EchoInput<'a>,
}

/// One of the two configured models, ready to receive requests.
pub struct Upstream {
    pub model: ResolvedModel,
    target: Target,
}

enum Target {
    Http(Box<HttpTarget>),
    Echo,
}

/// A provider's endpoints for each API, parsed once, and its credentials, encoded once.
struct HttpTarget {
    /// For `passthrough` paths, joined per request.
    base_url: String,
    chat_completions_url: reqwest::Url,
    responses_url: reqwest::Url,
    completions_url: reqwest::Url,
    authorization: Option<HeaderValue>,
    /// The model's configured extra headers (sensitive, never logged).
    headers: HeaderMap,
}

impl Upstream {
    /// Prepares the endpoint: URL parsed and credentials encoded once, not per request.
    pub fn new(model: ResolvedModel) -> Result<Self, Error> {
        let target = match &model.endpoint {
            Endpoint::Echo => Target::Echo,
            Endpoint::Http {
                base_url,
                api_key,
                headers,
            } => {
                let url = |api: Api| {
                    reqwest::Url::parse(&format!("{base_url}/{}", api.path()))
                        .map_err(|error| Error::Config(format!("{}: {error}", model.name)))
                };
                let chat_completions_url = url(Api::ChatCompletions)?;
                let responses_url = url(Api::Responses)?;
                let completions_url = url(Api::Completions)?;
                let authorization = api_key
                    .as_ref()
                    .map(|key| {
                        let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose())).map_err(|_| {
                            Error::Config(format!("the API key of `{}` is not a valid header", model.name))
                        })?;
                        value.set_sensitive(true);
                        Ok::<_, Error>(value)
                    })
                    .transpose()?;
                Target::Http(Box::new(HttpTarget {
                    base_url: base_url.trim_end_matches('/').to_owned(),
                    chat_completions_url,
                    responses_url,
                    completions_url,
                    authorization,
                    headers: headers.clone(),
                }))
            }
        };
        Ok(Self { model, target })
    }

    /// Whether answers come from the built-in offline provider.
    #[must_use]
    pub fn is_echo(&self) -> bool {
        matches!(self.target, Target::Echo)
    }

    /// Sends `body` (already rewritten for this model) to its `api` endpoint, with the
    /// client's `forwarded` headers (already filtered to those configured), and returns
    /// the model's answer.
    pub async fn send(
        &self,
        client: &reqwest::Client,
        api: Api,
        body: Vec<u8>,
        request: UpstreamRequest<'_>,
    ) -> Result<Reply, Error> {
        let UpstreamRequest {
            stream,
            timeout,
            first_event_timeout,
            forwarded,
            echo,
        } = request;
        let target = match &self.target {
            Target::Echo => return Ok(echo::reply(api, &self.model.provider_model, stream, echo)),
            Target::Http(target) => target,
        };
        let url = match api {
            Api::ChatCompletions => &target.chat_completions_url,
            Api::Responses => &target.responses_url,
            Api::Completions => &target.completions_url,
        };
        let request = client
            .post(url.clone())
            .header(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body);
        let mut request = target.credentials(request, forwarded);
        if stream {
            request = request.header(header::ACCEPT, HeaderValue::from_static("text/event-stream"));
        } else {
            // A stream may legitimately run longer than any fixed budget; a single answer may not.
            request = request.timeout(timeout);
        }
        let started = tokio::time::Instant::now();
        let head_timeout = if stream { first_event_timeout } else { timeout };
        let response = self.response_to(request, head_timeout).await?;
        if !stream || !response.status().is_success() {
            return self.read_whole(response, timeout).await.map(Reply::from);
        }
        let status = response.status();
        let headers = forwarded_headers(response.headers());

        let mut chunks = response.bytes_stream();
        let first = self
            .first_chunk(&mut chunks, first_event_timeout.saturating_sub(started.elapsed()))
            .await?;
        let mut end = StreamEnd::new(api);
        end.feed(&first);
        let watch = StreamWatch::new(chunks, Some(end), self.model.name.clone(), timeout);
        let body: ByteStream = Box::pin(watch.into_body(first, move |model, error| {
            tracing::warn!(model, error = %error, "upstream stream failed");
            Ok(sse_error_event(api, error))
        }));
        Ok(Reply::Stream { status, headers, body })
    }

    /// The first non-empty chunk of a stream, within `timeout`: until it has come, a
    /// failure is still the client's clean error response.
    async fn first_chunk<S: Stream<Item = reqwest::Result<Bytes>> + Unpin>(
        &self,
        chunks: &mut S,
        timeout: Duration,
    ) -> Result<Bytes, Error> {
        loop {
            match tokio::time::timeout(timeout, chunks.next()).await {
                Err(_) => return Err(self.timed_out("no stream event in time")),
                Ok(None) => {
                    return Err(Error::UpstreamProtocol {
                        model: self.model.name.clone(),
                        reason: "the stream ended before its first event".into(),
                    });
                }
                Ok(Some(Err(error))) => return Err(self.transport_error(&error)),
                Ok(Some(Ok(chunk))) if chunk.is_empty() => {}
                Ok(Some(Ok(chunk))) => return Ok(chunk),
            }
        }
    }

    /// Sends a request the proxy does not route — `method` on `path_and_query` below this
    /// model's base URL (an allowed `passthrough` path, already checked), with the client's
    /// `headers` that are to pass (its content type and the like) and this model's
    /// credentials. A JSON answer or an error is read whole; anything else is passed on as
    /// it arrives, once its first bytes have come, each next chunk within `timeout`.
    pub async fn send_unrouted(
        &self,
        client: &reqwest::Client,
        method: axum::http::Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Result<PassedAnswer, Error> {
        let Target::Http(target) = &self.target else {
            // Configuration refuses passthrough to the echo model; this only keeps us panic-free.
            return Err(Error::Internal(format!(
                "`{}` serves no other endpoints",
                self.model.name
            )));
        };
        let url = reqwest::Url::parse(&format!("{}/{path_and_query}", target.base_url))
            .map_err(|error| Error::invalid(format!("Invalid URL path: {error}")))?;
        // No overall timeout: a download or an event stream may run long; the head, the
        // first bytes and each silence after them have their own budgets.
        let mut request = client.request(method, url);
        if !body.is_empty() {
            request = request.body(body);
        }
        let response = self.response_to(target.credentials(request, headers), timeout).await?;
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(|value| value.trim_start().to_ascii_lowercase())
            .unwrap_or_default();
        if content_type.starts_with("application/json") || !response.status().is_success() {
            return self.read_whole(response, timeout).await.map(PassedAnswer::Whole);
        }
        let event_stream = content_type.contains("text/event-stream");
        let status = response.status();
        let headers = forwarded_headers(response.headers());
        let mut chunks = response.bytes_stream();
        let first = self.first_chunk(&mut chunks, timeout).await?;
        let watch = StreamWatch::new(chunks, None, self.model.name.clone(), timeout);
        let body = watch.into_body(first, move |model, error| {
            tracing::warn!(model, error = %error, "upstream passthrough answer broke off");
            // An event stream can say so in band; a binary body can only be cut off, which
            // the client sees as a failed transfer rather than a short file.
            if event_stream {
                Ok(Bytes::from(format!("\n\nevent: error\ndata: {}\n\n", error.to_json())))
            } else {
                Err(std::io::Error::other(error.to_string()))
            }
        });
        Ok(PassedAnswer::Streamed {
            status,
            headers,
            body: Box::pin(body),
        })
    }

    /// Sends `request` and waits at most `timeout` for the response's head.
    async fn response_to(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<reqwest::Response, Error> {
        tokio::time::timeout(timeout, request.send())
            .await
            .map_err(|_| self.timed_out("no response headers in time"))?
            .map_err(|error| self.transport_error(&error))
    }

    /// The whole answer, bounded in size and time.
    async fn read_whole(&self, response: reqwest::Response, timeout: Duration) -> Result<WholeAnswer, Error> {
        let status = response.status();
        let headers = forwarded_headers(response.headers());
        let body = tokio::time::timeout(timeout, read_bounded(response))
            .await
            .map_err(|_| self.timed_out("the response body did not arrive in time"))?
            .map_err(|error| match error {
                ReadError::Transport(error) => self.transport_error(&error),
                ReadError::TooLarge => Error::UpstreamProtocol {
                    model: self.model.name.clone(),
                    reason: format!("the response exceeds {MAX_RESPONSE_BYTES} bytes"),
                },
            })?;
        Ok(WholeAnswer { status, headers, body })
    }

    fn timed_out(&self, reason: &str) -> Error {
        Error::UpstreamTimeout {
            model: self.model.name.clone(),
            reason: reason.to_owned(),
        }
    }

    fn transport_error(&self, error: &reqwest::Error) -> Error {
        if error.is_timeout() {
            self.timed_out(&error_chain(error))
        } else {
            Error::UpstreamUnreachable {
                model: self.model.name.clone(),
                reason: error_chain(error),
            }
        }
    }
}

impl HttpTarget {
    /// The model's key and configured headers on `request`, with the client's `forwarded`
    /// ones; the operator's headers replace a client's of the same name.
    fn credentials(&self, mut request: reqwest::RequestBuilder, forwarded: &HeaderMap) -> reqwest::RequestBuilder {
        if let Some(authorization) = &self.authorization {
            request = request.header(header::AUTHORIZATION, authorization.clone());
        }
        if !forwarded.is_empty() || !self.headers.is_empty() {
            let mut extra = forwarded.clone();
            for (name, value) in &self.headers {
                extra.insert(name.clone(), value.clone());
            }
            request = request.headers(extra);
        }
        request
    }
}

/// An upstream stream after its first event: each next chunk must come within the idle
/// timeout, and the stream must not close before its final event (when it has one).
struct StreamWatch<S> {
    chunks: S,
    /// `None`: the body has no final event to wait for (a passthrough download).
    end: Option<StreamEnd>,
    model: String,
    idle_timeout: Duration,
    last_chunk: tokio::time::Instant,
    /// One timer for the whole stream, re-armed only when it fires early: a timer per
    /// chunk would cost a timer-wheel insert and removal on every chunk of every stream.
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<S: Stream<Item = reqwest::Result<Bytes>> + Unpin> StreamWatch<S> {
    fn new(chunks: S, end: Option<StreamEnd>, model: String, idle_timeout: Duration) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            chunks,
            end,
            model,
            idle_timeout,
            last_chunk: now,
            deadline: Box::pin(tokio::time::sleep_until(idle_deadline(now, idle_timeout))),
        }
    }

    /// The body to pass on: `first`, then each next chunk, and when the stream fails, what
    /// `on_failure` (given the model's name) makes of the error — an in-band error event, or
    /// a failed transfer — as its end.
    fn into_body<E, F>(self, first: Bytes, on_failure: F) -> impl Stream<Item = Result<Bytes, E>> + Send + 'static
    where
        S: Send + 'static,
        E: Send + 'static,
        F: FnOnce(&str, &Error) -> Result<Bytes, E> + Send + 'static,
    {
        // The failure handler travels with the watch: it is called once, at the end.
        let rest = stream::unfold(Some((self, on_failure)), |state| async move {
            let (mut watch, on_failure) = state?;
            match watch.next_event().await {
                Ok(Some(chunk)) => Some((Ok(chunk), Some((watch, on_failure)))),
                Ok(None) => None,
                Err(error) => Some((on_failure(&watch.model, &error), None)),
            }
        });
        stream::once(std::future::ready(Ok(first))).chain(rest)
    }

    /// The next chunk; `None` once the stream has properly ended.
    async fn next_event(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            tokio::select! {
                biased;
                item = self.chunks.next() => {
                    self.last_chunk = tokio::time::Instant::now();
                    return self.on_item(item);
                }
                () = &mut self.deadline => {
                    // A stream may run longer than any fixed budget, but a silence this long
                    // (keep-alive comments count) means the upstream is stuck, and the
                    // client would wait forever.
                    if self.last_chunk.elapsed() >= self.idle_timeout {
                        return Err(Error::UpstreamTimeout {
                            model: self.model.clone(),
                            reason: format!(
                                "the stream sent nothing for {} s (upstream.request_timeout_secs)",
                                self.idle_timeout.as_secs_f64()
                            ),
                        });
                    }
                    let deadline = idle_deadline(self.last_chunk, self.idle_timeout);
                    self.deadline.as_mut().reset(deadline);
                }
            }
        }
    }

    fn on_item(&mut self, item: Option<reqwest::Result<Bytes>>) -> Result<Option<Bytes>, Error> {
        match item {
            Some(Ok(chunk)) => {
                if let Some(end) = self.end.as_mut() {
                    end.feed(&chunk);
                }
                Ok(Some(chunk))
            }
            Some(Err(error)) => Err(Error::UpstreamUnreachable {
                model: self.model.clone(),
                reason: format!("the stream broke: {}", error_chain(&error)),
            }),
            None if self.end.as_ref().is_none_or(StreamEnd::ended) => Ok(None),
            None => Err(Error::UpstreamProtocol {
                model: self.model.clone(),
                reason: "the stream closed before its final event: the answer is incomplete".into(),
            }),
        }
    }
}

/// `from + timeout`, or far in the future when that is past what an `Instant` holds.
fn idle_deadline(from: tokio::time::Instant, timeout: Duration) -> tokio::time::Instant {
    from.checked_add(timeout)
        .unwrap_or_else(|| from + Duration::from_secs(86_400 * 365 * 30))
}

/// reqwest is built without a default TLS provider (ring instead of aws-lc keeps builds
/// lean); rustls needs one chosen process-wide before the first TLS connection, by every
/// client the process makes (upstreams, embeddings API, Hub downloads).
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An SSE event carrying an OpenAI-shaped error in `api`'s stream format: for Chat
/// Completions (and legacy Completions) a `data:` line with `{"error": …}`, which the OpenAI SDKs raise as an API
/// error; for Responses an `event: error` event, which they yield as a `type: "error"` event.
/// The leading blank line closes any event the upstream left half-written.
#[must_use]
pub fn sse_error_event(api: Api, error: &Error) -> Bytes {
    match api {
        Api::ChatCompletions | Api::Completions => Bytes::from(format!("\n\ndata: {}\n\n", error.to_json())),
        Api::Responses => Bytes::from(format!(
            "\n\nevent: error\ndata: {}\n\n",
            error.to_responses_event_json()
        )),
    }
}

enum ReadError {
    Transport(reqwest::Error),
    TooLarge,
}

async fn read_bounded(response: reqwest::Response) -> Result<Bytes, ReadError> {
    let expected = response.content_length().unwrap_or(0);
    if expected > MAX_RESPONSE_BYTES as u64 {
        return Err(ReadError::TooLarge);
    }
    let mut chunks = response.bytes_stream();
    let mut body = BytesMut::with_capacity(usize::try_from(expected).unwrap_or(0));
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(ReadError::Transport)?;
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn forwarded_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut headers = upstream.clone();
    for name in HOP_BY_HOP.iter().chain(NOT_PASSED_BACK) {
        headers.remove(*name);
    }
    headers
}

/// An error with its causes, which reqwest's own `Display` leaves out.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped_others_kept() {
        let mut upstream = HeaderMap::new();
        upstream.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        upstream.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        upstream.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        upstream.insert("x-request-id", HeaderValue::from_static("abc"));
        upstream.insert("openai-processing-ms", HeaderValue::from_static("12"));
        let headers = forwarded_headers(&upstream);
        assert!(headers.get(header::CONNECTION).is_none());
        assert!(headers.get(header::TRANSFER_ENCODING).is_none());
        assert!(headers.get(header::CONTENT_LENGTH).is_none());
        assert_eq!(headers["x-request-id"], "abc");
        assert_eq!(headers["openai-processing-ms"], "12");
    }

    #[test]
    fn sse_error_event_is_one_parseable_data_line() {
        let event = sse_error_event(Api::ChatCompletions, &Error::invalid("boom"));
        let text = std::str::from_utf8(&event).unwrap();
        let data = text.trim().strip_prefix("data: ").unwrap();
        let json: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(json["error"]["message"], "boom");
        assert!(text.ends_with("\n\n"));
    }

    #[test]
    fn responses_error_event_is_a_named_event_with_a_flat_error() {
        let error = Error::UpstreamUnreachable {
            model: "m".into(),
            reason: "the stream broke".into(),
        };
        let event = sse_error_event(Api::Responses, &error);
        let text = std::str::from_utf8(&event).unwrap();
        let rest = text.trim_start().strip_prefix("event: error\ndata: ").unwrap();
        let json: serde_json::Value = serde_json::from_str(rest.trim_end()).unwrap();
        assert_eq!(json["type"], "error");
        assert_eq!(json["code"], "upstream_unreachable");
        assert!(json["message"].as_str().unwrap().contains("the stream broke"), "{json}");
        assert!(text.ends_with("\n\n"));
    }
}
