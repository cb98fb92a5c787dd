//! The proxy end to end: mock upstreams and the server on `127.0.0.1:0`, asserting which
//! upstream received each request, what it received, and what the client got back.

#![allow(clippy::unwrap_used, clippy::format_collect)] // test code: a panic is the failure report

mod common;

use std::time::Duration;

use common::{
    FailingRouter, FixedRouter, MockUpstream, Proxy, chunk_before_the_rest, closed_port, metric, openai_error,
};
use futures_util::StreamExt;
use serde_json::Value;

const HELLO: &str = r#"{"role":"user","content":"Hello"}"#;

fn body(model: &str, extra: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{HELLO}]{extra}}}"#)
}

/// What is left of a streamed answer, as text.
async fn read_to_end(mut chunks: impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin) -> String {
    let mut rest = Vec::new();
    while let Some(chunk) = chunks.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    String::from_utf8(rest).unwrap()
}

/// A strong and a weak mock upstream with the proxy in front, configured by `yaml`.
async fn setup(yaml: &str) -> (MockUpstream, MockUpstream, Proxy) {
    let (strong, weak) = (MockUpstream::start("strong").await, MockUpstream::start("weak").await);
    let proxy = Proxy::start(&strong.base_url(), &weak.base_url(), yaml).await;
    (strong, weak, proxy)
}

#[tokio::test]
async fn threshold_zero_goes_strong_and_one_goes_weak() {
    let (strong, weak, proxy) = setup("").await;

    let response = proxy.post_chat(&body("router-random-0", "")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-routellm-model"], "openai/strong-model");
    assert_eq!(response.headers()["x-routellm-tier"], "strong");
    assert_eq!(response.headers()["x-routellm-router"], "random");
    let multi: Vec<_> = response.headers().get_all("x-mock-multi").iter().collect();
    assert_eq!(multi, ["one", "two"], "every value of a repeated upstream header");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "answer from strong");
    assert_eq!(answer["model"], "strong-model");

    let response = proxy.post_chat(&body("router-random-1", "")).await;
    assert_eq!(response.headers()["x-routellm-tier"], "weak");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "answer from weak");

    assert_eq!(strong.received().len(), 1);
    assert_eq!(weak.received().len(), 1);
}

#[tokio::test]
async fn forwarded_body_is_unchanged_except_model_and_nothing_is_injected() {
    let (strong, weak, proxy) = setup("").await;
    let original = r#"{"model":"router-fixed_high-0.5","messages":[{"role":"user","content":[{"type":"text","text":"Describe"},{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBOR"}}]}],"temperature":1.0,"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"},"units":{"enum":["c","f"]}},"required":["city"],"additionalProperties":false},"strict":true}}],"tool_choice":"auto","response_format":{"type":"json_schema","json_schema":{"name":"w","schema":{"type":"object","properties":{"t":{"type":"number"}}},"strict":true}},"logprobs":true,"top_logprobs":2,"x_vendor_extension":{"nested":[1,2.50,null]}}"#;
    let response = proxy.post_chat(original).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-routellm-win-rate"], "0.8");
    assert_eq!(response.headers()["x-routellm-threshold"], "0.5");

    let received = strong.received();
    assert_eq!(received.len(), 1);
    assert!(weak.received().is_empty());
    let expected = original.replace("router-fixed_high-0.5", "strong-model");
    assert_eq!(std::str::from_utf8(&received[0].body).unwrap(), expected);
    assert_eq!(received[0].headers["authorization"], "Bearer sk-strong");
}

#[tokio::test]
async fn weak_upstream_gets_its_own_key_and_provider_model_name() {
    let (_strong, weak, proxy) = setup("").await;
    proxy.post_chat(&body("router-fixed_high-0.9", "")).await;
    let received = weak.received();
    assert_eq!(received[0].json()["model"], "weak-model");
    assert_eq!(received[0].headers["authorization"], "Bearer sk-weak");
}

#[tokio::test]
async fn configured_model_names_are_forwarded_without_routing() {
    let (strong, weak, proxy) = setup("").await;
    let response = proxy.post_chat(&body("together_ai/weak-model", "")).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("x-routellm-router").is_none());
    assert_eq!(response.headers()["x-routellm-model"], "together_ai/weak-model");
    let response = proxy.post_chat(&body("strong-model", "")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(weak.received().len(), 1);
    assert_eq!(strong.received().len(), 1);
}

