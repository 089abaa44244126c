//! I2_S, bitnet.cpp's ternary type (BITNET.md §2b): rows of 128-weight /
//! 32-byte blocks in Trine's layout, then a little-endian f32 β and 28 zero
//! bytes. Rows must be whole blocks (ne0 % 128 == 0).

use super::{Error, check_scale, check_size};
use crate::mmap::Bytes;
use crate::ternary::{BLOCK, Ternary};

const FORMAT: &str = "I2_S";
/// Bytes after the packed weights: f32 β + 28 bytes of padding.
pub const TAIL: usize = 32;

fn check_shape(rows: usize, cols: usize) -> Result<(), Error> {
    if cols.is_multiple_of(BLOCK) {
        Ok(())
    } else {
        Err(Error::Shape {
            format: FORMAT,
            what: "rows of a multiple of 128 weights",
            rows,
            cols,
        })
    }
}

/// Encodes `t` (whose rows must be whole blocks; a base-3 matrix is
/// repacked to I2_S first).
pub fn encode(t: &Ternary) -> Result<Vec<u8>, Error> {
    check_shape(t.rows(), t.cols())?;
    let i2s;
    let t = if t.layout() == crate::ternary::Layout::I2s {
        t
    } else {
        i2s = t.to_layout(crate::ternary::Layout::I2s);
        &i2s
    };
    let mut out = Vec::with_capacity(t.data().len() + TAIL);
    out.extend_from_slice(t.data());
    out.extend_from_slice(&t.beta().to_le_bytes());
    out.resize(out.len() + TAIL - 4, 0);
    Ok(out)
}

/// Decodes an I2_S tensor of `rows` x `cols` (copies the bytes).
pub fn decode(bytes: &[u8], rows: usize, cols: usize) -> Result<Ternary, Error> {
    decode_bytes(Bytes::from(bytes.to_vec()), rows, cols)
}

/// Decodes an I2_S tensor in place: the packed rows are Trine's layout, so
/// they are validated and kept where they are (a mapped file stays mapped).
pub fn decode_bytes(bytes: Bytes, rows: usize, cols: usize) -> Result<Ternary, Error> {
    check_shape(rows, cols)?;
    let packed = rows * cols / 4;
    check_size(FORMAT, rows, cols, packed + TAIL, bytes.len())?;
    let mut beta = [0u8; 4];
    beta.copy_from_slice(&bytes[packed..packed + 4]);
    let beta = check_scale(f32::from_le_bytes(beta))?;
    // Code 3 is never written; refusing it keeps every kernel's answer the
    // same (a byte with two bits set in one pair has b & b>>1 & 0x55 != 0).
    if let Some(i) = bytes[..packed]
        .iter()
        .position(|b| b & (b >> 1) & 0x55 != 0)
    {
        let g = (0..4)
            .find(|g| (bytes[i] >> (6 - 2 * g)) & 3 == 3)
            .unwrap_or(0);
        let (r, within) = (i / (cols / 4), i % (cols / 4));
        return Err(Error::NotTernary {
            format: FORMAT,
            index: r * cols + within / 32 * BLOCK + within % 32 + 32 * g,
            code: 3,
        });
    }
    Ok(Ternary::from_packed(
        rows,
        cols,
        beta,
        bytes.slice(0..packed),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitnet_md_vectors() {
        let enc = encode(&Ternary::from_trits(1, 128, &[0; 128], 0.75)).unwrap();
        // A base-3 matrix is written as the same I2_S bytes.
        let trits: Vec<i8> = (0..256).map(|i| (i * 5 % 3) as i8 - 1).collect();
        let t = Ternary::from_trits(2, 128, &trits, 0.5);
        let base3 = t.to_layout(crate::ternary::Layout::Base3);
        assert_eq!(encode(&base3).unwrap(), encode(&t).unwrap());
        assert_eq!(&enc[..32], &[0x55; 32]);
        assert_eq!(&enc[32..36], &0.75f32.to_le_bytes());
        assert_eq!(&enc[36..], &[0; 28]);
        assert_eq!(enc.len(), 128 / 4 + 32);
    }

    #[test]
    fn errors() {
        let t = Ternary::zeros(2, 100, 1.0);
        assert!(matches!(encode(&t), Err(Error::Shape { .. })));
        assert!(matches!(decode(&[0; 10], 1, 128), Err(Error::Size { .. })));
        let mut bytes = encode(&Ternary::zeros(1, 128, 1.0)).unwrap();
        bytes[32..36].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(decode(&bytes, 1, 128), Err(Error::BadScale(_))));
        // Weight 32 + 5 of the second row is code 3.
        let mut bytes = encode(&Ternary::zeros(2, 128, 1.0)).unwrap();
        bytes[32 + 5] = 0x55 | 0x30;
        assert_eq!(
            decode(&bytes, 2, 128),
            Err(Error::NotTernary {
                format: FORMAT,
                index: 128 + 37,
                code: 3
            })
        );
    }
}
