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

/// The baseline copy, for tests comparing it with the dispatched one.
pub fn dot_n_reference<const N: usize>(a: &[f32], xs: [&[f32]; N]) -> [f32; N] {
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
        }
    }
}
