//! Arbitrary bytes as the files of a Hugging Face directory: a safetensors
//! file (its header is what lies), config.json and tokenizer.json, loaded
//! through the same path `trine generate DIR` takes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&[u8], &[u8], &[u8])| {
    let (weights, config, tokenizer) = input;
    let _ = trine_engine::tokenizer::Tokenizer::from_hf_json(tokenizer, Some(0), &[1]);
    let Ok(dir) = tempfile::tempdir() else { return };
    let _ = std::fs::write(dir.path().join("model.safetensors"), weights);
    let _ = std::fs::write(dir.path().join("config.json"), config);
    let _ = std::fs::write(dir.path().join("tokenizer.json"), tokenizer);
    let _ = trine_engine::open(dir.path(), None);
});
