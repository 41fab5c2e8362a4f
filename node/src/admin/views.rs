//! What the admin API answers, built from the map and every node's figures.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use nearby_raft::{GroupId, NodeId, META_GROUP};
use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::metrics::{gauge, header};
use crate::route::peer::NodeStats;

/// `GET /api/v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusView {
    /// The map's epoch, as the answering node has it.
    pub epoch: u64,
    /// The node that answered.
    pub answered_by: NodeId,
    /// The meta group's leader, if known.
    pub meta_leader: Option<NodeId>,
    /// Shard groups.
    pub groups: usize,
    /// Shard groups without a known leader.
    pub groups_without_leader: usize,
    /// Sessions over every node that answered.
    pub sessions: u64,
    /// Steps placement would take next on this map (replicas to add, move or promote, leaders
    /// to spread; at most a round's 32): 0 once every group is replicated and leaders spread.
    #[serde(default)]
    pub placement_pending: usize,
    /// The node-to-node protocol version every node speaks, as the answering node knows: what
    /// the cluster uses while versions are mixed (`docs/architecture.md`, "Changing the
    /// node-to-node protocol").
    #[serde(default)]
    pub active_protocol: u32,
    /// Every node.
    pub nodes: Vec<NodeView>,
}

/// `GET /api/v1/nodes`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodesView {
    /// The map's epoch.
    pub epoch: u64,
    /// Every node.
    pub nodes: Vec<NodeView>,
}

/// One node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeView {
    /// Its id.
    pub id: NodeId,
    /// `joining`, `up`, `draining` or `down`, as the map says.
    pub state: String,
    /// Node-to-node address.
    pub raft: String,
    /// Client service address.
    pub client: String,
    /// Admin API address (empty if it serves none).
    pub admin: String,
    /// Shard-group replicas the map places on it.
    pub replicas: usize,
    /// Shard groups it leads, by the map.
    pub leaders: usize,
    /// Whether it holds a replica of the meta group (the cluster map).
    pub meta_replica: bool,
    /// Whether it leads the meta group.
    pub meta_leader: bool,
    /// Its own figures, if it answered.
    pub stats: Option<NodeStatsView>,
    /// Why it did not answer.
    pub error: Option<String>,
    /// The node-to-node protocol version the answering node agreed with it (its own newest for
    /// itself); none before a connection.
    #[serde(default)]
    pub protocol: Option<u32>,
}

/// A node's own figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatsView {
    /// Its version.
    pub version: String,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// CPU seconds used.
    pub cpu_s: f64,
    /// Resident memory, bytes.
    pub rss_bytes: u64,
    /// Users with a session on it.
    pub sessions: u64,
    /// Replicas that hibernate.
    pub asleep: usize,
}

/// `GET /api/v1/groups`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupsView {
    /// The map's epoch.
    pub epoch: u64,
    /// Every shard group, by id.
    pub groups: Vec<GroupView>,
}

/// One shard group.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupView {
    /// Its id.
    pub id: GroupId,
    /// The user ids it owns, `[start, end)`.
    pub range: [u64; 2],
    /// Its leader, by the map.
    pub leader: Option<NodeId>,
    /// The term the leader was recorded in.
    pub term: u64,
    /// Nodes holding a replica (voters and learners).
    pub replicas: Vec<NodeId>,
    /// Voters.
    pub voters: Vec<NodeId>,
    /// Learners (replicas catching up).
    pub learners: Vec<NodeId>,
    /// The leader's last applied index, if it answered.
    pub applied: Option<u64>,
    /// The leader's last log index, if it answered.
    pub last_log: Option<u64>,
    /// Users registered, if the leader answered.
    pub users: Option<u64>,
    /// Whether the leader hibernates, if it answered.
    pub asleep: Option<bool>,
    /// Users online (a session on the leader), if the leader answered.
    pub online: Option<u64>,
    /// Location updates the leader accepted since it started leading, if it answered.
    pub updates_total: Option<u64>,
}

