//! tandem-train: exit adapters, shared-backbone drafter heads and new target versions,
//! trained on the CPU.
//!
//! For heads every weight of the model stays frozen. The adapter at block `K` (the engine's
//! low-rank residual MLP, see `docs/gguf-extensions.md`) is fitted by distillation: the
//! cross-entropy from the model's own final-layer distribution (its top-K, renormalised) to
//! the distribution the final norm and output head give the adapted hidden state; a block
//! head ([`block`]) is a transformer block trained the same way. [`target`] fine-tunes the
//! blocks above `K` on new text, leaving the backbone below `K` as it is. The backbone's
//! hidden states and the targets are computed once and cached, so epochs do not rerun the
//! model. Training checkpoints, resumes, and is deterministic for a seed. Method and
//! measurements: `docs/training.md`.

pub mod block;
pub mod corpus;
pub mod data;
pub mod head;
mod rng;
pub mod target;
pub mod upper;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tandem_models::{Model, Tokenizer};

use crate::data::{Dataset, Windows};
use crate::head::{Adam, Frozen, Head, Metrics};

/// What to write when training ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The whole model with the adapter added at its exit layer (`tandem train exit-head`).
    ExitHead,
    /// The embedding and first K blocks with the adapter as the head (`tandem train
    /// drafter`): a drafter with the model's backbone fingerprint at K.
    Drafter,
}

/// The form of a drafter's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadForm {
    /// The engine's low-rank residual MLP adapter at block K (stateless, per position).
    Mlp,
    /// One transformer block after block K, with its own KV cache (drafters only).
    Block,
}

/// Options of a training run.
#[derive(Debug, Clone)]
pub struct Options {
    /// What to write.
    pub kind: Kind,
    /// The model's GGUF file.
    pub model: PathBuf,
    /// Exit layer (blocks computed before the head), `1..n_layer`.
    pub layer: usize,
    /// The head's form.
    pub head: HeadForm,
    /// Corpus files or directories; empty means the Python standard library.
    pub corpus: Vec<PathBuf>,
    /// The GGUF to write.
    pub out: PathBuf,
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate (Adam).
    pub lr: f64,
    /// Seed of the initial weights and of the batch order.
    pub seed: u64,
    /// Continue from `OUT.ckpt` when it exists.
    pub resume: bool,
    /// Adapter rank.
    pub rank: usize,
    /// Positions per step.
    pub batch: usize,
    /// Tokens per forward when building the data.
    pub seq_len: usize,
    /// Training positions.
    pub train_tokens: usize,
    /// Held-out positions.
    pub heldout_tokens: usize,
    /// Teacher entries kept per position.
    pub top_k: usize,
    /// Greedy tokens the model generates after each training window, whose positions are
    /// trained on too (0: text only).
    pub generate: usize,
    /// Steps between held-out evaluations (and checkpoints).
    pub eval_every: usize,
    /// Stop after this many steps of this run, with a checkpoint, without writing the
    /// output (a later run with `resume` continues).
    pub pause_after: Option<usize>,
}

