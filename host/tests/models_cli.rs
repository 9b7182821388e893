//! `tandem models ...` end to end, on the real SmolLM2-135M from the cache.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tandem(args: &[&str], model_dir: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem"));
    cmd.args(args);
    if let Some(d) = model_dir {
        cmd.env("TANDEM_MODEL_DIR", d);
    }
    cmd.output().expect("run tandem")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn smol() -> PathBuf {
    tandem_models::fetch::resolve("smollm2-135m")
        .expect("run `bash ci/test`, which fetches the test models")
}

#[test]
fn list_shows_the_catalog_and_cache_state() {
    let o = tandem(&["models", "list"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for name in ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"] {
        assert!(out.contains(name), "{out}");
    }
    let smol_line = out.lines().find(|l| l.starts_with("smollm2-135m")).unwrap();
    assert!(smol_line.contains(" yes "), "{smol_line}");
}

#[test]
fn fetch_is_idempotent_and_replaces_a_corrupt_or_partial_file() {
    let cached = smol();
    // Already cached: verified, nothing downloaded, the path is the last line.
    let o = tandem(&["models", "fetch", "smollm2-135m"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).lines().last().unwrap(),
        cached.display().to_string()
    );
    assert!(!stderr(&o).contains("downloading"), "{}", stderr(&o));

    // A corrupt copy (one flipped byte) in a fresh cache is detected and fetched again.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join(cached.file_name().unwrap());
    let mut bytes = std::fs::read(&cached).unwrap();
    bytes[5_000_000] ^= 0xff;
    std::fs::write(&copy, &bytes).unwrap();
    let o = tandem(&["models", "fetch", "smollm2-135m"], Some(dir.path()));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cached file has sha256"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&copy).unwrap().len(), bytes.len());
    assert_ne!(std::fs::read(&copy).unwrap(), bytes);

    // A partial file shows as such and is replaced.
    std::fs::write(&copy, &bytes[..1000]).unwrap();
    let o = tandem(&["models", "list"], Some(dir.path()));
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with("smollm2-135m") && l.contains("partial"))
    );
    let o = tandem(&["models", "fetch", "smollm2-135m"], Some(dir.path()));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cached file has 1000 bytes"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&cached).unwrap()
    );
}

#[test]
fn split_and_fingerprint_agree() {
    smol();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("drafter.gguf");
    let o = tandem(
        &[
            "models",
            "split",
            "smollm2-135m",
            "--layers",
            "8",
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let fp_model = stdout(&tandem(
        &["models", "fingerprint", "smollm2-135m", "--layers", "8"],
        None,
    ));
    let fp_drafter = stdout(&tandem(
        &["models", "fingerprint", out.to_str().unwrap()],
        None,
    ));
    assert_eq!(fp_model, fp_drafter);
    let lines: Vec<&str> = fp_model.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("tokenizer ") && lines[1].starts_with("backbone "));
    assert_eq!(lines[1].len(), "backbone ".len() + 64);
}

#[test]
fn generate_streams_deterministic_text_and_rejects_bad_arguments() {
    smol();
    let args = [
        "models",
        "generate",
        "smollm2-135m",
        "--prompt",
        "def add(a, b):",
        "--max-tokens",
        "16",
    ];
    let a = tandem(&args, None);
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(stdout(&a).starts_with("def add(a, b):"));
    assert!(
        stdout(&a).len() > "def add(a, b):".len() + 8,
        "{}",
        stdout(&a)
    );
    assert_eq!(
        stdout(&tandem(&args, None)),
        stdout(&a),
        "greedy generation is deterministic"
    );

    let sampled = [
        "models",
        "generate",
        "smollm2-135m",
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "12",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    ];
    let s1 = tandem(&sampled, None);
    assert!(s1.status.success(), "{}", stderr(&s1));
    assert_eq!(
        stdout(&tandem(&sampled, None)),
        stdout(&s1),
        "same seed, same text"
    );

    let bad = tandem(
        &[
            "models",
            "generate",
            "smollm2-135m",
            "--prompt",
            "x",
            "--top-p",
            "0",
        ],
        None,
    );
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("top-p must be in (0, 1]"),
        "{}",
        stderr(&bad)
    );
    let unknown = tandem(&["models", "generate", "llama-9000", "--prompt", "x"], None);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("unknown model `llama-9000`"),
        "{}",
        stderr(&unknown)
    );
    let missing = tandem(&["models", "fingerprint", "/nonexistent/m.gguf"], None);
    assert!(
        stderr(&missing).contains("/nonexistent/m.gguf"),
        "{}",
        stderr(&missing)
    );
}
