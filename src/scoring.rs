//! Batch scoring and threshold calibration: what `routellm score`, `calibrate` and `eval`
//! build on.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::Error;
use crate::progress::Progress;
use crate::routers::{Router, ScoringCost};

/// Scores every prompt with `router`, in prompt order: on all cores, or for a router that
/// waits on an embeddings API, a batch of prompts per request.
pub fn score_all(router: &dyn Router, name: &str, prompts: &[String]) -> Result<Vec<f64>, Error> {
    let progress = Progress::new(format!("scoring {name}"), prompts.len());
    let failed = |cause| Error::router(name, cause);
    if router.scoring_cost() == ScoringCost::Remote {
        let scores = batched_map(prompts, crate::embed::REMOTE_BATCH, &progress, |texts| {
            router.strong_win_rates(texts).map_err(failed)
        })?;
        return scores
            .into_iter()
            .enumerate()
            .map(|(index, score)| in_range(name, score, Some(index)))
            .collect();
    }
    parallel_map(prompts, &progress, |index, prompt| {
        in_range(name, router.strong_win_rate(prompt).map_err(failed)?, Some(index))
    })
}

/// Scores entries of several prompts (a conversation's user turns) as `score_turns: max`
/// routes them: each entry's highest score. All prompts are scored as one run.
pub fn score_highest(router: &dyn Router, name: &str, entries: &[Vec<String>]) -> Result<Vec<f64>, Error> {
    let flat: Vec<String> = entries.iter().flatten().cloned().collect();
    let mut scores = score_all(router, name, &flat)?.into_iter();
    entries
        .iter()
        .map(|entry| {
            scores
                .by_ref()
                .take(entry.len())
                .reduce(f64::max)
                .ok_or_else(|| Error::Internal(format!("router `{name}`: an entry without a prompt")))
        })
        .collect()
}

/// `win_rate` if it is a probability; a router that returns anything else has a bug, which
/// must not decide a route (`prompt`: its index in a batch, for the message).
pub fn in_range(name: &str, win_rate: f64, prompt: Option<usize>) -> Result<f64, Error> {
    if win_rate.is_finite() && (0.0..=1.0).contains(&win_rate) {
        return Ok(win_rate);
    }
    let which = prompt.map(|index| format!(" for prompt {index}")).unwrap_or_default();
    Err(Error::Internal(format!(
        "router `{name}` returned {win_rate}{which}, outside [0, 1]"
    )))
}

/// Applies `work` to `prompts` a batch at a time, in order, on this thread: for work that
/// waits on an API, where a batch is one request and a request per prompt would cost a
/// round trip each. `work` must answer every prompt of its batch.
pub fn batched_map<R>(
    prompts: &[String],
    batch: usize,
    progress: &Progress,
    work: impl Fn(&[&str]) -> Result<Vec<R>, Error>,
) -> Result<Vec<R>, Error> {
    let mut results = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(batch.max(1)) {
        let texts: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let answers = work(&texts)?;
        if answers.len() != chunk.len() {
            return Err(Error::Internal(format!(
                "{} results for a batch of {} prompts",
                answers.len(),
                chunk.len()
            )));
        }
        results.extend(answers);
        progress.advance(chunk.len());
    }
    Ok(results)
}

