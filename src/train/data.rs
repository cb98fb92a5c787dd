//! Training data: pairwise battles and per-model correctness, in the formats of
//! `../shared/data/README.md`, reduced to prompts, model identities and battles.
//!
//! Correctness rows become battles too: for one prompt, a model that answered correctly
//! beats one that did not.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::Error;
use crate::rng::{FNV_OFFSET, SplitMix, fnv1a};

/// One pairwise comparison: `label` is the probability that `a` beat `b`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Battle {
    pub prompt: usize,
    pub a: usize,
    pub b: usize,
    pub label: f32,
}

/// A training file as read, for the manifest.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceFile {
    pub path: String,
    pub name: String,
    pub sha256: String,
    pub licence: String,
    pub rows: usize,
}

/// Everything read from the training files.
#[derive(Debug, Default)]
pub struct Dataset {
    pub prompts: Vec<String>,
    /// Index into `files` per prompt.
    pub prompt_source: Vec<usize>,
    pub models: Vec<String>,
    pub battles: Vec<Battle>,
    /// Per prompt of correctness sources: model index → 0/1.
    pub correctness: HashMap<usize, BTreeMap<usize, f32>>,
    pub files: Vec<SourceFile>,
}

/// One canonical identity per model across sources (`gpt4_1106_preview`,
/// `gpt-4-1106-preview`; `mistralai/mixtral-8x7b-chat`, `Mixtral-8x7B-Instruct-v0.1`).
#[must_use]
pub fn canonical_model(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name).to_lowercase().replace('_', "-");
    match base.as_str() {
        "gpt4-1106-preview" => "gpt-4-1106-preview".to_owned(),
        "mixtral-8x7b-chat" => "mixtral-8x7b-instruct-v0.1".to_owned(),
        _ => base,
    }
}

/// The pair `files` were labelled for by `routellm label` (its rows name a `judge`; the
/// strong model is `model_a`), when they hold label rows of exactly one pair.
pub fn labelled_pair(files: &[PathBuf]) -> Result<Option<(String, String)>, Error> {
    #[derive(Deserialize)]
    struct LabelRow {
        model_a: String,
        model_b: String,
        #[allow(dead_code)] // only its presence marks a label row
        judge: String,
    }
    let mut pairs = std::collections::BTreeSet::new();
    for path in files {
        let file = std::fs::File::open(path).map_err(|error| Error::io(path.display().to_string(), error))?;
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|error| Error::io(path.display().to_string(), error))?;
            // Most training rows are not labels: skip them before parsing.
            if !line.contains("\"judge\"") {
                continue;
            }
            if let Ok(row) = serde_json::from_str::<LabelRow>(&line) {
                pairs.insert((row.model_a, row.model_b));
            }
        }
    }
    Ok(match pairs.len() {
        1 => pairs.pop_first(),
        _ => None,
    })
}

/// The licence of a known training file, by its name.
fn licence_of(name: &str) -> String {
    if name.contains("alpaca_eval") {
        "CC BY-NC 4.0 (tatsu-lab/alpaca_eval)".into()
    } else if name.contains("mmlu_pro") {
        "MIT (TIGER-AI-Lab/MMLU-Pro)".into()
    } else if name.contains("routerbench") {
        "MIT (withmartian/routerbench)".into()
    } else {
        "as supplied by the user".into()
    }
}

#[derive(Deserialize)]
struct Row {
    prompt: String,
    #[serde(default)]
    model_a: Option<String>,
    #[serde(default)]
    model_b: Option<String>,
    #[serde(default)]
    winner: Option<String>,
    #[serde(default)]
    p_b_wins: Option<f64>,
    #[serde(default)]
    correct: Option<BTreeMap<String, serde_json::Value>>,
}

