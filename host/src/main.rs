//! `tandem`: the edge host. Runs the drafter component (wasmtime, wasi:nn backends) against
//! a verifier, and the `models` subcommands (catalog, fetch, split, fingerprint, local
//! generation).

mod component;
mod demo;
mod generate;
mod models_cmd;
mod nn;
mod serve;
mod train_cmd;

use clap::{Parser, Subcommand};

/// tandem — edge–cloud speculative decoding.
#[derive(Parser)]
#[command(name = "tandem", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch a real draft/target pair, start a verifier on loopback and stream a code
    /// completion through the drafter component, with a stats line.
    Demo(demo::DemoArgs),
    /// A local OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models)
    /// whose requests run speculative decoding against the verifier.
    Serve(serve::ServeArgs),
    /// Forward 127.0.0.1 connections to a server through an emulated link (delay, rate):
    /// for tests and benchmarks where network namespaces are not available.
    LinkShaper(LinkShaperArgs),
    /// Generate text with speculative decoding: the drafter component drafts on this
    /// device, a verifier checks the drafts.
    Generate(generate::GenerateArgs),
    /// Train exit adapters and shared-backbone drafter heads (CPU, distillation from the
    /// model's own final layer).
    Train {
        #[command(subcommand)]
        command: train_cmd::TrainCommand,
    },
    /// Model catalog, fetching, backbone split, fingerprints and local generation.
    Models {
        #[command(subcommand)]
        command: models_cmd::ModelsCommand,
    },
}

/// Options of `tandem link-shaper`.
#[derive(clap::Args)]
struct LinkShaperArgs {
    /// The server to forward to.
    #[arg(long)]
    upstream: std::net::SocketAddr,
    /// Round trip time to add, milliseconds (half each way).
    #[arg(long, default_value_t = 0.0)]
    rtt_ms: f64,
    /// Bits per second in each direction (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    rate_bps: u64,
}

fn link_shaper(args: &LinkShaperArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let shaper = tandem_verifier::shaper::start(
            args.upstream,
            tandem_verifier::shaper::Link {
                delay: std::time::Duration::from_secs_f64(args.rtt_ms / 2000.0),
                rate_bps: (args.rate_bps > 0).then_some(args.rate_bps),
            },
        )
        .await?;
        println!("tandem link-shaper listening on {}", shaper.addr);
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}

fn main() {
    tandem_models::init_threads();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Models { command } => models_cmd::run(command),
        Command::Train { command } => train_cmd::run(command),
        Command::Demo(args) => demo::run(&args),
        Command::Generate(args) => generate::run(&args, &mut std::io::stdout()).map(|s| {
            if !args.quiet {
                println!();
            }
            eprintln!("{}", s.line());
        }),
        Command::Serve(args) => serve::run(&args),
        Command::LinkShaper(args) => link_shaper(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
