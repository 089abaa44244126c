//! The BitNet b1.58 model (BITNET.md §1): hyper-parameters, weights in
//! Trine's one in-memory form whatever the file, and the forward pass of a
//! stage — a contiguous range of layers, the first stage owning the
//! embedding, the last the final norm and the tied lm_head.
//!
//! - [`config`]: hyper-parameters read from the file.
//! - [`dense`]: the embedding / lm_head in the file's precision.
//! - [`load`]: building a stage from a GGUF file.
//! - [`forward`]: the forward pass, KV cache, batched prefill.

pub mod config;
pub mod dense;
pub mod forward;
pub mod load;

use std::ops::Range;
use std::sync::Arc;

pub use config::{Activation, Config, ConfigError};
pub use dense::Dense;
pub use forward::{Input, KvCache, Logits, Output, Step};

use crate::kernels::Kernel;
use crate::ternary::Ternary;

/// One decoder layer's weights.
#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub q: Ternary,
    pub k: Ternary,
    pub v: Ternary,
    pub attn_sub_norm: Vec<f32>,
    pub o: Ternary,
    pub ffn_norm: Vec<f32>,
    pub gate: Ternary,
    pub up: Ternary,
    pub ffn_sub_norm: Vec<f32>,
    pub down: Ternary,
}

/// A stage of a model: layers `range` of `config.layers`, with the
/// embedding if it is the first stage and the output norm + lm_head if it
/// is the last (a whole model is the stage 0..layers).
#[derive(Debug, Clone)]
pub struct Model {
    pub config: Config,
    pub range: Range<usize>,
    /// The token embedding; first stage only.
    pub embedding: Option<Arc<Dense>>,
    /// The output projection; last stage only. The embedding itself when
    /// the model ties them (BitNet b1.58 does; always for GGUF files), or a
    /// Hugging Face checkpoint's untied lm_head.weight.
    pub lm_head: Option<Arc<Dense>>,
    pub layers: Vec<Layer>,
    pub output_norm: Option<Vec<f32>>,
    pub kernel: Kernel,
}

/// How the last stage holds its lm_head (`--quant-embd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantEmbd {
    /// As the file stores it (F16 in official files), used in place.
    #[default]
    File,
    /// Quantized at load to Q8_0 (8.5 bits a weight) and multiplied in int8
    /// against Q8_0-quantized activations: about half the bytes per token
    /// of an F16 lm_head, at a small logit error (BENCHMARKS.md).
    Q8,
}

impl QuantEmbd {
    pub fn name(self) -> &'static str {
        match self {
            QuantEmbd::File => "file",
            QuantEmbd::Q8 => "q8",
        }
    }
}

impl std::str::FromStr for QuantEmbd {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "file" | "none" => Ok(QuantEmbd::File),
            "q8" | "q8_0" => Ok(QuantEmbd::Q8),
            _ => Err(format!(
                "unknown lm_head quantization {s:?}: give `file` (keep the file's precision) or `q8`"
            )),
        }
    }
}

impl std::fmt::Display for QuantEmbd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Model {
    /// Applies `--quant-embd` to the lm_head (a last stage only; the
    /// embedding lookup of a first stage keeps the file's rows). Q8 makes
    /// an owned Q8_0 copy, so the mapped F16 rows are no longer read per
    /// token.
    pub fn set_lm_head(&mut self, how: QuantEmbd) {
        if let (QuantEmbd::Q8, Some(head)) = (how, &self.lm_head) {
            self.lm_head = Some(Arc::new(head.to_q8_0()));
        }
    }

    /// Bytes one decode step reads from the weights: every ternary matrix
    /// of the stage, plus the lm_head on a last stage (the embedding lookup
    /// reads one row, which is ignored).
    pub fn bytes_per_token(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                    .iter()
                    .map(|t| t.data().len())
                    .sum::<usize>()
            })
            .sum();
        layers + self.lm_head.as_ref().map_or(0, |h| h.byte_len())
    }

    pub fn is_first(&self) -> bool {
        self.range.start == 0
    }

    pub fn is_last(&self) -> bool {
        self.range.end == self.config.layers
    }
}

/// Why a forward pass was refused (nothing is changed when it is).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ForwardError {
    #[error(
        "token id {id} is outside the vocabulary of {vocab}; the prompt was tokenized for another model"
    )]
    BadToken { id: u32, vocab: usize },
    #[error(
        "the KV cache holds {capacity} positions and {used} are used; {wanted} more do not fit: shorten the prompt or max_tokens"
    )]
    CacheFull {
        capacity: usize,
        used: usize,
        wanted: usize,
    },
    #[error("this stage (layers {start}..{end}) takes {expected}, not {given}")]
    WrongInput {
        start: usize,
        end: usize,
        expected: &'static str,
        given: &'static str,
    },
    #[error("hidden states of {len} values are not a whole number of tokens of width {hidden}")]
    BadHidden { len: usize, hidden: usize },
    #[error("the KV cache was made for another stage or model")]
    WrongCache,
    #[error("an empty input has nothing to compute")]
    Empty,
}
