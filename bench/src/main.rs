//! `tandem-bench`: benchmarks that run the real binaries and write reports under
//! `target/bench/`.

mod e2e;
mod evolve;
mod gpu;
mod heads;
mod link;
mod model;
mod report;
mod soak;
mod verifier;

use clap::{Parser, Subcommand};

/// tandem benchmarks (numbers and JSON, never pass/fail on timings).
#[derive(Parser)]
#[command(name = "tandem-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// End-to-end sweep over an emulated edge–cloud link: every strategy on the same
    /// prompts, verifier and host as separate pinned processes; writes e2e.json, a
    /// markdown table, speedup.svg and bytes.svg. Fails if any strategy's text differs
    /// from cloud-ar's.
    E2e(e2e::Args),
    /// Trains exit adapters and shared-backbone drafter heads and measures them against the
    /// plain logit lens: held-out and HumanEval agreement, drafter acceptance at γ = 4;
    /// writes heads.json and heads.md.
    Heads(heads::Args),
    /// A target upgraded on a frozen backbone while devices keep their drafter: trains v2
    /// (`train target`), serves v1, hot-loads v2 with sessions in flight, measures the
    /// drafter's acceptance and speedup against both; writes evolve.json and evolve.md.
    Evolve(evolve::Args),
    /// Draft-model decode speed on every wgpu adapter found and on the CPU engine, with
    /// GPU submissions and bytes moved per token; writes gpu.json.
    Gpu(gpu::Args),
    /// Soak: many concurrent sessions against one verifier process for minutes, with a
    /// malformed-frame flood, idle connections and hot-swaps; checks every token, prints
    /// sessions, errors, round-time percentiles and peak RSS; writes soak.json.
    Soak(soak::Args),
    /// Many simulated devices (recorded real drafts) against one verifier, batching on and
    /// off alternately, N = 1, 2, 4, 8, 16: aggregate and per-session tokens/s, round
    /// latency percentiles; writes verifier.json. Fails if any round differs from the
    /// recording.
    Verifier(verifier::Args),
}

fn main() {
    // SAFETY: first thing in main, before any thread exists.
    unsafe { tandem_gpu::skip_device_select_layer() };
    tandem_models::init_threads();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::E2e(args) => e2e::run(&args),
        Command::Heads(args) => heads::run(&args),
        Command::Evolve(args) => evolve::run(&args),
        Command::Gpu(args) => gpu::run(&args),
        Command::Soak(args) => soak::run(&args),
        Command::Verifier(args) => verifier::run(&args),
    };
    if let Err(e) = result {
        eprintln!("tandem-bench: error: {e:#}");
        std::process::exit(1);
    }
}
