//! tandem-models: the one model definition of tandem.
//!
//! - [`Model`]: `llama` / `qwen2` GGUF transformers with quantized weights, an immutable
//!   `&self` forward over any number of tokens with the state in a [`KvCache`], and early
//!   exits (with optional trained [`ExitAdapter`]s) handed out mid-forward.
//! - [`backbone`]: tokenizer and backbone fingerprints and the backbone split that makes a
//!   drafter GGUF.
//! - [`Tokenizer`] and [`IncrementalDecoder`] (native only).
//! - [`catalog`] and [`fetch`] (native only): the real models this project uses.

pub mod adapter;
pub mod backbone;
pub mod catalog;
mod config;
mod error;
#[cfg(not(target_arch = "wasm32"))]
pub mod fetch;
mod gguf;
mod kernels;
mod model;
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod simd;
#[cfg(not(target_arch = "wasm32"))]
mod tokenizer;
mod weights;

pub use adapter::{ExitAdapter, LowRankAdapter};
pub use backbone::{BackboneFingerprint, Fingerprints, TokenizerFingerprint};
pub use config::{Architecture, Config};
pub use error::{Error, Result};
pub use model::{ExitLogits, KvCache, Logits, Model, Rows, load_tensors};
#[cfg(not(target_arch = "wasm32"))]
pub use tokenizer::{IncrementalDecoder, Tokenizer};

/// Sizes the compute thread pools to the CPUs this process may run on, unless
/// `RAYON_NUM_THREADS` is set. Without it a process pinned to fewer cores (`taskset`) gets
/// as many compute threads as the machine has, which oversubscribe its cores and made
/// decoding of Qwen2.5-Coder-0.5B 6× slower when pinned to one of two cores. Call at the
/// start of `main`, before any other thread exists.
pub fn init_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: called at the start of `main`, before the process starts other threads,
        // so nothing reads the environment concurrently.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}
