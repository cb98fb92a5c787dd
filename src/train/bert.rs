//! `routellm train bert`: the classification head of the BERT-classifier router over the
//! frozen MiniLM encoder.
//!
//! Labels are RouteLLM's three classes for the scored pair: from correctness rows, the
//! strong model right and the weak one wrong, equal results (a tie), or the reverse (with
//! partial credit the classes become probabilities); from battles, the strong identity's
//! result against any opponent. The head is a multinomial logistic regression fitted by
//! full-batch Adam; its L2 strength is chosen on the validation split from a grid.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::data::Dataset;
use super::{SplitOptions, validation};
use crate::embed::Embedder;
use crate::error::Error;
use crate::routers::bert::{BertHead, BertManifest, LABELS};

/// Settings; defaults are the shipped artifact's.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BertOptions {
    /// L2 strengths tried; the best mean validation APGR wins.
    pub l2_grid: Vec<f32>,
    pub steps: usize,
    pub learning_rate: f32,
    /// One bias per training source (see [`fit`]).
    pub per_source_bias: bool,
    #[serde(flatten)]
    pub split: SplitOptions,
}

impl Default for BertOptions {
    fn default() -> Self {
        Self {
            l2_grid: vec![1e-4, 1e-3, 1e-2, 1e-1],
            steps: 300,
            learning_rate: 0.01,
            per_source_bias: true,
            split: SplitOptions::default(),
        }
    }
}

/// Per prompt, the probabilities of [`LABELS`], or `None` when the prompt says nothing
/// about the pair.
fn labels(data: &Dataset, pairs: &[(&str, &str)]) -> Vec<Option<[f32; 3]>> {
    let ids: Vec<(usize, usize)> = pairs
        .iter()
        .filter_map(|(s, w)| Some((data.model(s)?, data.model(w)?)))
        .collect();
    let mut sums: Vec<Option<([f32; 3], f32)>> = vec![None; data.prompts.len()];
    for (prompt, outcomes) in &data.correctness {
        if let Some((s, w)) = ids
            .iter()
            .find_map(|(s, w)| Some((*outcomes.get(s)?, *outcomes.get(w)?)))
        {
            let (strong_only, weak_only) = (s * (1.0 - w), w * (1.0 - s));
            sums[*prompt] = Some(([strong_only, 1.0 - strong_only - weak_only, weak_only], 1.0));
        }
    }
    let strong_ids: Vec<usize> = ids.iter().map(|(s, _)| *s).collect();
    for battle in &data.battles {
        let strong_won = if strong_ids.contains(&battle.a) {
            battle.label
        } else if strong_ids.contains(&battle.b) {
            1.0 - battle.label
        } else {
            continue;
        };
        let label = if (strong_won - 0.5).abs() < 1e-6 {
            [0.0, 1.0, 0.0]
        } else {
            [strong_won, 0.0, 1.0 - strong_won]
        };
        let entry = sums[battle.prompt].get_or_insert(([0.0; 3], 0.0));
        for (total, value) in entry.0.iter_mut().zip(label) {
            *total += value;
        }
        entry.1 += 1.0;
    }
    sums.into_iter()
        .map(|sum| sum.map(|(total, count)| total.map(|v| v / count)))
        .collect()
}

