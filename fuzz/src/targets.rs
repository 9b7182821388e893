//! The three harnesses: frames, GGUF files, drafter events.

use std::path::PathBuf;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tandem_core::protocol::{
    Accepted, BackboneClaim, ClientMsg, FrameDecoder, Hello, MAX_FRAME, Message, Outcome,
    ServerMsg, Verify, VerifyResult, decode,
};
use tandem_core::sampling::SamplingParams;
use tandem_guest_drafter::machine::{
    Channel, Config, DraftModel, Event, Machine, Strategy as GuestStrategy, Warm,
};

use crate::{Harness, Report, Rng, mutate};

/// The kind of a message, for the report: `Verify`, `Hello`…
fn kind(debug: &str) -> &str {
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or(debug)
}

fn tokens(rng: &mut Rng, max: usize) -> Vec<u32> {
    (0..rng.below(max + 1))
        .map(|_| rng.interesting_u32() % 200_000)
        .collect()
}

fn text(rng: &mut Rng) -> String {
    let pool = ["qwen2.5-coder", "v2", "", "é", "a/b", "x"];
    pool[rng.below(pool.len())].repeat(1 + rng.below(3))
}

fn sampling(rng: &mut Rng) -> SamplingParams {
    SamplingParams {
        temperature: rng.interesting_f32(),
        top_p: rng.interesting_f32(),
        seed: rng.u64(),
    }
}

/// A random, well-formed message of either direction, as a frame.
pub fn message(rng: &mut Rng) -> Vec<u8> {
    if rng.one_in(2) {
        let m = match rng.below(5) {
            0 => ClientMsg::Hello(Hello {
                tokenizer: [rng.u64() as u8; 32],
                backbone: rng.one_in(2).then(|| BackboneClaim {
                    layers: rng.interesting_u32(),
                    fingerprint: [rng.u64() as u8; 32],
                }),
                family: rng.one_in(2).then(|| text(rng)),
                sampling: sampling(rng),
                max_tokens: rng.interesting_u32(),
                token: rng.one_in(2).then(|| text(rng)),
            }),
            1 => ClientMsg::Prefill(tokens(rng, 64)),
            2 => {
                let t = tokens(rng, 16);
                let q = t
                    .iter()
                    .map(|_| rng.interesting_f32().abs().min(1.0))
                    .collect();
                ClientMsg::Verify(Verify {
                    round: rng.interesting_u32(),
                    pos: rng.interesting_u32(),
                    prev: rng.interesting_u32(),
                    tokens: t,
                    q,
                })
            }
            3 => ClientMsg::Cancel(rng.interesting_u32()),
            _ => ClientMsg::Close,
        };
        m.to_frame()
    } else {
        let m = match rng.below(5) {
            0 => ServerMsg::Accepted(Accepted {
                family: text(rng),
                version: text(rng),
                early_exit_layer: rng.interesting_u32(),
                max_context: rng.interesting_u32(),
                max_tokens: rng.interesting_u32(),
                max_draft: rng.interesting_u32(),
                top_k: rng.interesting_u32(),
                drafter: text(rng),
            }),
            1 => ServerMsg::First(rng.interesting_u32()),
            2 => ServerMsg::Hint {
                round: rng.interesting_u32(),
                tokens: tokens(rng, 16),
            },
            3 => ServerMsg::Result(VerifyResult {
                round: rng.interesting_u32(),
                accepted: rng.interesting_u32() % 64,
                outcome: if rng.one_in(2) {
                    Outcome::Token(rng.interesting_u32())
                } else {
                    Outcome::Residual(
                        tokens(rng, 8)
                            .into_iter()
                            .map(|t| (t, rng.interesting_f32().abs().min(1.0)))
                            .collect(),
                    )
                },
                verify_us: rng.interesting_u32(),
            }),
            _ => ServerMsg::Error {
                code: tandem_core::protocol::ErrorCode::Busy,
                message: text(rng),
            },
        };
        m.to_frame()
    }
}

