//! The cluster under test — a `trine testnet` this run starts (real node
//! processes on loopback, with fault injection on) or the compose cluster
//! (`compose`) — and the levers a fault pulls on it: signals to node
//! processes or Docker's kill/pause, restarts (the same command line; the
//! same container), the nodes' in-node fault layer (Admin InjectFault),
//! cgroup CPU and memory limits, a ballast on a node's own small disk, a
//! stale copy of its data dir.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead as _, BufReader};
use std::os::unix::ffi::OsStringExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Deserialize;
use tonic::transport::Channel;
use trine_proto::v1;
use trine_proto::v1::admin_client::AdminClient;
use trine_proto::v1::inference_client::InferenceClient;

use crate::Error;
use crate::compose::{Compose, ComposeOptions};
use crate::schedule::Slot;

/// The env var a testnet node reads to tie its life to its parent's.
const PARENT_PID_ENV: &str = "TRINE_TESTNET_PARENT";

/// One node of the cluster.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub region: String,
    /// gRPC and HTTP addresses (host:port).
    pub grpc: String,
    pub http: String,
    /// Its data dir.
    pub data: PathBuf,
    pub id: u64,
    /// Admin clients with the admin token, each on one lazily connected
    /// channel that every clone shares (it reconnects after a restart):
    /// `status` for the observers' one-second polls, `admin` for the
    /// workload's writes and reads.
    pub status: Admin,
    pub admin: Admin,
}

impl Node {
    fn new(
        name: String,
        region: String,
        grpc: String,
        http: String,
        data: PathBuf,
        id: u64,
        token: &str,
    ) -> Result<Self, Error> {
        Ok(Self {
            status: admin_client(&grpc, token, Duration::from_secs(1))?,
            admin: admin_client(&grpc, token, crate::workload::ADMIN_DEADLINE)?,
            name,
            region,
            grpc,
            http,
            data,
            id,
        })
    }
}

#[derive(Deserialize)]
struct LayoutFile {
    nodes: Vec<LayoutSlot>,
}

#[derive(Deserialize)]
struct LayoutSlot {
    name: String,
    region: String,
    grpc: u16,
    http: u16,
}

#[derive(Deserialize)]
struct Endpoints {
    pid: u32,
    #[serde(default)]
    node_id: Option<u64>,
}

/// How to start the cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The `trine` binary.
    pub exe: PathBuf,
    /// Where its data, logs and certificates go.
    pub dir: PathBuf,
    /// First port of the testnet.
    pub base_port: u16,
    /// Also run Prometheus with the alert rules.
    pub prometheus: bool,
    /// Give each node's directory a filesystem of its own (a 256 MiB tmpfs,
    /// needs root) so that one node's disk can be filled.
    pub small_disks: bool,
    /// Some: the compose cluster instead of `trine testnet`.
    pub compose: Option<ComposeOptions>,
}

/// Size of each node's own filesystem with `small_disks`.
const SMALL_DISK: &str = "256m";

/// A killed node's command line and environment.
type Launch = (Vec<OsString>, Vec<(OsString, OsString)>);

/// The testnet process while [`Cluster::start`] is still checking it: an
/// early return (it never came up, a file is missing) stops it, so no
/// cluster is left running behind an error.
struct Started(Option<Child>);

impl Started {
    fn get(&mut self) -> &mut Child {
        self.0.as_mut().expect("taken only on success")
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let _ = c.wait();
        }
    }
}

