//! `tandem serve`: an OpenAI-compatible API on the device (`/v1/completions`,
//! `/v1/chat/completions`, `/v1/models`, JSON or SSE) whose every request runs speculative
//! decoding with the drafter component against the verifier.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tandem_client::auth::{read_token_file, token_matches};
use tandem_client::openai::{
    ApiError, Body, ChatMessage, ChatRequest, Common, CompletionRequest, Kind, Meta, Piece,
    json_response, parse, respond,
};
use tokio::sync::mpsc;

use crate::generate::{GenerateArgs, Prepared, run_prepared};

/// Options of `tandem serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address of the local API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// File of bearer tokens (one per line) that API clients must send; without it the API
    /// is open to whoever reaches `--listen`.
    #[arg(long)]
    pub api_token_file: Option<std::path::PathBuf>,
    /// Generations running at once; more requests are answered 429.
    #[arg(long, default_value_t = 4)]
    pub max_concurrent: usize,
    /// Verifier, drafter, draft model and defaults for requests (`--prompt` is ignored).
    #[command(flatten)]
    pub generate: GenerateArgs,
}

struct Shared {
    prepared: Prepared,
    defaults: GenerateArgs,
    model_id: String,
    api_tokens: Vec<String>,
    running: Arc<tokio::sync::Semaphore>,
    max_concurrent: usize,
}

/// Formats chat messages with the ChatML template the catalog models use.
fn chatml(messages: &[ChatMessage]) -> String {
    let mut s = String::new();
    for m in messages {
        s.push_str(&format!(
            "<|im_start|>{}\n{}<|im_end|>\n",
            m.role,
            m.content.text()
        ));
    }
    s.push_str("<|im_start|>assistant\n");
    s
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

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let kind = match (req.method(), path.as_str()) {
        (&Method::GET, "/v1/models") => {
            return Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({"object": "list", "data": [
                    {"id": shared.model_id, "object": "model", "owned_by": "tandem"}]}),
            ));
        }
        (&Method::GET, "/healthz") => {
            return Ok(Response::new(Full::new(Bytes::from("ok\n")).boxed()));
        }
        (&Method::POST, "/v1/completions") => Kind::Completion,
        (&Method::POST, "/v1/chat/completions") => Kind::Chat,
        _ => return Ok(ApiError::not_found(format!("no endpoint {path}")).response()),
    };
    if let Err(e) = admit(&shared, &req) {
        return Ok(e.response());
    }
    let Ok(permit) = shared.running.clone().try_acquire_owned() else {
        return Ok(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "{} generations are running, the most this server runs at once \
                 (--max-concurrent); retry later",
                shared.max_concurrent
            ),
        )
        .response());
    };
    let body = match Limited::new(req.into_body(), 4 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(ApiError::invalid(format!("reading the body: {e}")).response()),
    };
    let (args, stream) = match request_args(&shared.defaults, kind, &body) {
        Ok(a) => a,
        Err(e) => return Ok(e.response()),
    };
    let (tx, rx) = mpsc::unbounded_channel::<Piece>();
    let sh = shared.clone();
    std::thread::spawn(move || {
        let _permit = permit;
        let mut w = ChannelWriter(tx.clone());
        let piece = match run_prepared(&sh.prepared, &args, &mut w) {
            Ok(s) => Piece::Done {
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
            },
            Err(e) => Piece::Failed(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "server_error",
                format!("{e:#}"),
            )),
        };
        let _ = tx.send(piece);
    });
    Ok(respond(Meta::new(kind, shared.model_id.clone()), stream, rx).await)
}

/// Checks the request's token and content type. JSON is required so that a web page
/// cannot make a browser post a form here (which needs no CORS preflight) and spend the
/// operator's verifier.
fn admit(shared: &Shared, req: &Request<Incoming>) -> Result<(), ApiError> {
    if !shared.api_tokens.is_empty() {
        let token = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !token_matches(token, &shared.api_tokens) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing or wrong bearer token: send `Authorization: Bearer <token>` with a \
                 token from this server's --api-token-file",
            ));
        }
    }
    let json = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "send the request as JSON with `Content-Type: application/json`",
        ));
    }
    Ok(())
}

/// The generation a request asks for (the server's options where it is silent), and
/// whether to stream it.
fn request_args(
    defaults: &GenerateArgs,
    kind: Kind,
    body: &[u8],
) -> Result<(GenerateArgs, bool), ApiError> {
    let mut args = defaults.clone();
    args.quiet = false;
    args.stats_json = None;
    let common = match kind {
        Kind::Chat => {
            let r: ChatRequest = parse(body, "JSON with a `messages` array")?;
            args.prompt = chatml(&r.messages);
            Common {
                max_tokens: r.common.max_tokens.or(r.max_completion_tokens),
                ..r.common
            }
        }
        Kind::Completion => {
            let r: CompletionRequest = parse(body, "JSON with a string `prompt`")?;
            args.prompt = r.prompt;
            // OpenAI's default for completions.
            Common {
                max_tokens: r.common.max_tokens.or(Some(16)),
                ..r.common
            }
        }
    };
    args.max_tokens = common.max_tokens.unwrap_or(args.max_tokens);
    args.temperature = common.temperature.unwrap_or(args.temperature);
    args.top_p = common.top_p.unwrap_or(args.top_p);
    args.seed = common.seed.unwrap_or(args.seed);
    let stream = common.stream;
    Ok((args, stream))
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
    if args.max_concurrent == 0 {
        anyhow::bail!("--max-concurrent must be at least 1");
    }
    let api_tokens = match &args.api_token_file {
        Some(p) => read_token_file(p)?,
        None => Vec::new(),
    };
    let shared = Arc::new(Shared {
        prepared,
        defaults: args.generate.clone(),
        model_id,
        api_tokens,
        running: Arc::new(tokio::sync::Semaphore::new(args.max_concurrent)),
        max_concurrent: args.max_concurrent,
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
