//! The target trainer's forward of the upper blocks (candle, f32 from the dequantized
//! weights, LoRA products zero) is the engine's forward of the same blocks: on real text
//! through the real SmolLM2-135M, both give the same next tokens and nearly the same logits.

use candle_core::{Device, Tensor};
use tandem_models::{Model, Rows, Tokenizer};
use tandem_train::upper::Upper;

#[test]
fn the_trainers_upper_blocks_compute_the_engines_logits() {
    let path = tandem_models::fetch::resolve("smollm2-135m")
        .expect("run `bash ci/test`, which fetches the test models");
    let model = Model::load(&path).unwrap();
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let text = "fn main() {\n    let v: Vec<u32> = (0..10).map(|i| i * i).collect();\n    \
                for x in &v {\n        println!(\"{x}\");\n    }\n}\n\nimpl Default for Point {\n    \
                fn default() -> Self {\n        Point { x: 0, y: 0 }\n    }\n}\n";
    let tokens = tok.encode(text).unwrap();
    let t = tokens.len();
    assert!(t > 40, "{t}");
    let vocab = model.config().vocab_size;
    for layer in [15, 27] {
        let mut cache = model.new_cache();
        let mut hidden = Vec::new();
        let engine = model
            .forward_with_exits(&tokens, 0, &mut cache, Rows::All, &[layer], &mut |e| {
                hidden = e.hidden().to_vec();
            })
            .unwrap();
        let upper = Upper::load(&path, layer, 30 - layer, Some(4), 1).unwrap();
        let d = model.config().n_embd;
        let x = Tensor::from_vec(hidden, (t, d), &Device::Cpu).unwrap();
        let normed = upper.forward(&x, 1, t).unwrap();
        let ours: Vec<f32> = upper
            .logits(&normed)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (mut same, mut diff, mut scale) = (0, 0f64, 0f64);
        for (a, b) in engine.data.chunks(vocab).zip(ours.chunks(vocab)) {
            same += (tandem_core::sampling::argmax(a) == tandem_core::sampling::argmax(b)) as usize;
            for (x, y) in a.iter().zip(b) {
                diff += (x - y).abs() as f64;
                scale += x.abs() as f64;
            }
        }
        let rel = diff / scale;
        eprintln!("layer {layer}: {same}/{t} argmaxes equal, mean relative difference {rel:.5}");
        assert!(
            same * 100 >= t * 95,
            "layer {layer}: {same}/{t} argmaxes equal"
        );
        assert!(rel < 0.03, "layer {layer}: mean relative difference {rel}");
    }
}
