//! The docker-compose testnet, for real (Docker Engine and Compose run on
//! this project's CI machines; no image is pulled): build the images with
//! `deploy/docker/build-image.sh`, `up -d` the 7 nodes in 4 regions with
//! Prometheus and Alertmanager, wait until every node is healthy and one
//! leader exists, read `trine status` through a container, serve requests
//! (from the host's published port and through another node's container),
//! `docker kill` a voter, see the cluster stay writable and NodeDown fire in
//! the compose Prometheus, then `down -v` and check nothing is left.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};

const NODES: [(&str, &str); 7] = [
    ("us-east-1", "us-east"),
    ("us-east-2", "us-east"),
    ("us-west-1", "us-west"),
    ("us-west-2", "us-west"),
    ("eu-central-1", "eu-central"),
    ("eu-central-2", "eu-central"),
    ("ap-southeast-1", "ap-southeast"),
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command; fails with its output when it does not succeed.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        text(&out)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One compose project with its own images, torn down (volumes and images
/// included) when dropped, also when the test fails half-way.
struct Compose {
    program: Vec<String>,
    project: String,
    images: [String; 3],
    down: bool,
}

impl Compose {
    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.program[0]);
        c.args(&self.program[1..])
            .arg("-f")
            .arg(deploy_dir().join("docker-compose.yml"))
            .args(["-p", &self.project])
            .env("TRINE_IMAGE", &self.images[0])
            .env("TRINE_PROMETHEUS_IMAGE", &self.images[1])
            .env("TRINE_ALERTMANAGER_IMAGE", &self.images[2])
            // "127.0.0.1:" + ":7400": a free loopback port on the host.
            .env("TRINE_GRPC_PUBLISH", "127.0.0.1:")
            .env("TRINE_HTTP_PUBLISH", "127.0.0.1:")
            .env("TRINE_PROMETHEUS_PUBLISH", "127.0.0.1:")
            .env("TRINE_ALERTMANAGER_PUBLISH", "127.0.0.1:");
        c
    }

    fn compose(&self, args: &[&str]) -> Result<String> {
        run(self.cmd().args(args))
    }

    /// `trine ARGS` inside a node's container.
    fn trine(&self, node: &str, args: &[&str]) -> Result<String> {
        run(self.cmd().args(["exec", "-T", node, "trine"]).args(args))
    }

    fn container(&self, service: &str) -> Result<String> {
        let id = self.compose(&["ps", "-q", service])?.trim().to_owned();
        ensure!(!id.is_empty(), "service {service} has no container");
        Ok(id)
    }

    fn inspect(&self, service: &str, format: &str) -> Result<String> {
        let id = self.container(service)?;
        Ok(
            run(Command::new("docker").args(["inspect", "-f", format, &id]))?
                .trim()
                .to_owned(),
        )
    }

    /// The host address a service's container port is published on.
    fn port(&self, service: &str, port: u16) -> Result<String> {
        let out = self.compose(&["port", service, &port.to_string()])?;
        let addr = out.trim().to_owned();
        ensure!(!addr.is_empty(), "{service}:{port} is not published");
        Ok(addr)
    }

    fn labelled(&self, kind: &str) -> Result<Vec<String>> {
        let filter = format!("label=com.docker.compose.project={}", self.project);
        let out = match kind {
            "container" => run(Command::new("docker").args(["ps", "-aq", "--filter", &filter]))?,
            "volume" => {
                run(Command::new("docker").args(["volume", "ls", "-q", "--filter", &filter]))?
            }
            _ => run(Command::new("docker").args(["network", "ls", "-q", "--filter", &filter]))?,
        };
        Ok(out.lines().map(str::to_owned).collect())
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if !self.down {
            // Not brought down by the test: it failed; show why.
            if let Ok(out) = self.cmd().args(["logs", "--tail", "30"]).output() {
                eprintln!("compose logs (last lines of each service):\n{}", text(&out));
            }
            let _ = self
                .cmd()
                .args(["down", "-v", "--remove-orphans", "-t", "5"])
                .output();
        }
        for image in &self.images {
            let _ = Command::new("docker").args(["rmi", "-f", image]).output();
        }
    }
}

