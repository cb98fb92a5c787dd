//! The router trait and the registry that builds routers by name.
//!
//! A router maps a prompt to the strong model's predicted win rate in [0, 1]. The
//! proxy sends a request to the strong model when that rate is at or above the
//! threshold in the model name (RouteLLM's rule). Routers load their artifacts once,
//! in [`build`]; a router that cannot load fails start-up instead of serving guesses.

pub mod bert;
mod length;
pub mod mf;
mod random;
pub mod sw_ranking;

use std::path::PathBuf;
use std::sync::Arc;

pub use length::LengthRouter;
pub use random::RandomRouter;

use crate::config::Config;
use crate::embed::{Embedder, EmbedderConfig};

/// Why a router could not score a prompt or could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("{0}")]
    Load(String),
    #[error("{0}")]
    Score(String),
}

/// Where a router's scoring may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringCost {
    /// Nanoseconds to a few microseconds: scoring on the async worker is cheaper than a thread hop.
    Inline,
    /// Anything that would stall other connections: scored on the blocking pool, at most
    /// `scoring_concurrency` at once (the cores are the limit).
    Blocking,
    /// Mostly waiting on the network (an embeddings API): on the blocking pool too, but
    /// outside the CPU slots — two cores would otherwise cap it at two calls in flight.
    Remote,
}

/// How a router scoring with `embedder` should be run.
#[must_use]
pub fn cost_of(embedder: Option<&dyn Embedder>) -> ScoringCost {
    if embedder.is_some_and(Embedder::is_remote) {
        ScoringCost::Remote
    } else {
        ScoringCost::Blocking
    }
}

/// A prompt scorer: the strong model's win rate against the weak model.
pub trait Router: Send + Sync {
    /// The strong model's predicted win rate for `prompt`, in [0, 1].
    fn strong_win_rate(&self, prompt: &str) -> Result<f64, RouterError>;

    /// [`Router::strong_win_rate`] for many prompts, in order (batch scoring: `score`,
    /// `calibrate`, `eval`). Routers on an embeddings API override it to embed a batch per
    /// request instead of a request per prompt.
    fn strong_win_rates(&self, prompts: &[&str]) -> Result<Vec<f64>, RouterError> {
        prompts.iter().map(|prompt| self.strong_win_rate(prompt)).collect()
    }

    /// Whether scoring is cheap enough to run on an async worker.
    fn scoring_cost(&self) -> ScoringCost {
        ScoringCost::Blocking
    }

    /// Identifies the router's artifacts, so cached benchmark scores are reused only for
    /// the same model; `None` (scores that change between runs) disables caching.
    fn cache_key(&self) -> Option<String> {
        None
    }
}

/// The routers this build can serve, in the order they are listed to users.
pub const AVAILABLE: &[&str] = &["random", "length", "mf", "sw_ranking", "bert"];

/// Refuses the artifact in `dir` when the prompt features it was trained on (`trained`, by
/// name) are not the ones this build computes: its weights would read the wrong inputs.
/// `retrain` is the command that makes a fitting one.
fn check_features(trained: &[String], dir: &std::path::Path, retrain: &str) -> Result<(), RouterError> {
    if trained == crate::features::NAMES {
        return Ok(());
    }
    Err(RouterError::Load(format!(
        "{} was trained on prompt features [{}] but this build computes [{}]; retrain it with `{retrain}`",
        dir.display(),
        trained.join(", "),
        crate::features::NAMES.join(", ")
    )))
}

/// Whether router `name` loads an artifact from the routers folder (`routers_dir`).
#[must_use]
pub fn uses_artifacts(name: &str) -> bool {
    matches!(name, "mf" | "sw_ranking" | "bert")
}

/// Settings of the `bert` router (`router_settings.bert`).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BertSettings {
    /// Artifact folder, relative to `routers_dir` (default `bert`).
    #[serde(default)]
    pub artifact: Option<String>,
    /// The MiniLM encoder: `kind: minilm` with `path` or `hub_id`.
    #[serde(default)]
    pub embedder: Option<EmbedderConfig>,
}

/// Settings of a router trained over prompt embeddings (`router_settings.mf`, `.sw_ranking`).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingRouterSettings {
    /// Artifact folder, relative to `routers_dir` (default: the router's name, suffixed
    /// `-minilm` or `-openai` for those embedders).
    #[serde(default)]
    pub artifact: Option<String>,
    #[serde(default)]
    pub embedder: Option<EmbedderConfig>,
    /// The identities to score (RouteLLM always uses gpt-4-1106-preview vs Mixtral).
    #[serde(default)]
    pub strong_identity: Option<String>,
    #[serde(default)]
    pub weak_identity: Option<String>,
}

impl EmbeddingRouterSettings {
    /// The configured embedder and the artifact folder that goes with it.
    fn load(&self, router: &str, config: &Config) -> Result<(Arc<dyn Embedder>, PathBuf), RouterError> {
        let embedder_config = self.embedder.clone().unwrap_or_default();
        let artifact = self
            .artifact
            .clone()
            .unwrap_or_else(|| default_artifact(router, &embedder_config));
        let dir = config.routers_dir.join(artifact);
        let embedder_config = with_artifact_truncation(embedder_config, &dir, "embedder");
        let embedder = crate::embed::build(&embedder_config, &config.routers_dir)
            .map_err(|error| RouterError::Load(error.to_string()))?;
        Ok((embedder, dir))
    }
}

