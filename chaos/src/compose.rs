//! The compose cluster: `deploy/docker-compose.yml` brought up under a
//! project of this run's own, with an override file that
//! - turns fault injection on in every node (`TRINE_FAULT_INJECTION`),
//! - puts every container at a fixed address on a network this run creates
//!   (so the run reaches each node from the host, and a node reconnected
//!   after a partition comes back where it was),
//! - keeps each node's data dir and the certificates on the host (bind
//!   mounts: a stale copy is taken and put back, a disk filled, from here),
//! - lets no container restart by itself (the run restarts what it killed,
//!   as it does on the testnet).
//!
//! Its levers are Docker's: `docker kill -s KILL` / `docker start`,
//! `docker pause` / `unpause` (the cgroup freezer), `docker network
//! disconnect` / `connect` (a region cut off keeps its own island network
//! between its nodes), `docker update --cpus` and `--memory`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::Error;

/// The uid and gid the image runs as (deploy/docker/Dockerfile).
const IMAGE_UID: u32 = 10001;

/// Static addresses on the run's network: .5 Prometheus, .6 Alertmanager,
/// .11 and up the nodes in layout order; containers without a fixed
/// address (the one-shot init and deploy) get theirs from .128 up.
const PROMETHEUS_HOST: u8 = 5;
const ALERTMANAGER_HOST: u8 = 6;
const FIRST_NODE_HOST: u8 = 11;

/// How to bring the compose cluster up.
#[derive(Debug, Clone)]
pub struct ComposeOptions {
    /// `deploy/docker-compose.yml` of this checkout.
    pub file: PathBuf,
    /// An existing Trine image to run; None: build one around `exe` with
    /// `deploy/docker/build-image.sh`.
    pub image: Option<String>,
}

/// A running compose project.
#[derive(Debug)]
pub struct Compose {
    program: Vec<String>,
    project: String,
    files: [PathBuf; 2],
    env: Vec<(String, String)>,
    network: String,
    prefix: String,
    /// Container id of each node.
    ids: BTreeMap<String, String>,
    /// Each node's fixed address.
    pub ips: BTreeMap<String, String>,
    /// Image tags this run built (removed at the end).
    built: Vec<String>,
    island: Option<String>,
    disconnected: BTreeSet<String>,
    paused: BTreeSet<String>,
    dir: PathBuf,
    stopped: bool,
}

/// What [`Compose::start`] gives back besides the project.
#[derive(Debug)]
pub struct Up {
    pub compose: Compose,
    pub token: String,
    pub prometheus: Option<String>,
}

fn setup(msg: impl Into<String>) -> Error {
    Error::Setup(msg.into())
}

