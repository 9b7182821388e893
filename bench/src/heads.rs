//! `tandem-bench heads`: trains exit adapters and drafter heads and measures them against
//! the plain logit lens (docs/training.md). Writes `heads.json` and `heads.md`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tandem_core::sampling::argmax;
use tandem_models::draft::decode;
use tandem_models::{CpuSequence, Model, Rows, Tokenizer};
use tandem_train::head::Metrics;
use tandem_train::{HeadForm, Kind, Options, Report};

/// Options of `tandem-bench heads`.
#[derive(clap::Args)]
pub struct Args {
    /// Exit adapters to train: MODEL@LAYER, optionally followed by /rank=R, /tokens=N
    /// (training positions), /heldout=N, /gen=N (greedy tokens generated after each training
    /// window) and /seq=N (window length), e.g. `smollm2-135m@15/rank=512`. Repeatable.
    #[arg(long = "exit")]
    exits: Vec<String>,
    /// Shared-backbone drafters to train: MODEL@LAYERS with the same suffixes; measured by
    /// greedy acceptance against the full model with γ = 4. Repeatable.
    #[arg(long = "drafter")]
    drafters: Vec<String>,
    /// HumanEval prompts (JSON lines with a `prompt` field); `ci/bench-heads` fetches them.
    #[arg(long)]
    prompts: PathBuf,
    /// HumanEval prompts to measure on (the first N).
    #[arg(long, default_value_t = 5)]
    num_prompts: usize,
    /// Greedy tokens generated per prompt; their positions are the ones measured.
    #[arg(long, default_value_t = 48)]
    gen_tokens: usize,
    /// Optimizer steps per head.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Default adapter rank.
    #[arg(long, default_value_t = 256)]
    rank: usize,
    /// Default training positions.
    #[arg(long, default_value_t = 65_536)]
    train_tokens: usize,
    /// Held-out positions.
    #[arg(long, default_value_t = 8192)]
    heldout_tokens: usize,
    /// Peak learning rate (default 2e-3 for MLP adapters, 1e-3 for block heads).
    #[arg(long)]
    lr: Option<f64>,
    /// Where the report and the trained files go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

/// One head to train.
#[derive(Debug, Clone)]
struct Spec {
    model: String,
    layer: usize,
    rank: usize,
    tokens: usize,
    heldout: usize,
    generate: usize,
    seq_len: usize,
    block: bool,
}

fn parse_spec(s: &str, a: &Args) -> Result<Spec> {
    let mut parts = s.split('/');
    let head = parts.next().unwrap_or_default();
    let (model, layer) = head
        .rsplit_once('@')
        .with_context(|| format!("`{s}`: expected MODEL@LAYER[/rank=R][/tokens=N][/heldout=N]"))?;
    let layer = layer
        .parse()
        .with_context(|| format!("`{s}`: layer `{layer}` is not a number"))?;
    let mut spec = Spec {
        model: model.to_string(),
        layer,
        rank: a.rank,
        tokens: a.train_tokens,
        heldout: a.heldout_tokens,
        generate: 0,
        seq_len: 256,
        block: false,
    };
    for p in parts {
        match p.split_once('=') {
            Some(("rank", v)) => spec.rank = v.parse().with_context(|| format!("`{s}`: rank"))?,
            Some(("tokens", v)) => {
                spec.tokens = v.parse().with_context(|| format!("`{s}`: tokens"))?
            }
            Some(("heldout", v)) => {
                spec.heldout = v.parse().with_context(|| format!("`{s}`: heldout"))?
            }
            Some(("gen", v)) => spec.generate = v.parse().with_context(|| format!("`{s}`: gen"))?,
            Some(("seq", v)) => spec.seq_len = v.parse().with_context(|| format!("`{s}`: seq"))?,
            Some(("head", "block")) => spec.block = true,
            Some(("head", "mlp")) => spec.block = false,
            _ => bail!(
                "`{s}`: unknown suffix `{p}` (rank=R, tokens=N, heldout=N, gen=N, seq=N or \
                 head=mlp|block)"
            ),
        }
    }
    Ok(spec)
}

/// Agreement of an exit with the final token on HumanEval positions.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Agreement {
    top1: f64,
    top5: f64,
    positions: usize,
}

/// Greedy acceptance of a drafter against the full model.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Acceptance {
    gamma: usize,
    rounds: usize,
    drafted: usize,
    accepted: usize,
    /// accepted / drafted.
    rate: f64,
    /// Tokens committed per round (accepted + the target's one).
    tokens_per_round: f64,
}

