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
use crate::embed::{Embedder, MiniLm, TrainableLayer};
use crate::error::Error;
use crate::features;
use crate::routers::bert::{BertHead, BertManifest, LABELS};

/// Settings; defaults are the shipped artifact's.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BertOptions {
    /// L2 strengths tried; the best mean validation APGR wins.
    pub l2_grid: Vec<f32>,
    pub steps: usize,
    pub learning_rate: f32,
    /// One bias per training source (see `fit`).
    pub per_source_bias: bool,
    /// Feed the head the prompt features (`src/features.rs`) beside the encoder output.
    pub features: bool,
    /// Epochs of fine-tuning the encoder's top layer with the head after the head alone is
    /// fitted (0: the encoder stays frozen). The epoch with the best validation APGR is
    /// kept, and ships only if it beats the frozen encoder on validation.
    pub fine_tune_epochs: usize,
    /// Adam's step size for the top layer (the head takes ten times that).
    pub fine_tune_learning_rate: f32,
    /// Prompts per fine-tuning step.
    pub fine_tune_batch: usize,
    /// Bytes the fine-tune may hold as encoder states (every training and validation token's
    /// 384 values); over it, training stops before computing them. Not a hyperparameter: it
    /// changes whether training runs, never what it writes.
    #[serde(skip)]
    pub fine_tune_memory_limit: usize,
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
            features: false,
            fine_tune_epochs: 0,
            fine_tune_learning_rate: 2e-5,
            fine_tune_batch: 16,
            fine_tune_memory_limit: 8 << 30,
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

/// The head's label probabilities for a standardised input `x`: a softmax over
/// `weight · x + bias` (`weight` is `labels x dim`, `bias` one group's).
fn label_probabilities(weight: &[f32], bias: &[f32], x: &[f32]) -> [f32; 3] {
    let dim = x.len();
    let mut logits = [0.0_f32; 3];
    for (class, logit) in logits.iter_mut().enumerate() {
        *logit = bias[class]
            + weight[class * dim..(class + 1) * dim]
                .iter()
                .zip(x)
                .map(|(w, x)| w * x)
                .sum::<f32>();
    }
    let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps = logits.map(|l| (l - top).exp());
    let total: f32 = exps.iter().sum();
    exps.map(|e| e / total)
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
            let probabilities = label_probabilities(&weight, &bias[offset..offset + classes], x);
            for class in 0..classes {
                let error = (probabilities[class] - target[class]) / n;
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
    (weight, served_bias(&bias, groups))
}

/// The bias served with per-source biases: their average over the training rows (`groups`
/// names each row's source). Only ranking matters for routing, and a constant keeps it.
#[allow(clippy::cast_precision_loss)]
fn served_bias(bias: &[f32], groups: &[usize]) -> Vec<f32> {
    let classes = LABELS.len();
    let n = groups.len().max(1) as f32;
    let mut served = vec![0.0_f32; classes];
    for group in groups {
        for class in 0..classes {
            served[class] += bias[group * classes + class] / n;
        }
    }
    served
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
    let embeddings = head_inputs(encoder.as_ref(), &data.prompts, options)?;
    let dim = embeddings.first().map_or(encoder.dim(), Vec::len);
    let (mean, std) = super::column_stats(training.iter().map(|p| embeddings[*p].as_slice()), dim);
    let standardised: Vec<Vec<f32>> = embeddings
        .iter()
        .map(|row| row.iter().zip(&mean).zip(&std).map(|((x, m), s)| (x - m) / s).collect())
        .collect();
    let rows: Vec<&[f32]> = training.iter().map(|p| standardised[*p].as_slice()).collect();
    let train_targets: Vec<[f32; 3]> = training.iter().filter_map(|p| targets[*p]).collect();
    let groups: Vec<usize> = (training.iter())
        .map(|p| {
            if options.per_source_bias {
                data.prompt_source[*p]
            } else {
                0
            }
        })
        .collect();
    let sets = validation::without_identities(validation::held_out_sets(&data, &train, &pairs));
    let mut grid = Vec::new();
    let mut best: Option<(f64, BertHead, serde_json::Value, f32)> = None;
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
        if best.as_ref().is_none_or(|(top, _, _, _)| score > *top) {
            best = Some((score, head, serde_json::to_value(&report).unwrap_or_default(), l2));
        }
    }
    let Some((frozen_score, head, report, l2)) = best else {
        return Err(Error::invalid("--l2 needs at least one value"));
    };
    let labelled = Labelled {
        data: &data,
        inputs: &embeddings,
        training: &training,
        targets: &train_targets,
        groups: &groups,
        sets: &sets,
    };
    let frozen = Chosen {
        encoder_training: crate::routers::bert::FROZEN.to_owned(),
        head,
        report,
        top_layer: Vec::new(),
        fine_tuning: serde_json::Value::Null,
    };
    let Chosen {
        encoder_training,
        head,
        report,
        top_layer,
        fine_tuning,
    } = fine_tune_if_better(&labelled, encoder.as_ref(), frozen, frozen_score, l2, options)?;
    let manifest = BertManifest {
        router: "bert".into(),
        encoder: encoder.id().to_owned(),
        labels: LABELS.iter().map(|l| (*l).to_owned()).collect(),
        encoder_training,
        features: (if options.features { &features::NAMES[..] } else { &[] })
            .iter()
            .map(|name| (*name).to_owned())
            .collect(),
        hyperparameters: serde_json::to_value(options).unwrap_or_default(),
        data: serde_json::to_value(&data.files).unwrap_or_default(),
        validation: serde_json::json!({"per_source": report, "l2_grid": grid, "fine_tuning": fine_tuning}),
        command: command.to_owned(),
    };
    head.save(out, &manifest, &top_layer)
        .map_err(|error| Error::Internal(error.to_string()))?;
    Ok(manifest)
}

