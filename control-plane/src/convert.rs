//! openraft's messages to and from the `trine.v1` Raft protobufs, field by
//! field. Application commands travel as JSON bytes (the control plane's
//! versioned encoding); a message that does not decode is a `Malformed`
//! error naming the field, answered INVALID_ARGUMENT at the edge.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{
    CommittedLeaderId, EntryPayload, LeaderId, LogId, Membership, SnapshotMeta, StoredMembership,
    Vote,
};
use trine_proto::v1 as pb;

use crate::types::{Member, NodeId, TypeConfig};

/// A peer's message could not be turned into openraft's.
#[derive(Debug, Clone, thiserror::Error)]
#[error("malformed Raft message: {0}")]
pub struct Malformed(pub String);

type Result<T> = std::result::Result<T, Malformed>;

fn need<T>(v: Option<T>, field: &str) -> Result<T> {
    v.ok_or_else(|| Malformed(format!("{field} is missing")))
}

/// The Raft mode a joiner states (`JoinRequest.raft_mode`): 2, standard.
pub const RAFT_MODE: u32 = 2;

// openraft runs in standard Raft mode (its `single-term-leader` feature):
// a vote is (term, the node voted for, if any) and each term has at most
// one leader, so a log id is (term, index); node id 0, which no member
// has, stands for "no one" on the wire.

pub fn vote_to(v: &Vote<NodeId>) -> pb::RaftVote {
    pb::RaftVote {
        leader_id: Some(pb::LeaderId {
            term: v.leader_id.term,
            node_id: v.leader_id.voted_for.unwrap_or(0),
        }),
        committed: v.committed,
    }
}

pub fn vote_from(v: Option<pb::RaftVote>) -> Result<Vote<NodeId>> {
    let v = need(v, "vote")?;
    let l = need(v.leader_id, "vote.leader_id")?;
    Ok(Vote {
        leader_id: LeaderId {
            term: l.term,
            voted_for: (l.node_id != 0).then_some(l.node_id),
        },
        committed: v.committed,
    })
}

pub fn log_id_to(l: &LogId<NodeId>) -> pb::LogId {
    pb::LogId {
        leader_id: Some(pb::LeaderId {
            term: l.leader_id.term,
            node_id: 0,
        }),
        index: l.index,
    }
}

pub fn opt_log_id_to(l: Option<&LogId<NodeId>>) -> Option<pb::LogId> {
    l.map(log_id_to)
}

pub fn log_id_from(l: pb::LogId) -> Result<LogId<NodeId>> {
    let leader = need(l.leader_id, "log_id.leader_id")?;
    Ok(LogId::new(
        CommittedLeaderId::new(leader.term, leader.node_id),
        l.index,
    ))
}

pub fn opt_log_id_from(l: Option<pb::LogId>) -> Result<Option<LogId<NodeId>>> {
    l.map(log_id_from).transpose()
}

pub fn peer_to(m: &Member) -> pb::RaftPeer {
    pb::RaftPeer {
        addr: m.addr.clone(),
        region: m.region.clone(),
        name: m.name.clone(),
    }
}

pub fn peer_from(p: pb::RaftPeer) -> Member {
    Member {
        addr: p.addr,
        region: p.region,
        name: p.name,
    }
}

pub fn membership_to(m: &Membership<NodeId, Member>) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|c| pb::NodeIdSet {
                node_ids: c.iter().copied().collect(),
            })
            .collect(),
        nodes: m.nodes().map(|(id, n)| (*id, peer_to(n))).collect(),
    }
}

pub fn membership_from(m: pb::Membership) -> Result<Membership<NodeId, Member>> {
    let configs: Vec<BTreeSet<NodeId>> = m
        .configs
        .into_iter()
        .map(|c| c.node_ids.into_iter().collect())
        .collect();
    let nodes: BTreeMap<NodeId, Member> = m
        .nodes
        .into_iter()
        .map(|(id, p)| (id, peer_from(p)))
        .collect();
    for c in &configs {
        if let Some(missing) = c.iter().find(|id| !nodes.contains_key(id)) {
            return Err(Malformed(format!(
                "membership names voter {missing} without its address"
            )));
        }
    }
    Ok(Membership::new(configs, nodes))
}

