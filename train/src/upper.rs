//! The upper part of a model as candle trains it: blocks from `K` on over cached hidden
//! states entering block `K`, the output norm, and the frozen output head (whose part of the
//! gradient is written out, as in [`crate::head`]). `tandem train target` fine-tunes all the
//! blocks from `K` with LoRA; `tandem train drafter --head block` trains one block in full.
//!
//! In f32 from the dequantized weights; with nothing trained yet it is the engine's forward
//! of those blocks (`train/tests/target_forward.rs` compares them).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, D, DType, Device, Layout, Shape, Tensor, Var};
use rayon::prelude::*;
use tandem_models::{Architecture, BLOCK_MATRICES, Config};

use crate::head::{self, Adam, Metrics};
use crate::rng::Rng;
use crate::{EvalPoint, bar, say};

const MAGIC: &[u8; 8] = b"TNDMSQ02";

/// Sequences of positions with the frozen backbone's hidden state at each, and what each
/// position is trained towards.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqData {
    /// Hidden size.
    pub d: usize,
    /// Positions per sequence.
    pub seq_len: usize,
    /// `sequences × seq_len × d` hidden states entering block `K`.
    pub hidden: Vec<f32>,
    /// What each position predicts.
    pub targets: Targets,
}

/// What the positions of a [`SeqData`] are trained towards.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// The text's next token: `sequences × seq_len` tokens (a sequence's last position has
    /// none).
    Next(Vec<u32>),
    /// A teacher's top-`k` per position: ids, most probable first, and probabilities.
    Teacher {
        /// Entries per position.
        k: usize,
        /// `positions × k` ids.
        ids: Vec<u32>,
        /// `positions × k` probabilities (renormalised when read).
        probs: Vec<f32>,
    },
}

impl SeqData {
    /// Number of sequences.
    pub fn sequences(&self) -> usize {
        self.hidden.len() / (self.seq_len * self.d).max(1)
    }

    /// Number of positions.
    pub fn positions(&self) -> usize {
        self.sequences() * self.seq_len
    }

    /// Writes the data (beside `path`, then renamed into place).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("partial");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let k = match &self.targets {
            Targets::Next(_) => 0,
            Targets::Teacher { k, .. } => *k,
        };
        let mut bytes = Vec::with_capacity(40 + 4 * self.hidden.len());
        bytes.extend_from_slice(MAGIC);
        for v in [self.d, self.seq_len, self.sequences(), k] {
            bytes.extend_from_slice(&(v as u64).to_le_bytes());
        }
        bytes.extend(self.hidden.iter().flat_map(|t| t.to_le_bytes()));
        match &self.targets {
            Targets::Next(tokens) => bytes.extend(tokens.iter().flat_map(|t| t.to_le_bytes())),
            Targets::Teacher { ids, probs, .. } => {
                bytes.extend(ids.iter().flat_map(|t| t.to_le_bytes()));
                bytes.extend(probs.iter().flat_map(|t| t.to_le_bytes()));
            }
        }
        std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }

    /// Reads data written by [`SeqData::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if bytes.len() < 40 || &bytes[..8] != MAGIC {
            bail!("{} is not a tandem sequence-training cache", path.display());
        }
        let u = |i: usize| {
            u64::from_le_bytes(bytes[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes")) as usize
        };
        let (d, seq_len, n, k) = (u(0), u(1), u(2), u(3));
        let positions = n * seq_len;
        let want = 40 + 4 * positions * (d + k.max(1) + k);
        if bytes.len() != want {
            bail!(
                "{} is cut short ({} of {want} bytes); delete it to rebuild",
                path.display(),
                bytes.len()
            );
        }
        let words = |b: &[u8]| -> Vec<[u8; 4]> {
            b.chunks_exact(4)
                .map(|c| c.try_into().expect("4 bytes"))
                .collect()
        };
        let (hid, rest) = bytes[40..].split_at(4 * positions * d);
        let targets = if k == 0 {
            Targets::Next(words(rest).into_iter().map(u32::from_le_bytes).collect())
        } else {
            let (ids, probs) = rest.split_at(4 * positions * k);
            Targets::Teacher {
                k,
                ids: words(ids).into_iter().map(u32::from_le_bytes).collect(),
                probs: words(probs).into_iter().map(f32::from_le_bytes).collect(),
            }
        };
        Ok(SeqData {
            d,
            seq_len,
            hidden: words(hid).into_iter().map(f32::from_le_bytes).collect(),
            targets,
        })
    }
}

