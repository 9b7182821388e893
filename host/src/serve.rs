//! `tandem serve`: an OpenAI-compatible API on the device (`/v1/completions`,
//! `/v1/chat/completions`, `/v1/models`, JSON or SSE) whose every request runs speculative
//! decoding with the drafter component against the verifier.

use std::convert::Infallible;
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
    ApiError, Body, ChatRequest, Choice, CompletionRequest, Kind, Meta, Options, Piece,
    json_response, parse, releasing, render_chat, respond, run_choices,
};
use tandem_core::protocol::{Accepted, ErrorCode};
use tokio::sync::mpsc;

use crate::generate::{GenerateArgs, Output, Prepared, Refused, run_tokens, unreachable};

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
    /// The drafter and draft model new requests use; a drafter update replaces it while
    /// requests in flight keep the one they started with.
    prepared: std::sync::RwLock<Arc<Prepared>>,
    /// Wakes the drafter updater (a session's verifier recommended another drafter).
    wake_updater: Option<std::sync::Mutex<std::sync::mpsc::Sender<()>>>,
    defaults: GenerateArgs,
    model_id: String,
    /// When the server started, Unix seconds (its model's `created`).
    started: u64,
    api_tokens: Vec<String>,
    running: Arc<tokio::sync::Semaphore>,
    max_concurrent: usize,
}

impl Shared {
    fn prepared(&self) -> Arc<Prepared> {
        self.prepared
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// One choice's output: stop sequences, the session's grant checked against the request,
/// pieces sent to the response.
struct Sink<'a> {
    choice: Choice,
    send: &'a mut dyn FnMut(Piece) -> bool,
    /// The completion's length: what the request asked for, or the server's default
    /// lowered to the verifier's grant when the request did not say.
    max_tokens: u32,
    /// The request named `max_tokens` (a grant below it is an error, not a cap).
    asked_max: bool,
    prompt_tokens: usize,
    /// A stop sequence matched.
    stopped: bool,
}

impl Output for Sink<'_> {
    fn accepted(&mut self, a: &Accepted) -> anyhow::Result<()> {
        let target = format!("{}@{}", a.family, a.version);
        if self.max_tokens > a.max_tokens {
            if self.asked_max {
                return Err(ApiError::max_tokens_over(
                    self.max_tokens as usize,
                    a.max_tokens as usize,
                    &format!("the verifier's {target}"),
                )
                .into());
            }
            self.max_tokens = a.max_tokens;
        }
        if self.prompt_tokens + self.max_tokens as usize > a.max_context as usize {
            return Err(ApiError::context_exceeded(
                "messages",
                &target,
                a.max_context as usize,
                self.prompt_tokens,
                self.max_tokens as usize,
            )
            .into());
        }
        (self.send)(Piece::Target(target));
        Ok(())
    }

    fn text(&mut self, piece: &str) -> std::io::Result<bool> {
        let (out, stopped) = self.choice.push(piece, None);
        if let Some(p) = out
            && !(self.send)(p)
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the client is gone",
            ));
        }
        self.stopped = stopped;
        Ok(!stopped)
    }
}

