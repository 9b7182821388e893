//! The drafter's state machine: pipelined drafting, hints, acceptance bookkeeping. Sans-IO:
//! the draft model is a trait (wasi:nn in the component, a fake in the unit tests), and the
//! host delivers events and carries out actions.

use tandem_core::accept::sample_correction;
use tandem_core::protocol::{Outcome, Verify, VerifyResult};
use tandem_core::sampling::{Rng, SamplingParams, distribution, prob_of, sample_from};

use crate::policy::Policy;

/// The draft model as the machine sees it.
pub trait DraftModel {
    /// Appends `tokens` at `pos` (rolling back anything at or after `pos`) and returns the
    /// argmax after the last one, and its logits when `want_logits`.
    fn forward(
        &mut self,
        tokens: &[u32],
        pos: usize,
        want_logits: bool,
    ) -> Result<(u32, Option<Vec<f32>>), String>;
}

/// How the drafter works with the verifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Pipelined drafting, hints, adaptive γ.
    Tandem,
    /// Draft, wait, repeat.
    Sync,
    /// No drafting.
    CloudAr,
}

/// Session parameters.
#[derive(Debug, Clone)]
pub struct Config {
    /// Sampling for drafts and corrections.
    pub params: SamplingParams,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// End-of-sequence tokens.
    pub eos: Vec<u32>,
    /// Strategy.
    pub strategy: Strategy,
    /// Tandem only: draft the next block while one is in flight, assuming full acceptance.
    pub pipeline: bool,
    /// Tandem only: act on early-exit hints (start drafting from the hinted token).
    pub hints: bool,
    /// Fixed γ instead of the policy.
    pub fixed_gamma: Option<usize>,
    /// Longest block.
    pub max_draft: usize,
    /// Joules per token the device may spend drafting.
    pub energy_budget: Option<f64>,
}

/// Link and device measurements from the host.
#[derive(Debug, Clone, Copy, Default)]
pub struct Channel {
    /// ms.
    pub rtt_ms: f64,
    /// bits/s, 0 = unknown.
    pub bandwidth_bps: f64,
    /// ms.
    pub verify_ms: f64,
    /// ms.
    pub draft_ms: f64,
    /// J since the last sample, 0 = unknown.
    pub energy_j: f64,
}

/// What earlier sessions measured (see [`Event::Warm`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Warm {
    /// Mean draft step, ms (0 = unknown).
    pub draft_ms: f64,
    /// Link round trip, ms (0 = unknown).
    pub rtt_ms: f64,
    /// The verifier's mean time by tokens verified: (n, ms).
    pub verify_ms: Vec<(usize, f64)>,
    /// Per draft position: recency-weighted (accepted, judged) counts.
    pub acceptance: Vec<(f64, f64)>,
}

/// What the host delivers.
#[derive(Debug, Clone)]
pub enum Event {
    /// The verifier's first token.
    First(u32),
    /// A block's verdict.
    Result(VerifyResult),
    /// Early-exit predictions for a round.
    Hint(u32, Vec<u32>),
    /// Measurements.
    Channel(Channel),
    /// What earlier sessions with the same drafter, target version and link measured;
    /// at most once, before `First`.
    Warm(Warm),
}

/// What the guest asks of the host.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send a block to verify.
    Send(Verify),
    /// Show committed tokens.
    Emit(Vec<u32>),
    /// Wait for the next event.
    Wait,
    /// Generation finished.
    Done,
}

/// Counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Blocks sent.
    pub rounds: u32,
    /// Draft tokens sent.
    pub drafted: u32,
    /// Draft tokens accepted.
    pub accepted: u32,
    /// Draft steps run while a block was in flight.
    pub drafted_in_flight: u32,
    /// Drafts kept because a result matched the pipelined assumption.
    pub pipelined_kept: u32,
    /// Hints received.
    pub hints: u32,
    /// Hints that redirected drafting.
    pub hints_used: u32,
    /// Hint-started drafts kept because the result agreed.
    pub hint_kept: u32,
    /// Histogram of γ.
    pub gamma_counts: Vec<u32>,
    /// Acceptance estimate.
    pub alpha: f32,
}

