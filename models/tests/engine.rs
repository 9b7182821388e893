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
    let mut b = Vec::new();
    b.extend(0x4655_4747u32.to_le_bytes());
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata
    let key = "general.architecture";
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key.as_bytes());
    b.extend(8u32.to_le_bytes());
    b.extend(5u64.to_le_bytes());
    b.extend(b"llama");
    b.extend((tensor.len() as u64).to_le_bytes());
    b.extend(tensor.as_bytes());
    b.extend(2u32.to_le_bytes());
    b.extend(256u64.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(code.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.resize(b.len().next_multiple_of(32) + 1024, 0);
    std::fs::write(path, b).unwrap();
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
