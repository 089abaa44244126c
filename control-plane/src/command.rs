//! The commands the state machine applies. Each is one transaction of a
//! chain block; its canonical encoding (JSON of the whole [`Request`], field
//! order fixed by the types) is what the block hash covers.
//!
//! [`Request`]: crate::Request

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// Whether a node serves. Committed by the leader's failure detector, or by
/// the node itself when it drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Up,
    Down,
    Draining,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Draining => "draining",
        }
    }
}

/// A cluster member as the state machine records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: String,
    pub region: String,
    pub zone: String,
    /// Mutual-TLS Raft endpoint, host:port.
    pub raft_addr: String,
    /// Client gRPC and HTTP endpoints, host:port.
    pub grpc_addr: String,
    pub http_addr: String,
    /// libp2p identity and addresses.
    pub peer_id: String,
    pub p2p_addrs: Vec<String>,
    pub cpu_cores: u32,
    pub simd: String,
    pub memory_bytes: u64,
    pub version: String,
    pub status: NodeStatus,
    /// When the status last changed (block time, ms since the epoch).
    pub status_since_ms: u64,
}

/// One state-machine command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// A node joined or re-registered (addresses, capacity). Keeps the
    /// recorded status unless the node was removed.
    RegisterNode(Box<NodeRecord>),
    SetNodeStatus {
        id: NodeId,
        status: NodeStatus,
    },
    /// A node left the cluster for good.
    RemoveNode {
        id: NodeId,
    },
    /// A free-form entry (operator annotations, benchmarks); it changes no
    /// state but lands on the chain like any other command.
    Note {
        text: String,
    },
}

impl Command {
    /// The transaction kind a block lists.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RegisterNode(_) | Self::SetNodeStatus { .. } | Self::RemoveNode { .. } => "node",
            Self::Note { .. } => "note",
        }
    }

    /// One line for people.
    pub fn summary(&self) -> String {
        match self {
            Self::RegisterNode(n) => format!(
                "register node {} ({}) in {} at {}",
                n.id, n.name, n.region, n.raft_addr
            ),
            Self::SetNodeStatus { id, status } => format!("node {id} is {}", status.as_str()),
            Self::RemoveNode { id } => format!("remove node {id}"),
            Self::Note { text } => {
                let mut t: String = text.chars().take(80).collect();
                if t.len() < text.len() {
                    t.push('…');
                }
                format!("note: {t}")
            }
        }
    }
}

/// The state the commands build (besides the chain): small, kept in memory
/// and written through to sled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub nodes: BTreeMap<NodeId, NodeRecord>,
}

impl State {
    /// Applies one command at block time `time_ms`; an error is a refusal
    /// (deterministic on every replica), never a failure of the machine.
    pub fn apply(&mut self, command: &Command, time_ms: u64) -> Result<(), String> {
        match command {
            Command::RegisterNode(n) => {
                let mut n = (**n).clone();
                match self.nodes.get(&n.id) {
                    Some(old) => {
                        n.status = old.status;
                        n.status_since_ms = old.status_since_ms;
                    }
                    None => {
                        n.status = NodeStatus::Up;
                        n.status_since_ms = time_ms;
                    }
                }
                self.nodes.insert(n.id, n);
                Ok(())
            }
            Command::SetNodeStatus { id, status } => {
                let n = self
                    .nodes
                    .get_mut(id)
                    .ok_or_else(|| format!("node {id} is not registered"))?;
                if n.status != *status {
                    n.status = *status;
                    n.status_since_ms = time_ms;
                }
                Ok(())
            }
            Command::RemoveNode { id } => self
                .nodes
                .remove(id)
                .map(|_| ())
                .ok_or_else(|| format!("node {id} is not registered")),
            Command::Note { .. } => Ok(()),
        }
    }
}
