//! `tandem-bench evolve`: a target upgraded on a frozen backbone while devices keep their
//! drafter (docs/benchmarks.md, "Evolving targets on a frozen backbone").
//!
//! Trains v2 from v1 on the new domain (`tandem train target`, blocks from K up), and a
//! shared-backbone drafter at K against v1 (`tandem train drafter`) unless given. Then one
//! verifier process serves v1; the host (`tandem generate`, another process, over the
//! in-process link shaper) runs the same greedy prompts with cloud-ar and with the drafter at
//! a fixed γ against v1; v2 is loaded through `POST /admin/targets` while sessions are in
//! flight (they finish on v1, new ones get v2, none may fail); then the same prompts against
//! v2. Writes `evolve.json` and `evolve.md`. Fails if a speculative text differs from its
//! target's cloud-ar text or a session of the swap fails.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tandem_train::{Kind, target};

use crate::e2e::{Guard, HostStats, read_prompts, wait_listening};
use crate::link::{Link, LinkKind, Params};

/// Options of `tandem-bench evolve`.
#[derive(clap::Args)]
pub struct Args {
    /// v1: the target the devices' drafter was made for (catalog name or GGUF path).
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// K: blocks of the shared backbone; v2 trains the blocks from K up.
    #[arg(long, default_value_t = 15)]
    pub layer: usize,
    /// The devices' drafter: a shared-backbone drafter GGUF split at K (default: trained
    /// with `tandem train drafter` defaults into OUT/evolve, or reused from there).
    #[arg(long)]
    pub drafter: Option<PathBuf>,
    /// v2 (default: trained into OUT/evolve/v2.gguf, or reused from there with its report).
    #[arg(long)]
    pub v2: Option<PathBuf>,
    /// Steps of `train target` when v2 is trained here.
    #[arg(long, default_value_t = 100)]
    pub train_steps: usize,
    /// Training tokens of `train target` when v2 is trained here.
    #[arg(long, default_value_t = 32_768)]
    pub train_tokens: usize,
    /// Prompts: JSON lines with a "prompt" field (HumanEval.jsonl) or a JSON array.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Use the first N prompts.
    #[arg(long, default_value_t = 10)]
    pub num_prompts: usize,
    /// New tokens per generation (greedy).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Round trip time of the emulated link, ms.
    #[arg(long, default_value_t = 100.0)]
    pub rtt_ms: f64,
    /// Link rate each way, Mbit/s (0 = unlimited).
    #[arg(long, default_value_t = 10.0)]
    pub rate_mbit: f64,
    /// Draft length (fixed).
    #[arg(long, default_value_t = 4)]
    pub gamma: u32,
    /// Sessions in flight when v2 is loaded, and new sessions started after it.
    #[arg(long, default_value_t = 3)]
    pub swap_sessions: usize,
    /// CPU cores of the verifier and the host ("V,H"), or "none".
    #[arg(long, default_value = "0,1")]
    pub cores: String,
    /// Output directory.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
}

/// One target version's measurements.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Version {
    /// `family@version` the sessions were served by.
    pub target: String,
    /// Accepted drafts / drafted tokens (greedy, same prompts).
    pub acceptance: f64,
    /// New tokens per verification round with the drafter.
    pub tokens_per_round: f64,
    /// Tokens per second with the drafter.
    pub drafter_tokens_per_s: f64,
    /// Tokens per second with cloud-ar (every token from the verifier).
    pub cloud_ar_tokens_per_s: f64,
    /// drafter / cloud-ar tokens per second.
    pub speedup: f64,
    /// Held-out next-token loss on the new domain (the trainer's report), nats.
    pub loss_new_domain: Option<f64>,
    /// Held-out next-token loss on the old domain, nats.
    pub loss_old_domain: Option<f64>,
    /// Generations whose speculative text differs from cloud-ar's.
    pub mismatches: usize,
}

/// What happened while v2 was loaded.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Swap {
    /// Sessions on v1 when the load request was sent.
    pub in_flight_at_load: usize,
    /// Seconds `POST /admin/targets` took.
    pub load_s: f64,
    /// Sessions started before the load that were served by v1 to the end.
    pub old_on_v1: usize,
    /// Sessions started after the load that were served by v2.
    pub new_on_v2: usize,
    /// Sessions of the swap that failed (exit status or wrong version).
    pub failed: usize,
}

