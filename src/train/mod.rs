//! `routellm train mf`: RouteLLM's matrix factorisation fitted on pairwise battles (and
//! battles derived from correctness), seeded and reproducible, with a validation split
//! on which every choice is measured and reported in the artifact's manifest.

pub mod bert;
pub mod data;
pub mod sw_ranking;
pub mod validation;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::embed::Embedder;
use crate::error::Error;
use crate::features;
use crate::progress::Progress;
use crate::rng::SplitMix;
use crate::routers::mf::{MfManifest, MfWeights};
use data::{Battle, Dataset};

/// What every trainer shares: the train/validation split, the pair scored by default and
/// where slow embedders' outputs are cached. Also the `train` commands' flags.
#[derive(Debug, Clone, serde::Serialize, clap::Args)]
pub struct SplitOptions {
    /// Share of prompts held out for validation (by a seeded hash of the text).
    #[arg(long, default_value_t = 0.2)]
    pub validation_fraction: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The default strong identity to score. [default: the pair of a file from `routellm
    /// label`, else gpt-4-1106-preview]
    #[arg(long, default_value = DEFAULT_STRONG, hide_default_value = true)]
    pub strong: String,
    /// The default weak identity to score. [default: the pair of a file from `routellm
    /// label`, else mixtral-8x7b-instruct-v0.1]
    #[arg(long, default_value = DEFAULT_WEAK, hide_default_value = true)]
    pub weak: String,
    /// Hold one source (file stem) out of training entirely and validate on it: the closest
    /// proxy here for prompts from an unseen distribution.
    #[arg(long)]
    pub holdout_source: Option<String>,
    /// Folder caching slow embedders' outputs between runs (default ~/.cache/routellm/embeddings;
    /// the static embedder is never cached: recomputing is faster than reading).
    #[arg(long)]
    #[serde(skip)]
    pub embedding_cache: Option<PathBuf>,
}

/// The identities scored by default: the public training data's closest pair to RouteLLM's.
pub const DEFAULT_STRONG: &str = "gpt-4-1106-preview";
pub const DEFAULT_WEAK: &str = "mixtral-8x7b-instruct-v0.1";

impl SplitOptions {
    /// These options scoring the pair that `files` were labelled for by `routellm label`,
    /// when they hold one such pair and no other identities were asked for: a router
    /// trained on a team's labels should serve that team's two models.
    pub fn for_labelled_pair(mut self, files: &[PathBuf]) -> Result<Self, Error> {
        if self.strong == DEFAULT_STRONG
            && self.weak == DEFAULT_WEAK
            && let Some((strong, weak)) = data::labelled_pair(files)?
        {
            eprintln!("scoring the labelled pair by default: --strong {strong} --weak {weak}");
            self.strong = strong;
            self.weak = weak;
        }
        Ok(self)
    }

    /// These options with the embedding cache at its default place unless one is named.
    #[must_use]
    pub fn caching_by_default(mut self) -> Self {
        self.embedding_cache = self.embedding_cache.or_else(default_embedding_cache);
        self
    }
}

impl Default for SplitOptions {
    fn default() -> Self {
        Self {
            validation_fraction: 0.2,
            seed: 42,
            strong: DEFAULT_STRONG.into(),
            weak: DEFAULT_WEAK.into(),
            holdout_source: None,
            embedding_cache: None,
        }
    }
}

/// Training settings; defaults are the shipped artifact's.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MfOptions {
    pub hidden: usize,
    pub epochs: usize,
    pub learning_rate: f32,
    pub weight_decay: f32,
    pub batch_prompts: usize,
    pub max_pairs: usize,
    /// Whether the prompt embedding is part of the representation (else features only).
    pub use_embedding: bool,
    #[serde(flatten)]
    pub split: SplitOptions,
}

impl Default for MfOptions {
    fn default() -> Self {
        Self {
            hidden: 64,
            epochs: 30,
            learning_rate: 3e-3,
            weight_decay: 1e-4,
            batch_prompts: 64,
            max_pairs: 32,
            use_embedding: true,
            split: SplitOptions::default(),
        }
    }
}

