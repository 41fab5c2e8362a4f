//! The cluster map: the state machine of the meta group ([`crate::META_GROUP`]).
//!
//! The map is the only source of truth for *where things are*: which nodes belong to the
//! cluster and how to reach them, which shard group owns which range of user ids, which nodes
//! hold each group's replicas, and which node last led each group. Every change increments
//! [`ClusterMap::epoch`], so two copies of the map are ordered by their epochs, and a message
//! routed by an older map can be recognised and refused.
//!
//! The map *mirrors* each group's Raft membership rather than driving it: membership changes are
//! made in the group itself (openraft's `add_learner` / `change_membership`) by the node that
//! places replicas, and recorded here before (learners to be) and after (voters) each step, so a
//! node always knows which replicas it must host. Leaders are recorded as hints, with the term
//! they were elected in, so a stale report never overwrites a newer one.
//!
//! This module never does I/O and never reads a clock.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use nearby_index::friends::{RangeTable, UserRange};
use serde::{Deserialize, Serialize};

use crate::{GroupId, NodeId, NodeInfo, META_GROUP};

/// The first user id (0 is reserved; `u64::MAX` is the exclusive end of the last range).
pub const FIRST_USER_ID: u64 = 1;

/// `n` equal ranges covering every user id, numbered as groups `1..=n`: how a new cluster's
/// user-id space is cut.
pub fn initial_ranges(n: u64) -> Vec<(GroupId, UserRange)> {
    let n = n.max(1);
    let span = (u64::MAX - FIRST_USER_ID) / n;
    (0..n)
        .filter_map(|i| {
            let start = FIRST_USER_ID + i * span;
            let end = if i + 1 == n { u64::MAX } else { start + span };
            // start < end always holds: span >= 1 for any n < u64::MAX.
            UserRange::new(start, end).ok().map(|r| (i + 1, r))
        })
        .collect()
}

/// A node's state in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeState {
    /// Added to the map; not yet serving.
    Joining,
    /// Serving.
    Up,
    /// Moving its replicas, leaders and clients elsewhere before it leaves.
    Draining,
    /// Unreachable (as last judged by the meta group's leader).
    Down,
    /// Handing its leaderships over and taking none, but keeping its replicas: a node about to
    /// restart (`nodectl drain --leaders-only`, a rolling upgrade).
    Cordoned,
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeState::Joining => "joining",
            NodeState::Up => "up",
            NodeState::Draining => "draining",
            NodeState::Down => "down",
            NodeState::Cordoned => "cordoned",
        })
    }
}

/// One node of the map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// How to reach it.
    pub info: NodeInfo,
    /// Its state.
    pub state: NodeState,
}

/// One Raft group of the map: the meta group, or a shard group and its range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupEntry {
    /// The user ids it owns; `None` for the meta group.
    pub range: Option<UserRange>,
    /// Nodes holding a voting replica.
    pub voters: BTreeSet<NodeId>,
    /// Nodes holding a replica that is catching up (not voting yet).
    pub learners: BTreeSet<NodeId>,
    /// The last leader reported, if any.
    pub leader: Option<NodeId>,
    /// The term that leader was elected in.
    pub term: u64,
    /// The group this one was split from, until the split is done: its replicas are made by
    /// the split itself (each from its parent's replica), never opened empty.
    pub born_of: Option<GroupId>,
    /// Added to its log indices to number its relation intents (its parent's split index for a
    /// group born of a split, else 0; see `GroupState::seq_base`).
    pub seq_base: u64,
}

impl GroupEntry {
    /// Every node that holds a replica, voting or not.
    pub fn replicas(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.voters.iter().chain(self.learners.iter()).copied()
    }

    /// Whether `node` holds a replica.
    pub fn has_replica(&self, node: NodeId) -> bool {
        self.voters.contains(&node) || self.learners.contains(&node)
    }
}

