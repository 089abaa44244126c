//! Hugging Face model directories (BITNET.md §2a): `config.json`,
//! `model.safetensors` or a sharded `model.safetensors.index.json`, and
//! `tokenizer.json`. Two weight layouts:
//!
//! - packed (`microsoft/bitnet-b1.58-2B-4T`): u8 [out/4, in] plus a
//!   `weight_scale` per projection, multiplied for `linear_class =
//!   autobitlinear` and divided for `bitlinear` (the default when absent);
//! - `-bf16`: real-valued weights, ternarized per tensor at load.
//!
//! The safetensors headers are parsed by the `safetensors` crate, which
//! refuses headers that lie about sizes or offsets.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};

/// Why a safetensors file's header was refused, with the length its first
/// eight bytes claim (the usual lie of a corrupt file) and the fix.
pub(crate) fn header_error(bytes: &[u8], e: &safetensors::SafeTensorError) -> String {
    let claimed = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes);
    let claim = claimed.map_or_else(
        || {
            format!(
                " (the file is {} bytes, shorter than a header)",
                bytes.len()
            )
        },
        |n| {
            format!(
                " (its header claims {n} bytes in a {}-byte file)",
                bytes.len()
            )
        },
    );
    format!(
        "{e}{claim}; the safetensors header is corrupt or lies about its data: fetch the file again"
    )
}
use serde::Deserialize;

use crate::Error;
use crate::formats::hf as packed;
use crate::gguf::GgmlType;
use crate::kernels::Kernel;
use crate::mmap::{Bytes, Mapped};
use crate::model::load::ternarize;
use crate::model::{Activation, Config, Dense, Layer, Model};
use crate::ternary::Ternary;
use crate::tokenizer::Tokenizer;

/// The keys of config.json Trine reads.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub max_position_embeddings: usize,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: Option<f32>,
    pub rope_theta: Option<f32>,
    pub hidden_act: Option<String>,
    pub tie_word_embeddings: Option<bool>,
    pub rope_scaling: Option<serde_json::Value>,
    pub quantization_config: Option<QuantizationConfig>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct QuantizationConfig {
    pub linear_class: Option<String>,
}

fn model_error(path: &Path, problem: String) -> Error {
    Error::Model {
        path: path.to_owned(),
        problem,
    }
}

impl HfConfig {
    pub fn read(dir: &Path) -> Result<Self, Error> {
        let path = dir.join("config.json");
        let text = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|e| {
            model_error(
                &path,
                format!(
                    "{e}; config.json must be a Hugging Face BitNet config (BitNetForCausalLM)"
                ),
            )
        })
    }

    fn to_config(&self, activation: Activation) -> Config {
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        Config {
            activation,
            arch: "bitnet".into(),
            vocab: self.vocab_size,
            hidden: self.hidden_size,
            ffn: self.intermediate_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            rope_dim: head_dim,
            rope_theta: self.rope_theta.unwrap_or(10_000.0),
            eps: self.rms_norm_eps.unwrap_or(1e-5),
            context: self.max_position_embeddings,
        }
    }

    /// True when weight_scale multiplies (autobitlinear), false when it divides.
    fn scale_multiplies(&self) -> bool {
        self.quantization_config
            .as_ref()
            .and_then(|q| q.linear_class.as_deref())
            .is_some_and(|c| c == "autobitlinear")
    }
}

/// The GGUF type of a float safetensors dtype.
fn float_type(path: &Path, name: &str, dtype: Dtype) -> Result<GgmlType, Error> {
    match dtype {
        Dtype::F32 => Ok(GgmlType::F32),
        Dtype::F16 => Ok(GgmlType::F16),
        Dtype::BF16 => Ok(GgmlType::BF16),
        other => Err(model_error(
            path,
            format!("tensor {name} has dtype {other:?}; expected BF16, F16 or F32"),
        )),
    }
}

/// Token ids in config.json: a number or a list of numbers.
fn ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| v as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// The safetensors files of a directory, mapped.
fn shards(dir: &Path) -> Result<Vec<(PathBuf, Arc<Mapped>)>, Error> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![(single.clone(), Arc::new(Mapped::open(&single)?))]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read(&index).map_err(|_| {
        model_error(dir, "holds neither model.safetensors nor model.safetensors.index.json; point at a Hugging Face model directory or a .gguf file".into())
    })?;
    #[derive(Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let idx: Index = serde_json::from_slice(&text)
        .map_err(|e| model_error(&index, format!("{e}; the index is corrupt")))?;
    let mut files: Vec<&String> = idx.weight_map.values().collect();
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|f| {
            if f.contains('/') || f.contains("..") {
                return Err(model_error(
                    &index,
                    format!("shard name {f:?} leaves the model directory"),
                ));
            }
            let p = dir.join(f);
            Ok((p.clone(), Arc::new(Mapped::open(&p)?)))
        })
        .collect()
}