/// Applies `work` to every item on all cores and returns the results in item order; the
/// first error wins. Small chunks are handed out dynamically, which keeps both cores busy
/// when items vary in cost (prompt lengths do).
pub fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    progress: &Progress,
    work: impl Fn(usize, &T) -> Result<R, Error> + Sync,
) -> Result<Vec<R>, Error> {
    const CHUNK: usize = 64;
    let workers = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(items.len().div_ceil(CHUNK).max(1));
    let next_chunk = AtomicUsize::new(0);
    let parts: Vec<Result<Vec<(usize, R)>, Error>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut finished = Vec::new();
                    loop {
                        let start = next_chunk.fetch_add(CHUNK, Ordering::Relaxed);
                        if start >= items.len() {
                            return Ok(finished);
                        }
                        let end = (start + CHUNK).min(items.len());
                        for (index, item) in items.iter().enumerate().take(end).skip(start) {
                            finished.push((index, work(index, item)?));
                        }
                        progress.advance(end - start);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err(Error::Internal("a worker thread panicked".into())))
            })
            .collect()
    });
    let mut slots: Vec<Option<R>> = std::iter::repeat_with(|| None).take(items.len()).collect();
    for part in parts {
        for (index, result) in part? {
            slots[index] = Some(result);
        }
    }
    slots
        .into_iter()
        .map(|slot| slot.ok_or_else(|| Error::Internal("an item was not processed".into())))
        .collect()
}

/// A threshold that sends `strong_share` of `scores` to the strong model.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    pub threshold: f64,
    /// The share actually achieved on these prompts (ties can make it differ).
    pub achieved_share: f64,
    /// The threshold as printed: the fewest decimals (at least 5) that keep the same split.
    pub display: String,
}

impl Calibration {
    /// The threshold as printed (the fewest decimals that keep the split), for output that
    /// scripts copy into a config, so it says what the sentence says.
    #[must_use]
    pub fn printed_threshold(&self) -> f64 {
        self.display.parse().unwrap_or(self.threshold)
    }
}

/// A threshold chosen for quality rather than share ([`calibrate_for_quality`]).
#[derive(Debug, Clone)]
pub struct QualityCalibration {
    pub calibration: Calibration,
    /// The share of the performance gap the threshold recovers on these prompts.
    pub achieved_pgr: f64,
    /// What resampling the prompts says about that threshold, when asked for.
    pub bootstrap: Option<QualityBootstrap>,
}

/// How to resample a labelled set for [`calibrate_for_quality`].
#[derive(Debug, Clone, Copy)]
pub struct BootstrapOptions {
    pub replicates: usize,
    pub seed: u64,
    /// Choose the threshold that meets the target in at least this share of replicates,
    /// rather than on the sample itself.
    pub confidence: Option<f64>,
}

/// The chosen threshold seen across bootstrap replicates of the labelled prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct QualityBootstrap {
    /// Share of replicates in which the threshold recovers at least the target.
    pub meets_target: f64,
    /// 95% percentile interval of the share of the gap it recovers (replicates in which the
    /// strong model is no better than the weak one have no share to recover and are left out).
    pub pgr_interval: Option<(f64, f64)>,
    pub replicates: usize,
}

