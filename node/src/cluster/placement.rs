//! Where replicas and leaders should be: the meta group's leader compares the map with that and
//! takes one step at a time towards it.
//!
//! [`plan`] is pure: given the map, it returns the next [`Step`] or nothing. Its rules, in order:
//!
//! 1. The meta group has a voter on each of the first [`REPLICAS`] nodes that are up (by id).
//! 2. Every shard group has [`REPLICAS`] replicas on different nodes — fewer only while the
//!    cluster has fewer nodes up. A new replica goes to the up node holding the fewest.
//! 3. Replicas are spread evenly: while a node holds two more than another, one of its groups
//!    gets a replica on the lighter node, and a group with a replica too many loses the one on
//!    its most loaded node (never its leader's). A move is thus add-then-remove: a group never
//!    has fewer replicas than it should.
//! 4. Once everything is placed, leaders are spread evenly: a node leading two more groups than
//!    another hands one over to a replica on the other.
//!
//! A **draining** node (`nodectl drain`) comes before all of these but finishing half-added
//! replicas: it gets nothing new, hands the leadership of each group it leads to another voter
//! (at most [`DRAIN_TRANSFERS_PER_ROUND`] per round, so its clients move to the new leaders at a
//! bounded rate), and each of its replicas is replaced — a new one added elsewhere first, then its
//! own removed — until it holds nothing. A **cordoned** node (`nodectl drain --leaders-only`,
//! before a restart) hands its leaderships over the same way and gets nothing new, but keeps its
//! replicas: it still votes and stores, so a restart costs no copy and no election.
//!
//! Steps go in rounds: [`plan_round`] picks up to a limit of steps for distinct groups, planned
//! one after another on a copy of the map where each earlier one is assumed done, so they agree
//! with each other (two new replicas land on different nodes). A group changes one step at a
//! time (Raft changes membership one at a time); the round's steps run concurrently, and the
//! next round is planned from the map they left. A step that fails is planned again then. A
//! bound on a round keeps moves gradual while letting a fresh cluster of hundreds of groups
//! place them in seconds rather than one after another.

use std::collections::{BTreeMap, BTreeSet};

use nearby_raft::meta::{MetaCommand, NodeState};
use nearby_raft::{ClusterMap, GroupId, NodeId, META_GROUP};

/// Replicas per group (and meta voters) in a cluster large enough.
pub const REPLICAS: usize = 3;

/// Leaderships a draining node hands over per placement round: each moves that group's online
/// users to another node, so a drain redirects clients a group at a time.
pub const DRAIN_TRANSFERS_PER_ROUND: usize = 1;

/// One step towards the placement the rules ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Add a replica of `group` on `node` (learner, catch up, voter).
    AddReplica {
        /// The group.
        group: GroupId,
        /// The node.
        node: NodeId,
    },
    /// Remove the replica of `group` on `node` (the group has one too many).
    RemoveReplica {
        /// The group.
        group: GroupId,
        /// The node.
        node: NodeId,
    },
    /// Move the leadership of `group` to `to`, which holds a voter.
    TransferLeader {
        /// The group.
        group: GroupId,
        /// The node to lead it.
        to: NodeId,
    },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Step::AddReplica { group, node } => write!(f, "add a replica of group {group} on node {node}"),
            Step::RemoveReplica { group, node } => {
                write!(f, "remove the replica of group {group} on node {node}")
            }
            Step::TransferLeader { group, to } => write!(f, "hand group {group}'s leadership to node {to}"),
        }
    }
}

impl Step {
    /// The group the step changes.
    pub fn group(&self) -> GroupId {
        match *self {
            Step::AddReplica { group, .. }
            | Step::RemoveReplica { group, .. }
            | Step::TransferLeader { group, .. } => group,
        }
    }

