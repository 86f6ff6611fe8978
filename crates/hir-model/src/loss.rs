//! The loss terms of Hindsight Instruction Relabeling (HIR.md §1.6).
//!
//! All functions take logits `[B, T, V]` already aligned with their labels
//! `[B, T]` (for a decoder-only model, shift first with [`shift_for_causal`]).
//! Labels equal to [`IGNORE_INDEX`] (-100) do not count. Everything is built
//! from differentiable ops and computed in f32.

use candle_core::{DType, Tensor, D};

use crate::error::{ModelError, Result};

/// Label value of positions that carry no loss.
pub const IGNORE_INDEX: i64 = -100;

/// Default label smoothing ε of the reference code (`LabelSmoother(epsilon=0.2)`).
pub const LABEL_SMOOTHING: f64 = 0.2;

/// Default entropy coefficient β.
pub const ENTROPY_COEF: f64 = 0.001;

/// Labels split into gather indices (ignored positions set to 0) and a 0/1 mask.
fn split_labels(labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let l: Vec<Vec<i64>> = labels.to_dtype(DType::I64)?.to_vec2()?;
    let (b, t) = (l.len(), l.first().map(|r| r.len()).unwrap_or(0));
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    for row in &l {
        for &x in row {
            if x == IGNORE_INDEX {
                ids.push(0u32);
                mask.push(0f32);
            } else if x < 0 {
                return Err(ModelError::InvalidRequest(format!("negative label {x}")));
            } else {
                ids.push(x as u32);
                mask.push(1f32);
            }
        }
    }
    let dev = labels.device();
    Ok((
        Tensor::from_vec(ids, (b, t), dev)?,
        Tensor::from_vec(mask, (b, t), dev)?,
    ))
}

fn check(logits: &Tensor, labels: &Tensor) -> Result<()> {
    let (b, t, _) = logits.dims3()?;
    if labels.dims() != [b, t] {
        return Err(ModelError::InvalidRequest(format!(
            "labels {:?} do not match logits {:?}",
            labels.dims(),
            logits.dims()
        )));
    }
    Ok(())
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

/// Label-smoothed cross-entropy with Hugging Face `LabelSmoother` semantics:
/// `(1-ε)·mean NLL + ε·mean over positions and vocabulary of −log p`, both
/// averaged over all non-ignored positions of the batch.
pub fn label_smoothed_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    epsilon: f64,
) -> Result<Tensor> {
    check(logits, labels)?;
    let v = logits.dim(2)?;
    let (ids, mask) = split_labels(labels)?;
    let n = mask.sum_all()?.to_scalar::<f32>()?;
    if n == 0.0 {
        return Err(ModelError::InvalidRequest("no labelled position".into()));
    }
    let lp = log_probs(logits)?;
    let picked = lp.gather(&ids.unsqueeze(2)?, 2)?.squeeze(2)?;
    let nll = (picked * &mask)?
        .sum_all()?
        .neg()?
        .affine(1.0 / n as f64, 0.0)?;
    let smooth = (lp.sum(2)? * &mask)?
        .sum_all()?
        .neg()?
        .affine(1.0 / (n as f64 * v as f64), 0.0)?;
    Ok((nll.affine(1.0 - epsilon, 0.0)? + smooth.affine(epsilon, 0.0)?)?)
}

/// Length-normalised log-likelihood of each sequence, `[B]`:
/// `(1/T_b) Σ_t log p(y_t)` over its non-ignored positions, i.e. `log s(x)`.
pub fn sequence_mean_logprob(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    check(logits, labels)?;
    let (ids, mask) = split_labels(labels)?;
    let counts: Vec<f32> = mask.sum(1)?.to_vec1()?;
    if counts.contains(&0.0) {
        return Err(ModelError::InvalidRequest(
            "a sequence has no labelled position".into(),
        ));
    }
    let lp = log_probs(logits)?;
    let picked = lp.gather(&ids.unsqueeze(2)?, 2)?.squeeze(2)?;
    let inv = Tensor::new(
        counts.iter().map(|c| 1.0 / c).collect::<Vec<f32>>(),
        logits.device(),
    )?;
    Ok((picked * mask)?.sum(1)?.mul(&inv)?)
}

