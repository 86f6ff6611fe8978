//! Small operations shared by the models, sampling and training: the log-probability
//! of one token under a row of logits, the label value that carries no loss, and the
//! seed mixing behind deterministic random weights and sampling streams.

/// Label value of positions that carry no loss.
pub const IGNORE_INDEX: i64 = -100;

/// `log softmax(row)[token]`.
pub fn log_softmax_at(row: &[f32], token: u32) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + row.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    row[token as usize] - lse
}

/// FNV-1a hash, used to derive seeds from names.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// SplitMix64-style mixing of two words.
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.rotate_left(32) ^ 0x9e3779b97f4a7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// `n` values drawn from Normal(0, `std`), seeded by `seed` (Box-Muller, so that the values
/// do not depend on a distribution crate's version).
pub(crate) fn normal_values(seed: u64, n: usize, std: f32) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let u1: f32 = rng.random::<f32>().max(1e-7);
        let u2: f32 = rng.random::<f32>();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f32::consts::PI * u2;
        v.push(r * th.cos() * std);
        if v.len() < n {
            v.push(r * th.sin() * std);
        }
    }
    v
}
