//! The optimizer: gradients of several micro-batches summed in f32
//! ([`GradAccumulator`]), clipped to a global norm, then applied by [`AdamW`] with f32
//! moments (and f32 master copies of low-precision weights); [`Optimizer`] runs the
//! three around a trainable model.
//!
//! candle_nn's `AdamW` steps straight from one backward pass and has no
//! clipping or accumulation, so the optimizer here is written out.

use std::borrow::Cow;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::{TrainBatch, TrainLogits};
use crate::error::{ModelError, Result};
use crate::kernels::cpu;
use crate::kernels::cpu::for_each_block;
use crate::train::loss::{HirLoss, HirLossConfig};

// === impl GradAccumulator ===

/// Sums gradients of several backward passes in f32.
///
/// On the CPU each variable's sum is one buffer, allocated at its first gradient and kept
/// from step to step: a part is added into it in place, and the first part of a step
/// overwrites it, so after the first step nothing here is allocated or zero-filled.
/// Elsewhere (a GPU, a non-f32 gradient) each addition makes a new tensor. Both compute
/// `sum + g·scale` with the same roundings.
#[derive(Debug)]
pub struct GradAccumulator {
    sums: Vec<Option<Tensor>>,
    /// Whether `sums[i]` holds this step's sum (a kept buffer holds the last step's until
    /// the first part of this one overwrites it).
    live: Vec<bool>,
    micro_batches: usize,
}

impl GradAccumulator {
    /// An empty accumulator for `n_vars` variables.
    pub fn new(n_vars: usize) -> Self {
        Self {
            sums: vec![None; n_vars],
            live: vec![false; n_vars],
            micro_batches: 0,
        }
    }

    /// Adds `scale · grad` of every variable found in `grads` and counts one micro-batch.
    pub fn add(&mut self, vars: &[Var], grads: &GradStore, scale: f64) -> Result<()> {
        self.add_part(vars, grads, scale)?;
        self.micro_batches += 1;
        Ok(())
    }

    /// Adds `scale · grad` of every variable found in `grads`: one part of a micro-batch's
    /// gradients, which [`GradAccumulator::count_micro_batch`] closes.
    pub fn add_part(&mut self, vars: &[Var], grads: &GradStore, scale: f64) -> Result<()> {
        // `g·scale + 0` is candle's `affine(scale, 0)`, which the general path applies.
        let (unit, mul) = (scale == 1.0, scale as f32);
        for (i, v) in vars.iter().enumerate() {
            let Some(g) = grads.get(v.as_tensor()) else {
                continue;
            };
            let live = self.live[i];
            let in_place = match &self.sums[i] {
                Some(sum) => cpu::update_in_place(sum, Some(g), move |sum, g| {
                    for_each_block([sum], g, |[sum], g| {
                        for (s, &g) in sum.iter_mut().zip(g) {
                            let g = if unit { g } else { g * mul + 0.0 };
                            *s = if live { *s + g } else { g };
                        }
                    })
                })?,
                None => false,
            };
            if !in_place {
                let g = g.to_dtype(DType::F32)?;
                let g = match (unit, cpu::applies(&g)) {
                    (false, _) => g.affine(scale, 0.0)?,
                    // A buffer later updated in place must not share the store's memory.
                    (true, true) => g.copy()?,
                    (true, false) => g,
                };
                self.sums[i] = Some(match self.sums[i].take() {
                    Some(s) if live => (s + g)?,
                    _ => g,
                });
            }
            self.live[i] = true;
        }
        Ok(())
    }

    /// Counts one micro-batch whose gradients [`GradAccumulator::add_part`] added.
    pub fn count_micro_batch(&mut self) {
        self.micro_batches += 1;
    }

    /// Micro-batches added since the last reset.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// This step's sums.
    fn live_sums(&self) -> impl Iterator<Item = &Tensor> {
        self.sums
            .iter()
            .zip(&self.live)
            .filter_map(|(s, &live)| s.as_ref().filter(|_| live))
    }

