//! The response cache over mock upstreams: an identical request is answered again without a
//! model call, whole or streamed; what may not be kept is not; each key has its own answers.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{FailingRouter, FixedRouter, MockUpstream, Proxy};
use futures_util::StreamExt;

const CACHED: &str = "response_cache: {ttl_secs: 600, max_mb: 16}\n";

fn chat(model: &str, content: &str, extra: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"{content}"}}]{extra}}}"#)
}

async fn setup(yaml: &str) -> (MockUpstream, MockUpstream, Proxy) {
    let (strong, weak) = (MockUpstream::start("strong").await, MockUpstream::start("weak").await);
    let proxy = Proxy::start(&strong.base_url(), &weak.base_url(), yaml).await;
    (strong, weak, proxy)
}

async fn post(proxy: &Proxy, body: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = proxy
        .client
        .post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).map(|value| value.to_str().unwrap())
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn an_identical_request_is_answered_from_the_cache_without_scoring_or_a_model_call() {
    let (strong, weak, proxy) = setup(&format!("{CACHED}model_aliases: {{auto: router-fixed_high-0.5}}\n")).await;
    let body = chat("router-fixed_high-0.5", "What is 2+2?", r#","temperature":0"#);

    let first = post(&proxy, &body, &[]).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-routellm-cache"), Some("miss"));
    assert_eq!(header(&first, "age"), None);
    let first_body = first.bytes().await.unwrap();

    // The same request, its fields in another order and its model named by an alias that
    // stands for the same router and threshold.
    let again = r#"{"temperature":0,"messages":[{"role":"user","content":"What is 2+2?"}],"model":"auto"}"#;
    let second = post(&proxy, again, &[]).await;
    assert_eq!(second.status(), 200);
    assert_eq!(header(&second, "x-routellm-cache"), Some("hit"));
    assert_eq!(header(&second, "age"), Some("0"));
    // The answer says what the proxy decided for it, as the first did.
    assert_eq!(header(&second, "x-routellm-tier"), Some("strong"));
    assert_eq!(header(&second, "x-routellm-model"), Some("openai/strong-model"));
    assert_eq!(header(&second, "x-routellm-win-rate"), Some("0.8"));
    assert_eq!(header(&second, "content-type"), Some("application/json"));
    assert_eq!(second.bytes().await.unwrap(), first_body);
    assert_eq!(strong.received().len(), 1, "the second answer came from the cache");
    assert!(weak.received().is_empty());

    // Anything else in the body, or another threshold, is another request.
    for other in [
        chat("router-fixed_high-0.5", "What is 2+3?", r#","temperature":0"#),
        chat("router-fixed_high-0.5", "What is 2+2?", r#","temperature":1"#),
        chat("router-fixed_high-0.6", "What is 2+2?", r#","temperature":0"#),
    ] {
        let response = post(&proxy, &other, &[]).await;
        assert_eq!(header(&response, "x-routellm-cache"), Some("miss"), "{other}");
    }
    assert_eq!(strong.received().len(), 4);

    // The client decides: no-cache asks the model again (and keeps the new answer),
    // no-store leaves the cache out.
    let refreshed = post(&proxy, &body, &[("cache-control", "no-cache")]).await;
    assert_eq!(header(&refreshed, "x-routellm-cache"), Some("refresh"));
    let bypassed = post(&proxy, &body, &[("cache-control", "no-store")]).await;
    assert_eq!(header(&bypassed, "x-routellm-cache"), Some("bypass"));
    assert_eq!(strong.received().len(), 6);
    assert_eq!(header(&post(&proxy, &body, &[]).await, "x-routellm-cache"), Some("hit"));
    assert_eq!(strong.received().len(), 6);

    let text = proxy.metrics().await;
    for (prefix, expected) in [
        (r#"routellm_cache_requests_total{result="hit"}"#, 2.0),
        (r#"routellm_cache_requests_total{result="miss"}"#, 4.0),
        (r#"routellm_cache_requests_total{result="refresh"}"#, 1.0),
        (r#"routellm_cache_requests_total{result="bypass"}"#, 1.0),
        (r#"routellm_requests_total{tier="cache",status="2xx"}"#, 2.0),
        (r#"routellm_requests_total{tier="strong",status="2xx"}"#, 6.0),
        // The mock reports 1 prompt and 3 completion tokens an answer; hits spent none.
        (r#"routellm_tokens_total{tier="strong",kind="completion"}"#, 18.0),
        (r#"routellm_cache_saved_tokens_total{kind="completion"}"#, 6.0),
        ("routellm_cache_entries", 4.0),
        ("routellm_cache_capacity_bytes", 16.0 * 1024.0 * 1024.0),
    ] {
        assert_eq!(metric(&text, prefix), expected, "{prefix} in\n{text}");
    }
    assert!(metric(&text, "routellm_cache_bytes") > 0.0);
}

#[tokio::test]
async fn a_stream_is_given_again_once_it_ended_well_and_a_broken_one_is_not() {
    let (strong, _weak, proxy) = setup(CACHED).await;
    let streamed = chat(
        "router-fixed_high-0.5",
        "Tell me a story",
        r#","stream":true,"stream_options":{"include_usage":true}"#,
    );
    let first = post(&proxy, &streamed, &[]).await;
    assert_eq!(header(&first, "x-routellm-cache"), Some("miss"));
    let first_text = first.text().await.unwrap();
    assert!(first_text.trim_end().ends_with("data: [DONE]"), "{first_text}");
    // The answer is kept once the server has passed its end; poll rather than race it.
    let mut hit = None;
    for _ in 0..100 {
        let response = post(&proxy, &streamed, &[]).await;
        if header(&response, "x-routellm-cache") == Some("hit") {
            hit = Some(response);
            break;
        }
        response.text().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hit = hit.expect("the ended stream is answered from the cache");
    assert_eq!(header(&hit, "content-type"), Some("text/event-stream"));
    assert_eq!(hit.text().await.unwrap(), first_text, "the same events, byte for byte");
    let text = proxy.metrics().await;
    // The stream's usage chunk: 5 prompt and 2 completion tokens saved by the hit.
    assert_eq!(
        metric(&text, r#"routellm_cache_saved_tokens_total{kind="prompt"}"#),
        5.0
    );

    // A stream that breaks off (the proxy ends it with an error event) is not kept.
    let breaking = chat(
        "router-fixed_high-0.5",
        "Tell me a story",
        r#","stream":true,"mock":"break_soon""#,
    );
    for _ in 0..2 {
        let response = post(&proxy, &breaking, &[]).await;
        assert_eq!(header(&response, "x-routellm-cache"), Some("miss"));
        let mut events = response.bytes_stream();
        let mut text = Vec::new();
        while let Some(chunk) = events.next().await {
            text.extend_from_slice(&chunk.unwrap());
        }
        let text = String::from_utf8_lossy(&text);
        assert!(text.contains("stream broke") && !text.contains("[DONE]"), "{text}");
    }
    let broken_calls = strong
        .received()
        .iter()
        .filter(|received| received.json()["mock"] == "break_soon")
        .count();
    assert_eq!(broken_calls, 2);
}

#[tokio::test]
async fn errors_fallbacks_and_responses_are_not_kept() {
    let (strong, weak) = (MockUpstream::start("strong").await, MockUpstream::start("weak").await);
    let mut routers: BTreeMap<String, Arc<dyn routellm::Router>> = BTreeMap::new();
    routers.insert("fixed_high".into(), Arc::new(FixedRouter(0.8)));
    routers.insert("failing".into(), Arc::new(FailingRouter));
    let proxy = Proxy::start_with(
        &strong.base_url(),
        &weak.base_url(),
        &format!("{CACHED}on_router_error: weak\n"),
        routers,
    )
    .await;
    let refused = chat("router-fixed_high-0.5", "hi", r#","mock":"bad_request""#);
    let fallback = chat("router-failing-0.5", "hi", "");
    for _ in 0..2 {
        assert_eq!(post(&proxy, &refused, &[]).await.status(), 400);
        let answered = post(&proxy, &fallback, &[]).await;
        assert_eq!(header(&answered, "x-routellm-fallback"), Some("router_error"));
        assert_eq!(header(&answered, "x-routellm-cache"), Some("miss"));
    }
    assert_eq!(strong.received().len(), 2, "the refusal was asked twice");
    assert_eq!(weak.received().len(), 2, "the fallback answer was not kept");

    // Each Responses answer is a conversation of its own: never cached.
    let responses = r#"{"model":"router-fixed_high-0.5","input":"hi"}"#;
    for _ in 0..2 {
        let response = proxy.post_json("/v1/responses", responses).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-routellm-cache"), None);
    }
    assert_eq!(strong.received().len(), 4);
}

#[tokio::test]
async fn each_key_has_its_own_answers_unless_the_cache_is_shared_and_hits_cost_no_tokens() {
    let keys = "api_keys: [{key: k-a, name: team-a}, {key: k-b, name: team-b}]\n";
    let body = chat("router-fixed_high-0.5", "hi", "");
    let ask = async |proxy: &Proxy, key: &str| {
        let response = post(proxy, &body, &[("authorization", &format!("Bearer {key}"))]).await;
        assert_eq!(response.status(), 200);
        header(&response, "x-routellm-cache").unwrap().to_owned()
    };

    let (strong, _weak, proxy) = setup(&format!("{CACHED}{keys}")).await;
    assert_eq!(ask(&proxy, "k-a").await, "miss");
    assert_eq!(ask(&proxy, "k-b").await, "miss", "team-b does not get team-a's answer");
    assert_eq!(ask(&proxy, "k-a").await, "hit");
    assert_eq!(strong.received().len(), 2);
    let text = proxy.metrics().await;
    // Three requests admitted for team-a and team-b together, tokens only for the two answered by the model.
    assert_eq!(metric(&text, r#"routellm_key_requests_total{key="team-a"}"#), 2.0);
    assert_eq!(metric(&text, r#"routellm_key_tokens_total{key="team-a"}"#), 4.0);

    let (strong, _weak, shared) = setup(&format!("response_cache: {{ttl_secs: 600, scope: shared}}\n{keys}")).await;
    assert_eq!(ask(&shared, "k-a").await, "miss");
    assert_eq!(ask(&shared, "k-b").await, "hit");
    assert_eq!(strong.received().len(), 1);
}

/// Sends `count` copies of `body` at once; their statuses, cache headers and bodies.
async fn at_once(proxy: &Proxy, body: &str, count: usize) -> Vec<(u16, String, bytes::Bytes)> {
    let sends = (0..count).map(|_| async {
        let response = post(proxy, body, &[]).await;
        let cache = header(&response, "x-routellm-cache").unwrap_or("").to_owned();
        (response.status().as_u16(), cache, response.bytes().await.unwrap())
    });
    futures_util::future::join_all(sends).await
}

/// Whether every answer has `status` and was a cache miss (its request asked the model).
fn each_a_miss(answers: &[(u16, String, bytes::Bytes)], status: u16) -> bool {
    answers.iter().all(|(got, cache, _)| *got == status && cache == "miss")
}

#[tokio::test]
async fn identical_requests_arriving_together_wait_for_one_answer() {
    let (strong, _weak, proxy) = setup(CACHED).await;
    strong.set_delay(Some(Duration::from_millis(400)));
    let body = chat("router-fixed_high-0.5", "A popular question", "");
    let answers = at_once(&proxy, &body, 6).await;
    assert_eq!(strong.received().len(), 1, "one model call for six identical requests");
    let mut caches: Vec<&str> = answers.iter().map(|(_, cache, _)| cache.as_str()).collect();
    caches.sort_unstable();
    assert_eq!(caches, ["hit", "hit", "hit", "hit", "hit", "miss"]);
    for (status, _, answer) in &answers {
        assert_eq!(*status, 200);
        assert_eq!(answer, &answers[0].2, "every one gets the same answer");
    }

    // Streams too: the others read the first one's stream (see the live test below).
    let streamed = chat("router-fixed_high-0.5", "A popular stream", r#","stream":true"#);
    let answers = at_once(&proxy, &streamed, 3).await;
    assert_eq!(strong.received().len(), 2, "one model call for three identical streams");
    let mut caches: Vec<&str> = answers.iter().map(|(_, cache, _)| cache.as_str()).collect();
    caches.sort_unstable();
    assert_eq!(caches, ["hit", "hit", "miss"]);
    for (status, _, answer) in &answers {
        assert_eq!(*status, 200);
        assert_eq!(answer, &answers[0].2, "every one gets the same stream");
        assert!(answer.ends_with(b"data: [DONE]\n\n"));
    }

    // When the first one's answer is not kept (the model refused it), the others ask the
    // model themselves rather than wait in turn.
    let refused = chat(
        "router-fixed_high-0.5",
        "A refused question",
        r#","mock":"bad_request""#,
    );
    let answers = at_once(&proxy, &refused, 3).await;
    assert!(each_a_miss(&answers, 400), "{answers:?}");
    assert_eq!(strong.received().len(), 5);

    let text = proxy.metrics().await;
    assert_eq!(metric(&text, "routellm_cache_coalesced_total"), 7.0, "{text}");
    assert_eq!(metric(&text, r#"routellm_cache_requests_total{result="hit"}"#), 7.0);
    assert_eq!(metric(&text, r#"routellm_cache_requests_total{result="miss"}"#), 5.0);

    // With coalescing off, each identical request is its own model call.
    let (strong, _weak, proxy) = setup("response_cache: {ttl_secs: 600, coalesce: false}\n").await;
    strong.set_delay(Some(Duration::from_millis(300)));
    let answers = at_once(&proxy, &body, 3).await;
    assert!(each_a_miss(&answers, 200), "{answers:?}");
    assert_eq!(strong.received().len(), 3);
}

/// Coalesced streams are live: a stream that joins an identical one in flight gets the
/// events already written at once and the rest as the model writes them, and it still gets
/// the whole answer when the first client leaves halfway.
#[tokio::test]
async fn an_identical_stream_reads_the_first_ones_events_as_they_come_even_after_its_client_leaves() {
    let (strong, _weak, proxy) = setup(CACHED).await;
    // The mock sends its first event, then holds the rest until the gate opens.
    let body = chat(
        "router-fixed_high-0.5",
        "A live stream",
        r#","stream":true,"mock":"gated""#,
    );
    let first_event = |text: &str| text.contains("from strong");
    let mut leader = post(&proxy, &body, &[]).await;
    assert_eq!(header(&leader, "x-routellm-cache"), Some("miss"));
    let leader_start = leader.chunk().await.unwrap().unwrap();
    assert!(first_event(&String::from_utf8_lossy(&leader_start)));

    let mut follower = post(&proxy, &body, &[]).await;
    assert_eq!(follower.status(), 200);
    assert_eq!(header(&follower, "x-routellm-cache"), Some("hit"));
    assert_eq!(
        header(&follower, "x-routellm-tier"),
        Some("strong"),
        "the decision headers come along"
    );
    // Before the model has written more, the follower has what was written so far.
    let mut seen = Vec::new();
    while !first_event(&String::from_utf8_lossy(&seen)) {
        let chunk = tokio::time::timeout(Duration::from_secs(5), follower.chunk())
            .await
            .expect("the first event arrives before the stream goes on")
            .unwrap()
            .unwrap();
        seen.extend_from_slice(&chunk);
    }
    // The first client leaves; the model's stream goes on for the follower.
    drop(leader);
    tokio::time::sleep(Duration::from_millis(50)).await;
    strong.state.gate.notify_one();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), follower.chunk())
        .await
        .expect("the rest arrives")
        .unwrap()
    {
        seen.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(seen).unwrap();
    assert!(text.contains(" done") && text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(strong.received().len(), 1, "one model call for both");
    assert_eq!(metric(&proxy.metrics().await, "routellm_cache_coalesced_total"), 1.0);
    // Read to its end, the answer is kept: the next identical stream is an ordinary hit.
    let again = post(&proxy, &body, &[]).await;
    assert_eq!(header(&again, "x-routellm-cache"), Some("hit"));
    assert_eq!(again.text().await.unwrap(), text);
    assert_eq!(strong.received().len(), 1);
}

/// Coalesced streams cost their key one answer: the tokens the model reported once.
#[tokio::test]
async fn coalesced_streams_charge_their_key_for_one_answer() {
    let (strong, _weak, proxy) = setup(&format!("{CACHED}api_keys: [{{key: k-a, name: team-a}}]\n")).await;
    strong.set_delay(Some(Duration::from_millis(300)));
    let body = chat(
        "router-fixed_high-0.5",
        "A metered stream",
        r#","stream":true,"stream_options":{"include_usage":true}"#,
    );
    let sends = (0..3).map(|_| async {
        let response = post(&proxy, &body, &[("authorization", "Bearer k-a")]).await;
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    });
    let answers = futures_util::future::join_all(sends).await;
    assert!(
        answers
            .iter()
            .all(|answer| answer == &answers[0] && answer.ends_with("data: [DONE]\n\n"))
    );
    assert_eq!(strong.received().len(), 1);
    // 5 prompt + 2 completion tokens, as the model reported them, charged once.
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric(&metrics, r#"routellm_key_tokens_total{key="team-a"}"#),
        7.0,
        "{metrics}"
    );
}
