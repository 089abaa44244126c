//! The libp2p mesh: a [`Mesh`] handle and the event loop behind it
//! (STYLE.md #11: the loop owns the swarm; the handle sends bounded commands).
//!
//! - `identity`: the node's ed25519 key in the data dir.
//! - `transport`: TCP (+DNS) or memory, counted, optionally delayed; noise; yamux.
//! - `latency`: the simulated region RTT matrix and the receive-side hold.
//! - `health`: the `trine/health/1` heartbeat and its validation rules.
//! - `stage`: the `/trine/stage/1` request-response framing and rules.
//! - `peers`: the table of known peers (pure).
//! - `filter`: which peers may gossip and use the stage protocol.
//! - `event_loop`: the swarm, its behaviours, timers and metrics.

mod event_loop;
pub(crate) use event_loop::host_load;
pub mod filter;
pub mod health;
pub mod identity;
pub mod latency;
pub mod peers;
pub mod stage;
pub mod transport;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot, watch};
use trine_proto::v1::{StageRequest, StageResponse};

pub use latency::Matrix;
pub use transport::Kind;

/// Commands waiting for the loop; callers wait when it is full.
const COMMAND_QUEUE: usize = 256;

/// Everything the mesh needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub region: String,
    pub zone: String,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Addresses other nodes should dial; empty means the listen addresses.
    pub announce: Vec<Multiaddr>,
    /// Nodes to join through (`/ip4/…/tcp/…`, `/dns4/…/tcp/…`, optionally
    /// ending in `/p2p/<peer id>`).
    pub bootstrap: Vec<Multiaddr>,
    /// Admit every peer to gossip and the stage protocol.
    pub open: bool,
    pub transport: Kind,
    /// Simulated inter-region latency, when set.
    pub latency: Option<Arc<Matrix>>,
    pub heartbeat_interval: Duration,
    pub ping_interval: Duration,
    /// Forget a disconnected peer silent for this long.
    pub peer_ttl: Duration,
    /// Keep dialing discovered peers until this many are connected.
    pub target_peers: u32,
    /// Established connections in total, and per peer.
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    /// Largest stage request or response, in bytes.
    pub max_stage_bytes: usize,
    pub stage_timeout: Duration,
    /// Stage requests handed to the node at once; more are answered BUSY.
    pub stage_queue: usize,
    /// What the heartbeat reports as the compute backend.
    pub backend: String,
}

impl Config {
    /// Defaults for a node called `name` in `region`.
    pub fn new(name: &str, region: &str, zone: &str) -> Self {
        Self {
            name: name.into(),
            region: region.into(),
            zone: zone.into(),
            listen: vec!["/ip4/127.0.0.1/tcp/7402".parse().expect("valid multiaddr")],
            announce: Vec::new(),
            bootstrap: Vec::new(),
            open: false,
            transport: Kind::Tcp,
            latency: None,
            heartbeat_interval: Duration::from_secs(2),
            ping_interval: Duration::from_secs(5),
            peer_ttl: Duration::from_secs(15),
            target_peers: 24,
            max_connections: 256,
            max_connections_per_peer: 2,
            max_stage_bytes: 64 << 20,
            stage_timeout: Duration::from_secs(30),
            stage_queue: 64,
            backend: backend(),
        }
    }
}

/// Why a mesh could not start or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Identity(#[from] identity::Error),
    #[error("mesh transport: {0}")]
    Transport(String),
    #[error("cannot listen for p2p on {addr}: {reason}; choose another address with --p2p-listen")]
    Listen { addr: Multiaddr, reason: String },
    #[error("the mesh has stopped")]
    Stopped,
    #[error(
        "peer {peer} is not admitted by the peer filter; stage traffic goes to cluster members only"
    )]
    NotAdmitted { peer: PeerId },
    #[error("stage request to {peer} failed: {reason}")]
    Stage { peer: PeerId, reason: String },
}

/// What the node reports in its heartbeats beyond what the mesh measures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Status {
    pub queue_depth: u32,
    pub stages: Vec<String>,
    pub chain_height: u64,
}

