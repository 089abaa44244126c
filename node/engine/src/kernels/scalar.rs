//! The reference kernel: plain loops, obviously right.

use crate::ternary::BLOCK_BYTES;

/// Σ (t+1)·q, where byte m of each 32-byte block holds the codes of weights
/// m, m+32, m+64, m+96 in bits 7:6, 5:4, 3:2, 1:0.
pub fn dot_codes(row: &[u8], q: &[i8]) -> i32 {
    let mut acc = 0i32;
    for (block, qb) in row.chunks_exact(BLOCK_BYTES).zip(q.chunks_exact(128)) {
        for (m, &byte) in block.iter().enumerate() {
            for g in 0..4 {
                let code = i32::from((byte >> (6 - 2 * g)) & 3);
                acc += code * i32::from(qb[m + 32 * g]);
            }
        }
    }
    acc
}
