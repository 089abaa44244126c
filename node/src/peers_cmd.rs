//! `trine peers`: the libp2p peers a running node knows, through its Admin
//! gRPC service (`ListPeers`).

use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use clap::Args;
use trine_proto::v1::{ListPeersRequest, Peer};

use crate::cluster_cmd::{Output, Target};

#[derive(Debug, Args)]
pub struct PeersArgs {
    #[command(flatten)]
    pub target: Target,

    /// Output format.
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
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
    let req = ListPeersRequest {
        request_id: format!("peers-{}", std::process::id()),
    };
    let response = args
        .target
        .call(|mut a| async move { a.list_peers(req).await })?;
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
