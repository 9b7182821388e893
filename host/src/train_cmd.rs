//! `tandem train`: exit adapters, shared-backbone drafter heads and new target versions (see
//! docs/training.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use tandem_train::{HeadForm, Kind, Options, target};

/// The `train` subcommands.
#[derive(clap::Subcommand)]
pub enum TrainCommand {
    /// Train an exit adapter at block K by distillation from the model's own final layer
    /// and write the model with the adapter added (the verifier's hints then use it).
    ExitHead {
        /// Exit layer: blocks computed before the adapter (1..n_layer-1).
        #[arg(long)]
        layer: usize,
        /// The adapter: `mlp`, the low-rank residual MLP (per position, no state), or
        /// `block`, one transformer block over the context whose keys and values the
        /// engine keeps in the sequence's KV cache (an exit block; `tandem models split
        /// --layers K` of the written model is then the block-head drafter).
        #[arg(long, value_enum, default_value_t = HeadArg::Mlp)]
        head: HeadArg,
        #[command(flatten)]
        common: Common,
    },
    /// Train a head on the first K blocks and write the shared-backbone drafter: embedding,
    /// K blocks and the trained head, with the model's backbone fingerprint at K.
    Drafter {
        /// Blocks of the backbone the drafter keeps (1..n_layer-1).
        #[arg(long)]
        layers: usize,
        /// The head: `mlp`, the low-rank residual MLP adapter (per position, no state), or
        /// `block`, one transformer block with its own KV cache, started from the model's
        /// block K and trained in full (the drafter then has K + 1 blocks and declares a
        /// backbone of K).
        #[arg(long, value_enum, default_value_t = HeadArg::Mlp)]
        head: HeadArg,
        #[command(flatten)]
        common: Common,
    },
    /// Fine-tune a target's blocks from K up (LoRA merged into the weights, plus the norms)
    /// on a new corpus and write the new version: embedding, blocks below K and tokenizer
    /// stay bit-identical, so drafters sharing the backbone at K fit it as they fit the old.
    Target(TargetArgs),
}

/// Options of `tandem train target`.
#[derive(clap::Args)]
pub struct TargetArgs {
    /// The model to start from (v1): a catalog name or a GGUF path.
    #[arg(long)]
    model: String,
    /// First block trained (1..n_layer-1); the blocks below it are the shared backbone.
    #[arg(long)]
    layer: usize,
    /// The new domain: text files or directories (repeatable). Default: the Rust sources of
    /// the cargo registry's source cache. One file in ten is held out by its content's sha256.
    #[arg(long, num_args = 1..)]
    corpus: Vec<PathBuf>,
    /// The old domain, measured before and after (held-out files only). Default: the Python
    /// standard library, the other trainers' corpus.
    #[arg(long, num_args = 1..)]
    old_corpus: Vec<PathBuf>,
    /// The GGUF to write (v2).
    #[arg(long)]
    out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Peak learning rate (Adam; warm-up, then cosine decay to a tenth).
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    /// Seed of the LoRA initialisation and the batch order (same seed, same file).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from OUT.ckpt (written at every evaluation) when it exists.
    #[arg(long)]
    resume: bool,
    /// LoRA rank (all seven matrices of every trained block).
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Windows per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Training tokens (run through the backbone once and cached).
    #[arg(long, default_value_t = 65_536)]
    train_tokens: usize,
    /// Held-out tokens of each domain.
    #[arg(long, default_value_t = 8192)]
    heldout_tokens: usize,
    /// Steps between held-out evaluations and checkpoints.
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    /// Stop after this many steps of this run, keeping the checkpoint and writing no
    /// output; a later run with --resume continues.
    #[arg(long)]
    pause_after: Option<usize>,
    /// Also write the report (losses, history, fingerprints, timings) as JSON here.
    #[arg(long)]
    report_json: Option<PathBuf>,
}

/// The form of a trained head (`--head`).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HeadArg {
    /// Low-rank residual MLP adapter.
    Mlp,
    /// One transformer block with its own KV cache.
    Block,
}

/// Options shared by `exit-head` and `drafter`.
#[derive(clap::Args)]
pub struct Common {
    /// The model: a catalog name or a GGUF path.
    #[arg(long)]
    model: String,
    /// Text files or directories to train on (repeatable). Default: the Python standard
    /// library of the machine's python3. About one file in ten is held out by a fixed rule.
    #[arg(long, num_args = 1..)]
    corpus: Vec<PathBuf>,
    /// The GGUF to write.
    #[arg(long)]
    out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Peak learning rate (Adam; warm-up, then cosine decay to a tenth). Default 2e-3 for
    /// an MLP adapter, 1e-3 for a block head.
    #[arg(long)]
    lr: Option<f64>,
    /// Seed of the initial weights and the batch order (same seed, same result).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from OUT.ckpt (written at every evaluation) when it exists.
    #[arg(long)]
    resume: bool,
    /// Rank of the low-rank residual MLP adapter.
    #[arg(long, default_value_t = 256)]
    rank: usize,
    /// Positions per step.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Training positions (tokens run through the model once and cached).
    #[arg(long, default_value_t = 65_536)]
    train_tokens: usize,
    /// Held-out positions.
    #[arg(long, default_value_t = 8192)]
    heldout_tokens: usize,
    /// Tokens per forward when building the data.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Teacher entries kept per position.
    #[arg(long, default_value_t = 32)]
    top_k: usize,
    /// Greedy tokens the model generates after each training window; their positions are
    /// trained on too (the positions a drafter meets while the model generates).
    #[arg(long, default_value_t = 0)]
    generate: usize,
    /// Steps between held-out evaluations and checkpoints.
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// Stop after this many steps of this run, keeping the checkpoint and writing no
    /// output; a later run with --resume continues.
    #[arg(long)]
    pause_after: Option<usize>,
    /// Also write the report (metrics, history, timings) as JSON here.
    #[arg(long)]
    report_json: Option<PathBuf>,
}

