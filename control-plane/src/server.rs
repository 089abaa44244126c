//! The Raft gRPC service a member serves on its mutual-TLS port: openraft's
//! three RPCs, plus join, propose, read-index and leave, which any member
//! accepts and the leader carries out.

use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status, Streaming};
use trine_proto::v1 as pb;
use trine_proto::v1::raft_server::Raft as RaftRpc;

use crate::control::{Core, Error};
use crate::types::{NodeId, Secret};
use crate::{authz, convert, metrics, tls};

/// Largest snapshot a member accepts (the sender states the size first).
pub const MAX_SNAPSHOT_BYTES: u64 = 4 << 30;

#[derive(Debug, Clone)]
pub struct Service {
    pub(crate) core: Arc<Core>,
}

fn invalid(e: convert::Malformed) -> Status {
    Status::invalid_argument(e.to_string())
}

fn fatal(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("this member's Raft has stopped: {e}"))
}

/// The DNS names of the caller's TLS client certificate (empty without one).
fn caller_names<T>(request: &Request<T>) -> Vec<String> {
    request
        .peer_certs()
        .and_then(|certs| certs.first().map(|c| tls::names(c)))
        .unwrap_or_default()
}

impl Service {
    /// Refuses a call whose client certificate does not name `claimed`,
    /// the member the call says it comes from (the candidate of a vote, the
    /// leader of an append or snapshot). A node not in this member's view
    /// of the membership (this member is new and has not been told it yet)
    /// is let through: there is nothing to check it against.
    fn check_sender(
        &self,
        names: &[String],
        claimed: NodeId,
        rpc: &'static str,
    ) -> Result<(), Status> {
        let Some(member) = self.core.member(claimed) else {
            return Ok(());
        };
        if tls::certifies(names, &member.name) {
            return Ok(());
        }
        metrics::raft_refused(rpc, "identity");
        tracing::warn!(
            rpc,
            claimed,
            member = %member,
            certificate_names = ?names,
            "refused a Raft call: the caller's certificate does not name the member it claims to be"
        );
        Err(Status::permission_denied(format!(
            "this {rpc} call claims to come from node {claimed} ({}) but the caller's certificate names [{}]; every node needs its own certificate: `trine certs issue --name {}`",
            member.name,
            names.join(", "),
            member.name
        )))
    }
}

