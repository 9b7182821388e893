//! Engine benchmark (a program that prints numbers, not a test): greedy decode tokens/s and
//! the cost of a 5-token forward relative to a 1-token forward, at the thread count given by
//! `RAYON_NUM_THREADS`. Prints one JSON object on stdout.
//!
//! usage: bench_engine MODEL.gguf [DECODE_TOKENS] [REPS]

use std::time::Instant;

use tandem_models::{Model, Tokenizer};

const PROMPT: &str = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: bench_engine MODEL.gguf [DECODE_TOKENS] [REPS]")?;
    let n_decode: usize = args.get(2).map_or(Ok(64), |s| s.parse())?;
    let reps: usize = args.get(3).map_or(Ok(5), |s| s.parse())?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());

    let m = Model::load(path)?;
    let tok = Tokenizer::from_gguf(path)?;
    let ids = tok.encode(PROMPT)?;
    let mut cache = m.new_cache();
    let logits = m.forward_last(&ids, 0, &mut cache)?;
    let mut next = tandem_core_argmax(logits.last());
    // Warm-up step (first-use packing, thread pools).
    let mut pos = cache.len();
    m.forward(&[next], pos, &mut cache)?;
    cache.truncate(pos);

    let t = Instant::now();
    for _ in 0..n_decode {
        pos = cache.len();
        let l = m.forward(&[next], pos, &mut cache)?;
        next = tandem_core_argmax(l.last());
    }
    let decode_s = t.elapsed().as_secs_f64();
    let tok_s = n_decode as f64 / decode_s;

    // Verify-block ratio at the current context: forward of 5 tokens vs 1, rolled back.
    let base = cache.len();
    let block = [next; 5];
    let mut t1 = f64::INFINITY;
    let mut t5 = f64::INFINITY;
    for _ in 0..reps {
        let s = Instant::now();
        m.forward(&block[..1], base, &mut cache)?;
        t1 = t1.min(s.elapsed().as_secs_f64());
        cache.truncate(base);
        let s = Instant::now();
        m.forward(&block, base, &mut cache)?;
        t5 = t5.min(s.elapsed().as_secs_f64());
        cache.truncate(base);
    }
    println!(
        "{{\"model\":{:?},\"threads\":{:?},\"decode_tokens\":{n_decode},\"tok_s\":{tok_s:.3},\"verify1_ms\":{:.3},\"verify5_ms\":{:.3},\"verify5_over_verify1\":{:.3}}}",
        std::path::Path::new(path)
            .file_name()
            .unwrap()
            .to_string_lossy(),
        threads,
        t1 * 1e3,
        t5 * 1e3,
        t5 / t1
    );
    Ok(())
}

fn tandem_core_argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
