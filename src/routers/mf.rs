//! RouteLLM's matrix-factorisation router, served locally.
//!
//! The model scores a (model, prompt) pair as `c · (p̂_m ⊙ W x)`: `p̂_m` a normalised
//! per-model embedding, `W` a projection of the prompt's representation `x` (embedding plus
//! hand-made features, standardised), `c` a linear head. The strong model's win rate is
//! `σ(s(strong) − s(weak))`. That difference is linear in `x`, so at load the model
//! collapses to one vector `v = Wᵀ (c ⊙ (p̂_strong − p̂_weak))` and scoring is an
//! embedding plus a dot product.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Router, RouterError};
use crate::artifact;
use crate::embed::Embedder;
use crate::features;

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const MANIFEST_FILE: &str = "manifest.json";

/// The trained parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct MfWeights {
    /// `hidden x input`, row-major.
    pub projection: Vec<f32>,
    pub classifier: Vec<f32>,
    /// `models x hidden`, row-major, not normalised.
    pub model_embeddings: Vec<f32>,
    pub feature_mean: Vec<f32>,
    pub feature_std: Vec<f32>,
    pub hidden: usize,
    pub input: usize,
}

/// What the artifact says about itself; written by `routellm train mf`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MfManifest {
    pub router: String,
    /// The embedder id (`static:<sha>`, `minilm:<sha>`) the weights were trained with.
    pub embedder: String,
    pub embedder_kind: String,
    pub models: Vec<String>,
    pub default_strong: String,
    pub default_weak: String,
    pub features: Vec<String>,
    /// Whether the representation starts with the prompt embedding (else features only).
    #[serde(default = "default_true")]
    pub uses_embedding: bool,
    #[serde(default)]
    pub hyperparameters: serde_json::Value,
    #[serde(default)]
    pub data: serde_json::Value,
    #[serde(default)]
    pub validation: serde_json::Value,
    #[serde(default)]
    pub command: String,
}

fn default_true() -> bool {
    true
}

impl MfWeights {
    /// The model embedding of `index`, L2-normalised.
    #[must_use]
    pub fn unit_model(&self, index: usize) -> Vec<f32> {
        let mut row = self.model_embeddings[index * self.hidden..(index + 1) * self.hidden].to_vec();
        crate::embed::normalize(&mut row);
        row
    }

    /// `v = Wᵀ (c ⊙ (p̂_strong − p̂_weak))`: the whole model for one pair of identities.
    #[must_use]
    pub fn pair_vector(&self, strong: usize, weak: usize) -> Vec<f32> {
        let (s, w) = (self.unit_model(strong), self.unit_model(weak));
        let mut v = vec![0.0_f32; self.input];
        for k in 0..self.hidden {
            let coefficient = self.classifier[k] * (s[k] - w[k]);
            let row = &self.projection[k * self.input..(k + 1) * self.input];
            for (out, weight) in v.iter_mut().zip(row) {
                *out += coefficient * weight;
            }
        }
        v
    }

    pub fn save(&self, dir: &Path, manifest: &MfManifest) -> Result<(), RouterError> {
        std::fs::create_dir_all(dir).map_err(|e| RouterError::Load(format!("{}: {e}", dir.display())))?;
        let models = self.model_embeddings.len() / self.hidden.max(1);
        let tensor = artifact::Tensor::f32;
        artifact::write(
            &dir.join(WEIGHTS_FILE),
            &[
                tensor("projection", &self.projection, vec![self.hidden, self.input]),
                tensor("classifier", &self.classifier, vec![self.hidden]),
                tensor("model_embeddings", &self.model_embeddings, vec![models, self.hidden]),
                tensor("feature_mean", &self.feature_mean, vec![self.input]),
                tensor("feature_std", &self.feature_std, vec![self.input]),
            ],
        )
        .map_err(RouterError::Load)?;
        write_manifest(dir, manifest)
    }

