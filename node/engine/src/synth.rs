//! Random-weight models in the real formats, so everything runs with no
//! download (`trine model synth`). Weights come from a seeded ChaCha8
//! generator: the same preset and seed give the same bytes on any machine.
//!
//! - `tiny` is BITNET.md §6's model (hidden 256, 2 heads of 128, 1 KV head,
//!   ffn 512, 2 layers, vocab 512, context 128), with norms 1 + 0.1·noise
//!   and q, k, v at clearly different scales, so that misplaced sub-norms
//!   or mixed-up scales change the logits.
//! - `2b4t` has the real shapes of BitNet b1.58 2B4T (§1.1).

use half::{bf16, f16};
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use crate::formats::{i2s, tq};
use crate::gguf::{GgmlType, Value, Writer};
use crate::model::{Config, Layer};
use crate::ternary::Ternary;
use crate::vocab::Vocab;

/// A model shape to synthesize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Tiny,
    B2b4t,
}

impl Preset {
    pub fn config(self) -> Config {
        let (vocab, hidden, ffn, layers, heads, kv_heads, context) = match self {
            Preset::Tiny => (512, 256, 512, 2, 2, 1, 128),
            Preset::B2b4t => (128_256, 2560, 6912, 30, 20, 5, 4096),
        };
        Config {
            activation: crate::model::Activation::Relu2,
            arch: "bitnet-b1.58".into(),
            vocab,
            hidden,
            ffn,
            layers,
            heads,
            kv_heads,
            head_dim: hidden / heads,
            rope_dim: hidden / heads,
            rope_theta: 500_000.0,
            eps: 1e-5,
            context,
        }
    }
}

/// How the ternary weights are stored in the GGUF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TernaryType {
    I2S,
    TQ2_0,
    TQ1_0,
}

/// A whole synthetic model: ternary weights, norms and embedding, every
/// value exactly representable in F32, F16 and BF16 (see [`exact`]).
#[derive(Debug, Clone)]
pub struct Weights {
    pub config: Config,
    /// vocab × hidden, row-major.
    pub embedding: Vec<f32>,
    pub output_norm: Vec<f32>,
    pub layers: Vec<Layer>,
    /// Byte-level BPE vocabulary with LLaMA-3's special tokens.
    pub vocab: Vocab,
}

struct Gen(ChaCha8Rng);

impl Gen {
    fn uniform(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.0.random_range(-scale..scale)).collect()
    }

    fn norm(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| exact(1.0 + 0.1 * self.0.random_range(-1.0f32..1.0)))
            .collect()
    }

    /// A ternarized rows × cols linear from master weights of magnitude
    /// `scale`, its β rounded to a value every format stores exactly.
    fn linear(&mut self, rows: usize, cols: usize, scale: f32) -> Ternary {
        let t = Ternary::quantize(rows, cols, &self.uniform(rows * cols, scale));
        let beta = exact(t.beta());
        t.with_beta(beta)
    }
}

/// `v` rounded to bf16, with magnitudes below f16's normal range flushed to
/// zero: then F32, F16 and BF16 all hold it exactly, so every file format of
/// one synthetic model decodes to bit-identical weights, scales and norms.
pub fn exact(v: f32) -> f32 {
    let b = bf16::from_f32(v).to_f32();
    if b.abs() < 6.2e-5 { 0.0 } else { b }
}

impl Weights {
    pub fn generate(preset: Preset, seed: u64) -> Self {
        Self::generate_with_progress(preset, seed, &mut |_, _| {})
    }