/// A change to the cluster map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// The first entry of a new cluster: its identity, its first node, and the shard groups the
    /// user-id space starts with, all on that node. Refused on a map that is already bootstrapped.
    Bootstrap {
        /// The cluster's identity (random, chosen by `init`).
        cluster: String,
        /// The first node.
        node: NodeId,
        /// How to reach it.
        info: NodeInfo,
        /// The initial ranges and their groups (ids above [`META_GROUP`]).
        ranges: Vec<(GroupId, UserRange)>,
    },
    /// A node joins (or, already known, updates its addresses).
    AddNode {
        /// The node.
        node: NodeId,
        /// How to reach it.
        info: NodeInfo,
    },
    /// A node's state changes.
    SetNodeState {
        /// The node.
        node: NodeId,
        /// The new state.
        state: NodeState,
    },
    /// A group's replicas, as its membership now is (or is about to be).
    SetMembers {
        /// The group.
        group: GroupId,
        /// Voting replicas.
        voters: BTreeSet<NodeId>,
        /// Catching-up replicas.
        learners: BTreeSet<NodeId>,
    },
    /// `node` holds a replica of `group`: a learner (catching up), or a voter. Relative to the
    /// map as it is when applied, so two changes of one group never undo each other.
    AddReplica {
        /// The group.
        group: GroupId,
        /// The node.
        node: NodeId,
        /// Whether it votes (else it is a learner).
        voter: bool,
    },
    /// `node` no longer holds a replica of `group`.
    RemoveReplica {
        /// The group.
        group: GroupId,
        /// The node.
        node: NodeId,
    },
    /// A group's leader, as elected in `term`. Ignored if the map knows a newer term.
    SetLeader {
        /// The group.
        group: GroupId,
        /// The leader.
        leader: NodeId,
        /// The term it leads.
        term: u64,
    },
    /// A node leaves the cluster for good (an operator's decision, once it holds no replica).
    RemoveNode {
        /// The node.
        node: NodeId,
    },
    /// Shard group `group` split at `at` (its own log says so first): `new_group` owns `at..`
    /// of its range, on the same voters, led by `leader` in `term`, numbering its intents from
    /// `seq_base`. Until [`MetaCommand::SplitDone`], the new group is `born_of` the old.
    Split {
        /// The group that split.
        group: GroupId,
        /// The first user id of the new group.
        at: u64,
        /// The new group.
        new_group: GroupId,
        /// The new group's leader.
        leader: NodeId,
        /// Its term.
        term: u64,
        /// The split's index in `group`'s log.
        seq_base: u64,
    },
    /// The split that made `group` is done: its replicas are ordinary ones.
    SplitDone {
        /// The new group.
        group: GroupId,
    },
    /// Shard group `source` was absorbed by its neighbour `group` (their logs say so first):
    /// `group` owns both ranges, and `source` leaves the map (its replicas close).
    Merge {
        /// The group that absorbed.
        group: GroupId,
        /// The group absorbed.
        source: GroupId,
    },
}

impl fmt::Display for MetaCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaCommand::Bootstrap { node, ranges, .. } => {
                write!(f, "bootstrap(node {node}, {} ranges)", ranges.len())
            }
            MetaCommand::AddNode { node, info } => write!(f, "add_node({node}, {info})"),
            MetaCommand::SetNodeState { node, state } => write!(f, "node_state({node}, {state})"),
            MetaCommand::SetMembers {
                group,
                voters,
                learners,
            } => write!(f, "members({group}, voters {voters:?}, learners {learners:?})"),
            MetaCommand::AddReplica { group, node, voter } => {
                write!(f, "add_replica({group} on {node}, voter {voter})")
            }
            MetaCommand::RemoveReplica { group, node } => write!(f, "remove_replica({group} on {node})"),
            MetaCommand::SetLeader { group, leader, term } => {
                write!(f, "leader({group} = {leader} in term {term})")
            }
            MetaCommand::RemoveNode { node } => write!(f, "remove_node({node})"),
            MetaCommand::Split {
                group, at, new_group, ..
            } => write!(f, "split({group} at {at} into {new_group})"),
            MetaCommand::SplitDone { group } => write!(f, "split_done({group})"),
            MetaCommand::Merge { group, source } => write!(f, "merge({source} into {group})"),
        }
    }
}

