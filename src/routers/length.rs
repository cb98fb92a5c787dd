//! The prompt-length baseline: longer prompts go to the strong model.
//!
//! Long prompts carry more context, constraints and reasoning steps, which is where weak
//! models fail first; on RouteLLM's benchmarks this trivial rule recovers more of the gap
//! than a random router. Every trained router must beat it to be worth its cost.

use super::{Router, RouterError, ScoringCost};

/// Characters at which the win rate reaches 0.5.
const HALF_POINT_CHARS: f64 = 1000.0;

pub struct LengthRouter;

impl Router for LengthRouter {
    fn strong_win_rate(&self, prompt: &str) -> Result<f64, RouterError> {
        #[allow(clippy::cast_precision_loss)]
        let chars = prompt.chars().count() as f64;
        // Monotone in length and inside [0, 1): only the ordering matters for routing.
        Ok(chars / (chars + HALF_POINT_CHARS))
    }

    fn scoring_cost(&self) -> ScoringCost {
        ScoringCost::Inline
    }

    fn cache_key(&self) -> Option<String> {
        Some("length-v1".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longer_prompts_score_higher_and_stay_in_range() {
        let router = LengthRouter;
        let short = router.strong_win_rate("hi").unwrap();
        let long = router.strong_win_rate(&"word ".repeat(500)).unwrap();
        assert!(short < long);
        assert_eq!(router.strong_win_rate("").unwrap(), 0.0);
        assert!(long < 1.0);
        assert!((router.strong_win_rate(&"x".repeat(1000)).unwrap() - 0.5).abs() < 1e-12);
    }
}
