//! `tandem train` end to end on the real SmolLM2-135M: a tiny exit adapter trained for a
//! few steps on the default corpus (the Python standard library), its held-out loss, the
//! written file's effect on the exit, resumption, the drafter, and bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tandem_models::{Model, Rows};

fn smol() -> PathBuf {
    tandem_models::fetch::resolve("smollm2-135m")
        .expect("run `bash ci/test`, which fetches the test models")
}

/// Runs `tandem` with the training cache inside `dir`.
fn tandem(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env("TANDEM_MODEL_DIR", dir.join("models"))
        .output()
        .expect("run tandem")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A short run's options: 2048 training and 512 held-out positions, rank 64.
fn train(kind: &str, out: &Path, dir: &Path, extra: &[&str]) -> Output {
    let model = smol();
    let layer_flag = if kind == "drafter" {
        "--layers"
    } else {
        "--layer"
    };
    let mut args = vec![
        "train",
        kind,
        "--model",
        model.to_str().unwrap(),
        layer_flag,
        "15",
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "40",
        "--eval-every",
        "20",
        "--rank",
        "64",
        "--batch",
        "64",
        "--seed",
        "1",
        "--train-tokens",
        "2048",
        "--heldout-tokens",
        "512",
    ];
    args.extend_from_slice(extra);
    tandem(&args, dir)
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Exit-15 logits and final logits of `model` over `tokens`.
fn exit_and_final(model: &Model, tokens: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let mut cache = model.new_cache();
    let mut exit = Vec::new();
    let fin = model
        .forward_with_exits(tokens, 0, &mut cache, Rows::All, &[15], &mut |e| {
            exit = e.logits().unwrap().data;
        })
        .unwrap();
    (exit, fin.data)
}

fn argmaxes(logits: &[f32], vocab: usize) -> Vec<u32> {
    logits
        .chunks(vocab)
        .map(tandem_core::sampling::argmax)
        .collect()
}

#[test]
fn a_tiny_adapter_learns_changes_the_exit_resumes_exactly_and_makes_a_drafter() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // 1. Train: the held-out loss falls below the plain lens's.
    let a = d.join("a.gguf");
    let o = train(
        "exit-head",
        &a,
        d,
        &["--report-json", d.join("a.json").to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("Python standard library"), "{}", text(&o));
    let r = report(&d.join("a.json"));
    let lens = r["lens"]["loss"].as_f64().unwrap();
    let history = r["history"].as_array().unwrap();
    assert_eq!(history.len(), 2);
    let first = history[0]["heldout"]["loss"].as_f64().unwrap();
    let last = history[1]["heldout"]["loss"].as_f64().unwrap();
    assert!(
        first < lens && last < first,
        "held-out loss did not fall: lens {lens}, step 20 {first}, step 40 {last}"
    );
    assert_eq!(r["data_cached"], false);
    assert_eq!(r["heldout_positions"], 512);

    // 2. The file loads with the adapter, which changes the exit and nothing else.
    let base = Model::load(smol()).unwrap();
    let trained = Model::load(&a).unwrap();
    let adapters: Vec<_> = trained.exit_adapters().collect();
    assert_eq!(adapters.len(), 1);
    assert_eq!(adapters[0].0, 15);
    assert!(adapters[0].1.contains("rank 64"), "{adapters:?}");
    let tok = tandem_models::Tokenizer::from_gguf(smol()).unwrap();
    let prompt = tok
        .encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n")
        .unwrap();
    let (lens_exit, base_final) = exit_and_final(&base, &prompt);
    let (adapted_exit, trained_final) = exit_and_final(&trained, &prompt);
    assert_eq!(
        base_final, trained_final,
        "the adapter must not touch the final output"
    );
    let vocab = base.config().vocab_size;
    let (before, after) = (argmaxes(&lens_exit, vocab), argmaxes(&adapted_exit, vocab));
    assert_ne!(
        before, after,
        "the adapter did not change any exit prediction"
    );

    // The verifier's hints use the adapter's layer when the file has one.
    let spec = tandem_verifier::TargetSpec {
        family: None,
        version: None,
        model: a.to_str().unwrap().to_string(),
        early_exit_layer: None,
        device: None,
    };
    let load =
        |device| tandem_verifier::Target::load(&spec, "smol".into(), "1".into(), None, device);
    let target = load(&tandem_verifier::Device::Cpu).unwrap();
    assert_eq!(target.early_exit_layer, 15);
    // The GPU kernels have no exit adapters: such a target is refused there, saying so.
    let e = load(&tandem_verifier::Device::Gpu(Some("llvmpipe".into())))
        .err()
        .unwrap();
    assert!(
        format!("{e:#}").contains("trained exit adapter at block 15"),
        "{e:#}"
    );

    // 3. Paused at step 15 and resumed: the same file, byte for byte, from cached data.
    let b = d.join("b.gguf");
    let o = train("exit-head", &b, d, &["--pause-after", "15"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("paused at step 15 of 40"), "{}", text(&o));
    assert!(!b.exists());
    let o = train(
        "exit-head",
        &b,
        d,
        &[
            "--resume",
            "--report-json",
            d.join("b.json").to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("resuming from"), "{}", text(&o));
    let rb = report(&d.join("b.json"));
    assert_eq!(rb["resumed_from"], 15);
    assert_eq!(rb["data_cached"], true);
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "a resumed run wrote a different file than an uninterrupted one"
    );
    // Resuming with other options is refused with what to do.
    let o = train("exit-head", &b, d, &["--resume", "--lr", "0.01"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("other options"), "{}", text(&o));

    // 4. The drafter: the backbone fingerprint of the model at 15, and its output is the
    // full model's adapted exit at 15.
    let dr = d.join("drafter.gguf");
    let o = train("drafter", &dr, d, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let fp = tandem_models::backbone::fingerprints(&dr, None).unwrap();
    let want = tandem_models::backbone::fingerprints(smol(), Some(15)).unwrap();
    assert_eq!(fp.backbone, want.backbone);
    assert_eq!(fp.backbone_layers, 15);
    let drafter = Model::load(&dr).unwrap();
    assert_eq!(drafter.config().n_layer, 15);
    let mut cache = drafter.new_cache();
    let out = drafter.forward(&prompt, 0, &mut cache).unwrap();
    assert_eq!(
        out.data, adapted_exit,
        "drafter head differs from the exit adapter"
    );

    // 5. With generated continuations: the same budget of positions, a new cache entry.
    let g = d.join("g.gguf");
    let o = train(
        "exit-head",
        &g,
        d,
        &[
            "--generate",
            "32",
            "--report-json",
            d.join("g.json").to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("32 generated tokens after each window"),
        "{}",
        text(&o)
    );
    let rg = report(&d.join("g.json"));
    assert_eq!(rg["train_positions"], 2048);
    assert_eq!(rg["data_cached"], false);
    assert!(rg["trained"]["loss"].as_f64().unwrap() < rg["lens"]["loss"].as_f64().unwrap());
}

#[test]
fn bad_training_input_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("x.gguf");
    let o = train("exit-head", &out, d, &["--corpus", "/nonexistent/corpus"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("cannot be read"), "{}", text(&o));
    let model = smol();
    let o = tandem(
        &[
            "train",
            "exit-head",
            "--model",
            model.to_str().unwrap(),
            "--layer",
            "30",
            "--out",
            out.to_str().unwrap(),
        ],
        d,
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("outside 1..30"), "{}", text(&o));
    let o = train("exit-head", &out, d, &["--lr", "0"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--lr must be a positive"), "{}", text(&o));
    let o = tandem(
        &[
            "train",
            "drafter",
            "--model",
            "no-such-model",
            "--layers",
            "3",
            "--out",
            "x",
        ],
        d,
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("no-such-model"), "{}", text(&o));
    let o = train_target("30", &out, d, &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("outside 1..30"), "{}", text(&o));
    let o = train_target("15", &out, d, &["--corpus", "/nonexistent/rust"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("cannot be read"), "{}", text(&o));
    let o = train_target("15", &out, d, &["--seq-len", "100000"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("longer than the model's context"),
        "{}",
        text(&o)
    );
    assert!(!out.exists());
}

/// A tiny `train target` run's options (SmolLM2, blocks from `layer` up, rank 4, 16
/// windows of 64 tokens of the default corpus: the cargo registry's Rust sources); `extra`
/// adds options or replaces these.
fn train_target(layer: &str, out: &Path, dir: &Path, extra: &[&str]) -> Output {
    let model = smol();
    let mut args = vec![
        "train",
        "target",
        "--model",
        model.to_str().unwrap(),
        "--layer",
        layer,
        "--out",
        out.to_str().unwrap(),
    ];
    let defaults = [
        ("--steps", "6"),
        ("--eval-every", "3"),
        ("--rank", "4"),
        ("--batch", "2"),
        ("--seq-len", "64"),
        ("--lr", "1e-3"),
        ("--seed", "1"),
        ("--train-tokens", "1024"),
        ("--heldout-tokens", "256"),
    ];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    tandem(&args, dir)
}

/// The hidden states after block `layer` and the final logits of `model` over `tokens`.
fn hidden_and_final(model: &Model, tokens: &[u32], layer: usize) -> (Vec<f32>, Vec<f32>) {
    let mut cache = model.new_cache();
    let mut hidden = Vec::new();
    let fin = model
        .forward_with_exits(tokens, 0, &mut cache, Rows::All, &[layer], &mut |e| {
            hidden = e.hidden().to_vec();
        })
        .unwrap();
    (hidden, fin.data)
}

#[test]
fn a_new_target_version_keeps_the_backbone_serves_the_same_drafter_and_a_drifted_one_is_refused() {
    use tandem_models::backbone::{fingerprints, split_backbone};
    use tandem_verifier::{Device, Registry, Target, TargetSpec};

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // 1. v2: blocks 15..30 trained on Rust sources; the held-out loss there falls.
    let v2 = d.join("v2.gguf");
    let o = train_target(
        "15",
        &v2,
        d,
        &["--report-json", d.join("v2.json").to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("Rust sources of the cargo registry"),
        "{}",
        text(&o)
    );
    assert!(
        text(&o).contains("fingerprints at 15 unchanged"),
        "{}",
        text(&o)
    );
    let r = report(&d.join("v2.json"));
    assert_eq!(r["fingerprints_equal"], true);
    assert_eq!(r["history"].as_array().unwrap().len(), 2);
    let (v1_loss, v2_loss) = (
        r["v1_new"]["loss"].as_f64().unwrap(),
        r["v2_new"]["loss"].as_f64().unwrap(),
    );
    assert!(
        v2_loss < v1_loss,
        "held-out loss did not fall: v1 {v1_loss}, v2 {v2_loss}"
    );
    assert!(r["v1_old"]["positions"].as_u64().unwrap() > 0, "{r}");

    // 2. Reloaded: same tokenizer and backbone at 15 (embedding and blocks 0..15 bit for
    //    bit), block 15 changed; the engine's state after block 15 is bitwise v1's and the
    //    output is not.
    let (a, b) = (
        fingerprints(smol(), Some(15)).unwrap(),
        fingerprints(&v2, Some(15)).unwrap(),
    );
    assert_eq!(a, b);
    assert_ne!(
        fingerprints(smol(), Some(16)).unwrap().backbone,
        fingerprints(&v2, Some(16)).unwrap().backbone
    );
    let tok = tandem_models::Tokenizer::from_gguf(smol()).unwrap();
    let prompt = tok
        .encode("impl<T: Clone> Stack<T> {\n    pub fn push(&mut self, item: T) {\n")
        .unwrap();
    let (h1, f1) = hidden_and_final(&Model::load(smol()).unwrap(), &prompt, 15);
    let (h2, f2) = hidden_and_final(&Model::load(&v2).unwrap(), &prompt, 15);
    assert_eq!(h1, h2);
    assert_ne!(f1, f2);

    // 3. Paused after 4 steps and resumed: the same file, byte for byte (cached data).
    let p = d.join("p.gguf");
    let o = train_target("15", &p, d, &["--pause-after", "4"]);
    assert!(
        o.status.success() && text(&o).contains("paused at step 4"),
        "{}",
        text(&o)
    );
    assert!(!p.exists());
    let o = train_target("15", &p, d, &["--resume"]);
    assert!(
        o.status.success() && text(&o).contains("(cached)"),
        "{}",
        text(&o)
    );
    assert!(std::fs::read(&p).unwrap() == std::fs::read(&v2).unwrap());
    let o = train_target("15", &p, d, &["--resume", "--lr", "2e-3"]);
    assert!(
        !o.status.success() && text(&o).contains("other options"),
        "{}",
        text(&o)
    );

    // 4. A version whose backbone drifted: block 14 trained for one step.
    let drift = d.join("drift.gguf");
    let o = train_target("14", &drift, d, &["--steps", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_ne!(fingerprints(&drift, Some(15)).unwrap().backbone, a.backbone);

    // The registry: a drafter split from v1 at 15 gets v2 (the newest that fits), never the
    // drifted version, and asking for that one by name says what differs.
    let drafter = d.join("drafter.gguf");
    split_backbone(smol(), 15, &drafter).unwrap();
    let fp = fingerprints(&drafter, None).unwrap();
    let reg = Registry::default();
    for (v, path) in [("1", smol()), ("2", v2.clone()), ("3", drift.clone())] {
        let spec: TargetSpec = format!("smol@{v}={}", path.display()).parse().unwrap();
        let t = Target::load(&spec, "smol".into(), v.into(), None, &Device::Cpu).unwrap();
        reg.add(t, 8).unwrap();
    }
    let mut hello = tandem_core::protocol::Hello {
        tokenizer: fp.tokenizer.0,
        backbone: Some(tandem_core::protocol::BackboneClaim {
            layers: 15,
            fingerprint: fp.backbone.0,
        }),
        family: Some("smol".into()),
        sampling: Default::default(),
        max_tokens: 8,
        token: None,
    };
    assert_eq!(reg.pick(&hello).unwrap().id(), "smol@2");
    hello.family = Some("smol@3".into());
    let e = reg
        .pick(&hello)
        .err()
        .expect("the drifted version is refused");
    assert!(
        e.contains("smol@3: backbone fingerprint over 15 blocks") && e.contains("differs"),
        "{e}"
    );
}

/// A block head trained for 8 steps on 768 positions of text continued by generated tokens:
/// `what` is `drafter --layers` or `exit-head --layer`.
fn train_block(what: [&str; 2], out: &Path, d: &Path, report: &Path) -> Output {
    let model = smol();
    tandem(
        &[
            "train",
            what[0],
            "--head",
            "block",
            "--model",
            model.to_str().unwrap(),
            what[1],
            "15",
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "8",
            "--eval-every",
            "4",
            "--batch",
            "96",
            "--seq-len",
            "32",
            "--generate",
            "16",
            "--train-tokens",
            "768",
            "--heldout-tokens",
            "256",
            "--seed",
            "1",
            "--report-json",
            report.to_str().unwrap(),
        ],
        d,
    )
}

#[test]
fn a_block_head_keeps_the_backbone_learns_rolls_back_and_serves_as_drafter_and_as_exit() {
    use tandem_models::backbone::{declared_split, fingerprints};

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("block.gguf");
    let model = smol();
    let o = train_block(["drafter", "--layers"], &out, d, &d.join("r.json"));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("a trained block"), "{}", text(&o));
    let r = report(&d.join("r.json"));
    assert_eq!(r["head"], "block");
    assert_eq!(r["train_positions"], 768);
    let (lens, trained) = (
        r["lens"]["loss"].as_f64().unwrap(),
        r["trained"]["loss"].as_f64().unwrap(),
    );
    assert!(trained < lens, "block head {trained} vs plain lens {lens}");

    // 16 blocks, a backbone of 15: the source's fingerprint at 15, its state after block 15
    // bitwise the full model's.
    let drafter = Model::load(&out).unwrap();
    assert_eq!(drafter.config().n_layer, 16);
    assert_eq!(declared_split(&out).unwrap(), Some(15));
    assert_eq!(
        fingerprints(&out, None).unwrap(),
        fingerprints(&model, Some(15)).unwrap()
    );
    let tok = tandem_models::Tokenizer::from_gguf(&model).unwrap();
    let prompt = tok
        .encode("def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n")
        .unwrap();
    let (h_full, _) = hidden_and_final(&Model::load(&model).unwrap(), &prompt, 15);
    let (h_drafter, all) = hidden_and_final(&drafter, &prompt, 15);
    assert_eq!(h_full, h_drafter);

    // The head's KV cache rolls back with the rest: truncate and feed the last tokens again.
    let n = prompt.len();
    let vocab = drafter.config().vocab_size;
    let mut cache = drafter.new_cache();
    drafter.forward(&prompt[..n - 3], 0, &mut cache).unwrap();
    drafter.forward(&[1, 2, 3, 4], n - 3, &mut cache).unwrap();
    cache.truncate(n - 3);
    let again = drafter
        .forward(&prompt[n - 3..], n - 3, &mut cache)
        .unwrap();
    assert_eq!(again.data, all[(n - 3) * vocab..]);

    // The same head as an exit block inside the model (same data, seed and steps: the same
    // weights). The model's own output is untouched, its exit at 15 is the drafter's output
    // bit for bit, also after a rollback and after forwards that did not ask for the exit
    // (its keys and values are kept at every forward), and a split there is the drafter.
    let with_exit = d.join("exit.gguf");
    let o = train_block(["exit-head", "--layer"], &with_exit, d, &d.join("e.json"));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("exit block at layer 15"), "{}", text(&o));
    let target = Model::load(&with_exit).unwrap();
    assert!(
        target
            .exit_adapters()
            .any(|(k, what)| k == 15 && what.contains("exit block")),
        "{:?}",
        target.exit_adapters().collect::<Vec<_>>()
    );
    assert_eq!(
        fingerprints(&with_exit, None).unwrap(),
        fingerprints(&model, None).unwrap()
    );
    let plain = Model::load(&model).unwrap();
    let (_, fin_plain) = hidden_and_final(&plain, &prompt, 15);
    // The model's own logits and its exit's, for `tokens` at `pos`.
    let run = |tokens: &[u32], pos: usize, cache: &mut tandem_models::KvCache| {
        let mut exit = Vec::new();
        let fin = target
            .forward_with_exits(tokens, pos, cache, Rows::All, &[15], &mut |e| {
                exit = e.logits().unwrap().data;
            })
            .unwrap();
        (fin.data, exit)
    };
    let mut cache = target.new_cache();
    let (fin, exit) = run(&prompt[..n - 3], 0, &mut cache);
    assert_eq!(fin, fin_plain[..(n - 3) * vocab]);
    assert_eq!(exit, all[..(n - 3) * vocab]);
    // Drafted tokens fed without the exit, rolled back, the last tokens fed again with it.
    target.forward(&[1, 2, 3, 4], n - 3, &mut cache).unwrap();
    cache.truncate(n - 3);
    target
        .forward(&prompt[n - 3..n - 1], n - 3, &mut cache)
        .unwrap();
    let (fin, exit) = run(&prompt[n - 1..], n - 1, &mut cache);
    assert_eq!(fin, fin_plain[(n - 1) * vocab..]);
    assert_eq!(exit, all[(n - 1) * vocab..]);
    let split = d.join("split.gguf");
    tandem_models::backbone::split_backbone(&with_exit, 15, &split).unwrap();
    let from_split = Model::load(&split).unwrap();
    assert_eq!(from_split.config().n_layer, 16);
    assert_eq!(declared_split(&split).unwrap(), Some(15));
    let mut cache = from_split.new_cache();
    assert_eq!(
        from_split.forward(&prompt, 0, &mut cache).unwrap().data,
        all
    );
}
