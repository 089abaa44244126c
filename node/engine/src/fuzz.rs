//! Entry points of the engine's fuzz targets (`node/engine/fuzz`,
//! cargo-fuzz) and of the corpus replay test CI runs
//! (`tests/fuzz_corpora.rs`): untrusted files through the code that reads
//! them. A panic, a hang or an allocation sized by the input is a bug.

use std::sync::OnceLock;

use crate::tokenizer::Tokenizer;

/// Arbitrary bytes as a GGUF file: the parser, then every ternary tensor
/// decoder and the hyper-parameter and tokenizer readers on what it accepts.
pub fn gguf(bytes: &[u8]) {
    let Ok(h) = crate::gguf::parse(bytes) else {
        return;
    };
    let _ = crate::model::Config::from_gguf(&h);
    let _ = Tokenizer::from_gguf(&h);
    for t in &h.tensors {
        let data = &bytes[(h.data_offset + t.offset) as usize..][..t.size as usize];
        let (cols, rows) = (t.dims[0] as usize, (t.elements() / t.dims[0]) as usize);
        let _ = crate::formats::decode(t.ty, data, rows, cols);
    }
}

/// Arbitrary bytes as the files of a Hugging Face directory (a safetensors
/// file, config.json, tokenizer.json), loaded the way `trine generate DIR`
/// loads one.
pub fn hf_files(weights: &[u8], config: &[u8], tokenizer: &[u8]) {
    let _ = Tokenizer::from_hf_json(tokenizer, Some(0), &[1]);
    let Ok(dir) = tempfile::tempdir() else { return };
    let _ = std::fs::write(dir.path().join("model.safetensors"), weights);
    let _ = std::fs::write(dir.path().join("config.json"), config);
    let _ = std::fs::write(dir.path().join("tokenizer.json"), tokenizer);
    let _ = crate::open(dir.path(), None);
}

fn synthetic_tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::synthetic(512).expect("the synthetic vocabulary is valid"))
}

/// Arbitrary text through the byte-level BPE tokenizer (a synthetic
/// LLaMA-3-shaped vocabulary: all 256 bytes, merges, special tokens), and
/// arbitrary ids through decode. Encoding without specials round-trips.
pub fn tokenizer(data: &[u8]) {
    let t = synthetic_tokenizer();
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
}