/// The threshold that recovers at least `target` of the performance gap between the weak
/// and the strong model on a labelled set — `outcomes` holds each prompt's (strong, weak)
/// scores — with the fewest strong calls. Only cuts between distinct scores can be served,
/// so those are the candidates; the whole set to the strong model recovers all of the gap,
/// so a target in (0, 1] is always met.
///
/// With `bootstrap`, the prompts are resampled with replacement: the result says in how many
/// replicates the threshold meets the target and gives an interval for the share it
/// recovers; with a `confidence`, the threshold is instead the one with the fewest strong
/// calls that meets the target in at least that share of replicates — a sample of a few
/// hundred labels is noisy, and the point choice meets its target only about half the time
/// on the traffic it stands for.
pub fn calibrate_for_quality(
    scores: &[f64],
    outcomes: &[(f64, f64)],
    target: f64,
    bootstrap: Option<BootstrapOptions>,
) -> Result<QualityCalibration, Error> {
    if !(target > 0.0 && target <= 1.0) {
        return Err(Error::invalid(format!("--target-pgr {target} is outside (0, 1]")));
    }
    if scores.is_empty() || scores.len() != outcomes.len() {
        return Err(Error::invalid("no labelled prompts to calibrate on"));
    }
    let gains: Vec<f64> = outcomes.iter().map(|(strong, weak)| strong - weak).collect();
    let gap: f64 = gains.iter().sum();
    if gap <= 0.0 {
        return Err(Error::invalid(
            "the strong model is not better than the weak one on these prompts: there is no quality to recover",
        ));
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    // Strong calls at each servable cut, fewest first; the last sends every prompt.
    let cuts: Vec<usize> = (1..=order.len())
        .filter(|&calls| {
            order
                .get(calls)
                .is_none_or(|&next| scores[next] < scores[order[calls - 1]])
        })
        .collect();
    let ordered_gains: Vec<f64> = order.iter().map(|&prompt| gains[prompt]).collect();
    let recovered = |calls: usize| ordered_gains[..calls].iter().sum::<f64>() / gap;
    let mut strong_calls = match bootstrap {
        Some(options) if options.confidence.is_some() => {
            choose_with_confidence(&ordered_gains, &cuts, target, options)?
        }
        _ => cuts
            .iter()
            .copied()
            .find(|&calls| recovered(calls) >= target)
            .unwrap_or(order.len()),
    };
    strong_calls = strong_calls.min(order.len());
    let resampled = bootstrap
        .filter(|options| options.replicates > 0)
        .map(|options| resample_cut(&ordered_gains, strong_calls, target, options));
    #[allow(clippy::cast_precision_loss)]
    let share = strong_calls as f64 / scores.len() as f64;
    Ok(QualityCalibration {
        calibration: calibrate(scores, share)?,
        achieved_pgr: recovered(strong_calls),
        bootstrap: resampled,
    })
}

/// One bootstrap replicate's multiplicity of each prompt (in `ordered_gains`' order).
fn replicate_counts(rng: &mut crate::rng::SplitMix, counts: &mut [u32]) {
    counts.fill(0);
    let n = counts.len();
    for _ in 0..n {
        counts[rng.below(n)] += 1;
    }
}

/// A replicate meets the target at a cut when routing there keeps the weak model's quality
/// plus `target` of the gap — written without dividing, so a replicate in which the strong
/// model is no better still counts (sending every prompt to the strong model always meets it).
fn meets(gained: f64, gap: f64, target: f64, sends_all: bool) -> bool {
    sends_all || gained >= target * gap - 1e-12
}

/// The fewest strong calls among `cuts` that meet `target` in at least `confidence` of the
/// replicates.
fn choose_with_confidence(
    ordered_gains: &[f64],
    cuts: &[usize],
    target: f64,
    options: BootstrapOptions,
) -> Result<usize, Error> {
    let Some(confidence) = options.confidence else {
        return Err(Error::Internal("no confidence to choose with".into()));
    };
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(Error::invalid(format!("--confidence {confidence} is outside (0, 1)")));
    }
    if options.replicates == 0 {
        return Err(Error::invalid(
            "--confidence needs bootstrap replicates (--bootstrap > 0)",
        ));
    }
    let n = ordered_gains.len();
    let mut met = vec![0_usize; cuts.len()];
    let mut counts = vec![0_u32; n];
    let mut rng = crate::rng::SplitMix::new(options.seed);
    for _ in 0..options.replicates {
        replicate_counts(&mut rng, &mut counts);
        let gap: f64 = ordered_gains
            .iter()
            .zip(&counts)
            .map(|(gain, count)| gain * f64::from(*count))
            .sum();
        let mut gained = 0.0;
        let mut position = 0;
        for (slot, &calls) in cuts.iter().enumerate() {
            while position < calls {
                gained += ordered_gains[position] * f64::from(counts[position]);
                position += 1;
            }
            if meets(gained, gap, target, calls == n) {
                met[slot] += 1;
            }
        }
    }
    #[allow(clippy::cast_precision_loss)]
    let needed = confidence * options.replicates as f64;
    Ok(cuts
        .iter()
        .zip(&met)
        .find(|(_, hits)| {
            #[allow(clippy::cast_precision_loss)]
            let hits = **hits as f64;
            hits >= needed
        })
        .map_or(n, |(&calls, _)| calls))
}

