//! The bert router end to end: the shipped head over MiniLM, training on planted data, and
//! refusing an encoder it was not trained on.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::sync::Arc;

use routellm::Router;
use routellm::config::{Config, FileConfig, Overrides};
use routellm::embed::{Embedder, MiniLm, StaticEmbedder};
use routellm::routers::bert::BertRouter;
use routellm::train::bert::{BertOptions, train_bert};

#[path = "common/planted.rs"]
mod planted;
use planted::planted_pair;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn minilm() -> Arc<dyn Embedder> {
    Arc::new(MiniLm::load(&repo().join("../shared/models/all-MiniLM-L6-v2")).unwrap())
}

#[test]
fn shipped_head_serves_through_the_config() {
    let yaml = format!(
        "routers_dir: {}\nrouter_settings:\n  bert:\n    embedder: {{kind: minilm, path: {}}}\n",
        repo().join("routers").display(),
        repo().join("../shared/models/all-MiniLM-L6-v2").display()
    );
    let config = Config::merge(FileConfig::from_yaml(&yaml).unwrap(), Overrides::default()).unwrap();
    let router = routellm::routers::build("bert", &config).unwrap();
    let prompts = [
        "hi, how are you?",
        "Find all real x such that x^4 - 5x^2 + 4 < 0 and prove your answer.",
        "What is the capital of France?",
    ];
    let scores: Vec<f64> = prompts.iter().map(|p| router.strong_win_rate(p).unwrap()).collect();
    assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)), "{scores:?}");
    let spread = scores.iter().copied().fold(f64::MIN, f64::max) - scores.iter().copied().fold(f64::MAX, f64::min);
    assert!(spread > 1e-3, "bert must not be constant: {scores:?}");
    assert_eq!(router.strong_win_rate(prompts[1]).unwrap(), scores[1]);
}

#[test]
fn training_learns_a_planted_signal_and_the_head_refuses_other_encoders() {
    let dir = std::env::temp_dir().join(format!("routellm-bert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut lines = String::new();
    for i in 0..160 {
        let maths = i % 2 == 0;
        let prompt = if maths {
            format!("Solve the differential equation y'' + {i}y = 0 with the given boundary conditions")
        } else {
            format!("Recommend a cosy novel for a rainy weekend, suggestion {i}")
        };
        let row = serde_json::json!({"prompt": prompt, "correct": {
            "big-model": 1.0, "small-model": if maths { 0.0 } else { 1.0 }}});
        lines.push_str(&row.to_string());
        lines.push('\n');
    }
    let data = dir.join("planted.jsonl");
    std::fs::write(&data, lines).unwrap();
    let options = BertOptions {
        l2_grid: vec![1e-3, 1e-1],
        steps: 100,
        split: planted_pair(),
        ..BertOptions::default()
    };
    let encoder = minilm();
    let manifest = train_bert(std::slice::from_ref(&data), &encoder, &options, &dir.join("a"), "test").unwrap();
    assert_eq!(manifest.encoder_training, "frozen");
    let validation = &manifest.validation["per_source"]["planted"];
    // The strong model is always right, so a share `hard = 1 - weak/100` of held-out prompts
    // needs it; a perfect ranking then reaches APGR `1 - hard/2` (the curve's best area).
    let hard = 1.0 - validation["weak_score"].as_f64().unwrap() / 100.0;
    let perfect = 1.0 - hard / 2.0;
    assert!(validation["apgr"].as_f64().unwrap() > perfect - 0.02, "{validation}");
    let router = BertRouter::load(&dir.join("a"), encoder.clone()).unwrap();
    let hard = router
        .strong_win_rate("Solve the differential equation y'' - y = 0 on [0, 1]")
        .unwrap();
    let easy = router
        .strong_win_rate("Recommend a cosy novel for a long train ride")
        .unwrap();
    assert!(hard > easy + 0.2, "{hard} vs {easy}");

    let other: Arc<dyn Embedder> = Arc::new(StaticEmbedder::load(&repo().join("routers/static")).unwrap());
    let Err(error) = BertRouter::load(&dir.join("a"), other) else {
        panic!("a head trained on MiniLM must not serve another encoder")
    };
    assert!(error.to_string().contains("encoder"), "{error}");

    let eval_path = PathBuf::from("../shared/data/routellm/gsm8k/gsm8k_responses.csv");
    let error = train_bert(&[eval_path], &encoder, &options, &dir.join("b"), "test").unwrap_err();
    assert!(error.to_string().contains("evaluation data"), "{error}");
}
