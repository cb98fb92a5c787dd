//! The field's routing metrics, computed exactly as RouteLLM's `evaluate.py` does where
//! it is right, and correctly where it is not.
//!
//! A router's curve has one point per threshold: the share of prompts sent to the strong
//! model and the benchmark score that routing achieves. Thresholds are the quantile edges
//! of the router's own scores (`pd.qcut(scores, n)`); unlike `qcut`, tied edges are kept
//! rather than raising, and they simply produce coincident points.

use serde::Serialize;

use crate::rng::SplitMix;

/// One prompt's outcome under each model. A score is `sum / count`, so a benchmark whose
/// prompts carry several judgement rows (MT Bench: two turns) averages rows, as pandas does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    pub strong_sum: f64,
    pub strong_count: f64,
    pub weak_sum: f64,
    pub weak_count: f64,
}

impl Outcome {
    /// A single scored answer per model (MMLU, GSM8K, generic benchmarks).
    #[must_use]
    pub fn single(strong: f64, weak: f64) -> Self {
        Self {
            strong_sum: strong,
            strong_count: 1.0,
            weak_sum: weak,
            weak_count: 1.0,
        }
    }

    /// The strong model's score on this prompt (its rows averaged).
    #[must_use]
    pub fn strong_mean(&self) -> f64 {
        self.strong_sum / self.strong_count
    }

    /// The weak model's score on this prompt (its rows averaged).
    #[must_use]
    pub fn weak_mean(&self) -> f64 {
        self.weak_sum / self.weak_count
    }
}

/// One point of a router's curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CurvePoint {
    pub threshold: f64,
    pub strong_pct: f64,
    pub score: f64,
}

/// How the oracle counts strong calls at a given share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OracleCalls {
    /// `n * share` strong calls, fractional allowed (RouteLLM's MMLU and GSM8K formula).
    Fractional,
    /// `int(n * share)` strong calls (RouteLLM's MT Bench).
    Whole,
}

/// The `num_results + 1` quantile edges of `scores` with linear interpolation, replicating
/// `pd.qcut(scores, num_results, retbins=True)` bit for bit (`np.linspace` quantiles,
/// `np.percentile`'s virtual index and lerp), without its duplicate-edge error.
#[must_use]
pub fn quantile_edges(scores: &[f64], num_results: usize) -> Vec<f64> {
    let mut sorted = scores.to_vec();
    sorted.sort_by(f64::total_cmp);
    #[allow(clippy::cast_precision_loss)]
    let step = 1.0 / num_results as f64;
    (0..=num_results)
        .map(|i| {
            #[allow(clippy::cast_precision_loss)]
            let q = if i == num_results { 1.0 } else { i as f64 * step };
            numpy_percentile(&sorted, q * 100.0)
        })
        .collect()
}

/// `np.percentile(sorted, percent, method="linear")` on already sorted data.
#[must_use]
pub fn numpy_percentile(sorted: &[f64], percent: f64) -> f64 {
    // numpy's "linear" method is Hyndman-Fan type 7: alpha = beta = 1.
    const ALPHA: f64 = 1.0;
    const BETA: f64 = 1.0;
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    let q = percent / 100.0;
    #[allow(clippy::cast_precision_loss)]
    let virtual_index = (n as f64) * q + (ALPHA + q * (1.0 - ALPHA - BETA)) - 1.0;
    #[allow(clippy::cast_precision_loss)]
    let last = (n - 1) as f64;
    let virtual_index = virtual_index.clamp(0.0, last);
    let previous = virtual_index.floor();
    let next = (previous + 1.0).min(last);
    let gamma = virtual_index - previous;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let (a, b) = (sorted[previous as usize], sorted[next as usize]);
    // numpy's _lerp: interpolate from the nearer end for accuracy.
    let difference = b - a;
    if gamma >= 0.5 {
        b - difference * (1.0 - gamma)
    } else {
        a + difference * gamma
    }
}

