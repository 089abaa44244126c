//! The client side of Raft: one lazily connected tonic channel per peer,
//! over mutual TLS, with openraft's timeouts. Every successful answer marks
//! the peer alive in [`Liveness`], the leader's failure detector input.
//! Snapshots are streamed in chunks on one `InstallSnapshot` call.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{Snapshot, Vote};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use trine_proto::v1 as pb;
use trine_proto::v1::raft_client::RaftClient;

use crate::convert;
use crate::metrics;
use crate::types::{Member, NodeId, TypeConfig};

/// Snapshot bytes per streamed chunk.
pub const SNAPSHOT_CHUNK: usize = 1 << 20;
/// Largest gRPC message between members (a batch of entries).
pub const MAX_MESSAGE: usize = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// When each peer last answered an RPC.
#[derive(Debug, Clone, Default)]
pub struct Liveness(Arc<Mutex<HashMap<NodeId, Instant>>>);

impl Liveness {
    pub fn mark(&self, id: NodeId) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(id, Instant::now());
        }
    }

    pub fn last(&self, id: NodeId) -> Option<Instant> {
        self.0.lock().ok()?.get(&id).copied()
    }
}

/// The leader's quorum clock: when each member last accepted this node's
/// AppendEntries (counted from when they were sent; a refusal for a higher
/// vote does not count), and the voters, so that it can tell when a
/// majority last did. That moment starts the serving lease the leader
/// hands its followers with every AppendEntries, and its own.
#[derive(Debug, Clone, Default)]
pub struct Quorum(Arc<Mutex<QuorumInner>>);

#[derive(Debug, Default)]
struct QuorumInner {
    me: NodeId,
    voters: Vec<NodeId>,
    acked: HashMap<NodeId, Instant>,
}

impl Quorum {
    pub fn set_voters(&self, me: NodeId, voters: impl IntoIterator<Item = NodeId>) {
        if let Ok(mut q) = self.0.lock() {
            q.me = me;
            q.voters = voters.into_iter().collect();
        }
    }

    /// `id` accepted an AppendEntries this node sent at `sent`.
    pub fn ack(&self, id: NodeId, sent: Instant) {
        if let Ok(mut q) = self.0.lock() {
            let t = q.acked.entry(id).or_insert(sent);
            *t = (*t).max(sent);
        }
    }

    /// When a majority of the voters (this node counting as now) had last
    /// accepted this node's AppendEntries; None before the voters are known
    /// or while no majority ever has.
    pub fn acked(&self) -> Option<Instant> {
        let q = self.0.lock().ok()?;
        if q.voters.is_empty() {
            return None;
        }
        let now = Instant::now();
        let mut times: Vec<Instant> = q
            .voters
            .iter()
            .filter_map(|v| {
                if *v == q.me {
                    Some(now)
                } else {
                    q.acked.get(v).copied()
                }
            })
            .collect();
        times.sort_unstable_by(|a, b| b.cmp(a));
        times.get(q.voters.len() / 2).copied()
    }
}

/// The leader's side of the lease stamps ([`crate::lease`]): the newest
/// stamp each follower's accepted answers carried, and when this node
/// received it, echoed back in the next AppendEntries to it.
#[derive(Debug, Clone, Default)]
pub struct Echoes(Arc<Mutex<HashMap<NodeId, (trine_proto::v1::Stamp, Instant)>>>);

impl Echoes {
    /// `id` answered with `stamp`, received now (a newer stamp of the same
    /// run wins; a new run's replaces the old run's).
    pub fn record(&self, id: NodeId, stamp: trine_proto::v1::Stamp) {
        if let Ok(mut m) = self.0.lock() {
            let newer = m
                .get(&id)
                .is_none_or(|(s, _)| s.boot != stamp.boot || s.at_us < stamp.at_us);
            if newer {
                m.insert(id, (stamp, Instant::now()));
            }
        }
    }

    /// What to echo to `id` when a majority last accepted this node at
    /// `quorum`: its newest stamp (boot 0 when none is held: the receiver
    /// then renews no lease from this message), and how long before this
    /// node received that stamp the majority had accepted it (0 when
    /// after; None when either is unknown).
    pub fn echo(
        &self,
        id: NodeId,
        quorum: Option<Instant>,
    ) -> (trine_proto::v1::Stamp, Option<u64>) {
        let held = self.0.lock().ok().and_then(|m| m.get(&id).cloned());
        match held {
            Some((stamp, heard)) => {
                let lag = quorum.map(|q| {
                    u64::try_from(heard.saturating_duration_since(q).as_micros())
                        .unwrap_or(u64::MAX)
                });
                (stamp, lag)
            }
            None => (trine_proto::v1::Stamp::default(), None),
        }
    }
}

