//! Every kernel against the scalar reference and against Σ t·q computed
//! from the trits directly: random shapes and values, and adversarial rows
//! that overflow a naive i16 accumulator.

use proptest::prelude::*;

use super::{Activations, Kernel};
use crate::ternary::{Layout, Ternary};

/// Σ t·q straight from the trits, sharing nothing with the kernels.
fn reference(t: &Ternary, r: usize, q: &[i8]) -> i32 {
    (0..t.cols())
        .map(|c| i32::from(t.get(r, c)) * i32::from(q[c]))
        .sum()
}

/// Every kernel, in both layouts, against [`reference`].
fn check_all(t: &Ternary, acts: &Activations) {
    let base3 = t.to_layout(Layout::Base3);
    for r in 0..t.rows() {
        let want = reference(t, r, &acts.q);
        for k in Kernel::available() {
            assert_eq!(k.dot(t.row(r), acts), want, "kernel {} row {r}", k.name());
            assert_eq!(
                k.dot_in(Layout::Base3, base3.row(r), acts),
                want,
                "kernel {} base3 row {r}",
                k.name()
            );
        }
    }
}

fn acts_of(q: Vec<i8>) -> Activations {
    let sum = q.iter().map(|&v| i32::from(v)).sum();
    Activations { q, scale: 1.0, sum }
}

#[test]
fn adversarial_rows_do_not_overflow() {
    let cols = 128 * 64;
    for (trit, act) in [(1i8, 127i8), (1, -128), (-1, 127), (-1, -128)] {
        let t = Ternary::from_trits(1, cols, &vec![trit; cols], 1.0);
        let acts = acts_of(vec![act; cols]);
        check_all(&t, &acts);
        assert_eq!(
            Kernel::best().dot(t.row(0), &acts),
            i32::from(trit) * i32::from(act) * cols as i32
        );
    }
}

#[test]
fn available_kernels_include_what_the_cpu_has() {
    let names: Vec<_> = Kernel::available().iter().map(|k| k.name()).collect();
    assert_eq!(names[0], "scalar");
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        assert_eq!(names.contains(&"avx2"), has!("avx2"), "{names:?}");
        assert_eq!(
            names.contains(&"avx-vnni"),
            has!("avx2") && has!("avxvnni"),
            "{names:?}"
        );
        let avx512 = has!("avx512f") && has!("avx512bw") && has!("avx512vl");
        assert_eq!(names.contains(&"avx512"), avx512, "{names:?}");
        assert_eq!(
            names.contains(&"avx512-vnni"),
            avx512 && has!("avx512vnni"),
            "{names:?}"
        );
    }
    println!("kernels tested on this CPU: {names:?}");
}

#[test]
fn half_to_even_activation_rounding() {
    // max |x| = 127 => s_a = 1, so x·s_a is x itself.
    let acts = Activations::quantize(&[2.5, 3.5, -2.5, 127.0, -0.5, 1.5]);
    assert_eq!(&acts.q[..6], &[2, 4, -2, 127, 0, 2]);
    assert_eq!(acts.q.len(), 128);
    assert_eq!(acts.sum, 133);
    assert_eq!(acts.scale, 1.0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn kernels_match_the_reference(
        rows in 1usize..6,
        blocks in 1usize..12,
        tail in 0usize..128,
        seed in any::<u64>(),
    ) {
        let cols = (blocks - 1) * 128 + tail.max(1);
        let mut s = seed | 1;
        let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s };
        let trits: Vec<i8> = (0..rows * cols).map(|_| (next() % 3) as i8 - 1).collect();
        let x: Vec<f32> = (0..cols).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
        let t = Ternary::from_trits(rows, cols, &trits, 0.5);
        let acts = Activations::quantize(&x);
        check_all(&t, &acts);
    }

    /// The int path equals an f64 evaluation of (q/s_a)·(βT)ᵀ to f32 rounding,
    /// and the unquantized product within the activation rounding bound.
    #[test]
    fn gemv_matches_f64(cols in 1usize..600, seed in any::<u64>()) {
        let rows = 3;
        let mut s = seed | 1;
        let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s };
        let trits: Vec<i8> = (0..rows * cols).map(|_| (next() % 3) as i8 - 1).collect();
        let x: Vec<f32> = (0..cols).map(|_| (next() % 2001) as f32 / 100.0 - 10.0).collect();
        let beta = 0.37f32;
        let t = Ternary::from_trits(rows, cols, &trits, beta);
        let acts = Activations::quantize(&x);
        let mut y = vec![0f32; rows];
        Kernel::best().gemv(&t, &acts, &mut y);
        for r in 0..rows {
            let exact: f64 = (0..cols)
                .map(|c| f64::from(acts.q[c]) / f64::from(acts.scale) * f64::from(beta) * f64::from(trits[r * cols + c]))
                .sum();
            prop_assert!((f64::from(y[r]) - exact).abs() <= exact.abs() * 3e-7 + 1e-6, "{} vs {exact}", y[r]);
            let unquantized: f64 = (0..cols).map(|c| f64::from(x[c]) * f64::from(beta) * f64::from(trits[r * cols + c])).sum();
            let nnz = trits[r * cols..(r + 1) * cols].iter().filter(|&&t| t != 0).count() as f64;
            let bound = 0.5 / f64::from(acts.scale) * f64::from(beta) * nnz;
            prop_assert!((f64::from(y[r]) - unquantized).abs() <= bound + 1e-4);
        }
    }
}

