//! `trine testnet`: a local multi-region cluster of real `trine node`
//! processes on loopback — own ports, data dirs and certificates (a CA made
//! for the run) — bootstrapped, joined, waited on until healthy, shown, and
//! stopped cleanly on Ctrl-C or SIGTERM. Children get SIGTERM if the
//! testnet itself dies (PR_SET_PDEATHSIG), so none is orphaned. With
//! `--data-dir` the cluster restarts from disk on the same ports.

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::cluster_cmd::{Target, gather, write_status_table};

/// The env var a child reads to tie its life to the testnet's.
pub const PARENT_PID_ENV: &str = "TRINE_TESTNET_PARENT";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Latency {
    /// Public-cloud RTTs between the regions (us-east↔ap-southeast ≈ 215 ms),
    /// simulated inside the nodes; Raft uses its WAN timeouts.
    Realistic,
    /// No added latency; Raft uses its LAN timeouts.
    None,
}

#[derive(Debug, Args)]
pub struct TestnetArgs {
    /// Number of nodes; spread over the regions in --regions order when
    /// --regions gives no counts.
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Regions and node counts, e.g. us-east:2,us-west:2,eu-central:2,ap-southeast:1.
    #[arg(
        long,
        default_value = DEFAULT_REGIONS,
        value_name = "REGION:N,..."
    )]
    pub regions: String,
    /// Simulated inter-region latency.
    #[arg(long, value_enum, default_value = "realistic")]
    pub latency: Latency,
    /// Keep the cluster's state here (restart it later with the same flag);
    /// without it a temporary directory is used and removed at exit.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// First port: node i uses base+10i (gRPC), +1 (HTTP), +2 (libp2p), +3 (Raft).
    #[arg(long, default_value_t = 7600)]
    pub base_port: u16,
    /// Give up if the cluster is not healthy within this long.
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Start, wait until healthy, print, then stop (for scripts and tests).
    #[arg(long)]
    pub exit_when_ready: bool,
    /// The model to deploy once the cluster is healthy: a GGUF file or a
    /// Hugging Face directory [default: a synthetic `tiny` model (random
    /// ternary weights, a few MB) written to <data-dir>/models/tiny.gguf].
    #[arg(long, value_name = "PATH", conflicts_with = "no_model")]
    pub model: Option<PathBuf>,
    /// The name clients ask for [default: tiny, or the file's stem].
    #[arg(long, value_name = "NAME")]
    pub model_name: Option<String>,
    /// Replicas of the model, spread over regions.
    #[arg(long, default_value_t = 2)]
    pub replicas: u32,
    /// Pipeline stages per replica.
    #[arg(long, default_value_t = 1)]
    pub stages: u32,
    /// Deploy no model (the cluster only).
    #[arg(long)]
    pub no_model: bool,
    /// Passed to every node: most sequences per batched step (1 turns
    /// continuous batching off) [default: the node's, 32].
    #[arg(long, value_name = "N")]
    pub max_batch: Option<u32>,
    /// Also start a real Prometheus (the `prometheus` binary from Debian's
    /// package, on PATH) scraping every node every 2 s with Trine's alerting
    /// rules (deploy/monitoring/alerts.yml), on 127.0.0.1:<base-port + 90>.
    #[arg(long)]
    pub prometheus: bool,
    /// Start every node with --fault-injection (the Admin API's
    /// InjectFault), as `trine chaos` does.
    #[arg(long)]
    pub fault_injection: bool,
}

/// The alerting rules shipped in deploy/monitoring, carried by the binary.
pub const ALERT_RULES: &str = include_str!("../../deploy/monitoring/alerts.yml");