impl Dataset {
    /// Reads `files`; correctness rows yield at most `max_pairs` battles per prompt, drawn with `seed`.
    pub fn read(files: &[PathBuf], max_pairs: usize, seed: u64) -> Result<Self, Error> {
        let mut data = Self::default();
        let mut prompt_index: HashMap<(usize, String), usize> = HashMap::new();
        let mut model_index: HashMap<String, usize> = HashMap::new();
        let mut rng = SplitMix::new(seed);
        for path in files {
            let file_number = data.files.len();
            let name = path
                .file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
            let reader = BufReader::new(
                std::fs::File::open(path).map_err(|error| Error::io(path.display().to_string(), error))?,
            );
            let mut rows = 0;
            for (number, line) in reader.lines().enumerate() {
                let line = line.map_err(|error| Error::io(path.display().to_string(), error))?;
                if line.trim().is_empty() {
                    continue;
                }
                let row: Row = serde_json::from_str(&line)
                    .map_err(|error| Error::invalid(format!("{}:{}: {error}", path.display(), number + 1)))?;
                rows += 1;
                let prompt = *prompt_index
                    .entry((file_number, row.prompt.clone()))
                    .or_insert_with(|| {
                        data.prompts.push(row.prompt.clone());
                        data.prompt_source.push(file_number);
                        data.prompts.len() - 1
                    });
                let mut model = |name: &str| {
                    let canonical = canonical_model(name);
                    *model_index.entry(canonical.clone()).or_insert_with(|| {
                        data.models.push(canonical);
                        data.models.len() - 1
                    })
                };
                if let (Some(a), Some(b)) = (&row.model_a, &row.model_b) {
                    let (a, b) = (model(a), model(b));
                    if a == b {
                        continue;
                    }
                    let label = match (row.p_b_wins, row.winner.as_deref()) {
                        (Some(p), _) if p.is_finite() => 1.0 - p,
                        (_, Some("model_a")) => 1.0,
                        (_, Some("model_b")) => 0.0,
                        (_, Some("tie")) => 0.5,
                        _ => {
                            return Err(Error::invalid(format!(
                                "{}:{}: a battle needs `winner` or `p_b_wins`",
                                path.display(),
                                number + 1
                            )));
                        }
                    };
                    #[allow(clippy::cast_possible_truncation)]
                    data.battles.push(Battle {
                        prompt,
                        a,
                        b,
                        label: label as f32,
                    });
                } else if let Some(correct) = &row.correct {
                    let mut outcomes: BTreeMap<usize, f32> = BTreeMap::new();
                    for (name, value) in correct {
                        let score = match value {
                            serde_json::Value::Bool(right) => f32::from(u8::from(*right)),
                            #[allow(clippy::cast_possible_truncation)]
                            serde_json::Value::Number(number) => number.as_f64().unwrap_or(0.0) as f32,
                            _ => continue,
                        };
                        outcomes.insert(model(name), score);
                    }
                    data.battles
                        .extend(correctness_battles(prompt, &outcomes, max_pairs, &mut rng));
                    data.correctness.insert(prompt, outcomes);
                } else {
                    return Err(Error::invalid(format!(
                        "{}:{}: expected a battle (`model_a`, `model_b`, `winner`) or a `correct` map",
                        path.display(),
                        number + 1
                    )));
                }
            }
            data.files.push(SourceFile {
                path: path.display().to_string(),
                sha256: crate::embed::sha256_file(path).map_err(|error| Error::invalid(error.to_string()))?,
                licence: licence_of(&name),
                name,
                rows,
            });
        }
        if data.battles.is_empty() && data.correctness.is_empty() {
            return Err(Error::invalid(
                "the training files hold no battles and no correctness rows",
            ));
        }
        Ok(data)
    }

    /// The index of a model identity, by any of its spellings.
    #[must_use]
    pub fn model(&self, name: &str) -> Option<usize> {
        let canonical = canonical_model(name);
        self.models.iter().position(|model| *model == canonical)
    }

    /// Whether `prompt` belongs to the validation split: a seeded hash of its text, so the
    /// split is stable across runs and identical prompts never straddle it.
    #[must_use]
    pub fn is_validation(&self, prompt: usize, fraction: f64, seed: u64) -> bool {
        let hash = fnv1a(FNV_OFFSET ^ seed, self.prompts[prompt].as_bytes());
        SplitMix::new(hash).next_unit() < fraction
    }
}

/// Battles from one prompt's correctness: a right model beats a wrong one. At most
/// `max_pairs` pairs, drawn uniformly by a partial shuffle; the order of `a` and `b`
/// alternates so neither side is always the winner.
fn correctness_battles(
    prompt: usize,
    outcomes: &BTreeMap<usize, f32>,
    max_pairs: usize,
    rng: &mut SplitMix,
) -> Vec<Battle> {
    let right: Vec<usize> = outcomes.iter().filter(|(_, s)| **s >= 0.5).map(|(m, _)| *m).collect();
    let wrong: Vec<usize> = outcomes.iter().filter(|(_, s)| **s < 0.5).map(|(m, _)| *m).collect();
    let mut pairs: Vec<(usize, usize)> = right.iter().flat_map(|r| wrong.iter().map(move |w| (*r, *w))).collect();
    let keep = pairs.len().min(max_pairs);
    for slot in 0..keep {
        let pick = slot + rng.below(pairs.len() - slot);
        pairs.swap(slot, pick);
    }
    pairs
        .into_iter()
        .take(keep)
        .enumerate()
        .map(|(slot, (winner, loser))| {
            if slot % 2 == 0 {
                Battle {
                    prompt,
                    a: winner,
                    b: loser,
                    label: 1.0,
                }
            } else {
                Battle {
                    prompt,
                    a: loser,
                    b: winner,
                    label: 0.0,
                }
            }
        })
        .collect()
}