impl Options {
    /// Defaults for a model and layer, writing to `out`.
    pub fn new(kind: Kind, model: PathBuf, layer: usize, out: PathBuf) -> Self {
        Options {
            kind,
            model,
            layer,
            head: HeadForm::Mlp,
            corpus: Vec::new(),
            out,
            steps: 1000,
            lr: 2e-3,
            seed: 0,
            resume: false,
            rank: 256,
            batch: 128,
            seq_len: 256,
            train_tokens: 65_536,
            heldout_tokens: 8192,
            top_k: 32,
            generate: 0,
            eval_every: 100,
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

/// One held-out evaluation during training.
#[derive(Debug, Clone, Serialize)]
pub struct EvalPoint {
    /// Steps done.
    pub step: usize,
    /// Mean training loss since the previous evaluation.
    pub train_loss: f64,
    /// Held-out metrics.
    pub heldout: Metrics,
}

/// What a run did and measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What was written.
    pub kind: Kind,
    /// The head's form.
    pub head: HeadForm,
    /// The model file.
    pub model: PathBuf,
    /// Exit layer.
    pub layer: usize,
    /// Blocks of the model.
    pub n_layer: usize,
    /// Adapter rank (0 for a block head).
    pub rank: usize,
    /// Trained parameters.
    pub params: usize,
    /// Bytes of the trained tensors in the written file (f32 adapters; a block head's
    /// matrices are Q8_0).
    pub adapter_bytes: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Positions per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Seed.
    pub seed: u64,
    /// Teacher entries per position.
    pub top_k: usize,
    /// Training positions and files.
    pub train_positions: usize,
    /// Files the training positions came from.
    pub train_files: usize,
    /// Held-out positions.
    pub heldout_positions: usize,
    /// Files the held-out positions came from.
    pub heldout_files: usize,
    /// Seconds spent building (or loading) the cached data.
    pub data_seconds: f64,
    /// Whether the data came from the cache.
    pub data_cached: bool,
    /// Seconds of optimisation in this run.
    pub train_seconds: f64,
    /// Step the run resumed from, if it did.
    pub resumed_from: Option<usize>,
    /// The plain logit lens on the held-out positions.
    pub lens: Metrics,
    /// The trained adapter on the held-out positions.
    pub trained: Metrics,
    /// Held-out evaluations during training.
    pub history: Vec<EvalPoint>,
    /// The file written (`None` when the run paused before the last step).
    pub out: Option<PathBuf>,
    /// Steps done when the run ended.
    pub step: usize,
}

pub(crate) fn bar(len: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{prefix:14} [{bar:30}] {pos}/{len} eta {eta} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    b.set_prefix(what.to_string());
    b
}

/// Prints a line above the bar, or on stderr when the bar is hidden (not a terminal).
pub(crate) fn say(b: &ProgressBar, line: String) {
    if b.is_hidden() {
        eprintln!("{line}");
    } else {
        b.println(line);
    }
}

fn build_data(
    model: &Model,
    tokenizer: &Tokenizer,
    opts: &Options,
    files: &[corpus::CorpusFile],
    budget: usize,
    what: &str,
) -> Result<(Dataset, usize, bool)> {
    // Held-out positions stay teacher-forced text, comparable between runs.
    let generate = if what == "train" { opts.generate } else { 0 };
    let w = Windows {
        seq_len: opts.seq_len,
        per_file: 2,
        budget,
        generate,
    };
    let wins = data::windows(tokenizer, files, w)?;
    let used: Vec<corpus::CorpusFile> = files
        .iter()
        .filter(|f| wins.iter().any(|(k, _)| *k == f.key))
        .cloned()
        .collect();
    let used_files = used.len();
    let path = data::cache_path(&opts.model, opts.layer, opts.top_k, w, &used, what)?;
    if let Ok(ds) = Dataset::load(&path) {
        eprintln!(
            "{what}: {} positions from the cache {}",
            ds.len(),
            path.display()
        );
        return Ok((ds, used_files, true));
    }
    let total = budget.min(wins.iter().map(|(_, t)| t.len() + generate).sum());
    let b = bar(total as u64, what);
    say(
        &b,
        format!(
            "{what}: running the model over {total} positions of {used_files} files{} (hidden \
             states at block {} and the final layer's top-{})",
            if generate > 0 {
                format!(", {generate} generated tokens after each window")
            } else {
                String::new()
            },
            opts.layer,
            opts.top_k
        ),
    );
    let mut ds = Dataset::new(model.config().n_embd, opts.top_k);
    let started = Instant::now();
    let mut next_line = total / 10;
    for (_, tokens) in &wins {
        let before = ds.len();
        let room = budget.saturating_sub(before + tokens.len());
        ds.push_sequence(model, opts.layer, tokens, generate.min(room))?;
        b.inc((ds.len() - before) as u64);
        let rate = ds.len() as f64 / started.elapsed().as_secs_f64();
        b.set_message(format!("{rate:.0} tok/s"));
        // Without a terminal the bar is hidden: a line every tenth instead.
        if b.is_hidden() && ds.len() >= next_line && ds.len() < total {
            eprintln!("{what}: {}/{total} tokens ({rate:.0} tok/s)", ds.len());
            next_line += total / 10;
        }
    }
    b.finish_and_clear();
    if ds.is_empty() {
        bail!("the {what} files gave no text to train on (are they UTF-8 text?)");
    }
    ds.save(&path)?;
    Ok((ds, used_files, false))
}

/// The adapter's tensors as they go into the GGUF.
fn adapter_tensors(head: &Head, layer: usize) -> Result<Vec<(String, QTensor)>> {
    let q = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32);
    Ok(vec![
        (
            format!("exit.{layer}.norm.weight"),
            q(head.norm.as_tensor())?,
        ),
        (
            format!("exit.{layer}.down.weight"),
            q(head.down.as_tensor())?,
        ),
        (format!("exit.{layer}.up.weight"), q(head.up.as_tensor())?),
    ])
}

/// Trains an adapter as `opts` says and writes the GGUF; returns the report.
pub fn train(opts: &Options) -> Result<Report> {
    if opts.steps == 0 || opts.batch == 0 || opts.rank == 0 || opts.top_k == 0 {
        bail!("--steps, --batch, --rank and --top-k must be at least 1");
    }
    if !(opts.lr > 0.0 && opts.lr.is_finite()) {
        bail!("--lr must be a positive number, got {}", opts.lr);
    }
    if opts.seq_len < 16 {
        bail!("--seq-len must be at least 16 tokens");
    }
    if opts.head == HeadForm::Block {
        return block::train(opts);
    }
    let mut model =
        Model::load(&opts.model).with_context(|| format!("loading {}", opts.model.display()))?;
    let n_layer = model.config().n_layer;
    if opts.layer == 0 || opts.layer >= n_layer {
        bail!(
            "--layer {} is outside 1..{n_layer} for {} ({n_layer} blocks; the exit must come \
             before the last block)",
            opts.layer,
            opts.model.display()
        );
    }
    if model.remove_exit_adapter(opts.layer) {
        eprintln!(
            "{} already has an exit adapter at layer {}: training a new one from the plain \
             hidden states; the written file replaces it",
            opts.model.display(),
            opts.layer
        );
    }
    let tokenizer = Tokenizer::from_gguf(&opts.model)?;
    let corpus = corpus::for_heads(&opts.corpus)?;
    let t0 = Instant::now();
    let (train_data, train_files, c1) = build_data(
        &model,
        &tokenizer,
        opts,
        &corpus.train,
        opts.train_tokens,
        "train",
    )?;
    let (held, heldout_files, c2) = build_data(
        &model,
        &tokenizer,
        opts,
        &corpus.heldout,
        opts.heldout_tokens,
        "held-out",
    )?;
    let data_seconds = t0.elapsed().as_secs_f64();

    let frozen = Frozen::of(&model)?;
    drop(model);

    let ckpt = opts.checkpoint_path();
    let meta = serde_json::json!({
        "model": std::fs::canonicalize(&opts.model).unwrap_or_else(|_| opts.model.clone()),
        "kind": opts.kind, "layer": opts.layer, "rank": opts.rank, "steps": opts.steps,
        "lr": opts.lr, "seed": opts.seed, "batch": opts.batch, "top_k": opts.top_k,
        "seq_len": opts.seq_len, "train_tokens": opts.train_tokens, "generate": opts.generate,
        "train_positions": train_data.len(),
    })
    .to_string();
    let (head, mut adam, resumed_from) = if opts.resume && ckpt.exists() {
        let (vars, a) = head::load_checkpoint(&ckpt, &head::HEAD_NAMES, &meta)?;
        let h = Head::from_vars(vars)?;
        eprintln!("resuming from {} at step {}", ckpt.display(), a.t);
        let t = a.t;
        (h, a, Some(t))
    } else {
        if opts.resume {
            eprintln!("no checkpoint at {}: starting from step 0", ckpt.display());
        }
        let h = Head::init(train_data.d, opts.rank, opts.seed)?;
        let a = Adam::new(&h.vars())?;
        (h, a, None)
    };

    let lens = head::evaluate(None, &frozen, &held)?;
    let b = bar(opts.steps as u64, "training");
    say(
        &b,
        format!(
            "layer {}: {} training / {} held-out positions; plain logit lens on held-out: \
             loss {:.3}, top-1 {:.3}, top-5 {:.3}",
            opts.layer,
            train_data.len(),
            held.len(),
            lens.loss,
            lens.top1,
            lens.top5
        ),
    );
    b.set_position(adam.t as u64);
    let mut history = Vec::new();
    let mut perm = None;
    let (mut sum, mut count) = (0.0, 0usize);
    let started = Instant::now();
    let mut last = lens;
    let stop_at = opts
        .pause_after
        .map_or(opts.steps, |n| (adam.t + n).min(opts.steps));
    while adam.t < stop_at {
        let step = adam.t;
        let idx = head::batch_indices(train_data.len(), opts.batch, opts.seed, step, &mut perm);
        let lr = head::lr_at(step, opts.steps, opts.lr);
        let loss = head::train_step(&head, &mut adam, &frozen, &train_data, &idx, lr)?;
        if !loss.is_finite() {
            bail!("the loss became {loss} at step {step}; try a smaller --lr");
        }
        sum += loss;
        count += 1;
        b.inc(1);
        b.set_message(format!(
            "loss {:.3} held-out top-1 {:.3} (lens {:.3})",
            sum / count as f64,
            last.top1,
            lens.top1
        ));
        if adam.t.is_multiple_of(opts.eval_every) || adam.t == opts.steps {
            last = head::evaluate(Some(&head), &frozen, &held)?;
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
            head::save_checkpoint(&ckpt, &head.named(), &adam, &meta)?;
        }
    }
    b.finish_and_clear();
    let train_seconds = started.elapsed().as_secs_f64();
    let paused = adam.t < opts.steps;
    if paused {
        head::save_checkpoint(&ckpt, &head.named(), &adam, &meta)?;
    }
    let trained = match history.last() {
        Some(p) => p.heldout,
        None => head::evaluate(Some(&head), &frozen, &held)?,
    };

    let adapter_bytes = head.params() * 4;
    let out = if paused {
        None
    } else {
        write_head(opts, &head, &trained, &lens)?;
        Some(opts.out.clone())
    };
    Ok(Report {
        kind: opts.kind,
        head: opts.head,
        model: opts.model.clone(),
        layer: opts.layer,
        n_layer,
        rank: opts.rank,
        params: head.params(),
        adapter_bytes,
        steps: opts.steps,
        batch: opts.batch,
        lr: opts.lr,
        seed: opts.seed,
        top_k: opts.top_k,
        train_positions: train_data.len(),
        train_files,
        heldout_positions: held.len(),
        heldout_files,
        data_seconds,
        data_cached: c1 && c2,
        train_seconds,
        resumed_from,
        lens,
        trained,
        history,
        out,
        step: adam.t,
    })
}

/// Writes the output GGUF with the adapter and checks that it loads with it.
fn write_head(opts: &Options, head: &Head, trained: &Metrics, lens: &Metrics) -> Result<()> {
    let tensors = adapter_tensors(head, opts.layer)?;
    let k = opts.layer;
    let metadata = vec![
        (
            format!("tandem.exit.{k}.form"),
            Value::String("low-rank residual MLP".into()),
        ),
        (
            format!("tandem.exit.{k}.rank"),
            Value::U32(opts.rank as u32),
        ),
        (
            format!("tandem.exit.{k}.steps"),
            Value::U32(opts.steps as u32),
        ),
        (
            format!("tandem.exit.{k}.heldout_top1"),
            Value::F32(trained.top1 as f32),
        ),
        (
            format!("tandem.exit.{k}.lens_heldout_top1"),
            Value::F32(lens.top1 as f32),
        ),
    ];
    let layers = match opts.kind {
        Kind::ExitHead => None,
        Kind::Drafter => Some(opts.layer),
    };
    tandem_models::backbone::write_model(&opts.model, &opts.out, layers, tensors, metadata)?;
    // The file must load and carry the adapter.
    let written = Model::load(&opts.out)
        .with_context(|| format!("the written file {} does not load", opts.out.display()))?;
    if !written.exit_adapters().any(|(l, _)| l == opts.layer) {
        bail!(
            "internal: {} was written without its adapter at layer {}",
            opts.out.display(),
            opts.layer
        );
    }
    Ok(())
}

/// Writes a report (of any trainer) as pretty JSON to `path` (`--report-json`).
pub fn write_report(report: &impl Serialize, path: &Path) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}
