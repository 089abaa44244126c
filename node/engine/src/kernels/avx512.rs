//! AVX-512 kernels.
//!
//! - [`dot_codes_vnni`] (AVX512-VNNI): `vpdpbusd` multiplies u8 codes by i8
//!   activations and adds groups of four straight into i32 lanes: no i16
//!   stage at all, so nothing can saturate. It runs at 256 bits (EVEX),
//!   one 128-weight block per step: faster than 512 bits where measured
//!   (see the function).
//! - [`dot_codes_bw`] (AVX512-BW without VNNI): two 128-weight blocks per
//!   512-bit step. The 64 code bytes of blocks b and b+1 are shifted by
//!   6/4/2/0 and masked into four vectors whose low half holds block b's
//!   codes and high half block b+1's; the matching activations are two
//!   32-byte loads joined. `vpmaddubsw` as in the AVX2 kernel (|pair| ≤
//!   512, four summed ≤ 2048 in i16), widened every step. An odd last block
//!   runs at 256 bits with the same instructions (VL).
#![allow(unsafe_code)]

use std::arch::x86_64::*;

/// Two 32-byte activation runs, 128 apart, as one 512-bit vector.
///
/// # Safety
/// `p` and `p + 128` must each have 32 readable bytes; AVX512F.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn pair(p: *const i8) -> __m512i {
    // SAFETY: the caller guarantees both 32-byte reads are in bounds.
    unsafe {
        let lo = _mm256_loadu_si256(p.cast());
        let hi = _mm256_loadu_si256(p.add(128).cast());
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    }
}

/// Σ (t+1)·q with AVX512-VNNI. `row.len() * 4 == q.len()`, whole blocks.
///
/// `vpdpbusd` at 256 bits (the EVEX form, AVX512VL), one block per step
/// with four independent accumulator chains: each 32-byte activation run
/// is one plain load. The 512-bit form needs two runs 128 apart joined
/// across lanes for every `vpdpbusd` (`vinserti64x4`, a shuffle-port uop);
/// on Zen 4 it measured 1.2–1.7× slower than this one (BENCHMARKS.md).
///
/// # Safety
/// The CPU must support AVX512F, AVX512BW, AVX512VL and AVX512-VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn dot_codes_vnni(row: &[u8], q: &[i8]) -> i32 {
    let blocks = row.len() / 32;
    assert!(q.len() >= blocks * 128);
    let mask = _mm256_set1_epi8(3);
    let mut acc = [_mm256_setzero_si256(); 4];
    for b in 0..blocks {
        // SAFETY: b < blocks, so the 32 code bytes at 32b and the 128
        // activations at 128b are in bounds (asserted above); loadu has no
        // alignment requirement.
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
                acc[g] = _mm256_dpbusd_epi32(acc[g], c[g], a);
            }
        }
    }
    let sum = _mm256_add_epi32(
        _mm256_add_epi32(acc[0], acc[1]),
        _mm256_add_epi32(acc[2], acc[3]),
    );
    _mm512_reduce_add_epi32(_mm512_zextsi256_si512(sum))
}

/// Σ (t+1)·q with AVX512-BW. `row.len() * 4 == q.len()`, whole blocks.
///
/// # Safety
/// The CPU must support AVX512F, AVX512BW and AVX512VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn dot_codes_bw(row: &[u8], q: &[i8]) -> i32 {
    let blocks = row.len() / 32;
    assert!(q.len() >= blocks * 128);
    let mask = _mm512_set1_epi8(3);
    let ones = _mm512_set1_epi16(1);
    let mut acc = _mm512_setzero_si512();
    for p in 0..blocks / 2 {
        // SAFETY: as in `dot_codes_vnni`.
        unsafe {
            let w = _mm512_loadu_si512(row.as_ptr().add(64 * p).cast());
            let qp = q.as_ptr().add(256 * p);
            let p0 =
                _mm512_maddubs_epi16(_mm512_and_si512(_mm512_srli_epi16::<6>(w), mask), pair(qp));
            let p1 = _mm512_maddubs_epi16(
                _mm512_and_si512(_mm512_srli_epi16::<4>(w), mask),
                pair(qp.add(32)),
            );
            let p2 = _mm512_maddubs_epi16(
                _mm512_and_si512(_mm512_srli_epi16::<2>(w), mask),
                pair(qp.add(64)),
            );
            let p3 = _mm512_maddubs_epi16(_mm512_and_si512(w, mask), pair(qp.add(96)));
            let s = _mm512_add_epi16(_mm512_add_epi16(p0, p1), _mm512_add_epi16(p2, p3));
            acc = _mm512_add_epi32(acc, _mm512_madd_epi16(s, ones));
        }
    }
    let mut total = _mm512_reduce_add_epi32(acc);
    if blocks % 2 == 1 {
        let b = blocks - 1;
        // SAFETY: block b is the last whole block of both slices.
        unsafe {
            let w = _mm256_loadu_si256(row.as_ptr().add(32 * b).cast());
            let qp = q.as_ptr().add(128 * b);
            let m = _mm256_set1_epi8(3);
            let p0 = _mm256_maddubs_epi16(
                _mm256_and_si256(_mm256_srli_epi16::<6>(w), m),
                _mm256_loadu_si256(qp.cast()),
            );
            let p1 = _mm256_maddubs_epi16(
                _mm256_and_si256(_mm256_srli_epi16::<4>(w), m),
                _mm256_loadu_si256(qp.add(32).cast()),
            );
            let p2 = _mm256_maddubs_epi16(
                _mm256_and_si256(_mm256_srli_epi16::<2>(w), m),
                _mm256_loadu_si256(qp.add(64).cast()),
            );
            let p3 = _mm256_maddubs_epi16(
                _mm256_and_si256(w, m),
                _mm256_loadu_si256(qp.add(96).cast()),
            );
            let s = _mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3));
            let wide = _mm256_madd_epi16(s, _mm256_set1_epi16(1));
            total += _mm512_reduce_add_epi32(_mm512_zextsi256_si512(wide));
        }
    }
    total
}
