//! The node's gRPC surface: standard health (grpc.health.v1), server
//! reflection (v1 and v1alpha), and the `trine.v1` services.
//!
//! `Inference`, `Admin` and `Raft` are declared by the contract but served by
//! later parts of the node (engine, control plane). Until then every method
//! answers UNIMPLEMENTED with a message that says so, and their health status
//! is NOT_SERVING, so a client can tell "not here yet" from "broken".

use tonic::{Request, Response, Status, Streaming};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use trine_proto::v1::admin_server::{Admin, AdminServer};
use trine_proto::v1::inference_server::{Inference, InferenceServer};
use trine_proto::v1::raft_server::{Raft, RaftServer};
use trine_proto::{service_names, v1};

use crate::mesh::Mesh;

/// Largest gRPC message the node decodes. Bounds memory per request.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Answers every `trine.v1` method with UNIMPLEMENTED and the reason.
#[derive(Debug, Clone, Copy, Default)]
pub struct NotYetServed;

fn not_served(method: &str) -> Status {
    Status::unimplemented(format!(
        "{method} is not implemented by trine {}: this node serves health, reflection and metrics only; \
         model serving and the control plane are not part of this build yet",
        crate::build::VERSION
    ))
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Inference for NotYetServed {
    type GenerateStream = tokio_stream::Empty<Result<v1::GenerateResponse, Status>>;

    async fn generate(&self, _: Request<v1::GenerateRequest>) -> Reply<Self::GenerateStream> {
        Err(not_served("trine.v1.Inference/Generate"))
    }

    async fn list_models(
        &self,
        _: Request<v1::ListModelsRequest>,
    ) -> Reply<v1::ListModelsResponse> {
        Err(not_served("trine.v1.Inference/ListModels"))
    }
}

/// The Admin service: peers from the mesh; the rest is not served yet.
#[derive(Debug, Clone)]
pub struct AdminService {
    mesh: Mesh,
}

fn timestamp(t: std::time::SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_peers(
        &self,
        request: Request<v1::ListPeersRequest>,
    ) -> Reply<v1::ListPeersResponse> {
        let request_id = request.into_inner().request_id;
        let snapshot = self
            .mesh
            .snapshot()
            .await
            .map_err(|e| Status::unavailable(format!("{e}; the node is shutting down")))?;
        let mut peers: Vec<v1::Peer> = snapshot
            .peers
            .into_iter()
            .map(|p| v1::Peer {
                peer_id: p.peer_id.to_string(),
                name: p.name,
                locality: Some(v1::Locality {
                    region: p.region,
                    zone: p.zone,
                }),
                addrs: p.addrs.iter().map(ToString::to_string).collect(),
                connected: p.connected,
                rtt_seconds: p.rtt.map_or(0.0, |d| d.as_secs_f64()),
                last_seen: Some(timestamp(p.last_seen)),
                agent: p.agent,
                admitted: p.admitted,
                score: p.score,
                heartbeat_seq: p.heartbeat_seq,
            })
            .collect();
        peers.sort_by(|a, b| (&a.name, &a.peer_id).cmp(&(&b.name, &b.peer_id)));
        Ok(Response::new(v1::ListPeersResponse {
            request_id,
            local_peer_id: snapshot.local_peer_id.to_string(),
            peers,
        }))
    }

    async fn cluster_status(
        &self,
        r: Request<v1::ClusterStatusRequest>,
    ) -> Reply<v1::ClusterStatusResponse> {
        NotYetServed.cluster_status(r).await
    }

    async fn list_nodes(&self, r: Request<v1::ListNodesRequest>) -> Reply<v1::ListNodesResponse> {
        NotYetServed.list_nodes(r).await
    }

    async fn get_placement(
        &self,
        r: Request<v1::GetPlacementRequest>,
    ) -> Reply<v1::GetPlacementResponse> {
        NotYetServed.get_placement(r).await
    }

    async fn deploy_model(
        &self,
        r: Request<v1::DeployModelRequest>,
    ) -> Reply<v1::DeployModelResponse> {
        NotYetServed.deploy_model(r).await
    }

    async fn chain_head(&self, r: Request<v1::ChainHeadRequest>) -> Reply<v1::ChainHeadResponse> {
        NotYetServed.chain_head(r).await
    }

    async fn get_block(&self, r: Request<v1::GetBlockRequest>) -> Reply<v1::GetBlockResponse> {
        NotYetServed.get_block(r).await
    }
}

#[tonic::async_trait]
impl Admin for NotYetServed {
    async fn list_peers(&self, _: Request<v1::ListPeersRequest>) -> Reply<v1::ListPeersResponse> {
        Err(not_served("trine.v1.Admin/ListPeers"))
    }

    async fn cluster_status(
        &self,
        _: Request<v1::ClusterStatusRequest>,
    ) -> Reply<v1::ClusterStatusResponse> {
        Err(not_served("trine.v1.Admin/ClusterStatus"))
    }

    async fn list_nodes(&self, _: Request<v1::ListNodesRequest>) -> Reply<v1::ListNodesResponse> {
        Err(not_served("trine.v1.Admin/ListNodes"))
    }

    async fn get_placement(
        &self,
        _: Request<v1::GetPlacementRequest>,
    ) -> Reply<v1::GetPlacementResponse> {
        Err(not_served("trine.v1.Admin/GetPlacement"))
    }

    async fn deploy_model(
        &self,
        _: Request<v1::DeployModelRequest>,
    ) -> Reply<v1::DeployModelResponse> {
        Err(not_served("trine.v1.Admin/DeployModel"))
    }

    async fn chain_head(&self, _: Request<v1::ChainHeadRequest>) -> Reply<v1::ChainHeadResponse> {
        Err(not_served("trine.v1.Admin/ChainHead"))
    }

    async fn get_block(&self, _: Request<v1::GetBlockRequest>) -> Reply<v1::GetBlockResponse> {
        Err(not_served("trine.v1.Admin/GetBlock"))
    }
}

#[tonic::async_trait]
impl Raft for NotYetServed {
    async fn append_entries(
        &self,
        _: Request<v1::AppendEntriesRequest>,
    ) -> Reply<v1::AppendEntriesResponse> {
        Err(not_served("trine.v1.Raft/AppendEntries"))
    }

    async fn vote(&self, _: Request<v1::VoteRequest>) -> Reply<v1::VoteResponse> {
        Err(not_served("trine.v1.Raft/Vote"))
    }

    async fn install_snapshot(
        &self,
        _: Request<Streaming<v1::SnapshotChunk>>,
    ) -> Reply<v1::InstallSnapshotResponse> {
        Err(not_served("trine.v1.Raft/InstallSnapshot"))
    }
}

/// The services and the health reporter the node drives.
#[derive(Debug)]
pub struct Services {
    pub health: HealthReporter,
    pub router: tonic::service::Routes,
}

/// Builds every gRPC service of the node.
pub async fn services(mesh: Mesh) -> Result<Services, tonic_reflection::server::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // Admin answers ListPeers; the rest of it and the other services come
    // with the control plane and serving.
    health
        .set_service_status(service_names::ADMIN, ServingStatus::Serving)
        .await;
    for name in [service_names::INFERENCE, service_names::RAFT] {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(trine_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let router = tonic::service::Routes::new(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(
            InferenceServer::new(NotYetServed).max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            AdminServer::new(AdminService { mesh }).max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(RaftServer::new(NotYetServed).max_decoding_message_size(MAX_MESSAGE_BYTES));
    Ok(Services { health, router })
}
