//! The `tandem-verifier` binary and its HTTP surface: auth, health, metrics, admin,
//! completions (JSON and SSE), and sessions over TLS.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tandem_client::{Endpoint, SessionClient};
use tandem_core::protocol::{ClientMsg, ErrorCode, ServerMsg};
use tandem_core::sampling::SamplingParams;
use tandem_verifier::ServerConfig;

/// A `tandem-verifier serve` process, killed when dropped.
struct Verifier {
    child: Child,
    addr: String,
}

impl Drop for Verifier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_verifier(args: &[&str]) -> Verifier {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem-verifier"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit("://")
        .next()
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    assert!(line.starts_with("tandem-verifier listening on"), "{line:?}");
    Verifier { child, addr }
}

/// The text of generated tokens up to the first end-of-sequence token (what a completion
/// returns).
fn text_before_eos(ids: &[u32]) -> String {
    let eos = tokenizer().eos_tokens();
    let end = ids
        .iter()
        .position(|t| eos.contains(t))
        .unwrap_or(ids.len());
    tokenizer().decode(&ids[..end]).unwrap()
}

/// One HTTP/1.1 request; returns status and body.
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = send
        .send_request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(text.to_vec()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_completions_admin_and_metrics_behind_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "# accepted tokens\ns3cret\n").unwrap();
    let admin_tokens = dir.path().join("admin-tokens");
    std::fs::write(&admin_tokens, "adm1n\n").unwrap();
    // The model directory admins may load from: a file that is not a model, and a symlink
    // that leads out of it.
    let models = dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    std::fs::write(models.join("junk.gguf"), b"not a model").unwrap();
    std::os::unix::fs::symlink(smol(), models.join("escape.gguf")).unwrap();
    let v = spawn_verifier(&[
        "--target",
        SMOL,
        "--token-file",
        tokens.to_str().unwrap(),
        "--admin-token-file",
        admin_tokens.to_str().unwrap(),
        "--model-dir",
        models.to_str().unwrap(),
        "--max-targets",
        "2",
    ]);
    let a = v.addr.as_str();

    // Health and metrics are open; everything else needs the token.
    assert_eq!(http(a, "GET", "/healthz", None, "").await.0, 200);
    assert_eq!(http(a, "GET", "/metrics", None, "").await.0, 200);
    let (s, body) = http(a, "GET", "/admin/targets", None, "").await;
    assert_eq!(s, 401, "{body}");
    assert!(body.contains("bearer token"), "{body}");
    assert_eq!(
        http(a, "GET", "/admin/targets", Some("wrong"), "").await.0,
        401
    );
    let req = r#"{"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}"#;
    assert_eq!(http(a, "POST", "/v1/completions", None, req).await.0, 401);

    // Session stream: no token anywhere → Error, no model work; the token in Hello → served.
    let ep = Endpoint::plain(a);
    let greedy = SamplingParams::default();
    let mut c = SessionClient::connect(&ep).await.unwrap();
    c.send(&ClientMsg::Hello(hello(greedy, 8))).unwrap();
    match c.recv().await.unwrap() {
        Some(ServerMsg::Error { code, .. }) => assert_eq!(code, ErrorCode::Unauthorized),
        other => panic!("{other:?}"),
    }
    let wrong_header = Endpoint {
        bearer: Some("nope".into()),
        ..ep.clone()
    };
    let err = SessionClient::connect(&wrong_header).await.err().unwrap();
    assert!(err.to_string().contains("401"), "{err}");
    let mut h = hello(greedy, 8);
    h.token = Some("s3cret".into());
    let ids = tokenizer().encode(PROMPTS[1]).unwrap();
    let run = speculative(&ep, h, &ids, 6, 2, None).await.unwrap();
    assert_eq!(run.tokens, target_only(&ids, 6));
    let (_, metrics) = http(a, "GET", "/metrics", None, "").await;
    assert!(metrics.contains("tandem_unauthorized_total 5"), "{metrics}");
    assert!(metrics.contains("tandem_verify_seconds_count"), "{metrics}");

    // Completions: JSON and SSE give the target-only greedy text.
    let prompt_ids = tokenizer().encode("The capital of France is").unwrap();
    let want = text_before_eos(&target_only(&prompt_ids, 12));
    let (s, body) = http(a, "POST", "/v1/completions", Some("s3cret"), req).await;
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["text"], want.as_str());
    assert_eq!(v["model"], "smollm2-135m@1");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    let stream_req = r#"{"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "stream": true}"#;
    let (s, body) = http(a, "POST", "/v1/completions", Some("s3cret"), stream_req).await;
    assert_eq!(s, 200);
    let mut text = String::new();
    let events: Vec<&str> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    for e in &events[..events.len() - 1] {
        let v: serde_json::Value = serde_json::from_str(e).unwrap();
        text.push_str(v["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(text, want);

    // Bad requests say what is wrong.
    let (s, body) = http(
        a,
        "POST",
        "/v1/completions",
        Some("s3cret"),
        "{\"max_tokens\": 3}",
    )
    .await;
    assert_eq!(s, 400);
    assert!(body.contains("prompt"), "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
    let (s, body) = http(
        a,
        "POST",
        "/v1/completions",
        Some("s3cret"),
        r#"{"prompt": "x", "model": "gpt-9"}"#,
    )
    .await;
    assert_eq!(s, 404);
    assert!(body.contains("smollm2-135m@1"), "{body}");

    // Admin: list, load a second version, retire the first.
    let (s, body) = http(a, "GET", "/admin/targets", Some("adm1n"), "").await;
    assert_eq!(s, 200);
    assert!(body.contains("\"version\":\"1\""), "{body}");
    // A client token is not an admin token.
    let (s, body) = http(a, "GET", "/admin/targets", Some("s3cret"), "").await;
    assert_eq!(s, 401, "{body}");
    let load = r#"{"model": "smollm2-135m", "family": "smollm2-135m"}"#.to_string();
    let (s, body) = http(a, "POST", "/admin/targets", Some("adm1n"), &load).await;
    assert_eq!(s, 201, "{body}");
    assert!(body.contains("\"version\":\"2\""), "{body}");
    // The same version again is a conflict, in the one error shape of both servers.
    let again = r#"{"model": "smollm2-135m", "family": "smollm2-135m", "version": "2"}"#;
    let (s, body) = http(a, "POST", "/admin/targets", Some("adm1n"), again).await;
    assert_eq!(s, 409, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "conflict_error", "{body}");
    assert!(v["error"]["code"].is_null(), "{body}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already loaded")
    );
    // Loads stay inside the model directory and answer without server paths.
    let secret_dir = models.canonicalize().unwrap();
    for (model, status, says) in [
        (
            "/etc/passwd",
            403,
            "not a file under the verifier's model directory",
        ),
        (
            "../tokens",
            403,
            "not a file under the verifier's model directory",
        ),
        (
            "escape.gguf",
            403,
            "not a file under the verifier's model directory",
        ),
        ("missing.gguf", 404, "no model `missing.gguf`"),
        ("junk.gguf", 400, "not a valid GGUF file"),
    ] {
        let req = format!(r#"{{"model": "{model}", "family": "x", "version": "9"}}"#);
        let (s, body) = http(a, "POST", "/admin/targets", Some("adm1n"), &req).await;
        assert_eq!(s, status, "{model}: {body}");
        assert!(body.contains(says), "{model}: {body}");
        assert!(
            !body.contains(secret_dir.to_str().unwrap()),
            "{model}: {body}"
        );
    }
    // Names that could not be retired through the URL are refused; so is a third target.
    let bad = r#"{"model": "smollm2-135m", "family": "a/b"}"#;
    let (s, body) = http(a, "POST", "/admin/targets", Some("adm1n"), bad).await;
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("bad target name `a/b`"), "{body}");
    let third = r#"{"model": "smollm2-135m", "family": "smollm2-135m", "version": "3"}"#;
    let (s, body) = http(a, "POST", "/admin/targets", Some("adm1n"), third).await;
    assert_eq!(s, 409, "{body}");
    assert!(body.contains("--max-targets"), "{body}");
    let (s, _) = http(
        a,
        "DELETE",
        "/admin/targets/smollm2-135m/1",
        Some("adm1n"),
        "",
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = http(
        a,
        "DELETE",
        "/admin/targets/smollm2-135m/1",
        Some("adm1n"),
        "",
    )
    .await;
    assert_eq!(s, 404);
    let (_, body) = http(a, "GET", "/admin/targets", Some("adm1n"), "").await;
    assert!(
        !body.contains("\"version\":\"1\"") && body.contains("\"version\":\"2\""),
        "{body}"
    );
}

/// Runs `tandem-verifier serve ARGS`, which must fail; returns its stderr.
fn refused(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem-verifier"))
        .arg("serve")
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn binary_reports_bad_arguments_clearly() {
    let err = refused(&["--listen", "127.0.0.1:0", "--target", "no-such-model"]);
    assert!(
        err.contains("no-such-model") && err.contains("smollm2-135m"),
        "{err}"
    );
    let err = refused(&["--target", SMOL, "--early-exit-layer", "30"]);
    assert!(err.contains("early-exit layer 30"), "{err}");
    let err = refused(&["--target", SMOL, "--hint-confidence", "1.5"]);
    assert!(err.contains("--hint-confidence must be in [0, 1)"), "{err}");
    let err = refused(&["--target", SMOL, "--device", "tpu"]);
    assert!(
        err.contains("bad device `tpu`: expected cpu, gpu or gpu:NAME"),
        "{err}"
    );
    let err = refused(&["--target", SMOL, "--device", "gpu:no-such-adapter"]);
    assert!(
        err.contains("on gpu:no-such-adapter") && err.contains("no-such-adapter"),
        "{err}"
    );
    // Off loopback without a token is refused before any model is read or port bound.
    let err = refused(&["--listen", "0.0.0.0:0", "--target", "no-such-model"]);
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without tokens")
            && err.contains("--insecure-no-auth"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_run_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let config = ServerConfig {
        tls: Some((cert.clone(), key)),
        ..ServerConfig::default()
    };
    let srv = server(config, &[SMOL]).await;
    let ep = Endpoint {
        addr: srv.addr.to_string(),
        tls: Some((cert, "localhost".into())),
        bearer: None,
    };
    let ids = tokenizer().encode(PROMPTS[0]).unwrap();
    let run = speculative(&ep, hello(SamplingParams::default(), 16), &ids, 10, 3, None)
        .await
        .unwrap();
    assert_eq!(run.tokens, target_only(&ids, 10));
    // Cleartext to a TLS port fails instead of hanging.
    let plain = Endpoint::plain(srv.addr.to_string());
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        SessionClient::connect(&plain),
    )
    .await;
    assert!(
        matches!(r, Ok(Err(_))),
        "cleartext to a TLS server must fail"
    );
}

/// `tandem-verifier serve --device gpu:NAME`: the target is on the GPU (so says
/// `/admin/targets`), and a greedy completion there — whole rows read back for the shared
/// acceptance rule and log-probabilities — gives the GPU target's own greedy text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_runs_targets_on_a_gpu() {
    let device = format!("gpu:{}", adapter());
    let v = spawn_verifier(&["--target", SMOL, "--device", &device]);
    let a = v.addr.as_str();
    let (s, body) = http(a, "GET", "/admin/targets", None, "").await;
    assert_eq!(s, 200, "{body}");
    assert!(body.contains(r#""device":"gpu: "#), "{body}");
    let prompt_ids = tokenizer().encode("The capital of France is").unwrap();
    let want = text_before_eos(&tokio::task::block_in_place(|| {
        gpu_target_only(&prompt_ids, 8)
    }));
    let req = r#"{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "logprobs": 2}"#;
    let (s, body) = http(a, "POST", "/v1/completions", None, req).await;
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["text"], want.as_str(), "{body}");
    assert!(
        v["choices"][0]["logprobs"]["top_logprobs"].is_array(),
        "{body}"
    );
}
