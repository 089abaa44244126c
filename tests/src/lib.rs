//! Harness for end-to-end tests: builds the real `trine` binary once, starts
//! nodes as child processes on port 0 with temp data dirs, waits on
//! conditions with deadlines, and talks to them only through their public
//! surfaces (HTTP, gRPC, files the node documents, signals, exit status).
//!
//! - [`trine_bin`]: path of the binary under test.
//! - [`Node`]: a running `trine node` and its endpoints.
//! - [`run`]: a one-shot `trine` invocation with a timeout.

use std::fs::File;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::Deserialize;

/// How long a node may take to become ready on a loaded 2-core machine.
pub const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a clean stop may take (the node's drain deadline is 10 s by
/// default; tests that need less pass `--shutdown-timeout`).
pub const STOP_DEADLINE: Duration = Duration::from_secs(15);

/// The `trine` binary under test: `$TRINE_BIN` when set (e.g. a release or
/// installed build), else this workspace's binary in the same target dir and
/// profile as the running test, built once per test process with cargo (a
/// no-op when it is fresh).
pub fn trine_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        locate_or_build().unwrap_or_else(|e| panic!("cannot get the trine binary: {e:#}"))
    })
}

fn locate_or_build() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("TRINE_BIN") {
        return Ok(PathBuf::from(bin));
    }
    // <target>/<profile-dir>/deps/<test-exe>
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable is not in <target>/<profile>/deps")?;
    let target_dir = profile_dir.parent().context("no target dir")?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_owned(),
        Some(other) => other.to_owned(),
        None => bail!(
            "cannot tell the cargo profile from {}",
            profile_dir.display()
        ),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--workspace",
            "--bins",
            "--profile",
            &profile,
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .context("running cargo build for the trine binary")?;
    if !status.success() {
        bail!("cargo build of the trine binary failed ({status})");
    }
    let bin = profile_dir.join("trine");
    if !bin.exists() {
        bail!("{} was not built", bin.display());
    }
    Ok(bin)
}

/// A `trine` command with a clean environment: no TRINE_* or RUST_LOG from
/// the developer's shell leaks into a test. It carries this test process's
/// admin token in TRINE_ADMIN_TOKEN, so the clusters a test initialises
/// (`trine node --init`, `trine testnet`) get it as their first admin
/// token and the admin commands a test runs present it.
pub fn trine() -> Command {
    command_for(trine_bin())
}

/// Like [`trine`], but for a program that runs the binary (e.g. setpriv).
pub fn command_for(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TRINE_ADMIN_TOKEN", admin_secret())
        .stdin(Stdio::null());
    cmd
}

/// A loopback address (127.0.0.1:port) with a port that was free a moment
/// ago, for a listener the test's node binds itself.
pub fn free_addr() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(format!("127.0.0.1:{}", l.local_addr()?.port()))
}

/// The admin token's secret of every cluster this test process starts: new
/// for each process, from the OS's random source.
pub fn admin_secret() -> &'static str {
    static SECRET: OnceLock<String> = OnceLock::new();
    SECRET.get_or_init(|| trine_node::token_cmd::new_secret().expect("OS random source"))
}

