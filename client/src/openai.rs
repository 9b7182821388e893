//! The OpenAI-compatible surface both of tandem's servers speak — `tandem serve` on the
//! device (completions and chat, through speculative decoding) and the verifier's
//! `/v1/completions` (the target alone, or the cloud-sd baseline): typed requests, the
//! response and chunk objects, one SSE writer and one error shape.
//!
//! A server parses a request, starts its generation, and hands [`respond`] the stream of
//! [`Piece`]s the generation produces; `respond` turns it into one JSON object or into
//! server-sent events ending with `data: [DONE]`.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::body::ChannelBody;

/// The body type of every response here.
pub type Body = BoxBody<Bytes, Infallible>;

/// What completions and chats both take. Absent fields take the server's defaults.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    /// A target (`family` or `family@version`) on the verifier; informational on the device.
    #[serde(default)]
    pub model: Option<String>,
    /// New tokens at most.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// 0 = greedy.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Sampling seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Server-sent events instead of one JSON object.
    #[serde(default)]
    pub stream: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The text to continue.
    pub prompt: String,
    /// Sampling, length, streaming.
    #[serde(flatten)]
    pub common: Common,
    /// tandem extension (verifier): speculative decoding with the server's own draft model,
    /// the cloud-sd baseline.
    #[serde(default)]
    pub speculative: bool,
    /// tandem extension: the draft length of `speculative`.
    #[serde(default)]
    pub gamma: Option<usize>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation so far.
    pub messages: Vec<ChatMessage>,
    /// Sampling, length (`max_tokens`, the older name), streaming.
    #[serde(flatten)]
    pub common: Common,
    /// New tokens at most.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
}

/// One message of a chat.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// Text, or parts whose `text` fields are joined.
    pub content: MessageContent,
}

/// The content of a chat message.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts; the text ones are used.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// The part's text, for `{"type": "text"}` parts.
    #[serde(default)]
    pub text: Option<String>,
}

impl MessageContent {
    /// The message's text.
    pub fn text(&self) -> String {
        match self {
            MessageContent::Text(t) => t.clone(),
            MessageContent::Parts(parts) => {
                parts.iter().filter_map(|p| p.text.as_deref()).collect()
            }
        }
    }
}

/// Parses a request body, with an error that says what was expected.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("bad request: {e} (expected {expected})")))
}

/// An error in the shape OpenAI's clients read: `{"error": {"message", "type", "param",
/// "code"}}` with an HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What was wrong and what to do.
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `server_error`, …
    pub kind: &'static str,
}

impl ApiError {
    /// 400: the request is wrong.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 404: no such endpoint or model.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    /// An error of a given status and type.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
        }
    }

    /// The JSON body.
    pub fn to_json(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": null,
                         "code": self.status.as_u16()}})
    }

    /// The response.
    pub fn response(&self) -> Response<Body> {
        json_response(self.status, &self.to_json())
    }
}

/// A JSON response.
pub fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!("{v}\n"))).boxed())
        .expect("a valid response")
}

/// What a generation sends while it runs.
#[derive(Debug, Clone)]
pub enum Piece {
    /// More text.
    Text(String),
    /// The generation ended.
    Done {
        /// `stop` or `length`.
        finish_reason: &'static str,
        /// Tokens of the prompt.
        prompt_tokens: usize,
        /// Tokens generated.
        completion_tokens: usize,
    },
    /// The generation failed.
    Failed(ApiError),
}

/// Which object a response is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `text_completion`.
    Completion,
    /// `chat.completion` (`chat.completion.chunk` when streamed).
    Chat,
}

/// What every object of one response shares.
#[derive(Debug, Clone)]
pub struct Meta {
    /// `cmpl-…` or `chatcmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model that answered.
    pub model: String,
    /// Completion or chat.
    pub kind: Kind,
}

impl Meta {
    /// A new response's id and time.
    pub fn new(kind: Kind, model: impl Into<String>) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let prefix = match kind {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        };
        Meta {
            id: format!("{prefix}-{:x}", now.as_nanos()),
            created: now.as_secs(),
            model: model.into(),
            kind,
        }
    }

    /// One object: the whole answer (`stream` false) or a chunk of it, with usage once
    /// known.
    fn object(
        &self,
        text: &str,
        finish: Option<&str>,
        usage: Option<(usize, usize)>,
        chunk: bool,
    ) -> Value {
        let (object, choice) = match (self.kind, chunk) {
            (Kind::Completion, _) => (
                "text_completion",
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
            ),
            (Kind::Chat, true) => (
                "chat.completion.chunk",
                json!({"index": 0, "delta": {"content": text}, "finish_reason": finish}),
            ),
            (Kind::Chat, false) => (
                "chat.completion",
                json!({"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": finish}),
            ),
        };
        let mut v = json!({"id": self.id, "object": object, "created": self.created,
                           "model": self.model, "choices": [choice]});
        if let Some((prompt, completion)) = usage {
            v["usage"] = json!({"prompt_tokens": prompt, "completion_tokens": completion,
                                "total_tokens": prompt + completion});
        }
        v
    }
}

