//! The verifier end to end: a real server on 127.0.0.1 running real SmolLM2-135M, driven by
//! a scripted client that drafts with a split-backbone drafter.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tandem_client::{Endpoint, SessionClient};
use tandem_core::protocol::{ClientMsg, ErrorCode, Message, ServerMsg, Verify};
use tandem_core::sampling::SamplingParams;
use tandem_verifier::{Limits, ServerConfig};

fn greedy() -> SamplingParams {
    SamplingParams::default()
}

fn config_with_exit(layer: usize) -> ServerConfig {
    ServerConfig {
        early_exit_layer: Some(layer),
        ..ServerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculative_greedy_output_equals_target_only() {
    let srv = server(config_with_exit(24), &[SMOL]).await;
    let ep = Endpoint::plain(srv.addr.to_string());
    let n = 40;
    let mut accepted = 0;
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let ids = tokenizer().encode(prompt).unwrap();
        let want = target_only(&ids, n);
        for gamma in [0, 1, 4] {
            let run = speculative(&ep, hello(greedy(), 64), &ids, n, gamma, None)
                .await
                .unwrap();
            assert_eq!(
                run.tokens,
                want,
                "prompt {i}, γ={gamma}: speculative output differs from target-only\n got: {:?}\nwant: {:?}",
                tokenizer().decode(&run.tokens),
                tokenizer().decode(&want)
            );
            // Every round with drafts streams one hint of γ+1 tokens before its result;
            // rounds without drafts get none.
            let want_hints = if gamma > 0 { run.rounds } else { 0 };
            assert_eq!(run.hints, want_hints, "prompt {i}, γ={gamma}");
            assert_eq!(run.bad_hints, 0);
            assert_eq!(run.accepted.as_ref().unwrap().early_exit_layer, 24);
            if gamma == 0 {
                // Cloud autoregressive: one round trip per token after the first.
                assert_eq!(run.rounds, n - 1);
            }
            accepted += run.accepted_drafts;
        }
    }
    assert!(accepted > 0, "the drafter never had a token accepted");
    let metrics = srv.state.metrics.render();
    assert!(metrics.contains("tandem_rounds_total"), "{metrics}");
}

/// With `--kv-cache f16` the verifier stays lossless: speculative greedy output equals the
/// same server's cloud-autoregressive output (both read keys and values rounded to f16;
/// the models' tests bound what the rounding does to the logits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f16_kv_cache_keeps_speculation_lossless() {
    let mut config = config_with_exit(24);
    config.limits.kv_cache = tandem_models::KvPrecision::F16;
    let srv = server(config, &[SMOL]).await;
    let ep = Endpoint::plain(srv.addr.to_string());
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let ids = tokenizer().encode(prompt).unwrap();
        let ar = speculative(&ep, hello(greedy(), 64), &ids, 32, 0, None)
            .await
            .unwrap();
        let spec = speculative(&ep, hello(greedy(), 64), &ids, 32, 4, None)
            .await
            .unwrap();
        assert_eq!(spec.tokens, ar.tokens, "prompt {i}: f16 cache, γ=4 vs γ=0");
        assert_eq!(ar.tokens.len(), 32);
    }
}

