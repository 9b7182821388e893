//! The speculation policy: picks the draft length γ that maximises expected tokens per
//! second, from the measured acceptance per draft position, draft step time, RTT, verify
//! time, bandwidth and energy. With α_i the chance that draft i is accepted once drafts
//! 0..i were, a round of γ drafts commits E(γ) = 1 + Σ_{k=1..γ} Π_{i<k} α_i tokens (with one
//! α for every position, DESIGN.md's (1 − α^(γ+1)) / (1 − α)).

/// Measurements the policy works from.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Decayed count of accepted draft positions.
    accepted: f64,
    /// Decayed count of judged draft positions.
    trials: f64,
    /// Per draft position i: decayed counts of accepted and judged drafts at i (judged: the
    /// drafts before it were accepted). Each position decays only with its own rounds.
    by_pos: Vec<(f64, f64)>,
    /// Draft step time, ms.
    pub draft_ms: f64,
    /// Link round trip, ms.
    pub rtt_ms: f64,
    /// Verifier time per round, ms, until rounds have been measured.
    pub verify_ms: f64,
    /// Per block size n (tokens verified = drafts + 1): decayed weight and mean of the
    /// verifier's time, ms. Each size decays only with its own rounds, so what was learned
    /// about long blocks survives a stretch of short ones.
    verify_by_n: Vec<(f64, f64)>,
    /// Uplink bits per second (0 = unknown: no transfer cost).
    pub bandwidth_bps: f64,
    /// Energy per draft step, joules (0 = unknown).
    pub step_joules: f64,
    /// Rounds without drafts since the last round with drafts.
    idle_rounds: u32,
    /// Idle rounds after which a one-draft probe refreshes α (see [`Policy::choose`]).
    probe_after: u32,
}

/// Idle rounds before the first probe; doubled after each probe that is rejected.
const PROBE_AFTER: u32 = 8;

/// How much one round's evidence weighs against older rounds.
const DECAY: f64 = 0.95;
/// Prior: as if 3/4 of one position had been accepted (a drafter shipped for its target
/// family; one position's weight, so evidence takes over within a round or two).
const PRIOR_ACCEPTED: f64 = 0.75;
const PRIOR_TRIALS: f64 = 1.0;

impl Default for Policy {
    fn default() -> Self {
        Policy {
            accepted: 0.0,
            trials: 0.0,
            by_pos: Vec::new(),
            draft_ms: 10.0,
            rtt_ms: 50.0,
            verify_ms: 50.0,
            verify_by_n: Vec::new(),
            bandwidth_bps: 0.0,
            step_joules: 0.0,
            idle_rounds: 0,
            probe_after: PROBE_AFTER,
        }
    }
}

/// Rounds' worth of evidence a warm start's acceptance counts for, per position.
pub const WARM_WEIGHT: f64 = 4.0;

/// Positions and block sizes a warm start may describe.
const MAX_POSITIONS: usize = 64;

/// How many rounds' worth of the pooled estimate each position's own estimate starts
/// from: a position judged in only a few rounds leans on the pooled α, one judged often
/// stands on its own counts (4 reached more of the optimum than 2 or 8 in the unit tests'
/// simulated worlds, and still finds a cliff in acceptance).
const POSITION_PRIOR: f64 = 4.0;

impl Policy {
    /// A policy that knows its world: acceptance `alpha[i]` at draft position i (the last
    /// entry for positions beyond), draft step, RTT and verifier time a + b·n (ms), as if
    /// each had been measured a million times. What the e2e benchmark computes its bounds
    /// with. `alpha` must not be empty.
    pub fn known(alpha: &[f64], draft_ms: f64, rtt_ms: f64, verify: (f64, f64)) -> Policy {
        const SEEN: f64 = 1e6;
        let at = |i: usize| alpha[i.min(alpha.len() - 1)];
        let mut p = Policy {
            accepted: at(0) * SEEN,
            trials: SEEN,
            by_pos: (0..=MAX_POSITIONS).map(|i| (at(i) * SEEN, SEEN)).collect(),
            draft_ms,
            rtt_ms,
            ..Policy::default()
        };
        for n in [1, 17] {
            p.observe_verify(n, verify.0 + verify.1 * n as f64);
        }
        p
    }

    /// The acceptance-rate estimate.
    pub fn alpha(&self) -> f64 {
        ((self.accepted + PRIOR_ACCEPTED) / (self.trials + PRIOR_TRIALS)).clamp(0.0, 0.999)
    }

    /// The chance that draft `i` (0-based) is accepted given the drafts before it were:
    /// the position's own decayed counts, shrunk toward the pooled α.
    pub fn alpha_at(&self, i: usize) -> f64 {
        let pooled = self.alpha();
        match self.by_pos.get(i) {
            Some(&(acc, trials)) => {
                ((acc + POSITION_PRIOR * pooled) / (trials + POSITION_PRIOR)).clamp(0.0, 0.999)
            }
            None => pooled,
        }
    }