/// Answers with what `pieces` brings: one JSON object once the generation is done, or (with
/// `stream`) a server-sent event per piece, a last chunk with the finish reason and usage,
/// and `data: [DONE]`. A failure before anything was sent is an error response; one
/// during a stream is an `{"error": …}` event.
pub async fn respond(
    meta: Meta,
    stream: bool,
    mut pieces: mpsc::UnboundedReceiver<Piece>,
) -> Response<Body> {
    if !stream {
        let mut text = String::new();
        while let Some(p) = pieces.recv().await {
            match p {
                Piece::Text(t) => text.push_str(&t),
                Piece::Failed(e) => return e.response(),
                Piece::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let usage = Some((prompt_tokens, completion_tokens));
                    let v = meta.object(&text, Some(finish_reason), usage, false);
                    return json_response(StatusCode::OK, &v);
                }
            }
        }
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the generation stopped without finishing",
        )
        .response();
    }
    let (out, sse) = ChannelBody::new();
    tokio::spawn(async move {
        while let Some(p) = pieces.recv().await {
            let event = match p {
                Piece::Text(t) => meta.object(&t, None, None, true),
                Piece::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let usage = Some((prompt_tokens, completion_tokens));
                    meta.object("", Some(finish_reason), usage, true)
                }
                Piece::Failed(e) => e.to_json(),
            };
            if out.send(Bytes::from(format!("data: {event}\n\n"))).is_err() {
                return;
            }
        }
        let _ = out.send(Bytes::from_static(b"data: [DONE]\n\n"));
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(sse.boxed())
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(r: Response<Body>) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    fn pieces(list: Vec<Piece>) -> mpsc::UnboundedReceiver<Piece> {
        let (tx, rx) = mpsc::unbounded_channel();
        for p in list {
            tx.send(p).unwrap();
        }
        rx
    }

    fn done() -> Piece {
        Piece::Done {
            finish_reason: "length",
            prompt_tokens: 3,
            completion_tokens: 2,
        }
    }

    #[tokio::test]
    async fn one_object_or_events_ending_with_done() {
        let meta = Meta::new(Kind::Chat, "m");
        let text = |t: &str| Piece::Text(t.into());
        let r = respond(
            meta.clone(),
            false,
            pieces(vec![text("a"), text("b"), done()]),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = serde_json::from_str(&body_of(r).await).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "ab");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["total_tokens"], 5);

        let r = respond(meta, true, pieces(vec![text("a"), done()])).await;
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let body = body_of(r).await;
        let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 3, "{body}");
        let first: Value = serde_json::from_str(&events[0]["data: ".len()..]).unwrap();
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["content"], "a");
        let last: Value = serde_json::from_str(&events[1]["data: ".len()..]).unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(last["usage"]["completion_tokens"], 2);
        assert_eq!(events[2], "data: [DONE]");
    }

    #[tokio::test]
    async fn failures_have_the_openai_error_shape() {
        let meta = Meta::new(Kind::Completion, "m");
        let e = ApiError::invalid("max_tokens too large");
        let r = respond(meta, false, pieces(vec![Piece::Failed(e)])).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let v: Value = serde_json::from_str(&body_of(r).await).unwrap();
        assert_eq!(v["error"]["message"], "max_tokens too large");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null());

        let e = parse::<CompletionRequest>(b"{\"prompt\": 5}", "a string `prompt`").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("a string `prompt`"), "{}", e.message);
        let e = parse::<CompletionRequest>(b"{\"prompt\": \"x\", \"max_tokens\": -5}", "");
        assert!(e.is_err(), "a negative max_tokens is refused");
    }

    #[test]
    fn chat_content_is_text_or_text_parts() {
        let r: ChatRequest = serde_json::from_str(
            r#"{"messages": [{"role": "user", "content": "hi"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.messages[0].content.text(), "hi");
        assert_eq!(r.messages[1].content.text(), "ab");
    }
}
