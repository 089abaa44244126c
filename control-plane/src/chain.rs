//! The chain: every applied Raft entry becomes a block
//! `{height, prev_hash, hash, term, index, time, txs}` with
//!
//! ```text
//! hash = SHA-256( prev_hash[32] ‖ u64be(index) ‖ u64be(term) ‖ txs )
//! txs  = u32be(count) ‖ for each tx: field(kind) ‖ field(principal) ‖ field(body)
//! field(x) = u32be(len(x)) ‖ x
//! ```
//!
//! The first block (height 0, Raft's initial membership entry) has an
//! all-zero `prev_hash`. Height equals the Raft log index, so two replicas
//! agree on the hash at every height both hold. A block's time comes from
//! the entry (the proposer's clock; inherited from the previous block for
//! entries Raft itself writes), so it too is identical everywhere, and it
//! is covered by the hash through the request body.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// SHA-256 output.
pub type Hash = [u8; 32];

/// One transaction: an applied command or a membership change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tx {
    /// "node", "note", "membership", … (see `Command::kind`).
    pub kind: String,
    /// For people; not hashed (it is derived from the body).
    pub summary: String,
    /// Canonical encoding of the entry's payload (JSON).
    #[serde(with = "hex_bytes")]
    pub body: Vec<u8>,
    pub principal: String,
    /// Why the state machine refused it, if it did (not hashed: it follows
    /// from the body and the state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub height: u64,
    #[serde(with = "hex_hash")]
    pub prev_hash: Hash,
    #[serde(with = "hex_hash")]
    pub hash: Hash,
    pub term: u64,
    pub index: u64,
    pub time_ms: u64,
    pub txs: Vec<Tx>,
}

/// The block hash of the formula above.
pub fn block_hash(prev_hash: &Hash, index: u64, term: u64, txs: &[Tx]) -> Hash {
    let mut h = Sha256::new();
    h.update(prev_hash);
    h.update(index.to_be_bytes());
    h.update(term.to_be_bytes());
    h.update(u32::try_from(txs.len()).unwrap_or(u32::MAX).to_be_bytes());
    for tx in txs {
        for field in [tx.kind.as_bytes(), tx.principal.as_bytes(), &tx.body] {
            h.update(u32::try_from(field.len()).unwrap_or(u32::MAX).to_be_bytes());
            h.update(field);
        }
    }
    h.finalize().into()
}

impl Block {
    /// Builds the block that follows `prev` (or the first one).
    pub fn next(prev: Option<&Block>, index: u64, term: u64, time_ms: u64, txs: Vec<Tx>) -> Self {
        let prev_hash = prev.map_or([0; 32], |b| b.hash);
        Self {
            height: index,
            prev_hash,
            hash: block_hash(&prev_hash, index, term, &txs),
            term,
            index,
            time_ms,
            txs,
        }
    }

    /// The hash recomputed from the block's contents.
    pub fn computed_hash(&self) -> Hash {
        block_hash(&self.prev_hash, self.index, self.term, &self.txs)
    }
}

/// The first problem `verify` found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error(
        "block {height}: its stored hash {stored} is not the hash of its contents ({computed}); the block was altered"
    )]
    Hash {
        height: u64,
        stored: String,
        computed: String,
    },
    #[error(
        "block {height}: prev_hash {found} is not the hash of block {prev} ({expected}); the chain was altered or spliced"
    )]
    Link {
        height: u64,
        prev: u64,
        found: String,
        expected: String,
    },
    #[error(
        "block {height}: expected height {expected} (heights must be contiguous, equal to the Raft index)"
    )]
    Gap { height: u64, expected: u64 },
    #[error("block {height}: cannot be read: {reason}")]
    Unreadable { height: u64, reason: String },
}

impl Broken {
    /// The height of the first bad block.
    pub fn height(&self) -> u64 {
        match self {
            Self::Hash { height, .. }
            | Self::Link { height, .. }
            | Self::Gap { height, .. }
            | Self::Unreadable { height, .. } => *height,
        }
    }
}

/// What a full verification saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub blocks: u64,
    pub head: Option<(u64, Hash)>,
}

