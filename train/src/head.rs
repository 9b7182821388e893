//! The exit adapter being trained (the engine's low-rank residual MLP,
//! `h + up · silu(down · rmsnorm(h) ⊙ norm)`), its loss against the teacher and Adam.
//!
//! The output head is frozen and large (vocabulary × hidden), so its part of the gradient is
//! written out rather than left to autodiff, which would also form the gradient of the
//! frozen matrix: with `z = W · n(h')` the gradient of the cross-entropy to the teacher's
//! distribution `p` is `∂L/∂z = softmax(z) − p`, and `∂L/∂n(h') = Wᵀ · ∂L/∂z`. candle's
//! autodiff carries it from there through the final norm and the adapter.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor, Var};

use crate::data::Dataset;
use crate::rng::Rng;
use crate::upper::{RowTarget, score_rows};

/// The frozen final norm and output head of the model.
pub struct Frozen {
    /// Final RMSNorm weight `[d]`.
    pub norm: Tensor,
    /// Output head `[vocab, d]`.
    pub w: Tensor,
    /// RMSNorm epsilon.
    pub eps: f64,
}

impl Frozen {
    /// The final norm and output head of `model`, as f32 tensors.
    pub fn of(model: &tandem_models::Model) -> Result<Self> {
        let (norm, w) = model.head_weights()?;
        let d = model.config().n_embd;
        Ok(Frozen {
            norm: Tensor::from_vec(norm, d, &Device::Cpu)?,
            w,
            eps: model.config().rms_eps as f64,
        })
    }
}

/// The trainable adapter.
pub struct Head {
    /// `[d]`.
    pub norm: Var,
    /// `[rank, d]`.
    pub down: Var,
    /// `[d, rank]`.
    pub up: Var,
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

impl Head {
    /// A new adapter that starts as the identity (`up = 0`, so its exit is the plain logit
    /// lens), with `down` drawn from N(0, 1/d).
    pub fn init(d: usize, rank: usize, seed: u64) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let scale = 1.0 / (d as f64).sqrt();
        let down: Vec<f32> = (0..rank * d)
            .map(|_| (rng.normal() * scale) as f32)
            .collect();
        let dev = &Device::Cpu;
        Ok(Head {
            norm: Var::from_tensor(&Tensor::ones(d, DType::F32, dev)?)?,
            down: Var::from_tensor(&Tensor::from_vec(down, (rank, d), dev)?)?,
            up: Var::from_tensor(&Tensor::zeros((d, rank), DType::F32, dev)?)?,
        })
    }

    /// The parameters, in a fixed order.
    pub fn vars(&self) -> [&Var; 3] {
        [&self.norm, &self.down, &self.up]
    }

    /// Number of parameters.
    pub fn params(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Rank of the adapter.
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// Adapted hidden states `[n, d]`.
    pub fn adapt(&self, x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
        let n = rms_norm(x, self.norm.as_tensor(), eps)?;
        let z = n.matmul(&self.down.as_tensor().t()?)?.silu()?;
        x + z.matmul(&self.up.as_tensor().t()?)?
    }
}

/// Loss and agreement of a head (or of the plain lens, or of a model) on some positions.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Metrics {
    /// Cross-entropy to the targets — the teacher's top-K distribution (renormalised), or
    /// the text's next token for `train target` — nats per position.
    pub loss: f64,
    /// Share of positions where the top token is the target's (the teacher's top token, or
    /// the next token).
    pub top1: f64,
    /// Share of positions where the target's token is among the five best.
    pub top5: f64,
    /// Positions measured.
    pub positions: usize,
}

/// A batch's input tensors.
struct Batch {
    x: Tensor,
    targets: Vec<RowTarget>,
}

fn batch(data: &Dataset, idx: &[u32]) -> Result<Batch> {
    let (d, k) = (data.d, data.top_k);
    let mut x = Vec::with_capacity(idx.len() * d);
    let mut targets = Vec::with_capacity(idx.len());
    for &i in idx {
        let i = i as usize;
        x.extend_from_slice(&data.hidden[i * d..(i + 1) * d]);
        let p = &data.probs[i * k..(i + 1) * k];
        let s: f32 = p.iter().sum();
        targets.push(Some((
            data.ids[i * k..(i + 1) * k].to_vec(),
            p.iter().map(|v| v / s).collect(),
        )));
    }
    Ok(Batch {
        x: Tensor::from_vec(x, (idx.len(), d), &Device::Cpu)?,
        targets,
    })
}

