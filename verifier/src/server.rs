//! The HTTP server: session streams (`POST /v1/session`, HTTP/2), OpenAI-style completions,
//! the target admin API, health and metrics. h2c and HTTP/1.1 on one port, or TLS.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tandem_core::protocol::{
    Accepted, ClientMsg, ErrorCode, FrameDecoder, Hello, Message, ProtocolError, ServerMsg,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc::{self, UnboundedSender};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::registry::{LoadError, Registry, Target, TargetSpec};
use crate::session::{Limits, Session, SessionError};
use tandem_client::auth::token_matches;
use tandem_client::body::ChannelBody;
use tandem_client::drafters;
use tandem_client::openai::{ApiError, json_response};

/// Response body of every endpoint.
pub use tandem_client::openai::Body;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Session and server limits.
    pub limits: Limits,
    /// Default early-exit layer for targets that do not name one.
    pub early_exit_layer: Option<usize>,
    /// Where targets that do not name a device run.
    pub device: crate::registry::Device,
    /// Bearer tokens accepted for sessions and completions; empty means no authentication.
    pub tokens: Vec<String>,
    /// Bearer tokens accepted for `/admin`. Empty: the admin API is open when `tokens` is
    /// empty too (a loopback development server) and closed otherwise.
    pub admin_tokens: Vec<String>,
    /// The directory `POST /admin/targets` may load files from (catalog names are always
    /// allowed); `None`: catalog names only.
    pub model_dir: Option<PathBuf>,
    /// Targets loaded at once, at most.
    pub max_targets: usize,
    /// TLS certificate chain and private key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Open connections at most; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams: u32,
    /// Time a new connection has to send its first bytes, finish the TLS handshake and send
    /// a complete HTTP/1 header; also the HTTP/2 keepalive ping timeout.
    pub handshake_timeout: Duration,
    /// A drafter channel to serve at `/v1/drafters` (a directory of signed bundles, see
    /// docs/drafters.md); sessions are told the newest bundle for their target's family.
    pub drafters: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            limits: Limits::default(),
            early_exit_layer: None,
            device: Default::default(),
            tokens: Vec::new(),
            admin_tokens: Vec::new(),
            model_dir: None,
            max_targets: 8,
            tls: None,
            max_connections: 512,
            max_streams: 16,
            handshake_timeout: Duration::from_secs(10),
            drafters: None,
        }
    }
}

/// The server's own draft model, for speculative decoding on the server (cloud-sd).
pub struct ServerDraft {
    /// The model.
    pub model: tandem_models::Model,
    /// Its tokenizer fingerprint (must equal the target's).
    pub tokenizer_fp: tandem_models::TokenizerFingerprint,
    /// Where it was loaded from.
    pub path: PathBuf,
}

impl ServerDraft {
    /// Loads a draft model (catalog name or path).
    pub fn load(name: &str) -> anyhow::Result<ServerDraft> {
        let path =
            tandem_models::fetch::resolve(name).with_context(|| format!("draft `{name}`"))?;
        Ok(ServerDraft {
            model: tandem_models::Model::load(&path)?,
            tokenizer_fp: tandem_models::backbone::tokenizer_fingerprint_of(&path)?,
            path,
        })
    }
}

/// Everything the handlers share.
pub struct State {
    /// Loaded targets.
    pub registry: Registry,
    /// The server's draft model, if any.
    pub draft: Option<Arc<ServerDraft>>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Configuration.
    pub config: ServerConfig,
    /// One permit per place among the concurrent sessions.
    places: Arc<tokio::sync::Semaphore>,
    next_id: AtomicU64,
    /// Held while an admin load runs: one at a time.
    loading: std::sync::Mutex<()>,
}

/// A place among the server's concurrent sessions, and the KV memory the session reserved;
/// freed when dropped.
pub struct SessionSlot {
    state: Arc<State>,
    _place: tokio::sync::OwnedSemaphorePermit,
    kv_reserved: usize,
}

