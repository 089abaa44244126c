//! The `trine` command line (clap derive). Only subcommands that work are
//! listed; later parts of the product add theirs here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use libp2p::Multiaddr;

use crate::config::{self, Config, Layer, LogFormat};

/// Trine serves ternary (BitNet b1.58) language models from a cluster of peer
/// nodes spread over regions.
#[derive(Debug, Parser)]
#[command(name = "trine", propagate_version = true, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node: gRPC (health, reflection, trine.v1) and HTTP (/metrics,
    /// /healthz, /readyz) until SIGINT/SIGTERM, then drain and stop.
    #[command(
        long_about = "Run a node: gRPC (health, reflection, trine.v1) and HTTP (/metrics, /healthz, \
/readyz) until SIGINT/SIGTERM, then drain and stop.\n\n\
Every setting can come from a TOML file (--config), a TRINE_* environment variable, or a flag; \
flags win over the environment, which wins over the file. `--print-config` shows the result.\n\n\
Exit status: 0 after a clean stop, 78 for an invalid configuration, 1 for any other failure \
(port in use, data dir locked or unwritable), 130 after a second signal during the drain.",
        after_help = "Example: trine node --data-dir /var/lib/trine --region us-east --grpc-addr 0.0.0.0:7400"
    )]
    Node(Box<NodeArgs>),
    /// Generate text from a prompt with a local model file, streamed to
    /// stdout; speeds are reported on stderr.
    Generate(crate::generate_cmd::GenerateArgs),
    /// Perplexity of a model over a text file, computed as llama.cpp's
    /// perplexity tool does (chunks of --ctx tokens, second halves scored).
    Perplexity(crate::eval_cmd::PerplexityArgs),
    /// List the libp2p peers a running node knows: region, RTT, last seen,
    /// addresses (asks the node's Admin gRPC service).
    Peers(crate::peers_cmd::PeersArgs),
    /// Start a local multi-region cluster of real nodes on loopback (7 nodes
    /// in 4 regions by default), wait until it is healthy, show it, and stop
    /// it on Ctrl-C.
    Testnet(crate::testnet_cmd::TestnetArgs),
    /// The cluster at a glance: every node with its region, Raft role,
    /// status, chain height, mesh peers and RTT to the leader.
    Status(crate::cluster_cmd::StatusArgs),
    /// The cluster's nodes as the control plane records them.
    Nodes(crate::cluster_cmd::NodesArgs),
    /// The hash-linked chain of every applied command: head, one block,
    /// full verification.
    #[command(subcommand)]
    Chain(crate::cluster_cmd::ChainCommand),
    /// Deploy a model to the cluster: reads its shape and SHA-256 here,
    /// records the spec on the chain; the leader's planner places every
    /// stage of every replica (see `trine placement`).
    Deploy(crate::deploy_cmd::DeployArgs),
    /// Ask any node of a cluster for a completion of a deployed model (or a
    /// chat turn with --chat), streamed as it is generated; --verbose shows
    /// per-token timings, the nodes that served it and failovers.
    Complete(crate::complete_cmd::CompleteArgs),
    /// Chat with a deployed model through any node: each line on stdin is
    /// a turn, the answer streams back and the conversation is kept;
    /// /reset forgets it, /quit leaves. --verbose shows timings and path.
    Chat(crate::complete_cmd::ChatArgs),
    /// Remove a deployed model and all its placements.
    Undeploy(crate::deploy_cmd::UndeployArgs),
    /// Where each stage of each deployed model runs: model, replica, stage,
    /// layers, node, region, state and fencing generation.
    Placement(crate::cluster_cmd::PlacementArgs),
    /// API tokens for the client API: create (prints the secret once),
    /// list, revoke. The cluster stores only each secret's SHA-256.
    #[command(subcommand)]
    Token(crate::token_cmd::TokenCommand),
    /// Create the cluster CA and node certificates (mutual TLS on the Raft port).
    #[command(subcommand)]
    Certs(crate::cluster_cmd::CertsCommand),
    /// System benchmarks: mesh convergence at scale, Raft throughput and
    /// commit latency, leader failover.
    #[command(subcommand)]
    Bench(crate::bench_cmd::BenchCommand),
    /// Look inside model files, score token sequences, make synthetic models.
    #[command(subcommand)]
    Model(crate::model_cmd::ModelCommand),
    /// Chaos runs: start a testnet, break it on a seeded schedule (kill -9,
    /// whole regions, SIGSTOP, partitions, latency, clock skew, CPU and
    /// memory starvation, a full disk, a stale data dir) under a workload,
    /// and check that no acknowledged write is lost, chains agree, requests
    /// complete or fail retryably, and the cluster recovers in time. Writes
    /// a report (JSON, Markdown, SVG).
    Chaos(trine_chaos::ChaosArgs),
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct NodeArgs {
    #[command(subcommand)]
    pub action: Option<NodeAction>,

    /// TOML config file whose keys are the long flag names with '_' for '-'
    /// (data_dir, grpc_addr, ...). Unknown keys are refused.
    #[arg(long, short = 'c', env = "TRINE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the effective configuration as TOML (a valid --config file) and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Directory for this node's state; created 0700 if absent, locked while
    /// the node runs. [default: trine-data]
    #[arg(long, env = "TRINE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Node name in logs, metrics and cluster views (lowercase letters,
    /// digits, '-'). [default: the host name]
    #[arg(long, env = "TRINE_NAME")]
    pub name: Option<String>,

    /// Region this node runs in, e.g. us-east. [default: local]
    #[arg(long, env = "TRINE_REGION")]
    pub region: Option<String>,

    /// Zone inside the region, e.g. a. [default: empty]
    #[arg(long, env = "TRINE_ZONE")]
    pub zone: Option<String>,

    /// gRPC listen address; port 0 picks a free port (see endpoints.json in
    /// the data dir). [default: 127.0.0.1:7400]
    #[arg(long, env = "TRINE_GRPC_ADDR", value_name = "IP:PORT")]
    pub grpc_addr: Option<SocketAddr>,

    /// HTTP listen address for /metrics, /healthz, /readyz. [default: 127.0.0.1:7401]
    #[arg(long, env = "TRINE_HTTP_ADDR", value_name = "IP:PORT")]
    pub http_addr: Option<SocketAddr>,

    /// Log line format. [default: text]
    #[arg(long, env = "TRINE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// Log filter: a level (error, warn, info, debug, trace) or RUST_LOG-style
    /// directives such as "info,trine_node=debug". [default: info]
    #[arg(long, env = "TRINE_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,

    /// How long in-flight requests may finish after SIGINT/SIGTERM before
    /// they are cut, e.g. 30s (at most 10m). [default: 10s]
    #[arg(long, env = "TRINE_SHUTDOWN_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Option<Duration>,

    /// libp2p listen addresses, comma-separated; port 0 picks a free port
    /// (see endpoints.json). Builds with the `quic` feature also take
    /// /ip4/<ip>/udp/<port>/quic-v1. [default: /ip4/127.0.0.1/tcp/7402]
    #[arg(
        long,
        env = "TRINE_P2P_LISTEN",
        value_name = "MULTIADDR",
        value_delimiter = ','
    )]
    pub p2p_listen: Option<Vec<Multiaddr>>,

    /// Addresses other nodes should dial, when they differ from the listen
    /// addresses (NAT, containers, Kubernetes), e.g. /dns4/trine-0.trine/tcp/7402.
    /// [default: the listen addresses]
    #[arg(
        long,
        env = "TRINE_P2P_ANNOUNCE",
        value_name = "MULTIADDR",
        value_delimiter = ','
    )]
    pub p2p_announce: Option<Vec<Multiaddr>>,

    /// Nodes to join through, comma-separated: /ip4/<ip>/tcp/<port> or
    /// /dns4/<name>/tcp/<port>, optionally ending in /p2p/<peer id>.
    /// Bootstrap peers are admitted to gossip and the stage protocol.
    #[arg(
        long,
        env = "TRINE_BOOTSTRAP",
        value_name = "MULTIADDR",
        value_delimiter = ','
    )]
    pub bootstrap: Option<Vec<Multiaddr>>,

    /// Admit every peer to health gossip and the stage protocol. Without
    /// it only bootstrap peers (and, later, cluster members) are admitted;
    /// anyone may still identify, ping and use the DHT.
    #[arg(long, env = "TRINE_OPEN_MESH")]
    pub open_mesh: bool,

    /// Simulated inter-region latency: "off", "realistic" (us-east, us-west,
    /// eu-central, ap-southeast from public-cloud medians) or a TOML file
    /// with `jitter = "2ms"`, `intra_region = "1ms"` and a `[rtt]` table of
    /// `"region-a/region-b" = "65ms"`. Every node of a mesh must agree.
    /// [default: off]
    #[arg(
        long,
        env = "TRINE_SIMULATED_LATENCY",
        value_name = "off|realistic|FILE"
    )]
    pub simulated_latency: Option<String>,

    /// How often this node gossips its health heartbeat. [default: 2s]
    #[arg(long, env = "TRINE_HEARTBEAT_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Option<Duration>,

    /// How often each peer connection is pinged for RTT. [default: 5s]
    #[arg(long, env = "TRINE_PING_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub ping_interval: Option<Duration>,

    /// Forget a disconnected peer that has been silent this long. [default: 15s]
    #[arg(long, env = "TRINE_PEER_TTL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub peer_ttl: Option<Duration>,

    /// Most established mesh connections in total (2 per peer). [default: 256]
    #[arg(long, env = "TRINE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<u32>,

    /// Mutual-TLS Raft listen address, for other members only.
    /// [default: 127.0.0.1:7403]
    #[arg(long, env = "TRINE_RAFT_ADDR", value_name = "IP:PORT")]
    pub raft_addr: Option<SocketAddr>,

    /// host:port other members dial for Raft, when it differs from
    /// --raft-addr (containers, Kubernetes). Peers check the certificate's
    /// chain to the cluster CA and its cluster-wide name node.trine, not this
    /// host. [default: the listen address]
    #[arg(long, env = "TRINE_RAFT_ANNOUNCE", value_name = "HOST:PORT")]
    pub raft_announce: Option<String>,

    /// host:port other nodes and `trine status` dial for this node's gRPC
    /// API (forwarded requests, cluster views), when it differs from
    /// --grpc-addr: a wildcard listen address (0.0.0.0) in containers or
    /// Kubernetes. [default: the bound gRPC address]
    #[arg(long, env = "TRINE_GRPC_ANNOUNCE", value_name = "HOST:PORT")]
    pub grpc_announce: Option<String>,

    /// host:port others reach this node's HTTP port at (shown in cluster
    /// views), when it differs from --http-addr. [default: the bound HTTP
    /// address]
    #[arg(long, env = "TRINE_HTTP_ANNOUNCE", value_name = "HOST:PORT")]
    pub http_announce: Option<String>,

    /// Start a new cluster with this node as its first voter (first start
    /// only; later starts read the data dir). Without certificates in the
    /// TLS dir it creates a cluster CA in <data-dir>/ca and a node
    /// certificate from it.
    #[arg(long, env = "TRINE_INIT")]
    pub init: bool,

    /// Join an existing cluster through any member's Raft address
    /// (host:port, comma-separated); the request is forwarded to the leader.
    /// Needs a certificate from the cluster CA in the TLS dir.
    #[arg(
        long,
        env = "TRINE_JOIN",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    pub join: Option<Vec<String>>,

    /// Directory with ca.crt, node.crt and node.key (from `trine certs
    /// issue`). [default: <data-dir>/tls]
    #[arg(long, env = "TRINE_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,

    /// Serve the client ports (gRPC and HTTP, the OpenAI API and /metrics
    /// included) over TLS only. The certificate is the node's own from the
    /// TLS dir (clients trust the cluster's ca.crt) unless --api-tls-cert
    /// names another; in a cluster it must name the node (a DNS name equal
    /// to --name), as other nodes forwarding requests check it. Files are
    /// re-read every 2 s: renewing them needs no restart.
    #[arg(long, env = "TRINE_API_TLS")]
    pub api_tls: bool,

    /// Certificate chain (PEM) for the client ports, e.g. from your own CA.
    /// [default: <tls-dir>/node.crt]
    #[arg(
        long,
        env = "TRINE_API_TLS_CERT",
        value_name = "FILE",
        requires = "api_tls_key"
    )]
    pub api_tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --api-tls-cert; refused unless only its
    /// owner can read it (0600). [default: <tls-dir>/node.key]
    #[arg(
        long,
        env = "TRINE_API_TLS_KEY",
        value_name = "FILE",
        requires = "api_tls_cert"
    )]
    pub api_tls_key: Option<PathBuf>,

    /// CA bundle (PEM) that verifies other nodes' client ports when this
    /// node forwards a request to one serving TLS. Needed whether or not
    /// this node serves TLS itself. [default: <tls-dir>/ca.crt]
    #[arg(long, env = "TRINE_API_TLS_CA", value_name = "FILE")]
    pub api_tls_ca: Option<PathBuf>,

    /// With --api-tls: require a client certificate signed by a CA in this
    /// bundle (PEM) on the client ports: mutual TLS, as etcd's
    /// --client-cert-auth, on top of tokens. Other nodes forward requests
    /// with their node certificates, so the bundle must hold the cluster's
    /// CA (give <tls-dir>/ca.crt, or a bundle with it). Re-read every 2 s.
    #[arg(long, env = "TRINE_API_TLS_CLIENT_CA", value_name = "FILE")]
    pub api_tls_client_ca: Option<PathBuf>,

    /// With --init on a new cluster: a file (0600) holding the secret of
    /// the cluster's first admin token (named root). Without it the secret
    /// comes from TRINE_ADMIN_TOKEN, else a new random one. Either way it is
    /// kept in <data-dir>/admin.token (0600), where `trine status --data-dir`
    /// and the other admin commands find it. Ignored once the cluster
    /// exists: revoking root sticks across restarts.
    #[arg(long, env = "TRINE_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Hugging Face cache to look in for deployed models (by sha256, where
    /// `trine model pull` puts them). [default: $HF_HUB_CACHE, else
    /// $HF_HOME/hub, else ~/.cache/huggingface/hub]
    #[arg(long, env = "TRINE_MODEL_CACHE", value_name = "DIR")]
    pub model_cache: Option<PathBuf>,

    /// Cluster name. [default: trine]
    #[arg(long, env = "TRINE_CLUSTER")]
    pub cluster: Option<String>,

    /// Raft timeouts: lan (heartbeat 100 ms, election 0.3-0.6 s) or wan
    /// (heartbeat 500 ms, election 1.5-3 s, for regions up to ~300 ms apart).
    /// [default: lan]
    #[arg(long, env = "TRINE_RAFT_PROFILE", value_enum)]
    pub raft_profile: Option<config::RaftProfile>,

    /// A member that has not answered the leader for this long is marked
    /// down; a down member must answer for twice this long before it is
    /// marked up again (a flapping node stays down). [default: 3s]
    #[arg(long, env = "TRINE_DOWN_AFTER", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub down_after: Option<Duration>,

    /// A voter down this long gives its seat to a healthy learner.
    /// [default: 30s]
    #[arg(long, env = "TRINE_VOTER_REPLACE_AFTER", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub voter_replace_after: Option<Duration>,

    /// Least time between two rebalancing moves. When nodes or regions come
    /// back, the leader moves one replica at a time (all its stages) to a
    /// better spot, only while every stage is ready and only when the move
    /// spreads replicas over more regions or keeps a pipeline in one region;
    /// never to even out memory alone. [default: 30s]
    #[arg(long, env = "TRINE_REBALANCE_EVERY", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub rebalance_every: Option<Duration>,

    /// Serve inference requests (gRPC Inference, the OpenAI-compatible
    /// HTTP API) without an API token. Off by default: requests need
    /// `Authorization: Bearer <token>` from `trine token create`. The local
    /// testnet turns it on (it listens on loopback only).
    #[arg(long, env = "TRINE_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,

    /// Accept the Admin API's InjectFault (admin token still needed): cut
    /// this node off from members, add delay towards regions, skew its
    /// clock. For chaos runs (`trine chaos`) and tests; never in production.
    #[arg(long, env = "TRINE_FAULT_INJECTION")]
    pub fault_injection: bool,

    /// Most sequences sharing one batched forward step of a stage
    /// (continuous batching: concurrent generations read each weight once
    /// per step); also the most generations running at once on this node,
    /// the rest queue. 1 turns batching off. [default: 32]
    #[arg(long, env = "TRINE_MAX_BATCH", value_name = "N")]
    pub max_batch: Option<u32>,

    /// lm_head precision of the last stages this node loads: `file` (as the
    /// model file stores it, F16 in official files), `q8` (quantized to
    /// Q8_0 at load: about half the lm_head's bytes per token, a small logit
    /// error) or `q4` (Q4_0: about a quarter, a larger error); BENCHMARKS.md
    /// measures both. [default: file]
    #[arg(long, env = "TRINE_QUANT_EMBD", value_name = "file|q8|q4")]
    pub quant_embd: Option<trine_engine::model::QuantEmbd>,

    /// How the stages this node loads pack their ternary weights: `i2s` (2
    /// bits a weight, as I2_S files store them, read in place), `base3`
    /// (five trits a byte, 1.6 bits, repacked at load: 20% fewer bytes per
    /// token, more work per weight) or `auto` (per weight shape, whichever
    /// multiplies faster on this machine, measured at each stage load and
    /// logged). The output is the same bits either way. [default: i2s]
    #[arg(long, env = "TRINE_WEIGHT_LAYOUT", value_name = "i2s|base3|auto")]
    pub weight_layout: Option<trine_engine::model::WeightLayout>,

    /// Ternary kernel for the stages this node runs: `auto` (the fastest
    /// per weight shape, measured at each stage load and logged) or one
    /// this CPU runs: scalar, avx2, avx-vnni, avx512, avx512-vnni.
    /// [default: auto]
    #[arg(long, env = "TRINE_KERNEL", value_name = "auto|NAME")]
    pub kernel: Option<String>,

    /// Compute threads for the stages this node runs. [default: one per
    /// physical core this process may use]
    #[arg(long, env = "TRINE_THREADS", value_name = "N")]
    pub threads: Option<u32>,

    /// Bind each compute thread to its own physical core (Linux).
    #[arg(long, env = "TRINE_PIN_THREADS")]
    pub pin_threads: bool,

    /// AMX-INT8 tiles for prompts and batched decode steps, where the CPU
    /// has them (Intel Sapphire Rapids and later): `auto` (use them) or
    /// `off` (the AVX register tiles). The output is the same bits either
    /// way. [default: auto]
    #[arg(long, env = "TRINE_AMX", value_enum, value_name = "auto|off")]
    pub amx: Option<crate::compute::Amx>,

    /// Longest an inference request may take, end to end; a client may ask
    /// for less (gRPC deadline, or `timeout` in the request). Past it the
    /// request ends with DEADLINE_EXCEEDED (HTTP 504). [default: 300s]
    #[arg(long, env = "TRINE_REQUEST_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub request_timeout: Option<Duration>,

    /// Longest the router waits for a replica's first token (queueing and
    /// prompt prefill included) before it calls the replica stalled and
    /// fails over. Raise it where one replica serves many clients one at a
    /// time (`--max-batch 1`) or prompts are long on a slow CPU.
    /// [default: 60s]
    #[arg(long, env = "TRINE_FIRST_TOKEN_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub first_token_timeout: Option<Duration>,

    /// Raft entries between snapshots; the log behind a snapshot is purged.
    /// [default: 10000]
    #[arg(long, env = "TRINE_SNAPSHOT_EVERY", value_name = "N")]
    pub snapshot_every: Option<u64>,

    /// Most prompt tokens one inference request may carry; a longer prompt is
    /// refused with 400 / INVALID_ARGUMENT naming the limit. [default: 8192]
    #[arg(long, env = "TRINE_MAX_PROMPT_TOKENS", value_name = "N")]
    pub max_prompt_tokens: Option<u32>,

    /// Most tokens one request may ask to generate (`max_tokens`, and the
    /// default when it asks none is the smaller of 256 and this); more is
    /// refused with 400 / INVALID_ARGUMENT. [default: 4096]
    #[arg(long, env = "TRINE_MAX_TOKENS", value_name = "N")]
    pub max_tokens: Option<u32>,

    /// Generations that may wait for a slot on this node (beyond --max-batch
    /// running); more are refused at once with 429 / RESOURCE_EXHAUSTED rather
    /// than queued without bound. [default: 64]
    #[arg(long, env = "TRINE_MAX_QUEUE", value_name = "N")]
    pub max_queue: Option<u32>,

    /// Largest HTTP request body, in bytes (the OpenAI-compatible API); a
    /// larger one is refused with 413. [default: 1048576]
    #[arg(long, env = "TRINE_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<u64>,

    /// Largest gRPC message, in bytes, the client gRPC port (Inference, Admin)
    /// decodes; a larger one is refused with OUT_OF_RANGE ("decoded message
    /// length too large"). [default: 4194304]
    #[arg(long, env = "TRINE_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<u64>,

    /// Concurrent gRPC calls one client connection may have open on the client
    /// gRPC port (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); further calls wait
    /// for a free stream. [default: 128]
    #[arg(long, env = "TRINE_MAX_STREAMS", value_name = "N")]
    pub max_streams: Option<u32>,

    /// Most libp2p connections one peer may hold to this node at once; further
    /// ones are refused (a peer needs one, two while it redials). [default: 2]
    #[arg(long, env = "TRINE_MAX_CONNECTIONS_PER_PEER", value_name = "N")]
    pub max_connections_per_peer: Option<u32>,
}