/// Logits of adapted (or raw) hidden states through the frozen head.
fn head_logits(frozen: &Frozen, h: &Tensor) -> candle_core::Result<Tensor> {
    rms_norm(h, &frozen.norm, frozen.eps)?.matmul(&frozen.w.t()?)
}

/// Measures `head` (or the plain logit lens when `None`) on every position of `data`.
pub fn evaluate(head: Option<&Head>, frozen: &Frozen, data: &Dataset) -> Result<Metrics> {
    let vocab = frozen.w.dims()[0];
    let mut m = Metrics::default();
    let all: Vec<u32> = (0..data.len() as u32).collect();
    for idx in all.chunks(256) {
        let b = batch(data, idx)?;
        let h = match head {
            Some(head) => head.adapt(&b.x, frozen.eps)?,
            None => b.x.clone(),
        };
        let mut z = head_logits(frozen, &h)?.flatten_all()?.to_vec1::<f32>()?;
        for (loss, t1, t5) in score_rows(&mut z, vocab, &b.targets, None) {
            m.loss += loss;
            m.top1 += t1 as u8 as f64;
            m.top5 += t5 as u8 as f64;
        }
    }
    let n = data.len().max(1) as f64;
    m.loss /= n;
    m.top1 /= n;
    m.top5 /= n;
    m.positions = data.len();
    Ok(m)
}

/// Adam (Kingma and Ba 2015) over a list of parameters (the same list, in the same order,
/// at every step).
pub struct Adam {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken.
    pub t: usize,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;

impl Adam {
    /// Zero moments for `vars`.
    pub fn new(vars: &[&Var]) -> Result<Self> {
        let zeros = || -> candle_core::Result<Vec<Tensor>> {
            vars.iter().map(|v| v.zeros_like()).collect()
        };
        Ok(Adam {
            m: zeros()?,
            v: zeros()?,
            t: 0,
        })
    }