pub fn entry_to(e: &openraft::Entry<TypeConfig>) -> pb::Entry {
    let payload = match &e.payload {
        EntryPayload::Blank => pb::entry::Payload::Blank(pb::Blank {}),
        EntryPayload::Normal(r) => {
            pb::entry::Payload::Command(serde_json::to_vec(r).unwrap_or_default())
        }
        EntryPayload::Membership(m) => pb::entry::Payload::Membership(membership_to(m)),
    };
    pb::Entry {
        log_id: Some(log_id_to(&e.log_id)),
        payload: Some(payload),
    }
}

pub fn entry_from(e: pb::Entry) -> Result<openraft::Entry<TypeConfig>> {
    let log_id = log_id_from(need(e.log_id, "entry.log_id")?)?;
    let payload = match need(e.payload, "entry.payload")? {
        pb::entry::Payload::Blank(_) => EntryPayload::Blank,
        pb::entry::Payload::Command(bytes) => EntryPayload::Normal(
            serde_json::from_slice(&bytes)
                .map_err(|err| Malformed(format!("entry {}: command: {err}", log_id.index)))?,
        ),
        pb::entry::Payload::Membership(m) => EntryPayload::Membership(membership_from(m)?),
    };
    Ok(openraft::Entry { log_id, payload })
}

pub fn append_to(
    r: &openraft::raft::AppendEntriesRequest<TypeConfig>,
    request_id: String,
) -> pb::AppendEntriesRequest {
    pb::AppendEntriesRequest {
        request_id,
        vote: Some(vote_to(&r.vote)),
        prev_log_id: opt_log_id_to(r.prev_log_id.as_ref()),
        entries: r.entries.iter().map(entry_to).collect(),
        leader_commit: opt_log_id_to(r.leader_commit.as_ref()),
        quorum_age_ms: None,
        echo: None,
        echo_quorum_lag_us: None,
    }
}

pub fn append_from(
    r: pb::AppendEntriesRequest,
) -> Result<openraft::raft::AppendEntriesRequest<TypeConfig>> {
    Ok(openraft::raft::AppendEntriesRequest {
        vote: vote_from(r.vote)?,
        prev_log_id: opt_log_id_from(r.prev_log_id)?,
        entries: r
            .entries
            .into_iter()
            .map(entry_from)
            .collect::<Result<_>>()?,
        leader_commit: opt_log_id_from(r.leader_commit)?,
    })
}

pub fn append_resp_to(
    r: &openraft::raft::AppendEntriesResponse<NodeId>,
    request_id: String,
) -> pb::AppendEntriesResponse {
    use openraft::raft::AppendEntriesResponse as R;
    use pb::append_entries_response::Result as P;
    let result = match r {
        R::Success => P::Success(pb::Blank {}),
        R::PartialSuccess(l) => match l {
            Some(l) => P::PartialSuccess(log_id_to(l)),
            // Nothing matched: openraft treats that as a conflict at prev.
            None => P::Conflict(pb::Conflict {}),
        },
        R::Conflict => P::Conflict(pb::Conflict {}),
        R::HigherVote(v) => P::HigherVote(vote_to(v)),
    };
    pb::AppendEntriesResponse {
        request_id,
        result: Some(result),
        stamp: None,
    }
}

pub fn append_resp_from(
    r: pb::AppendEntriesResponse,
) -> Result<openraft::raft::AppendEntriesResponse<NodeId>> {
    use openraft::raft::AppendEntriesResponse as R;
    use pb::append_entries_response::Result as P;
    Ok(match need(r.result, "append_entries_response.result")? {
        P::Success(_) => R::Success,
        P::Conflict(_) => R::Conflict,
        P::HigherVote(v) => R::HigherVote(vote_from(Some(v))?),
        P::PartialSuccess(l) => R::PartialSuccess(Some(log_id_from(l)?)),
    })
}

