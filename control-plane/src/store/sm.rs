//! openraft's state machine: the cluster [`State`] (in memory, written
//! through to the `nodes` tree), the chain (its newest blocks in the `chain`
//! tree, height → block JSON; older ones in the [`Archive`]), the applied
//! log id and membership (`sm_meta`), and snapshots.

use std::io::{Cursor, Write as _};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use sled::Transactional as _;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::archive::{Archive, SEGMENT_BLOCKS};
use super::{index_of, key};
use crate::chain::{Block, Tx};
use crate::command::{Row, State};
use crate::metrics;
use crate::types::{Member, NodeId, Response, TypeConfig};

type Result<T> = std::result::Result<T, StorageError<NodeId>>;
type Membership = StoredMembership<NodeId, Member>;

const APPLIED: &[u8] = b"last_applied";
/// Newest blocks a snapshot carries.
pub const SNAPSHOT_CHAIN_TAIL: u64 = 10_000;
/// Newest blocks always kept in sled (at least the snapshot's tail, so
/// building a snapshot never reads the archive); older ones are archived
/// in whole segments when a snapshot is built.
const HOT_BLOCKS: u64 = SNAPSHOT_CHAIN_TAIL;
const MEMBERSHIP: &[u8] = b"membership";

fn io(e: StorageIOError<NodeId>) -> StorageError<NodeId> {
    StorageError::IO { source: e }
}

fn sm_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    io(StorageIOError::write_state_machine(&e))
}

/// What the state machine holds in memory.
#[derive(Debug, Default)]
struct Inner {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    state: State,
    head: Option<Block>,
    recent: Recent,
}

/// How long (in block time) and how many committed groups the state
/// machine remembers by id, to answer a group sent again instead of
/// applying it twice. A sender retries for at most 10 s (its proposal
/// deadline); the span leaves room for clocks that disagree.
pub const RECENT_SPAN_MS: u64 = 120_000;
pub const RECENT_MAX: usize = 65_536;
/// Key prefix of a remembered group's row in the `state` tree.
const RECENT_ROW: u8 = b'r';

/// A group committed lately: where, when, how many commands, and the ones
/// the state machine refused (with why).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Committed {
    id: u64,
    index: u64,
    time_ms: u64,
    commands: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rejected: Vec<(u32, String)>,
}

impl Committed {
    /// The answers the group got when it was committed.
    fn responses(&self) -> Vec<Response> {
        (0..self.commands)
            .map(|tx| Response {
                index: self.index,
                tx,
                rejected: self
                    .rejected
                    .iter()
                    .find(|(i, _)| *i == tx)
                    .map(|(_, why)| why.clone()),
            })
            .collect()
    }

    fn row_key(id: u64) -> Vec<u8> {
        let mut k = vec![RECENT_ROW];
        k.extend_from_slice(&id.to_be_bytes());
        k
    }
}

/// The groups committed lately, by id and by log index (oldest first).
/// Part of the replicated state: every member drops the same ones at the
/// same entry (by block time and count), so each answers a retried group
/// the same way.
#[derive(Debug, Clone, Default)]
struct Recent {
    by_id: std::collections::HashMap<u64, Committed>,
    by_index: std::collections::BTreeMap<u64, u64>,
}

impl Recent {
    fn get(&self, id: u64) -> Option<&Committed> {
        self.by_id.get(&id)
    }

    fn insert(&mut self, c: Committed) {
        self.by_index.insert(c.index, c.id);
        self.by_id.insert(c.id, c);
    }

    /// Records `c` and forgets the groups now out of the window; returns
    /// the rows to write (`Some`) and delete (`None`).
    fn remember(&mut self, c: Committed) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let now = c.time_ms;
        let mut rows = vec![(
            Committed::row_key(c.id),
            Some(serde_json::to_vec(&c).unwrap_or_default()),
        )];
        self.insert(c);
        while let Some((_, &id)) = self.by_index.first_key_value() {
            let old = self
                .by_id
                .get(&id)
                .is_none_or(|o| o.time_ms.saturating_add(RECENT_SPAN_MS) < now);
            if !old && self.by_id.len() <= RECENT_MAX {
                break;
            }
            self.by_index.pop_first();
            self.by_id.remove(&id);
            rows.push((Committed::row_key(id), None));
        }
        rows
    }

    fn load_row(&mut self, value: &[u8]) -> std::result::Result<(), String> {
        let c: Committed =
            serde_json::from_slice(value).map_err(|e| format!("committed group row: {e}"))?;
        self.insert(c);
        Ok(())
    }

    fn rows(&self) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> + '_ {
        self.by_id.values().map(|c| {
            (
                Committed::row_key(c.id),
                serde_json::to_vec(c).unwrap_or_default(),
            )
        })
    }

    /// Oldest first, for the snapshot.
    fn list(&self) -> Vec<Committed> {
        self.by_index
            .values()
            .filter_map(|id| self.by_id.get(id).cloned())
            .collect()
    }

    fn from_list(list: Vec<Committed>) -> Self {
        let mut r = Self::default();
        for c in list {
            r.insert(c);
        }
        r
    }
}

