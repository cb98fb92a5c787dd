//! Any OpenAI-compatible `/v1/embeddings` endpoint, for teams who want RouteLLM's original
//! setting (`text-embedding-3-small`). One blocking call per prompt: routers run on the
//! blocking pool, never on the async workers.

use std::time::Duration;

use serde::Deserialize;

use super::{EmbedError, Embedder, normalize};

pub(super) fn default_model() -> String {
    "text-embedding-3-small".to_owned()
}

pub struct OpenAiEmbedder {
    client: reqwest::blocking::Client,
    url: String,
    model: String,
    api_key: Option<String>,
    dim: usize,
    id: String,
}

#[derive(Deserialize)]
struct Response {
    data: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    embedding: Vec<f32>,
}

impl OpenAiEmbedder {
    /// Connects to `base_url` (default `https://api.openai.com/v1`) and learns the vector
    /// size with one probe request, so a wrong endpoint fails at start-up, not per request.
    pub fn connect(model: &str, base_url: Option<&str>, api_key: Option<String>) -> Result<Self, EmbedError> {
        crate::upstream::install_crypto_provider();
        let base_url = base_url.unwrap_or("https://api.openai.com/v1").trim_end_matches('/');
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|error| EmbedError::Load(error.to_string()))?;
        let mut embedder = Self {
            client,
            url: format!("{base_url}/embeddings"),
            model: model.to_owned(),
            api_key,
            dim: 0,
            id: format!("openai:{model}"),
        };
        embedder.dim = embedder
            .request("dimension probe")
            .map_err(|error| EmbedError::Load(format!("embeddings endpoint {}: {error}", embedder.url)))?
            .len();
        Ok(embedder)
    }

    fn request(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let mut request = self
            .client
            .post(&self.url)
            .json(&serde_json::json!({"model": self.model, "input": text}));
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().map_err(|error| EmbedError::Embed(error.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().unwrap_or_default();
            return Err(EmbedError::Embed(format!("HTTP {status}: {body}")));
        }
        let parsed: Response = response.json().map_err(|error| EmbedError::Embed(error.to_string()))?;
        let mut vector = parsed
            .data
            .into_iter()
            .next()
            .map(|item| item.embedding)
            .ok_or_else(|| EmbedError::Embed("the response has no embedding".into()))?;
        normalize(&mut vector);
        Ok(vector)
    }
}

impl Embedder for OpenAiEmbedder {
    fn dim(&self) -> usize {
        self.dim
    }

    fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let vector = self.request(text)?;
        if vector.len() != self.dim {
            return Err(EmbedError::Embed(format!(
                "expected {} dimensions, got {}",
                self.dim,
                vector.len()
            )));
        }
        Ok(vector)
    }

    fn id(&self) -> &str {
        &self.id
    }
}
