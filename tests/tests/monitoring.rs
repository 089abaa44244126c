//! The monitoring files under deploy/ checked by the tools that consume
//! them (Debian's prometheus and prometheus-alertmanager, installed by
//! `.ci/run`): the Prometheus config and rules load, every alert passes its
//! promtool unit tests (fires when it should, quiet when it should not),
//! the Alertmanager config loads, and every alert names a runbook page that
//! exists. (That every metric the rules use is exported by a real node is
//! checked in the serving test, which has a cluster with traffic.)
//! On a live `trine testnet --prometheus` with traffic: every metric the
//! Grafana dashboards use is exported, every dashboard query returns data,
//! and a killed node fires NodeDown.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail, ensure};

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring")
}

/// Runs `tool args` in deploy/monitoring; fails naming the install step
/// when the tool is missing.
fn check(tool: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(tool)
        .args(args)
        .current_dir(monitoring())
        .output()
        .with_context(|| {
            format!(
                "{tool} is not installed: `bash .ci/run` installs it (Debian: apt-get install prometheus prometheus-alertmanager)"
            )
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{tool} {}:\n{text}", args.join(" "));
    }
    Ok(text)
}

#[test]
fn prometheus_config_and_rules_load_and_every_alert_passes_its_unit_tests() -> Result<()> {
    check("promtool", &["check", "config", "prometheus.yml"])?;
    let rules = check("promtool", &["check", "rules", "alerts.yml"])?;
    ensure!(rules.contains("SUCCESS"), "{rules}");
    let tested = check("promtool", &["test", "rules", "alerts.test.yml"])?;
    ensure!(tested.contains("SUCCESS"), "{tested}");
    check("amtool", &["check-config", "alertmanager.yml"])?;
    Ok(())
}

/// Runs deploy/monitoring/grafana/check_queries.py with `args`.
fn grafana_check(args: &[&str]) -> Result<String> {
    let script = monitoring().join("grafana").join("check_queries.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(args)
        .output()
        .context("python3 is not installed: apt-get install python3")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{} {}:\n{text}{}",
            script.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

#[derive(serde::Deserialize)]
struct Rules {
    groups: Vec<Group>,
}

#[derive(serde::Deserialize)]
struct Group {
    rules: Vec<Rule>,
}

#[derive(serde::Deserialize)]
struct Rule {
    alert: Option<String>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

/// The alerts the deploy issue names, each with a severity, a summary, a
/// description, a runbook page that exists and a unit test.
#[test]
fn every_alert_has_severity_text_a_runbook_and_a_test() -> Result<()> {
    let dir = monitoring();
    let rules: Rules = serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("alerts.yml"))?)?;
    let tests = std::fs::read_to_string(dir.join("alerts.test.yml"))?;
    let alerts: Vec<&Rule> = rules
        .groups
        .iter()
        .flat_map(|g| &g.rules)
        .filter(|r| r.alert.is_some())
        .collect();
    let names: Vec<&str> = alerts.iter().filter_map(|r| r.alert.as_deref()).collect();
    for want in [
        "NodeDown",
        "RegionDown",
        "NoRaftLeader",
        "ChainStalled",
        "NodeOutOfSync",
        "LowPeerCount",
        "HighCrossRegionRTT",
        "HighTimeToFirstToken",
        "HighErrorRate",
        "StageUnassigned",
        "DiskFillingUp",
        "CertificateExpiringSoon",
    ] {
        ensure!(names.contains(&want), "no {want} alert in alerts.yml");
    }
    for r in alerts {
        let name = r.alert.as_deref().unwrap_or_default();
        ensure!(
            matches!(
                r.labels.get("severity").map(String::as_str),
                Some("page" | "ticket")
            ),
            "{name}: severity page or ticket"
        );
        for key in ["summary", "description", "runbook_url"] {
            ensure!(r.annotations.contains_key(key), "{name}: no {key}");
        }
        let page = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(&r.annotations["runbook_url"]);
        ensure!(
            page.exists(),
            "{name}: runbook {} is missing",
            page.display()
        );
        let text = std::fs::read_to_string(&page)?;
        for section in [
            "## What it means",
            "## Impact",
            "## Confirm",
            "## Fix",
            "## Escalate",
        ] {
            ensure!(text.contains(section), "{}: no {section}", page.display());
        }
        ensure!(
            tests.contains(&format!("alertname: {name}")),
            "{name} has no promtool unit test in alerts.test.yml"
        );
    }
    Ok(())
}

/// `trine testnet --prometheus` runs a real Prometheus with these rules
/// scraping every node; SIGKILL one node and NodeDown fires for it within
/// its `for` (1 m) plus two scrape intervals (2 s each) and an evaluation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_fires_node_down_in_the_testnets_prometheus() -> Result<()> {
    use std::time::{Duration, Instant};
    let mut net = trine_tests::Testnet::start_with_model(&["--prometheus"]).await?;
    let out = net.stdout();
    let url = out
        .lines()
        .find_map(|l| l.strip_prefix("prometheus: "))
        .and_then(|l| l.split_whitespace().next())
        .with_context(|| format!("no prometheus line in:\n{out}"))?
        .to_owned();
    let query = |q: &'static str| {
        let url = url.clone();
        async move {
            let v: serde_json::Value = serde_json::from_slice(
                &reqwest::Client::new()
                    .get(format!("{url}/api/v1/query"))
                    .query(&[("query", q)])
                    .send()
                    .await?
                    .bytes()
                    .await?,
            )?;
            anyhow::Ok(v)
        }
    };
    // Every node scraped and up.
    trine_tests::wait_for("7 targets up", Duration::from_secs(30), || async {
        let v = query("sum(up)").await.ok()?;
        (v["data"]["result"][0]["value"][1] == "7").then_some(())
    })
    .await?;
    // Traffic, so the inference panels have data: chat completions through
    // two nodes (one holds a replica, the other forwards).
    for name in ["us-east-1", "us-west-1"] {
        let http = net.endpoints(name)?.http;
        for _ in 0..3 {
            let r = reqwest::Client::new()
                .post(format!("http://{http}/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(r#"{"model":"tiny","messages":[{"role":"user","content":"Hello"}],"max_tokens":8}"#)
                .send()
                .await?;
            ensure!(r.status().is_success(), "{name}: {}", r.status());
        }
    }
    // Every metric a dashboard uses is exported by the running nodes (but
    // the few a node registers only on their first event; see
    // check_queries.py's EVENT_ONLY).
    let mut exported = std::collections::BTreeSet::new();
    for node in [
        "us-east-1",
        "us-east-2",
        "us-west-1",
        "us-west-2",
        "eu-central-1",
        "eu-central-2",
        "ap-southeast-1",
    ] {
        let http = net.endpoints(node)?.http;
        let text = reqwest::get(format!("http://{http}/metrics"))
            .await?
            .text()
            .await?;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            exported.insert(base.to_owned());
            exported.insert(name.to_owned());
        }
    }
    let dashboards = grafana_check(&["--list-metrics", "--skip-event-only"])?;
    let missing: Vec<&str> = dashboards
        .lines()
        .filter(|m| !exported.contains(*m))
        .collect();
    ensure!(
        missing.is_empty(),
        "metrics the dashboards use that no node exports: {missing:?}"
    );
    ensure!(
        dashboards.lines().count() > 20,
        "too few metrics listed:\n{dashboards}"
    );

    let victim = net.endpoints("ap-southeast-1")?;
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(victim.pid)?),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    // While NodeDown's minute runs: every query of every Grafana dashboard
    // returns data from this real Prometheus (the recording rules they use
    // are evaluated every 30 s, hence the wait).
    let checked = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || grafana_check(&["--prometheus", &url, "--wait", "55"]))
            .await??
    };
    ensure!(checked.contains(" ok"), "{checked}");
    let instance = victim.http.to_string();
    let firing = trine_tests::wait_for(
        "NodeDown firing for the killed node",
        Duration::from_secs(60 + 2 * 2 + 10),
        || async {
            let v: serde_json::Value = serde_json::from_slice(
                &reqwest::get(format!("{url}/api/v1/alerts"))
                    .await
                    .ok()?
                    .bytes()
                    .await
                    .ok()?,
            )
            .ok()?;
            v["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|a| {
                    a["labels"]["alertname"] == "NodeDown"
                        && a["labels"]["instance"] == instance.as_str()
                        && a["state"] == "firing"
                })
                .cloned()
        },
    )
    .await?;
    let took = killed.elapsed();
    ensure!(
        took >= Duration::from_secs(60),
        "NodeDown fired after {took:?}, before its 1 m `for`: {firing}"
    );
    ensure!(firing["labels"]["region"] == "ap-southeast", "{firing}");
    // The others stay quiet.
    let v = query("ALERTS{alertname=\"NodeDown\",alertstate=\"firing\"}").await?;
    ensure!(
        v["data"]["result"].as_array().map(Vec::len) == Some(1),
        "NodeDown fired for more than the killed node: {v}"
    );
    let _ = net.stop();
    Ok(())
}
