//! The transformer: one definition for the `llama` and `qwen2` GGUF architectures.
//!
//! Pre-norm decoder blocks (Touvron et al. 2023, "LLaMA"; Qwen2 adds q/k/v biases and
//! rotates split halves): `h += Wo·Attn(RoPE(Wq·n(h)), RoPE(Wk·n(h)), Wv·n(h))`,
//! `h += Wdown·(silu(Wgate·n(h)) ⊙ Wup·n(h))`, logits `= Wout·n(h)`. Reference
//! implementation: llama.cpp's `llm_build_llama` / `llm_build_qwen2`.
//!
//! The model is immutable and shared (`&self`); the state of a sequence lives in a
//! [`KvCache`] passed to every forward.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};

use crate::adapter::{ExitAdapter, load_adapters};
use crate::config::{Architecture, Config};
use crate::gguf::{MappedTensor, map_tensors, open, read_tensors, read_tensors_except};
use crate::kernels::{AttnShape, KvView, RopeTable, add_assign, attention, rms_norm, swiglu};
use crate::weights::{Embedding, Linear, Source, vector};
use crate::{Error, Result};

struct Block {
    attn_norm: Vec<f32>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    wo: Linear,
    ffn_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// An exit whose head is a transformer block of its own (`exit.{k}.blk` tensors, see
/// `docs/gguf-extensions.md`): it runs on the hidden state after block `k` with attention
/// over the context, keeping keys and values in the sequence's KV cache after the model's
/// own layers, and is read through its own final norm.
struct ExitBlock {
    block: Block,
    output_norm: Vec<f32>,
}

/// A loaded model. `Send + Sync`: share it between sessions behind an `Arc`.
pub struct Model {
    config: Config,
    path: PathBuf,
    embedding: Embedding,
    blocks: Vec<Block>,
    output_norm: Vec<f32>,
    output: Linear,
    adapters: BTreeMap<usize, Box<dyn ExitAdapter>>,
    exit_blocks: BTreeMap<usize, ExitBlock>,
}

/// Logits of consecutive positions: `rows` rows of `vocab` values.
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    /// Vocabulary size (row length).
    pub vocab: usize,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl Logits {
    /// Number of positions.
    pub fn rows(&self) -> usize {
        self.data.len() / self.vocab.max(1)
    }
    /// The logits of position `i` (relative to the first position of the forward).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }
    /// The last row.
    pub fn last(&self) -> &[f32] {
        self.row(self.rows() - 1)
    }
}

/// An intermediate layer's output during a forward. Its logits are computed on demand,
/// all rows or one at a time (the output head is a large share of a step, so a caller that
/// can stop early, such as a hint that ends at the first disagreement, pays for less).
pub struct ExitLogits<'a> {
    /// Number of blocks computed before the exit (1..=n_layer); `n_layer` is the final output.
    pub layer: usize,
    /// Hidden states of the selected positions (after the exit adapter, if any).
    hidden: Vec<f32>,
    /// The final norm the output head reads them through (an exit block's own).
    norm: &'a [f32],
    model: &'a Model,
}

impl ExitLogits<'_> {
    /// Number of positions (as selected by [`Rows`]).
    pub fn rows(&self) -> usize {
        self.hidden.len() / self.model.config.n_embd
    }

    /// Hidden states of the selected positions, row-major (after the exit adapter, if
    /// any): what the final norm and output head read.
    pub fn hidden(&self) -> &[f32] {
        &self.hidden
    }

    /// Logits of every position.
    pub fn logits(&self) -> Result<Logits> {
        self.model.head_with(self.norm, &self.hidden)
    }

    /// Logits of position `i` alone: bitwise the same as row `i` of [`ExitLogits::logits`]
    /// (the kernels are batch-invariant).
    pub fn row_logits(&self, i: usize) -> Result<Vec<f32>> {
        let d = self.model.config.n_embd;
        if i >= self.rows() {
            return Err(Error::InvalidArgument(format!(
                "exit row {i} of {} rows",
                self.rows()
            )));
        }
        Ok(self
            .model
            .head_with(self.norm, &self.hidden[i * d..(i + 1) * d])?
            .data)
    }
}

