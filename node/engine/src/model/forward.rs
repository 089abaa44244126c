//! The forward pass (BITNET.md §1.2) of one stage over a batch of tokens at
//! consecutive positions, with a KV cache:
//!
//! ```text
//! a = RMSNorm(h, attn_norm); q,k,v = BL(a) (one activation quantization)
//! q,k = RoPE_neox(q,k,pos); o = softmax(q·kᵀ/√d + causal)·v  (GQA)
//! h += BL_o(RMSNorm(o, attn_sub_norm))
//! b = RMSNorm(h, ffn_norm); m = relu(BL_gate(b))² ⊙ BL_up(b)  (one quantization)
//! h += BL_down(RMSNorm(m, ffn_sub_norm))
//! logits = RMSNorm(h, output_norm) · Embᵀ  (not activation-quantized)
//! ```

use super::{ForwardError, Layer, Model};
use crate::kernels::Activations;
use crate::ternary::Ternary;

/// What a stage takes.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// Token ids (first stage only).
    Tokens(&'a [u32]),
    /// Hidden states, tokens × hidden, row-major (later stages).
    Hidden(&'a [f32]),
}

/// Which positions' logits the last stage returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position's (generation).
    Last,
    /// Every position's (evaluation, perplexity).
    All,
}

/// What a stage gives.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Hidden states for the next stage, tokens × hidden.
    Hidden(Vec<f32>),
    /// Logits, positions × vocab (one position for [`Logits::Last`]).
    Logits(Vec<f32>),
}

/// Keys and values of every layer of one stage for one sequence.
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
    width: usize,
}

impl KvCache {
    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets positions from `len` on (e.g. to re-run after a stop).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// x ⊙ w / sqrt(mean(x²) + eps), sum of squares in f64.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / x.len() as f64;
    let inv = (1.0 / (ms + f64::from(eps)).sqrt()) as f32;
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

/// NEOX rotation of one head in place: pairs (i, i + rope_dim/2).
pub fn rope_neox(head: &mut [f32], pos: usize, rope_dim: usize, theta: f32) {
    let half = rope_dim / 2;
    for i in 0..half {
        let freq = f64::from(theta).powf(-2.0 * i as f64 / rope_dim as f64);
        let angle = pos as f64 * freq;
        let (sin, cos) = (angle.sin() as f32, angle.cos() as f32);
        let (a, b) = (head[i], head[i + half]);
        head[i] = a * cos - b * sin;
        head[i + half] = a * sin + b * cos;
    }
}

impl Model {
    /// A cache for `capacity` positions of this stage's layers.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let capacity = capacity.min(self.config.context);
        let width = self.config.kv_width();
        KvCache {
            k: self
                .layers
                .iter()
                .map(|_| vec![0.0; capacity * width])
                .collect(),
            v: self
                .layers
                .iter()
                .map(|_| vec![0.0; capacity * width])
                .collect(),
            len: 0,
            capacity,
            width,
        }
    }

