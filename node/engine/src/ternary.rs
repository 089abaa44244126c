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
//!
//! A matrix can also be repacked at load into the 1.6-bit layout
//! ([`Layout::Base3`], `--weight-layout base3`): five trits per byte in
//! base 3, stored as TQ1_0 stores them (⌈v·256/243⌉, so that digit i
//! decodes as ((byte·3ⁱ mod 256)·3) >> 8), 20% fewer bytes than I2_S for
//! decode to read. A row is a run of 64-byte groups; byte m of group g
//! holds, in digits 0..5 (digit 0 the most significant), the weights
//! 320g + 64i + m: each digit of a group's 64 bytes is 64 consecutive
//! weights, the run of activations one 512-bit multiply-add needs. A row
//! holds 2·⌈cols/128⌉ such 64-weight planes (the activations' padded
//! width), in ⌈planes/5⌉ groups; unused digits hold weight 0.

use crate::mmap::Bytes;

/// Weights per block.
pub const BLOCK: usize = 128;
/// Bytes per block.
pub const BLOCK_BYTES: usize = 32;
/// The code of weight 0 in all four positions of a byte.
pub const ZERO_BYTE: u8 = 0x55;

/// Bytes per group of the base-3 layout.
pub const GROUP_BYTES: usize = 64;
/// Weights per plane (one digit of a group) of the base-3 layout.
pub const PLANE: usize = 64;
/// Weights per group of the base-3 layout: five planes.
pub const GROUP: usize = 5 * PLANE;
/// The base-3 byte of five zero weights (all digits code 1).
pub const ZERO_BYTE3: u8 = 128;

/// How a [`Ternary`]'s rows are packed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// I2_S: four 2-bit codes a byte (2 bits a weight).
    #[default]
    I2s,
    /// Five trits a byte in base 3 (1.6 bits a weight), repacked at load.
    Base3,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::I2s => "i2s",
            Layout::Base3 => "base3",
        }
    }

    /// Bytes of one packed row of `cols` weights in this layout.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            Layout::I2s => row_bytes(cols),
            Layout::Base3 => base3_row_bytes(cols),
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, PartialEq)]
pub struct Ternary {
    rows: usize,
    cols: usize,
    beta: f32,
    layout: Layout,
    data: Bytes,
}

impl std::fmt::Debug for Ternary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ternary")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("beta", &self.beta)
            .field("layout", &self.layout)
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

/// 64-weight planes of a base-3 row of `cols` weights: the activations'
/// padded width (whole 128-weight blocks) over 64.
pub fn base3_planes(cols: usize) -> usize {
    cols.div_ceil(BLOCK) * BLOCK / PLANE
}

/// Bytes of one base-3 row of `cols` weights.
pub fn base3_row_bytes(cols: usize) -> usize {
    base3_planes(cols).div_ceil(5) * GROUP_BYTES
}

/// (byte within the row, digit) of weight `c` in the base-3 layout.
#[inline]
pub fn base3_position(c: usize) -> (usize, usize) {
    let (plane, m) = (c / PLANE, c % PLANE);
    ((plane / 5) * GROUP_BYTES + m, plane % 5)
}

/// Powers of three, digit i's multiplier.
pub const POW3: [u8; 5] = [1, 3, 9, 27, 81];

/// Digit `i` (0 the most significant) of a base-3 byte: a code in 0..=2.
#[inline(always)]
pub fn base3_digit(byte: u8, i: usize) -> u8 {
    ((u16::from(byte.wrapping_mul(POW3[i])) * 3) >> 8) as u8
}

/// The byte of five codes (each 0..=2), most significant first, as TQ1_0
/// stores it: ⌈v·256/243⌉ for v = Σ codes[i]·3^(4-i).
#[inline]
pub fn base3_byte(codes: [u8; 5]) -> u8 {
    let v = codes.iter().fold(0u16, |v, &c| v * 3 + u16::from(c));
    ((v * 256).div_ceil(243)) as u8
}

