//! Hugging Face directories: the -bf16 layout (ternarized at load), the
//! `linear_class` rule for `weight_scale`, the tokenizer.json tokenizer
//! agreeing with the GGUF one, and refusals of bad directories.

#![allow(clippy::unwrap_used)] // test helpers: a failure is the test failing

use std::path::Path;

use half::bf16;
use safetensors::{Dtype, SafeTensors};
use trine_engine::synth::{Preset, TernaryType, Weights};
use trine_engine::ternary::Ternary;

/// Rewrites dir/model.safetensors, replacing or dropping tensors.
fn rewrite(dir: &Path, edit: impl Fn(&str) -> Option<Option<(Dtype, Vec<usize>, Vec<u8>)>>) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        match edit(&name) {
            None => owned.push((
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )),
            Some(None) => {}
            Some(Some((d, s, b))) => owned.push((name, d, s, b)),
        }
    }
    let views: Vec<_> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn synth_hf(seed: u64) -> (Weights, tempfile::TempDir) {
    let w = Weights::generate(Preset::Tiny, seed);
    let dir = tempfile::tempdir().unwrap();
    w.write_hf(dir.path()).unwrap();
    (w, dir)
}

#[test]
fn bf16_master_weights_are_ternarized_per_tensor() {
    let (w, dir) = synth_hf(2);
    let (out, inp) = (w.config.hidden, w.config.hidden);
    // Real-valued master weights for layer 0's q_proj, stored as BF16 [out, in].
    let master: Vec<f32> = (0..out * inp)
        .map(|i| bf16::from_f32(((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.02).to_f32())
        .collect();
    let bytes: Vec<u8> = master
        .iter()
        .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
        .collect();
    rewrite(dir.path(), |name| match name {
        "model.layers.0.self_attn.q_proj.weight" => {
            Some(Some((Dtype::BF16, vec![out, inp], bytes.clone())))
        }
        "model.layers.0.self_attn.q_proj.weight_scale" => Some(None),
        _ => None,
    });
    let (model, _) = trine_engine::open(dir.path(), None).unwrap();
    let want = Ternary::quantize(out, inp, &master);
    assert_eq!(model.layers[0].q, want);
    let mean = master.iter().map(|v| f64::from(v.abs())).sum::<f64>() / master.len() as f64;
    assert!((f64::from(model.layers[0].q.beta()) - mean).abs() < 1e-6);
    // The other projections keep their packed weights.
    assert_eq!(model.layers[0].k, w.layers[0].k);
}

#[test]
fn linear_class_decides_whether_the_scale_multiplies_or_divides() {
    let (w, dir) = synth_hf(3);
    let (model, _) = trine_engine::open(dir.path(), None).unwrap();
    assert_eq!(model.layers[1].down.beta(), w.layers[1].down.beta());
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("autobitlinear", "bitlinear");
    std::fs::write(&config, text).unwrap();
    let (model, _) = trine_engine::open(dir.path(), None).unwrap();
    assert_eq!(model.layers[1].down.beta(), 1.0 / w.layers[1].down.beta());
    assert_eq!(model.layers[1].down.to_trits(), w.layers[1].down.to_trits());
}

#[test]
fn tokenizer_json_and_gguf_tokenizers_agree() {
    let (w, dir) = synth_hf(4);
    let (_, from_json) = trine_engine::open(dir.path(), None).unwrap();
    let gguf = dir.path().join("m.gguf");
    w.to_gguf(TernaryType::I2S).unwrap().write(&gguf).unwrap();
    let (_, from_gguf) = trine_engine::open(&gguf, None).unwrap();
    for text in [
        "The capital of France is Paris.",
        "  hello\n\nworld 12345!",
        "naïve café ☕ 東京",
        "<|eot_id|>x",
    ] {
        assert_eq!(
            from_json.encode(text, true),
            from_gguf.encode(text, true),
            "{text:?}"
        );
    }
    assert_eq!(from_json.stop, from_gguf.stop);
    assert_eq!(from_json.bos, from_gguf.bos);
}

fn open_error(dir: &Path) -> String {
    let err = trine_engine::open(dir, None)
        .expect_err("a bad directory loaded")
        .to_string();
    assert!(!err.contains('\n'), "{err}");
    err
}

#[test]
fn bad_directories_are_refused_with_the_reason() {
    let (_, dir) = synth_hf(5);
    let config = dir.path().join("config.json");
    let good = std::fs::read_to_string(&config).unwrap();

    std::fs::write(&config, good.replace("\"hidden_size\"", "\"hidden_sise\"")).unwrap();
    let err = open_error(dir.path());
    assert!(
        err.contains("config.json") && err.contains("hidden_size"),
        "{err}"
    );

    std::fs::write(&config, good.replace("relu2", "gelu")).unwrap();
    assert!(open_error(dir.path()).contains("gelu"));

    std::fs::write(
        &config,
        good.replace("\"intermediate_size\": 512", "\"intermediate_size\": 1024"),
    )
    .unwrap();
    let err = open_error(dir.path());
    assert!(
        err.contains("mlp.gate_proj") && err.contains("shape"),
        "{err}"
    );
    std::fs::write(&config, &good).unwrap();

    // A header that claims more bytes than the file holds.
    let st = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    bytes[..8].copy_from_slice(&(n + 1_000_000).to_le_bytes());
    std::fs::write(&st, &bytes).unwrap();
    let err = open_error(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("header"),
        "{err}"
    );

    // A header whose offsets run past the data.
    let (_, dir) = synth_hf(5);
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 100]).unwrap();
    assert!(open_error(dir.path()).contains("model.safetensors"));

    // A missing tensor.
    let (_, dir) = synth_hf(5);
    rewrite(dir.path(), |name| {
        (name == "model.layers.1.mlp.ffn_sub_norm.weight").then_some(None)
    });
    assert!(open_error(dir.path()).contains("model.layers.1.mlp.ffn_sub_norm.weight is missing"));

    // No weights at all.
    let empty = tempfile::tempdir().unwrap();
    std::fs::write(empty.path().join("config.json"), &good).unwrap();
    assert!(open_error(empty.path()).contains("neither model.safetensors"));
}

#[test]
fn a_scale_of_any_one_element_shape_and_float_dtype_is_read() {
    let (w, dir) = synth_hf(7);
    let beta = w.layers[0].up.beta();
    let name = "model.layers.0.mlp.up_proj.weight_scale";
    rewrite(dir.path(), |n| {
        (n == name).then(|| Some((Dtype::F32, vec![], beta.to_le_bytes().to_vec())))
    });
    let (model, _) = trine_engine::open(dir.path(), None).unwrap();
    assert_eq!(model.layers[0].up.beta(), beta);
    rewrite(dir.path(), |n| {
        (n == name).then(|| Some((Dtype::U8, vec![1], vec![1])))
    });
    let err = open_error(dir.path());
    assert!(err.contains(name) && err.contains("U8"), "{err}");
}