/// The API error for a generation that failed.
fn failure(e: anyhow::Error, model_named: bool) -> ApiError {
    if let Some(api) = e.downcast_ref::<ApiError>() {
        return api.clone();
    }
    if let Some(r) = e.downcast_ref::<Refused>() {
        return match r.code {
            ErrorCode::Incompatible if model_named => ApiError::model_not_found(format!(
                "the verifier has no such target for this drafter: {} (GET /v1/models lists \
                 the ones it has)",
                r.message
            )),
            ErrorCode::BadRequest | ErrorCode::LimitExceeded => ApiError::invalid(r.to_string()),
            _ => ApiError::new(StatusCode::BAD_GATEWAY, "server_error", r.to_string()),
        };
    }
    if unreachable(&e) {
        return ApiError::unavailable(format!("{e:#}"));
    }
    ApiError::new(StatusCode::BAD_GATEWAY, "server_error", format!("{e:#}"))
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let kind = match (req.method(), path.as_str()) {
        (&Method::GET, "/v1/models") => {
            if let Err(e) = authorize(&shared, &req) {
                return Ok(e.response());
            }
            return Ok(models(&shared).await.unwrap_or_else(|e| e.response()));
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
        return Ok(ApiError::rate_limited(format!(
            "{} generations are running, the most this server runs at once \
             (--max-concurrent); retry later",
            shared.max_concurrent
        ))
        .response());
    };
    let body = match Limited::new(req.into_body(), 4 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(ApiError::invalid(format!("reading the body: {e}")).response()),
    };
    let prepared = shared.prepared();
    let (args, options) = match request_args(&shared, &prepared, kind, &body) {
        Ok(a) => a,
        Err(e) => return Ok(e.response()),
    };
    let prompt = match prepared.tokenizer.encode(&args.prompt) {
        Ok(t) => t,
        Err(e) => return Ok(ApiError::invalid(format!("tokenizing the prompt: {e}")).response()),
    };
    let prompt_tokens = prompt.len();
    let (tx, rx) = mpsc::unbounded_channel::<Piece>();
    let meta = Meta::new(kind, shared.model_id.clone(), &options);
    let sh = shared.clone();
    let drafter_id = prepared.drafter_id.clone();
    let running = prepared.clone();
    std::thread::spawn(move || {
        let model_named = args.target.is_some();
        let mut emit = releasing(options.n, permit, |p: Piece| tx.send(p).is_ok());
        run_choices(options.n, args.temperature == 0.0, &mut emit, |i, send| {
            let mut run_args = args.clone();
            run_args.seed = args.seed.wrapping_add(i as u64);
            let mut sink = Sink {
                choice: Choice::new(0, &options.stop),
                send,
                max_tokens: args.max_tokens,
                asked_max: options.max_tokens.is_some(),
                prompt_tokens,
                stopped: false,
            };
            let stats = match run_tokens(&running, &run_args, &prompt, &mut sink) {
                Ok(s) => s,
                Err(e) => {
                    (sink.send)(Piece::Failed(failure(e, model_named)));
                    return false;
                }
            };
            if !stats.recommended_drafter.is_empty()
                && stats.recommended_drafter != stats.drafter
                && let Some(w) = &sh.wake_updater
            {
                let _ = w.lock().map(|w| w.send(()));
            }
            if !sink.stopped
                && let Some(p) = sink.choice.finish()
                && !(sink.send)(p)
            {
                return false;
            }
            let finish_reason = if sink.stopped || (stats.tokens as u32) < sink.max_tokens {
                "stop"
            } else {
                "length"
            };
            (sink.send)(Piece::Done {
                index: 0,
                finish_reason,
                prompt_tokens,
                completion_tokens: stats.tokens,
            })
        });
    });
    let mut resp = respond(meta, options.stream, rx).await;
    if let Ok(v) = hyper::header::HeaderValue::from_str(&drafter_id) {
        resp.headers_mut().insert("x-tandem-drafter", v);
    }
    Ok(resp)
}

/// `GET /v1/models`: this server's own id (the newest target compatible with its drafter),
/// then each target of the verifier whose tokenizer matches the drafter's, by the name the
/// verifier lists it under (`family` or `family@version`; either may be sent as `model`).
async fn models(shared: &Shared) -> Result<Response<Body>, ApiError> {
    let mut data = vec![serde_json::json!({
        "id": shared.model_id, "object": "model", "created": shared.started,
        "owned_by": "tandem"})];
    let ep = shared
        .defaults
        .endpoints()
        .map_err(|e| ApiError::unavailable(format!("{e:#}")))?;
    let (status, body) = tandem_client::session::get(&ep[0], "/v1/models")
        .await
        .map_err(|e| ApiError::unavailable(format!("listing the verifier's targets: {e:#}")))?;
    if !status.is_success() {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            format!(
                "the verifier answered GET /v1/models with HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            ),
        ));
    }
    let list: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            format!("the verifier's model list is not JSON: {e}"),
        )
    })?;
    let fp = shared.prepared().tokenizer_fingerprint();
    for m in list["data"].as_array().into_iter().flatten() {
        if m["tokenizer_fingerprint"].as_str() == Some(fp.as_str()) {
            data.push(m.clone());
        }
    }
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"object": "list", "data": data}),
    ))
}

/// Checks the request's bearer token.
fn authorize(shared: &Shared, req: &Request<Incoming>) -> Result<(), ApiError> {
    if shared.api_tokens.is_empty() {
        return Ok(());
    }
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if token_matches(token, &shared.api_tokens) {
        Ok(())
    } else {
        Err(ApiError::unauthorized(
            "missing or wrong bearer token: send `Authorization: Bearer <token>` with a \
             token from this server's --api-token-file",
        ))
    }
}

