//! The small deterministic primitives the project shares: SplitMix64 for seeded draws
//! (random router, bootstrap, training) and FNV-1a for stable hashes (cache keys, the
//! validation split, vocabulary lookups). Reproducible across platforms, no dependencies.

/// SplitMix64's increment: the golden-ratio step between states.
pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
/// FNV-1a's 64-bit offset basis: the hash of no bytes.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// SplitMix64's output function: the state after an increment, mixed into a draw.
#[must_use]
pub fn mix(state: u64) -> u64 {
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A draw as a uniform value in [0, 1): the top 53 bits fill an f64 mantissa exactly.
#[must_use]
pub fn unit(draw: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let value = (draw >> 11) as f64 / (1_u64 << 53) as f64;
    value
}

/// Continues an FNV-1a hash over `bytes`; start from [`FNV_OFFSET`].
#[must_use]
pub fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(hash, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(FNV_PRIME))
}

/// SplitMix64 with an atomic state, shared lock-free by concurrent callers: each call
/// advances the state once, so no two calls ever get the same draw.
pub struct AtomicSplitMix(std::sync::atomic::AtomicU64);

impl AtomicSplitMix {
    /// A sequence fixed by `seed` (reproducible).
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(std::sync::atomic::AtomicU64::new(seed))
    }

    /// A sequence seeded from the OS's randomness (std's hasher keys), the clock and the
    /// process id, so separate processes draw different sequences.
    #[must_use]
    pub fn from_entropy() -> Self {
        use std::hash::BuildHasher;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos());
        Self::new(std::collections::hash_map::RandomState::new().hash_one((nanos, std::process::id())))
    }

    pub fn next_u64(&self) -> u64 {
        let state = self
            .0
            .fetch_add(GOLDEN_GAMMA, std::sync::atomic::Ordering::Relaxed)
            .wrapping_add(GOLDEN_GAMMA);
        mix(state)
    }

    /// Uniform in [0, 1).
    pub fn next_unit(&self) -> f64 {
        unit(self.next_u64())
    }
}

/// A small, seedable generator for resampling and initialisation; statistical quality far
/// beyond what a bootstrap needs.
pub struct SplitMix(u64);

impl SplitMix {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        mix(self.0)
    }

    /// Uniform in [0, 1).
    pub fn next_unit(&mut self) -> f64 {
        unit(self.next_u64())
    }

    /// Uniform in `0..bound` (Lemire's multiply-shift; bias is negligible for our sizes).
    pub fn below(&mut self, bound: usize) -> usize {
        #[allow(clippy::cast_possible_truncation)]
        let index = ((u128::from(self.next_u64()) * bound as u128) >> 64) as usize;
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_reference_sequence() {
        // First outputs of SplitMix64 seeded with 1234567 (Vigna's reference implementation).
        let mut rng = SplitMix::new(1_234_567);
        assert_eq!(rng.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(rng.next_u64(), 3_203_168_211_198_807_973);
    }

    #[test]
    fn the_shared_generator_draws_splitmix_sequence() {
        let (mut plain, shared) = (SplitMix::new(1_234_567), AtomicSplitMix::new(1_234_567));
        for _ in 0..4 {
            assert_eq!(shared.next_u64(), plain.next_u64());
        }
        assert_eq!(shared.next_unit().to_bits(), plain.next_unit().to_bits());
    }

    #[test]
    fn fnv1a_matches_known_vectors_and_chains() {
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(fnv1a(FNV_OFFSET, b"ab"), b"c"), fnv1a(FNV_OFFSET, b"abc"));
    }
}
