//! `tandem generate`: the drafter component drafts, the verifier verifies, the host carries
//! messages between them, measures the link and streams the text.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tandem_client::{Endpoint, SessionClient, SessionReceiver, SessionSender};
use tandem_core::protocol::{Accepted, BackboneClaim, ClientMsg, ErrorCode, Hello, ServerMsg};
use tandem_core::sampling::SamplingParams;
use tandem_models::{IncrementalDecoder, Tokenizer};

use crate::component::{Drafter, GuestLimits, MemoryBudget, Runtime, api};
use crate::ledger::Ledger;
use crate::nn::{ComputeMeter, DraftModel, GraphLimits, MeterReading, NamedGraphs};

/// Where a generation's text goes: any `Write` (the text is written and flushed as it
/// comes), or a sink that also sees the session's grant and may stop the generation.
pub trait Output {
    /// The verifier accepted the session; an error ends the generation before any token.
    fn accepted(&mut self, _accepted: &Accepted) -> anyhow::Result<()> {
        Ok(())
    }

    /// More text; `Ok(false)` ends the generation here (the session is closed normally).
    fn text(&mut self, piece: &str) -> std::io::Result<bool>;
}

impl<W: Write + ?Sized> Output for W {
    fn text(&mut self, piece: &str) -> std::io::Result<bool> {
        self.write_all(piece.as_bytes())?;
        self.flush()?;
        Ok(true)
    }
}

/// The verifier refused the session (other than Busy or Expired, which try elsewhere).
#[derive(Debug)]
pub struct Refused {
    /// Why, as the verifier put it.
    pub code: ErrorCode,
    /// The verifier's message.
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the verifier refused: {:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for Refused {}

/// How to work with the verifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyArg {
    /// Pipelined drafting, early hints, adaptive draft length.
    Tandem,
    /// Draft a block, wait for its result, repeat.
    Sync,
    /// No drafter: one round trip per token.
    CloudAr,
    /// Draft and target both on the verifier (its `--draft`), tokens streamed down.
    CloudSd,
}

/// Options of `tandem generate` (and the parts `tandem demo` reuses).
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Verifier address: http://HOST:PORT (h2c) or https://HOST:PORT (TLS). Several,
    /// comma-separated, are replicas: the first that accepts serves, and if it is lost
    /// mid-generation the host resumes on it or the next ones by re-sending its history.
    #[arg(long)]
    pub verifier: String,
    /// The drafter component (.wasm).
    #[arg(long, default_value_os_t = default_drafter())]
    pub drafter: PathBuf,
    /// Draft model: catalog name or GGUF path.
    #[arg(long)]
    pub draft_model: String,
    /// The verifier's target to use: a family (its newest compatible version) or
    /// `family@version`; default: the newest compatible target.
    #[arg(long)]
    pub target: Option<String>,
    /// The prompt (raw text, no chat template).
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// New tokens at most.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of both samplers (drafter and verifier).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// tandem: pipelined + hints + adaptive γ; sync: draft then wait; cloud-ar: no drafting.
    #[arg(long, value_enum, default_value_t = StrategyArg::Tandem)]
    pub strategy: StrategyArg,
    /// Ablation (tandem): no drafting ahead while a block is in flight, except from a hint.
    #[arg(long)]
    pub no_pipeline: bool,
    /// Ablation (tandem): ignore the verifier's early-exit hints.
    #[arg(long)]
    pub no_hints: bool,
    /// A fixed draft length instead of the policy's choice.
    #[arg(long)]
    pub gamma: Option<u32>,
    /// Longest draft block (also capped by the verifier).
    #[arg(long, default_value_t = 16)]
    pub max_draft: u32,
    /// Joules per generated token the device may spend drafting (needs --draft-watts).
    #[arg(long)]
    pub energy_budget: Option<f32>,
    /// Power the device draws while drafting, watts: turns draft time into energy.
    #[arg(long)]
    pub draft_watts: Option<f32>,
    /// Uplink bandwidth in bits/s, if known (the policy charges each drafted token's bytes
    /// against it); 0 = unknown.
    #[arg(long, default_value_t = 0.0)]
    pub uplink_bps: f32,
    /// Bearer token for the verifier.
    #[arg(long)]
    pub token: Option<String>,
    /// CA certificate (PEM) to trust for an https:// verifier.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Memory limit of the drafter component, MiB.
    #[arg(long, default_value_t = 256)]
    pub guest_memory_mb: usize,
    /// The wasi:nn name the draft model is registered under for the component.
    #[arg(long, default_value = "draft")]
    pub graph_name: String,
    /// Time limit of one call into the drafter component, seconds.
    #[arg(long, default_value_t = 60.0)]
    pub guest_timeout: f64,
    /// Write the run's statistics as JSON here.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// Do not print the generated text (statistics only).
    #[arg(long)]
    pub quiet: bool,
    /// Neither read nor write the warm-start state (what earlier sessions with this
    /// drafter, target version and link measured; `$TANDEM_POLICY_STATE`, default
    /// ~/.cache/tandem/policy-state.json): the policy starts from its defaults.
    #[arg(long)]
    pub no_warm_start: bool,
    /// Where the draft model runs: auto (the first hardware GPU, else the CPU), off (the
    /// CPU), or part of an adapter's name (`tandem gpu list`), e.g. llvmpipe.
    #[arg(long, default_value = "auto")]
    pub gpu: tandem_models::GpuChoice,
    /// A drafter channel (`http://VERIFIER:PORT`, or a static server's directory URL): at
    /// start the host installs the channel's recommended signed bundle if it is new, then
    /// runs the current drafter of its store instead of --drafter (and, if the bundle names
    /// one, its draft model instead of --draft-model). See docs/drafters.md.
    #[arg(long)]
    pub drafter_channel: Option<String>,
    /// With --drafter-channel: run the store's current drafter without checking the channel.
    #[arg(long)]
    pub no_drafter_updates: bool,
    /// `tandem serve` with --drafter-channel: seconds between periodic checks (0: none; a
    /// session whose verifier recommends another drafter still triggers one).
    #[arg(long, default_value_t = 600)]
    pub drafter_check_interval: u64,
    /// Public key file trusted for drafter bundles, besides the trusted-keys file
    /// (repeatable).
    #[arg(long)]
    pub trust_key: Vec<PathBuf>,
    /// The drafter store (default `$TANDEM_DRAFTERS` or ~/.cache/tandem/drafters).
    #[arg(long)]
    pub drafter_store: Option<PathBuf>,
}

