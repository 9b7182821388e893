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

/// What a sampling round needs of one row of logits, computed where the logits are (a
/// device reads these back instead of the row).
#[derive(Debug, Clone, PartialEq)]
pub struct TopRow {
    /// The largest logit.
    pub max: f32,
    /// The softmax normalizer: the sum of exp((l − max) / T) over the row at the session's
    /// temperature T.
    pub z: f32,
    /// The logit of the row's next input token (the draft the row judges).
    pub next: f32,
    /// The largest logits with their ids, larger first (lower id first among equals).
    pub top: Vec<(u32, f32)>,
}

impl TopRow {
    /// A row's [`TopRow`] computed here (the sum in f64, as [`distribution`] sums), with
    /// `entries` top entries; `next` is the row's next input token.
    pub fn of(row: &[f32], next: Option<u32>, temperature: f32, entries: usize) -> TopRow {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = row
            .iter()
            .map(|&l| ((l - max) / temperature).exp() as f64)
            .sum();
        let mut ids: Vec<u32> = (0..row.len() as u32).collect();
        let by = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
        let k = entries.min(row.len());
        if k < ids.len() {
            ids.select_nth_unstable_by(k, by);
            ids.truncate(k);
        }
        ids.sort_by(by);
        TopRow {
            max,
            z: z as f32,
            next: next.map_or(0.0, |t| row[t as usize]),
            top: ids.into_iter().map(|i| (i, row[i as usize])).collect(),
        }
    }

    /// The probability of a logit `l` in this row at `temperature`, as
    /// [`distribution`] computes it with `z` as the sum.
    fn p(&self, l: f32, temperature: f32) -> f32 {
        (((l - self.max) / temperature).exp() as f64 / self.z as f64) as f32
    }

    /// The top entries' probabilities, sorted as [`top_k`] sorts.
    fn entries(&self, params: &SamplingParams) -> Vec<(u32, f32)> {
        let e: Vec<(u32, f32)> = self
            .top
            .iter()
            .map(|&(id, l)| (id, self.p(l, params.temperature)))
            .collect();
        top_k(&e, e.len())
    }

    /// The row's distribution after top-p, sorted by id as [`distribution`] returns it,
    /// when the nucleus closes within the top entries (`None`: top-p is off, or the nucleus
    /// reaches past them).
    fn nucleus(&self, params: &SamplingParams) -> Option<Vec<(u32, f32)>> {
        if params.top_p >= 1.0 {
            return None;
        }
        let mut probs = self.entries(params);
        let mut mass = 0f64;
        let keep = probs.iter().position(|p| {
            mass += p.1 as f64;
            mass >= params.top_p as f64
        })?;
        // Entries past the top ones could tie the last kept one's probability.
        if keep + 1 >= self.top.len() {
            return None;
        }
        probs.truncate(keep + 1);
        let sum: f64 = probs.iter().map(|p| p.1 as f64).sum();
        for p in probs.iter_mut() {
            p.1 = (p.1 as f64 / sum) as f32;
        }
        probs.sort_by_key(|p| p.0);
        Some(probs)
    }
}

