//! `tandem-bench gpu`: draft-model decode speed on every wgpu adapter found and on the CPU
//! engine, with the GPU's traffic per token (submissions, bytes read back and written);
//! and the verifier's side: the cost of a verify block of n tokens, t(n)/t(1) for
//! n = 1..16, how early a round's early-exit hint is read back, what a sampling round's top
//! rows cost against whole rows, and what batching several sessions' blocks into one
//! forward saves over running them one after another.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tandem_gpu::{Gpu, GpuChoice, GpuModel, GpuSession};
use tandem_models::backend::{ExitTo, Readback, VerifySequence};
use tandem_models::draft::decode;
use tandem_models::{CpuSequence, DraftForward, Model, Tokenizer};

/// Options of `tandem-bench gpu`.
#[derive(clap::Args)]
pub struct Args {
    /// Draft models (catalog names or paths).
    #[arg(long = "model", default_values_t = ["smollm2-135m".to_string(), "qwen2.5-coder-0.5b".to_string()])]
    models: Vec<String>,
    /// Greedy single-token steps timed per backend (after a prefill and one warm-up step).
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Longest verify block of the t(n)/t(1) curve (0: no curve).
    #[arg(long, default_value_t = 16)]
    verify_blocks: usize,
    /// Timed repetitions of each verify block (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Where gpu.json goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

const PROMPT: &str = "def fib(n: int):\n    \"\"\"Return n-th Fibonacci number.\n    >>> fib(10)\n    55\n    \"\"\"\n";

/// A verify-block cost curve on one backend.
#[derive(serde::Serialize)]
struct Curve {
    model: String,
    backend: String,
    /// Block sizes n (tokens in one verify forward, after the prompt).
    n: Vec<usize>,
    /// Median time of a block of n, ms.
    ms: Vec<f64>,
    /// t(n)/t(1).
    ratio: Vec<f64>,
    /// Bytes read back per round (the GPU: 12 per position; the CPU engine: none).
    bytes_read: Vec<u64>,
    /// A block of 5 with the early exit at `hint_layer`: when the hint was in hand and when
    /// the round's results were, ms after the forward started (medians).
    hint_layer: usize,
    hint_ms: f64,
    round_with_hint_ms: f64,
    /// A sampling round's block of 5: reading each position's top row (T = 1) against
    /// reading the whole rows — ms (medians) and bytes read back.
    top_rows_ms: f64,
    top_rows_bytes: u64,
    whole_rows_ms: f64,
    whole_rows_bytes: u64,
}

/// Verify blocks of 5 of k sessions: one batch forward against the k sessions' own
/// forwards one after another (run alternately, medians).
#[derive(serde::Serialize)]
struct Batching {
    model: String,
    backend: String,
    /// Sessions k.
    sessions: Vec<usize>,
    /// One batch forward of the k blocks, ms.
    batched_ms: Vec<f64>,
    /// The k blocks one forward each, ms.
    one_by_one_ms: Vec<f64>,
    /// batched / one by one.
    ratio: Vec<f64>,
}

#[derive(serde::Serialize)]
struct Row {
    model: String,
    backend: String,
    device_type: String,
    prefill_tokens: usize,
    prefill_s: f64,
    steps: usize,
    draft_tokens_per_s: f64,
    step_ms: f64,
    submissions_per_token: f64,
    bytes_read_per_token: f64,
    bytes_written_per_token: f64,
    weight_mib: f64,
    tokens: Vec<u32>,
}

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let adapters = tandem_gpu::list_adapters();
    if adapters.is_empty() {
        eprintln!("wgpu finds no adapter: only the CPU is measured");
    }
    let mut rows = Vec::new();
    let mut curves = Vec::new();
    let mut batches = Vec::new();
    for name in &args.models {
        let path = tandem_models::fetch::resolve(name).with_context(|| format!("model {name}"))?;
        let tok = Tokenizer::from_gguf(&path)?;
        let prompt = tok.encode(PROMPT)?;
        // CPU engine.
        let cpu_model = Arc::new(Model::load(&path)?);
        let layers = cpu_model.config().n_layer;
        let mut cpu = CpuSequence::new(cpu_model);
        let t = greedy(&mut cpu, &prompt, args.steps, |_| {})?;
        rows.push(Row {
            model: name.clone(),
            backend: "cpu (tandem-models)".into(),
            device_type: "Cpu".into(),
            prefill_tokens: prompt.len(),
            prefill_s: t.prefill_s,
            steps: args.steps,
            draft_tokens_per_s: args.steps as f64 / t.steps_s,
            step_ms: t.steps_s * 1000.0 / args.steps as f64,
            submissions_per_token: 0.0,
            bytes_read_per_token: 0.0,
            bytes_written_per_token: 0.0,
            weight_mib: 0.0,
            tokens: t.tokens,
        });
        print_row(rows.last().unwrap());
        if args.verify_blocks > 0 {
            curves.push(curve(
                &mut cpu,
                name,
                "cpu (tandem-models)",
                &prompt,
                layers,
                args,
                |_| 0,
            )?);
        }
        drop(cpu);
        for a in &adapters {
            let gpu =
                Gpu::open(&GpuChoice::Named(a.name.clone()))?.context("the adapter disappeared")?;
            let m = GpuModel::load(gpu, &path)?;
            let weight_mib = m.weight_bytes() as f64 / (1 << 20) as f64;
            let mut s = GpuSession::new(Arc::clone(&m))?;
            let mut before = None;
            let t = greedy(&mut s, &prompt, args.steps, |s| before = Some(s.stats()))?;
            let (before, after) = (before.context("no timed step")?, s.stats());
            let per = |a: u64, b: u64| (a - b) as f64 / args.steps as f64;
            rows.push(Row {
                model: name.clone(),
                backend: format!("{} ({})", a.name, a.backend),
                device_type: a.device_type.clone(),
                prefill_tokens: prompt.len(),
                prefill_s: t.prefill_s,
                steps: args.steps,
                draft_tokens_per_s: args.steps as f64 / t.steps_s,
                step_ms: t.steps_s * 1000.0 / args.steps as f64,
                submissions_per_token: per(after.submissions, before.submissions),
                bytes_read_per_token: per(after.bytes_read, before.bytes_read),
                bytes_written_per_token: per(after.bytes_written, before.bytes_written),
                weight_mib,
                tokens: t.tokens,
            });
            print_row(rows.last().unwrap());
            if args.verify_blocks > 0 {
                let mut s = GpuSession::new(Arc::clone(&m))?;
                let backend = format!("{} ({})", a.name, a.backend);
                curves.push(curve(&mut s, name, &backend, &prompt, layers, args, |s| {
                    s.stats().bytes_read
                })?);
                batches.push(batching(&m, name, &backend, &prompt, args.reps)?);
            }
        }
    }
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join("gpu.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::json!({
            "adapters": adapters.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "rows": rows,
            "verify_curves": curves,
            "batching": batches,
        }))?,
    )?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// The verify-block curve of one sequence: after the prompt, blocks of n = 1..=max tokens
