//! Batch invariance on the real models: the logits of one multi-token forward are bitwise
//! identical to those of the same tokens fed one at a time, in blocks of other sizes, and
//! after truncate + re-forward. This is what keeps verification lossless.

mod common;

use common::{PROMPTS, model};
use tandem_models::{Model, Tokenizer};

fn check(name: &str) {
    let path = model(name);
    let m = Model::load(&path).unwrap();
    let tok = Tokenizer::from_gguf(&path).unwrap();
    for prompt in PROMPTS.iter().take(2) {
        let ids = tok.encode(prompt).unwrap();
        let ids = &ids[..ids.len().min(24)];
        let mut c = m.new_cache();
        let block = m.forward(ids, 0, &mut c).unwrap();

        let mut c1 = m.new_cache();
        for (i, &t) in ids.iter().enumerate() {
            let single = m.forward(&[t], i, &mut c1).unwrap();
            assert_eq!(
                single.row(0),
                block.row(i),
                "{name}: position {i} one at a time differs from the block"
            );
        }

        // Prefill a prefix, then a 5-token verify block: same bits again.
        let split = ids.len() - 5;
        let mut c2 = m.new_cache();
        m.forward(&ids[..split], 0, &mut c2).unwrap();
        let verify = m.forward(&ids[split..], split, &mut c2).unwrap();
        for i in 0..5 {
            assert_eq!(
                verify.row(i),
                block.row(split + i),
                "{name}: verify block row {i}"
            );
        }

        // Speculate wrong tokens, roll back, re-forward the right ones.
        let mut c3 = m.new_cache();
        m.forward(&ids[..split], 0, &mut c3).unwrap();
        m.forward(&[1, 2, 3, 4], split, &mut c3).unwrap();
        c3.truncate(split);
        assert_eq!(c3.len(), split);
        let again = m.forward(&ids[split..], split, &mut c3).unwrap();
        assert_eq!(
            again, verify,
            "{name}: truncate + re-forward differs from a fresh cache"
        );

        // A lower start position rolls back by itself.
        let again2 = m.forward(&ids[split..], split, &mut c3).unwrap();
        assert_eq!(
            again2, verify,
            "{name}: forward at an earlier position did not roll back"
        );
    }
}

#[test]
fn smollm2_is_batch_invariant() {
    check("smollm2-135m");
}

#[test]
fn qwen_coder_05b_is_batch_invariant() {
    check("qwen2.5-coder-0.5b");
}
