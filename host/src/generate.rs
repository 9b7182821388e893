//! `tandem generate`: the drafter component drafts, the verifier verifies, the host carries
//! messages between them, measures the link and streams the text.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tandem_core::protocol::{
    BackboneClaim, ClientMsg, Hello, Outcome, ServerMsg, Verify, WireSampling,
};
use tandem_core::sampling::SamplingParams;
use tandem_models::{IncrementalDecoder, Tokenizer};
use tandem_verifier::{Endpoint, SessionClient};

use crate::component::{Drafter, GuestLimits, Runtime, api};
use crate::nn::{ComputeMeter, DraftModel, NamedGraphs};

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
    /// Verifier address: http://HOST:PORT (h2c) or https://HOST:PORT (TLS).
    #[arg(long)]
    pub verifier: String,
    /// The drafter component (.wasm).
    #[arg(long, default_value_os_t = default_drafter())]
    pub drafter: PathBuf,
    /// Draft model: catalog name or GGUF path.
    #[arg(long)]
    pub draft_model: String,
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
    /// Where the draft model runs: auto (the first hardware GPU, else the CPU), off (the
    /// CPU), or part of an adapter's name (`tandem gpu list`), e.g. llvmpipe.
    #[arg(long, default_value = "auto")]
    pub gpu: tandem_gpu::GpuChoice,
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
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunStats {
    /// Strategy.
    pub strategy: String,
    /// Where the draft model ran: `cpu` or the GPU adapter's name (`-` for cloud strategies).
    pub draft_backend: String,
    /// Target family@version that verified.
    pub target: String,
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
                }
                drafter.handle(&api::Event::Channel(api::ChannelSample {
                    rtt_ms: self.rtt_ms as f32,
                    bandwidth_bps: self.uplink_bps,
                    verify_ms: self.verify_ms as f32,
                    draft_ms: draft_ms as f32,
                    energy_j: *energy as f32,
                }))?;
                *energy = 0.0;
                let (token, residual) = match r.outcome {
                    Outcome::Token(t) => (Some(t), Vec::new()),
                    Outcome::Residual(top) => (None, top),
                };
                drafter.handle(&api::Event::Verdict(api::VerifyResult {
                    round: r.round,
                    accepted: r.accepted,
                    token,
                    residual,
                }))
            }
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
        format!(
            "[{}] {} tokens in {:.2} s: {:.1} tok/s, first token {:.0} ms | {:.2} tokens/round over {} rounds, {}/{} drafts accepted | γ {} | hints {} ({} used) | up {:.1} B/token, down {:.1} B/token | rtt ≈ {:.0} ms, draft step {:.1} ms ({})",
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

fn endpoint(args: &GenerateArgs) -> anyhow::Result<Endpoint> {
    let (tls, rest) = if let Some(r) = args.verifier.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = args.verifier.strip_prefix("http://") {
        (false, r)
    } else {
        (false, args.verifier.as_str())
    };
    let addr = rest.trim_end_matches('/').to_string();
    if addr.is_empty() || !addr.contains(':') {
        bail!(
            "bad --verifier `{}`: expected http://HOST:PORT or https://HOST:PORT",
            args.verifier
        );
    }
    let tls = if tls {
        let ca = args.tls_ca.clone().context(
            "an https:// verifier needs --tls-ca FILE.pem (the CA that signed its certificate)",
        )?;
        let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
        Some((ca, host.trim_matches(['[', ']']).to_string()))
    } else {
        None
    };
    Ok(Endpoint {
        addr,
        tls,
        bearer: args.token.clone(),
    })
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
    model: Option<DraftModel>,
    /// The draft model's tokenizer (the target's, by fingerprint).
    pub tokenizer: Tokenizer,
    tok_fp: [u8; 32],
    backbone: Option<BackboneClaim>,
}

impl Prepared {
    /// Loads the component and the draft model named by `args`.
    pub fn new(args: &GenerateArgs) -> anyhow::Result<Prepared> {
        let draft_path = tandem_models::fetch::resolve(&args.draft_model)
            .with_context(|| format!("draft model `{}`", args.draft_model))?;
        let runtime = Runtime::load(&args.drafter)?;
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
            model,
            tokenizer,
            tok_fp,
            backbone,
        })
    }
}