/// An Admin client for the node at `uri` (http://host:port) that presents
/// [`admin_secret`].
pub async fn admin_client(uri: &str) -> Result<trine_node::cluster_cmd::AdminConn> {
    let channel = tonic::transport::Channel::from_shared(uri.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(
        trine_proto::v1::admin_client::AdminClient::with_interceptor(
            channel,
            trine_node::cluster_cmd::Bearer::new(Some(admin_secret()))?,
        ),
    )
}

/// Runs a command to completion, killing it after `timeout`.
/// `trine model synth --preset tiny --format i2_s` into `dir/tiny.gguf`.
pub fn synth_tiny(dir: &Path) -> Result<PathBuf> {
    let model = dir.join("tiny.gguf");
    let mut c = trine();
    c.args([
        "model", "synth", "--preset", "tiny", "--format", "i2_s", "--out",
    ])
    .arg(&model);
    let out = run(c, Duration::from_secs(120))?;
    anyhow::ensure!(
        out.status.success(),
        "trine model synth: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(model)
}

/// What `trine generate` writes for `model` and "Hello": 24 greedy tokens
/// with a repetition penalty of 5 (without one the synthetic model repeats
/// its last token), the reference the serving tests compare against.
pub fn local_answer(model: &Path) -> Result<String> {
    let mut c = trine();
    c.args([
        "generate",
        "-n",
        "24",
        "--repetition-penalty",
        "5",
        "--model",
    ])
    .arg(model)
    .arg("Hello");
    let out = run(c, Duration::from_secs(60))?;
    anyhow::ensure!(
        out.status.success(),
        "trine generate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?
        .trim_end_matches('\n')
        .to_owned())
}

/// `trine deploy --node NODE MODEL` plus `args`, which must succeed.
pub fn deploy(node: &str, model: &Path, args: &[&str]) -> Result<Output> {
    let mut c = trine();
    c.args(["deploy", "--node", node]).args(args).arg(model);
    let out = run(c, Duration::from_secs(60))?;
    anyhow::ensure!(
        out.status.success(),
        "trine deploy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

pub fn run(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let dir = tempfile::tempdir()?;
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = cmd
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?)
        .spawn()
        .context("spawning trine")?;
    let status = wait_exit(&mut child, timeout)?;
    Ok(Output {
        status,
        stdout: std::fs::read(out_path)?,
        stderr: std::fs::read(err_path)?,
    })
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("process {} did not exit within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `cond` until it returns `Some`, or fails after `timeout`.
pub async fn wait_for<T, F: Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> F,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// GET `url`; the status and body, or `None` if nothing answered.
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    get_with(&reqwest::Client::new(), url).await
}

/// [`http_get`] with `client`.
pub async fn get_with(client: &reqwest::Client, url: &str) -> Option<(u16, String)> {
    let response = client.get(url).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// `endpoints.json`, as the node documents it.
#[derive(Debug, Clone, Deserialize)]
pub struct Endpoints {
    pub pid: u32,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub peer_id: String,
    pub p2p: Vec<String>,
    /// Mutual-TLS Raft address and Raft node id, for cluster members.
    #[serde(default)]
    pub raft: Option<SocketAddr>,
    #[serde(default)]
    pub node_id: Option<u64>,
    /// The client ports speak TLS (`--api-tls`), verified by `api_ca`.
    #[serde(default)]
    pub api_tls: bool,
    #[serde(default)]
    pub api_ca: Option<PathBuf>,
    /// The client ports require a client certificate: the node's own.
    #[serde(default)]
    pub api_client_identity: Option<(PathBuf, PathBuf)>,
}

/// A running `trine node` child process. Killed (SIGKILL) on drop if it is
/// still running.
#[derive(Debug)]
pub struct Node {
    child: Child,
    pub data_dir: PathBuf,
    pub endpoints: Endpoints,
    log_path: PathBuf,
    tmp: Option<tempfile::TempDir>,
}

impl Node {
    /// Starts a node on port 0 with a fresh data dir plus `extra` arguments,
    /// and waits until `/readyz` says ready.
    pub async fn start(extra: &[&str]) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let data_dir = tmp.path().join("data");
        Self::start_in(tmp, data_dir, extra).await
    }

    /// Starts a node on `data_dir` (which `tmp` should own).
    pub async fn start_in(
        tmp: tempfile::TempDir,
        data_dir: PathBuf,
        extra: &[&str],
    ) -> Result<Self> {
        let log_path = tmp.path().join("node.log");
        let mut cmd = trine();
        cmd.arg("node")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(["--p2p-listen", "/ip4/127.0.0.1/tcp/0"])
            .args(extra)
            .stdout(File::create(tmp.path().join("node.out"))?)
            .stderr(File::create(&log_path)?);
        let mut child = cmd.spawn().context("spawning trine node")?;
        let pid = child.id();
        let endpoints_file = data_dir.join("endpoints.json");
        let endpoints = wait_for("endpoints.json", START_DEADLINE, || {
            let exited = child.try_wait().ok().flatten();
            let file = std::fs::read(&endpoints_file).ok();
            async move {
                if let Some(status) = exited {
                    return Some(Err(status));
                }
                let e: Endpoints = serde_json::from_slice(&file?).ok()?;
                (e.pid == pid).then_some(Ok(e))
            }
        })
        .await?;
        let endpoints = match endpoints {
            Ok(e) => e,
            Err(status) => bail!(
                "trine node exited with {status} before it was ready; its log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            ),
        };
        let node = Self {
            child,
            data_dir,
            endpoints,
            log_path,
            tmp: Some(tmp),
        };
        let url = node.url("/readyz");
        let http = node.http()?;
        wait_for("/readyz = 200", START_DEADLINE, || async {
            get_with(&http, &url)
                .await
                .filter(|(status, _)| *status == 200)
        })
        .await?;
        Ok(node)
    }

    /// Takes the temp dir that holds the data dir, so it outlives this
    /// node (to restart a node on the same data dir after it stopped).
    pub fn take_dir(&mut self) -> Option<tempfile::TempDir> {
        self.tmp.take()
    }

    fn scheme(&self) -> &'static str {
        if self.endpoints.api_tls {
            "https"
        } else {
            "http"
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme(), self.endpoints.http)
    }

    pub fn grpc_uri(&self) -> String {
        format!("{}://{}", self.scheme(), self.endpoints.grpc)
    }

    /// The CA bundle that verifies the node's client ports (with TLS).
    pub fn api_ca(&self) -> Result<String> {
        let path = self
            .endpoints
            .api_ca
            .as_ref()
            .context("endpoints.json names no CA bundle")?;
        Ok(std::fs::read_to_string(path)?)
    }

    /// An HTTP client for the node: trusting its CA bundle when it serves
    /// TLS, presenting its node certificate when it requires a client one.
    pub fn http(&self) -> Result<reqwest::Client> {
        let mut b = reqwest::Client::builder();
        if self.endpoints.api_tls {
            b = b
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(self.api_ca()?.as_bytes())?);
        }
        if let Some((cert, key)) = &self.endpoints.api_client_identity {
            let mut pem = std::fs::read(cert)?;
            pem.extend_from_slice(&std::fs::read(key)?);
            b = b.identity(reqwest::Identity::from_pem(&pem)?);
        }
        Ok(b.build()?)
    }

    /// A gRPC channel to the node (TLS verified by its CA bundle when it
    /// serves TLS).
    pub async fn channel(&self) -> Result<tonic::transport::Channel> {
        let mut endpoint = tonic::transport::Channel::from_shared(self.grpc_uri())?
            .connect_timeout(Duration::from_secs(5));
        if self.endpoints.api_tls {
            let mut tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(self.api_ca()?));
            if let Some((cert, key)) = &self.endpoints.api_client_identity {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    std::fs::read(cert)?,
                    std::fs::read(key)?,
                ));
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        Ok(endpoint.connect().await?)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = i32::try_from(self.child.id())?;
        nix::sys::signal::kill(Pid::from_raw(pid), signal)?;
        Ok(())
    }

    /// Waits for the process to exit; fails if it takes longer than `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let child = &mut self.child;
        let pid = child.id();
        let status = wait_for("exit", timeout, || {
            let status = child.try_wait().ok().flatten();
            async move { status }
        })
        .await;
        status.with_context(|| format!("trine node (pid {pid}) did not exit in time"))
    }

    /// The peers the node knows (Admin.ListPeers).
    pub async fn peers(&self) -> Result<trine_proto::v1::ListPeersResponse> {
        let mut client = trine_proto::v1::admin_client::AdminClient::new(self.channel().await?);
        let reply = client
            .list_peers(trine_proto::v1::ListPeersRequest {
                request_id: "test".into(),
            })
            .await?;
        Ok(reply.into_inner())
    }

    /// The node's `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        let (status, body) = get_with(&self.http()?, &self.url("/metrics"))
            .await
            .context("no answer from /metrics")?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(body)
    }

    /// The node's p2p address with its peer id, for `--bootstrap`.
    pub fn p2p_addr(&self) -> String {
        format!("{}/p2p/{}", self.endpoints.p2p[0], self.endpoints.peer_id)
    }

    /// Everything the node wrote to stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The value of the sample `series` (name and labels exactly as exposed,
/// e.g. `trine_peers{region="us-east"}`) in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Sum of every sample of metric `name` whose labels contain all `labels`
/// (each like `region="us-east"`).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let ok = (rest.is_empty() || rest.starts_with('{'))
                && labels.iter().all(|want| rest.contains(want));
            if ok { value.parse::<f64>().ok() } else { None }
        })
        .sum()
}

