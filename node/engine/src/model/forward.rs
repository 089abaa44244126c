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

use rayon::prelude::*;

use super::{ForwardError, Layer, Model};
use crate::kernels::{Activations, fdot};
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

/// One sequence's step in a batch: its new tokens (or hidden states), its
/// cache (whose length is their first position) and which logits it wants.
#[derive(Debug)]
pub struct Step<'a> {
    pub input: Input<'a>,
    pub cache: &'a mut KvCache,
    pub logits: Logits,
}

/// A step's rows within the batch: `n` rows from `row`, at positions
/// `start..start + n` of its sequence.
struct Segment {
    step: usize,
    start: usize,
    n: usize,
    row: usize,
}

/// Keys and values of every layer of one stage for one sequence. The
/// default is an empty cache of no capacity (a placeholder).
#[derive(Debug, Clone, Default)]
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
    let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
    rope_table(pos, rope_dim, theta, &mut cos, &mut sin);
    rope_apply(head, &cos, &sin);
}

/// The rotation's cos and sin at `pos` for each pair (the same for every
/// head of that position, so computed once per position).
fn rope_table(pos: usize, rope_dim: usize, theta: f32, cos: &mut [f32], sin: &mut [f32]) {
    for i in 0..rope_dim / 2 {
        let freq = f64::from(theta).powf(-2.0 * i as f64 / rope_dim as f64);
        let angle = pos as f64 * freq;
        (sin[i], cos[i]) = (angle.sin() as f32, angle.cos() as f32);
    }
}

