//! Which node serves which stage of which model: a pure function of the
//! state and the nodes' health (STYLE.md #2) — no I/O, no clock — so it is
//! property-tested alone and every replica of the state machine would
//! compute the same plan.
//!
//! Rules, in order:
//! 1. A slot (model, replica, stage) goes only to a live, up node in one of
//!    the model's regions with the memory for it; no node is given more
//!    than its capacity.
//! 2. Healthy assignments stay put (minimal movement): a slot moves only
//!    when its node died, left, or no longer has the room.
//! 3. Replicas of one model go to distinct regions while regions remain,
//!    then to distinct nodes; the stages of one replica prefer its region
//!    (pipeline hops stay local).
//! 4. Among equals, the node with the most free memory, then the lowest id
//!    (deterministic).
//! 5. A slot that cannot be placed anywhere is emptied rather than left on
//!    a dead node, and placed again when room appears.
//! 6. A slot its node failed to load moves to a node where it has not
//!    failed (the placement remembers where it failed until it is ready),
//!    if there is one; otherwise its node keeps retrying.
//!
//! Planning the plan's result gives nothing new (stable). [`rebalance`] is
//! separate and rate-limited by the leader: when a node or region returns,
//! it proposes one move at a time that makes rule 3 better, never a move
//! for memory balance alone.

use std::collections::{BTreeMap, BTreeSet};

use crate::command::{Command, ModelRecord, NodeRecord, NodeStatus, SlotKey, StageState, State};
use crate::types::NodeId;

/// What the failure detector says: the nodes that answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    pub live: BTreeSet<NodeId>,
}

impl Health {
    /// Every node the state records as up.
    pub fn from_state(state: &State) -> Self {
        Self {
            live: state
                .nodes
                .values()
                .filter(|n| n.status == NodeStatus::Up)
                .map(|n| n.id)
                .collect(),
        }
    }
}

/// Bytes of a node's memory that stages may take: 80%, the rest left to
/// the KV cache, activations and the process.
pub fn capacity(node: &NodeRecord) -> u64 {
    node.memory_bytes / 10 * 8
}

/// Layers of `stage`: the model's blocks split evenly, in order.
pub fn layer_range(m: &ModelRecord, stage: u32) -> (u32, u32) {
    let (l, s) = (u64::from(m.layers), u64::from(m.stages.max(1)));
    let at = |i: u64| u32::try_from(i * l / s).unwrap_or(u32::MAX);
    (at(u64::from(stage)), at(u64::from(stage) + 1))
}

/// Memory one stage needs: its blocks, plus the embeddings on the first
/// stage and the (tied) output head on the last one.
pub fn stage_bytes(m: &ModelRecord, stage: u32) -> u64 {
    let (lo, hi) = layer_range(m, stage);
    let mut b = u64::from(hi - lo).saturating_mul(m.bytes_per_layer);
    if stage == 0 {
        b = b.saturating_add(m.fixed_bytes);
    }
    if stage + 1 == m.stages && m.stages > 1 {
        b = b.saturating_add(m.fixed_bytes);
    }
    b
}

/// Where slots sit while a plan is being made: what is kept or placed so
/// far and the memory it takes on each node.
struct Layout<'a> {
    state: &'a State,
    health: &'a Health,
    used: BTreeMap<NodeId, u64>,
    /// Slot → node, for everything kept or newly placed.
    assigned: BTreeMap<SlotKey, NodeId>,
}

/// How well a node suits a slot, lower is better: after "this slot did not
/// fail to load there before", rule 3 (a region no other replica uses; the
/// replica's own region; a node no other replica uses; the region fewest
/// other replicas use; the node fewest of the model's slots use), then
/// rule 4 (most free memory, lowest id).
type Rank = (
    bool,
    bool,
    bool,
    bool,
    usize,
    usize,
    std::cmp::Reverse<u64>,
    NodeId,
);

/// See [`Layout::score`]: (replicas sharing a region, replicas spanning
/// regions, replicas sharing a node), lower is better.
type Score = (usize, usize, usize);

impl<'a> Layout<'a> {
    fn new(state: &'a State, health: &'a Health) -> Self {
        Self {
            state,
            health,
            used: BTreeMap::new(),
            assigned: BTreeMap::new(),
        }
    }

