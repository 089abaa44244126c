//! Kernels for the 1.6-bit base-3 layout ([`Layout::Base3`]: five trits a
//! byte as TQ1_0 stores them; byte m of a row's 64-byte group g holds, in
//! digit i, the weight 320g + 64i + m).
//!
//! A row of 2560 weights is 512 bytes instead of I2_S's 640, so decode
//! reads 20% fewer weight bytes per token; in exchange each code costs more
//! to unpack than a shift and a mask. Digit i of byte b is
//! ((b·3ⁱ mod 256)·3) >> 8, and the kernels get it two ways:
//!
//! - By table lookup ([`dot_codes_vbmi`], AVX512-VBMI + VNNI): for each
//!   digit, a 256-entry byte table in four 512-bit registers;
//!   `vpermi2b` looks up the low 7 bits of 64 bytes in two of them at
//!   once, twice, and the byte's top bit picks between the two results
//!   (`vpblendmb` on `vpmovb2m`'s mask): three instructions per 64 codes.
//!   The 64 codes of a digit multiply 64 consecutive activations in one
//!   512-bit `vpdpbusd`.
//! - By byte compares where there is no byte permute (AVX2, AVX-VNNI, and
//!   [`dot_codes_cmp`] for AVX-512 without VBMI): with y = b·3ⁱ mod 256
//!   (the next digit's y is 3y, two byte adds), digit i is
//!   ⌊3y/256⌋ = [y ≥ 86] + [y ≥ 171], two compares.
//!
//! [`unpack_row`] (the batched GEMM's one unpack per row, by compares) and
//! [`dot_codes_plain`] (the reference, by the multiply) agree; every kernel
//! gives the reference's i32 exactly.
//!
//! [`Layout::Base3`]: crate::ternary::Layout::Base3
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::ternary::{GROUP, GROUP_BYTES, PLANE, POW3, base3_digit};

/// Σ (t+1)·q over a base-3 row and its activations: `q.len() / 64`
/// planes, `row.len()` ≥ ⌈planes/5⌉·64 bytes. The reference.
pub fn dot_codes_plain(row: &[u8], q: &[i8]) -> i32 {
    let planes = q.len() / PLANE;
    assert!(
        row.len() >= planes.div_ceil(5) * GROUP_BYTES,
        "base-3 row too short"
    );
    let mut sum = 0i32;
    for p in 0..planes {
        let (g, i) = (p / 5, p % 5);
        let bytes = &row[g * GROUP_BYTES..(g + 1) * GROUP_BYTES];
        for (m, &b) in bytes.iter().enumerate() {
            sum += i32::from(base3_digit(b, i)) * i32::from(q[p * PLANE + m]);
        }
    }
    sum
}

/// One code byte per weight, in column order, from a base-3 row:
/// `codes.len()` is the row's padded width (`planes` × 64).
pub fn unpack_row(row: &[u8], codes: &mut [u8]) {
    assert!(
        row.len() >= (codes.len() / PLANE).div_ceil(5) * GROUP_BYTES,
        "base-3 row too short for {} codes",
        codes.len()
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected; the lengths are checked above.
        return unsafe { unpack_row_avx2(row, codes) };
    }
    unpack_row_plain(row, codes);
}

/// The reference copy of [`unpack_row`].
pub fn unpack_row_plain(row: &[u8], codes: &mut [u8]) {
    for (p, plane) in codes.chunks_exact_mut(PLANE).enumerate() {
        let (g, i) = (p / 5, p % 5);
        for (m, c) in plane.iter_mut().enumerate() {
            *c = base3_digit(row[g * GROUP_BYTES + m], i);
        }
    }
}

/// The codes of one digit of 32 base-3 bytes, from `$y` = b·3ⁱ mod 256
/// (AVX2): digit = [y ≥ 86] + [y ≥ 171], as signed compares of y − 128
/// (y − 128 > −43 and > 42; all-ones lanes, so the digit is |m1 + m2|).
#[cfg(target_arch = "x86_64")]
macro_rules! digit256 {
    ($y:expr) => {{
        let ys = _mm256_xor_si256($y, _mm256_set1_epi8(-128));
        let m1 = _mm256_cmpgt_epi8(ys, _mm256_set1_epi8(-43));
        let m2 = _mm256_cmpgt_epi8(ys, _mm256_set1_epi8(42));
        _mm256_abs_epi8(_mm256_add_epi8(m1, m2))
    }};
}

/// y·3 mod 256 in every byte: the next digit's y.
#[cfg(target_arch = "x86_64")]
macro_rules! times3 {
    ($y:expr) => {{ _mm256_add_epi8($y, _mm256_add_epi8($y, $y)) }};
}

