//! Placement between real `trine` processes: a model deployed on the
//! 7-node, 4-region testnet gets every stage of every replica placed, its
//! replicas in distinct regions. Only one node has the file (in its model
//! store; the deployed source path exists nowhere): the others fetch it
//! from that node over HTTP and check its digest. When a node holding a stage is killed,
//! the leader marks it down and moves that stage (and only that one) to a
//! live node under a higher fencing generation, which loads it. The frozen
//! node then comes back holding its old stage in memory: the generation
//! fences it (it drops the stage, and nothing it says changes the
//! placement), and the leader's recovery histogram counts the move.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use trine_tests::{Testnet, cli_json, deploy, http_get, metric, metric_sum, synth_tiny, wait_for};

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
struct Slot {
    model: String,
    replica: u32,
    stage: u32,
    node: String,
    region: String,
    generation: u64,
    layer_start: u32,
    layer_end: u32,
    state: String,
    detail: String,
}

impl Slot {
    /// The slot without its load state (what placement decides).
    fn assignment(&self) -> (String, u32, u32, String, u64) {
        (
            self.model.clone(),
            self.replica,
            self.stage,
            self.node.clone(),
            self.generation,
        )
    }
}

/// `trine_stage_assigned{model="tiny",stage=…}` summed, on one node.
async fn assigned_on(net: &Testnet, name: &str) -> Option<f64> {
    let http = net.endpoints(name).ok()?.http;
    let (_, text) = http_get(&format!("http://{http}/metrics")).await?;
    Some(metric_sum(
        &text,
        "trine_stage_assigned",
        &["model=\"tiny\""],
    ))
}

fn placement(node: &str) -> Result<Vec<Slot>> {
    cli_json(&["placement", "--node", node, "--linearizable", "-o", "json"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployed_model_is_placed_and_a_frozen_nodes_stage_moves_and_is_fenced() -> Result<()> {
    let mut net = Testnet::start(&[]).await?;
    let dir = tempfile::tempdir()?;
    let model = synth_tiny(dir.path())?;

    // One node holds the file, in its store under the model's digest.
    let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(std::fs::read(
        &model,
    )?));
    let grpc = net.grpc(0);
    let seed = net.status(&grpc)?.first().context("a node")?.name.clone();
    let store = net.data_dir(&seed).join("models");
    std::fs::create_dir_all(&store)?;
    std::fs::copy(&model, store.join(format!("{sha256}.gguf")))?;
    let out = deploy(
        &grpc,
        &model,
        &[
            "--name",
            "tiny",
            "--stages",
            "2",
            "--replicas",
            "3",
            "--source",
            "/nonexistent/tiny.gguf",
        ],
    )?;
    ensure!(String::from_utf8_lossy(&out.stdout).contains("deployed tiny"));

    // Every stage is placed, and each node gets the file (the seed from its
    // store, the others from a peer), loads its stage and reports ready.
    let slots = wait_for("6 slots ready", Duration::from_secs(60), || {
        let grpc = grpc.clone();
        async move {
            placement(&grpc)
                .ok()
                .filter(|s| s.len() == 6 && s.iter().all(|s| s.state == "ready"))
        }
    })
    .await?;
    let regions: BTreeSet<&str> = slots
        .iter()
        .filter(|s| s.stage == 0)
        .map(|s| s.region.as_str())
        .collect();
    ensure!(regions.len() == 3, "replicas share regions: {slots:?}");
    for s in &slots {
        ensure!(
            s.model == "tiny" && s.layer_end == s.layer_start + 1,
            "{s:?}"
        );
        let fetched = s.detail.starts_with("fetched");
        ensure!(
            fetched == (s.node != seed),
            "{s:?}: the seed {seed} loads its own copy, the others fetch"
        );
        let copy = net
            .data_dir(&s.node)
            .join("models")
            .join(format!("{sha256}.gguf"));
        ensure!(
            std::fs::read(&copy)? == std::fs::read(&model)?,
            "{} is not the deployed file",
            copy.display()
        );
    }

    // Kill a node that holds a stage (not the leader, to keep this about
    // placement; leader loss is the cluster test's subject).
    let status = net.status(&grpc)?;
    let leader = status
        .iter()
        .find(|r| r.role == "leader")
        .context("a leader")?
        .name
        .clone();
    let victim = slots
        .iter()
        .map(|s| s.node.clone())
        .find(|n| *n != leader)
        .context("a non-leader holding a stage")?;
    let held = slots.iter().filter(|s| s.node == victim).count();
    let on_victim = assigned_on(&net, &victim).await;
    ensure!(
        on_victim == Some(held as f64),
        "{victim} exports {on_victim:?} assigned stages, holds {held}"
    );
    // Frozen, not killed: it keeps its loaded stage in memory, like a node
    // cut off by a partition, and will come back with it.
    let pid = Pid::from_raw(i32::try_from(net.endpoints(&victim)?.pid)?);
    kill(pid, Signal::SIGSTOP)?;
    let ask = status
        .iter()
        .find(|r| r.name != victim)
        .context("a survivor")?
        .grpc_addr
        .clone();
    let before: BTreeMap<(u32, u32), Slot> = slots
        .iter()
        .map(|s| ((s.replica, s.stage), s.clone()))
        .collect();
    let after = wait_for(
        "the dead node's stage to move and load",
        Duration::from_secs(60),
        || {
            let ask = ask.clone();
            let victim = victim.clone();
            async move {
                placement(&ask).ok().filter(|s| {
                    s.len() == 6 && s.iter().all(|s| s.node != victim && s.state == "ready")
                })
            }
        },
    )
    .await?;
    for s in &after {
        let old = &before[&(s.replica, s.stage)];
        if old.node == victim {
            ensure!(
                s.generation > old.generation,
                "{s:?} kept generation {}",
                old.generation
            );
        } else {
            ensure!(
                s.assignment() == old.assignment(),
                "{old:?} moved to {s:?} though its node lives"
            );
        }
    }

    // The leader timed each move, from the victim's last answer to ready.
    let leader = net
        .status(&ask)?
        .into_iter()
        .find(|r| r.role == "leader")
        .context("a leader")?;
    let http = net.endpoints(&leader.name)?.http;
    let (_, text) = http_get(&format!("http://{http}/metrics"))
        .await
        .context("leader metrics")?;
    let recovered = metric(&text, "trine_stage_recovery_seconds_count").unwrap_or(0.0);
    ensure!(
        recovered >= held as f64,
        "the leader counted {recovered} recoveries for {held} moved stages"
    );

    // The victim comes back with its stale stage: it drops it once it
    // sees the newer generation, and the placement stays as it is.
    kill(pid, Signal::SIGCONT)?;
    wait_for(
        "the returning node to drop its stale stage",
        Duration::from_secs(30),
        || async { assigned_on(&net, &victim).await.filter(|n| *n == 0.0) },
    )
    .await?;
    wait_for(
        "the returning node to be marked up",
        Duration::from_secs(30),
        || async {
            net.status(&ask)
                .ok()?
                .into_iter()
                .find(|r| r.name == victim && r.status == "up")
        },
    )
    .await?;
    let now = placement(&ask)?;
    ensure!(
        now == after,
        "the placement changed after the fenced node returned:\n{after:?}\n{now:?}"
    );
    let stopped = net.stop()?;
    ensure!(
        stopped.success(),
        "testnet exit {stopped}: {}",
        net.stderr()
    );
    Ok(())
}
