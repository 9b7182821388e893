//! `tandem`: the edge host. Runs the drafter component (wasmtime, wasi:nn backends) against
//! a verifier, and the `models` subcommands (catalog, fetch, split, fingerprint, local
//! generation).

mod component;
mod demo;
mod generate;
mod models_cmd;
mod nn;
mod serve;

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
    /// Generate text with speculative decoding: the drafter component drafts on this
    /// device, a verifier checks the drafts.
    Generate(generate::GenerateArgs),
    /// Model catalog, fetching, backbone split, fingerprints and local generation.
    Models {
        #[command(subcommand)]
        command: models_cmd::ModelsCommand,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Models { command } => models_cmd::run(command),
        Command::Demo(args) => demo::run(&args),
        Command::Generate(args) => generate::run(&args, &mut std::io::stdout()).map(|s| {
            if !args.quiet {
                println!();
            }
            eprintln!("{}", s.line());
        }),
        Command::Serve(args) => serve::run(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