    /// Expected committed tokens of a round with `gamma` drafts (the accepted ones, plus
    /// the correction or bonus token).
    pub fn expected(&self, gamma: usize) -> f64 {
        let mut reach = 1.0;
        let mut total = 1.0;
        for i in 0..gamma {
            reach *= self.alpha_at(i);
            total += reach;
        }
        total
    }

    /// The chance that all `gamma` drafts are accepted and the next draft guessed right
    /// (what drafting ahead of a block in flight bets on).
    fn all_accepted(&self, gamma: usize) -> f64 {
        (0..=gamma).map(|i| self.alpha_at(i)).product()
    }

    /// Starts from what earlier sessions measured: their timings as this session's first
    /// estimates, and their acceptance as evidence worth at most [`WARM_WEIGHT`] rounds per
    /// position (so this session's own rounds soon outweigh it). Values that are not
    /// finite, negative, or describe a block longer than 64 are an error (the host sent
    /// something wrong).
    pub fn warm(&mut self, w: &crate::machine::Warm) -> Result<(), String> {
        let bad = |x: f64| !x.is_finite() || x < 0.0;
        if bad(w.draft_ms)
            || bad(w.rtt_ms)
            || w.verify_ms
                .iter()
                .any(|&(n, ms)| n == 0 || n > MAX_POSITIONS + 1 || bad(ms))
            || w.acceptance.iter().any(|&(a, t)| bad(a) || bad(t) || a > t)
        {
            return Err(format!("a warm start with impossible values: {w:?}"));
        }
        if w.draft_ms > 0.0 {
            self.draft_ms = w.draft_ms;
        }
        if w.rtt_ms > 0.0 {
            self.rtt_ms = w.rtt_ms;
        }
        for &(n, ms) in &w.verify_ms {
            if self.verify_by_n.len() <= n {
                self.verify_by_n.resize(n + 1, (0.0, 0.0));
            }
            self.verify_by_n[n] = (WARM_WEIGHT, ms);
        }
        self.by_pos = w
            .acceptance
            .iter()
            .take(MAX_POSITIONS)
            .map(|&(a, t)| {
                let scale = if t > WARM_WEIGHT {
                    WARM_WEIGHT / t
                } else {
                    1.0
                };
                (a * scale, t * scale)
            })
            .collect();
        // The pooled estimate: all positions' acceptance, at the same weight.
        let (a, t) = w
            .acceptance
            .iter()
            .fold((0.0, 0.0), |(a, t), &(x, y)| (a + x, t + y));
        if t > 0.0 {
            self.accepted = WARM_WEIGHT * a / t;
            self.trials = WARM_WEIGHT;
        }
        Ok(())
    }

    /// Records a round: `accepted` of `gamma` drafts.
    pub fn observe_round(&mut self, gamma: usize, accepted: usize) {
        if gamma == 0 {
            self.idle_rounds = self.idle_rounds.saturating_add(1);
            return;
        }
        if self.idle_rounds >= self.probe_after {
            // This round was a probe: back off while probes keep failing.
            self.probe_after = if accepted == 0 {
                self.probe_after.saturating_mul(2)
            } else {
                PROBE_AFTER
            };
        }
        self.idle_rounds = 0;
        // Positions judged: the accepted ones, plus the rejected one if any.
        let trials = accepted + usize::from(accepted < gamma);
        self.accepted = self.accepted * DECAY + accepted as f64;
        self.trials = self.trials * DECAY + trials as f64;
        if self.by_pos.len() < trials {
            self.by_pos.resize(trials, (0.0, 0.0));
        }
        for (i, (acc, judged)) in self.by_pos[..trials].iter_mut().enumerate() {
            *acc = *acc * DECAY + f64::from(u8::from(i < accepted));
            *judged = *judged * DECAY + 1.0;
        }
    }

    /// Records the verifier's time for a round that verified `n` tokens (drafts + 1).
    pub fn observe_verify(&mut self, n: usize, ms: f64) {
        if n == 0 || !ms.is_finite() {
            return;
        }
        if self.verify_by_n.len() <= n {
            self.verify_by_n.resize(n + 1, (0.0, 0.0));
        }
        let (w, mean) = &mut self.verify_by_n[n];
        *w = *w * DECAY + 1.0;
        *mean += (ms - *mean) / *w;
    }

