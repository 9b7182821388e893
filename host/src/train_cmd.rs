//! `tandem train`: exit adapters and shared-backbone drafter heads (see docs/training.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use tandem_train::{Kind, Options};

/// The `train` subcommands.
#[derive(clap::Subcommand)]
pub enum TrainCommand {
    /// Train an exit adapter at block K by distillation from the model's own final layer
    /// and write the model with the adapter added (the verifier's hints then use it).
    ExitHead {
        /// Exit layer: blocks computed before the adapter (1..n_layer-1).
        #[arg(long)]
        layer: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Train a head on the first K blocks and write the shared-backbone drafter: embedding,
    /// K blocks and the trained head, with the model's backbone fingerprint at K.
    Drafter {
        /// Blocks of the backbone the drafter keeps (1..n_layer-1).
        #[arg(long)]
        layers: usize,
        #[command(flatten)]
        common: Common,
    },
}

/// Options shared by both subcommands.
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
    /// Peak learning rate (Adam; warm-up, then cosine decay to a tenth).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
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
    let (kind, layer, c) = match cmd {
        TrainCommand::ExitHead { layer, common } => (Kind::ExitHead, layer, common),
        TrainCommand::Drafter { layers, common } => (Kind::Drafter, layers, common),
    };
    let model =
        tandem_models::fetch::resolve(&c.model).with_context(|| format!("model `{}`", c.model))?;
    let mut o = Options::new(kind, model, layer, c.out);
    o.corpus = c.corpus;
    o.steps = c.steps;
    o.lr = c.lr;
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
        println!(
            "paused at step {} of {}; checkpoint {} (run again with --resume to continue)",
            r.step,
            r.steps,
            o.checkpoint_path().display()
        );
        return Ok(());
    };
    println!(
        "wrote {} ({}, exit adapter at layer {} of {}, rank {}, {} parameters)",
        out.display(),
        match r.kind {
            Kind::ExitHead => "model with exit adapter",
            Kind::Drafter => "shared-backbone drafter",
        },
        r.layer,
        r.n_layer,
        r.rank,
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
