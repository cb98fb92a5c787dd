//! Any OpenAI-compatible `/v1/embeddings` endpoint, for teams who want RouteLLM's original
//! setting (`text-embedding-3-small`). One blocking call per prompt: routers run on the
//! blocking pool, never on the async workers.

use std::time::Duration;

use serde::Deserialize;

use super::{EmbedError, Embedder, REMOTE_BATCH, normalize};

pub(super) fn default_model() -> String {
    "text-embedding-3-small".to_owned()
}

pub struct OpenAiEmbedder {
    client: reqwest::blocking::Client,
    url: String,
    model: String,
    api_key: Option<String>,
    /// Configured extra headers (sensitive).
    headers: reqwest::header::HeaderMap,
    dim: usize,
    id: String,
}

/// The most characters of a prompt sent to the endpoint: its first and last halves of this
/// budget. Embedding models refuse inputs past their context (8,191 tokens for OpenAI's),
/// and a routed request with a pasted document must not fail its embeddings call; 16,000
/// characters is ~4k tokens of English. Shorter prompts (every training prompt here) are
/// sent exactly as RouteLLM sends them.
const MAX_INPUT_CHARS: usize = 16_000;

/// `text`, or its first and last `MAX_INPUT_CHARS / 2` characters (where the instruction and
/// the final question usually are) joined by a newline.
fn within_budget(text: &str) -> std::borrow::Cow<'_, str> {
    let count = text.chars().count();
    if count <= MAX_INPUT_CHARS {
        return std::borrow::Cow::Borrowed(text);
    }
    let half = MAX_INPUT_CHARS / 2;
    let head_end = text.char_indices().nth(half).map_or(text.len(), |(at, _)| at);
    let tail_start = text.char_indices().nth(count - half).map_or(text.len(), |(at, _)| at);
    std::borrow::Cow::Owned(format!("{}\n{}", &text[..head_end], &text[tail_start..]))
}

/// Attempts per request: rate limits (429), server errors and refused connections are
/// retried with backoff, so embedding thousands of training prompts survives a provider's
/// hiccup. Timeouts are not: one has already cost 30 s of a routed request's time.
const ATTEMPTS: u32 = 3;
/// The longest wait a `Retry-After` header may impose.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
struct Response {
    data: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    embedding: Vec<f32>,
    /// Which input this is; OpenAI returns inputs in order, but says so, and other
    /// compatible servers may not keep the order.
    #[serde(default)]
    index: Option<usize>,
}

impl OpenAiEmbedder {
    /// Connects to `base_url` (default `https://api.openai.com/v1`) and learns the vector
    /// size with one probe request, so a wrong endpoint fails at start-up, not per request.
    pub fn connect(model: &str, base_url: Option<&str>, api_key: Option<String>) -> Result<Self, EmbedError> {
        Self::connect_with_headers(model, base_url, api_key, reqwest::header::HeaderMap::new())
    }