    /// The global L2 norm of the summed gradients.
    pub fn global_norm(&self) -> Result<f64> {
        // One scalar per variable, summed on the device: a single read back, not one per
        // variable (each read waits for the device).
        let squares = self
            .live_sums()
            .map(|g| g.sqr()?.sum_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        if squares.is_empty() {
            return Ok(0.0);
        }
        let sq = Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f32>()?;
        Ok(f64::from(sq).sqrt())
    }

    /// Scales gradients so their global norm is at most `max_norm`; returns
    /// the norm before clipping.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.global_norm()?;
        if norm > max_norm && norm > 0.0 {
            let s = max_norm / (norm + 1e-6);
            let mul = s as f32;
            let live = self.sums.iter_mut().zip(&self.live);
            for g in live.filter_map(|(g, &live)| g.as_mut().filter(|_| live)) {
                let scaled = cpu::update_in_place(g, None, move |g, _| {
                    for_each_block([g], &[], |[g], _| {
                        g.iter_mut().for_each(|x| *x = *x * mul + 0.0)
                    })
                })?;
                if !scaled {
                    *g = g.affine(s, 0.0)?;
                }
            }
        }
        Ok(norm)
    }

    /// The summed gradient of variable `i`.
    pub fn grad(&self, i: usize) -> Option<&Tensor> {
        self.sums
            .get(i)
            .and_then(|g| g.as_ref())
            .filter(|_| self.live[i])
    }

    /// Starts the next step's sums (the CPU buffers are kept, to be overwritten).
    pub fn reset(&mut self) {
        self.live.fill(false);
        self.micro_batches = 0;
    }
}

// === impl AdamW ===

/// AdamW hyper-parameters (defaults of `torch.optim.AdamW` except the
/// learning rate, which is HIR's 5e-4, and weight decay 0 as in HIR).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: hir_core::run::DEFAULT_LEARNING_RATE,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// First and second moments of one variable as f32 values, borrowed or copied.
pub type MomentValues<'a> = (Cow<'a, [f32]>, Cow<'a, [f32]>);

/// First and second moments of one variable.
#[derive(Debug)]
enum Moments {
    /// Plain vectors, updated in one fused loop (CPU).
    Host(Vec<f32>, Vec<f32>),
    /// Device tensors, updated with tensor ops.
    Device(Tensor, Tensor),
}

/// AdamW with f32 moments, whatever the dtype of the weights. Variables held in
/// a lower precision (bf16 on a GPU) get an f32 master copy that the updates
/// accumulate in, so updates smaller than the variable's rounding step are not
/// lost. On the CPU the update is one fused pass over each variable.
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<Var>,
    moments: Vec<Option<Moments>>,
    /// f32 master copies of the variables that are not f32.
    masters: Vec<Option<Tensor>>,
    step: u64,
    /// Hyper-parameters (the learning rate may be changed between steps).
    pub cfg: AdamWConfig,
}

impl AdamW {
    /// An optimizer over `vars`.
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> Self {
        let n = vars.len();
        Self {
            vars,
            moments: (0..n).map(|_| None).collect(),
            masters: vec![None; n],
            step: 0,
            cfg,
        }
    }

    /// The variables.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The first and second moments of each variable, as f32 tensors on the
    /// CPU (`None` for a variable that has not been updated yet).
    pub fn moments(&self) -> Result<Vec<Option<(Tensor, Tensor)>>> {
        let cpu = candle_core::Device::Cpu;
        self.moments
            .iter()
            .zip(&self.vars)
            .map(|(m, var)| {
                Ok(match m {
                    None => None,
                    Some(Moments::Host(m, v)) => Some((
                        Tensor::from_slice(m, var.shape(), &cpu)?,
                        Tensor::from_slice(v, var.shape(), &cpu)?,
                    )),
                    Some(Moments::Device(m, v)) => Some((m.to_device(&cpu)?, v.to_device(&cpu)?)),
                })
            })
            .collect()
    }

