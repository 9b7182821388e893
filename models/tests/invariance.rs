//! Batch invariance on the real models: the logits of one multi-token forward are bitwise
//! identical to those of the same tokens fed one at a time, in blocks of every size from 1
//! to 16, inside a 128-token prefill, after truncate + re-forward, and with one compute
//! thread or two. This is what keeps verification lossless. (The catalog models hold Q4_1,
//! Q5_0, Q8_0, Q4_K and Q6_K matrices; Q4_0 and Q5_K are checked bit for bit at the kernel
//! level in `quant::tests`.)

mod common;

use common::{PROMPTS, model};
use tandem_models::{Model, Tokenizer};

fn check(name: &str) {
    let path = model(name);
    let m = Model::load(&path).unwrap();
    let tok = Tokenizer::from_gguf(&path).unwrap();
    for prompt in PROMPTS.iter().take(2) {
        let ids = tok.encode(prompt).unwrap();
        let ids = &ids[..ids.len().min(24)];
        let mut c = m.new_cache();
        let block = m.forward(ids, 0, &mut c).unwrap();

        let mut c1 = m.new_cache();
        for (i, &t) in ids.iter().enumerate() {
            let single = m.forward(&[t], i, &mut c1).unwrap();
            assert_eq!(
                single.row(0),
                block.row(i),
                "{name}: position {i} one at a time differs from the block"
            );
        }

        // Prefill a prefix, then a 5-token verify block: same bits again.
        let split = ids.len() - 5;
        let mut c2 = m.new_cache();
        m.forward(&ids[..split], 0, &mut c2).unwrap();
        let verify = m.forward(&ids[split..], split, &mut c2).unwrap();
        for i in 0..5 {
            assert_eq!(
                verify.row(i),
                block.row(split + i),
                "{name}: verify block row {i}"
            );
        }

        // Speculate wrong tokens, roll back, re-forward the right ones.
        let mut c3 = m.new_cache();
        m.forward(&ids[..split], 0, &mut c3).unwrap();
        m.forward(&[1, 2, 3, 4], split, &mut c3).unwrap();
        c3.truncate(split);
        assert_eq!(c3.len(), split);
        let again = m.forward(&ids[split..], split, &mut c3).unwrap();
        assert_eq!(
            again, verify,
            "{name}: truncate + re-forward differs from a fresh cache"
        );

        // A lower start position rolls back by itself.
        let again2 = m.forward(&ids[split..], split, &mut c3).unwrap();
        assert_eq!(
            again2, verify,
            "{name}: forward at an earlier position did not roll back"
        );
    }
}

/// Feeds `ids[..start]` as one forward into `c`, then the rest in blocks of `n`, and checks
/// every position's logits against `whole` (the logits of all `ids` in one forward).
fn check_blocks(
    m: &Model,
    mut c: tandem_models::KvCache,
    ids: &[u32],
    start: usize,
    n: usize,
    whole: &tandem_models::Logits,
    what: &str,
) {
    if start > 0 {
        m.forward(&ids[..start], 0, &mut c).unwrap();
    }
    let mut at = start;
    while at < ids.len() {
        let end = (at + n).min(ids.len());
        let got = m.forward(&ids[at..end], at, &mut c).unwrap();
        for i in at..end {
            assert_eq!(
                got.row(i - at),
                whole.row(i),
                "{what}: position {i} in a block of {n} differs from the whole forward"
            );
        }
        at = end;
    }
}

/// Every block size from 1 to 16 after a 3-token prefill, a 128-token prefill against
/// 16-token blocks of the same tokens, and one thread against the process's pool.
fn check_blocks_prefill_and_threads(name: &str) {
    let path = model(name);
    let m = Model::load(&path).unwrap();
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let ids = tok.encode(PROMPTS[0]).unwrap();
    let ids = &ids[..ids.len().min(24)];
    let mut c = m.new_cache();
    let whole = m.forward(ids, 0, &mut c).unwrap();
    for n in 1..=16 {
        check_blocks(&m, m.new_cache(), ids, 3, n, &whole, name);
    }

    let long: Vec<u32> = PROMPTS
        .iter()
        .flat_map(|p| tok.encode(p).unwrap())
        .cycle()
        .take(128)
        .collect();
    let mut c = m.new_cache();
    let prefill = m.forward(&long, 0, &mut c).unwrap();
    let mut c = m.new_cache();
    for (b, chunk) in long.chunks(16).enumerate() {
        let got = m.forward(chunk, b * 16, &mut c).unwrap();
        for i in 0..chunk.len() {
            assert_eq!(
                got.row(i),
                prefill.row(b * 16 + i),
                "{name}: position {} of a 128-token prefill differs from 16-token blocks",
                b * 16 + i
            );
        }
    }

    let one_thread = tandem_models::single_threaded(|| {
        let mut c = m.new_cache();
        m.forward(ids, 0, &mut c).unwrap()
    });
    assert_eq!(
        one_thread,
        whole,
        "{name}: one compute thread gives other logits than the pool of {}",
        tandem_models::compute_threads()
    );
}