/// Decodes `buf` as `M`; a decoded message must survive re-encoding unchanged.
fn check<M: Message + std::fmt::Debug>(buf: &[u8], side: &str, report: &mut Report) -> bool {
    match decode::<M>(buf, MAX_FRAME) {
        Ok(Some((m, used))) => {
            assert!(
                used <= buf.len(),
                "decoder used {used} of {} bytes",
                buf.len()
            );
            let again = decode::<M>(&m.to_frame(), MAX_FRAME)
                .expect("a decoded message re-encodes to a valid frame")
                .expect("a re-encoded frame is complete")
                .0;
            let (a, b) = (format!("{m:?}"), format!("{again:?}"));
            assert_eq!(a, b, "message changed by a re-encode");
            report.reach(&format!("{side}:{}", kind(&a)));
            true
        }
        _ => false,
    }
}

/// The frame decoder: whole buffers of either direction, and the same bytes as a stream
/// cut into random pieces.
#[derive(Default)]
pub struct Frames {
    corpus: Vec<Vec<u8>>,
}

impl Harness for Frames {
    fn input(&mut self, rng: &mut Rng) -> Vec<u8> {
        let mut data = if self.corpus.is_empty() || rng.one_in(2) {
            let mut d = message(rng);
            if rng.one_in(4) {
                d.extend(message(rng)); // two frames back to back
            }
            d
        } else {
            self.corpus[rng.below(self.corpus.len())].clone()
        };
        if !rng.one_in(8) {
            mutate(rng, &mut data, &self.corpus);
        }
        if self.corpus.len() < 256 {
            self.corpus.push(data.clone());
        } else {
            let i = rng.below(self.corpus.len());
            self.corpus[i] = data.clone();
        }
        data
    }

    fn run(&mut self, input: &[u8], report: &mut Report) -> bool {
        let client = check::<ClientMsg>(input, "client", report);
        let server = check::<ServerMsg>(input, "server", report);
        // The same bytes through the streaming decoder, in pieces.
        let mut dec = FrameDecoder::new(MAX_FRAME);
        let mut seed = input
            .iter()
            .fold(17u64, |h, &b| h.wrapping_mul(31) ^ b as u64);
        let mut at = 0;
        let mut messages = 0;
        'feed: while at < input.len() {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let n = 1 + (seed >> 33) as usize % 64;
            dec.push(&input[at..(at + n).min(input.len())]);
            at += n;
            loop {
                match dec.next_message::<ClientMsg>() {
                    Ok(Some(_)) => messages += 1,
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
                assert!(messages <= input.len(), "more messages than bytes");
            }
        }
        let _ = dec.finish();
        client || server
    }
}

/// The GGUF loader: mutated files of a tiny complete llama model and of one carrying
/// SmolLM2-135M's real metadata (tokenizer arrays included), through `Model::load` and a
/// two-token forward when it loads.
pub struct Gguf {
    corpus: Vec<Vec<u8>>,
    dir: PathBuf,
    n: u64,
}

/// Writes a GGUF of a one-block llama model (hidden 32, 4 heads / 2 KV heads, vocabulary
/// 64) with `metadata` added (it wins over the tiny model's own keys).
fn tiny_model(metadata: &[(String, Value)]) -> anyhow::Result<Vec<u8>> {
    let mut rng = Rng::new(7);
    let mut tensor = |rows: usize, cols: usize, dtype: GgmlDType| -> anyhow::Result<QTensor> {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| (rng.below(2000) as f32 - 1000.0) / 4000.0)
            .collect();
        let t = if rows == 1 {
            Tensor::from_vec(v, cols, &Device::Cpu)?
        } else {
            Tensor::from_vec(v, (rows, cols), &Device::Cpu)?
        };
        Ok(QTensor::quantize(&t, dtype)?)
    };
    let q8 = GgmlDType::Q8_0;
    let f32 = GgmlDType::F32;
    let tensors = vec![
        ("token_embd.weight", tensor(64, 32, f32)?),
        ("output_norm.weight", tensor(1, 32, f32)?),
        ("blk.0.attn_norm.weight", tensor(1, 32, f32)?),
        ("blk.0.attn_q.weight", tensor(32, 32, q8)?),
        ("blk.0.attn_k.weight", tensor(16, 32, q8)?),
        ("blk.0.attn_v.weight", tensor(16, 32, q8)?),
        ("blk.0.attn_output.weight", tensor(32, 32, q8)?),
        ("blk.0.ffn_norm.weight", tensor(1, 32, f32)?),
        ("blk.0.ffn_gate.weight", tensor(64, 32, q8)?),
        ("blk.0.ffn_up.weight", tensor(64, 32, q8)?),
        ("blk.0.ffn_down.weight", tensor(32, 64, q8)?),
    ];
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.embedding_length".into(), Value::U32(32)),
        ("llama.attention.head_count".into(), Value::U32(4)),
        ("llama.attention.head_count_kv".into(), Value::U32(2)),
        ("llama.block_count".into(), Value::U32(1)),
        ("llama.feed_forward_length".into(), Value::U32(64)),
        ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.context_length".into(), Value::U32(64)),
    ];
    for (k, v) in metadata {
        if !k.starts_with("llama.") && k != "general.architecture" {
            md.push((k.clone(), v.clone()));
        }
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md_refs, &t_refs)?;
    Ok(out.into_inner())
}

