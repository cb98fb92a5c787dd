//! `routellm label` against mock models and a scripted judge: what each is asked, what is
//! written, that the output reads as training battles and as an eval benchmark, and that a
//! rerun asks again only for what failed.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::MockUpstream;
use routellm::config::{Config, FileConfig, Overrides};
use routellm::label::{LabelOptions, Labeller};
use routellm::prompts::Entry;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// A judge that prefers whichever answer came from the strong mock ("answer from strong"),
/// or, while `undecided` is set, rambles without a verdict. Asked without the judge's
/// instructions, it answers as the strong mock does (so it can be the strong model too).
#[derive(Clone, Default)]
struct Referee {
    asked: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
    undecided: Arc<AtomicBool>,
    /// This many next requests get a 503 that asks for a retry in 10 ms.
    overloaded: Arc<AtomicUsize>,
    /// Prefer whichever answer is shown first, as a position-biased judge does.
    first_always: Arc<AtomicBool>,
}

impl Referee {
    async fn start(&self) -> String {
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(referee_judges))
            .with_state(self.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/v1")
    }

    fn asked(&self) -> Vec<(HeaderMap, Value)> {
        self.asked.lock().unwrap().clone()
    }
}

async fn referee_judges(State(referee): State<Referee>, headers: HeaderMap, body: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    let request: Value = serde_json::from_str(&body).unwrap();
    referee.asked.lock().unwrap().push((headers, request.clone()));
    if referee
        .overloaded
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(1))
        .is_ok()
    {
        let error = json!({"error": {"message": "overloaded", "type": "server_error", "param": null, "code": null}});
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after-ms", "10")],
            axum::Json(error),
        )
            .into_response();
    }
    if request["messages"][0]["role"] != "system" {
        return axum::Json(json!({
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "answer from strong"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
        }))
        .into_response();
    }
    let comparison = request["messages"][1]["content"].as_str().unwrap_or_default();
    let a_is_strong = comparison
        .split("[The answer of assistant A]")
        .nth(1)
        .and_then(|rest| rest.split("[The answer of assistant B]").next())
        .is_some_and(|answer| answer.contains("from strong"));
    let content = if referee.undecided.load(Ordering::SeqCst) {
        "Both have merits; hard to say.".to_owned()
    } else if referee.first_always.load(Ordering::SeqCst) {
        "The first is better.\n[[A]]".to_owned()
    } else {
        format!(
            "The other answer misses the point.\n{}",
            if a_is_strong { "[[A]]" } else { "[[B]]" }
        )
    };
    axum::Json(json!({
        "id": "chatcmpl-referee",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
    }))
    .into_response()
}

fn config(strong: &MockUpstream, weak: &MockUpstream, referee: &str) -> Config {
    config_at(&strong.base_url(), &weak.base_url(), referee)
}

fn config_at(strong: &str, weak: &str, referee: &str) -> Config {
    let yaml = format!(
        "strong_model: {{name: openai/strong-model, base_url: '{strong}', api_key: sk-strong, \
         price_per_million_tokens: {{input: 10, output: 30}}}}\n\
         weak_model: {{name: together_ai/weak-model, base_url: '{weak}', api_key: sk-weak, \
         price_per_million_tokens: {{input: 1, output: 1}}}}\n\
         providers:\n  referee: {{base_url: '{referee}', api_key: sk-judge}}\n"
    );
    Config::merge(FileConfig::from_yaml(&yaml).unwrap(), Overrides::default()).unwrap()
}

/// Two mock models (strong, weak), the referee as an outside judge, the config naming all
/// three, and a scratch folder with the output file in it.
async fn setup() -> (MockUpstream, MockUpstream, Referee, Config, tempfile::TempDir, PathBuf) {
    let (strong, weak) = (MockUpstream::start("strong").await, MockUpstream::start("weak").await);
    let referee = Referee::default();
    let config = config(&strong, &weak, &referee.start().await);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("labels.jsonl");
    (strong, weak, referee, config, dir, out)
}

