//! Counters for `GET /metrics` (Prometheus text format).

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the verify latency histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
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
    verify: Mutex<Histogram>,
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

    /// Tokens committed outside verify rounds (first tokens, completions).
    pub fn add_generated(&self, n: usize) {
        self.generated.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes received on session streams.
    pub fn add_bytes_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes sent on session streams.
    pub fn add_bytes_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// One verify round: `drafted` tokens, `accepted` of them, and its model time.
    pub fn record_round(&self, drafted: usize, accepted: usize, took: Duration) {
        self.rounds.fetch_add(1, Ordering::Relaxed);
        self.drafted.fetch_add(drafted as u64, Ordering::Relaxed);
        self.accepted.fetch_add(accepted as u64, Ordering::Relaxed);
        self.generated
            .fetch_add(accepted as u64 + 1, Ordering::Relaxed);
        let s = took.as_secs_f64();
        let mut h = self.verify.lock().unwrap();
        for (i, &b) in BUCKETS.iter().enumerate() {
            if s <= b {
                h.counts[i] += 1;
            }
        }
        h.sum += s;
        h.count += 1;
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
        let h = self.verify.lock().unwrap();
        let _ = writeln!(
            out,
            "# HELP tandem_verify_seconds Model time of one verify round.\n# TYPE tandem_verify_seconds histogram"
        );
        for (b, c) in BUCKETS.iter().zip(h.counts) {
            let _ = writeln!(out, "tandem_verify_seconds_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "tandem_verify_seconds_bucket{{le=\"+Inf\"}} {}\ntandem_verify_seconds_sum {}\ntandem_verify_seconds_count {}",
            h.count, h.sum, h.count
        );
        out
    }
}