    /// Loads weights and manifest from `dir`, with the weights file's sha256.
    pub fn load(dir: &Path) -> Result<(Self, MfManifest, String), RouterError> {
        let manifest: MfManifest = read_manifest(dir)?;
        let file = artifact::Loaded::read(&dir.join(WEIGHTS_FILE)).map_err(RouterError::Load)?;
        let read = |name: &str| file.tensor(name).map_err(RouterError::Load);
        let (projection, shape) = read("projection")?;
        let [hidden, input] = shape[..] else {
            return Err(RouterError::Load(format!("{}: projection must be 2-D", dir.display())));
        };
        let weights = Self {
            projection,
            classifier: read("classifier")?.0,
            model_embeddings: read("model_embeddings")?.0,
            feature_mean: read("feature_mean")?.0,
            feature_std: read("feature_std")?.0,
            hidden,
            input,
        };
        let models = weights.model_embeddings.len() / hidden.max(1);
        if weights.classifier.len() != hidden
            || models != manifest.models.len()
            || weights.feature_mean.len() != input
            || weights.feature_std.len() != input
        {
            return Err(RouterError::Load(format!(
                "{}: tensor shapes disagree with each other or the manifest",
                dir.display()
            )));
        }
        Ok((weights, manifest, file.sha256))
    }
}

/// Writes an artifact's manifest as pretty JSON.
pub fn write_manifest(dir: &Path, manifest: &impl Serialize) -> Result<(), RouterError> {
    let text = serde_json::to_string_pretty(manifest).map_err(|e| RouterError::Load(e.to_string()))?;
    std::fs::write(dir.join(MANIFEST_FILE), text + "\n")
        .map_err(|e| RouterError::Load(format!("{}: {e}", dir.join(MANIFEST_FILE).display())))
}

/// Reads an artifact's manifest.
pub fn read_manifest<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T, RouterError> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| RouterError::Load(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| RouterError::Load(format!("{}: {e}", path.display())))
}

/// The prompt representation the weights expect: embedding then features, standardised.
pub fn representation(
    embedder: Option<&dyn Embedder>,
    prompt: &str,
    mean: &[f32],
    std: &[f32],
) -> Result<Vec<f32>, RouterError> {
    let embedding = match embedder {
        Some(embedder) => embedder.embed(prompt).map_err(|e| RouterError::Score(e.to_string()))?,
        None => Vec::new(),
    };
    representation_of(embedding, prompt, mean, std)
}

/// [`representation`] for a prompt already embedded (empty for a features-only artifact).
fn representation_of(mut x: Vec<f32>, prompt: &str, mean: &[f32], std: &[f32]) -> Result<Vec<f32>, RouterError> {
    x.extend_from_slice(&features::extract(prompt));
    if x.len() != mean.len() {
        return Err(RouterError::Score(format!(
            "representation has {} values, the weights expect {}",
            x.len(),
            mean.len()
        )));
    }
    standardize(&mut x, mean, std);
    Ok(x)
}

/// Standard scores, clipped so a prompt unlike anything in training cannot dominate the logit.
pub fn standardize(x: &mut [f32], mean: &[f32], std: &[f32]) {
    const LIMIT: f32 = 8.0;
    for ((value, m), s) in x.iter_mut().zip(mean).zip(std) {
        *value = ((*value - m) / s).clamp(-LIMIT, LIMIT);
    }
}

/// The served mf router: an embedder and one collapsed weight vector.
pub struct MfRouter {
    /// `None` when the artifact uses prompt features only.
    embedder: Option<Arc<dyn Embedder>>,
    pair: Vec<f32>,
    mean: Vec<f32>,
    std: Vec<f32>,
    cache_key: String,
}