/// `docker compose` (v2 plugin) where it exists, else `docker-compose`.
fn compose_program() -> Result<Vec<String>> {
    let v2 = Command::new("docker").args(["compose", "version"]).output();
    if v2.is_ok_and(|o| o.status.success()) {
        return Ok(vec!["docker".into(), "compose".into()]);
    }
    let v1 = Command::new("docker-compose").arg("version").output();
    if v1.is_ok_and(|o| o.status.success()) {
        return Ok(vec!["docker-compose".into()]);
    }
    bail!(
        "neither `docker compose` nor `docker-compose` runs here: this test needs Docker Engine with Compose (Debian: apt-get install docker.io docker-compose)"
    )
}

fn wait<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        match probe() {
            Ok(Some(v)) => {
                eprintln!("{what}: after {:.1}s", started.elapsed().as_secs_f64());
                return Ok(v);
            }
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if started.elapsed() > limit {
            bail!("{what}: not within {limit:?} (last error: {last})");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

async fn get_json(url: &str) -> Result<serde_json::Value> {
    let body = reqwest::get(url).await?.bytes().await?;
    serde_json::from_slice(&body).with_context(|| format!("{url} answered no JSON"))
}

#[derive(serde::Deserialize)]
struct StatusRow {
    name: String,
    region: String,
    role: String,
    status: String,
    reachable: bool,
    leader_id: u64,
    node_id: u64,
}

fn status(c: &Compose, node: &str) -> Result<Vec<StatusRow>> {
    c.trine(
        node,
        &["status", "--node", "127.0.0.1:7400", "--output", "json"],
    )?
    .lines()
    .map(|l| serde_json::from_str(l).with_context(|| format!("status line {l}")))
    .collect()
}

#[test]
fn compose_testnet_runs_serves_survives_a_killed_node_and_leaves_nothing_behind() -> Result<()> {
    run(Command::new("docker").arg("info")).context(
        "the Docker daemon does not answer: this test needs Docker Engine (start it: systemctl start docker)",
    )?;
    let program = compose_program()?;
    let tag = format!("ci-{}", std::process::id());
    let mut c = Compose {
        program,
        project: format!("trine-{tag}"),
        images: [
            format!("trine:{tag}"),
            format!("trine-prometheus:{tag}"),
            format!("trine-alertmanager:{tag}"),
        ],
        down: false,
    };

    // The images, built by the script users run, around the binary under test.
    let started = Instant::now();
    run(Command::new("bash")
        .arg(deploy_dir().join("docker/build-image.sh"))
        .arg("--binary")
        .arg(trine_tests::trine_bin())
        .args(["--tag", &c.images[0]])
        .args(["--monitoring", "--prometheus-tag", &c.images[1]])
        .args(["--alertmanager-tag", &c.images[2]]))?;
    eprintln!("images built in {:.1}s", started.elapsed().as_secs_f64());

    c.compose(&["up", "-d"])?;

    // Every node's HEALTHCHECK passes, and the cluster has formed: 7 nodes
    // up in 4 regions, all agreeing on one leader.
    wait("7 nodes healthy", Duration::from_secs(180), || {
        for (node, _) in NODES {
            let health = c.inspect(node, "{{.State.Health.Status}}")?;
            if health != "healthy" {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })?;
    let rows = wait(
        "one leader over 7 nodes up",
        Duration::from_secs(120),
        || {
            let rows = status(&c, "us-east-1")?;
            let up = rows
                .iter()
                .filter(|r| r.reachable && r.status == "up")
                .count();
            let leaders: std::collections::BTreeSet<u64> =
                rows.iter().map(|r| r.leader_id).collect();
            let leading = rows.iter().filter(|r| r.role == "leader").count();
            Ok((rows.len() == 7
                && up == 7
                && leaders.len() == 1
                && !leaders.contains(&0)
                && leading == 1)
                .then_some(rows))
        },
    )?;
    for (node, region) in NODES {
        let row = rows
            .iter()
            .find(|r| r.name == node)
            .with_context(|| format!("{node} is missing from trine status"))?;
        ensure!(
            row.region == region,
            "{node} is in {}, not {region}",
            row.region
        );
    }
    let regions: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r.region.as_str()).collect();
    ensure!(regions.len() == 4, "regions: {regions:?}");

    // The one-shot deploy service deployed the tiny model; a request from
    // the host through us-east-1's published OpenAI port is served.
    wait(
        "the deploy service finished",
        Duration::from_secs(120),
        || {
            let state = c.inspect("deploy", "{{.State.Status}} {{.State.ExitCode}}")?;
            match state.as_str() {
                "exited 0" => Ok(Some(())),
                s if s.starts_with("exited") => bail!("the deploy service failed: {s}"),
                _ => Ok(None),
            }
        },
    )?;
    let http = c.port("us-east-1", 7401)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = serde_json::json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 8,
    });
    let answer: serde_json::Value = wait(
        "a chat completion from the host",
        Duration::from_secs(60),
        || {
            runtime.block_on(async {
                let r = reqwest::Client::new()
                    .post(format!("http://{http}/v1/chat/completions"))
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await?;
                if !r.status().is_success() {
                    bail!("{}: {}", r.status(), r.text().await?);
                }
                Ok(Some(serde_json::from_slice(&r.bytes().await?)?))
            })
        },
    )?;
    ensure!(
        answer["usage"]["completion_tokens"] == 8
            && answer["choices"][0]["finish_reason"] == "length",
        "{answer}"
    );
    // Through another node's container, by the compose network's names.
    let out = c.trine(
        "ap-southeast-1",
        &[
            "complete",
            "--node",
            "ap-southeast-1:7400",
            "--model",
            "tiny",
            "--max-tokens",
            "4",
            "--verbose",
            "Hello",
        ],
    )?;
    eprintln!("trine complete through ap-southeast-1: {}", out.trim());

    // Kill a voter that is not the leader: the rest stay writable.
    let leader = rows
        .iter()
        .find(|r| r.role == "leader")
        .context("no leader")?;
    let victim = rows
        .iter()
        .find(|r| r.role == "voter" && r.node_id != leader.node_id && r.name != "us-east-1")
        .context("no voter besides the leader to kill")?
        .name
        .clone();
    let killed = Instant::now();
    run(Command::new("docker").args(["kill", &c.container(&victim)?]))?;
    eprintln!("killed {victim} (a voter; the leader is {})", leader.name);
    // A new name per try: a try that timed out may still have committed.
    let mut tries = 0;
    wait("a write after the kill", Duration::from_secs(30), || {
        tries += 1;
        let name = format!("after-kill-{tries}");
        c.trine(
            "us-east-1",
            &["token", "create", "--node", "127.0.0.1:7400", &name],
        )?;
        Ok(Some(()))
    })?;
    let listed = c.trine("us-east-1", &["token", "list", "--node", "127.0.0.1:7400"])?;
    ensure!(
        listed.contains("after-kill"),
        "the token written after the kill is not listed:\n{listed}"
    );

    // NodeDown fires in the compose Prometheus for that node only, with its
    // region, within the alert's `for` (1 m) plus a few 5 s scrapes.
    let prometheus = c.port("prometheus", 9090)?;
    let firing = wait("NodeDown firing", Duration::from_secs(150), || {
        runtime.block_on(async {
            let v = get_json(&format!("http://{prometheus}/api/v1/alerts")).await?;
            let firing: Vec<serde_json::Value> = v["data"]["alerts"]
                .as_array()
                .context("no alerts array")?
                .iter()
                .filter(|a| a["labels"]["alertname"] == "NodeDown" && a["state"] == "firing")
                .cloned()
                .collect();
            Ok((!firing.is_empty()).then_some(firing))
        })
    })?;
    eprintln!(
        "NodeDown fired {:.0}s after the kill",
        killed.elapsed().as_secs_f64()
    );
    ensure!(
        firing.len() == 1,
        "NodeDown fired for more than the killed node: {firing:?}"
    );
    let region = NODES.iter().find(|(n, _)| *n == victim).map(|(_, r)| *r);
    ensure!(
        firing[0]["labels"]["instance"] == format!("{victim}:7401")
            && firing[0]["labels"]["region"].as_str() == region,
        "NodeDown labels: {}",
        firing[0]["labels"]
    );
    // Alertmanager is up and received it.
    let alertmanager = c.port("alertmanager", 9093)?;
    wait(
        "Alertmanager holds NodeDown",
        Duration::from_secs(60),
        || {
            runtime.block_on(async {
                let v = get_json(&format!("http://{alertmanager}/api/v2/alerts")).await?;
                Ok(v.as_array()
                    .context("no alerts array")?
                    .iter()
                    .any(|a| a["labels"]["alertname"] == "NodeDown")
                    .then_some(()))
            })
        },
    )?;

    // `down -v` leaves no container, volume or network of the project.
    c.compose(&["down", "-v", "--remove-orphans", "-t", "10"])?;
    c.down = true;
    for kind in ["container", "volume", "network"] {
        let left = c.labelled(kind)?;
        ensure!(left.is_empty(), "`down -v` left {kind}s behind: {left:?}");
    }
    Ok(())
}
