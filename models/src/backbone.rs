//! Shared-backbone compatibility: fingerprints of a model's tokenizer and backbone, and
//! splitting a model's backbone off as a drafter GGUF of its own.
//!
//! The backbone of a model is its token embedding and its first `k` blocks. A drafter split
//! from a model (embedding, first `k` blocks, final norm, output head) has the same backbone
//! fingerprint as the model at `k`, so a verifier can tell which targets a drafter fits.

use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use candle_core::Device;
use candle_core::quantized::gguf_file::{self, Content, Value};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::gguf::open;
use crate::{Error, Result};

/// Metadata key recording how many blocks of a drafter GGUF form the shared backbone.
pub const BACKBONE_LAYERS_KEY: &str = "tandem.backbone.layers";

/// Hash of the vocabulary, merges, token types and special tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenizerFingerprint(pub [u8; 32]);

/// Hash of the token embedding and first `k` blocks' tensor bytes, plus the tokenizer
/// fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackboneFingerprint(pub [u8; 32]);

impl fmt::Display for TokenizerFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Display for BackboneFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Both fingerprints of a file, and the number of blocks the backbone covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprints {
    /// Tokenizer fingerprint.
    pub tokenizer: TokenizerFingerprint,
    /// Backbone fingerprint over `backbone_layers` blocks.
    pub backbone: BackboneFingerprint,
    /// Blocks in the backbone.
    pub backbone_layers: usize,
}

const TOKENIZER_KEYS: &[&str] = &[
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
];