/// Fits the head on `rows` (already standardised) with soft targets. With `groups` (the
/// source of each row), every source gets its own bias, so the weights learn what
/// separates prompts within a source rather than which source a prompt looks like; the
/// served bias is their average, and only ranking, which a constant does not change,
/// matters for routing.
#[allow(clippy::cast_precision_loss)]
fn fit(
    rows: &[&[f32]],
    targets: &[[f32; 3]],
    groups: &[usize],
    dim: usize,
    l2: f32,
    options: &BertOptions,
) -> (Vec<f32>, Vec<f32>) {
    let classes = LABELS.len();
    let group_count = groups.iter().max().map_or(1, |g| g + 1);
    let mut weight = vec![0.0_f32; classes * dim];
    let mut bias = vec![0.0_f32; classes * group_count];
    let (mut adam_weight, mut adam_bias) = (super::Adam::new(weight.len()), super::Adam::new(bias.len()));
    let n = rows.len().max(1) as f32;
    for step in 1..=options.steps {
        let mut grad_weight = vec![0.0_f32; weight.len()];
        let mut grad_bias = vec![0.0_f32; bias.len()];
        for ((x, target), group) in rows.iter().zip(targets).zip(groups) {
            let offset = group * classes;
            let mut logits = [0.0_f32; 3];
            for (class, logit) in logits.iter_mut().enumerate() {
                *logit = bias[offset + class]
                    + weight[class * dim..(class + 1) * dim]
                        .iter()
                        .zip(x.iter())
                        .map(|(w, x)| w * x)
                        .sum::<f32>();
            }
            let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps = logits.map(|l| (l - top).exp());
            let total: f32 = exps.iter().sum();
            for class in 0..classes {
                let error = (exps[class] / total - target[class]) / n;
                for (g, x) in grad_weight[class * dim..(class + 1) * dim].iter_mut().zip(x.iter()) {
                    *g += error * x;
                }
                grad_bias[offset + class] += error;
            }
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
        let t = step as i32;
        adam_weight.step(&mut weight, &grad_weight, options.learning_rate, l2, t);
        adam_bias.step(&mut bias, &grad_bias, options.learning_rate, 0.0, t);
    }
    let mut served = vec![0.0_f32; classes];
    for group in groups {
        for class in 0..classes {
            served[class] += bias[group * classes + class] / n;
        }
    }
    (weight, served)
}

/// Everything `routellm train bert` does: read, label, split, embed, fit the grid, validate, write.
pub fn train_bert(
    files: &[PathBuf],
    encoder: &Arc<dyn Embedder>,
    options: &BertOptions,
    out: &Path,
    command: &str,
) -> Result<BertManifest, Error> {
    let (data, train) = super::read_split(files, 0, &options.split)?;
    let pairs = validation::candidate_pairs(&options.split.strong, &options.split.weak);
    let targets = labels(&data, &pairs);
    let training: Vec<usize> = (0..data.prompts.len())
        .filter(|p| train[*p] && targets[*p].is_some())
        .collect();
    if training.is_empty() {
        return Err(Error::invalid(format!(
            "no training prompt compares `{}` with `{}`; choose --strong/--weak among: {}",
            options.split.strong,
            options.split.weak,
            data.models.join(", ")
        )));
    }
    eprintln!(
        "{} prompts, {} labelled for training",
        data.prompts.len(),
        training.len()
    );
    let embeddings = super::embed_all(
        encoder.as_ref(),
        &data.prompts,
        options.split.embedding_cache.as_deref(),
    )?;
    let dim = encoder.dim();
    let (mean, std) = super::column_stats(training.iter().map(|p| embeddings[*p].as_slice()), dim);
    let standardised: Vec<Vec<f32>> = embeddings
        .iter()
        .map(|row| row.iter().zip(&mean).zip(&std).map(|((x, m), s)| (x - m) / s).collect())
        .collect();
    let rows: Vec<&[f32]> = training.iter().map(|p| standardised[*p].as_slice()).collect();
    let train_targets: Vec<[f32; 3]> = training.iter().filter_map(|p| targets[*p]).collect();
    let groups: Vec<usize> = training
        .iter()
        .map(|p| {
            if options.per_source_bias {
                data.prompt_source[*p]
            } else {
                0
            }
        })
        .collect();
    let sets = validation::held_out_sets(&data, &train, &pairs);
    let mut grid = Vec::new();
    let mut best: Option<(f64, BertHead, serde_json::Value)> = None;
    for &l2 in &options.l2_grid {
        let (weight, bias) = fit(&rows, &train_targets, &groups, dim, l2, options);
        let head = BertHead {
            weight,
            bias,
            mean: mean.clone(),
            std: std.clone(),
        };
        let report = validation::report_all(&data, &sets, &|prompt, _, _| {
            Ok(head.probabilities(&embeddings[prompt])[0])
        })?;
        let score = validation::mean_apgr(&report);
        eprintln!("l2 {l2}: mean validation APGR {score:.4}");
        grid.push(serde_json::json!({"l2": l2, "mean_apgr": score}));
        if best.as_ref().is_none_or(|(top, _, _)| score > *top) {
            best = Some((score, head, serde_json::to_value(&report).unwrap_or_default()));
        }
    }
    let Some((_, head, report)) = best else {
        return Err(Error::invalid("--l2 needs at least one value"));
    };
    let manifest = BertManifest {
        router: "bert".into(),
        encoder: encoder.id().to_owned(),
        labels: LABELS.iter().map(|l| (*l).to_owned()).collect(),
        encoder_training: "frozen".into(),
        hyperparameters: serde_json::to_value(options).unwrap_or_default(),
        data: serde_json::to_value(&data.files).unwrap_or_default(),
        validation: serde_json::json!({"per_source": report, "l2_grid": grid}),
        command: command.to_owned(),
    };
    head.save(out, &manifest)
        .map_err(|error| Error::Internal(error.to_string()))?;
    Ok(manifest)
}
