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

/// The most choices (`n`) one request may ask for.
pub const MAX_N: i64 = 16;
/// The most stop sequences one request may give (as OpenAI's API).
pub const MAX_STOP: usize = 4;
/// The most alternatives per position `logprobs` / `top_logprobs` may ask for.
pub const MAX_TOP_LOGPROBS: i64 = 5;

/// A stop sequence or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    /// One sequence.
    One(String),
    /// Up to [`MAX_STOP`] sequences.
    Many(Vec<String>),
}

/// What completions and chats both take. Absent fields take the server's defaults.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    /// A target (`family` or `family@version`); on `tandem serve` also its own id.
    #[serde(default)]
    pub model: Option<String>,
    /// New tokens at most.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// 0 = greedy, up to 2.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus mass, in (0, 1].
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Sampling seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Server-sent events instead of one JSON object.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Where to stop: the text ends before the first match, `finish_reason` is `stop`.
    #[serde(default)]
    pub stop: Option<StopField>,
    /// Independent generations (choices).
    #[serde(default)]
    pub n: Option<i64>,
    /// Not supported: refused unless 0.
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    /// Not supported: refused unless 0.
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    /// Not supported: refused unless empty.
    #[serde(default)]
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

/// A prompt: text, or a list holding one text.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    /// Plain text.
    Text(String),
    /// Texts, token ids or lists of them; only a list of one text is taken.
    List(Vec<Value>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The text to continue.
    pub prompt: PromptField,
    /// Sampling, length, streaming, stop, choices.
    #[serde(flatten)]
    pub common: Common,
    /// The target's log-probabilities of each generated token and of this many
    /// alternatives (0–5).
    #[serde(default)]
    pub logprobs: Option<i64>,
    /// Not supported: refused when true.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Not supported: refused when more than `n`.
    #[serde(default)]
    pub best_of: Option<i64>,
    /// Not supported: refused unless empty.
    #[serde(default)]
    pub suffix: Option<String>,
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
    /// Sampling, length (`max_tokens`, the older name), streaming, stop, choices.
    #[serde(flatten)]
    pub common: Common,
    /// New tokens at most.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// Log-probabilities of the generated tokens.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Alternatives per position with `logprobs`.
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    /// Not supported: refused unless empty.
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// Not supported: refused unless `{"type": "text"}`.
    #[serde(default)]
    pub response_format: Option<Value>,
}

/// Roles a chat message may have.
pub const ROLES: [&str; 4] = ["system", "developer", "user", "assistant"];

/// One message of a chat.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer`, `user` or `assistant`.
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
    /// `text`, `image_url`, …
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
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

/// A request's options, checked: what a server needs to run it.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// New tokens at most; `None`: the server's default.
    pub max_tokens: Option<u32>,
    /// 0 = greedy; `None`: the server's default.
    pub temperature: Option<f32>,
    /// Nucleus mass; `None`: the server's default.
    pub top_p: Option<f32>,
    /// Sampling seed of the first choice (choice i uses seed + i).
    pub seed: Option<u64>,
    /// Choices.
    pub n: usize,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// `Some(k)`: log-probabilities of each token and of its k most likely alternatives.
    pub logprobs: Option<usize>,
    /// Server-sent events.
    pub stream: bool,
    /// The model asked for.
    pub model: Option<String>,
}

fn unsupported(param: &str, what: &str) -> ApiError {
    ApiError::param(
        param,
        "unsupported_parameter",
        format!("`{param}` is not supported by tandem: {what}"),
    )
}

impl Common {
    /// Checks the shared fields: ranges, counts, and parameters tandem does not implement
    /// (refused rather than ignored).
    pub fn check(&self, max_tokens: Option<i64>, param: &str) -> Result<Options, ApiError> {
        let max_tokens = match max_tokens {
            None => None,
            Some(m) if m <= 0 => {
                return Err(ApiError::invalid_value(
                    param,
                    format!("`{param}` must be at least 1, got {m}"),
                ));
            }
            Some(m) => Some(u32::try_from(m).unwrap_or(u32::MAX)),
        };
        if let Some(t) = self.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(ApiError::invalid_value(
                "temperature",
                format!("`temperature` must be between 0 and 2, got {t}"),
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(ApiError::invalid_value(
                "top_p",
                format!("`top_p` must be in (0, 1], got {p}"),
            ));
        }
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::invalid_value(
                "n",
                format!("`n` must be between 1 and {MAX_N}, got {n}"),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(list)) => list.clone(),
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::invalid_value(
                "stop",
                format!(
                    "`stop` may hold at most {MAX_STOP} sequences, got {}",
                    stop.len()
                ),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid_value(
                "stop",
                "`stop` sequences must not be empty",
            ));
        }
        for (param, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(unsupported(param, "leave it out or set it to 0"));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(unsupported("logit_bias", "leave it out"));
        }
        Ok(Options {
            max_tokens,
            temperature: self.temperature.map(|t| t as f32),
            top_p: self.top_p.map(|p| p as f32),
            seed: self.seed,
            n: n as usize,
            stop,
            logprobs: None,
            stream: self.stream.unwrap_or(false),
            model: self.model.clone(),
        })
    }
}

