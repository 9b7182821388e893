//! `tandem train target`: a new version of a target on the same frozen backbone.
//!
//! The embedding, the blocks below `K` and the tokenizer are never touched, so the written
//! model has the same tokenizer fingerprint and the same backbone fingerprint at `K` as the
//! model it came from: a shared-backbone drafter split at `K` (or below) fits both versions.
//! Blocks `K..n` are fine-tuned with LoRA (Hu et al. 2021) on all seven matrices of each
//! block, plus their two norms and the output norm in full; the output head stays frozen.
//! The LoRA products are merged into the written weights (Q8_0; the norms in f32).
//!
//! The loss is the next token's cross-entropy on the new corpus. The backbone being frozen,
//! its hidden state at `K` is computed once by the engine and cached; training runs only the
//! upper blocks, in candle, in f32 from the dequantized weights (with zero LoRA products it
//! is the engine's forward of those blocks; a test compares them).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file::Value;
use serde::Serialize;
use tandem_models::backbone::{Fingerprints, fingerprints, write_model};
use tandem_models::{Model, Rows, Tokenizer};

use crate::EvalPoint;
use crate::corpus::{self, CorpusFile, Split};
use crate::data::{Sequences, build_sequences};
use crate::head::Metrics;
use crate::upper::{Fit, SeqData, Targets, Upper, evaluate, fit};

/// Options of `tandem train target`.
#[derive(Debug, Clone)]
pub struct Options {
    /// The model (v1) to start from.
    pub model: PathBuf,
    /// First block trained; blocks below it, the embedding and the tokenizer stay as they are.
    pub layer: usize,
    /// The new domain: files or directories. Empty means the Rust sources of the cargo
    /// registry's source cache.
    pub corpus: Vec<PathBuf>,
    /// The old domain, only measured (held-out files of it). Empty means the Python
    /// standard library (the default corpus of the other trainers), when python3 is there.
    pub old_corpus: Vec<PathBuf>,
    /// The GGUF to write (v2).
    pub out: PathBuf,
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate (Adam).
    pub lr: f64,
    /// Seed of the LoRA initialisation and the batch order.
    pub seed: u64,
    /// Continue from `OUT.ckpt` when it exists.
    pub resume: bool,
    /// LoRA rank.
    pub rank: usize,
    /// Windows per step.
    pub batch: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Training tokens.
    pub train_tokens: usize,
    /// Held-out tokens (of each domain).
    pub heldout_tokens: usize,
    /// Steps between held-out evaluations and checkpoints.
    pub eval_every: usize,
    /// Stop after this many steps of this run, with a checkpoint, writing no output.
    pub pause_after: Option<usize>,
}

impl Options {
    /// Defaults for a model and first trained block, writing to `out`.
    pub fn new(model: PathBuf, layer: usize, out: PathBuf) -> Self {
        Options {
            model,
            layer,
            corpus: Vec::new(),
            old_corpus: Vec::new(),
            out,
            steps: 300,
            lr: 5e-4,
            seed: 0,
            resume: false,
            rank: 16,
            batch: 8,
            seq_len: 128,
            train_tokens: 65_536,
            heldout_tokens: 8192,
            eval_every: 50,
            pause_after: None,
        }
    }

    /// The checkpoint file beside the output.
    pub fn checkpoint_path(&self) -> PathBuf {
        let mut p = self.out.clone().into_os_string();
        p.push(".ckpt");
        PathBuf::from(p)
    }
}

/// What a run did and measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The model trained from (v1).
    pub model: PathBuf,
    /// First block trained.
    pub layer: usize,
    /// Blocks of the model.
    pub n_layer: usize,
    /// LoRA rank.
    pub rank: usize,
    /// Trained parameters (LoRA factors and norms).
    pub params: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Windows per step.
    pub batch: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Seed.
    pub seed: u64,
    /// Training positions.
    pub train_positions: usize,
    /// Files they came from.
    pub train_files: usize,
    /// Held-out positions of the new domain.
    pub heldout_positions: usize,
    /// Files they came from.
    pub heldout_files: usize,
    /// Held-out positions of the old domain (0 when it was not measured).
    pub old_positions: usize,
    /// Seconds spent building (or loading) the cached hidden states.
    pub data_seconds: f64,
    /// Whether all of them came from the cache.
    pub data_cached: bool,
    /// Seconds of optimisation in this run.
    pub train_seconds: f64,
    /// Step the run resumed from, if it did.
    pub resumed_from: Option<usize>,
    /// v1 on held-out new-domain text.
    pub v1_new: Metrics,
    /// v1 on held-out old-domain text.
    pub v1_old: Option<Metrics>,
    /// The trained model on held-out new-domain text.
    pub v2_new: Metrics,
    /// The trained model on held-out old-domain text.
    pub v2_old: Option<Metrics>,
    /// Held-out evaluations during training.
    pub history: Vec<EvalPoint>,
    /// The file written (`None` when the run paused).
    pub out: Option<PathBuf>,
    /// Steps done when the run ended.
    pub step: usize,
    /// Whether the written file's tokenizer fingerprint and backbone fingerprint at `layer`
    /// equal the source's (checked by reloading it; `None` when nothing was written).
    pub fingerprints_equal: Option<bool>,
    /// The backbone fingerprint at `layer` (hex).
    pub backbone: String,
}