    /// `map` as it will be once the step is done.
    pub fn assume_done(&self, map: &mut ClusterMap) {
        let Some(g) = map.groups.get(&self.group()) else {
            return;
        };
        let cmd = match *self {
            Step::AddReplica { group, node } => {
                let mut voters = g.voters.clone();
                voters.insert(node);
                let mut learners = g.learners.clone();
                learners.remove(&node);
                MetaCommand::SetMembers {
                    group,
                    voters,
                    learners,
                }
            }
            Step::RemoveReplica { group, node } => {
                let mut voters = g.voters.clone();
                voters.remove(&node);
                let mut learners = g.learners.clone();
                learners.remove(&node);
                MetaCommand::SetMembers {
                    group,
                    voters,
                    learners,
                }
            }
            Step::TransferLeader { group, to } => MetaCommand::SetLeader {
                group,
                leader: to,
                term: g.term + 1,
            },
        };
        map.apply(&cmd);
    }
}

/// Up to `limit` steps for distinct groups, each planned on the map as the ones before it will
/// leave it (see the module doc). Empty when the map is where the rules want it.
pub fn plan_round(map: &ClusterMap, limit: usize, held: &BTreeSet<GroupId>) -> Vec<Step> {
    let mut future = map.clone();
    let mut round: Vec<Step> = Vec::new();
    // A later step of a group already in the round is assumed (so planning moves past it) but
    // left for the next round; the bound stops planning a map whose steps are all of those.
    let draining = |n: NodeId| map.nodes.get(&n).is_some_and(|e| leaves_leadership(e.state));
    let mut transfers = 0;
    // Groups whose leadership move waits for a later round (a drain's beyond the pace, or the
    // meta group's): nothing else of theirs goes first (a replacement replica added before the
    // handover would leave the group with four voters, and a new leader then needs a vote from a
    // follower still loyal to the old one).
    // So are the groups an operator's operation holds (see [`crate::cluster::ops`]).
    let mut deferred: Vec<GroupId> = held.iter().copied().collect();
    for _ in 0..limit.saturating_mul(4) {
        let Some(step) = plan(&future) else { break };
        let drain_transfer = matches!(step, Step::TransferLeader { group, .. }
            if map.groups.get(&group).and_then(|g| g.leader).is_some_and(draining));
        step.assume_done(&mut future);
        // The meta group's leadership moves in a round of its own: the round's other steps
        // write the map, and a candidate behind the leader's log cannot win.
        if matches!(
            step,
            Step::TransferLeader {
                group: META_GROUP,
                ..
            }
        ) {
            if round.is_empty() {
                return vec![step];
            }
            deferred.push(META_GROUP);
            continue;
        }
        if drain_transfer {
            if transfers >= DRAIN_TRANSFERS_PER_ROUND {
                deferred.push(step.group());
                continue;
            }
            transfers += 1;
        }
        if !deferred.contains(&step.group()) && round.iter().all(|s| s.group() != step.group()) {
            round.push(step);
            if round.len() >= limit {
                break;
            }
        }
    }
    round
}

