//! The batch scheduler: one thread per target gathers the forwards that sessions (verify
//! rounds, prompt chunks, completions' decoding steps) are waiting for and runs them as one
//! [`Model::forward_batch`](tandem_models::Model::forward_batch), so each weight is read once
//! for all of them (continuous batching: a session joins or leaves between forwards).
//!
//! Two first-in-first-out queues: rounds (verify blocks and decoding steps) and prompt
//! chunks (`--prefill-chunk` tokens each). A forward takes queued rounds in arrival order
//! while their rows fit in `--max-batch-tokens` (the first always), then one prompt chunk;
//! more chunks only when no round is waiting. So a round never waits behind more than one
//! chunk per forward, a prompt advances by at least a chunk per forward, and neither
//! starves: a round waits at most ⌈rows of rounds ahead of it / max-batch-tokens⌉ forwards,
//! a chunk at most one forward per chunk ahead of it. The bits do not depend on any of this:
//! the engine's forwards are batch-invariant.
//!
//! Targets on a GPU (`--device gpu`) batch their rounds the same way, through the backend
//! trait's [`forward_batch`](tandem_models::backend::TargetBackend::forward_batch): the
//! weight-reading kernels run once over every session's positions (up to 32 a batch), rope
//! and attention per session over its own cache, in one (with a hint, two) submissions. A
//! device's prompt chunks run on the session's own thread, outside the scheduler: they would
//! only add rows the whole batch computes the head for.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use tandem_models::backend::{BatchItem, Best, Block, ExitTo, Readback, VerifySequence};
use tandem_models::{Error, ExitLogits, KvCache, Logits, Rows, Step};

use crate::metrics::Metrics;
use crate::registry::Target;
use crate::session::Limits;

/// An exit layer's output during a forward: the CPU engine's hidden states (logits computed
/// on demand, a row at a time) or a device's best tokens.
pub enum ExitRows<'a> {
    /// From the CPU engine.
    Cpu(ExitLogits<'a>),
    /// From a device (computed there; 12 bytes a position read back).
    Device(&'a [Best]),
}

impl ExitRows<'_> {
    /// Positions.
    pub fn rows(&self) -> usize {
        match self {
            ExitRows::Cpu(e) => e.rows(),
            ExitRows::Device(b) => b.len(),
        }
    }

    /// Position `i`'s best token and, when `prob`, its probability (else 1).
    pub fn best(&self, i: usize, prob: bool) -> Option<(u32, f32)> {
        match self {
            ExitRows::Cpu(e) => {
                let row = e.row_logits(i).ok()?;
                let p = if prob {
                    tandem_core::sampling::top_probability(&row)
                } else {
                    1.0
                };
                Some((tandem_core::sampling::argmax(&row), p))
            }
            ExitRows::Device(b) => b.get(i).map(|b| (b.token, b.prob)),
        }
    }
}

/// Receives an exit layer's output during a forward.
pub type ExitSink = Box<dyn FnMut(ExitRows) + Send>;

/// A session's sequence: a KV cache of the CPU engine, or a sequence on a device.
pub enum Seq {
    /// On the CPU engine.
    Cpu(KvCache),
    /// On a device.
    Device(Box<dyn VerifySequence>),
}

impl Seq {
    /// Drops every position at or after `len`.
    pub fn truncate(&mut self, len: usize) {
        match self {
            Seq::Cpu(c) => c.truncate(len),
            Seq::Device(s) => s.truncate(len),
        }
    }

    /// Row `i` of the last forward's logits, where a device keeps them (after a forward
    /// that read top rows).
    pub fn row(&mut self, i: usize) -> tandem_models::Result<Vec<f32>> {
        match self {
            Seq::Cpu(_) => Err(Error::InvalidArgument(
                "a CPU sequence keeps no rows: its forwards return them".into(),
            )),
            Seq::Device(s) => s.row(i),
        }
    }

    /// Bytes its KV cache holds.
    pub fn size_bytes(&self) -> usize {
        match self {
            Seq::Cpu(c) => c.size_bytes(),
            Seq::Device(s) => s.cache_bytes(),
        }
    }
}

/// A target's scheduler: started by the first forward that asks for batching, stopped when
/// the target is dropped.
#[derive(Default)]
pub struct Batcher {
    queue: OnceLock<Sender<Job>>,
    forwards: AtomicU64,
}

struct Job {
    tokens: Vec<u32>,
    pos: usize,
    seq: Seq,
    rows: Rows,
    logits: bool,
    top: Option<f32>,
    exits: Vec<usize>,
    on_exit: ExitSink,
    queued: Instant,
    /// Forwards started before this job was queued.
    ticket: u64,
    /// A prompt chunk (the second queue).
    prefill: bool,
    reply: SyncSender<(Seq, tandem_models::Result<Block>)>,
}

