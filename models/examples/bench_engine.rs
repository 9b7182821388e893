//! Engine benchmark (a program that prints numbers, not a test), at the thread count the
//! engine runs with (`RAYON_NUM_THREADS`, capped at the CPUs this process may use). Prints
//! one JSON object on stdout:
//!
//! - `tok_s`: greedy decode tokens/s over DECODE tokens after a short prompt;
//! - `verify_curve`: time of an n-token forward over a 1-token forward at a 256-token
//!   context, n = 2, 3, 5, 8, 16 (`verify5_over_verify1` is n = 5); each time the minimum of
//!   REPS, the cache rolled back after each;
//! - `prefill_tok_s`: a 128-token prompt in one forward (median of 3);
//! - `load_s`: seconds to load the model (weight matrices are mapped, not read);
//! - `rss_mib_loaded`, `rss_mib_2048`: resident memory after loading and with a 2048-token
//!   context in the KV cache;
//! - `kernel`: the kernel path the engine chose for this CPU.
//!
//! usage: bench_engine MODEL.gguf [DECODE_TOKENS] [REPS] [RSS_CONTEXT] [f32|f16]
//! (the last: how the KV cache stores keys and values, f32 by default)
//! (RSS_CONTEXT 0 skips the 2048-token fill and reports `rss_mib_2048` as null)

use std::time::Instant;

use tandem_models::{KvCache, KvPrecision, Model, Tokenizer};

const PROMPT: &str = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n";
const CURVE: [usize; 5] = [2, 3, 5, 8, 16];
const CONTEXT: usize = 256;
const PREFILL: usize = 128;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: bench_engine MODEL.gguf [DECODE_TOKENS] [REPS] [RSS_CONTEXT] [f32|f16]")?;
    let n_decode: usize = args.get(2).map_or(Ok(64), |s| s.parse())?;
    let reps: usize = args.get(3).map_or(Ok(5), |s| s.parse())?;
    let rss_context: usize = args.get(4).map_or(Ok(2048), |s| s.parse())?;
    let kv = match args.get(5).map(String::as_str) {
        None | Some("f32") => KvPrecision::F32,
        Some("f16") => KvPrecision::F16,
        Some(other) => return Err(format!("KV precision {other:?}: use f32 or f16").into()),
    };

    let t_load = Instant::now();
    let m = Model::load(path)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let rss_loaded = rss_mib();
    let tok = Tokenizer::from_gguf(path)?;
    let prompt = tok.encode(PROMPT)?;
    // A long input: the prompt's tokens repeated (the values matter little to timing).
    let long: Vec<u32> = prompt
        .iter()
        .copied()
        .cycle()
        .take(rss_context.max(CONTEXT + 16))
        .collect();

    // Decode.
    let mut cache = m.new_cache_with(kv);
    let logits = m.forward_last(&prompt, 0, &mut cache)?;
    let mut next = argmax(logits.last());
    let mut pos = cache.len();
    m.forward(&[next], pos, &mut cache)?; // warm-up step
    cache.truncate(pos);
    let t = Instant::now();
    for _ in 0..n_decode {
        pos = cache.len();
        let l = m.forward(&[next], pos, &mut cache)?;
        next = argmax(l.last());
    }
    let tok_s = n_decode as f64 / t.elapsed().as_secs_f64();

    // Verify blocks at a 256-token context.
    let mut cache = m.new_cache_with(kv);
    m.forward_last(&long[..CONTEXT], 0, &mut cache)?;
    let block: Vec<u32> = long[CONTEXT..CONTEXT + 16].to_vec();
    let time = |n: usize, cache: &mut KvCache| -> Result<f64, tandem_models::Error> {
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let s = Instant::now();
            m.forward(&block[..n], CONTEXT, cache)?;
            best = best.min(s.elapsed().as_secs_f64());
            cache.truncate(CONTEXT);
        }
        Ok(best)
    };
    let t1 = time(1, &mut cache)?;
    let mut curve = Vec::new();
    for n in CURVE {
        curve.push((n, time(n, &mut cache)? / t1));
    }

    // Prefill of a 128-token prompt.
    let mut runs = Vec::new();
    for _ in 0..3 {
        let mut c = m.new_cache_with(kv);
        let s = Instant::now();
        m.forward_last(&long[..PREFILL], 0, &mut c)?;
        runs.push(s.elapsed().as_secs_f64());
    }
    runs.sort_by(f64::total_cmp);
    let prefill_tok_s = PREFILL as f64 / runs[1];

    // Memory with a 2048-token context (filled in 256-token forwards).
    let mut c = m.new_cache_with(kv);
    let mut rss_2048 = "null".to_string();
    if rss_context > 0 {
        for chunk in long[..rss_context].chunks(256) {
            m.forward_last(chunk, c.len(), &mut c)?;
        }
        rss_2048 = format!("{:.1}", rss_mib());
    }

    let curve_json: Vec<String> = curve
        .iter()
        .map(|(n, r)| format!("\"{n}\":{r:.3}"))
        .collect();
    println!(
        "{{\"model\":{:?},\"threads\":{},\"kernel\":\"{}\",\"decode_tokens\":{n_decode},\"tok_s\":{tok_s:.3},\
         \"verify1_ms\":{:.3},\"verify_curve\":{{{}}},\"verify5_over_verify1\":{:.3},\
         \"prefill_tok_s\":{prefill_tok_s:.2},\"load_s\":{load_s:.3},\"rss_mib_loaded\":{rss_loaded:.1},\"rss_mib_2048\":{rss_2048},\
         \"kv_mib\":{:.1},\"kv\":\"{kv:?}\"}}",
        std::path::Path::new(path)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        tandem_models::compute_threads(),
        tandem_models::quant::kernel(),
        t1 * 1e3,
        curve_json.join(","),
        curve.iter().find(|(n, _)| *n == 5).map_or(0.0, |c| c.1),
        c.size_bytes() as f64 / (1 << 20) as f64,
    );
    Ok(())
}

/// Resident set size of this process in MiB (Linux; 0 elsewhere).
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
