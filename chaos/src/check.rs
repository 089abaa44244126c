//! Checkers: properties of the recorded history and of the nodes' final
//! state. Each gives a verdict with the evidence a person needs to follow
//! it up (op ids, heights, node names).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::workload::{DEADLINE, History, Op, OpKind, StageSample};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    /// e.g. "safety: acknowledged writes on the chain exactly once".
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

impl Check {
    fn new(name: &str, problems: &[String], ok: String) -> Self {
        Self {
            name: name.to_owned(),
            passed: problems.is_empty(),
            detail: if problems.is_empty() {
                ok
            } else {
                let mut d = problems
                    .iter()
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ");
                if problems.len() > 8 {
                    d.push_str(&format!("; … {} in all", problems.len()));
                }
                d
            },
        }
    }
}

/// The chain as one node holds it: the note texts of its blocks (with
/// their heights), as read at the end of the run.
#[derive(Debug, Default, Clone)]
pub struct ChainNotes {
    pub node: String,
    pub first_height: u64,
    pub notes: Vec<(u64, String)>,
}

/// Every acknowledged note is on the chain exactly once; no note (acked
/// or not) is there twice.
pub fn acked_writes(ops: &[Op], chain: &ChainNotes) -> Check {
    let mut count: HashMap<&str, Vec<u64>> = HashMap::new();
    for (h, text) in &chain.notes {
        count.entry(text.as_str()).or_default().push(*h);
    }
    let mut problems = Vec::new();
    let mut acked = 0;
    for op in ops.iter().filter(|o| o.kind == OpKind::Note) {
        let at = count.get(op.key.as_str()).map_or(&[][..], Vec::as_slice);
        if op.ok {
            acked += 1;
            if at.is_empty() {
                problems.push(format!(
                    "op {} ({:?} through {}, acknowledged: {}) is not on {}'s chain",
                    op.id, op.key, op.node, op.detail, chain.node
                ));
            }
        }
        if at.len() > 1 {
            problems.push(format!(
                "op {} ({:?}) is on the chain {} times, at heights {at:?}",
                op.id,
                op.key,
                at.len()
            ));
        }
    }
    let unacked_landed = ops
        .iter()
        .filter(|o| o.kind == OpKind::Note && !o.ok && count.contains_key(o.key.as_str()))
        .count();
    Check::new(
        "safety: acknowledged writes are on the chain exactly once",
        &problems,
        format!(
            "{acked} acknowledged notes each found once on {}'s chain (from height {}); {unacked_landed} unacknowledged ones landed (allowed: their outcome was unknown to the client)",
            chain.node, chain.first_height
        ),
    )
}

/// The nodes' final chain heads (height, hash), and at a common height,
/// each node's block hash there; plus each node's `VerifyChain` verdict.
#[derive(Debug, Default, Clone)]
pub struct FinalChains {
    /// node → (verify ok, problem)
    pub verified: BTreeMap<String, (bool, String)>,
    /// node → hash at `common_height`
    pub at_common: BTreeMap<String, String>,
    pub common_height: u64,
    /// node → (height, hash) of its head
    pub heads: BTreeMap<String, (u64, String)>,
}

