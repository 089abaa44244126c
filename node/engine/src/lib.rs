//! trine-engine: ternary (BitNet b1.58) models on CPU. Pure compute: no
//! tokio, no networking; the node drives it.
//!
//! - [`generate`]: the prefill + decode loop with timings.
//! - [`gguf`]: the GGUF container: bounds-checked parser, memory-mapped
//!   files, writer.
//! - [`eval`]: log-likelihood, top-k, perplexity (llama.cpp's method).
//! - [`formats`]: ternary encodings (I2_S, TQ2_0, TQ1_0, Hugging Face packed).
//! - [`hf`]: Hugging Face model directories (packed and bf16 layouts).
//! - [`inspect`]: what a model file holds and what is wrong with it.
//! - [`ternary`]: the one in-memory form of a ternary matrix.
//! - [`kernels`]: int8 activation quantization and ternary × int8 dot
//!   products (scalar reference, AVX2), chosen once at run time.
//! - [`model`]: hyper-parameters, weights and the forward pass of a stage.
//! - [`tokenizer`]: byte-level BPE (LLaMA-3) from GGUF or tokenizer.json.
//! - [`vocab`]: a byte-level vocabulary for synthetic models.
//! - [`sampler`]: greedy, temperature, top-k/p, min-p, repetition penalty; seeded.
//! - [`synth`]: random-weight models in the real formats.
//! - [`mmap`]: memory-mapped files and bytes that stay in them.
//! - [`error`]: the crate's error type.

pub mod error;
pub mod eval;
pub mod formats;
pub mod fuzz;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod inspect;
pub mod kernels;
pub mod mmap;
pub mod model;
pub mod sampler;
pub mod synth;
pub mod ternary;
pub mod tokenizer;
pub mod vocab;

pub use error::Error;

use std::ops::Range;
use std::path::Path;

/// Opens layers `range` (all for `None`) of the model at `path` — a GGUF
/// file or a Hugging Face directory — with its tokenizer.
pub fn open(
    path: &Path,
    range: Option<Range<usize>>,
) -> Result<(model::Model, tokenizer::Tokenizer), Error> {
    if path.is_dir() {
        return hf::open(path, range);
    }
    let file = gguf::GgufFile::open(path)?;
    let model = model::Model::from_gguf(&file, path, range)?;
    let tokenizer = tokenizer::Tokenizer::from_gguf(&file.header).map_err(|e| Error::Model {
        path: path.to_owned(),
        problem: e.to_string(),
    })?;
    Ok((model, tokenizer))
}
