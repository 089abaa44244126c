//! Scenarios and the seeded schedules made of them. A schedule is a pure
//! function of (seed, scenarios, hold, layout): the same seed gives the same
//! faults on the same nodes in the same order, so a failing seed replays.

use std::time::Duration;

use rand::seq::IndexedRandom as _;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// One kind of fault run, as `--scenario` names it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// kill -9 a node that serves a stage (the leader or not), restart it
    /// after the hold.
    NodeKill,
    /// kill -9 the Raft leader, restart it after the hold.
    LeaderKill,
    /// kill -9 every node of one region, restart them after the hold.
    RegionKill,
    /// SIGSTOP one node (the process freezes, its sockets stay open), SIGCONT after the hold.
    Pause,
    /// Cut one node off from every other, both ways.
    PartitionNode,
    /// Cut one region off from the rest, both ways.
    PartitionRegion,
    /// Cut one node's calls to every other (theirs to it still arrive).
    PartitionOneWay,
    /// Add delay and jitter between two regions, both ways.
    Latency,
    /// Skew one node's wall clock by minutes.
    ClockSkew,
    /// Limit one node to a tenth of a CPU core (cgroup CPU quota).
    CpuPressure,
    /// Cap one node's memory a little above what it uses (cgroup memory
    /// limit): it reclaims, or the kernel kills it (then it is restarted).
    MemoryPressure,
    /// Fill one node's data disk (a small filesystem of its own) to the
    /// last byte; free it after the hold.
    DiskFull,
    /// Copy one node's data dir (stopped, so the copy is consistent), let
    /// the cluster move on, then restart the node from the old copy.
    StaleDataDir,
    /// Drain a voter (a membership change: its seat handed to a learner,
    /// then it is removed) and kill -9 the leader while the change runs;
    /// after the hold the leader restarts, the drain is finished, and the
    /// drained node restarts and joins again.
    MembershipChange,
}

impl Scenario {
    pub const ALL: [Scenario; 14] = [
        Scenario::NodeKill,
        Scenario::LeaderKill,
        Scenario::RegionKill,
        Scenario::Pause,
        Scenario::PartitionNode,
        Scenario::PartitionRegion,
        Scenario::PartitionOneWay,
        Scenario::Latency,
        Scenario::ClockSkew,
        Scenario::CpuPressure,
        Scenario::MemoryPressure,
        Scenario::DiskFull,
        Scenario::StaleDataDir,
        Scenario::MembershipChange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::NodeKill => "node-kill",
            Scenario::LeaderKill => "leader-kill",
            Scenario::RegionKill => "region-kill",
            Scenario::Pause => "pause",
            Scenario::PartitionNode => "partition-node",
            Scenario::PartitionRegion => "partition-region",
            Scenario::PartitionOneWay => "partition-one-way",
            Scenario::Latency => "latency",
            Scenario::ClockSkew => "clock-skew",
            Scenario::CpuPressure => "cpu-pressure",
            Scenario::MemoryPressure => "memory-pressure",
            Scenario::DiskFull => "disk-full",
            Scenario::StaleDataDir => "stale-data-dir",
            Scenario::MembershipChange => "membership-change",
        }
    }

    /// Which of the original documents' five scenarios this one covers.
    pub fn family(self) -> &'static str {
        match self {
            Scenario::NodeKill
            | Scenario::LeaderKill
            | Scenario::Pause
            | Scenario::StaleDataDir
            | Scenario::MembershipChange => "node failure",
            Scenario::RegionKill => "regional failure",
            Scenario::PartitionNode | Scenario::PartitionRegion | Scenario::PartitionOneWay => {
                "network partition"
            }
            Scenario::Latency | Scenario::ClockSkew => "high latency",
            Scenario::CpuPressure | Scenario::MemoryPressure | Scenario::DiskFull => {
                "resource exhaustion"
            }
        }
    }
}

/// A node as the schedule sees it: its name and region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub name: String,
    pub region: String,
}