impl CompletionRequest {
    /// The prompt and the checked options.
    pub fn check(&self) -> Result<(String, Options), ApiError> {
        let prompt = match &self.prompt {
            PromptField::Text(t) => t.clone(),
            PromptField::List(l) => match l.as_slice() {
                [Value::String(t)] => t.clone(),
                _ => {
                    return Err(ApiError::invalid_value(
                        "prompt",
                        "`prompt` must be a string (or a list of one string): tandem takes one \
                         text prompt per request, not token ids or batches",
                    ));
                }
            },
        };
        let mut o = self.common.check(self.common.max_tokens, "max_tokens")?;
        if let Some(k) = self.logprobs {
            if !(0..=MAX_TOP_LOGPROBS).contains(&k) {
                return Err(ApiError::invalid_value(
                    "logprobs",
                    format!("`logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                ));
            }
            o.logprobs = Some(k as usize);
        }
        if self.echo == Some(true) {
            return Err(unsupported(
                "echo",
                "the prompt is not repeated in the answer",
            ));
        }
        if self.best_of.is_some_and(|b| b > o.n as i64) {
            return Err(unsupported("best_of", "ask for `n` choices instead"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(unsupported("suffix", "insertion is not implemented"));
        }
        Ok((prompt, o))
    }
}

impl ChatRequest {
    /// The checked options (the messages are checked too).
    pub fn check(&self) -> Result<Options, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid_value(
                "messages",
                "`messages` is empty: give at least one message",
            ));
        }
        for (i, m) in self.messages.iter().enumerate() {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::invalid_value(
                    &format!("messages[{i}].role"),
                    format!(
                        "unknown role `{}` in messages[{i}]: use one of {}",
                        m.role,
                        ROLES.join(", ")
                    ),
                ));
            }
            if let MessageContent::Parts(parts) = &m.content
                && let Some(p) = parts.iter().find(|p| p.kind.as_deref() != Some("text"))
            {
                return Err(ApiError::invalid_value(
                    &format!("messages[{i}].content"),
                    format!(
                        "content parts of type `{}` are not supported: tandem's models read \
                         text parts only",
                        p.kind.as_deref().unwrap_or("(none)")
                    ),
                ));
            }
        }
        let max = self.max_completion_tokens.or(self.common.max_tokens);
        let param = if self.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        let mut o = self.common.check(max, param)?;
        if self.logprobs == Some(true) {
            let k = self.top_logprobs.unwrap_or(0);
            if !(0..=MAX_TOP_LOGPROBS).contains(&k) {
                return Err(ApiError::invalid_value(
                    "top_logprobs",
                    format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                ));
            }
            o.logprobs = Some(k as usize);
        } else if self.top_logprobs.is_some_and(|k| k > 0) {
            return Err(ApiError::invalid_value(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(unsupported("tools", "tool calls are not implemented"));
        }
        if let Some(f) = &self.response_format
            && f.get("type").and_then(Value::as_str) != Some("text")
        {
            return Err(unsupported(
                "response_format",
                "only `{\"type\": \"text\"}` is implemented",
            ));
        }
        Ok(o)
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
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error`, `server_error`.
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code: `invalid_value`, `model_not_found`, …
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: the request is wrong.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400: a field has a value outside what it may take.
    pub fn invalid_value(param: &str, message: impl Into<String>) -> Self {
        Self::param(param, "invalid_value", message)
    }

    /// 400 about one field, with a code.
    pub fn param(param: &str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            code: Some(code),
            ..Self::invalid(message)
        }
    }

    /// 400 on `max_tokens`: `asked` is more than `limit`, the limit of `whose` (e.g. "this
    /// server (--max-tokens)").
    pub fn max_tokens_over(asked: usize, limit: usize, whose: &str) -> Self {
        Self::invalid_value(
            "max_tokens",
            format!("max_tokens {asked} exceeds the limit of {whose}: ask for at most {limit}"),
        )
    }

    /// 400 `context_length_exceeded`: prompt and completion do not fit `target`'s context
    /// of `context` tokens; `param` is the request's prompt field.
    pub fn context_exceeded(
        param: &str,
        target: &str,
        context: usize,
        prompt: usize,
        max_tokens: usize,
    ) -> Self {
        Self::param(
            param,
            "context_length_exceeded",
            format!(
                "{target}'s context is {context} tokens, but {} were asked for ({prompt} in the \
                 prompt, {max_tokens} for the completion): shorten the prompt or lower \
                 max_tokens",
                prompt + max_tokens
            ),
        )
    }

    /// 404: no such endpoint.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }

    /// 404: no such model (`model_not_found`).
    pub fn model_not_found(message: impl Into<String>) -> Self {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::not_found(message)
        }
    }

    /// 401: missing or wrong API key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError {
            code: Some("invalid_api_key"),
            ..Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
        }
    }

    /// 429: too many requests at once; retry later.
    pub fn rate_limited(message: impl Into<String>) -> Self {
        ApiError {
            code: Some("rate_limit_exceeded"),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        }
    }

    /// 503: the server cannot take it now; retry later.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
    }

    /// An error of a given status and type.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// The JSON body.
    pub fn to_json(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param,
                         "code": self.code}})
    }

    /// The response.
    pub fn response(&self) -> Response<Body> {
        json_response(self.status, &self.to_json())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

/// A JSON response.
pub fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!("{v}\n"))).boxed())
        .expect("a valid response")
}

/// The target's log-probability of one generated token, with its most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token's text.
    pub token: String,
    /// Natural log of its probability under the target (before temperature and top-p).
    pub logprob: f32,
    /// The most likely tokens at that position and their log-probabilities.
    pub top: Vec<(String, f32)>,
    /// Where the token's text starts in the choice's text, bytes.
    pub offset: usize,
}

/// What a generation sends while it runs.
#[derive(Debug, Clone)]
pub enum Piece {
    /// The target that answers (`family@version`), once known: the responses'
    /// `system_fingerprint`.
    Target(String),
    /// More text of one choice.
    Text {
        /// The choice.
        index: usize,
        /// The text.
        text: String,
        /// Log-probabilities of the tokens this text completes, when asked for.
        logprobs: Vec<TokenLogprob>,
    },
    /// A choice ended.
    Done {
        /// The choice.
        index: usize,
        /// `stop` (end of sequence or a stop sequence) or `length`.
        finish_reason: &'static str,
        /// Tokens of the prompt.
        prompt_tokens: usize,
        /// Tokens generated.
        completion_tokens: usize,
    },
    /// The generation failed.
    Failed(ApiError),
}

impl Piece {
    /// The same piece filed under choice `index`.
    pub fn for_choice(&self, index: usize) -> Piece {
        match self {
            Piece::Text { text, logprobs, .. } => Piece::Text {
                index,
                text: text.clone(),
                logprobs: logprobs.clone(),
            },
            Piece::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                ..
            } => Piece::Done {
                index,
                finish_reason,
                prompt_tokens: *prompt_tokens,
                completion_tokens: *completion_tokens,
            },
            other => other.clone(),
        }
    }
}

/// Runs a request's `n` choices one after another: `run(i, send)` generates choice `i`
/// (sampled ones with seed + i) and sends its pieces as choice 0 through `send`, which
/// files them under `i`. Under greedy decoding every choice is the same text, so it is
/// generated once and sent under each index. Ends early when `run` returns false (the
/// client left, or the choice failed).
pub fn run_choices(
    n: usize,
    greedy: bool,
    emit: &mut dyn FnMut(Piece) -> bool,
    mut run: impl FnMut(usize, &mut dyn FnMut(Piece) -> bool) -> bool,
) {
    let runs = if greedy { 1 } else { n };
    for i in 0..runs {
        let indices = if greedy { 0..n } else { i..i + 1 };
        let mut send = |p: Piece| indices.clone().all(|j| emit(p.for_choice(j)));
        if !run(i, &mut send) {
            return;
        }
    }
}

/// Wraps `emit` so that `guard` (a server's slot for the generation) is released just
/// before the response's last piece goes out — when all `n` choices are done, or on a
/// failure — so a client that sends its next request as soon as it has the answer finds
/// the slot free.
pub fn releasing<G>(
    n: usize,
    guard: G,
    mut emit: impl FnMut(Piece) -> bool,
) -> impl FnMut(Piece) -> bool {
    let mut guard = Some(guard);
    let mut open = n;
    move |p| {
        match &p {
            Piece::Done { .. } => {
                open = open.saturating_sub(1);
                if open == 0 {
                    guard.take();
                }
            }
            Piece::Failed(_) => {
                guard.take();
            }
            _ => {}
        }
        emit(p)
    }
}

/// Stop sequences matched on decoded text, also across token boundaries: text that could
/// still be the start of a stop sequence is held back until the next piece decides.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops` (none: everything passes at once).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops,
            held: String::new(),
        }
    }

    /// Takes the next piece of text: the text that may go out now, and whether a stop
    /// sequence matched (then the text from the match on is dropped and nothing more
    /// should be generated).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| partial_match(&self.held, s))
            .max()
            .unwrap_or(0);
        let out: String = self.held.drain(..self.held.len() - keep).collect();
        (out, false)
    }