/// With a confidence threshold a hint is sent only when the exit is sure of all of it: on
/// the untrained lens at block 24 fewer rounds then get one (each still well formed), and
/// the output stays the target's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hint_confidence_threshold_withholds_unsure_hints() {
    let mut strict = config_with_exit(24);
    strict.limits.hint_confidence = 0.9;
    let srv = server(strict, &[SMOL]).await;
    let open = server(config_with_exit(24), &[SMOL]).await;
    let (mut sure, mut all, mut rounds) = (0, 0, 0);
    for prompt in PROMPTS {
        let ids = tokenizer().encode(prompt).unwrap();
        let want = target_only(&ids, 24);
        let ep = Endpoint::plain(srv.addr.to_string());
        let run = speculative(&ep, hello(greedy(), 64), &ids, 24, 4, None)
            .await
            .unwrap();
        assert_eq!(run.tokens, want, "output changed with a hint threshold");
        assert_eq!(run.bad_hints, 0);
        sure += run.hints;
        rounds += run.rounds;
        let ep = Endpoint::plain(open.addr.to_string());
        let run = speculative(&ep, hello(greedy(), 64), &ids, 24, 4, None)
            .await
            .unwrap();
        all += run.hints;
    }
    assert_eq!(
        all, rounds,
        "without a threshold every round with drafts has a hint"
    );
    assert!(
        sure < all,
        "a threshold of 0.9 withheld no hint ({sure} of {all})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_sessions_are_reproducible_for_a_seed() {
    let srv = server(ServerConfig::default(), &[SMOL]).await;
    let ep = Endpoint::plain(srv.addr.to_string());
    let ids = tokenizer().encode(PROMPTS[1]).unwrap();
    let params = |seed| SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed,
    };
    let a = speculative(&ep, hello(params(7), 64), &ids, 24, 3, None)
        .await
        .unwrap();
    let b = speculative(&ep, hello(params(7), 64), &ids, 24, 3, None)
        .await
        .unwrap();
    assert_eq!(a.tokens, b.tokens, "same seeds must give the same text");
    assert!(a.rounds > 0);
    let vocab = target().config().vocab_size as u32;
    assert!(a.tokens.iter().all(|&t| t < vocab));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_keeps_running_sessions_and_serves_new_ones_on_the_new_version() {
    let smol = smol();
    let v1 = format!("smol@1={}", smol.display());
    let srv = server(ServerConfig::default(), &[&v1]).await;
    let ep = Endpoint::plain(srv.addr.to_string());
    let barrier = Arc::new(tokio::sync::Barrier::new(5));
    let n = 24;
    let mut tasks = Vec::new();
    for i in 0..4 {
        let ep = ep.clone();
        let b = barrier.clone();
        let ids = tokenizer().encode(PROMPTS[i % PROMPTS.len()]).unwrap();
        tasks.push(tokio::spawn(async move {
            let run = speculative(&ep, hello(greedy(), 64), &ids, n, 2, Some(b))
                .await
                .unwrap();
            (ids, run)
        }));
    }
    // All four are mid-generation: load version 2 and retire version 1.
    barrier.wait().await;
    let state = srv.state.clone();
    let spec = format!("smol@2={}", smol.display()).parse().unwrap();
    tokio::task::spawn_blocking(move || state.load(&spec))
        .await
        .unwrap()
        .unwrap();
    let old = srv.state.registry.retire("smol", "1").unwrap();
    assert_eq!(
        old.active_sessions(),
        4,
        "the retired version still serves its 4 sessions"
    );
    barrier.wait().await;
    for t in tasks {
        let (ids, run) = t.await.unwrap();
        assert_eq!(run.accepted.unwrap().version, "1");
        assert_eq!(run.tokens, target_only(&ids, n));
    }
    // Sessions end asynchronously after Close; then nothing holds the old version.
    for _ in 0..300 {
        if old.active_sessions() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(old.active_sessions(), 0);
    let ids = tokenizer().encode(PROMPTS[0]).unwrap();
    let run = speculative(&ep, hello(greedy(), 64), &ids, 8, 2, None)
        .await
        .unwrap();
    assert_eq!(run.accepted.unwrap().version, "2");
    assert_eq!(run.tokens, target_only(&ids, 8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_an_error_and_others_keep_being_served() {
    let srv = server(ServerConfig::default(), &[SMOL]).await;
    let ep = Endpoint::plain(srv.addr.to_string());
    let ids = tokenizer().encode(PROMPTS[1]).unwrap();
    // A good session opened before the bad ones, finished after them.
    let mut good = SessionClient::connect(&ep).await.unwrap();
    good.send(&ClientMsg::Hello(hello(greedy(), 64))).unwrap();
    good.send(&ClientMsg::Prefill(ids.clone())).unwrap();
    assert!(matches!(
        good.recv().await.unwrap(),
        Some(ServerMsg::Accepted(_))
    ));
    let first = match good.recv().await.unwrap() {
        Some(ServerMsg::First(t)) => t,
        other => panic!("{other:?}"),
    };

    let hello_frame = ClientMsg::Hello(hello(greedy(), 64)).to_frame();
    let mut unknown = ClientMsg::Close.to_frame();
    unknown[2] = 0x42; // [len, version, type]
    let mut version = ClientMsg::Close.to_frame();
    version[1] = 99;
    let oversized = vec![0xff, 0xff, 0xff, 0xff, 0x0f]; // varint u32::MAX
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("unknown type", vec![unknown.clone()]),
        ("wrong version", vec![version]),
        ("oversized", vec![oversized]),
        (
            "unknown type after Hello",
            vec![hello_frame.clone(), unknown],
        ),
        ("garbage", vec![vec![3, 0, 0, 0, 1, 0x02, 0xff]]),
        ("Verify before Hello", vec![ClientMsg::Cancel(1).to_frame()]),
    ];
    for (what, frames) in cases {
        let mut c = SessionClient::connect(&ep).await.unwrap();
        for f in frames {
            c.send_raw(f).unwrap();
        }
        let msgs = tokio::time::timeout(Duration::from_secs(60), drain(&mut c))
            .await
            .unwrap_or_else(|_| panic!("{what}: the server did not end the stream"));
        let (code, message) = error_code(&msgs).unwrap_or_else(|| panic!("{what}: {msgs:?}"));
        assert!(
            matches!(code, ErrorCode::Malformed | ErrorCode::BadRequest),
            "{what}: {code:?} {message}"
        );
    }
    // A stream cut inside a frame.
    let mut c = SessionClient::connect(&ep).await.unwrap();
    c.send_raw(hello_frame[..10].to_vec()).unwrap();
    c.finish();
    let msgs = drain(&mut c).await;
    assert!(msgs.iter().all(|m| !matches!(m, ServerMsg::Accepted(_))));

    // Bad requests inside a valid session: wrong position, oversized draft.
    let mut c = SessionClient::connect(&ep).await.unwrap();
    c.send(&ClientMsg::Hello(hello(greedy(), 64))).unwrap();
    c.send(&ClientMsg::Prefill(ids.clone())).unwrap();
    c.send(&ClientMsg::Verify(Verify {
        round: 0,
        pos: 3,
        prev: 0,
        tokens: vec![],
        q: vec![],
    }))
    .unwrap();
    let msgs = drain(&mut c).await;
    let (code, message) = error_code(&msgs).unwrap();
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("position 3"), "{message}");

    // The good session still works.
    let pos = ids.len() as u32 + 1;
    good.send(&ClientMsg::Verify(Verify {
        round: 0,
        pos,
        prev: first,
        tokens: vec![],
        q: vec![],
    }))
    .unwrap();
    assert!(matches!(
        good.recv().await.unwrap(),
        Some(ServerMsg::Result(_))
    ));
    good.send(&ClientMsg::Close).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incompatible_drafters_are_refused_with_what_differs() {
    let srv = server(ServerConfig::default(), &[SMOL]).await;
    let ep = Endpoint::plain(srv.addr.to_string());
    let mut h = hello(greedy(), 8);
    h.tokenizer[0] ^= 1;
    let mut c = SessionClient::connect(&ep).await.unwrap();
    c.send(&ClientMsg::Hello(h)).unwrap();
    let (code, message) = error_code(&drain(&mut c).await).unwrap();
    assert_eq!(code, ErrorCode::Incompatible);
    assert!(message.contains("tokenizer"), "{message}");

    let mut h = hello(greedy(), 8);
    h.backbone.as_mut().unwrap().fingerprint[0] ^= 1;
    let mut c = SessionClient::connect(&ep).await.unwrap();
    c.send(&ClientMsg::Hello(h)).unwrap();
    let (code, message) = error_code(&drain(&mut c).await).unwrap();
    assert_eq!(code, ErrorCode::Incompatible);
    assert!(
        message.contains("backbone") && message.contains("smollm2-135m@1"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_limit_and_release_when_the_client_disappears() {
    let config = ServerConfig {
        limits: Limits {
            max_sessions: 1,
            // No waiting room: the second session is refused at once.
            queue: 0,
            max_draft: 4,
            ..Limits::default()
        },
        ..ServerConfig::default()
    };
    let srv = server(config, &[SMOL]).await;
    let ep = Endpoint::plain(srv.addr.to_string());
    let ids = tokenizer().encode(PROMPTS[1]).unwrap();
    let mut a = SessionClient::connect(&ep).await.unwrap();
    a.send(&ClientMsg::Hello(hello(greedy(), 8))).unwrap();
    a.send(&ClientMsg::Prefill(ids.clone())).unwrap();
    assert!(matches!(
        a.recv().await.unwrap(),
        Some(ServerMsg::Accepted(_))
    ));
    assert!(matches!(a.recv().await.unwrap(), Some(ServerMsg::First(_))));

    let mut b = SessionClient::connect(&ep).await.unwrap();
    b.send(&ClientMsg::Hello(hello(greedy(), 8))).unwrap();
    let (code, _) = error_code(&drain(&mut b).await).unwrap();
    assert_eq!(code, ErrorCode::Busy);

    // The client vanishes without Close: the session and its slot are released.
    drop(a);
    let state = srv.state.clone();
    for _ in 0..300 {
        if state.metrics.sessions_active() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state.metrics.sessions_active(), 0);

    // A draft longer than the limit.
    let mut c = SessionClient::connect(&ep).await.unwrap();
    c.send(&ClientMsg::Hello(hello(greedy(), 8))).unwrap();
    c.send(&ClientMsg::Prefill(ids.clone())).unwrap();
    let first = loop {
        match c.recv().await.unwrap() {
            Some(ServerMsg::First(t)) => break t,
            Some(ServerMsg::Accepted(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    c.send(&ClientMsg::Verify(Verify {
        round: 0,
        pos: ids.len() as u32 + 1,
        prev: first,
        tokens: vec![1; 5],
        q: vec![1.0; 5],
    }))
    .unwrap();
    let (code, message) = error_code(&drain(&mut c).await).unwrap();
    assert_eq!(code, ErrorCode::LimitExceeded);
    assert!(message.contains("limit of 4"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_closed_after_the_idle_timeout() {
    let config = ServerConfig {
        limits: Limits {
            idle_timeout: Duration::from_secs(1),
            ..Limits::default()
        },
        ..ServerConfig::default()
    };
    let srv = server(config, &[SMOL]).await;
    let ep = Endpoint::plain(srv.addr.to_string());
    // Silent before Hello.
    let mut c = SessionClient::connect(&ep).await.unwrap();
    let (code, message) = error_code(&drain(&mut c).await).unwrap();
    assert_eq!(code, ErrorCode::LimitExceeded);
    assert!(message.contains("no Hello"), "{message}");
    // Silent after Hello.
    let mut c = SessionClient::connect(&ep).await.unwrap();
    c.send(&ClientMsg::Hello(hello(greedy(), 8))).unwrap();
    let msgs = drain(&mut c).await;
    assert!(matches!(msgs[0], ServerMsg::Accepted(_)), "{msgs:?}");
    let (code, message) = error_code(&msgs).unwrap();
    assert_eq!(code, ErrorCode::LimitExceeded);
    assert!(message.contains("no message"), "{message}");
    assert_eq!(srv.state.metrics.sessions_active(), 0);
}

/// A session lasts at most `max_session_time`, however busy or quiet it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_end_at_their_maximum_time() {
    let config = ServerConfig {
        limits: Limits {
            max_session_time: Duration::from_secs(2),
            ..Limits::default()
        },
        ..ServerConfig::default()
    };
    let srv = server(config, &[SMOL]).await;
    let ep = Endpoint::plain(srv.addr.to_string());
    let ids = tokenizer().encode(PROMPTS[0]).unwrap();
    let mut c = SessionClient::connect(&ep).await.unwrap();
    c.send(&ClientMsg::Hello(hello(greedy(), 8))).unwrap();
    c.send(&ClientMsg::Prefill(ids)).unwrap();
    let msgs = drain(&mut c).await;
    assert!(matches!(msgs[1], ServerMsg::First(_)), "{msgs:?}");
    let (code, message) = error_code(&msgs).unwrap();
    assert_eq!(code, ErrorCode::Expired);
    assert!(message.contains("maximum time of 2 s"), "{message}");
    assert_eq!(srv.state.metrics.sessions_active(), 0);
}

/// While the worker is busy (a long prefill), the server reads at most its inbound queue of a
/// client's messages ahead: a flood waits in HTTP/2 flow control, not in server memory, and
/// is then served in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_session_reads_only_its_inbound_queue_ahead() {
    let config = ServerConfig {
        limits: Limits {
            inbound_queue: 4,
            ..Limits::default()
        },
        ..ServerConfig::default()
    };
    let srv = server(config, &[SMOL]).await;
    let ep = Endpoint::plain(srv.addr.to_string());
    let one = tokenizer().encode(PROMPTS[1]).unwrap();
    let prompt: Vec<u32> = one.iter().copied().cycle().take(1500).collect();
    let (tx, mut rx) = SessionClient::connect(&ep).await.unwrap().split();
    tx.send(&ClientMsg::Hello(hello(greedy(), 8))).unwrap();
    tx.send(&ClientMsg::Prefill(prompt)).unwrap();
    let flood = 30_000;
    for r in 0..flood {
        tx.send(&ClientMsg::Cancel(1_000_000 + r)).unwrap();
    }
    let sent = tx.bytes_up() as f64;
    let first_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = first_seen.clone();
    let reader = tokio::spawn(async move {
        let mut msgs = Vec::new();
        loop {
            let m = match rx.recv().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => panic!("the session stream failed: {e:#}"),
            };
            if matches!(m, ServerMsg::First(_)) {
                seen.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            msgs.push(m);
        }
        msgs
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let read_during_prefill = metric(&srv, "tandem_bytes_in_total");
    assert!(
        !first_seen.load(std::sync::atomic::Ordering::SeqCst),
        "the 1500-token prefill ended within 500 ms: lengthen it so the check runs while it is busy"
    );
    assert!(
        read_during_prefill < sent / 2.0,
        "the server read {read_during_prefill} of {sent} bytes while the session was busy"
    );
    // Once the prefill is done the rest is read and served; the session then ends cleanly.
    while !first_seen.load(std::sync::atomic::Ordering::SeqCst) {
        if reader.is_finished() {
            panic!(
                "the session ended before its first token: {:?}",
                reader.await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..600 {
        if metric(&srv, "tandem_bytes_in_total") >= sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&srv, "tandem_bytes_in_total"), sent);
    tx.send(&ClientMsg::Close).unwrap();
    let msgs = reader.await.unwrap();
    assert!(error_code(&msgs).is_none(), "{msgs:?}");
}

/// Connections beyond `max_connections` are closed on accept; a connection that sends
/// nothing, or an HTTP/1 header that never ends, is closed after the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_and_handshake_timeouts() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = ServerConfig {
        max_connections: 2,
        handshake_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let srv = server(config, &[SMOL]).await;
    let silent = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let mut slow = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A third connection is closed at once.
    let mut third = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(30), third.read(&mut buf))
        .await
        .expect("the connection over the cap was left open");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(metric(&srv, "tandem_connections_refused_total") >= 1.0);
    // The silent one and the slow header are closed by the timeout.
    for (what, mut s) in [("silent", silent), ("slow header", slow)] {
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest)).await;
        assert!(r.is_ok(), "the {what} connection was never closed");
    }
    // With the slots free again, requests are served.
    let mut ok = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    ok.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = Vec::new();
    ok.read_to_end(&mut resp).await.unwrap();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

/// One connection carries at most `max_streams` concurrent streams: a third session on it
/// waits until one of the first two ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_are_capped() {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tandem_client::body::ChannelBody;
    let config = ServerConfig {
        max_streams: 2,
        ..ServerConfig::default()
    };
    let srv = server(config, &[SMOL]).await;
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let open = |body: ChannelBody| {
        let mut send = send.clone();
        async move {
            let req = hyper::Request::post("/v1/session")
                .header("content-type", "application/x-tandem-session")
                .body(body)
                .unwrap();
            send.send_request(req).await.unwrap()
        }
    };
    let (tx1, b1) = ChannelBody::new();
    let first = open(b1).await;
    let (_tx2, b2) = ChannelBody::new();
    let _second = open(b2).await;
    let (_tx3, b3) = ChannelBody::new();
    let third = tokio::spawn(open(b3));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "a third stream was opened beside two");
    // The first session ends (its client closes the stream before Hello): the third opens.
    drop(tx1);
    let _ = first.into_body().collect().await;
    let resp = tokio::time::timeout(Duration::from_secs(30), third)
        .await
        .expect("the third stream never opened")
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// An exit block — a transformer block with its own KV state; here block 15's weights as
/// they are, read through the model's final norm — serves hints as an adapter does: every
/// round with drafts gets one, none is malformed, and the output stays the target's, for
/// sessions run one at a time and two batched together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_block_serves_hints_and_changes_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("smol-exit-block.gguf");
    let (_, mut tensors) = tandem_models::load_tensors(&smol()).unwrap();
    let mut extra = Vec::new();
    let names: Vec<String> = tensors.keys().cloned().collect();
    for name in names {
        let renamed = match name.strip_prefix("blk.15.") {
            Some(rest) => format!("exit.15.blk.{rest}"),
            None if name == "output_norm.weight" => "exit.15.output_norm.weight".into(),
            None => continue,
        };
        let t = std::sync::Arc::into_inner(tensors.remove(&name).unwrap()).unwrap();
        extra.push((renamed, t));
    }
    tandem_models::backbone::write_model(smol(), &file, None, extra, Vec::new()).unwrap();
    let spec = format!("smol-exit={}", file.display());
    let srv = server(config_with_exit(15), &[&spec]).await;
    let ep = Endpoint::plain(srv.addr.to_string());
    let hello_exit = || hello(greedy(), 64);
    for prompt in PROMPTS {
        let ids = tokenizer().encode(prompt).unwrap();
        let run = speculative(&ep, hello_exit(), &ids, 24, 4, None)
            .await
            .unwrap();
        assert_eq!(run.tokens, target_only(&ids, 24), "output changed");
        assert_eq!(run.bad_hints, 0);
        assert_eq!(run.hints, run.rounds, "a round with drafts got no hint");
    }
    let a = tokenizer().encode(PROMPTS[0]).unwrap();
    let b = tokenizer().encode(PROMPTS[1]).unwrap();
    let (ra, rb) = tokio::join!(
        speculative(&ep, hello_exit(), &a, 24, 4, None),
        speculative(&ep, hello_exit(), &b, 24, 4, None)
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.tokens, target_only(&a, 24));
    assert_eq!(rb.tokens, target_only(&b, 24));
    assert_eq!(ra.bad_hints + rb.bad_hints, 0);
}
