//! Routing quality on held-out prompts, the same way for every router: for each source,
//! APGR beside the prompt-length baseline on the same prompts. A prompt's outcomes are the
//! pair's correctness, or, in a source of battles (`routellm label`'s output), the pair's
//! battles on it: the strong model's share of wins, and the rest for the weak one, as `eval`
//! reads a labelled file. Outcomes are the
//! source's own strong/weak pair; scores are what ships — the router scoring its default
//! identities. Where those differ (MMLU-Pro has gpt-4o, the default strong identity is
//! gpt-4-1106-preview), the scores for the source's own identities are reported beside:
//! an mf artifact once validated at 0.59 on MMLU-Pro with gpt-4o's vector while its served
//! gpt-4-1106 vector ranked the same prompts at 0.48.

use std::collections::{BTreeMap, HashMap};

use super::data::Dataset;
use crate::Error;
use crate::eval::metrics::{self, Outcome};

/// The pairs a source may be validated on, first match wins: the router's own pair, then
/// the closest pair in sources without it (MMLU-Pro has gpt-4o, not gpt-4-1106).
#[must_use]
pub fn candidate_pairs<'a>(strong: &'a str, weak: &'a str) -> [(&'a str, &'a str); 2] {
    [(strong, weak), ("gpt-4o-2024-05-13", weak)]
}

/// One source's held-out prompts with both models of its pair, that pair (whose outcomes
/// judge), and the identities the router serves with (which score).
pub struct HeldOut {
    pub source: String,
    pub prompts: Vec<usize>,
    /// Per prompt, the strong and the weak model's score (0 to 1).
    pub outcomes: Vec<(f64, f64)>,
    pub strong: usize,
    pub weak: usize,
    pub served: (usize, usize),
}

/// The pair's outcomes on `prompt`: correctness where the prompt has it for both models,
/// else the mean of their battles on it, if any.
fn pair_outcome(
    data: &Dataset,
    battles: &PairBattles,
    prompt: usize,
    strong: usize,
    weak: usize,
) -> Option<(f64, f64)> {
    if let Some(correct) = data.correctness.get(&prompt) {
        return Some((f64::from(*correct.get(&strong)?), f64::from(*correct.get(&weak)?)));
    }
    let (wins, count) = battles.get(&(prompt, strong, weak))?;
    let share = wins / f64::from(*count);
    Some((share, 1.0 - share))
}

/// Battles of prompts without correctness, by (prompt, model, other model): the first
/// model's summed win probability and the number of battles, entered for both orders.
type PairBattles = HashMap<(usize, usize, usize), (f64, u32)>;

fn pair_battles(data: &Dataset) -> PairBattles {
    let mut battles = PairBattles::new();
    for battle in data
        .battles
        .iter()
        .filter(|b| !data.correctness.contains_key(&b.prompt))
    {
        let label = f64::from(battle.label);
        for (first, second, won) in [(battle.a, battle.b, label), (battle.b, battle.a, 1.0 - label)] {
            let entry = battles.entry((battle.prompt, first, second)).or_insert((0.0, 0));
            entry.0 += won;
            entry.1 += 1;
        }
    }
    battles
}

/// Per source, the held-out prompts (`!train`) with outcomes for both models of the first
/// pair in `pairs` the source has (correctness, or battles between the two). The first pair
/// is the one served; where the data lacks one of its identities, the source's own pair
/// scores too.
#[must_use]
pub fn held_out_sets(data: &Dataset, train: &[bool], pairs: &[(&str, &str)]) -> Vec<HeldOut> {
    let served = pairs.first().and_then(|(s, w)| Some((data.model(s)?, data.model(w)?)));
    let battles = pair_battles(data);
    let mut sets = Vec::new();
    for (file_number, file) in data.files.iter().enumerate() {
        let held_out: Vec<usize> = (0..data.prompts.len())
            .filter(|p| data.prompt_source[*p] == file_number && !train[*p])
            .collect();
        let Some((strong, weak)) = pairs.iter().find_map(|(s, w)| {
            let (s, w) = (data.model(s)?, data.model(w)?);
            held_out
                .iter()
                .any(|p| pair_outcome(data, &battles, *p, s, w).is_some())
                .then_some((s, w))
        }) else {
            continue;
        };
        let (prompts, outcomes) = held_out
            .into_iter()
            .filter_map(|p| Some((p, pair_outcome(data, &battles, p, strong, weak)?)))
            .unzip();
        sets.push(HeldOut {
            source: file.name.clone(),
            prompts,
            outcomes,
            strong,
            weak,
            served: served.unwrap_or((strong, weak)),
        });
    }
    sets
}

/// `sets` for a router with no model identities (bert scores one P(strong wins) per
/// prompt): each is scored once, its own pair being as good as any.
#[must_use]
pub fn without_identities(mut sets: Vec<HeldOut>) -> Vec<HeldOut> {
    for set in &mut sets {
        set.served = (set.strong, set.weak);
    }
    sets
}