#[derive(Debug, Serialize)]
struct Row {
    kind: Kind,
    model: String,
    layer: usize,
    n_layer: usize,
    rank: usize,
    params: usize,
    adapter_bytes: usize,
    train_positions: usize,
    heldout_positions: usize,
    steps: usize,
    data_seconds: f64,
    train_seconds: f64,
    heldout_lens: Metrics,
    heldout_trained: Metrics,
    /// HumanEval: positions predicting the full model's greedy continuation.
    humaneval_lens: Agreement,
    humaneval_trained: Agreement,
    /// HumanEval: the prompts' own positions (teacher-forced text).
    humaneval_prompt_lens: Agreement,
    humaneval_prompt_trained: Agreement,
    /// Greedy tokens generated after each training window.
    generate: usize,
    /// Drafters only: the untrained split (plain lens head) and the trained one.
    acceptance_lens: Option<Acceptance>,
    acceptance_trained: Option<Acceptance>,
    file: PathBuf,
}

fn load_prompts(path: &Path, n: usize) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading prompts {}", path.display()))?;
    let prompts: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            v["prompt"]
                .as_str()
                .map(str::to_owned)
                .context("a line without a `prompt` string")
        })
        .collect::<Result<_>>()?;
    if prompts.is_empty() {
        bail!("{} has no prompts", path.display());
    }
    Ok(prompts)
}

/// The prompt followed by `n` greedy tokens of `model`.
fn greedy(model: &Arc<Model>, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
    let mut seq = CpuSequence::new(model.clone());
    let new =
        decode::<_, anyhow::Error>(&mut seq, prompt, n, false, |f| f.argmax, |_, _| Ok(true))?;
    Ok([prompt, &new].concat())
}

/// Logits of every position of `seq` at the exit `layer` (`None`: the final output),
/// and the final output's argmax at every position.
fn logits_at(model: &Model, seq: &[u32], layer: Option<usize>) -> Result<(Vec<f32>, Vec<u32>)> {
    let mut exit = Vec::new();
    let mut cache = model.new_cache();
    let exits: Vec<usize> = layer.into_iter().collect();
    let fin = model.forward_with_exits(seq, 0, &mut cache, Rows::All, &exits, &mut |e| {
        exit = e.logits().map(|l| l.data).unwrap_or_default();
    })?;
    let top: Vec<u32> = (0..fin.rows()).map(|i| argmax(fin.row(i))).collect();
    Ok((if layer.is_some() { exit } else { fin.data }, top))
}

/// Top-1 / top-5 agreement of `logits` rows `from..` with the tokens `want[from..]`.
fn agreement(acc: &mut Agreement, logits: &[f32], vocab: usize, want: &[u32], from: usize) {
    for (i, &w) in want.iter().enumerate().skip(from) {
        let row = &logits[i * vocab..(i + 1) * vocab];
        let above = row.iter().filter(|&&v| v > row[w as usize]).count();
        acc.top1 += (above == 0) as u8 as f64;
        acc.top5 += (above < 5) as u8 as f64;
        acc.positions += 1;
    }
}

impl Agreement {
    fn finish(mut self) -> Self {
        self.top1 /= self.positions.max(1) as f64;
        self.top5 /= self.positions.max(1) as f64;
        self
    }
}

/// Greedy speculative rounds of `drafter` (γ drafts each) against the target's greedy
/// continuation `seq[from..]`.
fn acceptance(drafter: &Model, gamma: usize, seqs: &[(Vec<u32>, usize)]) -> Result<Acceptance> {
    let mut a = Acceptance {
        gamma,
        ..Acceptance::default()
    };
    for (seq, from) in seqs {
        let mut cache = drafter.new_cache();
        let mut pos = *from; // committed tokens: seq[..pos]
        let mut valid = 0; // drafter cache holds seq[..valid]
        while pos < seq.len() {
            let mut feed = seq[valid..pos].to_vec();
            let mut at = valid;
            let mut accepted = 0;
            let mut matching = true;
            for j in 0..gamma.min(seq.len() - pos) {
                let logits = drafter.forward_last(&feed, at, &mut cache)?;
                at += feed.len();
                let t = argmax(logits.last());
                a.drafted += 1;
                if matching && t == seq[pos + j] {
                    accepted += 1;
                } else {
                    matching = false;
                }
                feed = vec![t];
            }
            a.accepted += accepted;
            a.rounds += 1;
            // Commit the accepted drafts and the target's next token; the drafter's cache
            // is valid up to the accepted prefix.
            valid = (pos + accepted).min(at);
            pos = (pos + accepted + 1).min(seq.len());
        }
    }
    a.rate = a.accepted as f64 / a.drafted.max(1) as f64;
    a.tokens_per_round = (a.accepted + a.rounds) as f64 / a.rounds.max(1) as f64;
    Ok(a)
}