/// The report (`evolve.json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// v1's file.
    pub v1_model: String,
    /// v2's file.
    pub v2_model: String,
    /// The drafter's file.
    pub drafter: String,
    /// Backbone blocks.
    pub layer: usize,
    /// Whether v1 and v2 have the same tokenizer fingerprint and backbone fingerprint at K.
    pub fingerprints_equal: bool,
    /// v1's acceptance (accepted / drafted).
    pub v1_acceptance: f64,
    /// v2's acceptance, same drafter, same prompts.
    pub v2_acceptance: f64,
    /// v2 / v1 acceptance (goal ≥ 0.9).
    pub acceptance_ratio: f64,
    /// Sessions that failed during the swap.
    pub failed_requests: usize,
    /// v1's table row.
    pub v1: Version,
    /// v2's table row.
    pub v2: Version,
    /// The swap.
    pub swap: Swap,
    /// The trainer's report for v2, when it was trained (or reused) here.
    pub v2_training: Option<serde_json::Value>,
    /// Prompts, tokens, γ, RTT, rate.
    pub num_prompts: usize,
    #[allow(missing_docs)]
    pub max_tokens: u32,
    #[allow(missing_docs)]
    pub gamma: u32,
    #[allow(missing_docs)]
    pub rtt_ms: f64,
    #[allow(missing_docs)]
    pub rate_mbit: f64,
    /// CPU and cores.
    pub machine: String,
    /// The command line.
    pub command: String,
    /// Seconds of the whole run.
    pub wall_s: f64,
}

/// A blocking HTTP/1.1 request with a JSON body: status code and body.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let mut tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    tcp.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("odd HTTP response {:?}", resp.lines().next()))?;
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // Chunked bodies: the JSON is between the size lines; keep from the first brace.
    let body = body
        .find(['{', '['])
        .map_or(body, |i| &body[i..])
        .trim_end_matches(|c: char| c != '}' && c != ']');
    Ok((code, body.to_string()))
}

/// Sessions the verifier's target `id` is serving now.
fn active_on(addr: SocketAddr, id: &str) -> anyhow::Result<usize> {
    let (code, body) = http(addr, "GET", "/admin/targets", "")?;
    if code != 200 {
        bail!("GET /admin/targets answered {code}: {body}");
    }
    let v: serde_json::Value = serde_json::from_str(&body)
        .with_context(|| format!("GET /admin/targets: not JSON: {body}"))?;
    let list = v
        .as_array()
        .or_else(|| v["targets"].as_array())
        .context("GET /admin/targets: no list")?;
    Ok(list
        .iter()
        .filter(|t| {
            format!(
                "{}@{}",
                t["family"].as_str().unwrap_or(""),
                t["version"].as_str().unwrap_or("")
            ) == id
        })
        .map(|t| t["active_sessions"].as_u64().unwrap_or(0) as usize)
        .sum())
}

struct Host<'a> {
    tandem: PathBuf,
    link: &'a Link,
    core: Option<usize>,
    dial: SocketAddr,
    drafter: PathBuf,
    max_tokens: u32,
    gamma: u32,
    work: PathBuf,
}

