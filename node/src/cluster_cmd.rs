//! Cluster commands: `trine certs init|issue`, `trine status`, `trine nodes`,
//! `trine chain head|show|verify`, `trine node leave`. They talk to a running
//! node's Admin gRPC service (plain gRPC on its client port), except
//! `certs` and `chain verify --offline`, which work on files.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use tonic::transport::Channel;
use trine_proto::v1;
use trine_proto::v1::admin_client::AdminClient;

use crate::datadir::DataDir;

/// Which node a command asks.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// gRPC address of the node to ask: host:port, or https://host:port
    /// for a node serving its client ports over TLS (--api-tls; then give
    /// --ca-cert).
    #[arg(
        long,
        env = "TRINE_NODE",
        default_value = "127.0.0.1:7400",
        conflicts_with = "data_dir"
    )]
    pub node: String,
    /// Ask the node running on this data dir (reads its endpoints.json).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Give up after this long.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// File holding an admin token's secret (0600). Without it, the secret
    /// in TRINE_ADMIN_TOKEN, else `--data-dir`'s admin.token when present
    /// (the --init node keeps the cluster's first admin token there).
    #[arg(long, env = "TRINE_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// CA bundle (PEM) that verifies an https:// node's certificate, e.g.
    /// the cluster's ca.crt. With --data-dir the node's own (from its
    /// endpoints.json) is used.
    #[arg(long, env = "TRINE_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for a node that requires one
    /// (--api-tls-client-ca). With --data-dir the node's own is used.
    #[arg(
        long,
        env = "TRINE_CLIENT_CERT",
        value_name = "FILE",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,
    /// The key (PEM, 0600) of --client-cert.
    #[arg(
        long,
        env = "TRINE_CLIENT_KEY",
        value_name = "FILE",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
}

