//! Hyper-parameters read from GGUF metadata.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};

use crate::{Error, Result};

/// Transformer families this engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama (SmolLM2): no attention biases, rotary embedding on interleaved pairs.
    Llama,
    /// Qwen2 (Qwen2.5-Coder): q/k/v biases, rotary embedding on split halves (NeoX).
    Qwen2,
}

impl Architecture {
    /// The `general.architecture` string of this family.
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// The shape of a model, as declared by its GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Architecture family.
    pub arch: Architecture,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention).
    pub n_head_kv: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Hidden size of the MLP.
    pub n_ff: usize,
    /// Rotary base frequency.
    pub rope_base: f32,
    /// Number of dimensions of each head that are rotated.
    pub rope_dim: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Maximum context length.
    pub context_length: usize,
    /// Vocabulary size (rows of the token embedding).
    pub vocab_size: usize,
}

pub(crate) fn md<'a>(ct: &'a Content, path: &Path, key: &str) -> Result<&'a Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| Error::MissingOrMalformed {
            path: path.to_owned(),
            what: format!("metadata key `{key}` is missing"),
        })
}

fn md_usize(ct: &Content, path: &Path, key: &str) -> Result<usize> {
    md(ct, path, key)?
        .to_u64()
        .map(|v| v as usize)
        .map_err(|_| Error::MissingOrMalformed {
            path: path.to_owned(),
            what: format!("metadata key `{key}` is not an integer"),
        })
}

fn md_f32(ct: &Content, path: &Path, key: &str) -> Result<f32> {
    md(ct, path, key)?
        .to_f32()
        .map_err(|_| Error::MissingOrMalformed {
            path: path.to_owned(),
            what: format!("metadata key `{key}` is not a float"),
        })
}

impl Config {
    /// Reads the architecture and hyper-parameters from a GGUF header.
    pub fn from_gguf(ct: &Content, path: &Path) -> Result<Self> {
        let arch_name = md(ct, path, "general.architecture")?
            .to_string()
            .map_err(|_| Error::MissingOrMalformed {
                path: path.to_owned(),
                what: "`general.architecture` is not a string".into(),
            })?
            .clone();
        let arch = match arch_name.as_str() {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            _ => {
                return Err(Error::UnsupportedArchitecture {
                    path: path.to_owned(),
                    found: arch_name,
                });
            }
        };
        let a = arch.as_str();
        let n_embd = md_usize(ct, path, &format!("{a}.embedding_length"))?;
        let n_head = md_usize(ct, path, &format!("{a}.attention.head_count"))?;
        let n_head_kv = md_usize(ct, path, &format!("{a}.attention.head_count_kv"))?;
        if n_head == 0 || n_head_kv == 0 || n_embd % n_head != 0 || n_head % n_head_kv != 0 {
            return Err(Error::MissingOrMalformed {
                path: path.to_owned(),
                what: format!(
                    "inconsistent head counts: {n_embd} hidden, {n_head} heads, {n_head_kv} kv heads"
                ),
            });
        }
        let head_dim = n_embd / n_head;
        let rope_dim = md_usize(ct, path, &format!("{a}.rope.dimension_count")).unwrap_or(head_dim);
        let vocab_size = match ct.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => {
                return Err(Error::MissingOrMalformed {
                    path: path.to_owned(),
                    what: "tensor `token_embd.weight` is missing".into(),
                });
            }
        };
        let config = Config {
            arch,
            n_layer: md_usize(ct, path, &format!("{a}.block_count"))?,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: md_usize(ct, path, &format!("{a}.feed_forward_length"))?,
            rope_base: md_f32(ct, path, &format!("{a}.rope.freq_base")).unwrap_or(10_000.0),
            rope_dim,
            rms_eps: md_f32(ct, path, &format!("{a}.attention.layer_norm_rms_epsilon"))?,
            context_length: md_usize(ct, path, &format!("{a}.context_length"))?,
            vocab_size,
        };
        config.check().map_err(|what| Error::MissingOrMalformed {
            path: path.to_owned(),
            what,
        })?;
        Ok(config)
    }

    /// Refuses hyper-parameters the forward cannot run with (before anything is allocated
    /// from them).
    fn check(&self) -> std::result::Result<(), String> {
        let c = self;
        if c.rope_dim == 0 || c.rope_dim > c.head_dim || !c.rope_dim.is_multiple_of(2) {
            return Err(format!(
                "rope dimension {} must be even and at most the head size {}",
                c.rope_dim, c.head_dim
            ));
        }
        for (what, v, max) in [
            ("block_count", c.n_layer, 1 << 12),
            ("embedding_length", c.n_embd, 1 << 16),
            ("feed_forward_length", c.n_ff, 1 << 18),
            ("context_length", c.context_length, 1 << 24),
            ("vocabulary", c.vocab_size, 1 << 22),
        ] {
            if v == 0 || v > max {
                return Err(format!("{what} is {v}; expected 1 to {max}"));
            }
        }
        let positive = |x: f32| x.is_finite() && x > 0.0;
        if !(positive(c.rms_eps) && positive(c.rope_base)) {
            return Err(format!(
                "norm epsilon {} and rope base {} must be positive and finite",
                c.rms_eps, c.rope_base
            ));
        }
        Ok(())
    }

    /// Width of one position's keys (or values) across all kv heads.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}
