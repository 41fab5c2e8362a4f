//! What operators ask of the cluster: each node's figures ([`Cluster::stats`], gathered from
//! every node by [`Cluster::cluster_stats`]) and operator steps ([`Cluster::operate`]).
//!
//! An operator's step is taken by the meta group's leader, like placement's own steps, so the
//! two never change one group at once from two places: any node forwards it there. It is checked
//! first (the group exists, the target holds a voter and is up) and refused with the reason;
//! `dry_run` stops after the check. Placement keeps leaders even afterwards: a transfer that
//! leaves one node leading two more groups than another is evened out again. A drain only marks
//! the node draining in the map: placement then empties it (see [`crate::cluster::placement`]);
//! a node is removed only once it holds nothing.

use std::time::Duration;

use nearby_raft::meta::{MetaCommand, MetaResult, NodeState};
use nearby_raft::{NodeId, META_GROUP};

use super::Cluster;
use crate::cluster::placement::{Step, REPLICAS};
use crate::route::peer::{NodeStats, OperatorStep, PeerRequest, PeerResponse, ReplicaStats};

/// How long the admin API waits for a node's figures.
pub const STATS_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an operator's step may take (a transfer waits for the map to show it).
pub const OPERATE_TIMEOUT: Duration = Duration::from_secs(15);

/// `node`'s state in `map`, or why it has none.
fn state_of(map: &nearby_raft::ClusterMap, node: NodeId) -> Result<NodeState, String> {
    map.nodes
        .get(&node)
        .map(|e| e.state)
        .ok_or_else(|| format!("node {node} is not in the cluster"))
}

impl Cluster {
    /// This node's figures.
    pub fn stats(&self) -> NodeStats {
        let hibernation = self.router.hibernation();
        let replicas = self
            .host
            .shards()
            .into_iter()
            .map(|g| {
                let m = g.raft().metrics().borrow().clone();
                let users = g.read_applied(|a| a.state.len());
                ReplicaStats {
                    group: g.id(),
                    leader: m.current_leader == Some(self.me),
                    term: m.current_term,
                    applied: m.last_applied.map_or(0, |l| l.index),
                    last_log: m.last_log_index.unwrap_or(0),
                    asleep: hibernation.is_asleep(g.id()),
                    users: users as u64,
                }
            })
            .collect();
        NodeStats {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: self.started.elapsed().as_secs(),
            cpu_s: crate::procstat::process_cpu_time().map_or(0.0, |d| d.as_secs_f64()),
            rss_bytes: crate::procstat::own_rss_bytes().unwrap_or(0),
            sessions: self.driver_ctx.sessions.len() as u64,
            replicas,
        }
    }

    /// Every node's figures, by node: this node's own, the others' asked over the network
    /// (an error for a node that did not answer within [`STATS_TIMEOUT`]).
    pub async fn cluster_stats(&self) -> Vec<(NodeId, Result<NodeStats, String>)> {
        let view = self.directory.view();
        let asks = view.map.nodes.keys().map(|&node| async move {
            if node == self.me {
                return (node, Ok(self.stats()));
            }
            let answer = self
                .router
                .peers()
                .call_within(node, &PeerRequest::Stats, STATS_TIMEOUT)
                .await;
            let stats = match answer {
                Ok(PeerResponse::Stats(s)) => Ok(*s),
                Ok(other) => Err(format!("unexpected answer: {other:?}")),
                Err(e) => Err(e.to_string()),
            };
            (node, stats)
        });
        futures::future::join_all(asks).await
    }