/// A Prometheus this testnet started.
struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// Writes a Prometheus config scraping every node of `layout` (each target
/// labelled with its region) with the alerting rules, and starts it.
fn start_prometheus(layout: &Layout, root: &Path, port: u16) -> Result<Prometheus> {
    let dir = root.join("prometheus");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("alerts.yml"), ALERT_RULES)?;
    let mut by_region: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for s in &layout.nodes {
        by_region
            .entry(s.region.as_str())
            .or_default()
            .push(format!("\"127.0.0.1:{}\"", s.http));
    }
    let mut config = String::from(
        "# Written by `trine testnet --prometheus`.\nglobal:\n  scrape_interval: 2s\n  evaluation_interval: 2s\nrule_files:\n  - alerts.yml\nscrape_configs:\n  - job_name: trine\n    static_configs:\n",
    );
    for (region, targets) in by_region {
        config.push_str(&format!(
            "      - targets: [{}]\n        labels: {{ region: {region} }}\n",
            targets.join(", ")
        ));
    }
    std::fs::write(dir.join("prometheus.yml"), config)?;
    let log = std::fs::File::create(root.join("prometheus.log"))?;
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context(
            "cannot start `prometheus`: install Debian's package (apt-get install prometheus) or put the binary on PATH",
        )?;
    Ok(Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
    })
}

/// One node of the layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Slot {
    name: String,
    region: String,
    grpc: u16,
    http: u16,
    p2p: u16,
    raft: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Layout {
    latency: Latency,
    nodes: Vec<Slot>,
}

const LAYOUT_FILE: &str = "testnet.json";

/// (name, gRPC port) of each node of the testnet kept in `root`.
pub fn node_ports(root: &Path) -> Result<Vec<(String, u16)>> {
    let path = root.join(LAYOUT_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let layout: Layout =
        serde_json::from_slice(&bytes).with_context(|| format!("{} is damaged", path.display()))?;
    Ok(layout.nodes.into_iter().map(|s| (s.name, s.grpc)).collect())
}

/// Parses `--regions` (and `--nodes`) into (region, count) pairs.
/// The testnet's layout: seven nodes in four regions.
pub const DEFAULT_REGIONS: &str = "us-east:2,us-west:2,eu-central:2,ap-southeast:1";

/// The region of each node of the default testnet, in order.
pub fn default_node_regions() -> Vec<String> {
    regions(DEFAULT_REGIONS, None)
        .unwrap_or_default()
        .into_iter()
        .flat_map(|(r, n)| std::iter::repeat_n(r, n))
        .collect()
}

fn regions(spec: &str, nodes: Option<usize>) -> Result<Vec<(String, usize)>> {
    let mut out = Vec::new();
    let mut counted = true;
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once(':') {
            Some((r, n)) => {
                let n: usize = n
                    .parse()
                    .with_context(|| format!("--regions: {part:?}: the count must be a number"))?;
                out.push((r.to_owned(), n));
            }
            None => {
                counted = false;
                out.push((part.to_owned(), 0));
            }
        }
    }
    if out.is_empty() {
        bail!("--regions names no region; e.g. us-east:2,us-west:2,eu-central:2,ap-southeast:1");
    }
    let total: usize = out.iter().map(|(_, n)| n).sum();
    match nodes {
        Some(n) if !counted || n != total => {
            // Spread n nodes over the regions in order.
            for (_, c) in &mut out {
                *c = 0;
            }
            let len = out.len();
            for i in 0..n {
                out[i % len].1 += 1;
            }
        }
        None if !counted => bail!("--regions without counts needs --nodes"),
        _ => {}
    }
    let total: usize = out.iter().map(|(_, n)| n).sum();
    if !(1..=64).contains(&total) {
        bail!("a testnet has 1 to 64 nodes, not {total}");
    }
    Ok(out)
}

fn layout(args: &TestnetArgs) -> Result<Layout> {
    let mut nodes = Vec::new();
    for (region, count) in regions(&args.regions, args.nodes)? {
        for k in 0..count {
            let i = nodes.len() as u16;
            let base = args
                .base_port
                .checked_add(i * 10)
                .filter(|b| *b < u16::MAX - 10)
                .context("--base-port leaves no room for the ports of every node")?;
            nodes.push(Slot {
                name: format!("{region}-{}", k + 1),
                region: region.clone(),
                grpc: base,
                http: base + 1,
                p2p: base + 2,
                raft: base + 3,
            });
        }
    }
    Ok(Layout {
        latency: args.latency,
        nodes,
    })
}

