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

#[test]
fn shipped_mf_artifact_serves_offline_with_no_configuration() {
    let config = Config::merge(
        FileConfig::default(),
        Overrides {
            routers: Some(vec!["mf".into(), "random".into()]),
            routers_dir: Some(repo().join("routers")),
            strong_model: Some("echo/strong".into()),
            weak_model: Some("echo/weak".into()),
            ..Overrides::default()
        },
    )
    .unwrap();
    let gateway = routellm::Gateway::from_config(&config).unwrap();
    let router = &gateway.routers()["mf"];
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

#[test]
fn training_is_reproducible_and_learns_a_planted_signal() {
    let dir = std::env::temp_dir().join(format!("routellm-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The weak model fails exactly the prompts about integrals; the strong one never fails.
    let rows: Vec<serde_json::Value> = (0..300)
        .map(|i| {
            let hard = i % 3 == 0;
            let prompt = if hard {
                format!("Compute the definite integral number {i} of a rational function with partial fractions")
            } else {
                format!("Name a fruit that is red, example {i}")
            };
            serde_json::json!({"prompt": prompt, "correct": {"big-model": 1.0, "small-model": if hard { 0.0 } else { 1.0 }, "other": 0.0}})
        })
        .collect();
    let data = dir.join("planted.jsonl");
    write(&data, &rows);
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

#[test]
fn openai_embedder_talks_to_a_compatible_endpoint() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let base_url = runtime.block_on(async {
        let app = axum::Router::new().route(
            "/v1/embeddings",
            axum::routing::post(
                |headers: axum::http::HeaderMap, body: axum::Json<serde_json::Value>| async move {
                    assert_eq!(headers["authorization"], "Bearer sk-embed");
                    let text = body["input"].as_str().unwrap().to_owned();
                    #[allow(clippy::cast_precision_loss)]
                    let length = text.len() as f32;
                    axum::Json(serde_json::json!({"data": [{"embedding": [length, 1.0, 0.0]}], "model": body["model"]}))
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}/v1")
    });
    let embedder = OpenAiEmbedder::connect("text-embedding-3-small", Some(&base_url), Some("sk-embed".into())).unwrap();
    assert_eq!(embedder.dim(), 3);
    let vector = embedder.embed("abc").unwrap();
    assert!((cosine(&vector, &vector) - 1.0).abs() < 1e-6);
    assert!((vector[0] - 3.0 / 10_f32.sqrt()).abs() < 1e-6);
    let Err(error) = OpenAiEmbedder::connect("m", Some("http://127.0.0.1:1/v1"), None) else {
        panic!("an unreachable endpoint must fail at start-up")
    };
    assert!(error.to_string().contains("embeddings endpoint"), "{error}");
    let config: EmbedderConfig = serde_norway::from_str("kind: openai\nmodel: x\n").unwrap();
    assert!(matches!(config, EmbedderConfig::Openai { .. }));
}

#[test]
fn distill_builds_a_loadable_table_from_minilm() {
    let model = repo().join("../shared/models/all-MiniLM-L6-v2");
    let minilm = routellm::embed::MiniLm::load(&model).unwrap();
    let out = std::env::temp_dir().join(format!("routellm-distill-{}", std::process::id()));
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
    let dir = std::env::temp_dir().join(format!("routellm-mf-features-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
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