impl SessionSlot {
    /// Reserves the KV memory of a session of `max_context` positions on `target` under
    /// `--kv-memory-mb`; refused with what it needs and what is free.
    pub(crate) fn reserve_kv(
        &mut self,
        target: &Target,
        max_context: usize,
    ) -> Result<(), SessionError> {
        let limits = &self.state.config.limits;
        let bytes = Session::kv_bytes_for(target, max_context, limits.kv_cache);
        let mib = |b: usize| b.div_ceil(1 << 20);
        self.state
            .metrics
            .reserve_kv(bytes, limits.kv_memory)
            .map_err(|others| {
                self.state.metrics.session_refused();
                let cap = limits.kv_memory.unwrap_or(0);
                SessionError::new(
                    ErrorCode::Busy,
                    format!(
                        "a session on {} may need {} MiB of KV cache ({max_context} positions),                          but open sessions hold {} of this server's {} MiB (--kv-memory-mb);                          retry later",
                        target.id(),
                        mib(bytes),
                        mib(others),
                        mib(cap)
                    ),
                )
            })?;
        self.kv_reserved += bytes;
        Ok(())
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.state.metrics.release_kv(self.kv_reserved);
        self.state.metrics.session_ended();
    }
}

impl State {
    /// A server state with no targets yet.
    pub fn new(config: ServerConfig) -> Arc<State> {
        Self::with_draft(config, None)
    }

    /// A server state with a draft model for server-side speculative decoding.
    pub fn with_draft(config: ServerConfig, draft: Option<ServerDraft>) -> Arc<State> {
        Arc::new(State {
            registry: Registry::default(),
            draft: draft.map(Arc::new),
            metrics: Arc::new(Metrics::default()),
            places: Arc::new(tokio::sync::Semaphore::new(config.limits.max_sessions)),
            config,
            next_id: AtomicU64::new(1),
            loading: std::sync::Mutex::new(()),
        })
    }

    /// Loads a target and makes it serve new sessions (blocking: reads the model).
    pub fn load(&self, spec: &TargetSpec) -> Result<Arc<Target>, LoadError> {
        let (family, version) = self.registry.name_for(spec);
        for name in [&family, &version] {
            if !crate::registry::valid_name(name) {
                return Err(LoadError::BadName { name: name.clone() });
            }
        }
        let target = Target::load(
            spec,
            family,
            version,
            self.config.early_exit_layer,
            &self.config.device,
        )?;
        let target = self.registry.add(target, self.config.max_targets)?;
        info!(target = %target.id(), path = %target.path.display(), device = %target.device(),
              early_exit_layer = target.early_exit_layer, "target loaded");
        Ok(target)
    }

    /// A place among the concurrent sessions: at once when one is free, else after waiting
    /// in the queue (`--queue` sessions at most, each for `--queue-timeout`); refused with
    /// Busy and a message saying why.
    pub(crate) async fn enter(self: &Arc<Self>) -> Result<SessionSlot, SessionError> {
        let limits = &self.config.limits;
        let slot = |place| {
            self.metrics.session_started();
            SessionSlot {
                state: self.clone(),
                _place: place,
                kv_reserved: 0,
            }
        };
        if let Ok(place) = self.places.clone().try_acquire_owned() {
            return Ok(slot(place));
        }
        let busy = |message: String| {
            self.metrics.session_refused();
            SessionError::new(ErrorCode::Busy, message)
        };
        if self.metrics.queue_waiting() >= limits.queue as i64 {
            return Err(busy(format!(
                "the verifier is serving its maximum of {} sessions and {} more are waiting \
                 (--queue); retry later",
                limits.max_sessions,
                self.metrics.queue_waiting()
            )));
        }
        self.metrics.queue_entered();
        let waited =
            tokio::time::timeout(limits.queue_timeout, self.places.clone().acquire_owned()).await;
        self.metrics.queue_left(waited.is_err());
        match waited {
            Ok(Ok(place)) => Ok(slot(place)),
            Ok(Err(_)) => Err(busy("the verifier is shutting down".into())),
            Err(_) => Err(busy(format!(
                "waited {:.1} s (--queue-timeout) for one of the verifier's {} session places; \
                 retry later",
                limits.queue_timeout.as_secs_f64(),
                limits.max_sessions
            ))),
        }
    }

    fn token_ok(&self, token: Option<&str>) -> bool {
        token_matches(token, &self.config.tokens)
    }

    /// Whether a request may use `/admin`, or the error to answer with.
    fn admin_ok(&self, token: Option<&str>) -> Result<(), (StatusCode, &'static str)> {
        let c = &self.config;
        if c.admin_tokens.is_empty() {
            return if c.tokens.is_empty() {
                Ok(())
            } else {
                Err((
                    StatusCode::FORBIDDEN,
                    "the admin API is off: this verifier requires tokens but has no admin \
                     token; start it with --admin-token-file",
                ))
            };
        }
        if token_matches(token, &c.admin_tokens) {
            Ok(())
        } else {
            Err((
                StatusCode::UNAUTHORIZED,
                "missing or wrong admin bearer token: send `Authorization: Bearer <token>` with \
                 a token from the server's --admin-token-file",
            ))
        }
    }
}

