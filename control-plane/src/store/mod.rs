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
    let db = sled::Config::new()
        .path(&db_path)
        .cache_capacity(CACHE_BYTES)
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(|e| Error::Open {
            path: db_path.display().to_string(),
            reason: e.to_string(),
        })?;
    let log = LogStore::new(&db).map_err(|e| damaged(&db_path, &e))?;
    log.step_down().map_err(|e| damaged(&db_path, &e))?;
    let sm = StateMachine::open(&db, snapshot_path(dir), dir.join("chain"))
        .map_err(|e| damaged(&db_path, &e))?;
    let incarnations = Incarnations::new(&db).map_err(|e| damaged(&db_path, &e))?;
    Ok((log, sm, incarnations))
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