/// Paths of every `.jsonl` training file in `dir` (sorted), for `--data DIR`.
pub fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Error> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|error| Error::io(path.display().to_string(), error))?
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|p| p.extension().is_some_and(|ext| ext == "jsonl"))
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// Whether `path` names RouteLLM's eval data, which must never be trained on.
#[must_use]
pub fn is_eval_data(path: &Path) -> bool {
    let text = path.display().to_string();
    text.contains("data/routellm") || text.contains("contaminated_prompts")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names_unify_sources() {
        assert_eq!(canonical_model("gpt4_1106_preview"), "gpt-4-1106-preview");
        assert_eq!(canonical_model("gpt-4-1106-preview"), "gpt-4-1106-preview");
        assert_eq!(
            canonical_model("mistralai/mixtral-8x7b-chat"),
            "mixtral-8x7b-instruct-v0.1"
        );
        assert_eq!(
            canonical_model("Mixtral-8x7B-Instruct-v0.1"),
            "mixtral-8x7b-instruct-v0.1"
        );
    }

    #[test]
    fn battles_and_correctness_rows_become_battles() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        let battles = dir.join("battles.jsonl");
        std::fs::write(
            &battles,
            concat!(
                r#"{"prompt": "p1", "model_a": "gpt4_1106_preview", "model_b": "Mixtral-8x7B-Instruct-v0.1", "winner": "model_a", "p_b_wins": 0.2}"#,
                "\n",
                r#"{"prompt": "p1", "model_a": "gpt4_1106_preview", "model_b": "gpt4_1106_preview", "winner": "tie"}"#,
                "\n"
            ),
        )
        .unwrap();
        let correct = dir.join("correct.jsonl");
        std::fs::write(
            &correct,
            r#"{"prompt": "q1", "correct": {"gpt-4-1106-preview": 1.0, "mistralai/mixtral-8x7b-chat": 0.0, "x": 0.0}}"#,
        )
        .unwrap();
        let data = Dataset::read(&[battles, correct], 10, 1).unwrap();
        assert_eq!(data.prompts, vec!["p1", "q1"]);
        // One real battle (the self-battle is skipped) and two correctness pairs.
        assert_eq!(data.battles.len(), 3);
        assert!((data.battles[0].label - 0.8).abs() < 1e-6);
        let gpt4 = data.model("gpt-4-1106-preview").unwrap();
        for battle in &data.battles[1..] {
            let gpt4_won = (battle.a == gpt4 && battle.label == 1.0) || (battle.b == gpt4 && battle.label == 0.0);
            assert!(gpt4_won, "{battle:?}");
        }
        assert_eq!(data.files[1].licence, "as supplied by the user");
    }

    #[test]
    fn a_label_file_names_its_pair_and_only_one_pair_counts() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        let label = |a: &str, b: &str| {
            format!(
                r#"{{"prompt": "p", "model_a": "{a}", "model_b": "{b}", "p_b_wins": 0.0, "judge": "openai/gpt-4o"}}"#
            )
        };
        let labels = dir.join("labels.jsonl");
        std::fs::write(
            &labels,
            format!(
                "{}\n{}\n",
                label("openai/gpt-4o", "groq/llama3"),
                label("openai/gpt-4o", "groq/llama3")
            ),
        )
        .unwrap();
        // A battle file without a judge is not a label file, whatever its pairs.
        let battles = dir.join("battles.jsonl");
        std::fs::write(
            &battles,
            r#"{"prompt": "q", "model_a": "x", "model_b": "y", "winner": "model_a"}"#,
        )
        .unwrap();
        let pair = labelled_pair(&[labels.clone(), battles.clone()]).unwrap();
        assert_eq!(pair, Some(("openai/gpt-4o".to_owned(), "groq/llama3".to_owned())));
        assert_eq!(labelled_pair(std::slice::from_ref(&battles)).unwrap(), None);
        // Labels of two pairs: no single pair to default to.
        let other = dir.join("other.jsonl");
        std::fs::write(&other, label("openai/gpt-4o", "openai/gpt-4o-mini")).unwrap();
        assert_eq!(labelled_pair(&[labels, other]).unwrap(), None);
    }
}
