//! Several deployments per tier: failover and round robin over mock upstreams, cooldowns,
//! streams, the other tier as the last resort, and Responses continuations kept where
//! their conversation is stored.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{MockUpstream, Proxy, openai_error};
use serde_json::Value;

const TO_STRONG: &str = r#"{"model":"router-fixed_high-0.5","messages":[{"role":"user","content":"Hello"}]}"#;
const TO_WEAK: &str = r#"{"model":"router-fixed_high-0.9","messages":[{"role":"user","content":"Hello"}]}"#;

/// The strong tier served by `first` then `second` (each its own name, key and endpoint),
/// the weak by `weak`; `extra` YAML after.
fn two_strong(first: &MockUpstream, second: &MockUpstream, weak: &MockUpstream, extra: &str) -> String {
    format!(
        "strong_model:\n\
         \x20 - {{name: openai/strong-primary, base_url: '{}', api_key: sk-first}}\n\
         \x20 - {{name: groq/strong-backup, base_url: '{}', api_key: sk-second}}\n\
         weak_model: {{name: together_ai/weak-model, base_url: '{}', api_key: sk-weak}}\n{extra}",
        first.base_url(),
        second.base_url(),
        weak.base_url()
    )
}

/// The strong tier one model, the weak tier two deployments taking turns: each its
/// entry's other keys (`name: ...`) and its mock's endpoint.
fn two_weak_round_robin(strong: &MockUpstream, weak: [(&str, &MockUpstream); 2]) -> String {
    let [(first, one), (second, two)] = weak;
    format!(
        "strong_model: {{name: openai/strong-model, base_url: '{}'}}\n\
         weak_model:\n\
         \x20 - {{{first}, base_url: '{}'}}\n\
         \x20 - {{{second}, base_url: '{}'}}\n\
         load_balancing: {{strategy: round_robin}}\n",
        strong.base_url(),
        one.base_url(),
        two.base_url()
    )
}

/// Mock upstreams called `names`, each on its own port.
async fn mocks<const N: usize>(names: [&'static str; N]) -> [MockUpstream; N] {
    let mut started = Vec::with_capacity(N);
    for name in names {
        started.push(MockUpstream::start(name).await);
    }
    started.try_into().unwrap_or_else(|_| unreachable!("one mock per name"))
}

fn metric_line<'a>(metrics: &'a str, prefix: &str) -> &'a str {
    metrics
        .lines()
        .find(|line| line.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"))
}

#[tokio::test]
async fn failover_sends_a_request_on_to_the_next_deployment_and_passes_over_the_unavailable_one() {
    let [first, second, weak] = mocks(["first", "second", "weak"]).await;
    let proxy = Proxy::start_config(&two_strong(
        &first,
        &second,
        &weak,
        "load_balancing: {cooldown_secs: 0.5}\n",
    ))
    .await;

    // Healthy: the first listed answers every request; the second stands by.
    for _ in 0..2 {
        let response = proxy.post_chat(TO_STRONG).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-routellm-model"], "openai/strong-primary");
    }
    assert_eq!((first.received().len(), second.received().len()), (2, 0));

    first.set_unavailable(Some(StatusCode::SERVICE_UNAVAILABLE));
    let response = proxy.post_chat(TO_STRONG).await;
    assert_eq!(response.status(), 200, "the backup answered");
    assert_eq!(response.headers()["x-routellm-model"], "groq/strong-backup");
    assert_eq!(response.headers()["x-routellm-tier"], "strong");
    assert!(
        response.headers().get("x-routellm-fallback").is_none(),
        "the same model answered: not a fallback to the other tier"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "answer from second");
    let sent = second.received();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].json()["model"],
        "strong-backup",
        "each deployment gets its own model name"
    );
    assert_eq!(sent[0].headers["authorization"], "Bearer sk-second", "and its own key");
    assert_eq!(first.received().len(), 3);

    // Within the cooldown the failed deployment is passed over: no second wasted attempt.
    let response = proxy.post_chat(TO_STRONG).await;
    assert_eq!(response.headers()["x-routellm-model"], "groq/strong-backup");
    assert_eq!((first.received().len(), second.received().len()), (3, 2));
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_line(
            &metrics,
            "routellm_deployment_available{tier=\"strong\",deployment=\"0\""
        ),
        "routellm_deployment_available{tier=\"strong\",deployment=\"0\",model=\"openai/strong-primary\"} 0"
    );
    assert!(
        metrics.contains(
            "routellm_deployment_attempts_total{tier=\"strong\",deployment=\"0\",model=\"openai/strong-primary\",outcome=\"unavailable\"} 1\n"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "routellm_deployment_attempts_total{tier=\"strong\",deployment=\"1\",model=\"groq/strong-backup\",outcome=\"answered\"} 2\n"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "routellm_deployment_available{tier=\"weak\",deployment=\"0\",model=\"together_ai/weak-model\"} 1\n"
        ),
        "{metrics}"
    );

    // Recovered and past its cooldown, the first listed is first again.
    first.set_unavailable(None);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let response = proxy.post_chat(TO_STRONG).await;
    assert_eq!(response.headers()["x-routellm-model"], "openai/strong-primary");
    assert_eq!((first.received().len(), second.received().len()), (4, 2));
    assert!(weak.received().is_empty());
}

