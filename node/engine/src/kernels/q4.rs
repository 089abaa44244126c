//! The 4-bit lm_head (`--quant-embd q4`): the weights quantized as GGUF's
//! Q4_0 (blocks of 32 values: an f16 scale d and 32 four-bit codes n, value
//! = d·(n − 8); byte j of a block holds value j in its low nibble and value
//! j + 16 in its high one) and repacked per row — the row's f16 scales
//! first, then its blocks' 16 code bytes, the row padded with a zero block
//! to an even count — so 18 bytes a block, as Q4_0. Activations are
//! quantized as for the q8 head ([`Q8Acts`]) and rearranged per pair of
//! blocks ([`Q4Acts`]) so that one 32-byte load of codes serves two blocks.
//!
//! The sums are exact integers, grouped in eight lanes per pair of blocks:
//! lane l (0..8) holds block 2p + l/4's elements 4(l mod 4)..+3 and
//! 16 + 4(l mod 4)..+3, Σ (n − 8)·q. Lane l of accumulator (p mod 2) gains
//! fma(that sum, d_w·d_x of its block); at the end the two accumulators are
//! added lane-wise and the lanes summed in order — the same float steps in
//! the baseline and the SIMD copy, so the same bits.
#![allow(unsafe_code)]

use half::f16;

use super::q8::{self, Q8Acts};

/// Values per block.
pub const BLOCK: usize = 32;
/// Bytes per block: the f16 scale and 16 bytes of codes.
pub const BLOCK_BYTES: usize = 18;

/// Blocks of a row of `cols` values, padded to an even count.
pub fn blocks(cols: usize) -> usize {
    cols.div_ceil(2 * BLOCK) * 2
}

/// Bytes of one repacked row of `cols` values.
pub fn row_bytes(cols: usize) -> usize {
    blocks(cols) * BLOCK_BYTES
}

/// Bytes of one row of `cols` values in GGUF's Q4_0 layout (no padding
/// block: GGUF rows are whole blocks).
pub fn file_row_bytes(cols: usize) -> usize {
    cols.div_ceil(BLOCK) * BLOCK_BYTES
}

/// Quantizes one block as llama.cpp's Q4_0 reference does: m is the value
/// of largest magnitude (the first if tied), d = f16(m / −8), n =
/// clamp(round_half_even(x / d), −8, 7) + 8 (all 8 when d is 0). The scale
/// is rounded to f16 before the division, so the stored d and n agree.
fn quantize_block(vals: &[f32], scale: &mut [u8], codes: &mut [u8]) {
    let m = vals
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = f16::from_f32(m / -8.0);
    let df = d.to_f32();
    scale.copy_from_slice(&d.to_le_bytes());
    let code = |i: usize| -> u8 {
        let v = vals.get(i).copied().unwrap_or(0.0);
        if df == 0.0 {
            8
        } else {
            ((v / df).round_ties_even().clamp(-8.0, 7.0) as i32 + 8) as u8
        }
    };
    for (j, c) in codes.iter_mut().enumerate() {
        *c = code(j) | (code(j + 16) << 4);
    }
}

/// Quantizes one row into the repacked layout (`row_bytes(x.len())` bytes).
pub fn quantize_row(x: &[f32], out: &mut [u8]) {
    assert_eq!(out.len(), row_bytes(x.len()), "Q4 row size");
    let n = blocks(x.len());
    let (scales, codes) = out.split_at_mut(2 * n);
    for (b, (ds, cs)) in scales
        .chunks_exact_mut(2)
        .zip(codes.chunks_exact_mut(BLOCK / 2))
        .enumerate()
    {
        let vals = &x[(b * BLOCK).min(x.len())..((b + 1) * BLOCK).min(x.len())];
        quantize_block(vals, ds, cs);
    }
}