#[derive(Debug, Clone)]
struct Draft {
    token: u32,
    q: f32,
    /// The drafter's distribution at this position (sampling only), for corrections.
    dist: Option<Vec<(u32, f32)>>,
}

#[derive(Debug)]
struct InFlight {
    round: u32,
    drafts: Vec<Draft>,
    /// What drafting assumes the round will commit: the whole block without a hint, or
    /// the hint's prediction (accepted prefix + next token).
    assumed: Vec<u32>,
    /// Whether `assumed` came from a hint.
    from_hint: bool,
    /// The prediction of a hint that disagreed with what drafting assumed, scored against
    /// the verdict.
    contested: Option<Vec<u32>>,
}

/// How much one contested hint weighs against older ones.
const HINT_DECAY: f64 = 0.9;

/// The drafter.
pub struct Machine<M: DraftModel> {
    model: M,
    cfg: Config,
    rng: Rng,
    prompt_len: usize,
    committed: Vec<u32>,
    started: bool,
    done: bool,
    inflight: Option<InFlight>,
    /// Drafts beyond `committed` (and beyond the in-flight round's assumed tokens).
    ahead: Vec<Draft>,
    /// Leading tokens of the drafting sequence held in the draft model's cache.
    cache_valid: usize,
    next_round: u32,
    /// γ chosen for the next block.
    next_gamma: Option<usize>,
    policy: Policy,
    /// Decayed counts of contested hints that the verdict proved right, and of all
    /// contested hints: an exit layer that is wrong more often than the drafter must not
    /// redirect drafting.
    hint_right: f64,
    hint_trials: f64,
    /// Draft steps since the last channel sample (its energy covers them).
    steps_since_sample: usize,
    stats: Stats,
    out: Vec<Action>,
}

impl<M: DraftModel> Machine<M> {
    /// A machine drafting with `model`.
    pub fn new(model: M, cfg: Config) -> Self {
        let rng = Rng::new(cfg.params.seed ^ 0x5eed_d7a1_7e55_0001);
        let stats = Stats {
            gamma_counts: vec![0; cfg.max_draft + 1],
            ..Stats::default()
        };
        Machine {
            model,
            cfg,
            rng,
            prompt_len: 0,
            committed: Vec::new(),
            started: false,
            done: false,
            inflight: None,
            ahead: Vec::new(),
            cache_valid: 0,
            next_round: 0,
            next_gamma: None,
            policy: Policy::default(),
            hint_right: 0.0,
            hint_trials: 0.0,
            steps_since_sample: 0,
            stats,
            out: Vec::new(),
        }
    }

    /// The draft model (tests inspect it).
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Runs the prompt through the draft model.
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<(), String> {
        if !self.committed.is_empty() {
            return Err("prefill was already called".into());
        }
        if prompt.is_empty() {
            return Err("the prompt is empty".into());
        }
        if self.cfg.strategy != Strategy::CloudAr {
            self.model.forward(prompt, 0, false)?;
            self.cache_valid = prompt.len();
        }
        self.committed = prompt.to_vec();
        self.prompt_len = prompt.len();
        Ok(())
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.alpha = self.policy.alpha() as f32;
        s
    }

    /// Delivers an event.
    pub fn handle(&mut self, ev: Event) -> Result<(), String> {
        match ev {
            Event::First(t) => {
                if self.started {
                    return Err("first token delivered twice".into());
                }
                if self.committed.is_empty() {
                    return Err("first token before prefill".into());
                }
                self.started = true;
                self.commit(&[t]);
            }
            Event::Channel(c) => {
                let p = &mut self.policy;
                if c.rtt_ms > 0.0 {
                    p.rtt_ms = c.rtt_ms;
                }
                if c.verify_ms > 0.0 {
                    // The sample comes with the verdict of the round in flight.
                    match &self.inflight {
                        Some(f) => p.observe_verify(f.drafts.len() + 1, c.verify_ms),
                        None => p.verify_ms = c.verify_ms,
                    }
                }
                if c.draft_ms > 0.0 {
                    p.draft_ms = c.draft_ms;
                }
                p.bandwidth_bps = c.bandwidth_bps.max(0.0);
                if c.energy_j > 0.0 && self.steps_since_sample > 0 {
                    p.step_joules = c.energy_j / self.steps_since_sample as f64;
                }
                self.steps_since_sample = 0;
            }
            Event::Hint(round, tokens) => self.hint(round, &tokens),
            Event::Warm(w) => {
                if self.started {
                    return Err("warm start after the first token".into());
                }
                self.policy.warm(&w)?;
            }
            Event::Result(v) => self.result(v)?,
        }
        Ok(())
    }