/// What `trine node` does besides running a node.
#[derive(Debug, Subcommand)]
pub enum NodeAction {
    /// Drain a node and remove it from the cluster (a voter hands its seat
    /// to a healthy learner first); then it can be stopped for good.
    Leave {
        #[command(flatten)]
        target: crate::cluster_cmd::Target,
        /// The node to remove, by Raft id (see `trine nodes`); the node
        /// asked (--node / --data-dir) when absent.
        #[arg(long, value_name = "ID")]
        node_id: Option<u64>,
    },
    /// Mark a stopped node's data dir, put back from an old copy, as current:
    /// at its next start it votes at once instead of staying out of
    /// elections until it has caught up. Only to regain a lost quorum from
    /// copies (deploy/runbooks/disaster-recovery.md, "Losing quorum"):
    /// writes that only the lost part of its log held can be lost.
    TrustDataDir {
        /// The stopped node's data dir.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
}

impl NodeArgs {
    /// The flags (and their TRINE_* variables) as a config layer.
    fn layer(&self) -> Layer {
        Layer {
            data_dir: self.data_dir.clone(),
            name: self.name.clone(),
            region: self.region.clone(),
            zone: self.zone.clone(),
            grpc_addr: self.grpc_addr,
            http_addr: self.http_addr,
            log_format: self.log_format,
            log_level: self.log_level.clone(),
            shutdown_timeout: self.shutdown_timeout,
            p2p_listen: self.p2p_listen.clone(),
            p2p_announce: self.p2p_announce.clone(),
            bootstrap: self.bootstrap.clone(),
            open_mesh: self.open_mesh.then_some(true),
            simulated_latency: self.simulated_latency.clone(),
            heartbeat_interval: self.heartbeat_interval,
            ping_interval: self.ping_interval,
            peer_ttl: self.peer_ttl,
            max_connections: self.max_connections,
            raft_addr: self.raft_addr,
            raft_announce: self.raft_announce.clone(),
            grpc_announce: self.grpc_announce.clone(),
            http_announce: self.http_announce.clone(),
            init: self.init.then_some(true),
            join: self.join.clone(),
            tls_dir: self.tls_dir.clone(),
            api_tls: self.api_tls.then_some(true),
            api_tls_cert: self.api_tls_cert.clone(),
            api_tls_key: self.api_tls_key.clone(),
            api_tls_ca: self.api_tls_ca.clone(),
            api_tls_client_ca: self.api_tls_client_ca.clone(),
            admin_token_file: self.admin_token_file.clone(),
            model_cache: self.model_cache.clone(),
            cluster: self.cluster.clone(),
            raft_profile: self.raft_profile,
            down_after: self.down_after,
            voter_replace_after: self.voter_replace_after,
            rebalance_every: self.rebalance_every,
            allow_anonymous: self.allow_anonymous.then_some(true),
            fault_injection: self.fault_injection.then_some(true),
            max_batch: self.max_batch,
            quant_embd: self.quant_embd,
            weight_layout: self.weight_layout,
            threads: self.threads,
            kernel: self.kernel.clone(),
            pin_threads: self.pin_threads.then_some(true),
            amx: self.amx,
            request_timeout: self.request_timeout,
            first_token_timeout: self.first_token_timeout,
            snapshot_every: self.snapshot_every,
            max_prompt_tokens: self.max_prompt_tokens,
            max_tokens: self.max_tokens,
            max_queue: self.max_queue,
            max_body_bytes: self.max_body_bytes,
            max_message_bytes: self.max_message_bytes,
            max_streams: self.max_streams,
            max_connections_per_peer: self.max_connections_per_peer,
        }
    }

