//! `trine bench …`: measurements that need a whole system rather than a
//! function (criterion covers those). `trine bench mesh` starts N meshes in
//! this process and times how long until every node has heard every other.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand, ValueEnum};

use crate::mesh::{self, Kind};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Start N mesh nodes in this process (in-memory or loopback TCP
    /// transport), all joining through the first, and report the time until
    /// every node has a heartbeat from every other, plus memory per node.
    Mesh(MeshArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TransportArg {
    /// libp2p's in-process memory transport (no sockets; noise and yamux as usual).
    Memory,
    /// TCP on 127.0.0.1.
    Tcp,
    /// QUIC on 127.0.0.1 (builds with the `quic` feature only).
    Quic,
}

impl TransportArg {
    /// The transport and the listen address each node takes.
    fn setup(self) -> Result<(Kind, libp2p::Multiaddr)> {
        Ok(match self {
            Self::Memory => (Kind::Memory, "/memory/0".parse()?),
            Self::Tcp => (Kind::Tcp, "/ip4/127.0.0.1/tcp/0".parse()?),
            Self::Quic if mesh::transport::QUIC => {
                (Kind::Tcp, "/ip4/127.0.0.1/udp/0/quic-v1".parse()?)
            }
            Self::Quic => bail!(
                "this build has no QUIC; rebuild with `cargo build --release --features quic`"
            ),
        })
    }
}

#[derive(Debug, Args)]
pub struct MeshArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,
    #[arg(long, value_enum, default_value = "memory")]
    pub transport: TransportArg,
    /// Heartbeat interval of every node.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Give up after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// What one convergence run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub nodes: usize,
    /// Until every node had started (listening, bootstrap dialed).
    pub started: Duration,
    /// From the first start until every node had a heartbeat from all others.
    pub converged: Duration,
    /// Resident memory added per node, bytes (process RSS delta / nodes).
    pub rss_per_node: u64,
    /// Open connections per node at convergence, on average.
    pub connections_per_node: f64,
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Starts `n` meshes, all joining through the first, and waits until each
/// has accepted a heartbeat from every other.
pub async fn converge(
    n: usize,
    transport: TransportArg,
    heartbeat: Duration,
    timeout: Duration,
) -> Result<Report> {
    if n < 2 {
        bail!("--nodes must be at least 2");
    }
    crate::metrics::install();
    let regions = ["us-east", "us-west", "eu-central", "ap-southeast"];
    let (kind, listen) = transport.setup()?;
    let rss_before = rss_bytes();
    let t0 = Instant::now();
    let mut started = Vec::with_capacity(n);
    let mut bootstrap = None;
    for i in 0..n {
        let mut c = mesh::Config::new(&format!("n{i}"), regions[i % regions.len()], "");
        c.transport = kind;
        c.listen = vec![listen.clone()];
        c.open = true;
        c.heartbeat_interval = heartbeat;
        c.peer_ttl = heartbeat * 6;
        c.target_peers = 12;
        c.bootstrap = bootstrap.iter().cloned().collect();
        let key = libp2p::identity::Keypair::generate_ed25519();
        let s = mesh::start(c, key)
            .await
            .with_context(|| format!("starting node {i}"))?;
        if i == 0 {
            let addr = s.mesh.listen_addrs()[0]
                .clone()
                .with(libp2p::multiaddr::Protocol::P2p(s.mesh.peer_id()));
            bootstrap = Some(addr);
        }
        started.push(s);
    }
    let all_started = t0.elapsed();
    let deadline = t0 + timeout;
    let mut pending: Vec<usize> = (0..n).collect();
    let mut connections = vec![0usize; n];
    while !pending.is_empty() {
        if Instant::now() > deadline {
            bail!(
                "{} of {n} nodes had not heard from every other after {timeout:?}",
                pending.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut still = Vec::new();
        for &i in &pending {
            let snap = started[i].mesh.snapshot().await?;
            let heard = snap.peers.iter().filter(|p| p.heartbeat_seq > 0).count();
            connections[i] = snap.peers.iter().filter(|p| p.connected).count();
            if heard < n - 1 {
                still.push(i);
            }
        }
        pending = still;
    }
    let converged = t0.elapsed();
    let rss_after = rss_bytes();
    for s in &started {
        s.task.abort();
    }
    Ok(Report {
        nodes: n,
        started: all_started,
        converged,
        rss_per_node: rss_after.saturating_sub(rss_before) / n as u64,
        connections_per_node: connections.iter().sum::<usize>() as f64 / n as f64,
    })
}

pub fn run(command: &BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Mesh(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            eprintln!(
                "starting {} mesh nodes ({:?} transport, heartbeat every {})…",
                args.nodes,
                args.transport,
                humantime::format_duration(args.heartbeat_interval)
            );
            let r = runtime.block_on(converge(
                args.nodes,
                args.transport,
                args.heartbeat_interval,
                args.timeout,
            ))?;
            #[allow(clippy::print_stdout)]
            {
                println!(
                    "nodes {}  started {:.2}s  converged {:.2}s  rss/node {:.1} MiB  connections/node {:.1}",
                    r.nodes,
                    r.started.as_secs_f64(),
                    r.converged.as_secs_f64(),
                    r.rss_per_node as f64 / (1 << 20) as f64,
                    r.connections_per_node
                );
            }
            runtime.shutdown_timeout(Duration::from_secs(1));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three nodes join over QUIC alone (no TCP listener anywhere) and every
    /// one accepts a signed heartbeat from both others.
    #[cfg(feature = "quic")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_converge_over_quic() {
        let r = converge(
            3,
            TransportArg::Quic,
            Duration::from_millis(300),
            Duration::from_secs(60),
        )
        .await
        .expect("QUIC mesh converges");
        assert_eq!(r.nodes, 3);
        assert!(r.connections_per_node >= 2.0, "{r:?}");
    }

    #[cfg(not(feature = "quic"))]
    #[test]
    fn quic_is_refused_with_the_fix_when_not_built_in() {
        let e = TransportArg::Quic
            .setup()
            .expect_err("no QUIC in this build");
        assert!(e.to_string().contains("--features quic"), "{e}");
    }
}
