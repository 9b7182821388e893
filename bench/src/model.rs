//! The analytic model of DESIGN.md: expected tokens per round and pipelined round time,
//! fed with measured acceptance, draft step time, verifier time and RTT.

/// Measured inputs of the model at one sweep point.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Inputs {
    /// Per-token acceptance rate.
    pub alpha: f64,
    /// One draft step, ms.
    pub draft_ms: f64,
    /// Verifier time of a block of n tokens (drafts + 1): `verify_a_ms + verify_b_ms * n`.
    pub verify_a_ms: f64,
    /// See `verify_a_ms`.
    pub verify_b_ms: f64,
    /// Link round trip (measured: round time minus verifier time), ms.
    pub rtt_ms: f64,
}

/// The best rate the model allows and the draft length that reaches it.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Bound {
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Draft length of the best round.
    pub gamma: u32,
}

/// The best rate of one-block-in-flight pipelining and its plan.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ChainBound {
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Draft length of a block sent when no drafts ahead survived.
    pub fresh: u32,
    /// Draft length of a block sent when they did.
    pub warm: u32,
}

/// Expected committed tokens per round: (1 − α^(γ+1)) / (1 − α).
pub fn tokens_per_round(alpha: f64, gamma: u32) -> f64 {
    if alpha >= 1.0 {
        return gamma as f64 + 1.0;
    }
    (1.0 - alpha.powi(gamma as i32 + 1)) / (1.0 - alpha)
}

/// Expected accepted drafts per round of γ: α(1 − α^γ) / (1 − α).
pub fn accepted_per_round(alpha: f64, gamma: u32) -> f64 {
    tokens_per_round(alpha, gamma) - 1.0
}

