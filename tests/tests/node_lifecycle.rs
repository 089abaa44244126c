//! A real `trine node` process: readiness, metrics, gRPC health and
//! reflection, UNIMPLEMENTED answers for services not served yet, and a
//! clean, deadline-bounded stop on SIGTERM and SIGINT.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use nix::sys::signal::Signal;
use tokio_stream::StreamExt as _;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use trine_tests::{Node, STOP_DEADLINE, http_get, run, trine};

async fn check(node: &Node, service: &str) -> Result<ServingStatus> {
    let mut client = HealthClient::new(node.channel().await?);
    let response = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(response.into_inner().status())
}

fn metric_line<'a>(metrics: &'a str, name: &str) -> Option<&'a str> {
    metrics.lines().find(|l| {
        !l.starts_with('#')
            && (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
    })
}

#[tokio::test]
async fn serves_health_metrics_reflection_and_stops_cleanly_on_sigterm() -> Result<()> {
    let mut node = Node::start(&["--region", "eu-central", "--name", "e2e-1"]).await?;

    // HTTP: liveness, readiness, metrics.
    let (status, body) = http_get(&node.url("/healthz"))
        .await
        .context("GET /healthz")?;
    ensure!(status == 200, "/healthz {status}: {body}");
    let (status, _) = http_get(&node.url("/readyz"))
        .await
        .context("GET /readyz")?;
    ensure!(status == 200);
    let (status, metrics) = http_get(&node.url("/metrics"))
        .await
        .context("GET /metrics")?;
    ensure!(status == 200);
    let build_info = metric_line(&metrics, "trine_build_info").context("no trine_build_info")?;
    let version = run(
        {
            let mut c = trine();
            c.arg("--version");
            c
        },
        Duration::from_secs(10),
    )?;
    let version = String::from_utf8(version.stdout)?;
    // "trine 0.1.0 (git <sha>, simd <level>)"
    let sha = version
        .split("(git ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .context("no git sha in --version")?;
    let simd = version
        .split("simd ")
        .nth(1)
        .map(|s| s.trim_end().trim_end_matches(')'))
        .context("no simd in --version")?;
    ensure!(
        build_info.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{build_info}"
    );
    ensure!(
        build_info.contains(&format!("git_sha=\"{sha}\"")),
        "{build_info} vs {version}"
    );
    ensure!(
        build_info.contains(&format!("simd=\"{simd}\"")),
        "{build_info} vs {version}"
    );
    ensure!(build_info.ends_with(" 1"), "{build_info}");
    ensure!(
        metric_line(&metrics, "trine_node_up") == Some("trine_node_up 1"),
        "{metrics}"
    );
    let info = metric_line(&metrics, "trine_node_info").context("no trine_node_info")?;
    ensure!(
        info.contains("name=\"e2e-1\"") && info.contains("region=\"eu-central\""),
        "{info}"
    );
    ensure!(
        metric_line(&metrics, "process_resident_memory_bytes").is_some(),
        "{metrics}"
    );

    // gRPC: overall health SERVING; Inference NOT_SERVING outside a cluster.
    ensure!(check(&node, "").await? == ServingStatus::Serving);
    ensure!(check(&node, "trine.v1.Inference").await? == ServingStatus::NotServing);
    let mut admin = trine_proto::v1::admin_client::AdminClient::new(node.channel().await?);
    let err = admin
        .cluster_status(trine_proto::v1::ClusterStatusRequest::default())
        .await
        .expect_err("a node outside any cluster has no cluster status");
    ensure!(err.code() == tonic::Code::FailedPrecondition, "{err:?}");
    ensure!(
        err.message().contains("--init") && err.message().contains("--join"),
        "{err:?}"
    );

    // Reflection lists our services and the standard ones.
    let services = list_services(&node).await?;
    for wanted in [
        "trine.v1.Inference",
        "trine.v1.Admin",
        "trine.v1.Raft",
        "grpc.health.v1.Health",
    ] {
        ensure!(
            services.iter().any(|s| s == wanted),
            "{wanted} not in {services:?}"
        );
    }

    // SIGTERM: clean exit, lock released, endpoints file gone.
    node.signal(Signal::SIGTERM)?;
    let status = node.wait_exit(STOP_DEADLINE).await?;
    ensure!(status.success(), "exit {status}; log:\n{}", node.logs());
    ensure!(
        node.logs().contains("node stopped cleanly"),
        "{}",
        node.logs()
    );
    ensure!(!node.data_dir.join("endpoints.json").exists());
    // The data dir is consistent and free: a new node starts on it.
    let tmp = tempfile::tempdir()?;
    let mut again = Node::start_in(tmp, node.data_dir.clone(), &[]).await?;
    again.signal(Signal::SIGINT)?;
    ensure!(
        again.wait_exit(STOP_DEADLINE).await?.success(),
        "{}",
        again.logs()
    );
    Ok(())
}

async fn list_services(node: &Node) -> Result<Vec<String>> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let mut client = ServerReflectionClient::new(node.channel().await?);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let response = stream.next().await.context("no reflection response")??;
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => anyhow::bail!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test]
async fn sigint_stops_cleanly() -> Result<()> {
    let mut node = Node::start(&[]).await?;
    node.signal(Signal::SIGINT)?;
    let status = node.wait_exit(STOP_DEADLINE).await?;
    ensure!(status.success(), "exit {status}; log:\n{}", node.logs());
    ensure!(node.logs().contains("signal=\"SIGINT\""), "{}", node.logs());
    Ok(())
}