    /// The first and second moments of each variable as f32 values, borrowed where they
    /// are held in host memory (copied from a device otherwise); `None` for a variable
    /// that has not been updated yet. What a snapshot writes, without a copy on the CPU.
    pub fn moment_values(&self) -> Result<Vec<Option<MomentValues<'_>>>> {
        self.moments
            .iter()
            .map(|m| {
                Ok(match m {
                    None => None,
                    Some(Moments::Host(m, v)) => {
                        Some((Cow::Borrowed(&m[..]), Cow::Borrowed(&v[..])))
                    }
                    Some(Moments::Device(m, v)) => Some((
                        Cow::Owned(m.flatten_all()?.to_vec1()?),
                        Cow::Owned(v.flatten_all()?.to_vec1()?),
                    )),
                })
            })
            .collect()
    }

    /// The f32 master copies of the variables that are not f32, on the CPU
    /// (`None` for f32 variables and before a variable's first update).
    pub fn masters(&self) -> Result<Vec<Option<Tensor>>> {
        let cpu = candle_core::Device::Cpu;
        self.masters
            .iter()
            .map(|m| Ok(m.as_ref().map(|m| m.to_device(&cpu)).transpose()?))
            .collect()
    }

    /// Restores the master copies saved by [`AdamW::masters`]; every copy must
    /// have its variable's shape.
    pub fn restore_masters(&mut self, masters: Vec<Option<Tensor>>) -> Result<()> {
        if masters.len() != self.vars.len() {
            return Err(ModelError::InvalidRequest(format!(
                "optimizer state has {} master copies, the model {} variables",
                masters.len(),
                self.vars.len()
            )));
        }
        let mut restored = Vec::with_capacity(masters.len());
        for (i, (m, var)) in masters.into_iter().zip(&self.vars).enumerate() {
            restored.push(match m {
                Some(m) if m.shape() != var.shape() => {
                    return Err(ModelError::InvalidRequest(format!(
                        "master copy of variable {i} has shape {:?}, the variable {:?}",
                        m.shape(),
                        var.shape()
                    )))
                }
                Some(m) => Some(m.to_dtype(DType::F32)?.to_device(var.device())?),
                None => None,
            });
        }
        self.masters = restored;
        Ok(())
    }

    /// Restores the step count and the moments saved by [`AdamW::moments`];
    /// every moment must have its variable's shape.
    pub fn restore(&mut self, step: u64, moments: Vec<Option<(Tensor, Tensor)>>) -> Result<()> {
        if moments.len() != self.vars.len() {
            return Err(ModelError::InvalidRequest(format!(
                "optimizer state has {} variables, the model {}",
                moments.len(),
                self.vars.len()
            )));
        }
        let mut restored = Vec::with_capacity(moments.len());
        for (i, (slot, var)) in moments.into_iter().zip(&self.vars).enumerate() {
            restored.push(match slot {
                None => None,
                Some((m, v)) => {
                    if m.shape() != var.shape() || v.shape() != var.shape() {
                        return Err(ModelError::InvalidRequest(format!(
                            "optimizer moments of variable {i} have shapes {:?} and {:?}, the \
                             variable {:?}",
                            m.shape(),
                            v.shape(),
                            var.shape()
                        )));
                    }
                    let (m, v) = (m.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
                    Some(if var.device().is_cpu() {
                        Moments::Host(m.flatten_all()?.to_vec1()?, v.flatten_all()?.to_vec1()?)
                    } else {
                        Moments::Device(m.to_device(var.device())?, v.to_device(var.device())?)
                    })
                }
            });
        }
        self.moments = restored;
        self.step = step;
        Ok(())
    }

    /// Applies one update from the accumulated gradients (variables without a
    /// gradient are left alone).
    pub fn step(&mut self, grads: &GradAccumulator) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = grads.grad(i) else { continue };
            if var.device().is_cpu() {
                let n = g.elem_count();
                let (m, v) = match &mut self.moments[i] {
                    Some(Moments::Host(m, v)) => (m, v),
                    slot => {
                        *slot = Some(Moments::Host(vec![0.0; n], vec![0.0; n]));
                        match slot {
                            Some(Moments::Host(m, v)) => (m, v),
                            _ => unreachable!("just set"),
                        }
                    }
                };
                let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
                let (lr, eps) = (c.lr as f32, c.eps as f32);
                let decay = 1.0 - (c.lr * c.weight_decay) as f32;
                let (ibc1, ibc2) = (1.0 / bc1 as f32, 1.0 / bc2 as f32);
                let update = |w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]| {
                    for_each_block([w, m, v], g, |[w, m, v], g| {
                        for j in 0..g.len() {
                            let gj = g[j];
                            m[j] = b1 * m[j] + (1.0 - b1) * gj;
                            v[j] = b2 * v[j] + (1.0 - b2) * gj * gj;
                            let upd = (m[j] * ibc1) / ((v[j] * ibc2).sqrt() + eps);
                            w[j] = w[j] * decay - lr * upd;
                        }
                    })
                };
                // An f32 weight is updated where it lives; its gradient is read in place.
                if self.masters[i].is_none()
                    && cpu::update_in_place(var.as_tensor(), Some(g), |w, g| update(w, m, v, g))?
                {
                    continue;
                }
                let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
                let mut w: Vec<f32> = self.masters[i]
                    .take()
                    .unwrap_or_else(|| var.as_tensor().clone())
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1()?;
                update(&mut w, m, v, &g);
                let w = Tensor::from_vec(w, var.shape(), var.device())?;
                if var.dtype() != DType::F32 {
                    self.masters[i] = Some(w.clone());
                }
                var.set(&w.to_dtype(var.dtype())?)?;
                continue;
            }
            let (m, v) = match self.moments[i].take() {
                Some(Moments::Device(m, v)) => (
                    ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?,
                    ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?,
                ),
                _ => ((g * (1.0 - c.beta1))?, (g.sqr()? * (1.0 - c.beta2))?),
            };
            let w = match self.masters[i].take() {
                Some(master) => master,
                None => var.as_tensor().to_dtype(DType::F32)?,
            };
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let w = ((w * (1.0 - c.lr * c.weight_decay))? - (update * c.lr)?)?;
            var.set(&w.to_dtype(var.dtype())?)?;
            if var.dtype() != DType::F32 {
                self.masters[i] = Some(w);
            }
            self.moments[i] = Some(Moments::Device(m, v));
        }
        Ok(())
    }
}

