//! Batches through AMX-INT8 tiles (Intel Sapphire Rapids and later), where
//! the CPU has them and Linux grants the tile state.
//!
//! One `tdpbusd` multiplies a 16 × 64 tile of unsigned bytes by a 64 × 16
//! tile of signed bytes into a 16 × 16 tile of i32 sums: 16,384
//! multiply-adds per instruction, against 32 for a 256-bit `vpdpbusd`. That
//! is our product exactly: weight codes (t + 1, unsigned) times int8
//! activations. So a group of [`ROWS`] weight rows is unpacked once into
//! one code byte per weight (as for the register tiles, [`super::gemm`]),
//! the activations are laid out once per batch the way the B operand wants
//! them ([`Packed`]), and a 2 × 2 block of tiles (32 rows × 32 tokens)
//! walks the columns 64 at a time. Each element is the same exact i32 sum
//! as the GEMV's, so the result is bit-identical.
//!
//! Linux hands out the 8 KB of tile data per process on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, Linux 5.16+); [`usable`] asks once.
//! Elsewhere, or when the request is refused, the register tiles run.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use super::Activations;
use super::gemm::unpack_group;
use crate::ternary::Ternary;

/// Weight rows per group: two A tiles of 16.
pub const ROWS: usize = 32;
/// Tokens per B tile.
pub const TOKENS: usize = 16;
/// Columns (bytes of K) per tile step.
const STEP: usize = 64;
/// Bytes of one tile: 16 rows of 64.
const TILE: usize = 1024;

/// Batches of fewer tokens than this take the register tiles: a B tile
/// holds 16 tokens, and at 4 (padded to 16) a batched decode step measured
/// the same with either; from 8 AMX is faster (BENCHMARKS.md).
pub const MIN_TOKENS: usize = 8;

static OFF: AtomicBool = AtomicBool::new(false);

/// Whether this process can run AMX-INT8: the CPU reports AMX-TILE and
/// AMX-INT8, and Linux granted the tile data state. Asked once.
pub fn usable() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(request)
}

/// Whether batches go through AMX now: [`usable`], and not switched off
/// with [`set_enabled`].
pub fn active() -> bool {
    !OFF.load(Ordering::Relaxed) && usable()
}