impl GenerateArgs {
    /// The sampling options.
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
        }
    }

    /// `tandem generate --verifier VERIFIER --draft-model DRAFT_MODEL`: every other option
    /// at its command-line default (the defaults are written once, in the attributes above).
    #[cfg(feature = "demo")]
    pub fn with_defaults(verifier: &str, draft_model: &str) -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Generate {
            #[command(flatten)]
            args: GenerateArgs,
        }
        Generate::parse_from([
            "generate",
            "--verifier",
            verifier,
            "--draft-model",
            draft_model,
        ])
        .args
    }
}

/// `target/wasm32-wasip2/wasm/tandem_guest_drafter.wasm` beside the running binary's target
/// directory (where `cargo build --profile wasm` puts it), else that path relative to `.`.
pub fn default_drafter() -> PathBuf {
    let rel = Path::new("wasm32-wasip2/wasm/tandem_guest_drafter.wasm");
    if let Ok(exe) = std::env::current_exe()
        && let Some(target) = exe.parent().and_then(|p| p.parent())
    {
        let p = target.join(rel);
        if p.exists() {
            return p;
        }
    }
    Path::new("target").join(rel)
}

/// What a run measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunStats {
    /// Strategy.
    pub strategy: String,
    /// Where the draft model ran: `cpu` or the GPU adapter's name (`-` for cloud strategies).
    pub draft_backend: String,
    /// Target family@version that verified (the last session's).
    pub target: String,
    /// Times the verifier was lost and the generation resumed in a new session.
    pub resumes: usize,
    /// Generated tokens.
    pub tokens: usize,
    /// The generated token ids.
    pub token_ids: Vec<u32>,
    /// The generated text.
    pub text: String,
    /// Seconds from sending the prompt to the last token.
    pub seconds: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Time to first token, seconds.
    pub ttft_s: f64,
    /// Seconds from sending the prompt to the 16th token (0 when fewer came).
    pub t16_s: f64,
    /// Whether the policy started from the warm-start state of earlier sessions.
    pub warm_start: bool,
    /// Verify rounds.
    pub rounds: u32,
    /// Draft tokens sent.
    pub drafted: u32,
    /// Draft tokens accepted.
    pub accepted: u32,
    /// Mean committed tokens per round (accepted + 1).
    pub mean_per_round: f64,
    /// Draft steps run while a block was in flight.
    pub drafted_in_flight: u32,
    /// Drafts kept by pipelining.
    pub pipelined_kept: u32,
    /// Hints received / used to redirect drafting / whose drafts were kept.
    pub hints: u32,
    /// Hints used.
    pub hints_used: u32,
    /// Hint drafts kept.
    pub hint_kept: u32,
    /// γ histogram.
    pub gamma_counts: Vec<u32>,
    /// Bytes up per generated token.
    pub up_bytes_per_token: f64,
    /// Bytes down per generated token.
    pub down_bytes_per_token: f64,
    /// Estimated link RTT, ms.
    pub rtt_ms: f64,
    /// Mean draft step, ms.
    pub draft_ms: f64,
    /// The verifier's time per round (its `verify_us`), by the number of drafts in the
    /// block.
    pub verify_by_gamma: Vec<VerifyTime>,
    /// Whether the component's compiled form came from the cache.
    pub component_cached: bool,
    /// The drafter that ran: its bundle's `name@version`, else the component's file name.
    pub drafter: String,
    /// The component's sha256.
    pub drafter_sha256: String,
    /// The drafter the verifier recommends for its target (`name@version`; empty: none).
    pub recommended_drafter: String,
    /// Seconds spent in the component's steps (drafting and bookkeeping).
    pub step_s: f64,
    /// Seconds inside calls into the drafter component (steps and event deliveries), the
    /// backend's computes included.
    pub guest_s: f64,
    /// Seconds of those in the backend's computes (the native engine).
    pub compute_s: f64,
    /// Single-token computes (draft steps) the backend ran.
    pub draft_steps: u64,
    /// The backend's time per draft step, ms.
    pub compute_step_ms: f64,
    /// What the sandbox costs on top of the native engine: `guest_s / compute_s − 1` (guest
    /// logic, component calls, wasi-nn copies of inputs and logits).
    pub sandbox_overhead: f64,
    /// Seconds spent blocked waiting for the verifier.
    pub wait_s: f64,
    /// Seconds of the generation spent neither stepping nor waiting (event delivery,
    /// detokenizing, sending).
    pub other_s: f64,
}

/// The verifier's mean time for blocks of one draft length.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyTime {
    /// Draft tokens in the block (0 = a cloud-AR round).
    pub gamma: usize,
    /// Rounds of that length.
    pub rounds: u32,
    /// Mean verifier time, ms.
    pub mean_ms: f64,
}

/// What the host learns about the link from the verifier's messages: per-round send
/// times, the RTT estimate and the verifier's time per block.
struct LinkState {
    sent_at: HashMap<u32, (Instant, usize)>,
    /// Per draft position: (accepted, judged) in this session.
    positions: Vec<(f64, f64)>,
    rtt_ms: f64,
    rtt_seen: bool,
    verify_ms: f64,
    uplink_bps: f32,
    by_gamma: std::collections::BTreeMap<usize, (u32, f64)>,
}

impl LinkState {
    fn new(connect_ms: f64, uplink_bps: f32) -> Self {
        LinkState {
            sent_at: HashMap::new(),
            positions: Vec::new(),
            rtt_ms: connect_ms.max(0.01),
            rtt_seen: false,
            verify_ms: 0.0,
            uplink_bps,
            by_gamma: Default::default(),
        }
    }

    /// A block of `drafts` tokens went out for `round`.
    fn sent(&mut self, round: u32, drafts: usize) {
        self.sent_at.insert(round, (Instant::now(), drafts));
    }

