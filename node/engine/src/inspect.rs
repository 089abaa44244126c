//! `trine model inspect`: what a model file holds and what is wrong with it,
//! for people (the [`std::fmt::Display`] form) and tests (the fields).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::gguf::{GgufFile, TensorInfo, Value};

use crate::model::load::ARCHITECTURES;

/// The findings and facts of one model file.
#[derive(Debug)]
pub struct Report {
    pub path: PathBuf,
    pub file_bytes: u64,
    pub version: u32,
    pub alignment: u64,
    pub architecture: Option<String>,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    /// Problems that stop the model from loading, or that an operator
    /// should know; empty when the file is sound.
    pub findings: Vec<String>,
}

/// Reads `path` and checks every tensor it can (ternary tensors are fully
/// decoded, so a corrupt code or scale anywhere is found).
pub fn inspect(path: &Path) -> Result<Report, crate::Error> {
    let file = GgufFile::open(path)?;
    let h = &file.header;
    let architecture = h
        .get("general.architecture")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mut findings = Vec::new();
    match &architecture {
        None => findings.push(
            "general.architecture is missing; Trine cannot tell how to run this model".to_owned(),
        ),
        Some(a) if !ARCHITECTURES.contains(&a.as_str()) => findings.push(format!(
            "architecture {a:?} is not one Trine runs ({}); Trine serves BitNet b1.58 models",
            ARCHITECTURES.join(", ")
        )),
        Some(_) => {}
    }
    for t in &h.tensors {
        if !t.ty.is_loadable() {
            findings.push(format!(
                "tensor {} has type {}, which Trine does not load; re-export it as I2_S/TQ2_0/TQ1_0 (ternary) or F16/BF16/F32/Q8_0",
                t.name, t.ty
            ));
            continue;
        }
        if let Err(e) = check_ternary(&file, t) {
            findings.push(format!("tensor {}: {e}", t.name));
        }
    }
    // With every tensor readable, the model as a whole: shapes against the
    // hyper-parameters, required tensors, the tokenizer.
    if findings.is_empty() {
        if let Err(e) = crate::model::Model::from_gguf(&file, path, None) {
            findings.push(e.to_string());
        }
        if let Err(e) = crate::tokenizer::Tokenizer::from_gguf(h) {
            findings.push(e.to_string());
        }
    }
    Ok(Report {
        path: path.to_owned(),
        file_bytes: file.file_len(),
        version: h.version,
        alignment: h.alignment,
        architecture,
        metadata: h.metadata.clone(),
        tensors: h.tensors.clone(),
        findings,
    })
}

fn check_ternary(file: &GgufFile, t: &TensorInfo) -> Result<(), crate::formats::Error> {
    let (cols, rows) = (t.dims[0] as usize, (t.elements() / t.dims[0]) as usize);
    match crate::formats::decode(t.ty, file.data(t), rows, cols) {
        Some(Err(e)) => Err(e),
        _ => Ok(()),
    }
}

