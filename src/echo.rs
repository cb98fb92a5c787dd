//! The built-in offline provider (`echo/<name>`): answers locally with the routing
//! decision, in OpenAI's exact response and stream formats.
//!
//! It lets anyone see routing work on a fresh machine with no API keys, and gives
//! tests and load benchmarks a model that costs nothing.

use crate::unix_now;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use bytes::Bytes;
use futures_util::stream;
use serde_json::json;

use crate::request::Api;
use crate::upstream::{ByteStream, EchoInput, Reply};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The answer text: which model answered, why, and what it was asked.
#[must_use]
pub fn answer_text(model: &str, input: &EchoInput<'_>) -> String {
    format!("[echo/{model}] {}. Your message: {}", input.route_note, input.prompt)
}

/// A complete answer (or a stream of it) from the echo model `model`, in `api`'s format.
#[must_use]
pub fn reply(api: Api, model: &str, stream: bool, input: &EchoInput<'_>) -> Reply {
    match api {
        Api::ChatCompletions => chat_completion(model, stream, input),
        Api::Responses => response(model, stream, input),
        Api::Completions => text_completion(model, stream, input),
    }
}

fn json_reply(body: &serde_json::Value) -> Reply {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Reply::Complete {
        status: StatusCode::OK,
        headers,
        body: Bytes::from(body.to_string()),
    }
}

fn event_stream_reply(frames: Vec<String>) -> Reply {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    let frames: Vec<Result<Bytes, std::convert::Infallible>> =
        frames.into_iter().map(|frame| Ok(Bytes::from(frame))).collect();
    let body: ByteStream = Box::pin(stream::iter(frames));
    Reply::Stream {
        status: StatusCode::OK,
        headers,
        body,
    }
}

/// The answer text in pieces of a few words, like a real model's token stream without one
/// event per word.
fn stream_pieces(text: &str) -> Vec<String> {
    let pieces: Vec<&str> = text.split_inclusive(' ').collect();
    pieces.chunks(8).map(<[&str]>::concat).collect()
}