    /// Hands one message from the verifier, received at `at`, to the guest (a Result
    /// first as a channel sample, then as the verdict).
    fn deliver(
        &mut self,
        drafter: &mut Drafter,
        at: Instant,
        msg: ServerMsg,
        draft_ms: f64,
        energy: &mut f64,
    ) -> anyhow::Result<()> {
        match msg {
            ServerMsg::First(t) => drafter.handle(&api::Event::First(t)),
            ServerMsg::Hint { round, tokens } => drafter.handle(&api::Event::Hint((round, tokens))),
            ServerMsg::Result(r) => {
                if let Some((s, drafts)) = self.sent_at.remove(&r.round) {
                    let round_ms = at.duration_since(s).as_secs_f64() * 1000.0;
                    let v = r.verify_us as f64 / 1000.0;
                    let link = (round_ms - v).max(0.0);
                    // The link's RTT is the floor of round time minus verifier time.
                    self.rtt_ms = if self.rtt_seen {
                        self.rtt_ms.min(link) * 0.9 + link * 0.1
                    } else {
                        link
                    };
                    self.rtt_seen = true;
                    self.verify_ms = v; // this round's: the guest fits verify time per size
                    let e = self.by_gamma.entry(drafts).or_default();
                    e.0 += 1;
                    e.1 += v;
                    let accepted = (r.accepted as usize).min(drafts);
                    let judged = (accepted + usize::from(accepted < drafts)).min(64);
                    if self.positions.len() < judged {
                        self.positions.resize(judged, (0.0, 0.0));
                    }
                    for (i, p) in self.positions[..judged].iter_mut().enumerate() {
                        p.0 += f64::from(u8::from(i < accepted));
                        p.1 += 1.0;
                    }
                }
                drafter.handle(&api::Event::Channel(api::ChannelSample {
                    rtt_ms: self.rtt_ms as f32,
                    bandwidth_bps: self.uplink_bps,
                    verify_ms: self.verify_ms as f32,
                    draft_ms: draft_ms as f32,
                    energy_j: *energy as f32,
                }))?;
                *energy = 0.0;
                drafter.handle(&api::Event::Verdict(r.into()))
            }
            ServerMsg::Error {
                code: ErrorCode::Expired,
                message,
            } => Err(lost(message)),
            ServerMsg::Error { code, message } => bail!("verifier error {code:?}: {message}"),
            ServerMsg::Accepted(_) => bail!("the verifier sent Accepted twice"),
        }
    }

    fn verify_by_gamma(&self) -> Vec<VerifyTime> {
        self.by_gamma
            .iter()
            .map(|(&gamma, &(rounds, total))| VerifyTime {
                gamma,
                rounds,
                mean_ms: total / rounds as f64,
            })
            .collect()
    }
}

impl RunStats {
    /// The one-line summary printed after the text.
    pub fn line(&self) -> String {
        let gammas: Vec<String> = self
            .gamma_counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(g, c)| format!("{g}×{c}"))
            .collect();
        let resumed = match self.resumes {
            0 => String::new(),
            n => format!(" | resumed {n}×"),
        };
        format!(
            "[{}] {} tokens in {:.2} s: {:.1} tok/s, first token {:.0} ms | {:.2} tokens/round over {} rounds, {}/{} drafts accepted | γ {} | hints {} ({} used) | up {:.1} B/token, down {:.1} B/token | rtt ≈ {:.0} ms, draft step {:.1} ms ({}){resumed}",
            self.strategy,
            self.tokens,
            self.seconds,
            self.tokens_per_s,
            self.ttft_s * 1000.0,
            self.mean_per_round,
            self.rounds,
            self.accepted,
            self.drafted,
            if gammas.is_empty() {
                "-".into()
            } else {
                gammas.join(" ")
            },
            self.hints,
            self.hints_used,
            self.up_bytes_per_token,
            self.down_bytes_per_token,
            self.rtt_ms,
            self.draft_ms,
            self.draft_backend,
        )
    }
}

/// `tandem`, `sync`, `cloud-ar`, with `-no-pipeline`, `-no-hints`, `-fixed-γ` for ablations.
fn strategy_name(args: &GenerateArgs) -> String {
    let mut s = match args.strategy {
        StrategyArg::Tandem => "tandem".to_string(),
        StrategyArg::Sync => "sync".to_string(),
        StrategyArg::CloudAr => return "cloud-ar".to_string(),
        StrategyArg::CloudSd => return "cloud-sd".to_string(),
    };
    if args.strategy == StrategyArg::Tandem {
        if args.no_pipeline {
            s.push_str("-no-pipeline");
        }
        if args.no_hints {
            s.push_str("-no-hints");
        }
        if let Some(g) = args.gamma {
            s.push_str(&format!("-fixed-{g}"));
        }
    }
    s
}

impl GenerateArgs {
    /// The endpoints of `--verifier URL[,URL...]`, in the order they are tried.
    pub fn endpoints(&self) -> anyhow::Result<Vec<Endpoint>> {
        endpoints(self)
    }
}

/// Whether a generation failed because no verifier could be reached (none answered, or
/// every one was busy).
pub fn unreachable(e: &anyhow::Error) -> bool {
    e.is::<Lost>()
}

/// The endpoints of `--verifier URL[,URL...]`, in the order they are tried.
fn endpoints(args: &GenerateArgs) -> anyhow::Result<Vec<Endpoint>> {
    let list: Vec<Endpoint> = args
        .verifier
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(|v| {
            Endpoint::parse(v, args.tls_ca.clone(), args.token.clone())
                .map_err(|e| anyhow::anyhow!("--verifier {v}: {e:#}"))
        })
        .collect::<anyhow::Result<_>>()?;
    if list.is_empty() {
        bail!("--verifier names no endpoint: give http://HOST:PORT (or several, comma-separated)");
    }
    Ok(list)
}

/// The first endpoint of `--verifier` (cloud-sd runs on one verifier and does not resume).
fn endpoint(args: &GenerateArgs) -> anyhow::Result<Endpoint> {
    Ok(endpoints(args)?.swap_remove(0))
}

enum Incoming {
    Msg(ServerMsg),
    End,
    Failed(String),
}

/// What a generation needs that does not change between requests: the compiled
/// component, the draft model, its tokenizer and fingerprints.
pub struct Prepared {
    runtime: Runtime,
    /// The drafter that runs: its bundle's `name@version`, else the component's file name.
    pub drafter_id: String,
    model: Option<DraftModel>,
    /// The draft model's tokenizer (the target's, by fingerprint).
    pub tokenizer: Tokenizer,
    tok_fp: [u8; 32],
    backbone: Option<BackboneClaim>,
}