/// A row in GGUF's Q4_0 layout (interleaved 18-byte blocks) into the
/// repacked one, codes and scales byte for byte (a padding block is zero).
pub fn repack_row(q4_0: &[u8], out: &mut [u8]) {
    let file_blocks = q4_0.len() / BLOCK_BYTES;
    assert_eq!(q4_0.len(), file_blocks * BLOCK_BYTES, "Q4_0 row size");
    let n = out.len() / BLOCK_BYTES;
    assert!(
        n >= file_blocks && n == file_blocks.div_ceil(2) * 2,
        "Q4 row size"
    );
    let (scales, codes) = out.split_at_mut(2 * n);
    scales.fill(0);
    codes.fill(0x88);
    for ((block, ds), cs) in q4_0
        .chunks_exact(BLOCK_BYTES)
        .zip(scales.chunks_exact_mut(2))
        .zip(codes.chunks_exact_mut(BLOCK / 2))
    {
        ds.copy_from_slice(&block[..2]);
        cs.copy_from_slice(&block[2..]);
    }
}

/// Block `b`'s scale and its 32 values' codes n (value = d·(n − 8)) of a
/// repacked row.
pub fn block(row: &[u8], b: usize) -> (f32, [u8; BLOCK]) {
    let n = row.len() / BLOCK_BYTES;
    let d = f16::from_le_bytes([row[2 * b], row[2 * b + 1]]).to_f32();
    let at = 2 * n + b * BLOCK / 2;
    (d, codes_of(&row[at..at + BLOCK / 2]))
}

/// A GGUF Q4_0 block's 16 code bytes as 32 codes in value order.
pub fn codes_of(bytes: &[u8]) -> [u8; BLOCK] {
    std::array::from_fn(|i| {
        if i < 16 {
            bytes[i] & 0xF
        } else {
            bytes[i - 16] >> 4
        }
    })
}

/// One token's activations for the Q4 kernel: the [`Q8Acts`] values
/// rearranged per pair of blocks (b = 2p, b + 1) as the 64 bytes
/// [b 0..16, b+1 0..16, b 16..32, b+1 16..32], plus per pair eight lane
/// offsets 8·Σq (lane l: block b + l/4, elements 4(l mod 4)..+3 and
/// 16 + 4(l mod 4)..+3) and eight lane scales d_x.
#[derive(Debug, Clone, PartialEq)]
pub struct Q4Acts {
    pub q: Vec<i8>,
    pub off: Vec<i32>,
    pub d: Vec<f32>,
}

impl Q4Acts {
    /// `x` quantized exactly as [`Q8Acts::quantize`] does, for a row of
    /// `blocks(x.len())` blocks.
    pub fn quantize(x: &[f32]) -> Self {
        Self::from_q8(&Q8Acts::quantize(x))
    }

    pub fn from_q8(a: &Q8Acts) -> Self {
        let pairs = a.d.len().div_ceil(2);
        let mut q = vec![0i8; pairs * 2 * BLOCK];
        let mut off = vec![0i32; pairs * 8];
        let mut d = vec![0f32; pairs * 8];
        let x = |b: usize, i: usize| -> i8 { a.q.get(b * BLOCK + i).copied().unwrap_or(0) };
        for p in 0..pairs {
            for h in 0..2 {
                let b = 2 * p + h;
                for i in 0..16 {
                    q[64 * p + 16 * h + i] = x(b, i);
                    q[64 * p + 32 + 16 * h + i] = x(b, 16 + i);
                }
                for l in 0..4 {
                    let s: i32 = (4 * l..4 * l + 4)
                        .map(|i| i32::from(x(b, i)) + i32::from(x(b, 16 + i)))
                        .sum();
                    off[8 * p + 4 * h + l] = 8 * s;
                    d[8 * p + 4 * h + l] = a.d.get(b).copied().unwrap_or(0.0);
                }
            }
        }
        Self { q, off, d }
    }

    fn pairs(&self) -> usize {
        self.off.len() / 8
    }
}