/// A server accepting connections; stops when dropped.
pub struct RunningServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// Shared state (registry, metrics).
    pub state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RunningServer {
    /// Waits until the accept loop ends (it runs until the process is stopped).
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }
}

fn tls_acceptor(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading the TLS certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing the TLS certificate {}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no PEM certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the TLS private key {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the TLS certificate and key do not form a usable pair")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Binds and starts serving.
pub async fn start(state: Arc<State>) -> anyhow::Result<RunningServer> {
    let tls = match &state.config.tls {
        Some((c, k)) => Some(tls_acceptor(c, k)?),
        None => None,
    };
    let listener = TcpListener::bind(state.config.listen)
        .await
        .with_context(|| format!("binding {}", state.config.listen))?;
    let addr = listener.local_addr()?;
    let st = state.clone();
    let task = tokio::spawn(async move {
        let connections = Arc::new(tokio::sync::Semaphore::new(st.config.max_connections));
        let mut backoff = Duration::ZERO;
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => {
                    backoff = Duration::ZERO;
                    c
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                st.metrics.connection_refused();
                tracing::debug!(%peer, "connection refused: --max-connections reached");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let st = st.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let _permit = permit;
                serve_connection(st, tcp, peer, tls).await;
            });
        }
    });
    Ok(RunningServer { addr, state, task })
}

/// Serves one accepted connection under the handshake and header timeouts.
async fn serve_connection(
    st: Arc<State>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let limit = st.config.handshake_timeout;
    // A connection that sends nothing would hold a slot forever (HTTP version detection
    // waits for the first bytes).
    if !matches!(tokio::time::timeout(limit, tcp.peek(&mut [0u8; 1])).await, Ok(Ok(n)) if n > 0) {
        tracing::debug!(%peer, "connection closed: nothing sent within the handshake timeout");
        return;
    }
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limit);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(st.config.max_streams);
    let service = {
        let st = st.clone();
        hyper::service::service_fn(move |req| handle(st.clone(), req))
    };
    let result = match tls {
        None => builder.serve_connection(TokioIo::new(tcp), service).await,
        Some(acceptor) => match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => builder.serve_connection(TokioIo::new(s), service).await,
            Ok(Err(e)) => {
                warn!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                warn!(%peer, "TLS handshake timed out");
                return;
            }
        },
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    json_response(status, &v)
}

/// An error in the one shape both servers use (`tandem_client::openai::ApiError`).
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let kind = match status {
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::FORBIDDEN => "permission_error",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::CONFLICT => "conflict_error",
        s if s.is_server_error() => "server_error",
        _ => "invalid_request_error",
    };
    let mut e = ApiError::new(status, kind, message);
    if status == StatusCode::UNAUTHORIZED {
        e.code = Some("invalid_api_key");
    }
    e.response()
}

fn bearer(req: &Request<Incoming>) -> Option<&str> {
    req.headers()
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => return Ok(Response::new(full("ok\n"))),
        (&Method::GET, "/metrics") => {
            return Ok(Response::builder()
                .header("content-type", "text/plain; version=0.0.4")
                .body(full(state.metrics.render()))
                .unwrap());
        }
        _ => {}
    }
    let header_token = bearer(&req).map(str::to_owned);
    if path.starts_with("/admin/") || path == "/admin" {
        if let Err((status, message)) = state.admin_ok(header_token.as_deref()) {
            state.metrics.unauthorized();
            return Ok(error(status, message));
        }
        return Ok(admin(state, req, &method, &path).await);
    }
    let auth_required = !state.config.tokens.is_empty();
    let header_ok = !auth_required || state.token_ok(header_token.as_deref());
    // A session may carry its token in Hello instead of the header; everything else needs
    // the header.
    let deferred = path == "/v1/session" && header_token.is_none();
    if !header_ok && !deferred {
        state.metrics.unauthorized();
        return Ok(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token: send `Authorization: Bearer <token>` with a token from the server's --token-file",
        ));
    }
    let resp = match (&method, path.as_str()) {
        (&Method::POST, "/v1/session") => session_endpoint(state, req, header_ok),
        (&Method::POST, "/v1/completions") => crate::completions::handle(state, req).await,
        (&Method::GET, "/v1/models") => crate::completions::models(&state),
        (&Method::GET, p) if p == "/v1/drafters" || p.starts_with("/v1/drafters/") => {
            drafters(&state, p).await
        }
        (_, "/v1/session" | "/v1/completions" | "/v1/models" | "/healthz" | "/metrics") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        ),
        _ => error(StatusCode::NOT_FOUND, format!("no endpoint {path}")),
    };
    Ok(resp)
}