/// Lines of `stderr` that are error reports (start with "error:").
pub fn error_lines(stderr: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(str::to_owned)
        .collect()
}

/// A block of [`PORT_BLOCK`] loopback ports held by this test process for a
/// testnet or chaos cluster (node i uses base+10i..base+10i+3, Prometheus
/// base+90). Test processes run in parallel: a lock file per block (in the
/// temp dir, released when the process exits, however it exits) keeps two
/// of them off the same block, and each port is bound once to make sure
/// nothing else holds it. Picking the block from the process id alone let
/// two tests share one (CI run of 2026-12-04: "port 25600 is in use").
#[derive(Debug)]
pub struct Ports {
    pub base: u16,
    _lock: File,
}

/// Ports per block.
pub const PORT_BLOCK: u16 = 100;

/// Reserves a free block of ports in 12000-29999 (below Linux's ephemeral
/// range, so no outgoing connection takes one), starting the search at a
/// block chosen by the process id.
pub fn reserve_ports() -> Result<Ports> {
    const FIRST: u16 = 12_000;
    const BLOCKS: u16 = 180;
    let dir = std::env::temp_dir().join("trine-test-ports");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let start = (std::process::id() % u32::from(BLOCKS)) as u16;
    for k in 0..BLOCKS {
        let base = FIRST + (start + k) % BLOCKS * PORT_BLOCK;
        let path = dir.join(base.to_string());
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if lock.try_lock().is_err() {
            continue;
        }
        let free = (base..base + PORT_BLOCK).all(|p| {
            std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
                && std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
        });
        if free {
            return Ok(Ports { base, _lock: lock });
        }
    }
    bail!(
        "no free block of {PORT_BLOCK} loopback ports between {FIRST} and {}: stop leftover testnets (`pkill -f 'trine testnet'`)",
        FIRST + BLOCKS * PORT_BLOCK - 1
    )
}