    fn hint(&mut self, round: u32, h: &[u32]) {
        // Drafting ahead from a hint only pays when the next block will have drafts.
        let next_gamma = self.gammas().1;
        let Some(f) = self.inflight.as_mut() else {
            return;
        };
        if f.round != round || self.cfg.strategy != Strategy::Tandem {
            return;
        }
        self.stats.hints += 1;
        if !self.cfg.hints || next_gamma == 0 {
            return;
        }
        // The hint runs up to its first disagreement with the drafts, or through the bonus
        // position when it agrees with all of them.
        let gamma = f.drafts.len();
        if h.is_empty() || h.len() > gamma + 1 {
            return;
        }
        let upto = (h.len() - 1).min(gamma);
        let n = (0..upto)
            .find(|&i| h[i] != f.drafts[i].token)
            .unwrap_or(upto);
        let mut predicted: Vec<u32> = f.drafts[..n].iter().map(|d| d.token).collect();
        predicted.push(h[n]);
        // What drafting currently assumes follows the committed tokens.
        let current: Vec<u32> = f
            .assumed
            .iter()
            .copied()
            .chain(self.ahead.iter().map(|d| d.token))
            .collect();
        if predicted.len() >= f.assumed.len() && current.starts_with(&predicted) {
            // The hint agrees with the work already done: keep it all.
            let extra = predicted.len() - f.assumed.len();
            f.assumed = predicted;
            self.ahead.drain(..extra);
            f.from_hint = true;
        } else {
            f.contested = Some(predicted.clone());
            // Follow the hint only while contested hints have been right more often than
            // not (a prior of one right in two trials).
            let trust = (self.hint_right + 1.0) / (self.hint_trials + 2.0);
            if trust > 0.5 {
                self.stats.hints_used += 1;
                let common = common_prefix(&current, &predicted);
                f.assumed = predicted;
                self.ahead.clear();
                let base = self.committed.len();
                self.cache_valid = self.cache_valid.min(base + common);
                f.from_hint = true;
            }
        }
    }

    fn result(&mut self, v: VerifyResult) -> Result<(), String> {
        let Some(f) = self.inflight.take() else {
            return Err(format!(
                "result for round {} with no block in flight",
                v.round
            ));
        };
        if f.round != v.round {
            return Err(format!(
                "result for round {} while round {} is in flight",
                v.round, f.round
            ));
        }
        let gamma = f.drafts.len();
        let n = v.accepted as usize;
        if n > gamma {
            return Err(format!("{n} of {gamma} drafts accepted"));
        }
        let next = match v.outcome {
            Outcome::Token(t) => t,
            Outcome::Residual(top) => {
                if top.is_empty() {
                    return Err("a result with neither a token nor a residual".into());
                }
                let dist = f.drafts.get(n).and_then(|d| d.dist.as_ref());
                let q = |id: u32| dist.map_or(0.0, |d| prob_of(d, id));
                sample_correction(&top, q, &mut self.rng)
            }
        };
        self.stats.accepted += n as u32;
        self.policy.observe_round(gamma, n);
        let mut actual: Vec<u32> = f.drafts[..n].iter().map(|d| d.token).collect();
        actual.push(next);
        if let Some(hint) = &f.contested {
            self.hint_trials = self.hint_trials * HINT_DECAY + 1.0;
            self.hint_right = self.hint_right * HINT_DECAY + f64::from(actual.starts_with(hint));
        }
        let assumed: Vec<u32> = f
            .assumed
            .iter()
            .copied()
            .chain(self.ahead.iter().map(|d| d.token))
            .collect();
        let base = self.committed.len();
        if actual.len() >= f.assumed.len() && assumed.starts_with(&actual) {
            // Pipelined (or hint-started) drafts survive: drop the ones now committed.
            let consumed = actual.len() - f.assumed.len();
            self.ahead.drain(..consumed);
            if f.from_hint {
                self.stats.hint_kept += self.ahead.len() as u32;
            } else {
                self.stats.pipelined_kept += self.ahead.len() as u32;
            }
        } else {
            let common = common_prefix(&assumed, &actual);
            self.ahead.clear();
            self.cache_valid = self.cache_valid.min(base + common);
        }
        self.commit(&actual);
        Ok(())
    }

