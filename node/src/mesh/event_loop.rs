//! The mesh's event loop: owns the swarm, answers [`Command`]s, publishes
//! heartbeats, keeps the peer table and the peer metrics current.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use libp2p::core::ConnectedPoint;
use libp2p::core::multiaddr::Protocol;
use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, connection_limits, gossipsub, identify, kad, ping,
};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot, watch};
use trine_proto::v1::{Heartbeat, StageRequest, StageResponse, StageStatus};

use super::filter::PeerFilter;
use super::health::{self, Verdict};
use super::peers::{self, Table};
use super::transport::{self, Simulation};
use super::{
    COMMAND_QUEUE, Command, Config, Error, InboundStage, PeerView, Snapshot, Started, Status, stage,
};
use crate::metrics;

const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/trine/kad/1");
const IDENTIFY_PROTOCOL: &str = "/trine/id/1";
/// Connections with no open stream close after this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long `start` waits for the listeners to report their addresses.
const LISTEN_DEADLINE: Duration = Duration::from_secs(10);
/// Redial the bootstrap nodes this often while no peer is connected.
const REDIAL_EVERY: Duration = Duration::from_secs(5);
/// Penalty (application score units) per invalid message.
const PENALTY: f64 = 1.0;

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    stage: request_response::Behaviour<stage::Codec>,
}

fn gossipsub(config: &Config, key: &Keypair) -> Result<gossipsub::Behaviour, Error> {
    let err = |e: String| Error::Transport(format!("gossipsub: {e}"));
    let gs_config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_secs(1))
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        // Room for a heartbeat and its envelope; anything bigger is cut off
        // by the codec before our validator sees it.
        .max_transmit_size(16 << 10)
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut gs = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gs_config,
    )
    .map_err(|e| err(e.to_owned()))?;
    let topic = gossipsub::IdentTopic::new(health::TOPIC);
    // Good behaviour earns at most +2 (time in mesh, first deliveries); one
    // invalid message costs -10, a bad stage message -10: a misbehaving
    // peer goes negative at once and recovers only as penalties decay.
    let topic_params = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 100.0,
        first_message_deliveries_weight: 0.1,
        first_message_deliveries_cap: 10.0,
        // A quiet topic (one message per node per interval): do not punish
        // mesh peers for delivering few messages.
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -10.0,
        invalid_message_deliveries_decay: 0.9,
        ..Default::default()
    };
    let mut params = gossipsub::PeerScoreParams {
        // Testnets and compose run every node on one host; membership, not
        // IP diversity, is what keeps strangers out.
        ip_colocation_factor_weight: 0.0,
        app_specific_weight: 10.0,
        ..Default::default()
    };
    params.topics.insert(topic.hash(), topic_params);
    gs.with_peer_score(params, gossipsub::PeerScoreThresholds::default())
        .map_err(err)?;
    gs.subscribe(&topic).map_err(|e| err(e.to_string()))?;
    let _ = config;
    Ok(gs)
}

impl Behaviour {
    fn new(config: &Config, key: &Keypair) -> Result<Self, Error> {
        let peer_id = key.public().to_peer_id();
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(config.max_connections))
            .with_max_established_per_peer(Some(config.max_connections_per_peer))
            .with_max_pending_incoming(Some(config.max_connections / 2 + 1));
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                .with_agent_version(peers::agent(
                    crate::build::VERSION,
                    &config.name,
                    &config.region,
                    &config.zone,
                ))
                .with_push_listen_addr_updates(true),
        );
        let ping = ping::Behaviour::new(
            ping::Config::new()
                .with_interval(config.ping_interval)
                .with_timeout(Duration::from_secs(10)),
        );
        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config.set_periodic_bootstrap_interval(Some(Duration::from_secs(60)));
        let mut kad =
            kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        // Loopback and private addresses are never "confirmed external", so
        // automatic mode would leave every testnet node a DHT client.
        kad.set_mode(Some(kad::Mode::Server));
        let stage = request_response::Behaviour::with_codec(
            stage::Codec {
                max: config.max_stage_bytes,
            },
            [(stage::PROTOCOL, ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(config.stage_timeout)
                .with_max_concurrent_streams(config.stage_queue),
        );
        Ok(Self {
            limits: connection_limits::Behaviour::new(limits),
            identify,
            ping,
            kad,
            gossipsub: gossipsub(config, key)?,
            stage,
        })
    }
}