/// One run of `label` over [`prompts`] into `out`.
async fn label(config: &Config, options: LabelOptions, out: &Path) -> routellm::label::LabelSummary {
    Labeller::new(config, options)
        .unwrap()
        .run(prompts(), out)
        .await
        .unwrap()
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn prompts() -> Vec<Entry> {
    [
        "What is 2 + 2?",
        "Write a haiku about rust.",
        "Explain TCP slow start.",
        "What is 2 + 2?",
    ]
    .map(|prompt| Entry::from(prompt.to_owned()))
    .to_vec()
}

fn judged_by_referee() -> LabelOptions {
    LabelOptions {
        judge: Some("referee/judge-model".to_owned()),
        ..LabelOptions::default()
    }
}

#[tokio::test]
async fn labels_read_as_battles_and_as_a_benchmark_and_a_rerun_asks_nothing_again() {
    let (strong, weak, referee, config, dir, out) = setup().await;

    let summary = label(&config, judged_by_referee(), &out).await;
    assert_eq!(summary.labelled, 3, "{summary:?}");
    assert_eq!(summary.already_labelled, 1, "the repeated prompt is asked once");
    assert!(summary.failed.is_empty(), "{:?}", summary.failed);
    assert_eq!((summary.strong_wins, summary.ties, summary.weak_wins), (3, 0, 0));
    assert_eq!((summary.judged_twice, summary.consistent), (3, 3));
    // The mocks report 1 + 3 tokens per answer; the referee 100 + 10 per judgement, and it
    // has no price, so there is no total cost.
    assert_eq!(summary.usage.prompt_tokens, 3 * 2 + 6 * 100);
    assert_eq!(summary.cost, None);

    // Each model answered each prompt once, as a one-turn conversation under its own name.
    for (mock, model) in [(&strong, "strong-model"), (&weak, "weak-model")] {
        let received = mock.received();
        assert_eq!(received.len(), 3);
        for request in &received {
            let body = request.json();
            assert_eq!(body["model"], model);
            assert_eq!(body["messages"].as_array().unwrap().len(), 1);
            assert!(body.get("max_tokens").is_none(), "no defaults are added: {body}");
        }
    }
    // The judge saw each pair in both orders, with its own key and model name.
    let asked = referee.asked();
    assert_eq!(asked.len(), 6);
    let mut strong_first = 0;
    for (headers, request) in &asked {
        assert_eq!(headers["authorization"], "Bearer sk-judge");
        assert_eq!(request["model"], "judge-model");
        assert!(
            request.get("temperature").is_none(),
            "the judge's own temperature by default"
        );
        let comparison = request["messages"][1]["content"].as_str().unwrap();
        let a = comparison.find("answer from strong").unwrap();
        let b = comparison.find("answer from weak").unwrap();
        strong_first += usize::from(a < b);
    }
    assert_eq!(strong_first, 3, "half the judgements show the strong answer first");

    let written = lines(&out);
    assert_eq!(written.len(), 3);
    for line in &written {
        assert_eq!(line["model_a"], "openai/strong-model");
        assert_eq!(line["model_b"], "together_ai/weak-model");
        assert_eq!(line["winner"], "model_a");
        assert_eq!(line["p_b_wins"], 0.0);
        assert_eq!(line["scores"]["openai/strong-model"], 1.0);
        assert_eq!(line["answers"]["model_b"], "answer from weak");
        assert_eq!(line["judge"], "referee/judge-model");
        let orders: Vec<&str> = line["judgements"]
            .as_array()
            .unwrap()
            .iter()
            .map(|judgement| judgement["order"].as_str().unwrap())
            .collect();
        assert_eq!(orders, ["strong_first", "weak_first"]);
    }

    // `train` reads the lines as battles the strong model won...
    let data = routellm::train::data::Dataset::read(std::slice::from_ref(&out), 32, 42).unwrap();
    assert_eq!(data.battles.len(), 3);
    let strong_id = data.model("openai/strong-model").unwrap();
    assert!(
        data.battles
            .iter()
            .all(|battle| battle.a == strong_id && battle.label > 0.99)
    );
    // ... and `eval` as a benchmark where the strong model scores 1 on every prompt.
    let benchmark = routellm::eval::benchmark::load(
        &routellm::eval::benchmark::BenchmarkKind::Generic(out.clone()),
        dir.path(),
        None,
        None,
    )
    .unwrap();
    assert_eq!(
        (benchmark.strong_model.as_str(), benchmark.weak_model.as_str()),
        ("openai/strong-model", "together_ai/weak-model"),
        "the labelled pair, without naming it"
    );
    assert_eq!(benchmark.prompts.len(), 3);
    assert!(
        benchmark
            .outcomes
            .iter()
            .all(|outcome| outcome.strong_sum > outcome.weak_sum)
    );

    // Run again: everything is there, nobody is asked anything.
    let summary = label(&config, judged_by_referee(), &out).await;
    assert_eq!((summary.labelled, summary.already_labelled), (0, 4));
    assert_eq!(strong.received().len(), 3);
    assert_eq!(referee.asked().len(), 6);
    assert_eq!(lines(&out).len(), 3);
}

#[tokio::test]
async fn what_fails_is_not_written_and_the_next_run_labels_only_that() {
    let (_strong, weak, referee, config, _dir, out) = setup().await;
    // One attempt per call: what is tried again is another test's subject.
    let options = || LabelOptions {
        limit: Some(2),
        attempts: 1,
        ..judged_by_referee()
    };

    // The weak model is down: nothing can be compared, nothing is written.
    weak.set_unavailable(Some(StatusCode::SERVICE_UNAVAILABLE));
    let summary = label(&config, options(), &out).await;
    assert_eq!(summary.labelled, 0);
    assert_eq!(summary.not_started, 1, "--limit 2 of 3 distinct prompts");
    assert_eq!(summary.failed.len(), 2);
    assert!(
        summary
            .failed
            .iter()
            .all(|(_, why)| why.contains("weak-model") && why.contains("503")),
        "{:?}",
        summary.failed
    );
    assert!(referee.asked().is_empty(), "no judge is asked without both answers");
    assert_eq!(
        (summary.usage.prompt_tokens, summary.usage.completion_tokens),
        (2, 6),
        "the strong model's answers were spent all the same (1 + 3 tokens each)"
    );
    assert!(lines(&out).is_empty());

    // Back up, but the judge gives no verdict: still nothing written.
    weak.set_unavailable(None);
    referee.undecided.store(true, Ordering::SeqCst);
    let summary = label(&config, options(), &out).await;
    assert_eq!(summary.labelled, 0);
    assert!(
        summary.failed.iter().all(|(_, why)| why.contains("no verdict")),
        "{:?}",
        summary.failed
    );
    assert!(lines(&out).is_empty());

    // The judge decides again: the two prompts are labelled, then the third.
    referee.undecided.store(false, Ordering::SeqCst);
    let summary = label(&config, options(), &out).await;
    assert_eq!((summary.labelled, summary.not_started), (2, 1));
    let summary = label(&config, options(), &out).await;
    assert_eq!((summary.labelled, summary.already_labelled), (1, 3));
    let written: Vec<String> = lines(&out)
        .iter()
        .map(|line| line["prompt"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(written.len(), 3);
    let mut distinct = written.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "no prompt written twice: {written:?}");
}

#[tokio::test]
async fn a_judge_that_prefers_a_position_labels_ties_and_is_shown_to_contradict_itself() {
    let (_, _, referee, config, _dir, out) = setup().await;
    referee.first_always.store(true, Ordering::SeqCst);
    let summary = label(&config, judged_by_referee(), &out).await;
    assert_eq!((summary.strong_wins, summary.ties, summary.weak_wins), (0, 3, 0));
    assert_eq!((summary.judged_twice, summary.consistent), (3, 0));
    for line in lines(&out) {
        assert_eq!(line["winner"], "tie");
        assert_eq!(line["p_b_wins"], 0.5);
    }
}

#[tokio::test]
async fn rate_limits_and_overloads_are_waited_out_within_one_run() {
    let (_strong, weak, referee, config, _dir, out) = setup().await;
    // The weak model rate-limits (asking for 600 ms) until a moment after the run starts;
    // the judge is overloaded for its first two requests.
    weak.set_unavailable(Some(StatusCode::TOO_MANY_REQUESTS));
    referee.overloaded.store(2, Ordering::SeqCst);
    let recovering = weak.state.unavailable.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        *recovering.lock().unwrap() = None;
    });
    let summary = label(&config, judged_by_referee(), &out).await;
    assert!(summary.failed.is_empty(), "{:?}", summary.failed);
    assert_eq!(summary.labelled, 3);
    assert_eq!(
        referee.asked().len(),
        6 + 2,
        "the two refused judgements were asked again"
    );
    let weak_asked = weak.received().len();
    assert!(
        (6..=9).contains(&weak_asked),
        "each prompt's weak answer asked again once or twice: {weak_asked}"
    );
    assert_eq!(lines(&out).len(), 3);
}

