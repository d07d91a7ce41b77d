//! The algorithms that pick one endpoint among the candidates a balancer allows: each takes the
//! candidates (indices into the balancer's endpoints) and their weights, already adjusted for
//! slow start.

use std::{
    hash::Hasher,
    sync::{Mutex, OnceLock},
};

use ferry_runtime::lock;

use smallvec::SmallVec;

/// Picks an index of `candidates` with probability proportional to its weight; `skip` is
/// left out.
pub fn weighted(candidates: &[usize], weights: &[f64], skip: Option<usize>) -> Option<usize> {
    let total: f64 = candidates.iter().filter(|c| Some(**c) != skip).map(|c| weights[*c]).sum();
    if total <= 0.0 {
        return candidates.iter().copied().find(|c| Some(*c) != skip);
    }
    let mut roll = ferry_runtime::rng::fraction() * total;
    let mut last = None;
    for &candidate in candidates.iter().filter(|c| Some(**c) != skip) {
        last = Some(candidate);
        roll -= weights[candidate];
        if roll < 0.0 {
            return Some(candidate);
        }
    }
    last
}

/// Power of two choices: two distinct candidates drawn by weight, the cheaper one kept.
pub fn two_choices(candidates: &[usize], weights: &[f64], cost: impl Fn(usize) -> f64) -> Option<usize> {
    let first = weighted(candidates, weights, None)?;
    let Some(second) = weighted(candidates, weights, Some(first)) else { return Some(first) };
    if cost(second) < cost(first) { Some(second) } else { Some(first) }
}

/// Smooth weighted round-robin (as nginx does it): every endpoint gets its weight's share, and
/// the turns of a heavy endpoint are spread out rather than bunched. Each data-path worker keeps
/// its own rotation, so no lock is shared across workers: every worker gives each endpoint its
/// share, and so do all of them together.
#[derive(Debug, Default)]
pub struct RoundRobin {
    /// One rotation per worker slot, made on first use.
    rotations: OnceLock<Box<[Mutex<Vec<f64>>]>>,
}

/// Rotations per balancer: workers beyond this share one, uncontended in practice.
const ROTATIONS: usize = 16;

impl RoundRobin {
    pub fn pick(&self, candidates: &[usize], weights: &[f64]) -> Option<usize> {
        let rotations = self.rotations.get_or_init(|| (0..ROTATIONS).map(|_| Mutex::new(Vec::new())).collect());
        let slot = crate::workers::current().map_or(0, |worker| (worker + 1) % ROTATIONS);
        let mut current = lock(&rotations[slot]);
        if current.len() != weights.len() {
            *current = vec![0.0; weights.len()];
        }
        let mut total = 0.0;
        let mut best: Option<usize> = None;
        for &candidate in candidates {
            current[candidate] += weights[candidate];
            total += weights[candidate];
            if best.is_none_or(|b| current[candidate] > current[b]) {
                best = Some(candidate);
            }
        }
        let best = best?;
        current[best] -= total;
        Some(best)
    }
}

/// A consistent-hash ring over a balancer's endpoints: each endpoint has points in proportion
/// to its weight, placed by hashing its id, so adding or removing one endpoint moves only the
/// keys between its points and their neighbours: about 1/N of them.
#[derive(Debug)]
pub struct Ring {
    points: Vec<(u64, usize)>,
    /// How many endpoints the points refer to.
    endpoints: usize,
}

/// Points per endpoint of weight 100 (the default weight).
const POINTS_PER_100: u32 = 128;
/// The most points a ring holds.
const MAX_POINTS: usize = 64 * 1024;

impl Ring {
    /// A ring over endpoints with these ids and weights (by index).
    pub fn new(endpoints: &[(&str, u32)]) -> Self {
        let total_weight: u64 = endpoints.iter().map(|(_, w)| u64::from((*w).max(1))).sum();
        let wanted: u64 = total_weight * u64::from(POINTS_PER_100) / 100;
        let scale = if wanted as usize > MAX_POINTS { MAX_POINTS as f64 / wanted as f64 } else { 1.0 };
        let mut points = Vec::new();
        for (index, (id, weight)) in endpoints.iter().enumerate() {
            let count = ((f64::from((*weight).max(1)) * f64::from(POINTS_PER_100) / 100.0 * scale).round() as u32).max(1);
            for point in 0..count {
                points.push((hash(&[id.as_bytes(), b"#", point.to_string().as_bytes()]), index));
            }
        }
        points.sort_unstable();
        Self { points, endpoints: endpoints.len() }
    }