/// What a fault does, with its targets resolved (except the leader, which
/// is whoever leads when the fault starts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Action {
    Kill {
        nodes: Vec<String>,
    },
    KillLeader,
    /// The `pick`-th (modulo their number) of the nodes serving a stage
    /// when the fault starts, in name order.
    KillStageHolder {
        pick: u32,
    },
    Pause {
        node: String,
    },
    /// `side` cut off from everyone else; both ways unless `one_way`.
    Partition {
        side: Vec<String>,
        one_way: bool,
    },
    Latency {
        a: String,
        b: String,
        rtt_ms: u32,
        jitter_ms: u32,
    },
    ClockSkew {
        node: String,
        skew_ms: i64,
    },
    CpuLimit {
        node: String,
        permille: u32,
    },
    MemoryLimit {
        node: String,
        headroom_mb: u32,
    },
    FillDisk {
        node: String,
    },
    StaleRestart {
        node: String,
    },
    /// Drain the `pick`-th (modulo their number, in name order) of the
    /// voters that are not the leader and have join addresses (not the
    /// first node, which was started with --init), and kill -9 the leader
    /// `delay_ms` after the drain was asked for.
    DrainKillLeader {
        pick: u32,
        delay_ms: u32,
    },
}

/// One fault of a schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    pub scenario: Scenario,
    pub action: Action,
    /// Quiet time (workload running, no fault) before it starts.
    #[serde(with = "millis")]
    pub after: Duration,
    /// How long it stays before it is healed.
    #[serde(with = "millis")]
    pub hold: Duration,
}

impl Fault {
    pub fn describe(&self) -> String {
        match &self.action {
            Action::Kill { nodes } => format!("kill -9 {}", nodes.join(", ")),
            Action::KillLeader => "kill -9 the leader".into(),
            Action::KillStageHolder { .. } => "kill -9 a node serving a stage".into(),
            Action::Pause { node } => format!("freeze {node}"),
            Action::Partition { side, one_way } => format!(
                "cut {} off from the rest{}",
                side.join(", "),
                if *one_way { " (its calls only)" } else { "" }
            ),
            Action::Latency {
                a,
                b,
                rtt_ms,
                jitter_ms,
            } => format!("+{rtt_ms} ms ±{jitter_ms} ms between {a} and {b}"),
            Action::ClockSkew { node, skew_ms } => {
                format!("{node}'s clock {:+} s", skew_ms / 1000)
            }
            Action::CpuLimit { node, permille } => {
                format!(
                    "{node} limited to {:.0}% of a core",
                    *permille as f64 / 10.0
                )
            }
            Action::MemoryLimit { node, headroom_mb } => {
                format!("{node}'s memory capped {headroom_mb} MB above its use")
            }
            Action::FillDisk { node } => format!("{node}'s data disk filled"),
            Action::StaleRestart { node } => {
                format!("{node} restarted from a copy of its data dir taken when the fault began")
            }
            Action::DrainKillLeader { delay_ms, .. } => {
                format!("drain a voter, kill -9 the leader {delay_ms} ms into the change")
            }
        }
    }
}

/// A seeded sequence of faults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub seed: u64,
    pub faults: Vec<Fault>,
    /// The `trine chaos run` arguments that make this schedule again.
    #[serde(default)]
    pub replay: String,
}

impl Schedule {
    /// One fault per scenario, in the order given, targets and timings drawn
    /// from `seed`.
    pub fn new(seed: u64, scenarios: &[Scenario], hold: Duration, layout: &[Slot]) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let faults = scenarios
            .iter()
            .map(|&s| draw(&mut rng, s, hold, layout))
            .collect();
        let replay = format!(
            "--seed {seed} --scenario {} --duration {}",
            scenarios
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(","),
            humantime::format_duration(hold)
        );
        Self {
            seed,
            faults,
            replay,
        }
    }

    /// `n` faults of scenarios drawn at random (the soak's schedules).
    pub fn random(seed: u64, n: usize, hold: Duration, layout: &[Slot]) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let faults = (0..n)
            .map(|_| {
                let s = *Scenario::ALL.choose(&mut rng).expect("not empty");
                draw(&mut rng, s, hold, layout)
            })
            .collect();
        let replay = format!(
            "--seed {seed} --random {n} --duration {}",
            humantime::format_duration(hold)
        );
        Self {
            seed,
            faults,
            replay,
        }
    }
}

fn regions(layout: &[Slot]) -> Vec<String> {
    let mut r: Vec<String> = layout.iter().map(|s| s.region.clone()).collect();
    r.sort();
    r.dedup();
    r
}

