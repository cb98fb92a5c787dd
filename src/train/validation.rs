//! Routing quality on held-out prompts, the same way for every router: for each correctness
//! source, APGR of the router's scores for the source's own strong/weak pair beside the
//! prompt-length baseline on the same prompts.

use std::collections::BTreeMap;

use super::data::Dataset;
use crate::Error;
use crate::eval::metrics::{self, Outcome};

/// The pairs a source may be validated on, first match wins: the router's own pair, then
/// the closest pair in sources without it (MMLU-Pro has gpt-4o, not gpt-4-1106).
#[must_use]
pub fn candidate_pairs<'a>(strong: &'a str, weak: &'a str) -> [(&'a str, &'a str); 2] {
    [(strong, weak), ("gpt-4o-2024-05-13", weak)]
}

/// One source's held-out prompts with both models of its pair, and that pair.
pub struct HeldOut {
    pub source: String,
    pub prompts: Vec<usize>,
    pub strong: usize,
    pub weak: usize,
}

/// Per correctness source, the held-out prompts (`!train`) scored with both models of the
/// first pair in `pairs` the source has.
#[must_use]
pub fn held_out_sets(data: &Dataset, train: &[bool], pairs: &[(&str, &str)]) -> Vec<HeldOut> {
    let mut sets = Vec::new();
    for (file_number, file) in data.files.iter().enumerate() {
        let held_out: Vec<usize> = (0..data.prompts.len())
            .filter(|p| data.prompt_source[*p] == file_number && !train[*p] && data.correctness.contains_key(p))
            .collect();
        let has = |p: &usize, s: usize, w: usize| {
            data.correctness[p].contains_key(&s) && data.correctness[p].contains_key(&w)
        };
        let Some((strong, weak)) = pairs.iter().find_map(|(s, w)| {
            let (s, w) = (data.model(s)?, data.model(w)?);
            held_out.iter().any(|p| has(p, s, w)).then_some((s, w))
        }) else {
            continue;
        };
        sets.push(HeldOut {
            source: file.name.clone(),
            prompts: held_out.into_iter().filter(|p| has(p, strong, weak)).collect(),
            strong,
            weak,
        });
    }
    sets
}

/// APGR of `scores` (one per prompt of `set`), and of prompt length, with score quantiles
/// so a router that barely varies (a flat prior) shows as such.
#[must_use]
pub fn report(data: &Dataset, set: &HeldOut, scores: &[f64]) -> serde_json::Value {
    let outcomes: Vec<Outcome> = set
        .prompts
        .iter()
        .map(|p| {
            Outcome::single(
                f64::from(data.correctness[p][&set.strong]),
                f64::from(data.correctness[p][&set.weak]),
            )
        })
        .collect();
    #[allow(clippy::cast_precision_loss)]
    let length_scores: Vec<f64> = set
        .prompts
        .iter()
        .map(|p| data.prompts[*p].chars().count() as f64)
        .collect();
    let (weak_score, strong_score) = (
        metrics::model_score(&outcomes, false, 100.0),
        metrics::model_score(&outcomes, true, 100.0),
    );
    let apgr = |scores: &[f64]| {
        if (strong_score - weak_score).abs() < 1e-9 {
            return f64::NAN;
        }
        metrics::apgr(&metrics::curve(scores, &outcomes, 10, 100.0), weak_score, strong_score)
    };
    let mut sorted = scores.to_vec();
    sorted.sort_by(f64::total_cmp);
    let quantile = |q: f64| metrics::numpy_percentile(&sorted, q);
    serde_json::json!({
        "held_out_prompts": set.prompts.len(),
        "pair": [data.models[set.strong], data.models[set.weak]],
        "strong_score": strong_score,
        "weak_score": weak_score,
        "apgr": apgr(scores),
        "length_apgr": apgr(&length_scores),
        "score_p5_p50_p95": [quantile(5.0), quantile(50.0), quantile(95.0)],
    })
}

/// [`report`] for every held-out set, scoring each prompt with `score(prompt, strong, weak)`.
pub fn report_all(
    data: &Dataset,
    sets: &[HeldOut],
    score: &(dyn Fn(usize, usize, usize) -> Result<f64, Error> + Sync),
) -> Result<BTreeMap<String, serde_json::Value>, Error> {
    let mut reports = BTreeMap::new();
    for set in sets {
        let progress = crate::progress::Progress::new(format!("validating on {}", set.source), set.prompts.len());
        let scores = crate::scoring::parallel_map(&set.prompts, &progress, |_, p| score(*p, set.strong, set.weak))?;
        reports.insert(set.source.clone(), report(data, set, &scores));
    }
    Ok(reports)
}

/// The mean APGR over sources whose two models differ by at least 5 points (below that,
/// APGR divides by a gap smaller than its noise): the one number choices are made on.
#[must_use]
pub fn mean_apgr(reports: &BTreeMap<String, serde_json::Value>) -> f64 {
    let values: Vec<f64> = reports
        .values()
        .filter(|report| {
            let gap = report["strong_score"].as_f64().unwrap_or(0.0) - report["weak_score"].as_f64().unwrap_or(0.0);
            gap.abs() >= 5.0
        })
        .filter_map(|report| report["apgr"].as_f64())
        .filter(|apgr| apgr.is_finite())
        .collect();
    #[allow(clippy::cast_precision_loss)]
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    mean
}