impl Host<'_> {
    /// Starts `tandem generate` against `target`: with the drafter at a fixed γ when `spec`,
    /// else cloud-ar; its statistics go to `WORK/{name}.json`.
    fn spawn(
        &self,
        prompt: &str,
        target: &str,
        spec: bool,
        name: &str,
    ) -> anyhow::Result<(Child, PathBuf)> {
        let stats = self.work.join(format!("{name}.json"));
        let _ = std::fs::remove_file(&stats);
        let mut parts: Vec<String> = self.link.prefix(false);
        if let Some(c) = self.core {
            parts.extend(["taskset".into(), "-c".into(), c.to_string()]);
        }
        let mut cmd = Command::new(if parts.is_empty() {
            self.tandem.as_os_str().to_owned()
        } else {
            parts[0].clone().into()
        });
        if !parts.is_empty() {
            cmd.args(&parts[1..]).arg(&self.tandem);
        }
        cmd.arg("generate")
            .args(["--verifier", &format!("http://{}", self.dial)])
            .arg("--draft-model")
            .arg(&self.drafter)
            .args(["--target", target])
            .args(["--prompt", prompt])
            .args(["--max-tokens", &self.max_tokens.to_string()])
            .arg("--stats-json")
            .arg(&stats)
            .arg("--quiet")
            .env("TANDEM_POLICY_STATE", self.work.join("policy-state.json"));
        if spec {
            cmd.args(["--strategy", "tandem", "--gamma", &self.gamma.to_string()]);
        } else {
            cmd.args(["--strategy", "cloud-ar"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tandem generate")?;
        Ok((child, stats))
    }

    fn finish(child: Child, stats: &Path) -> anyhow::Result<HostStats> {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "tandem generate failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let json = std::fs::read_to_string(stats)
            .with_context(|| format!("reading {}", stats.display()))?;
        serde_json::from_str(&json).with_context(|| format!("parsing {}", stats.display()))
    }

    fn run(&self, prompt: &str, target: &str, spec: bool) -> anyhow::Result<HostStats> {
        let (child, stats) = self.spawn(prompt, target, spec, "run")?;
        Self::finish(child, &stats)
    }
}

/// Runs every prompt with cloud-ar and with the drafter against `target`, alternately.
fn measure(
    host: &Host,
    prompts: &[String],
    target: &str,
) -> anyhow::Result<(Version, Vec<String>)> {
    let (mut drafted, mut accepted, mut rounds) = (0u64, 0u64, 0u64);
    let (mut tok_s, mut sec_s, mut tok_a, mut sec_a) = (0usize, 0.0, 0usize, 0.0);
    let mut v = Version {
        target: target.to_string(),
        ..Version::default()
    };
    let mut texts = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let ar = host.run(p, target, false)?;
        let sd = host.run(p, target, true)?;
        for s in [&ar, &sd] {
            if s.target != target {
                bail!("a session asked for {target} was served by {}", s.target);
            }
        }
        if sd.text != ar.text {
            v.mismatches += 1;
        }
        drafted += sd.drafted as u64;
        accepted += sd.accepted as u64;
        rounds += sd.rounds as u64;
        (tok_s, sec_s) = (tok_s + sd.tokens, sec_s + sd.seconds);
        (tok_a, sec_a) = (tok_a + ar.tokens, sec_a + ar.seconds);
        eprintln!(
            "{target} prompt {}/{}: cloud-ar {:.2} tok/s, drafter {:.2} tok/s, {}/{} drafts accepted",
            i + 1,
            prompts.len(),
            ar.tokens_per_s,
            sd.tokens_per_s,
            sd.accepted,
            sd.drafted
        );
        texts.push(ar.text);
    }
    v.acceptance = accepted as f64 / drafted.max(1) as f64;
    v.tokens_per_round = tok_s as f64 / rounds.max(1) as f64;
    v.drafter_tokens_per_s = tok_s as f64 / sec_s.max(1e-9);
    v.cloud_ar_tokens_per_s = tok_a as f64 / sec_a.max(1e-9);
    v.speedup = v.drafter_tokens_per_s / v.cloud_ar_tokens_per_s.max(1e-9);
    Ok((v, texts))
}

/// Runs the benchmark and writes the report.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let v1 = tandem_models::fetch::resolve(&args.model)
        .with_context(|| format!("model `{}`", args.model))?;
    let n_layer = tandem_models::Model::load(&v1)?.config().n_layer;
    if args.layer == 0 || args.layer >= n_layer {
        bail!("--layer {} is outside 1..{n_layer}", args.layer);
    }
    let prompts = read_prompts(&args.prompts, args.num_prompts)?;
    let work = args.out.join("evolve");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let work = std::fs::canonicalize(&work)?;

    // The devices' drafter, made for v1.
    let drafter = match &args.drafter {
        Some(d) => d.clone(),
        None => {
            let d = work.join(format!("drafter-{}.gguf", args.layer));
            if d.exists() {
                eprintln!("drafter: reusing {} (delete it to retrain)", d.display());
            } else {
                eprintln!(
                    "drafter: training a head on v1's first {} blocks",
                    args.layer
                );
                let o =
                    tandem_train::Options::new(Kind::Drafter, v1.clone(), args.layer, d.clone());
                tandem_train::train(&o)?;
            }
            d
        }
    };
    let fp = |p: &Path, k| tandem_models::backbone::fingerprints(p, Some(k));
    let dfp = tandem_models::backbone::fingerprints(&drafter, None)?;
    if dfp.backbone_layers != args.layer || dfp != fp(&v1, args.layer)? {
        bail!(
            "{} is not a drafter sharing v1's backbone at {} blocks",
            drafter.display(),
            args.layer
        );
    }

    // v2, trained on the new domain.
    let report_path = work.join("v2.json");
    let (v2, training) = match &args.v2 {
        Some(p) => (p.clone(), None),
        None => {
            let p = work.join("v2.gguf");
            if p.exists() && report_path.exists() {
                eprintln!("v2: reusing {} (delete it to retrain)", p.display());
            } else {
                let mut o = target::Options::new(v1.clone(), args.layer, p.clone());
                o.steps = args.train_steps;
                o.train_tokens = args.train_tokens;
                o.resume = true;
                let r = target::train(&o)?;
                tandem_train::write_report(&r, &report_path)?;
            }
            let r: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&report_path)?)?;
            (p, Some(r))
        }
    };
    let v2 = std::fs::canonicalize(&v2).with_context(|| format!("v2 {}", v2.display()))?;
    let fingerprints_equal = fp(&v1, args.layer)? == fp(&v2, args.layer)?;

    let cores = match args.cores.as_str() {
        "none" => None,
        s => {
            let (a, b) = s
                .split_once(',')
                .and_then(|(a, b)| {
                    Some((
                        a.trim().parse::<usize>().ok()?,
                        b.trim().parse::<usize>().ok()?,
                    ))
                })
                .context("--cores takes \"V,H\" or \"none\"")?;
            Some((a, b))
        }
    };
    let bin = crate::soak::verifier_beside_me()?;
    let tandem = bin.with_file_name("tandem");
    if !tandem.exists() {
        bail!(
            "{} not found: build it first (`cargo build --release -p tandem-host`)",
            tandem.display()
        );
    }
    let (mut link, _) = Link::new(LinkKind::Shaper)?;
    let mut parts = link.prefix(true);
    if let Some((v, _)) = cores {
        parts.extend(["taskset".into(), "-c".into(), v.to_string()]);
    }
    parts.push(bin.display().to_string());
    let mut cmd = Command::new(&parts[0]);
    cmd.args(&parts[1..])
        .args(["serve", "--listen", &link.verifier_listen()])
        .arg("--target")
        .arg(format!("smol@1={}", v1.display()))
        .arg("--model-dir")
        .arg(v2.parent().context("v2 has no directory")?)
        .args(["--max-draft", "32", "--idle-timeout", "600"]);
    let log = work.join("verifier.log");
    cmd.stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .env("RUST_LOG", "warn");
    eprintln!("starting the verifier with v1 (log: {})", log.display());
    let mut verifier = Guard(cmd.spawn().context("starting tandem-verifier")?);
    let addr = wait_listening(&mut verifier.0, &log)?;
    let dial = link.point(
        Params {
            rtt_ms: args.rtt_ms,
            jitter_ms: 0.0,
            rate_bps: (args.rate_mbit * 1e6) as u64,
        },
        addr,
    )?;
    let _ = std::fs::remove_file(work.join("policy-state.json"));
    let host = Host {
        tandem,
        link: &link,
        core: cores.map(|c| c.1),
        dial,
        drafter: drafter.clone(),
        max_tokens: args.max_tokens,
        gamma: args.gamma,
        work: work.clone(),
    };

    // v1.
    let (mut r1, texts1) = measure(&host, &prompts, "smol@1")?;

    // The swap: sessions in flight on v1, v2 loaded, new sessions.
    let n = args.swap_sessions.min(prompts.len());
    let mut old = Vec::new();
    for (i, p) in prompts.iter().take(n).enumerate() {
        old.push((i, host.spawn(p, "smol", true, &format!("old-{i}"))?));
    }
    let wait = Instant::now();
    let mut in_flight = 0;
    while wait.elapsed() < Duration::from_secs(120) {
        in_flight = active_on(addr, "smol@1")?;
        if in_flight >= n {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = Instant::now();
    // The admin API loads files by their name under the verifier's --model-dir.
    let name = v2
        .file_name()
        .context("v2 has no file name")?
        .to_string_lossy();
    let body = serde_json::json!({"model": name, "family": "smol", "version": "2"});
    let (code, answer) = http(addr, "POST", "/admin/targets", &body.to_string())?;
    if code != 201 {
        bail!("loading v2 through POST /admin/targets answered {code}: {answer}");
    }
    let mut swap = Swap {
        in_flight_at_load: in_flight,
        load_s: t.elapsed().as_secs_f64(),
        ..Swap::default()
    };
    eprintln!(
        "swap: v2 loaded in {:.1} s with {in_flight} session(s) in flight on v1",
        swap.load_s
    );
    let mut new = Vec::new();
    for (i, p) in prompts.iter().take(n).enumerate() {
        new.push((i, host.spawn(p, "smol", true, &format!("new-{i}"))?));
    }
    let mut swap_texts = Vec::new();
    for (list, want, is_old) in [(old, "smol@1", true), (new, "smol@2", false)] {
        for (i, (child, stats)) in list {
            match Host::finish(child, &stats) {
                Ok(s) if s.target == want => {
                    if is_old {
                        swap.old_on_v1 += 1;
                    } else {
                        swap.new_on_v2 += 1;
                    }
                    swap_texts.push((i, is_old, s.text));
                }
                Ok(s) => {
                    eprintln!(
                        "swap: a session expected on {want} was served by {}",
                        s.target
                    );
                    swap.failed += 1;
                }
                Err(e) => {
                    eprintln!("swap: a session failed: {e:#}");
                    swap.failed += 1;
                }
            }
        }
    }

    // v2.
    let (mut r2, texts2) = measure(&host, &prompts, "smol@2")?;
    for (i, is_old, text) in swap_texts {
        let want = if is_old { &texts1[i] } else { &texts2[i] };
        if &text != want {
            if is_old {
                r1.mismatches += 1;
            } else {
                r2.mismatches += 1;
            }
        }
    }
    drop(verifier);
    drop(link);

    let loss =
        |r: &Option<serde_json::Value>, key: &str| r.as_ref().and_then(|r| r[key]["loss"].as_f64());
    r1.loss_new_domain = loss(&training, "v1_new");
    r1.loss_old_domain = loss(&training, "v1_old");
    r2.loss_new_domain = loss(&training, "v2_new");
    r2.loss_old_domain = loss(&training, "v2_old");
    let report = Report {
        v1_model: v1.display().to_string(),
        v2_model: v2.display().to_string(),
        drafter: drafter.display().to_string(),
        layer: args.layer,
        fingerprints_equal,
        v1_acceptance: r1.acceptance,
        v2_acceptance: r2.acceptance,
        acceptance_ratio: r2.acceptance / r1.acceptance.max(1e-9),
        failed_requests: swap.failed,
        v1: r1,
        v2: r2,
        swap,
        v2_training: training,
        num_prompts: prompts.len(),
        max_tokens: args.max_tokens,
        gamma: args.gamma,
        rtt_ms: args.rtt_ms,
        rate_mbit: args.rate_mbit,
        machine: crate::report::machine(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        wall_s: started.elapsed().as_secs_f64(),
    };
    let json = args.out.join("evolve.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")?;
    let md = args.out.join("evolve.md");
    std::fs::write(&md, table(&report))?;
    print!("{}", table(&report));
    eprintln!("wrote {} and {}", json.display(), md.display());
    let mismatches = report.v1.mismatches + report.v2.mismatches;
    if mismatches > 0 || report.failed_requests > 0 {
        bail!(
            "{mismatches} speculative text(s) differ from their target's cloud-ar text and {} \
             session(s) of the swap failed",
            report.failed_requests
        );
    }
    Ok(())
}

fn table(r: &Report) -> String {
    let opt = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.3}"));
    let mut s = format!(
        "Target v1 → v2 on a frozen backbone of {} blocks ({} prompts, {} tokens, γ = {}, \
         RTT {} ms, {} Mbit/s; fingerprints equal: {})\n\n\
         | | held-out loss, old domain | held-out loss, new domain | acceptance | tokens/round | \
         drafter tok/s | cloud-ar tok/s | speedup |\n|---|---|---|---|---|---|---|---|\n",
        r.layer, r.num_prompts, r.max_tokens, r.gamma, r.rtt_ms, r.rate_mbit, r.fingerprints_equal
    );
    for (name, v) in [("v1", &r.v1), ("v2", &r.v2)] {
        s += &format!(
            "| {name} | {} | {} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            opt(v.loss_old_domain),
            opt(v.loss_new_domain),
            v.acceptance,
            v.tokens_per_round,
            v.drafter_tokens_per_s,
            v.cloud_ar_tokens_per_s,
            v.speedup
        );
    }
    s += &format!(
        "\nv2/v1 acceptance {:.2} (goal ≥ 0.9). Swap: {} session(s) in flight on v1 at the load \
         ({:.1} s), {} finished on v1, {} new on v2, {} failed.\n",
        r.acceptance_ratio,
        r.swap.in_flight_at_load,
        r.swap.load_s,
        r.swap.old_on_v1,
        r.swap.new_on_v2,
        r.swap.failed
    );
    s
}
