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
    /// Raft write throughput and commit latency: a cluster of --voters
    /// members in this process (real sled stores, mutual TLS over loopback
    /// gRPC), --clients writers proposing through the leader for --duration.
    Raft(RaftArgs),
    /// Leader failover: repeatedly stop the leader of a fresh cluster and
    /// time until the survivors commit again.
    Failover(FailoverArgs),
    /// Placement failover: seven members in four regions, each loading its
    /// stages of a deployed synthetic model; repeatedly stop a member that
    /// holds stages and time until they are detected, placed and ready on
    /// other members (model load included).
    Placement(crate::bench_placement::PlacementArgs),
    /// Serving as clients see it: start a testnet (or use --node), stream
    /// greedy requests from 1, 8 and 32 clients, report throughput, time to
    /// first token (split into the serving node's own and the way there and
    /// back) and inter-token gaps; --local adds the same model in this
    /// process as the baseline (medians of 5 runs); --failovers N freezes
    /// the serving node mid-answer N times and reports the pause.
    Serve(crate::bench_serve::ServeArgs),
    /// The engine against this machine's physical limit: read bandwidth
    /// (STREAM-like), each weight shape's GEMV in GB/s and % of it, decode
    /// tokens/s with each lm_head precision, and prefill tokens/s for 128-
    /// and 512-token prompts, at one thread and at all.
    Engine(crate::bench_engine::EngineArgs),
}

#[derive(Debug, Args)]
pub struct RaftArgs {
    /// Voters (1, 3 or 5), each in its own region (the fifth shares us-west).
    #[arg(long, default_value_t = 3)]
    pub voters: usize,
    /// Concurrent writers (openraft batches what arrives together).
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Target total rate in commands/s (0: as fast as they commit).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Print one JSON object instead of a line.
    #[arg(long)]
    pub json: bool,
    /// Also print a line every interval (rate, p99, disk, RSS): a soak.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub report_every: Option<Duration>,
    /// Simulated inter-region RTT on every Raft RPC (the testnet's matrix;
    /// the first voter, in us-east, starts as leader).
    #[arg(long, value_enum, default_value = "none")]
    pub latency: LatencyArg,
    /// Raft timeouts (use wan with --latency realistic).
    #[arg(long, value_enum, default_value = "lan")]
    pub profile: ProfileArg,
}

/// Bytes under `dir` (files only).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProfileArg {
    Lan,
    Wan,
}