/// One forward a session waits for.
pub struct Work<'a> {
    /// Input tokens.
    pub tokens: &'a [u32],
    /// Position of the first.
    pub pos: usize,
    /// Which positions produce logits.
    pub rows: Rows,
    /// With `Rows::All`: whether the whole rows are needed (sampling, log-probabilities),
    /// not just each position's best token. A device reads back only what is needed; the
    /// CPU engine always has the rows.
    pub logits: bool,
    /// With `Rows::All`: read each position's [`TopRow`](tandem_models::backend::TopRow)
    /// at this temperature instead of the rows (a device's sampling round; the CPU engine
    /// has the rows and ignores it).
    pub top: Option<f32>,
    /// Exit layer handed to `on_exit` (0: none).
    pub exit: usize,
    /// Receives the exit's output.
    pub on_exit: Option<ExitSink>,
    /// A chunk of a prompt (queued apart from rounds, see the module docs).
    pub prompt: bool,
}

impl Target {
    /// A new, empty sequence on this target's device.
    pub fn sequence(&self, limits: &Limits) -> tandem_models::Result<Seq> {
        match &self.backend {
            None => Ok(Seq::Cpu(self.model.new_cache_with(limits.kv_cache))),
            Some(b) => Ok(Seq::Device(b.clone().sequence()?)),
        }
    }

    /// Runs `work` over `seq` through this target's scheduler (batched with other sessions'
    /// work) or — with batching off, and for a device's prompt chunks — on the calling
    /// thread.
    pub fn forward(
        self: &Arc<Self>,
        seq: &mut Seq,
        work: Work,
        limits: &Limits,
        metrics: &Arc<Metrics>,
    ) -> tandem_models::Result<Block> {
        let exits: Vec<usize> = (work.exit > 0).then_some(work.exit).into_iter().collect();
        let alone = !limits.batching || (matches!(seq, Seq::Device(_)) && work.prompt);
        if alone {
            let mut sink = work.on_exit;
            return match seq {
                Seq::Cpu(cache) => {
                    let logits = self.model.forward_with_exits(
                        work.tokens,
                        work.pos,
                        cache,
                        work.rows,
                        &exits,
                        &mut |e| {
                            if let Some(s) = sink.as_mut() {
                                s(ExitRows::Cpu(e))
                            }
                        },
                    )?;
                    Ok(Block {
                        rows: Vec::new(),
                        logits: Some(logits),
                        top: Vec::new(),
                    })
                }
                Seq::Device(s) => {
                    let mut to = |rows: &[Best]| {
                        if let Some(f) = sink.as_mut() {
                            f(ExitRows::Device(rows))
                        }
                    };
                    let exit = exits.first().map(|&layer| ExitTo {
                        layer,
                        sink: &mut to,
                    });
                    s.forward(
                        work.tokens,
                        work.pos,
                        readback(work.rows, work.logits, work.top),
                        exit,
                    )
                }
            };
        }
        let queue = self.batcher.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel();
            let (weak, metrics) = (Arc::downgrade(self), metrics.clone());
            let budget = limits.max_batch_tokens;
            std::thread::Builder::new()
                .name(format!("batch {}", self.id()))
                .spawn(move || schedule(weak, rx, budget, metrics))
                .expect("starting the batch scheduler thread");
            tx
        });
        let (reply, answer) = mpsc::sync_channel(1);
        let job = Job {
            tokens: work.tokens.to_vec(),
            pos: work.pos,
            seq: std::mem::replace(seq, Seq::Cpu(KvCache::new(0, 0))),
            rows: work.rows,
            logits: work.logits,
            top: work.top,
            exits,
            on_exit: match work.on_exit {
                Some(f) => f,
                None => Box::new(|_| {}),
            },
            queued: Instant::now(),
            ticket: self.batcher.forwards.load(Ordering::SeqCst),
            prefill: work.prompt,
            reply,
        };
        let stopped = || Error::InvalidArgument("the target's batch scheduler stopped".into());
        queue.send(job).map_err(|_| stopped())?;
        let (back, result) = answer.recv().map_err(|_| stopped())?;
        *seq = back;
        result
    }

    /// Runs a prompt over `seq` from position 0 in chunks of `--prefill-chunk` tokens and
    /// returns the last position's logits.
    pub fn prefill(
        self: &Arc<Self>,
        seq: &mut Seq,
        tokens: &[u32],
        limits: &Limits,
        metrics: &Arc<Metrics>,
    ) -> tandem_models::Result<Logits> {
        let chunk = limits.prefill_chunk.max(1);
        let mut last = None;
        for (i, part) in tokens.chunks(chunk).enumerate() {
            let end = (i + 1) * chunk >= tokens.len();
            let work = Work {
                tokens: part,
                pos: i * chunk,
                rows: if end { Rows::Last } else { Rows::None },
                logits: true,
                top: None,
                exit: 0,
                on_exit: None,
                prompt: true,
            };
            last = Some(self.forward(seq, work, limits, metrics)?);
        }
        last.and_then(|b| b.logits)
            .ok_or_else(|| Error::InvalidArgument("a prompt needs at least one token".into()))
    }
}

