//! The verifier's half of the backend interface whose drafting half is
//! [`DraftForward`](crate::DraftForward): a target model loaded on some device
//! ([`TargetBackend`]) and one session's sequence on it ([`VerifySequence`]), shaped like a
//! wasi-nn backend (load a graph, open execution contexts, compute, read outputs). The CPU
//! engine implements it here; tandem-gpu for a wgpu device; a native CUDA backend would
//! implement the same two traits.
//!
//! The verifier runs CPU targets through its batch scheduler (`Model::forward_batch` over
//! several sessions' caches) and every other backend through these traits, batching rounds
//! with [`TargetBackend::forward_batch`].

use std::any::Any;
use std::sync::Arc;

pub use tandem_core::accept::TopRow;
use tandem_core::sampling::{argmax, top_probability};

use crate::{CpuSequence, Logits, Result, Rows};

/// The best token of one position, as a backend computes it where the logits are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Best {
    /// Argmax of the position's logits (lowest index among equal maxima).
    pub token: u32,
    /// Its logit.
    pub logit: f32,
    /// Its softmax probability (how a device sums it is the backend's: not bit-exact
    /// across backends, and used only for the hint-confidence threshold).
    pub prob: f32,
}

impl Best {
    /// The best token of a row of logits, on the CPU.
    pub fn of(row: &[f32]) -> Best {
        let token = argmax(row);
        Best {
            token,
            logit: row[token as usize],
            prob: top_probability(row),
        }
    }
}

/// What a forward reads back from the device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Readback {
    /// Nothing (a prompt chunk before the last): the forward only extends the KV cache.
    Nothing,
    /// The last position's logits (the end of a prompt).
    Last,
    /// Every position's best token: all a greedy verify block needs.
    Rows,
    /// Every position's best token and logits (sampling, log-probabilities).
    RowsAndLogits,
    /// Every position's [`TopRow`] at a temperature: what a sampling round needs, with
    /// [`VerifySequence::row`] for a whole row where it does not suffice.
    Top(f32),
}

/// What a forward returned.
#[derive(Debug, Clone, Default)]
pub struct Block {
    /// Every position's best token ([`Readback::Rows`] and [`Readback::RowsAndLogits`]).
    pub rows: Vec<Best>,
    /// Logits as asked: the last row ([`Readback::Last`]) or every row.
    pub logits: Option<Logits>,
    /// Every position's [`TopRow`] ([`Readback::Top`]).
    pub top: Vec<TopRow>,
}

/// An early exit: after block `layer` (1 ≤ layer < n_layer), `sink` gets every position's
/// best token under the final norm and output head, as soon as the backend has it — before
/// the rest of the forward is done.
pub struct ExitTo<'a> {
    /// Blocks computed before the exit.
    pub layer: usize,
    /// Receives each position's best token at the exit.
    pub sink: &'a mut (dyn FnMut(&[Best]) + Send),
}

/// One session's sequence of a target model (its KV cache) on a backend.
pub trait VerifySequence: Send {
    /// Runs `tokens` at positions `pos..` (rolling back whatever lies at or after `pos`,
    /// which must not exceed [`VerifySequence::len`]) and reads back what `want` asks for.
    /// A position's results do not depend on how many tokens share the forward.
    fn forward(
        &mut self,
        tokens: &[u32],
        pos: usize,
        want: Readback,
        exit: Option<ExitTo>,
    ) -> Result<Block>;

    /// Positions held.
    fn len(&self) -> usize;

    /// Whether it holds none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every position at or after `len`.
    fn truncate(&mut self, len: usize);

    /// Bytes its KV cache holds on the backend.
    fn cache_bytes(&self) -> usize;

    /// Itself, for its backend to find its own sequences in a batch.
    fn as_any(&mut self) -> &mut dyn Any;

    /// Row `i` of the last forward's logits, where the backend keeps them (after a
    /// [`Readback::Top`] forward).
    fn row(&mut self, i: usize) -> Result<Vec<f32>> {
        Err(crate::Error::InvalidArgument(format!(
            "this backend keeps no rows of logits (row {i} asked for)"
        )))
    }
}

