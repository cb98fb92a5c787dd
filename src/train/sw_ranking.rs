//! `routellm train sw_ranking`: builds the similarity-weighted ranking router's index.
//!
//! RouteLLM's recipe on our data: a global Bradley–Terry fit over every model gives the
//! ratings that cut models into tiers; each training prompt keeps its tier-versus-tier win
//! counts and its embedding. Correctness rows count every pair of models on the prompt: a
//! right answer beats a wrong one and two equal answers tie (half a win each), the way
//! RouteLLM's arena data counts ties. Each prompt carries the same total weight, so a
//! source that scored 30 models does not drown one that scored 11.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::data::{self, Dataset};
use super::{SplitOptions, validation};
use crate::embed::Embedder;
use crate::error::Error;
use crate::routers::sw_ranking::{self, SwIndex, SwManifest};

/// Settings; defaults are the shipped artifact's.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SwOptions {
    pub tiers: usize,
    /// Weighting sharpnesses tried (1 is RouteLLM's); the best mean validation APGR ships.
    pub sharpness_grid: Vec<f64>,
    #[serde(flatten)]
    pub split: SplitOptions,
}

impl Default for SwOptions {
    fn default() -> Self {
        Self {
            tiers: sw_ranking::DEFAULT_TIERS,
            sharpness_grid: vec![1.0, 2.0, 3.0, 5.0, 10.0],
            split: SplitOptions::default(),
        }
    }
}

/// One prompt's model-versus-model results: `(a, b, wins of a, wins of b)`, summing to one.
fn prompt_results(data: &Dataset, by_prompt: &[Vec<usize>], prompt: usize) -> Vec<(usize, usize, f64, f64)> {
    let mut results = Vec::new();
    if let Some(outcomes) = data.correctness.get(&prompt) {
        let scored: Vec<(usize, f64)> = outcomes.iter().map(|(m, s)| (*m, f64::from(*s))).collect();
        for (slot, &(a, sa)) in scored.iter().enumerate() {
            for &(b, sb) in &scored[slot + 1..] {
                // Scores may be fractional (partial credit): expected wins, ties split evenly.
                let tie = sa * sb + (1.0 - sa) * (1.0 - sb);
                results.push((a, b, sa * (1.0 - sb) + tie / 2.0, sb * (1.0 - sa) + tie / 2.0));
            }
        }
    }
    for &index in &by_prompt[prompt] {
        let battle = &data.battles[index];
        let label = f64::from(battle.label);
        results.push((battle.a, battle.b, label, 1.0 - label));
    }
    #[allow(clippy::cast_precision_loss)]
    let share = 1.0 / results.len().max(1) as f64;
    for result in &mut results {
        result.2 *= share;
        result.3 *= share;
    }
    results
}

/// The global ratings (natural scale) of every model, from the training prompts.
fn global_ratings(data: &Dataset, results: &[Vec<(usize, usize, f64, f64)>], train: &[bool]) -> Vec<f64> {
    let n = data.models.len();
    let mut wins = vec![0.0_f64; n * n];
    for (prompt, rows) in results.iter().enumerate() {
        if train[prompt] {
            for &(a, b, wa, wb) in rows {
                wins[a * n + b] += wa;
                wins[b * n + a] += wb;
            }
        }
    }
    sw_ranking::bradley_terry(&wins, n)
}

/// Per prompt, the `tiers x tiers` wins of each tier over each other tier. Same-tier
/// results carry no information about tier ratings (RouteLLM's design-matrix row is zero
/// for them) and are dropped.
fn tier_wins(results: &[Vec<(usize, usize, f64, f64)>], model_tiers: &[usize], tiers: usize) -> Vec<f32> {
    let block = tiers * tiers;
    let mut all_wins = vec![0.0_f32; results.len() * block];
    for (prompt, rows) in results.iter().enumerate() {
        let wins = &mut all_wins[prompt * block..(prompt + 1) * block];
        for &(a, b, wa, wb) in rows {
            let (ta, tb) = (model_tiers[a], model_tiers[b]);
            if ta != tb {
                #[allow(clippy::cast_possible_truncation)]
                {
                    wins[ta * tiers + tb] += wa as f32;
                    wins[tb * tiers + ta] += wb as f32;
                }
            }
        }
    }
    all_wins
}

/// Everything validation needs: held-out prompts are scored against the training prompts only.
struct Validated<'a> {
    data: &'a Dataset,
    train: &'a [bool],
    embeddings: &'a [Vec<f32>],
    all_wins: &'a [f32],
    model_tiers: &'a [usize],
    tiers: usize,
}

