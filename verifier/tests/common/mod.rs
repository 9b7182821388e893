//! Shared by the verifier's tests: real SmolLM2-135M, a split-backbone drafter, servers on
//! 127.0.0.1 and a scripted speculative client.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use tandem_client::{Endpoint, SessionClient};
use tandem_core::protocol::{
    Accepted, BackboneClaim, ClientMsg, Hello, Outcome, ServerMsg, Verify,
};
use tandem_core::sampling::{Rng, SamplingParams, argmax, distribution, sample_from};
use tandem_models::{Model, Tokenizer};
use tandem_verifier::{RunningServer, ServerConfig, State, TargetSpec};

/// The test target.
pub const SMOL: &str = "smollm2-135m";

/// Blocks of the split-backbone drafter.
pub const DRAFT_LAYERS: usize = 26;

/// Prompts for generation tests.
pub const PROMPTS: [&str; 3] = [
    "def fib(n: int):\n    \"\"\"Return n-th Fibonacci number.\n    >>> fib(10)\n    55\n    \"\"\"\n",
    "The capital of France is",
    "def is_palindrome(text: str):\n    \"\"\"\n    Checks if given string is a palindrome\n    \"\"\"\n",
];

/// Path of the fetched target.
pub fn smol() -> PathBuf {
    tandem_models::fetch::resolve(SMOL).unwrap_or_else(|e| {
        panic!("{e}\n(the README's test command fetches the test models: `bash ci/test`)")
    })
}

/// The target model, loaded once per test binary.
pub fn target() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load(smol()).unwrap())
}

/// The tokenizer, loaded once.
pub fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::from_gguf(smol()).unwrap())
}

/// A drafter GGUF split from the target's first `DRAFT_LAYERS` blocks (made once).
pub fn drafter_path() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let out = dir.join(format!("smollm2-backbone-{DRAFT_LAYERS}.gguf"));
        let tmp = dir.join(format!(
            "smollm2-backbone-{DRAFT_LAYERS}.{}.tmp",
            std::process::id()
        ));
        tandem_models::backbone::split_backbone(smol(), DRAFT_LAYERS, &tmp).unwrap();
        std::fs::rename(&tmp, &out).unwrap();
        out
    })
}

/// The drafter model, loaded once.
pub fn drafter() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load(drafter_path()).unwrap())
}

/// Greedy target-only generation: the reference every speculative run must equal.
pub fn target_only(prompt: &[u32], n: usize) -> Vec<u32> {
    let m = target();
    let mut cache = m.new_cache();
    let mut logits = m.forward_last(prompt, 0, &mut cache).unwrap();
    let mut out = Vec::new();
    let mut pos = prompt.len();
    while out.len() < n {
        let t = argmax(logits.last());
        out.push(t);
        logits = m.forward_last(&[t], pos, &mut cache).unwrap();
        pos += 1;
    }
    out
}

/// The adapter the tests run on: `TANDEM_TEST_GPU` (part of a name), else the first found.
pub fn adapter() -> String {
    let found = tandem_gpu::list_adapters();
    assert!(
        !found.is_empty(),
        "wgpu finds no adapter: install Mesa's Vulkan driver (`ci/setup` does)"
    );
    std::env::var("TANDEM_TEST_GPU").unwrap_or_else(|_| found[0].name.clone())
}

/// Greedy decoding of the target on the GPU alone, one step at a time.
pub fn gpu_target_only(prompt: &[u32], n: usize) -> Vec<u32> {
    static M: OnceLock<Arc<tandem_gpu::GpuModel>> = OnceLock::new();
    let m = M.get_or_init(|| {
        let gpu = tandem_gpu::Gpu::open(&tandem_gpu::GpuChoice::Named(adapter()))
            .unwrap()
            .unwrap();
        tandem_gpu::GpuModel::load(gpu, &smol()).unwrap()
    });
    let mut s = tandem_gpu::GpuSession::new(Arc::clone(m)).unwrap();
    let mut o = s.forward(prompt, 0, tandem_gpu::Want::Argmax).unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        out.push(o.argmax);
        o = s
            .forward(
                &[o.argmax],
                prompt.len() + out.len() - 1,
                tandem_gpu::Want::Argmax,
            )
            .unwrap();
    }
    out
}

/// Starts a server on 127.0.0.1 with the given targets.
pub async fn server(config: ServerConfig, targets: &[&str]) -> RunningServer {
    let state = State::new(config);
    for t in targets {
        let spec: TargetSpec = t.parse().unwrap();
        let st = state.clone();
        tokio::task::spawn_blocking(move || st.load(&spec))
            .await
            .unwrap()
            .unwrap();
    }
    tandem_verifier::start(state).await.unwrap()
}

/// A `Hello` for the split drafter.
pub fn hello(sampling: SamplingParams, max_tokens: u32) -> Hello {
    let fp = tandem_models::backbone::fingerprints(drafter_path(), None).unwrap();
    Hello {
        tokenizer: fp.tokenizer.0,
        backbone: Some(BackboneClaim {
            layers: fp.backbone_layers as u32,
            fingerprint: fp.backbone.0,
        }),
        family: None,
        sampling: tandem_core::sampling::SamplingParams {
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            seed: sampling.seed,
        },
        max_tokens,
        token: None,
    }
}

/// What a scripted run saw.
#[derive(Debug, Default)]
pub struct Run {
    /// Generated tokens (first token included), cut to the length asked for.
    pub tokens: Vec<u32>,
    /// The session's grant.
    pub accepted: Option<Accepted>,
    /// Rounds and draft tokens accepted.
    pub rounds: usize,
    /// Draft tokens accepted over all rounds.
    pub accepted_drafts: usize,
    /// Hints received, and whether each came before its round's result, well formed (γ+1
    /// tokens, or fewer ending at the first disagreement with the drafts).
    pub hints: usize,
    /// Hints that broke the rules above.
    pub bad_hints: usize,
}