/// A running `trine testnet` (a child process with its own node children).
/// SIGKILLed on drop if still running; its nodes then get SIGTERM from the
/// kernel (parent-death signal).
#[derive(Debug)]
pub struct Testnet {
    child: Child,
    pub dir: tempfile::TempDir,
    pub base_port: u16,
    _ports: Ports,
    out_path: PathBuf,
}

/// One node of a testnet as `trine status -o json` shows it.
#[derive(Debug, Clone, Deserialize)]
pub struct StatusRow {
    pub node_id: u64,
    pub name: String,
    pub region: String,
    pub role: String,
    pub status: String,
    pub reachable: bool,
    pub chain_height: Option<u64>,
    pub grpc_addr: String,
}

impl Testnet {
    /// Starts `trine testnet --no-model` with `extra` flags on a port range
    /// picked for this test process, and waits until it reports a healthy
    /// cluster.
    pub async fn start(extra: &[&str]) -> Result<Self> {
        let mut args = vec!["--no-model"];
        args.extend_from_slice(extra);
        Self::start_with(&args).await
    }

    /// [`Testnet::start`] with the testnet's default model deployed (its
    /// flags in `extra`), waiting until it is ready.
    pub async fn start_with_model(extra: &[&str]) -> Result<Self> {
        Self::start_with(extra).await
    }

