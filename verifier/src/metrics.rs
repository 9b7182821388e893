//! Counters for `GET /metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the latency histograms' buckets.
const SECONDS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upper bounds of the batch size histograms' buckets (sessions, rows).
const SIZES: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
/// Tokens per second per target are counted over windows of this length.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// A Prometheus histogram over fixed buckets.
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (c, &b) in self.counts.iter_mut().zip(self.bounds) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            self.count, self.sum, self.count
        );
    }
}

/// Committed tokens of one target, and their rate over the last complete window.
struct TargetTokens {
    total: u64,
    window_start: Instant,
    in_window: u64,
    rate: f64,
}

/// Latency histograms count seconds.
impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(&SECONDS)
    }
}

/// What the batch schedulers did.
struct Batches {
    sessions: Histogram,
    rows: Histogram,
    wait: Histogram,
    /// Most forwards a round, and a prompt chunk, waited through before its own.
    max_forwards_waited: [u64; 2],
}

impl Default for Batches {
    fn default() -> Self {
        Batches {
            sessions: Histogram::new(&SIZES),
            rows: Histogram::new(&SIZES),
            wait: Histogram::default(),
            max_forwards_waited: [0; 2],
        }
    }
}

/// Server-wide counters.
#[derive(Default)]
pub struct Metrics {
    sessions_active: AtomicI64,
    sessions_total: AtomicU64,
    sessions_refused: AtomicU64,
    rounds: AtomicU64,
    drafted: AtomicU64,
    accepted: AtomicU64,
    generated: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    unauthorized: AtomicU64,
    connections_refused: AtomicU64,
    kv_in_use: AtomicI64,
    kv_reserved: AtomicI64,
    queue_waiting: AtomicI64,
    queued: AtomicU64,
    queue_timeouts: AtomicU64,
    verify: Mutex<Histogram>,
    batches: Mutex<Batches>,
    targets: Mutex<BTreeMap<String, TargetTokens>>,
}

impl Metrics {
    /// A session (stream or completion) started.
    pub fn session_started(&self) {
        self.sessions_active.fetch_add(1, Ordering::SeqCst);
        self.sessions_total.fetch_add(1, Ordering::Relaxed);
    }

    /// A session ended.
    pub fn session_ended(&self) {
        self.sessions_active.fetch_sub(1, Ordering::SeqCst);
    }

    /// Sessions open now.
    pub fn sessions_active(&self) -> i64 {
        self.sessions_active.load(Ordering::SeqCst)
    }

