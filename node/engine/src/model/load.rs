//! Building a stage from a GGUF file (BITNET.md §2b): the official
//! `bitnet-b1.58` files (and their `bitnet-25` predecessor) and upstream
//! llama.cpp's `bitnet` arch. Ternary tensors may be I2_S, TQ2_0, TQ1_0, or
//! float tensors: already-ternary β·T values (as upstream's converter writes
//! them) keep β = max|w|; real-valued weights are ternarized per tensor
//! (β = mean|w|). Upstream's optional `<name>.scale` tensors multiply β.
//! The lm_head is always the token embedding (tied), as both bitnet.cpp and
//! llama.cpp compute it.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use super::{Config, Dense, Layer, Model};
use crate::Error;
use crate::formats::{i2s, tq};
use crate::gguf::{GgmlType, GgufFile, TensorInfo};
use crate::kernels::Kernel;
use crate::ternary::Ternary;

struct Loader<'a> {
    file: &'a GgufFile,
    path: &'a Path,
}

impl Loader<'_> {
    fn model_error(&self, problem: String) -> Error {
        Error::Model {
            path: self.path.to_owned(),
            problem,
        }
    }

    fn tensor_error(&self, name: &str, source: crate::formats::Error) -> Error {
        Error::Tensor {
            path: self.path.to_owned(),
            tensor: name.to_owned(),
            source,
        }
    }

    /// The tensor `name`, which must have shape `dims` (ggml order).
    fn info(&self, name: &str, dims: &[usize]) -> Result<&TensorInfo, Error> {
        let t = self.file.header.tensor(name).ok_or_else(|| {
            self.model_error(format!(
                "tensor {name} is missing; the file is incomplete or not a BitNet b1.58 model"
            ))
        })?;
        let want: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        // Trailing 1s are the same shape (a [2560] norm may be [2560, 1]).
        let mut got = t.dims.clone();
        while got.len() > want.len() && got.last() == Some(&1) {
            got.pop();
        }
        if got != want {
            return Err(self.model_error(format!(
                "tensor {name} has shape {:?}, but the hyper-parameters say {want:?}; the file's metadata and tensors disagree",
                t.dims
            )));
        }
        Ok(t)
    }

    fn dense(&self, name: &str, cols: usize, rows: usize) -> Result<Dense, Error> {
        let dims: &[usize] = if rows == 1 { &[cols] } else { &[cols, rows] };
        let t = self.info(name, dims)?;
        Dense::from_bytes(t.ty, self.file.bytes(t), rows, cols)
            .map_err(|e| self.tensor_error(name, e))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, Error> {
        let d = self.dense(name, len, 1)?;
        let mut v = vec![0f32; len];
        d.row_into(0, &mut v);
        if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
            return Err(self.model_error(format!(
                "tensor {name} holds {bad}; the file is corrupt: fetch or export it again"
            )));
        }
        Ok(v)
    }

    /// A ternary weight of `rows` outputs by `cols` inputs.
    fn ternary(&self, name: &str, cols: usize, rows: usize) -> Result<Ternary, Error> {
        let t = self.info(name, &[cols, rows])?;
        let data = self.file.data(t);
        let err = |e| self.tensor_error(name, e);
        let mut w = match t.ty {
            GgmlType::I2S => i2s::decode_bytes(self.file.bytes(t), rows, cols).map_err(err)?,
            GgmlType::TQ2_0 => tq::decode_tq2(data, rows, cols).map_err(err)?,
            GgmlType::TQ1_0 => tq::decode_tq1(data, rows, cols).map_err(err)?,
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                let d = Dense::from_bytes(t.ty, data, rows, cols).map_err(err)?;
                let mut values = vec![0f32; rows * cols];
                for r in 0..rows {
                    d.row_into(r, &mut values[r * cols..(r + 1) * cols]);
                }
                if let Some(bad) = values.iter().find(|x| !x.is_finite()) {
                    return Err(self.model_error(format!(
                        "tensor {name} holds {bad}; the file is corrupt: fetch or export it again"
                    )));
                }
                ternarize(rows, cols, &values)
            }
            other => {
                return Err(self.model_error(format!(
                    "tensor {name} has type {other}; ternary weights must be I2_S, TQ2_0, TQ1_0 or F32/F16/BF16: re-export the model"
                )));
            }
        };
        let scale_name = name.replace(".weight", ".scale");
        if let Some(s) = self.file.header.tensor(&scale_name) {
            let s = self.vector(&scale_name, s.elements() as usize)?;
            match s.as_slice() {
                [v] if *v > 0.0 => w = w.clone().with_beta(w.beta() * v),
                _ => {
                    return Err(self.model_error(format!(
                        "tensor {scale_name} should hold one positive number, but holds {s:?}"
                    )));
                }
            }
        }
        Ok(w)
    }

    fn layer(&self, i: usize, c: &Config) -> Result<Layer, Error> {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        let (h, qw, kvw, f) = (c.hidden, c.heads * c.head_dim, c.kv_width(), c.ffn);
        Ok(Layer {
            attn_norm: self.vector(&n("attn_norm"), h)?,
            q: self.ternary(&n("attn_q"), h, qw)?,
            k: self.ternary(&n("attn_k"), h, kvw)?,
            v: self.ternary(&n("attn_v"), h, kvw)?,
            attn_sub_norm: self.vector(&n("attn_sub_norm"), qw)?,
            o: self.ternary(&n("attn_output"), qw, h)?,
            ffn_norm: self.vector(&n("ffn_norm"), h)?,
            gate: self.ternary(&n("ffn_gate"), h, f)?,
            up: self.ternary(&n("ffn_up"), h, f)?,
            ffn_sub_norm: self.vector(&n("ffn_sub_norm"), f)?,
            down: self.ternary(&n("ffn_down"), f, h)?,
        })
    }
}

