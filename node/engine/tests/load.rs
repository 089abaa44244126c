//! Loading refuses bad files with a message naming the file, the tensor and
//! the fix — never a panic.

#![allow(clippy::unwrap_used)] // test helpers: a failure is the test failing

use trine_engine::gguf::{GgmlType, Value, Writer};
use trine_engine::model::Model;
use trine_engine::synth::{Preset, TernaryType, Weights};

/// The tiny model's GGUF with `edit` applied before writing; the load error.
fn load_error(edit: impl FnOnce(&mut Writer)) -> String {
    let w = Weights::generate(Preset::Tiny, 1);
    let mut gguf = w.to_gguf(TernaryType::I2S).unwrap();
    edit(&mut gguf);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    gguf.write(&path).unwrap();
    let err = Model::open(&path)
        .expect_err("a bad file loaded")
        .to_string();
    assert!(err.contains("m.gguf"), "no file name in: {err}");
    assert!(!err.contains('\n'), "multi-line error: {err}");
    err
}

#[test]
fn a_missing_hyper_parameter_is_named() {
    let err = load_error(|w| {
        w.kv("bitnet-b1.58.block_count", Value::String("two".into()));
    });
    assert!(err.contains("bitnet-b1.58.block_count"), "{err}");
}

#[test]
fn an_unknown_architecture_is_named() {
    let err = load_error(|w| {
        w.kv("general.architecture", Value::String("llama".into()));
    });
    assert!(err.contains("\"llama\"") && err.contains("BitNet"), "{err}");
}

#[test]
fn metadata_disagreeing_with_tensors_is_found() {
    let err = load_error(|w| {
        w.kv("bitnet-b1.58.feed_forward_length", Value::U32(1024));
    });
    assert!(
        err.contains("blk.0.ffn_gate.weight") && err.contains("disagree"),
        "{err}"
    );
}

#[test]
fn an_absurd_hyper_parameter_is_refused_before_allocating() {
    let err = load_error(|w| {
        w.kv("bitnet-b1.58.embedding_length", Value::U64(1 << 40));
    });
    assert!(err.contains("hidden size"), "{err}");
}

#[test]
fn a_missing_layer_tensor_is_named() {
    let w = Weights::generate(Preset::Tiny, 1);
    let mut gguf = w.to_gguf(TernaryType::I2S).unwrap();
    // Claim a third layer the file does not have.
    gguf.kv("bitnet-b1.58.block_count", Value::U32(3));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    gguf.write(&path).unwrap();
    let err = Model::open(&path).unwrap_err().to_string();
    assert!(err.contains("blk.2.attn_norm.weight is missing"), "{err}");
}

#[test]
fn a_nan_norm_is_found() {
    let err = load_error(|w| {
        let mut nan = Vec::new();
        for _ in 0..256 {
            nan.extend_from_slice(&f32::NAN.to_le_bytes());
        }
        w.tensor("output_norm.weight", &[256], GgmlType::F32, nan);
    });
    assert!(
        err.contains("output_norm.weight") && err.contains("NaN"),
        "{err}"
    );
}

#[test]
fn a_bad_stage_range_is_refused() {
    let w = Weights::generate(Preset::Tiny, 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    w.to_gguf(TernaryType::I2S).unwrap().write(&path).unwrap();
    let err = Model::open_stage(&path, Some(1..3))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a stage of a 2-layer model"), "{err}");
}

#[test]
fn truncated_and_foreign_files_are_refused() {
    let w = Weights::generate(Preset::Tiny, 1);
    let bytes = w.to_gguf(TernaryType::TQ1_0).unwrap().to_bytes();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = Model::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("cut.gguf") && err.contains("truncated"),
        "{err}"
    );
    std::fs::write(&path, b"{\"not\": \"a model\"}").unwrap();
    let err = Model::open(&path).unwrap_err().to_string();
    assert!(err.contains("not a GGUF file"), "{err}");
    let err = Model::open(&dir.path().join("absent.gguf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.gguf"), "{err}");
}

#[test]
fn biases_and_rope_scaling_are_refused_not_ignored() {
    let err = load_error(|w| {
        w.tensor("blk.0.attn_q.bias", &[256], GgmlType::F32, vec![0; 1024]);
    });
    assert!(
        err.contains("blk.0.attn_q.bias") && err.contains("bias"),
        "{err}"
    );
    let err = load_error(|w| {
        w.kv(
            "bitnet-b1.58.rope.scaling.type",
            Value::String("yarn".into()),
        );
    });
    assert!(
        err.contains("RoPE scaling") && err.contains("yarn"),
        "{err}"
    );
}

#[test]
fn upstream_linear_rope_scaling_of_one_is_accepted() {
    let w = Weights::generate(Preset::Tiny, 1);
    let mut gguf = w.to_gguf(TernaryType::I2S).unwrap();
    gguf.kv(
        "bitnet-b1.58.rope.scaling.type",
        Value::String("linear".into()),
    )
    .kv("bitnet-b1.58.rope.scaling.factor", Value::F32(1.0));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    gguf.write(&path).unwrap();
    Model::open(&path).unwrap();
}