/// Why a change to the map was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MetaError {
    /// `Bootstrap` on a map that already has a cluster.
    #[error("the cluster {cluster} is already bootstrapped")]
    AlreadyBootstrapped {
        /// The existing cluster's identity.
        cluster: String,
    },
    /// A change before `Bootstrap`.
    #[error("the cluster is not bootstrapped")]
    NotBootstrapped,
    /// The node is not in the map.
    #[error("unknown node {node}")]
    UnknownNode {
        /// The node.
        node: NodeId,
    },
    /// The group is not in the map.
    #[error("unknown group {group}")]
    UnknownGroup {
        /// The group.
        group: GroupId,
    },
    /// Bootstrap ranges that overlap, leave gaps, or reuse the meta group's id.
    #[error("invalid ranges: {reason}")]
    InvalidRanges {
        /// What is wrong.
        reason: String,
    },
    /// A group with no voter.
    #[error("group {group} must keep at least one voter")]
    NoVoters {
        /// The group.
        group: GroupId,
    },
    /// A node still holding replicas cannot leave.
    #[error("node {node} still holds replicas of groups {groups:?}: drain it first")]
    NodeInUse {
        /// The node.
        node: NodeId,
        /// The groups it holds.
        groups: Vec<GroupId>,
    },
}

/// What applying a [`MetaCommand`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResult {
    /// The map changed; its epoch is now this.
    Changed {
        /// The new epoch.
        epoch: u64,
    },
    /// Nothing to change.
    Unchanged,
    /// Refused; nothing changed.
    Rejected(MetaError),
}

impl fmt::Display for MetaResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaResult::Changed { epoch } => write!(f, "changed (epoch {epoch})"),
            MetaResult::Unchanged => f.write_str("unchanged"),
            MetaResult::Rejected(e) => write!(f, "rejected: {e}"),
        }
    }
}

/// The cluster map (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// The cluster's identity; empty until bootstrapped.
    pub cluster: String,
    /// Grows with every change.
    pub epoch: u64,
    /// Every node, by id.
    pub nodes: BTreeMap<NodeId, NodeEntry>,
    /// Every group, the meta group included, by id.
    pub groups: BTreeMap<GroupId, GroupEntry>,
}

impl ClusterMap {
    /// Whether the map belongs to a bootstrapped cluster.
    pub fn is_bootstrapped(&self) -> bool {
        !self.cluster.is_empty()
    }

    /// The shard groups' ranges as a lookup table.
    pub fn range_table(&self) -> RangeTable<GroupId> {
        let entries = self
            .groups
            .iter()
            .filter_map(|(id, g)| g.range.map(|r| (r, *id)))
            .collect();
        // Ranges are checked to tile the id space when they enter the map.
        RangeTable::new(entries).unwrap_or_else(|_| RangeTable::empty())
    }

    /// The group owning `user`.
    pub fn group_of(&self, user: u64) -> Option<GroupId> {
        self.groups
            .iter()
            .find(|(_, g)| g.range.is_some_and(|r| r.contains(user)))
            .map(|(id, _)| *id)
    }

    /// How to reach `node`.
    pub fn node(&self, node: NodeId) -> Option<&NodeInfo> {
        self.nodes.get(&node).map(|n| &n.info)
    }

    /// The last leader reported for `group`.
    pub fn leader(&self, group: GroupId) -> Option<NodeId> {
        self.groups.get(&group).and_then(|g| g.leader)
    }

