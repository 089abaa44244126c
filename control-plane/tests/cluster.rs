//! Real control planes in one process: sled in temp dirs, mutual TLS on
//! loopback gRPC, certificates from a real CA. A leader stops, a new one
//! commits; every chain agrees at every common height; a node outside the
//! CA is refused.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use trine_control::local::{LocalCluster, Tuning, start_member};
use trine_control::tls::{self, NodeTls};
use trine_control::{Command, ControlPlane, Scope, Secret, TokenRecord, authz};

/// Fast timeouts and frequent snapshots, so the tests see elections and
/// snapshot installs within seconds.
fn tuning() -> Tuning {
    Tuning {
        heartbeat: Some(Duration::from_millis(100)),
        election_timeout: Some(Duration::from_millis(600)),
        snapshot_every: 50,
        snapshot_keep: 10,
        ..Tuning::default()
    }
}

async fn cluster(regions: &[&str]) -> Result<LocalCluster> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    Ok(LocalCluster::start(regions, tuning()).await?)
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

async fn note(c: &ControlPlane, text: &str) -> Result<u64> {
    Ok(
        c.propose(&c.principal(), Command::Note { text: text.into() })
            .await
            .with_context(|| format!("proposing {text}"))?
            .index,
    )
}

/// Records an admin token (as `trine node --init` does) and returns its
/// secret: a member forwards another node's drain only with one.
async fn admin(cluster: &LocalCluster) -> Result<Secret> {
    let secret = "trn_test_admin";
    let leader = cluster.leader().context("a leader")?;
    let c = &cluster.nodes[&leader];
    let r = c
        .propose(
            &c.principal(),
            Command::BootstrapToken(Box::new(TokenRecord::new(
                "root",
                authz::secret_hash(secret),
                Scope::Admin,
            ))),
        )
        .await?;
    anyhow::ensure!(r.rejected.is_none(), "bootstrap token: {r:?}");
    Ok(Secret::new(secret))
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
    let mut cluster = cluster(regions).await?;
    assert_eq!(
        cluster.any().context("a member")?.status().voters.len(),
        regions.len()
    );
    // Writes through every node (followers forward to the leader).
    let mut acked = Vec::new();
    for (id, c) in &cluster.nodes {
        for i in 0..10 {
            acked.push(note(c, &format!("{id}-{i}")).await?);
        }
    }
    let old = cluster.leader().context("one leader")?;
    let stopped = Instant::now();
    cluster.stop(old).await.context("leader present")?;
    let survivor = cluster.any().context("a survivor")?.clone();
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
                .all(|c| c.status().applied >= index)
                .then_some(())
        },
    )
    .await?;
    for c in cluster.nodes.values() {
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
        .find(|c| !c.status().state.is_leader())
        .context("a follower")?;
    let read_at = follower.linearizable().await?;
    assert!(read_at >= index);
    Ok(())
}

/// Two survivors that each voted for themselves in the same term split the
/// vote. openraft's own election timer is switched off on both, so only the
/// control plane's split-vote rerun can start the next term; without it they
/// stay candidates forever (in CI, ticks that fired in step made openraft's
/// timer do exactly that for ten seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_vote_is_rerun_until_one_candidate_wins() -> Result<()> {
    let mut cluster = cluster(&["a", "b", "c"]).await?;
    let index = note(cluster.any().context("a member")?, "before").await?;
    wait_for(
        "every member applied",
        Duration::from_secs(10),
        async || {
            cluster
                .nodes
                .values()
                .all(|c| c.status().applied >= index)
                .then_some(())
        },
    )
    .await?;
    let old = cluster.leader().context("a leader")?;
    cluster.stop(old).await.context("leader present")?;
    let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
    for (id, c) in &cluster.nodes {
        c.raft().runtime_config().elect(false);
        c.faults().isolate(ids.iter().copied().filter(|o| o != id));
    }
    for c in cluster.nodes.values() {
        c.raft().trigger().elect().await?;
    }
    // Each campaigned for itself where the other could not hear it.
    let split = wait_for(
        "both survivors to be candidates",
        Duration::from_secs(10),
        async || {
            let s: Vec<_> = cluster.nodes.values().map(|c| c.status()).collect();
            s.iter()
                .all(|s| s.state == openraft::ServerState::Candidate)
                .then(|| s.iter().map(|s| s.term).min().unwrap_or(0))
        },
    )
    .await?;
    for c in cluster.nodes.values() {
        c.faults().heal();
    }
    let leader = wait_for(
        "a leader after the split vote",
        Duration::from_secs(10),
        async || cluster.leader(),
    )
    .await?;
    assert!(ids.contains(&leader));
    let term = cluster.nodes[&leader].status().term;
    assert!(term > split, "won in term {term}, the split was in {split}");
    note(&cluster.nodes[&leader], "after").await?;
    Ok(())
}

/// openraft's own election timer is switched off on every member (it stands
/// in for a timer held back by openraft's "seen a greater log" delay, which
/// outlives the campaign that set it): when the leader stops, the control
/// plane's election timer still elects a new one, once no leader has been
/// heard from for the longest election timeout plus a drawn one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survivors_whose_election_timer_is_held_back_still_elect() -> Result<()> {
    let mut cluster = cluster(&["a", "b", "c"]).await?;
    note(cluster.any().context("a member")?, "before").await?;
    for c in cluster.nodes.values() {
        c.raft().runtime_config().elect(false);
    }
    let old = cluster.leader().context("a leader")?;
    let stopped = Instant::now();
    cluster.stop(old).await.context("leader present")?;
    let new = wait_for("a new leader", Duration::from_secs(15), async || {
        cluster.leader().filter(|l| *l != old)
    })
    .await?;
    let took = stopped.elapsed();
    let election = tuning().election_timeout.context("tuned")?;
    // Without the control plane's timer nobody campaigns at all
    // (openraft's is off), and the wait above fails. One span is the
    // longest timeout (2 x min) plus one drawn from [min, 2 x min): at most
    // 4 x min; a first campaign that splits waits for the next span. The
    // bound allows two spans and a loaded CI machine; the election times
    // themselves are measured by the chaos soak, not here.
    eprintln!("elected after {took:?} (election timeout {election:?})");
    assert!(
        took < election * 10,
        "elected only after {took:?} (election timeout {election:?})"
    );
    note(&cluster.nodes[&new], "after").await?;
    Ok(())
}