/// [`unpack_row`] with AVX2 byte compares.
///
/// # Safety
/// The CPU must support AVX2; `row` holds ⌈planes/5⌉ groups for the
/// `codes.len() / 64` planes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn unpack_row_avx2(row: &[u8], codes: &mut [u8]) {
    let planes = codes.len() / PLANE;
    assert!(row.len() >= planes.div_ceil(5) * GROUP_BYTES);
    for g in 0..planes.div_ceil(5) {
        let here = (planes - 5 * g).min(5);
        for h in 0..2 {
            // SAFETY: byte 64g + 32h + 31 < ⌈planes/5⌉·64 ≤ row.len(), and
            // code 64(5g + i) + 32h + 31 < planes·64 ≤ codes.len() for
            // i < here; unaligned loads and stores.
            unsafe {
                let mut y = _mm256_loadu_si256(row.as_ptr().add(g * GROUP_BYTES + 32 * h).cast());
                let out = codes.as_mut_ptr().add(g * GROUP + 32 * h);
                for i in 0..here {
                    if i > 0 {
                        y = times3!(y);
                    }
                    _mm256_storeu_si256(out.add(PLANE * i).cast(), digit256!(y));
                }
            }
        }
    }
}

/// Σ (t+1)·q with AVX2 byte compares and `vpmaddubsw` (codes ≤ 2, so a
/// pair is ≤ 512 and a group's ten summed ≤ 5,120 in i16), widened once a
/// group. Also the AVX512-BW kernel's.
///
/// # Safety
/// The CPU must support AVX2; `row` holds ⌈planes/5⌉ groups for the
/// `q.len() / 64` planes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dot_codes_avx2(row: &[u8], q: &[i8]) -> i32 {
    let planes = q.len() / PLANE;
    assert!(row.len() >= planes.div_ceil(5) * GROUP_BYTES);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_si256();
    for g in 0..planes.div_ceil(5) {
        let here = (planes - 5 * g).min(5);
        let mut s = _mm256_setzero_si256();
        for h in 0..2 {
            // SAFETY: group g's 64 bytes are in `row` and planes
            // 5g..5g + here are in `q` (asserted above); unaligned loads.
            unsafe {
                let mut y = _mm256_loadu_si256(row.as_ptr().add(g * GROUP_BYTES + 32 * h).cast());
                let qp = q.as_ptr().add(g * GROUP + 32 * h);
                for i in 0..here {
                    if i > 0 {
                        y = times3!(y);
                    }
                    let a = _mm256_loadu_si256(qp.add(PLANE * i).cast());
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(digit256!(y), a));
                }
            }
        }
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s, ones));
    }
    hsum256(acc)
}

/// Σ (t+1)·q with AVX2 byte compares and AVX-VNNI's `vpdpbusd` into i32.
///
/// # Safety
/// The CPU must support AVX2 and AVX-VNNI; `row` holds ⌈planes/5⌉ groups
/// for the `q.len() / 64` planes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avxvnni")]
pub(super) unsafe fn dot_codes_avxvnni(row: &[u8], q: &[i8]) -> i32 {
    let planes = q.len() / PLANE;
    assert!(row.len() >= planes.div_ceil(5) * GROUP_BYTES);
    let mut acc = [_mm256_setzero_si256(); 2];
    for g in 0..planes.div_ceil(5) {
        let here = (planes - 5 * g).min(5);
        for (h, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as in `dot_codes_avx2`.
            unsafe {
                let mut y = _mm256_loadu_si256(row.as_ptr().add(g * GROUP_BYTES + 32 * h).cast());
                let qp = q.as_ptr().add(g * GROUP + 32 * h);
                for i in 0..here {
                    if i > 0 {
                        y = times3!(y);
                    }
                    let a = _mm256_loadu_si256(qp.add(PLANE * i).cast());
                    *acc = _mm256_dpbusd_avx_epi32(*acc, digit256!(y), a);
                }
            }
        }
    }
    hsum256(_mm256_add_epi32(acc[0], acc[1]))
}

/// The sum of eight i32 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn hsum256(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// Two 256-entry byte tables, 64 entries a register (`TABLES[j][k]` is
/// entries 64k..64k + 64): table 0 maps a base-3 byte to its digit 0;
/// table 1 to its digits 1..=4 as four 2-bit codes, digit 1 in bits 7:6
/// (the I2_S byte of those four codes).
const TABLES: [[[u8; 64]; 4]; 2] = {
    let mut t = [[[0u8; 64]; 4]; 2];
    let mut b = 0;
    while b < 256 {
        let mut d = [0u8; 5];
        let mut i = 0;
        while i < 5 {
            let y = (b as u8).wrapping_mul(POW3[i]) as u16;
            d[i] = ((y * 3) >> 8) as u8;
            i += 1;
        }
        t[0][b / 64][b % 64] = d[0];
        t[1][b / 64][b % 64] = (d[1] << 6) | (d[2] << 4) | (d[3] << 2) | d[4];
        b += 1;
    }
    t
};

