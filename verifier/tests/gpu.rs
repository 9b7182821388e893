//! The verifier with its target on a GPU (`--device gpu:NAME`), on a real wgpu adapter —
//! in CI Mesa's llvmpipe, which runs the kernels on the CPU. Greedy speculative output on
//! the GPU verifier equals the GPU target's own output token for token; against the CPU
//! verifier it differs only after a near-tie of the CPU's logits (the two engines sum
//! floats in different orders, see gpu/tests/parity.rs).

mod common;

use common::*;
use tandem_client::Endpoint;
use tandem_core::sampling::SamplingParams;
use tandem_verifier::{Device, ServerConfig, TargetSpec};

/// Largest CPU top-2 gap at which a different greedy token counts as a near-tie (the edge
/// parity tests' rule).
const TIE_TOL: f32 = 0.5;

fn gpu_config(exit: Option<usize>) -> ServerConfig {
    ServerConfig {
        device: Device::Gpu(Some(adapter())),
        early_exit_layer: exit,
        ..ServerConfig::default()
    }
}

/// Greedy speculative sessions (γ = 0 and 4, hints from block 15) on the GPU verifier give
/// exactly the GPU target's own greedy output, one at a time and three at once (their
/// rounds batched on the device: some forward carried several sessions); every round with
/// drafts gets one well-formed hint, computed on the device and read back before the
/// round's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_speculative_greedy_output_equals_gpu_target_only() {
    let srv = server(gpu_config(Some(15)), &[SMOL]).await;
    let t = srv.state.registry.list()[0].clone();
    assert!(t.device().starts_with("gpu: "), "{}", t.device());
    let ep = Endpoint::plain(srv.addr.to_string());
    let n = 20;
    let mut accepted = 0;
    let mut wants = Vec::new();
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let ids = tokenizer().encode(prompt).unwrap();
        let want = tokio::task::block_in_place(|| gpu_target_only(&ids, n));
        wants.push((ids.clone(), want.clone()));
        for gamma in [0, 4] {
            let run = speculative(
                &ep,
                hello(SamplingParams::default(), 64),
                &ids,
                n,
                gamma,
                None,
            )
            .await
            .unwrap();
            assert_eq!(
                run.tokens,
                want,
                "prompt {i}, γ={gamma}: GPU speculative output differs from GPU target-only\n got: {:?}\nwant: {:?}",
                tokenizer().decode(&run.tokens),
                tokenizer().decode(&want)
            );
            let want_hints = if gamma > 0 { run.rounds } else { 0 };
            assert_eq!(run.hints, want_hints, "prompt {i}, γ={gamma}");
            assert_eq!(run.bad_hints, 0, "prompt {i}, γ={gamma}");
            accepted += run.accepted_drafts;
        }
    }
    assert!(accepted > 0, "the drafter never had a token accepted");
    // Shorter runs at once: llvmpipe gains nothing from the batch, so this only adds time.
    let m = 8;
    let together: Vec<_> = wants
        .iter()
        .map(|(ids, _)| {
            let (ep, ids) = (ep.clone(), ids.clone());
            tokio::spawn(async move {
                speculative(&ep, hello(SamplingParams::default(), 64), &ids, m, 4, None)
                    .await
                    .unwrap()
            })
        })
        .collect();
    for (i, (run, (_, want))) in together.into_iter().zip(&wants).enumerate() {
        let run = run.await.unwrap();
        assert_eq!(run.tokens, want[..m], "prompt {i}, three sessions at once");
        assert_eq!(run.hints, run.rounds, "prompt {i}, three at once");
        assert_eq!(run.bad_hints, 0, "prompt {i}, three at once");
    }
    let forwards = metric(&srv, "tandem_batch_sessions_count");
    let pieces = metric(&srv, "tandem_batch_sessions_sum");
    assert!(
        pieces > forwards,
        "no forward on the GPU carried more than one session ({pieces} pieces in {forwards})"
    );
}

