//! RouteLLM's `random` router: a uniform win rate, independent of the prompt.
//!
//! It is the baseline every trained router must beat, and it needs no artifacts, so a
//! fresh install can route immediately. At threshold `t` it sends a share `1 - t` of
//! traffic to the strong model.

use super::{Router, RouterError, ScoringCost};
use crate::rng::AtomicSplitMix;

/// Lock-free uniform scores from a SplitMix64 sequence shared by all requests.
pub struct RandomRouter {
    draws: AtomicSplitMix,
}

impl RandomRouter {
    /// A router whose sequence is fixed by `seed` (for reproducible evaluation).
    #[must_use]
    pub fn with_seed(seed: u64) -> Self {
        Self {
            draws: AtomicSplitMix::new(seed),
        }
    }

    /// A router seeded from entropy, so separate processes draw different sequences.
    #[must_use]
    pub fn from_entropy() -> Self {
        Self {
            draws: AtomicSplitMix::from_entropy(),
        }
    }

    /// The next uniform draw in [0, 1); concurrent requests never share a draw.
    #[must_use]
    pub fn next_uniform(&self) -> f64 {
        self.draws.next_unit()
    }
}

impl Router for RandomRouter {
    fn strong_win_rate(&self, _prompt: &str) -> Result<f64, RouterError> {
        Ok(self.next_uniform())
    }

    fn scoring_cost(&self) -> ScoringCost {
        ScoringCost::Inline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_uniform_in_unit_interval() {
        let router = RandomRouter::with_seed(7);
        let draws: Vec<f64> = (0..20_000).map(|_| router.next_uniform()).collect();
        assert!(draws.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = draws.iter().sum::<f64>() / 20_000.0;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        let below_tenth = draws.iter().filter(|x| **x < 0.1).count();
        assert!((1_700..2_300).contains(&below_tenth), "{below_tenth}");
    }

    #[test]
    fn same_seed_same_sequence_different_seed_differs() {
        let a = RandomRouter::with_seed(1);
        let b = RandomRouter::with_seed(1);
        let c = RandomRouter::with_seed(2);
        let seq_a: Vec<f64> = (0..5).map(|_| a.next_uniform()).collect();
        let seq_b: Vec<f64> = (0..5).map(|_| b.next_uniform()).collect();
        let seq_c: Vec<f64> = (0..5).map(|_| c.next_uniform()).collect();
        assert_eq!(seq_a, seq_b);
        assert_ne!(seq_a, seq_c);
    }
}
