//! Arbitrary bytes as a GGUF file: trine_engine::fuzz::gguf.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| trine_engine::fuzz::gguf(bytes));