fn check_ports(layout: &Layout) -> Result<()> {
    for s in &layout.nodes {
        for port in [s.grpc, s.http, s.p2p, s.raft] {
            TcpListener::bind(("127.0.0.1", port)).with_context(|| {
                format!(
                    "port {port} (for {}) is in use: another testnet may be running (`ss -ltnp 'sport = :{port}'`); stop it or pick --base-port",
                    s.name
                )
            })?;
        }
    }
    Ok(())
}

struct Running {
    slot: Slot,
    dir: PathBuf,
    child: Child,
}

fn spawn(
    slot: &Slot,
    root: &Path,
    first: &Slot,
    latency: Latency,
    index: usize,
    args: &TestnetArgs,
) -> Result<Running> {
    let dir = root.join(&slot.name);
    std::fs::create_dir_all(&dir)?;
    let tls = root.join("tls").join(&slot.name);
    if !tls.join(trine_control::tls::NODE_CERT).exists() {
        trine_control::tls::issue_node(&root.join("ca"), &slot.name, &[], &tls)?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join(format!("{}.log", slot.name)))?;
    let exe = std::env::current_exe().context("locating the trine binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("node")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--name", &slot.name, "--region", &slot.region])
        .args(["--grpc-addr", &format!("127.0.0.1:{}", slot.grpc)])
        .args(["--http-addr", &format!("127.0.0.1:{}", slot.http)])
        .args(["--p2p-listen", &format!("/ip4/127.0.0.1/tcp/{}", slot.p2p)])
        .args(["--raft-addr", &format!("127.0.0.1:{}", slot.raft)])
        .arg("--tls-dir")
        .arg(&tls)
        .args(["--shutdown-timeout", "5s"])
        // Loopback only: no API tokens needed.
        .arg("--allow-anonymous");
    match latency {
        Latency::Realistic => {
            cmd.args(["--simulated-latency", "realistic", "--raft-profile", "wan"])
        }
        Latency::None => cmd.args(["--raft-profile", "lan"]),
    };
    if let Some(b) = args.max_batch {
        cmd.args(["--max-batch", &b.to_string()]);
    }
    if args.fault_injection {
        cmd.arg("--fault-injection");
    }
    if index == 0 {
        cmd.arg("--init")
            .arg("--admin-token-file")
            .arg(root.join(crate::auth::ADMIN_TOKEN_FILE));
    } else {
        cmd.args(["--join", &format!("127.0.0.1:{}", first.raft)]);
        cmd.args(["--bootstrap", &format!("/ip4/127.0.0.1/tcp/{}", first.p2p)]);
    }
    cmd.env(PARENT_PID_ENV, std::process::id().to_string())
        .env_remove("TRINE_CONFIG")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting node {}", slot.name))?;
    Ok(Running {
        slot: slot.clone(),
        dir,
        child,
    })
}