    fn usable(&self, id: NodeId) -> bool {
        self.health.live.contains(&id)
            && self
                .state
                .nodes
                .get(&id)
                .is_some_and(|n| n.status == NodeStatus::Up)
    }

    fn allowed(m: &ModelRecord, n: &NodeRecord) -> bool {
        m.regions.is_empty() || m.regions.contains(&n.region)
    }

    fn region_of(&self, id: NodeId) -> &str {
        self.state.nodes.get(&id).map_or("", |n| n.region.as_str())
    }

    fn free(&self, n: &NodeRecord) -> Option<u64> {
        capacity(n).checked_sub(self.used.get(&n.id).copied().unwrap_or(0))
    }

    fn take(&mut self, slot: SlotKey, node: NodeId, bytes: u64) {
        *self.used.entry(node).or_default() += bytes;
        self.assigned.insert(slot, node);
    }

    fn release(&mut self, slot: &SlotKey, bytes: u64) {
        if let Some(node) = self.assigned.remove(slot)
            && let Some(u) = self.used.get_mut(&node)
        {
            *u = u.saturating_sub(bytes);
        }
    }

    /// Where this model's slots are, as (replica, node), `skip` left out.
    fn model_slots(&self, m: &ModelRecord, skip: &SlotKey) -> Vec<(u32, NodeId)> {
        self.assigned
            .range((m.name.clone(), 0, 0)..)
            .take_while(|((name, _, _), _)| *name == m.name)
            .filter(|(slot, _)| *slot != skip)
            .map(|((_, r, _), n)| (*r, *n))
            .collect()
    }

    /// The best node for `slot` (which must not be assigned), never one in
    /// `exclude`.
    fn best(&self, m: &ModelRecord, slot: &SlotKey, exclude: &[NodeId]) -> Option<NodeId> {
        let (_, replica, stage) = *slot;
        let bytes = stage_bytes(m, stage);
        let mine = self.model_slots(m, slot);
        let failed_on = self
            .state
            .placements
            .get(slot)
            .map_or(&[][..], |p| p.failed_on.as_slice());
        let replica_region = mine
            .iter()
            .find(|(r, _)| *r == replica)
            .map(|(_, n)| self.region_of(*n));
        self.state
            .nodes
            .values()
            .filter(|n| self.usable(n.id) && Self::allowed(m, n) && !exclude.contains(&n.id))
            .filter_map(|n| {
                let free = self.free(n)?.checked_sub(bytes)?;
                let other_replicas_in_region = mine
                    .iter()
                    .filter(|(r, x)| *r != replica && self.region_of(*x) == n.region)
                    .map(|(r, _)| *r)
                    .collect::<BTreeSet<_>>()
                    .len();
                let away = replica_region.is_some_and(|r| r != n.region);
                let on_node = mine.iter().filter(|(_, x)| *x == n.id).count();
                let shared_node = mine.iter().any(|(r, x)| *r != replica && *x == n.id);
                let rank: Rank = (
                    failed_on.contains(&n.id),
                    other_replicas_in_region > 0,
                    away,
                    shared_node,
                    other_replicas_in_region,
                    on_node,
                    std::cmp::Reverse(free),
                    n.id,
                );
                Some(rank)
            })
            .min()
            .map(|rank| rank.7)
    }

    /// How far one model's layout is from rules 3's ideal, compared
    /// lexicographically: replicas sharing a region, replicas spanning more
    /// than one region, replicas sharing a node (stages of one replica on
    /// one node are fine: fewer hops). Memory balance does not count:
    /// a rebalance never moves a stage just to even out free memory.
    fn score(&self, m: &ModelRecord) -> Score {
        let slots = self.model_slots(m, &(String::new(), u32::MAX, u32::MAX));
        let mut by_region: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
        let mut by_replica: BTreeMap<u32, BTreeSet<&str>> = BTreeMap::new();
        let mut by_node: BTreeMap<NodeId, BTreeSet<u32>> = BTreeMap::new();
        for (r, n) in &slots {
            by_region.entry(self.region_of(*n)).or_default().insert(*r);
            by_replica.entry(*r).or_default().insert(self.region_of(*n));
            by_node.entry(*n).or_default().insert(*r);
        }
        let extra = |n: usize| n.saturating_sub(1);
        (
            by_region.values().map(|r| extra(r.len())).sum(),
            by_replica.values().map(|r| extra(r.len())).sum(),
            by_node.values().map(|r| extra(r.len())).sum(),
        )
    }
}

