//! Hugging Face's packed ternary layout (BITNET.md §2a): a logical
//! [out, in] matrix stored as u8 [out/4, in]; with R = out/4, byte [r, c]
//! holds rows r, r+R, r+2R, r+3R at column c in bits 1:0, 3:2, 5:4, 7:6
//! (least significant first); code = weight + 1.

use super::{Error, check_size};
use crate::ternary::{Ternary, ZERO_BYTE, position, row_bytes};

const FORMAT: &str = "Hugging Face packed u8";

fn check_shape(rows: usize, cols: usize) -> Result<(), Error> {
    if rows.is_multiple_of(4) {
        Ok(())
    } else {
        Err(Error::Shape {
            format: FORMAT,
            what: "a multiple of 4 output rows",
            rows,
            cols,
        })
    }
}

/// Packs `t` into [rows/4, cols] bytes.
pub fn encode(t: &Ternary) -> Result<Vec<u8>, Error> {
    let (rows, cols) = (t.rows(), t.cols());
    check_shape(rows, cols)?;
    let r4 = rows / 4;
    let mut out = vec![0u8; r4 * cols];
    for i in 0..4 {
        for r in 0..r4 {
            for c in 0..cols {
                out[r * cols + c] |= ((t.get(i * r4 + r, c) + 1) as u8) << (2 * i);
            }
        }
    }
    Ok(out)
}

/// Unpacks [rows/4, cols] bytes into a `rows` x `cols` matrix with scale `beta`.
pub fn decode(bytes: &[u8], rows: usize, cols: usize, beta: f32) -> Result<Ternary, Error> {
    check_shape(rows, cols)?;
    let r4 = rows / 4;
    check_size(FORMAT, rows, cols, r4 * cols, bytes.len())?;
    let beta = super::check_scale(beta)?;
    let rb = row_bytes(cols);
    // Written straight into Trine's layout (a code of 1 is weight 0).
    let mut data = vec![ZERO_BYTE; rows * rb];
    for r in 0..r4 {
        for c in 0..cols {
            let byte = bytes[r * cols + c];
            let (pos, shift) = position(c);
            for i in 0..4 {
                let code = (byte >> (2 * i)) & 3;
                if code == 3 {
                    return Err(Error::NotTernary {
                        format: FORMAT,
                        index: (i * r4 + r) * cols + c,
                        code,
                    });
                }
                let at = (i * r4 + r) * rb + pos;
                data[at] = (data[at] & !(3 << shift)) | (code << shift);
            }
        }
    }
    Ok(Ternary::from_packed(rows, cols, beta, data.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitnet_md_one_column_example() {
        let t = Ternary::from_trits(8, 1, &[-1, 0, 1, 0, 1, 1, -1, 0], 1.0);
        assert_eq!(encode(&t).unwrap(), vec![0x28, 0x65]);
        assert_eq!(decode(&[0x28, 0x65], 8, 1, 1.0).unwrap(), t);
    }

    #[test]
    fn code_3_is_refused() {
        assert!(matches!(
            decode(&[0xFF], 4, 1, 1.0),
            Err(Error::NotTernary { code: 3, .. })
        ));
        assert!(matches!(
            decode(&[0x55], 3, 1, 1.0),
            Err(Error::Shape { .. })
        ));
    }
}
