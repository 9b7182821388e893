//! The end-to-end sweep: one verifier process (target + server-side draft for cloud-sd),
//! one `tandem generate` process per prompt, strategy and RTT, each pinned to its core,
//! connected through the emulated link.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::link::{Link, LinkKind, Params};
use crate::report;

/// Strategies the sweep can run.
pub const STRATEGIES: [&str; 8] = [
    "cloud-ar",
    "cloud-sd",
    "sync",
    "tandem",
    "tandem-cold",
    "tandem-no-hints",
    "tandem-no-pipeline",
    "tandem-fixed-gamma",
];

/// Options of `tandem-bench e2e`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Prompts: a JSON-lines file with a "prompt" field per line (HumanEval.jsonl), or a
    /// plain JSON array of strings.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Use the first N prompts.
    #[arg(long, default_value_t = 20)]
    pub num_prompts: usize,
    /// Round trip times to sweep, ms.
    #[arg(long, value_delimiter = ',', default_value = "0,20,50,100,200,300")]
    pub rtt_ms: Vec<f64>,
    /// Link rate each way, Mbit/s (0 = unlimited).
    #[arg(long, default_value_t = 10.0)]
    pub rate_mbit: f64,
    /// Jitter of the delay, ms (netem only).
    #[arg(long, default_value_t = 0.0)]
    pub jitter_ms: f64,
    /// Link emulation: netem (namespaces), shaper (in-process proxy) or auto.
    #[arg(long, value_enum, default_value_t = LinkKind::Auto)]
    pub link: LinkKind,
    /// Draft model (catalog name or GGUF path): the device's and the cloud-sd server's.
    #[arg(long, default_value = "qwen2.5-coder-0.5b")]
    pub draft_model: String,
    /// Target model (catalog name or GGUF path).
    #[arg(long, default_value = "qwen2.5-coder-1.5b")]
    pub target_model: String,
    /// Verifier layer for early-exit hints (default: the verifier's: an exit adapter's
    /// layer in the target file, else no hints).
    #[arg(long)]
    pub early_exit_layer: Option<usize>,
    /// New tokens per generation (greedy).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// Strategies to run (cloud-ar is always run: it is the reference).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "cloud-ar,cloud-sd,sync,tandem,tandem-cold,tandem-no-hints,tandem-no-pipeline,tandem-fixed-gamma"
    )]
    pub strategies: Vec<String>,
    /// Draft length of sync, cloud-sd and the fixed-γ ablation.
    #[arg(long, default_value_t = 4)]
    pub gamma: u32,
    /// CPU cores of the verifier and the host ("V,H"), or "none" to not pin.
    #[arg(long, default_value = "0,1")]
    pub cores: String,
    /// Directory holding the `tandem` and `tandem-verifier` binaries (default: this
    /// binary's).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// The drafter component (default: the host's).
    #[arg(long)]
    pub drafter: Option<PathBuf>,
    /// Output directory.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
}

/// One generation's result: the host's `--stats-json` plus where it ran.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Run {
    /// Strategy name of this sweep (not the host's).
    pub sweep_strategy: String,
    /// Nominal RTT of the link, ms.
    pub link_rtt_ms: f64,
    /// Prompt index.
    pub prompt: usize,
    /// The host's statistics.
    #[serde(flatten)]
    pub stats: HostStats,
}

/// The fields of the host's `--stats-json` the report uses.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub struct HostStats {
    pub tokens: usize,
    pub text: String,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub ttft_s: f64,
    pub rounds: u32,
    pub drafted: u32,
    pub accepted: u32,
    pub gamma_counts: Vec<u32>,
    pub up_bytes_per_token: f64,
    pub down_bytes_per_token: f64,
    pub rtt_ms: f64,
    pub draft_ms: f64,
    #[serde(default)]
    pub verify_by_gamma: Vec<VerifyTime>,
    #[serde(default)]
    pub hints_used: u32,
    #[serde(default)]
    pub drafted_in_flight: u32,
    #[serde(default)]
    pub t16_s: f64,
    #[serde(default)]
    pub target: String,
}

/// The verifier's time for blocks of one draft length (from the host's stats).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub struct VerifyTime {
    pub gamma: usize,
    pub rounds: u32,
    pub mean_ms: f64,
}