    /// Appends committed tokens, emitting them up to max tokens / end of sequence.
    fn commit(&mut self, tokens: &[u32]) {
        let mut emit = Vec::new();
        for &t in tokens {
            if self.done {
                break;
            }
            self.committed.push(t);
            if self.cfg.eos.contains(&t) {
                self.done = true;
                break;
            }
            emit.push(t);
            if self.committed.len() - self.prompt_len >= self.cfg.max_tokens {
                self.done = true;
            }
        }
        if !emit.is_empty() {
            self.out.push(Action::Emit(emit));
        }
    }

    /// The tokens drafting continues from: committed, then the in-flight round's assumed
    /// tokens, then the drafts ahead.
    fn sequence(&self) -> Vec<u32> {
        let mut s = self.committed.clone();
        if let Some(f) = &self.inflight {
            s.extend_from_slice(&f.assumed);
        }
        s.extend(self.ahead.iter().map(|d| d.token));
        s
    }

    /// One forward of the draft model: appends one draft to `ahead`.
    fn draft_one(&mut self) -> Result<(), String> {
        let seq = self.sequence();
        let mut from = self.cache_valid.min(seq.len());
        if from == seq.len() {
            from -= 1; // re-feed the last token to get its prediction
        }
        let greedy = self.cfg.params.is_greedy();
        let (argmax, logits) = self.model.forward(&seq[from..], from, !greedy)?;
        self.cache_valid = seq.len();
        self.steps_since_sample += 1;
        let d = if greedy {
            Draft {
                token: argmax,
                q: 1.0,
                dist: None,
            }
        } else {
            let logits = logits.ok_or("the draft model returned no logits")?;
            let dist = distribution(&logits, &self.cfg.params);
            let token = sample_from(&dist, &mut self.rng);
            let q = prob_of(&dist, token);
            Draft {
                token,
                q,
                dist: Some(dist),
            }
        };
        if self.inflight.is_some() {
            self.stats.drafted_in_flight += 1;
        }
        self.ahead.push(d);
        Ok(())
    }

    /// The block sizes to send next: `(fresh, warm)`, fresh when no drafts ahead survived
    /// the last result, warm while they did (see [`Policy::pipelined_rate`]).
    fn gammas(&self) -> (usize, usize) {
        let max = self.cfg.max_draft;
        let left = self
            .cfg
            .max_tokens
            .saturating_sub(self.committed.len() - self.prompt_len);
        let (fresh, warm) = match (self.cfg.strategy, self.cfg.fixed_gamma) {
            (Strategy::CloudAr, _) => (0, 0),
            (_, Some(g)) => (g.min(max), g.min(max)),
            (Strategy::Sync, None) => self.policy.plan(max, false, self.cfg.energy_budget),
            (Strategy::Tandem, None) => {
                let overlap = self.cfg.pipeline || self.cfg.hints;
                self.policy.plan(max, overlap, self.cfg.energy_budget)
            }
        };
        // No point drafting past the end.
        let cap = left.saturating_sub(1);
        (fresh.min(cap), warm.min(cap))
    }