impl Prepared {
    /// The draft model's tokenizer fingerprint, hex (as the verifier's `/v1/models` lists
    /// its targets').
    pub fn tokenizer_fingerprint(&self) -> String {
        tandem_models::backbone::TokenizerFingerprint(self.tok_fp).to_string()
    }

    /// Loads the component and the draft model named by `args` (with --drafter-channel:
    /// the store's current bundle, after checking the channel unless told not to).
    pub fn new(args: &GenerateArgs) -> anyhow::Result<Prepared> {
        let (drafter, draft_model, drafter_id) = resolve_drafter(args)?;
        let draft_path = tandem_models::fetch::resolve(&draft_model)
            .with_context(|| format!("draft model `{draft_model}`"))?;
        let runtime = Runtime::load(&drafter)?;
        let tokenizer = Tokenizer::from_gguf(&draft_path)?;
        let tok_fp = tandem_models::backbone::tokenizer_fingerprint_of(&draft_path)?.0;
        let backbone = match tandem_models::backbone::declared_split(&draft_path)? {
            Some(k) => {
                let fp = tandem_models::backbone::fingerprints(&draft_path, Some(k))?;
                Some(BackboneClaim {
                    layers: k as u32,
                    fingerprint: fp.backbone.0,
                })
            }
            None => None,
        };
        let model = if args.strategy != StrategyArg::CloudAr {
            Some(DraftModel::load(&draft_path, &args.gpu)?)
        } else {
            None
        };
        Ok(Prepared {
            runtime,
            drafter_id,
            model,
            tokenizer,
            tok_fp,
            backbone,
        })
    }
}

/// The component, draft model and drafter id to run: `--drafter`/`--draft-model`, or with
/// `--drafter-channel` the store's current bundle (after an update check unless
/// `--no-drafter-updates`; a failed check keeps the current bundle, with a warning).
pub fn resolve_drafter(args: &GenerateArgs) -> anyhow::Result<(PathBuf, String, String)> {
    let file_id = || {
        args.drafter
            .file_name()
            .map_or_else(|| "drafter".into(), |n| n.to_string_lossy().to_string())
    };
    let Some(channel) = &args.drafter_channel else {
        return Ok((args.drafter.clone(), args.draft_model.clone(), file_id()));
    };
    let store = crate::drafter_cmd::Store::open(args.drafter_store.as_deref())?;
    if !args.no_drafter_updates {
        match crate::drafter_cmd::update(&store, &update_args(args, channel), false) {
            Ok(crate::drafter_cmd::Updated::Installed(m)) => {
                eprintln!("tandem: installed drafter {} from {channel}", m.id())
            }
            Ok(_) => {}
            Err(e) => eprintln!("tandem: warning: drafter update check failed: {e:#}"),
        }
    }
    match store.current()? {
        Some(b) => Ok((
            b.component(),
            b.manifest
                .draft_model
                .catalog
                .clone()
                .unwrap_or_else(|| args.draft_model.clone()),
            b.manifest.id(),
        )),
        None => {
            eprintln!(
                "tandem: warning: no drafter installed from {channel} yet; running {}",
                args.drafter.display()
            );
            Ok((args.drafter.clone(), args.draft_model.clone(), file_id()))
        }
    }
}

/// The update options `--drafter-channel` implies.
pub fn update_args(args: &GenerateArgs, channel: &str) -> crate::drafter_cmd::UpdateArgs {
    crate::drafter_cmd::UpdateArgs {
        channel: channel.to_string(),
        family: args
            .target
            .as_ref()
            .map(|t| t.split_once('@').map_or(t.as_str(), |(f, _)| f).to_string()),
        draft_model: Some(args.draft_model.clone()),
        trust_key: args.trust_key.clone(),
        token: args.token.clone(),
        store: args.drafter_store.clone(),
    }
}

/// Runs one generation; streams text to `out` unless quiet.
pub fn run(args: &GenerateArgs, out: &mut dyn Output) -> anyhow::Result<RunStats> {
    if args.strategy == StrategyArg::CloudSd {
        return run_cloud_sd(args, out);
    }
    let prepared = Prepared::new(args)?;
    run_prepared(&prepared, args, out)
}

/// Runs one generation with a prepared component and draft model.
pub fn run_prepared(
    prepared: &Prepared,
    args: &GenerateArgs,
    out: &mut dyn Output,
) -> anyhow::Result<RunStats> {
    let prompt = prepared.tokenizer.encode(&args.prompt)?;
    run_tokens(prepared, args, &prompt, out)
}

/// [`run_prepared`] on a prompt already tokenized (`args.prompt` is not read).
pub fn run_tokens(
    prepared: &Prepared,
    args: &GenerateArgs,
    prompt: &[u32],
    out: &mut dyn Output,
) -> anyhow::Result<RunStats> {
    args.sampling().validate()?;
    if prompt.is_empty() {
        bail!("the prompt is empty: give the text to continue with --prompt");
    }
    let mut driver = SessionDriver::open(prepared, args, prompt)?;
    out.accepted(&driver.conn.accepted)?;
    let mut drafter = driver.start_drafter(prepared, args, prompt, args.max_tokens)?;
    loop {
        match driver.run(&mut drafter, &prepared.tokenizer, out) {
            Ok(()) => break,
            Err(e) if e.is::<Lost>() => {
                if !driver.resume(prepared, args, prompt, &mut drafter, &e, out)? {
                    break;
                }
            }
            Err(e) => return Err(e),
        }
    }
    let stats = driver.finish(drafter, prepared, args)?;
    if let Some(p) = &args.stats_json {
        write_stats(&stats, p)?;
    }
    Ok(stats)
}

