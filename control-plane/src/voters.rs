//! Which members should vote: a pure function of the membership, the
//! regions and liveness (STYLE.md #2), so it is property-tested alone.
//!
//! Rules, in order:
//! 1. Never more than `max_voters` (5) voters, nor, once members span
//!    three or more regions, more than `max_per_region` (2) in one region:
//!    then losing any one region keeps a quorum. With one or two regions no
//!    region loss can be survived anyway, and a cap would only cost node
//!    failures (three nodes in one region would get one voter).
//! 2. An odd count (1, 3 or 5): an even one tolerates no more failures
//!    than the odd one below it and needs a bigger quorum.
//! 3. A voter that has been down longer than `replace_after`, or that is
//!    draining, gives its seat to a healthy learner; the leader keeps its
//!    seat.
//! 4. New seats go to regions with the fewest voters first (more regions
//!    survive more failures), then to the lowest id (deterministic).
//! 5. Healthy voters that break no rule keep their seat (no churn).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::types::NodeId;

/// One member as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: NodeId,
    pub region: String,
    /// How long it has been unreachable; `None` while it answers.
    pub down_for: Option<Duration>,
    pub draining: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub max_voters: usize,
    pub max_per_region: usize,
    pub replace_after: Duration,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            max_voters: 5,
            max_per_region: 2,
            replace_after: Duration::from_secs(30),
        }
    }
}

/// The most voters one region may hold, for members in these regions (one
/// item per member): `max_per_region` once they span three regions or
/// more, else no cap below `max_voters` (rule 1).
pub fn region_cap<'a>(regions: impl IntoIterator<Item = &'a str>, rules: &Rules) -> usize {
    let distinct: BTreeSet<&str> = regions.into_iter().collect();
    if distinct.len() >= 3 {
        rules.max_per_region
    } else {
        rules.max_voters
    }
}

/// How many voters members in these regions (one item per member) get:
/// every region's members up to the cap, at most `max_voters`, odd.
pub fn voter_count<'a>(regions: impl IntoIterator<Item = &'a str>, rules: &Rules) -> usize {
    let regions: Vec<&str> = regions.into_iter().collect();
    let cap = region_cap(regions.iter().copied(), rules);
    let mut capacity: BTreeMap<&str, usize> = BTreeMap::new();
    for r in regions {
        let n = capacity.entry(r).or_default();
        *n = (*n + 1).min(cap);
    }
    let mut n = capacity.values().sum::<usize>().clamp(1, rules.max_voters);
    if n.is_multiple_of(2) {
        n -= 1;
    }
    n
}