fn train_one(spec: &Spec, kind: Kind, a: &Args) -> Result<(Report, PathBuf)> {
    let model = tandem_models::fetch::resolve(&spec.model)
        .with_context(|| format!("model `{}`", spec.model))?;
    let tag = match kind {
        Kind::ExitHead => "exit",
        Kind::Drafter => "drafter",
    };
    let dir = a.out.join("heads");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join(format!(
        "{}-{tag}{}-{}-t{}-g{}-s{}.gguf",
        spec.model.replace('/', "_"),
        spec.layer,
        if spec.block {
            "block".to_string()
        } else {
            format!("r{}", spec.rank)
        },
        spec.tokens,
        spec.generate,
        spec.seq_len
    ));
    let mut o = Options::new(kind, model.clone(), spec.layer, out.clone());
    if spec.block {
        if kind != Kind::Drafter {
            bail!("head=block is for drafters (--drafter), not exits");
        }
        o.head = HeadForm::Block;
    }
    o.steps = a.steps;
    o.rank = spec.rank;
    o.train_tokens = spec.tokens;
    o.heldout_tokens = spec.heldout;
    o.generate = spec.generate;
    o.seq_len = spec.seq_len;
    o.lr = match (spec.block, a.lr) {
        (_, Some(lr)) => lr,
        (false, None) => 2e-3,
        (true, None) => 1e-3,
    };
    eprintln!(
        "== {} {tag} at {}: rank {}, {} training positions, {} steps",
        spec.model, spec.layer, spec.rank, spec.tokens, a.steps
    );
    let r = tandem_train::train(&o)?;
    Ok((r, model))
}

/// Runs the benchmark.
pub fn run(a: &Args) -> Result<()> {
    if a.exits.is_empty() && a.drafters.is_empty() {
        bail!("nothing to train: give --exit MODEL@LAYER and/or --drafter MODEL@LAYERS");
    }
    let prompts = load_prompts(&a.prompts, a.num_prompts)?;
    let mut rows = Vec::new();
    let jobs: Vec<(Spec, Kind)> = a
        .exits
        .iter()
        .map(|s| Ok((parse_spec(s, a)?, Kind::ExitHead)))
        .chain(
            a.drafters
                .iter()
                .map(|s| Ok((parse_spec(s, a)?, Kind::Drafter))),
        )
        .collect::<Result<_>>()?;
    for (spec, kind) in jobs {
        let (r, model_path) = train_one(&spec, kind, a)?;
        let file = r.out.clone().context("training ended without a file")?;
        let started = Instant::now();
        let base = Arc::new(Model::load(&model_path)?);
        let tok = Tokenizer::from_gguf(&model_path)?;
        let vocab = base.config().vocab_size;
        // Each prompt with the full model's greedy continuation; measured positions are
        // those that predict a generated token.
        let mut seqs = Vec::new();
        for p in &prompts {
            let ids = tok.encode(p)?;
            let n = ids.len();
            seqs.push((greedy(&base, &ids, a.gen_tokens)?, n));
        }
        let trained = Model::load(&file)?;
        let (mut lens, mut tr) = (Agreement::default(), Agreement::default());
        let (mut plens, mut ptr) = (Agreement::default(), Agreement::default());
        for (seq, n) in &seqs {
            // The full model's argmax at every position (on the generated part, the next
            // token).
            let input = &seq[..seq.len() - 1];
            let (lens_logits, want) = logits_at(&base, input, Some(spec.layer))?;
            agreement(&mut lens, &lens_logits, vocab, &want, n - 1);
            agreement(&mut plens, &lens_logits, vocab, &want[..n - 1], 0);
            // An exit adapter is read at its exit; a drafter's head is its final output.
            let layer = (kind == Kind::ExitHead).then_some(spec.layer);
            let (trained_logits, _) = logits_at(&trained, input, layer)?;
            agreement(&mut tr, &trained_logits, vocab, &want, n - 1);
            agreement(&mut ptr, &trained_logits, vocab, &want[..n - 1], 0);
        }
        let (humaneval_lens, humaneval_trained) = (lens.finish(), tr.finish());
        let (acc_lens, acc_trained) = match kind {
            Kind::ExitHead => (None, None),
            Kind::Drafter => {
                let plain = file.with_extension("plain.gguf");
                tandem_models::backbone::split_backbone(&model_path, spec.layer, &plain)?;
                let plain_model = Model::load(&plain)?;
                let acc_lens = acceptance(&plain_model, 4, &seqs)?;
                drop(plain_model);
                let _ = std::fs::remove_file(&plain);
                (Some(acc_lens), Some(acceptance(&trained, 4, &seqs)?))
            }
        };
        eprintln!(
            "   measured on {} HumanEval positions in {:.0} s",
            humaneval_lens.positions,
            started.elapsed().as_secs_f64()
        );
        rows.push(Row {
            kind,
            model: spec.model.clone(),
            layer: spec.layer,
            n_layer: r.n_layer,
            rank: r.rank,
            params: r.params,
            adapter_bytes: r.adapter_bytes,
            train_positions: r.train_positions,
            heldout_positions: r.heldout_positions,
            steps: r.steps,
            data_seconds: r.data_seconds,
            train_seconds: r.train_seconds,
            heldout_lens: r.lens,
            heldout_trained: r.trained,
            humaneval_lens,
            humaneval_trained,
            humaneval_prompt_lens: plens.finish(),
            humaneval_prompt_trained: ptr.finish(),
            generate: spec.generate,
            acceptance_lens: acc_lens,
            acceptance_trained: acc_trained,
            file,
        });
        write_report(a, &prompts, &rows)?;
    }
    print!("{}", markdown(&rows));
    Ok(())
}

