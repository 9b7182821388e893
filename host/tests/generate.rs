//! `tandem generate` end to end: the real drafter component (built from guest-drafter),
//! the `tandem` binary, and a real verifier on 127.0.0.1, all on SmolLM2-135M.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tandem_models::Model;
use tandem_verifier::{RunningServer, ServerConfig, State, TargetSpec};

const SMOL: &str = "smollm2-135m";
const PROMPTS: [&str; 3] = [
    "def fib(n):",
    "The capital of France is",
    "def is_palindrome(text: str):\n    \"\"\"\n    Checks if given string is a palindrome\n    \"\"\"\n",
];

fn smol() -> PathBuf {
    tandem_models::fetch::resolve(SMOL).expect("run `bash ci/test`, which fetches the test models")
}

/// Builds the drafter component (or its hostile test variant) with cargo, once.
fn guest(hostile: bool) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target_dir = if hostile {
        root.join("target/hostile-guest")
    } else {
        root.join("target")
    };
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root).args([
        "build",
        "--profile",
        "wasm",
        "-p",
        "tandem-guest-drafter",
        "--target",
        "wasm32-wasip2",
        "--target-dir",
    ]);
    cmd.arg(&target_dir);
    if hostile {
        cmd.args(["--features", "hostile"]);
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "building the drafter component failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    target_dir.join("wasm32-wasip2/wasm/tandem_guest_drafter.wasm")
}

/// A split-backbone drafter of SmolLM2 (first 26 of 30 blocks), made once.
fn drafter_model() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let out = dir.join("host-smollm2-backbone-26.gguf");
        let tmp = dir.join(format!(
            "host-smollm2-backbone-26.{}.tmp",
            std::process::id()
        ));
        tandem_models::backbone::split_backbone(smol(), 26, &tmp).unwrap();
        std::fs::rename(&tmp, &out).unwrap();
        out
    })
}

fn target_only(prompt: &str, n: usize) -> Vec<u32> {
    static M: OnceLock<Model> = OnceLock::new();
    let m = M.get_or_init(|| Model::load(smol()).unwrap());
    let tok = tandem_models::Tokenizer::from_gguf(smol()).unwrap();
    let ids = tok.encode(prompt).unwrap();
    let mut cache = m.new_cache();
    let mut logits = m.forward_last(&ids, 0, &mut cache).unwrap();
    let mut out = Vec::new();
    let mut pos = ids.len();
    while out.len() < n {
        let t = tandem_core::sampling::argmax(logits.last());
        if tok.eos_tokens().contains(&t) {
            break;
        }
        out.push(t);
        logits = m.forward_last(&[t], pos, &mut cache).unwrap();
        pos += 1;
    }
    out
}

/// A verifier on 127.0.0.1 inside its own runtime.
struct Verifier {
    rt: tokio::runtime::Runtime,
    srv: Option<RunningServer>,
    url: String,
}

impl Drop for Verifier {
    fn drop(&mut self) {
        let _g = self.rt.enter();
        self.srv.take();
    }
}

fn verifier(
    early_exit: Option<usize>,
    delay_ms: u64,
) -> (Verifier, Option<tandem_client::shaper::Shaper>) {
    let config = ServerConfig {
        early_exit_layer: early_exit,
        ..ServerConfig::default()
    };
    verifier_with(config, delay_ms)
}

fn verifier_with(
    config: ServerConfig,
    delay_ms: u64,
) -> (Verifier, Option<tandem_client::shaper::Shaper>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (srv, shaper) = rt.block_on(async {
        // The verifier also drafts by itself, for the cloud-sd strategy.
        let draft =
            tandem_verifier::server::ServerDraft::load(drafter_model().to_str().unwrap()).unwrap();
        let state = State::with_draft(config, Some(draft));
        let spec: TargetSpec = SMOL.parse().unwrap();
        state.load(&spec).unwrap();
        let srv = tandem_verifier::start(state).await.unwrap();
        let shaper = if delay_ms > 0 {
            Some(
                tandem_client::shaper::start(
                    srv.addr,
                    tandem_client::shaper::Link {
                        delay: Duration::from_millis(delay_ms / 2),
                        rate_bps: None,
                    },
                )
                .await
                .unwrap(),
            )
        } else {
            None
        };
        (srv, shaper)
    });
    let addr = shaper.as_ref().map_or(srv.addr, |s| s.addr);
    (
        Verifier {
            rt,
            srv: Some(srv),
            url: format!("http://{addr}"),
        },
        shaper,
    )
}

fn generate(args: &[&str], wasm_cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("generate")
        .args(args)
        .env("TANDEM_WASM_CACHE", wasm_cache)
        .output()
        .unwrap()
}

