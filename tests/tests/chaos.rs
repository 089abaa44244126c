//! Chaos through the `trine` binary: a short schedule of every scenario
//! against a real loopback testnet (`trine chaos run --scenario all`), its
//! verdicts and report read back; the same seed giving the same schedule;
//! and the fault layer's own boundary (InjectFault is refused unless a node
//! runs with --fault-injection).

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use trine_proto::v1;
use trine_tests::{Node, run, trine};

#[test]
fn a_seed_gives_the_same_schedule_every_time() -> Result<()> {
    let plan = |seed: &str| -> Result<String> {
        let out = run(
            {
                let mut c = trine();
                c.args(["chaos", "plan", "--seed", seed, "--scenario", "all"]);
                c
            },
            Duration::from_secs(30),
        )?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    let a = plan("11")?;
    ensure!(a == plan("11")?, "seed 11 gave two schedules");
    ensure!(a != plan("12")?, "seeds 11 and 12 gave the same schedule");
    let s: serde_json::Value = serde_json::from_str(&a)?;
    ensure!(s["faults"].as_array().map(Vec::len) == Some(14), "{a}");
    // An unknown scenario is refused with the list of known ones.
    let out = run(
        {
            let mut c = trine();
            c.args(["chaos", "plan", "--scenario", "meteor"]);
            c
        },
        Duration::from_secs(30),
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("partition-region"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inject_fault_needs_the_flag_and_an_admin_token() -> Result<()> {
    let raft = trine_tests::free_addr()?;
    let node = Node::start(&["--init", "--raft-addr", &raft]).await?;
    let mut admin = trine_tests::admin_client(&node.grpc_uri()).await?;
    let err = admin
        .inject_fault(v1::InjectFaultRequest {
            clock_skew_ms: 60_000,
            ..Default::default()
        })
        .await
        .expect_err("accepted without --fault-injection");
    ensure!(
        err.code() == tonic::Code::FailedPrecondition
            && err.message().contains("--fault-injection"),
        "{err:?}"
    );

    let raft = trine_tests::free_addr()?;
    let node = Node::start(&["--init", "--raft-addr", &raft, "--fault-injection"]).await?;
    // Without a token: refused before anything else.
    let channel = node.channel().await?;
    let err = v1::admin_client::AdminClient::new(channel)
        .inject_fault(v1::InjectFaultRequest::default())
        .await
        .expect_err("accepted without a token");
    ensure!(err.code() == tonic::Code::Unauthenticated, "{err:?}");
    let mut admin = trine_tests::admin_client(&node.grpc_uri()).await?;
    let got = admin
        .inject_fault(v1::InjectFaultRequest {
            cut_off: vec![42],
            delays: vec![v1::RegionDelay {
                region: "eu-central".into(),
                rtt_ms: 300,
                jitter_ms: 50,
            }],
            clock_skew_ms: 120_000,
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(got.cut_off == [42] && got.delays.len() == 1 && got.clock_skew_ms == 120_000);
    // The skew moves the node's clock: a block it proposes carries it
    // (forward only: block times never go back).
    let height = admin
        .append_note(v1::AppendNoteRequest {
            text: "skewed".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .height;
    let block = admin
        .get_block(v1::GetBlockRequest {
            selector: Some(v1::get_block_request::Selector::Height(height)),
            ..Default::default()
        })
        .await?
        .into_inner();
    let at = block
        .block
        .and_then(|b| b.header)
        .and_then(|h| h.time)
        .context("block without a time")?
        .seconds;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    ensure!(
        (at - now - 120).abs() < 30,
        "block time {at} is not two minutes ahead of now ({now})"
    );
    let bad = admin
        .inject_fault(v1::InjectFaultRequest {
            delays: vec![v1::RegionDelay {
                region: "eu-central".into(),
                rtt_ms: 3_600_000,
                jitter_ms: 0,
            }],
            ..Default::default()
        })
        .await
        .expect_err("an hour of delay accepted");
    ensure!(bad.code() == tonic::Code::InvalidArgument, "{bad:?}");
    // Healing clears everything.
    let healed = admin
        .inject_fault(v1::InjectFaultRequest::default())
        .await?
        .into_inner();
    ensure!(healed.cut_off.is_empty() && healed.delays.is_empty() && healed.clock_skew_ms == 0);
    Ok(())
}

/// Every scenario once, short holds, against a 7-node testnet: every
/// safety and serving check must pass and the cluster must be whole again
/// after each fault; the report must be there.
#[test]
fn every_scenario_runs_against_a_live_testnet_and_passes() -> Result<()> {
    let ports = trine_tests::reserve_ports()?;
    let outcome = every_scenario(&["--base-port", &ports.base.to_string()])?;
    let faults = outcome["faults"].as_array().context("no faults")?;
    ensure!(
        faults.iter().any(|f| f["description"]
            .as_str()
            .unwrap_or_default()
            .contains("SIGSTOP")),
        "the testnet's pause is not a SIGSTOP"
    );
    Ok(())
}

/// The same short schedule against deploy/docker-compose.yml's cluster:
/// Docker's levers (kill, pause, network disconnect, update) on real
/// containers, and the project (containers, volumes, network, images) gone
/// afterwards.
#[test]
fn every_scenario_runs_against_the_compose_cluster_and_passes() -> Result<()> {
    let compose_file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/docker-compose.yml");
    let outcome = every_scenario(&[
        "--target",
        "compose",
        "--compose-file",
        compose_file.to_str().context("path")?,
    ])?;
    let faults = outcome["faults"].as_array().context("no faults")?;
    for lever in [
        "docker kill",
        "docker pause",
        "docker network disconnect",
        "docker update --cpus",
        "docker update --memory",
    ] {
        ensure!(
            faults.iter().any(|f| f["description"]
                .as_str()
                .unwrap_or_default()
                .contains(lever)),
            "no fault was applied by {lever}: {faults:?}"
        );
    }
    // Nothing of the run's project is left behind.
    for kind in ["ps -aq", "volume ls -q", "network ls -q"] {
        let mut args: Vec<&str> = kind.split(' ').collect();
        args.extend(["--filter", "name=trine-chaos-"]);
        let out = std::process::Command::new("docker").args(&args).output()?;
        ensure!(
            out.status.success() && out.stdout.is_empty(),
            "docker {kind}: left behind: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

/// `trine chaos run --scenario all --seed 3 --duration 5s` with `target`
/// args; checks the report and returns it.
fn every_scenario(target: &[&str]) -> Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let report = dir.path().join("report");
    let mut cmd = trine();
    cmd.args([
        "chaos",
        "run",
        "--scenario",
        "all",
        "--seed",
        "3",
        "--duration",
        "5s",
    ])
    .args(target)
    .arg("--report")
    .arg(&report);
    let out = run(cmd, Duration::from_secs(900))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = std::fs::read(report.join("report.json")).with_context(|| {
        format!(
            "no report.json; stdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let outcome: serde_json::Value = serde_json::from_slice(&json)?;
    // Safety, serving and "recovered at all" must hold. How fast each
    // fault was recovered from is a measurement against the goals (the
    // report and CHAOS.md carry it), not a pass/fail of this test: speed
    // belongs to benchmarks, and two shared cores under a seven-node
    // debug cluster make it noisy.
    let checks = outcome["checks"].as_array().context("no checks")?;
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| c["passed"] != true)
        .filter(|c| {
            !c["name"]
                .as_str()
                .unwrap_or_default()
                .starts_with("recovery [")
        })
        .map(|c| format!("{}: {}", c["name"], c["detail"]))
        .collect();
    for kind in ["safety:", "serving:"] {
        ensure!(
            checks
                .iter()
                .filter(|c| c["name"].as_str().unwrap_or_default().starts_with(kind))
                .count()
                >= 3,
            "the report lacks the {kind} checks"
        );
    }
    ensure!(
        checks.iter().any(|c| c["name"]
            .as_str()
            .unwrap_or_default()
            .starts_with("recovery [")),
        "the report measured no recovery"
    );
    ensure!(
        failed.is_empty(),
        "chaos run failed ({}):\n{}\n{stdout}\nlogs in {}",
        out.status,
        failed.join("\n"),
        report.display()
    );
    ensure!(outcome["faults"].as_array().map(Vec::len) == Some(14));
    // Work really happened, through faults: writes acknowledged, requests served.
    ensure!(
        outcome["ops"].as_u64().unwrap_or(0) > 100,
        "{}",
        outcome["ops"]
    );
    for f in ["report.md", "history.json", "timeline.svg"] {
        ensure!(report.join(f).exists(), "{f} missing");
    }
    // Every kind of write the workload makes was made and acknowledged.
    let history: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("history.json"))?)?;
    let ops = history["ops"].as_array().context("history has no ops")?;
    for kind in ["note", "create-token", "revoke-token", "deploy", "undeploy"] {
        ensure!(
            ops.iter().any(|o| o["kind"] == kind && o["ok"] == true),
            "no acknowledged {kind} in the history"
        );
    }
    let svg = std::fs::read_to_string(report.join("timeline.svg"))?;
    ensure!(
        svg.starts_with("<svg") && svg.contains("<circle"),
        "timeline has no points"
    );
    // The schedule in the report is the one the seed gives.
    let plan = run(
        {
            let mut c = trine();
            c.args(["chaos", "plan", "--seed", "3", "--duration", "5s"]);
            c
        },
        Duration::from_secs(30),
    )?;
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout)?;
    ensure!(
        plan == outcome["schedule"],
        "the report's schedule is not seed 3's"
    );
    Ok(outcome)
}