pub fn chains_agree(f: &FinalChains, live: usize) -> Check {
    let mut problems = Vec::new();
    for (node, (ok, problem)) in &f.verified {
        if !ok {
            problems.push(format!("{node}: chain verify failed: {problem}"));
        }
    }
    if f.verified.len() < live {
        problems.push(format!(
            "only {} of {live} live nodes answered VerifyChain",
            f.verified.len()
        ));
    }
    let hashes: BTreeSet<&String> = f.at_common.values().collect();
    if hashes.len() > 1 {
        problems.push(format!(
            "block hashes differ at height {}: {:?}",
            f.common_height, f.at_common
        ));
    }
    if f.at_common.len() < live {
        problems.push(format!(
            "only {} of {live} nodes had block {}",
            f.at_common.len(),
            f.common_height
        ));
    }
    Check::new(
        "safety: every node's chain verifies and all agree",
        &problems,
        format!(
            "{} nodes verified their chains; all hold the same block at height {} (so, hash-linked, the same chain up to it); heads: {}",
            f.verified.len(),
            f.common_height,
            f.heads
                .iter()
                .map(|(n, (h, _))| format!("{n}@{h}"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    )
}

/// No two nodes ever said they led the same term.
pub fn one_leader_per_term(h: &History) -> Check {
    let mut by_term: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
    for s in h.status.iter().filter(|s| s.is_leader) {
        by_term.entry(s.term).or_default().insert(&s.node);
    }
    let problems: Vec<String> = by_term
        .iter()
        .filter(|(_, n)| n.len() > 1)
        .map(|(t, n)| format!("term {t} had leaders {n:?}"))
        .collect();
    Check::new(
        "safety: at most one leader per term",
        &problems,
        format!(
            "{} terms seen with a leader, one each ({} status samples)",
            by_term.len(),
            h.status.len()
        ),
    )
}

/// A linearizable read sees every token whose creation was acknowledged
/// before the read began, unless a revoke of it had started by the time
/// the read ended; and never a token whose revoke was acknowledged before
/// the read began.
pub fn linearizable_reads(ops: &[Op]) -> Check {
    let creates: Vec<&Op> = ops
        .iter()
        .filter(|o| o.kind == OpKind::CreateToken && o.ok)
        .collect();
    let revokes: Vec<&Op> = ops
        .iter()
        .filter(|o| o.kind == OpKind::RevokeToken)
        .collect();
    let mut problems = Vec::new();
    let mut reads = 0;
    for r in ops.iter().filter(|o| o.kind == OpKind::ReadTokens && o.ok) {
        reads += 1;
        let seen: BTreeSet<&str> = r.detail.split_whitespace().collect();
        for c in creates.iter().filter(|c| c.end_ms < r.start_ms) {
            let revoking = revokes
                .iter()
                .any(|v| v.key == c.key && v.start_ms < r.end_ms);
            if !revoking && !seen.contains(c.key.as_str()) {
                problems.push(format!(
                    "read op {} through {} at {:.0} ms missed token {} (created, acknowledged, by op {} at {:.0} ms)",
                    r.id, r.node, r.start_ms, c.key, c.id, c.end_ms
                ));
            }
        }
        for v in revokes.iter().filter(|v| v.ok && v.end_ms < r.start_ms) {
            if seen.contains(v.key.as_str()) {
                problems.push(format!(
                    "read op {} through {} at {:.0} ms still saw token {} (revoked, acknowledged, by op {} at {:.0} ms)",
                    r.id, r.node, r.start_ms, v.key, v.id, v.end_ms
                ));
            }
        }
    }
    Check::new(
        "safety: linearizable reads miss no acknowledged write",
        &problems,
        format!(
            "{reads} linearizable reads checked against {} acknowledged creates and {} revokes",
            creates.len(),
            revokes.len()
        ),
    )
}

/// Every node ends with the same token set, which holds every acknowledged
/// create that no revoke touched and no acknowledged revoke.
pub fn final_tokens(ops: &[Op], finals: &BTreeMap<String, BTreeSet<String>>, tag: &str) -> Check {
    let mut problems = Vec::new();
    let sets: BTreeSet<&BTreeSet<String>> = finals.values().collect();
    if sets.len() > 1 {
        problems.push(format!("nodes end with different token sets: {finals:?}"));
    }
    if let Some((node, set)) = finals.iter().next() {
        for c in ops.iter().filter(|o| o.kind == OpKind::CreateToken && o.ok) {
            let touched = ops
                .iter()
                .any(|v| v.kind == OpKind::RevokeToken && v.key == c.key);
            if !touched && !set.contains(&c.key) {
                problems.push(format!("{node} lacks token {} (op {})", c.key, c.id));
            }
        }
        for v in ops.iter().filter(|o| o.kind == OpKind::RevokeToken && o.ok) {
            if set.contains(&v.key) {
                problems.push(format!(
                    "{node} still has revoked token {} (op {})",
                    v.key, v.id
                ));
            }
        }
        let ours = set.iter().filter(|t| t.contains(tag)).count();
        if problems.is_empty() {
            return Check::new(
                "safety: final token sets agree and hold every acknowledged change",
                &problems,
                format!(
                    "{} nodes hold the same {} tokens of this run",
                    finals.len(),
                    ours
                ),
            );
        }
    }
    if finals.is_empty() {
        problems.push("no node answered ListTokens at the end".into());
    }
    Check::new(
        "safety: final token sets agree and hold every acknowledged change",
        &problems,
        String::new(),
    )
}

/// Every node ends with the same models of this run; each acknowledged
/// deploy that no undeploy touched is among them, no acknowledged
/// undeploy's model is, and each one there had a deploy call (acknowledged
/// or not: a failed call may have landed). `finals`: each node's models of
/// this run.
pub fn final_models(ops: &[Op], finals: &BTreeMap<String, BTreeSet<String>>) -> Check {
    const NAME: &str = "safety: final deployments agree and hold every acknowledged change";
    let mut problems = Vec::new();
    let sets: BTreeSet<&BTreeSet<String>> = finals.values().collect();
    if sets.len() > 1 {
        problems.push(format!("nodes end with different models: {finals:?}"));
    }
    let Some((node, set)) = finals.iter().next() else {
        return Check::new(
            NAME,
            &["no node answered GetPlacement at the end".into()],
            String::new(),
        );
    };
    let of = |kind: OpKind| ops.iter().filter(move |o| o.kind == kind);
    for d in of(OpKind::Deploy).filter(|o| o.ok) {
        let touched = of(OpKind::Undeploy).any(|u| u.key == d.key);
        if !touched && !set.contains(&d.key) {
            problems.push(format!(
                "{node} lacks model {} (deploy op {} through {}, acknowledged: {})",
                d.key, d.id, d.node, d.detail
            ));
        }
    }
    for u in of(OpKind::Undeploy).filter(|o| o.ok) {
        if set.contains(&u.key) {
            problems.push(format!(
                "{node} still has undeployed model {} (op {})",
                u.key, u.id
            ));
        }
    }
    for m in set {
        if !of(OpKind::Deploy).any(|d| &d.key == m) {
            problems.push(format!("{node} has model {m}, which no call deployed"));
        }
    }
    let deploys = of(OpKind::Deploy).filter(|o| o.ok).count();
    let undeploys = of(OpKind::Undeploy).filter(|o| o.ok).count();
    Check::new(
        NAME,
        &problems,
        format!(
            "{} nodes hold the same {} models of this run ({deploys} deploys and {undeploys} undeploys acknowledged)",
            finals.len(),
            set.len()
        ),
    )
}

/// How far before a request began and after it ended a placement sample
/// may show a node holding a slot for that node to count as a holder while
/// the request ran: the samples come every 250 ms or more, and a request
/// routed just before a move may run on the old holder. A node in touch
/// with the leader learns of a move when the leader's next message brings
/// the commit (up to a heartbeat, 500 ms with the WAN profile, plus the
/// one-way delay: up to ~110 ms simulated and up to 350 ms more under the
/// latency fault) and stops serving the slot once it has applied it; a node
/// out of touch stops when its serving lease (half of `down_after`) runs
/// out. Soak seed 21 on 8b5f271: us-west-1, its link to the leader slowed
/// by the latency fault, served 0.8-1.1 s after a rebalancing move (the old
/// bound, 1 s, was too tight for that).
pub const HOLDER_BEFORE_MS: f64 = 2000.0;
pub const HOLDER_AFTER_MS: f64 = 2000.0;

/// What a node logs when it finds its data dir put back from an old copy.
pub const RESTORE_FOUND: &str = "it was put back from an old copy";

/// Every node put back from an old copy of its data dir (`restores`: node →
/// how many times) found out at start: its log names the restore at least
/// as often. One that did not would have voted with a log that forgot what
/// it acknowledged.
pub fn restores_found(
    restores: &BTreeMap<String, usize>,
    logs: &BTreeMap<String, String>,
) -> Check {
    let mut missed = Vec::new();
    for (node, n) in restores {
        let found = logs
            .get(node)
            .map_or(0, |l| l.matches(RESTORE_FOUND).count());
        if found < *n {
            missed.push(format!("{node}: put back {n}×, found {found}×"));
        }
    }
    Check {
        name: "safety: a node put back from an old copy of its data dir finds out before it votes"
            .into(),
        passed: missed.is_empty(),
        detail: if missed.is_empty() {
            format!(
                "{} restore(s), each found at start",
                restores.values().sum::<usize>()
            )
        } else {
            missed.join("; ")
        },
    }
}

/// A fenced stage never serves: the node that finished each completed
/// request (the last on its path; those before it failed over) held a slot
/// of the model in some placement sample (the leader's view) from
/// [`HOLDER_BEFORE_MS`] before the request began to [`HOLDER_AFTER_MS`]
/// after it ended. A node whose slot moved to another node (a new
/// generation there) and that went on serving the old one fails this.
/// Requests with no sample in their window are not judged (counted).
pub fn fenced_stages(ops: &[Op], stages: &[StageSample]) -> Check {
    let mut problems = Vec::new();
    let (mut judged, mut unjudged, mut no_path) = (0, 0, 0);
    for g in ops.iter().filter(|o| o.kind == OpKind::Generate && o.ok) {
        let Some(node) = g.path.last() else {
            no_path += 1;
            continue;
        };
        let window: Vec<&StageSample> = stages
            .iter()
            .filter(|s| {
                s.t_ms >= g.start_ms - HOLDER_BEFORE_MS && s.t_ms <= g.end_ms + HOLDER_AFTER_MS
            })
            .collect();
        if window.is_empty() {
            unjudged += 1;
            continue;
        }
        judged += 1;
        if !window.iter().any(|s| s.on.contains(node)) {
            let last = stages
                .iter()
                .rev()
                .find(|s| s.t_ms <= g.start_ms && s.on.contains(node))
                .map_or("never before".to_owned(), |s| {
                    format!("last at {:.1} s", s.t_ms / 1000.0)
                });
            problems.push(format!(
                "op {} ({:.1}-{:.1} s, through {}) was served by node {node}, which held no slot then (the placement had it {last})",
                g.id,
                g.start_ms / 1000.0,
                g.end_ms / 1000.0,
                g.node
            ));
        }
    }
    if no_path > 0 {
        problems.push(format!(
            "{no_path} completed requests reported no path (the nodes that served them)"
        ));
    }
    Check::new(
        "safety: a fenced (moved-away) stage never serves",
        &problems,
        format!(
            "each of {judged} completed requests was finished by a node that held a slot then ({unjudged} had no placement sample near them)"
        ),
    )
}

/// gRPC codes a client may retry (documented in the README's chaos section).
pub const RETRYABLE: [&str; 4] = [
    "Unavailable",
    "ResourceExhausted",
    "DeadlineExceeded",
    "Aborted",
];

/// A node's process down or frozen from `start_ms` to `end_ms`.
#[derive(Debug, Clone)]
pub struct Outage {
    pub node: String,
    pub start_ms: f64,
    pub end_ms: f64,
}

/// Inference: completed requests match the fault-free answers; failures
/// are retryable; nothing outlives its deadline. A request whose own entry
/// node was killed or frozen under it may fail with whatever the transport
/// says (a reset connection is `Unknown` in tonic): the client must retry
/// elsewhere, as with any lost server; those are counted apart.
pub fn serving(ops: &[Op], baseline: &[String], outages: &[Outage]) -> Vec<Check> {
    let gens: Vec<&Op> = ops.iter().filter(|o| o.kind == OpKind::Generate).collect();
    let mut wrong = Vec::new();
    let mut bad_errors = Vec::new();
    let mut hangs = Vec::new();
    let mut entry_lost = 0;
    let grace = 5_000.0;
    for g in &gens {
        let p: usize = g.key.parse().unwrap_or(usize::MAX);
        if g.ok {
            if baseline.get(p) != Some(&g.detail) {
                wrong.push(format!(
                    "op {} through {}: {:?}, fault-free: {:?}",
                    g.id,
                    g.node,
                    g.detail,
                    baseline.get(p)
                ));
            }
        } else if outages
            .iter()
            .any(|o| o.node == g.node && o.start_ms < g.end_ms && o.end_ms > g.start_ms)
        {
            entry_lost += 1;
        } else if !RETRYABLE.contains(&g.code.as_str()) {
            bad_errors.push(format!(
                "op {} through {}: {} {}",
                g.id, g.node, g.code, g.detail
            ));
        }
        if g.end_ms - g.start_ms > DEADLINE.as_millis() as f64 + grace {
            hangs.push(format!(
                "op {} through {} took {:.1} s",
                g.id,
                g.node,
                (g.end_ms - g.start_ms) / 1000.0
            ));
        }
    }
    let ok = gens.iter().filter(|g| g.ok).count();
    let failed = gens.len() - ok;
    let mut codes: BTreeMap<&str, usize> = BTreeMap::new();
    for g in gens.iter().filter(|g| !g.ok) {
        *codes.entry(&g.code).or_default() += 1;
    }
    // Admin calls must not hang either.
    for o in ops.iter().filter(|o| o.kind != OpKind::Generate) {
        if o.end_ms - o.start_ms > crate::workload::ADMIN_DEADLINE.as_millis() as f64 + grace {
            hangs.push(format!(
                "op {} ({:?}) through {} took {:.1} s",
                o.id,
                o.kind,
                o.node,
                (o.end_ms - o.start_ms) / 1000.0
            ));
        }
    }
    vec![
        Check::new(
            "serving: completed requests equal the fault-free greedy output",
            &wrong,
            format!(
                "{ok} of {} requests completed, each with the fault-free text",
                gens.len()
            ),
        ),
        Check::new(
            "serving: failed requests fail with a retryable code",
            &bad_errors,
            format!(
                "{failed} failed: {entry_lost} because the node the client talked to was killed or frozen under it; the others with retryable codes. All codes: {codes:?}"
            ),
        ),
        Check::new(
            "serving: no request outlives its deadline",
            &hangs,
            format!(
                "every request ended within its deadline ({} s inference, {} s admin) plus 5 s",
                DEADLINE.as_secs(),
                crate::workload::ADMIN_DEADLINE.as_secs()
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::StatusSample;

    fn op(id: u64, kind: OpKind, key: &str, start: f64, end: f64, ok: bool, detail: &str) -> Op {
        Op {
            id,
            kind,
            node: "n".into(),
            start_ms: start,
            end_ms: end,
            key: key.into(),
            ok,
            code: if ok {
                "Ok".into()
            } else {
                "Unavailable".into()
            },
            detail: detail.into(),
            path: Vec::new(),
        }
    }

    #[test]
    fn a_request_served_by_a_node_whose_slot_moved_is_caught() {
        let sample = |t_ms: f64, on: &[u64]| StageSample {
            t_ms,
            ready: on.len(),
            total: on.len(),
            on: on.to_vec(),
        };
        // Node 1's slot moves to node 3 at 10 s.
        let stages: Vec<StageSample> = (0..40)
            .map(|i| {
                let t = f64::from(i) * 500.0;
                sample(t, if t < 10_000.0 { &[1, 2] } else { &[3, 2] })
            })
            .collect();
        let served = |id: u64, start: f64, path: &[u64]| Op {
            path: path.to_vec(),
            ..op(id, OpKind::Generate, "0", start, start + 300.0, true, "x")
        };
        // Before the move, across it, by the new holder, and after failing
        // over from the old one: fine.
        let ok = vec![
            served(1, 2_000.0, &[1]),
            served(2, 9_800.0, &[1]),
            served(3, 12_000.0, &[3]),
            served(4, 12_000.0, &[2]),
            served(5, 14_000.0, &[1, 3]),
        ];
        assert!(fenced_stages(&ok, &stages).passed);
        // Node 1 serving well after its slot moved: fenced, caught.
        let mut bad = ok.clone();
        bad.push(served(6, 14_000.0, &[1]));
        let c = fenced_stages(&bad, &stages);
        assert!(!c.passed && c.detail.contains("op 6"), "{}", c.detail);
        // A completed request without its path cannot be judged: a failure.
        let mut blind = ok;
        blind.push(served(7, 3_000.0, &[]));
        assert!(!fenced_stages(&blind, &stages).passed);
    }

    #[test]
    fn final_models_hold_acknowledged_deploys_and_lack_acknowledged_undeploys() {
        let ops = vec![
            op(1, OpKind::Deploy, "m0", 0.0, 1.0, true, ""),
            op(2, OpKind::Deploy, "m1", 2.0, 3.0, true, ""),
            op(3, OpKind::Undeploy, "m0", 4.0, 5.0, true, ""),
            op(4, OpKind::Deploy, "m2", 6.0, 7.0, false, ""),
            op(5, OpKind::Deploy, "m3", 8.0, 9.0, true, ""),
            op(6, OpKind::Undeploy, "m3", 10.0, 11.0, false, ""),
        ];
        let set =
            |names: &[&str]| -> BTreeSet<String> { names.iter().map(|n| n.to_string()).collect() };
        let finals = |names: &[&str]| -> BTreeMap<String, BTreeSet<String>> {
            [("a".to_string(), set(names)), ("b".to_string(), set(names))].into()
        };
        // m2's deploy failed and m3's undeploy failed: either way is right.
        assert!(final_models(&ops, &finals(&["m1"])).passed);
        assert!(final_models(&ops, &finals(&["m1", "m2", "m3"])).passed);
        // An acknowledged deploy lost, an acknowledged undeploy undone, a
        // model nobody deployed, two nodes that disagree, no answer.
        assert!(!final_models(&ops, &finals(&[])).passed);
        assert!(!final_models(&ops, &finals(&["m0", "m1"])).passed);
        assert!(!final_models(&ops, &finals(&["m1", "m9"])).passed);
        let split: BTreeMap<String, BTreeSet<String>> = [
            ("a".to_string(), set(&["m1"])),
            ("b".to_string(), set(&["m1", "m2"])),
        ]
        .into();
        assert!(!final_models(&ops, &split).passed);
        assert!(!final_models(&ops, &BTreeMap::new()).passed);
    }

    #[test]
    fn a_lost_or_doubled_write_fails_and_an_unknown_one_may_land() {
        let ops = vec![
            op(1, OpKind::Note, "a", 0.0, 1.0, true, ""),
            op(2, OpKind::Note, "b", 0.0, 1.0, false, ""),
            op(3, OpKind::Note, "c", 0.0, 1.0, true, ""),
        ];
        let mut chain = ChainNotes {
            node: "n".into(),
            first_height: 1,
            notes: vec![(1, "a".into()), (2, "b".into()), (3, "c".into())],
        };
        assert!(acked_writes(&ops, &chain).passed);
        chain.notes.retain(|(_, t)| t != "c");
        let c = acked_writes(&ops, &chain);
        assert!(!c.passed && c.detail.contains("op 3"), "{}", c.detail);
        chain.notes.push((4, "c".into()));
        chain.notes.push((5, "a".into()));
        assert!(!acked_writes(&ops, &chain).passed);
    }

    #[test]
    fn two_leaders_in_one_term_fail() {
        let s = |node: &str, term| StatusSample {
            t_ms: 0.0,
            node: node.into(),
            term,
            leader_id: 1,
            is_leader: true,
            chain_height: 0,
            head: String::new(),
            nodes_up: 1,
            nodes_total: 1,
        };
        let mut h = History {
            status: vec![s("a", 1), s("b", 2), s("a", 1)],
            ..Default::default()
        };
        assert!(one_leader_per_term(&h).passed);
        h.status.push(s("b", 1));
        assert!(!one_leader_per_term(&h).passed);
    }

    #[test]
    fn a_restore_the_node_did_not_log_fails() {
        let restores = BTreeMap::from([("a".to_string(), 2usize)]);
        let line = format!(
            "ERROR this node's data dir is older than its last start: {RESTORE_FOUND} (a backup)\n"
        );
        let once = BTreeMap::from([("a".to_string(), line.clone())]);
        assert!(!restores_found(&restores, &once).passed);
        let twice = BTreeMap::from([("a".to_string(), line.repeat(2))]);
        assert!(restores_found(&restores, &twice).passed);
        assert!(!restores_found(&restores, &BTreeMap::new()).passed);
    }

    #[test]
    fn a_stale_read_fails() {
        let mut ops = vec![
            op(1, OpKind::CreateToken, "t1", 0.0, 10.0, true, ""),
            op(2, OpKind::ReadTokens, "", 20.0, 30.0, true, "root t1"),
            // Concurrent with the create: may or may not see it.
            op(3, OpKind::CreateToken, "t2", 25.0, 40.0, true, ""),
        ];
        assert!(linearizable_reads(&ops).passed);
        ops.push(op(4, OpKind::ReadTokens, "", 50.0, 60.0, true, "root t1"));
        let c = linearizable_reads(&ops);
        assert!(!c.passed && c.detail.contains("t2"), "{}", c.detail);
        // A revoke in flight excuses a missing token; an acknowledged one
        // forbids seeing it.
        let ops = vec![
            op(1, OpKind::CreateToken, "t1", 0.0, 10.0, true, ""),
            op(2, OpKind::RevokeToken, "t1", 15.0, 40.0, false, ""),
            op(3, OpKind::ReadTokens, "", 20.0, 30.0, true, "root"),
            op(4, OpKind::RevokeToken, "t1", 41.0, 45.0, true, ""),
            op(5, OpKind::ReadTokens, "", 50.0, 60.0, true, "root t1"),
        ];
        let c = linearizable_reads(&ops);
        assert!(!c.passed && c.detail.contains("op 5"), "{}", c.detail);
    }

    #[test]
    fn wrong_text_a_bad_code_or_a_hang_fails() {
        let base = vec!["x".to_string()];
        let mut ops = vec![
            op(1, OpKind::Generate, "0", 0.0, 10.0, true, "x"),
            op(2, OpKind::Generate, "0", 0.0, 10.0, false, "cut off"),
        ];
        assert!(serving(&ops, &base, &[]).iter().all(|c| c.passed));
        // Any code goes when the entry node itself died under the request.
        let lost = Op {
            code: "Unknown".into(),
            node: "dead".into(),
            ..op(
                9,
                OpKind::Generate,
                "0",
                5.0,
                10.0,
                false,
                "h2 protocol error",
            )
        };
        let outage = Outage {
            node: "dead".into(),
            start_ms: 8.0,
            end_ms: 20.0,
        };
        assert!(
            serving(
                std::slice::from_ref(&lost),
                &base,
                std::slice::from_ref(&outage)
            )[1]
            .passed
        );
        assert!(
            !serving(
                &[lost],
                &base,
                &[Outage {
                    node: "other".into(),
                    ..outage
                }]
            )[1]
            .passed
        );
        ops.push(op(3, OpKind::Generate, "0", 0.0, 10.0, true, "y"));
        ops.push(Op {
            code: "Internal".into(),
            ..op(4, OpKind::Generate, "0", 0.0, 10.0, false, "boom")
        });
        ops.push(op(5, OpKind::Generate, "0", 0.0, 60_000.0, false, "slow"));
        let c = serving(&ops, &base, &[]);
        assert!(c.iter().all(|c| !c.passed), "{c:?}");
    }
}