/// One sequence's forward in a [`TargetBackend::forward_batch`].
pub struct BatchItem<'a> {
    /// A sequence this backend opened.
    pub seq: &'a mut dyn VerifySequence,
    /// Its tokens.
    pub tokens: &'a [u32],
    /// Position of the first.
    pub pos: usize,
    /// What to read back.
    pub want: Readback,
    /// An early exit.
    pub exit: Option<ExitTo<'a>>,
}

/// A target model loaded on a backend.
pub trait TargetBackend: Send + Sync {
    /// Where it runs, for logs and `/admin/targets` (e.g. `cpu`, `gpu: llvmpipe (…)`).
    fn device(&self) -> String;

    /// A new, empty sequence.
    fn sequence(self: Arc<Self>) -> Result<Box<dyn VerifySequence>>;

    /// Runs several sequences' forwards, sharing what the backend can share among them
    /// (each weight read once for all); each item's result is bitwise what its own
    /// [`VerifySequence::forward`] gives. Results in the items' order. By default, one
    /// forward after another.
    fn forward_batch(self: Arc<Self>, items: &mut [BatchItem]) -> Vec<Result<Block>> {
        items
            .iter_mut()
            .map(|it| it.seq.forward(it.tokens, it.pos, it.want, it.exit.take()))
            .collect()
    }
}

impl VerifySequence for CpuSequence {
    fn forward(
        &mut self,
        tokens: &[u32],
        pos: usize,
        want: Readback,
        exit: Option<ExitTo>,
    ) -> Result<Block> {
        let (model, cache) = self.parts();
        let rows = match want {
            Readback::Nothing => Rows::None,
            Readback::Last => Rows::Last,
            Readback::Rows | Readback::RowsAndLogits | Readback::Top(_) => Rows::All,
        };
        let exits: Vec<usize> = exit.as_ref().map(|e| e.layer).into_iter().collect();
        let mut sink = exit.map(|e| e.sink);
        let logits = model.forward_with_exits(tokens, pos, cache, rows, &exits, &mut |e| {
            if let (Some(sink), Ok(l)) = (sink.as_mut(), e.logits()) {
                let best: Vec<Best> = (0..l.rows()).map(|i| Best::of(l.row(i))).collect();
                sink(&best);
            }
        })?;
        let best = match want {
            Readback::Rows | Readback::RowsAndLogits => (0..logits.rows())
                .map(|i| Best::of(logits.row(i)))
                .collect(),
            _ => Vec::new(),
        };
        let top = match want {
            Readback::Top(t) => (0..logits.rows())
                .map(|i| TopRow::of(logits.row(i), tokens.get(i + 1).copied(), t, TOP_ENTRIES))
                .collect(),
            _ => Vec::new(),
        };
        let keep = matches!(
            want,
            Readback::Last | Readback::RowsAndLogits | Readback::Top(_)
        );
        Ok(Block {
            rows: best,
            logits: keep.then_some(logits),
            top,
        })
    }

    fn len(&self) -> usize {
        self.parts_ref().1.len()
    }

    fn truncate(&mut self, len: usize) {
        self.parts().1.truncate(len)
    }

    fn cache_bytes(&self) -> usize {
        self.parts_ref().1.size_bytes()
    }

    fn as_any(&mut self) -> &mut dyn Any {
        self
    }
}

/// Entries of a [`TopRow`]: a device computes this many.
pub const TOP_ENTRIES: usize = 64;

/// The largest residual top-K a sampling round takes from [`TopRow`]s (the other entries
/// are margin for ties at the boundary); a larger `--top-k` reads whole rows.
pub const TOP_ROWS_MAX_K: usize = TOP_ENTRIES - 8;

/// The most tokens a [`Readback::Top`] forward takes (a backend keeps that many rows of
/// logits for [`VerifySequence::row`]).
pub const TOP_ROWS_MAX_TOKENS: usize = 32;

/// A target on the CPU engine, behind the backend traits (the verifier's scheduler uses the
/// [`Model`](crate::Model) directly; this serves comparisons through one interface).
pub struct CpuTarget(pub Arc<crate::Model>);

impl TargetBackend for CpuTarget {
    fn device(&self) -> String {
        "cpu".into()
    }

    fn sequence(self: Arc<Self>) -> Result<Box<dyn VerifySequence>> {
        Ok(Box::new(CpuSequence::new(self.0.clone())))
    }
}
