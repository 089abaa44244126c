//! A running control plane: the Raft node, its mTLS gRPC server, and the
//! tasks around it — announcing this node (init or join), the leader's
//! maintenance (failure detection, voter placement) and metrics.
//!
//! Writes from any member reach the leader (forwarded over the Raft port);
//! reads are local (with a staleness bound) or linearizable (read index).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trine_proto::v1 as pb;
use trine_proto::v1::raft_server::RaftServer;

use crate::command::{Command, NodeRecord, NodeStatus, SlotKey, StageState, State};
use crate::network::{self, Delays, Faults, Liveness, Network};
use crate::store::{self, Reader};
use crate::tls::{Certs, NodeTls};
use crate::types::{Batch, Member, NodeId, Proposal, Raft, Request, Response, Secret};
use crate::voters::{self, Candidate, Rules};
use crate::{convert, metrics, planner, server, tls};

/// Timeout profile: LAN (one site) or WAN (regions ~200 ms apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    #[default]
    Lan,
    Wan,
}

impl Profile {
    /// (heartbeat, minimum election timeout).
    pub fn timeouts(self) -> (Duration, Duration) {
        match self {
            Self::Lan => (Duration::from_millis(100), Duration::from_millis(300)),
            // openraft 0.9 gives each AppendEntries the heartbeat interval
            // as its deadline: it must clear the longest RTT (215 ms between
            // the testnet's farthest regions) with room for the follower's
            // write on a busy machine. At 300 ms a far follower flapped
            // down and up, or never caught up (chaos soak seeds 67-99).
            Self::Wan => (Duration::from_millis(500), Duration::from_millis(1500)),
        }
    }
}

/// Everything a control plane needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub id: NodeId,
    /// This node as Raft membership records it (announced Raft address).
    pub member: Member,
    /// This node as the state machine records it.
    pub record: NodeRecord,
    /// Directory of the sled store and snapshot.
    pub dir: PathBuf,
    pub tls: NodeTls,
    pub cluster: String,
    /// Start a new cluster with this node as its only voter (first start only).
    pub init: bool,
    /// Raft addresses of members to join through.
    pub join: Vec<String>,
    pub profile: Profile,
    pub heartbeat: Option<Duration>,
    pub election_timeout: Option<Duration>,
    /// A member unanswered this long is marked down.
    pub down_after: Duration,
    /// A down member must answer this long without a gap before it is
    /// marked up again (damping: a flapping node stays down).
    pub up_after: Duration,
    /// Least time between two rebalancing moves ([`planner::rebalance`]).
    pub rebalance_every: Duration,
    pub voters: Rules,
    /// Build a snapshot after this many entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot (for followers slightly
    /// behind); older ones are purged.
    pub snapshot_keep: u64,
    /// Local reads fail when the leader has not been heard for this long.
    pub max_staleness: Duration,
    /// Simulated inter-region delay on every Raft RPC (testnets).
    pub delays: Delays,
}

impl Config {
    fn raft_config(&self) -> Result<openraft::Config, Error> {
        let (hb, election) = self.profile.timeouts();
        let hb = self.heartbeat.unwrap_or(hb);
        let election = self.election_timeout.unwrap_or(election);
        let c = openraft::Config {
            cluster_name: self.cluster.clone(),
            heartbeat_interval: hb.as_millis() as u64,
            election_timeout_min: election.as_millis() as u64,
            election_timeout_max: election.as_millis() as u64 * 2,
            install_snapshot_timeout: 30_000,
            // Every AppendEntries must finish within the heartbeat interval
            // (see `Profile::timeouts`). A follower that fell behind was
            // sent everything it missed (up to 1000 entries) in one call,
            // which overran the deadline across the WAN, was cut off and
            // sent again, bigger: it never caught up (chaos soak, seed 67).
            // Small calls keep each one inside it.
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.snapshot_keep,
            // Purge in steps of a tenth of the snapshot interval.
            purge_batch_size: (self.snapshot_every / 10).clamp(1, 1024),
            // Not before this start is confirmed with the peers
            // (`confirm_start`): a node restored from an old copy of its
            // data dir must not campaign.
            enable_elect: false,
            ..Default::default()
        };
        c.validate().map_err(|e| Error::Config(e.to_string()))
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("raft configuration: {0}")]
    Config(String),
    #[error("cannot serve Raft: {0}")]
    Serve(String),
    #[error(
        "no leader is known yet (an election may be in progress, or a majority of voters is unreachable); retry shortly"
    )]
    NoLeader,
    #[error(
        "the leader cannot confirm its leadership with a majority of voters ({0}); check that the voters are up and reachable (`trine status`)"
    )]
    NoQuorum(String),
    #[error("the leader did not answer in {0:?}; a majority of voters may be unreachable")]
    Timeout(Duration),
    #[error("the leader at {addr} refused or failed: {reason}")]
    Forward { addr: String, reason: String },
    #[error(
        "this node's replica is stale: the leader was last heard {since:?} ago (bound {bound:?}); use a linearizable read or ask another node"
    )]
    Stale {
        since: Option<Duration>,
        bound: Duration,
    },
    #[error("bad request: {0}")]
    Invalid(String),
    #[error("membership change failed: {0}")]
    Membership(String),
    #[error("Raft has stopped on this node: {0}")]
    Fatal(String),
    #[error("the leader refused the write: {0}")]
    Forbidden(String),
    /// A member asked to commit for another is not the leader (any more).
    #[error("{0}")]
    NotLeader(String),
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::NoLeader
            | Error::NoQuorum(_)
            | Error::Timeout(_)
            | Error::Stale { .. }
            | Error::Fatal(_) => tonic::Status::unavailable(msg),
            Error::Invalid(_) => tonic::Status::invalid_argument(msg),
            Error::Membership(_) => tonic::Status::failed_precondition(msg),
            Error::Forbidden(_) => tonic::Status::permission_denied(msg),
            Error::NotLeader(_) => tonic::Status::aborted(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}

/// How long a write may take before the caller hears `Timeout`.
const PROPOSE_DEADLINE: Duration = Duration::from_secs(10);
/// Most commands grouped into one Raft entry (one chain block).
pub const MAX_BATCH: usize = 1024;
/// Most log entries in one AppendEntries call (see `raft_config`).
const MAX_PAYLOAD_ENTRIES: u64 = 64;
/// Groups in flight at once; the next group forms while these commit.
const BATCHES_IN_FLIGHT: usize = 4;
/// Commands waiting for a group; proposers wait when it is full.
const PROPOSAL_QUEUE: usize = 16_384;

/// A command waiting to be grouped, and where its answer goes.
struct Pending {
    req: Request,
    secret: Option<Secret>,
    reply: tokio::sync::oneshot::Sender<Result<Response, Error>>,
}
const MAINTAIN_EVERY: Duration = Duration::from_millis(500);

/// State shared by the handle, the gRPC service and the tasks.
pub struct Core {
    pub(crate) raft: Raft,
    pub(crate) reader: Reader,
    id: NodeId,
    certs: Certs,
    liveness: Liveness,
    last_leader_contact: Mutex<Option<Instant>>,
    /// The leader's quorum clock (shared with the network layer).
    quorum: network::Quorum,
    /// This node's serving lease ([`crate::lease`]).
    lease: Mutex<crate::lease::Lease>,
    /// This run's clock for the stamps its AppendEntries answers carry.
    stamps: crate::lease::StampClock,
    /// Since when each member has answered without a gap longer than
    /// `down_after` (leader's view; for damping).
    answering_since: Mutex<HashMap<NodeId, Instant>>,
    /// Leader's view: slots moved off a dead node, with when that node last
    /// answered, until they are ready elsewhere (the recovery histogram).
    recovering: Mutex<BTreeMap<SlotKey, (NodeId, Instant)>>,
    /// When the leader last committed a rebalancing move.
    last_rebalance: Mutex<Option<Instant>>,
    faults: Faults,
    /// When another channel (the node's mesh) last heard each member: a
    /// new leader's prior for members that have not answered it yet.
    heard: Mutex<HashMap<NodeId, Instant>>,
    proposals: tokio::sync::mpsc::Sender<Pending>,
    /// This node's start count and its peers' ([`store::Incarnations`]).
    incarnations: store::Incarnations,
    /// This start's incarnation (0 until recorded).
    incarnation: AtomicU64,
    /// Whether this node votes and campaigns: not before its start is
    /// confirmed with its peers, nor while it catches up after a restore
    /// from an old copy of its data dir (`confirm_start`).
    voting: AtomicBool,
    /// Whether this start found its data dir older than its peers' record.
    restored: AtomicBool,
    config: Config,
}

