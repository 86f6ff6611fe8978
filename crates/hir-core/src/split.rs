//! The reference's 80/20 split of a task's examples.
//!
//! The reference code runs `np.random.seed(1); idx = np.random.permutation(N)` and takes the
//! first `int(0.8 * N)` indices for training, the rest for testing. numpy's legacy seeding is
//! MT19937's `init_genrand(seed)`, and `permutation` is a Fisher–Yates shuffle drawing each
//! `j` with `random_interval(i)` (mask, then reject). This module reproduces it bit for bit.

/// The legacy MT19937 generator of numpy's `RandomState`.
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl std::fmt::Debug for Mt19937 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mt19937")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Mt19937 {
    const N: usize = 624;
    const M: usize = 397;

    /// `init_genrand(seed)`, as `np.random.seed(seed)` does for an integer seed.
    pub fn new(seed: u32) -> Self {
        let mut state = [0u32; Self::N];
        state[0] = seed;
        for i in 1..Self::N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self {
            state,
            index: Self::N,
        }
    }

    fn twist(&mut self) {
        for i in 0..Self::N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % Self::N] & 0x7fff_ffff);
            let mut next = self.state[(i + Self::M) % Self::N] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    /// The next tempered 32-bit output (`genrand_int32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= Self::N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// numpy's legacy `random_interval(max)`: uniform on `0..=max` by masking and rejection.
    pub fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        for shift in [1, 2, 4, 8, 16, 32] {
            mask |= mask >> shift;
        }
        if max <= u64::from(u32::MAX) {
            loop {
                let value = u64::from(self.next_u32()) & mask;
                if value <= max {
                    return value;
                }
            }
        }
        loop {
            let hi = u64::from(self.next_u32());
            let lo = u64::from(self.next_u32());
            let value = ((hi << 32) | lo) & mask;
            if value <= max {
                return value;
            }
        }
    }
}

/// `np.random.seed(seed); np.random.permutation(n)`.
pub fn permutation(seed: u32, n: usize) -> Vec<usize> {
    let mut rng = Mt19937::new(seed);
    let mut items: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.interval(i as u64) as usize;
        items.swap(i, j);
    }
    items
}

crate::text_enum! {
    /// Which side of the split an example falls on.
    pub enum SplitSide {
        /// Sampled from and trained on.
        Train => "train",
        /// Held out for evaluation.
        Test => "test",
    }
}

/// A task's train/test split: example indices in permutation order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Split {
    /// The first `int(0.8 * n)` indices of the permutation.
    pub train: Vec<usize>,
    /// The remaining indices.
    pub test: Vec<usize>,
}

/// The fraction of examples the reference trains on.
pub const TRAIN_FRACTION: f64 = 0.8;

impl Split {
    /// The reference split of `n` examples under `seed` (the reference uses seed 1).
    pub fn new(seed: u32, n: usize) -> Self {
        let mut train = permutation(seed, n);
        // Python's int(0.8 * N): the float product truncated, as the reference computes it.
        let train_size = (TRAIN_FRACTION * n as f64) as usize;
        let test = train.split_off(train_size);
        Self { train, test }
    }

    /// Moves the last `⌈share · |train|⌉` training indices into a validation part and
    /// returns it; the rest stay training indices, in the same order. The validation part
    /// comes from the end of the permutation, so a run's first training prompts are the
    /// same with or without it (runs that choose settings train on the data the chosen
    /// run trains on). `share` 0 holds out nothing; it is clamped below 1 so that at least
    /// one training index stays.
    pub fn hold_out_validation(&mut self, share: f64) -> Vec<usize> {
        // NaN and anything at or below 0 hold out nothing.
        if share.is_nan() || share <= 0.0 || self.train.len() < 2 {
            return Vec::new();
        }
        let n = self.train.len();
        let k = ((share * n as f64).ceil() as usize).clamp(1, n - 1);
        self.train.split_off(n - k)
    }

    /// The side of every example, indexed by example index.
    pub fn sides(&self) -> Vec<SplitSide> {
        let mut sides = vec![SplitSide::Test; self.train.len() + self.test.len()];
        for &i in &self.train {
            sides[i] = SplitSide::Train;
        }
        sides
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_comes_from_the_end_of_the_training_permutation() {
        let full = Split::new(1, 1000);
        let mut s = Split::new(1, 1000);
        let validation = s.hold_out_validation(0.25);
        assert_eq!(validation.len(), 200);
        assert_eq!(s.train.len(), 600);
        assert_eq!(s.train[..], full.train[..600]);
        assert_eq!(validation[..], full.train[600..]);
        assert_eq!(s.test, full.test, "the test split is untouched");
        let mut none = Split::new(1, 1000);
        assert!(none.hold_out_validation(0.0).is_empty());
        assert_eq!(none.train, full.train);
        let mut tiny = Split::new(1, 3);
        // 2 training examples: one is held out, one stays.
        assert_eq!(tiny.hold_out_validation(0.99).len(), 1);
        assert_eq!(tiny.train.len(), 1);
    }

    #[test]
    fn mt19937_matches_the_reference_outputs() {
        // genrand_int32 after init_genrand(5489), the reference implementation's default seed.
        let mut rng = Mt19937::new(5489);
        assert_eq!(rng.next_u32(), 3_499_211_612);
        assert_eq!(rng.next_u32(), 581_869_302);
        let mut rng = Mt19937::new(5489);
        let last = (0..10_000).map(|_| rng.next_u32()).last();
        // The 10000th output, the standard check value for MT19937.
        assert_eq!(last, Some(4_123_659_995));
    }

    #[test]
    fn permutation_matches_the_documented_prefixes() {
        assert_eq!(
            permutation(1, 300)[..8],
            [189, 123, 185, 213, 106, 127, 176, 73]
        );
        assert_eq!(
            permutation(1, 750)[..8],
            [625, 318, 339, 598, 90, 666, 262, 84]
        );
        assert_eq!(permutation(1, 2000)[..4], [674, 1699, 1282, 1315]);
    }

    #[test]
    fn split_sizes_follow_python_int_truncation() {
        let split = Split::new(1, 369);
        assert_eq!((split.train.len(), split.test.len()), (295, 74));
        let split = Split::new(1, 149);
        assert_eq!((split.train.len(), split.test.len()), (119, 30));
        let sides = split.sides();
        assert_eq!(
            sides.iter().filter(|s| **s == SplitSide::Train).count(),
            119
        );
    }

    #[test]
    fn degenerate_sizes_do_not_panic() {
        assert!(permutation(1, 0).is_empty());
        assert_eq!(permutation(1, 1), vec![0]);
        let split = Split::new(1, 1);
        assert_eq!((split.train.len(), split.test.len()), (0, 1));
    }
}