/// Switches the AMX path on (the default where [`usable`]) or off for the
/// whole process, e.g. to measure the register tiles on the same machine
/// (`trine bench engine --amx off`). Either way the results are the same
/// bits.
pub fn set_enabled(on: bool) {
    OFF.store(!on, Ordering::Relaxed);
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request() -> bool {
    use std::arch::x86_64::__cpuid_count;
    if __cpuid_count(0, 0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    let (tile, int8) = (edx >> 24 & 1 == 1, edx >> 25 & 1 == 1);
    if !(tile && int8) {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, n) takes two integers and
    // only widens the set of extended states this process may use; it
    // touches no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    rc == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request() -> bool {
    false
}

/// A byte buffer whose data starts on a 64-byte line (tile rows are 64
/// bytes; an unaligned row would touch two lines).
#[derive(Debug)]
struct Lines {
    buf: Vec<u8>,
    at: usize,
}

impl Lines {
    fn new(len: usize) -> Self {
        let buf = vec![0u8; len + 63];
        let at = buf.as_ptr().align_offset(64).min(63);
        Self { buf, at }
    }
    fn len(&self) -> usize {
        self.buf.len() - 63
    }
    fn bytes(&self) -> &[u8] {
        &self.buf[self.at..self.at + self.len()]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        let (at, len) = (self.at, self.len());
        &mut self.buf[at..at + len]
    }
}

/// A batch's activations as B tiles: for each block of 16 tokens and each
/// 64 columns, 16 rows of (4 columns × 16 tokens), i.e. byte
/// `kk * 64 + 4 * t + j` of a tile is column `4 kk + j` of token t. Tokens
/// past the batch's end are zeros.
#[derive(Debug)]
pub struct Packed {
    lines: Lines,
    /// Blocks of 16 tokens.
    blocks: usize,
    /// 64-column steps per row (the padded width / 64).
    steps: usize,
}

impl Packed {
    /// Lays out `acts` (all of one padded width, a multiple of 128).
    pub fn new(acts: &[Activations]) -> Self {
        let width = acts.first().map_or(0, |a| a.q.len());
        assert!(
            width.is_multiple_of(STEP),
            "activations padded to whole blocks"
        );
        let blocks = acts.len().div_ceil(TOKENS);
        let steps = width / STEP;
        let mut lines = Lines::new(blocks * steps * TILE);
        let out = lines.bytes_mut();
        for (t, a) in acts.iter().enumerate() {
            assert_eq!(a.q.len(), width, "activation width");
            let (block, tt) = (t / TOKENS, t % TOKENS);
            for (s, cols) in a.q.chunks_exact(STEP).enumerate() {
                let tile = &mut out[(block * steps + s) * TILE..][..TILE];
                for (row, four) in tile.chunks_exact_mut(64).zip(cols.chunks_exact(4)) {
                    row[4 * tt..4 * tt + 4].copy_from_slice(bytemuck::cast_slice(four));
                }
            }
        }
        Self {
            lines,
            blocks,
            steps,
        }
    }

    /// The tiles of token block `b`, step after step.
    fn block(&self, b: usize) -> &[u8] {
        &self.lines.bytes()[b * self.steps * TILE..(b + 1) * self.steps * TILE]
    }
}

/// The tile configuration: palette 1, all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

const CONFIG: Config = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut i = 0;
    while i < 8 {
        c[16 + 2 * i] = 64; // bytes per row (u16, little-endian)
        c[48 + i] = 16; // rows
        i += 1;
    }
    Config(c)
};

/// C += A·B over `steps` steps for a 2 × 2 block of tiles: rows 0-15 and
/// 16-31 of `a` (one code byte per weight, rows `lda` apart) times token
/// blocks `b0` and `b1` ([`Packed`] tiles). `c` gets four 16 × 16 i32
/// tiles: (rows 0-15, b0), (rows 0-15, b1), (rows 16-31, b0), (rows 16-31,
/// b1).
///
/// # Safety
/// [`usable`] must be true. `a` must hold 32 rows of `lda` bytes with
/// `steps * 64 <= lda`; `b0` and `b1` must hold `steps` tiles each.
#[cfg(target_arch = "x86_64")]
unsafe fn block_2x2(a: &[u8], lda: usize, b0: &[u8], b1: &[u8], steps: usize, c: &mut [i32; 1024]) {
    assert!(steps > 0 && steps * STEP <= lda && a.len() >= 31 * lda + steps * STEP);
    assert!(b0.len() >= steps * TILE && b1.len() >= steps * TILE);
    // SAFETY: the caller guarantees AMX is granted; every tile load reads
    // 16 rows of 64 bytes inside `a` (rows 0-31, columns < steps·64) or
    // inside `b0`/`b1` (asserted above); the four stores write 4 KB of `c`.
    // The asm configures and releases the tiles itself and declares every
    // tile register it touches as clobbered.
    unsafe {
        std::arch::asm!(
            "ldtilecfg [{cfg}]",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm5, [{a1} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {s64}*1]",
            "tileloadd tmm7, [{b1} + {s64}*1]",
            "tdpbusd tmm0, tmm4, tmm6",
            "tdpbusd tmm1, tmm4, tmm7",
            "tdpbusd tmm2, tmm5, tmm6",
            "tdpbusd tmm3, tmm5, tmm7",
            "add {a0}, 64",
            "add {a1}, 64",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {k}",
            "jnz 2b",
            "tilestored [{c} + {s64}*1], tmm0",
            "tilestored [{c} + {s64}*1 + 1024], tmm1",
            "tilestored [{c} + {s64}*1 + 2048], tmm2",
            "tilestored [{c} + {s64}*1 + 3072], tmm3",
            "tilerelease",
            cfg = in(reg) CONFIG.0.as_ptr(),
            a0 = inout(reg) a.as_ptr() => _,
            a1 = inout(reg) a.as_ptr().add(16 * lda) => _,
            b0 = inout(reg) b0.as_ptr() => _,
            b1 = inout(reg) b1.as_ptr() => _,
            k = inout(reg) steps => _,
            lda = in(reg) lda,
            s64 = in(reg) 64usize,
            c = in(reg) c.as_mut_ptr(),
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack),
        );
    }
}