/// `x·Wᵀ` for a frozen `W` whose backward gives only the input's gradient: candle's matmul
/// also forms the gradient of its right-hand side, a product as large as the forward, which
/// a frozen matrix does not need.
struct FrozenMatmul(Tensor);

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, inp) = l.shape().dims2()?;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("frozen-matmul needs a contiguous input");
        };
        let x = Tensor::from_slice(&s.as_slice::<f32>()?[a..b], (n, inp), &Device::Cpu)?;
        let y = x.matmul(&self.0.t()?)?;
        let shape = Shape::from(y.dims());
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1()?), shape))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.0)?))
    }
}

/// How a matrix is trained.
enum Weight {
    /// Frozen `W` with a trainable low-rank update: `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`.
    Lora { w: Tensor, a: Var, b: Var },
    /// Every entry trained.
    Full(Var),
}

/// One matrix of a block (and its frozen bias, if any).
struct Lin {
    name: String,
    weight: Weight,
    bias: Option<Tensor>,
}

impl Lin {
    fn forward(&self, x: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            Weight::Lora { w, a, b } => {
                let x = x.contiguous()?;
                let y = x.apply_op1(FrozenMatmul(w.clone()))?;
                let low = (x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)? * scale)?;
                (y + low)?
            }
            Weight::Full(w) => x.matmul(&w.as_tensor().t()?)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The weight written out: `W + s·B·A`, or the trained matrix.
    fn merged(&self, scale: f64) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Lora { w, a, b } => w + (b.as_tensor().matmul(a.as_tensor())? * scale)?,
            Weight::Full(w) => Ok(w.as_tensor().clone()),
        }
    }

    fn named<'a>(&'a self, out: &mut Vec<(String, &'a Var)>) {
        match &self.weight {
            Weight::Lora { a, b, .. } => {
                out.push((format!("{}.lora_a", self.name), a));
                out.push((format!("{}.lora_b", self.name), b));
            }
            Weight::Full(w) => out.push((self.name.clone(), w)),
        }
    }
}

struct UpperBlock {
    index: usize,
    attn_norm: Var,
    ffn_norm: Var,
    /// q, k, v, output, gate, up, down.
    lins: Vec<Lin>,
}

