//! The session wire format: length-prefixed binary frames, one message each.
//!
//! ```text
//! frame   = len:var  version:u8  type:u8  body      (len counts version, type and body)
//! ```
//!
//! `var` is an unsigned LEB128 varint (7 bits per byte, low bits first); token ids,
//! positions, rounds and counts are varints, so a greedy round costs a few dozen bytes.
//! Fixed-size integers and floats are little-endian. The full format, message by message, is in
//! `docs/protocol.md`. Decoding never panics: a short buffer asks for more bytes, and every
//! malformed frame (unknown type, wrong version, oversized length, bad counts, trailing
//! bytes, invalid UTF-8, non-finite probabilities) is a [`ProtocolError`].

use crate::sampling::SamplingParams;

/// The protocol version this build speaks.
pub const VERSION: u8 = 3;

/// Largest frame (after the length prefix) a decoder accepts by default: 1 MiB.
pub const MAX_FRAME: usize = 1 << 20;

/// Size of a fingerprint on the wire (SHA-256).
pub const FINGERPRINT_LEN: usize = 32;

/// A malformed or unexpected frame.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    /// The stream ended in the middle of a frame.
    #[error("truncated frame: {have} of {need} bytes arrived before the stream ended")]
    Truncated {
        /// Bytes the frame needs.
        need: usize,
        /// Bytes that arrived.
        have: usize,
    },
    /// The length prefix exceeds the decoder's limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// Declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame was written by another protocol version.
    #[error("protocol version {got} is not supported (this side speaks version {want})")]
    Version {
        /// Version in the frame.
        got: u8,
        /// Version spoken here.
        want: u8,
    },
    /// The message type byte is not one this side receives.
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    /// The body does not match its message type.
    #[error("malformed {message} message: {reason}")]
    Malformed {
        /// Message type name.
        message: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The drafter's backbone, when it shares one with its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackboneClaim {
    /// Blocks in the backbone.
    pub layers: u32,
    /// Backbone fingerprint over those blocks.
    pub fingerprint: [u8; FINGERPRINT_LEN],
}

/// Opens a session.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    /// Tokenizer fingerprint of the drafter (the target must tokenize identically).
    pub tokenizer: [u8; FINGERPRINT_LEN],
    /// Backbone the drafter shares with its target, if any.
    pub backbone: Option<BackboneClaim>,
    /// The target to use: a family (its newest compatible version) or `family@version`;
    /// `None` takes any compatible one.
    pub family: Option<String>,
    /// Sampling parameters: the seed is the verifier's acceptance RNG's (and the client's
    /// sampler's).
    pub sampling: SamplingParams,
    /// Tokens the client will generate at most.
    pub max_tokens: u32,
    /// Bearer token, when the server requires one and the HTTP header does not carry it.
    pub token: Option<String>,
}

/// A block of draft tokens to verify.
#[derive(Debug, Clone, PartialEq)]
pub struct Verify {
    /// Client-chosen round number, echoed in `Hint` and `Result`.
    pub round: u32,
    /// Position of the first draft token (= the committed length).
    pub pos: u32,
    /// The last committed token, at `pos - 1` (after a rejection it is the correction the
    /// client sampled, which the server has not seen).
    pub prev: u32,
    /// Draft tokens; may be empty (one plain decoding step: cloud autoregressive).
    pub tokens: Vec<u32>,
    /// q(x_i): the drafter's probability of each draft token (1.0 when greedy).
    pub q: Vec<f32>,
}

/// Client → server messages.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMsg {
    /// Opens the session.
    Hello(Hello),
    /// The prompt (or, to resume, the whole history).
    Prefill(Vec<u32>),
    /// A draft block.
    Verify(Verify),
    /// Drops a round whose verification has not started.
    Cancel(u32),
    /// Ends the session.
    Close,
}

/// What the server grants a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Target family.
    pub family: String,
    /// Target version.
    pub version: String,
    /// Layer whose predictions come as `Hint`s (0 = no hints).
    pub early_exit_layer: u32,
    /// Longest context (prompt + generated) the session may reach.
    pub max_context: u32,
    /// Tokens the session may generate.
    pub max_tokens: u32,
    /// Longest draft block.
    pub max_draft: u32,
    /// Entries in a rejection's top-K.
    pub top_k: u32,
    /// The drafter the server recommends for this target, `name@version` (empty: none;
    /// see `tandem-verifier --drafters`).
    pub drafter: String,
}

