//! The BERT-classifier router (`bert`), RouteLLM's third family: the MiniLM encoder
//! followed by a classification head over RouteLLM's three labels — the strong model wins,
//! a tie, the weak model wins. The win rate is `P(strong wins)`, as in RouteLLM.
//!
//! The head is a multinomial logistic regression over sentence-transformers' pooled,
//! normalised MiniLM output, trained by `routellm train bert` on the frozen encoder and
//! optionally fine-tuned together with the encoder's top layer, which the artifact then
//! carries. An artifact may also feed the head the prompt features `mf` uses (length,
//! structure, markers) beside the encoder output. Which one ships, and why, is measured in
//! `routers/README.md`.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::mf::{WEIGHTS_FILE, read_manifest, write_manifest};
use super::{Router, RouterError};
use crate::artifact;
use crate::embed::{Embedder, NamedTensor};
use crate::features;

/// `encoder_training` of an artifact whose encoder is the published one.
pub const FROZEN: &str = "frozen";

/// RouteLLM's labels, in its order.
pub const LABELS: [&str; 3] = ["strong wins", "tie", "weak wins"];

/// What the artifact says about itself; written by `routellm train bert`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BertManifest {
    pub router: String,
    /// The encoder's id (`minilm:<sha>`): the head only fits the encoder it was trained on.
    pub encoder: String,
    pub labels: Vec<String>,
    /// [`FROZEN`]: the encoder's weights are the published ones, only the head was trained;
    /// otherwise the weights file also holds the fine-tuned top layer.
    pub encoder_training: String,
    /// The prompt features (`src/features.rs`, by name) appended to the encoder output
    /// before the head; empty for RouteLLM's head on the encoder output alone.
    #[serde(default)]
    pub features: Vec<String>,
    #[serde(default)]
    pub hyperparameters: serde_json::Value,
    #[serde(default)]
    pub data: serde_json::Value,
    #[serde(default)]
    pub validation: serde_json::Value,
    #[serde(default)]
    pub command: String,
}