/// Splitting rows over threads changes nothing.
#[test]
fn gemv_is_the_same_on_any_thread_count() {
    let (rows, cols) = (300, 700);
    let trits: Vec<i8> = (0..rows * cols).map(|i| (i * 7 % 3) as i8 - 1).collect();
    let t = Ternary::from_trits(rows, cols, &trits, 0.3);
    let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
    let acts = Activations::quantize(&x);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut y = vec![0f32; rows];
        pool.install(|| Kernel::best().gemv(&t, &acts, &mut y));
        y
    };
    let one = run(1);
    assert_eq!(run(3), one);
    let serial: Vec<f32> = (0..rows)
        .map(|r| Kernel::Scalar.dot(t.row(r), &acts) as f32 * (0.3 / acts.scale))
        .collect();
    assert_eq!(one, serial);
}

/// A batch through `gemm` equals one `gemv` per token, bit for bit, on
/// every kernel and thread count.
#[test]
fn gemm_equals_gemv_per_token() {
    // Odd and even block counts, one block, batches that do and do not
    // fill the tiles' groups of two or four tokens, and row counts that
    // leave a partial group of two or four rows at a task's end.
    for (rows, cols, n) in [
        (150, 300, 5),
        (70, 512, 9),
        (65, 128, 2),
        (64, 2560, 4),
        (3, 256, 7),
        (131, 384, 3),
        (40, 6912, 8),
    ] {
        gemm_case(rows, cols, n);
    }
}

/// A decode GEMV over base-3 rows equals the scalar I2_S GEMV, on every
/// kernel and at one and two threads, for row counts that do and do not
/// fill a task.
#[test]
fn base3_gemv_equals_the_reference_for_any_row_count() {
    for (rows, cols) in [
        (1, 256),
        (3, 640),
        (4, 2560),
        (5, 384),
        (67, 512),
        (130, 6912),
    ] {
        let trits: Vec<i8> = (0..rows * cols)
            .map(|i| ((i * 29 + i / 5) % 3) as i8 - 1)
            .collect();
        let i2s = Ternary::from_trits(rows, cols, &trits, 0.9);
        let base3 = i2s.to_layout(Layout::Base3);
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).cos() * 3.0).collect();
        let acts = Activations::quantize(&x);
        let mut want = vec![0f32; rows];
        Kernel::Scalar.gemv(&i2s, &acts, &mut want);
        for k in Kernel::available() {
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut got = vec![0f32; rows];
                pool.install(|| k.gemv(&base3, &acts, &mut got));
                assert_eq!(got, want, "{} {rows}x{cols}, {threads} threads", k.name());
            }
        }
    }
}

fn gemm_case(rows: usize, cols: usize, n: usize) {
    let trits: Vec<i8> = (0..rows * cols)
        .map(|i| ((i * 31 + i / 7) % 3) as i8 - 1)
        .collect();
    let i2s = Ternary::from_trits(rows, cols, &trits, 0.7);
    let acts: Vec<Activations> = (0..n)
        .map(|k| {
            let x: Vec<f32> = (0..cols)
                .map(|i| ((i * (k + 3)) as f32 * 0.11).sin() * (k + 1) as f32)
                .collect();
            Activations::quantize(&x)
        })
        .collect();
    // The base-3 layout's batches (its own unpack) equal I2_S's GEMVs.
    let base3 = i2s.to_layout(Layout::Base3);
    for k in Kernel::available() {
        for t in [&i2s, &base3] {
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut batch = vec![0f32; n * rows];
                pool.install(|| k.gemm(t, &acts, &mut batch));
                for (tok, a) in acts.iter().enumerate() {
                    let mut one = vec![0f32; rows];
                    Kernel::Scalar.gemv(&i2s, a, &mut one);
                    assert_eq!(
                        &batch[tok * rows..(tok + 1) * rows],
                        &one[..],
                        "{} {} token {tok} of {n}, {rows}x{cols}",
                        k.name(),
                        t.layout()
                    );
                }
            }
        }
    }
}

proptest! {
    /// The dispatched quantization (AVX2 where present) equals the
    /// reference copy bit for bit, ties and extremes included.
    #[test]
    fn quantize_copies_agree(x in proptest::collection::vec(-1000f32..1000f32, 0..600), tie in any::<bool>()) {
        let mut x = x;
        if tie && !x.is_empty() {
            // Values landing exactly on .5 after scaling.
            let n = x.len();
            x[0] = 127.0;
            x[n - 1] = 0.5;
        }
        let a = Activations::quantize(&x);
        let b = Activations::quantize_plain(&x);
        prop_assert_eq!(&a.q, &b.q);
        prop_assert_eq!(a.scale.to_bits(), b.scale.to_bits());
        prop_assert_eq!(a.sum, b.sum);
    }
}

proptest! {
    /// The bandwidth probe's sum: the AVX2 build (where the CPU has it)
    /// equals the plain one and a fold.
    #[test]
    fn sum_words_matches_the_plain_copy(w in proptest::collection::vec(any::<u64>(), 0..2000)) {
        let want = w.iter().fold(0u64, |a, &b| a.wrapping_add(b));
        prop_assert_eq!(super::sum_words_plain(&w), want);
        prop_assert_eq!(super::sum_words(&w), want);
    }
}