/// How a verified round ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The next committed token: the bonus token when every draft was accepted, or under
    /// greedy decoding the target's token at the first rejected position.
    Token(u32),
    /// Sampling, a draft was rejected: the top-K `(id, p)` of the target distribution at
    /// that position, most likely first; the client samples the correction from
    /// norm(max(0, p − q)) with its own q.
    Residual(Vec<(u32, f32)>),
}

/// The verdict on one round.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyResult {
    /// Round number from `Verify`.
    pub round: u32,
    /// Draft tokens accepted (a prefix of the block).
    pub accepted: u32,
    /// What follows the accepted prefix.
    pub outcome: Outcome,
    /// The verifier's time for the round (forward and judging), microseconds: lets the
    /// client tell the link's round trip from the verifier's work.
    pub verify_us: u32,
}

/// Error codes of [`ServerMsg::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// A frame could not be decoded.
    Malformed = 1,
    /// A message came at the wrong time or with wrong fields.
    BadRequest = 2,
    /// Missing or wrong bearer token.
    Unauthorized = 3,
    /// No loaded target fits the drafter's fingerprints.
    Incompatible = 4,
    /// A session or server limit was reached.
    LimitExceeded = 5,
    /// The server is at its session limit; retry later.
    Busy = 6,
    /// The model failed.
    Internal = 7,
    /// The session reached the server's maximum session time; the device continues in a new
    /// session by re-sending its history.
    Expired = 8,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Option<Self> {
        use ErrorCode::*;
        Some(match v {
            1 => Malformed,
            2 => BadRequest,
            3 => Unauthorized,
            4 => Incompatible,
            5 => LimitExceeded,
            6 => Busy,
            7 => Internal,
            8 => Expired,
            _ => return None,
        })
    }
}

/// Server → client messages.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMsg {
    /// The session is open.
    Accepted(Accepted),
    /// The first generated token, after `Prefill`.
    First(u32),
    /// The early-exit layer's predictions for a block's positions, sent before the block's
    /// verification finishes.
    Hint {
        /// Round number.
        round: u32,
        /// Predicted token at each verified position (draft length + 1).
        tokens: Vec<u32>,
    },
    /// A round's verdict.
    Result(VerifyResult),
    /// The session failed; the server closes it after this.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// What was wrong and what to do.
        message: String,
    },
}

mod ty {
    pub const HELLO: u8 = 0x01;
    pub const PREFILL: u8 = 0x02;
    pub const VERIFY: u8 = 0x03;
    pub const CANCEL: u8 = 0x04;
    pub const CLOSE: u8 = 0x05;
    pub const ACCEPTED: u8 = 0x81;
    pub const FIRST: u8 = 0x82;
    pub const HINT: u8 = 0x83;
    pub const RESULT: u8 = 0x84;
    pub const ERROR: u8 = 0x85;
}