/// Repacked row · each token in `xs`, the baseline copy.
#[inline(always)]
fn dot_n_plain<const N: usize>(row: &[u8], xs: [&Q4Acts; N]) -> [f32; N] {
    let n = row.len() / BLOCK_BYTES;
    let codes = &row[2 * n..];
    let mut acc = [[[0f32; 8]; 2]; N];
    for p in 0..n / 2 {
        let c = &codes[32 * p..32 * p + 32];
        // The pair's 64 codes in the activations' order.
        let lo = c.iter().map(|&b| b & 0xF);
        let hi = c.iter().map(|&b| b >> 4);
        let w: Vec<u8> = lo.chain(hi).collect();
        let dw =
            [2 * p, 2 * p + 1].map(|b| f16::from_le_bytes([row[2 * b], row[2 * b + 1]]).to_f32());
        for t in 0..N {
            let x = &xs[t].q[64 * p..64 * p + 64];
            for (l, lane) in acc[t][p % 2].iter_mut().enumerate() {
                let mut s = 0i32;
                for i in 4 * l..4 * l + 4 {
                    s += i32::from(w[i]) * i32::from(x[i])
                        + i32::from(w[32 + i]) * i32::from(x[32 + i]);
                }
                let s = s - xs[t].off[8 * p + l];
                *lane = (s as f32).mul_add(dw[l / 4] * xs[t].d[8 * p + l], *lane);
            }
        }
    }
    acc.map(|[even, odd]| {
        let lanes: [f32; 8] = std::array::from_fn(|l| even[l] + odd[l]);
        lanes.iter().sum::<f32>()
    })
}

/// [`dot_n_plain`] with AVX2, F16C and FMA. One 32-byte load holds a pair
/// of blocks' codes; its low nibbles are the activations' first 32 bytes,
/// its high nibbles the next 32. `vpmaddubsw` takes the codes (0..15) as
/// the unsigned operand: |pair| ≤ 2·15·127 = 3,810, and the low and high
/// products added stay under 7,620, inside i16; `vpmaddwd` by ones gives
/// each lane its eight products in i32, less the lane's offset 8·Σq — the
/// baseline's integer exactly. The pair's scales are widened eight blocks
/// at a time (F16C) and spread four lanes a block with `vpermd`.
///
/// # Safety
/// The CPU must support AVX2, F16C and FMA; every x has `row.len() / 36`
/// pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn dot_n_avx2<const N: usize>(row: &[u8], xs: [&Q4Acts; N]) -> [f32; N] {
    use std::arch::x86_64::*;
    let n = row.len() / BLOCK_BYTES;
    let pairs = n / 2;
    let codes = row[2 * n..].as_ptr();
    let mask = _mm256_set1_epi8(0xF);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); 2]; N];
    macro_rules! step {
        ($p:expr, $dw:expr) => {{
            let p = $p;
            // SAFETY: p < pairs: the pair's 32 code bytes are inside the
            // row, and each x holds 64·pairs values and 8·pairs lanes
            // (checked by the caller).
            let w = unsafe { _mm256_loadu_si256(codes.add(32 * p).cast()) };
            let lo = _mm256_and_si256(w, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), mask);
            for t in 0..N {
                let x = &xs[t];
                // SAFETY: as above.
                let (xlo, xhi, off, dx) = unsafe {
                    (
                        _mm256_loadu_si256(x.q.as_ptr().add(64 * p).cast()),
                        _mm256_loadu_si256(x.q.as_ptr().add(64 * p + 32).cast()),
                        _mm256_loadu_si256(x.off.as_ptr().add(8 * p).cast()),
                        _mm256_loadu_ps(x.d.as_ptr().add(8 * p)),
                    )
                };
                let prod =
                    _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
                let sums = _mm256_sub_epi32(_mm256_madd_epi16(prod, ones), off);
                let d = _mm256_mul_ps($dw, dx);
                acc[t][p % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), d, acc[t][p % 2]);
            }
        }};
    }
    let groups = pairs / 4;
    for g in 0..groups {
        // SAFETY: the scales of blocks 8g..8g+8 (16 bytes) are inside the
        // row's scale run.
        let d8 = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(16 * g).cast())) };
        for (j, idx) in SPREAD.iter().enumerate() {
            // SAFETY: eight i32 from an eight-i32 array.
            let idx = unsafe { _mm256_loadu_si256(idx.as_ptr().cast()) };
            step!(4 * g + j, _mm256_permutevar8x32_ps(d8, idx));
        }
    }
    for p in 4 * groups..pairs {
        let [a, b] =
            [2 * p, 2 * p + 1].map(|b| f16::from_le_bytes([row[2 * b], row[2 * b + 1]]).to_f32());
        step!(p, _mm256_setr_ps(a, a, a, a, b, b, b, b));
    }
    let mut out = [0f32; N];
    for t in 0..N {
        let mut lanes = [0f32; 8];
        // SAFETY: 8 floats into an 8-float array.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc[t][0], acc[t][1])) };
        out[t] = lanes.iter().sum::<f32>();
    }
    out
}