    /// At most one draft step, then the actions for the host. An empty list means "call
    /// `step` again".
    pub fn step(&mut self) -> Result<Vec<Action>, String> {
        let mut actions = std::mem::take(&mut self.out);
        if self.done {
            actions.push(Action::Done);
            return Ok(actions);
        }
        if !self.started {
            actions.push(Action::Wait);
            return Ok(actions);
        }
        if self.inflight.is_none() {
            let gamma = match self.next_gamma {
                Some(g) => g,
                None => {
                    // Drafts that survived the last result go out as a warm block;
                    // otherwise the pipe is empty and a fresh block refills it.
                    let (fresh, warm) = self.gammas();
                    let g = if self.ahead.len() >= warm {
                        warm
                    } else {
                        fresh.max(self.ahead.len())
                    };
                    self.next_gamma = Some(g);
                    g
                }
            };
            if self.ahead.len() >= gamma {
                self.next_gamma = None;
                actions.push(Action::Send(self.send_block(gamma)));
                return Ok(actions);
            }
            self.draft_one()?;
            return Ok(actions);
        }
        // A block is in flight: draft ahead (tandem) the next block, plus the guess of the
        // round's next token unless a hint already predicted it; otherwise wait.
        if self.cfg.strategy == Strategy::Tandem {
            let g = self.gammas().1;
            let f = self.inflight.as_ref().unwrap();
            let needed = g + usize::from(!f.from_hint);
            // Without pipelining, only a hint's prediction starts drafting ahead.
            let allowed = self.cfg.pipeline || f.from_hint;
            if allowed && g > 0 && self.ahead.len() < needed {
                self.draft_one()?;
                return Ok(actions);
            }
        }
        actions.push(Action::Wait);
        Ok(actions)
    }

    fn send_block(&mut self, gamma: usize) -> Verify {
        let drafts: Vec<Draft> = self.ahead.drain(..gamma).collect();
        let round = self.next_round;
        self.next_round += 1;
        let pos = self.committed.len();
        let block = Verify {
            round,
            pos: pos as u32,
            prev: self.committed[pos - 1],
            tokens: drafts.iter().map(|d| d.token).collect(),
            q: drafts.iter().map(|d| d.q).collect(),
        };
        self.stats.rounds += 1;
        self.stats.drafted += gamma as u32;
        if let Some(c) = self.stats.gamma_counts.get_mut(gamma) {
            *c += 1;
        }
        self.inflight = Some(InFlight {
            round,
            assumed: block.tokens.clone(),
            drafts,
            from_hint: false,
            contested: None,
        });
        block
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic "model": the next token is a function of the whole prefix, so the
    /// machine's cache bookkeeping is checked by recomputing from the true sequence.
    struct Fake {
        /// Tokens the model holds, as the machine told it.
        seq: Vec<u32>,
        calls: usize,
    }

    fn next_of(prefix: &[u32]) -> u32 {
        let h = prefix
            .iter()
            .fold(7u64, |h, &t| h.wrapping_mul(31).wrapping_add(t as u64));
        (h % 5) as u32 + 10
    }

    impl DraftModel for Fake {
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
            self.calls += 1;
            let t = next_of(&self.seq);
            let logits = want_logits.then(|| {
                (0..20)
                    .map(|i| if i == t as usize { 2.0 } else { 0.0 })
                    .collect()
            });
            Ok((t, logits))
        }
    }

    fn cfg(strategy: Strategy, gamma: Option<usize>) -> Config {
        Config {
            params: SamplingParams::default(),
            max_tokens: 40,
            eos: vec![99],
            strategy,
            pipeline: true,
            hints: true,
            fixed_gamma: gamma,
            max_draft: 8,
            energy_budget: None,
        }
    }

    /// A "target" whose next token is `next_of` except at every 7th position, where it
    /// differs (so drafts get rejected regularly).
    fn target_next(prefix: &[u32]) -> u32 {
        if prefix.len().is_multiple_of(7) {
            next_of(prefix) + 1
        } else {
            next_of(prefix)
        }
    }

