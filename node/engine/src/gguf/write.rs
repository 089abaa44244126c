//! Writes GGUF v3 files: metadata in insertion order, tensors aligned to
//! `general.alignment` (32 unless set). The file appears atomically (written
//! beside the target, then renamed) so a crash never leaves half a model.

use std::io::{BufWriter, Write as _};
use std::path::Path;

use super::read::DEFAULT_ALIGNMENT;
use super::{GgmlType, Value};

/// A GGUF file being assembled in memory.
#[derive(Debug, Default)]
pub struct Writer {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a metadata key.
    pub fn kv(&mut self, key: &str, value: Value) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_owned(), value)),
        }
        self
    }

    /// Adds (or replaces) a tensor; `dims` in ggml order (dims[0] contiguous). Panics in
    /// debug builds if `data` does not have the size the type implies, since
    /// that is a bug in the caller, not bad input.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        debug_assert_eq!(
            ty.byte_size(dims[0], dims.iter().product()),
            Some(data.len() as u64),
            "tensor {name}"
        );
        let entry = (name.to_owned(), dims.to_vec(), ty, data);
        match self.tensors.iter_mut().find(|t| t.0 == name) {
            Some(slot) => *slot = entry,
            None => self.tensors.push(entry),
        }
        self
    }

    fn alignment(&self) -> u64 {
        self.metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// Everything before the tensor data, padded to the alignment.
    fn header_bytes(&self) -> Vec<u8> {
        let align = self.alignment() as usize;
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            out.extend_from_slice(&value.type_id().to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0usize;
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + data.len()).div_ceil(align) * align;
        }
        pad(&mut out, align);
        out
    }

    /// Streams the file to `w` (the tensor data is not copied).
    pub fn write_to(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        let align = self.alignment() as usize;
        w.write_all(&self.header_bytes())?;
        let zeros = vec![0u8; align];
        for (_, _, _, data) in &self.tensors {
            w.write_all(data)?;
            let padding = data.len().div_ceil(align) * align - data.len();
            w.write_all(&zeros[..padding])?;
        }
        Ok(())
    }

    /// The whole file in memory.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = self.write_to(&mut out);
        out
    }

    /// Writes the file atomically: `path` holds the old content or the new,
    /// never a part.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        let mut tmp = tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new(".")))?;
        {
            let mut w = BufWriter::new(tmp.as_file_mut());
            self.write_to(&mut w)?;
            w.flush()?;
        }
        // Model files are read by other users and tools; tempfile makes 0600.
        tmp.as_file()
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}