fn write_stats(stats: &RunStats, path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(stats)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// One session with the verifier, driven from the host's side: it carries messages
/// between the verifier and the drafter component, measures the link and the draft
/// compute, and collects the committed text.
struct SessionDriver {
    rt: tokio::runtime::Runtime,
    /// The endpoints of `--verifier`, and the one in use.
    endpoints: Vec<Endpoint>,
    at: usize,
    conn: Connection,
    /// Bytes sent and received on earlier (lost) sessions.
    bytes_before: (usize, usize),
    /// Tokens the whole generation may produce (the first session's grant).
    budget: usize,
    /// Sessions resumed after losing the verifier.
    resumes: usize,
    /// Statistics of the drafter instances of earlier sessions.
    earlier: Option<(api::Stats, Duration)>,
    link: LinkState,
    meter: Arc<ComputeMeter>,
    last_reading: MeterReading,
    /// Moving average of the backend's draft step, ms.
    draft_ms: f64,
    watts: f64,
    /// Joules drafted since the last channel sample.
    energy_since: f64,
    started: Instant,
    ttft: Option<Duration>,
    step_time: Duration,
    wait_time: Duration,
    decoder: IncrementalDecoder,
    text: String,
    ids: Vec<u32>,
    quiet: bool,
    /// What the verifier committed in this session: every emitted token is checked
    /// against it.
    ledger: Ledger,
    /// The component, for errors.
    drafter_path: PathBuf,
    /// Steps in a row that returned no action, and how many are allowed.
    idle_steps: usize,
    max_idle_steps: usize,
    /// The output asked to end the generation.
    stopped: bool,
    /// The warm-start entry this session reads and writes (none with --no-warm-start).
    warm_key: Option<crate::warm::Key>,
    /// Whether the drafter started from a warm-start entry.
    warm_used: bool,
    /// When the 16th token was emitted.
    t16: Option<Duration>,
}

/// One session stream with a verifier that accepted it.
struct Connection {
    tx: SessionSender,
    events: mpsc::Receiver<(Instant, Incoming)>,
    bytes_down: Arc<AtomicUsize>,
    accepted: Accepted,
    connect_ms: f64,
}

impl Connection {
    /// Connects, says Hello, sends `history` as the prefill and waits for the verifier to
    /// accept. A refusal with Busy, or any transport failure, is [`Lost`] (another
    /// endpoint may do).
    fn open(
        rt: &tokio::runtime::Runtime,
        ep: &Endpoint,
        prepared: &Prepared,
        args: &GenerateArgs,
        history: &[u32],
        max_tokens: u32,
    ) -> anyhow::Result<Connection> {
        let connecting = Instant::now();
        let client = rt
            .block_on(SessionClient::connect(ep))
            .map_err(|e| lost(format!("{e:#}")))?;
        let connect_ms = connecting.elapsed().as_secs_f64() * 1000.0;
        let (tx, rx) = client.split();
        let (events_tx, events) = mpsc::channel();
        let bytes_down = Arc::new(AtomicUsize::new(0));
        rt.spawn(pump(rx, events_tx, bytes_down.clone()));
        let sent = tx
            .send(&ClientMsg::Hello(Hello {
                tokenizer: prepared.tok_fp,
                backbone: prepared.backbone,
                family: args.target.clone(),
                sampling: args.sampling(),
                max_tokens,
                token: args.token.clone(),
            }))
            .and_then(|_| tx.send(&ClientMsg::Prefill(history.to_vec())));
        sent.map_err(|e| lost(format!("{e:#}")))?;
        let accepted = match next_msg(&events)?.1 {
            ServerMsg::Accepted(a) => a,
            ServerMsg::Error {
                code: code @ (ErrorCode::Busy | ErrorCode::Expired),
                message,
            } => return Err(lost(format!("the verifier refused: {code:?}: {message}"))),
            ServerMsg::Error { code, message } => return Err(Refused { code, message }.into()),
            other => bail!("expected Accepted from the verifier, got {other:?}"),
        };
        Ok(Connection {
            tx,
            events,
            bytes_down,
            accepted,
            connect_ms,
        })
    }
}

/// Tries each endpoint once, from `start` round the list, until one accepts a session with
/// `history`: its index and the connection, or what each endpoint said ([`Lost`] failures
/// only; any other error is returned at once).
fn connect_first(
    rt: &tokio::runtime::Runtime,
    endpoints: &[Endpoint],
    start: usize,
    prepared: &Prepared,
    args: &GenerateArgs,
    history: &[u32],
    max_tokens: u32,
) -> anyhow::Result<Result<(usize, Connection), Vec<String>>> {
    let mut failures = Vec::new();
    for k in 0..endpoints.len() {
        let i = (start + k) % endpoints.len();
        let ep = &endpoints[i];
        match Connection::open(rt, ep, prepared, args, history, max_tokens) {
            Ok(c) => return Ok(Ok((i, c))),
            Err(e) if e.is::<Lost>() => failures.push(format!("{}: {e:#}", ep.addr)),
            Err(e) => return Err(e),
        }
    }
    Ok(Err(failures))
}

/// How long the verifier may stay silent before the generation fails.
const IDLE: Duration = Duration::from_secs(300);

/// Times a generation resumes after losing its verifier before it gives up.
const MAX_RESUMES: usize = 8;

/// Passes over the endpoint list when resuming, and the pause before each pass after the
/// first.
const RESUME_PASSES: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(500),
    Duration::from_secs(2),
];

impl SessionDriver {
    /// Connects to the first endpoint of `--verifier` that accepts, says Hello, sends the
    /// prompt and waits for the verifier to accept.
    fn open(prepared: &Prepared, args: &GenerateArgs, prompt: &[u32]) -> anyhow::Result<Self> {
        let endpoints = endpoints(args)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let started = Instant::now();
        let (at, conn) =
            match connect_first(&rt, &endpoints, 0, prepared, args, prompt, args.max_tokens)? {
                Ok(opened) => opened,
                Err(failures) => {
                    return Err(lost(format!(
                        "no verifier could be reached: {}",
                        failures.join("; ")
                    )));
                }
            };
        let accepted = &conn.accepted;
        let budget = args.max_tokens.min(accepted.max_tokens) as usize;
        Ok(SessionDriver {
            link: LinkState::new(conn.connect_ms, args.uplink_bps),
            meter: Arc::new(ComputeMeter::default()),
            last_reading: MeterReading::default(),
            draft_ms: 0.0,
            watts: args.draft_watts.unwrap_or(0.0) as f64,
            energy_since: 0.0,
            started,
            ttft: None,
            step_time: Duration::ZERO,
            wait_time: Duration::ZERO,
            decoder: IncrementalDecoder::new(),
            text: String::new(),
            ids: Vec::new(),
            quiet: args.quiet,
            ledger: Ledger::new(budget),
            drafter_path: args.drafter.clone(),
            idle_steps: 0,
            max_idle_steps: max_idle_steps(args, accepted),
            stopped: false,
            // Cloud-only rounds draft nothing: there is nothing to warm-start.
            warm_key: (!args.no_warm_start && args.strategy != StrategyArg::CloudAr).then(|| {
                crate::warm::Key {
                    drafter: prepared.runtime.digest.clone(),
                    target: format!("{}@{}", accepted.family, accepted.version),
                    link: endpoints[at].addr.clone(),
                    backend: prepared
                        .model
                        .as_ref()
                        .map_or_else(|| "-".to_string(), DraftModel::backend),
                }
            }),
            warm_used: false,
            t16: None,
            budget,
            rt,
            endpoints,
            at,
            conn,
            bytes_before: (0, 0),
            resumes: 0,
            earlier: None,
        })
    }

