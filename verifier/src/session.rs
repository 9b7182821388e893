//! One generation session on the verifier: the target's KV cache, the committed history and
//! the acceptance RNG. Synchronous; the server runs it on a blocking thread and feeds it
//! messages in order.

use std::sync::Arc;
use std::time::Instant;

use tandem_core::accept::{judge, judge_argmax, judge_top};
use tandem_core::protocol::{ErrorCode, Outcome, ServerMsg, Verify, VerifyResult};
use tandem_core::sampling::{Rng, SamplingParams, sample};
use tandem_models::{KvPrecision, Rows};

use crate::batch::{Seq, Work};

use crate::metrics::Metrics;
use crate::registry::{Target, TargetUse};

/// Limits that apply to every session.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Concurrent sessions on the server (stream sessions and completions together).
    pub max_sessions: usize,
    /// Longest context (prompt + generated) of a session; capped by the model's own.
    pub max_context: usize,
    /// Tokens one session may generate.
    pub max_tokens: usize,
    /// Longest draft block.
    pub max_draft: usize,
    /// Entries in a rejection's top-K.
    pub top_k: usize,
    /// Largest frame the server decodes.
    pub max_frame: usize,
    /// A session with no message for this long is closed.
    pub idle_timeout: std::time::Duration,
    /// A session is closed this long after it opened, busy or not (the device resumes in a
    /// new session by re-sending its history).
    pub max_session_time: std::time::Duration,
    /// Messages of one session read ahead of its worker; beyond this the server stops
    /// reading the stream and HTTP/2 flow control holds the client back.
    pub inbound_queue: usize,
    /// A hint is sent only when the exit's top probability exceeds this at every position
    /// the hint covers (0 sends every hint).
    pub hint_confidence: f32,
    /// How sessions' KV caches store keys and values (f16 halves their memory).
    pub kv_cache: KvPrecision,
    /// Whether the sessions of a target share forwards (the batch scheduler); off, each
    /// session runs its own forwards on its own thread.
    pub batching: bool,
    /// Rows (tokens of all sessions together) one batched forward takes at most.
    pub max_batch_tokens: usize,
    /// Prompts are run in chunks of this many tokens, each queued behind other sessions'
    /// rounds.
    pub prefill_chunk: usize,
    /// Sessions that may wait for a free place when `max_sessions` are open (more are
    /// refused with Busy at once).
    pub queue: usize,
    /// How long a session waits in that queue before it is refused with Busy.
    pub queue_timeout: std::time::Duration,
    /// Bytes the KV caches of all sessions may reserve together (each session reserves its
    /// whole context at Hello); `None`: no cap.
    pub kv_memory: Option<usize>,
    /// Whether a device's sampling rounds read back each position's top entries and
    /// normalizer (computed there) rather than whole rows of logits; off, whole rows (for
    /// comparison: the same verdicts).
    pub top_rows: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 64,
            max_context: 4096,
            max_tokens: 2048,
            max_draft: 32,
            top_k: 32,
            max_frame: tandem_core::protocol::MAX_FRAME,
            idle_timeout: std::time::Duration::from_secs(300),
            max_session_time: std::time::Duration::from_secs(3600),
            inbound_queue: 64,
            hint_confidence: 0.0,
            kv_cache: KvPrecision::F32,
            batching: true,
            max_batch_tokens: 256,
            prefill_chunk: 32,
            queue: 64,
            queue_timeout: std::time::Duration::from_secs(30),
            kv_memory: None,
            top_rows: true,
        }
    }
}

/// A failure to report to the client as an `Error` message.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionError {
    /// Error code.
    pub code: ErrorCode,
    /// What was wrong and what to do.
    pub message: String,
}

