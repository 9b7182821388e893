//! Batched verification cost (a program that prints numbers, not a test): the time of one
//! [`Model::forward_batch`] over `k` sequences, each a block of `n` tokens at its own
//! context of CONTEXT tokens, against `k` forwards of one sequence each, for k = 1, 2, 4,
//! 8, 16. Each time is the minimum of REPS, the caches rolled back after each. Prints one
//! JSON object per k on stdout.
//!
//! usage: batch_curve MODEL.gguf [N=5] [REPS=3] [CONTEXT=160]

use std::time::Instant;

use tandem_models::{Model, Rows, Step};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: batch_curve MODEL.gguf [N=5] [REPS=3] [CONTEXT=160]")?;
    let n: usize = args.get(2).map_or(Ok(5), |s| s.parse())?;
    let reps: usize = args.get(3).map_or(Ok(3), |s| s.parse())?;
    let context: usize = args.get(4).map_or(Ok(160), |s| s.parse())?;
    let m = Model::load(path)?;
    let vocab = m.config().vocab_size as u32;
    let tokens = |seed: usize, len: usize| -> Vec<u32> {
        (0..len)
            .map(|i| ((seed * 7919 + i * 104_729) as u32 % (vocab - 1)) + 1)
            .collect()
    };
    let mut caches = Vec::new();
    let mut blocks = Vec::new();
    for s in 0..16 {
        let mut c = m.new_cache();
        m.forward_last(&tokens(s, context), 0, &mut c)?;
        caches.push(c);
        blocks.push(tokens(s + 100, n));
    }
    let one = {
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            m.forward(&blocks[0], context, &mut caches[0])?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        best
    };
    for k in [1, 2, 4, 8, 16] {
        let mut best = f64::MAX;
        for _ in 0..reps {
            let mut sinks: Vec<_> = (0..k).map(|_| |_: tandem_models::ExitLogits| {}).collect();
            let mut steps: Vec<Step> = caches[..k]
                .iter_mut()
                .zip(&blocks)
                .zip(sinks.iter_mut())
                .map(|((cache, b), sink)| Step {
                    tokens: b,
                    pos: context,
                    cache,
                    rows: Rows::All,
                    exits: &[],
                    on_exit: sink,
                })
                .collect();
            let t = Instant::now();
            for r in m.forward_batch(&mut steps) {
                r?;
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{{\"sessions\": {k}, \"rows\": {}, \"batched_ms\": {:.1}, \"separate_ms\": {:.1}, \"speedup\": {:.2}}}",
            k * n,
            best * 1e3,
            one * k as f64 * 1e3,
            one * k as f64 / best
        );
    }
    Ok(())
}