impl Core {
    /// Whether this node votes and campaigns yet (see `confirm_start`).
    pub(crate) fn voting(&self) -> bool {
        self.voting.load(Ordering::Acquire)
    }

    /// What a peer answering this node's incarnation call needs: its
    /// record of `id` (kept when `id` is a member here), its term and
    /// applied index.
    pub(crate) async fn incarnation_of(
        &self,
        id: NodeId,
        incarnation: u64,
    ) -> Result<pb::IncarnationResponse, Error> {
        let store = |e: sled::Error| {
            Error::Store(store::Error::Damaged {
                path: self.config.dir.display().to_string(),
                reason: e.to_string(),
            })
        };
        // Only members' records are kept: a caller cannot grow the tree
        // with made-up ids. A joiner is recorded from its next start.
        let seen = if self.member(id).is_some() {
            self.incarnations
                .record_peer(id, incarnation)
                .await
                .map_err(store)?
        } else {
            self.incarnations.record_peer_seen(id).map_err(store)?
        };
        let m = self.raft.metrics().borrow().clone();
        Ok(pb::IncarnationResponse {
            request_id: String::new(),
            seen,
            term: m.current_term,
            applied: m.last_applied.map_or(0, |l| l.index),
        })
    }

    /// `id`'s entry in this node's view of the Raft membership.
    pub(crate) fn member(&self, id: NodeId) -> Option<Member> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .cloned()
    }

    /// Every member in this node's view of the Raft membership.
    pub(crate) fn members(&self) -> BTreeMap<NodeId, Member> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, m)| (*id, m.clone()))
            .collect()
    }

    /// Whether a certificate with these names speaks for a member.
    pub(crate) fn is_member_name(&self, names: &[String]) -> bool {
        self.members()
            .values()
            .any(|m| crate::tls::certifies(names, &m.name))
    }

    /// When this leader last heard `id`: its last Raft answer since it
    /// took over; failing that, when it took over, or earlier when the
    /// node's other channel (the mesh) last heard the member before that —
    /// so a member that died with the old leader is not given a fresh
    /// `down_after` by the new one. The hint can only move the time back,
    /// never forward: a member cut off from Raft alone still goes down.
    fn last_heard(&self, id: NodeId, leader_since: Instant) -> Instant {
        match self.liveness.last(id) {
            Some(t) if t >= leader_since => t,
            _ => {
                let hint = self.heard.lock().ok().and_then(|h| h.get(&id).copied());
                hint.map_or(leader_since, |h| h.min(leader_since))
            }
        }
    }
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Handle to a running control plane.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    core: Arc<Core>,
    stop: Arc<watch::Sender<bool>>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// What `trine status` shows of this member's view.
#[derive(Debug, Clone)]
pub struct Status {
    pub id: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub state: ServerState,
    pub voters: BTreeSet<NodeId>,
    pub members: BTreeMap<NodeId, Member>,
    pub last_log_index: u64,
    pub applied: u64,
    pub leader_heard: Option<Duration>,
    /// This start's incarnation (0 until confirmed with the peers).
    pub incarnation: u64,
    /// Whether this member votes and campaigns (see `confirm_start`).
    pub voting: bool,
    /// Whether this start found the data dir put back from an old copy.
    pub restored: bool,
}

