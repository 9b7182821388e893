//! `POST /v1/completions`: OpenAI-compatible text completion on the target alone (for
//! clients without a drafter), JSON or server-sent events (`"stream": true`).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tandem_core::accept::{judge, sample_correction};
use tandem_core::protocol::Outcome;
use tandem_core::sampling::{
    Rng, SamplingParams, argmax, distribution, prob_of, sample, sample_from,
};
use tandem_models::{IncrementalDecoder, KvPrecision, Model};
use tokio::sync::mpsc;

use crate::body::ChannelBody;
use crate::registry::Target;
use crate::server::{Body, State, error};

#[derive(serde::Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: String,
    #[serde(default = "default_max_tokens")]
    max_tokens: usize,
    #[serde(default = "one")]
    temperature: f32,
    #[serde(default = "one")]
    top_p: f32,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    stream: bool,
    /// tandem extension: speculative decoding with the server's own draft model
    /// (`--draft`), the "cloud-sd" baseline.
    #[serde(default)]
    speculative: bool,
    /// Draft length for `speculative`.
    #[serde(default = "default_gamma")]
    gamma: usize,
}

fn default_gamma() -> usize {
    4
}

fn default_max_tokens() -> usize {
    16
}

fn one() -> f32 {
    1.0
}

enum Piece {
    Text(String),
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

/// Picks the target a completion names: `family`, `family@version`, or the newest loaded.
fn pick(state: &State, model: Option<&str>) -> Result<Arc<Target>, String> {
    let all = state.registry.list();
    let found = match model {
        None => all.last().cloned(),
        Some(m) => all
            .iter()
            .rev()
            .find(|t| t.id() == m || t.family == m)
            .cloned(),
    };
    found.ok_or_else(|| {
        let ids: Vec<String> = all.iter().map(|t| t.id()).collect();
        format!(
            "model `{}` is not loaded; loaded: {}",
            model.unwrap_or(""),
            if ids.is_empty() {
                "none".into()
            } else {
                ids.join(", ")
            }
        )
    })
}

/// Commits tokens after `prompt` until `commit` returns false or the context is full:
/// plain decoding (one target step per token), or with `draft` = (model, γ) speculative
/// decoding on this server (the "cloud-sd" baseline): γ drafts, one target forward over the
/// block, the shared acceptance rule; with the whole q at hand the residual is exact.
fn decode(
    target: &Model,
    draft: Option<(&Model, usize)>,
    prompt: &[u32],
    params: &SamplingParams,
    context: usize,
    kv: KvPrecision,
    commit: &mut dyn FnMut(u32) -> bool,
) -> Result<(), String> {
    let failed = |e: tandem_models::Error| format!("model failed: {e}");
    let mut rng = Rng::new(params.seed);
    let mut draft_rng = Rng::new(params.seed ^ 0xc10d_5d00_0000_0001);
    let mut cache = target.new_cache_with(kv);
    let logits = target.forward_last(prompt, 0, &mut cache).map_err(failed)?;
    let first = sample(logits.last(), params, &mut rng);
    let mut committed = prompt.to_vec();
    committed.push(first);
    if !commit(first) {
        return Ok(());
    }
    let mut draft_cache = draft.map(|(m, _)| m.new_cache());
    let mut draft_valid = 0;
    loop {
        let pos0 = committed.len();
        if pos0 >= context {
            return Ok(());
        }
        let mut drafts = Vec::new();
        let mut qs = Vec::new();
        let mut dists = Vec::new();
        if let (Some((dm, gamma)), Some(dc)) = (draft, draft_cache.as_mut()) {
            let gamma = gamma.min(context - pos0 - 1);
            let mut feed = committed[draft_valid..].to_vec();
            let mut p = draft_valid;
            for _ in 0..gamma {
                let l = dm.forward_last(&feed, p, dc).map_err(failed)?;
                p += feed.len();
                draft_valid = p;
                let (x, q, dist) = if params.is_greedy() {
                    (argmax(l.last()), 1.0, Vec::new())
                } else {
                    let dist = distribution(l.last(), params);
                    let x = sample_from(&dist, &mut draft_rng);
                    let q = prob_of(&dist, x);
                    (x, q, dist)
                };
                drafts.push(x);
                qs.push(q);
                dists.push(dist);
                feed = vec![x];
            }
        }
        let mut input = vec![committed[pos0 - 1]];
        input.extend_from_slice(&drafts);
        let rows = target
            .forward(&input, pos0 - 1, &mut cache)
            .map_err(failed)?;
        let verdict = judge(&drafts, &qs, |i| rows.row(i), params, &mut rng, usize::MAX);
        let n = verdict.accepted;
        let next = match verdict.outcome {
            Outcome::Token(t) => t,
            Outcome::Residual(top) => {
                let dist = &dists[n];
                sample_correction(&top, |id| prob_of(dist, id), &mut draft_rng)
            }
        };
        cache.truncate(pos0 + n);
        draft_valid = draft_valid.min(pos0 + n);
        for &t in drafts[..n].iter().chain([&next]) {
            committed.push(t);
            if !commit(t) {
                return Ok(());
            }
        }
    }
}

fn generate(
    target: &Target,
    draft: Option<(&Model, usize)>,
    req: &CompletionRequest,
    max_context: usize,
    kv: KvPrecision,
    emit: &mut dyn FnMut(Piece) -> bool,
) {
    let fail = |m: String| Piece::Failed(m);
    let tokens = match target.tokenizer.encode(&req.prompt) {
        Ok(t) if !t.is_empty() => t,
        Ok(_) => {
            emit(fail("the prompt encodes to no tokens".into()));
            return;
        }
        Err(e) => {
            emit(fail(format!("tokenizing the prompt: {e}")));
            return;
        }
    };
    let model = &target.model;
    let context = max_context.min(model.config().context_length);
    if tokens.len() >= context {
        emit(fail(format!(
            "prompt of {} tokens does not fit the context of {context}",
            tokens.len()
        )));
        return;
    }
    let params = SamplingParams {
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
    };
    let mut decoder = IncrementalDecoder::new();
    let mut generated = 0;
    let mut finish_reason = "length";
    let mut failure = None;
    let mut gone = false;
    if req.max_tokens > 0 {
        let result = decode(model, draft, &tokens, &params, context, kv, &mut |t| {
            generated += 1;
            if target.tokenizer.eos_tokens().contains(&t) {
                finish_reason = "stop";
                return false;
            }
            match decoder.push(&target.tokenizer, t) {
                Ok(text) if !text.is_empty() => {
                    if !emit(Piece::Text(text)) {
                        gone = true;
                        return false;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    failure = Some(format!("detokenizing: {e}"));
                    return false;
                }
            }
            generated < req.max_tokens
        });
        if let Err(e) = result {
            failure = Some(e);
        }
    }
    if gone {
        return;
    }
    if let Some(m) = failure {
        emit(fail(m));
        return;
    }
    if let Ok(t) = decoder.finish(&target.tokenizer)
        && !t.is_empty()
    {
        emit(Piece::Text(t));
    }
    emit(Piece::Done {
        finish_reason,
        prompt_tokens: tokens.len(),
        completion_tokens: generated,
    });
}

/// Handles one completion request.
pub(crate) async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let body = match Limited::new(req.into_body(), 4 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
    };
    let creq: CompletionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("bad completion request: {e} (expected JSON with a string `prompt`)"),
            );
        }
    };
    let params = SamplingParams {
        temperature: creq.temperature,
        top_p: creq.top_p,
        seed: creq.seed,
    };
    if let Err(e) = params.validate() {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let limits = state.config.limits;
    if creq.max_tokens > limits.max_tokens {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "max_tokens {} exceeds this server's limit of {}",
                creq.max_tokens, limits.max_tokens
            ),
        );
    }
    let target = match pick(&state, creq.model.as_deref()) {
        Ok(t) => t,
        Err(m) => return error(StatusCode::NOT_FOUND, m),
    };
    let draft = if creq.speculative {
        let Some(d) = state.draft.clone() else {
            return error(
                StatusCode::BAD_REQUEST,
                "`speculative` needs a draft model on the server: start it with --draft NAME|PATH",
            );
        };
        if d.tokenizer_fp != target.tokenizer_fp {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "the server's draft model {} does not share the tokenizer of {}",
                    d.path.display(),
                    target.id()
                ),
            );
        }
        if creq.gamma > limits.max_draft {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "gamma {} exceeds this server's limit of {}",
                    creq.gamma, limits.max_draft
                ),
            );
        }
        Some(d)
    } else {
        None
    };
    let Some(slot) = state.enter() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, state.busy_message());
    };
    let stream = creq.stream;
    let (tx, mut rx) = mpsc::unbounded_channel::<Piece>();
    let gen_target = target.clone();
    let metrics = state.metrics.clone();
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let _use = gen_target.enter();
        let draft = draft.as_ref().map(|d| (&d.model, creq.gamma));
        generate(
            &gen_target,
            draft,
            &creq,
            limits.max_context,
            limits.kv_cache,
            &mut |p| {
                if let Piece::Done {
                    completion_tokens, ..
                } = &p
                {
                    metrics.add_generated(*completion_tokens);
                }
                tx.send(p).is_ok()
            },
        );
    });
    let id = format!(
        "cmpl-{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let model_id = target.id();
    // One completion object (or SSE chunk): text, finish reason, and usage when known.
    let body = move |text: &str, finish: Option<&str>, usage: Option<(usize, usize)>| {
        let mut v = serde_json::json!({
            "id": id, "object": "text_completion", "created": created, "model": model_id,
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}],
        });
        if let Some((prompt, completion)) = usage {
            v["usage"] = serde_json::json!({"prompt_tokens": prompt, "completion_tokens": completion,
                                            "total_tokens": prompt + completion});
        }
        v
    };
    if !stream {
        let mut text = String::new();
        while let Some(p) = rx.recv().await {
            match p {
                Piece::Text(t) => text.push_str(&t),
                Piece::Failed(m) => return error(StatusCode::BAD_REQUEST, m),
                Piece::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let v = body(
                        &text,
                        Some(finish_reason),
                        Some((prompt_tokens, completion_tokens)),
                    );
                    return Response::builder()
                        .header("content-type", "application/json")
                        .body(http_body_util::Full::new(Bytes::from(format!("{v}\n"))).boxed())
                        .unwrap();
                }
            }
        }
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "generation stopped early",
        );
    }
    let (out, sse) = ChannelBody::new();
    tokio::spawn(async move {
        let chunk = |v: serde_json::Value| Bytes::from(format!("data: {v}\n\n"));
        while let Some(p) = rx.recv().await {
            let b = match p {
                Piece::Text(t) => chunk(body(&t, None, None)),
                Piece::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                } => chunk(body(
                    "",
                    Some(finish_reason),
                    Some((prompt_tokens, completion_tokens)),
                )),
                Piece::Failed(m) => Bytes::from(format!(
                    "data: {}\n\n",
                    serde_json::json!({"error": {"message": m}})
                )),
            };
            if out.send(b).is_err() {
                return;
            }
        }
        let _ = out.send(Bytes::from_static(b"data: [DONE]\n\n"));
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(sse.boxed())
        .unwrap()
}
