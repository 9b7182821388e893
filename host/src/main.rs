//! `tandem`: the edge host. Today: the `models` subcommands (catalog, fetch, split,
//! fingerprint, local generation).

mod models_cmd;

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
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
