//! Incarnations: how a node notices that its data dir was put back from an
//! old copy (a backup, a VM snapshot, a copy taken while it was stopped).
//!
//! Raft assumes a disk keeps what it acknowledged. A member that comes back
//! from an older copy has forgotten votes it gave and entries it
//! acknowledged; if it votes before catching up, it can help elect a leader
//! that lacks a committed entry (chaos soak, seed 20 on d422203: an
//! acknowledged write lost). So each start is numbered: the node writes
//! `incarnation + 1` to its own tree (fsynced) and then to its peers, who
//! keep the highest they were sent (fsynced). A node whose peers have seen
//! a higher incarnation than its data dir holds was restored from a copy
//! older than its last start: it records how far the cluster had got and
//! does not vote, nor campaign, until it has caught up to there under a
//! leader of that term or later ([`Recovery`], kept across restarts).
//!
//! The limit: a copy taken after the node's last start carries that start's
//! number and passes (a copy of a running node's files is also not
//! consistent). Taking copies of a stopped node and restarting it is what
//! this catches.

use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// This node's own incarnation.
const OWN: &[u8] = b"own";
/// This node's [`Recovery`], while it has one.
const RECOVERY: &[u8] = b"recovery";
/// Set by `trine node trust-data-dir` on a stopped node: its next start
/// takes the data dir as current (votes at once), then forgets the mark.
const TRUST: &[u8] = b"trust_once";
/// Prefix of a peer's highest recorded incarnation (then its id, big-endian).
const PEER: u8 = b'p';

/// Where a node restored from an old copy must catch up to before it votes:
/// the highest applied index and term its peers reported when it found out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    pub applied: u64,
    pub term: u64,
}

/// The `incarnation` tree. Cheap to clone (sled handles).
#[derive(Debug, Clone)]
pub struct Incarnations {
    db: sled::Db,
    tree: sled::Tree,
}

fn peer_key(id: NodeId) -> [u8; 9] {
    let mut k = [PEER; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn decode_u64(v: Option<sled::IVec>) -> u64 {
    v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes)
}

impl Incarnations {
    pub(super) fn new(db: &sled::Db) -> sled::Result<Self> {
        Ok(Self {
            db: db.clone(),
            tree: db.open_tree("incarnation")?,
        })
    }

    /// This node's incarnation as its data dir holds it (0: never started
    /// with incarnations).
    pub fn own(&self) -> sled::Result<u64> {
        Ok(decode_u64(self.tree.get(OWN)?))
    }

    /// Records this node's incarnation `n`, fsynced before it returns (it
    /// must be on disk before any peer hears of it).
    pub async fn set_own(&self, n: u64) -> sled::Result<()> {
        self.tree.insert(OWN, &n.to_be_bytes())?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Keeps the higher of `n` and what was recorded for peer `id`, fsynced;
    /// returns what was recorded before (0: nothing).
    pub async fn record_peer(&self, id: NodeId, n: u64) -> sled::Result<u64> {
        let key = peer_key(id);
        let before = self.tree.fetch_and_update(key, |old| {
            let old = decode_u64(old.map(sled::IVec::from));
            Some(old.max(n).to_be_bytes().to_vec())
        })?;
        self.db.flush_async().await?;
        Ok(decode_u64(before))
    }

    /// What was recorded for peer `id` (0: nothing), recording nothing.
    pub fn record_peer_seen(&self, id: NodeId) -> sled::Result<u64> {
        Ok(decode_u64(self.tree.get(peer_key(id))?))
    }

    /// Marks the data dir as current for the next start only, and drops
    /// any recovery (an operator regaining a lost quorum), fsynced.
    pub fn trust_once(&self) -> sled::Result<()> {
        self.tree.insert(TRUST, &[1u8])?;
        self.tree.remove(RECOVERY)?;
        self.db.flush()?;
        Ok(())
    }

    /// Whether the next start was marked to trust the data dir; clears
    /// the mark (fsynced).
    pub async fn take_trust(&self) -> sled::Result<bool> {
        let had = self.tree.remove(TRUST)?.is_some();
        if had {
            self.db.flush_async().await?;
        }
        Ok(had)
    }

    /// The recovery this node is in, if any (kept across restarts).
    pub fn recovery(&self) -> sled::Result<Option<Recovery>> {
        Ok(self
            .tree
            .get(RECOVERY)?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Sets or clears the recovery, fsynced.
    pub async fn set_recovery(&self, r: Option<Recovery>) -> sled::Result<()> {
        match r {
            Some(r) => {
                let v = serde_json::to_vec(&r).unwrap_or_default();
                self.tree.insert(RECOVERY, v)?;
            }
            None => {
                self.tree.remove(RECOVERY)?;
            }
        }
        self.db.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_record_keeps_the_highest_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            // As the store opens it: waiting for a lock a dropped store may still hold.
            let db = crate::store::open_db(dir.path()).unwrap();
            let inc = Incarnations::new(&db).unwrap();
            assert_eq!(inc.own().unwrap(), 0);
            inc.set_own(3).await.unwrap();
            assert_eq!(inc.record_peer(7, 5).await.unwrap(), 0);
            assert_eq!(inc.record_peer(7, 4).await.unwrap(), 5);
            assert_eq!(inc.record_peer(7, 6).await.unwrap(), 5);
            assert_eq!(inc.record_peer(8, 1).await.unwrap(), 0);
            let r = Recovery {
                applied: 90,
                term: 4,
            };
            inc.set_recovery(Some(r)).await.unwrap();
        }
        // As the store opens it: waiting for a lock a dropped store may still hold.
        let db = crate::store::open_db(dir.path()).unwrap();
        let inc = Incarnations::new(&db).unwrap();
        assert_eq!(inc.own().unwrap(), 3);
        assert_eq!(inc.record_peer(7, 0).await.unwrap(), 6);
        assert_eq!(
            inc.recovery().unwrap(),
            Some(Recovery {
                applied: 90,
                term: 4
            })
        );
        inc.set_recovery(None).await.unwrap();
        assert_eq!(inc.recovery().unwrap(), None);
        let r = Recovery {
            applied: 5,
            term: 1,
        };
        inc.set_recovery(Some(r)).await.unwrap();
        inc.trust_once().unwrap();
        assert_eq!(inc.recovery().unwrap(), None);
        assert!(inc.take_trust().await.unwrap());
        assert!(!inc.take_trust().await.unwrap());
    }
}