    /// A session was refused (limit, incompatible drafter).
    pub fn session_refused(&self) {
        self.sessions_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A request without a valid bearer token.
    pub fn unauthorized(&self) {
        self.unauthorized.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection closed on accept because `--max-connections` were open.
    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Tokens committed on `target` outside verify rounds (first tokens, completions).
    pub fn add_generated(&self, target: &str, n: usize) {
        self.generated.fetch_add(n as u64, Ordering::Relaxed);
        let mut targets = self.targets.lock().unwrap();
        let now = Instant::now();
        let t = targets
            .entry(target.to_string())
            .or_insert_with(|| TargetTokens {
                total: 0,
                window_start: now,
                in_window: 0,
                rate: 0.0,
            });
        t.total += n as u64;
        let span = now.duration_since(t.window_start);
        if span >= RATE_WINDOW {
            t.rate = t.in_window as f64 / span.as_secs_f64();
            t.window_start = now;
            t.in_window = 0;
        }
        t.in_window += n as u64;
    }

    /// A session's KV cache grew (or shrank, negative) by `delta` bytes.
    pub fn add_kv_bytes(&self, delta: i64) {
        self.kv_in_use.fetch_add(delta, Ordering::SeqCst);
    }

    /// Bytes held by all sessions' KV caches now.
    pub fn kv_in_use(&self) -> i64 {
        self.kv_in_use.load(Ordering::SeqCst)
    }

    /// Reserves `bytes` of KV memory under `cap`; when they do not fit, nothing is reserved
    /// and the error holds the bytes others have reserved.
    pub fn reserve_kv(&self, bytes: usize, cap: Option<usize>) -> Result<(), usize> {
        let mut cur = self.kv_reserved.load(Ordering::SeqCst);
        loop {
            if let Some(cap) = cap
                && cur as usize + bytes > cap
            {
                return Err(cur as usize);
            }
            match self.kv_reserved.compare_exchange(
                cur,
                cur + bytes as i64,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    /// Returns a reservation made with [`Metrics::reserve_kv`].
    pub fn release_kv(&self, bytes: usize) {
        self.kv_reserved.fetch_sub(bytes as i64, Ordering::SeqCst);
    }

    /// A session started waiting for a free place.
    pub fn queue_entered(&self) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.queue_waiting.fetch_add(1, Ordering::SeqCst);
    }

    /// A session stopped waiting (`timed_out`: it was refused).
    pub fn queue_left(&self, timed_out: bool) {
        self.queue_waiting.fetch_sub(1, Ordering::SeqCst);
        if timed_out {
            self.queue_timeouts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sessions waiting for a free place now.
    pub fn queue_waiting(&self) -> i64 {
        self.queue_waiting.load(Ordering::SeqCst)
    }

    /// One batched forward: `sessions` pieces of work, `rows` tokens, and each piece's wait
    /// (seconds queued, forwards started while it was queued, whether it is a prompt chunk).
    pub fn record_batch(&self, sessions: usize, rows: usize, waits: &[(f64, u64, bool)]) {
        let mut b = self.batches.lock().unwrap();
        b.sessions.observe(sessions as f64);
        b.rows.observe(rows as f64);
        for &(seconds, forwards, chunk) in waits {
            b.wait.observe(seconds);
            let m = &mut b.max_forwards_waited[chunk as usize];
            *m = (*m).max(forwards);
        }
    }

    /// The most forwards a round (`chunk` false) or a prompt chunk waited through before
    /// its own.
    pub fn max_forwards_waited(&self, chunk: bool) -> u64 {
        self.batches.lock().unwrap().max_forwards_waited[chunk as usize]
    }

    /// Bytes received on session streams.
    pub fn add_bytes_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes sent on session streams.
    pub fn add_bytes_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// One verify round on `target`: `drafted` tokens, `accepted` of them, and its time
    /// (queueing included).
    pub fn record_round(&self, target: &str, drafted: usize, accepted: usize, took: Duration) {
        self.rounds.fetch_add(1, Ordering::Relaxed);
        self.drafted.fetch_add(drafted as u64, Ordering::Relaxed);
        self.accepted.fetch_add(accepted as u64, Ordering::Relaxed);
        self.add_generated(target, accepted + 1);
        self.verify.lock().unwrap().observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut put = |name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        put(
            "tandem_sessions_active",
            "gauge",
            "Sessions open now.",
            self.sessions_active().to_string(),
        );
        put(
            "tandem_sessions_total",
            "counter",
            "Sessions opened.",
            g(&self.sessions_total),
        );
        put(
            "tandem_sessions_refused_total",
            "counter",
            "Sessions refused (limits, incompatible drafters).",
            g(&self.sessions_refused),
        );
        put(
            "tandem_rounds_total",
            "counter",
            "Verify rounds.",
            g(&self.rounds),
        );
        put(
            "tandem_tokens_drafted_total",
            "counter",
            "Draft tokens received for verification.",
            g(&self.drafted),
        );
        put(
            "tandem_tokens_accepted_total",
            "counter",
            "Draft tokens accepted.",
            g(&self.accepted),
        );
        put(
            "tandem_tokens_generated_total",
            "counter",
            "Tokens committed (accepted drafts, bonus and correction tokens, first tokens, completions).",
            g(&self.generated),
        );
        put(
            "tandem_bytes_in_total",
            "counter",
            "Bytes received on session streams.",
            g(&self.bytes_in),
        );
        put(
            "tandem_bytes_out_total",
            "counter",
            "Bytes sent on session streams.",
            g(&self.bytes_out),
        );
        put(
            "tandem_unauthorized_total",
            "counter",
            "Requests refused for a missing or wrong bearer token.",
            g(&self.unauthorized),
        );
        put(
            "tandem_connections_refused_total",
            "counter",
            "Connections closed on accept at --max-connections.",
            g(&self.connections_refused),
        );
        put(
            "tandem_kv_cache_bytes",
            "gauge",
            "Bytes held by the sessions' KV caches now.",
            self.kv_in_use().to_string(),
        );
        put(
            "tandem_kv_cache_reserved_bytes",
            "gauge",
            "KV cache bytes reserved by open sessions (their whole contexts; capped by --kv-memory-mb).",
            self.kv_reserved.load(Ordering::SeqCst).to_string(),
        );
        put(
            "tandem_queue_waiting",
            "gauge",
            "Sessions waiting for a free place (--max-sessions reached).",
            self.queue_waiting().to_string(),
        );
        put(
            "tandem_queued_total",
            "counter",
            "Sessions that had to wait for a free place.",
            g(&self.queued),
        );
        put(
            "tandem_queue_timeouts_total",
            "counter",
            "Sessions refused after waiting --queue-timeout for a place.",
            g(&self.queue_timeouts),
        );
        let b = self.batches.lock().unwrap();
        let _ = writeln!(
            out,
            "# HELP tandem_batch_max_forwards_waited Most forwards a round or a prompt chunk waited through before its own (fairness).\n# TYPE tandem_batch_max_forwards_waited gauge"
        );
        for (kind, v) in ["round", "prompt"].iter().zip(b.max_forwards_waited) {
            let _ = writeln!(
                out,
                "tandem_batch_max_forwards_waited{{kind=\"{kind}\"}} {v}"
            );
        }
        self.verify.lock().unwrap().render(
            &mut out,
            "tandem_verify_seconds",
            "Time of one verify round, queueing included.",
        );
        b.sessions.render(
            &mut out,
            "tandem_batch_sessions",
            "Pieces of work (verify rounds, prompt chunks, decoding steps) per batched forward.",
        );
        b.rows
            .render(&mut out, "tandem_batch_rows", "Tokens per batched forward.");
        b.wait.render(
            &mut out,
            "tandem_batch_queue_seconds",
            "Time a piece of work waited for its batched forward.",
        );
        drop(b);
        let targets = self.targets.lock().unwrap();
        let _ = writeln!(
            out,
            "# HELP tandem_target_tokens_total Tokens committed per target.\n# TYPE tandem_target_tokens_total counter"
        );
        for (id, t) in targets.iter() {
            let _ = writeln!(
                out,
                "tandem_target_tokens_total{{target=\"{id}\"}} {}",
                t.total
            );
        }
        let _ = writeln!(
            out,
            "# HELP tandem_target_tokens_per_second Tokens committed per second per target, over the last complete {} s window.\n# TYPE tandem_target_tokens_per_second gauge",
            RATE_WINDOW.as_secs()
        );
        for (id, t) in targets.iter() {
            let _ = writeln!(
                out,
                "tandem_target_tokens_per_second{{target=\"{id}\"}} {}",
                t.rate
            );
        }
        out
    }
}