/// Checks the request's token and content type. JSON is required so that a web page
/// cannot make a browser post a form here (which needs no CORS preflight) and spend the
/// operator's verifier.
fn admit(shared: &Shared, req: &Request<Incoming>) -> Result<(), ApiError> {
    authorize(shared, req)?;
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

/// The generation a request asks for (the server's options where it is silent), and the
/// request's checked options.
fn request_args(
    shared: &Shared,
    prepared: &Prepared,
    kind: Kind,
    body: &[u8],
) -> Result<(GenerateArgs, Options), ApiError> {
    let mut args = shared.defaults.clone();
    args.quiet = false;
    args.stats_json = None;
    let options = match kind {
        Kind::Chat => {
            let r: ChatRequest = parse(body, "JSON with a `messages` array")?;
            let o = r.check()?;
            let chat = prepared.tokenizer.chat_template();
            args.prompt = render_chat(
                chat.source.as_deref(),
                &chat.bos_token,
                &chat.eos_token,
                &r.messages,
            )?;
            o
        }
        Kind::Completion => {
            let r: CompletionRequest = parse(body, "JSON with a string `prompt`")?;
            if r.speculative {
                return Err(unsupported_here(
                    "speculative",
                    "every request here is speculative already (the cloud-sd baseline is the \
                     verifier's)",
                ));
            }
            let (prompt, o) = r.check()?;
            args.prompt = prompt;
            // OpenAI's default for completions.
            args.max_tokens = 16;
            o
        }
    };
    if options.logprobs.is_some() {
        return Err(unsupported_here(
            "logprobs",
            "the session protocol carries the target's verdicts, not its probabilities; \
             the verifier's own /v1/completions returns them",
        ));
    }
    match options.model.as_deref() {
        None => {}
        Some(m) if m == shared.model_id => {}
        Some(m) => args.target = Some(m.to_string()),
    }
    args.max_tokens = options.max_tokens.unwrap_or(args.max_tokens);
    args.temperature = options.temperature.unwrap_or(args.temperature);
    args.top_p = options.top_p.unwrap_or(args.top_p);
    args.seed = options.seed.unwrap_or(args.seed);
    Ok((args, options))
}

fn unsupported_here(param: &str, why: &str) -> ApiError {
    ApiError::param(
        param,
        "unsupported_parameter",
        format!("`{param}` is not supported by tandem serve: {why}"),
    )
}

/// Checks the drafter channel every `--drafter-check-interval` seconds (0: no periodic
/// checks), and when woken because a verifier recommended another drafter (at most every
/// 5 s). A new bundle is installed and compiled off the request path, then swapped in:
/// requests in flight finish on the drafter they started with, new ones get the new one.
fn updater(shared: std::sync::Weak<Shared>, wake: std::sync::mpsc::Receiver<()>) {
    use std::sync::mpsc::RecvTimeoutError;
    use std::time::{Duration, Instant};
    let Some(first) = shared.upgrade() else {
        return;
    };
    let args = first.defaults.clone();
    drop(first);
    let Some(channel) = args.drafter_channel.clone() else {
        return;
    };
    let interval = match args.drafter_check_interval {
        0 => Duration::MAX,
        s => Duration::from_secs(s),
    };
    let mut last = Instant::now();
    // The offer last reported while a pinned drafter stays (said once per offer).
    let mut told: Option<String> = None;
    loop {
        match wake.recv_timeout(interval.min(Duration::from_secs(86_400 * 365))) {
            Err(RecvTimeoutError::Disconnected) => return,
            Ok(()) if last.elapsed() < Duration::from_secs(5) => continue,
            _ => {}
        }
        last = Instant::now();
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let store = match crate::drafter_cmd::Store::open(args.drafter_store.as_deref()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tandem serve: drafter store: {e:#}");
                continue;
            }
        };
        let update = crate::generate::update_args(&args, &channel);
        match crate::drafter_cmd::update(&store, &update, false) {
            Ok(crate::drafter_cmd::Updated::Installed(m)) => {
                let mut load = args.clone();
                load.no_drafter_updates = true;
                match Prepared::new(&load) {
                    Ok(p) => {
                        let old = std::mem::replace(
                            &mut *shared.prepared.write().unwrap_or_else(|e| e.into_inner()),
                            Arc::new(p),
                        );
                        eprintln!(
                            "tandem serve: drafter {} is now serving new requests (was {})",
                            m.id(),
                            old.drafter_id
                        );
                    }
                    Err(e) => eprintln!(
                        "tandem serve: drafter {} installed but could not be loaded, keeping {}: \
                         {e:#}",
                        m.id(),
                        shared.prepared().drafter_id
                    ),
                }
            }
            Ok(crate::drafter_cmd::Updated::Pinned { current, offered }) => {
                if told.as_ref() != Some(&offered) {
                    eprintln!(
                        "tandem serve: drafter {current} is pinned (tandem drafter use/rollback); \
                         {offered} is offered: `tandem drafter update` installs it"
                    );
                    told = Some(offered);
                }
            }
            Ok(crate::drafter_cmd::Updated::Current(_)) => {}
            Err(e) => eprintln!(
                "tandem serve: drafter update refused, {} keeps serving: {e:#}",
                shared.prepared().drafter_id
            ),
        }
    }
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
    let g = &args.generate;
    let (wake_tx, wake_rx) = std::sync::mpsc::channel();
    let updates = g.drafter_channel.is_some() && !g.no_drafter_updates;
    let shared = Arc::new(Shared {
        prepared: std::sync::RwLock::new(Arc::new(prepared)),
        wake_updater: updates.then(|| std::sync::Mutex::new(wake_tx)),
        defaults: args.generate.clone(),
        model_id,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        api_tokens,
        running: Arc::new(tokio::sync::Semaphore::new(args.max_concurrent)),
        max_concurrent: args.max_concurrent,
    });
    if updates {
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("drafter-updates".into())
            .spawn(move || updater(weak, wake_rx))?;
    }
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
