//! The component glue: `tandem:drafter` exports over the state machine, and the draft model
//! as a wasi:nn graph.

use std::cell::RefCell;

use tandem_core::sampling::SamplingParams;

use tandem_core::protocol::{Outcome, Verify, VerifyResult};

use crate::machine::{self, Action, Channel, Config, DraftModel, Event, Machine, Strategy, Warm};

wit_bindgen::generate!({
    path: "../wit",
    world: "drafter",
    generate_all,
});

use exports::tandem::drafter::session_api as api;
use wasi::nn::graph;
use wasi::nn::inference::GraphExecutionContext;
use wasi::nn::tensor::{Tensor, TensorType};

/// The draft model behind wasi:nn.
struct NnModel {
    name: String,
    ctx: Option<(graph::Graph, GraphExecutionContext)>,
}

fn nn_err(what: &str, e: wasi::nn::errors::Error) -> String {
    format!("wasi:nn {what}: {:?}: {}", e.code(), e.data())
}

impl NnModel {
    fn ctx(&mut self) -> Result<&GraphExecutionContext, String> {
        if self.ctx.is_none() {
            let g = graph::load_by_name(&self.name)
                .map_err(|e| nn_err(&format!("load-by-name `{}`", self.name), e))?;
            let c = g
                .init_execution_context()
                .map_err(|e| nn_err("init-execution-context", e))?;
            self.ctx = Some((g, c));
        }
        Ok(&self.ctx.as_ref().unwrap().1)
    }
}

impl DraftModel for NnModel {
    fn forward(
        &mut self,
        tokens: &[u32],
        pos: usize,
        want_logits: bool,
    ) -> Result<(u32, Option<Vec<f32>>), String> {
        let ctx = self.ctx()?;
        let data: Vec<u8> = tokens
            .iter()
            .flat_map(|t| (*t as i32).to_le_bytes())
            .collect();
        let mut inputs = vec![
            (
                "tokens".to_string(),
                Tensor::new(&[tokens.len() as u32], TensorType::I32, &data),
            ),
            (
                "pos".to_string(),
                Tensor::new(&[1], TensorType::I64, &(pos as i64).to_le_bytes()),
            ),
        ];
        if want_logits {
            inputs.push((
                "logits".to_string(),
                Tensor::new(&[1], TensorType::U8, &[1]),
            ));
        }
        let outputs = ctx.compute(inputs).map_err(|e| nn_err("compute", e))?;
        let mut argmax = None;
        let mut logits = None;
        for (name, t) in outputs {
            let bytes = t.data();
            match name.as_str() {
                "argmax" if bytes.len() >= 4 => {
                    argmax = Some(i32::from_le_bytes(bytes[..4].try_into().unwrap()) as u32)
                }
                "logits" => {
                    logits = Some(
                        bytes
                            .chunks_exact(4)
                            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                            .collect(),
                    )
                }
                _ => {}
            }
        }
        let argmax = argmax.ok_or("the wasi:nn graph returned no `argmax` output")?;
        Ok((argmax, logits))
    }
}

struct Component;

struct Session {
    machine: RefCell<Machine<NnModel>>,
    /// Test builds only (`--features hostile`): misbehave on purpose so the host's limits
    /// can be tested. The model name picks how.
    #[cfg(feature = "hostile")]
    hostile: String,
}

impl api::Guest for Component {
    type Session = Session;
}

// The WIT records and the machine's types (tandem-core's where they exist): every
// conversion between them is here.

impl From<Action> for api::Action {
    fn from(a: Action) -> Self {
        match a {
            Action::Send(b) => api::Action::Send(b.into()),
            Action::Emit(t) => api::Action::Emit(t),
            Action::Wait => api::Action::Wait,
            Action::Done => api::Action::Done,
        }
    }
}

impl From<Verify> for api::Block {
    fn from(b: Verify) -> Self {
        api::Block {
            round: b.round,
            pos: b.pos,
            prev: b.prev,
            tokens: b.tokens,
            q: b.q,
        }
    }
}

impl From<api::VerifyResult> for VerifyResult {
    fn from(r: api::VerifyResult) -> Self {
        VerifyResult {
            round: r.round,
            accepted: r.accepted,
            outcome: match r.token {
                Some(t) => Outcome::Token(t),
                None => Outcome::Residual(r.residual),
            },
            verify_us: 0,
        }
    }
}

impl From<api::ChannelSample> for Channel {
    fn from(c: api::ChannelSample) -> Self {
        Channel {
            rtt_ms: c.rtt_ms as f64,
            bandwidth_bps: c.bandwidth_bps as f64,
            verify_ms: c.verify_ms as f64,
            draft_ms: c.draft_ms as f64,
            energy_j: c.energy_j as f64,
        }
    }
}