#[tokio::test]
async fn default_threshold_from_config_serves_bare_router_name() {
    let (_strong, weak, proxy) = setup("thresholds: {fixed_high: 0.9}\n").await;
    let response = proxy.post_chat(&body("router-fixed_high", "")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-routellm-threshold"], "0.9");
    assert_eq!(weak.received().len(), 1);
}

/// With `strong_share`, `router-<name>` follows the router's own traffic: once the window
/// has its scores, the threshold moves to where that share of them goes strong, and the
/// listing and metrics say so.
#[tokio::test]
async fn strong_share_moves_the_default_threshold_to_the_traffic() {
    let (strong, weak, proxy) = setup(
        "thresholds: {fixed_high: 0.9, random: 0.25}\nstrong_share: {fixed_high: 0.5}\nstrong_share_window: 100\n",
    )
    .await;
    let listed = proxy.get_json("/v1/models").await;
    let fixed_high = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|model| model["router"] == "fixed_high")
        .unwrap()
        .clone();
    // No threshold in the id: the default moves, a client should not pin today's.
    assert_eq!(fixed_high["id"], "router-fixed_high");
    assert_eq!(
        (
            fixed_high["default_threshold"].as_f64(),
            fixed_high["strong_share"].as_f64()
        ),
        (Some(0.9), Some(0.5))
    );
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("routellm_router_strong_share_target{router=\"fixed_high\"} 0.5\n"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("routellm_router_strong_share_target{router=\"random\"}"),
        "{metrics}"
    );

    // fixed_high scores every prompt 0.8: below the configured 0.9, so weak at first ...
    for _ in 0..100 {
        let response = proxy.post_chat(&body("router-fixed_high", "")).await;
        assert_eq!(response.headers()["x-routellm-threshold"], "0.9");
    }
    assert_eq!((weak.received().len(), strong.received().len()), (100, 0));
    // ... then its window holds 100 scores of 0.8, and the threshold that sends half of
    // them strong is 0.8 itself (all tied: all in is as near half as none).
    let response = proxy.post_chat(&body("router-fixed_high", "")).await;
    assert_eq!(response.headers()["x-routellm-threshold"], "0.8");
    assert_eq!(response.headers()["x-routellm-tier"], "strong");
    assert_eq!(
        proxy.get_json("/v1/models/router-fixed_high").await["default_threshold"].as_f64(),
        Some(0.8)
    );
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("routellm_router_default_threshold{router=\"fixed_high\"} 0.8\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("routellm_router_default_threshold{router=\"random\"} 0.25\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn streams_pass_through_chunk_by_chunk() {
    let (strong, _weak, proxy) = setup("").await;
    let response = proxy
        .post_chat(&body("router-random-0", r#","stream":true,"mock":"gated""#))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-routellm-tier"], "strong");
    let mut chunks = response.bytes_stream();
    // The upstream holds its second chunk until we release it: receiving the first one
    // here proves the proxy forwards without waiting for the whole stream.
    let first = chunk_before_the_rest(&mut chunks, Duration::from_secs(10)).await;
    assert!(std::str::from_utf8(&first).unwrap().contains("from strong"));
    strong.state.gate.notify_one();
    let rest = read_to_end(chunks).await;
    assert!(rest.contains(" done"), "{rest}");
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    assert_eq!(strong.received()[0].headers["accept"], "text/event-stream");
}

#[tokio::test]
async fn upstream_error_before_first_byte_keeps_status_and_body() {
    let (_strong, _weak, proxy) = setup("").await;
    for extra in [r#","mock":"rate_limited""#, r#","stream":true,"mock":"rate_limited""#] {
        let response = proxy.post_chat(&body("router-random-0", extra)).await;
        assert_eq!(response.status(), 429, "{extra}");
        assert_eq!(response.headers()["x-ratelimit-remaining-requests"], "0");
        assert_eq!(response.headers()["x-routellm-tier"], "strong");
        let error = openai_error(response, 429).await;
        assert_eq!(error["code"], "rate_limit_exceeded");
    }
    let response = proxy
        .post_chat(&body("router-random-0", r#","mock":"bad_request""#))
        .await;
    let error = openai_error(response, 400).await;
    assert_eq!(error["param"], "temperature");
}

#[tokio::test]
async fn mid_stream_failure_ends_with_an_sse_error_event() {
    let (_strong, weak, proxy) = setup("").await;
    let response = proxy
        .post_chat(&body("router-random-1", r#","stream":true,"mock":"break""#))
        .await;
    assert_eq!(response.status(), 200);
    let mut chunks = response.bytes_stream();
    let first = chunks.next().await.unwrap().unwrap();
    weak.state.gate.notify_one();
    let mut text = String::from_utf8(first.to_vec()).unwrap();
    while let Some(chunk) = chunks.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(text.contains("from weak"), "{text}");
    let last_event = text.trim_end().rsplit("\n\n").next().unwrap();
    let error: Value = serde_json::from_str(last_event.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "upstream_unreachable");
    assert!(!text.contains("[DONE]"));
}

/// The `error` object of a stream's last event, Chat Completions or Responses.
fn last_stream_error(text: &str) -> Value {
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let data = last.rsplit("data: ").next().unwrap();
    let event: Value = serde_json::from_str(data).unwrap_or_else(|_| panic!("{text}"));
    if event["type"] == "error" {
        event
    } else {
        event["error"].clone()
    }
}

#[tokio::test]
async fn a_stream_that_closes_early_or_falls_silent_ends_with_an_sse_error_event() {
    let (_strong, weak, proxy) = setup("upstream:\n  request_timeout_secs: 0.5\n").await;
    let stream = |mock: &str| body("router-random-1", &format!(r#","stream":true,"mock":"{mock}""#));

    // Closed cleanly after its first chunk, before any finish_reason or [DONE].
    let text = proxy.post_chat(&stream("truncated")).await.text().await.unwrap();
    assert!(text.contains("from weak"), "{text}");
    let error = last_stream_error(&text);
    assert_eq!(error["code"], "upstream_invalid_response", "{text}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("closed before its final event"),
        "{error}"
    );

    // Silent after its first chunk for longer than the request timeout.
    let started = std::time::Instant::now();
    let text = proxy.post_chat(&stream("stall")).await.text().await.unwrap();
    assert!(text.contains("from weak"), "{text}");
    assert_eq!(last_stream_error(&text)["code"], "upstream_timeout", "{text}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());

    // Keep-alive comments are not silence, and a whole stream gains no error.
    let (mut chunks, mut text) = (proxy.post_chat(&stream("endless")).await.bytes_stream(), String::new());
    while text.matches(": keep-alive").count() < 40 {
        text.push_str(std::str::from_utf8(&chunks.next().await.unwrap().unwrap()).unwrap());
    }
    assert!(!text.contains("error"), "{text}");
    let text = proxy.post_chat(&stream("ok")).await.text().await.unwrap();
    assert!(
        text.trim_end().ends_with("data: [DONE]") && !text.contains("error"),
        "{text}"
    );
    assert_eq!(weak.received().len(), 4);

    // The Responses API's stream must reach `response.completed` (or another final event).
    let request = r#"{"model":"router-random-1","stream":true,"input":"hi","mock":"truncated"}"#;
    let text = proxy.post_json("/v1/responses", request).await.text().await.unwrap();
    assert!(
        text.contains("response.output_text.delta") && text.contains("event: error"),
        "{text}"
    );
    assert_eq!(last_stream_error(&text)["code"], "upstream_invalid_response", "{text}");
    let request = r#"{"model":"router-random-1","stream":true,"input":"hi"}"#;
    let text = proxy.post_json("/v1/responses", request).await.text().await.unwrap();
    assert!(
        text.contains("response.completed") && !text.contains("event: error"),
        "{text}"
    );
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_stream() {
    let (strong, _weak, proxy) = setup("").await;
    let (sender, dropped) = tokio::sync::oneshot::channel();
    *strong.state.dropped.lock().unwrap() = Some(sender);
    let response = proxy
        .post_chat(&body("router-random-0", r#","stream":true,"mock":"endless""#))
        .await;
    let mut chunks = response.bytes_stream();
    chunks.next().await.unwrap().unwrap();
    drop(chunks);
    tokio::time::timeout(Duration::from_secs(10), dropped)
        .await
        .expect("the upstream stream must be dropped after the client leaves")
        .unwrap();
}

#[tokio::test]
async fn unreachable_upstream_is_502_and_slow_one_is_504() {
    let strong = MockUpstream::start("strong").await;
    let dead = format!("http://127.0.0.1:{}/v1", closed_port().await);
    let proxy = Proxy::start(&strong.base_url(), &dead, "upstream: {request_timeout_secs: 0.5}\n").await;
    for extra in ["", r#","stream":true"#] {
        let response = proxy.post_chat(&body("router-random-1", extra)).await;
        let error = openai_error(response, 502).await;
        assert_eq!(error["code"], "upstream_unreachable");
        assert!(error["message"].as_str().unwrap().contains("weak-model"));
    }
    for extra in [r#","mock":"slow""#, r#","stream":true,"mock":"slow""#] {
        let response = proxy.post_chat(&body("router-random-0", extra)).await;
        let error = openai_error(response, 504).await;
        assert_eq!(error["code"], "upstream_timeout");
    }
}

#[tokio::test]
async fn client_mistakes_are_400s_with_openai_errors() {
    let (strong, weak, proxy) = setup("").await;
    let cases: &[(&str, &str)] = &[
        ("{\"model\": ", "could not parse the JSON body"),
        ("not json at all", "could not parse the JSON body"),
        ("[]", "JSON object"),
        (r#"{"messages":[{"role":"user","content":"x"}]}"#, "model"),
        (r#"{"model":"router-random-0.5"}"#, "'messages'"),
        (r#"{"model":"router-random-0.5","messages":[]}"#, "empty array"),
        (
            r#"{"model":"router-random-0.5","messages":[{"role":"system","content":"x"}]}"#,
            "role 'user'",
        ),
        (
            r#"{"model":"router-random-1.5","messages":[{"role":"user","content":"x"}]}"#,
            "outside [0, 1]",
        ),
        (
            r#"{"model":"router-random-abc","messages":[{"role":"user","content":"x"}]}"#,
            "not a number",
        ),
        (
            r#"{"model":"router-random","messages":[{"role":"user","content":"x"}]}"#,
            "no default threshold",
        ),
        (
            r#"{"model":"router-mf-0.5","messages":[{"role":"user","content":"x"}]}"#,
            "Available routers: fixed_high, random",
        ),
        (
            r#"{"model":"router-random-0.5","stream":"yes","messages":[{"role":"user","content":"x"}]}"#,
            "'stream'",
        ),
        (r#"{"model":7,"messages":[{"role":"user","content":"x"}]}"#, "'model'"),
    ];
    for (request, fragment) in cases {
        let response = proxy.post_chat(request).await;
        let error = openai_error(response, 400).await;
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(fragment), "{request}: {message}");
        assert_eq!(error["type"], "invalid_request_error");
    }
    assert!(strong.received().is_empty() && weak.received().is_empty());
}

#[tokio::test]
async fn unknown_model_and_url_are_404() {
    let (_strong, _weak, proxy) = setup("").await;
    let error = openai_error(proxy.post_chat(&body("gpt-9", "")).await, 404).await;
    assert_eq!(error["code"], "model_not_found");
    let response = proxy
        .client
        .post(proxy.url("/v1/embeddings"))
        .body("{}")
        .send()
        .await
        .unwrap();
    let error = openai_error(response, 404).await;
    assert_eq!(error["message"], "Invalid URL (POST /v1/embeddings)");
    let response = proxy
        .client
        .get(proxy.url("/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    openai_error(response, 404).await;
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let (_strong, _weak, proxy) = setup("max_request_bytes: 2048\n").await;
    let big = body("router-random-0", &format!(r#","pad":"{}""#, "x".repeat(4096)));
    let error = openai_error(proxy.post_chat(&big).await, 413).await;
    assert_eq!(error["code"], "request_too_large");
    let response = proxy.post_chat(&body("router-random-0", "")).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn api_keys_guard_the_proxy() {
    let (strong, _weak, proxy) = setup("api_keys: [team-key]\n").await;
    let error = openai_error(proxy.post_chat(&body("router-random-0", "")).await, 401).await;
    assert_eq!(error["code"], "invalid_api_key");
    let response = proxy
        .client
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth("team-key")
        .body(body("router-random-0", ""))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The client's key is for the proxy only; the upstream gets the provider key.
    assert_eq!(strong.received()[0].headers["authorization"], "Bearer sk-strong");
    let response = proxy.client.get(proxy.url("/health")).send().await.unwrap();
    assert_eq!(response.status(), 200, "health stays open for orchestrators");
}

#[tokio::test]
async fn models_and_health_endpoints() {
    let (_strong, _weak, proxy) = setup("thresholds: {random: 0.25}\n").await;
    let health = proxy.get_json("/health").await;
    assert_eq!(health, serde_json::json!({"status": "online"}));
    let models = proxy.get_json("/v1/models").await;
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![
            "router-fixed_high",
            "router-random-0.25",
            "openai/strong-model",
            "together_ai/weak-model"
        ]
    );
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["object"] == "model")
    );

    // Each name a request may use can be retrieved, as the SDKs' `models.retrieve` does.
    let retrieve = |id: &str| proxy.client.get(proxy.url(&format!("/v1/models/{id}"))).send();
    let random: Value = retrieve("router-random").await.unwrap().json().await.unwrap();
    assert_eq!(random["id"], "router-random");
    assert_eq!(random["default_threshold"], 0.25);
    assert!(random.get("threshold").is_none());
    let explicit: Value = retrieve("router-random-0.7").await.unwrap().json().await.unwrap();
    assert_eq!(
        (explicit["threshold"].as_f64(), explicit["router"].as_str()),
        (Some(0.7), Some("random"))
    );
    for name in ["openai/strong-model", "strong-model"] {
        let model: Value = retrieve(name).await.unwrap().json().await.unwrap();
        assert_eq!(
            (model["id"].as_str(), model["tier"].as_str()),
            (Some("openai/strong-model"), Some("strong"))
        );
    }
    for unknown in ["router-nope-0.5", "gpt-imaginary", "org/imaginary"] {
        let error = openai_error(retrieve(unknown).await.unwrap(), 404).await;
        assert_eq!(error["code"], "model_not_found", "{unknown}");
    }
    openai_error(retrieve("router-random-7").await.unwrap(), 400).await;
}

#[tokio::test]
async fn model_aliases_route_requests_and_are_listed_as_models() {
    let (strong, weak, proxy) = setup(
        "thresholds: {fixed_high: 0.9}\n\
         model_aliases: {auto: router-fixed_high-0.5, gpt-4o: router-fixed_high, cheap: together_ai/weak-model, \
         later: router-mf-0.5}\n",
    )
    .await;
    // fixed_high scores 0.8: over the alias's threshold 0.5, under the configured 0.9.
    let response = proxy.post_chat(&body("auto", "")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-routellm-router"], "fixed_high");
    assert_eq!(response.headers()["x-routellm-threshold"], "0.5");
    assert_eq!(response.headers()["x-routellm-tier"], "strong");
    let response = proxy.post_chat(&body("gpt-4o", "")).await;
    assert_eq!(response.headers()["x-routellm-threshold"], "0.9");
    assert_eq!(response.headers()["x-routellm-tier"], "weak");
    let response = proxy.post_chat(&body("cheap", "")).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("x-routellm-router").is_none());
    assert_eq!(response.headers()["x-routellm-model"], "together_ai/weak-model");
    // A router this deployment does not load: refused, saying what the alias stands for.
    let error = openai_error(proxy.post_chat(&body("later", "")).await, 400).await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("`later` stands for `router-mf-0.5`"),
        "{error}"
    );
    // The models get their own names, never the alias.
    let models = |received: Vec<common::Received>| {
        received
            .iter()
            .map(|request| request.json()["model"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(models(strong.received()), vec!["strong-model"]);
    assert_eq!(models(weak.received()), vec!["weak-model", "weak-model"]);

    let listed = proxy.get_json("/v1/models").await;
    let aliases: Vec<(&str, &str)> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|model| Some((model["id"].as_str()?, model["alias_for"].as_str()?)))
        .collect();
    assert_eq!(
        aliases,
        vec![
            ("auto", "router-fixed_high-0.5"),
            ("cheap", "together_ai/weak-model"),
            ("gpt-4o", "router-fixed_high")
        ]
    );
    let auto = proxy.get_json("/v1/models/auto").await;
    assert_eq!(
        (
            auto["router"].as_str(),
            auto["threshold"].as_f64(),
            auto["default_threshold"].as_f64()
        ),
        (Some("fixed_high"), Some(0.5), Some(0.9))
    );
    let cheap = proxy.get_json("/v1/models/cheap").await;
    assert_eq!(
        (cheap["id"].as_str(), cheap["tier"].as_str()),
        (Some("cheap"), Some("weak"))
    );
    let later = proxy.client.get(proxy.url("/v1/models/later")).send().await.unwrap();
    assert_eq!(openai_error(later, 404).await["code"], "model_not_found");
}

#[tokio::test]
async fn proxy_reports_its_own_overhead() {
    let (_strong, _weak, proxy) = setup("").await;
    let response = proxy.post_chat(&body("router-random-0", "")).await;
    let overhead: u64 = response.headers()["x-routellm-overhead-us"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(overhead < 10_000_000, "{overhead}");
}

#[tokio::test]
async fn random_router_splits_traffic_by_threshold() {
    let (strong, weak, proxy) = setup("").await;
    for _ in 0..200 {
        let response = proxy.post_chat(&body("router-random-0.75", "")).await;
        assert_eq!(response.status(), 200);
    }
    let strong_calls = strong.received().len();
    assert_eq!(strong_calls + weak.received().len(), 200);
    // About a quarter should be strong; 200 draws keep this far from chance failures.
    assert!((25..=80).contains(&strong_calls), "{strong_calls}");
}

#[tokio::test]
async fn metrics_count_requests_by_tier_and_status() {
    let (_strong, _weak, proxy) = setup("").await;
    proxy.post_chat(&body("router-random-0", "")).await;
    proxy.post_chat(&body("router-random-1", "")).await;
    proxy.post_chat(&body("router-random-1", "")).await;
    proxy.post_chat("{not json").await;
    let response = proxy.client.get(proxy.url("/metrics")).send().await.unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    assert!(
        text.contains("routellm_requests_total{tier=\"strong\",status=\"2xx\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("routellm_requests_total{tier=\"weak\",status=\"2xx\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("routellm_requests_total{tier=\"none\",status=\"4xx\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("routellm_overhead_seconds_count 3\n"), "{text}");
}

#[tokio::test]
async fn score_turns_max_keeps_a_demanding_conversation_on_the_strong_model() {
    async fn setup(yaml: &str) -> (MockUpstream, MockUpstream, Proxy) {
        let (strong, weak) = (MockUpstream::start("strong").await, MockUpstream::start("weak").await);
        let mut routers: std::collections::BTreeMap<String, std::sync::Arc<dyn routellm::routers::Router>> =
            std::collections::BTreeMap::new();
        routers.insert("length".into(), std::sync::Arc::new(routellm::routers::LengthRouter));
        let proxy = Proxy::start_with(&strong.base_url(), &weak.base_url(), yaml, routers).await;
        (strong, weak, proxy)
    }
    // The length router scores the 3,000-character first turn 0.75 and the follow-up "ok" 0.002.
    let task = "x".repeat(3000);
    let conversation = format!(
        r#"{{"model":"router-length-0.5","messages":[{{"role":"system","content":"be brief"}},{{"role":"user","content":"{task}"}},{{"role":"assistant","content":"done"}},{{"role":"user","content":"ok"}}]}}"#
    );

    let (strong, weak, proxy) = setup("").await;
    let response = proxy.post_chat(&conversation).await;
    assert_eq!(response.headers()["x-routellm-tier"], "weak");
    assert_eq!((strong.received().len(), weak.received().len()), (0, 1));

    let (strong, weak, proxy) = setup("score_turns: max\n").await;
    let response = proxy.post_chat(&conversation).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-routellm-tier"], "strong");
    assert_eq!(response.headers()["x-routellm-win-rate"], "0.75");
    assert_eq!((strong.received().len(), weak.received().len()), (1, 0));
    // The body goes upstream as it came, every turn included.
    assert_eq!(strong.received()[0].json()["messages"].as_array().unwrap().len(), 4);
    // A one-turn request scores as before.
    let response = proxy.post_chat(&body("router-length-0.5", "")).await;
    assert_eq!(response.headers()["x-routellm-tier"], "weak");
    // The Responses API's input items are turns too.
    let input = format!(
        r#"{{"model":"router-length-0.5","input":[{{"role":"user","content":"{task}"}},{{"role":"assistant","content":"done"}},{{"role":"user","content":"ok"}}]}}"#
    );
    let response = proxy.post_json("/v1/responses", &input).await;
    assert_eq!(response.headers()["x-routellm-tier"], "strong");
    // Only the last eight user turns count: the demanding one falls out of a long conversation.
    let mut messages = vec![format!(r#"{{"role":"user","content":"{task}"}}"#)];
    messages.extend((0..8).map(|turn| format!(r#"{{"role":"user","content":"follow-up {turn}"}}"#)));
    let long = format!(r#"{{"model":"router-length-0.5","messages":[{}]}}"#, messages.join(","));
    let response = proxy.post_chat(&long).await;
    assert_eq!(response.headers()["x-routellm-tier"], "weak");
    // An earlier turn the router now reads must be well-formed.
    let malformed =
        r#"{"model":"router-length-0.5","messages":[{"role":"user","content":7},{"role":"user","content":"ok"}]}"#;
    let error = openai_error(proxy.post_chat(malformed).await, 400).await;
    assert!(
        error["message"].as_str().unwrap().contains("messages[0].content"),
        "{error}"
    );
    assert_eq!(error["param"], "messages");
}

#[tokio::test]
async fn metrics_show_each_routers_decisions_and_scores() {
    let (_strong, _weak, proxy) = setup("").await;
    // fixed_high scores 0.8: strong at 0.5 and at 0.8 (inclusive), weak at 0.9.
    for threshold in ["0.5", "0.8", "0.9"] {
        let response = proxy
            .post_chat(&body(&format!("router-fixed_high-{threshold}"), ""))
            .await;
        assert_eq!(response.status(), 200);
    }
    let text = proxy.metrics().await;
    for expected in [
        "routellm_router_decisions_total{router=\"fixed_high\",tier=\"strong\"} 2\n",
        "routellm_router_decisions_total{router=\"fixed_high\",tier=\"weak\"} 1\n",
        "routellm_router_decisions_total{router=\"random\",tier=\"strong\"} 0\n",
        "routellm_router_score_bucket{router=\"fixed_high\",le=\"0.79\"} 0\n",
        "routellm_router_score_bucket{router=\"fixed_high\",le=\"0.8\"} 3\n",
        "routellm_router_score_bucket{router=\"fixed_high\",le=\"1\"} 3\n",
        "routellm_router_score_bucket{router=\"fixed_high\",le=\"+Inf\"} 3\n",
        "routellm_router_score_count{router=\"fixed_high\"} 3\n",
        "routellm_router_score_count{router=\"random\"} 0\n",
    ] {
        assert!(text.contains(expected), "{expected} in {text}");
    }
    let sum: f64 = text
        .lines()
        .find_map(|line| line.strip_prefix("routellm_router_score_sum{router=\"fixed_high\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!((sum - 2.4).abs() < 1e-9, "{sum}");

    // The decision is counted when it is made, even if the chosen model then cannot be
    // reached, and a router that cannot score counts a decision without a score.
    let weak = MockUpstream::start("weak").await;
    let dead = format!("http://127.0.0.1:{}/v1", closed_port().await);
    let mut routers: std::collections::BTreeMap<String, std::sync::Arc<dyn routellm::routers::Router>> =
        std::collections::BTreeMap::new();
    routers.insert("fixed_high".into(), std::sync::Arc::new(FixedRouter(0.8)));
    routers.insert("failing".into(), std::sync::Arc::new(FailingRouter));
    let proxy = Proxy::start_with(&dead, &weak.base_url(), "", routers).await;
    assert_eq!(proxy.post_chat(&body("router-fixed_high-0.5", "")).await.status(), 502);
    assert_eq!(proxy.post_chat(&body("router-failing-0.5", "")).await.status(), 502);
    let text = proxy.metrics().await;
    for expected in [
        "routellm_router_decisions_total{router=\"fixed_high\",tier=\"strong\"} 1\n",
        "routellm_router_score_count{router=\"fixed_high\"} 1\n",
        "routellm_router_decisions_total{router=\"failing\",tier=\"strong\"} 1\n",
        "routellm_router_score_count{router=\"failing\"} 0\n",
    ] {
        assert!(text.contains(expected), "{expected} in {text}");
    }
}

/// `scoring_timeout_ms` bounds what a router may add to a request: past it, without a
/// fallback, the client gets OpenAI's error shape with a retryable 503, no model is called,
/// and /metrics counts the timeout.
#[tokio::test]
async fn a_router_slower_than_scoring_timeout_gets_a_503_and_is_counted() {
    let (strong, weak) = (MockUpstream::start("strong").await, MockUpstream::start("weak").await);
    let mut routers: std::collections::BTreeMap<String, std::sync::Arc<dyn routellm::Router>> =
        std::collections::BTreeMap::new();
    let router = SlowRouter {
        running: 0.into(),
        most: 0.into(),
        cost: routellm::routers::ScoringCost::Blocking,
        delay: Duration::from_secs(1),
    };
    routers.insert("bert".into(), std::sync::Arc::new(router));
    let proxy = Proxy::start_with(
        &strong.base_url(),
        &weak.base_url(),
        "scoring_timeout_ms: 50\non_router_error: error\n",
        routers,
    )
    .await;
    let error = openai_error(proxy.post_chat(&body("router-bert-0.5", "")).await, 503).await;
    assert_eq!(error["type"], "server_error");
    assert_eq!(error["code"], "router_timeout");
    assert!(error["message"].as_str().unwrap().contains("within 50 ms"), "{error}");
    assert_eq!(strong.received().len() + weak.received().len(), 0);
    let text = proxy.metrics().await;
    assert!(
        text.contains("routellm_router_timeouts_total{router=\"bert\"} 1\n"),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_count_the_tokens_each_tier_answered_with() {
    let (_strong, _weak, proxy) = setup("").await;
    let tokens = |text: &str, tier: &str, kind: &str| -> u64 {
        metric(
            text,
            &format!("routellm_tokens_total{{tier=\"{tier}\",kind=\"{kind}\"}}"),
        )
    };
    // A whole answer: the mock reports 1 prompt and 3 completion tokens.
    assert_eq!(proxy.post_chat(&body("router-random-0", "")).await.status(), 200);
    assert_eq!(proxy.post_chat(&body("router-random-1", "")).await.status(), 200);
    assert_eq!(proxy.post_chat(&body("router-random-1", "")).await.status(), 200);
    let text = proxy.metrics().await;
    assert_eq!(tokens(&text, "strong", "prompt"), 1);
    assert_eq!(tokens(&text, "strong", "completion"), 3);
    // The time spent waiting on each model, by the tier that answered.
    assert_eq!(
        metric::<u64>(&text, "routellm_upstream_seconds_count{tier=\"strong\"}"),
        1
    );
    assert_eq!(
        metric::<u64>(&text, "routellm_upstream_seconds_count{tier=\"weak\"}"),
        2
    );
    assert_eq!(tokens(&text, "weak", "prompt"), 2);
    assert_eq!(tokens(&text, "weak", "completion"), 6);

    // A stream that asked for usage: its usage chunk (split across two upstream writes)
    // is counted and still reaches the client byte for byte.
    let streamed = proxy
        .post_chat(&body(
            "router-random-1",
            r#","stream":true,"stream_options":{"include_usage":true}"#,
        ))
        .await;
    assert_eq!(streamed.status(), 200);
    let events = streamed.text().await.unwrap();
    assert!(
        events.contains(r#""usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#),
        "{events}"
    );
    assert!(events.ends_with("data: [DONE]\n\n"), "{events}");
    // A stream that did not ask has no usage to count, and none is requested for it.
    let plain = proxy.post_chat(&body("router-random-0", r#","stream":true"#)).await;
    assert!(!plain.text().await.unwrap().contains("usage"));
    let text = proxy.metrics().await;
    assert_eq!(tokens(&text, "weak", "prompt"), 2 + 5);
    assert_eq!(tokens(&text, "weak", "completion"), 6 + 2);
    assert_eq!(tokens(&text, "strong", "prompt"), 1);
    assert_eq!(tokens(&text, "direct", "prompt"), 0);
}

#[tokio::test]
async fn an_unavailable_model_is_passed_on_unless_other_model_is_configured() {
    use axum::http::StatusCode;
    // Default: the chosen model's 503 reaches the client, and the other model is not asked.
    let (strong, weak, proxy) = setup("").await;
    strong.set_unavailable(Some(StatusCode::SERVICE_UNAVAILABLE));
    let response = proxy.post_chat(&body("router-random-0", "")).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("x-routellm-fallback").is_none());
    assert_eq!((strong.received().len(), weak.received().len()), (1, 0));

    // other_model: a rate-limited or failing strong model is replaced by the weak one.
    let (strong, weak, proxy) = setup("on_upstream_error: other_model\n").await;
    for status in [StatusCode::TOO_MANY_REQUESTS, StatusCode::INTERNAL_SERVER_ERROR] {
        strong.set_unavailable(Some(status));
        let response = proxy.post_chat(&body("router-random-0", "")).await;
        assert_eq!(response.status(), 200, "after {status}");
        let headers = response.headers().clone();
        assert_eq!(headers["x-routellm-fallback"], "upstream_error");
        assert_eq!(headers["x-routellm-tier"], "weak");
        assert_eq!(headers["x-routellm-model"], "together_ai/weak-model");
        assert!(headers.get("x-routellm-win-rate").is_some(), "the router did score");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], "answer from weak");
    }
    // The weak model got the request as it would have, with its own model name and key.
    let forwarded = weak.received();
    assert_eq!(forwarded.len(), 2);
    assert_eq!(forwarded[0].json()["model"], "weak-model");
    assert_eq!(forwarded[0].headers["authorization"], "Bearer sk-weak");
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("routellm_upstream_fallbacks_total{from=\"strong\"} 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("routellm_requests_total{tier=\"weak\",status=\"2xx\"} 2\n"),
        "{metrics}"
    );

    // The client's own mistake is not an outage: a 400 is passed on, the other model not asked.
    strong.set_unavailable(None);
    let rejected = proxy
        .post_chat(&body("router-random-0", r#","mock":"bad_request""#))
        .await;
    assert_eq!(rejected.status(), 400);
    assert_eq!(weak.received().len(), 2);
    // A model named directly is never swapped.
    strong.set_unavailable(Some(StatusCode::SERVICE_UNAVAILABLE));
    let direct = proxy.post_chat(&body("openai/strong-model", "")).await;
    assert_eq!(direct.status(), 503);
    assert_eq!(weak.received().len(), 2);
    // Both unavailable: the other model's error is the answer, and says whose it is.
    weak.set_unavailable(Some(StatusCode::BAD_GATEWAY));
    let both = proxy.post_chat(&body("router-random-0", "")).await;
    assert_eq!(both.status(), 502);
    assert_eq!(both.headers()["x-routellm-fallback"], "upstream_error");
    assert_eq!(both.headers()["x-routellm-model"], "together_ai/weak-model");
    let error: Value = both.json().await.unwrap();
    assert_eq!(error["error"]["message"], "weak is unavailable");

    // An unreachable weak model: a stream is answered by the strong one.
    let strong = MockUpstream::start("strong").await;
    let dead = format!("http://127.0.0.1:{}/v1", closed_port().await);
    let proxy = Proxy::start(&strong.base_url(), &dead, "on_upstream_error: other_model\n").await;
    let response = proxy.post_chat(&body("router-random-1", r#","stream":true"#)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-routellm-tier"], "strong");
    assert_eq!(response.headers()["x-routellm-fallback"], "upstream_error");
    let events = response.text().await.unwrap();
    assert!(
        events.contains("from strong") && events.ends_with("data: [DONE]\n\n"),
        "{events}"
    );
}

#[tokio::test]
async fn a_router_that_cannot_score_falls_back_to_the_configured_model() {
    async fn setup(yaml: &str) -> (MockUpstream, MockUpstream, Proxy) {
        let (strong, weak) = (MockUpstream::start("strong").await, MockUpstream::start("weak").await);
        let mut routers: std::collections::BTreeMap<String, std::sync::Arc<dyn routellm::routers::Router>> =
            std::collections::BTreeMap::new();
        routers.insert("failing".into(), std::sync::Arc::new(FailingRouter));
        routers.insert("fixed_high".into(), std::sync::Arc::new(FixedRouter(0.8)));
        let proxy = Proxy::start_with(&strong.base_url(), &weak.base_url(), yaml, routers).await;
        (strong, weak, proxy)
    }
    // Default: the strong model answers, and the client and the operator can tell.
    let (strong, weak, proxy) = setup("").await;
    let response = proxy.post_chat(&body("router-failing-0.5", "")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-routellm-tier"], "strong");
    assert_eq!(response.headers()["x-routellm-fallback"], "router_error");
    assert_eq!(response.headers()["x-routellm-router"], "failing");
    assert!(response.headers().get("x-routellm-win-rate").is_none());
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "answer from strong");
    assert_eq!((strong.received().len(), weak.received().len()), (1, 0));
    let metrics = proxy.metrics().await;
    assert!(metrics.contains("routellm_router_fallbacks_total 1\n"), "{metrics}");
    // A scored request carries no fallback header.
    let scored = proxy.post_chat(&body("router-fixed_high-0.5", "")).await;
    assert!(scored.headers().get("x-routellm-fallback").is_none());

    let (strong, weak, proxy) = setup("on_router_error: weak\n").await;
    let response = proxy.post_chat(&body("router-failing-0.5", "")).await;
    assert_eq!(response.headers()["x-routellm-tier"], "weak");
    assert_eq!((strong.received().len(), weak.received().len()), (0, 1));

    // `error`: nothing is forwarded; the client gets OpenAI's error shape.
    let (strong, weak, proxy) = setup("on_router_error: error\n").await;
    let response = proxy.post_chat(&body("router-failing-0.5", "")).await;
    let error = openai_error(response, 500).await;
    assert_eq!(error["code"], "router_error");
    assert!(error["message"].as_str().unwrap().contains("failing"), "{error}");
    assert_eq!((strong.received().len(), weak.received().len()), (0, 0));

    // Client mistakes are never masked by the fallback.
    let (_strong, _weak, proxy) = setup("").await;
    openai_error(proxy.post_chat(&body("router-nosuch-0.5", "")).await, 400).await;
}

/// A slow router: sleeps `delay` on the blocking pool and records how many run at once;
/// `cost` says whether it claims CPU (`Blocking`) or waits on the network (`Remote`).
struct SlowRouter {
    running: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
    cost: routellm::routers::ScoringCost,
    delay: Duration,
}

impl routellm::routers::Router for SlowRouter {
    fn scoring_cost(&self) -> routellm::routers::ScoringCost {
        self.cost
    }

    fn strong_win_rate(&self, _prompt: &str) -> Result<f64, routellm::routers::RouterError> {
        use std::sync::atomic::Ordering;
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        self.running.fetch_sub(1, Ordering::SeqCst);
        Ok(0.9)
    }
}

/// Sends `requests` concurrent requests through a proxy whose only router is slow and
/// scores at `cost`, with `scoring_concurrency: slots`; returns how many were scored at
/// once at most.
async fn most_scored_at_once(slots: usize, requests: usize, cost: routellm::routers::ScoringCost) -> usize {
    let (strong, weak) = (MockUpstream::start("strong").await, MockUpstream::start("weak").await);
    let router = std::sync::Arc::new(SlowRouter {
        running: 0.into(),
        most: 0.into(),
        cost,
        delay: Duration::from_millis(100),
    });
    let mut routers: std::collections::BTreeMap<String, std::sync::Arc<dyn routellm::routers::Router>> =
        std::collections::BTreeMap::new();
    routers.insert("slow".into(), router.clone());
    let yaml = format!("scoring_concurrency: {slots}\n");
    let proxy = Proxy::start_with(&strong.base_url(), &weak.base_url(), &yaml, routers).await;
    let request = body("router-slow-0.5", "");
    let sends = (0..requests).map(|_| proxy.post_chat(&request));
    for response in futures_util::future::join_all(sends).await {
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-routellm-tier"], "strong");
    }
    assert_eq!(
        strong.received().len(),
        requests,
        "every queued request is still answered"
    );
    router.most.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_bound_scoring_is_bounded_by_scoring_concurrency() {
    use routellm::routers::ScoringCost::{Blocking, Remote};
    assert_eq!(
        most_scored_at_once(1, 4, Blocking).await,
        1,
        "one slot: requests wait their turn"
    );
    assert!(
        most_scored_at_once(4, 4, Blocking).await >= 2,
        "with four slots the same burst overlaps, so the bound above is what serialised it"
    );
    assert!(
        most_scored_at_once(1, 4, Remote).await >= 2,
        "a router waiting on the network does not queue behind the CPU slots"
    );
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_an_open_stream_finish() {
    let (strong, weak) = (MockUpstream::start("strong").await, MockUpstream::start("weak").await);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (proxy, server) = Proxy::start_until(&strong.base_url(), &weak.base_url(), "", async move {
        let _ = stopped.await;
    })
    .await;
    let response = proxy
        .post_chat(&body("router-random-0", r#","stream":true,"mock":"gated""#))
        .await;
    assert_eq!(response.status(), 200);
    let mut chunks = response.bytes_stream();
    let first = chunks.next().await.unwrap().unwrap();
    assert!(std::str::from_utf8(&first).unwrap().contains("from strong"));

    stop.send(()).unwrap();
    // A new connection is refused once the listener closes; the open stream is not cut.
    let fresh = reqwest::Client::new();
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        while fresh.get(proxy.url("/health")).send().await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(refused.is_ok(), "the server kept accepting connections after shutdown");
    assert!(!server.is_finished(), "the server stopped before its open stream ended");

    strong.state.gate.notify_one();
    let rest = read_to_end(chunks).await;
    assert!(rest.contains(" done") && rest.ends_with("data: [DONE]\n\n"), "{rest}");
    let drained = tokio::time::timeout(Duration::from_secs(10), server).await;
    assert!(matches!(drained, Ok(Ok(Ok(())))), "{drained:?}");
}

#[tokio::test]
async fn responses_api_requests_are_routed_like_chat_and_forwarded_unchanged() {
    let (strong, weak, proxy) = setup("").await;
    let request = r#"{"model":"router-random-0","instructions":"be brief","input":"What is 2+2?","tools":[{"type":"function","name":"add","parameters":{"type":"object","properties":{"a":{"type":"number"}},"required":["a"],"additionalProperties":false},"strict":true}],"text":{"format":{"type":"json_schema","name":"sum","schema":{"type":"object"},"strict":true}},"x_vendor":1.50}"#;
    let response = proxy.post_json("/v1/responses", request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-routellm-tier"], "strong");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["object"], "response");
    assert_eq!(answer["output"][0]["content"][0]["text"], "response from strong");
    let received = strong.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].endpoint, "responses");
    assert_eq!(
        std::str::from_utf8(&received[0].body).unwrap(),
        request.replace("router-random-0", "strong-model"),
        "only the model is rewritten"
    );

    // An input list: the last item with role `user` is what the router scores; streamed.
    let request = r#"{"model":"router-random-1","stream":true,"input":[{"role":"user","content":"hi"},{"type":"function_call_output","call_id":"c","output":"4"}]}"#;
    let response = proxy.post_json("/v1/responses", request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-routellm-tier"], "weak");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = response.text().await.unwrap();
    assert!(events.starts_with("event: response.output_text.delta\n"), "{events}");
    assert!(events.contains("event: response.completed\n"), "{events}");
    assert_eq!(weak.received()[0].endpoint, "responses");
    assert_eq!(weak.received()[0].json()["model"], "weak-model");

    // Usage from both: the answer's own and the completed event's (input/output tokens).
    let metrics = proxy.metrics().await;
    for tier in ["strong", "weak"] {
        assert!(
            metrics.contains(&format!("routellm_tokens_total{{tier=\"{tier}\",kind=\"prompt\"}} 6")),
            "{metrics}"
        );
        assert!(
            metrics.contains(&format!(
                "routellm_tokens_total{{tier=\"{tier}\",kind=\"completion\"}} 3"
            )),
            "{metrics}"
        );
    }

    // A stream that breaks ends with the Responses API's own error event.
    let request = r#"{"model":"router-random-0","stream":true,"input":"hi","mock":"break_soon"}"#;
    let events = proxy.post_json("/v1/responses", request).await.text().await.unwrap();
    let last = events.trim_end().rsplit("\n\n").next().unwrap();
    let data = last.strip_prefix("event: error\ndata: ").expect(&events);
    let error: Value = serde_json::from_str(data).unwrap();
    assert_eq!(error["type"], "error");
    assert!(error["message"].as_str().unwrap().contains("stream broke"), "{error}");

    // Errors name the Responses API's field.
    let response = proxy.post_json("/v1/responses", r#"{"model":"router-random-0"}"#).await;
    assert_eq!(openai_error(response, 400).await["param"], "input");
    let response = proxy
        .post_json(
            "/v1/responses",
            r#"{"model":"router-random-0","input":[{"role":"system","content":"x"}]}"#,
        )
        .await;
    assert_eq!(openai_error(response, 400).await["param"], "input");
    assert_eq!(strong.received().len(), 2, "invalid requests never reach a model");
}

#[tokio::test]
async fn legacy_completions_are_routed_on_the_prompt_and_forwarded_unchanged() {
    let (strong, weak, proxy) = setup("").await;
    let request = r#"{"model":"router-random-0","prompt":"Once upon a time","max_tokens":7,"suffix":"The end.","logprobs":2,"x_vendor":1.50}"#;
    let response = proxy.post_json("/v1/completions", request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-routellm-tier"], "strong");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["object"], "text_completion");
    assert_eq!(answer["choices"][0]["text"], "completion from strong");
    let received = strong.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].endpoint, "completions");
    assert_eq!(
        std::str::from_utf8(&received[0].body).unwrap(),
        request.replace("router-random-0", "strong-model"),
        "only the model is rewritten"
    );

    // A batch of prompts goes to one model; streamed, with the usage chunk asked for.
    let request =
        r#"{"model":"router-random-1","stream":true,"stream_options":{"include_usage":true},"prompt":["a","b"]}"#;
    let response = proxy.post_json("/v1/completions", request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-routellm-tier"], "weak");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = response.text().await.unwrap();
    assert!(
        events.starts_with("data: {") && events.ends_with("data: [DONE]\n\n"),
        "{events}"
    );
    assert!(events.contains(r#""text":"completion from weak""#), "{events}");
    assert_eq!(weak.received()[0].endpoint, "completions");
    assert_eq!(weak.received()[0].json()["prompt"], serde_json::json!(["a", "b"]));
    let metrics = proxy.metrics().await;
    for tier in ["strong", "weak"] {
        assert!(
            metrics.contains(&format!(
                "routellm_tokens_total{{tier=\"{tier}\",kind=\"completion\"}} 3"
            )),
            "{metrics}"
        );
    }

    // Broken and cut streams end with the same error event as chat streams.
    for (mock, reason) in [
        ("break_soon", "stream broke"),
        ("truncated", "closed before its final event"),
    ] {
        let request = format!(r#"{{"model":"router-random-0","stream":true,"prompt":"hi","mock":"{mock}"}}"#);
        let events = proxy.post_json("/v1/completions", &request).await.text().await.unwrap();
        let last = events.trim_end().rsplit("\n\n").next().unwrap();
        let error: Value = serde_json::from_str(last.strip_prefix("data: ").expect(&events)).unwrap();
        assert!(error["error"]["message"].as_str().unwrap().contains(reason), "{error}");
    }

    // Token ids carry no text to score: a router refuses them, a model named directly takes them.
    let response = proxy
        .post_json("/v1/completions", r#"{"model":"router-random-0","prompt":[1734,318]}"#)
        .await;
    let error = openai_error(response, 400).await;
    assert_eq!(error["param"], "prompt");
    assert!(error["message"].as_str().unwrap().contains("token ids"), "{error}");
    let response = proxy
        .post_json(
            "/v1/completions",
            r#"{"model":"together_ai/weak-model","prompt":[[1734,318]]}"#,
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        weak.received().last().unwrap().json()["prompt"],
        serde_json::json!([[1734, 318]])
    );
    let response = proxy
        .post_json("/v1/completions", r#"{"model":"router-random-0"}"#)
        .await;
    assert_eq!(openai_error(response, 400).await["param"], "prompt");
    assert_eq!(strong.received().len(), 3, "invalid requests never reach a model");
}

/// The prompt log holds what each routed request's router scored, with its decision, in
/// the format `calibrate --prompts` reads; requests that name a model, or fail, are not in it.
#[tokio::test]
async fn the_prompt_log_records_what_routers_scored() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let path = dir.join("traffic.jsonl");
    let (_strong, _weak, proxy) = setup(&format!(
        "score_turns: max\nprompt_log: {{path: '{}', conversations: true}}\n",
        path.display()
    ))
    .await;
    let chat = r#"{"model":"router-random-0","messages":[{"role":"user","content":"Prove it"},{"role":"assistant","content":"..."},{"role":"user","content":"now in Lean"}]}"#;
    assert_eq!(proxy.post_chat(chat).await.status(), 200);
    let responses = r#"{"model":"router-random-1","input":"What is 2+2?"}"#;
    assert_eq!(proxy.post_json("/v1/responses", responses).await.status(), 200);
    let completions = r#"{"model":"router-random-1","prompt":"Once upon a time"}"#;
    assert_eq!(proxy.post_json("/v1/completions", completions).await.status(), 200);
    assert_eq!(proxy.post_chat(&body("openai/strong-model", "")).await.status(), 200);
    assert_eq!(
        proxy
            .post_chat(r#"{"model":"router-nope-0.5","messages":[]}"#)
            .await
            .status(),
        400
    );

    let mut text = String::new();
    for _ in 0..100 {
        text = std::fs::read_to_string(&path).unwrap();
        if text.lines().count() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        routellm::prompts::parse_turns(&text, 8).unwrap(),
        [
            vec!["Prove it", "now in Lean"],
            vec!["What is 2+2?"],
            vec!["Once upon a time"]
        ]
    );
    let entries: Vec<Value> = text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    let fields = |entry: &Value| {
        (
            entry["api"].as_str().unwrap().to_owned(),
            entry["router"].as_str().unwrap().to_owned(),
            entry["threshold"].as_f64().unwrap(),
            entry["tier"].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(
        fields(&entries[0]),
        ("chat/completions".into(), "random".into(), 0.0, "strong".into())
    );
    assert_eq!(
        fields(&entries[1]),
        ("responses".into(), "random".into(), 1.0, "weak".into())
    );
    assert_eq!(fields(&entries[2]).0, "completions");
    assert_eq!(entries[0]["requested_model"], "router-random-0");
    assert_eq!(entries[1]["requested_model"], "router-random-1");
    // With `conversations`, a chat entry keeps the whole exchange for `label`; other APIs none.
    let sent: Value = serde_json::from_str(chat).unwrap();
    assert_eq!(entries[0]["conversation"], sent["messages"]);
    assert!(entries[1].get("conversation").is_none() && entries[2].get("conversation").is_none());
    let for_label = routellm::prompts::parse_entries(&text).unwrap();
    assert_eq!(for_label[0].prompt, "now in Lean");
    assert_eq!(for_label[0].conversation.as_ref().map(Vec::len), Some(3));
    assert_eq!(for_label[1].conversation, None);
    assert!(entries.iter().all(|entry| {
        entry["win_rate"]
            .as_f64()
            .is_some_and(|rate| (0.0..=1.0).contains(&rate))
    }));
    let metrics = proxy.metrics().await;
    assert!(metrics.contains("routellm_prompt_log_entries_total 3\n"), "{metrics}");
    assert!(metrics.contains("routellm_prompt_log_dropped_total 0\n"), "{metrics}");
}

/// Browser pages of the configured origins may call the API: preflights are answered
/// without a key, answers carry the CORS headers and expose the routing headers; other
/// origins, and every origin when none is configured, get no CORS headers.
#[tokio::test]
async fn cors_lets_configured_origins_call_from_a_browser() {
    let (strong, _weak, proxy) =
        setup("api_keys: [proxy-key]\ncors_allowed_origins: ['https://app.example.com']\n").await;
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, proxy.url("/v1/chat/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type,x-stainless-os",
            )
            .send()
    };
    let allowed = preflight("https://app.example.com").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    let headers = allowed.headers();
    assert_eq!(headers["access-control-allow-origin"], "https://app.example.com");
    assert!(
        headers["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    assert_eq!(
        headers["access-control-allow-headers"],
        "authorization,content-type,x-stainless-os"
    );
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    assert!(strong.received().is_empty(), "a preflight never reaches a model");

    // A page's request: from the allowed origin, with or without the proxy's key.
    let from_page = |url: String, key: Option<&'static str>| {
        let mut request = client
            .post(url)
            .header("origin", "https://app.example.com")
            .header("content-type", "application/json")
            .body(body("router-random-0", ""));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    let response = from_page(proxy.url("/v1/chat/completions"), Some("proxy-key"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        exposed.contains("x-routellm-tier") && exposed.contains("x-routellm-model"),
        "{exposed}"
    );
    // Errors carry the headers too, or the page could not read why it was refused.
    let refused = from_page(proxy.url("/v1/chat/completions"), None).await.unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(
        refused.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );

    let (_strong, _weak, plain) = setup("").await;
    let response = from_page(plain.url("/v1/chat/completions"), None).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("access-control-allow-origin").is_none());
}

/// Every answer, refusals included, says which id the access log knows it by: the client's
/// `x-request-id`, or a fresh one; the model's own `x-request-id` passes back beside it.
#[tokio::test]
async fn answers_carry_the_request_id_the_log_knows_them_by() {
    let (_strong, _weak, proxy) = setup("").await;
    let client = reqwest::Client::new();
    let send = |model: &'static str, id: Option<&'static str>| {
        let mut request = client
            .post(proxy.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body(model, ""));
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        request.send()
    };
    let request_id =
        |response: &reqwest::Response| response.headers()["x-routellm-request-id"].to_str().unwrap().to_owned();
    let traced = send("router-random-0", Some("trace-7")).await.unwrap();
    assert_eq!(request_id(&traced), "trace-7");
    assert_eq!(traced.headers()["x-request-id"], "req-mock", "the model's own id");
    let (first, second) = (
        send("router-random-0", None).await.unwrap(),
        send("router-random-0", Some("has a space")).await.unwrap(),
    );
    for made_up in [request_id(&first), request_id(&second)] {
        assert!(made_up.starts_with("req_") && made_up.len() == 36, "{made_up}");
        assert!(made_up[4..].bytes().all(|byte| byte.is_ascii_hexdigit()), "{made_up}");
    }
    assert_ne!(request_id(&first), request_id(&second));
    let refused = send("router-nope-0.5", Some("trace-8")).await.unwrap();
    assert_eq!(refused.status(), 400);
    assert_eq!(request_id(&refused), "trace-8");
}

#[tokio::test]
async fn configured_client_headers_and_provider_headers_reach_the_model() {
    use axum::http::StatusCode;
    let (strong, weak, proxy) = setup(
        "upstream:\n  forward_headers: [X-Request-Id, traceparent, x-gateway-key]\n\
         providers:\n  openai: {headers: {X-Gateway-Key: gk-strong}}\n  together_ai: {headers: {X-Gateway-Key: gk-weak}}\n\
         on_upstream_error: other_model\n",
    )
    .await;
    let send = |model: &str, stream: bool| {
        proxy
            .client
            .post(proxy.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("x-request-id", "req-1")
            .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .header("openai-organization", "org-client")
            .header("x-gateway-key", "from-the-client")
            .body(body(model, if stream { r#","stream":true"# } else { "" }))
            .send()
    };
    let response = send("router-random-0", false).await.unwrap();
    assert_eq!(response.status(), 200);
    let response = send("router-random-0", true).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(read_to_end(response.bytes_stream()).await.ends_with("data: [DONE]\n\n"));
    for received in strong.received() {
        let headers = &received.headers;
        assert_eq!(headers["x-request-id"], "req-1");
        assert!(headers["traceparent"].to_str().unwrap().starts_with("00-0af7"));
        // The operator's header for the model replaces a client's of the same name.
        assert_eq!(
            headers.get_all("x-gateway-key").iter().collect::<Vec<_>>(),
            ["gk-strong"]
        );
        assert_eq!(headers["authorization"], "Bearer sk-strong");
        assert!(
            headers.get("openai-organization").is_none(),
            "not listed, not forwarded"
        );
    }
    assert_eq!(strong.received().len(), 2);

    // A request moved to the other model carries that model's own headers.
    strong.set_unavailable(Some(StatusCode::SERVICE_UNAVAILABLE));
    let response = send("router-random-0", false).await.unwrap();
    assert_eq!(response.headers()["x-routellm-fallback"], "upstream_error");
    let moved = weak.received();
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].headers["x-request-id"], "req-1");
    assert_eq!(moved[0].headers["x-gateway-key"], "gk-weak");
    assert_eq!(moved[0].headers["authorization"], "Bearer sk-weak");

    // Without forward_headers, nothing of the client's is passed on; provider headers still are.
    let (strong, _weak, proxy) = setup("providers:\n  openai: {headers: {X-Title: our app}}\n").await;
    let response = proxy
        .client
        .post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", "req-2")
        .body(body("router-random-0", ""))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let received = strong.received();
    assert!(received[0].headers.get("x-request-id").is_none());
    assert_eq!(received[0].headers["x-title"], "our app");
}

#[tokio::test]
async fn metrics_price_each_answer_at_its_model_and_at_the_strong_model() {
    use routellm::config::{Config, FileConfig, Overrides};
    use routellm::{Gateway, Router as RouterTrait};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    let (strong, weak) = (MockUpstream::start("strong").await, MockUpstream::start("weak").await);
    let file = FileConfig::from_yaml(&format!(
        "strong_model: {{name: openai/strong-model, base_url: '{}', price_per_million_tokens: {{input: 10, output: 30}}}}\n\
         weak_model: {{name: together_ai/weak-model, base_url: '{}', price_per_million_tokens: {{input: 1, output: 2}}}}\n",
        strong.base_url(),
        weak.base_url()
    ))
    .unwrap();
    let config = Config::merge(file, Overrides::default()).unwrap();
    let routers: BTreeMap<String, Arc<dyn RouterTrait>> = BTreeMap::from([(
        "random".to_owned(),
        Arc::new(routellm::routers::RandomRouter::with_seed(3)) as Arc<dyn RouterTrait>,
    )]);
    let proxy = Proxy::with_gateway(Gateway::with_routers(&config, routers).unwrap()).await;
    let value = |text: &str, name: &str, tier: &str| -> f64 { metric(text, &format!("{name}{{tier=\"{tier}\"}}")) };
    // Whole answers report 1 prompt and 3 completion tokens; the usage-asking stream 5 and 2.
    for model in [
        "router-random-0",
        "router-random-1",
        "router-random-1",
        "together_ai/weak-model",
    ] {
        assert_eq!(proxy.post_chat(&body(model, "")).await.status(), 200, "{model}");
    }
    let streamed = proxy
        .post_chat(&body(
            "router-random-1",
            r#","stream":true,"stream_options":{"include_usage":true}"#,
        ))
        .await;
    assert!(streamed.text().await.unwrap().ends_with("data: [DONE]\n\n"));

    let text = proxy.metrics().await;
    let close = |got: f64, want: f64| assert!((got - want).abs() < 1e-12, "{got} != {want}\n{text}");
    let per_million = 1e-6;
    close(
        value(&text, "routellm_cost_total", "strong"),
        (10.0 + 3.0 * 30.0) * per_million,
    );
    close(
        value(&text, "routellm_cost_total", "weak"),
        (2.0 * (1.0 + 3.0 * 2.0) + (5.0 + 2.0 * 2.0)) * per_million,
    );
    // The weak model named directly is priced as itself.
    close(
        value(&text, "routellm_cost_total", "direct"),
        (1.0 + 3.0 * 2.0) * per_million,
    );
    close(
        value(&text, "routellm_cost_at_strong_prices_total", "weak"),
        (2.0 * (10.0 + 3.0 * 30.0) + (5.0 * 10.0 + 2.0 * 30.0)) * per_million,
    );
    close(
        value(&text, "routellm_cost_at_strong_prices_total", "strong"),
        (10.0 + 3.0 * 30.0) * per_million,
    );
}

#[tokio::test]
async fn shutdown_cuts_off_what_is_still_open_after_shutdown_timeout() {
    let (strong, weak) = (MockUpstream::start("strong").await, MockUpstream::start("weak").await);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let yaml = "shutdown_timeout_secs: 0.5\n";
    let (proxy, server) = Proxy::start_until(&strong.base_url(), &weak.base_url(), yaml, async move {
        let _ = stopped.await;
    })
    .await;
    let response = proxy
        .post_chat(&body("router-random-0", r#","stream":true,"mock":"gated""#))
        .await;
    let mut chunks = response.bytes_stream();
    assert!(
        std::str::from_utf8(&chunks.next().await.unwrap().unwrap())
            .unwrap()
            .contains("from strong")
    );
    stop.send(()).unwrap();
    // The upstream never sends the rest: the server stops on its deadline all the same.
    let stopped = tokio::time::timeout(Duration::from_secs(10), server).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        let mut rest = Vec::new();
        while let Some(Ok(chunk)) = chunks.next().await {
            rest.extend_from_slice(&chunk);
        }
        String::from_utf8(rest).unwrap()
    })
    .await
    .expect("the cut stream ends");
    assert!(!rest.contains("[DONE]"), "{rest}");
}

#[tokio::test]
async fn a_client_that_stalls_its_request_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_strong, _weak, proxy) = setup("client_timeout_secs: 0.5\n").await;

    // Half a request head, then nothing: the connection is closed, not held for ever.
    let mut stalled = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stalled
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut reply)).await;
    assert!(closed.is_ok(), "a half-sent request head kept its connection open");

    // A whole head but only part of the body: 408 in OpenAI's shape.
    let mut slow = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let mut reply = vec![0; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut reply))
        .await
        .expect("an answer before the test's own deadline")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..read]);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains(r#""code":"request_timeout""#), "{reply}");

    // Clients that send promptly are served as before.
    assert_eq!(proxy.post_chat(&body("router-random-0", "")).await.status(), 200);
}

#[tokio::test]
async fn http2_clients_are_served_too() {
    let (strong, _weak, proxy) = setup("").await;
    let client = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let response = client
        .post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body("router-random-0", r#","stream":true"#))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-routellm-tier"], "strong");
    let events = response.text().await.unwrap();
    assert!(events.ends_with("data: [DONE]\n\n"), "{events}");
    assert_eq!(strong.received().len(), 1);
}

/// `body` posted to the chat endpoint with `key` as the client's API key.
async fn post_as(proxy: &Proxy, key: &str, body: &str) -> reqwest::Response {
    proxy
        .client
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_key_over_its_request_rate_gets_openais_429_and_no_upstream_call() {
    let (strong, _weak, proxy) =
        setup("api_keys: [{key: k-limited, name: team-a, requests_per_minute: 2}, k-open]\n").await;
    for remaining in ["1", "0"] {
        let response = post_as(&proxy, "k-limited", &body("router-random-0", "")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-ratelimit-limit-requests"], "2");
        assert_eq!(response.headers()["x-ratelimit-remaining-requests"], remaining);
        assert!(
            response.headers().get("x-ratelimit-limit-tokens").is_none(),
            "no token limit set"
        );
    }
    let refused = post_as(&proxy, "k-limited", &body("router-random-0", "")).await;
    // Two a minute refill one every 30 s (less what refilled since the last request).
    let whole_seconds: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((28..=30).contains(&whole_seconds), "{whole_seconds}");
    let wait_ms: u64 = refused.headers()["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!((25_000..=30_000).contains(&wait_ms), "{wait_ms}");
    let error = openai_error(refused, 429).await;
    assert_eq!(error["type"], "requests");
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert!(error["param"].is_null());
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("`team-a`") && message.contains("(RPM): Limit 2"),
        "{message}"
    );
    assert_eq!(strong.received().len(), 2, "a refused request never reaches a model");

    // Limits are per key: another key is not held back, and gets no limit headers.
    let open = post_as(&proxy, "k-open", &body("router-random-0", "")).await;
    assert_eq!(open.status(), 200);
    assert!(open.headers().get("x-ratelimit-limit-requests").is_none());

    let text = proxy.metrics().await;
    assert_eq!(metric::<u64>(&text, r#"routellm_key_requests_total{key="team-a"}"#), 2);
    assert_eq!(
        metric::<u64>(
            &text,
            r#"routellm_key_rate_limited_total{key="team-a",limit="requests"}"#
        ),
        1
    );
    assert_eq!(
        metric::<u64>(&text, r#"routellm_key_rate_limited_total{key="team-a",limit="tokens"}"#),
        0
    );
    assert!(
        !text.contains("k-open") && !text.contains("k-limited"),
        "keys never appear"
    );
    assert!(
        text.contains(r#"routellm_requests_total{tier="none",status="4xx"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn tokens_are_charged_as_answers_report_them_or_estimated_and_a_spent_key_waits() {
    let (_strong, _weak, proxy) =
        setup("api_keys: [{key: k-tokens, name: tokens, tokens_per_minute: 10}, {key: k-counted, name: counted}]\n")
            .await;
    // 4 tokens (the mock's usage) of 10, then 7 from a stream's usage chunk: one over.
    let first = post_as(&proxy, "k-tokens", &body("router-random-0", "")).await;
    assert_eq!(first.headers()["x-ratelimit-remaining-tokens"], "10", "as admitted");
    first.text().await.unwrap();
    let second = post_as(
        &proxy,
        "k-tokens",
        &body(
            "router-random-0",
            r#","stream":true,"stream_options":{"include_usage":true}"#,
        ),
    )
    .await;
    assert_eq!(second.headers()["x-ratelimit-remaining-tokens"], "6");
    assert!(read_to_end(second.bytes_stream()).await.contains("[DONE]"));
    let tokens_of =
        |text: &str, key: &str| metric::<u64>(text, &format!(r#"routellm_key_tokens_total{{key="{key}"}}"#));
    let charged = async |key: &str, expected: u64| {
        // A stream is charged when the server drops it, just after the client read its end.
        for _ in 0..100 {
            if tokens_of(&proxy.metrics().await, key) == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{key} was not charged {expected}: {}", proxy.metrics().await);
    };
    charged("tokens", 11).await;
    let refused = post_as(&proxy, "k-tokens", &body("router-random-0", "")).await;
    let wait_ms: u64 = refused.headers()["retry-after-ms"].to_str().unwrap().parse().unwrap();
    // One token in debt, one needed: two at ten a minute is 12 s (less what refilled meanwhile).
    assert!((8_000..=12_000).contains(&wait_ms), "{wait_ms}");
    let error = openai_error(refused, 429).await;
    assert_eq!(error["type"], "tokens");
    assert!(
        error["message"].as_str().unwrap().contains("(TPM): Limit 10"),
        "{error}"
    );

    // A stream that reports no usage is charged an estimate: a token per four bytes of the
    // request and one per event (two chunks and [DONE]).
    let request = body("router-random-0", r#","stream":true"#);
    let stream = post_as(&proxy, "k-counted", &request).await;
    assert!(read_to_end(stream.bytes_stream()).await.contains("[DONE]"));
    charged("counted", (request.len() as u64).div_ceil(4) + 3).await;
}

#[tokio::test]
async fn a_key_limited_to_some_models_sees_and_uses_only_those() {
    let (strong, weak, proxy) = setup(
        "model_aliases: {auto: router-random-0}\nthresholds: {fixed_high: 0.5}\n\
         api_keys: [{key: k-narrow, name: narrow, models: [auto, router-fixed_high]}, k-wide]\n",
    )
    .await;
    let listed = |key: &'static str| {
        let request = proxy.client.get(proxy.url("/v1/models")).bearer_auth(key);
        async move {
            let models: Value = request.send().await.unwrap().json().await.unwrap();
            models["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|model| model["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed("k-narrow").await, ["router-fixed_high-0.5", "auto"]);
    assert_eq!(listed("k-wide").await.len(), 5);
    let retrieve = proxy
        .client
        .get(proxy.url("/v1/models/openai/strong-model"))
        .bearer_auth("k-narrow")
        .send()
        .await
        .unwrap();
    openai_error(retrieve, 404).await;

    for (model, status) in [
        ("auto", 200),
        ("router-fixed_high-0.9", 200),
        ("router-fixed_high", 200),
        ("router-random-0", 404),
        ("openai/strong-model", 404),
    ] {
        let response = post_as(&proxy, "k-narrow", &body(model, "")).await;
        assert_eq!(response.status(), status, "{model}");
        if status == 404 {
            let error = openai_error(response, 404).await;
            assert_eq!(error["code"], "model_not_found");
            assert!(
                error["message"].as_str().unwrap().contains("do not have access"),
                "{error}"
            );
        }
    }
    assert_eq!(strong.received().len() + weak.received().len(), 3);
    let response = post_as(&proxy, "k-wide", &body("openai/strong-model", "")).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_limited_keys_rate_headers_replace_the_providers() {
    let (_strong, _weak, proxy) =
        setup("api_keys: [{key: k-limited, name: limited, requests_per_minute: 5}, k-open]\n").await;
    // The mock's 429 carries the provider account's x-ratelimit-remaining-requests: 0.
    let provider_limited = body("router-random-0", r#","mock":"rate_limited""#);
    let theirs = post_as(&proxy, "k-open", &provider_limited).await;
    assert_eq!(theirs.status(), 429);
    assert_eq!(theirs.headers()["x-ratelimit-remaining-requests"], "0");
    let ours = post_as(&proxy, "k-limited", &provider_limited).await;
    assert_eq!(ours.status(), 429, "the provider's answer is still passed on");
    let remaining: Vec<_> = ours
        .headers()
        .get_all("x-ratelimit-remaining-requests")
        .iter()
        .collect();
    assert_eq!(remaining, ["4"], "the key's own count, once");
    assert_eq!(ours.headers()["x-ratelimit-limit-requests"], "5");
}

/// The status line's code for a request sent byte for byte (reqwest would resolve `..`
/// segments before sending, as any URL parser does).
async fn raw_status(proxy: &Proxy, request_line: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!("{request_line}\r\nHost: x\r\nAuthorization: Bearer k-team\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer.split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn passthrough_paths_reach_their_model_unrouted_and_nothing_else_does() {
    let (strong, weak, proxy) = setup(
        "passthrough: {paths: [embeddings, files/*], to: weak}\n\
         api_keys: [{key: k-team, name: team, requests_per_minute: 100, models: [router-random]}]\n",
    )
    .await;
    let embeddings = r#"{"model":"text-embedding-3-small","input":"Hello","dimensions":64}"#;
    let response = proxy
        .client
        .post(proxy.url("/v1/embeddings"))
        .bearer_auth("k-team")
        .header("content-type", "application/json")
        .body(embeddings)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-routellm-model"], "together_ai/weak-model");
    // The key's own rate headers, not the provider account's 4999.
    assert_eq!(response.headers()["x-ratelimit-remaining-requests"], "99");
    assert!(response.headers().get("x-routellm-tier").is_none(), "not routed");
    let multi: Vec<_> = response.headers().get_all("x-mock-multi").iter().collect();
    assert_eq!(multi, ["one", "two"], "every value of a repeated header");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["uri"], "/v1/embeddings");
    let received = weak.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].body,
        embeddings.as_bytes(),
        "forwarded byte for byte, model unchanged"
    );
    assert_eq!(received[0].headers["authorization"], "Bearer sk-weak");
    assert_eq!(received[0].headers["content-type"], "application/json");

    let file = proxy
        .client
        .get(proxy.url("/v1/files/file-abc/content?purpose=batch"))
        .bearer_auth("k-team")
        .send()
        .await
        .unwrap();
    assert_eq!(file.status(), 200);
    let answer: Value = file.json().await.unwrap();
    assert_eq!(
        (answer["method"].as_str(), answer["uri"].as_str()),
        (Some("GET"), Some("/v1/files/file-abc/content?purpose=batch"))
    );

    for (path, status) in [
        ("/v1/moderations", 404), // not listed
        ("/v1/files", 404),       // `files/*` is below files/ only
        ("/v1/fine_tuning/jobs", 404),
    ] {
        let response = proxy
            .client
            .post(proxy.url(path))
            .bearer_auth("k-team")
            .body("{}")
            .send()
            .await
            .unwrap();
        let error = openai_error(response, status).await;
        assert!(
            error["message"].as_str().unwrap().starts_with("Invalid URL"),
            "{path}: {error}"
        );
    }
    // No climbing out of a listed prefix, however the dots are written.
    for line in [
        "GET /v1/files/../fine_tuning/jobs HTTP/1.1",
        "GET /v1/files/%2e%2e/fine_tuning/jobs HTTP/1.1",
        "GET /v1/files/x/..%2Fy HTTP/1.1",
    ] {
        assert_eq!(raw_status(&proxy, line).await, 404, "{line}");
    }
    let anonymous = proxy
        .client
        .post(proxy.url("/v1/embeddings"))
        .body(embeddings)
        .send()
        .await
        .unwrap();
    openai_error(anonymous, 401).await;
    assert_eq!(weak.received().len(), 2, "only the two allowed requests arrived");
    assert!(strong.received().is_empty());

    let text = proxy.metrics().await;
    assert_eq!(
        metric::<u64>(&text, r#"routellm_passthrough_requests_total{status="2xx"}"#),
        2
    );
    assert_eq!(
        metric::<u64>(&text, r#"routellm_passthrough_requests_total{status="4xx"}"#),
        1
    );
    // The embedding's reported usage plus the file request's estimate (no body: nothing).
    assert_eq!(metric::<u64>(&text, r#"routellm_key_tokens_total{key="team"}"#), 8);
}

#[tokio::test]
async fn passthrough_calls_spend_a_keys_budget_at_their_own_price() {
    let (strong, weak) = (MockUpstream::start("strong").await, MockUpstream::start("weak").await);
    let yaml = |price: &str| {
        format!(
            "strong_model: {{name: openai/strong-model, base_url: '{}', api_key: sk-strong, price_per_million_tokens: {{input: 5, output: 15}}}}\n\
             weak_model: {{name: together_ai/weak-model, base_url: '{}', api_key: sk-weak, price_per_million_tokens: {{input: 0.5, output: 0.5}}}}\n\
             api_keys: [{{key: k-team, name: team, budget: {{limit: 0.00001, per: day}}}}]\n\
             passthrough: {{paths: [embeddings], to: weak{price}}}\n",
            strong.base_url(),
            weak.base_url()
        )
    };
    // Without a price, a budgeted key could embed without limit: start-up says so.
    let unpriced = routellm::config::Config::merge(
        routellm::config::FileConfig::from_yaml(&yaml("")).unwrap(),
        routellm::config::Overrides::default(),
    )
    .unwrap();
    let error = routellm::gateway::Gateway::with_routers(&unpriced, std::collections::BTreeMap::new())
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("passthrough.price_per_million_tokens"), "{error}");

    // At 1 per million input tokens, each embedding (8 tokens) costs 0.000008: the second
    // crosses the budget of 0.00001 and completes, the third is refused.
    let proxy = Proxy::start_config(&yaml(", price_per_million_tokens: {input: 1, output: 0}")).await;
    let embed = || {
        proxy
            .client
            .post(proxy.url("/v1/embeddings"))
            .bearer_auth("k-team")
            .header("content-type", "application/json")
            .body(r#"{"model":"text-embedding-3-small","input":"Hello"}"#)
            .send()
    };
    assert_eq!(embed().await.unwrap().status(), 200);
    assert_eq!(embed().await.unwrap().status(), 200);
    let refused = openai_error(embed().await.unwrap(), 429).await;
    assert_eq!(refused["code"], "insufficient_quota", "{refused}");
    assert_eq!(weak.received().len(), 2, "the refused call never reached the model");
    let text = proxy.metrics().await;
    let spent: f64 = text
        .lines()
        .find(|line| line.starts_with("routellm_key_spend{key=\"team\""))
        .and_then(|line| line.rsplit(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!((spent - 16e-6).abs() < 1e-12, "{spent}");
}

#[tokio::test]
async fn a_responses_continuation_goes_to_the_model_that_stored_the_conversation() {
    // The two mocks are two endpoints, so neither can continue the other's answers.
    let (strong, weak, proxy) = setup("on_upstream_error: other_model\n").await;
    let respond = async |body: &str| {
        let response = proxy.post_json("/v1/responses", body).await;
        assert_eq!(response.status(), 200, "{body}");
        let tier = response.headers()["x-routellm-tier"].to_str().unwrap().to_owned();
        let note = response
            .headers()
            .get("x-routellm-fallback")
            .map(|value| value.to_str().unwrap().to_owned());
        (tier, note, response.text().await.unwrap())
    };
    let (tier, note, answer) = respond(r#"{"model":"router-random-0","input":"Hello"}"#).await;
    assert_eq!((tier.as_str(), note), ("strong", None));
    assert!(answer.contains(r#""id":"resp_strong""#), "{answer}");

    // Threshold 1 would send it to the weak model; the conversation lives at the strong one.
    let continuation = r#"{"model":"router-random-1","input":"And then?","previous_response_id":"resp_strong"}"#;
    let (tier, note, _) = respond(continuation).await;
    assert_eq!((tier.as_str(), note.as_deref()), ("strong", Some("previous_response")));
    let sent = strong.received().last().unwrap().json();
    assert_eq!(
        (sent["previous_response_id"].as_str(), sent["model"].as_str()),
        (Some("resp_strong"), Some("strong-model"))
    );

    // An id the proxy never saw (another replica's, or from before a restart) is routed by score.
    let (tier, note, _) =
        respond(r#"{"model":"router-random-1","input":"Hi","previous_response_id":"resp_elsewhere"}"#).await;
    assert_eq!((tier.as_str(), note), ("weak", None));

    // A stream's id is read as it passes.
    let (tier, _, streamed) = respond(r#"{"model":"router-random-1","input":"Hello","stream":true}"#).await;
    assert!(tier == "weak" && streamed.contains("resp_weak"), "{streamed}");
    let (tier, note, _) =
        respond(r#"{"model":"router-random-0","input":"More","previous_response_id":"resp_weak"}"#).await;
    assert_eq!((tier.as_str(), note.as_deref()), ("weak", Some("previous_response")));

    // The other model could not continue it, so an unavailable one is not swapped out.
    strong.set_unavailable(Some(axum::http::StatusCode::SERVICE_UNAVAILABLE));
    let unavailable = proxy.post_json("/v1/responses", continuation).await;
    assert_eq!(unavailable.status(), 503);
    assert_eq!(weak.received().len(), 3, "the weak model was not asked");

    let text = proxy.metrics().await;
    assert_eq!(
        metric::<u64>(&text, "routellm_previous_response_pins_total"),
        3,
        "the refused one too"
    );
}

/// A passthrough answer that is not JSON — a file's contents, a run's events — reaches the
/// client as it arrives, not once the upstream is done; a download cut off upstream fails
/// the client's transfer, and an event stream cut off ends with an `event: error`.
#[tokio::test]
async fn passthrough_streams_downloads_and_event_streams_and_never_truncates_them_silently() {
    let (_strong, weak, proxy) = setup("passthrough: {paths: [files/*, threads/*], to: weak}\n").await;
    for (path, content_type, first, second) in [
        (
            "/v1/files/file-1/content?mock=stream",
            "application/octet-stream",
            "part-one;",
            "part-two",
        ),
        (
            "/v1/threads/thread_1/runs?mock=stream",
            "text/event-stream",
            "event: thread.run.created\ndata: {\"id\":\"run_1\"}\n\n",
            "event: done\ndata: [DONE]\n\n",
        ),
    ] {
        let response = proxy.client.post(proxy.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], content_type);
        assert_eq!(response.headers()["x-routellm-model"], "together_ai/weak-model");
        let mut body = response.bytes_stream();
        // The mock holds its second part until the gate opens: the first must arrive before.
        let early = chunk_before_the_rest(&mut body, Duration::from_secs(5)).await;
        assert_eq!(early, first.as_bytes(), "{path}");
        weak.state.gate.notify_one();
        let mut rest = Vec::new();
        while let Some(chunk) = body.next().await {
            rest.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(rest, second.as_bytes(), "{path}");
    }

    let download = proxy
        .client
        .get(proxy.url("/v1/files/file-1/content?mock=break"))
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200, "committed with the first bytes");
    weak.state.gate.notify_one();
    assert!(
        download.bytes().await.is_err(),
        "a download the upstream broke off is a failed transfer, not a short file"
    );
    let events = proxy.post_json("/v1/threads/thread_1/runs?mock=break", "{}").await;
    weak.state.gate.notify_one();
    let text = events.text().await.unwrap();
    assert!(text.starts_with("event: thread.run.created"), "{text}");
    let error_event = text
        .split("\n\n")
        .find(|event| event.contains("event: error"))
        .expect(&text);
    let data: Value = serde_json::from_str(error_event.trim().strip_prefix("event: error\ndata: ").unwrap()).unwrap();
    assert_eq!(data["error"]["type"], "upstream_error", "{data}");
}

/// `routellm health`, the image's health check: exit status 0 while the server answers
/// `/health` at the port the flags, environment or config name (an address for every
/// interface asked on loopback), and 1 with the reason when nothing answers there.
#[tokio::test]
async fn the_health_command_says_whether_the_server_answers() {
    let (_strong, _weak, proxy) = setup("").await;
    let port = proxy.addr.port().to_string();
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let config = dir.join("config.yaml");
    std::fs::write(&config, format!("host: 0.0.0.0\nport: {port}\n")).unwrap();
    let health = |args: Vec<String>| async move {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_routellm"));
        command
            .arg("health")
            .args(args)
            .env_remove("ROUTELLM_CONFIG")
            .env_remove("ROUTELLM_PORT")
            .env_remove("ROUTELLM_HOST")
            .kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(30), command.output())
            .await
            .expect("health exits by itself")
            .unwrap();
        let said = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), said)
    };
    let (up, said) = health(vec!["--port".into(), port.clone()]).await;
    assert!(up, "{said}");
    assert!(said.contains(&format!("http://127.0.0.1:{port}/health: ok")), "{said}");
    let (up, said) = health(vec!["--config".into(), config.display().to_string()]).await;
    assert!(up, "the config's port, asked on loopback: {said}");

    let closed = closed_port().await.to_string();
    let (up, said) = health(vec![
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        closed.clone(),
    ])
    .await;
    assert!(!up, "nothing listens on {closed}");
    assert!(
        said.contains(&format!("127.0.0.1:{closed}/health does not answer")),
        "{said}"
    );
}