    /// After the verifier was lost: opens a new session — on the same endpoint or the
    /// next ones of `--verifier`, a few passes with pauses — whose prefill is the prompt
    /// plus every token emitted so far, and starts a new drafter instance on the same
    /// history. The target continues exactly where it was (its output depends only on the
    /// history). False when nothing was left to generate.
    fn resume(
        &mut self,
        prepared: &Prepared,
        args: &GenerateArgs,
        prompt: &[u32],
        drafter: &mut Drafter,
        why: &anyhow::Error,
        out: &mut dyn Output,
    ) -> anyhow::Result<bool> {
        if self.resumes >= MAX_RESUMES {
            bail!(
                "lost the verifier {} times; giving up: {why:#}",
                self.resumes + 1
            );
        }
        let left = self.budget - self.ids.len().min(self.budget);
        if left == 0 {
            // Everything was printed; only the goodbye was lost.
            let tail = self.decoder.finish(&prepared.tokenizer)?;
            self.write(&tail, out)?;
            return Ok(false);
        }
        let s = drafter.stats()?;
        let guest = drafter.time_in_guest();
        self.earlier = Some(match self.earlier.take() {
            None => (s, guest),
            Some((e, g)) => (add_stats(e, s), g + guest),
        });
        self.bytes_before.0 += self.conn.tx.bytes_up();
        self.bytes_before.1 += self.conn.bytes_down.load(Ordering::Relaxed);
        let history: Vec<u32> = prompt.iter().chain(&self.ids).copied().collect();
        let mut failures = Vec::new();
        for pause in RESUME_PASSES {
            std::thread::sleep(pause);
            let (rt, eps) = (&self.rt, &self.endpoints);
            match connect_first(rt, eps, self.at, prepared, args, &history, left as u32)? {
                Ok((i, conn)) => {
                    eprintln!(
                        "tandem: lost the verifier ({why:#}); resumed on {} after {} tokens",
                        eps[i].addr,
                        self.ids.len()
                    );
                    self.resumes += 1;
                    self.at = i;
                    self.ledger = Ledger::new(left.min(conn.accepted.max_tokens as usize));
                    self.max_idle_steps = max_idle_steps(args, &conn.accepted);
                    self.idle_steps = 0;
                    self.conn = conn;
                    *drafter = self.start_drafter(prepared, args, &history, left as u32)?;
                    return Ok(true);
                }
                Err(f) => failures.extend(f),
            }
        }
        bail!(
            "lost the verifier ({why:#}) and could not resume after {} tokens: {}",
            self.ids.len(),
            failures.join("; ")
        )
    }

    /// Instantiates the drafter component for this session and starts its prefill (which
    /// overlaps the verifier's).
    fn start_drafter(
        &mut self,
        prepared: &Prepared,
        args: &GenerateArgs,
        prompt: &[u32],
        max_tokens: u32,
    ) -> anyhow::Result<Drafter> {
        let config = guest_config(args, &prepared.tokenizer, &self.conn.accepted, max_tokens);
        let limits = GuestLimits {
            memory: args.guest_memory_mb << 20,
            call_timeout: Duration::from_secs_f64(args.guest_timeout),
        };
        let budget = MemoryBudget::new(limits.memory);
        let mut graphs = NamedGraphs::default();
        if args.strategy != StrategyArg::CloudAr {
            let model = prepared
                .model
                .as_ref()
                .context("the draft model was not loaded (prepared for cloud-ar)")?;
            let graph_limits = GraphLimits {
                budget: budget.clone(),
                max_positions: prompt.len()
                    + config.max_tokens as usize
                    + 2 * config.max_draft as usize
                    + 16,
            };
            graphs.insert(
                args.graph_name.clone(),
                model.graph(self.meter.clone(), graph_limits),
            );
        }
        let mut drafter = Drafter::new(&prepared.runtime, graphs, &config, limits, budget)?;
        drafter.prefill(prompt)?;
        if let Some(key) = &self.warm_key
            && let Some(entry) = crate::warm::load(&crate::warm::state_path(), key)
        {
            drafter.handle(&api::Event::Warm(entry.to_event()))?;
            self.warm_used = true;
        }
        Ok(drafter)
    }

