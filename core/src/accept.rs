//! Acceptance and residual math of speculative decoding, shared by verifier and drafter.
//!
//! Greedy: a draft token is accepted when it equals the target's argmax. Sampling (Leviathan
//! et al. 2023): draft token x drawn from q is accepted with probability min(1, p(x)/q(x));
//! on rejection the correction is drawn from norm(max(0, p − q)). The verifier, which has p
//! but only q(x) of each draft token, decides acceptance with its own seeded RNG and sends
//! the top-K of p; the drafter, which has its full q, draws the correction
//! ([`residual`]). That split is exact whenever the top-K holds every token of p's support
//! (after top-p); otherwise the correction ignores the mass of p beyond the top K.

use crate::protocol::Outcome;
use crate::sampling::{Rng, SamplingParams, argmax, distribution, prob_of, sample_from};

/// The probability with which a draft token is accepted: min(1, p(x)/q(x)).
pub fn acceptance_probability(p_x: f32, q_x: f32) -> f64 {
    if q_x <= 0.0 {
        // The drafter claims it could not have drawn x: accept only if p allows x at all.
        return if p_x > 0.0 { 1.0 } else { 0.0 };
    }
    (p_x as f64 / q_x as f64).min(1.0)
}

/// The `k` most likely entries of a distribution, most likely first (ties: lower id first).
pub fn top_k(dist: &[(u32, f32)], k: usize) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = dist.iter().copied().filter(|e| e.1 > 0.0).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(k.max(1));
    v
}

/// The residual distribution norm(max(0, p − q)) over the ids of `p_top` (the target's
/// top-K), with the drafter's own `q`. If p ≤ q everywhere on those ids (possible only
/// through rounding), falls back to `p_top` itself.
pub fn residual(p_top: &[(u32, f32)], q: impl Fn(u32) -> f32) -> Vec<(u32, f32)> {
    let r: Vec<(u32, f32)> = p_top
        .iter()
        .map(|&(id, p)| (id, (p - q(id)).max(0.0)))
        .filter(|e| e.1 > 0.0)
        .collect();
    let sum: f64 = r.iter().map(|e| e.1 as f64).sum();
    if sum <= 0.0 {
        return p_top.to_vec();
    }
    r.into_iter()
        .map(|(id, v)| (id, (v as f64 / sum) as f32))
        .collect()
}

/// Draws the correction token after a rejection (the drafter's half).
pub fn sample_correction(p_top: &[(u32, f32)], q: impl Fn(u32) -> f32, rng: &mut Rng) -> u32 {
    sample_from(&residual(p_top, q), rng)
}

/// The verifier's decision on one block.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Draft tokens accepted.
    pub accepted: usize,
    /// What follows them.
    pub outcome: Outcome,
}

/// The greedy verdict from each position's best token alone (what a device reads back
/// instead of whole rows): the drafts are accepted up to the first that differs from
/// `best(i)`, which replaces it; all accepted, `best(γ)` is the bonus token. The same verdict
/// [`judge`] gives greedy parameters on logits whose argmaxes these are.
pub fn judge_argmax(drafts: &[u32], best: impl Fn(usize) -> u32) -> Verdict {
    for (i, &x) in drafts.iter().enumerate() {
        let b = best(i);
        if b != x {
            return Verdict {
                accepted: i,
                outcome: Outcome::Token(b),
            };
        }
    }
    Verdict {
        accepted: drafts.len(),
        outcome: Outcome::Token(best(drafts.len())),
    }
}