/// What this node's vote requests learnt: the highest term in which a voter
/// turned this node down for having a shorter log than its own, and how far
/// that voter's log went. A candidate that is behind must not hurry the
/// next election (openraft already delays its own timer then): the voter
/// with the longer log has to win. Once this node's own log reaches as far
/// (a leader brought it up to date since), it is no longer behind.
#[derive(Debug, Clone, Default)]
pub struct Campaigns(Arc<Mutex<Option<(u64, u64)>>>);

impl Campaigns {
    /// A voter turned this node's campaign in `term` down; its log ends at
    /// index `theirs`.
    pub fn behind_in(&self, term: u64, theirs: u64) {
        if let Ok(mut b) = self.0.lock() {
            match &mut *b {
                Some((t, _)) if *t > term => {}
                Some((t, i)) if *t == term => *i = (*i).max(theirs),
                _ => *b = Some((term, theirs)),
            }
        }
    }

    /// Whether a voter had a longer log than this node's campaign in `term`
    /// or later, and this node's log (ending at index `mine`) is still
    /// shorter than that voter's was.
    pub fn was_behind_in(&self, term: u64, mine: u64) -> bool {
        self.0
            .lock()
            .ok()
            .and_then(|b| *b)
            .is_some_and(|(t, theirs)| t >= term && mine < theirs)
    }
}

/// An in-node fault layer for tests and chaos runs: RPCs to the listed
/// members fail as if the network dropped them, and proposals are not
/// forwarded to them. A cut is one-way: this node's calls to them are
/// dropped, their calls to it still arrive (and are answered); telling both
/// sides cuts both ways. Empty in normal operation.
#[derive(Debug, Clone, Default)]
pub struct Faults(Arc<Mutex<std::collections::HashSet<NodeId>>>);

impl Faults {
    /// Cuts this node off from `peers` (replacing any earlier cut).
    pub fn isolate(&self, peers: impl IntoIterator<Item = NodeId>) {
        if let Ok(mut s) = self.0.lock() {
            *s = peers.into_iter().collect();
        }
    }

    pub fn heal(&self) {
        self.isolate([]);
    }

    pub fn blocked(&self, peer: NodeId) -> bool {
        self.0.lock().is_ok_and(|s| s.contains(&peer))
    }

    /// The members this node is cut off from, sorted.
    pub fn cut(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self
            .0
            .lock()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }
}

/// Simulated network delay to other regions, for testnets on one machine
/// (no `tc netem` there): every Raft RPC to a member waits half the
/// round-trip time to its region before it is sent and half after its
/// answer arrives, so each call costs the full RTT. Off (zero) by default.
/// Fault injection can add delay (and jitter) towards chosen regions on
/// top, on any node ([`Delays::set_added`]).
#[derive(Clone, Default)]
pub struct Delays {
    sim: Option<Arc<RttTo>>,
    added: Arc<Mutex<BTreeMap<String, Added>>>,
}

/// Injected delay towards one region: a fixed round trip plus uniform jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Added {
    pub rtt: Duration,
    pub jitter: Duration,
}

/// The RTT from this node to a region.
type RttTo = dyn Fn(&str) -> Duration + Send + Sync;
/// The RTT between two regions.
type RttBetween = dyn Fn(&str, &str) -> Duration + Send + Sync;

impl std::fmt::Debug for Delays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.sim.is_some() {
            "Delays(simulated)"
        } else {
            "Delays(off)"
        })
    }
}

impl Delays {
    /// `rtt(region)` is this node's round-trip time to a member in `region`
    /// (it may add jitter per call).
    pub fn simulated(rtt: impl Fn(&str) -> Duration + Send + Sync + 'static) -> Self {
        Self {
            sim: Some(Arc::new(rtt)),
            added: Arc::default(),
        }
    }

    /// Whether inter-region latency is simulated (injected delay aside).
    pub fn is_on(&self) -> bool {
        self.sim.is_some()
    }