/// A message that can be framed.
pub trait Message: Sized {
    /// Appends this message as one frame to `out`.
    fn encode(&self, out: &mut Vec<u8>);
    /// Decodes one frame body of type `ty`.
    fn decode_body(ty: u8, body: &mut Reader<'_>) -> Result<Self, ProtocolError>;

    /// This message as one frame.
    fn to_frame(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

struct Writer<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
}

impl<'a> Writer<'a> {
    fn frame(out: &'a mut Vec<u8>, ty: u8) -> Self {
        let start = out.len();
        out.push(VERSION);
        out.push(ty);
        Writer { out, start }
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.out.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A varint.
    fn u32(&mut self, v: u32) -> &mut Self {
        put_var(self.out, v);
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn f32(&mut self, v: f32) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.out.extend_from_slice(v);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u32(s.len() as u32).bytes(s.as_bytes())
    }
    fn opt_str(&mut self, s: &Option<String>) -> &mut Self {
        match s {
            Some(s) => self.u8(1).str(s),
            None => self.u8(0),
        }
    }
    fn tokens(&mut self, t: &[u32]) -> &mut Self {
        self.u32(t.len() as u32);
        for &v in t {
            self.u32(v);
        }
        self
    }
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        let mut len = Vec::with_capacity(5);
        put_var(&mut len, (self.out.len() - self.start) as u32);
        self.out.splice(self.start..self.start, len);
    }
}

/// Appends `v` as an unsigned LEB128 varint (1–5 bytes).
fn put_var(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a varint at the start of `buf`: `Ok(None)` if `buf` ends inside it, else the value
/// and the bytes it used; an error if it runs past 5 bytes or past `u32::MAX`.
fn get_var(buf: &[u8]) -> Result<Option<(u32, usize)>, String> {
    let mut v: u64 = 0;
    for (i, &b) in buf.iter().enumerate() {
        if i == 5 {
            return Err("varint longer than 5 bytes".into());
        }
        v |= ((b & 0x7f) as u64) << (7 * i);
        if b & 0x80 == 0 {
            return u32::try_from(v)
                .map(|v| Some((v, i + 1)))
                .map_err(|_| format!("varint {v} exceeds u32"));
        }
    }
    if buf.len() >= 5 {
        return Err("varint longer than 5 bytes".into());
    }
    Ok(None)
}

/// Reads the fields of one frame body; every read checks the remaining length.
pub struct Reader<'a> {
    buf: &'a [u8],
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn err(&self, reason: impl Into<String>) -> ProtocolError {
        ProtocolError::Malformed {
            message: self.message,
            reason: reason.into(),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.err(format!(
                "needs {n} more bytes, {} left in the frame",
                self.buf.len()
            )));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    /// A varint.
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        match get_var(self.buf) {
            Ok(Some((v, used))) => {
                self.buf = &self.buf[used..];
                Ok(v)
            }
            Ok(None) => Err(self.err("the frame ends inside a number")),
            Err(e) => Err(self.err(e)),
        }
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn f32(&mut self) -> Result<f32, ProtocolError> {
        Ok(f32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn fingerprint(&mut self) -> Result<[u8; FINGERPRINT_LEN], ProtocolError> {
        Ok(self.take(FINGERPRINT_LEN)?.try_into().unwrap())
    }
    /// A count of items of at least `size` bytes each, checked against what is left so a lying
    /// count cannot make the decoder allocate.
    fn count(&mut self, size: usize, what: &str) -> Result<usize, ProtocolError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(size) > self.buf.len() {
            return Err(self.err(format!(
                "{what} count {n} needs {} bytes, {} left in the frame",
                n.saturating_mul(size),
                self.buf.len()
            )));
        }
        Ok(n)
    }
    fn str(&mut self, what: &str) -> Result<String, ProtocolError> {
        let n = self.count(1, what)?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err(format!("{what} is not UTF-8")))
    }
    fn opt_str(&mut self, what: &str) -> Result<Option<String>, ProtocolError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.str(what)?)),
            f => Err(self.err(format!("{what} presence flag is {f}, not 0 or 1"))),
        }
    }
    fn tokens(&mut self, what: &str) -> Result<Vec<u32>, ProtocolError> {
        let n = self.count(1, what)?;
        (0..n).map(|_| self.u32()).collect()
    }
    fn prob(&mut self, what: &str) -> Result<f32, ProtocolError> {
        let p = self.f32()?;
        if !(p.is_finite() && (0.0..=1.0).contains(&p)) {
            return Err(self.err(format!("{what} {p} is not a probability in [0, 1]")));
        }
        Ok(p)
    }
    fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.err(format!("{} trailing bytes", self.buf.len())))
        }
    }
}