/// Shared by the state machine, its snapshot builder and every [`Reader`].
#[derive(Debug)]
struct Shared {
    db: sled::Db,
    chain: sled::Tree,
    /// The [`State`]'s rows (see [`State::row_bytes`]).
    rows: sled::Tree,
    meta: sled::Tree,
    inner: RwLock<Inner>,
    archive: Archive,
    snapshot_path: PathBuf,
    /// Serializes snapshot writes (builder and installer).
    snapshot_lock: tokio::sync::Mutex<u64>,
}

/// The state machine half of the store.
#[derive(Debug, Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
}

/// Read access to the applied state, for the admin API and the maintainer.
#[derive(Debug, Clone)]
pub struct Reader {
    shared: Arc<Shared>,
}

/// The snapshot's data: everything `apply` built.
#[derive(Debug, Serialize, Deserialize)]
struct Image {
    state: State,
    chain: Vec<Block>,
    /// The groups committed lately (absent from older snapshots).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    recent: Vec<Committed>,
}

impl StateMachine {
    pub(super) fn open(
        db: &sled::Db,
        snapshot_path: PathBuf,
        archive_dir: PathBuf,
    ) -> std::result::Result<Self, String> {
        let archive = Archive::open(archive_dir)?;
        let t = |name: &str| db.open_tree(name).map_err(|e| e.to_string());
        let (chain, rows, meta) = (t("chain")?, t("state")?, t("sm_meta")?);
        let get = |k: &[u8]| -> std::result::Result<Option<sled::IVec>, String> {
            meta.get(k).map_err(|e| e.to_string())
        };
        let last_applied = match get(APPLIED)? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| format!("last_applied: {e}"))?,
            None => None,
        };
        let membership = match get(MEMBERSHIP)? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| format!("membership: {e}"))?,
            None => Membership::default(),
        };
        let mut state = State::default();
        let mut recent = Recent::default();
        for kv in rows.iter() {
            let (k, v) = kv.map_err(|e| e.to_string())?;
            if k.first() == Some(&RECENT_ROW) {
                recent.load_row(&v)?;
            } else {
                state.load_row(&k, &v)?;
            }
        }
        let head = match chain.last().map_err(|e| e.to_string())? {
            Some((_, v)) => {
                Some(serde_json::from_slice(&v).map_err(|e| format!("chain head: {e}"))?)
            }
            None => match archive.last() {
                Some(h) => archive.block(h)?,
                None => None,
            },
        };
        let shared = Shared {
            db: db.clone(),
            chain,
            rows,
            meta,
            inner: RwLock::new(Inner {
                last_applied,
                membership,
                state,
                head,
                recent,
            }),
            archive,
            snapshot_path,
            snapshot_lock: tokio::sync::Mutex::new(0),
        };
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    pub fn reader(&self) -> Reader {
        Reader {
            shared: self.shared.clone(),
        }
    }
}