/// The drafter channel: `GET /v1/drafters` (or `/v1/drafters/index.json`) lists the
/// bundles of `--drafters DIR` by family, `GET /v1/drafters/BUNDLE/FILE` serves a bundle's
/// manifest, signature or component. The directory is read on each request, so a bundle
/// copied in is offered at once.
async fn drafters(state: &State, path: &str) -> Response<Body> {
    let Some(dir) = state.config.drafters.clone() else {
        return error(
            StatusCode::NOT_FOUND,
            "this verifier serves no drafter channel (start it with --drafters DIR)",
        );
    };
    let rel = path
        .trim_start_matches("/v1/drafters")
        .trim_start_matches('/')
        .to_string();
    if rel.is_empty() || rel == drafters::INDEX {
        return match tokio::task::spawn_blocking(move || drafters::scan(&dir)).await {
            Ok(Ok((index, _))) => json(StatusCode::OK, serde_json::json!(index)),
            Ok(Err(e)) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the drafter channel: {e}"),
            ),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
    }
    if !drafters::safe_bundle_path(&rel) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no drafter file {path}: paths are /v1/drafters/BUNDLE/FILE"),
        );
    }
    let file = dir.join(&rel);
    match tokio::task::spawn_blocking(move || std::fs::read(file))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    {
        Ok(bytes) => Response::builder()
            .header(
                "content-type",
                if rel.ends_with(".json") {
                    "application/json"
                } else {
                    "application/octet-stream"
                },
            )
            .body(full(bytes))
            .unwrap(),
        Err(e) => error(StatusCode::NOT_FOUND, format!("{path}: {e}")),
    }
}

