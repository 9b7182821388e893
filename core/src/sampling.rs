//! Token sampling: greedy, or temperature + top-p with a seeded, portable RNG.
//!
//! The RNG is xoshiro256** seeded through splitmix64, written here so that the same seed
//! gives the same tokens on every platform (native, wasm32) and in every crate.

/// How to pick the next token from a distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Nucleus size in (0, 1]; 1 keeps the whole distribution.
    pub top_p: f32,
    /// Seed of the sampler's RNG.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// A bad sampling parameter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// Temperature is negative or not finite.
    #[error("temperature must be a finite number >= 0 (0 = greedy), got {0}")]
    Temperature(f32),
    /// top-p is outside (0, 1].
    #[error("top-p must be in (0, 1], got {0}")]
    TopP(f32),
}

impl SamplingParams {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        Ok(())
    }

    /// Whether this is greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// xoshiro256** (Blackman & Vigna), seeded by splitmix64.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator fully determined by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// A uniform number in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The softmax probability of the largest logit (a prediction's confidence).
pub fn top_probability(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
    (1.0 / sum) as f32
}

/// The sampling distribution over token ids that `params` defines on `logits`: softmax at
/// the temperature, restricted to the smallest set of most likely tokens whose mass reaches
/// top-p, renormalised. Greedy gives all mass to the argmax. Returned sorted by id.
pub fn distribution(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f32)> {
    if params.is_greedy() {
        return vec![(argmax(logits), 1.0)];
    }
    let t = params.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
        .collect();
    let sum: f64 = probs.iter().map(|p| p.1 as f64).sum();
    for p in probs.iter_mut() {
        p.1 = (p.1 as f64 / sum) as f32;
    }
    if params.top_p < 1.0 {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut mass = 0f64;
        let mut keep = 0;
        for p in &probs {
            keep += 1;
            mass += p.1 as f64;
            if mass >= params.top_p as f64 {
                break;
            }
        }
        probs.truncate(keep);
        let sum: f64 = probs.iter().map(|p| p.1 as f64).sum();
        for p in probs.iter_mut() {
            p.1 = (p.1 as f64 / sum) as f32;
        }
        probs.sort_by_key(|p| p.0);
    }
    probs
}

/// The probability of `id` in a distribution sorted by id (as [`distribution`] returns
/// it); 0 when absent.
pub fn prob_of(dist: &[(u32, f32)], id: u32) -> f32 {
    dist.binary_search_by_key(&id, |e| e.0)
        .map_or(0.0, |i| dist[i].1)
}

/// Draws one id from a distribution of `(id, probability)` pairs.
pub fn sample_from(dist: &[(u32, f32)], rng: &mut Rng) -> u32 {
    let total: f64 = dist.iter().map(|p| p.1 as f64).sum();
    let mut u = rng.uniform() * total;
    for &(id, p) in dist {
        u -= p as f64;
        if u < 0.0 {
            return id;
        }
    }
    dist.iter()
        .rev()
        .find(|p| p.1 > 0.0)
        .map_or(dist[0].0, |p| p.0)
}

/// Picks the next token: argmax when greedy, else a draw from [`distribution`].
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    if params.is_greedy() {
        argmax(logits)
    } else {
        sample_from(&distribution(logits, params), rng)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn top_probability_is_the_softmax_maximum() {
        assert!((top_probability(&[0.0, 0.0]) - 0.5).abs() < 1e-6);
        let p = top_probability(&[2.0, 1.0, 0.0]);
        let z = 1.0 + (-1f32).exp() + (-2f32).exp();
        assert!((p - 1.0 / z).abs() < 1e-6);
    }

    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let p = SamplingParams::default();
        let mut rng = Rng::new(1);
        assert_eq!(sample(&[0.1, 3.0, 2.9], &p, &mut rng), 1);
    }

    #[test]
    fn same_seed_same_draws_and_frequencies_follow_softmax() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln()];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: 7,
        };
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..60_000)
                .map(|_| sample(&logits, &p, &mut rng))
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        let mut counts = [0usize; 3];
        for t in a {
            counts[t as usize] += 1;
        }
        for (i, want) in [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0].iter().enumerate() {
            let got = counts[i] as f64 / 60_000.0;
            assert!((got - want).abs() < 0.01, "token {i}: {got} vs {want}");
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        let logits = [(0.5f32).ln(), (0.3f32).ln(), (0.2f32).ln()];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.75,
            seed: 0,
        };
        let d = distribution(&logits, &p);
        assert_eq!(d.len(), 2);
        assert!((d[0].1 - 0.625).abs() < 1e-5 && (d[1].1 - 0.375).abs() < 1e-5);
    }

    #[test]
    fn bad_parameters_are_rejected() {
        let bad_t = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(bad_t.validate().is_err());
        let bad_p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(bad_p.validate().is_err());
    }
}
