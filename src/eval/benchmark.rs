//! Benchmarks read from RouteLLM's `evals` layout (MMLU, GSM8K, MT Bench) or from a
//! team's own labelled JSONL, reduced to prompts and per-model outcomes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::metrics::{OracleCalls, Outcome};
use crate::error::Error;

/// RouteLLM's `ALL_MMLU_DOMAINS`: the order in which MMLU rows are concatenated.
pub const MMLU_DOMAINS: [&str; 57] = [
    "high_school_european_history",
    "business_ethics",
    "clinical_knowledge",
    "medical_genetics",
    "high_school_us_history",
    "high_school_physics",
    "high_school_world_history",
    "virology",
    "high_school_microeconomics",
    "econometrics",
    "college_computer_science",
    "high_school_biology",
    "abstract_algebra",
    "professional_accounting",
    "philosophy",
    "professional_medicine",
    "nutrition",
    "global_facts",
    "machine_learning",
    "security_studies",
    "public_relations",
    "professional_psychology",
    "prehistory",
    "anatomy",
    "human_sexuality",
    "college_medicine",
    "high_school_government_and_politics",
    "college_chemistry",
    "logical_fallacies",
    "high_school_geography",
    "elementary_mathematics",
    "human_aging",
    "college_mathematics",
    "high_school_psychology",
    "formal_logic",
    "high_school_statistics",
    "international_law",
    "high_school_mathematics",
    "high_school_computer_science",
    "conceptual_physics",
    "miscellaneous",
    "high_school_chemistry",
    "marketing",
    "professional_law",
    "management",
    "college_physics",
    "jurisprudence",
    "world_religions",
    "sociology",
    "us_foreign_policy",
    "high_school_macroeconomics",
    "computer_security",
    "moral_scenarios",
    "moral_disputes",
    "electrical_engineering",
    "astronomy",
    "college_biology",
];

/// The model columns of RouteLLM's MMLU and GSM8K response files.
pub const CSV_STRONG: &str = "gpt-4-1106-preview";
pub const CSV_WEAK: &str = "mistralai/Mixtral-8x7B-Instruct-v0.1";
/// The model names in RouteLLM's MT Bench judgements.
pub const MT_BENCH_STRONG: &str = "gpt-4-1106-preview";
pub const MT_BENCH_WEAK: &str = "mixtral-8x7b-instruct-v0.1";

/// Which benchmark to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchmarkKind {
    Mmlu,
    Gsm8k,
    MtBench,
    /// `{"prompt": str, "scores": {"<model>": number}}` per line.
    Generic(PathBuf),
}

impl BenchmarkKind {
    /// `mmlu`, `gsm8k`, `mt-bench`, or a path to a JSONL file.
    #[must_use]
    pub fn parse(text: &str) -> Self {
        match text {
            "mmlu" => Self::Mmlu,
            "gsm8k" => Self::Gsm8k,
            "mt-bench" | "mt_bench" => Self::MtBench,
            path => Self::Generic(PathBuf::from(path)),
        }
    }
}

/// A loaded benchmark: prompts in RouteLLM's order and what each model scored on them.
#[derive(Debug, Clone)]
pub struct Benchmark {
    pub name: String,
    pub strong_model: String,
    pub weak_model: String,
    pub prompts: Vec<String>,
    pub outcomes: Vec<Outcome>,
    /// Multiplier to the benchmark's unit: 100 for accuracy in %, 1 for MT Bench's 1-10.
    pub scale: f64,
    pub oracle: OracleCalls,
    /// How many rows decontamination removed.
    pub dropped: usize,
}

