//! The batched ternary product behind [`Kernel::gemm`] (prefill, and the
//! decode step of continuous batching).
//!
//! Decode's GEMV unpacks each 2-bit code where it is used, which costs
//! nothing next to reading it from memory. A batch of n tokens would unpack
//! every row n times that way, and the unpacking (a shift and a mask per
//! 32 codes, per token) is half of the instructions. So here a group of R
//! rows is unpacked once into one code byte per weight (a few KB: it stays
//! in L1), and a register tile of R rows × T tokens walks the columns: per
//! 32 columns, R code loads and T activation loads feed R·T multiply-adds.
//! Each result is an exact i32 sum, whatever the order of its terms, so
//! every element equals the GEMV's bit for bit.
//!
//! Tiles, per instruction set (the register file bounds R·T):
//! - AVX2 (also used by the AVX512-BW kernel): `vpmaddubsw` pairs summed in
//!   i16 over one 128-column block (|pair| ≤ 512, four ≤ 2048) and widened
//!   with `vpmaddwd` once per block: 2 rows × 2 tokens in 16 registers.
//! - AVX-VNNI: `vpdpbusd` straight into i32, 2 rows × 4 tokens (16
//!   registers).
//! - AVX512-VNNI: the same at 256 bits (EVEX), 4 rows × 4 tokens (32
//!   registers).
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::{Activations, Kernel};
use crate::ternary::BLOCK;

/// Unpacks one I2_S row into one code byte (t + 1) per weight, in column
/// order: byte m of block b holds columns 128b + m + 32g in bits 7-2g..6-2g.
/// `out.len()` is the row's blocks × 128.
pub fn unpack_row(row: &[u8], out: &mut [u8]) {
    assert_eq!(row.len() * 4, out.len(), "one code byte per weight");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected; the lengths are checked above.
        return unsafe { unpack_row_avx2(row, out) };
    }
    unpack_row_plain(row, out);
}

/// The reference copy of [`unpack_row`].
pub fn unpack_row_plain(row: &[u8], out: &mut [u8]) {
    for (block, o) in row.chunks_exact(32).zip(out.chunks_exact_mut(BLOCK)) {
        for (m, &byte) in block.iter().enumerate() {
            for g in 0..4 {
                o[m + 32 * g] = (byte >> (6 - 2 * g)) & 3;
            }
        }
    }
}

/// [`unpack_row`] with AVX2: four shifted, masked copies of each 32 bytes.
///
/// # Safety
/// The CPU must support AVX2, and `out.len() >= row.len() * 4`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn unpack_row_avx2(row: &[u8], out: &mut [u8]) {
    use std::arch::x86_64::*;
    let mask = _mm256_set1_epi8(3);
    let blocks = row.len() / 32;
    assert!(out.len() >= blocks * BLOCK);
    for b in 0..blocks {
        // SAFETY: b < blocks: 32 bytes at 32b of `row` and 128 at 128b of
        // `out` are in bounds (asserted above); unaligned loads and stores.
        unsafe {
            let w = _mm256_loadu_si256(row.as_ptr().add(32 * b).cast());
            let o = out.as_mut_ptr().add(BLOCK * b);
            let c = [
                _mm256_and_si256(_mm256_srli_epi16::<6>(w), mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(w), mask),
                _mm256_and_si256(_mm256_srli_epi16::<2>(w), mask),
                _mm256_and_si256(w, mask),
            ];
            for (g, v) in c.into_iter().enumerate() {
                _mm256_storeu_si256(o.add(32 * g).cast(), v);
            }
        }
    }
}

