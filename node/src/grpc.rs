//! The node's gRPC surface: standard health (grpc.health.v1), server
//! reflection (v1 and v1alpha), and the `trine.v1` services.
//!
//! `Admin` lives in `admin.rs`; `Raft` is served on the node's separate
//! mutual-TLS port by the control plane. `Inference` is served by cluster
//! members ([`crate::serve`]); a node outside a cluster answers it with
//! UNIMPLEMENTED and a message that says so, and its Inference health is
//! NOT_SERVING, so a client can tell "not here" from "broken".

use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use trine_proto::v1::admin_server::{Admin, AdminServer};
use trine_proto::v1::inference_server::{Inference, InferenceServer};
use trine_proto::{service_names, v1};

use crate::mesh::Mesh;

/// Largest gRPC message the node decodes. Bounds memory per request.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Answers every `trine.v1` method with UNIMPLEMENTED and the reason.
#[derive(Debug, Clone, Copy, Default)]
pub struct NotYetServed;

fn not_served(method: &str) -> Status {
    Status::unimplemented(format!(
        "{method} is served by cluster members; this node (trine {}) runs the mesh only: \
         start it with --init or --join (and a node certificate) to serve models",
        crate::build::VERSION
    ))
}

pub(crate) type Reply<T> = Result<Response<T>, Status>;

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

/// `trine.v1.Inference` on a cluster member.
#[derive(Debug, Clone)]
pub struct InferenceService {
    pub serving: crate::serve::Serving,
}

type EventStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<v1::GenerateResponse, Status>> + Send>,
>;

/// A `grpc-timeout` header value (gRPC over HTTP/2: up to 8 digits and a
/// unit of H, M, S, m, u or n).
pub fn grpc_timeout(v: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let unit = v.chars().last()?;
    let digits = &v[..v.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

pub(crate) fn authorization<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = EventStream;

    async fn generate(&self, req: Request<v1::GenerateRequest>) -> Reply<Self::GenerateStream> {
        use tokio_stream::StreamExt as _;
        let auth = authorization(&req);
        let hop = req.metadata().get(crate::serve::HOP).is_some();
        let grpc_deadline = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout);
        let answer = async {
            let principal = self.serving.authenticate(auth.as_deref())?;
            let mut r = req.into_inner();
            // The gRPC deadline wins over the request's own field.
            if let Some(d) = grpc_deadline {
                r.timeout = Some(crate::serve::duration(d));
            }
            self.serving
                .generate(r, hop, auth.clone(), &principal)
                .await
        }
        .await;
        let rx = match answer {
            Ok(rx) => rx,
            Err(e) => {
                crate::metrics::request("grpc", e.kind());
                return Err(e.status());
            }
        };
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|r| {
            match &r {
                Ok(v1::GenerateResponse {
                    event: Some(v1::generate_response::Event::Usage(_)),
                    ..
                }) => crate::metrics::request("grpc", "ok"),
                Err(e) => crate::metrics::request("grpc", e.kind()),
                Ok(_) => {}
            }
            r.map_err(|e| e.status())
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_models(
        &self,
        req: Request<v1::ListModelsRequest>,
    ) -> Reply<v1::ListModelsResponse> {
        self.serving
            .authenticate(authorization(&req).as_deref())
            .map_err(|e| e.status())?;
        Ok(Response::new(v1::ListModelsResponse {
            request_id: req.into_inner().request_id,
            models: self.serving.models(),
        }))
    }
}

pub fn timestamp(t: std::time::SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// The mesh's peers as `ListPeers` answers them.
pub async fn list_peers(mesh: &Mesh, request_id: String) -> Reply<v1::ListPeersResponse> {
    let snapshot = mesh
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

    async fn undeploy_model(
        &self,
        _: Request<v1::UndeployModelRequest>,
    ) -> Reply<v1::UndeployModelResponse> {
        Err(not_served("trine.v1.Admin/UndeployModel"))
    }

    async fn create_token(
        &self,
        _: Request<v1::CreateTokenRequest>,
    ) -> Reply<v1::CreateTokenResponse> {
        Err(not_served("trine.v1.Admin/CreateToken"))
    }

    async fn revoke_token(
        &self,
        _: Request<v1::RevokeTokenRequest>,
    ) -> Reply<v1::RevokeTokenResponse> {
        Err(not_served("trine.v1.Admin/RevokeToken"))
    }

    async fn list_tokens(
        &self,
        _: Request<v1::ListTokensRequest>,
    ) -> Reply<v1::ListTokensResponse> {
        Err(not_served("trine.v1.Admin/ListTokens"))
    }

    async fn get_block(&self, _: Request<v1::GetBlockRequest>) -> Reply<v1::GetBlockResponse> {
        Err(not_served("trine.v1.Admin/GetBlock"))
    }

    async fn verify_chain(
        &self,
        _: Request<v1::VerifyChainRequest>,
    ) -> Reply<v1::VerifyChainResponse> {
        Err(not_served("trine.v1.Admin/VerifyChain"))
    }

    async fn drain_node(&self, _: Request<v1::DrainNodeRequest>) -> Reply<v1::DrainNodeResponse> {
        Err(not_served("trine.v1.Admin/DrainNode"))
    }

    async fn inject_fault(
        &self,
        _: Request<v1::InjectFaultRequest>,
    ) -> Reply<v1::InjectFaultResponse> {
        Err(not_served("trine.v1.Admin/InjectFault"))
    }

    async fn append_note(
        &self,
        _: Request<v1::AppendNoteRequest>,
    ) -> Reply<v1::AppendNoteResponse> {
        Err(not_served("trine.v1.Admin/AppendNote"))
    }
}

/// The services and the health reporter the node drives.
#[derive(Debug)]
pub struct Services {
    pub health: HealthReporter,
    pub router: tonic::service::Routes,
}

/// Builds every gRPC service of the node.
pub async fn services(
    mesh: Mesh,
    control: Option<trine_control::ControlPlane>,
    serving: Option<crate::serve::Serving>,
    fault_injection: bool,
    max_message: usize,
) -> Result<Services, tonic_reflection::server::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // Admin answers ListPeers always and the cluster methods when the node
    // is a member; Raft is served on its own mutual-TLS port; Inference
    // comes with serving.
    health
        .set_service_status(service_names::ADMIN, ServingStatus::Serving)
        .await;
    let raft = if control.is_some() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status(service_names::RAFT, raft).await;
    let inference = if serving.is_some() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health
        .set_service_status(service_names::INFERENCE, inference)
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(trine_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let router = tonic::service::Routes::new(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(
            AdminServer::new(crate::admin::AdminService {
                mesh,
                control,
                fault_injection,
            })
            .max_decoding_message_size(max_message),
        );
    let router = match serving {
        Some(serving) => router.add_service(
            InferenceServer::new(InferenceService { serving })
                .max_decoding_message_size(max_message),
        ),
        None => router
            .add_service(InferenceServer::new(NotYetServed).max_decoding_message_size(max_message)),
    };
    Ok(Services { health, router })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn grpc_timeout_headers_parse() {
        assert_eq!(super::grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(
            super::grpc_timeout("250m"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(super::grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(super::grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            super::grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "5", "5s", "123456789S", "-5S", "5.0S", "５S", "5ä"] {
            assert_eq!(super::grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
