//! ggml's ternary types (BITNET.md §2c), 256 weights per block, an f16
//! scale d last in each block, value = d·trit:
//!
//! - TQ2_0, 66 bytes: `qs[64]`, d. Weight 128h + 32l + m sits in
//!   `qs[32h + m]`, bits 2l+1:2l (least significant first); code = trit + 1.
//! - TQ1_0, 54 bytes: `qs[48]`, `qh[4]`, d. Five trits per byte in base 3
//!   (`qs[m]`, m < 32: weights m + 32n; `qs[32 + m]`, m < 16: 160 + m + 16n;
//!   `qh[j]`: 240 + j + 4n, four trits and a zero), stored as
//!   ⌈q·256/243⌉ so that trit n decodes as ((byte·3ⁿ mod 256)·3) >> 8.
//!
//! ggml gives each block its own d (its max |x|); a BitNet tensor written
//! from β·T has d = β in every block holding a non-zero weight, and d = 0 in
//! all-zero blocks, which is what [`encode_tq2`] and [`encode_tq1`] write
//! (byte-identical to gguf-py's `gguf.quants` for the same input). Decoding
//! requires that single scale.

use half::f16;

use super::{Error, check_scale, check_size};
use crate::ternary::Ternary;

/// Weights per block.
pub const QK: usize = 256;
pub const TQ2_BYTES: usize = 66;
pub const TQ1_BYTES: usize = 54;

const POW3: [u16; 6] = [1, 3, 9, 27, 81, 243];

fn check_shape(format: &'static str, rows: usize, cols: usize) -> Result<(), Error> {
    if cols.is_multiple_of(QK) {
        Ok(())
    } else {
        Err(Error::Shape {
            format,
            what: "rows of a multiple of 256 weights",
            rows,
            cols,
        })
    }
}

/// The block's scale: f16(β) if any weight is non-zero, else 0.
fn block_scale(trits: &[i8], beta: f32) -> [u8; 2] {
    let d = if trits.iter().any(|&t| t != 0) {
        f16::from_f32(beta)
    } else {
        f16::ZERO
    };
    d.to_le_bytes()
}

/// Calls `f(block trits)` for each 256-weight block, row-major.
fn encode_blocks(
    t: &Ternary,
    block_bytes: usize,
    mut f: impl FnMut(&[i8], &mut Vec<u8>),
) -> Vec<u8> {
    let mut out = Vec::with_capacity(t.rows() * t.cols() / QK * block_bytes);
    let mut trits = [0i8; QK];
    for r in 0..t.rows() {
        for b in 0..t.cols() / QK {
            for (i, v) in trits.iter_mut().enumerate() {
                *v = t.get(r, b * QK + i);
            }
            f(&trits, &mut out);
        }
    }
    out
}

pub fn encode_tq2(t: &Ternary) -> Result<Vec<u8>, Error> {
    check_shape("TQ2_0", t.rows(), t.cols())?;
    Ok(encode_blocks(t, TQ2_BYTES, |x, out| {
        let mut qs = [0u8; 64];
        for (i, &v) in x.iter().enumerate() {
            let (h, l, m) = (i / 128, (i % 128) / 32, i % 32);
            qs[32 * h + m] |= ((v + 1) as u8) << (2 * l);
        }
        out.extend_from_slice(&qs);
        out.extend_from_slice(&block_scale(x, t.beta()));
    }))
}

fn pack5(trits: impl Iterator<Item = i8>) -> u8 {
    let q = trits.fold(0u16, |q, t| q * 3 + (t + 1) as u16);
    (q * 256).div_ceil(243) as u8
}

pub fn encode_tq1(t: &Ternary) -> Result<Vec<u8>, Error> {
    check_shape("TQ1_0", t.rows(), t.cols())?;
    Ok(encode_blocks(t, TQ1_BYTES, |x, out| {
        for m in 0..32 {
            out.push(pack5((0..5).map(|n| x[m + 32 * n])));
        }
        for m in 0..16 {
            out.push(pack5((0..5).map(|n| x[160 + m + 16 * n])));
        }
        for j in 0..4 {
            // Four trits and a trailing zero-valued trit (code 0, i.e. ×3).
            let q = (0..4).fold(0u16, |q, n| q * 3 + (x[240 + j + 4 * n] + 1) as u16) * 3;
            out.push((q * 256).div_ceil(243) as u8);
        }
        out.extend_from_slice(&block_scale(x, t.beta()));
    }))
}

#[inline]
fn trit5(byte: u8, n: usize) -> u8 {
    let q = (u16::from(byte) * POW3[n]) & 0xFF;
    ((q * 3) >> 8) as u8
}

