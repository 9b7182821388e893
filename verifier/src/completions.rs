//! `POST /v1/completions`: OpenAI-compatible text completion on the target alone (for
//! clients without a drafter), JSON or server-sent events (`"stream": true`).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tandem_core::sampling::{Rng, SamplingParams, sample};
use tandem_models::IncrementalDecoder;
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

fn generate(
    target: &Target,
    req: &CompletionRequest,
    max_context: usize,
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
    let mut rng = Rng::new(params.seed);
    let mut cache = model.new_cache();
    let mut decoder = IncrementalDecoder::new();
    let mut logits = match model.forward_last(&tokens, 0, &mut cache) {
        Ok(l) => l,
        Err(e) => {
            emit(fail(format!("target model failed: {e}")));
            return;
        }
    };
    let mut pos = tokens.len();
    let mut generated = 0;
    let finish_reason = loop {
        if generated == req.max_tokens {
            break "length";
        }
        let next = sample(logits.last(), &params, &mut rng);
        generated += 1;
        if target.tokenizer.eos_tokens().contains(&next) {
            break "stop";
        }
        match decoder.push(&target.tokenizer, next) {
            Ok(t) if !t.is_empty() => {
                if !emit(Piece::Text(t)) {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                emit(fail(format!("detokenizing: {e}")));
                return;
            }
        }
        if pos + 1 >= context || generated == req.max_tokens {
            break "length";
        }
        logits = match model.forward_last(&[next], pos, &mut cache) {
            Ok(l) => l,
            Err(e) => {
                emit(fail(format!("target model failed: {e}")));
                return;
            }
        };
        pos += 1;
    };
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
        generate(&gen_target, &creq, limits.max_context, &mut |p| {
            if let Piece::Done {
                completion_tokens, ..
            } = &p
            {
                metrics.add_generated(*completion_tokens);
            }
            tx.send(p).is_ok()
        });
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
                    let v = serde_json::json!({
                        "id": id, "object": "text_completion", "created": created, "model": model_id,
                        "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish_reason}],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                  "total_tokens": prompt_tokens + completion_tokens},
                    });
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
        let chunk = |text: &str, finish: Option<&str>| {
            let v = serde_json::json!({
                "id": id, "object": "text_completion", "created": created, "model": model_id,
                "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}],
            });
            Bytes::from(format!("data: {v}\n\n"))
        };
        while let Some(p) = rx.recv().await {
            let b = match p {
                Piece::Text(t) => chunk(&t, None),
                Piece::Done { finish_reason, .. } => chunk("", Some(finish_reason)),
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