/// Kills the child when dropped.
pub(crate) struct Guard(pub(crate) Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the sweep and writes the report.
pub fn run(args: &Args) -> anyhow::Result<()> {
    for s in &args.strategies {
        if !STRATEGIES.contains(&s.as_str()) {
            bail!(
                "unknown strategy {s:?}; choose from {}",
                STRATEGIES.join(", ")
            );
        }
    }
    let mut strategies = vec!["cloud-ar".to_string()];
    strategies.extend(args.strategies.iter().filter(|s| *s != "cloud-ar").cloned());
    if args.rtt_ms.iter().any(|r| !(r.is_finite() && *r >= 0.0)) {
        bail!("--rtt-ms takes non-negative numbers of milliseconds");
    }
    let prompts = read_prompts(&args.prompts, args.num_prompts)?;
    let cores = parse_cores(&args.cores)?;
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("locating the binary's directory")?
            .to_path_buf(),
    };
    let tandem = bin_dir.join("tandem");
    let verifier_bin = bin_dir.join("tandem-verifier");
    for b in [&tandem, &verifier_bin] {
        if !b.exists() {
            bail!(
                "{} not found: build the binaries first (`cargo build --release -p tandem-host \
                 -p tandem-verifier`) or point --bin-dir at them",
                b.display()
            );
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let work = args.out.join("e2e-runs");
    std::fs::create_dir_all(&work)?;
    // Every sweep starts without warm-start state; its runs build it up as they go.
    let _ = std::fs::remove_file(work.join("policy-state.json"));

    let (mut link, fallback) = Link::new(args.link)?;
    if let Some(why) = &fallback {
        eprintln!("link: netem unavailable ({why}); using the in-process shaper");
    }
    eprintln!("link: {}", link.describe());

    // The verifier: target for every strategy, the draft model for cloud-sd.
    let mut cmd = command(&link.prefix(true), cores.map(|c| c.0), &verifier_bin);
    cmd.args(["serve", "--listen", &link.verifier_listen()])
        .args(["--target", &args.target_model])
        .args(["--max-draft", "32", "--idle-timeout", "600"]);
    if strategies.iter().any(|s| s == "cloud-sd") {
        cmd.args(["--draft", &args.draft_model]);
    }
    if let Some(l) = args.early_exit_layer {
        cmd.args(["--early-exit-layer", &l.to_string()]);
    }
    let log = args.out.join("e2e-verifier.log");
    cmd.stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .env("RUST_LOG", "warn");
    eprintln!("starting the verifier (log: {})", log.display());
    let mut verifier = Guard(cmd.spawn().context("starting tandem-verifier")?);
    let verifier_addr = wait_listening(&mut verifier.0, &log)?;

    let started = Instant::now();
    let total = args.rtt_ms.len() * prompts.len() * strategies.len();
    let mut done = 0;
    let mut runs = Vec::new();
    for &rtt in &args.rtt_ms {
        let dial = link.point(
            Params {
                rtt_ms: rtt,
                jitter_ms: args.jitter_ms,
                rate_bps: (args.rate_mbit * 1e6) as u64,
            },
            verifier_addr,
        )?;
        // Prompt-major order: the strategies of a prompt run back to back, so slow
        // drifts of a shared machine hit them alike.
        for (pi, prompt) in prompts.iter().enumerate() {
            for s in &strategies {
                let stats = generate(args, &link, cores, &tandem, dial, s, prompt, &work)
                    .with_context(|| format!("{s} at RTT {rtt} ms on prompt {pi}"))?;
                done += 1;
                eprintln!(
                    "[{done}/{total} {:.0}s] RTT {rtt} ms, prompt {}/{}, {s}: {} tokens, \
                     {:.2} tok/s, {:.2} per round",
                    started.elapsed().as_secs_f64(),
                    pi + 1,
                    prompts.len(),
                    stats.tokens,
                    stats.tokens_per_s,
                    if stats.rounds > 0 {
                        stats.tokens as f64 / stats.rounds as f64
                    } else {
                        0.0
                    }
                );
                runs.push(Run {
                    sweep_strategy: s.clone(),
                    link_rtt_ms: rtt,
                    prompt: pi,
                    stats,
                });
            }
        }
    }
    drop(verifier);
    let meta = report::Meta {
        link: link.describe().to_string(),
        netem_unavailable: fallback,
        rate_mbit: args.rate_mbit,
        jitter_ms: args.jitter_ms,
        draft_model: args.draft_model.clone(),
        target_model: args.target_model.clone(),
        prompts: args.prompts.display().to_string(),
        num_prompts: prompts.len(),
        max_tokens: args.max_tokens,
        gamma: args.gamma,
        cores: args.cores.clone(),
        early_exit_layer: args.early_exit_layer,
        machine: report::machine(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        wall_s: started.elapsed().as_secs_f64(),
    };
    drop(link);
    let mismatches = report::write(&args.out, meta, &strategies, runs)?;
    if mismatches > 0 {
        bail!(
            "{mismatches} generation(s) differ from cloud-ar's text: the run is not lossless \
             (see \"mismatches\" in {})",
            args.out.join("e2e.json").display()
        );
    }
    Ok(())
}

/// One `tandem generate` run; returns its statistics.
#[allow(clippy::too_many_arguments)]
fn generate(
    args: &Args,
    link: &Link,
    cores: Option<(usize, usize)>,
    tandem: &Path,
    dial: SocketAddr,
    strategy: &str,
    prompt: &str,
    work: &Path,
) -> anyhow::Result<HostStats> {
    let stats_path = work.join(format!("{strategy}.json"));
    let _ = std::fs::remove_file(&stats_path);
    let mut cmd = command(&link.prefix(false), cores.map(|c| c.1), tandem);
    let gamma = args.gamma.to_string();
    cmd.arg("generate")
        .args(["--verifier", &format!("http://{dial}")])
        .args(["--draft-model", &args.draft_model])
        .args(["--prompt", prompt])
        .args(["--max-tokens", &args.max_tokens.to_string()])
        .arg("--stats-json")
        .arg(&stats_path)
        .arg("--quiet")
        // The sweep's own warm-start state: what earlier runs of this sweep measured.
        .env("TANDEM_POLICY_STATE", work.join("policy-state.json"));
    if let Some(d) = &args.drafter {
        cmd.arg("--drafter").arg(d);
    }
    match strategy {
        "cloud-ar" => cmd.args(["--strategy", "cloud-ar"]),
        "cloud-sd" => cmd.args(["--strategy", "cloud-sd", "--gamma", &gamma]),
        "sync" => cmd.args(["--strategy", "sync", "--gamma", &gamma, "--no-hints"]),
        "tandem" => cmd.args(["--strategy", "tandem"]),
        "tandem-cold" => cmd.args(["--strategy", "tandem", "--no-warm-start"]),
        "tandem-no-hints" => cmd.args(["--strategy", "tandem", "--no-hints"]),
        "tandem-no-pipeline" => cmd.args(["--strategy", "tandem", "--no-pipeline"]),
        "tandem-fixed-gamma" => cmd.args(["--strategy", "tandem", "--gamma", &gamma]),
        other => bail!("internal: strategy {other}"),
    };
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("starting tandem generate")?;
    if !out.status.success() {
        bail!(
            "tandem generate failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let json = std::fs::read_to_string(&stats_path)
        .with_context(|| format!("reading {}", stats_path.display()))?;
    serde_json::from_str(&json).with_context(|| format!("parsing {}", stats_path.display()))
}

/// `prefix… [taskset -c CORE] program`.
fn command(prefix: &[String], core: Option<usize>, program: &Path) -> Command {
    let mut parts: Vec<std::ffi::OsString> = prefix.iter().map(Into::into).collect();
    if let Some(c) = core {
        parts.extend(["taskset".into(), "-c".into(), c.to_string().into()]);
    }
    parts.push(program.into());
    let mut cmd = Command::new(&parts[0]);
    cmd.args(&parts[1..]);
    cmd
}

fn parse_cores(s: &str) -> anyhow::Result<Option<(usize, usize)>> {
    if s == "none" {
        return Ok(None);
    }
    let bad = || anyhow::anyhow!("--cores takes two core numbers \"V,H\" or \"none\", not {s:?}");
    let (v, h) = s.split_once(',').ok_or_else(bad)?;
    let (v, h): (usize, usize) = (
        v.trim().parse().map_err(|_| bad())?,
        h.trim().parse().map_err(|_| bad())?,
    );
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if v == h || v >= n || h >= n {
        bail!("--cores {s}: need two different cores below {n} (this machine has {n})");
    }
    if Command::new("taskset").arg("-V").output().is_err() {
        bail!("--cores needs taskset (Debian: util-linux); or pass --cores none");
    }
    Ok(Some((v, h)))
}

/// Waits for the verifier's "listening on" line; its address.
pub(crate) fn wait_listening(child: &mut Child, log: &Path) -> anyhow::Result<SocketAddr> {
    let stdout = child.stdout.take().context("verifier stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(url) = line.split("listening on ").nth(1) {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    let url = rx.recv_timeout(Duration::from_secs(900)).map_err(|_| {
        let tail = std::fs::read_to_string(log).unwrap_or_default();
        anyhow::anyhow!("the verifier did not start; its log:\n{}", tail.trim())
    })?;
    let hostport = url.rsplit("://").next().unwrap_or(&url);
    hostport
        .parse()
        .with_context(|| format!("the verifier printed an odd address {url:?}"))
}

/// The first `n` prompts of a JSON-lines file (field "prompt") or a JSON array of strings.
pub fn read_prompts(path: &Path, n: usize) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading prompts from {}", path.display()))?;
    let prompts: Vec<String> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text)
            .with_context(|| format!("{}: expected a JSON array of strings", path.display()))?
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let v: serde_json::Value = serde_json::from_str(l)
                    .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
                v["prompt"].as_str().map(str::to_string).with_context(|| {
                    format!("{}:{}: no string field \"prompt\"", path.display(), i + 1)
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    if prompts.is_empty() || n == 0 {
        bail!("{}: no prompts to run", path.display());
    }
    Ok(prompts.into_iter().take(n).collect())
}
