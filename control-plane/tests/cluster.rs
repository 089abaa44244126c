//! Real control planes in one process: sled in temp dirs, mutual TLS on
//! loopback gRPC, certificates from a real CA. A leader stops, a new one
//! commits; every chain agrees at every common height; a node outside the
//! CA is refused.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tempfile::TempDir;
use tokio::net::TcpListener;
use trine_control::tls::{self, NodeTls};
use trine_control::voters::Rules;
use trine_control::{Command, ControlPlane, Member, NodeRecord, NodeStatus, Profile};

struct Cluster {
    dir: TempDir,
    nodes: BTreeMap<u64, (ControlPlane, String)>,
}

fn record(id: u64, name: &str, region: &str, addr: &str) -> NodeRecord {
    NodeRecord {
        id,
        name: name.into(),
        region: region.into(),
        zone: String::new(),
        raft_addr: addr.into(),
        grpc_addr: String::new(),
        http_addr: String::new(),
        peer_id: String::new(),
        p2p_addrs: Vec::new(),
        cpu_cores: 1,
        simd: "scalar".into(),
        memory_bytes: 0,
        version: "test".into(),
        status: NodeStatus::Up,
        status_since_ms: 0,
    }
}

async fn start(
    root: &Path,
    id: u64,
    region: &str,
    init: bool,
    join: Vec<String>,
    listener: Option<TcpListener>,
) -> Result<(ControlPlane, String)> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let name = format!("n{id}");
    let certs = root.join(&name).join("tls");
    if !certs.exists() {
        tls::issue_node(&root.join("ca"), &name, &[], &certs)?;
    }
    let listener = match listener {
        Some(l) => l,
        None => TcpListener::bind("127.0.0.1:0").await?,
    };
    let addr = listener.local_addr()?.to_string();
    let config = trine_control::Config {
        id,
        member: Member {
            addr: addr.clone(),
            region: region.into(),
            name: name.clone(),
        },
        record: record(id, &name, region, &addr),
        dir: root.join(&name).join("raft"),
        tls: NodeTls::load(&certs)?,
        cluster: "test".into(),
        init,
        join,
        profile: Profile::Lan,
        heartbeat: Some(Duration::from_millis(100)),
        election_timeout: Some(Duration::from_millis(600)),
        down_after: Duration::from_secs(2),
        voters: Rules {
            replace_after: Duration::from_secs(4),
            ..Rules::default()
        },
        snapshot_every: 50,
        snapshot_keep: 10,
        max_staleness: Duration::from_secs(5),
    };
    Ok((ControlPlane::start(config, listener).await?, addr))
}