/// Blocks of a model from `K` on (all of the rest, or one), the output norm (trainable) and
/// the frozen output head.
pub struct Upper {
    config: Config,
    blocks: Vec<UpperBlock>,
    out_norm: Var,
    head: Tensor,
    scale: f64,
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

impl Upper {
    /// Reads `count` blocks from `layer` on, the output norm and head of the GGUF at `path`
    /// (dequantized to f32). With `rank`, every matrix gets LoRA factors of that rank (`A`
    /// from N(0, 1/in) with the seed, `B = 0`); without, the matrices themselves are
    /// trained.
    pub fn load(
        path: &Path,
        layer: usize,
        count: usize,
        rank: Option<usize>,
        seed: u64,
    ) -> Result<Self> {
        let (config, tensors) = tandem_models::load_tensors(path)?;
        if config.rope_dim != config.head_dim {
            bail!(
                "{}: rotary embedding over {} of {} head dimensions is not supported by the \
                 target trainer",
                path.display(),
                config.rope_dim,
                config.head_dim
            );
        }
        let dev = &Device::Cpu;
        let get = |name: &str| -> Result<Tensor> {
            let t = tensors
                .get(name)
                .with_context(|| format!("{} has no tensor `{name}`", path.display()))?;
            Ok(t.dequantize(dev)?)
        };
        let mut rng = Rng::new(seed ^ 0x7a72_6765_7400);
        let mut blocks = Vec::new();
        if layer + count > config.n_layer {
            bail!(
                "{} has {} blocks: cannot take {count} from block {layer}",
                path.display(),
                config.n_layer
            );
        }
        for i in layer..layer + count {
            let mut lins = Vec::new();
            for m in BLOCK_MATRICES {
                let name = format!("blk.{i}.{m}.weight");
                let w = get(&name)?;
                let (out, inp) = w.dims2()?;
                let weight = match rank {
                    Some(rank) => {
                        let sd = 1.0 / (inp as f64).sqrt();
                        let a: Vec<f32> = (0..rank * inp)
                            .map(|_| (rng.normal() * sd) as f32)
                            .collect();
                        Weight::Lora {
                            w,
                            a: Var::from_tensor(&Tensor::from_vec(a, (rank, inp), dev)?)?,
                            b: Var::from_tensor(&Tensor::zeros((out, rank), DType::F32, dev)?)?,
                        }
                    }
                    None => Weight::Full(Var::from_tensor(&w)?),
                };
                let bias_name = format!("blk.{i}.{m}.bias");
                lins.push(Lin {
                    name,
                    weight,
                    bias: match tensors.get(&bias_name) {
                        Some(_) => Some(get(&bias_name)?),
                        None => None,
                    },
                });
            }
            blocks.push(UpperBlock {
                index: i,
                attn_norm: Var::from_tensor(&get(&format!("blk.{i}.attn_norm.weight"))?)?,
                ffn_norm: Var::from_tensor(&get(&format!("blk.{i}.ffn_norm.weight"))?)?,
                lins,
            });
        }
        let head = match tensors.contains_key("output.weight") {
            true => get("output.weight")?,
            false => get("token_embd.weight")?,
        };
        Ok(Upper {
            out_norm: Var::from_tensor(&get("output_norm.weight")?)?,
            head,
            blocks,
            scale: 1.0,
            config,
        })
    }

    /// The trainable parameters with their names, in a fixed order.
    pub fn named(&self) -> Vec<(String, &Var)> {
        let mut v: Vec<(String, &Var)> = Vec::new();
        for b in &self.blocks {
            v.push((format!("blk.{}.attn_norm", b.index), &b.attn_norm));
            v.push((format!("blk.{}.ffn_norm", b.index), &b.ffn_norm));
            for l in &b.lins {
                l.named(&mut v);
            }
        }
        v.push(("output_norm".into(), &self.out_norm));
        v
    }