    async fn start_with(extra: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ports = reserve_ports()?;
        let base_port = ports.base;
        let out_path = dir.path().join("testnet.out");
        let mut cmd = trine();
        cmd.arg("testnet")
            .arg("--data-dir")
            .arg(dir.path().join("net"))
            .args(["--base-port", &base_port.to_string()])
            .args(extra)
            .stdout(File::create(&out_path)?)
            .stderr(File::create(dir.path().join("testnet.err"))?);
        let child = cmd.spawn().context("spawning trine testnet")?;
        let mut t = Self {
            child,
            dir,
            base_port,
            _ports: ports,
            out_path,
        };
        let out = t.out_path.clone();
        wait_for(
            "the testnet to report a healthy cluster",
            Duration::from_secs(90),
            || {
                let exited = t.child.try_wait().ok().flatten();
                let text = std::fs::read_to_string(&out).unwrap_or_default();
                async move {
                    if exited.is_some() {
                        return Some(false);
                    }
                    text.contains("press Ctrl-C").then_some(true)
                }
            },
        )
        .await
        .and_then(|ok| {
            if ok {
                Ok(())
            } else {
                bail!("trine testnet exited early:\n{}", t.stderr())
            }
        })?;
        Ok(t)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("testnet.err")).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out_path).unwrap_or_default()
    }

    /// gRPC address of node `i` (base + 10i).
    pub fn grpc(&self, i: u16) -> String {
        format!("127.0.0.1:{}", self.base_port + 10 * i)
    }

    /// The data directory of a node of the testnet.
    /// The testnet's own directory (`--data-dir`).
    pub fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("net")
    }

    pub fn data_dir(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join("net").join(name).join("data")
    }

    /// The endpoints a node of the testnet wrote.
    pub fn endpoints(&self, name: &str) -> Result<Endpoints> {
        let path = self
            .dir
            .path()
            .join("net")
            .join(name)
            .join("data")
            .join("endpoints.json");
        Ok(serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("{}", path.display()))?,
        )?)
    }

    /// `trine status -o json` asked through `node`.
    pub fn status(&self, node: &str) -> Result<Vec<StatusRow>> {
        cli_json(&["status", "--node", node, "-o", "json"])
    }

    /// Stops the testnet with SIGTERM and waits for it to exit.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let pid = Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, Signal::SIGTERM)?;
        wait_exit(&mut self.child, Duration::from_secs(30))
    }
}

impl Drop for Testnet {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // To read a failed run's node logs: TRINE_KEEP_TESTNET=1 keeps the
        // testnet's directory (its path goes to stderr).
        if std::env::var_os("TRINE_KEEP_TESTNET").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("kept the testnet's directory {}", self.dir.path().display());
        }
    }
}

/// Runs `trine ARGS` (which must print one JSON object per line, `-o
/// json`) and parses every line.
pub fn cli_json<T: serde::de::DeserializeOwned>(args: &[&str]) -> Result<Vec<T>> {
    let mut c = trine();
    c.args(args);
    let out = run(c, Duration::from_secs(20))?;
    if !out.status.success() {
        bail!(
            "trine {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

/// `trine chain note` through `node`; the height on success.
pub fn chain_note(node: &str, text: &str) -> Result<u64> {
    let mut c = trine();
    c.args(["chain", "note", "--node", node, text]);
    let out = run(c, Duration::from_secs(20))?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8(out.stdout)?;
    text.trim()
        .rsplit(' ')
        .next()
        .and_then(|h| h.parse().ok())
        .with_context(|| format!("unexpected output {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_blocks_are_not_shared_and_skip_ports_in_use() -> Result<()> {
        let a = reserve_ports()?;
        let b = reserve_ports()?;
        assert_ne!(a.base, b.base, "two holders got the same block");
        let freed = a.base;
        drop(a);
        // Something else now listens inside the freed block: it is skipped.
        let squatter = std::net::TcpListener::bind(("127.0.0.1", freed + 55))?;
        let c = reserve_ports()?;
        assert_ne!(c.base, freed, "a block with a port in use was handed out");
        assert_ne!(c.base, b.base);
        drop(squatter);
        Ok(())
    }
}
