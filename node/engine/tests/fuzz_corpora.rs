//! Every input the engine's fuzzers kept (node/engine/fuzz/corpus/<target>),
//! replayed through the same entry points (`trine_engine::fuzz`), decoded
//! as libFuzzer hands them to the targets. CI cannot run libFuzzer (it
//! needs a sanitizer build); this keeps what it found covered.

use std::path::Path;

use arbitrary::{Arbitrary as _, Unstructured};

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
        .iter()
        .map(|p| std::fs::read(p).expect("a corpus file"))
        .collect()
}

#[test]
fn fuzz_corpora_replay_cleanly() {
    for data in corpus("gguf") {
        trine_engine::fuzz::gguf(&data);
    }
    for data in corpus("tokenizer") {
        trine_engine::fuzz::tokenizer(&data);
    }
    let (mut decoded, files) = (0, corpus("hf_files"));
    for data in &files {
        let Ok((w, c, t)) = <(&[u8], &[u8], &[u8])>::arbitrary_take_rest(Unstructured::new(data))
        else {
            continue;
        };
        trine_engine::fuzz::hf_files(w, c, t);
        decoded += 1;
    }
    // The decoding matches the fuzzer's: (nearly) every kept input decodes.
    assert!(
        decoded * 10 >= files.len() * 9,
        "{decoded} of {} decoded",
        files.len()
    );
}