/// Runs a `train` subcommand.
pub fn run(cmd: TrainCommand) -> Result<()> {
    let form = |h: HeadArg| match h {
        HeadArg::Mlp => HeadForm::Mlp,
        HeadArg::Block => HeadForm::Block,
    };
    let (kind, layer, head, c) = match cmd {
        TrainCommand::ExitHead {
            layer,
            head,
            common,
        } => (Kind::ExitHead, layer, form(head), common),
        TrainCommand::Drafter {
            layers,
            head,
            common,
        } => (Kind::Drafter, layers, form(head), common),
        TrainCommand::Target(args) => return run_target(args),
    };
    let model =
        tandem_models::fetch::resolve(&c.model).with_context(|| format!("model `{}`", c.model))?;
    let mut o = Options::new(kind, model, layer, c.out);
    o.head = head;
    o.corpus = c.corpus;
    o.steps = c.steps;
    o.lr = c.lr.unwrap_or(match head {
        HeadForm::Mlp => 2e-3,
        HeadForm::Block => 1e-3,
    });
    o.seed = c.seed;
    o.resume = c.resume;
    o.rank = c.rank;
    o.batch = c.batch;
    o.train_tokens = c.train_tokens;
    o.heldout_tokens = c.heldout_tokens;
    o.seq_len = c.seq_len;
    o.top_k = c.top_k;
    o.generate = c.generate;
    o.eval_every = c.eval_every.max(1);
    o.pause_after = c.pause_after;
    let r = tandem_train::train(&o)?;
    if let Some(p) = &c.report_json {
        tandem_train::write_report(&r, p)?;
    }
    let Some(out) = &r.out else {
        return paused(r.step, r.steps, &o.checkpoint_path());
    };
    let what = match (r.kind, r.head) {
        (Kind::ExitHead, HeadForm::Mlp) => format!(
            "model with exit adapter at layer {} of {}, rank {}",
            r.layer, r.n_layer, r.rank
        ),
        (Kind::ExitHead, HeadForm::Block) => format!(
            "model with an exit block at layer {} of {}",
            r.layer, r.n_layer
        ),
        (Kind::Drafter, HeadForm::Mlp) => format!(
            "shared-backbone drafter: {} blocks and an adapter of rank {}",
            r.layer, r.rank
        ),
        (Kind::Drafter, HeadForm::Block) => format!(
            "shared-backbone drafter: {} blocks of the backbone and a trained block",
            r.layer
        ),
    };
    println!(
        "wrote {} ({what}, {} parameters trained)",
        out.display(),
        r.params
    );
    println!(
        "held-out ({} positions): top-1 {:.3} (lens {:.3}), top-5 {:.3} (lens {:.3}), loss {:.3} \
         (lens {:.3}); data {:.1} s{}, training {:.1} s",
        r.heldout_positions,
        r.trained.top1,
        r.lens.top1,
        r.trained.top5,
        r.lens.top5,
        r.trained.loss,
        r.lens.loss,
        r.data_seconds,
        if r.data_cached { " (cached)" } else { "" },
        r.train_seconds
    );
    Ok(())
}

/// Says where a paused run stopped.
fn paused(step: usize, steps: usize, checkpoint: &std::path::Path) -> Result<()> {
    println!(
        "paused at step {step} of {steps}; checkpoint {} (run again with --resume to continue)",
        checkpoint.display()
    );
    Ok(())
}

/// Runs `tandem train target`.
fn run_target(c: TargetArgs) -> Result<()> {
    let model =
        tandem_models::fetch::resolve(&c.model).with_context(|| format!("model `{}`", c.model))?;
    let mut o = target::Options::new(model, c.layer, c.out);
    o.corpus = c.corpus;
    o.old_corpus = c.old_corpus;
    o.steps = c.steps;
    o.lr = c.lr;
    o.seed = c.seed;
    o.resume = c.resume;
    o.rank = c.rank;
    o.batch = c.batch;
    o.seq_len = c.seq_len;
    o.train_tokens = c.train_tokens;
    o.heldout_tokens = c.heldout_tokens;
    o.eval_every = c.eval_every.max(1);
    o.pause_after = c.pause_after;
    let r = target::train(&o)?;
    if let Some(p) = &c.report_json {
        tandem_train::write_report(&r, p)?;
    }
    let Some(out) = &r.out else {
        return paused(r.step, r.steps, &o.checkpoint_path());
    };
    println!(
        "wrote {} (blocks {}..{} trained, LoRA rank {}, {} parameters; tokenizer and backbone \
         fingerprints at {} {})",
        out.display(),
        r.layer,
        r.n_layer,
        r.rank,
        r.params,
        r.layer,
        if r.fingerprints_equal == Some(true) {
            "unchanged"
        } else {
            "CHANGED"
        }
    );
    let old = |m: Option<tandem_train::head::Metrics>| {
        m.map_or("-".to_string(), |m| format!("{:.3}", m.loss))
    };
    println!(
        "held-out loss, new domain ({} positions): v1 {:.3} -> v2 {:.3} (top-1 {:.3} -> {:.3}); \
         old domain ({} positions): v1 {} -> v2 {}; data {:.1} s{}, training {:.1} s",
        r.heldout_positions,
        r.v1_new.loss,
        r.v2_new.loss,
        r.v1_new.top1,
        r.v2_new.top1,
        r.old_positions,
        old(r.v1_old),
        old(r.v2_old),
        r.data_seconds,
        if r.data_cached { " (cached)" } else { "" },
        r.train_seconds
    );
    Ok(())
}
