//! The alerts check: the alert a fault should raise fires in Prometheus
//! (when the fault lasts longer than the rule's `for`), and every alert a
//! fault raised clears once the cluster is whole again.

use crate::check::Check;
use crate::run::FaultRecord;
use crate::schedule::Scenario;
use crate::workload::History;

/// The alert a fault should raise, and the rule's `for` in seconds
/// (deploy/monitoring/alerts.yml).
pub fn expected(scenario: Scenario) -> Option<(&'static str, f64)> {
    match scenario {
        Scenario::RegionKill => Some(("RegionDown", 60.0)),
        Scenario::NodeKill
        | Scenario::LeaderKill
        | Scenario::Pause
        | Scenario::MembershipChange => Some(("NodeDown", 60.0)),
        _ => None,
    }
}

/// Margin for scrapes (2 s) and rule evaluation (2 s) on top of `for`.
const MARGIN_S: f64 = 10.0;

pub fn check(records: &[FaultRecord], h: &History, end_ms: f64) -> Check {
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    for r in records {
        let Some((alert, for_s)) = expected(r.fault.scenario) else {
            continue;
        };
        let held = (r.healed_ms - r.start_ms) / 1000.0;
        let fired = h
            .alerts
            .iter()
            .filter(|a| {
                a.t_ms >= r.start_ms && a.t_ms <= r.recovered_ms.unwrap_or(end_ms) + 5_000.0
            })
            .find(|a| a.firing.iter().any(|f| f == alert));
        if held >= for_s + MARGIN_S {
            match fired {
                Some(a) => notes.push(format!(
                    "fault {}: {alert} fired {:.0} s after it began",
                    r.index + 1,
                    (a.t_ms - r.start_ms) / 1000.0
                )),
                None => problems.push(format!(
                    "fault {} ({}) held {held:.0} s but {alert} never fired",
                    r.index + 1,
                    r.description
                )),
            }
        } else {
            notes.push(format!(
                "fault {}: held {held:.0} s, under {alert}'s for: {for_s:.0}s, so not expected to fire",
                r.index + 1
            ));
        }
    }
    // Whatever fired must have cleared by the end (NodeDown, RegionDown,
    // NoRaftLeader: the ones a healed cluster must drop).
    let last = h.alerts.iter().rev().find(|a| a.t_ms <= end_ms + 60_000.0);
    if let Some(last) = last {
        for stuck in last
            .firing
            .iter()
            .filter(|f| ["NodeDown", "RegionDown", "NoRaftLeader"].contains(&f.as_str()))
        {
            problems.push(format!("{stuck} still firing at the end of the run"));
        }
    }
    if h.alerts.is_empty() {
        problems.push("Prometheus never answered /api/v1/alerts".into());
    }
    Check {
        name: "alerts: each fault's alert fires and clears after healing".into(),
        passed: problems.is_empty(),
        detail: if problems.is_empty() {
            notes.join("; ")
        } else {
            problems.join("; ")
        },
    }
}
