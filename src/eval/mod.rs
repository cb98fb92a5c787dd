//! `routellm eval`: routers measured on benchmarks with RouteLLM's metrics (APGR, AUC,
//! CPT), bootstrap confidence intervals, and the random and prompt-length baselines
//! always reported beside them.

pub mod benchmark;
pub mod metrics;
pub mod plot;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::Error;
use crate::routers::{self, RandomRouter};
use crate::scoring::score_all;
use benchmark::{Benchmark, BenchmarkKind};
use metrics::CurvePoint;

/// The baselines reported beside every evaluation.
pub const BASELINES: [&str; 2] = ["random", "length"];

/// What to evaluate and where to write it.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub routers: Vec<String>,
    pub benchmark: BenchmarkKind,
    pub data_dir: Option<PathBuf>,
    pub output: PathBuf,
    pub num_results: usize,
    pub random_iters: usize,
    pub bootstrap: usize,
    pub strong_model: Option<String>,
    pub weak_model: Option<String>,
    pub overwrite_cache: bool,
    pub seed: u64,
}

/// One router's results.
#[derive(Debug, Clone, Serialize)]
pub struct RouterReport {
    pub apgr: f64,
    pub apgr_ci95: Option<[f64; 2]>,
    pub auc: f64,
    /// Strong-call % needed to recover 20/50/80% of the quality gap (`null`: never reached).
    pub cpt: BTreeMap<String, Option<f64>>,
    pub curve: Vec<CurvePoint>,
}

/// One point of the oracle's curve.
#[derive(Debug, Clone, Serialize)]
pub struct OptimalPoint {
    pub strong_pct: f64,
    pub score: f64,
}

/// The whole evaluation, as written to `<name>.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub benchmark: String,
    pub strong_model: String,
    pub weak_model: String,
    pub strong_score: f64,
    pub weak_score: f64,
    pub n_prompts: usize,
    pub routers: BTreeMap<String, RouterReport>,
    pub optimal: Vec<OptimalPoint>,
}

/// Runs the evaluation, writes its files to `options.output` and returns the report.
pub fn run(options: &EvalOptions, config: &Config) -> Result<Report, Error> {
    if options.num_results < 1 {
        return Err(Error::invalid("--num-results must be at least 1"));
    }
    if options.random_iters < 1 {
        return Err(Error::invalid(
            "--random-iters must be at least 1 (the random baseline is always evaluated)",
        ));
    }
    let data_dir = match (&options.benchmark, &options.data_dir) {
        (BenchmarkKind::Generic(_), dir) => dir.clone().unwrap_or_default(),
        (_, Some(dir)) => dir.clone(),
        (kind, None) => {
            return Err(Error::invalid(format!(
                "--data-dir is required for {kind:?}: a folder laid out like RouteLLM's routellm/evals \
                 (e.g. ../shared/data/routellm)"
            )));
        }
    };
    let benchmark = benchmark::load(
        &options.benchmark,
        &data_dir,
        options.strong_model.as_deref(),
        options.weak_model.as_deref(),
    )?;
    eprintln!(
        "{}: {} prompts after decontamination ({} dropped)",
        benchmark.name,
        benchmark.prompts.len(),
        benchmark.dropped
    );
    std::fs::create_dir_all(&options.output).map_err(|error| Error::io(options.output.display().to_string(), error))?;

    let mut names: Vec<String> = Vec::new();
    for name in options.routers.iter().map(String::as_str).chain(BASELINES) {
        if !names.iter().any(|known| known == name) {
            names.push(name.to_owned());
        }
    }
    let weak_score = metrics::model_score(&benchmark.outcomes, false, benchmark.scale);
    let strong_score = metrics::model_score(&benchmark.outcomes, true, benchmark.scale);

    let mut reports = BTreeMap::new();
    let mut score_lines = String::new();
    for name in &names {
        let score_sets = router_scores(name, &benchmark, options, config)?;
        for (index, score) in score_sets[0].iter().enumerate() {
            score_lines.push_str(&serde_json::json!({"router": name, "index": index, "score": score}).to_string());
            score_lines.push('\n');
        }
        let report = evaluate_router(&score_sets, &benchmark, options, weak_score, strong_score);
        reports.insert(name.clone(), report);
    }

    let optimal: Vec<OptimalPoint> = metrics::optimal_curve(&benchmark.outcomes, benchmark.oracle, benchmark.scale)
        .into_iter()
        .map(|(strong_pct, score)| OptimalPoint { strong_pct, score })
        .collect();
    let report = Report {
        benchmark: benchmark.name.clone(),
        strong_model: benchmark.strong_model.clone(),
        weak_model: benchmark.weak_model.clone(),
        strong_score,
        weak_score,
        n_prompts: benchmark.prompts.len(),
        routers: reports,
        optimal,
    };
    write_outputs(&report, &names, &score_lines, &options.output)?;
    Ok(report)
}

