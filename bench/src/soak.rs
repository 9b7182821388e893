//! The soak run (`ci/soak`, docs/reliability.md): one `tandem-verifier` process on loopback
//! with SmolLM2-135M; many concurrent sessions drafting with an oracle that knows the
//! target's greedy text and errs on purpose now and then; a flooder sending malformed
//! frames and holding idle connections; a hot-swap of the target every minute. Every
//! committed token is checked against the target-only text. Prints and writes soak.json.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tandem_client::{Endpoint, SessionClient};
use tandem_core::protocol::{ClientMsg, Hello, Outcome, ServerMsg, Verify};
use tandem_core::sampling::SamplingParams;

use crate::e2e::Guard;

/// Options of `tandem-bench soak`.
#[derive(clap::Args)]
pub struct Args {
    /// Minutes to run.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 32)]
    sessions: usize,
    /// Tokens each session generates.
    #[arg(long, default_value_t = 48)]
    tokens: usize,
    /// Idle connections the flooder holds open.
    #[arg(long, default_value_t = 64)]
    idle_connections: usize,
    /// Minutes between hot-swaps of the target.
    #[arg(long, default_value_t = 1.0)]
    swap_every: f64,
    /// Where soak.json goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

const PROMPTS: [&str; 4] = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The capital of France is",
    "import json\n\ndef load(path):\n",
    "Once upon a time, in a small village by the sea,",
];

#[derive(Default)]
struct Counters {
    sessions: AtomicU64,
    rounds: AtomicU64,
    tokens: AtomicU64,
    errors: AtomicU64,
    wrong: AtomicU64,
    malformed_sent: AtomicU64,
    malformed_answered: AtomicU64,
    idle_closed: AtomicU64,
    swaps: AtomicU64,
}

