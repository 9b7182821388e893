//! `tandem-verifier`: the cloud verifier.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tandem_client::auth::read_token_file;
use tandem_models::KvPrecision;
use tandem_verifier::{Limits, ServerConfig, State, TargetSpec, start};

#[derive(Parser)]
#[command(name = "tandem-verifier", version, about = "tandem's cloud verifier")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve target models: session streams (HTTP/2), /v1/completions, admin, metrics.
    Serve(Serve),
}

#[derive(clap::Args)]
struct Serve {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:8750")]
    listen: SocketAddr,
    /// Target to load: [FAMILY[@VERSION]=]NAME|PATH (a catalog name or a GGUF file).
    /// Repeat for several targets.
    #[arg(long = "target", required = true)]
    targets: Vec<TargetSpec>,
    /// A draft model on the server, for `"speculative": true` completions (the cloud-sd
    /// baseline: draft and target both here, tokens streamed to the client).
    #[arg(long)]
    draft: Option<String>,
    /// Where targets run: cpu (the CPU engine, batching sessions' forwards), gpu (the first
    /// hardware GPU adapter, through wgpu: Vulkan, Metal, DX12) or gpu:NAME (the first
    /// adapter whose name contains NAME, software ones included, e.g. gpu:llvmpipe; see
    /// `tandem gpu list`). `POST /admin/targets` may name another per target.
    #[arg(long, default_value = "cpu")]
    device: tandem_verifier::Device,
    /// Layer whose predictions are streamed as hints before verification finishes
    /// (default: the layer of an exit adapter in the target file, else no hints).
    #[arg(long)]
    early_exit_layer: Option<usize>,
    /// Send a hint only when the exit's top probability exceeds this at every position it
    /// covers (0..1; 0 sends every hint). With a trained exit adapter a threshold keeps its
    /// unsure guesses off the wire.
    #[arg(long, default_value_t = 0.0)]
    hint_confidence: f32,
    /// Entries of the target distribution sent when a sampled draft is rejected.
    #[arg(long, default_value_t = 32)]
    top_k: usize,
    /// File of accepted bearer tokens for sessions and completions, one per line. Required
    /// to listen on an address other than loopback (see --insecure-no-auth).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// File of bearer tokens for the admin API (/admin/targets), one per line. Without it
    /// the admin API is open on a server without --token-file and off on one with it.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Listen off loopback without any token: anyone who reaches the port can use the
    /// verifier and load and retire targets.
    #[arg(long)]
    insecure_no_auth: bool,
    /// Directory whose GGUF files POST /admin/targets may load (catalog names are always
    /// allowed); without it the admin API loads catalog models only.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Targets loaded at once, at most (--target ones included).
    #[arg(long, default_value_t = 8)]
    max_targets: usize,
    /// TLS certificate chain (PEM); with --tls-key serves HTTPS instead of cleartext.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Concurrent sessions (streams and completions).
    #[arg(long, default_value_t = 64)]
    max_sessions: usize,
    /// Sessions that may wait for a place when --max-sessions are open; more are refused
    /// with Busy at once.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Seconds a session waits in that queue before it is refused with Busy.
    #[arg(long, default_value_t = 30)]
    queue_timeout: u64,
    /// MiB the KV caches of all sessions may reserve together (each session reserves its
    /// whole context when it opens; one that does not fit is refused). Default: no cap.
    #[arg(long)]
    kv_memory_mb: Option<usize>,
    /// Run each session's forwards on its own, not batched with other sessions' (for
    /// comparison; batching gives the same bits).
    #[arg(long)]
    no_batching: bool,
    /// Sampling rounds on a GPU read back whole rows of logits (vocabulary × 4 bytes a
    /// position), not each position's top entries and normalizer computed on the device
    /// (for comparison: the same verdicts).
    #[arg(long)]
    whole_rows: bool,
    /// Tokens (of all sessions together) one batched forward takes at most.
    #[arg(long, default_value_t = 256)]
    max_batch_tokens: usize,
    /// Prompts run in chunks of this many tokens, so that a long prompt does not stall
    /// other sessions' rounds.
    #[arg(long, default_value_t = 32)]
    prefill_chunk: usize,
    /// Longest context of a session (capped by each model's own).
    #[arg(long, default_value_t = 4096)]
    max_context: usize,
    /// Tokens one session may generate.
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// Longest draft block.
    #[arg(long, default_value_t = 32)]
    max_draft: usize,
    /// Seconds a session may stay silent before it is closed.
    #[arg(long, default_value_t = 300)]
    idle_timeout: u64,
    /// Seconds a session may last in all, busy or not; the device then resumes in a new
    /// session by re-sending its history.
    #[arg(long, default_value_t = 3600)]
    max_session_time: u64,
    /// Open connections at most; further ones are closed on accept.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Concurrent HTTP/2 streams (sessions, requests) per connection.
    #[arg(long, default_value_t = 16)]
    max_streams: u32,
    /// Seconds a connection has to send its first bytes, finish the TLS handshake and send
    /// a complete HTTP/1 header (also the HTTP/2 keepalive timeout).
    #[arg(long, default_value_t = 10)]
    handshake_timeout: u64,
    /// How sessions' KV caches store keys and values: f32, or f16 (half the memory per
    /// session; logits move by the rounding, batch invariance is kept).
    #[arg(long, value_enum, default_value_t = KvCacheArg::F32)]
    kv_cache: KvCacheArg,
    /// A drafter channel to serve: a directory of signed drafter bundles (`tandem drafter
    /// pack --out DIR/BUNDLE`), listed at `GET /v1/drafters`; each session is told the newest
    /// bundle for its target's family. See docs/drafters.md.
    #[arg(long)]
    drafters: Option<PathBuf>,
}