/// The next step, or `None` if the map is where the rules want it.
pub fn plan(map: &ClusterMap) -> Option<Step> {
    let up = nodes_in(map, NodeState::Up);
    if up.is_empty() {
        return None;
    }
    let want = REPLICAS.min(up.len());
    // A replica left half-added (a step that failed after the map named it a learner) is
    // finished first: adding it again is idempotent, and then it votes.
    for (id, g) in &map.groups {
        if let Some(&node) = g.learners.iter().find(|n| up.contains(n)) {
            return Some(Step::AddReplica { group: *id, node });
        }
    }
    if let Some(step) = drain(map, &up, want) {
        return Some(step);
    }
    if let Some(meta) = map.groups.get(&META_GROUP) {
        let missing = up.iter().take(REPLICAS).find(|n| !meta.has_replica(**n));
        if let (Some(&node), true) = (missing, meta.voters.len() < want) {
            return Some(Step::AddReplica {
                group: META_GROUP,
                node,
            });
        }
    }
    // Replicas held per node, to place new ones on the least loaded.
    let mut load: BTreeMap<NodeId, usize> = up.iter().map(|n| (*n, 0)).collect();
    for (id, g) in &map.groups {
        if *id == META_GROUP {
            continue;
        }
        for n in g.replicas() {
            if let Some(c) = load.get_mut(&n) {
                *c += 1;
            }
        }
    }
    for (id, g) in &map.groups {
        if *id == META_GROUP {
            continue;
        }
        // A replica on a node that is down still counts: the node may come back, and replacing a
        // node is an operator's decision (it touches only the groups the node held).
        if g.replicas().count() < want {
            if let Some(node) = lightest_without(&load, g) {
                return Some(Step::AddReplica { group: *id, node });
            }
        }
    }
    // A group with a replica too many (the second half of a move) loses the one on the most
    // loaded node that does not lead it.
    // Counted against every node of the map, not only those up: a node that is down for a
    // moment keeps its replicas.
    let most = REPLICAS.min(map.nodes.len());
    for (id, g) in &map.groups {
        if *id == META_GROUP || g.replicas().count() <= most || !g.learners.is_empty() {
            continue;
        }
        let victim = g
            .voters
            .iter()
            // Never a node that is down (it keeps its replicas), nor the leader.
            .filter(|n| g.leader != Some(**n) && load.contains_key(n))
            .max_by_key(|n| (load.get(n).copied().unwrap_or(usize::MAX), **n));
        if let Some(&node) = victim {
            return Some(Step::RemoveReplica { group: *id, node });
        }
    }
    if let Some(step) = balance_leaders(map, &up) {
        return Some(step);
    }
    // Even out replicas: a group of the heaviest node, not led by it, gets a replica on the
    // lightest (and then loses the heavy node's, by the rule above).
    let (&heavy, &most) = load.iter().max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n)))?;
    let (&light, &fewest) = load.iter().min_by_key(|(n, c)| (**c, **n))?;
    if most <= fewest + 1 {
        return None;
    }
    map.groups
        .iter()
        .find(|(id, g)| {
            **id != META_GROUP
                && g.voters.contains(&heavy)
                && g.leader != Some(heavy)
                && !g.has_replica(light)
                && g.learners.is_empty()
        })
        .map(|(id, _)| Step::AddReplica {
            group: *id,
            node: light,
        })
}

/// The node holding the fewest replicas (lowest id first) among those in `load` without one of
/// the group `g`: where its next replica goes.
fn lightest_without(load: &BTreeMap<NodeId, usize>, g: &nearby_raft::meta::GroupEntry) -> Option<NodeId> {
    load.iter()
        .filter(|(n, _)| !g.has_replica(**n))
        .min_by_key(|(n, c)| (**c, **n))
        .map(|(n, _)| *n)
}

/// The nodes of the map in `state`, by id.
fn nodes_in(map: &ClusterMap, state: NodeState) -> Vec<NodeId> {
    map.nodes
        .iter()
        .filter(|(_, n)| n.state == state)
        .map(|(id, _)| *id)
        .collect()
}

/// Whether a node in `state` hands its leaderships over (draining or cordoned).
fn leaves_leadership(state: NodeState) -> bool {
    matches!(state, NodeState::Draining | NodeState::Cordoned)
}

/// The next step off a draining or cordoned node (see the module doc): its leaderships first,
/// then (draining only) each of its replicas replaced (added elsewhere, then removed).
fn drain(map: &ClusterMap, up: &[NodeId], want: usize) -> Option<Step> {
    let draining = nodes_in(map, NodeState::Draining);
    let leaving: Vec<NodeId> = map
        .nodes
        .iter()
        .filter(|(_, e)| leaves_leadership(e.state))
        .map(|(id, _)| *id)
        .collect();
    if leaving.is_empty() {
        return None;
    }
    let mut leading: BTreeMap<NodeId, usize> = up.iter().map(|n| (*n, 0)).collect();
    let mut load: BTreeMap<NodeId, usize> = up.iter().map(|n| (*n, 0)).collect();
    for g in map.groups.values() {
        if let Some(c) = g.leader.and_then(|l| leading.get_mut(&l)) {
            *c += 1;
        }
        for n in g.replicas() {
            if let Some(c) = load.get_mut(&n) {
                *c += 1;
            }
        }
    }
    for (id, g) in &map.groups {
        if g.leader.is_some_and(|l| leaving.contains(&l)) {
            let to = g
                .voters
                .iter()
                .filter(|n| leading.contains_key(n))
                .min_by_key(|n| (leading.get(n).copied().unwrap_or(usize::MAX), **n));
            if let Some(&to) = to {
                return Some(Step::TransferLeader { group: *id, to });
            }
        }
    }
    for (id, g) in &map.groups {
        let Some(&on) = g
            .replicas()
            .collect::<Vec<_>>()
            .iter()
            .find(|n| draining.contains(n))
        else {
            continue;
        };
        let healthy = g.replicas().filter(|n| !draining.contains(n)).count();
        if healthy < want {
            if let Some(node) = lightest_without(&load, g) {
                return Some(Step::AddReplica { group: *id, node });
            }
        } else if g.leader != Some(on) && g.learners.is_empty() {
            return Some(Step::RemoveReplica { group: *id, node: on });
        }
    }
    None
}