impl Ternary {
    /// An all-zero matrix with scale `beta`.
    pub fn zeros(rows: usize, cols: usize, beta: f32) -> Self {
        Self {
            rows,
            cols,
            beta,
            layout: Layout::I2s,
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
            layout: Layout::I2s,
            data,
        }
    }

    /// How the rows are packed.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The same weights packed in `layout` (an owned copy; `self` again if
    /// it is packed that way already). Rows are repacked in parallel.
    pub fn to_layout(&self, layout: Layout) -> Ternary {
        if layout == self.layout {
            return self.clone();
        }
        let mut data = crate::mmap::huge_zeroed(self.packed_len(layout));
        self.repack_into(layout, &mut data);
        self.repacked(layout, data.into())
    }

    /// Bytes of these weights packed in `layout`.
    pub fn packed_len(&self, layout: Layout) -> usize {
        self.rows * layout.row_bytes(self.cols)
    }

    /// Writes these weights packed in `layout` into `dst` (exactly
    /// [`Ternary::packed_len`] bytes), rows in parallel.
    pub fn repack_into(&self, layout: Layout, dst: &mut [u8]) {
        use rayon::prelude::*;
        assert_eq!(dst.len(), self.packed_len(layout), "repack destination");
        let (from, to) = (
            self.layout.row_bytes(self.cols),
            layout.row_bytes(self.cols),
        );
        dst.par_chunks_mut(to)
            .zip(self.data.par_chunks(from))
            .for_each(|(dst, src)| {
                let mut codes = vec![1u8; self.cols.div_ceil(BLOCK) * BLOCK];
                unpack_codes(self.layout, src, &mut codes);
                pack_codes(layout, &codes, dst);
            });
    }