fn hash_value(h: &mut Sha256, v: &Value) {
    // A canonical, type-tagged encoding: equal values hash equally whatever the file layout.
    match v {
        Value::U8(x) => h.update([[0u8].as_slice(), &x.to_le_bytes()].concat()),
        Value::I8(x) => h.update([[1u8].as_slice(), &x.to_le_bytes()].concat()),
        Value::U16(x) => h.update([[2u8].as_slice(), &x.to_le_bytes()].concat()),
        Value::I16(x) => h.update([[3u8].as_slice(), &x.to_le_bytes()].concat()),
        Value::U32(x) => h.update([[4u8].as_slice(), &x.to_le_bytes()].concat()),
        Value::I32(x) => h.update([[5u8].as_slice(), &x.to_le_bytes()].concat()),
        Value::U64(x) => h.update([[6u8].as_slice(), &x.to_le_bytes()].concat()),
        Value::I64(x) => h.update([[7u8].as_slice(), &x.to_le_bytes()].concat()),
        Value::F32(x) => h.update([[8u8].as_slice(), &x.to_le_bytes()].concat()),
        Value::F64(x) => h.update([[9u8].as_slice(), &x.to_le_bytes()].concat()),
        Value::Bool(x) => h.update([10u8, *x as u8]),
        Value::String(s) => {
            h.update([11u8]);
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        Value::Array(items) => {
            h.update([12u8]);
            h.update((items.len() as u64).to_le_bytes());
            for item in items {
                hash_value(h, item);
            }
        }
    }
}

/// The tokenizer fingerprint of parsed GGUF metadata.
pub fn tokenizer_fingerprint(content: &Content) -> TokenizerFingerprint {
    let mut h = Sha256::new();
    h.update(b"tandem tokenizer v1");
    for key in TOKENIZER_KEYS {
        h.update((key.len() as u64).to_le_bytes());
        h.update(key.as_bytes());
        match content.metadata.get(*key) {
            Some(v) => hash_value(&mut h, v),
            None => h.update([255u8]),
        }
    }
    TokenizerFingerprint(h.finalize().into())
}

/// The backbone size a split drafter declares (`tandem.backbone.layers`); `None` for a
/// file that is not a split drafter.
pub fn declared_split(path: impl AsRef<Path>) -> Result<Option<usize>> {
    let path = path.as_ref();
    let (content, _) = open(path)?;
    if content.metadata.contains_key(BACKBONE_LAYERS_KEY) {
        Ok(Some(declared_backbone_layers(&content, path)?))
    } else {
        Ok(None)
    }
}

/// The tokenizer fingerprint of a GGUF file (reads its metadata only).
pub fn tokenizer_fingerprint_of(path: impl AsRef<Path>) -> Result<TokenizerFingerprint> {
    let (content, _) = open(path.as_ref())?;
    Ok(tokenizer_fingerprint(&content))
}

fn is_backbone_tensor(name: &str, layers: usize) -> bool {
    if name == "token_embd.weight" {
        return true;
    }
    name.strip_prefix("blk.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|i| i.parse::<usize>().ok())
        .is_some_and(|i| i < layers)
}

/// The number of backbone blocks a file declares: `tandem.backbone.layers` for a split
/// drafter, every block for a full model.
pub fn declared_backbone_layers(content: &Content, path: &Path) -> Result<usize> {
    if let Some(v) = content.metadata.get(BACKBONE_LAYERS_KEY) {
        return v
            .to_u64()
            .map(|v| v as usize)
            .map_err(|_| Error::MissingOrMalformed {
                path: path.to_owned(),
                what: format!("`{BACKBONE_LAYERS_KEY}` is not an integer"),
            });
    }
    Ok(Config::from_gguf(content, path)?.n_layer)
}

/// Computes the fingerprints of a GGUF file; `layers` defaults to the declared backbone.
pub fn fingerprints(path: impl AsRef<Path>, layers: Option<usize>) -> Result<Fingerprints> {
    let path = path.as_ref();
    let (content, mut reader) = open(path)?;
    let config = Config::from_gguf(&content, path)?;
    let layers = match layers {
        Some(k) => k,
        None => declared_backbone_layers(&content, path)?,
    };
    if layers > config.n_layer {
        return Err(Error::InvalidArgument(format!(
            "backbone of {layers} blocks asked of {} which has only {}",
            path.display(),
            config.n_layer
        )));
    }
    let tokenizer = tokenizer_fingerprint(&content);
    let mut names: Vec<&String> = content
        .tensor_infos
        .keys()
        .filter(|n| is_backbone_tensor(n, layers))
        .collect();
    names.sort();
    let mut h = Sha256::new();
    h.update(b"tandem backbone v1");
    h.update(tokenizer.0);
    h.update((layers as u64).to_le_bytes());
    for name in names {
        let t = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|e| Error::InvalidGguf {
                path: path.to_owned(),
                reason: format!("tensor `{name}`: {e}"),
            })?;
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(format!("{:?}{:?}", t.dtype(), t.shape().dims()).as_bytes());
        let data = t.data()?;
        h.update((data.len() as u64).to_le_bytes());
        h.update(&data);
    }
    Ok(Fingerprints {
        tokenizer,
        backbone: BackboneFingerprint(h.finalize().into()),
        backbone_layers: layers,
    })
}

/// Writes a drafter GGUF holding the token embedding, the first `layers` blocks, the final
/// norm and the output head of the model at `src` (plus any exit adapters at or below
/// `layers`). The result loads as a model of its own. An exit block at `layers` becomes the
/// drafter's last block, read through its own final norm: a drafter of `layers + 1` blocks
/// declaring a backbone of `layers`, whose logits are that exit's.
pub fn split_backbone(src: impl AsRef<Path>, layers: usize, out: impl AsRef<Path>) -> Result<()> {
    write_model(src, out, Some(layers), Vec::new(), Vec::new())
}

/// Writes a copy of the model at `src` to `out` with `extra` tensors added (replacing
/// tensors of the same name, and an extra `exit.{k}.*` tensor every `exit.{k}.*` tensor of
/// the source: an exit is replaced whole) and `metadata` entries added or replaced.
///
/// With `layers` the copy is the backbone split at that depth, as [`split_backbone`] writes
/// it (extra `exit.{k}.*` tensors are kept whatever `k`); a `tandem.backbone.layers` entry
/// in `metadata` then declares a shorter backbone than the blocks kept. The file is written
/// beside `out` and renamed into place, so an interrupted write leaves no half file under
/// the final name.
pub fn write_model(
    src: impl AsRef<Path>,
    out: impl AsRef<Path>,
    layers: Option<usize>,
    extra: Vec<(String, candle_core::quantized::QTensor)>,
    metadata: Vec<(String, Value)>,
) -> Result<()> {
    let (src, out) = (src.as_ref(), out.as_ref());
    let (content, mut reader) = open(src)?;
    let config = Config::from_gguf(&content, src)?;
    if let Some(layers) = layers
        && (layers == 0 || layers > config.n_layer)
    {
        return Err(Error::InvalidArgument(format!(
            "--layers must be between 1 and {} (the blocks of {}), got {layers}",
            config.n_layer,
            src.display()
        )));
    }
    let exit_of = |name: &str| -> Option<usize> {
        name.strip_prefix("exit.")?.split('.').next()?.parse().ok()
    };
    // A split at an exit block turns that block into the drafter's last one.
    let head_block =
        layers.filter(|l| crate::model::exit_block_layers(content.tensor_infos.keys()).contains(l));
    let renamed = |name: &str| -> String {
        let Some(l) = head_block else {
            return name.to_string();
        };
        let prefix = format!("exit.{l}.");
        match name.strip_prefix(&prefix) {
            Some("output_norm.weight") => "output_norm.weight".to_string(),
            Some(rest) => match rest.strip_prefix("blk.") {
                Some(t) => format!("blk.{l}.{t}"),
                None => name.to_string(),
            },
            None => name.to_string(),
        }
    };
    let keep = |name: &str| {
        let Some(layers) = layers else { return true };
        if head_block.is_some() && name == "output_norm.weight" {
            return false;
        }
        if is_backbone_tensor(name, layers)
            || name == "output_norm.weight"
            || name == "output.weight"
        {
            return true;
        }
        name.strip_prefix("exit.")
            .and_then(|r| r.split('.').next())
            .and_then(|k| k.parse::<usize>().ok())
            .is_some_and(|k| k <= layers)
    };
    let replaced = |name: &str| {
        extra
            .iter()
            .any(|(n, _)| n == name || exit_of(n).is_some_and(|k| exit_of(name) == Some(k)))
    };
    let mut names: Vec<&String> = content
        .tensor_infos
        .keys()
        .filter(|n| keep(n) && !replaced(n))
        .collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len() + extra.len());
    for name in &names {
        let t = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|e| Error::InvalidGguf {
                path: src.to_owned(),
                reason: format!("tensor `{name}`: {e}"),
            })?;
        tensors.push((renamed(name), t));
    }
    tensors.extend(extra);
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let arch = config.arch.as_str();
    let block_key = format!("{arch}.block_count");
    let mut md: Vec<(String, Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| {
            let split_key = layers.is_some() && *k == BACKBONE_LAYERS_KEY;
            let replaced = metadata.iter().any(|(m, _)| m == *k);
            !split_key && !replaced
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(layers) = layers {
        let blocks = layers + usize::from(head_block.is_some());
        for (k, v) in md.iter_mut() {
            if *k == block_key {
                *v = Value::U32(blocks as u32);
            }
        }
        // A drafter with blocks of its own after the backbone declares fewer (`metadata`).
        if !metadata.iter().any(|(k, _)| k == BACKBONE_LAYERS_KEY) {
            md.push((BACKBONE_LAYERS_KEY.to_string(), Value::U32(layers as u32)));
        }
        md.push((
            "tandem.backbone.source_blocks".to_string(),
            Value::U32(config.n_layer as u32),
        ));
    }
    md.extend(metadata);
    md.sort_by(|a, b| a.0.cmp(&b.0));
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();

    let tmp = out.with_extension("gguf.partial");
    let io_err = |source| Error::Io {
        path: out.to_owned(),
        source,
    };
    let file = File::create(&tmp).map_err(io_err)?;
    let mut w = BufWriter::new(file);
    gguf_file::write(&mut w, &md_refs, &t_refs)?;
    w.flush().map_err(io_err)?;
    drop(w);
    std::fs::rename(&tmp, out).map_err(io_err)?;
    Ok(())
}
