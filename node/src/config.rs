//! The node's configuration: one resolved [`Config`], built from layers
//! (defaults < TOML file < `TRINE_*` environment < command-line flags), then
//! validated rule by rule with a message that names the key and the fix.
//!
//! A [`Layer`] is the same set of keys, all optional. The file and the
//! command line (clap reads flags and their `TRINE_*` variables) each give
//! one; [`Config::resolve`] stacks them on the defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

/// Longest drain a node accepts on shutdown. Orchestrators kill long before
/// this (Kubernetes' default grace period is 30 s).
const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(600);

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The effective configuration of `trine node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// Directory that holds this node's state; created (mode 0700) if absent,
    /// and locked while the node runs.
    pub data_dir: PathBuf,
    /// Node name shown in logs, metrics and cluster views.
    pub name: String,
    /// Region this node runs in (e.g. "us-east").
    pub region: String,
    /// Zone inside the region (may be empty).
    pub zone: String,
    /// gRPC listen address (Inference, Admin, health, reflection).
    pub grpc_addr: SocketAddr,
    /// HTTP listen address (/metrics, /healthz, /readyz).
    pub http_addr: SocketAddr,
    /// Log line format.
    pub log_format: LogFormat,
    /// Log filter, in `RUST_LOG` syntax (e.g. "info,trine_node=debug").
    pub log_level: String,
    /// How long in-flight requests may run after SIGINT/SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// libp2p listen addresses (TCP).
    pub p2p_listen: Vec<Multiaddr>,
    /// Addresses other nodes should dial (behind NAT, in containers); empty
    /// means the listen addresses.
    pub p2p_announce: Vec<Multiaddr>,
    /// Nodes to join through; `/dns4/` names are resolved at dial time.
    pub bootstrap: Vec<Multiaddr>,
    /// Admit every peer to gossip and the stage protocol (no peer filter).
    pub open_mesh: bool,
    /// "off", "realistic" (built-in four-region matrix) or a TOML file.
    pub simulated_latency: String,
    /// How often this node gossips its health.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How often each connection is pinged (RTT).
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A disconnected peer silent for this long is forgotten.
    #[serde(with = "humantime_serde")]
    pub peer_ttl: Duration,
    /// Most established mesh connections.
    pub max_connections: u32,
    /// Mutual-TLS Raft listen address (peer-facing only).
    pub raft_addr: SocketAddr,
    /// host:port other members should dial for Raft; empty means raft_addr.
    pub raft_announce: String,
    /// host:port others dial for gRPC; empty means the bound gRPC address.
    pub grpc_announce: String,
    /// host:port others reach HTTP at; empty means the bound HTTP address.
    pub http_announce: String,
    /// Start a new cluster with this node as its first voter (first start).
    pub init: bool,
    /// Raft addresses (host:port) of members to join through.
    pub join: Vec<String>,
    /// Directory with ca.crt, node.crt and node.key; empty means
    /// <data_dir>/tls.
    pub tls_dir: PathBuf,
    /// Serve the client ports (gRPC and HTTP) over TLS only.
    pub api_tls: bool,
    /// Certificate chain (PEM) the client ports present; empty means the
    /// node certificate in the TLS dir. Reloaded when it changes.
    pub api_tls_cert: PathBuf,
    /// Its private key (PEM, 0600); empty means the TLS dir's node.key.
    pub api_tls_key: PathBuf,
    /// CA bundle that verifies other nodes' client ports when this node
    /// forwards a request over TLS; empty means the TLS dir's ca.crt.
    pub api_tls_ca: PathBuf,
    /// With `api_tls`: require a client certificate from this CA bundle on
    /// the client ports (mutual TLS, on top of tokens); empty means none.
    pub api_tls_client_ca: PathBuf,
    /// With `init` on a new cluster: a file (0600) holding the secret of the
    /// first admin token; empty means TRINE_ADMIN_TOKEN, else a new one.
    /// Either way the secret is kept in <data_dir>/admin.token.
    pub admin_token_file: PathBuf,
    /// Hugging Face cache the node looks in for deployed models; empty
    /// means $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.
    pub model_cache: PathBuf,
    /// Cluster name (in the CA and Raft's config).
    pub cluster: String,
    /// Raft timeouts: "lan" or "wan" (regions ~200 ms apart).
    pub raft_profile: RaftProfile,
    /// A member unanswered this long is marked down.
    #[serde(with = "humantime_serde")]
    pub down_after: Duration,
    /// A voter down this long gives its seat to a healthy learner.
    #[serde(with = "humantime_serde")]
    pub voter_replace_after: Duration,
    /// Least time between two rebalancing moves (one replica each).
    #[serde(with = "humantime_serde")]
    pub rebalance_every: Duration,
    /// Serve inference requests that carry no API token.
    pub allow_anonymous: bool,
    /// Accept the Admin API's InjectFault (chaos runs and tests only).
    pub fault_injection: bool,
    /// Most sequences sharing one batched forward step of a stage (and
    /// generations running at once on this node); 1 turns batching off.
    pub max_batch: u32,
    /// lm_head precision of the last stages this node loads: `file` (as
    /// stored), `q8` or `q4` (Q8_0 / Q4_0 made at load).
    pub quant_embd: trine_engine::model::QuantEmbd,
    /// How the stages this node loads pack their ternary weights: `i2s`,
    /// `base3` (1.6 bits, repacked at load) or `auto` (measured per shape).
    pub weight_layout: trine_engine::model::WeightLayout,
    /// Compute threads; 0 means one per physical core this process may use.
    pub threads: u32,
    /// Ternary kernel: `auto` (the fastest per weight shape, measured at
    /// each stage load) or one this CPU runs (avx2, avx512-vnni, ...).
    pub kernel: String,
    /// Bind each compute thread to its own physical core.
    pub pin_threads: bool,
    /// AMX-INT8 tiles for prompts and batched steps where the CPU has
    /// them: `auto` or `off`.
    pub amx: crate::compute::Amx,
    /// Longest an inference request may take, end to end, unless the
    /// client asks for less (gRPC deadline or the request's `timeout`).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Longest the router waits for a replica's first token before it
    /// fails over.
    #[serde(with = "humantime_serde")]
    pub first_token_timeout: Duration,
    /// Raft entries between snapshots (the log is purged behind them).
    pub snapshot_every: u64,
    /// Most prompt tokens one inference request may carry; longer prompts are refused (400 / INVALID_ARGUMENT).
    pub max_prompt_tokens: u32,
    /// Most tokens one request may ask to generate (`max_tokens`); more is refused (400 / INVALID_ARGUMENT).
    pub max_tokens: u32,
    /// Generations waiting for a slot on this node; more are refused (429 / RESOURCE_EXHAUSTED) instead of queued.
    pub max_queue: u32,
    /// Largest HTTP request body (the OpenAI API); larger is refused (413).
    pub max_body_bytes: u64,
    /// Largest gRPC message the client port decodes; larger is refused (OUT_OF_RANGE).
    pub max_message_bytes: u64,
    /// Concurrent gRPC streams one client connection may open (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams: u32,
    /// Most libp2p connections one peer may hold to this node (the rest are refused).
    pub max_connections_per_peer: u32,
}

/// Raft timeout profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RaftProfile {
    /// One site: heartbeat 100 ms, election timeout 300-600 ms.
    #[default]
    Lan,
    /// Regions up to ~300 ms apart: heartbeat 500 ms, election timeout 1.5-3 s.
    Wan,
}

/// One layer of configuration: every key optional. Deserialized from the
/// TOML file (unknown keys refused) and filled from flags/env by the CLI.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub data_dir: Option<PathBuf>,
    pub name: Option<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub grpc_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub shutdown_timeout: Option<Duration>,
    pub p2p_listen: Option<Vec<Multiaddr>>,
    pub p2p_announce: Option<Vec<Multiaddr>>,
    pub bootstrap: Option<Vec<Multiaddr>>,
    pub open_mesh: Option<bool>,
    pub simulated_latency: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub heartbeat_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub ping_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub peer_ttl: Option<Duration>,
    pub max_connections: Option<u32>,
    pub raft_addr: Option<SocketAddr>,
    pub raft_announce: Option<String>,
    pub grpc_announce: Option<String>,
    pub http_announce: Option<String>,
    pub init: Option<bool>,
    pub join: Option<Vec<String>>,
    pub tls_dir: Option<PathBuf>,
    pub api_tls: Option<bool>,
    pub api_tls_cert: Option<PathBuf>,
    pub api_tls_key: Option<PathBuf>,
    pub api_tls_ca: Option<PathBuf>,
    pub api_tls_client_ca: Option<PathBuf>,
    pub admin_token_file: Option<PathBuf>,
    pub model_cache: Option<PathBuf>,
    pub cluster: Option<String>,
    pub raft_profile: Option<RaftProfile>,
    #[serde(default, with = "humantime_serde")]
    pub down_after: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub voter_replace_after: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub rebalance_every: Option<Duration>,
    pub allow_anonymous: Option<bool>,
    pub fault_injection: Option<bool>,
    pub max_batch: Option<u32>,
    pub quant_embd: Option<trine_engine::model::QuantEmbd>,
    pub weight_layout: Option<trine_engine::model::WeightLayout>,
    pub threads: Option<u32>,
    pub kernel: Option<String>,
    pub pin_threads: Option<bool>,
    pub amx: Option<crate::compute::Amx>,
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub first_token_timeout: Option<Duration>,
    pub snapshot_every: Option<u64>,
    pub max_prompt_tokens: Option<u32>,
    pub max_tokens: Option<u32>,
    pub max_queue: Option<u32>,
    pub max_body_bytes: Option<u64>,
    pub max_message_bytes: Option<u64>,
    pub max_streams: Option<u32>,
    pub max_connections_per_peer: Option<u32>,
}

/// Why a configuration could not be loaded or is not valid. Each message is
/// one line naming the problem and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "config file {path} not found; create it (`trine node --print-config > {path}` writes the defaults) or drop --config"
    )]
    FileNotFound { path: PathBuf },
    #[error("config file {path} cannot be read: {source}; check its permissions")]
    FileRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "config file {path}, line {line}: {message}; `trine node --print-config` lists every key with a valid value"
    )]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("invalid {key} {value:?}: {rule}")]
    Invalid {
        key: &'static str,
        value: String,
        rule: String,
    },
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("trine-data"),
            name: default_name(),
            region: "local".into(),
            zone: String::new(),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 7400)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 7401)),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            shutdown_timeout: Duration::from_secs(10),
            p2p_listen: vec!["/ip4/127.0.0.1/tcp/7402".parse().expect("valid multiaddr")],
            p2p_announce: Vec::new(),
            bootstrap: Vec::new(),
            open_mesh: false,
            simulated_latency: "off".into(),
            heartbeat_interval: Duration::from_secs(2),
            ping_interval: Duration::from_secs(5),
            peer_ttl: Duration::from_secs(15),
            max_connections: 256,
            raft_addr: SocketAddr::from(([127, 0, 0, 1], 7403)),
            raft_announce: String::new(),
            grpc_announce: String::new(),
            http_announce: String::new(),
            init: false,
            join: Vec::new(),
            tls_dir: PathBuf::new(),
            api_tls: false,
            api_tls_cert: PathBuf::new(),
            api_tls_key: PathBuf::new(),
            api_tls_ca: PathBuf::new(),
            api_tls_client_ca: PathBuf::new(),
            admin_token_file: PathBuf::new(),
            model_cache: PathBuf::new(),
            cluster: "trine".into(),
            raft_profile: RaftProfile::Lan,
            down_after: Duration::from_secs(3),
            voter_replace_after: Duration::from_secs(30),
            rebalance_every: Duration::from_secs(30),
            allow_anonymous: false,
            fault_injection: false,
            max_batch: 32,
            quant_embd: Default::default(),
            weight_layout: Default::default(),
            threads: 0,
            kernel: "auto".into(),
            pin_threads: false,
            amx: crate::compute::Amx::Auto,
            request_timeout: Duration::from_secs(300),
            first_token_timeout: Duration::from_secs(60),
            snapshot_every: 10_000,
            max_prompt_tokens: 8192,
            max_tokens: 4096,
            max_queue: 64,
            max_body_bytes: 1 << 20,
            max_message_bytes: 4 << 20,
            max_streams: 128,
            max_connections_per_peer: 2,
        }
    }
}

impl Layer {
    /// Reads a TOML file. Errors name the file and the line.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::FileNotFound {
                path: path.to_owned(),
            },
            _ => Error::FileRead {
                path: path.to_owned(),
                source,
            },
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses TOML text; `path` is used in error messages only.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, Error> {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|span| {
                    text.as_bytes()[..span.start.min(text.len())]
                        .iter()
                        .filter(|&&b| b == b'\n')
                        .count()
                        + 1
                })
                .unwrap_or(1);
            Error::Parse {
                path: path.to_owned(),
                line,
                // toml's messages may span lines; a log line must not.
                message: e.message().trim().replace('\n', " "),
            }
        })
    }

    /// Keys set in `over` win over keys set here.
    #[must_use]
    pub fn overlay(self, over: Layer) -> Layer {
        Layer {
            data_dir: over.data_dir.or(self.data_dir),
            name: over.name.or(self.name),
            region: over.region.or(self.region),
            zone: over.zone.or(self.zone),
            grpc_addr: over.grpc_addr.or(self.grpc_addr),
            http_addr: over.http_addr.or(self.http_addr),
            log_format: over.log_format.or(self.log_format),
            log_level: over.log_level.or(self.log_level),
            shutdown_timeout: over.shutdown_timeout.or(self.shutdown_timeout),
            p2p_listen: over.p2p_listen.or(self.p2p_listen),
            p2p_announce: over.p2p_announce.or(self.p2p_announce),
            bootstrap: over.bootstrap.or(self.bootstrap),
            open_mesh: over.open_mesh.or(self.open_mesh),
            simulated_latency: over.simulated_latency.or(self.simulated_latency),
            heartbeat_interval: over.heartbeat_interval.or(self.heartbeat_interval),
            ping_interval: over.ping_interval.or(self.ping_interval),
            peer_ttl: over.peer_ttl.or(self.peer_ttl),
            max_connections: over.max_connections.or(self.max_connections),
            raft_addr: over.raft_addr.or(self.raft_addr),
            raft_announce: over.raft_announce.or(self.raft_announce),
            grpc_announce: over.grpc_announce.or(self.grpc_announce),
            http_announce: over.http_announce.or(self.http_announce),
            init: over.init.or(self.init),
            join: over.join.or(self.join),
            tls_dir: over.tls_dir.or(self.tls_dir),
            api_tls: over.api_tls.or(self.api_tls),
            api_tls_cert: over.api_tls_cert.or(self.api_tls_cert),
            api_tls_key: over.api_tls_key.or(self.api_tls_key),
            api_tls_ca: over.api_tls_ca.or(self.api_tls_ca),
            api_tls_client_ca: over.api_tls_client_ca.or(self.api_tls_client_ca),
            admin_token_file: over.admin_token_file.or(self.admin_token_file),
            model_cache: over.model_cache.or(self.model_cache),
            cluster: over.cluster.or(self.cluster),
            raft_profile: over.raft_profile.or(self.raft_profile),
            down_after: over.down_after.or(self.down_after),
            voter_replace_after: over.voter_replace_after.or(self.voter_replace_after),
            rebalance_every: over.rebalance_every.or(self.rebalance_every),
            allow_anonymous: over.allow_anonymous.or(self.allow_anonymous),
            fault_injection: over.fault_injection.or(self.fault_injection),
            max_batch: over.max_batch.or(self.max_batch),
            quant_embd: over.quant_embd.or(self.quant_embd),
            weight_layout: over.weight_layout.or(self.weight_layout),
            threads: over.threads.or(self.threads),
            kernel: over.kernel.or(self.kernel),
            pin_threads: over.pin_threads.or(self.pin_threads),
            amx: over.amx.or(self.amx),
            request_timeout: over.request_timeout.or(self.request_timeout),
            first_token_timeout: over.first_token_timeout.or(self.first_token_timeout),
            snapshot_every: over.snapshot_every.or(self.snapshot_every),
            max_prompt_tokens: over.max_prompt_tokens.or(self.max_prompt_tokens),
            max_tokens: over.max_tokens.or(self.max_tokens),
            max_queue: over.max_queue.or(self.max_queue),
            max_body_bytes: over.max_body_bytes.or(self.max_body_bytes),
            max_message_bytes: over.max_message_bytes.or(self.max_message_bytes),
            max_streams: over.max_streams.or(self.max_streams),
            max_connections_per_peer: over
                .max_connections_per_peer
                .or(self.max_connections_per_peer),
        }
    }
}

impl Config {
    /// Defaults, then `layer` on top, then validation.
    pub fn resolve(layer: Layer) -> Result<Self, Error> {
        let d = Config::default();
        let config = Config {
            data_dir: layer.data_dir.unwrap_or(d.data_dir),
            name: layer.name.unwrap_or(d.name),
            region: layer.region.unwrap_or(d.region),
            zone: layer.zone.unwrap_or(d.zone),
            grpc_addr: layer.grpc_addr.unwrap_or(d.grpc_addr),
            http_addr: layer.http_addr.unwrap_or(d.http_addr),
            log_format: layer.log_format.unwrap_or(d.log_format),
            log_level: layer.log_level.unwrap_or(d.log_level),
            shutdown_timeout: layer.shutdown_timeout.unwrap_or(d.shutdown_timeout),
            p2p_listen: layer.p2p_listen.unwrap_or(d.p2p_listen),
            p2p_announce: layer.p2p_announce.unwrap_or(d.p2p_announce),
            bootstrap: layer.bootstrap.unwrap_or(d.bootstrap),
            open_mesh: layer.open_mesh.unwrap_or(d.open_mesh),
            simulated_latency: layer.simulated_latency.unwrap_or(d.simulated_latency),
            heartbeat_interval: layer.heartbeat_interval.unwrap_or(d.heartbeat_interval),
            ping_interval: layer.ping_interval.unwrap_or(d.ping_interval),
            peer_ttl: layer.peer_ttl.unwrap_or(d.peer_ttl),
            max_connections: layer.max_connections.unwrap_or(d.max_connections),
            raft_addr: layer.raft_addr.unwrap_or(d.raft_addr),
            raft_announce: layer.raft_announce.unwrap_or(d.raft_announce),
            grpc_announce: layer.grpc_announce.unwrap_or(d.grpc_announce),
            http_announce: layer.http_announce.unwrap_or(d.http_announce),
            init: layer.init.unwrap_or(d.init),
            join: layer.join.unwrap_or(d.join),
            tls_dir: layer.tls_dir.unwrap_or(d.tls_dir),
            api_tls: layer.api_tls.unwrap_or(d.api_tls),
            api_tls_cert: layer.api_tls_cert.unwrap_or(d.api_tls_cert),
            api_tls_key: layer.api_tls_key.unwrap_or(d.api_tls_key),
            api_tls_ca: layer.api_tls_ca.unwrap_or(d.api_tls_ca),
            api_tls_client_ca: layer.api_tls_client_ca.unwrap_or(d.api_tls_client_ca),
            admin_token_file: layer.admin_token_file.unwrap_or(d.admin_token_file),
            model_cache: layer.model_cache.unwrap_or(d.model_cache),
            cluster: layer.cluster.unwrap_or(d.cluster),
            raft_profile: layer.raft_profile.unwrap_or(d.raft_profile),
            down_after: layer.down_after.unwrap_or(d.down_after),
            voter_replace_after: layer.voter_replace_after.unwrap_or(d.voter_replace_after),
            rebalance_every: layer.rebalance_every.unwrap_or(d.rebalance_every),
            allow_anonymous: layer.allow_anonymous.unwrap_or(d.allow_anonymous),
            fault_injection: layer.fault_injection.unwrap_or(d.fault_injection),
            max_batch: layer.max_batch.unwrap_or(d.max_batch),
            quant_embd: layer.quant_embd.unwrap_or(d.quant_embd),
            weight_layout: layer.weight_layout.unwrap_or(d.weight_layout),
            threads: layer.threads.unwrap_or(d.threads),
            kernel: layer.kernel.unwrap_or(d.kernel),
            pin_threads: layer.pin_threads.unwrap_or(d.pin_threads),
            amx: layer.amx.unwrap_or(d.amx),
            request_timeout: layer.request_timeout.unwrap_or(d.request_timeout),
            first_token_timeout: layer.first_token_timeout.unwrap_or(d.first_token_timeout),
            snapshot_every: layer.snapshot_every.unwrap_or(d.snapshot_every),
            max_prompt_tokens: layer.max_prompt_tokens.unwrap_or(d.max_prompt_tokens),
            max_tokens: layer.max_tokens.unwrap_or(d.max_tokens),
            max_queue: layer.max_queue.unwrap_or(d.max_queue),
            max_body_bytes: layer.max_body_bytes.unwrap_or(d.max_body_bytes),
            max_message_bytes: layer.max_message_bytes.unwrap_or(d.max_message_bytes),
            max_streams: layer.max_streams.unwrap_or(d.max_streams),
            max_connections_per_peer: layer
                .max_connections_per_peer
                .unwrap_or(d.max_connections_per_peer),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks every rule; the first broken one is reported.
    /// The kernel `kernel` names, unless it is `auto` (or one this CPU
    /// does not run, which [`Config::validate`] refuses).
    pub fn fixed_kernel(&self) -> Option<trine_engine::kernels::Kernel> {
        trine_engine::kernels::Kernel::available()
            .into_iter()
            .find(|k| k.name() == self.kernel)
    }

    pub fn validate(&self) -> Result<(), Error> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid(
                "data_dir",
                "",
                "it is empty; set a directory this node may own, e.g. --data-dir /var/lib/trine",
            ));
        }
        check_label("name", &self.name, false)?;
        check_label("region", &self.region, false)?;
        check_label("zone", &self.zone, true)?;
        if self.grpc_addr.port() != 0 && self.grpc_addr == self.http_addr {
            return Err(invalid(
                "http_addr",
                &self.http_addr.to_string(),
                "grpc_addr uses the same address; give each listener its own port (--grpc-addr, --http-addr)",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return Err(invalid(
                "log_level",
                &self.log_level,
                &format!(
                    "{e}; use a level (error, warn, info, debug, trace) or RUST_LOG directives like \"info,trine_node=debug\""
                ),
            ));
        }
        if self.shutdown_timeout.is_zero() || self.shutdown_timeout > MAX_SHUTDOWN_TIMEOUT {
            return Err(invalid(
                "shutdown_timeout",
                &humantime::format_duration(self.shutdown_timeout).to_string(),
                "it must be more than 0 and at most 10m, e.g. \"30s\"",
            ));
        }
        self.validate_mesh()?;
        self.validate_api_tls()?;
        self.validate_raft()
    }

    fn validate_api_tls(&self) -> Result<(), Error> {
        let (cert, key) = (&self.api_tls_cert, &self.api_tls_key);
        if cert.as_os_str().is_empty() != key.as_os_str().is_empty() {
            let (set, unset) = if key.as_os_str().is_empty() {
                ("api_tls_cert", "api_tls_key")
            } else {
                ("api_tls_key", "api_tls_cert")
            };
            return Err(invalid(
                unset,
                "",
                &format!(
                    "{set} is set; give the certificate and its key together (--api-tls-cert, --api-tls-key)"
                ),
            ));
        }
        if !self.api_tls && !self.api_tls_client_ca.as_os_str().is_empty() {
            return Err(invalid(
                "api_tls",
                "false",
                "api_tls_client_ca is set but client certificates need TLS on the client ports; add --api-tls",
            ));
        }
        if !self.api_tls && !cert.as_os_str().is_empty() {
            return Err(invalid(
                "api_tls",
                "false",
                "api_tls_cert is set but the client ports would stay plain; add --api-tls (or drop --api-tls-cert and --api-tls-key)",
            ));
        }
        Ok(())
    }

    fn validate_raft(&self) -> Result<(), Error> {
        let listeners = [("grpc_addr", self.grpc_addr), ("http_addr", self.http_addr)];
        for (key, addr) in listeners {
            if self.raft_addr.port() != 0 && addr == self.raft_addr {
                return Err(invalid(
                    "raft_addr",
                    &self.raft_addr.to_string(),
                    &format!(
                        "{key} uses the same address; give the Raft port its own (--raft-addr)"
                    ),
                ));
            }
        }
        let host_port = |key: &'static str, v: &str| -> Result<(), Error> {
            match v.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) =>
                {
                    Ok(())
                }
                _ => Err(invalid(
                    key,
                    v,
                    "use host:port, e.g. 10.0.0.5:7403 or trine-0.trine:7403",
                )),
            }
        };
        for (key, value) in [
            ("raft_announce", &self.raft_announce),
            ("grpc_announce", &self.grpc_announce),
            ("http_announce", &self.http_announce),
        ] {
            if !value.is_empty() {
                host_port(key, value)?;
            }
        }
        for j in &self.join {
            host_port("join", j)?;
        }
        if self.init && !self.join.is_empty() {
            return Err(invalid(
                "init",
                "true",
                "--init starts a new cluster and --join joins an existing one; give only one",
            ));
        }
        check_label("cluster", &self.cluster, false)?;
        if self.down_after < Duration::from_millis(500)
            || self.down_after > Duration::from_secs(600)
        {
            return Err(invalid(
                "down_after",
                &humantime::format_duration(self.down_after).to_string(),
                "it must be between 500ms and 10m, e.g. \"3s\"",
            ));
        }
        if self.voter_replace_after < self.down_after {
            return Err(invalid(
                "voter_replace_after",
                &humantime::format_duration(self.voter_replace_after).to_string(),
                "it must be at least down_after",
            ));
        }
        if self.rebalance_every < Duration::from_secs(1) {
            return Err(invalid(
                "rebalance_every",
                &humantime::format_duration(self.rebalance_every).to_string(),
                "it must be at least 1s, e.g. \"30s\"",
            ));
        }
        if self.kernel != "auto" && self.fixed_kernel().is_none() {
            let names: Vec<&str> = trine_engine::kernels::Kernel::available()
                .iter()
                .map(|k| k.name())
                .collect();
            return Err(invalid(
                "kernel",
                &self.kernel,
                &format!(
                    "give auto (measure at load) or a kernel this CPU runs: {}",
                    names.join(", ")
                ),
            ));
        }
        if self.threads > 1024 {
            return Err(invalid(
                "threads",
                &self.threads.to_string(),
                "it must be at most 1024 (0: one per physical core)",
            ));
        }
        if !(1..=256).contains(&self.max_batch) {
            return Err(invalid(
                "max_batch",
                &self.max_batch.to_string(),
                "it must be between 1 (no batching) and 256",
            ));
        }
        if self.request_timeout < Duration::from_secs(1) {
            return Err(invalid(
                "request_timeout",
                &humantime::format_duration(self.request_timeout).to_string(),
                "it must be at least 1s, e.g. \"300s\"",
            ));
        }
        if self.first_token_timeout < Duration::from_secs(1) {
            return Err(invalid(
                "first_token_timeout",
                &humantime::format_duration(self.first_token_timeout).to_string(),
                "it must be at least 1s, e.g. \"60s\"",
            ));
        }
        for (key, value, lo, hi) in [
            (
                "max_prompt_tokens",
                u64::from(self.max_prompt_tokens),
                1,
                1_048_576,
            ),
            ("max_tokens", u64::from(self.max_tokens), 1, 1_048_576),
            ("max_queue", u64::from(self.max_queue), 1, 65_536),
            ("max_body_bytes", self.max_body_bytes, 1024, 64 << 20),
            (
                "max_message_bytes",
                self.max_message_bytes,
                64 << 10,
                256 << 20,
            ),
            ("max_streams", u64::from(self.max_streams), 1, 65_536),
            (
                "max_connections_per_peer",
                u64::from(self.max_connections_per_peer),
                1,
                16,
            ),
        ] {
            if !(lo..=hi).contains(&value) {
                return Err(invalid(
                    key,
                    &value.to_string(),
                    &format!("it must be between {lo} and {hi}"),
                ));
            }
        }
        if !(100..=10_000_000).contains(&self.snapshot_every) {
            return Err(invalid(
                "snapshot_every",
                &self.snapshot_every.to_string(),
                "it must be between 100 and 10000000 entries",
            ));
        }
        Ok(())
    }

    /// The client ports' certificate and key: `api_tls_cert` and
    /// `api_tls_key`, or the node's own in the TLS dir.
    pub fn api_tls_files(&self) -> (PathBuf, PathBuf) {
        if self.api_tls_cert.as_os_str().is_empty() {
            let dir = self.tls_dir();
            (
                dir.join(trine_control::tls::NODE_CERT),
                dir.join(trine_control::tls::NODE_KEY),
            )
        } else {
            (self.api_tls_cert.clone(), self.api_tls_key.clone())
        }
    }

    /// The CA bundle that verifies other nodes' client ports:
    /// `api_tls_ca`, or the TLS dir's ca.crt.
    pub fn api_tls_ca(&self) -> PathBuf {
        if self.api_tls_ca.as_os_str().is_empty() {
            self.tls_dir().join(trine_control::tls::CA_CERT)
        } else {
            self.api_tls_ca.clone()
        }
    }

    /// The TLS directory: `tls_dir`, or `<data_dir>/tls`.
    pub fn tls_dir(&self) -> PathBuf {
        if self.tls_dir.as_os_str().is_empty() {
            self.data_dir.join("tls")
        } else {
            self.tls_dir.clone()
        }
    }

    fn validate_mesh(&self) -> Result<(), Error> {
        use libp2p::multiaddr::Protocol;
        if self.p2p_listen.is_empty() {
            return Err(invalid(
                "p2p_listen",
                "[]",
                "a node needs at least one p2p address, e.g. /ip4/127.0.0.1/tcp/7402",
            ));
        }
        for a in &self.p2p_listen {
            let mut it = a.iter();
            let ip = matches!(it.next(), Some(Protocol::Ip4(_) | Protocol::Ip6(_)));
            let ok = ip && transport_tail(&mut it, false).is_ok_and(|rest| rest.is_none());
            if !ok {
                return Err(invalid(
                    "p2p_listen",
                    &a.to_string(),
                    &format!(
                        "listen on /ip4/<ip>/tcp/<port> or /ip6/<ip>/tcp/<port> (port 0 picks a free one){}",
                        quic_hint(a)
                    ),
                ));
            }
        }
        for (key, list) in [
            ("p2p_announce", &self.p2p_announce),
            ("bootstrap", &self.bootstrap),
        ] {
            for a in list {
                let mut it = a.iter();
                let host = matches!(
                    it.next(),
                    Some(
                        Protocol::Ip4(_)
                            | Protocol::Ip6(_)
                            | Protocol::Dns(_)
                            | Protocol::Dns4(_)
                            | Protocol::Dns6(_)
                    )
                );
                let rest = match transport_tail(&mut it, true) {
                    Ok(None) => true,
                    Ok(Some(Protocol::P2p(_))) => key == "bootstrap" && it.next().is_none(),
                    _ => false,
                };
                if !(host && rest) {
                    return Err(invalid(
                        key,
                        &a.to_string(),
                        &format!(
                            "use /ip4/<ip>/tcp/<port>, /ip6/…, or /dns4/<name>/tcp/<port> (bootstrap may end in /p2p/<peer id>){}",
                            quic_hint(a)
                        ),
                    ));
                }
            }
        }
        if !["off", "realistic"].contains(&self.simulated_latency.as_str()) {
            crate::mesh::Matrix::from_file(Path::new(&self.simulated_latency)).map_err(|e| {
                invalid(
                    "simulated_latency",
                    &self.simulated_latency,
                    &format!("{e}; or use \"off\" or \"realistic\""),
                )
            })?;
        }
        for (key, d, min, max) in [
            (
                "heartbeat_interval",
                self.heartbeat_interval,
                Duration::from_millis(100),
                Duration::from_secs(60),
            ),
            (
                "ping_interval",
                self.ping_interval,
                Duration::from_millis(100),
                Duration::from_secs(300),
            ),
            (
                "peer_ttl",
                self.peer_ttl,
                Duration::from_secs(1),
                Duration::from_secs(3600),
            ),
        ] {
            if d < min || d > max {
                return Err(invalid(
                    key,
                    &humantime::format_duration(d).to_string(),
                    &format!(
                        "it must be between {} and {}",
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                ));
            }
        }
        if self.peer_ttl < self.heartbeat_interval * 2 {
            return Err(invalid(
                "peer_ttl",
                &humantime::format_duration(self.peer_ttl).to_string(),
                "it must be at least twice heartbeat_interval, or live peers would be forgotten between heartbeats",
            ));
        }
        if !(2..=65_536).contains(&self.max_connections) {
            return Err(invalid(
                "max_connections",
                &self.max_connections.to_string(),
                "it must be between 2 and 65536",
            ));
        }
        Ok(())
    }

    /// The simulated latency matrix, if the simulation is on.
    pub fn latency_matrix(
        &self,
    ) -> Result<Option<crate::mesh::Matrix>, crate::mesh::latency::MatrixError> {
        match self.simulated_latency.as_str() {
            "off" => Ok(None),
            "realistic" => Ok(Some(crate::mesh::Matrix::realistic())),
            path => crate::mesh::Matrix::from_file(Path::new(path)).map(Some),
        }
    }

    /// The configuration as a TOML file that `--config` accepts back.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
        format!(
            "# Effective configuration of `trine node` (defaults < --config file < TRINE_* env < flags).\n{body}"
        )
    }
}

/// Reads the transport part of a multiaddr after its host: `/tcp/<port>`,
/// or `/udp/<port>/quic-v1` in builds with QUIC. Returns what follows.
fn transport_tail<'a>(
    it: &mut libp2p::multiaddr::Iter<'a>,
    nonzero_port: bool,
) -> Result<Option<libp2p::multiaddr::Protocol<'a>>, ()> {
    use libp2p::multiaddr::Protocol;
    let port_ok = |p: u16| !nonzero_port || p != 0;
    match it.next() {
        Some(Protocol::Tcp(p)) if port_ok(p) => Ok(it.next()),
        Some(Protocol::Udp(p)) if crate::mesh::transport::QUIC && port_ok(p) => match it.next() {
            Some(Protocol::QuicV1) => Ok(it.next()),
            _ => Err(()),
        },
        _ => Err(()),
    }
}

/// What to add to an address error when the address is a QUIC one.
fn quic_hint(a: &Multiaddr) -> &'static str {
    let quic = a
        .iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::QuicV1));
    match (quic, crate::mesh::transport::QUIC) {
        (true, false) => {
            "; this build has no QUIC: rebuild with `cargo build --release --features quic`"
        }
        (_, true) => "; or /ip4/<ip>/udp/<port>/quic-v1 for QUIC",
        (false, false) => "",
    }
}

fn invalid(key: &'static str, value: &str, rule: &str) -> Error {
    Error::Invalid {
        key,
        value: value.to_owned(),
        rule: rule.to_owned(),
    }
}

/// Names, regions and zones appear in metric labels, DNS names and file
/// names: lowercase DNS labels only.
fn check_label(key: &'static str, value: &str, may_be_empty: bool) -> Result<(), Error> {
    if value.is_empty() && may_be_empty {
        return Ok(());
    }
    let ok = (1..=63).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            value,
            "use 1-63 lowercase letters, digits and '-', not starting or ending with '-' (e.g. \"us-east\")",
        ))
    }
}

/// The host name made into a valid node name, or "node".
fn default_name() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let mut name: String = host
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    name = name.trim_matches('-').to_owned();
    if name.is_empty() { "node".into() } else { name }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Layer, Error> {
        Layer::from_toml(text, Path::new("t.toml"))
    }

    #[test]
    fn defaults_are_valid_and_loopback_only() {
        let c = Config::resolve(Layer::default()).unwrap();
        assert!(c.grpc_addr.ip().is_loopback());
        assert!(c.http_addr.ip().is_loopback());
    }

    #[test]
    fn quic_addresses_need_a_quic_build() {
        let quic: Multiaddr = "/ip4/127.0.0.1/udp/7402/quic-v1".parse().unwrap();
        let listen = Config {
            p2p_listen: vec![quic.clone()],
            ..Config::default()
        };
        let boot = Config {
            bootstrap: vec![quic],
            ..Config::default()
        };
        for c in [listen, boot] {
            let r = c.validate();
            if crate::mesh::transport::QUIC {
                r.unwrap();
            } else {
                let e = r.unwrap_err().to_string();
                assert!(e.contains("--features quic"), "{e}");
            }
        }
        // A UDP address without quic-v1 is never a transport.
        let udp = Config {
            p2p_listen: vec!["/ip4/127.0.0.1/udp/7402".parse().unwrap()],
            ..Config::default()
        };
        assert!(udp.validate().is_err());
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let err = parse("region = \"eu\"\n\nregoin = \"x\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Parse { line: 3, .. }), "{msg}");
        assert!(msg.contains("regoin"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn wrong_type_names_line() {
        let err = parse("grpc_addr = 7400\n").unwrap_err();
        assert!(matches!(err, Error::Parse { line: 1, .. }), "{err}");
        let err = parse("shutdown_timeout = \"soon\"\n").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn later_layers_win() {
        let file = parse("region = \"a\"\nzone = \"z\"\n").unwrap();
        let flags = Layer {
            region: Some("b".into()),
            ..Layer::default()
        };
        let c = Config::resolve(file.overlay(flags)).unwrap();
        assert_eq!(c.region, "b");
        assert_eq!(c.zone, "z");
    }

    #[test]
    fn print_config_round_trips() {
        let c = Config {
            shutdown_timeout: Duration::from_millis(2500),
            log_format: LogFormat::Json,
            ..Config::default()
        };
        let back = Config::resolve(parse(&c.to_toml()).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn each_rule_is_enforced() {
        let cases: Vec<(Layer, &str)> = vec![
            (
                Layer {
                    region: Some("US East".into()),
                    ..Layer::default()
                },
                "region",
            ),
            (
                Layer {
                    name: Some("-x".into()),
                    ..Layer::default()
                },
                "name",
            ),
            (
                Layer {
                    data_dir: Some(PathBuf::new()),
                    ..Layer::default()
                },
                "data_dir",
            ),
            (
                Layer {
                    threads: Some(5000),
                    ..Layer::default()
                },
                "threads",
            ),
            (
                Layer {
                    kernel: Some("avx1024".into()),
                    ..Layer::default()
                },
                "kernel",
            ),
            (
                Layer {
                    grpc_addr: Some("127.0.0.1:9000".parse().unwrap()),
                    http_addr: Some("127.0.0.1:9000".parse().unwrap()),
                    ..Layer::default()
                },
                "http_addr",
            ),
            (
                Layer {
                    log_level: Some("info,=[".into()),
                    ..Layer::default()
                },
                "log_level",
            ),
            (
                Layer {
                    shutdown_timeout: Some(Duration::ZERO),
                    ..Layer::default()
                },
                "shutdown_timeout",
            ),
            (
                Layer {
                    shutdown_timeout: Some(Duration::from_secs(3600)),
                    ..Layer::default()
                },
                "shutdown_timeout",
            ),
            (
                Layer {
                    first_token_timeout: Some(Duration::from_millis(500)),
                    ..Layer::default()
                },
                "first_token_timeout",
            ),
        ];
        for (layer, key) in cases {
            match Config::resolve(layer) {
                Err(Error::Invalid { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: expected Invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn port_zero_on_both_listeners_is_allowed() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let layer = Layer {
            grpc_addr: Some(any),
            http_addr: Some(any),
            ..Layer::default()
        };
        assert!(Config::resolve(layer).is_ok());
    }

    #[test]
    fn default_name_is_a_valid_label() {
        check_label("name", &default_name(), false).unwrap();
    }
}
