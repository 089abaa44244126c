//! Trine's one in-memory form of a ternary weight matrix, whatever file it
//! came from: `rows` output rows of `cols` inputs, each row packed as I2_S
//! blocks (128 weights in 32 bytes; byte m of a block holds weights m, m+32,
//! m+64, m+96 in bits 7:6, 5:4, 3:2, 1:0; code = weight + 1) and padded with
//! zero weights to a whole block, plus one scale β per matrix. The dequantized
//! weight is β·T (BITNET.md §1.3).
//!
//! The layout is I2_S's on purpose: official files load without repacking
//! or copying (the rows are read from the memory-mapped file), and the
//! kernels read it directly.

use crate::mmap::Bytes;

/// Weights per block.
pub const BLOCK: usize = 128;
/// Bytes per block.
pub const BLOCK_BYTES: usize = 32;
/// The code of weight 0 in all four positions of a byte.
pub const ZERO_BYTE: u8 = 0x55;

#[derive(Clone, PartialEq)]
pub struct Ternary {
    rows: usize,
    cols: usize,
    beta: f32,
    data: Bytes,
}

impl std::fmt::Debug for Ternary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ternary")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("beta", &self.beta)
            .finish_non_exhaustive()
    }
}

/// Bytes of one packed row of `cols` weights.
pub fn row_bytes(cols: usize) -> usize {
    cols.div_ceil(BLOCK) * BLOCK_BYTES
}

/// (byte within the row, bit shift) of weight `c`.
#[inline]
pub fn position(c: usize) -> (usize, u32) {
    let (block, j) = (c / BLOCK, c % BLOCK);
    (block * BLOCK_BYTES + j % 32, 6 - 2 * (j / 32) as u32)
}

impl Ternary {
    /// An all-zero matrix with scale `beta`.
    pub fn zeros(rows: usize, cols: usize, beta: f32) -> Self {
        Self {
            rows,
            cols,
            beta,
            data: vec![ZERO_BYTE; rows * row_bytes(cols)].into(),
        }
    }

    /// From row-major trits in {-1, 0, 1}. Panics on other values (a caller bug).
    pub fn from_trits(rows: usize, cols: usize, trits: &[i8], beta: f32) -> Self {
        assert_eq!(trits.len(), rows * cols);
        let mut t = Self::zeros(rows, cols, beta);
        for r in 0..rows {
            for c in 0..cols {
                t.set(r, c, trits[r * cols + c]);
            }
        }
        t
    }

    /// From already-packed rows in Trine's layout (`rows * row_bytes(cols)`
    /// bytes), owned or mapped from the file.
    pub(crate) fn from_packed(rows: usize, cols: usize, beta: f32, data: Bytes) -> Self {
        debug_assert_eq!(data.len(), rows * row_bytes(cols));
        Self {
            rows,
            cols,
            beta,
            data,
        }
    }

    /// The same weights with another scale.
    pub(crate) fn with_beta(mut self, beta: f32) -> Self {
        self.beta = beta;
        self
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn beta(&self) -> f32 {
        self.beta
    }

    /// Packed bytes of row `r` (padded to whole blocks).
    pub fn row(&self, r: usize) -> &[u8] {
        let n = row_bytes(self.cols);
        &self.data[r * n..(r + 1) * n]
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Whether the weights are read from the model file in place.
    pub fn is_mapped(&self) -> bool {
        self.data.is_mapped()
    }

    #[inline]
    pub fn get(&self, r: usize, c: usize) -> i8 {
        let (byte, shift) = position(c);
        let code = (self.row(r)[byte] >> shift) & 3;
        // Code 3 is never written; read it as 0 as bitnet.cpp does.
        [-1, 0, 1, 0][code as usize]
    }

    pub fn set(&mut self, r: usize, c: usize, trit: i8) {
        assert!((-1..=1).contains(&trit), "not a trit: {trit}");
        let (byte, shift) = position(c);
        let i = r * row_bytes(self.cols) + byte;
        let data = self.data.make_mut();
        data[i] = (data[i] & !(3 << shift)) | (((trit + 1) as u8) << shift);
    }

    /// Row-major trits.
    pub fn to_trits(&self) -> Vec<i8> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                out.push(self.get(r, c));
            }
        }
        out
    }

    /// Ternarizes real weights per tensor (BITNET.md §1.3): β = max(mean|W|,
    /// 1e-5), T = clamp(round(W/β), -1, 1), rounding half to even.
    pub fn quantize(rows: usize, cols: usize, weights: &[f32]) -> Self {
        assert_eq!(weights.len(), rows * cols);
        let mean =
            weights.iter().map(|w| f64::from(w.abs())).sum::<f64>() / weights.len().max(1) as f64;
        let beta = (mean as f32).max(1e-5);
        let mut t = Self::zeros(rows, cols, beta);
        for r in 0..rows {
            for c in 0..cols {
                let q = (weights[r * cols + c] / beta)
                    .round_ties_even()
                    .clamp(-1.0, 1.0);
                t.set(r, c, q as i8);
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitnet_md_fixed_blocks() {
        assert_eq!(
            Ternary::from_trits(1, 128, &[0; 128], 1.0).data(),
            &[0x55; 32]
        );
        assert_eq!(
            Ternary::from_trits(1, 128, &[1; 128], 1.0).data(),
            &[0xAA; 32]
        );
        assert_eq!(
            Ternary::from_trits(1, 128, &[-1; 128], 1.0).data(),
            &[0x00; 32]
        );
    }

    #[test]
    fn padding_is_zero_weights() {
        let t = Ternary::from_trits(2, 130, &[1; 260], 0.5);
        assert_eq!(t.row(0).len(), 64);
        for c in 130..256 {
            assert_eq!(t.get(0, c), 0);
        }
        assert_eq!(t.to_trits(), vec![1; 260]);
    }

    #[test]
    fn quantize_rounds_half_to_even_and_clamps() {
        // mean |w| = 1 => beta = 1; 0.5 -> 0, 1.5 -> 2 -> clamped 1, -0.5 -> 0, -3 -> -1.
        let w = [0.5, 1.5, -0.5, -3.0, 0.0, 1.5];
        let t = Ternary::quantize(1, 6, &w);
        assert_eq!(t.beta(), 7.0 / 6.0);
        let q: Vec<i8> = t.to_trits();
        // w/beta = 0.43, 1.29, -0.43, -2.57, 0, 1.29
        assert_eq!(q, vec![0, 1, 0, -1, 0, 1]);
        assert_eq!(Ternary::quantize(1, 2, &[0.0, 0.0]).beta(), 1e-5);
    }
}