/// Runs the model over full windows of `files` and keeps the hidden states entering block
/// `layer` with the next token at each position (cached on disk).
fn build(
    model: &Model,
    tokenizer: &Tokenizer,
    opts: &Options,
    files: &[CorpusFile],
    budget: usize,
    what: &str,
) -> Result<(SeqData, usize, bool)> {
    let src = Sequences {
        model_path: &opts.model,
        model,
        tokenizer,
        layer: opts.layer,
        seq_len: opts.seq_len,
        generate: 0,
        top_k: 0,
        tag: "target",
    };
    let about = format!("hidden states entering block {}", opts.layer);
    build_sequences(&src, files, budget, what, &about, |tokens, out| {
        let mut cache = model.new_cache();
        model.forward_with_exits(tokens, 0, &mut cache, Rows::All, &[opts.layer], &mut |e| {
            out.hidden.extend_from_slice(e.hidden());
        })?;
        if let Targets::Next(next) = &mut out.targets {
            next.extend_from_slice(tokens);
        }
        Ok(())
    })
}

/// Trains a new version of the target as `opts` says and writes it; returns the report.
pub fn train(opts: &Options) -> Result<Report> {
    if opts.steps == 0 || opts.batch == 0 || opts.rank == 0 {
        bail!("--steps, --batch and --rank must be at least 1");
    }
    if !(opts.lr > 0.0 && opts.lr.is_finite()) {
        bail!("--lr must be a positive number, got {}", opts.lr);
    }
    if opts.seq_len < 16 {
        bail!("--seq-len must be at least 16 tokens");
    }
    let mut model =
        Model::load(&opts.model).with_context(|| format!("loading {}", opts.model.display()))?;
    let n_layer = model.config().n_layer;
    if opts.layer == 0 || opts.layer >= n_layer {
        bail!(
            "--layer {} is outside 1..{n_layer} for {} ({n_layer} blocks): blocks from --layer \
             on are trained, the ones below it stay as the shared backbone",
            opts.layer,
            opts.model.display()
        );
    }
    if opts.seq_len > model.config().context_length {
        bail!(
            "--seq-len {} is longer than the model's context ({})",
            opts.seq_len,
            model.config().context_length
        );
    }
    let adapters: Vec<usize> = model.exit_adapters().map(|(k, _)| k).collect();
    if !adapters.is_empty() {
        eprintln!(
            "{} carries exit adapters at {adapters:?}: they are copied into the new version \
             as they are, but the output norm they read through is retrained (and blocks \
             before those at or above {} change); retrain them on the new version",
            opts.model.display(),
            opts.layer
        );
    }
    // The hidden states entering block K are the raw ones, not an exit adapter's.
    model.remove_exit_adapter(opts.layer);
    let tokenizer = Tokenizer::from_gguf(&opts.model)?;
    let new = if opts.corpus.is_empty() {
        let dir = corpus::rust_sources()?;
        eprintln!(
            "new domain: the Rust sources of the cargo registry at {}",
            dir.display()
        );
        corpus::collect_with(&[dir], Split::Content, Some(&["rs"]))?
    } else {
        corpus::collect_with(&opts.corpus, Split::Content, None)?
    };
    eprintln!(
        "new domain: {} training and {} held-out files (held out: sha256 of the file's bytes, \
         first byte divisible by 10; identical files kept once)",
        new.train.len(),
        new.heldout.len()
    );
    let old = if opts.old_corpus.is_empty() {
        match corpus::python_stdlib() {
            Ok(lib) => Some(corpus::collect(&[lib])?),
            Err(e) => {
                eprintln!("old domain not measured: {e:#}");
                None
            }
        }
    } else {
        Some(corpus::collect(&opts.old_corpus)?)
    };
    let t0 = Instant::now();
    let (train_data, train_files, c1) = build(
        &model,
        &tokenizer,
        opts,
        &new.train,
        opts.train_tokens,
        "train",
    )?;
    let (held, heldout_files, c2) = build(
        &model,
        &tokenizer,
        opts,
        &new.heldout,
        opts.heldout_tokens,
        "held-out",
    )?;
    let old_held = match &old {
        Some(c) => Some(build(
            &model,
            &tokenizer,
            opts,
            &c.heldout,
            opts.heldout_tokens,
            "old-domain",
        )?),
        None => None,
    };
    let data_seconds = t0.elapsed().as_secs_f64();
    let data_cached = c1 && c2 && old_held.as_ref().is_none_or(|o| o.2);
    let old_held = old_held.map(|o| o.0);
    drop(model);

    let upper = Upper::load(
        &opts.model,
        opts.layer,
        n_layer - opts.layer,
        Some(opts.rank),
        opts.seed,
    )?;
    let meta = serde_json::json!({
        "model": std::fs::canonicalize(&opts.model).unwrap_or_else(|_| opts.model.clone()),
        "kind": "target", "layer": opts.layer, "rank": opts.rank, "steps": opts.steps,
        "lr": opts.lr, "seed": opts.seed, "batch": opts.batch, "seq_len": opts.seq_len,
        "train_tokens": opts.train_tokens, "train_windows": train_data.sequences(),
    })
    .to_string();
    let v1_new = evaluate(&upper, &held)?;
    let v1_old = old_held.as_ref().map(|o| evaluate(&upper, o)).transpose()?;
    eprintln!(
        "blocks {}..{n_layer} (LoRA rank {}, {} parameters): {} training / {} held-out \
         windows of {}; v1 on held-out new domain: loss {:.3}, top-1 {:.3}{}",
        opts.layer,
        opts.rank,
        upper.params(),
        train_data.sequences(),
        held.sequences(),
        opts.seq_len,
        v1_new.loss,
        v1_new.top1,
        v1_old.map_or(String::new(), |m| format!(
            "; old domain: loss {:.3}, top-1 {:.3}",
            m.loss, m.top1
        ))
    );
    let fitted = fit(
        &upper,
        &train_data,
        &held,
        &Fit {
            steps: opts.steps,
            batch: opts.batch,
            lr: opts.lr,
            seed: opts.seed,
            eval_every: opts.eval_every,
            pause_after: opts.pause_after,
            resume: opts.resume,
            checkpoint: opts.checkpoint_path(),
            meta,
        },
        v1_new,
    )?;
    let v2_new = fitted.last;
    let v2_old = old_held.as_ref().map(|o| evaluate(&upper, o)).transpose()?;
    let before = fingerprints(&opts.model, Some(opts.layer))?;
    let (out, fingerprints_equal) = if fitted.paused {
        (None, None)
    } else {
        let equal = write(opts, &upper, &v1_new, &v2_new)? == before;
        (Some(opts.out.clone()), Some(equal))
    };
    Ok(Report {
        model: opts.model.clone(),
        layer: opts.layer,
        n_layer,
        rank: opts.rank,
        params: upper.params(),
        steps: opts.steps,
        batch: opts.batch,
        seq_len: opts.seq_len,
        lr: opts.lr,
        seed: opts.seed,
        train_positions: train_data.positions(),
        train_files,
        heldout_positions: v2_new.positions,
        heldout_files,
        old_positions: v2_old.map_or(0, |m| m.positions),
        data_seconds,
        data_cached,
        train_seconds: fitted.seconds,
        resumed_from: fitted.resumed_from,
        v1_new,
        v1_old,
        v2_new,
        v2_old,
        history: fitted.history,
        out,
        step: fitted.step,
        fingerprints_equal,
        backbone: before.backbone.to_string(),
    })
}

