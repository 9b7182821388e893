//! The batch scheduler with real sessions on 127.0.0.1 (SmolLM2-135M): concurrent sessions
//! get the bits they get alone, no session waits unboundedly, the waiting room in front of
//! `--max-sessions`, and the KV memory cap.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tandem_client::{Endpoint, SessionClient};
use tandem_core::protocol::{ClientMsg, ErrorCode, ServerMsg};
use tandem_core::sampling::SamplingParams;
use tandem_verifier::{Limits, ServerConfig};

/// Session `i` of a concurrent run: its own prompt length, γ and sampling.
fn spec(i: usize) -> (Vec<u32>, usize, SamplingParams) {
    let ids = tokenizer().encode(PROMPTS[i % PROMPTS.len()]).unwrap();
    let cut = ids.len() - (i / PROMPTS.len()).min(ids.len() - 2);
    let params = if i.is_multiple_of(2) {
        SamplingParams::default()
    } else {
        SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            seed: 11 + i as u64,
        }
    };
    (ids[..cut].to_vec(), [4, 1, 3, 0, 5, 2, 4, 3][i], params)
}

const N: usize = 24;

/// Runs sessions `0..count` at once; what each saw, in order.
async fn run_together(ep: &Endpoint, count: usize) -> Vec<Run> {
    let runs: Vec<_> = (0..count)
        .map(|i| {
            let ep = ep.clone();
            tokio::spawn(async move {
                let (ids, gamma, params) = spec(i);
                speculative(&ep, hello(params, 64), &ids, N, gamma, None)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut out = Vec::new();
    for r in runs {
        out.push(r.await.unwrap());
    }
    out
}

/// Sessions of different prompts, γ and sampling run 1, 2, 5 and 8 at a time: each text is
/// the one the same session gives alone (greedy ones the target-only text), every round
/// with drafts still gets its early-exit hint before its result, and forwards did carry
/// several sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_get_the_bits_they_get_alone() {
    let config = ServerConfig {
        early_exit_layer: Some(24),
        ..ServerConfig::default()
    };
    let srv = server(config, &[SMOL]).await;
    let ep = Endpoint::plain(srv.addr.to_string());
    let mut alone = Vec::new();
    for i in 0..8 {
        let (ids, gamma, params) = spec(i);
        let run = speculative(&ep, hello(params, 64), &ids, N, gamma, None)
            .await
            .unwrap();
        if params.is_greedy() {
            assert_eq!(run.tokens, target_only(&ids, N), "session {i} alone");
        }
        alone.push(run.tokens);
    }
    for count in [1, 2, 5, 8] {
        let got = run_together(&ep, count).await;
        for (i, run) in got.iter().enumerate() {
            assert_eq!(
                run.tokens, alone[i],
                "session {i} of {count} at once differs from the same session alone"
            );
            let with_drafts = if spec(i).1 > 0 { run.rounds } else { 0 };
            assert_eq!(run.hints, with_drafts, "session {i} of {count}: hints");
            assert_eq!(run.bad_hints, 0, "session {i} of {count}");
        }
    }
    let forwards = metric(&srv, "tandem_batch_sessions_count");
    let pieces = metric(&srv, "tandem_batch_sessions_sum");
    assert!(
        pieces > forwards,
        "no forward carried more than one session ({pieces} pieces in {forwards} forwards)"
    );
}

/// With small batches (two rounds of γ = 4 fit in one forward, prompts in chunks of five),
/// eight sessions at once never wait for more forwards than the scheduler allows: each
/// session has at most one piece queued, so at most seven rounds are ahead of a round and
/// two go per forward (four forwards), and at most seven chunks ahead of a chunk, one or
/// more per forward (seven).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_waits_more_than_its_share_of_forwards() {
    let config = ServerConfig {
        limits: Limits {
            max_batch_tokens: 10,
            prefill_chunk: 5,
            ..Limits::default()
        },
        ..ServerConfig::default()
    };
    let srv = server(config, &[SMOL]).await;
    let ep = Endpoint::plain(srv.addr.to_string());
    let runs: Vec<_> = (0..8)
        .map(|i| {
            let ep = ep.clone();
            tokio::spawn(async move {
                let ids = tokenizer().encode(PROMPTS[i % PROMPTS.len()]).unwrap();
                let run = speculative(&ep, hello(SamplingParams::default(), 64), &ids, N, 4, None)
                    .await
                    .unwrap();
                (ids, run.tokens)
            })
        })
        .collect();
    for r in runs {
        let (ids, tokens) = r.await.unwrap();
        assert_eq!(tokens, target_only(&ids, N));
    }
    let (round, chunk) = (
        srv.state.metrics.max_forwards_waited(false),
        srv.state.metrics.max_forwards_waited(true),
    );
    assert!(
        round.max(chunk) >= 1,
        "the sessions never queued behind each other"
    );
    assert!(round <= 4, "a round waited {round} forwards (bound 4)");
    assert!(
        chunk <= 7,
        "a prompt chunk waited {chunk} forwards (bound 7)"
    );
    assert!(metric(&srv, "tandem_batch_rows_count") > 0.0);
}

/// Opens a session with a prompt and waits for its first token.
async fn open(ep: &Endpoint) -> SessionClient {
    let mut c = SessionClient::connect(ep).await.unwrap();
    c.send(&ClientMsg::Hello(hello(SamplingParams::default(), 8)))
        .unwrap();
    c.send(&ClientMsg::Prefill(tokenizer().encode(PROMPTS[1]).unwrap()))
        .unwrap();
    assert!(matches!(
        c.recv().await.unwrap(),
        Some(ServerMsg::Accepted(_))
    ));
    assert!(matches!(c.recv().await.unwrap(), Some(ServerMsg::First(_))));
    c
}

/// With one place and a waiting room of one: a waiter is refused after --queue-timeout, one
/// more than the room holds at once, and a waiter gets the place when it frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_wait_for_a_place_then_are_refused_clearly() {
    let config = ServerConfig {
        limits: Limits {
            max_sessions: 1,
            queue: 1,
            queue_timeout: Duration::from_secs(1),
            ..Limits::default()
        },
        ..ServerConfig::default()
    };
    let srv = server(config, &[SMOL]).await;
    let ep = Endpoint::plain(srv.addr.to_string());
    let a = open(&ep).await;

    let started = Instant::now();
    let mut b = SessionClient::connect(&ep).await.unwrap();
    b.send(&ClientMsg::Hello(hello(SamplingParams::default(), 8)))
        .unwrap();
    let (code, message) = error_code(&drain(&mut b).await).unwrap();
    assert_eq!(code, ErrorCode::Busy);
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(message.contains("--queue-timeout"), "{message}");
    assert_eq!(metric(&srv, "tandem_queue_timeouts_total"), 1.0);

    // c waits; d finds the room full and is refused at once.
    let c_ep = ep.clone();
    let c = tokio::spawn(async move { open(&c_ep).await });
    for _ in 0..100 {
        if srv.state.metrics.queue_waiting() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let mut d = SessionClient::connect(&ep).await.unwrap();
    d.send(&ClientMsg::Hello(hello(SamplingParams::default(), 8)))
        .unwrap();
    let (code, message) = error_code(&drain(&mut d).await).unwrap();
    assert_eq!(code, ErrorCode::Busy);
    assert!(message.contains("--queue"), "{message}");
    assert!(started.elapsed() < Duration::from_millis(900));

    // a leaves: c gets its place.
    drop(a);
    let _c = c.await.unwrap();
    assert_eq!(srv.state.metrics.queue_waiting(), 0);
}

/// Under --kv-memory-mb a session that would pass the cap (with its whole context) is
/// refused at Hello with what it needs; the KV memory in use is counted and freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_memory_is_capped_and_counted() {
    let c = target().config();
    let max_context = 512;
    let per_session = 2 * c.n_layer * c.kv_dim() * 4 * max_context;
    let config = ServerConfig {
        limits: Limits {
            max_context,
            kv_memory: Some(per_session * 3 / 2),
            ..Limits::default()
        },
        ..ServerConfig::default()
    };
    let srv = server(config, &[SMOL]).await;
    let ep = Endpoint::plain(srv.addr.to_string());
    let a = open(&ep).await;
    assert!(metric(&srv, "tandem_kv_cache_bytes") > 0.0);
    assert_eq!(
        metric(&srv, "tandem_kv_cache_reserved_bytes"),
        per_session as f64
    );

    let mut b = SessionClient::connect(&ep).await.unwrap();
    b.send(&ClientMsg::Hello(hello(SamplingParams::default(), 8)))
        .unwrap();
    let (code, message) = error_code(&drain(&mut b).await).unwrap();
    assert_eq!(code, ErrorCode::Busy);
    assert!(
        message.contains("--kv-memory-mb") && message.contains("MiB"),
        "{message}"
    );

    drop(a);
    for _ in 0..300 {
        if metric(&srv, "tandem_kv_cache_reserved_bytes") == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metric(&srv, "tandem_kv_cache_bytes"), 0.0);
    let _b = open(&ep).await;
}
