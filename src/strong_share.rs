//! `strong_share:`: a router's default threshold that follows its live traffic, so a
//! chosen share of requests keeps going to the strong model when the prompts drift.
//!
//! A threshold calibrated once sends the intended share only while traffic looks like
//! the calibration prompts; a new product feature or a new customer moves the scores
//! and, with them, the strong model's bill. With `strong_share.<router>` set, the default
//! threshold of `router-<name>` (and of aliases without a threshold) is recomputed from
//! the router's last `strong_share_window` scores with `calibrate`'s rule, so that share
//! of those prompts would have scored at or above it. Scores do not depend on the
//! threshold, so tracking them has no feedback loop. Until the window holds
//! [`MIN_TRACKED_SCORES`] scores the configured `thresholds.<router>` applies.

use std::sync::Mutex;

use crate::scoring;

/// Scores a window needs before its threshold replaces the configured one: fewer would
/// let a handful of early requests set the split for everyone.
pub const MIN_TRACKED_SCORES: usize = 100;

/// The default `strong_share_window`.
pub const DEFAULT_WINDOW: usize = 1000;

/// The largest `strong_share_window`: each score costs 8 bytes per loaded router, and a
/// recomputation sorts the window.
pub const MAX_WINDOW: usize = 1_000_000;

/// A router's most recent scores and the threshold last computed from them.
#[derive(Debug)]
pub struct ScoreWindow {
    inner: Mutex<Ring>,
}

#[derive(Debug)]
struct Ring {
    scores: Vec<f64>,
    capacity: usize,
    /// Where the next score goes once the ring is full.
    next: usize,
    /// Scores recorded since start-up.
    recorded: u64,
    cached: Option<Cached>,
}

#[derive(Debug, Clone, Copy)]
struct Cached {
    share: f64,
    recorded: u64,
    threshold: f64,
}