/// The leader dies while a voter is being drained (the soak's
/// membership-change scenario): the survivors elect a new leader in about
/// the time a plain leader loss takes, without waiting for the dead one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_during_a_membership_change_is_replaced() -> Result<()> {
    let regions = [
        "us-east",
        "us-east",
        "us-west",
        "us-west",
        "eu-central",
        "eu-central",
        "ap-southeast",
    ];
    let mut cluster = cluster(&regions).await?;
    let status = cluster.any().context("a member")?.status();
    let old = status.leader.context("a leader")?;
    let leaver = *status
        .voters
        .iter()
        .find(|v| **v != old)
        .context("another voter")?;
    let secret = admin(&cluster).await?;
    let through = cluster.nodes[&old].clone();
    let drain = tokio::spawn(async move {
        through
            .leave(Some(leaver), Some(("token:root", secret)))
            .await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Whether the leaver had applied its own draining status (the drain's
    // first step) when the leader stopped.
    let knew_it_drained = cluster.nodes[&leaver].reader().with_state(|s| {
        s.nodes
            .get(&leaver)
            .is_some_and(|r| r.status == trine_control::NodeStatus::Draining)
    });
    let stopped = Instant::now();
    cluster.stop(old).await.context("leader present")?;
    drain.abort();
    let new = wait_for("a new leader", Duration::from_secs(20), async || {
        cluster.leader().filter(|l| *l != old)
    })
    .await?;
    let took = stopped.elapsed();
    eprintln!(
        "new leader {new} {took:?} after the leader stopped mid-change (the leaver knew it drained: {knew_it_drained})"
    );
    // The draining voter votes but does not campaign: had it won, it would
    // lead only until its drain ended (one survivor in five would win by
    // chance without that rule).
    if knew_it_drained {
        assert_ne!(new, leaver, "the draining voter became the leader");
    }
    let tuning = tuning();
    let election = tuning.election_timeout.context("tuned")?;
    // openraft waits out the dead leader's lease (the longest election
    // timeout, 2x the shortest) and then its own timeout: at most 4x.
    assert!(
        took < election * 4 + Duration::from_secs(2),
        "no new leader for {took:?}"
    );
    note(&cluster.nodes[&new], "after").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up_and_a_far_behind_one_by_snapshot() -> Result<()> {
    let mut cluster = cluster(&["a", "b", "c"]).await?;
    let leader = cluster.leader();
    let victim = *cluster
        .nodes
        .keys()
        .find(|id| Some(**id) != leader)
        .context("a follower")?;
    let addr = cluster.addr(victim).context("its address")?;
    let victim_applied = cluster.nodes[&victim].status().applied;
    cluster.stop(victim).await;
    // Far behind: more entries than the snapshot interval, so the log it
    // needs is purged on the others and only a snapshot can catch it up.
    let live = cluster.any().context("a member")?.clone();
    let mut last = 0;
    for i in 0..300 {
        last = note(&live, &format!("while down {i}")).await?;
    }
    // Every member purges the entries the stopped node still needs (a
    // replication stream may hold them back for a while).
    wait_for(
        "the log it needs purged everywhere",
        Duration::from_secs(20),
        async || {
            cluster
                .nodes
                .values()
                .all(|c| {
                    c.raft()
                        .metrics()
                        .borrow()
                        .purged
                        .is_some_and(|p| p.index > victim_applied)
                })
                .then_some(())
        },
    )
    .await?;
    // Restart from its data dir, same address.
    cluster.restart(victim, "x", &addr).await?;
    let c = cluster.nodes[&victim].clone();
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
    let cluster = cluster(&["a"]).await?;
    let seed = cluster.addr(1).context("the seed's address")?;
    let other = tempfile::tempdir()?;
    tls::init_ca(&other.path().join("ca"), "intruders")?;
    let intruder = start_member(other.path(), 9, "x", Some(seed), &tuning(), None).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let any = cluster.any().context("a member")?;
    let members = any.status().members;
    assert!(!members.contains_key(&9), "intruder joined: {members:?}");
    assert!(!any.reader().state().nodes.contains_key(&9));
    intruder.shutdown().await;

    // The same call succeeds with a member's certificate and fails in the
    // TLS handshake with the intruder's.
    let ask = |dir: std::path::PathBuf, seed: String| async move {
        let tls = NodeTls::load(&dir)?;
        let mut c =
            trine_control::network::client(&seed, &tls.client()).map_err(anyhow::Error::msg)?;
        anyhow::Ok(
            c.read_index(trine_proto::v1::ReadIndexRequest::default())
                .await,
        )
    };
    let seed = cluster.addr(1).context("the seed's address")?;
    let member = ask(cluster.dir.path().join("n1").join("tls"), seed.clone()).await?;
    assert!(member.is_ok(), "a member was refused: {member:?}");
    let refused = ask(other.path().join("n9").join("tls"), seed.clone()).await?;
    let e = refused.expect_err("a certificate from another CA was accepted");
    assert!(e.message().contains("certificate"), "{e:?}");
    // A client that trusts the cluster CA but shows no certificate of its
    // own is refused in the handshake too.
    let ca = std::fs::read_to_string(cluster.dir.path().join("n1").join("tls").join(tls::CA_CERT))?;
    let bare = tls::client_config(&ca, Some(tls::NODE_NAME), None);
    let mut c = trine_control::network::client(&seed, &bare).map_err(anyhow::Error::msg)?;
    let e = c
        .read_index(trine_proto::v1::ReadIndexRequest::default())
        .await
        .expect_err("a client without a certificate was answered on the Raft port");
    // Refused in the handshake (TLS 1.3: the server closes the connection
    // once it sees no certificate), never by the service.
    assert!(
        matches!(
            e.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
        ),
        "{e:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_speaks_only_for_the_node_it_names() -> Result<()> {
    use trine_proto::v1 as pb;
    let cluster = cluster(&["a", "b", "c"]).await?;
    let leader = cluster.leader().context("a leader")?;
    let target = follower_of(&cluster, leader)?.id();
    let other = cluster
        .nodes
        .keys()
        .copied()
        .find(|id| *id != leader && *id != target)
        .context("a second follower")?;
    let addr = cluster.addr(target).context("the follower's address")?;
    // A certificate from the cluster's own CA, for a node no member is.
    let mallory = cluster.dir.path().join("mallory");
    tls::issue_node(&cluster.dir.path().join("ca"), "mallory", &[], &mallory)?;
    let tls_of = |name: &str| cluster.dir.path().join(name).join("tls");

    let vote = |claimed: u64, term: u64| pb::VoteRequest {
        request_id: "t".into(),
        vote: Some(pb::RaftVote {
            leader_id: Some(pb::LeaderId {
                term,
                node_id: claimed,
            }),
            committed: false,
        }),
        last_log_id: None,
    };
    let call = async |dir: std::path::PathBuf, req: pb::VoteRequest| -> Result<_> {
        let tls = NodeTls::load(&dir)?;
        let mut c =
            trine_control::network::client(&addr, &tls.client()).map_err(anyhow::Error::msg)?;
        Ok(c.vote(req).await)
    };

    // A member's own certificate, for itself: an answer (a stale vote is
    // turned down, not refused).
    let own = call(tls_of(&format!("n{other}")), vote(other, 0)).await?;
    assert!(
        own.is_ok(),
        "a member speaking for itself was refused: {own:?}"
    );
    // Another member's certificate, or one for a non-member, claiming to be
    // `other`, even with a term that would unseat the leader: refused.
    for (dir, who) in [
        (tls_of(&format!("n{leader}")), "another member"),
        (mallory.clone(), "a non-member"),
    ] {
        let e = call(dir, vote(other, 1_000))
            .await?
            .expect_err("a certificate spoke for another node");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{who}: {e:?}");
        assert!(e.message().contains("certs issue"), "{who}: {e:?}");
    }
    // The same for appends claiming to come from the leader.
    let tls = NodeTls::load(&mallory)?;
    let mut c = trine_control::network::client(&addr, &tls.client()).map_err(anyhow::Error::msg)?;
    let e = c
        .append_entries(pb::AppendEntriesRequest {
            request_id: "t".into(),
            vote: Some(pb::RaftVote {
                leader_id: Some(pb::LeaderId {
                    term: 1_000,
                    node_id: leader,
                }),
                committed: true,
            }),
            ..Default::default()
        })
        .await
        .expect_err("a forged append was taken");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // A join under a name the certificate does not hold.
    let e = c
        .join(pb::JoinRequest {
            request_id: "t".into(),
            node_id: 77,
            peer: Some(pb::RaftPeer {
                addr: "127.0.0.1:1".into(),
                region: "a".into(),
                name: "n77".into(),
            }),
            ..Default::default()
        })
        .await
        .expect_err("a join for another name was taken");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // Nothing moved: the leader and its term are the same.
    let status = cluster.nodes[&target].status();
    assert_eq!(cluster.leader(), Some(leader));
    assert!(status.term < 1_000, "{status:?}");
    assert!(!status.members.contains_key(&77));
    Ok(())
}

fn token(name: &str, secret: &str) -> Command {
    Command::AddToken(Box::new(TokenRecord::new(
        name,
        authz::secret_hash(secret),
        Scope::Admin,
    )))
}

/// A member other than `leader`.
fn follower_of(cluster: &LocalCluster, leader: u64) -> Result<ControlPlane> {
    Ok(cluster
        .nodes
        .values()
        .find(|c| c.id() != leader)
        .context("a follower")?
        .clone())
}

/// Sends `requests` as one group straight to a member's Raft port, as a
/// member's library does: each command's answer, or the call's error.
async fn propose_raw(
    c: &mut trine_proto::v1::raft_client::RaftClient<tonic::transport::Channel>,
    requests: Vec<trine_control::Request>,
) -> Result<Result<Vec<Result<trine_control::Response, String>>, tonic::Status>> {
    propose_group(c, &trine_control::Batch::new(requests)).await
}

/// [`propose_raw`] of a group as it is (its id too).
async fn propose_group(
    c: &mut trine_proto::v1::raft_client::RaftClient<tonic::transport::Channel>,
    group: &trine_control::Batch,
) -> Result<Result<Vec<Result<trine_control::Response, String>>, tonic::Status>> {
    let sent = c
        .propose(trine_proto::v1::ProposeRequest {
            request_id: "t".into(),
            request: serde_json::to_vec(group)?,
            secrets: Vec::new(),
        })
        .await;
    Ok(match sent {
        Ok(r) => Ok(serde_json::from_slice(&r.into_inner().response)?),
        Err(s) => Err(s),
    })
}

/// A member's key lets it write its own commands only: a client's write
/// reaches the leader with the client's admin token or not at all, and the
/// planner's commands and other nodes' names are refused. (Before, any
/// certificate from the cluster CA could commit anything through Propose:
/// a stolen node key could mint an admin token.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_key_writes_only_its_own_commands_and_its_clients_with_their_tokens() -> Result<()> {
    use trine_proto::v1 as pb;
    let cluster = cluster(&["a", "b", "c"]).await?;
    let secret = admin(&cluster).await?;
    let leader = cluster.leader().context("a leader")?;
    let follower = follower_of(&cluster, leader)?;
    let third = cluster
        .nodes
        .keys()
        .copied()
        .find(|id| *id != leader && *id != follower.id())
        .context("a third member")?;
    let leader_name = cluster.nodes[&leader].status().members[&leader]
        .name
        .clone();

    // Through the library, as `trine node` writes: an admin's write from a
    // follower carries the admin's token and is committed...
    let r = follower
        .propose_for_client("token:root", secret.clone(), token("ci", "trn_ci"))
        .await?;
    assert_eq!(r.rejected, None);
    // ...and without it, or with a wrong one, it is refused by the leader.
    for (what, result) in [
        (
            "no token",
            follower
                .propose("token:root", token("forged", "trn_forged"))
                .await,
        ),
        (
            "a wrong token",
            follower
                .propose_for_client(
                    "token:root",
                    Secret::new("trn_guess"),
                    token("forged", "trn_forged"),
                )
                .await,
        ),
    ] {
        match result {
            Err(trine_control::Error::Forbidden(m)) => {
                assert!(m.contains("token:root"), "{what}: {m}");
                assert!(!m.contains("trn_guess"), "{what}: the secret in {m}");
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    // A node's own note from a follower is still committed.
    let own = note(&follower, "own").await?;

    // A stolen node key, talking to the leader's Raft port directly.
    let addr = cluster.addr(leader).context("the leader's address")?;
    let tls_of = |name: &str| cluster.dir.path().join(name).join("tls");
    let stolen = NodeTls::load(&tls_of(&format!("n{}", follower.id())))?;
    let mut c =
        trine_control::network::client(&addr, &stolen.client()).map_err(anyhow::Error::msg)?;
    let req = |principal: &str, command: Command| trine_control::Request::now(principal, command);
    let answers = propose_raw(
        &mut c,
        vec![
            req("token:root", token("minted", "trn_minted")),
            req(
                &format!("node:{leader_name}"),
                Command::Note {
                    text: "as the leader".into(),
                },
            ),
            req("planner", Command::UndeployModel { name: "any".into() }),
            req(&follower.principal(), token("minted2", "trn_minted2")),
            req(
                &follower.principal(),
                Command::Note {
                    text: "mine".into(),
                },
            ),
        ],
    )
    .await??;
    assert_eq!(answers.len(), 5, "{answers:?}");
    for (i, why) in [
        (0, "without the token"),
        (1, "in its own name"),
        (2, "takes none from another node"),
        (3, "a client's write goes with its admin token"),
    ] {
        let e = answers[i]
            .as_ref()
            .expect_err("a forged write was committed");
        assert!(e.contains(why), "answer {i}: {e}");
    }
    let mine = answers[4].as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(mine.index > own, "{mine:?}");
    // A member that is not the leader commits nothing for another (it would
    // stand in for the sender's certificate): the sender is told to ask
    // the leader, which the library does.
    let third_addr = cluster.addr(third).context("the third member's address")?;
    let mut f = trine_control::network::client(&third_addr, &stolen.client())
        .map_err(anyhow::Error::msg)?;
    let e = propose_raw(
        &mut f,
        vec![req(
            &follower.principal(),
            Command::Note {
                text: "through".into(),
            },
        )],
    )
    .await?
    .expect_err("a follower forwarded a write again");
    assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
    // The same key cannot remove another member.
    let e = c
        .leave(pb::LeaveRequest {
            request_id: "t".into(),
            node_id: third,
            secret: String::new(),
        })
        .await
        .expect_err("a node key removed another member");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // A certificate from the cluster CA that is no member's writes nothing.
    let mallory = cluster.dir.path().join("mallory");
    tls::issue_node(&cluster.dir.path().join("ca"), "mallory", &[], &mallory)?;
    let tls = NodeTls::load(&mallory)?;
    let mut m = trine_control::network::client(&addr, &tls.client()).map_err(anyhow::Error::msg)?;
    let answers = propose_raw(
        &mut m,
        vec![req(
            "node:mallory",
            Command::Note {
                text: "hello".into(),
            },
        )],
    )
    .await??;
    assert!(
        answers[0].as_ref().is_err_and(|e| e.contains("no member")),
        "{answers:?}"
    );

    // Nothing forged exists; the admin's token and the members are there.
    cluster.nodes[&leader].linearizable().await?;
    let state = cluster.nodes[&leader].reader().state();
    let names: Vec<&str> = state.tokens.keys().map(String::as_str).collect();
    assert_eq!(names, ["ci", "root"]);
    assert!(cluster.nodes[&leader].status().members.contains_key(&third));
    Ok(())
}

/// A member that sends a group again (its leader stepped down before
/// answering) gets the first commit's answers; the group is on the chain
/// once, and every member's chain records the retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_sent_again_is_committed_once() -> Result<()> {
    let cluster = cluster(&["a", "b", "c"]).await?;
    let leader = cluster.leader().context("a leader")?;
    let follower = follower_of(&cluster, leader)?;
    let addr = cluster.addr(leader).context("the leader's address")?;
    let tls = NodeTls::load(
        &cluster
            .dir
            .path()
            .join(format!("n{}", follower.id()))
            .join("tls"),
    )?;
    let mut c = trine_control::network::client(&addr, &tls.client()).map_err(anyhow::Error::msg)?;
    let group = trine_control::Batch::new(vec![trine_control::Request::now(
        follower.principal(),
        Command::Note {
            text: "exactly once".into(),
        },
    )]);
    let first = propose_group(&mut c, &group).await??;
    let again = propose_group(&mut c, &group).await??;
    assert_eq!(first, again);
    let at = first[0].as_ref().map_err(|e| anyhow::anyhow!("{e}"))?.index;
    let last = note(&follower, "after").await?;
    for (id, member) in &cluster.nodes {
        wait_for(
            &format!("member {id} applied the note after"),
            Duration::from_secs(10),
            async || (member.reader().head().map_or(0, |b| b.height) >= last).then_some(()),
        )
        .await?;
        let mut notes = 0;
        let mut retries = 0;
        for b in member.reader().blocks(at, usize::MAX) {
            let b = b.map_err(|(h, e)| anyhow::anyhow!("member {id} block {h}: {e}"))?;
            notes += b
                .txs
                .iter()
                .filter(|t| t.kind == "note" && t.summary.contains("exactly once"))
                .count();
            retries += b.txs.iter().filter(|t| t.kind == "duplicate").count();
        }
        assert_eq!((notes, retries), (1, 1), "member {id}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_to_a_new_ca_without_a_restart() -> Result<()> {
    let cluster = cluster(&["a", "b", "c"]).await?;
    let root = cluster.dir.path();
    let ca = root.join("ca");
    let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
    let tls_of = |id: u64| root.join(format!("n{id}")).join("tls");
    // A certificate from the old CA, to knock with at the end.
    let old_client = root.join("old-client");
    tls::issue_node(&ca, "old-client", &[], &old_client)?;
    let any = cluster.any().context("a member")?.clone();
    note(&any, "before").await?;

    // Every phase: each member picks the files up (no restart: the same
    // control planes throughout) and the cluster still commits.
    let phase = async |what: &str, generation: u64| -> Result<()> {
        wait_for(
            &format!("{what}: every member reloaded"),
            Duration::from_secs(15),
            async || {
                cluster
                    .nodes
                    .values()
                    .all(|c| c.cert_generation() >= generation)
                    .then_some(())
            },
        )
        .await?;
        wait_for(
            &format!("a commit after {what}"),
            Duration::from_secs(15),
            async || note(&any, what).await.ok(),
        )
        .await?;
        Ok(())
    };
    // 1. A new CA signs; ca.crt holds it and the old one (the overlap), and
    //    goes to every member before any certificate changes.
    assert_eq!(tls::rotate_ca(&ca, "local", false)?, 2);
    for id in &ids {
        tls::rotate_node(&ca, &format!("n{id}"), &[], &tls_of(*id), true)?;
    }
    phase("the new CA is trusted", 1).await?;
    // 2. New node certificates from the new CA, one member at a time.
    for id in &ids {
        tls::rotate_node(&ca, &format!("n{id}"), &[], &tls_of(*id), false)?;
    }
    phase("new node certificates", 2).await?;
    // 3. The old CA retired everywhere.
    assert_eq!(tls::rotate_ca(&ca, "local", true)?, 1);
    for id in &ids {
        tls::rotate_node(&ca, &format!("n{id}"), &[], &tls_of(*id), true)?;
    }
    phase("the old CA retired", 3).await?;

    // A certificate from the retired CA is refused by every member; a
    // member's new one is accepted.
    let ask = |dir: std::path::PathBuf, addr: String| async move {
        let tls = NodeTls::load(&dir)?;
        let mut c =
            trine_control::network::client(&addr, &tls.client()).map_err(anyhow::Error::msg)?;
        anyhow::Ok(
            c.read_index(trine_proto::v1::ReadIndexRequest::default())
                .await,
        )
    };
    for id in &ids {
        let addr = cluster.addr(*id).context("address")?;
        let old = ask(old_client.clone(), addr.clone()).await?;
        let e = old.expect_err("a certificate from the retired CA was accepted");
        assert!(e.message().contains("certificate"), "{e:?}");
        let new = ask(tls_of(ids[0]), addr).await?;
        assert!(new.is_ok(), "a new certificate was refused: {new:?}");
    }
    let height = cluster.chains_agree()?;
    assert!(height >= 4);
    Ok(())
}

/// Cuts `alone` off from everyone else, both ways.
fn partition(cluster: &LocalCluster, alone: u64) {
    let others: Vec<u64> = cluster
        .nodes
        .keys()
        .copied()
        .filter(|id| *id != alone)
        .collect();
    for (id, c) in &cluster.nodes {
        if *id == alone {
            c.faults().isolate(others.clone());
        } else {
            c.faults().isolate([alone]);
        }
    }
}

/// Cuts the leader off from the rest (both ways) and waits until the
/// majority has elected a successor and committed: (old leader, the
/// majority's members, the index of that commit).
async fn cut_off_the_leader(cluster: &LocalCluster) -> Result<(u64, Vec<&ControlPlane>, u64)> {
    let old = cluster.leader().context("a leader")?;
    partition(cluster, old);
    let majority: Vec<&ControlPlane> = cluster
        .nodes
        .iter()
        .filter(|(id, _)| **id != old)
        .map(|(_, c)| c)
        .collect();
    let committed = wait_for(
        "a commit on the majority side",
        Duration::from_secs(15),
        async || note(majority[0], "majority").await.ok(),
    )
    .await?;
    Ok((old, majority, committed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_partition_commits_nothing_and_chains_agree_after_healing() -> Result<()> {
    let cluster = cluster(&["a", "b", "c"]).await?;
    note(cluster.any().context("a member")?, "before").await?;
    let leader = cluster.leader().context("a leader")?;
    let before = cluster.nodes[&leader].status().last_log_index;
    // The majority elects a new leader and commits.
    let (old, majority, committed) = cut_off_the_leader(&cluster).await?;
    ensure!(old == leader);
    let old_leader = &cluster.nodes[&old];
    // The isolated old leader cannot commit: its write times out, and its
    // applied index stays where it was when it was cut off.
    let applied_before = old_leader.status().applied;
    let minority_write = tokio::time::timeout(
        Duration::from_secs(3),
        old_leader.propose(
            &old_leader.principal(),
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
    for c in cluster.nodes.values() {
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
                .all(|c| c.status().applied >= last)
                .then_some(())
        },
    )
    .await?;
    assert!(last > committed);
    cluster.chains_agree()?;
    // The minority's write never reached any chain.
    for c in cluster.nodes.values() {
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

/// A leader cut off (or frozen) long enough for the others to elect a
/// successor steps down when it is back and follows the successor: it does
/// not campaign at once as if it had heard no leader for as long as it led
/// (soak seed 70: the woken leader's campaigns unseated its successor).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_that_comes_back_follows_its_successor() -> Result<()> {
    let cluster = cluster(&["a", "b", "c"]).await?;
    note(cluster.any().context("a member")?, "before").await?;
    let (old, majority, _) = cut_off_the_leader(&cluster).await?;
    // Cut off for longer than the fallback's silence limit (twice the
    // longest election timeout and a spread), so the old leader's last
    // contact with another leader is that old when it comes back.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let successor = majority[0].status();
    let (new, term) = (successor.leader.context("a successor")?, successor.term);
    assert_ne!(new, old);
    for c in cluster.nodes.values() {
        c.faults().heal();
    }
    wait_for(
        "the old leader to follow its successor",
        Duration::from_secs(10),
        async || (cluster.nodes[&old].status().leader == Some(new)).then_some(()),
    )
    .await?;
    // Within the fallback's limit: no one campaigns, the successor leads on.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for c in cluster.nodes.values() {
            let st = c.status();
            ensure!(
                st.term == term && st.leader == Some(new),
                "node {} is in term {} with leader {:?}; the successor {new} led term {term} (the old leader {old} campaigned after coming back)",
                st.id,
                st.term,
                st.leader
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_that_leaves_hands_its_seat_to_the_emptiest_region() -> Result<()> {
    let regions = [
        "us-east",
        "us-east",
        "us-west",
        "us-west",
        "eu-central",
        "eu-central",
        "ap-southeast",
    ];
    let cluster = cluster(&regions).await?;
    let any = cluster.any().context("a member")?.clone();
    let status = any.status();
    assert_eq!(status.voters.len(), 5);
    let region = |id: &u64| status.members[id].region.clone();
    // The only voter of its region (not the leader) leaves.
    let leaver = *status
        .voters
        .iter()
        .find(|v| {
            Some(**v) != status.leader
                && status
                    .voters
                    .iter()
                    .filter(|w| region(w) == region(v))
                    .count()
                    == 1
        })
        .context("a voter alone in its region")?;
    let secret = admin(&cluster).await?;
    let through = cluster
        .nodes
        .values()
        .find(|c| c.id() != leaver)
        .context("another member")?;
    through
        .leave(Some(leaver), Some(("token:root", secret)))
        .await?;
    let after = wait_for("the leaver gone", Duration::from_secs(15), async || {
        let s = any.status();
        (!s.members.contains_key(&leaver) && s.voters.len() == 5).then_some(s)
    })
    .await?;
    assert!(!any.reader().state().nodes.contains_key(&leaver));
    let mut per_region = std::collections::BTreeMap::<String, usize>::new();
    for v in &after.voters {
        *per_region
            .entry(after.members[v].region.clone())
            .or_default() += 1;
    }
    assert!(per_region.values().all(|n| *n <= 2), "{per_region:?}");
    // Losing any one region still leaves a quorum (3 of 5).
    assert!(per_region.values().all(|n| 5 - n >= 3), "{per_region:?}");
    assert!(
        per_region.len() >= 3,
        "voters should span 3+ regions: {per_region:?}"
    );
    Ok(())
}

/// With a simulated RTT between regions, every Raft round trip pays it: a
/// commit on the leader waits for one follower's answer (one RTT), and one
/// proposed through a follower also crosses to the leader and back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_region_latency_delays_raft_round_trips() -> Result<()> {
    const RTT: Duration = Duration::from_millis(150);
    let rtt =
        trine_control::network::RttMatrix::new(|a, b| if a == b { Duration::ZERO } else { RTT });
    let c = LocalCluster::start(
        &["a", "b", "c"],
        Tuning {
            heartbeat: Some(Duration::from_millis(300)),
            election_timeout: Some(Duration::from_millis(1500)),
            rtt: Some(rtt),
            ..Tuning::default()
        },
    )
    .await?;
    let leader_id = c.leader().context("a leader")?;
    let leader = c.nodes[&leader_id].clone();
    let follower = c
        .nodes
        .iter()
        .find(|(id, _)| **id != leader_id)
        .map(|(_, n)| n.clone())
        .context("a follower")?;
    for i in 0..3 {
        let t = Instant::now();
        note(&leader, &format!("on the leader {i}")).await?;
        let took = t.elapsed();
        anyhow::ensure!(took >= RTT, "a commit took {took:?}, less than one RTT");
        let t = Instant::now();
        note(&follower, &format!("through a follower {i}")).await?;
        let took = t.elapsed();
        anyhow::ensure!(
            took >= 2 * RTT,
            "a forwarded commit took {took:?}, less than two RTTs"
        );
    }
    for n in c.nodes.values() {
        n.shutdown().await;
    }
    Ok(())
}

/// A member cut off past `down_after` is marked down; once it answers
/// again it stays down until it has answered for `up_after` without a gap
/// (6 s here), so a flapping member does not bounce between up and down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_member_is_marked_up_only_after_answering_steadily() -> Result<()> {
    use trine_control::NodeStatus;
    let cluster = cluster(&["a", "b", "c"]).await?;
    note(cluster.any().context("a member")?, "before").await?;
    let leader = cluster.leader().context("a leader")?;
    let flaky = *cluster
        .nodes
        .keys()
        .find(|id| **id != leader)
        .context("a follower")?;
    let status = |c: &LocalCluster| {
        c.nodes
            .values()
            .filter_map(|n| n.reader().state().nodes.get(&flaky).map(|r| r.status))
            .max()
    };
    for round in 0..2 {
        partition(&cluster, flaky);
        // Longer than down_after (3 s): the leader's view of a steady
        // member restarts from zero.
        tokio::time::sleep(Duration::from_secs(4)).await;
        wait_for(
            "the member marked down",
            Duration::from_secs(15),
            async || (status(&cluster) == Some(NodeStatus::Down)).then_some(()),
        )
        .await?;
        for c in cluster.nodes.values() {
            c.faults().heal();
        }
        let healed = Instant::now();
        if round == 0 {
            // A short return: not long enough to count as up.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            anyhow::ensure!(
                status(&cluster) == Some(NodeStatus::Down),
                "marked up {:?} after answering again",
                healed.elapsed()
            );
        }
    }
    let healed = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    anyhow::ensure!(
        status(&cluster) == Some(NodeStatus::Down),
        "marked up 3 s after answering again"
    );
    wait_for(
        "the member marked up",
        Duration::from_secs(20),
        async || (status(&cluster) == Some(NodeStatus::Up)).then_some(()),
    )
    .await?;
    eprintln!("marked up {:?} after it answered again", healed.elapsed());
    Ok(())
}

/// The leader's placement loop end to end (the test plays the nodes'
/// executors, reporting every placed stage ready): four replicas in four
/// regions; one region's only member is cut off, so its replica doubles up
/// in another region; when the member answers again and is marked up, the
/// leader rebalances one replica back, and nothing else moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_region_gets_its_replica_back_by_rebalancing() -> Result<()> {
    use std::collections::{BTreeMap, BTreeSet};
    use trine_control::{ModelRecord, StageState};
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cluster = LocalCluster::start(
        &["a", "b", "c", "d"],
        Tuning {
            down_after: Duration::from_secs(1),
            rebalance_every: Duration::from_secs(1),
            ..tuning()
        },
    )
    .await?;
    let leader = cluster.leader().context("a leader")?;
    let lead = cluster.nodes[&leader].clone();
    lead.propose(
        "test",
        Command::DeployModel(Box::new(ModelRecord {
            name: "m".into(),
            source: "/m.gguf".into(),
            sha256: "a".repeat(64),
            layers: 4,
            bytes_per_layer: 1 << 20,
            fixed_bytes: 1 << 20,
            stages: 1,
            replicas: 4,
            regions: Vec::new(),
            deployed_ms: 0,
        })),
    )
    .await?;
    // The nodes' executors, played by the test.
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let members: Vec<ControlPlane> = cluster.nodes.values().cloned().collect();
    let reporter = tokio::spawn(async move {
        loop {
            for c in &members {
                let state = c.reader().state();
                for p in state.placements.values() {
                    if p.node == c.id() && p.state != StageState::Ready {
                        let _ = c
                            .propose(
                                &c.principal(),
                                Command::StageReport {
                                    model: p.model.clone(),
                                    replica: p.replica,
                                    stage: p.stage,
                                    node: p.node,
                                    generation: p.generation,
                                    state: StageState::Ready,
                                    detail: String::new(),
                                },
                            )
                            .await;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stopped.wait_for(|s| *s) => return,
            }
        }
    });
    let layout = |c: &ControlPlane| {
        let s = c.reader().state();
        let ready =
            s.placements.len() == 4 && s.placements.values().all(|p| p.state == StageState::Ready);
        let nodes: BTreeMap<u32, u64> =
            s.placements.values().map(|p| (p.replica, p.node)).collect();
        let regions: BTreeSet<String> = s
            .placements
            .values()
            .map(|p| s.nodes[&p.node].region.clone())
            .collect();
        ready.then_some((nodes, regions.len()))
    };
    let (before, regions) = wait_for("4 replicas ready", Duration::from_secs(20), async || {
        layout(&lead)
    })
    .await?;
    anyhow::ensure!(regions == 4, "replicas share regions: {before:?}");

    let victim = *cluster
        .nodes
        .keys()
        .find(|id| **id != leader)
        .context("a follower")?;
    partition(&cluster, victim);
    let (during, regions) = wait_for(
        "the cut-off member's replica ready elsewhere",
        Duration::from_secs(20),
        async || layout(&lead).filter(|(n, _)| !n.values().any(|n| *n == victim)),
    )
    .await?;
    anyhow::ensure!(regions == 3, "{during:?}");
    for c in cluster.nodes.values() {
        c.faults().heal();
    }
    let (after, regions) = wait_for(
        "a replica rebalanced back to the returning member",
        Duration::from_secs(30),
        async || layout(&lead).filter(|(n, _)| n.values().any(|n| *n == victim)),
    )
    .await?;
    anyhow::ensure!(regions == 4, "{after:?}");
    let moved = (0..4u32).filter(|r| during[r] != after[r]).count();
    anyhow::ensure!(
        moved == 1,
        "rebalancing moved {moved} replicas: {during:?} → {after:?}"
    );
    // And it stays: a good layout is not shuffled again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (later, _) = layout(&lead).context("still ready")?;
    anyhow::ensure!(later == after, "moved again: {after:?} → {later:?}");
    let _ = stop.send(true);
    reporter.await?;
    Ok(())
}

/// The serving lease: every member holds one while the cluster is whole; a
/// follower cut off from the rest loses it before `down_after` (when a
/// leader could move its stages) while the others keep theirs; a leader cut
/// off loses its own while the majority elects another; healed, all hold
/// one again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_from_the_majority_loses_its_serving_lease() -> Result<()> {
    let cluster = cluster(&["a", "b", "c"]).await?;
    let down_after = tuning().down_after;
    note(cluster.any().context("a member")?, "start").await?;
    let all_leased = async || {
        cluster
            .nodes
            .values()
            .all(|c| c.fenced().is_none())
            .then_some(())
    };
    wait_for(
        "every member to hold a lease",
        Duration::from_secs(10),
        all_leased,
    )
    .await?;

    let leader = cluster.leader().context("a leader")?;
    let follower = *cluster
        .nodes
        .keys()
        .find(|id| **id != leader)
        .context("a follower")?;
    partition(&cluster, follower);
    let cut = Instant::now();
    let why = wait_for(
        "the cut-off follower to lose its lease",
        Duration::from_secs(10),
        async || cluster.nodes[&follower].fenced(),
    )
    .await?;
    let lost_after = cut.elapsed();
    assert!(
        lost_after < down_after,
        "the follower kept serving {lost_after:?} after the cut, past down_after ({down_after:?}): {why}"
    );
    assert!(why.contains("majority"), "{why}");
    for (id, c) in &cluster.nodes {
        if *id != follower {
            assert_eq!(
                c.fenced(),
                None,
                "node {id} on the majority side lost its lease"
            );
        }
    }
    for c in cluster.nodes.values() {
        c.faults().heal();
    }
    wait_for(
        "every member to hold a lease again",
        Duration::from_secs(10),
        all_leased,
    )
    .await?;

    partition(&cluster, leader);
    let why = wait_for(
        "the cut-off leader to lose its lease",
        Duration::from_secs(10),
        async || cluster.nodes[&leader].fenced(),
    )
    .await?;
    assert!(why.contains("majority"), "{why}");
    wait_for(
        "the majority to elect another leader and hold leases",
        Duration::from_secs(15),
        async || {
            cluster
                .nodes
                .iter()
                .filter(|(id, _)| **id != leader)
                .all(|(_, c)| c.fenced().is_none())
                .then_some(())
        },
    )
    .await?;
    for c in cluster.nodes.values() {
        c.faults().heal();
    }
    wait_for(
        "every member to hold a lease after healing",
        Duration::from_secs(15),
        all_leased,
    )
    .await?;
    Ok(())
}

/// Restarts stopped member `id` from its data dir, once the stopped
/// instance has let go of it (its tasks end just after `stop`).
async fn restart(cluster: &mut LocalCluster, id: u64, at: &trine_control::Member) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match cluster.restart(id, &at.region, &at.addr).await {
            Ok(()) => return Ok(()),
            Err(e)
                if Instant::now() < until
                    && (e.to_string().contains("lock") || e.to_string().contains("in use")) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Copies a directory tree: the test's stand-in for a backup of a stopped
/// node's data dir.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// A three-member cluster whose follower `victim` restarted once after a
/// copy of its data dir was taken, acknowledged `acked` since, and is now
/// stopped with the old copy put back.
struct OldCopy {
    cluster: LocalCluster,
    leader: u64,
    victim: u64,
    other: u64,
    victim_at: trine_control::Member,
    leader_at: trine_control::Member,
    acked: Vec<u64>,
}

async fn member_with_an_old_copy() -> Result<OldCopy> {
    let mut cluster = cluster(&["a", "b", "c"]).await?;
    let leader = cluster.leader().context("a leader")?;
    let victim = follower_of(&cluster, leader)?.id();
    let other = *cluster
        .nodes
        .keys()
        .find(|id| **id != leader && **id != victim)
        .context("a third member")?;
    let members = cluster.nodes[&leader].status().members;
    let (victim_at, leader_at) = (members[&victim].clone(), members[&leader].clone());
    wait_for(
        "every member to vote",
        Duration::from_secs(10),
        async || {
            cluster
                .nodes
                .values()
                .all(|c| c.status().voting)
                .then_some(())
        },
    )
    .await?;
    let first = cluster.nodes[&victim].status().incarnation;
    assert!(first > 0, "no incarnation recorded");
    for i in 0..10 {
        note(&cluster.nodes[&leader], &format!("before the copy {i}")).await?;
    }

    // A clean restart is confirmed and not taken for a restore.
    cluster.stop(victim).await;
    let data = cluster.dir.path().join(format!("n{victim}")).join("raft");
    let copy = cluster.dir.path().join("old-copy");
    copy_tree(&data, &copy)?;
    restart(&mut cluster, victim, &victim_at).await?;
    let c = cluster.nodes[&victim].clone();
    wait_for(
        "the restarted member to record a new incarnation and vote",
        Duration::from_secs(10),
        async || {
            let s = c.status();
            (s.voting && s.incarnation > first).then_some(())
        },
    )
    .await?;
    assert!(!c.status().restored, "a clean restart taken for a restore");

    // Writes it acknowledges, which the old copy lacks.
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.push(note(&cluster.nodes[&leader], &format!("after the copy {i}")).await?);
    }
    let last = *acked.last().context("writes")?;
    wait_for(
        "the member to apply them",
        Duration::from_secs(10),
        async || (c.status().applied >= last).then_some(()),
    )
    .await?;
    drop(c);
    cluster.stop(victim).await;
    std::fs::remove_dir_all(&data)?;
    copy_tree(&copy, &data)?;
    Ok(OldCopy {
        cluster,
        leader,
        victim,
        other,
        victim_at,
        leader_at,
        acked,
    })
}

/// Chaos soak seed 20 (d422203): a member started from an old copy of its
/// data dir had forgotten entries it acknowledged, voted for a leader that
/// lacked one, and an acknowledged write was lost. Now its peers' record of
/// its last start gives it away, and it votes only once it has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_put_back_from_an_old_copy_votes_only_after_catching_up() -> Result<()> {
    let OldCopy {
        mut cluster,
        leader,
        victim,
        other,
        victim_at,
        leader_at,
        acked,
    } = member_with_an_old_copy().await?;
    let last = *acked.last().context("writes")?;
    // The leader down, the other follower has the longer log and
    // campaigns. Without the check the restored member, its log shorter,
    // would vote for it and they would elect a leader.
    cluster.stop(leader).await;
    restart(&mut cluster, victim, &victim_at).await?;
    let c = cluster.nodes[&victim].clone();
    wait_for(
        "the member to find its data dir older than its last start",
        Duration::from_secs(10),
        async || c.status().restored.then_some(()),
    )
    .await?;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(
            cluster
                .nodes
                .values()
                .all(|n| !n.status().state.is_leader()),
            "a leader was elected with the restored member's vote"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !c.status().voting,
        "the restored member votes before catching up"
    );
    assert!(
        cluster.nodes[&other].status().term > 0,
        "the other follower never campaigned"
    );

    // The leader returns; a leader is elected without the restored member,
    // which catches up and then votes again.
    restart(&mut cluster, leader, &leader_at).await?;
    wait_for(
        "the restored member to catch up and vote again",
        Duration::from_secs(20),
        async || {
            let s = c.status();
            (s.voting && s.applied >= last).then_some(())
        },
    )
    .await?;
    let reader = c.reader();
    for i in &acked {
        let b = reader
            .block(*i)
            .map_err(anyhow::Error::msg)?
            .context("an acknowledged write")?;
        assert_eq!(b.txs[0].kind, "note");
    }
    cluster.chains_agree()?;
    Ok(())
}

/// The way back from a lost quorum with only old copies
/// (disaster-recovery.md): `trine node trust-data-dir` marks the copy
/// current, and the member votes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_old_copy_is_marked_trusted_votes_at_once() -> Result<()> {
    let OldCopy {
        mut cluster,
        leader,
        victim,
        victim_at,
        ..
    } = member_with_an_old_copy().await?;
    let data = cluster.dir.path().join(format!("n{victim}")).join("raft");
    trine_control::store::trust_data_dir(&data)?;
    cluster.stop(leader).await;
    restart(&mut cluster, victim, &victim_at).await?;
    let c = cluster.nodes[&victim].clone();
    wait_for(
        "the two survivors to elect a leader",
        Duration::from_secs(15),
        async || cluster.leader().map(|_| ()),
    )
    .await?;
    let s = c.status();
    assert!(s.voting && !s.restored, "{s:?}");
    note(&c, "after the quorum came back").await?;
    cluster.chains_agree()?;
    Ok(())
}