/// [`block_2x2`] for one token block: `c` gets (rows 0-15, b) at 0 and
/// (rows 16-31, b) at 512 (elements 256..512 untouched).
///
/// # Safety
/// As [`block_2x2`], for `b`.
#[cfg(target_arch = "x86_64")]
unsafe fn block_2x1(a: &[u8], lda: usize, b: &[u8], steps: usize, c: &mut [i32; 1024]) {
    assert!(steps > 0 && steps * STEP <= lda && a.len() >= 31 * lda + steps * STEP);
    assert!(b.len() >= steps * TILE);
    // SAFETY: as in `block_2x2`: loads inside `a` and `b`, stores to
    // elements 0..256 and 512..768 of `c`; tiles configured, released and
    // declared clobbered here.
    unsafe {
        std::arch::asm!(
            "ldtilecfg [{cfg}]",
            "tilezero tmm0",
            "tilezero tmm2",
            "2:",
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm5, [{a1} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {s64}*1]",
            "tdpbusd tmm0, tmm4, tmm6",
            "tdpbusd tmm2, tmm5, tmm6",
            "add {a0}, 64",
            "add {a1}, 64",
            "add {b0}, 1024",
            "dec {k}",
            "jnz 2b",
            "tilestored [{c} + {s64}*1], tmm0",
            "tilestored [{c} + {s64}*1 + 2048], tmm2",
            "tilerelease",
            cfg = in(reg) CONFIG.0.as_ptr(),
            a0 = inout(reg) a.as_ptr() => _,
            a1 = inout(reg) a.as_ptr().add(16 * lda) => _,
            b0 = inout(reg) b.as_ptr() => _,
            k = inout(reg) steps => _,
            lda = in(reg) lda,
            s64 = in(reg) 64usize,
            c = in(reg) c.as_mut_ptr(),
            out("tmm0") _, out("tmm2") _, out("tmm4") _, out("tmm5") _, out("tmm6") _,
            options(nostack),
        );
    }
}

thread_local! {
    /// Each thread's unpacked rows, reused across calls.
    static CODES: RefCell<Option<Lines>> = const { RefCell::new(None) };
}