/// Register tiles: Σ code·q for R unpacked rows × every token, T tokens at
/// a time. `$widen`: the multiply-add yields i16 pairs (`vpmaddubsw`)
/// summed over a block, then widened into the i32 accumulators; otherwise
/// it adds into them directly. The same body for every instruction set;
/// only the multiply-add differs.
#[cfg(target_arch = "x86_64")]
macro_rules! tile {
    ($name:ident, $features:literal, $widen:literal, |$p:ident, $w:ident, $a:ident, $ones:ident| $mac:expr) => {
        /// `out[r * ldo + t]` = Σ code·q of row r of `codes` (R rows,
        /// `stride` apart, whole blocks) and token t of `q` (each at least
        /// `stride` long), for every token; `q.len()` is a multiple of T.
        ///
        /// # Safety
        /// The CPU must support the features this function enables.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn $name<const R: usize, const T: usize>(
            codes: &[u8],
            stride: usize,
            q: &[&[i8]],
            out: &mut [i32],
            ldo: usize,
        ) {
            let blocks = stride / BLOCK;
            assert!(stride % BLOCK == 0 && codes.len() >= R * stride);
            assert!(q.len() % T == 0 && q.len() <= ldo);
            assert!(out.len() >= (R - 1) * ldo + q.len());
            for a in q {
                assert!(a.len() >= stride);
            }
            let $ones = _mm256_set1_epi16(1);
            for (tile, qt) in q.chunks_exact(T).enumerate() {
                let mut acc = [[_mm256_setzero_si256(); T]; R];
                for b in 0..blocks {
                    let mut part = [[_mm256_setzero_si256(); T]; R];
                    for g in 0..4 {
                        let off = b * BLOCK + 32 * g;
                        let mut w = [_mm256_setzero_si256(); R];
                        for (r, wr) in w.iter_mut().enumerate() {
                            // SAFETY: r < R and off + 32 <= stride: in
                            // bounds of `codes` (asserted above).
                            *wr = unsafe {
                                _mm256_loadu_si256(codes.as_ptr().add(r * stride + off).cast())
                            };
                        }
                        for t in 0..T {
                            // SAFETY: off + 32 <= stride <= qt[t].len().
                            let $a = unsafe { _mm256_loadu_si256(qt[t].as_ptr().add(off).cast()) };
                            for r in 0..R {
                                let $w = w[r];
                                if $widen {
                                    let $p = part[r][t];
                                    part[r][t] = $mac;
                                } else {
                                    let $p = acc[r][t];
                                    acc[r][t] = $mac;
                                }
                            }
                        }
                    }
                    if $widen {
                        for r in 0..R {
                            for t in 0..T {
                                acc[r][t] = _mm256_add_epi32(
                                    acc[r][t],
                                    _mm256_madd_epi16(part[r][t], $ones),
                                );
                            }
                        }
                    }
                }
                for r in 0..R {
                    for t in 0..T {
                        let v = acc[r][t];
                        let s = _mm_add_epi32(
                            _mm256_castsi256_si128(v),
                            _mm256_extracti128_si256::<1>(v),
                        );
                        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
                        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
                        out[r * ldo + tile * T + t] = _mm_cvtsi128_si32(s);
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
tile!(tile_avx2, "avx2", true, |p, w, a, ones| _mm256_add_epi16(
    p,
    _mm256_maddubs_epi16(w, a)
));
#[cfg(target_arch = "x86_64")]
tile!(tile_avxvnni, "avx2,avxvnni", false, |p, w, a, ones| {
    _mm256_dpbusd_avx_epi32(p, w, a)
});
#[cfg(target_arch = "x86_64")]
tile!(
    tile_avx512vnni,
    "avx2,avx512f,avx512vl,avx512vnni",
    false,
    |p, w, a, ones| _mm256_dpbusd_epi32(p, w, a)
);
// The direct-i32 body with AVX2 instructions: the body the VNNI tiles use,
// tested on any AVX2 machine (a CPU without VNNI cannot run theirs).
#[cfg(all(target_arch = "x86_64", test))]
tile!(tile_avx2_direct, "avx2", false, |p, w, a, ones| {
    _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones))
});

/// Which tile runs for a SIMD kernel, and its shape.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tile {
    Avx2,
    AvxVnni,
    Avx512Vnni,
}

#[cfg(target_arch = "x86_64")]
impl Tile {
    /// The tile of a SIMD kernel; none for the scalar reference.
    fn of(kernel: Kernel) -> Option<Tile> {
        match kernel {
            Kernel::Scalar => None,
            Kernel::Avx2 | Kernel::Avx512 => Some(Tile::Avx2),
            Kernel::AvxVnni => Some(Tile::AvxVnni),
            Kernel::Avx512Vnni => Some(Tile::Avx512Vnni),
        }
    }

    /// Rows unpacked together.
    fn rows(self) -> usize {
        match self {
            Tile::Avx2 | Tile::AvxVnni => 2,
            Tile::Avx512Vnni => 4,
        }
    }
}

/// `out[t][i]` = row `first + i` of `w` times token t, for the
/// `out[t].len()` rows from `first`: the unscaled exact dot Σ t·q scaled
/// by `scales[t]`, as [`Kernel::gemv`] computes each element.
pub(super) fn rows(
    kernel: Kernel,
    w: &crate::ternary::Ternary,
    first: usize,
    acts: &[Activations],
    scales: &[f32],
    out: &mut [&mut [f32]],
) {
    assert_eq!(out.len(), acts.len(), "one output slice per token");
    #[cfg(target_arch = "x86_64")]
    if let Some(tile) = Tile::of(kernel) {
        return tiled(tile, w, first, acts, scales, out);
    }
    // The reference: one dot per (row, token).
    for ((yt, a), &s) in out.iter_mut().zip(acts).zip(scales) {
        for (i, y) in yt.iter_mut().enumerate() {
            *y = kernel.dot_in(w.layout(), w.row(first + i), a) as f32 * s;
        }
    }
}

/// Unpacks rows `first..first + here` of `w` into the first `here` rows of
/// `codes` (`stride` bytes each, [`unpack_row`] or the base-3 layout's
/// [`super::base3::unpack_row`]) and zeroes the others:
/// rows past the matrix's end, whose results are dropped.
pub(super) fn unpack_group(
    w: &crate::ternary::Ternary,
    first: usize,
    here: usize,
    codes: &mut [u8],
    stride: usize,
) {
    for (r, c) in codes.chunks_exact_mut(stride).enumerate() {
        if r < here {
            crate::ternary::unpack_codes(w.layout(), w.row(first + r), c);
        } else {
            c.fill(0);
        }
    }
}

/// [`rows`] through a SIMD tile: each group of rows unpacked once.
#[cfg(target_arch = "x86_64")]
fn tiled(
    tile: Tile,
    w: &crate::ternary::Ternary,
    first: usize,
    acts: &[Activations],
    scales: &[f32],
    out: &mut [&mut [f32]],
) {
    let n = acts.len();
    let count = out[0].len();
    let stride = crate::ternary::row_bytes(w.cols()) * 4;
    let group = tile.rows();
    let mut codes = vec![0u8; group * stride];
    let mut dots = vec![0i32; group * n];
    let q: Vec<&[i8]> = acts.iter().map(|a| &a.q[..]).collect();
    for g0 in (0..count).step_by(group) {
        let here = group.min(count - g0);
        unpack_group(w, first + g0, here, &mut codes, stride);
        run(tile, &codes, stride, &q, &mut dots);
        for r in 0..here {
            let d = &dots[r * n..(r + 1) * n];
            for (t, yt) in out.iter_mut().enumerate() {
                yt[g0 + r] = (d[t] - acts[t].sum) as f32 * scales[t];
            }
        }
    }
}

/// `dots[r * n + t]` = Σ code·q of row r of `codes` and token t, for the
/// tile's rows and all n = `q.len()` tokens: the widest tiles first, the
/// tokens left over one at a time.
#[cfg(target_arch = "x86_64")]
fn run(tile: Tile, codes: &[u8], stride: usize, q: &[&[i8]], dots: &mut [i32]) {
    let n = q.len();
    macro_rules! both {
        ($f:ident, $r:literal, $t:literal) => {{
            let full = n / $t * $t;
            $f::<$r, $t>(codes, stride, &q[..full], dots, n);
            $f::<$r, 1>(codes, stride, &q[full..], &mut dots[full..], n);
        }};
    }
    match tile {
        // SAFETY (the three arms): a tile is only chosen for a kernel that
        // `Kernel::available` produced after detecting the features it
        // enables; each tile asserts its slices' bounds.
        Tile::Avx2 => unsafe { both!(tile_avx2, 2, 2) },
        Tile::AvxVnni => unsafe { both!(tile_avxvnni, 2, 4) },
        Tile::Avx512Vnni => unsafe { both!(tile_avx512vnni, 4, 4) },
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::ternary::{Ternary, row_bytes};

    /// Σ code·q of one unpacked row, the plain way.
    fn codes_dot(codes: &[u8], q: &[i8]) -> i32 {
        codes
            .iter()
            .zip(q)
            .map(|(&c, &a)| i32::from(c) * i32::from(a))
            .sum()
    }

    fn case(rows: usize, cols: usize, seed: usize) -> (Vec<u8>, usize, Vec<Vec<i8>>) {
        let trits: Vec<i8> = (0..rows * cols)
            .map(|i| ((i * 31 + i / 7 + seed) % 3) as i8 - 1)
            .collect();
        let t = Ternary::from_trits(rows, cols, &trits, 1.0);
        let stride = row_bytes(cols) * 4;
        let mut codes = vec![0u8; rows * stride];
        for (r, c) in codes.chunks_exact_mut(stride).enumerate() {
            unpack_row_plain(t.row(r), c);
            for (col, &code) in c.iter().enumerate() {
                let want = if col < cols { t.get(r, col) + 1 } else { 1 };
                assert_eq!(code as i8, want, "row {r} col {col}");
            }
            let mut simd = vec![0u8; stride];
            unpack_row(t.row(r), &mut simd);
            assert_eq!(&simd[..], &c[..], "unpack_row row {r}");
        }
        let q: Vec<Vec<i8>> = (0..8)
            .map(|k| {
                (0..stride)
                    .map(|i| match (i * 13 + k * 7 + seed) % 11 {
                        0 => -128,
                        1 => 127,
                        v => (v as i8 - 5) * 23,
                    })
                    .collect()
            })
            .collect();
        (codes, stride, q)
    }

    /// Every tile body, at the shapes the kernels use and a few more,
    /// against the plain loops; extreme activations (−128, 127) included.
    #[test]
    fn tiles_match_the_plain_loops() {
        use std::arch::is_x86_feature_detected as has;
        if !has!("avx2") {
            eprintln!("SKIP tiles_match_the_plain_loops: this CPU has no AVX2");
            return;
        }
        for cols in [128, 300, 2560] {
            let (codes, stride, q) = case(4, cols, cols);
            let qs: Vec<&[i8]> = q.iter().map(|v| &v[..]).collect();
            let n = qs.len();
            let plain = |r: usize, t: usize| codes_dot(&codes[r * stride..(r + 1) * stride], qs[t]);
            macro_rules! check {
                ($f:ident, $r:literal, $t:literal) => {{
                    let mut got = vec![0i32; $r * n];
                    // SAFETY: the caller checked the features $f enables.
                    unsafe { $f::<$r, $t>(&codes, stride, &qs, &mut got, n) };
                    for r in 0..$r {
                        for t in 0..n {
                            assert_eq!(
                                got[r * n + t],
                                plain(r, t),
                                "{} R={} T={} cols {cols} row {r} token {t}",
                                stringify!($f),
                                $r,
                                $t
                            );
                        }
                    }
                }};
            }
            check!(tile_avx2, 2, 2);
            check!(tile_avx2, 2, 1);
            check!(tile_avx2, 4, 4);
            check!(tile_avx2_direct, 4, 4);
            check!(tile_avx2_direct, 2, 4);
            check!(tile_avx2_direct, 4, 1);
            if has!("avxvnni") {
                check!(tile_avxvnni, 2, 4);
                check!(tile_avxvnni, 2, 1);
            }
            if has!("avx512f") && has!("avx512vl") && has!("avx512vnni") {
                check!(tile_avx512vnni, 4, 4);
                check!(tile_avx512vnni, 4, 1);
            }
        }
    }
}