impl MfRouter {
    /// Loads the artifact in `dir` for `embedder`, scoring `strong` against `weak`
    /// (default: the manifest's pair). Fails if the embedder is not the one trained with.
    pub fn load(
        dir: &Path,
        embedder: Arc<dyn Embedder>,
        strong: Option<&str>,
        weak: Option<&str>,
    ) -> Result<Self, RouterError> {
        let (weights, manifest, digest) = MfWeights::load(dir)?;
        super::check_features(&manifest.features, dir, "routellm train mf")?;
        if manifest.uses_embedding && manifest.embedder != embedder.id() {
            return Err(RouterError::Load(format!(
                "{} was trained with embedder `{}` but `{}` is configured; use the matching embedder or retrain \
                 with `routellm train mf`",
                dir.display(),
                manifest.embedder,
                embedder.id()
            )));
        }
        let find = |name: &str| {
            let canonical = crate::train::data::canonical_model(name);
            manifest
                .models
                .iter()
                .position(|model| *model == canonical)
                .ok_or_else(|| {
                    RouterError::Load(format!(
                        "model identity `{name}` is not in {}; known: {}",
                        dir.display(),
                        manifest.models.join(", ")
                    ))
                })
        };
        let strong_name = strong.unwrap_or(&manifest.default_strong);
        let weak_name = weak.unwrap_or(&manifest.default_weak);
        let pair = weights.pair_vector(find(strong_name)?, find(weak_name)?);
        Ok(Self {
            embedder: manifest.uses_embedding.then_some(embedder),
            pair,
            mean: weights.feature_mean,
            std: weights.feature_std,
            cache_key: format!("mf:{}:{strong_name}:{weak_name}:{}", manifest.embedder, &digest[..16]),
        })
    }

    /// The manifest of the artifact in `dir`, to pick its embedder before loading.
    pub fn manifest(dir: &Path) -> Result<MfManifest, RouterError> {
        read_manifest(dir)
    }

    fn win_rate_of(&self, x: &[f32]) -> f64 {
        let logit: f32 = x.iter().zip(&self.pair).map(|(a, b)| a * b).sum();
        1.0 / (1.0 + f64::from(-logit).exp())
    }
}

impl Router for MfRouter {
    fn strong_win_rate(&self, prompt: &str) -> Result<f64, RouterError> {
        let x = representation(self.embedder.as_deref(), prompt, &self.mean, &self.std)?;
        Ok(self.win_rate_of(&x))
    }

    fn strong_win_rates(&self, prompts: &[&str]) -> Result<Vec<f64>, RouterError> {
        let embeddings = match self.embedder.as_deref() {
            Some(embedder) => embedder
                .embed_many(prompts)
                .map_err(|e| RouterError::Score(e.to_string()))?,
            None => vec![Vec::new(); prompts.len()],
        };
        prompts
            .iter()
            .zip(embeddings)
            .map(|(prompt, embedding)| {
                let x = representation_of(embedding, prompt, &self.mean, &self.std)?;
                Ok(self.win_rate_of(&x))
            })
            .collect()
    }

    fn scoring_cost(&self) -> super::ScoringCost {
        super::cost_of(self.embedder.as_deref())
    }

    fn cache_key(&self) -> Option<String> {
        Some(self.cache_key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_vector_equals_score_difference() {
        let weights = MfWeights {
            projection: vec![1.0, 2.0, 0.5, -1.0, 0.0, 3.0],
            classifier: vec![0.7, -0.2],
            model_embeddings: vec![1.0, 0.0, 0.6, 0.8, 0.0, 2.0],
            feature_mean: vec![0.0; 3],
            feature_std: vec![1.0; 3],
            hidden: 2,
            input: 3,
        };
        let x = [0.3_f32, -1.2, 2.0];
        let score = |m: usize| {
            let p = weights.unit_model(m);
            (0..2)
                .map(|k| {
                    let u: f32 = (0..3).map(|j| weights.projection[k * 3 + j] * x[j]).sum();
                    weights.classifier[k] * p[k] * u
                })
                .sum::<f32>()
        };
        let v = weights.pair_vector(0, 2);
        let collapsed: f32 = v.iter().zip(&x).map(|(a, b)| a * b).sum();
        assert!((collapsed - (score(0) - score(2))).abs() < 1e-5);
    }
}