    /// The first endpoint at or after the key's place on the ring that `allowed` accepts.
    pub fn pick(&self, key: u64, allowed: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|(point, _)| *point < key);
        // Endpoints already refused, one bit each (inline up to 128 endpoints): asked once.
        let mut refused: SmallVec<[u64; 2]> = smallvec::smallvec![0; self.endpoints.div_ceil(64)];
        for offset in 0..self.points.len() {
            let (_, index) = self.points[(start + offset) % self.points.len()];
            let (word, bit) = (index / 64, 1u64 << (index % 64));
            if refused[word] & bit != 0 {
                continue;
            }
            if allowed(index) {
                return Some(index);
            }
            refused[word] |= bit;
        }
        None
    }
}

/// A stable 64-bit hash (FNV-1a, then mixed), the same in every process and release.
pub fn hash(parts: &[&[u8]]) -> u64 {
    let mut hasher = Fnv(0xcbf2_9ce4_8422_2325);
    for part in parts {
        hasher.write(part);
    }
    // splitmix64's finaliser spreads FNV's clustered outputs over the ring.
    let mut x = hasher.finish();
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_picks_follow_the_weights() {
        let weights = [100.0, 300.0, 0.0];
        let mut counts = [0; 3];
        for _ in 0..20_000 {
            counts[weighted(&[0, 1, 2], &weights, None).expect("one")] += 1;
        }
        assert_eq!(counts[2], 0, "weight 0 gets nothing while others can take it");
        let share = f64::from(counts[1]) / 20_000.0;
        assert!((0.72..0.78).contains(&share), "{counts:?}");
        assert_eq!(weighted(&[0, 1], &weights, Some(1)), Some(0));
    }

    #[test]
    fn round_robin_spreads_turns_by_weight() {
        let rr = RoundRobin::default();
        let picks: Vec<usize> = (0..8).map(|_| rr.pick(&[0, 1, 2], &[1.0, 2.0, 1.0]).expect("one")).collect();
        assert_eq!(picks.iter().filter(|p| **p == 1).count(), 4);
        assert_eq!(picks.iter().filter(|p| **p == 0).count(), 2);
        let mut first_turn = picks[..4].to_vec();
        first_turn.sort();
        assert_eq!(first_turn, [0, 1, 1, 2], "every endpoint in each turn of 4: {picks:?}");
        assert_ne!(picks[0], picks[1], "the heavy endpoint's turns are spread: {picks:?}");
    }

    #[test]
    fn two_choices_keeps_the_cheaper() {
        let costs = [5.0, 1.0];
        for _ in 0..100 {
            assert_eq!(two_choices(&[0, 1], &[1.0, 1.0], |i| costs[i]), Some(1));
        }
        assert_eq!(two_choices(&[0], &[1.0, 1.0], |i| costs[i]), Some(0), "a single candidate");
    }

    #[test]
    fn a_ring_moves_about_one_nth_of_the_keys_when_an_endpoint_leaves() {
        let ids: Vec<String> = (0..10).map(|i| format!("catalog-{i}")).collect();
        let all: Vec<(&str, u32)> = ids.iter().map(|id| (id.as_str(), 100)).collect();
        let ring = Ring::new(&all);
        let fewer = Ring::new(&all[1..]);
        let keys: Vec<u64> = (0..10_000).map(|k: u32| hash(&[&k.to_le_bytes()])).collect();
        let mut moved = 0;
        for key in &keys {
            let before = all[ring.pick(*key, |_| true).expect("one")].0;
            let after = all[1..][fewer.pick(*key, |_| true).expect("one")].0;
            if before != after {
                assert_eq!(before, "catalog-0", "only keys of the endpoint that left move");
                moved += 1;
            }
        }
        let share = f64::from(moved) / keys.len() as f64;
        assert!((0.05..0.16).contains(&share), "{share} of keys moved; about 1/10 expected");
        // Keys skip endpoints that are not allowed, to the next one on the ring.
        let key = keys[0];
        let first = ring.pick(key, |_| true).expect("one");
        let next = ring.pick(key, |i| i != first).expect("another");
        assert_ne!(first, next);
    }
}
