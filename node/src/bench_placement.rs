//! `trine bench placement`: node death → its stages ready on other nodes.
//! Seven control-plane members in the testnet's four regions run in this
//! process, each with its own placement executor and model store (real
//! sled stores, mutual TLS over loopback gRPC, real model loads through
//! trine-engine). A synthetic model is deployed (2 stages × 3 replicas by
//! default); each round stops a member holding a stage (not the leader),
//! as a crash would, and times, from that moment:
//! detected (the leader commits it down: `--down-after` plus a tick),
//! placed (its stages are assigned elsewhere), ready (every stage reports
//! ready again, the model loaded). The member is then restarted and marked
//! up before the next round.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use tokio::sync::watch;
use trine_control::local::{LocalCluster, Tuning};
use trine_control::{Command, ControlPlane, ModelRecord, NodeStatus, StageState, State};
use trine_engine::synth::{Preset, TernaryType, Weights};

use crate::bench_cmd::{LatencyArg, ProfileArg, percentile};
use crate::executor::Stages;
use crate::model_store::Store;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModelArg {
    /// The tiny synthetic model (a few MiB).
    Tiny,
    /// A synthetic model with BitNet b1.58 2B-4T's shapes (about 1.2 GB
    /// as I2_S; generated once per run, in the temporary directory).
    #[value(name = "2b4t")]
    B2b4t,
}

