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
//!
//! Planning the plan's result gives nothing new (stable).

use std::collections::{BTreeMap, BTreeSet};

use crate::command::{Command, ModelRecord, NodeRecord, NodeStatus, SlotKey, State};
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

/// The commands that bring the placements in line with the rules.
pub fn plan(state: &State, health: &Health) -> Vec<Command> {
    let usable = |id: NodeId| {
        health.live.contains(&id)
            && state
                .nodes
                .get(&id)
                .is_some_and(|n| n.status == NodeStatus::Up)
    };
    let allowed =
        |m: &ModelRecord, n: &NodeRecord| m.regions.is_empty() || m.regions.contains(&n.region);
    let mut used: BTreeMap<NodeId, u64> = BTreeMap::new();
    // Slot → node, for everything kept or newly placed.
    let mut assigned: BTreeMap<SlotKey, NodeId> = BTreeMap::new();

    // Keep valid assignments, oldest first: when a node shrank, the newest
    // arrivals are the ones that move.
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
        let fits = used
            .get(&p.node)
            .copied()
            .unwrap_or(0)
            .saturating_add(bytes)
            <= capacity(n);
        if usable(p.node)
            && allowed(m, n)
            && (p.layer_start, p.layer_end) == layer_range(m, p.stage)
            && fits
        {
            *used.entry(p.node).or_default() += bytes;
            assigned.insert((p.model.clone(), p.replica, p.stage), p.node);
        }
    }

    let region_of = |id: NodeId| state.nodes.get(&id).map_or("", |n| n.region.as_str());
    let mut commands = Vec::new();
    for m in state.models.values() {
        for replica in 0..m.replicas {
            for stage in 0..m.stages {
                let slot = (m.name.clone(), replica, stage);
                if assigned.contains_key(&slot) {
                    continue;
                }
                let bytes = stage_bytes(m, stage);
                // Where this model's slots are, as (replica, node).
                let mine: Vec<(u32, NodeId)> = assigned
                    .range((m.name.clone(), 0, 0)..)
                    .take_while(|((name, _, _), _)| *name == m.name)
                    .map(|((_, r, _), n)| (*r, *n))
                    .collect();
                let replica_region = mine
                    .iter()
                    .find(|(r, _)| *r == replica)
                    .map(|(_, n)| region_of(*n));
                let best = state
                    .nodes
                    .values()
                    .filter(|n| usable(n.id) && allowed(m, n))
                    .filter_map(|n| {
                        let free = capacity(n)
                            .checked_sub(used.get(&n.id).copied().unwrap_or(0))?
                            .checked_sub(bytes)?;
                        let other_replicas_in_region = mine
                            .iter()
                            .filter(|(r, x)| *r != replica && region_of(*x) == n.region)
                            .map(|(r, _)| *r)
                            .collect::<BTreeSet<_>>()
                            .len();
                        let away = replica_region.is_some_and(|r| r != n.region);
                        let on_node = mine.iter().filter(|(_, x)| *x == n.id).count();
                        Some((
                            (
                                other_replicas_in_region,
                                away,
                                on_node,
                                std::cmp::Reverse(free),
                                n.id,
                            ),
                            n.id,
                        ))
                    })
                    .min()
                    .map(|(_, id)| id);
                match best {
                    Some(node) => {
                        let (layer_start, layer_end) = layer_range(m, stage);
                        *used.entry(node).or_default() += bytes;
                        assigned.insert(slot, node);
                        commands.push(Command::Place {
                            model: m.name.clone(),
                            replica,
                            stage,
                            layer_start,
                            layer_end,
                            node,
                        });
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
            }
        }
    }
}
