//! Structured, mutation-based fuzzing on stable Rust of the places where tandem decodes what
//! another party sends it: the session frame decoder (every message type, whole frames and
//! byte streams cut anywhere), the GGUF loader (mutated real and tiny model files, through
//! `Model::load` and a forward), and the drafter's event handling (random, out-of-order and
//! malformed verifier events against the guest's state machine).
//!
//! Each input is either a fresh valid one from a generator or a mutation of one (bit flips,
//! interesting values, inserted, deleted and duplicated ranges, truncation, splices). A run
//! is reproducible from its seed. A panic is a crash: the input is written to the crash
//! directory and counted; decoders must answer every input with a value or an error.
//!
//! The same harnesses also run under libFuzzer, coverage-guided, through [`one`] and the
//! `cargo fuzz` targets in `fuzz/libfuzzer/` (nightly; `ci/fuzz` runs both).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub mod targets;

/// A fuzz target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The session protocol's frame decoder.
    Frames,
    /// The GGUF loader.
    Gguf,
    /// The drafter's state machine fed random verifier events.
    Guest,
}

impl Target {
    /// Every target.
    pub const ALL: [Target; 3] = [Target::Frames, Target::Gguf, Target::Guest];

    /// The target's name.
    pub fn name(self) -> &'static str {
        match self {
            Target::Frames => "frames",
            Target::Gguf => "gguf",
            Target::Guest => "guest",
        }
    }
}

/// xorshift64*: small, fast and reproducible from a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (0 is replaced).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.u64() % n as u64) as usize
    }

    /// True with probability `1 / n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// A value that often sits on a boundary.
    pub fn interesting_u32(&mut self) -> u32 {
        const VALUES: [u32; 10] = [0, 1, 2, 7, 0x7f, 0x80, 0xff, 0xffff, 0x7fff_ffff, u32::MAX];
        if self.one_in(2) {
            VALUES[self.below(VALUES.len())]
        } else {
            self.u64() as u32
        }
    }

    /// An f32 that is often special (NaN, infinities, 0, negative, above 1).
    pub fn interesting_f32(&mut self) -> f32 {
        const VALUES: [f32; 8] = [0.0, -0.0, 1.0, -1.0, 1.5, f32::NAN, f32::INFINITY, 1e-30];
        if self.one_in(3) {
            VALUES[self.below(VALUES.len())]
        } else {
            (self.u64() >> 40) as f32 / (1u64 << 24) as f32
        }
    }
}

/// Mutates `data` in place with 1 to 4 random edits; `corpus` feeds splices.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.u64() as u8;
            }
            2 if len >= 4 => {
                let i = rng.below(len - 3);
                let v = rng.interesting_u32().to_le_bytes();
                data[i..i + 4].copy_from_slice(&v);
            }
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.u64() as u8).collect();
                data.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                data.drain(i..i + n);
            }
            5 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let copy = data[i..i + n].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, copy);
            }
            6 if len > 0 => data.truncate(rng.below(len)),
            7 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let n = 1 + rng.below((other.len() - from).min(256));
                    let at = rng.below(len + 1);
                    data.splice(at..at, other[from..from + n].iter().copied());
                }
            }
            8 if len >= 8 => {
                // A length or count field set to something huge.
                let i = rng.below(len - 7);
                let v = [u64::MAX, 1 << 40, 1 << 62, 0][rng.below(4)];
                data[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ => {}
        }
    }
}

/// What a run found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Inputs executed.
    pub execs: u64,
    /// Inputs that made the code under test panic, as saved files.
    pub crashes: Vec<PathBuf>,
    /// Inputs the code accepted as valid (decoded, loaded, handled).
    pub valid: u64,
    /// Per-kind counts the target reports (e.g. messages decoded of each type).
    pub reached: Vec<(String, u64)>,
    /// Wall time of the run.
    pub seconds: f64,
}

impl Report {
    /// Adds one to the named counter.
    pub fn reach(&mut self, what: &str) {
        match self.reached.iter_mut().find(|(k, _)| k == what) {
            Some((_, n)) => *n += 1,
            None => self.reached.push((what.to_string(), 1)),
        }
    }
}

/// One execution: runs `input` through the target, reporting what it reached.
pub trait Harness {
    /// A new input: fresh from a generator or a mutation of an earlier one.
    fn input(&mut self, rng: &mut Rng) -> Vec<u8>;
    /// Runs one input; true if the code under test accepted it as valid.
    fn run(&mut self, input: &[u8], report: &mut Report) -> bool;
}

/// Runs one input through `target` and says whether it was valid: the entry point of the
/// coverage-guided drivers (a panic is their crash).
pub fn one(target: Target, input: &[u8]) -> bool {
    use std::sync::{Mutex, OnceLock};
    static GGUF: OnceLock<Mutex<targets::Gguf>> = OnceLock::new();
    let mut report = Report::default();
    match target {
        Target::Frames => targets::Frames::default().run(input, &mut report),
        Target::Gguf => GGUF
            .get_or_init(|| Mutex::new(targets::Gguf::new().expect("the gguf target's seeds")))
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .run(input, &mut report),
        Target::Guest => targets::Guest.run(input, &mut report),
    }
}

/// Starting inputs for `target` (a corpus for coverage-guided drivers).
pub fn seeds(target: Target) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut rng = Rng::new(1);
    Ok(match target {
        Target::Frames => (0..64).map(|_| targets::message(&mut rng)).collect(),
        Target::Gguf => targets::Gguf::new()?.seeds().to_vec(),
        Target::Guest => (0..16).map(|_| targets::Guest.input(&mut rng)).collect(),
    })
}

/// Runs `target` for `time` from `seed`, saving crashing inputs under `crash_dir`.
pub fn fuzz(target: Target, time: Duration, seed: u64, crash_dir: &Path) -> anyhow::Result<Report> {
    let mut harness: Box<dyn Harness> = match target {
        Target::Frames => Box::new(targets::Frames::default()),
        Target::Gguf => Box::new(targets::Gguf::new()?),
        Target::Guest => Box::new(targets::Guest),
    };
    let mut rng = Rng::new(seed);
    let mut report = Report::default();
    let start = Instant::now();
    // Panics are expected findings here: keep the default hook from printing each one.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    while start.elapsed() < time {
        let input = harness.input(&mut rng);
        report.execs += 1;
        let outcome = catch_unwind(AssertUnwindSafe(|| harness.run(&input, &mut report)));
        match outcome {
            Ok(ok) => report.valid += ok as u64,
            Err(_) => {
                std::fs::create_dir_all(crash_dir)?;
                let path = crash_dir.join(format!("{}-{seed}-{}.bin", target.name(), report.execs));
                std::fs::write(&path, &input)?;
                report.crashes.push(path);
            }
        }
    }
    std::panic::set_hook(hook);
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}