async fn wait_for<T>(
    what: &str,
    deadline: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> Result<T> {
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > until {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Cluster {
    async fn new(regions: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        tls::init_ca(&dir.path().join("ca"), "test")?;
        let mut nodes = BTreeMap::new();
        let first = start(dir.path(), 1, regions[0], true, vec![], None).await?;
        let seed = first.1.clone();
        nodes.insert(1, first);
        for (i, r) in regions.iter().enumerate().skip(1) {
            let id = i as u64 + 1;
            nodes.insert(
                id,
                start(dir.path(), id, r, false, vec![seed.clone()], None).await?,
            );
        }
        let c = Self { dir, nodes };
        let n = regions.len();
        let want_voters = if n >= 5 {
            5
        } else if n >= 3 {
            3
        } else {
            1
        };
        c.wait_voters(want_voters, Duration::from_secs(30)).await?;
        Ok(c)
    }

    fn any(&self) -> &ControlPlane {
        &self.nodes.values().next().expect("a node").0
    }

    async fn wait_voters(&self, n: usize, deadline: Duration) -> Result<()> {
        wait_for(
            &format!("{n} voters and every node registered"),
            deadline,
            async || {
                let s = self.any().status();
                let registered = self.any().reader().state().nodes.len();
                (s.voters.len() == n && s.leader.is_some() && registered == self.nodes.len())
                    .then_some(())
            },
        )
        .await
    }

    fn leader(&self) -> Option<u64> {
        let ids: Vec<u64> = self
            .nodes
            .values()
            .filter(|(c, _)| c.status().state.is_leader())
            .map(|(c, _)| c.id())
            .collect();
        (ids.len() == 1).then(|| ids[0])
    }

    /// Every pair of live nodes agrees on every block both hold.
    fn chains_agree(&self) -> Result<u64> {
        let heads: Vec<_> = self
            .nodes
            .values()
            .map(|(c, _)| c.reader().clone())
            .collect();
        let min_head = heads
            .iter()
            .map(|r| r.head().map_or(0, |b| b.height))
            .min()
            .unwrap_or(0);
        for h in 0..=min_head {
            let mut hashes = heads
                .iter()
                .filter_map(|r| r.block(h).ok().flatten().map(|b| b.hash));
            if let Some(first) = hashes.next() {
                for other in hashes {
                    if other != first {
                        bail!("nodes disagree at height {h}");
                    }
                }
            }
        }
        for r in &heads {
            trine_control::chain::verify(r.blocks(r.first_height().unwrap_or(0), usize::MAX))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(min_head)
    }
}

async fn note(c: &ControlPlane, text: &str) -> Result<u64> {
    Ok(c.propose("test", Command::Note { text: text.into() })
        .await
        .with_context(|| format!("proposing {text}"))?
        .index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voters_survive_the_leader_and_agree_on_the_chain() -> Result<()> {
    survive_the_leader(&["a", "b", "c"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_voters_survive_the_leader_and_agree_on_the_chain() -> Result<()> {
    survive_the_leader(&["a", "b", "c", "d", "e"]).await
}

async fn survive_the_leader(regions: &[&str]) -> Result<()> {
    let mut cluster = Cluster::new(regions).await?;
    assert_eq!(cluster.any().status().voters.len(), regions.len());
    // Writes through every node (followers forward to the leader).
    let mut acked = Vec::new();
    for (id, (c, _)) in &cluster.nodes {
        for i in 0..10 {
            acked.push(note(c, &format!("{id}-{i}")).await?);
        }
    }
    let old = cluster.leader().context("one leader")?;
    let (leader, _) = cluster.nodes.remove(&old).context("leader present")?;
    let stopped = Instant::now();
    leader.shutdown().await;
    drop(leader);
    let survivor = cluster.any().clone();
    let index = wait_for(
        "a commit after the leader stopped",
        Duration::from_secs(10),
        async || note(&survivor, "after").await.ok(),
    )
    .await?;
    eprintln!(
        "failover: first commit {:?} after stopping the leader",
        stopped.elapsed()
    );
    let new = cluster.leader().context("a new leader")?;
    assert_ne!(new, old);
    // Every acknowledged write is on the survivors' chains.
    wait_for(
        "survivors applied everything",
        Duration::from_secs(10),
        async || {
            cluster
                .nodes
                .values()
                .all(|(c, _)| c.status().applied >= index)
                .then_some(())
        },
    )
    .await?;
    for (c, _) in cluster.nodes.values() {
        let reader = c.reader();
        let mut seen = 0;
        for i in &acked {
            let b = reader
                .block(*i)
                .map_err(anyhow::Error::msg)?
                .context("acked block present")?;
            assert_eq!(b.txs.len(), 1);
            assert_eq!(b.txs[0].kind, "note");
            seen += 1;
        }
        assert_eq!(seen, acked.len());
    }
    cluster.chains_agree()?;
    // Linearizable read on a follower sees the last write.
    let follower = cluster
        .nodes
        .values()
        .find(|(c, _)| !c.status().state.is_leader())
        .context("a follower")?;
    let read_at = follower.0.linearizable().await?;
    assert!(read_at >= index);
    drop(cluster.dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up_and_a_far_behind_one_by_snapshot() -> Result<()> {
    let mut cluster = Cluster::new(&["a", "b", "c"]).await?;
    let victim = *cluster
        .nodes
        .keys()
        .find(|id| Some(**id) != cluster.leader())
        .context("a follower")?;
    let (c, addr) = cluster.nodes.remove(&victim).context("present")?;
    c.shutdown().await;
    drop(c);
    // Far behind: more entries than the snapshot interval, so the log it
    // needs is purged on the others and only a snapshot can catch it up.
    let live = cluster.any().clone();
    let mut last = 0;
    for i in 0..300 {
        last = note(&live, &format!("while down {i}")).await?;
    }
    wait_for(
        "a snapshot on the leader",
        Duration::from_secs(10),
        async || {
            live.raft()
                .metrics()
                .borrow()
                .snapshot
                .is_some()
                .then_some(())
        },
    )
    .await?;
    // Restart from its data dir, same address.
    let listener = TcpListener::bind(&addr).await?;
    let back = start(
        cluster.dir.path(),
        victim,
        "x",
        false,
        vec![],
        Some(listener),
    )
    .await?;
    cluster.nodes.insert(victim, back);
    let (c, _) = &cluster.nodes[&victim];
    wait_for(
        "the restarted node caught up",
        Duration::from_secs(20),
        async || (c.status().applied >= last).then_some(()),
    )
    .await?;
    let snapshots = c.raft().metrics().borrow().snapshot;
    assert!(snapshots.is_some(), "caught up without a snapshot");
    let height = cluster.chains_agree()?;
    assert!(height >= last);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_certificate_from_another_ca_is_refused() -> Result<()> {
    let cluster = Cluster::new(&["a"]).await?;
    let seed = cluster.nodes[&1].1.clone();
    let other = tempfile::tempdir()?;
    tls::init_ca(&other.path().join("ca"), "intruders")?;
    let (intruder, _) = start(other.path(), 9, "x", false, vec![seed], None).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let members = cluster.any().status().members;
    assert!(!members.contains_key(&9), "intruder joined: {members:?}");
    assert!(!cluster.any().reader().state().nodes.contains_key(&9));
    intruder.shutdown().await;
    Ok(())
}

/// Cuts `alone` off from everyone else, both ways.
fn partition(cluster: &Cluster, alone: u64) {
    let others: Vec<u64> = cluster
        .nodes
        .keys()
        .copied()
        .filter(|id| *id != alone)
        .collect();
    for (id, (c, _)) in &cluster.nodes {
        if *id == alone {
            c.faults().isolate(others.clone());
        } else {
            c.faults().isolate([alone]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_partition_commits_nothing_and_chains_agree_after_healing() -> Result<()> {
    let cluster = Cluster::new(&["a", "b", "c"]).await?;
    note(cluster.any(), "before").await?;
    let old = cluster.leader().context("a leader")?;
    let (old_leader, _) = &cluster.nodes[&old];
    let before = old_leader.status().last_log_index;
    partition(&cluster, old);

    // The majority elects a new leader and commits.
    let majority: Vec<&ControlPlane> = cluster
        .nodes
        .iter()
        .filter(|(id, _)| **id != old)
        .map(|(_, (c, _))| c)
        .collect();
    let committed = wait_for(
        "a commit on the majority side",
        Duration::from_secs(15),
        async || note(majority[0], "majority").await.ok(),
    )
    .await?;
    // The isolated old leader cannot commit: its write times out, and its
    // applied index stays where it was when it was cut off.
    let applied_before = old_leader.status().applied;
    let minority_write = tokio::time::timeout(
        Duration::from_secs(3),
        old_leader.propose(
            "test",
            Command::Note {
                text: "minority".into(),
            },
        ),
    )
    .await;
    assert!(
        !matches!(minority_write, Ok(Ok(_))),
        "the minority committed: {minority_write:?}"
    );
    assert_eq!(old_leader.status().applied, applied_before);
    assert!(old_leader.status().applied <= before.max(applied_before));

    // Heal: the old leader rejoins as a follower, drops its uncommitted
    // entry, and every chain agrees.
    for (c, _) in cluster.nodes.values() {
        c.faults().heal();
    }
    let last = note(majority[0], "after heal").await?;
    wait_for(
        "everyone applied the post-heal write",
        Duration::from_secs(15),
        async || {
            cluster
                .nodes
                .values()
                .all(|(c, _)| c.status().applied >= last)
                .then_some(())
        },
    )
    .await?;
    assert!(last > committed);
    cluster.chains_agree()?;
    // The minority's write never reached any chain.
    for (c, _) in cluster.nodes.values() {
        let r = c.reader();
        let found: Vec<(u64, u64)> = r
            .blocks(0, usize::MAX)
            .filter_map(Result::ok)
            .filter(|b| b.txs.iter().any(|t| t.summary.contains("minority")))
            .map(|b| (b.height, b.term))
            .collect();
        assert!(
            found.is_empty(),
            "an uncommitted write reached a chain: {found:?} (old leader {old}, committed {committed}, last {last})"
        );
    }
    Ok(())
}