    /// As [`OpenAiEmbedder::connect`], sending `headers` with every request (a gateway's
    /// key in front of the endpoint, say).
    pub fn connect_with_headers(
        model: &str,
        base_url: Option<&str>,
        api_key: Option<String>,
        headers: reqwest::header::HeaderMap,
    ) -> Result<Self, EmbedError> {
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
            headers,
            dim: 0,
            id: format!("openai:{model}"),
        };
        embedder.dim = embedder
            .request(&serde_json::json!("dimension probe"), 1)
            .map_err(|error| EmbedError::Load(format!("embeddings endpoint {}: {error}", embedder.url)))?
            .pop()
            .map_or(0, |vector| vector.len());
        Ok(embedder)
    }

    /// `count` normalised vectors for `input` (a string, or an array of `count` strings),
    /// in input order.
    fn request(&self, input: &serde_json::Value, count: usize) -> Result<Vec<Vec<f32>>, EmbedError> {
        let body = serde_json::json!({"model": self.model, "input": input});
        let mut attempt = 0;
        let response = loop {
            attempt += 1;
            let mut request = self.client.post(&self.url).headers(self.headers.clone()).json(&body);
            if let Some(key) = &self.api_key {
                request = request.bearer_auth(key);
            }
            let wait = match request.send() {
                Ok(response) if response.status().is_success() => break response,
                Ok(response) => {
                    let status = response.status();
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|value| value.to_str().ok())
                        .and_then(retry_after_wait);
                    let retryable = status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
                    if !retryable || attempt >= ATTEMPTS {
                        let text = response.text().unwrap_or_default();
                        return Err(EmbedError::Embed(format!("HTTP {status}: {text}")));
                    }
                    retry_after.unwrap_or_else(|| crate::deployments::backoff(attempt))
                }
                Err(error) if attempt < ATTEMPTS && error.is_connect() => crate::deployments::backoff(attempt),
                Err(error) => return Err(EmbedError::Embed(error.to_string())),
            };
            std::thread::sleep(wait);
        };
        let parsed: Response = response.json().map_err(|error| EmbedError::Embed(error.to_string()))?;
        if parsed.data.len() != count {
            return Err(EmbedError::Embed(format!(
                "asked for {count} embeddings, got {}",
                parsed.data.len()
            )));
        }
        let mut vectors: Vec<Option<Vec<f32>>> = vec![None; count];
        for (position, item) in parsed.data.into_iter().enumerate() {
            let slot = item.index.unwrap_or(position);
            match vectors.get_mut(slot) {
                Some(entry @ None) => *entry = Some(item.embedding),
                _ => {
                    return Err(EmbedError::Embed(format!(
                        "embedding index {slot} is out of range or repeated"
                    )));
                }
            }
        }
        vectors
            .into_iter()
            .map(|vector| {
                let mut vector = vector.ok_or_else(|| EmbedError::Embed("an input got no embedding".into()))?;
                normalize(&mut vector);
                Ok(vector)
            })
            .collect()
    }

    /// Every vector must have the probed size: a model swapped behind the endpoint would
    /// otherwise be scored with weights trained for another.
    fn checked(&self, vectors: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, EmbedError> {
        match vectors.iter().find(|vector| vector.len() != self.dim) {
            Some(vector) => Err(EmbedError::Embed(format!(
                "expected {} dimensions, got {}",
                self.dim,
                vector.len()
            ))),
            None => Ok(vectors),
        }
    }
}

impl Embedder for OpenAiEmbedder {
    fn dim(&self) -> usize {
        self.dim
    }

    fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let vectors = self.checked(self.request(&serde_json::json!(within_budget(text)), 1)?)?;
        vectors
            .into_iter()
            .next()
            .ok_or_else(|| EmbedError::Embed("the response has no embedding".into()))
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn batch_size(&self) -> usize {
        REMOTE_BATCH
    }

    fn embed_many(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut vectors = Vec::with_capacity(texts.len());
        for batch in texts.chunks(REMOTE_BATCH) {
            let inputs: Vec<std::borrow::Cow<'_, str>> = batch.iter().map(|text| within_budget(text)).collect();
            vectors.extend(self.checked(self.request(&serde_json::json!(inputs), batch.len())?)?);
        }
        Ok(vectors)
    }
}

/// The wait a `Retry-After: <seconds>` header asks for, at most [`MAX_RETRY_AFTER`];
/// `None` for an HTTP date or anything unreadable (the caller backs off instead). Why the
/// finiteness check: `NaN` and `inf` parse as floats, and `Duration` panics on `NaN`.
fn retry_after_wait(value: &str) -> Option<Duration> {
    let seconds = value.trim().parse::<f64>().ok().filter(|seconds| seconds.is_finite())?;
    Some(Duration::from_secs_f64(
        seconds.clamp(0.0, MAX_RETRY_AFTER.as_secs_f64()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_capped_and_unreadable_values_back_off() {
        assert_eq!(retry_after_wait(" 2.5 "), Some(Duration::from_millis(2500)));
        assert_eq!(retry_after_wait("3600"), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after_wait("-4"), Some(Duration::ZERO));
        for unreadable in ["NaN", "inf", "-inf", "1e400", "Wed, 21 Oct 2026 07:28:00 GMT", ""] {
            assert_eq!(retry_after_wait(unreadable), None, "{unreadable}");
        }
    }

    #[test]
    fn long_prompts_keep_their_head_and_tail_within_the_budget() {
        assert_eq!(within_budget("short prompt"), "short prompt");
        let exact = "é".repeat(MAX_INPUT_CHARS);
        assert_eq!(within_budget(&exact), exact.as_str(), "the budget itself is not cut");
        let long = format!("INSTRUCTION {} QUESTION?", "ü".repeat(3 * MAX_INPUT_CHARS));
        let cut = within_budget(&long);
        assert_eq!(
            cut.chars().count(),
            MAX_INPUT_CHARS + 1,
            "both halves and the joining newline"
        );
        assert!(
            cut.starts_with("INSTRUCTION ") && cut.ends_with(" QUESTION?"),
            "{}",
            &cut[..20]
        );
    }
}
