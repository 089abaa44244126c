//! Trine's control plane: a Raft group (openraft 0.9) whose log and state
//! machine live in sled, whose RPCs travel over mutual-TLS gRPC, and whose
//! every applied entry becomes a block of a hash-linked chain.
//!
//! - `types`: the openraft type configuration, members, requests, responses.
//! - `command`: the commands the state machine applies, and their encoding.
//! - `chain`: blocks, their hashes, and the verifier.
//! - `clock`: the wall clock, with the seam chaos runs skew.
//! - `store`: the sled log store and state machine (snapshots included).
//! - `tls`: the cluster CA, node certificates, rustls configurations.
//! - `convert`: openraft types to and from the `trine.v1` Raft protobufs.
//! - `network`: the Raft client side (tonic over mTLS), with liveness tracking.
//! - `server`: the Raft gRPC service (peer-facing, mTLS only).
//! - `voters`: which members should vote (pure: regions, liveness).
//! - `control`: the running control plane: start, join, propose, read, maintain.
//! - `local`: a whole cluster in one process (benchmarks, tests).
//! - `metrics`: every `trine_chain_*` and `trine_raft_*` metric.

// openraft's error types (StorageError, RPCError) are large by design and
// are what its traits require us to return.
#![allow(clippy::result_large_err)]

pub mod authz;
pub mod chain;
pub mod clock;
pub mod command;
pub mod control;
pub mod convert;
mod lease;
pub mod local;
pub mod metrics;
pub mod network;
pub mod planner;
pub mod server;
pub mod store;
pub mod tls;
pub mod types;
pub mod voters;

pub use command::{
    Command, ModelRecord, NodeRecord, NodeStatus, Placement, Scope, StageState, State, TokenRecord,
};
pub use control::{Config, ControlPlane, Error, Profile};
pub use types::{Batch, Member, NodeId, Request, Response, Secret, TypeConfig};
