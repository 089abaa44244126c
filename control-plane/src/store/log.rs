//! openraft's log storage on two sled trees: `log` (index → entry JSON) and
//! `raft_meta` (vote, committed log id, purge point).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    Entry, LogId, LogState, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};

use super::{index_of, key};
use crate::types::{NodeId, TypeConfig};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"last_purged";

type Result<T> = std::result::Result<T, StorageError<NodeId>>;

/// The Raft log. Cheap to clone (sled trees are handles).
#[derive(Debug, Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

fn io(e: StorageIOError<NodeId>) -> StorageError<NodeId> {
    StorageError::IO { source: e }
}

impl LogStore {
    pub(super) fn new(db: &sled::Db) -> sled::Result<Self> {
        Ok(Self {
            db: db.clone(),
            log: db.open_tree("log")?,
            meta: db.open_tree("raft_meta")?,
        })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        k: &[u8],
        err: fn(std::io::Error) -> StorageIOError<NodeId>,
    ) -> Result<Option<T>> {
        let Some(v) = self.meta.get(k).map_err(|e| io(err(e.into())))? else {
            return Ok(None);
        };
        serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| io(err(std::io::Error::other(e))))
    }

    fn put_meta<T: serde::Serialize>(
        &self,
        k: &[u8],
        v: &T,
        err: fn(std::io::Error) -> StorageIOError<NodeId>,
    ) -> Result<()> {
        let bytes = serde_json::to_vec(v).map_err(|e| io(err(std::io::Error::other(e))))?;
        self.meta.insert(k, bytes).map_err(|e| io(err(e.into())))?;
        Ok(())
    }

    async fn flush(&self, err: fn(std::io::Error) -> StorageIOError<NodeId>) -> Result<()> {
        self.db.flush_async().await.map_err(|e| io(err(e.into())))?;
        Ok(())
    }

    /// Forgets, at start, that this node led: a committed vote for itself
    /// becomes an uncommitted one, so the node starts as a follower and
    /// must win an election to lead again, with its log compared to the
    /// others'. openraft would otherwise resume leadership in the same
    /// term from the vote alone — and a leader restarted from an old copy
    /// of its data dir then wrote different entries under log ids the
    /// followers already held, and the chains diverged (found by
    /// `trine chaos soak`, stale-data-dir on the leader). Stepping down is
    /// always safe: a vote only loses its claim to leadership.
    pub(super) fn step_down(&self) -> sled::Result<()> {
        let Ok(Some(mut vote)) =
            self.get_meta::<Vote<NodeId>>(VOTE, |e| StorageIOError::read_vote(&e))
        else {
            return Ok(());
        };
        if !vote.committed {
            return Ok(());
        }
        vote.committed = false;
        if let Ok(bytes) = serde_json::to_vec(&vote) {
            self.meta.insert(VOTE, bytes)?;
            self.db.flush()?;
        }
        Ok(())
    }

    fn last_purged(&self) -> Result<Option<LogId<NodeId>>> {
        self.get_meta(PURGED, |e| StorageIOError::read_logs(&e))
    }
}

fn decode(v: &[u8]) -> Result<Entry<TypeConfig>> {
    serde_json::from_slice(v).map_err(|e| io(StorageIOError::read_logs(&e)))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(key(*i)),
            Bound::Excluded(i) => Bound::Excluded(key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(key(*i)),
            Bound::Excluded(i) => Bound::Excluded(key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.log
            .range::<[u8; 8], _>((start, end))
            .map(|kv| {
                let (_, v) = kv.map_err(|e| io(StorageIOError::read_logs(&e)))?;
                decode(&v)
            })
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let last_purged_log_id = self.last_purged()?;
        let last = self
            .log
            .last()
            .map_err(|e| io(StorageIOError::read_logs(&e)))?;
        let last_log_id = match last {
            Some((_, v)) => Some(decode(&v)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        self.put_meta(VOTE, vote, |e| StorageIOError::write_vote(&e))?;
        self.flush(|e| StorageIOError::write_vote(&e)).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        self.get_meta(VOTE, |e| StorageIOError::read_vote(&e))
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<()> {
        // Not fsynced: a lost committed id only means re-applying from an
        // older point on restart.
        self.put_meta(COMMITTED, &committed, |e| StorageIOError::write_logs(&e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>(COMMITTED, |e| StorageIOError::read_logs(&e))?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes =
                serde_json::to_vec(&entry).map_err(|e| io(StorageIOError::write_logs(&e)))?;
            batch.insert(&key(entry.log_id.index), bytes);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io(StorageIOError::write_logs(&e)))?;
        // Acknowledged only once on disk: an appended entry survives kill -9.
        let flushed = self.db.flush_async().await.map(|_| ());
        callback.log_io_completed(flushed.map_err(std::io::Error::from));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let mut batch = sled::Batch::default();
        for k in self.log.range(key(log_id.index)..).keys() {
            batch.remove(k.map_err(|e| io(StorageIOError::write_logs(&e)))?);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io(StorageIOError::write_logs(&e)))?;
        self.flush(|e| StorageIOError::write_logs(&e)).await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        // The state machine shares this database: flushing first makes the
        // applied state that covers the purged entries durable.
        self.flush(|e| StorageIOError::write_logs(&e)).await?;
        self.put_meta(PURGED, &log_id, |e| StorageIOError::write_logs(&e))?;
        let mut batch = sled::Batch::default();
        for k in self.log.range(..=key(log_id.index)).keys() {
            let k = k.map_err(|e| io(StorageIOError::write_logs(&e)))?;
            debug_assert!(index_of(&k).is_some_and(|i| i <= log_id.index));
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io(StorageIOError::write_logs(&e)))?;
        self.flush(|e| StorageIOError::write_logs(&e)).await
    }
}