/// The GPU verifier against the CPU verifier, greedy γ = 4 on the test prompts: the outputs
/// agree up to the first position where the CPU's top two logits are within `TIE_TOL`
/// (asserted there, and counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_and_cpu_verifiers_differ_only_at_near_ties() {
    let gpu = server(gpu_config(None), &[SMOL]).await;
    let gpu_ep = Endpoint::plain(gpu.addr.to_string());
    let cpu = target();
    let n = 24;
    let mut near_ties = 0;
    let mut agreed = 0;
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let ids = tokenizer().encode(prompt).unwrap();
        let want = target_only(&ids, n);
        let run = speculative(
            &gpu_ep,
            hello(SamplingParams::default(), 64),
            &ids,
            n,
            4,
            None,
        )
        .await
        .unwrap();
        match run.tokens.iter().zip(&want).position(|(g, c)| g != c) {
            None => agreed += 1,
            Some(at) => {
                let mut seq = ids.clone();
                seq.extend_from_slice(&want[..at]);
                let l = cpu.forward_last(&seq, 0, &mut cpu.new_cache()).unwrap();
                let mut row = l.last().to_vec();
                let (best, first) = (want[at] as usize, row[want[at] as usize]);
                row[best] = f32::NEG_INFINITY;
                let second = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                assert!(
                    first - second < TIE_TOL,
                    "prompt {i}: the GPU verifier chose {} at token {at} where the CPU's \
                     {best} leads by {} (not a near-tie)",
                    run.tokens[at],
                    first - second
                );
                near_ties += 1;
            }
        }
    }
    eprintln!("{agreed} prompts agree on all {n} tokens, {near_ties} part at a near-tie");
}

/// Sampled sessions on the GPU are reproducible for a seed, and the verdicts from the top
/// entries and normalizers computed on the device are those from whole rows read back
/// (`--whole-rows`): the same tokens, with top-p and without, for γ = 1 and 4; a device that does not exist is refused at load, naming the
/// adapters there are; a second version loaded on the GPU beside the first (its own device
/// buffers) serves new sessions, as a hot-swap does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_sampling_is_reproducible_and_bad_devices_are_refused() {
    let srv = server(gpu_config(None), &[SMOL]).await;
    let ep = Endpoint::plain(srv.addr.to_string());
    let ids = tokenizer().encode(PROMPTS[1]).unwrap();
    let sampling = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: 7,
    };
    let a = speculative(&ep, hello(sampling, 64), &ids, 16, 3, None)
        .await
        .unwrap();
    let b = speculative(&ep, hello(sampling, 64), &ids, 16, 3, None)
        .await
        .unwrap();
    assert_eq!(a.tokens, b.tokens);
    let mut whole = gpu_config(None);
    whole.limits.top_rows = false;
    let whole = server(whole, &[SMOL]).await;
    let whole_ep = Endpoint::plain(whole.addr.to_string());
    let mut rounds = 0;
    for (i, prompt) in PROMPTS[1..2].iter().enumerate() {
        let ids = tokenizer().encode(prompt).unwrap();
        for (gamma, top_p) in [(4, 1.0), (1, 0.9)] {
            let params = SamplingParams {
                temperature: 0.9,
                top_p,
                seed: 20 + i as u64,
            };
            let top = speculative(&ep, hello(params, 64), &ids, 10, gamma, None)
                .await
                .unwrap();
            let rows = speculative(&whole_ep, hello(params, 64), &ids, 10, gamma, None)
                .await
                .unwrap();
            assert_eq!(
                top.tokens, rows.tokens,
                "prompt {i}, γ = {gamma}, top-p {top_p}: top rows against whole rows"
            );
            rounds += top.rounds;
        }
    }
    assert!(rounds > 0);
    let spec = TargetSpec {
        family: Some("other".into()),
        version: None,
        model: SMOL.into(),
        early_exit_layer: None,
        device: Some(Device::Gpu(Some("no-such-adapter".into()))),
    };
    let st = srv.state.clone();
    let e = tokio::task::spawn_blocking(move || st.load(&spec))
        .await
        .unwrap()
        .err()
        .unwrap();
    let e = e.to_string();
    assert!(
        e.contains("no GPU adapter's name contains `no-such-adapter`"),
        "{e}"
    );
    assert!(e.contains("adapters found"), "{e}");
    let spec = TargetSpec {
        family: Some(srv.state.registry.list()[0].family.clone()),
        version: Some("2".into()),
        model: SMOL.into(),
        early_exit_layer: None,
        device: Some(Device::Gpu(Some(adapter()))),
    };
    let st = srv.state.clone();
    let v2 = tokio::task::spawn_blocking(move || st.load(&spec))
        .await
        .unwrap()
        .unwrap();
    assert!(v2.device().starts_with("gpu: "), "{}", v2.device());
    assert_eq!(srv.state.registry.list().len(), 2);
    let ids = tokenizer().encode(PROMPTS[0]).unwrap();
    let run = speculative(&ep, hello(SamplingParams::default(), 64), &ids, 8, 4, None)
        .await
        .unwrap();
    assert_eq!(run.accepted.as_ref().unwrap().version, "2");
    let want = tokio::task::block_in_place(|| gpu_target_only(&ids, 8));
    assert_eq!(run.tokens, want, "the second version's output");
}
