//! The built-in offline provider (`echo/<name>`): answers locally with the routing
//! decision, in OpenAI's exact response and stream formats.
//!
//! It lets anyone see routing work on a fresh machine with no API keys, and gives
//! tests and load benchmarks a model that costs nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use bytes::Bytes;
use futures_util::stream;
use serde_json::json;

use crate::upstream::{ByteStream, EchoInput, Reply};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The answer text: which model answered, why, and what it was asked.
#[must_use]
pub fn answer_text(model: &str, input: &EchoInput<'_>) -> String {
    format!("[echo/{model}] {}. Your message: {}", input.route_note, input.prompt)
}

/// A complete answer (or a stream of it) from the echo model `model`.
#[must_use]
pub fn reply(model: &str, stream: bool, input: &EchoInput<'_>) -> Reply {
    let text = answer_text(model, input);
    let id = format!("chatcmpl-echo-{:016x}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let prompt_tokens = count_tokens(input.prompt);
    let completion_tokens = count_tokens(&text);
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    let mut headers = HeaderMap::new();
    if !stream {
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": usage,
            "system_fingerprint": null,
        });
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return Reply::Complete {
            status: StatusCode::OK,
            headers,
            body: Bytes::from(body.to_string()),
        };
    }

    let chunk = |delta: serde_json::Value, finish_reason: Option<&str>| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        })
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        None,
    )];
    // A few words per event, like a real model's token stream, without one event per word.
    let pieces: Vec<&str> = text.split_inclusive(' ').collect();
    for group in pieces.chunks(8) {
        events.push(chunk(json!({"content": group.concat()}), None));
    }
    events.push(chunk(json!({}), Some("stop")));
    if input.include_usage {
        events.push(json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": null,
            "choices": [],
            "usage": usage,
        }));
    }
    let mut frames: Vec<Result<Bytes, std::convert::Infallible>> = events
        .into_iter()
        .map(|event| Ok(Bytes::from(format!("data: {event}\n\n"))))
        .collect();
    frames.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    let body: ByteStream = Box::pin(stream::iter(frames));
    Reply::Stream {
        status: StatusCode::OK,
        headers,
        body,
    }
}

/// A rough token count (words), enough for an offline model's `usage`.
fn count_tokens(text: &str) -> usize {
    text.split_whitespace().count()
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    fn input(include_usage: bool) -> EchoInput<'static> {
        EchoInput {
            prompt: "hello there",
            route_note: "routed to the strong model",
            include_usage,
        }
    }

    #[test]
    fn complete_answer_is_a_chat_completion() {
        let Reply::Complete { status, body, .. } = reply("gpt-4o", false, &input(false)) else {
            panic!("expected a complete reply")
        };
        assert_eq!(status, StatusCode::OK);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["object"], "chat.completion");
        assert_eq!(json["model"], "gpt-4o");
        let content = json["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(
            content.contains("echo/gpt-4o") && content.contains("hello there"),
            "{content}"
        );
        assert_eq!(json["usage"]["prompt_tokens"], 2);
    }

    #[tokio::test]
    async fn stream_reassembles_to_the_same_text_and_ends_with_done() {
        let Reply::Stream { body, .. } = reply("mixtral", true, &input(true)) else {
            panic!("expected a stream")
        };
        let frames: Vec<Bytes> = body.map(|frame| frame.unwrap()).collect().await;
        let text: String = frames.iter().map(|f| std::str::from_utf8(f).unwrap()).collect();
        assert!(text.ends_with("data: [DONE]\n\n"));
        let mut content = String::new();
        let mut saw_usage = false;
        for event in text.split("\n\n").filter(|e| !e.is_empty() && *e != "data: [DONE]") {
            let json: serde_json::Value = serde_json::from_str(event.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(json["object"], "chat.completion.chunk");
            if let Some(piece) = json["choices"][0]["delta"]["content"].as_str() {
                content.push_str(piece);
            }
            saw_usage |= json["usage"]["total_tokens"].is_number();
        }
        assert_eq!(content, answer_text("mixtral", &input(true)));
        assert!(saw_usage);
    }
}
