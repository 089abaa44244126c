//! Arbitrary text through the byte-level BPE tokenizer (a synthetic
//! LLaMA-3-shaped vocabulary: all 256 bytes, merges, special tokens), and
//! arbitrary ids through decode. Encoding without specials must round-trip
//! exactly; nothing may panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use trine_engine::tokenizer::Tokenizer;

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let v = trine_engine::vocab::synthetic(512);
        let specials: Vec<u32> = v
            .types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == trine_engine::vocab::CONTROL)
            .map(|(i, _)| i as u32)
            .collect();
        Tokenizer::new(v.tokens, &v.merges, &specials, Some(v.bos), Some(v.eos), true)
            .expect("the synthetic vocabulary")
    })
}

fuzz_target!(|data: &[u8]| {
    let t = tokenizer();
    let text = String::from_utf8_lossy(data);
    let ids = t.encode(&text, false);
    assert_eq!(t.decode(&ids), text, "encode/decode changed the text");
    let _ = t.encode(&text, true);
    let _ = t.encode_prompt(&text);
    let ids: Vec<u32> = data
        .chunks(4)
        .map(|c| c.iter().fold(0u32, |a, &b| (a << 8) | u32::from(b)))
        .collect();
    let _ = t.decode(&ids);
});