/// Whether this CPU runs [`dot_codes_vbmi`].
pub fn has_vbmi() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512bw") && has!("avx512vbmi") && has!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Σ (t+1)·q with AVX512-VBMI table lookups and 512-bit `vpdpbusd`, one
/// accumulator per digit. Two lookups per 64 bytes: digit 0, and digits
/// 1..=4 as an I2_S-style byte that shifts and masks take apart (ALU
/// work, where a lookup per digit would queue on the shuffle unit).
///
/// # Safety
/// The CPU must support AVX512F, AVX512BW, AVX512-VBMI and AVX512-VNNI
/// ([`has_vbmi`]); `row` holds ⌈planes/5⌉ groups for the `q.len() / 64`
/// planes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni")]
pub(super) unsafe fn dot_codes_vbmi(row: &[u8], q: &[i8]) -> i32 {
    let planes = q.len() / PLANE;
    assert!(row.len() >= planes.div_ceil(5) * GROUP_BYTES);
    // SAFETY: each table row is 64 bytes; unaligned loads.
    let t: [[__m512i; 4]; 2] = std::array::from_fn(|j| {
        std::array::from_fn(|k| unsafe { _mm512_loadu_si512(TABLES[j][k].as_ptr().cast()) })
    });
    let mask = _mm512_set1_epi8(3);
    let lookup = |j: usize, w: __m512i, top: __mmask64| {
        let lo = _mm512_permutex2var_epi8(t[j][0], w, t[j][1]);
        let hi = _mm512_permutex2var_epi8(t[j][2], w, t[j][3]);
        _mm512_mask_blend_epi8(top, lo, hi)
    };
    let codes = |w: __m512i| {
        let top = _mm512_movepi8_mask(w);
        let rest = lookup(1, w, top);
        [
            lookup(0, w, top),
            _mm512_and_si512(_mm512_srli_epi16::<6>(rest), mask),
            _mm512_and_si512(_mm512_srli_epi16::<4>(rest), mask),
            _mm512_and_si512(_mm512_srli_epi16::<2>(rest), mask),
            _mm512_and_si512(rest, mask),
        ]
    };
    let mut acc = [_mm512_setzero_si512(); 5];
    let full = planes / 5;
    for g in 0..full {
        // SAFETY: group g < full is in `row` and its five planes in `q`
        // (asserted above); unaligned loads.
        unsafe {
            let c = codes(_mm512_loadu_si512(row.as_ptr().add(g * GROUP_BYTES).cast()));
            let qp = q.as_ptr().add(g * GROUP);
            for (i, acc) in acc.iter_mut().enumerate() {
                let a = _mm512_loadu_si512(qp.add(PLANE * i).cast());
                *acc = _mm512_dpbusd_epi32(*acc, c[i], a);
            }
        }
    }
    let here = planes - 5 * full;
    if here > 0 {
        // SAFETY: the last, partial group is in `row` (⌈planes/5⌉ groups)
        // and its `here` planes in `q`.
        unsafe {
            let c = codes(_mm512_loadu_si512(
                row.as_ptr().add(full * GROUP_BYTES).cast(),
            ));
            let qp = q.as_ptr().add(full * GROUP);
            for (i, acc) in acc.iter_mut().enumerate().take(here) {
                let a = _mm512_loadu_si512(qp.add(PLANE * i).cast());
                *acc = _mm512_dpbusd_epi32(*acc, c[i], a);
            }
        }
    }
    let sum = _mm512_add_epi32(
        _mm512_add_epi32(
            _mm512_add_epi32(acc[0], acc[1]),
            _mm512_add_epi32(acc[2], acc[3]),
        ),
        acc[4],
    );
    _mm512_reduce_add_epi32(sum)
}

