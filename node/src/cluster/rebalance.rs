//! `nodectl rebalance`: evening out the load the leaders carry, at a pace operators choose.
//!
//! Placement ([`super::placement`]) keeps replica and leader *counts* even on its own; what it
//! cannot see is that groups differ in load. A group's leader runs its sessions, receives its
//! users' locations and fans them out, so a node's load is the sum of the load of the groups it
//! leads — measured as the users online in each group, which the pushes follow. [`plan`] is pure:
//! from the map and each group's load it picks leadership moves that narrow the gap between the
//! busiest and the idlest node up, one at a time on a copy of the map, and never leaves leader
//! counts further apart than placement tolerates (a node leading two more groups than another
//! would have placement move one back): a single transfer when the busiest node leads more
//! groups than the idlest, else a swap of a busy group for an idle one.
//!
//! The plan is carried out (see `operate.rs`) within two limits, like PD's store limit: at most
//! `max_concurrent` moves at once, and a [`Buckets`] token bucket per node — each move takes a
//! token from every node it touches, and tokens come back at `rate` per second — so a node's
//! clients are redirected at a bounded pace however large the plan.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nearby_raft::meta::NodeState;
use nearby_raft::{ClusterMap, GroupId, NodeId, META_GROUP};

use super::placement::Step;

/// The most moves one plan holds.
pub const MAX_PLAN: usize = 64;

/// A gap at or below this share of the mean node load is even enough.
const EVEN_ENOUGH: f64 = 0.1;

/// Each node's load: the sum of the load of the shard groups it leads (up nodes only).
pub fn node_loads(map: &ClusterMap, load: &BTreeMap<GroupId, u64>) -> BTreeMap<NodeId, u64> {
    let mut out: BTreeMap<NodeId, u64> = map
        .nodes
        .iter()
        .filter(|(_, e)| e.state == NodeState::Up)
        .map(|(n, _)| (*n, 0))
        .collect();
    for (g, e) in &map.groups {
        if *g == META_GROUP {
            continue;
        }
        if let Some(l) = e.leader.and_then(|l| out.get_mut(&l)) {
            *l += load.get(g).copied().unwrap_or(0);
        }
    }
    out
}

/// Leadership moves that even out the leaders' load (see the module doc), at most `limit`.
pub fn plan(map: &ClusterMap, load: &BTreeMap<GroupId, u64>, limit: usize) -> Vec<Step> {
    let mut future = map.clone();
    let mut steps = Vec::new();
    let weight = |g: &GroupId| load.get(g).copied().unwrap_or(0) as i128;
    while steps.len() < limit.min(MAX_PLAN) {
        let loads = node_loads(&future, load);
        let (Some((&hot, &most)), Some((&cold, &least))) = (
            loads.iter().max_by_key(|(n, l)| (**l, std::cmp::Reverse(**n))),
            loads.iter().min_by_key(|(n, l)| (**l, **n)),
        ) else {
            break;
        };
        let mean = loads.values().sum::<u64>() as f64 / loads.len().max(1) as f64;
        let gap = i128::from(most) - i128::from(least);
        if hot == cold || gap as f64 <= (mean * EVEN_ENOUGH).max(1.0) {
            break;
        }
        let led = |n: NodeId| -> Vec<GroupId> {
            future
                .groups
                .iter()
                .filter(|(g, e)| **g != META_GROUP && e.leader == Some(n) && e.learners.is_empty())
                .map(|(g, _)| *g)
                .collect()
        };
        let (hot_led, cold_led) = (led(hot), led(cold));
        let voter_on = |g: &GroupId, n: NodeId| future.groups.get(g).is_some_and(|e| e.voters.contains(&n));
        // A transfer keeps leader counts within one of each other only if the hot node leads
        // more groups than the cold one.
        let mut best: Option<(i128, Vec<Step>)> = None;
        if hot_led.len() > cold_led.len() {
            for g in hot_led.iter().filter(|g| voter_on(g, cold)) {
                let after = (gap - 2 * weight(g)).abs();
                if after < gap && best.as_ref().is_none_or(|(b, _)| after < *b) {
                    best = Some((after, vec![Step::TransferLeader { group: *g, to: cold }]));
                }
            }
        }
        for g in hot_led.iter().filter(|g| voter_on(g, cold)) {
            for h in cold_led.iter().filter(|h| voter_on(h, hot)) {
                let after = (gap - 2 * (weight(g) - weight(h))).abs();
                if after < gap && best.as_ref().is_none_or(|(b, _)| after < *b) {
                    best = Some((
                        after,
                        vec![
                            Step::TransferLeader { group: *g, to: cold },
                            Step::TransferLeader { group: *h, to: hot },
                        ],
                    ));
                }
            }
        }
        let Some((_, chosen)) = best else { break };
        for step in chosen {
            step.assume_done(&mut future);
            steps.push(step);
        }
    }
    steps
}

/// The nodes a step touches: the ones whose clients it moves.
pub fn nodes_of(map: &ClusterMap, step: &Step) -> Vec<NodeId> {
    let leader = map.leader(step.group());
    let mut nodes: Vec<NodeId> = match *step {
        Step::TransferLeader { to, .. } => vec![to],
        Step::AddReplica { node, .. } | Step::RemoveReplica { node, .. } => vec![node],
    };
    nodes.extend(leader);
    nodes.sort_unstable();
    nodes.dedup();
    nodes
}

/// One token bucket per node (see the module doc): a bucket holds at most one token, and gets
/// one back every `1 / rate` seconds.
#[derive(Debug)]
pub struct Buckets {
    every: Duration,
    /// When each node's bucket was last emptied.
    spent: BTreeMap<NodeId, Instant>,
}

