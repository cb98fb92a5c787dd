//! The mf router end to end: the shipped artifact and static table, training on small
//! data, the embedder backends, and serving with no configuration.

#![allow(clippy::unwrap_used, clippy::format_collect)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::sync::Arc;

use routellm::Router;
use routellm::config::{Config, FileConfig, Overrides};
use routellm::embed::{Embedder, EmbedderConfig, OpenAiEmbedder, StaticEmbedder};
use routellm::routers::mf::MfRouter;
use routellm::train::{self, MfOptions};

#[path = "common/planted.rs"]
mod planted;
use planted::planted_pair;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn static_embedder() -> Arc<dyn Embedder> {
    Arc::new(StaticEmbedder::load(&repo().join("routers/static")).unwrap())
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn static_embeddings_are_normalised_semantic_and_unlimited_in_length() {
    let embedder = static_embedder();
    assert_eq!(embedder.dim(), 256);
    let cat = embedder.embed("my cat sleeps on the sofa all day").unwrap();
    let kitten = embedder.embed("the kitten naps on the couch").unwrap();
    let tax = embedder.embed("how do I file quarterly corporate tax returns").unwrap();
    assert!((cosine(&cat, &cat) - 1.0).abs() < 1e-4);
    assert!(
        cosine(&cat, &kitten) > cosine(&cat, &tax),
        "related texts must be closer"
    );
    // Beyond MiniLM's 256 tokens the tail still counts.
    let prefix = "context ".repeat(400);
    let a = embedder.embed(&format!("{prefix} question about astronomy")).unwrap();
    let b = embedder
        .embed(&format!("{prefix} question about cooking pasta recipes"))
        .unwrap();
    assert_ne!(a, b, "words after the 256th token change the embedding");
    let table = StaticEmbedder::load(&repo().join("routers/static")).unwrap();
    assert!(table.token_ids(&prefix).unwrap().len() >= 400, "no truncation");
    assert!(embedder.embed("").unwrap().iter().all(|x| *x == 0.0));
}

/// `file` serving the shipped `mf` and `random` between two echo models.
fn shipped_mf_and_random(file: FileConfig) -> Config {
    Config::merge(
        file,
        Overrides {
            routers: Some(vec!["mf".into(), "random".into()]),
            routers_dir: Some(repo().join("routers")),
            strong_model: Some("echo/strong".into()),
            weak_model: Some("echo/weak".into()),
            ..Overrides::default()
        },
    )
    .unwrap()
}

#[test]
fn shipped_mf_artifact_serves_offline_with_no_configuration() {
    let config = shipped_mf_and_random(FileConfig::default());
    let gateway = routellm::Gateway::from_config(&config).unwrap();
    let router = &gateway.routers()["mf"];
    assert_eq!(router.scoring_cost(), routellm::routers::ScoringCost::Blocking);
    let hard =
        "Let f(x) = e^x / (1 + e^x). Show that f'(x) = f(x)(1 - f(x)), then compute the integral of f from 0 to 1.";
    let first = router.strong_win_rate(hard).unwrap();
    assert!((0.0..=1.0).contains(&first));
    assert_eq!(first, router.strong_win_rate(hard).unwrap(), "scoring is deterministic");
    assert_ne!(
        first,
        router.strong_win_rate("hi").unwrap(),
        "the score depends on the prompt"
    );

    let manifest = MfRouter::manifest(&repo().join("routers/mf")).unwrap();
    assert_eq!(manifest.embedder, static_embedder().id());
    let data = manifest.data.as_array().unwrap();
    assert!(!data.is_empty());
    for file in data {
        assert!(file["licence"].as_str().unwrap().contains("MIT"), "{file}");
        assert_eq!(file["sha256"].as_str().unwrap().len(), 64);
    }
    assert!(manifest.validation["per_source"].is_object());
}

#[test]
fn identities_are_configurable_and_mismatched_embedders_are_refused() {
    let dir = repo().join("routers/mf");
    let default = MfRouter::load(&dir, static_embedder(), None, None).unwrap();
    let other = MfRouter::load(
        &dir,
        static_embedder(),
        Some("gpt-4o-2024-05-13"),
        Some("Llama-2-7b-hf"),
    )
    .unwrap();
    let prompt = "Prove that there are infinitely many primes.";
    assert_ne!(
        default.strong_win_rate(prompt).unwrap(),
        other.strong_win_rate(prompt).unwrap()
    );
    let Err(error) = MfRouter::load(&dir, static_embedder(), Some("no-such-model"), None) else {
        panic!("an unknown identity must fail")
    };
    assert!(error.to_string().contains("known:"), "{error}");
}

fn write(path: &Path, rows: &[serde_json::Value]) {
    let text: String = rows.iter().map(|row| format!("{row}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// 300 correctness rows where the weak model fails exactly the prompts about integrals;
/// the strong one never fails.
fn integral_rows() -> Vec<serde_json::Value> {
    (0..300)
        .map(|i| {
            let hard = i % 3 == 0;
            let prompt = if hard {
                format!("Compute the definite integral number {i} of a rational function with partial fractions")
            } else {
                format!("Name a fruit that is red, example {i}")
            };
            serde_json::json!({"prompt": prompt, "correct": {"big-model": 1.0, "small-model": if hard { 0.0 } else { 1.0 }, "other": 0.0}})
        })
        .collect()
}

#[test]
fn training_is_reproducible_and_learns_a_planted_signal() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let data = dir.join("planted.jsonl");
    write(&data, &integral_rows());
    let options = MfOptions {
        epochs: 15,
        hidden: 16,
        split: planted_pair(),
        ..MfOptions::default()
    };
    let embedder = static_embedder();
    let first = train::train_mf(
        std::slice::from_ref(&data),
        &embedder,
        "static",
        &options,
        &dir.join("a"),
        "test",
    )
    .unwrap();
    train::train_mf(
        std::slice::from_ref(&data),
        &embedder,
        "static",
        &options,
        &dir.join("b"),
        "test",
    )
    .unwrap();
    assert_eq!(
        std::fs::read(dir.join("a/model.safetensors")).unwrap(),
        std::fs::read(dir.join("b/model.safetensors")).unwrap(),
        "same seed, same bytes"
    );
    let validation = &first.validation["per_source"]["planted"];
    assert!(validation["apgr"].as_f64().unwrap() > 0.8, "{validation}");

    let router = MfRouter::load(&dir.join("a"), embedder, None, None).unwrap();
    let hard = router
        .strong_win_rate("Compute the definite integral of 1/(x^2+1) with partial fractions")
        .unwrap();
    let easy = router.strong_win_rate("Name a fruit that is yellow").unwrap();
    assert!(hard > easy, "{hard} vs {easy}");

    let eval_path = PathBuf::from("../shared/data/routellm/gsm8k/gsm8k_responses.csv");
    let error = train::train_mf(
        &[eval_path],
        &static_embedder(),
        "static",
        &options,
        &dir.join("c"),
        "test",
    )
    .unwrap_err();
    assert!(error.to_string().contains("evaluation data"), "{error}");
}

/// An OpenAI-compatible embeddings endpoint on `127.0.0.1:0`: bag-of-words vectors (each
/// word hashed into one of 32 dimensions), `input` a string or an array, items returned in
/// reverse order with their `index`, the first array request refused once with a 429.
/// Counts requests; demands `Authorization: Bearer <key>` when given a key.
struct MockEmbeddings {
    base_url: String,
    requests: Arc<std::sync::atomic::AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

fn bag_of_words(text: &str) -> Vec<f32> {
    let mut vector = vec![0.0_f32; 32];
    vector[0] = 0.1;
    for word in text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let hash = word
            .to_ascii_lowercase()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        #[allow(clippy::cast_possible_truncation)]
        let slot = (hash % 31) as usize + 1;
        vector[slot] += 1.0;
    }
    vector
}

impl MockEmbeddings {
    /// An endpoint that answers only requests carrying `required` (a header and its value).
    fn start(required: Option<(&'static str, &'static str)>) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let refused_once = Arc::new(AtomicBool::new(false));
        let counter = requests.clone();
        let base_url = runtime.block_on(async move {
            let app = axum::Router::new().route(
                "/v1/embeddings",
                axum::routing::post(
                    move |headers: axum::http::HeaderMap, body: axum::Json<serde_json::Value>| async move {
                        use axum::response::IntoResponse;
                        counter.fetch_add(1, Ordering::SeqCst);
                        let authorised = required
                            .is_none_or(|(name, expected)| headers.get(name).is_some_and(|value| value == expected));
                        if !authorised {
                            return axum::http::StatusCode::UNAUTHORIZED.into_response();
                        }
                        // Like OpenAI's context limit (8,191 tokens), counted in characters.
                        let too_long = |text: &str| text.chars().count() > 20_000;
                        let inputs: Vec<String> = match &body["input"] {
                            serde_json::Value::String(text) => vec![text.clone()],
                            serde_json::Value::Array(items) => {
                                if !refused_once.swap(true, Ordering::SeqCst) {
                                    return (axum::http::StatusCode::TOO_MANY_REQUESTS, [("retry-after", "0")], "slow down")
                                        .into_response();
                                }
                                items.iter().map(|item| item.as_str().unwrap().to_owned()).collect()
                            }
                            _ => return axum::http::StatusCode::BAD_REQUEST.into_response(),
                        };
                        if inputs.iter().any(|text| too_long(text)) {
                            return (axum::http::StatusCode::BAD_REQUEST, "maximum context length exceeded").into_response();
                        }
                        let data: Vec<serde_json::Value> = inputs
                            .iter()
                            .enumerate()
                            .rev()
                            .map(|(index, text)| serde_json::json!({"object": "embedding", "index": index, "embedding": bag_of_words(text)}))
                            .collect();
                        axum::Json(serde_json::json!({"object": "list", "data": data, "model": body["model"]})).into_response()
                    },
                ),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await });
            format!("http://{address}/v1")
        });
        Self {
            base_url,
            requests,
            _runtime: runtime,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[test]
fn openai_embedder_talks_to_a_compatible_endpoint() {
    let mock = MockEmbeddings::start(Some(("authorization", "Bearer sk-embed")));
    let embedder =
        OpenAiEmbedder::connect("text-embedding-3-small", Some(&mock.base_url), Some("sk-embed".into())).unwrap();
    assert_eq!(embedder.dim(), 32);
    let vector = embedder.embed("integral integral").unwrap();
    assert!((cosine(&vector, &vector) - 1.0).abs() < 1e-6, "normalised");
    let texts = ["integral of x", "a red fruit", "integral of x"];
    let many = embedder.embed_many(&texts).unwrap();
    assert_eq!(many.len(), 3);
    assert!(
        (cosine(&many[0], &many[2]) - 1.0).abs() < 1e-6,
        "reordered items land at their index"
    );
    assert!(cosine(&many[0], &many[1]) < 0.9);
    assert_eq!(
        many[1],
        embedder.embed("a red fruit").unwrap(),
        "a batch embeds as single calls do"
    );
    let pasted_document = format!("Summarise this integral table: {}", "integral of x dx; ".repeat(5_000));
    let vector = embedder.embed(&pasted_document).unwrap();
    assert_eq!(embedder.embed_many(&[&pasted_document]).unwrap()[0], vector);
    assert!(
        cosine(&vector, &many[0]) > 0.5,
        "a long prompt is embedded by its head and tail"
    );
    let Err(error) = OpenAiEmbedder::connect("m", Some(&mock.base_url), Some("sk-wrong".into())) else {
        panic!("a refused key must fail at start-up")
    };
    assert!(error.to_string().contains("401"), "{error}");
    let Err(error) = OpenAiEmbedder::connect("m", Some("http://127.0.0.1:1/v1"), None) else {
        panic!("an unreachable endpoint must fail at start-up")
    };
    assert!(error.to_string().contains("embeddings endpoint"), "{error}");
    let config: EmbedderConfig = serde_norway::from_str("kind: openai\nmodel: x\n").unwrap();
    assert!(matches!(config, EmbedderConfig::Openai { .. }));
}

/// An embedder header naming an unset variable stops start-up, saying which.
#[test]
fn an_embedder_header_with_an_unset_variable_fails_at_start_up() {
    let file = routellm::config::FileConfig::from_yaml(
        "router_settings:\n  mf:\n    embedder:\n      kind: openai\n      headers: {X-Gateway-Key: 'Bearer ${ROUTELLM_TEST_UNSET_GATEWAY}'}\n",
    )
    .unwrap();
    let config = Config::merge(
        file,
        Overrides {
            routers: Some(vec!["mf".into()]),
            routers_dir: Some(std::env::temp_dir().join("routellm-no-artifacts-here")),
            ..Overrides::default()
        },
    )
    .unwrap();
    let Err(error) = routellm::routers::build("mf", &config) else {
        panic!("an unset header variable must fail at start-up")
    };
    assert!(
        error.to_string().contains("ROUTELLM_TEST_UNSET_GATEWAY is not set"),
        "{error}"
    );
}

/// What a team with an embeddings endpoint does: `train mf --embedder openai` writes the
/// artifact where `serve` looks for it, and a config naming the endpoint serves it.
#[test]
fn an_openai_embedder_artifact_trains_from_the_command_line_and_serves() {
    let mock = MockEmbeddings::start(Some(("authorization", "Bearer sk-embed")));
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    write(&dir.join("planted.jsonl"), &integral_rows());
    let train = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_routellm"))
            .args([
                "train",
                "mf",
                "--embedder",
                "openai",
                "--openai-base-url",
                &mock.base_url,
            ])
            .args(["--openai-api-key-env", "ROUTELLM_TEST_EMBEDDINGS_KEY", "--data"])
            .arg(dir.join("planted.jsonl"))
            .arg("--routers-dir")
            .arg(&dir)
            .arg("--embedding-cache")
            .arg(dir.join("cache"))
            .args([
                "--epochs",
                "15",
                "--hidden",
                "16",
                "--strong",
                "big-model",
                "--weak",
                "small-model",
            ])
            .env("ROUTELLM_TEST_EMBEDDINGS_KEY", "sk-embed")
            .output()
            .unwrap()
    };
    let output = train();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // A probe, three batches of at most 128 prompts, one retry after the 429: not 300 calls.
    let first_run = mock.requests();
    assert!((4..=6).contains(&first_run), "{first_run} requests");
    let manifest = std::fs::read_to_string(dir.join("mf-openai/manifest.json")).unwrap();
    assert!(!manifest.contains("sk-embed"), "the key never reaches the manifest");
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    assert_eq!(manifest["embedder"], "openai:text-embedding-3-small");
    assert!(
        manifest["validation"]["per_source"]["planted"]["apgr"]
            .as_f64()
            .unwrap()
            > 0.8
    );
    assert!(train().status.success());
    assert_eq!(
        mock.requests(),
        first_run + 1,
        "a rerun reads the cached embeddings: only the probe"
    );

    // Served through an endpoint of the same embeddings behind a gateway that wants its own
    // header, configured on the embedder (this process cannot set the key variable:
    // `set_var` is unsafe code, which the crate forbids).
    let gateway = MockEmbeddings::start(Some(("x-gateway-key", "gk-embed")));
    let file = routellm::config::FileConfig::from_yaml(&format!(
        "router_settings:\n  mf:\n    strong_identity: big-model\n    weak_identity: small-model\n    embedder:\n      kind: openai\n      base_url: {}\n      api_key_env: ROUTELLM_TEST_UNSET_KEY\n      headers: {{X-Gateway-Key: gk-embed}}\n",
        gateway.base_url
    ))
    .unwrap();
    let config = Config::merge(
        file,
        Overrides {
            routers: Some(vec!["mf".into()]),
            routers_dir: Some(dir.clone()),
            strong_model: Some("echo/strong".into()),
            weak_model: Some("echo/weak".into()),
            ..Overrides::default()
        },
    )
    .unwrap();
    let router = routellm::routers::build("mf", &config).unwrap();
    assert_eq!(
        router.scoring_cost(),
        routellm::routers::ScoringCost::Remote,
        "a network-bound router does not take a CPU slot"
    );
    let hard = router
        .strong_win_rate("Compute the definite integral of 1/x with partial fractions")
        .unwrap();
    let easy = router.strong_win_rate("Name a fruit that is red").unwrap();
    assert!(hard > easy, "{hard} vs {easy}");
    // Batch scoring (`score`, `calibrate`, `eval`) embeds 128 prompts a request.
    let prompts: Vec<String> = (0..300).map(|i| format!("Name fruit number {i}")).collect();
    let before = gateway.requests();
    let scores = routellm::scoring::score_all(router.as_ref(), "mf", &prompts).unwrap();
    assert_eq!(
        gateway.requests() - before,
        4,
        "300 prompts in three requests, and the retry after the mock's one 429"
    );
    assert_eq!(scores.len(), 300);
    for index in [0, 150, 299] {
        assert_eq!(scores[index], router.strong_win_rate(&prompts[index]).unwrap());
    }
}

#[test]
fn distill_builds_a_loadable_table_from_minilm() {
    let model = repo().join("../shared/models/all-MiniLM-L6-v2");
    let minilm = routellm::embed::MiniLm::load(&model).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().to_path_buf();
    let corpus = vec!["the cat sat on the mat".to_owned(), "the dog ate the bone".to_owned()];
    let digest = routellm::embed::TableBuilder::distill(&minilm, &corpus, 16, &out).unwrap();
    assert_eq!(digest.len(), 64);
    let table = StaticEmbedder::load(&out).unwrap();
    assert_eq!(table.dim(), 16);
    let vector = table.embed("a cat and a dog").unwrap();
    assert!((cosine(&vector, &vector) - 1.0).abs() < 1e-3);
}

#[test]
fn fast_wordpiece_matches_the_tokenizers_crate() {
    let reference = tokenizers::Tokenizer::from_file(repo().join("routers/static/tokenizer.json")).unwrap();
    let table = StaticEmbedder::load(&repo().join("routers/static")).unwrap();
    let mut texts: Vec<String> = vec![
        "Héllo, Wörld! naïve café — “quotes” and ‘single’".into(),
        "中文字符和日本語のテキスト 한국어".into(),
        "emoji 🚀🔥 and math ∑ x² ≤ ∞; tabs\tand\nnewlines\r\n".into(),
        "control\u{0007}chars\u{200B}zero-width\u{FEFF} and NUL\u{0}x \u{FFFD}".into(),
        // Control characters Rust counts as whitespace: BERT drops them, joining the words.
        "e\u{c}Tll me a joke, vertical\u{b}tab".into(),
        "next\u{85}line and form\u{c}feed in non-ASCII text: é".into(),
        format!("averyveryverylongword{}", "x".repeat(120)),
        "C++ & C# -> fn main() { println!(\"{}\", 1_000.5e-3); } // comment".into(),
        "ÅÄÖ ÀÉÎÕÜ ǅ ß İ ΣΑΣ".into(),
        String::new(),
    ];
    let calibration = std::fs::read_to_string(repo().join("routers/calibration/prompts.jsonl")).unwrap();
    texts.extend(routellm::prompts::parse(&calibration).unwrap());
    for text in &texts {
        let expected = reference.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(table.token_ids(text).unwrap(), expected, "{text:?}");
    }
}

#[test]
fn minilm_artifact_takes_its_truncation_from_the_manifest() {
    let yaml = |extra: &str| {
        format!(
            "routers_dir: {}\nrouter_settings:\n  mf:\n    embedder: {{kind: minilm, path: {}{extra}}}\n",
            repo().join("routers").display(),
            repo().join("../shared/models/all-MiniLM-L6-v2").display()
        )
    };
    let config =
        |extra: &str| Config::merge(FileConfig::from_yaml(&yaml(extra)).unwrap(), Overrides::default()).unwrap();
    // Naming the folder is enough: routers/mf-minilm was trained with head+tail truncation.
    let router = routellm::routers::build("mf", &config("")).unwrap();
    let rate = router
        .strong_win_rate("Explain the proof of the spectral theorem")
        .unwrap();
    assert!((0.0..=1.0).contains(&rate));
    // Asking for the other truncation is a different embedder: refused, not served wrong.
    let Err(error) = routellm::routers::build("mf", &config(", truncation: head")) else {
        panic!("an artifact must not load with an embedder it was not trained with")
    };
    assert!(error.to_string().contains("minilm-headtail"), "{error}");
}

#[test]
fn an_artifact_trained_on_other_prompt_features_is_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let shipped = repo().join("routers/mf");
    std::fs::copy(shipped.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shipped.join("manifest.json")).unwrap()).unwrap();
    // An artifact from a build whose feature list was one shorter: the weights would be
    // silently misaligned with this build's features, so loading must fail.
    manifest["features"].as_array_mut().unwrap().pop();
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    let Err(error) = MfRouter::load(&dir, static_embedder(), None, None) else {
        panic!("an artifact trained on other features must not load")
    };
    assert!(error.to_string().contains("retrain"), "{error}");
    // The untouched artifact loads with the same embedder.
    MfRouter::load(&shipped, static_embedder(), None, None).unwrap();
}

/// A retrained artifact rolls out by a reload: the router whose `router_settings` changed is
/// rebuilt and swapped with the policy, the others are left as they are, and one that does
/// not build refuses the reload and keeps the running router.
#[test]
fn a_reload_rebuilds_the_router_whose_settings_changed_and_only_that_one() {
    let config_with = |mf_settings: &str| {
        let yaml = format!("thresholds: {{mf: 0.5}}\nrouter_settings: {{mf: {mf_settings}}}\n");
        shipped_mf_and_random(FileConfig::from_yaml(&yaml).unwrap())
    };
    let gateway = routellm::Gateway::from_config(&config_with("{}")).unwrap();
    let before = gateway.routers();
    let prompt = "Prove that the square root of 2 is irrational, step by step.";
    let served = before["mf"].strong_win_rate(prompt).unwrap();

    // Another identity pair is another router: rebuilt, and no restart asked for.
    let rescored = config_with("{strong_identity: gpt-4o-2024-05-13, weak_identity: llama-2-7b-hf}");
    assert_eq!(gateway.reload(&rescored).unwrap(), Vec::<&str>::new());
    let after = gateway.routers();
    assert!(!Arc::ptr_eq(&before["mf"], &after["mf"]), "mf was rebuilt");
    assert!(
        Arc::ptr_eq(&before["random"], &after["random"]),
        "random was left alone"
    );
    assert_ne!(after["mf"].strong_win_rate(prompt).unwrap(), served);

    // The same settings again: nothing rebuilt.
    assert!(gateway.reload(&rescored).unwrap().is_empty());
    assert!(Arc::ptr_eq(&after["mf"], &gateway.routers()["mf"]));

    // An artifact that is not there: the reload is refused and the running mf stays.
    let missing = config_with("{artifact: no-such-artifact}");
    let error = gateway.reload(&missing).unwrap_err().to_string();
    assert!(error.contains("router `mf`"), "{error}");
    assert!(Arc::ptr_eq(&after["mf"], &gateway.routers()["mf"]));
    assert_eq!(gateway.reloads(), (2, 1));
}