/// Leaders evened out: a node leading two more groups than another hands one to a replica there.
fn balance_leaders(map: &ClusterMap, up: &[NodeId]) -> Option<Step> {
    let mut leading: BTreeMap<NodeId, Vec<GroupId>> = up.iter().map(|n| (*n, Vec::new())).collect();
    for (id, g) in &map.groups {
        if *id == META_GROUP || !g.learners.is_empty() {
            continue;
        }
        if let Some(l) = g.leader.filter(|l| leading.contains_key(l)) {
            leading.entry(l).or_default().push(*id);
        }
    }
    let (&most, busiest) = leading
        .iter()
        .max_by_key(|(n, gs)| (gs.len(), std::cmp::Reverse(**n)))?;
    let (&least, idlest) = leading.iter().min_by_key(|(n, gs)| (gs.len(), **n))?;
    if busiest.len() <= idlest.len() + 1 || most == least {
        return None;
    }
    busiest
        .iter()
        .find(|g| map.groups.get(g).is_some_and(|e| e.voters.contains(&least)))
        .map(|g| Step::TransferLeader { group: *g, to: least })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearby_raft::meta::{initial_ranges, MetaCommand};
    use nearby_raft::NodeInfo;

    fn cluster(nodes: u64, groups: u64) -> ClusterMap {
        let mut m = ClusterMap::default();
        m.apply(&MetaCommand::Bootstrap {
            cluster: "c".into(),
            node: 1,
            info: NodeInfo::default(),
            ranges: initial_ranges(groups),
        });
        for n in 2..=nodes {
            m.apply(&MetaCommand::AddNode {
                node: n,
                info: NodeInfo::new(format!("r{n}"), "", ""),
            });
        }
        m
    }

    /// Carries out steps as if each succeeded at once; returns them.
    fn converge(m: &mut ClusterMap) -> Vec<Step> {
        let mut steps = Vec::new();
        while let Some(step) = plan(m) {
            assert!(steps.len() < 1_000, "placement does not converge: {steps:?}");
            step.assume_done(m);
            steps.push(step);
        }
        steps
    }

    /// Carries out rounds as if each succeeded at once; returns how many it took.
    fn converge_in_rounds(m: &mut ClusterMap, limit: usize) -> usize {
        let mut rounds = 0;
        loop {
            let round = plan_round(m, limit, &BTreeSet::new());
            if round.is_empty() {
                return rounds;
            }
            assert!(round.len() <= limit);
            let mut groups: Vec<GroupId> = round.iter().map(Step::group).collect();
            groups.dedup();
            assert_eq!(
                groups.len(),
                round.len(),
                "one step per group in a round: {round:?}"
            );
            for step in &round {
                step.assume_done(m);
            }
            rounds += 1;
            assert!(rounds < 1_000, "placement does not converge in rounds");
        }
    }

    #[test]
    fn rounds_reach_the_same_placement_as_single_steps_in_far_fewer_rounds() {
        let mut one = cluster(3, 256);
        let steps = converge(&mut one).len();
        let mut many = cluster(3, 256);
        let rounds = converge_in_rounds(&mut many, 32);
        assert!(steps >= 512, "two new replicas per group: {steps}");
        assert!(rounds * 8 < steps, "{rounds} rounds for {steps} steps");
        for (id, g) in &many.groups {
            assert_eq!(g.voters.len(), 3, "group {id}");
        }
        let mut leaders: BTreeMap<NodeId, usize> = BTreeMap::new();
        let mut replicas: BTreeMap<NodeId, usize> = BTreeMap::new();
        for (id, g) in &many.groups {
            if *id != META_GROUP {
                *leaders.entry(g.leader.expect("leader")).or_default() += 1;
                for n in &g.voters {
                    *replicas.entry(*n).or_default() += 1;
                }
            }
        }
        let spread = |m: &BTreeMap<NodeId, usize>| {
            m.values().max().copied().unwrap_or(0) - m.values().min().copied().unwrap_or(0)
        };
        assert!(spread(&leaders) <= 1 && leaders.len() == 3, "{leaders:?}");
        assert!(spread(&replicas) <= 1, "{replicas:?}");
    }

    #[test]
    fn a_draining_node_hands_over_its_leaders_a_group_at_a_time_then_ends_up_holding_nothing() {
        let mut m = cluster(4, 8);
        converge(&mut m);
        let led = |m: &ClusterMap, n: NodeId| m.groups.values().filter(|g| g.leader == Some(n)).count();
        let held = |m: &ClusterMap, n: NodeId| m.groups.values().filter(|g| g.has_replica(n)).count();
        let victim = (1..=4).max_by_key(|n| led(&m, *n)).expect("a node");
        assert!(led(&m, victim) >= 2 && held(&m, victim) >= 2);
        m.apply(&MetaCommand::SetNodeState {
            node: victim,
            state: NodeState::Draining,
        });
        // Rounds may move many replicas at once, but one leadership at a time.
        let mut rounds = 0;
        loop {
            let round = plan_round(&m, 32, &BTreeSet::new());
            if round.is_empty() {
                break;
            }
            let transfers = round
                .iter()
                .filter(|s| {
                    matches!(s, Step::TransferLeader { group, .. }
                    if m.groups.get(group).and_then(|g| g.leader) == Some(victim))
                })
                .count();
            assert!(transfers <= DRAIN_TRANSFERS_PER_ROUND, "{round:?}");
            for step in &round {
                // A handover needs the old leader's vote to be enough: never in four voters.
                if let Step::TransferLeader { group, .. } = step {
                    assert!(m.groups[group].voters.len() <= 3, "{step:?} in {m:?}");
                }
                assert!(
                    !matches!(step, Step::AddReplica { node, .. } if *node == victim),
                    "a draining node got a replica: {step:?}"
                );
                step.assume_done(&mut m);
            }
            rounds += 1;
            assert!(rounds < 100, "the drain does not converge");
        }
        assert_eq!((led(&m, victim), held(&m, victim)), (0, 0), "{m:?}");
        for (id, g) in &m.groups {
            assert_eq!(g.voters.len(), 3, "group {id} keeps three voters");
        }
    }

    #[test]
    fn a_cordoned_node_of_three_hands_over_its_leaders_keeps_its_replicas_and_leads_again_when_up() {
        let mut m = cluster(3, 6);
        converge(&mut m);
        let led = |m: &ClusterMap, n: NodeId| m.groups.values().filter(|g| g.leader == Some(n)).count();
        let held = |m: &ClusterMap, n: NodeId| m.groups.values().filter(|g| g.has_replica(n)).count();
        let before = m.clone();
        // Node 1 leads the meta group and shard groups: a rolling restart's first node.
        assert!(led(&m, 1) >= 2, "{m:?}");
        m.apply(&MetaCommand::SetNodeState {
            node: 1,
            state: NodeState::Cordoned,
        });
        let steps = converge(&mut m);
        assert!(
            steps
                .iter()
                .all(|s| matches!(s, Step::TransferLeader { to, .. } if *to != 1)),
            "only leaderships move, never to the cordoned node: {steps:?}"
        );
        assert_eq!(led(&m, 1), 0, "{m:?}");
        assert_eq!(held(&m, 1), held(&before, 1), "it keeps every replica");
        for (id, g) in &m.groups {
            assert_eq!(g.voters, before.groups[id].voters, "group {id}");
        }
        // Up again: leaders are spread back to it, and still no replica moves.
        m.apply(&MetaCommand::SetNodeState {
            node: 1,
            state: NodeState::Up,
        });
        let steps = converge(&mut m);
        assert!(
            steps.iter().all(|s| matches!(s, Step::TransferLeader { .. })),
            "{steps:?}"
        );
        assert!(led(&m, 1) >= 1, "{m:?}");
    }

    #[test]
    fn the_meta_leadership_moves_in_a_round_of_its_own() {
        let mut m = cluster(4, 8);
        converge(&mut m);
        let meta_leader = m.groups[&META_GROUP].leader.expect("meta leader");
        m.apply(&MetaCommand::SetNodeState {
            node: meta_leader,
            state: NodeState::Draining,
        });
        let round = plan_round(&m, 32, &BTreeSet::new());
        assert!(
            matches!(
                round.as_slice(),
                [Step::TransferLeader {
                    group: META_GROUP,
                    ..
                }]
            ),
            "{round:?}"
        );
    }

    #[test]
    fn a_single_node_needs_nothing() {
        assert_eq!(plan(&cluster(1, 4)), None);
    }

    #[test]
    fn three_nodes_get_three_replicas_of_everything_and_even_leaders() {
        let mut m = cluster(3, 16);
        converge(&mut m);
        for (id, g) in &m.groups {
            assert_eq!(g.voters.len(), 3, "group {id}");
        }
        let mut leaders: BTreeMap<NodeId, usize> = BTreeMap::new();
        for (id, g) in &m.groups {
            if *id != META_GROUP {
                *leaders.entry(g.leader.expect("leader")).or_default() += 1;
            }
        }
        let (min, max) = (leaders.values().min(), leaders.values().max());
        assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{leaders:?}");
        assert_eq!(leaders.len(), 3);
    }

    #[test]
    fn five_nodes_spread_replicas_and_keep_meta_on_the_first_three() {
        let mut m = cluster(5, 10);
        converge(&mut m);
        let meta: Vec<NodeId> = m.groups[&META_GROUP].voters.iter().copied().collect();
        assert_eq!(meta, vec![1, 2, 3]);
        let mut per_node: BTreeMap<NodeId, usize> = BTreeMap::new();
        for (id, g) in &m.groups {
            if *id != META_GROUP {
                assert_eq!(g.voters.len(), 3);
                for n in &g.voters {
                    *per_node.entry(*n).or_default() += 1;
                }
            }
        }
        // 30 replicas over 5 nodes.
        assert!(per_node.values().all(|c| (5..=7).contains(c)), "{per_node:?}");
        let max = per_node.values().max().copied().unwrap_or(0);
        let min = per_node.values().min().copied().unwrap_or(0);
        assert!(max - min <= 1, "{per_node:?}");
    }

    #[test]
    fn a_node_that_goes_down_keeps_its_replicas() {
        let mut m = cluster(3, 4);
        converge(&mut m);
        m.apply(&MetaCommand::SetNodeState {
            node: 2,
            state: NodeState::Down,
        });
        let steps = converge(&mut m);
        assert!(
            steps
                .iter()
                .all(|s| !matches!(s, Step::RemoveReplica { .. } | Step::AddReplica { .. })),
            "{steps:?}"
        );
        assert!(m.groups.values().all(|g| g.has_replica(2)));
    }

    #[test]
    fn a_half_added_replica_is_finished_first_and_a_down_node_is_never_the_one_removed() {
        let mut m = cluster(4, 2);
        converge(&mut m);
        m.apply(&MetaCommand::AddReplica {
            group: 1,
            node: 4,
            voter: false,
        });
        assert_eq!(plan(&m), Some(Step::AddReplica { group: 1, node: 4 }));
        m.apply(&MetaCommand::SetNodeState {
            node: 2,
            state: NodeState::Down,
        });
        m.apply(&MetaCommand::AddReplica {
            group: 1,
            node: 4,
            voter: true,
        });
        // Group 1 now has a replica too many; the down node's is not the one to go.
        if let Some(Step::RemoveReplica { node, .. }) = plan(&m) {
            assert_ne!(node, 2);
        }
    }

    #[test]
    fn a_down_node_gets_nothing_new() {
        let mut m = cluster(4, 4);
        m.apply(&MetaCommand::SetNodeState {
            node: 4,
            state: NodeState::Down,
        });
        converge(&mut m);
        assert!(m.groups.values().all(|g| !g.has_replica(4)));
    }
}
