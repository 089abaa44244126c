//! The int8 lm_head (`--quant-embd q8`): the weights quantized as GGUF's
//! Q8_0 (blocks of 32 values: an f16 scale d, 32 int8 q, value = d·q) and
//! repacked per row for the kernel — the row's f16 scales first, then its
//! int8 values (the same 34 bytes a block, so the same bytes per token as
//! Q8_0) — and each token's activations quantized the same way (blocks of
//! 32, an f32 scale each). A row · token is, per block, an exact integer
//! sum Σ q_w·q_x scaled by d_w·d_x, as llama.cpp's `vec_dot_q8_0_q8_0`.
//!
//! The float part is defined lane by lane so that the baseline and the SIMD
//! copy give the same bits: lane l of accumulator (block mod 2) gains
//! fma(Σ of the block's elements 4l..4l+3, d_w·d_x); at the end the two
//! accumulators are added lane-wise and the eight lanes summed in order.
//! Two accumulators keep two FMA chains in flight; the scales are widened
//! eight blocks at a time (F16C) from their own run at the row's start.
#![allow(unsafe_code)]

use half::f16;

/// Values per block.
pub const BLOCK: usize = 32;
/// Bytes per block: the f16 scale and 32 int8.
pub const BLOCK_BYTES: usize = 34;

/// Bytes of one row of `cols` values (padded with zeros to whole blocks),
/// in GGUF's Q8_0 layout and in the repacked one alike.
pub fn row_bytes(cols: usize) -> usize {
    cols.div_ceil(BLOCK) * BLOCK_BYTES
}

/// Quantizes one row into the repacked layout (`row_bytes(x.len())`
/// bytes): per block d = f16(max|x| / 127), q = round_half_even(x / d)
/// clamped to ±127 (0 for an all-zero block). The scale is rounded to f16
/// before the division, so the stored d and q agree.
pub fn quantize_row(x: &[f32], out: &mut [u8]) {
    assert_eq!(out.len(), row_bytes(x.len()), "Q8 row size");
    let blocks = x.len().div_ceil(BLOCK);
    let (scales, quants) = out.split_at_mut(2 * blocks);
    for (b, (ds, q)) in scales
        .chunks_exact_mut(2)
        .zip(quants.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        let vals = &x[b * BLOCK..((b + 1) * BLOCK).min(x.len())];
        let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = f16::from_f32(amax / 127.0);
        let df = d.to_f32();
        ds.copy_from_slice(&d.to_le_bytes());
        q.fill(0);
        if df > 0.0 {
            for (o, &v) in q.iter_mut().zip(vals) {
                *o = (v / df).round_ties_even().clamp(-127.0, 127.0) as i8 as u8;
            }
        }
    }
}

/// A row in GGUF's Q8_0 layout (interleaved 34-byte blocks) into the
/// repacked one, byte for byte.
pub fn repack_row(q8_0: &[u8], out: &mut [u8]) {
    assert_eq!(q8_0.len(), out.len(), "Q8 row size");
    let blocks = q8_0.len() / BLOCK_BYTES;
    let (scales, quants) = out.split_at_mut(2 * blocks);
    for ((block, ds), q) in q8_0
        .chunks_exact(BLOCK_BYTES)
        .zip(scales.chunks_exact_mut(2))
        .zip(quants.chunks_exact_mut(BLOCK))
    {
        ds.copy_from_slice(&block[..2]);
        q.copy_from_slice(&block[2..]);
    }
}

/// Block `b`'s scale and values of a repacked row.
pub fn block(row: &[u8], b: usize) -> (f32, &[u8]) {
    let blocks = row.len() / BLOCK_BYTES;
    let d = f16::from_le_bytes([row[2 * b], row[2 * b + 1]]).to_f32();
    let at = 2 * blocks + b * BLOCK;
    (d, &row[at..at + BLOCK])
}

/// One token's activations in blocks of 32: q = round_half_even(x·127 /
/// max|x|) per block (|q| ≤ 127), d = max|x| / 127, zero-padded to whole
/// blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct Q8Acts {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
}

