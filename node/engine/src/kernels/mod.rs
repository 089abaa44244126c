//! Ternary × int8 kernels (BITNET.md §1.3, §3.1). Activations are quantized
//! once per token to int8 with one scale ([`Activations`]); a weight row
//! times them is an exact integer sum Σ t·q, computed from the unsigned
//! codes (t + 1) as Σ (t+1)·q − Σ q, then scaled by β / s_a.
//!
//! One scalar reference ([`scalar`]) and one file per instruction set
//! (`avx2.rs`: AVX2 and AVX-VNNI; `avx512.rs`: AVX512-BW and AVX512-VNNI);
//! [`Kernel::best`] is a first guess from the CPU's features, and a stage
//! can measure them on its own matrices and keep the fastest per shape
//! ([`choose`]).
//! Every implementation is bit-identical to the reference in i32.

pub mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod base3;
pub mod choose;
pub mod fdot;
pub mod gemm;
pub mod q4;
pub mod q8;
pub mod scalar;

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::ternary::{BLOCK, Layout, Ternary, row_bytes};

/// Rows per parallel task: large enough that scheduling costs little next
/// to the row work (64 rows of 2560 weights are 40 KB of codes), small
/// enough to balance across cores.
pub const ROWS_PER_TASK: usize = 64;

/// The wrapping sum of `w` in eight independent lanes: a memory-bandwidth
/// probe (`trine bench engine` reads a buffer larger than the caches with
/// it), compiled with AVX2 where the CPU has it so the loads, not the adds,
/// bound it. The same sum either way.
pub fn sum_words(w: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        #[allow(unsafe_code)]
        return unsafe { sum_words_avx2(w) };
    }
    sum_words_plain(w)
}

/// [`sum_words_plain`] compiled with AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(w: &[u64]) -> u64 {
    sum_words_plain(w)
}

/// Bytes ahead of the row being read that a bandwidth-bound GEMV (the
/// ternary weights, an f16 lm_head) asks the CPU to fetch into its caches
/// while it works on this row: [`PREFETCH_BYTES`], or
/// `TRINE_PREFETCH_BYTES` from the environment (0 turns it off; a value
/// [`prefetch_env`] refuses leaves the default, and the `trine` binary
/// refuses to start with it).
pub fn prefetch_distance() -> usize {
    static D: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *D.get_or_init(|| prefetch_env().ok().flatten().unwrap_or(PREFETCH_BYTES))
}

/// `TRINE_PREFETCH_BYTES` as set in the environment (None: unset), or
/// what is wrong with it and how to fix it.
pub fn prefetch_env() -> Result<Option<usize>, String> {
    let Ok(v) = std::env::var("TRINE_PREFETCH_BYTES") else {
        return Ok(None);
    };
    match v.trim().parse::<usize>() {
        Ok(n) if n <= MAX_PREFETCH_BYTES => Ok(Some(n)),
        _ => Err(format!(
            "TRINE_PREFETCH_BYTES is {v:?}: give a byte count from 0 (no prefetch) to {MAX_PREFETCH_BYTES}, e.g. {PREFETCH_BYTES}, or unset it"
        )),
    }
}

/// The largest prefetch distance accepted (far beyond any useful one).
pub const MAX_PREFETCH_BYTES: usize = 1 << 20;

/// The default prefetch distance. On a 2-vCPU Xeon VM (4 KiB pages, the
/// hardware prefetcher stopping at each page) a decode step took 15-26%
/// less time with it; 1-4 KiB measured alike, 2 KiB best (BENCHMARKS.md).
pub const PREFETCH_BYTES: usize = 2048;

/// Asks the CPU to bring `len` bytes of `data` from `at` into its caches
/// (the part inside `data`); a hint, with no effect on any result.
#[inline(always)]
#[allow(unsafe_code)]
pub fn prefetch(data: &[u8], at: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let end = (at + len).min(data.len());
        let mut p = at;
        while p < end {
            // SAFETY: `p` is inside `data`; a prefetch reads nothing into
            // the program and cannot fault.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    data.as_ptr().add(p).cast(),
                )
            };
            p += 64;
        }
    }
}

/// The reference copy of [`sum_words`].
#[inline(always)]
pub fn sum_words_plain(w: &[u64]) -> u64 {
    let mut lanes = [0u64; 8];
    let mut chunks = w.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            lanes[l] = lanes[l].wrapping_add(c[l]);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(0u64, |a, &b| a.wrapping_add(b));
    lanes.iter().fold(tail, |a, &b| a.wrapping_add(b))
}