    /// The groups of which `node` holds a replica.
    pub fn groups_of(&self, node: NodeId) -> impl Iterator<Item = (GroupId, &GroupEntry)> + '_ {
        self.groups
            .iter()
            .filter(move |(_, g)| g.has_replica(node))
            .map(|(id, g)| (*id, g))
    }

    /// Applies one change (see [`MetaCommand`]); deterministic on every replica.
    pub fn apply(&mut self, cmd: &MetaCommand) -> MetaResult {
        let outcome = match cmd {
            MetaCommand::Bootstrap {
                cluster,
                node,
                info,
                ranges,
            } => self.bootstrap(cluster, *node, info, ranges),
            _ if !self.is_bootstrapped() => Err(MetaError::NotBootstrapped),
            MetaCommand::AddNode { node, info } => {
                let entry = NodeEntry {
                    info: info.clone(),
                    state: NodeState::Up,
                };
                match self.nodes.get(node) {
                    Some(old) if old.info == *info => Ok(false),
                    Some(old) => {
                        let state = old.state;
                        self.nodes.insert(*node, NodeEntry { state, ..entry });
                        Ok(true)
                    }
                    None => {
                        self.nodes.insert(*node, entry);
                        Ok(true)
                    }
                }
            }
            MetaCommand::SetNodeState { node, state } => match self.nodes.get_mut(node) {
                None => Err(MetaError::UnknownNode { node: *node }),
                Some(n) if n.state == *state => Ok(false),
                Some(n) => {
                    n.state = *state;
                    Ok(true)
                }
            },
            MetaCommand::SetMembers {
                group,
                voters,
                learners,
            } => self.set_members(*group, voters, learners),
            MetaCommand::AddReplica { group, node, voter } => {
                if !self.nodes.contains_key(node) {
                    return MetaResult::Rejected(MetaError::UnknownNode { node: *node });
                }
                match self.groups.get_mut(group) {
                    None => Err(MetaError::UnknownGroup { group: *group }),
                    Some(g) => {
                        let changed = if *voter {
                            let was_learner = g.learners.remove(node);
                            g.voters.insert(*node) || was_learner
                        } else if g.voters.contains(node) {
                            false
                        } else {
                            g.learners.insert(*node)
                        };
                        Ok(changed)
                    }
                }
            }
            MetaCommand::RemoveReplica { group, node } => match self.groups.get_mut(group) {
                None => Err(MetaError::UnknownGroup { group: *group }),
                Some(g) if g.voters.len() == 1 && g.voters.contains(node) => {
                    Err(MetaError::NoVoters { group: *group })
                }
                Some(g) => {
                    let a = g.voters.remove(node);
                    let b = g.learners.remove(node);
                    Ok(a || b)
                }
            },
            MetaCommand::RemoveNode { node } => {
                let held: Vec<GroupId> = self.groups_of(*node).map(|(g, _)| g).collect();
                if !held.is_empty() {
                    Err(MetaError::NodeInUse {
                        node: *node,
                        groups: held,
                    })
                } else {
                    Ok(self.nodes.remove(node).is_some())
                }
            }
            MetaCommand::Split {
                group,
                at,
                new_group,
                leader,
                term,
                seq_base,
            } => self.split(*group, *at, *new_group, *leader, *term, *seq_base),
            MetaCommand::SplitDone { group } => match self.groups.get_mut(group) {
                None => Err(MetaError::UnknownGroup { group: *group }),
                Some(g) => Ok(g.born_of.take().is_some()),
            },
            MetaCommand::Merge { group, source } => self.merge(*group, *source),
            MetaCommand::SetLeader { group, leader, term } => match self.groups.get_mut(group) {
                None => Err(MetaError::UnknownGroup { group: *group }),
                Some(g) if *term < g.term || (*term == g.term && g.leader == Some(*leader)) => Ok(false),
                Some(g) => {
                    g.leader = Some(*leader);
                    g.term = *term;
                    Ok(true)
                }
            },
        };
        match outcome {
            Ok(true) => {
                self.epoch += 1;
                MetaResult::Changed { epoch: self.epoch }
            }
            Ok(false) => MetaResult::Unchanged,
            Err(e) => MetaResult::Rejected(e),
        }
    }

    fn bootstrap(
        &mut self,
        cluster: &str,
        node: NodeId,
        info: &NodeInfo,
        ranges: &[(GroupId, UserRange)],
    ) -> Result<bool, MetaError> {
        if self.is_bootstrapped() {
            return Err(MetaError::AlreadyBootstrapped {
                cluster: self.cluster.clone(),
            });
        }
        let invalid = |reason: String| MetaError::InvalidRanges { reason };
        if cluster.is_empty() {
            return Err(invalid("empty cluster identity".into()));
        }
        if ranges.iter().any(|(g, _)| *g == META_GROUP) {
            return Err(invalid(format!("group {META_GROUP} is the meta group")));
        }
        let mut ids: Vec<GroupId> = ranges.iter().map(|(g, _)| *g).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != ranges.len() {
            return Err(invalid("a group id is used twice".into()));
        }
        let mut sorted: Vec<UserRange> = ranges.iter().map(|(_, r)| *r).collect();
        sorted.sort_by_key(|r| r.start);
        let tiles = sorted.first().is_some_and(|r| r.start == FIRST_USER_ID)
            && sorted.last().is_some_and(|r| r.end == u64::MAX)
            && sorted.windows(2).all(|w| w[0].end == w[1].start);
        if !tiles {
            return Err(invalid(format!(
                "the ranges must tile [{FIRST_USER_ID}, {}) without gaps or overlaps",
                u64::MAX
            )));
        }
        self.cluster = cluster.to_string();
        self.nodes.insert(
            node,
            NodeEntry {
                info: info.clone(),
                state: NodeState::Up,
            },
        );
        let on_first = |range| GroupEntry {
            range,
            voters: [node].into(),
            learners: BTreeSet::new(),
            leader: Some(node),
            term: 0,
            born_of: None,
            seq_base: 0,
        };
        self.groups.insert(META_GROUP, on_first(None));
        for (g, r) in ranges {
            self.groups.insert(*g, on_first(Some(*r)));
        }
        Ok(true)
    }

    fn split(
        &mut self,
        group: GroupId,
        at: u64,
        new_group: GroupId,
        leader: NodeId,
        term: u64,
        seq_base: u64,
    ) -> Result<bool, MetaError> {
        if let Some(g) = self.groups.get(&new_group) {
            // Applied again (a retried proposal): the same split changes nothing.
            return if g.range.is_some_and(|r| r.start == at) {
                Ok(false)
            } else {
                Err(MetaError::InvalidRanges {
                    reason: format!("group {new_group} exists already"),
                })
            };
        }
        let old = self
            .groups
            .get_mut(&group)
            .ok_or(MetaError::UnknownGroup { group })?;
        let range = old.range.ok_or(MetaError::UnknownGroup { group })?;
        let (Ok(kept), Ok(split_off)) = (UserRange::new(range.start, at), UserRange::new(at, range.end))
        else {
            return Err(MetaError::InvalidRanges {
                reason: format!("{at} is not inside group {group}'s range {range}"),
            });
        };
        old.range = Some(kept);
        let entry = GroupEntry {
            range: Some(split_off),
            voters: old.voters.clone(),
            learners: BTreeSet::new(),
            leader: Some(leader),
            term,
            born_of: Some(group),
            seq_base,
        };
        self.groups.insert(new_group, entry);
        Ok(true)
    }

    fn merge(&mut self, group: GroupId, source: GroupId) -> Result<bool, MetaError> {
        let Some(theirs) = self.groups.get(&source).and_then(|g| g.range) else {
            // Applied again (a retried proposal): nothing left to merge. The meta group has
            // no range to give.
            return if !self.groups.contains_key(&source)
                && self.groups.get(&group).is_some_and(|g| g.range.is_some())
            {
                Ok(false)
            } else {
                Err(MetaError::UnknownGroup { group })
            };
        };
        let g = self
            .groups
            .get_mut(&group)
            .ok_or(MetaError::UnknownGroup { group })?;
        let mine = g.range.ok_or(MetaError::UnknownGroup { group })?;
        let joined = if mine.end == theirs.start {
            UserRange::new(mine.start, theirs.end)
        } else if theirs.end == mine.start {
            UserRange::new(theirs.start, mine.end)
        } else {
            return Err(MetaError::InvalidRanges {
                reason: format!("groups {group} ({mine}) and {source} ({theirs}) are not neighbours"),
            });
        };
        g.range = joined.ok();
        self.groups.remove(&source);
        Ok(true)
    }

    fn set_members(
        &mut self,
        group: GroupId,
        voters: &BTreeSet<NodeId>,
        learners: &BTreeSet<NodeId>,
    ) -> Result<bool, MetaError> {
        if voters.is_empty() {
            return Err(MetaError::NoVoters { group });
        }
        if let Some(n) = voters
            .iter()
            .chain(learners)
            .find(|n| !self.nodes.contains_key(n))
        {
            return Err(MetaError::UnknownNode { node: *n });
        }
        let g = self
            .groups
            .get_mut(&group)
            .ok_or(MetaError::UnknownGroup { group })?;
        let learners: BTreeSet<NodeId> = learners.difference(voters).copied().collect();
        if g.voters == *voters && g.learners == learners {
            return Ok(false);
        }
        g.voters = voters.clone();
        g.learners = learners;
        Ok(true)
    }
}

