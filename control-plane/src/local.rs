//! A cluster of control planes inside one process, for benchmarks and
//! tests: every member has its own sled store (in a temp dir), its own
//! certificate from a CA made for the run, and serves Raft over mutual TLS
//! on a loopback port. Nothing is mocked; only the process is shared.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use crate::command::{Command, NodeRecord, NodeStatus};
use crate::control::{Config, ControlPlane, Error, Profile};
use crate::network::RttMatrix;
use crate::tls::{self, NodeTls};
use crate::types::Member;
use crate::voters::Rules;

/// How the members are tuned.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub profile: Profile,
    pub heartbeat: Option<Duration>,
    pub election_timeout: Option<Duration>,
    pub snapshot_every: u64,
    pub snapshot_keep: u64,
    /// Simulated inter-region round trips on every Raft RPC.
    pub rtt: Option<RttMatrix>,
    /// Least time between two rebalancing moves.
    pub rebalance_every: Duration,
    /// A member unanswered this long is marked down (up again after twice
    /// this long answering).
    pub down_after: Duration,
    /// Memory each member reports (the planner's capacity is 80% of it).
    pub memory_bytes: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            profile: Profile::Lan,
            heartbeat: None,
            election_timeout: None,
            snapshot_every: 10_000,
            snapshot_keep: 1000,
            rtt: None,
            rebalance_every: Duration::from_secs(30),
            down_after: Duration::from_secs(3),
            memory_bytes: 8 << 30,
        }
    }
}

