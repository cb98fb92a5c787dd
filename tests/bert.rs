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

/// `dir/planted.jsonl`: `count` correctness rows alternating a hard prompt (the big model
/// right, the small one wrong) and an easy one (both right).
fn write_planted(dir: &Path, count: usize, hard: impl Fn(usize) -> String, easy: impl Fn(usize) -> String) -> PathBuf {
    let mut lines = String::new();
    for i in 0..count {
        let is_hard = i % 2 == 0;
        let prompt = if is_hard { hard(i) } else { easy(i) };
        let row = serde_json::json!({"prompt": prompt, "correct": {
            "big-model": 1.0, "small-model": if is_hard { 0.0 } else { 1.0 }}});
        lines.push_str(&row.to_string());
        lines.push('\n');
    }
    let data = dir.join("planted.jsonl");
    std::fs::write(&data, lines).unwrap();
    data
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
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let data = write_planted(
        &dir,
        160,
        |i| format!("Solve the differential equation y'' + {i}y = 0 with the given boundary conditions"),
        |i| format!("Recommend a cosy novel for a rainy weekend, suggestion {i}"),
    );
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

#[test]
fn an_artifact_with_a_fine_tuned_top_layer_serves_through_that_layer() {
    use routellm::routers::bert::{BertHead, BertManifest, FROZEN, LABELS};
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let encoder = minilm();
    let base = encoder.as_minilm().unwrap();
    let dim = encoder.dim();
    #[allow(clippy::cast_precision_loss)]
    let head = BertHead {
        weight: (0..3 * dim).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect(),
        bias: vec![0.1, 0.0, -0.1],
        mean: vec![0.0; dim],
        std: vec![1.0; dim],
    };
    let mut layer = base.top_layer_tensors();
    for (name, values, _) in &mut layer {
        if name.ends_with("intermediate.dense.weight") {
            for v in values.iter_mut() {
                *v *= 1.3;
            }
        }
    }
    let manifest = |training: &str| BertManifest {
        router: "bert".into(),
        encoder: encoder.id().to_owned(),
        labels: LABELS.iter().map(|l| (*l).to_owned()).collect(),
        encoder_training: training.into(),
        features: Vec::new(),
        hyperparameters: serde_json::Value::Null,
        data: serde_json::Value::Null,
        validation: serde_json::Value::Null,
        command: String::new(),
    };
    head.save(
        &dir.join("tuned"),
        &manifest("top layer fine-tuned with the head"),
        &layer,
    )
    .unwrap();
    head.save(&dir.join("frozen"), &manifest(FROZEN), &[]).unwrap();
    let tuned = BertRouter::load(&dir.join("tuned"), encoder.clone()).unwrap();
    let frozen = BertRouter::load(&dir.join("frozen"), encoder.clone()).unwrap();

    let expected_encoder = base
        .with_top_layer_from("check", |name| {
            layer
                .iter()
                .find(|(tensor, _, _)| tensor == name)
                .map(|(_, values, shape)| (values.clone(), shape.clone()))
                .ok_or_else(|| format!("{name} missing"))
        })
        .unwrap();
    for prompt in ["Summarise the causes of the First World War.", "2 + 2 = ?"] {
        let served = tuned.strong_win_rate(prompt).unwrap();
        let expected = head.probabilities(&expected_encoder.embed(prompt).unwrap())[0];
        assert!((served - expected).abs() < 1e-9, "{served} vs {expected}");
        let published = head.probabilities(&encoder.embed(prompt).unwrap())[0];
        assert!((frozen.strong_win_rate(prompt).unwrap() - published).abs() < 1e-9);
        assert!(
            (served - published).abs() > 1e-4,
            "the tuned layer must be the one serving"
        );
    }
    assert_ne!(tuned.cache_key(), frozen.cache_key());

    // A manifest that promises a fine-tuned layer the weights file lacks fails to load.
    head.save(
        &dir.join("broken"),
        &manifest("top layer fine-tuned with the head"),
        &[],
    )
    .unwrap();
    let Err(error) = BertRouter::load(&dir.join("broken"), encoder) else {
        panic!("a missing fine-tuned layer must fail the load")
    };
    assert!(error.to_string().contains("encoder.layer.5"), "{error}");
}

#[test]
fn fine_tuning_the_top_layer_lowers_the_training_loss_and_what_ships_serves() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let data = write_planted(
        &dir,
        96,
        |i| format!("Integrate x^{i} sin(x) over [0, pi] and justify each step"),
        |i| format!("Write a short thank-you note to a neighbour, number {i}"),
    );
    // One step of the head alone leaves it far from fitted, so fine-tuning has work to do.
    // The head also reads the prompt features, which fine-tuning passes through unchanged.
    let options = BertOptions {
        l2_grid: vec![1e-1],
        steps: 1,
        features: true,
        fine_tune_epochs: 3,
        fine_tune_learning_rate: 1e-4,
        split: planted_pair(),
        ..BertOptions::default()
    };
    let encoder = minilm();
    let manifest = train_bert(std::slice::from_ref(&data), &encoder, &options, &dir.join("a"), "test").unwrap();
    let tuning = &manifest.validation["fine_tuning"];
    let epochs = tuning["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 3, "{tuning}");
    let losses: Vec<f64> = epochs.iter().map(|e| e["training_loss"].as_f64().unwrap()).collect();
    assert!(losses[2] < losses[0] * 0.5, "training must lower the loss: {losses:?}");
    let shipped = tuning["shipped"].as_bool().unwrap();
    assert_eq!(shipped, manifest.encoder_training != routellm::routers::bert::FROZEN);
    // Whichever ships loads and serves, and the hard prompts still rank above the easy ones.
    let router = BertRouter::load(&dir.join("a"), encoder.clone()).unwrap();
    let hard = router
        .strong_win_rate("Integrate x^2 cos(x) over [0, pi] and justify each step")
        .unwrap();
    let easy = router
        .strong_win_rate("Write a short thank-you note to a colleague")
        .unwrap();
    assert!(hard > easy, "{hard} vs {easy}");
    assert_eq!(manifest.features, routellm::features::NAMES);
    let (head, _, _) = routellm::routers::bert::BertHead::load(&dir.join("a")).unwrap();
    assert_eq!(head.dim(), encoder.dim() + routellm::features::NAMES.len());
    if !shipped {
        // The frozen encoder serves: the head reads its output, then the prompt's features.
        let prompt = "Write a short thank-you note to a colleague";
        let mut input = encoder.embed(prompt).unwrap();
        input.extend_from_slice(&routellm::features::extract(prompt));
        assert!((head.probabilities(&input)[0] - easy).abs() < 1e-9);
    }
    // An artifact whose feature list is not this build's would misread its inputs: refused.
    let manifest_path = dir.join("a/manifest.json");
    let mut edited: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    edited["features"].as_array_mut().unwrap().pop();
    std::fs::write(&manifest_path, edited.to_string()).unwrap();
    let Err(error) = BertRouter::load(&dir.join("a"), encoder) else {
        panic!("an artifact trained on other features must not load")
    };
    assert!(error.to_string().contains("--features"), "{error}");

    // States that would not fit the memory limit stop training before they are computed.
    let tight = BertOptions {
        fine_tune_memory_limit: 1 << 10,
        ..options
    };
    let encoder = minilm();
    let error = train_bert(std::slice::from_ref(&data), &encoder, &tight, &dir.join("b"), "test").unwrap_err();
    assert!(error.to_string().contains("--fine-tune-max-memory-gib"), "{error}");
    assert!(!dir.join("b").exists(), "nothing is written");
}

/// The example config starts the server as the README says: as it is (`random`, `mf`), and
/// with `--routers mf sw_ranking bert random` (bert's MiniLM from `../shared`). Its
/// thresholds name routers a given deployment may not load; that must not stop start-up.
#[test]
fn the_example_config_serves_as_documented() {
    let example = repo().join("config.example.yaml");
    let as_is = Config::load(Some(&example), Overrides::default()).unwrap();
    let gateway = routellm::Gateway::from_config(&as_is).unwrap();
    assert_eq!(gateway.routers().keys().collect::<Vec<_>>(), ["mf", "random"]);
    let all = Config::load(
        Some(&example),
        Overrides {
            routers: Some(["mf", "sw_ranking", "bert", "random"].map(String::from).to_vec()),
            ..Overrides::default()
        },
    )
    .unwrap();
    let gateway = routellm::Gateway::from_config(&all).unwrap();
    for router in ["mf", "sw_ranking", "bert", "random"] {
        let threshold = gateway.default_threshold(router).unwrap();
        let win_rate = gateway.routers()[router]
            .strong_win_rate("Prove that sqrt(2) is irrational")
            .unwrap();
        assert!(
            (0.0..=1.0).contains(&threshold) && (0.0..=1.0).contains(&win_rate),
            "{router}"
        );
    }
}