/// `--kv-cache` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum KvCacheArg {
    F32,
    F16,
}

async fn serve(args: Serve) -> anyhow::Result<()> {
    if args.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    if !(0.0..1.0).contains(&args.hint_confidence) {
        bail!(
            "--hint-confidence must be in [0, 1) (a probability; 0 sends every hint), got {}",
            args.hint_confidence
        );
    }
    if !args.listen.ip().is_loopback() && args.token_file.is_none() {
        if !args.insecure_no_auth {
            bail!(
                "refusing to listen on {} without tokens: anyone who reaches it could use \
                 the verifier and load targets. Give --token-file (and --admin-token-file \
                 for the admin API), or --insecure-no-auth if you mean it",
                args.listen
            );
        }
        eprintln!(
            "tandem-verifier: WARNING: --insecure-no-auth: listening on {} with no \
             authentication; anyone who reaches this port can use the verifier{}",
            args.listen,
            if args.admin_token_file.is_none() {
                " and load and retire targets"
            } else {
                ""
            }
        );
    }
    if let Some(dir) = &args.model_dir
        && !dir.is_dir()
    {
        bail!("--model-dir {} is not a directory", dir.display());
    }
    if args.max_targets == 0 {
        bail!("--max-targets must be at least 1");
    }
    for (flag, v) in [
        ("--max-session-time", args.max_session_time),
        ("--max-connections", args.max_connections as u64),
        ("--max-streams", args.max_streams as u64),
        ("--handshake-timeout", args.handshake_timeout),
        ("--idle-timeout", args.idle_timeout),
        ("--queue-timeout", args.queue_timeout),
        ("--max-batch-tokens", args.max_batch_tokens as u64),
        ("--prefill-chunk", args.prefill_chunk as u64),
        ("--kv-memory-mb", args.kv_memory_mb.unwrap_or(1) as u64),
    ] {
        if v == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    let config = ServerConfig {
        listen: args.listen,
        limits: Limits {
            max_sessions: args.max_sessions,
            max_context: args.max_context,
            max_tokens: args.max_tokens,
            max_draft: args.max_draft,
            top_k: args.top_k,
            idle_timeout: Duration::from_secs(args.idle_timeout),
            max_session_time: Duration::from_secs(args.max_session_time),
            hint_confidence: args.hint_confidence,
            queue: args.queue,
            queue_timeout: Duration::from_secs(args.queue_timeout),
            kv_memory: args.kv_memory_mb.map(|mb| mb << 20),
            batching: !args.no_batching,
            top_rows: !args.whole_rows,
            max_batch_tokens: args.max_batch_tokens,
            prefill_chunk: args.prefill_chunk,
            kv_cache: match args.kv_cache {
                KvCacheArg::F32 => KvPrecision::F32,
                KvCacheArg::F16 => KvPrecision::F16,
            },
            ..Limits::default()
        },
        early_exit_layer: args.early_exit_layer,
        device: args.device.clone(),
        tokens: match &args.token_file {
            Some(p) => read_token_file(p)?,
            None => Vec::new(),
        },
        admin_tokens: match &args.admin_token_file {
            Some(p) => read_token_file(p)?,
            None => Vec::new(),
        },
        model_dir: args.model_dir.clone(),
        max_targets: args.max_targets,
        tls: args.tls_cert.zip(args.tls_key),
        max_connections: args.max_connections,
        max_streams: args.max_streams,
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        drafters: match args.drafters {
            Some(d) => {
                let (index, skipped) = tandem_client::drafters::scan(&d).with_context(|| {
                    format!("--drafters {}: not a readable directory", d.display())
                })?;
                for s in skipped {
                    eprintln!("tandem-verifier: drafter channel: skipping {s}");
                }
                for f in &index.families {
                    eprintln!(
                        "tandem-verifier: drafter channel: {} bundle(s) for {}, recommended {}",
                        f.bundles.len(),
                        f.family,
                        f.recommended
                    );
                }
                Some(d)
            }
            None => None,
        },
    };
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let draft = match &args.draft {
        Some(d) => {
            let d = d.clone();
            Some(
                tokio::task::spawn_blocking(move || tandem_verifier::server::ServerDraft::load(&d))
                    .await??,
            )
        }
        None => None,
    };
    let state = State::with_draft(config, draft);
    for spec in &args.targets {
        let st = state.clone();
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || st.load(&spec)).await??;
    }
    let server = start(state).await?;
    println!("tandem-verifier listening on {scheme}://{}", server.addr);
    tokio::select! {
        _ = server.wait() => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
    }
    Ok(())
}

fn main() {
    // SAFETY: first thing in main, before any thread starts.
    unsafe { tandem_gpu::skip_device_select_layer() };
    tandem_models::init_threads();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
        }
    });
    if let Err(e) = result {
        eprintln!("tandem-verifier: error: {e:#}");
        std::process::exit(1);
    }
}
