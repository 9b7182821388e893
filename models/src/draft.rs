//! Running one sequence of a model wherever it lives: the draft-forward abstraction shared
//! by the host's wasi:nn backends, `tandem models generate` and the benchmarks, and the one
//! decode loop they use. The CPU engine implements it here; tandem-gpu implements it for a
//! sequence on a wgpu device.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::{KvCache, Model, Result};

/// What one forward of a sequence returns: the last position's argmax and, when asked,
/// its logits (a GPU reads back only what is returned).
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// The most likely next token.
    pub argmax: u32,
    /// The last row of logits, when asked for.
    pub logits: Option<Vec<f32>>,
}

/// One sequence of a model (its KV cache) on some backend.
pub trait DraftForward: Send + Sync {
    /// The model's vocabulary size.
    fn vocab_size(&self) -> usize;

    /// Runs `tokens` at positions `pos..`, first rolling back whatever lies at or after
    /// `pos`, and returns what the last position predicts.
    fn forward(&mut self, tokens: &[u32], pos: usize, want_logits: bool) -> Result<Forwarded>;
}

/// A sequence on the CPU engine.
pub struct CpuSequence {
    model: Arc<Model>,
    cache: KvCache,
}

impl CpuSequence {
    /// A new, empty sequence of `model`.
    pub fn new(model: Arc<Model>) -> Self {
        let cache = model.new_cache();
        CpuSequence { model, cache }
    }
}

impl CpuSequence {
    pub(crate) fn parts(&mut self) -> (&Model, &mut KvCache) {
        (&self.model, &mut self.cache)
    }

    pub(crate) fn parts_ref(&self) -> (&Model, &KvCache) {
        (&self.model, &self.cache)
    }
}

impl DraftForward for CpuSequence {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn forward(&mut self, tokens: &[u32], pos: usize, want_logits: bool) -> Result<Forwarded> {
        let logits = self.model.forward_last(tokens, pos, &mut self.cache)?;
        let last = logits.last();
        Ok(Forwarded {
            argmax: tandem_core::sampling::argmax(last),
            logits: want_logits.then(|| last.to_vec()),
        })
    }
}

/// Decodes after `prompt`: one prefill forward, then one forward per new token. `pick`
/// turns each forward's output into the next token (with `want_logits` the logits are
/// there to sample from; otherwise take the argmax); `on_token` sees each token in order,
/// with the sequence as it is then, and returns whether to go on. Stops after `max_new`
/// tokens (the last one is not run through the model). Returns the tokens.
pub fn decode<S: DraftForward + ?Sized, E: From<crate::Error>>(
    seq: &mut S,
    prompt: &[u32],
    max_new: usize,
    want_logits: bool,
    mut pick: impl FnMut(Forwarded) -> u32,
    mut on_token: impl FnMut(u32, &S) -> std::result::Result<bool, E>,
) -> std::result::Result<Vec<u32>, E> {
    let mut out = Vec::with_capacity(max_new);
    if max_new == 0 {
        return Ok(out);
    }
    let mut next = pick(seq.forward(prompt, 0, want_logits)?);
    loop {
        out.push(next);
        if !on_token(next, seq)? || out.len() == max_new {
            return Ok(out);
        }
        let pos = prompt.len() + out.len() - 1;
        next = pick(seq.forward(&[next], pos, want_logits)?);
    }
}

/// Where a model runs: parsed from `--gpu` (also in builds without a GPU backend, which
/// run `auto` and `off` on the CPU and refuse a name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum GpuChoice {
    /// The first hardware adapter; none (only software ones) means the CPU backend.
    #[default]
    Auto,
    /// The CPU backend.
    Off,
    /// The first adapter whose name contains this (case-insensitive), software ones included.
    Named(String),
}

impl FromStr for GpuChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "" => Err(
                "--gpu needs a value: auto, off or part of an adapter's name \
                       (`tandem gpu list` shows them)"
                    .into(),
            ),
            "auto" => Ok(GpuChoice::Auto),
            "off" | "cpu" | "none" => Ok(GpuChoice::Off),
            name => Ok(GpuChoice::Named(name.to_string())),
        }
    }
}

impl fmt::Display for GpuChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuChoice::Auto => f.write_str("auto"),
            GpuChoice::Off => f.write_str("off"),
            GpuChoice::Named(n) => f.write_str(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Predicts `last + 1`; its logits put the mass on `last + 2` (so sampling from them
    /// and taking the argmax differ). Records every forward.
    struct Counter {
        calls: Vec<(Vec<u32>, usize)>,
    }

    impl DraftForward for Counter {
        fn vocab_size(&self) -> usize {
            100
        }
        fn forward(&mut self, tokens: &[u32], pos: usize, want: bool) -> Result<Forwarded> {
            self.calls.push((tokens.to_vec(), pos));
            let last = *tokens.last().unwrap();
            let mut logits = vec![0.0; 100];
            logits[last as usize + 2] = 1.0;
            Ok(Forwarded {
                argmax: last + 1,
                logits: want.then_some(logits),
            })
        }
    }

    #[test]
    fn decode_runs_prefill_then_one_token_at_a_time_and_stops_when_told() {
        let mut c = Counter { calls: Vec::new() };
        let got =
            decode::<_, crate::Error>(&mut c, &[5, 6], 3, false, |f| f.argmax, |_, _| Ok(true));
        assert_eq!(got.unwrap(), vec![7, 8, 9]);
        assert_eq!(c.calls, vec![(vec![5, 6], 0), (vec![7], 2), (vec![8], 3)]);

        let mut c = Counter { calls: Vec::new() };
        let pick = |f: Forwarded| argmax_of(&f.logits.unwrap());
        let stop_at_11 = |t: u32, s: &Counter| Ok::<_, crate::Error>(t != 11 && s.calls.len() < 9);
        let got = decode(&mut c, &[5], 10, true, pick, stop_at_11).unwrap();
        assert_eq!(
            got,
            vec![7, 9, 11],
            "picked from the logits, stopped by on_token"
        );
        assert_eq!(c.calls.len(), 3);

        let mut c = Counter { calls: Vec::new() };
        let none = decode::<_, crate::Error>(&mut c, &[5], 0, false, |f| f.argmax, |_, _| Ok(true));
        assert!(none.unwrap().is_empty() && c.calls.is_empty());
    }

    fn argmax_of(v: &[f32]) -> u32 {
        tandem_core::sampling::argmax(v)
    }
}