    /// Steps the drafter and carries out its actions until it is done.
    fn run(
        &mut self,
        drafter: &mut Drafter,
        tokenizer: &Tokenizer,
        out: &mut dyn Output,
    ) -> anyhow::Result<()> {
        loop {
            self.deliver_pending(drafter)?;
            let step_started = Instant::now();
            let actions = drafter.step()?;
            self.step_time += step_started.elapsed();
            self.read_meter();
            self.idle_steps = if actions.is_empty() {
                self.idle_steps + 1
            } else {
                0
            };
            if self.idle_steps > self.max_idle_steps {
                bail!(
                    "the drafter component {} ran {} steps in a row without sending, emitting \
                     or waiting; it is stopped (a draft step drafts one token)",
                    self.drafter_path.display(),
                    self.idle_steps
                );
            }
            for action in actions {
                match action {
                    api::Action::Send(b) => self.send(b)?,
                    api::Action::Emit(tokens) => {
                        self.emit(&tokens, tokenizer, out)?;
                        if self.stopped {
                            return Ok(());
                        }
                    }
                    api::Action::Wait => {
                        let waiting = Instant::now();
                        let (at, msg) = next_msg(&self.conn.events)?;
                        self.wait_time += waiting.elapsed();
                        self.deliver(drafter, at, msg)?;
                    }
                    api::Action::Done => {
                        let tail = self.decoder.finish(tokenizer)?;
                        self.write(&tail, out)?;
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Everything that arrived goes to the guest before its next step.
    fn deliver_pending(&mut self, drafter: &mut Drafter) -> anyhow::Result<()> {
        loop {
            match self.conn.events.try_recv() {
                Ok((at, Incoming::Msg(m))) => self.deliver(drafter, at, m)?,
                Ok((_, Incoming::End)) => {
                    return Err(lost("the verifier closed the session early"));
                }
                Ok((_, Incoming::Failed(e))) => {
                    return Err(lost(format!("the session with the verifier failed: {e}")));
                }
                Err(_) => return Ok(()),
            }
        }
    }

    fn deliver(
        &mut self,
        drafter: &mut Drafter,
        at: Instant,
        msg: ServerMsg,
    ) -> anyhow::Result<()> {
        self.ledger.observe(&msg);
        self.link
            .deliver(drafter, at, msg, self.draft_ms, &mut self.energy_since)
    }

    /// Updates the draft-step average and the energy drafted from the compute meter.
    fn read_meter(&mut self) {
        let now = self.meter.read();
        let last = self.last_reading;
        if now.steps > last.steps {
            let step = (now.step_time - last.step_time).as_secs_f64() * 1000.0
                / (now.steps - last.steps) as f64;
            self.draft_ms = if self.draft_ms == 0.0 {
                step
            } else {
                self.draft_ms * 0.8 + step * 0.2
            };
        }
        self.energy_since += self.watts * (now.total - last.total).as_secs_f64();
        self.last_reading = now;
    }

    fn send(&mut self, b: api::Block) -> anyhow::Result<()> {
        self.link.sent(b.round, b.tokens.len());
        self.ledger.sent(b.round, &b.tokens);
        self.conn
            .tx
            .send(&ClientMsg::Verify(b.into()))
            .map_err(|e| lost(format!("{e:#}")))
    }

    fn emit(
        &mut self,
        tokens: &[u32],
        tokenizer: &Tokenizer,
        out: &mut dyn Output,
    ) -> anyhow::Result<()> {
        self.ledger.emit(tokens).map_err(|e| {
            anyhow::anyhow!(
                "the drafter component {} {e}: its output is not the target's, so the \
                 generation stops",
                self.drafter_path.display()
            )
        })?;
        self.ttft.get_or_insert_with(|| self.started.elapsed());
        for &t in tokens {
            self.ids.push(t);
            if self.ids.len() == 16 {
                self.t16 = Some(self.started.elapsed());
            }
            let piece = self.decoder.push(tokenizer, t)?;
            self.write(&piece, out)?;
            if self.stopped {
                break;
            }
        }
        Ok(())
    }

    fn write(&mut self, piece: &str, out: &mut dyn Output) -> anyhow::Result<()> {
        if !self.quiet && !out.text(piece)? {
            self.stopped = true;
        }
        self.text.push_str(piece);
        Ok(())
    }

    /// Merges what this session measured into the warm-start state (a failure to write it
    /// is a warning: it is only a cache).
    fn save_warm(&self) {
        let Some(key) = &self.warm_key else {
            return;
        };
        let session = crate::warm::Entry {
            draft_ms: self.draft_ms,
            rtt_ms: if self.link.rtt_seen {
                self.link.rtt_ms
            } else {
                0.0
            },
            verify_ms: self
                .link
                .by_gamma
                .iter()
                .map(|(&gamma, &(rounds, total))| (gamma + 1, total / f64::from(rounds)))
                .collect(),
            acceptance: self.link.positions.clone(),
            updated: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let path = crate::warm::state_path();
        if let Err(e) = crate::warm::save(&path, key, &session) {
            eprintln!(
                "tandem: warning: could not write the warm-start state {}: {e:#}",
                path.display()
            );
        }
    }

    /// Closes the session (waiting for the verifier to end its stream, so every byte it
    /// sent is counted) and gathers the statistics.
    fn finish(
        mut self,
        mut drafter: Drafter,
        prepared: &Prepared,
        args: &GenerateArgs,
    ) -> anyhow::Result<RunStats> {
        let seconds = self.started.elapsed().as_secs_f64();
        let _ = self.conn.tx.send(&ClientMsg::Close);
        self.save_warm();
        let closing = Instant::now() + Duration::from_secs(2);
        while let Some(left) = closing.checked_duration_since(Instant::now()) {
            match self.conn.events.recv_timeout(left) {
                Ok((_, Incoming::Msg(_))) => continue,
                _ => break,
            }
        }
        let (s, guest) = match self.earlier.take() {
            Some((e, g)) => (add_stats(e, drafter.stats()?), g + drafter.time_in_guest()),
            None => (drafter.stats()?, drafter.time_in_guest()),
        };
        let guest_s = guest.as_secs_f64();
        drop(drafter);
        let computed = self.meter.read();
        let n = self.ids.len().max(1) as f64;
        let stats = RunStats {
            strategy: strategy_name(args),
            draft_backend: prepared
                .model
                .as_ref()
                .map_or_else(|| "-".to_string(), DraftModel::backend),
            target: format!(
                "{}@{}",
                self.conn.accepted.family, self.conn.accepted.version
            ),
            resumes: self.resumes,
            tokens: self.ids.len(),
            tokens_per_s: self.ids.len() as f64 / seconds.max(1e-9),
            token_ids: self.ids,
            text: self.text,
            seconds,
            ttft_s: self.ttft.unwrap_or_default().as_secs_f64(),
            t16_s: self.t16.unwrap_or_default().as_secs_f64(),
            warm_start: self.warm_used,
            rounds: s.rounds,
            drafted: s.drafted,
            accepted: s.accepted,
            mean_per_round: if s.rounds > 0 {
                (s.accepted + s.rounds) as f64 / s.rounds as f64
            } else {
                0.0
            },
            drafted_in_flight: s.drafted_in_flight,
            pipelined_kept: s.pipelined_kept,
            hints: s.hints,
            hints_used: s.hints_used,
            hint_kept: s.hint_kept,
            gamma_counts: s.gamma_counts,
            up_bytes_per_token: (self.bytes_before.0 + self.conn.tx.bytes_up()) as f64 / n,
            down_bytes_per_token: (self.bytes_before.1
                + self.conn.bytes_down.load(Ordering::Relaxed))
                as f64
                / n,
            rtt_ms: self.link.rtt_ms,
            draft_ms: self.draft_ms,
            verify_by_gamma: self.link.verify_by_gamma(),
            component_cached: prepared.runtime.from_cache,
            drafter: prepared.drafter_id.clone(),
            drafter_sha256: prepared.runtime.digest.clone(),
            recommended_drafter: self.conn.accepted.drafter.clone(),
            step_s: self.step_time.as_secs_f64(),
            guest_s,
            compute_s: computed.total.as_secs_f64(),
            draft_steps: computed.steps,
            compute_step_ms: computed.step_time.as_secs_f64() * 1e3 / computed.steps.max(1) as f64,
            sandbox_overhead: guest_s / computed.total.as_secs_f64().max(1e-9) - 1.0,
            wait_s: self.wait_time.as_secs_f64(),
            other_s: (seconds - self.step_time.as_secs_f64() - self.wait_time.as_secs_f64())
                .max(0.0),
        };
        self.rt.shutdown_timeout(Duration::from_millis(100));
        Ok(stats)
    }
}

/// The verifier was lost mid-generation (connection closed or failed, silent for [`IDLE`],
/// session expired): the generation can resume in a new session.
#[derive(Debug)]
struct Lost(String);

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Lost {}

fn lost(why: impl Into<String>) -> anyhow::Error {
    Lost(why.into()).into()
}

/// The next message from the verifier, waiting at most [`IDLE`].
fn next_msg(events: &mpsc::Receiver<(Instant, Incoming)>) -> anyhow::Result<(Instant, ServerMsg)> {
    match events.recv_timeout(IDLE) {
        Ok((t, Incoming::Msg(m))) => Ok((t, m)),
        Ok((_, Incoming::End)) => Err(lost("the verifier closed the session")),
        Ok((_, Incoming::Failed(e))) => {
            Err(lost(format!("the session with the verifier failed: {e}")))
        }
        Err(_) => Err(lost(format!("no message from the verifier for {IDLE:?}"))),
    }
}

/// Forwards the verifier's messages, stamped with their arrival time, to the driver's
/// channel, and keeps the count of bytes received.
async fn pump(
    mut rx: SessionReceiver,
    events: mpsc::Sender<(Instant, Incoming)>,
    bytes_down: Arc<AtomicUsize>,
) {
    loop {
        let m = rx.recv().await;
        bytes_down.store(rx.bytes_down, Ordering::Relaxed);
        let (msg, end) = match m {
            Ok(Some(m)) => (Incoming::Msg(m), false),
            Ok(None) => (Incoming::End, true),
            Err(e) => (Incoming::Failed(format!("{e:#}")), true),
        };
        if events.send((Instant::now(), msg)).is_err() || end {
            return;
        }
    }
}

/// Steps in a row without an action that the drafter is allowed: a step drafts at most one
/// token; a block and the one drafted ahead of it take at most 2 × max_draft steps.
fn max_idle_steps(args: &GenerateArgs, accepted: &Accepted) -> usize {
    64 + 8 * args.max_draft.min(accepted.max_draft) as usize
}

/// The drafter statistics of two instances (one generation resumed) added up.
fn add_stats(a: api::Stats, b: api::Stats) -> api::Stats {
    let n = a.gamma_counts.len().max(b.gamma_counts.len());
    let at = |v: &[u32], i: usize| v.get(i).copied().unwrap_or(0);
    api::Stats {
        rounds: a.rounds + b.rounds,
        drafted: a.drafted + b.drafted,
        accepted: a.accepted + b.accepted,
        drafted_in_flight: a.drafted_in_flight + b.drafted_in_flight,
        pipelined_kept: a.pipelined_kept + b.pipelined_kept,
        hints: a.hints + b.hints,
        hints_used: a.hints_used + b.hints_used,
        hint_kept: a.hint_kept + b.hint_kept,
        gamma_counts: (0..n)
            .map(|i| at(&a.gamma_counts, i) + at(&b.gamma_counts, i))
            .collect(),
        alpha: b.alpha,
    }
}

/// The drafter component's configuration: the user's options within the limits the
/// verifier accepted.
fn guest_config(
    args: &GenerateArgs,
    tokenizer: &Tokenizer,
    accepted: &Accepted,
    max_tokens: u32,
) -> api::Config {
    let strategy = match args.strategy {
        StrategyArg::Tandem => api::Strategy::Tandem,
        StrategyArg::Sync => api::Strategy::Sync,
        StrategyArg::CloudAr | StrategyArg::CloudSd => api::Strategy::CloudAr,
    };
    api::Config {
        model: args.graph_name.clone(),
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: max_tokens.min(accepted.max_tokens),
        eos: tokenizer.eos_tokens().to_vec(),
        strategy,
        pipeline: !args.no_pipeline,
        hints: !args.no_hints,
        fixed_gamma: args.gamma,
        max_draft: args.max_draft.min(accepted.max_draft),
        energy_budget: args.energy_budget,
    }
}

/// The cloud-sd baseline: the verifier drafts and verifies by itself; the device only
/// reads the tokens.
fn run_cloud_sd(args: &GenerateArgs, out: &mut dyn Output) -> anyhow::Result<RunStats> {
    let ep = endpoint(args)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let t0 = Instant::now();
    let req = tandem_client::cloud_sd::Request {
        prompt: &args.prompt,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        gamma: args.gamma.unwrap_or(4),
    };
    let got = rt.block_on(tandem_client::cloud_sd::stream(&ep, &req, |piece| {
        if !args.quiet {
            out.text(piece)?;
        }
        Ok(())
    }))?;
    let seconds = t0.elapsed().as_secs_f64();
    let n = got.tokens.max(1) as f64;
    let stats = RunStats {
        strategy: "cloud-sd".into(),
        draft_backend: "-".into(),
        target: got.target,
        tokens: got.tokens,
        text: got.text,
        seconds,
        tokens_per_s: got.tokens as f64 / seconds.max(1e-9),
        ttft_s: got.ttft.as_secs_f64(),
        up_bytes_per_token: got.bytes_up as f64 / n,
        down_bytes_per_token: got.bytes_down as f64 / n,
        wait_s: seconds,
        ..RunStats::default()
    };
    if let Some(p) = &args.stats_json {
        write_stats(&stats, p)?;
    }
    Ok(stats)
}
