//! trine-engine: ternary (BitNet b1.58) models on CPU. Pure compute: no
//! tokio, no networking; the node drives it.
//!
//! - [`generate`]: the prefill + decode loop with timings.
//! - [`gguf`]: the GGUF container: bounds-checked parser, memory-mapped
//!   files, writer.
//! - [`eval`]: log-likelihood, top-k, perplexity (llama.cpp's method).
//! - [`formats`]: ternary encodings (I2_S, TQ2_0, TQ1_0, Hugging Face packed).
//! - [`inspect`]: what a model file holds and what is wrong with it.
//! - [`ternary`]: the one in-memory form of a ternary matrix.
//! - [`kernels`]: int8 activation quantization and ternary × int8 dot
//!   products (scalar reference, AVX2), chosen once at run time.
//! - [`model`]: hyper-parameters, weights and the forward pass of a stage.
//! - [`tokenizer`]: byte-level BPE (LLaMA-3) from GGUF or tokenizer.json.
//! - [`vocab`]: a byte-level vocabulary for synthetic models.
//! - [`sampler`]: greedy, temperature, top-k/p, min-p, repetition penalty; seeded.
//! - [`synth`]: random-weight models in the real formats.
//! - [`error`]: the crate's error type.

pub mod error;
pub mod eval;
pub mod formats;
pub mod generate;
pub mod gguf;
pub mod inspect;
pub mod kernels;
mod mmap;
pub mod model;
pub mod sampler;
pub mod synth;
pub mod ternary;
pub mod tokenizer;
pub mod vocab;

pub use error::Error;