fn rope_apply(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = (head[i], head[i + half]);
        head[i] = a * cos[i] - b * sin[i];
        head[i + half] = a * sin[i] + b * cos[i];
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
        let mut steps = [Step {
            input,
            cache,
            logits,
        }];
        self.forward_batch(&mut steps)
            .pop()
            .unwrap_or(Err(ForwardError::Empty))
    }

    /// Runs several sequences' steps at once (continuous batching): every
    /// projection is one GEMM over all their tokens, so each weight row is
    /// read once per step however many sequences share it; attention is
    /// per sequence, against its own cache. A step that cannot run (bad
    /// input, full cache) gets its error and changes nothing; the others
    /// run. Each result is bit-identical to [`Model::forward`] on that step
    /// alone, because every kernel computes each output element the same
    /// way whatever the batch.
    pub fn forward_batch(&self, steps: &mut [Step<'_>]) -> Vec<Result<Output, ForwardError>> {
        let c = &self.config;
        let mut results: Vec<Option<Result<Output, ForwardError>>> =
            (0..steps.len()).map(|_| None).collect();
        let mut h = Vec::new();
        let mut segs = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            match self.admit(step) {
                Ok(x) => {
                    let n = x.len() / c.hidden;
                    segs.push(Segment {
                        step: i,
                        start: step.cache.len,
                        n,
                        row: h.len() / c.hidden,
                    });
                    h.extend_from_slice(&x);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        if !segs.is_empty() {
            for (i, layer) in self.layers.iter().enumerate() {
                self.layer(layer, i, &mut h, &segs, steps);
            }
            for s in &segs {
                steps[s.step].cache.len += s.n;
            }
            if self.is_last() {
                let which: Vec<Logits> = segs.iter().map(|s| steps[s.step].logits).collect();
                for (s, l) in segs.iter().zip(self.logits(&h, &segs, &which)) {
                    results[s.step] = Some(Ok(Output::Logits(l)));
                }
            } else {
                for s in &segs {
                    let rows = &h[s.row * c.hidden..(s.row + s.n) * c.hidden];
                    results[s.step] = Some(Ok(Output::Hidden(rows.to_vec())));
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(ForwardError::Empty)))
            .collect()
    }

    /// A step's input as hidden rows, after checking it and its cache.
    fn admit(&self, step: &Step<'_>) -> Result<Vec<f32>, ForwardError> {
        let c = &self.config;
        let cache = &*step.cache;
        if cache.k.len() != self.layers.len() || cache.width != c.kv_width() {
            return Err(ForwardError::WrongCache);
        }
        let h = self.embed(step.input)?;
        let n = h.len() / c.hidden;
        if n == 0 {
            return Err(ForwardError::Empty);
        }
        if cache.len + n > cache.capacity {
            return Err(ForwardError::CacheFull {
                capacity: cache.capacity,
                used: cache.len,
                wanted: n,
            });
        }
        Ok(h)
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

    /// Y = BL(X) for a batch of quantized activation rows (token-major out):
    /// one token through the shape's GEMV kernel, more through the batch
    /// kernel's tiles.
    fn bitlinear(&self, w: &Ternary, acts: &[Activations], out: &mut [f32]) {
        let kernel = if acts.len() == 1 {
            self.kernel_for(w)
        } else {
            self.batch_kernel()
        };
        kernel.gemm(w, acts, out);
    }

    /// RMSNorm then int8 quantization of each of the `n` rows of `x`.
    fn norm_quantize(&self, x: &[f32], width: usize, w: &[f32]) -> Vec<Activations> {
        // Rows are independent: in parallel for a prompt's many rows.
        x.par_chunks_exact(width)
            .map_init(
                || vec![0f32; width],
                |a, row| {
                    rms_norm(row, w, self.config.eps, a);
                    Activations::quantize(a)
                },
            )
            .collect()
    }

    /// One decoder layer over every segment's tokens (rows of `h`).
    /// Every projection runs as one batched GEMM over all the rows (each
    /// weight row read once); RoPE, the cache and attention are per
    /// segment, at its own positions.
    fn layer(&self, l: &Layer, li: usize, h: &mut [f32], segs: &[Segment], steps: &mut [Step<'_>]) {
        let c = &self.config;
        let (hd, kvw) = (c.head_dim, c.kv_width());
        let qw = c.heads * hd;
        let n = h.len() / c.hidden;
        let acts = self.norm_quantize(h, c.hidden, &l.attn_norm);
        let mut q = vec![0f32; n * qw];
        let (mut k, mut v) = (vec![0f32; n * kvw], vec![0f32; n * kvw]);
        self.bitlinear(&l.q, &acts, &mut q);
        self.bitlinear(&l.k, &acts, &mut k);
        self.bitlinear(&l.v, &acts, &mut v);
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut o = vec![0f32; n * qw];
        // Each segment (sequence) against its own cache, the segments in
        // parallel: they share nothing but the read-only projections.
        // Segments are consecutive rows in step order, so `o` splits into
        // one run per segment.
        let mut work = Vec::with_capacity(segs.len());
        let mut o_rest: &mut [f32] = &mut o;
        let mut next = segs.iter().peekable();
        for (i, step) in steps.iter_mut().enumerate() {
            if let Some(s) = next.next_if(|s| s.step == i) {
                let (mine, rest) = std::mem::take(&mut o_rest).split_at_mut(s.n * qw);
                o_rest = rest;
                work.push((s, &mut *step.cache, mine));
            }
        }
        let (q, k, v) = (&q, &k, &v);
        work.into_par_iter().for_each(|(s, cache, o)| {
            let (kc, vc) = (&mut cache.k[li], &mut cache.v[li]);
            let mut qs = q[s.row * qw..(s.row + s.n) * qw].to_vec();
            let mut cs = vec![0f32; c.rope_dim / 2];
            let mut sn = vec![0f32; c.rope_dim / 2];
            for t in 0..s.n {
                let (pos, row) = (s.start + t, s.row + t);
                rope_table(pos, c.rope_dim, c.rope_theta, &mut cs, &mut sn);
                for head in qs[t * qw..(t + 1) * qw].chunks_exact_mut(hd) {
                    rope_apply(head, &cs, &sn);
                }
                let kr = &mut kc[pos * kvw..(pos + 1) * kvw];
                kr.copy_from_slice(&k[row * kvw..(row + 1) * kvw]);
                for head in kr.chunks_exact_mut(hd) {
                    rope_apply(head, &cs, &sn);
                }
                vc[pos * kvw..(pos + 1) * kvw].copy_from_slice(&v[row * kvw..(row + 1) * kvw]);
            }
            // Each token's attention reads the cache (its own positions and
            // earlier ones) and writes its own row of `o`: the tokens run in
            // parallel (a prompt is one segment), each sum in the same order.
            let (kc, vc, qs) = (&*kc, &*vc, &qs);
            o.par_chunks_mut(qw)
                .enumerate()
                .for_each_init(Vec::new, |scores, (t, ot)| {
                    let pos = s.start + t;
                    scores.clear();
                    scores.resize(pos + 1, 0f32);
                    for head in 0..c.heads {
                        let kvh = head / group;
                        let qh = &qs[t * qw + head * hd..t * qw + (head + 1) * hd];
                        let key = |j: usize| &kc[j * kvw + kvh * hd..j * kvw + (kvh + 1) * hd];
                        // Four positions per pass over the query (eight lanes
                        // each, AVX2 where the CPU has it; the same bits as one
                        // at a time).
                        let mut quads = scores.chunks_exact_mut(4);
                        for (i, sq) in (&mut quads).enumerate() {
                            let j = 4 * i;
                            let d = fdot::dot_n(qh, [key(j), key(j + 1), key(j + 2), key(j + 3)]);
                            for (sc, d) in sq.iter_mut().zip(d) {
                                *sc = d * scale;
                            }
                        }
                        let done = (pos + 1) / 4 * 4;
                        for (j, sj) in quads.into_remainder().iter_mut().enumerate() {
                            *sj = fdot::dot_n(qh, [key(done + j)])[0] * scale;
                        }
                        softmax(scores);
                        let oh = &mut ot[head * hd..(head + 1) * hd];
                        let value = |j: usize| &vc[j * kvw + kvh * hd..j * kvw + (kvh + 1) * hd];
                        // Four positions per pass over the output (added in
                        // position order per element: the same bits as one
                        // at a time).
                        let mut quads = scores.chunks_exact(4);
                        for (i, p) in (&mut quads).enumerate() {
                            let j = 4 * i;
                            let p = [p[0], p[1], p[2], p[3]];
                            fdot::axpy_n(
                                oh,
                                p,
                                [value(j), value(j + 1), value(j + 2), value(j + 3)],
                            );
                        }
                        let done = (pos + 1) / 4 * 4;
                        for (j, &p) in quads.remainder().iter().enumerate() {
                            fdot::axpy_n(oh, [p], [value(done + j)]);
                        }
                    }
                });
        });
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

    /// Each segment's logits (its last position's, or all of them), the
    /// lm_head applied to every wanted position in one pass over its rows.
    fn logits(&self, h: &[f32], segs: &[Segment], which: &[Logits]) -> Vec<Vec<f32>> {
        let c = &self.config;
        let (Some(emb), Some(norm)) = (self.lm_head.as_deref(), &self.output_norm) else {
            unreachable!("a last stage is built with its embedding and output norm");
        };
        let mut counts = Vec::with_capacity(segs.len());
        let mut x = Vec::new();
        let mut row = vec![0f32; c.hidden];
        for (s, w) in segs.iter().zip(which) {
            let rows = match w {
                Logits::Last => s.row + s.n - 1..s.row + s.n,
                Logits::All => s.row..s.row + s.n,
            };
            counts.push(rows.len());
            for t in rows {
                rms_norm(&h[t * c.hidden..(t + 1) * c.hidden], norm, c.eps, &mut row);
                x.extend_from_slice(&row);
            }
        }
        let mut out = vec![0f32; x.len() / c.hidden * c.vocab];
        emb.matmul(&x, &mut out);
        let mut split = Vec::with_capacity(segs.len());
        let mut at = 0;
        for n in counts {
            split.push(out[at..at + n * c.vocab].to_vec());
            at += n * c.vocab;
        }
        split
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
