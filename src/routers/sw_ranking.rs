//! RouteLLM's similarity-weighted ranking router (`sw_ranking`), made fast enough to serve.
//!
//! Semantics kept from RouteLLM: every training battle is weighted by how similar its
//! prompt is to the request (`10 * 10^(sim / max_sim)`, cosine similarity), a
//! Bradley–Terry (Elo) model over model tiers is fitted to the weighted battles, and the
//! strong tier's expected score against the weak tier is the win rate.
//!
//! What makes it serve: the fit depends on the battles only through the weighted number of
//! wins of each tier over each other tier. So training stores, per training prompt, its
//! `tiers x tiers` win counts; a request costs one matrix-vector product for the
//! similarities, one for the aggregated wins, and a Newton solve over ~10 ratings —
//! instead of RouteLLM's per-request scikit-learn refit over every battle.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::mf::{MANIFEST_FILE, WEIGHTS_FILE, read_manifest, write_manifest};
use super::{Router, RouterError};
use crate::artifact;
use crate::embed::Embedder;

/// RouteLLM's number of model tiers.
pub const DEFAULT_TIERS: usize = 10;

/// What the artifact says about itself; written by `routellm train sw_ranking`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwManifest {
    pub router: String,
    pub embedder: String,
    pub embedder_kind: String,
    pub tiers: usize,
    /// The weighting's exponent scale (1: RouteLLM's `10 * 10^(sim / max_sim)`).
    pub sharpness: f64,
    /// Every model identity in the training data, its tier (0 = strongest) and its global Elo.
    pub models: Vec<String>,
    pub model_tiers: Vec<usize>,
    pub model_ratings: Vec<f64>,
    pub default_strong: String,
    pub default_weak: String,
    /// Training prompts in the index.
    pub prompts: usize,
    #[serde(default)]
    pub hyperparameters: serde_json::Value,
    #[serde(default)]
    pub data: serde_json::Value,
    #[serde(default)]
    pub validation: serde_json::Value,
    #[serde(default)]
    pub command: String,
}

/// The training prompts' embeddings and per-prompt tier-versus-tier win counts.
#[derive(Debug, Clone, PartialEq)]
pub struct SwIndex {
    /// `prompts x dim`, rows L2-normalised.
    embeddings: Vec<f32>,
    /// `prompts x tiers x tiers`: entry `[p][i][j]` is how often tier `i` beat tier `j` on
    /// prompt `p` (ties count half to each side).
    wins: Vec<f32>,
    dim: usize,
    tiers: usize,
    /// The exponent's scale: RouteLLM's `10^(sim / max_sim)` is 1; larger values let the
    /// most similar prompts count for more.
    sharpness: f64,
}

impl SwIndex {
    pub fn new(
        embeddings: Vec<f32>,
        wins: Vec<f32>,
        dim: usize,
        tiers: usize,
        sharpness: f64,
    ) -> Result<Self, RouterError> {
        let prompts = embeddings.len().checked_div(dim).unwrap_or(0);
        if dim == 0 || tiers < 2 || embeddings.len() != prompts * dim || wins.len() != prompts * tiers * tiers {
            return Err(RouterError::Load(format!(
                "sw_ranking index shapes disagree: {} embedding values at dim {dim}, {} win counts for {tiers} tiers",
                embeddings.len(),
                wins.len()
            )));
        }
        let mut index = Self {
            embeddings,
            wins,
            dim,
            tiers,
            sharpness: 1.0,
        };
        index.set_sharpness(sharpness)?;
        Ok(index)
    }

    /// Changes the weighting's sharpness: training tries several on one index.
    pub fn set_sharpness(&mut self, sharpness: f64) -> Result<(), RouterError> {
        if !(sharpness.is_finite() && sharpness >= 0.0) {
            return Err(RouterError::Load(format!(
                "sw_ranking sharpness must be >= 0, not {sharpness}"
            )));
        }
        self.sharpness = sharpness;
        Ok(())
    }

    #[must_use]
    pub fn prompts(&self) -> usize {
        self.embeddings.len() / self.dim
    }

    #[must_use]
    pub fn dim(&self) -> usize {
        self.dim
    }

    #[must_use]
    pub fn tiers(&self) -> usize {
        self.tiers
    }