/// Loads `kind` from `data_dir` (RouteLLM's `evals` layout); model names default to the
/// benchmark's own columns.
pub fn load(
    kind: &BenchmarkKind,
    data_dir: &Path,
    strong_model: Option<&str>,
    weak_model: Option<&str>,
) -> Result<Benchmark, Error> {
    match kind {
        BenchmarkKind::Mmlu => {
            let contaminated = read_contaminated(&data_dir.join("mmlu/contaminated_prompts.jsonl"))?;
            let files: Vec<PathBuf> = MMLU_DOMAINS
                .iter()
                .map(|domain| data_dir.join(format!("mmlu/responses/mmlu_{domain}.csv")))
                .collect();
            load_correctness_csv("mmlu", &files, &contaminated, strong_model, weak_model)
        }
        BenchmarkKind::Gsm8k => {
            let contaminated = read_contaminated(&data_dir.join("gsm8k/contaminated_prompts.jsonl"))?;
            let files = [data_dir.join("gsm8k/gsm8k_responses.csv")];
            load_correctness_csv("gsm8k", &files, &contaminated, strong_model, weak_model)
        }
        BenchmarkKind::MtBench => load_mt_bench(
            &data_dir.join("mt_bench"),
            strong_model.unwrap_or(MT_BENCH_STRONG),
            weak_model.unwrap_or(MT_BENCH_WEAK),
        ),
        BenchmarkKind::Generic(path) => load_generic(path, strong_model, weak_model),
    }
}

fn read_contaminated(path: &Path) -> Result<HashSet<String>, Error> {
    #[derive(Deserialize)]
    struct Row {
        eval_prompt: String,
    }
    read_jsonl::<Row>(path).map(|rows| rows.into_iter().map(|row| row.eval_prompt).collect())
}

fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, Error> {
    let file = File::open(path).map_err(|error| Error::io(path.display().to_string(), error))?;
    let mut rows = Vec::new();
    for (number, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|error| Error::io(path.display().to_string(), error))?;
        if line.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str(&line)
            .map_err(|error| Error::invalid(format!("{}:{}: {error}", path.display(), number + 1)))?;
        rows.push(row);
    }
    Ok(rows)
}

fn parse_bool(text: &str, path: &Path, row: usize, column: &str) -> Result<f64, Error> {
    match text.trim() {
        "True" | "true" | "1" | "1.0" => Ok(1.0),
        "False" | "false" | "0" | "0.0" => Ok(0.0),
        other => Err(Error::invalid(format!(
            "{}: row {row}, column `{column}`: expected True or False, found `{other}`",
            path.display()
        ))),
    }
}

