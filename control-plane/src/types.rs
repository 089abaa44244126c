//! The openraft type configuration and the data that travels through it.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::command::Command;

/// Raft node id: chosen once per node (a hash of its libp2p peer id) and
/// kept in the data dir.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// Trine's Raft types.
    pub TypeConfig:
        D = Batch,
        R = Vec<Response>,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle for this configuration.
pub type Raft = openraft::Raft<TypeConfig>;

/// What Raft membership records about a member: where its Raft endpoint
/// is and where it runs (voter placement reads the region).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// host:port of the member's mutual-TLS Raft endpoint.
    pub addr: String,
    pub region: String,
    pub name: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{} ({})", self.name, self.addr, self.region)
    }
}

/// An application log entry: a command, who asked for it, and when (the
/// proposing node's clock; the block's time, identical on every replica).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub time_ms: u64,
    /// A token name, a node ("node:<name>"), or "system".
    pub principal: String,
    pub command: Command,
}

impl Request {
    /// `command` by `principal`, stamped with this node's clock.
    pub fn now(principal: impl Into<String>, command: Command) -> Self {
        Self {
            time_ms: crate::clock::now_ms(),
            principal: principal.into(),
            command,
        }
    }
}

/// A client's bearer secret, carried beside a write the client asked for so
/// that the leader can check the write's principal when a member forwards
/// it (a member's certificate alone cannot write as a client). It never
/// enters the log or the chain, and its `Debug` shows none of it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A group of requests on its way to the leader, with the secret (if any)
/// each was asked with; only the batch is committed.
#[derive(Debug, Clone)]
pub(crate) struct Proposal {
    pub batch: Batch,
    pub secrets: Vec<Option<Secret>>,
}

/// One Raft log entry of application commands: the proposer groups the
/// requests that arrive while the previous group commits (group commit),
/// so one fsync and one replication round carry many commands. The entry
/// becomes one chain block whose transactions are these requests, in order.
///
/// `id` names the group across retries: a sender whose leader stepped down
/// before answering cannot tell whether the entry was committed after all,
/// so it sends the same group (same id) to the new leader, and the state
/// machine answers a group it committed lately from its record instead of
/// applying it twice (Raft's client sessions, §6.3 of Ongaro's thesis).
/// 0: no id (entries written before ids existed), never deduplicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub requests: Vec<Request>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub id: u64,
}

impl Batch {
    /// `requests` under a fresh random id.
    pub fn new(requests: Vec<Request>) -> Self {
        Self {
            requests,
            id: rand::random_range(1..=u64::MAX),
        }
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// What applying a request did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Log index (= chain height) of the entry, and the request's position
    /// among the block's transactions.
    pub index: u64,
    pub tx: u32,
    /// Why the state machine refused the command; it is still on the chain.
    pub rejected: Option<String>,
}
