//! Arbitrary text and ids through the tokenizer: trine_engine::fuzz::tokenizer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| trine_engine::fuzz::tokenizer(data));