fn load_correctness_csv(
    name: &str,
    files: &[PathBuf],
    contaminated: &HashSet<String>,
    strong_model: Option<&str>,
    weak_model: Option<&str>,
) -> Result<Benchmark, Error> {
    let strong_model = strong_model.unwrap_or(CSV_STRONG);
    let weak_model = weak_model.unwrap_or(CSV_WEAK);
    let mut prompts = Vec::new();
    let mut outcomes = Vec::new();
    let mut dropped = 0;
    for path in files {
        let mut reader = csv::Reader::from_path(path).map_err(|error| csv_error(path, &error))?;
        let headers = reader.headers().map_err(|error| csv_error(path, &error))?.clone();
        let column = |model: &str| {
            headers.iter().position(|header| header == model).ok_or_else(|| {
                Error::invalid(format!(
                    "{}: no column `{model}`; model columns: {}",
                    path.display(),
                    headers
                        .iter()
                        .filter(|h| *h != "prompt" && !h.ends_with("_response"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
        };
        let prompt_column = column("prompt")?;
        let strong_column = column(strong_model)?;
        let weak_column = column(weak_model)?;
        for (row, record) in reader.records().enumerate() {
            let record = record.map_err(|error| csv_error(path, &error))?;
            let prompt = record.get(prompt_column).unwrap_or_default();
            if contaminated.contains(prompt) {
                dropped += 1;
                continue;
            }
            let strong = parse_bool(
                record.get(strong_column).unwrap_or_default(),
                path,
                row + 1,
                strong_model,
            )?;
            let weak = parse_bool(record.get(weak_column).unwrap_or_default(), path, row + 1, weak_model)?;
            prompts.push(prompt.to_owned());
            outcomes.push(Outcome::single(strong, weak));
        }
    }
    non_empty(Benchmark {
        name: name.to_owned(),
        strong_model: strong_model.to_owned(),
        weak_model: weak_model.to_owned(),
        prompts,
        outcomes,
        scale: 100.0,
        oracle: OracleCalls::Fractional,
        dropped,
    })
}

fn csv_error(path: &Path, error: &csv::Error) -> Error {
    Error::invalid(format!("{}: {error}", path.display()))
}

fn load_mt_bench(dir: &Path, strong_model: &str, weak_model: &str) -> Result<Benchmark, Error> {
    #[derive(Deserialize)]
    struct Question {
        question_id: i64,
        turns: Vec<String>,
    }
    #[derive(Deserialize)]
    struct Judgement {
        question_id: i64,
        model: String,
        score: f64,
    }
    let contaminated = read_contaminated(&dir.join("contaminated_prompts.jsonl"))?;
    let questions: Vec<Question> = read_jsonl(&dir.join("question.jsonl"))?;
    let judgements: Vec<Judgement> = read_jsonl(&dir.join("judgements.jsonl"))?;
    // (sum, count) of judgement rows per question and model; pandas' mean skips missing rows.
    let mut rows: HashMap<(i64, &str), (f64, f64)> = HashMap::new();
    for judgement in &judgements {
        if judgement.score.is_finite() {
            let entry = rows
                .entry((judgement.question_id, judgement.model.as_str()))
                .or_default();
            entry.0 += judgement.score;
            entry.1 += 1.0;
        }
    }
    for model in [strong_model, weak_model] {
        if !judgements.iter().any(|j| j.model == model) {
            let mut models: Vec<&str> = judgements.iter().map(|j| j.model.as_str()).collect();
            models.sort_unstable();
            models.dedup();
            return Err(Error::invalid(format!(
                "MT Bench judgements have no model `{model}`; models: {}",
                models.join(", ")
            )));
        }
    }
    let mut prompts = Vec::new();
    let mut outcomes = Vec::new();
    let mut dropped = 0;
    for question in questions {
        let Some(first_turn) = question.turns.first() else {
            return Err(Error::invalid(format!(
                "MT Bench question {} has no turns",
                question.question_id
            )));
        };
        if question.turns.iter().take(2).any(|turn| contaminated.contains(turn)) {
            dropped += 1;
            continue;
        }
        let (strong_sum, strong_count) = rows
            .get(&(question.question_id, strong_model))
            .copied()
            .unwrap_or_default();
        let (weak_sum, weak_count) = rows
            .get(&(question.question_id, weak_model))
            .copied()
            .unwrap_or_default();
        if strong_count == 0.0 || weak_count == 0.0 {
            return Err(Error::invalid(format!(
                "MT Bench question {} lacks judgements for {}",
                question.question_id,
                if strong_count == 0.0 { strong_model } else { weak_model }
            )));
        }
        prompts.push(first_turn.clone());
        outcomes.push(Outcome {
            strong_sum,
            strong_count,
            weak_sum,
            weak_count,
        });
    }
    non_empty(Benchmark {
        name: "mt-bench".to_owned(),
        strong_model: strong_model.to_owned(),
        weak_model: weak_model.to_owned(),
        prompts,
        outcomes,
        scale: 1.0,
        oracle: OracleCalls::Whole,
        dropped,
    })
}

fn load_generic(path: &Path, strong_model: Option<&str>, weak_model: Option<&str>) -> Result<Benchmark, Error> {
    #[derive(Deserialize)]
    struct Row {
        prompt: String,
        scores: BTreeMap<String, f64>,
        /// `routellm label` writes the strong model as `model_a` and the weak as `model_b`.
        #[serde(default)]
        model_a: Option<String>,
        #[serde(default)]
        model_b: Option<String>,
    }
    let rows: Vec<Row> = read_jsonl(path)?;
    let models: Vec<String> = rows
        .first()
        .map(|row| row.scores.keys().cloned().collect())
        .unwrap_or_default();
    let labelled_pair = rows.first().and_then(|row| {
        let (a, b) = (row.model_a.as_deref()?, row.model_b.as_deref()?);
        (row.scores.contains_key(a) && row.scores.contains_key(b)).then_some((a, b))
    });
    let (Some(strong_model), Some(weak_model)) = (
        strong_model.or(labelled_pair.map(|(a, _)| a)),
        weak_model.or(labelled_pair.map(|(_, b)| b)),
    ) else {
        return Err(Error::invalid(format!(
            "a generic benchmark needs --strong-model and --weak-model naming keys of `scores`; {} has: {}",
            path.display(),
            models.join(", ")
        )));
    };
    let (strong_model, weak_model) = (strong_model.to_owned(), weak_model.to_owned());
    let mut prompts = Vec::with_capacity(rows.len());
    let mut outcomes = Vec::with_capacity(rows.len());
    for (number, row) in rows.into_iter().enumerate() {
        let score = |model: &str| {
            row.scores
                .get(model)
                .copied()
                .filter(|value| value.is_finite())
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "{}:{}: `scores` has no finite value for `{model}`",
                        path.display(),
                        number + 1
                    ))
                })
        };
        outcomes.push(Outcome::single(score(&strong_model)?, score(&weak_model)?));
        prompts.push(row.prompt);
    }
    let name = path
        .file_stem()
        .map_or_else(|| "benchmark".to_owned(), |stem| stem.to_string_lossy().into_owned());
    non_empty(Benchmark {
        name,
        strong_model,
        weak_model,
        prompts,
        outcomes,
        scale: 1.0,
        oracle: OracleCalls::Fractional,
        dropped: 0,
    })
}

fn non_empty(benchmark: Benchmark) -> Result<Benchmark, Error> {
    if benchmark.prompts.is_empty() {
        return Err(Error::invalid(format!(
            "benchmark `{}` has no prompts left to evaluate",
            benchmark.name
        )));
    }
    Ok(benchmark)
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;
    use crate::eval::metrics::model_score;

    #[test]
    fn mt_bench_fixture_routes_on_turn_one_and_drops_contaminated() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        let mt = dir.join("mt_bench");
        std::fs::create_dir_all(&mt).unwrap();
        std::fs::write(
            mt.join("question.jsonl"),
            concat!(
                r#"{"question_id": 81, "category": "writing", "turns": ["Write a blog post", "Rewrite it"]}"#,
                "\n",
                r#"{"question_id": 82, "category": "math", "turns": ["Solve x^2=4", "Now x^3=8"]}"#,
                "\n",
                r#"{"question_id": 83, "category": "math", "turns": ["Leaked question", "Follow-up"]}"#,
                "\n",
            ),
        )
        .unwrap();
        let mut judgements = String::new();
        for (question, strong, weak) in [
            (81, [9.0, 8.0], [7.0, 5.0]),
            (82, [10.0, 10.0], [4.0, 2.0]),
            (83, [1.0, 1.0], [1.0, 1.0]),
        ] {
            for turn in 0..2 {
                for (model, score) in [(MT_BENCH_STRONG, strong[turn]), (MT_BENCH_WEAK, weak[turn])] {
                    writeln!(
                        judgements,
                        "{{\"question_id\": {question}, \"model\": \"{model}\", \"judge\": [\"gpt-4\", \"single-v1\"], \"user_prompt\": \"\", \"judgment\": \"\", \"score\": {score}, \"turn\": {}, \"tstamp\": 1.0}}",
                        turn + 1
                    )
                    .unwrap();
                }
            }
        }
        std::fs::write(mt.join("judgements.jsonl"), judgements).unwrap();
        std::fs::write(
            mt.join("contaminated_prompts.jsonl"),
            "{\"eval_prompt\": \"Follow-up\"}\n",
        )
        .unwrap();
        let benchmark = load(&BenchmarkKind::MtBench, dir, None, None).unwrap();
        assert_eq!(benchmark.prompts, vec!["Write a blog post", "Solve x^2=4"]);
        assert_eq!(benchmark.dropped, 1);
        assert_eq!(model_score(&benchmark.outcomes, true, 1.0), 9.25);
        assert_eq!(model_score(&benchmark.outcomes, false, 1.0), 4.5);
    }

    #[test]
    fn generic_benchmark_needs_model_names_and_reports_keys() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        let path = dir.join("support.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\": \"a\", \"scores\": {\"big\": 0.9, \"small\": 0.2}}\n\n{\"prompt\": \"b\", \"scores\": {\"big\": 1, \"small\": 1}}\n",
        )
        .unwrap();
        let kind = BenchmarkKind::parse(path.to_str().unwrap());
        let error = load(&kind, dir, None, None).unwrap_err();
        assert!(error.to_string().contains("big, small"), "{error}");
        let benchmark = load(&kind, dir, Some("big"), Some("small")).unwrap();
        assert_eq!(benchmark.name, "support");
        assert_eq!(benchmark.prompts.len(), 2);
        assert!((model_score(&benchmark.outcomes, true, 1.0) - 0.95).abs() < 1e-12);
        assert!(load(&kind, dir, Some("big"), Some("tiny")).is_err());
    }
}