/// The members, by Raft id (1, 2, …), and where their files live.
#[derive(Debug)]
pub struct LocalCluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, ControlPlane>,
    tuning: Tuning,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Control(#[from] Error),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("members disagree on the block at height {0}")]
    Disagree(u64),
    #[error(transparent)]
    Broken(#[from] crate::chain::Broken),
}

fn setup(e: impl std::fmt::Display) -> LocalError {
    LocalError::Setup(e.to_string())
}

/// A node record with only identity and address set (capacity zero).
pub(crate) fn record(id: u64, name: &str, region: &str, addr: &str) -> NodeRecord {
    NodeRecord {
        id,
        name: name.into(),
        region: region.into(),
        zone: String::new(),
        raft_addr: addr.into(),
        grpc_addr: String::new(),
        http_addr: String::new(),
        api_tls: false,
        peer_id: String::new(),
        p2p_addrs: Vec::new(),
        cpu_cores: 1,
        simd: String::new(),
        memory_bytes: 0,
        version: String::new(),
        status: NodeStatus::Up,
        status_since_ms: 0,
    }
}

/// Starts member `id` with its files under `root` (a CA in `root/ca`),
/// on `listener` or a fresh loopback port; `join` is a member's address,
/// `None` to initialize a new cluster.
pub async fn start_member(
    root: &Path,
    id: u64,
    region: &str,
    join: Option<String>,
    tuning: &Tuning,
    listener: Option<TcpListener>,
) -> Result<ControlPlane, LocalError> {
    let name = format!("n{id}");
    let certs = root.join(&name).join("tls");
    if !certs.exists() {
        tls::issue_node(&root.join("ca"), &name, &[], &certs).map_err(setup)?;
    }
    let listener = match listener {
        Some(l) => l,
        None => TcpListener::bind("127.0.0.1:0").await.map_err(setup)?,
    };
    let addr = listener.local_addr().map_err(setup)?.to_string();
    let config = Config {
        id,
        member: Member {
            addr: addr.clone(),
            region: region.into(),
            name: name.clone(),
        },
        record: NodeRecord {
            memory_bytes: tuning.memory_bytes,
            ..record(id, &name, region, &addr)
        },
        dir: root.join(&name).join("raft"),
        tls: NodeTls::load(&certs).map_err(setup)?,
        cluster: "local".into(),
        init: join.is_none(),
        join: join.into_iter().collect(),
        profile: tuning.profile,
        heartbeat: tuning.heartbeat,
        election_timeout: tuning.election_timeout,
        down_after: tuning.down_after,
        up_after: tuning.down_after * 2,
        rebalance_every: tuning.rebalance_every,
        voters: Rules::default(),
        snapshot_every: tuning.snapshot_every,
        snapshot_keep: tuning.snapshot_keep,
        max_staleness: Duration::from_secs(5),
        delays: tuning
            .rtt
            .as_ref()
            .map(|m| m.from_region(region))
            .unwrap_or_default(),
    };
    Ok(ControlPlane::start(config, listener).await?)
}

/// Polls `f` every 20 ms until it gives `Some`.
pub async fn wait_for<T>(
    what: &str,
    deadline: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, LocalError> {
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > until {
            return Err(LocalError::Timeout(deadline, what.to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl LocalCluster {
    /// One member per entry of `regions`; the first initializes the
    /// cluster, the others join through it. Returns once the voter set the
    /// planner wants is in place and every member is registered.
    pub async fn start(regions: &[&str], tuning: Tuning) -> Result<Self, LocalError> {
        let dir = tempfile::tempdir().map_err(setup)?;
        tls::init_ca(&dir.path().join("ca"), "local").map_err(setup)?;
        let mut nodes = BTreeMap::new();
        let first = start_member(dir.path(), 1, regions[0], None, &tuning, None).await?;
        let seed = first.status().members.get(&1).map(|m| m.addr.clone());
        let seed = match seed {
            Some(s) => s,
            None => {
                wait_for("the first member", Duration::from_secs(10), || {
                    first.status().members.get(&1).map(|m| m.addr.clone())
                })
                .await?
            }
        };
        nodes.insert(1, first);
        for (i, r) in regions.iter().enumerate().skip(1) {
            let id = i as u64 + 1;
            let c = start_member(dir.path(), id, r, Some(seed.clone()), &tuning, None).await?;
            nodes.insert(id, c);
        }
        let c = Self { dir, nodes, tuning };
        let want = crate::voters::voter_count(regions.iter().copied(), &Rules::default());
        let n = regions.len();
        wait_for(
            "voters in place and every member registered",
            Duration::from_secs(60),
            || {
                let any = c.nodes.values().next()?;
                let s = any.status();
                (s.voters.len() == want
                    && s.leader.is_some()
                    && any.reader().state().nodes.len() == n)
                    .then_some(())
            },
        )
        .await?;
        Ok(c)
    }

    /// The member all members agree leads, if any.
    pub fn leader(&self) -> Option<u64> {
        let leaders: Vec<u64> = self
            .nodes
            .values()
            .filter(|c| c.status().state.is_leader())
            .map(ControlPlane::id)
            .collect();
        (leaders.len() == 1).then(|| leaders[0])
    }

    /// Stops member `id` (as a crash would, minus the disk: its store stays).
    pub async fn stop(&mut self, id: u64) -> Option<ControlPlane> {
        let c = self.nodes.remove(&id)?;
        c.shutdown().await;
        Some(c)
    }

    /// Any live member.
    pub fn any(&self) -> Option<&ControlPlane> {
        self.nodes.values().next()
    }

    /// The Raft address member `id` serves on.
    pub fn addr(&self, id: u64) -> Option<String> {
        let any = self.any()?;
        any.status().members.get(&id).map(|m| m.addr.clone())
    }

    /// Starts stopped member `id` again from its files, on `addr`.
    pub async fn restart(&mut self, id: u64, region: &str, addr: &str) -> Result<(), LocalError> {
        let listener = TcpListener::bind(addr).await.map_err(setup)?;
        let c = start_member(
            self.dir.path(),
            id,
            region,
            None,
            &self.tuning,
            Some(listener),
        )
        .await?;
        self.nodes.insert(id, c);
        Ok(())
    }

    /// Every pair of members agrees on every block both hold, and every
    /// member's chain verifies. Returns the lowest head height.
    pub fn chains_agree(&self) -> Result<u64, LocalError> {
        let readers: Vec<_> = self.nodes.values().map(|c| c.reader().clone()).collect();
        let min_head = readers
            .iter()
            .map(|r| r.head().map_or(0, |b| b.height))
            .min()
            .unwrap_or(0);
        for h in 0..=min_head {
            let mut hashes = readers
                .iter()
                .filter_map(|r| r.block(h).ok().flatten().map(|b| b.hash));
            if let Some(first) = hashes.next()
                && hashes.any(|other| other != first)
            {
                return Err(LocalError::Disagree(h));
            }
        }
        for r in &readers {
            crate::chain::verify(r.blocks(r.first_height().unwrap_or(0), usize::MAX))?;
        }
        Ok(min_head)
    }
}

/// A no-op command for load.
pub fn note(text: impl Into<String>) -> Command {
    Command::Note { text: text.into() }
}
