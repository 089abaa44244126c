//! f32 dot products for the embedding / lm_head (not activation-quantized):
//! eight independent lanes summed in a fixed order, so the result depends
//! only on the inputs. The same code is compiled twice — for the baseline
//! and with AVX2 enabled (no FMA: a multiply then an add per lane, as in
//! the baseline) — and the AVX2 copy, chosen at run time, gives identical
//! bits, only wider. [`dot_n`] takes up to four vectors at once so that
//! each weight row is read once for all of them.
#![allow(unsafe_code)]

/// Σ a·x for each x in `xs` (each as long as `a`).
#[inline(always)]
fn dot_n_plain<const N: usize>(a: &[f32], xs: [&[f32]; N]) -> [f32; N] {
    let mut lanes = [[0f32; 8]; N];
    let whole = a.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        let w = &a[i..i + 8];
        for t in 0..N {
            let y = &xs[t][i..i + 8];
            for l in 0..8 {
                lanes[t][l] += w[l] * y[l];
            }
        }
    }
    let mut out = [0f32; N];
    for t in 0..N {
        let tail: f32 = a[whole..]
            .iter()
            .zip(&xs[t][whole..])
            .map(|(x, y)| x * y)
            .sum();
        out[t] = lanes[t].iter().sum::<f32>() + tail;
    }
    out
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_n_avx2<const N: usize>(a: &[f32], xs: [&[f32]; N]) -> [f32; N] {
    dot_n_plain(a, xs)
}

/// Σ a·x for each x in `xs`; AVX2 when the CPU has it, the same bits either way.
pub fn dot_n<const N: usize>(a: &[f32], xs: [&[f32]; N]) -> [f32; N] {
    for x in &xs {
        assert_eq!(x.len(), a.len(), "dot of unequal lengths");
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        return unsafe { dot_n_avx2(a, xs) };
    }
    dot_n_plain(a, xs)
}

/// y += p[k]·xs[k] for k in order, element by element: each element of y
/// gets the same products added in the same order as a loop over k would,
/// so the same bits (a multiply then an add, no FMA).
#[inline(always)]
fn axpy_n_plain<const N: usize>(y: &mut [f32], p: [f32; N], xs: [&[f32]; N]) {
    for (i, yi) in y.iter_mut().enumerate() {
        let mut acc = *yi;
        for k in 0..N {
            acc += p[k] * xs[k][i];
        }
        *yi = acc;
    }
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn axpy_n_avx2<const N: usize>(y: &mut [f32], p: [f32; N], xs: [&[f32]; N]) {
    axpy_n_plain(y, p, xs)
}

/// y += Σ_k p[k]·xs[k], added in order k = 0, 1, ... per element (the
/// weighted sum of attention's values); AVX2 when the CPU has it, the same
/// bits either way.
pub fn axpy_n<const N: usize>(y: &mut [f32], p: [f32; N], xs: [&[f32]; N]) {
    for x in &xs {
        assert_eq!(x.len(), y.len(), "axpy of unequal lengths");
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        return unsafe { axpy_n_avx2(y, p, xs) };
    }
    axpy_n_plain(y, p, xs)
}

/// Σ w·x for each x, with `w` given as little-endian f16 (2 bytes each),
/// widened exactly to f32: the same lanes and order as [`dot_n`] on the
/// widened row, so the same bits, without writing the row out.
#[inline(always)]
fn dot_f16_n_plain<const N: usize>(w: &[u8], xs: [&[f32]; N]) -> [f32; N] {
    let cols = w.len() / 2;
    let at = |i: usize| half::f16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32();
    let mut lanes = [[0f32; 8]; N];
    let whole = cols / 8 * 8;
    for i in (0..whole).step_by(8) {
        let wv: [f32; 8] = std::array::from_fn(|l| at(i + l));
        for t in 0..N {
            let y = &xs[t][i..i + 8];
            for l in 0..8 {
                lanes[t][l] += wv[l] * y[l];
            }
        }
    }
    let mut out = [0f32; N];
    for t in 0..N {
        let tail: f32 = (whole..cols).map(|i| at(i) * xs[t][i]).sum();
        out[t] = lanes[t].iter().sum::<f32>() + tail;
    }
    out
}

/// [`dot_f16_n_plain`] with F16C conversion and AVX 8-wide lanes (a
/// multiply then an add, no FMA: the baseline's operations exactly).
///
/// # Safety
/// The CPU must support AVX2 and F16C; `w.len() == 2 * x.len()` for every x.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn dot_f16_n_f16c<const N: usize>(w: &[u8], xs: [&[f32]; N]) -> [f32; N] {
    use std::arch::x86_64::*;
    let cols = w.len() / 2;
    let whole = cols / 8 * 8;
    let mut acc = [_mm256_setzero_ps(); N];
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 <= whole <= cols: 16 bytes of w at 2i and 8 floats
        // of each x at i are in bounds (lengths asserted by the caller).
        unsafe {
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(2 * i).cast()));
            for t in 0..N {
                let y = _mm256_loadu_ps(xs[t].as_ptr().add(i));
                acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(wv, y));
            }
        }
    }
    let mut out = [0f32; N];
    for t in 0..N {
        let mut lanes = [0f32; 8];
        // SAFETY: 8 floats into an 8-float array.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[t]) };
        let tail: f32 = (whole..cols)
            .map(|i| half::f16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32() * xs[t][i])
            .sum();
        out[t] = lanes.iter().sum::<f32>() + tail;
    }
    out
}

