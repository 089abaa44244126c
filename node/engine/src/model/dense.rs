//! Dense (non-ternary) matrices: the embedding table, which is also the tied
//! lm_head, kept in the file's precision (F32, F16, BF16, Q8_0 or Q4_0)
//! and widened to f32 a row at a time, or repacked at load for the integer
//! kernels (`--quant-embd q8|q4`).

use half::slice::HalfFloatSliceExt as _;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::kernels::fdot::{dot_f16_n, dot_n};
use crate::kernels::q4::{self, Q4Acts};
use crate::kernels::q8::{self, Q8Acts};
use crate::kernels::{prefetch, prefetch_distance};

use crate::formats::Error;
use crate::gguf::GgmlType;
use crate::mmap::Bytes;

/// `rows` rows of `cols` values, stored as in the file (mapped in place
/// when it came from one).
#[derive(Clone)]
pub struct Dense {
    rows: usize,
    cols: usize,
    ty: GgmlType,
    data: Bytes,
    /// Q8_0 or Q4_0 rows repacked for the int8 kernels (each row's scales,
    /// then its values: [`q8::quantize_row`], [`q4::quantize_row`]) rather
    /// than in the file's interleaved blocks; made only by
    /// [`Dense::to_q8_0`] and [`Dense::to_q4_0`].
    repacked: bool,
}

impl std::fmt::Debug for Dense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dense")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("type", &self.ty)
            .field("mapped", &self.data.is_mapped())
            .finish()
    }
}

