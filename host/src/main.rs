//! `tandem`: the edge host. Runs the drafter component (wasmtime, wasi:nn backends) against
//! a verifier, and the `models` subcommands (catalog, fetch, split, fingerprint, local
//! generation).

mod bundle;
mod cache;
mod component;
#[cfg(feature = "demo")]
mod demo;
mod drafter_cmd;
mod generate;
mod info;
mod ledger;
mod models_cmd;
mod nn;
mod serve;
#[cfg(feature = "train")]
mod train_cmd;
mod warm;

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
    #[cfg(feature = "demo")]
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
    #[cfg(feature = "train")]
    /// Train exit adapters and shared-backbone drafter heads (CPU, distillation from the
    /// model's own final layer), and new versions of a target on its frozen backbone.
    Train {
        #[command(subcommand)]
        command: train_cmd::TrainCommand,
    },
    #[cfg(feature = "gpu")]
    /// GPU adapters for drafting (wgpu: Vulkan, Metal, DX12, GL).
    Gpu {
        #[command(subcommand)]
        command: GpuCommand,
    },
    /// Signed drafter bundles: keygen, pack, verify and index for publishers; update, list,
    /// use and rollback of this device's installed drafters.
    Drafter {
        #[command(subcommand)]
        command: drafter_cmd::DrafterCommand,
    },
    /// What this device is and can run: architecture, CPU features and kernel path, memory,
    /// GPU adapters, wasmtime and its compiled-component cache, models and drafters present.
    Info(info::InfoArgs),
    /// Model catalog, fetching, backbone split, fingerprints and local generation.
    Models {
        #[command(subcommand)]
        command: models_cmd::ModelsCommand,
    },
}

#[cfg(feature = "gpu")]
#[derive(Subcommand)]
enum GpuCommand {
    /// The adapters wgpu finds: name, backend, device type, driver, and which `--gpu auto`
    /// picks.
    List,
}

#[cfg(feature = "gpu")]
fn gpu_list() -> anyhow::Result<()> {
    let found = tandem_gpu::list_adapters();
    if found.is_empty() {
        println!(
            "wgpu finds no adapter: drafting runs on the CPU. Install a Vulkan driver (on \
             Debian: apt-get install mesa-vulkan-drivers libvulkan1) to use a GPU."
        );
        return Ok(());
    }
    let auto = found.iter().position(|a| !a.is_software());
    println!("{:<40} {:<8} {:<14} driver", "name", "backend", "type");
    for (i, a) in found.iter().enumerate() {
        let mark = if Some(i) == auto {
            "  ← --gpu auto"
        } else {
            ""
        };
        println!(
            "{:<40} {:<8} {:<14} {}{mark}",
            a.name, a.backend, a.device_type, a.driver
        );
    }
    if auto.is_none() {
        println!(
            "only software adapters: --gpu auto drafts on the CPU; name one to use it anyway \
             (e.g. --gpu llvmpipe)"
        );
    }
    Ok(())
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
        let shaper = tandem_client::shaper::start(
            args.upstream,
            tandem_client::shaper::Link {
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
    // SAFETY: first thing in main, before any thread exists.
    #[cfg(feature = "gpu")]
    unsafe {
        tandem_gpu::skip_device_select_layer()
    };
    tandem_models::init_threads();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Models { command } => models_cmd::run(command),
        Command::Drafter { command } => drafter_cmd::run(command),
        #[cfg(feature = "train")]
        Command::Train { command } => train_cmd::run(command),
        #[cfg(feature = "gpu")]
        Command::Gpu {
            command: GpuCommand::List,
        } => gpu_list(),
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo::run(&args),
        Command::Generate(args) => generate::run(&args, &mut std::io::stdout()).map(|s| {
            if !args.quiet {
                println!();
            }
            eprintln!("{}", s.line());
            if !s.recommended_drafter.is_empty() && s.recommended_drafter != s.drafter {
                eprintln!(
                    "tandem: the verifier recommends drafter {} (this run used {}): run with \
                     --drafter-channel {} to install and use it",
                    s.recommended_drafter,
                    s.drafter,
                    args.verifier.split(',').next().unwrap_or_default()
                );
            }
        }),
        Command::Serve(args) => serve::run(&args),
        Command::LinkShaper(args) => link_shaper(&args),
        Command::Info(args) => info::run(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
