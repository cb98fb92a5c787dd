//! Shared by the trainers' tests: the identities the planted datasets use.

use routellm::train::SplitOptions;

/// The split settings for planted data: `big-model` against `small-model`, no embedding cache
/// (tests must not read or write the user's).
pub fn planted_pair() -> SplitOptions {
    SplitOptions {
        strong: "big-model".into(),
        weak: "small-model".into(),
        embedding_cache: None,
        ..SplitOptions::default()
    }
}