/// The head's input for every prompt: the encoder output, then the prompt features when
/// asked for.
fn head_inputs(encoder: &dyn Embedder, prompts: &[String], options: &BertOptions) -> Result<Vec<Vec<f32>>, Error> {
    let mut inputs = super::embed_all(encoder, prompts, options.split.embedding_cache.as_deref())?;
    if options.features {
        for (row, prompt) in inputs.iter_mut().zip(prompts) {
            row.extend_from_slice(&features::extract(prompt));
        }
    }
    Ok(inputs)
}

/// What ships: the head, its encoder (frozen, or with a fine-tuned top layer) and their record.
struct Chosen {
    encoder_training: String,
    head: BertHead,
    report: serde_json::Value,
    top_layer: Vec<crate::embed::NamedTensor>,
    fine_tuning: serde_json::Value,
}

/// With `--fine-tune-epochs`, fine-tunes the top layer and the head and returns that when
/// it beats `frozen` (whose mean validation APGR is `frozen_score`) on validation.
fn fine_tune_if_better(
    labelled: &Labelled<'_>,
    encoder: &dyn Embedder,
    frozen: Chosen,
    frozen_score: f64,
    l2: f32,
    options: &BertOptions,
) -> Result<Chosen, Error> {
    if options.fine_tune_epochs == 0 {
        return Ok(frozen);
    }
    let minilm = encoder
        .as_minilm()
        .ok_or_else(|| Error::invalid("fine-tuning needs the MiniLM encoder"))?;
    let tuned = fine_tune(labelled, minilm, &frozen.head, l2, options)?;
    eprintln!(
        "fine-tuned top layer: best epoch {} with mean validation APGR {:.4} (frozen {frozen_score:.4})",
        tuned.epoch, tuned.score
    );
    let better = tuned.score > frozen_score;
    let fine_tuning = serde_json::json!({
        "frozen_mean_apgr": frozen_score,
        "epochs": tuned.history,
        "best_epoch": tuned.epoch,
        "shipped": better,
    });
    Ok(if better {
        Chosen {
            encoder_training: format!(
                "top layer fine-tuned with the head (epoch {} of {})",
                tuned.epoch, options.fine_tune_epochs
            ),
            head: tuned.head,
            report: tuned.report,
            top_layer: minilm.with_top_layer(&tuned.layer).top_layer_tensors(),
            fine_tuning,
        }
    } else {
        Chosen { fine_tuning, ..frozen }
    })
}

/// The training prompts with their targets and bias groups, and the validation sets.
struct Labelled<'a> {
    data: &'a Dataset,
    /// Every prompt's head input on the frozen encoder: what follows its first `hidden`
    /// values (the prompt features, if any) stays the same while the encoder is tuned.
    inputs: &'a [Vec<f32>],
    training: &'a [usize],
    targets: &'a [[f32; 3]],
    groups: &'a [usize],
    sets: &'a [validation::HeldOut],
}

/// The best epoch of a top-layer fine-tune.
struct FineTuned {
    layer: TrainableLayer,
    head: BertHead,
    epoch: usize,
    score: f64,
    report: serde_json::Value,
    history: Vec<serde_json::Value>,
}

