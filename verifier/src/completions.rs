//! `POST /v1/completions`: OpenAI-compatible text completion on the target alone (for
//! clients without a drafter), JSON or server-sent events (`"stream": true`).

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use std::sync::Arc;
use tandem_core::accept::{judge, sample_correction};
use tandem_core::protocol::Outcome;
use tandem_core::sampling::{
    Rng, SamplingParams, argmax, distribution, prob_of, sample, sample_from,
};
use tandem_models::{IncrementalDecoder, KvPrecision, Model};
use tokio::sync::mpsc;

use crate::registry::Target;
use crate::server::{ServerDraft, State};
use tandem_client::openai::{ApiError, Body, CompletionRequest, Kind, Meta, Piece, parse, respond};

/// A completion request with this server's defaults filled in.
struct Completion {
    prompt: String,
    max_tokens: usize,
    params: SamplingParams,
    /// `Some(γ)`: the cloud-sd baseline with the server's draft model.
    speculative: Option<usize>,
}

impl Completion {
    fn from_request(r: &CompletionRequest) -> Completion {
        Completion {
            prompt: r.prompt.clone(),
            max_tokens: r.common.max_tokens.unwrap_or(16) as usize,
            params: SamplingParams {
                temperature: r.common.temperature.unwrap_or(1.0),
                top_p: r.common.top_p.unwrap_or(1.0),
                seed: r.common.seed.unwrap_or(0),
            },
            speculative: r.speculative.then_some(r.gamma.unwrap_or(4)),
        }
    }
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
    req: &Completion,
    max_context: usize,
    kv: KvPrecision,
    emit: &mut dyn FnMut(Piece) -> bool,
) {
    let fail = |m: String| Piece::Failed(ApiError::invalid(m));
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
    let params = req.params;
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
        Err(e) => return ApiError::invalid(format!("reading the body: {e}")).response(),
    };
    let creq: CompletionRequest = match parse(&body, "JSON with a string `prompt`") {
        Ok(r) => r,
        Err(e) => return e.response(),
    };
    let completion = Completion::from_request(&creq);
    let (target, draft) = match admit(&state, &creq, &completion) {
        Ok(t) => t,
        Err(e) => return e.response(),
    };
    let Some(slot) = state.enter() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            state.busy_message(),
        )
        .response();
    };
    let limits = state.config.limits;
    let (tx, rx) = mpsc::unbounded_channel::<Piece>();
    let gen_target = target.clone();
    let metrics = state.metrics.clone();
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let _use = gen_target.enter();
        let draft = draft.as_ref().zip(completion.speculative);
        let draft = draft.map(|(d, gamma)| (&d.model, gamma));
        generate(
            &gen_target,
            draft,
            &completion,
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
    respond(
        Meta::new(Kind::Completion, target.id()),
        creq.common.stream,
        rx,
    )
    .await
}

/// Checks a request against this server's limits and finds its target (and, for the
/// cloud-sd baseline, the draft model).
fn admit(
    state: &State,
    creq: &CompletionRequest,
    c: &Completion,
) -> Result<(Arc<Target>, Option<Arc<ServerDraft>>), ApiError> {
    c.params
        .validate()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let limits = state.config.limits;
    if c.max_tokens > limits.max_tokens {
        return Err(ApiError::invalid(format!(
            "max_tokens {} exceeds this server's limit of {}",
            c.max_tokens, limits.max_tokens
        )));
    }
    let target = pick(state, creq.common.model.as_deref()).map_err(ApiError::not_found)?;
    let Some(gamma) = c.speculative else {
        return Ok((target, None));
    };
    let Some(d) = state.draft.clone() else {
        return Err(ApiError::invalid(
            "`speculative` needs a draft model on the server: start it with --draft NAME|PATH",
        ));
    };
    if d.tokenizer_fp != target.tokenizer_fp {
        return Err(ApiError::invalid(format!(
            "the server's draft model {} does not share the tokenizer of {}",
            d.path.display(),
            target.id()
        )));
    }
    if gamma > limits.max_draft {
        return Err(ApiError::invalid(format!(
            "gamma {gamma} exceeds this server's limit of {}",
            limits.max_draft
        )));
    }
    Ok((target, Some(d)))
}