    /// One update of `vars` (those with a gradient in `grads`) at learning rate `lr`.
    pub fn step(
        &mut self,
        vars: &[&Var],
        grads: &candle_core::backprop::GradStore,
        lr: f64,
    ) -> Result<()> {
        self.t += 1;
        let c1 = 1.0 - BETA1.powi(self.t as i32);
        let c2 = 1.0 - BETA2.powi(self.t as i32);
        for (i, var) in vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            self.m[i] = ((&self.m[i] * BETA1)? + (g * (1.0 - BETA1))?)?;
            self.v[i] = ((&self.v[i] * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let update = ((&self.m[i] / c1)? / ((&self.v[i] / c2)?.sqrt()? + ADAM_EPS)?)?;
            var.set(&(var.as_tensor() - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// The loss on the positions `idx` and its gradient with respect to the head's parameters.
fn loss_and_grads(
    head: &Head,
    frozen: &Frozen,
    data: &Dataset,
    idx: &[u32],
) -> Result<(f64, candle_core::backprop::GradStore)> {
    let b = batch(data, idx)?;
    let vocab = frozen.w.dims()[0];
    let h = head.adapt(&b.x, frozen.eps)?;
    let n2 = rms_norm(&h, &frozen.norm, frozen.eps)?;
    let mut z = n2
        .detach()
        .matmul(&frozen.w.t()?)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let rows = score_rows(&mut z, vocab, &b.targets, Some(idx.len()));
    let loss = rows.iter().map(|r| r.0).sum::<f64>() / idx.len() as f64;
    let dz = Tensor::from_vec(z, (idx.len(), vocab), &Device::Cpu)?;
    let dn2 = dz.matmul(&frozen.w)?;
    // d/dθ of Σ n2 ⊙ dn2 (dn2 held constant) is exactly the loss gradient.
    let surrogate = (n2 * dn2)?.sum_all()?;
    Ok((loss, surrogate.backward()?))
}

/// One training step on the positions `idx`; returns the batch's loss.
pub fn train_step(
    head: &Head,
    adam: &mut Adam,
    frozen: &Frozen,
    data: &Dataset,
    idx: &[u32],
    lr: f64,
) -> Result<f64> {
    let (loss, grads) = loss_and_grads(head, frozen, data, idx)?;
    adam.step(&head.vars(), &grads, lr)?;
    Ok(loss)
}

/// The learning rate at `step` of `steps`: linear warm-up over the first 5% (at most 50
/// steps), then cosine decay to a tenth.
pub fn lr_at(step: usize, steps: usize, lr: f64) -> f64 {
    let warm = (steps / 20).clamp(1, 50);
    if step < warm {
        return lr * (step + 1) as f64 / warm as f64;
    }
    let t = (step - warm) as f64 / (steps - warm).max(1) as f64;
    lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

/// The positions of the batch at `step`: a seeded permutation of the dataset per epoch,
/// read in order, so the batches depend only on the seed and the step.
pub fn batch_indices(
    n: usize,
    batch: usize,
    seed: u64,
    step: usize,
    perm: &mut Option<(usize, Vec<u32>)>,
) -> Vec<u32> {
    (0..batch)
        .map(|j| {
            let p = step * batch + j;
            let epoch = p / n;
            if perm.as_ref().is_none_or(|(e, _)| *e != epoch) {
                let mut rng = Rng::new(
                    seed.wrapping_mul(0x100_0000_01B3)
                        .wrapping_add(epoch as u64 + 1),
                );
                *perm = Some((epoch, rng.permutation(n)));
            }
            perm.as_ref().expect("set above").1[p % n]
        })
        .collect()
}

/// Saves named parameters, Adam's state over them and the step reached (safetensors, with
/// the run's options in `meta` beside it).
pub fn save_checkpoint(path: &Path, vars: &[(&str, &Var)], adam: &Adam, meta: &str) -> Result<()> {
    let mut t: HashMap<String, Tensor> = HashMap::new();
    for (i, (name, v)) in vars.iter().enumerate() {
        t.insert(format!("head.{name}"), v.as_tensor().clone());
        t.insert(format!("adam.m.{name}"), adam.m[i].clone());
        t.insert(format!("adam.v.{name}"), adam.v[i].clone());
    }
    t.insert(
        "adam.t".into(),
        Tensor::new(&[adam.t as u32], &Device::Cpu)?,
    );
    let tmp = path.with_extension("partial");
    candle_core::safetensors::save(&t, &tmp)
        .with_context(|| format!("writing checkpoint {}", tmp.display()))?;
    std::fs::write(path.with_extension("ckpt.json"), meta)
        .with_context(|| format!("writing checkpoint {}", path.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("writing checkpoint {}", path.display()))?;
    Ok(())
}

/// Loads a checkpoint written by [`save_checkpoint`] if its options match `meta`: the
/// parameters named `names` (in that order) and Adam's state over them.
pub fn load_checkpoint(path: &Path, names: &[&str], meta: &str) -> Result<(Vec<Var>, Adam)> {
    let saved = std::fs::read_to_string(path.with_extension("ckpt.json")).unwrap_or_default();
    if saved != meta {
        bail!(
            "checkpoint {} was made with other options ({}); resume with the same options, \
             or delete it to start over",
            path.display(),
            saved.trim()
        );
    }
    let t = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading checkpoint {}", path.display()))?;
    let get = |name: &str| {
        t.get(name)
            .cloned()
            .with_context(|| format!("checkpoint {} has no `{name}`", path.display()))
    };
    let vars = names
        .iter()
        .map(|n| Ok(Var::from_tensor(&get(&format!("head.{n}"))?)?))
        .collect::<Result<_>>()?;
    let adam = Adam {
        m: names
            .iter()
            .map(|n| get(&format!("adam.m.{n}")))
            .collect::<Result<_>>()?,
        v: names
            .iter()
            .map(|n| get(&format!("adam.v.{n}")))
            .collect::<Result<_>>()?,
        t: get("adam.t")?.to_vec1::<u32>()?[0] as usize,
    };
    Ok((vars, adam))
}

/// Names of the head's parameters in a checkpoint, in [`Head::vars`] order.
pub const HEAD_NAMES: [&str; 3] = ["norm", "down", "up"];

impl Head {
    /// The head's parameters with their checkpoint names.
    pub fn named(&self) -> Vec<(&'static str, &Var)> {
        HEAD_NAMES.into_iter().zip(self.vars()).collect()
    }

    /// A head from parameters in [`HEAD_NAMES`] order (a loaded checkpoint).
    pub fn from_vars(vars: Vec<Var>) -> Result<Self> {
        let [norm, down, up]: [Var; 3] = vars
            .try_into()
            .map_err(|_| anyhow::anyhow!("a head has three parameters"))?;
        Ok(Head { norm, down, up })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The written-out head gradient plus autodiff through the adapter equals a finite
    /// difference of the loss.
    #[test]
    fn gradient_matches_finite_differences() {
        let (d, rank, vocab, k, n) = (8, 4, 12, 3, 5);
        let mut rng = Rng::new(7);
        let mut data = Dataset::new(d, k);
        for _ in 0..n {
            data.hidden.extend((0..d).map(|_| rng.normal() as f32));
            let mut ids: Vec<u32> = rng.permutation(vocab).into_iter().take(k).collect();
            ids.sort();
            data.ids.extend(ids);
            data.probs.extend([0.5, 0.3, 0.1]);
        }
        let w: Vec<f32> = (0..vocab * d).map(|_| rng.normal() as f32).collect();
        let frozen = Frozen {
            norm: Tensor::from_vec(
                (0..d).map(|i| 1.0 + 0.1 * i as f32).collect::<Vec<_>>(),
                d,
                &Device::Cpu,
            )
            .unwrap(),
            w: Tensor::from_vec(w, (vocab, d), &Device::Cpu).unwrap(),
            eps: 1e-5,
        };
        let head = Head::init(d, rank, 3).unwrap();
        // Make `up` non-zero so every parameter has a gradient.
        let up: Vec<f32> = (0..d * rank).map(|_| 0.3 * rng.normal() as f32).collect();
        head.up
            .set(&Tensor::from_vec(up, (d, rank), &Device::Cpu).unwrap())
            .unwrap();
        let idx: Vec<u32> = (0..n as u32).collect();
        let loss_of = |head: &Head| -> f64 {
            let b = batch(&data, &idx).unwrap();
            let h = head.adapt(&b.x, frozen.eps).unwrap();
            let mut z = head_logits(&frozen, &h)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            score_rows(&mut z, vocab, &b.targets, None)
                .iter()
                .map(|r| r.0)
                .sum::<f64>()
                / n as f64
        };
        // The gradient training uses.
        let before: Vec<Vec<f32>> = head
            .vars()
            .iter()
            .map(|v| v.flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let (loss, grads) = loss_and_grads(&head, &frozen, &data, &idx).unwrap();
        assert!((loss - loss_of(&head)).abs() < 1e-9, "{loss}");
        for (vi, var) in head.vars().into_iter().enumerate() {
            let g: Vec<f32> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for j in [0, g.len() / 2, g.len() - 1] {
                let eps = 1e-3f32;
                let mut p = before[vi].clone();
                p[j] += eps;
                var.set(&Tensor::from_vec(p.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let up = loss_of(&head);
                p[j] -= 2.0 * eps;
                var.set(&Tensor::from_vec(p, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let down = loss_of(&head);
                var.set(&Tensor::from_vec(before[vi].clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let fd = (up - down) / (2.0 * eps as f64);
                assert!(
                    (fd - g[j] as f64).abs() < 2e-3 + 0.02 * fd.abs(),
                    "param {vi}[{j}]: finite difference {fd}, gradient {}",
                    g[j]
                );
            }
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_a_tenth() {
        assert!(lr_at(0, 1000, 1.0) < 0.05);
        assert!((lr_at(49, 1000, 1.0) - 1.0).abs() < 1e-9);
        assert!((lr_at(999, 1000, 1.0) - 0.1).abs() < 0.01);
        let mut perm = None;
        let a = batch_indices(10, 4, 1, 2, &mut perm);
        let mut fresh = None;
        assert_eq!(a, batch_indices(10, 4, 1, 2, &mut fresh));
        // Two epochs cover every position twice.
        let mut seen = vec![0; 10];
        for s in 0..5 {
            for i in batch_indices(10, 4, 1, s, &mut perm) {
                seen[i as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 2), "{seen:?}");
    }
}
