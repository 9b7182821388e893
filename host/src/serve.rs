//! `tandem serve`: an OpenAI-compatible API on the device (`/v1/completions`,
//! `/v1/chat/completions`, `/v1/models`, JSON or SSE) whose every request runs speculative
//! decoding with the drafter component against the verifier.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tandem_verifier::body::ChannelBody;
use tokio::sync::mpsc;

use crate::generate::{GenerateArgs, Prepared, run_prepared};

type Body = BoxBody<Bytes, Infallible>;

/// Options of `tandem serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address of the local API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Verifier, drafter, draft model and defaults for requests (`--prompt` is ignored).
    #[command(flatten)]
    pub generate: GenerateArgs,
}

struct Shared {
    prepared: Prepared,
    defaults: GenerateArgs,
    model_id: String,
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!("{v}\n"))).boxed())
        .unwrap()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(
        status,
        serde_json::json!({"error": {"message": message.into(), "type": "invalid_request_error"}}),
    )
}

/// Formats chat messages with the ChatML template the catalog models use.
fn chatml(messages: &[serde_json::Value]) -> Result<String, String> {
    let mut s = String::new();
    for m in messages {
        let role = m["role"]
            .as_str()
            .ok_or("every message needs a string `role`")?;
        let content = match &m["content"] {
            serde_json::Value::String(c) => c.clone(),
            serde_json::Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(""),
            _ => return Err("every message needs a string `content`".into()),
        };
        s.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
    }
    s.push_str("<|im_start|>assistant\n");
    Ok(s)
}