/// A token's activations quantized to int8 (BITNET.md §1.3): s_a = 127 /
/// max(max|x|, 1e-5), q = clamp(round_half_even(x·s_a), -128, 127),
/// zero-padded to whole 128-element blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct Activations {
    pub q: Vec<i8>,
    /// s_a: multiply x by it to get q.
    pub scale: f32,
    /// Σ q, for the code offset.
    pub sum: i32,
}

impl Activations {
    pub fn quantize(x: &[f32]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was just detected.
            #[allow(unsafe_code)]
            return unsafe { Self::quantize_avx2(x) };
        }
        Self::quantize_plain(x)
    }

    /// The same code compiled with AVX2 (SSE4.1's `roundps` instead of a
    /// call to `rintf` per element): IEEE round-half-even either way, so
    /// the same bits.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2")]
    unsafe fn quantize_avx2(x: &[f32]) -> Self {
        Self::quantize_plain(x)
    }

    /// The reference copy.
    #[inline(always)]
    pub fn quantize_plain(x: &[f32]) -> Self {
        let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = 127.0 / max.max(1e-5);
        let mut q = vec![0i8; x.len().div_ceil(BLOCK) * BLOCK];
        let mut sum = 0i32;
        for (dst, &v) in q.iter_mut().zip(x) {
            let r = (v * scale).round_ties_even().clamp(-128.0, 127.0) as i8;
            *dst = r;
            sum += i32::from(r);
        }
        Self { q, scale, sum }
    }
}

/// An implementation of the ternary dot product. Ordered slowest to
/// fastest; [`Kernel::available`] lists those this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    /// AVX2: `vpmaddubsw` on the codes, widened to i32 every block.
    Avx2,
    /// AVX-VNNI (256-bit `vpdpbusd`, no i16 stage).
    AvxVnni,
    /// AVX512-BW: two blocks per `vpmaddubsw` step.
    Avx512,
    /// AVX512-VNNI: two blocks per step, `vpdpbusd` into i32.
    Avx512Vnni,
}