    /// Expected verifier time for `n` tokens, ms: the line a + b·n (b ≥ 0) through the
    /// per-size means once more than one size has been measured (each size weighing by its
    /// evidence, at most 4 rounds' worth, so a rarely used size still counts); with one size,
    /// its mean scaled as if a = b (half fixed cost, half per token); before any round,
    /// `verify_ms`.
    pub fn verify_time(&self, n: usize) -> f64 {
        let pts: Vec<(f64, f64, f64)> = self
            .verify_by_n
            .iter()
            .enumerate()
            .filter(|(_, (w, _))| *w > 0.0)
            .map(|(size, &(w, mean))| (size as f64, mean, w.min(4.0)))
            .collect();
        let n = n as f64;
        match pts.as_slice() {
            [] => self.verify_ms,
            [(m, t, _)] => t * (1.0 + n) / (1.0 + m),
            _ => {
                let sw: f64 = pts.iter().map(|p| p.2).sum();
                let mx = pts.iter().map(|p| p.0 * p.2).sum::<f64>() / sw;
                let my = pts.iter().map(|p| p.1 * p.2).sum::<f64>() / sw;
                let sxx: f64 = pts.iter().map(|p| p.2 * (p.0 - mx).powi(2)).sum();
                let sxy: f64 = pts.iter().map(|p| p.2 * (p.0 - mx) * (p.1 - my)).sum();
                let b = (sxy / sxx).max(0.0);
                // The intercept may be negative (a one-token round skips work that longer
                // blocks do, such as the early-exit hint); the prediction may not.
                let a = my - b * mx;
                (a + b * n).max(0.0)
            }
        }
    }

    /// Uplink time of a block of `gamma` drafts, ms (frame ≤ 12 + 7γ bytes: varint ids of
    /// up to 3 bytes, plus a 4-byte q each when sampling).
    fn transfer_ms(&self, gamma: usize) -> f64 {
        if self.bandwidth_bps <= 0.0 {
            return 0.0;
        }
        (12.0 + 7.0 * gamma as f64) * 8.0 / self.bandwidth_bps * 1000.0
    }

    /// Wire time of a block of `gamma` drafts, ms: the round trip, the verifier's time for
    /// it and its uplink transfer.
    fn wire_ms(&self, gamma: usize) -> f64 {
        self.rtt_ms + self.verify_time(gamma + 1) + self.transfer_ms(gamma)
    }

    /// Expected time of one synchronous round with `gamma` drafts, ms.
    pub fn round_ms(&self, gamma: usize) -> f64 {
        gamma as f64 * self.draft_ms + self.wire_ms(gamma)
    }

    /// Expected tokens per second of synchronous rounds with `gamma` drafts.
    pub fn throughput(&self, gamma: usize) -> f64 {
        self.expected(gamma) / self.round_ms(gamma).max(1e-6) * 1000.0
    }

    /// What the chain of [`Policy::pipelined_rate`] needs of a block of `g` drafts:
    /// expected tokens, the chance that the drafts ahead survive it, its wire time.
    fn block(&self, g: usize) -> (f64, f64, f64) {
        (self.expected(g), self.all_accepted(g), self.wire_ms(g))
    }

    /// Expected tokens per second of pipelined drafting that sends `fresh` drafts when no
    /// drafting ahead survived the last result (after a rejection, or a wrong guess of the
    /// bonus token) and `warm` drafts when it did.
    ///
    /// A two-state chain: after a block of g drafts is sent, the drafter drafts the guess of
    /// the round's next token and `warm` drafts beyond it while the block is in flight.
    /// When the whole block and the guess are accepted (`all_accepted(g)`), the next block
    /// (of `warm`) leaves after max((warm + 1)·draft, wire(g)); otherwise the drafts ahead
    /// are lost and the next block (of `fresh`) leaves after wire(g) + fresh·draft. A short
    /// fresh block refills an empty pipe sooner; a long warm one makes the most of a flight.
    pub fn pipelined_rate(&self, fresh: usize, warm: usize) -> f64 {
        self.chain_rate(self.block(fresh), self.block(warm), fresh, warm)
    }

    /// [`Policy::pipelined_rate`] from each block size's (expected tokens, chance that the
    /// drafts ahead survive, wire time).
    fn chain_rate(
        &self,
        (e_f, keep_f, wire_f): (f64, f64, f64),
        (e_w, keep_w, wire_w): (f64, f64, f64),
        fresh: usize,
        warm: usize,
    ) -> f64 {
        // Without drafts in the warm state nothing is drafted ahead: every round is alike.
        let (keep_f, keep_w) = if warm == 0 {
            (1.0, 1.0)
        } else {
            (keep_f, keep_w)
        };
        let ahead = if warm == 0 {
            0.0
        } else {
            (warm + 1) as f64 * self.draft_ms
        };
        let refill = fresh as f64 * self.draft_ms;
        let time = |keep: f64, wire: f64| keep * ahead.max(wire) + (1.0 - keep) * (wire + refill);
        // Stationary share of warm blocks: fresh → warm with keep_f, warm → fresh with
        // 1 − keep_w.
        let denom = keep_f + 1.0 - keep_w;
        let w = if denom > 1e-12 { keep_f / denom } else { 1.0 };
        let tokens = (1.0 - w) * e_f + w * e_w;
        let ms = (1.0 - w) * time(keep_f, wire_f) + w * time(keep_w, wire_w);
        tokens / ms.max(1e-6) * 1000.0
    }