/// Which positions of a forward produce logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// Every input position (verification blocks, tests).
    All,
    /// Only the last input position (prefill, plain decoding).
    Last,
    /// None: the forward only extends the KV cache (a prefill chunk before the last).
    None,
}

/// One sequence's part of a batched forward ([`Model::forward_batch`]): its input tokens at
/// positions `pos..` over its own cache, the rows it wants logits of, and its exits.
pub struct Step<'a> {
    /// Input tokens.
    pub tokens: &'a [u32],
    /// Position of the first; must not exceed `cache.len()` (a lower one rolls back).
    pub pos: usize,
    /// The sequence's KV cache.
    pub cache: &'a mut KvCache,
    /// Which positions produce logits.
    pub rows: Rows,
    /// Layers whose logits go to `on_exit` as soon as they are computed.
    pub exits: &'a [usize],
    /// Receives the exits' logits (on a thread of the compute pool).
    pub on_exit: &'a mut (dyn FnMut(ExitLogits) + Send),
}

/// How a [`KvCache`] stores keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvPrecision {
    /// 32-bit floats, as computed.
    #[default]
    F32,
    /// 16-bit floats: half the memory. Keys and values are rounded to f16 when stored, and
    /// every position reads them from the cache, so a position's logits still do not depend
    /// on how tokens are grouped into forwards (batch invariance holds bit for bit); they
    /// differ from an f32 cache's by the rounding (see `models/tests/invariance.rs`).
    F16,
}

/// Keys or values of every layer.
#[derive(Debug, Clone)]
enum KvLayers {
    F32(Vec<Vec<f32>>),
    F16(Vec<Vec<half::f16>>),
}

impl KvLayers {
    fn new(precision: KvPrecision, n_layer: usize) -> Self {
        match precision {
            KvPrecision::F32 => KvLayers::F32(vec![Vec::new(); n_layer]),
            KvPrecision::F16 => KvLayers::F16(vec![Vec::new(); n_layer]),
        }
    }

    fn layers(&self) -> usize {
        match self {
            KvLayers::F32(l) => l.len(),
            KvLayers::F16(l) => l.len(),
        }
    }

    fn truncate(&mut self, values: usize) {
        match self {
            KvLayers::F32(l) => l.iter_mut().for_each(|b| b.truncate(values)),
            KvLayers::F16(l) => l.iter_mut().for_each(|b| b.truncate(values)),
        }
    }

    fn size_bytes(&self) -> usize {
        match self {
            KvLayers::F32(l) => l.iter().map(|b| b.len() * 4).sum(),
            KvLayers::F16(l) => l.iter().map(|b| b.len() * 2).sum(),
        }
    }

    fn push(&mut self, layer: usize, x: &[f32]) {
        match self {
            KvLayers::F32(l) => l[layer].extend_from_slice(x),
            KvLayers::F16(l) => l[layer].extend(x.iter().map(|&v| half::f16::from_f32(v))),
        }
    }

    fn view(&self, layer: usize) -> KvView<'_> {
        match self {
            KvLayers::F32(l) => KvView::F32(&l[layer]),
            KvLayers::F16(l) => KvView::F16(&l[layer]),
        }
    }
}

/// Keys and values of every position seen so far, one buffer per layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    keys: KvLayers,
    values: KvLayers,
    kv_dim: usize,
    len: usize,
    precision: KvPrecision,
}

