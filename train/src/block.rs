//! `tandem train drafter --head block` and `tandem train exit-head --head block`: a head of
//! one transformer block with attention over the context (Kangaroo's adapter, Liu et al.
//! 2024) on the frozen model's hidden state after block `K`, written as a drafter or as an
//! exit block inside the model.
//!
//! The written drafter is an ordinary model of `K + 1` blocks: the embedding and blocks
//! `0..K` of the source, bit for bit, then the trained block, the output norm (trained) and
//! the output head (frozen; tied to the embedding in SmolLM2). It declares a backbone of `K`
//! blocks, so its fingerprint is the source's at `K` and it fits every target version that
//! keeps those blocks. Its head keeps a KV cache like any block: truncating and rolling back
//! the drafter's cache covers it, with no engine change. The exit form is the same block
//! and norm stored as `exit.K.blk.*` and `exit.K.output_norm.weight` in a copy of the model;
//! the engine keeps its keys and values in the sequence's cache (`docs/gguf-extensions.md`).
//!
//! The block starts as the source's block `K` with its attention-output and down projections
//! zeroed, so that step 0 is the identity (the plain logit lens at `K`), and is trained in
//! full, with the output norm, by distillation from the model's final layer (its top-K, as
//! the MLP heads) on windows of the corpus continued by the model's own greedy tokens.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::Value;
use tandem_models::backbone::{BACKBONE_LAYERS_KEY, fingerprints, write_model};
use tandem_models::{Model, Tokenizer};

use crate::corpus::{self, CorpusFile};
use crate::data::{Dataset, Sequences, build_sequences};
use crate::head::Metrics;
use crate::upper::{Fit, SeqData, Targets, Upper, evaluate, fit};
use crate::{Kind, Options, Report};

/// Windows of `opts.seq_len` tokens of `files`, each continued by `generate` greedy tokens,
/// with the hidden states at `opts.layer` and the final layer's top-K at every position
/// (cached on disk).
fn build(
    model: &Model,
    tokenizer: &Tokenizer,
    opts: &Options,
    files: &[CorpusFile],
    budget: usize,
    generate: usize,
    what: &str,
) -> Result<(SeqData, usize, bool)> {
    let src = Sequences {
        model_path: &opts.model,
        model,
        tokenizer,
        layer: opts.layer,
        seq_len: opts.seq_len,
        generate,
        top_k: opts.top_k,
        tag: "block",
    };
    let about = format!(
        "hidden states at block {} and the final layer's top-{}",
        opts.layer, opts.top_k
    );
    build_sequences(&src, files, budget, what, &about, |tokens, out| {
        let mut ds = Dataset::new(out.d, opts.top_k);
        ds.push_sequence(model, opts.layer, tokens, generate)?;
        out.hidden.extend(ds.hidden);
        if let Targets::Teacher { ids, probs, .. } = &mut out.targets {
            ids.extend(ds.ids);
            probs.extend(ds.probs);
        }
        Ok(())
    })
}