    /// Drafting energy per generated token with `gamma` drafts, joules.
    pub fn joules_per_token(&self, gamma: usize) -> f64 {
        gamma as f64 * self.step_joules / self.expected(gamma)
    }

    /// The block sizes to draft next, `(fresh, warm)`, each in 0..=max_draft with energy
    /// per token within `budget`, shorter ones preferred unless longer ones are clearly
    /// better; (0, 0) (plain cloud decoding) when no drafting pays. Pipelined, the pair
    /// that maximises [`Policy::pipelined_rate`]; synchronous, the γ with the best
    /// [`Policy::throughput`] for both.
    ///
    /// Rounds without drafts teach nothing about α, so one unlucky early block could keep
    /// drafting off for good. When γ = 0 has been chosen for `probe_after` rounds and only
    /// the α estimate stands in the way (with the prior α drafting would pay), one draft
    /// is sent as a probe; failed probes double the wait.
    pub fn plan(&self, max_draft: usize, pipelined: bool, budget: Option<f64>) -> (usize, usize) {
        let plan = self.best_plan(max_draft, pipelined, budget);
        if plan.1 == 0 && self.idle_rounds >= self.probe_after && max_draft > 0 {
            let prior = Policy {
                accepted: 0.0,
                trials: 0.0,
                by_pos: Vec::new(),
                ..self.clone()
            };
            if prior.best_plan(max_draft, pipelined, budget).1 > 0 {
                return (1, 1);
            }
        }
        plan
    }

    /// The γ of the next block in the steady state: [`Policy::plan`]'s warm size.
    pub fn choose(&self, max_draft: usize, pipelined: bool, budget: Option<f64>) -> usize {
        self.plan(max_draft, pipelined, budget).1
    }

    fn best_plan(&self, max_draft: usize, pipelined: bool, budget: Option<f64>) -> (usize, usize) {
        let fits = |g: usize| budget.is_none_or(|b| g == 0 || self.joules_per_token(g) <= b);
        // Prefer shorter blocks unless longer ones are clearly better.
        let mut best = ((0, 0), f64::MIN);
        let mut consider = |plan: (usize, usize), t: f64| {
            if t > best.1 * 1.01 {
                best = (plan, t);
            }
        };
        if !pipelined {
            for g in (0..=max_draft).filter(|&g| fits(g)) {
                consider((g, g), self.throughput(g));
            }
            return best.0;
        }
        let blocks: Vec<_> = (0..=max_draft).map(|g| self.block(g)).collect();
        for warm in (0..=max_draft).filter(|&g| fits(g)) {
            for fresh in (0..=max_draft).filter(|&g| fits(g)) {
                if warm == 0 && fresh > 0 {
                    continue;
                }
                consider(
                    (fresh, warm),
                    self.chain_rate(blocks[fresh], blocks[warm], fresh, warm),
                );
            }
        }
        best.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(alpha_rounds: (usize, usize), rtt: f64) -> Policy {
        let mut p = Policy {
            draft_ms: 10.0,
            rtt_ms: rtt,
            verify_ms: 40.0,
            ..Policy::default()
        };
        // Feed rounds of 4 drafts, each draft accepted with probability accepted / 4 once
        // the ones before it were (a fixed pseudo-random sequence).
        let alpha = alpha_rounds.1 as f64 / 4.0;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..alpha_rounds.0 {
            let mut n = 0;
            while n < 4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if (x >> 11) as f64 / (1u64 << 53) as f64 >= alpha {
                    break;
                }
                n += 1;
            }
            p.observe_round(4, n);
        }
        p
    }

    #[test]
    fn expected_with_one_alpha_matches_the_closed_form() {
        // No per-position counts: every position has the pooled α, and a round's expected
        // tokens are the geometric sum (1 − α^(γ+1)) / (1 − α).
        for (accepted, trials) in [(0.0, 0.0), (7.25, 9.0), (40.0, 41.0), (0.0, 30.0)] {
            let p = Policy {
                accepted,
                trials,
                ..Policy::default()
            };
            let a = p.alpha();
            for gamma in 0..10 {
                let closed = (1.0 - a.powi(gamma as i32 + 1)) / (1.0 - a);
                assert!(
                    (p.expected(gamma) - closed).abs() < 1e-9,
                    "α {a}, γ {gamma}"
                );
            }
        }
        assert_eq!(Policy::default().expected(0), 1.0);
    }