#[tonic::async_trait]
impl RaftRpc for Service {
    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        let received = Instant::now();
        let names = caller_names(&request);
        let req = request.into_inner();
        let id = req.request_id.clone();
        let quorum_age = req.quorum_age_ms.map(Duration::from_millis);
        let echo = req.echo;
        let echo_lag = req.echo_quorum_lag_us.map(Duration::from_micros);
        let rpc = convert::append_from(req).map_err(invalid)?;
        self.check_sender(
            &names,
            rpc.vote.leader_id().voted_for().unwrap_or_default(),
            "append_entries",
        )?;
        let commit = rpc.leader_commit.map_or(0, |l| l.index);
        let resp = self.core.raft.append_entries(rpc).await.map_err(fatal)?;
        self.core.heard_from_leader();
        if !matches!(resp, openraft::raft::AppendEntriesResponse::HigherVote(_)) {
            let dating = match &echo {
                Some(s) => crate::lease::Dating::Echo(s, echo_lag),
                None => crate::lease::Dating::Receipt(received, quorum_age),
            };
            self.core.renew_lease(dating, commit);
        }
        // The answer's stamp: now, as it leaves (the sender hears it, and
        // restarts its silence clock, later; the later the stamp, the
        // longer the lease it will date).
        let mut out = convert::append_resp_to(&resp, id);
        out.stamp = Some(self.core.stamp(Instant::now()));
        Ok(Response::new(out))
    }

    async fn vote(
        &self,
        request: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        let names = caller_names(&request);
        let req = request.into_inner();
        let id = req.request_id.clone();
        let rpc = convert::vote_req_from(req).map_err(invalid)?;
        self.check_sender(
            &names,
            rpc.vote.leader_id().voted_for().unwrap_or_default(),
            "vote",
        )?;
        if !self.core.voting() {
            return Err(Status::unavailable(
                "this member does not vote yet: its start is not confirmed with its peers, or its data dir was put back from an old copy and it is catching up",
            ));
        }
        let resp = self.core.raft.vote(rpc).await.map_err(fatal)?;
        Ok(Response::new(convert::vote_resp_to(&resp, id)))
    }

    async fn incarnation(
        &self,
        request: Request<pb::IncarnationRequest>,
    ) -> Result<Response<pb::IncarnationResponse>, Status> {
        let names = caller_names(&request);
        let req = request.into_inner();
        self.check_sender(&names, req.node_id, "incarnation")?;
        let mut resp = self
            .core
            .incarnation_of(req.node_id, req.incarnation)
            .await?;
        resp.request_id = req.request_id;
        Ok(Response::new(resp))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::InstallSnapshotResponse>, Status> {
        let names = caller_names(&request);
        let mut stream = request.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let id = first.request_id.clone();
        let vote = convert::vote_from(first.vote).map_err(invalid)?;
        self.check_sender(
            &names,
            vote.leader_id().voted_for().unwrap_or_default(),
            "install_snapshot",
        )?;
        let meta = first
            .meta
            .clone()
            .ok_or_else(|| Status::invalid_argument("the first snapshot chunk carries no meta"))?;
        let total = meta.total_bytes;
        if total > MAX_SNAPSHOT_BYTES {
            return Err(Status::resource_exhausted(format!(
                "snapshot of {total} bytes is over this member's limit of {MAX_SNAPSHOT_BYTES}"
            )));
        }
        let meta = convert::snapshot_meta_from(meta).map_err(invalid)?;
        let mut data = Vec::with_capacity(usize::try_from(total.min(64 << 20)).unwrap_or(0));
        let mut chunk = Some(first);
        let mut done = false;
        while let Some(c) = chunk.take() {
            if c.offset != data.len() as u64 {
                return Err(Status::invalid_argument(format!(
                    "snapshot chunk at offset {} after {} bytes",
                    c.offset,
                    data.len()
                )));
            }
            if data.len() as u64 + c.data.len() as u64 > total {
                return Err(Status::invalid_argument(
                    "snapshot stream is longer than its stated size",
                ));
            }
            data.extend_from_slice(&c.data);
            if c.done {
                done = true;
                break;
            }
            chunk = stream.next().await.transpose()?;
        }
        if !done || data.len() as u64 != total {
            return Err(Status::invalid_argument(format!(
                "snapshot stream ended after {} of {total} bytes",
                data.len()
            )));
        }
        let snapshot = openraft::Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        };
        let resp = self
            .core
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(fatal)?;
        self.core.heard_from_leader();
        Ok(Response::new(pb::InstallSnapshotResponse {
            request_id: id,
            vote: Some(convert::vote_to(&resp.vote)),
        }))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let names = caller_names(&request);
        let req = request.into_inner();
        // The joiner itself, or a member forwarding its join to the leader.
        let joiner = req
            .peer
            .as_ref()
            .map(|p| p.name.as_str())
            .unwrap_or_default();
        if !tls::certifies(&names, joiner) && !self.core.is_member_name(&names) {
            metrics::raft_refused("join", "identity");
            tracing::warn!(joiner, certificate_names = ?names, "refused a join: the certificate names neither the joining node nor a member");
            return Err(Status::permission_denied(format!(
                "a join for node {joiner:?} from a certificate that names [{}]; a node joins with its own certificate: `trine certs issue --name {joiner}`",
                names.join(", ")
            )));
        }
        let resp = self.core.join(req).await.map_err(Status::from)?;
        Ok(Response::new(resp))
    }

    /// A member's proposals: each command is checked against what the
    /// sender may write (its own commands, or a client's with the client's
    /// token, see [`crate::authz`]); the allowed ones are committed as one
    /// group, and each refused one is answered with why.
    async fn propose(
        &self,
        request: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeResponse>, Status> {
        let names = caller_names(&request);
        let req = request.into_inner();
        // Only the leader commits what a member sends: a node between them
        // would stand in for the sender's certificate (and the leader could
        // not tell which node a write is from). The sender asks again.
        if !self.core.is_leader() {
            return Err(Status::from(Error::NotLeader(
                "this member is not the leader (any more); ask the leader".into(),
            )));
        }
        let batch: crate::Batch = serde_json::from_slice(&req.request)
            .map_err(|e| Status::invalid_argument(format!("request: {e}")))?;
        let n = batch.requests.len();
        if n == 0 || n > crate::control::MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "a proposal carries 1 to {} commands, not {n}",
                crate::control::MAX_BATCH,
            )));
        }
        if !req.secrets.is_empty() && req.secrets.len() != n {
            return Err(Status::invalid_argument(format!(
                "{} secrets for {n} commands (one per command, or none)",
                req.secrets.len()
            )));
        }
        let secrets: Vec<Option<Secret>> = (0..n)
            .map(|i| {
                req.secrets
                    .get(i)
                    .filter(|s| !s.is_empty())
                    .map(|s| Secret::new(s.as_str()))
            })
            .collect();
        let members = self.core.members();
        let now = crate::clock::now_ms();
        let verdicts: Vec<Result<(), authz::Forbidden>> = self.core.reader.with_state(|state| {
            batch
                .requests
                .iter()
                .zip(&secrets)
                .map(|(r, s)| authz::check_forwarded(state, &members, &names, r, s.as_ref(), now))
                .collect()
        });
        // The same id: a retry of this group is recognised as one.
        let mut allowed = crate::Batch {
            requests: Vec::with_capacity(n),
            id: batch.id,
        };
        for (r, v) in batch.requests.into_iter().zip(&verdicts) {
            match v {
                Ok(()) => allowed.requests.push(r),
                Err(f) => {
                    metrics::raft_refused("propose", f.reason);
                    tracing::warn!(principal = %r.principal, command = r.command.kind(), certificate_names = ?names, reason = f.reason, "refused a forwarded write: {}", f.message);
                }
            }
        }
        // Only the batch is committed: the secrets stay out of the log.
        let mut committed = if allowed.requests.is_empty() {
            Vec::new()
        } else {
            self.core.commit_here(allowed).await.map_err(Status::from)?
        }
        .into_iter();
        let answers: Vec<Result<crate::Response, String>> = verdicts
            .into_iter()
            .map(|v| match v {
                Ok(()) => committed
                    .next()
                    .ok_or_else(|| "the leader lost this command's answer".to_owned()),
                Err(f) => Err(f.message),
            })
            .collect();
        Ok(Response::new(pb::ProposeResponse {
            request_id: req.request_id,
            response: serde_json::to_vec(&answers).unwrap_or_default(),
        }))
    }

    async fn read_index(
        &self,
        request: Request<pb::ReadIndexRequest>,
    ) -> Result<Response<pb::ReadIndexResponse>, Status> {
        let req = request.into_inner();
        let index = self.core.read_index().await.map_err(Status::from)?;
        Ok(Response::new(pb::ReadIndexResponse {
            request_id: req.request_id,
            index,
        }))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let names = caller_names(&request);
        let req = request.into_inner();
        // As for Propose: the leader must see the sender's certificate, so
        // this node removes the node itself or answers ABORTED.
        if !self.core.is_leader() {
            return Err(Status::from(Error::NotLeader(
                "this member is not the leader (any more); ask the leader".into(),
            )));
        }
        let secret = Some(req.secret.as_str())
            .filter(|s| !s.is_empty())
            .map(Secret::new);
        let members = self.core.members();
        let checked = self.core.reader.with_state(|state| {
            authz::check_leave(
                state,
                &members,
                &names,
                req.node_id,
                secret.as_ref(),
                crate::clock::now_ms(),
            )
        });
        if let Err(f) = checked {
            metrics::raft_refused("leave", f.reason);
            tracing::warn!(node = req.node_id, certificate_names = ?names, reason = f.reason, "refused a request to remove a node: {}", f.message);
            return Err(Status::permission_denied(f.message));
        }
        self.core
            .leave_here(req.node_id)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::LeaveResponse {
            request_id: req.request_id,
        }))
    }
}
