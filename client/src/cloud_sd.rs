//! The cloud-sd baseline's client: the verifier drafts and verifies by itself
//! (`POST /v1/completions` with `"speculative": true`, streamed as server-sent events); the
//! device only reads the text.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use http_body_util::BodyExt;

use crate::endpoint::Endpoint;

/// One cloud-sd request.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Raw prompt text.
    pub prompt: &'a str,
    /// New tokens at most.
    pub max_tokens: u32,
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass.
    pub top_p: f32,
    /// Sampling seed.
    pub seed: u64,
    /// Draft length the verifier uses.
    pub gamma: u32,
}

/// What a cloud-sd stream delivered.
#[derive(Debug, Clone, Default)]
pub struct Streamed {
    /// The generated text.
    pub text: String,
    /// Generated tokens (the server's `usage.completion_tokens`).
    pub tokens: usize,
    /// The target that generated (`family@version`).
    pub target: String,
    /// Bytes of the request body.
    pub bytes_up: usize,
    /// Bytes of the response body.
    pub bytes_down: usize,
    /// From sending the request to the first piece of text.
    pub ttft: Duration,
}

/// Sends `req` and calls `on_piece` with each piece of text as it arrives.
pub async fn stream(
    ep: &Endpoint,
    req: &Request<'_>,
    mut on_piece: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<Streamed> {
    if ep.tls.is_some() {
        bail!("cloud-sd talks plain HTTP/1.1 to the verifier; use an http:// address");
    }
    let body = serde_json::json!({
        "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": req.temperature,
        "top_p": req.top_p, "seed": req.seed, "stream": true, "speculative": true,
        "gamma": req.gamma,
    })
    .to_string();
    let t0 = Instant::now();
    let mut out = Streamed {
        bytes_up: body.len(),
        ..Streamed::default()
    };
    let tcp = tokio::net::TcpStream::connect(&ep.addr)
        .await
        .with_context(|| format!("connecting to the verifier at {}", ep.addr))?;
    tcp.set_nodelay(true)?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut http = hyper::Request::post("/v1/completions")
        .header("host", &ep.addr)
        .header("content-type", "application/json");
    if let Some(t) = &ep.bearer {
        http = http.header("authorization", format!("Bearer {t}"));
    }
    let resp = send
        .send_request(http.body(http_body_util::Full::new(bytes::Bytes::from(body)))?)
        .await?;
    let status = resp.status();
    let mut resp_body = resp.into_body();
    let mut buf = Vec::new();
    let mut first = None;
    while let Some(frame) = resp_body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        out.bytes_down += data.len();
        buf.extend_from_slice(&data);
        if !status.is_success() {
            continue;
        }
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let event = String::from_utf8_lossy(&event);
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(data)?;
            if let Some(m) = v["error"]["message"].as_str() {
                bail!("the verifier failed: {m}");
            }
            out.target = v["model"].as_str().unwrap_or_default().to_string();
            let piece = v["choices"][0]["text"].as_str().unwrap_or_default();
            if !piece.is_empty() {
                first.get_or_insert_with(|| t0.elapsed());
                on_piece(piece)?;
                out.text.push_str(piece);
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                out.tokens = n as usize;
            }
        }
    }
    if !status.is_success() {
        bail!(
            "the verifier refused the cloud-sd request: HTTP {status}: {}",
            String::from_utf8_lossy(&buf)
        );
    }
    out.ttft = first.unwrap_or_default();
    Ok(out)
}
