//! The engine against an independent implementation (candle-transformers' quantized
//! llama / qwen2) on the real catalog models: greedy tokens agree for 64 tokens on five
//! prompts, and logits agree within a per-model tolerance at every position. A different
//! argmax is only accepted at a near-tie (the reference's top-2 gap below `TIE_TOL`), and
//! is checked as such.
//!
//! Why the logit tolerance is not tiny: both implementations quantize activations to 8 bits
//! before every quantized matrix product (as llama.cpp does), so a rounding difference
//! anywhere upstream flips quantization steps downstream. Measured against an f64 numpy
//! forward on dequantized weights, *both* are off by about 1.2–1.4 logits on SmolLM2 (whose
//! logits reach ±30). Measured between the two over these 320 positions (x86-64, AVX-512):
//! largest |difference| 1.62 (SmolLM2) and 0.77 (Qwen 0.5B); largest per-position mean
//! |difference| 0.63 and 0.13; 8 and 1 near-tie divergences (reference top-2 gap below
//! `TIE_TOL`). The tolerances below leave headroom over those measurements.

mod common;

use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use common::{PROMPTS, model, top2};
use tandem_models::{Model, Tokenizer};

/// Largest top-2 gap of the reference at which a different greedy token is a near-tie.
const TIE_TOL: f32 = 0.5;
const NEW_TOKENS: usize = 64;

trait Reference {
    fn forward(&mut self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor>;
}
impl Reference for candle_transformers::models::quantized_llama::ModelWeights {
    fn forward(&mut self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        self.forward(x, pos)
    }
}
impl Reference for candle_transformers::models::quantized_qwen2::ModelWeights {
    fn forward(&mut self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        self.forward(x, pos)
    }
}

/// `tol`: largest allowed |logit difference| at any position; `mean_tol`: largest allowed
/// mean |logit difference| over the vocabulary at any position.
fn compare(name: &str, tol: f32, mean_tol: f32, load_ref: &dyn Fn() -> Box<dyn Reference>) {
    let path = model(name);
    let ours = Model::load(&path).unwrap();
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let mut worst = 0f32;
    let mut worst_mean = 0f32;
    let mut near_ties = 0;
    for prompt in PROMPTS {
        let mut reference = load_ref();
        let ids = tok.encode(prompt).unwrap();
        let mut cache = ours.new_cache();
        let mut input = ids.clone();
        let mut pos = 0;
        for step in 0..NEW_TOKENS {
            let x = Tensor::new(input.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let r: Vec<f32> = reference
                .forward(&x, pos)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let o = ours.forward_last(&input, pos, &mut cache).unwrap();
            let o = o.last();
            let diff = r
                .iter()
                .zip(o)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            worst = worst.max(diff);
            let mean = r.iter().zip(o).map(|(a, b)| (a - b).abs()).sum::<f32>() / r.len() as f32;
            worst_mean = worst_mean.max(mean);
            assert!(
                diff <= tol,
                "{name}: logits differ by {diff} at step {step} of {prompt:?}"
            );
            assert!(
                mean <= mean_tol,
                "{name}: mean logit difference {mean} at step {step} of {prompt:?}"
            );
            let (r_best, _, r_gap) = top2(&r);
            let (o_best, _, _) = top2(o);
            if r_best != o_best {
                assert!(
                    r_gap < TIE_TOL,
                    "{name}: greedy token differs at step {step} ({r_best} vs {o_best}) where the \
                     reference's top-2 gap {r_gap} is not a near-tie"
                );
                near_ties += 1;
            }
            // Both continue on the reference's token, so every position is compared.
            pos += input.len();
            input = vec![r_best as u32];
        }
    }
    eprintln!(
        "{name}: max |logit diff| {worst:.4} (mean at worst position {worst_mean:.4}) over {} positions; near-tie divergences {near_ties}",
        PROMPTS.len() * NEW_TOKENS
    );
}

fn content(name: &str) -> (gguf_file::Content, BufReader<File>) {
    let mut r = BufReader::new(File::open(model(name)).unwrap());
    (gguf_file::Content::read(&mut r).unwrap(), r)
}

#[test]
fn smollm2_matches_candle_transformers_quantized_llama() {
    compare("smollm2-135m", 2.5, 1.0, &|| {
        let (ct, mut r) = content("smollm2-135m");
        Box::new(
            candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
                ct,
                &mut r,
                &Device::Cpu,
            )
            .unwrap(),
        )
    });
}

#[test]
fn qwen_coder_05b_matches_candle_transformers_quantized_qwen2() {
    compare("qwen2.5-coder-0.5b", 1.5, 0.3, &|| {
        let (ct, mut r) = content("qwen2.5-coder-0.5b");
        Box::new(
            candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(
                ct,
                &mut r,
                &Device::Cpu,
            )
            .unwrap(),
        )
    });
}
