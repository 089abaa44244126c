//! One chaos run: start the cluster, take the fault-free answers, start the
//! workload, play the schedule (each fault held, healed, and waited out),
//! stop the workload, let the cluster settle, gather its final state, check.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use trine_proto::v1;

use crate::Error;
use crate::check::{self, ChainNotes, Check, FinalChains};
use crate::cluster::{Cluster, ClusterOptions};
use crate::compose::ComposeOptions;
use crate::schedule::{Action, Fault, Schedule};
use crate::workload::{self, History, Recorder, StatusSample};

/// Recovery goals (issue #12), in seconds.
pub const GOAL_NEW_LEADER_S: f64 = 10.0;
pub const GOAL_WRITABLE_S: f64 = 10.0;
pub const GOAL_STAGES_S: f64 = 5.0;
pub const GOAL_CONVERGED_S: f64 = 10.0;

/// What happened to one fault of the schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultRecord {
    pub index: usize,
    pub fault: Fault,
    pub description: String,
    /// Nodes it touched (the leader resolved).
    pub nodes: Vec<String>,
    pub leader_before: String,
    pub start_ms: f64,
    pub healed_ms: f64,
    /// When the cluster was whole again after healing (None: not within the limit).
    pub recovered_ms: Option<f64>,
    /// Seconds from the fault to: a leader other than a faulted node seen by
    /// every unfaulted node; the first acknowledged write begun after it;
    /// every stage slot ready on unfaulted nodes. From healing to every
    /// node caught up with the chain and reporting the same leader.
    pub new_leader_s: Option<f64>,
    pub writable_s: Option<f64>,
    /// Every slot that was on a faulted node assigned elsewhere (the
    /// failover decision), and then every slot ready (the model loaded).
    pub moved_s: Option<f64>,
    pub stages_s: Option<f64>,
    pub converged_s: Option<f64>,
    /// From healing to whole: every node up (after the leader's damping),
    /// one leader, every stage ready.
    pub whole_s: Option<f64>,
    /// The goals it was held to, with a verdict each.
    pub goals: Vec<Check>,
}

/// A whole run's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub seed: u64,
    pub schedule: Schedule,
    pub faults: Vec<FaultRecord>,
    pub baseline: Vec<String>,
    pub checks: Vec<Check>,
    pub nodes: Vec<String>,
    /// Raft node id of each node.
    pub node_ids: BTreeMap<String, u64>,
    pub duration_s: f64,
    pub passed: bool,
    pub ops: usize,
    pub prometheus: bool,
}

/// Options of one run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub exe: PathBuf,
    pub dir: PathBuf,
    pub base_port: u16,
    pub prometheus: bool,
    /// How long to wait for the cluster to be whole after a heal.
    pub settle: Duration,
    /// Some: run against the compose cluster instead of the testnet.
    pub compose: Option<ComposeOptions>,
}

/// Starts the cluster and waits until it is whole; inside `rt` because
/// the nodes' gRPC channels are made (lazily connected) on the way.
fn start(
    rt: &tokio::runtime::Runtime,
    opts: &RunOptions,
    dir: PathBuf,
    small_disks: bool,
) -> Result<Cluster, Error> {
    eprintln!(
        "chaos: starting a {} in {} (fault injection on)…",
        if opts.compose.is_some() {
            "compose cluster"
        } else {
            "testnet"
        },
        dir.display()
    );
    let net = {
        let _runtime = rt.enter();
        Cluster::start(ClusterOptions {
            exe: opts.exe.clone(),
            dir,
            base_port: opts.base_port,
            prometheus: opts.prometheus,
            small_disks,
            compose: opts.compose.clone(),
        })?
    };
    // Every node up, one leader, every stage ready: the state each fault
    // starts from.
    let limit = Duration::from_secs(180);
    let whole_at_start = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if whole(&net, 0).await.1 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        false
    });
    if !whole_at_start {
        return Err(Error::Setup(format!(
            "the cluster was not whole (every node up, one leader, every stage ready) {limit:?} after it started; see its logs in {}",
            net.dir().display()
        )));
    }
    Ok(net)
}

