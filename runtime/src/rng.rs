//! The one random number generator of Ferry's data path and timers: a fast, non-cryptographic
//! generator per thread (xoshiro via `SmallRng`), seeded from the operating system when a
//! thread first uses it. Load-balancer picks, traffic splits, fault rolls and backoff jitter
//! need speed and spread, not secrecy; secrets (tokens, keys) use the cryptographic generator.
//!
//! Tests make a thread's draws repeatable with [`seed`].

use std::cell::RefCell;

use rand::{
    RngExt, SeedableRng,
    distr::uniform::{SampleRange, SampleUniform},
    rngs::SmallRng,
};

thread_local! {
    static RNG: RefCell<SmallRng> = RefCell::new(rand::make_rng());
}

/// Makes the calling thread's draws repeatable from now on.
pub fn seed(seed: u64) {
    RNG.with_borrow_mut(|rng| *rng = SmallRng::seed_from_u64(seed));
}

/// Runs `f` with the calling thread's generator.
pub fn with<T>(f: impl FnOnce(&mut SmallRng) -> T) -> T {
    RNG.with_borrow_mut(|rng| f(rng))
}

/// A number drawn uniformly from `range`.
pub fn range<T: SampleUniform, R: SampleRange<T>>(range: R) -> T {
    with(|rng| rng.random_range(range))
}

/// A fraction drawn uniformly from `[0, 1)`.
pub fn fraction() -> f64 {
    with(|rng| rng.random::<f64>())
}

/// True with a `percent` in 100 chance.
pub fn roll(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && fraction() * 100.0 < percent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seeded_thread_draws_the_same_numbers_again() {
        seed(42);
        let first: Vec<u32> = (0..8).map(|_| range(0..1000)).collect();
        seed(42);
        let second: Vec<u32> = (0..8).map(|_| range(0..1000)).collect();
        assert_eq!(first, second);
    }

    #[test]
    fn rolls_respect_the_edges() {
        assert!(roll(100.0));
        assert!(!roll(0.0));
        assert!(!roll(-5.0));
    }
}
