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
use crate::kernels::choose::{self, ShapeChoice};
use crate::mmap::Arena;
use crate::ternary::{Layout, Ternary};

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
    /// The ternary kernel for every shape [`Model::by_shape`] does not name.
    pub kernel: Kernel,
    /// Kernels chosen per weight shape by measurement
    /// ([`Model::choose`]); empty until then.
    pub by_shape: Vec<ShapeChoice>,
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
    /// Quantized at load to Q4_0 (4.5 bits a weight) and multiplied in int8
    /// against the same activations: about a quarter of the bytes of F16,
    /// at a larger logit error than Q8 (BENCHMARKS.md measures it).
    Q4,
}

impl QuantEmbd {
    pub fn name(self) -> &'static str {
        match self {
            QuantEmbd::File => "file",
            QuantEmbd::Q8 => "q8",
            QuantEmbd::Q4 => "q4",
        }
    }
}

impl std::str::FromStr for QuantEmbd {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "file" | "none" => Ok(QuantEmbd::File),
            "q8" | "q8_0" => Ok(QuantEmbd::Q8),
            "q4" | "q4_0" => Ok(QuantEmbd::Q4),
            _ => Err(format!(
                "unknown lm_head quantization {s:?}: give `file` (keep the file's precision), `q8` or `q4`"
            )),
        }
    }
}