fn fills_disks<'a>(schedules: impl IntoIterator<Item = &'a Schedule>) -> bool {
    schedules
        .into_iter()
        .flat_map(|s| &s.faults)
        .any(|f| matches!(f.action, Action::FillDisk { .. }))
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Runs `schedule` against a testnet started for it (in `<dir>/cluster`).
/// Progress goes to stderr.
pub fn run(opts: &RunOptions, schedule: Schedule) -> Result<(Outcome, History), Error> {
    let rt = runtime()?;
    let mut net = start(
        &rt,
        opts,
        opts.dir.join("cluster"),
        fills_disks([&schedule]),
    )?;
    let result = rt.block_on(async {
        tokio::select! {
            r = play(&mut net, opts, schedule) => r,
            () = interrupted() => Err(Error::Setup(INTERRUPTED.into())),
        }
    });
    net.stop();
    result
}

const INTERRUPTED: &str =
    "interrupted (SIGINT or SIGTERM): the cluster was stopped and its faults lifted";

/// Resolves on SIGINT or SIGTERM, so that a run stopped by hand still
/// lifts its faults (frozen nodes, cgroups, mounts) and stops its cluster.
async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Where a soak keeps a failing schedule's report and node logs.
pub fn schedule_dir(soak: &std::path::Path, seed: u64) -> PathBuf {
    soak.join(format!("seed-{seed}"))
}

/// Runs each schedule in turn on one testnet, whole between schedules; a
/// schedule that leaves it broken (not whole again in time) gets the next
/// one a fresh testnet. `each` sees every result as it comes.
pub fn soak(
    opts: &RunOptions,
    schedules: Vec<Schedule>,
    mut each: impl FnMut(u64, Result<(Outcome, History), Error>) -> Result<(), Error>,
) -> Result<(), Error> {
    let rt = runtime()?;
    let small_disks = fills_disks(&schedules);
    let mut generation = 0;
    let mut net: Option<Cluster> = None;
    for schedule in schedules {
        if net.is_none() {
            generation += 1;
            net = Some(start(
                &rt,
                opts,
                opts.dir.join(format!("cluster-{generation}")),
                small_disks,
            )?);
        }
        let seed = schedule.seed;
        let result = rt.block_on(async {
            tokio::select! {
                r = play(net.as_mut().expect("started"), opts, schedule) => r,
                () = interrupted() => Err(Error::Setup(INTERRUPTED.into())),
            }
        });
        let stop = matches!(&result, Err(Error::Setup(m)) if m == INTERRUPTED);
        // A failing schedule keeps its nodes' logs beside its report
        // (`seed-N/logs`), before the cluster runs on or is stopped.
        if matches!(&result, Ok((o, _)) if !o.passed)
            && let Some(n) = net.as_ref()
        {
            let to = schedule_dir(&opts.dir, seed).join("logs");
            if let Err(e) = n.save_logs(&to) {
                eprintln!("chaos: could not keep seed {seed}'s node logs: {e}");
            }
        }
        let broken = match &result {
            Ok((o, _)) => o
                .checks
                .iter()
                .any(|c| c.name.starts_with("run:") && !c.passed),
            Err(_) => true,
        };
        if broken && let Some(mut n) = net.take() {
            n.stop();
        }
        each(seed, result)?;
        if stop {
            break;
        }
    }
    if let Some(mut n) = net {
        n.stop();
    }
    Ok(())
}

async fn play(
    net: &mut Cluster,
    opts: &RunOptions,
    schedule: Schedule,
) -> Result<(Outcome, History), Error> {
    let model = workload::MODEL.to_string();
    // Notes of this run are above the chain's height now.
    let from_height = {
        let mut h = 0;
        for n in &net.nodes {
            if let Some(s) = workload::status_of(n).await {
                h = h.max(s.chain_height);
            }
        }
        h
    };
    let tag = format!("{:016x}", rand::random::<u64>());
    // The fault-free answers.
    let mut baseline = Vec::new();
    for p in 0..workload::PROMPTS.len() {
        let mut last = None;
        for attempt in 0..5 {
            let node = &net.nodes[attempt % net.nodes.len()];
            match workload::generate(node, &model, p, format!("{tag}-base{p}-{attempt}")).await {
                Ok((t, _)) => {
                    last = Some(Ok(t));
                    break;
                }
                Err(e) => last = Some(Err(e)),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        match last {
            Some(Ok(t)) => baseline.push(t),
            Some(Err(e)) => {
                return Err(Error::Setup(format!(
                    "the fault-free request for prompt {p} failed: {} ({:?})",
                    e.message(),
                    e.code()
                )));
            }
            None => return Err(Error::Setup("no fault-free answer".into())),
        }
    }
    eprintln!("chaos: fault-free answers taken; workload starting");
    let rec = Recorder::new();
    let target = workload::Target {
        nodes: net.nodes.clone(),
        model: model.clone(),
        prometheus: net.prometheus.clone(),
        tag: tag.clone(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let load = tokio::spawn(workload::run(target.clone(), rec.clone(), stop_rx));
    let mut records = Vec::new();
    let mut error = None;
    for (i, fault) in schedule.faults.iter().enumerate() {
        tokio::time::sleep(fault.after).await;
        match one_fault(net, &rec, opts, i, fault).await {
            Ok(r) => {
                eprintln!(
                    "chaos: [{}/{}] {} — {}: {}",
                    i + 1,
                    schedule.faults.len(),
                    fault.scenario.name(),
                    r.description,
                    match r.recovered_ms {
                        Some(t) => format!(
                            "whole again {:.1} s after healing",
                            (t - r.healed_ms) / 1000.0
                        ),
                        None => format!("NOT whole again {:?} after healing", opts.settle),
                    }
                );
                let whole = r.recovered_ms.is_some();
                records.push(r);
                if !whole {
                    error = Some(format!(
                        "the cluster was not whole {:?} after fault {} was healed; later faults skipped",
                        opts.settle,
                        i + 1
                    ));
                    break;
                }
            }
            Err(e) => {
                error = Some(format!("fault {} could not be applied: {e}", i + 1));
                break;
            }
        }
    }
    // A quiet tail, then stop the workload and let the chain settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    let _ = load.await;
    let end_ms = rec.now_ms();
    let settled = settle(net, Duration::from_secs(30)).await;
    let history = rec.snapshot();
    let mut checks = Vec::new();
    if let Some(e) = &error {
        checks.push(Check {
            name: "run: every fault applied and recovered from".into(),
            passed: false,
            detail: e.clone(),
        });
    }
    if !settled {
        checks.push(Check {
            name: "run: the chains settled after the workload stopped".into(),
            passed: false,
            detail: "nodes still disagreed on the chain head 30 s after the workload stopped"
                .into(),
        });
    }
    // Recovery times, from the whole history (writes begun during a fault
    // may end long after it healed).
    let all: Vec<String> = net.nodes.iter().map(|n| n.name.clone()).collect();
    for r in &mut records {
        // The nodes the fault took down (a drained node stays up and may
        // lead).
        let down: &[String] = match r.fault.action {
            Action::DrainKillLeader { .. } => &r.nodes[..1],
            _ => &r.nodes,
        };
        let faulted: BTreeSet<u64> = net
            .nodes
            .iter()
            .filter(|n| down.contains(&n.name))
            .map(|n| n.id)
            .collect();
        measure(r, &history, &faulted, &all);
    }
    let chain = chain_notes(net, from_height).await;
    checks.push(check::acked_writes(&history.ops, &chain));
    let finals = final_chains(net).await;
    checks.push(check::chains_agree(
        &finals,
        net.nodes.len() - net.down.len(),
    ));
    checks.push(check::one_leader_per_term(&history));
    checks.push(check::linearizable_reads(&history.ops));
    checks.push(check::final_tokens(
        &history.ops,
        &final_tokens(net).await,
        &tag,
    ));
    checks.push(check::final_models(
        &history.ops,
        &final_models(net, &tag).await,
    ));
    undeploy_ours(net, &tag).await;
    let outages: Vec<check::Outage> = records
        .iter()
        .filter(|r| {
            matches!(
                r.fault.action,
                Action::Kill { .. }
                    | Action::KillLeader
                    | Action::KillStageHolder { .. }
                    | Action::Pause { .. }
                    | Action::MemoryLimit { .. }
                    | Action::FillDisk { .. }
                    | Action::StaleRestart { .. }
                    | Action::DrainKillLeader { .. }
            )
        })
        .flat_map(|r| {
            r.nodes.iter().map(|n| check::Outage {
                node: n.clone(),
                start_ms: r.start_ms,
                end_ms: r.healed_ms,
            })
        })
        .collect();
    checks.extend(check::serving(&history.ops, &baseline, &outages));
    checks.push(check::fenced_stages(&history.ops, &history.stages));
    let mut restores: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        if let Action::StaleRestart { node } = &r.fault.action {
            *restores.entry(node.clone()).or_default() += 1;
        }
    }
    if !restores.is_empty() {
        let logs = restores
            .keys()
            .map(|n| (n.clone(), net.restart_logs(n)))
            .collect();
        checks.push(check::restores_found(&restores, &logs));
    }
    if net.prometheus.is_some() {
        checks.push(crate::alerts::check(&records, &history, end_ms));
    }
    for r in &records {
        checks.extend(r.goals.iter().cloned());
    }
    let passed = checks.iter().all(|c| c.passed);
    Ok((
        Outcome {
            seed: schedule.seed,
            schedule,
            faults: records,
            baseline,
            checks,
            nodes: net.nodes.iter().map(|n| n.name.clone()).collect(),
            node_ids: net.nodes.iter().map(|n| (n.name.clone(), n.id)).collect(),
            duration_s: end_ms / 1000.0,
            passed,
            ops: history.ops.len(),
            prometheus: net.prometheus.is_some(),
        },
        history,
    ))
}

async fn leader_name(net: &Cluster) -> Option<String> {
    for n in &net.nodes {
        if let Some(s) = workload::status_of(n).await
            && s.leader_id != 0
        {
            return net
                .nodes
                .iter()
                .find(|n| n.id == s.leader_id)
                .map(|n| n.name.clone());
        }
    }
    None
}

/// Applies, holds, heals one fault and waits for the cluster to be whole.
async fn one_fault(
    net: &mut Cluster,
    rec: &Recorder,
    opts: &RunOptions,
    index: usize,
    fault: &Fault,
) -> Result<FaultRecord, Error> {
    let leader_before = leader_name(net).await.unwrap_or_default();
    let nodes: Vec<String> = match &fault.action {
        Action::Kill { nodes } => nodes.clone(),
        Action::KillLeader => vec![leader_before.clone()],
        Action::KillStageHolder { pick } => {
            let on = workload::stages(&net.nodes, workload::MODEL)
                .await
                .map(|s| s.on)
                .unwrap_or_default();
            let mut holders: Vec<String> = net
                .nodes
                .iter()
                .filter(|n| on.contains(&n.id))
                .map(|n| n.name.clone())
                .collect();
            holders.sort();
            if holders.is_empty() {
                return Err(Error::Setup(
                    "no node serves a stage of the model (see `trine placement` on the report's cluster)".into(),
                ));
            }
            vec![holders[*pick as usize % holders.len()].clone()]
        }
        Action::Pause { node }
        | Action::ClockSkew { node, .. }
        | Action::CpuLimit { node, .. }
        | Action::MemoryLimit { node, .. }
        | Action::FillDisk { node }
        | Action::StaleRestart { node } => vec![node.clone()],
        Action::Partition { side, .. } => side.clone(),
        Action::DrainKillLeader { pick, .. } => {
            // Voters other than the leader, and other than the first node
            // (started with --init: it has no join addresses to come back
            // through once drained).
            let voters = voters(net).await;
            let first = net.nodes.first().map(|n| n.name.clone());
            let mut candidates: Vec<String> = net
                .nodes
                .iter()
                .filter(|n| {
                    voters.contains(&n.id)
                        && n.name != leader_before
                        && Some(&n.name) != first.as_ref()
                })
                .map(|n| n.name.clone())
                .collect();
            candidates.sort();
            if candidates.is_empty() {
                return Err(Error::Setup(
                    "no voter to drain besides the leader and the first node".into(),
                ));
            }
            vec![
                leader_before.clone(),
                candidates[*pick as usize % candidates.len()].clone(),
            ]
        }
        Action::Latency { a, b, .. } => net
            .nodes
            .iter()
            .filter(|n| &n.region == a || &n.region == b)
            .map(|n| n.name.clone())
            .collect(),
    };
    if nodes.iter().any(String::is_empty) {
        return Err(Error::Setup(
            "no node named a leader when the fault began (is the cluster electing?); rerun, or see the nodes' logs in the report's cluster/".into(),
        ));
    }
    let description = match &fault.action {
        Action::KillLeader => format!("kill -9 the leader ({leader_before})"),
        Action::KillStageHolder { .. } => format!("kill -9 {}, serving a stage", nodes.join(", ")),
        Action::DrainKillLeader { delay_ms, .. } => format!(
            "drain {}, kill -9 the leader ({}) {delay_ms} ms into the change",
            nodes[1], nodes[0]
        ),
        _ => fault.describe(),
    };
    let description = format!(
        "{description} (by {})",
        lever(&fault.action, net.is_compose())
    );
    let start_ms = rec.now_ms();
    apply(net, &fault.action, &nodes, true).await?;
    tokio::time::sleep(fault.hold).await;
    apply(net, &fault.action, &nodes, false).await?;
    let healed_ms = rec.now_ms();
    // Heights every node must reach: the highest any node had at healing.
    let target_height = rec.history.lock().map_or(0, |h| {
        h.status
            .iter()
            .filter(|s| s.t_ms <= healed_ms)
            .map(|s| s.chain_height)
            .max()
            .unwrap_or(0)
    });
    let deadline = tokio::time::Instant::now() + opts.settle;
    let mut recovered_ms = None;
    let mut caught_up_ms = None;
    // A node a resource fault made exit (a full disk stops it; the kernel
    // kills one over its memory cap) may take a while to go: the run acts
    // as its supervisor, as systemd or Kubernetes would, and starts it
    // again once it is gone.
    let may_die = matches!(
        fault.action,
        Action::FillDisk { .. } | Action::MemoryLimit { .. }
    );
    while tokio::time::Instant::now() < deadline {
        if may_die {
            for n in &nodes {
                net.restart_if_dead(n)?;
            }
        }
        let (caught_up, is_whole) = whole(net, target_height).await;
        if caught_up && caught_up_ms.is_none() {
            caught_up_ms = Some(rec.now_ms());
        }
        if is_whole {
            recovered_ms = Some(rec.now_ms());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let r = FaultRecord {
        index,
        fault: fault.clone(),
        description,
        nodes: nodes.clone(),
        leader_before: leader_before.clone(),
        start_ms,
        healed_ms,
        recovered_ms,
        new_leader_s: None,
        writable_s: None,
        moved_s: None,
        stages_s: None,
        converged_s: caught_up_ms.map(|t| (t - healed_ms) / 1000.0),
        whole_s: recovered_ms.map(|t| (t - healed_ms) / 1000.0),
        goals: Vec::new(),
    };
    Ok(r)
}

/// Fills in the recovery times and judges them against the goals.
fn measure(r: &mut FaultRecord, h: &History, faulted: &BTreeSet<u64>, all: &[String]) {
    let cuts_service = matches!(
        r.fault.action,
        Action::Kill { .. }
            | Action::KillLeader
            | Action::KillStageHolder { .. }
            | Action::DrainKillLeader { .. }
            | Action::Pause { .. }
            | Action::Partition { .. }
    );
    let (start, healed) = (r.start_ms, r.healed_ms);
    let leader_hit = r.nodes.contains(&r.leader_before);
    // New leader: the first moment every unfaulted node names the same
    // leader, not a faulted one.
    if cuts_service && leader_hit {
        let others: Vec<&String> = all.iter().filter(|n| !r.nodes.contains(n)).collect();
        let mut latest: BTreeMap<&str, &StatusSample> = BTreeMap::new();
        for s in h
            .status
            .iter()
            .filter(|s| s.t_ms >= start && s.t_ms <= healed)
        {
            latest.insert(&s.node, s);
            let leaders: BTreeSet<u64> = others
                .iter()
                .filter_map(|n| latest.get(n.as_str()).map(|s| s.leader_id))
                .collect();
            if leaders.len() == 1
                && others.iter().all(|n| latest.contains_key(n.as_str()))
                && let Some(&l) = leaders.iter().next()
                && l != 0
                && !faulted.contains(&l)
            {
                r.new_leader_s = Some((s.t_ms - start) / 1000.0);
                break;
            }
        }
    }
    r.writable_s = h
        .ops
        .iter()
        .filter(|o| o.kind == workload::OpKind::Note && o.ok && o.start_ms >= start)
        .map(|o| (o.end_ms - start) / 1000.0)
        .reduce(f64::min);
    // Stages: slots that were on faulted nodes, ready elsewhere.
    let killed = matches!(
        r.fault.action,
        Action::Kill { .. }
            | Action::KillLeader
            | Action::KillStageHolder { .. }
            | Action::DrainKillLeader { .. }
    );
    let held = h
        .stages
        .iter()
        .rev()
        .find(|s| s.t_ms <= start)
        .is_some_and(|s| s.on.iter().any(|n| faulted.contains(n)));
    if killed && held {
        let after = |s: &&workload::StageSample| {
            s.t_ms > start && s.t_ms <= healed && !s.on.iter().any(|n| faulted.contains(n))
        };
        r.moved_s = h
            .stages
            .iter()
            .find(after)
            .map(|s| (s.t_ms - start) / 1000.0);
        r.stages_s = h
            .stages
            .iter()
            .filter(after)
            .find(|s| s.ready == s.total)
            .map(|s| (s.t_ms - start) / 1000.0);
    }
    let mut goal = |name: String, got: Option<f64>, limit: f64, applies: bool| {
        if !applies {
            return;
        }
        r.goals.push(Check {
            passed: got.is_some_and(|g| g <= limit),
            detail: match got {
                Some(g) => format!("{g:.1} s (goal < {limit:.0} s)"),
                None => format!("not reached in time (goal < {limit:.0} s)"),
            },
            name,
        });
    };
    let label = format!("recovery [{}] {}", r.index + 1, r.fault.scenario.name());
    // A fault healed before an election could finish needs no new leader
    // (the old one resumes); judged only when one was found or the fault
    // held longer than the goal.
    let held_s = (healed - start) / 1000.0;
    goal(
        format!("{label}: new leader"),
        r.new_leader_s,
        GOAL_NEW_LEADER_S,
        cuts_service && leader_hit && (r.new_leader_s.is_some() || held_s >= GOAL_NEW_LEADER_S),
    );
    goal(
        format!("{label}: writable"),
        r.writable_s,
        GOAL_WRITABLE_S,
        true,
    );
    // "Ready elsewhere < 5 s plus model load": the move itself is held
    // to 5 s; the load after it is reported beside it.
    // Judged, as the new leader is, when it happened or the fault held
    // long enough that it should have (a node back before `down_after`
    // plus a planning step keeps its stages). When the leader died too,
    // the clock starts when a new one is in place: placement is the
    // leader's job, and the election has its own goal above.
    let decided_at = if cuts_service && leader_hit {
        r.new_leader_s
    } else {
        Some(0.0)
    };
    let moved_after = match (r.moved_s, decided_at) {
        (Some(m), Some(d)) => Some((m - d).max(0.0)),
        _ => None,
    };
    goal(
        if decided_at == Some(0.0) {
            format!("{label}: stages moved elsewhere")
        } else {
            format!("{label}: stages moved elsewhere once a new leader was in place")
        },
        moved_after,
        GOAL_STAGES_S,
        killed
            && held
            && (moved_after.is_some() || decided_at.is_some_and(|d| held_s >= d + GOAL_STAGES_S)),
    );
    goal(
        format!("{label}: chains caught up after healing"),
        r.converged_s,
        GOAL_CONVERGED_S,
        true,
    );
}

/// How [`apply`] puts the fault on, for the report.
pub fn lever(action: &Action, compose: bool) -> &'static str {
    match (action, compose) {
        (Action::Kill { .. } | Action::KillLeader | Action::KillStageHolder { .. }, false) => {
            "SIGKILL; restarted with its command line"
        }
        (Action::Kill { .. } | Action::KillLeader | Action::KillStageHolder { .. }, true) => {
            "docker kill -s KILL; docker start"
        }
        (Action::Pause { .. }, false) => "SIGSTOP; SIGCONT",
        (Action::Pause { .. }, true) => "docker pause; unpause",
        (Action::Partition { one_way: false, .. }, true) => "docker network disconnect; connect",
        (Action::Partition { .. } | Action::Latency { .. } | Action::ClockSkew { .. }, _) => {
            "the nodes' fault layer"
        }
        (Action::CpuLimit { .. }, false) => "a cgroup CPU quota",
        (Action::CpuLimit { .. }, true) => "docker update --cpus",
        (Action::MemoryLimit { .. }, false) => "a memory cgroup",
        (Action::MemoryLimit { .. }, true) => "docker update --memory",
        (Action::FillDisk { .. }, _) => "a ballast on the node's own 256 MiB tmpfs",
        (Action::StaleRestart { .. }, false) => "kill, copy, restart",
        (Action::StaleRestart { .. }, true) => "docker kill, copy on the host, docker start",
        (Action::DrainKillLeader { .. }, false) => {
            "DrainNode, SIGKILL; restart, the drain finished, the drained node restarted to rejoin"
        }
        (Action::DrainKillLeader { .. }, true) => {
            "DrainNode, docker kill; docker start, the drain finished, the drained node restarted to rejoin"
        }
    }
}

/// Puts the fault on (`on`) or heals it.
async fn apply(
    net: &mut Cluster,
    action: &Action,
    nodes: &[String],
    on: bool,
) -> Result<(), Error> {
    match action {
        Action::Kill { .. } | Action::KillLeader | Action::KillStageHolder { .. } => {
            for n in nodes {
                if on {
                    net.kill(n)?;
                } else {
                    net.restart(n)?;
                }
            }
        }
        Action::Pause { node } => net.pause(node, on)?,
        // Two-way, where the cluster has a network of its own to cut.
        Action::Partition { side, one_way } if !*one_way && net.cut_network(side, on)? => {}
        Action::Partition { side, one_way } => {
            let inside: Vec<u64> = net
                .nodes
                .iter()
                .filter(|n| side.contains(&n.name))
                .map(|n| n.id)
                .collect();
            let outside: Vec<u64> = net
                .nodes
                .iter()
                .filter(|n| !side.contains(&n.name))
                .map(|n| n.id)
                .collect();
            for n in net.nodes.clone() {
                let is_in = side.contains(&n.name);
                let cut = match (on, is_in, one_way) {
                    (false, _, _) => Vec::new(),
                    (true, true, _) => outside.clone(),
                    (true, false, false) => inside.clone(),
                    (true, false, true) => continue,
                };
                net.inject(
                    &n.name,
                    v1::InjectFaultRequest {
                        cut_off: cut,
                        ..Default::default()
                    },
                )
                .await?;
            }
        }
        Action::Latency {
            a,
            b,
            rtt_ms,
            jitter_ms,
        } => {
            for n in net.nodes.clone() {
                let other = if &n.region == a {
                    b
                } else if &n.region == b {
                    a
                } else {
                    continue;
                };
                let delays = if on {
                    vec![v1::RegionDelay {
                        region: other.clone(),
                        rtt_ms: *rtt_ms,
                        jitter_ms: *jitter_ms,
                    }]
                } else {
                    Vec::new()
                };
                net.inject(
                    &n.name,
                    v1::InjectFaultRequest {
                        delays,
                        ..Default::default()
                    },
                )
                .await?;
            }
        }
        Action::ClockSkew { node, skew_ms } => {
            net.inject(
                node,
                v1::InjectFaultRequest {
                    clock_skew_ms: if on { *skew_ms } else { 0 },
                    ..Default::default()
                },
            )
            .await?;
        }
        Action::CpuLimit { node, permille } => {
            if on {
                net.limit_cpu(node, *permille)?;
            } else {
                net.unlimit_cpu(node)?;
            }
        }
        Action::MemoryLimit { node, headroom_mb } => {
            if on {
                net.limit_memory(node, *headroom_mb)?;
            } else {
                net.unlimit_memory(node)?;
            }
        }
        Action::FillDisk { node } => {
            if on {
                net.fill_disk(node)?;
            } else {
                net.free_disk(node)?;
            }
        }
        Action::StaleRestart { node } => {
            if on {
                net.snapshot_data(node)?;
            } else {
                net.restore_stale(node)?;
            }
        }
        Action::DrainKillLeader { delay_ms, .. } => {
            let (leader, drained) = (&nodes[0], &nodes[1]);
            let id = net.node(drained)?.id;
            if on {
                // The drain runs on the leader (a joint-consensus change,
                // then the removal) while the leader is killed under it.
                let mut c = net.admin(net.node(leader)?, Duration::from_secs(30))?;
                let name = drained.clone();
                tokio::spawn(async move {
                    let r = c
                        .drain_node(v1::DrainNodeRequest {
                            node_id: id,
                            ..Default::default()
                        })
                        .await;
                    tracing::info!(node = name, outcome = ?r.map(|_| ()), "the drain under the leader kill ended");
                });
                tokio::time::sleep(Duration::from_millis(u64::from(*delay_ms))).await;
                net.kill(leader)?;
            } else {
                net.restart(leader)?;
                finish_drain(net, drained, id).await?;
                // Back as a new member, through its join addresses.
                net.kill(drained)?;
                net.restart(drained)?;
            }
        }
    }
    Ok(())
}

/// Asks the cluster (any live node but `drained`) to drain `drained` until
/// it is done: the operator's retry after the first attempt lost its leader.
/// Draining a node the first attempt already removed succeeds (the state
/// machine's refusals land on the chain; they are not errors).
async fn finish_drain(net: &Cluster, drained: &str, id: u64) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        for n in net
            .nodes
            .iter()
            .filter(|n| n.name != drained && !net.down.contains(&n.name))
        {
            let mut c = n.admin.clone();
            match c
                .drain_node(v1::DrainNodeRequest {
                    node_id: id,
                    ..Default::default()
                })
                .await
            {
                Ok(_) => return Ok(()),
                Err(s) => last = format!("{}: {}", n.name, s.message()),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(Error::Setup(format!(
        "the drain of {drained} could not be finished within 60 s: {last}"
    )))
}

/// The voters' ids, as the first node that answers sees them.
async fn voters(net: &Cluster) -> BTreeSet<u64> {
    for n in &net.nodes {
        if let Some(s) = workload::local_status(n).await {
            return s.voters.into_iter().collect();
        }
    }
    BTreeSet::new()
}

/// (caught up, whole). Caught up: every node answers and has reached
/// `height`. Whole: also every node names the same leader and sees every
/// node up, and every stage slot is ready.
async fn whole(net: &Cluster, height: u64) -> (bool, bool) {
    let mut leaders = BTreeSet::new();
    let mut caught_up = true;
    let mut up = true;
    for n in &net.nodes {
        match workload::status_of(n).await {
            Some(s) => {
                caught_up &= s.chain_height >= height;
                up &= s.leader_id != 0 && s.nodes_up == s.nodes_total;
                leaders.insert(s.leader_id);
            }
            None => return (false, false),
        }
    }
    if !caught_up || !up || leaders.len() != 1 {
        return (caught_up, false);
    }
    let stages = workload::stages(&net.nodes, workload::MODEL)
        .await
        .is_some_and(|s| s.ready == s.total && s.total > 0);
    (true, stages)
}

/// Waits (up to `limit`) until every node reports the same head.
async fn settle(net: &Cluster, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        let mut heads = BTreeSet::new();
        let mut all = true;
        for n in &net.nodes {
            match workload::status_of(n).await {
                Some(s) => {
                    heads.insert((s.chain_height, s.head));
                }
                None => all = false,
            }
        }
        if all && heads.len() == 1 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

/// The note texts on the chain, from `from` up, of the node that holds
/// the most of it.
async fn chain_notes(net: &Cluster, from: u64) -> ChainNotes {
    let mut best: Option<(u64, u64, &crate::cluster::Node)> = None;
    for n in &net.nodes {
        let Ok(mut c) = net.admin(n, Duration::from_secs(30)) else {
            continue;
        };
        if let Ok(v) = c.verify_chain(v1::VerifyChainRequest::default()).await {
            let v = v.into_inner();
            let head = v.head.map_or(0, |h| h.height);
            if best.is_none_or(|(f, h, _)| v.first_height < f || (v.first_height == f && head > h))
            {
                best = Some((v.first_height, head, n));
            }
        }
    }
    let Some((first, head, node)) = best else {
        return ChainNotes::default();
    };
    let mut out = ChainNotes {
        node: node.name.clone(),
        first_height: first,
        notes: Vec::new(),
    };
    let Ok(mut c) = net.admin(node, Duration::from_secs(10)) else {
        return out;
    };
    for height in first.max(from)..=head {
        let Ok(b) = c
            .get_block(v1::GetBlockRequest {
                selector: Some(v1::get_block_request::Selector::Height(height)),
                ..Default::default()
            })
            .await
        else {
            continue;
        };
        for tx in b.into_inner().block.map(|b| b.txs).unwrap_or_default() {
            if tx.kind == "note"
                && tx.rejected.is_empty()
                && let Some(text) = tx.summary.strip_prefix("note: ")
            {
                out.notes.push((height, text.to_owned()));
            }
        }
    }
    out
}

/// Each node's verify verdict and head, and every node's block at the
/// lowest head height.
async fn final_chains(net: &Cluster) -> FinalChains {
    let mut f = FinalChains::default();
    for n in &net.nodes {
        let Ok(mut c) = net.admin(n, Duration::from_secs(30)) else {
            continue;
        };
        if let Ok(v) = c.verify_chain(v1::VerifyChainRequest::default()).await {
            let v = v.into_inner();
            if let Some(h) = &v.head {
                f.heads
                    .insert(n.name.clone(), (h.height, hex::encode(&h.hash)));
            }
            f.verified.insert(n.name.clone(), (v.ok, v.problem));
        }
    }
    f.common_height = f.heads.values().map(|(h, _)| *h).min().unwrap_or(0);
    for n in &net.nodes {
        let Ok(mut c) = net.admin(n, Duration::from_secs(10)) else {
            continue;
        };
        if let Ok(b) = c
            .get_block(v1::GetBlockRequest {
                selector: Some(v1::get_block_request::Selector::Height(f.common_height)),
                ..Default::default()
            })
            .await
            && let Some(h) = b.into_inner().block.and_then(|b| b.header)
        {
            f.at_common.insert(n.name.clone(), hex::encode(h.hash));
        }
    }
    f
}

/// Each node's models of this run (tagged `tag`), read locally.
async fn final_models(net: &Cluster, tag: &str) -> BTreeMap<String, BTreeSet<String>> {
    let prefix = workload::model_prefix(tag);
    let mut out = BTreeMap::new();
    for n in &net.nodes {
        let Ok(mut c) = net.admin(n, Duration::from_secs(10)) else {
            continue;
        };
        if let Ok(p) = c
            .get_placement(v1::GetPlacementRequest {
                consistency: v1::ReadConsistency::Local.into(),
                max_staleness_ms: 3_600_000,
                ..Default::default()
            })
            .await
        {
            out.insert(
                n.name.clone(),
                p.into_inner()
                    .models
                    .into_iter()
                    .map(|m| m.name)
                    .filter(|m| m.starts_with(&prefix))
                    .collect(),
            );
        }
    }
    out
}

/// Undeploys what is left of this run's models (the next run on the same
/// cluster starts without them); best effort, after the checks.
async fn undeploy_ours(net: &Cluster, tag: &str) {
    let left: BTreeSet<String> = final_models(net, tag)
        .await
        .into_values()
        .flatten()
        .collect();
    for name in left {
        for n in &net.nodes {
            let Ok(mut c) = net.admin(n, Duration::from_secs(10)) else {
                continue;
            };
            let r = c
                .undeploy_model(v1::UndeployModelRequest {
                    name: name.clone(),
                    ..Default::default()
                })
                .await;
            if r.is_ok() {
                break;
            }
        }
    }
}

async fn final_tokens(net: &Cluster) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for n in &net.nodes {
        let Ok(mut c) = net.admin(n, Duration::from_secs(10)) else {
            continue;
        };
        if let Ok(l) = c
            .list_tokens(v1::ListTokensRequest {
                consistency: v1::ReadConsistency::Local.into(),
                max_staleness_ms: 3_600_000,
                ..Default::default()
            })
            .await
        {
            out.insert(
                n.name.clone(),
                l.into_inner().tokens.into_iter().map(|t| t.name).collect(),
            );
        }
    }
    out
}