/// The nodes' own small filesystems, unmounted (with what they hold; the
/// logs live outside them) when dropped.
#[derive(Debug, Default)]
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn make(dir: &Path) -> Result<Self, Error> {
        let mut mounts = Self::default();
        for slot in crate::default_layout() {
            let dir = dir.join(&slot.name);
            std::fs::create_dir_all(&dir)?;
            let out = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={SMALL_DISK}"), "tmpfs"])
                .arg(&dir)
                .output()
                .map_err(|e| Error::Setup(format!("running mount: {e}")))?;
            if !out.status.success() {
                return Err(Error::Setup(format!(
                    "disk-full gives each node a {SMALL_DISK} tmpfs of its own and needs root to mount it: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            mounts.0.push(dir);
        }
        Ok(mounts)
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.drain(..) {
            let _ = Command::new("umount").arg("--lazy").arg(&m).status();
        }
    }
}

/// A node process this run restarted (its child now, not the testnet's).
#[derive(Debug)]
struct Restarted {
    child: Child,
}

/// The levers of a `trine testnet`: node processes, cgroups.
struct Local {
    testnet: Child,
    /// Command line and environment of each node, read before a kill.
    cmdlines: HashMap<String, Launch>,
    restarted: HashMap<String, Restarted>,
    cgroups: HashMap<String, PathBuf>,
    mem_cgroups: HashMap<String, PathBuf>,
}

enum Backend {
    Testnet(Local),
    Compose(Compose),
}

/// A running cluster: a `trine testnet` or a compose project.
pub struct Cluster {
    opts: ClusterOptions,
    pub nodes: Vec<Node>,
    token: String,
    /// Nodes whose processes are down (killed, not yet restarted).
    pub down: std::collections::BTreeSet<String>,
    pub prometheus: Option<String>,
    backend: Backend,
    /// Dropped last: the containers or processes stop first.
    mounts: Mounts,
}

impl Cluster {
    /// Starts the cluster with fault injection on and waits until it is
    /// up and its model deployed.
    pub fn start(opts: ClusterOptions) -> Result<Self, Error> {
        std::fs::create_dir_all(&opts.dir)?;
        let mounts = if opts.small_disks {
            Mounts::make(&opts.dir)?
        } else {
            Mounts::default()
        };
        match opts.compose.clone() {
            None => Self::start_testnet(opts, mounts),
            Some(c) => Self::start_compose(opts, &c, mounts),
        }
    }

    fn start_testnet(opts: ClusterOptions, mounts: Mounts) -> Result<Self, Error> {
        let log_path = opts.dir.join("testnet.out");
        let mut cmd = Command::new(&opts.exe);
        cmd.arg("testnet")
            .arg("--data-dir")
            .arg(&opts.dir)
            .args(["--base-port", &opts.base_port.to_string()])
            .args(["--timeout", "180s", "--fault-injection"])
            // It stops (and stops its nodes) if this run dies, even by SIGKILL.
            .env(PARENT_PID_ENV, std::process::id().to_string());
        if opts.prometheus {
            cmd.arg("--prometheus");
        }
        let mut child = Started(Some(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log_path)?)
                .spawn()
                .map_err(|e| Error::Setup(format!("starting {}: {e}", opts.exe.display())))?,
        ));
        let stdout = child.get().stdout.take().expect("piped");
        let mut out = String::new();
        let mut ready = false;
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            out.push_str(&line);
            out.push('\n');
            if line.starts_with("press Ctrl-C") {
                ready = true;
                break;
            }
        }
        std::fs::write(opts.dir.join("testnet.status"), &out)?;
        if !ready {
            return Err(Error::Setup(format!(
                "the testnet did not come up; see {}",
                log_path.display()
            )));
        }
        let prometheus = out
            .lines()
            .find_map(|l| l.strip_prefix("prometheus: "))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_owned);
        let layout: LayoutFile =
            serde_json::from_slice(&std::fs::read(opts.dir.join("testnet.json"))?)
                .map_err(|e| Error::Setup(format!("testnet.json: {e}")))?;
        let token = std::fs::read_to_string(opts.dir.join("admin.token"))?
            .trim()
            .to_owned();
        let mut nodes = Vec::new();
        for s in layout.nodes {
            let data = opts.dir.join(&s.name).join("data");
            let ep = endpoints(&data)?;
            nodes.push(Node::new(
                s.name,
                s.region,
                format!("127.0.0.1:{}", s.grpc),
                format!("127.0.0.1:{}", s.http),
                data,
                ep.node_id.unwrap_or(0),
                &token,
            )?);
        }
        Ok(Self {
            backend: Backend::Testnet(Local {
                testnet: child.0.take().expect("kept until here"),
                cmdlines: HashMap::new(),
                restarted: HashMap::new(),
                cgroups: HashMap::new(),
                mem_cgroups: HashMap::new(),
            }),
            opts,
            nodes,
            token,
            down: Default::default(),
            prometheus,
            mounts,
        })
    }

    fn start_compose(
        opts: ClusterOptions,
        copts: &ComposeOptions,
        mounts: Mounts,
    ) -> Result<Self, Error> {
        let layout = crate::default_layout();
        let mut data = Vec::new();
        for s in &layout {
            let d = opts.dir.join(&s.name).join("data");
            std::fs::create_dir_all(&d)?;
            data.push((s.name.clone(), d));
        }
        let up = Compose::start(copts, &opts.exe, &opts.dir, &data, opts.prometheus)?;
        let mut nodes = Vec::new();
        for (s, (_, d)) in layout.into_iter().zip(data) {
            let ip = up.compose.ips[&s.name].clone();
            // Its endpoints file names its Raft id once it has started.
            let started = Instant::now();
            let ep = loop {
                match endpoints(&d) {
                    Ok(ep) => break ep,
                    Err(e) if started.elapsed() > Duration::from_secs(60) => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(250)),
                }
            };
            nodes.push(Node::new(
                s.name,
                s.region,
                format!("{ip}:7400"),
                format!("{ip}:7401"),
                d,
                ep.node_id.unwrap_or(0),
                &up.token,
            )?);
        }
        Ok(Self {
            opts,
            nodes,
            token: up.token,
            down: Default::default(),
            prometheus: up.prometheus,
            backend: Backend::Compose(up.compose),
            mounts,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }

    /// Whether the cluster runs in containers.
    pub fn is_compose(&self) -> bool {
        matches!(self.backend, Backend::Compose(_))
    }

    pub fn slots(&self) -> Vec<Slot> {
        self.nodes
            .iter()
            .map(|n| Slot {
                name: n.name.clone(),
                region: n.region.clone(),
            })
            .collect()
    }

    pub fn node(&self, name: &str) -> Result<&Node, Error> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| Error::Setup(format!("no node named {name} in this cluster")))
    }

    fn data(&self, name: &str) -> Result<PathBuf, Error> {
        Ok(self.node(name)?.data.clone())
    }

    /// kill -9 the node (`docker kill -s KILL` its container); it can be
    /// started again with [`Self::restart`].
    pub fn kill(&mut self, name: &str) -> Result<(), Error> {
        let data = self.data(name)?;
        match &mut self.backend {
            Backend::Testnet(l) => l.kill(name, &data)?,
            Backend::Compose(c) => c.kill(name)?,
        }
        self.down.insert(name.to_owned());
        Ok(())
    }

    /// Whether the node's process (container) runs.
    pub fn running(&mut self, name: &str) -> bool {
        let Ok(data) = self.data(name) else {
            return false;
        };
        match &mut self.backend {
            Backend::Testnet(l) => l.running(name, &data),
            Backend::Compose(c) => c.running(name),
        }
    }

    /// Kills the node, copies its data dir (consistent: nothing writes
    /// it), and starts it again.
    pub fn snapshot_data(&mut self, name: &str) -> Result<(), Error> {
        self.kill(name)?;
        let data = self.data(name)?;
        let copy = self.opts.dir.join(format!("{name}.stale"));
        let _ = std::fs::remove_dir_all(&copy);
        copy_dir(&data, &copy)?;
        self.restart(name)
    }

    /// Kills the node, puts the copy [`Self::snapshot_data`] took in place
    /// of its data dir's contents (the dir itself stays: it may be a mount
    /// point or a container's bind mount), owned as the dir is, and starts
    /// it again.
    pub fn restore_stale(&mut self, name: &str) -> Result<(), Error> {
        use std::os::unix::fs::MetadataExt as _;
        self.kill(name)?;
        let data = self.data(name)?;
        let copy = self.opts.dir.join(format!("{name}.stale"));
        for entry in std::fs::read_dir(&data)? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        copy_dir(&copy, &data)?;
        let meta = std::fs::metadata(&data)?;
        chown_tree(&data, meta.uid(), meta.gid())?;
        std::fs::remove_dir_all(&copy)?;
        self.restart(name)
    }

    /// Caps the node's memory `headroom_mb` above what it uses now.
    pub fn limit_memory(&mut self, name: &str, headroom_mb: u32) -> Result<(), Error> {
        let data = self.data(name)?;
        match &mut self.backend {
            Backend::Testnet(l) => l.limit_memory(name, &data, headroom_mb),
            Backend::Compose(c) => c.limit_memory(name, headroom_mb),
        }
    }

    /// Lifts the cap; a node the kernel killed meanwhile is restarted.
    pub fn unlimit_memory(&mut self, name: &str) -> Result<(), Error> {
        match &mut self.backend {
            Backend::Testnet(l) => {
                if let Some(dir) = l.mem_cgroups.remove(name) {
                    dissolve_cgroup(&dir);
                }
            }
            Backend::Compose(c) => c.unlimit_memory(name)?,
        }
        self.restart_if_dead(name)
    }

    /// Restarts the node if its process died (OOM, ENOSPC…).
    pub fn restart_if_dead(&mut self, name: &str) -> Result<(), Error> {
        if self.running(name) {
            return Ok(());
        }
        if let Backend::Testnet(l) = &mut self.backend {
            // Exited (running() reaped it if it was ours).
            l.restarted.remove(name);
        }
        tracing::info!(node = name, "the node died during the fault; restarting it");
        self.restart(name)
    }

    /// Fills the filesystem of the node's directory with a ballast file.
    pub fn fill_disk(&mut self, name: &str) -> Result<(), Error> {
        if self.mounts.0.is_empty() {
            return Err(Error::Setup(
                "disk-full needs the nodes' own small filesystems (the run mounts them when its schedule has disk-full)".into(),
            ));
        }
        let data = self.data(name)?;
        if let Backend::Testnet(l) = &mut self.backend {
            // For a restart, should the full disk stop it.
            let pid = l.pid(name, &data)?;
            l.keep_launch(name, pid)?;
        }
        let path = self.opts.dir.join(name).join("ballast");
        let mut f = std::fs::File::create(&path)?;
        // Megabytes until the disk refuses, then pages for the last one.
        for chunk in [vec![0u8; 1 << 20], vec![0u8; 4096]] {
            loop {
                match std::io::Write::write(&mut f, &chunk) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Removes the ballast; a node that died meanwhile is restarted.
    pub fn free_disk(&mut self, name: &str) -> Result<(), Error> {
        let _ = std::fs::remove_file(self.opts.dir.join(name).join("ballast"));
        self.restart_if_dead(name)
    }

    /// Starts a killed node again: its process with the same command line
    /// and environment, or its container.
    /// What the node logged since this run first restarted it (testnet:
    /// its log file here; compose: its container's log, all runs).
    pub fn restart_logs(&self, name: &str) -> String {
        match &self.backend {
            Backend::Testnet(_) => {
                std::fs::read_to_string(self.opts.dir.join(format!("{name}.log")))
                    .unwrap_or_default()
            }
            Backend::Compose(c) => c.logs(name),
        }
    }

    /// Every node's log so far, written to `to/NAME.log` (a failing soak
    /// schedule keeps them: its cluster runs on, and restarts append to or
    /// replace what the nodes logged).
    pub fn save_logs(&self, to: &Path) -> Result<(), Error> {
        std::fs::create_dir_all(to)?;
        for slot in self.slots() {
            std::fs::write(
                to.join(format!("{}.log", slot.name)),
                self.restart_logs(&slot.name),
            )?;
        }
        Ok(())
    }

    pub fn restart(&mut self, name: &str) -> Result<(), Error> {
        let data = self.data(name)?;
        match &mut self.backend {
            Backend::Testnet(l) => {
                wait_unlocked(name, &data);
                l.restart(name, &self.opts.dir)?
            }
            Backend::Compose(c) => c.start_node(name)?,
        }
        self.down.remove(name);
        Ok(())
    }

    /// Freezes the node (SIGSTOP; `docker pause`) or thaws it.
    pub fn pause(&mut self, name: &str, on: bool) -> Result<(), Error> {
        let data = self.data(name)?;
        match &mut self.backend {
            Backend::Testnet(l) => {
                let signal = if on { Signal::SIGSTOP } else { Signal::SIGCONT };
                kill(l.pid(name, &data)?, signal)
                    .map_err(|e| Error::Setup(format!("{signal} {name}: {e}")))
            }
            Backend::Compose(c) => c.pause(name, on),
        }
    }

    /// Cuts `side` off the rest both ways at the network, where the
    /// cluster has one of its own to cut (compose: `docker network
    /// disconnect`). Returns false on the testnet, whose nodes share
    /// loopback: the caller cuts them in the nodes' fault layer instead.
    pub fn cut_network(&mut self, side: &[String], on: bool) -> Result<bool, Error> {
        match &mut self.backend {
            Backend::Testnet(_) => Ok(false),
            Backend::Compose(c) => c.partition(side, on).map(|()| true),
        }
    }

    /// Limits the node to `permille` thousandths of one core (its own CPU
    /// cgroup; `docker update --cpus`).
    pub fn limit_cpu(&mut self, name: &str, permille: u32) -> Result<(), Error> {
        let data = self.data(name)?;
        match &mut self.backend {
            Backend::Testnet(l) => l.limit_cpu(name, &data, permille),
            Backend::Compose(c) => c.limit_cpu(name, permille),
        }
    }

    /// Gives the node its CPU back.
    pub fn unlimit_cpu(&mut self, name: &str) -> Result<(), Error> {
        match &mut self.backend {
            Backend::Testnet(l) => {
                if let Some(dir) = l.cgroups.remove(name) {
                    dissolve_cgroup(&dir);
                }
                Ok(())
            }
            Backend::Compose(c) => c.unlimit_cpu(name),
        }
    }

    /// An Admin client for `node` with the admin token.
    pub fn admin(&self, node: &Node, timeout: Duration) -> Result<Admin, Error> {
        admin_client(&node.grpc, &self.token, timeout)
    }

    /// Replaces `node`'s injected faults.
    pub async fn inject(&self, node: &str, req: v1::InjectFaultRequest) -> Result<(), Error> {
        let n = self.node(node)?;
        self.admin(n, Duration::from_secs(5))?
            .inject_fault(req)
            .await
            .map_err(|s| Error::Setup(format!("InjectFault on {node}: {}", s.message())))?;
        Ok(())
    }

    /// Stops everything: faults lifted, then the nodes (the testnet stops
    /// the ones it started; the compose project goes down).
    pub fn stop(&mut self) {
        let data: Vec<(String, PathBuf)> = self
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.data.clone()))
            .collect();
        match &mut self.backend {
            Backend::Testnet(l) => l.stop(&data),
            Backend::Compose(c) => c.stop(),
        }
        drop(std::mem::take(&mut self.mounts));
    }
}

