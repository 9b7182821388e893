//! Early exits, exit adapters, backbone split, fingerprints and bad input, on SmolLM2-135M.

mod common;

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::{PROMPTS, model};
use tandem_models::backbone::{fingerprints, split_backbone};
use tandem_models::{Error, Model, Rows, Tokenizer};

const SMOL: &str = "smollm2-135m";

fn prompt_ids() -> Vec<u32> {
    Tokenizer::from_gguf(model(SMOL))
        .unwrap()
        .encode(PROMPTS[2])
        .unwrap()
}

fn read(path: &Path) -> (Content, BufReader<File>) {
    let mut r = BufReader::new(File::open(path).unwrap());
    (Content::read(&mut r).unwrap(), r)
}

/// Rewrites a GGUF with edited metadata and tensors.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit_md: impl Fn(&mut Vec<(String, Value)>),
    edit_t: impl Fn(&mut Vec<(String, QTensor)>),
) {
    let (ct, mut r) = read(src);
    let mut md: Vec<(String, Value)> = ct
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    md.sort_by(|a, b| a.0.cmp(&b.0));
    edit_md(&mut md);
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let mut ts: Vec<(String, QTensor)> = names
        .iter()
        .map(|n| ((*n).clone(), ct.tensor(&mut r, n, &Device::Cpu).unwrap()))
        .collect();
    edit_t(&mut ts);
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = File::create(dst).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

#[test]
fn exit_at_the_last_layer_is_the_final_output_and_exits_arrive_in_order() {
    let m = Model::load(model(SMOL)).unwrap();
    let ids = prompt_ids();
    let n = m.config().n_layer;
    let mut seen = Vec::new();
    let mut last_exit = None;
    let mut c = m.new_cache();
    let fin = m
        .forward_with_exits(&ids, 0, &mut c, Rows::All, &[10, 22, n], &mut |e| {
            seen.push(e.layer);
            assert_eq!(e.rows(), ids.len());
            let all = e.logits().unwrap();
            // One row at a time is the same as all rows at once.
            for i in [0, ids.len() - 1] {
                assert_eq!(e.row_logits(i).unwrap(), all.row(i));
            }
            assert!(e.row_logits(ids.len()).is_err());
            if e.layer == n {
                last_exit = Some(all);
            }
        })
        .unwrap();
    assert_eq!(seen, vec![10, 22, n]);
    assert_eq!(
        last_exit.unwrap(),
        fin,
        "exit at the last layer must equal the final logits"
    );
    // Asking for exits does not change the final output.
    let mut c2 = m.new_cache();
    assert_eq!(m.forward(&ids, 0, &mut c2).unwrap(), fin);
    // Out-of-range exit layers are refused.
    let mut c3 = m.new_cache();
    let err = m
        .forward_with_exits(&ids, 0, &mut c3, Rows::Last, &[n + 1], &mut |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("exit layer"), "{err}");
}

#[test]
fn split_drafter_equals_the_early_exit_and_shares_the_backbone_fingerprint() {
    let src = model(SMOL);
    let dir = tempfile::tempdir().unwrap();
    let k = 12;
    let drafter_path = dir.path().join("drafter.gguf");
    split_backbone(&src, k, &drafter_path).unwrap();

    let full = Model::load(&src).unwrap();
    let drafter = Model::load(&drafter_path).unwrap();
    assert_eq!(drafter.config().n_layer, k);
    let ids = prompt_ids();
    let mut exit = None;
    let mut c = full.new_cache();
    full.forward_with_exits(&ids, 0, &mut c, Rows::All, &[k], &mut |e| {
        exit = Some(e.logits().unwrap())
    })
    .unwrap();
    let mut c2 = drafter.new_cache();
    assert_eq!(drafter.forward(&ids, 0, &mut c2).unwrap(), exit.unwrap());

    let fp_full = fingerprints(&src, Some(k)).unwrap();
    let fp_drafter = fingerprints(&drafter_path, None).unwrap();
    assert_eq!(fp_drafter.backbone_layers, k);
    assert_eq!(fp_full, fp_drafter);
    // A different depth is a different backbone; the tokenizer is the same.
    let fp_all = fingerprints(&src, None).unwrap();
    assert_ne!(fp_all.backbone, fp_full.backbone);
    assert_eq!(fp_all.tokenizer, fp_full.tokenizer);

    // One changed byte in a backbone tensor changes the backbone fingerprint only.
    let edited = dir.path().join("edited.gguf");
    rewrite(
        &drafter_path,
        &edited,
        |_| {},
        |ts| {
            let (_, t) = ts
                .iter_mut()
                .find(|(n, _)| n == "blk.3.attn_v.weight")
                .unwrap();
            let mut bytes = t.data().unwrap().into_owned();
            bytes[100] ^= 1;
            let storage =
                candle_core::quantized::QStorage::from_data(bytes.into(), &Device::Cpu, t.dtype())
                    .unwrap();
            *t = QTensor::new(storage, t.shape().clone()).unwrap();
        },
    );
    let fp_edited = fingerprints(&edited, None).unwrap();
    assert_ne!(fp_edited.backbone, fp_drafter.backbone);
    assert_eq!(fp_edited.tokenizer, fp_drafter.tokenizer);

    // A changed merge list changes both fingerprints.
    let retok = dir.path().join("retok.gguf");
    rewrite(
        &drafter_path,
        &retok,
        |md| {
            let (_, v) = md
                .iter_mut()
                .find(|(k, _)| k == "tokenizer.ggml.merges")
                .unwrap();
            if let Value::Array(items) = v {
                items.swap(0, 1);
            }
        },
        |_| {},
    );
    let fp_retok = fingerprints(&retok, None).unwrap();
    assert_ne!(fp_retok.tokenizer, fp_drafter.tokenizer);
    assert_ne!(fp_retok.backbone, fp_drafter.backbone);

    // Bad split depth.
    let err = split_backbone(&src, 0, dir.path().join("x.gguf")).unwrap_err();
    assert!(
        err.to_string()
            .contains("--layers must be between 1 and 30"),
        "{err}"
    );
}

#[test]
fn exit_adapter_from_the_gguf_plugs_into_the_exit() {
    let src = model(SMOL);
    let dir = tempfile::tempdir().unwrap();
    let m = Model::load(&src).unwrap();
    let d = m.config().n_embd;
    let layer = 15;
    let rank = 8;
    let make = |scale: f32| {
        move |ts: &mut Vec<(String, QTensor)>| {
            let dev = Device::Cpu;
            let norm = Tensor::ones(d, candle_core::DType::F32, &dev).unwrap();
            let down = (Tensor::randn(0f32, 1.0, (rank, d), &dev).unwrap() * 0.05).unwrap();
            let up = (Tensor::randn(0f32, 1.0, (d, rank), &dev).unwrap() * scale as f64).unwrap();
            for (name, t) in [("norm", norm), ("down", down), ("up", up)] {
                ts.push((
                    format!("exit.{layer}.{name}.weight"),
                    QTensor::quantize(&t, GgmlDType::F32).unwrap(),
                ));
            }
        }
    };
    let with = dir.path().join("adapter.gguf");
    rewrite(&src, &with, |_| {}, make(0.5));
    let zero = dir.path().join("zero-adapter.gguf");
    rewrite(&src, &zero, |_| {}, make(0.0));

    let ids = prompt_ids();
    let exit_of = |m: &Model| {
        let mut out = None;
        let mut c = m.new_cache();
        let fin = m
            .forward_with_exits(&ids, 0, &mut c, Rows::All, &[layer], &mut |e| {
                out = Some(e.logits().unwrap())
            })
            .unwrap();
        (out.unwrap(), fin)
    };
    let (lens, fin) = exit_of(&m);
    let adapted = Model::load(&with).unwrap();
    assert_eq!(adapted.exit_adapters().count(), 1);
    let (with_adapter, fin2) = exit_of(&adapted);
    assert_ne!(
        with_adapter, lens,
        "the adapter must change the exit's logits"
    );
    assert_eq!(fin2, fin, "an adapter must not change the final output");
    // A zero up-projection makes the adapter the identity: back to the plain logit lens.
    let (zero_adapter, _) = exit_of(&Model::load(&zero).unwrap());
    assert_eq!(zero_adapter, lens);
}

#[test]
fn bad_input_gives_clear_errors() {
    let src = model(SMOL);
    let dir = tempfile::tempdir().unwrap();

    let missing = Model::load(dir.path().join("nope.gguf")).err().unwrap();
    assert!(matches!(missing, Error::Io { .. }), "{missing}");

    // Truncated in the header and in the tensor data.
    let mut bytes = Vec::new();
    File::open(&src)
        .unwrap()
        .take(4_000_000)
        .read_to_end(&mut bytes)
        .unwrap();
    for (len, name) in [(1000usize, "head.gguf"), (4_000_000, "body.gguf")] {
        let p = dir.path().join(name);
        File::create(&p).unwrap().write_all(&bytes[..len]).unwrap();
        let e = Model::load(&p).err().unwrap();
        assert!(matches!(e, Error::InvalidGguf { .. }), "{name}: {e}");
    }
    let e = Model::load(dir.path().join("body.gguf"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("truncated"), "{e}");

    // Not a GGUF at all.
    let p = dir.path().join("text.gguf");
    std::fs::write(&p, "hello world, certainly not a model").unwrap();
    assert!(matches!(
        Model::load(&p).err().unwrap(),
        Error::InvalidGguf { .. }
    ));

    // Wrong architecture.
    let p = dir.path().join("gpt2.gguf");
    rewrite(
        &src,
        &p,
        |md| {
            for (k, v) in md.iter_mut() {
                if k == "general.architecture" {
                    *v = Value::String("gpt2".into());
                }
            }
        },
        |ts| ts.truncate(3),
    );
    let e = Model::load(&p).err().unwrap();
    assert!(
        e.to_string()
            .contains("architecture `gpt2` is not supported"),
        "{e}"
    );

    // A tensor type candle cannot compute with is named with its tensor.
    let p = dir.path().join("iq.gguf");
    write_gguf_with_type(&p, "blk.0.ffn_up.weight", 20);
    let e = Model::load(&p).err().unwrap().to_string();
    assert!(
        e.contains("blk.0.ffn_up.weight") && e.contains("IQ4_NL"),
        "{e}"
    );

    // Unknown catalog name.
    let e = tandem_models::fetch::resolve("no-such-model")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown model `no-such-model`") && e.contains("smollm2-135m"),
        "{e}"
    );

    let m = Model::load(&src).unwrap();
    let mut c = m.new_cache();
    let e = m.forward(&[49_152], 0, &mut c).unwrap_err();
    assert!(
        matches!(
            e,
            Error::TokenOutOfRange {
                token: 49_152,
                vocab: 49_152
            }
        ),
        "{e}"
    );
    let e = m.forward(&[1], 5, &mut c).unwrap_err();
    assert!(matches!(e, Error::PositionGap { pos: 5, cached: 0 }), "{e}");
    assert!(m.forward(&[], 0, &mut c).is_err());
    assert_eq!(c.len(), 0, "failed forwards leave the cache untouched");

    // Position beyond the context window (a copy of the model with a 16-token context).
    let p = dir.path().join("short.gguf");
    rewrite(
        &src,
        &p,
        |md| {
            for (k, v) in md.iter_mut() {
                if k == "llama.context_length" {
                    *v = Value::U32(16);
                }
            }
        },
        |_| {},
    );
    let short = Model::load(&p).unwrap();
    let mut c = short.new_cache();
    short.forward(&[1; 10], 0, &mut c).unwrap();
    let e = short.forward(&[1; 7], 10, &mut c).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ContextExceeded {
                end: 17,
                context: 16,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(c.len(), 10);
}

/// A minimal GGUF v3 whose only tensor has ggml type `code`.
fn write_gguf_with_type(path: &Path, tensor: &str, code: u32) {
    let b = gguf_bytes(&[], &[(tensor, &[256, 4], code, 0)], 1024);
    std::fs::write(path, b).unwrap();
}

/// A GGUF v3 by hand: `general.architecture = llama`, then `extra` metadata (key, value
/// type, value bytes), then tensors (name, dims, type, offset), then `data` zero bytes
/// after the 32-byte aligned header.
fn gguf_bytes(
    extra: &[(&str, u32, Vec<u8>)],
    tensors: &[(&str, &[u64], u32, u64)],
    data: usize,
) -> Vec<u8> {
    fn string(b: &mut Vec<u8>, s: &str) {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    }
    let mut b = Vec::new();
    b.extend(0x4655_4747u32.to_le_bytes());
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((extra.len() as u64 + 1).to_le_bytes());
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    string(&mut b, "llama");
    for (key, ty, value) in extra {
        string(&mut b, key);
        b.extend(ty.to_le_bytes());
        b.extend(value);
    }
    for (name, dims, code, offset) in tensors {
        string(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(code.to_le_bytes());
        b.extend(offset.to_le_bytes());
    }
    b.resize(b.len().next_multiple_of(32) + data, 0);
    b
}

/// Crafted headers are refused with an error, before anything is sized from them: no
/// division by a zero alignment, no allocation from a count or a dimension the file cannot
/// hold, no rope wider than a head.
#[test]
fn crafted_gguf_headers_are_refused_before_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let t = "blk.0.ffn_up.weight";
    let huge = (1u64 << 62).to_le_bytes().to_vec();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "alignment 0",
            gguf_bytes(
                &[("general.alignment", 4, 0u32.to_le_bytes().to_vec())],
                &[],
                64,
            ),
            "general.alignment",
        ),
        (
            "alignment 48",
            gguf_bytes(
                &[("general.alignment", 4, 48u32.to_le_bytes().to_vec())],
                &[],
                64,
            ),
            "power of two",
        ),
        (
            "huge string",
            gguf_bytes(&[("k", 8, huge.clone())], &[], 64),
            "claims",
        ),
        (
            "huge array",
            gguf_bytes(
                &[("k", 9, [0u32.to_le_bytes().to_vec(), huge.clone()].concat())],
                &[],
                64,
            ),
            "claims",
        ),
        (
            "deep arrays",
            gguf_bytes(
                &[(
                    "k",
                    9,
                    [9u32.to_le_bytes(), 9u32.to_le_bytes()]
                        .iter()
                        .flat_map(|b| [b.to_vec(), 1u64.to_le_bytes().to_vec()].concat())
                        .chain(9u32.to_le_bytes())
                        .chain(1u64.to_le_bytes())
                        .collect(),
                )],
                &[],
                64,
            ),
            "nested",
        ),
        (
            "overflowing dims",
            gguf_bytes(&[], &[(t, &[1 << 40, 1 << 40], 0, 0)], 64),
            "dimension",
        ),
        (
            "zero dim",
            gguf_bytes(&[], &[(t, &[0, 4], 0, 0)], 64),
            "dimension",
        ),
        (
            "five dims",
            gguf_bytes(&[], &[(t, &[1, 1, 1, 1, 1], 0, 0)], 64),
            "dimensions",
        ),
        (
            "data past the end",
            gguf_bytes(&[], &[(t, &[256, 1024], 0, 0)], 64),
            "truncated",
        ),
        (
            "misaligned",
            gguf_bytes(&[], &[(t, &[4], 0, 3)], 64),
            "aligned",
        ),
        (
            "declared twice",
            gguf_bytes(&[], &[(t, &[4], 0, 0), (t, &[4], 0, 32)], 64),
            "twice",
        ),
        (
            "partial block",
            gguf_bytes(&[], &[(t, &[33, 2], 8, 0)], 4096),
            "blocks",
        ),
    ];
    for (what, bytes, want) in cases {
        let p = dir.path().join("crafted.gguf");
        std::fs::write(&p, &bytes).unwrap();
        let e = Model::load(&p)
            .err()
            .unwrap_or_else(|| panic!("{what}: loaded"));
        assert!(
            matches!(e, Error::InvalidGguf { .. }) && e.to_string().contains(want),
            "{what}: {e}"
        );
        // Counts beyond the file are refused too.
        let mut counted = bytes.clone();
        counted[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&p, &counted).unwrap();
        let e = Model::load(&p).err().unwrap();
        assert!(e.to_string().contains("more than the file"), "{what}: {e}");
    }

    // Hyper-parameters of a real file changed to ones the forward cannot run with.
    let src = model(SMOL);
    for (key, value, want) in [
        (
            "llama.rope.dimension_count",
            Value::U32(128),
            "rope dimension 128",
        ),
        (
            "llama.rope.dimension_count",
            Value::U32(7),
            "rope dimension 7",
        ),
        ("llama.block_count", Value::U32(0), "block_count is 0"),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(f32::NAN),
            "epsilon",
        ),
    ] {
        let p = dir.path().join("hyper.gguf");
        rewrite(
            &src,
            &p,
            |md| {
                let mut found = false;
                for (k, v) in md.iter_mut() {
                    if k == key {
                        *v = value.clone();
                        found = true;
                    }
                }
                if !found {
                    md.push((key.to_string(), value.clone()));
                }
            },
            |_| {},
        );
        let e = Model::load(&p).err().unwrap().to_string();
        assert!(e.contains(want), "{key}: {e}");
    }
}