fn human_bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: GGUF v{}, {} ({} bytes), alignment {}",
            self.path.display(),
            self.version,
            human_bytes(self.file_bytes),
            self.file_bytes,
            self.alignment
        )?;
        writeln!(
            f,
            "architecture: {}",
            self.architecture.as_deref().unwrap_or("(none)")
        )?;
        writeln!(f, "\nmetadata ({} keys):", self.metadata.len())?;
        for (k, v) in &self.metadata {
            writeln!(f, "  {k} = {v:?}")?;
        }
        let mut by_type: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
        for t in &self.tensors {
            let e = by_type.entry(t.ty.name()).or_default();
            e.0 += 1;
            e.1 += t.size;
        }
        let total: u64 = self.tensors.iter().map(|t| t.size).sum();
        let summary: Vec<String> = by_type
            .iter()
            .map(|(ty, (n, bytes))| format!("{ty} {n} ({})", human_bytes(*bytes)))
            .collect();
        writeln!(
            f,
            "\ntensors: {} in {}: {}",
            self.tensors.len(),
            human_bytes(total),
            summary.join(", ")
        )?;
        let width = self.tensors.iter().map(|t| t.name.len()).max().unwrap_or(4);
        writeln!(
            f,
            "  {:width$}  {:6}  {:>22}  {:>12}",
            "name", "type", "shape (ne0, ne1...)", "bytes"
        )?;
        for t in &self.tensors {
            let shape: Vec<String> = t.dims.iter().map(u64::to_string).collect();
            writeln!(
                f,
                "  {:width$}  {:6}  {:>22}  {:>12}",
                t.name,
                t.ty.name(),
                shape.join(" x "),
                t.size
            )?;
        }
        if self.findings.is_empty() {
            writeln!(f, "\nfindings: none; every tensor is readable")
        } else {
            writeln!(f, "\nfindings ({}):", self.findings.len())?;
            for finding in &self.findings {
                writeln!(f, "  - {finding}")?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::tq;
    use crate::gguf::{GgmlType, Writer};
    use crate::ternary::Ternary;

    #[test]
    fn reports_tensors_and_findings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut w = Writer::new();
        w.kv("general.architecture", Value::String("llama".into()));
        let t = Ternary::from_trits(2, 256, &[1; 512], 0.5);
        let mut tq2 = tq::encode_tq2(&t).unwrap();
        // Second block of the same row with another scale: a finding.
        tq2[66 + 64..66 + 66].copy_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
        w.tensor("blk.0.attn_q.weight", &[256, 2], GgmlType::TQ2_0, tq2);
        w.tensor("q4", &[32], GgmlType::Q4_0, vec![0; 18]);
        w.write(&path).unwrap();

        let r = inspect(&path).unwrap();
        assert_eq!(r.architecture.as_deref(), Some("llama"));
        assert_eq!(r.tensors.len(), 2);
        assert_eq!(r.findings.len(), 3, "{:?}", r.findings);
        let text = r.to_string();
        assert!(text.contains("blk.0.attn_q.weight  TQ2_0"), "{text}");
        assert!(text.contains("not one Trine runs"), "{text}");
        assert!(text.contains("tensor q4 has type Q4_0"), "{text}");
        assert!(text.contains("one scale per tensor"), "{text}");
    }

    #[test]
    fn a_readable_file_that_is_not_a_whole_model_is_a_finding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let w = crate::synth::Weights::generate(crate::synth::Preset::Tiny, 1);
        let mut gguf = w.to_gguf(crate::synth::TernaryType::I2S).unwrap();
        gguf.write(&path).unwrap();
        assert!(inspect(&path).unwrap().findings.is_empty());
        gguf.kv("bitnet-b1.58.block_count", Value::U32(3));
        gguf.write(&path).unwrap();
        let r = inspect(&path).unwrap();
        assert_eq!(r.findings.len(), 1, "{:?}", r.findings);
        assert!(
            r.findings[0].contains("blk.2.attn_norm.weight is missing"),
            "{:?}",
            r.findings
        );
    }
}

/// What a Hugging Face model directory holds and what is wrong with it.
#[derive(Debug)]
pub struct HfReport {
    pub path: PathBuf,
    pub config: String,
    /// (file, tensor, dtype, shape, bytes)
    pub tensors: Vec<(String, String, String, Vec<usize>, usize)>,
    pub findings: Vec<String>,
}

/// Lists a directory's config and tensors, then loads it in full: a load
/// failure is the finding.
pub fn inspect_hf(dir: &Path) -> Result<HfReport, crate::Error> {
    let config_path = dir.join("config.json");
    let config = std::fs::read_to_string(&config_path).map_err(|source| crate::Error::Io {
        path: config_path,
        source,
    })?;
    let mut tensors = Vec::new();
    let mut findings = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| crate::Error::Io {
            path: dir.to_owned(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    for file in &files {
        let map = crate::mmap::Mapped::open(file)?;
        match safetensors::SafeTensors::deserialize(map.bytes()) {
            Ok(st) => {
                let mut list: Vec<_> = st.tensors();
                list.sort_by(|a, b| a.0.cmp(&b.0));
                for (name, view) in list {
                    let fname = file
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    tensors.push((
                        fname,
                        name,
                        format!("{:?}", view.dtype()),
                        view.shape().to_vec(),
                        view.data().len(),
                    ));
                }
            }
            Err(e) => findings.push(format!(
                "{}: {}",
                file.display(),
                crate::hf::header_error(map.bytes(), &e)
            )),
        }
    }
    if let Err(e) = crate::hf::open(dir, None) {
        findings.push(e.to_string());
    }
    Ok(HfReport {
        path: dir.to_owned(),
        config,
        tensors,
        findings,
    })
}

impl fmt::Display for HfReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: Hugging Face model directory", self.path.display())?;
        writeln!(f, "\nconfig.json:\n{}", self.config.trim_end())?;
        let total: usize = self.tensors.iter().map(|t| t.4).sum();
        writeln!(
            f,
            "\ntensors: {} in {}",
            self.tensors.len(),
            human_bytes(total as u64)
        )?;
        let width = self.tensors.iter().map(|t| t.1.len()).max().unwrap_or(4);
        for (file, name, dtype, shape, bytes) in &self.tensors {
            writeln!(
                f,
                "  {name:width$}  {dtype:5}  {:>14}  {bytes:>12}  {file}",
                format!("{shape:?}")
            )?;
        }
        if self.findings.is_empty() {
            writeln!(f, "\nfindings: none; the model loads")
        } else {
            writeln!(f, "\nfindings ({}):", self.findings.len())?;
            for finding in &self.findings {
                writeln!(f, "  - {finding}")?;
            }
            Ok(())
        }
    }
}