/// Runs a command; its stdout, or an error with its output.
fn run(cmd: &mut Command) -> Result<String, Error> {
    let out = cmd
        .output()
        .map_err(|e| setup(format!("running {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(setup(format!(
            "{:?} failed ({}): {}{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn docker(args: &[&str]) -> Result<String, Error> {
    run(Command::new("docker").args(args))
}

/// `docker compose` (the v2 plugin) where it exists, else `docker-compose`.
fn compose_program() -> Result<Vec<String>, Error> {
    let works = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
    if works(Command::new("docker").args(["compose", "version"])) {
        return Ok(vec!["docker".into(), "compose".into()]);
    }
    if works(Command::new("docker-compose").arg("version")) {
        return Ok(vec!["docker-compose".into()]);
    }
    Err(setup(
        "--target compose needs Docker Compose: neither `docker compose` nor `docker-compose` runs here (Debian: apt-get install docker-compose)",
    ))
}

/// Makes `path` (a directory) belong to the image's user.
fn give_to_image(path: &Path) -> Result<(), Error> {
    std::os::unix::fs::chown(path, Some(IMAGE_UID), Some(IMAGE_UID)).map_err(|e| {
        setup(format!(
            "--target compose keeps the nodes' data on the host, owned by the image's user ({IMAGE_UID}), and needs root for that: chown {}: {e}",
            path.display()
        ))
    })
}

impl Compose {
    /// Builds the images (unless given one), creates the network, writes
    /// the override, brings the project up and waits until its one-shot
    /// deploy of the model has finished. `nodes`: (name, data dir on the
    /// host) in layout order, the data dirs already made.
    pub fn start(
        opts: &ComposeOptions,
        exe: &Path,
        dir: &Path,
        nodes: &[(String, PathBuf)],
        alerts: bool,
    ) -> Result<Up, Error> {
        docker(&["info", "--format", "{{.ServerVersion}}"]).map_err(|e| {
            setup(format!(
                "--target compose needs Docker Engine and the daemon does not answer (start it: systemctl start docker): {e}"
            ))
        })?;
        let program = compose_program()?;
        let file = std::fs::canonicalize(&opts.file).map_err(|e| {
            setup(format!(
                "{}: {e} (run from the repository's root, or pass --compose-file)",
                opts.file.display()
            ))
        })?;
        let dir = std::fs::canonicalize(dir)?;
        if dir.to_string_lossy().contains([':', ',', ' ']) {
            return Err(setup(format!(
                "{}: the report dir is bind-mounted into the containers and may not contain ':', ',' or spaces; pick another --report",
                dir.display()
            )));
        }
        let pid = std::process::id();
        let project = format!("trine-chaos-{pid}");
        let tag = format!("chaos-{pid}");
        let mut c = Compose {
            program,
            project: project.clone(),
            files: [file.clone(), dir.join("compose.override.yml")],
            env: Vec::new(),
            network: format!("{project}-net"),
            prefix: String::new(),
            ids: BTreeMap::new(),
            ips: BTreeMap::new(),
            built: Vec::new(),
            island: None,
            disconnected: BTreeSet::new(),
            paused: BTreeSet::new(),
            dir: dir.clone(),
            stopped: false,
        };
        // From here on, a failure takes down what was made (Drop).
        let image = match &opts.image {
            Some(i) => i.clone(),
            None => {
                let script = file
                    .parent()
                    .map(|d| d.join("docker/build-image.sh"))
                    .filter(|p| p.exists())
                    .ok_or_else(|| {
                        setup(format!(
                            "no docker/build-image.sh beside {}: pass --image with a Trine image, or run from the repository",
                            file.display()
                        ))
                    })?;
                eprintln!(
                    "chaos: building the images around {} (log: {})…",
                    exe.display(),
                    dir.join("images.log").display()
                );
                let started = Instant::now();
                let log = std::fs::File::create(dir.join("images.log"))?;
                let mut cmd = Command::new("bash");
                cmd.arg(&script)
                    .arg("--binary")
                    .arg(exe)
                    .args(["--tag", &format!("trine:{tag}")]);
                c.built.push(format!("trine:{tag}"));
                if alerts {
                    cmd.args(["--monitoring"])
                        .args(["--prometheus-tag", &format!("trine-prometheus:{tag}")])
                        .args(["--alertmanager-tag", &format!("trine-alertmanager:{tag}")]);
                    c.built.push(format!("trine-prometheus:{tag}"));
                    c.built.push(format!("trine-alertmanager:{tag}"));
                    c.env.push((
                        "TRINE_PROMETHEUS_IMAGE".into(),
                        format!("trine-prometheus:{tag}"),
                    ));
                    c.env.push((
                        "TRINE_ALERTMANAGER_IMAGE".into(),
                        format!("trine-alertmanager:{tag}"),
                    ));
                }
                let status = cmd
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .status()
                    .map_err(|e| setup(format!("running {}: {e}", script.display())))?;
                if !status.success() {
                    return Err(setup(format!(
                        "building the images failed ({status}); see {}",
                        dir.join("images.log").display()
                    )));
                }
                eprintln!(
                    "chaos: images built in {:.0} s",
                    started.elapsed().as_secs_f64()
                );
                format!("trine:{tag}")
            }
        };
        if opts.image.is_some() {
            // Given, not built: say which is missing before compose tries
            // (and fails) to pull it from a registry.
            let mut needed = vec![image.clone()];
            if alerts {
                for (var, default) in [
                    ("TRINE_PROMETHEUS_IMAGE", "trine-prometheus:local"),
                    ("TRINE_ALERTMANAGER_IMAGE", "trine-alertmanager:local"),
                ] {
                    needed.push(std::env::var(var).unwrap_or_else(|_| default.into()));
                }
            }
            for i in needed {
                docker(&["image", "inspect", "--format", "{{.Id}}", &i]).map_err(|_| {
                    setup(format!(
                        "image {i} is not on this host: build it with deploy/docker/build-image.sh (--monitoring for Prometheus and Alertmanager), or leave out --image and the run builds its own"
                    ))
                })?;
            }
        }
        c.env.push(("TRINE_IMAGE".into(), image));
        // Nothing published on the host: the run reaches every container
        // at its address on the network.
        for var in [
            "TRINE_GRPC_PUBLISH",
            "TRINE_HTTP_PUBLISH",
            "TRINE_PROMETHEUS_PUBLISH",
            "TRINE_ALERTMANAGER_PUBLISH",
        ] {
            c.env.push((var.into(), "127.0.0.1:".into()));
        }
        c.prefix = c.make_network()?;
        for (i, (name, _)) in nodes.iter().enumerate() {
            let ip = format!("{}.{}", c.prefix, usize::from(FIRST_NODE_HOST) + i);
            c.ips.insert(name.clone(), ip);
        }

        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs)?;
        give_to_image(&certs)?;
        for (_, data) in nodes {
            give_to_image(data)?;
        }
        std::fs::write(&c.files[1], c.override_yaml(nodes, &certs, alerts))?;

        eprintln!(
            "chaos: docker compose up (project {project}, network {} {}.0/24)…",
            c.network, c.prefix
        );
        let mut services: Vec<&str> = vec!["init", "deploy"];
        services.extend(nodes.iter().map(|(n, _)| n.as_str()));
        if alerts {
            services.extend(["prometheus", "alertmanager"]);
        }
        let started = Instant::now();
        let mut up = vec!["up", "-d", "--no-build"];
        up.extend(services);
        c.compose(&up)?;
        for (name, _) in nodes {
            let id = c.container(name)?;
            c.ids.insert(name.clone(), id);
        }
        // The one-shot deploy service waits for us-east-1 and deploys the
        // model: the cluster is up once it has exited 0.
        let deploy = c.container("deploy")?;
        loop {
            let state = docker(&[
                "inspect",
                "-f",
                "{{.State.Status}} {{.State.ExitCode}}",
                &deploy,
            ])?;
            match state.trim() {
                "exited 0" => break,
                s if s.starts_with("exited") || s.starts_with("dead") => {
                    let logs = c
                        .compose(&["logs", "--tail", "20", "deploy", "us-east-1"])
                        .unwrap_or_default();
                    return Err(setup(format!(
                        "the compose cluster's deploy service failed ({s}):\n{logs}"
                    )));
                }
                _ => {}
            }
            if started.elapsed() > Duration::from_secs(300) {
                return Err(setup(
                    "the compose cluster's model was not deployed within 300 s; see compose-logs.txt in the report",
                ));
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        eprintln!(
            "chaos: compose cluster up, model deployed ({:.0} s)",
            started.elapsed().as_secs_f64()
        );
        let token = std::fs::read_to_string(certs.join("admin.token"))?
            .trim()
            .to_owned();
        let prometheus = alerts.then(|| format!("http://{}.{PROMETHEUS_HOST}:9090", c.prefix));
        Ok(Up {
            compose: c,
            token,
            prometheus,
        })
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new(&self.program[0]);
        cmd.args(&self.program[1..])
            .arg("-f")
            .arg(&self.files[0])
            .arg("-f")
            .arg(&self.files[1])
            .args(["-p", &self.project])
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn compose(&self, args: &[&str]) -> Result<String, Error> {
        run(self.cmd().args(args))
    }

    /// The id of a service's container, running or not (by compose's
    /// labels, which Compose v1 and v2 both set).
    fn container(&self, service: &str) -> Result<String, Error> {
        let out = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ])?;
        out.lines()
            .next()
            .map(str::to_owned)
            .ok_or_else(|| setup(format!("compose started no container for {service}")))
    }

    /// Creates the run's network on the first free /24 of 10.213.0.0/16
    /// (from a place this run's pid picks); returns its first three octets.
    fn make_network(&self) -> Result<String, Error> {
        let start = std::process::id() % 250;
        let mut last = String::new();
        for k in 0..250 {
            let prefix = format!("10.213.{}", (start + k) % 250);
            match docker(&[
                "network",
                "create",
                "--subnet",
                &format!("{prefix}.0/24"),
                "--ip-range",
                &format!("{prefix}.128/25"),
                &self.network,
            ]) {
                Ok(_) => return Ok(prefix),
                Err(Error::Setup(e)) if e.contains("overlap") => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(setup(format!(
            "no free /24 in 10.213.0.0/16 for the run's network: {last}"
        )))
    }

    fn override_yaml(&self, nodes: &[(String, PathBuf)], certs: &Path, alerts: bool) -> String {
        use std::fmt::Write as _;
        let certs = certs.display();
        let mut y = String::from(
            "# Written by `trine chaos run --target compose`: fault injection on,\n\
             # fixed addresses, data and certificates on the host, no restarts.\n\
             services:\n",
        );
        let _ = write!(
            y,
            "  init:\n    volumes:\n      - {certs}:/certs\n\
             \x20 deploy:\n    volumes:\n      - {certs}:/certs:ro\n"
        );
        for (name, data) in nodes {
            let ip = &self.ips[name];
            let _ = write!(
                y,
                "  {name}:\n    restart: \"no\"\n    environment:\n      TRINE_FAULT_INJECTION: \"true\"\n\
                 \x20   networks:\n      trine:\n        ipv4_address: {ip}\n\
                 \x20   volumes:\n      - {}:/var/lib/trine\n      - {certs}:/certs:ro\n",
                data.display()
            );
        }
        if alerts {
            for (svc, host) in [
                ("prometheus", PROMETHEUS_HOST),
                ("alertmanager", ALERTMANAGER_HOST),
            ] {
                let _ = write!(
                    y,
                    "  {svc}:\n    restart: \"no\"\n    networks:\n      trine:\n        ipv4_address: {}.{host}\n",
                    self.prefix
                );
            }
        }
        let _ = write!(
            y,
            "networks:\n  trine:\n    external: true\n    name: {}\n",
            self.network
        );
        y
    }

    fn id(&self, name: &str) -> Result<&str, Error> {
        self.ids
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| setup(format!("no container for {name} in this compose project")))
    }

    /// `docker kill -s KILL`; returns once the container has stopped.
    pub fn kill(&mut self, name: &str) -> Result<(), Error> {
        let id = self.id(name)?.to_owned();
        if self.paused.remove(name) {
            let _ = docker(&["unpause", &id]);
        }
        docker(&["kill", "-s", "KILL", &id])?;
        let started = Instant::now();
        while self.running(name) && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// `docker start`: the same container, its data dir as it was.
    /// Everything the node's container has logged, over all its runs.
    pub fn logs(&self, name: &str) -> String {
        let Ok(id) = self.id(name) else {
            return String::new();
        };
        match Command::new("docker")
            .args(["logs", id])
            .stdin(std::process::Stdio::null())
            .output()
        {
            Ok(out) => {
                let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
                s.push_str(&String::from_utf8_lossy(&out.stderr));
                s
            }
            Err(_) => String::new(),
        }
    }

    pub fn start_node(&mut self, name: &str) -> Result<(), Error> {
        let id = self.id(name)?.to_owned();
        docker(&["start", &id]).map(drop)
    }

    /// Whether the node's container runs (a paused one does).
    pub fn running(&self, name: &str) -> bool {
        self.id(name).is_ok_and(|id| {
            docker(&["inspect", "-f", "{{.State.Running}}", id]).is_ok_and(|s| s.trim() == "true")
        })
    }

    /// `docker pause` / `unpause` (the whole container, by the freezer).
    /// The kernel's freezer can fail to freeze a cgroup whose tasks are
    /// mid-syscall (runc then thaws it and reports "unable to freeze"):
    /// that is retried a few times, 200 ms apart, before it counts as a
    /// failure to apply the fault.
    pub fn pause(&mut self, name: &str, on: bool) -> Result<(), Error> {
        let id = self.id(name)?.to_owned();
        let verb = if on { "pause" } else { "unpause" };
        let mut tries = 0;
        loop {
            match docker(&[verb, &id]) {
                Err(e) if on && tries < 4 && e.to_string().contains("unable to freeze") => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                r => {
                    r?;
                    break;
                }
            }
        }
        if on {
            self.paused.insert(name.to_owned());
        } else {
            self.paused.remove(name);
        }
        Ok(())
    }

    /// `docker update --cpus`: `permille` thousandths of a core.
    pub fn limit_cpu(&mut self, name: &str, permille: u32) -> Result<(), Error> {
        let cpus = format!("{:.3}", f64::from(permille.max(10)) / 1000.0);
        docker(&["update", "--cpus", &cpus, self.id(name)?]).map(drop)
    }

    /// Gives back every core (`--cpus 0` keeps the old quota on Docker 20).
    pub fn unlimit_cpu(&mut self, name: &str) -> Result<(), Error> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        docker(&["update", "--cpus", &cores.to_string(), self.id(name)?]).map(drop)
    }

    /// `docker update --memory` (and as much memory+swap) `headroom_mb`
    /// above what the container uses now.
    pub fn limit_memory(&mut self, name: &str, headroom_mb: u32) -> Result<(), Error> {
        let id = self.id(name)?.to_owned();
        let usage = docker(&["stats", "--no-stream", "--format", "{{.MemUsage}}", &id])?;
        let used = parse_size(usage.split('/').next().unwrap_or("").trim()).ok_or_else(|| {
            setup(format!(
                "docker stats gave {usage:?} for {name}: no memory usage"
            ))
        })?;
        let limit = (used + u64::from(headroom_mb) * (1 << 20)).to_string();
        docker(&["update", "--memory", &limit, "--memory-swap", &limit, &id]).map(drop)
    }

    /// Lifts the cap: Docker cannot unset a memory limit once set, so it
    /// becomes the host's whole memory (memory and memory+swap together,
    /// which cgroup v1 needs to grow both).
    pub fn unlimit_memory(&mut self, name: &str) -> Result<(), Error> {
        let total = std::fs::read_to_string("/proc/meminfo")?
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(1 << 24)
            * 1024;
        let total = total.to_string();
        docker(&[
            "update",
            "--memory",
            &total,
            "--memory-swap",
            &total,
            self.id(name)?,
        ])
        .map(drop)
    }

    /// Cuts `side` off the run's network (both ways): each node is
    /// disconnected; two or more are joined on an island network of their
    /// own, under their service names, so that they still reach each
    /// other. Healing puts each back at its fixed address.
    pub fn partition(&mut self, side: &[String], on: bool) -> Result<(), Error> {
        if on {
            if side.len() > 1 {
                let island = format!("{}-island", self.project);
                docker(&["network", "create", "--internal", &island])?;
                self.island = Some(island);
            }
            for name in side {
                let id = self.id(name)?.to_owned();
                docker(&["network", "disconnect", "-f", &self.network, &id])?;
                self.disconnected.insert(name.clone());
                if let Some(island) = &self.island {
                    docker(&["network", "connect", "--alias", name, island, &id])?;
                }
            }
        } else {
            self.heal_partition()?;
        }
        Ok(())
    }

    fn heal_partition(&mut self) -> Result<(), Error> {
        let names: Vec<String> = self.disconnected.iter().cloned().collect();
        for name in names {
            let id = self.id(&name)?.to_owned();
            if let Some(island) = &self.island {
                let _ = docker(&["network", "disconnect", "-f", island, &id]);
            }
            let ip = self.ips.get(&name).cloned().unwrap_or_default();
            docker(&[
                "network",
                "connect",
                "--ip",
                &ip,
                "--alias",
                &name,
                &self.network,
                &id,
            ])?;
            self.disconnected.remove(&name);
        }
        if let Some(island) = self.island.take() {
            docker(&["network", "rm", &island])?;
        }
        Ok(())
    }

    /// Keeps the containers' logs in the report, takes the project down
    /// (containers, named volumes), removes the network and the images
    /// this run built.
    pub fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        for name in std::mem::take(&mut self.paused) {
            if let Ok(id) = self.id(&name) {
                let _ = docker(&["unpause", id]);
            }
        }
        if let Ok(out) = self.cmd().args(["logs", "--no-color"]).output() {
            let _ = std::fs::write(self.dir.join("compose-logs.txt"), out.stdout);
        }
        // `down` can fail part-way: a container restarting under its
        // `unless-stopped` policy after a fault, or a daemon slow to remove
        // one under load. Whatever of the project is still there afterwards
        // is force-removed by label; what went wrong is kept in the report
        // directory (teardown.txt) and said on stderr.
        let mut problems = Vec::new();
        if let Err(e) = self.compose(&["down", "-v", "--remove-orphans", "-t", "5"]) {
            problems.push(format!("compose down: {e}"));
        }
        let label = format!("label=com.docker.compose.project={}", self.project);
        for attempt in 0..3 {
            let left: Vec<String> = docker(&["ps", "-aq", "--filter", &label])
                .map(|o| o.lines().map(str::to_owned).collect())
                .unwrap_or_default();
            let volumes: Vec<String> = docker(&["volume", "ls", "-q", "--filter", &label])
                .map(|o| o.lines().map(str::to_owned).collect())
                .unwrap_or_default();
            if left.is_empty() && volumes.is_empty() {
                break;
            }
            problems.push(format!(
                "attempt {attempt}: still there after down: containers {left:?}, volumes {volumes:?}"
            ));
            for id in &left {
                if let Err(e) = docker(&["rm", "-f", "-v", id]) {
                    problems.push(format!("docker rm -f {id}: {e}"));
                }
            }
            for v in &volumes {
                if let Err(e) = docker(&["volume", "rm", "-f", v]) {
                    problems.push(format!("docker volume rm {v}: {e}"));
                }
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        if !problems.is_empty() {
            let text = problems.join("\n");
            eprintln!("chaos: compose teardown of {}:\n{text}", self.project);
            let _ = std::fs::write(self.dir.join("teardown.txt"), text + "\n");
        }
        if let Some(island) = self.island.take() {
            let _ = docker(&["network", "rm", &island]);
        }
        let _ = docker(&["network", "rm", &self.network]);
        for image in std::mem::take(&mut self.built) {
            let _ = docker(&["rmi", "-f", &image]);
        }
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        self.stop();
    }
}

/// "12.5MiB" → bytes (docker stats' units: B, kB/KiB, MB/MiB, GB/GiB).
fn parse_size(s: &str) -> Option<u64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.trim().parse().ok()?;
    let mult = match unit {
        "B" => 1.0,
        "kB" | "KB" => 1e3,
        "KiB" => 1024.0,
        "MB" => 1e6,
        "MiB" => 1024.0 * 1024.0,
        "GB" => 1e9,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_stats_sizes_parse() {
        assert_eq!(parse_size("512B"), Some(512));
        assert_eq!(parse_size("1.5KiB"), Some(1536));
        assert_eq!(parse_size("12MiB"), Some(12 << 20));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("3MB"), Some(3_000_000));
        assert_eq!(parse_size("12"), None);
        assert_eq!(parse_size("x MiB"), None);
        assert_eq!(parse_size("12 parsecs"), None);
    }
}