/// at the same position (rolled back between runs), each position's best token read back;
/// then a block of 5 with an early exit halfway down the model.
fn curve<S: VerifySequence>(
    s: &mut S,
    model: &str,
    backend: &str,
    prompt: &[u32],
    layers: usize,
    args: &Args,
    bytes_read: impl Fn(&S) -> u64,
) -> anyhow::Result<Curve> {
    s.forward(prompt, 0, Readback::Nothing, None)?;
    let p = prompt.len();
    let block: Vec<u32> = prompt
        .iter()
        .copied()
        .cycle()
        .take(args.verify_blocks.max(5))
        .collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let reps = args.reps.max(1);
    let (mut ns, mut ms, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    for n in 1..=args.verify_blocks {
        let mut times = Vec::with_capacity(reps);
        let mut read = 0;
        for _ in 0..reps {
            s.truncate(p);
            let before = bytes_read(s);
            let t = Instant::now();
            s.forward(&block[..n], p, Readback::Rows, None)?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            read = bytes_read(s) - before;
        }
        ns.push(n);
        ms.push(median(times));
        bytes.push(read);
    }
    let hint_layer = layers / 2;
    let (mut hints, mut rounds) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        s.truncate(p);
        let t = Instant::now();
        let mut at = None;
        let mut sink = |_: &[tandem_models::backend::Best]| at = Some(t.elapsed());
        let exit = ExitTo {
            layer: hint_layer,
            sink: &mut sink,
        };
        s.forward(&block[..5], p, Readback::Rows, Some(exit))?;
        rounds.push(t.elapsed().as_secs_f64() * 1000.0);
        hints.push(at.context("the exit sink was not called")?.as_secs_f64() * 1000.0);
    }
    // A sampling round: top rows against whole rows, alternately.
    let (mut top, mut whole) = (Vec::new(), Vec::new());
    let (mut top_bytes, mut whole_bytes) = (0, 0);
    for _ in 0..reps {
        for (want, times, read) in [
            (Readback::Top(1.0), &mut top, &mut top_bytes),
            (Readback::RowsAndLogits, &mut whole, &mut whole_bytes),
        ] {
            s.truncate(p);
            let before = bytes_read(s);
            let t = Instant::now();
            s.forward(&block[..5], p, want, None)?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            *read = bytes_read(s) - before;
        }
    }
    let c = Curve {
        top_rows_ms: median(top),
        top_rows_bytes: top_bytes,
        whole_rows_ms: median(whole),
        whole_rows_bytes: whole_bytes,
        model: model.into(),
        backend: backend.into(),
        ratio: ms.iter().map(|t| t / ms[0]).collect(),
        n: ns,
        ms,
        bytes_read: bytes,
        hint_layer,
        hint_ms: median(hints),
        round_with_hint_ms: median(rounds),
    };
    let show: Vec<String> =
        c.n.iter()
            .zip(&c.ratio)
            .map(|(n, r)| format!("{n}:{r:.2}"))
            .collect();
    println!(
        "{:<20} {:<45} verify t(1) {:.1} ms, t(n)/t(1) {} | bytes read per round {:?} | block of 5 with exit at {}: hint at {:.1} ms, results at {:.1} ms | sampling block of 5: top rows {:.1} ms {} B, whole rows {:.1} ms {} B",
        c.model,
        c.backend,
        c.ms[0],
        show.join(" "),
        c.bytes_read,
        c.hint_layer,
        c.hint_ms,
        c.round_with_hint_ms,
        c.top_rows_ms,
        c.top_rows_bytes,
        c.whole_rows_ms,
        c.whole_rows_bytes
    );
    Ok(c)
}