/// The `tandem-verifier` built beside this binary.
pub(crate) fn verifier_beside_me() -> anyhow::Result<PathBuf> {
    let bin = std::env::current_exe()?.with_file_name("tandem-verifier");
    if !bin.exists() {
        bail!(
            "{} not found: build it first (`cargo build --release -p tandem-verifier`)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Greedy target-only continuations of `n` tokens (EOS not special: the verifier does not
/// stop there either).
fn references(model: &tandem_models::Model, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    prompts
        .iter()
        .map(|p| {
            let mut cache = model.new_cache();
            let mut logits = model.forward_last(p, 0, &mut cache).unwrap();
            let mut out = Vec::new();
            while out.len() < n {
                let t = tandem_core::sampling::argmax(logits.last());
                out.push(t);
                logits = model
                    .forward_last(&[t], p.len() + out.len() - 1, &mut cache)
                    .unwrap();
            }
            out
        })
        .collect()
}

/// One session: drafts the reference with a wrong token now and then, checks every
/// committed token, records round times.
async fn session(
    ep: &Endpoint,
    hello: Hello,
    prompt: &[u32],
    want: &[u32],
    seed: u64,
    times: &Mutex<Vec<f64>>,
    c: &Counters,
) -> anyhow::Result<()> {
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut s = SessionClient::connect(ep).await?;
    s.send(&ClientMsg::Hello(hello))?;
    s.send(&ClientMsg::Prefill(prompt.to_vec()))?;
    let mut got = Vec::new();
    loop {
        match s.recv().await? {
            Some(ServerMsg::Accepted(_)) => {}
            Some(ServerMsg::First(t)) => {
                got.push(t);
                break;
            }
            other => bail!("expected Accepted and First, got {other:?}"),
        }
    }
    let mut round = 0;
    while got.len() < want.len() {
        let gamma = 1 + (next() % 6) as usize;
        let start = got.len();
        let mut tokens: Vec<u32> = want[start..(start + gamma).min(want.len())].to_vec();
        if tokens.is_empty() {
            tokens.push(0);
        }
        if next() % 4 == 0 {
            let i = (next() as usize) % tokens.len();
            tokens[i] = (tokens[i] + 1) % 49_152;
        }
        let sent = Instant::now();
        s.send(&ClientMsg::Verify(Verify {
            round,
            pos: (prompt.len() + got.len()) as u32,
            prev: *got.last().unwrap(),
            q: vec![1.0; tokens.len()],
            tokens: tokens.clone(),
        }))?;
        let r = loop {
            match s.recv().await? {
                Some(ServerMsg::Hint { .. }) => {}
                Some(ServerMsg::Result(r)) if r.round == round => break r,
                other => bail!("round {round}: expected a Result, got {other:?}"),
            }
        };
        times
            .lock()
            .unwrap()
            .push(sent.elapsed().as_secs_f64() * 1e3);
        let accepted = r.accepted as usize;
        got.extend_from_slice(&tokens[..accepted.min(tokens.len())]);
        match r.outcome {
            Outcome::Token(t) => got.push(t),
            Outcome::Residual(_) => bail!("a residual in a greedy session"),
        }
        c.rounds.fetch_add(1, Relaxed);
        round += 1;
    }
    let n = want.len().min(got.len());
    c.tokens.fetch_add(n as u64, Relaxed);
    if got[..n] != want[..n] {
        c.wrong.fetch_add(1, Relaxed);
        bail!(
            "committed tokens differ from the target's: {:?} vs {:?}",
            &got[..n],
            &want[..n]
        );
    }
    s.send(&ClientMsg::Close)?;
    Ok(())
}

/// Malformed frames on session streams and garbage on raw connections, in a loop.
async fn flood_malformed(ep: Endpoint, until: Instant, c: Arc<Counters>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut k = 0u64;
    while Instant::now() < until {
        k += 1;
        if k.is_multiple_of(2) {
            if let Ok(mut s) = SessionClient::connect(&ep).await {
                let bytes: Vec<u8> = (0..64).map(|i| (k * 31 + i * 7 + k * i) as u8).collect();
                c.malformed_sent.fetch_add(1, Relaxed);
                let sent = s.send_raw(bytes).is_ok();
                // Ending the stream makes a frame cut short an error at once.
                s.finish();
                if sent {
                    let answered = tokio::time::timeout(Duration::from_secs(30), async {
                        while let Ok(Some(m)) = s.recv().await {
                            if matches!(m, ServerMsg::Error { .. }) {
                                return true;
                            }
                        }
                        false
                    })
                    .await;
                    if matches!(answered, Ok(true)) {
                        c.malformed_answered.fetch_add(1, Relaxed);
                    }
                }
            }
        } else if let Ok(mut tcp) = tokio::net::TcpStream::connect(&ep.addr).await {
            let _ = tcp
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\xff\x07garbage")
                .await;
            let mut buf = [0u8; 256];
            let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Holds `n` connections that never send a byte; each is reopened when the server closes
/// it (after its handshake timeout).
async fn hold_idle(addr: String, n: usize, until: Instant, c: Arc<Counters>) {
    use tokio::io::AsyncReadExt;
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (addr, c) = (addr.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let Ok(mut tcp) = tokio::net::TcpStream::connect(&addr).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let mut buf = [0u8; 16];
                let left = until.saturating_duration_since(Instant::now());
                if let Ok(Ok(0)) = tokio::time::timeout(left, tcp.read(&mut buf)).await {
                    c.idle_closed.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// One HTTP/1.1 request with a JSON body; returns the status line.
async fn admin(addr: &str, method: &str, path: &str, body: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await?;
    let mut resp = String::new();
    tcp.read_to_string(&mut resp).await?;
    Ok(resp.lines().next().unwrap_or("").to_string())
}

fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs the soak.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let bin = verifier_beside_me()?;
    let model_path = tandem_models::fetch::resolve("smollm2-135m")?;
    let model = tandem_models::Model::load(&model_path)?;
    let tok = tandem_models::Tokenizer::from_gguf(&model_path)?;
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<_, _>>()?;
    eprintln!("soak: computing the target-only references");
    let want = references(&model, &prompts, args.tokens);
    drop(model);
    let hello = Hello {
        tokenizer: tandem_models::backbone::tokenizer_fingerprint_of(&model_path)?.0,
        backbone: None,
        family: None,
        sampling: SamplingParams::default(),
        max_tokens: args.tokens as u32 + 8,
        token: None,
    };

    std::fs::create_dir_all(&args.out)?;
    let log = args.out.join("soak-verifier.log");
    let mut child = Command::new(&bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--target"])
        .arg(format!("smol@v0={}", model_path.display()))
        .args(["--max-sessions", &(args.sessions * 2).to_string()])
        .args(["--handshake-timeout", "5"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting tandem-verifier")?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().context("verifier stdout")?),
        &mut line,
    )?;
    let verifier = Guard(child);
    let pid = verifier.0.id();
    let addr = line.trim().rsplit("://").next().unwrap_or("").to_string();
    if !line.starts_with("tandem-verifier listening on") {
        bail!(
            "the verifier did not start: {line:?} (log: {})",
            log.display()
        );
    }
    eprintln!(
        "soak: {} sessions for {} min against {addr}, {} idle connections, malformed frames, \
         a hot-swap every {} min",
        args.sessions, args.minutes, args.idle_connections, args.swap_every
    );
    let ep = Endpoint::plain(addr.clone());
    let until = Instant::now() + Duration::from_secs_f64(args.minutes * 60.0);
    let counters = Arc::new(Counters::default());
    let times = Arc::new(Mutex::new(Vec::new()));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let n = args.sessions;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..args.sessions {
            let (ep, hello, prompts, want) =
                (ep.clone(), hello.clone(), prompts.clone(), want.clone());
            let (c, times, first_error) = (counters.clone(), times.clone(), first_error.clone());
            tasks.push(tokio::spawn(async move {
                let mut k = i as u64;
                while Instant::now() < until {
                    let p = (k as usize) % prompts.len();
                    let r = session(
                        &ep,
                        hello.clone(),
                        &prompts[p],
                        &want[p],
                        k * 7919 + 1,
                        &times,
                        &c,
                    )
                    .await;
                    match r {
                        Ok(()) => {
                            c.sessions.fetch_add(1, Relaxed);
                        }
                        Err(e) => {
                            c.errors.fetch_add(1, Relaxed);
                            first_error.lock().unwrap().get_or_insert(format!("{e:#}"));
                        }
                    }
                    k += n as u64;
                }
            }));
        }
        tasks.push(tokio::spawn(flood_malformed(
            ep.clone(),
            until,
            counters.clone(),
        )));
        tasks.push(tokio::spawn(hold_idle(
            addr.clone(),
            args.idle_connections,
            until,
            counters.clone(),
        )));
        let (addr2, c2) = (addr.clone(), counters.clone());
        let every = Duration::from_secs_f64(args.swap_every * 60.0);
        tasks.push(tokio::spawn(async move {
            let mut v = 0;
            loop {
                tokio::time::sleep(every).await;
                if Instant::now() + Duration::from_secs(5) > until {
                    break;
                }
                let body = format!(
                    "{{\"model\":\"smollm2-135m\",\"family\":\"smol\",\"version\":\"v{}\"}}",
                    v + 1
                );
                let loaded = admin(&addr2, "POST", "/admin/targets", &body).await;
                let retired =
                    admin(&addr2, "DELETE", &format!("/admin/targets/smol/v{v}"), "").await;
                match (loaded, retired) {
                    (Ok(a), Ok(b)) if a.contains(" 20") && b.contains(" 200") => {
                        c2.swaps.fetch_add(1, Relaxed);
                        v += 1;
                    }
                    other => eprintln!("soak: hot-swap failed: {other:?}"),
                }
            }
        }));
        for t in tasks {
            let _ = t.await;
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let rss = peak_rss_mb(pid);
    drop(verifier);
    let mut t = times.lock().unwrap().clone();
    t.sort_by(f64::total_cmp);
    let c = &counters;
    let summary = serde_json::json!({
        "minutes": seconds / 60.0,
        "concurrent_sessions": args.sessions,
        "sessions_completed": c.sessions.load(Relaxed),
        "session_errors": c.errors.load(Relaxed),
        "sessions_with_wrong_tokens": c.wrong.load(Relaxed),
        "rounds": c.rounds.load(Relaxed),
        "tokens_checked": c.tokens.load(Relaxed),
        "round_ms_p50": percentile(&t, 0.5),
        "round_ms_p99": percentile(&t, 0.99),
        "malformed_streams_sent": c.malformed_sent.load(Relaxed),
        "malformed_streams_answered_with_error": c.malformed_answered.load(Relaxed),
        "idle_connections_closed_by_server": c.idle_closed.load(Relaxed),
        "hot_swaps": c.swaps.load(Relaxed),
        "verifier_peak_rss_mb": rss,
        "first_error": *first_error.lock().unwrap(),
    });
    let text = serde_json::to_string_pretty(&summary)?;
    println!("{text}");
    let path = args.out.join("soak.json");
    std::fs::write(&path, text + "\n")?;
    eprintln!("soak: wrote {}", path.display());
    if c.wrong.load(Relaxed) > 0 || c.errors.load(Relaxed) > 0 {
        bail!(
            "{} sessions failed, {} with wrong tokens: {}",
            c.errors.load(Relaxed),
            c.wrong.load(Relaxed),
            first_error.lock().unwrap().clone().unwrap_or_default()
        );
    }
    Ok(())
}