    /// These weights' shape and scale over `data`, which
    /// [`Ternary::repack_into`] filled for `layout`.
    pub(crate) fn repacked(&self, layout: Layout, data: Bytes) -> Ternary {
        assert_eq!(data.len(), self.packed_len(layout), "repacked bytes");
        Self {
            rows: self.rows,
            cols: self.cols,
            beta: self.beta,
            layout,
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

    /// Packed bytes of row `r` in [`Ternary::layout`] (padded to whole
    /// blocks or groups).
    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.layout.row_bytes(self.cols);
        &self.data[r * n..(r + 1) * n]
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Whether the weights are read from the model file in place.
    pub fn is_mapped(&self) -> bool {
        self.data.is_mapped()
    }

    /// Whether the rows lie in an arena shared with other matrices
    /// repacked at load (see `Model::set_layout`).
    pub fn is_shared(&self) -> bool {
        self.data.is_shared()
    }

    #[inline]
    pub fn get(&self, r: usize, c: usize) -> i8 {
        let code = match self.layout {
            Layout::I2s => {
                let (byte, shift) = position(c);
                (self.row(r)[byte] >> shift) & 3
            }
            Layout::Base3 => {
                let (byte, digit) = base3_position(c);
                base3_digit(self.row(r)[byte], digit)
            }
        };
        // Code 3 is never written; read it as 0 as bitnet.cpp does.
        [-1, 0, 1, 0][code as usize]
    }

    pub fn set(&mut self, r: usize, c: usize, trit: i8) {
        assert!((-1..=1).contains(&trit), "not a trit: {trit}");
        let code = (trit + 1) as u8;
        match self.layout {
            Layout::I2s => {
                let (byte, shift) = position(c);
                let i = r * row_bytes(self.cols) + byte;
                let data = self.data.make_mut();
                data[i] = (data[i] & !(3 << shift)) | (code << shift);
            }
            Layout::Base3 => {
                let (byte, digit) = base3_position(c);
                let i = r * base3_row_bytes(self.cols) + byte;
                let data = self.data.make_mut();
                let mut codes: [u8; 5] = std::array::from_fn(|d| base3_digit(data[i], d));
                codes[digit] = code;
                data[i] = base3_byte(codes);
            }
        }
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

/// One code byte (t + 1) per weight of a packed row, in column order,
/// into `codes` (the row's padded width: whole 128-weight blocks).
pub fn unpack_codes(layout: Layout, row: &[u8], codes: &mut [u8]) {
    match layout {
        Layout::I2s => crate::kernels::gemm::unpack_row(row, codes),
        Layout::Base3 => crate::kernels::base3::unpack_row(row, codes),
    }
}

/// Packs a row's codes (its padded width) into `row` in `layout`; unused
/// digits of the base-3 layout hold weight 0.
pub fn pack_codes(layout: Layout, codes: &[u8], row: &mut [u8]) {
    match layout {
        Layout::I2s => {
            assert_eq!(codes.len(), row.len() * 4, "one code per weight");
            for (block, c) in row
                .chunks_exact_mut(BLOCK_BYTES)
                .zip(codes.chunks_exact(BLOCK))
            {
                for (m, byte) in block.iter_mut().enumerate() {
                    *byte = (c[m] << 6) | (c[m + 32] << 4) | (c[m + 64] << 2) | c[m + 96];
                }
            }
        }
        Layout::Base3 => {
            assert_eq!(row.len(), base3_row_bytes(codes.len()), "base-3 row size");
            let planes = codes.len() / PLANE;
            for (g, group) in row.chunks_exact_mut(GROUP_BYTES).enumerate() {
                for (m, byte) in group.iter_mut().enumerate() {
                    let digits: [u8; 5] = std::array::from_fn(|i| {
                        let p = 5 * g + i;
                        if p < planes { codes[p * PLANE + m] } else { 1 }
                    });
                    *byte = base3_byte(digits);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base3_bytes_decode_to_their_digits_for_every_code_tuple() {
        for v in 0..243u16 {
            let codes: [u8; 5] = std::array::from_fn(|i| ((v / 3u16.pow(4 - i as u32)) % 3) as u8);
            let b = base3_byte(codes);
            for (i, &c) in codes.iter().enumerate() {
                assert_eq!(base3_digit(b, i), c, "v {v} digit {i}");
            }
        }
        assert_eq!(base3_byte([1; 5]), ZERO_BYTE3);
        // TQ1_0's bytes for the extremes: all -1 is 0, all +1 is 255.
        assert_eq!(base3_byte([0; 5]), 0);
        assert_eq!(base3_byte([2; 5]), 255);
    }

    #[test]
    fn base3_sizes_and_positions() {
        // 2B4T's shapes: 2560 = 40 planes in 8 groups, 6912 = 108 in 22.
        assert_eq!(base3_row_bytes(2560), 512);
        assert_eq!(base3_row_bytes(6912), 22 * 64);
        assert_eq!(base3_row_bytes(1), 64);
        assert_eq!(base3_position(0), (0, 0));
        assert_eq!(base3_position(64), (0, 1));
        assert_eq!(base3_position(319), (63, 4));
        assert_eq!(base3_position(320 + 65), (65, 1));
    }

    #[test]
    fn repacking_keeps_every_weight_both_ways() {
        for (rows, cols) in [(3, 130), (2, 2560), (1, 6912), (4, 320), (2, 1)] {
            let trits: Vec<i8> = (0..rows * cols)
                .map(|i| ((i * 7 + i / 3) % 3) as i8 - 1)
                .collect();
            let t = Ternary::from_trits(rows, cols, &trits, 0.25);
            let b = t.to_layout(Layout::Base3);
            assert_eq!(b.layout(), Layout::Base3);
            assert_eq!(b.row(0).len(), base3_row_bytes(cols));
            assert_eq!(b.to_trits(), trits, "{rows}x{cols}");
            assert_eq!(b.beta(), 0.25);
            assert_eq!(b.to_layout(Layout::I2s), t);
            // set on a base-3 matrix changes one weight only.
            let mut b2 = b.clone();
            b2.set(rows - 1, cols - 1, 1);
            let mut want = trits.clone();
            want[rows * cols - 1] = 1;
            assert_eq!(b2.to_trits(), want);
        }
    }

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
