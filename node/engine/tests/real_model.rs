//! The official BitNet b1.58 2B4T file, when a machine has it: its
//! tokenizer gives BITNET.md §5's reference ids, and greedy decoding of
//! "The capital of France is" gives " Paris". No machine this project tests
//! on can download the 1.2 GB file, so the test says why it did not run
//! unless TRINE_TEST_MODEL points at it.

#![allow(clippy::unwrap_used)] // test helpers: a failure is the test failing

use std::path::Path;

use trine_engine::model::{Input, Logits, Output};
use trine_engine::sampler::argmax;

#[test]
fn official_2b4t_says_paris() {
    let Some(path) = std::env::var_os("TRINE_TEST_MODEL") else {
        println!(
            "not run: set TRINE_TEST_MODEL to the official ggml-model-i2_s.gguf \
             (microsoft/bitnet-b1.58-2B-4T-gguf; `trine model pull` fetches it) to check \
             the real model; this machine has no copy"
        );
        return;
    };
    let (model, tok) = trine_engine::open(Path::new(&path), None).unwrap();
    assert_eq!(
        tok.encode("The capital of France is", false),
        vec![791, 6864, 315, 9822, 374]
    );
    assert_eq!(tok.encode("Hello world.", false), vec![9906, 1917, 13]);
    assert_eq!(tok.encode("User:", false), vec![1502, 25]);
    assert_eq!(tok.bos, Some(128_000));
    let prompt = [128_000, 791, 6864, 315, 9822, 374];
    let mut cache = model.new_cache(16);
    let Output::Logits(logits) = model
        .forward(Input::Tokens(&prompt), &mut cache, Logits::Last)
        .unwrap()
    else {
        panic!("a whole model returned hidden states")
    };
    assert_eq!(argmax(&logits), 12_366, "expected \" Paris\"");
}