/// APGR of `scores` (one per prompt of `set`), and of prompt length, with score quantiles
/// so a router that barely varies (a flat prior) shows as such.
#[must_use]
pub fn report(data: &Dataset, set: &HeldOut, scores: &[f64]) -> serde_json::Value {
    let outcomes: Vec<Outcome> = set
        .outcomes
        .iter()
        .map(|&(strong, weak)| Outcome::single(strong, weak))
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

/// [`report`] for every held-out set, scoring each prompt with `score(prompt, strong, weak)`
/// for the served identities, and where the set's own pair differs, also for that pair
/// (`own_pair_apgr`).
pub fn report_all(
    data: &Dataset,
    sets: &[HeldOut],
    score: &(dyn Fn(usize, usize, usize) -> Result<f64, Error> + Sync),
) -> Result<BTreeMap<String, serde_json::Value>, Error> {
    let mut reports = BTreeMap::new();
    for set in sets {
        let scored_as = |(strong, weak): (usize, usize), label: String| {
            let progress = crate::progress::Progress::new(label, set.prompts.len());
            crate::scoring::parallel_map(&set.prompts, &progress, |_, p| score(*p, strong, weak))
        };
        let scores = scored_as(set.served, format!("validating on {}", set.source))?;
        let mut metrics = report(data, set, &scores);
        let own_pair = (set.strong, set.weak);
        if set.served != own_pair {
            let own = scored_as(own_pair, format!("validating on {} with its own pair", set.source))?;
            metrics["own_pair_apgr"] = report(data, set, &own)["apgr"].clone();
            metrics["scored_as"] = serde_json::json!([data.models[set.served.0], data.models[set.served.1]]);
        }
        reports.insert(set.source.clone(), metrics);
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::train::data::{Battle, SourceFile};

    /// Eight held-out prompts on which `big` beats `small` exactly on the odd ones; the
    /// served identity `served` has no outcomes here.
    fn planted() -> Dataset {
        let models: Vec<String> = ["served", "big", "small"].map(String::from).to_vec();
        let mut correctness = HashMap::new();
        for prompt in 0..8 {
            let mut outcome = BTreeMap::new();
            outcome.insert(1, 1.0);
            outcome.insert(2, if prompt % 2 == 1 { 0.0 } else { 1.0 });
            correctness.insert(prompt, outcome);
        }
        Dataset {
            prompts: (0..8).map(|p| format!("prompt {p}")).collect(),
            prompt_source: vec![0; 8],
            models,
            battles: Vec::new(),
            correctness,
            files: vec![SourceFile {
                path: "planted.jsonl".into(),
                name: "planted".into(),
                sha256: String::new(),
                licence: String::new(),
                rows: 8,
            }],
        }
    }

    #[test]
    fn validation_scores_with_the_served_identities_and_reports_the_own_pair_beside() {
        let data = planted();
        let sets = held_out_sets(&data, &[false; 8], &[("served", "small"), ("big", "small")]);
        assert_eq!(sets.len(), 1);
        assert_eq!(
            (sets[0].strong, sets[0].weak),
            (1, 2),
            "outcomes come from the pair the data has"
        );
        assert_eq!(sets[0].served, (0, 2), "scores come from the served identities");
        // Scored as the served pair the ranking is perfectly wrong; as the own pair, perfect.
        #[allow(clippy::cast_precision_loss)]
        let score = |prompt: usize, strong: usize, _weak: usize| {
            let odd = (prompt % 2) as f64;
            Ok(if strong == 0 { 1.0 - odd } else { odd })
        };
        let reports = report_all(&data, &sets, &score).unwrap();
        let planted = &reports["planted"];
        let (served, own) = (
            planted["apgr"].as_f64().unwrap(),
            planted["own_pair_apgr"].as_f64().unwrap(),
        );
        assert!(served < 0.5 && own > 0.5, "served {served}, own pair {own}");
        assert_eq!(planted["scored_as"], serde_json::json!(["served", "small"]));
        assert!(
            (mean_apgr(&reports) - served).abs() < 1e-12,
            "choices are made on what is served"
        );
        // A router scored with the pair the data has reports it once.
        let reports = report_all(&data, &without_identities(sets), &score).unwrap();
        assert!(reports["planted"].get("own_pair_apgr").is_none());
        assert!((reports["planted"]["apgr"].as_f64().unwrap() - own).abs() < 1e-12);
    }

    #[test]
    fn a_source_of_battles_is_validated_on_the_pairs_win_shares() {
        // `label` output: big beats small on the odd prompts, they tie on the even ones;
        // half the battles are written with the models the other way round.
        let mut data = planted();
        data.correctness.clear();
        data.battles = (0..8)
            .map(|prompt| {
                let big_wins = if prompt % 2 == 1 { 1.0 } else { 0.5 };
                if prompt < 4 {
                    Battle {
                        prompt,
                        a: 1,
                        b: 2,
                        label: big_wins,
                    }
                } else {
                    Battle {
                        prompt,
                        a: 2,
                        b: 1,
                        label: 1.0 - big_wins,
                    }
                }
            })
            .collect();
        let sets = held_out_sets(&data, &[false; 8], &[("big", "small")]);
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].prompts.len(), 8);
        assert_eq!(sets[0].outcomes[1], (1.0, 0.0));
        assert_eq!(sets[0].outcomes[5], (1.0, 0.0), "a battle written the other way round");
        assert_eq!(sets[0].outcomes[4], (0.5, 0.5));
        #[allow(clippy::cast_precision_loss)]
        let odd_high = |prompt: usize, _: usize, _: usize| Ok((prompt % 2) as f64);
        #[allow(clippy::cast_precision_loss)]
        let odd_low = |prompt: usize, _: usize, _: usize| Ok(1.0 - (prompt % 2) as f64);
        let right = report_all(&data, &sets, &odd_high).unwrap()["planted"]["apgr"]
            .as_f64()
            .unwrap();
        let wrong = report_all(&data, &sets, &odd_low).unwrap()["planted"]["apgr"]
            .as_f64()
            .unwrap();
        assert!(right > 0.6 && wrong < 0.4, "right {right}, wrong {wrong}");
        // Battles of another pair say nothing about this one.
        assert!(held_out_sets(&data, &[false; 8], &[("served", "small")]).is_empty());
    }
}