/// [`Batching`] for k = 1, 2, 4 sessions of `m`, each after `prompt`.
fn batching(
    m: &Arc<GpuModel>,
    model: &str,
    backend: &str,
    prompt: &[u32],
    reps: usize,
) -> anyhow::Result<Batching> {
    let p = prompt.len();
    let block: Vec<u32> = prompt.iter().copied().cycle().take(5).collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut out = Batching {
        model: model.into(),
        backend: backend.into(),
        sessions: Vec::new(),
        batched_ms: Vec::new(),
        one_by_one_ms: Vec::new(),
        ratio: Vec::new(),
    };
    for k in [1, 2, 4] {
        let mut sessions = Vec::new();
        for _ in 0..k {
            let mut s = GpuSession::new(Arc::clone(m))?;
            s.forward(prompt, 0, tandem_gpu::Want::Argmax)?;
            sessions.push(s);
        }
        let (mut batched, mut alone) = (Vec::new(), Vec::new());
        for _ in 0..reps.max(1) {
            let t = Instant::now();
            let mut steps: Vec<tandem_gpu::BatchStep> = sessions
                .iter_mut()
                .map(|session| tandem_gpu::BatchStep {
                    session,
                    tokens: &block,
                    pos: p,
                    want: tandem_gpu::Want::Rows,
                    exit: None,
                })
                .collect();
            for r in m.forward_batch(&mut steps) {
                r?;
            }
            batched.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            for s in &mut sessions {
                s.forward(&block, p, tandem_gpu::Want::Rows)?;
            }
            alone.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let (b, a) = (median(batched), median(alone));
        out.sessions.push(k);
        out.batched_ms.push(b);
        out.one_by_one_ms.push(a);
        out.ratio.push(b / a);
    }
    let show: Vec<String> = (0..out.sessions.len())
        .map(|i| {
            format!(
                "{}: {:.1} vs {:.1} ms ({:.2})",
                out.sessions[i], out.batched_ms[i], out.one_by_one_ms[i], out.ratio[i]
            )
        })
        .collect();
    println!(
        "{:<20} {:<45} blocks of 5 of k sessions, one batch vs one by one: {}",
        out.model,
        out.backend,
        show.join(", ")
    );
    Ok(out)
}

/// Times of a greedy decode, and the tokens it produced.
struct Timing {
    prefill_s: f64,
    steps_s: f64,
    tokens: Vec<u32>,
}

/// Prefills `prompt`, takes one untimed warm-up step, calls `timed_from` with the
/// sequence, then times `steps` single-token greedy steps.
fn greedy<S: DraftForward>(
    seq: &mut S,
    prompt: &[u32],
    steps: usize,
    mut timed_from: impl FnMut(&S),
) -> anyhow::Result<Timing> {
    let t = Instant::now();
    let mut times = Vec::with_capacity(steps + 2);
    // Token 0 ends the prefill, token 1 the warm-up step; tokens 2..=steps+1 end the timed
    // steps (the last token is not run through the model).
    let tokens = decode::<_, anyhow::Error>(
        seq,
        prompt,
        steps + 2,
        false,
        |f| f.argmax,
        |_, s| {
            times.push(Instant::now());
            if times.len() == 2 {
                timed_from(s);
            }
            Ok(true)
        },
    )?;
    Ok(Timing {
        prefill_s: times[0].duration_since(t).as_secs_f64(),
        steps_s: times[steps + 1].duration_since(times[1]).as_secs_f64(),
        tokens: tokens[..steps + 1].to_vec(),
    })
}

fn print_row(r: &Row) {
    println!(
        "{:<20} {:<45} prefill {:>3} tok {:>6.2} s | decode {:>6.1} tok/s ({:>6.1} ms/step) | {:.0} submissions, {:.0} B read, {:.0} B written per token | weights {:.0} MiB",
        r.model,
        r.backend,
        r.prefill_tokens,
        r.prefill_s,
        r.draft_tokens_per_s,
        r.step_ms,
        r.submissions_per_token,
        r.bytes_read_per_token,
        r.bytes_written_per_token,
        r.weight_mib
    );
}