impl ScoreWindow {
    /// An empty window of the last `capacity` scores (at least [`MIN_TRACKED_SCORES`]).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(MIN_TRACKED_SCORES);
        Self {
            inner: Mutex::new(Ring {
                scores: Vec::with_capacity(capacity.min(MIN_TRACKED_SCORES * 10)),
                capacity,
                next: 0,
                recorded: 0,
                cached: None,
            }),
        }
    }

    /// Adds a score the router gave a request (non-finite ones are not scores).
    pub fn record(&self, score: f64) {
        if !score.is_finite() {
            return;
        }
        let mut ring = self.lock();
        if ring.scores.len() < ring.capacity {
            ring.scores.push(score);
        } else {
            let next = ring.next;
            ring.scores[next] = score;
            ring.next = (next + 1) % ring.capacity;
        }
        ring.recorded += 1;
    }

    /// Forgets every score: a router replaced by a reload scores on another scale.
    pub fn clear(&self) {
        let mut ring = self.lock();
        ring.scores.clear();
        ring.next = 0;
        ring.cached = None;
    }

    /// How many scores the window holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().scores.len()
    }

    /// Whether no score has been recorded yet.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The threshold that sends `share` of the window's scores to the strong model, or
    /// `None` while it holds fewer than [`MIN_TRACKED_SCORES`]. Recomputed when the share
    /// changes or a hundredth of the window is new, so a busy router sorts its window
    /// once per that many requests rather than on every one.
    #[must_use]
    pub fn threshold(&self, share: f64) -> Option<f64> {
        let mut ring = self.lock();
        if ring.scores.len() < MIN_TRACKED_SCORES {
            return None;
        }
        let refresh = (ring.capacity / 100).max(1) as u64;
        if let Some(cached) = ring.cached
            && cached.share.to_bits() == share.to_bits()
            && ring.recorded - cached.recorded < refresh
        {
            return Some(cached.threshold);
        }
        let threshold = scoring::calibrate(&ring.scores, share).ok()?.threshold;
        ring.cached = Some(Cached {
            share,
            recorded: ring.recorded,
            threshold,
        });
        Some(threshold)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        // Every update leaves the ring consistent, so a panic elsewhere cannot poison its data.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
#[allow(clippy::cast_precision_loss)]
mod tests {
    use super::*;

    fn share_at(scores: &[f64], threshold: f64) -> f64 {
        scores.iter().filter(|score| **score >= threshold).count() as f64 / scores.len() as f64
    }

    #[test]
    fn no_threshold_until_enough_scores() {
        let window = ScoreWindow::new(1000);
        for i in 0..MIN_TRACKED_SCORES - 1 {
            window.record(i as f64 / 100.0);
        }
        assert_eq!(window.threshold(0.3), None);
        window.record(0.5);
        let threshold = window.threshold(0.3).unwrap();
        let scores: Vec<f64> = (0..MIN_TRACKED_SCORES - 1)
            .map(|i| i as f64 / 100.0)
            .chain([0.5])
            .collect();
        assert!((share_at(&scores, threshold) - 0.3).abs() < 0.011, "{threshold}");
    }

    #[test]
    fn threshold_follows_the_most_recent_scores() {
        let window = ScoreWindow::new(200);
        // Low scores first, then a drift upwards that fills the whole window.
        for i in 0..200 {
            window.record(0.1 + f64::from(i) / 10_000.0);
        }
        let before = window.threshold(0.5).unwrap();
        assert!(before < 0.2, "{before}");
        for i in 0..200 {
            window.record(0.8 + f64::from(i) / 10_000.0);
        }
        let after = window.threshold(0.5).unwrap();
        assert!(after > 0.8, "{after}");
        assert_eq!(window.len(), 200);
        // Exactly half of the window's scores are at or above it.
        let recent: Vec<f64> = (0..200).map(|i| 0.8 + f64::from(i) / 10_000.0).collect();
        assert!((share_at(&recent, after) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn a_cleared_window_waits_for_new_scores_and_forgets_the_old() {
        let window = ScoreWindow::new(200);
        for i in 0..200 {
            window.record(0.1 + f64::from(i) / 10_000.0);
        }
        assert!(window.threshold(0.5).unwrap() < 0.2);
        window.clear();
        assert!(window.is_empty());
        assert_eq!(window.threshold(0.5), None, "no cached threshold survives");
        for i in 0..MIN_TRACKED_SCORES {
            window.record(0.8 + f64::from(u32::try_from(i).unwrap()) / 10_000.0);
        }
        assert!(window.threshold(0.5).unwrap() > 0.8, "only the new scores count");
    }

    #[test]
    fn share_change_recomputes_at_once() {
        let window = ScoreWindow::new(1000);
        for i in 0..500 {
            window.record(f64::from(i) / 500.0);
        }
        let third = window.threshold(0.3).unwrap();
        let two_thirds = window.threshold(0.7).unwrap();
        assert!(two_thirds < third, "{two_thirds} {third}");
    }

    #[test]
    fn cached_threshold_is_refreshed_as_scores_arrive() {
        let window = ScoreWindow::new(100);
        for _ in 0..100 {
            window.record(0.2);
        }
        let first = window.threshold(0.5).unwrap();
        // The refresh interval for a window of 100 is one score.
        for _ in 0..100 {
            window.record(0.9);
        }
        let second = window.threshold(0.5).unwrap();
        assert!(second > first, "{first} {second}");
    }

    #[test]
    fn non_finite_scores_are_ignored() {
        let window = ScoreWindow::new(100);
        window.record(f64::NAN);
        window.record(f64::INFINITY);
        assert!(window.is_empty());
    }

    #[test]
    fn capacity_has_a_floor() {
        let window = ScoreWindow::new(3);
        for i in 0..MIN_TRACKED_SCORES {
            window.record(i as f64);
        }
        assert_eq!(window.len(), MIN_TRACKED_SCORES);
        assert!(window.threshold(0.5).is_some());
    }
}