    /// The text still held back, at the end of the generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The longest proper prefix of `stop` that `text` ends with, in bytes.
fn partial_match(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

/// One choice on the generating side: applies the stop sequences to its text and keeps
/// the log-probabilities of tokens in step with the text that goes out.
#[derive(Debug)]
pub struct Choice {
    index: usize,
    stop: StopMatcher,
    /// Bytes of text generated / sent.
    generated: usize,
    sent: usize,
    waiting: std::collections::VecDeque<TokenLogprob>,
}

impl Choice {
    /// Choice `index` with the request's stop sequences.
    pub fn new(index: usize, stop: &[String]) -> Self {
        Choice {
            index,
            stop: StopMatcher::new(stop.to_vec()),
            generated: 0,
            sent: 0,
            waiting: Default::default(),
        }
    }

    /// More decoded text (may be empty), with the log-probability of the token it came
    /// from when asked for: the piece to send, if any, and whether a stop sequence matched
    /// (then nothing more should be generated; tokens from the match on are dropped).
    pub fn push(&mut self, text: &str, logprob: Option<TokenLogprob>) -> (Option<Piece>, bool) {
        if let Some(mut lp) = logprob {
            lp.offset = self.generated;
            self.waiting.push_back(lp);
        }
        self.generated += text.len();
        let (out, stopped) = self.stop.push(text);
        let piece = self.release(out, false);
        if stopped {
            self.waiting.clear();
        }
        (piece, stopped)
    }

    /// The end (no stop sequence matched): what was held back.
    pub fn finish(&mut self) -> Option<Piece> {
        let rest = self.stop.finish();
        self.release(rest, true)
    }

    /// Sends `text` with the log-probabilities of the tokens whose text has started going
    /// out (all waiting ones when `all`).
    fn release(&mut self, text: String, all: bool) -> Option<Piece> {
        self.sent += text.len();
        let mut logprobs = Vec::new();
        while let Some(lp) = self.waiting.front() {
            if !all && lp.offset >= self.sent {
                break;
            }
            logprobs.extend(self.waiting.pop_front());
        }
        if text.is_empty() && logprobs.is_empty() {
            return None;
        }
        Some(Piece::Text {
            index: self.index,
            text,
            logprobs,
        })
    }
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
    /// The target version that answered (`family@version`), once known.
    pub system_fingerprint: Option<String>,
    /// Choices asked for.
    pub n: usize,
    /// Whether to send log-probabilities.
    pub logprobs: bool,
}

impl Meta {
    /// A new response's id and time, for `o`.
    pub fn new(kind: Kind, model: impl Into<String>, o: &Options) -> Self {
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
            system_fingerprint: None,
            n: o.n,
            logprobs: o.logprobs.is_some(),
        }
    }

    /// The `logprobs` field of a choice.
    fn logprobs(&self, lps: &[TokenLogprob]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Completion => json!({
                "tokens": lps.iter().map(|l| &l.token).collect::<Vec<_>>(),
                "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                "top_logprobs": lps.iter().map(|l| {
                    l.top.iter().map(|(t, p)| (t.clone(), json!(p)))
                        .collect::<serde_json::Map<_, _>>()
                }).collect::<Vec<_>>(),
                "text_offset": lps.iter().map(|l| l.offset).collect::<Vec<_>>(),
            }),
            Kind::Chat => json!({"content": lps.iter().map(|l| json!({
                "token": l.token, "logprob": l.logprob, "bytes": l.token.as_bytes(),
                "top_logprobs": l.top.iter().map(|(t, p)| json!({
                    "token": t, "logprob": p, "bytes": t.as_bytes()})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>()}),
        }
    }

    /// One choice of an object.
    fn choice(
        &self,
        index: usize,
        text: &str,
        lps: &[TokenLogprob],
        finish: Option<&str>,
        chunk: bool,
    ) -> Value {
        let logprobs = self.logprobs(lps);
        match (self.kind, chunk) {
            (Kind::Completion, _) => json!({"index": index, "text": text, "logprobs": logprobs,
                                            "finish_reason": finish}),
            (Kind::Chat, true) => json!({"index": index, "delta": {"content": text},
                                         "logprobs": logprobs, "finish_reason": finish}),
            (Kind::Chat, false) => json!({"index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs, "finish_reason": finish}),
        }
    }

    /// An object with `choices`, and usage once known.
    fn object(&self, choices: Vec<Value>, usage: Option<(usize, usize)>, chunk: bool) -> Value {
        let object = match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Chat, false) => "chat.completion",
        };
        let mut v = json!({"id": self.id, "object": object, "created": self.created,
                           "model": self.model, "system_fingerprint": self.system_fingerprint,
                           "choices": choices});
        if let Some((prompt, completion)) = usage {
            v["usage"] = json!({"prompt_tokens": prompt, "completion_tokens": completion,
                                "total_tokens": prompt + completion});
        }
        v
    }
}

/// One choice's text, log-probabilities and end, gathered for a whole answer.
#[derive(Default)]
struct Gathered {
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: Option<&'static str>,
}

/// Answers with what `pieces` brings for `meta.n` choices: one JSON object once every
/// choice is done, or (with `stream`) a server-sent event per piece, a chunk with each
/// choice's finish reason (the last one with the usage), and `data: [DONE]`. Nothing is
/// sent before the first piece arrives, so a failure before any text (a refused request)
/// is an error response with its status; one during a stream is an `{"error": …}` event.
pub async fn respond(
    mut meta: Meta,
    stream: bool,
    mut pieces: mpsc::UnboundedReceiver<Piece>,
) -> Response<Body> {
    let stopped = || {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the generation stopped without finishing",
        )
    };
    let mut first = None;
    while let Some(p) = pieces.recv().await {
        match p {
            Piece::Target(t) => meta.system_fingerprint = Some(t),
            Piece::Failed(e) => return e.response(),
            p => {
                first = Some(p);
                break;
            }
        }
    }
    let Some(first) = first else {
        return stopped().response();
    };
    let n = meta.n;
    let mut usage = (0, 0);
    let mut open = n;
    if !stream {
        let mut choices: Vec<Gathered> = (0..n).map(|_| Gathered::default()).collect();
        let mut next = Some(first);
        loop {
            let p = match next.take() {
                Some(p) => p,
                None => match pieces.recv().await {
                    Some(p) => p,
                    None => return stopped().response(),
                },
            };
            match p {
                Piece::Target(t) => meta.system_fingerprint = Some(t),
                Piece::Text {
                    index,
                    text,
                    logprobs,
                } => {
                    if let Some(c) = choices.get_mut(index) {
                        c.text.push_str(&text);
                        c.logprobs.extend(logprobs);
                    }
                }
                Piece::Failed(e) => return e.response(),
                Piece::Done {
                    index,
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    if let Some(c) = choices.get_mut(index)
                        && c.finish.is_none()
                    {
                        c.finish = Some(finish_reason);
                        usage = (prompt_tokens, usage.1 + completion_tokens);
                        open -= 1;
                    }
                    if open == 0 {
                        let list = choices
                            .iter()
                            .enumerate()
                            .map(|(i, c)| meta.choice(i, &c.text, &c.logprobs, c.finish, false))
                            .collect();
                        let v = meta.object(list, Some(usage), false);
                        return json_response(StatusCode::OK, &v);
                    }
                }
            }
        }
    }
    let (out, sse) = ChannelBody::new();
    tokio::spawn(async move {
        let mut next = Some(first);
        let mut finished = vec![false; n];
        // A chat choice's first chunk says who speaks, as OpenAI's do.
        let mut spoke = vec![meta.kind != Kind::Chat; n];
        loop {
            let p = match next.take() {
                Some(p) => p,
                None => match pieces.recv().await {
                    Some(p) => p,
                    None => break,
                },
            };
            let index = match &p {
                Piece::Text { index, .. } | Piece::Done { index, .. } => Some(*index),
                _ => None,
            };
            let mut event = match p {
                Piece::Target(t) => {
                    meta.system_fingerprint = Some(t);
                    continue;
                }
                Piece::Text {
                    index,
                    text,
                    logprobs,
                } => meta.object(
                    vec![meta.choice(index, &text, &logprobs, None, true)],
                    None,
                    true,
                ),
                Piece::Done {
                    index,
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    if finished.get(index).copied().unwrap_or(true) {
                        continue;
                    }
                    finished[index] = true;
                    usage = (prompt_tokens, usage.1 + completion_tokens);
                    open -= 1;
                    let choice = meta.choice(index, "", &[], Some(finish_reason), true);
                    meta.object(vec![choice], (open == 0).then_some(usage), true)
                }
                Piece::Failed(e) => e.to_json(),
            };
            if let Some(i) = index.filter(|&i| i < n)
                && !std::mem::replace(&mut spoke[i], true)
            {
                event["choices"][0]["delta"]["role"] = json!("assistant");
            }
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

/// Formats chat messages into a prompt: with the model's own chat template (a GGUF's
/// `tokenizer.chat_template`, rendered as Hugging Face's `apply_chat_template` does: Jinja
/// with `trim_blocks` and `lstrip_blocks`, `add_generation_prompt` true), or ChatML when the
/// model has none. A template that refuses the conversation (`raise_exception`) is a 400.
pub fn render_chat(
    template: Option<&str>,
    bos_token: &str,
    eos_token: &str,
    messages: &[ChatMessage],
) -> Result<String, ApiError> {
    let Some(template) = template else {
        return Ok(chatml(messages));
    };
    let mut env = minijinja::Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("the default delimiters");
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    let server = |e: minijinja::Error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("the model's chat template does not render: {e}"),
        )
    };
    env.add_template("chat", template).map_err(server)?;
    let list: Vec<Value> = messages
        .iter()
        .map(|m| json!({"role": m.role, "content": m.content.text()}))
        .collect();
    let ctx = minijinja::context! {
        messages => minijinja::value::Serde(&list),
        add_generation_prompt => true,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    let tmpl = env.get_template("chat").map_err(server)?;
    tmpl.render(ctx).map_err(|e| match e.kind() {
        minijinja::ErrorKind::InvalidOperation => ApiError::invalid_value(
            "messages",
            format!(
                "the model's chat template refuses these messages: {}",
                e.detail().unwrap_or("")
            ),
        ),
        _ => server(e),
    })
}

/// ChatML, the fallback for models without a template.
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

    fn text(index: usize, t: &str) -> Piece {
        Piece::Text {
            index,
            text: t.into(),
            logprobs: Vec::new(),
        }
    }

    fn done(index: usize) -> Piece {
        Piece::Done {
            index,
            finish_reason: "length",
            prompt_tokens: 3,
            completion_tokens: 2,
        }
    }

    fn options(json: &str) -> Options {
        let r: CompletionRequest = serde_json::from_str(json).unwrap();
        r.check().unwrap().1
    }

    #[tokio::test]
    async fn one_object_or_events_ending_with_done() {
        let o = options(r#"{"prompt": "x"}"#);
        let meta = Meta::new(Kind::Chat, "m", &o);
        let target = Piece::Target("fam@1".into());
        let list = vec![target.clone(), text(0, "a"), text(0, "b"), done(0)];
        let r = respond(meta.clone(), false, pieces(list)).await;
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = serde_json::from_str(&body_of(r).await).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["system_fingerprint"], "fam@1");
        assert_eq!(v["choices"][0]["message"]["content"], "ab");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["total_tokens"], 5);

        let r = respond(meta, true, pieces(vec![target, text(0, "a"), done(0)])).await;
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let body = body_of(r).await;
        let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 3, "{body}");
        let first: Value = serde_json::from_str(&events[0]["data: ".len()..]).unwrap();
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["system_fingerprint"], "fam@1");
        assert_eq!(first["choices"][0]["delta"]["content"], "a");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        let last: Value = serde_json::from_str(&events[1]["data: ".len()..]).unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(last["usage"]["completion_tokens"], 2);
        assert_eq!(events[2], "data: [DONE]");
    }