/// Recomputes every hash from the first block given and checks every link.
/// `blocks` must be in height order; an `Err` item is an unreadable block.
pub fn verify<I>(blocks: I) -> Result<Verified, Broken>
where
    I: IntoIterator<Item = Result<Block, (u64, String)>>,
{
    let mut prev: Option<(u64, Hash)> = None;
    let mut count = 0;
    for b in blocks {
        let b = b.map_err(|(height, reason)| Broken::Unreadable { height, reason })?;
        if let Some((ph, phash)) = prev {
            if b.height != ph + 1 {
                return Err(Broken::Gap {
                    height: b.height,
                    expected: ph + 1,
                });
            }
            if b.prev_hash != phash {
                return Err(Broken::Link {
                    height: b.height,
                    prev: ph,
                    found: hex(&b.prev_hash),
                    expected: hex(&phash),
                });
            }
        } else if b.height != b.index {
            return Err(Broken::Gap {
                height: b.height,
                expected: b.index,
            });
        }
        let computed = b.computed_hash();
        if computed != b.hash {
            return Err(Broken::Hash {
                height: b.height,
                stored: hex(&b.hash),
                computed: hex(&computed),
            });
        }
        prev = Some((b.height, b.hash));
        count += 1;
    }
    Ok(Verified {
        blocks: count,
        head: prev,
    })
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Parses lowercase or uppercase hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

mod hex_hash {
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(h: &super::Hash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::hex(h))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<super::Hash, D::Error> {
        let s = String::deserialize(d)?;
        super::unhex(&s)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

mod hex_bytes {
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::hex(b))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        super::unhex(&s).ok_or_else(|| serde::de::Error::custom("expected hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(body: &str) -> Tx {
        Tx {
            kind: "note".into(),
            summary: String::new(),
            body: body.as_bytes().to_vec(),
            principal: "system".into(),
            rejected: None,
        }
    }

    fn chain(n: u64) -> Vec<Block> {
        let mut v: Vec<Block> = Vec::new();
        for i in 0..n {
            let b = Block::next(v.last(), i, 1, 1000 + i, vec![tx(&format!("{i}"))]);
            v.push(b);
        }
        v
    }

    #[test]
    fn hash_follows_the_documented_formula() {
        // Recomputed byte by byte, independently of block_hash.
        let t = tx("{}");
        let mut bytes = vec![0u8; 32];
        bytes.extend(7u64.to_be_bytes());
        bytes.extend(3u64.to_be_bytes());
        bytes.extend(1u32.to_be_bytes());
        for f in [&b"note"[..], b"system", b"{}"] {
            bytes.extend((f.len() as u32).to_be_bytes());
            bytes.extend(f);
        }
        let want: Hash = Sha256::digest(&bytes).into();
        assert_eq!(block_hash(&[0; 32], 7, 3, &[t]), want);
    }

    #[test]
    fn verify_accepts_a_good_chain_and_names_the_first_bad_block() {
        let good = chain(10);
        let v = verify(good.iter().cloned().map(Ok)).unwrap();
        assert_eq!(v.blocks, 10);
        assert_eq!(v.head.unwrap().0, 9);

        let mut altered = good.clone();
        altered[6].txs[0].body = b"evil".to_vec();
        let e = verify(altered.into_iter().map(Ok)).unwrap_err();
        assert!(matches!(e, Broken::Hash { height: 6, .. }), "{e}");

        // Rehashing the altered block breaks the next link instead.
        let mut rehashed = good.clone();
        rehashed[6].txs[0].body = b"evil".to_vec();
        rehashed[6].hash = rehashed[6].computed_hash();
        let e = verify(rehashed.into_iter().map(Ok)).unwrap_err();
        assert!(
            matches!(
                e,
                Broken::Link {
                    height: 7,
                    prev: 6,
                    ..
                }
            ),
            "{e}"
        );

        let mut gap = good;
        gap.remove(4);
        let e = verify(gap.into_iter().map(Ok)).unwrap_err();
        assert!(
            matches!(
                e,
                Broken::Gap {
                    height: 5,
                    expected: 4
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn blocks_round_trip_through_json() {
        let b = &chain(3)[2];
        let json = serde_json::to_string(b).unwrap();
        assert!(json.contains(&hex(&b.hash)));
        let back: Block = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, b);
    }
}