    #[test]
    fn gamma_grows_with_rtt() {
        let mut last = 0;
        for rtt in [0.0, 20.0, 50.0, 100.0, 200.0, 300.0] {
            let g = policy((30, 3), rtt).choose(16, false, None);
            assert!(g >= last, "rtt {rtt}: γ {g} < {last}");
            last = g;
        }
        assert!(last > policy((30, 3), 0.0).choose(16, false, None));
    }

    #[test]
    fn gamma_shrinks_when_acceptance_drops_and_is_zero_when_nothing_is_accepted() {
        let good = policy((30, 4), 100.0).choose(16, true, None);
        let fair = policy((30, 2), 100.0).choose(16, true, None);
        let none = policy((30, 0), 100.0).choose(16, true, None);
        assert!(good > fair, "{good} vs {fair}");
        assert!(fair > none, "{fair} vs {none}");
        assert_eq!(none, 0, "a drafter that is never accepted must not draft");
        // Acceptance that recovers brings drafting back.
        let mut p = policy((30, 0), 100.0);
        for _ in 0..30 {
            p.observe_round(4, 4);
        }
        assert!(p.choose(16, true, None) > 0);
    }

    #[test]
    fn energy_budget_is_respected() {
        let mut p = policy((30, 3), 200.0);
        p.step_joules = 0.5;
        let free = p.choose(16, false, None);
        let budget = 0.6;
        let tight = p.choose(16, false, Some(budget));
        assert!(tight < free, "{tight} vs {free}");
        assert!(p.joules_per_token(tight) <= budget);
        // A budget too small for any drafting: plain cloud decoding.
        assert_eq!(p.choose(16, false, Some(0.01)), 0);
    }

    #[test]
    fn verify_cost_is_fitted_per_block_size_and_loopback_with_a_slow_drafter_means_no_drafting() {
        // Verifying n tokens costs 50 + 25·n ms; drafting a token costs 60 ms.
        let mut p = policy((30, 4), 0.0);
        p.draft_ms = 60.0;
        for n in [1, 5, 8, 3, 5, 8] {
            p.observe_verify(n, 50.0 + 25.0 * n as f64);
        }
        assert!((p.verify_time(1) - 75.0).abs() < 1e-6);
        assert!((p.verify_time(9) - 275.0).abs() < 1e-6);
        // No link delay: one target step (75 ms) beats drafting at 60 ms a token.
        assert_eq!(p.choose(16, false, None), 0);
        // 200 ms of RTT: drafting pays.
        p.rtt_ms = 200.0;
        assert!(p.choose(16, false, None) >= 3);
    }

    #[test]
    fn a_run_of_short_blocks_does_not_erase_what_long_blocks_cost() {
        // A CPU verifier: 65 ms for one token, +90 ms per extra token; drafting 57 ms.
        let mut p = policy((30, 4), 0.0);
        p.draft_ms = 57.0;
        let cost = |n: usize| 65.0 + 90.0 * (n as f64 - 1.0);
        for n in [5, 5, 2] {
            p.observe_verify(n, cost(n));
        }
        // Fifty rounds of cloud decoding later, drafting is still known not to pay.
        for _ in 0..50 {
            p.observe_verify(1, cost(1));
            assert_eq!(p.choose(16, true, None), 0);
        }
        assert!(
            (p.verify_time(2) - cost(2)).abs() < 1e-6,
            "{}",
            p.verify_time(2)
        );
        // A verifier swapped for a flat-cost one is learned as its rounds come in.
        for _ in 0..60 {
            for n in [1, 2, 5] {
                p.observe_verify(n, 65.0);
            }
        }
        assert!(
            (p.verify_time(5) - 65.0).abs() < 3.0,
            "{}",
            p.verify_time(5)
        );
        assert!(p.choose(16, true, None) > 0);
    }