impl Local {
    fn pid(&self, name: &str, data: &Path) -> Result<Pid, Error> {
        if let Some(r) = self.restarted.get(name) {
            return Ok(Pid::from_raw(r.child.id() as i32));
        }
        Ok(Pid::from_raw(endpoints(data)?.pid as i32))
    }

    fn kill(&mut self, name: &str, data: &Path) -> Result<(), Error> {
        let pid = self.pid(name, data)?;
        self.keep_launch(name, pid)?;
        kill(pid, Signal::SIGKILL).map_err(|e| Error::Setup(format!("kill {name}: {e}")))?;
        // Wait until it is gone (reaping it if it is ours).
        if let Some(mut r) = self.restarted.remove(name) {
            let _ = r.child.wait();
        }
        let started = Instant::now();
        while alive(pid) && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// A node this run restarted is judged by its child process (its
    /// endpoints file is missing while it starts, and after a clean exit);
    /// any other by the pid in its endpoints file.
    fn running(&mut self, name: &str, data: &Path) -> bool {
        if let Some(r) = self.restarted.get_mut(name) {
            return matches!(r.child.try_wait(), Ok(None));
        }
        self.pid(name, data).is_ok_and(alive)
    }

    /// Keeps the command line and environment of the node's process, for
    /// a restart after it dies.
    fn keep_launch(&mut self, name: &str, pid: Pid) -> Result<(), Error> {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let gone =
            |e: std::io::Error| Error::Setup(format!("{name} (pid {pid}) is not running: {e}"));
        let args: Vec<OsString> = std::fs::read(proc.join("cmdline"))
            .map_err(gone)?
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| OsString::from_vec(a.to_vec()))
            .collect();
        let env: Vec<(OsString, OsString)> = std::fs::read(proc.join("environ"))
            .map_err(gone)?
            .split(|b| *b == 0)
            .filter_map(|kv| {
                let i = kv.iter().position(|b| *b == b'=')?;
                Some((
                    OsString::from_vec(kv[..i].to_vec()),
                    OsString::from_vec(kv[i + 1..].to_vec()),
                ))
            })
            .collect();
        self.cmdlines.insert(name.to_owned(), (args, env));
        Ok(())
    }