    /// RouteLLM's battle weights for a request embedding: `10 * 10^(sharpness * sim / max_sim)`.
    #[must_use]
    pub fn weights(&self, query: &[f32]) -> Vec<f64> {
        let similarities: Vec<f32> = self
            .embeddings
            .chunks_exact(self.dim)
            .map(|row| dot(row, query))
            .collect();
        let max = similarities.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // RouteLLM divides by the largest similarity; were it not positive, that would turn
        // the weighting upside down (the least similar prompts weighted most). No training
        // prompt resembles the request then, and every battle counts the same.
        if max <= f32::EPSILON {
            return vec![10.0; similarities.len()];
        }
        let scale = self.sharpness * std::f64::consts::LN_10 / f64::from(max);
        similarities
            .iter()
            .map(|s| 10.0 * (f64::from(*s) * scale).exp())
            .collect()
    }

    /// The similarity-weighted `tiers x tiers` win matrix for a request embedding.
    #[must_use]
    pub fn weighted_wins(&self, query: &[f32]) -> Vec<f64> {
        self.weighted_wins_over(query, None)
    }

    /// As [`Self::weighted_wins`], over the prompts for which `keep` holds (all when `None`);
    /// training validates on held-out prompts with the index of the training prompts only.
    #[must_use]
    pub fn weighted_wins_over(&self, query: &[f32], keep: Option<&[bool]>) -> Vec<f64> {
        let block = self.tiers * self.tiers;
        let mut total = vec![0.0_f64; block];
        for (prompt, (weight, wins)) in self
            .weights(query)
            .iter()
            .zip(self.wins.chunks_exact(block))
            .enumerate()
        {
            if keep.is_some_and(|keep| !keep[prompt]) {
                continue;
            }
            for (sum, count) in total.iter_mut().zip(wins) {
                *sum += weight * f64::from(*count);
            }
        }
        total
    }

    /// The strong tier's expected score against the weak tier for a request embedding.
    #[must_use]
    pub fn win_rate(&self, query: &[f32], strong_tier: usize, weak_tier: usize) -> f64 {
        let ratings = bradley_terry(&self.weighted_wins(query), self.tiers);
        expected_score(ratings[strong_tier], ratings[weak_tier])
    }

    pub fn save(&self, dir: &Path, manifest: &SwManifest) -> Result<(), RouterError> {
        std::fs::create_dir_all(dir).map_err(|e| RouterError::Load(format!("{}: {e}", dir.display())))?;
        let prompts = self.prompts();
        artifact::write(
            &dir.join(WEIGHTS_FILE),
            &[
                artifact::Tensor::f16("embeddings", &self.embeddings, vec![prompts, self.dim]),
                artifact::Tensor::f16("tier_wins", &self.wins, vec![prompts, self.tiers, self.tiers]),
            ],
        )
        .map_err(RouterError::Load)?;
        write_manifest(dir, manifest)
    }

