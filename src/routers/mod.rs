//! The router trait and the registry that builds routers by name.
//!
//! A router maps a prompt to the strong model's predicted win rate in [0, 1]. The
//! proxy sends a request to the strong model when that rate is at or above the
//! threshold in the model name (RouteLLM's rule). Routers load their artifacts once,
//! in [`build`]; a router that cannot load fails start-up instead of serving guesses.

mod length;
pub mod mf;
mod random;

use std::sync::Arc;

pub use length::LengthRouter;
pub use random::RandomRouter;

use crate::config::Config;

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
    /// Anything that would stall other connections: scored on the blocking pool.
    Blocking,
}

/// A prompt scorer: the strong model's win rate against the weak model.
pub trait Router: Send + Sync {
    /// The strong model's predicted win rate for `prompt`, in [0, 1].
    fn strong_win_rate(&self, prompt: &str) -> Result<f64, RouterError>;

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
pub const AVAILABLE: &[&str] = &["random", "length", "mf"];

/// Builds the router called `name`, loading its artifacts as `config` says.
pub fn build(name: &str, config: &Config) -> Result<Arc<dyn Router>, RouterError> {
    match name {
        "mf" => {
            let settings = &config.router_settings.mf;
            let embedder_config = settings.embedder.clone().unwrap_or_default();
            let artifact = settings.artifact.clone().unwrap_or_else(|| match embedder_config {
                crate::embed::EmbedderConfig::Static => "mf".to_owned(),
                crate::embed::EmbedderConfig::Minilm { .. } => "mf-minilm".to_owned(),
                crate::embed::EmbedderConfig::Openai { .. } => "mf-openai".to_owned(),
            });
            let embedder = crate::embed::build(&embedder_config, &config.routers_dir)
                .map_err(|error| RouterError::Load(error.to_string()))?;
            Ok(Arc::new(mf::MfRouter::load(
                &config.routers_dir.join(artifact),
                embedder,
                settings.strong_identity.as_deref(),
                settings.weak_identity.as_deref(),
            )?))
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
        let config = default_config();
        for name in AVAILABLE {
            let router = build(name, &config).unwrap();
            let rate = router.strong_win_rate("What is 2 + 2?").unwrap();
            assert!((0.0..=1.0).contains(&rate), "{name} gave {rate}");
        }
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