/// Σ (t+1)·q with AVX-512 byte compares, 512 bits, for AVX512-VNNI CPUs
/// without VBMI: digit = [y ≥ 86] + [y ≥ 171] (two `vpcmpub` into masks,
/// a zero-masked move of ones and a masked add of ones).
///
/// # Safety
/// The CPU must support AVX512F, AVX512BW, AVX512VL and AVX512-VNNI;
/// `row` holds ⌈planes/5⌉ groups for the `q.len() / 64` planes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn dot_codes_cmp(row: &[u8], q: &[i8]) -> i32 {
    let planes = q.len() / PLANE;
    assert!(row.len() >= planes.div_ceil(5) * GROUP_BYTES);
    let one = _mm512_set1_epi8(1);
    let (t1, t2) = (_mm512_set1_epi8(86), _mm512_set1_epi8(171u8 as i8));
    let mut acc = [_mm512_setzero_si512(); 5];
    let groups = planes.div_ceil(5);
    for g in 0..groups {
        let here = (planes - 5 * g).min(5);
        // SAFETY: group g is in `row` and its `here` planes in `q`
        // (asserted above); unaligned loads.
        unsafe {
            let mut y = _mm512_loadu_si512(row.as_ptr().add(g * GROUP_BYTES).cast());
            let qp = q.as_ptr().add(g * GROUP);
            for (i, acc) in acc.iter_mut().enumerate().take(here) {
                if i > 0 {
                    y = _mm512_add_epi8(y, _mm512_add_epi8(y, y));
                }
                let k1 = _mm512_cmpge_epu8_mask(y, t1);
                let k2 = _mm512_cmpge_epu8_mask(y, t2);
                let c = _mm512_maskz_mov_epi8(k1, one);
                let c = _mm512_mask_add_epi8(c, k2, c, one);
                let a = _mm512_loadu_si512(qp.add(PLANE * i).cast());
                *acc = _mm512_dpbusd_epi32(*acc, c, a);
            }
        }
    }
    let sum = _mm512_add_epi32(
        _mm512_add_epi32(
            _mm512_add_epi32(acc[0], acc[1]),
            _mm512_add_epi32(acc[2], acc[3]),
        ),
        acc[4],
    );
    _mm512_reduce_add_epi32(sum)
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::ternary::{Layout, Ternary};

    fn rows_and_acts(cols: usize, seed: usize) -> (Ternary, Vec<i8>) {
        let trits: Vec<i8> = (0..3 * cols)
            .map(|i| (((i * 2654435761usize + seed) >> 7) % 3) as i8 - 1)
            .collect();
        let t = Ternary::from_trits(3, cols, &trits, 1.0).to_layout(Layout::Base3);
        let padded = cols.div_ceil(128) * 128;
        let mut q: Vec<i8> = (0..padded)
            .map(|i| ((i * 97 + seed * 13) % 256) as u8 as i8)
            .collect();
        // Extremes included; the padding is zero as Activations makes it.
        q[0] = -128;
        q[1] = 127;
        q[cols..].fill(0);
        (t, q)
    }

    /// The reference against the I2_S reference on the same weights.
    #[test]
    fn the_reference_equals_the_i2s_reference() {
        for cols in [1, 64, 128, 320, 640, 2560, 6912, 1000] {
            let (t, q) = rows_and_acts(cols, cols);
            let i2s = t.to_layout(Layout::I2s);
            for r in 0..3 {
                assert_eq!(
                    dot_codes_plain(t.row(r), &q),
                    super::super::scalar::dot_codes(i2s.row(r), &q),
                    "{cols} cols, row {r}"
                );
            }
        }
    }

    #[test]
    fn every_simd_kernel_and_the_unpack_equal_the_reference_bit_for_bit() {
        use std::arch::is_x86_feature_detected as has;
        let mut ran = vec!["plain"];
        for cols in [1, 64, 128, 320, 384, 640, 1000, 2560, 6912] {
            for seed in 0..3 {
                let (t, q) = rows_and_acts(cols, seed);
                for r in 0..3 {
                    let row = t.row(r);
                    let want = dot_codes_plain(row, &q);
                    let mut plain = vec![0u8; q.len()];
                    unpack_row_plain(row, &mut plain);
                    if has!("avx2") {
                        // SAFETY: AVX2 detected.
                        assert_eq!(unsafe { dot_codes_avx2(row, &q) }, want, "avx2 {cols}");
                        let mut simd = vec![9u8; q.len()];
                        // SAFETY: AVX2 detected; sizes as unpack_row checks.
                        unsafe { unpack_row_avx2(row, &mut simd) };
                        assert_eq!(simd, plain, "unpack {cols}");
                        ran.push("avx2");
                    }
                    if has!("avx2") && has!("avxvnni") {
                        // SAFETY: AVX2 and AVX-VNNI detected.
                        assert_eq!(
                            unsafe { dot_codes_avxvnni(row, &q) },
                            want,
                            "avx-vnni {cols}"
                        );
                        ran.push("avx-vnni");
                    }
                    if has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
                        // SAFETY: the features they enable were detected.
                        assert_eq!(unsafe { dot_codes_cmp(row, &q) }, want, "cmp {cols}");
                        ran.push("cmp");
                    }
                    if has_vbmi() {
                        // SAFETY: has_vbmi checked every feature it enables.
                        assert_eq!(unsafe { dot_codes_vbmi(row, &q) }, want, "vbmi {cols}");
                        ran.push("vbmi");
                    }
                }
            }
        }
        ran.sort_unstable();
        ran.dedup();
        eprintln!("base-3 kernels compared with the reference: {ran:?}");
    }
}