impl Q8Acts {
    pub fn quantize(x: &[f32]) -> Self {
        let blocks = x.len().div_ceil(BLOCK);
        let mut q = vec![0i8; blocks * BLOCK];
        let mut d = vec![0f32; blocks];
        for (b, (qb, db)) in q.chunks_exact_mut(BLOCK).zip(&mut d).enumerate() {
            let vals = &x[b * BLOCK..((b + 1) * BLOCK).min(x.len())];
            let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
            if amax > 0.0 {
                let s = 127.0 / amax;
                *db = amax / 127.0;
                for (o, &v) in qb.iter_mut().zip(vals) {
                    *o = (v * s).round_ties_even().clamp(-127.0, 127.0) as i8;
                }
            }
        }
        Self { q, d }
    }
}

/// Repacked row · each token in `xs`, the baseline copy.
#[inline(always)]
fn dot_n_plain<const N: usize>(row: &[u8], xs: [&Q8Acts; N]) -> [f32; N] {
    let blocks = row.len() / BLOCK_BYTES;
    let mut acc = [[[0f32; 8]; 2]; N];
    for b in 0..blocks {
        let (dw, wq) = block(row, b);
        for t in 0..N {
            let d = dw * xs[t].d[b];
            let xq = &xs[t].q[b * BLOCK..(b + 1) * BLOCK];
            for (l, lane) in acc[t][b % 2].iter_mut().enumerate() {
                let p: i32 = (4 * l..4 * l + 4)
                    .map(|i| i32::from(wq[i] as i8) * i32::from(xq[i]))
                    .sum();
                *lane = (p as f32).mul_add(d, *lane);
            }
        }
    }
    acc.map(|[even, odd]| {
        let lanes: [f32; 8] = std::array::from_fn(|l| even[l] + odd[l]);
        lanes.iter().sum::<f32>()
    })
}