/// Fine-tunes the encoder's top layer and the head together, starting from the head fitted
/// on the frozen encoder (a linear probe first, then fine-tuning: the head's gradients are
/// informative from the first step, so they do not scramble the pretrained features).
/// The states entering the top layer are computed once; every epoch runs the top layer
/// forward and backward over the training prompts, then scores the validation prompts.
#[allow(clippy::cast_precision_loss, clippy::too_many_lines)]
fn fine_tune(
    labelled: &Labelled<'_>,
    minilm: &MiniLm,
    frozen: &BertHead,
    l2: f32,
    options: &BertOptions,
) -> Result<FineTuned, Error> {
    let internal = |error: crate::embed::EmbedError| Error::Internal(error.to_string());
    let data = labelled.data;
    let hidden = minilm.hidden();
    // The head's input: the pooled output (`hidden` values), then any prompt features.
    let dim = frozen.dim();
    let classes = LABELS.len();
    let mut wanted: Vec<usize> = labelled.training.to_vec();
    wanted.extend(labelled.sets.iter().flat_map(|set| set.prompts.iter().copied()));
    wanted.sort_unstable();
    wanted.dedup();
    // The states are held in memory for every epoch: say so before spending minutes on them
    // if they cannot fit, rather than being killed by the kernel at the end.
    let texts: Vec<&str> = wanted.iter().map(|p| data.prompts[*p].as_str()).collect();
    let ids = minilm.token_ids(&texts).map_err(internal)?;
    let tokens: usize = ids.iter().map(Vec::len).sum();
    let bytes = tokens * hidden * std::mem::size_of::<f32>();
    #[allow(clippy::cast_precision_loss)]
    let gib = |bytes: usize| bytes as f64 / f64::from(1_u32 << 30);
    eprintln!(
        "{tokens} tokens in {} prompts: {:.1} GiB of states below the top layer",
        wanted.len(),
        gib(bytes)
    );
    if bytes > options.fine_tune_memory_limit {
        return Err(Error::invalid(format!(
            "fine-tuning would hold {:.1} GiB of encoder states in memory, over the {:.1} GiB limit: \
             raise --fine-tune-max-memory-gib if the machine has it, or train on fewer prompts",
            gib(bytes),
            gib(options.fine_tune_memory_limit)
        )));
    }
    let mut below: Vec<Vec<f32>> = vec![Vec::new(); data.prompts.len()];
    let progress = crate::progress::Progress::new("states below the top layer", wanted.len());
    for (chunk, chunk_ids) in wanted.chunks(16).zip(ids.chunks(16)) {
        for (p, states) in chunk.iter().zip(minilm.states_below_top(chunk_ids).map_err(internal)?) {
            below[*p] = states;
        }
        progress.advance(chunk.len());
    }
    let pack = |prompts: &[usize]| {
        let lengths: Vec<usize> = prompts.iter().map(|p| below[*p].len() / hidden).collect();
        let states: Vec<f32> = prompts.iter().flat_map(|p| below[*p].iter().copied()).collect();
        (states, lengths)
    };
    let group_count = labelled.groups.iter().max().map_or(1, |g| g + 1);
    let mut layer = minilm.top_layer().map_err(internal)?;
    let mut weight = frozen.weight.clone();
    let mut bias: Vec<f32> = (0..group_count).flat_map(|_| frozen.bias.iter().copied()).collect();
    let mut layer_adam: Vec<super::Adam> = layer
        .parameters_mut()
        .map_err(internal)?
        .iter()
        .map(|p| super::Adam::new(p.len()))
        .collect();
    let (mut weight_adam, mut bias_adam) = (super::Adam::new(weight.len()), super::Adam::new(bias.len()));
    let position: std::collections::HashMap<usize, usize> =
        labelled.training.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    let validated: Vec<usize> = labelled
        .sets
        .iter()
        .flat_map(|set| set.prompts.iter().copied())
        .collect();
    let mut rng = crate::rng::SplitMix::new(options.split.seed ^ 0x0b1e_55ed);
    let mut step = 0_i32;
    let mut best: Option<FineTuned> = None;
    let mut history = Vec::new();
    for epoch in 1..=options.fine_tune_epochs {
        let mut order = labelled.training.to_vec();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let progress = crate::progress::Progress::new(format!("fine-tuning, epoch {epoch}"), order.len());
        let mut loss_sum = 0.0_f64;
        for batch in order.chunks(options.fine_tune_batch.max(1)) {
            let (states, lengths) = pack(batch);
            let (output, trace) = layer.forward(&states, &lengths).map_err(internal)?;
            let mut d_output = vec![0.0_f32; output.len()];
            let (mut weight_gradient, mut bias_gradient) = (vec![0.0_f32; weight.len()], vec![0.0_f32; bias.len()]);
            let scale = 1.0 / batch.len() as f32;
            let mut first = 0;
            for (prompt, &length) in batch.iter().zip(&lengths) {
                let rows = first * hidden..(first + length) * hidden;
                first += length;
                let mut sum = vec![0.0_f32; hidden];
                for row in output[rows.clone()].chunks_exact(hidden) {
                    for (s, v) in sum.iter_mut().zip(row) {
                        *s += v;
                    }
                }
                let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                let unit: Vec<f32> = sum.iter().map(|v| v / norm).collect();
                let extra = &labelled.inputs[*prompt][hidden..];
                let standardised: Vec<f32> = unit
                    .iter()
                    .chain(extra)
                    .zip(&frozen.mean)
                    .zip(&frozen.std)
                    .map(|((x, m), s)| (x - m) / s)
                    .collect();
                let index = position[prompt];
                let (target, group) = (labelled.targets[index], labelled.groups[index]);
                let probabilities =
                    label_probabilities(&weight, &bias[group * classes..(group + 1) * classes], &standardised);
                let mut d_standardised = vec![0.0_f32; dim];
                for class in 0..classes {
                    let probability = probabilities[class];
                    loss_sum -= f64::from(target[class] * probability.max(1e-12).ln());
                    let error = (probability - target[class]) * scale;
                    let row = class * dim..(class + 1) * dim;
                    for ((g, x), (d, w)) in weight_gradient[row.clone()]
                        .iter_mut()
                        .zip(&standardised)
                        .zip(d_standardised.iter_mut().zip(&weight[row]))
                    {
                        *g += error * x;
                        *d += error * w;
                    }
                    bias_gradient[group * classes + class] += error;
                }
                // Through standardisation and normalisation: d sum = (d unit − unit·(unit·d unit)) / |sum|,
                // and every token's row adds to the sum.
                // The features are the prompt's own: only the encoder's part has a gradient to pass on.
                let d_unit: Vec<f32> = d_standardised[..hidden]
                    .iter()
                    .zip(&frozen.std)
                    .map(|(d, s)| d / s)
                    .collect();
                let along: f32 = d_unit.iter().zip(&unit).map(|(d, u)| d * u).sum();
                let d_sum: Vec<f32> = d_unit.iter().zip(&unit).map(|(d, u)| (d - u * along) / norm).collect();
                for row in d_output[rows].chunks_exact_mut(hidden) {
                    row.copy_from_slice(&d_sum);
                }
            }
            let gradient = layer.backward(&trace, &d_output).map_err(internal)?;
            step += 1;
            for ((parameters, adam), gradients) in layer
                .parameters_mut()
                .map_err(internal)?
                .into_iter()
                .zip(&mut layer_adam)
                .zip(&gradient.parts)
            {
                adam.step(parameters, gradients, options.fine_tune_learning_rate, 0.0, step);
            }
            let head_rate = options.fine_tune_learning_rate * 10.0;
            weight_adam.step(&mut weight, &weight_gradient, head_rate, l2, step);
            bias_adam.step(&mut bias, &bias_gradient, head_rate, 0.0, step);
            progress.advance(batch.len());
        }
        let mut embeddings: std::collections::HashMap<usize, Vec<f32>> = std::collections::HashMap::new();
        for chunk in validated.chunks(32) {
            let (states, lengths) = pack(chunk);
            let (output, _) = layer.forward(&states, &lengths).map_err(internal)?;
            let pooled = crate::embed::pool(&output, &lengths, hidden);
            embeddings.extend(chunk.iter().zip(pooled).map(|(&prompt, mut input)| {
                input.extend_from_slice(&labelled.inputs[prompt][hidden..]);
                (prompt, input)
            }));
        }
        let head = BertHead {
            weight: weight.clone(),
            bias: served_bias(&bias, labelled.groups),
            mean: frozen.mean.clone(),
            std: frozen.std.clone(),
        };
        let report = validation::report_all(data, labelled.sets, &|prompt, _, _| {
            let embedding = embeddings
                .get(&prompt)
                .ok_or_else(|| Error::Internal(format!("prompt {prompt} was not embedded")))?;
            Ok(head.probabilities(embedding)[0])
        })?;
        let score = validation::mean_apgr(&report);
        let loss = loss_sum / order.len().max(1) as f64;
        eprintln!("epoch {epoch}: training loss {loss:.4}, mean validation APGR {score:.4}");
        history
            .push(serde_json::json!({"epoch": epoch, "training_loss": loss, "mean_apgr": score, "per_source": report}));
        if best.as_ref().is_none_or(|best| score > best.score) {
            best = Some(FineTuned {
                layer: layer.clone(),
                head,
                epoch,
                score,
                report: serde_json::to_value(&report).unwrap_or_default(),
                history: Vec::new(),
            });
        }
    }
    let mut best = best.ok_or_else(|| Error::invalid("fine-tuning needs at least one epoch"))?;
    best.history = history;
    Ok(best)
}