impl KvCache {
    /// An empty f32 cache for `n_layer` layers of `kv_dim` values per position.
    pub fn new(n_layer: usize, kv_dim: usize) -> Self {
        Self::with_precision(n_layer, kv_dim, KvPrecision::F32)
    }
    /// An empty cache storing keys and values at `precision`.
    pub fn with_precision(n_layer: usize, kv_dim: usize, precision: KvPrecision) -> Self {
        KvCache {
            keys: KvLayers::new(precision, n_layer),
            values: KvLayers::new(precision, n_layer),
            kv_dim,
            len: 0,
            precision,
        }
    }
    /// How keys and values are stored.
    pub fn precision(&self) -> KvPrecision {
        self.precision
    }
    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Drops every position at or after `len` (rolls back speculative tokens). A `len`
    /// beyond the current length changes nothing.
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        self.keys.truncate(len * self.kv_dim);
        self.values.truncate(len * self.kv_dim);
        self.len = len;
    }
    /// Bytes of key/value data held.
    pub fn size_bytes(&self) -> usize {
        self.keys.size_bytes() + self.values.size_bytes()
    }
}

impl Model {
    /// Loads a `llama` or `qwen2` GGUF, keeping quantized tensors quantized.
    ///
    /// The weight matrices are used where they lie in the file, mapped read-only (no copy;
    /// pages shared with the page cache); small tensors are read. Where the file cannot be
    /// mapped, everything is read.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        crate::compute_threads();
        let path = path.as_ref();
        let (content, mut reader) = open(path)?;
        let config = Config::from_gguf(&content, path)?;
        let mapped = map_tensors(&content, path, |name, dtype, dims| {
            dims.len() == 2 && dtype != GgmlDType::F16 && is_layer_matrix(name)
        })?
        .unwrap_or_default();
        let tensors = read_tensors_except(&content, &mut reader, path, &mapped)?;
        Self::from_parts(config, tensors, mapped, path)
    }

    fn from_parts(
        config: Config,
        tensors: BTreeMap<String, Arc<QTensor>>,
        mapped: BTreeMap<String, MappedTensor>,
        path: &Path,
    ) -> Result<Self> {
        let get = |name: &str| -> Result<Arc<QTensor>> {
            tensors
                .get(name)
                .cloned()
                .ok_or_else(|| Error::MissingOrMalformed {
                    path: path.to_owned(),
                    what: format!("tensor `{name}` is missing"),
                })
        };
        let source = |name: &str| -> Result<Source> {
            match mapped.get(name) {
                Some(m) => Ok(Source::Mapped(m.clone())),
                None => get(name).map(Source::Read),
            }
        };
        let check_len = |name: &str, v: &Vec<f32>, want: usize| -> Result<()> {
            if v.len() == want {
                Ok(())
            } else {
                Err(Error::MissingOrMalformed {
                    path: path.to_owned(),
                    what: format!("tensor `{name}` has {} values, expected {want}", v.len()),
                })
            }
        };
        let linear = |name: &str, out_dim: usize, in_dim: usize| -> Result<Linear> {
            let l = Linear::new(name, source(name)?)?;
            if l.out_dim != out_dim || l.in_dim != in_dim {
                return Err(Error::MissingOrMalformed {
                    path: path.to_owned(),
                    what: format!(
                        "tensor `{name}` is {}x{}, expected {out_dim}x{in_dim}",
                        l.out_dim, l.in_dim
                    ),
                });
            }
            Ok(l)
        };
        let c = &config;
        let embd = source("token_embd.weight")?;
        let embedding = Embedding::new(embd.clone())?;
        let output = match source("output.weight") {
            Ok(t) => Linear::new("output.weight", t)?,
            Err(_) => Linear::new("token_embd.weight", embd)?, // tied embeddings
        };
        if output.in_dim != c.n_embd || output.out_dim != c.vocab_size {
            return Err(Error::MissingOrMalformed {
                path: path.to_owned(),
                what: "output head does not match the hidden size and vocabulary".into(),
            });
        }
        let output_norm = vector(&*get("output_norm.weight")?)?;
        check_len("output_norm.weight", &output_norm, c.n_embd)?;
        let kv = c.kv_dim();
        let block = |p: &str| -> Result<Block> {
            let bias = |name: &str, want: usize| -> Result<Option<Vec<f32>>> {
                match tensors.get(&format!("{p}.{name}")) {
                    Some(t) => {
                        let v = vector(t)?;
                        check_len(name, &v, want)?;
                        Ok(Some(v))
                    }
                    None => Ok(None),
                }
            };
            let attn_norm = vector(&*get(&format!("{p}.attn_norm.weight"))?)?;
            check_len("attn_norm.weight", &attn_norm, c.n_embd)?;
            let ffn_norm = vector(&*get(&format!("{p}.ffn_norm.weight"))?)?;
            check_len("ffn_norm.weight", &ffn_norm, c.n_embd)?;
            Ok(Block {
                attn_norm,
                wq: linear(&format!("{p}.attn_q.weight"), c.n_embd, c.n_embd)?,
                wk: linear(&format!("{p}.attn_k.weight"), kv, c.n_embd)?,
                wv: linear(&format!("{p}.attn_v.weight"), kv, c.n_embd)?,
                bq: bias("attn_q.bias", c.n_embd)?,
                bk: bias("attn_k.bias", kv)?,
                bv: bias("attn_v.bias", kv)?,
                wo: linear(&format!("{p}.attn_output.weight"), c.n_embd, c.n_embd)?,
                ffn_norm,
                gate: linear(&format!("{p}.ffn_gate.weight"), c.n_ff, c.n_embd)?,
                up: linear(&format!("{p}.ffn_up.weight"), c.n_ff, c.n_embd)?,
                down: linear(&format!("{p}.ffn_down.weight"), c.n_embd, c.n_ff)?,
            })
        };
        let blocks = (0..c.n_layer)
            .map(|i| block(&format!("blk.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let mut exit_blocks = BTreeMap::new();
        for k in exit_block_layers(tensors.keys()) {
            if k == 0 || k >= c.n_layer {
                return Err(Error::MissingOrMalformed {
                    path: path.to_owned(),
                    what: format!(
                        "exit block at layer {k}: an exit block must follow one of blocks \
                         1..{} (below the last)",
                        c.n_layer
                    ),
                });
            }
            let p = format!("exit.{k}.blk");
            let name = format!("exit.{k}.output_norm.weight");
            let output_norm = vector(&*get(&name)?)?;
            check_len(&name, &output_norm, c.n_embd)?;
            exit_blocks.insert(
                k,
                ExitBlock {
                    block: block(&p)?,
                    output_norm,
                },
            );
        }
        let adapters = load_adapters(&tensors, c.n_embd, c.n_layer, c.rms_eps)?;
        Ok(Model {
            config,
            path: path.to_owned(),
            embedding,
            blocks,
            output_norm,
            output,
            adapters,
            exit_blocks,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The file the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Layers that carry a trained exit (an adapter or an exit block), with a description of
    /// each, in layer order.
    pub fn exit_adapters(&self) -> impl Iterator<Item = (usize, String)> + '_ {
        let blocks = self.exit_blocks.keys().map(|&k| {
            (
                k,
                "transformer block with its own KV cache (exit block)".to_string(),
            )
        });
        let mut all: Vec<(usize, String)> = self
            .adapters
            .iter()
            .map(|(k, a)| (*k, a.describe()))
            .chain(blocks)
            .collect();
        all.sort_by_key(|e| e.0);
        all.into_iter()
    }

    /// Removes the exit adapter or exit block at `layer`, if any, so that exit is the plain
    /// logit lens (training reads the raw hidden states there). Returns whether there was
    /// one. Caches made before an exit block is removed no longer fit the model.
    pub fn remove_exit_adapter(&mut self, layer: usize) -> bool {
        let adapter = self.adapters.remove(&layer).is_some();
        adapter | self.exit_blocks.remove(&layer).is_some()
    }

    /// The final norm's weight and the output head as an f32 matrix `[vocab, hidden]`
    /// (dequantized; for training heads against the frozen output layer).
    pub fn head_weights(&self) -> Result<(Vec<f32>, candle_core::Tensor)> {
        Ok((self.output_norm.clone(), self.output.dequantize()?))
    }

    /// The formats of the model's weight matrices: for each, how many matrices and how
    /// many bytes a forward reads (the output head included).
    pub fn matrix_formats(&self) -> Vec<(crate::quant::Format, usize, usize)> {
        let mut by: Vec<(crate::quant::Format, usize, usize)> = Vec::new();
        let layers = self
            .blocks
            .iter()
            .flat_map(|b| [&b.wq, &b.wk, &b.wv, &b.wo, &b.gate, &b.up, &b.down]);
        for l in layers.chain([&self.output]) {
            match by.iter_mut().find(|e| e.0 == l.format()) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += l.weight_bytes();
                }
                None => by.push((l.format(), 1, l.weight_bytes())),
            }
        }
        by
    }

    /// An empty KV cache sized for this model (f32).
    pub fn new_cache(&self) -> KvCache {
        self.new_cache_with(KvPrecision::F32)
    }

    /// An empty KV cache sized for this model, storing keys and values at `precision`.
    /// Exit blocks keep their keys and values in layers after the model's own.
    pub fn new_cache_with(&self, precision: KvPrecision) -> KvCache {
        KvCache::with_precision(self.cache_layers(), self.config.kv_dim(), precision)
    }

    /// Layers of a KV cache for this model: its blocks, then one per exit block.
    pub fn cache_layers(&self) -> usize {
        self.config.n_layer + self.exit_blocks.len()
    }

    /// Runs `tokens` at positions `pos..` and returns the logits of every input position.
    ///
    /// `pos` must not exceed `cache.len()`; a lower `pos` first rolls the cache back.
    pub fn forward(&self, tokens: &[u32], pos: usize, cache: &mut KvCache) -> Result<Logits> {
        self.forward_with_exits(tokens, pos, cache, Rows::All, &[], &mut |_| {})
    }

    /// Like [`Model::forward`] but returns only the last position's logits (prefill).
    pub fn forward_last(&self, tokens: &[u32], pos: usize, cache: &mut KvCache) -> Result<Logits> {
        self.forward_with_exits(tokens, pos, cache, Rows::Last, &[], &mut |_| {})
    }

    /// The general forward: `exits` lists layers (1..=n_layer, counted in blocks computed)
    /// whose logits are handed to `on_exit` as soon as that layer is done, before the
    /// remaining blocks run. An exit uses the layer's adapter when the file has one and is
    /// the plain logit lens otherwise. `on_exit` runs on a thread of the compute pool.
    pub fn forward_with_exits(
        &self,
        tokens: &[u32],
        pos: usize,
        cache: &mut KvCache,
        rows: Rows,
        exits: &[usize],
        on_exit: &mut (dyn FnMut(ExitLogits) + Send),
    ) -> Result<Logits> {
        let mut step = [Step {
            tokens,
            pos,
            cache,
            rows,
            exits,
            on_exit,
        }];
        self.forward_batch(&mut step).remove(0)
    }

    /// One forward over several sequences at once, each with its own KV cache, positions,
    /// rows and exits: every weight is read once for all of their rows. A sequence's
    /// logits (and exits) are bitwise the same as from its own [`Model::forward_with_exits`]
    /// (the kernels are batch-invariant; attention, RoPE and the caches stay per
    /// sequence). Returns one result per step, in order; a step that is invalid gets its
    /// error and the others still run.
    pub fn forward_batch(&self, steps: &mut [Step<'_>]) -> Vec<Result<Logits>> {
        let mut results: Vec<Option<Result<Logits>>> = Vec::with_capacity(steps.len());
        let mut valid: Vec<&mut Step> = Vec::with_capacity(steps.len());
        for s in steps.iter_mut() {
            match self.check_step(s) {
                Ok(()) => {
                    s.cache.truncate(s.pos);
                    results.push(None);
                    valid.push(s);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        if valid.is_empty() {
            return results.into_iter().map(Option::unwrap).collect();
        }
        // The forward holds the compute team: its helpers spin between the parallel
        // regions (about 150 per SmolLM2 token) instead of sleeping and being woken.
        #[cfg(not(target_arch = "wasm32"))]
        let out = crate::team::forward(|| self.run_blocks(&mut valid));
        #[cfg(target_arch = "wasm32")]
        let out = self.run_blocks(&mut valid);
        let mut out = match out {
            Ok(logits) => {
                for s in valid.iter_mut() {
                    s.cache.len = s.pos + s.tokens.len();
                }
                logits.into_iter().map(Ok).collect::<Vec<_>>()
            }
            Err(e) => {
                // Leave every cache as it was before the failed forward.
                let message = e.to_string();
                let mut first = Some(e);
                valid
                    .iter_mut()
                    .map(|s| {
                        s.cache.truncate(s.pos);
                        Err(first.take().unwrap_or_else(|| {
                            Error::InvalidArgument(format!("batched forward failed: {message}"))
                        }))
                    })
                    .collect()
            }
        }
        .into_iter();
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| out.next().expect("one result per valid step")))
            .collect()
    }

    fn check_step(&self, s: &Step) -> Result<()> {
        let c = &self.config;
        let n = s.tokens.len();
        if n == 0 {
            return Err(Error::InvalidArgument(
                "forward needs at least one token".into(),
            ));
        }
        if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::TokenOutOfRange {
                token: bad,
                vocab: c.vocab_size,
            });
        }
        if s.pos > s.cache.len() {
            return Err(Error::PositionGap {
                pos: s.pos,
                cached: s.cache.len(),
            });
        }
        if s.pos + n > c.context_length {
            return Err(Error::ContextExceeded {
                pos: s.pos,
                n,
                end: s.pos + n,
                context: c.context_length,
            });
        }
        if let Some(&bad) = s.exits.iter().find(|&&k| k == 0 || k > c.n_layer) {
            return Err(Error::InvalidArgument(format!(
                "exit layer {bad} is out of range: this model has layers 1..={}",
                c.n_layer
            )));
        }
        if s.cache.keys.layers() != self.cache_layers() || s.cache.kv_dim != c.kv_dim() {
            return Err(Error::InvalidArgument(
                "this KV cache was made for a different model".into(),
            ));
        }
        Ok(())
    }

    /// The blocks over the rows of every step: products over all rows together; RoPE,
    /// the caches and attention per step.
    fn run_blocks(&self, steps: &mut [&mut Step]) -> Result<Vec<Logits>> {
        let c = &self.config;
        let d = c.n_embd;
        let total: usize = steps.iter().map(|s| s.tokens.len()).sum();
        let mut spans = Vec::with_capacity(steps.len());
        let mut h = Vec::with_capacity(total * d);
        for s in steps.iter() {
            let start = h.len() / d;
            for &t in s.tokens {
                self.embedding.lookup(t, &mut h)?;
            }
            spans.push(start..start + s.tokens.len());
        }
        let shape = AttnShape {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
        };
        let neox = c.arch == Architecture::Qwen2;
        let ropes: Vec<RopeTable> = steps
            .iter()
            .map(|s| RopeTable::new(s.pos, s.tokens.len(), c.rope_dim, c.rope_base))
            .collect();
        let mut x = vec![0f32; total * d];
        let run = Run {
            spans: &spans,
            ropes: &ropes,
            shape: &shape,
            neox,
            total,
        };
        for (i, b) in self.blocks.iter().enumerate() {
            self.run_block(b, i, &mut h, &mut x, steps, &run)?;
            let layer = i + 1;
            // An exit block's keys and values are added at every forward, so that its part
            // of the cache always covers the same positions as the rest; the whole block
            // runs only when a step asks for the exit.
            let exit_block = self
                .exit_blocks
                .iter()
                .enumerate()
                .find(|(_, (k, _))| **k == layer);
            let asked = steps.iter().any(|s| s.exits.contains(&layer));
            let exit_h = match exit_block {
                Some((j, (_, e))) if asked => {
                    let mut he = h.clone();
                    self.run_block(&e.block, c.n_layer + j, &mut he, &mut x, steps, &run)?;
                    Some((he, e.output_norm.as_slice()))
                }
                Some((j, (_, e))) => {
                    self.push_kv(&e.block, c.n_layer + j, &h, &mut x, steps, &run)?;
                    None
                }
                None => None,
            };
            for (s, r) in steps.iter_mut().zip(&spans) {
                if s.exits.contains(&layer) {
                    let (hidden, norm) = match &exit_h {
                        Some((he, norm)) => (
                            select_rows(&he[r.start * d..r.end * d], d, s.rows).to_vec(),
                            *norm,
                        ),
                        None => {
                            let rows = select_rows(&h[r.start * d..r.end * d], d, s.rows);
                            (self.adapted(layer, rows)?, self.output_norm.as_slice())
                        }
                    };
                    (s.on_exit)(ExitLogits {
                        layer,
                        hidden,
                        norm,
                        model: self,
                    });
                }
            }
        }
        // One output head over the selected rows of every step. A drafter split at a
        // trained exit carries that exit's adapter at its last block.
        let mut selected = Vec::new();
        for (s, r) in steps.iter().zip(&spans) {
            selected.extend_from_slice(select_rows(&h[r.start * d..r.end * d], d, s.rows));
        }
        let vocab = c.vocab_size;
        let all = if selected.is_empty() {
            Vec::new()
        } else {
            self.head(&self.adapted(c.n_layer, &selected)?)?.data
        };
        let mut rest = all.as_slice();
        Ok(steps
            .iter()
            .map(|s| {
                let rows = select_rows(&h[..s.tokens.len() * d], d, s.rows).len() / d;
                let (mine, tail) = rest.split_at(rows * vocab);
                rest = tail;
                Logits {
                    vocab,
                    data: mine.to_vec(),
                }
            })
            .collect())
    }

    /// Only the keys and values `block` would add to cache layer `slot` for the rows `h`
    /// (bitwise those [`Model::run_block`] adds; `x` is scratch).
    fn push_kv(
        &self,
        b: &Block,
        slot: usize,
        h: &[f32],
        x: &mut [f32],
        steps: &mut [&mut Step],
        run: &Run,
    ) -> Result<()> {
        let c = &self.config;
        let kvd = c.kv_dim();
        rms_norm(h, &b.attn_norm, c.rms_eps, x);
        let [mut k, mut v] = Linear::forward_many([&b.wk, &b.wv], x, run.total)?;
        add_bias(&mut k, b.bk.as_deref());
        add_bias(&mut v, b.bv.as_deref());
        for ((s, r), rope) in steps.iter_mut().zip(run.spans).zip(run.ropes) {
            let ks = &mut k[r.start * kvd..r.end * kvd];
            rope.apply(ks, c.n_head_kv, c.head_dim, run.neox);
            s.cache.keys.push(slot, ks);
            s.cache.values.push(slot, &v[r.start * kvd..r.end * kvd]);
        }
        Ok(())
    }

    /// One block over the rows of every step, in place on `h` (`x` is scratch), its keys
    /// and values in cache layer `slot`.
    fn run_block(
        &self,
        b: &Block,
        slot: usize,
        h: &mut [f32],
        x: &mut [f32],
        steps: &mut [&mut Step],
        run: &Run,
    ) -> Result<()> {
        let c = &self.config;
        let (qd, kvd) = (c.n_head * c.head_dim, c.kv_dim());
        let total = run.total;
        rms_norm(h, &b.attn_norm, c.rms_eps, x);
        let [mut q, mut k, mut v] = Linear::forward_many([&b.wq, &b.wk, &b.wv], x, total)?;
        add_bias(&mut q, b.bq.as_deref());
        add_bias(&mut k, b.bk.as_deref());
        add_bias(&mut v, b.bv.as_deref());
        let mut att = vec![0f32; total * qd];
        for ((s, r), rope) in steps.iter_mut().zip(run.spans).zip(run.ropes) {
            let (qs, ks) = (
                &mut q[r.start * qd..r.end * qd],
                &mut k[r.start * kvd..r.end * kvd],
            );
            rope.apply(qs, c.n_head, c.head_dim, run.neox);
            rope.apply(ks, c.n_head_kv, c.head_dim, run.neox);
            s.cache.keys.push(slot, ks);
            s.cache.values.push(slot, &v[r.start * kvd..r.end * kvd]);
            let (keys, values) = (s.cache.keys.view(slot), s.cache.values.view(slot));
            attention(
                qs,
                keys,
                values,
                s.pos,
                run.shape,
                &mut att[r.start * qd..r.end * qd],
            );
        }
        add_assign(h, &b.wo.forward(&att, total)?);

        rms_norm(h, &b.ffn_norm, c.rms_eps, x);
        let [mut g, u] = Linear::forward_many([&b.gate, &b.up], x, total)?;
        swiglu(&mut g, &u);
        add_assign(h, &b.down.forward(&g, total)?);
        Ok(())
    }

    /// Hidden states after block `layer` as the output head should read them: through the
    /// layer's exit adapter when the file has one.
    fn adapted(&self, layer: usize, hidden: &[f32]) -> Result<Vec<f32>> {
        match self.adapters.get(&layer) {
            Some(a) => a.apply(hidden, hidden.len() / self.config.n_embd),
            None => Ok(hidden.to_vec()),
        }
    }

    /// Final norm and output head over rows of hidden states.
    fn head(&self, hidden: &[f32]) -> Result<Logits> {
        self.head_with(&self.output_norm, hidden)
    }

    /// The output head over rows of hidden states read through the final norm `norm`.
    fn head_with(&self, norm: &[f32], hidden: &[f32]) -> Result<Logits> {
        let n = hidden.len() / self.config.n_embd;
        let mut x = vec![0f32; hidden.len()];
        rms_norm(hidden, norm, self.config.rms_eps, &mut x);
        Ok(Logits {
            vocab: self.config.vocab_size,
            data: self.output.forward(&x, n)?,
        })
    }
}

/// Reads a `llama` or `qwen2` GGUF's hyper-parameters and every tensor, quantized tensors
/// kept in their block format (for other engines of the same model, such as the GPU one).
pub fn load_tensors(path: &Path) -> Result<(Config, BTreeMap<String, Arc<QTensor>>)> {
    let (content, mut reader) = open(path)?;
    let config = Config::from_gguf(&content, path)?;
    let tensors = read_tensors(&content, &mut reader, path)?;
    Ok((config, tensors))
}

/// The seven weight matrices of a block, as GGUF names them (`blk.{i}.{name}.weight`).
pub const BLOCK_MATRICES: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// Whether a tensor is one of the weight matrices a forward streams through (mapped rather
/// than read at load).
fn is_layer_matrix(name: &str) -> bool {
    match name.strip_prefix("blk.") {
        Some(rest) => rest
            .split_once('.')
            .and_then(|(_, t)| t.strip_suffix(".weight"))
            .is_some_and(|t| BLOCK_MATRICES.contains(&t)),
        None => name == "token_embd.weight" || name == "output.weight",
    }
}

/// What every block of one forward shares: each step's rows and RoPE table, the attention
/// shape and the rotation style.
struct Run<'a> {
    spans: &'a [std::ops::Range<usize>],
    ropes: &'a [RopeTable],
    shape: &'a AttnShape,
    neox: bool,
    total: usize,
}

/// Layers with an exit block among tensor names (`exit.{k}.blk.attn_q.weight`).
pub(crate) fn exit_block_layers<'a>(
    names: impl Iterator<Item = &'a String>,
) -> std::collections::BTreeSet<usize> {
    names
        .filter_map(|n| {
            let rest = n
                .strip_prefix("exit.")?
                .strip_suffix(".blk.attn_q.weight")?;
            rest.parse().ok()
        })
        .collect()
}

fn select_rows(h: &[f32], d: usize, rows: Rows) -> &[f32] {
    match rows {
        Rows::All => h,
        Rows::Last => &h[h.len() - d..],
        Rows::None => &h[..0],
    }
}

fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            add_assign(row, b);
        }
    }
}

// A model is shared between sessions: keep it `Send + Sync`.
const _: () = {
    const fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Model>();
};