/// [`dot_n_plain`] with AVX2, F16C and FMA: `vpsignb` moves the weight's
/// sign onto the activation so `vpmaddubsw` (u8 × s8) takes |q_w| (≤ 128)
/// × ±q_x (≤ 127): pairs sum to at most 32,512, inside i16; `vpmaddwd` by
/// ones gives lane l the block's elements 4l..4l+3 in i32, exactly as the
/// baseline groups them; `vfmadd` rounds once, as `f32::mul_add` does.
///
/// # Safety
/// The CPU must support AVX2, F16C and FMA; every x has
/// `row.len() / 34` blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn dot_n_avx2<const N: usize>(row: &[u8], xs: [&Q8Acts; N]) -> [f32; N] {
    use std::arch::x86_64::*;
    let blocks = row.len() / BLOCK_BYTES;
    let quants = row[2 * blocks..].as_ptr();
    let mut acc = [[_mm256_setzero_ps(); 2]; N];
    let ones = _mm256_set1_epi16(1);
    // One block's part: lane sums of the block, fused into acc[t][b % 2]
    // with the block's combined scale d[t].
    macro_rules! step {
        ($b:expr, $d:expr) => {{
            let b = $b;
            // SAFETY: b < blocks: the block's 32 values are inside the row,
            // and each x holds 32·blocks values (checked by the caller).
            let w = unsafe { _mm256_loadu_si256(quants.add(b * BLOCK).cast()) };
            let aw = _mm256_sign_epi8(w, w);
            for t in 0..N {
                // SAFETY: as above.
                let x = unsafe { _mm256_loadu_si256(xs[t].q.as_ptr().add(b * BLOCK).cast()) };
                let sums =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w)), ones);
                let d = _mm256_set1_ps(($d)(t));
                acc[t][b % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), d, acc[t][b % 2]);
            }
        }};
    }
    let groups = blocks / 8;
    for g in 0..groups {
        // SAFETY: the scales of blocks 8g..8g+8 (16 bytes) are inside the
        // row's scale run; each x holds `blocks` scales.
        let dw = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(16 * g).cast())) };
        let mut ds = [[0f32; 8]; N];
        for t in 0..N {
            // SAFETY: as above; 8 floats into an 8-float array.
            unsafe {
                let xd = _mm256_loadu_ps(xs[t].d.as_ptr().add(8 * g));
                _mm256_storeu_ps(ds[t].as_mut_ptr(), _mm256_mul_ps(dw, xd));
            }
        }
        #[allow(clippy::needless_range_loop)] // j is both the block and the lane
        for j in 0..8 {
            step!(8 * g + j, |t: usize| ds[t][j]);
        }
    }
    for b in 8 * groups..blocks {
        let dw = f16::from_le_bytes([row[2 * b], row[2 * b + 1]]).to_f32();
        step!(b, |t: usize| dw * xs[t].d[b]);
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
pub fn dot_n<const N: usize>(row: &[u8], xs: [&Q8Acts; N]) -> [f32; N] {
    assert_eq!(row.len() % BLOCK_BYTES, 0, "a Q8 row is whole blocks");
    let blocks = row.len() / BLOCK_BYTES;
    for x in &xs {
        assert!(
            x.d.len() == blocks && x.q.len() == blocks * BLOCK,
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

    proptest! {
        /// The dispatched (AVX2 where present) and baseline copies agree
        /// bit for bit, and four tokens at once equal one at a time.
        #[test]
        fn simd_and_baseline_agree(blocks in 1usize..30, tail in 0usize..32, seed in any::<u64>()) {
            let cols = blocks * BLOCK - if blocks > 1 { tail } else { 0 };
            let w = values(cols, seed, 0);
            let mut row = vec![0u8; row_bytes(cols)];
            quantize_row(&w, &mut row);
            let xs: Vec<Q8Acts> = (1..5).map(|k| Q8Acts::quantize(&values(cols, seed, k))).collect();
            let four = dot_n(&row, [&xs[0], &xs[1], &xs[2], &xs[3]]);
            let plain = dot_n_plain(&row, [&xs[0], &xs[1], &xs[2], &xs[3]]);
            prop_assert_eq!(four.map(f32::to_bits), plain.map(f32::to_bits));
            for (t, x) in xs.iter().enumerate() {
                prop_assert_eq!(dot_n(&row, [x])[0].to_bits(), four[t].to_bits());
            }
        }

        /// Quantization error is within half a step per value, so the dot
        /// is close to the f32 one.
        #[test]
        fn close_to_f32(seed in any::<u64>()) {
            let cols = 256;
            let (w, x) = (values(cols, seed, 0), values(cols, seed, 1));
            let mut row = vec![0u8; row_bytes(cols)];
            quantize_row(&w, &mut row);
            let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
            let got = dot_n(&row, [&Q8Acts::quantize(&x)])[0];
            let norm: f32 = w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
            prop_assert!((got - exact).abs() <= 0.02 * norm, "{got} vs {exact}");
        }
    }

    /// The extremes: q_w = -128 (possible in a file) against q_x = ±127
    /// stays inside vpmaddubsw's i16 pairs.
    #[test]
    fn extreme_codes_do_not_saturate() {
        let blocks = 4;
        let mut q8_0 = vec![0u8; blocks * BLOCK_BYTES];
        for block in q8_0.chunks_exact_mut(BLOCK_BYTES) {
            block[..2].copy_from_slice(&f16::ONE.to_le_bytes());
            block[2..].fill(0x80); // -128
        }
        let mut row = vec![0u8; q8_0.len()];
        repack_row(&q8_0, &mut row);
        for xv in [127i8, -127] {
            let x = Q8Acts {
                q: vec![xv; blocks * BLOCK],
                d: vec![1.0; blocks],
            };
            let want = (-128 * i32::from(xv) * (blocks * BLOCK) as i32) as f32;
            assert_eq!(dot_n(&row, [&x])[0], want);
            assert_eq!(dot_n_plain(&row, [&x])[0], want);
        }
    }

    /// GGUF's interleaved Q8_0 blocks repack byte for byte.
    #[test]
    fn repacking_keeps_every_block() {
        let blocks = 5;
        let q8_0: Vec<u8> = (0..blocks * BLOCK_BYTES)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut row = vec![0u8; q8_0.len()];
        repack_row(&q8_0, &mut row);
        for b in 0..blocks {
            let file = &q8_0[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES];
            let (d, q) = block(&row, b);
            assert_eq!(d, f16::from_le_bytes([file[0], file[1]]).to_f32());
            assert_eq!(q, &file[2..]);
        }
    }

    #[test]
    fn quantize_round_trips_within_half_a_step() {
        let x = values(100, 3, 0);
        let mut row = vec![0u8; row_bytes(100)];
        quantize_row(&x, &mut row);
        for b in 0..row.len() / BLOCK_BYTES {
            let (d, q) = block(&row, b);
            for (i, &q) in q.iter().enumerate() {
                let c = b * BLOCK + i;
                let v = if c < x.len() { x[c] } else { 0.0 };
                assert!((d * f32::from(q as i8) - v).abs() <= d * 0.5 + 1e-6, "{c}");
            }
        }
    }
}
