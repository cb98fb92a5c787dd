//! Prompt embeddings behind one trait, with three backends:
//! - [`StaticEmbedder`]: a token-embedding table distilled from MiniLM by `routellm distill`
//!   (Model2Vec's recipe); microseconds per prompt, no forward pass, shipped in `routers/`.
//! - [`MiniLm`]: all-MiniLM-L6-v2 in-process (our own BERT forward pass, `encoder`),
//!   matching sentence-transformers.
//! - [`OpenAiEmbedder`]: any OpenAI-compatible `/v1/embeddings` endpoint (RouteLLM's setting).

mod encoder;
mod finetune;
mod minilm;
mod openai;
mod table;
pub mod wordpiece;

use std::path::PathBuf;

pub use encoder::NamedTensor;
pub use finetune::{LayerGradient, Trace, TrainableLayer};
pub use minilm::{MiniLm, Truncation, pool};
pub use openai::OpenAiEmbedder;
pub use table::{StaticEmbedder, TableBuilder};

/// Why an embedder could not load or embed.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("{0}")]
    Load(String),
    #[error("{0}")]
    Embed(String),
}

/// Text to a fixed-size vector.
pub trait Embedder: Send + Sync {
    /// The vector size.
    fn dim(&self) -> usize;
    /// One prompt's embedding, L2-normalised.
    fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError>;
    /// Identifies the embedder and its weights (name and content hash), so artifacts
    /// trained on one embedder are never served with another.
    fn id(&self) -> &str;
    /// The MiniLM model behind this embedder, for what needs more than its vectors (the
    /// `bert` router's fine-tuned top layer, `train bert`).
    fn as_minilm(&self) -> Option<&MiniLm> {
        None
    }
    /// Whether embedding waits on the network rather than computing (an embeddings API).
    fn is_remote(&self) -> bool {
        false
    }
    /// How many prompts one [`Embedder::embed_many`] call should take: 1 for in-process
    /// embedders (parallelised across cores instead), more for an API, where a request per
    /// prompt would cost a round trip each.
    fn batch_size(&self) -> usize {
        1
    }
    /// Embeddings of `texts`, in order, each as [`Embedder::embed`] would give it.
    fn embed_many(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        texts.iter().map(|text| self.embed(text)).collect()
    }
}

/// Prompts per request to an embeddings API: OpenAI takes up to 2,048 inputs and 300k
/// tokens a request; 128 prompts stay well inside both for prompts up to ~2k tokens.
pub const REMOTE_BATCH: usize = 128;

/// Which embedder a router uses, as configured.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum EmbedderConfig {
    /// The distilled table in the router's artifact folder (the default).
    #[default]
    Static,
    /// MiniLM from a local folder, or a Hugging Face Hub id fetched once into the cache.
    Minilm {
        #[serde(default)]
        path: Option<PathBuf>,
        #[serde(default)]
        hub_id: Option<String>,
        /// `head` (sentence-transformers) or `head_tail`; default: what the artifact was
        /// trained with.
        #[serde(default)]
        truncation: Option<Truncation>,
    },
    /// An OpenAI-compatible embeddings endpoint.
    Openai {
        #[serde(default = "openai::default_model")]
        model: String,
        #[serde(default)]
        base_url: Option<String>,
        #[serde(default)]
        api_key_env: Option<String>,
        /// Extra headers for the endpoint (a gateway's key); `${VAR}` reads the environment.
        #[serde(default)]
        headers: std::collections::BTreeMap<String, crate::config::Secret>,
    },
}

/// The static table's folder under `routers_dir`.
pub const STATIC_DIR: &str = "static";

/// Builds the configured embedder (the static table is read from `routers_dir/static`), or
/// hands out the one already alive for the same configuration: routers on one embedder (mf
/// and `sw_ranking` on the static table, bert and mf on MiniLM) then share its weights rather
/// than each loading a copy (31 MB for the table, 90 MB for MiniLM).
pub fn build(
    config: &EmbedderConfig,
    routers_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn Embedder>, EmbedError> {
    type Built = Vec<(EmbedderConfig, PathBuf, std::sync::Weak<dyn Embedder>)>;
    // Weak references: an embedder no router uses any more is freed, not kept by this list.
    static BUILT: std::sync::Mutex<Built> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    built.retain(|(_, _, embedder)| embedder.strong_count() > 0);
    let shared = built
        .iter()
        .filter(|(built_config, dir, _)| built_config == config && dir == routers_dir)
        .find_map(|(_, _, embedder)| embedder.upgrade());
    if let Some(embedder) = shared {
        return Ok(embedder);
    }
    let embedder = load(config, routers_dir)?;
    built.push((
        config.clone(),
        routers_dir.to_path_buf(),
        std::sync::Arc::downgrade(&embedder),
    ));
    Ok(embedder)
}

fn load(config: &EmbedderConfig, routers_dir: &std::path::Path) -> Result<std::sync::Arc<dyn Embedder>, EmbedError> {
    Ok(match config {
        EmbedderConfig::Static => std::sync::Arc::new(StaticEmbedder::load(&routers_dir.join(STATIC_DIR))?),
        EmbedderConfig::Minilm {
            path,
            hub_id,
            truncation,
        } => std::sync::Arc::new(
            MiniLm::from_config(path.as_deref(), hub_id.as_deref())?.with_truncation(truncation.unwrap_or_default()),
        ),
        EmbedderConfig::Openai {
            model,
            base_url,
            api_key_env,
            headers,
        } => {
            let variable = api_key_env.as_deref().unwrap_or("OPENAI_API_KEY");
            let env = |name: &str| std::env::var(name).ok();
            let headers = crate::providers::header_map("embedder.headers", headers, &env)
                .map_err(|error| EmbedError::Load(error.to_string()))?;
            std::sync::Arc::new(OpenAiEmbedder::connect_with_headers(
                model,
                base_url.as_deref(),
                std::env::var(variable).ok(),
                headers,
            )?)
        }
    })
}

/// L2-normalises in place; a zero vector stays zero.
pub fn normalize(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in vector {
            *x /= norm;
        }
    }
}

/// The sha256 of a file, for manifests and embedder ids.
pub fn sha256_file(path: &std::path::Path) -> Result<String, EmbedError> {
    let bytes = std::fs::read(path).map_err(|error| EmbedError::Load(format!("{}: {error}", path.display())))?;
    Ok(sha256_hex(&bytes))
}

/// The sha256 of bytes already in memory, so a file loaded once is not read again to hash it.
#[must_use]
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// The truncation an artifact's embedder id implies (`minilm-headtail:` or `minilm:`).
#[must_use]
pub fn truncation_of(embedder_id: &str) -> Truncation {
    if embedder_id.starts_with("minilm-headtail:") {
        Truncation::HeadTail
    } else {
        Truncation::Head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_configuration_shares_one_embedder_while_it_is_in_use() {
        let routers_dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/routers"));
        let first = build(&EmbedderConfig::Static, routers_dir).unwrap();
        let second = build(&EmbedderConfig::Static, routers_dir).unwrap();
        assert!(
            std::sync::Arc::ptr_eq(&first, &second),
            "the same table must not load twice"
        );
        let elsewhere = std::env::temp_dir().join(format!("routellm-no-routers-{}", std::process::id()));
        assert!(
            build(&EmbedderConfig::Static, &elsewhere).is_err(),
            "another folder is another table, not the shared one"
        );
        let id = first.id().to_owned();
        drop((first, second));
        let again = build(&EmbedderConfig::Static, routers_dir).unwrap();
        assert_eq!(again.id(), id, "freed when unused, then loaded afresh");
    }
}