impl ControlPlane {
    /// Opens the store, starts Raft and its server on `listener`, and the
    /// background tasks.
    pub async fn start(config: Config, listener: TcpListener) -> Result<Self, Error> {
        let raft_config = Arc::new(config.raft_config()?);
        let (log, sm, incarnations) = store::open_all(&config.dir)?;
        let reader = sm.reader();
        let liveness = Liveness::default();
        let certs = Certs::new(config.tls.clone()).map_err(|e| Error::Serve(e.to_string()))?;
        let faults = Faults::default();
        let (proposals, proposal_rx) = tokio::sync::mpsc::channel(PROPOSAL_QUEUE);
        let quorum = network::Quorum::default();
        let echoes = network::Echoes::default();
        let campaigns = network::Campaigns::default();
        let network = Network {
            certs: certs.clone(),
            liveness: liveness.clone(),
            quorum: quorum.clone(),
            echoes,
            campaigns: campaigns.clone(),
            faults: faults.clone(),
            delays: config.delays.clone(),
        };
        let raft = Raft::new(config.id, raft_config, network, log, sm)
            .await
            .map_err(|e| Error::Fatal(e.to_string()))?;
        quorum.set_voters(
            config.id,
            raft.metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids(),
        );
        let core = Arc::new(Core {
            raft,
            reader,
            id: config.id,
            certs,
            liveness,
            last_leader_contact: Mutex::new(None),
            quorum,
            lease: Mutex::default(),
            stamps: crate::lease::StampClock::new(),
            answering_since: Mutex::new(HashMap::new()),
            recovering: Mutex::new(BTreeMap::new()),
            last_rebalance: Mutex::new(None),
            faults,
            heard: Mutex::default(),
            proposals,
            incarnations,
            incarnation: AtomicU64::new(0),
            voting: AtomicBool::new(false),
            restored: AtomicBool::new(false),
            config,
        });
        metrics::voting(false);
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        let service = RaftServer::new(server::Service { core: core.clone() })
            .max_decoding_message_size(network::MAX_MESSAGE)
            .max_encoding_message_size(network::MAX_MESSAGE);
        // TLS is ours, not tonic's: each connection gets the certificates
        // current when it arrives, so a rotation needs no restart.
        let serve = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(service)
            .serve_with_incoming_shutdown(
                {
                    let certs = core.certs.clone();
                    tls::accept(listener, move || certs.server(), "raft", stop_rx.clone())
                },
                stopped(stop_rx.clone()),
            );
        tasks.push(tokio::spawn(reload_certs(core.clone(), stop_rx.clone())));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "Raft gRPC server failed");
            }
        }));

        if core.config.init {
            let initialized = core
                .raft
                .is_initialized()
                .await
                .map_err(|e| Error::Fatal(e.to_string()))?;
            if initialized {
                tracing::info!(
                    "--init ignored: this node already belongs to a cluster (its data dir says so)"
                );
            } else {
                let members = BTreeMap::from([(core.id, core.config.member.clone())]);
                core.raft
                    .initialize(members)
                    .await
                    .map_err(|e| Error::Fatal(e.to_string()))?;
                tracing::info!(
                    id = core.id,
                    "initialized a new cluster with this node as its first voter"
                );
            }
        }
        tasks.push(tokio::spawn(confirm_start(core.clone(), stop_rx.clone())));
        tasks.push(tokio::spawn(group_commit(
            core.clone(),
            proposal_rx,
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(announce(core.clone(), stop_rx.clone())));
        tasks.push(tokio::spawn(maintain(core.clone(), stop_rx.clone())));
        tasks.push(tokio::spawn(rerun_split_votes(
            core.clone(),
            campaigns.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(elect_when_overdue(
            core.clone(),
            campaigns,
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(export_metrics(core.clone(), stop_rx)));
        Ok(Self {
            core,
            stop: Arc::new(stop),
            tasks: Arc::new(Mutex::new(tasks)),
        })
    }

    pub fn id(&self) -> NodeId {
        self.core.id
    }

    /// How long the loss of the leader can keep this cluster without one,
    /// and so this node without a serving lease: a voter refuses other
    /// candidates for `election_timeout_max` after its leader's last
    /// AppendEntries (openraft's leader lease), a follower campaigns only
    /// that plus its own election timeout (at most `election_timeout_max`)
    /// after it, and the new leader's first rounds of AppendEntries (a
    /// heartbeat or two each, across the WAN) date the followers' leases
    /// again.
    pub fn leader_loss_bound(&self) -> Duration {
        let c = self.core.raft.config();
        Duration::from_millis(
            c.election_timeout_max
                .saturating_mul(2)
                .saturating_add(c.heartbeat_interval.saturating_mul(4)),
        )
    }

    /// Resolves when this member's Raft core has stopped on its own (a
    /// fatal storage or state error: openraft does not restart it), with
    /// the reason. The node then exits so a supervisor restarts it, instead
    /// of running on with frozen Raft state. Never resolves on a clean
    /// shutdown's path (the node stops waiting first).
    pub async fn failed(&self) -> String {
        let mut rx = self.core.raft.metrics();
        loop {
            if let Err(fatal) = &rx.borrow_and_update().running_state {
                return fatal.to_string();
            }
            if rx.changed().await.is_err() {
                return "the Raft core stopped".into();
            }
        }
    }

    pub fn reader(&self) -> &Reader {
        &self.core.reader
    }

    pub fn raft(&self) -> &Raft {
        &self.core.raft
    }

    /// How many times this member has swapped in rotated certificates.
    pub fn cert_generation(&self) -> u64 {
        self.core.certs.generation()
    }

    /// The in-node fault layer (tests, chaos): cut this node off from peers.
    pub fn faults(&self) -> &Faults {
        &self.core.faults
    }

    /// Records when another channel (the node's mesh) last heard member
    /// `id`; a new leader uses it for members that have not answered it yet.
    pub fn heard(&self, id: NodeId, at: Instant) {
        if let Ok(mut h) = self.core.heard.lock() {
            h.insert(id, at);
        }
    }

    /// Simulated and injected delay on this node's Raft RPCs.
    pub fn delays(&self) -> &Delays {
        &self.core.config.delays
    }

    /// Commits `command` (through the leader) and returns the state
    /// machine's answer.
    pub async fn propose(&self, principal: &str, command: Command) -> Result<Response, Error> {
        self.core.propose(Request::now(principal, command)).await
    }

    /// Commits a client's `command` as `token:<name>`, carrying the
    /// client's bearer `secret` for the leader to check when this node is
    /// not the leader (see [`crate::authz`]); the secret is never
    /// committed.
    pub async fn propose_for_client(
        &self,
        principal: &str,
        secret: Secret,
        command: Command,
    ) -> Result<Response, Error> {
        self.core
            .propose_with(Request::now(principal, command), Some(secret))
            .await
    }

    /// The principal this node's own writes are recorded under
    /// (`node:<name>`): the only one besides a client's that the leader
    /// takes from it.
    pub fn principal(&self) -> String {
        crate::authz::node_principal(&self.core.config.record.name)
    }

    /// A linearizable read point: after this returns, the local replica
    /// reflects every write acknowledged before the call. Returns the index.
    pub async fn linearizable(&self) -> Result<u64, Error> {
        let index = self.core.read_index().await?;
        self.core
            .raft
            .wait(Some(PROPOSE_DEADLINE))
            .applied_index_at_least(Some(index), "read index")
            .await
            .map_err(|_| Error::Timeout(PROPOSE_DEADLINE))?;
        Ok(index)
    }

    /// Checks that a local read is within `bound` of the leader; returns the
    /// applied index it would read at.
    pub fn local(&self, bound: Option<Duration>) -> Result<u64, Error> {
        let bound = bound.unwrap_or(self.core.config.max_staleness);
        let m = self.core.raft.metrics().borrow().clone();
        let applied = m.last_applied.map_or(0, |l| l.index);
        if m.state.is_leader() {
            return Ok(applied);
        }
        let since = self.core.leader_heard();
        match since {
            Some(s) if s <= bound => Ok(applied),
            _ => Err(Error::Stale { since, bound }),
        }
    }

    /// Why this node must not serve its stages now, or None when it may:
    /// its serving lease has run out. A node holds a lease while a leader
    /// that a majority of the voters accepted within the last
    /// `down_after / 2` keeps it (each AppendEntries renews it, dated on
    /// this node's clock from its own answer that the leader had heard,
    /// less the majority's age: [`crate::lease`]) and it has applied up to
    /// the highest commit index it was told; a leader holds one while a
    /// majority accepts it. A
    /// leader moves a node's stages only after `down_after` without an
    /// answer from it, so by then the node has stopped serving them: cut off
    /// with a deposed leader or alone, it cannot renew (its leader has no
    /// majority). Assumes calls that arrive are answered (no one-way loss
    /// of replies) and clocks that run at the same rate, not the same time.
    pub fn fenced(&self) -> Option<String> {
        let lease = self.core.lease_span();
        // Read in place (a running answer asks before each token).
        let (leader, applied) = {
            let metrics = self.core.raft.metrics();
            let m = metrics.borrow();
            (m.state.is_leader(), m.last_applied.map_or(0, |l| l.index))
        };
        if leader {
            return match self.core.quorum.acked() {
                Some(t) if t.elapsed() <= lease => None,
                Some(t) => Some(format!(
                    "this node leads but no majority of the voters has accepted it for {:.1} s (its serving lease is {:.1} s)",
                    t.elapsed().as_secs_f64(),
                    lease.as_secs_f64()
                )),
                None => Some("this node leads but no majority has accepted it yet".into()),
            };
        }
        self.core.lease.lock().ok()?.fenced(lease, applied)
    }

    pub fn status(&self) -> Status {
        let m = self.core.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        Status {
            id: self.core.id,
            leader: m.current_leader,
            term: m.current_term,
            state: m.state,
            voters: membership.voter_ids().collect(),
            members: membership.nodes().map(|(id, n)| (*id, n.clone())).collect(),
            last_log_index: m.last_log_index.unwrap_or(0),
            applied: m.last_applied.map_or(0, |l| l.index),
            leader_heard: if m.state.is_leader() {
                Some(Duration::ZERO)
            } else {
                self.core.leader_heard()
            },
            incarnation: self.core.incarnation.load(Ordering::Relaxed),
            voting: self.core.voting(),
            restored: self.core.restored.load(Ordering::Relaxed),
        }
    }

    /// Marks `id` (this node when `None`) draining, then removes it from
    /// the cluster: voters give up their seat first. Another node leaves
    /// only when an admin asks: `admin` is the admin token's principal and
    /// secret, which the leader checks.
    pub async fn leave(
        &self,
        id: Option<NodeId>,
        admin: Option<(&str, Secret)>,
    ) -> Result<(), Error> {
        let id = id.unwrap_or(self.core.id);
        let draining = Command::SetNodeStatus {
            id,
            status: NodeStatus::Draining,
        };
        let secret = admin.as_ref().map(|(_, s)| s.clone());
        match admin {
            Some((principal, secret)) => {
                self.propose_for_client(principal, secret, draining).await?
            }
            None => self.propose(&self.principal(), draining).await?,
        };
        self.core.leave(id, secret).await
    }

    /// Stops the tasks and Raft.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let _ = self.core.raft.shutdown().await;
        let tasks: Vec<_> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            t.abort();
        }
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// How often a member looks for rotated certificates in its TLS dir.
const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// Picks up rotated certificates (`trine certs rotate`) from the TLS dir:
/// new connections and channels use them; open ones finish as they are.
async fn reload_certs(core: Arc<Core>, mut stop: watch::Receiver<bool>) {
    let mut last_error = String::new();
    if let Some(t) = core.certs.not_after() {
        metrics::cert_expiry(t);
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep(RELOAD_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match core.certs.reload(&core.config.member.name) {
            Ok(false) => {}
            Ok(true) => {
                last_error.clear();
                let expires = core.certs.not_after();
                if let Some(t) = expires {
                    metrics::cert_expiry(t);
                }
                tracing::info!(
                    generation = core.certs.generation(),
                    expires_unix = expires,
                    "loaded rotated certificates; new connections use them"
                );
            }
            Err(e) => {
                let e = e.to_string();
                if e != last_error {
                    tracing::warn!(error = %e, "the TLS dir changed but its certificates cannot be used yet; keeping the current ones");
                    last_error = e;
                }
            }
        }
    }
}

impl Core {
    pub(crate) fn heard_from_leader(&self) {
        if let Ok(mut t) = self.last_leader_contact.lock() {
            *t = Some(Instant::now());
        }
    }

    /// How long a serving lease runs: half of `down_after`, the silence
    /// after which a leader moves a node's stages.
    fn lease_span(&self) -> Duration {
        self.config.down_after / 2
    }

    /// A leader's AppendEntries, dated as `dating` says and committed to
    /// `commit`, was accepted ([`crate::lease`] says how that dates the
    /// lease).
    pub(crate) fn renew_lease(&self, dating: crate::lease::Dating<'_>, commit: u64) {
        let Some(from) = crate::lease::start(&self.stamps, dating) else {
            return;
        };
        let span = self.lease_span();
        if let Ok(mut l) = self.lease.lock() {
            l.renew(span, from, commit);
        }
    }

    /// The stamp of this node's answer to a request it had at `at`.
    pub(crate) fn stamp(&self, at: Instant) -> trine_proto::v1::Stamp {
        self.stamps.stamp(at)
    }

    fn leader_heard(&self) -> Option<Duration> {
        self.last_leader_contact.lock().ok()?.map(|t| t.elapsed())
    }

    fn leader_member(&self) -> Option<(NodeId, Member)> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        let member = m.membership_config.membership().get_node(&leader)?.clone();
        Some((leader, member))
    }

    /// A client for the current leader's Raft endpoint, and the leader.
    fn leader_client(
        &self,
    ) -> Result<
        (
            Member,
            trine_proto::v1::raft_client::RaftClient<tonic::transport::Channel>,
        ),
        Error,
    > {
        let (_, member) = self.leader_member().ok_or(Error::NoLeader)?;
        let c = network::client(&member.addr, &self.certs.client()).map_err(|reason| {
            Error::Forward {
                addr: member.addr.clone(),
                reason,
            }
        })?;
        Ok((member, c))
    }

    pub(crate) fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state.is_leader()
    }

    /// Queues `req` for the next group and waits for its answer.
    pub(crate) async fn propose(&self, req: Request) -> Result<Response, Error> {
        self.propose_with(req, None).await
    }

    /// Like [`Core::propose`], with the secret of the client who asked.
    pub(crate) async fn propose_with(
        &self,
        req: Request,
        secret: Option<Secret>,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        metrics::pending(1.0);
        let r = tokio::time::timeout(PROPOSE_DEADLINE, async {
            let (reply, rx) = tokio::sync::oneshot::channel();
            self.proposals
                .send(Pending { req, secret, reply })
                .await
                .map_err(|_| Error::Fatal("the control plane has stopped".into()))?;
            rx.await
                .map_err(|_| Error::Fatal("the control plane has stopped".into()))?
        })
        .await;
        metrics::pending(-1.0);
        let r = r.unwrap_or(Err(Error::Timeout(PROPOSE_DEADLINE)));
        if r.is_ok() {
            metrics::commit(started.elapsed());
        }
        r
    }

    /// Commits a group a member sent this leader as one entry, here only:
    /// `NotLeader` when this node is not the leader (any more), and the
    /// sender asks the new one. Forwarding it again would put this node's
    /// certificate in place of the sender's.
    pub(crate) async fn commit_here(&self, batch: Batch) -> Result<Vec<Response>, Error> {
        match tokio::time::timeout(PROPOSE_DEADLINE, self.raft.client_write(batch)).await {
            Err(_) => Err(Error::Timeout(PROPOSE_DEADLINE)),
            Ok(Ok(r)) => Ok(r.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(
                Error::NotLeader("this member is no longer the leader; ask the new one".into()),
            ),
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(Error::Membership(e.to_string()))
            }
            Ok(Err(RaftError::Fatal(f))) => Err(Error::Fatal(f.to_string())),
        }
    }

    /// Commits one group as one entry, here or through the leader (each
    /// command's answer, or why the leader refused it), but gives up
    /// (without retrying or forwarding again) once `wanted` says no caller
    /// waits any more: a
    /// caller that timed out must not see its command committed later by a
    /// retry it no longer knows about.
    async fn propose_while(
        &self,
        proposal: Proposal,
        wanted: impl Fn() -> bool,
    ) -> Result<Vec<Result<Response, Error>>, Error> {
        tokio::time::timeout(PROPOSE_DEADLINE, self.propose_inner(proposal, wanted))
            .await
            .unwrap_or(Err(Error::Timeout(PROPOSE_DEADLINE)))
    }

    async fn propose_inner(
        &self,
        proposal: Proposal,
        wanted: impl Fn() -> bool,
    ) -> Result<Vec<Result<Response, Error>>, Error> {
        loop {
            if !wanted() {
                return Err(Error::Timeout(PROPOSE_DEADLINE));
            }
            // Only the batch is committed: the secrets stay out of the log.
            match self.raft.client_write(proposal.batch.clone()).await {
                Ok(r) => return Ok(r.data.into_iter().map(Ok).collect()),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    match f.leader_node {
                        _ if !wanted() => return Err(Error::Timeout(PROPOSE_DEADLINE)),
                        Some(node)
                            if f.leader_id != Some(self.id)
                                && !f.leader_id.is_some_and(|l| self.faults.blocked(l)) =>
                        {
                            match self.forward_propose(&node, &proposal).await {
                                // It is no longer the leader (it does not
                                // forward again: the leader must see the
                                // certificate of the node a write is from).
                                // Ask openraft again for the new one.
                                Err(Error::NotLeader(_)) => {
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                                r => return r,
                            }
                        }
                        _ => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                    return Err(Error::Membership(e.to_string()));
                }
                Err(RaftError::Fatal(f)) => return Err(Error::Fatal(f.to_string())),
            }
        }
    }

    async fn forward_propose(
        &self,
        to: &Member,
        proposal: &Proposal,
    ) -> Result<Vec<Result<Response, Error>>, Error> {
        let batch = &proposal.batch;
        let addr = &to.addr;
        let fwd = |reason: String| Error::Forward {
            addr: addr.to_owned(),
            reason,
        };
        let mut c = network::client(addr, &self.certs.client()).map_err(fwd)?;
        let request = pb::ProposeRequest {
            request_id: String::new(),
            request: serde_json::to_vec(batch).map_err(|e| fwd(e.to_string()))?,
            secrets: if proposal.secrets.iter().any(Option::is_some) {
                proposal
                    .secrets
                    .iter()
                    .map(|s| {
                        s.as_ref()
                            .map(|s| s.expose().to_owned())
                            .unwrap_or_default()
                    })
                    .collect()
            } else {
                Vec::new()
            },
        };
        let resp = self
            .config
            .delays
            .around(&to.region, c.propose(request))
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Aborted => Error::NotLeader(s.message().to_owned()),
                _ => fwd(s.message().to_owned()),
            })?
            .into_inner();
        let responses: Vec<Result<Response, String>> =
            serde_json::from_slice(&resp.response).map_err(|e| fwd(format!("response: {e}")))?;
        if responses.len() != batch.requests.len() {
            return Err(fwd(format!(
                "{} answers for {} commands",
                responses.len(),
                batch.requests.len()
            )));
        }
        Ok(responses
            .into_iter()
            .map(|r| r.map_err(Error::Forbidden))
            .collect())
    }

    pub(crate) async fn read_index(&self) -> Result<u64, Error> {
        for _ in 0..100 {
            match self.raft.ensure_linearizable().await {
                Ok(l) => return Ok(l.map_or(0, |l| l.index)),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    match f.leader_node {
                        Some(node) if f.leader_id != Some(self.id) => {
                            let mut c = network::client(&node.addr, &self.certs.client()).map_err(
                                |reason| Error::Forward {
                                    addr: node.addr.clone(),
                                    reason,
                                },
                            )?;
                            let r = self
                                .config
                                .delays
                                .around(&node.region, c.read_index(pb::ReadIndexRequest::default()))
                                .await
                                .map_err(|s| Error::Forward {
                                    addr: node.addr.clone(),
                                    reason: s.message().to_owned(),
                                })?;
                            return Ok(r.into_inner().index);
                        }
                        _ => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                    return Err(Error::NoQuorum(e.to_string()));
                }
                Err(RaftError::Fatal(f)) => return Err(Error::Fatal(f.to_string())),
            }
        }
        Err(Error::NoLeader)
    }

    /// Carried out by the leader; other members forward.
    pub(crate) async fn join(&self, req: pb::JoinRequest) -> Result<pb::JoinResponse, Error> {
        if !self.is_leader() {
            let (leader, mut c) = self.leader_client()?;
            return Ok(self
                .config
                .delays
                .around(&leader.region, c.join(req))
                .await
                .map_err(|s| Error::Forward {
                    addr: leader.addr,
                    reason: s.message().to_owned(),
                })?
                .into_inner());
        }
        if req.raft_mode != convert::RAFT_MODE {
            return Err(Error::Invalid(format!(
                "join: node {} runs Raft mode {} and this cluster runs mode {} (standard Raft, one leader per term); run the same trine release on every node",
                req.node_id,
                req.raft_mode,
                convert::RAFT_MODE
            )));
        }
        let peer = req
            .peer
            .ok_or_else(|| Error::Invalid("join: peer is missing".into()))?;
        let member = convert::peer_from(peer);
        let record: NodeRecord = serde_json::from_slice(&req.record)
            .map_err(|e| Error::Invalid(format!("join: record: {e}")))?;
        if record.id != req.node_id {
            return Err(Error::Invalid(format!(
                "join: record id {} is not node id {}",
                record.id, req.node_id
            )));
        }
        let membership = self.raft.metrics().borrow().membership_config.clone();
        match membership.membership().get_node(&req.node_id) {
            Some(m) if *m == member => {}
            Some(_) => {
                self.raft
                    .change_membership(
                        ChangeMembers::SetNodes(BTreeMap::from([(req.node_id, member.clone())])),
                        true,
                    )
                    .await
                    .map_err(|e| Error::Membership(e.to_string()))?;
            }
            None => {
                self.raft
                    .add_learner(req.node_id, member.clone(), false)
                    .await
                    .map_err(|e| Error::Membership(e.to_string()))?;
                tracing::info!(node = req.node_id, %member, "added a learner");
            }
        }
        let principal = crate::authz::node_principal(&record.name);
        self.propose(Request::now(
            principal,
            Command::RegisterNode(Box::new(record)),
        ))
        .await?;
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let state = self.reader.state();
        Ok(pb::JoinResponse {
            request_id: req.request_id,
            members: membership
                .membership()
                .nodes()
                .map(|(id, n)| (*id, convert::peer_to(n)))
                .collect(),
            leader_id: self.id,
            p2p_bootstrap: state
                .nodes
                .values()
                .flat_map(|n| {
                    n.p2p_addrs
                        .iter()
                        .map(move |a| format!("{a}/p2p/{}", n.peer_id))
                })
                .collect(),
        })
    }

    /// A membership change, waiting (up to the write deadline) for one
    /// already in progress (e.g. the maintainer placing voters) to finish.
    async fn change_membership(
        &self,
        changes: ChangeMembers<NodeId, Member>,
        retain: bool,
    ) -> Result<(), Error> {
        let until = Instant::now() + PROPOSE_DEADLINE;
        loop {
            match self.raft.change_membership(changes.clone(), retain).await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    openraft::error::ChangeMembershipError::InProgress(_),
                ))) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                    return Err(Error::NotLeader(
                        "this member is no longer the leader; ask the new one".into(),
                    ));
                }
                Err(e) => return Err(Error::Membership(e.to_string())),
            }
        }
    }

    /// Removes `id` from the Raft membership and the state: here when this
    /// node leads, else through the leader (asking again when the one it
    /// asked has just lost its lead).
    pub(crate) async fn leave(&self, id: NodeId, secret: Option<Secret>) -> Result<(), Error> {
        let req = pb::LeaveRequest {
            request_id: String::new(),
            node_id: id,
            secret: secret.map(|s| s.expose().to_owned()).unwrap_or_default(),
        };
        let started = Instant::now();
        loop {
            let r = if self.is_leader() {
                self.leave_here(id).await
            } else {
                let (leader, mut c) = self.leader_client()?;
                match self
                    .config
                    .delays
                    .around(&leader.region, c.leave(req.clone()))
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(s) if s.code() == tonic::Code::Aborted => {
                        Err(Error::NotLeader(s.message().to_owned()))
                    }
                    Err(s) => {
                        return Err(Error::Forward {
                            addr: leader.addr,
                            reason: s.message().to_owned(),
                        });
                    }
                }
            };
            match r {
                // The leader changed under the removal: ask the new one
                // (each step of a removal is safe to repeat).
                Err(Error::NotLeader(_)) if started.elapsed() < PROPOSE_DEADLINE => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                r => return r,
            }
        }
    }

    /// Removes `id` on this leader only: `NotLeader` when it does not lead
    /// (any more), and the sender asks the new one. Forwarding the removal
    /// would put this node's certificate in place of the sender's (as for
    /// [`Core::commit_here`]).
    pub(crate) async fn leave_here(&self, id: NodeId) -> Result<(), Error> {
        if !self.is_leader() {
            return Err(Error::NotLeader(
                "this member is not the leader (any more); ask the leader".into(),
            ));
        }
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let m = membership.membership();
        if m.voter_ids().any(|v| v == id) {
            // Hand the seat over first, so the voter count stays odd.
            let mut voters: BTreeSet<NodeId> = m.voter_ids().filter(|v| *v != id).collect();
            // The seat goes where the planner would put it: a live learner
            // in the region with the fewest voters (then the lowest id).
            let region_of =
                |n: &NodeId| m.get_node(n).map(|x| x.region.clone()).unwrap_or_default();
            let in_region = |r: &str| voters.iter().filter(|v| region_of(v) == r).count();
            let spare = m
                .learner_ids()
                .filter(|l| {
                    *l != id
                        && self
                            .liveness
                            .last(*l)
                            .is_some_and(|t| t.elapsed() < self.config.down_after)
                })
                .filter(|l| in_region(&region_of(l)) < self.config.voters.max_per_region)
                .min_by_key(|l| (in_region(&region_of(l)), *l));
            if voters.len().is_multiple_of(2)
                && let Some(s) = spare
            {
                voters.insert(s);
            }
            if voters.is_empty() {
                return Err(Error::Membership(
                    "the last voter cannot leave; stop the cluster instead".into(),
                ));
            }
            self.change_membership(ChangeMembers::ReplaceAllVoters(voters), true)
                .await?;
        }
        if self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .is_some()
        {
            self.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await?;
        }
        let _ = self
            .propose(Request::now("system", Command::RemoveNode { id }))
            .await?;
        tracing::info!(node = id, "node left the cluster");
        Ok(())
    }
}