/// A peer as `trine peers` shows it.
#[derive(Debug, Clone)]
pub struct PeerView {
    pub peer_id: PeerId,
    pub name: String,
    pub region: String,
    pub zone: String,
    pub addrs: Vec<Multiaddr>,
    pub connected: bool,
    pub rtt: Option<Duration>,
    pub last_seen: SystemTime,
    pub agent: String,
    pub admitted: bool,
    pub score: f64,
    pub heartbeat_seq: u64,
    /// Requests waiting for a compute slot there, from its last heartbeat.
    pub queue_depth: Option<u32>,
    /// Its one-minute load per core and compute backend, from its last
    /// heartbeat.
    pub load: Option<f32>,
    pub backend: Option<String>,
}

/// The mesh as a whole, at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub local_peer_id: PeerId,
    pub listen: Vec<Multiaddr>,
    pub peers: Vec<PeerView>,
}

/// A stage request from a peer; answer through `reply` (dropping it answers
/// BUSY).
#[derive(Debug)]
pub struct InboundStage {
    pub peer: PeerId,
    pub request: StageRequest,
    pub reply: oneshot::Sender<StageResponse>,
}

enum Command {
    Snapshot(oneshot::Sender<Snapshot>),
    Stage {
        peer: PeerId,
        body: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, Error>>,
    },
    Publish {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    SetMembers(HashMap<PeerId, filter::Identity>),
}

/// Handle to a running mesh. Cheap to clone; the mesh stops when every
/// handle is dropped or its task is aborted.
#[derive(Debug, Clone)]
pub struct Mesh {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    status: Arc<watch::Sender<Status>>,
    listening: watch::Receiver<Vec<Multiaddr>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Snapshot(_) => "Snapshot",
            Command::Stage { .. } => "Stage",
            Command::Publish { .. } => "Publish",
            Command::SetMembers(_) => "SetMembers",
        })
    }
}

/// A started mesh: its handle, the inbound stage requests, and the loop's task.
#[derive(Debug)]
pub struct Started {
    pub mesh: Mesh,
    pub stage_requests: mpsc::Receiver<InboundStage>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the mesh: binds the listen addresses (errors here are the
/// caller's to report), dials the bootstrap nodes, and runs until every
/// handle is dropped.
pub async fn start(config: Config, key: Keypair) -> Result<Started, Error> {
    event_loop::start(config, key).await
}

impl Mesh {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Addresses the mesh listens on (ports resolved).
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listening.borrow().clone()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Known peers and their state.
    pub async fn snapshot(&self) -> Result<Snapshot, Error> {
        self.ask(Command::Snapshot).await
    }

    /// Sends a stage request and waits for the answer.
    pub async fn stage(
        &self,
        peer: PeerId,
        request: &StageRequest,
    ) -> Result<StageResponse, Error> {
        use prost::Message as _;
        let body = self.stage_bytes(peer, request.encode_to_vec()).await?;
        StageResponse::decode(body.as_slice()).map_err(|e| Error::Stage {
            peer,
            reason: format!("malformed response: {e}"),
        })
    }

    /// Sends raw bytes on `/trine/stage/1` (the framing still applies).
    /// Only tests need this: it can send what [`Mesh::stage`] never would.
    #[doc(hidden)]
    pub async fn stage_bytes(&self, peer: PeerId, body: Vec<u8>) -> Result<Vec<u8>, Error> {
        self.ask(|reply| Command::Stage { peer, body, reply })
            .await?
    }

    /// Publishes raw bytes on the health topic. Only tests need this: the
    /// loop publishes real heartbeats itself.
    #[doc(hidden)]
    pub async fn publish_health_bytes(&self, data: Vec<u8>) -> Result<(), Error> {
        self.ask(|reply| Command::Publish { data, reply }).await?
    }

    /// Replaces the peer filter's member list (the control plane feeds it).
    pub async fn set_members(
        &self,
        members: HashMap<PeerId, filter::Identity>,
    ) -> Result<(), Error> {
        self.commands
            .send(Command::SetMembers(members))
            .await
            .map_err(|_| Error::Stopped)
    }

    /// Updates what the next heartbeats report.
    pub fn set_status(&self, status: Status) {
        self.status.send_replace(status);
    }
}

/// This node's compute backend as heartbeats and the console name it.
pub fn backend() -> String {
    format!("cpu-{}", crate::simd::Level::detect())
}