/// Opens a session and generates `n` tokens: the drafter proposes `gamma` tokens a round
/// (0 = cloud autoregressive), sampled from its own distribution when `sampling` is not
/// greedy, and the client samples corrections from the residual. With a barrier, the
/// session waits on it twice after its first round (the test acts in between).
pub async fn speculative(
    ep: &Endpoint,
    hello_msg: Hello,
    prompt: &[u32],
    n: usize,
    gamma: usize,
    pause_after_first_round: Option<Arc<tokio::sync::Barrier>>,
) -> anyhow::Result<Run> {
    let params = SamplingParams {
        temperature: hello_msg.sampling.temperature,
        top_p: hello_msg.sampling.top_p,
        seed: hello_msg.sampling.seed,
    };
    let mut rng = Rng::new(params.seed ^ 0xd1a7);
    let mut c = SessionClient::connect(ep).await?;
    c.send(&ClientMsg::Hello(hello_msg))?;
    c.send(&ClientMsg::Prefill(prompt.to_vec()))?;
    let mut run = Run::default();
    match c.recv().await? {
        Some(ServerMsg::Accepted(a)) => run.accepted = Some(a),
        other => anyhow::bail!("expected Accepted, got {other:?}"),
    }
    let first = match c.recv().await? {
        Some(ServerMsg::First(t)) => t,
        other => anyhow::bail!("expected First, got {other:?}"),
    };
    let mut committed = prompt.to_vec();
    committed.push(first);
    let d = drafter();
    let mut cache = d.new_cache();
    // Drafter cache holds committed[..valid].
    let mut valid = 0usize;
    let mut round = 0u32;
    while committed.len() - prompt.len() < n {
        // Draft γ tokens after the committed ones.
        let mut drafts = Vec::new();
        let mut qs = Vec::new();
        let mut q_rows: Vec<Vec<(u32, f32)>> = Vec::new();
        let mut feed = committed[valid..].to_vec();
        let mut pos = valid;
        for _ in 0..gamma {
            let logits = tokio::task::block_in_place(|| d.forward_last(&feed, pos, &mut cache))?;
            pos += feed.len();
            let (x, q) = if params.is_greedy() {
                (argmax(logits.last()), 1.0)
            } else {
                let dist = distribution(logits.last(), &params);
                let x = sample_from(&dist, &mut rng);
                let q = dist.iter().find(|e| e.0 == x).map_or(0.0, |e| e.1);
                q_rows.push(dist);
                (x, q)
            };
            drafts.push(x);
            qs.push(q);
            feed = vec![x];
        }
        let pos0 = committed.len();
        c.send(&ClientMsg::Verify(Verify {
            round,
            pos: pos0 as u32,
            prev: committed[pos0 - 1],
            tokens: drafts.clone(),
            q: qs,
        }))?;
        let result = loop {
            match c.recv().await? {
                Some(ServerMsg::Hint { round: r, tokens }) => {
                    run.hints += 1;
                    // The exit's tokens up to its first disagreement with the drafts, or
                    // through the bonus position.
                    let k = tokens.len();
                    let well_formed = (1..=gamma + 1).contains(&k)
                        && tokens[..k - 1] == drafts[..k - 1]
                        && (k == gamma + 1 || tokens[k - 1] != drafts[k - 1]);
                    if r != round || !well_formed {
                        run.bad_hints += 1;
                    }
                }
                Some(ServerMsg::Result(r)) => break r,
                other => anyhow::bail!("round {round}: expected Hint or Result, got {other:?}"),
            }
        };
        anyhow::ensure!(result.round == round, "result for round {}", result.round);
        let a = result.accepted as usize;
        run.rounds += 1;
        run.accepted_drafts += a;
        committed.extend_from_slice(&drafts[..a]);
        match result.outcome {
            Outcome::Token(t) => committed.push(t),
            Outcome::Residual(top) => {
                let q = &q_rows[a];
                let t = tandem_core::accept::sample_correction(
                    &top,
                    |id| q.iter().find(|e| e.0 == id).map_or(0.0, |e| e.1),
                    &mut rng,
                );
                committed.push(t);
            }
        }
        // Positions before pos0 + a hold committed tokens in the drafter's cache.
        valid = cache.len().min(pos0 + a);
        round += 1;
        if round == 1
            && let Some(b) = &pause_after_first_round
        {
            // Tell the test this session is mid-generation, then wait until it says go on.
            b.wait().await;
            b.wait().await;
        }
    }
    c.send(&ClientMsg::Close)?;
    run.tokens = committed[prompt.len()..prompt.len() + n].to_vec();
    Ok(run)
}

/// A value of the server's `/metrics` (a line `NAME VALUE`).
pub fn metric(srv: &RunningServer, name: &str) -> f64 {
    let text = srv.state.metrics.render();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// The session's messages until the server ends the stream.
pub async fn drain(c: &mut SessionClient) -> Vec<ServerMsg> {
    let mut v = Vec::new();
    while let Ok(Some(m)) = c.recv().await {
        v.push(m);
    }
    v
}

/// The first `Error` among `msgs`: its code and message.
pub fn error_code(msgs: &[ServerMsg]) -> Option<(tandem_core::protocol::ErrorCode, String)> {
    msgs.iter().find_map(|m| match m {
        ServerMsg::Error { code, message } => Some((*code, message.clone())),
        _ => None,
    })
}