fn stop_all(running: &mut [Running]) {
    for r in running.iter() {
        if let Ok(pid) = i32::try_from(r.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for r in running.iter_mut() {
        loop {
            match r.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// Healthy: every node registered and reachable, all report the same
/// leader, and the voter count is what the voter rules give.
async fn healthy(target: &Target, n: usize) -> Result<bool> {
    let rows = gather(target).await?;
    if rows.len() < n {
        return Ok(false);
    }
    let mut leaders = std::collections::BTreeSet::new();
    let mut voters = 0;
    for (node, s) in &rows {
        let Some(s) = s else { return Ok(false) };
        if s.leader_id == 0 || node.status != trine_proto::v1::NodeStatus::Up as i32 {
            return Ok(false);
        }
        leaders.insert(s.leader_id);
        voters = s.voters.len();
    }
    let regions: Vec<String> = rows
        .iter()
        .map(|(n, _)| n.locality.clone().unwrap_or_default().region)
        .collect();
    let want = trine_control::voters::voter_count(
        regions.iter().map(String::as_str),
        &trine_control::voters::Rules::default(),
    );
    Ok(leaders.len() == 1 && voters == want)
}

pub fn run(args: &TestnetArgs) -> Result<()> {
    let (root, _temp) = match &args.data_dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("trine-testnet-")
                .tempdir()?;
            (t.path().to_owned(), Some(t))
        }
    };
    std::fs::create_dir_all(&root)?;
    let layout_path = root.join(LAYOUT_FILE);
    let layout = match std::fs::read(&layout_path) {
        Ok(bytes) => {
            let saved: Layout = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is damaged", layout_path.display()))?;
            eprintln!(
                "restarting the {}-node testnet in {} (its layout and ports are kept; other flags are ignored)",
                saved.nodes.len(),
                root.display()
            );
            saved
        }
        Err(_) => {
            let l = layout(args)?;
            std::fs::write(&layout_path, serde_json::to_vec_pretty(&l)?)?;
            l
        }
    };
    check_ports(&layout)?;
    if !root.join("ca").join(trine_control::tls::CA_CERT).exists() {
        trine_control::tls::init_ca(&root.join("ca"), "testnet")?;
    }
    // The cluster's first admin token: TRINE_ADMIN_TOKEN's secret, else a
    // new one; kept (0600) for the CLI and for restarts.
    let admin_token = root.join(crate::auth::ADMIN_TOKEN_FILE);
    if !admin_token.exists() {
        crate::auth::write_secret(&admin_token, &crate::auth::initial_secret(None)?)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let first = layout.nodes[0].clone();
    let n = layout.nodes.len();
    eprintln!(
        "starting {n} nodes in {} regions on 127.0.0.1 (latency: {:?}); logs in {}",
        layout
            .nodes
            .iter()
            .map(|s| &s.region)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        layout.latency,
        root.display()
    );
    let started = Instant::now();
    let mut running: Vec<Running> = Vec::new();
    let mut prometheus: Option<Prometheus> = None;
    let result = runtime.block_on(async {
        for (i, slot) in layout.nodes.iter().enumerate() {
            running.push(spawn(slot, &root, &first, layout.latency, i, args)?);
        }
        let target = Target {
            node: format!("127.0.0.1:{}", first.grpc),
            data_dir: None,
            timeout: Duration::from_secs(2),
            admin_token_file: Some(root.join(crate::auth::ADMIN_TOKEN_FILE)),
            ca_cert: None,
            client_cert: None,
            client_key: None,
        };
        let deadline = started + args.timeout;
        let mut last = String::new();
        loop {
            for r in running.iter_mut() {
                if let Ok(Some(status)) = r.child.try_wait() {
                    bail!(
                        "node {} exited ({status}) while starting; see {}",
                        r.slot.name,
                        root.join(format!("{}.log", r.slot.name)).display()
                    );
                }
            }
            match healthy(&target, n).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                bail!(
                    "the testnet was not healthy after {:?} (last: {last}); logs are in {}",
                    args.timeout,
                    root.display()
                );
            }
            let up = running
                .iter()
                .filter(|r| r.dir.join("data").join("endpoints.json").exists())
                .count();
            eprint!("\r  {up}/{n} nodes serving, waiting for the cluster to form… {:>4.1}s", started.elapsed().as_secs_f64());
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        eprintln!("\rcluster healthy after {:.1}s                                              ", started.elapsed().as_secs_f64());
        let model = if args.no_model {
            None
        } else {
            Some(deploy_model(args, &root, &first).await?)
        };
        if args.prometheus {
            let port = args
                .base_port
                .checked_add(90)
                .context("--base-port leaves no room for Prometheus's port")?;
            let mut p = start_prometheus(&layout, &root, port)?;
            // Ready when it answers; its first scrape follows within 2 s.
            let ready = format!("{}/-/ready", p.url);
            let started = Instant::now();
            loop {
                if let Ok(Some(status)) = p.child.try_wait() {
                    bail!(
                        "Prometheus exited ({status}) on start (is port {port} taken?); see {}",
                        root.join("prometheus.log").display()
                    );
                }
                if reqwest::get(&ready).await.is_ok_and(|r| r.status().is_success()) {
                    break;
                }
                if started.elapsed() > Duration::from_secs(30) {
                    bail!("Prometheus did not become ready in 30 s; see {}", root.join("prometheus.log").display());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            prometheus = Some(p);
        }
        let rows = gather(&target).await?;
        let mut out = std::io::stdout().lock();
        write_status_table(&mut out, &rows)?;
        writeln!(out)?;
        writeln!(out, "{:<16} {:<22} {:<28} {:<32} {:<16}", "NODE", "GRPC (trine --node)", "METRICS", "P2P", "RAFT (mTLS)")?;
        for s in &layout.nodes {
            writeln!(
                out,
                "{:<16} {:<22} {:<28} {:<32} {:<16}",
                s.name,
                format!("127.0.0.1:{}", s.grpc),
                format!("http://127.0.0.1:{}/metrics", s.http),
                format!("/ip4/127.0.0.1/tcp/{}", s.p2p),
                format!("127.0.0.1:{}", s.raft)
            )?;
        }
        writeln!(out)?;
        writeln!(out, "data and logs: {}", root.display())?;
        writeln!(out, "admin token (the cluster's first, named root; the Admin API needs it): export TRINE_ADMIN_TOKEN_FILE={}", root.join(crate::auth::ADMIN_TOKEN_FILE).display())?;
        writeln!(out, "try: trine status --node 127.0.0.1:{0}   trine chain head --node 127.0.0.1:{0}   trine peers --node 127.0.0.1:{0}", first.grpc)?;
        writeln!(
            out,
            "console: http://127.0.0.1:{}/ui (every node serves it on its HTTP port)",
            first.http
        )?;
        if let Some(p) = &prometheus {
            writeln!(out, "prometheus: {} (alerts: {}/alerts; log: {})", p.url, p.url, root.join("prometheus.log").display())?;
        }
        if let Some(name) = &model {
            let body = serde_json::json!({
                "model": name,
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 32,
            });
            writeln!(out)?;
            writeln!(out, "model {name} is ready; any node answers (OpenAI API, no token needed on this loopback testnet):")?;
            writeln!(
                out,
                "  curl -s http://127.0.0.1:{}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'",
                first.http
            )?;
            writeln!(out, "  trine chat --node 127.0.0.1:{} --model {name}", first.grpc)?;
        }
        out.flush()?;
        if args.exit_when_ready {
            return Ok(());
        }
        writeln!(out, "press Ctrl-C to stop every node")?;
        out.flush()?;
        watch(&mut running).await
    });
    eprintln!("stopping {} nodes…", running.len());
    drop(prometheus);
    stop_all(&mut running);
    eprintln!("stopped");
    result
}

/// Deploys the testnet's model (unless a model of that name already is, on
/// a restart) and waits until a replica is ready; returns its name.
async fn deploy_model(args: &TestnetArgs, root: &Path, first: &Slot) -> Result<String> {
    use trine_proto::v1;
    let (path, name) = match &args.model {
        Some(p) => {
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into());
            (p.clone(), args.model_name.clone().unwrap_or(stem))
        }
        None => (
            root.join("models").join("tiny.gguf"),
            args.model_name.clone().unwrap_or_else(|| "tiny".into()),
        ),
    };
    let grpc = format!("http://127.0.0.1:{}", first.grpc);
    let mut client = v1::inference_client::InferenceClient::connect(grpc.clone())
        .await
        .with_context(|| format!("connecting to {grpc}"))?;
    let listed = client
        .list_models(v1::ListModelsRequest::default())
        .await
        .context("listing models")?
        .into_inner();
    if !listed.models.iter().any(|m| m.name == name) {
        if args.model.is_none() && !path.exists() {
            eprintln!("writing a synthetic tiny model to {}", path.display());
            std::fs::create_dir_all(path.parent().unwrap_or(root))?;
            trine_engine::synth::Weights::generate(trine_engine::synth::Preset::Tiny, 0)
                .to_gguf(trine_engine::synth::TernaryType::I2S)?
                .write(&path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let deploy = crate::deploy_cmd::DeployArgs {
            target: Target {
                node: format!("127.0.0.1:{}", first.grpc),
                data_dir: None,
                timeout: Duration::from_secs(30),
                admin_token_file: Some(root.join(crate::auth::ADMIN_TOKEN_FILE)),
                ca_cert: None,
                client_cert: None,
                client_key: None,
            },
            model: path.clone(),
            file: None,
            revision: "main".into(),
            endpoint: None,
            name: name.clone(),
            stages: args.stages,
            replicas: args.replicas,
            regions: Vec::new(),
            source: None,
        };
        // The deploy command runs its own runtime: off this one's threads.
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = tx.send(crate::deploy_cmd::deploy(&deploy));
        });
        rx.await.context("the deploy thread died")??;
    }
    let started = Instant::now();
    loop {
        let listed = client
            .list_models(v1::ListModelsRequest::default())
            .await
            .context("listing models")?
            .into_inner();
        let m = listed.models.iter().find(|m| m.name == name);
        let ready = m.map_or(0, |m| m.ready_replicas);
        let want = m.map_or(args.replicas, |m| m.replicas);
        if ready >= want {
            eprintln!(
                "\rmodel {name}: {ready}/{want} replicas ready after {:.1}s            ",
                started.elapsed().as_secs_f64()
            );
            return Ok(name);
        }
        if started.elapsed() > args.timeout {
            bail!(
                "model {name} had {ready}/{want} replicas ready after {:?}; `trine placement --node 127.0.0.1:{} --model {name}` shows why",
                args.timeout,
                first.grpc
            );
        }
        eprint!(
            "\r  model {name}: {ready}/{want} replicas ready… {:>4.1}s",
            started.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits for SIGINT/SIGTERM, reporting nodes that exit on their own.
async fn watch(running: &mut [Running]) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut reported = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        for r in running.iter_mut() {
            if let Ok(Some(status)) = r.child.try_wait()
                && reported.insert(r.slot.name.clone())
            {
                eprintln!(
                    "node {} exited ({status}); the others keep running",
                    r.slot.name
                );
            }
        }
    }
}

/// In a node started by a testnet (or a testnet started by `trine chaos`):
/// get SIGTERM when the parent dies.
pub fn tie_to_parent() {
    let Some(parent) = std::env::var(PARENT_PID_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
    // The parent may have died before the call above took effect.
    if nix::unistd::getppid().as_raw() != parent {
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_regions_give_the_seven_node_layout() {
        let r = regions("us-east:2,us-west:2,eu-central:2,ap-southeast:1", None).unwrap();
        assert_eq!(r.iter().map(|(_, n)| n).sum::<usize>(), 7);
        let r = regions("us-east:2,us-west:2,eu-central:2,ap-southeast:1", Some(4)).unwrap();
        assert_eq!(r.iter().map(|(_, n)| *n).collect::<Vec<_>>(), [1, 1, 1, 1]);
        assert!(regions("a,b", None).is_err());
        assert_eq!(
            regions("a,b", Some(3)).unwrap(),
            [("a".into(), 2), ("b".into(), 1)]
        );
        assert!(regions("a:x", None).is_err());
        assert!(regions("a:0", None).is_err());
    }
}
