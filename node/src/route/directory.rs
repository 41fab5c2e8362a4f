//! The node's cached copy of the cluster map, and the leader hints that are newer than it.
//!
//! Every routing decision on a node reads the [`Directory`]: which group owns a user, which
//! node leads a group, how to reach a node. The map itself changes only through the meta group
//! (the cluster's one source of truth for ranges and placement); a node learns new maps from its
//! own meta replica or by watching a peer's, and [`Directory::install`] keeps only maps newer
//! than the one it has (by epoch), so a late answer never rolls the copy back.
//!
//! Leader changes reach the map a moment after they happen (the new leader reports itself), so
//! the directory also keeps *hints*: leaders learnt first-hand from a local replica's Raft state
//! or from a peer's "not the leader" answer, with the term they lead in. A hint from a newer term
//! than the map's wins.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nearby_index::friends::RangeTable;
use nearby_index::geo::UserId;
use nearby_raft::{ClusterMap, GroupId, NodeId, NodeInfo};
use tokio::sync::watch;

/// A map together with the lookup table derived from it.
#[derive(Debug)]
pub struct MapView {
    /// The map.
    pub map: ClusterMap,
    /// Its ranges, as a lookup table.
    pub ranges: Arc<RangeTable<GroupId>>,
}

/// The node's view of the cluster (see the module doc).
pub struct Directory {
    me: NodeId,
    view: watch::Sender<Arc<MapView>>,
    hints: Mutex<HashMap<GroupId, (u64, NodeId)>>,
}

impl Directory {
    /// A directory for node `me`, starting from `map`.
    pub fn new(me: NodeId, map: ClusterMap) -> Self {
        let view = Arc::new(MapView {
            ranges: Arc::new(map.range_table()),
            map,
        });
        Directory {
            me,
            view: watch::channel(view).0,
            hints: Mutex::new(HashMap::new()),
        }
    }

    /// This node's id.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// The current map and its ranges.
    pub fn view(&self) -> Arc<MapView> {
        Arc::clone(&self.view.borrow())
    }

    /// The current map's epoch.
    pub fn epoch(&self) -> u64 {
        self.view.borrow().map.epoch
    }

    /// Wakes on every newer map.
    pub fn watch(&self) -> watch::Receiver<Arc<MapView>> {
        self.view.subscribe()
    }

    /// Replaces the map with `map` if it is newer; returns whether it was.
    pub fn install(&self, map: ClusterMap) -> bool {
        let current = self.view.borrow();
        if map.epoch <= current.map.epoch {
            return false;
        }
        if current.map.is_bootstrapped() && map.cluster != current.map.cluster {
            tracing::error!(ours = %current.map.cluster, theirs = %map.cluster, "ignored a map of another cluster");
            return false;
        }
        drop(current);
        let epoch = map.epoch;
        let view = Arc::new(MapView {
            ranges: Arc::new(map.range_table()),
            map,
        });
        self.view.send_replace(view);
        tracing::debug!(epoch, "cluster map installed");
        true
    }

    /// The group owning `user`.
    pub fn group_of(&self, user: UserId) -> Option<GroupId> {
        self.view.borrow().ranges.locate(user).copied()
    }

    /// How to reach `node`.
    pub fn node(&self, node: NodeId) -> Option<NodeInfo> {
        self.view.borrow().map.node(node).cloned()
    }

    /// Node `node`'s node-to-node address, if the map has the node.
    pub fn raft_address(&self, node: NodeId) -> Option<String> {
        self.view.borrow().map.node(node).map(|n| n.raft.clone())
    }

    /// Records that `leader` leads `group` in `term` (first-hand knowledge).
    pub fn hint_leader(&self, group: GroupId, leader: NodeId, term: u64) {
        let mut hints = self.hints.lock().unwrap_or_else(|p| p.into_inner());
        let e = hints.entry(group).or_insert((term, leader));
        if term >= e.0 {
            *e = (term, leader);
        }
    }

    /// The node leading `group`, as best known: a hint from a newer term than the map's wins.
    pub fn leader(&self, group: GroupId) -> Option<NodeId> {
        let view = self.view.borrow();
        let from_map = view
            .map
            .groups
            .get(&group)
            .and_then(|g| g.leader.map(|l| (g.term, l)));
        let hint = self
            .hints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .copied();
        match (from_map, hint) {
            (Some((mt, ml)), Some((ht, hl))) => Some(if ht > mt { hl } else { ml }),
            (a, b) => a.or(b).map(|(_, l)| l),
        }
    }

    /// The client address of `group`'s leader, if known and not this node.
    pub fn leader_client_addr(&self, group: GroupId) -> Option<String> {
        self.leader(group)
            .filter(|l| *l != self.me)
            .and_then(|l| self.node(l))
            .map(|n| n.client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearby_raft::meta::{initial_ranges, MetaCommand};

    fn map() -> ClusterMap {
        let mut m = ClusterMap::default();
        m.apply(&MetaCommand::Bootstrap {
            cluster: "c".into(),
            node: 1,
            info: NodeInfo::new("r1", "c1", ""),
            ranges: initial_ranges(2),
        });
        m.apply(&MetaCommand::AddNode {
            node: 2,
            info: NodeInfo::new("r2", "c2", ""),
        });
        m
    }

    #[test]
    fn only_newer_maps_of_the_same_cluster_are_installed() {
        let d = Directory::new(1, map());
        let older = d.view().map.clone();
        let mut newer = older.clone();
        newer.apply(&MetaCommand::SetLeader {
            group: 1,
            leader: 2,
            term: 3,
        });
        assert!(d.install(newer.clone()));
        assert!(!d.install(older), "an older map rolled the copy back");
        let mut foreign = newer.clone();
        foreign.cluster = "other".into();
        foreign.epoch += 10;
        assert!(!d.install(foreign));
        assert_eq!(d.epoch(), newer.epoch);
    }

    #[test]
    fn a_hint_from_a_newer_term_beats_the_map() {
        let d = Directory::new(1, map());
        assert_eq!(d.leader(1), Some(1));
        d.hint_leader(1, 2, 5);
        assert_eq!(d.leader(1), Some(2));
        assert_eq!(d.leader_client_addr(1).as_deref(), Some("c2"));
        d.hint_leader(1, 1, 4);
        assert_eq!(d.leader(1), Some(2), "an older hint won");
    }
}
