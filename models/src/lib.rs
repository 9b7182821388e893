//! tandem-models: the one model definition of tandem.
//!
//! - [`Model`]: `llama` / `qwen2` GGUF transformers with quantized weights, an immutable
//!   `&self` forward over any number of tokens with the state in a [`KvCache`], and early
//!   exits (with optional trained [`ExitAdapter`]s) handed out mid-forward.
//! - [`backbone`]: tokenizer and backbone fingerprints and the backbone split that makes a
//!   drafter GGUF.
//! - [`draft`]: one sequence of a model on any backend ([`DraftForward`], the CPU's
//!   [`CpuSequence`]) and the one decode loop; [`backend`]: the verifier's side of it.
//! - [`Tokenizer`] and [`IncrementalDecoder`] (native only).
//! - [`catalog`] and [`fetch`] (native only): the real models this project uses.

pub mod adapter;
pub mod backbone;
#[cfg(not(target_arch = "wasm32"))]
pub mod backend;
pub mod catalog;
mod config;
pub mod draft;
mod error;
#[cfg(not(target_arch = "wasm32"))]
pub mod fetch;
mod gguf;
mod kernels;
mod model;
pub mod quant;
#[cfg(not(target_arch = "wasm32"))]
mod team;
#[cfg(not(target_arch = "wasm32"))]
mod tokenizer;
mod weights;

pub use adapter::{ExitAdapter, LowRankAdapter};
pub use backbone::{BackboneFingerprint, Fingerprints, TokenizerFingerprint};
pub use config::{Architecture, Config};
pub use draft::{CpuSequence, DraftForward, Forwarded, GpuChoice};
pub use error::{Error, Result};
pub use model::{
    BLOCK_MATRICES, ExitLogits, KvCache, KvPrecision, Logits, Model, Rows, Step, load_tensors,
};
#[cfg(not(target_arch = "wasm32"))]
pub use team::single_threaded;
#[cfg(not(target_arch = "wasm32"))]
pub use tokenizer::{ChatTemplate, IncrementalDecoder, Tokenizer};

/// Sizes the engine's compute thread pool (rayon's global pool) once per process: one
/// thread per CPU this process may run on (its affinity mask, so `taskset` works), or
/// `RAYON_NUM_THREADS` when set to fewer. A request for more threads than allowed CPUs is
/// capped, with a warning: two spinning workers on one core made decoding of
/// Qwen2.5-Coder-0.5B 5× slower. Returns the thread count. Idempotent; [`Model::load`]
/// calls it, so a library user gets the same pool.
///
/// The environment is left untouched, so child processes (pinned elsewhere) size their own.
#[cfg(not(target_arch = "wasm32"))]
pub fn init_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let asked = std::env::var("RAYON_NUM_THREADS").ok();
        let n = match asked.as_deref().map(str::parse::<usize>) {
            Some(Ok(w)) if w > cores => {
                eprintln!(
                    "warning: RAYON_NUM_THREADS={w}, but this process may run on {cores} \
                     CPU(s): using {cores} compute thread(s) (more would spin on shared cores)"
                );
                cores
            }
            Some(Ok(w)) if w >= 1 => w,
            Some(_) => {
                eprintln!(
                    "warning: RAYON_NUM_THREADS={:?} is not a positive number: using {cores} \
                     compute thread(s)",
                    asked.unwrap_or_default()
                );
                cores
            }
            None => cores,
        };
        if rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .is_err()
        {
            // Something used rayon first; say what it runs with.
            let have = rayon::current_num_threads();
            if have > cores {
                eprintln!(
                    "warning: the compute pool was started with {have} threads before tandem \
                     could size it; this process may run on {cores} CPU(s)"
                );
            }
            return have;
        }
        n
    })
}

/// The number of threads the engine computes with.
pub fn compute_threads() -> usize {
    #[cfg(not(target_arch = "wasm32"))]
    return init_threads();
    #[cfg(target_arch = "wasm32")]
    1
}