/// The newest bundle of the drafter channel for `family`, `name@version` (empty if none).
fn recommended_drafter(state: &State, family: &str) -> String {
    let Some(dir) = &state.config.drafters else {
        return String::new();
    };
    match drafters::scan(dir) {
        Ok((index, _)) => index
            .recommended(family)
            .map(|b| format!("{}@{}", b.name, b.version))
            .unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The admin API (the caller is authorized).
async fn admin(
    state: Arc<State>,
    req: Request<Incoming>,
    method: &Method,
    path: &str,
) -> Response<Body> {
    match (method, path) {
        (&Method::GET, "/admin/targets") => {
            let list: Vec<_> = state.registry.list().iter().map(|t| t.describe()).collect();
            json(StatusCode::OK, serde_json::json!({ "targets": list }))
        }
        (&Method::POST, "/admin/targets") => admin_load(state, req).await,
        (&Method::DELETE, p) if p.starts_with("/admin/targets/") => {
            let rest = &p["/admin/targets/".len()..];
            match rest.split_once('/') {
                Some((family, version)) if !version.contains('/') => {
                    match state.registry.retire(family, version) {
                        Some(t) => {
                            info!(target = %t.id(), active_sessions = t.active_sessions(), "target retired");
                            json(
                                StatusCode::OK,
                                serde_json::json!({"retired": t.id(), "active_sessions": t.active_sessions()}),
                            )
                        }
                        None => error(
                            StatusCode::NOT_FOUND,
                            format!(
                                "no loaded target {family}@{version}; GET /admin/targets lists them"
                            ),
                        ),
                    }
                }
                _ => error(
                    StatusCode::NOT_FOUND,
                    "use DELETE /admin/targets/{family}/{version}",
                ),
            }
        }
        (_, "/admin/targets") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        ),
        _ => error(StatusCode::NOT_FOUND, format!("no endpoint {path}")),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadRequest {
    model: String,
    family: Option<String>,
    version: Option<String>,
    early_exit_layer: Option<usize>,
    device: Option<String>,
}

async fn admin_load(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
    };
    let load: LoadRequest = match serde_json::from_slice(&body) {
        Ok(l) => l,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "bad JSON ({e}); expected {{\"model\": NAME|PATH, \"family\"?, \"version\"?, \"early_exit_layer\"?, \"device\"?}}"
                ),
            );
        }
    };
    let model = match admin_model(&state.config, &load.model) {
        Ok(m) => m,
        Err((status, message)) => return error(status, message),
    };
    let device = match load.device.as_deref().map(str::parse).transpose() {
        Ok(d) => d,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let spec = TargetSpec {
        family: load.family,
        version: load.version,
        model,
        early_exit_layer: load.early_exit_layer,
        device,
    };
    let st = state.clone();
    let requested = load.model;
    let loaded = tokio::task::spawn_blocking(move || {
        let Ok(_one_at_a_time) = st.loading.try_lock() else {
            return None;
        };
        Some(st.load(&spec))
    })
    .await;
    match loaded {
        Ok(Some(Ok(t))) => json(StatusCode::CREATED, t.describe()),
        Ok(Some(Err(LoadError::Model(e)))) => {
            // The details name server paths: they go to the log, not to the client.
            tracing::warn!(model = %requested, error = %format!("{e:#}"), "admin load failed");
            error(
                StatusCode::BAD_REQUEST,
                format!(
                    "could not load `{requested}` as a target: {} (the verifier's log has the \
                     details)",
                    load_failure(&e)
                ),
            )
        }
        Ok(Some(Err(e))) => error(e.status(), e.to_string()),
        Ok(None) => error(
            StatusCode::TOO_MANY_REQUESTS,
            "another target is loading; retry when it is done",
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// What an admin may load: a catalog name, or a file under `--model-dir` (resolved, with
/// symlinks followed, and still under it). Errors never name server paths.
fn admin_model(config: &ServerConfig, model: &str) -> Result<String, (StatusCode, String)> {
    if tandem_models::catalog::lookup(model).is_ok() {
        return Ok(model.to_string());
    }
    let Some(dir) = &config.model_dir else {
        return Err((
            StatusCode::FORBIDDEN,
            format!(
                "`{model}` is not a catalog model, and this verifier loads files only from a \
                 model directory (start it with --model-dir DIR)"
            ),
        ));
    };
    let outside = || {
        (
            StatusCode::FORBIDDEN,
            format!("`{model}` is not a file under the verifier's model directory"),
        )
    };
    // Checked before touching the file system, so that nothing outside the directory can
    // be probed for existence.
    let rel = std::path::Path::new(model);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(outside());
    }
    let root = dir.canonicalize().map_err(|_| outside())?;
    let file = root.join(model).canonicalize().map_err(|_| {
        (
            StatusCode::NOT_FOUND,
            format!("no model `{model}` in the verifier's model directory"),
        )
    })?;
    if !file.starts_with(&root) || !file.is_file() {
        return Err(outside());
    }
    Ok(file.display().to_string())
}

/// What went wrong loading a model, without the paths the full error names.
fn load_failure(e: &anyhow::Error) -> String {
    use tandem_models::Error as M;
    match e.chain().find_map(|c| c.downcast_ref::<M>()) {
        Some(M::InvalidGguf { .. }) => "not a valid GGUF file".into(),
        Some(M::UnsupportedArchitecture { found, .. }) => {
            format!("architecture `{found}` is not supported (llama, qwen2 are)")
        }
        Some(M::UnsupportedTensorType { tensor, dtype, .. }) => {
            format!("tensor `{tensor}` is stored as {dtype}, which tandem cannot load")
        }
        Some(M::MissingOrMalformed { what, .. }) => what.clone(),
        Some(M::Io { .. }) => "the file cannot be read".into(),
        Some(M::Fetch { reason, .. }) => format!("fetching it failed: {reason}"),
        _ => "the model was refused".into(),
    }
}

fn session_endpoint(state: Arc<State>, req: Request<Incoming>, header_ok: bool) -> Response<Body> {
    let (out, body) = ChannelBody::new();
    tokio::spawn(run_session(state, req.into_body(), header_ok, out));
    Response::builder()
        .header("content-type", "application/x-tandem-session")
        .body(body.boxed())
        .unwrap()
}

enum Event {
    Msg(ClientMsg),
    Bad(ProtocolError),
}

/// Sends frames to the client, counting bytes; false once the client is gone.
#[derive(Clone)]
struct Outbox {
    tx: UnboundedSender<Bytes>,
    metrics: Arc<Metrics>,
}

impl Outbox {
    fn send(&self, m: &ServerMsg) -> bool {
        let f = m.to_frame();
        self.metrics.add_bytes_out(f.len());
        self.tx.send(Bytes::from(f)).is_ok()
    }
}

async fn run_session(
    state: Arc<State>,
    mut body: Incoming,
    header_ok: bool,
    tx: UnboundedSender<Bytes>,
) {
    let out = Outbox {
        tx,
        metrics: state.metrics.clone(),
    };
    let fail = |e: SessionError| {
        out.send(&e.to_msg());
    };
    let mut dec = FrameDecoder::new(state.config.limits.max_frame);
    let idle = state.config.limits.idle_timeout;
    let first = tokio::time::timeout(idle, async {
        loop {
            match dec.next_message::<ClientMsg>() {
                Ok(Some(ClientMsg::Hello(h))) => return Ok(Some(h)),
                Ok(Some(_)) => {
                    return Err(SessionError::new(
                        ErrorCode::BadRequest,
                        "the first message of a session must be Hello",
                    ));
                }
                Err(e) => return Err(SessionError::new(ErrorCode::Malformed, e.to_string())),
                Ok(None) => match body.frame().await {
                    Some(Ok(f)) => {
                        if let Ok(d) = f.into_data() {
                            state.metrics.add_bytes_in(d.len());
                            dec.push(&d);
                        }
                    }
                    Some(Err(_)) => return Ok(None),
                    // The stream ended: a frame cut short is answered as malformed.
                    None => {
                        return match dec.finish() {
                            Ok(()) => Ok(None),
                            Err(e) => Err(SessionError::new(ErrorCode::Malformed, e.to_string())),
                        };
                    }
                },
            }
        }
    })
    .await;
    let hello = match first {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return fail(e),
        Err(_) => {
            return fail(SessionError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "no Hello within {} s: the session was closed",
                    idle.as_secs()
                ),
            ));
        }
    };
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let (session, slot) = match open_session(&state, &hello, header_ok).await {
        Ok(s) => s,
        Err(e) => {
            info!(session = id, code = ?e.code, reason = %e.message, "session refused");
            return fail(e);
        }
    };
    let t = session.target().clone();
    info!(session = id, target = %t.id(), temperature = hello.sampling.temperature,
          max_tokens = session.max_tokens(), "session opened");
    out.send(&ServerMsg::Accepted(Accepted {
        family: t.family.clone(),
        version: t.version.clone(),
        early_exit_layer: t.early_exit_layer as u32,
        max_context: session.max_context() as u32,
        max_tokens: session.max_tokens() as u32,
        max_draft: state.config.limits.max_draft as u32,
        top_k: state.config.limits.top_k as u32,
        drafter: recommended_drafter(&state, &t.family),
    }));
    // Bounded: a client that sends faster than its rounds are verified is held back by
    // HTTP/2 flow control once this fills, instead of growing the server's memory.
    let (events, rx) = mpsc::channel(state.config.limits.inbound_queue.max(1));
    let worker_out = out.clone();
    let limits = state.config.limits;
    let mut worker = tokio::task::spawn_blocking(move || {
        let r = session_loop(session, rx, &worker_out, limits);
        drop(slot);
        r
    });
    // Read frames and hand them to the worker in order, until the client ends the stream
    // or the worker stops.
    let mut summary = None;
    'read: loop {
        loop {
            match dec.next_message::<ClientMsg>() {
                Ok(Some(m)) => {
                    if events.send(Event::Msg(m)).await.is_err() {
                        break 'read;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = events.send(Event::Bad(e)).await;
                    break 'read;
                }
            }
        }
        tokio::select! {
            frame = body.frame() => match frame {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        state.metrics.add_bytes_in(d.len());
                        dec.push(&d);
                    }
                }
                Some(Err(_)) => break,
                None => {
                    if let Err(e) = dec.finish() {
                        let _ = events.send(Event::Bad(e)).await;
                    }
                    break;
                }
            },
            done = &mut worker => {
                summary = Some(done);
                break 'read;
            }
        }
    }
    drop(events);
    let summary = match summary {
        Some(done) => done.ok(),
        None => worker.await.ok(),
    };
    if let Some((rounds, reason)) = summary {
        info!(session = id, target = %t.id(), rounds, reason, "session closed");
    }
}

