//! The in-process MiniLM matches sentence-transformers: vectors pinned by an independent
//! float64 numpy implementation (`tests/fixtures/minilm_reference.py`), cosine >= 0.99999 (the
//! issue asks 0.999; our own forward pass keeps far closer, and this keeps it so).

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test code: a panic is the failure report

use std::path::Path;

use routellm::embed::{Embedder, MiniLm};

fn model_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/all-MiniLM-L6-v2")
}

#[test]
fn minilm_matches_the_reference_vectors() {
    let minilm = MiniLm::load(&model_dir()).unwrap();
    assert_eq!(minilm.dim(), 384);
    let reference: Vec<serde_json::Value> =
        serde_json::from_str(include_str!("fixtures/minilm_reference.json")).unwrap();
    let texts: Vec<&str> = reference.iter().map(|row| row["text"].as_str().unwrap()).collect();
    // Batched (packed into one forward pass) and one at a time must both match.
    let batched = minilm.embed_batch(&texts).unwrap();
    for (row, batch_vector) in reference.iter().zip(&batched) {
        let expected: Vec<f32> = row["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let single = minilm.embed(row["text"].as_str().unwrap()).unwrap();
        for vector in [&single, batch_vector] {
            let cosine: f32 = vector.iter().zip(&expected).map(|(a, b)| a * b).sum();
            assert!(cosine >= 0.99999, "{}: cosine {cosine}", row["text"]);
            let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4);
        }
    }
}

#[test]
fn missing_weights_say_how_to_get_them() {
    let Err(error) = MiniLm::load(Path::new("/nonexistent/minilm")) else {
        panic!("loading from a missing folder must fail")
    };
    let message = error.to_string();
    assert!(
        message.contains("model.safetensors") && message.contains("embedder.path"),
        "{message}"
    );
}

#[test]
fn head_tail_truncation_keeps_the_final_question_of_long_prompts() {
    let head = MiniLm::load(&model_dir()).unwrap();
    let head_tail = MiniLm::load(&model_dir())
        .unwrap()
        .with_truncation(routellm::embed::Truncation::HeadTail);
    assert_ne!(head.id(), head_tail.id(), "artifacts must not mix truncations");
    let cosine = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    // Short prompts: identical to sentence-transformers.
    let short = "What is the boiling point of water at sea level?";
    assert!(cosine(&head.embed(short).unwrap(), &head_tail.embed(short).unwrap()) > 0.9999);
    // A shared few-shot prefix beyond 256 tokens: only head+tail sees the different questions.
    let prefix = "Question: name a primary colour. Answer: red.\n\n".repeat(40);
    let volcano = format!("{prefix}Question: which process formed Mount St. Helens?");
    let poetry = format!("{prefix}Question: who wrote the sonnet Ozymandias?");
    assert!(cosine(&head.embed(&volcano).unwrap(), &head.embed(&poetry).unwrap()) > 0.9999);
    let (a, b) = (head_tail.embed(&volcano).unwrap(), head_tail.embed(&poetry).unwrap());
    assert!(cosine(&a, &b) < 0.99, "cosine {}", cosine(&a, &b));
    // Batched with a short text (padding) gives the same vectors as one at a time.
    let batched = head_tail.embed_batch(&[volcano.as_str(), short]).unwrap();
    assert!(cosine(&batched[0], &a) > 0.9999);
    assert!(cosine(&batched[1], &head_tail.embed(short).unwrap()) > 0.9999);
}

#[test]
fn a_top_layer_round_trips_through_its_tensors_and_a_changed_one_changes_the_vectors() {
    let minilm = MiniLm::load(&model_dir()).unwrap();
    let texts = [
        "What is the capital of France?",
        "Prove that there are infinitely many primes.",
    ];
    let original = minilm.embed_batch(&texts).unwrap();
    let tensors = minilm.top_layer_tensors();
    assert_eq!(
        tensors.len(),
        16,
        "Q, K, V, three dense layers and two norms, weight and bias each"
    );
    let lookup = |tensors: &[routellm::embed::NamedTensor], name: &str| {
        tensors
            .iter()
            .find(|(tensor, _, _)| tensor == name)
            .map(|(_, values, shape)| (values.clone(), shape.clone()))
            .ok_or_else(|| format!("{name} missing"))
    };
    // Exported (Hugging Face layout, Q's scale undone) and read back: the same model.
    let same = minilm
        .with_top_layer_from("same", |name| lookup(&tensors, name))
        .unwrap();
    assert!(same.id().ends_with("+same"), "{}", same.id());
    for (a, b) in same.embed_batch(&texts).unwrap().iter().zip(&original) {
        let cosine: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        assert!(cosine > 0.999_999, "round trip changed the vectors: cosine {cosine}");
    }
    // The query weights are stored unscaled, as Hugging Face stores them.
    let weights = routellm::artifact::Loaded::read(&model_dir().join("model.safetensors")).unwrap();
    let (published, _) = weights.tensor("encoder.layer.5.attention.self.query.weight").unwrap();
    let (exported, _) = lookup(&tensors, "encoder.layer.5.attention.self.query.weight").unwrap();
    for (p, e) in published.iter().zip(&exported) {
        assert!((p - e).abs() <= 1e-6 * p.abs().max(1.0), "{p} vs {e}");
    }
    // Another top layer: other vectors, every lower layer shared.
    let mut changed = tensors.clone();
    for (name, values, _) in &mut changed {
        if name.ends_with("output.dense.weight") && !name.contains("attention") {
            for v in values.iter_mut() {
                *v *= 1.5;
            }
        }
    }
    let other = minilm
        .with_top_layer_from("other", |name| lookup(&changed, name))
        .unwrap();
    let moved = other.embed_batch(&texts).unwrap();
    let cosine: f32 = moved[0].iter().zip(&original[0]).map(|(x, y)| x * y).sum();
    assert!(
        cosine < 0.9999,
        "a changed top layer must change the vectors: cosine {cosine}"
    );
}