impl Kernel {
    /// Every kernel this CPU can run, reference first.
    pub fn available() -> Vec<Kernel> {
        let mut v = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") {
                v.push(Kernel::Avx2);
                if has!("avxvnni") {
                    v.push(Kernel::AvxVnni);
                }
            }
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
                v.push(Kernel::Avx512);
                if has!("avx512vnni") {
                    v.push(Kernel::Avx512Vnni);
                }
            }
        }
        v
    }

    /// The kernel with the most capable instructions this CPU runs,
    /// detected once: a guess at the fastest, which [`choose`] replaces by
    /// a measurement.
    pub fn best() -> Kernel {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| *Self::available().last().unwrap_or(&Kernel::Scalar))
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::AvxVnni => "avx-vnni",
            Kernel::Avx512 => "avx512",
            Kernel::Avx512Vnni => "avx512-vnni",
        }
    }

    /// Σ (t+1)·q over a packed row and its activations (same block count).
    #[inline]
    #[allow(unsafe_code)]
    pub fn dot_codes(self, row: &[u8], q: &[i8]) -> i32 {
        debug_assert_eq!(row.len() * 4, q.len());
        match self {
            Kernel::Scalar => scalar::dot_codes(row, q),
            // SAFETY (all four arms): each variant is only produced by
            // `available()` after detecting the features its function
            // enables; the lengths are whole blocks (checked in debug builds
            // above, guaranteed by `row_bytes` and `Activations::quantize`,
            // and asserted again inside each kernel).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::dot_codes(row, q) },
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => unsafe { avx2::dot_codes_vnni(row, q) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { avx512::dot_codes_bw(row, q) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { avx512::dot_codes_vnni(row, q) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("x86 kernel on a non-x86 CPU"),
        }
    }

    /// Σ t·q: the exact integer dot product of an I2_S row and the
    /// activations.
    #[inline]
    pub fn dot(self, row: &[u8], acts: &Activations) -> i32 {
        self.dot_codes(row, &acts.q) - acts.sum
    }

    /// Σ (t+1)·q over a base-3 row ([`base3`]) and its activations. This
    /// kernel's instruction set decodes the digits: table lookups where the
    /// CPU has AVX512-VBMI (the VNNI kernel), byte compares elsewhere.
    #[inline]
    #[allow(unsafe_code)]
    pub fn dot_codes_base3(self, row: &[u8], q: &[i8]) -> i32 {
        match self {
            Kernel::Scalar => base3::dot_codes_plain(row, q),
            // SAFETY (the four arms): each variant comes from `available()`
            // after detecting the features its function enables (the VBMI
            // kernel after `has_vbmi` too); each kernel asserts that the row
            // holds the groups the activations' planes need.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni if base3::has_vbmi() => unsafe { base3::dot_codes_vbmi(row, q) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { base3::dot_codes_cmp(row, q) },
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => unsafe { base3::dot_codes_avxvnni(row, q) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Avx512 => unsafe { base3::dot_codes_avx2(row, q) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("x86 kernel on a non-x86 CPU"),
        }
    }

    /// Σ t·q of a row packed in `layout` and the activations.
    #[inline]
    pub fn dot_in(self, layout: Layout, row: &[u8], acts: &Activations) -> i32 {
        match layout {
            Layout::I2s => self.dot(row, acts),
            Layout::Base3 => self.dot_codes_base3(row, &acts.q) - acts.sum,
        }
    }

    /// y = (β·T)·x̂ for every row of `w`, where x̂ = q / s_a. Rows are
    /// split over the threads of the current rayon pool in chunks of
    /// [`ROWS_PER_TASK`] (each row is computed alone, so the result does not
    /// depend on the thread count).
    pub fn gemv(self, w: &Ternary, acts: &Activations, out: &mut [f32]) {
        assert_eq!(acts.q.len(), row_bytes(w.cols()) * 4, "activation width");
        assert_eq!(out.len(), w.rows());
        let scale = w.beta() / acts.scale;
        let layout = w.layout();
        let data = w.data();
        let row_len = layout.row_bytes(w.cols());
        let ahead = prefetch_distance();
        out.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(chunk, ys)| {
                let first = chunk * ROWS_PER_TASK;
                for (i, y) in ys.iter_mut().enumerate() {
                    let at = (first + i) * row_len;
                    if ahead > 0 {
                        prefetch(data, at + ahead, row_len);
                    }
                    let row = &data[at..at + row_len];
                    *y = self.dot_in(layout, row, acts) as f32 * scale;
                }
            });
    }

    /// Y = (β·T)·X̂ for a batch of tokens: `out[t * rows + r]` is row r
    /// times token t. Each group of weight rows is unpacked once for the
    /// whole batch and multiplied by every token in register tiles
    /// ([`gemm`]) or, where the CPU has them, AMX tiles ([`amx`], from
    /// [`amx::MIN_TOKENS`] tokens), instead of being unpacked again per
    /// token. Every element
    /// is the same exact integer sum, scaled the same way, as
    /// [`Kernel::gemv`] computes it, so the result is bit-identical to n
    /// GEMVs.
    pub fn gemm(self, w: &Ternary, acts: &[Activations], out: &mut [f32]) {
        let (rows, n) = (w.rows(), acts.len());
        assert_eq!(out.len(), n * rows, "output size");
        if n == 1 {
            return self.gemv(w, &acts[0], out);
        }
        for a in acts {
            assert_eq!(a.q.len(), row_bytes(w.cols()) * 4, "activation width");
        }
        let scales: Vec<f32> = acts.iter().map(|a| w.beta() / a.scale).collect();
        // AMX tiles where the process has them (any SIMD kernel: the
        // scalar reference stays the reference), else register tiles.
        let packed = (self != Kernel::Scalar && n >= amx::MIN_TOKENS && amx::active())
            .then(|| amx::Packed::new(acts));
        // Each task owns a run of rows in every token's output: the
        // token-major result is written in place, with no transpose.
        let mut tasks: Vec<Vec<&mut [f32]>> = (0..rows.div_ceil(ROWS_PER_TASK))
            .map(|_| Vec::with_capacity(n))
            .collect();
        for y in out.chunks_exact_mut(rows) {
            for (task, part) in tasks.iter_mut().zip(y.chunks_mut(ROWS_PER_TASK)) {
                task.push(part);
            }
        }
        tasks
            .into_par_iter()
            .enumerate()
            .for_each(|(chunk, mut ys)| {
                let first = chunk * ROWS_PER_TASK;
                match &packed {
                    Some(p) => amx::rows(w, first, acts, p, &scales, &mut ys),
                    None => gemm::rows(self, w, first, acts, &scales, &mut ys),
                }
            });
    }
}

#[cfg(test)]
mod tests;
