//! An independent implementation agrees with our GGUF files: llama.cpp's own
//! gguf-py (PyPI `gguf`, pinned in tests/py/setup.sh) reads every file we
//! write with the same metadata and tensor table, decodes our TQ1_0 / TQ2_0
//! tensors to the same values we do, and quantizes those values back to
//! exactly our bytes.

#![allow(clippy::unwrap_used)] // test helpers: a failure is the test failing

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value as Json;
use trine_engine::formats::tq;
use trine_engine::gguf::{GgmlType, Value, parse};
use trine_engine::synth::{Preset, TernaryType, Weights};

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("TRINE_PYTHON") {
        return p.into();
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = here.join("../../target/py-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        let status = Command::new("bash")
            .arg(here.join("tests/py/setup.sh"))
            .arg(&venv)
            .status()
            .expect("running tests/py/setup.sh");
        assert!(
            status.success(),
            "could not install gguf-py (see above); run `bash node/engine/tests/py/setup.sh` by hand, or set TRINE_PYTHON to a python with `gguf` installed"
        );
    }
    python
}

fn to_json(v: &Value) -> Json {
    match v {
        Value::String(s) => Json::from(s.clone()),
        Value::Bool(b) => Json::from(*b),
        Value::F32(f) => Json::from(f64::from(*f)),
        Value::F64(f) => Json::from(*f),
        Value::Array(items) => Json::Array(items.iter().map(to_json).collect()),
        other => match (other.as_u64(), other.as_f64()) {
            (Some(u), _) => Json::from(u),
            (None, Some(f)) => Json::from(f as i64),
            _ => unreachable!(),
        },
    }
}

#[test]
fn gguf_py_reads_what_we_write() {
    let python = python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/gguf_check.py");
    let weights = Weights::generate(Preset::Tiny, 5);
    let dir = tempfile::tempdir().unwrap();
    for ty in [TernaryType::I2S, TernaryType::TQ2_0, TernaryType::TQ1_0] {
        let path = dir.path().join(format!("{ty:?}.gguf"));
        let bytes = weights.to_gguf(ty).unwrap().to_bytes();
        std::fs::write(&path, &bytes).unwrap();
        let ours = parse(&bytes).unwrap();
        let out = Command::new(&python)
            .arg(&script)
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gguf-py failed on {ty:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs: Json = serde_json::from_slice(&out.stdout).unwrap();

        let meta = theirs["metadata"].as_object().unwrap();
        assert_eq!(meta.len(), ours.metadata.len(), "{ty:?}: key count");
        for (k, v) in &ours.metadata {
            assert_eq!(meta.get(k), Some(&to_json(v)), "{ty:?}: metadata {k}");
        }
        assert_eq!(theirs["data_offset"], ours.data_offset, "{ty:?}");
        let table = theirs["tensors"].as_array().unwrap();
        assert_eq!(table.len(), ours.tensors.len());
        for (t, j) in ours.tensors.iter().zip(table) {
            assert_eq!(j["name"], t.name.as_str());
            assert_eq!(j["dims"], serde_json::json!(t.dims), "{}", t.name);
            assert_eq!(j["type"], t.ty.id(), "{}", t.name);
            assert_eq!(j["offset"], t.offset, "{}", t.name);
        }

        let quants = theirs["quants"].as_object().unwrap();
        let ternary: Vec<_> = ours
            .tensors
            .iter()
            .filter(|t| matches!(t.ty, GgmlType::TQ1_0 | GgmlType::TQ2_0))
            .collect();
        assert_eq!(
            quants.len(),
            ternary.len(),
            "{ty:?}: gguf-py checked {} tensors",
            quants.len()
        );
        for t in ternary {
            let q = &quants[&t.name];
            assert_eq!(
                q["requantized_identical"], true,
                "{}: gguf.quants writes other bytes",
                t.name
            );
            let data = &bytes[(ours.data_offset + t.offset) as usize..][..t.size as usize];
            let (cols, rows) = (t.dims[0] as usize, t.dims[1] as usize);
            let m = match t.ty {
                GgmlType::TQ1_0 => tq::decode_tq1(data, rows, cols),
                _ => tq::decode_tq2(data, rows, cols),
            }
            .unwrap();
            let first: Vec<f64> = q["first"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            for (i, v) in first.iter().enumerate() {
                let want = f64::from(m.beta()) * f64::from(m.get(i / cols, i % cols));
                assert_eq!(*v, want, "{} value {i}", t.name);
            }
            let sum: f64 = m
                .to_trits()
                .iter()
                .map(|&x| f64::from(x) * f64::from(m.beta()))
                .sum();
            assert!(
                (q["sum"].as_f64().unwrap() - sum).abs() < 1e-6 * sum.abs().max(1.0),
                "{}",
                t.name
            );
        }
    }
}