/// The α whose expected accepted drafts per round of `gamma` is `mean_accepted`.
pub fn alpha_from_accepted(mean_accepted: f64, gamma: u32) -> f64 {
    if gamma == 0 {
        return 0.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if accepted_per_round(mid, gamma) < mean_accepted {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo + hi) / 2.0
}

impl Inputs {
    fn verify_ms(&self, n: u32, flat: bool) -> f64 {
        let n = if flat { 1 } else { n };
        self.verify_a_ms + self.verify_b_ms * n as f64
    }

    /// Pipelined: the best of max(γ·draft, RTT + verify(γ+1)) per E(γ) over γ ≤ `max_gamma`
    /// (γ = 0 is cloud decoding). With `flat`, a block costs what one token does
    /// (a GPU-like verifier): a projection, not a measurement.
    pub fn pipelined_bound(&self, max_gamma: u32, flat: bool) -> Bound {
        (0..=max_gamma)
            .map(|g| {
                let t = (g as f64 * self.draft_ms).max(self.rtt_ms + self.verify_ms(g + 1, flat));
                Bound {
                    tokens_per_s: 1000.0 * tokens_per_round(self.alpha, g) / t,
                    gamma: g,
                }
            })
            .fold(
                Bound {
                    tokens_per_s: 0.0,
                    gamma: 0,
                },
                |a, b| {
                    if b.tokens_per_s > a.tokens_per_s {
                        b
                    } else {
                        a
                    }
                },
            )
    }

    /// The best rate of pipelining as tandem's drafter does it — one block in flight, the
    /// drafts made during a flight lost when the block is cut — over every plan of a fresh
    /// and a warm block size ≤ `max_gamma` (the drafter policy's two-state chain,
    /// `tandem_guest_drafter::policy::Policy::pipelined_rate`). Lower than
    /// [`Inputs::pipelined_bound`], which counts every flight as overlapped.
    pub fn chain_bound(&self, max_gamma: u32) -> ChainBound {
        let p = tandem_guest_drafter::policy::Policy::known(
            &[self.alpha],
            self.draft_ms,
            self.rtt_ms,
            (self.verify_a_ms, self.verify_b_ms),
        );
        let mut best = ChainBound {
            tokens_per_s: 0.0,
            fresh: 0,
            warm: 0,
        };
        for warm in 0..=max_gamma {
            for fresh in 0..=max_gamma {
                let t = p.pipelined_rate(fresh as usize, warm as usize);
                if t > best.tokens_per_s {
                    best = ChainBound {
                        tokens_per_s: t,
                        fresh,
                        warm,
                    };
                }
            }
        }
        best
    }

    /// Synchronous rounds of a fixed γ: E(γ) / (γ·draft + RTT + verify(γ+1)).
    pub fn sync_rate(&self, gamma: u32, flat: bool) -> f64 {
        let t = gamma as f64 * self.draft_ms + self.rtt_ms + self.verify_ms(gamma + 1, flat);
        1000.0 * tokens_per_round(self.alpha, gamma) / t
    }

    /// Cloud decoding: one token per RTT + one-token verify.
    pub fn cloud_ar_rate(&self) -> f64 {
        1000.0 / (self.rtt_ms + self.verify_ms(1, false))
    }
}

/// Weighted least squares of `y = a + b·x` over `(x, y, weight)`; with a single x, the
/// line through the origin.
pub fn fit_line(points: &[(f64, f64, f64)]) -> (f64, f64) {
    let w: f64 = points.iter().map(|p| p.2).sum();
    if w <= 0.0 {
        return (0.0, 0.0);
    }
    let mx = points.iter().map(|p| p.0 * p.2).sum::<f64>() / w;
    let my = points.iter().map(|p| p.1 * p.2).sum::<f64>() / w;
    let sxx: f64 = points.iter().map(|p| p.2 * (p.0 - mx).powi(2)).sum();
    if sxx < 1e-12 {
        return (0.0, if mx > 0.0 { my / mx } else { 0.0 });
    }
    let sxy: f64 = points.iter().map(|p| p.2 * (p.0 - mx) * (p.1 - my)).sum();
    let b = sxy / sxx;
    (my - b * mx, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_per_round_matches_the_series() {
        let a: f64 = 0.8;
        let direct: f64 = (0..=4).map(|i| a.powi(i)).sum();
        assert!((tokens_per_round(a, 4) - direct).abs() < 1e-12);
        assert_eq!(tokens_per_round(0.0, 4), 1.0);
    }

    #[test]
    fn alpha_is_recovered_from_accepted_counts() {
        for a in [0.1, 0.5, 0.83, 0.97] {
            let got = alpha_from_accepted(accepted_per_round(a, 4), 4);
            assert!((got - a).abs() < 1e-9, "{a} -> {got}");
        }
    }

    #[test]
    fn bound_prefers_cloud_decoding_when_drafts_are_useless() {
        let m = Inputs {
            alpha: 0.0,
            draft_ms: 10.0,
            verify_a_ms: 5.0,
            verify_b_ms: 50.0,
            rtt_ms: 100.0,
        };
        let b = m.pipelined_bound(8, false);
        assert_eq!(b.gamma, 0);
        assert!((b.tokens_per_s - m.cloud_ar_rate()).abs() < 1e-9);
        // Good drafts and a flat verifier: long blocks pay off.
        let good = Inputs { alpha: 0.9, ..m };
        let p = good.pipelined_bound(8, true);
        assert!(p.gamma >= 4 && p.tokens_per_s > 3.0 * good.cloud_ar_rate());
    }

    #[test]
    fn the_chain_bound_lies_between_cloud_decoding_and_the_overlapped_bound() {
        // The e2e run of 2026-12-07: one-in-flight pipelining loses drafts ahead on every
        // cut block, so it stays under the bound that overlaps every flight.
        for rtt in [3.0, 100.0, 300.0] {
            let m = Inputs {
                alpha: 0.936,
                draft_ms: 46.0,
                verify_a_ms: 77.0,
                verify_b_ms: 31.0,
                rtt_ms: rtt,
            };
            let c = m.chain_bound(16);
            let b = m.pipelined_bound(16, false);
            assert!(c.tokens_per_s < b.tokens_per_s, "{rtt}: {c:?} {b:?}");
            assert!(c.tokens_per_s > m.cloud_ar_rate(), "{rtt}: {c:?}");
            assert!(c.fresh < c.warm, "{rtt}: {c:?}");
        }
        // Useless drafts: plain cloud decoding is the plan.
        let m = Inputs {
            alpha: 0.0,
            draft_ms: 46.0,
            verify_a_ms: 77.0,
            verify_b_ms: 31.0,
            rtt_ms: 100.0,
        };
        let c = m.chain_bound(16);
        assert_eq!((c.fresh, c.warm), (0, 0));
        assert!((c.tokens_per_s - m.cloud_ar_rate()).abs() < 1e-6, "{c:?}");
    }

    #[test]
    fn line_fit_recovers_slope_and_intercept() {
        let pts = [(1.0, 12.0, 3.0), (3.0, 32.0, 1.0), (5.0, 52.0, 2.0)];
        let (a, b) = fit_line(&pts);
        assert!((a - 2.0).abs() < 1e-9 && (b - 10.0).abs() < 1e-9);
        assert_eq!(fit_line(&[(2.0, 10.0, 1.0)]), (0.0, 5.0));
    }
}
