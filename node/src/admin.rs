//! The Admin gRPC service: peers from the mesh; cluster status, nodes and
//! the chain from the control plane (local reads with a staleness bound,
//! or linearizable ones); draining a node.

use std::time::Duration;

use tonic::{Request, Response, Status};
use trine_control::chain::Block;
use trine_control::{ControlPlane, NodeRecord, NodeStatus};
use trine_proto::v1;
use trine_proto::v1::admin_server::Admin;

use crate::grpc::timestamp;
use crate::mesh::Mesh;

type Reply<T> = Result<Response<T>, Status>;

/// Longest operator note.
pub const MAX_NOTE_BYTES: usize = 4096;

/// The Admin service of a node.
#[derive(Debug, Clone)]
pub struct AdminService {
    pub mesh: Mesh,
    pub control: Option<ControlPlane>,
    /// Whether InjectFault is accepted (`--fault-injection`).
    pub fault_injection: bool,
}

/// The admin behind a call: the principal its writes are recorded under
/// (`token:<name>`) and the secret it called with, which goes with its
/// writes to the leader (the leader checks it again: a node's certificate
/// alone does not let it write as an admin).
struct Caller {
    principal: String,
    secret: trine_control::Secret,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.principal)
    }
}

impl AdminService {
    /// The admin behind an admin-scoped bearer token on `req`, or the
    /// refusal.
    fn authorize<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let control = self.control()?;
        let header = crate::grpc::authorization(req);
        let need = trine_control::Scope::Admin;
        let secret = crate::auth::bearer(header.as_deref());
        match control
            .reader()
            .with_state(|state| crate::auth::check(state, secret, need, crate::auth::now_ms()))
        {
            Ok(t) => Ok(Caller {
                principal: trine_control::authz::token_principal(&t.name),
                secret: trine_control::Secret::new(secret.unwrap_or_default()),
            }),
            Err(r) => {
                crate::metrics::auth_refused("admin", r.reason());
                Err(r.status(need))
            }
        }
    }

    fn control(&self) -> Result<&ControlPlane, Status> {
        self.control.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this node is not part of a cluster: start the first node with --init and the others with --join <raft addr of a member> (see `trine node --help`)",
            )
        })
    }

    /// Commits `command` as the admin; a refusal by the state machine is
    /// FAILED_PRECONDITION with its reason. Returns the block height.
    async fn commit(&self, who: &Caller, command: trine_control::Command) -> Result<u64, Status> {
        let resp = self
            .control()?
            .propose_for_client(&who.principal, who.secret.clone(), command)
            .await?;
        match resp.rejected {
            Some(reason) => Err(Status::failed_precondition(format!(
                "{reason} (the refusal is recorded in block {})",
                resp.index
            ))),
            None => Ok(resp.index),
        }
    }

    /// Applies the requested read consistency; returns the index read at.
    async fn read_point(&self, consistency: i32, max_staleness_ms: u32) -> Result<u64, Status> {
        let control = self.control()?;
        match v1::ReadConsistency::try_from(consistency).unwrap_or_default() {
            v1::ReadConsistency::Linearizable => Ok(control.linearizable().await?),
            _ => {
                let bound = (max_staleness_ms > 0)
                    .then(|| Duration::from_millis(u64::from(max_staleness_ms)));
                Ok(control.local(bound)?)
            }
        }
    }
}

fn role_of(control: &ControlPlane, id: u64) -> v1::RaftRole {
    let s = control.status();
    if s.leader == Some(id) {
        v1::RaftRole::Leader
    } else if s.voters.contains(&id) {
        v1::RaftRole::Voter
    } else if s.members.contains_key(&id) {
        v1::RaftRole::Learner
    } else {
        v1::RaftRole::Unspecified
    }
}

pub fn status_to(s: NodeStatus) -> v1::NodeStatus {
    match s {
        NodeStatus::Up => v1::NodeStatus::Up,
        NodeStatus::Down => v1::NodeStatus::Down,
        NodeStatus::Draining => v1::NodeStatus::Draining,
    }
}