type PendingReply = std::pin::Pin<
    Box<dyn std::future::Future<Output = (ResponseChannel<Vec<u8>>, StageResponse)> + Send>,
>;

struct Loop {
    config: Config,
    swarm: Swarm<Behaviour>,
    table: Table,
    topic: gossipsub::IdentTopic,
    filter: PeerFilter,
    bootstrap_dials: HashMap<ConnectionId, Multiaddr>,
    penalties: HashMap<PeerId, f64>,
    offences: HashMap<PeerId, u64>,
    pending_out:
        HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<Vec<u8>, Error>>>,
    pending_in: FuturesUnordered<PendingReply>,
    stage_tx: mpsc::Sender<InboundStage>,
    status: watch::Receiver<Status>,
    listening: watch::Sender<Vec<Multiaddr>>,
    regions_reported: BTreeSet<String>,
    seq: u64,
    last_redial: Instant,
}

fn now_ms() -> u64 {
    trine_control::clock::now_ms()
}

/// `addr` without a trailing `/p2p/<id>`, and that id.
fn split_peer(addr: &Multiaddr) -> (Multiaddr, Option<PeerId>) {
    let mut a = addr.clone();
    match a.pop() {
        Some(Protocol::P2p(id)) => (a, Some(id)),
        _ => (addr.clone(), None),
    }
}

pub(super) async fn start(config: Config, key: Keypair) -> Result<Started, Error> {
    let peer_id = key.public().to_peer_id();
    let simulation = config.latency.clone().map(|matrix| Simulation {
        region: config.region.clone(),
        matrix,
    });
    let transport = transport::build(config.transport, &key, simulation)
        .map_err(|e| Error::Transport(e.to_string()))?;
    let behaviour = Behaviour::new(&config, &key)?;
    let mut swarm = Swarm::new(
        transport,
        behaviour,
        peer_id,
        libp2p::swarm::Config::with_tokio_executor().with_idle_connection_timeout(IDLE_TIMEOUT),
    );
    let mut listeners = HashSet::new();
    for addr in &config.listen {
        let id = swarm.listen_on(addr.clone()).map_err(|e| Error::Listen {
            addr: addr.clone(),
            reason: transport_error(&e),
        })?;
        listeners.insert(id);
    }
    // Wait until every listener reports an address (port 0 resolved).
    let mut listen = Vec::new();
    let deadline = tokio::time::Instant::now() + LISTEN_DEADLINE;
    let mut waiting = listeners.clone();
    while !waiting.is_empty() {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .map_err(|_| Error::Transport("listeners did not report an address in 10s".into()))?;
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                waiting.remove(&listener_id);
                listen.push(address);
            }
            SwarmEvent::ListenerClosed { reason: Err(e), .. }
            | SwarmEvent::ListenerError { error: e, .. } => {
                return Err(Error::Listen {
                    addr: config.listen[0].clone(),
                    reason: e.to_string(),
                });
            }
            _ => {}
        }
    }
    if config.announce.is_empty() {
        for a in &listen {
            swarm.add_external_address(a.clone());
        }
    } else {
        for a in &config.announce {
            swarm.add_external_address(a.clone());
        }
    }
    let (status_tx, status_rx) = watch::channel(Status::default());
    let (listening_tx, listening_rx) = watch::channel(listen);
    let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
    let (stage_tx, stage_rx) = mpsc::channel(config.stage_queue);
    let mut this = Loop {
        table: Table::new(config.peer_ttl),
        topic: gossipsub::IdentTopic::new(health::TOPIC),
        filter: PeerFilter::new(config.open),
        bootstrap_dials: HashMap::new(),
        penalties: HashMap::new(),
        offences: HashMap::new(),
        pending_out: HashMap::new(),
        pending_in: FuturesUnordered::new(),
        stage_tx,
        status: status_rx,
        listening: listening_tx,
        regions_reported: BTreeSet::new(),
        // Above every seq of an earlier run of this node.
        seq: now_ms(),
        last_redial: Instant::now(),
        swarm,
        config,
    };
    this.dial_bootstrap();
    let task = tokio::spawn(this.run(commands_rx));
    Ok(Started {
        mesh: super::Mesh {
            peer_id,
            commands: commands_tx,
            status: Arc::new(status_tx),
            listening: listening_rx,
        },
        stage_requests: stage_rx,
        task,
    })
}