#[test]
fn tokenizer_round_trips_and_streams_whole_characters() {
    for name in [SMOL, "qwen2.5-coder-0.5b"] {
        let tok = Tokenizer::from_gguf(model(name)).unwrap();
        for text in PROMPTS.iter().copied().chain([
            "naïve café — 北京欢迎你 🦀🚀 ok",
            "  leading spaces\n\n\ttabs and 12345 digits",
        ]) {
            let ids = tok.encode(text).unwrap();
            assert_eq!(
                tok.decode(&ids).unwrap(),
                text,
                "{name}: round trip of {text:?}"
            );
            let mut dec = tandem_models::IncrementalDecoder::new();
            let mut streamed = String::new();
            for &id in &ids {
                let piece = dec.push(&tok, id).unwrap();
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "{name}: half a character emitted for {text:?}"
                );
                streamed.push_str(&piece);
            }
            streamed.push_str(&dec.finish(&tok).unwrap());
            assert_eq!(streamed, text, "{name}: streamed text");
        }
        assert!(!tok.eos_tokens().is_empty());
    }
    // SmolLM2 splits digits one by one, as its tokenizer.json does.
    let tok = Tokenizer::from_gguf(model(SMOL)).unwrap();
    assert_eq!(tok.encode("12345").unwrap().len(), 5);
}