/// What one entry adds: its transactions, its block time, the responses
/// of its requests, and the state rows it changed.
struct Applied {
    txs: Vec<Tx>,
    time_ms: u64,
    responses: Vec<Response>,
    touched: Vec<Row>,
    /// Rows of remembered groups to write (`Some`) or delete.
    recent: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

fn entry_txs(inner: &mut Inner, entry: &openraft::Entry<TypeConfig>) -> Applied {
    let prev_time = inner.head.as_ref().map_or(0, |b| b.time_ms);
    let index = entry.log_id.index;
    match &entry.payload {
        EntryPayload::Blank => Applied {
            txs: Vec::new(),
            time_ms: prev_time,
            responses: Vec::new(),
            touched: Vec::new(),
            recent: Vec::new(),
        },
        EntryPayload::Normal(batch) if batch.id != 0 && inner.recent.get(batch.id).is_some() => {
            // Sent again by a member whose leader stepped down before
            // answering: answered as it was, applied once. The block
            // records the retry.
            // (The guard found the group; the fallback never runs.)
            let (at, responses) = inner
                .recent
                .get(batch.id)
                .map_or_else(Default::default, |c| (c.index, c.responses()));
            metrics::duplicate_group();
            Applied {
                txs: vec![Tx {
                    kind: "duplicate".into(),
                    summary: format!(
                        "group {:016x} of {} commands sent again; committed at height {at}, not applied twice",
                        batch.id,
                        batch.requests.len()
                    ),
                    body: serde_json::to_vec(
                        &serde_json::json!({ "group": batch.id, "committed_at": at }),
                    )
                    .unwrap_or_default(),
                    principal: "system".into(),
                    rejected: None,
                }],
                time_ms: prev_time,
                responses,
                touched: Vec::new(),
                recent: Vec::new(),
            }
        }
        EntryPayload::Normal(batch) => {
            let mut a = Applied {
                txs: Vec::with_capacity(batch.requests.len()),
                time_ms: prev_time,
                responses: Vec::with_capacity(batch.requests.len()),
                touched: Vec::new(),
                recent: Vec::new(),
            };
            for (i, req) in batch.requests.iter().enumerate() {
                a.touched.extend(req.command.touches(&inner.state));
                let rejected = inner.state.apply(&req.command, req.time_ms).err();
                a.time_ms = a.time_ms.max(req.time_ms);
                a.txs.push(Tx {
                    kind: req.command.kind().into(),
                    summary: req.command.summary(),
                    body: serde_json::to_vec(req).unwrap_or_default(),
                    principal: req.principal.clone(),
                    rejected: rejected.clone(),
                });
                a.responses.push(Response {
                    index,
                    tx: u32::try_from(i).unwrap_or(u32::MAX),
                    rejected,
                });
            }
            if batch.id != 0 {
                let rejected = a
                    .responses
                    .iter()
                    .filter_map(|r| r.rejected.clone().map(|why| (r.tx, why)))
                    .collect();
                a.recent = inner.recent.remember(Committed {
                    id: batch.id,
                    index,
                    time_ms: a.time_ms,
                    commands: u32::try_from(batch.requests.len()).unwrap_or(u32::MAX),
                    rejected,
                });
            }
            a
        }
        EntryPayload::Membership(m) => {
            inner.membership = StoredMembership::new(Some(entry.log_id), m.clone());
            let voters: Vec<String> = m.voter_ids().map(|v| v.to_string()).collect();
            Applied {
                txs: vec![Tx {
                    kind: "membership".into(),
                    summary: format!("voters {}", voters.join(",")),
                    body: serde_json::to_vec(m).unwrap_or_default(),
                    principal: "system".into(),
                    rejected: None,
                }],
                time_ms: prev_time,
                responses: Vec::new(),
                touched: Vec::new(),
                recent: Vec::new(),
            }
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership)> {
        let inner = self.shared.inner.read().map_err(|_| poisoned())?;
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Response>>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let sh = &self.shared;
        let mut inner = sh.inner.write().map_err(|_| poisoned())?;
        let mut chain = sled::Batch::default();
        let mut rows = sled::Batch::default();
        let mut responses = Vec::new();
        let mut txs_total = 0u64;
        let mut membership_changed = false;
        for entry in entries {
            let Applied {
                txs,
                time_ms,
                responses: entry_responses,
                touched,
                recent,
            } = entry_txs(&mut inner, &entry);
            membership_changed |= matches!(entry.payload, EntryPayload::Membership(_));
            txs_total += txs.len() as u64;
            let block = Block::next(
                inner.head.as_ref(),
                entry.log_id.index,
                entry.log_id.leader_id.term,
                time_ms,
                txs,
            );
            chain.insert(
                &key(block.height),
                serde_json::to_vec(&block).map_err(sm_err)?,
            );
            for row in touched {
                match inner.state.row_bytes(&row).map_err(sm_err)? {
                    (k, Some(v)) => rows.insert(k, v),
                    (k, None) => rows.remove(k),
                }
            }
            for (k, v) in recent {
                match v {
                    Some(v) => rows.insert(k, v),
                    None => rows.remove(k),
                }
            }
            inner.head = Some(block);
            inner.last_applied = Some(entry.log_id);
            responses.push(entry_responses);
        }
        // One transaction: the blocks, the state rows and the applied id
        // persist together or not at all, so a crash never leaves state
        // that re-applying the same entries would change twice (placement
        // generations count).
        let applied = serde_json::to_vec(&inner.last_applied).map_err(sm_err)?;
        let membership = if membership_changed {
            Some(serde_json::to_vec(&inner.membership).map_err(sm_err)?)
        } else {
            None
        };
        (&sh.chain, &sh.rows, &sh.meta)
            .transaction(|(c, r, m)| {
                c.apply_batch(&chain)?;
                r.apply_batch(&rows)?;
                m.insert(APPLIED, applied.as_slice())?;
                if let Some(v) = &membership {
                    m.insert(MEMBERSHIP, v.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(tx_err)?;
        metrics::chain_applied(inner.head.as_ref().map_or(0, |b| b.height), txs_total);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let data = snapshot.into_inner();
        let image: Image = serde_json::from_slice(&data)
            .map_err(|e| io(StorageIOError::read_snapshot(Some(meta.signature()), &e)))?;
        let sh = &self.shared;
        let mut guard = sh.snapshot_lock.lock().await;
        {
            let mut inner = sh.inner.write().map_err(|_| poisoned())?;
            // The archive goes first: a crash after it leaves the old state
            // and applied id, and the leader sends the snapshot again.
            sh.archive.clear().map_err(sm_err)?;
            let mut chain = sled::Batch::default();
            for kv in sh.chain.iter().keys() {
                chain.remove(kv.map_err(sm_err)?);
            }
            for b in &image.chain {
                chain.insert(&key(b.height), serde_json::to_vec(b).map_err(sm_err)?);
            }
            let mut rows = sled::Batch::default();
            for kv in sh.rows.iter().keys() {
                rows.remove(kv.map_err(sm_err)?);
            }
            for row in image.state.rows() {
                if let (k, Some(v)) = image.state.row_bytes(&row).map_err(sm_err)? {
                    rows.insert(k, v);
                }
            }
            let recent = Recent::from_list(image.recent);
            for (k, v) in recent.rows() {
                rows.insert(k, v);
            }
            let applied = serde_json::to_vec(&meta.last_log_id).map_err(sm_err)?;
            let membership = serde_json::to_vec(&meta.last_membership).map_err(sm_err)?;
            (&sh.chain, &sh.rows, &sh.meta)
                .transaction(|(c, r, m)| {
                    c.apply_batch(&chain)?;
                    r.apply_batch(&rows)?;
                    m.insert(APPLIED, applied.as_slice())?;
                    m.insert(MEMBERSHIP, membership.as_slice())?;
                    Ok::<_, ConflictableTransactionError<()>>(())
                })
                .map_err(tx_err)?;
            inner.state = image.state;
            inner.recent = recent;
            inner.head = image.chain.last().cloned();
            inner.last_applied = meta.last_log_id;
            inner.membership = meta.last_membership.clone();
            metrics::chain_applied(inner.head.as_ref().map_or(0, |b| b.height), 0);
        }
        sh.db.flush_async().await.map_err(sm_err)?;
        write_snapshot_file(&sh.snapshot_path, meta, &data)
            .map_err(|e| io(StorageIOError::write_snapshot(Some(meta.signature()), &e)))?;
        *guard += 1;
        metrics::snapshot("installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        let _guard = self.shared.snapshot_lock.lock().await;
        read_snapshot_file(&self.shared.snapshot_path)
            .map_err(|e| io(StorageIOError::read_snapshot(None, &e)))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let sh = &self.shared;
        let mut guard = sh.snapshot_lock.lock().await;
        let (last_applied, membership, state, recent) = {
            let inner = sh.inner.read().map_err(|_| poisoned())?;
            (
                inner.last_applied,
                inner.membership.clone(),
                inner.state.clone(),
                inner.recent.list(),
            )
        };
        // Blocks up to last_applied never change once written (only an
        // installed snapshot replaces them, and that holds the same lock).
        // Only the chain's tail travels: a snapshot's size (and the memory
        // to build or install it) stays bounded however long the chain
        // grows. Members that catch up by snapshot hold the chain from
        // there on; every original member keeps it whole.
        let mut chain = Vec::new();
        if let Some(last) = last_applied {
            let from = last.index.saturating_sub(SNAPSHOT_CHAIN_TAIL - 1);
            for kv in sh.chain.range(key(from)..=key(last.index)) {
                let (_, v) = kv.map_err(|e| io(StorageIOError::read_state_machine(&e)))?;
                chain.push(
                    serde_json::from_slice(&v)
                        .map_err(|e| io(StorageIOError::read_state_machine(&e)))?,
                );
            }
        }
        let data = serde_json::to_vec(&Image {
            state,
            chain,
            recent,
        })
        .map_err(|e| io(StorageIOError::read_state_machine(&e)))?;
        *guard += 1;
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id: format!(
                "{}-{}-{}",
                last_applied.map_or(0, |l| l.leader_id.term),
                last_applied.map_or(0, |l| l.index),
                *guard
            ),
        };
        write_snapshot_file(&sh.snapshot_path, &meta, &data)
            .map_err(|e| io(StorageIOError::write_snapshot(Some(meta.signature()), &e)))?;
        metrics::snapshot("built");
        if let Some(last) = last_applied {
            // Still under the snapshot lock: no install replaces the chain
            // while blocks move.
            let shared = self.shared.clone();
            match tokio::task::spawn_blocking(move || archive_old(&shared, last.index)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::debug!(segments = n, "archived old chain blocks"),
                Ok(Err(e)) => tracing::warn!(
                    "chain blocks stay in sled for now: {e}; run `trine chain verify` on this node"
                ),
                Err(e) => tracing::warn!("chain archiving stopped: {e}"),
            }
        }
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

/// Moves whole segments of blocks older than the hot window from sled
/// into the archive; returns how many segments it wrote. Each segment is
/// durable before its blocks leave sled.
fn archive_old(sh: &Shared, applied: u64) -> std::result::Result<usize, String> {
    let cutoff = applied.saturating_sub(HOT_BLOCKS) / SEGMENT_BLOCKS * SEGMENT_BLOCKS;
    let mut written = 0;
    loop {
        let Some((k, _)) = sh.chain.first().map_err(|e| e.to_string())? else {
            return Ok(written);
        };
        let start = index_of(&k).ok_or("a chain key is not a height")?;
        if start >= cutoff {
            return Ok(written);
        }
        let end = ((start / SEGMENT_BLOCKS + 1) * SEGMENT_BLOCKS).min(cutoff);
        let archived = sh
            .archive
            .segment_of(start)
            .is_some_and(|(_, last)| last + 1 >= end);
        if !archived {
            let mut blocks = Vec::new();
            for kv in sh.chain.range(key(start)..key(end)) {
                let (k, v) = kv.map_err(|e| e.to_string())?;
                let h = index_of(&k).ok_or("a chain key is not a height")?;
                let b: Block = serde_json::from_slice(&v).map_err(|e| format!("block {h}: {e}"))?;
                if b.height != start + blocks.len() as u64 {
                    return Err(format!(
                        "block {} is missing from sled",
                        start + blocks.len() as u64
                    ));
                }
                blocks.push(b);
            }
            sh.archive
                .write(&blocks)
                .map_err(|e| format!("writing a chain segment: {e}"))?;
            written += 1;
        }
        let mut batch = sled::Batch::default();
        for h in start..end {
            batch.remove(&key(h));
        }
        sh.chain.apply_batch(batch).map_err(|e| e.to_string())?;
    }
}

fn tx_err(e: TransactionError<()>) -> StorageError<NodeId> {
    match e {
        TransactionError::Storage(e) => sm_err(e),
        TransactionError::Abort(()) => sm_err(std::io::Error::other("transaction aborted")),
    }
}

fn poisoned() -> StorageError<NodeId> {
    io(StorageIOError::read_state_machine(&std::io::Error::other(
        "state machine lock poisoned by an earlier panic",
    )))
}

/// `u32be(meta length) ‖ meta JSON ‖ data`, written to a temp file,
/// fsynced, then renamed over the old snapshot.
fn write_snapshot_file(
    path: &std::path::Path,
    meta: &SnapshotMeta<NodeId, Member>,
    data: &[u8],
) -> std::io::Result<()> {
    let meta = serde_json::to_vec(meta).map_err(std::io::Error::other)?;
    let len = u32::try_from(meta.len()).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&len.to_be_bytes())?;
    f.write_all(&meta)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_snapshot_file(path: &std::path::Path) -> std::io::Result<Option<Snapshot<TypeConfig>>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = |what: &str| std::io::Error::other(format!("{}: {what}", path.display()));
    let len = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| bad("shorter than its header"))? as usize;
    let meta_bytes = bytes
        .get(4..4 + len)
        .ok_or_else(|| bad("truncated metadata"))?;
    let meta = serde_json::from_slice(meta_bytes).map_err(|e| bad(&e.to_string()))?;
    Ok(Some(Snapshot {
        meta,
        snapshot: Box::new(Cursor::new(bytes[4 + len..].to_vec())),
    }))
}

impl Reader {
    fn inner(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A poisoned lock means a panic in apply; reading what is there is
        // still the best answer for an operator.
        self.shared
            .inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.inner().last_applied
    }

    pub fn membership(&self) -> Membership {
        self.inner().membership.clone()
    }

    pub fn state(&self) -> State {
        self.inner().state.clone()
    }

    /// `f` of the state, read in place (no copy).
    pub fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.inner().state)
    }

    /// The newest block.
    pub fn head(&self) -> Option<Block> {
        self.inner().head.clone()
    }

    pub fn block(&self, height: u64) -> std::result::Result<Option<Block>, String> {
        let sh = &self.shared;
        match sh.chain.get(key(height)).map_err(|e| e.to_string())? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| format!("block {height}: {e}")),
            None => sh.archive.block(height),
        }
    }

    /// Up to `limit` blocks from `from` (inclusive), in height order,
    /// archived ones first; an unreadable block is an `Err` item naming its
    /// height. A missing height is skipped (so `verify` sees the gap).
    pub fn blocks(
        &self,
        from: u64,
        limit: usize,
    ) -> impl Iterator<Item = std::result::Result<Block, (u64, String)>> + Send + 'static {
        Blocks {
            shared: self.shared.clone(),
            next: Some(from),
            left: limit,
        }
    }

    /// The first block held (0 unless a snapshot started the chain later).
    pub fn first_height(&self) -> Option<u64> {
        match (self.shared.archive.first(), self.hot_first_height()) {
            (Some(a), Some(h)) => Some(a.min(h)),
            (a, h) => a.or(h),
        }
    }

    /// The oldest block still in sled (newer than everything archived).
    pub fn hot_first_height(&self) -> Option<u64> {
        self.shared
            .chain
            .first()
            .ok()
            .flatten()
            .and_then(|(k, _)| index_of(&k))
    }

    /// Bytes the chain archive's segment files occupy, and their count.
    pub fn archive_bytes(&self) -> (u64, usize) {
        (
            self.shared.archive.disk_bytes(),
            self.shared.archive.segment_count(),
        )
    }

    /// Bytes the sled database occupies on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.shared.db.size_on_disk().unwrap_or(0)
    }
}