    /// Defaults < config file < env < flags, validated.
    pub fn resolve(&self) -> Result<Config, config::Error> {
        let file = match &self.config {
            Some(path) => Layer::from_file(path)?,
            None => Layer::default(),
        };
        Config::resolve(file.overlay(self.layer()))
    }
}

/// Parses the process arguments; `--version` shows the commit and the SIMD
/// level detected on this machine.
pub fn parse() -> Cli {
    let matches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// The full command definition, version included.
pub fn command() -> clap::Command {
    Cli::command().version(crate::build::long_version())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        command().debug_assert();
    }

    /// Every key of the config file has a flag, so `--help` documents them all.
    #[test]
    fn every_config_key_has_a_flag() {
        let cmd = command();
        let node = cmd.find_subcommand("node").expect("node subcommand");
        let toml = Config::default().to_toml();
        let keys: Vec<&str> = toml
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(" = "))
            .map(|l| l.split(" = ").next().unwrap_or_default())
            .collect();
        assert!(keys.len() >= 9, "{keys:?}");
        for key in keys {
            let flag = key.replace('_', "-");
            let arg = node
                .get_arguments()
                .find(|a| a.get_long() == Some(flag.as_str()));
            let arg = arg.unwrap_or_else(|| panic!("config key {key} has no --{flag}"));
            let env = format!("TRINE_{}", key.to_ascii_uppercase());
            assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(env.as_str()));
        }
    }
}