struct Tensors<'a> {
    dir: &'a Path,
    files: Vec<(&'a Path, &'a Arc<Mapped>, SafeTensors<'a>)>,
}

impl<'a> Tensors<'a> {
    fn get(&self, name: &str) -> Option<(&'a Path, safetensors::tensor::TensorView<'a>)> {
        self.files
            .iter()
            .find_map(|(p, _, st)| st.tensor(name).ok().map(|t| (*p, t)))
    }

    /// A tensor's data, shared with the mapping it lies in (no copy).
    fn shared(&self, name: &str, data: &[u8]) -> Bytes {
        match self.files.iter().find(|(_, _, st)| st.tensor(name).is_ok()) {
            Some((_, map, _)) => map.share(data),
            None => Bytes::from(data),
        }
    }

    fn require(
        &self,
        name: &str,
    ) -> Result<(&'a Path, safetensors::tensor::TensorView<'a>), Error> {
        self.get(name).ok_or_else(|| {
            model_error(self.dir, format!("tensor {name} is missing; the directory is incomplete or not a BitNet b1.58 model"))
        })
    }

    fn dense(&self, name: &str, rows: usize, cols: usize) -> Result<Dense, Error> {
        let (path, t) = self.require(name)?;
        let want: &[usize] = if rows == 1 { &[cols] } else { &[rows, cols] };
        if t.shape() != want && !(rows == 1 && t.shape() == [1, cols]) {
            return Err(model_error(
                path,
                format!(
                    "tensor {name} has shape {:?}, but config.json says {want:?}",
                    t.shape()
                ),
            ));
        }
        let ty = float_type(path, name, t.dtype())?;
        Dense::from_bytes(ty, self.shared(name, t.data()), rows, cols).map_err(|source| {
            Error::Tensor {
                path: path.to_owned(),
                tensor: name.to_owned(),
                source,
            }
        })
    }

    /// A one-element tensor of any shape ([], [1], [1, 1]).
    fn scalar(&self, name: &str) -> Result<f32, Error> {
        let (path, t) = self.require(name)?;
        if t.shape().iter().product::<usize>() != 1 {
            return Err(model_error(
                path,
                format!(
                    "tensor {name} has shape {:?}; a scale is one number",
                    t.shape()
                ),
            ));
        }
        let ty = float_type(path, name, t.dtype())?;
        let d = Dense::from_bytes(ty, t.data(), 1, 1).map_err(|source| Error::Tensor {
            path: path.to_owned(),
            tensor: name.to_owned(),
            source,
        })?;
        let mut v = [0f32];
        d.row_into(0, &mut v);
        Ok(v[0])
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, Error> {
        let mut v = vec![0f32; len];
        self.dense(name, 1, len)?.row_into(0, &mut v);
        if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
            return Err(model_error(
                self.dir,
                format!("tensor {name} holds {bad}; the file is corrupt"),
            ));
        }
        Ok(v)
    }

    fn linear(&self, name: &str, out: usize, inp: usize, multiply: bool) -> Result<Ternary, Error> {
        let (path, t) = self.require(name)?;
        let tensor_error = |source| Error::Tensor {
            path: path.to_owned(),
            tensor: name.to_owned(),
            source,
        };
        if t.dtype() == Dtype::U8 {
            if t.shape() != [out / 4, inp] || !out.is_multiple_of(4) {
                return Err(model_error(
                    path,
                    format!(
                        "packed tensor {name} has shape {:?}, but config.json implies [{}, {inp}]",
                        t.shape(),
                        out / 4
                    ),
                ));
            }
            let scale_name = name.replace(".weight", ".weight_scale");
            let scale = self.scalar(&scale_name)?;
            if !(scale.is_finite() && scale > 0.0) {
                return Err(model_error(
                    path,
                    format!("{scale_name} is {scale}, not a positive number; the file is corrupt"),
                ));
            }
            let beta = if multiply { scale } else { 1.0 / scale };
            return packed::decode(t.data(), out, inp, beta).map_err(tensor_error);
        }
        let d = self.dense(name, out, inp)?;
        let mut values = vec![0f32; out * inp];
        for r in 0..out {
            d.row_into(r, &mut values[r * inp..(r + 1) * inp]);
        }
        if let Some(bad) = values.iter().find(|x| !x.is_finite()) {
            return Err(model_error(
                path,
                format!("tensor {name} holds {bad}; the file is corrupt"),
            ));
        }
        Ok(ternarize(out, inp, &values))
    }
}