/// [`judge`] for sampling parameters from each row's [`TopRow`] instead of its logits: p(x)
/// from the row's normalizer and the draft's logit, the nucleus, the residual's top-K
/// (`k` below the rows' top entries) from the top entries. `row(i)` fetches row `i`'s
/// logits where those do not suffice: a nucleus that reaches past the top entries, and the
/// bonus token without top-p (drawn over the whole vocabulary in id order, as [`judge`]
/// draws it). The same rule as [`judge`], with the normalizer summed where the logits are.
pub fn judge_top<E>(
    drafts: &[u32],
    q: &[f32],
    rows: &[TopRow],
    params: &SamplingParams,
    rng: &mut Rng,
    k: usize,
    mut row: impl FnMut(usize) -> Result<Vec<f32>, E>,
) -> Result<Verdict, E> {
    for (i, &x) in drafts.iter().enumerate() {
        let r = &rows[i];
        let nucleus = r.nucleus(params);
        let whole = match (&nucleus, params.top_p < 1.0) {
            (None, true) => Some(distribution(&row(i)?, params)),
            _ => None,
        };
        let p_x = match (&nucleus, &whole) {
            (Some(d), _) | (None, Some(d)) => prob_of(d, x),
            (None, None) => r.p(r.next, params.temperature),
        };
        let u = rng.uniform();
        if u >= acceptance_probability(p_x, q.get(i).copied().unwrap_or(1.0)) {
            let top = match (&nucleus, &whole) {
                (Some(d), _) | (None, Some(d)) => top_k(d, k),
                (None, None) => {
                    let mut e = r.entries(params);
                    e.retain(|p| p.1 > 0.0);
                    e.truncate(k.max(1));
                    e
                }
            };
            return Ok(Verdict {
                accepted: i,
                outcome: Outcome::Residual(top),
            });
        }
    }
    let g = drafts.len();
    let bonus = match rows[g].nucleus(params) {
        Some(d) => sample_from(&d, rng),
        None => sample_from(&distribution(&row(g)?, params), rng),
    };
    Ok(Verdict {
        accepted: g,
        outcome: Outcome::Token(bonus),
    })
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

    /// Verdicts from top rows (the normalizer rounded to f32, as a device returns it) are
    /// [`judge`]'s on the rows themselves: acceptances, bonus tokens and the residual's
    /// ids the same, its probabilities within f32 rounding — with top-p off (p(x) from the
    /// normalizer, the bonus from the whole row), on (the nucleus within the top entries)
    /// and wide (a nucleus past them: the whole row fetched).
    #[test]
    fn top_rows_give_the_verdicts_of_whole_rows() {
        let mut draw = Rng::new(7);
        // Peaked rows (a few likely tokens over a long tail), as a model's are.
        let rows: Vec<Vec<f32>> = (0..6)
            .map(|_| {
                (0..3000)
                    .map(|i| {
                        let boost = if i % 997 == 3 { 11.0 } else { 0.0 };
                        (draw.uniform() as f32 - 0.5) * 6.0 + boost
                    })
                    .collect()
            })
            .collect();
        let (mut rejected, mut fetched, mut tokens) = (0, 0, 0);
        for p in [
            params(1.0, 1.0),
            params(0.7, 0.9),
            params(1.3, 0.5),
            params(2.0, 0.99),
        ] {
            for seed in 0..200u64 {
                // Drafts among each row's three likeliest tokens, q in (0.02, 0.22].
                let drafts: Vec<u32> = (0..5)
                    .map(|i| {
                        let e = TopRow::of(&rows[i], None, p.temperature, 8);
                        e.top[(draw.uniform() * 3.0) as usize].0
                    })
                    .collect();
                let q: Vec<f32> = (0..5).map(|_| 0.02 + 0.2 * draw.uniform() as f32).collect();
                let tops: Vec<TopRow> = (0..6)
                    .map(|i| TopRow::of(&rows[i], drafts.get(i).copied(), p.temperature, 64))
                    .collect();
                let want = judge(&drafts, &q, |i| &rows[i], &p, &mut Rng::new(seed), 32);
                let mut calls = 0;
                let got = judge_top(&drafts, &q, &tops, &p, &mut Rng::new(seed), 32, |i| {
                    calls += 1;
                    Ok::<_, ()>(rows[i].clone())
                })
                .unwrap();
                fetched += calls;
                assert_eq!(got.accepted, want.accepted, "{p:?} seed {seed}");
                match (&got.outcome, &want.outcome) {
                    (Outcome::Token(a), Outcome::Token(b)) => {
                        assert_eq!(a, b, "{p:?} seed {seed}");
                        tokens += 1;
                    }
                    (Outcome::Residual(a), Outcome::Residual(b)) => {
                        assert_eq!(a.len(), b.len(), "{p:?} seed {seed}");
                        for (x, y) in a.iter().zip(b) {
                            assert_eq!(x.0, y.0, "{p:?} seed {seed}");
                            assert!((x.1 / y.1 - 1.0).abs() < 1e-5, "{p:?} seed {seed}");
                        }
                        rejected += 1;
                    }
                    other => panic!("{p:?} seed {seed}: {other:?}"),
                }
            }
        }
        // Every path was taken.
        assert!(rejected > 100 && tokens > 20, "{rejected} {tokens}");
        assert!(fetched > 0, "no whole row was ever needed");
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