/// Runs one generation; streams text to `out` unless quiet.
pub fn run(args: &GenerateArgs, out: &mut dyn Write) -> anyhow::Result<RunStats> {
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
    out: &mut dyn Write,
) -> anyhow::Result<RunStats> {
    let ep = endpoint(args)?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    params.validate()?;
    let runtime = &prepared.runtime;
    let tokenizer = &prepared.tokenizer;
    let prompt = tokenizer.encode(&args.prompt)?;
    if prompt.is_empty() {
        bail!("the prompt is empty: give the text to continue with --prompt");
    }
    let meter = Arc::new(ComputeMeter::default());
    let mut graphs = NamedGraphs::default();
    if args.strategy != StrategyArg::CloudAr {
        let model = prepared
            .model
            .as_ref()
            .context("the draft model was not loaded (prepared for cloud-ar)")?;
        graphs.insert(args.graph_name.clone(), model.graph(meter.clone()));
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let client = rt.block_on(SessionClient::connect(&ep))?;
    let connect_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (tx, mut rx) = client.split();
    let (ev_tx, ev_rx) = mpsc::channel::<(Instant, Incoming)>();
    let down = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let down_r = down.clone();
    rt.spawn(async move {
        loop {
            let m = rx.recv().await;
            down_r.store(rx.bytes_down, std::sync::atomic::Ordering::Relaxed);
            let (msg, end) = match m {
                Ok(Some(m)) => (Incoming::Msg(m), false),
                Ok(None) => (Incoming::End, true),
                Err(e) => (Incoming::Failed(format!("{e:#}")), true),
            };
            if ev_tx.send((Instant::now(), msg)).is_err() || end {
                break;
            }
        }
    });

    let t0 = Instant::now();
    tx.send(&ClientMsg::Hello(Hello {
        tokenizer: prepared.tok_fp,
        backbone: prepared.backbone,
        family: None,
        sampling: WireSampling {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
        },
        max_tokens: args.max_tokens,
        token: args.token.clone(),
    }))?;
    tx.send(&ClientMsg::Prefill(prompt.clone()))?;
    let wait_msg = |timeout: Duration| -> anyhow::Result<(Instant, ServerMsg)> {
        match ev_rx.recv_timeout(timeout) {
            Ok((t, Incoming::Msg(m))) => Ok((t, m)),
            Ok((_, Incoming::End)) => bail!("the verifier closed the session"),
            Ok((_, Incoming::Failed(e))) => bail!("the session with the verifier failed: {e}"),
            Err(_) => bail!("no message from the verifier for {timeout:?}"),
        }
    };
    let accepted = match wait_msg(Duration::from_secs(300))?.1 {
        ServerMsg::Accepted(a) => a,
        ServerMsg::Error { code, message } => bail!("the verifier refused: {code:?}: {message}"),
        other => bail!("expected Accepted from the verifier, got {other:?}"),
    };
    let strategy = match args.strategy {
        StrategyArg::Tandem => api::Strategy::Tandem,
        StrategyArg::Sync => api::Strategy::Sync,
        StrategyArg::CloudAr => api::Strategy::CloudAr,
        StrategyArg::CloudSd => unreachable!("cloud-sd runs without the component"),
    };
    let config = api::Config {
        model: args.graph_name.clone(),
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: args.max_tokens.min(accepted.max_tokens),
        eos: tokenizer.eos_tokens().to_vec(),
        strategy,
        pipeline: !args.no_pipeline,
        hints: !args.no_hints,
        fixed_gamma: args.gamma,
        max_draft: args.max_draft.min(accepted.max_draft),
        energy_budget: args.energy_budget,
    };
    let limits = GuestLimits {
        memory: args.guest_memory_mb << 20,
        call_timeout: Duration::from_secs_f64(args.guest_timeout),
    };
    let mut drafter = Drafter::new(runtime, graphs, &config, limits)?;
    // The draft model's prefill overlaps the verifier's.
    drafter.prefill(&prompt)?;

    let mut decoder = IncrementalDecoder::new();
    let mut text = String::new();
    let mut ids = Vec::new();
    let mut ttft = None;
    let mut link = LinkState::new(connect_ms, args.uplink_bps);
    let mut last_reading = meter.read();
    let mut draft_ms = 0.0;
    let watts = args.draft_watts.unwrap_or(0.0) as f64;
    let mut energy_since = 0.0;

    let idle = Duration::from_secs(300);
    let mut step_time = Duration::ZERO;
    let mut wait_time = Duration::ZERO;
    'run: loop {
        // Everything that arrived goes to the guest before its next step.
        loop {
            match ev_rx.try_recv() {
                Ok((at, Incoming::Msg(m))) => {
                    link.deliver(&mut drafter, at, m, draft_ms, &mut energy_since)?
                }
                Ok((_, Incoming::End)) => bail!("the verifier closed the session early"),
                Ok((_, Incoming::Failed(e))) => bail!("the session with the verifier failed: {e}"),
                Err(_) => break,
            }
        }
        let step_started = Instant::now();
        let actions = drafter.step()?;
        step_time += step_started.elapsed();
        let now = meter.read();
        if now.steps > last_reading.steps {
            let step = (now.step_time - last_reading.step_time).as_secs_f64() * 1000.0
                / (now.steps - last_reading.steps) as f64;
            draft_ms = if draft_ms == 0.0 {
                step
            } else {
                draft_ms * 0.8 + step * 0.2
            };
        }
        energy_since += watts * (now.total - last_reading.total).as_secs_f64();
        last_reading = now;
        for a in actions {
            match a {
                api::Action::Send(b) => {
                    link.sent(b.round, b.tokens.len());
                    tx.send(&ClientMsg::Verify(Verify {
                        round: b.round,
                        pos: b.pos,
                        prev: b.prev,
                        tokens: b.tokens,
                        q: b.q,
                    }))?;
                }
                api::Action::Emit(tokens) => {
                    if ttft.is_none() {
                        ttft = Some(t0.elapsed());
                    }
                    for t in tokens {
                        ids.push(t);
                        let piece = decoder.push(tokenizer, t)?;
                        if !args.quiet {
                            out.write_all(piece.as_bytes())?;
                            out.flush()?;
                        }
                        text.push_str(&piece);
                    }
                }
                api::Action::Wait => {
                    let wait_started = Instant::now();
                    let (at, m) = wait_msg(idle)?;
                    wait_time += wait_started.elapsed();
                    link.deliver(&mut drafter, at, m, draft_ms, &mut energy_since)?;
                }
                api::Action::Done => break 'run,
            }
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let tail = decoder.finish(tokenizer)?;
    if !args.quiet {
        out.write_all(tail.as_bytes())?;
        out.flush()?;
    }
    text.push_str(&tail);
    let _ = tx.send(&ClientMsg::Close);
    let s = drafter.stats()?;
    let n = ids.len().max(1) as f64;
    let computed = meter.read();
    let guest_s = drafter.time_in_guest().as_secs_f64();
    // Let the reader record the last bytes.
    std::thread::sleep(Duration::from_millis(5));
    let stats = RunStats {
        strategy: strategy_name(args),
        draft_backend: prepared
            .model
            .as_ref()
            .map_or_else(|| "-".to_string(), DraftModel::backend),
        target: format!("{}@{}", accepted.family, accepted.version),
        tokens: ids.len(),
        token_ids: ids.clone(),
        text,
        seconds,
        tokens_per_s: ids.len() as f64 / seconds.max(1e-9),
        ttft_s: ttft.unwrap_or_default().as_secs_f64(),
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
        up_bytes_per_token: tx.bytes_up() as f64 / n,
        down_bytes_per_token: down.load(std::sync::atomic::Ordering::Relaxed) as f64 / n,
        rtt_ms: link.rtt_ms,
        draft_ms,
        verify_by_gamma: link.verify_by_gamma(),
        component_cached: runtime.from_cache,
        step_s: step_time.as_secs_f64(),
        guest_s,
        compute_s: computed.total.as_secs_f64(),
        draft_steps: computed.steps,
        compute_step_ms: computed.step_time.as_secs_f64() * 1e3 / computed.steps.max(1) as f64,
        sandbox_overhead: guest_s / computed.total.as_secs_f64().max(1e-9) - 1.0,
        wait_s: wait_time.as_secs_f64(),
        other_s: (seconds - step_time.as_secs_f64() - wait_time.as_secs_f64()).max(0.0),
    };
    drop(drafter);
    rt.shutdown_timeout(Duration::from_millis(100));
    if let Some(p) = &args.stats_json {
        std::fs::write(p, serde_json::to_string_pretty(&stats)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(stats)
}

/// The cloud-sd baseline: the verifier drafts and verifies by itself (`"speculative": true`
/// completions, SSE); the device only reads the tokens.
fn run_cloud_sd(args: &GenerateArgs, out: &mut dyn Write) -> anyhow::Result<RunStats> {
    use http_body_util::BodyExt;
    let ep = endpoint(args)?;
    if ep.tls.is_some() {
        bail!("cloud-sd talks plain HTTP/1.1 to the verifier; use an http:// address");
    }
    let body = serde_json::json!({
        "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
        "top_p": args.top_p, "seed": args.seed, "stream": true, "speculative": true,
        "gamma": args.gamma.unwrap_or(4),
    })
    .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let t0 = Instant::now();
    let up = body.len();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&ep.addr)
            .await
            .with_context(|| format!("connecting to the verifier at {}", ep.addr))?;
        tcp.set_nodelay(true)?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let mut req = hyper::Request::post("/v1/completions")
            .header("host", &ep.addr)
            .header("content-type", "application/json");
        if let Some(t) = &ep.bearer {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = send
            .send_request(req.body(http_body_util::Full::new(bytes::Bytes::from(body)))?)
            .await?;
        let status = resp.status();
        let mut resp_body = resp.into_body();
        let mut buf = Vec::new();
        let mut text = String::new();
        let mut down = 0usize;
        let mut ttft = None;
        let mut tokens = 0usize;
        let mut target = String::new();
        while let Some(frame) = resp_body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            down += data.len();
            buf.extend_from_slice(&data);
            if !status.is_success() {
                continue;
            }
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = buf.drain(..end + 2).collect();
                let event = String::from_utf8_lossy(&event);
                let Some(data) = event.trim().strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(data)?;
                if let Some(m) = v["error"]["message"].as_str() {
                    bail!("the verifier failed: {m}");
                }
                target = v["model"].as_str().unwrap_or_default().to_string();
                let piece = v["choices"][0]["text"].as_str().unwrap_or_default();
                if !piece.is_empty() {
                    ttft.get_or_insert_with(|| t0.elapsed());
                    if !args.quiet {
                        out.write_all(piece.as_bytes())?;
                        out.flush()?;
                    }
                    text.push_str(piece);
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    tokens = n as usize;
                }
            }
        }
        if !status.is_success() {
            bail!(
                "the verifier refused the cloud-sd request: HTTP {status}: {}",
                String::from_utf8_lossy(&buf)
            );
        }
        let seconds = t0.elapsed().as_secs_f64();
        let n = tokens.max(1) as f64;
        let stats = RunStats {
            strategy: "cloud-sd".into(),
            draft_backend: "-".into(),
            target,
            tokens,
            token_ids: Vec::new(),
            text,
            seconds,
            tokens_per_s: tokens as f64 / seconds.max(1e-9),
            ttft_s: ttft.unwrap_or_default().as_secs_f64(),
            rounds: 0,
            drafted: 0,
            accepted: 0,
            mean_per_round: 0.0,
            drafted_in_flight: 0,
            pipelined_kept: 0,
            hints: 0,
            hints_used: 0,
            hint_kept: 0,
            gamma_counts: Vec::new(),
            up_bytes_per_token: up as f64 / n,
            down_bytes_per_token: down as f64 / n,
            rtt_ms: 0.0,
            draft_ms: 0.0,
            verify_by_gamma: Vec::new(),
            component_cached: false,
            step_s: 0.0,
            guest_s: 0.0,
            compute_s: 0.0,
            draft_steps: 0,
            compute_step_ms: 0.0,
            sandbox_overhead: 0.0,
            wait_s: seconds,
            other_s: 0.0,
        };
        if let Some(p) = &args.stats_json {
            std::fs::write(p, serde_json::to_string_pretty(&stats)? + "\n")
                .with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(stats)
    })
}
