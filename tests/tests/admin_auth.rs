//! The Admin API's boundary on a real node, through the `trine` binary: a
//! new cluster's first admin token, and every kind of bad token refused
//! with its own error (missing, wrong, revoked, expired, wrongly scoped),
//! the principal of an admin action on the chain, revocation that sticks
//! across a restart with `--init`, and the refusals counted in
//! `trine_auth_refused_total`.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use nix::sys::signal::Signal;
use trine_tests::{Node, admin_secret, chain_note, metric_sum, run, trine, wait_for};

/// `trine ARGS` presenting `token` as the admin token (none at all when
/// `None`: not even this process's own).
fn cli_as(token: Option<&str>, args: &[&str]) -> Result<Output> {
    let mut c = trine();
    c.env_remove("TRINE_ADMIN_TOKEN");
    if let Some(t) = token {
        c.env("TRINE_ADMIN_TOKEN", t);
    }
    c.args(args);
    run(c, Duration::from_secs(30))
}

fn ok(out: &Output) -> Result<String> {
    ensure!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout.clone())?)
}

/// The refusal on stderr, which must name `code` and contain `says`.
fn refused(out: &Output, code: &str, says: &str) -> Result<()> {
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "accepted: {err}");
    ensure!(
        err.contains(code) && err.contains(says),
        "want {code} saying {says:?}, got: {err}"
    );
    Ok(())
}