/// Every node of the map, with the figures of those that answered.
pub(super) fn node_views(c: &Cluster, stats: &[(NodeId, Result<NodeStats, String>)]) -> Vec<NodeView> {
    let view = c.directory().view();
    let map = &view.map;
    let by_node: BTreeMap<NodeId, &Result<NodeStats, String>> = stats.iter().map(|(n, s)| (*n, s)).collect();
    map.nodes
        .iter()
        .map(|(&id, entry)| {
            let answered = by_node.get(&id);
            NodeView {
                id,
                state: entry.state.to_string(),
                raft: entry.info.raft.clone(),
                client: entry.info.client.clone(),
                admin: entry.info.admin.clone(),
                replicas: map.groups_of(id).filter(|(g, _)| *g != META_GROUP).count(),
                leaders: map
                    .groups
                    .iter()
                    .filter(|(g, e)| **g != META_GROUP && e.leader == Some(id))
                    .count(),
                meta_replica: map.groups.get(&META_GROUP).is_some_and(|m| m.has_replica(id)),
                meta_leader: map.leader(META_GROUP) == Some(id),
                stats: answered.and_then(|s| s.as_ref().ok()).map(|s| NodeStatsView {
                    version: s.version.clone(),
                    uptime_s: s.uptime_s,
                    cpu_s: s.cpu_s,
                    rss_bytes: s.rss_bytes,
                    sessions: s.sessions,
                    asleep: s.replicas.iter().filter(|r| r.asleep).count(),
                }),
                error: match answered {
                    Some(Err(e)) => Some(e.clone()),
                    Some(Ok(_)) => None,
                    None => Some("not asked".into()),
                },
                protocol: c.protocol_with(id),
            }
        })
        .collect()
}

/// The cluster at a glance.
pub(super) async fn status(c: &Cluster) -> StatusView {
    let stats = c.cluster_stats().await;
    let view = c.directory().view();
    let shards = view.map.groups.iter().filter(|(g, _)| **g != META_GROUP);
    let (groups, groups_without_leader) = shards.fold((0, 0), |(n, none), (_, e)| {
        (n + 1, none + usize::from(e.leader.is_none()))
    });
    StatusView {
        epoch: view.map.epoch,
        answered_by: c.directory().me(),
        meta_leader: view.map.leader(META_GROUP),
        groups,
        groups_without_leader,
        placement_pending: crate::cluster::placement::plan_round(&view.map, 32, &Default::default()).len(),
        active_protocol: c.active_protocol(),
        sessions: stats
            .iter()
            .filter_map(|(_, s)| s.as_ref().ok())
            .map(|s| s.sessions)
            .sum(),
        nodes: node_views(c, &stats),
    }
}

/// Every node.
pub(super) async fn nodes(c: &Cluster) -> NodesView {
    let stats = c.cluster_stats().await;
    NodesView {
        epoch: c.directory().epoch(),
        nodes: node_views(c, &stats),
    }
}

/// Every shard group, with its leader's figures.
pub(super) async fn groups(c: &Cluster) -> GroupsView {
    let stats = c.cluster_stats().await;
    GroupsView {
        epoch: c.directory().epoch(),
        groups: group_views(c, &stats),
    }
}

/// Every shard group of the map, by id, with the figures of its leader if it answered.
pub(super) fn group_views(c: &Cluster, stats: &[(NodeId, Result<NodeStats, String>)]) -> Vec<GroupView> {
    let view = c.directory().view();
    view.map
        .groups
        .iter()
        .filter(|(g, _)| **g != META_GROUP)
        .map(|(&id, e)| {
            let led = e.leader.and_then(|l| {
                stats
                    .iter()
                    .find(|(n, _)| *n == l)
                    .and_then(|(_, s)| s.as_ref().ok())
                    .and_then(|s| s.replicas.iter().find(|r| r.group == id))
            });
            GroupView {
                id,
                range: e.range.as_ref().map_or([0, 0], |r| [r.start, r.end]),
                leader: e.leader,
                term: e.term,
                replicas: e.replicas().collect(),
                voters: e.voters.iter().copied().collect(),
                learners: e.learners.iter().copied().collect(),
                applied: led.map(|r| r.applied),
                last_log: led.map(|r| r.last_log),
                users: led.map(|r| r.users),
                asleep: led.map(|r| r.asleep),
                online: led.map(|r| r.online),
                updates_total: led.map(|r| r.updates_total),
            }
        })
        .collect()
}

