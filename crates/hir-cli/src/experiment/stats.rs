//! The statistics an experiment reports: a Wilson score interval for each accuracy and an
//! exact McNemar test between two models scored on the same test items.

/// The normal quantile of a two-sided 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

/// The Wilson score 95% interval of `k` successes in `n` trials, as fractions; `(0, 1)`
/// for `n = 0`. Unlike the normal approximation it stays inside [0, 1] and is not empty
/// at 0 or `n` successes, which small test splits and collapsed models both produce.
pub fn wilson(k: u32, n: u32) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n) = (f64::from(k.min(n)), f64::from(n));
    let p = k / n;
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / n;
    let centre = p + z2 / (2.0 * n);
    let half = Z95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    (
        ((centre - half) / denom).max(0.0),
        ((centre + half) / denom).min(1.0),
    )
}

/// The two-sided exact McNemar test of two models on the same items: `b` items only the
/// first got right, `c` only the second. Under the null hypothesis (the two are equally
/// good) each discordant item goes either way with probability 1/2, so the p-value is
/// twice the binomial tail of the smaller count, at most 1. No discordant item gives 1.
pub fn mcnemar_exact(b: u32, c: u32) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // Sum C(n, i) / 2^n for i <= k in log space: n reaches the thousands.
    let ln_half_n = f64::from(n) * std::f64::consts::LN_2;
    let mut ln_choose = 0.0; // ln C(n, 0)
    let mut tail = 0.0;
    for i in 0..=k {
        if i > 0 {
            ln_choose += (f64::from(n - i + 1)).ln() - f64::from(i).ln();
        }
        tail += (ln_choose - ln_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

/// The discordant counts of two sets of correct items (sorted ascending): items only in
/// `a`, items only in `b`.
pub fn discordant(a: &[u32], b: &[u32]) -> (u32, u32) {
    let (mut i, mut j, mut only_a, mut only_b) = (0, 0, 0, 0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x < y => {
                only_a += 1;
                i += 1;
            }
            (Some(_), None) => {
                only_a += 1;
                i += 1;
            }
            _ => {
                only_b += 1;
                j += 1;
            }
        }
    }
    (only_a, only_b)
}

/// A p-value as a table shows it: three significant digits, or `<0.001`.
pub fn p_value(p: f64) -> String {
    if p < 0.001 {
        "<0.001".into()
    } else {
        format!("{p:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn wilson_matches_known_intervals() {
        // Reference values from the closed form (Wilson 1927), z = 1.959964.
        for (k, n, lo, hi) in [
            (0, 10, 0.0, 0.277_532_799_862_889_2),
            (5, 10, 0.236_593_090_512_564, 0.763_406_909_487_436),
            (42, 200, 0.159_284_120_699_79, 0.271_646_168_599_024_6),
            (3, 200, 0.005_114_237_793_258_312, 0.043_165_728_792_690_27),
            (200, 200, 0.981_154_673_622_733_3, 1.0),
        ] {
            let (l, h) = wilson(k, n);
            assert!(close(l, lo) && close(h, hi), "{k}/{n}: ({l}, {h})");
        }
        assert_eq!(wilson(0, 0), (0.0, 1.0));
    }

    #[test]
    fn mcnemar_matches_the_binomial_tail() {
        // 2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2).
        for (b, c, p) in [
            (1, 7, 0.070_312_5),
            (7, 1, 0.070_312_5),
            (0, 6, 0.031_25),
            (0, 5, 0.062_5),
            (3, 3, 1.0),
            (10, 25, 0.016_673_847_800_120_71),
            (0, 0, 1.0),
        ] {
            let got = mcnemar_exact(b, c);
            assert!((got - p).abs() < 1e-12, "b={b} c={c}: {got} vs {p}");
        }
        // Large counts stay finite and tiny.
        let p = mcnemar_exact(0, 2000);
        assert!(p > 0.0 && p < 1e-300 || p == 0.0, "{p}");
        assert!(mcnemar_exact(1000, 1000) > 0.9);
    }

    #[test]
    fn discordant_pairs_are_counted_item_by_item() {
        assert_eq!(discordant(&[1, 2, 5], &[2, 3, 5, 9]), (1, 2));
        assert_eq!(discordant(&[], &[4]), (0, 1));
        assert_eq!(discordant(&[4], &[]), (1, 0));
        assert_eq!(discordant(&[], &[]), (0, 0));
        assert_eq!(p_value(0.0004), "<0.001");
        assert_eq!(p_value(0.0703125), "0.070");
    }
}