    /// Replaces the injected delays (empty: none).
    pub fn set_added(&self, added: BTreeMap<String, Added>) {
        if let Ok(mut a) = self.added.lock() {
            *a = added;
        }
    }

    /// The injected delays now in force.
    pub fn added(&self) -> BTreeMap<String, Added> {
        self.added.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// The injected round trip to `region` for one call (jitter drawn).
    pub fn added_rtt(&self, region: &str) -> Duration {
        let Some(a) = self.added.lock().ok().and_then(|a| a.get(region).copied()) else {
            return Duration::ZERO;
        };
        if a.jitter.is_zero() {
            return a.rtt;
        }
        a.rtt + a.jitter.mul_f64(rand::random::<f64>())
    }

    /// One RPC's round trip to `region`.
    pub fn rtt(&self, region: &str) -> Duration {
        self.sim.as_ref().map_or(Duration::ZERO, |f| f(region)) + self.added_rtt(region)
    }

    /// Runs `call` as if it crossed the network to `region` and back.
    pub async fn around<T>(&self, region: &str, call: impl Future<Output = T>) -> T {
        let half = self.rtt(region) / 2;
        if !half.is_zero() {
            tokio::time::sleep(half).await;
        }
        let out = call.await;
        if !half.is_zero() {
            tokio::time::sleep(half).await;
        }
        out
    }
}

/// Round-trip times between regions (symmetric; jitter allowed), from
/// which each member gets its [`Delays`].
#[derive(Clone)]
pub struct RttMatrix(Arc<RttBetween>);

impl std::fmt::Debug for RttMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RttMatrix")
    }
}

impl RttMatrix {
    pub fn new(rtt: impl Fn(&str, &str) -> Duration + Send + Sync + 'static) -> Self {
        Self(Arc::new(rtt))
    }

    /// The delays of a member in `region`.
    pub fn from_region(&self, region: &str) -> Delays {
        let (m, own) = (self.0.clone(), region.to_owned());
        Delays::simulated(move |to| m(&own, to))
    }
}