/// Scores sorted for repeated threshold queries: descending scores with prefix sums of
/// what routing each prompt to the strong model changes.
pub struct RoutingTable {
    descending: Vec<f64>,
    gain_sum: Vec<f64>,
    gain_count: Vec<f64>,
    weak_sum: f64,
    weak_count: f64,
    len: usize,
}

impl RoutingTable {
    #[must_use]
    pub fn new(scores: &[f64], outcomes: &[Outcome]) -> Self {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
        let mut gain_sum = Vec::with_capacity(order.len() + 1);
        let mut gain_count = Vec::with_capacity(order.len() + 1);
        let (mut sum, mut count) = (0.0, 0.0);
        gain_sum.push(sum);
        gain_count.push(count);
        for &index in &order {
            let outcome = &outcomes[index];
            sum += outcome.strong_sum - outcome.weak_sum;
            count += outcome.strong_count - outcome.weak_count;
            gain_sum.push(sum);
            gain_count.push(count);
        }
        Self {
            descending: order.iter().map(|&index| scores[index]).collect(),
            gain_sum,
            gain_count,
            weak_sum: outcomes.iter().map(|o| o.weak_sum).sum(),
            weak_count: outcomes.iter().map(|o| o.weak_count).sum(),
            len: scores.len(),
        }
    }

    /// Strong share (%) and score when prompts scoring `>= threshold` (or `>` if `strict`) go strong.
    #[must_use]
    pub fn route(&self, threshold: f64, strict: bool, scale: f64) -> (f64, f64) {
        let strong = if strict {
            self.descending.partition_point(|score| *score > threshold)
        } else {
            self.descending.partition_point(|score| *score >= threshold)
        };
        let score = (self.weak_sum + self.gain_sum[strong]) / (self.weak_count + self.gain_count[strong]);
        #[allow(clippy::cast_precision_loss)]
        let pct = strong as f64 / self.len as f64 * 100.0;
        (pct, score * scale)
    }

    /// The curve at every quantile edge; the last edge is strict, as in RouteLLM.
    #[must_use]
    pub fn curve(&self, edges: &[f64], scale: f64) -> Vec<CurvePoint> {
        edges
            .iter()
            .enumerate()
            .map(|(i, &threshold)| {
                let (strong_pct, score) = self.route(threshold, i + 1 == edges.len(), scale);
                CurvePoint {
                    threshold,
                    strong_pct,
                    score,
                }
            })
            .collect()
    }
}

/// The curve of `scores` on `outcomes` at `num_results` quantile bins.
#[must_use]
pub fn curve(scores: &[f64], outcomes: &[Outcome], num_results: usize, scale: f64) -> Vec<CurvePoint> {
    RoutingTable::new(scores, outcomes).curve(&quantile_edges(scores, num_results), scale)
}

/// A benchmark's score when every prompt goes to one model.
#[must_use]
pub fn model_score(outcomes: &[Outcome], strong: bool, scale: f64) -> f64 {
    let (sum, count) = outcomes.iter().fold((0.0, 0.0), |(sum, count), o| {
        if strong {
            (sum + o.strong_sum, count + o.strong_count)
        } else {
            (sum + o.weak_sum, count + o.weak_count)
        }
    });
    sum / count * scale
}

/// Points sorted by strong share; ties keep their order (they are equal points, see module docs).
fn by_share(points: &[CurvePoint]) -> Vec<CurvePoint> {
    let mut sorted = points.to_vec();
    sorted.sort_by(|a, b| a.strong_pct.total_cmp(&b.strong_pct));
    sorted
}

/// Trapezoid area of score against strong share in [0, 1] (`np.trapz(score, pct / 100)`).
#[must_use]
pub fn auc(points: &[CurvePoint]) -> f64 {
    by_share(points)
        .windows(2)
        .map(|pair| (pair[1].strong_pct - pair[0].strong_pct) / 100.0 * (pair[0].score + pair[1].score) / 2.0)
        .sum()
}