/// Sends generated text to a channel as it is written.
struct ChannelWriter(mpsc::UnboundedSender<Piece>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !buf.is_empty() {
            let text = String::from_utf8_lossy(buf).into_owned();
            self.0
                .send(Piece::Text(text))
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client gone"))?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Piece {
    Text(String),
    Done {
        prompt_tokens: usize,
        completion_tokens: usize,
        finish_reason: &'static str,
    },
    Failed(String),
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let chat = match (req.method(), path.as_str()) {
        (&Method::GET, "/v1/models") => {
            return Ok(json(
                StatusCode::OK,
                serde_json::json!({"object": "list", "data": [
                    {"id": shared.model_id, "object": "model", "owned_by": "tandem"}]}),
            ));
        }
        (&Method::GET, "/healthz") => {
            return Ok(Response::new(Full::new(Bytes::from("ok\n")).boxed()));
        }
        (&Method::POST, "/v1/completions") => false,
        (&Method::POST, "/v1/chat/completions") => true,
        _ => return Ok(error(StatusCode::NOT_FOUND, format!("no endpoint {path}"))),
    };
    let body = match Limited::new(req.into_body(), 4 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                format!("reading the body: {e}"),
            ));
        }
    };
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return Ok(error(StatusCode::BAD_REQUEST, format!("bad JSON: {e}"))),
    };
    let prompt = if chat {
        match v["messages"].as_array().map(|m| chatml(m)) {
            Some(Ok(p)) => p,
            Some(Err(e)) => return Ok(error(StatusCode::BAD_REQUEST, e)),
            None => {
                return Ok(error(
                    StatusCode::BAD_REQUEST,
                    "`messages` must be an array",
                ));
            }
        }
    } else {
        match v["prompt"].as_str() {
            Some(p) => p.to_string(),
            None => return Ok(error(StatusCode::BAD_REQUEST, "`prompt` must be a string")),
        }
    };
    let mut args = shared.defaults.clone();
    args.prompt = prompt;
    args.quiet = false;
    args.stats_json = None;
    if let Some(n) = v["max_tokens"]
        .as_u64()
        .or(v["max_completion_tokens"].as_u64())
    {
        args.max_tokens = n.min(u32::MAX as u64) as u32;
    } else if !chat {
        args.max_tokens = 16;
    }
    if let Some(t) = v["temperature"].as_f64() {
        args.temperature = t as f32;
    }
    if let Some(p) = v["top_p"].as_f64() {
        args.top_p = p as f32;
    }
    if let Some(s) = v["seed"].as_u64() {
        args.seed = s;
    }
    let stream = v["stream"].as_bool().unwrap_or(false);

    let (tx, mut rx) = mpsc::unbounded_channel::<Piece>();
    let sh = shared.clone();
    std::thread::spawn(move || {
        let mut w = ChannelWriter(tx.clone());
        match run_prepared(&sh.prepared, &args, &mut w) {
            Ok(s) => {
                let _ = tx.send(Piece::Done {
                    prompt_tokens: sh
                        .prepared
                        .tokenizer
                        .encode(&args.prompt)
                        .map_or(0, |t| t.len()),
                    completion_tokens: s.tokens,
                    finish_reason: if s.tokens as u32 >= args.max_tokens {
                        "length"
                    } else {
                        "stop"
                    },
                });
            }
            Err(e) => {
                let _ = tx.send(Piece::Failed(format!("{e:#}")));
            }
        }
    });
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let id = format!(
        "{}-{:x}",
        if chat { "chatcmpl" } else { "cmpl" },
        now.as_nanos()
    );
    let created = now.as_secs();
    let model = shared.model_id.clone();
    let choice = move |text: &str, finish: Option<&str>, delta: bool| {
        if chat && delta {
            serde_json::json!({"index": 0, "delta": {"content": text}, "finish_reason": finish})
        } else if chat {
            serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish})
        } else {
            serde_json::json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
        }
    };
    let object = if chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    if !stream {
        let mut text = String::new();
        while let Some(p) = rx.recv().await {
            match p {
                Piece::Text(t) => text.push_str(&t),
                Piece::Failed(m) => return Ok(error(StatusCode::BAD_GATEWAY, m)),
                Piece::Done {
                    prompt_tokens,
                    completion_tokens,
                    finish_reason,
                } => {
                    return Ok(json(
                        StatusCode::OK,
                        serde_json::json!({
                            "id": id, "object": object, "created": created, "model": model,
                            "choices": [choice(&text, Some(finish_reason), false)],
                            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                      "total_tokens": prompt_tokens + completion_tokens},
                        }),
                    ));
                }
            }
        }
        return Ok(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "generation stopped early",
        ));
    }
    let (out, sse) = ChannelBody::new();
    let chunk_object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            let data = match p {
                Piece::Text(t) => {
                    serde_json::json!({"id": id, "object": chunk_object, "created": created,
                                       "model": model, "choices": [choice(&t, None, true)]})
                }
                Piece::Done { finish_reason, .. } => {
                    serde_json::json!({"id": id, "object": chunk_object, "created": created,
                                       "model": model, "choices": [choice("", Some(finish_reason), true)]})
                }
                Piece::Failed(m) => serde_json::json!({"error": {"message": m}}),
            };
            if out.send(Bytes::from(format!("data: {data}\n\n"))).is_err() {
                return;
            }
        }
        let _ = out.send(Bytes::from_static(b"data: [DONE]\n\n"));
    });
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(sse.boxed())
        .unwrap())
}

/// Runs the local API until interrupted.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let prepared = Prepared::new(&args.generate)?;
    let model_id = format!(
        "tandem:{}",
        std::path::Path::new(&args.generate.draft_model)
            .file_stem()
            .map_or(args.generate.draft_model.clone(), |s| s
                .to_string_lossy()
                .into_owned())
    );
    let shared = Arc::new(Shared {
        prepared,
        defaults: args.generate.clone(),
        model_id,
    });
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        println!(
            "tandem serve listening on http://{} (verifier {})",
            listener.local_addr()?,
            args.generate.verifier
        );
        loop {
            let (tcp, _) = tokio::select! {
                c = listener.accept() => c?,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            let sh = shared.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| handle(sh.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}
