//! Where a message or a proposal for a group goes: the group's driver on this node, or the node
//! that leads it.
//!
//! [`Router::send`] delivers a group message to a local driver's mailbox when this node leads the
//! group, and otherwise queues it for the leader's node ([`Peers`], batched). [`Router::propose`]
//! and [`Router::read`] do the same for Raft proposals and linearizable reads, following "not the
//! leader" answers, newer maps and their own replica's view of the group for up to
//! [`FIND_LEADER_WITHIN`]. Nothing here waits on a lock while it sends.

use std::sync::Arc;
use std::time::Duration;

use nearby_raft::meta::MetaCommand;
use nearby_raft::{CommandError, GroupId, NodeId, Payload, ProposeError, RaftHost, Reply, META_GROUP};

use crate::api::ServiceError;
use crate::group::hibernate::Hibernation;
use crate::group::{Drivers, GroupMsg};
use crate::presence::GroupMessage;
use crate::route::directory::Directory;
use crate::route::peer::{Envelope, PeerRequest, PeerResponse, Peers, ReadAnswer, ReadQuery, Reroute};

/// How long a proposal or read keeps looking for its group's leader — through "not the
/// leader" answers, an election, a node just restarted that has not caught up the map yet —
/// before it answers `unavailable`: longer than an election, shorter than the SDK's 5 s request
/// timeout.
const FIND_LEADER_WITHIN: Duration = Duration::from_millis(3_000);

/// The pause before attempt `hop` (none before the first): 40, 80, 160, then 250 ms.
fn backoff(hop: u32) -> Duration {
    Duration::from_millis((20u64 << hop.min(4)).min(250))
}

/// Attempts of one proposal or read: the first at once, the others after [`backoff`], until
/// [`FIND_LEADER_WITHIN`] has passed.
struct Attempts {
    hop: u32,
    deadline: tokio::time::Instant,
}

impl Attempts {
    fn new() -> Self {
        Attempts {
            hop: 0,
            deadline: tokio::time::Instant::now() + FIND_LEADER_WITHIN,
        }
    }

    /// Waits for the next attempt; `false` once there is none left.
    async fn next(&mut self) -> bool {
        if self.hop > 0 {
            let at = tokio::time::Instant::now() + backoff(self.hop);
            if at > self.deadline {
                return false;
            }
            tokio::time::sleep_until(at).await;
        }
        self.hop += 1;
        true
    }
}

/// The node's router (see the module doc).
pub struct Router {
    me: NodeId,
    host: Arc<RaftHost>,
    hibernation: Arc<Hibernation>,
    directory: Arc<Directory>,
    drivers: Arc<Drivers>,
    peers: Arc<Peers>,
}

impl Router {
    /// A router for the node of `host`.
    pub fn new(
        host: Arc<RaftHost>,
        directory: Arc<Directory>,
        drivers: Arc<Drivers>,
        peers: Arc<Peers>,
        hibernation: Arc<Hibernation>,
    ) -> Arc<Self> {
        let router = Arc::new(Router {
            me: host.node_id(),
            host,
            hibernation,
            directory,
            drivers,
            peers,
        });
        let weak: std::sync::Weak<dyn Reroute> = Arc::downgrade(&router) as std::sync::Weak<dyn Reroute>;
        router.peers.set_reroute(weak);
        router
    }

    /// The node's directory.
    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    /// The node's peers.
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// Sends `msg` to the driver of group `to`, here or on the node that leads it. Messages for a
    /// group with no known leader are dropped (the map will name one; subscribers resubscribe).
    pub fn send(&self, to: GroupId, msg: GroupMessage) {
        if let Some(d) = self.drivers.get(to) {
            if d.send(GroupMsg::Message(msg)) {
                return;
            }
            return;
        }
        match self.directory.leader(to) {
            Some(node) if node != self.me => self.peers.send(node, Envelope { to, msg }),
            _ => tracing::debug!(group = to, "no leader known for a group message; dropped"),
        }
    }

    /// Delivers envelopes that arrived from a peer to the drivers here; returns those whose
    /// group is not led here.
    pub fn deliver_local(&self, envelopes: Vec<Envelope>) -> Vec<Envelope> {
        let mut bounced = Vec::new();
        for env in envelopes {
            match self.drivers.get(env.to) {
                Some(d) => {
                    if !d.send(GroupMsg::Message(env.msg.clone())) {
                        bounced.push(env);
                    }
                }
                None => bounced.push(env),
            }
        }
        bounced
    }