    /// As [`Weights::generate`], calling `progress(layers done, layers)`.
    pub fn generate_with_progress(
        preset: Preset,
        seed: u64,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Self {
        Self::generate_config(preset.config(), seed, progress)
    }

    /// Random weights of any shape `c` describes (the vocabulary needs at
    /// least 272 tokens).
    pub fn generate_config(c: Config, seed: u64, progress: &mut dyn FnMut(usize, usize)) -> Self {
        let mut g = Gen(ChaCha8Rng::seed_from_u64(seed));
        let embedding = g
            .uniform(c.vocab * c.hidden, 1.0)
            .into_iter()
            .map(exact)
            .collect();
        let (h, qw, kvw, f) = (c.hidden, c.heads * c.head_dim, c.kv_width(), c.ffn);
        let layers = (0..c.layers)
            .map(|i| {
                progress(i, c.layers);
                Layer {
                    attn_norm: g.norm(h),
                    // Master scales 0.02 / 0.05 / 0.11 give q, k, v betas about
                    // 0.01 / 0.025 / 0.055: a swap shows.
                    q: g.linear(qw, h, 0.02),
                    k: g.linear(kvw, h, 0.05),
                    v: g.linear(kvw, h, 0.11),
                    attn_sub_norm: g.norm(qw),
                    o: g.linear(h, qw, 0.03),
                    ffn_norm: g.norm(h),
                    gate: g.linear(f, h, 0.04),
                    up: g.linear(f, h, 0.06),
                    ffn_sub_norm: g.norm(f),
                    down: g.linear(h, f, 0.03),
                }
            })
            .collect();
        progress(c.layers, c.layers);
        Weights {
            vocab: crate::vocab::synthetic(c.vocab),
            output_norm: g.norm(h),
            embedding,
            layers,
            config: c,
        }
    }

    /// The model as a GGUF file with the official file's metadata keys
    /// (BITNET.md §2b).
    pub fn to_gguf(&self, ty: TernaryType) -> Result<Writer, crate::formats::Error> {
        let c = &self.config;
        let a = &c.arch;
        let u32v = |v: usize| Value::U32(v as u32);
        let mut w = Writer::new();
        w.kv("general.architecture", Value::String(a.clone()))
            .kv("general.name", Value::String("trine-synthetic".into()))
            .kv(&format!("{a}.vocab_size"), u32v(c.vocab))
            .kv(&format!("{a}.context_length"), u32v(c.context))
            .kv(&format!("{a}.embedding_length"), u32v(c.hidden))
            .kv(&format!("{a}.block_count"), u32v(c.layers))
            .kv(&format!("{a}.feed_forward_length"), u32v(c.ffn))
            .kv(&format!("{a}.rope.dimension_count"), u32v(c.rope_dim))
            .kv(&format!("{a}.attention.head_count"), u32v(c.heads))
            .kv(&format!("{a}.attention.head_count_kv"), u32v(c.kv_heads))
            .kv(
                &format!("{a}.attention.layer_norm_rms_epsilon"),
                Value::F32(c.eps),
            )
            .kv(&format!("{a}.rope.freq_base"), Value::F32(c.rope_theta))
            .kv(
                "general.file_type",
                Value::U32(match ty {
                    TernaryType::I2S => 40,
                    TernaryType::TQ1_0 => 36,
                    TernaryType::TQ2_0 => 37,
                }),
            )
            .kv("general.quantization_version", Value::U32(2))
            .kv("tokenizer.ggml.model", Value::String("gpt2".into()))
            .kv("tokenizer.ggml.pre", Value::String("llama-bpe".into()))
            .kv("tokenizer.ggml.tokens", strings(&self.vocab.tokens))
            .kv(
                "tokenizer.ggml.token_type",
                Value::Array(self.vocab.types.iter().map(|&t| Value::I32(t)).collect()),
            )
            .kv("tokenizer.ggml.merges", strings(&self.vocab.merges))
            .kv("tokenizer.ggml.bos_token_id", Value::U32(self.vocab.bos))
            .kv("tokenizer.ggml.eos_token_id", Value::U32(self.vocab.eos))
            .kv("tokenizer.ggml.add_bos_token", Value::Bool(true));
        let embd: Vec<u8> = self
            .embedding
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        w.tensor(
            "token_embd.weight",
            &[c.hidden as u64, c.vocab as u64],
            GgmlType::F16,
            embd,
        );
        w.tensor(
            "output_norm.weight",
            &[c.hidden as u64],
            GgmlType::F32,
            f32_bytes(&self.output_norm),
        );
        for (i, l) in self.layers.iter().enumerate() {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            for (name, v) in [
                ("attn_norm", &l.attn_norm),
                ("attn_sub_norm", &l.attn_sub_norm),
                ("ffn_norm", &l.ffn_norm),
                ("ffn_sub_norm", &l.ffn_sub_norm),
            ] {
                w.tensor(&n(name), &[v.len() as u64], GgmlType::F32, f32_bytes(v));
            }
            for (name, t) in [
                ("attn_q", &l.q),
                ("attn_k", &l.k),
                ("attn_v", &l.v),
                ("attn_output", &l.o),
                ("ffn_gate", &l.gate),
                ("ffn_up", &l.up),
                ("ffn_down", &l.down),
            ] {
                let (gty, bytes) = match ty {
                    TernaryType::I2S => (GgmlType::I2S, i2s::encode(t)?),
                    TernaryType::TQ2_0 => (GgmlType::TQ2_0, tq::encode_tq2(t)?),
                    TernaryType::TQ1_0 => (GgmlType::TQ1_0, tq::encode_tq1(t)?),
                };
                w.tensor(&n(name), &[t.cols() as u64, t.rows() as u64], gty, bytes);
            }
        }
        Ok(w)
    }
}

fn strings(v: &[String]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.clone())).collect())
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Weights {
    /// The model as a Hugging Face directory in the packed layout of
    /// `microsoft/bitnet-b1.58-2B-4T`: config.json (autobitlinear, offline,
    /// tied), model.safetensors (u8 weights + BF16 `weight_scale`, BF16 for
    /// the rest) and tokenizer.json.
    pub fn write_hf(&self, dir: &std::path::Path) -> std::io::Result<()> {
        use safetensors::Dtype;
        let c = &self.config;
        std::fs::create_dir_all(dir)?;
        let config = serde_json::json!({
            "architectures": ["BitNetForCausalLM"],
            "model_type": "bitnet",
            "vocab_size": c.vocab,
            "hidden_size": c.hidden,
            "intermediate_size": c.ffn,
            "num_hidden_layers": c.layers,
            "num_attention_heads": c.heads,
            "num_key_value_heads": c.kv_heads,
            "max_position_embeddings": c.context,
            "rms_norm_eps": c.eps,
            "rope_theta": c.rope_theta,
            "hidden_act": "relu2",
            "tie_word_embeddings": true,
            "bos_token_id": self.vocab.bos,
            "eos_token_id": self.vocab.eos,
            "torch_dtype": "bfloat16",
            "quantization_config": {
                "quant_method": "bitnet",
                "linear_class": "autobitlinear",
                "quantization_mode": "offline",
            },
        });
        let bf16s = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect()
        };
        let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![
            (
                "model.embed_tokens.weight".into(),
                Dtype::BF16,
                vec![c.vocab, c.hidden],
                bf16s(&self.embedding),
            ),
            (
                "model.norm.weight".into(),
                Dtype::BF16,
                vec![c.hidden],
                bf16s(&self.output_norm),
            ),
        ];
        for (i, l) in self.layers.iter().enumerate() {
            let n = |s: &str| format!("model.layers.{i}.{s}");
            for (name, v) in [
                ("input_layernorm", &l.attn_norm),
                ("self_attn.attn_sub_norm", &l.attn_sub_norm),
                ("post_attention_layernorm", &l.ffn_norm),
                ("mlp.ffn_sub_norm", &l.ffn_sub_norm),
            ] {
                tensors.push((
                    n(&format!("{name}.weight")),
                    Dtype::BF16,
                    vec![v.len()],
                    bf16s(v),
                ));
            }
            for (name, t) in [
                ("self_attn.q_proj", &l.q),
                ("self_attn.k_proj", &l.k),
                ("self_attn.v_proj", &l.v),
                ("self_attn.o_proj", &l.o),
                ("mlp.gate_proj", &l.gate),
                ("mlp.up_proj", &l.up),
                ("mlp.down_proj", &l.down),
            ] {
                let packed = crate::formats::hf::encode(t).map_err(std::io::Error::other)?;
                tensors.push((
                    n(&format!("{name}.weight")),
                    Dtype::U8,
                    vec![t.rows() / 4, t.cols()],
                    packed,
                ));
                tensors.push((
                    n(&format!("{name}.weight_scale")),
                    Dtype::BF16,
                    vec![1],
                    bf16s(&[t.beta()]),
                ));
            }
        }
        let views = tensors
            .iter()
            .map(|(name, dtype, shape, data)| {
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                    .map(|v| (name.clone(), v))
                    .map_err(std::io::Error::other)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let weights = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, None, &weights).map_err(std::io::Error::other)?;
        // Readable by other users and tools, as model files are.
        std::fs::set_permissions(
            &weights,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )?;
        std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
        std::fs::write(
            dir.join("tokenizer.json"),
            serde_json::to_vec(&self.tokenizer_json())?,
        )?;
        Ok(())
    }

    /// tokenizer.json for the synthetic vocabulary, in the shape of LLaMA-3's.
    pub fn tokenizer_json(&self) -> serde_json::Value {
        let v = &self.vocab;
        let normal: serde_json::Map<String, serde_json::Value> = v
            .tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| v.types[*i] != crate::vocab::CONTROL)
            .map(|(i, t)| (t.clone(), serde_json::json!(i)))
            .collect();
        let added: Vec<serde_json::Value> = v
            .tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| v.types[*i] == crate::vocab::CONTROL)
            .map(|(i, t)| {
                serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": crate::tokenizer::LLAMA3_PATTERN},
                 "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": true, "vocab": normal, "merges": v.merges},
        })
    }
}