/// The voter set the cluster should have. Returns `current` itself when
/// nothing needs to change.
pub fn plan(
    current: &BTreeSet<NodeId>,
    members: &[Candidate],
    leader: NodeId,
    rules: &Rules,
) -> BTreeSet<NodeId> {
    let by_id: BTreeMap<NodeId, &Candidate> = members.iter().map(|c| (c.id, c)).collect();
    let healthy = |c: &Candidate| c.down_for.is_none() && !c.draining;
    let evict = |c: &Candidate| {
        c.id != leader && (c.draining || c.down_for.is_some_and(|d| d >= rules.replace_after))
    };

    let eligible: Vec<&Candidate> = members.iter().filter(|c| !evict(c)).collect();
    let cap = region_cap(eligible.iter().map(|c| c.region.as_str()), rules);

    // Seats kept: current voters that are members and not evicted.
    let mut keep: Vec<&Candidate> = current
        .iter()
        .filter_map(|id| by_id.get(id).copied())
        .filter(|c| !evict(c))
        .collect();
    // Over a region's cap: drop the unhealthy first, then the highest ids.
    let mut per_region: BTreeMap<&str, usize> = BTreeMap::new();
    keep.sort_by_key(|c| (c.id != leader, !healthy(c), c.id));
    keep.retain(|c| {
        let n = per_region.entry(c.region.as_str()).or_default();
        *n += 1;
        *n <= cap || c.id == leader
    });

    // Seats that can exist: members not evicted, within region caps.
    let target = voter_count(eligible.iter().map(|c| c.region.as_str()), rules);

    // Fill: healthy learners in the least-represented regions first, in
    // the order they would be added.
    let mut chosen: BTreeSet<NodeId> = keep.iter().map(|c| c.id).collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &keep {
        *counts.entry(c.region.as_str()).or_default() += 1;
    }
    let mut fill = Vec::new();
    let mut fill_counts = counts.clone();
    loop {
        let next = eligible
            .iter()
            .filter(|c| healthy(c) && !chosen.contains(&c.id) && !fill.contains(&c.id))
            .filter(|c| fill_counts.get(c.region.as_str()).copied().unwrap_or(0) < cap)
            .min_by_key(|c| {
                (
                    fill_counts.get(c.region.as_str()).copied().unwrap_or(0),
                    c.id,
                )
            });
        let Some(c) = next else { break };
        fill.push(c.id);
        *fill_counts.entry(c.region.as_str()).or_default() += 1;
    }
    // The final size: the target, or what keep + fill can reach, odd.
    let mut size = target.min(chosen.len() + fill.len()).max(1);
    if size.is_multiple_of(2) {
        size -= 1;
    }
    if size >= chosen.len() {
        for id in fill.into_iter().take(size - chosen.len()) {
            chosen.insert(id);
        }
    }
    // Too many (members left, seats lost): drop from the most represented
    // region, unhealthy first, never the leader.
    while chosen.len() > size {
        let drop = chosen
            .iter()
            .filter(|id| **id != leader)
            .filter_map(|id| by_id.get(id))
            .max_by_key(|c| {
                (
                    !healthy(c),
                    counts.get(c.region.as_str()).copied().unwrap_or(0),
                    c.id,
                )
            })
            .map(|c| (c.id, c.region.as_str()));
        let Some((id, region)) = drop else { break };
        chosen.remove(&id);
        if let Some(n) = counts.get_mut(region) {
            *n -= 1;
        }
    }
    if chosen.is_empty() {
        chosen.insert(leader);
    }
    chosen
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn c(id: NodeId, region: &str) -> Candidate {
        Candidate {
            id,
            region: region.into(),
            down_for: None,
            draining: false,
        }
    }

    fn testnet() -> Vec<Candidate> {
        vec![
            c(1, "us-east"),
            c(2, "us-east"),
            c(3, "us-west"),
            c(4, "us-west"),
            c(5, "eu-central"),
            c(6, "eu-central"),
            c(7, "ap-southeast"),
        ]
    }

    fn regions_of(v: &BTreeSet<NodeId>, m: &[Candidate]) -> BTreeMap<String, usize> {
        let mut r = BTreeMap::new();
        for id in v {
            let c = m.iter().find(|c| c.id == *id).unwrap();
            *r.entry(c.region.clone()).or_default() += 1;
        }
        r
    }

    #[test]
    fn seven_nodes_in_four_regions_get_five_voters_that_survive_any_region() {
        let m = testnet();
        let v = plan(&[1].into(), &m, 1, &Rules::default());
        assert_eq!(v.len(), 5);
        let r = regions_of(&v, &m);
        assert_eq!(r.len(), 4, "{r:?}");
        for (region, n) in &r {
            assert!(*n <= 2, "{region}: {n}");
            assert!(5 - n >= 3, "losing {region} loses quorum");
        }
        // Stable: planning again changes nothing.
        assert_eq!(plan(&v, &m, 1, &Rules::default()), v);
    }

    #[test]
    fn a_voter_down_past_the_limit_is_replaced_by_a_healthy_learner() {
        let mut m = testnet();
        let rules = Rules::default();
        let v = plan(&[1].into(), &m, 1, &rules);
        let victim = *v.iter().find(|id| **id != 1).unwrap();
        let spare: Vec<NodeId> = m
            .iter()
            .map(|c| c.id)
            .filter(|id| !v.contains(id))
            .collect();
        m.iter_mut().find(|c| c.id == victim).unwrap().down_for = Some(Duration::from_secs(5));
        assert_eq!(plan(&v, &m, 1, &rules), v, "not yet past replace_after");
        m.iter_mut().find(|c| c.id == victim).unwrap().down_for = Some(rules.replace_after);
        let after = plan(&v, &m, 1, &rules);
        assert!(!after.contains(&victim));
        assert_eq!(after.len(), 5);
        assert!(after.iter().any(|id| spare.contains(id)), "{after:?}");
    }

    #[test]
    fn small_clusters_vote_with_an_odd_count() {
        let m = vec![c(1, "a"), c(2, "b")];
        assert_eq!(plan(&[1].into(), &m, 1, &Rules::default()).len(), 1);
        let m = vec![c(1, "a"), c(2, "b"), c(3, "c")];
        assert_eq!(plan(&[1].into(), &m, 1, &Rules::default()).len(), 3);
        // One region only: no cap (no region loss can be survived), so
        // three nodes get three voters and survive losing one.
        let m = vec![c(1, "a"), c(2, "a"), c(3, "a")];
        assert_eq!(
            plan(&[1].into(), &m, 1, &Rules::default()),
            [1, 2, 3].into()
        );
        // Two regions: 3 + 2 nodes get five voters.
        let m = vec![c(1, "a"), c(2, "a"), c(3, "a"), c(4, "b"), c(5, "b")];
        assert_eq!(plan(&[1].into(), &m, 1, &Rules::default()).len(), 5);
        // A third region brings the cap of 2 back: 2 + 2 + 1.
        let m = vec![
            c(1, "a"),
            c(2, "a"),
            c(3, "a"),
            c(4, "b"),
            c(5, "b"),
            c(6, "c"),
        ];
        let v = plan(&[1, 2, 3].into(), &m, 1, &Rules::default());
        assert_eq!(v.len(), 5, "{v:?}");
        assert_eq!(regions_of(&v, &m)["a"], 2, "{v:?}");
    }

    fn cluster() -> impl Strategy<Value = (Vec<Candidate>, BTreeSet<NodeId>)> {
        prop::collection::vec(
            (0usize..5, prop::option::of(0u64..120), any::<bool>()),
            1..12,
        )
        .prop_flat_map(|nodes| {
            let n = nodes.len();
            let members: Vec<Candidate> = nodes
                .into_iter()
                .enumerate()
                .map(|(i, (r, down, drain))| Candidate {
                    id: i as NodeId + 1,
                    region: format!("r{r}"),
                    down_for: down.map(Duration::from_secs),
                    draining: drain && i > 0,
                })
                .collect();
            let current = prop::collection::btree_set(1..=n as NodeId, 1..=n.min(5));
            (Just(members), current)
        })
    }

    proptest! {
        #[test]
        fn invariants_hold_on_random_clusters((members, current) in cluster()) {
            let rules = Rules::default();
            let leader = *current.iter().next().unwrap();
            let v = plan(&current, &members, leader, &rules);
            prop_assert!(v.contains(&leader), "leader lost its seat: {v:?}");
            prop_assert!(v.len() <= rules.max_voters);
            prop_assert!(v.len() % 2 == 1, "even voter count {}", v.len());
            let cap = region_cap(
                members
                    .iter()
                    .filter(|c| c.id == leader || !(c.draining || c.down_for.is_some_and(|d| d >= rules.replace_after)))
                    .map(|c| c.region.as_str()),
                &rules,
            );
            for (region, n) in regions_of(&v, &members) {
                prop_assert!(n <= cap || v.len() == 1, "{region} has {n} (cap {cap})");
            }
            for id in &v {
                let c = members.iter().find(|c| c.id == *id).unwrap();
                if *id != leader {
                    prop_assert!(!c.draining, "draining voter {id}");
                    prop_assert!(c.down_for.is_none_or(|d| d < rules.replace_after) || current.contains(id) && c.down_for.is_none(),
                        "dead voter {id} kept");
                }
            }
            // Idempotent: the plan of the plan is itself.
            prop_assert_eq!(plan(&v, &members, leader, &rules), v);
        }
    }
}