/// One figure of a replica, for a metric family.
type ReplicaFigure = fn(&crate::route::peer::ReplicaStats) -> f64;

/// Appends this node's cluster metrics (`s` is its [`Cluster::stats`]): the map's epoch, and
/// per replica it holds its role, term, indexes and users; its process's CPU and memory.
pub(super) fn render_node_metrics(c: &Cluster, s: &NodeStats, out: &mut String) {
    gauge(
        out,
        "nearby_map_epoch",
        "The cluster map's epoch as this node has it.",
        c.directory().epoch() as f64,
    );
    gauge(
        out,
        "nearby_uptime_seconds",
        "Seconds since the node started.",
        s.uptime_s as f64,
    );
    header(
        out,
        "nearby_process_cpu_seconds_total",
        "CPU seconds the node's process used.",
        "counter",
    );
    let _ = writeln!(out, "nearby_process_cpu_seconds_total {}", s.cpu_s);
    gauge(
        out,
        "nearby_process_resident_memory_bytes",
        "The node's resident memory.",
        s.rss_bytes as f64,
    );
    if let Some(free) = crate::memory::allocator_free_bytes() {
        let help = format!(
            "Heap the allocator holds free for reuse (handed back to the system above {} MiB).",
            crate::memory::TRIM_ABOVE >> 20
        );
        gauge(out, "nearby_allocator_free_bytes", &help, free as f64);
    }
    let wal = c.host().wal();
    let ws = wal.stats();
    for (name, help, v) in [
        (
            "nearby_wal_records_total",
            "Records written to the write-ahead log.",
            ws.records,
        ),
        (
            "nearby_wal_syncs_total",
            "fdatasync calls of the write-ahead log (group commits).",
            ws.syncs,
        ),
        (
            "nearby_wal_no_space_total",
            "Write-ahead log writes that found the disk full (each waited and tried again).",
            ws.no_space,
        ),
    ] {
        crate::metrics::counter(out, name, help, v);
    }
    gauge(
        out,
        "nearby_wal_space_low",
        "1 while the data disk is below limits.min_free_disk_mb free (changes that add data are refused).",
        if wal.space_low().is_some() { 1.0 } else { 0.0 },
    );
    if let Some(clock) = c.clock_status() {
        gauge(
            out,
            "nearby_clock_holding",
            "1 while the node ignores a step of its system clock that the other nodes do not confirm, or keeps the cluster's time.",
            if clock.holding { 1.0 } else { 0.0 },
        );
        gauge(
            out,
            "nearby_clock_offset_ms",
            "The node's time minus its system clock's, ms (0 while it follows the system clock).",
            clock.offset_ms as f64,
        );
    }
    gauge(
        out,
        "nearby_groups_led",
        "Shard groups this node leads.",
        s.replicas.iter().filter(|r| r.leader).count() as f64,
    );
    gauge(
        out,
        "nearby_groups_asleep",
        "Shard-group replicas on this node that hibernate.",
        s.replicas.iter().filter(|r| r.asleep).count() as f64,
    );
    let families: [(&str, &str, ReplicaFigure); 5] = [
        (
            "nearby_group_leader",
            "1 if this node's replica of the group leads.",
            |r| f64::from(u8::from(r.leader)),
        ),
        (
            "nearby_group_term",
            "The Raft term of this node's replica of the group.",
            |r| r.term as f64,
        ),
        (
            "nearby_group_applied_index",
            "The last log index applied by this node's replica.",
            |r| r.applied as f64,
        ),
        (
            "nearby_group_last_log_index",
            "The last log index of this node's replica.",
            |r| r.last_log as f64,
        ),
        (
            "nearby_group_users",
            "Users registered in the group, as this replica has it.",
            |r| r.users as f64,
        ),
    ];
    for (name, help, value) in families {
        header(out, name, help, "gauge");
        for r in &s.replicas {
            let _ = writeln!(out, "{name}{{group=\"{}\"}} {}", r.group, value(r));
        }
    }
}