async fn open_session(
    state: &Arc<State>,
    hello: &Hello,
    header_ok: bool,
) -> Result<(Session, SessionSlot), SessionError> {
    if !header_ok && !state.token_ok(hello.token.as_deref()) {
        state.metrics.unauthorized();
        return Err(SessionError::new(
            ErrorCode::Unauthorized,
            "missing or wrong bearer token: put a token from the server's --token-file in Hello or the Authorization header",
        ));
    }
    let params = hello.sampling;
    params
        .validate()
        .map_err(|e| SessionError::new(ErrorCode::BadRequest, e.to_string()))?;
    let mut slot = state.enter().await?;
    let st = state.clone();
    let h = hello.clone();
    let target = tokio::task::spawn_blocking(move || st.registry.pick(&h))
        .await
        .map_err(|e| SessionError::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|m| {
            state.metrics.session_refused();
            SessionError::new(ErrorCode::Incompatible, m)
        })?;
    let session = Session::new(
        target,
        params,
        hello.max_tokens as usize,
        state.config.limits,
        state.metrics.clone(),
    );
    slot.reserve_kv(session.target(), session.max_context())?;
    Ok((session, slot))
}

/// Runs a session's messages in order; returns the rounds served and why it ended.
fn session_loop(
    mut s: Session,
    mut rx: mpsc::Receiver<Event>,
    out: &Outbox,
    limits: Limits,
) -> (usize, &'static str) {
    let runtime = tokio::runtime::Handle::current();
    let deadline = Instant::now() + limits.max_session_time;
    let idle = limits.idle_timeout;
    let mut queue = VecDeque::new();
    let mut cancelled = HashSet::new();
    let mut rounds = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = match queue.pop_front() {
            Some(e) => Some(e),
            None => match runtime.block_on(tokio::time::timeout(idle.min(left), rx.recv())) {
                Ok(Some(e)) => Some(e),
                Ok(None) => return (rounds, "stream ended"),
                Err(_) if left > idle => {
                    out.send(&ServerMsg::Error {
                        code: ErrorCode::LimitExceeded,
                        message: format!(
                            "no message for {} s: the session was closed",
                            idle.as_secs()
                        ),
                    });
                    return (rounds, "idle");
                }
                Err(_) => None,
            },
        };
        let Some(ev) = ev.filter(|_| Instant::now() < deadline) else {
            out.send(&ServerMsg::Error {
                code: ErrorCode::Expired,
                message: format!(
                    "the session reached its maximum time of {} s (--max-session-time); \
                     open a new session and re-send the history to continue",
                    limits.max_session_time.as_secs()
                ),
            });
            return (rounds, "max session time");
        };
        let sent = match ev {
            Event::Bad(e) => {
                out.send(&SessionError::new(ErrorCode::Malformed, e.to_string()).to_msg());
                return (rounds, "malformed frame");
            }
            Event::Msg(ClientMsg::Hello(_)) => {
                out.send(
                    &SessionError::new(ErrorCode::BadRequest, "Hello sent twice in one session")
                        .to_msg(),
                );
                return (rounds, "bad request");
            }
            Event::Msg(ClientMsg::Prefill(tokens)) => match s.prefill(&tokens) {
                Ok(first) => out.send(&ServerMsg::First(first)),
                Err(e) => {
                    out.send(&e.to_msg());
                    return (rounds, "error");
                }
            },
            Event::Msg(ClientMsg::Verify(v)) => {
                // Cancels that already arrived apply to rounds not yet started.
                while let Ok(e) = rx.try_recv() {
                    match e {
                        Event::Msg(ClientMsg::Cancel(r)) => {
                            cancelled.insert(r);
                        }
                        other => queue.push_back(other),
                    }
                }
                if cancelled.remove(&v.round) {
                    continue;
                }
                let hints = out.clone();
                let result = s.verify(
                    &v,
                    Box::new(move |m| {
                        hints.send(&m);
                    }),
                );
                match result {
                    Ok(r) => {
                        rounds += 1;
                        out.send(&ServerMsg::Result(r))
                    }
                    Err(e) => {
                        out.send(&e.to_msg());
                        return (rounds, "error");
                    }
                }
            }
            Event::Msg(ClientMsg::Cancel(r)) => {
                if cancelled.len() < 1024 {
                    cancelled.insert(r);
                }
                true
            }
            Event::Msg(ClientMsg::Close) => return (rounds, "closed by client"),
        };
        if !sent {
            return (rounds, "client gone");
        }
    }
}