fn node_to(n: &NodeRecord, role: v1::RaftRole) -> v1::Node {
    v1::Node {
        node_id: n.id,
        name: n.name.clone(),
        peer_id: n.peer_id.clone(),
        locality: Some(v1::Locality {
            region: n.region.clone(),
            zone: n.zone.clone(),
        }),
        status: status_to(n.status).into(),
        role: role.into(),
        grpc_addr: n.grpc_addr.clone(),
        http_addr: n.http_addr.clone(),
        api_tls: n.api_tls,
        p2p_addrs: n.p2p_addrs.clone(),
        capacity: Some(v1::Capacity {
            cpu_cores: n.cpu_cores,
            simd: n.simd.clone(),
            memory_bytes: n.memory_bytes,
            gpus: Vec::new(),
        }),
        version: n.version.clone(),
        raft_addr: n.raft_addr.clone(),
        status_since: Some(timestamp(
            std::time::UNIX_EPOCH + Duration::from_millis(n.status_since_ms),
        )),
    }
}

pub fn header_to(b: &Block) -> v1::BlockHeader {
    v1::BlockHeader {
        height: b.height,
        hash: b.hash.to_vec(),
        prev_hash: b.prev_hash.to_vec(),
        term: b.term,
        index: b.index,
        time: Some(timestamp(
            std::time::UNIX_EPOCH + Duration::from_millis(b.time_ms),
        )),
        tx_count: u32::try_from(b.txs.len()).unwrap_or(u32::MAX),
    }
}

