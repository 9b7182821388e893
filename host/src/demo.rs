//! `tandem demo`: fetches a real draft/target pair, starts an embedded verifier on
//! loopback, runs the drafter component against it and streams a code completion.

use std::path::PathBuf;

use anyhow::Context;
use tandem_verifier::{ServerConfig, State, TargetSpec};

use crate::generate::{GenerateArgs, StrategyArg, default_drafter};
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
    let server = rt.block_on(async {
        let state = State::new(ServerConfig {
            early_exit_layer: Some(exit),
            ..ServerConfig::default()
        });
        let spec: TargetSpec = target.display().to_string().parse()?;
        let st = state.clone();
        tokio::task::spawn_blocking(move || st.load(&spec)).await??;
        tandem_verifier::start(state).await
    })?;
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
        ..GenerateArgs::with_defaults(
            &format!("http://{}", server.addr),
            &draft.display().to_string(),
        )
    };
    let stats = crate::generate::run(&generate_args, &mut std::io::stdout())
        .context("the demo run failed")?;
    println!();
    eprintln!("\n{}", stats.line());
    let _g = rt.enter();
    drop(server);
    Ok(())
}
