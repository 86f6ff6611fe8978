//! The loss terms of Hindsight Instruction Relabeling (HIR.md §1.6).
//!
//! All functions take logits `[B, T, V]` already aligned with their labels
//! `[B, T]` (for a decoder-only model, shift first with [`shift_for_causal`]).
//! Labels equal to [`IGNORE_INDEX`] (-100) do not count. Everything is built
//! from differentiable ops and computed in f32.
//!
//! **Weighting.** The reference trains one example per forward pass and
//! accumulates gradients, so every term is a token mean *per example* and the
//! batch value is the mean over examples: a 4-token answer weighs as much as a
//! 200-token one. Every batch function here does the same, whatever the padding.

use candle_core::{DType, Tensor, D};

use crate::error::{ModelError, Result};

pub use crate::kernels::ops::IGNORE_INDEX;

/// Default label smoothing ε: the run knob's default (`label_smoothing`, the reference's
/// `LabelSmoother(epsilon=0.2)`).
pub const LABEL_SMOOTHING: f64 = hir_core::run::DEFAULT_LABEL_SMOOTHING;

/// Default entropy coefficient β: the run knob's default (`entropy_coef`).
pub const ENTROPY_COEF: f64 = hir_core::run::DEFAULT_ENTROPY_COEF;

/// Labels as gather indices (ignored positions set to 0), a 0/1 mask `[B, T]`,
/// and `1 / (labelled positions)` of each row, `[B]`.
struct Labelled {
    ids: Tensor,
    mask: Tensor,
    inv_counts: Tensor,
}

impl Labelled {
    fn new(logits: &Tensor, labels: &Tensor) -> Result<Self> {
        let (b, t, _) = logits.dims3()?;
        if labels.dims() != [b, t] {
            return Err(ModelError::InvalidRequest(format!(
                "labels {:?} do not match logits {:?}",
                labels.dims(),
                logits.dims()
            )));
        }
        let l: Vec<Vec<i64>> = labels.to_dtype(DType::I64)?.to_vec2()?;
        let mut ids = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t);
        let mut inv = Vec::with_capacity(b);
        for row in &l {
            let mut n = 0usize;
            for &x in row {
                if x == IGNORE_INDEX {
                    ids.push(0u32);
                    mask.push(0f32);
                } else if x < 0 {
                    return Err(ModelError::InvalidRequest(format!("negative label {x}")));
                } else {
                    ids.push(x as u32);
                    mask.push(1f32);
                    n += 1;
                }
            }
            if n == 0 {
                return Err(ModelError::InvalidRequest(
                    "a sequence has no labelled position".into(),
                ));
            }
            inv.push(1.0 / n as f32);
        }
        let dev = labels.device();
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, t), dev)?,
            mask: Tensor::from_vec(mask, (b, t), dev)?,
            inv_counts: Tensor::from_vec(inv, b, dev)?,
        })
    }

    /// The mean over each row's labelled positions of `per_position` `[B, T]`: `[B]`.
    fn row_means(&self, per_position: &Tensor) -> Result<Tensor> {
        Ok((per_position * &self.mask)?.sum(1)?.mul(&self.inv_counts)?)
    }

    /// `log p(label)` at every position, `[B, T]` (garbage where ignored).
    fn picked(&self, lp: &Tensor) -> Result<Tensor> {
        Ok(lp.gather(&self.ids.unsqueeze(2)?, 2)?.squeeze(2)?)
    }
}

/// Drops the last logit and the first label so that position t predicts token t+1.
pub fn shift_for_causal(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let t = logits.dim(1)?;
    Ok((logits.narrow(1, 0, t - 1)?, labels.narrow(1, 1, t - 1)?))
}

/// Log-probabilities over the last dimension (the vocabulary), in f32.
pub fn log_probs(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(
        &logits.to_dtype(DType::F32)?,
        D::Minus1,
    )?)
}

