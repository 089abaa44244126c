//! TLS on the client ports (`trine node --api-tls`), between real `trine`
//! processes: two members serve their gRPC and HTTP ports over TLS only,
//! with their node certificates from the cluster CA, and require client
//! certificates from it (`--api-tls-client-ca`). Plain-text clients, TLS
//! clients that do not trust the CA, and clients without a certificate or
//! with one from another CA are refused; the CLI and the OpenAI API work
//! over mutual TLS; a node without the model's replica forwards to the one
//! holding it over TLS (checked against the node's name, presenting its
//! own certificate); a renewed certificate is served without a restart; a
//! world-readable key and a certificate that does not name the node stop a
//! node at start with one clear error.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use trine_tests::{
    Node, cli_json, error_lines, free_addr, local_answer, run, synth_tiny, trine, wait_for,
};

#[derive(Debug, Clone, serde::Deserialize)]
struct Slot {
    node: String,
    state: String,
}

/// The certificate (DER) the server at `addr` presents to a client that
/// trusts `ca_pem`, checked against the name `name`; the client presents
/// the certificate and key in `tls_dir`.
async fn served_certificate(
    addr: &str,
    ca_pem: &str,
    name: &str,
    tls_dir: &Path,
) -> Result<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(
        CertificateDer::pem_file_iter(tls_dir.join("node.crt"))?.collect::<Result<_, _>>()?,
        rustls::pki_types::PrivateKeyDer::from_pem_file(tls_dir.join("node.key"))?,
    )?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from(name.to_owned())?,
            tcp,
        )
        .await?;
    let (_, session) = tls.get_ref();
    Ok(session
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no server certificate")?
        .to_vec())
}

fn first_der(pem_file: &Path) -> Result<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    Ok(CertificateDer::pem_file_iter(pem_file)?
        .next()
        .context("no certificate")??
        .to_vec())
}