fn write_report(a: &Args, prompts: &[String], rows: &[Row]) -> Result<()> {
    std::fs::create_dir_all(&a.out)?;
    let json = serde_json::json!({
        "meta": {
            "prompts": a.prompts, "num_prompts": prompts.len(), "gen_tokens": a.gen_tokens,
            "steps": a.steps, "lr": a.lr, "heldout_tokens": a.heldout_tokens,
            "corpus": "Python standard library (default), ~1 file in 10 held out by path hash",
        },
        "rows": rows,
    });
    let path = a.out.join("heads.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    let md = a.out.join("heads.md");
    std::fs::write(&md, markdown(rows)).with_context(|| format!("writing {}", md.display()))?;
    eprintln!("wrote {} and {}", path.display(), md.display());
    Ok(())
}

fn markdown(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(
        "| model | kind | layer | rank (or block head) | train positions (generated per window) | held-out top-1 lens → trained | held-out top-5 | HumanEval generated top-1 | HumanEval generated top-5 | HumanEval prompt top-1 | γ=4 acceptance lens → trained | train s | data s | adapter KiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let pair = |a: f64, b: f64| format!("{a:.3} → {b:.3}");
    for r in rows {
        let acc = match (r.acceptance_lens, r.acceptance_trained) {
            (Some(l), Some(t)) => format!(
                "{:.2} → {:.2} ({:.2} → {:.2} tok/round)",
                l.rate, t.rate, l.tokens_per_round, t.tokens_per_round
            ),
            _ => "–".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {}/{} | {} | {} ({}) | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {} |",
            r.model,
            match r.kind {
                Kind::ExitHead => "exit",
                Kind::Drafter => "drafter",
            },
            r.layer,
            r.n_layer,
            if r.rank == 0 {
                "block".to_string()
            } else {
                r.rank.to_string()
            },
            r.train_positions,
            r.generate,
            pair(r.heldout_lens.top1, r.heldout_trained.top1),
            pair(r.heldout_lens.top5, r.heldout_trained.top5),
            pair(r.humaneval_lens.top1, r.humaneval_trained.top1),
            pair(r.humaneval_lens.top5, r.humaneval_trained.top5),
            pair(
                r.humaneval_prompt_lens.top1,
                r.humaneval_prompt_trained.top1
            ),
            acc,
            r.train_seconds,
            r.data_seconds,
            r.adapter_bytes / 1024
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_suffixes_and_errors_say_what_is_wrong() {
        let a = Args {
            exits: vec![],
            drafters: vec![],
            prompts: PathBuf::new(),
            num_prompts: 1,
            gen_tokens: 1,
            steps: 1,
            rank: 256,
            train_tokens: 100,
            heldout_tokens: 10,
            lr: Some(1e-3),
            out: PathBuf::new(),
        };
        let s = parse_spec("smollm2-135m@15/rank=64/tokens=500", &a).unwrap();
        assert_eq!(
            (s.model.as_str(), s.layer, s.rank, s.tokens),
            ("smollm2-135m", 15, 64, 500)
        );
        let s = parse_spec("m@3", &a).unwrap();
        assert_eq!((s.rank, s.tokens), (256, 100));
        assert!(
            parse_spec("m", &a)
                .unwrap_err()
                .to_string()
                .contains("MODEL@LAYER")
        );
        assert!(
            parse_spec("m@x", &a)
                .unwrap_err()
                .to_string()
                .contains("not a number")
        );
        assert!(
            parse_spec("m@3/foo=1", &a)
                .unwrap_err()
                .to_string()
                .contains("unknown suffix")
        );
    }
}