pub fn vote_req_to(r: &openraft::raft::VoteRequest<NodeId>, request_id: String) -> pb::VoteRequest {
    pb::VoteRequest {
        request_id,
        vote: Some(vote_to(&r.vote)),
        last_log_id: opt_log_id_to(r.last_log_id.as_ref()),
    }
}

pub fn vote_req_from(r: pb::VoteRequest) -> Result<openraft::raft::VoteRequest<NodeId>> {
    Ok(openraft::raft::VoteRequest {
        vote: vote_from(r.vote)?,
        last_log_id: opt_log_id_from(r.last_log_id)?,
    })
}

pub fn vote_resp_to(
    r: &openraft::raft::VoteResponse<NodeId>,
    request_id: String,
) -> pb::VoteResponse {
    pb::VoteResponse {
        request_id,
        vote: Some(vote_to(&r.vote)),
        vote_granted: r.vote_granted,
        last_log_id: opt_log_id_to(r.last_log_id.as_ref()),
    }
}

pub fn vote_resp_from(r: pb::VoteResponse) -> Result<openraft::raft::VoteResponse<NodeId>> {
    Ok(openraft::raft::VoteResponse {
        vote: vote_from(r.vote)?,
        vote_granted: r.vote_granted,
        last_log_id: opt_log_id_from(r.last_log_id)?,
    })
}

pub fn snapshot_meta_to(m: &SnapshotMeta<NodeId, Member>, total_bytes: u64) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: opt_log_id_to(m.last_log_id.as_ref()),
        last_membership: Some(membership_to(m.last_membership.membership())),
        last_membership_log_id: opt_log_id_to(m.last_membership.log_id().as_ref()),
        snapshot_id: m.snapshot_id.clone(),
        total_bytes,
    }
}

pub fn snapshot_meta_from(m: pb::SnapshotMeta) -> Result<SnapshotMeta<NodeId, Member>> {
    Ok(SnapshotMeta {
        last_log_id: opt_log_id_from(m.last_log_id)?,
        last_membership: StoredMembership::new(
            opt_log_id_from(m.last_membership_log_id)?,
            membership_from(need(m.last_membership, "snapshot.last_membership")?)?,
        ),
        snapshot_id: m.snapshot_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Batch, Command, Request};

    fn member(i: u64) -> Member {
        Member {
            addr: format!("127.0.0.1:{}", 7000 + i),
            region: "r".into(),
            name: format!("n{i}"),
        }
    }

    #[test]
    fn append_entries_round_trips_every_payload() {
        let lid = |t, n, i| LogId::new(CommittedLeaderId::new(t, n), i);
        let m = Membership::new(
            vec![[1, 2].into(), [2, 3].into()],
            BTreeMap::from([(1, member(1)), (2, member(2)), (3, member(3))]),
        );
        let req = openraft::raft::AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(5, 2),
            prev_log_id: Some(lid(4, 1, 9)),
            entries: vec![
                openraft::Entry {
                    log_id: lid(5, 2, 10),
                    payload: EntryPayload::Blank,
                },
                openraft::Entry {
                    log_id: lid(5, 2, 11),
                    payload: EntryPayload::Normal(Batch {
                        requests: vec![Request {
                            time_ms: 7,
                            principal: "system".into(),
                            command: Command::Note { text: "x".into() },
                        }],
                        id: 42,
                    }),
                },
                openraft::Entry {
                    log_id: lid(5, 2, 12),
                    payload: EntryPayload::Membership(m),
                },
            ],
            leader_commit: None,
        };
        let back = append_from(append_to(&req, "r".into())).unwrap();
        assert_eq!(back.vote, req.vote);
        assert_eq!(back.prev_log_id, req.prev_log_id);
        assert_eq!(back.entries, req.entries);
        assert_eq!(back.leader_commit, None);
    }

    #[test]
    fn a_voter_without_an_address_is_malformed() {
        let pb = pb::Membership {
            configs: vec![pb::NodeIdSet {
                node_ids: vec![1, 2],
            }],
            nodes: [(1, peer_to(&member(1)))].into(),
        };
        let e = membership_from(pb).unwrap_err();
        assert!(e.0.contains("voter 2"), "{e}");
    }
}
