//! The monitoring files under deploy/ checked by the tools that consume
//! them (Debian's prometheus and prometheus-alertmanager, installed by
//! `.ci/run`): the Prometheus config and rules load, every alert passes its
//! promtool unit tests (fires when it should, quiet when it should not),
//! the Alertmanager config loads, and every alert names a runbook page that
//! exists. (That every metric the rules use is exported by a real node is
//! checked in the serving test, which has a cluster with traffic.)

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
