//! The static embedder: a token-embedding table distilled from MiniLM with Model2Vec's
//! recipe, so a prompt embeds in microseconds with no forward pass and no length limit.
//!
//! Distillation (`routellm distill`): every vocabulary token goes through MiniLM on its
//! own; the outputs are reduced with PCA; each row is scaled by a smooth inverse
//! frequency weight `a / (a + p(token))` estimated on a corpus, so frequent filler tokens
//! count less. A prompt's embedding is the normalised sum of its tokens' rows.

use std::collections::HashMap;
use std::path::Path;

use half::f16;
use safetensors::tensor::{Dtype, TensorView};
use tokenizers::Tokenizer;

use super::{EmbedError, Embedder, MiniLm, normalize, sha256_file};
use crate::progress::Progress;

const TABLE_FILE: &str = "embeddings.safetensors";
const TOKENIZER_FILE: &str = "tokenizer.json";
const TENSOR: &str = "embeddings";
/// The SIF smoothing constant (Arora et al.), as Model2Vec uses.
const SIF_A: f64 = 1e-3;

pub struct StaticEmbedder {
    table: Vec<f32>,
    dim: usize,
    vocab: usize,
    tokenizer: super::wordpiece::WordPiece,
    id: String,
}

impl StaticEmbedder {
    /// Loads `embeddings.safetensors` and `tokenizer.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, EmbedError> {
        let table_path = dir.join(TABLE_FILE);
        let file = crate::artifact::Loaded::read(&table_path).map_err(EmbedError::Load)?;
        let (table, shape) = file.tensor(TENSOR).map_err(EmbedError::Load)?;
        let [vocab, dim] = shape[..] else {
            return Err(EmbedError::Load(format!(
                "{}: `{TENSOR}` must be 2-D",
                table_path.display()
            )));
        };
        let full = Tokenizer::from_file(dir.join(TOKENIZER_FILE))
            .map_err(|error| EmbedError::Load(format!("{}: {error}", dir.join(TOKENIZER_FILE).display())))?;
        // No length limit: the whole prompt counts, however long (few-shot prefixes included).
        let tokenizer = super::wordpiece::WordPiece::new(&full.get_vocab(false))
            .ok_or_else(|| EmbedError::Load(format!("{}: no [UNK] token", dir.join(TOKENIZER_FILE).display())))?;
        let digest = file.sha256;
        Ok(Self {
            table,
            dim,
            vocab,
            tokenizer,
            id: format!("static:{}", &digest[..16]),
        })
    }

    /// The table's token ids for `text`, without special tokens.
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        let mut ids = Vec::with_capacity(text.len() / 4 + 1);
        self.tokenizer.encode_into(text, &mut ids);
        Ok(ids)
    }
}

impl Embedder for StaticEmbedder {
    fn dim(&self) -> usize {
        self.dim
    }

    fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let mut sum = vec![0.0_f32; self.dim];
        for id in self.token_ids(text)? {
            let id = id as usize;
            if id < self.vocab {
                let row = &self.table[id * self.dim..(id + 1) * self.dim];
                for (total, value) in sum.iter_mut().zip(row) {
                    *total += value;
                }
            }
        }
        normalize(&mut sum);
        Ok(sum)
    }

    fn id(&self) -> &str {
        &self.id
    }
}

/// Builds a static table from MiniLM (`routellm distill`).
pub struct TableBuilder;

impl TableBuilder {
    /// Distils a `dim`-dimensional table from `minilm`, weighting tokens by their frequency
    /// in `corpus`, and writes it with its tokenizer to `out_dir`. Returns the table's sha256.
    pub fn distill(minilm: &MiniLm, corpus: &[String], dim: usize, out_dir: &Path) -> Result<String, EmbedError> {
        let vocab = minilm.tokenizer().get_vocab_size(true);
        let hidden = minilm.dim();
        if dim == 0 || dim > hidden {
            return Err(EmbedError::Load(format!("--dim must be in 1..={hidden}")));
        }
        let progress = Progress::new("embedding vocabulary", vocab);
        let mut raw = Vec::with_capacity(vocab * hidden);
        let ids: Vec<u32> = (0..u32::try_from(vocab).map_err(|e| EmbedError::Load(e.to_string()))?).collect();
        for batch in ids.chunks(512) {
            for row in minilm.token_vectors(batch)? {
                raw.extend(row.into_iter().map(f64::from));
            }
            progress.advance(batch.len());
        }
        let components = principal_components(&raw, vocab, hidden, dim);
        let weights = sif_weights(minilm.tokenizer(), corpus, vocab)?;
        let mean = column_means(&raw, vocab, hidden);
        let mut table = Vec::with_capacity(vocab * dim);
        for token in 0..vocab {
            let row = &raw[token * hidden..(token + 1) * hidden];
            for component in &components {
                let projected: f64 = row
                    .iter()
                    .zip(&mean)
                    .zip(component)
                    .map(|((x, m), c)| (x - m) * c)
                    .sum();
                table.push(f16::from_f64(projected * weights[token]));
            }
        }
        std::fs::create_dir_all(out_dir).map_err(|e| EmbedError::Load(format!("{}: {e}", out_dir.display())))?;
        let bytes: Vec<u8> = table.iter().flat_map(|value| value.to_le_bytes()).collect();
        let view =
            TensorView::new(Dtype::F16, vec![vocab, dim], &bytes).map_err(|e| EmbedError::Load(e.to_string()))?;
        let path = out_dir.join(TABLE_FILE);
        safetensors::serialize_to_file([(TENSOR, view)], None, &path)
            .map_err(|e| EmbedError::Load(format!("{}: {e}", path.display())))?;
        let mut tokenizer = minilm.tokenizer().clone();
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| EmbedError::Load(e.to_string()))?;
        tokenizer
            .save(out_dir.join(TOKENIZER_FILE), false)
            .map_err(|e| EmbedError::Load(e.to_string()))?;
        sha256_file(&path)
    }
}