/// [`Reader::blocks`]: walks heights one by one, from sled or the archive,
/// so blocks moving between them mid-walk are neither lost nor repeated.
struct Blocks {
    shared: Arc<Shared>,
    next: Option<u64>,
    left: usize,
}

impl Iterator for Blocks {
    type Item = std::result::Result<Block, (u64, String)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let sh = &self.shared;
        let h = self.next?;
        let item = match sh.chain.get(key(h)) {
            Err(e) => Err((h, e.to_string())),
            Ok(Some(v)) => serde_json::from_slice(&v).map_err(|e| (h, e.to_string())),
            Ok(None) => match sh.archive.block(h) {
                Ok(Some(b)) => Ok(b),
                Err(e) => {
                    // The whole segment is unreadable: report it once.
                    let last = sh.archive.segment_of(h).map_or(h, |(_, l)| l);
                    self.next = last.checked_add(1);
                    self.left -= 1;
                    return Some(Err((h, e)));
                }
                Ok(None) => {
                    // A hole: go on at the next held height, if any.
                    let hot = sh
                        .chain
                        .range(key(h)..)
                        .next()
                        .and_then(|kv| kv.ok())
                        .and_then(|(k, _)| index_of(&k));
                    let cold = sh.archive.next_held(h);
                    self.next = match (hot, cold) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    return self.next();
                }
            },
        };
        self.next = h.checked_add(1);
        self.left -= 1;
        Some(item)
    }
}