fn stats(o: &Output, path: &Path) -> serde_json::Value {
    assert!(
        o.status.success(),
        "tandem generate failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn greedy_output_equals_target_only_for_every_strategy() {
    let wasm = guest(false);
    let (v, _) = verifier(Some(27), 0);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("stats.json");
    let n = 24;
    let mut first_run = true;
    let tok = tandem_models::Tokenizer::from_gguf(smol()).unwrap();
    for prompt in PROMPTS {
        let want = target_only(prompt, n);
        let want_text = tok.decode(&want).unwrap();
        for (strategy, extra) in [
            ("cloud-ar", None),
            ("cloud-sd", None),
            ("sync", None),
            ("tandem", None),
            ("tandem", Some("--no-hints")),
            ("tandem", Some("--no-pipeline")),
        ] {
            let mut flags = vec!["--strategy", strategy];
            flags.extend(extra);
            let o = generate(
                &[
                    "--verifier",
                    &v.url,
                    "--drafter",
                    wasm.to_str().unwrap(),
                    "--draft-model",
                    drafter_model().to_str().unwrap(),
                    "--prompt",
                    prompt,
                    "--max-tokens",
                    &n.to_string(),
                    "--gamma",
                    "4",
                    "--stats-json",
                    json.to_str().unwrap(),
                ]
                .into_iter()
                .chain(flags.iter().copied())
                .collect::<Vec<_>>(),
                dir.path(),
            );
            let s = stats(&o, &json);
            assert_eq!(
                s["text"],
                want_text.as_str(),
                "{strategy} {extra:?} on {prompt:?}"
            );
            if strategy == "cloud-sd" {
                // Runs entirely on the verifier: no component involved.
                continue;
            }
            assert_eq!(ids(&s), want, "{strategy} {extra:?} on {prompt:?}");
            // The text streamed on stdout is the decoded tokens.
            let stdout = String::from_utf8_lossy(&o.stdout);
            assert_eq!(
                stdout.strip_suffix('\n').unwrap(),
                s["text"].as_str().unwrap()
            );
            assert!(String::from_utf8_lossy(&o.stderr).contains("tok/s"));
            // The compiled component is cached after the first start.
            assert_eq!(s["component_cached"], !first_run, "{strategy}");
            first_run = false;
            match strategy {
                "cloud-ar" => assert_eq!(s["drafted"], 0),
                _ => assert!(s["drafted"].as_u64().unwrap() > 0),
            }
        }
    }
    // `tandem info` sees the compiled component, made by this engine, and the file's hash;
    // a compiled file of another engine (another wasmtime or CPU) is counted as incompatible.
    let info = |dir: &Path| -> serde_json::Value {
        let o = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["info", "--json", "--drafter", wasm.to_str().unwrap()])
            .env("TANDEM_WASM_CACHE", dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let i = info(dir.path());
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&wasm).unwrap()))
    };
    assert_eq!(i["drafters"]["component_sha256"], sha.as_str());
    assert_eq!(i["drafters"]["component_compiled"], true, "{i}");
    assert_eq!(i["wasmtime"]["cached"], 1, "{i}");
    assert_eq!(i["wasmtime"]["cached_compatible"], 1, "{i}");
    assert_eq!(i["arch"], std::env::consts::ARCH);
    assert_eq!(
        i["kernel"]["chosen"],
        tandem_models::quant::kernel().to_string().as_str()
    );
    let other = tempfile::tempdir().unwrap();
    std::fs::write(
        other
            .path()
            .join(format!("{}-0123456789abcdef.cwasm", &sha[..24])),
        b"x",
    )
    .unwrap();
    let i = info(other.path());
    assert_eq!(i["wasmtime"]["cached"], 1, "{i}");
    assert_eq!(i["wasmtime"]["cached_compatible"], 0, "{i}");
    assert_eq!(i["drafters"]["component_compiled"], false, "{i}");

    // A tampered compiled component is never deserialized: it is recompiled (with a
    // warning) and the next start uses the fresh one.
    let cached: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let mut bytes = std::fs::read(&cached[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&cached[0], &bytes).unwrap();
    for (tampered, want_cached) in [(true, false), (false, true)] {
        let o = generate(
            &[
                "--verifier",
                &v.url,
                "--drafter",
                wasm.to_str().unwrap(),
                "--draft-model",
                drafter_model().to_str().unwrap(),
                "--prompt",
                PROMPTS[0],
                "--max-tokens",
                "4",
                "--strategy",
                "cloud-ar",
                "--stats-json",
                json.to_str().unwrap(),
            ],
            dir.path(),
        );
        let s = stats(&o, &json);
        assert_eq!(s["component_cached"], want_cached);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            err.contains("does not carry this user's cache tag"),
            tampered,
            "{err}"
        );
    }
}

#[test]
fn over_a_slow_link_drafting_overlaps_verification_and_hints_are_used() {
    let wasm = guest(false);
    // Hints from block 29 of SmolLM2's 30 are right more often than the 26-block drafter,
    // so once contested hints have proved it the drafter follows them (an exit that is
    // wrong more often than the drafter is not followed: the guest's unit tests).
    let (v, _shaper) = verifier(Some(29), 80);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("stats.json");
    let prompt = PROMPTS[2];
    let o = generate(
        &[
            "--verifier",
            &v.url,
            "--drafter",
            wasm.to_str().unwrap(),
            "--draft-model",
            drafter_model().to_str().unwrap(),
            "--prompt",
            prompt,
            "--max-tokens",
            "32",
            "--strategy",
            "tandem",
            "--gamma",
            "4",
            "--stats-json",
            json.to_str().unwrap(),
        ],
        dir.path(),
    );
    let s = stats(&o, &json);
    assert_eq!(ids(&s), target_only(prompt, 32));
    assert!(s["drafted_in_flight"].as_u64().unwrap() > 0, "{s}");
    assert!(s["hints"].as_u64().unwrap() > 0, "{s}");
    assert!(s["hints_used"].as_u64().unwrap() > 0, "{s}");
    // The link's delay shows in the measured RTT (80 ms emulated).
    assert!(s["rtt_ms"].as_f64().unwrap() > 40.0, "{s}");
}

#[test]
fn sampling_with_a_seed_reproduces_the_same_text() {
    let wasm = guest(false);
    let (v, _) = verifier(None, 0);
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let json = dir.path().join(name);
        let o = generate(
            &[
                "--verifier",
                &v.url,
                "--drafter",
                wasm.to_str().unwrap(),
                "--draft-model",
                drafter_model().to_str().unwrap(),
                "--prompt",
                PROMPTS[1],
                "--max-tokens",
                "24",
                "--temperature",
                "0.8",
                "--top-p",
                "0.95",
                "--seed",
                "42",
                "--gamma",
                "3",
                "--strategy",
                "sync",
                "--stats-json",
                json.to_str().unwrap(),
            ],
            dir.path(),
        );
        stats(&o, &json)
    };
    let a = run("a.json");
    let b = run("b.json");
    assert_eq!(a["text"], b["text"]);
    assert!(a["tokens"].as_u64().unwrap() > 0);
}