/// Score vectors for `name`: one per random iteration, else one (cached when possible).
fn router_scores(
    name: &str,
    benchmark: &Benchmark,
    options: &EvalOptions,
    config: &Config,
) -> Result<Vec<Vec<f64>>, Error> {
    if name == "random" {
        let iterations = options.random_iters;
        return Ok((0..iterations)
            .map(|iteration| {
                let router = RandomRouter::with_seed(options.seed.wrapping_add(iteration as u64));
                benchmark.prompts.iter().map(|_| router.next_uniform()).collect()
            })
            .collect());
    }
    let router = routers::build(name, config).map_err(|cause| Error::router(name, cause))?;
    let cache_path = router.cache_key().map(|key| {
        (
            options
                .output
                .join(".cache")
                .join(&benchmark.name)
                .join(format!("{name}.json")),
            key,
        )
    });
    if let Some((path, key)) = &cache_path {
        if !options.overwrite_cache {
            if let Some(scores) = read_cache(path, key, &benchmark.prompts) {
                eprintln!("{name}: reusing cached scores from {}", path.display());
                return Ok(vec![scores]);
            }
        }
    }
    let scores = score_all(router.as_ref(), name, &benchmark.prompts)?;
    if let Some((path, key)) = &cache_path {
        write_cache(path, key, &benchmark.prompts, &scores)?;
    }
    Ok(vec![scores])
}

fn evaluate_router(
    score_sets: &[Vec<f64>],
    benchmark: &Benchmark,
    options: &EvalOptions,
    weak_score: f64,
    strong_score: f64,
) -> RouterReport {
    let curves: Vec<Vec<CurvePoint>> = score_sets
        .iter()
        .map(|scores| metrics::curve(scores, &benchmark.outcomes, options.num_results, benchmark.scale))
        .collect();
    let curve = metrics::mean_curve(&curves);
    let apgr = metrics::apgr(&curve, weak_score, strong_score);
    let ci = metrics::apgr_bootstrap_ci(
        score_sets,
        &benchmark.outcomes,
        options.num_results,
        options.bootstrap,
        options.seed,
    )
    .map(|(lo, hi)| [lo, hi]);
    let cpt = [("20", 0.2), ("50", 0.5), ("80", 0.8)]
        .into_iter()
        .map(|(key, fraction)| (key.to_owned(), metrics::cpt(&curve, weak_score, strong_score, fraction)))
        .collect();
    RouterReport {
        apgr,
        apgr_ci95: ci,
        auc: metrics::auc(&curve),
        cpt,
        curve,
    }
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    key: String,
    prompts_hash: String,
    scores: Vec<f64>,
}

/// FNV-1a over the prompts: detects any change to the benchmark's prompts or order.
fn prompts_hash(prompts: &[String]) -> String {
    // 0xff never occurs in UTF-8, so it separates prompts unambiguously.
    let hash = prompts.iter().fold(crate::rng::FNV_OFFSET, |hash, prompt| {
        crate::rng::fnv1a(crate::rng::fnv1a(hash, prompt.as_bytes()), &[0xff])
    });
    format!("{hash:016x}-{}", prompts.len())
}

fn read_cache(path: &Path, key: &str, prompts: &[String]) -> Option<Vec<f64>> {
    let text = std::fs::read_to_string(path).ok()?;
    let cache: CacheFile = serde_json::from_str(&text).ok()?;
    (cache.key == key && cache.prompts_hash == prompts_hash(prompts) && cache.scores.len() == prompts.len())
        .then_some(cache.scores)
}