    /// Whether this node leads `group` now, with its leadership confirmed: for a shard group,
    /// its driver runs (started only after a linearizable read, so the state is complete — a
    /// fresh leader that has not applied everything committed must not validate against it).
    pub fn leads(&self, group: GroupId) -> bool {
        if group != META_GROUP && self.drivers.get(group).is_none() {
            return false;
        }
        self.host.raft_of(group).is_some_and(|r| {
            let m = r.metrics().borrow().clone();
            m.state.is_leader() && m.current_leader == Some(self.me)
        })
    }

    /// The node leading `group` if not this one, as best known: what this node's own replica
    /// heard from Raft (first-hand, often ahead of the map on a node that just restarted) is
    /// recorded in the directory first.
    fn leader_elsewhere(&self, group: GroupId) -> Option<NodeId> {
        if let Some(r) = self.host.raft_of(group) {
            let m = r.metrics().borrow().clone();
            if let Some(l) = m.current_leader.filter(|l| *l != self.me) {
                self.directory.hint_leader(group, l, m.current_term);
            }
        }
        self.directory.leader(group).filter(|l| *l != self.me)
    }

    /// Proposes `payload` at the leader of `group`, wherever it is; returns the entry's index
    /// (0 for the meta group) and what applying it returned. An invalid command is refused
    /// with its error and never proposed.
    pub async fn propose(&self, group: GroupId, payload: Payload) -> Result<(u64, Reply), ServiceError> {
        let mut last = String::from("no leader known");
        let mut attempts = Attempts::new();
        while attempts.next().await {
            if self.leads(group) {
                match self.propose_here(group, payload.clone()).await {
                    Ok(r) => return Ok(r),
                    Err(ProposeError::NotLeader { leader, .. }) => {
                        last = format!("leadership of group {group} moved");
                        if let Some((l, _)) = leader {
                            self.directory.hint_leader(group, l, 0);
                        }
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let Some(leader) = self.leader_elsewhere(group) else {
                last = format!("group {group} has no known leader");
                continue;
            };
            let req = PeerRequest::Propose {
                epoch: self.directory.epoch(),
                group,
                payload: payload.clone(),
            };
            match self.peers.call(leader, &req).await {
                Ok(PeerResponse::Proposed { index, reply }) => return Ok((index, reply)),
                Ok(PeerResponse::Invalid(e)) => return Err(ProposeError::Invalid(e).into()),
                Ok(PeerResponse::NotLeader { leader, term, .. }) => {
                    last = format!("node {leader:?} leads group {group}");
                    if let Some(l) = leader {
                        self.directory.hint_leader(group, l, term);
                    }
                }
                Ok(PeerResponse::Stale(_)) => last = "the map moved on".into(),
                Ok(PeerResponse::Failed(e)) => return Err(ServiceError::unavailable(e)),
                Ok(other) => last = format!("unexpected answer {other:?}"),
                Err(e) => last = e.to_string(),
            }
        }
        Err(ServiceError::unavailable(format!("group {group}: {last}")))
    }

    /// Wakes `group`'s local replica for the reason `why`, and — if it leads and was asleep —
    /// its followers.
    pub fn wake_group(&self, group: GroupId, why: &'static str) {
        let Some(g) = self.host.shard(group) else { return };
        if !self.hibernation.wake(group, g.raft(), why) {
            return;
        }
        let m = g.raft().server_metrics().borrow().clone();
        if m.current_leader != Some(self.me) {
            return;
        }
        for node in m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|n| *n != self.me)
        {
            let peers = Arc::clone(&self.peers);
            tokio::spawn(async move {
                let _ = peers.call(node, &PeerRequest::Wake { group }).await;
            });
        }
    }

    /// The node's hibernation state.
    pub fn hibernation(&self) -> &Arc<Hibernation> {
        &self.hibernation
    }

    /// Proposes at this node's replica (which must lead).
    pub async fn propose_here(&self, group: GroupId, payload: Payload) -> Result<(u64, Reply), ProposeError> {
        match payload {
            Payload::Shard(cmd) => {
                let g = self
                    .host
                    .shard(group)
                    .ok_or(ProposeError::UnknownGroup { group })?;
                // A write wakes a sleeping group (and its followers) before it is proposed.
                self.wake_group(group, "a write");
                g.propose_at(cmd).await.map(|(at, r)| (at.index, Reply::Shard(r)))
            }
            Payload::Meta(cmd) => {
                let m = self.host.meta().ok_or(ProposeError::UnknownGroup { group })?;
                m.propose(cmd).await.map(|r| (0, Reply::Meta(r)))
            }
        }
    }

    /// Proposes a change of the cluster map.
    pub async fn propose_meta(&self, cmd: MetaCommand) -> Result<Reply, ServiceError> {
        self.propose(META_GROUP, Payload::Meta(cmd)).await.map(|(_, r)| r)
    }

    /// Reads from `group` at its leader, seeing every acknowledged write.
    pub async fn read(&self, group: GroupId, query: ReadQuery) -> Result<ReadAnswer, ServiceError> {
        let mut last = String::from("no leader known");
        let mut attempts = Attempts::new();
        while attempts.next().await {
            if self.leads(group) {
                match self.read_here(group, &query).await {
                    Ok(a) => return Ok(a),
                    Err(e) => {
                        last = e.to_string();
                        continue;
                    }
                }
            }
            let Some(leader) = self.leader_elsewhere(group) else {
                last = format!("group {group} has no known leader");
                continue;
            };
            let req = PeerRequest::Read {
                epoch: self.directory.epoch(),
                group,
                query: query.clone(),
            };
            match self.peers.call(leader, &req).await {
                Ok(PeerResponse::Read(a)) => return Ok(a),
                Ok(PeerResponse::NotLeader { leader, term, .. }) => {
                    if let Some(l) = leader {
                        self.directory.hint_leader(group, l, term);
                    }
                    last = format!("node {leader:?} leads group {group}");
                }
                Ok(other) => last = format!("unexpected answer {other:?}"),
                Err(e) => last = e.to_string(),
            }
        }
        Err(ServiceError::unavailable(format!(
            "reading group {group}: {last}"
        )))
    }

    /// Answers `query` from this node's replica of `group` (which must lead).
    pub async fn read_here(&self, group: GroupId, query: &ReadQuery) -> Result<ReadAnswer, ProposeError> {
        let g = self
            .host
            .shard(group)
            .ok_or(ProposeError::UnknownGroup { group })?;
        g.read_linearizable(|s| match query {
            ReadQuery::Registered(users) => {
                ReadAnswer::Registered(users.iter().copied().filter(|u| s.user(*u).is_some()).collect())
            }
            ReadQuery::Names(users) => ReadAnswer::Names(
                users
                    .iter()
                    .filter_map(|u| s.user(*u).map(|r| (*u, r.name.to_string())))
                    .collect(),
            ),
            ReadQuery::MergeState => ReadAnswer::MergeState(crate::route::peer::MergeView {
                frozen: s.frozen(),
                absorbing: s.absorbing(),
                pending_intents: s.outbox().count() as u64,
                range: s.range(),
                users: s.len() as u64,
                inbox: s.inbox().clone(),
                splitting: s.split_seed().is_some(),
            }),
            ReadQuery::Records { after, limit } => ReadAnswer::Records(
                s.users()
                    .filter(|(u, _)| *u > *after)
                    .take(*limit as usize)
                    .map(|(u, r)| (u, r.clone()))
                    .collect(),
            ),
            ReadQuery::SplitState => ReadAnswer::SplitState {
                median: (s.len() >= 2)
                    .then(|| s.users().nth(s.len() / 2).map(|(u, _)| u))
                    .flatten(),
                pending: s
                    .split_seed()
                    .map(|seed| (seed.new_group, seed.range.start, seed.index)),
            },
        })
        .await
    }

    /// Whether `user` is registered, asking its group's leader.
    pub async fn is_registered(&self, user: u64) -> Result<bool, ServiceError> {
        let group = self.directory.group_of(user).ok_or_else(|| {
            ServiceError::new(
                nearby_client::proto::ErrorCode::InvalidArgument,
                format!("user id {user} is not served"),
            )
        })?;
        match self.read(group, ReadQuery::Registered(vec![user])).await? {
            ReadAnswer::Registered(found) => Ok(found.contains(&user)),
            other => Err(ServiceError::unavailable(format!("unexpected answer {other:?}"))),
        }
    }

    /// The error a command refused as invalid gets.
    pub fn invalid(e: CommandError) -> ServiceError {
        ProposeError::Invalid(e).into()
    }
}

impl Reroute for Router {
    fn reroute(&self, from: NodeId, envelopes: Vec<Envelope>, map_moved: bool) {
        for env in envelopes {
            // The node that refused it (as not its leader) is still named: the map is behind;
            // drop rather than loop.
            if !map_moved && self.drivers.get(env.to).is_none() && self.directory.leader(env.to) == Some(from)
            {
                tracing::debug!(
                    group = env.to,
                    node = from,
                    "message refused by the leader the map names; dropped"
                );
                continue;
            }
            self.send(env.to, env.msg);
        }
    }
}