/// Writes v2 (the source with the trained tensors replaced), reloads it and returns its
/// fingerprints at `opts.layer`.
fn write(opts: &Options, upper: &Upper, v1: &Metrics, v2: &Metrics) -> Result<Fingerprints> {
    let base = opts
        .model
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let metadata = vec![
        ("tandem.target.base".into(), Value::String(base)),
        (
            "tandem.target.trained_from_block".into(),
            Value::U32(opts.layer as u32),
        ),
        (
            "tandem.target.lora_rank".into(),
            Value::U32(opts.rank as u32),
        ),
        ("tandem.target.steps".into(), Value::U32(opts.steps as u32)),
        (
            "tandem.target.v1_heldout_loss".into(),
            Value::F32(v1.loss as f32),
        ),
        (
            "tandem.target.heldout_loss".into(),
            Value::F32(v2.loss as f32),
        ),
    ];
    write_model(&opts.model, &opts.out, None, upper.tensors()?, metadata)?;
    Model::load(&opts.out)
        .with_context(|| format!("the written file {} does not load", opts.out.display()))?;
    Ok(fingerprints(&opts.out, Some(opts.layer))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_round_trips_and_cut_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.bin");
        let next = SeqData {
            d: 2,
            seq_len: 3,
            hidden: (0..12).map(|i| i as f32).collect(),
            targets: Targets::Next(vec![1, 2, 3, 4, 5, 6]),
        };
        let teacher = SeqData {
            targets: Targets::Teacher {
                k: 2,
                ids: (0..12).collect(),
                probs: (0..12).map(|i| i as f32 / 12.0).collect(),
            },
            ..next.clone()
        };
        for ds in [next, teacher] {
            ds.save(&p).unwrap();
            assert_eq!(SeqData::load(&p).unwrap(), ds);
            let bytes = std::fs::read(&p).unwrap();
            std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
            assert!(
                SeqData::load(&p)
                    .unwrap_err()
                    .to_string()
                    .contains("cut short")
            );
        }
    }
}
