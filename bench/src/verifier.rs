//! The verifier under load (`ci/bench-verifier`, docs/benchmarks.md): N simulated devices
//! against one `tandem-verifier` process, with the batch scheduler on and off
//! (`--no-batching`), run alternately in one sweep.
//!
//! The devices are a load generator speaking the session protocol with **recorded real
//! drafts**: before the sweep, the draft model (greedy, γ a round) drafts after every
//! prefix that greedy speculative decoding of each prompt commits, against the target's
//! greedy text, in this process. Greedy decoding is deterministic, so replaying those
//! blocks makes the verifier do exactly the work of the real run (each Result is checked
//! against the recording). A device spends `--draft-ms` per draft token and `--rtt-ms` on
//! the link before each message (the device's drafting and the network, simulated by
//! sleeping), opens a new session with the next prompt when one ends, and counts committed
//! tokens inside the measuring window.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tandem_client::{Endpoint, SessionClient};
use tandem_core::protocol::{ClientMsg, Hello, Outcome, ServerMsg, Verify};
use tandem_core::sampling::{SamplingParams, argmax};
use tandem_models::{Model, Tokenizer};

use crate::e2e::{Guard, read_prompts, wait_listening};
use crate::soak::{percentile, verifier_beside_me};

/// Options of `tandem-bench verifier`.
#[derive(clap::Args)]
pub struct Args {
    /// Prompts (JSON lines with "prompt", or a JSON array of strings).
    #[arg(long)]
    prompts: PathBuf,
    /// Prompts to record (devices cycle through them).
    #[arg(long, default_value_t = 8)]
    num_prompts: usize,
    /// Target model the verifier serves.
    #[arg(long, default_value = "qwen2.5-coder-1.5b")]
    target: String,
    /// Draft model whose drafts are recorded.
    #[arg(long, default_value = "qwen2.5-coder-0.5b")]
    drafter: String,
    /// Draft block length.
    #[arg(long, default_value_t = 4)]
    gamma: usize,
    /// Tokens each session generates (then the device opens a new session with the next
    /// prompt, whose prefill the verifier pays too).
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Concurrent devices, comma-separated.
    #[arg(long, default_value = "1,2,4,8,16", value_delimiter = ',')]
    sessions: Vec<usize>,
    /// Seconds each configuration is measured (after --warmup seconds).
    #[arg(long, default_value_t = 40.0)]
    seconds: f64,
    /// Seconds each configuration runs before the measuring window opens.
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Milliseconds a device spends per draft token (Qwen2.5-Coder-0.5B through the drafter
    /// component on one core of this machine type: ~39 ms, docs/benchmarks.md).
    #[arg(long, default_value_t = 35.0)]
    draft_ms: f64,
    /// Round-trip time of the link, spent before each message a device sends.
    #[arg(long, default_value_t = 50.0)]
    rtt_ms: f64,
    /// The verifier's --prefill-chunk (tokens of a prompt per batched forward).
    #[arg(long, default_value_t = 32)]
    prefill_chunk: usize,
    /// Compute threads of the verifier.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Where verifier.json goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

/// One prompt's recorded run.
#[derive(Clone, Serialize)]
struct Recording {
    prompt: Vec<u32>,
    /// The target's first token (from the prompt).
    first: u32,
    rounds: Vec<RecordedRound>,
}

#[derive(Clone, Serialize)]
struct RecordedRound {
    drafts: Vec<u32>,
    accepted: usize,
    /// The token after the accepted drafts (the target's).
    next: u32,
}

/// Records greedy speculative decoding of `prompt`: the target's greedy text, and the
/// drafter's γ tokens after each committed prefix.
fn record(target: &Model, drafter: &Model, prompt: &[u32], n: usize, gamma: usize) -> Recording {
    let mut cache = target.new_cache();
    let mut logits = target.forward_last(prompt, 0, &mut cache).unwrap();
    let mut text = Vec::new();
    while text.len() < n + gamma + 1 {
        let t = argmax(logits.last());
        text.push(t);
        logits = target
            .forward_last(&[t], prompt.len() + text.len() - 1, &mut cache)
            .unwrap();
    }
    let mut dcache = drafter.new_cache();
    let mut committed = prompt.to_vec();
    committed.push(text[0]);
    let mut rounds = Vec::new();
    let mut done = 1;
    while done < n {
        let pos0 = committed.len();
        // The drafter's cache holds a prefix of the committed tokens: feed the rest.
        let mut feed = committed[dcache.len()..].to_vec();
        let mut pos = dcache.len();
        let mut drafts = Vec::new();
        for _ in 0..gamma {
            let l = drafter.forward_last(&feed, pos, &mut dcache).unwrap();
            pos += feed.len();
            let x = argmax(l.last());
            drafts.push(x);
            feed = vec![x];
        }
        let accepted = drafts
            .iter()
            .zip(&text[done..])
            .take_while(|(d, t)| d == t)
            .count();
        let next = text[done + accepted];
        committed.extend_from_slice(&text[done..done + accepted + 1]);
        // Accepted drafts stay in the drafter's cache; the rest is rolled back.
        let keep = dcache.len().min(pos0 + accepted);
        dcache.truncate(keep);
        rounds.push(RecordedRound {
            drafts,
            accepted,
            next,
        });
        done += accepted + 1;
    }
    Recording {
        prompt: prompt.to_vec(),
        first: text[0],
        rounds,
    }
}

/// What one configuration measured.
#[derive(Default)]
struct Tally {
    tokens: usize,
    round_ms: Vec<f64>,
    sessions: usize,
    mismatches: usize,
    errors: Vec<String>,
}

/// One simulated device: sessions one after another until `end`.
#[allow(clippy::too_many_arguments)]
async fn device(
    ep: Endpoint,
    hello: Hello,
    recs: Arc<Vec<Recording>>,
    first_prompt: usize,
    think: Duration,
    rtt: Duration,
    window: (Instant, Instant),
    tally: Arc<Mutex<Tally>>,
) {
    let counts = |t: Instant| t >= window.0 && t < window.1;
    let mut k = first_prompt;
    while Instant::now() < window.1 {
        let rec = &recs[k % recs.len()];
        k += 1;
        let run = async {
            let mut c = SessionClient::connect(&ep).await?;
            tokio::time::sleep(rtt).await;
            c.send(&ClientMsg::Hello(hello.clone()))?;
            c.send(&ClientMsg::Prefill(rec.prompt.clone()))?;
            match c.recv().await? {
                Some(ServerMsg::Accepted(_)) => {}
                other => bail!("expected Accepted, got {other:?}"),
            }
            match c.recv().await? {
                Some(ServerMsg::First(t)) if t == rec.first => {}
                other => bail!("expected First({}), got {other:?}", rec.first),
            }
            if counts(Instant::now()) {
                tally.lock().unwrap().tokens += 1;
            }
            let mut pos = rec.prompt.len() + 1;
            let mut prev = rec.first;
            for (r, round) in rec.rounds.iter().enumerate() {
                if Instant::now() >= window.1 {
                    break;
                }
                tokio::time::sleep(think * round.drafts.len() as u32 + rtt).await;
                let sent = Instant::now();
                c.send(&ClientMsg::Verify(Verify {
                    round: r as u32,
                    pos: pos as u32,
                    prev,
                    tokens: round.drafts.clone(),
                    q: vec![1.0; round.drafts.len()],
                }))?;
                let result = loop {
                    match c.recv().await? {
                        Some(ServerMsg::Hint { .. }) => {}
                        Some(ServerMsg::Result(res)) => break res,
                        other => bail!("round {r}: expected Result, got {other:?}"),
                    }
                };
                let now = Instant::now();
                let right = result.accepted as usize == round.accepted
                    && matches!(result.outcome, Outcome::Token(t) if t == round.next);
                let mut t = tally.lock().unwrap();
                if !right {
                    t.mismatches += 1;
                }
                if counts(now) {
                    t.tokens += round.accepted + 1;
                    t.round_ms
                        .push(now.duration_since(sent).as_secs_f64() * 1e3);
                }
                drop(t);
                pos += round.accepted + 1;
                prev = round.next;
            }
            c.send(&ClientMsg::Close)?;
            anyhow::Ok(())
        };
        match run.await {
            Ok(()) => tally.lock().unwrap().sessions += 1,
            Err(e) => {
                tally.lock().unwrap().errors.push(format!("{e:#}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// One row of the report.
#[derive(Serialize)]
struct Row {
    sessions: usize,
    batching: bool,
    aggregate_tokens_per_s: f64,
    per_session_tokens_per_s: f64,
    p50_round_ms: f64,
    p99_round_ms: f64,
    rounds: usize,
    sessions_completed: usize,
    mismatches: usize,
    errors: usize,
    /// Pieces of work per batched forward, mean over the window (0 without batching).
    mean_batch: f64,
}

/// `GET /metrics` of the verifier: the value of a line `name value`.
async fn metric(addr: &str, name: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else {
        return 0.0;
    };
    let req = "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let mut text = String::new();
    if tcp.write_all(req.as_bytes()).await.is_err() || tcp.read_to_string(&mut text).await.is_err()
    {
        return 0.0;
    }
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Runs `n` devices against `addr` for warmup + seconds; the row.
async fn measure(
    addr: &str,
    (n, batching): (usize, bool),
    (warmup, seconds): (f64, f64),
    hello: &Hello,
    recs: &Arc<Vec<Recording>>,
    args: &Args,
) -> Row {
    let ep = Endpoint::plain(addr.to_string());
    let start = Instant::now() + Duration::from_millis(50);
    let open = start + Duration::from_secs_f64(warmup);
    let window = (open, open + Duration::from_secs_f64(seconds));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let (pieces0, forwards0) = (
        metric(addr, "tandem_batch_sessions_sum").await,
        metric(addr, "tandem_batch_sessions_count").await,
    );
    let think = Duration::from_secs_f64(args.draft_ms / 1e3);
    let rtt = Duration::from_secs_f64(args.rtt_ms / 1e3);
    let devices: Vec<_> = (0..n)
        .map(|i| {
            // Devices start spread over one round's device time, as independent ones would.
            let delay = (think * args.gamma as u32 + rtt).mul_f64(i as f64 / n as f64);
            let run = device(
                ep.clone(),
                hello.clone(),
                recs.clone(),
                i,
                think,
                rtt,
                window,
                tally.clone(),
            );
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                run.await
            })
        })
        .collect();
    for d in devices {
        let _ = d.await;
    }
    let (pieces1, forwards1) = (
        metric(addr, "tandem_batch_sessions_sum").await,
        metric(addr, "tandem_batch_sessions_count").await,
    );
    let mut t = std::mem::take(&mut *tally.lock().unwrap());
    t.round_ms.sort_by(f64::total_cmp);
    let aggregate = t.tokens as f64 / seconds;
    for e in t.errors.iter().take(3) {
        eprintln!("  error: {e}");
    }
    Row {
        sessions: n,
        batching,
        aggregate_tokens_per_s: aggregate,
        per_session_tokens_per_s: aggregate / n as f64,
        p50_round_ms: percentile(&t.round_ms, 0.5),
        p99_round_ms: percentile(&t.round_ms, 0.99),
        rounds: t.round_ms.len(),
        sessions_completed: t.sessions,
        mismatches: t.mismatches,
        errors: t.errors.len(),
        mean_batch: if forwards1 > forwards0 {
            (pieces1 - pieces0) / (forwards1 - forwards0)
        } else {
            0.0
        },
    }
}

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let bin = verifier_beside_me()?;
    if args.gamma == 0 || args.tokens == 0 || args.sessions.is_empty() || args.seconds <= 0.0 {
        bail!("--gamma, --tokens, --sessions and --seconds must be positive");
    }
    std::fs::create_dir_all(&args.out)?;
    let target_path = tandem_models::fetch::resolve(&args.target)?;
    let drafter_path = tandem_models::fetch::resolve(&args.drafter)?;
    let tok = Tokenizer::from_gguf(&target_path)?;
    let prompts = read_prompts(&args.prompts, args.num_prompts)?;
    eprintln!(
        "recording greedy drafts: {} prompts, {} tokens each, γ = {} ({} drafting for {})",
        prompts.len(),
        args.tokens,
        args.gamma,
        args.drafter,
        args.target
    );
    let recs = {
        let target = Model::load(&target_path)?;
        let drafter = Model::load(&drafter_path)?;
        let mut recs = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let ids = tok.encode(p)?;
            let t = Instant::now();
            let rec = record(&target, &drafter, &ids, args.tokens, args.gamma);
            let accepted: usize = rec.rounds.iter().map(|r| r.accepted).sum();
            eprintln!(
                "  prompt {}: {} tokens, {} rounds, {:.2} accepted per round ({:.1} s)",
                i + 1,
                ids.len(),
                rec.rounds.len(),
                accepted as f64 / rec.rounds.len() as f64,
                t.elapsed().as_secs_f64()
            );
            recs.push(rec);
        }
        recs
    };
    let recs = Arc::new(recs);
    let rounds: usize = recs.iter().map(|r| r.rounds.len()).sum();
    let accepted: usize = recs
        .iter()
        .flat_map(|r| &r.rounds)
        .map(|r| r.accepted)
        .sum();
    let max_sessions = args.sessions.iter().max().copied().unwrap_or(1);
    let hello = Hello {
        tokenizer: tandem_models::backbone::tokenizer_fingerprint_of(&target_path)?.0,
        backbone: None,
        family: None,
        sampling: SamplingParams::default(),
        max_tokens: (args.tokens + args.gamma + 8) as u32,
        token: None,
    };

    // Two verifiers, batching on and off; the sweep alternates between them.
    let mut verifiers = Vec::new();
    for batching in [true, false] {
        let log = args.out.join(format!(
            "verifier-{}.log",
            if batching { "batching" } else { "no-batching" }
        ));
        let mut cmd = Command::new(&bin);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--target", &args.target])
            .args(["--max-sessions", &(max_sessions + 4).to_string()])
            .args(["--max-draft", &args.gamma.max(16).to_string()])
            .args(["--prefill-chunk", &args.prefill_chunk.to_string()])
            .env("RAYON_NUM_THREADS", args.threads.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?);
        if !batching {
            cmd.arg("--no-batching");
        }
        let mut g = Guard(cmd.spawn().context("starting tandem-verifier")?);
        let addr = wait_listening(&mut g.0, &log)?.to_string();
        eprintln!(
            "verifier ({}) on {addr}",
            if batching {
                "batching"
            } else {
                "--no-batching"
            }
        );
        verifiers.push((batching, addr, g));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    rt.block_on(async {
        // Warm-up: one session on each (page cache, first-use costs).
        for (batching, addr, _) in &verifiers {
            measure(addr, (1, *batching), (0.0, 3.0), &hello, &recs, args).await;
        }
        for &n in &args.sessions {
            for (batching, addr, _) in &verifiers {
                let window = (args.warmup, args.seconds);
                let row = measure(addr, (n, *batching), window, &hello, &recs, args).await;
                eprintln!(
                    "{n:>3} sessions, batching {:<5}: {:>6.1} tok/s aggregate, {:>5.1} per session, \
                     round p50 {:>6.0} ms p99 {:>6.0} ms, {:.2} per forward, {} mismatches, {} errors",
                    batching,
                    row.aggregate_tokens_per_s,
                    row.per_session_tokens_per_s,
                    row.p50_round_ms,
                    row.p99_round_ms,
                    row.mean_batch,
                    row.mismatches,
                    row.errors
                );
                rows.push(row);
            }
        }
    });
    drop(verifiers);

    let find = |n: usize, b: bool| rows.iter().find(|r| r.sessions == n && r.batching == b);
    let ratio = |n: usize, b: bool, f: fn(&Row) -> f64| match (find(n, b), find(1, b)) {
        (Some(x), Some(one)) if f(one) > 0.0 => Some(f(x) / f(one)),
        _ => None,
    };
    let goals = serde_json::json!({
        "aggregate8_over_1_batching": ratio(8, true, |r| r.aggregate_tokens_per_s),
        "aggregate8_over_1_no_batching": ratio(8, false, |r| r.aggregate_tokens_per_s),
        "p99_8_over_1_batching": ratio(8, true, |r| r.p99_round_ms),
        "p99_8_over_1_no_batching": ratio(8, false, |r| r.p99_round_ms),
    });
    let mismatches: usize = rows.iter().map(|r| r.mismatches).sum();
    let report = serde_json::json!({
        "machine": crate::report::machine(),
        "kernel": tandem_models::quant::kernel().to_string(),
        "target": args.target,
        "drafter": args.drafter,
        "load": "load generator replaying recorded greedy drafts (see bench/src/verifier.rs)",
        "prompts": recs.len(),
        "gamma": args.gamma,
        "tokens_per_session": args.tokens,
        "recorded_rounds": rounds,
        "recorded_accepted_per_round": accepted as f64 / rounds.max(1) as f64,
        "draft_ms_per_token": args.draft_ms,
        "rtt_ms": args.rtt_ms,
        "threads": args.threads,
        "prefill_chunk": args.prefill_chunk,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "goals": goals,
        "mismatches": mismatches,
        "rows": rows,
    });
    let path = args.out.join("verifier.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&goals)?);
    println!("wrote {}", path.display());
    if mismatches > 0 {
        bail!("{mismatches} rounds differed from the recording: the verifier was not lossless");
    }
    Ok(())
}