fn transport_error(e: &libp2p::TransportError<std::io::Error>) -> String {
    match e {
        libp2p::TransportError::MultiaddrNotSupported(a) => format!(
            "{a} is not a TCP address this node can listen on (expected /ip4/<ip>/tcp/<port> or /ip6/…)"
        ),
        libp2p::TransportError::Other(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            format!("{e}; another process holds the port (`ss -ltnp` shows which)")
        }
        libp2p::TransportError::Other(e) => e.to_string(),
    }
}

/// One-minute load average per core, and available memory, from /proc.
pub(crate) fn host_load() -> (f32, u64) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f32;
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f32>().ok())
        .map_or(0.0, |l| l / cores);
    let free = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024);
    (load, free)
}

fn stage_reply(request_id: &str, status: StageStatus, message: impl Into<String>) -> StageResponse {
    StageResponse {
        request_id: request_id.to_owned(),
        status: status.into(),
        message: message.into(),
        ..StageResponse::default()
    }
}

impl Loop {
    fn admitted(&self, peer: &PeerId) -> bool {
        self.filter.admits(peer)
    }

    fn dial_bootstrap(&mut self) {
        self.last_redial = Instant::now();
        for addr in self.config.bootstrap.clone() {
            let (plain, id) = split_peer(&addr);
            if id == Some(*self.swarm.local_peer_id()) {
                continue;
            }
            let opts = match id {
                Some(id) => {
                    self.filter.add_bootstrap(id);
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&id, plain.clone());
                    DialOpts::peer_id(id).addresses(vec![plain]).build()
                }
                None => DialOpts::unknown_peer_id().address(plain).build(),
            };
            self.bootstrap_dials
                .insert(opts.connection_id(), addr.clone());
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%addr, error = %e, "bootstrap dial not started");
            }
        }
    }

    /// Scores `peer` down (the application part of its gossipsub score)
    /// for a bad stage message; bad gossip is scored by gossipsub itself.
    fn penalize(&mut self, peer: PeerId, reason: &'static str) {
        let p = *self
            .penalties
            .entry(peer)
            .and_modify(|p| *p += PENALTY)
            .or_insert(PENALTY);
        self.swarm
            .behaviour_mut()
            .gossipsub
            .set_application_score(&peer, -p);
        self.offence(peer, reason);
    }

    /// Logs the first offence of a peer and every tenfold after; counters
    /// and the score carry the rest without flooding the log.
    fn offence(&mut self, peer: PeerId, reason: &'static str) {
        let n = self.offences.entry(peer).or_default();
        *n += 1;
        let mut m = *n;
        while m.is_multiple_of(10) {
            m /= 10;
        }
        if m == 1 {
            tracing::warn!(%peer, reason, offences = *n, "peer sent invalid messages; scored down");
        }
    }

    fn apply_filter(&mut self, peer: PeerId) {
        let admitted = self.admitted(&peer);
        let gs = &mut self.swarm.behaviour_mut().gossipsub;
        if admitted {
            gs.remove_blacklisted_peer(&peer);
        } else {
            gs.blacklist_peer(&peer);
        }
        self.table.set_admitted(&peer, admitted);
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut heartbeat = tokio::time::interval(self.config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm(event),
                command = commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                Some((channel, response)) = self.pending_in.next(), if !self.pending_in.is_empty() => {
                    let status = StageStatus::try_from(response.status).unwrap_or_default();
                    metrics::stage_request("in", stage::status_name(status));
                    let _ = self.swarm.behaviour_mut().stage.send_response(channel, response.encode_to_vec());
                }
                _ = heartbeat.tick() => self.publish_heartbeat(),
                _ = housekeeping.tick() => self.housekeeping(),
            }
        }
        tracing::debug!("mesh stopped: every handle was dropped");
    }

    fn publish_heartbeat(&mut self) {
        let status = self.status.borrow().clone();
        let (load, free_memory_bytes) = host_load();
        self.seq += 1;
        let hb = Heartbeat {
            seq: self.seq,
            name: self.config.name.clone(),
            region: self.config.region.clone(),
            zone: self.config.zone.clone(),
            sent_unix_ms: now_ms(),
            load,
            queue_depth: status.queue_depth,
            stages: status.stages,
            chain_height: status.chain_height,
            free_memory_bytes,
            backend: self.config.backend.clone(),
            version: crate::build::VERSION.to_owned(),
        };
        let topic = self.topic.clone();
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic, health::encode(&hb))
        {
            Ok(_) => metrics::gossip_published(),
            // Alone, or no admitted peer yet: nothing to do.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
            Err(e) => tracing::debug!(error = %e, "heartbeat not published"),
        }
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        for gone in self.table.expire(now) {
            tracing::info!(peer = %gone, "peer gone: disconnected and silent past the TTL");
            self.penalties.remove(&gone);
            self.offences.remove(&gone);
        }
        for p in self.penalties.values_mut() {
            // Halves in about 11 minutes.
            *p *= 0.999;
        }
        let per_region = self.table.per_region();
        for region in &self.regions_reported {
            if !per_region.contains_key(region) {
                metrics::set_peers(region, 0);
            }
        }
        for (region, n) in &per_region {
            metrics::set_peers(region, *n);
        }
        self.regions_reported = per_region.into_keys().collect();
        let dht: usize = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|b| b.num_entries())
            .sum();
        metrics::set_dht_peers(dht);
        let connected = self.swarm.connected_peers().count();
        metrics::set_connected_peers(connected);
        if connected == 0
            && !self.config.bootstrap.is_empty()
            && now.duration_since(self.last_redial) >= REDIAL_EVERY
        {
            tracing::info!("no peer connected; dialing the bootstrap nodes again");
            self.dial_bootstrap();
        }
    }

    fn dial_if_wanted(&mut self, peer: PeerId) {
        if peer == *self.swarm.local_peer_id() || self.swarm.is_connected(&peer) {
            return;
        }
        if self.swarm.connected_peers().count() >= self.config.target_peers as usize {
            return;
        }
        if let Err(e) = self.swarm.dial(peer) {
            tracing::debug!(%peer, error = %e, "dial not started");
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Command::Stage { peer, body, reply } => {
                if !self.admitted(&peer) {
                    let _ = reply.send(Err(Error::NotAdmitted { peer }));
                    return;
                }
                let id = self
                    .swarm
                    .behaviour_mut()
                    .stage
                    .send_request(&peer, stage::Frame::Body(body));
                self.pending_out.insert(id, reply);
            }
            Command::Publish { data, reply } => {
                let topic = self.topic.clone();
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(topic, data)
                    .map(|_| metrics::gossip_published())
                    .map_err(|e| Error::Transport(format!("publish: {e}")));
                let _ = reply.send(r);
            }
            Command::SetMembers(members) => {
                self.filter.set_members(members);
                let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                for peer in connected {
                    self.apply_filter(peer);
                }
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        let gs = &self.swarm.behaviour().gossipsub;
        let peers = self
            .table
            .iter()
            .map(|(id, p)| PeerView {
                peer_id: *id,
                name: p.name.clone(),
                region: p.region.clone().unwrap_or_default(),
                zone: p.zone.clone(),
                addrs: p.addrs.clone(),
                connected: p.connections > 0,
                rtt: p.rtt,
                last_seen: p.last_seen_wall,
                agent: p.agent.clone(),
                admitted: self.admitted(id),
                score: gs.peer_score(id).unwrap_or(0.0),
                heartbeat_seq: p.last_heartbeat.map_or(0, |l| l.seq),
                queue_depth: p.heartbeat.as_ref().map(|h| h.queue_depth),
                load: p.heartbeat.as_ref().map(|h| h.load),
                backend: p.heartbeat.as_ref().map(|h| h.backend.clone()),
            })
            .collect();
        Snapshot {
            local_peer_id: *self.swarm.local_peer_id(),
            listen: self.listening.borrow().clone(),
            peers,
        }
    }

    fn on_swarm(&mut self, event: SwarmEvent<BehaviourEvent>) {
        let now = Instant::now();
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if info.protocols.contains(&KAD_PROTOCOL) {
                    for addr in &info.listen_addrs {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, addr.clone());
                    }
                }
                self.table
                    .identified(peer_id, &info.agent_version, info.listen_addrs, now);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, result, .. })) => {
                match result {
                    Ok(rtt) => {
                        self.table.rtt(peer, rtt, now);
                        if let Some(region) = self.table.get(&peer).and_then(|p| p.region.clone()) {
                            metrics::observe_rtt(&region, rtt);
                        }
                    }
                    Err(e) => {
                        metrics::ping_failure();
                        tracing::debug!(%peer, error = %e, "ping failed");
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, ..
            })) => self.dial_if_wanted(peer),
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => self.on_gossip(propagation_source, &message_id, &message),
            SwarmEvent::Behaviour(BehaviourEvent::Stage(event)) => self.on_stage(event),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                if let Some(addr) = self.bootstrap_dials.remove(&connection_id) {
                    tracing::info!(peer = %peer_id, %addr, "joined through bootstrap node");
                    self.filter.add_bootstrap(peer_id);
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
                let addr = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => address.clone(),
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr.clone(),
                };
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    let (plain, _) = split_peer(address);
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, plain);
                }
                let admitted = self.admitted(&peer_id);
                self.table.connected(peer_id, addr, admitted, now);
                self.apply_filter(peer_id);
                tracing::debug!(peer = %peer_id, admitted, "connected");
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                self.table.disconnected(peer_id, num_established, now);
                tracing::debug!(peer = %peer_id, cause = ?cause, "connection closed");
            }
            SwarmEvent::IncomingConnectionError {
                error: libp2p::swarm::ListenError::Denied { cause },
                send_back_addr,
                ..
            } => {
                crate::metrics::p2p_denied();
                tracing::debug!(from = %send_back_addr, %cause, "inbound connection refused by a connection limit");
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => {
                if let Some(addr) = self.bootstrap_dials.remove(&connection_id) {
                    tracing::warn!(%addr, error = %error, "bootstrap node not reachable; retrying every 5s while no peer is connected");
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                self.listening.send_modify(|l| {
                    if !l.contains(&address) {
                        l.push(address);
                    }
                });
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listening.send_modify(|l| l.retain(|a| a != &address));
            }
            _ => {}
        }
    }

    fn on_gossip(&mut self, from: PeerId, id: &gossipsub::MessageId, message: &gossipsub::Message) {
        let verdict = match message.source {
            None => Verdict::Reject("unsigned"),
            Some(author) if !self.admitted(&author) || !self.admitted(&from) => {
                Verdict::Reject("not_member")
            }
            Some(author) => health::judge(
                &message.data,
                self.filter.identity(&author),
                self.table.last_heartbeat(&author),
                self.config.heartbeat_interval,
                now_ms(),
            ),
        };
        let acceptance = match verdict {
            Verdict::Accept(hb) => {
                if let Some(author) = message.source {
                    self.table.heartbeat(author, hb, now_ms(), Instant::now());
                    self.dial_if_wanted(author);
                }
                metrics::gossip_received();
                gossipsub::MessageAcceptance::Accept
            }
            Verdict::Ignore(reason) => {
                metrics::gossip_ignored(reason);
                gossipsub::MessageAcceptance::Ignore
            }
            Verdict::Reject(reason) => {
                metrics::gossip_invalid(reason);
                tracing::debug!(peer = %from, author = ?message.source, reason, bytes = message.data.len(), "invalid heartbeat rejected");
                self.offence(from, reason);
                gossipsub::MessageAcceptance::Reject
            }
        };
        let _ = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(id, &from, acceptance);
    }

    fn on_stage(&mut self, event: request_response::Event<stage::Frame, Vec<u8>>) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => self.on_stage_request(peer, &request, channel),
            Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.pending_out.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.pending_out.remove(&request_id) {
                    let _ = reply.send(Err(Error::Stage {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                metrics::stage_rejected("failure");
                tracing::debug!(%peer, %error, "inbound stage request failed");
            }
            Event::ResponseSent { .. } => {}
        }
    }

    fn on_stage_request(
        &mut self,
        peer: PeerId,
        frame: &stage::Frame,
        channel: ResponseChannel<Vec<u8>>,
    ) {
        match self.accept_stage_request(peer, frame) {
            Ok((request_id, rx)) => {
                let timeout = self.config.stage_timeout;
                self.pending_in.push(Box::pin(async move {
                    let response = match tokio::time::timeout(timeout, rx).await {
                        Ok(Ok(r)) => r,
                        _ => stage_reply(
                            &request_id,
                            StageStatus::Busy,
                            "the node did not answer in time",
                        ),
                    };
                    (channel, response)
                }));
            }
            Err(response) => {
                let status = StageStatus::try_from(response.status).unwrap_or_default();
                metrics::stage_request("in", stage::status_name(status));
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .stage
                    .send_response(channel, response.encode_to_vec());
            }
        }
    }

    /// Checks a stage request and hands it to the node; the error is the
    /// answer to send at once.
    fn accept_stage_request(
        &mut self,
        peer: PeerId,
        frame: &stage::Frame,
    ) -> Result<(String, oneshot::Receiver<StageResponse>), StageResponse> {
        let body = match frame {
            stage::Frame::Body(b) => b.as_slice(),
            stage::Frame::Oversized(len) => {
                metrics::stage_rejected("oversized");
                self.penalize(peer, "oversized stage frame");
                return Err(stage_reply(
                    "",
                    StageStatus::Invalid,
                    format!(
                        "frame of {len} bytes is over the {}-byte limit",
                        self.config.max_stage_bytes
                    ),
                ));
            }
        };
        if !self.admitted(&peer) {
            metrics::stage_rejected("not_member");
            tracing::warn!(%peer, "stage request from a peer outside the filter refused");
            return Err(stage_reply(
                "",
                StageStatus::Forbidden,
                "not a member of this cluster",
            ));
        }
        let request = match StageRequest::decode(body) {
            Ok(r) => r,
            Err(e) => {
                metrics::stage_rejected("malformed");
                self.penalize(peer, "malformed stage request");
                return Err(stage_reply(
                    "",
                    StageStatus::Invalid,
                    format!("malformed StageRequest: {e}"),
                ));
            }
        };
        if let Err((rule, why)) = stage::check_request(&request) {
            metrics::stage_rejected(rule);
            self.penalize(peer, "invalid stage request");
            return Err(stage_reply(&request.request_id, StageStatus::Invalid, why));
        }
        let (tx, rx) = oneshot::channel();
        let request_id = request.request_id.clone();
        let inbound = InboundStage {
            peer,
            request,
            reply: tx,
        };
        if self.stage_tx.try_send(inbound).is_err() {
            return Err(stage_reply(
                &request_id,
                StageStatus::Busy,
                "stage queue full; retry later or elsewhere",
            ));
        }
        Ok((request_id, rx))
    }
}