fn create(grpc: &str, name: &str, extra: &[&str]) -> Result<String> {
    let mut args = vec!["token", "create", "--node", grpc, name];
    args.extend_from_slice(extra);
    Ok(ok(&cli_as(Some(admin_secret()), &args)?)?.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_wants_a_live_admin_token() -> Result<()> {
    let raft = trine_tests::free_addr()?;
    // trine() gives the node this process's TRINE_ADMIN_TOKEN: --init makes
    // it the cluster's first admin token.
    let mut node = Node::start(&["--init", "--raft-addr", &raft]).await?;
    let grpc = node.endpoints.grpc.to_string();
    let data = node.data_dir.clone();
    wait_for("a leader", Duration::from_secs(20), || async {
        chain_note(&grpc, "ready").ok()
    })
    .await?;

    // The secret is kept 0600 in the data dir, for `--data-dir`.
    let kept = data.join("admin.token");
    ensure!(std::fs::read_to_string(&kept)?.trim() == admin_secret());
    ensure!(std::fs::metadata(&kept)?.permissions().mode() & 0o777 == 0o600);

    // Missing: refused, and the message says where a token comes from.
    let status = ["status", "--node", grpc.as_str()];
    refused(
        &cli_as(None, &status)?,
        "Unauthenticated",
        "--admin-token-file",
    )?;
    // `--data-dir` finds the kept one.
    ok(&cli_as(
        None,
        &["status", "--data-dir", data.to_str().context("path")?],
    )?)?;
    // Wrong.
    refused(
        &cli_as(Some("trn_not-a-token"), &status)?,
        "Unauthenticated",
        "unknown or revoked",
    )?;
    // Wrongly scoped: an inference token may not administer.
    let app = create(&grpc, "app", &[])?;
    refused(
        &cli_as(Some(&app), &status)?,
        "PermissionDenied",
        "scope inference",
    )?;
    refused(
        &cli_as(Some(&app), &["token", "create", "--node", &grpc, "mine"])?,
        "PermissionDenied",
        "scope inference",
    )?;
    // ListPeers (the mesh's view, as on /metrics) needs no token.
    ok(&cli_as(None, &["peers", "--node", &grpc])?)?;

    // Expired: an admin token with a TTL works, then is refused.
    let brief = create(&grpc, "brief", &["--scope", "admin", "--ttl", "3s"])?;
    ok(&cli_as(Some(&brief), &status)?)?;
    let listed = ok(&cli_as(
        Some(admin_secret()),
        &["token", "list", "--node", &grpc, "-o", "json"],
    )?)?;
    let brief_row: serde_json::Value = listed
        .lines()
        .map(serde_json::from_str::<serde_json::Value>)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .find(|t| t["name"] == "brief")
        .context("brief in the list")?;
    ensure!(
        brief_row["scope"] == "admin" && brief_row["expires_s"].as_u64().unwrap_or(0) > 0,
        "{brief_row}"
    );
    wait_for("brief to expire", Duration::from_secs(10), || async {
        let out = cli_as(Some(&brief), &status).ok()?;
        String::from_utf8_lossy(&out.stderr)
            .contains("expired")
            .then_some(())
    })
    .await?;
    refused(
        &cli_as(Some(&brief), &status)?,
        "Unauthenticated",
        "expired",
    )?;

    // An admin action is recorded with its principal.
    let ops = create(&grpc, "ops", &["--scope", "admin"])?;
    let noted = ok(&cli_as(
        Some(&ops),
        &["chain", "note", "--node", &grpc, "by ops"],
    )?)?;
    let height: String = noted.chars().filter(char::is_ascii_digit).collect();
    let block: serde_json::Value = serde_json::from_str(&ok(&cli_as(
        Some(&ops),
        &["chain", "show", "--node", &grpc, &height],
    )?)?)?;
    let txs = block["txs"].as_array().context("txs")?;
    ensure!(
        txs.iter().any(|t| t["principal"] == "token:ops"
            && t["summary"].as_str().is_some_and(|s| s.contains("by ops"))),
        "block {height}: {block}"
    );

    // Revoked: root goes (ops is another live admin token) and is refused
    // from then on; ops, now the last live one, cannot be revoked.
    ok(&cli_as(
        Some(&ops),
        &["token", "revoke", "--node", &grpc, "root"],
    )?)?;
    refused(
        &cli_as(Some(admin_secret()), &status)?,
        "Unauthenticated",
        "unknown or revoked",
    )?;
    refused(
        &cli_as(Some(&ops), &["token", "revoke", "--node", &grpc, "ops"])?,
        "FailedPrecondition",
        "last admin token",
    )?;

    // Every refusal was counted, by reason.
    let text = node.metrics().await?;
    for reason in ["missing", "unknown", "scope", "expired"] {
        ensure!(
            metric_sum(
                &text,
                "trine_auth_refused_total",
                &["api=\"admin\"", &format!("reason=\"{reason}\"")]
            ) >= 1.0,
            "no admin refusal counted for {reason}"
        );
    }

    // A restart with --init (as systemd units and the StatefulSet's seed pod
    // do) does not bring root back, even with the kept secret gone (which
    // makes the node offer a first admin token again): the cluster has a
    // live admin token, so the state machine refuses it.
    node.signal(Signal::SIGTERM)?;
    node.wait_exit(Duration::from_secs(20)).await?;
    std::fs::remove_file(&kept)?;
    let tmp = node.take_dir().context("data dir")?;
    let node = Node::start_in(tmp, data, &["--init", "--raft-addr", &raft]).await?;
    let grpc = node.endpoints.grpc.to_string();
    let names = wait_for(
        "the restarted node's tokens",
        Duration::from_secs(30),
        || {
            let grpc = grpc.clone();
            let ops = ops.clone();
            async move {
                let out = cli_as(
                    Some(&ops),
                    &["token", "list", "--node", &grpc, "-o", "json"],
                )
                .ok()?;
                out.status
                    .success()
                    .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            }
        },
    )
    .await?;
    ensure!(
        names.contains("\"ops\"") && !names.contains("\"root\""),
        "{names}"
    );
    refused(
        &cli_as(Some(admin_secret()), &["status", "--node", &grpc])?,
        "Unauthenticated",
        "unknown or revoked",
    )?;
    ensure!(
        node.logs().contains("the first admin token was not added"),
        "no word of the refused bootstrap in the log"
    );
    Ok(())
}