fn draw(rng: &mut ChaCha8Rng, scenario: Scenario, hold: Duration, layout: &[Slot]) -> Fault {
    let node = |rng: &mut ChaCha8Rng| {
        layout
            .choose(rng)
            .map(|s| s.name.clone())
            .unwrap_or_default()
    };
    let regions = regions(layout);
    let region = |rng: &mut ChaCha8Rng| regions.choose(rng).cloned().unwrap_or_default();
    let in_region = |r: &str| -> Vec<String> {
        layout
            .iter()
            .filter(|s| s.region == r)
            .map(|s| s.name.clone())
            .collect()
    };
    // Holds vary by ±25% around the asked one; quiet gaps are 1-3 s.
    // Whole milliseconds: the schedule round-trips through its JSON form.
    let hold =
        Duration::from_millis((hold.as_millis() as f64 * rng.random_range(0.75..1.25)) as u64);
    let after = Duration::from_millis(rng.random_range(1000..3000));
    let action = match scenario {
        Scenario::NodeKill => Action::KillStageHolder { pick: rng.random() },
        Scenario::LeaderKill => Action::KillLeader,
        Scenario::RegionKill => Action::Kill {
            nodes: in_region(&region(rng)),
        },
        Scenario::Pause => Action::Pause { node: node(rng) },
        Scenario::PartitionNode => Action::Partition {
            side: vec![node(rng)],
            one_way: false,
        },
        Scenario::PartitionRegion => Action::Partition {
            side: in_region(&region(rng)),
            one_way: false,
        },
        Scenario::PartitionOneWay => Action::Partition {
            side: vec![node(rng)],
            one_way: true,
        },
        Scenario::Latency => {
            let a = region(rng);
            let others: Vec<&String> = regions.iter().filter(|r| **r != a).collect();
            let b = others
                .choose(rng)
                .map_or_else(|| a.clone(), |r| (*r).clone());
            Action::Latency {
                a,
                b,
                rtt_ms: rng.random_range(200..600),
                jitter_ms: rng.random_range(20..100),
            }
        }
        Scenario::ClockSkew => {
            let minutes = rng.random_range(5..30) as i64;
            let sign = if rng.random_bool(0.5) { 1 } else { -1 };
            Action::ClockSkew {
                node: node(rng),
                skew_ms: sign * minutes * 60_000,
            }
        }
        Scenario::CpuPressure => Action::CpuLimit {
            node: node(rng),
            permille: 100,
        },
        Scenario::MemoryPressure => Action::MemoryLimit {
            node: node(rng),
            headroom_mb: 16,
        },
        Scenario::DiskFull => Action::FillDisk { node: node(rng) },
        Scenario::StaleDataDir => Action::StaleRestart { node: node(rng) },
        Scenario::MembershipChange => Action::DrainKillLeader {
            pick: rng.random(),
            delay_ms: rng.random_range(0..300),
        },
    };
    Fault {
        scenario,
        action,
        after,
        hold,
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Vec<Slot> {
        [
            ("us-east-1", "us-east"),
            ("us-east-2", "us-east"),
            ("us-west-1", "us-west"),
            ("eu-central-1", "eu-central"),
            ("ap-southeast-1", "ap-southeast"),
        ]
        .into_iter()
        .map(|(n, r)| Slot {
            name: n.into(),
            region: r.into(),
        })
        .collect()
    }

    #[test]
    fn a_seed_replays_and_another_differs() {
        let l = layout();
        let hold = Duration::from_secs(8);
        let a = Schedule::new(7, &Scenario::ALL, hold, &l);
        assert_eq!(a, Schedule::new(7, &Scenario::ALL, hold, &l));
        assert_ne!(a, Schedule::new(8, &Scenario::ALL, hold, &l));
        let r = Schedule::random(3, 50, hold, &l);
        assert_eq!(r, Schedule::random(3, 50, hold, &l));
        assert_eq!(r.faults.len(), 50);
        // The JSON form round-trips (the report carries it).
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Schedule>(&json).unwrap(), a);
    }

    #[test]
    fn targets_come_from_the_layout() {
        let l = layout();
        for seed in 0..200 {
            for f in Schedule::new(seed, &Scenario::ALL, Duration::from_secs(4), &l).faults {
                assert!(f.hold >= Duration::from_secs(3) && f.hold <= Duration::from_secs(5));
                match &f.action {
                    Action::Kill { nodes } | Action::Partition { side: nodes, .. } => {
                        assert!(!nodes.is_empty());
                        // A region's nodes, or one node.
                        let region = &l.iter().find(|s| s.name == nodes[0]).unwrap().region;
                        assert!(
                            nodes.len() == 1
                                || nodes.iter().all(|n| {
                                    l.iter().any(|s| &s.name == n && &s.region == region)
                                })
                        );
                    }
                    Action::Latency { a, b, .. } => assert_ne!(a, b),
                    Action::ClockSkew { skew_ms, .. } => {
                        assert!((5 * 60_000..30 * 60_000).contains(&skew_ms.abs()));
                    }
                    _ => {}
                }
            }
        }
    }
}
