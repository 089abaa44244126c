//! The Raft log and state machine on sled, in one database under the node's
//! data dir (`raft/db`), plus the current snapshot (`raft/snapshot.bin`) and
//! the chain's archived segments (`raft/chain/`).
//!
//! - `log`: [`LogStore`], openraft's `RaftLogStorage` (entries, vote,
//!   committed id, purge point). Appends and votes are fsynced before they
//!   are acknowledged.
//! - `sm`: [`StateMachine`], openraft's `RaftStateMachine` (cluster state
//!   and chain), its snapshots, and [`Reader`] for everyone else.
//! - `incarnation`: [`Incarnations`], this node's start count and its
//!   peers', which tell a data dir put back from an old copy.
//! - `archive`: old chain blocks, moved out of sled in compressed segments
//!   so sled stays the size of the newest blocks however long the chain.
//!
//! Durability: the state machine is written without fsync (the log is the
//! source of truth and re-applying is idempotent), but the database is
//! fsynced before any log entry is purged, so a purge never outruns the
//! applied state that replaces it.

mod archive;
mod incarnation;
mod log;
mod sm;

use std::path::{Path, PathBuf};

pub use incarnation::{Incarnations, Recovery};
pub use log::LogStore;
pub use sm::{RECENT_MAX, RECENT_SPAN_MS, Reader, SNAPSHOT_CHAIN_TAIL, StateMachine};
/// Blocks per archived chain segment.
pub const CHAIN_SEGMENT_BLOCKS: u64 = archive::SEGMENT_BLOCKS;

/// sled's page cache: the state is small; the chain is read by range.
const CACHE_BYTES: u64 = 64 << 20;

/// How long [`open`] waits for sled's lock on its database file. A store
/// dropped in this process can hold it a moment longer: sled's background
/// I/O threads keep the file open until their last write ends. Another
/// process never gets this far (the node's data-dir lock refuses it
/// first), so the wait is only for that hand-over, as bbolt's open timeout.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot open the Raft store in {path}: {reason}; if another trine process uses this data dir, stop it first"
    )]
    Open { path: String, reason: String },
    #[error("Raft store in {path} is damaged: {reason}")]
    Damaged { path: String, reason: String },
}

/// Opens (creating if needed) the store in `dir`.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachine), Error> {
    open_all(dir).map(|(log, sm, _)| (log, sm))
}

/// [`open`], with the node's [`Incarnations`] (same database).
pub fn open_all(dir: &Path) -> Result<(LogStore, StateMachine, Incarnations), Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Open {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let db_path = dir.join("db");
    let db = open_db(&db_path)?;
    let log = LogStore::new(&db).map_err(|e| damaged(&db_path, &e))?;
    log.step_down().map_err(|e| damaged(&db_path, &e))?;
    let sm = StateMachine::open(&db, snapshot_path(dir), dir.join("chain"))
        .map_err(|e| damaged(&db_path, &e))?;
    let incarnations = Incarnations::new(&db).map_err(|e| damaged(&db_path, &e))?;
    Ok((log, sm, incarnations))
}

/// Opens sled at `path`, waiting up to [`LOCK_WAIT`] while its file lock is
/// still held (sled reports that as an I/O error whose text says so).
pub(crate) fn open_db(path: &Path) -> Result<sled::Db, Error> {
    let start = std::time::Instant::now();
    loop {
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            .mode(sled::Mode::HighThroughput);
        match config.open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && start.elapsed() < LOCK_WAIT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                return Err(Error::Open {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                });
            }
        }
    }
}

/// Marks a stopped node's data dir as current for its next start (see
/// [`Incarnations::trust_once`]).
pub fn trust_data_dir(dir: &Path) -> Result<(), Error> {
    let (_, _, inc) = open_all(dir)?;
    inc.trust_once().map_err(|e| damaged(&dir.join("db"), &e))
}

fn damaged(path: &Path, e: &dyn std::fmt::Display) -> Error {
    Error::Damaged {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn snapshot_path(dir: &Path) -> PathBuf {
    dir.join("snapshot.bin")
}

/// Big-endian key of a log index or chain height (sorted like the numbers).
fn key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

fn index_of(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn open_waits_for_a_lock_released_in_this_process() {
        let dir = tempfile::tempdir().unwrap();
        let held = open(dir.path()).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        // The first store still holds sled's lock when this starts.
        let reopened = open(dir.path());
        release.join().unwrap();
        assert!(reopened.is_ok(), "{:?}", reopened.err());
    }

    #[test]
    fn open_refuses_a_lock_held_past_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let _held = open(dir.path()).unwrap();
        let Err(e) = open(dir.path()) else {
            panic!("opened a store whose lock is held");
        };
        let text = e.to_string();
        assert!(
            matches!(e, Error::Open { .. }) && text.contains("could not acquire lock"),
            "{text}"
        );
        assert!(text.contains("stop it first"), "{text}");
    }
}