#[tokio::test]
async fn round_robin_spreads_requests_and_a_stream_fails_over_before_its_first_byte() {
    let [strong, one, two] = mocks(["strong", "one", "two"]).await;
    let proxy = Proxy::start_config(&two_weak_round_robin(
        &strong,
        [("name: vllm/llama", &one), ("name: vllm/llama", &two)],
    ))
    .await;
    for _ in 0..4 {
        let response = proxy.post_chat(TO_WEAK).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-routellm-model"], "vllm/llama");
    }
    assert_eq!((one.received().len(), two.received().len()), (2, 2), "turns taken");

    // A rate-limited replica: the stream is served whole by the other one.
    one.set_unavailable(Some(StatusCode::TOO_MANY_REQUESTS));
    let stream = r#"{"model":"router-fixed_high-0.9","stream":true,"messages":[{"role":"user","content":"Hello"}]}"#;
    for _ in 0..2 {
        let response = proxy.post_chat(stream).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let text = response.text().await.unwrap();
        assert!(text.contains("from two") && text.contains("[DONE]"), "{text}");
    }
    assert_eq!(
        one.received().len(),
        3,
        "asked once, then passed over for its retry-after (600 ms)"
    );
    assert_eq!(two.received().len(), 4);
    // /v1/models lists a model once however many replicas serve it.
    let models = proxy.get_json("/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids.iter().filter(|id| **id == "vllm/llama").count(), 1, "{ids:?}");
    assert!(strong.received().is_empty());
}

#[tokio::test]
async fn with_every_deployment_unavailable_the_last_error_is_the_answer_or_the_other_tier_answers() {
    let [first, second, weak] = mocks(["first", "second", "weak"]).await;
    first.set_unavailable(Some(StatusCode::INTERNAL_SERVER_ERROR));
    second.set_unavailable(Some(StatusCode::BAD_GATEWAY));
    let proxy = Proxy::start_config(&two_strong(&first, &second, &weak, "")).await;
    let error = openai_error(proxy.post_chat(TO_STRONG).await, 502).await;
    assert_eq!(
        error["message"], "second is unavailable",
        "the last deployment's own error"
    );
    // Both are cooling now; they are still tried (soonest back first) rather than refused.
    let response = proxy.post_chat(TO_STRONG).await;
    assert_eq!(response.status(), 502);
    assert_eq!((first.received().len(), second.received().len()), (2, 2));
    assert!(weak.received().is_empty());

    // A client naming one deployment's model gets that model, from its other deployment
    // when it is unavailable.
    second.set_unavailable(None);
    let direct = r#"{"model":"openai/strong-primary","messages":[{"role":"user","content":"Hello"}]}"#;
    let response = proxy.post_chat(direct).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-routellm-model"], "groq/strong-backup");

    // With on_upstream_error: other_model, the other tier answers once the whole tier failed.
    second.set_unavailable(Some(StatusCode::BAD_GATEWAY));
    let proxy = Proxy::start_config(&two_strong(&first, &second, &weak, "on_upstream_error: other_model\n")).await;
    let response = proxy.post_chat(TO_STRONG).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-routellm-model"], "together_ai/weak-model");
    assert_eq!(response.headers()["x-routellm-fallback"], "upstream_error");
    assert_eq!(weak.received().len(), 1);
}

#[tokio::test]
async fn a_responses_continuation_goes_to_the_deployment_that_stored_its_conversation() {
    let [strong, one, two] = mocks(["strong", "one", "two"]).await;
    let proxy = Proxy::start_config(&two_weak_round_robin(
        &strong,
        [
            ("name: openai/gpt-4o-mini, api_key: sk-one", &one),
            ("name: azure/gpt-4o-mini, api_key: sk-two", &two),
        ],
    ))
    .await;
    let first = proxy
        .post_json("/v1/responses", r#"{"model":"router-fixed_high-0.9","input":"Hello"}"#)
        .await;
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["id"], "resp_one", "round robin starts with the first");
    // Round robin's next turn is `two`, but only `one` knows resp_one.
    let continuation = r#"{"model":"router-fixed_high-0.9","input":"And then?","previous_response_id":"resp_one"}"#;
    let response = proxy.post_json("/v1/responses", continuation).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-routellm-model"], "openai/gpt-4o-mini");
    assert_eq!(response.headers()["x-routellm-fallback"], "previous_response");
    assert_eq!((one.received().len(), two.received().len()), (2, 0));

    // Where the conversation lives is unavailable: no other deployment can continue it.
    one.set_unavailable(Some(StatusCode::SERVICE_UNAVAILABLE));
    let response = proxy.post_json("/v1/responses", continuation).await;
    assert_eq!(response.status(), 503);
    assert_eq!((one.received().len(), two.received().len()), (3, 0));
    assert!(strong.received().is_empty());
}

#[tokio::test]
async fn weights_share_turns_and_least_busy_passes_over_a_replica_with_a_stream_open() {
    let [strong, one, two] = mocks(["strong", "one", "two"]).await;
    let weighted = Proxy::start_config(&two_weak_round_robin(
        &strong,
        [("name: vllm/llama, weight: 3", &one), ("name: vllm/llama", &two)],
    ))
    .await;
    for _ in 0..8 {
        assert_eq!(weighted.post_chat(TO_WEAK).await.status(), 200);
    }
    assert_eq!((one.received().len(), two.received().len()), (6, 2), "3:1");

    let [strong, one, two] = mocks(["strong", "one", "two"]).await;
    let proxy = Proxy::start_config(&format!(
        "strong_model: {{name: openai/strong-model, base_url: '{}'}}\n\
         weak_model:\n\
         \x20 - {{name: vllm/llama, base_url: '{}'}}\n\
         \x20 - {{name: vllm/llama, base_url: '{}'}}\n\
         load_balancing: {{strategy: least_busy}}\n",
        strong.base_url(),
        one.base_url(),
        two.base_url()
    ))
    .await;
    // The first request of an idle pool goes to the first replica: a stream it holds open.
    let gated = r#"{"model":"router-fixed_high-0.9","stream":true,"mock":"gated","messages":[{"role":"user","content":"Hello"}]}"#;
    let open = proxy.post_chat(gated).await;
    assert_eq!(open.status(), 200);
    let metrics = proxy.metrics().await;
    assert!(
        metric_line(&metrics, r#"routellm_deployment_in_flight{tier="weak",deployment="0""#).ends_with(" 1"),
        "{metrics}"
    );
    for _ in 0..3 {
        assert_eq!(proxy.post_chat(TO_WEAK).await.status(), 200);
    }
    assert_eq!(
        (one.received().len(), two.received().len()),
        (1, 3),
        "the idle replica answers"
    );
    one.state.gate.notify_one();
    let text = open.text().await.unwrap();
    assert!(text.contains("[DONE]"), "{text}");
    // The server drops the stream just after the client has read its end.
    let mut ended = false;
    for _ in 0..100 {
        let metrics = proxy.metrics().await;
        if metric_line(&metrics, r#"routellm_deployment_in_flight{tier="weak",deployment="0""#).ends_with(" 0") {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ended, "the ended stream is no longer in flight");
    // Idle again, the two take turns.
    for _ in 0..2 {
        assert_eq!(proxy.post_chat(TO_WEAK).await.status(), 200);
    }
    assert_eq!((one.received().len(), two.received().len()), (2, 4));
    assert!(strong.received().is_empty());
}

#[tokio::test]
async fn a_stream_whose_first_event_is_late_goes_to_the_next_deployment() {
    let [first, second, weak] = mocks(["first", "second", "weak"]).await;
    first.set_delay(Some(Duration::from_secs(3)));
    let config = two_strong(
        &first,
        &second,
        &weak,
        "upstream: {stream_first_event_timeout_secs: 0.3}\n",
    );
    let proxy = Proxy::start_config(&config).await;
    let stream = r#"{"model":"router-fixed_high-0.5","stream":true,"messages":[{"role":"user","content":"Hello"}]}"#;
    let started = std::time::Instant::now();
    let response = proxy.post_chat(stream).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-routellm-model"], "groq/strong-backup");
    let text = response.text().await.unwrap();
    assert!(text.contains("from second") && text.contains("[DONE]"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the late deployment was given up after 0.3 s, not waited for: {:?}",
        started.elapsed()
    );
    assert_eq!(first.received().len(), 1);
    let metrics = proxy.metrics().await;
    assert!(
        metric_line(
            &metrics,
            r#"routellm_deployment_attempts_total{tier="strong",deployment="0",model="openai/strong-primary",outcome="unavailable"}"#
        )
        .ends_with(" 1"),
        "{metrics}"
    );
    // The bound is for streams only: a whole answer may take its request_timeout_secs, so a
    // fresh proxy waits the 0.6 s the first deployment takes.
    first.set_delay(Some(Duration::from_millis(600)));
    let proxy = Proxy::start_config(&config).await;
    let response = proxy.post_chat(TO_STRONG).await;
    assert_eq!(response.headers()["x-routellm-model"], "openai/strong-primary");
}