/// A [`Target`] resolved: its address, a channel endpoint (TLS set up for
/// https), and the CA bundle and client identity it used, which reach the
/// cluster's other nodes too.
#[derive(Debug)]
pub struct Resolved {
    pub uri: String,
    pub endpoint: tonic::transport::Endpoint,
    pub ca: Option<PathBuf>,
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Adds `authorization: Bearer <secret>` to every call.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(secret: Option<&str>) -> Result<Self> {
        secret
            .map(|s| {
                format!("Bearer {s}")
                    .parse()
                    .context("the admin token has characters a header cannot carry")
            })
            .transpose()
            .map(Self)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// An Admin client that sends the admin token, if one was found.
pub type AdminConn = AdminClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// The Admin read consistency of a `--linearizable` flag.
pub fn consistency(linearizable: bool) -> i32 {
    if linearizable {
        v1::ReadConsistency::Linearizable.into()
    } else {
        v1::ReadConsistency::Local.into()
    }
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum Output {
    /// Aligned rows for people.
    #[default]
    Table,
    /// One JSON object per line.
    Json,
}

impl Target {
    pub fn uri(&self) -> Result<String> {
        let own = self
            .data_dir
            .as_deref()
            .map(|d| self.endpoints(d))
            .transpose()?;
        Ok(self.uri_of(own.as_ref()))
    }

    /// The address: the data dir's node's (`own`), else --node.
    fn uri_of(&self, own: Option<&crate::datadir::Endpoints>) -> String {
        match own {
            Some(e) => {
                let scheme = if e.api_tls { "https" } else { "http" };
                format!("{scheme}://{}", e.grpc)
            }
            None if self.node.contains("://") => self.node.clone(),
            None => format!("http://{}", self.node),
        }
    }

    fn endpoints(&self, dir: &std::path::Path) -> Result<crate::datadir::Endpoints> {
        DataDir::read_endpoints(dir).with_context(|| {
            format!(
                "no running node on data dir {} (no endpoints.json); start one with `trine node --data-dir {}`",
                dir.display(),
                dir.display()
            )
        })
    }

    /// The node's address and a channel endpoint for it, with TLS set up
    /// for an https:// address: verified against --ca-cert (with
    /// --data-dir, the node's own CA bundle and name) and presenting
    /// --client-cert (with --data-dir, the node's own when it requires
    /// one). The data dir's endpoints.json is read once.
    pub fn endpoint(&self) -> Result<Resolved> {
        let own = self
            .data_dir
            .as_deref()
            .map(|d| self.endpoints(d))
            .transpose()?;
        let uri = self.uri_of(own.as_ref());
        let endpoint = tonic::transport::Endpoint::from_shared(uri.clone()).with_context(|| {
            format!("{uri} is not a valid address; use host:port or https://host:port")
        })?;
        let (ca, name, found) = match own {
            Some(e) => (
                e.api_ca,
                Some(e.name).filter(|n| !n.is_empty()),
                e.api_client_identity,
            ),
            None => (None, None, None),
        };
        let ca = self.ca_cert.clone().or(ca);
        let identity = self
            .client_cert
            .clone()
            .zip(self.client_key.clone())
            .or(found);
        let endpoint = if uri.starts_with("https://") {
            let ca = ca.as_deref().with_context(|| match &self.data_dir {
                Some(dir) => format!("{} serves TLS but names no CA bundle; give --ca-cert", dir.display()),
                None => format!("{uri} is https: give the CA bundle that signed its certificate with --ca-cert (the cluster's ca.crt, unless the node was given its own with --api-tls-cert)"),
            })?;
            tls_endpoint(endpoint, ca, name.as_deref(), identity.as_ref())?
        } else {
            endpoint
        };
        Ok(Resolved {
            uri,
            endpoint,
            ca,
            identity,
        })
    }

    /// The admin token's secret: `--admin-token-file`, else
    /// `TRINE_ADMIN_TOKEN`, else the data dir's admin.token if present.
    pub fn admin_secret(&self) -> Result<Option<String>> {
        if let Some(f) = &self.admin_token_file {
            return Ok(Some(crate::auth::read_secret(f)?));
        }
        if let Ok(s) = std::env::var("TRINE_ADMIN_TOKEN")
            && !s.trim().is_empty()
        {
            return Ok(Some(s.trim().to_owned()));
        }
        if let Some(dir) = &self.data_dir {
            let f = dir.join(crate::auth::ADMIN_TOKEN_FILE);
            if f.exists() {
                return Ok(Some(crate::auth::read_secret(&f)?));
            }
        }
        Ok(None)
    }

    pub async fn admin(&self) -> Result<AdminConn> {
        let bearer = Bearer::new(self.admin_secret()?.as_deref())?;
        let r = self.endpoint()?;
        connect(r.endpoint, &r.uri, self.timeout, bearer).await
    }

    /// Runs one Admin call on the node, on a runtime of its own, and
    /// returns the answer; a refusal names the node and the status.
    pub fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnOnce(AdminConn) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let uri = self.uri()?;
        runtime()?.block_on(async {
            let admin = self.admin().await?;
            f(admin)
                .await
                .map(tonic::Response::into_inner)
                .map_err(answered(&uri))
        })
    }
}

/// `endpoint` verified against the CA bundle in `ca`, and the name
/// `name` (else the address's host).
pub fn tls_endpoint(
    endpoint: tonic::transport::Endpoint,
    ca: &std::path::Path,
    name: Option<&str>,
    identity: Option<&(PathBuf, PathBuf)>,
) -> Result<tonic::transport::Endpoint> {
    use trine_control::tls;
    let pem = tls::read(
        ca,
        "CA bundle",
        "give the bundle that signed the node's certificate with --ca-cert",
    )?;
    let identity = identity
        .map(|(cert, key)| {
            let fix = "give a certificate and key with --client-cert and --client-key";
            Ok::<_, tls::Error>((
                tls::read(cert, "client certificate", fix)?,
                tls::read_private(key, "client key", fix)?,
            ))
        })
        .transpose()?;
    let config = tls::client_config(
        &pem,
        name,
        identity.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
    );
    endpoint
        .tls_config(config)
        .with_context(|| format!("TLS with the CA bundle {}", ca.display()))
}

/// An Admin client on `endpoint` (TLS set up where it is https); `uri`
/// names it in errors.
pub(crate) async fn connect(
    endpoint: tonic::transport::Endpoint,
    uri: &str,
    timeout: Duration,
    bearer: Bearer,
) -> Result<AdminConn> {
    let channel = endpoint
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .with_context(|| format!("cannot reach a trine node at {uri}; is it running? (--node or --data-dir choose which)"))?;
    Ok(AdminClient::with_interceptor(channel, bearer))
}

pub(crate) fn answered(uri: &str) -> impl Fn(tonic::Status) -> anyhow::Error + '_ {
    move |s| {
        anyhow::anyhow!(
            "{uri} answered {:?}: {}{}",
            s.code(),
            s.message(),
            tls_hint(uri, &s)
        )
    }
}

/// A hint for a call that failed in the transport: a plain-text call that
/// met a TLS port (the server closes the connection, or answers with TLS
/// bytes), or a TLS call without the client certificate the port wants.
/// Such a status was made by our own transport, not sent by the node: it
/// carries the transport's error as its source.
pub(crate) fn tls_hint(uri: &str, s: &tonic::Status) -> &'static str {
    if std::error::Error::source(s).is_none() {
        ""
    } else if uri.starts_with("http://") {
        " (does the node serve TLS on its client ports, --api-tls? then use https://host:port with --ca-cert)"
    } else {
        // A TLS 1.3 server refuses a missing or foreign client certificate
        // after the client's side of the handshake: the call fails.
        " (does the node require a client certificate, --api-tls-client-ca? give one from that CA with --client-cert and --client-key)"
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

// ---------------------------------------------------------------- certs

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a cluster CA: ca.crt and ca.key (0600) in --ca-dir.
    Init {
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// Cluster name, recorded in the CA's subject.
        #[arg(long, default_value = "trine")]
        cluster: String,
    },
    /// Issue a node certificate signed by the CA: writes ca.crt, node.crt
    /// and node.key (0600) into --out (a node's --tls-dir).
    Issue {
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// Node name (also a subject alternative name).
        #[arg(long)]
        name: String,
        /// Output directory, e.g. <data-dir>/tls.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// More host names or IP addresses peers dial the node by
        /// (repeatable); localhost and 127.0.0.1 are always included.
        #[arg(long = "san", value_name = "HOST")]
        sans: Vec<String>,
    },
    /// Start a CA rotation: a new CA signs from now on, and ca.crt holds it
    /// and the old one (the overlap: nodes trust both while their
    /// certificates are re-issued); the old key is kept as ca.key.<time>.
    /// With --retire, end it: ca.crt keeps only the new CA. Each step
    /// reaches the nodes with `trine certs rotate`; running nodes pick up
    /// their TLS dir's files within seconds, without a restart. The order:
    /// rotate-ca; `certs rotate --trust-only` on every node; `certs rotate`
    /// on every node; rotate-ca --retire; `certs rotate --trust-only` on
    /// every node.
    RotateCa {
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// Cluster name, recorded in the new CA's subject.
        #[arg(long, default_value = "trine")]
        cluster: String,
        /// End the overlap: drop the old CAs from ca.crt.
        #[arg(long)]
        retire: bool,
    },
    /// Renew a node's certificate in place: a new key and certificate from
    /// the CA's signing key, and the CA's ca.crt, written into the node's TLS
    /// dir (key first, then certificate). The running node swaps them in
    /// within seconds for new connections; no restart, no downtime.
    Rotate {
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// Node name (the certificate must name the node).
        #[arg(long)]
        name: String,
        /// The node's TLS dir, e.g. <data-dir>/tls.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Host names or IP addresses (repeatable); default: the names the
        /// current certificate holds.
        #[arg(long = "san", value_name = "HOST")]
        sans: Vec<String>,
        /// Only copy ca.crt (the trust bundle), keeping key and certificate.
        #[arg(long)]
        trust_only: bool,
    },
}

pub fn certs(command: &CertsCommand) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match command {
        CertsCommand::Init { ca_dir, cluster } => {
            trine_control::tls::init_ca(ca_dir, cluster)?;
            writeln!(
                out,
                "cluster CA written to {}/ca.crt (key ca.key, 0600); issue node certificates with `trine certs issue --ca-dir {} --name <node> --out <tls dir>`",
                ca_dir.display(),
                ca_dir.display()
            )?;
        }
        CertsCommand::Issue {
            ca_dir,
            name,
            out: dir,
            sans,
        } => {
            trine_control::tls::issue_node(ca_dir, name, sans, dir)?;
            writeln!(
                out,
                "certificate for {name} written to {} (ca.crt, node.crt, node.key); start the node with --tls-dir {}",
                dir.display(),
                dir.display()
            )?;
        }
        CertsCommand::RotateCa {
            ca_dir,
            cluster,
            retire,
        } => {
            let n = trine_control::tls::rotate_ca(ca_dir, cluster, *retire)?;
            if *retire {
                writeln!(
                    out,
                    "{}/ca.crt now holds only the signing CA; give it to every node with `trine certs rotate --ca-dir {} --name <node> --out <tls dir> --trust-only`",
                    ca_dir.display(),
                    ca_dir.display()
                )?;
            } else {
                writeln!(
                    out,
                    "a new CA signs from now on; {}/ca.crt holds it and {} older CA(s). Next: `trine certs rotate --ca-dir {} --name <node> --out <tls dir> --trust-only` on every node, then the same without --trust-only on every node, then `trine certs rotate-ca --ca-dir {} --retire`",
                    ca_dir.display(),
                    n - 1,
                    ca_dir.display(),
                    ca_dir.display()
                )?;
            }
        }
        CertsCommand::Rotate {
            ca_dir,
            name,
            out: dir,
            sans,
            trust_only,
        } => {
            trine_control::tls::rotate_node(ca_dir, name, sans, dir, *trust_only)?;
            let what = if *trust_only {
                "the CA bundle (ca.crt)"
            } else {
                "a new key and certificate and the CA bundle"
            };
            writeln!(
                out,
                "{what} written to {}; a running node uses them for new connections within seconds",
                dir.display()
            )?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- status

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

fn role_name(r: i32) -> &'static str {
    match v1::RaftRole::try_from(r).unwrap_or_default() {
        v1::RaftRole::Leader => "leader",
        v1::RaftRole::Voter => "voter",
        v1::RaftRole::Learner => "learner",
        v1::RaftRole::Unspecified => "-",
    }
}

fn status_name(s: i32) -> &'static str {
    match v1::NodeStatus::try_from(s).unwrap_or_default() {
        v1::NodeStatus::Up => "up",
        v1::NodeStatus::Down => "down",
        v1::NodeStatus::Draining => "draining",
        v1::NodeStatus::Unspecified => "-",
    }
}

/// Every node of the cluster and what each says of itself.
pub async fn gather(target: &Target) -> Result<Vec<(v1::Node, Option<v1::ClusterStatusResponse>)>> {
    let Resolved {
        uri,
        endpoint,
        ca,
        identity,
    } = target.endpoint()?;
    let bearer = Bearer::new(target.admin_secret()?.as_deref())?;
    let mut admin = connect(endpoint, &uri, target.timeout, bearer.clone()).await?;
    let nodes = admin
        .list_nodes(v1::ListNodesRequest::default())
        .await
        .map_err(answered(&uri))?
        .into_inner()
        .nodes;
    let mut out = Vec::new();
    for n in nodes {
        // A node serving TLS is verified by its name, with the same CA
        // bundle; without one its own status stays unknown.
        let endpoint = if n.api_tls {
            let uri = format!("https://{}", n.grpc_addr);
            ca.as_deref().and_then(|ca| {
                let e = tonic::transport::Endpoint::from_shared(uri).ok()?;
                tls_endpoint(e, ca, Some(&n.name), identity.as_ref()).ok()
            })
        } else {
            tonic::transport::Endpoint::from_shared(format!("http://{}", n.grpc_addr)).ok()
        };
        let connected = match endpoint {
            Some(e) => connect(e, &n.grpc_addr, Duration::from_secs(2), bearer.clone()).await,
            None => Err(anyhow::anyhow!("no endpoint")),
        };
        let own = match connected {
            Ok(mut c) => c
                .cluster_status(v1::ClusterStatusRequest {
                    max_staleness_ms: 60_000,
                    ..Default::default()
                })
                .await
                .ok()
                .map(tonic::Response::into_inner),
            Err(_) => None,
        };
        out.push((n, own));
    }
    out.sort_by(|a, b| {
        let key = |n: &v1::Node| {
            (
                n.locality.clone().unwrap_or_default().region,
                n.name.clone(),
            )
        };
        key(&a.0).cmp(&key(&b.0))
    });
    Ok(out)
}

pub fn write_status_table(
    out: &mut dyn std::io::Write,
    rows: &[(v1::Node, Option<v1::ClusterStatusResponse>)],
) -> Result<()> {
    writeln!(
        out,
        "{:<14} {:<14} {:<8} {:<9} {:>7} {:>6} {:>10}  {:<21} {:<21}",
        "NODE", "REGION", "ROLE", "STATUS", "HEIGHT", "PEERS", "RTT→LEADER", "GRPC", "RAFT"
    )?;
    for (n, s) in rows {
        let region = n.locality.clone().unwrap_or_default().region;
        let (role, height, peers, rtt) = match s {
            Some(s) => (
                role_name(s.role),
                s.chain_height.to_string(),
                s.peers.to_string(),
                if s.role == v1::RaftRole::Leader as i32 {
                    "-".into()
                } else if s.leader_rtt_seconds > 0.0 {
                    format!("{:.1}ms", s.leader_rtt_seconds * 1e3)
                } else {
                    "?".into()
                },
            ),
            None => (
                role_name(n.role),
                "unreachable".into(),
                "-".into(),
                "-".into(),
            ),
        };
        writeln!(
            out,
            "{:<14} {:<14} {:<8} {:<9} {:>7} {:>6} {:>10}  {:<21} {:<21}",
            n.name,
            region,
            role,
            status_name(n.status),
            height,
            peers,
            rtt,
            n.grpc_addr,
            n.raft_addr
        )?;
    }
    // A voter that does not vote yet weakens the majority: say why.
    for (n, s) in rows {
        let Some(s) = s else { continue };
        if s.voting || s.role == v1::RaftRole::Learner as i32 {
            continue;
        }
        if s.restored {
            writeln!(
                out,
                "{}: does not vote: its data dir was put back from an old copy; it votes again once it has caught up (its log says how far)",
                n.name
            )?;
        } else {
            writeln!(
                out,
                "{}: does not vote yet: waiting for half the other voters to confirm its start",
                n.name
            )?;
        }
    }
    Ok(())
}

pub fn status(args: &StatusArgs) -> Result<()> {
    let rows = runtime()?.block_on(gather(&args.target))?;
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Table => write_status_table(&mut out, &rows)?,
        Output::Json => {
            for (n, s) in &rows {
                let line = serde_json::json!({
                    "node_id": n.node_id,
                    "name": n.name,
                    "region": n.locality.clone().unwrap_or_default().region,
                    "role": s.as_ref().map_or(role_name(n.role), |s| role_name(s.role)),
                    "status": status_name(n.status),
                    "reachable": s.is_some(),
                    "chain_height": s.as_ref().map(|s| s.chain_height),
                    "applied_index": s.as_ref().map(|s| s.applied_index),
                    "term": s.as_ref().map(|s| s.term),
                    "leader_id": s.as_ref().map(|s| s.leader_id),
                    "peers": s.as_ref().map(|s| s.peers),
                    "leader_rtt_seconds": s.as_ref().map(|s| s.leader_rtt_seconds),
                    "voting": s.as_ref().map(|s| s.voting),
                    "restored_from_old_copy": s.as_ref().map(|s| s.restored),
                    "grpc_addr": n.grpc_addr,
                    "raft_addr": n.raft_addr,
                    "api_tls": n.api_tls,
                });
                writeln!(out, "{line}")?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- nodes

#[derive(Debug, Args)]
pub struct NodesArgs {
    #[command(flatten)]
    pub target: Target,
    /// Only nodes in this region.
    #[arg(long)]
    pub region: Option<String>,
    /// Read through the leader (read index) instead of the node's replica.
    #[arg(long)]
    pub linearizable: bool,
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

pub fn nodes(args: &NodesArgs) -> Result<()> {
    let req = v1::ListNodesRequest {
        region: args.region.clone().unwrap_or_default(),
        consistency: consistency(args.linearizable),
        ..Default::default()
    };
    let resp = args
        .target
        .call(|mut a| async move { a.list_nodes(req).await })?;
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Table => {
            writeln!(out, "as of index {}", resp.as_of_index)?;
            writeln!(
                out,
                "{:<20} {:<14} {:<14} {:<8} {:<9} {:<12} {:>5} {:>9}  {:<21} {:<21}",
                "ID", "NAME", "REGION", "ROLE", "STATUS", "SIMD", "CORES", "MEMORY", "GRPC", "RAFT"
            )?;
            for n in &resp.nodes {
                let cap = n.capacity.clone().unwrap_or_default();
                writeln!(
                    out,
                    "{:<20} {:<14} {:<14} {:<8} {:<9} {:<12} {:>5} {:>7.1}Gi  {:<21} {:<21}",
                    n.node_id,
                    n.name,
                    n.locality.clone().unwrap_or_default().region,
                    role_name(n.role),
                    status_name(n.status),
                    cap.simd,
                    cap.cpu_cores,
                    cap.memory_bytes as f64 / (1u64 << 30) as f64,
                    n.grpc_addr,
                    n.raft_addr
                )?;
            }
        }
        Output::Json => {
            for n in &resp.nodes {
                let cap = n.capacity.clone().unwrap_or_default();
                let line = serde_json::json!({
                    "node_id": n.node_id,
                    "name": n.name,
                    "peer_id": n.peer_id,
                    "region": n.locality.clone().unwrap_or_default().region,
                    "zone": n.locality.clone().unwrap_or_default().zone,
                    "role": role_name(n.role),
                    "status": status_name(n.status),
                    "grpc_addr": n.grpc_addr,
                    "http_addr": n.http_addr,
                    "raft_addr": n.raft_addr,
                    "p2p_addrs": n.p2p_addrs,
                    "simd": cap.simd,
                    "cpu_cores": cap.cpu_cores,
                    "memory_bytes": cap.memory_bytes,
                    "version": n.version,
                });
                writeln!(out, "{line}")?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- chain

#[derive(Debug, Subcommand)]
pub enum ChainCommand {
    /// The newest block: height, hash, time, transactions.
    Head {
        #[command(flatten)]
        target: Target,
    },
    /// One block as JSON, by height or hash (64 hex digits).
    Show {
        #[command(flatten)]
        target: Target,
        /// Height or hex hash.
        block: String,
    },
    /// Append an operator's note to the chain (committed through the leader).
    Note {
        #[command(flatten)]
        target: Target,
        /// The note, up to 4096 bytes.
        text: String,
    },
    /// Recompute every block hash from the first block and check every
    /// link; reports the first bad height. Exit status 1 when broken.
    Verify {
        #[command(flatten)]
        target: Target,
        /// Verify the chain in this (stopped) node's data dir directly,
        /// without asking a running node.
        #[arg(long, value_name = "DATA_DIR")]
        offline: Option<PathBuf>,
    },
}

pub(crate) fn unix(ts: Option<&prost_types::Timestamp>) -> String {
    let Some(ts) = ts else { return "-".into() };
    let t = UNIX_EPOCH + Duration::new(ts.seconds.max(0) as u64, ts.nanos.max(0) as u32);
    humantime::format_rfc3339_millis(t).to_string()
}

fn hex(b: &[u8]) -> String {
    trine_control::chain::hex(b)
}

#[derive(Debug, Args)]
pub struct PlacementArgs {
    #[command(flatten)]
    pub target: Target,
    /// Only this model.
    #[arg(long)]
    pub model: Option<String>,
    /// Read through the leader (read index) instead of the node's replica.
    #[arg(long)]
    pub linearizable: bool,
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

/// `trine placement`: model → replica → stage → node, with the layers and
/// the fencing generation of each slot.
pub fn placement(args: &PlacementArgs) -> Result<()> {
    let req = v1::GetPlacementRequest {
        model: args.model.clone().unwrap_or_default(),
        consistency: consistency(args.linearizable),
        ..Default::default()
    };
    let resp = args
        .target
        .call(|mut a| async move { a.get_placement(req).await })?;
    let nodes_req = v1::ListNodesRequest::default();
    let nodes = args
        .target
        .call(|mut a| async move { a.list_nodes(nodes_req).await })?;
    let name_of = |id: u64| {
        nodes
            .nodes
            .iter()
            .find(|n| n.node_id == id)
            .map(|n| {
                (
                    n.name.clone(),
                    n.locality.clone().unwrap_or_default().region,
                )
            })
            .unwrap_or_else(|| ("(removed)".into(), "-".into()))
    };
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Table => {
            writeln!(out, "as of index {}", resp.as_of_index)?;
            writeln!(
                out,
                "{:<20} {:>7} {:>5} {:>9}  {:<14} {:<14} {:<9} {:>10}  DETAIL",
                "MODEL", "REPLICA", "STAGE", "LAYERS", "NODE", "REGION", "STATE", "GENERATION"
            )?;
            for a in &resp.assignments {
                let (name, region) = name_of(a.node_id);
                writeln!(
                    out,
                    "{:<20} {:>7} {:>5} {:>9}  {:<14} {:<14} {:<9} {:>10}  {}",
                    a.model,
                    a.replica,
                    a.stage,
                    format!("{}..{}", a.layer_start, a.layer_end),
                    name,
                    region,
                    stage_state_name(a.state),
                    a.generation,
                    a.detail
                )?;
            }
            if resp.assignments.is_empty() {
                writeln!(out, "(no stage is placed)")?;
            }
            for m in &resp.models {
                writeln!(
                    out,
                    "model {}: {} stage(s) × {} replica(s) of {} layers, sha256 {}, from {}{}",
                    m.name,
                    m.stages,
                    m.replicas,
                    m.layers,
                    m.sha256.get(..12).unwrap_or(&m.sha256),
                    m.source,
                    if m.regions.is_empty() {
                        String::new()
                    } else {
                        format!(", in {}", m.regions.join(", "))
                    }
                )?;
            }
        }
        Output::Json => {
            for a in &resp.assignments {
                let (name, region) = name_of(a.node_id);
                let line = serde_json::json!({
                    "model": a.model, "replica": a.replica, "stage": a.stage,
                    "layer_start": a.layer_start, "layer_end": a.layer_end,
                    "node_id": a.node_id, "node": name, "region": region,
                    "state": stage_state_name(a.state), "generation": a.generation,
                    "detail": a.detail, "failed_on": a.failed_on,
                });
                writeln!(out, "{line}")?;
            }
        }
    }
    Ok(())
}

fn stage_state_name(s: i32) -> &'static str {
    match v1::StageState::try_from(s).unwrap_or_default() {
        v1::StageState::Unspecified => "unknown",
        v1::StageState::Assigned => "assigned",
        v1::StageState::Loading => "loading",
        v1::StageState::Ready => "ready",
        v1::StageState::Failed => "failed",
    }
}

pub fn chain(command: &ChainCommand) -> Result<()> {
    match command {
        ChainCommand::Head { target } => {
            let h = target
                .call(|mut a| async move { a.chain_head(v1::ChainHeadRequest::default()).await })?
                .head
                .context("the chain is empty")?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "height  {}", h.height)?;
            writeln!(out, "hash    {}", hex(&h.hash))?;
            writeln!(out, "prev    {}", hex(&h.prev_hash))?;
            writeln!(out, "term    {}  index {}", h.term, h.index)?;
            writeln!(out, "time    {}", unix(h.time.as_ref()))?;
            writeln!(out, "txs     {}", h.tx_count)?;
        }
        ChainCommand::Show { target, block } => {
            let selector = match block.parse::<u64>() {
                Ok(h) => v1::get_block_request::Selector::Height(h),
                Err(_) => v1::get_block_request::Selector::Hash(block.clone()),
            };
            let req = v1::GetBlockRequest {
                selector: Some(selector),
                ..Default::default()
            };
            let b = target
                .call(|mut a| async move { a.get_block(req).await })?
                .block
                .context("no block in the answer")?;
            let h = b.header.unwrap_or_default();
            let txs: Vec<serde_json::Value> = b
                .txs
                .iter()
                .map(|t| {
                    let body = serde_json::from_slice::<serde_json::Value>(&t.body)
                        .unwrap_or_else(|_| serde_json::Value::String(hex(&t.body)));
                    serde_json::json!({
                        "kind": t.kind,
                        "summary": t.summary,
                        "principal": t.principal,
                        "rejected": (!t.rejected.is_empty()).then_some(&t.rejected),
                        "body": body,
                    })
                })
                .collect();
            let json = serde_json::json!({
                "height": h.height,
                "hash": hex(&h.hash),
                "prev_hash": hex(&h.prev_hash),
                "term": h.term,
                "index": h.index,
                "time": unix(h.time.as_ref()),
                "txs": txs,
            });
            writeln!(
                std::io::stdout().lock(),
                "{}",
                serde_json::to_string_pretty(&json)?
            )?;
        }
        ChainCommand::Note { target, text } => {
            let req = v1::AppendNoteRequest {
                text: text.clone(),
                ..Default::default()
            };
            let r = target.call(|mut a| async move { a.append_note(req).await })?;
            writeln!(std::io::stdout().lock(), "committed at height {}", r.height)?;
        }
        ChainCommand::Verify { target, offline } => match offline {
            Some(dir) => verify_offline(dir)?,
            None => {
                let r = target.call(|mut a| async move {
                    a.verify_chain(v1::VerifyChainRequest::default()).await
                })?;
                if !r.ok {
                    bail!("chain broken at height {}: {}", r.bad_height, r.problem);
                }
                let head = r.head.unwrap_or_default();
                writeln!(
                    std::io::stdout().lock(),
                    "ok: {} blocks from height {} to {} verified; head {}",
                    r.blocks,
                    r.first_height,
                    head.height,
                    hex(&head.hash)
                )?;
            }
        },
    }
    Ok(())
}

/// `trine node trust-data-dir`: see the command's help.
pub fn trust_data_dir(data_dir: &std::path::Path) -> Result<()> {
    let raft = data_dir.join("raft");
    if !raft.exists() {
        bail!(
            "{} holds no Raft store (no raft/ directory); is it a cluster member's data dir?",
            data_dir.display()
        );
    }
    trine_control::store::trust_data_dir(&raft)
        .map_err(|e| anyhow::anyhow!("cannot mark {}: {e}", data_dir.display()))?;
    writeln!(
        std::io::stdout().lock(),
        "marked: at its next start this node votes at once, even if its peers saw a later start (its data dir was put back from an old copy); the mark is used once"
    )?;
    Ok(())
}

fn verify_offline(data_dir: &std::path::Path) -> Result<()> {
    let raft = data_dir.join("raft");
    if !raft.exists() {
        bail!(
            "{} holds no Raft store (no raft/ directory); is it a cluster member's data dir?",
            data_dir.display()
        );
    }
    let (_, sm) = trine_control::store::open(&raft).with_context(|| {
        format!(
            "opening {} (stop the node that uses it first, or verify through it without --offline)",
            raft.display()
        )
    })?;
    let reader = sm.reader();
    let first = reader.first_height().unwrap_or(0);
    match trine_control::chain::verify(reader.blocks(first, usize::MAX)) {
        Ok(v) => {
            let (h, hash) = v.head.unwrap_or((0, [0; 32]));
            writeln!(
                std::io::stdout().lock(),
                "ok: {} blocks from height {first} to {h} verified; head {}",
                v.blocks,
                hex(&hash)
            )?;
            Ok(())
        }
        Err(e) => bail!("chain broken at height {}: {e}", e.height()),
    }
}

// ---------------------------------------------------------------- leave

pub fn leave(target: &Target, node_id: Option<u64>) -> Result<()> {
    let req = v1::DrainNodeRequest {
        node_id: node_id.unwrap_or(0),
        ..Default::default()
    };
    let r = target.call(|mut a| async move { a.drain_node(req).await })?;
    writeln!(
        std::io::stdout().lock(),
        "node {} drained and removed from the cluster; it can be stopped now",
        r.node_id
    )?;
    Ok(())
}
