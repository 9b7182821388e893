//! A session client: one HTTP/2 stream (`POST /v1/session`) carrying protocol frames both
//! ways, over cleartext h2c or TLS.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tandem_core::protocol::{ClientMsg, FrameDecoder, MAX_FRAME, Message, ServerMsg};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::body::ChannelBody;
use crate::endpoint::Endpoint;

/// The sending half of a split session stream.
#[derive(Clone)]
pub struct SessionSender {
    tx: mpsc::UnboundedSender<Bytes>,
    bytes_up: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl SessionSender {
    /// Sends one message.
    pub fn send(&self, msg: &ClientMsg) -> anyhow::Result<()> {
        let f = msg.to_frame();
        self.bytes_up
            .fetch_add(f.len(), std::sync::atomic::Ordering::Relaxed);
        self.tx
            .send(Bytes::from(f))
            .map_err(|_| anyhow::anyhow!("the session stream to the verifier is closed"))
    }

    /// Bytes sent so far.
    pub fn bytes_up(&self) -> usize {
        self.bytes_up.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The receiving half of a split session stream.
pub struct SessionReceiver {
    body: Incoming,
    decoder: FrameDecoder,
    /// Bytes received so far.
    pub bytes_down: usize,
}

impl SessionReceiver {
    /// The next message, or `None` when the server ended the stream.
    pub async fn recv(&mut self) -> anyhow::Result<Option<ServerMsg>> {
        recv_into(&mut self.body, &mut self.decoder, &mut self.bytes_down).await
    }
}

async fn recv_into(
    body: &mut Incoming,
    decoder: &mut FrameDecoder,
    bytes_down: &mut usize,
) -> anyhow::Result<Option<ServerMsg>> {
    loop {
        if let Some(m) = decoder.next_message::<ServerMsg>()? {
            return Ok(Some(m));
        }
        match body.frame().await {
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    *bytes_down += data.len();
                    decoder.push(&data);
                }
            }
            None => {
                decoder.finish()?;
                return Ok(None);
            }
        }
    }
}

/// An open session stream.
pub struct SessionClient {
    tx: mpsc::UnboundedSender<Bytes>,
    body: Incoming,
    decoder: FrameDecoder,
    /// Bytes sent so far.
    pub bytes_up: usize,
    /// Bytes received so far.
    pub bytes_down: usize,
}

fn tls_connector(ca: &Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("reading CA certificates from {}", ca.display()))?
    {
        roots.add(cert.with_context(|| format!("parsing {}", ca.display()))?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Time to open the TCP connection to the verifier.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Time for the TLS and HTTP/2 handshakes and the response headers.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// HTTP/2 pings while a session is open; a verifier that does not answer one within
/// [`KEEPALIVE_TIMEOUT`] is taken as lost (the host then resumes elsewhere).
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// See [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Sends `req` to the verifier on a new connection (h2c, or TLS with the endpoint's CA),
/// within [`CONNECT_TIMEOUT`] and [`HANDSHAKE_TIMEOUT`]: the response's head.
async fn request(
    ep: &Endpoint,
    req: hyper::Request<ChannelBody>,
) -> anyhow::Result<hyper::Response<Incoming>> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&ep.addr))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "connecting to the verifier at {} timed out after {CONNECT_TIMEOUT:?}",
                ep.addr
            )
        })?
        .with_context(|| format!("connecting to the verifier at {}", ep.addr))?;
    tcp.set_nodelay(true)?;
    let handshake = async {
        match &ep.tls {
            None => send_over(TokioIo::new(tcp), req).await,
            Some((ca, name)) => {
                let name = rustls_pki_types::ServerName::try_from(name.clone())
                    .with_context(|| format!("bad TLS server name `{name}`"))?;
                let tls = tls_connector(ca)?
                    .connect(name, tcp)
                    .await
                    .context("TLS handshake with the verifier")?;
                send_over(TokioIo::new(tls), req).await
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the verifier at {} did not complete the TLS/HTTP/2 handshake within \
                 {HANDSHAKE_TIMEOUT:?}",
                ep.addr
            )
        })?
}

/// `GET path` on the verifier, over the same kind of connection as a session: the status
/// and the body (at most 4 MiB).
pub async fn get(ep: &Endpoint, path: &str) -> anyhow::Result<(hyper::StatusCode, Bytes)> {
    let (_, body) = ChannelBody::new();
    let mut req = hyper::Request::get(path);
    if let Some(t) = &ep.bearer {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = request(ep, req.body(body)?).await?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), 4 << 20)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading {path} from the verifier at {}: {e}", ep.addr))?
        .to_bytes();
    Ok((status, body))
}

/// Sends `req` as the first stream of a new HTTP/2 connection over `io`.
async fn send_over<T>(
    io: TokioIo<T>,
    req: hyper::Request<ChannelBody>,
) -> anyhow::Result<hyper::Response<Incoming>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(io)
        .await
        .context("HTTP/2 handshake with the verifier")?;
    tokio::spawn(conn);
    Ok(send.send_request(req).await?)
}

impl SessionClient {
    /// Opens a session stream (no message is sent yet), within [`CONNECT_TIMEOUT`] and
    /// [`HANDSHAKE_TIMEOUT`].
    pub async fn connect(ep: &Endpoint) -> anyhow::Result<SessionClient> {
        let (tx, body) = ChannelBody::new();
        let mut req = hyper::Request::post("/v1/session")
            .header("content-type", "application/x-tandem-session");
        if let Some(t) = &ep.bearer {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = request(ep, req.body(body)?).await?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.into_body().collect().await?.to_bytes();
            bail!(
                "the verifier refused the session: HTTP {status}: {}",
                String::from_utf8_lossy(&text)
            );
        }
        Ok(SessionClient {
            tx,
            body: resp.into_body(),
            decoder: FrameDecoder::new(MAX_FRAME),
            bytes_up: 0,
            bytes_down: 0,
        })
    }

    /// Sends one message.
    pub fn send(&mut self, msg: &ClientMsg) -> anyhow::Result<()> {
        self.send_raw(msg.to_frame())
    }

    /// Sends raw bytes (tests use it for malformed frames).
    pub fn send_raw(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.bytes_up += bytes.len();
        self.tx
            .send(Bytes::from(bytes))
            .map_err(|_| anyhow::anyhow!("the session stream to the verifier is closed"))
    }

    /// Ends the upload half of the stream.
    pub fn finish(&mut self) {
        let (tx, _) = mpsc::unbounded_channel();
        self.tx = tx;
    }

    /// The next message, or `None` when the server ended the stream.
    pub async fn recv(&mut self) -> anyhow::Result<Option<ServerMsg>> {
        recv_into(&mut self.body, &mut self.decoder, &mut self.bytes_down).await
    }

    /// Splits into a sender (cloneable, usable from any thread) and a receiver.
    pub fn split(self) -> (SessionSender, SessionReceiver) {
        (
            SessionSender {
                tx: self.tx,
                bytes_up: std::sync::Arc::new(self.bytes_up.into()),
            },
            SessionReceiver {
                body: self.body,
                decoder: self.decoder,
                bytes_down: self.bytes_down,
            },
        )
    }
}