/// The representation of every prompt: embedding then features, with the mean and
/// standard deviation (over training prompts) used to standardise them.
pub struct Representations {
    pub rows: Vec<Vec<f32>>,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// Every prompt's embedding, computed on all cores, or read from `cache` (a folder) when
/// the same embedder already embedded the same prompts there: MiniLM takes minutes over the
/// training prompts, and experiments repeat it.
pub fn embed_all(embedder: &dyn Embedder, prompts: &[String], cache: Option<&Path>) -> Result<Vec<Vec<f32>>, Error> {
    let key = prompts.iter().fold(crate::rng::FNV_OFFSET, |hash, prompt| {
        crate::rng::fnv1a(crate::rng::fnv1a(hash, prompt.as_bytes()), &[0])
    });
    let file = cache.map(|dir| {
        let id: String = embedder
            .id()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        dir.join(format!("{id}-{}-{key:016x}.safetensors", prompts.len()))
    });
    if let Some(file) = file.as_deref().filter(|file| file.is_file()) {
        let loaded = crate::artifact::Loaded::read(file).map_err(Error::Internal)?;
        let (values, shape) = loaded.tensor("embeddings").map_err(Error::Internal)?;
        if shape == [prompts.len(), embedder.dim()] {
            eprintln!("embeddings read from {}", file.display());
            return Ok(values
                .chunks_exact(embedder.dim().max(1))
                .map(<[f32]>::to_vec)
                .collect());
        }
    }
    let progress = Progress::new("embedding training prompts", prompts.len());
    let rows = if embedder.batch_size() > 1 {
        crate::scoring::batched_map(prompts, embedder.batch_size(), &progress, |texts| {
            embedder.embed_many(texts).map_err(|e| Error::Internal(e.to_string()))
        })?
    } else {
        crate::scoring::parallel_map(prompts, &progress, |_, prompt| {
            embedder.embed(prompt).map_err(|e| Error::Internal(e.to_string()))
        })?
    };
    if let Some(file) = file {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let written = file
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                crate::artifact::write(
                    &file,
                    &[crate::artifact::Tensor::f32(
                        "embeddings",
                        &flat,
                        vec![rows.len(), embedder.dim()],
                    )],
                )
            });
        // A cache that cannot be written only costs time next run.
        if let Err(error) = written {
            eprintln!("embedding cache not written: {error}");
        }
    }
    Ok(rows)
}

/// The default embedding cache folder: `$XDG_CACHE_HOME/routellm/embeddings` or `~/.cache/...`.
#[must_use]
pub fn default_embedding_cache() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("routellm").join("embeddings"))
}

/// Appends the prompt features to each embedding (or uses features alone) and standardises
/// with training-split statistics.
pub fn represent(
    embeddings: Option<Vec<Vec<f32>>>,
    prompts: &[String],
    is_train: &[bool],
) -> Result<Representations, Error> {
    let mut rows: Vec<Vec<f32>> = match embeddings {
        Some(embeddings) => embeddings,
        None => vec![Vec::new(); prompts.len()],
    };
    for (row, prompt) in rows.iter_mut().zip(prompts) {
        row.extend_from_slice(&features::extract(prompt));
    }
    let width = rows.first().map_or(0, Vec::len);
    let (mean_f32, std) = column_stats(
        rows.iter()
            .zip(is_train)
            .filter(|(_, train)| **train)
            .map(|(row, _)| row.as_slice()),
        width,
    );
    for row in &mut rows {
        crate::routers::mf::standardize(row, &mean_f32, &std);
    }
    Ok(Representations {
        rows,
        mean: mean_f32,
        std,
    })
}

/// Column means and standard deviations over `rows`, for standardising inputs.
pub(crate) fn column_stats<'a>(rows: impl Iterator<Item = &'a [f32]>, dim: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut sum, mut square, mut count) = (vec![0.0_f64; dim], vec![0.0_f64; dim], 0.0_f64);
    for row in rows {
        count += 1.0;
        for ((s, q), x) in sum.iter_mut().zip(square.iter_mut()).zip(row) {
            *s += f64::from(*x);
            *q += f64::from(*x) * f64::from(*x);
        }
    }
    let count = count.max(1.0);
    #[allow(clippy::cast_possible_truncation)]
    let mean: Vec<f32> = sum.iter().map(|s| (s / count) as f32).collect();
    #[allow(clippy::cast_possible_truncation)]
    let std: Vec<f32> = sum
        .iter()
        .zip(&square)
        .map(|(s, q)| {
            let deviation = (q / count - (s / count).powi(2)).max(0.0).sqrt();
            // A value that never varied in training carries no information; scaling it by a
            // tiny deviation would turn any new value into an enormous input.
            if deviation < 1e-6 { 1.0 } else { deviation as f32 }
        })
        .collect();
    (mean, std)
}

