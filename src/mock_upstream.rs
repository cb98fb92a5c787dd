//! `routellm mock-upstream`: a canned OpenAI-compatible upstream for load tests and local
//! experiments. It answers every chat completion instantly with fixed bytes (a JSON
//! completion, or a three-chunk SSE stream when the body asks for `"stream":true`), so a
//! benchmark measures the proxy, not a model.

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::Response;
use axum::routing::post;

const COMPLETION: &str = r#"{"id":"chatcmpl-mock","object":"chat.completion","created":1700000000,"model":"mock","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the mock upstream."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":8,"completion_tokens":6,"total_tokens":14}}"#;
const STREAM: &str = concat!(
    "data: {\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"mock\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hello\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"mock\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"},\"finish_reason\":\"stop\"}]}\n\n",
    "data: [DONE]\n\n",
);

/// The mock's routes.
pub fn app() -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", post(answer))
        .route("/chat/completions", post(answer))
}

async fn answer(body: Bytes) -> Response {
    let stream = body.windows(13).any(|window| window == b"\"stream\":true")
        || body.windows(14).any(|window| window == b"\"stream\": true");
    let (content_type, text) = if stream {
        ("text/event-stream", STREAM)
    } else {
        ("application/json", COMPLETION)
    };
    let mut response = Response::new(Body::from(text));
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}
