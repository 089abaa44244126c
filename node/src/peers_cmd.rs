//! `trine peers`: the libp2p peers a running node knows, through its Admin
//! gRPC service (`ListPeers`).

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use clap::{Args, ValueEnum};
use trine_proto::v1::admin_client::AdminClient;
use trine_proto::v1::{ListPeersRequest, Peer};

use crate::datadir::DataDir;

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum Output {
    /// One aligned row per peer.
    #[default]
    Table,
    /// One JSON object per peer, one per line.
    Json,
}

#[derive(Debug, Args)]
pub struct PeersArgs {
    /// gRPC address of the node to ask (host:port or http://host:port).
    #[arg(
        long,
        env = "TRINE_NODE",
        default_value = "127.0.0.1:7400",
        conflicts_with = "data_dir"
    )]
    pub node: String,

    /// Ask the node running on this data dir (reads its endpoints.json),
    /// instead of --node.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Output format.
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,

    /// Give up after this long.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

fn endpoint(args: &PeersArgs) -> Result<String> {
    if let Some(dir) = &args.data_dir {
        let e = DataDir::read_endpoints(dir).with_context(|| {
            format!(
                "no running node on data dir {} (no endpoints.json); start one with `trine node --data-dir {}`",
                dir.display(),
                dir.display()
            )
        })?;
        return Ok(format!("http://{}", e.grpc));
    }
    Ok(if args.node.contains("://") {
        args.node.clone()
    } else {
        format!("http://{}", args.node)
    })
}

fn age(peer: &Peer) -> String {
    let Some(ts) = &peer.last_seen else {
        return "-".into();
    };
    let seen = UNIX_EPOCH + Duration::new(ts.seconds.max(0) as u64, ts.nanos.max(0) as u32);
    match SystemTime::now().duration_since(seen) {
        Ok(d) => format!("{:.1}s ago", d.as_secs_f64()),
        Err(_) => "now".into(),
    }
}

fn rtt(peer: &Peer) -> String {
    if peer.rtt_seconds > 0.0 {
        format!("{:.1}ms", peer.rtt_seconds * 1e3)
    } else {
        "-".into()
    }
}

pub fn run(args: &PeersArgs) -> Result<()> {
    let uri = endpoint(args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let response = runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(uri.clone())
            .with_context(|| format!("{uri} is not a valid address; use host:port"))?
            .connect_timeout(args.timeout)
            .timeout(args.timeout)
            .connect()
            .await
            .with_context(|| {
                format!("cannot reach a trine node at {uri}; is it running? (--node or --data-dir choose which)")
            })?;
        let reply = AdminClient::new(channel)
            .list_peers(ListPeersRequest {
                request_id: format!("peers-{}", std::process::id()),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{uri} answered {:?}: {}", s.code(), s.message()))?;
        anyhow::Ok(reply.into_inner())
    })?;
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => {
            for p in &response.peers {
                let locality = p.locality.clone().unwrap_or_default();
                let line = serde_json::json!({
                    "peer_id": p.peer_id,
                    "name": p.name,
                    "region": locality.region,
                    "zone": locality.zone,
                    "addrs": p.addrs,
                    "connected": p.connected,
                    "rtt_seconds": p.rtt_seconds,
                    "last_seen_unix": p.last_seen.map(|t| t.seconds),
                    "agent": p.agent,
                    "admitted": p.admitted,
                    "score": p.score,
                    "heartbeat_seq": p.heartbeat_seq,
                });
                writeln!(out, "{line}")?;
            }
        }
        Output::Table => {
            writeln!(
                out,
                "local peer {}: {} peers",
                response.local_peer_id,
                response.peers.len()
            )?;
            writeln!(
                out,
                "{:<52}  {:<12}  {:<13}  {:<5}  {:<9}  {:>9}  {:<10}  {:>6}  ADDRESS",
                "PEER ID", "NAME", "REGION", "ZONE", "CONNECTED", "RTT", "LAST SEEN", "SCORE"
            )?;
            for p in &response.peers {
                let locality = p.locality.clone().unwrap_or_default();
                writeln!(
                    out,
                    "{:<52}  {:<12}  {:<13}  {:<5}  {:<9}  {:>9}  {:<10}  {:>6.1}  {}",
                    p.peer_id,
                    if p.name.is_empty() { "-" } else { &p.name },
                    if locality.region.is_empty() {
                        "-"
                    } else {
                        &locality.region
                    },
                    if locality.zone.is_empty() {
                        "-"
                    } else {
                        &locality.zone
                    },
                    if p.connected { "yes" } else { "no" },
                    rtt(p),
                    age(p),
                    p.score,
                    p.addrs.first().map_or("-", String::as_str),
                )?;
            }
        }
    }
    Ok(())
}