impl Validated<'_> {
    /// The sharpness of `options.sharpness_grid` with the best mean validation APGR, its
    /// report, and the whole grid's scores.
    fn choose_sharpness(&self, options: &SwOptions) -> Result<(f64, serde_json::Value, Vec<serde_json::Value>), Error> {
        let pairs = validation::candidate_pairs(&options.split.strong, &options.split.weak);
        let sets = validation::held_out_sets(self.data, self.train, &pairs);
        let dim = self.embeddings.first().map_or(0, Vec::len);
        let mut grid = Vec::new();
        let mut best: Option<(f64, f64, serde_json::Value)> = None;
        // Every prompt is indexed; validation excludes held-out ones per query.
        let mut full = SwIndex::new(self.embeddings.concat(), self.all_wins.to_vec(), dim, self.tiers, 1.0)
            .map_err(|e| Error::invalid(e.to_string()))?;
        for &sharpness in &options.sharpness_grid {
            full.set_sharpness(sharpness)
                .map_err(|e| Error::invalid(e.to_string()))?;
            let report = validation::report_all(self.data, &sets, &|prompt, strong, weak| {
                let wins = full.weighted_wins_over(&self.embeddings[prompt], Some(self.train));
                let fitted = sw_ranking::bradley_terry(&wins, self.tiers);
                let (ts, tw) = (self.model_tiers[strong], self.model_tiers[weak]);
                Ok(if ts == tw {
                    0.5
                } else {
                    sw_ranking::expected_score(fitted[ts], fitted[tw])
                })
            })?;
            let score = validation::mean_apgr(&report);
            eprintln!("sharpness {sharpness}: mean validation APGR {score:.4}");
            for (source, metrics) in &report {
                eprintln!("  {source}: {metrics}");
            }
            grid.push(serde_json::json!({"sharpness": sharpness, "mean_apgr": score}));
            if best.as_ref().is_none_or(|(top, _, _)| score > *top) {
                best = Some((score, sharpness, serde_json::to_value(&report).unwrap_or_default()));
            }
        }
        let (_, sharpness, report) = best.ok_or_else(|| Error::invalid("--sharpness needs at least one value"))?;
        Ok((sharpness, report, grid))
    }
}

/// Everything `routellm train sw_ranking` does: read, split, rate, tier, embed, validate, write.
pub fn train_sw_ranking(
    files: &[PathBuf],
    embedder: &Arc<dyn Embedder>,
    embedder_kind: &str,
    options: &SwOptions,
    out: &Path,
    command: &str,
) -> Result<SwManifest, Error> {
    // Correctness rows are counted pair by pair below, not sampled into battles.
    let (data, train) = super::read_split(files, 0, &options.split)?;
    for name in [&options.split.strong, &options.split.weak] {
        if data.model(name).is_none() {
            return Err(Error::invalid(format!(
                "the training data has no model `{name}`; choose --strong/--weak among: {}",
                data.models.join(", ")
            )));
        }
    }
    let mut by_prompt: Vec<Vec<usize>> = vec![Vec::new(); data.prompts.len()];
    for (index, battle) in data.battles.iter().enumerate() {
        by_prompt[battle.prompt].push(index);
    }
    let results: Vec<Vec<(usize, usize, f64, f64)>> = (0..data.prompts.len())
        .map(|p| prompt_results(&data, &by_prompt, p))
        .collect();
    let ratings = global_ratings(&data, &results, &train);
    let mut order: Vec<usize> = (0..data.models.len()).collect();
    order.sort_by(|a, b| ratings[*b].total_cmp(&ratings[*a]).then(a.cmp(b)));
    let sorted_elo: Vec<f64> = order.iter().map(|m| sw_ranking::to_elo(ratings[*m])).collect();
    let tier_by_rank = sw_ranking::compute_tiers(&sorted_elo, options.tiers);
    let tiers = tier_by_rank.iter().max().map_or(1, |t| t + 1);
    let mut model_tiers = vec![0_usize; data.models.len()];
    for (rank, model) in order.iter().enumerate() {
        model_tiers[*model] = tier_by_rank[rank];
    }
    eprintln!(
        "{} prompts ({} in the index), {} models in {tiers} tiers",
        data.prompts.len(),
        train.iter().filter(|t| **t).count(),
        data.models.len()
    );

    let embeddings = super::embed_all(
        embedder.as_ref(),
        &data.prompts,
        options.split.embedding_cache.as_deref(),
    )?;
    let block = tiers * tiers;
    let all_wins = tier_wins(&results, &model_tiers, tiers);
    let dim = embedder.dim();
    let validated = Validated {
        data: &data,
        train: &train,
        embeddings: &embeddings,
        all_wins: &all_wins,
        model_tiers: &model_tiers,
        tiers,
    };
    let (sharpness, report, grid) = validated.choose_sharpness(options)?;

    // The shipped index holds the training prompts only, so the validation numbers in the
    // manifest describe exactly the artifact that serves.
    let kept: Vec<usize> = (0..data.prompts.len()).filter(|p| train[*p]).collect();
    let index = SwIndex::new(
        kept.iter().flat_map(|p| embeddings[*p].iter().copied()).collect(),
        kept.iter()
            .flat_map(|p| all_wins[p * block..(p + 1) * block].iter().copied())
            .collect(),
        dim,
        tiers,
        sharpness,
    )
    .map_err(|e| Error::Internal(e.to_string()))?;
    let manifest = SwManifest {
        router: "sw_ranking".into(),
        embedder: embedder.id().to_owned(),
        embedder_kind: embedder_kind.to_owned(),
        tiers,
        sharpness,
        models: data.models.clone(),
        model_tiers,
        model_ratings: ratings.iter().map(|r| sw_ranking::to_elo(*r)).collect(),
        default_strong: data::canonical_model(&options.split.strong),
        default_weak: data::canonical_model(&options.split.weak),
        prompts: kept.len(),
        hyperparameters: serde_json::to_value(options).unwrap_or_default(),
        data: serde_json::to_value(&data.files).unwrap_or_default(),
        validation: serde_json::json!({"per_source": report, "sharpness_grid": grid}),
        command: command.to_owned(),
    };
    index
        .save(out, &manifest)
        .map_err(|error| Error::Internal(error.to_string()))?;
    Ok(manifest)
}