/// Group commit: takes every command waiting (up to [`MAX_BATCH`]) as one
/// entry, with up to [`BATCHES_IN_FLIGHT`] entries committing at once.
async fn group_commit(
    core: Arc<Core>,
    mut rx: tokio::sync::mpsc::Receiver<Pending>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = tokio::select! {
            p = rx.recv() => match p { Some(p) => p, None => return },
            _ = stop.wait_for(|s| *s) => return,
        };
        let mut group = vec![first];
        while group.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        let core = core.clone();
        tokio::spawn(async move {
            let proposal = Proposal {
                batch: Batch::new(group.iter().map(|p| p.req.clone()).collect()),
                secrets: group.iter().map(|p| p.secret.clone()).collect(),
            };
            let wanted = || group.iter().any(|p| !p.reply.is_closed());
            let result = core.propose_while(proposal, wanted).await;
            match result {
                Ok(responses) => {
                    for (p, r) in group.into_iter().zip(responses) {
                        let _ = p.reply.send(r);
                    }
                }
                Err(e) => {
                    for p in group {
                        let _ = p.reply.send(Err(e.clone()));
                    }
                }
            }
            drop(permit);
        });
    }
}

/// Registers this node: through its `--join` addresses when it has them
/// (which adds it as a learner when it is not a member, also after it was
/// removed), else by proposing its record (addresses may have changed).
/// Retries with backoff until it succeeds.
async fn announce(core: Arc<Core>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(200);
    let mut warned = false;
    loop {
        let member = core
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&core.id)
            .is_some();
        let record = core.config.record.clone();
        let register = |record: NodeRecord| {
            core.propose(Request::now(
                crate::authz::node_principal(&record.name),
                Command::RegisterNode(Box::new(record)),
            ))
        };
        let result = if !core.config.join.is_empty() {
            // Through the join addresses first, member or not: a node that
            // was removed (drained) and restarted still finds itself in
            // the membership of its own log, which the cluster has moved
            // past; the leader adds it back, or only registers its record
            // when it is a member. A member whose join addresses are all
            // gone registers through its own view of the leader.
            match join_any(&core, &record).await {
                Ok(()) => Ok(()),
                Err(e) if member => register(record).await.map(|_| ()).map_err(|_| e),
                Err(e) => Err(e),
            }
        } else if member {
            register(record).await.map(|_| ())
        } else {
            // Metrics may lag a fresh `initialize`; a node that was neither
            // initialized nor told where to join waits to be added.
            if !warned && !core.config.init {
                tracing::warn!(
                    "this node is not a cluster member: start it with --init (first node) or --join <raft addr of a member>"
                );
                warned = true;
            }
            Err(Error::NoLeader)
        };
        match result {
            Ok(()) => {
                tracing::info!(id = core.id, "registered with the cluster");
                return;
            }
            Err(e) => tracing::info!(error = %e, retry_in = ?backoff, "not registered yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// How long one join call may take (the leader adds a learner and commits
/// the node's record).
const JOIN_DEADLINE: Duration = Duration::from_secs(15);

async fn join_any(core: &Core, record: &NodeRecord) -> Result<(), Error> {
    let mut last = Error::NoLeader;
    for addr in &core.config.join {
        let mut c = match network::client(addr, &core.certs.client()) {
            Ok(c) => c,
            Err(reason) => {
                last = Error::Forward {
                    addr: addr.clone(),
                    reason,
                };
                continue;
            }
        };
        let req = pb::JoinRequest {
            request_id: String::new(),
            node_id: core.id,
            peer: Some(convert::peer_to(&core.config.member)),
            record: serde_json::to_vec(record).unwrap_or_default(),
            raft_mode: convert::RAFT_MODE,
        };
        // Bounded: a frozen member accepts the connection and never answers.
        match tokio::time::timeout(JOIN_DEADLINE, c.join(req)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(s)) => {
                last = Error::Forward {
                    addr: addr.clone(),
                    reason: format!("{}: {}", s.code(), s.message()),
                };
            }
            Err(_) => {
                last = Error::Forward {
                    addr: addr.clone(),
                    reason: format!("no answer in {JOIN_DEADLINE:?}"),
                };
            }
        }
    }
    Err(last)
}

/// How long one incarnation call may take.
const INCARNATION_DEADLINE: Duration = Duration::from_secs(2);

/// A peer this node tells of its start: its id when it is a member here,
/// Raft address, region (for the simulated delay).
struct StartPeer {
    id: Option<NodeId>,
    addr: String,
    region: String,
}

impl Core {
    /// Who to tell of this start, and how many must answer: the other
    /// members of this node's view and its join addresses; a voter needs
    /// half the other voters (with itself, the majority any election it
    /// could take part in needs), any other node one answer when it knows
    /// a peer, and a node that knows none (a new cluster's first) none.
    fn start_peers(&self) -> (Vec<StartPeer>, usize) {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let membership = m.membership();
        let mut peers: Vec<StartPeer> = membership
            .nodes()
            .filter(|(id, _)| **id != self.id)
            .map(|(id, n)| StartPeer {
                id: Some(*id),
                addr: n.addr.clone(),
                region: n.region.clone(),
            })
            .collect();
        for addr in &self.config.join {
            if *addr != self.config.member.addr && !peers.iter().any(|p| p.addr == *addr) {
                peers.push(StartPeer {
                    id: None,
                    addr: addr.clone(),
                    region: String::new(),
                });
            }
        }
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let need = if voters.contains(&self.id) {
            (voters.len() - 1).div_ceil(2)
        } else {
            usize::from(!peers.is_empty())
        };
        (peers, need)
    }

    /// Tells `peers` of incarnation `n`; their answers, by address.
    async fn tell_start(
        &self,
        peers: &[StartPeer],
        n: u64,
    ) -> BTreeMap<String, pb::IncarnationResponse> {
        let calls = peers.iter().map(|p| async move {
            if p.id.is_some_and(|id| self.faults.blocked(id)) {
                return None;
            }
            let mut c = network::client(&p.addr, &self.certs.client()).ok()?;
            let req = pb::IncarnationRequest {
                request_id: String::new(),
                node_id: self.id,
                incarnation: n,
            };
            let call = self.config.delays.around(&p.region, c.incarnation(req));
            match tokio::time::timeout(INCARNATION_DEADLINE, call).await {
                Ok(Ok(r)) => Some((p.addr.clone(), r.into_inner())),
                Ok(Err(s)) => {
                    tracing::debug!(peer = %p.addr, error = %s.message(), "incarnation call refused");
                    None
                }
                Err(_) => None,
            }
        });
        futures_util::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Confirms this start with the peers before the node votes or campaigns.
///
/// The node takes a new incarnation (the start time in ms, at least one
/// above its data dir's), writes it (fsynced), and tells its peers, who
/// answer the highest they had recorded. One that had seen a higher one
/// than the data dir holds (other than a number this start sent itself)
/// shows the dir was put back from a copy older
/// than the node's last start: the node takes a number above it, records
/// how far the peers had got ([`store::Recovery`], kept across restarts)
/// and stays out of elections until it has applied that far under a leader
/// of that term or later. Then it votes. See [`store::Incarnations`].
async fn confirm_start(core: Arc<Core>, mut stop: watch::Receiver<bool>) {
    let inc = core.incarnations.clone();
    let fail = |what: &str, e: sled::Error| {
        tracing::error!(
            error = %e,
            "cannot {what} in the data dir; this node will not vote until restarted with a working disk"
        );
    };
    let mut on_disk = match inc.own() {
        Ok(n) => n,
        Err(e) => return fail("read this node's incarnation", e),
    };
    let mut recovery = match inc.recovery() {
        Ok(r) => r,
        Err(e) => return fail("read this node's recovery record", e),
    };
    let mut trusted = match inc.take_trust().await {
        Ok(t) => t,
        Err(e) => return fail("read the trust-data-dir mark", e),
    };
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    };
    let mut next = (on_disk + 1).max(now_ms());
    if let Err(e) = inc.set_own(next).await {
        return fail("record this start", e);
    }
    core.incarnation.store(next, Ordering::Relaxed);
    // Every number this start sent: a peer may answer one of them (a call
    // whose answer was lost, the round before a restore was found).
    let mut sent = vec![next];
    let started = Instant::now();
    let mut answered: BTreeMap<String, pb::IncarnationResponse> = BTreeMap::new();
    let mut logged = Instant::now();
    loop {
        let (peers, need) = core.start_peers();
        let ask: Vec<StartPeer> = peers
            .into_iter()
            .filter(|p| !answered.contains_key(&p.addr))
            .collect();
        answered.extend(core.tell_start(&ask, next).await);
        if answered.len() >= need {
            let seen = answered
                .values()
                .map(|a| a.seen)
                .filter(|s| !sent.contains(s))
                .max()
                .unwrap_or(0);
            if seen <= on_disk {
                break;
            }
            if std::mem::take(&mut trusted) {
                tracing::warn!(
                    on_disk,
                    seen_by_peers = seen,
                    "this node's data dir is older than its last start, and `trine node trust-data-dir` marked it current: \
                     voting at once. Writes only the lost part of its log held may be gone"
                );
            } else {
                // Put back from an old copy: catch up to the furthest the
                // peers (and any earlier recovery) had got.
                let r = answered.values().fold(
                    recovery.unwrap_or(store::Recovery {
                        applied: 0,
                        term: 0,
                    }),
                    |r, a| store::Recovery {
                        applied: r.applied.max(a.applied),
                        term: r.term.max(a.term),
                    },
                );
                tracing::error!(
                    on_disk,
                    seen_by_peers = seen,
                    catch_up_to = r.applied,
                    term = r.term,
                    "this node's data dir is older than its last start: it was put back from an old copy (a backup, a snapshot). \
                     It has forgotten votes it gave and entries it acknowledged, so it will not vote or campaign until it has caught up \
                     to log index {} under a leader of term {} or later (Raft assumes a disk keeps what it acknowledged). \
                     Never start a member from a copy of its data dir; to replace its disk, remove the member (`trine node leave --node-id ID`) and join one with an empty data dir",
                    r.applied,
                    r.term
                );
                metrics::stale_start();
                if let Err(e) = inc.set_recovery(Some(r)).await {
                    return fail("record the recovery", e);
                }
                recovery = Some(r);
            }
            // A number above the peers', so a later restore is found too.
            on_disk = seen;
            next = (seen + 1).max(now_ms());
            if let Err(e) = inc.set_own(next).await {
                return fail("record this start", e);
            }
            core.incarnation.store(next, Ordering::Relaxed);
            sent.push(next);
            answered.clear();
            continue;
        }
        if logged.elapsed() >= Duration::from_secs(5) {
            logged = Instant::now();
            tracing::warn!(
                answered = answered.len(),
                need,
                waited = ?started.elapsed(),
                "waiting for peers to confirm this start before voting (a majority of voters must be reachable)"
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
    if let Some(r) = recovery {
        core.restored.store(true, Ordering::Relaxed);
        let mut metrics = core.raft.metrics();
        loop {
            let caught_up = {
                let m = metrics.borrow_and_update();
                m.current_leader.is_some_and(|l| l != core.id)
                    && m.vote.is_committed()
                    && m.vote.leader_id().term >= r.term
                    && m.last_applied.is_some_and(|a| a.index >= r.applied)
            };
            if caught_up {
                break;
            }
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        if let Err(e) = inc.set_recovery(None).await {
            return fail("clear the recovery record", e);
        }
        tracing::info!(
            applied = r.applied,
            term = r.term,
            "caught up after the restore from an old copy; this node votes again"
        );
    }
    core.voting.store(true, Ordering::Release);
    core.raft.runtime_config().elect(true);
    metrics::voting(true);
    tracing::debug!(incarnation = next, took = ?started.elapsed(), "start confirmed with the peers; this node votes");
}

/// Starts the next election at once when a campaign split the vote.
///
/// openraft 0.9 draws one election timeout per process and checks it on a
/// tick of 1.5 heartbeats. Two candidates whose timeouts round to the same
/// number of ticks, and whose ticks fall closer together than a message
/// takes, split the vote in every term, forever: in standard Raft a voter
/// votes once per term, and each has voted for itself (the CI run of
/// 2026-12-04 saw two survivors do so for ten seconds). Raft's cure is a
/// fresh random timeout for every election; this draws one, in
/// [election_timeout_min/2, election_timeout_min), for each term a
/// candidate has not won, and starts the next term when it runs out: before
/// openraft's own timer, so the two no longer move in step. A candidate
/// that a voter turned down for a shorter log is left to openraft's longer
/// wait, so that the voter with the longer log wins.
async fn rerun_split_votes(
    core: Arc<Core>,
    campaigns: network::Campaigns,
    mut stop: watch::Receiver<bool>,
) {
    let raft = &core.raft;
    let min = Duration::from_millis(raft.config().election_timeout_min.max(2));
    let mut metrics = raft.metrics();
    loop {
        let candidate_in = {
            let m = metrics.borrow_and_update();
            (m.state == ServerState::Candidate).then_some(m.current_term)
        };
        let Some(term) = candidate_in else {
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
            continue;
        };
        let wait = rand::random_range(min / 2..min);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let m = metrics.borrow_and_update().clone();
        if m.state != ServerState::Candidate
            || m.current_term != term
            || !core.voting()
            || campaigns.was_behind_in(term, m.last_log_index.unwrap_or(0))
        {
            continue;
        }
        tracing::info!(
            term,
            waited = ?wait,
            "no leader elected in this term (split vote); starting the next election now"
        );
        if raft.trigger().elect().await.is_err() {
            return;
        }
    }
}

/// The election timer this cluster relies on: a voter that has heard from
/// no leader for the longest election timeout (the dead leader's lease,
/// during which openraft's voters turn every candidate away) plus a
/// timeout drawn from [min, max) for each quiet spell starts an election.
/// That is openraft 0.9's own schedule, which its timer keeps only in a
/// young cluster.
///
/// openraft adds twice the longest timeout to a node's wait while it
/// remembers losing a campaign to a longer log, and clears that memory only
/// when its own timer starts an election (not on `trigger().elect()`, not
/// on a new leader). After a few elections most members carry it, and its
/// timer fires at 10.5-12 s of silence on the testnet (finding 25: in the
/// 100-schedule soak on 7777a23 the survivors of a killed leader left the
/// electing to a slower version of this fallback, split the vote, and the
/// restarted old leader won). So the schedule is kept here, on state that
/// is ours and current: a node that a voter turned down for a shorter log,
/// and that has not caught up since, waits one longest timeout more, so
/// that the voter with the longest log campaigns first (the windows do not
/// overlap).
///
/// Earlier soaks shaped the rest (finding 14): the wait is drawn once per
/// spell, not at every check, so that survivors do not fire together; a
/// voter that has just given its vote to a campaign (its vote changed)
/// leaves that campaign one longest timeout (not a whole spell: campaigns
/// that could not win must not hold every survivor back).
async fn elect_when_overdue(
    core: Arc<Core>,
    campaigns: network::Campaigns,
    mut stop: watch::Receiver<bool>,
) {
    let c = core.raft.config().clone();
    let min = Duration::from_millis(c.election_timeout_min.max(4));
    let max = Duration::from_millis(c.election_timeout_max.max(4));
    // openraft's election timeout: drawn from [min, max), once per spell.
    let draw = || rand::random_range(min..max.max(min + Duration::from_millis(1)));
    // Since this task started, last started an election, or saw this
    // node's vote move (a campaign it voted in): one election per spell at
    // most, so a campaign under way gets its time.
    let mut quiet_since = Instant::now();
    let mut timeout = draw();
    let mut last_vote = core.raft.metrics().borrow().vote;
    // When this node last gave its vote to a campaign under way.
    let mut campaign_at: Option<Instant> = None;
    let mut was_draining = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(min / 4) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // A draining node votes but does not campaign, openraft's timer
        // included: one that won would lead only until its drain ended, and
        // the cluster would elect again (soak seed 33 on 7777a23: the
        // drained node won after the leader's kill, then left, and the
        // chains caught up 11.8 s after healing).
        let draining = core.reader.with_state(|s| {
            s.nodes
                .get(&core.id)
                .is_some_and(|r| r.status == NodeStatus::Draining)
        });
        if draining != was_draining && core.voting() {
            was_draining = draining;
            core.raft.runtime_config().elect(!draining);
            tracing::info!(
                draining,
                "{}",
                if draining {
                    "this node is draining: it votes but no longer campaigns"
                } else {
                    "this node campaigns again"
                }
            );
        }
        if draining {
            continue;
        }
        let m = core.raft.metrics().borrow().clone();
        if m.vote != last_vote {
            last_vote = m.vote;
            if !m.vote.is_committed() {
                campaign_at = Some(Instant::now());
            }
        }
        // A campaign this node voted in gets one longest timeout to win
        // (a round trip or two); one that cannot win must not hold the
        // fallback back longer than that.
        if campaign_at.is_some_and(|t| t.elapsed() < max) {
            continue;
        }
        let voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == core.id);
        if m.state == ServerState::Leader {
            // Its own leadership is contact with a leader: a leader frozen
            // (SIGSTOP) and woken after the others elected a successor
            // steps down and hears that successor within a heartbeat; it
            // must not campaign at once as if it had heard no one for as
            // long as it led (soak seed 70 on 74488b5: the woken leader's
            // campaigns unseated its successor and held writes 5 s).
            quiet_since = Instant::now();
        }
        if m.state != ServerState::Follower || !voter || !core.voting() {
            continue;
        }
        let silent = core
            .leader_heard()
            .map_or(quiet_since.elapsed(), |h| h.min(quiet_since.elapsed()));
        // Turned down for a shorter log in one of the last few terms, and
        // not brought up to date since (a leader's appends clear it: a
        // flag that outlived its cause held every survivor back in the
        // soak, seed 72, until the killed leader restarted).
        let behind = campaigns.was_behind_in(
            m.current_term.saturating_sub(3).max(1),
            m.last_log_index.unwrap_or(0),
        );
        // The dead leader's lease, then this spell's timeout; one longest
        // timeout more for a node with a shorter log than a voter's.
        let wait = max + timeout + if behind { max } else { Duration::ZERO };
        if silent < wait {
            continue;
        }
        tracing::info!(
            term = m.current_term,
            silent = ?silent,
            behind,
            "no leader heard from for the longest election timeout and this node's own; starting an election"
        );
        quiet_since = Instant::now();
        timeout = draw();
        if core.raft.trigger().elect().await.is_err() {
            return;
        }
    }
}

/// The leader's housekeeping: marks members down or up from RPC liveness,
/// and keeps the voter set placed by [`voters::plan`].
async fn maintain(core: Arc<Core>, mut stop: watch::Receiver<bool>) {
    let mut leader_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(MAINTAIN_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let m = core.raft.metrics().borrow().clone();
        core.quorum
            .set_voters(core.id, m.membership_config.membership().voter_ids());
        if m.current_leader != Some(core.id) || !m.state.is_leader() {
            leader_since = None;
            continue;
        }
        let since = *leader_since.get_or_insert_with(Instant::now);
        if let Err(e) = maintain_once(&core, &m, since).await {
            tracing::debug!(error = %e, "maintenance step failed; retrying");
        }
    }
}

/// The leader's placement step: commit the plan; when there is none and
/// every stage is ready, at most one rebalancing move per
/// `rebalance_every`; and time the recovery of stages moved off dead nodes.
async fn place(core: &Core, state: &State, leader_since: Instant) -> Result<(), Error> {
    let health = planner::Health::from_state(state);
    // Stages that were on a dead node and are now ready elsewhere.
    if let Ok(mut recovering) = core.recovering.lock() {
        recovering.retain(|slot, (dead, since)| match state.placements.get(slot) {
            Some(p) if p.state == StageState::Ready => {
                if p.node != *dead {
                    let took = since.elapsed();
                    metrics::stage_recovered(took);
                    tracing::info!(model = %slot.0, replica = slot.1, stage = slot.2, from = *dead, to = p.node, took = ?took, "stage recovered on another node");
                }
                false
            }
            Some(_) => true,
            None => false,
        });
    }
    let changes = planner::plan(state, &health);
    if !changes.is_empty() {
        tracing::info!(changes = changes.len(), "placement changes");
        let mut proposals = Vec::with_capacity(changes.len());
        for c in changes {
            if let Command::Place {
                model,
                replica,
                stage,
                ..
            } = &c
            {
                let slot = (model.clone(), *replica, *stage);
                if let Some(old) = state.placements.get(&slot)
                    && !health.live.contains(&old.node)
                {
                    let last = core.last_heard(old.node, leader_since);
                    if let Ok(mut r) = core.recovering.lock() {
                        r.entry(slot).or_insert((old.node, last));
                    }
                }
            }
            metrics::placement_change(&c, state);
            proposals.push(core.propose(Request::now("planner", c)));
        }
        // Together, for the same reason as node statuses: a region's
        // stages all move at once (one after another, seed 2 of the soak on
        // c3c262f moved a dead region's stage only after a new model's,
        // 5.3 s after the kill). The state machine takes the plan's
        // commands in any order; what failed is planned again next round.
        for done in futures_util::future::join_all(proposals).await {
            done?;
        }
        return Ok(());
    }
    let all_ready = state
        .placements
        .values()
        .all(|p| p.state == StageState::Ready);
    let due = core
        .last_rebalance
        .lock()
        .is_ok_and(|last| last.unwrap_or(leader_since).elapsed() >= core.config.rebalance_every);
    if !all_ready || !due {
        return Ok(());
    }
    let moves = planner::rebalance(state, &health);
    if moves.is_empty() {
        return Ok(());
    }
    if let Ok(mut last) = core.last_rebalance.lock() {
        *last = Some(Instant::now());
    }
    tracing::info!(moves = moves.len(), "rebalancing one replica");
    metrics::rebalanced(moves.len());
    for c in moves {
        core.propose(Request::now("planner", c)).await?;
    }
    Ok(())
}

async fn maintain_once(
    core: &Core,
    m: &openraft::RaftMetrics<NodeId, Member>,
    leader_since: Instant,
) -> Result<(), Error> {
    let membership = m.membership_config.membership().clone();
    let state = core.reader.state();
    let down_after = core.config.down_after;
    let last_index = m.last_log_index.unwrap_or(0);
    let matched: BTreeMap<NodeId, u64> = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .map(|(id, l)| (*id, l.as_ref().map_or(0, |l| l.index)))
                .collect()
        })
        .unwrap_or_default();
    let mut candidates = Vec::new();
    let mut changed = Vec::new();
    for (id, member) in membership.nodes() {
        let unanswered = if *id == core.id {
            Duration::ZERO
        } else {
            core.last_heard(*id, leader_since).elapsed()
        };
        let down = unanswered > down_after;
        let steady_for = match core.answering_since.lock() {
            Ok(mut since) if down => {
                since.remove(id);
                Duration::ZERO
            }
            Ok(mut since) => since.entry(*id).or_insert_with(Instant::now).elapsed(),
            Err(_) => Duration::MAX,
        };
        if let Some(rec) = state.nodes.get(id) {
            let want = match (rec.status, down) {
                (NodeStatus::Up, true) => Some(NodeStatus::Down),
                (NodeStatus::Down, false) if steady_for >= core.config.up_after => {
                    Some(NodeStatus::Up)
                }
                _ => None,
            };
            if let Some(status) = want {
                tracing::info!(node = id, name = %rec.name, status = status.as_str(), unanswered = ?unanswered, "node status changed");
                changed.push(Command::SetNodeStatus { id: *id, status });
            }
        }
        let lagging = *id != core.id && matched.get(id).copied().unwrap_or(0) + 1000 < last_index;
        candidates.push(Candidate {
            id: *id,
            region: member.region.clone(),
            down_for: if down {
                Some(unanswered - down_after)
            } else if lagging {
                Some(Duration::ZERO)
            } else {
                None
            },
            draining: state
                .nodes
                .get(id)
                .is_some_and(|r| r.status == NodeStatus::Draining),
        });
    }
    // All at once: a region's nodes go down together, and each proposal
    // waits for a quorum round trip (one after another, the second of a
    // region's two nodes was marked down 0.6 s after the first in the soak).
    for done in futures_util::future::join_all(
        changed
            .into_iter()
            .map(|c| core.propose(Request::now("system", c))),
    )
    .await
    {
        done?;
    }
    // Placement: re-plan from the state as it is now (statuses included).
    let state = core.reader.state();
    place(core, &state, leader_since).await?;
    if membership.get_joint_config().len() > 1 {
        return Ok(());
    }
    let current: BTreeSet<NodeId> = membership.voter_ids().collect();
    let want = voters::plan(&current, &candidates, core.id, &core.config.voters);
    if want != current {
        tracing::info!(from = ?current, to = ?want, "changing voters");
        core.raft
            .change_membership(ChangeMembers::ReplaceAllVoters(want), true)
            .await
            .map_err(|e| Error::Membership(e.to_string()))?;
    }
    Ok(())
}

async fn export_metrics(core: Arc<Core>, mut stop: watch::Receiver<bool>) {
    let mut rx = core.raft.metrics();
    // A leader that no majority has acknowledged for longer than the
    // longest election timeout is cut off: the others elect a new one.
    let lease = core
        .raft
        .config()
        .election_timeout_max
        .max(core.raft.config().heartbeat_interval * 3);
    loop {
        {
            let m = rx.borrow_and_update().clone();
            metrics::raft(&m, Duration::from_millis(lease));
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