// === impl Optimizer ===

/// The optimizer of a training run: [`AdamW`] behind gradient accumulation over
/// micro-batches and global-norm clipping.
#[derive(Debug)]
pub struct Optimizer {
    opt: AdamW,
    acc: GradAccumulator,
    /// Micro-batches per optimizer step.
    pub accumulation_steps: usize,
    /// Maximum global gradient norm (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Optimizer steps taken so far.
    pub step: u64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

impl Optimizer {
    /// An optimizer over the model's trainable variables.
    pub fn new(
        vars: &[(String, Var)],
        cfg: AdamWConfig,
        accumulation_steps: usize,
        max_grad_norm: Option<f64>,
    ) -> Self {
        let vars: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
        let n = vars.len();
        Self {
            opt: AdamW::new(vars, cfg),
            acc: GradAccumulator::new(n),
            accumulation_steps: accumulation_steps.max(1),
            max_grad_norm,
        }
    }

    /// The AdamW update and its state.
    pub fn adamw(&self) -> &AdamW {
        &self.opt
    }

    /// The AdamW update, to restore its state.
    pub fn adamw_mut(&mut self) -> &mut AdamW {
        &mut self.opt
    }

    /// Back-propagates `loss` (divided by the accumulation steps) and, once
    /// enough micro-batches are in, clips and steps. Returns a report when a
    /// step was taken.
    pub fn backward(&mut self, loss: &Tensor) -> Result<Option<StepReport>> {
        let grads = loss.backward()?;
        self.acc.add(
            self.opt.vars(),
            &grads,
            1.0 / self.accumulation_steps as f64,
        )?;
        self.step_when_ready()
    }

    /// The HIR loss of one micro-batch of paired batches: its gradients, times `weight`
    /// and divided by the accumulation steps, are accumulated as the model computes them
    /// ([`TrainLogits::hir_gradients`]); once enough micro-batches are in, clips and steps.
    pub fn backward_hir(
        &mut self,
        model: &impl TrainLogits,
        pos: &TrainBatch,
        neg: &TrainBatch,
        cfg: &HirLossConfig,
        weight: f64,
    ) -> Result<(HirLoss, Option<StepReport>)> {
        let scale = weight / self.accumulation_steps as f64;
        let (acc, vars) = (&mut self.acc, self.opt.vars());
        let loss = model.hir_gradients(pos, neg, cfg, &mut |g| acc.add_part(vars, g, scale))?;
        self.acc.count_micro_batch();
        Ok((loss, self.step_when_ready()?))
    }

