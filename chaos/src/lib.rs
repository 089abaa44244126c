//! Trine's chaos runs: seeded fault schedules against a live cluster this
//! crate starts (`trine testnet` on loopback, or the compose cluster in
//! containers; fault injection on), a
//! workload that records every operation, checkers on that history and on
//! the nodes' final state, and a report per run. `trine chaos` is its CLI.
//!
//! - `schedule`: scenarios, and the seeded schedules made of them.
//! - `cluster`: the cluster and the levers faults pull (signals, restarts,
//!   the nodes' InjectFault, cgroup limits); `compose`: the same levers
//!   in Docker (kill, pause, network disconnect, update).
//! - `workload`: admin writes, linearizable reads and inference through
//!   every node, recorded with times; samples of Raft, stages, alerts.
//! - `check`: safety and serving checkers; `alerts`: the Prometheus check.
//! - `run`: one run end to end, with recovery times; `report`: its files.
//!
//! Like the tests, it drives the `trine` binary and the gRPC API, never a
//! node's internals.

pub mod alerts;
pub mod check;
pub mod cluster;
pub mod compose;
pub mod report;
pub mod run;
pub mod schedule;
pub mod workload;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

pub use schedule::{Scenario, Schedule};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Args)]
pub struct ChaosArgs {
    #[command(subcommand)]
    pub command: ChaosCommand,
}

#[derive(Debug, Subcommand)]
pub enum ChaosCommand {
    /// Start a cluster, run a seeded schedule of faults against it under a
    /// workload, check safety, serving and recovery, and write a report.
    /// Exits 1 when a check fails.
    Run(RunArgs),
    /// Run many random seeded schedules one after another on one cluster
    /// (whole again between schedules; a fresh one after a schedule that
    /// leaves it broken), and summarise in soak.md and soak.json in
    /// --report (a failing schedule's full report and every node's log in
    /// seed-N/ beside them).
    Soak(SoakArgs),
    /// Print the schedule a seed gives (as JSON), without running it.
    Plan(PlanArgs),
}

/// Where the cluster runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetKind {
    /// `trine testnet`: seven node processes in four simulated regions on loopback.
    Testnet,
    /// deploy/docker-compose.yml: the same seven nodes in containers on a
    /// Docker network of the run's own (needs Docker Engine with Compose,
    /// and root: node data dirs live on the host).
    Compose,
}

#[derive(Debug, Args)]
pub struct Common {
    /// The cluster to start and break.
    #[arg(long, value_enum, default_value = "testnet")]
    pub target: TargetKind,
    /// How long each fault holds (each drawn within ±25% of it).
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Directory for the report and the cluster's data and logs
    /// [default: ./chaos-report-<seed>].
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// First port of the testnet (it uses base .. base+70, and +90 for Prometheus).
    #[arg(long, default_value_t = 7700)]
    pub base_port: u16,
    /// With --target compose: the compose file to bring up.
    #[arg(long, default_value = "deploy/docker-compose.yml", value_name = "FILE")]
    pub compose_file: PathBuf,
    /// With --target compose: an existing Trine image to run [default:
    /// build one around this `trine` binary with deploy/docker/build-image.sh].
    #[arg(long, value_name = "TAG")]
    pub image: Option<String>,
    /// Also run Prometheus (Debian's `prometheus` on PATH) with Trine's alert
    /// rules and check that each fault's alert fires and clears. Alerts fire
    /// only for faults held longer than the rule's `for` (NodeDown: 1 min).
    #[arg(long)]
    pub alerts: bool,
    /// Longest wait for the cluster to be whole again after a heal.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Scenarios to run in order, comma-separated, or `all`.
    #[arg(long, default_value = "all", value_name = "S,...|all", value_parser = parse_scenarios)]
    pub scenario: ScenarioList,
    /// Draw this many random faults instead, as `soak` does (a soak
    /// schedule replays with its seed and this).
    #[arg(long, value_name = "N", conflicts_with = "scenario")]
    pub random: Option<usize>,
    /// Seed of the schedule's targets and timings; the same seed replays the same schedule.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Number of schedules.
    #[arg(long, default_value_t = 100)]
    pub schedules: u64,
    /// Faults per schedule.
    #[arg(long, default_value_t = 3)]
    pub faults: usize,
    /// Seed of the first schedule; schedule i uses seed + i.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[arg(long, default_value = "all", value_name = "S,...|all", value_parser = parse_scenarios)]
    pub scenario: ScenarioList,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Draw this many random faults instead (as `soak` does).
    #[arg(long)]
    pub random: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct ScenarioList(pub Vec<Scenario>);

fn parse_scenarios(s: &str) -> Result<ScenarioList, String> {
    if s == "all" {
        return Ok(ScenarioList(Scenario::ALL.to_vec()));
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let sc = <Scenario as clap::ValueEnum>::from_str(part, true).map_err(|_| {
            format!(
                "unknown scenario {part:?}; one of: all, {}",
                Scenario::ALL.map(Scenario::name).join(", ")
            )
        })?;
        out.push(sc);
    }
    if out.is_empty() {
        return Err("name at least one scenario, or all".into());
    }
    Ok(ScenarioList(out))
}

/// The layout `trine testnet` starts by default (the schedule's targets).
pub fn default_layout() -> Vec<schedule::Slot> {
    [
        ("us-east", 2),
        ("us-west", 2),
        ("eu-central", 2),
        ("ap-southeast", 1),
    ]
    .into_iter()
    .flat_map(|(r, n)| {
        (1..=n).map(move |k| schedule::Slot {
            name: format!("{r}-{k}"),
            region: r.to_owned(),
        })
    })
    .collect()
}

fn options(exe: PathBuf, c: &Common, dir: PathBuf) -> run::RunOptions {
    run::RunOptions {
        exe,
        dir,
        base_port: c.base_port,
        prometheus: c.alerts,
        settle: c.settle,
        compose: (c.target == TargetKind::Compose).then(|| compose::ComposeOptions {
            file: c.compose_file.clone(),
            image: c.image.clone(),
        }),
    }
}

/// `trine chaos …`; `exe` is the `trine` binary. Returns whether every
/// check passed. (Verdicts and plans go to stdout: they are the command's
/// output; progress goes to stderr.)
#[allow(clippy::print_stdout)]
pub fn main(exe: PathBuf, args: &ChaosArgs) -> Result<bool, Error> {
    match &args.command {
        ChaosCommand::Plan(p) => {
            let layout = default_layout();
            let s = match p.random {
                Some(n) => Schedule::random(p.seed, n, p.duration, &layout),
                None => Schedule::new(p.seed, &p.scenario.0, p.duration, &layout),
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&s).map_err(|e| Error::Setup(e.to_string()))?
            );
            Ok(true)
        }
        ChaosCommand::Run(r) => {
            let dir = r
                .common
                .report
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("chaos-report-{}", r.seed)));
            prepare(&dir)?;
            let schedule = match r.random {
                Some(n) => Schedule::random(r.seed, n, r.common.duration, &default_layout()),
                None => Schedule::new(r.seed, &r.scenario.0, r.common.duration, &default_layout()),
            };
            let (outcome, history) = run::run(&options(exe, &r.common, dir.clone()), schedule)?;
            report::write(&dir, &outcome, &history)?;
            print_summary(&outcome, &dir);
            Ok(outcome.passed)
        }
        ChaosCommand::Soak(s) => soak(exe, s),
    }
}

