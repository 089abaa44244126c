//! Arbitrary bytes as the files of a Hugging Face directory:
//! trine_engine::fuzz::hf_files.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&[u8], &[u8], &[u8])| {
    let (weights, config, tokenizer) = input;
    trine_engine::fuzz::hf_files(weights, config, tokenizer);
});
