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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use tandem_models::{Error, ExitLogits, KvCache, Logits, Rows, Step};

use crate::metrics::Metrics;
use crate::registry::Target;
use crate::session::Limits;

/// Receives an exit layer's logits during a forward.
pub type ExitSink = Box<dyn FnMut(ExitLogits) + Send>;

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
    cache: KvCache,
    rows: Rows,
    exits: Vec<usize>,
    on_exit: ExitSink,
    queued: Instant,
    /// Forwards started before this job was queued.
    ticket: u64,
    /// A prompt chunk (the second queue).
    prefill: bool,
    reply: SyncSender<(KvCache, tandem_models::Result<Logits>)>,
}

/// One forward a session waits for.
pub struct Work<'a> {
    /// Input tokens.
    pub tokens: &'a [u32],
    /// Position of the first.
    pub pos: usize,
    /// Which positions produce logits.
    pub rows: Rows,
    /// Exit layer handed to `on_exit` (0: none).
    pub exit: usize,
    /// Receives the exit's logits.
    pub on_exit: Option<ExitSink>,
    /// A chunk of a prompt (queued apart from rounds, see the module docs).
    pub prompt: bool,
}

impl Target {
    /// Runs `work` over `cache`: through this target's scheduler, batched with other
    /// sessions' work, or — with batching off — on the calling thread.
    pub fn forward(
        self: &Arc<Self>,
        cache: &mut KvCache,
        work: Work,
        limits: &Limits,
        metrics: &Arc<Metrics>,
    ) -> tandem_models::Result<Logits> {
        let exits: Vec<usize> = (work.exit > 0).then_some(work.exit).into_iter().collect();
        if !limits.batching {
            let mut sink = work.on_exit;
            return self.model.forward_with_exits(
                work.tokens,
                work.pos,
                cache,
                work.rows,
                &exits,
                &mut |e| {
                    if let Some(s) = sink.as_mut() {
                        s(e)
                    }
                },
            );
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
            cache: std::mem::replace(cache, KvCache::new(0, 0)),
            rows: work.rows,
            exits,
            on_exit: work.on_exit.unwrap_or_else(|| Box::new(|_| {})),
            queued: Instant::now(),
            ticket: self.batcher.forwards.load(Ordering::SeqCst),
            prefill: work.prompt,
            reply,
        };
        let stopped = || Error::InvalidArgument("the target's batch scheduler stopped".into());
        queue.send(job).map_err(|_| stopped())?;
        let (back, result) = answer.recv().map_err(|_| stopped())?;
        *cache = back;
        result
    }

    /// Runs a prompt over `cache` from position 0 in chunks of `--prefill-chunk` tokens and
    /// returns the last position's logits.
    pub fn prefill(
        self: &Arc<Self>,
        cache: &mut KvCache,
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
                exit: 0,
                on_exit: None,
                prompt: true,
            };
            last = Some(self.forward(cache, work, limits, metrics)?);
        }
        last.ok_or_else(|| Error::InvalidArgument("a prompt needs at least one token".into()))
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
        let results = {
            let mut steps: Vec<Step> = jobs
                .iter_mut()
                .map(|j| Step {
                    tokens: &j.tokens,
                    pos: j.pos,
                    cache: &mut j.cache,
                    rows: j.rows,
                    exits: &j.exits,
                    on_exit: &mut *j.on_exit,
                })
                .collect();
            target.model.forward_batch(&mut steps)
        };
        for (job, result) in jobs.into_iter().zip(results) {
            let _ = job.reply.send((job.cache, result));
        }
    }
}
