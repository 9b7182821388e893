//! The end-to-end harness at a small scale, to keep it working: SmolLM2-135M as target, a
//! split-backbone drafter, 2 prompts, one RTT through the in-process shaper, the real
//! `tandem-verifier` and `tandem` binaries and the real drafter component. Asserts that every
//! strategy runs, that every text equals cloud-ar's and that the report is valid — never a
//! timing.

use std::path::{Path, PathBuf};
use std::process::Command;

const STRATEGIES: [&str; 8] = [
    "cloud-ar",
    "cloud-sd",
    "sync",
    "tandem",
    "tandem-cold",
    "tandem-no-hints",
    "tandem-no-pipeline",
    "tandem-fixed-gamma",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn cargo(args: &[&str]) {
    let o = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cargo {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The directory of this package's binary, with `tandem` and `tandem-verifier` built beside
/// it (a workspace test run builds them; a lone `cargo test -p tandem-bench` does not).
fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_tandem-bench"))
        .parent()
        .unwrap()
        .to_path_buf();
    if !(dir.join("tandem").exists() && dir.join("tandem-verifier").exists()) {
        let mut args = vec![
            "build",
            "-p",
            "tandem-host",
            "-p",
            "tandem-verifier",
            "--bins",
        ];
        if dir.ends_with("release") {
            args.push("--release");
        }
        cargo(&args);
    }
    dir
}

fn smol() -> PathBuf {
    tandem_models::fetch::resolve("smollm2-135m")
        .expect("run `bash ci/test`, which fetches the test models")
}

#[test]
fn a_small_sweep_runs_every_strategy_losslessly_and_writes_the_report() {
    let bins = bin_dir();
    cargo(&[
        "build",
        "--profile",
        "wasm",
        "-p",
        "tandem-guest-drafter",
        "--target",
        "wasm32-wasip2",
    ]);
    let wasm = root().join("target/wasm32-wasip2/wasm/tandem_guest_drafter.wasm");
    let dir = tempfile::tempdir().unwrap();
    let draft = dir.path().join("smollm2-backbone-26.gguf");
    tandem_models::backbone::split_backbone(smol(), 26, &draft).unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        [
            r#"{"task_id": "a", "prompt": "def fib(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"}"#,
            r#"{"task_id": "b", "prompt": "The capital of France is"}"#,
            r#"{"task_id": "c", "prompt": "never used: --num-prompts 2"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let out = dir.path().join("bench");
    let two_cores = std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
    let o = Command::new(env!("CARGO_BIN_EXE_tandem-bench"))
        .arg("e2e")
        .arg("--prompts")
        .arg(&prompts)
        .args(["--num-prompts", "2", "--max-tokens", "20", "--rtt-ms", "40"])
        .args([
            "--rate-mbit",
            "10",
            "--link",
            "shaper",
            "--early-exit-layer",
            "27",
        ])
        .args(["--target-model", "smollm2-135m"])
        .arg("--draft-model")
        .arg(&draft)
        .arg("--drafter")
        .arg(&wasm)
        .arg("--bin-dir")
        .arg(&bins)
        .args(["--cores", if two_cores { "0,1" } else { "none" }])
        .arg("--out")
        .arg(&out)
        .env("TANDEM_WASM_CACHE", dir.path().join("wasm-cache"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "tandem-bench e2e failed:\n{stderr}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("e2e.json")).unwrap()).unwrap();
    assert_eq!(report["mismatches"].as_array().unwrap().len(), 0);
    assert!(report["meta"]["link"].as_str().unwrap().contains("shaper"));
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2 * STRATEGIES.len(), "{stderr}");
    // Losslessness, checked here again from the raw runs: each prompt's text is the same
    // for every strategy, and not empty.
    for p in 0..2 {
        let texts: Vec<(&str, &str)> = runs
            .iter()
            .filter(|r| r["prompt"] == p)
            .map(|r| {
                (
                    r["sweep_strategy"].as_str().unwrap(),
                    r["text"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(texts.len(), STRATEGIES.len());
        assert!(!texts[0].1.is_empty());
        for (s, t) in &texts {
            assert_eq!(
                t, &texts[0].1,
                "prompt {p}: {s} differs from {}",
                texts[0].0
            );
        }
    }
    let rows = report["rows"].as_array().unwrap();
    for s in STRATEGIES {
        let row = rows
            .iter()
            .find(|r| r["strategy"] == s)
            .unwrap_or_else(|| panic!("no row for {s}"));
        assert_eq!(row["rtt_ms"], 40.0);
        assert!(row["tokens"].as_u64().unwrap() > 0, "{row}");
        assert!(row["tokens_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["bytes_per_token"].as_f64().unwrap() > 0.0, "{row}");
        if s.starts_with("tandem") {
            assert!(row["achieved_over_bound"].as_f64().unwrap() > 0.0, "{row}");
            assert!(
                row["achieved_over_chain_bound"].as_f64().unwrap() > 0.0,
                "{row}"
            );
        }
    }
    // Strategies that draft on the device report rounds with drafts; sync uses γ = 4.
    let sync = rows.iter().find(|r| r["strategy"] == "sync").unwrap();
    assert!(sync["gamma_counts"][4].as_u64().unwrap() > 0, "{sync}");
    let model = &report["model"][0];
    let alpha = model["inputs"]["alpha"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&alpha), "{model}");
    assert!(
        model["bound"]["tokens_per_s"].as_f64().unwrap() > 0.0,
        "{model}"
    );
    for svg in ["speedup.svg", "bytes.svg"] {
        let s = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(s.starts_with("<svg") && s.contains("tandem"), "{svg}");
    }
    let md = std::fs::read_to_string(out.join("e2e.md")).unwrap();
    assert!(
        md.contains("| RTT ms | strategy |")
            && md.contains("first 16 tok/s")
            && md.contains("projection"),
        "{md}"
    );
}

#[test]
fn bad_options_are_explained() {
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_tandem-bench"))
            .arg("e2e")
            .args(args)
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.jsonl");
    let e = run(&["--prompts", missing.to_str().unwrap()]);
    assert!(
        e.contains("reading prompts from") && e.contains("nope.jsonl"),
        "{e}"
    );
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"task\": 1}\n").unwrap();
    let e = run(&["--prompts", bad.to_str().unwrap()]);
    assert!(e.contains("bad.jsonl:1: no string field \"prompt\""), "{e}");
    let good = dir.path().join("good.json");
    std::fs::write(&good, "[\"x\"]").unwrap();
    let e = run(&[
        "--prompts",
        good.to_str().unwrap(),
        "--strategies",
        "tandem,warp",
    ]);
    assert!(e.contains("unknown strategy \"warp\""), "{e}");
    let e = run(&["--prompts", good.to_str().unwrap(), "--cores", "3"]);
    assert!(e.contains("--cores takes two core numbers"), "{e}");
}
