//! Every metric this crate exports: names (a contract with dashboards,
//! alerts and runbooks), descriptions, and the Prometheus recorder.
//!
//! Names follow ARCHITECTURE.md: prefix `trine_`, base units, `_total` for
//! counters. Process metrics (`process_*`) come from `metrics-process`, in
//! the layout of the official Prometheus clients.

use std::sync::OnceLock;

use metrics::{describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Gauge, always 1: `{version, git_sha, simd}` of the running binary.
pub const BUILD_INFO: &str = "trine_build_info";
/// Gauge: 1 while the node serves, 0 once it has begun shutting down.
pub const NODE_UP: &str = "trine_node_up";
/// Gauge, always 1: `{name, region, zone}` of this node.
pub const NODE_INFO: &str = "trine_node_info";

/// Every name above, for tests and docs that check the contract.
pub const ALL: &[&str] = &[BUILD_INFO, NODE_UP, NODE_INFO];

struct Exporter {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Installs the global recorder (once per process) and describes every
/// metric. Later calls return the same handle, so several nodes may run
/// inside one test process.
pub fn install() -> Metrics {
    let exporter = EXPORTER.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder is installed; the handle then
        // renders nothing, which the e2e test would catch.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        describe();
        let process = metrics_process::Collector::default();
        process.describe();
        Exporter { handle, process }
    });
    Metrics { exporter }
}

fn describe() {
    describe_gauge!(
        BUILD_INFO,
        "Build of the running trine binary (value is always 1)."
    );
    describe_gauge!(
        NODE_UP,
        "1 while the node serves; 0 once it is shutting down."
    );
    describe_gauge!(
        NODE_INFO,
        "Name, region and zone of this node (value is always 1)."
    );
}

/// Access to the installed exporter.
#[derive(Clone, Copy)]
pub struct Metrics {
    exporter: &'static Exporter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Sets the metrics that describe this binary and node.
    pub fn set_identity(&self, name: &str, region: &str, zone: &str) {
        gauge!(
            BUILD_INFO,
            "version" => crate::build::VERSION,
            "git_sha" => crate::build::GIT_SHA,
            "simd" => crate::simd::Level::detect().as_str()
        )
        .set(1.0);
        gauge!(
            NODE_INFO,
            "name" => name.to_owned(),
            "region" => region.to_owned(),
            "zone" => zone.to_owned()
        )
        .set(1.0);
    }

    pub fn set_up(&self, up: bool) {
        gauge!(NODE_UP).set(if up { 1.0 } else { 0.0 });
    }

    /// Prometheus text exposition of every metric, process metrics fresh.
    pub fn render(&self) -> String {
        self.exporter.process.collect();
        self.exporter.handle.run_upkeep();
        self.exporter.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_convention() {
        for name in ALL {
            assert!(name.starts_with("trine_"), "{name}");
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
        }
    }

    #[test]
    fn render_shows_identity_and_process_metrics() {
        let m = install();
        m.set_identity("n1", "us-east", "a");
        m.set_up(true);
        let text = m.render();
        assert!(text.contains("# TYPE trine_build_info gauge"), "{text}");
        assert!(
            text.contains(&format!("git_sha=\"{}\"", crate::build::GIT_SHA)),
            "{text}"
        );
        assert!(
            text.contains("trine_node_info{name=\"n1\",region=\"us-east\",zone=\"a\"} 1"),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        // Every name of the contract is exported with its description.
        for name in ALL {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}: {text}");
        }
    }
}
