//! Dense (non-ternary) matrices: the embedding table, which is also the tied
//! lm_head, kept in the file's precision (F32, F16, BF16 or Q8_0) and
//! widened to f32 a row at a time.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::formats::Error;
use crate::gguf::GgmlType;

/// Elements per Q8_0 block: f16 scale + 32 int8.
const Q8_BLOCK: usize = 32;
const Q8_BYTES: usize = 34;

#[derive(Clone)]
enum Data {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    Q8_0(Vec<u8>),
}

/// `rows` rows of `cols` values.
#[derive(Clone)]
pub struct Dense {
    rows: usize,
    cols: usize,
    data: Data,
}

impl std::fmt::Debug for Dense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dense")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("type", &self.type_name())
            .finish()
    }
}

impl Dense {
    /// From a tensor's bytes (sizes were checked by the GGUF parser; they
    /// are checked again here for callers with other sources).
    pub fn from_bytes(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Result<Self, Error> {
        let n = rows * cols;
        let size = |expected: usize, format: &'static str| {
            super::super::formats::check_size(format, rows, cols, expected, bytes.len())
        };
        let data = match ty {
            GgmlType::F32 => {
                size(n * 4, "F32")?;
                Data::F32(
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                )
            }
            GgmlType::F16 => {
                size(n * 2, "F16")?;
                Data::F16(
                    bytes
                        .chunks_exact(2)
                        .map(|b| f16::from_le_bytes([b[0], b[1]]))
                        .collect(),
                )
            }
            GgmlType::BF16 => {
                size(n * 2, "BF16")?;
                Data::BF16(
                    bytes
                        .chunks_exact(2)
                        .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                        .collect(),
                )
            }
            GgmlType::Q8_0 => {
                if !cols.is_multiple_of(Q8_BLOCK) {
                    return Err(Error::Shape {
                        format: "Q8_0",
                        what: "rows of a multiple of 32 values",
                        rows,
                        cols,
                    });
                }
                size(n / Q8_BLOCK * Q8_BYTES, "Q8_0")?;
                Data::Q8_0(bytes.to_vec())
            }
            _ => {
                return Err(Error::Shape {
                    format: "dense tensor",
                    what: "type F32, F16, BF16 or Q8_0",
                    rows,
                    cols,
                });
            }
        };
        Ok(Self { rows, cols, data })
    }

    pub fn from_f32(rows: usize, cols: usize, values: Vec<f32>) -> Self {
        assert_eq!(values.len(), rows * cols);
        Self {
            rows,
            cols,
            data: Data::F32(values),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn type_name(&self) -> &'static str {
        match self.data {
            Data::F32(_) => "F32",
            Data::F16(_) => "F16",
            Data::BF16(_) => "BF16",
            Data::Q8_0(_) => "Q8_0",
        }
    }

    /// Row `r` widened to f32 into `out` (`cols` long).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let (s, e) = (r * self.cols, (r + 1) * self.cols);
        match &self.data {
            Data::F32(v) => out.copy_from_slice(&v[s..e]),
            Data::F16(v) => {
                for (o, x) in out.iter_mut().zip(&v[s..e]) {
                    *o = x.to_f32();
                }
            }
            Data::BF16(v) => {
                for (o, x) in out.iter_mut().zip(&v[s..e]) {
                    *o = x.to_f32();
                }
            }
            Data::Q8_0(bytes) => {
                let blocks = &bytes[s / Q8_BLOCK * Q8_BYTES..e / Q8_BLOCK * Q8_BYTES];
                for (chunk, block) in out
                    .chunks_exact_mut(Q8_BLOCK)
                    .zip(blocks.chunks_exact(Q8_BYTES))
                {
                    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                    for (o, &q) in chunk.iter_mut().zip(&block[2..]) {
                        *o = d * f32::from(q as i8);
                    }
                }
            }
        }
    }

    /// out[r] = row r · x for every row (the lm_head), accumulated in f32.
    /// Rows are split over the current rayon pool; each row's sum is the
    /// same whatever the thread count.
    pub fn matvec(&self, x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), self.cols);
        assert_eq!(out.len(), self.rows);
        const ROWS: usize = 256;
        out.par_chunks_mut(ROWS)
            .enumerate()
            .for_each(|(chunk, ys)| {
                let mut row = vec![0f32; self.cols];
                for (i, y) in ys.iter_mut().enumerate() {
                    self.row_into(chunk * ROWS + i, &mut row);
                    *y = row.iter().zip(x).map(|(a, b)| a * b).sum();
                }
            });
    }
}
