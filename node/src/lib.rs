//! trine-node: a Trine node and the `trine` command line.
//!
//! - [`cli`]: clap definitions of `trine` and its subcommands.
//! - [`config`]: layered configuration (file < env < flags) and validation.
//! - [`datadir`]: the data directory: creation, marker, exclusive lock.
//! - [`node`]: a node's life: bind, serve, drain, stop.
//! - [`eval_cmd`]: `trine model eval`, `trine perplexity`.
//! - [`generate_cmd`]: `trine generate`.
//! - [`grpc`]: health, reflection and the `trine.v1` services.
//! - [`hub`]: `trine model pull` from a Hugging Face-compatible hub.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`model_cmd`]: `trine model inspect|synth`.
//! - [`metrics`]: every metric name of this crate, and the exporter.
//! - [`logging`]: tracing to stderr, text or JSON.
//! - [`mesh`]: the libp2p mesh: identity, discovery, gossip, stage protocol.
//! - [`peers_cmd`]: `trine peers`.
//! - [`shutdown`]: SIGINT/SIGTERM handling.
//! - [`simd`]: run-time SIMD level detection.
//! - [`build`]: version, git commit.
//! - [`bench_cmd`]: `trine bench mesh|raft|failover|placement|serve|engine`.
//! - [`bench_engine`]: `trine bench engine`, the engine against the bandwidth limit.

pub mod admin;
pub mod api_tls;
pub mod auth;
pub mod batcher;
pub mod bench_cmd;
pub mod bench_engine;
pub mod bench_placement;
pub mod bench_serve;
pub mod build;
pub mod cli;
pub mod cluster;
pub mod cluster_cmd;
pub mod complete_cmd;
pub mod compute;
pub mod config;
pub mod console;
pub mod datadir;
pub mod deploy_cmd;
pub mod eval_cmd;
pub mod events;
pub mod executor;
pub mod fuzz;
pub mod generate_cmd;
pub mod grpc;
pub mod http;
pub mod hub;
pub mod logging;
pub mod mesh;
pub mod metrics;
pub mod model_cmd;
pub mod model_store;
pub mod node;
pub mod openai;
pub mod peers_cmd;
pub mod receipts;
pub mod serve;
pub mod shutdown;
pub mod simd;
pub mod stage_server;
pub mod testnet_cmd;
pub mod token_cmd;
