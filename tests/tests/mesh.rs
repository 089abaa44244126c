//! The libp2p mesh between real `trine node` processes on loopback TCP:
//! discovery, health gossip, simulated region RTTs, departures and rejoins,
//! and the treatment of misbehaving peers.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use trine_tests::{Node, metric, metric_sum, wait_for};

/// Regions of the testnet's 7 nodes.
const REGIONS: [&str; 7] = [
    "us-east",
    "us-east",
    "us-west",
    "us-west",
    "eu-central",
    "eu-central",
    "ap-southeast",
];

/// RTTs of `--simulated-latency realistic` (mesh::Matrix::realistic), ms.
fn matrix_ms(a: &str, b: &str) -> f64 {
    let mut k = [a, b];
    k.sort_unstable();
    match k {
        ["us-east", "us-west"] => 65.0,
        ["eu-central", "us-east"] => 90.0,
        ["ap-southeast", "us-east"] => 215.0,
        ["eu-central", "us-west"] => 145.0,
        ["ap-southeast", "us-west"] => 165.0,
        ["ap-southeast", "eu-central"] => 160.0,
        _ => 1.0,
    }
}

fn mesh_args<'a>(name: &'a str, region: &'a str) -> Vec<&'a str> {
    vec![
        "--name",
        name,
        "--region",
        region,
        "--open-mesh",
        "--heartbeat-interval",
        "500ms",
        "--ping-interval",
        "500ms",
        "--peer-ttl",
        "3s",
    ]
}