    /// Runs a batch of consecutive tokens (positions `cache.len()..`)
    /// through this stage. On error nothing, the cache included, changes.
    pub fn forward(
        &self,
        input: Input<'_>,
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Output, ForwardError> {
        let c = &self.config;
        let mut h = self.embed(input)?;
        let n = h.len() / c.hidden;
        if n == 0 {
            return Err(ForwardError::Empty);
        }
        if cache.k.len() != self.layers.len() || cache.width != c.kv_width() {
            return Err(ForwardError::WrongCache);
        }
        if cache.len + n > cache.capacity {
            return Err(ForwardError::CacheFull {
                capacity: cache.capacity,
                used: cache.len,
                wanted: n,
            });
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let (k, v) = (&mut cache.k[i], &mut cache.v[i]);
            self.layer(layer, &mut h, n, cache.len, k, v);
        }
        cache.len += n;
        if !self.is_last() {
            return Ok(Output::Hidden(h));
        }
        Ok(Output::Logits(self.logits(&h, n, logits)))
    }

    fn embed(&self, input: Input<'_>) -> Result<Vec<f32>, ForwardError> {
        let c = &self.config;
        let wrong = |expected, given| ForwardError::WrongInput {
            start: self.range.start,
            end: self.range.end,
            expected,
            given,
        };
        match (input, self.embedding.as_deref(), self.is_first()) {
            (Input::Tokens(ids), Some(emb), true) => {
                let mut h = vec![0f32; ids.len() * c.hidden];
                for (t, &id) in ids.iter().enumerate() {
                    if id as usize >= c.vocab || id as usize >= emb.rows() {
                        return Err(ForwardError::BadToken { id, vocab: c.vocab });
                    }
                    emb.row_into(id as usize, &mut h[t * c.hidden..(t + 1) * c.hidden]);
                }
                Ok(h)
            }
            (Input::Tokens(_), _, _) => Err(wrong("hidden states", "token ids")),
            (Input::Hidden(_), _, true) => Err(wrong("token ids", "hidden states")),
            (Input::Hidden(x), _, false) => {
                if x.len() % c.hidden != 0 {
                    return Err(ForwardError::BadHidden {
                        len: x.len(),
                        hidden: c.hidden,
                    });
                }
                Ok(x.to_vec())
            }
        }
    }

    /// Y = BL(X) for a batch of quantized activation rows (token-major out).
    fn bitlinear(&self, w: &Ternary, acts: &[Activations], out: &mut [f32]) {
        self.kernel.gemm(w, acts, out);
    }

    /// RMSNorm then int8 quantization of each of the `n` rows of `x`.
    fn norm_quantize(&self, x: &[f32], width: usize, w: &[f32]) -> Vec<Activations> {
        let mut a = vec![0f32; width];
        x.chunks_exact(width)
            .map(|row| {
                rms_norm(row, w, self.config.eps, &mut a);
                Activations::quantize(&a)
            })
            .collect()
    }

    /// One decoder layer over `n` tokens at positions `start..start + n`.
    /// Every projection runs as one batched GEMM over the tokens (each
    /// weight row read once); attention is per token and causal.
    fn layer(
        &self,
        l: &Layer,
        h: &mut [f32],
        n: usize,
        start: usize,
        kc: &mut [f32],
        vc: &mut [f32],
    ) {
        let c = &self.config;
        let (hd, kvw) = (c.head_dim, c.kv_width());
        let qw = c.heads * hd;
        // q, k, v for every token; k and v go straight into the cache.
        let acts = self.norm_quantize(h, c.hidden, &l.attn_norm);
        let mut q = vec![0f32; n * qw];
        self.bitlinear(&l.q, &acts, &mut q);
        self.bitlinear(&l.k, &acts, &mut kc[start * kvw..(start + n) * kvw]);
        self.bitlinear(&l.v, &acts, &mut vc[start * kvw..(start + n) * kvw]);
        for t in 0..n {
            let pos = start + t;
            for head in q[t * qw..(t + 1) * qw].chunks_exact_mut(hd) {
                rope_neox(head, pos, c.rope_dim, c.rope_theta);
            }
            for head in kc[pos * kvw..(pos + 1) * kvw].chunks_exact_mut(hd) {
                rope_neox(head, pos, c.rope_dim, c.rope_theta);
            }
        }
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut o = vec![0f32; n * qw];
        let mut scores = vec![0f32; start + n];
        for t in 0..n {
            let pos = start + t;
            for head in 0..c.heads {
                let kvh = head / group;
                let qh = &q[t * qw + head * hd..t * qw + (head + 1) * hd];
                let s = &mut scores[..=pos];
                for (j, sj) in s.iter_mut().enumerate() {
                    let kj = &kc[j * kvw + kvh * hd..j * kvw + (kvh + 1) * hd];
                    *sj = qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                }
                softmax(s);
                let oh = &mut o[t * qw + head * hd..t * qw + (head + 1) * hd];
                for (j, &p) in s.iter().enumerate() {
                    let vj = &vc[j * kvw + kvh * hd..j * kvw + (kvh + 1) * hd];
                    for (x, &y) in oh.iter_mut().zip(vj) {
                        *x += p * y;
                    }
                }
            }
        }
        let mut delta = vec![0f32; n * c.hidden];
        let acts = self.norm_quantize(&o, qw, &l.attn_sub_norm);
        self.bitlinear(&l.o, &acts, &mut delta);
        add(h, &delta);
        let acts = self.norm_quantize(h, c.hidden, &l.ffn_norm);
        let (mut gate, mut up) = (vec![0f32; n * c.ffn], vec![0f32; n * c.ffn]);
        self.bitlinear(&l.gate, &acts, &mut gate);
        self.bitlinear(&l.up, &acts, &mut up);
        for (g, &u) in gate.iter_mut().zip(&up) {
            *g = c.activation.apply(*g) * u;
        }
        let acts = self.norm_quantize(&gate, c.ffn, &l.ffn_sub_norm);
        self.bitlinear(&l.down, &acts, &mut delta);
        add(h, &delta);
    }

    fn logits(&self, h: &[f32], n: usize, which: Logits) -> Vec<f32> {
        let c = &self.config;
        let (Some(emb), Some(norm)) = (self.lm_head.as_deref(), &self.output_norm) else {
            unreachable!("a last stage is built with its embedding and output norm");
        };
        let positions: Vec<usize> = match which {
            Logits::Last => vec![n - 1],
            Logits::All => (0..n).collect(),
        };
        let mut out = vec![0f32; positions.len() * c.vocab];
        let mut x = vec![0f32; c.hidden];
        for (i, &t) in positions.iter().enumerate() {
            rms_norm(&h[t * c.hidden..(t + 1) * c.hidden], norm, c.eps, &mut x);
            emb.matvec(&x, &mut out[i * c.vocab..(i + 1) * c.vocab]);
        }
        out
    }
}

fn add(x: &mut [f32], d: &[f32]) {
    for (a, b) in x.iter_mut().zip(d) {
        *a += b;
    }
}

fn softmax(s: &mut [f32]) {
    let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for v in s.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in s.iter_mut() {
        *v /= sum;
    }
}