/// The artifact folder (under `routers_dir`) of `router` trained on `embedder`: the
/// router's name, suffixed `-minilm` or `-openai` for those embedders. `train` writes
/// there by default and `serve` loads from there, so the two agree without an `--out`.
#[must_use]
pub fn default_artifact(router: &str, embedder: &EmbedderConfig) -> String {
    match embedder {
        EmbedderConfig::Static => router.to_owned(),
        EmbedderConfig::Minilm { .. } => format!("{router}-minilm"),
        EmbedderConfig::Openai { .. } => format!("{router}-openai"),
    }
}

/// A MiniLM config without an explicit truncation takes the one the artifact in `dir` was
/// trained with (its manifest's `field` holds the embedder id), so a config names the
/// model folder and nothing else.
fn with_artifact_truncation(config: EmbedderConfig, dir: &std::path::Path, field: &str) -> EmbedderConfig {
    match config {
        EmbedderConfig::Minilm {
            path,
            hub_id,
            truncation: None,
        } => {
            let trained = std::fs::read_to_string(dir.join(mf::MANIFEST_FILE))
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .and_then(|manifest| manifest[field].as_str().map(crate::embed::truncation_of));
            EmbedderConfig::Minilm {
                path,
                hub_id,
                truncation: trained,
            }
        }
        other => other,
    }
}

/// Builds the router called `name`, loading its artifacts as `config` says.
pub fn build(name: &str, config: &Config) -> Result<Arc<dyn Router>, RouterError> {
    match name {
        "mf" => {
            let settings = &config.router_settings.mf;
            let (embedder, dir) = settings.load(name, config)?;
            Ok(Arc::new(mf::MfRouter::load(
                &dir,
                embedder,
                settings.strong_identity.as_deref(),
                settings.weak_identity.as_deref(),
            )?))
        }
        "sw_ranking" => {
            let settings = &config.router_settings.sw_ranking;
            let (embedder, dir) = settings.load(name, config)?;
            Ok(Arc::new(sw_ranking::SwRankingRouter::load(
                &dir,
                embedder,
                settings.strong_identity.as_deref(),
                settings.weak_identity.as_deref(),
            )?))
        }
        "bert" => {
            let settings = &config.router_settings.bert;
            let encoder_config = match &settings.embedder {
                Some(encoder @ EmbedderConfig::Minilm { .. }) => encoder.clone(),
                Some(_) => {
                    return Err(RouterError::Load(
                        "bert's encoder is MiniLM: set `router_settings.bert.embedder` to `kind: minilm`".into(),
                    ));
                }
                None => {
                    return Err(RouterError::Load(
                        "bert needs the all-MiniLM-L6-v2 weights: set `router_settings.bert.embedder` to \
                         `{kind: minilm, path: <folder>}` (or `hub_id: sentence-transformers/all-MiniLM-L6-v2` \
                         when online); config.example.yaml shows it"
                            .into(),
                    ));
                }
            };
            let dir = config.routers_dir.join(settings.artifact.as_deref().unwrap_or("bert"));
            let encoder_config = with_artifact_truncation(encoder_config, &dir, "encoder");
            let encoder = crate::embed::build(&encoder_config, &config.routers_dir)
                .map_err(|error| RouterError::Load(format!("bert: {error}")))?;
            Ok(Arc::new(bert::BertRouter::load(&dir, encoder)?))
        }
        "random" => Ok(Arc::new(RandomRouter::from_entropy())),
        "length" => Ok(Arc::new(LengthRouter)),
        other => Err(RouterError::Load(format!(
            "unknown router `{other}`; available routers: {}",
            AVAILABLE.join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_config() -> Config {
        Config::merge(
            crate::config::FileConfig::default(),
            crate::config::Overrides::default(),
        )
        .unwrap()
    }

    #[test]
    fn every_listed_router_builds() {
        // bert alone needs to be told where MiniLM's weights are.
        let file = crate::config::FileConfig::from_yaml(concat!(
            "router_settings:\n  bert:\n    embedder: {kind: minilm, path: ",
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/models/all-MiniLM-L6-v2}\n"
        ))
        .unwrap();
        let config = Config::merge(file, crate::config::Overrides::default()).unwrap();
        for name in AVAILABLE {
            let router = build(name, &config).unwrap();
            let rate = router.strong_win_rate("What is 2 + 2?").unwrap();
            assert!((0.0..=1.0).contains(&rate), "{name} gave {rate}");
        }
    }

    #[test]
    fn bert_without_an_encoder_says_how_to_configure_one() {
        let Err(error) = build("bert", &default_config()) else {
            panic!("bert cannot load without MiniLM")
        };
        let message = error.to_string();
        assert!(message.contains("router_settings.bert.embedder"), "{message}");
    }

    #[test]
    fn unknown_router_lists_the_available_ones() {
        let config = default_config();
        let Err(error) = build("nope", &config) else {
            panic!("an unknown router must not build")
        };
        let message = error.to_string();
        assert!(message.contains("nope") && message.contains("random"), "{message}");
    }
}