impl Gguf {
    /// The seed files: the tiny model, and the tiny model with SmolLM2-135M's metadata.
    pub fn new() -> anyhow::Result<Gguf> {
        let real = tandem_models::fetch::resolve("smollm2-135m")?;
        let mut f = std::io::BufReader::new(std::fs::File::open(&real)?);
        let content = gguf_file::Content::read(&mut f)?;
        let mut md: Vec<(String, Value)> = content.metadata.into_iter().collect();
        md.sort_by(|a, b| a.0.cmp(&b.0));
        let dir = std::env::temp_dir().join(format!("tandem-fuzz-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Gguf {
            corpus: vec![tiny_model(&[])?, tiny_model(&md)?],
            dir,
            n: 0,
        })
    }
}

impl Gguf {
    /// The seed files.
    pub fn seeds(&self) -> &[Vec<u8>] {
        &self.corpus
    }
}

impl Drop for Gguf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Harness for Gguf {
    fn input(&mut self, rng: &mut Rng) -> Vec<u8> {
        // Mostly the small file; its header region most of the time.
        let pick = if rng.one_in(6) { 1 } else { 0 };
        let mut data = self.corpus[pick].clone();
        let seeds = self.corpus[..2].to_vec();
        if rng.one_in(4) {
            mutate(rng, &mut data, &seeds);
        } else {
            // Edits confined to the header, where the parser's decisions are.
            let head = data.len().min(if pick == 0 { 1024 } else { 1 << 20 });
            let mut h = data[..head].to_vec();
            mutate(rng, &mut h, &[]);
            data.splice(..head, h);
        }
        data
    }

    fn run(&mut self, input: &[u8], report: &mut Report) -> bool {
        self.n += 1;
        let path = self.dir.join(format!("{}.gguf", self.n % 4));
        std::fs::write(&path, input).expect("writing the fuzz input");
        let loaded = match tandem_models::Model::load(&path) {
            Ok(m) => {
                report.reach("loaded");
                let mut cache = m.new_cache();
                if m.forward(&[1, 2], 0, &mut cache).is_ok() {
                    report.reach("forward");
                }
                true
            }
            Err(e) => {
                report.reach(&format!("error:{}", kind(&format!("{e:?}"))));
                false
            }
        };
        let _ = std::fs::remove_file(&path);
        loaded
    }
}

/// A deterministic draft model: the next token is a hash of the sequence it holds.
struct FakeModel {
    seq: Vec<u32>,
}

impl DraftModel for FakeModel {
    fn forward(
        &mut self,
        tokens: &[u32],
        pos: usize,
        want_logits: bool,
    ) -> Result<(u32, Option<Vec<f32>>), String> {
        if pos > self.seq.len() {
            return Err(format!("gap: pos {pos} > len {}", self.seq.len()));
        }
        self.seq.truncate(pos);
        self.seq.extend_from_slice(tokens);
        let h = self
            .seq
            .iter()
            .fold(7u64, |h, &t| h.wrapping_mul(31).wrapping_add(t as u64));
        let t = (h % 20) as u32;
        let logits =
            want_logits.then(|| (0..20).map(|i| ((i * 7 + h as usize) % 5) as f32).collect());
        Ok((t, logits))
    }
}

