//! The Kubernetes manifests and the bare-metal install, each checked by the
//! tool that consumes it, against the binary under test:
//! - deploy/k8s/validate.sh renders the base and every overlay with
//!   `kubectl kustomize`, validates every object against the Kubernetes
//!   schema (strict), checks probes and ports against the node's defaults,
//!   and runs the pods' start script against this binary.
//! - deploy/systemd/check.sh runs install.sh into a scratch root (user,
//!   directories, modes, certificate, enabled unit), `systemd-analyze
//!   verify` and `security --offline` on the unit, starts the installed
//!   node as the service user, and checks that a second run changes nothing
//!   and that --uninstall (--purge) removes what it should.
//!
//! (The compose file runs for real in compose.rs; the monitoring files are
//! checked in monitoring.rs.)

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, ensure};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn run_script(script: &Path) -> Result<String> {
    let out = Command::new("bash")
        .arg(script)
        .env("TRINE_BIN", trine_tests::trine_bin())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{} failed:\n{text}", script.display());
    Ok(text)
}

#[test]
fn kubernetes_overlays_render_and_every_object_validates() -> Result<()> {
    let out = run_script(&deploy().join("k8s/validate.sh"))?;
    for build in [
        "base",
        "overlays/single-region",
        "overlays/multi-region",
        "overlays/gpu",
    ] {
        ensure!(
            out.contains(&format!("ok  {build}:")),
            "{build} was not checked:\n{out}"
        );
    }
    ensure!(
        out.contains("start.sh run"),
        "the pods' start script was not run:\n{out}"
    );
    Ok(())
}

#[test]
fn systemd_install_into_a_scratch_root_verifies_and_uninstalls() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "deploy/systemd/check.sh must run as root (it chowns files inside a scratch root); CI runs as root"
    );
    let out = run_script(&deploy().join("systemd/check.sh"))?;
    ensure!(out.contains("PASSED"), "{out}");
    Ok(())
}