/// Σ w·x for each x in `xs`, `w` a row of little-endian f16; F16C + AVX2
/// when the CPU has them, the same bits either way.
pub fn dot_f16_n<const N: usize>(w: &[u8], xs: [&[f32]; N]) -> [f32; N] {
    for x in &xs {
        assert_eq!(w.len(), 2 * x.len(), "dot of unequal lengths");
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: AVX2 and F16C were just detected; lengths checked above.
        return unsafe { dot_f16_n_f16c(w, xs) };
    }
    dot_f16_n_plain(w, xs)
}

/// The baseline copy of [`dot_f16_n`], for tests.
#[cfg(test)]
fn dot_f16_n_reference<const N: usize>(w: &[u8], xs: [&[f32]; N]) -> [f32; N] {
    dot_f16_n_plain(w, xs)
}

/// The baseline copy, for tests comparing it with the dispatched one.
#[cfg(test)]
fn dot_n_reference<const N: usize>(a: &[f32], xs: [&[f32]; N]) -> [f32; N] {
    dot_n_plain(a, xs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The dispatched (AVX2 where present) and the baseline copies agree
        /// bit for bit, and four at once equals one at a time.
        #[test]
        fn simd_and_baseline_agree(
            len in 0usize..300,
            seed in any::<u64>(),
        ) {
            let v = |k: u64| -> Vec<f32> {
                (0..len)
                    .map(|i| ((i as u64 + 1).wrapping_mul(seed | 1).wrapping_mul(k + 7) % 2001) as f32 / 97.0 - 10.0)
                    .collect()
            };
            let (a, x0, x1, x2, x3) = (v(0), v(1), v(2), v(3), v(4));
            let four = dot_n(&a, [&x0, &x1, &x2, &x3]);
            prop_assert_eq!(four.map(f32::to_bits), dot_n_reference(&a, [&x0, &x1, &x2, &x3]).map(f32::to_bits));
            for (i, x) in [&x0, &x1, &x2, &x3].into_iter().enumerate() {
                prop_assert_eq!(dot_n(&a, [x])[0].to_bits(), four[i].to_bits());
            }
            // The same row stored as f16: the fused dot equals widening
            // first, on both copies.
            let w16: Vec<u8> = a.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
            let widened: Vec<f32> = a.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
            let want = dot_n_reference(&widened, [&x0, &x1, &x2, &x3]).map(f32::to_bits);
            prop_assert_eq!(dot_f16_n(&w16, [&x0, &x1, &x2, &x3]).map(f32::to_bits), want);
            prop_assert_eq!(dot_f16_n_reference(&w16, [&x0, &x1, &x2, &x3]).map(f32::to_bits), want);
            prop_assert_eq!(dot_f16_n(&w16, [&x2])[0].to_bits(), want[2]);
            // y += Σ p·x: four at once (dispatched) equals one at a time in
            // order on the baseline copy.
            let p = [0.25f32, -1.5, 3.0e-3, 7.0];
            let mut four = a.clone();
            axpy_n(&mut four, p, [&x0, &x1, &x2, &x3]);
            let mut one = a.clone();
            for (pk, x) in p.into_iter().zip([&x0, &x1, &x2, &x3]) {
                axpy_n_plain(&mut one, [pk], [x]);
            }
            prop_assert_eq!(
                four.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                one.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}