impl std::fmt::Display for QuantEmbd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a stage packs its ternary matrices (`--weight-layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightLayout {
    /// I2_S, 2 bits a weight: official files' rows used in place.
    #[default]
    I2s,
    /// Repacked at load to five trits a byte (1.6 bits a weight): 20% fewer
    /// bytes per token, more work to unpack each.
    Base3,
    /// Per weight shape, whichever of the two multiplies faster here,
    /// measured at load (with the kernels) at the stage's thread count.
    Auto,
}

impl WeightLayout {
    pub fn name(self) -> &'static str {
        match self {
            WeightLayout::I2s => "i2s",
            WeightLayout::Base3 => "base3",
            WeightLayout::Auto => "auto",
        }
    }
}

impl std::str::FromStr for WeightLayout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "i2s" | "i2_s" | "2bit" => Ok(WeightLayout::I2s),
            "base3" | "1.6bit" | "tq1" => Ok(WeightLayout::Base3),
            "auto" => Ok(WeightLayout::Auto),
            _ => Err(format!(
                "unknown weight layout {s:?}: give `i2s` (2 bits a weight, as I2_S files store it), `base3` (1.6 bits, repacked at load) or `auto` (the faster per shape, measured at load)"
            )),
        }
    }
}

impl std::fmt::Display for WeightLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Model {
    /// Every ternary matrix of the stage, mutably.
    fn matrices_mut(&mut self) -> impl Iterator<Item = &mut Ternary> {
        self.layers.iter_mut().flat_map(|l| {
            [
                &mut l.q,
                &mut l.k,
                &mut l.v,
                &mut l.o,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ]
        })
    }

    /// Repacks the matrices of shape `rows`×`cols` (all of them with
    /// `None`) into `layout`, all into one [`Arena`] so that huge pages
    /// cover the small matrices too.
    pub fn set_layout(&mut self, layout: Layout, shape: Option<(usize, usize)>) {
        let mut todo: Vec<&mut Ternary> = self
            .matrices_mut()
            .filter(|m| m.layout() != layout && shape.is_none_or(|s| s == (m.rows(), m.cols())))
            .collect();
        if todo.is_empty() {
            return;
        }
        let lens: Vec<usize> = todo.iter().map(|m| m.packed_len(layout)).collect();
        let mut arena = Arena::new(&lens);
        for (m, dst) in todo.iter().zip(arena.pieces_mut()) {
            m.repack_into(layout, dst);
        }
        for (m, data) in todo.iter_mut().zip(arena.share()) {
            **m = m.repacked(layout, data);
        }
    }

    /// The layouts the stage's matrices are packed in, each named once.
    pub fn layouts(&self) -> Vec<Layout> {
        let mut v: Vec<Layout> = self
            .layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
            .map(Ternary::layout)
            .collect();
        v.sort_by_key(|l| l.name());
        v.dedup();
        v
    }

    /// Applies `--weight-layout` and `--kernel` (None: measured), in the
    /// current rayon pool: packs the matrices, then times every SIMD kernel
    /// this CPU runs on each weight shape, at the thread count the stage
    /// will run with, and keeps the fastest per shape (well under a second
    /// for the 2B4T shapes; the output does not depend on the choice). With
    /// [`WeightLayout::Auto`]
    /// each shape is timed in both layouts (the base-3 copies made from
    /// the matrices one measurement reads) and repacked into the faster.
    pub fn choose(&mut self, how: WeightLayout, kernel: Option<Kernel>) -> &[ShapeChoice] {
        match how {
            WeightLayout::I2s => self.set_layout(Layout::I2s, None),
            WeightLayout::Base3 => self.set_layout(Layout::Base3, None),
            WeightLayout::Auto => {}
        }
        if let Some(k) = kernel {
            self.kernel = k;
            self.by_shape.clear();
            if how != WeightLayout::Auto {
                return &self.by_shape;
            }
        }
        // With --kernel and `auto`, only the layouts are compared.
        let kernels = kernel.map_or_else(choose::candidates, |k| vec![k]);
        let mut chosen = Vec::new();
        for (_, group) in self.shape_groups() {
            let mut c = choose::measure(&group, &kernels, choose::ROUNDS);
            if how == WeightLayout::Auto {
                let other = match group[0].layout() {
                    Layout::I2s => Layout::Base3,
                    Layout::Base3 => Layout::I2s,
                };
                let copies: Vec<Ternary> = group[..choose::measured_count(&group)]
                    .iter()
                    .map(|m| m.to_layout(other))
                    .collect();
                let refs: Vec<&Ternary> = copies.iter().collect();
                c = c.merge(choose::measure(&refs, &kernels, choose::ROUNDS));
            }
            chosen.push(c);
        }
        for c in &chosen {
            self.set_layout(c.layout, Some((c.rows, c.cols)));
        }
        self.by_shape = chosen;
        &self.by_shape
    }

    /// Applies `--quant-embd` to the lm_head (a last stage only; the
    /// embedding lookup of a first stage keeps the file's rows). Q8 and Q4
    /// make an owned Q8_0 / Q4_0 copy, so the mapped F16 rows are no longer
    /// read per token.
    pub fn set_lm_head(&mut self, how: QuantEmbd) {
        let Some(head) = &self.lm_head else { return };
        match how {
            QuantEmbd::File => {}
            QuantEmbd::Q8 => self.lm_head = Some(Arc::new(head.to_q8_0())),
            QuantEmbd::Q4 => self.lm_head = Some(Arc::new(head.to_q4_0())),
        }
    }

    /// The kernel that multiplies `w`.
    #[inline]
    pub fn kernel_for(&self, w: &Ternary) -> Kernel {
        self.by_shape
            .iter()
            .find(|s| s.rows == w.rows() && s.cols == w.cols())
            .map_or(self.kernel, |s| s.kernel)
    }

    /// The kernel whose tiles multiply batches (prompts, batched decode
    /// steps): the one given with `--kernel`, else the most capable this
    /// CPU runs. The per-shape measurement times GEMVs, which memory
    /// bandwidth bounds, so two kernels can tie there (on Zen 4 AVX2 often
    /// wins by noise) while a batch, bound by multiply-adds, runs
    /// 1.6–1.8× faster in AVX512-VNNI tiles than in AVX2's (BENCHMARKS.md); the same bits
    /// either way.
    #[inline]
    pub fn batch_kernel(&self) -> Kernel {
        if self.by_shape.is_empty() {
            self.kernel
        } else {
            Kernel::best()
        }
    }

    /// One kernel for every shape (`--kernel`), replacing any measured
    /// choice.
    pub fn set_kernel(&mut self, kernel: Kernel) {
        self.kernel = kernel;
        self.by_shape.clear();
    }

    /// The layers' ternary matrices grouped by shape, each group named by
    /// its roles ("q/o": q and o share 2560×2560 in the 2B4T shape).
    pub fn shape_groups(&self) -> Vec<(String, Vec<&Ternary>)> {
        let mut groups: Vec<(Vec<&'static str>, Vec<&Ternary>)> = Vec::new();
        for l in &self.layers {
            for (role, m) in [
                ("q", &l.q),
                ("k", &l.k),
                ("v", &l.v),
                ("o", &l.o),
                ("gate", &l.gate),
                ("up", &l.up),
                ("down", &l.down),
            ] {
                match groups
                    .iter_mut()
                    .find(|(_, ms)| ms[0].rows() == m.rows() && ms[0].cols() == m.cols())
                {
                    Some((roles, ms)) => {
                        if !roles.contains(&role) {
                            roles.push(role);
                        }
                        ms.push(m);
                    }
                    None => groups.push((vec![role], vec![m])),
                }
            }
        }
        groups
            .into_iter()
            .map(|(roles, ms)| (roles.join("/"), ms))
            .collect()
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
