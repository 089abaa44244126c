//! Arbitrary bytes through trine_node::fuzz::stage_frame (see node/src/fuzz.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| trine_node::fuzz::stage_frame(data));