#[derive(Debug, Args)]
pub struct PlacementArgs {
    #[arg(long, value_enum, default_value = "tiny")]
    pub model: ModelArg,
    #[arg(long, default_value_t = 2)]
    pub stages: u32,
    #[arg(long, default_value_t = 3)]
    pub replicas: u32,
    /// Simulated inter-region RTT on every Raft RPC.
    #[arg(long, value_enum, default_value = "none")]
    pub latency: LatencyArg,
    /// Raft timeouts (use wan with --latency realistic).
    #[arg(long, value_enum, default_value = "lan")]
    pub profile: ProfileArg,
    /// A member unanswered this long is marked down (the node's
    /// --down-after).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub down_after: Duration,
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Print one JSON object instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// One member's placement executor.
struct Executor {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn start_executor(control: &ControlPlane, dir: &std::path::Path) -> Executor {
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(crate::executor::run(
        control.clone(),
        Stages::default(),
        Store::new(dir, None),
        crate::batcher::Batching {
            pool: Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .expect("one compute thread"),
            ),
            max_batch: 1,
            quant_embd: Default::default(),
            weight_layout: Default::default(),
            kernel: None,
        },
        rx,
    ));
    Executor { stop, task }
}

/// Times of one round, from the member's stop.
#[derive(Debug, Clone, Copy)]
struct Round {
    detected: Duration,
    placed: Duration,
    ready: Duration,
    stages: usize,
}

fn all_ready(s: &State, slots: usize, not_on: Option<u64>) -> bool {
    s.placements.len() == slots
        && s.placements
            .values()
            .all(|p| p.state == StageState::Ready && Some(p.node) != not_on)
}

async fn wait(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > limit {
            bail!("{what}: not within {}", humantime::format_duration(limit));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

pub fn run(args: &PlacementArgs) -> Result<()> {
    if args.stages == 0 || args.replicas == 0 || args.rounds == 0 {
        bail!("--stages, --replicas and --rounds must be at least 1");
    }
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("model.gguf");
    let preset = match args.model {
        ModelArg::Tiny => Preset::Tiny,
        ModelArg::B2b4t => Preset::B2b4t,
    };
    eprintln!("generating the synthetic model…");
    Weights::generate(preset, 1)
        .to_gguf(TernaryType::I2S)?
        .write(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    let shape = crate::deploy_cmd::shape(&path)?;
    let sha256 = crate::deploy_cmd::digest(&path, false)?;
    let file_mib = std::fs::metadata(&path)?.len() as f64 / f64::from(1 << 20);
    let record = ModelRecord {
        name: "bench".into(),
        source: path.display().to_string(),
        sha256,
        layers: shape.layers,
        bytes_per_layer: shape.bytes_per_layer,
        fixed_bytes: shape.fixed_bytes,
        stages: args.stages,
        replicas: args.replicas,
        regions: Vec::new(),
        deployed_ms: 0,
    };
    let slots = (args.stages * args.replicas) as usize;

    let runtime = crate::bench_cmd::quiet_runtime()?;
    let rounds = runtime.block_on(async {
        let regions = crate::testnet_cmd::default_node_regions();
        let regions: Vec<&str> = regions.iter().map(String::as_str).collect();
        eprintln!("starting {} members in the testnet's regions…", regions.len());
        let mut cluster = LocalCluster::start(
            &regions,
            Tuning {
                profile: match args.profile {
                    ProfileArg::Lan => trine_control::Profile::Lan,
                    ProfileArg::Wan => trine_control::Profile::Wan,
                },
                rtt: args.latency.rtt(),
                down_after: args.down_after,
                // Rebalancing would move stages between rounds.
                rebalance_every: Duration::from_secs(1 << 30),
                memory_bytes: 16 << 30,
                ..Tuning::default()
            },
        )
        .await?;
        let stores: PathBuf = tmp.path().join("stores");
        let mut executors: BTreeMap<u64, Executor> = cluster
            .nodes
            .iter()
            .map(|(id, c)| (*id, start_executor(c, &stores.join(id.to_string()))))
            .collect();
        // On the leader: a member forwards only its own writes, and a
        // deploy is an admin's.
        let leader = cluster.leader().context("a leader")?;
        cluster.nodes[&leader]
            .propose("bench", Command::DeployModel(Box::new(record)))
            .await?;
        eprintln!("deployed; waiting for {slots} stages to load…");
        let any = cluster.any().context("a member")?.clone();
        wait("every stage ready", Duration::from_secs(300), || {
            all_ready(&any.reader().state(), slots, None)
        })
        .await?;

        let mut rounds = Vec::new();
        for round in 0..args.rounds {
            let leader = cluster.leader().context("no leader")?;
            let state = any.reader().state();
            // The holder of the most stages, lowest id first, not the leader.
            let mut held: BTreeMap<u64, usize> = BTreeMap::new();
            for p in state.placements.values() {
                *held.entry(p.node).or_default() += 1;
            }
            let victim = held
                .iter()
                .filter(|(id, _)| **id != leader)
                .max_by_key(|(id, n)| (**n, std::cmp::Reverse(**id)))
                .map(|(id, n)| (*id, *n))
                .context("no non-leader holds a stage")?;
            let (victim, stages) = victim;
            let region = state.nodes[&victim].region.clone();
            let addr = cluster.addr(victim).context("victim's address")?;
            let watcher = cluster
                .nodes
                .iter()
                .find(|(id, _)| **id != victim)
                .map(|(_, c)| c.clone())
                .context("a survivor")?;

            let t0 = Instant::now();
            if let Some(e) = executors.remove(&victim) {
                let _ = e.stop.send(true);
                let _ = e.task.await;
            }
            cluster.stop(victim).await;
            let limit = Duration::from_secs(300);
            wait("the member marked down", limit, || {
                watcher
                    .reader()
                    .state()
                    .nodes
                    .get(&victim)
                    .is_some_and(|n| n.status == NodeStatus::Down)
            })
            .await?;
            let detected = t0.elapsed();
            wait("its stages placed elsewhere", limit, || {
                let s = watcher.reader().state();
                s.placements.len() == slots && s.placements.values().all(|p| p.node != victim)
            })
            .await?;
            let placed = t0.elapsed();
            wait("every stage ready elsewhere", limit, || {
                all_ready(&watcher.reader().state(), slots, Some(victim))
            })
            .await?;
            let ready = t0.elapsed();
            eprintln!(
                "round {}: n{victim} ({stages} stage(s)) detected {:.0} ms, placed {:.0} ms, ready {:.0} ms",
                round + 1,
                detected.as_secs_f64() * 1e3,
                placed.as_secs_f64() * 1e3,
                ready.as_secs_f64() * 1e3,
            );
            rounds.push(Round {
                detected,
                placed,
                ready,
                stages,
            });

            // Back for the next round.
            cluster.restart(victim, &region, &addr).await?;
            let c = cluster.nodes[&victim].clone();
            executors.insert(victim, start_executor(&c, &stores.join(victim.to_string())));
            wait("the member marked up again", limit, || {
                watcher
                    .reader()
                    .state()
                    .nodes
                    .get(&victim)
                    .is_some_and(|n| n.status == NodeStatus::Up)
            })
            .await?;
        }
        for (_, e) in executors {
            let _ = e.stop.send(true);
            let _ = e.task.await;
        }
        for c in cluster.nodes.values() {
            c.shutdown().await;
        }
        anyhow::Ok(rounds)
    })?;
    runtime.shutdown_timeout(Duration::from_secs(1));

    let sorted = |f: fn(&Round) -> Duration| {
        let mut v: Vec<Duration> = rounds.iter().map(f).collect();
        v.sort_unstable();
        v
    };
    let (detected, placed, ready) = (
        sorted(|r| r.detected),
        sorted(|r| r.placed),
        sorted(|r| r.ready),
    );
    let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
    let model = args
        .model
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default();
    #[allow(clippy::print_stdout)]
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": model, "file_mib": file_mib, "stages": args.stages,
                "replicas": args.replicas, "latency": format!("{:?}", args.latency),
                "profile": format!("{:?}", args.profile),
                "down_after_ms": args.down_after.as_millis() as u64, "rounds": rounds.len(),
                "stages_moved": rounds.iter().map(|r| r.stages).sum::<usize>(),
                "detected_ms": { "p50": ms(percentile(&detected, 0.5)), "max": ms(detected[detected.len() - 1]) },
                "placed_ms": { "p50": ms(percentile(&placed, 0.5)), "max": ms(placed[placed.len() - 1]) },
                "ready_ms": { "p50": ms(percentile(&ready, 0.5)), "max": ms(ready[ready.len() - 1]) },
            })
        );
    } else {
        println!(
            "placement failover ({model}, {file_mib:.1} MiB, {}×{} slots, latency {:?}, {:?} profile, down-after {}, {} rounds): \
             detected p50 {:.0} ms  placed p50 {:.0} ms  ready p50 {:.0} ms (max {:.0} ms)",
            args.stages,
            args.replicas,
            args.latency,
            args.profile,
            humantime::format_duration(args.down_after),
            rounds.len(),
            ms(percentile(&detected, 0.5)),
            ms(percentile(&placed, 0.5)),
            ms(percentile(&ready, 0.5)),
            ms(ready[ready.len() - 1]),
        );
    }
    Ok(())
}