#[test]
fn smollm2_is_batch_invariant() {
    check("smollm2-135m");
    check_blocks_prefill_and_threads("smollm2-135m");
}

#[test]
fn qwen_coder_05b_is_batch_invariant() {
    check("qwen2.5-coder-0.5b");
    check_blocks_prefill_and_threads("qwen2.5-coder-0.5b");
}

/// An f16 KV cache keeps batch invariance bit for bit (keys and values are rounded when
/// stored and every position reads them back from the cache), and moves the logits only by
/// that rounding: on SmolLM2-135M and two prompts, the largest change of a logit was
/// 3.8% of that position's logit spread (max − min) and the greedy token never changed.
#[test]
fn f16_kv_cache_is_batch_invariant_and_close_to_f32() {
    use tandem_models::KvPrecision;
    let path = model("smollm2-135m");
    let m = Model::load(&path).unwrap();
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let mut worst = 0f32;
    for prompt in PROMPTS.iter().take(2) {
        let ids = tok.encode(prompt).unwrap();
        let ids = &ids[..ids.len().min(24)];
        let mut c = m.new_cache_with(KvPrecision::F16);
        let whole = m.forward(ids, 0, &mut c).unwrap();
        assert_eq!(c.precision(), KvPrecision::F16);
        for n in [1, 3, 5, 16] {
            let c = m.new_cache_with(KvPrecision::F16);
            check_blocks(&m, c, ids, 0, n, &whole, "f16 cache");
        }
        let mut c32 = m.new_cache();
        let full = m.forward(ids, 0, &mut c32).unwrap();
        assert_eq!(c32.size_bytes(), 2 * c.size_bytes(), "f16 halves the cache");
        for i in 0..ids.len() {
            let (a, b) = (whole.row(i), full.row(i));
            let spread = b.iter().copied().fold(f32::MIN, f32::max)
                - b.iter().copied().fold(f32::MAX, f32::min);
            let diff = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            worst = worst.max(diff / spread);
            let argmax = |r: &[f32]| {
                r.iter()
                    .enumerate()
                    .max_by(|x, y| x.1.total_cmp(y.1))
                    .unwrap()
                    .0
            };
            assert_eq!(
                argmax(a),
                argmax(b),
                "f16 cache changed the greedy token at {i}"
            );
        }
    }
    // Twice the measured worst; and not zero, which would mean the f16 cache was ignored.
    assert!(
        worst > 0.0 && worst < 0.08,
        "an f16 cache moved a logit by {worst} of the spread (measured: 0.038)"
    );
}