/// The first byte of a versioned map encoding: never the first byte of the first layout's (a
/// varint length, which never starts with 255).
const VERSIONED: u8 = 0xff;

/// The map layout this version writes (2: splits).
const LAYOUT: u8 = 2;

impl ClusterMap {
    /// The map as bytes (snapshots, the node's saved copy): [`VERSIONED`], the layout, then
    /// the encoding.
    pub fn encode_versioned(&self) -> Result<Vec<u8>, nearby_index::error::CodecError> {
        let mut out = vec![VERSIONED, LAYOUT];
        nearby_index::codec::encode_into(self, &mut out)?;
        Ok(out)
    }

    /// A map of this layout or of the first one (before splits), which is converted.
    pub fn decode_versioned(bytes: &[u8]) -> Result<Self, nearby_index::error::CodecError> {
        match bytes {
            [VERSIONED, LAYOUT, rest @ ..] => nearby_index::codec::decode(rest),
            [VERSIONED, other, ..] => Err(nearby_index::error::CodecError::Decode {
                total: bytes.len(),
                reason: format!("map layout {other} is newer than this version knows ({LAYOUT})"),
            }),
            _ => nearby_index::codec::decode::<legacy::ClusterMapV1>(bytes).map(ClusterMap::from),
        }
    }
}