pub fn block_to(b: &Block) -> v1::Block {
    v1::Block {
        header: Some(header_to(b)),
        txs: b
            .txs
            .iter()
            .map(|t| v1::Transaction {
                kind: t.kind.clone(),
                summary: t.summary.clone(),
                body: t.body.clone(),
                principal: t.principal.clone(),
                rejected: t.rejected.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_peers(
        &self,
        request: Request<v1::ListPeersRequest>,
    ) -> Reply<v1::ListPeersResponse> {
        crate::grpc::list_peers(&self.mesh, request.into_inner().request_id).await
    }

    async fn cluster_status(
        &self,
        r: Request<v1::ClusterStatusRequest>,
    ) -> Reply<v1::ClusterStatusResponse> {
        self.authorize(&r)?;
        let r = r.into_inner();
        self.read_point(r.consistency, r.max_staleness_ms).await?;
        let control = self.control()?;
        let s = control.status();
        let state = control.reader().state();
        let head = control.reader().head();
        let (peers, leader_rtt) = match self.mesh.snapshot().await {
            Ok(snap) => {
                let leader_peer = s
                    .leader
                    .and_then(|l| state.nodes.get(&l))
                    .map(|n| n.peer_id.clone());
                let rtt = snap
                    .peers
                    .iter()
                    .find(|p| Some(p.peer_id.to_string()) == leader_peer)
                    .and_then(|p| p.rtt)
                    .map_or(0.0, |d| d.as_secs_f64());
                (snap.peers.iter().filter(|p| p.connected).count(), rtt)
            }
            Err(_) => (0, 0.0),
        };
        let name = state
            .nodes
            .get(&s.id)
            .map(|n| n.name.clone())
            .unwrap_or_default();
        Ok(Response::new(v1::ClusterStatusResponse {
            request_id: r.request_id,
            cluster_id: String::new(),
            leader_id: s.leader.unwrap_or(0),
            term: s.term,
            commit_index: s.last_log_index,
            voters: s.voters.iter().copied().collect(),
            learners: s
                .members
                .keys()
                .filter(|id| !s.voters.contains(id))
                .copied()
                .collect(),
            nodes_up: state
                .nodes
                .values()
                .filter(|n| n.status == NodeStatus::Up)
                .count() as u32,
            nodes_total: state.nodes.len() as u32,
            chain_height: head.map_or(0, |b| b.height),
            answered_by: s.id,
            applied_index: s.applied,
            role: role_of(control, s.id).into(),
            name,
            peers: peers as u32,
            leader_rtt_seconds: leader_rtt,
            last_log_index: s.last_log_index,
            leader_heard_seconds: s.leader_heard.map_or(-1.0, |d| d.as_secs_f64()),
            voting: s.voting,
            restored: s.restored,
            incarnation: s.incarnation,
        }))
    }

    async fn list_nodes(&self, r: Request<v1::ListNodesRequest>) -> Reply<v1::ListNodesResponse> {
        self.authorize(&r)?;
        let r = r.into_inner();
        let as_of = self.read_point(r.consistency, r.max_staleness_ms).await?;
        let control = self.control()?;
        let nodes = control
            .reader()
            .state()
            .nodes
            .values()
            .filter(|n| r.region.is_empty() || n.region == r.region)
            .map(|n| node_to(n, role_of(control, n.id)))
            .collect();
        Ok(Response::new(v1::ListNodesResponse {
            request_id: r.request_id,
            nodes,
            as_of_index: as_of,
        }))
    }

    async fn get_placement(
        &self,
        r: Request<v1::GetPlacementRequest>,
    ) -> Reply<v1::GetPlacementResponse> {
        self.authorize(&r)?;
        let r = r.into_inner();
        let as_of = self.read_point(r.consistency, r.max_staleness_ms).await?;
        let state = self.control()?.reader().state();
        if !r.model.is_empty() && !state.models.contains_key(&r.model) {
            return Err(Status::not_found(format!(
                "model {} is not deployed (deployed: {})",
                r.model,
                state.models.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let assignments = state
            .placements
            .values()
            .filter(|p| r.model.is_empty() || p.model == r.model)
            .map(|p| v1::StageAssignment {
                model: p.model.clone(),
                replica: p.replica,
                stage: p.stage,
                layer_start: p.layer_start,
                layer_end: p.layer_end,
                node_id: p.node,
                state: match p.state {
                    trine_control::StageState::Assigned => v1::StageState::Assigned,
                    trine_control::StageState::Loading => v1::StageState::Loading,
                    trine_control::StageState::Ready => v1::StageState::Ready,
                    trine_control::StageState::Failed => v1::StageState::Failed,
                }
                .into(),
                generation: p.generation,
                detail: p.detail.clone(),
                failed_on: p.failed_on.clone(),
            })
            .collect();
        let models = state
            .models
            .values()
            .filter(|m| r.model.is_empty() || m.name == r.model)
            .map(|m| v1::DeployedModel {
                name: m.name.clone(),
                source: m.source.clone(),
                sha256: m.sha256.clone(),
                layers: m.layers,
                bytes_per_layer: m.bytes_per_layer,
                fixed_bytes: m.fixed_bytes,
                stages: m.stages,
                replicas: m.replicas,
                regions: m.regions.clone(),
                deployed_ms: m.deployed_ms,
            })
            .collect();
        Ok(Response::new(v1::GetPlacementResponse {
            request_id: r.request_id,
            assignments,
            as_of_index: as_of,
            models,
        }))
    }

    async fn deploy_model(
        &self,
        r: Request<v1::DeployModelRequest>,
    ) -> Reply<v1::DeployModelResponse> {
        let who = self.authorize(&r)?;
        let r = r.into_inner();
        if r.source.is_empty() || r.source.len() > 4096 {
            return Err(Status::invalid_argument(
                "source: give the model's path on the nodes or its hub repository (up to 4096 bytes)",
            ));
        }
        if r.regions.len() > 64 || r.regions.iter().any(|g| g.is_empty() || g.len() > 63) {
            return Err(Status::invalid_argument(
                "regions: up to 64 region names of 1-63 characters",
            ));
        }
        let sha256 = r.sha256.clone();
        let command = trine_control::Command::DeployModel(Box::new(trine_control::ModelRecord {
            name: r.name,
            source: r.source,
            sha256: r.sha256,
            layers: r.layers,
            bytes_per_layer: r.bytes_per_layer,
            fixed_bytes: r.fixed_bytes,
            stages: r.stages,
            replicas: r.replicas,
            regions: r.regions,
            deployed_ms: 0,
        }));
        let log_index = self.commit(&who, command).await?;
        Ok(Response::new(v1::DeployModelResponse {
            request_id: r.request_id,
            sha256,
            log_index,
        }))
    }

    async fn undeploy_model(
        &self,
        r: Request<v1::UndeployModelRequest>,
    ) -> Reply<v1::UndeployModelResponse> {
        let who = self.authorize(&r)?;
        let r = r.into_inner();
        let log_index = self
            .commit(&who, trine_control::Command::UndeployModel { name: r.name })
            .await?;
        Ok(Response::new(v1::UndeployModelResponse {
            request_id: r.request_id,
            log_index,
        }))
    }

    async fn chain_head(&self, r: Request<v1::ChainHeadRequest>) -> Reply<v1::ChainHeadResponse> {
        self.authorize(&r)?;
        let r = r.into_inner();
        self.read_point(r.consistency, r.max_staleness_ms).await?;
        let head = self.control()?.reader().head();
        Ok(Response::new(v1::ChainHeadResponse {
            request_id: r.request_id,
            head: head.as_ref().map(header_to),
        }))
    }

    async fn get_block(&self, r: Request<v1::GetBlockRequest>) -> Reply<v1::GetBlockResponse> {
        self.authorize(&r)?;
        let r = r.into_inner();
        let reader = self.control()?.reader().clone();
        let block = match r.selector {
            Some(v1::get_block_request::Selector::Height(h)) => {
                reader.block(h).map_err(Status::data_loss)?.ok_or_else(|| {
                    let head = reader.head().map_or(0, |b| b.height);
                    let first = reader.first_height().unwrap_or(0);
                    Status::not_found(format!(
                        "no block at height {h}: this node holds heights {first}..={head}"
                    ))
                })?
            }
            Some(v1::get_block_request::Selector::Hash(hex)) => {
                let want = trine_control::chain::unhex(&hex)
                    .filter(|b| b.len() == 32)
                    .ok_or_else(|| Status::invalid_argument("hash must be 64 hex digits"))?;
                tokio::task::spawn_blocking(move || {
                    reader
                        .blocks(reader.first_height().unwrap_or(0), usize::MAX)
                        .filter_map(Result::ok)
                        .find(|b| b.hash.as_slice() == want.as_slice())
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .ok_or_else(|| Status::not_found(format!("no block has hash {hex}")))?
            }
            None => return Err(Status::invalid_argument("give a height or a hash")),
        };
        Ok(Response::new(v1::GetBlockResponse {
            request_id: r.request_id,
            block: Some(block_to(&block)),
        }))
    }

    async fn verify_chain(
        &self,
        r: Request<v1::VerifyChainRequest>,
    ) -> Reply<v1::VerifyChainResponse> {
        self.authorize(&r)?;
        let r = r.into_inner();
        let reader = self.control()?.reader().clone();
        let first = reader.first_height().unwrap_or(0);
        let result = tokio::task::spawn_blocking(move || {
            trine_control::chain::verify(reader.blocks(first, usize::MAX))
                .map(|v| (v, reader.head()))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(match result {
            Ok((v, head)) => v1::VerifyChainResponse {
                request_id: r.request_id,
                ok: true,
                blocks: v.blocks,
                first_height: first,
                head: head.as_ref().map(header_to),
                problem: String::new(),
                bad_height: 0,
            },
            Err(e) => v1::VerifyChainResponse {
                request_id: r.request_id,
                ok: false,
                blocks: 0,
                first_height: first,
                head: None,
                bad_height: e.height(),
                problem: e.to_string(),
            },
        }))
    }

    async fn append_note(
        &self,
        r: Request<v1::AppendNoteRequest>,
    ) -> Reply<v1::AppendNoteResponse> {
        let who = self.authorize(&r)?;
        let r = r.into_inner();
        if r.text.is_empty() || r.text.len() > MAX_NOTE_BYTES {
            return Err(Status::invalid_argument(format!(
                "a note has 1 to {MAX_NOTE_BYTES} bytes, not {}",
                r.text.len()
            )));
        }
        let resp = self
            .control()?
            .propose_for_client(
                &who.principal,
                who.secret,
                trine_control::Command::Note { text: r.text },
            )
            .await?;
        Ok(Response::new(v1::AppendNoteResponse {
            request_id: r.request_id,
            height: resp.index,
        }))
    }

    async fn create_token(
        &self,
        r: Request<v1::CreateTokenRequest>,
    ) -> Reply<v1::CreateTokenResponse> {
        let who = self.authorize(&r)?;
        let r = r.into_inner();
        let scope = trine_control::Scope::from_wire(r.scope).ok_or_else(|| {
            Status::invalid_argument(format!(
                "scope: {} is not a token scope (inference or admin)",
                r.scope
            ))
        })?;
        // Up to ten years; a longer one is a mistake, not a policy.
        const MAX_TTL_SECONDS: u64 = 10 * 366 * 24 * 3600;
        if r.ttl_seconds > MAX_TTL_SECONDS {
            return Err(Status::invalid_argument(format!(
                "ttl_seconds: at most {MAX_TTL_SECONDS} (ten years); 0 means the token never expires"
            )));
        }
        let expires_ms = match r.ttl_seconds {
            0 => 0,
            s => crate::auth::now_ms() + s * 1000,
        };
        let command = trine_control::Command::AddToken(Box::new(trine_control::TokenRecord {
            name: r.name,
            sha256: r.sha256,
            requests_per_minute: r.requests_per_minute,
            tokens_per_minute: r.tokens_per_minute,
            concurrency: r.concurrency,
            created_ms: 0,
            scope,
            expires_ms,
        }));
        let height = self.commit(&who, command).await?;
        Ok(Response::new(v1::CreateTokenResponse {
            request_id: r.request_id,
            height,
        }))
    }

    async fn revoke_token(
        &self,
        r: Request<v1::RevokeTokenRequest>,
    ) -> Reply<v1::RevokeTokenResponse> {
        let who = self.authorize(&r)?;
        let r = r.into_inner();
        let height = self
            .commit(&who, trine_control::Command::RevokeToken { name: r.name })
            .await?;
        Ok(Response::new(v1::RevokeTokenResponse {
            request_id: r.request_id,
            height,
        }))
    }

    async fn list_tokens(
        &self,
        r: Request<v1::ListTokensRequest>,
    ) -> Reply<v1::ListTokensResponse> {
        self.authorize(&r)?;
        let r = r.into_inner();
        let as_of = self.read_point(r.consistency, r.max_staleness_ms).await?;
        let tokens = self
            .control()?
            .reader()
            .state()
            .tokens
            .into_values()
            .map(|t| v1::ApiToken {
                name: t.name,
                sha256: t.sha256,
                requests_per_minute: t.requests_per_minute,
                tokens_per_minute: t.tokens_per_minute,
                concurrency: t.concurrency,
                created: Some(timestamp(
                    std::time::UNIX_EPOCH + Duration::from_millis(t.created_ms),
                )),
                scope: v1::TokenScope::from(t.scope).into(),
                expires: (t.expires_ms != 0).then(|| {
                    timestamp(std::time::UNIX_EPOCH + Duration::from_millis(t.expires_ms))
                }),
            })
            .collect();
        Ok(Response::new(v1::ListTokensResponse {
            request_id: r.request_id,
            tokens,
            as_of_index: as_of,
        }))
    }

    async fn inject_fault(
        &self,
        r: Request<v1::InjectFaultRequest>,
    ) -> Reply<v1::InjectFaultResponse> {
        let who = self.authorize(&r)?;
        if !self.fault_injection {
            return Err(Status::failed_precondition(
                "fault injection is off on this node: start it with --fault-injection (chaos runs and tests only)",
            ));
        }
        let r = r.into_inner();
        let control = self.control()?;
        const MAX_DELAY_MS: u32 = 60_000;
        const MAX_SKEW_MS: i64 = 7 * 24 * 3_600_000;
        let mut added = std::collections::BTreeMap::new();
        for d in &r.delays {
            if d.region.is_empty() || d.rtt_ms > MAX_DELAY_MS || d.jitter_ms > MAX_DELAY_MS {
                return Err(Status::invalid_argument(format!(
                    "delay to {:?}: a region and at most {MAX_DELAY_MS} ms of delay and of jitter",
                    d.region
                )));
            }
            added.insert(
                d.region.clone(),
                trine_control::network::Added {
                    rtt: Duration::from_millis(u64::from(d.rtt_ms)),
                    jitter: Duration::from_millis(u64::from(d.jitter_ms)),
                },
            );
        }
        if r.clock_skew_ms.abs() > MAX_SKEW_MS {
            return Err(Status::invalid_argument(format!(
                "clock skew {} ms is over a week",
                r.clock_skew_ms
            )));
        }
        if r.cut_off.contains(&control.id()) {
            return Err(Status::invalid_argument(
                "a node cannot be cut off from itself",
            ));
        }
        control.faults().isolate(r.cut_off.iter().copied());
        control.delays().set_added(added);
        trine_control::clock::set_skew_ms(r.clock_skew_ms);
        let faults = v1::InjectFaultResponse {
            request_id: r.request_id,
            cut_off: control.faults().cut(),
            delays: control
                .delays()
                .added()
                .into_iter()
                .map(|(region, a)| v1::RegionDelay {
                    region,
                    rtt_ms: a.rtt.as_millis() as u32,
                    jitter_ms: a.jitter.as_millis() as u32,
                })
                .collect(),
            clock_skew_ms: trine_control::clock::skew_ms(),
        };
        tracing::warn!(
            by = %who,
            cut_off = ?faults.cut_off,
            delays = faults.delays.len(),
            clock_skew_ms = faults.clock_skew_ms,
            "fault injection: faults replaced"
        );
        Ok(Response::new(faults))
    }

    async fn drain_node(&self, r: Request<v1::DrainNodeRequest>) -> Reply<v1::DrainNodeResponse> {
        let who = self.authorize(&r)?;
        let r = r.into_inner();
        let control = self.control()?;
        let id = if r.node_id == 0 {
            control.id()
        } else {
            r.node_id
        };
        control
            .leave(Some(id), Some((&who.principal, who.secret)))
            .await?;
        Ok(Response::new(v1::DrainNodeResponse {
            request_id: r.request_id,
            node_id: id,
        }))
    }
}