    /// Zeroes every trained block's attention output and down projection, so each block
    /// adds nothing to the residual stream until trained (full-weight blocks only).
    pub(crate) fn zero_residual_outputs(&self) -> Result<()> {
        for b in &self.blocks {
            for l in [&b.lins[3], &b.lins[6]] {
                if let Weight::Full(w) = &l.weight {
                    w.set(&w.zeros_like()?)?;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn set_all(&self, values: Vec<Var>) -> Result<()> {
        let named = self.named();
        if values.len() != named.len() {
            bail!(
                "the checkpoint holds {} parameters, this run has {}",
                values.len(),
                named.len()
            );
        }
        for ((name, var), v) in named.into_iter().zip(values) {
            if var.shape() != v.shape() {
                bail!(
                    "checkpoint parameter `{name}` has shape {:?}, expected {:?}",
                    v.shape(),
                    var.shape()
                );
            }
            var.set(v.as_tensor())?;
        }
        Ok(())
    }

    /// Number of trained parameters.
    pub fn params(&self) -> usize {
        self.named().iter().map(|(_, v)| v.elem_count()).sum()
    }

    fn rope(&self, x: &Tensor, t: usize) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let half = c.head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / c.rope_base.powf((2 * i) as f32 / c.rope_dim as f32))
            .collect();
        let (mut cos, mut sin) = (Vec::with_capacity(t * half), Vec::with_capacity(t * half));
        for p in 0..t {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let dev = x.device();
        // [1, t, 1, half], broadcast over windows and heads.
        let cos = Tensor::from_vec(cos, (1, t, 1, half), dev)?;
        let sin = Tensor::from_vec(sin, (1, t, 1, half), dev)?;
        let (b, _, h, hd) = x.dims4()?;
        if c.arch == Architecture::Qwen2 {
            let (x0, x1) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
            let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
            let r1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
            Tensor::cat(&[r0, r1], 3)
        } else {
            let pairs = x.reshape((b, t, h, half, 2))?;
            let x0 = pairs.narrow(4, 0, 1)?.squeeze(4)?;
            let x1 = pairs.narrow(4, 1, 1)?.squeeze(4)?;
            let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
            let r1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
            Tensor::stack(&[r0, r1], 4)?.reshape((b, t, h, hd))
        }
    }

    /// The final-normed hidden states `[w·t, d]` of `w` windows of `t` positions entering
    /// block `K` (`x` is `[w·t, d]`, each window starting at position 0).
    pub fn forward(&self, x: &Tensor, w: usize, t: usize) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let eps = c.rms_eps as f64;
        let (h, hkv, hd) = (c.n_head, c.n_head_kv, c.head_dim);
        let g = h / hkv;
        let mask: Vec<f32> = (0..t * t)
            .map(|i| if i % t > i / t { -1e30 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), x.device())?;
        let s = self.scale;
        let mut x = x.clone();
        for b in &self.blocks {
            let n = rms_norm(&x, b.attn_norm.as_tensor(), eps)?;
            let q = b.lins[0].forward(&n, s)?.reshape((w, t, h, hd))?;
            let k = b.lins[1].forward(&n, s)?.reshape((w, t, hkv, hd))?;
            let v = b.lins[2].forward(&n, s)?.reshape((w, t, hkv, hd))?;
            let q = self.rope(&q, t)?.transpose(1, 2)?.contiguous()?;
            let k = self.rope(&k, t)?.transpose(1, 2)?;
            let v = v.transpose(1, 2)?;
            // Grouped-query attention: query head j reads key/value head j / g.
            let k = k
                .unsqueeze(2)?
                .broadcast_as((w, hkv, g, t, hd))?
                .reshape((w, h, t, hd))?;
            let v = v
                .unsqueeze(2)?
                .broadcast_as((w, hkv, g, t, hd))?
                .reshape((w, h, t, hd))?;
            let scores =
                (q.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?.broadcast_add(&mask)?;
            let m = scores.max_keepdim(D::Minus1)?.detach();
            let e = scores.broadcast_sub(&m)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let att = p.matmul(&v)?.transpose(1, 2)?.reshape((w * t, h * hd))?;
            x = (x + b.lins[3].forward(&att, s)?)?;
            let n = rms_norm(&x, b.ffn_norm.as_tensor(), eps)?;
            let gate = b.lins[4].forward(&n, s)?.silu()?;
            let up = b.lins[5].forward(&n, s)?;
            x = (x + b.lins[6].forward(&(gate * up)?, s)?)?;
        }
        rms_norm(&x, self.out_norm.as_tensor(), eps)
    }

    /// Logits `[rows, vocab]` of final-normed states through the frozen head.
    pub fn logits(&self, normed: &Tensor) -> candle_core::Result<Tensor> {
        normed.detach().matmul(&self.head.t()?)
    }

    /// The tensors that replace the source's in the written file: merged matrices (Q8_0),
    /// norms (f32).
    pub(crate) fn tensors(&self) -> Result<Vec<(String, QTensor)>> {
        let f32q = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32);
        let mut out = Vec::new();
        for b in &self.blocks {
            for l in &b.lins {
                out.push((
                    l.name.clone(),
                    QTensor::quantize(&l.merged(self.scale)?, GgmlDType::Q8_0)?,
                ));
            }
            out.push((
                format!("blk.{}.attn_norm.weight", b.index),
                f32q(b.attn_norm.as_tensor())?,
            ));
            out.push((
                format!("blk.{}.ffn_norm.weight", b.index),
                f32q(b.ffn_norm.as_tensor())?,
            ));
        }
        out.push((
            "output_norm.weight".into(),
            f32q(self.out_norm.as_tensor())?,
        ));
        Ok(out)
    }
}

/// What one row is scored against: ids and probabilities summing to one (the first id is the
/// one top-1 and top-5 count); `None` for a row that is not scored.
pub(crate) type RowTarget = Option<(Vec<u32>, Vec<f32>)>;

/// A scored row: its loss, whether its argmax is the target's first id, whether that id is
/// among its five best.
pub(crate) type RowScore = (f64, bool, bool);

/// Inputs of `seqs` (indices into `data`): the hidden states `[s·t, d]` and each row's
/// target.
fn inputs(data: &SeqData, seqs: &[u32]) -> Result<(Tensor, Vec<RowTarget>)> {
    let (t, d) = (data.seq_len, data.d);
    let mut x = Vec::with_capacity(seqs.len() * t * d);
    let mut targets = Vec::with_capacity(seqs.len() * t);
    for &i in seqs {
        let i = i as usize;
        x.extend_from_slice(&data.hidden[i * t * d..(i + 1) * t * d]);
        match &data.targets {
            Targets::Next(tokens) => {
                let tok = &tokens[i * t..(i + 1) * t];
                targets.extend((0..t).map(|p| tok.get(p + 1).map(|&y| (vec![y], vec![1.0]))));
            }
            Targets::Teacher { k, ids, probs } => {
                for p in i * t..(i + 1) * t {
                    let ps = &probs[p * k..(p + 1) * k];
                    let sum: f32 = ps.iter().sum();
                    targets.push(Some((
                        ids[p * k..(p + 1) * k].to_vec(),
                        ps.iter().map(|v| v / sum).collect(),
                    )));
                }
            }
        }
    }
    Ok((
        Tensor::from_vec(x, (seqs.len() * t, d), &Device::Cpu)?,
        targets,
    ))
}

/// Per scored row: the cross-entropy to its target, whether the argmax is the target's first
/// id and whether that id is among the five best; with `grad = Some(n)`, every row replaced
/// by `(softmax − p) / n` (zero for unscored rows).
pub(crate) fn score_rows(
    z: &mut [f32],
    vocab: usize,
    targets: &[RowTarget],
    grad: Option<usize>,
) -> Vec<RowScore> {
    z.par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .filter_map(|(row, target)| {
            let Some((ids, ps)) = target else {
                row.fill(0.0);
                return None;
            };
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
            let lse = max as f64 + sum.ln();
            let first = row[ids[0] as usize];
            let above = row.iter().filter(|&&v| v > first).count();
            let loss: f64 = ids
                .iter()
                .zip(ps)
                .map(|(&i, &p)| -(p as f64) * (row[i as usize] as f64 - lse))
                .sum();
            if let Some(n) = grad {
                let inv = 1.0 / n.max(1) as f64;
                for v in row.iter_mut() {
                    *v = ((*v as f64 - lse).exp() * inv) as f32;
                }
                for (&i, &p) in ids.iter().zip(ps) {
                    row[i as usize] -= (p as f64 * inv) as f32;
                }
            }
            Some((loss, above == 0, above < 5))
        })
        .collect()
}

/// Rows of logits computed at a time: a chunk of `rows × vocab` f32 stays under 16 MiB,
/// which glibc serves again from its heap instead of mapping and clearing fresh pages for
/// every step's logits (14% of the trainer's time when they were one buffer).
fn rows_per_chunk(vocab: usize) -> usize {
    ((16 << 20) / (4 * vocab.max(1))).max(1)
}

/// Scores the output-normed rows `normed` against `targets` through the frozen head, a
/// chunk of rows at a time; with `grad`, also the gradient of the mean loss over the scored
/// rows with respect to `normed`.
fn score(
    upper: &Upper,
    normed: &Tensor,
    targets: &[RowTarget],
    grad: bool,
) -> Result<(Vec<RowScore>, Option<Tensor>)> {
    let vocab = upper.head.dims()[0];
    let scored = targets.iter().filter(|t| t.is_some()).count();
    let chunk = rows_per_chunk(vocab);
    let (mut rows, mut dn) = (Vec::with_capacity(scored), Vec::new());
    for r0 in (0..targets.len()).step_by(chunk) {
        let n = chunk.min(targets.len() - r0);
        let mut z = upper
            .logits(&normed.narrow(0, r0, n)?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let part = &targets[r0..r0 + n];
        rows.extend(score_rows(&mut z, vocab, part, grad.then_some(scored)));
        if grad {
            dn.push(Tensor::from_vec(z, (n, vocab), &Device::Cpu)?.matmul(&upper.head)?);
        }
    }
    let dn = if grad {
        Some(Tensor::cat(&dn, 0)?)
    } else {
        None
    };
    Ok((rows, dn))
}

/// Loss, top-1 and top-5 of `upper` on every position of `data` that has a target.
pub fn evaluate(upper: &Upper, data: &SeqData) -> Result<Metrics> {
    let mut m = Metrics::default();
    let all: Vec<u32> = (0..data.sequences() as u32).collect();
    for idx in all.chunks(4) {
        let (x, targets) = inputs(data, idx)?;
        let normed = upper.forward(&x, idx.len(), data.seq_len)?;
        for (loss, t1, t5) in score(upper, &normed, &targets, false)?.0 {
            m.loss += loss;
            m.top1 += t1 as u8 as f64;
            m.top5 += t5 as u8 as f64;
            m.positions += 1;
        }
    }
    let n = m.positions.max(1) as f64;
    m.loss /= n;
    m.top1 /= n;
    m.top5 /= n;
    Ok(m)
}

/// The loss on `seqs` and its gradient with respect to the trained parameters.
fn loss_and_grads(
    upper: &Upper,
    data: &SeqData,
    seqs: &[u32],
) -> Result<(f64, candle_core::backprop::GradStore)> {
    let (x, targets) = inputs(data, seqs)?;
    let normed = upper.forward(&x, seqs.len(), data.seq_len)?;
    let (rows, dn) = score(upper, &normed, &targets, true)?;
    let loss = rows.iter().map(|r| r.0).sum::<f64>() / rows.len().max(1) as f64;
    let dn = dn.expect("asked for the gradient");
    // d/dθ of Σ normed ⊙ dn (dn held constant) is exactly the loss gradient.
    let surrogate = (normed * dn)?.sum_all()?;
    Ok((loss, surrogate.backward()?))
}

/// How [`fit`] runs.
pub struct Fit {
    /// Optimizer steps in all.
    pub steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Seed of the batch order.
    pub seed: u64,
    /// Steps between held-out evaluations and checkpoints.
    pub eval_every: usize,
    /// Stop after this many steps of this run (with a checkpoint).
    pub pause_after: Option<usize>,
    /// Continue from the checkpoint when it exists.
    pub resume: bool,
    /// The checkpoint file.
    pub checkpoint: PathBuf,
    /// The run's options as recorded beside the checkpoint.
    pub meta: String,
}

/// What [`fit`] did.
pub struct Fitted {
    /// Held-out evaluations.
    pub history: Vec<EvalPoint>,
    /// The held-out metrics at the end.
    pub last: Metrics,
    /// Steps done.
    pub step: usize,
    /// Step the run resumed from.
    pub resumed_from: Option<usize>,
    /// Seconds of optimisation.
    pub seconds: f64,
    /// Whether the run stopped before the last step.
    pub paused: bool,
}

/// Trains `upper` on `train` with Adam (warm-up, cosine decay), evaluating on `held` and
/// checkpointing every `eval_every` steps; `first` is the held-out metrics before training.
pub fn fit(
    upper: &Upper,
    train: &SeqData,
    held: &SeqData,
    f: &Fit,
    first: Metrics,
) -> Result<Fitted> {
    let names: Vec<String> = upper.named().into_iter().map(|(n, _)| n).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (mut adam, resumed_from) = if f.resume && f.checkpoint.exists() {
        let (vars, a) = head::load_checkpoint(&f.checkpoint, &name_refs, &f.meta)?;
        upper.set_all(vars)?;
        eprintln!("resuming from {} at step {}", f.checkpoint.display(), a.t);
        let t = a.t;
        (a, Some(t))
    } else {
        if f.resume {
            eprintln!(
                "no checkpoint at {}: starting from step 0",
                f.checkpoint.display()
            );
        }
        let vars: Vec<&Var> = upper.named().into_iter().map(|(_, v)| v).collect();
        (Adam::new(&vars)?, None)
    };
    let vars: Vec<&Var> = upper.named().into_iter().map(|(_, v)| v).collect();
    let save = |adam: &Adam| -> Result<()> {
        let named = upper.named();
        let refs: Vec<(&str, &Var)> = named.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        head::save_checkpoint(&f.checkpoint, &refs, adam, &f.meta)
    };
    let b = bar(f.steps as u64, "training");
    b.set_position(adam.t as u64);
    let mut history = Vec::new();
    let mut perm = None;
    let (mut sum, mut count) = (0.0, 0usize);
    let started = Instant::now();
    let mut last = first;
    let stop_at = f.pause_after.map_or(f.steps, |n| (adam.t + n).min(f.steps));
    while adam.t < stop_at {
        let step = adam.t;
        let idx = head::batch_indices(train.sequences(), f.batch, f.seed, step, &mut perm);
        let lr = head::lr_at(step, f.steps, f.lr);
        let (loss, grads) = loss_and_grads(upper, train, &idx)?;
        if !loss.is_finite() {
            bail!("the loss became {loss} at step {step}; try a smaller --lr");
        }
        adam.step(&vars, &grads, lr)?;
        sum += loss;
        count += 1;
        b.inc(1);
        b.set_message(format!(
            "loss {:.3} held-out {:.3} (before {:.3})",
            sum / count as f64,
            last.loss,
            first.loss
        ));
        if adam.t.is_multiple_of(f.eval_every) || adam.t == f.steps {
            last = evaluate(upper, held)?;
            let point = EvalPoint {
                step: adam.t,
                train_loss: sum / count as f64,
                heldout: last,
            };
            say(
                &b,
                format!(
                    "step {:>5}: train loss {:.3}, held-out loss {:.3}, top-1 {:.3}, top-5 {:.3}",
                    point.step, point.train_loss, last.loss, last.top1, last.top5
                ),
            );
            history.push(point);
            (sum, count) = (0.0, 0);
            save(&adam)?;
        }
    }
    b.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let paused = adam.t < f.steps;
    if paused {
        save(&adam)?;
    }
    if history.last().is_none_or(|p| p.step != adam.t) {
        last = evaluate(upper, held)?;
    }
    Ok(Fitted {
        history,
        last,
        step: adam.t,
        resumed_from,
        seconds,
        paused,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_score_their_targets_and_skip_unscored_ones() {
        let vocab = 4;
        let mut z = vec![0.0, 1.0, 2.0, 3.0, 3.0, 2.0, 1.0, 0.0, 5.0, 5.0, 5.0, 5.0];
        let targets = vec![
            Some((vec![3], vec![1.0])),
            Some((vec![1, 0], vec![0.5, 0.5])),
            None,
        ];
        let rows = score_rows(&mut z.clone(), vocab, &targets, None);
        assert_eq!(rows.len(), 2);
        assert!(rows[0].1 && rows[0].2);
        assert!(!rows[1].1 && rows[1].2);
        let lse = |r: &[f32]| r.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        assert!((rows[0].0 - (lse(&z[..4]) - 3.0)).abs() < 1e-9);
        let soft = lse(&z[4..8]) - 0.5 * (2.0 + 3.0);
        assert!((rows[1].0 - soft).abs() < 1e-9);
        let _ = score_rows(&mut z, vocab, &targets, Some(2));
        // Gradient rows sum to zero; the unscored row is zero.
        assert!(z[..4].iter().sum::<f32>().abs() < 1e-6);
        assert!(z[4..8].iter().sum::<f32>().abs() < 1e-6);
        assert!(z[8..].iter().all(|&v| v == 0.0));
    }
}