#[tokio::test]
async fn the_strong_model_judges_by_default_once_per_prompt_and_prices_add_up() {
    // The referee serves as the strong model: it answers, and it judges.
    let (referee, weak) = (Referee::default(), MockUpstream::start("weak").await);
    let url = referee.start().await;
    let config = config_at(&url, &weak.base_url(), &url);
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let out = dir.join("labels.jsonl");
    let options = LabelOptions {
        both_orders: false,
        max_tokens: Some(64),
        judge_temperature: Some(0.0),
        ..LabelOptions::default()
    };
    let summary = label(&config, options, &out).await;
    assert_eq!((summary.labelled, summary.strong_wins), (3, 3), "{summary:?}");
    let asked = referee.asked();
    let (judging, answering): (Vec<_>, Vec<_>) = asked
        .iter()
        .map(|(_, body)| body)
        .partition(|body| body["messages"][0]["role"] == "system");
    assert_eq!((judging.len(), answering.len()), (3, 3), "one judgement per prompt");
    assert!(judging.iter().all(|body| body["model"] == "strong-model"));
    assert!(
        judging.iter().all(|body| body.get("max_tokens").is_none()),
        "the judge's length is its own"
    );
    // The judge's temperature is the one asked for, and only the judge's.
    assert!(judging.iter().all(|body| body["temperature"] == 0.0), "{judging:?}");
    assert!(answering.iter().all(|body| body.get("temperature").is_none()));
    assert!(answering.iter().all(|body| body["max_tokens"] == 64));
    assert!(weak.received().iter().all(|request| request.json()["max_tokens"] == 64));
    // Per prompt: the strong answer 1 x 10 + 3 x 30, the weak 1 + 3, the judgement
    // 100 x 10 + 10 x 30, per million tokens.
    let cost = summary.cost.unwrap();
    assert!((cost - 3.0 * 1404.0 / 1e6).abs() < 1e-12, "{cost}");
    for line in lines(&out) {
        assert_eq!(line["judge"], "openai/strong-model");
        assert_eq!(line["judgements"].as_array().unwrap().len(), 1);
    }
}