#[test]
fn hostile_and_broken_components_are_stopped_with_clear_errors() {
    let hostile = guest(true);
    let (v, _) = verifier(None, 0);
    let dir = tempfile::tempdir().unwrap();
    // A component whose step loops forever, and one that allocates without bound (the
    // hostile test build misbehaves according to the wasi:nn name of its model).
    for (behaviour, want) in [
        ("hostile-loop", "ran longer than the limit"),
        ("hostile-alloc", "memory past the limit of 64 MiB"),
        // Emits token ids the verifier did not commit: the host refuses to print them.
        ("hostile-flip", "but the verifier committed"),
        // Steps forever without an action (each call returns at once).
        (
            "hostile-spin",
            "steps in a row without sending, emitting or waiting",
        ),
        // wasi-nn: one compute past every position the session could need (its time cannot
        // be cut by the epoch deadline, so it is refused before it starts), and a KV cache
        // grown until it meets the memory budget it shares with linear memory.
        ("hostile-contexts", "more than 4 execution contexts"),
        ("hostile-long", "beyond this session's"),
        ("hostile-kv", "KV caches would hold"),
        // Host copies of guest bytes kept alive, counted against the same budget.
        ("hostile-tensors", "tensors would hold"),
    ] {
        let o = generate(
            &[
                "--verifier",
                &v.url,
                "--drafter",
                hostile.to_str().unwrap(),
                "--draft-model",
                drafter_model().to_str().unwrap(),
                "--graph-name",
                behaviour,
                "--prompt",
                "hi",
                "--guest-timeout",
                // hostile-kv computes 1280 positions before it is refused.
                if behaviour == "hostile-kv" {
                    "120"
                } else {
                    "2"
                },
                "--guest-memory-mb",
                "64",
                "--max-tokens",
                // Room for the KV cache (40 KB a position) to outgrow 64 MiB before the
                // position cap.
                if behaviour == "hostile-kv" {
                    "2000"
                } else {
                    "4"
                },
            ],
            dir.path(),
        );
        assert!(!o.status.success(), "{behaviour} was not stopped");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{behaviour}: {err}");
        assert!(!err.contains("panicked"), "{behaviour}: {err}");
        if behaviour == "hostile-flip" {
            // Nothing the target did not produce reached stdout, and the error names the
            // component.
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(out.trim().is_empty(), "{behaviour} printed: {out}");
            assert!(err.contains("tandem_guest_drafter.wasm"), "{err}");
        }
    }
    // The verifier is still serving after the failed sessions.
    let json = dir.path().join("after.json");
    let o = generate(
        &[
            "--verifier",
            &v.url,
            "--drafter",
            guest(false).to_str().unwrap(),
            "--draft-model",
            drafter_model().to_str().unwrap(),
            "--prompt",
            "hi",
            "--max-tokens",
            "4",
            "--stats-json",
            json.to_str().unwrap(),
        ],
        dir.path(),
    );
    stats(&o, &json);
    // Missing and garbled component files.
    let o = generate(
        &[
            "--verifier",
            &v.url,
            "--drafter",
            "/nonexistent/drafter.wasm",
            "--draft-model",
            drafter_model().to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        dir.path(),
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot read the drafter component"), "{err}");
    let garbled = dir.path().join("garbled.wasm");
    std::fs::write(&garbled, b"\0asm\x0d\0\x01\0garbage").unwrap();
    let o = generate(
        &[
            "--verifier",
            &v.url,
            "--drafter",
            garbled.to_str().unwrap(),
            "--draft-model",
            drafter_model().to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        dir.path(),
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("is not a valid WebAssembly component"),
        "{err}"
    );
}

/// One HTTP/1.1 request with a plain TCP socket, as any OpenAI client would send it.
/// The API token the `tandem serve` test requires.
const API_TOKEN: &str = "t0ken";

fn http_post(addr: &str, path: &str, body: &str) -> String {
    let headers =
        format!("Content-Type: application/json\r\nAuthorization: Bearer {API_TOKEN}\r\n");
    http_post_raw(addr, path, body, &headers)
}

/// A POST with exactly these header lines (each ending in CRLF); returns the raw response.
fn http_post_raw(addr: &str, path: &str, body: &str, headers: &str) -> String {
    use std::io::Read;
    let mut out = String::new();
    post_stream(addr, path, body, headers)
        .read_to_string(&mut out)
        .unwrap();
    out
}

/// Sends a POST and returns the connection, to read the response from.
fn post_stream(addr: &str, path: &str, body: &str, headers: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

#[test]
fn openai_clients_get_speculative_completions_from_tandem_serve() {
    let (v, _) = verifier(None, 0);
    let dir = tempfile::tempdir().unwrap();
    let (kill, addr) = serve_process(
        &v.url,
        dir.path(),
        &["--gamma", "3", "--max-concurrent", "1"],
    );

    // Greedy completion: the target's own text.
    let prompt = PROMPTS[1];
    let resp = http_post(
        &addr,
        "/v1/completions",
        &serde_json::json!({"prompt": prompt, "max_tokens": 12, "temperature": 0}).to_string(),
    );
    let body = resp.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {resp}"));
    let tok = tandem_models::Tokenizer::from_gguf(smol()).unwrap();
    let want = tok.decode(&target_only(prompt, 12)).unwrap();
    assert_eq!(v["choices"][0]["text"], want.as_str(), "{resp}");
    assert_eq!(v["usage"]["completion_tokens"], 12);

    // Chat, streamed as server-sent events.
    let resp = http_post(
        &addr,
        "/v1/chat/completions",
        &serde_json::json!({"messages": [{"role": "user", "content": "Say hello."}],
                            "max_tokens": 8, "temperature": 0, "stream": true})
        .to_string(),
    );
    assert!(resp.contains("text/event-stream"), "{resp}");
    let events: Vec<&str> = resp
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{resp}");
    let mut text = String::new();
    for e in &events[..events.len() - 1] {
        let v: serde_json::Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert!(!text.is_empty(), "{resp}");

    // Bad requests say what is wrong.
    let resp = http_post(&addr, "/v1/chat/completions", r#"{"messages": 3}"#);
    assert!(
        resp.starts_with("HTTP/1.1 400") && resp.contains("messages"),
        "{resp}"
    );
    // Without the API token, or not as JSON (a form a web page could post): refused
    // before any generation.
    let ok_body = r#"{"prompt": "x", "max_tokens": 1}"#;
    let json = "Content-Type: application/json\r\n";
    let resp = http_post_raw(&addr, "/v1/completions", ok_body, json);
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    assert!(resp.contains("--api-token-file"), "{resp}");
    let form = format!(
        "Content-Type: application/x-www-form-urlencoded\r\nAuthorization: Bearer {API_TOKEN}\r\n"
    );
    let resp = http_post_raw(&addr, "/v1/completions", ok_body, &form);
    assert!(resp.starts_with("HTTP/1.1 415"), "{resp}");
    // One generation at a time (--max-concurrent 1): while a long stream runs, the next
    // request is answered 429; after it, requests are served again.
    let auth = format!("{json}Authorization: Bearer {API_TOKEN}\r\n");
    let long = serde_json::json!({"prompt": prompt, "max_tokens": 200, "temperature": 0,
                                  "stream": true})
    .to_string();
    let mut running = post_stream(&addr, "/v1/completions", &long, &auth);
    let mut first = [0u8; 12];
    std::io::Read::read_exact(&mut running, &mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let resp = http_post(&addr, "/v1/completions", ok_body);
    assert!(resp.starts_with("HTTP/1.1 429"), "{resp}");
    assert!(resp.contains("--max-concurrent"), "{resp}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut running, &mut rest).unwrap();
    assert!(rest.contains("data: [DONE]"), "{rest}");
    let resp = http_post(&addr, "/v1/completions", ok_body);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    drop(kill);
}

/// The official `openai` Python client (and jinja2, to render chat templates as Hugging
/// Face does), installed from the package index into `target/python` once.
fn python_openai() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/python");
    if !dir.join("openai").exists() {
        let o = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&dir)
            .args(["openai==3.57.0", "jinja2==3.1.6"])
            .output()
            .unwrap();
        assert!(
            dir.join("openai").exists(),
            "installing the openai client failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    dir
}

/// `tandem serve` on 127.0.0.1 in front of `verifier` (sync strategy with γ = 3, so that
/// a seeded sampled text is the same on every run); its address.
fn serve_process(verifier: &str, dir: &Path, extra: &[&str]) -> (Guard, String) {
    use std::io::{BufRead, BufReader};
    let wasm = guest(false);
    let tokens = dir.join("api-tokens");
    std::fs::write(&tokens, format!("{API_TOKEN}\n")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--verifier",
            verifier,
            "--drafter",
        ])
        .arg(&wasm)
        .arg("--draft-model")
        .arg(drafter_model())
        .arg("--api-token-file")
        .arg(&tokens)
        .args(extra)
        .env("TANDEM_WASM_CACHE", dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (Guard(child), addr)
}

/// The official `openai` Python client against `tandem serve` and the verifier's
/// `/v1/completions`: models with families and versions, `system_fingerprint` across a
/// hot-swap, stop sequences (speculative text identical to target-only up to the stop,
/// streamed and not), `n`, `logprobs`, the GGUF's chat template, OpenAI-shaped errors
/// (host/tests/openai_client.py says item by item).
#[test]
fn the_official_openai_client_gets_what_it_expects() {
    let py = python_openai();
    let v = verifier_process_with(&["--target", &format!("smollm2@1={}", smol().display())]);
    let addr = v.url.trim_start_matches("http://");
    let load = r#"{"model": "smollm2-135m", "family": "smollm2", "version": "2"}"#;
    let resp = http_post_raw(
        addr,
        "/admin/targets",
        load,
        "Content-Type: application/json\r\n",
    );
    assert!(
        resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.1 201"),
        "{resp}"
    );
    let dir = tempfile::tempdir().unwrap();
    let extra = [
        "--strategy",
        "sync",
        "--gamma",
        "3",
        "--max-concurrent",
        "1",
    ];
    let (_serve, serve_addr) = serve_process(&v.url, dir.path(), &extra);
    // Port 9 (discard) on loopback: nothing listens there.
    let (_dead, dead_addr) = serve_process("http://127.0.0.1:9", dir.path(), &[]);
    let template = dir.path().join("chat_template.jinja");
    let tok = tandem_models::Tokenizer::from_gguf(smol()).unwrap();
    std::fs::write(&template, tok.chat_template().source.as_deref().unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let o = Command::new("python3")
        .arg(&script)
        .args([
            "--serve",
            &format!("http://{serve_addr}"),
            "--verifier",
            &v.url,
        ])
        .args(["--dead-serve", &format!("http://{dead_addr}")])
        .args(["--api-key", API_TOKEN, "--family", "smollm2", "--template"])
        .arg(&template)
        .env("PYTHONPATH", &py)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}\n{}",
        out,
        String::from_utf8_lossy(&o.stderr)
    );
    println!("openai client checks passed; measured: {out}");
}

/// The chat templates of the catalog models the tests fetch (SmolLM2, Qwen2.5-Coder),
/// rendered by `tandem serve`'s renderer (minijinja) and by Python's jinja2 as Hugging
/// Face's `apply_chat_template` sets it up: the same prompt, byte for byte.
#[test]
fn catalog_chat_templates_render_as_jinja2_does() {
    let py = python_openai();
    let messages = serde_json::json!([
        {"role": "system", "content": "You write short Python."},
        {"role": "user", "content": "Add two numbers."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        {"role": "user", "content": [{"type": "text", "text": "Now "}, {"type": "text", "text": "three."}]},
    ]);
    let parsed: Vec<tandem_client::openai::ChatMessage> =
        serde_json::from_value(messages.clone()).unwrap();
    let plain: Vec<serde_json::Value> = parsed
        .iter()
        .map(|m| serde_json::json!({"role": m.role, "content": m.content.text()}))
        .collect();
    let jinja2 = "import json, sys, jinja2.sandbox\n\
        src, msgs, bos, eos = json.load(sys.stdin)\n\
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)\n\
        sys.stdout.write(env.from_string(src).render(messages=msgs, add_generation_prompt=True, \
        bos_token=bos, eos_token=eos))\n";
    for name in ["smollm2-135m", "qwen2.5-coder-0.5b"] {
        let path = tandem_models::fetch::resolve(name)
            .expect("run `bash ci/test`, which fetches the test models");
        let tok = tandem_models::Tokenizer::from_gguf(&path).unwrap();
        let chat = tok.chat_template();
        let source = chat
            .source
            .as_deref()
            .expect("catalog models carry a chat template");
        let ours = tandem_client::openai::render_chat(
            Some(source),
            &chat.bos_token,
            &chat.eos_token,
            &parsed,
        )
        .unwrap();
        let mut child = Command::new("python3")
            .args(["-c", jinja2])
            .env("PYTHONPATH", &py)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let input = serde_json::json!([source, plain, chat.bos_token, chat.eos_token]);
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.to_string().as_bytes())
            .unwrap();
        drop(child.stdin.take());
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "jinja2 failed on {name}");
        assert_eq!(ours, String::from_utf8(o.stdout).unwrap(), "{name}");
        assert!(ours.ends_with("<|im_start|>assistant\n"), "{name}: {ours}");
        assert!(ours.contains("Now three."), "{name}: {ours}");
    }
}

/// `tandem demo --small` over an emulated link: the speculative run streams, the same
/// prompt runs cloud-only, and the side-by-side says the texts are the same.
#[test]
fn the_demo_compares_with_cloud_only_over_an_emulated_link() {
    let wasm = guest(false);
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "demo",
            "--small",
            "--max-tokens",
            "24",
            "--rtt-ms",
            "40",
            "--drafter",
        ])
        .arg(&wasm)
        .env("TANDEM_WASM_CACHE", dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("40 ms round trip"), "{err}");
    for row in [
        "cloud-only",
        "tokens/s",
        "first token",
        "round trips",
        "speedup",
    ] {
        assert!(err.contains(row), "no `{row}` in the side-by-side:\n{err}");
    }
    assert!(err.contains("same text: yes"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("from typing import List"));
}

/// A component built against another version of `tandem:drafter` (an empty instance
/// exported under the 0.1.0 interface name, encoded here) is refused before anything
/// runs, with both versions named; a component that is no drafter at all is refused too.
#[test]
fn a_drafter_of_another_wit_version_is_refused_with_its_version() {
    let dir = tempfile::tempdir().unwrap();
    for (name, export, want) in [
        (
            "old.wasm",
            "tandem:drafter/session-api@0.1.0",
            "implements tandem:drafter@0.1.0, but this host speaks tandem:drafter@0.2.0",
        ),
        (
            "other.wasm",
            "example:other/api@1.0.0",
            "is not a tandem drafter",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, component_exporting(export)).unwrap();
        let o = generate(
            &[
                "--verifier",
                "http://127.0.0.1:9",
                "--drafter",
                path.to_str().unwrap(),
                "--draft-model",
                drafter_model().to_str().unwrap(),
                "--prompt",
                "x",
            ],
            dir.path(),
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(err.contains(want), "{name}: {err}");
    }
}

/// A component that exports an empty instance under `name` (an interface name such as
/// `tandem:drafter/session-api@0.1.0`).
fn component_exporting(name: &str) -> Vec<u8> {
    use wasm_encoder::{
        Component, ComponentExportKind, ComponentExportSection, ComponentInstanceSection,
    };
    let mut c = Component::new();
    let mut inst = ComponentInstanceSection::new();
    inst.export_items(Vec::<(&str, ComponentExportKind, u32)>::new());
    c.section(&inst);
    let mut exp = ComponentExportSection::new();
    exp.export(name, ComponentExportKind::Instance, 0, None);
    c.section(&exp);
    c.finish()
}

/// The warm start: the first generation writes what it measured to the state file, the
/// next starts its policy from it (`warm_start` in the stats), with the same text;
/// `--no-warm-start` neither reads nor writes it.
#[test]
fn the_second_generation_starts_from_what_the_first_measured() {
    let wasm = guest(false);
    let (v, _shaper) = verifier(Some(27), 40);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("policy-state.json");
    let run = |name: &str, extra: &[&str]| {
        let json = dir.path().join(name);
        let mut args = vec![
            "--verifier",
            &v.url,
            "--drafter",
            wasm.to_str().unwrap(),
            "--draft-model",
            drafter_model().to_str().unwrap(),
            "--prompt",
            PROMPTS[0],
            "--max-tokens",
            "24",
            "--stats-json",
            json.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .arg("generate")
            .args(&args)
            .env("TANDEM_WASM_CACHE", dir.path())
            .env("TANDEM_POLICY_STATE", &state)
            .output()
            .unwrap();
        stats(&o, &json)
    };
    let cold = run("cold.json", &[]);
    assert_eq!(cold["warm_start"], false);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let entries = saved.as_object().unwrap();
    assert_eq!(entries.len(), 1, "{saved}");
    let (key, entry) = entries.iter().next().unwrap();
    assert!(key.contains("@") && key.contains(" cpu"), "{key}");
    assert!(entry["draft_ms"].as_f64().unwrap() > 0.0, "{entry}");
    assert!(entry["rtt_ms"].as_f64().unwrap() >= 30.0, "{entry}");
    assert!(
        !entry["verify_ms"].as_object().unwrap().is_empty(),
        "{entry}"
    );
    let warm = run("warm.json", &[]);
    assert_eq!(warm["warm_start"], true);
    assert_eq!(
        ids(&warm),
        ids(&cold),
        "the text does not depend on the warm start"
    );
    assert_eq!(ids(&cold), target_only(PROMPTS[0], ids(&cold).len()));
    let before = std::fs::read(&state).unwrap();
    let off = run("off.json", &["--no-warm-start"]);
    assert_eq!(off["warm_start"], false);
    assert_eq!(
        std::fs::read(&state).unwrap(),
        before,
        "--no-warm-start wrote the state"
    );
    assert_eq!(ids(&off), ids(&cold));
}

/// Kills the child when dropped.
struct Guard(std::process::Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The adapter the GPU tests name: `TANDEM_TEST_GPU`, else the first that wgpu finds (on CI
/// Mesa's llvmpipe, which `--gpu auto` skips as a software rasterizer).
fn test_adapter() -> String {
    if let Ok(name) = std::env::var("TANDEM_TEST_GPU") {
        return name;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["gpu", "list"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tandem gpu list failed: {text}");
    let first = text.lines().nth(1).unwrap_or_default();
    assert!(
        first.contains("Vulkan") || first.contains("Gl") || first.contains("Metal"),
        "no adapter listed (install mesa-vulkan-drivers: `ci/setup` does):\n{text}"
    );
    // The name is the first column, up to its run of padding.
    first.split("  ").next().unwrap().trim().to_string()
}

#[test]
fn the_gpu_backend_drafts_losslessly() {
    let wasm = guest(false);
    let adapter = test_adapter();
    let (v, _) = verifier(Some(27), 0);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("stats.json");
    let n = 24;
    let tok = tandem_models::Tokenizer::from_gguf(smol()).unwrap();
    let run = |prompt: &str, extra: &[&str]| {
        let n = n.to_string();
        let mut args = vec![
            "--verifier",
            &v.url,
            "--drafter",
            wasm.to_str().unwrap(),
            "--draft-model",
            drafter_model().to_str().unwrap(),
            "--prompt",
            prompt,
            "--max-tokens",
            &n,
            "--gpu",
            &adapter,
            "--stats-json",
            json.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = generate(&args, dir.path());
        (
            stats(&o, &json),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    for prompt in PROMPTS {
        let want = target_only(prompt, n);
        for strategy in ["tandem", "sync"] {
            let (s, stderr) = run(prompt, &["--strategy", strategy, "--gamma", "4"]);
            assert_eq!(ids(&s), want, "{strategy} on {prompt:?}");
            assert_eq!(s["text"], tok.decode(&want).unwrap().as_str());
            assert!(s["drafted"].as_u64().unwrap() > 0, "{s}");
            let backend = s["draft_backend"].as_str().unwrap();
            assert!(
                backend.to_lowercase().contains(&adapter.to_lowercase()),
                "drafted on {backend}, not {adapter}"
            );
            assert!(stderr.contains("running the model on the GPU"), "{stderr}");
        }
    }
    // Sampling: the guest asks for logits, which come back for the last position only. (A
    // code prompt: "The capital of France is" may sample an end of text within 24 tokens.)
    let (s, _) = run(
        PROMPTS[2],
        &[
            "--temperature",
            "0.8",
            "--seed",
            "7",
            "--strategy",
            "sync",
            "--gamma",
            "3",
        ],
    );
    assert_eq!(s["tokens"].as_u64().unwrap(), n as u64, "{s}");
    assert!(s["drafted"].as_u64().unwrap() > 0, "{s}");
    // A name that matches no adapter is an error that lists the adapters.
    let o = generate(
        &[
            "--verifier",
            &v.url,
            "--draft-model",
            drafter_model().to_str().unwrap(),
            "--drafter",
            wasm.to_str().unwrap(),
            "--prompt",
            "x",
            "--gpu",
            "no-such-adapter",
        ],
        dir.path(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("no GPU adapter's name contains `no-such-adapter`") && err.contains(&adapter),
        "{err}"
    );
}

/// A `tandem-verifier serve` process on 127.0.0.1 (the binary beside `tandem`, which
/// `cargo test --workspace` builds), killed when dropped.
struct VerifierProcess {
    child: std::process::Child,
    url: String,
}

impl Drop for VerifierProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn verifier_process() -> VerifierProcess {
    verifier_process_with(&[
        "--target",
        smol().to_str().unwrap(),
        "--early-exit-layer",
        "27",
    ])
}

/// `tandem-verifier serve --listen 127.0.0.1:0` with these arguments.
fn verifier_process_with(args: &[&str]) -> VerifierProcess {
    use std::io::BufRead;
    let bin = Path::new(env!("CARGO_BIN_EXE_tandem")).with_file_name("tandem-verifier");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --release -p tandem-verifier` (the README's \
         test command does)",
        bin.display()
    );
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("tandem-verifier listening on"), "{line:?}");
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    VerifierProcess { child, url }
}

/// The verifier process is killed mid-generation; the host resumes on the second replica
/// of `--verifier A,B` by re-sending prompt + emitted tokens, and the text is the
/// uninterrupted (target-only) one: no token lost or repeated.
#[test]
fn a_killed_verifier_is_resumed_on_a_replica_with_identical_output() {
    use std::io::Read;
    let wasm = guest(false);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("stats.json");
    let n = 160;
    let prompt = PROMPTS[0];
    let want = target_only(prompt, n);
    let mut a = verifier_process();
    let b = verifier_process();
    let mut host = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("generate")
        .args(["--verifier", &format!("{},{}", a.url, b.url)])
        .args(["--drafter", wasm.to_str().unwrap()])
        .args(["--draft-model", drafter_model().to_str().unwrap()])
        .args([
            "--prompt",
            prompt,
            "--max-tokens",
            &n.to_string(),
            "--gamma",
            "4",
        ])
        .args(["--strategy", "sync", "--stats-json", json.to_str().unwrap()])
        .env("TANDEM_WASM_CACHE", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the first verifier once some text has streamed.
    let mut stdout = host.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    while seen.len() < 8 {
        let k = stdout.read(&mut buf).unwrap();
        assert!(k > 0, "the generation ended before the kill");
        seen.extend_from_slice(&buf[..k]);
    }
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    stdout.read_to_end(&mut seen).unwrap();
    let mut stderr = String::new();
    host.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = host.wait().unwrap();
    assert!(status.success(), "tandem generate failed:\n{stderr}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(s["resumes"], 1, "{stderr}");
    assert!(stderr.contains("resumed on"), "{stderr}");
    assert!(
        stderr.contains("resumed 1×"),
        "the stats line counts it: {stderr}"
    );
    assert_eq!(ids(&s), want, "resumed output differs from target-only");
    let tok = tandem_models::Tokenizer::from_gguf(smol()).unwrap();
    let text = String::from_utf8(seen).unwrap();
    assert_eq!(text.strip_suffix('\n').unwrap(), tok.decode(&want).unwrap());
    drop(b);
}

/// Sessions that reach the verifier's maximum session time expire mid-generation; the host
/// resumes each time on the same endpoint and the text is the target's.
#[test]
fn expired_sessions_are_resumed_and_the_text_is_unchanged() {
    let wasm = guest(false);
    let mut config = ServerConfig::default();
    config.limits.max_session_time = Duration::from_secs(1);
    // 100 ms per round trip: 40 cloud-ar rounds take at least 4 s, so sessions expire.
    let (v, _shaper) = verifier_with(config, 100);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("stats.json");
    let n = 40;
    let want = target_only(PROMPTS[1], n);
    for strategy in ["cloud-ar", "tandem"] {
        let o = generate(
            &[
                "--verifier",
                &v.url,
                "--drafter",
                wasm.to_str().unwrap(),
                "--draft-model",
                drafter_model().to_str().unwrap(),
                "--prompt",
                PROMPTS[1],
                "--max-tokens",
                &n.to_string(),
                "--strategy",
                strategy,
                "--stats-json",
                json.to_str().unwrap(),
            ],
            dir.path(),
        );
        let s = stats(&o, &json);
        assert_eq!(ids(&s), want, "{strategy}");
        if strategy == "cloud-ar" {
            assert!(
                s["resumes"].as_u64().unwrap() >= 2,
                "{strategy}: {}",
                s["resumes"]
            );
        }
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            s["resumes"] == 0 || err.contains("maximum time"),
            "{strategy}: {err}"
        );
    }
}

/// Runs `tandem ARGS` with the compiled cache in `cache`.
fn tandem(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env("TANDEM_WASM_CACHE", cache)
        .env("TANDEM_TRUSTED_KEYS", cache.join("no-trusted-keys"))
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "tandem failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The drafter component with a custom section appended: the same drafter under another
/// sha256, as a new release would be.
fn variant_of(wasm: &Path, tag: &str, out: &Path) {
    let mut bytes = std::fs::read(wasm).unwrap();
    let name = b"tandem-test-release";
    let payload_len = 1 + name.len() + tag.len();
    bytes.push(0);
    assert!(payload_len < 128);
    bytes.push(payload_len as u8);
    bytes.push(name.len() as u8);
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(tag.as_bytes());
    std::fs::write(out, bytes).unwrap();
}

/// `tandem drafter pack` of `component` for SmolLM2's split drafter into `out`.
fn pack(component: &Path, key: &Path, version: &str, out: &Path, extra: &[&str], cache: &Path) {
    let mut args = vec![
        "drafter",
        "pack",
        "--component",
        component.to_str().unwrap(),
        "--model",
        drafter_model().to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--version",
        version,
        "--family",
        SMOL,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ok(&tandem(&args, cache));
}

fn store_state(store: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(store.join("state.json")).unwrap()).unwrap()
}

/// Publishing and checking bundles: a valid one verifies; a tampered component, a
/// tampered manifest, a wrong key, an unsigned bundle, another WIT version, another
/// backbone and a too-old host are each refused by `tandem drafter verify` and by a
/// device's update from a verifier's channel, with their own message, and the device
/// keeps v1 (a killed download too); rollback returns to v1.
#[test]
fn drafter_bundles_are_verified_before_anything_runs() {
    let wasm = guest(false);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = d.join("k");
    let other = d.join("other");
    ok(&tandem(
        &["drafter", "keygen", "--out", key.to_str().unwrap()],
        d,
    ));
    ok(&tandem(
        &["drafter", "keygen", "--out", other.to_str().unwrap()],
        d,
    ));
    assert!(
        !tandem(&["drafter", "keygen", "--out", key.to_str().unwrap()], d)
            .status
            .success()
    );
    let pubkey = format!("{}.pub", key.display());
    let channel = d.join("channel");
    std::fs::create_dir(&channel).unwrap();
    pack(&wasm, &key, "1.0.0", &channel.join("v1"), &[], d);
    let verify = |bundle: &Path, pk: &str, extra: &[&str]| {
        let mut args = vec![
            "drafter",
            "verify",
            bundle.to_str().unwrap(),
            "--pubkey",
            pk,
        ];
        args.extend_from_slice(extra);
        tandem(&args, d)
    };
    assert!(ok(&verify(&channel.join("v1"), &pubkey, &[])).contains("valid bundle"));

    // The device installs v1 from the verifier's channel.
    let config = ServerConfig {
        drafters: Some(channel.clone()),
        ..ServerConfig::default()
    };
    let (v, _) = verifier_with(config, 0);
    let store = d.join("store");
    let update = |extra: &[&str]| {
        let mut args = vec![
            "drafter",
            "update",
            "--channel",
            v.url.as_str(),
            "--trust-key",
            pubkey.as_str(),
            "--store",
            store.to_str().unwrap(),
            "--draft-model",
            drafter_model().to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        tandem(&args, d)
    };
    assert!(ok(&update(&[])).contains("now using tandem-drafter@1.0.0"));
    assert!(ok(&update(&[])).contains("is current"));

    // Each bad v2 in turn: refused by verify and by the device, which keeps v1.
    let old_world = d.join("old-world.wasm");
    std::fs::write(
        &old_world,
        component_exporting("tandem:drafter/session-api@0.1.0"),
    )
    .unwrap();
    let v2 = channel.join("v2");
    let cases: [(&str, &dyn Fn(), &str); 7] = [
        (
            "tampered component",
            &|| {
                pack(&wasm, &key, "2.0.0", &v2, &[], d);
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(v2.join("drafter.wasm"))
                    .unwrap();
                std::io::Write::write_all(&mut f, b"\0").unwrap();
            },
            "component mismatch",
        ),
        (
            "tampered manifest",
            &|| {
                pack(&wasm, &key, "2.0.0", &v2, &["--notes", "fine"], d);
                let m = std::fs::read_to_string(v2.join("manifest.json")).unwrap();
                std::fs::write(v2.join("manifest.json"), m.replace("fine", "evil")).unwrap();
            },
            "altered after signing",
        ),
        (
            "wrong key",
            &|| pack(&wasm, &other, "2.0.0", &v2, &[], d),
            "which is not trusted here",
        ),
        (
            "unsigned",
            &|| {
                pack(&wasm, &key, "2.0.0", &v2, &[], d);
                std::fs::remove_file(v2.join("manifest.sig")).unwrap();
            },
            "unsigned bundle",
        ),
        (
            "WIT version",
            &|| pack(&old_world, &key, "2.0.0", &v2, &[], d),
            "WIT version mismatch: the component implements tandem:drafter@0.1.0",
        ),
        (
            "backbone",
            &|| {
                // Packed for the full SmolLM2 (no split): this device runs the split one.
                let mut args = vec!["drafter", "pack", "--component", wasm.to_str().unwrap()];
                let smol = smol();
                args.extend([
                    "--model",
                    smol.to_str().unwrap(),
                    "--key",
                    key.to_str().unwrap(),
                ]);
                args.extend([
                    "--version",
                    "2.0.0",
                    "--family",
                    SMOL,
                    "--out",
                    v2.to_str().unwrap(),
                ]);
                ok(&tandem(&args, d));
            },
            "backbone mismatch",
        ),
        (
            "host too old",
            &|| {
                pack(
                    &wasm,
                    &key,
                    "2.0.0",
                    &v2,
                    &["--min-host-version", "99.0"],
                    d,
                )
            },
            "host too old: the bundle needs tandem 99.0",
        ),
    ];
    for (what, make, want) in cases {
        let _ = std::fs::remove_dir_all(&v2);
        make();
        let extra: &[&str] = if what == "backbone" {
            &["--draft-model", drafter_model().to_str().unwrap()]
        } else {
            &[]
        };
        let o = verify(&v2, &pubkey, extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(want),
            "verify, {what}: {err}"
        );
        let o = update(&[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(want),
            "update, {what}: {err}"
        );
        assert!(err.contains("tandem-drafter@1.0.0) stays"), "{what}: {err}");
        assert_eq!(
            store_state(&store)["current"],
            "tandem-drafter@1.0.0",
            "{what}"
        );
    }

    // A good v2 installs (v1 kept as previous); rollback returns to v1 and pins it.
    let _ = std::fs::remove_dir_all(&v2);
    let v2_wasm = d.join("v2.wasm");
    variant_of(&wasm, "2.0.0", &v2_wasm);
    pack(&v2_wasm, &key, "2.0.0", &v2, &[], d);
    assert!(ok(&update(&[])).contains("now using tandem-drafter@2.0.0"));
    let s = store_state(&store);
    assert_eq!(
        (s["current"].as_str(), s["previous"].as_str()),
        (Some("tandem-drafter@2.0.0"), Some("tandem-drafter@1.0.0"))
    );
    ok(&tandem(
        &["drafter", "rollback", "--store", store.to_str().unwrap()],
        d,
    ));
    let s = store_state(&store);
    assert_eq!(
        (s["current"].as_str(), s["pinned"].as_bool()),
        (Some("tandem-drafter@1.0.0"), Some(true))
    );
    let list = ok(&tandem(
        &["drafter", "list", "--store", store.to_str().unwrap()],
        d,
    ));
    assert!(
        list.contains("tandem-drafter@1.0.0") && list.contains("current, pinned"),
        "{list}"
    );

    // A download killed half way leaves v1 in place: v3 is fetched through a slow link.
    let slow = v.rt.block_on(async {
        tandem_client::shaper::start(
            v.srv.as_ref().unwrap().addr,
            tandem_client::shaper::Link {
                delay: Duration::from_millis(5),
                // 5 KB/s: the component (at least 20 KB) takes 4 s or more.
                rate_bps: Some(40_000),
            },
        )
        .await
        .unwrap()
    });
    let v3_wasm = d.join("v3.wasm");
    variant_of(&wasm, "3.0.0", &v3_wasm);
    assert!(std::fs::metadata(&v3_wasm).unwrap().len() > 20_000);
    pack(&v3_wasm, &key, "3.0.0", &channel.join("v3"), &[], d);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "drafter",
            "update",
            "--channel",
            &format!("http://{}", slow.addr),
        ])
        .args(["--trust-key", &pubkey, "--store", store.to_str().unwrap()])
        .env("TANDEM_WASM_CACHE", d)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the download should still be running"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(store_state(&store)["current"], "tandem-drafter@1.0.0");
    assert!(!store.join("tandem-drafter@3.0.0").exists());
    // The next update (explicit: it replaces the pinned v1) sweeps the partial download.
    assert!(ok(&update(&[])).contains("now using tandem-drafter@3.0.0"));
    let left: Vec<_> = std::fs::read_dir(&store)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".partial"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A device runs `tandem serve` on drafter v1 from a verifier's channel; v2 is published
/// while a client keeps sending requests: none fails, every text is the target-only text,
/// and v2 serves afterwards. A later start reuses v2's compiled form.
#[test]
fn tandem_serve_switches_to_a_published_drafter_between_requests() {
    let wasm = guest(false);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = d.join("k");
    ok(&tandem(
        &["drafter", "keygen", "--out", key.to_str().unwrap()],
        d,
    ));
    let pubkey = format!("{}.pub", key.display());
    let channel = d.join("channel");
    std::fs::create_dir(&channel).unwrap();
    pack(&wasm, &key, "1.0.0", &channel.join("v1"), &[], d);
    let config = ServerConfig {
        drafters: Some(channel.clone()),
        ..ServerConfig::default()
    };
    let (v, _) = verifier_with(config, 0);
    let store = d.join("store");
    let (_serve, addr) = serve_process(
        &v.url,
        d,
        &[
            "--gamma",
            "3",
            "--drafter-channel",
            &v.url,
            "--drafter-check-interval",
            "10",
            "--trust-key",
            &pubkey,
            "--drafter-store",
            store.to_str().unwrap(),
        ],
    );
    let tok = tandem_models::Tokenizer::from_gguf(smol()).unwrap();
    let want: Vec<String> = PROMPTS
        .iter()
        .map(|p| tok.decode(&target_only(p, 16)).unwrap())
        .collect();
    let request = |i: usize| {
        let t = std::time::Instant::now();
        let resp = http_post(
            &addr,
            "/v1/completions",
            &serde_json::json!({"prompt": PROMPTS[i % 3], "max_tokens": 16, "temperature": 0})
                .to_string(),
        );
        let drafter = resp
            .lines()
            .find_map(|l| l.strip_prefix("x-tandem-drafter: "))
            .unwrap_or("")
            .trim()
            .to_string();
        let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(body.trim())
            .unwrap_or_else(|e| panic!("request {i} failed ({e}): {resp}"));
        assert_eq!(
            v["choices"][0]["text"],
            want[i % 3].as_str(),
            "request {i}: {resp}"
        );
        (drafter, t.elapsed())
    };
    let mut i = 0;
    let mut before = Duration::ZERO;
    for _ in 0..3 {
        let (drafter, took) = request(i);
        assert_eq!(drafter, "tandem-drafter@1.0.0");
        before = before.max(took);
        i += 1;
    }
    let v2_wasm = d.join("v2.wasm");
    variant_of(&wasm, "2.0.0", &v2_wasm);
    let staging = d.join("staging");
    pack(&v2_wasm, &key, "2.0.0", &staging, &[], d);
    std::fs::rename(&staging, channel.join("v2")).unwrap();
    let published = std::time::Instant::now();
    let mut slowest = Duration::ZERO;
    let switched = loop {
        let (drafter, took) = request(i);
        i += 1;
        slowest = slowest.max(took);
        if drafter == "tandem-drafter@2.0.0" {
            break published.elapsed();
        }
        assert_eq!(drafter, "tandem-drafter@1.0.0");
        assert!(
            published.elapsed() < Duration::from_secs(180),
            "v2 never served"
        );
    };
    for _ in 0..3 {
        assert_eq!(request(i).0, "tandem-drafter@2.0.0");
        i += 1;
    }
    eprintln!(
        "publish to first v2 response: {:.1} s; slowest request during the switch {:.2} s \
         (before it {:.2} s); {i} requests",
        switched.as_secs_f64(),
        slowest.as_secs_f64(),
        before.as_secs_f64()
    );
    // A new process runs v2 from the store without compiling it again.
    let stats_path = d.join("stats.json");
    let o = generate(
        &[
            "--verifier",
            &v.url,
            "--drafter-channel",
            &v.url,
            "--no-drafter-updates",
            "--drafter-store",
            store.to_str().unwrap(),
            "--draft-model",
            drafter_model().to_str().unwrap(),
            "--prompt",
            PROMPTS[0],
            "--max-tokens",
            "8",
            "--quiet",
            "--stats-json",
            stats_path.to_str().unwrap(),
        ],
        d,
    );
    let s = stats(&o, &stats_path);
    assert_eq!(s["drafter"], "tandem-drafter@2.0.0");
    assert_eq!(s["recommended_drafter"], "tandem-drafter@2.0.0");
    assert_eq!(s["component_cached"], true);
    assert_eq!(ids(&s), target_only(PROMPTS[0], 8));
}

/// A verifier that grants fewer tokens than `tandem serve`'s default: a request that names
/// no `max_tokens` gets the grant (finish_reason "length"), one that asks for more than the
/// grant is refused with the limit named.
#[test]
fn tandem_serve_takes_the_verifiers_grant_when_the_request_names_no_max_tokens() {
    let config = ServerConfig {
        limits: tandem_verifier::Limits {
            max_tokens: 5,
            ..tandem_verifier::Limits::default()
        },
        ..ServerConfig::default()
    };
    let (v, _) = verifier_with(config, 0);
    let dir = tempfile::tempdir().unwrap();
    let (_serve, addr) = serve_process(&v.url, dir.path(), &["--gamma", "3"]);
    let prompt = PROMPTS[0];
    let resp = http_post(
        &addr,
        "/v1/completions",
        &serde_json::json!({"prompt": prompt, "temperature": 0}).to_string(),
    );
    let body = resp.split("\r\n\r\n").nth(1).unwrap();
    let got: serde_json::Value =
        serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {resp}"));
    let tok = tandem_models::Tokenizer::from_gguf(smol()).unwrap();
    assert_eq!(
        got["choices"][0]["text"],
        tok.decode(&target_only(prompt, 5)).unwrap().as_str(),
        "{resp}"
    );
    assert_eq!(got["choices"][0]["finish_reason"], "length", "{resp}");
    assert_eq!(got["usage"]["completion_tokens"], 5, "{resp}");

    let resp = http_post(
        &addr,
        "/v1/chat/completions",
        &serde_json::json!({"messages": [{"role": "user", "content": "Hi."}],
                            "max_tokens": 8, "temperature": 0})
        .to_string(),
    );
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(
        resp.contains("max_tokens 8 exceeds the limit of the verifier's")
            && resp.contains("at most 5"),
        "{resp}"
    );
}