/// Reads little values off an input, zeros past its end.
struct Script<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Script<'_> {
    fn u8(&mut self) -> u8 {
        let b = self.bytes.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn coin(&mut self) -> bool {
        self.u8() & 1 == 0
    }
    fn one_in4(&mut self) -> bool {
        self.u8() & 3 == 0
    }
    fn small(&mut self, n: u8) -> u32 {
        (self.u8() % n) as u32
    }
    fn f64(&mut self) -> f64 {
        match self.u8() % 6 {
            0 => f64::NAN,
            1 => f64::INFINITY,
            2 => -1.0,
            3 => 0.0,
            _ => self.u32() as f64 / 1000.0,
        }
    }
    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }
}

/// The drafter's state machine, configured and driven by a script read from the input:
/// steps interleaved with verdicts, hints, first tokens and channel samples that may be
/// out of order, repeated, for unknown rounds, or carry nonsense numbers.
pub struct Guest;

impl Harness for Guest {
    fn input(&mut self, rng: &mut Rng) -> Vec<u8> {
        (0..16 + rng.below(512)).map(|_| rng.u64() as u8).collect()
    }

    fn run(&mut self, input: &[u8], report: &mut Report) -> bool {
        let mut s = Script {
            bytes: input,
            at: 0,
        };
        let greedy = s.coin();
        let cfg = Config {
            params: SamplingParams {
                temperature: if greedy { 0.0 } else { 0.8 },
                top_p: 0.95,
                seed: s.u32() as u64,
            },
            max_tokens: 1 + s.small(64) as usize,
            eos: vec![s.small(24)],
            strategy: [
                GuestStrategy::Tandem,
                GuestStrategy::Sync,
                GuestStrategy::CloudAr,
            ][s.small(3) as usize],
            pipeline: s.coin(),
            hints: s.coin(),
            fixed_gamma: (s.coin()).then(|| s.small(12) as usize),
            max_draft: s.small(17) as usize,
            energy_budget: (s.one_in4()).then(|| s.f64()),
        };
        let mut m = Machine::new(FakeModel { seq: Vec::new() }, cfg);
        let prompt: Vec<u32> = (0..1 + s.small(8)).map(|_| s.small(20)).collect();
        if m.prefill(&prompt).is_err() {
            return false;
        }
        let mut last_round = 0u32;
        while !s.done() {
            let result = match s.u8() % 7 {
                0 | 1 => match m.step() {
                    Ok(actions) => {
                        for a in &actions {
                            if let tandem_guest_drafter::machine::Action::Send(v) = a {
                                last_round = v.round;
                                assert_eq!(v.tokens.len(), v.q.len(), "a block's q per token");
                            }
                            if matches!(a, tandem_guest_drafter::machine::Action::Done) {
                                report.reach("done");
                                return true;
                            }
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                2 => m.handle(Event::First(s.small(24))),
                3 => {
                    let round = if s.one_in4() { s.u32() } else { last_round };
                    let accepted = s.small(20);
                    let outcome = if s.coin() {
                        Outcome::Token(s.small(24))
                    } else {
                        Outcome::Residual(
                            (0..s.small(6))
                                .map(|_| (s.small(24), s.small(100) as f32 / 99.0))
                                .collect(),
                        )
                    };
                    m.handle(Event::Result(VerifyResult {
                        round,
                        accepted,
                        outcome,
                        verify_us: s.u32(),
                    }))
                }
                4 => {
                    let round = if s.one_in4() { s.u32() } else { last_round };
                    let tokens = (0..s.small(20)).map(|_| s.small(24)).collect();
                    m.handle(Event::Hint(round, tokens))
                }
                5 => m.handle(Event::Warm(Warm {
                    draft_ms: s.f64(),
                    rtt_ms: s.f64(),
                    verify_ms: (0..s.small(6))
                        .map(|_| (s.small(40) as usize, s.f64()))
                        .collect(),
                    acceptance: (0..s.small(6)).map(|_| (s.f64(), s.f64())).collect(),
                })),
                _ => m.handle(Event::Channel(Channel {
                    rtt_ms: s.f64(),
                    bandwidth_bps: s.f64(),
                    verify_ms: s.f64(),
                    draft_ms: s.f64(),
                    energy_j: s.f64(),
                })),
            };
            if result.is_err() {
                // The host ends the session on an error; so does the script.
                report.reach("error");
                return false;
            }
        }
        report.reach("ran out");
        false
    }
}
