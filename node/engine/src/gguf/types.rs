//! ggml tensor types as GGUF files number them, with their block sizes.
//!
//! Ids follow upstream ggml, plus the ids bitnet.cpp's fork gives its own
//! types (I2_S 36, I8_S 37, TL1 38, TL2 39). Upstream retired 36-38, so those
//! are unambiguous; 39 is TL2 in bitnet.cpp files but MXFP4 upstream, and
//! error messages say so.

use std::fmt;

/// A tensor element type whose byte size Trine knows. Only some of them can
/// be loaded into a model ([`GgmlType::is_loadable`]); the rest can still be
/// listed by `trine model inspect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
    TQ1_0,
    TQ2_0,
    /// bitnet.cpp's 2-bit ternary type: 128-element blocks of 32 bytes, one
    /// f32 scale per tensor after the packed bytes (BITNET.md §2b).
    I2S,
}

impl GgmlType {
    /// The type with GGUF id `id`, or a message naming what the id is.
    pub fn from_id(id: u32) -> Result<Self, UnknownType> {
        use GgmlType::*;
        Ok(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            36 => I2S,
            other => return Err(UnknownType(other)),
        })
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            I2S => 36,
        }
    }

    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            I2S => "I2_S",
        }
    }

    /// (elements per block, bytes per block). I2_S is special-cased in
    /// [`GgmlType::byte_size`].
    fn block(self) -> (u64, u64) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2K => (256, 84),
            Q3K => (256, 110),
            Q4K => (256, 144),
            Q5K => (256, 176),
            Q6K => (256, 210),
            Q8K => (256, 292),
            TQ1_0 => (256, 54),
            TQ2_0 => (256, 66),
            I2S => (128, 32),
        }
    }

    /// Elements a row (ne0) must be a multiple of.
    pub fn block_elements(self) -> u64 {
        self.block().0
    }

    /// Bytes a tensor of `elements` elements with rows of `ne0` takes, or
    /// `None` if `ne0` is not a whole number of blocks or the size overflows.
    pub fn byte_size(self, ne0: u64, elements: u64) -> Option<u64> {
        let (blk, bytes) = self.block();
        if !ne0.is_multiple_of(blk) {
            return None;
        }
        let packed = (elements / blk).checked_mul(bytes)?;
        match self {
            // n/4 packed bytes, then an f32 scale and 28 bytes of padding.
            GgmlType::I2S => packed.checked_add(32),
            _ => Some(packed),
        }
    }

    /// Types a model can be loaded from (weights, norms, embeddings).
    pub fn is_loadable(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | Q8_0 | TQ1_0 | TQ2_0 | I2S)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A type id Trine has no size for; its message says what the id means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownType(pub u32);

impl fmt::Display for UnknownType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.0 {
            37 => "I8_S in bitnet.cpp files",
            38 => {
                "TL1 in bitnet.cpp files (a tiled layout tied to one build's kernel configuration)"
            }
            39 => {
                "TL2 in bitnet.cpp files (a tiled layout tied to one build's kernel configuration), MXFP4 in upstream ggml"
            }
            4 | 5 | 31..=33 => "a type upstream ggml retired",
            16..=23 | 29 => "an IQ (importance-matrix) quantization",
            _ => "not a type Trine knows",
        };
        write!(f, "type {} ({what})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for id in 0..64 {
            if let Ok(t) = GgmlType::from_id(id) {
                assert_eq!(t.id(), id, "{t}");
            }
        }
    }

    #[test]
    fn sizes_match_bitnet_md() {
        // q/o of 2B4T: 2560x2560 I2_S = 1,638,432 bytes; ffn 2560x6912 = 4,423,712.
        assert_eq!(GgmlType::I2S.byte_size(2560, 2560 * 2560), Some(1_638_432));
        assert_eq!(GgmlType::I2S.byte_size(2560, 2560 * 6912), Some(4_423_712));
        assert_eq!(
            GgmlType::F16.byte_size(2560, 2560 * 128_256),
            Some(656_670_720)
        );
        assert_eq!(GgmlType::TQ2_0.byte_size(256, 256), Some(66));
        assert_eq!(GgmlType::TQ1_0.byte_size(512, 1024), Some(216));
        assert_eq!(GgmlType::TQ1_0.byte_size(100, 100), None);
        assert_eq!(GgmlType::F32.byte_size(1, u64::MAX), None);
    }

    #[test]
    fn id_39_names_both_meanings() {
        let msg = GgmlType::from_id(39).unwrap_err().to_string();
        assert!(msg.contains("TL2") && msg.contains("MXFP4"), "{msg}");
    }
}
