//! Every request limit of a node is a setting with a safe default, and each
//! one, set low on a real node, refuses what is over it with the error the
//! docs name (the setting's name in the message), while requests within it
//! are served.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use trine_proto::v1;
use trine_tests::{Node, chain_note, deploy, synth_tiny, wait_for};

/// POSTs `body` to `/v1/completions`; the status and the JSON answer.
async fn complete(node: &Node, body: String) -> Result<(u16, serde_json::Value)> {
    let r = reqwest::Client::new()
        .post(node.url("/v1/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = r.status().as_u16();
    let bytes = r.bytes().await?;
    let v = serde_json::from_slice(&bytes)
        .with_context(|| format!("{status}: {}", String::from_utf8_lossy(&bytes)))?;
    Ok((status, v))
}

fn ask(prompt: &str, max_tokens: u32) -> String {
    serde_json::json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        .to_string()
}

fn refused(answer: &(u16, serde_json::Value), status: u16, setting: &str) -> Result<()> {
    let (got, v) = answer;
    let message = v["error"]["message"].as_str().unwrap_or_default();
    ensure!(
        *got == status && message.contains(setting),
        "wanted {status} naming {setting}, got {got}: {v}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_limit_is_a_setting_and_refuses_what_is_over_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = synth_tiny(dir.path())?;
    let raft = trine_tests::free_addr()?;
    let node = Node::start(&[
        "--init",
        "--raft-addr",
        &raft,
        "--allow-anonymous",
        "--max-prompt-tokens",
        "12",
        "--max-tokens",
        "16",
        "--max-body-bytes",
        "4096",
        "--max-message-bytes",
        "65536",
        "--max-streams",
        "3",
        "--max-batch",
        "1",
        "--max-queue",
        "1",
    ])
    .await?;
    let grpc = node.endpoints.grpc.to_string();
    wait_for("a leader", Duration::from_secs(20), || async {
        chain_note(&grpc, "ready").ok()
    })
    .await?;
    deploy(&grpc, &model, &["--name", "tiny"])?;
    wait_for("the model served", Duration::from_secs(60), || async {
        let (status, _) = complete(&node, ask("Hello", 4)).await.ok()?;
        (status == 200).then_some(())
    })
    .await?;

    // Within every limit: served.
    let (status, v) = complete(&node, ask("Hello", 16)).await?;
    ensure!(status == 200, "{status} {v}");
    // max_tokens over the node's cap.
    refused(&complete(&node, ask("Hello", 17)).await?, 400, "max_tokens")?;
    // A prompt over max_prompt_tokens.
    let long = "one two three four five six seven eight nine ten eleven twelve thirteen";
    refused(
        &complete(&node, ask(long, 4)).await?,
        400,
        "max_prompt_tokens",
    )?;
    // A body over max_body_bytes.
    let big = ask(&"x".repeat(5000), 4);
    refused(&complete(&node, big).await?, 413, "max_body_bytes")?;

    // gRPC: a message over max_message_bytes is refused by the decoder.
    let mut client = v1::inference_client::InferenceClient::new(node.channel().await?);
    let e = client
        .generate(v1::GenerateRequest {
            model: "tiny".into(),
            max_tokens: 4,
            input: Some(v1::generate_request::Input::Prompt("y".repeat(70_000))),
            ..Default::default()
        })
        .await
        .expect_err("a 70 kB message was taken");
    ensure!(
        e.code() == tonic::Code::OutOfRange && e.message().contains("65536"),
        "{e:?}"
    );

    // The HTTP/2 SETTINGS of the gRPC port carry max_streams.
    let tcp = tokio::net::TcpStream::connect(node.endpoints.grpc).await?;
    let (_send, mut conn) = h2::client::handshake(tcp).await?;
    let streams = tokio::time::timeout(
        Duration::from_secs(10),
        std::future::poll_fn(|cx| {
            let _ = std::pin::Pin::new(&mut conn).poll(cx);
            if conn.max_concurrent_send_streams() == usize::MAX {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(conn.max_concurrent_send_streams())
            }
        }),
    )
    .await
    .context("the server's SETTINGS")?;
    ensure!(streams == 3, "SETTINGS_MAX_CONCURRENT_STREAMS {streams}");

    // One generation runs (max_batch 1), one waits (max_queue 1): of eight
    // sent at once, the rest are refused at once with 429, and at least the
    // running and the waiting one are served.
    let answers =
        futures_util::future::join_all((0..8).map(|_| complete(&node, ask("Hello", 16)))).await;
    let mut served = 0;
    let mut busy = 0;
    for a in answers {
        let a = a?;
        match a.0 {
            200 => served += 1,
            429 => {
                refused(&a, 429, "max_queue")?;
                busy += 1;
            }
            other => anyhow::bail!("unexpected {other}: {}", a.1),
        }
    }
    ensure!(served >= 2 && busy >= 1, "served {served}, refused {busy}");
    Ok(())
}

/// `--max-connections-per-peer`: one libp2p identity dials the node six
/// times; the node keeps as many connections as the setting allows and
/// refuses the rest, counting them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_peer_are_capped_by_the_setting() -> Result<()> {
    use futures_util::StreamExt as _;
    use libp2p::swarm::SwarmEvent;
    use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};

    let node = Node::start(&["--max-connections-per-peer", "3"]).await?;
    let target: libp2p::PeerId = node.endpoints.peer_id.parse()?;
    let addr: libp2p::Multiaddr = node.endpoints.p2p[0].parse()?;
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )?
        .with_behaviour(|_| libp2p::swarm::dummy::Behaviour)?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    for _ in 0..6 {
        swarm.dial(
            DialOpts::peer_id(target)
                .addresses(vec![addr.clone()])
                .condition(PeerCondition::Always)
                .build(),
        )?;
    }
    // The dialer runs in its own task, counting the connections open.
    let open = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let counter = open.clone();
    let dialer = tokio::spawn(async move {
        use std::sync::atomic::Ordering::Relaxed;
        while let Some(event) = swarm.next().await {
            match event {
                SwarmEvent::ConnectionEstablished { .. } => counter.fetch_add(1, Relaxed),
                SwarmEvent::ConnectionClosed { .. } => counter.fetch_sub(1, Relaxed),
                _ => 0,
            };
        }
    });
    let now = || open.load(std::sync::atomic::Ordering::Relaxed);
    let denied = || async {
        let metrics = node.metrics().await.ok()?;
        trine_tests::metric(&metrics, "trine_p2p_connections_denied_total")
    };
    let result = wait_for("3 open, 3 refused", Duration::from_secs(20), || async {
        (now() == 3 && denied().await == Some(3.0)).then_some(())
    })
    .await;
    let seen = (now(), denied().await);
    result.with_context(|| format!("open and refused: {seen:?}"))?;
    // And it stays so (no late connection, none closed).
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(now() == 3, "{} connections open later", now());
    dialer.abort();
    Ok(())
}