/// Per-example label-smoothed cross-entropy `[B]` from log-probabilities.
fn label_smoothed_rows(lp: &Tensor, y: &Labelled, epsilon: f64) -> Result<Tensor> {
    let v = lp.dim(2)?;
    let nll = y.row_means(&y.picked(lp)?.neg()?)?;
    let smooth = y
        .row_means(&lp.sum(2)?.neg()?)?
        .affine(1.0 / v as f64, 0.0)?;
    Ok((nll.affine(1.0 - epsilon, 0.0)? + smooth.affine(epsilon, 0.0)?)?)
}

/// Per-example mean entropy `[B]` from log-probabilities.
fn entropy_rows(lp: &Tensor, y: &Labelled) -> Result<Tensor> {
    let h = (lp.exp()? * lp)?.sum(2)?.neg()?;
    y.row_means(&h)
}

/// Label-smoothed cross-entropy with Hugging Face `LabelSmoother` semantics per example,
/// `(1-ε)·mean NLL + ε·mean over positions and vocabulary of −log p` over the example's
/// labelled positions, then averaged over the examples.
pub fn label_smoothed_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    epsilon: f64,
) -> Result<Tensor> {
    let y = Labelled::new(logits, labels)?;
    Ok(label_smoothed_rows(&log_probs(logits)?, &y, epsilon)?.mean_all()?)
}

/// Length-normalised log-likelihood of each sequence, `[B]`:
/// `(1/T_b) Σ_t log p(y_t)` over its non-ignored positions, i.e. `log s(x)`.
pub fn sequence_mean_logprob(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let y = Labelled::new(logits, labels)?;
    y.row_means(&y.picked(&log_probs(logits)?)?)
}

/// The two-way contrastive term, averaged over the batch:
/// with `s(x) = exp(mean log-likelihood)`,
/// `−(1−ε)·log(s⁺/(s⁺+s⁻) + 1e−8) − ε·log(s⁻/(s⁺+s⁻) + 1e−8)`.
/// Inputs are `log s(x⁺)` and `log s(x⁻)`, `[B]`.
pub fn contrastive_loss(logs_pos: &Tensor, logs_neg: &Tensor, epsilon: f64) -> Result<Tensor> {
    Ok(contrastive_rows(logs_pos, logs_neg, epsilon)?.mean_all()?)
}

fn contrastive_rows(logs_pos: &Tensor, logs_neg: &Tensor, epsilon: f64) -> Result<Tensor> {
    // s⁺/(s⁺+s⁻) = 1 / (1 + exp(log s⁻ − log s⁺)), which cannot overflow.
    let d = (logs_neg - logs_pos)?;
    let r_pos = (d.exp()? + 1.0)?.recip()?;
    let r_neg = (d.neg()?.exp()? + 1.0)?.recip()?;
    Ok(((r_pos + 1e-8)?.log()?.affine(-(1.0 - epsilon), 0.0)?
        + (r_neg + 1e-8)?.log()?.affine(-epsilon, 0.0)?)?)
}

/// Mean entropy of the predictive distributions: per example over its labelled
/// positions, then over the examples.
pub fn mean_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let y = Labelled::new(logits, labels)?;
    Ok(entropy_rows(&log_probs(logits)?, &y)?.mean_all()?)
}

/// Coefficients of the combined loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HirLossConfig {
    /// Label smoothing ε (the run knob `label_smoothing`; also used inside the contrastive
    /// term).
    pub label_smoothing: f64,
    /// Weight α of the contrastive term.
    pub contrastive_coef: f64,
    /// Weight β of the entropy bonus (subtracted).
    pub entropy_coef: f64,
}

impl Default for HirLossConfig {
    fn default() -> Self {
        Self {
            label_smoothing: LABEL_SMOOTHING,
            contrastive_coef: hir_core::run::DEFAULT_CONTRASTIVE_COEF,
            entropy_coef: ENTROPY_COEF,
        }
    }
}

