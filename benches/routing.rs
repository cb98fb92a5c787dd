//! Criterion benches for the request path: body parsing and rewriting, router scoring by
//! prompt length, and whole requests through the gateway to an offline and an HTTP upstream.
//!
//! `cargo bench --bench routing`; see benches/README.md for the load benchmark.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use axum::routing::post;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use routellm::Gateway;
use routellm::config::{Config, FileConfig, Overrides};
use routellm::request::{Api, ModelRequest};
use routellm::routers::{LengthRouter, RandomRouter, Router};
use routellm::upstream::Reply;

fn words(count: usize) -> String {
    const VOCABULARY: [&str; 12] = [
        "explain",
        "the",
        "difference",
        "between",
        "threads",
        "and",
        "processes",
        "in",
        "modern",
        "operating",
        "systems",
        "carefully",
    ];
    (0..count)
        .map(|i| VOCABULARY[i % VOCABULARY.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

fn chat_body(model: &str, prompt: &str, stream: bool) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt},
        ],
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}],
        "temperature": 0.2,
    }))
    .expect("serialisable")
}

fn request_parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("request");
    for count in [20, 300, 2000] {
        let body = chat_body("router-random-0.5", &words(count), false);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("parse_prompt_rewrite", count), &body, |b, body| {
            b.iter(|| {
                let request = ModelRequest::parse(Api::ChatCompletions, black_box(body)).expect("valid");
                let prompt = request.last_user_prompt().expect("has a prompt");
                black_box(prompt.len());
                black_box(request.rewrite_model("gpt-4o"))
            });
        });
    }
    group.finish();
}

fn router_scoring(c: &mut Criterion) {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = Config::merge(
        FileConfig::default(),
        Overrides {
            routers_dir: Some(repo.join("routers")),
            ..Overrides::default()
        },
    )
    .expect("config");
    let routers: Vec<(&str, Arc<dyn Router>)> = vec![
        ("random", Arc::new(RandomRouter::with_seed(1))),
        ("length", Arc::new(LengthRouter)),
        (
            "mf_static",
            routellm::routers::build("mf", &config).expect("the shipped mf artifact loads"),
        ),
        (
            "sw_ranking_static",
            routellm::routers::build("sw_ranking", &config).expect("the shipped sw_ranking artifact loads"),
        ),
    ];
    let mut group = c.benchmark_group("router");
    for (name, router) in &routers {
        for count in [20, 300, 2000] {
            let prompt = words(count);
            group.bench_with_input(BenchmarkId::new(*name, count), &prompt, |b, prompt| {
                b.iter(|| router.strong_win_rate(black_box(prompt)).expect("scores"));
            });
        }
    }
    // `score_turns: max` scores a conversation's last 8 user turns in one batch.
    let turns: Vec<String> = (0..8).map(|turn| words(300 + turn)).collect();
    let turns: Vec<&str> = turns.iter().map(String::as_str).collect();
    for (name, router) in &routers[2..] {
        group.bench_with_input(BenchmarkId::new(*name, "8_turns_x_300"), &turns, |b, turns| {
            b.iter(|| router.strong_win_rates(black_box(turns)).expect("scores"));
        });
    }
    group.finish();

    // MiniLM's latency budget is for 128 tokens; the model folder is outside the repo.
    let minilm_dir = repo.join("../shared/models/all-MiniLM-L6-v2");
    match routellm::embed::MiniLm::load(&minilm_dir) {
        Ok(minilm) => {
            let mut group = c.benchmark_group("embed");
            group.sample_size(20);
            let prompt = words(100);
            group.bench_function("minilm/128_tokens", |b| {
                b.iter(|| routellm::embed::Embedder::embed(&minilm, black_box(&prompt)).expect("embeds"));
            });
            group.finish();
        }
        Err(error) => eprintln!("skipping MiniLM benches: {error}"),
    }

    // bert as served (shipped head and fine-tuned top layer, head+tail truncation: prompts
    // past 256 tokens cost what 256 tokens cost).
    let yaml = format!(
        "routers_dir: {}\nrouter_settings:\n  bert:\n    embedder: {{kind: minilm, path: {}}}\n",
        repo.join("routers").display(),
        minilm_dir.display()
    );
    let bert = FileConfig::from_yaml(&yaml)
        .map_err(|error| error.to_string())
        .and_then(|file| Config::merge(file, Overrides::default()).map_err(|error| error.to_string()))
        .and_then(|config| routellm::routers::build("bert", &config).map_err(|error| error.to_string()));
    match bert {
        Ok(bert) => {
            let mut group = c.benchmark_group("router");
            group.sample_size(10);
            for count in [20, 300, 2000] {
                let prompt = words(count);
                group.bench_with_input(BenchmarkId::new("bert", count), &prompt, |b, prompt| {
                    b.iter(|| bert.strong_win_rate(black_box(prompt)).expect("scores"));
                });
            }
            group.finish();
        }
        Err(error) => eprintln!("skipping bert benches: {error}"),
    }
}

fn gateway(strong: &str, weak: &str, policy: &str) -> Gateway {
    let file = FileConfig::from_yaml(&format!("strong_model: {strong}\nweak_model: {weak}\n{policy}")).expect("yaml");
    let config = Config::merge(file, Overrides::default()).expect("config");
    let mut routers: BTreeMap<String, Arc<dyn Router>> = BTreeMap::new();
    routers.insert("random".into(), Arc::new(RandomRouter::with_seed(1)));
    Gateway::with_routers(&config, routers).expect("gateway")
}

async fn drain(reply: Reply) -> usize {
    match reply {
        Reply::Complete { body, .. } => body.len(),
        Reply::Stream { body, .. } => {
            body.map(|chunk| chunk.map_or(0, |c| c.len()))
                .fold(0, |a, b| async move { a + b })
                .await
        }
    }
}

fn whole_requests(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let upstream = runtime.block_on(async {
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            post(|body: axum::body::Bytes| async move {
                let stream = body.windows(13).any(|w| w == b"\"stream\":true");
                if stream {
                    let frames = ["data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n", "data: [DONE]\n\n"];
                    axum::response::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(axum::body::Body::from(frames.concat()))
                        .expect("response")
                } else {
                    axum::response::Response::builder()
                        .header("content-type", "application/json")
                        .body(axum::body::Body::from(
                            r#"{"id":"x","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#,
                        ))
                        .expect("response")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}/v1")
    });
    let echo = gateway("echo/strong", "echo/weak", "");
    // The default threshold, tracked over the last 1,000 scores: what strong_share adds.
    let echo_share = gateway(
        "echo/strong",
        "echo/weak",
        "thresholds: {random: 0.5}\nstrong_share: {random: 0.3}\n",
    );
    let http = gateway(
        &format!("{{name: openai/strong, base_url: '{upstream}'}}"),
        &format!("{{name: openai/weak, base_url: '{upstream}'}}"),
        "",
    );
    let mut group = c.benchmark_group("gateway");
    for (name, gateway, model) in [
        ("echo", &echo, "router-random-0.5"),
        ("echo_strong_share", &echo_share, "router-random"),
        ("http_mock", &http, "router-random-0.5"),
    ] {
        for stream in [false, true] {
            let body = chat_body(model, &words(300), stream);
            let id = format!("{name}/{}", if stream { "stream" } else { "complete" });
            group.bench_function(id, |b| {
                b.to_async(&runtime).iter(|| async {
                    let completion = gateway.chat_completion(black_box(&body)).await.expect("answer");
                    drain(completion.reply).await
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, request_parsing, router_scoring, whole_requests);
criterion_main!(benches);