/// A client for a member's Raft endpoint (mTLS, bounded messages).
pub fn client(addr: &str, tls: &ClientTlsConfig) -> Result<RaftClient<Channel>, String> {
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| format!("{addr}: {e}"))?
        .tls_config(tls.clone())
        .map_err(|e| format!("{addr}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    Ok(RaftClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// openraft's network factory.
#[derive(Debug, Clone)]
pub struct Network {
    pub certs: crate::tls::Certs,
    pub liveness: Liveness,
    pub quorum: Quorum,
    pub echoes: Echoes,
    pub campaigns: Campaigns,
    pub faults: Faults,
    pub delays: Delays,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Conn;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Conn {
        Conn {
            target,
            addr: node.addr.clone(),
            region: node.region.clone(),
            certs: self.certs.clone(),
            client: None,
            liveness: self.liveness.clone(),
            quorum: self.quorum.clone(),
            echoes: self.echoes.clone(),
            campaigns: self.campaigns.clone(),
            faults: self.faults.clone(),
            delays: self.delays.clone(),
        }
    }
}

/// The connection to one peer.
#[derive(Debug)]
pub struct Conn {
    target: NodeId,
    addr: String,
    region: String,
    certs: crate::tls::Certs,
    /// The channel and the certificate generation it was made under.
    client: Option<(u64, RaftClient<Channel>)>,
    liveness: Liveness,
    quorum: Quorum,
    echoes: Echoes,
    campaigns: Campaigns,
    faults: Faults,
    delays: Delays,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

fn unreachable<E: std::error::Error>(e: E) -> Unreachable {
    Unreachable::new(&Failure(e.to_string()))
}

/// How a failed call looks to openraft: a peer we could not reach backs
/// off; anything else is a network error.
fn status_err<E: std::error::Error>(s: &tonic::Status) -> RPCError<NodeId, Member, E> {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
            RPCError::Unreachable(unreachable(s))
        }
        _ => RPCError::Network(NetworkError::new(&Failure(format!(
            "{}: {}",
            s.code(),
            s.message()
        )))),
    }
}

fn request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("r{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

impl Conn {
    fn client<E: std::error::Error>(
        &mut self,
    ) -> Result<RaftClient<Channel>, RPCError<NodeId, Member, E>> {
        if self.faults.blocked(self.target) {
            return Err(RPCError::Unreachable(Unreachable::new(&Failure(format!(
                "{} is cut off by fault injection",
                self.addr
            )))));
        }
        let generation = self.certs.generation();
        match &self.client {
            Some((g, c)) if *g == generation => Ok(c.clone()),
            _ => {
                // New, or made under certificates since rotated.
                let c = client(&self.addr, &self.certs.client())
                    .map_err(|e| RPCError::Unreachable(Unreachable::new(&Failure(e))))?;
                self.client = Some((generation, c.clone()));
                Ok(c)
            }
        }
    }

    async fn timed<T, E: std::error::Error>(
        &self,
        rpc: &'static str,
        ttl: Duration,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, RPCError<NodeId, Member, E>> {
        let r = match tokio::time::timeout(ttl, self.delays.around(&self.region, fut)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(status_err(&s)),
            Err(_) => Err(RPCError::Unreachable(Unreachable::new(&Failure(format!(
                "{rpc} to {} timed out after {ttl:?}",
                self.addr
            ))))),
        };
        match &r {
            Ok(_) => self.liveness.mark(self.target),
            Err(_) => metrics::rpc_failure(rpc),
        }
        r
    }
}

fn malformed<E: std::error::Error>(e: convert::Malformed) -> RPCError<NodeId, Member, E> {
    RPCError::Network(NetworkError::new(&e))
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let mut c = self.client()?;
        let mut req = convert::append_to(&rpc, request_id());
        let quorum = self.quorum.acked();
        req.quorum_age_ms =
            quorum.map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX));
        let (echo, lag) = self.echoes.echo(self.target, quorum);
        req.echo = Some(echo);
        req.echo_quorum_lag_us = lag;
        let sent = Instant::now();
        let resp = self
            .timed("append_entries", option.hard_ttl(), c.append_entries(req))
            .await?;
        let stamp = resp.stamp;
        let resp = convert::append_resp_from(resp).map_err(malformed)?;
        if !matches!(resp, AppendEntriesResponse::HigherVote(_)) {
            self.quorum.ack(self.target, sent);
            if let Some(s) = stamp {
                self.echoes.record(self.target, s);
            }
        }
        Ok(resp)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let mut c = self.client()?;
        let req = convert::vote_req_to(&rpc, request_id());
        let resp = self.timed("vote", option.hard_ttl(), c.vote(req)).await?;
        let resp = convert::vote_resp_from(resp).map_err(malformed)?;
        if !resp.vote_granted && resp.last_log_id > rpc.last_log_id {
            self.campaigns.behind_in(
                rpc.vote.leader_id().term,
                resp.last_log_id.map_or(0, |l| l.index),
            );
        }
        Ok(resp)
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(RPCError::Network(NetworkError::new(&Failure(
            "chunked install_snapshot is not used: snapshots are streamed by full_snapshot".into(),
        ))))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let mut c = match self.client::<Fatal<NodeId>>() {
            Ok(c) => c,
            Err(e) => return Err(StreamingError::Unreachable(unreachable(&e))),
        };
        let data: Vec<u8> = Cursor::into_inner(*snapshot.snapshot);
        let meta = convert::snapshot_meta_to(&snapshot.meta, data.len() as u64);
        let id = request_id();
        let pieces: Vec<&[u8]> = if data.is_empty() {
            vec![&[][..]]
        } else {
            data.chunks(SNAPSHOT_CHUNK).collect()
        };
        let last = pieces.len() - 1;
        let mut offset = 0u64;
        let chunks: Vec<pb::SnapshotChunk> = pieces
            .into_iter()
            .enumerate()
            .map(|(i, piece)| {
                let chunk = pb::SnapshotChunk {
                    request_id: id.clone(),
                    vote: Some(convert::vote_to(&vote)),
                    meta: (i == 0).then(|| meta.clone()),
                    offset,
                    data: piece.to_vec(),
                    done: i == last,
                };
                offset += piece.len() as u64;
                chunk
            })
            .collect();
        // Large snapshots get time in proportion to their size.
        let ttl = option.hard_ttl().max(Duration::from_secs(10))
            + Duration::from_millis(data.len() as u64 / 10_000);
        let send = c.install_snapshot(tokio_stream::iter(chunks));
        let resp = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            r = tokio::time::timeout(ttl, send) => r,
        };
        match resp {
            Ok(Ok(r)) => {
                self.liveness.mark(self.target);
                metrics::snapshot("sent");
                let vote = convert::vote_from(r.into_inner().vote)
                    .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
                Ok(SnapshotResponse { vote })
            }
            Ok(Err(s)) => {
                metrics::rpc_failure("install_snapshot");
                Err(match s.code() {
                    tonic::Code::Unavailable => StreamingError::Unreachable(unreachable(&s)),
                    _ => StreamingError::Network(NetworkError::new(&s)),
                })
            }
            Err(_) => {
                metrics::rpc_failure("install_snapshot");
                Err(StreamingError::Unreachable(unreachable(Failure(format!(
                    "snapshot to {} timed out after {ttl:?}",
                    self.addr
                )))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_echo_carries_the_newest_stamp_and_the_quorums_lag_behind_it() {
        let e = Echoes::default();
        let stamp = |boot, at_us| trine_proto::v1::Stamp { boot, at_us };
        let (s, lag) = e.echo(2, Some(Instant::now()));
        assert_eq!((s.boot, lag), (0, None), "nothing heard from 2 yet");
        let before = Instant::now()
            .checked_sub(Duration::from_millis(700))
            .expect("uptime");
        e.record(2, stamp(9, 100));
        // An older answer of the same run arriving late changes nothing.
        e.record(2, stamp(9, 50));
        let (s, lag) = e.echo(2, Some(before));
        assert_eq!(s, stamp(9, 100));
        let lag = lag.expect("a lag");
        assert!(lag >= 700_000, "{lag} µs");
        // A majority that accepted after the stamp came: no lag.
        assert_eq!(e.echo(2, Some(Instant::now())).1, Some(0));
        // No majority known: no lag, so the follower takes no lease.
        assert_eq!(e.echo(2, None).1, None);
        // A restarted follower's stamps replace its old run's.
        e.record(2, stamp(11, 5));
        assert_eq!(e.echo(2, None).0, stamp(11, 5));
    }

    #[test]
    fn the_quorum_clock_is_the_majoritys_oldest_acceptance() {
        let q = Quorum::default();
        assert_eq!(q.acked(), None, "no voters known yet");
        q.set_voters(1, [1, 2, 3, 4, 5]);
        // Only this node: no majority of five.
        assert_eq!(q.acked(), None);
        // Acceptances in the past (this node counts as now, the newest).
        let t0 = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .expect("a second of uptime");
        let at = |ms| t0 + Duration::from_millis(ms);
        q.ack(2, at(10));
        q.ack(3, at(30));
        // This node (now), 3 at 30 ms, 2 at 10 ms: the third newest is 10 ms.
        assert_eq!(q.acked(), Some(at(10)));
        q.ack(4, at(50));
        assert_eq!(q.acked(), Some(at(30)));
        // An older acceptance never moves the clock back; a newer one moves it on.
        q.ack(4, at(5));
        assert_eq!(q.acked(), Some(at(30)));
        q.ack(2, at(70));
        assert_eq!(q.acked(), Some(at(50)));
        // A member that is not a voter does not count.
        q.ack(9, at(90));
        assert_eq!(q.acked(), Some(at(50)));
        // One voter alone: always now.
        q.set_voters(1, [1]);
        assert!(q.acked().is_some_and(|t| t > at(900)));
    }

    /// A node turned down for a shorter log stays "behind" only while its
    /// own log is shorter than the voter's was, and only for recent terms.
    #[test]
    fn behind_holds_until_the_log_catches_up() {
        let c = Campaigns::default();
        assert!(!c.was_behind_in(1, 0));
        c.behind_in(5, 100);
        assert!(c.was_behind_in(3, 50));
        assert!(c.was_behind_in(5, 99));
        // Brought up to date since (a leader's appends): not behind.
        assert!(!c.was_behind_in(3, 100));
        // Marked in a term older than the window: not behind.
        assert!(!c.was_behind_in(6, 50));
        // An older term's mark changes nothing; the same term's longest
        // voter log counts.
        c.behind_in(4, 500);
        assert!(!c.was_behind_in(3, 120));
        c.behind_in(5, 130);
        assert!(c.was_behind_in(3, 120));
        c.behind_in(7, 10);
        assert!(!c.was_behind_in(3, 120));
        assert!(c.was_behind_in(7, 9));
    }
}
