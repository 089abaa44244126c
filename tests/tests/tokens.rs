//! API tokens and placement through the `trine` binary on a real node:
//! the secret is shown once and only its SHA-256 reaches the cluster;
//! refusals name the problem; the table survives a restart from disk; the
//! inference APIs admit a request with a valid token only.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use nix::sys::signal::Signal;
use sha2::{Digest as _, Sha256};
use trine_tests::{Node, chain_note, cli_json, run, trine, wait_for};

fn cli(args: &[&str]) -> Result<std::process::Output> {
    let mut c = trine();
    c.args(args);
    run(c, Duration::from_secs(30))
}

/// The tokens other than the cluster's first admin token (root).
fn tokens(grpc: &str) -> Result<Vec<serde_json::Value>> {
    let all: Vec<serde_json::Value> = cli_json(&[
        "token",
        "list",
        "--node",
        grpc,
        "--linearizable",
        "-o",
        "json",
    ])?;
    let (root, rest): (Vec<_>, Vec<_>) = all.into_iter().partition(|t| t["name"] == "root");
    ensure!(
        root.len() == 1 && root[0]["scope"] == "admin",
        "the root admin token: {root:?}"
    );
    Ok(rest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_stored_as_hashes_and_survive_a_restart() -> Result<()> {
    let raft = trine_tests::free_addr()?;
    let mut node = Node::start(&["--init", "--raft-addr", &raft]).await?;
    let grpc = node.endpoints.grpc.to_string();
    wait_for("a leader", Duration::from_secs(20), || async {
        chain_note(&grpc, "ready").ok()
    })
    .await?;

    let made = cli(&[
        "token",
        "create",
        "--node",
        &grpc,
        "ci-runner",
        "--requests-per-minute",
        "60",
    ])?;
    ensure!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let secret = String::from_utf8(made.stdout.clone())?.trim().to_owned();
    ensure!(
        secret.starts_with("trn_") && secret.len() == 68,
        "{secret:?}"
    );
    let want = hex::encode(Sha256::digest(secret.as_bytes()));

    let list = tokens(&grpc)?;
    ensure!(list.len() == 1, "{list:?}");
    ensure!(list[0]["name"] == "ci-runner" && list[0]["sha256"] == want.as_str());
    ensure!(list[0]["requests_per_minute"] == 60);
    // The block that records the token holds its hash, never the secret.
    let said = String::from_utf8_lossy(&made.stderr).into_owned();
    let height = said
        .split("recorded in block ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .context("the block height on stderr")?
        .to_owned();
    let block = cli(&["chain", "show", "--node", &grpc, &height])?;
    let block = String::from_utf8_lossy(&block.stdout);
    ensure!(
        block.contains("add API token ci-runner") && block.contains(&want),
        "block {height} does not record the token's hash: {block}"
    );
    ensure!(
        !block.contains(&secret),
        "the secret reached the chain: {block}"
    );

    // The inference APIs want the token (the node runs without
    // --allow-anonymous): none or a wrong one is refused, the right one
    // lets the request in.
    let models = |auth: Option<String>| {
        let url = node.url("/v1/models");
        async move {
            let mut r = reqwest::Client::new().get(url);
            if let Some(a) = auth {
                r = r.header("authorization", a);
            }
            let r = r.send().await?;
            let status = r.status().as_u16();
            let body: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
            anyhow::Ok((status, body))
        }
    };
    let (status, body) = models(None).await?;
    ensure!(
        status == 401
            && body["error"]["type"] == "authentication_error"
            && body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("trine token create")),
        "{status} {body}"
    );
    let (status, _) = models(Some("Bearer trn_wrong".into())).await?;
    ensure!(status == 401, "a wrong token: {status}");
    let (status, body) = models(Some(format!("Bearer {secret}"))).await?;
    ensure!(status == 200 && body["object"] == "list", "{status} {body}");
    let mut inference =
        trine_proto::v1::inference_client::InferenceClient::connect(node.grpc_uri()).await?;
    let e = inference
        .list_models(trine_proto::v1::ListModelsRequest::default())
        .await
        .expect_err("no token");
    ensure!(e.code() == tonic::Code::Unauthenticated, "{e:?}");
    let mut req = tonic::Request::new(trine_proto::v1::ListModelsRequest::default());
    req.metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse()?);
    inference.list_models(req).await?;

    // A token's rate limit: two requests a minute, the third is 429 with
    // the reason (these ask for a model that is not deployed, so the first
    // two are 404s; they still count).
    let limited = cli(&[
        "token",
        "create",
        "--node",
        &grpc,
        "slow",
        "--requests-per-minute",
        "2",
    ])?;
    ensure!(limited.status.success());
    let slow = String::from_utf8(limited.stdout)?.trim().to_owned();
    let complete = |token: String| {
        let url = node.url("/v1/completions");
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .header("authorization", format!("Bearer {token}"))
                .body(r#"{"model":"nope","prompt":"hi"}"#)
                .send()
                .await?;
            let status = r.status().as_u16();
            let body: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
            anyhow::Ok((status, body))
        }
    };
    let mut codes = Vec::new();
    let mut last = serde_json::Value::Null;
    for _ in 0..3 {
        let (status, body) = complete(slow.clone()).await?;
        codes.push(status);
        last = body;
    }
    ensure!(codes == [404, 404, 429], "{codes:?} {last}");
    // Only that token is throttled: another one still gets through.
    let (status, _) = complete(secret.clone()).await?;
    ensure!(status == 404, "another token: {status}");
    ensure!(
        last["error"]["type"] == "rate_limit_error"
            && last["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("2 requests per minute")),
        "{last}"
    );

    // A second token by the same name is refused, with the reason.
    let dup = cli(&["token", "create", "--node", &grpc, "ci-runner"])?;
    ensure!(!dup.status.success(), "a duplicate name was accepted");
    let err = String::from_utf8_lossy(&dup.stderr);
    ensure!(
        err.contains("exists") && err.contains("revoke it first"),
        "{err}"
    );
    let bad = cli(&["token", "create", "--node", &grpc, "no spaces"])?;
    ensure!(!bad.status.success());
    ensure!(String::from_utf8_lossy(&bad.stderr).contains("letters, digits"));
    let second = cli(&["token", "create", "--node", &grpc, "dashboards"])?;
    ensure!(second.status.success());

    // Restart from the data dir: the table is read back from sled.
    node.signal(Signal::SIGTERM)?;
    node.wait_exit(Duration::from_secs(20)).await?;
    let tmp = node.take_dir().context("data dir")?;
    let data = node.data_dir.clone();
    let node = Node::start_in(tmp, data, &["--raft-addr", &raft]).await?;
    let grpc = node.endpoints.grpc.to_string();
    let list = wait_for(
        "the restarted node's tokens",
        Duration::from_secs(30),
        || {
            let grpc = grpc.clone();
            async move { tokens(&grpc).ok().filter(|l| l.len() == 3) }
        },
    )
    .await?;
    ensure!(list.iter().any(|t| t["sha256"] == want.as_str()));

    let revoked = cli(&["token", "revoke", "--node", &grpc, "ci-runner"])?;
    ensure!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    let list = tokens(&grpc)?;
    ensure!(
        list.len() == 2 && list.iter().all(|t| t["name"] != "ci-runner"),
        "{list:?}"
    );
    // The revoked secret no longer opens the APIs, on either protocol.
    let r = reqwest::Client::new()
        .get(node.url("/v1/models"))
        .header("authorization", format!("Bearer {secret}"))
        .send()
        .await?;
    ensure!(
        r.status().as_u16() == 401,
        "a revoked token: {}",
        r.status()
    );
    let mut inference =
        trine_proto::v1::inference_client::InferenceClient::connect(node.grpc_uri()).await?;
    let mut req = tonic::Request::new(trine_proto::v1::ListModelsRequest::default());
    req.metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse()?);
    let e = inference.list_models(req).await.expect_err("revoked");
    ensure!(e.code() == tonic::Code::Unauthenticated, "{e:?}");

    // A body over the 1 MiB limit is refused before it is parsed (413),
    // and the node goes on answering.
    let huge = format!(r#"{{"model":"nope","prompt":"{}"}}"#, "a".repeat(2 << 20));
    let r = reqwest::Client::new()
        .post(node.url("/v1/completions"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await?;
    ensure!(
        r.status().as_u16() == 413,
        "an oversized body: {}",
        r.status()
    );
    let r = reqwest::Client::new()
        .get(node.url("/v1/models"))
        .send()
        .await?;
    ensure!(
        r.status().as_u16() == 401,
        "after the oversized body: {}",
        r.status()
    );

    let again = cli(&["token", "revoke", "--node", &grpc, "ci-runner"])?;
    ensure!(!again.status.success());
    ensure!(String::from_utf8_lossy(&again.stderr).contains("no token is named ci-runner"));

    // Nothing is placed yet; asking for an unknown model says so.
    let p = cli(&["placement", "--node", &grpc])?;
    ensure!(p.status.success() && String::from_utf8_lossy(&p.stdout).contains("no stage"));
    let p = cli(&["placement", "--node", &grpc, "--model", "nope"])?;
    ensure!(!p.status.success());
    ensure!(String::from_utf8_lossy(&p.stderr).contains("model nope is not deployed"));
    Ok(())
}
