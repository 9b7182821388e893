//! `tandem-bench gpu`: draft-model decode speed on every wgpu adapter found and on the CPU
//! engine, with the GPU's traffic per token (submissions, bytes read back and written).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tandem_gpu::{Gpu, GpuChoice, GpuModel, GpuSession};
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
    /// Where gpu.json goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

const PROMPT: &str = "def fib(n: int):\n    \"\"\"Return n-th Fibonacci number.\n    >>> fib(10)\n    55\n    \"\"\"\n";

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
    for name in &args.models {
        let path = tandem_models::fetch::resolve(name).with_context(|| format!("model {name}"))?;
        let tok = Tokenizer::from_gguf(&path)?;
        let prompt = tok.encode(PROMPT)?;
        // CPU engine.
        let mut cpu = CpuSequence::new(Arc::new(Model::load(&path)?));
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
        }
    }
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join("gpu.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(
            &serde_json::json!({ "adapters": adapters.iter().map(|a| a.to_string()).collect::<Vec<_>>(), "rows": rows }),
        )?,
    )?;
    eprintln!("wrote {}", path.display());
    Ok(())
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
