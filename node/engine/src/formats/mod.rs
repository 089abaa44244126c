//! Ternary weight encodings found in model files, each converted to and from
//! [`Ternary`](crate::ternary::Ternary) (BITNET.md §2, byte layouts [V]):
//!
//! - [`i2s`]: bitnet.cpp's I2_S (the official GGUF): Trine's own layout plus
//!   an f32 scale tail.
//! - [`tq`]: ggml's TQ2_0 (2 bits, 66 B / 256) and TQ1_0 (1.69 bits, 54 B / 256).
//! - [`hf`]: Hugging Face's packed u8 layout (4 rows R apart per byte).

pub mod hf;
pub mod i2s;
pub mod tq;

/// Why bytes do not decode to a ternary matrix. The caller names the file
/// and tensor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("{format} needs {what}, but the shape is {rows}x{cols}; re-export the model")]
    Shape {
        format: &'static str,
        what: &'static str,
        rows: usize,
        cols: usize,
    },
    #[error(
        "{format} data is {found} bytes, but a {rows}x{cols} tensor needs {expected}; the file is corrupt or mislabelled"
    )]
    Size {
        format: &'static str,
        rows: usize,
        cols: usize,
        expected: usize,
        found: usize,
    },
    #[error("its scale is {0}, not a finite positive number; the file is corrupt: re-export it")]
    BadScale(f32),
    #[error(
        "{format} block {block} has scale {found} where the tensor's other blocks have {expected}; Trine serves BitNet models with one scale per tensor, and this tensor was not quantized that way"
    )]
    MixedScales {
        format: &'static str,
        block: usize,
        expected: f32,
        found: f32,
    },
    #[error(
        "{format} weight {index} has code {code}, which is not a ternary weight (-1, 0, +1); the file is corrupt or not a BitNet model"
    )]
    NotTernary {
        format: &'static str,
        index: usize,
        code: u8,
    },
}

/// Decodes a tensor stored as ternary `ty` (I2_S, TQ2_0, TQ1_0) of `rows`
/// outputs by `cols` inputs; `None` for any other type.
pub fn decode(
    ty: crate::gguf::GgmlType,
    data: &[u8],
    rows: usize,
    cols: usize,
) -> Option<Result<crate::ternary::Ternary, Error>> {
    use crate::gguf::GgmlType;
    match ty {
        GgmlType::I2S => Some(i2s::decode(data, rows, cols)),
        GgmlType::TQ2_0 => Some(tq::decode_tq2(data, rows, cols)),
        GgmlType::TQ1_0 => Some(tq::decode_tq1(data, rows, cols)),
        _ => None,
    }
}

pub(crate) fn check_scale(beta: f32) -> Result<f32, Error> {
    if beta.is_finite() && beta >= 0.0 {
        Ok(beta)
    } else {
        Err(Error::BadScale(beta))
    }
}

pub(crate) fn check_size(
    format: &'static str,
    rows: usize,
    cols: usize,
    expected: usize,
    found: usize,
) -> Result<(), Error> {
    if expected == found {
        Ok(())
    } else {
        Err(Error::Size {
            format,
            rows,
            cols,
            expected,
            found,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::ternary::Ternary;

    fn random(rows: usize, cols: usize, seed: u64, beta: f32) -> Ternary {
        let mut s = seed | 1;
        let trits: Vec<i8> = (0..rows * cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 3) as i8 - 1
            })
            .collect();
        Ternary::from_trits(rows, cols, &trits, beta)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Every format decodes what it encodes; all agree on the trits,
        /// and on β up to the format's own precision (f16 for TQ).
        #[test]
        fn all_formats_round_trip(rows4 in 1usize..5, blocks in 1usize..4, seed in any::<u64>(), beta in 1e-3f32..4.0) {
            let (rows, cols) = (rows4 * 4, blocks * 256);
            let t = random(rows, cols, seed, beta);
            prop_assert_eq!(&i2s::decode(&i2s::encode(&t).unwrap(), rows, cols).unwrap(), &t);
            prop_assert_eq!(&hf::decode(&hf::encode(&t).unwrap(), rows, cols, beta).unwrap(), &t);
            let fp16 = half::f16::from_f32(beta).to_f32();
            for back in [
                tq::decode_tq2(&tq::encode_tq2(&t).unwrap(), rows, cols).unwrap(),
                tq::decode_tq1(&tq::encode_tq1(&t).unwrap(), rows, cols).unwrap(),
            ] {
                prop_assert_eq!(back.to_trits(), t.to_trits());
                prop_assert_eq!(back.beta(), fp16);
            }
        }

        /// Decoders never panic on arbitrary bytes.
        #[test]
        fn decoders_survive_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..700), rows in 1usize..5, cols in 1usize..600) {
            let _ = i2s::decode(&bytes, rows, cols);
            let _ = hf::decode(&bytes, rows, cols, 1.0);
            let _ = tq::decode_tq2(&bytes, rows, cols);
            let _ = tq::decode_tq1(&bytes, rows, cols);
        }
    }
}