/// Decodes blocks with `codes(block, i) -> code 0..=3`, checking the scale rule.
fn decode_blocks(
    format: &'static str,
    bytes: &[u8],
    rows: usize,
    cols: usize,
    block_bytes: usize,
    code: impl Fn(&[u8], usize) -> u8,
) -> Result<Ternary, Error> {
    check_shape(format, rows, cols)?;
    let blocks_per_row = cols / QK;
    check_size(
        format,
        rows,
        cols,
        rows * blocks_per_row * block_bytes,
        bytes.len(),
    )?;
    let mut beta: Option<f32> = None;
    let mut t = Ternary::zeros(rows, cols, 0.0);
    for (b, block) in bytes.chunks_exact(block_bytes).enumerate() {
        let d = f16::from_le_bytes([block[block_bytes - 2], block[block_bytes - 1]]).to_f32();
        let (r, c0) = (b / blocks_per_row, (b % blocks_per_row) * QK);
        let mut nonzero = false;
        for i in 0..QK {
            let code = code(block, i);
            if code == 3 {
                return Err(Error::NotTernary {
                    format,
                    index: r * cols + c0 + i,
                    code,
                });
            }
            nonzero |= code != 1;
            t.set(r, c0 + i, code as i8 - 1);
        }
        if nonzero {
            match beta {
                None => beta = Some(check_scale(d)?),
                Some(expected) if expected.to_bits() != d.to_bits() => {
                    return Err(Error::MixedScales {
                        format,
                        block: b,
                        expected,
                        found: d,
                    });
                }
                Some(_) => {}
            }
        }
    }
    Ok(t.with_beta(beta.unwrap_or(0.0)))
}

pub fn decode_tq2(bytes: &[u8], rows: usize, cols: usize) -> Result<Ternary, Error> {
    decode_blocks("TQ2_0", bytes, rows, cols, TQ2_BYTES, |qs, i| {
        let (h, l, m) = (i / 128, (i % 128) / 32, i % 32);
        (qs[32 * h + m] >> (2 * l)) & 3
    })
}

pub fn decode_tq1(bytes: &[u8], rows: usize, cols: usize) -> Result<Ternary, Error> {
    decode_blocks("TQ1_0", bytes, rows, cols, TQ1_BYTES, |b, i| match i {
        0..160 => trit5(b[i % 32], i / 32),
        160..240 => trit5(b[32 + (i - 160) % 16], (i - 160) / 16),
        _ => trit5(b[48 + (i - 240) % 4], (i - 240) / 4),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitnet_md_zero_blocks() {
        let z = Ternary::zeros(1, 256, 1.0);
        let tq2 = encode_tq2(&z).unwrap();
        assert_eq!(&tq2[..64], &[0x55; 64]);
        assert_eq!(&tq2[64..], &[0, 0]);
        let tq1 = encode_tq1(&z).unwrap();
        assert_eq!(&tq1[..48], &[0x80; 48]);
        assert_eq!(&tq1[48..52], &[0x7F; 4]);
    }

    #[test]
    fn every_five_trit_tuple_decodes_exactly() {
        for q in 0..243u16 {
            let trits: Vec<u8> = (0..5).map(|n| ((q / POW3[4 - n]) % 3) as u8).collect();
            let byte = pack5(trits.iter().map(|&t| t as i8 - 1));
            let back: Vec<u8> = (0..5).map(|n| trit5(byte, n)).collect();
            assert_eq!(back, trits, "q={q}");
        }
    }

    #[test]
    fn mixed_scales_and_bad_codes_are_refused() {
        let mut t = Ternary::zeros(1, 512, 0.5);
        t.set(0, 0, 1);
        t.set(0, 300, -1);
        let mut bytes = encode_tq2(&t).unwrap();
        assert_eq!(decode_tq2(&bytes, 1, 512).unwrap(), t);
        bytes[66 + 64..66 + 66].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        assert!(matches!(
            decode_tq2(&bytes, 1, 512),
            Err(Error::MixedScales { block: 1, .. })
        ));
        let mut bytes = encode_tq2(&t).unwrap();
        bytes[5] = 0xFF;
        assert!(matches!(
            decode_tq2(&bytes, 1, 512),
            Err(Error::NotTernary { .. })
        ));
        assert!(matches!(
            decode_tq1(&[0; 53], 1, 256),
            Err(Error::Size { .. })
        ));
        assert!(matches!(
            encode_tq1(&Ternary::zeros(1, 128, 1.0)),
            Err(Error::Shape { .. })
        ));
    }
}