impl SessionError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        SessionError {
            code,
            message: message.into(),
        }
    }

    /// The error as a wire message.
    pub fn to_msg(&self) -> ServerMsg {
        ServerMsg::Error {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

fn bad(message: impl Into<String>) -> SessionError {
    SessionError::new(ErrorCode::BadRequest, message)
}

fn model_error(e: tandem_models::Error) -> SessionError {
    use tandem_models::Error as E;
    match e {
        E::TokenOutOfRange { .. } => SessionError::new(ErrorCode::BadRequest, e.to_string()),
        E::ContextExceeded { .. } => SessionError::new(ErrorCode::LimitExceeded, e.to_string()),
        other => SessionError::new(ErrorCode::Internal, format!("target model failed: {other}")),
    }
}

/// The verifier's state for one session.
pub struct Session {
    target: TargetUse,
    /// Made at the prompt (a device's allocation can fail, and that is the prompt's error).
    cache: Option<Seq>,
    /// Committed tokens; when `pending` is set the last one is a placeholder for the
    /// correction the client samples.
    history: Vec<u32>,
    pending: Option<Vec<u32>>,
    params: SamplingParams,
    rng: Rng,
    limits: Limits,
    max_context: usize,
    max_tokens: usize,
    generated: usize,
    prefilled: bool,
    metrics: Arc<Metrics>,
    /// KV cache bytes last counted in the metrics.
    kv_counted: usize,
}

impl Session {
    /// A session on `target`. `max_tokens` is what the client asked for (capped by the
    /// server's limit).
    pub fn new(
        target: Arc<Target>,
        params: SamplingParams,
        max_tokens: usize,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Self {
        let max_context = limits.max_context.min(target.model.config().context_length);
        Session {
            target: target.enter(),
            cache: None,
            history: Vec::new(),
            pending: None,
            rng: Rng::new(params.seed),
            params,
            limits,
            max_context,
            max_tokens: max_tokens.min(limits.max_tokens),
            generated: 0,
            prefilled: false,
            metrics,
            kv_counted: 0,
        }
    }

    /// KV cache bytes a session of `max_context` positions on `target` can reach.
    /// (A device keeps keys and values in f32 whatever `precision` says.)
    pub fn kv_bytes_for(target: &Target, max_context: usize, precision: KvPrecision) -> usize {
        let c = target.model.config();
        let per_value = match precision {
            _ if target.backend.is_some() => 4,
            KvPrecision::F32 => 4,
            KvPrecision::F16 => 2,
        };
        2 * target.model.cache_layers() * c.kv_dim() * per_value * max_context
    }

    /// Brings the metrics' KV memory in use up to date with this session's cache.
    fn count_kv(&mut self) {
        let now = self.cache.as_ref().map_or(0, Seq::size_bytes);
        self.metrics
            .add_kv_bytes(now as i64 - self.kv_counted as i64);
        self.kv_counted = now;
    }

    /// The target this session runs on.
    pub fn target(&self) -> &Arc<Target> {
        &self.target.0
    }

    /// Context length this session may reach.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Tokens this session may generate.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Runs the prompt and returns the first generated token.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<u32, SessionError> {
        if self.prefilled {
            return Err(bad(
                "Prefill was already sent; a session has one prompt (open a new session to resume)",
            ));
        }
        if tokens.is_empty() {
            return Err(bad("Prefill needs at least one token"));
        }
        if tokens.len() + 1 > self.max_context {
            return Err(SessionError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "prompt of {} tokens leaves no room in this session's context of {}",
                    tokens.len(),
                    self.max_context
                ),
            ));
        }
        if self.max_tokens == 0 {
            return Err(SessionError::new(
                ErrorCode::LimitExceeded,
                "max_tokens is 0: nothing to generate",
            ));
        }
        let target = self.target.0.clone();
        let cache = match &mut self.cache {
            Some(c) => c,
            None => self
                .cache
                .insert(target.sequence(&self.limits).map_err(model_error)?),
        };
        let logits = target.prefill(cache, tokens, &self.limits, &self.metrics);
        self.count_kv();
        let logits = logits.map_err(model_error)?;
        let first = sample(logits.last(), &self.params, &mut self.rng);
        self.history = tokens.to_vec();
        self.history.push(first);
        self.generated = 1;
        self.prefilled = true;
        self.metrics.add_generated(&target.id(), 1);
        Ok(first)
    }

    /// Verifies one block; `hint` receives the early-exit predictions as soon as the exit
    /// layer has been computed.
    pub fn verify(
        &mut self,
        v: &Verify,
        mut hint: Box<dyn FnMut(ServerMsg) + Send>,
    ) -> Result<VerifyResult, SessionError> {
        if !self.prefilled {
            return Err(bad("Verify before Prefill: send the prompt first"));
        }
        let pos = v.pos as usize;
        if pos != self.history.len() {
            return Err(bad(format!(
                "Verify round {} starts at position {pos}, but the session has {} committed \
                 tokens: the block must start right after them",
                v.round,
                self.history.len()
            )));
        }
        match &self.pending {
            Some(ids) if !ids.contains(&v.prev) => {
                return Err(bad(format!(
                    "correction token {} at position {} is not among the top-K ids sent",
                    v.prev,
                    pos - 1
                )));
            }
            None if self.history[pos - 1] != v.prev => {
                return Err(bad(format!(
                    "prev token {} differs from the committed token {} at position {}",
                    v.prev,
                    self.history[pos - 1],
                    pos - 1
                )));
            }
            _ => {}
        }
        let gamma = v.tokens.len();
        if gamma > self.limits.max_draft {
            return Err(SessionError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "draft of {gamma} tokens exceeds this server's limit of {}",
                    self.limits.max_draft
                ),
            ));
        }
        if self.generated >= self.max_tokens {
            return Err(SessionError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "the session has generated its {} tokens (max_tokens); open a new session",
                    self.max_tokens
                ),
            ));
        }
        if pos + gamma + 1 > self.max_context {
            return Err(SessionError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "a block of {gamma} at position {pos} would pass this session's context of {} tokens",
                    self.max_context
                ),
            ));
        }
        let started = Instant::now();
        let target = self.target.0.clone();
        let mut input = Vec::with_capacity(gamma + 1);
        input.push(v.prev);
        input.extend_from_slice(&v.tokens);
        // No hint for a round without drafts: nothing to redirect, and the exit's output
        // head would cost time.
        let exit = if gamma > 0 {
            target.early_exit_layer
        } else {
            0
        };
        let round = v.round;
        let confidence = self.limits.hint_confidence;
        let drafts = v.tokens.clone();
        let on_exit: crate::batch::ExitSink = Box::new(move |e| {
            // The exit's prediction up to its first disagreement with the drafts (or
            // through the bonus position): all the client uses, and on the CPU each row
            // costs an output-head product. With a confidence threshold the hint is sent
            // only when the exit is sure of every token in it.
            let mut tokens = Vec::with_capacity(drafts.len() + 1);
            for i in 0..e.rows() {
                let Some((t, p)) = e.best(i, confidence > 0.0) else {
                    return;
                };
                if confidence > 0.0 && p <= confidence {
                    return;
                }
                tokens.push(t);
                if drafts.get(i) != Some(&t) {
                    break;
                }
            }
            hint(ServerMsg::Hint { round, tokens });
        });
        // A device computes what a sampling round needs of each row (p's normalizer and top
        // entries) where the logits are, when the residual's top-K fits in them.
        use tandem_models::backend::{TOP_ROWS_MAX_K, TOP_ROWS_MAX_TOKENS};
        let top = (!self.params.is_greedy()
            && self.limits.top_rows
            && self.limits.top_k <= TOP_ROWS_MAX_K
            && input.len() <= TOP_ROWS_MAX_TOKENS)
            .then_some(self.params.temperature);
        let work = Work {
            tokens: &input,
            pos: pos - 1,
            rows: Rows::All,
            logits: !self.params.is_greedy(),
            top,
            exit,
            on_exit: Some(on_exit),
            prompt: false,
        };
        let cache = self.cache.as_mut().expect("made at the prompt");
        let block = target.forward(cache, work, &self.limits, &self.metrics);
        let block = block.map_err(|e| {
            self.count_kv();
            model_error(e)
        })?;
        let verdict = match &block.logits {
            _ if !block.top.is_empty() => {
                let seq = self.cache.as_mut().expect("made at the prompt");
                judge_top(
                    &v.tokens,
                    &v.q,
                    &block.top,
                    &self.params,
                    &mut self.rng,
                    self.limits.top_k,
                    |i| match &block.logits {
                        Some(l) => Ok(l.row(i).to_vec()),
                        None => seq.row(i),
                    },
                )
                .map_err(|e| {
                    self.count_kv();
                    model_error(e)
                })?
            }
            Some(logits) => judge(
                &v.tokens,
                &v.q,
                |i| logits.row(i),
                &self.params,
                &mut self.rng,
                self.limits.top_k,
            ),
            // A device read back each position's best token only (greedy).
            None => judge_argmax(&v.tokens, |i| block.rows[i].token),
        };
        let n = verdict.accepted;
        self.history.truncate(pos);
        self.history[pos - 1] = v.prev;
        self.history.extend_from_slice(&v.tokens[..n]);
        match &verdict.outcome {
            Outcome::Token(t) => {
                self.history.push(*t);
                self.pending = None;
            }
            Outcome::Residual(top) => {
                self.history.push(u32::MAX);
                self.pending = Some(top.iter().map(|e| e.0).collect());
            }
        }
        if let Some(c) = self.cache.as_mut() {
            c.truncate(pos + n);
        }
        self.count_kv();
        self.generated += n + 1;
        let took = started.elapsed();
        self.metrics.record_round(&target.id(), gamma, n, took);
        Ok(VerifyResult {
            round,
            accepted: n as u32,
            outcome: verdict.outcome,
            verify_us: took.as_micros().min(u32::MAX as u128) as u32,
        })
    }

    /// Bytes held by this session's KV cache.
    pub fn cache_bytes(&self) -> usize {
        self.cache.as_ref().map_or(0, Seq::size_bytes)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.metrics.add_kv_bytes(-(self.kv_counted as i64));
    }
}