/// `out[t][i]` = row `first + i` of `w` times token t (`packed` laid out
/// from `acts`), for the `out[t].len()` rows from `first`: the exact dot
/// Σ t·q scaled by `scales[t]`, as [`super::Kernel::gemv`] computes each
/// element.
///
/// # Panics
/// If [`usable`] is false.
pub fn rows(
    w: &Ternary,
    first: usize,
    acts: &[Activations],
    packed: &Packed,
    scales: &[f32],
    out: &mut [&mut [f32]],
) {
    assert!(usable(), "AMX tiles used where the process has none");
    let n = acts.len();
    assert_eq!(out.len(), n, "one output slice per token");
    assert_eq!(packed.blocks, n.div_ceil(TOKENS), "packed for this batch");
    let stride = packed.steps * STEP;
    assert_eq!(stride, crate::ternary::row_bytes(w.cols()) * 4, "width");
    let count = out[0].len();
    let sums: Vec<i32> = acts.iter().map(|a| a.sum).collect();
    CODES.with_borrow_mut(|slot| {
        if slot.as_ref().is_none_or(|l| l.len() < ROWS * stride) {
            *slot = Some(Lines::new(ROWS * stride));
        }
        let codes = slot.as_mut().expect("just filled").bytes_mut();
        let codes = &mut codes[..ROWS * stride];
        let mut c = [0i32; 1024];
        for g0 in (0..count).step_by(ROWS) {
            let here = ROWS.min(count - g0);
            unpack_group(w, first + g0, here, codes, stride);
            let mut emit = |c: &[i32; 1024], tiles: &[(usize, usize)]| {
                // (offset in c, first token) per tile column: rows 0-15 at
                // the offset, rows 16-31 at offset + 512.
                for &(at, t0) in tiles {
                    for half in 0..2 {
                        for m in 0..16 {
                            let r = half * 16 + m;
                            if r >= here {
                                break;
                            }
                            let end = n.min(t0 + TOKENS);
                            let dots = &c[at + half * 512 + m * 16..][..end - t0];
                            for (t, &d) in (t0..end).zip(dots) {
                                out[t][g0 + r] = (d - sums[t]) as f32 * scales[t];
                            }
                        }
                    }
                }
            };
            let mut b = 0;
            while b + 2 <= packed.blocks {
                // SAFETY: `usable()` was asserted; `codes` holds ROWS rows of
                // `stride` = steps·64 bytes, and each packed block holds
                // `steps` tiles (the functions assert both).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    block_2x2(
                        codes,
                        stride,
                        packed.block(b),
                        packed.block(b + 1),
                        packed.steps,
                        &mut c,
                    );
                }
                emit(&c, &[(0, b * TOKENS), (256, (b + 1) * TOKENS)]);
                b += 2;
            }
            if b < packed.blocks {
                // SAFETY: as above, for one block.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    block_2x1(codes, stride, packed.block(b), packed.steps, &mut c);
                }
                emit(&c, &[(0, b * TOKENS)]);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Kernel;

    fn matrix(rows: usize, cols: usize, seed: usize) -> Ternary {
        let trits: Vec<i8> = (0..rows * cols)
            .map(|i| ((i * 31 + i / 7 + seed) % 3) as i8 - 1)
            .collect();
        Ternary::from_trits(rows, cols, &trits, 0.75)
    }

    fn acts(n: usize, cols: usize, seed: usize) -> Vec<Activations> {
        (0..n)
            .map(|k| {
                let x: Vec<f32> = (0..cols)
                    .map(|i| match (i * 13 + k * 7 + seed) % 11 {
                        0 => -9.0,
                        1 => 9.0,
                        v => (v as f32 - 5.0) * 1.3,
                    })
                    .collect();
                Activations::quantize(&x)
            })
            .collect()
    }

    #[test]
    fn the_tile_layout_is_columns_by_four_per_token() {
        let a = acts(17, 200, 3);
        let p = Packed::new(&a);
        assert_eq!((p.blocks, p.steps), (2, 4));
        for (t, at) in a.iter().enumerate() {
            for col in 0..256 {
                let tile = &p.block(t / 16)[(col / 64) * TILE..][..TILE];
                let got = tile[(col % 64) / 4 * 64 + 4 * (t % 16) + col % 4] as i8;
                assert_eq!(got, at.q[col], "token {t} column {col}");
            }
        }
        // Block 1 holds token 16 only: the other 15 tokens' bytes (4..64 of
        // every tile row) are zero padding.
        for row in p.block(1).chunks_exact(64) {
            assert!(row[4..].iter().all(|&b| b == 0), "padding");
        }
    }

    /// Every (row, token) of the AMX path against the reference dot, at
    /// batch sizes that fill 2 × 2 blocks, leave a lone block, or part of
    /// one, with partial row groups and widths of one to many steps.
    #[test]
    fn amx_rows_match_the_reference_dot() {
        if !usable() {
            eprintln!("SKIP amx_rows_match_the_reference_dot: no AMX-INT8 here (CPU or kernel)");
            return;
        }
        for (rows, cols) in [(32, 128), (45, 300), (70, 2560), (16, 6912)] {
            let w = matrix(rows, cols, cols);
            for n in [1, 4, 16, 17, 32, 33, 50, 64] {
                let a = acts(n, cols, n + cols);
                let p = Packed::new(&a);
                let scales: Vec<f32> = a.iter().map(|x| w.beta() / x.scale).collect();
                let mut out = vec![f32::NAN; rows * n];
                rows_of(&w, &a, &p, &scales, &mut out);
                for r in 0..rows {
                    for t in 0..n {
                        let want =
                            Kernel::Scalar.dot_in(w.layout(), w.row(r), &a[t]) as f32 * scales[t];
                        assert_eq!(
                            out[r * n + t].to_bits(),
                            want.to_bits(),
                            "{rows}x{cols} n {n} row {r} token {t}"
                        );
                    }
                }
            }
        }
    }

    /// The whole matrix from row 0, as [`Kernel::gemm`]'s tasks split it
    /// (`out[r * n + t]`).
    fn rows_of(w: &Ternary, a: &[Activations], p: &Packed, scales: &[f32], out: &mut [f32]) {
        let (n, per) = (a.len(), crate::kernels::ROWS_PER_TASK);
        let mut by_token = vec![0f32; out.len()];
        for first in (0..w.rows()).step_by(per) {
            let mut ys: Vec<&mut [f32]> = by_token
                .chunks_exact_mut(w.rows())
                .map(|y| &mut y[first..(first + per).min(w.rows())])
                .collect();
            rows(w, first, a, p, scales, &mut ys);
        }
        for (t, y) in by_token.chunks_exact(w.rows()).enumerate() {
            for (r, &v) in y.iter().enumerate() {
                out[r * n + t] = v;
            }
        }
    }
}
