//! Logits of greedy decoding, to compare two machines (or kernel paths) on the same inputs.
//!
//! `logits_trace MODEL.gguf OUT.bin [TOKENS]`: for each of five prompts, prefills the prompt and
//! decodes TOKENS (default 64) greedy tokens one at a time, writing every step's logits.
//! `logits_trace MODEL.gguf OUT.bin --against REF.bin`: feeds the tokens REF.bin chose (so both
//! sides see the same inputs even where their choices would differ), writes this machine's
//! logits to OUT.bin and prints, as JSON, the largest |Δ logit| against REF.bin, how many
//! steps' rows are bitwise equal, and how often the greedy choices agree.
//!
//! File: per prompt, `u32` steps, then per step `u32` token chosen and `vocab` × `f32` logits
//! (little-endian).

use std::io::{Read, Write};

use tandem_models::{Model, Tokenizer};

const PROMPTS: [&str; 5] = [
    "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n",
    "def truncate_number(number: float) -> float:\n    \"\"\" Given a positive floating point number, return its decimal part.\n",
    "def fib(n: int):\n    \"\"\"Return n-th Fibonacci number.\n",
    "The capital of France is",
    "def is_palindrome(text: str):\n    \"\"\"\n    Checks if given string is a palindrome\n",
];

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn read_u32(r: &mut impl Read) -> u32 {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)
        .expect("a trace file from logits_trace");
    u32::from_le_bytes(b)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: logits_trace MODEL.gguf OUT.bin [TOKENS | --against REF.bin]");
        std::process::exit(2);
    }
    let (model, out) = (&args[1], &args[2]);
    let against = (args.get(3).map(String::as_str) == Some("--against")).then(|| {
        let path = args.get(4).expect("--against REF.bin");
        std::io::BufReader::new(std::fs::File::open(path).expect("open the reference trace"))
    });
    let steps: usize = match (&against, args.get(3)) {
        (None, Some(n)) => n.parse().expect("TOKENS is a number"),
        _ => 64,
    };
    let m = Model::load(std::path::Path::new(model)).expect("load the model");
    let tok = Tokenizer::from_gguf(std::path::Path::new(model)).expect("its tokenizer");
    let mut w = std::io::BufWriter::new(std::fs::File::create(out).expect("create OUT.bin"));
    let mut reference = against;
    let (mut max_delta, mut equal_rows, mut agree, mut total) = (0f32, 0usize, 0usize, 0usize);
    for prompt in PROMPTS {
        let ids = tok.encode(prompt).expect("encode");
        let mut cache = m.new_cache();
        let steps = match reference.as_mut() {
            Some(r) => read_u32(r) as usize,
            None => steps,
        };
        w.write_all(&(steps as u32).to_le_bytes()).unwrap();
        let mut logits = m.forward(&ids, 0, &mut cache).expect("prefill");
        let mut row = logits.row(logits.rows() - 1).to_vec();
        for pos in ids.len()..ids.len() + steps {
            let mine = argmax(&row);
            let next = match reference.as_mut() {
                Some(r) => {
                    let theirs = read_u32(r);
                    let mut b = vec![0u8; row.len() * 4];
                    r.read_exact(&mut b).expect("reference logits");
                    let mut equal = true;
                    for (x, y) in row.iter().zip(b.chunks_exact(4)) {
                        let y = f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
                        max_delta = max_delta.max((x - y).abs());
                        equal &= x.to_bits() == y.to_bits();
                    }
                    equal_rows += equal as usize;
                    agree += (mine == theirs) as usize;
                    total += 1;
                    theirs
                }
                None => mine,
            };
            w.write_all(&next.to_le_bytes()).unwrap();
            for x in &row {
                w.write_all(&x.to_le_bytes()).unwrap();
            }
            logits = m.forward(&[next], pos, &mut cache).expect("decode");
            row = logits.row(0).to_vec();
        }
    }
    w.flush().unwrap();
    if total > 0 {
        println!(
            "{{\"kernel\": \"{}\", \"arch\": \"{}\", \"steps\": {total}, \"max_abs_delta_logit\": {max_delta}, \"bitwise_equal_steps\": {equal_rows}, \"greedy_agreement\": {:.4}}}",
            tandem_models::quant::kernel(),
            std::env::consts::ARCH,
            agree as f64 / total as f64
        );
    }
}