/// Float weights to ternary: values that already are β·T (at most one
/// magnitude besides 0) keep their β; anything else is quantized per
/// tensor with β = mean|w| (BITNET.md §1.3).
pub fn ternarize(rows: usize, cols: usize, values: &[f32]) -> Ternary {
    let mut magnitude: Option<f32> = None;
    let already = values.iter().all(|&v| {
        let a = v.abs();
        a == 0.0 || *magnitude.get_or_insert(a) == a
    });
    match (already, magnitude) {
        (true, Some(beta)) => {
            let trits: Vec<i8> = values
                .iter()
                .map(|&v| v.signum() as i8 * i8::from(v != 0.0))
                .collect();
            Ternary::from_trits(rows, cols, &trits, beta)
        }
        _ => Ternary::quantize(rows, cols, values),
    }
}

/// Architectures whose GGUF tensors this loader understands.
pub const ARCHITECTURES: &[&str] = &["bitnet-b1.58", "bitnet-25", "bitnet"];

impl Model {
    /// The whole model in `path`.
    pub fn open(path: &Path) -> Result<Model, Error> {
        Self::open_stage(path, None)
    }

    /// Layers `range` of the model in `path` (all of them for `None`),
    /// with the kernel that is fastest on this CPU.
    pub fn open_stage(path: &Path, range: Option<Range<usize>>) -> Result<Model, Error> {
        Self::from_gguf(&GgufFile::open(path)?, path, range)
    }

    /// Layers `range` of an open GGUF file (`path` names it in errors).
    pub fn from_gguf(
        file: &GgufFile,
        path: &Path,
        range: Option<Range<usize>>,
    ) -> Result<Model, Error> {
        let l = Loader { file, path };
        let arch = file
            .header
            .get("general.architecture")
            .and_then(crate::gguf::Value::as_str);
        if let Some(arch) = arch.filter(|a| !ARCHITECTURES.contains(a)) {
            return Err(l.model_error(format!(
                "architecture {arch:?} is not one Trine runs ({}); Trine serves BitNet b1.58 models",
                ARCHITECTURES.join(", ")
            )));
        }
        let config = Config::from_gguf(&file.header).map_err(|e| {
            l.model_error(format!("{e}; the file's metadata is incomplete or corrupt"))
        })?;
        let range = range.unwrap_or(0..config.layers);
        config.check_stage(&range).map_err(|e| l.model_error(e.0))?;
        // BitNet b1.58 has no biases; a file with them is another model, and
        // ignoring them would give wrong answers.
        if let Some(t) = file
            .header
            .tensors
            .iter()
            .find(|t| t.name.ends_with(".bias"))
        {
            return Err(l.model_error(format!(
                "tensor {} is a bias; BitNet b1.58 has none, so this is another architecture",
                t.name
            )));
        }
        let embedding = Arc::new(l.dense("token_embd.weight", config.hidden, config.vocab)?);
        let last = range.end == config.layers;
        // The lm_head is the embedding, as in bitnet.cpp and llama.cpp, which
        // both ignore an output.weight (the first 2B4T upload carried a copy).
        let lm_head = last.then(|| embedding.clone());
        let output_norm = if last {
            Some(l.vector("output_norm.weight", config.hidden)?)
        } else {
            None
        };
        let layers = range
            .clone()
            .map(|i| l.layer(i, &config))
            .collect::<Result<_, _>>()?;
        Ok(Model {
            embedding: (range.start == 0).then_some(embedding),
            lm_head,
            output_norm,
            layers,
            range,
            config,
            kernel: Kernel::best(),
            by_shape: Vec::new(),
        })
    }
}