/// The scheduler's loop: gather, forward, answer; ends when the target is dropped.
fn schedule(target: Weak<Target>, rx: Receiver<Job>, budget: usize, metrics: Arc<Metrics>) {
    // Rounds, then prompt chunks.
    let mut queues: [VecDeque<Job>; 2] = Default::default();
    loop {
        if queues.iter().all(VecDeque::is_empty) {
            match rx.recv() {
                Ok(j) => queues[j.prefill as usize].push_back(j),
                Err(_) => return,
            }
        }
        while let Ok(j) = rx.try_recv() {
            queues[j.prefill as usize].push_back(j);
        }
        let [rounds, chunks] = &mut queues;
        let mut rows = 0;
        let mut jobs = Vec::new();
        while let Some(j) = rounds.front()
            && (jobs.is_empty() || rows + j.tokens.len() <= budget)
        {
            rows += j.tokens.len();
            jobs.push(rounds.pop_front().unwrap());
        }
        let only_chunks = jobs.is_empty();
        while let Some(j) = chunks.front()
            && (!jobs.iter().any(|j: &Job| j.prefill)
                || (only_chunks && rows + j.tokens.len() <= budget))
        {
            rows += j.tokens.len();
            jobs.push(chunks.pop_front().unwrap());
        }
        // A job's submitter holds the target while it waits, so this only fails once no
        // one is waiting.
        let Some(target) = target.upgrade() else {
            return;
        };
        let started = Instant::now();
        let forward = target.batcher.forwards.fetch_add(1, Ordering::SeqCst);
        let waits: Vec<(f64, u64, bool)> = jobs
            .iter()
            .map(|j| {
                (
                    started.duration_since(j.queued).as_secs_f64(),
                    forward - j.ticket,
                    j.prefill,
                )
            })
            .collect();
        metrics.record_batch(jobs.len(), rows, &waits);
        let results = run(&target, &mut jobs);
        for (job, result) in jobs.into_iter().zip(results) {
            let _ = job.reply.send((job.seq, result));
        }
    }
}

/// What a device reads back for `rows` (with the whole rows when `logits`, top rows at a
/// temperature instead when `top`).
fn readback(rows: Rows, logits: bool, top: Option<f32>) -> Readback {
    match (rows, logits, top) {
        (Rows::None, ..) => Readback::Nothing,
        (Rows::Last, ..) => Readback::Last,
        (Rows::All, _, Some(t)) => Readback::Top(t),
        (Rows::All, false, None) => Readback::Rows,
        (Rows::All, true, None) => Readback::RowsAndLogits,
    }
}

/// One forward of `jobs`: those on the CPU engine as one `Model::forward_batch`, those on
/// a device as one [`TargetBackend::forward_batch`](tandem_models::backend::TargetBackend).
fn run(target: &Target, jobs: &mut [Job]) -> Vec<tandem_models::Result<Block>> {
    let mut results: Vec<Option<tandem_models::Result<Block>>> =
        jobs.iter().map(|_| None).collect();
    let (mut cpu_at, mut parts, mut cpu_sinks) = (Vec::new(), Vec::new(), Vec::new());
    let (mut dev_at, mut seqs, mut sinks) = (Vec::new(), Vec::new(), Vec::new());
    for (i, j) in jobs.iter_mut().enumerate() {
        let Job {
            seq,
            tokens,
            pos,
            rows,
            logits,
            top,
            exits,
            on_exit,
            ..
        } = j;
        match seq {
            Seq::Cpu(cache) => {
                cpu_at.push(i);
                parts.push((cache, &tokens[..], *pos, *rows, &exits[..]));
                cpu_sinks.push(move |e: ExitLogits| on_exit(ExitRows::Cpu(e)));
            }
            Seq::Device(s) => {
                dev_at.push(i);
                seqs.push((
                    s,
                    &tokens[..],
                    *pos,
                    readback(*rows, *logits, *top),
                    exits.first(),
                ));
                sinks.push(move |r: &[Best]| on_exit(ExitRows::Device(r)));
            }
        }
    }
    let mut steps: Vec<Step> = parts
        .into_iter()
        .zip(cpu_sinks.iter_mut())
        .map(|((cache, tokens, pos, rows, exits), sink)| Step {
            tokens,
            pos,
            cache,
            rows,
            exits,
            on_exit: sink,
        })
        .collect();
    for (i, out) in cpu_at
        .into_iter()
        .zip(target.model.forward_batch(&mut steps))
    {
        results[i] = Some(out.map(|logits| Block {
            rows: Vec::new(),
            logits: Some(logits),
            top: Vec::new(),
        }));
    }
    if !dev_at.is_empty() {
        let mut items: Vec<BatchItem> = seqs
            .into_iter()
            .zip(sinks.iter_mut())
            .map(|((seq, tokens, pos, want, exit), sink)| BatchItem {
                seq: &mut **seq,
                tokens,
                pos,
                want,
                exit: exit.map(|&layer| ExitTo { layer, sink }),
            })
            .collect();
        let outs = match &target.backend {
            Some(b) => b.clone().forward_batch(&mut items),
            None => items
                .iter()
                .map(|_| {
                    Err(Error::InvalidArgument(
                        "a device sequence on a CPU target".into(),
                    ))
                })
                .collect(),
        };
        for (i, out) in dev_at.into_iter().zip(outs) {
            results[i] = Some(out);
        }
    }
    results
        .into_iter()
        .map(|r| r.expect("every job answered"))
        .collect()
}