    #[test]
    fn one_unlucky_block_does_not_turn_drafting_off_for_good() {
        // 100 ms of RTT, a CPU verifier, a good drafter whose very first block was rejected.
        let mut p = policy((0, 0), 100.0);
        p.draft_ms = 60.0;
        for n in [1, 5] {
            p.observe_verify(n, -10.0 + 85.0 * n as f64);
        }
        p.observe_round(4, 0);
        assert_eq!(p.choose(16, true, None), 0, "alpha {}", p.alpha());
        // Cloud rounds follow; after a while a one-draft probe goes out.
        let mut waited = 0;
        while p.choose(16, true, None) == 0 {
            p.observe_round(0, 0);
            waited += 1;
            assert!(waited <= PROBE_AFTER, "no probe after {waited} rounds");
        }
        assert_eq!(p.choose(16, true, None), 1);
        // The probe and the rounds after it are accepted: drafting comes back for real.
        p.observe_round(1, 1);
        for _ in 0..6 {
            let g = p.choose(16, true, None).max(1);
            p.observe_round(g, g);
        }
        assert!(p.choose(16, true, None) > 0, "alpha {}", p.alpha());
        // At RTT 0 the same verifier makes cloud decoding right whatever α is: no probes.
        let mut q = policy((0, 0), 0.0);
        q.draft_ms = 60.0;
        for n in [1, 5] {
            q.observe_verify(n, -10.0 + 85.0 * n as f64);
        }
        q.observe_round(4, 0);
        for _ in 0..100 {
            assert_eq!(q.choose(16, true, None), 0);
            q.observe_round(0, 0);
        }
        // A drafter whose probes keep failing is probed less and less often.
        let mut r = p.clone();
        for _ in 0..30 {
            r.observe_round(4, 0);
        }
        let mut probes = 0;
        for _ in 0..200 {
            let g = r.choose(16, true, None);
            if g > 0 {
                probes += 1;
            }
            r.observe_round(g, 0);
        }
        assert!((1..=5).contains(&probes), "{probes} probes in 200 rounds");
    }

    #[test]
    fn slow_links_make_long_blocks_cost_more() {
        let mut p = policy((30, 3), 50.0);
        let fast = p.choose(16, false, None);
        p.bandwidth_bps = 2_000.0; // 2 kbit/s: each draft costs 32 ms on the wire
        assert!(p.choose(16, false, None) < fast);
    }

    /// The world a simulated generation runs in: acceptance per draft position, link,
    /// verifier and drafter timings.
    struct World {
        alpha: Vec<f64>,
        rtt: f64,
        draft: f64,
        /// Verifier time for n tokens: a + b·n.
        verify: (f64, f64),
    }

    impl World {
        /// Tokens per second of a (sync) round of γ drafts, from the true parameters.
        fn rate(&self, gamma: usize) -> f64 {
            let mut reach = 1.0;
            let mut e = 1.0;
            for i in 0..gamma {
                reach *= self.alpha[i.min(self.alpha.len() - 1)];
                e += reach;
            }
            let n = gamma as f64 + 1.0;
            e / (gamma as f64 * self.draft + self.rtt + self.verify.0 + self.verify.1 * n)
        }

        fn best(&self, max: usize) -> f64 {
            (0..=max).map(|g| self.rate(g)).fold(0.0, f64::max)
        }
    }