    /// Drives a machine against the fake target like the host would, delivering results
    /// (and hints when `hints`) only after `delay` further steps, to exercise pipelining.
    /// What the fake verifier's exit layer predicts.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Exit {
        /// No hints.
        Off,
        /// The target's tokens, exactly.
        Exact,
        /// A wrong token at the first position.
        Wrong,
    }

    fn drive(m: &mut Machine<Fake>, prompt: &[u32], hints: Exit, delay: usize) -> Vec<u32> {
        m.prefill(prompt).unwrap();
        let mut history = prompt.to_vec();
        let first = target_next(&history);
        m.handle(Event::First(first)).unwrap();
        history.push(first);
        let mut out = Vec::new();
        let mut pending: Option<(Verify, usize)> = None;
        for _ in 0..10_000 {
            // Deliver a result after `delay` calls.
            if let Some((b, wait)) = pending.take() {
                if wait == 0 {
                    let mut ctx = history[..b.pos as usize].to_vec();
                    let mut n = 0;
                    while n < b.tokens.len() && b.tokens[n] == target_next(&ctx) {
                        ctx.push(b.tokens[n]);
                        n += 1;
                    }
                    let t = target_next(&ctx);
                    history.truncate(b.pos as usize);
                    history.extend_from_slice(&b.tokens[..n]);
                    history.push(t);
                    m.handle(Event::Result(VerifyResult {
                        round: b.round,
                        accepted: n as u32,
                        outcome: Outcome::Token(t),
                        verify_us: 0,
                    }))
                    .unwrap();
                } else {
                    if hints == Exit::Wrong && wait == delay {
                        let t = target_next(&history[..b.pos as usize]);
                        m.handle(Event::Hint(b.round, vec![t + 1000])).unwrap();
                    }
                    if hints == Exit::Exact && wait == delay {
                        // The "exit layer" predicts the target exactly here.
                        let mut ctx = history[..b.pos as usize].to_vec();
                        let mut h = Vec::new();
                        // Up to the first disagreement, as the verifier sends it.
                        for i in 0..=b.tokens.len() {
                            let t = target_next(&ctx);
                            h.push(t);
                            if i == b.tokens.len() || t != b.tokens[i] {
                                break;
                            }
                            ctx.push(b.tokens[i]);
                        }
                        m.handle(Event::Hint(b.round, h)).unwrap();
                    }
                    pending = Some((b, wait - 1));
                }
            }
            let actions = m.step().unwrap();
            for a in actions {
                match a {
                    Action::Emit(t) => out.extend(t),
                    Action::Send(b) => {
                        assert_eq!(b.pos as usize, history.len(), "block position");
                        assert_eq!(b.prev, *history.last().unwrap());
                        assert!(pending.is_none(), "two blocks in flight");
                        pending = Some((b, delay));
                    }
                    Action::Wait => {
                        if let Some((b, _)) = pending.take() {
                            pending = Some((b, 0));
                        }
                    }
                    Action::Done => return out,
                }
            }
            // The model's cache must always be a prefix of the true drafting sequence.
            let seq = m.sequence();
            let held = &m.model().seq;
            let valid = m.cache_valid.min(held.len());
            assert_eq!(&held[..valid], &seq[..valid], "draft cache diverged");
        }
        panic!("did not finish");
    }

    fn reference(prompt: &[u32], n: usize) -> Vec<u32> {
        let mut h = prompt.to_vec();
        for _ in 0..n {
            let t = target_next(&h);
            h.push(t);
        }
        h[prompt.len()..].to_vec()
    }

    #[test]
    fn every_strategy_commits_exactly_the_target_tokens() {
        let prompt = [1, 2, 3];
        let want = reference(&prompt, 40);
        for (strategy, gamma, hints, delay, pipeline, use_hints) in [
            (Strategy::CloudAr, None, Exit::Off, 0, true, true),
            (Strategy::Sync, Some(4), Exit::Off, 2, true, true),
            (Strategy::Tandem, Some(4), Exit::Off, 6, true, true),
            (Strategy::Tandem, Some(4), Exit::Exact, 6, true, true),
            (Strategy::Tandem, Some(2), Exit::Exact, 1, true, true),
            (Strategy::Tandem, None, Exit::Exact, 3, true, true),
            (Strategy::Tandem, Some(4), Exit::Exact, 6, false, true),
            (Strategy::Tandem, Some(4), Exit::Exact, 6, true, false),
            (Strategy::Tandem, Some(4), Exit::Wrong, 6, true, true),
        ] {
            let mut m = Machine::new(
                Fake {
                    seq: vec![],
                    calls: 0,
                },
                Config {
                    pipeline,
                    hints: use_hints,
                    ..cfg(strategy, gamma)
                },
            );
            let out = drive(&mut m, &prompt, hints, delay);
            assert_eq!(out, want, "{strategy:?} γ={gamma:?} hints={hints:?}");
            let s = m.stats();
            if strategy == Strategy::CloudAr {
                assert_eq!(s.drafted, 0);
            }
            if strategy == Strategy::Tandem && gamma == Some(4) {
                assert!(s.drafted_in_flight > 0, "{s:?}");
                assert!(s.pipelined_kept + s.hint_kept > 0, "{s:?}");
            }
            if hints == Exit::Exact && use_hints && gamma == Some(4) {
                assert!(s.hints > 0 && s.hints_used > 0, "{s:?}");
            }
            if hints == Exit::Wrong {
                // Hints that the verdicts keep proving wrong never redirect drafting.
                assert!(s.hints > 0 && s.hints_used == 0, "{s:?}");
            }
            if !use_hints {
                assert_eq!(s.hints_used + s.hint_kept, 0, "{s:?}");
            }
            if !pipeline {
                assert_eq!(s.pipelined_kept, 0, "{s:?}");
            }
            if strategy == Strategy::Sync {
                assert_eq!(s.drafted_in_flight, 0);
            }
        }
    }

    /// Runs a sync machine with max_tokens 3 whose every result accepts all drafts and
    /// adds `next`; returns what it emitted.
    fn emitted_with(next: u32) -> Vec<u32> {
        let mut m = Machine::new(
            Fake {
                seq: vec![],
                calls: 0,
            },
            Config {
                max_tokens: 3,
                ..cfg(Strategy::Sync, Some(2))
            },
        );
        m.prefill(&[1]).unwrap();
        m.handle(Event::First(5)).unwrap();
        let mut emitted = Vec::new();
        loop {
            let a = m.step().unwrap();
            let mut sent = None;
            for x in &a {
                match x {
                    Action::Emit(t) => emitted.extend(t),
                    Action::Send(b) => sent = Some(b.clone()),
                    _ => {}
                }
            }
            if a.contains(&Action::Done) {
                return emitted;
            }
            if let Some(b) = sent {
                m.handle(Event::Result(VerifyResult {
                    round: b.round,
                    accepted: b.tokens.len() as u32,
                    outcome: Outcome::Token(next),
                    verify_us: 0,
                }))
                .unwrap();
            }
        }
    }

    #[test]
    fn end_of_sequence_and_max_tokens_stop_generation() {
        // The block is cut to what max_tokens leaves: one draft after the first token.
        let e = emitted_with(7);
        assert_eq!(e.len(), 3, "{e:?}");
        assert_eq!(e[2], 7);
        // End of sequence stops at once and is not emitted.
        let e = emitted_with(99);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(!e.contains(&99));
    }

    #[test]
    fn bad_events_are_errors_not_panics() {
        let mut m = Machine::new(
            Fake {
                seq: vec![],
                calls: 0,
            },
            cfg(Strategy::Sync, Some(2)),
        );
        assert!(m.handle(Event::First(1)).is_err(), "first before prefill");
        m.prefill(&[1, 2]).unwrap();
        assert!(m.prefill(&[1]).is_err());
        let warm = Warm {
            draft_ms: 20.0,
            rtt_ms: 50.0,
            verify_ms: vec![(1, 30.0)],
            acceptance: vec![(3.0, 4.0)],
        };
        m.handle(Event::Warm(warm.clone())).unwrap();
        m.handle(Event::First(3)).unwrap();
        assert!(
            m.handle(Event::Warm(warm)).is_err(),
            "warm start after first"
        );
        let r = VerifyResult {
            round: 7,
            accepted: 0,
            outcome: Outcome::Token(1),
            verify_us: 0,
        };
        assert!(m.handle(Event::Result(r)).is_err(), "no block in flight");
        m.handle(Event::Hint(3, vec![1, 2])).unwrap(); // stale hints are ignored
    }
}