impl Message for ClientMsg {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ClientMsg::Hello(h) => {
                let mut w = Writer::frame(out, ty::HELLO);
                w.bytes(&h.tokenizer);
                match &h.backbone {
                    Some(b) => w.u8(1).u32(b.layers).bytes(&b.fingerprint),
                    None => w.u8(0),
                };
                w.opt_str(&h.family)
                    .f32(h.sampling.temperature)
                    .f32(h.sampling.top_p)
                    .u64(h.sampling.seed)
                    .u32(h.max_tokens)
                    .opt_str(&h.token);
            }
            ClientMsg::Prefill(t) => {
                Writer::frame(out, ty::PREFILL).tokens(t);
            }
            ClientMsg::Verify(v) => {
                let mut w = Writer::frame(out, ty::VERIFY);
                w.u32(v.round).u32(v.pos).u32(v.prev).tokens(&v.tokens);
                // Greedy drafts have q = 1 everywhere: one byte says so.
                if v.q.iter().all(|&q| q == 1.0) {
                    w.u8(0);
                } else {
                    w.u8(1);
                    for &q in &v.q {
                        w.f32(q);
                    }
                }
            }
            ClientMsg::Cancel(round) => {
                Writer::frame(out, ty::CANCEL).u32(*round);
            }
            ClientMsg::Close => {
                Writer::frame(out, ty::CLOSE);
            }
        }
    }

    fn decode_body(t: u8, r: &mut Reader<'_>) -> Result<Self, ProtocolError> {
        let msg = match t {
            ty::HELLO => {
                r.message = "Hello";
                let tokenizer = r.fingerprint()?;
                let backbone = match r.u8()? {
                    0 => None,
                    1 => Some(BackboneClaim {
                        layers: r.u32()?,
                        fingerprint: r.fingerprint()?,
                    }),
                    f => return Err(r.err(format!("backbone presence flag is {f}"))),
                };
                let family = r.opt_str("family")?;
                let temperature = r.f32()?;
                let top_p = r.f32()?;
                let seed = r.u64()?;
                let max_tokens = r.u32()?;
                let token = r.opt_str("token")?;
                ClientMsg::Hello(Hello {
                    tokenizer,
                    backbone,
                    family,
                    sampling: SamplingParams {
                        temperature,
                        top_p,
                        seed,
                    },
                    max_tokens,
                    token,
                })
            }
            ty::PREFILL => {
                r.message = "Prefill";
                ClientMsg::Prefill(r.tokens("token")?)
            }
            ty::VERIFY => {
                r.message = "Verify";
                let round = r.u32()?;
                let pos = r.u32()?;
                let prev = r.u32()?;
                let tokens = r.tokens("draft token")?;
                let q = match r.u8()? {
                    0 => vec![1.0; tokens.len()],
                    1 => (0..tokens.len())
                        .map(|_| r.prob("q"))
                        .collect::<Result<_, _>>()?,
                    k => return Err(r.err(format!("q kind {k} is neither 0 nor 1"))),
                };
                ClientMsg::Verify(Verify {
                    round,
                    pos,
                    prev,
                    tokens,
                    q,
                })
            }
            ty::CANCEL => {
                r.message = "Cancel";
                ClientMsg::Cancel(r.u32()?)
            }
            ty::CLOSE => ClientMsg::Close,
            other => return Err(ProtocolError::UnknownType(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

impl Message for ServerMsg {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ServerMsg::Accepted(a) => {
                Writer::frame(out, ty::ACCEPTED)
                    .str(&a.family)
                    .str(&a.version)
                    .u32(a.early_exit_layer)
                    .u32(a.max_context)
                    .u32(a.max_tokens)
                    .u32(a.max_draft)
                    .u32(a.top_k)
                    .str(&a.drafter);
            }
            ServerMsg::First(t) => {
                Writer::frame(out, ty::FIRST).u32(*t);
            }
            ServerMsg::Hint { round, tokens } => {
                Writer::frame(out, ty::HINT).u32(*round).tokens(tokens);
            }
            ServerMsg::Result(res) => {
                let mut w = Writer::frame(out, ty::RESULT);
                w.u32(res.round).u32(res.accepted).u32(res.verify_us);
                match &res.outcome {
                    Outcome::Token(t) => {
                        w.u8(0).u32(*t);
                    }
                    Outcome::Residual(top) => {
                        w.u8(1).u32(top.len() as u32);
                        for &(id, p) in top {
                            w.u32(id).f32(p);
                        }
                    }
                }
            }
            ServerMsg::Error { code, message } => {
                Writer::frame(out, ty::ERROR).u16(*code as u16).str(message);
            }
        }
    }

    fn decode_body(t: u8, r: &mut Reader<'_>) -> Result<Self, ProtocolError> {
        let msg = match t {
            ty::ACCEPTED => {
                r.message = "Accepted";
                ServerMsg::Accepted(Accepted {
                    family: r.str("family")?,
                    version: r.str("version")?,
                    early_exit_layer: r.u32()?,
                    max_context: r.u32()?,
                    max_tokens: r.u32()?,
                    max_draft: r.u32()?,
                    top_k: r.u32()?,
                    drafter: r.str("drafter")?,
                })
            }
            ty::FIRST => {
                r.message = "First";
                ServerMsg::First(r.u32()?)
            }
            ty::HINT => {
                r.message = "Hint";
                ServerMsg::Hint {
                    round: r.u32()?,
                    tokens: r.tokens("hint token")?,
                }
            }
            ty::RESULT => {
                r.message = "Result";
                let round = r.u32()?;
                let accepted = r.u32()?;
                let verify_us = r.u32()?;
                let outcome = match r.u8()? {
                    0 => Outcome::Token(r.u32()?),
                    1 => {
                        let n = r.count(5, "top-K entry")?;
                        let top = (0..n)
                            .map(|_| Ok((r.u32()?, r.prob("p")?)))
                            .collect::<Result<_, ProtocolError>>()?;
                        Outcome::Residual(top)
                    }
                    k => return Err(r.err(format!("outcome kind {k} is neither 0 nor 1"))),
                };
                ServerMsg::Result(VerifyResult {
                    round,
                    accepted,
                    outcome,
                    verify_us,
                })
            }
            ty::ERROR => {
                r.message = "Error";
                let raw = r.u16()?;
                let code = ErrorCode::from_u16(raw)
                    .ok_or_else(|| r.err(format!("unknown error code {raw}")))?;
                ServerMsg::Error {
                    code,
                    message: r.str("message")?,
                }
            }
            other => return Err(ProtocolError::UnknownType(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// Decodes the frame at the start of `buf`: `Ok(None)` when more bytes are needed,
/// otherwise the message and the bytes it used.
pub fn decode<M: Message>(buf: &[u8], max: usize) -> Result<Option<(M, usize)>, ProtocolError> {
    let (len, head) = match get_var(buf) {
        Ok(Some((len, head))) => (len as usize, head),
        Ok(None) => return Ok(None),
        Err(reason) => {
            return Err(ProtocolError::Malformed {
                message: "frame",
                reason: format!("length prefix: {reason}"),
            });
        }
    };
    if len > max {
        return Err(ProtocolError::Oversized { len, max });
    }
    if len < 2 {
        return Err(ProtocolError::Malformed {
            message: "frame",
            reason: format!("length {len} leaves no room for version and type"),
        });
    }
    if buf.len() < head + len {
        return Ok(None);
    }
    let frame = &buf[head..head + len];
    if frame[0] != VERSION {
        return Err(ProtocolError::Version {
            got: frame[0],
            want: VERSION,
        });
    }
    let mut r = Reader {
        buf: &frame[2..],
        message: "frame",
    };
    Ok(Some((M::decode_body(frame[1], &mut r)?, head + len)))
}

/// Splits a byte stream into messages.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            max,
        }
    }

    /// Appends bytes that arrived.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if one has arrived.
    pub fn next_message<M: Message>(&mut self) -> Result<Option<M>, ProtocolError> {
        match decode::<M>(&self.buf, self.max)? {
            Some((msg, used)) => {
                self.buf.drain(..used);
                Ok(Some(msg))
            }
            None => Ok(None),
        }
    }

    /// Call when the stream has ended: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let need = match get_var(&self.buf) {
            Ok(Some((len, head))) => head + len as usize,
            _ => self.buf.len() + 1,
        };
        Err(ProtocolError::Truncated {
            need,
            have: self.buf.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `inner` (version, type, body) framed with its varint length.
    fn reframe(inner: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        put_var(&mut f, inner.len() as u32);
        f.extend_from_slice(inner);
        f
    }

    /// A frame without its length prefix.
    fn inner(f: &[u8]) -> &[u8] {
        let (_, head) = get_var(f).unwrap().unwrap();
        &f[head..]
    }

    #[test]
    fn varints_round_trip_at_every_width() {
        for v in [0, 1, 127, 128, 16_383, 16_384, 151_935, 2_097_152, u32::MAX] {
            let mut b = Vec::new();
            put_var(&mut b, v);
            let width = match v {
                0..=127 => 1,
                128..=16_383 => 2,
                16_384..=2_097_151 => 3,
                2_097_152..=268_435_455 => 4,
                _ => 5,
            };
            assert_eq!(b.len(), width, "{v}");
            assert_eq!(get_var(&b), Ok(Some((v, width))));
            for cut in 0..b.len() {
                assert_eq!(get_var(&b[..cut]), Ok(None));
            }
        }
        assert!(get_var(&[0x80; 6]).is_err());
        assert!(get_var(&[0xff, 0xff, 0xff, 0xff, 0x1f]).is_err()); // 2^35 - 1
    }

    #[test]
    fn a_greedy_round_is_a_few_dozen_bytes() {
        // Qwen-sized ids: two bytes below 16384, three above.
        let verify = ClientMsg::Verify(Verify {
            round: 40,
            pos: 300,
            prev: 151_000,
            tokens: vec![13, 1000, 20_000, 262],
            q: vec![1.0; 4],
        })
        .to_frame();
        // len, version, type, round 1, pos 2, prev 3, count 1, ids 1+2+3+2, q kind 1.
        assert_eq!(verify.len(), 3 + 1 + 2 + 3 + 1 + 8 + 1);
        let result = ServerMsg::Result(VerifyResult {
            round: 40,
            accepted: 4,
            outcome: Outcome::Token(5000),
            verify_us: 250_000,
        })
        .to_frame();
        assert_eq!(result.len(), 3 + 1 + 1 + 3 + 1 + 2);
    }

    fn client_samples() -> Vec<ClientMsg> {
        vec![
            ClientMsg::Hello(Hello {
                tokenizer: [7; 32],
                backbone: Some(BackboneClaim {
                    layers: 12,
                    fingerprint: [9; 32],
                }),
                family: Some("smollm2".into()),
                sampling: SamplingParams {
                    temperature: 0.7,
                    top_p: 0.9,
                    seed: u64::MAX - 3,
                },
                max_tokens: 128,
                token: Some("sécret".into()),
            }),
            ClientMsg::Hello(Hello {
                tokenizer: [0; 32],
                backbone: None,
                family: None,
                sampling: SamplingParams {
                    temperature: 0.0,
                    top_p: 1.0,
                    seed: 0,
                },
                max_tokens: 0,
                token: None,
            }),
            ClientMsg::Prefill(vec![1, 2, 3, u32::MAX]),
            ClientMsg::Prefill(vec![]),
            ClientMsg::Verify(Verify {
                round: 3,
                pos: 17,
                prev: 5,
                tokens: vec![4, 5, 6],
                q: vec![0.5, 1.0, 0.0],
            }),
            ClientMsg::Verify(Verify {
                round: 0,
                pos: 1,
                prev: 2,
                tokens: vec![],
                q: vec![],
            }),
            ClientMsg::Cancel(9),
            ClientMsg::Close,
        ]
    }

    fn server_samples() -> Vec<ServerMsg> {
        vec![
            ServerMsg::Accepted(Accepted {
                family: "qwen2.5-coder".into(),
                version: "2".into(),
                early_exit_layer: 21,
                max_context: 4096,
                max_tokens: 512,
                max_draft: 16,
                top_k: 32,
                drafter: "coder-drafter@1.2.0".into(),
            }),
            ServerMsg::First(42),
            ServerMsg::Hint {
                round: 2,
                tokens: vec![1, 2],
            },
            ServerMsg::Result(VerifyResult {
                round: 2,
                accepted: 4,
                outcome: Outcome::Token(77),
                verify_us: 1234,
            }),
            ServerMsg::Result(VerifyResult {
                round: 3,
                accepted: 1,
                outcome: Outcome::Residual(vec![(5, 0.5), (6, 0.25)]),
                verify_us: 0,
            }),
            ServerMsg::Error {
                code: ErrorCode::Incompatible,
                message: "no target".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_alone_and_in_a_stream() {
        let mut stream = Vec::new();
        for m in client_samples() {
            let f = m.to_frame();
            assert_eq!(
                decode::<ClientMsg>(&f, MAX_FRAME).unwrap(),
                Some((m, f.len()))
            );
            stream.extend(f);
        }
        for m in server_samples() {
            let f = m.to_frame();
            assert_eq!(
                decode::<ServerMsg>(&f, MAX_FRAME).unwrap(),
                Some((m, f.len()))
            );
        }
        // Byte by byte through the stream decoder.
        let mut d = FrameDecoder::new(MAX_FRAME);
        let mut got = Vec::new();
        for b in stream {
            d.push(&[b]);
            while let Some(m) = d.next_message::<ClientMsg>().unwrap() {
                got.push(m);
            }
        }
        d.finish().unwrap();
        assert_eq!(got, client_samples());
    }

    #[test]
    fn every_truncation_of_every_frame_waits_then_reports_truncated() {
        for m in client_samples() {
            let f = m.to_frame();
            for cut in 0..f.len() {
                assert_eq!(decode::<ClientMsg>(&f[..cut], MAX_FRAME).unwrap(), None);
                let mut d = FrameDecoder::new(MAX_FRAME);
                d.push(&f[..cut]);
                assert_eq!(d.next_message::<ClientMsg>().unwrap(), None);
                let truncated = matches!(d.finish(), Err(ProtocolError::Truncated { .. }));
                assert!(cut == 0 || truncated, "cut at {cut}");
            }
        }
    }

    #[test]
    fn a_body_cut_short_inside_its_length_is_malformed() {
        // Shorten the body but fix up the length prefix: the frame is complete but its
        // fields run out.
        for m in client_samples() {
            let f = m.to_frame();
            let body = inner(&f);
            for cut in 2..body.len() {
                let g = reframe(&body[..cut]);
                let r = decode::<ClientMsg>(&g, MAX_FRAME);
                assert!(
                    matches!(r, Err(ProtocolError::Malformed { .. })),
                    "{m:?} cut at {cut}: {r:?}"
                );
            }
        }
    }

    #[test]
    fn malformed_frames_are_errors() {
        let good = ClientMsg::Cancel(1).to_frame();
        assert_eq!(good, [3, VERSION, ty::CANCEL, 1]);
        // Unknown type, and a server type sent to the server.
        for t in [0x00, 0x06, 0x7f, 0x81, 0xff] {
            let mut f = good.clone();
            f[2] = t;
            assert_eq!(
                decode::<ClientMsg>(&f, MAX_FRAME),
                Err(ProtocolError::UnknownType(t))
            );
        }
        // Wrong version.
        let mut f = good.clone();
        f[1] = 9;
        assert_eq!(
            decode::<ClientMsg>(&f, MAX_FRAME),
            Err(ProtocolError::Version {
                got: 9,
                want: VERSION
            })
        );
        // Oversized length: refused before any body arrives.
        let mut f = Vec::new();
        put_var(&mut f, MAX_FRAME as u32 + 1);
        assert!(matches!(
            decode::<ClientMsg>(&f, MAX_FRAME),
            Err(ProtocolError::Oversized { .. })
        ));
        // A length prefix that never ends, or overflows u32.
        for bad in [&[0x80u8; 5][..], &[0xff, 0xff, 0xff, 0xff, 0x7f]] {
            assert!(matches!(
                decode::<ClientMsg>(bad, MAX_FRAME),
                Err(ProtocolError::Malformed { .. })
            ));
        }
        // A length too short for version and type.
        assert!(decode::<ClientMsg>(&[1, VERSION], MAX_FRAME).is_err());
        // Trailing bytes.
        let mut body = inner(&good).to_vec();
        body.push(0);
        assert!(matches!(
            decode::<ClientMsg>(&reframe(&body), MAX_FRAME),
            Err(ProtocolError::Malformed { .. })
        ));
        // A count that claims more than the frame holds.
        let f = reframe(&[VERSION, ty::PREFILL, 0xff, 0xff, 0xff, 0xff, 0x0f, 1]);
        assert!(matches!(
            decode::<ClientMsg>(&f, MAX_FRAME),
            Err(ProtocolError::Malformed { .. })
        ));
        // A q kind that is neither "all 1" nor "listed".
        let f = reframe(&[VERSION, ty::VERIFY, 0, 1, 0, 1, 7, 2]);
        assert!(matches!(
            decode::<ClientMsg>(&f, MAX_FRAME),
            Err(ProtocolError::Malformed { .. })
        ));
        // q that is not a probability.
        for bad in [f32::NAN, -0.5, 1.5, f32::INFINITY] {
            let f = ClientMsg::Verify(Verify {
                round: 0,
                pos: 1,
                prev: 0,
                tokens: vec![1],
                q: vec![bad],
            })
            .to_frame();
            assert!(decode::<ClientMsg>(&f, MAX_FRAME).is_err(), "{bad}");
        }
        // Invalid UTF-8 in a string.
        let mut f = ServerMsg::Error {
            code: ErrorCode::Internal,
            message: "ab".into(),
        }
        .to_frame();
        let n = f.len();
        f[n - 1] = 0xff;
        assert!(decode::<ServerMsg>(&f, MAX_FRAME).is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = crate::sampling::Rng::new(5);
        for _ in 0..20_000 {
            let n = (rng.next_u64() % 64) as usize;
            let mut buf: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            if buf.len() >= 3 && rng.next_u64().is_multiple_of(2) {
                // Make the header plausible so bodies get exercised.
                buf[0] = (buf.len() - 1) as u8;
                buf[1] = VERSION;
            }
            let _ = decode::<ClientMsg>(&buf, MAX_FRAME);
            let _ = decode::<ServerMsg>(&buf, MAX_FRAME);
        }
    }
}