/// The combined loss and its parts, each the mean over the batch's examples.
#[derive(Debug, Clone)]
pub struct HirLoss {
    /// `L_LS + α·L_con − β·H`, a scalar with gradients.
    pub total: Tensor,
    /// Label-smoothed cross-entropy on the positive sequences.
    pub label_smoothed: f32,
    /// Contrastive term.
    pub contrastive: f32,
    /// Mean entropy on the positive sequences.
    pub entropy: f32,
}

/// `L = L_LS(x⁺) + α·L_con(x⁺, x⁻) − β·H(x⁺)` from aligned logits of the
/// positive and negative sequences and their labels.
///
/// The reference computes `L_LS` and `H` on one forward pass of the positive
/// inputs and the contrastive term on a second one; they differ only where the
/// model has dropout. `supervised` is that first pass's logits, or `None` to
/// use `pos_logits` for every term (a model without dropout).
pub fn hir_loss(
    supervised: Option<&Tensor>,
    pos_logits: &Tensor,
    pos_labels: &Tensor,
    neg_logits: &Tensor,
    neg_labels: &Tensor,
    cfg: &HirLossConfig,
) -> Result<HirLoss> {
    let y_pos = Labelled::new(pos_logits, pos_labels)?;
    let y_neg = Labelled::new(neg_logits, neg_labels)?;
    let lp_pos = log_probs(pos_logits)?;
    let lp_sup = match supervised {
        Some(s) => {
            if s.dims() != pos_logits.dims() {
                return Err(ModelError::InvalidRequest(format!(
                    "supervised logits {:?} do not match the positive ones {:?}",
                    s.dims(),
                    pos_logits.dims()
                )));
            }
            log_probs(s)?
        }
        None => lp_pos.clone(),
    };
    let ls = label_smoothed_rows(&lp_sup, &y_pos, cfg.label_smoothing)?.mean_all()?;
    let h = entropy_rows(&lp_sup, &y_pos)?.mean_all()?;
    let con = contrastive_rows(
        &y_pos.row_means(&y_pos.picked(&lp_pos)?)?,
        &y_neg.row_means(&y_neg.picked(&log_probs(neg_logits)?)?)?,
        cfg.label_smoothing,
    )?
    .mean_all()?;
    let total =
        ((&ls + con.affine(cfg.contrastive_coef, 0.0)?)? - h.affine(cfg.entropy_coef, 0.0)?)?;
    Ok(HirLoss {
        total,
        label_smoothed: ls.to_scalar()?,
        contrastive: con.to_scalar()?,
        entropy: h.to_scalar()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ln_softmax(row: &[f64]) -> Vec<f64> {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m;
        row.iter().map(|x| x - z).collect()
    }

    /// B=2, T=2, V=3 with one ignored position.
    fn fixture() -> (Tensor, Tensor, Vec<Vec<Vec<f64>>>) {
        let raw = vec![
            vec![vec![1.0, 2.0, 0.5], vec![0.0, -1.0, 3.0]],
            vec![vec![0.3, 0.3, 0.3], vec![2.0, 1.0, 0.0]],
        ];
        let flat: Vec<f32> = raw.iter().flatten().flatten().map(|&x| x as f32).collect();
        let logits = Tensor::from_vec(flat, (2, 2, 3), &Device::Cpu).unwrap();
        let labels = Tensor::new(&[[1i64, 2], [IGNORE_INDEX, 0]], &Device::Cpu).unwrap();
        (logits, labels, raw)
    }

    /// Labelled positions of the fixture, by row: (t, label).
    const ACTIVE: [&[(usize, usize)]; 2] = [&[(0, 1), (1, 2)], &[(1, 0)]];

    /// The reference's per-example terms (LS, log s, H) of one row, in f64.
    fn reference_row(raw: &[Vec<f64>], active: &[(usize, usize)], eps: f64) -> (f64, f64, f64) {
        let n = active.len() as f64;
        let (mut nll, mut smooth, mut h) = (0.0, 0.0, 0.0);
        for &(t, y) in active {
            let lp = ln_softmax(&raw[t]);
            nll -= lp[y];
            smooth -= lp.iter().sum::<f64>() / lp.len() as f64;
            h -= lp.iter().map(|l| l.exp() * l).sum::<f64>();
        }
        ((1.0 - eps) * nll / n + eps * smooth / n, -nll / n, h / n)
    }

    #[test]
    fn label_smoothed_cross_entropy_is_a_per_example_mean() {
        let (logits, labels, raw) = fixture();
        let rows: Vec<f64> = (0..2)
            .map(|b| reference_row(&raw[b], ACTIVE[b], 0.2).0)
            .collect();
        let want = (rows[0] + rows[1]) / 2.0;
        let got: f32 = label_smoothed_cross_entropy(&logits, &labels, 0.2)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        // Token weighting (all three positions pooled) gives another number.
        let (mut nll, mut smooth) = (0.0, 0.0);
        for (b, active) in ACTIVE.iter().enumerate() {
            for &(t, y) in *active {
                let lp = ln_softmax(&raw[b][t]);
                nll -= lp[y];
                smooth -= lp.iter().sum::<f64>() / 3.0;
            }
        }
        let pooled = 0.8 * nll / 3.0 + 0.2 * smooth / 3.0;
        assert!(
            (got as f64 - pooled).abs() > 1e-3,
            "{got} vs pooled {pooled}"
        );
    }

    #[test]
    fn a_row_without_labels_is_refused() {
        let (logits, _, _) = fixture();
        let labels = Tensor::new(&[[1i64, 2], [IGNORE_INDEX, IGNORE_INDEX]], &Device::Cpu).unwrap();
        for r in [
            label_smoothed_cross_entropy(&logits, &labels, 0.2),
            mean_entropy(&logits, &labels),
        ] {
            assert!(r.unwrap_err().to_string().contains("no labelled position"));
        }
    }

    #[test]
    fn sequence_mean_logprob_is_length_normalised() {
        let (logits, labels, raw) = fixture();
        let want0 = (ln_softmax(&raw[0][0])[1] + ln_softmax(&raw[0][1])[2]) / 2.0;
        let want1 = ln_softmax(&raw[1][1])[0];
        let got: Vec<f32> = sequence_mean_logprob(&logits, &labels)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((got[0] as f64 - want0).abs() < 1e-5);
        assert!((got[1] as f64 - want1).abs() < 1e-5);
    }

    #[test]
    fn contrastive_loss_matches_the_reference_formula() {
        let lp = [-0.5f64, -2.0];
        let ln = [-1.5f64, -1.0];
        let eps = 0.2;
        let mut want = 0.0;
        for i in 0..2 {
            let (sp, sn) = (lp[i].exp(), ln[i].exp());
            want +=
                -(1.0 - eps) * (sp / (sp + sn) + 1e-8).ln() - eps * (sn / (sp + sn) + 1e-8).ln();
        }
        want /= 2.0;
        let dev = Device::Cpu;
        let p = Tensor::new(&[-0.5f32, -2.0], &dev).unwrap();
        let n = Tensor::new(&[-1.5f32, -1.0], &dev).unwrap();
        let got: f32 = contrastive_loss(&p, &n, eps).unwrap().to_scalar().unwrap();
        assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn mean_entropy_averages_per_example() {
        let (logits, labels, raw) = fixture();
        let want = (0..2)
            .map(|b| reference_row(&raw[b], ACTIVE[b], 0.2).2)
            .sum::<f64>()
            / 2.0;
        let got: f32 = mean_entropy(&logits, &labels).unwrap().to_scalar().unwrap();
        assert!((got as f64 - want).abs() < 1e-5);
    }

    /// The total against the reference's formula, per example then averaged.
    fn reference_total(raw_pos: &[Vec<Vec<f64>>], raw_neg: &[Vec<Vec<f64>>]) -> f64 {
        let eps = 0.2;
        (0..2)
            .map(|b| {
                let (ls, logs_pos, h) = reference_row(&raw_pos[b], ACTIVE[b], eps);
                let (_, logs_neg, _) = reference_row(&raw_neg[b], ACTIVE[b], eps);
                let (sp, sn) = (logs_pos.exp(), logs_neg.exp());
                let con = -(1.0 - eps) * (sp / (sp + sn) + 1e-8).ln()
                    - eps * (sn / (sp + sn) + 1e-8).ln();
                ls + con - 0.001 * h
            })
            .sum::<f64>()
            / 2.0
    }

    fn scaled(raw: &[Vec<Vec<f64>>], by: f64) -> Vec<Vec<Vec<f64>>> {
        raw.iter()
            .map(|r| {
                r.iter()
                    .map(|p| p.iter().map(|x| x * by).collect())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn hir_loss_is_the_references_total_and_sides_matter() {
        let (logits, labels, raw) = fixture();
        let neg = (logits.clone() * 0.5).unwrap();
        let cfg = HirLossConfig::default();
        let l = hir_loss(None, &logits, &labels, &neg, &labels, &cfg).unwrap();
        let total: f32 = l.total.to_scalar().unwrap();
        let want = reference_total(&raw, &scaled(&raw, 0.5));
        assert!((total as f64 - want).abs() < 1e-5, "{total} vs {want}");
        // Positive and negative swapped: another value.
        let swapped = hir_loss(None, &neg, &labels, &logits, &labels, &cfg).unwrap();
        let swapped: f32 = swapped.total.to_scalar().unwrap();
        assert!((swapped - total).abs() > 1e-3, "{swapped} vs {total}");
    }

    #[test]
    fn the_negative_pass_carries_gradient() {
        let (logits, labels, _) = fixture();
        let pos = candle_core::Var::from_tensor(&logits).unwrap();
        let neg = candle_core::Var::from_tensor(&(logits * 0.5).unwrap()).unwrap();
        let l = hir_loss(
            None,
            pos.as_tensor(),
            &labels,
            neg.as_tensor(),
            &labels,
            &HirLossConfig::default(),
        )
        .unwrap();
        let grads = l.total.backward().unwrap();
        let g = grads
            .get(neg.as_tensor())
            .expect("the negative logits have a gradient");
        let n: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(n > 1e-3, "|d loss / d negative logits| = {n}");
    }

    #[test]
    fn a_separate_supervised_pass_feeds_smoothing_and_entropy_only() {
        let (logits, labels, raw) = fixture();
        let cfg = HirLossConfig::default();
        let other = (logits.clone() * 2.0).unwrap();
        let neg = (logits.clone() * 0.5).unwrap();
        let l = hir_loss(Some(&other), &logits, &labels, &neg, &labels, &cfg).unwrap();
        let doubled = scaled(&raw, 2.0);
        let (ls, h): (f64, f64) = (0..2)
            .map(|b| {
                let r = reference_row(&doubled[b], ACTIVE[b], 0.2);
                (r.0 / 2.0, r.2 / 2.0)
            })
            .fold((0.0, 0.0), |a, r| (a.0 + r.0, a.1 + r.1));
        assert!((l.label_smoothed as f64 - ls).abs() < 1e-5);
        assert!((l.entropy as f64 - h).abs() < 1e-5);
        let plain = hir_loss(None, &logits, &labels, &neg, &labels, &cfg).unwrap();
        assert!((l.contrastive - plain.contrastive).abs() < 1e-6);
    }

    #[test]
    fn shift_for_causal_aligns_next_token_targets() {
        let logits = Tensor::zeros((1, 4, 5), DType::F32, &Device::Cpu).unwrap();
        let labels = Tensor::new(&[[IGNORE_INDEX, IGNORE_INDEX, 3, 4]], &Device::Cpu).unwrap();
        let (l, y) = shift_for_causal(&logits, &labels).unwrap();
        assert_eq!(l.dims(), &[1, 3, 5]);
        assert_eq!(y.to_vec2::<i64>().unwrap(), vec![vec![IGNORE_INDEX, 3, 4]]);
    }
}