/// The command as scripts meet it: a summary on stderr, and an exit status that says whether
/// every prompt was labelled.
#[tokio::test]
async fn the_command_exits_non_zero_while_prompts_are_left_and_zero_once_all_are_labelled() {
    let (strong, weak) = (MockUpstream::start("strong").await, MockUpstream::start("weak").await);
    let referee = Referee::default();
    let referee_url = referee.start().await;
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let (config_file, prompts_file, out) = (
        dir.join("config.yaml"),
        dir.join("prompts.txt"),
        dir.join("labels.jsonl"),
    );
    std::fs::write(
        &config_file,
        format!(
            "strong_model: {{name: openai/strong-model, base_url: '{}', api_key: sk-strong}}\n\
             weak_model: {{name: together_ai/weak-model, base_url: '{}', api_key: sk-weak}}\n\
             providers:\n  referee: {{base_url: '{referee_url}', api_key: sk-judge}}\n",
            strong.base_url(),
            weak.base_url(),
        ),
    )
    .unwrap();
    std::fs::write(&prompts_file, "What is 2 + 2?\nName a prime.\n").unwrap();
    let run = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_routellm"))
            .arg("label")
            .arg("--config")
            .arg(&config_file)
            .arg("--prompts")
            .arg(&prompts_file)
            .arg("--out")
            .arg(&out)
            .args(["--judge", "referee/judge-model", "--attempts", "1"])
            .env_remove("ROUTELLM_CONFIG")
            .env("NO_PROXY", "127.0.0.1")
            .output()
    };

    referee.undecided.store(true, Ordering::SeqCst);
    let failed = run().await.unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "{stderr}");
    assert!(
        stderr.contains("labelled 0 prompts") && stderr.contains("2 failed"),
        "{stderr}"
    );
    assert!(stderr.contains("no verdict"), "{stderr}");
    // Per prompt: two answers of 1 + 3 tokens and two judgements of 100 + 10.
    assert!(
        stderr.contains("tokens spent (failed prompts too): 404 prompt, 52 completion"),
        "{stderr}"
    );

    referee.undecided.store(false, Ordering::SeqCst);
    let done = run().await.unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    assert!(
        stderr.contains("labelled 2 prompts") && stderr.contains("won 2, tied 0, lost 0"),
        "{stderr}"
    );
    assert!(
        stderr.contains("same verdict in both orders on 100% of 2 prompts"),
        "{stderr}"
    );
    assert_eq!(lines(&out).len(), 2);
}