    /// Its own memory cgroup, charges moved in.
    fn limit_memory(&mut self, name: &str, data: &Path, headroom_mb: u32) -> Result<(), Error> {
        let pid = self.pid(name, data)?;
        self.keep_launch(name, pid)?;
        let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))?
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024;
        let limit = (rss + u64::from(headroom_mb) * (1 << 20)).to_string();
        let (dir, v2) = make_cgroup("memory", "memory-pressure", name)?;
        if v2 {
            std::fs::write(dir.join("memory.max"), limit)?;
        } else {
            // Bring the pages it already has along, so the cap bites.
            let _ = std::fs::write(dir.join("memory.move_charge_at_immigrate"), "3");
            std::fs::write(dir.join("memory.limit_in_bytes"), limit)?;
        }
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        self.mem_cgroups.insert(name.to_owned(), dir);
        Ok(())
    }

    /// Its own CPU cgroup with a quota.
    fn limit_cpu(&mut self, name: &str, data: &Path, permille: u32) -> Result<(), Error> {
        let pid = self.pid(name, data)?;
        let period = 100_000u64;
        let quota = period * u64::from(permille) / 1000;
        let (dir, v2) = make_cgroup("cpu", "cpu-pressure", name)?;
        if v2 {
            std::fs::write(dir.join("cpu.max"), format!("{quota} {period}"))?;
        } else {
            std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string())?;
            std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
        }
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        self.cgroups.insert(name.to_owned(), dir);
        Ok(())
    }

    /// Starts a killed node again with its command line and environment.
    fn restart(&mut self, name: &str, dir: &Path) -> Result<(), Error> {
        let (args, env) = self
            .cmdlines
            .get(name)
            .ok_or_else(|| Error::Setup(format!("{name} was not killed by this run")))?
            .clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&args[0]);
        cmd.args(&args[1..])
            .env_clear()
            .envs(env)
            .env(PARENT_PID_ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().map_err(|e| {
            Error::Setup(format!(
                "restarting {name} ({}): {e}",
                args[0].to_string_lossy()
            ))
        })?;
        self.restarted.insert(name.to_owned(), Restarted { child });
        Ok(())
    }

    /// Lifts the cgroups, thaws every node, stops the restarted ones, then
    /// the testnet (which stops the rest).
    fn stop(&mut self, nodes: &[(String, PathBuf)]) {
        for (_, dir) in self.cgroups.drain().chain(self.mem_cgroups.drain()) {
            dissolve_cgroup(&dir);
        }
        for r in self.restarted.values_mut() {
            let _ = kill(Pid::from_raw(r.child.id() as i32), Signal::SIGCONT);
            let _ = kill(Pid::from_raw(r.child.id() as i32), Signal::SIGTERM);
        }
        for (name, data) in nodes {
            if let Ok(pid) = self.pid(name, data) {
                let _ = kill(pid, Signal::SIGCONT);
            }
        }
        let _ = kill(Pid::from_raw(self.testnet.id() as i32), Signal::SIGTERM);
        let _ = self.testnet.wait();
        let deadline = Instant::now() + Duration::from_secs(15);
        for r in self.restarted.values_mut() {
            while matches!(r.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        self.restarted.clear();
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.opts.dir)
            .field("compose", &self.is_compose())
            .field("nodes", &self.nodes.len())
            .field("down", &self.down)
            .finish_non_exhaustive()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An Admin client with a bearer interceptor.
pub type Admin = AdminClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <secret>` to every call.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer(…)")
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

fn channel(addr: &str, timeout: Duration) -> Result<Channel, Error> {
    Ok(Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| Error::Setup(format!("{addr}: {e}")))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout)
        .connect_lazy())
}

pub fn admin_client(addr: &str, token: &str, timeout: Duration) -> Result<Admin, Error> {
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| Error::Setup("the admin token is not ASCII".into()))?;
    Ok(AdminClient::with_interceptor(
        channel(addr, timeout)?,
        Bearer(bearer),
    ))
}

pub fn inference_client(addr: &str, timeout: Duration) -> Result<InferenceClient<Channel>, Error> {
    Ok(InferenceClient::new(channel(addr, timeout)?))
}

fn endpoints(data: &Path) -> Result<Endpoints, Error> {
    let path = data.join("endpoints.json");
    let bytes = std::fs::read(&path)
        .map_err(|e| Error::Setup(format!("{}: {e} (is the node running?)", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Setup(format!("{}: {e}", path.display())))
}

/// Makes this run's own cgroup for node `name` under `controller`: on
/// cgroup v2 when the unified hierarchy offers the controller, else on v1.
/// Returns its directory and whether it is v2.
fn make_cgroup(controller: &str, scenario: &str, name: &str) -> Result<(PathBuf, bool), Error> {
    let group = format!("trine-chaos-{}-{name}", std::process::id());
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|c| c.split_whitespace().any(|c| c == controller));
    let dir = if v2 {
        Path::new("/sys/fs/cgroup").join(&group)
    } else {
        Path::new("/sys/fs/cgroup").join(controller).join(&group)
    };
    std::fs::create_dir_all(&dir).map_err(|e| {
        Error::Setup(format!(
            "{scenario} needs a writable {controller} cgroup (run as root on a host with cgroups): {}: {e}",
            dir.display()
        ))
    })?;
    Ok((dir, v2))
}

/// Moves every process of the cgroup at `dir` back to its parent group
/// and removes it.
fn dissolve_cgroup(dir: &Path) {
    let parent = dir.parent().unwrap_or(Path::new("/sys/fs/cgroup"));
    if let Ok(pids) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in pids.lines() {
            let _ = std::fs::write(parent.join("cgroup.procs"), pid);
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Gives a directory tree to `uid`:`gid`.
fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(|e| Error::Setup(format!("chown {}: {e}", path.display())))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Copies a directory tree (files and directories only).
fn copy_dir(from: &Path, to: &Path) -> Result<(), Error> {
    let err =
        |what: &Path, e: std::io::Error| Error::Setup(format!("copying {}: {e}", what.display()));
    std::fs::create_dir_all(to).map_err(|e| err(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| err(from, e))? {
        let entry = entry.map_err(|e| err(from, e))?;
        let kind = entry.file_type().map_err(|e| err(&entry.path(), e))?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target).map_err(|e| err(&entry.path(), e))?;
        }
    }
    Ok(())
}

/// Whether `pid` runs (a zombie does not).
/// Waits (up to 10 s) until no process holds the data dir's lock: a
/// killed multi-threaded node shows as a zombie once its main thread is
/// gone, while its other threads, which still hold the lock, are exiting.
fn wait_unlocked(name: &str, data: &Path) {
    let Ok(f) = std::fs::File::open(data.join("LOCK")) else {
        return;
    };
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        match f.try_lock() {
            Ok(()) => {
                let _ = f.unlock();
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    tracing::warn!(
        node = name,
        "its data dir is still locked 10 s after it was killed"
    );
}

fn alive(pid: Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}