/// Judges a draft block against the target's logits: `logits(i)` is the target's row that
/// predicts the token at draft position `i` (there are `drafts.len() + 1` rows; the last one
/// gives the bonus token). `rng` is the session's acceptance RNG; `k` the top-K size sent on
/// rejection.
pub fn judge<'a>(
    drafts: &[u32],
    q: &[f32],
    logits: impl Fn(usize) -> &'a [f32],
    params: &SamplingParams,
    rng: &mut Rng,
    k: usize,
) -> Verdict {
    if params.is_greedy() {
        return judge_argmax(drafts, |i| argmax(logits(i)));
    }
    for (i, &x) in drafts.iter().enumerate() {
        let row = logits(i);
        let p = distribution(row, params);
        let p_x = prob_of(&p, x);
        let u = rng.uniform();
        if u >= acceptance_probability(p_x, q.get(i).copied().unwrap_or(1.0)) {
            return Verdict {
                accepted: i,
                outcome: Outcome::Residual(top_k(&p, k)),
            };
        }
    }
    let bonus = sample_from(&distribution(logits(drafts.len()), params), rng);
    Verdict {
        accepted: drafts.len(),
        outcome: Outcome::Token(bonus),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, top_p: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_p,
            seed: 0,
        }
    }

    #[test]
    fn greedy_accepts_the_matching_prefix_and_corrects_with_the_argmax() {
        let rows: Vec<Vec<f32>> = vec![
            vec![0.0, 5.0, 1.0], // argmax 1
            vec![3.0, 0.0, 1.0], // argmax 0
            vec![0.0, 0.0, 9.0], // argmax 2
        ];
        let mut rng = Rng::new(0);
        let v = judge(
            &[1, 2],
            &[1.0, 1.0],
            |i| &rows[i],
            &params(0.0, 1.0),
            &mut rng,
            8,
        );
        assert_eq!(v.accepted, 1);
        assert_eq!(v.outcome, Outcome::Token(0));
        let v = judge(
            &[1, 0],
            &[1.0, 1.0],
            |i| &rows[i],
            &params(0.0, 1.0),
            &mut rng,
            8,
        );
        assert_eq!(v.accepted, 2);
        assert_eq!(v.outcome, Outcome::Token(2), "bonus token");
        let v = judge(&[], &[], |i| &rows[i], &params(0.0, 1.0), &mut rng, 8);
        assert_eq!((v.accepted, v.outcome), (0, Outcome::Token(1)));
    }

    /// The whole protocol for one position, many times: the drafter draws x ~ q, the
    /// verifier judges with p, the drafter draws the correction from the top-K it gets.
    /// The committed token must be distributed as p.
    fn committed_frequencies(
        p_logits: &[f32],
        q: &[f32],
        sp: SamplingParams,
        k: usize,
    ) -> Vec<f64> {
        let v = p_logits.len();
        let n = 200_000;
        let mut draft_rng = Rng::new(11);
        let mut verify_rng = Rng::new(sp.seed);
        let q_dist: Vec<(u32, f32)> = q.iter().enumerate().map(|(i, &p)| (i as u32, p)).collect();
        let mut counts = vec![0usize; v];
        let rows = [p_logits.to_vec(), p_logits.to_vec()];
        for _ in 0..n {
            let x = sample_from(&q_dist, &mut draft_rng);
            let verdict = judge(
                &[x],
                &[q[x as usize]],
                |i| &rows[i],
                &sp,
                &mut verify_rng,
                k,
            );
            let token = match (verdict.accepted, verdict.outcome) {
                (1, _) => x,
                (0, Outcome::Residual(top)) => {
                    sample_correction(&top, |id| q[id as usize], &mut draft_rng)
                }
                other => panic!("unexpected verdict {other:?}"),
            };
            counts[token as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    #[test]
    fn separate_rejection_sampling_preserves_the_target_distribution() {
        let p_logits = [1.0f32, 0.2, -0.5, 2.0, 0.0];
        let q = [0.1f32, 0.5, 0.3, 0.05, 0.05];
        for (t, top_p) in [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)] {
            let sp = params(t, top_p);
            let p = distribution(&p_logits, &sp);
            // K covers p's support here, so the split is exact.
            let got = committed_frequencies(&p_logits, &q, sp, 5);
            let mut want = [0f64; 5];
            for (id, pr) in p {
                want[id as usize] = pr as f64;
            }
            for i in 0..5 {
                assert!(
                    (got[i] - want[i]).abs() < 0.006,
                    "T={t} top-p={top_p}, token {i}: {} vs {}",
                    got[i],
                    want[i]
                );
            }
        }
    }

    #[test]
    fn drafts_outside_the_nucleus_are_always_rejected() {
        let sp = params(1.0, 0.5);
        let rows = [vec![5.0f32, 0.0, 0.0], vec![5.0f32, 0.0, 0.0]];
        let mut rng = Rng::new(3);
        for _ in 0..100 {
            let v = judge(&[1], &[0.9], |i| &rows[i], &sp, &mut rng, 4);
            assert_eq!(v.accepted, 0);
            assert_eq!(v.outcome, Outcome::Residual(vec![(0, 1.0)]));
        }
    }

    #[test]
    fn residual_is_normalised_and_falls_back_to_p() {
        let p = [(0u32, 0.6f32), (1, 0.4)];
        let r = residual(&p, |id| [0.2f32, 0.6][id as usize]);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0], (0, 1.0));
        let same = residual(&p, |id| [0.6f32, 0.4][id as usize]);
        assert_eq!(same, p.to_vec());
        assert_eq!(
            top_k(&[(3, 0.1), (1, 0.5), (2, 0.4)], 2),
            vec![(1, 0.5), (2, 0.4)]
        );
    }
}