/// A batched forward over several sequences gives each the bits of its own forward: 1, 2,
/// 5 and 8 sequences of different prompts, positions, block lengths and row choices
/// (prefill chunks without logits among them), exits included; a bad step in the batch
/// gets its error and the others still run.
fn check_batches(name: &str) {
    use tandem_models::{Rows, Step};
    let path = model(name);
    let m = Model::load(&path).unwrap();
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let exit = m.config().n_layer / 2;
    // Eight sequences: prompt, the prefix already in the cache, the block this forward adds.
    let seqs: Vec<(Vec<u32>, usize, usize)> = (0..8)
        .map(|i| {
            let ids = tok.encode(PROMPTS[i % PROMPTS.len()]).unwrap();
            let ids = ids[..ids.len().min(20 + i)].to_vec();
            let (prefix, block) = [
                (0, 7),
                (3, 1),
                (9, 5),
                (4, 16),
                (12, 2),
                (0, 20),
                (15, 5),
                (6, 9),
            ][i];
            let block = block.min(ids.len() - prefix);
            (ids, prefix, block)
        })
        .collect();
    // What each sequence's block gives alone: all rows, and the exit's rows.
    let alone: Vec<(tandem_models::Logits, Vec<f32>)> = seqs
        .iter()
        .map(|(ids, prefix, block)| {
            let mut c = m.new_cache();
            if *prefix > 0 {
                m.forward(&ids[..*prefix], 0, &mut c).unwrap();
            }
            let mut hidden = Vec::new();
            let l = m
                .forward_with_exits(
                    &ids[*prefix..prefix + block],
                    *prefix,
                    &mut c,
                    Rows::All,
                    &[exit],
                    &mut |e| hidden = e.logits().unwrap().data,
                )
                .unwrap();
            (l, hidden)
        })
        .collect();
    for count in [1, 2, 5, 8] {
        let mut caches: Vec<_> = seqs[..count]
            .iter()
            .map(|(ids, prefix, _)| {
                let mut c = m.new_cache();
                if *prefix > 0 {
                    m.forward(&ids[..*prefix], 0, &mut c).unwrap();
                }
                c
            })
            .collect();
        let rows = [Rows::All, Rows::Last, Rows::None];
        let mut exits: Vec<Vec<f32>> = vec![Vec::new(); count];
        let results = {
            let mut sinks: Vec<_> = exits
                .iter_mut()
                .map(|slot| move |e: tandem_models::ExitLogits| *slot = e.logits().unwrap().data)
                .collect();
            let mut steps: Vec<Step> = seqs[..count]
                .iter()
                .zip(caches.iter_mut())
                .zip(sinks.iter_mut())
                .enumerate()
                .map(|(i, (((ids, prefix, block), cache), sink))| Step {
                    tokens: &ids[*prefix..prefix + block],
                    pos: *prefix,
                    cache,
                    rows: rows[i % 3],
                    exits: std::slice::from_ref(&exit),
                    on_exit: sink,
                })
                .collect();
            m.forward_batch(&mut steps)
        };
        for (i, r) in results.into_iter().enumerate() {
            let got = r.unwrap();
            let (want, want_exit) = &alone[i];
            let (_, prefix, block) = &seqs[i];
            let what = format!("{name}: sequence {i} of a batch of {count}");
            match rows[i % 3] {
                Rows::All => assert_eq!(&got, want, "{what}"),
                Rows::Last => assert_eq!(got.data, want.last(), "{what} (last row)"),
                Rows::None => assert!(got.data.is_empty(), "{what}: no rows asked"),
            }
            let v = m.config().vocab_size;
            let exit_want = match rows[i % 3] {
                Rows::All => &want_exit[..],
                Rows::Last => &want_exit[want_exit.len() - v..],
                Rows::None => &[][..],
            };
            assert_eq!(exits[i], exit_want, "{what}: exit layer {exit}");
            assert_eq!(caches[i].len(), prefix + block, "{what}: cache length");
        }
    }

    // A token out of range in one step: its error, the other step's bits.
    let (ids, prefix, block) = &seqs[2];
    let mut ca = m.new_cache();
    m.forward(&ids[..*prefix], 0, &mut ca).unwrap();
    let mut cb = m.new_cache();
    let bad = [u32::MAX];
    let mut steps = [
        Step {
            tokens: &bad,
            pos: 0,
            cache: &mut cb,
            rows: Rows::All,
            exits: &[],
            on_exit: &mut |_| {},
        },
        Step {
            tokens: &ids[*prefix..prefix + block],
            pos: *prefix,
            cache: &mut ca,
            rows: Rows::All,
            exits: &[],
            on_exit: &mut |_| {},
        },
    ];
    let mut r = m.forward_batch(&mut steps).into_iter();
    let err = r.next().unwrap().unwrap_err().to_string();
    assert!(
        err.contains("out of range") || err.contains(&u32::MAX.to_string()),
        "{err}"
    );
    assert_eq!(r.next().unwrap().unwrap(), alone[2].0);
}

#[test]
fn batched_forward_gives_every_sequence_its_own_bits() {
    check_batches("smollm2-135m");
    check_batches("qwen2.5-coder-0.5b");
}