fn place(m: &ModelRecord, slot: &SlotKey, node: NodeId) -> Command {
    let (layer_start, layer_end) = layer_range(m, slot.2);
    Command::Place {
        model: m.name.clone(),
        replica: slot.1,
        stage: slot.2,
        layer_start,
        layer_end,
        node,
    }
}

/// The layout of every valid current placement (rules 1 and 2): kept
/// oldest first, so when a node shrank the newest arrivals move.
fn kept<'a>(state: &'a State, health: &'a Health) -> Layout<'a> {
    let mut layout = Layout::new(state, health);
    let mut current: Vec<_> = state.placements.values().collect();
    current.sort_by_key(|p| p.generation);
    for p in current {
        let Some(m) = state.models.get(&p.model) else {
            continue;
        };
        let Some(n) = state.nodes.get(&p.node) else {
            continue;
        };
        let bytes = stage_bytes(m, p.stage);
        let fits = layout.free(n).is_some_and(|f| f >= bytes);
        if layout.usable(p.node)
            && Layout::allowed(m, n)
            && (p.layer_start, p.layer_end) == layer_range(m, p.stage)
            && fits
        {
            layout.take((p.model.clone(), p.replica, p.stage), p.node, bytes);
        }
    }
    layout
}

/// The commands that bring the placements in line with the rules.
pub fn plan(state: &State, health: &Health) -> Vec<Command> {
    let mut layout = kept(state, health);
    let mut commands = Vec::new();

    // A slot that failed to load moves to a node where it has not failed,
    // if there is one; otherwise it stays and its node retries.
    let failed: Vec<(SlotKey, NodeId)> = state
        .placements
        .iter()
        .filter(|(slot, p)| {
            p.state == StageState::Failed && layout.assigned.get(*slot) == Some(&p.node)
        })
        .map(|(slot, p)| (slot.clone(), p.node))
        .collect();
    // Until nothing moves: one failed slot leaving can make room for another.
    let mut stuck = failed;
    loop {
        let mut moved = false;
        let mut still = Vec::new();
        for (slot, node) in stuck {
            let (Some(m), Some(p)) = (state.models.get(&slot.0), state.placements.get(&slot))
            else {
                continue;
            };
            let bytes = stage_bytes(m, slot.2);
            layout.release(&slot, bytes);
            let mut exclude = p.failed_on.clone();
            exclude.push(node);
            match layout.best(m, &slot, &exclude) {
                Some(to) => {
                    commands.push(place(m, &slot, to));
                    layout.take(slot, to, bytes);
                    moved = true;
                }
                None => {
                    layout.take(slot.clone(), node, bytes);
                    still.push((slot, node));
                }
            }
        }
        stuck = still;
        if !moved {
            break;
        }
    }

    for m in state.models.values() {
        for replica in 0..m.replicas {
            for stage in 0..m.stages {
                let slot = (m.name.clone(), replica, stage);
                if layout.assigned.contains_key(&slot) {
                    continue;
                }
                match layout.best(m, &slot, &[]) {
                    Some(node) => {
                        commands.push(place(m, &slot, node));
                        layout.take(slot, node, stage_bytes(m, stage));
                    }
                    None if state.placements.contains_key(&slot) => {
                        commands.push(Command::Unplace {
                            model: m.name.clone(),
                            replica,
                            stage,
                        });
                    }
                    None => {}
                }
            }
        }
    }
    commands
}