impl From<api::Event> for Event {
    fn from(ev: api::Event) -> Self {
        match ev {
            api::Event::First(t) => Event::First(t),
            api::Event::Verdict(r) => Event::Result(r.into()),
            api::Event::Hint((round, tokens)) => Event::Hint(round, tokens),
            api::Event::Channel(c) => Event::Channel(c.into()),
            api::Event::Warm(w) => Event::Warm(Warm {
                draft_ms: w.draft_ms as f64,
                rtt_ms: w.rtt_ms as f64,
                verify_ms: w
                    .verify_ms
                    .into_iter()
                    .map(|(n, ms)| (n as usize, ms as f64))
                    .collect(),
                acceptance: w
                    .acceptance
                    .into_iter()
                    .map(|(a, t)| (a as f64, t as f64))
                    .collect(),
            }),
        }
    }
}

impl From<api::Config> for Config {
    fn from(c: api::Config) -> Self {
        Config {
            params: SamplingParams {
                temperature: c.temperature,
                top_p: c.top_p,
                seed: c.seed,
            },
            max_tokens: c.max_tokens as usize,
            eos: c.eos,
            strategy: match c.strategy {
                api::Strategy::Tandem => Strategy::Tandem,
                api::Strategy::Sync => Strategy::Sync,
                api::Strategy::CloudAr => Strategy::CloudAr,
            },
            pipeline: c.pipeline,
            hints: c.hints,
            fixed_gamma: c.fixed_gamma.map(|g| g as usize),
            max_draft: c.max_draft as usize,
            energy_budget: c.energy_budget.map(f64::from),
        }
    }
}

impl From<machine::Stats> for api::Stats {
    fn from(s: machine::Stats) -> Self {
        api::Stats {
            rounds: s.rounds,
            drafted: s.drafted,
            accepted: s.accepted,
            drafted_in_flight: s.drafted_in_flight,
            pipelined_kept: s.pipelined_kept,
            hints: s.hints,
            hints_used: s.hints_used,
            hint_kept: s.hint_kept,
            gamma_counts: s.gamma_counts,
            alpha: s.alpha,
        }
    }
}

impl api::GuestSession for Session {
    fn new(c: api::Config) -> Self {
        #[cfg(feature = "hostile")]
        let hostile = c.model.clone();
        let model = NnModel {
            name: c.model.clone(),
            ctx: None,
        };
        let cfg = Config::from(c);
        Session {
            machine: RefCell::new(Machine::new(model, cfg)),
            #[cfg(feature = "hostile")]
            hostile,
        }
    }

    fn prefill(&self, prompt: Vec<u32>) -> Result<(), String> {
        self.machine.borrow_mut().prefill(&prompt)
    }

    fn handle(&self, ev: api::Event) -> Result<(), String> {
        self.machine.borrow_mut().handle(ev.into())
    }

    fn step(&self) -> Result<Vec<api::Action>, String> {
        #[cfg(feature = "hostile")]
        match self.hostile.as_str() {
            "hostile-loop" => loop {
                std::hint::black_box(0u8);
            },
            "hostile-alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            // Returns no action, ever.
            "hostile-spin" => return Ok(Vec::new()),
            // Opens execution contexts (each a KV cache on the host) until refused.
            "hostile-contexts" => {
                let g =
                    graph::load_by_name(&self.hostile).map_err(|e| nn_err("load-by-name", e))?;
                let mut hoard = Vec::new();
                loop {
                    hoard.push(
                        g.init_execution_context()
                            .map_err(|e| nn_err("init-execution-context", e))?,
                    );
                }
            }
            // Keeps creating 4 MiB tensors (host copies of its bytes) until refused.
            "hostile-tensors" => {
                let bytes = vec![0u8; 4 << 20];
                let mut hoard = Vec::new();
                loop {
                    hoard.push(Tensor::new(&[4 << 20], TensorType::U8, &bytes));
                }
            }
            // One compute far longer than the session could need, or a KV cache grown a
            // block at a time until the host refuses.
            "hostile-long" | "hostile-kv" => {
                let block = if self.hostile == "hostile-long" {
                    100_000
                } else {
                    640
                };
                let mut m = NnModel {
                    name: self.hostile.clone(),
                    ctx: None,
                };
                let mut pos = 0;
                loop {
                    m.forward(&vec![1; block], pos, false)?;
                    pos += block;
                }
            }
            _ => {}
        }
        #[allow(unused_mut)]
        let mut actions = self.machine.borrow_mut().step()?;
        // Emits ids the verifier did not commit.
        #[cfg(feature = "hostile")]
        if self.hostile == "hostile-flip" {
            for a in &mut actions {
                if let Action::Emit(tokens) = a {
                    tokens.iter_mut().for_each(|t| *t ^= 1);
                }
            }
        }
        Ok(actions.into_iter().map(api::Action::from).collect())
    }

    fn stats(&self) -> api::Stats {
        self.machine.borrow().stats().into()
    }
}

export!(Component);
