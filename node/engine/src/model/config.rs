//! Hyper-parameters of a BitNet b1.58 model, read from the file: nothing is
//! assumed about the 2B4T sizes.

use crate::gguf::{Header, Value};

/// The gate activation of the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// relu(x)², BitNet b1.58's (`hidden_act: relu2`).
    Relu2,
    /// x·sigmoid(x), upstream llama.cpp's default for its `bitnet` arch.
    Silu,
}

impl Activation {
    /// From a config string (HF `hidden_act`, GGUF `<arch>.hidden_activation`).
    pub fn parse(name: &str) -> Result<Self, ConfigError> {
        match name {
            "relu2" | "relu_sqr" | "relu_squared" | "relu-squared" => Ok(Self::Relu2),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(ConfigError(format!(
                "activation {other:?} is not one Trine runs (relu2, silu)"
            ))),
        }
    }

    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Self::Relu2 => {
                let r = x.max(0.0);
                r * r
            }
            Self::Silu => x / (1.0 + (-x).exp()),
        }
    }
}

/// The shape and constants of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// GGUF architecture name ("bitnet-b1.58", "bitnet-25", "bitnet") or
    /// "bitnet" for Hugging Face directories.
    pub arch: String,
    pub vocab: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Rotated dimensions per head (the rest pass through).
    pub rope_dim: usize,
    pub rope_theta: f32,
    pub eps: f32,
    /// Longest sequence the model was trained for.
    pub context: usize,
    pub activation: Activation,
}

/// A missing or inconsistent hyper-parameter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Upper bounds that keep a lying file from sizing huge allocations.
const MAX_DIM: usize = 1 << 20;
const MAX_LAYERS: usize = 4096;

impl Config {
    /// From GGUF metadata under `<arch>.`.
    pub fn from_gguf(h: &Header) -> Result<Self, ConfigError> {
        let arch = h
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| ConfigError("general.architecture is missing".into()))?
            .to_owned();
        let int = |key: &str| -> Result<usize, ConfigError> {
            let full = format!("{arch}.{key}");
            h.get(&full)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| ConfigError(format!("metadata {full} is missing or not an integer")))
        };
        let float = |key: &str, default: f32| -> Result<f32, ConfigError> {
            let full = format!("{arch}.{key}");
            match h.get(&full) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| ConfigError(format!("metadata {full} is not a number"))),
            }
        };
        let hidden = int("embedding_length")?;
        let heads = int("attention.head_count")?;
        let kv_heads = match int("attention.head_count_kv") {
            Ok(v) => v,
            Err(_) => heads,
        };
        let head_dim = hidden.checked_div(heads).unwrap_or(0);
        let vocab = match int("vocab_size") {
            Ok(v) => v,
            Err(e) => h
                .tensor("token_embd.weight")
                .and_then(|t| t.dims.get(1))
                .map(|&v| v as usize)
                .ok_or(e)?,
        };
        // RoPE scaling would change every angle; only "none" or a linear
        // factor of 1 (what upstream's converter writes) are the identity.
        let scaling = h
            .get(&format!("{arch}.rope.scaling.type"))
            .and_then(Value::as_str);
        let factor = h
            .get(&format!("{arch}.rope.scaling.factor"))
            .and_then(Value::as_f64)
            .unwrap_or(1.0);
        match scaling {
            None | Some("none") => {}
            Some("linear") if factor == 1.0 => {}
            Some(other) => {
                return Err(ConfigError(format!(
                    "RoPE scaling {other:?} (factor {factor}) is not supported; Trine runs unscaled RoPE as BitNet b1.58 uses"
                )));
            }
        }
        // bitnet.cpp's archs are BitNet b1.58 (relu²); upstream's `bitnet`
        // defaults to SiLU unless the file says otherwise, as llama.cpp does.
        let activation = match h.get(&format!("{arch}.hidden_activation")) {
            Some(v) => Activation::parse(v.as_str().unwrap_or_default())?,
            None if arch == "bitnet" => Activation::Silu,
            None => Activation::Relu2,
        };
        let config = Config {
            activation,
            vocab,
            hidden,
            ffn: int("feed_forward_length")?,
            layers: int("block_count")?,
            heads,
            kv_heads,
            head_dim,
            rope_dim: int("rope.dimension_count").unwrap_or(head_dim),
            rope_theta: float("rope.freq_base", 10_000.0)?,
            eps: float("attention.layer_norm_rms_epsilon", 1e-5)?,
            context: int("context_length")?,
            arch,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the shapes fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError(m));
        for (name, v, max) in [
            ("vocabulary size", self.vocab, 1 << 24),
            ("hidden size", self.hidden, MAX_DIM),
            ("feed-forward size", self.ffn, MAX_DIM),
            ("layer count", self.layers, MAX_LAYERS),
            ("head count", self.heads, MAX_DIM),
            ("KV head count", self.kv_heads, MAX_DIM),
            ("context length", self.context, 1 << 24),
        ] {
            if v == 0 || v > max {
                return fail(format!("{name} is {v} (must be 1 to {max})"));
            }
        }
        if !self.hidden.is_multiple_of(self.heads) {
            return fail(format!(
                "hidden size {} is not a multiple of the head count {}",
                self.hidden, self.heads
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return fail(format!(
                "head count {} is not a multiple of the KV head count {}",
                self.heads, self.kv_heads
            ));
        }
        if !self.rope_dim.is_multiple_of(2) || self.rope_dim > self.head_dim {
            return fail(format!(
                "rope dimension {} must be even and at most the head size {}",
                self.rope_dim, self.head_dim
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return fail(format!(
                "rope frequency base {} is not positive",
                self.rope_theta
            ));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return fail(format!("RMS norm epsilon {} is not positive", self.eps));
        }
        Ok(())
    }

    /// Whether `range` is a non-empty run of this model's layers.
    pub fn check_stage(&self, range: &std::ops::Range<usize>) -> Result<(), ConfigError> {
        if range.start < range.end && range.end <= self.layers {
            Ok(())
        } else {
            Err(ConfigError(format!(
                "layers {}..{} are not a stage of a {}-layer model",
                range.start, range.end, self.layers
            )))
        }
    }

    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}