/// Loads layers `range` (all for `None`) and the tokenizer from a Hugging
/// Face directory.
pub fn open(dir: &Path, range: Option<Range<usize>>) -> Result<(Model, Tokenizer), Error> {
    let hf = HfConfig::read(dir)?;
    let activation = Activation::parse(hf.hidden_act.as_deref().unwrap_or("relu2"))
        .map_err(|e| model_error(&dir.join("config.json"), format!("hidden_act: {e}")))?;
    if let Some(scaling) = hf.rope_scaling.as_ref().filter(|v| !v.is_null()) {
        return Err(model_error(
            &dir.join("config.json"),
            format!(
                "rope_scaling {scaling} is not supported; Trine runs unscaled RoPE as BitNet b1.58 uses"
            ),
        ));
    }
    let config = hf.to_config(activation);
    config
        .validate()
        .map_err(|e| model_error(&dir.join("config.json"), format!("{e}; fix config.json")))?;
    let range = range.unwrap_or(0..config.layers);
    config
        .check_stage(&range)
        .map_err(|e| model_error(dir, e.0))?;
    let maps = shards(dir)?;
    let mut files = Vec::with_capacity(maps.len());
    for (p, m) in &maps {
        let st = SafeTensors::deserialize(m.bytes())
            .map_err(|e| model_error(p, header_error(m.bytes(), &e)))?;
        files.push((p.as_path(), m, st));
    }
    let t = Tensors { dir, files };
    // BitNet b1.58 has no biases; a checkpoint with them is another model,
    // and ignoring them would give wrong answers.
    if let Some((p, name)) = t
        .files
        .iter()
        .flat_map(|(p, _, st)| st.names().into_iter().map(move |n| (*p, n.to_owned())))
        .find(|(_, n)| n.ends_with(".bias"))
    {
        return Err(model_error(
            p,
            format!(
                "tensor {name} is a bias; BitNet b1.58 has none, so this is another architecture"
            ),
        ));
    }
    let (h, qw, kvw, f) = (
        config.hidden,
        config.heads * config.head_dim,
        config.kv_width(),
        config.ffn,
    );
    let multiply = hf.scale_multiplies();
    let embedding = Arc::new(t.dense("model.embed_tokens.weight", config.vocab, h)?);
    let last = range.end == config.layers;
    let lm_head = match (last, t.get("lm_head.weight")) {
        (false, _) => None,
        (true, Some(_)) if hf.tie_word_embeddings == Some(false) => {
            Some(Arc::new(t.dense("lm_head.weight", config.vocab, h)?))
        }
        (true, _) => Some(embedding.clone()),
    };
    let mut layers = Vec::with_capacity(range.len());
    for i in range.clone() {
        let n = |s: &str| format!("model.layers.{i}.{s}.weight");
        layers.push(Layer {
            attn_norm: t.vector(&n("input_layernorm"), h)?,
            q: t.linear(&n("self_attn.q_proj"), qw, h, multiply)?,
            k: t.linear(&n("self_attn.k_proj"), kvw, h, multiply)?,
            v: t.linear(&n("self_attn.v_proj"), kvw, h, multiply)?,
            attn_sub_norm: t.vector(&n("self_attn.attn_sub_norm"), qw)?,
            o: t.linear(&n("self_attn.o_proj"), h, qw, multiply)?,
            ffn_norm: t.vector(&n("post_attention_layernorm"), h)?,
            gate: t.linear(&n("mlp.gate_proj"), f, h, multiply)?,
            up: t.linear(&n("mlp.up_proj"), f, h, multiply)?,
            ffn_sub_norm: t.vector(&n("mlp.ffn_sub_norm"), f)?,
            down: t.linear(&n("mlp.down_proj"), h, f, multiply)?,
        });
    }
    let output_norm = if last {
        Some(t.vector("model.norm.weight", h)?)
    } else {
        None
    };
    let tok_path = dir.join("tokenizer.json");
    let tok_bytes = std::fs::read(&tok_path).map_err(|source| Error::Io {
        path: tok_path.clone(),
        source,
    })?;
    let eos = ids(&hf.eos_token_id);
    let tokenizer =
        Tokenizer::from_hf_json(&tok_bytes, ids(&hf.bos_token_id).first().copied(), &eos)
            .map_err(|e| model_error(&tok_path, e.to_string()))?;
    let model = Model {
        embedding: (range.start == 0).then_some(embedding),
        lm_head,
        output_norm,
        layers,
        range,
        config,
        kernel: Kernel::best(),
        by_shape: Vec::new(),
    };
    Ok((model, tokenizer))
}