/// Repacked row · each token in `xs`; AVX2 + F16C + FMA when the CPU has
/// them, the same bits either way.
pub fn dot_n<const N: usize>(row: &[u8], xs: [&Q4Acts; N]) -> [f32; N] {
    assert_eq!(
        row.len() % (2 * BLOCK_BYTES),
        0,
        "a Q4 row is whole pairs of blocks"
    );
    let pairs = row.len() / (2 * BLOCK_BYTES);
    for x in &xs {
        assert!(
            x.pairs() == pairs && x.q.len() == pairs * 2 * BLOCK && x.d.len() == pairs * 8,
            "activations of another width"
        );
    }
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("f16c") && has!("fma") {
            // SAFETY: the features were just detected; widths checked above.
            return unsafe { dot_n_avx2(row, xs) };
        }
    }
    dot_n_plain(row, xs)
}

/// `vpermd` indices spreading pair j's two block scales (of eight widened
/// at once) over four lanes each: [2j ×4, 2j+1 ×4].
#[cfg(target_arch = "x86_64")]
static SPREAD: [[i32; 8]; 4] = [
    [0, 0, 0, 0, 1, 1, 1, 1],
    [2, 2, 2, 2, 3, 3, 3, 3],
    [4, 4, 4, 4, 5, 5, 5, 5],
    [6, 6, 6, 6, 7, 7, 7, 7],
];