/// Refuses to mix a new run into an old report's cluster.
fn prepare(dir: &std::path::Path) -> Result<(), Error> {
    if dir.join("cluster").exists() {
        return Err(Error::Setup(format!(
            "{} already holds a run; remove it or pick another --report",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir)?;
    Ok(())
}

#[allow(clippy::print_stdout)]
fn print_summary(o: &run::Outcome, dir: &std::path::Path) {
    for c in &o.checks {
        println!(
            "{} {}: {}",
            if c.passed { "pass" } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    println!(
        "chaos seed {}: {} ({} faults, {} checks); report: {}",
        o.seed,
        if o.passed { "PASSED" } else { "FAILED" },
        o.faults.len(),
        o.checks.len(),
        dir.join("report.md").display()
    );
}

#[allow(clippy::print_stdout)]
fn soak(exe: PathBuf, s: &SoakArgs) -> Result<bool, Error> {
    let dir = s
        .common
        .report
        .clone()
        .unwrap_or_else(|| PathBuf::from("chaos-soak"));
    if dir.join("soak.json").exists() {
        return Err(Error::Setup(format!(
            "{} already holds a soak; remove it or pick another --report",
            dir.display()
        )));
    }
    std::fs::create_dir_all(&dir)?;
    let layout = default_layout();
    let schedules: Vec<Schedule> = (0..s.schedules)
        .map(|i| Schedule::random(s.seed + i, s.faults, s.common.duration, &layout))
        .collect();
    let total = schedules.len();
    let mut rows: Vec<serde_json::Value> = Vec::new();
    let started = std::time::Instant::now();
    run::soak(
        &options(exe, &s.common, dir.clone()),
        schedules,
        |seed, result| {
            let sub = run::schedule_dir(&dir, seed);
            let row = match result {
                Ok((outcome, history)) => {
                    // Full reports only for failures; a line each for the rest.
                    if !outcome.passed {
                        report::write(&sub, &outcome, &history)?;
                    }
                    serde_json::json!({
                        "seed": seed,
                        "passed": outcome.passed,
                        "faults": outcome.faults.iter().map(|f| f.description.clone()).collect::<Vec<_>>(),
                        "failed_checks": outcome.checks.iter().filter(|c| !c.passed).map(|c| format!("{}: {}", c.name, c.detail)).collect::<Vec<_>>(),
                        "ops": outcome.ops,
                        "acked_writes": history.ops.iter().filter(|o| o.kind == workload::OpKind::Note && o.ok).count(),
                        "lost_writes": outcome.checks.iter().any(|c| c.name.starts_with("safety: acknowledged") && !c.passed),
                        // Divergence proper: different hashes, or a chain that
                    // does not verify (not a node that did not answer).
                    "diverged": outcome.checks.iter().any(|c| {
                        c.name.starts_with("safety: every node's chain")
                            && !c.passed
                            && (c.detail.contains("differ") || c.detail.contains("verify failed"))
                    }),
                        "recovery": outcome.faults.iter().map(|f| serde_json::json!({
                            "scenario": f.fault.scenario.name(),
                            "new_leader_s": f.new_leader_s,
                            "writable_s": f.writable_s,
                            "moved_s": f.moved_s,
                            "stages_s": f.stages_s,
                            "converged_s": f.converged_s,
                            "whole_s": f.whole_s,
                        })).collect::<Vec<_>>(),
                    })
                }
                Err(e) => {
                    serde_json::json!({"seed": seed, "passed": false, "error": e.to_string()})
                }
            };
            eprintln!(
                "soak: schedule {}/{total} (seed {seed}): {} — {:.0} s so far",
                rows.len() + 1,
                if row["passed"].as_bool() == Some(true) {
                    "pass"
                } else {
                    "FAIL"
                },
                started.elapsed().as_secs_f64()
            );
            rows.push(row);
            std::fs::write(
                dir.join("soak.json"),
                serde_json::to_vec_pretty(&rows).map_err(|e| Error::Setup(e.to_string()))?,
            )?;
            std::fs::write(
                dir.join("soak.md"),
                soak_markdown(s, &rows, started.elapsed()),
            )?;
            Ok(())
        },
    )?;
    let (passed, lost, diverged) = (
        count(&rows, "passed"),
        count(&rows, "lost_writes"),
        count(&rows, "diverged"),
    );
    println!(
        "soak: {passed}/{total} schedules passed; {lost} with a lost acknowledged write, {diverged} with chain divergence; summary: {}",
        dir.join("soak.md").display()
    );
    Ok(passed == total)
}

/// Schedules whose row has `flag` true.
fn count(rows: &[serde_json::Value], flag: &str) -> usize {
    rows.iter()
        .filter(|r| r[flag].as_bool() == Some(true))
        .count()
}

/// The soak's summary: totals, recovery percentiles per scenario, a row per schedule.
fn soak_markdown(s: &SoakArgs, rows: &[serde_json::Value], took: Duration) -> String {
    let (passed, lost, diverged) = (
        count(rows, "passed"),
        count(rows, "lost_writes"),
        count(rows, "diverged"),
    );
    let acked: u64 = rows.iter().filter_map(|r| r["acked_writes"].as_u64()).sum();
    let mut md = format!(
        "# Chaos soak: {} of {} schedules run, {} random faults each (seeds {}..)\n\n{passed} passed. Acknowledged writes: {acked}; schedules that lost one: {lost}; with chain divergence: {diverged}. {:.0} min.\n\n",
        rows.len(),
        s.schedules,
        s.faults,
        s.seed,
        took.as_secs_f64() / 60.0
    );
    // Recovery per scenario: median and worst of each measure.
    let mut per: std::collections::BTreeMap<String, [Vec<f64>; 6]> = Default::default();
    for r in rows {
        for f in r["recovery"].as_array().into_iter().flatten() {
            let e = per
                .entry(f["scenario"].as_str().unwrap_or("?").to_owned())
                .or_default();
            for (i, k) in [
                "new_leader_s",
                "writable_s",
                "moved_s",
                "stages_s",
                "converged_s",
                "whole_s",
            ]
            .iter()
            .enumerate()
            {
                if let Some(v) = f[*k].as_f64() {
                    e[i].push(v);
                }
            }
        }
    }
    md.push_str("| scenario | faults | new leader s (median / max) | writable s | stages moved s | stages ready s | caught up after heal s | whole after heal s |\n|---|---|---|---|---|---|---|---|\n");
    for (sc, cols) in &mut per {
        let n = rows
            .iter()
            .flat_map(|r| r["recovery"].as_array().into_iter().flatten())
            .filter(|f| f["scenario"].as_str() == Some(sc))
            .count();
        let cell = |v: &mut Vec<f64>| {
            if v.is_empty() {
                return "—".to_owned();
            }
            v.sort_by(f64::total_cmp);
            format!("{:.1} / {:.1}", v[v.len() / 2], v[v.len() - 1])
        };
        let cells: Vec<String> = cols.iter_mut().map(cell).collect();
        md.push_str(&format!("| {sc} | {n} | {} |\n", cells.join(" | ")));
    }
    md.push_str("\n| seed | verdict | faults | failed checks |\n|---|---|---|---|\n");
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r["seed"],
            if r["passed"].as_bool() == Some(true) {
                "pass"
            } else {
                "FAIL"
            },
            r["faults"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(|f| f.as_str())
                    .collect::<Vec<_>>()
                    .join("; "))
                .unwrap_or_default(),
            r.get("error")
                .map_or_else(
                    || r["failed_checks"]
                        .as_array()
                        .map(|a| a
                            .iter()
                            .filter_map(|f| f.as_str())
                            .collect::<Vec<_>>()
                            .join("; "))
                        .unwrap_or_default(),
                    |e| e.to_string()
                )
                .replace('|', "\\|")
        ));
    }
    md
}