    fn step_when_ready(&mut self) -> Result<Option<StepReport>> {
        if self.acc.micro_batches() < self.accumulation_steps {
            return Ok(None);
        }
        let grad_norm = match self.max_grad_norm {
            Some(max) => self.acc.clip_global_norm(max)?,
            None => self.acc.global_norm()?,
        };
        self.opt.step(&self.acc)?;
        self.acc.reset();
        Ok(Some(StepReport {
            step: self.opt.steps(),
            grad_norm,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Deterministic values of `n` elements, large enough for the pool's split.
    fn wave(n: usize, phase: f32) -> Tensor {
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + phase).sin()).collect();
        Tensor::from_vec(v, n, &Device::Cpu).unwrap()
    }

    fn store(var: &Var, g: &Tensor) -> GradStore {
        let mut s = GradStore::default();
        s.insert(var.as_tensor(), g.clone());
        s
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    #[test]
    fn sums_in_place_are_the_general_paths_and_each_step_starts_from_its_first_part() {
        let n = 40_000;
        let var = Var::from_tensor(&wave(n, 0.0)).unwrap();
        let vars = std::slice::from_ref(&var);
        let (g1, g2, g3) = (wave(n, 1.0), wave(n, 2.0), wave(n, 3.0));
        let mut acc = GradAccumulator::new(1);
        acc.add_part(vars, &store(&var, &g1), 0.5).unwrap();
        acc.add_part(vars, &store(&var, &g2), 0.5).unwrap();
        let want = (g1.affine(0.5, 0.0).unwrap() + g2.affine(0.5, 0.0).unwrap()).unwrap();
        assert_eq!(bits(acc.grad(0).unwrap()), bits(&want));
        // The store's tensors were not written through.
        assert_eq!(bits(&g1), bits(&wave(n, 1.0)));

        let norm = acc.global_norm().unwrap();
        let clipped = acc.clip_global_norm(norm / 4.0).unwrap();
        assert_eq!(clipped, norm);
        let s = norm / 4.0 / (norm + 1e-6);
        assert_eq!(
            bits(acc.grad(0).unwrap()),
            bits(&want.affine(s, 0.0).unwrap())
        );

        // The next step: the kept buffer holds nothing of the last one.
        acc.reset();
        assert!(acc.grad(0).is_none());
        acc.add_part(vars, &store(&var, &g3), 0.25).unwrap();
        assert_eq!(
            bits(acc.grad(0).unwrap()),
            bits(&g3.affine(0.25, 0.0).unwrap())
        );
        acc.add_part(vars, &store(&var, &g1), 1.0).unwrap();
        let want = (g3.affine(0.25, 0.0).unwrap() + &g1).unwrap();
        assert_eq!(bits(acc.grad(0).unwrap()), bits(&want));
    }

    #[test]
    fn adamw_in_place_follows_the_update_rule_value_for_value() {
        let n = 40_000;
        let cfg = AdamWConfig {
            lr: 1e-3,
            weight_decay: 0.01,
            ..Default::default()
        };
        let var = Var::from_tensor(&wave(n, 0.5)).unwrap();
        let mut opt = AdamW::new(vec![var.clone()], cfg);
        let (mut w, mut m, mut v) = (
            wave(n, 0.5).to_vec1::<f32>().unwrap(),
            vec![0f32; n],
            vec![0f32; n],
        );
        for step in 1..=3 {
            let g = wave(n, step as f32);
            let mut acc = GradAccumulator::new(1);
            acc.add(std::slice::from_ref(&var), &store(&var, &g), 1.0)
                .unwrap();
            opt.step(&acc).unwrap();
            // The rule as written, in f32.
            let (b1, b2) = (cfg.beta1 as f32, cfg.beta2 as f32);
            let ibc1 = 1.0 / (1.0 - cfg.beta1.powi(step)) as f32;
            let ibc2 = 1.0 / (1.0 - cfg.beta2.powi(step)) as f32;
            let decay = 1.0 - (cfg.lr * cfg.weight_decay) as f32;
            for (j, gj) in g.to_vec1::<f32>().unwrap().into_iter().enumerate() {
                m[j] = b1 * m[j] + (1.0 - b1) * gj;
                v[j] = b2 * v[j] + (1.0 - b2) * gj * gj;
                let upd = (m[j] * ibc1) / ((v[j] * ibc2).sqrt() + cfg.eps as f32);
                w[j] = w[j] * decay - cfg.lr as f32 * upd;
            }
            let got = bits(&var.as_tensor().clone());
            let want: Vec<u32> = w.iter().map(|x| x.to_bits()).collect();
            assert!(got == want, "step {step}: the weights differ from the rule");
        }
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        let dev = Device::Cpu;
        let var = Var::new(&[1.0f32, -2.0, 0.5], &dev).unwrap();
        let loss = (var.as_tensor() * Tensor::new(&[3.0f32, -1.0, 0.0], &dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let mut acc = GradAccumulator::new(1);
        acc.add(std::slice::from_ref(&var), &loss.backward().unwrap(), 1.0)
            .unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![var.clone()], cfg);
        opt.step(&acc).unwrap();
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        // m̂ = g, v̂ = g², update = g/(|g|+eps) = sign(g); decay multiplies by 1 - lr·wd.
        let d = 1.0 - 0.1 * 0.01;
        let want = [1.0 * d - 0.1, -2.0 * d + 0.1, 0.5 * d];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn restored_moments_continue_exactly_like_the_original() {
        let dev = Device::Cpu;
        let run = |restore_after: Option<usize>| {
            let var = Var::new(&[1.0f32, -2.0, 0.5], &dev).unwrap();
            let mut opt = AdamW::new(vec![var.clone()], AdamWConfig::default());
            for step in 0..4 {
                if restore_after == Some(step) {
                    let saved = opt.moments().unwrap();
                    let mut fresh = AdamW::new(vec![var.clone()], AdamWConfig::default());
                    fresh.restore(opt.steps(), saved).unwrap();
                    opt = fresh;
                }
                let loss = var.as_tensor().sqr().unwrap().sum_all().unwrap();
                let mut acc = GradAccumulator::new(1);
                acc.add(std::slice::from_ref(&var), &loss.backward().unwrap(), 1.0)
                    .unwrap();
                opt.step(&acc).unwrap();
            }
            var.as_tensor().to_vec1::<f32>().unwrap()
        };
        assert_eq!(run(None), run(Some(2)));
        let var = Var::new(&[1.0f32], &dev).unwrap();
        let mut opt = AdamW::new(vec![var], AdamWConfig::default());
        let bad = Tensor::zeros(2, DType::F32, &dev).unwrap();
        assert!(opt.restore(1, vec![Some((bad.clone(), bad))]).is_err());
    }

    #[test]
    fn bf16_variables_accumulate_updates_below_their_rounding_step_in_an_f32_master() {
        let dev = Device::Cpu;
        let run = |restore: bool| {
            let var = Var::from_tensor(
                &Tensor::new(&[1.0f32], &dev)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
            )
            .unwrap();
            let cfg = AdamWConfig {
                lr: 1e-3,
                ..Default::default()
            };
            let mut opt = AdamW::new(vec![var.clone()], cfg);
            for step in 0..6 {
                if restore && step == 3 {
                    let (moments, masters) = (opt.moments().unwrap(), opt.masters().unwrap());
                    opt = AdamW::new(vec![var.clone()], cfg);
                    opt.restore(3, moments).unwrap();
                    opt.restore_masters(masters).unwrap();
                }
                let loss = var
                    .as_tensor()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let mut acc = GradAccumulator::new(1);
                acc.add(std::slice::from_ref(&var), &loss.backward().unwrap(), 1.0)
                    .unwrap();
                opt.step(&acc).unwrap();
            }
            let master: Vec<f32> = opt.masters().unwrap()[0]
                .as_ref()
                .unwrap()
                .to_vec1()
                .unwrap();
            let value: Vec<f32> = var
                .as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap();
            (master[0], value[0])
        };
        let (master, value) = run(false);
        // Each step moves 1e-3, below bf16's step of 2^-7 at 1.0: without a master copy the
        // weight would round back to 1.0 every time.
        assert!((master - 0.994).abs() < 1e-4, "{master}");
        assert!(value < 1.0, "{value}");
        assert_eq!(
            run(true),
            (master, value),
            "restored state continues exactly"
        );
    }

    #[test]
    fn clipping_scales_the_global_norm_down() {
        let dev = Device::Cpu;
        let a = Var::new(&[3.0f32], &dev).unwrap();
        let b = Var::new(&[4.0f32], &dev).unwrap();
        // d/da (a²/2 + b²/2) = a → global norm 5.
        let loss = ((a.as_tensor().sqr().unwrap() + b.as_tensor().sqr().unwrap()).unwrap() * 0.5)
            .unwrap()
            .sum_all()
            .unwrap();
        let vars = [a, b];
        let mut acc = GradAccumulator::new(2);
        acc.add(&vars, &loss.backward().unwrap(), 1.0).unwrap();
        acc.add(&vars, &loss.backward().unwrap(), 1.0).unwrap();
        assert!((acc.global_norm().unwrap() - 10.0).abs() < 1e-4);
        let before = acc.clip_global_norm(1.0).unwrap();
        assert!((before - 10.0).abs() < 1e-4);
        assert!((acc.global_norm().unwrap() - 1.0).abs() < 1e-4);
    }
}