/// The two-way contrastive term, averaged over the batch:
/// with `s(x) = exp(mean log-likelihood)`,
/// `−(1−ε)·log(s⁺/(s⁺+s⁻) + 1e−8) − ε·log(s⁻/(s⁺+s⁻) + 1e−8)`.
/// Inputs are `log s(x⁺)` and `log s(x⁻)`, `[B]`.
pub fn contrastive_loss(logs_pos: &Tensor, logs_neg: &Tensor, epsilon: f64) -> Result<Tensor> {
    // s⁺/(s⁺+s⁻) = 1 / (1 + exp(log s⁻ − log s⁺)), which cannot overflow.
    let d = (logs_neg - logs_pos)?;
    let r_pos = (d.exp()? + 1.0)?.recip()?;
    let r_neg = (d.neg()?.exp()? + 1.0)?.recip()?;
    let l = ((r_pos + 1e-8)?.log()?.affine(-(1.0 - epsilon), 0.0)?
        + (r_neg + 1e-8)?.log()?.affine(-epsilon, 0.0)?)?;
    Ok(l.mean_all()?)
}

/// Mean entropy of the predictive distributions over the non-ignored positions.
pub fn mean_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    check(logits, labels)?;
    let (_, mask) = split_labels(labels)?;
    let n = mask.sum_all()?.to_scalar::<f32>()?;
    if n == 0.0 {
        return Err(ModelError::InvalidRequest("no labelled position".into()));
    }
    let lp = log_probs(logits)?;
    let h = (lp.exp()? * &lp)?.sum(2)?.neg()?;
    Ok((h * mask)?.sum_all()?.affine(1.0 / n as f64, 0.0)?)
}

/// Coefficients of the combined loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HirLossConfig {
    /// Label smoothing ε (also used inside the contrastive term).
    pub epsilon: f64,
    /// Weight α of the contrastive term.
    pub contrastive_coef: f64,
    /// Weight β of the entropy bonus (subtracted).
    pub entropy_coef: f64,
}

impl Default for HirLossConfig {
    fn default() -> Self {
        Self {
            epsilon: LABEL_SMOOTHING,
            contrastive_coef: 1.0,
            entropy_coef: ENTROPY_COEF,
        }
    }
}

/// The combined loss and its parts.
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
pub fn hir_loss(
    pos_logits: &Tensor,
    pos_labels: &Tensor,
    neg_logits: &Tensor,
    neg_labels: &Tensor,
    cfg: &HirLossConfig,
) -> Result<HirLoss> {
    let ls = label_smoothed_cross_entropy(pos_logits, pos_labels, cfg.epsilon)?;
    let con = contrastive_loss(
        &sequence_mean_logprob(pos_logits, pos_labels)?,
        &sequence_mean_logprob(neg_logits, neg_labels)?,
        cfg.epsilon,
    )?;
    let h = mean_entropy(pos_logits, pos_labels)?;
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

    #[test]
    fn label_smoothed_cross_entropy_matches_hand_computation() {
        let (logits, labels, raw) = fixture();
        let active = [(0, 0, 1), (0, 1, 2), (1, 1, 0)];
        let (mut nll, mut smooth) = (0.0, 0.0);
        for (b, t, y) in active {
            let lp = ln_softmax(&raw[b][t]);
            nll -= lp[y];
            smooth -= lp.iter().sum::<f64>();
        }
        let want = 0.8 * nll / 3.0 + 0.2 * smooth / (3.0 * 3.0);
        let got: f32 = label_smoothed_cross_entropy(&logits, &labels, 0.2)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        let plain: f32 = label_smoothed_cross_entropy(&logits, &labels, 0.0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((plain as f64 - nll / 3.0).abs() < 1e-5);
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
    fn mean_entropy_averages_over_labelled_positions() {
        let (logits, labels, raw) = fixture();
        let h = |row: &[f64]| -> f64 { ln_softmax(row).iter().map(|l| -l.exp() * l).sum() };
        let want = (h(&raw[0][0]) + h(&raw[0][1]) + h(&raw[1][1])) / 3.0;
        let got: f32 = mean_entropy(&logits, &labels).unwrap().to_scalar().unwrap();
        assert!((got as f64 - want).abs() < 1e-5);
    }

    #[test]
    fn hir_loss_combines_its_terms() {
        let (logits, labels, _) = fixture();
        let neg = (logits.clone() * 0.5).unwrap();
        let cfg = HirLossConfig::default();
        let l = hir_loss(&logits, &labels, &neg, &labels, &cfg).unwrap();
        let total: f32 = l.total.to_scalar().unwrap();
        let want = l.label_smoothed + l.contrastive - 0.001 * l.entropy;
        assert!((total - want).abs() < 1e-5);
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
