//! AVX2 kernel (bitnet.cpp's I2_S scheme, BITNET.md §3.1): per 128-weight
//! block, shift the 32 code bytes by 6/4/2/0 and mask to get four vectors of
//! u8 codes, `vpmaddubsw` them against the matching 32 int8 activations
//! (|pair sum| ≤ 2·2·128 = 512: no i16 saturation), add the four (≤ 2048),
//! and widen to i32 with `vpmaddwd` every block — bitnet.cpp widens only
//! every 32 blocks, which can overflow i16.
//!
//! [`dot_codes_vnni`] is the same loop for CPUs with AVX-VNNI (Alder Lake
//! and later, without AVX-512): `vpdpbusd` adds u8·i8 products in groups of
//! four straight into i32 lanes.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

/// Σ (t+1)·q. `row.len() * 4 == q.len()`, both whole blocks.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dot_codes(row: &[u8], q: &[i8]) -> i32 {
    let blocks = row.len() / 32;
    assert!(q.len() >= blocks * 128);
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_si256();
    for b in 0..blocks {
        // SAFETY: b < blocks, so the 32 code bytes at 32b and the 128
        // activations at 128b are in bounds (asserted above); loadu has no
        // alignment requirement.
        unsafe {
            let w = _mm256_loadu_si256(row.as_ptr().add(32 * b).cast());
            let qp = q.as_ptr().add(128 * b);
            let c0 = _mm256_and_si256(_mm256_srli_epi16::<6>(w), mask);
            let c1 = _mm256_and_si256(_mm256_srli_epi16::<4>(w), mask);
            let c2 = _mm256_and_si256(_mm256_srli_epi16::<2>(w), mask);
            let c3 = _mm256_and_si256(w, mask);
            let p0 = _mm256_maddubs_epi16(c0, _mm256_loadu_si256(qp.cast()));
            let p1 = _mm256_maddubs_epi16(c1, _mm256_loadu_si256(qp.add(32).cast()));
            let p2 = _mm256_maddubs_epi16(c2, _mm256_loadu_si256(qp.add(64).cast()));
            let p3 = _mm256_maddubs_epi16(c3, _mm256_loadu_si256(qp.add(96).cast()));
            let s = _mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s, ones));
        }
    }
    hsum(acc)
}

/// Σ (t+1)·q with AVX-VNNI. `row.len() * 4 == q.len()`, both whole blocks.
///
/// # Safety
/// The CPU must support AVX2 and AVX-VNNI.
#[target_feature(enable = "avx2,avxvnni")]
pub(super) unsafe fn dot_codes_vnni(row: &[u8], q: &[i8]) -> i32 {
    let blocks = row.len() / 32;
    assert!(q.len() >= blocks * 128);
    let mask = _mm256_set1_epi8(3);
    let mut acc = [_mm256_setzero_si256(); 4];
    for b in 0..blocks {
        // SAFETY: as in `dot_codes`.
        unsafe {
            let w = _mm256_loadu_si256(row.as_ptr().add(32 * b).cast());
            let qp = q.as_ptr().add(128 * b);
            let c = [
                _mm256_and_si256(_mm256_srli_epi16::<6>(w), mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(w), mask),
                _mm256_and_si256(_mm256_srli_epi16::<2>(w), mask),
                _mm256_and_si256(w, mask),
            ];
            for g in 0..4 {
                let a = _mm256_loadu_si256(qp.add(32 * g).cast());
                acc[g] = _mm256_dpbusd_avx_epi32(acc[g], c[g], a);
            }
        }
    }
    hsum(_mm256_add_epi32(
        _mm256_add_epi32(acc[0], acc[1]),
        _mm256_add_epi32(acc[2], acc[3]),
    ))
}

#[target_feature(enable = "avx2")]
fn hsum(v: __m256i) -> i32 {
    let lo = _mm256_castsi256_si128(v);
    let hi = _mm256_extracti128_si256::<1>(v);
    let s = _mm_add_epi32(lo, hi);
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}