/// One replica moved (all its stages) to make the layout better by
/// rule 3 (see [`Layout::score`]): the best such move, or nothing. A whole
/// replica is the unit because its stages are one pipeline: two replicas
/// sharing a region are separated only by moving every stage of one. The
/// leader asks only when [`plan`] has nothing to do and every stage is
/// ready, and at most once per `rebalance_every`: a returning node gets its
/// share back one replica at a time, never while another replica loads,
/// and a layout that is as good as it can be never moves.
pub fn rebalance(state: &State, health: &Health) -> Vec<Command> {
    let mut layout = kept(state, health);
    // Only a complete, valid layout is rebalanced: every slot of every
    // model placed on a usable node.
    let slots: usize = state
        .models
        .values()
        .map(|m| m.replicas as usize * m.stages as usize)
        .sum();
    if layout.assigned.len() != state.placements.len() || state.placements.len() != slots {
        return Vec::new();
    }
    // The first model (by name) that can be improved, its best move.
    for m in state.models.values() {
        // Moving the only replica would take the model offline while it
        // loads elsewhere.
        if m.replicas < 2 {
            continue;
        }
        let before = layout.score(m);
        if before == (0, 0, 0) {
            continue;
        }
        let mut best: Option<(Score, Vec<(SlotKey, NodeId)>)> = None;
        for replica in 0..m.replicas {
            let slots: Vec<(SlotKey, NodeId)> = (0..m.stages)
                .filter_map(|stage| {
                    let slot = (m.name.clone(), replica, stage);
                    layout.assigned.get(&slot).map(|n| (slot, *n))
                })
                .collect();
            for (slot, _) in &slots {
                layout.release(slot, stage_bytes(m, slot.2));
            }
            let mut to = Vec::new();
            for (slot, _) in &slots {
                let Some(node) = layout.best(m, slot, &[]) else {
                    break;
                };
                layout.take(slot.clone(), node, stage_bytes(m, slot.2));
                to.push((slot.clone(), node));
            }
            if to.len() == slots.len() {
                let after = layout.score(m);
                if after < before && best.as_ref().is_none_or(|(b, _)| after < *b) {
                    best = Some((after, to.clone()));
                }
            }
            for (slot, _) in &to {
                layout.release(slot, stage_bytes(m, slot.2));
            }
            for (slot, node) in slots {
                layout.take(slot.clone(), node, stage_bytes(m, slot.2));
            }
        }
        if let Some((_, to)) = best {
            return to
                .into_iter()
                .filter(|(slot, node)| layout.assigned.get(slot) != Some(node))
                .map(|(slot, node)| place(m, &slot, node))
                .collect();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const GIB: u64 = 1 << 30;

    fn node(id: NodeId, region: &str, memory: u64) -> NodeRecord {
        NodeRecord {
            memory_bytes: memory,
            ..crate::local::record(id, &format!("n{id}"), region, "")
        }
    }

    fn model(name: &str, layers: u32, stages: u32, replicas: u32, per_layer: u64) -> ModelRecord {
        ModelRecord {
            name: name.into(),
            source: "/m.gguf".into(),
            sha256: "a".repeat(64),
            layers,
            bytes_per_layer: per_layer,
            fixed_bytes: per_layer,
            stages,
            replicas,
            regions: Vec::new(),
            deployed_ms: 0,
        }
    }

    /// Applies `commands` through the state machine (so refusals show).
    fn apply(state: &mut State, commands: &[Command]) {
        for c in commands {
            if let Err(e) = state.apply(c, 1) {
                panic!("the planner proposed {c:?}, refused: {e}");
            }
        }
    }

    /// Plans and applies until nothing changes; returns the rounds taken.
    fn settle(state: &mut State, health: &Health) -> usize {
        for round in 0..4 {
            let c = plan(state, health);
            if c.is_empty() {
                return round;
            }
            apply(state, &c);
        }
        panic!("the plan did not settle");
    }

    fn testnet() -> State {
        let mut s = State::default();
        let regions = [
            "us-east",
            "us-east",
            "us-west",
            "us-west",
            "eu-central",
            "eu-central",
            "ap-southeast",
        ];
        for (i, r) in regions.iter().enumerate() {
            s.apply(
                &Command::RegisterNode(Box::new(node(i as u64 + 1, r, 8 * GIB))),
                0,
            )
            .expect("register");
        }
        s
    }

    fn region_of(s: &State, slot: (&str, u32, u32)) -> String {
        let p = &s.placements[&(slot.0.to_owned(), slot.1, slot.2)];
        s.nodes[&p.node].region.clone()
    }

    fn deploy(s: &mut State, m: ModelRecord) {
        s.apply(&Command::DeployModel(Box::new(m)), 0)
            .expect("deploy");
    }

    #[test]
    fn testnet_three_replicas_of_a_two_stage_model() {
        let mut s = testnet();
        deploy(&mut s, model("m", 30, 2, 3, GIB / 8));
        let mut health = Health::from_state(&s);
        assert_eq!(settle(&mut s, &health), 1, "one plan places everything");
        assert_eq!(s.placements.len(), 6);
        // Three replicas in three regions, each replica's stages in one
        // region on two nodes.
        let regions: BTreeSet<String> = (0..3).map(|r| region_of(&s, ("m", r, 0))).collect();
        assert_eq!(regions.len(), 3, "{regions:?}");
        for r in 0..3 {
            assert_eq!(region_of(&s, ("m", r, 0)), region_of(&s, ("m", r, 1)));
            let a = s.placements[&("m".to_owned(), r, 0)].node;
            let b = s.placements[&("m".to_owned(), r, 1)].node;
            assert_ne!(a, b, "replica {r}'s stages share node {a}");
        }

        // Kill one node: only its slot moves.
        let before = s.placements.clone();
        let victim = before[&("m".to_owned(), 0, 1)].node;
        health.live.remove(&victim);
        let c = plan(&s, &health);
        assert_eq!(c.len(), 1, "{c:?}");
        apply(&mut s, &c);
        for (slot, p) in &s.placements {
            if before[slot].node != victim {
                assert_eq!(p, &before[slot], "{slot:?} moved needlessly");
            } else {
                assert_ne!(p.node, victim);
                assert!(p.generation > before[slot].generation);
            }
        }
        assert!(plan(&s, &health).is_empty(), "not stable");

        // Kill a whole region: its replica moves to the region left over.
        let region = region_of(&s, ("m", 1, 0));
        for n in s.nodes.values() {
            if n.region == region {
                health.live.remove(&n.id);
            }
        }
        settle(&mut s, &health);
        assert_eq!(s.placements.len(), 6, "every slot is placed again");
        for p in s.placements.values() {
            assert!(health.live.contains(&p.node));
        }
        let regions: BTreeSet<String> = (0..3).map(|r| region_of(&s, ("m", r, 0))).collect();
        assert_eq!(
            regions.len(),
            3,
            "replicas still in three regions: {regions:?}"
        );

        // Nodes come back: nothing moves (no rebalancing for its own sake).
        let before = s.placements.clone();
        health = Health::from_state(&s);
        assert!(plan(&s, &health).is_empty());
        assert_eq!(s.placements, before);
    }

    #[test]
    fn a_slot_with_no_room_anywhere_is_emptied_and_comes_back() {
        let mut s = State::default();
        s.apply(&Command::RegisterNode(Box::new(node(1, "a", 10 * GIB))), 0)
            .expect("register");
        s.apply(&Command::RegisterNode(Box::new(node(2, "b", GIB))), 0)
            .expect("register");
        // 4 GiB + 1 GiB fixed: only node 1 holds it.
        deploy(&mut s, model("big", 4, 1, 1, GIB));
        let mut health = Health::from_state(&s);
        settle(&mut s, &health);
        assert_eq!(s.placements[&("big".to_owned(), 0, 0)].node, 1);
        health.live.remove(&1);
        let c = plan(&s, &health);
        assert!(
            matches!(c.as_slice(), [Command::Unplace { .. }]),
            "expected the slot emptied, got {c:?}"
        );
        apply(&mut s, &c);
        assert!(plan(&s, &health).is_empty());
        health.live.insert(1);
        settle(&mut s, &health);
        assert_eq!(s.placements[&("big".to_owned(), 0, 0)].node, 1);
    }

    fn report(s: &mut State, slot: (&str, u32, u32), state: StageState) {
        let p = s.placements[&(slot.0.to_owned(), slot.1, slot.2)].clone();
        s.apply(
            &Command::StageReport {
                model: p.model,
                replica: p.replica,
                stage: p.stage,
                node: p.node,
                generation: p.generation,
                state,
                detail: String::new(),
            },
            1,
        )
        .expect("report");
    }

    #[test]
    fn a_slot_that_fails_to_load_moves_to_a_node_where_it_has_not_failed() {
        let mut s = State::default();
        for (id, region) in [(1, "a"), (2, "a"), (3, "b")] {
            s.apply(
                &Command::RegisterNode(Box::new(node(id, region, 8 * GIB))),
                0,
            )
            .expect("register");
        }
        let mut m = model("m", 8, 1, 1, GIB / 8);
        m.regions = vec!["a".into()];
        deploy(&mut s, m);
        let health = Health::from_state(&s);
        settle(&mut s, &health);
        let slot = ("m".to_owned(), 0, 0);
        let first = s.placements[&slot].node;
        assert!(plan(&s, &health).is_empty());

        report(&mut s, ("m", 0, 0), StageState::Failed);
        let c = plan(&s, &health);
        assert_eq!(c.len(), 1, "{c:?}");
        apply(&mut s, &c);
        let second = s.placements[&slot].node;
        assert_ne!(second, first);
        assert_ne!(second, 3, "region b is not allowed");
        assert_eq!(s.placements[&slot].failed_on, vec![first]);
        assert!(plan(&s, &health).is_empty(), "not stable after the move");

        // It fails on the other node too: nowhere is left, so it stays
        // (its node retries) instead of bouncing back.
        report(&mut s, ("m", 0, 0), StageState::Failed);
        assert!(plan(&s, &health).is_empty());
        assert_eq!(s.placements[&slot].node, second);

        // Its node dies: it goes back to the first node (the only one
        // left), and once ready there the failures are forgotten.
        let mut health = health;
        health.live.remove(&second);
        let c = plan(&s, &health);
        apply(&mut s, &c);
        assert_eq!(s.placements[&slot].node, first);
        assert_eq!(s.placements[&slot].failed_on, vec![first, second]);
        report(&mut s, ("m", 0, 0), StageState::Ready);
        assert!(s.placements[&slot].failed_on.is_empty());
        assert!(plan(&s, &health).is_empty());
    }

    #[test]
    fn regions_that_return_get_their_replicas_back_one_move_at_a_time() {
        let mut s = testnet();
        deploy(&mut s, model("m", 30, 2, 3, GIB / 8));
        let mut health = Health::from_state(&s);
        settle(&mut s, &health);
        assert!(
            rebalance(&s, &health).is_empty(),
            "a fresh layout is already good"
        );

        // Two regions die: three replicas share the two left.
        for n in s.nodes.values() {
            if n.region == "us-east" || n.region == "us-west" {
                health.live.remove(&n.id);
            }
        }
        settle(&mut s, &health);
        let regions: BTreeSet<String> = (0..3).map(|r| region_of(&s, ("m", r, 0))).collect();
        assert_eq!(regions.len(), 2, "{regions:?}");
        assert!(
            rebalance(&s, &health).is_empty(),
            "nothing better while they are down"
        );

        // They return: each rebalance moves one replica and improves the
        // layout, and it ends with three regions and each replica in one
        // region.
        health = Health::from_state(&s);
        assert!(
            plan(&s, &health).is_empty(),
            "returning nodes move nothing by themselves"
        );
        let mut moves = 0;
        loop {
            let c = rebalance(&s, &health);
            if c.is_empty() {
                break;
            }
            let replicas: BTreeSet<u32> = c
                .iter()
                .map(|c| match c {
                    Command::Place { replica, node, .. } => {
                        assert!(health.live.contains(node));
                        *replica
                    }
                    other => panic!("rebalance proposed {other:?}"),
                })
                .collect();
            assert_eq!(replicas.len(), 1, "one replica per move: {c:?}");
            apply(&mut s, &c);
            assert!(plan(&s, &health).is_empty(), "plan undoes the rebalance");
            moves += 1;
            assert!(moves <= 3, "rebalance does not converge");
        }
        assert!(moves >= 1, "a replica had to move");
        let regions: BTreeSet<String> = (0..3).map(|r| region_of(&s, ("m", r, 0))).collect();
        assert_eq!(regions.len(), 3, "{regions:?}");
        for r in 0..3 {
            assert_eq!(region_of(&s, ("m", r, 0)), region_of(&s, ("m", r, 1)));
        }
    }

    #[test]
    fn a_lone_replica_is_never_moved_for_layout_alone() {
        let mut s = State::default();
        s.apply(&Command::RegisterNode(Box::new(node(1, "a", 8 * GIB))), 0)
            .expect("register");
        for (id, r) in [(2, "b"), (3, "b")] {
            s.apply(&Command::RegisterNode(Box::new(node(id, r, 8 * GIB))), 0)
                .expect("register");
        }
        deploy(&mut s, model("m", 8, 2, 1, GIB / 8));
        let mut health = Health::from_state(&s);
        health.live.remove(&2);
        health.live.remove(&3);
        settle(&mut s, &health);
        // Both stages on node 1, the only live node.
        assert!(s.placements.values().all(|p| p.node == 1));
        let health = Health::from_state(&s);
        assert!(
            rebalance(&s, &health).is_empty(),
            "moving the only replica takes the model offline"
        );
    }

    #[test]
    fn layer_ranges_cover_the_model_once() {
        for layers in 1..40 {
            for stages in 1..=layers.min(8) {
                let m = model("m", layers, stages, 1, 1);
                let mut next = 0;
                for s in 0..stages {
                    let (lo, hi) = layer_range(&m, s);
                    assert_eq!(lo, next);
                    assert!(
                        hi > lo,
                        "{layers} layers in {stages} stages: stage {s} empty"
                    );
                    next = hi;
                }
                assert_eq!(next, layers);
            }
        }
    }

    /// A random cluster: 1-9 nodes over 1-4 regions with 1-16 GiB, and 1-3
    /// models of 1-3 stages and 1-4 replicas.
    fn cluster() -> impl Strategy<Value = State> {
        let nodes = prop::collection::vec((0usize..4, 1u64..=16), 1..10);
        let models = prop::collection::vec((4u32..40, 1u32..=3, 1u32..=4, 1u64..=8), 1..4);
        (nodes, models).prop_map(|(nodes, models)| {
            let mut s = State::default();
            for (i, (region, gib)) in nodes.into_iter().enumerate() {
                let n = node(i as u64 + 1, ["a", "b", "c", "d"][region], gib * GIB);
                s.apply(&Command::RegisterNode(Box::new(n)), 0)
                    .expect("register");
            }
            for (i, (layers, stages, replicas, per_layer_64th)) in models.into_iter().enumerate() {
                let m = model(
                    &format!("m{i}"),
                    layers,
                    stages,
                    replicas,
                    per_layer_64th * GIB / 64,
                );
                s.apply(&Command::DeployModel(Box::new(m)), 0)
                    .expect("deploy");
            }
            s
        })
    }

    fn check_invariants(s: &State, health: &Health) -> Result<(), TestCaseError> {
        let mut used: BTreeMap<NodeId, u64> = BTreeMap::new();
        for p in s.placements.values() {
            prop_assert!(health.live.contains(&p.node), "{p:?} on a dead node");
            let m = &s.models[&p.model];
            prop_assert_eq!((p.layer_start, p.layer_end), layer_range(m, p.stage));
            *used.entry(p.node).or_default() += stage_bytes(m, p.stage);
        }
        for (id, bytes) in used {
            prop_assert!(bytes <= capacity(&s.nodes[&id]), "node {id} over capacity");
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn plans_respect_capacity_liveness_and_settle(
            mut s in cluster(),
            dead in prop::collection::btree_set(1u64..10, 0..4),
        ) {
            let mut health = Health::from_state(&s);
            prop_assert!(settle(&mut s, &health) <= 1, "a fresh plan needs more than one round");
            check_invariants(&s, &health)?;
            // Same input, same plan; and the plan of the plan is empty.
            prop_assert_eq!(plan(&s, &health), plan(&s, &health));
            prop_assert!(plan(&s, &health).is_empty());

            // Nodes die: assignments on live nodes stay where they were.
            let before = s.placements.clone();
            for d in &dead {
                health.live.remove(d);
            }
            let c = plan(&s, &health);
            for cmd in &c {
                let slot = match cmd {
                    Command::Place { model, replica, stage, .. }
                    | Command::Unplace { model, replica, stage } => (model.clone(), *replica, *stage),
                    other => return Err(TestCaseError::fail(format!("unexpected {other:?}"))),
                };
                if let Some(p) = before.get(&slot) {
                    prop_assert!(dead.contains(&p.node), "{slot:?} moved off live node {}", p.node);
                }
            }
            apply(&mut s, &c);
            check_invariants(&s, &health)?;
            prop_assert!(plan(&s, &health).is_empty(), "not stable after failures");
        }

        /// Failed slots leave their node when another can take them, never
        /// for a node where they failed before, and the plan stays valid
        /// and stable.
        #[test]
        fn failed_slots_move_off_and_stay_valid(
            mut s in cluster(),
            fail in prop::collection::vec(any::<bool>(), 0..40),
        ) {
            let health = Health::from_state(&s);
            settle(&mut s, &health);
            let slots: Vec<SlotKey> = s.placements.keys().cloned().collect();
            let mut failed = Vec::new();
            for (slot, f) in slots.iter().zip(&fail) {
                if *f {
                    report(&mut s, (&slot.0, slot.1, slot.2), StageState::Failed);
                    failed.push((slot.clone(), s.placements[slot].node));
                }
            }
            let c = plan(&s, &health);
            apply(&mut s, &c);
            check_invariants(&s, &health)?;
            prop_assert!(plan(&s, &health).is_empty(), "not stable after moving failed slots");
            for (slot, was) in failed {
                let p = &s.placements[&slot];
                if p.node == was {
                    prop_assert_eq!(p.state, StageState::Failed);
                } else {
                    prop_assert_eq!(&p.failed_on, &vec![was]);
                }
            }
        }

        /// After nodes die and return, rebalancing terminates, each move
        /// strictly improves its model's score, and every step is a valid,
        /// stable layout.
        #[test]
        fn rebalance_improves_and_terminates(
            mut s in cluster(),
            dead in prop::collection::btree_set(1u64..10, 0..5),
        ) {
            let mut health = Health::from_state(&s);
            for d in &dead {
                health.live.remove(d);
            }
            settle(&mut s, &health);
            let health = Health::from_state(&s);
            settle(&mut s, &health);
            let mut rounds = 0;
            loop {
                let c = rebalance(&s, &health);
                let Some(Command::Place { model, .. }) = c.first() else {
                    prop_assert!(c.is_empty(), "rebalance proposed {c:?}");
                    break;
                };
                let model = model.clone();
                let before = kept(&s, &health).score(&s.models[&model]);
                apply(&mut s, &c);
                let after = kept(&s, &health).score(&s.models[&model]);
                prop_assert!(after < before, "{c:?}: {before:?} -> {after:?}");
                check_invariants(&s, &health)?;
                prop_assert!(plan(&s, &health).is_empty());
                rounds += 1;
                prop_assert!(rounds < 200, "rebalance does not terminate");
            }
        }

        /// With room everywhere, every slot is placed, replicas take as
        /// many regions as there are, and a replica's stages share a region.
        #[test]
        fn with_room_replicas_spread_over_regions(mut s in cluster()) {
            for n in s.nodes.values_mut() {
                n.memory_bytes = 1 << 50;
            }
            let health = Health::from_state(&s);
            settle(&mut s, &health);
            let regions: BTreeSet<&str> = s.nodes.values().map(|n| n.region.as_str()).collect();
            for m in s.models.values() {
                let mut replica_regions = BTreeSet::new();
                for r in 0..m.replicas {
                    let home = &s.nodes[&s.placements[&(m.name.clone(), r, 0)].node].region;
                    replica_regions.insert(home.clone());
                    for st in 1..m.stages {
                        let p = &s.placements[&(m.name.clone(), r, st)];
                        prop_assert_eq!(&s.nodes[&p.node].region, home);
                    }
                }
                prop_assert_eq!(replica_regions.len(), (m.replicas as usize).min(regions.len()));
                // Then distinct nodes: with a node per slot, no node holds
                // two replicas of one model.
                if s.nodes.len() >= (m.replicas * m.stages) as usize {
                    let mut by_node: BTreeMap<NodeId, BTreeSet<u32>> = BTreeMap::new();
                    for p in s.placements.values().filter(|p| p.model == m.name) {
                        by_node.entry(p.node).or_default().insert(p.replica);
                    }
                    for (node, replicas) in by_node {
                        prop_assert!(replicas.len() == 1, "node {} holds replicas {:?} of {}", node, replicas, m.name);
                    }
                }
            }
        }
    }
}