/// Average performance gap recovered: the area between the curve and the weak model's
/// line, over the area between the strong and weak lines, on the curve's own range.
#[must_use]
pub fn apgr(points: &[CurvePoint], weak: f64, strong: f64) -> f64 {
    let sorted = by_share(points);
    let (Some(first), Some(last)) = (sorted.first(), sorted.last()) else {
        return f64::NAN;
    };
    let width = (last.strong_pct - first.strong_pct) / 100.0;
    let weak_area = weak * width;
    let strong_area = strong * width;
    (auc(&sorted) - weak_area) / (strong_area - weak_area)
}

/// Call-performance threshold: the smallest strong share (%) at which the piecewise-linear
/// curve reaches `fraction` of the gap between the weak and strong models.
///
/// RouteLLM uses `np.interp`, which silently returns nonsense for a curve that is not
/// monotone; walking the segments gives the first crossing for any curve. `None` when
/// the curve never reaches the target.
#[must_use]
pub fn cpt(points: &[CurvePoint], weak: f64, strong: f64, fraction: f64) -> Option<f64> {
    let target = weak + fraction * (strong - weak);
    let sorted = by_share(points);
    let first = sorted.first()?;
    if first.score >= target {
        return Some(first.strong_pct);
    }
    sorted.windows(2).find_map(|pair| {
        let (a, b) = (pair[0], pair[1]);
        (a.score < target && b.score >= target)
            .then(|| a.strong_pct + (target - a.score) / (b.score - a.score) * (b.strong_pct - a.strong_pct))
    })
}

/// The oracle's score at strong share `share` in [0, 1]: strong calls go to the prompts
/// where the strong model gains most over the weak one (RouteLLM's `get_optimal_accuracy`).
#[must_use]
pub fn optimal_score(outcomes: &[Outcome], share: f64, calls: OracleCalls, scale: f64) -> f64 {
    let mut gains: Vec<f64> = outcomes
        .iter()
        .map(|o| o.strong_mean() - o.weak_mean())
        .filter(|gain| *gain > 0.0)
        .collect();
    gains.sort_by(|a, b| b.total_cmp(a));
    #[allow(clippy::cast_precision_loss)]
    let budget = outcomes.len() as f64 * share;
    let budget = match calls {
        OracleCalls::Fractional => budget,
        OracleCalls::Whole => budget.floor(),
    };
    let mut bonus = 0.0;
    let mut remaining = budget;
    for gain in gains {
        if remaining <= 0.0 {
            break;
        }
        bonus += gain * remaining.min(1.0);
        remaining -= 1.0;
    }
    let weak: f64 = outcomes.iter().map(Outcome::weak_mean).sum();
    #[allow(clippy::cast_precision_loss)]
    let n = outcomes.len() as f64;
    (weak + bonus) / n * scale
}

/// The oracle curve at 0, 10, ..., 100 % strong calls.
#[must_use]
pub fn optimal_curve(outcomes: &[Outcome], calls: OracleCalls, scale: f64) -> Vec<(f64, f64)> {
    (0..=10)
        .map(|step| {
            let pct = f64::from(step) * 10.0;
            (pct, optimal_score(outcomes, pct / 100.0, calls, scale))
        })
        .collect()
}

/// A 95% percentile-bootstrap interval for APGR: prompts resampled with replacement; each
/// replicate recomputes thresholds, the curve and both models' scores on its sample.
/// `score_sets` holds one score vector per router run (several for the random router, so
/// the interval also covers its own randomness); replicates cycle through them.
#[must_use]
pub fn apgr_bootstrap_ci(
    score_sets: &[Vec<f64>],
    outcomes: &[Outcome],
    num_results: usize,
    replicates: usize,
    seed: u64,
) -> Option<(f64, f64)> {
    let n = outcomes.len();
    if n == 0 || replicates == 0 || score_sets.is_empty() {
        return None;
    }
    let mut rng = SplitMix::new(seed);
    let mut values = Vec::with_capacity(replicates);
    let mut sample_scores = vec![0.0; n];
    let mut sample_outcomes = vec![Outcome::single(0.0, 0.0); n];
    for replicate in 0..replicates {
        let scores = &score_sets[replicate % score_sets.len()];
        for slot in 0..n {
            let index = rng.below(n);
            sample_scores[slot] = scores[index];
            sample_outcomes[slot] = outcomes[index];
        }
        let weak = model_score(&sample_outcomes, false, 1.0);
        let strong = model_score(&sample_outcomes, true, 1.0);
        if (strong - weak).abs() < f64::EPSILON {
            continue;
        }
        let points = curve(&sample_scores, &sample_outcomes, num_results, 1.0);
        let value = apgr(&points, weak, strong);
        if value.is_finite() {
            values.push(value);
        }
    }
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some((numpy_percentile(&values, 2.5), numpy_percentile(&values, 97.5)))
}