fn write_cache(path: &Path, key: &str, prompts: &[String], scores: &[f64]) -> Result<(), Error> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|error| Error::io(parent.display().to_string(), error))?;
    }
    let cache = CacheFile {
        key: key.to_owned(),
        prompts_hash: prompts_hash(prompts),
        scores: scores.to_vec(),
    };
    let text = serde_json::to_string(&cache).map_err(|error| Error::Internal(error.to_string()))?;
    std::fs::write(path, text).map_err(|error| Error::io(path.display().to_string(), error))
}

fn write_outputs(report: &Report, order: &[String], score_lines: &str, output: &Path) -> Result<(), Error> {
    let write = |file: &str, contents: &[u8]| {
        let path = output.join(file);
        std::fs::write(&path, contents).map_err(|error| Error::io(path.display().to_string(), error))
    };
    let json = serde_json::to_vec_pretty(report).map_err(|error| Error::Internal(error.to_string()))?;
    write(&format!("{}.json", report.benchmark), &json)?;
    write(&format!("{}-scores.jsonl", report.benchmark), score_lines.as_bytes())?;

    let title = format!("Model Calls and Performance ({})", report.benchmark);
    let spec = plot::PlotSpec {
        title: &title,
        routers: order
            .iter()
            .filter_map(|name| {
                report.routers.get(name).map(|router| plot::Series {
                    label: name,
                    points: router.curve.iter().map(|p| (p.strong_pct, p.score)).collect(),
                })
            })
            .collect(),
        optimal: Some(plot::Series {
            label: "Optimal",
            points: report.optimal.iter().map(|p| (p.strong_pct, p.score)).collect(),
        }),
        weak: (&report.weak_model, report.weak_score),
        strong: (&report.strong_model, report.strong_score),
    };
    plot::render(&spec, &output.join(format!("{}.png", report.benchmark)))
}

/// The console table: one row per router, best APGR first.
#[must_use]
pub fn format_table(report: &Report) -> String {
    let mut rows: Vec<(&String, &RouterReport)> = report.routers.iter().collect();
    rows.sort_by(|a, b| b.1.apgr.total_cmp(&a.1.apgr));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} prompts; {} {:.3}, {} {:.3}",
        report.benchmark,
        report.n_prompts,
        report.strong_model,
        report.strong_score,
        report.weak_model,
        report.weak_score
    );
    let _ = writeln!(
        out,
        "{:<16} {:>7} {:>17} {:>9} {:>8} {:>8} {:>8}",
        "router", "APGR", "95% CI", "AUC", "CPT20%", "CPT50%", "CPT80%"
    );
    for (name, router) in rows {
        let ci = router
            .apgr_ci95
            .map_or_else(|| "-".to_owned(), |[lo, hi]| format!("[{lo:.3}, {hi:.3}]"));
        let cpt = |key: &str| {
            router
                .cpt
                .get(key)
                .copied()
                .flatten()
                .map_or_else(|| "-".to_owned(), |value| format!("{value:.2}%"))
        };
        let _ = writeln!(
            out,
            "{name:<16} {:>7.4} {ci:>17} {:>9.3} {:>8} {:>8} {:>8}",
            router.apgr,
            router.auc,
            cpt("20"),
            cpt("50"),
            cpt("80")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_round_trip_and_invalidation() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        let path = dir.join("b/r.json");
        let prompts = vec!["a".to_owned(), "b".to_owned()];
        write_cache(&path, "k1", &prompts, &[0.1, 0.2]).unwrap();
        assert_eq!(read_cache(&path, "k1", &prompts), Some(vec![0.1, 0.2]));
        assert_eq!(read_cache(&path, "k2", &prompts), None, "another artifact");
        let changed = vec!["a".to_owned(), "c".to_owned()];
        assert_eq!(read_cache(&path, "k1", &changed), None, "other prompts");
        assert_ne!(
            prompts_hash(&["ab".to_owned()]),
            prompts_hash(&["a".to_owned(), "b".to_owned()])
        );
    }
}