/// The replicates' view of sending the first `strong_calls` prompts to the strong model.
fn resample_cut(
    ordered_gains: &[f64],
    strong_calls: usize,
    target: f64,
    options: BootstrapOptions,
) -> QualityBootstrap {
    let n = ordered_gains.len();
    let mut counts = vec![0_u32; n];
    let mut rng = crate::rng::SplitMix::new(options.seed);
    let mut met = 0_usize;
    let mut shares = Vec::with_capacity(options.replicates);
    for _ in 0..options.replicates {
        replicate_counts(&mut rng, &mut counts);
        let weighted = |range: std::ops::Range<usize>| -> f64 {
            ordered_gains[range.clone()]
                .iter()
                .zip(&counts[range])
                .map(|(gain, count)| gain * f64::from(*count))
                .sum()
        };
        let gained = weighted(0..strong_calls);
        let gap = gained + weighted(strong_calls..n);
        if meets(gained, gap, target, strong_calls == n) {
            met += 1;
        }
        if gap > 0.0 {
            shares.push(gained / gap);
        }
    }
    shares.sort_by(f64::total_cmp);
    let pgr_interval = (!shares.is_empty()).then(|| {
        (
            crate::eval::metrics::numpy_percentile(&shares, 2.5),
            crate::eval::metrics::numpy_percentile(&shares, 97.5),
        )
    });
    #[allow(clippy::cast_precision_loss)]
    let meets_target = met as f64 / options.replicates as f64;
    QualityBootstrap {
        meets_target,
        pgr_interval,
        replicates: options.replicates,
    }
}

/// Picks the threshold between the k-th and (k+1)-th highest scores, k = round(share * n),
/// so exactly that share of these prompts scores at or above it. Where ties make the exact
/// share impossible, the achievable share nearest to it is chosen.
pub fn calibrate(scores: &[f64], strong_share: f64) -> Result<Calibration, Error> {
    if !(0.0..=1.0).contains(&strong_share) {
        return Err(Error::invalid(format!(
            "--strong-model-pct {strong_share} is outside [0, 1]"
        )));
    }
    if scores.is_empty() {
        return Err(Error::invalid("no prompts to calibrate on"));
    }
    let mut descending = scores.to_vec();
    descending.sort_by(|a, b| b.total_cmp(a));
    let n = descending.len();
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let wanted = (strong_share * n as f64).round() as usize;
    let share_at = |threshold: f64| {
        #[allow(clippy::cast_precision_loss)]
        let share = descending.partition_point(|score| *score >= threshold) as f64 / n as f64;
        share
    };
    let threshold_for = |k: usize| -> f64 {
        if k == 0 {
            next_up(descending[0]).min(1.0)
        } else if k == n {
            descending[n - 1]
        } else if descending[k] < descending[k - 1] {
            f64::midpoint(descending[k], descending[k - 1])
        } else {
            descending[k - 1]
        }
    };
    let mut threshold = threshold_for(wanted);
    if wanted > 0 && wanted < n && descending[wanted] == descending[wanted - 1] {
        // Tied at the cut: either include the whole tie or exclude it, whichever is closer.
        let tied = descending[wanted];
        let include = tied;
        let exclude = next_up(tied);
        #[allow(clippy::cast_precision_loss)]
        let target = wanted as f64 / n as f64;
        threshold = if (share_at(include) - target).abs() <= (share_at(exclude) - target).abs() {
            include
        } else {
            exclude
        };
    }
    let achieved_share = share_at(threshold);
    let display = shortest_display(threshold, |candidate| {
        (share_at(candidate) - achieved_share).abs() < f64::EPSILON
    });
    Ok(Calibration {
        threshold,
        achieved_share,
        display,
    })
}

/// The fewest decimals (5 to 17) whose rounded value still satisfies `keeps_split`.
fn shortest_display(value: f64, keeps_split: impl Fn(f64) -> bool) -> String {
    for decimals in 5..=17 {
        let text = format!("{value:.decimals$}");
        if text.parse::<f64>().is_ok_and(&keeps_split) {
            return text;
        }
    }
    format!("{value}")
}