/// While draining, the node tells health watchers and readiness probes, keeps
/// /metrics up, and cuts a stream still open at the deadline.
#[tokio::test]
async fn drain_informs_watchers_and_is_bounded_by_the_deadline() -> Result<()> {
    let mut node = Node::start(&["--shutdown-timeout", "3s"]).await?;
    let mut client = HealthClient::new(node.channel().await?);
    let mut watch = client
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    let first = watch.next().await.context("watch ended")??;
    ensure!(first.status() == ServingStatus::Serving);

    node.signal(Signal::SIGTERM)?;
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .context("no health update after SIGTERM")?
        .context("watch ended without NOT_SERVING")??;
    ensure!(next.status() == ServingStatus::NotServing, "{next:?}");

    // The open watch keeps gRPC draining; HTTP still answers meanwhile.
    let (status, _) = http_get(&node.url("/readyz"))
        .await
        .context("/readyz during drain")?;
    ensure!(status == 503, "readyz {status} during drain");
    let (_, metrics) = http_get(&node.url("/metrics"))
        .await
        .context("/metrics during drain")?;
    ensure!(
        metric_line(&metrics, "trine_node_up") == Some("trine_node_up 0"),
        "{metrics}"
    );

    let status = node.wait_exit(STOP_DEADLINE).await?;
    ensure!(status.success(), "exit {status}; log:\n{}", node.logs());
    ensure!(
        node.logs().contains("drain deadline passed"),
        "{}",
        node.logs()
    );
    Ok(())
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() -> Result<()> {
    let mut node = Node::start(&["--log-format", "json"]).await?;
    node.signal(Signal::SIGTERM)?;
    ensure!(node.wait_exit(STOP_DEADLINE).await?.success());
    let logs = node.logs();
    let mut messages = Vec::new();
    for line in logs.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        messages.push(v["message"].as_str().unwrap_or_default().to_owned());
    }
    ensure!(messages.iter().any(|m| m == "node serving"), "{logs}");
    ensure!(
        messages.iter().any(|m| m == "node stopped cleanly"),
        "{logs}"
    );
    Ok(())
}

/// A second signal during a long drain exits at once with 130.
#[tokio::test]
async fn second_signal_exits_at_once() -> Result<()> {
    let mut node = Node::start(&["--shutdown-timeout", "10m"]).await?;
    let mut client = HealthClient::new(node.channel().await?);
    let mut watch = client
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    watch.next().await.context("watch ended")??;
    node.signal(Signal::SIGTERM)?;
    // Wait until the drain has begun (the watcher is told), then signal again.
    watch.next().await.context("watch ended")??;
    node.signal(Signal::SIGTERM)?;
    let status = node.wait_exit(STOP_DEADLINE).await?;
    ensure!(
        status.code() == Some(130),
        "exit {status}; log:\n{}",
        node.logs()
    );
    Ok(())
}

#[tokio::test]
async fn help_lists_only_working_subcommands() -> Result<()> {
    let out = run(
        {
            let mut c = trine();
            c.arg("--help");
            c
        },
        Duration::from_secs(10),
    )?;
    ensure!(out.status.success());
    let help = String::from_utf8(out.stdout)?;
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .context("no Commands section")?
        .split("Options:")
        .next()
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("    "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    ensure!(
        commands
            == [
                "node",
                "generate",
                "perplexity",
                "peers",
                "testnet",
                "status",
                "nodes",
                "chain",
                "deploy",
                "complete",
                "chat",
                "undeploy",
                "placement",
                "token",
                "certs",
                "bench",
                "model",
                "chaos",
                "help"
            ],
        "{commands:?}"
    );
    // Each advertised subcommand really runs (here: its config resolves).
    let out = run(
        {
            let mut c = trine();
            c.args(["node", "--print-config"]);
            c
        },
        Duration::from_secs(10),
    )?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
