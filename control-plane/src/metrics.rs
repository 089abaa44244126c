//! Every metric the control plane sets. Names are a contract
//! (ARCHITECTURE.md): dashboards, alerts and runbooks use them. The node
//! installs the recorder and describes them (`trine_node::metrics`).

use std::time::Duration;

pub const CHAIN_HEIGHT: &str = "trine_chain_height";
pub const CHAIN_SYNC_RATIO: &str = "trine_chain_sync_ratio";
pub const CHAIN_TXS: &str = "trine_chain_txs_total";
pub const CHAIN_PENDING_TXS: &str = "trine_chain_pending_txs";
pub const RAFT_TERM: &str = "trine_raft_term";
pub const RAFT_IS_LEADER: &str = "trine_raft_is_leader";
pub const RAFT_QUORUM_ACK_AGE: &str = "trine_raft_quorum_ack_age_seconds";
pub const RAFT_COMMIT_DURATION: &str = "trine_raft_commit_duration_seconds";
pub const RAFT_APPLIED_LAG: &str = "trine_raft_applied_lag";
pub const RAFT_SNAPSHOTS: &str = "trine_raft_snapshots_total";
pub const RAFT_VOTERS: &str = "trine_raft_voters";
pub const RAFT_MEMBERS: &str = "trine_raft_members";
pub const RAFT_RPC_FAILURES: &str = "trine_raft_rpc_failures_total";
pub const RAFT_REFUSED: &str = "trine_raft_refused_total";
pub const RAFT_DUPLICATES: &str = "trine_raft_duplicate_groups_total";
pub const RAFT_VOTING: &str = "trine_raft_voting";
pub const RAFT_STALE_STARTS: &str = "trine_raft_stale_starts_total";
/// Described by the node (`trine_node::metrics`), set here on every reload.
pub const CERT_EXPIRY: &str = "trine_cert_expiry_seconds";
pub const PLACEMENT_MOVES: &str = "trine_placement_moves_total";
pub const STAGE_RECOVERY: &str = "trine_stage_recovery_seconds";

/// The histograms among them (the rest are counters, named `_total`, and
/// gauges).
pub const HISTOGRAMS: &[&str] = &[RAFT_COMMIT_DURATION, STAGE_RECOVERY];

/// (name, help) of every metric above, for the node to describe.
pub const DESCRIPTIONS: &[(&str, &str)] = &[
    (
        CHAIN_HEIGHT,
        "Height of the newest block this node has applied",
    ),
    (
        CHAIN_SYNC_RATIO,
        "Applied index over the highest commit index known (1 = in sync)",
    ),
    (CHAIN_TXS, "Transactions applied to this node's chain"),
    (
        CHAIN_PENDING_TXS,
        "Commands proposed through this node and not yet applied, plus request receipts waiting for their batch",
    ),
    (RAFT_TERM, "Current Raft term"),
    (
        RAFT_IS_LEADER,
        "1 while this node is the Raft leader and a majority acknowledged it within the longest election timeout",
    ),
    (
        RAFT_QUORUM_ACK_AGE,
        "On a node in the leader role: time since a majority last acknowledged it (0 on others)",
    ),
    (
        RAFT_COMMIT_DURATION,
        "Time from proposing a command to its application, on the proposing node",
    ),
    (
        RAFT_APPLIED_LAG,
        "Log entries known committed but not yet applied here",
    ),
    (
        RAFT_SNAPSHOTS,
        "Snapshots built or installed by this node, by event",
    ),
    (RAFT_VOTERS, "Voters in the current Raft membership"),
    (
        RAFT_MEMBERS,
        "Members (voters and learners) in the current Raft membership",
    ),
    (RAFT_RPC_FAILURES, "Raft RPCs to a peer that failed, by RPC"),
    (
        RAFT_REFUSED,
        "Raft calls (and forwarded writes) this member refused, by RPC and reason (identity: the caller's certificate does not name the node it claims to be, or no member; token: a client's write or another node's removal without a valid admin token; command: a command the sender may not write in its own name)",
    ),
    (
        RAFT_DUPLICATES,
        "Groups of writes sent again (their sender's leader stepped down before answering) that this member found already committed and answered from its record instead of applying twice",
    ),
    (
        RAFT_VOTING,
        "1 once this member votes and campaigns: its start is confirmed with its peers and, after a restore from an old copy of its data dir, it has caught up",
    ),
    (
        RAFT_STALE_STARTS,
        "Starts at which this member found its data dir put back from a copy older than its last start (it stays out of elections until it has caught up)",
    ),
    (
        PLACEMENT_MOVES,
        "Placement changes the leader's planner committed, by kind (place: a new slot; move: a slot to another node; unplace: a slot left empty; rebalance: a slot moved to improve the layout)",
    ),
    (
        STAGE_RECOVERY,
        "On the leader: time from a node's last answer to each of its stages being ready on another node (detection, planning and load)",
    ),
];