impl Dense {
    /// From a tensor's bytes, checked against its type and shape.
    pub fn from_bytes(
        ty: GgmlType,
        bytes: impl Into<Bytes>,
        rows: usize,
        cols: usize,
    ) -> Result<Self, Error> {
        let data: Bytes = bytes.into();
        let n = rows * cols;
        let expected = match ty {
            GgmlType::F32 => n * 4,
            GgmlType::F16 | GgmlType::BF16 => n * 2,
            GgmlType::Q8_0 => {
                if !cols.is_multiple_of(q8::BLOCK) {
                    return Err(Error::Shape {
                        format: "Q8_0",
                        what: "rows of a multiple of 32 values",
                        rows,
                        cols,
                    });
                }
                n / q8::BLOCK * q8::BLOCK_BYTES
            }
            GgmlType::Q4_0 => {
                if !cols.is_multiple_of(q4::BLOCK) {
                    return Err(Error::Shape {
                        format: "Q4_0",
                        what: "rows of a multiple of 32 values",
                        rows,
                        cols,
                    });
                }
                rows * q4::file_row_bytes(cols)
            }
            _ => {
                return Err(Error::Shape {
                    format: "dense tensor",
                    what: "type F32, F16, BF16, Q8_0 or Q4_0",
                    rows,
                    cols,
                });
            }
        };
        crate::formats::check_size(ty.name(), rows, cols, expected, data.len())?;
        Ok(Self {
            rows,
            cols,
            ty,
            data,
            repacked: false,
        })
    }

    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Self {
        assert_eq!(values.len(), rows * cols);
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self {
            rows,
            cols,
            ty: GgmlType::F32,
            data: bytes.into(),
            repacked: false,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn type_name(&self) -> &'static str {
        self.ty.name()
    }

    /// Whether the values are read from the model file in place.
    pub fn is_mapped(&self) -> bool {
        self.data.is_mapped()
    }

    /// Row `r` widened to f32 into `out` (`cols` long).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let (s, e) = (r * self.cols, (r + 1) * self.cols);
        match self.ty {
            GgmlType::F32 => {
                for (o, b) in out.iter_mut().zip(self.data[s * 4..e * 4].chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            GgmlType::F16 => {
                let bytes = &self.data[s * 2..e * 2];
                // GGUF data is aligned, so the cast succeeds and half's F16C
                // path (chosen at run time) converts eight at a time.
                match bytemuck::try_cast_slice::<u8, f16>(bytes) {
                    Ok(src) if cfg!(target_endian = "little") => src.convert_to_f32_slice(out),
                    _ => {
                        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                            *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                        }
                    }
                }
            }
            GgmlType::BF16 => {
                for (o, b) in out.iter_mut().zip(self.data[s * 2..e * 2].chunks_exact(2)) {
                    *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            GgmlType::Q4_0 => {
                let len = if self.repacked {
                    q4::row_bytes(self.cols)
                } else {
                    q4::file_row_bytes(self.cols)
                };
                let row = &self.data[r * len..(r + 1) * len];
                for (b, chunk) in out[..self.cols].chunks_mut(q4::BLOCK).enumerate() {
                    let (d, codes) = if self.repacked {
                        q4::block(row, b)
                    } else {
                        let block = &row[b * q4::BLOCK_BYTES..(b + 1) * q4::BLOCK_BYTES];
                        (
                            f16::from_le_bytes([block[0], block[1]]).to_f32(),
                            q4::codes_of(&block[2..]),
                        )
                    };
                    for (o, &n) in chunk.iter_mut().zip(&codes) {
                        *o = d * (f32::from(n) - 8.0);
                    }
                }
            }
            _ => {
                // Q8_0 (the only other type from_bytes accepts); rows are
                // whole blocks (padded when to_q8_0 made them).
                let len = q8::row_bytes(self.cols);
                let row = &self.data[r * len..(r + 1) * len];
                for (b, chunk) in out[..self.cols].chunks_mut(q8::BLOCK).enumerate() {
                    let (d, q) = if self.repacked {
                        q8::block(row, b)
                    } else {
                        let block = &row[b * q8::BLOCK_BYTES..(b + 1) * q8::BLOCK_BYTES];
                        (
                            f16::from_le_bytes([block[0], block[1]]).to_f32(),
                            &block[2..],
                        )
                    };
                    for (o, &q) in chunk.iter_mut().zip(q) {
                        *o = d * f32::from(q as i8);
                    }
                }
            }
        }
    }

    /// Rows are split over the current rayon pool; each row's sum is the
    /// same whatever the thread count.
    pub fn matvec(&self, x: &[f32], out: &mut [f32]) {
        self.matmul(x, out);
    }

    /// Row `r`'s bytes when it is f16 the kernels read directly.
    fn f16_row(&self, r: usize) -> Option<&[u8]> {
        (self.ty == GgmlType::F16 && cfg!(target_endian = "little"))
            .then(|| &self.data[r * self.cols * 2..(r + 1) * self.cols * 2])
    }
}

/// Row · each of `xs` (at most four) into `out`: from the f16 bytes when
/// there are some, else from the widened row. The same bits either way
/// ([`crate::kernels::fdot`]).
fn dots(f16_row: Option<&[u8]>, widened: &[f32], xs: &[&[f32]], out: &mut [f32]) {
    macro_rules! go {
        ($($x:ident),+) => {{
            let got = match f16_row {
                Some(w) => dot_f16_n(w, [$($x),+]),
                None => dot_n(widened, [$($x),+]),
            };
            out.copy_from_slice(&got);
        }};
    }
    match *xs {
        [a, b, c, d] => go!(a, b, c, d),
        [a, b, c] => go!(a, b, c),
        [a, b] => go!(a, b),
        [a] => go!(a),
        _ => {}
    }
}

impl Dense {
    /// `out[t * rows + r]` = row r · token t of `xs` (tokens × cols,
    /// row-major): each row is widened once for every token, and each
    /// element is computed exactly as [`Dense::matvec`] computes it.
    ///
    /// A matrix made by [`Dense::to_q8_0`] or [`Dense::to_q4_0`] is
    /// multiplied in int8: each token is quantized to Q8_0-style blocks
    /// once, and each row · token is [`q8::dot_n`] or [`q4::dot_n`] (as
    /// llama.cpp does for a Q8_0 or Q4_0 output tensor), so its result is
    /// not the f32 product of the widened row but within the quantization
    /// error of it.
    pub fn matmul(&self, xs: &[f32], out: &mut [f32]) {
        let n = xs.len() / self.cols;
        assert_eq!(xs.len(), n * self.cols);
        assert_eq!(out.len(), n * self.rows);
        let tokens: Vec<&[f32]> = xs.chunks_exact(self.cols).collect();
        // Row-major scratch (r * n + t), transposed into `out` afterwards
        // (for one token the two are the same).
        let mut by_row = vec![0f32; self.rows * n];
        if self.repacked && self.ty == GgmlType::Q4_0 {
            let acts: Vec<Q4Acts> = tokens.iter().map(|x| Q4Acts::quantize(x)).collect();
            self.int_rows(&mut by_row, n, q4::row_bytes(self.cols), &acts, q4_dots);
            return transpose_into(&by_row, n, self.rows, out);
        }
        if self.repacked {
            let acts: Vec<Q8Acts> = tokens.iter().map(|x| Q8Acts::quantize(x)).collect();
            self.int_rows(&mut by_row, n, q8::row_bytes(self.cols), &acts, q8_dots);
            return transpose_into(&by_row, n, self.rows, out);
        }
        let ahead = prefetch_distance();
        by_row
            .par_chunks_mut(MATMUL_ROWS * n)
            .enumerate()
            .for_each(|(chunk, ys)| {
                let mut buf = vec![0f32; self.cols];
                for (i, yr) in ys.chunks_exact_mut(n).enumerate() {
                    let r = chunk * MATMUL_ROWS + i;
                    let f16_row = self.f16_row(r);
                    if let Some(row) = f16_row.filter(|_| ahead > 0) {
                        prefetch(&self.data, r * row.len() + ahead, row.len());
                    }
                    if f16_row.is_none() {
                        self.row_into(r, &mut buf);
                    }
                    // Four tokens per pass over the row (it stays in L1
                    // while they go by).
                    for (x4, y4) in tokens.chunks(4).zip(yr.chunks_mut(4)) {
                        dots(f16_row, &buf, x4, y4);
                    }
                }
            });
        transpose_into(&by_row, n, self.rows, out);
    }

    /// This matrix quantized to Q8_0 and repacked for the int8 kernel (an
    /// owned copy, about half the bytes of F16): what `--quant-embd q8`
    /// makes of the lm_head at load. A Q8_0 matrix from a file keeps its
    /// values exactly (only the layout changes).
    pub fn to_q8_0(&self) -> Dense {
        if self.repacked && self.ty == GgmlType::Q8_0 {
            return self.clone();
        }
        let len = q8::row_bytes(self.cols);
        self.requantized(GgmlType::Q8_0, len, len, q8::repack_row, q8::quantize_row)
    }

    /// This matrix quantized to Q4_0 (as llama.cpp's reference does) and
    /// repacked for the Q4 kernel: what `--quant-embd q4` makes of the
    /// lm_head at load, about a quarter of the bytes of F16. A Q4_0 matrix
    /// from a file keeps its values exactly.
    pub fn to_q4_0(&self) -> Dense {
        if self.repacked && self.ty == GgmlType::Q4_0 {
            return self.clone();
        }
        self.requantized(
            GgmlType::Q4_0,
            q4::row_bytes(self.cols),
            q4::file_row_bytes(self.cols),
            q4::repack_row,
            q4::quantize_row,
        )
    }

    /// Every row in `ty`'s repacked layout (`row_len` bytes a row): a file
    /// row of that type (`file_len` bytes) repacked code for code, any other
    /// widened and quantized.
    fn requantized(
        &self,
        ty: GgmlType,
        row_len: usize,
        file_len: usize,
        repack: fn(&[u8], &mut [u8]),
        quantize: fn(&[f32], &mut [u8]),
    ) -> Dense {
        let mut data = crate::mmap::huge_zeroed(self.rows * row_len);
        data.par_chunks_mut(row_len * 64)
            .enumerate()
            .for_each(|(chunk, rows)| {
                let mut buf = vec![0f32; self.cols];
                for (i, row) in rows.chunks_exact_mut(row_len).enumerate() {
                    let r = chunk * 64 + i;
                    if self.ty == ty {
                        repack(&self.data[r * file_len..(r + 1) * file_len], row);
                    } else {
                        self.row_into(r, &mut buf);
                        quantize(&buf, row);
                    }
                }
            });
        Dense {
            rows: self.rows,
            cols: self.cols,
            ty,
            data: data.into(),
            repacked: true,
        }
    }

    /// `by_row[r * n + t]` = repacked row r (`row_len` bytes) · token t, by
    /// `dots` (a row against at most four tokens), rows split over the
    /// current rayon pool.
    fn int_rows<A: Sync>(
        &self,
        by_row: &mut [f32],
        n: usize,
        row_len: usize,
        acts: &[A],
        dots: fn(&[u8], &[A], &mut [f32]),
    ) {
        // No software prefetch here: on the Xeon it was measured on, it
        // slowed the int8 head (its kernel is busier per byte than the
        // f16 and ternary ones, and the hardware prefetcher keeps up).
        by_row
            .par_chunks_mut(MATMUL_ROWS * n)
            .enumerate()
            .for_each(|(chunk, ys)| {
                for (i, yr) in ys.chunks_exact_mut(n).enumerate() {
                    let r = chunk * MATMUL_ROWS + i;
                    let row = &self.data[r * row_len..(r + 1) * row_len];
                    for (x4, y4) in acts.chunks(4).zip(yr.chunks_mut(4)) {
                        dots(row, x4, y4);
                    }
                }
            });
    }

    /// Bytes a pass over every row reads.
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }
}

/// Rows per parallel task of a matrix product.
const MATMUL_ROWS: usize = 256;

/// Row-major `by_row[r * n + t]` into token-major `out[t * rows + r]`.
fn transpose_into(by_row: &[f32], n: usize, rows: usize, out: &mut [f32]) {
    if n == 1 {
        out.copy_from_slice(by_row);
        return;
    }
    for (r, yr) in by_row.chunks_exact(n).enumerate() {
        for (t, &y) in yr.iter().enumerate() {
            out[t * rows + r] = y;
        }
    }
}

/// A repacked Q4_0 row · each of `xs` (at most four) into `out`.
fn q4_dots(row: &[u8], xs: &[Q4Acts], out: &mut [f32]) {
    let got: &[f32] = match xs {
        [a, b, c, d] => &q4::dot_n(row, [a, b, c, d]),
        [a, b, c] => &q4::dot_n(row, [a, b, c]),
        [a, b] => &q4::dot_n(row, [a, b]),
        [a] => &q4::dot_n(row, [a]),
        _ => &[],
    };
    out.copy_from_slice(got);
}

/// A Q8_0 row · each of `xs` (at most four) into `out`.
fn q8_dots(row: &[u8], xs: &[Q8Acts], out: &mut [f32]) {
    let got: &[f32] = match xs {
        [a, b, c, d] => &q8::dot_n(row, [a, b, c, d]),
        [a, b, c] => &q8::dot_n(row, [a, b, c]),
        [a, b] => &q8::dot_n(row, [a, b]),
        [a] => &q8::dot_n(row, [a]),
        _ => &[],
    };
    out.copy_from_slice(got);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Q4_0 tensor as a GGUF file stores it: `rows` rows of 18-byte
    /// blocks with varied scales and codes.
    fn q4_file(rows: usize, cols: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        for r in 0..rows {
            for b in 0..cols / q4::BLOCK {
                let d = f16::from_f32(0.01 * (1 + (r * 7 + b) % 13) as f32);
                bytes.extend_from_slice(&d.to_le_bytes());
                bytes.extend((0..16).map(|j| ((r + b * 3 + j * 5) % 256) as u8));
            }
        }
        bytes
    }

    /// A Q4_0 embedding from a file reads as d·(n − 8), and `--quant-embd
    /// q4` repacks it without changing a value; the int8 product is close
    /// to the f32 one of the same values.
    #[test]
    fn a_q4_0_file_tensor_reads_and_repacks_exactly() {
        let (rows, cols) = (9, 96);
        let file = q4_file(rows, cols);
        let m = Dense::from_bytes(GgmlType::Q4_0, file.clone(), rows, cols).unwrap();
        let mut row = vec![0f32; cols];
        m.row_into(4, &mut row);
        let block = &file[4 * 3 * 18..4 * 3 * 18 + 18];
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        assert_eq!(row[0], d * (f32::from(block[2] & 0xF) - 8.0));
        assert_eq!(row[16], d * (f32::from(block[2] >> 4) - 8.0));

        let packed = m.to_q4_0();
        assert_eq!(packed.type_name(), "Q4_0");
        assert_eq!(packed.byte_len(), rows * q4::row_bytes(cols));
        let mut again = vec![0f32; cols];
        for r in 0..rows {
            m.row_into(r, &mut row);
            packed.row_into(r, &mut again);
            assert_eq!(row, again, "row {r}");
        }
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 - 40.0) / 17.0).collect();
        let (mut exact, mut int8) = (vec![0f32; rows], vec![0f32; rows]);
        m.matvec(&x, &mut exact);
        packed.matvec(&x, &mut int8);
        for (a, b) in exact.iter().zip(&int8) {
            assert!((a - b).abs() <= 0.02 * (1.0 + a.abs()), "{a} vs {b}");
        }
        // Repacking twice is the same matrix.
        assert_eq!(packed.to_q4_0().data[..], packed.data[..]);
    }

    #[test]
    fn a_q4_0_tensor_of_partial_blocks_is_refused() {
        let err = Dense::from_bytes(GgmlType::Q4_0, vec![0u8; 18], 1, 20).unwrap_err();
        assert!(err.to_string().contains("multiple of 32"), "{err}");
        let err = Dense::from_bytes(GgmlType::Q4_0, vec![0u8; 17], 1, 32).unwrap_err();
        assert!(err.to_string().contains("Q4_0"), "{err}");
    }
}
