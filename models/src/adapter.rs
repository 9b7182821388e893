//! Exit adapters: small trained heads that turn the hidden state at an intermediate block
//! into something the final norm and output head can read.
//!
//! An adapter is stored in the model's GGUF beside the model's own tensors; see
//! `docs/gguf-extensions.md`. When a requested exit layer has no adapter the exit is the
//! plain logit lens (hidden state → final norm → output head).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::quantized::QTensor;

use crate::kernels::{add_assign, rms_norm};
use crate::weights::{Linear, vector};
use crate::{Error, Result};

/// Transforms the hidden states of `n` positions at one exit layer, before the final norm.
///
/// New adapter forms implement this trait and are recognised in [`load_adapters`]; the
/// forward pass only ever calls `apply`.
pub trait ExitAdapter: Send + Sync {
    /// Returns the adapted hidden states (`n` rows of the model's hidden size).
    fn apply(&self, hidden: &[f32], n: usize) -> Result<Vec<f32>>;
    /// A short description (form and size), for logs and `tandem models info`.
    fn describe(&self) -> String;
}

/// Low-rank residual MLP: `h + up(silu(down(rmsnorm(h) * norm)))`.
///
/// Tensors: `exit.{k}.norm.weight` `[hidden]`, `exit.{k}.down.weight` `[rank, hidden]`,
/// `exit.{k}.up.weight` `[hidden, rank]`.
pub struct LowRankAdapter {
    norm: Vec<f32>,
    down: Linear,
    up: Linear,
    eps: f32,
}

impl ExitAdapter for LowRankAdapter {
    fn apply(&self, hidden: &[f32], n: usize) -> Result<Vec<f32>> {
        let mut x = vec![0f32; hidden.len()];
        rms_norm(hidden, &self.norm, self.eps, &mut x);
        let mut z = self.down.forward(&x, n)?;
        for v in z.iter_mut() {
            *v /= 1.0 + (-*v).exp();
        }
        let delta = self.up.forward(&z, n)?;
        let mut out = hidden.to_vec();
        add_assign(&mut out, &delta);
        Ok(out)
    }

    fn describe(&self) -> String {
        format!("low-rank residual MLP, rank {}", self.down.out_dim)
    }
}

/// Finds every `exit.{k}.*` adapter among a file's tensors.
pub(crate) fn load_adapters(
    tensors: &BTreeMap<String, Arc<QTensor>>,
    n_embd: usize,
    n_layer: usize,
    eps: f32,
) -> Result<BTreeMap<usize, Box<dyn ExitAdapter>>> {
    // Exit blocks (`exit.{k}.blk.*`) are the model's to load: they keep KV state.
    let blocks = crate::model::exit_block_layers(tensors.keys());
    let layers: std::collections::BTreeSet<usize> = tensors
        .keys()
        .filter_map(|name| name.strip_prefix("exit.")?.split('.').next()?.parse().ok())
        .filter(|k| !blocks.contains(k))
        .collect();
    let mut out: BTreeMap<usize, Box<dyn ExitAdapter>> = BTreeMap::new();
    for k in layers {
        let get = |suffix: &str| {
            let name = format!("exit.{k}.{suffix}");
            tensors.get(&name).cloned().ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "exit adapter at layer {k} is incomplete: tensor `{name}` is missing"
                ))
            })
        };
        if k == 0 || k > n_layer {
            return Err(Error::InvalidArgument(format!(
                "exit adapter at layer {k} but the model has layers 1..={n_layer}"
            )));
        }
        let norm = vector(&*get("norm.weight")?)?;
        let down = Linear::new(&format!("exit.{k}.down.weight"), get("down.weight")?)?;
        let up = Linear::new(&format!("exit.{k}.up.weight"), get("up.weight")?)?;
        if norm.len() != n_embd
            || down.in_dim != n_embd
            || up.out_dim != n_embd
            || up.in_dim != down.out_dim
        {
            return Err(Error::InvalidArgument(format!(
                "exit adapter at layer {k} has shapes that do not fit hidden size {n_embd}"
            )));
        }
        out.insert(
            k,
            Box::new(LowRankAdapter {
                norm,
                down,
                up,
                eps,
            }),
        );
    }
    Ok(out)
}