// Keep the Q8 block size and ours the same: Q4Acts is made from Q8Acts.
const _: () = assert!(q8::BLOCK == BLOCK);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn values(len: usize, seed: u64, k: u64) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u64 + 1).wrapping_mul(seed | 1).wrapping_mul(k + 7) % 2001) as f32 / 97.0
                    - 10.0
            })
            .collect()
    }

    /// Σ d_w(n−8)·d_x·q over the row, in f64, from the blocks directly.
    fn reference(row: &[u8], x: &Q8Acts, cols: usize) -> f64 {
        (0..cols.div_ceil(BLOCK))
            .map(|b| {
                let (d, codes) = block(row, b);
                let s: i64 = (0..BLOCK)
                    .map(|i| (i64::from(codes[i]) - 8) * i64::from(x.q[b * BLOCK + i]))
                    .sum();
                f64::from(d) * f64::from(x.d[b]) * s as f64
            })
            .sum()
    }

    proptest! {
        /// The dispatched (AVX2 where present) and baseline copies agree
        /// bit for bit; four tokens at once equal one at a time; both are
        /// the blocks' exact products up to float rounding.
        #[test]
        fn simd_and_baseline_agree(blocks in 1usize..40, tail in 0usize..32, seed in any::<u64>()) {
            let cols = blocks * BLOCK - if blocks > 1 { tail } else { 0 };
            let w = values(cols, seed, 0);
            let mut row = vec![0u8; row_bytes(cols)];
            quantize_row(&w, &mut row);
            let q8s: Vec<Q8Acts> = (1..5).map(|k| Q8Acts::quantize(&values(cols, seed, k))).collect();
            let xs: Vec<Q4Acts> = q8s.iter().map(Q4Acts::from_q8).collect();
            let four = dot_n(&row, [&xs[0], &xs[1], &xs[2], &xs[3]]);
            let plain = dot_n_plain(&row, [&xs[0], &xs[1], &xs[2], &xs[3]]);
            prop_assert_eq!(four.map(f32::to_bits), plain.map(f32::to_bits));
            for (t, x) in xs.iter().enumerate() {
                prop_assert_eq!(dot_n(&row, [x])[0].to_bits(), four[t].to_bits());
                let want = reference(&row, &q8s[t], cols);
                let scale: f64 = w.iter().map(|v| f64::from(v.abs())).sum::<f64>() * 10.0;
                prop_assert!((f64::from(four[t]) - want).abs() <= 1e-5 * scale, "{} vs {want}", four[t]);
            }
        }

        /// Each value comes back within half a step (d/2) of the input,
        /// except one of the opposite sign to the block's largest that
        /// lies beyond 7 steps: code 15 clips it, within a whole step.
        #[test]
        fn quantize_round_trips_within_half_a_step(seed in any::<u64>(), cols in 1usize..200) {
            let x = values(cols, seed, 0);
            let mut row = vec![0u8; row_bytes(cols)];
            quantize_row(&x, &mut row);
            for b in 0..blocks(cols) {
                let (d, codes) = block(&row, b);
                for (i, &n) in codes.iter().enumerate() {
                    let c = b * BLOCK + i;
                    let v = if c < cols { x[c] } else { 0.0 };
                    let back = d * (f32::from(n) - 8.0);
                    let step = if n == 15 { d.abs() } else { d.abs() * 0.5 };
                    prop_assert!((back - v).abs() <= step + 1e-3 * v.abs() + 1e-6, "{c}: {back} vs {v}");
                }
            }
        }
    }

    /// The extremes: codes 0 and 15 (values −8 and 7) against q = ±127
    /// stay inside vpmaddubsw's i16 sums.
    #[test]
    fn extreme_codes_do_not_saturate() {
        let blocks = 6;
        for code in [0u8, 15] {
            let mut file = vec![0u8; blocks * BLOCK_BYTES];
            for b in file.chunks_exact_mut(BLOCK_BYTES) {
                b[..2].copy_from_slice(&f16::ONE.to_le_bytes());
                b[2..].fill(code | code << 4);
            }
            let mut row = vec![0u8; blocks * BLOCK_BYTES];
            repack_row(&file, &mut row);
            for xv in [127i8, -127] {
                let x = Q8Acts {
                    q: vec![xv; blocks * BLOCK],
                    d: vec![1.0; blocks],
                };
                let want = ((i32::from(code) - 8) * i32::from(xv) * (blocks * BLOCK) as i32) as f32;
                let a = Q4Acts::from_q8(&x);
                assert_eq!(dot_n(&row, [&a])[0], want);
                assert_eq!(dot_n_plain(&row, [&a])[0], want);
            }
        }
    }

    /// GGUF's Q4_0 blocks repack code for code, an odd count padded with
    /// a zero block.
    #[test]
    fn repacking_keeps_every_block() {
        let blocks = 5;
        let file: Vec<u8> = (0..blocks * BLOCK_BYTES)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut row = vec![0u8; row_bytes(blocks * BLOCK)];
        repack_row(&file, &mut row);
        for b in 0..blocks {
            let f = &file[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES];
            let (d, codes) = block(&row, b);
            assert_eq!(d, f16::from_le_bytes([f[0], f[1]]).to_f32());
            assert_eq!(codes, codes_of(&f[2..]));
        }
        let (d, codes) = block(&row, blocks);
        assert_eq!((d, codes), (0.0, [8; BLOCK]));
    }

    /// As llama.cpp's reference: the largest-magnitude value maps to −8
    /// exactly, and its sign sets the scale's.
    #[test]
    fn the_largest_value_is_code_zero() {
        let mut x = vec![0.5f32; 32];
        x[3] = -4.0;
        x[9] = 3.0;
        let mut row = vec![0u8; row_bytes(32)];
        quantize_row(&x, &mut row);
        let (d, codes) = block(&row, 0);
        assert_eq!(d, 0.5);
        assert_eq!(codes[3], 0);
        assert_eq!(d * (f32::from(codes[9]) - 8.0), 3.0);
    }
}