/// The smallest f64 greater than `value` (for non-negative finite values).
fn next_up(value: f64) -> f64 {
    if value.is_nan() || value == f64::INFINITY {
        return value;
    }
    if value == 0.0 {
        return f64::from_bits(1);
    }
    let bits = value.to_bits();
    f64::from_bits(if value > 0.0 { bits + 1 } else { bits - 1 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routers::LengthRouter;

    #[test]
    fn quality_calibration_sends_the_fewest_prompts_that_recover_the_target() {
        // The strong model is better on exactly the three highest-scored of ten prompts.
        let scores: Vec<f64> = (0..10).map(|i| f64::from(i) / 10.0).collect();
        let outcomes: Vec<(f64, f64)> = (0..10).map(|i| if i >= 7 { (1.0, 0.0) } else { (1.0, 1.0) }).collect();
        let all = calibrate_for_quality(&scores, &outcomes, 1.0, None).unwrap();
        assert!((all.calibration.achieved_share - 0.3).abs() < 1e-12, "{all:?}");
        assert!((all.achieved_pgr - 1.0).abs() < 1e-12);
        let most = calibrate_for_quality(&scores, &outcomes, 0.6, None).unwrap();
        assert!((most.calibration.achieved_share - 0.2).abs() < 1e-12, "{most:?}");
        assert!((most.achieved_pgr - 2.0 / 3.0).abs() < 1e-12);
        // The threshold sends exactly those prompts.
        let sent = scores
            .iter()
            .filter(|score| **score >= most.calibration.threshold)
            .count();
        assert_eq!(sent, 2);
        // A tie at the cut is sent whole or not at all: here all of 0.9's three prompts.
        let tied = [0.9, 0.9, 0.9, 0.1];
        let outcomes = [(1.0, 0.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0)];
        let whole = calibrate_for_quality(&tied, &outcomes, 0.5, None).unwrap();
        assert!((whole.calibration.achieved_share - 0.75).abs() < 1e-12, "{whole:?}");
        // Nothing to recover, or a target outside (0, 1]: an error, not a threshold.
        assert!(calibrate_for_quality(&tied, &[(1.0, 1.0); 4], 0.5, None).is_err());
        assert!(calibrate_for_quality(&scores, &[(1.0, 0.0); 10], 0.0, None).is_err());
        assert!(calibrate_for_quality(&scores, &[(1.0, 0.0); 10], 1.5, None).is_err());
    }

    #[test]
    fn quality_calibration_with_confidence_pays_for_a_noisy_sample() {
        // 200 prompts; the strong model's advantage rises with the score but is noisy:
        // prompt i gains 1 with probability i/200, else loses 1 with probability 0.1.
        let mut rng = crate::rng::SplitMix::new(11);
        let scores: Vec<f64> = (0..200).map(|i| f64::from(i) / 200.0).collect();
        let outcomes: Vec<(f64, f64)> = scores
            .iter()
            .map(|&score| {
                let draw = rng.next_unit();
                if draw < score {
                    (1.0, 0.0)
                } else if draw < score + 0.1 {
                    (0.0, 1.0)
                } else {
                    (1.0, 1.0)
                }
            })
            .collect();
        let options = |confidence| BootstrapOptions {
            replicates: 500,
            seed: 3,
            confidence,
        };
        let point = calibrate_for_quality(&scores, &outcomes, 0.8, Some(options(None))).unwrap();
        let careful = calibrate_for_quality(&scores, &outcomes, 0.8, Some(options(Some(0.95)))).unwrap();
        let (point_boot, careful_boot) = (point.bootstrap.clone().unwrap(), careful.bootstrap.clone().unwrap());
        // The sample's own choice meets the target on the sample and in only some replicates;
        // the careful one sends more prompts and meets it in at least 95% of them.
        assert!(point.achieved_pgr >= 0.8, "{point:?}");
        assert!(point_boot.meets_target < 0.95, "{point_boot:?}");
        assert!(careful_boot.meets_target >= 0.95, "{careful_boot:?}");
        assert!(
            careful.calibration.achieved_share > point.calibration.achieved_share,
            "{point:?} {careful:?}"
        );
        assert!(careful.achieved_pgr >= point.achieved_pgr);
        let (low, high) = point_boot.pgr_interval.unwrap();
        assert!(
            low <= point.achieved_pgr && point.achieved_pgr <= high,
            "{point_boot:?}"
        );
        assert!(low < high);
        assert_eq!(point_boot.replicates, 500);
    }

    #[test]
    fn quality_calibration_with_confidence_costs_nothing_when_the_sample_is_clean() {
        // All of the gap sits in the three highest scores: every replicate agrees.
        let scores: Vec<f64> = (0..10).map(|i| f64::from(i) / 10.0).collect();
        let outcomes: Vec<(f64, f64)> = (0..10).map(|i| if i >= 7 { (1.0, 0.0) } else { (1.0, 1.0) }).collect();
        let options = BootstrapOptions {
            replicates: 300,
            seed: 1,
            confidence: Some(0.99),
        };
        let careful = calibrate_for_quality(&scores, &outcomes, 1.0, Some(options)).unwrap();
        assert!((careful.calibration.achieved_share - 0.3).abs() < 1e-12, "{careful:?}");
        let boot = careful.bootstrap.unwrap();
        assert!((boot.meets_target - 1.0).abs() < 1e-12, "{boot:?}");
        // A confidence must be a share strictly inside (0, 1) and needs replicates.
        for (confidence, replicates) in [(1.0, 300), (0.0, 300), (0.9, 0)] {
            let options = BootstrapOptions {
                replicates,
                seed: 1,
                confidence: Some(confidence),
            };
            assert!(calibrate_for_quality(&scores, &outcomes, 0.9, Some(options)).is_err());
        }
    }

    #[test]
    fn calibration_hits_the_requested_share() {
        let scores: Vec<f64> = (0..1000).map(|i| f64::from(i) / 1000.0).collect();
        for share in [0.0, 0.1, 0.25, 0.5, 0.8, 1.0] {
            let calibration = calibrate(&scores, share).unwrap();
            assert!(
                (calibration.achieved_share - share).abs() < 1e-9,
                "{share}: {calibration:?}"
            );
            let printed: f64 = calibration.display.parse().unwrap();
            #[allow(clippy::cast_precision_loss)]
            let printed_share = scores.iter().filter(|s| **s >= printed).count() as f64 / 1000.0;
            assert!((printed_share - share).abs() < 1e-9, "{share}: {printed}");
        }
    }

    #[test]
    fn close_scores_get_more_decimals() {
        let scores = [0.116_000_1, 0.116_000_2, 0.9, 0.1];
        let calibration = calibrate(&scores, 0.5).unwrap();
        assert_eq!(calibration.achieved_share, 0.5);
        assert!(calibration.display.len() > 7, "{}", calibration.display);
    }

    #[test]
    fn ties_choose_the_nearest_achievable_share() {
        let scores = [0.5, 0.5, 0.5, 0.5, 0.1];
        let calibration = calibrate(&scores, 0.4).unwrap();
        // Either all four tied prompts (80%) or none (0%) go strong: 80% is nearer to 40%.
        assert_eq!(calibration.achieved_share, 0.8);
        assert!(calibrate(&scores, 1.5).is_err());
        assert!(calibrate(&[], 0.5).is_err());
    }

    #[test]
    fn score_all_keeps_prompt_order() {
        let prompts: Vec<String> = (0..300).map(|i| "x".repeat(i)).collect();
        let scores = score_all(&LengthRouter, "length", &prompts).unwrap();
        assert_eq!(scores.len(), 300);
        assert!(scores.windows(2).all(|pair| pair[0] < pair[1]));
    }
}