/// Averages curves point by point (the random router's runs), thresholds included.
#[must_use]
pub fn mean_curve(curves: &[Vec<CurvePoint>]) -> Vec<CurvePoint> {
    let Some(first) = curves.first() else {
        return Vec::new();
    };
    #[allow(clippy::cast_precision_loss)]
    let runs = curves.len() as f64;
    (0..first.len())
        .map(|i| {
            let (threshold, pct, score) = curves.iter().fold((0.0, 0.0, 0.0), |acc, curve| {
                (
                    acc.0 + curve[i].threshold,
                    acc.1 + curve[i].strong_pct,
                    acc.2 + curve[i].score,
                )
            });
            CurvePoint {
                threshold: threshold / runs,
                strong_pct: pct / runs,
                score: score / runs,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(strong_pct: f64, score: f64) -> CurvePoint {
        CurvePoint {
            threshold: 0.0,
            strong_pct,
            score,
        }
    }

    #[test]
    fn percentile_matches_numpy() {
        let data = [1.0, 2.0, 3.0, 4.0, 10.0];
        // np.percentile([1,2,3,4,10], [0, 25, 50, 90, 100]) = [1, 2, 3, 7.6, 10]
        assert_eq!(numpy_percentile(&data, 0.0), 1.0);
        assert_eq!(numpy_percentile(&data, 25.0), 2.0);
        assert_eq!(numpy_percentile(&data, 50.0), 3.0);
        assert!((numpy_percentile(&data, 90.0) - 7.6).abs() < 1e-12);
        assert_eq!(numpy_percentile(&data, 100.0), 10.0);
    }

    #[test]
    fn quantile_edges_match_pandas_qcut() {
        // pd.qcut([0.1, 0.4, 0.35, 0.8], 2, retbins=True)[1] = [0.1, 0.375, 0.8]
        assert_eq!(quantile_edges(&[0.1, 0.4, 0.35, 0.8], 2), vec![0.1, 0.375, 0.8]);
        // Ties produce duplicate edges, which qcut rejects; we keep them.
        let edges = quantile_edges(&[0.5; 6], 3);
        assert_eq!(edges, vec![0.5; 4]);
    }

    #[test]
    fn curve_routes_at_each_edge_with_strict_last() {
        // Scores and outcomes: prompt 0 needs the strong model, the others do not.
        let scores = [0.9, 0.1, 0.5, 0.3];
        let outcomes = [
            Outcome::single(1.0, 0.0),
            Outcome::single(1.0, 1.0),
            Outcome::single(0.0, 0.0),
            Outcome::single(1.0, 1.0),
        ];
        let points = curve(&scores, &outcomes, 2, 100.0);
        // Edges: 0.1, 0.4, 0.9. >=0.1: all strong (75%); >=0.4: {0.9, 0.5} (75%); >0.9: none (50%).
        assert_eq!(points.len(), 3);
        assert_eq!((points[0].strong_pct, points[0].score), (100.0, 75.0));
        assert_eq!((points[1].strong_pct, points[1].score), (50.0, 75.0));
        assert_eq!((points[2].strong_pct, points[2].score), (0.0, 50.0));
    }

    #[test]
    fn auc_and_apgr_by_hand() {
        // A perfect-then-flat curve: 0% → 50, 50% → 100, 100% → 100.
        let points = [point(100.0, 100.0), point(0.0, 50.0), point(50.0, 100.0)];
        // Area: 0.5 * (50 + 100) / 2 + 0.5 * 100 = 37.5 + 50 = 87.5
        assert!((auc(&points) - 87.5).abs() < 1e-12);
        // APGR = (87.5 - 50) / (100 - 50) = 0.75
        assert!((apgr(&points, 50.0, 100.0) - 0.75).abs() < 1e-12);
        // A straight line recovers half the gap.
        let line = [point(0.0, 50.0), point(100.0, 100.0)];
        assert!((apgr(&line, 50.0, 100.0) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn cpt_interpolates_and_handles_non_monotone_curves() {
        let line = [point(0.0, 50.0), point(100.0, 100.0)];
        assert!((cpt(&line, 50.0, 100.0, 0.2).unwrap() - 20.0).abs() < 1e-9);
        assert!((cpt(&line, 50.0, 100.0, 0.8).unwrap() - 80.0).abs() < 1e-9);
        // Rises past the 50% target at 20%, dips, rises again: the first crossing counts.
        let bumpy = [
            point(0.0, 50.0),
            point(20.0, 80.0),
            point(40.0, 60.0),
            point(100.0, 100.0),
        ];
        let at_half = cpt(&bumpy, 50.0, 100.0, 0.5).unwrap();
        assert!((at_half - 50.0 / 3.0).abs() < 1e-9, "{at_half}");
        // A target the curve never reaches has no answer instead of a clamped guess.
        let low = [point(0.0, 50.0), point(100.0, 60.0)];
        assert_eq!(cpt(&low, 50.0, 100.0, 0.5), None);
    }

    #[test]
    fn optimal_matches_routellm_formula() {
        // 4 prompts: weak right on 2; strong alone right on 1 more.
        let outcomes = [
            Outcome::single(1.0, 1.0),
            Outcome::single(1.0, 1.0),
            Outcome::single(1.0, 0.0),
            Outcome::single(0.0, 0.0),
        ];
        assert_eq!(optimal_score(&outcomes, 0.0, OracleCalls::Fractional, 100.0), 50.0);
        // 10% of 4 = 0.4 strong calls: RouteLLM's min(0.4, 1) bonus.
        assert!((optimal_score(&outcomes, 0.1, OracleCalls::Fractional, 100.0) - 60.0).abs() < 1e-9);
        assert_eq!(optimal_score(&outcomes, 0.1, OracleCalls::Whole, 100.0), 50.0);
        assert_eq!(optimal_score(&outcomes, 1.0, OracleCalls::Fractional, 100.0), 75.0);
    }

    #[test]
    fn multi_row_outcomes_average_rows() {
        // MT Bench style: each question has two judgement rows per model.
        let outcomes = [
            Outcome {
                strong_sum: 18.0,
                strong_count: 2.0,
                weak_sum: 10.0,
                weak_count: 2.0,
            },
            Outcome {
                strong_sum: 16.0,
                strong_count: 2.0,
                weak_sum: 16.0,
                weak_count: 2.0,
            },
        ];
        assert_eq!(model_score(&outcomes, true, 1.0), 8.5);
        assert_eq!(model_score(&outcomes, false, 1.0), 6.5);
        let table = RoutingTable::new(&[0.9, 0.1], &outcomes);
        assert_eq!(table.route(0.5, false, 1.0), (50.0, 8.5));
    }

    #[test]
    fn bootstrap_interval_brackets_the_point_estimate() {
        let mut rng = SplitMix::new(1);
        let n = 400;
        let outcomes: Vec<Outcome> = (0..n)
            .map(|i| Outcome::single(f64::from(u8::from(i % 3 != 0)), f64::from(u8::from(i % 2 == 0))))
            .collect();
        let scores: Vec<f64> = (0..n).map(|_| rng.next_unit()).collect();
        let points = curve(&scores, &outcomes, 10, 1.0);
        let estimate = apgr(
            &points,
            model_score(&outcomes, false, 1.0),
            model_score(&outcomes, true, 1.0),
        );
        let (lo, hi) = apgr_bootstrap_ci(&[scores], &outcomes, 10, 200, 7).unwrap();
        assert!(lo < estimate && estimate < hi, "{lo} {estimate} {hi}");
        assert!(hi - lo < 0.5);
    }
}