    /// A fixed pseudo-random sequence of uniform numbers in [0, 1) (xorshift).
    fn uniform(seed: u64) -> impl FnMut() -> f64 {
        let mut x = seed;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Runs `rounds` rounds in which the policy chooses γ and the world decides how many
    /// drafts are accepted (a fixed pseudo-random sequence); returns the share of the best
    /// rate each round's choice reached, per round.
    fn simulate(p: &mut Policy, w: &World, rounds: usize, seed: u64) -> Vec<f64> {
        let mut uniform = uniform(seed);
        let mut shares = Vec::new();
        for _ in 0..rounds {
            p.rtt_ms = w.rtt;
            p.draft_ms = w.draft;
            let g = p.choose(16, false, None);
            shares.push(w.rate(g) / w.best(16));
            let mut accepted = 0;
            while accepted < g && uniform() < w.alpha[accepted.min(w.alpha.len() - 1)] {
                accepted += 1;
            }
            p.observe_round(g, accepted);
            p.observe_verify(g + 1, w.verify.0 + w.verify.1 * (g as f64 + 1.0));
        }
        shares
    }

    fn mean(v: &[f64]) -> f64 {
        v.iter().sum::<f64>() / v.len() as f64
    }

    #[test]
    fn choices_reach_the_analytic_optimum_across_links_verifiers_and_drafters() {
        // The drafter is right on the first three positions and rarely beyond (a pooled α
        // of ~0.8 would draft past the cliff: 0.945 of the optimum in this world).
        let cliff = vec![0.97, 0.95, 0.93, 0.2];
        let cases = [
            (
                "fast link, flat GPU-like verifier, good drafter",
                0.0,
                (20.0, 1.0),
                0.9,
                8.0,
            ),
            (
                "slow link, flat verifier, good drafter",
                300.0,
                (20.0, 1.0),
                0.9,
                8.0,
            ),
            (
                "100 ms, CPU verifier, good drafter",
                100.0,
                (-10.0, 85.0),
                0.9,
                60.0,
            ),
            (
                "loopback, CPU verifier, slow drafter",
                0.0,
                (-10.0, 85.0),
                0.9,
                60.0,
            ),
            (
                "100 ms, flat verifier, poor drafter",
                100.0,
                (20.0, 1.0),
                0.3,
                8.0,
            ),
            (
                "300 ms, CPU verifier, poor drafter",
                300.0,
                (-10.0, 85.0),
                0.3,
                60.0,
            ),
        ];
        for (i, (name, rtt, verify, alpha, draft)) in cases.into_iter().enumerate() {
            let w = World {
                alpha: vec![alpha],
                rtt,
                draft,
                verify,
            };
            let shares = simulate(&mut Policy::default(), &w, 300, 17 + i as u64);
            // After a warm-up of 30 rounds, the choices reach 90% of the best rate on
            // average (the estimate moves with each round's luck).
            let reached = mean(&shares[30..]);
            assert!(reached >= 0.9, "{name}: {reached:.3} of the optimum");
        }
        // Acceptance that falls with the position: the per-position estimate stops
        // before the positions that do not pay.
        let w = World {
            alpha: cliff,
            rtt: 100.0,
            draft: 15.0,
            verify: (20.0, 5.0),
        };
        let shares = simulate(&mut Policy::default(), &w, 300, 5);
        let reached = mean(&shares[30..]);
        assert!(
            reached >= 0.98,
            "acceptance with a cliff: {reached:.3} of the optimum"
        );
    }

    #[test]
    fn acceptance_that_changes_mid_generation_is_followed() {
        let mut w = World {
            alpha: vec![0.9],
            rtt: 100.0,
            draft: 20.0,
            verify: (20.0, 2.0),
        };
        let mut p = Policy::default();
        simulate(&mut p, &w, 100, 3);
        let before = p.choose(16, false, None);
        // The topic changes: the drafter is now right a third of the time.
        w.alpha = vec![0.3];
        let shares = simulate(&mut p, &w, 100, 4);
        let after = p.choose(16, false, None);
        assert!(after < before, "γ {before} → {after}");
        assert!(mean(&shares[30..]) >= 0.9, "{:.3}", mean(&shares[30..]));
        // And back.
        w.alpha = vec![0.9];
        let shares = simulate(&mut p, &w, 100, 6);
        assert!(mean(&shares[30..]) >= 0.9, "{:.3}", mean(&shares[30..]));
    }

    #[test]
    fn a_warm_start_sets_the_first_choice_and_fresh_rounds_take_over() {
        use crate::machine::Warm;
        // 100 ms link, a verifier whose blocks cost little more than one token, 30 ms
        // draft steps.
        let measured = |acceptance: Vec<(f64, f64)>| Warm {
            draft_ms: 30.0,
            rtt_ms: 100.0,
            verify_ms: vec![(1, 75.0), (5, 95.0)],
            acceptance,
        };
        // Cold, the defaults (10 ms drafts, 50 ms verifies, α 3/4) ask for a long block.
        let cold = Policy::default().choose(16, false, None);
        // A drafter that was rarely accepted here: no drafting from the first round.
        let mut p = Policy::default();
        p.warm(&measured(vec![(1.0, 20.0)])).unwrap();
        assert_eq!(p.choose(16, false, None), 0, "cold choice was {cold}");
        assert!((p.verify_time(3) - 85.0).abs() < 1e-6);
        // One that was accepted well: drafting from the first round, with what the
        // verifier's measured cost allows.
        let mut q = Policy::default();
        q.warm(&measured(vec![(19.0, 20.0), (17.0, 19.0), (15.0, 17.0)]))
            .unwrap();
        let g = q.choose(16, false, None);
        assert!(g >= 2, "{g}");
        // The old evidence weighs a few rounds: in a session whose drafts now fail, the
        // estimate falls below one half within six rounds and the blocks shorten.
        for _ in 0..6 {
            let g = q.choose(16, false, None).max(1);
            q.observe_round(g, 0);
        }
        assert!(q.alpha() < 0.5, "{}", q.alpha());
        assert!(q.choose(16, false, None) < g);
        // Values no measurement gives are refused.
        for bad in [
            Warm {
                draft_ms: f64::NAN,
                ..measured(vec![])
            },
            measured(vec![(3.0, 2.0)]),
            Warm {
                verify_ms: vec![(0, 10.0)],
                ..measured(vec![])
            },
            Warm {
                verify_ms: vec![(1 << 30, 10.0)],
                ..measured(vec![])
            },
        ] {
            assert!(Policy::default().warm(&bad).is_err(), "{bad:?}");
        }
    }

    /// Runs `rounds` pipelined rounds: the policy plans (fresh, warm), the world decides
    /// acceptance (and whether the guess of each round's next token was right), and time
    /// passes as in the pipeline: max((warm + 1)·draft, wire) after a round whose drafts
    /// ahead survive, wire + fresh·draft after one whose do not. Returns tokens per second
    /// over the rounds after the first `skip`, and the plan of the last round.
    fn simulate_pipelined(
        p: &mut Policy,
        w: &World,
        rounds: usize,
        skip: usize,
        seed: u64,
    ) -> (f64, (usize, usize)) {
        let mut uniform = uniform(seed);
        let alpha = |i: usize| w.alpha[i.min(w.alpha.len() - 1)];
        let (mut tokens, mut ms) = (0.0, 0.0);
        let mut warm_state = false;
        let mut plan = (0, 0);
        for r in 0..rounds {
            p.rtt_ms = w.rtt;
            p.draft_ms = w.draft;
            plan = p.plan(16, true, None);
            let g = if warm_state { plan.1 } else { plan.0 };
            let mut accepted = 0;
            while accepted < g && uniform() < alpha(accepted) {
                accepted += 1;
            }
            let guessed = accepted == g && uniform() < alpha(g);
            let verify = w.verify.0 + w.verify.1 * (g as f64 + 1.0);
            let wire = w.rtt + verify;
            warm_state = guessed && plan.1 > 0;
            let t = if plan.1 == 0 {
                wire
            } else if warm_state {
                wire.max((plan.1 + 1) as f64 * w.draft)
            } else {
                wire + plan.0 as f64 * w.draft
            };
            if r >= skip {
                tokens += accepted as f64 + 1.0;
                ms += t;
            }
            p.observe_round(g, accepted);
            p.observe_verify(g + 1, verify);
        }
        (tokens / ms * 1000.0, plan)
    }

    /// A policy that knows the world exactly.
    fn oracle(w: &World) -> Policy {
        Policy::known(&w.alpha, w.draft, w.rtt, w.verify)
    }

    #[test]
    fn pipelined_plans_refill_an_empty_pipe_with_a_short_block() {
        // The e2e benchmark's world on this project's CPU verifier (Qwen2.5-Coder 0.5B
        // drafting for the 1.5B): α 0.936, 46 ms draft steps, verify 77 + 31·n ms.
        for (rtt, gain) in [(3.0, 1.01), (100.0, 1.04), (300.0, 1.05)] {
            let w = World {
                alpha: vec![0.936],
                rtt,
                draft: 46.0,
                verify: (77.0, 31.0),
            };
            let o = oracle(&w);
            let (fresh, warm) = o.plan(16, true, None);
            let single = (0..=16).map(|g| o.pipelined_rate(g, g)).fold(0.0, f64::max);
            let pair = o.pipelined_rate(fresh, warm);
            assert!(fresh < warm, "{rtt} ms: ({fresh}, {warm})");
            assert!(pair >= gain * single, "{rtt} ms: {pair:.2} vs {single:.2}");
            // The chain's rate is what the pipeline gives (simulated, 20000 rounds).
            let mut fixed = o.clone();
            let (sim, _) = simulate_pipelined(&mut fixed, &w, 20_000, 0, 9);
            assert!(
                (sim / pair - 1.0).abs() < 0.03,
                "{rtt} ms: simulated {sim:.2}, chain {pair:.2}"
            );
        }
    }

    #[test]
    fn pipelined_choices_reach_the_best_plan_from_a_cold_start() {
        let cases = [
            (
                "loopback, CPU verifier",
                0.0,
                (77.0, 31.0),
                vec![0.936],
                46.0,
            ),
            (
                "100 ms, CPU verifier",
                100.0,
                (77.0, 31.0),
                vec![0.936],
                46.0,
            ),
            (
                "300 ms, CPU verifier, cliff",
                300.0,
                (77.0, 31.0),
                vec![0.95, 0.9, 0.9, 0.3],
                46.0,
            ),
            ("100 ms, flat verifier", 100.0, (20.0, 1.0), vec![0.8], 8.0),
            ("50 ms, poor drafter", 50.0, (20.0, 5.0), vec![0.2], 30.0),
        ];
        for (i, (name, rtt, verify, alpha, draft)) in cases.into_iter().enumerate() {
            let w = World {
                alpha,
                rtt,
                draft,
                verify,
            };
            let o = oracle(&w);
            let (f, g) = o.plan(16, true, None);
            let best = o.pipelined_rate(f, g);
            let (rate, plan) =
                simulate_pipelined(&mut Policy::default(), &w, 3000, 100, 31 + i as u64);
            assert!(
                rate >= 0.9 * best,
                "{name}: {rate:.2} tok/s of the best plan's {best:.2} ({f}, {g}); last plan {plan:?}"
            );
        }
    }
}
