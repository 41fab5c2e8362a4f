//! What operators ask of the cluster: each node's figures ([`Cluster::stats`], gathered from
//! every node by [`Cluster::cluster_stats`]) and operator steps ([`Cluster::operate`]).
//!
//! An operator's step is taken by the meta group's leader, like placement's own steps, so the
//! two never change one group at once from two places: any node forwards it there. It is checked
//! first (the group exists, the target holds a voter and is up) and refused with the reason;
//! `dry_run` stops after the check. A transfer holds its group while it runs (see
//! [`crate::cluster::ops`]); placement keeps leaders even afterwards: a transfer that leaves one
//! node leading two more groups than another is evened out again once it has finished. A drain only marks
//! the node draining in the map: placement then empties it (see [`crate::cluster::placement`]);
//! a node is removed only once it holds nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nearby_raft::meta::{GroupEntry, MetaCommand, MetaResult, NodeState};
use nearby_raft::{Command, CommandResult, GroupId, NodeId, Payload, Reply, META_GROUP};

use super::Cluster;
use crate::api::ServiceError;
use crate::cluster::ops::{OperationState, OperationView};
use crate::cluster::placement::{Step, REPLICAS};
use crate::group::GroupMsg;
use crate::route::peer::{
    MergeView, NodeStats, Operated, OperatorStep, PeerRequest, PeerResponse, ReadAnswer, ReadQuery,
    ReplicaStats, MAX_ACTIVITY_CELLS,
};
use nearby_client::proto::ErrorCode;

/// How long the admin API waits for a node's figures.
pub const STATS_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`Cluster::stats`] waits for a group's driver to count its users by cell.
pub const CELLS_WAIT: Duration = Duration::from_millis(250);

/// How long an operator's step may take (a transfer waits for the map to show it).
pub const OPERATE_TIMEOUT: Duration = Duration::from_secs(15);

/// Shard group `group` of `map`, or why there is none.
fn shard_entry(map: &nearby_raft::ClusterMap, group: GroupId) -> Result<&GroupEntry, String> {
    map.groups
        .get(&group)
        .filter(|_| group != META_GROUP)
        .ok_or_else(|| format!("there is no shard group {group}"))
}

/// How long a split waits for its new group's first leader (and its first snapshot).
const SPLIT_ELECTION: Duration = Duration::from_secs(20);

/// How long a merge waits for the absorbed group's pending intents to be delivered.
const MERGE_DRAIN: Duration = Duration::from_secs(30);

/// Records per log entry when a merge copies a group's users.
const MERGE_CHUNK: u32 = 128;

/// How often a step of an operation is tried before the operation fails.
const STEP_TRIES: u32 = 3;

/// How long an operator's step waits for the meta group to have a leader.
const META_LEADER_WAIT: Duration = Duration::from_secs(10);

/// How long a merge waits for placement to finish a move of one of its groups.
const PLACEMENT_WAIT: Duration = Duration::from_secs(10);

/// How long an operator's step waits for placement's round under way to finish with its groups
/// (a transfer of placement's takes ~10 ms; the step's own transfer must still fit in
/// [`OPERATE_TIMEOUT`]).
const PLACEMENT_ROUND_WAIT: Duration = Duration::from_secs(4);

/// How long an operation's read or write waits for its group to have a leader (a move or a
/// transfer the operation itself made may have started an election).
const GROUP_LEADER_WAIT: Duration = Duration::from_secs(10);

/// `node`'s state in `map`, or why it has none.
fn state_of(map: &nearby_raft::ClusterMap, node: NodeId) -> Result<NodeState, String> {
    map.nodes
        .get(&node)
        .map(|e| e.state)
        .ok_or_else(|| format!("node {node} is not in the cluster"))
}