async fn start(name: &str, region: &str, extra: &[&str]) -> Result<Node> {
    let mut args = mesh_args(name, region);
    args.extend_from_slice(extra);
    Node::start(&args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seven_nodes_in_four_regions_converge_gossip_and_feel_the_rtt_matrix() -> Result<()> {
    let sim = ["--simulated-latency", "realistic"];
    let first = start("n0", REGIONS[0], &sim).await?;
    let boot = first.p2p_addr();
    let mut nodes = vec![first];
    for (i, region) in REGIONS.iter().enumerate().skip(1) {
        let name = format!("n{i}");
        nodes.push(
            start(
                &name,
                region,
                &["--simulated-latency", "realistic", "--bootstrap", &boot],
            )
            .await?,
        );
    }
    let started = std::time::Instant::now();

    // Every node knows the 6 others, each with a heartbeat that reached it.
    for node in &nodes {
        wait_for(
            "every peer known with a heartbeat",
            Duration::from_secs(60),
            || async {
                let peers = node.peers().await.ok()?;
                let heard = peers.peers.iter().filter(|p| p.heartbeat_seq > 0).count();
                (heard == 6).then_some(())
            },
        )
        .await
        .with_context(|| format!("node {}: {:#?}", node.endpoints.peer_id, node.logs()))?;
    }
    eprintln!("converged in {:?}", started.elapsed());

    // Mean RTT per peer region over a window after convergence (the
    // start, when 7 debug builds share 2 cores, is not what we measure).
    let mut before = Vec::new();
    for node in &nodes {
        before.push(node.metrics().await?);
    }
    let mut failures = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let here = REGIONS[i];
        let window = |text: &str, r: &str| {
            let label = format!("peer_region=\"{r}\"");
            let count = metric_sum(text, "trine_peer_rtt_seconds_count", &[&label])
                - metric_sum(&before[i], "trine_peer_rtt_seconds_count", &[&label]);
            let sum = metric_sum(text, "trine_peer_rtt_seconds_sum", &[&label])
                - metric_sum(&before[i], "trine_peer_rtt_seconds_sum", &[&label]);
            (count, sum)
        };
        let others: Vec<&str> = (0..REGIONS.len())
            .filter(|&j| j != i)
            .map(|j| REGIONS[j])
            .collect();
        let text = wait_for(
            "5 RTT samples per peer region",
            Duration::from_secs(30),
            || async {
                let text = node.metrics().await.ok()?;
                others
                    .iter()
                    .all(|r| window(&text, r).0 >= 5.0)
                    .then_some(text)
            },
        )
        .await?;
        let mut means = BTreeMap::new();
        // What a ping costs on loopback with seven nodes sharing the CPUs
        // (scheduling, noise, yamux): this node's same-region mean over the
        // matrix's 1 ms. The simulated delay comes on top of it, so it is
        // taken off before comparing with the matrix (the one-node region
        // has no same-region peer and takes nothing off).
        let overhead_ms = if others.contains(&here) {
            let (count, sum) = window(&text, here);
            (sum / count * 1e3 - matrix_ms(here, here)).max(0.0)
        } else {
            0.0
        };
        for r in &others {
            let (count, sum) = window(&text, r);
            let mean_ms = sum / count * 1e3;
            means.insert(*r, format!("{mean_ms:.1}"));
            let want = matrix_ms(here, r);
            let ok = if *r == here {
                mean_ms < 30.0
            } else {
                (mean_ms - overhead_ms - want).abs() <= want * 0.2
            };
            if !ok {
                failures.push(format!(
                    "{here}->{r}: mean {mean_ms:.1} ms (loopback overhead {overhead_ms:.1} ms), matrix {want} ms"
                ));
            }
        }
        eprintln!("n{i} {here}: mean RTT ms {means:?}");
        // The peer gauges add up to the 6 others; bytes flow both ways.
        ensure!(
            metric_sum(&text, "trine_peers", &[]) == 6.0,
            "trine_peers: {text}"
        );
        ensure!(metric(&text, "trine_p2p_bytes_sent_total").unwrap_or(0.0) > 0.0);
        ensure!(metric(&text, "trine_p2p_bytes_received_total").unwrap_or(0.0) > 0.0);
        ensure!(
            metric(&text, "trine_dht_peers").unwrap_or(0.0) >= 1.0,
            "{text}"
        );
        ensure!(metric_sum(&text, "trine_gossip_messages_received_total", &[]) >= 6.0);
    }
    ensure!(
        failures.is_empty(),
        "RTTs off the matrix by more than 20%: {failures:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_disappears_and_rejoins_with_the_same_peer_id() -> Result<()> {
    let a = start("a", "us-east", &[]).await?;
    let boot = a.p2p_addr();
    // b joins through a DNS name, as compose and Kubernetes nodes do.
    let dns_boot = boot.replacen("/ip4/127.0.0.1/", "/dns4/localhost/", 1);
    let b = start("b", "us-west", &["--bootstrap", &dns_boot]).await?;
    let mut c = start("c", "eu-central", &["--bootstrap", &boot]).await?;
    let c_id = c.endpoints.peer_id.clone();
    for node in [&a, &b] {
        wait_for("c known", Duration::from_secs(30), || async {
            let peers = node.peers().await.ok()?;
            peers
                .peers
                .iter()
                .any(|p| p.peer_id == c_id && p.heartbeat_seq > 0)
                .then_some(())
        })
        .await?;
    }

    // SIGKILL: no goodbye. Gone from peers and metrics within TTL + slack.
    c.signal(nix::sys::signal::Signal::SIGKILL)?;
    c.wait_exit(Duration::from_secs(5)).await?;
    let killed = std::time::Instant::now();
    for node in [&a, &b] {
        wait_for("c forgotten", Duration::from_secs(15), || async {
            let peers = node.peers().await.ok()?;
            let text = node.metrics().await.ok()?;
            let gone = !peers.peers.iter().any(|p| p.peer_id == c_id);
            let gauge = metric(&text, "trine_peers{region=\"eu-central\"}") == Some(0.0);
            (gone && gauge).then_some(())
        })
        .await?;
    }
    eprintln!(
        "c forgotten {:?} after SIGKILL (peer TTL 3s)",
        killed.elapsed()
    );

    // Restarted on the same data dir: same key, same PeerId, known again.
    let tmp = c.take_dir().context("temp dir")?;
    let data_dir = c.data_dir.clone();
    drop(c);
    let mut args = mesh_args("c", "eu-central");
    args.extend(["--bootstrap", &boot]);
    let c2 = Node::start_in(tmp, data_dir, &args).await?;
    ensure!(
        c2.endpoints.peer_id == c_id,
        "{} != {c_id}",
        c2.endpoints.peer_id
    );
    for node in [&a, &b] {
        wait_for("c rejoined", Duration::from_secs(30), || async {
            let peers = node.peers().await.ok()?;
            peers
                .peers
                .iter()
                .any(|p| p.peer_id == c_id && p.heartbeat_seq > 0)
                .then_some(())
        })
        .await?;
    }
    Ok(())
}

/// A peer that breaks the rules, run in-process with the node's own mesh
/// code (raw publish and raw stage frames bypass the sender-side checks).
async fn liar(bootstrap: &str, max_stage_bytes: usize) -> Result<trine_node::mesh::Started> {
    use trine_node::mesh;
    trine_node::metrics::install();
    let mut config = mesh::Config::new("liar", "us-west", "");
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
    config.bootstrap = vec![bootstrap.parse()?];
    config.open = true;
    config.max_stage_bytes = max_stage_bytes;
    config.heartbeat_interval = Duration::from_secs(3600);
    // An oversized frame is answered before the sender finishes writing
    // it; the sender then waits out its own timeout.
    config.stage_timeout = Duration::from_secs(3);
    Ok(mesh::start(config, libp2p::identity::Keypair::generate_ed25519()).await?)
}

fn peer_of(node: &Node) -> Result<libp2p::PeerId> {
    Ok(node.endpoints.peer_id.parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_gossip_and_stage_messages_are_rejected_counted_and_scored_down() -> Result<()> {
    use prost::Message as _;
    use trine_proto::v1::{Heartbeat, StageRequest, StageStatus};

    let node = start("honest", "us-east", &[]).await?;
    let liar = liar(&node.p2p_addr(), 128 << 20).await?;
    let liar_id = liar.mesh.peer_id().to_string();
    let target = peer_of(&node)?;
    // Gossip needs the node in the liar's topic mesh: wait until the node
    // lists the liar, then publish until the node has counted each kind.
    wait_for("liar connected", Duration::from_secs(30), || async {
        let peers = node.peers().await.ok()?;
        peers
            .peers
            .iter()
            .any(|p| p.peer_id == liar_id && p.connected)
            .then_some(())
    })
    .await?;
    // Each attempt differs (gossipsub will not publish a message twice).
    type Make = fn(u64) -> Vec<u8>;
    let kinds: [(&str, Make); 3] = [
        ("oversized", |seq| {
            Heartbeat {
                seq,
                name: "liar".into(),
                region: "us-west".into(),
                stages: vec!["m/0".repeat(20); 60],
                ..Heartbeat::default()
            }
            .encode_to_vec()
        }),
        ("malformed", |seq| {
            let mut b = vec![0xff; 40];
            b.extend_from_slice(&seq.to_le_bytes());
            b
        }),
        ("field", |seq| {
            Heartbeat {
                seq,
                name: "Liar!".into(),
                region: "us-west".into(),
                ..Heartbeat::default()
            }
            .encode_to_vec()
        }),
    ];
    let mut seq = 0;
    for (reason, make) in kinds {
        let series = format!("trine_gossip_messages_invalid_total{{reason=\"{reason}\"}}");
        wait_for(&series, Duration::from_secs(30), || {
            seq += 1;
            let bytes = make(seq);
            async {
                let _ = liar.mesh.publish_health_bytes(bytes).await;
                let text = node.metrics().await.ok()?;
                (metric(&text, &series).unwrap_or(0.0) >= 1.0).then_some(())
            }
        })
        .await?;
    }

    // Stage protocol: garbage, a wrong shape, an oversized frame, then a
    // well-formed request the node answers honestly (it serves no stage).
    let reply = liar.mesh.stage_bytes(target, vec![0xff; 64]).await?;
    let reply = trine_proto::v1::StageResponse::decode(reply.as_slice())?;
    ensure!(reply.status() == StageStatus::Invalid, "{reply:?}");
    let good = StageRequest {
        request_id: "r1".into(),
        model: "m".into(),
        stage: 1,
        position: 0,
        tokens: 2,
        width: 4,
        hidden: vec![0; 32],
        ..Default::default()
    };
    let wrong_shape = StageRequest {
        hidden: vec![0; 31],
        ..good.clone()
    };
    let reply = liar.mesh.stage(target, &wrong_shape).await?;
    ensure!(
        reply.status() == StageStatus::Invalid && reply.message.contains("tokens 2 x width 4"),
        "{reply:?}"
    );
    let big = liar.mesh.stage_bytes(target, vec![0; (64 << 20) + 1]).await;
    ensure!(big.is_err(), "an oversized frame got an answer: {big:?}");
    let reply = liar.mesh.stage(target, &good).await?;
    ensure!(
        reply.status() == StageStatus::NotServed && reply.request_id == "r1",
        "{reply:?}"
    );

    // The node counts an inbound failure when its side of the stream ends.
    let text = wait_for(
        "stage rejections counted",
        Duration::from_secs(10),
        || async {
            let text = node.metrics().await.ok()?;
            let all = ["malformed", "shape", "oversized"].iter().all(|reason| {
                let series = format!("trine_stage_rejected_total{{reason=\"{reason}\"}}");
                metric(&text, &series) == Some(1.0)
            });
            all.then_some(text)
        },
    )
    .await?;
    ensure!(
        metric(
            &text,
            "trine_stage_requests_total{direction=\"in\",status=\"not_served\"}"
        ) == Some(1.0)
    );
    // The liar's score with the node went below zero.
    let peers = node.peers().await?;
    let seen = peers
        .peers
        .iter()
        .find(|p| p.peer_id == liar_id)
        .context("liar listed")?;
    ensure!(seen.score < 0.0, "liar's score is {}", seen.score);
    ensure!(
        seen.heartbeat_seq == 0,
        "a bad heartbeat was accepted: {seen:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_outside_the_filter_cannot_use_the_application_protocols() -> Result<()> {
    // No --open-mesh and no bootstrap: the node admits nobody yet.
    let node = Node::start(&[
        "--name",
        "closed",
        "--region",
        "us-east",
        "--heartbeat-interval",
        "500ms",
    ])
    .await?;
    let liar = liar(&node.p2p_addr(), 1 << 20).await?;
    let liar_id = liar.mesh.peer_id().to_string();
    // It may connect, identify and ping...
    let listed = wait_for("stranger identified", Duration::from_secs(30), || async {
        let peers = node.peers().await.ok()?;
        peers
            .peers
            .into_iter()
            .find(|p| p.peer_id == liar_id && !p.agent.is_empty() && p.rtt_seconds > 0.0)
    })
    .await?;
    ensure!(!listed.admitted, "{listed:?}");
    // ...but its stage requests are refused,
    let good = trine_proto::v1::StageRequest {
        request_id: "r1".into(),
        model: "m".into(),
        stage: 0,
        position: 0,
        tokens: 1,
        width: 1,
        hidden: vec![0; 4],
        ..Default::default()
    };
    let reply = liar.mesh.stage(peer_of(&node)?, &good).await?;
    ensure!(
        reply.status() == trine_proto::v1::StageStatus::Forbidden,
        "{reply:?}"
    );
    let text = node.metrics().await?;
    ensure!(
        metric(&text, "trine_stage_rejected_total{reason=\"not_member\"}") == Some(1.0),
        "{text}"
    );
    // ...and nothing it gossips is believed, however valid.
    let hb = trine_proto::v1::Heartbeat {
        seq: 1,
        name: "liar".into(),
        region: "us-west".into(),
        sent_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64,
        ..Default::default()
    };
    for _ in 0..5 {
        let _ = liar
            .mesh
            .publish_health_bytes(prost::Message::encode_to_vec(&hb))
            .await;
    }
    let peers = node.peers().await?;
    let seen = peers
        .peers
        .iter()
        .find(|p| p.peer_id == liar_id)
        .context("listed")?;
    ensure!(seen.heartbeat_seq == 0, "{seen:?}");
    ensure!(
        metric_sum(&text, "trine_gossip_messages_received_total", &[]) == 0.0,
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_gossip_heartbeats_in_another_nodes_name() -> Result<()> {
    use trine_control::tls::{self, NodeTls};
    use trine_proto::v1::Heartbeat;

    // A one-node cluster (mesh closed to non-members) and an in-process
    // peer that becomes a member under the name "liar", through a Raft
    // join with its own certificate from the cluster's CA.
    let raft = trine_tests::free_addr()?;
    let node = Node::start(&[
        "--init",
        "--raft-addr",
        &raft,
        "--name",
        "honest",
        "--region",
        "us-east",
        // One heartbeat at start, then none for a minute: the liar (whose
        // own interval is an hour) would count the node's as too fast and
        // stop sending to it.
        "--heartbeat-interval",
        "60s",
        "--peer-ttl",
        "120s",
    ])
    .await?;
    let liar = liar(&node.p2p_addr(), 1 << 20).await?;
    let liar_peer = liar.mesh.peer_id();
    let liar_id = liar_peer.to_string();
    let certs = tempfile::tempdir()?;
    tls::issue_node(&node.data_dir.join("ca"), "liar", &[], certs.path())?;
    let record = trine_control::NodeRecord {
        id: trine_node::cluster::node_id(&liar_peer),
        name: "liar".into(),
        region: "us-west".into(),
        zone: String::new(),
        raft_addr: trine_tests::free_addr()?,
        grpc_addr: String::new(),
        http_addr: String::new(),
        api_tls: false,
        peer_id: liar_id.clone(),
        p2p_addrs: Vec::new(),
        cpu_cores: 1,
        simd: String::new(),
        memory_bytes: 0,
        version: String::new(),
        status: trine_control::NodeStatus::Up,
        status_since_ms: 0,
    };
    let join = trine_proto::v1::JoinRequest {
        request_id: "liar".into(),
        node_id: record.id,
        peer: Some(trine_proto::v1::RaftPeer {
            addr: record.raft_addr.clone(),
            region: record.region.clone(),
            name: record.name.clone(),
        }),
        record: serde_json::to_vec(&record)?,
        raft_mode: trine_control::convert::RAFT_MODE,
    };
    let tls = NodeTls::load(certs.path())?;
    let raft_client =
        trine_control::network::client(&raft, &tls.client()).map_err(anyhow::Error::msg)?;
    wait_for("the liar's join", Duration::from_secs(30), || {
        let req = join.clone();
        let mut c = raft_client.clone();
        async move { c.join(req).await.ok() }
    })
    .await?;
    wait_for("the liar admitted", Duration::from_secs(30), || async {
        let peers = node.peers().await.ok()?;
        peers
            .peers
            .iter()
            .any(|p| p.peer_id == liar_id && p.admitted && p.connected)
            .then_some(())
    })
    .await?;

    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    };
    let (node, liar, liar_id) = (&node, &liar, &liar_id);
    // The node checks a heartbeat's claim before its pace, so the forgeries
    // below are judged on their claim alone.
    let publish = async |seq: u64, name: &str, region: &str| {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let hb = Heartbeat {
            seq,
            name: name.into(),
            region: region.into(),
            sent_unix_ms: now_ms(),
            ..Heartbeat::default()
        };
        if let Err(e) = liar
            .mesh
            .publish_health_bytes(prost::Message::encode_to_vec(&hb))
            .await
        {
            eprintln!("publish {seq}: {e}");
        }
    };
    let seen = async || -> Option<trine_proto::v1::Peer> {
        let peers = node.peers().await.ok()?;
        peers.peers.into_iter().find(|p| p.peer_id == *liar_id)
    };

    // The member speaking for itself is believed.
    let mut seq = 0;
    let believed = wait_for(
        "its own heartbeat believed",
        Duration::from_secs(30),
        || {
            seq += 1;
            let seq = seq;
            async move {
                publish(seq, "liar", "us-west").await;
                seen()
                    .await
                    .filter(|p| p.heartbeat_seq > 0 && p.name == "liar")
            }
        },
    )
    .await?;

    // In another member's name, or in its own name but another region:
    // rejected and counted as impersonation, never believed.
    let series = "trine_gossip_messages_invalid_total{reason=\"impersonation\"}";
    for (name, region) in [("honest", "us-west"), ("liar", "us-east")] {
        let before = metric(&node.metrics().await?, series).unwrap_or(0.0);
        wait_for("an impersonation counted", Duration::from_secs(30), || {
            seq += 1;
            let seq = seq;
            async move {
                publish(seq, name, region).await;
                let text = node.metrics().await.ok()?;
                (metric(&text, series).unwrap_or(0.0) > before).then_some(())
            }
        })
        .await
        .with_context(|| format!("{name} in {region}; the node's log:\n{}", node.logs()))
        .context(
            metric_lines(&node.metrics().await.unwrap_or_default(), "trine_gossip").join("\n"),
        )?;
    }
    let after = seen().await.context("liar listed")?;
    ensure!(
        after.heartbeat_seq == believed.heartbeat_seq
            && after.name == "liar"
            && after
                .locality
                .as_ref()
                .is_some_and(|l| l.region == "us-west"),
        "a forged heartbeat was believed: {after:?}"
    );
    Ok(())
}

fn metric_lines(text: &str, prefix: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}