impl Buckets {
    /// Buckets refilled at `rate` tokens per second (at least one an hour).
    pub fn new(rate: f64) -> Self {
        let every = if rate.is_finite() && rate > 1.0 / 3600.0 {
            Duration::from_secs_f64(1.0 / rate)
        } else {
            Duration::from_secs(3600)
        };
        Buckets {
            every,
            spent: BTreeMap::new(),
        }
    }

    /// Takes a token from each of `nodes` at `now` if all have one; else says how long until
    /// they all will.
    pub fn take(&mut self, nodes: &[NodeId], now: Instant) -> Result<(), Duration> {
        let wait = nodes
            .iter()
            .filter_map(|n| self.spent.get(n))
            .map(|t| (*t + self.every).saturating_duration_since(now))
            .max()
            .unwrap_or(Duration::ZERO);
        if wait > Duration::ZERO {
            return Err(wait);
        }
        for n in nodes {
            self.spent.insert(*n, now);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearby_raft::meta::{initial_ranges, MetaCommand};
    use nearby_raft::NodeInfo;

    /// `nodes` nodes, `groups` groups with a voter on every node, group `g` led by `leaders[g-1]`.
    fn cluster(nodes: u64, leaders: &[NodeId]) -> ClusterMap {
        let mut m = ClusterMap::default();
        m.apply(&MetaCommand::Bootstrap {
            cluster: "c".into(),
            node: 1,
            info: NodeInfo::default(),
            ranges: initial_ranges(leaders.len() as u64),
        });
        for n in 2..=nodes {
            m.apply(&MetaCommand::AddNode {
                node: n,
                info: NodeInfo::new(format!("r{n}"), "", ""),
            });
        }
        for (i, l) in leaders.iter().enumerate() {
            let group = i as u64 + 1;
            m.apply(&MetaCommand::SetMembers {
                group,
                voters: (1..=nodes).collect(),
                learners: Default::default(),
            });
            m.apply(&MetaCommand::SetLeader {
                group,
                leader: *l,
                term: 5,
            });
        }
        m
    }

    fn leaders_count(m: &ClusterMap) -> BTreeMap<NodeId, usize> {
        let mut c = BTreeMap::new();
        for (g, e) in &m.groups {
            if *g != META_GROUP {
                *c.entry(e.leader.unwrap_or(0)).or_insert(0) += 1;
            }
        }
        c
    }

    #[test]
    fn two_hot_groups_on_one_node_are_spread_and_counts_stay_even() {
        // Node 1 leads the two busy groups; nodes 2 and 3 one idle group each.
        let mut m = cluster(3, &[1, 1, 2, 3]);
        let load = BTreeMap::from([(1, 100), (2, 90), (3, 2), (4, 1)]);
        let before = node_loads(&m, &load);
        assert_eq!(before[&1], 190);
        let steps = plan(&m, &load, 8);
        assert!(!steps.is_empty());
        for s in &steps {
            s.assume_done(&mut m);
        }
        let after = node_loads(&m, &load);
        let spread = |l: &BTreeMap<NodeId, u64>| {
            l.values().max().copied().unwrap_or(0) - l.values().min().copied().unwrap_or(0)
        };
        // The best there is: the two busy groups on two nodes, the idle ones on the third.
        assert_eq!(
            after.values().max(),
            Some(&100),
            "{before:?} -> {after:?} by {steps:?}"
        );
        assert!(spread(&after) < spread(&before));
        let counts = leaders_count(&m);
        let (most, least) = (counts.values().max().copied(), counts.values().min().copied());
        assert!(most.zip(least).is_some_and(|(a, b)| a - b <= 1), "{counts:?}");
        // Planned again, nothing more is worth doing.
        assert!(plan(&m, &load, 8).is_empty(), "{:?}", plan(&m, &load, 8));
    }

    #[test]
    fn an_even_or_unbalanceable_cluster_gets_no_plan() {
        let m = cluster(3, &[1, 2, 3]);
        assert!(plan(&m, &BTreeMap::from([(1, 10), (2, 10), (3, 11)]), 8).is_empty());
        // One hot group: moving it only moves the heat.
        assert!(plan(&m, &BTreeMap::from([(1, 500)]), 8).is_empty());
        // No load at all.
        assert!(plan(&m, &BTreeMap::new(), 8).is_empty());
    }

    #[test]
    fn a_swap_trades_a_busy_group_for_an_idle_one_when_counts_are_equal() {
        // Each node leads two groups; node 1's are both busy.
        let mut m = cluster(3, &[1, 1, 2, 2, 3, 3]);
        let load = BTreeMap::from([(1, 50), (2, 50), (3, 1), (4, 1), (5, 1), (6, 1)]);
        let steps = plan(&m, &load, 8);
        assert_eq!(steps.len() % 2, 0, "swaps come in pairs: {steps:?}");
        for s in &steps {
            s.assume_done(&mut m);
        }
        assert!(leaders_count(&m).values().all(|c| *c == 2));
        let after = node_loads(&m, &load);
        assert!(after.values().all(|l| *l <= 52), "{after:?}");
    }

    #[test]
    fn buckets_let_a_node_move_once_per_interval() {
        let mut b = Buckets::new(2.0);
        let t0 = Instant::now();
        assert_eq!(b.take(&[1, 2], t0), Ok(()));
        let wait = b
            .take(&[2, 3], t0 + Duration::from_millis(100))
            .expect_err("node 2 is empty");
        assert_eq!(wait, Duration::from_millis(400));
        assert_eq!(b.take(&[3], t0 + Duration::from_millis(100)), Ok(()));
        assert_eq!(b.take(&[2, 3], t0 + Duration::from_millis(600)), Ok(()));
    }
}
