//! The `sw_ranking` router end to end: the shipped artifact, training on planted data, and
//! the checks that keep it honest (embedder match, distinct tiers, no eval data).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::sync::Arc;

use routellm::Router;
use routellm::embed::{Embedder, StaticEmbedder};
use routellm::routers::sw_ranking::{SwManifest, SwRankingRouter};
use routellm::train::SplitOptions;
use routellm::train::sw_ranking::{SwOptions, train_sw_ranking};

#[path = "common/planted.rs"]
mod planted;
use planted::planted_pair;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn static_embedder() -> Arc<dyn Embedder> {
    Arc::new(StaticEmbedder::load(&repo().join("routers/static")).unwrap())
}

#[test]
fn shipped_artifact_loads_and_separates_its_default_pair() {
    let dir = repo().join("routers/sw_ranking");
    let manifest: SwManifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let tier = |name: &str| manifest.model_tiers[manifest.models.iter().position(|m| m == name).unwrap()];
    assert!(
        tier(&manifest.default_strong) < tier(&manifest.default_weak),
        "strong must rank above weak"
    );
    // Built from MIT-licensed data only.
    for source in manifest.data.as_array().unwrap() {
        assert!(source["licence"].as_str().unwrap().starts_with("MIT"), "{source}");
    }
    let router = SwRankingRouter::load(&dir, static_embedder(), None, None).unwrap();
    let prompts = [
        "hi there",
        "Prove that the sum of the first n odd numbers is n squared.",
        "Which of these is a mammal? A) shark B) dolphin C) trout D) eel",
        "Write a Python function that merges overlapping intervals.",
    ];
    let scores: Vec<f64> = prompts.iter().map(|p| router.strong_win_rate(p).unwrap()).collect();
    assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)), "{scores:?}");
    // Not a constant: different prompts get different rates.
    let spread = scores.iter().copied().fold(f64::MIN, f64::max) - scores.iter().copied().fold(f64::MAX, f64::min);
    assert!(spread > 1e-3, "{scores:?}");
    // The same prompt always scores the same.
    assert_eq!(router.strong_win_rate(prompts[1]).unwrap(), scores[1]);
    // Swapping the identities mirrors the rate.
    let swapped = SwRankingRouter::load(
        &dir,
        static_embedder(),
        Some(&manifest.default_weak),
        Some(&manifest.default_strong),
    )
    .unwrap();
    assert!((swapped.strong_win_rate(prompts[1]).unwrap() - (1.0 - scores[1])).abs() < 1e-9);
}

/// Vectors of the right size from a different model.
struct OtherEmbedder;

impl Embedder for OtherEmbedder {
    fn dim(&self) -> usize {
        256
    }
    fn embed(&self, _: &str) -> Result<Vec<f32>, routellm::embed::EmbedError> {
        Ok(vec![1.0 / 16.0; 256])
    }
    fn id(&self) -> &'static str {
        "static:0123456789abcdef"
    }
}

#[test]
fn loading_refuses_a_wrong_embedder_unknown_or_same_tier_identities() {
    let dir = repo().join("routers/sw_ranking");
    let manifest: SwManifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let Err(error) = SwRankingRouter::load(&dir, static_embedder(), Some("no-such-model"), None) else {
        panic!("an unknown identity must not load")
    };
    assert!(error.to_string().contains("no-such-model"), "{error}");
    let (a, b) = (0..manifest.models.len())
        .flat_map(|i| (i + 1..manifest.models.len()).map(move |j| (i, j)))
        .find(|(i, j)| manifest.model_tiers[*i] == manifest.model_tiers[*j])
        .map(|(i, j)| (&manifest.models[i], &manifest.models[j]))
        .unwrap();
    let Err(error) = SwRankingRouter::load(&dir, static_embedder(), Some(a), Some(b)) else {
        panic!("identities in one tier must not load")
    };
    assert!(error.to_string().contains("cannot tell"), "{error}");

    let other: Arc<dyn Embedder> = Arc::new(OtherEmbedder);
    let Err(error) = SwRankingRouter::load(&dir, other, None, None) else {
        panic!("another embedder's vectors must not be compared with the index")
    };
    assert!(error.to_string().contains("embedder"), "{error}");
}

#[test]
fn training_learns_a_planted_signal_reproducibly_and_refuses_eval_data() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    // Maths prompts: the big model is right and the small one wrong; trivia: both right.
    // A mid model and a floor model give the tiers something to separate.
    let mut lines = String::new();
    for i in 0..200 {
        let maths = i % 2 == 0;
        let prompt = if maths {
            format!("Compute the definite integral number {i} of a rational function using partial fractions")
        } else {
            format!("Name a fruit that is red, example {i}")
        };
        let row = serde_json::json!({"prompt": prompt, "correct": {
            "big-model": 1.0, "small-model": if maths { 0.0 } else { 1.0 },
            "mid-model": if i % 4 == 0 { 1.0 } else { 0.0 }, "floor-model": 0.0}});
        lines.push_str(&row.to_string());
        lines.push('\n');
    }
    let data = dir.join("planted.jsonl");
    std::fs::write(&data, lines).unwrap();
    let options = SwOptions {
        tiers: 4,
        split: planted_pair(),
        ..SwOptions::default()
    };
    let embedder = static_embedder();
    let manifest = train_sw_ranking(
        std::slice::from_ref(&data),
        &embedder,
        "static",
        &options,
        &dir.join("a"),
        "test",
    )
    .unwrap();
    train_sw_ranking(
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
        "same data, same bytes"
    );
    // About 80% of prompts are indexed; the rest validate.
    assert!((140..=180).contains(&manifest.prompts), "{}", manifest.prompts);
    let validation = &manifest.validation["per_source"]["planted"];
    // The strong model is always right, so a share `hard = 1 - weak/100` of held-out prompts
    // needs it; a perfect ranking then reaches APGR `1 - hard/2` (the curve's best area).
    let hard = 1.0 - validation["weak_score"].as_f64().unwrap() / 100.0;
    let perfect = 1.0 - hard / 2.0;
    assert!(validation["apgr"].as_f64().unwrap() > perfect - 0.02, "{validation}");

    let router = SwRankingRouter::load(&dir.join("a"), embedder.clone(), None, None).unwrap();
    let hard = router
        .strong_win_rate("Compute the definite integral of 1/(x^2+1) with partial fractions")
        .unwrap();
    let easy = router.strong_win_rate("Name a fruit that is yellow").unwrap();
    assert!(hard > easy + 0.05, "{hard} vs {easy}");

    let eval_path = PathBuf::from("../shared/data/routellm/gsm8k/gsm8k_responses.csv");
    let error = train_sw_ranking(&[eval_path], &embedder, "static", &options, &dir.join("c"), "test").unwrap_err();
    assert!(error.to_string().contains("evaluation data"), "{error}");
    let error = train_sw_ranking(
        std::slice::from_ref(&data),
        &embedder,
        "static",
        &SwOptions {
            split: SplitOptions {
                strong: "gpt-9".into(),
                ..options.split.clone()
            },
            ..options
        },
        &dir.join("d"),
        "test",
    )
    .unwrap_err();
    assert!(error.to_string().contains("gpt-9"), "{error}");
}
