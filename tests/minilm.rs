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