/// Trains the block head as `opts` says and writes the drafter or the model with the exit
/// block (`opts.kind`); returns the report.
pub fn train(opts: &Options) -> Result<Report> {
    let mut model =
        Model::load(&opts.model).with_context(|| format!("loading {}", opts.model.display()))?;
    let n_layer = model.config().n_layer;
    if opts.layer == 0 || opts.layer >= n_layer {
        let flag = match opts.kind {
            Kind::Drafter => "--layers",
            Kind::ExitHead => "--layer",
        };
        bail!(
            "{flag} {} is outside 1..{n_layer} for {} ({n_layer} blocks; the block head \
             starts from block {} of the model, so the backbone must leave one)",
            opts.layer,
            opts.model.display(),
            opts.layer
        );
    }
    if opts.seq_len + opts.generate > model.config().context_length {
        bail!(
            "--seq-len plus --generate ({}) is longer than the model's context ({})",
            opts.seq_len + opts.generate,
            model.config().context_length
        );
    }
    model.remove_exit_adapter(opts.layer);
    let tokenizer = Tokenizer::from_gguf(&opts.model)?;
    let corpus = corpus::for_heads(&opts.corpus)?;
    let t0 = Instant::now();
    let (train_data, train_files, c1) = build(
        &model,
        &tokenizer,
        opts,
        &corpus.train,
        opts.train_tokens,
        opts.generate,
        "train",
    )?;
    // Held-out positions stay teacher-forced text, comparable between runs and heads.
    let (held, heldout_files, c2) = build(
        &model,
        &tokenizer,
        opts,
        &corpus.heldout,
        opts.heldout_tokens,
        0,
        "held-out",
    )?;
    let data_seconds = t0.elapsed().as_secs_f64();

    drop(model);

    // Its attention-output and down projections zeroed, the block starts as the identity:
    // what it measures before training is the plain logit lens at K.
    let upper = Upper::load(&opts.model, opts.layer, 1, None, opts.seed)?;
    upper.zero_residual_outputs()?;
    let lens = evaluate(&upper, &held)?;
    let batch = opts.batch.div_ceil(train_data.seq_len);
    eprintln!(
        "block head at {} ({} parameters, from block {} of the model): {} training sequences \
         of {} positions, {} a step; held-out as it starts (the plain lens): top-1 {:.3}, \
         loss {:.3}",
        opts.layer,
        upper.params(),
        opts.layer,
        train_data.sequences(),
        train_data.seq_len,
        batch,
        lens.top1,
        lens.loss
    );
    let meta = serde_json::json!({
        "model": std::fs::canonicalize(&opts.model).unwrap_or_else(|_| opts.model.clone()),
        "kind": opts.kind, "head": "block", "layer": opts.layer, "steps": opts.steps,
        "lr": opts.lr, "seed": opts.seed, "batch": opts.batch, "top_k": opts.top_k,
        "seq_len": opts.seq_len, "train_tokens": opts.train_tokens, "generate": opts.generate,
        "train_positions": train_data.positions(),
    })
    .to_string();
    let fitted = fit(
        &upper,
        &train_data,
        &held,
        &Fit {
            steps: opts.steps,
            batch,
            lr: opts.lr,
            seed: opts.seed,
            eval_every: opts.eval_every,
            pause_after: opts.pause_after,
            resume: opts.resume,
            checkpoint: opts.checkpoint_path(),
            meta,
        },
        lens,
    )?;
    let tensors = upper.tensors()?;
    let adapter_bytes = tensors.iter().map(|(_, t)| t.storage_size_in_bytes()).sum();
    let out = if fitted.paused {
        None
    } else {
        write(opts, tensors, &fitted.last, &lens)?;
        Some(opts.out.clone())
    };
    Ok(Report {
        kind: opts.kind,
        head: opts.head,
        model: opts.model.clone(),
        layer: opts.layer,
        n_layer,
        rank: 0,
        params: upper.params(),
        adapter_bytes,
        steps: opts.steps,
        batch: opts.batch,
        lr: opts.lr,
        seed: opts.seed,
        top_k: opts.top_k,
        train_positions: train_data.positions(),
        train_files,
        heldout_positions: held.positions(),
        heldout_files,
        data_seconds,
        data_cached: c1 && c2,
        train_seconds: fitted.seconds,
        resumed_from: fitted.resumed_from,
        lens,
        trained: fitted.last,
        history: fitted.history,
        out,
        step: fitted.step,
    })
}

/// Writes the trained block: as the last block of a drafter of `K + 1` blocks declaring a
/// backbone of `K` ([`Kind::Drafter`]), or as an exit block at `K` added to the model
/// ([`Kind::ExitHead`]: `exit.K.blk.*` and `exit.K.output_norm.weight`). Reloads the file
/// and checks its backbone fingerprint against the source's.
fn write(
    opts: &Options,
    tensors: Vec<(String, QTensor)>,
    trained: &Metrics,
    lens: &Metrics,
) -> Result<()> {
    let k = opts.layer;
    // Metadata prefix and the key naming the head's form, the blocks kept (a split), the
    // declared backbone, the tensors.
    let (prefix, form, layers, backbone, tensors) = match opts.kind {
        Kind::Drafter => (
            "tandem.drafter".to_string(),
            "head",
            Some(k + 1),
            Some(k),
            tensors,
        ),
        Kind::ExitHead => {
            let block = format!("blk.{k}.");
            let renamed = tensors
                .into_iter()
                .map(|(name, t)| match name.strip_prefix(&block) {
                    Some(rest) => (format!("exit.{k}.blk.{rest}"), t),
                    None => (format!("exit.{k}.{name}"), t),
                })
                .collect();
            (format!("tandem.exit.{k}"), "form", None, None, renamed)
        }
    };
    let mut metadata = vec![
        (
            format!("{prefix}.{form}"),
            Value::String("transformer block".into()),
        ),
        (format!("{prefix}.steps"), Value::U32(opts.steps as u32)),
        (
            format!("{prefix}.heldout_top1"),
            Value::F32(trained.top1 as f32),
        ),
        (
            format!("{prefix}.lens_heldout_top1"),
            Value::F32(lens.top1 as f32),
        ),
    ];
    if let Some(k) = backbone {
        metadata.push((BACKBONE_LAYERS_KEY.to_string(), Value::U32(k as u32)));
    }
    write_model(&opts.model, &opts.out, layers, tensors, metadata)?;
    Model::load(&opts.out)
        .with_context(|| format!("the written file {} does not load", opts.out.display()))?;
    // A drafter's backbone is the source's first K blocks; an exit leaves the model's
    // blocks as they were.
    let source = fingerprints(&opts.model, backbone)?;
    if fingerprints(&opts.out, None)? != source {
        bail!(
            "internal: {} does not carry the backbone fingerprint of {}{}",
            opts.out.display(),
            opts.model.display(),
            backbone.map_or(String::new(), |k| format!(" at {k}"))
        );
    }
    Ok(())
}