/// `usage` as Chat Completions and legacy Completions report it.
fn token_usage(prompt: &str, answer: &str) -> serde_json::Value {
    let prompt_tokens = count_tokens(prompt);
    let completion_tokens = count_tokens(answer);
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// A stream of `data:` events ended by `[DONE]`, as both completions APIs stream.
fn data_events_then_done(events: Vec<serde_json::Value>) -> Reply {
    let mut frames: Vec<String> = events.into_iter().map(|event| format!("data: {event}\n\n")).collect();
    frames.push("data: [DONE]\n\n".to_owned());
    event_stream_reply(frames)
}

fn chat_completion(model: &str, stream: bool, input: &EchoInput<'_>) -> Reply {
    let text = answer_text(model, input);
    let id = format!("chatcmpl-echo-{:016x}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let created = unix_now();
    let usage = token_usage(input.prompt, &text);
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
        return json_reply(&body);
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
    for piece in stream_pieces(&text) {
        events.push(chunk(json!({"content": piece}), None));
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
    data_events_then_done(events)
}

/// A legacy Completions answer (`text_completion`); streamed as chunks of the same object,
/// the last with a `finish_reason`, then the usage chunk when asked for, then `[DONE]`.
fn text_completion(model: &str, stream: bool, input: &EchoInput<'_>) -> Reply {
    let text = answer_text(model, input);
    let id = format!("cmpl-echo-{:016x}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let created = unix_now();
    let usage = token_usage(input.prompt, &text);
    let completion = |choices: serde_json::Value, usage: Option<&serde_json::Value>| {
        let mut body = json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "system_fingerprint": null,
        });
        if let (Some(fields), Some(usage)) = (body.as_object_mut(), usage) {
            fields.insert("usage".into(), usage.clone());
        }
        body
    };
    let choice = |text: &str, finish_reason: Option<&str>| json!([{"text": text, "index": 0, "logprobs": null, "finish_reason": finish_reason}]);
    if !stream {
        return json_reply(&completion(choice(&text, Some("stop")), Some(&usage)));
    }
    let mut events: Vec<serde_json::Value> = stream_pieces(&text)
        .iter()
        .map(|piece| completion(choice(piece, None), None))
        .collect();
    events.push(completion(choice("", Some("stop")), None));
    if input.include_usage {
        events.push(completion(json!([]), Some(&usage)));
    }
    data_events_then_done(events)
}

/// A Responses API answer: one assistant message with one `output_text` part; streamed as
/// OpenAI streams it, from `response.created` to `response.completed` (which carries the
/// usage), each event named and numbered, with no `[DONE]`.
fn response(model: &str, stream: bool, input: &EchoInput<'_>) -> Reply {
    let text = answer_text(model, input);
    let serial = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let id = format!("resp_echo{serial:016x}");
    let message_id = format!("msg_echo{serial:016x}");
    let input_tokens = count_tokens(input.prompt);
    let output_tokens = count_tokens(&text);
    let created_at = unix_now();
    let response = |status: &str, output: serde_json::Value, usage: serde_json::Value| {
        json!({
            "id": id,
            "object": "response",
            "created_at": created_at,
            "status": status,
            "error": null,
            "incomplete_details": null,
            "model": model,
            "output": output,
            "parallel_tool_calls": true,
            "tool_choice": "auto",
            "tools": [],
            "usage": usage,
            "metadata": {},
        })
    };
    let part = |text: &str| json!({"type": "output_text", "text": text, "annotations": []});
    let message = |status: &str, content: serde_json::Value| json!({"type": "message", "id": message_id, "status": status, "role": "assistant", "content": content});
    let usage = json!({
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    });
    let done = message("completed", json!([part(&text)]));
    let completed = response("completed", json!([done]), usage);
    if !stream {
        return json_reply(&completed);
    }
    let in_progress = response("in_progress", json!([]), serde_json::Value::Null);
    let item = json!({"item_id": message_id, "output_index": 0, "content_index": 0});
    let with_item = |mut event: serde_json::Value| {
        if let (Some(event), Some(item)) = (event.as_object_mut(), item.as_object()) {
            event.extend(item.clone());
        }
        event
    };
    let mut events = vec![
        ("response.created", json!({"response": in_progress})),
        ("response.in_progress", json!({"response": in_progress})),
        (
            "response.output_item.added",
            json!({"output_index": 0, "item": message("in_progress", json!([]))}),
        ),
        ("response.content_part.added", with_item(json!({"part": part("")}))),
    ];
    for piece in stream_pieces(&text) {
        events.push((
            "response.output_text.delta",
            with_item(json!({"delta": piece, "logprobs": []})),
        ));
    }
    events.extend([
        (
            "response.output_text.done",
            with_item(json!({"text": text, "logprobs": []})),
        ),
        ("response.content_part.done", with_item(json!({"part": part(&text)}))),
        ("response.output_item.done", json!({"output_index": 0, "item": done})),
        ("response.completed", json!({"response": completed})),
    ]);
    let frames = events
        .into_iter()
        .enumerate()
        .map(|(sequence_number, (kind, mut data))| {
            if let Some(fields) = data.as_object_mut() {
                fields.insert("type".into(), json!(kind));
                fields.insert("sequence_number".into(), json!(sequence_number));
            }
            format!("event: {kind}\ndata: {data}\n\n")
        })
        .collect();
    event_stream_reply(frames)
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
        let Reply::Complete { status, body, .. } = reply(Api::ChatCompletions, "gpt-4o", false, &input(false)) else {
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
        let Reply::Stream { body, .. } = reply(Api::ChatCompletions, "mixtral", true, &input(true)) else {
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

    #[test]
    fn complete_response_has_one_output_text_and_usage() {
        let Reply::Complete { body, .. } = reply(Api::Responses, "gpt-4o", false, &input(false)) else {
            panic!("expected a complete reply")
        };
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["object"], "response");
        assert_eq!(json["status"], "completed");
        let text = json["output"][0]["content"][0]["text"].as_str().unwrap();
        assert_eq!(text, answer_text("gpt-4o", &input(false)));
        assert_eq!(json["usage"]["input_tokens"], 2);
    }

    #[tokio::test]
    async fn response_stream_is_numbered_named_events_ending_with_completed() {
        let Reply::Stream { body, .. } = reply(Api::Responses, "mixtral", true, &input(false)) else {
            panic!("expected a stream")
        };
        let frames: Vec<Bytes> = body.map(|frame| frame.unwrap()).collect().await;
        let text: String = frames.iter().map(|f| std::str::from_utf8(f).unwrap()).collect();
        let mut deltas = String::new();
        let mut kinds = Vec::new();
        for (number, event) in text.split("\n\n").filter(|e| !e.is_empty()).enumerate() {
            let (name, data) = event.split_once('\n').unwrap();
            let kind = name.strip_prefix("event: ").unwrap();
            let json: serde_json::Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(json["type"], kind);
            assert_eq!(json["sequence_number"], number);
            if kind == "response.output_text.delta" {
                deltas.push_str(json["delta"].as_str().unwrap());
            }
            if kind == "response.completed" {
                assert_eq!(json["response"]["usage"]["output_tokens"], count_tokens(&deltas));
            }
            kinds.push(kind.to_owned());
        }
        assert_eq!(deltas, answer_text("mixtral", &input(false)));
        assert_eq!(kinds.first().map(String::as_str), Some("response.created"));
        assert_eq!(kinds.last().map(String::as_str), Some("response.completed"));
    }

    #[tokio::test]
    async fn text_completion_answers_and_streams_the_same_text() {
        let Reply::Complete { body, .. } = reply(Api::Completions, "gpt-4o", false, &input(false)) else {
            panic!("expected a complete reply")
        };
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["object"], "text_completion");
        assert_eq!(json["choices"][0]["text"], answer_text("gpt-4o", &input(false)));
        assert_eq!(json["choices"][0]["finish_reason"], "stop");
        assert_eq!(json["usage"]["prompt_tokens"], 2);

        let Reply::Stream { body, .. } = reply(Api::Completions, "mixtral", true, &input(true)) else {
            panic!("expected a stream")
        };
        let frames: Vec<Bytes> = body.map(|frame| frame.unwrap()).collect().await;
        let text: String = frames.iter().map(|f| std::str::from_utf8(f).unwrap()).collect();
        assert!(text.ends_with("data: [DONE]\n\n"));
        let events: Vec<serde_json::Value> = text
            .split("\n\n")
            .filter(|event| !event.is_empty() && *event != "data: [DONE]")
            .map(|event| serde_json::from_str(event.strip_prefix("data: ").unwrap()).unwrap())
            .collect();
        assert!(events.iter().all(|event| event["object"] == "text_completion"));
        let streamed: String = events
            .iter()
            .filter_map(|event| event["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(streamed, answer_text("mixtral", &input(true)));
        let finished = events
            .iter()
            .position(|event| event["choices"][0]["finish_reason"] == "stop");
        assert_eq!(finished, Some(events.len() - 2), "the stop chunk, then usage");
        assert!(events[events.len() - 1]["usage"]["total_tokens"].is_number());
    }
}