    #[tokio::test]
    async fn choices_are_gathered_by_index_and_usage_summed() {
        let o = options(r#"{"prompt": "x", "n": 2, "temperature": 1}"#);
        let meta = Meta::new(Kind::Completion, "m", &o);
        let list = vec![text(0, "a"), done(0), text(1, "b"), text(1, "c"), done(1)];
        let v: Value =
            serde_json::from_str(&body_of(respond(meta.clone(), false, pieces(list)).await).await)
                .unwrap();
        assert_eq!(v["choices"][0]["text"], "a");
        assert_eq!(v["choices"][1]["text"], "bc");
        assert_eq!(v["choices"][1]["index"], 1);
        assert_eq!(v["usage"]["completion_tokens"], 4);
        assert_eq!(v["usage"]["prompt_tokens"], 3);
        // Greedy: one generation under every index.
        let mut sent = Vec::new();
        run_choices(
            3,
            true,
            &mut |p| {
                sent.push(p);
                true
            },
            |i, send| {
                assert_eq!(i, 0, "greedy choices are generated once");
                send(text(0, "t")) && send(done(0))
            },
        );
        assert_eq!(sent.len(), 6);
        let (tx, rx) = mpsc::unbounded_channel();
        for p in sent {
            tx.send(p).unwrap();
        }
        drop(tx);
        let meta = Meta { n: 3, ..meta };
        let v: Value =
            serde_json::from_str(&body_of(respond(meta, false, rx).await).await).unwrap();
        let texts: Vec<&str> = (0..3)
            .map(|i| v["choices"][i]["text"].as_str().unwrap())
            .collect();
        assert_eq!(texts, ["t", "t", "t"]);
    }

    #[tokio::test]
    async fn failures_have_the_openai_error_shape() {
        let o = options(r#"{"prompt": "x"}"#);
        let meta = Meta::new(Kind::Completion, "m", &o);
        let e = ApiError::invalid_value("max_tokens", "max_tokens too large");
        let r = respond(meta.clone(), false, pieces(vec![Piece::Failed(e.clone())])).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let v: Value = serde_json::from_str(&body_of(r).await).unwrap();
        assert_eq!(v["error"]["message"], "max_tokens too large");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "max_tokens");
        assert_eq!(v["error"]["code"], "invalid_value");
        // A stream that fails before its first text is an HTTP error too.
        let r = respond(meta, true, pieces(vec![Piece::Failed(e)])).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);

        let e = parse::<CompletionRequest>(b"{\"prompt\": 5}", "a string `prompt`").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("a string `prompt`"), "{}", e.message);
    }

    fn refused(json: &str) -> ApiError {
        let r: CompletionRequest = serde_json::from_str(json).unwrap();
        r.check().unwrap_err()
    }

    #[test]
    fn requests_are_checked() {
        for (json, param) in [
            (r#"{"prompt": "x", "max_tokens": -5}"#, "max_tokens"),
            (r#"{"prompt": "x", "max_tokens": 0}"#, "max_tokens"),
            (r#"{"prompt": "x", "temperature": 2.5}"#, "temperature"),
            (r#"{"prompt": "x", "top_p": 0}"#, "top_p"),
            (r#"{"prompt": "x", "n": 0}"#, "n"),
            (r#"{"prompt": "x", "n": 17}"#, "n"),
            (
                r#"{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}"#,
                "stop",
            ),
            (r#"{"prompt": "x", "stop": ""}"#, "stop"),
            (r#"{"prompt": "x", "logprobs": 6}"#, "logprobs"),
            (r#"{"prompt": "x", "echo": true}"#, "echo"),
            (
                r#"{"prompt": "x", "presence_penalty": 0.5}"#,
                "presence_penalty",
            ),
            (r#"{"prompt": [1, 2]}"#, "prompt"),
        ] {
            let e = refused(json);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{json}");
            assert_eq!(e.param.as_deref(), Some(param), "{json}: {}", e.message);
        }
        let o = options(
            r#"{"prompt": ["x"], "stop": "\n", "n": 2, "logprobs": 0, "max_tokens": 100000}"#,
        );
        assert_eq!(o.stop, ["\n"]);
        assert_eq!((o.n, o.logprobs, o.max_tokens), (2, Some(0), Some(100000)));

        let chat = |json: &str| serde_json::from_str::<ChatRequest>(json).unwrap().check();
        let e = chat(r#"{"messages": []}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = chat(r#"{"messages": [{"role": "wizard", "content": "hi"}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        assert!(e.message.contains("wizard"), "{}", e.message);
        let e = chat(
            r#"{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_completion_tokens"));
        let e = chat(r#"{"messages": [{"role": "user", "content": "hi"}], "tools": [{}]}"#)
            .unwrap_err();
        assert_eq!(e.code, Some("unsupported_parameter"));
        let o = chat(r#"{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 2}"#)
            .unwrap();
        assert_eq!(o.logprobs, Some(2));
    }

    #[test]
    fn stop_sequences_match_across_pieces_and_hold_back_only_what_could_match() {
        let mut m = StopMatcher::new(vec!["return".into(), "\n\n".into()]);
        assert_eq!(m.push("x = 1"), ("x = 1".into(), false));
        assert_eq!(m.push("\n  re"), ("\n  ".into(), false));
        assert_eq!(m.push("tu"), (String::new(), false));
        assert_eq!(m.push("rn y"), (String::new(), true));
        let mut m = StopMatcher::new(vec!["return".into()]);
        assert_eq!(m.push("ret"), (String::new(), false));
        assert_eq!(m.push("ry"), ("retry".into(), false));
        assert_eq!(m.push("re"), (String::new(), false));
        assert_eq!(m.finish(), "re");
        // Multi-byte text is cut on character boundaries.
        let mut m = StopMatcher::new(vec!["éa".into()]);
        assert_eq!(m.push("xé"), ("x".into(), false));
        assert_eq!(m.push("b"), ("éb".into(), false));
        // The earliest match wins, whatever the order of the list.
        let mut m = StopMatcher::new(vec!["cd".into(), "b".into()]);
        assert_eq!(m.push("abcd"), ("a".into(), true));
    }

    #[test]
    fn logprobs_follow_the_text_that_goes_out() {
        let lp = |t: &str| TokenLogprob {
            token: t.into(),
            logprob: -1.0,
            top: Vec::new(),
            offset: 0,
        };
        let tokens = |p: Option<Piece>| match p {
            Some(Piece::Text { text, logprobs, .. }) => (
                text,
                logprobs
                    .iter()
                    .map(|l| (l.token.clone(), l.offset))
                    .collect::<Vec<_>>(),
            ),
            _ => (String::new(), Vec::new()),
        };
        let mut c = Choice::new(0, &["END".to_string()]);
        assert_eq!(
            tokens(c.push("ab", Some(lp("ab"))).0),
            ("ab".into(), vec![("ab".into(), 0)])
        );
        // "E" could start the stop sequence: held back with its token.
        assert_eq!(
            tokens(c.push("E", Some(lp("E"))).0),
            (String::new(), vec![])
        );
        assert_eq!(
            tokens(c.push("x", Some(lp("x"))).0),
            ("Ex".into(), vec![("E".into(), 2), ("x".into(), 3)])
        );
        let (p, stopped) = c.push("yEN", Some(lp("yEN")));
        assert_eq!(tokens(p), ("y".into(), vec![("yEN".into(), 4)]));
        assert!(!stopped);
        let (p, stopped) = c.push("D", Some(lp("D")));
        assert!(stopped);
        assert_eq!(
            tokens(p),
            (String::new(), vec![]),
            "the stop's own tokens are dropped"
        );
        assert!(c.finish().is_none());
    }

    #[test]
    fn chat_templates_render_or_fall_back_to_chatml() {
        let msgs: Vec<ChatMessage> = serde_json::from_str(
            r#"[{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]"#,
        )
        .unwrap();
        assert_eq!(
            render_chat(None, "", "", &msgs).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let template = "{% for m in messages %}\n  [{{ m.role | upper }}] {{ m.content.strip() }}\n{% endfor %}\n{{ bos_token }}{% if add_generation_prompt %}>{% endif %}";
        assert_eq!(
            render_chat(Some(template), "<s>", "</s>", &msgs).unwrap(),
            "  [SYSTEM] Be brief.\n  [USER] hi\n<s>>"
        );
        let strict = "{% if messages[0].role == 'system' %}{{ raise_exception('no system messages') }}{% endif %}";
        let e = render_chat(Some(strict), "", "", &msgs).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("no system messages"), "{}", e.message);
        let e = render_chat(Some("{% for %}"), "", "", &msgs).unwrap_err();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