#[derive(Debug, Args)]
pub struct FailoverArgs {
    #[arg(long, default_value_t = 3)]
    pub voters: usize,
    /// Simulated inter-region RTT on every Raft RPC (the testnet's matrix;
    /// voters sit in distinct regions).
    #[arg(long, value_enum, default_value = "none")]
    pub latency: LatencyArg,
    #[arg(long, value_enum, default_value = "lan")]
    pub profile: ProfileArg,
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LatencyArg {
    None,
    /// us-east, us-west, eu-central, ap-southeast at public-cloud medians
    /// (65-215 ms RTT), as `trine testnet --latency realistic`.
    Realistic,
}

impl LatencyArg {
    pub(crate) fn rtt(self) -> Option<trine_control::network::RttMatrix> {
        match self {
            Self::None => None,
            Self::Realistic => Some(crate::cluster::rtt_matrix(
                mesh::Matrix::realistic(),
                "bench",
            )),
        }
    }
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

/// jemalloc's (allocated, resident) bytes: the live heap, and what the
/// allocator holds from the system. Zero when jemalloc is not the
/// allocator (library tests).
fn heap_bytes() -> (u64, u64) {
    use tikv_jemalloc_ctl::{epoch, stats};
    if epoch::advance().is_err() {
        return (0, 0);
    }
    (
        stats::allocated::read().map_or(0, |b| b as u64),
        stats::resident::read().map_or(0, |b| b as u64),
    )
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
        BenchCommand::Raft(args) => raft_bench(args),
        BenchCommand::Failover(args) => failover_bench(args),
        BenchCommand::Placement(args) => crate::bench_placement::run(args),
        BenchCommand::Serve(args) => crate::bench_serve::run(args),
        BenchCommand::Engine(args) => crate::bench_engine::run(args),
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

/// The voters' regions: the testnet's, one voter each, the fifth sharing
/// us-west (at most two per region).
fn regions(n: usize) -> Vec<String> {
    [
        "us-east",
        "us-west",
        "eu-central",
        "ap-southeast",
        "us-west",
    ]
    .iter()
    .cycle()
    .take(n)
    .map(|r| (*r).to_owned())
    .collect()
}

pub(crate) fn quiet_runtime() -> Result<tokio::runtime::Runtime> {
    crate::metrics::install();
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Commit latencies in µs, 1 µs to 10 min, 3 significant digits.
fn latency_histogram() -> Result<hdrhistogram::Histogram<u64>> {
    Ok(hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn raft_bench(args: &RaftArgs) -> Result<()> {
    use trine_control::local::{LocalCluster, Tuning, note};
    if ![1, 3, 5].contains(&args.voters) || args.clients == 0 {
        bail!("--voters is 1, 3 or 5 and --clients at least 1");
    }
    let runtime = quiet_runtime()?;
    let regions = regions(args.voters);
    let refs: Vec<&str> = regions.iter().map(String::as_str).collect();
    let (committed, latencies, elapsed, disk) = runtime.block_on(async {
        let cluster = LocalCluster::start(
            &refs,
            Tuning {
                rtt: args.latency.rtt(),
                profile: match args.profile {
                    ProfileArg::Lan => trine_control::Profile::Lan,
                    ProfileArg::Wan => trine_control::Profile::Wan,
                },
                ..Tuning::default()
            },
        )
        .await?;
        let leader_id = cluster.leader().context("no leader")?;
        let leader = cluster.nodes[&leader_id].clone();
        let stop = Instant::now() + args.duration;
        let per_client_gap = (args.rate > 0)
            .then(|| Duration::from_secs_f64(args.clients as f64 / args.rate as f64));
        let committed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..args.clients {
            let leader = leader.clone();
            let committed = committed.clone();
            tasks.push(tokio::spawn(async move {
                // A fixed-size histogram (µs, 3 significant digits): a soak
                // must not measure its own growing sample list.
                let mut lat = latency_histogram()?;
                let mut i = 0u64;
                let mut next = Instant::now();
                while Instant::now() < stop {
                    if let Some(gap) = per_client_gap {
                        tokio::time::sleep_until(next.into()).await;
                        next += gap;
                    }
                    let t = Instant::now();
                    if leader
                        .propose(&leader.principal(), note(format!("c{c} #{i}")))
                        .await
                        .is_ok()
                    {
                        lat.saturating_record(t.elapsed().as_micros() as u64);
                        committed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    i += 1;
                }
                anyhow::Ok(lat)
            }));
        }
        let t0 = Instant::now();
        let mut report = None;
        if let Some(every) = args.report_every {
            let reader = leader.reader().clone();
            let committed = committed.clone();
            let raft_dir = cluster
                .dir
                .path()
                .join(format!("n{leader_id}"))
                .join("raft");
            report = Some(tokio::spawn(async move {
                let mut last = (Instant::now(), 0u64);
                eprintln!(
                    "elapsed_s  committed  commands/s  chain_height  leader_sled_MiB  leader_archive_MiB  rss_MiB  heap_MiB  jemalloc_resident_MiB"
                );
                loop {
                    tokio::time::sleep(every).await;
                    let n = committed.load(std::sync::atomic::Ordering::Relaxed);
                    let h = reader.head().map_or(0, |b| b.height);
                    let heap = heap_bytes();
                    let rate = (n - last.1) as f64 / last.0.elapsed().as_secs_f64();
                    last = (Instant::now(), n);
                    eprintln!(
                        "{:>9.0}  {n:>9}  {rate:>10.0}  {h:>12}  {:>15.1}  {:>18.1}  {:>7.1}  {:>8.1}  {:>21.1}",
                        t0.elapsed().as_secs_f64(),
                        dir_bytes(&raft_dir.join("db")) as f64 / (1 << 20) as f64,
                        dir_bytes(&raft_dir.join("chain")) as f64 / (1 << 20) as f64,
                        rss_bytes() as f64 / (1 << 20) as f64,
                        heap.0 as f64 / (1 << 20) as f64,
                        heap.1 as f64 / (1 << 20) as f64
                    );
                }
            }));
        }
        let mut all = latency_histogram()?;
        for t in tasks {
            all.add(t.await??)?;
        }
        // Stop reporting before the members' files go away.
        if let Some(r) = report {
            r.abort();
            let _ = r.await;
        }
        let elapsed = t0.elapsed();
        let disk = leader.reader().disk_bytes();
        for c in cluster.nodes.values() {
            c.shutdown().await;
        }
        anyhow::Ok((all.len(), all, elapsed, disk))
    })?;
    let rate = committed as f64 / elapsed.as_secs_f64();
    let at = |q: f64| Duration::from_micros(latencies.value_at_quantile(q));
    let (p50, p99) = (at(0.5), at(0.99));
    #[allow(clippy::print_stdout)]
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "voters": args.voters, "clients": args.clients, "target_rate": args.rate,
                "committed": committed, "seconds": elapsed.as_secs_f64(),
                "commands_per_second": rate,
                "p50_ms": p50.as_secs_f64() * 1e3, "p99_ms": p99.as_secs_f64() * 1e3,
                "leader_disk_bytes": disk,
            })
        );
    } else {
        println!(
            "voters {}  clients {}  committed {committed} in {:.1}s  {rate:.0} commands/s  p50 {:.2}ms  p99 {:.2}ms  leader sled {:.1} MiB",
            args.voters,
            args.clients,
            elapsed.as_secs_f64(),
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            disk as f64 / (1 << 20) as f64
        );
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn failover_bench(args: &FailoverArgs) -> Result<()> {
    use trine_control::local::{LocalCluster, Tuning, note};
    if ![3, 5].contains(&args.voters) {
        bail!("--voters is 3 or 5");
    }
    let runtime = quiet_runtime()?;
    let regions = regions(args.voters);
    let refs: Vec<&str> = regions.iter().map(String::as_str).collect();
    let profile = match args.profile {
        ProfileArg::Lan => trine_control::Profile::Lan,
        ProfileArg::Wan => trine_control::Profile::Wan,
    };
    let mut times = Vec::new();
    for round in 0..args.rounds {
        let took = runtime.block_on(async {
            let mut cluster = LocalCluster::start(
                &refs,
                Tuning {
                    profile,
                    rtt: args.latency.rtt(),
                    ..Tuning::default()
                },
            )
            .await?;
            let leader = cluster.leader().context("no leader")?;
            let survivor = cluster
                .nodes
                .iter()
                .find(|(id, _)| **id != leader)
                .map(|(_, c)| c.clone())
                .context("a survivor")?;
            survivor
                .propose(&survivor.principal(), note("warm"))
                .await?;
            let t0 = Instant::now();
            cluster.stop(leader).await;
            loop {
                match tokio::time::timeout(
                    Duration::from_secs(2),
                    survivor.propose(&survivor.principal(), note("after")),
                )
                .await
                {
                    Ok(Ok(_)) => break,
                    _ if t0.elapsed() > Duration::from_secs(60) => {
                        bail!("no commit 60 s after the leader stopped")
                    }
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            let took = t0.elapsed();
            for c in cluster.nodes.values() {
                c.shutdown().await;
            }
            anyhow::Ok(took)
        })?;
        eprintln!("round {}: {:.0} ms", round + 1, took.as_secs_f64() * 1e3);
        times.push(took);
    }
    times.sort_unstable();
    #[allow(clippy::print_stdout)]
    {
        println!(
            "failover ({:?}, {} voters, {} rounds): median {:.0} ms  min {:.0} ms  max {:.0} ms",
            args.profile,
            args.voters,
            args.rounds,
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            times[0].as_secs_f64() * 1e3,
            times[times.len() - 1].as_secs_f64() * 1e3
        );
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
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
        // Heartbeats may be relayed by gossip; every node has a QUIC link.
        assert!(r.connections_per_node >= 1.0, "{r:?}");
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
