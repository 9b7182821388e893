//! `tandem demo`: fetches a real draft/target pair, starts an embedded verifier on
//! loopback behind an emulated link, runs the drafter component against it and streams a
//! code completion, then runs the same prompt cloud-only and shows the two side by side.

use std::path::PathBuf;

use anyhow::Context;
use tandem_verifier::{ServerConfig, State, TargetSpec};

use crate::generate::{GenerateArgs, RunStats, StrategyArg, default_drafter};
use crate::models_cmd::fetch_with_progress;

/// Options of `tandem demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// SmolLM2-135M as target with a drafter split from its first 26 blocks (fast, but an
    /// untrained split accepts few drafts) instead of Qwen2.5-Coder-0.5B → 1.5B.
    #[arg(long)]
    pub small: bool,
    /// The prompt (default: the opening of a HumanEval problem).
    #[arg(long)]
    pub prompt: Option<String>,
    /// New tokens at most.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// tandem, sync or cloud-ar.
    #[arg(long, value_enum, default_value_t = StrategyArg::Tandem)]
    pub strategy: StrategyArg,
    /// The drafter component (.wasm).
    #[arg(long, default_value_os_t = default_drafter())]
    pub drafter: PathBuf,
    /// Where the draft model runs: auto, off, or part of an adapter's name (`tandem gpu
    /// list`).
    #[arg(long, default_value = "auto")]
    pub gpu: tandem_models::GpuChoice,
    /// Round trip of the emulated link between device and verifier, ms (the in-process link
    /// shaper; 0 = plain loopback).
    #[arg(long, default_value_t = 60)]
    pub rtt_ms: u64,
    /// Skip the cloud-only run and the side-by-side at the end.
    #[arg(long)]
    pub no_compare: bool,
}

const PROMPT: &str = "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n    \"\"\" Check if in given list of numbers, are any two numbers closer to each other than\n    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n    False\n    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n    True\n    \"\"\"\n";

/// Runs the demo.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let (target, draft, exit) = if args.small {
        let target = fetch_with_progress("smollm2-135m")?;
        let split = tandem_models::fetch::cache_dir().join("smollm2-135m-backbone-26.gguf");
        if !split.exists() {
            eprintln!("splitting a 26-block backbone drafter off SmolLM2-135M");
            let tmp = split.with_extension(format!("{}.tmp", std::process::id()));
            tandem_models::backbone::split_backbone(&target, 26, &tmp)?;
            std::fs::rename(&tmp, &split)?;
        }
        (target, split, 27)
    } else {
        let draft = fetch_with_progress("qwen2.5-coder-0.5b")?;
        let target = fetch_with_progress("qwen2.5-coder-1.5b")?;
        (target, draft, 25)
    };
    let rt = tokio::runtime::Runtime::new()?;
    eprintln!("starting a verifier on 127.0.0.1 with {}", target.display());
    let (server, shaper) = rt.block_on(async {
        let state = State::new(ServerConfig {
            early_exit_layer: Some(exit),
            ..ServerConfig::default()
        });
        let spec: TargetSpec = target.display().to_string().parse()?;
        let st = state.clone();
        let st2 = state.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            st.load(&spec)?;
            // One forward reads every weight once, so that neither run below pays for
            // faulting the mapped file in and the two first-token times compare.
            for t in st2.registry.list() {
                t.model.forward_last(&[0], 0, &mut t.model.new_cache())?;
            }
            Ok(())
        })
        .await??;
        let server = tandem_verifier::start(state).await?;
        let shaper = if args.rtt_ms > 0 {
            let link = tandem_client::shaper::Link {
                delay: std::time::Duration::from_micros(args.rtt_ms * 500),
                rate_bps: None,
            };
            Some(tandem_client::shaper::start(server.addr, link).await?)
        } else {
            None
        };
        anyhow::Ok((server, shaper))
    })?;
    let addr = shaper.as_ref().map_or(server.addr, |s| s.addr);
    if args.rtt_ms > 0 {
        eprintln!(
            "between device and verifier: an emulated link with a {} ms round trip \
             (--rtt-ms; 0 for plain loopback)",
            args.rtt_ms
        );
    }
    let prompt = args.prompt.clone().unwrap_or_else(|| PROMPT.to_string());
    eprintln!(
        "drafting with {} in the drafter component {}\n",
        draft.display(),
        args.drafter.display()
    );
    print!("{prompt}");
    let generate_args = GenerateArgs {
        drafter: args.drafter.clone(),
        prompt,
        max_tokens: args.max_tokens,
        strategy: args.strategy,
        gpu: args.gpu.clone(),
        ..GenerateArgs::with_defaults(&format!("http://{addr}"), &draft.display().to_string())
    };
    let stats = crate::generate::run(&generate_args, &mut std::io::stdout())
        .context("the demo run failed")?;
    println!();
    eprintln!("\n{}", stats.line());
    if !args.no_compare && args.strategy != StrategyArg::CloudAr {
        eprintln!(
            "\nthe same prompt cloud-only, for comparison (every token one round trip to the \
             verifier; --no-compare skips this)…"
        );
        let cloud_args = GenerateArgs {
            strategy: StrategyArg::CloudAr,
            quiet: true,
            ..generate_args
        };
        let cloud = crate::generate::run(&cloud_args, &mut std::io::stdout())
            .context("the cloud-only run failed")?;
        eprintln!("\n{}", side_by_side(&cloud, &stats, args.rtt_ms));
        if cloud.token_ids != stats.token_ids {
            anyhow::bail!(
                "the {} text differs from the cloud-only text: speculative decoding must \
                 not change the output; please report this",
                stats.strategy
            );
        }
    }
    let _g = rt.enter();
    drop(shaper);
    drop(server);
    Ok(())
}

/// One figure of a run, as the table shows it.
type Cell = fn(&RunStats) -> String;

/// The closing table: cloud-only against the speculative run, same prompt and link.
fn side_by_side(cloud: &RunStats, spec: &RunStats, rtt_ms: u64) -> String {
    let rows: [(&str, Cell); 5] = [
        ("tokens/s", |s| format!("{:.1}", s.tokens_per_s)),
        ("first token", |s| format!("{:.2} s", s.ttft_s)),
        ("tokens per round", |s| format!("{:.2}", s.mean_per_round)),
        ("bytes per token", |s| {
            format!(
                "{:.0} up, {:.0} down",
                s.up_bytes_per_token, s.down_bytes_per_token
            )
        }),
        ("round trips", |s| s.rounds.to_string()),
    ];
    let head = format!("{} tokens, {rtt_ms} ms link", spec.tokens);
    let mut out = format!(
        "{head:<24}{:>22}{:>22}\n",
        "cloud-only",
        spec.strategy.as_str()
    );
    for (name, f) in &rows {
        out.push_str(&format!("{name:<24}{:>22}{:>22}\n", f(cloud), f(spec)));
    }
    out.push_str(&format!(
        "{:<24}{:>22}{:>22}\n",
        "speedup",
        "1.00×",
        format!("{:.2}×", spec.tokens_per_s / cloud.tokens_per_s.max(1e-9))
    ));
    out.push_str(&format!(
        "(device and verifier share this machine's {} cores here, so drafting slows the \
         verifier a little; on separate machines neither waits for the other)\n",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    ));
    out.push_str(&format!(
        "same text: {}",
        if cloud.token_ids == spec.token_ids {
            "yes, token for token (the target decides every token)"
        } else {
            "NO"
        }
    ));
    out
}
