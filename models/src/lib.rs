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
pub use model::{ExitLogits, KvCache, Logits, Model, Rows};
#[cfg(not(target_arch = "wasm32"))]
pub use tokenizer::{IncrementalDecoder, Tokenizer};
