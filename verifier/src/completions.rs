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
use tandem_models::{IncrementalDecoder, Model, Rows, Tokenizer};
use tokio::sync::mpsc;

use crate::batch::Work;
use crate::metrics::Metrics;
use crate::registry::Target;
use crate::server::{ServerDraft, State};
use crate::session::Limits;
use tandem_client::openai::{
    ApiError, Body, Choice, CompletionRequest, Kind, Meta, Options, Piece, TokenLogprob, parse,
    releasing, respond, run_choices,
};

/// A completion request with this server's defaults filled in.
struct Completion {
    prompt: String,
    options: Options,
    max_tokens: usize,
    params: SamplingParams,
    /// `Some(γ)`: the cloud-sd baseline with the server's draft model.
    speculative: Option<usize>,
}

impl Completion {
    fn from_request(r: &CompletionRequest) -> Result<Completion, ApiError> {
        let (prompt, options) = r.check()?;
        Ok(Completion {
            prompt,
            max_tokens: options.max_tokens.unwrap_or(16) as usize,
            params: SamplingParams {
                temperature: options.temperature.unwrap_or(1.0),
                top_p: options.top_p.unwrap_or(1.0),
                seed: options.seed.unwrap_or(0),
            },
            speculative: r.speculative.then_some(r.gamma.unwrap_or(4)),
            options,
        })
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

/// Commits tokens after `prompt` until `commit` returns false or the context is full
/// (`commit` also gets the target's logits at the token's position); the target's forwards
/// go through its batch scheduler like sessions' rounds:
/// plain decoding (one target step per token), or with `draft` = (model, γ) speculative
/// decoding on this server (the "cloud-sd" baseline): γ drafts, one target forward over the
/// block, the shared acceptance rule; with the whole q at hand the residual is exact.
#[allow(clippy::too_many_arguments)]
fn decode(
    target: &Arc<Target>,
    draft: Option<(&Model, usize)>,
    prompt: &[u32],
    params: &SamplingParams,
    context: usize,
    limits: &Limits,
    metrics: &Arc<Metrics>,
    commit: &mut dyn FnMut(u32, &[f32]) -> bool,
) -> Result<(), String> {
    let failed = |e: tandem_models::Error| format!("model failed: {e}");
    let mut rng = Rng::new(params.seed);
    let mut draft_rng = Rng::new(params.seed ^ 0xc10d_5d00_0000_0001);
    let mut cache = target.sequence(limits).map_err(failed)?;
    let logits = target
        .prefill(&mut cache, prompt, limits, metrics)
        .map_err(failed)?;
    let first = sample(logits.last(), params, &mut rng);
    let mut committed = prompt.to_vec();
    committed.push(first);
    if !commit(first, logits.last()) {
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
        let work = Work {
            tokens: &input,
            pos: pos0 - 1,
            rows: Rows::All,
            logits: true,
            top: None,
            exit: 0,
            on_exit: None,
            prompt: false,
        };
        let rows = target
            .forward(&mut cache, work, limits, metrics)
            .map_err(failed)?
            .logits
            .ok_or_else(|| "model failed: the forward returned no logits".to_string())?;
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
        for (i, &t) in drafts[..n].iter().chain([&next]).enumerate() {
            committed.push(t);
            if !commit(t, rows.row(i)) {
                return Ok(());
            }
        }
    }
}

/// The target's log-probability of `t` under `logits` (a log-softmax), with the `k` most
/// likely tokens.
fn logprob(tokenizer: &Tokenizer, logits: &[f32], t: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    let lp = |id: u32| (logits[id as usize] as f64 - lse) as f32;
    let text = |id: u32| tokenizer.decode(&[id]).unwrap_or_default();
    let mut top: Vec<u32> = Vec::with_capacity(k + 1);
    for id in 0..logits.len() as u32 {
        let at = top.partition_point(|&o| logits[o as usize] >= logits[id as usize]);
        if at < k {
            top.insert(at, id);
            top.truncate(k);
        }
    }
    TokenLogprob {
        token: text(t),
        logprob: lp(t),
        top: top.into_iter().map(|id| (text(id), lp(id))).collect(),
        offset: 0,
    }
}

/// Runs a request's choices one after the other (`run_choices`) and sends their pieces.
fn generate(
    target: &Arc<Target>,
    draft: Option<(&Model, usize)>,
    req: &Completion,
    limits: &Limits,
    metrics: &Arc<Metrics>,
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
    let context = limits.max_context.min(target.model.config().context_length);
    if tokens.len() + req.max_tokens > context {
        emit(Piece::Failed(ApiError::context_exceeded(
            "prompt",
            &target.id(),
            context,
            tokens.len(),
            req.max_tokens,
        )));
        return;
    }
    run_choices(req.options.n, req.params.is_greedy(), emit, |i, send| {
        let params = SamplingParams {
            seed: req.params.seed.wrapping_add(i as u64),
            ..req.params
        };
        one_choice(
            target, draft, req, &tokens, &params, context, limits, metrics, send,
        )
    });
}

/// One choice: decodes, applies the stop sequences, sends text as it comes and `Done`
/// (or `Failed`). False when the client is gone or it failed.
#[allow(clippy::too_many_arguments)]
fn one_choice(
    target: &Arc<Target>,
    draft: Option<(&Model, usize)>,
    req: &Completion,
    tokens: &[u32],
    params: &SamplingParams,
    context: usize,
    limits: &Limits,
    metrics: &Arc<Metrics>,
    send: &mut dyn FnMut(Piece) -> bool,
) -> bool {
    let mut choice = Choice::new(0, &req.options.stop);
    let mut decoder = IncrementalDecoder::new();
    let mut generated = 0;
    let mut finish_reason = "length";
    let mut failure = None;
    let mut gone = false;
    let mut matched = false;
    let tokenizer = &target.tokenizer;
    let result = decode(
        target,
        draft,
        tokens,
        params,
        context,
        limits,
        metrics,
        &mut |t, logits| {
            generated += 1;
            if tokenizer.eos_tokens().contains(&t) {
                finish_reason = "stop";
                return false;
            }
            let text = match decoder.push(tokenizer, t) {
                Ok(text) => text,
                Err(e) => {
                    failure = Some(format!("detokenizing: {e}"));
                    return false;
                }
            };
            let lp = req
                .options
                .logprobs
                .map(|k| logprob(tokenizer, logits, t, k));
            let (piece, stopped) = choice.push(&text, lp);
            if let Some(p) = piece
                && !send(p)
            {
                gone = true;
                return false;
            }
            if stopped {
                finish_reason = "stop";
                matched = true;
                return false;
            }
            generated < req.max_tokens
        },
    );
    if let Err(e) = result {
        failure = Some(e);
    }
    if gone {
        return false;
    }
    if let Some(m) = failure {
        send(Piece::Failed(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            m,
        )));
        return false;
    }
    if !matched {
        if let Ok(t) = decoder.finish(tokenizer)
            && !t.is_empty()
            && let (Some(p), _) = choice.push(&t, None)
            && !send(p)
        {
            return false;
        }
        if let Some(p) = choice.finish()
            && !send(p)
        {
            return false;
        }
    }
    send(Piece::Done {
        index: 0,
        finish_reason,
        prompt_tokens: tokens.len(),
        completion_tokens: generated,
    })
}

/// `GET /v1/models`: each loaded target as `family@version`, and each family (its newest
/// version) as `family`, with tandem's fields `family`, `version`, `tokenizer_fingerprint`.
pub(crate) fn models(state: &State) -> Response<Body> {
    let all = state.registry.list();
    let mut data = Vec::new();
    for (i, t) in all.iter().enumerate() {
        let entry = |id: String| {
            serde_json::json!({"id": id, "object": "model", "created": t.loaded_at,
                "owned_by": "tandem", "family": t.family, "version": t.version,
                "tokenizer_fingerprint": t.tokenizer_fp.to_string()})
        };
        data.push(entry(t.id()));
        // The newest of its family answers to the family's name.
        if !all[i + 1..].iter().any(|o| o.family == t.family) {
            data.push(entry(t.family.clone()));
        }
    }
    tandem_client::openai::json_response(
        StatusCode::OK,
        &serde_json::json!({"object": "list", "data": data}),
    )
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
    let completion = match Completion::from_request(&creq) {
        Ok(c) => c,
        Err(e) => return e.response(),
    };
    let (target, draft) = match admit(&state, &creq, &completion) {
        Ok(t) => t,
        Err(e) => return e.response(),
    };
    let mut slot = match state.enter().await {
        Ok(slot) => slot,
        Err(e) => return ApiError::unavailable(e.message).response(),
    };
    let context = state
        .config
        .limits
        .max_context
        .min(target.model.config().context_length);
    if let Err(e) = slot.reserve_kv(&target, context) {
        return ApiError::unavailable(e.message).response();
    }
    let limits = state.config.limits;
    let (tx, rx) = mpsc::unbounded_channel::<Piece>();
    let mut meta = Meta::new(Kind::Completion, target.id(), &completion.options);
    meta.system_fingerprint = Some(target.id());
    let stream = completion.options.stream;
    let greedy = completion.params.is_greedy();
    let gen_target = target.clone();
    let metrics = state.metrics.clone();
    let n = completion.options.n;
    tokio::task::spawn_blocking(move || {
        let target_use = gen_target.enter();
        let draft = draft.as_ref().zip(completion.speculative);
        let draft = draft.map(|(d, gamma)| (&d.model, gamma));
        let mut emit = releasing(n, (slot, target_use), |p| {
            // A greedy answer's choices are one generation sent under each index.
            if let Piece::Done {
                index,
                completion_tokens,
                ..
            } = &p
                && (!greedy || *index == 0)
            {
                metrics.add_generated(&gen_target.id(), *completion_tokens);
            }
            tx.send(p).is_ok()
        });
        generate(
            &gen_target,
            draft,
            &completion,
            &limits,
            &metrics,
            &mut emit,
        );
    });
    respond(meta, stream, rx).await
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
        return Err(ApiError::max_tokens_over(
            c.max_tokens,
            limits.max_tokens,
            "this server (--max-tokens)",
        ));
    }
    let target = pick(state, creq.common.model.as_deref()).map_err(ApiError::model_not_found)?;
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
        return Err(ApiError::invalid_value(
            "gamma",
            format!(
                "gamma {gamma} exceeds this server's limit of {}",
                limits.max_draft
            ),
        ));
    }
    Ok((target, Some(d)))
}