fn column_means(rows: &[f64], count: usize, width: usize) -> Vec<f64> {
    let mut mean = vec![0.0; width];
    for row in rows.chunks_exact(width) {
        for (m, x) in mean.iter_mut().zip(row) {
            *m += x;
        }
    }
    #[allow(clippy::cast_precision_loss)]
    let count = count as f64;
    for m in &mut mean {
        *m /= count;
    }
    mean
}

/// The top `k` principal directions of `rows` (count x width), largest variance first.
fn principal_components(rows: &[f64], count: usize, width: usize, k: usize) -> Vec<Vec<f64>> {
    let mean = column_means(rows, count, width);
    let mut covariance = vec![0.0; width * width];
    let mut centred = vec![0.0; width];
    for row in rows.chunks_exact(width) {
        for (c, (x, m)) in centred.iter_mut().zip(row.iter().zip(&mean)) {
            *c = x - m;
        }
        for i in 0..width {
            let ci = centred[i];
            for j in i..width {
                covariance[i * width + j] += ci * centred[j];
            }
        }
    }
    for i in 0..width {
        for j in 0..i {
            covariance[i * width + j] = covariance[j * width + i];
        }
    }
    let (values, vectors) = symmetric_eigen(&covariance, width);
    let mut order: Vec<usize> = (0..width).collect();
    order.sort_by(|a, b| values[*b].total_cmp(&values[*a]));
    order
        .into_iter()
        .take(k)
        .map(|column| {
            let mut direction: Vec<f64> = (0..width).map(|row| vectors[row * width + column]).collect();
            // An eigenvector's sign is arbitrary, and a last-bit difference in the encoder's
            // output can flip it (half the table changes, though no cosine does). Fixing it
            // (largest loading positive) keeps `distill` reproducible across such changes.
            let largest = direction
                .iter()
                .copied()
                .fold(0.0_f64, |best, v| if v.abs() > best.abs() { v } else { best });
            if largest < 0.0 {
                for value in &mut direction {
                    *value = -*value;
                }
            }
            direction
        })
        .collect()
}

/// Eigen-decomposition of a symmetric matrix by cyclic Jacobi rotations: eigenvalues and
/// eigenvectors as columns. Accurate to machine precision, fast enough for 384 x 384.
#[allow(clippy::many_single_char_names)] // the textbook's notation: a, v, p, q, c, s, t
pub(crate) fn symmetric_eigen(matrix: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = matrix.to_vec();
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..50 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |j| *j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum();
        let scale: f64 = (0..n)
            .map(|i| a[i * n + i] * a[i * n + i])
            .sum::<f64>()
            .max(f64::MIN_POSITIVE);
        if off <= 1e-22 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let akp = a[k * n + p];
                    let akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let apk = a[p * n + k];
                    let aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let vkp = v[k * n + p];
                    let vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

/// SIF weights `a / (a + p(token))` from token counts over `corpus`; unseen tokens get 1.
fn sif_weights(tokenizer: &Tokenizer, corpus: &[String], vocab: usize) -> Result<Vec<f64>, EmbedError> {
    let mut counts: HashMap<u32, u64> = HashMap::new();
    let mut total = 0_u64;
    let mut tokenizer = tokenizer.clone();
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|e| EmbedError::Load(e.to_string()))?;
    for text in corpus {
        let encoding = tokenizer
            .encode_fast(text.as_str(), false)
            .map_err(|e| EmbedError::Embed(e.to_string()))?;
        for id in encoding.get_ids() {
            *counts.entry(*id).or_default() += 1;
            total += 1;
        }
    }
    #[allow(clippy::cast_precision_loss)]
    let weight = |count: u64| {
        if total == 0 || count == 0 {
            1.0
        } else {
            SIF_A / (SIF_A + count as f64 / total as f64)
        }
    };
    Ok((0..vocab)
        .map(|id| weight(counts.get(&u32::try_from(id).unwrap_or(u32::MAX)).copied().unwrap_or(0)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_recovers_known_eigenpairs() {
        // [[2, 1], [1, 2]] has eigenvalues 3 and 1 with eigenvectors (1, 1) and (1, -1).
        let (values, vectors) = symmetric_eigen(&[2.0, 1.0, 1.0, 2.0], 2);
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        assert!((sorted[0] - 1.0).abs() < 1e-12 && (sorted[1] - 3.0).abs() < 1e-12);
        let top = usize::from(values[0] <= values[1]);
        let (x, y) = (vectors[top], vectors[2 + top]);
        assert!((x.abs() - y.abs()).abs() < 1e-12 && x * y > 0.0);
    }

    #[test]
    fn pca_finds_the_direction_of_largest_variance() {
        // Points spread along (1, 1, 0) with small noise elsewhere.
        let mut rows = Vec::new();
        for i in 0..200 {
            let t = f64::from(i) / 10.0 - 10.0;
            let noise = if i % 2 == 0 { 0.01 } else { -0.01 };
            rows.extend([t, t, noise]);
        }
        let components = principal_components(&rows, 200, 3, 1);
        let c = &components[0];
        let largest = c
            .iter()
            .copied()
            .fold(0.0_f64, |best, v| if v.abs() > best.abs() { v } else { best });
        assert!(largest > 0.0, "the sign convention: largest loading positive");
        assert!((c[0].abs() - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-4, "{c:?}");
        assert!(c[2].abs() < 1e-3, "{c:?}");
    }
}