/// The classification head: standardisation, then logits `W x + b` over [`LABELS`].
#[derive(Debug, Clone, PartialEq)]
pub struct BertHead {
    /// `labels x dim`, row-major.
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl BertHead {
    #[must_use]
    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// Label probabilities for an encoder output.
    #[must_use]
    pub fn probabilities(&self, embedding: &[f32]) -> [f64; 3] {
        let dim = self.dim();
        let mut logits = [0.0_f64; 3];
        for (label, logit) in logits.iter_mut().enumerate() {
            let row = &self.weight[label * dim..(label + 1) * dim];
            let mut sum = f64::from(self.bias[label]);
            for (((x, w), m), s) in embedding.iter().zip(row).zip(&self.mean).zip(&self.std) {
                sum += f64::from((x - m) / s * w);
            }
            *logit = sum;
        }
        let top = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exps = logits.map(|logit| (logit - top).exp());
        let total: f64 = exps.iter().sum();
        exps.map(|e| e / total)
    }

    /// Writes the head, and `top_layer` (a fine-tuned encoder layer under its Hugging Face
    /// names; empty for a frozen encoder) beside it in the same weights file.
    pub fn save(&self, dir: &Path, manifest: &BertManifest, top_layer: &[NamedTensor]) -> Result<(), RouterError> {
        std::fs::create_dir_all(dir).map_err(|e| RouterError::Load(format!("{}: {e}", dir.display())))?;
        let dim = self.dim();
        let mut tensors = vec![
            artifact::Tensor::f32("head.weight", &self.weight, vec![LABELS.len(), dim]),
            artifact::Tensor::f32("head.bias", &self.bias, vec![LABELS.len()]),
            artifact::Tensor::f32("input.mean", &self.mean, vec![dim]),
            artifact::Tensor::f32("input.std", &self.std, vec![dim]),
        ];
        tensors.extend(
            top_layer
                .iter()
                .map(|(name, values, shape)| artifact::Tensor::f32(name, values, shape.clone())),
        );
        artifact::write(&dir.join(WEIGHTS_FILE), &tensors).map_err(RouterError::Load)?;
        write_manifest(dir, manifest)
    }

    /// Loads the head and manifest from `dir`, with the weights file (which also holds a
    /// fine-tuned top layer when the manifest says so).
    pub fn load(dir: &Path) -> Result<(Self, BertManifest, artifact::Loaded), RouterError> {
        let manifest: BertManifest = read_manifest(dir)?;
        let file = artifact::Loaded::read(&dir.join(WEIGHTS_FILE)).map_err(RouterError::Load)?;
        let read = |name: &str| file.tensor(name).map(|(values, _)| values).map_err(RouterError::Load);
        let head = Self {
            weight: read("head.weight")?,
            bias: read("head.bias")?,
            mean: read("input.mean")?,
            std: read("input.std")?,
        };
        let dim = head.dim();
        if head.bias.len() != LABELS.len()
            || head.weight.len() != LABELS.len() * dim
            || head.std.len() != dim
            || head.std.iter().any(|s| *s <= 0.0)
        {
            return Err(RouterError::Load(format!(
                "{}: head tensors disagree with each other",
                dir.display()
            )));
        }
        Ok((head, manifest, file))
    }
}

/// The served router: the MiniLM encoder and the head.
pub struct BertRouter {
    encoder: Arc<dyn Embedder>,
    head: BertHead,
    /// Whether the head reads the prompt features after the encoder output.
    with_features: bool,
    cache_key: String,
}

impl BertRouter {
    /// Loads the head in `dir` for `encoder`; fails unless `encoder` is the one it was trained on.
    pub fn load(dir: &Path, encoder: Arc<dyn Embedder>) -> Result<Self, RouterError> {
        let (head, manifest, file) = BertHead::load(dir)?;
        let with_features = !manifest.features.is_empty();
        if with_features {
            super::check_features(&manifest.features, dir, "routellm train bert --features")?;
        }
        let feature_count = if with_features { features::NAMES.len() } else { 0 };
        if manifest.encoder != encoder.id() || head.dim() != encoder.dim() + feature_count {
            return Err(RouterError::Load(format!(
                "{} was trained on encoder `{}` but `{}` is configured; point `router_settings.bert.embedder` at \
                 all-MiniLM-L6-v2 or retrain with `routellm train bert`",
                dir.display(),
                manifest.encoder,
                encoder.id()
            )));
        }
        let digest = &file.sha256[..16];
        let encoder = if manifest.encoder_training == FROZEN {
            encoder
        } else {
            // A fine-tuned top layer replaces the shared encoder's own; the rest stays shared.
            let minilm = encoder.as_minilm().ok_or_else(|| {
                RouterError::Load(format!(
                    "{}: a fine-tuned encoder layer needs the MiniLM embedder",
                    dir.display()
                ))
            })?;
            let tuned = minilm
                .with_top_layer_from(&format!("bert:{digest}"), |name| file.tensor(name))
                .map_err(|error| RouterError::Load(format!("{}: {error}", dir.display())))?;
            Arc::new(tuned) as Arc<dyn Embedder>
        };
        Ok(Self {
            encoder,
            head,
            with_features,
            cache_key: format!("bert:{}:{digest}", manifest.encoder),
        })
    }
}

impl Router for BertRouter {
    fn strong_win_rate(&self, prompt: &str) -> Result<f64, RouterError> {
        let mut input = self
            .encoder
            .embed(prompt)
            .map_err(|e| RouterError::Score(e.to_string()))?;
        if self.with_features {
            input.extend_from_slice(&features::extract(prompt));
        }
        Ok(self.head.probabilities(&input)[0])
    }

    fn cache_key(&self) -> Option<String> {
        Some(self.cache_key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_are_a_softmax_of_standardised_logits() {
        let head = BertHead {
            weight: vec![1.0, 0.0, 0.0, 0.0, 0.0, 2.0],
            bias: vec![0.0, 0.5, -0.5],
            mean: vec![1.0, 0.0],
            std: vec![2.0, 1.0],
        };
        let p = head.probabilities(&[3.0, 1.0]);
        // logits: (3 - 1) / 2 * 1 = 1; 0.5; 2 * 1 - 0.5 = 1.5
        let exps = [1.0_f64.exp(), 0.5_f64.exp(), 1.5_f64.exp()];
        let total: f64 = exps.iter().sum();
        for (got, e) in p.iter().zip(exps) {
            assert!((got - e / total).abs() < 1e-9);
        }
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
}