    /// Loads the index and manifest from `dir`, with the index file's sha256.
    pub fn load(dir: &Path) -> Result<(Self, SwManifest, String), RouterError> {
        let manifest: SwManifest = read_manifest(dir)?;
        let file = artifact::Loaded::read(&dir.join(WEIGHTS_FILE)).map_err(RouterError::Load)?;
        let (mut embeddings, shape) = file.tensor("embeddings").map_err(RouterError::Load)?;
        let [_, dim] = shape[..] else {
            return Err(RouterError::Load(format!("{}: embeddings must be 2-D", dir.display())));
        };
        // Stored as f16: renormalise so similarities stay true cosines.
        for row in embeddings.chunks_exact_mut(dim.max(1)) {
            crate::embed::normalize(row);
        }
        let (wins, _) = file.tensor("tier_wins").map_err(RouterError::Load)?;
        let index = Self::new(embeddings, wins, dim, manifest.tiers, manifest.sharpness)
            .map_err(|e| RouterError::Load(format!("{}: {e}", dir.display())))?;
        if manifest.models.len() != manifest.model_tiers.len()
            || manifest.model_tiers.iter().any(|tier| *tier >= manifest.tiers)
        {
            return Err(RouterError::Load(format!(
                "{}: {MANIFEST_FILE} lists models and tiers that disagree",
                dir.display()
            )));
        }
        Ok((index, manifest, file.sha256))
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent sums let the compiler vectorise without reassociating one sum.
    let mut lanes = [0.0_f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..8 {
            lanes[lane] += x[lane] * y[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Elo's expected score of a player rated `a` (natural log-odds scale) against `b`.
#[must_use]
pub fn expected_score(a: f64, b: f64) -> f64 {
    1.0 / (1.0 + (b - a).exp())
}

/// Converts a natural-scale Bradley–Terry rating to Elo points (RouteLLM: scale 400, base 10, 1000).
#[must_use]
pub fn to_elo(rating: f64) -> f64 {
    400.0 * rating / std::f64::consts::LN_10 + 1000.0
}

/// Maximum-likelihood Bradley–Terry ratings (natural log-odds scale) from an `n x n` matrix
/// of weighted wins (`wins[i * n + j]`: `i` beat `j`). The same model RouteLLM fits with an
/// unpenalised logistic regression; a ridge of 1e-6 of the total weight keeps the optimum
/// finite when some player never loses, and Newton's method reaches it in a few steps.
#[must_use]
pub fn bradley_terry(wins: &[f64], n: usize) -> Vec<f64> {
    let total: f64 = wins.iter().sum();
    let ridge = 1e-6 * total.max(1e-12);
    let mut ratings = vec![0.0_f64; n];
    for _ in 0..100 {
        let mut gradient = vec![0.0_f64; n];
        let mut hessian = vec![0.0_f64; n * n];
        for i in 0..n {
            gradient[i] -= ridge * ratings[i];
            hessian[i * n + i] += ridge;
            for j in 0..n {
                if i == j {
                    continue;
                }
                let games = wins[i * n + j] + wins[j * n + i];
                if games <= 0.0 {
                    continue;
                }
                let p = expected_score(ratings[i], ratings[j]);
                gradient[i] += wins[i * n + j] - games * p;
                let curvature = games * p * (1.0 - p);
                hessian[i * n + i] += curvature;
                hessian[i * n + j] -= curvature;
            }
        }
        let Some(step) = solve(hessian, gradient, n) else {
            break;
        };
        let largest = step.iter().fold(0.0_f64, |m, s| m.max(s.abs()));
        // Newton steps on a log-likelihood this flat far from the optimum can overshoot;
        // capping them keeps the iteration monotone in practice.
        let damping = if largest > 2.0 { 2.0 / largest } else { 1.0 };
        for (rating, delta) in ratings.iter_mut().zip(&step) {
            *rating += damping * delta;
        }
        if largest < 1e-10 {
            break;
        }
    }
    ratings
}

/// Solves `a x = b` (`a` symmetric positive definite, `n x n`) by Gaussian elimination with
/// partial pivoting; `None` if singular.
fn solve(mut a: Vec<f64>, mut b: Vec<f64>, n: usize) -> Option<Vec<f64>> {
    for column in 0..n {
        let pivot = (column..n).max_by(|x, y| a[x * n + column].abs().total_cmp(&a[y * n + column].abs()))?;
        if a[pivot * n + column].abs() < 1e-300 {
            return None;
        }
        if pivot != column {
            for k in 0..n {
                a.swap(pivot * n + k, column * n + k);
            }
            b.swap(pivot, column);
        }
        for row in column + 1..n {
            let factor = a[row * n + column] / a[column * n + column];
            if factor != 0.0 {
                for k in column..n {
                    a[row * n + k] -= factor * a[column * n + k];
                }
                b[row] -= factor * b[column];
            }
        }
    }
    let mut x = vec![0.0_f64; n];
    for row in (0..n).rev() {
        let rest: f64 = (row + 1..n).map(|k| a[row * n + k] * x[k]).sum();
        x[row] = (b[row] - rest) / a[row * n + row];
    }
    Some(x)
}

/// RouteLLM's tiers: ratings sorted from best to worst are cut into `tiers` contiguous
/// groups minimising the sum of the groups' variances (its dynamic programme). Returns the
/// tier (0 = best) of each position in `sorted_ratings`.
#[must_use]
pub fn compute_tiers(sorted_ratings: &[f64], tiers: usize) -> Vec<usize> {
    let n = sorted_ratings.len();
    let tiers = tiers.clamp(1, n.max(1));
    if n == 0 {
        return Vec::new();
    }
    let variance = |from: usize, to: usize| {
        let values = &sorted_ratings[from..=to];
        #[allow(clippy::cast_precision_loss)]
        let count = values.len() as f64;
        let mean = values.iter().sum::<f64>() / count;
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / count
    };
    // cost[t][j]: the best cost of cutting positions 0..=j into t + 1 groups; cut[t][j]: where
    // the last group starts.
    let mut cost = vec![vec![f64::INFINITY; n]; tiers];
    let mut cut = vec![vec![0_usize; n]; tiers];
    for (j, slot) in cost[0].iter_mut().enumerate() {
        *slot = variance(0, j);
    }
    for t in 1..tiers {
        for j in t..n {
            for start in t..=j {
                let candidate = cost[t - 1][start - 1] + variance(start, j);
                if candidate < cost[t][j] {
                    cost[t][j] = candidate;
                    cut[t][j] = start;
                }
            }
        }
    }
    let mut assignment = vec![0_usize; n];
    let mut end = n - 1;
    for t in (0..tiers).rev() {
        let start = if t == 0 { 0 } else { cut[t][end] };
        for slot in &mut assignment[start..=end] {
            *slot = t;
        }
        if t > 0 {
            end = start - 1;
        }
    }
    assignment
}

/// The served router: an embedder, the index and the two tiers it compares.
pub struct SwRankingRouter {
    embedder: Arc<dyn Embedder>,
    index: SwIndex,
    strong_tier: usize,
    weak_tier: usize,
    cache_key: String,
}

impl SwRankingRouter {
    /// Loads the artifact in `dir` for `embedder`, comparing the tiers of `strong` and
    /// `weak` (default: the manifest's pair). Fails if the embedder is not the one trained
    /// with, or if both identities fall in one tier (the router could not tell them apart).
    pub fn load(
        dir: &Path,
        embedder: Arc<dyn Embedder>,
        strong: Option<&str>,
        weak: Option<&str>,
    ) -> Result<Self, RouterError> {
        let (index, manifest, digest) = SwIndex::load(dir)?;
        if manifest.embedder != embedder.id() || index.dim() != embedder.dim() {
            return Err(RouterError::Load(format!(
                "{} was built with embedder `{}` but `{}` is configured; use the matching embedder or rebuild \
                 with `routellm train sw_ranking`",
                dir.display(),
                manifest.embedder,
                embedder.id()
            )));
        }
        let tier_of = |name: &str| {
            let canonical = crate::train::data::canonical_model(name);
            manifest
                .models
                .iter()
                .position(|model| *model == canonical)
                .map(|position| manifest.model_tiers[position])
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
        let (strong_tier, weak_tier) = (tier_of(strong_name)?, tier_of(weak_name)?);
        if strong_tier == weak_tier {
            return Err(RouterError::Load(format!(
                "`{strong_name}` and `{weak_name}` are both in tier {strong_tier} of {}: sw_ranking cannot tell \
                 them apart; choose identities from different tiers (see its manifest)",
                dir.display()
            )));
        }
        Ok(Self {
            embedder,
            index,
            strong_tier,
            weak_tier,
            // The sharpness lives in the manifest, not the hashed tensors.
            cache_key: format!(
                "sw_ranking:{}:{strong_name}:{weak_name}:{}:{}",
                manifest.embedder,
                manifest.sharpness,
                &digest[..16]
            ),
        })
    }
}

impl Router for SwRankingRouter {
    fn strong_win_rate(&self, prompt: &str) -> Result<f64, RouterError> {
        let query = self
            .embedder
            .embed(prompt)
            .map_err(|e| RouterError::Score(e.to_string()))?;
        Ok(self.index.win_rate(&query, self.strong_tier, self.weak_tier))
    }

    fn strong_win_rates(&self, prompts: &[&str]) -> Result<Vec<f64>, RouterError> {
        let queries = self
            .embedder
            .embed_many(prompts)
            .map_err(|e| RouterError::Score(e.to_string()))?;
        Ok(queries
            .iter()
            .map(|query| self.index.win_rate(query, self.strong_tier, self.weak_tier))
            .collect())
    }

    fn scoring_cost(&self) -> super::ScoringCost {
        super::cost_of(Some(self.embedder.as_ref()))
    }

    fn cache_key(&self) -> Option<String> {
        Some(self.cache_key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bradley_terry_recovers_known_ratings() {
        // Expected wins under ratings (1, 0, -0.5) with 1000 games per pair: the MLE is exact.
        let truth = [1.0, 0.0, -0.5];
        let mut wins = vec![0.0; 9];
        for i in 0..3 {
            for j in 0..3 {
                if i != j {
                    wins[i * 3 + j] = 1000.0 * expected_score(truth[i], truth[j]);
                }
            }
        }
        let fitted = bradley_terry(&wins, 3);
        for (i, j) in [(0, 1), (1, 2), (0, 2)] {
            let (got, want) = (fitted[i] - fitted[j], truth[i] - truth[j]);
            assert!((got - want).abs() < 1e-3, "{i} vs {j}: {got} != {want}");
        }
    }

    #[test]
    fn bradley_terry_stays_finite_when_a_player_never_loses() {
        let wins = vec![0.0, 5.0, 0.0, 0.0];
        let fitted = bradley_terry(&wins, 2);
        assert!(fitted.iter().all(|r| r.is_finite()));
        assert!(expected_score(fitted[0], fitted[1]) > 0.99);
    }

    #[test]
    fn tiers_split_where_ratings_jump() {
        let ratings = [1300.0, 1290.0, 1100.0, 1095.0, 1090.0, 800.0];
        assert_eq!(compute_tiers(&ratings, 3), vec![0, 0, 1, 1, 1, 2]);
        assert_eq!(compute_tiers(&ratings, 1), vec![0; 6]);
        // More tiers than models: one model per tier.
        assert_eq!(compute_tiers(&ratings[..2], 10), vec![0, 1]);
    }

    fn unit(v: &[f32]) -> Vec<f32> {
        let mut v = v.to_vec();
        crate::embed::normalize(&mut v);
        v
    }

    #[test]
    fn similar_prompts_dominate_the_win_rate() {
        // Prompt A (near [1, 0]): tier 0 always beats tier 1; prompt B (near [0, 1]): the reverse.
        let mut embeddings = unit(&[1.0, 0.05]);
        embeddings.extend(unit(&[0.05, 1.0]));
        let wins = vec![0.0, 10.0, 0.0, 0.0, /* B */ 0.0, 0.0, 10.0, 0.0];
        let index = SwIndex::new(embeddings, wins, 2, 2, 1.0).unwrap();
        let near_a = index.win_rate(&unit(&[1.0, 0.1]), 0, 1);
        let near_b = index.win_rate(&unit(&[0.1, 1.0]), 0, 1);
        assert!(near_a > 0.7 && near_b < 0.3, "{near_a} {near_b}");
        // Symmetric in the roles of the tiers.
        assert!((index.win_rate(&unit(&[1.0, 0.1]), 1, 0) - (1.0 - near_a)).abs() < 1e-9);
    }

    #[test]
    fn weights_follow_routellm_formula() {
        let mut embeddings = unit(&[1.0, 0.0]);
        embeddings.extend(unit(&[1.0, 1.0]));
        let index = SwIndex::new(embeddings, vec![0.0; 8], 2, 2, 1.0).unwrap();
        let weights = index.weights(&[1.0, 0.0]);
        let sims = [1.0_f64, std::f64::consts::FRAC_1_SQRT_2];
        for (weight, sim) in weights.iter().zip(sims) {
            let want = 10.0 * 10f64.powf(sim / 1.0);
            assert!((weight - want).abs() / want < 1e-5, "{weight} vs {want}");
        }
        // No positive similarity anywhere: every battle counts the same.
        assert_eq!(index.weights(&[-1.0, 0.0]), vec![10.0, 10.0]);
    }

    #[test]
    fn dot_matches_naive_sum_on_every_length() {
        for len in [0, 1, 7, 8, 9, 256, 385] {
            #[allow(clippy::cast_precision_loss)]
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            #[allow(clippy::cast_precision_loss)]
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-3, "len {len}");
        }
    }
}
