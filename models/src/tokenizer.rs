//! Tokenizers built from GGUF metadata (or a `tokenizer.json`), and incremental
//! detokenization for streaming.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::tokenizer::TokenizerFromGguf;

use crate::gguf::open;
use crate::{Error, Result};

/// A text tokenizer with the model's end-of-sequence tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos: Vec<u32>,
    chat: ChatTemplate,
}

/// A model's chat template and the special tokens it may refer to.
#[derive(Debug, Clone, Default)]
pub struct ChatTemplate {
    /// The Jinja source (`tokenizer.chat_template`), if the file has one.
    pub source: Option<String>,
    /// The beginning-of-sequence token's text (`bos_token`), or empty.
    pub bos_token: String,
    /// The end-of-sequence token's text (`eos_token`), or empty.
    pub eos_token: String,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        let (content, _) = open(path.as_ref())?;
        Self::from_content(&content)
    }

    /// Builds the tokenizer from already-parsed GGUF metadata.
    pub fn from_content(content: &Content) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_gguf(content).map_err(tok_err)?;
        let pre = content
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str);
        if pre == Some("smollm") {
            // SmolLM2's tokenizer.json: single digits, then byte-level without a prefix space.
            use tokenizers::pre_tokenizers::byte_level::ByteLevel;
            use tokenizers::pre_tokenizers::digits::Digits;
            use tokenizers::pre_tokenizers::sequence::Sequence;
            let seq = Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ]);
            inner.with_pre_tokenizer(Some(seq));
            inner.with_decoder(Some(ByteLevel::new(false, true, true)));
        }
        let mut eos = Vec::new();
        if let Some(Value::U32(id)) = content.metadata.get("tokenizer.ggml.eos_token_id") {
            eos.push(*id);
        }
        // Chat-tuned models also end a turn with these.
        for name in [
            "<|im_end|>",
            "<|endoftext|>",
            "<|end_of_text|>",
            "<|eot_id|>",
        ] {
            if let Some(id) = inner.token_to_id(name)
                && !eos.contains(&id)
            {
                eos.push(id);
            }
        }
        let token = |key: &str| match content.metadata.get(key) {
            Some(Value::U32(id)) => inner.id_to_token(*id).unwrap_or_default(),
            _ => String::new(),
        };
        let chat = ChatTemplate {
            source: content
                .metadata
                .get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned(),
            bos_token: token("tokenizer.ggml.bos_token_id"),
            eos_token: token("tokenizer.ggml.eos_token_id"),
        };
        Ok(Tokenizer { inner, eos, chat })
    }

    /// Loads a Hugging Face `tokenizer.json`; `eos` names its end-of-sequence tokens.
    pub fn from_json_file(path: impl AsRef<Path>, eos: &[&str]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path.as_ref()).map_err(tok_err)?;
        let eos = eos.iter().filter_map(|t| inner.token_to_id(t)).collect();
        Ok(Tokenizer {
            inner,
            eos,
            chat: ChatTemplate::default(),
        })
    }

    /// Text → token ids (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Token ids → text (special tokens kept, so nothing is silently dropped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// The model's chat template (from GGUF metadata; none for a `tokenizer.json`).
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.chat
    }

    /// Tokens that end a generation.
    pub fn eos_tokens(&self) -> &[u32] {
        &self.eos
    }

    /// Number of tokens in the vocabulary, including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Turns a stream of token ids into a stream of text pieces without ever emitting half a
/// UTF-8 character: text is released only once the bytes decoded so far form whole
/// characters (the "prefix offset" method of text-generation-inference).
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// A decoder with no tokens.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token and returns the text it completes (often empty mid-character).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.tokens.push(id);
        let prefix = tok.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.tokens[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back at the end of a generation (an incomplete character is
    /// rendered as U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let prefix = tok.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.tokens[self.prefix_offset..])?;
        self.prefix_offset = self.tokens.len();
        self.read_offset = self.tokens.len();
        Ok(full.get(prefix.len()..).unwrap_or("").to_string())
    }
}