#[tokio::test]
async fn a_sample_takes_prompts_in_its_seeded_order_and_a_rerun_extends_it() {
    let (_strong, _weak, _referee, config, _dir, out) = setup().await;
    let many: Vec<String> = (0..12).map(|i| format!("Question number {i}?")).collect();
    let run = |limit| {
        let options = LabelOptions {
            limit: Some(limit),
            sample_seed: Some(5),
            both_orders: false,
            ..judged_by_referee()
        };
        let (config, out, many) = (&config, &out, many.clone());
        let entries = many.into_iter().map(Entry::from).collect();
        async move { Labeller::new(config, options).unwrap().run(entries, out).await.unwrap() }
    };
    // Both sides sorted: which prompts, not in what order they finished.
    let labelled = |out: &Path| -> Vec<String> {
        let mut prompts: Vec<String> = lines(out)
            .iter()
            .map(|line| line["prompt"].as_str().unwrap().to_owned())
            .collect();
        prompts.sort();
        prompts
    };
    let mut expected = many.clone();
    routellm::label::sample_order(&mut expected, 5);
    assert_ne!(expected[..3], many[..3], "the seed's order is not the file's");
    let sample_head = |count: usize| {
        let mut head = expected[..count].to_vec();
        head.sort();
        head
    };

    let first = run(3).await;
    assert_eq!((first.labelled, first.not_started), (3, 9), "{first:?}");
    assert_eq!(
        labelled(&out),
        sample_head(3),
        "the first three of the sample, not of the file"
    );

    // The next run keeps those and adds the sample's next ones.
    let second = run(2).await;
    assert_eq!((second.labelled, second.already_labelled), (2, 3), "{second:?}");
    assert_eq!(labelled(&out), sample_head(5));
}

/// A prompt log kept with `conversations: true` has the models answer each request after
/// the conversation it ended (system prompt, earlier turns, a tool call), shows the judge
/// that conversation before the request, and labels the last user turn, as routers score it.
#[tokio::test]
async fn a_logged_conversation_is_answered_and_judged_as_a_conversation() {
    let (strong, weak, referee, config, _dir, out) = setup().await;
    let conversation = json!([
        {"role": "system", "content": "You are a terse release manager."},
        {"role": "user", "content": "Which crate versions did we pin last week?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "lookup_pins", "arguments": "{\"week\":47}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "tokio 1.48, axum 0.8"},
        {"role": "user", "content": [{"type": "text", "text": "Should we move axum forward?"}]},
        {"role": "assistant", "content": "an answer logged after the request"},
    ]);
    let log = format!(
        "{}\n{}\n",
        json!({"messages": [{"role": "user", "content": "Should we move axum forward?"}], "conversation": conversation}),
        json!({"messages": [{"role": "user", "content": "A lone question?"}]}),
    );
    let entries = routellm::prompts::parse_entries(&log).unwrap();
    let options = LabelOptions {
        both_orders: false,
        ..judged_by_referee()
    };
    let summary = Labeller::new(&config, options)
        .unwrap()
        .run(entries, &out)
        .await
        .unwrap();
    assert_eq!((summary.labelled, summary.strong_wins), (2, 2), "{summary:?}");

    for model in [&strong, &weak] {
        let mut asked: Vec<Value> = model
            .received()
            .iter()
            .map(|got| got.json()["messages"].clone())
            .collect();
        asked.sort_by_key(|messages| messages.as_array().unwrap().len());
        assert_eq!(asked[0], json!([{"role": "user", "content": "A lone question?"}]));
        // The whole conversation up to the request, as logged; not the answer logged after it.
        let mut expected = conversation.as_array().unwrap().clone();
        expected.pop();
        assert_eq!(asked[1], Value::Array(expected));
    }
    let comparisons: Vec<String> = referee
        .asked()
        .iter()
        .map(|(_, request)| request["messages"][1]["content"].as_str().unwrap().to_owned())
        .collect();
    let with_context = comparisons.iter().find(|text| text.contains("axum forward")).unwrap();
    let shown = |needle: &str| {
        with_context
            .find(needle)
            .unwrap_or_else(|| panic!("{needle} in {with_context}"))
    };
    assert!(shown("[The conversation before the request]") < shown("system: You are a terse release manager."));
    assert!(shown("[calls lookup_pins({\"week\":47})]") < shown("tool: tokio 1.48, axum 0.8"));
    assert!(shown("tool: tokio 1.48") < shown("[The user's request]\nShould we move axum forward?"));
    assert!(!with_context.contains("logged after"), "{with_context}");
    let lone = comparisons
        .iter()
        .find(|text| text.contains("A lone question?"))
        .unwrap();
    assert!(lone.starts_with("[The user's request]"), "{lone}");

    let written = lines(&out);
    let labelled = |prompt: &str| written.iter().find(|line| line["prompt"] == prompt).unwrap();
    assert_eq!(labelled("Should we move axum forward?")["context_messages"], 4);
    assert!(labelled("A lone question?").get("context_messages").is_none());
}
