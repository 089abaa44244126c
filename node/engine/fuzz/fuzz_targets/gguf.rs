//! Arbitrary bytes as a GGUF file: the parser, then every ternary tensor
//! decoder and the hyper-parameter and tokenizer readers on what it accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trine_engine::gguf::parse;
use trine_engine::model::Config;
use trine_engine::tokenizer::Tokenizer;

fuzz_target!(|bytes: &[u8]| {
    let Ok(h) = parse(bytes) else { return };
    let _ = Config::from_gguf(&h);
    let _ = Tokenizer::from_gguf(&h);
    for t in &h.tensors {
        let data = &bytes[(h.data_offset + t.offset) as usize..][..t.size as usize];
        let (cols, rows) = (t.dims[0] as usize, (t.elements() / t.dims[0]) as usize);
        let _ = trine_engine::formats::decode(t.ty, data, rows, cols);
    }
});