fn pad(out: &mut Vec<u8>, align: usize) {
    let len = out.len().div_ceil(align) * align;
    out.resize(len, 0);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            // An empty array is written as an array of u8 (gguf-py does the same for []).
            let elem = items.first().map_or(0, Value::type_id);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Error, parse};
    use super::*;

    fn sample() -> Writer {
        let mut w = Writer::new();
        w.kv("general.architecture", Value::String("bitnet-b1.58".into()))
            .kv("bitnet-b1.58.block_count", Value::U32(2))
            .kv("bitnet-b1.58.rope.freq_base", Value::F32(500_000.0))
            .kv("tokenizer.ggml.add_bos_token", Value::Bool(true))
            .kv(
                "tokenizer.ggml.tokens",
                Value::Array(vec![Value::String("a".into()), Value::String("Ġb".into())]),
            )
            .kv(
                "nested",
                Value::Array(vec![Value::Array(vec![Value::I64(-3)])]),
            )
            .kv("empty", Value::Array(vec![]))
            .kv("f64", Value::F64(0.25));
        w.tensor("norm", &[8], GgmlType::F32, vec![7; 32]);
        w.tensor("w", &[128, 2], GgmlType::I2S, vec![0x55; 64 + 32]);
        w
    }

    #[test]
    fn written_files_parse_back() {
        let w = sample();
        let bytes = w.to_bytes();
        let h = parse(&bytes).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.metadata, w.metadata);
        assert_eq!(h.tensors.len(), 2);
        let t = h.tensor("w").unwrap();
        assert_eq!(
            (t.ty, t.dims.clone(), t.size),
            (GgmlType::I2S, vec![128, 2], 96)
        );
        assert_eq!(t.offset % 32, 0);
        let start = (h.data_offset + t.offset) as usize;
        assert_eq!(&bytes[start..start + 96], &[0x55; 96][..]);
    }

    /// Cuts the file at every length: each prefix is an error, never a
    /// panic, and never accepted.
    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().to_bytes();
        for len in 0..bytes.len() {
            assert!(
                parse(&bytes[..len]).is_err(),
                "prefix of {len} bytes parsed"
            );
        }
    }

    #[test]
    fn hostile_headers_are_refused_without_allocating() {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        assert!(matches!(parse(&bytes), Err(Error::ImplausibleCount { .. })));

        // An 8 GB string.
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&(8u64 << 30).to_le_bytes());
        bytes.extend_from_slice(b"key");
        assert!(matches!(parse(&bytes), Err(Error::ImplausibleCount { .. })));

        assert!(matches!(
            parse(b"GGML\x03\0\0\0"),
            Err(Error::BadMagic { .. })
        ));
        assert_eq!(parse(b"GGUF\x07\0\0\0"), Err(Error::UnsupportedVersion(7)));
    }

    fn with_tensors(tensors: &[(&str, u64, u32, u64)]) -> Vec<u8> {
        // (name, ne0, type id, offset); ne1 = 1; data section of 256 bytes.
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        for (name, ne0, ty, offset) in tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&1u32.to_le_bytes());
            out.extend_from_slice(&ne0.to_le_bytes());
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        pad(&mut out, 32);
        out.resize(out.len() + 256, 0);
        out
    }

    #[test]
    fn tensor_table_is_checked() {
        assert!(parse(&with_tensors(&[("a", 32, 0, 0), ("b", 32, 0, 128)])).is_ok());
        assert!(matches!(
            parse(&with_tensors(&[("a", 32, 0, 0), ("b", 32, 0, 96)])),
            Err(Error::OverlappingTensors { .. })
        ));
        assert!(matches!(
            parse(&with_tensors(&[("a", 32, 0, 0), ("a", 32, 0, 128)])),
            Err(Error::DuplicateTensor(_))
        ));
        assert!(matches!(
            parse(&with_tensors(&[("a", 128, 0, 0)])),
            Err(Error::TensorOutOfBounds { .. })
        ));
        assert!(matches!(
            parse(&with_tensors(&[("a", 4, 0, 16)])),
            Err(Error::BadTensor { .. })
        ));
        assert!(matches!(
            parse(&with_tensors(&[("a", 100, 35, 0)])),
            Err(Error::BadTensor { .. })
        ));
        let err = parse(&with_tensors(&[("blk.3.attn_q.weight", 128, 39, 0)])).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("blk.3.attn_q.weight") && msg.contains("TL2"),
            "{msg}"
        );
        assert!(matches!(
            parse(&with_tensors(&[("a", u64::MAX, 0, 0)])),
            Err(Error::BadTensor { .. })
        ));
    }
}

#[cfg(test)]
mod mutation {
    //! Structure-aware fuzzing in the test suite: random byte edits of a real
    //! synthetic model file never make the parser or the ternary decoders
    //! panic (cargo-fuzz targets in node/engine/fuzz go further).
    use proptest::prelude::*;

    use crate::gguf::parse;
    use crate::synth::{Preset, TernaryType, Weights};

    fn file(ty: TernaryType) -> Vec<u8> {
        static FILES: std::sync::OnceLock<[Vec<u8>; 3]> = std::sync::OnceLock::new();
        let files = FILES.get_or_init(|| {
            let w = Weights::generate(Preset::Tiny, 1);
            [TernaryType::I2S, TernaryType::TQ2_0, TernaryType::TQ1_0]
                .map(|t| w.to_gguf(t).unwrap().to_bytes())
        });
        files[ty as usize].clone()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn edited_files_never_panic(
            ty in prop_oneof![Just(TernaryType::I2S), Just(TernaryType::TQ2_0), Just(TernaryType::TQ1_0)],
            // Edits in the header region, where structure lives, and anywhere.
            edits in proptest::collection::vec((0usize..4096, any::<u8>(), any::<bool>()), 1..8),
        ) {
            let mut bytes = file(ty);
            let len = bytes.len();
            for (at, value, anywhere) in edits {
                let i = if anywhere { at * 131 % len } else { at % 4096.min(len) };
                bytes[i] = value;
            }
            if let Ok(h) = parse(&bytes) {
                for t in &h.tensors {
                    let data = &bytes[(h.data_offset + t.offset) as usize..][..t.size as usize];
                    let (cols, rows) = (t.dims[0] as usize, (t.elements() / t.dims[0]) as usize);
                    let _ = crate::formats::decode(t.ty, data, rows, cols);
                }
            }
        }
    }
}