/// Runs `call` until it answers anything but `unavailable` (a group between leaders), for at
/// most [`GROUP_LEADER_WAIT`].
async fn patiently<T, F: std::future::Future<Output = Result<T, ServiceError>>>(
    group: GroupId,
    mut call: impl FnMut() -> F,
) -> Result<T, ServiceError> {
    let deadline = Instant::now() + GROUP_LEADER_WAIT;
    loop {
        match call().await {
            Err(e) if e.code == ErrorCode::Unavailable && Instant::now() < deadline => {
                tracing::debug!(group, error = %e.message, "an operation's step waits for the group's leader");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

impl Cluster {
    /// Whether this node is caught up and serving: it has the cluster map, and every shard
    /// replica it holds knows its group's leader and has applied everything in its log. The
    /// reason otherwise (readiness probes: a restarted node is ready once it caught up).
    pub fn readiness(&self) -> Result<(), String> {
        if self.router.directory().epoch() == 0 {
            return Err("no cluster map yet".into());
        }
        let mut leaderless = Vec::new();
        let mut behind = Vec::new();
        for g in self.host.shards() {
            let m = g.raft().metrics().borrow().clone();
            if m.current_leader.is_none() {
                leaderless.push(g.id());
            }
            if m.last_applied.map_or(0, |l| l.index) < m.last_log_index.unwrap_or(0) {
                behind.push(g.id());
            }
        }
        match (leaderless.is_empty(), behind.is_empty()) {
            (true, true) => Ok(()),
            (false, _) => Err(format!("groups {leaderless:?} have no known leader")),
            (true, false) => Err(format!("groups {behind:?} are applying their log")),
        }
    }

    /// This node's figures: its process, its replicas, its client service's counters, and
    /// where the users of the groups it leads are, by coarse cell (each group's driver is asked,
    /// waiting at most [`CELLS_WAIT`]; a driver that is busier than that is left out).
    pub async fn stats(&self) -> NodeStats {
        let hibernation = self.router.hibernation();
        let replicas = self
            .host
            .shards()
            .into_iter()
            .map(|g| {
                let m = g.raft().metrics().borrow().clone();
                let users = g.read_applied(|a| a.state.len());
                let (online, updates_total) = self.drivers.get(g.id()).map_or((0, 0), |d| {
                    let a = d.activity();
                    (
                        a.online.load(std::sync::atomic::Ordering::Relaxed),
                        a.updates.load(std::sync::atomic::Ordering::Relaxed),
                    )
                });
                ReplicaStats {
                    group: g.id(),
                    leader: m.current_leader == Some(self.me),
                    term: m.current_term,
                    applied: m.last_applied.map_or(0, |l| l.index),
                    last_log: m.last_log_index.unwrap_or(0),
                    asleep: hibernation.is_asleep(g.id()),
                    users: users as u64,
                    online,
                    updates_total,
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
            updates_total: self.metrics.updates(),
            pushes_total: self.metrics.pushes(),
            cells: self.cell_counts().await,
        }
    }

    /// Users with a live location in the groups this node leads, by coarse cell: the busiest
    /// [`MAX_ACTIVITY_CELLS`], summed over the groups' drivers.
    async fn cell_counts(&self) -> Vec<(u64, u32)> {
        let asks = self.drivers.all().into_iter().map(|d| async move {
            let (reply, answer) = tokio::sync::oneshot::channel();
            if !d.send(GroupMsg::CellCounts {
                max: MAX_ACTIVITY_CELLS,
                reply,
            }) {
                return Vec::new();
            }
            tokio::time::timeout(CELLS_WAIT, answer)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default()
        });
        let mut sum: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
        for cells in futures::future::join_all(asks).await {
            for (cell, n) in cells {
                *sum.entry(cell).or_insert(0) += n;
            }
        }
        let mut cells: Vec<(u64, u32)> = sum.into_iter().collect();
        nearby_index::activity::busiest(&mut cells, MAX_ACTIVITY_CELLS);
        cells
    }

    /// Every node's figures, by node: this node's own, the others' asked over the network
    /// (an error for a node that did not answer within [`STATS_TIMEOUT`]).
    pub async fn cluster_stats(&self) -> Vec<(NodeId, Result<NodeStats, String>)> {
        let view = self.directory.view();
        let asks = view.map.nodes.keys().map(|&node| async move {
            if node == self.me {
                return (node, Ok(self.stats().await));
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
    pub async fn operate(self: &Arc<Self>, step: &OperatorStep, dry_run: bool) -> Result<Operated, String> {
        if !self.router.leads(META_GROUP) {
            return Err("this node does not lead the meta group".into());
        }
        let map = self.directory.view().map.clone();
        match *step {
            OperatorStep::TransferLeader { group, to } => {
                let entry = shard_entry(&map, group)?;
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
                    return Ok(Operated::said(format!(
                        "node {to} already leads group {group}: nothing to do"
                    )));
                }
                let what = format!(
                    "move the leadership of group {group} from {} to node {to}",
                    from.map_or_else(|| "no leader".to_string(), |n| format!("node {n}"))
                );
                if dry_run {
                    return Ok(Operated::said(format!("would {what}")));
                }
                // Held while it runs: placement evens leaders out, and a round planned while
                // `to` has just taken over would move the leadership on before this step saw
                // its outcome (and would report that `to` never took over).
                let op = self
                    .ops
                    .start("transfer", what.clone(), [group], 1, PLACEMENT_ROUND_WAIT)
                    .await?;
                tracing::info!(id = op.id(), group, to, "operator: transferring leadership");
                let outcome = self.take(&Step::TransferLeader { group, to }).await;
                op.finish(outcome.clone());
                outcome?;
                Ok(Operated::said(format!("done: {what}")))
            }
            OperatorStep::Drain { node, force } => {
                let state = state_of(&map, node)?;
                if state == NodeState::Draining {
                    return Ok(Operated::said(format!("node {node} is already draining")));
                }
                let left = up_besides(&map, node);
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
                self.start_node_state(node, NodeState::Draining, what, dry_run)
                    .await
            }
            OperatorStep::Cordon { node } => {
                match state_of(&map, node)? {
                    NodeState::Up => {}
                    NodeState::Cordoned => {
                        return Ok(Operated::said(format!("node {node} is already cordoned")))
                    }
                    state => return Err(format!("node {node} is {state}, not up")),
                }
                if up_besides(&map, node) == 0 {
                    return Err(format!(
                        "node {node} is the only node up: nobody could lead its groups"
                    ));
                }
                let leaders = map.groups.values().filter(|g| g.leader == Some(node)).count();
                let what = format!(
                    "cordon node {node}: hand over its {leaders} leadership(s), one group per round, and give it none; \
                     its replicas stay (undrain it once it is back)"
                );
                self.start_node_state(node, NodeState::Cordoned, what, dry_run)
                    .await
            }
            OperatorStep::Undrain { node } => {
                let state = state_of(&map, node)?;
                let doing = match state {
                    NodeState::Draining => "draining",
                    NodeState::Cordoned => "cordoning",
                    state => return Err(format!("node {node} is {state}, neither draining nor cordoned")),
                };
                if dry_run {
                    return Ok(Operated::said(format!("would stop {doing} node {node}")));
                }
                self.propose_map(MetaCommand::SetNodeState {
                    node,
                    state: NodeState::Up,
                })
                .await?;
                Ok(Operated::said(format!(
                    "node {node} is up again; what moved stays moved"
                )))
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
                    return Ok(Operated::said(format!(
                        "would remove node {node} from the cluster"
                    )));
                }
                self.propose_map(cmd).await?;
                Ok(Operated::said(format!(
                    "node {node} removed from the cluster: stop its process"
                )))
            }
            OperatorStep::Split { group, at } => {
                let entry = shard_entry(&map, group)?;
                let range = entry.range.ok_or_else(|| format!("group {group} has no range"))?;
                if !entry.learners.is_empty() {
                    return Err(format!(
                        "group {group} is adding a replica: try again once it is placed"
                    ));
                }
                let state = match self.read_patiently(group, ReadQuery::SplitState).await {
                    Ok(ReadAnswer::SplitState { median, pending }) => (median, pending),
                    Ok(other) => return Err(format!("unexpected answer {other:?}")),
                    Err(e) => return Err(format!("cannot read group {group}: {}", e.message)),
                };
                let (new_group, at, resume) = match state {
                    (_, Some((new_group, at, index))) => (new_group, at, Some(index)),
                    (median, None) => {
                        let at = at.or(median).ok_or_else(|| {
                            format!("group {group} has fewer than two users: give the split point (--at)")
                        })?;
                        if at <= range.start || at >= range.end {
                            return Err(format!("{at} is not inside group {group}'s range {range}"));
                        }
                        let next = map.groups.keys().max().copied().unwrap_or(META_GROUP) + 1;
                        (next, at, None)
                    }
                };
                let what = format!(
                    "{} group {group} ({range}) at user {at}: group {group} keeps {}..{at}, new group {new_group} takes {at}..{}",
                    if resume.is_some() { "finish splitting" } else { "split" },
                    range.start,
                    range.end
                );
                if dry_run {
                    return Ok(Operated::said(format!("would {what}")));
                }
                let voters: Vec<NodeId> = entry.voters.iter().copied().collect();
                let op = self
                    .ops
                    .start("split", what.clone(), [group, new_group], 6, PLACEMENT_ROUND_WAIT)
                    .await?;
                let id = op.id().to_string();
                let cluster = Arc::clone(self);
                tokio::spawn(async move {
                    let outcome = cluster.split(&op, group, at, new_group, voters, resume).await;
                    op.finish(outcome);
                });
                Ok(Operated {
                    what: format!("started operation {id}: {what}"),
                    operation: Some(id),
                })
            }
            OperatorStep::Merge { left, right } => {
                // Placement may be in the middle of a move of one of them (a replica added, the
                // old one not yet removed): that finishes in a moment, and the merge then plans
                // on the settled map instead of refusing.
                let map = self.settled_for_merge(left, right, map).await;
                let (l, r) = (shard_entry(&map, left)?, shard_entry(&map, right)?);
                let (Some(lr), Some(rr)) = (l.range, r.range) else {
                    return Err("a group without a range".into());
                };
                if lr.end != rr.start {
                    return Err(format!(
                        "group {right} ({rr}) does not start where group {left} ({lr}) ends: only neighbours merge, the lower range first"
                    ));
                }
                if l.born_of.is_some()
                    || r.born_of.is_some()
                    || !l.learners.is_empty()
                    || !r.learners.is_empty()
                {
                    return Err(
                        "a split or a replica change of these groups is under way: try again once it is done"
                            .into(),
                    );
                }
                let theirs = self.merge_state(right).await?;
                if theirs.splitting {
                    return Err(format!(
                        "group {right} is still handing over a range it split off"
                    ));
                }
                if theirs.frozen.is_some_and(|into| into != left) {
                    return Err(format!("group {right} is being merged into another group"));
                }
                if self
                    .merge_state(left)
                    .await?
                    .absorbing
                    .is_some_and(|g| g != right)
                {
                    return Err(format!("group {left} is absorbing another group"));
                }
                let only_r: Vec<NodeId> = r.voters.difference(&l.voters).copied().collect();
                let only_l: Vec<NodeId> = l.voters.difference(&r.voters).copied().collect();
                if only_r.len() != only_l.len() {
                    return Err(format!(
                        "groups {left} and {right} have different numbers of replicas ({} and {}): let placement finish first",
                        l.voters.len(),
                        r.voters.len()
                    ));
                }
                // Moves that put the right group's replicas on the left group's nodes, each
                // planned on the map as the ones before leave it.
                let mut future = map.clone();
                let mut moves = Vec::new();
                for (from, to) in only_r.iter().zip(&only_l) {
                    let Some(entry) = future.groups.get(&right).cloned() else {
                        break;
                    };
                    for step in move_steps(&future, right, &entry, *from, *to) {
                        step.assume_done(&mut future);
                        moves.push(step);
                    }
                }
                let what = format!(
                    "merge group {right} ({rr}) into group {left} ({lr}){}",
                    if moves.is_empty() {
                        String::new()
                    } else {
                        format!(
                            ", after moving group {right}'s replicas onto group {left}'s nodes ({} steps)",
                            moves.len()
                        )
                    }
                );
                if dry_run {
                    return Ok(Operated::said(format!("would {what}")));
                }
                let op = self
                    .ops
                    .start(
                        "merge",
                        what.clone(),
                        [left, right],
                        moves.len() as u32 + 5,
                        PLACEMENT_ROUND_WAIT,
                    )
                    .await?;
                let id = op.id().to_string();
                let cluster = Arc::clone(self);
                tokio::spawn(async move {
                    let outcome = cluster.merge(&op, left, right, moves).await;
                    op.finish(outcome);
                });
                Ok(Operated {
                    what: format!("started operation {id}: {what}"),
                    operation: Some(id),
                })
            }
            OperatorStep::Rebalance {
                max_concurrent,
                per_minute,
            } => {
                if max_concurrent == 0 || per_minute == 0 {
                    return Err("--max-concurrent and --rate must be at least 1".into());
                }
                // Replica and leader counts are placement's: it evens them out by itself. Load
                // is planned on the map it leaves (a transfer within a group that has a replica
                // too many for a moment would need a vote it cannot get).
                let held = self.ops.held();
                let pending = super::placement::plan_round(&map, super::rebalance::MAX_PLAN, &held);
                if !pending.is_empty() {
                    return Err(format!(
                        "placement is still evening out replicas and leaders ({} step(s), the first: {}); rebalance once it settles",
                        pending.len(),
                        pending[0]
                    ));
                }
                let mut future = map.clone();
                let load = self.group_loads().await;
                let before = super::rebalance::node_loads(&future, &load);
                let steps: Vec<Step> = super::rebalance::plan(&future, &load, super::rebalance::MAX_PLAN)
                    .into_iter()
                    .filter(|s| !held.contains(&s.group()))
                    .collect();
                for s in &steps {
                    s.assume_done(&mut future);
                }
                let after = super::rebalance::node_loads(&future, &load);
                let show = |l: &std::collections::BTreeMap<NodeId, u64>| {
                    l.iter()
                        .map(|(n, v)| format!("node {n}: {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                if steps.is_empty() {
                    return Ok(Operated::said(format!(
                        "nothing to do: online users led per node are {}",
                        show(&before)
                    )));
                }
                let what = format!(
                    "rebalance in {} move(s), at most {max_concurrent} at once and {per_minute} a minute per node; online users led per node {} -> {}:\n  {}",
                    steps.len(),
                    show(&before),
                    show(&after),
                    steps.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  ")
                );
                if dry_run {
                    return Ok(Operated::said(format!("would {what}")));
                }
                let groups: Vec<GroupId> = steps.iter().map(Step::group).collect();
                let op = self
                    .ops
                    .start(
                        "rebalance",
                        what.clone(),
                        groups,
                        steps.len() as u32,
                        PLACEMENT_ROUND_WAIT,
                    )
                    .await?;
                let id = op.id().to_string();
                let cluster = Arc::clone(self);
                tokio::spawn(async move {
                    let outcome = cluster
                        .paced(&op, steps, max_concurrent as usize, per_minute)
                        .await;
                    op.finish(outcome);
                });
                Ok(Operated {
                    what: format!("started operation {id}: {what}"),
                    operation: Some(id),
                })
            }
            OperatorStep::Move { group, from, to } => {
                let entry = shard_entry(&map, group)?;
                if !entry.has_replica(from) {
                    return Err(format!("node {from} holds no replica of group {group}"));
                }
                if entry.has_replica(to) {
                    return Err(format!("node {to} already holds a replica of group {group}"));
                }
                match state_of(&map, to)? {
                    NodeState::Up => {}
                    state => return Err(format!("node {to} is {state}, not up")),
                }
                if !entry.learners.is_empty() {
                    return Err(format!(
                        "group {group} is adding a replica already: try again once it is placed"
                    ));
                }
                let steps = move_steps(&map, group, entry, from, to);
                let what = format!(
                    "move group {group}'s replica from node {from} to node {to} ({})",
                    steps
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", then ")
                );
                if dry_run {
                    return Ok(Operated::said(format!("would {what}")));
                }
                self.run_operation("move", &what, [group], steps).await
            }
        }
    }

    /// Starts an operation of `steps` holding `groups` (see [`super::ops`]), taken one after
    /// another by a task of its own, each tried up to [`STEP_TRIES`] times.
    async fn run_operation(
        self: &Arc<Self>,
        kind: &str,
        what: &str,
        groups: impl IntoIterator<Item = GroupId>,
        steps: Vec<Step>,
    ) -> Result<Operated, String> {
        let op = self
            .ops
            .start(
                kind,
                what.to_string(),
                groups,
                steps.len() as u32,
                PLACEMENT_ROUND_WAIT,
            )
            .await?;
        let id = op.id().to_string();
        let cluster = Arc::clone(self);
        tokio::spawn(async move {
            let outcome = cluster.take_steps(&op, &steps).await;
            op.finish(outcome);
        });
        Ok(Operated {
            what: format!("started operation {id}: {what}"),
            operation: Some(id),
        })
    }

    /// Takes `steps` one after another as steps of `op`; stops at the first that fails.
    async fn take_steps(&self, op: &super::ops::Operation, steps: &[Step]) -> Result<(), String> {
        for step in steps {
            op.step(step.to_string());
            self.take_retrying(step).await?;
            op.stepped();
        }
        Ok(())
    }

    /// Takes `step`, trying again after a second up to [`STEP_TRIES`] times in all.
    async fn take_retrying(&self, step: &Step) -> Result<(), String> {
        let mut tries = 0;
        loop {
            tries += 1;
            // The replica to remove may lead again by now (an election after the handover):
            // its leadership goes to another voter first.
            if let Step::RemoveReplica { group, node } = *step {
                let view = self.directory.view();
                let other = view.map.groups.get(&group).and_then(|g| {
                    g.voters.iter().copied().find(|v| {
                        *v != node && view.map.nodes.get(v).is_some_and(|e| e.state == NodeState::Up)
                    })
                });
                if let (Some(to), true) = (other, view.map.leader(group) == Some(node)) {
                    tracing::info!(group, node, to, "the replica to remove leads: handing over first");
                    let _ = self.take(&Step::TransferLeader { group, to }).await;
                }
            }
            match self.take(step).await {
                Ok(()) => return Ok(()),
                Err(e) if tries >= STEP_TRIES => return Err(format!("{step}: {e}")),
                Err(e) => {
                    tracing::info!(%step, error = %e, tries, "operation step failed; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// The steps of a split (see `docs/architecture.md`, "Splitting a range"), from the log
    /// entry (skipped when `resumed` gives its index) to the map's record that it is done.
    async fn split(
        &self,
        op: &super::ops::Operation,
        group: GroupId,
        at: u64,
        new_group: GroupId,
        voters: Vec<NodeId>,
        resumed: Option<u64>,
    ) -> Result<(), String> {
        let index = match resumed {
            Some(index) => index,
            None => {
                op.step(format!("split group {group}'s log at user {at}"));
                let cmd = Command::Split {
                    at,
                    new_group,
                    voters,
                };
                let (index, reply) = self
                    .router
                    .propose(group, Payload::Shard(cmd))
                    .await
                    .map_err(|e| e.message)?;
                match reply {
                    Reply::Shard(CommandResult::Split { users }) => {
                        tracing::info!(group, new_group, at, users, index, "the group's log split");
                    }
                    other => return Err(format!("group {group} refused the split: {other}")),
                }
                index
            }
        };
        op.stepped();
        op.step(format!("wait for new group {new_group} to elect a leader"));
        let deadline = Instant::now() + SPLIT_ELECTION;
        let (leader, term) = loop {
            let found = self.cluster_stats().await.into_iter().find_map(|(node, stats)| {
                stats
                    .ok()?
                    .replicas
                    .into_iter()
                    .find(|r| r.group == new_group && r.leader)
                    .map(|r| (node, r.term))
            });
            if let Some(found) = found {
                break found;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "new group {new_group} elected no leader in {SPLIT_ELECTION:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        op.stepped();
        op.step(format!("give users {at}.. to group {new_group} in the map"));
        self.propose_map(MetaCommand::Split {
            group,
            at,
            new_group,
            leader,
            term,
            seq_base: index,
        })
        .await?;
        op.stepped();
        op.step(format!(
            "snapshot group {new_group}, so later replicas copy its state"
        ));
        self.compact_on_leader(new_group, SPLIT_ELECTION)
            .await
            .map_err(|e| format!("cannot snapshot group {new_group}: {e}"))?;
        op.stepped();
        op.step(format!("drop group {group}'s copy of what it handed over"));
        self.router
            .propose(group, Payload::Shard(Command::SplitDone))
            .await
            .map_err(|e| e.message)?;
        op.stepped();
        op.step("record the split as done");
        self.propose_map(MetaCommand::SplitDone { group: new_group })
            .await?;
        op.stepped();
        Ok(())
    }

    /// Snapshots `group` on its leader, wherever that is, following leadership changes (a young
    /// group may still change leaders) until `within` has passed.
    async fn compact_on_leader(&self, group: GroupId, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1));
            let attempt = match self.directory.leader(group) {
                None => Err("no known leader".to_string()),
                Some(l) if l == self.me => match self.host.shard(group) {
                    Some(g) => g.compact(left).await.map(drop).map_err(|e| e.to_string()),
                    None => Err("no replica here".into()),
                },
                Some(l) => match self
                    .router
                    .peers()
                    .call_within(l, &PeerRequest::Compact { group }, left)
                    .await
                {
                    Ok(PeerResponse::Done) => Ok(()),
                    Ok(other) => Err(format!("node {l} answered {other:?}")),
                    Err(e) => Err(e.to_string()),
                },
            };
            match attempt {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    tracing::info!(group, error = %e, "snapshot on the group's leader failed; trying again");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// Each shard group's load as its leader reports it: users online.
    async fn group_loads(&self) -> std::collections::BTreeMap<GroupId, u64> {
        self.cluster_stats()
            .await
            .into_iter()
            .filter_map(|(_, s)| s.ok())
            .flat_map(|s| s.replicas.into_iter().filter(|r| r.leader))
            .map(|r| (r.group, r.online))
            .collect()
    }

    /// Takes `steps` in order, at most `max_concurrent` at once and, per node they touch, at
    /// most `per_minute` a minute (see [`super::rebalance::Buckets`]). A step that fails is
    /// tried again up to [`STEP_TRIES`] times; the operation fails with the first that never
    /// succeeds (the steps already taken stay taken).
    async fn paced(
        self: &Arc<Self>,
        op: &super::ops::Operation,
        steps: Vec<Step>,
        max_concurrent: usize,
        per_minute: u32,
    ) -> Result<(), String> {
        let mut buckets = super::rebalance::Buckets::new(f64::from(per_minute) / 60.0);
        let mut waiting: std::collections::VecDeque<Step> = steps.into();
        let mut running = tokio::task::JoinSet::new();
        let mut busy = std::collections::BTreeSet::new();
        let mut first_error = None;
        while !waiting.is_empty() || !running.is_empty() {
            let mut wait = Duration::from_millis(100);
            while running.len() < max_concurrent {
                let Some(step) = waiting.front().cloned() else {
                    break;
                };
                // A group changes one step at a time.
                if busy.contains(&step.group()) {
                    break;
                }
                let nodes = super::rebalance::nodes_of(&self.directory.view().map, &step);
                match buckets.take(&nodes, Instant::now()) {
                    Ok(()) => {
                        waiting.pop_front();
                        op.step(step.to_string());
                        busy.insert(step.group());
                        let me = Arc::clone(self);
                        running.spawn(async move { (step.group(), me.take_retrying(&step).await) });
                    }
                    Err(until) => {
                        wait = until.min(Duration::from_secs(1));
                        break;
                    }
                }
            }
            tokio::select! {
                done = running.join_next(), if !running.is_empty() => {
                    match done {
                        Some(Ok((group, Ok(())))) => {
                            busy.remove(&group);
                            op.stepped();
                        }
                        Some(Ok((_, Err(e)))) => {
                            first_error.get_or_insert(e);
                            waiting.clear();
                        }
                        Some(Err(e)) => {
                            first_error.get_or_insert(e.to_string());
                            waiting.clear();
                        }
                        None => {}
                    }
                }
                () = tokio::time::sleep(wait), if !waiting.is_empty() => {}
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The map once neither group has a replica change under way (a learner, a split not yet
    /// done, a voter added and the old one not yet removed), or `map` again after
    /// [`PLACEMENT_WAIT`].
    async fn settled_for_merge(
        &self,
        left: GroupId,
        right: GroupId,
        mut map: nearby_raft::ClusterMap,
    ) -> nearby_raft::ClusterMap {
        let deadline = Instant::now() + PLACEMENT_WAIT;
        loop {
            let busy = |g: GroupId| {
                map.groups
                    .get(&g)
                    .is_some_and(|e| e.born_of.is_some() || !e.learners.is_empty())
            };
            let counts = |g: GroupId| map.groups.get(&g).map(|e| e.voters.len());
            if !(busy(left) || busy(right)) && counts(left) == counts(right) {
                return map;
            }
            if Instant::now() >= deadline {
                return map;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            map = self.directory.view().map.clone();
        }
    }

    /// [`Router::read`](crate::route::router::Router::read), waiting up to
    /// [`GROUP_LEADER_WAIT`] for the group to have a leader.
    async fn read_patiently(&self, group: GroupId, query: ReadQuery) -> Result<ReadAnswer, ServiceError> {
        patiently(group, || self.router.read(group, query.clone())).await
    }

    /// [`Router::propose`](crate::route::router::Router::propose) of an idempotent command,
    /// waiting up to [`GROUP_LEADER_WAIT`] for the group to have a leader.
    async fn propose_patiently(
        &self,
        group: GroupId,
        payload: Payload,
    ) -> Result<(u64, Reply), ServiceError> {
        patiently(group, || self.router.propose(group, payload.clone())).await
    }

    /// What a merge needs to know of `group`, from its leader.
    async fn merge_state(&self, group: GroupId) -> Result<MergeView, String> {
        match self.read_patiently(group, ReadQuery::MergeState).await {
            Ok(ReadAnswer::MergeState(view)) => Ok(view),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(format!("cannot read group {group}: {}", e.message)),
        }
    }

    /// The steps of a merge of `right` into `left` (see `docs/architecture.md`, "Merging
    /// ranges"), each skipped when a resumed merge finds it done.
    async fn merge(
        &self,
        op: &super::ops::Operation,
        left: GroupId,
        right: GroupId,
        moves: Vec<Step>,
    ) -> Result<(), String> {
        self.take_steps(op, &moves).await?;
        op.step(format!("freeze group {right}"));
        let propose = |group: GroupId, cmd: Command| async move {
            // Every step is idempotent (a resumed merge takes them again), so one whose
            // outcome is unknown is simply tried again.
            match self.propose_patiently(group, Payload::Shard(cmd)).await {
                Ok((_, Reply::Shard(CommandResult::Rejected(e)))) => {
                    Err(format!("group {group} refused: {e}"))
                }
                Ok(_) => Ok(()),
                Err(e) => Err(format!("group {group}: {}", e.message)),
            }
        };
        if self.merge_state(right).await?.frozen != Some(left) {
            propose(right, Command::Freeze { into: left }).await?;
        }
        op.stepped();
        op.step(format!("deliver group {right}'s pending relation intents"));
        let deadline = Instant::now() + MERGE_DRAIN;
        let theirs = loop {
            let s = self.merge_state(right).await?;
            if s.pending_intents == 0 {
                break s;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "group {right} still has {} intents to deliver after {MERGE_DRAIN:?} (a group they go to is unavailable?); `nodectl merge` again resumes",
                    s.pending_intents
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        op.stepped();
        let ours = self.merge_state(left).await?;
        if ours.range.end < theirs.range.end {
            op.step(format!(
                "copy group {right}'s {} users into group {left}",
                theirs.users
            ));
            let mut after = 0;
            loop {
                let query = ReadQuery::Records {
                    after,
                    limit: MERGE_CHUNK,
                };
                let users = match self.read_patiently(right, query).await {
                    Ok(ReadAnswer::Records(users)) => users,
                    Ok(other) => return Err(format!("unexpected answer {other:?}")),
                    Err(e) => return Err(format!("cannot read group {right}: {}", e.message)),
                };
                let Some(last) = users.last().map(|(u, _)| *u) else {
                    break;
                };
                propose(left, Command::AbsorbUsers { source: right, users }).await?;
                after = last;
            }
            op.stepped();
            op.step(format!("give group {right}'s range to group {left}"));
            propose(
                left,
                Command::AbsorbDone {
                    source: right,
                    range: theirs.range,
                    inbox: theirs.inbox,
                },
            )
            .await?;
            op.stepped();
        } else {
            op.stepped();
            op.stepped();
        }
        op.step(format!("record the merge in the map (group {right} leaves it)"));
        self.propose_map(MetaCommand::Merge {
            group: left,
            source: right,
        })
        .await?;
        op.stepped();
        Ok(())
    }

    /// This node's operations.
    pub fn operations(&self) -> &super::ops::Operations {
        &self.ops
    }

    /// Every node's operations (running first), newest first within each node; a node that did
    /// not answer is left out and named in the second list.
    pub async fn cluster_operations(&self) -> (Vec<OperationView>, Vec<NodeId>) {
        let view = self.directory.view();
        let asks = view.map.nodes.keys().map(|&node| async move {
            if node == self.me {
                return (node, Some(self.ops.list()));
            }
            let answer = self
                .router
                .peers()
                .call_within(node, &PeerRequest::Operations, STATS_TIMEOUT)
                .await;
            match answer {
                Ok(PeerResponse::Operations(list)) => (node, Some(list)),
                _ => (node, None),
            }
        });
        let mut all = Vec::new();
        let mut silent = Vec::new();
        for (node, list) in futures::future::join_all(asks).await {
            match list {
                Some(list) => all.extend(list),
                None => silent.push(node),
            }
        }
        all.sort_by_key(|o| {
            (
                o.state != OperationState::Running,
                std::cmp::Reverse(o.started_ms),
            )
        });
        (all, silent)
    }

    /// Puts `node` in `state` (draining, cordoned: placement does the rest), or on a dry run
    /// says it would; `what` says what that starts.
    async fn start_node_state(
        &self,
        node: NodeId,
        state: NodeState,
        what: String,
        dry_run: bool,
    ) -> Result<Operated, String> {
        if dry_run {
            return Ok(Operated::said(format!("would {what}")));
        }
        tracing::info!(node, %state, "operator: node state");
        self.propose_map(MetaCommand::SetNodeState { node, state })
            .await?;
        Ok(Operated::said(format!("started: {what}")))
    }

    /// Brings this node's map up to the meta leader's (within 2 s): a change an operator made
    /// through this node is then in what this node shows next.
    pub async fn catch_up_map(&self) {
        let Some(leader) = self.directory.leader(META_GROUP).filter(|l| *l != self.me) else {
            return;
        };
        let req = PeerRequest::WatchMap { since: 0, wait_ms: 0 };
        if let Ok(PeerResponse::Map(map)) = self.router.peers().call_within(leader, &req, STATS_TIMEOUT).await
        {
            self.adopt(*map);
        }
    }

    /// [`Cluster::operate`] on the meta group's leader, wherever it is.
    pub async fn operate_anywhere(
        self: &Arc<Self>,
        step: &OperatorStep,
        dry_run: bool,
    ) -> Result<Operated, String> {
        // The meta group may be between leaders (a restart, a cordon): the step waits for one,
        // as a client's change waits for its group's. Only a "not the leader" answer is retried:
        // the step was not taken then.
        let deadline = Instant::now() + META_LEADER_WAIT;
        let req = PeerRequest::Operate {
            step: step.clone(),
            dry_run,
        };
        loop {
            if self.router.leads(META_GROUP) {
                return self.operate(step, dry_run).await;
            }
            let why = match self.directory.leader(META_GROUP) {
                None => "the meta group has no known leader; try again".to_string(),
                Some(leader) => match self
                    .router
                    .peers()
                    .call_within(leader, &req, OPERATE_TIMEOUT)
                    .await
                {
                    Ok(PeerResponse::Failed(why)) => return Err(why),
                    Ok(PeerResponse::Operated(done)) => return Ok(done),
                    Ok(PeerResponse::NotLeader { .. }) => {
                        format!("node {leader} no longer leads the meta group; try again")
                    }
                    Ok(other) => return Err(format!("node {leader} answered {other:?}")),
                    Err(e) => return Err(e.to_string()),
                },
            };
            if Instant::now() >= deadline {
                return Err(why);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Nodes up in `map` other than `node`.
pub(super) fn up_besides(map: &nearby_raft::ClusterMap, node: NodeId) -> usize {
    map.nodes
        .iter()
        .filter(|(n, e)| **n != node && e.state == NodeState::Up)
        .count()
}

/// The steps that move `group`'s replica from `from` to `to`: a leader on `from` hands over
/// first (to the voter leading fewest groups; with no other voter, to `to` once it votes), then
/// `to` is added (learner, caught up, voter), then `from` removed. A leadership never moves
/// within four voters (a candidate then needs a vote from a follower loyal to the old leader).
fn move_steps(
    map: &nearby_raft::ClusterMap,
    group: GroupId,
    entry: &GroupEntry,
    from: NodeId,
    to: NodeId,
) -> Vec<Step> {
    let add = Step::AddReplica { group, node: to };
    let remove = Step::RemoveReplica { group, node: from };
    if entry.leader != Some(from) {
        return vec![add, remove];
    }
    let leading = |n: NodeId| map.groups.values().filter(|g| g.leader == Some(n)).count();
    let heir = entry
        .voters
        .iter()
        .copied()
        .filter(|n| *n != from && map.nodes.get(n).is_some_and(|e| e.state == NodeState::Up))
        .min_by_key(|n| (leading(*n), *n));
    match heir {
        Some(heir) => vec![Step::TransferLeader { group, to: heir }, add, remove],
        None => vec![add, Step::TransferLeader { group, to }, remove],
    }
}