/// The map's first layout.
mod legacy {
    use super::*;

    #[derive(Deserialize)]
    pub(super) struct GroupEntryV1 {
        range: Option<UserRange>,
        voters: BTreeSet<NodeId>,
        learners: BTreeSet<NodeId>,
        leader: Option<NodeId>,
        term: u64,
    }

    #[derive(Deserialize)]
    pub(super) struct ClusterMapV1 {
        cluster: String,
        epoch: u64,
        nodes: BTreeMap<NodeId, NodeEntry>,
        groups: BTreeMap<GroupId, GroupEntryV1>,
    }

    impl From<ClusterMapV1> for ClusterMap {
        fn from(v1: ClusterMapV1) -> ClusterMap {
            let groups = v1
                .groups
                .into_iter()
                .map(|(id, g)| {
                    let entry = GroupEntry {
                        range: g.range,
                        voters: g.voters,
                        learners: g.learners,
                        leader: g.leader,
                        term: g.term,
                        born_of: None,
                        seq_base: 0,
                    };
                    (id, entry)
                })
                .collect();
            ClusterMap {
                cluster: v1.cluster,
                epoch: v1.epoch,
                nodes: v1.nodes,
                groups,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(n: u64) -> NodeInfo {
        NodeInfo::new(format!("127.0.0.{n}:7401"), format!("127.0.0.{n}:7400"), "")
    }

    fn halves() -> Vec<(GroupId, UserRange)> {
        vec![
            (1, UserRange::new(1, 1 << 40).expect("r")),
            (2, UserRange::new(1 << 40, u64::MAX).expect("r")),
        ]
    }

    #[test]
    fn initial_ranges_tile_the_id_space() {
        for n in [1, 2, 4, 7, 64] {
            let r = initial_ranges(n);
            assert_eq!(r.len() as u64, n);
            assert_eq!(r[0].1.start, FIRST_USER_ID);
            assert_eq!(r.last().map(|x| x.1.end), Some(u64::MAX));
            for w in r.windows(2) {
                assert_eq!(w[0].1.end, w[1].1.start);
            }
        }
    }

    fn bootstrapped() -> ClusterMap {
        let mut m = ClusterMap::default();
        let r = m.apply(&MetaCommand::Bootstrap {
            cluster: "c1".into(),
            node: 1,
            info: info(1),
            ranges: halves(),
        });
        assert_eq!(r, MetaResult::Changed { epoch: 1 });
        m
    }

    #[test]
    fn bootstrap_places_every_group_on_the_first_node_once() {
        let mut m = bootstrapped();
        assert_eq!(m.group_of(5), Some(1));
        assert_eq!(m.group_of(1 << 41), Some(2));
        assert_eq!(m.groups_of(1).count(), 3);
        assert_eq!(m.range_table().len(), 2);
        let again = m.apply(&MetaCommand::Bootstrap {
            cluster: "c2".into(),
            node: 2,
            info: info(2),
            ranges: halves(),
        });
        assert!(matches!(
            again,
            MetaResult::Rejected(MetaError::AlreadyBootstrapped { .. })
        ));
        assert_eq!(m.epoch, 1);
    }

    #[test]
    fn every_change_grows_the_epoch_and_no_op_changes_do_not() {
        let mut m = bootstrapped();
        let add = MetaCommand::AddNode {
            node: 2,
            info: info(2),
        };
        assert_eq!(m.apply(&add), MetaResult::Changed { epoch: 2 });
        assert_eq!(m.apply(&add), MetaResult::Unchanged);
        let members = MetaCommand::SetMembers {
            group: 1,
            voters: [1].into(),
            learners: [2].into(),
        };
        assert_eq!(m.apply(&members), MetaResult::Changed { epoch: 3 });
        assert!(m.groups[&1].has_replica(2));
        assert_eq!(m.apply(&members), MetaResult::Unchanged);
        assert_eq!(m.epoch, 3);
    }

    #[test]
    fn a_node_leaves_the_map_only_once_it_holds_no_replica() {
        let mut m = bootstrapped();
        m.apply(&MetaCommand::AddNode {
            node: 2,
            info: info(2),
        });
        // Node 1 holds every group: refused, and the map is as it was.
        let before = m.clone();
        match m.apply(&MetaCommand::RemoveNode { node: 1 }) {
            MetaResult::Rejected(MetaError::NodeInUse { node: 1, groups }) => {
                assert_eq!(groups.len(), 3, "{groups:?}")
            }
            other => panic!("not refused: {other:?}"),
        }
        assert_eq!(m, before);
        // Node 2 holds nothing: it leaves, once.
        assert!(matches!(
            m.apply(&MetaCommand::RemoveNode { node: 2 }),
            MetaResult::Changed { .. }
        ));
        assert!(!m.nodes.contains_key(&2));
        assert_eq!(
            m.apply(&MetaCommand::RemoveNode { node: 2 }),
            MetaResult::Unchanged
        );
    }

    #[test]
    fn replica_changes_are_relative_so_interleaved_steps_never_undo_each_other() {
        let mut m = bootstrapped();
        for n in [2, 3] {
            m.apply(&MetaCommand::AddNode {
                node: n,
                info: info(n),
            });
        }
        let add = |node, voter| MetaCommand::AddReplica {
            group: 1,
            node,
            voter,
        };
        // Two moves in flight: both learners first, then both voters, in any order.
        m.apply(&add(2, false));
        m.apply(&add(3, false));
        m.apply(&add(3, true));
        m.apply(&add(2, true));
        assert_eq!(m.groups[&1].voters, [1, 2, 3].into());
        assert!(m.groups[&1].learners.is_empty());
        assert_eq!(
            m.apply(&add(2, false)),
            MetaResult::Unchanged,
            "a voter turned learner"
        );
        assert!(matches!(
            m.apply(&MetaCommand::RemoveReplica { group: 1, node: 2 }),
            MetaResult::Changed { .. }
        ));
        m.apply(&MetaCommand::RemoveReplica { group: 1, node: 3 });
        assert_eq!(
            m.apply(&MetaCommand::RemoveReplica { group: 1, node: 1 }),
            MetaResult::Rejected(MetaError::NoVoters { group: 1 })
        );
    }

    #[test]
    fn a_stale_leader_report_never_overwrites_a_newer_one() {
        let mut m = bootstrapped();
        m.apply(&MetaCommand::AddNode {
            node: 2,
            info: info(2),
        });
        let lead = |leader, term| MetaCommand::SetLeader {
            group: 1,
            leader,
            term,
        };
        assert!(matches!(m.apply(&lead(2, 5)), MetaResult::Changed { .. }));
        assert_eq!(m.apply(&lead(1, 4)), MetaResult::Unchanged);
        assert_eq!(m.leader(1), Some(2));
    }

    #[test]
    fn bad_changes_are_refused_and_change_nothing() {
        let mut fresh = ClusterMap::default();
        assert_eq!(
            fresh.apply(&MetaCommand::AddNode {
                node: 2,
                info: info(2)
            }),
            MetaResult::Rejected(MetaError::NotBootstrapped)
        );
        let gap = vec![
            (1, UserRange::new(1, 100).expect("r")),
            (2, UserRange::new(200, u64::MAX).expect("r")),
        ];
        let r = fresh.apply(&MetaCommand::Bootstrap {
            cluster: "c".into(),
            node: 1,
            info: info(1),
            ranges: gap,
        });
        assert!(matches!(r, MetaResult::Rejected(MetaError::InvalidRanges { .. })));
        let mut m = bootstrapped();
        let before = m.clone();
        for cmd in [
            MetaCommand::SetMembers {
                group: 1,
                voters: BTreeSet::new(),
                learners: BTreeSet::new(),
            },
            MetaCommand::SetMembers {
                group: 1,
                voters: [9].into(),
                learners: BTreeSet::new(),
            },
            MetaCommand::SetLeader {
                group: 77,
                leader: 1,
                term: 1,
            },
        ] {
            assert!(matches!(m.apply(&cmd), MetaResult::Rejected(_)), "{cmd}");
        }
        assert_eq!(m, before);
    }

    #[test]
    fn a_split_gives_the_upper_part_to_a_new_group_on_the_same_voters() {
        let mut m = bootstrapped();
        let split = MetaCommand::Split {
            group: 1,
            at: 1 << 20,
            new_group: 3,
            leader: 1,
            term: 2,
            seq_base: 40,
        };
        assert!(matches!(m.apply(&split), MetaResult::Changed { .. }));
        assert_eq!(m.groups[&1].range, UserRange::new(1, 1 << 20).ok());
        let new = &m.groups[&3];
        assert_eq!(new.range, UserRange::new(1 << 20, 1 << 40).ok());
        assert_eq!(
            (new.voters.clone(), new.leader, new.born_of, new.seq_base),
            (m.groups[&1].voters.clone(), Some(1), Some(1), 40)
        );
        assert_eq!(m.group_of(1 << 20), Some(3));
        assert_eq!(m.group_of((1 << 20) - 1), Some(1));
        assert_eq!(m.range_table().locate(1 << 30), Some(&3));
        // A retried proposal changes nothing; a point outside the range is refused.
        assert_eq!(m.apply(&split), MetaResult::Unchanged);
        let outside = MetaCommand::Split {
            group: 1,
            at: 1 << 41,
            new_group: 4,
            leader: 1,
            term: 2,
            seq_base: 40,
        };
        assert!(matches!(
            m.apply(&outside),
            MetaResult::Rejected(MetaError::InvalidRanges { .. })
        ));
        assert!(matches!(
            m.apply(&MetaCommand::SplitDone { group: 3 }),
            MetaResult::Changed { .. }
        ));
        assert_eq!(m.groups[&3].born_of, None);
        // Merged back: group 1 owns both ranges again and group 3 leaves the map.
        assert!(matches!(
            m.apply(&MetaCommand::Merge { group: 1, source: 3 }),
            MetaResult::Changed { .. }
        ));
        assert_eq!(m.groups[&1].range, UserRange::new(1, 1 << 40).ok());
        assert!(!m.groups.contains_key(&3));
        assert_eq!(
            m.apply(&MetaCommand::Merge { group: 1, source: 3 }),
            MetaResult::Unchanged
        );
        assert!(matches!(
            m.apply(&MetaCommand::Merge {
                group: 1,
                source: META_GROUP
            }),
            MetaResult::Rejected(_)
        ));
        // The map round-trips, and a map of the first layout still reads.
        assert_eq!(
            ClusterMap::decode_versioned(&m.encode_versioned().expect("encode")).expect("decode"),
            m
        );
        let mut old = bootstrapped();
        old.groups.values_mut().for_each(|g| g.term = 5);
        #[derive(Serialize)]
        struct EntryV1 {
            range: Option<UserRange>,
            voters: BTreeSet<NodeId>,
            learners: BTreeSet<NodeId>,
            leader: Option<NodeId>,
            term: u64,
        }
        #[derive(Serialize)]
        struct MapV1 {
            cluster: String,
            epoch: u64,
            nodes: BTreeMap<NodeId, NodeEntry>,
            groups: BTreeMap<GroupId, EntryV1>,
        }
        let v1 = MapV1 {
            cluster: old.cluster.clone(),
            epoch: old.epoch,
            nodes: old.nodes.clone(),
            groups: old
                .groups
                .iter()
                .map(|(id, g)| {
                    let e = EntryV1 {
                        range: g.range,
                        voters: g.voters.clone(),
                        learners: g.learners.clone(),
                        leader: g.leader,
                        term: g.term,
                    };
                    (*id, e)
                })
                .collect(),
        };
        let bytes = nearby_index::codec::encode(&v1).expect("encode");
        assert_eq!(ClusterMap::decode_versioned(&bytes).expect("first layout"), old);
    }
}