/// `/v1/completions` on `node` (greedy, 24 tokens, as `local_answer`)
/// answers `want`; a 503 while placement settles is retried.
async fn completes(node: &Node, want: &str) -> Result<()> {
    let http = node.http()?;
    let url = node.url("/v1/completions");
    let body = serde_json::json!({"model": "tiny", "prompt": "Hello", "max_tokens": 24,
        "temperature": 0, "repetition_penalty": 5})
    .to_string();
    let (status, v) = wait_for("an answer, not 503", Duration::from_secs(30), || {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        async move {
            let r = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .ok()?;
            let status = r.status();
            let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.ok()?).ok()?;
            (status != 503).then_some((status, v))
        }
    })
    .await?;
    ensure!(status == 200, "{status} {v}");
    ensure!(v["choices"][0]["text"] == want, "{v} != {want:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ports_serve_tls_only_forward_over_tls_and_renew_without_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = synth_tiny(dir.path())?;
    let want = local_answer(&model)?;

    let raft_a = free_addr()?;
    let tmp_a = tempfile::tempdir()?;
    let data_a = tmp_a.path().join("data");
    // --init makes the cluster CA; every node's TLS dir gets its ca.crt.
    let ca_file = data_a.join("tls").join("ca.crt");
    let a = Node::start_in(
        tmp_a,
        data_a.clone(),
        &[
            "--init",
            "--name",
            "a",
            "--raft-addr",
            &raft_a,
            "--allow-anonymous",
            "--api-tls",
            "--api-tls-client-ca",
            ca_file.to_str().context("utf-8 path")?,
        ],
    )
    .await?;
    let ca_pem = std::fs::read_to_string(&ca_file)?;
    let tmp_b = tempfile::tempdir()?;
    let data_b = tmp_b.path().join("data");
    trine_control::tls::issue_node(&a.data_dir.join("ca"), "b", &[], &data_b.join("tls"))?;
    let raft_b = free_addr()?;
    let b = Node::start_in(
        tmp_b,
        data_b.clone(),
        &[
            "--join",
            &raft_a,
            "--name",
            "b",
            "--raft-addr",
            &raft_b,
            "--allow-anonymous",
            "--api-tls",
            "--api-tls-client-ca",
            data_b
                .join("tls")
                .join("ca.crt")
                .to_str()
                .context("utf-8 path")?,
            "--bootstrap",
            &a.p2p_addr(),
        ],
    )
    .await?;
    ensure!(a.endpoints.api_tls && b.endpoints.api_tls);

    // Plain text is refused on both ports; so is TLS from a client that
    // does not trust the cluster CA (reqwest's built-in web roots).
    let plain_http = format!("http://{}/readyz", a.endpoints.http);
    ensure!(
        trine_tests::http_get(&plain_http).await.is_none(),
        "plain HTTP answered on a TLS-only port"
    );
    let mut plain_grpc = trine_proto::v1::admin_client::AdminClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", a.endpoints.grpc))?
            .connect_lazy(),
    );
    ensure!(
        plain_grpc
            .list_peers(trine_proto::v1::ListPeersRequest::default())
            .await
            .is_err(),
        "plain gRPC answered on a TLS-only port"
    );
    ensure!(
        trine_tests::http_get(&a.url("/readyz")).await.is_none(),
        "a client that does not trust the cluster CA got an answer"
    );
    // Mutual TLS: trusting the CA is not enough without a certificate of
    // one's own from it; one from another CA is refused too.
    let root = reqwest::Certificate::from_pem(ca_pem.as_bytes())?;
    let trusting = || {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(root.clone())
    };
    let no_cert = trusting().build()?;
    ensure!(
        trine_tests::get_with(&no_cert, &a.url("/readyz"))
            .await
            .is_none(),
        "a client without a certificate got an answer"
    );
    let other_ca = dir.path().join("other-ca");
    trine_control::tls::init_ca(&other_ca, "other")?;
    let other = dir.path().join("other-tls");
    trine_control::tls::issue_node(&other_ca, "a", &[], &other)?;
    let mut pem = std::fs::read(other.join("node.crt"))?;
    pem.extend_from_slice(&std::fs::read(other.join("node.key"))?);
    let foreign = trusting()
        .identity(reqwest::Identity::from_pem(&pem)?)
        .build()?;
    ensure!(
        trine_tests::get_with(&foreign, &a.url("/readyz"))
            .await
            .is_none(),
        "a client with a certificate from another CA got an answer"
    );
    ensure!(
        trine_tests::get_with(&a.http()?, &a.url("/readyz"))
            .await
            .is_some_and(|(s, _)| s == 200),
        "a client with a certificate from the cluster CA was refused"
    );
    // The CLI says what to do about a plain-text address.
    let mut c = trine();
    c.args(["status", "--node", &a.endpoints.grpc.to_string()]);
    let out = run(c, Duration::from_secs(30))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("--api-tls") && stderr.contains("https://"),
        "{stderr}"
    );
    let mut c = trine();
    c.args(["status", "--node", &a.grpc_uri()]);
    let out = run(c, Duration::from_secs(30))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("--ca-cert"),
        "{stderr}"
    );
    let a_uri = a.grpc_uri();
    let ca_arg = ca_file.to_str().context("utf-8 path")?;
    let mut c = trine();
    c.args(["status", "--node", &a_uri, "--ca-cert", ca_arg]);
    let out = run(c, Duration::from_secs(30))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("--client-cert"),
        "{stderr}"
    );

    // An operator's certificate from the cluster CA (`trine certs issue`).
    let laptop = dir.path().join("laptop");
    let mut c = trine();
    c.args(["certs", "issue", "--name", "laptop", "--ca-dir"])
        .arg(data_a.join("ca"))
        .arg("--out")
        .arg(&laptop);
    let out = run(c, Duration::from_secs(30))?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let laptop_cert = laptop.join("node.crt");
    let laptop_key = laptop.join("node.key");
    let me = [
        "--ca-cert",
        ca_arg,
        "--client-cert",
        laptop_cert.to_str().context("utf-8 path")?,
        "--client-key",
        laptop_key.to_str().context("utf-8 path")?,
    ];

    // Over mutual TLS: deploy one single-stage replica through the CLI.
    let mut c = trine();
    c.args(["deploy", "--node", &a_uri])
        .args(me)
        .args(["--name", "tiny", "--replicas", "1"])
        .arg(&model);
    let out = run(c, Duration::from_secs(60))?;
    ensure!(
        out.status.success(),
        "trine deploy over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let slots = wait_for("the replica ready", Duration::from_secs(60), || {
        let a_uri = a_uri.clone();
        async move {
            let mut args = vec!["placement", "--node", &a_uri];
            args.extend(me);
            args.extend(["--model", "tiny", "--linearizable", "-o", "json"]);
            cli_json::<Slot>(&args)
                .ok()
                .filter(|s| s.len() == 1 && s[0].state == "ready")
        }
    })
    .await?;
    // Both nodes answer: the one without the replica forwards over TLS
    // (a plain-text hop would be refused, as above).
    ensure!(slots[0].node == "a" || slots[0].node == "b", "{slots:?}");
    completes(&a, &want).await?;
    completes(&b, &want).await?;

    // `trine status --data-dir` finds TLS and the CA in endpoints.json, and
    // reaches every member over TLS for its own view.
    let mut c = trine();
    c.args(["status", "-o", "json", "--data-dir"]).arg(&data_b);
    let out = run(c, Duration::from_secs(30))?;
    ensure!(
        out.status.success(),
        "trine status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(rows.len() == 2, "{rows:?}");
    for r in &rows {
        ensure!(
            r["reachable"] == true && r["api_tls"] == true,
            "no own status from {r} over TLS"
        );
    }

    // Renewal: `trine certs rotate` writes a new key and certificate; b
    // serves them to new connections within seconds, with no restart, and
    // the expiry metric follows.
    let b_cert = data_b.join("tls").join("node.crt");
    let b_grpc = b.endpoints.grpc.to_string();
    let b_tls = data_b.join("tls");
    let before = served_certificate(&b_grpc, &ca_pem, "b", &b_tls).await?;
    ensure!(
        before == first_der(&b_cert)?,
        "b serves another certificate"
    );
    let mut c = trine();
    c.args(["certs", "rotate", "--name", "b", "--ca-dir"])
        .arg(a.data_dir.join("ca"))
        .arg("--out")
        .arg(data_b.join("tls"));
    let out = run(c, Duration::from_secs(30))?;
    ensure!(
        out.status.success(),
        "trine certs rotate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let renewed = first_der(&b_cert)?;
    ensure!(renewed != before, "rotate wrote the same certificate");
    wait_for(
        "b serving the renewed certificate",
        Duration::from_secs(15),
        || {
            let (b_grpc, ca_pem, renewed, b_tls) = (&b_grpc, &ca_pem, &renewed, &b_tls);
            async move {
                let now = served_certificate(b_grpc, ca_pem, "b", b_tls).await.ok()?;
                (now == *renewed).then_some(())
            }
        },
    )
    .await?;
    let http_now = served_certificate(&b.endpoints.http.to_string(), &ca_pem, "b", &b_tls).await?;
    ensure!(
        http_now == renewed,
        "the HTTP port still serves the old certificate"
    );
    let metrics = b.metrics().await?;
    ensure!(
        trine_tests::metric(&metrics, "trine_cert_expiry_seconds{cert=\"api\"}").is_some(),
        "{metrics}"
    );
    completes(&a, &want).await?;
    completes(&b, &want).await?;

    // Bad files stop a node at start with one error naming the fix.
    let tmp = tempfile::tempdir()?;
    let key = tmp.path().join("api.key");
    let cert = tmp.path().join("api.crt");
    std::fs::copy(data_b.join("tls").join("node.key"), &key)?;
    std::fs::copy(&b_cert, &cert)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))?;
    }
    let start = |name: &str, data: &str| {
        let mut c = trine();
        c.args(["node", "--name", name, "--init", "--api-tls"])
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(["--raft-addr", "127.0.0.1:0"])
            .args(["--p2p-listen", "/ip4/127.0.0.1/tcp/0"])
            .arg("--data-dir")
            .arg(tmp.path().join(data))
            .arg("--api-tls-cert")
            .arg(&cert)
            .arg("--api-tls-key")
            .arg(&key);
        run(c, Duration::from_secs(30))
    };
    let out = start("b", "d1")?;
    let errors = error_lines(&out.stderr);
    ensure!(
        !out.status.success()
            && errors.len() == 1
            && errors[0].contains("chmod 600")
            && errors[0].contains("api.key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    }
    // b's certificate on a node named c: other nodes would check "c".
    let out = start("c", "d2")?;
    let errors = error_lines(&out.stderr);
    ensure!(
        !out.status.success()
            && errors.len() == 1
            && errors[0].contains("api.crt")
            && errors[0].contains("\"c\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