/// Adam with bias correction and decoupled-from-nothing L2 (`decay` is added to the gradient).
pub(crate) struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Adam {
    pub(crate) fn new(size: usize) -> Self {
        Self {
            m: vec![0.0; size],
            v: vec![0.0; size],
        }
    }

    pub(crate) fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32, decay: f32, t: i32) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        let c1 = 1.0 - B1.powi(t);
        let c2 = 1.0 - B2.powi(t);
        for i in 0..params.len() {
            let g = grads[i] + decay * params[i];
            self.m[i] = B1 * self.m[i] + (1.0 - B1) * g;
            self.v[i] = B2 * self.v[i] + (1.0 - B2) * g * g;
            params[i] -= lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + 1e-8);
        }
    }
}

fn normal(rng: &mut SplitMix, scale: f32) -> f32 {
    // Shifted by half an ulp of 1 into (0, 1], so the logarithm is finite.
    let u1 = rng.next_unit() + f64::EPSILON / 2.0;
    let u2 = rng.next_unit();
    #[allow(clippy::cast_possible_truncation)]
    let z = ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32;
    z * scale
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Mean log-loss and accuracy of `weights` on `battles`.
fn battle_metrics(weights: &MfWeights, rows: &[Vec<f32>], battles: &[&Battle]) -> (f64, f64) {
    if battles.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut pairs: BTreeMap<(usize, usize), Vec<f32>> = BTreeMap::new();
    let (mut loss, mut correct) = (0.0_f64, 0.0_f64);
    for battle in battles {
        let v = pairs
            .entry((battle.a, battle.b))
            .or_insert_with(|| weights.pair_vector(battle.a, battle.b));
        let z: f32 = rows[battle.prompt].iter().zip(v.iter()).map(|(x, w)| x * w).sum();
        let p = f64::from(sigmoid(z)).clamp(1e-7, 1.0 - 1e-7);
        let y = f64::from(battle.label);
        loss -= y * p.ln() + (1.0 - y) * (1.0 - p).ln();
        if (p >= 0.5) == (y >= 0.5) {
            correct += 1.0;
        }
    }
    #[allow(clippy::cast_precision_loss)]
    let n = battles.len() as f64;
    (loss / n, correct / n)
}

/// Gradients of the mean battle log-loss over the battles of `batch`'s prompts, for the
/// projection, the classifier and the (unnormalised) model embeddings.
#[allow(clippy::many_single_char_names)] // the model's notation: u = W x, g = dL/dz, d = p̂_a − p̂_b
fn batch_gradients(
    weights: &MfWeights,
    data: &Dataset,
    reps: &Representations,
    by_prompt: &[Vec<usize>],
    batch: &[usize],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (hidden, input) = (weights.hidden, weights.input);
    let models = data.models.len();
    let mut grad_w = vec![0.0_f32; weights.projection.len()];
    let mut grad_c = vec![0.0_f32; hidden];
    let mut grad_unit = vec![0.0_f32; weights.model_embeddings.len()];
    let units: Vec<Vec<f32>> = (0..models).map(|m| weights.unit_model(m)).collect();
    let battles_in_batch: usize = batch.iter().map(|p| by_prompt[*p].len()).sum();
    #[allow(clippy::cast_precision_loss)]
    let scale = 1.0 / battles_in_batch.max(1) as f32;
    for &prompt in batch {
        let x = &reps.rows[prompt];
        let u: Vec<f32> = (0..hidden)
            .map(|k| {
                weights.projection[k * input..(k + 1) * input]
                    .iter()
                    .zip(x)
                    .map(|(w, v)| w * v)
                    .sum()
            })
            .collect();
        let mut grad_u = vec![0.0_f32; hidden];
        for &index in &by_prompt[prompt] {
            let battle = &data.battles[index];
            let (pa, pb) = (&units[battle.a], &units[battle.b]);
            let z: f32 = (0..hidden)
                .map(|k| weights.classifier[k] * (pa[k] - pb[k]) * u[k])
                .sum();
            let g = (sigmoid(z) - battle.label) * scale;
            for k in 0..hidden {
                let d = pa[k] - pb[k];
                grad_c[k] += g * d * u[k];
                grad_u[k] += g * weights.classifier[k] * d;
                let through = g * weights.classifier[k] * u[k];
                grad_unit[battle.a * hidden + k] += through;
                grad_unit[battle.b * hidden + k] -= through;
            }
        }
        for k in 0..hidden {
            if grad_u[k] != 0.0 {
                for (gw, v) in grad_w[k * input..(k + 1) * input].iter_mut().zip(x) {
                    *gw += grad_u[k] * v;
                }
            }
        }
    }
    // Back through the normalisation p̂ = p / |p|: (I − p̂p̂ᵀ) g / |p|.
    let mut grad_p = vec![0.0_f32; weights.model_embeddings.len()];
    for m in 0..models {
        let row = &weights.model_embeddings[m * hidden..(m + 1) * hidden];
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        let g = &grad_unit[m * hidden..(m + 1) * hidden];
        let along: f32 = g.iter().zip(&units[m]).map(|(a, b)| a * b).sum();
        for k in 0..hidden {
            grad_p[m * hidden + k] = (g[k] - along * units[m][k]) / norm;
        }
    }
    (grad_w, grad_c, grad_p)
}

/// Fits the MF model on the training split; returns weights and the per-epoch history.
#[must_use]
pub fn fit(
    data: &Dataset,
    reps: &Representations,
    train: &[bool],
    options: &MfOptions,
) -> (MfWeights, Vec<serde_json::Value>) {
    let input = reps.mean.len();
    let hidden = options.hidden;
    let models = data.models.len();
    let mut rng = SplitMix::new(options.split.seed);
    #[allow(clippy::cast_precision_loss)]
    let projection_scale = 1.0 / (input as f32).sqrt();
    let mut weights = MfWeights {
        projection: (0..hidden * input)
            .map(|_| normal(&mut rng, projection_scale))
            .collect(),
        classifier: (0..hidden).map(|_| normal(&mut rng, 0.1)).collect(),
        model_embeddings: (0..models * hidden).map(|_| normal(&mut rng, 1.0)).collect(),
        feature_mean: reps.mean.clone(),
        feature_std: reps.std.clone(),
        hidden,
        input,
    };
    let mut by_prompt: Vec<Vec<usize>> = vec![Vec::new(); data.prompts.len()];
    for (index, battle) in data.battles.iter().enumerate() {
        if train[battle.prompt] {
            by_prompt[battle.prompt].push(index);
        }
    }
    let mut order: Vec<usize> = (0..data.prompts.len()).filter(|p| !by_prompt[*p].is_empty()).collect();
    let validation: Vec<&Battle> = data.battles.iter().filter(|b| !train[b.prompt]).collect();
    let (mut adam_w, mut adam_c, mut adam_p) = (
        Adam::new(weights.projection.len()),
        Adam::new(hidden),
        Adam::new(weights.model_embeddings.len()),
    );
    let progress = Progress::new("training mf (epochs)", options.epochs);
    let mut history = Vec::new();
    let mut step = 0_i32;
    for epoch in 0..options.epochs {
        for slot in 0..order.len() {
            let pick = slot + rng.below(order.len() - slot);
            order.swap(slot, pick);
        }
        for batch in order.chunks(options.batch_prompts.max(1)) {
            let (grad_w, grad_c, grad_p) = batch_gradients(&weights, data, reps, &by_prompt, batch);
            step += 1;
            adam_w.step(
                &mut weights.projection,
                &grad_w,
                options.learning_rate,
                options.weight_decay,
                step,
            );
            adam_c.step(&mut weights.classifier, &grad_c, options.learning_rate, 0.0, step);
            adam_p.step(&mut weights.model_embeddings, &grad_p, options.learning_rate, 0.0, step);
        }
        let (loss, accuracy) = battle_metrics(&weights, &reps.rows, &validation);
        history.push(
            serde_json::json!({"epoch": epoch + 1, "validation_log_loss": loss, "validation_accuracy": accuracy}),
        );
        progress.advance(1);
    }
    (weights, history)
}

/// Routing quality on held-out prompts: APGR per source whose prompts have outcomes for the
/// pair (see [`validation`]), and log-loss and accuracy on held-out battles of battle-only
/// sources.
pub fn validation_report(
    data: &Dataset,
    reps: &Representations,
    train: &[bool],
    weights: &MfWeights,
    pairs: &[(&str, &str)],
) -> Result<BTreeMap<String, serde_json::Value>, Error> {
    let sets = validation::held_out_sets(data, train, pairs);
    let mut report = validation::report_all(data, &sets, &|prompt, strong, weak| {
        let v = weights.pair_vector(strong, weak);
        Ok(f64::from(
            reps.rows[prompt].iter().zip(&v).map(|(x, w)| x * w).sum::<f32>(),
        ))
    })?;
    for (file_number, file) in data.files.iter().enumerate() {
        let battles: Vec<&Battle> = data
            .battles
            .iter()
            .filter(|b| {
                data.prompt_source[b.prompt] == file_number
                    && !train[b.prompt]
                    && !data.correctness.contains_key(&b.prompt)
            })
            .collect();
        if !battles.is_empty() {
            let (loss, accuracy) = battle_metrics(weights, &reps.rows, &battles);
            let entry = report.entry(file.name.clone()).or_insert_with(|| serde_json::json!({}));
            entry["held_out_battles"] = serde_json::json!(battles.len());
            entry["log_loss"] = serde_json::json!(loss);
            entry["accuracy"] = serde_json::json!(accuracy);
        }
    }
    Ok(report)
}

/// What every trainer starts with: refuse evaluation data, read `files` (correctness rows
/// sampled into at most `max_pairs` battles each), and mark the training prompts — not in
/// the seeded validation split, not from the held-out source.
pub fn read_split(files: &[PathBuf], max_pairs: usize, split: &SplitOptions) -> Result<(Dataset, Vec<bool>), Error> {
    let seed = split.seed;
    if let Some(path) = files.iter().find(|path| data::is_eval_data(path)) {
        return Err(Error::invalid(format!(
            "{} is evaluation data: training on it would make eval numbers meaningless",
            path.display()
        )));
    }
    let data = Dataset::read(files, max_pairs, seed)?;
    let held_out_file = held_out_source(&data, split.holdout_source.as_deref())?;
    let train = (0..data.prompts.len())
        .map(|p| {
            Some(data.prompt_source[p]) != held_out_file && !data.is_validation(p, split.validation_fraction, seed)
        })
        .collect();
    Ok((data, train))
}

/// The index of the source named `name` (a file stem), which training leaves out entirely.
fn held_out_source(data: &Dataset, name: Option<&str>) -> Result<Option<usize>, Error> {
    name.map(|name| {
        data.files.iter().position(|file| file.name == name).ok_or_else(|| {
            Error::invalid(format!(
                "--holdout-source {name}: no such source; sources: {}",
                data.files
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    })
    .transpose()
}

/// Everything `routellm train mf` does: read, split, embed, fit, validate, write.
pub fn train_mf(
    files: &[PathBuf],
    embedder: &Arc<dyn Embedder>,
    embedder_kind: &str,
    options: &MfOptions,
    out: &std::path::Path,
    command: &str,
) -> Result<MfManifest, Error> {
    let (data, train) = read_split(files, options.max_pairs, &options.split)?;
    // Before any fitting: a long MiniLM run should not end in this.
    if data.model(&options.split.strong).is_none() || data.model(&options.split.weak).is_none() {
        return Err(Error::invalid(format!(
            "the training data has no model `{}` or `{}`; choose --strong/--weak among: {}",
            options.split.strong,
            options.split.weak,
            data.models.join(", ")
        )));
    }
    if data.battles.is_empty() {
        return Err(Error::invalid(
            "the training files yield no battles (no prompt where one model won and another lost)",
        ));
    }
    eprintln!(
        "{} prompts ({} for training), {} battles, {} models",
        data.prompts.len(),
        train.iter().filter(|t| **t).count(),
        data.battles.len(),
        data.models.len()
    );
    let embeddings = if options.use_embedding {
        Some(embed_all(
            embedder.as_ref(),
            &data.prompts,
            options.split.embedding_cache.as_deref(),
        )?)
    } else {
        None
    };
    let reps = represent(embeddings, &data.prompts, &train)?;
    let (weights, history) = fit(&data, &reps, &train, options);
    let pairs = validation::candidate_pairs(&options.split.strong, &options.split.weak);
    let validation = validation_report(&data, &reps, &train, &weights, &pairs)?;
    for (source, metrics) in &validation {
        eprintln!("validation {source}: {metrics}");
    }
    let manifest = MfManifest {
        router: "mf".into(),
        embedder: embedder.id().to_owned(),
        embedder_kind: embedder_kind.to_owned(),
        models: data.models.clone(),
        default_strong: data::canonical_model(&options.split.strong),
        default_weak: data::canonical_model(&options.split.weak),
        features: features::NAMES.iter().map(|name| (*name).to_owned()).collect(),
        uses_embedding: options.use_embedding,
        hyperparameters: serde_json::to_value(options).unwrap_or_default(),
        data: serde_json::to_value(&data.files).unwrap_or_default(),
        validation: serde_json::json!({"per_source": validation, "history": history}),
        command: command.to_owned(),
    };
    weights
        .save(out, &manifest)
        .map_err(|error| Error::Internal(error.to_string()))?;
    Ok(manifest)
}
