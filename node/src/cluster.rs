//! The node's side of the control plane: when and how it starts (certificates,
//! `--init`, `--join`), the node's record, and feeding the mesh's peer filter
//! with the cluster's members.

use std::collections::HashMap;
use std::time::Duration;

use libp2p::PeerId;
use rand::SeedableRng as _;
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use trine_control::network::{Delays, RttMatrix};
use trine_control::tls::{self, NodeTls};
use trine_control::voters::Rules;
use trine_control::{ControlPlane, Member, NodeRecord, NodeStatus, Profile};

use crate::config::{Config, RaftProfile};
use crate::datadir::{DataDir, Endpoints};
use crate::mesh::Mesh;
use crate::mesh::filter::Identity;
use crate::node::Error;

/// The Raft node id of a libp2p identity: the first 8 bytes of the SHA-256
/// of the peer id, top bit cleared, never 0. Stable across restarts (the
/// key is in the data dir).
pub fn node_id(peer: &PeerId) -> u64 {
    let d = Sha256::digest(peer.to_bytes());
    let id = u64::from_be_bytes(d[..8].try_into().unwrap_or_default()) & (u64::MAX >> 1);
    id.max(1)
}

fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Whether the node is, or is becoming, a cluster member (and so needs its
/// Raft port).
pub fn wants_raft(config: &Config) -> bool {
    config.init
        || !config.join.is_empty()
        || NodeTls::present(&config.tls_dir())
        || config.data_dir.join("raft").exists()
}

/// Starts the control plane when the node is (or is becoming) a member;
/// `None` for a mesh-only node.
pub async fn start(
    config: &Config,
    data_dir: &DataDir,
    endpoints: &Endpoints,
    peer_id: PeerId,
    listener: TcpListener,
) -> Result<Option<ControlPlane>, Error> {
    let tls_dir = config.tls_dir();
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Cluster(format!("Raft listener: {e}")))?;
    let announce = announced("--raft-announce", &config.raft_announce, bound);
    let raft_dir = data_dir.path().join("raft");
    if !NodeTls::present(&tls_dir) {
        if config.init {
            let ca = data_dir.path().join("ca");
            if !ca.join(tls::CA_CERT).exists() {
                tls::init_ca(&ca, &config.cluster)?;
            }
            let host = announce
                .rsplit_once(':')
                .map_or(announce.as_str(), |(h, _)| h)
                .to_owned();
            tls::issue_node(&ca, &config.name, &[host], &tls_dir)?;
            tracing::info!(
                ca = %ca.display(),
                "created a cluster CA and this node's certificate; give other nodes certificates with `trine certs issue --ca-dir {} --name <name> --out <their tls dir>`",
                ca.display()
            );
        } else if !config.join.is_empty() || raft_dir.exists() {
            return Err(Error::Cluster(format!(
                "no node certificate in {}: a cluster member needs one from the cluster CA; run `trine certs issue --ca-dir <CA dir> --name {} --out {}` (or set --tls-dir)",
                tls_dir.display(),
                config.name,
                tls_dir.display()
            )));
        } else {
            return Ok(None);
        }
    }
    let tls = NodeTls::load(&tls_dir)?;
    tls.check_names(&config.name, &tls_dir)?;
    tls.check_pair()?;
    if tls.not_after().is_none() {
        tracing::warn!(dir = %tls_dir.display(), "cannot read this node's certificate expiry; trine_cert_expiry_seconds is not exported");
    }
    let id = node_id(&peer_id);
    let p2p: Vec<String> = if config.p2p_announce.is_empty() {
        endpoints.p2p.clone()
    } else {
        config
            .p2p_announce
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    let record = NodeRecord {
        id,
        name: config.name.clone(),
        region: config.region.clone(),
        zone: config.zone.clone(),
        raft_addr: announce.clone(),
        grpc_addr: announced("--grpc-announce", &config.grpc_announce, endpoints.grpc),
        http_addr: announced("--http-announce", &config.http_announce, endpoints.http),
        api_tls: config.api_tls,
        peer_id: peer_id.to_string(),
        p2p_addrs: p2p,
        cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        simd: crate::simd::Level::detect().to_string(),
        memory_bytes: memory_bytes(),
        version: crate::build::VERSION.to_owned(),
        status: NodeStatus::Up,
        status_since_ms: 0,
    };
    let cp = trine_control::Config {
        id,
        member: Member {
            addr: announce.clone(),
            region: config.region.clone(),
            name: config.name.clone(),
        },
        record,
        dir: raft_dir,
        tls,
        cluster: config.cluster.clone(),
        init: config.init,
        join: config.join.clone(),
        profile: match config.raft_profile {
            RaftProfile::Lan => Profile::Lan,
            RaftProfile::Wan => Profile::Wan,
        },
        heartbeat: None,
        election_timeout: None,
        down_after: config.down_after,
        up_after: config.down_after * 2,
        rebalance_every: config.rebalance_every,
        voters: Rules {
            replace_after: config.voter_replace_after,
            ..Rules::default()
        },
        snapshot_every: config.snapshot_every,
        snapshot_keep: 1000,
        max_staleness: Duration::from_secs(10),
        delays: raft_delays(config)?,
    };
    if config.init
        && (!cp.dir.exists() || !data_dir.path().join(crate::auth::ADMIN_TOKEN_FILE).exists())
    {
        let file = (!config.admin_token_file.as_os_str().is_empty())
            .then_some(config.admin_token_file.as_path());
        crate::auth::prepare_root(data_dir.path(), file)
            .map_err(|e| Error::Cluster(format!("the first admin token: {e:#}")))?;
    }
    let simulated = cp.delays.is_on();
    let control = ControlPlane::start(cp, listener).await?;
    tracing::info!(
        node_id = id,
        raft = %bound,
        announce = %announce,
        profile = ?config.raft_profile,
        simulated_latency = simulated,
        "control plane started (mutual TLS)"
    );
    Ok(Some(control))
}

/// Keeps the mesh's peer filter equal to the cluster's members.
pub async fn feed_mesh(control: ControlPlane, mesh: Mesh) {
    let mut last: HashMap<PeerId, Identity> = HashMap::new();
    loop {
        let members: HashMap<PeerId, Identity> = control
            .reader()
            .state()
            .nodes
            .values()
            .filter_map(|n| {
                let peer = n.peer_id.parse().ok()?;
                let id = Identity {
                    name: n.name.clone(),
                    region: n.region.clone(),
                };
                Some((peer, id))
            })
            .collect();
        if members != last {
            if mesh.set_members(members.clone()).await.is_err() {
                return;
            }
            last = members;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Tells the control plane when the mesh last heard each member (pings,
/// heartbeats, connection events): a new leader's prior for members that
/// went silent before it took over.
pub async fn feed_heard(control: ControlPlane, mesh: Mesh) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(snap) = mesh.snapshot().await else {
            return;
        };
        let by_peer: std::collections::HashMap<String, u64> = control
            .reader()
            .state()
            .nodes
            .values()
            .map(|n| (n.peer_id.clone(), n.id))
            .collect();
        let (now, wall) = (std::time::Instant::now(), std::time::SystemTime::now());
        for p in snap.peers {
            if let Some(&id) = by_peer.get(&p.peer_id.to_string()) {
                let ago = wall.duration_since(p.last_seen).unwrap_or_default();
                if let Some(at) = now.checked_sub(ago) {
                    control.heard(id, at);
                }
            }
        }
    }
}

/// The simulated inter-region RTT on Raft RPCs: the same matrix (and
/// jitter) the mesh uses, from this node's region.
fn raft_delays(config: &Config) -> Result<Delays, Error> {
    Ok(config
        .latency_matrix()
        .map_err(|e| Error::Cluster(e.to_string()))?
        .map(|m| rtt_matrix(m, &config.region).from_region(&config.region))
        .unwrap_or_default())
}

/// The mesh's latency matrix as Raft's: a pair the matrix does not name
/// gets the intra-region RTT; every call adds uniform jitter.
pub fn rtt_matrix(matrix: crate::mesh::Matrix, seed: &str) -> RttMatrix {
    let seed = {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::hash::DefaultHasher::new();
        seed.hash(&mut h);
        h.finish()
    };
    let rng = std::sync::Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    RttMatrix::new(move |a, b| {
        let rtt = matrix.rtt(a, b).unwrap_or(matrix.intra_region);
        let jitter = match rng.lock() {
            Ok(mut r) if !matrix.jitter.is_zero() => {
                matrix.jitter.mul_f64(rand::Rng::random::<f64>(&mut *r))
            }
            _ => Duration::ZERO,
        };
        rtt + jitter
    })
}

/// The address others should dial: the configured announce address, else
/// the bound one (with a warning when that is a wildcard no peer can dial).
fn announced(flag: &str, announce: &str, bound: std::net::SocketAddr) -> String {
    if !announce.is_empty() {
        return announce.to_owned();
    }
    if bound.ip().is_unspecified() {
        tracing::warn!(
            "listening on {bound} with no {flag}: other nodes are told to dial {bound}, which reaches only themselves; set {flag} to this node's name or address"
        );
    }
    bound.to_string()
}