/// Buckets of the commit-duration histogram: 250 µs … 10 s.
pub const COMMIT_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of the stage-recovery histogram: 250 ms … 10 min.
pub const RECOVERY_BUCKETS: &[f64] = &[
    0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

pub(crate) fn stage_recovered(took: Duration) {
    metrics::histogram!(STAGE_RECOVERY).record(took.as_secs_f64());
}

pub(crate) fn rebalanced(n: usize) {
    metrics::counter!(PLACEMENT_MOVES, "kind" => "rebalance").increment(n as u64);
}

pub(crate) fn chain_applied(height: u64, txs: u64) {
    metrics::gauge!(CHAIN_HEIGHT).set(height as f64);
    metrics::counter!(CHAIN_TXS).increment(txs);
}

pub(crate) fn snapshot(event: &'static str) {
    metrics::counter!(RAFT_SNAPSHOTS, "event" => event).increment(1);
}

pub(crate) fn commit(took: Duration) {
    metrics::histogram!(RAFT_COMMIT_DURATION).record(took.as_secs_f64());
}

pub(crate) fn pending(delta: f64) {
    metrics::gauge!(CHAIN_PENDING_TXS).increment(delta);
}

pub(crate) fn cert_expiry(unix_seconds: i64) {
    metrics::gauge!(CERT_EXPIRY, "cert" => "raft").set(unix_seconds as f64);
}

pub(crate) fn raft_refused(rpc: &'static str, reason: &'static str) {
    metrics::counter!(RAFT_REFUSED, "rpc" => rpc, "reason" => reason).increment(1);
}

pub(crate) fn voting(on: bool) {
    metrics::gauge!(RAFT_VOTING).set(if on { 1.0 } else { 0.0 });
}

pub(crate) fn stale_start() {
    metrics::counter!(RAFT_STALE_STARTS).increment(1);
}

pub(crate) fn duplicate_group() {
    metrics::counter!(RAFT_DUPLICATES).increment(1);
}

pub(crate) fn rpc_failure(rpc: &'static str) {
    metrics::counter!(RAFT_RPC_FAILURES, "rpc" => rpc).increment(1);
}

/// From openraft's metrics, after each change (a leader's change at every
/// heartbeat tick). openraft 0.9 does not expose the commit index on
/// followers: the last log index stands in.
///
/// A leader counts as one only while a majority has acknowledged it within
/// `lease`: one cut off from its quorum keeps the role in openraft until it
/// hears a higher term, but cannot commit, and NoRaftLeader must see that.
pub(crate) fn raft(m: &openraft::RaftMetrics<crate::NodeId, crate::Member>, lease: Duration) {
    let applied = m.last_applied.map_or(0, |l| l.index);
    let commit_known = m.last_log_index.unwrap_or(0);
    metrics::gauge!(RAFT_TERM).set(m.current_term as f64);
    let ack_age = m.millis_since_quorum_ack.map(Duration::from_millis);
    metrics::gauge!(RAFT_IS_LEADER).set(if leading(m, lease) { 1.0 } else { 0.0 });
    if m.state.is_leader() {
        metrics::gauge!(RAFT_QUORUM_ACK_AGE)
            .set(ack_age.map_or(f64::INFINITY, |a| a.as_secs_f64()));
    } else {
        metrics::gauge!(RAFT_QUORUM_ACK_AGE).set(0.0);
    }
    metrics::gauge!(RAFT_APPLIED_LAG).set(commit_known.saturating_sub(applied) as f64);
    let ratio = if commit_known == 0 {
        1.0
    } else {
        (applied as f64 / commit_known as f64).min(1.0)
    };
    metrics::gauge!(CHAIN_SYNC_RATIO).set(ratio);
    let membership = m.membership_config.membership();
    metrics::gauge!(RAFT_VOTERS).set(membership.voter_ids().count() as f64);
    metrics::gauge!(RAFT_MEMBERS).set(membership.nodes().count() as f64);
}

/// In the leader role and acknowledged by a majority within `lease`.
fn leading(m: &openraft::RaftMetrics<crate::NodeId, crate::Member>, lease: Duration) -> bool {
    m.state.is_leader()
        && m.millis_since_quorum_ack
            .is_some_and(|ms| Duration::from_millis(ms) <= lease)
}

/// Counts one planner command, classified against the state it changes.
pub fn placement_change(command: &crate::Command, state: &crate::State) {
    let kind = match command {
        crate::Command::Place {
            model,
            replica,
            stage,
            ..
        } if state
            .placements
            .contains_key(&(model.clone(), *replica, *stage)) =>
        {
            "move"
        }
        crate::Command::Place { .. } => "place",
        crate::Command::Unplace { .. } => "unplace",
        _ => "other",
    };
    metrics::counter!(PLACEMENT_MOVES, "kind" => kind).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_counts_only_while_a_majority_acknowledges_it() {
        let lease = Duration::from_millis(600);
        let mut m = openraft::RaftMetrics::<crate::NodeId, crate::Member>::new_initial(1);
        m.state = openraft::ServerState::Leader;
        m.millis_since_quorum_ack = Some(100);
        assert!(leading(&m, lease));
        m.millis_since_quorum_ack = Some(600);
        assert!(leading(&m, lease));
        // Cut off from its quorum: still "Leader" in openraft, not to us.
        m.millis_since_quorum_ack = Some(601);
        assert!(!leading(&m, lease));
        m.millis_since_quorum_ack = None;
        assert!(!leading(&m, lease));
        m.state = openraft::ServerState::Follower;
        m.millis_since_quorum_ack = Some(0);
        assert!(!leading(&m, lease));
    }
}