    /// Checks `step` against the map and, unless `dry_run`, takes it. Must run on the meta
    /// group's leader ([`Cluster::operate_anywhere`] gets it there). Returns what was (or would
    /// be) done.
    pub async fn operate(&self, step: &OperatorStep, dry_run: bool) -> Result<String, String> {
        if !self.router.leads(META_GROUP) {
            return Err("this node does not lead the meta group".into());
        }
        let map = self.directory.view().map.clone();
        match *step {
            OperatorStep::TransferLeader { group, to } => {
                let entry = map
                    .groups
                    .get(&group)
                    .filter(|_| group != META_GROUP)
                    .ok_or_else(|| format!("there is no shard group {group}"))?;
                if !entry.voters.contains(&to) {
                    let voters: Vec<String> = entry.voters.iter().map(ToString::to_string).collect();
                    return Err(format!(
                        "node {to} holds no voter of group {group} (its voters: {})",
                        voters.join(", ")
                    ));
                }
                match state_of(&map, to)? {
                    NodeState::Up => {}
                    state => return Err(format!("node {to} is {state}, not up")),
                }
                let from = entry.leader;
                if from == Some(to) {
                    return Ok(format!("node {to} already leads group {group}: nothing to do"));
                }
                let what = format!(
                    "move the leadership of group {group} from {} to node {to}",
                    from.map_or_else(|| "no leader".to_string(), |n| format!("node {n}"))
                );
                if dry_run {
                    return Ok(format!("would {what}"));
                }
                tracing::info!(group, to, "operator: transferring leadership");
                self.take(&Step::TransferLeader { group, to }).await?;
                Ok(format!("done: {what}"))
            }
            OperatorStep::Drain { node, force } => {
                let state = state_of(&map, node)?;
                if state == NodeState::Draining {
                    return Ok(format!("node {node} is already draining"));
                }
                let left = map
                    .nodes
                    .iter()
                    .filter(|(n, e)| **n != node && e.state == NodeState::Up)
                    .count();
                if left == 0 {
                    return Err(format!(
                        "node {node} is the only node up: nothing could take its groups"
                    ));
                }
                if left < REPLICAS && !force {
                    return Err(format!(
                        "draining node {node} leaves {left} node(s) up: groups would keep {left} replica(s) \
                         instead of {REPLICAS}; add a node first, or pass --force"
                    ));
                }
                let replicas = map.groups_of(node).count();
                let leaders = map.groups.values().filter(|g| g.leader == Some(node)).count();
                let what = format!(
                    "drain node {node} ({state}): hand over {leaders} leadership(s), one group per round, and \
                     replace {replicas} replica(s) on the {left} other node(s) up"
                );
                if dry_run {
                    return Ok(format!("would {what}"));
                }
                tracing::info!(node, "operator: draining");
                self.propose_map(MetaCommand::SetNodeState {
                    node,
                    state: NodeState::Draining,
                })
                .await?;
                Ok(format!("started: {what}"))
            }
            OperatorStep::Undrain { node } => {
                match state_of(&map, node)? {
                    NodeState::Draining => {}
                    state => return Err(format!("node {node} is {state}, not draining")),
                }
                if dry_run {
                    return Ok(format!("would stop draining node {node}"));
                }
                self.propose_map(MetaCommand::SetNodeState {
                    node,
                    state: NodeState::Up,
                })
                .await?;
                Ok(format!("node {node} is up again; what moved stays moved"))
            }
            OperatorStep::RemoveNode { node } => {
                if state_of(&map, node)? == NodeState::Up {
                    return Err(format!(
                        "node {node} is up: drain it first (`nodectl drain {node}`)"
                    ));
                }
                // The map's own rule (no replica left) decides, tried on a copy.
                let cmd = MetaCommand::RemoveNode { node };
                if let MetaResult::Rejected(e) = map.clone().apply(&cmd) {
                    return Err(e.to_string());
                }
                if dry_run {
                    return Ok(format!("would remove node {node} from the cluster"));
                }
                self.propose_map(cmd).await?;
                Ok(format!("node {node} removed from the cluster: stop its process"))
            }
        }
    }

    /// [`Cluster::operate`] on the meta group's leader, wherever it is.
    pub async fn operate_anywhere(&self, step: &OperatorStep, dry_run: bool) -> Result<String, String> {
        if self.router.leads(META_GROUP) {
            return self.operate(step, dry_run).await;
        }
        let leader = self
            .directory
            .leader(META_GROUP)
            .ok_or("the meta group has no known leader; try again")?;
        let req = PeerRequest::Operate {
            step: step.clone(),
            dry_run,
        };
        match self
            .router
            .peers()
            .call_within(leader, &req, OPERATE_TIMEOUT)
            .await
        {
            Ok(PeerResponse::Failed(why)) => Err(why),
            Ok(PeerResponse::Operated(what)) => Ok(what),
            Ok(other) => Err(format!("node {leader} answered {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}
