//! Messages between nodes, and the outbound side of them: one batching queue per peer node.
//!
//! Everything a node says to another (beyond Raft, which the store carries itself) is a
//! [`PeerRequest`] answered by a [`PeerResponse`], carried by the store's transport as opaque
//! bytes over the one mutually authenticated connection per peer (see
//! `nearby_raft::transport`). Requests that depend on where things are carry the sender's map
//! epoch; a receiver with a newer map answers [`PeerResponse::Stale`] with it and does nothing
//! else, so no node ever acts on a routing decision made from an older map than its own.
//!
//! # Batching and order
//!
//! Group messages to groups led by one peer go through that peer's [`Peers`] queue: a single
//! sender per peer takes everything queued, sends it as one [`PeerRequest::Deliver`], waits for
//! the answer, and repeats. While one batch is in flight the next one collects, so under load
//! many updates share one message, and the messages from one node to another arrive in the
//! order they were sent. Undeliverable envelopes (the peer no longer leads the group, or answered
//! with a newer map) are routed again; locations older than [`LOCATION_TTL`] are dropped rather
//! than retried (a newer one will follow), and nothing is retried forever.
//!
//! What was meant for one run of a group's live state — the answer to its subscription (a
//! snapshot, a cell's contents) or a sighting relayed to it as a cell's listener — is never
//! routed to a node other than the one it was first sent to: one that must go elsewhere was
//! meant for a run that has ended (a deposed or restarted leader), and the run there is now may
//! have started after a change that forbids it — "not discoverable" that run never heard of,
//! acknowledged to its author before the old message arrives. The new run subscribes and listens
//! itself. (A friend's update is routed again: the viewer's group drops one decided before the
//! snapshot it holds, see `presence`.)
//!
//! # Liveness
//!
//! Every answer from a peer marks it alive ([`Peers::last_ok`]); a node pings the peers it
//! has not heard from recently, so each node knows which peers it can reach.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nearby_index::geo::{Millis, UserId};
use nearby_raft::transport::RaftTransport;
use nearby_raft::{ClusterMap, GroupId, NodeId, NodeInfo, Payload, Reply};
use serde::{Deserialize, Serialize};

use crate::messages::GroupMessage;
use crate::route::directory::Directory;

/// Locations queued longer than this for an unreachable peer are dropped: a newer one follows.
pub const LOCATION_TTL: Duration = Duration::from_secs(5);

/// Any other message is given up after this long without a peer that takes it.
pub const MESSAGE_TTL: Duration = Duration::from_secs(30);

/// Envelopes per `Deliver` at most (well under the transport's message limit).
pub const MAX_BATCH: usize = 2_048;

/// Envelopes queued for one peer at most; beyond, the oldest locations are dropped.
pub const MAX_QUEUE: usize = 65_536;

/// How long one peer request may take before it counts as failed.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// One group message for a group the receiver leads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The destination group.
    pub to: GroupId,
    /// The message.
    pub msg: GroupMessage,
}

/// A read a group's leader answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadQuery {
    /// Which of these users are registered.
    Registered(Vec<UserId>),
    /// The display names of these users (those registered).
    Names(Vec<UserId>),
    /// Where the group would split (the median of its users) and the split under way, if any.
    SplitState,
    /// What a merge needs to know of the group: whether it is frozen, its pending intents,
    /// its range, its users and what it applied from each source.
    MergeState,
    /// Up to `limit` records of the group's users above `after`, ascending.
    Records {
        /// Only users above this id.
        after: UserId,
        /// At most this many.
        limit: u32,
    },
}

/// The answer to a [`ReadQuery`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadAnswer {
    /// The registered users among those asked.
    Registered(Vec<UserId>),
    /// `(user, name)` of the registered users among those asked.
    Names(Vec<(UserId, String)>),
    /// The answer to [`ReadQuery::SplitState`].
    SplitState {
        /// The median of the group's users (`None` with fewer than two).
        median: Option<UserId>,
        /// A split under way: the new group, where it starts, the split's index.
        pending: Option<(GroupId, UserId, u64)>,
    },
    /// The answer to [`ReadQuery::MergeState`].
    MergeState(MergeView),
    /// The answer to [`ReadQuery::Records`].
    Records(Vec<(UserId, nearby_raft::UserRecord)>),
}

/// A user's record as a replica holds it, for comparison across replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordView {
    /// Friends, ascending.
    pub friends: Vec<UserId>,
    /// Pending requests received, ascending.
    pub requests_in: Vec<UserId>,
    /// Pending requests sent, ascending.
    pub requests_out: Vec<UserId>,
    /// Users hidden from, ascending.
    pub hidden_from: Vec<UserId>,
    /// Whether the user shares.
    pub sharing: bool,
}

impl RecordView {
    /// The view of `r`.
    pub fn of(r: &nearby_raft::UserRecord) -> Self {
        RecordView {
            friends: r.friends.iter().collect(),
            requests_in: r.rare().requests_in.iter().collect(),
            requests_out: r.rare().requests_out.iter().collect(),
            hidden_from: r.rare().hidden_from.iter().collect(),
            sharing: r.sharing,
        }
    }
}

/// What a node asks a peer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Group messages for groups the receiver leads, in order.
    Deliver {
        /// The sender's map epoch.
        epoch: u64,
        /// The messages.
        envelopes: Vec<Envelope>,
    },
    /// Propose `payload` in `group`, which the receiver leads; answered once applied.
    Propose {
        /// The sender's map epoch.
        epoch: u64,
        /// The group.
        group: GroupId,
        /// The command.
        payload: Payload,
    },
    /// Read from `group`, which the receiver leads, seeing every acknowledged write.
    Read {
        /// The sender's map epoch.
        epoch: u64,
        /// The group.
        group: GroupId,
        /// What to read.
        query: ReadQuery,
    },
    /// The receiver's map, once its epoch passes `since` or `wait_ms` have passed.
    WatchMap {
        /// The epoch the sender has.
        since: u64,
        /// The longest wait, in milliseconds.
        wait_ms: u32,
    },
    /// The sender asks to join the cluster with these addresses.
    Join {
        /// How to reach the sender.
        info: NodeInfo,
    },
    /// Liveness, and the sender's epoch (a receiver behind it fetches the map).
    Ping {
        /// The sender's map epoch.
        epoch: u64,
    },
    /// Make `node` a replica of `group` (to the group's leader): learner, catch up, voter.
    AddReplica {
        /// The sender's map epoch.
        epoch: u64,
        /// The group.
        group: GroupId,
        /// The node.
        node: NodeId,
    },
    /// Remove `node`'s replica of `group` (to the group's leader).
    RemoveReplica {
        /// The sender's map epoch.
        epoch: u64,
        /// The group.
        group: GroupId,
        /// The node.
        node: NodeId,
    },
    /// What this node's replica of `group` holds for `users` (any replica, leader or not): for
    /// tools that check every replica.
    ReplicaState {
        /// The group.
        group: GroupId,
        /// The users.
        users: Vec<UserId>,
    },
    /// `group`'s leader (the sender) sleeps in `term`: stop this replica's timers too.
    Hibernate {
        /// The group.
        group: GroupId,
        /// The leader's term.
        term: u64,
    },
    /// Start `group`'s timers again (its leader woke).
    Wake {
        /// The group.
        group: GroupId,
    },
    /// Stand for election in `group` (moving its leadership here).
    Campaign {
        /// The group.
        group: GroupId,
    },
    /// This node's part of `user`'s location history in `group` (any node that holds or held a
    /// replica): read it, or purge it.
    History {
        /// The group.
        group: GroupId,
        /// The user.
        user: UserId,
        /// What to do.
        op: HistoryOp,
    },
    /// The receiver's own figures, for the admin API: process, sessions, the replicas it holds.
    Stats,
    /// On the meta group's leader: take an operator's step (`nodectl`), after checking it;
    /// with `dry_run`, only check it.
    Operate {
        /// The step.
        step: OperatorStep,
        /// Only check.
        dry_run: bool,
    },
    /// The node's operations, running and recently finished (see `cluster::ops`).
    Operations,
    /// On `group`'s leader: snapshot the group and drop its log up to it (a group born of a
    /// split, so replicas added later copy its state rather than replay a log that lacks it).
    Compact {
        /// The group.
        group: GroupId,
    },
    /// To a node waiting to be added (`nearby-node join` with no seeds): join the cluster
    /// through these members' Raft addresses; with `dry_run`, only say who you are
    /// (see `cluster::invite`).
    Invite {
        /// Raft addresses of members that are up.
        seeds: Vec<String>,
        /// Only answer with the node's id and addresses.
        dry_run: bool,
    },
    /// The receiver's wall time (see `cluster::clocks`). A node that does not know it fails to
    /// decode only this request.
    Clock,
    /// The one-way grants this node's replica of `group` holds for `users` (any replica): for
    /// tools that check every replica. Protocol 4.
    ReplicaGrants {
        /// The group.
        group: GroupId,
        /// The users.
        users: Vec<UserId>,
    },
    /// Hand `group`'s leadership to `to` (to the group's leader): hold proposals, let `to`
    /// catch up with the whole log, ask it to stand, then let proposals go (see
    /// `Cluster::hand_over_here`). Protocol 5; to older nodes the step asks `to` to stand
    /// directly.
    HandOver {
        /// The group.
        group: GroupId,
        /// The node to lead it.
        to: NodeId,
    },
}

/// What a merge needs to know of a group ([`ReadQuery::MergeState`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeView {
    /// The group it is frozen into, if any.
    pub frozen: Option<GroupId>,
    /// The group whose records it is absorbing, if any.
    pub absorbing: Option<GroupId>,
    /// Intents it has not delivered yet.
    pub pending_intents: u64,
    /// Its range.
    pub range: nearby_index::friends::UserRange,
    /// Its users.
    pub users: u64,
    /// The highest intent number it applied from each source group.
    pub inbox: std::collections::BTreeMap<GroupId, u64>,
    /// A split under way.
    pub splitting: bool,
}

/// A change an operator asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorStep {
    /// Move `group`'s leadership to `to`, which holds a voter of it.
    TransferLeader {
        /// The group.
        group: GroupId,
        /// The node to lead it.
        to: NodeId,
    },
    /// Empty `node`: hand over its leaderships, replace its replicas (placement does it).
    /// Refused if fewer than three nodes would be left up, unless `force`.
    Drain {
        /// The node.
        node: NodeId,
        /// Drain even if groups are left with fewer than three replicas.
        force: bool,
    },
    /// Stop draining or cordoning `node`: it is up again (what moved stays moved).
    Undrain {
        /// The node.
        node: NodeId,
    },
    /// Take `node` out of the map; it must hold no replica (drain it first).
    RemoveNode {
        /// The node.
        node: NodeId,
    },
    /// Split `group` at `at` (by default the median of its users): an operation (see
    /// `docs/architecture.md`, "Splitting a range"); a split left half done is resumed.
    Split {
        /// The group.
        group: GroupId,
        /// The first user id of the new group.
        at: Option<u64>,
    },
    /// Merge the neighbouring shard groups `left` and `right` (`right` starts where `left`
    /// ends): `right`'s replicas first moved onto `left`'s nodes, then `right` frozen, its
    /// records absorbed by `left`, and `right` taken out of the map. An operation; a merge
    /// left half done is resumed.
    Merge {
        /// The group that stays.
        left: GroupId,
        /// The group absorbed.
        right: GroupId,
    },
    /// Even out the leaders' load (and whatever placement has left to even out): plans moves
    /// (see `cluster::rebalance`) and carries them out as an operation, at most
    /// `max_concurrent` at once and at most `per_minute` moves a minute touching any one node.
    Rebalance {
        /// Moves at once.
        max_concurrent: u32,
        /// Moves a minute per node.
        per_minute: u32,
    },
    /// Move `group`'s replica from node `from` to node `to` (an operation: the leadership
    /// handed over first if `from` leads, then a learner on `to` that catches up and votes,
    /// then `from`'s replica removed).
    Move {
        /// The group.
        group: GroupId,
        /// The node that holds a replica now.
        from: NodeId,
        /// The node to hold it.
        to: NodeId,
    },
    /// Cordon `node` (`nodectl drain --leaders-only`): hand its leaderships over, give it none,
    /// leave its replicas where they are — before a restart. `Undrain` ends it.
    Cordon {
        /// The node.
        node: NodeId,
    },
}

/// What an operator's step did (or, on a dry run, would do).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operated {
    /// What, in words.
    pub what: String,
    /// The operation carrying it out, when it runs on (see `cluster::ops`).
    pub operation: Option<String>,
}

impl Operated {
    /// A step that is finished once answered.
    pub fn said(what: impl Into<String>) -> Self {
        Operated {
            what: what.into(),
            operation: None,
        }
    }
}

/// A node's figures ([`PeerRequest::Stats`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStats {
    /// The node's version.
    pub version: String,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// CPU seconds its process used so far.
    pub cpu_s: f64,
    /// Its resident memory, bytes.
    pub rss_bytes: u64,
    /// Users with a session on it.
    pub sessions: u64,
    /// The shard-group replicas it holds.
    pub replicas: Vec<ReplicaStats>,
    /// Location updates its client service accepted since it started (a counter: the admin
    /// console turns two readings into a rate).
    #[serde(default)]
    pub updates_total: u64,
    /// Events it wrote to sessions since it started (a counter).
    #[serde(default)]
    pub pushes_total: u64,
    /// Users with a live location in the groups it leads, by H3 cell at
    /// [`nearby_index::ACTIVITY_RESOLUTION`]: `(cell index, users)`, the busiest
    /// [`MAX_ACTIVITY_CELLS`] cells. Counts only, never a user or a position.
    #[serde(default)]
    pub cells: Vec<(u64, u32)>,
}

/// The most cells a node reports in [`NodeStats::cells`] (keeps the answer small).
pub const MAX_ACTIVITY_CELLS: usize = 500;

/// One shard-group replica's figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStats {
    /// The group.
    pub group: GroupId,
    /// Whether this replica leads.
    pub leader: bool,
    /// Its current term.
    pub term: u64,
    /// Its last applied log index.
    pub applied: u64,
    /// Its last log index.
    pub last_log: u64,
    /// Whether it hibernates.
    pub asleep: bool,
    /// Users registered in the group.
    pub users: u64,
    /// Users online (a session on this node), if this replica leads.
    #[serde(default)]
    pub online: u64,
    /// Location updates its driver accepted since it started leading here.
    #[serde(default)]
    pub updates_total: u64,
}

/// What [`PeerRequest::History`] asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HistoryOp {
    /// Records with `since <= at < until`, oldest first, at most `limit`.
    Read {
        /// From (inclusive).
        since: Millis,
        /// To (exclusive).
        until: Millis,
        /// At most.
        limit: u32,
    },
    /// Delete every record at or before `before`.
    Purge {
        /// Up to (inclusive).
        before: Millis,
    },
}

/// What a peer answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerResponse {
    /// The request was done.
    Done,
    /// Envelopes delivered, except `bounced`: their groups are not led here.
    Delivered {
        /// Envelopes to route again.
        bounced: Vec<Envelope>,
    },
    /// The sender's map is older than the receiver's, which is this; nothing was done.
    Stale(Box<ClusterMap>),
    /// The receiver does not lead `group`; `leader` does, as far as it knows.
    NotLeader {
        /// The group.
        group: GroupId,
        /// Its leader, if known.
        leader: Option<NodeId>,
        /// The term the receiver knows.
        term: u64,
    },
    /// The command is invalid; it was not proposed.
    Invalid(nearby_raft::CommandError),
    /// The proposal was applied at `index` with `reply`.
    Proposed {
        /// Its log index.
        index: u64,
        /// What applying it returned.
        reply: Reply,
    },
    /// The answer to a read.
    Read(ReadAnswer),
    /// The receiver's map.
    Map(Box<ClusterMap>),
    /// A replica's state: its last applied index, and the records of the users asked (those
    /// registered).
    Replica {
        /// The last applied log index.
        applied: u64,
        /// Whether this replica hibernates (see `group::hibernate`).
        asleep: bool,
        /// `(user, relations)`.
        records: Vec<(UserId, RecordView)>,
    },
    /// Location history records: `(at, lat, lon)`.
    History(Vec<(Millis, f64, f64)>),
    /// The answer to [`PeerRequest::Stats`].
    Stats(Box<NodeStats>),
    /// An operator's step was taken or started (or, on a dry run, would be).
    Operated(Operated),
    /// The answer to [`PeerRequest::Operations`].
    Operations(Vec<crate::cluster::ops::OperationView>),
    /// The request failed; nothing was done.
    Failed(String),
    /// The answer to [`PeerRequest::Invite`]: the invited node's id and addresses.
    Invited {
        /// Its id (its certificate's).
        node: NodeId,
        /// Its addresses.
        info: NodeInfo,
    },
    /// The answer to [`PeerRequest::Clock`]: the node's time, ms since the epoch.
    Clock {
        /// Its time.
        now_ms: u64,
    },
    /// The answer to [`PeerRequest::ReplicaGrants`]: the replica's last applied index, and the
    /// grants of the users asked (those registered). Protocol 4.
    Grants {
        /// The last applied log index.
        applied: u64,
        /// `(user, grants)`.
        records: Vec<(UserId, GrantsView)>,
    },
}

/// A user's one-way grants, as a replica holds them ([`PeerResponse::Grants`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantsView {
    /// Users the user lets follow it, ascending.
    pub followers: Vec<UserId>,
    /// Users the user follows, ascending.
    pub following: Vec<UserId>,
}

/// Why a peer request failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The node is not in the map.
    #[error("node {0} is not in the cluster map")]
    UnknownNode(NodeId),
    /// The node's address does not parse.
    #[error("node {node} has an unusable address {addr:?}")]
    BadAddress {
        /// The node.
        node: NodeId,
        /// Its address.
        addr: String,
    },
    /// The peer could not be reached or did not answer in time.
    #[error("node {node}: {reason}")]
    Unreachable {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// The peer's answer does not decode.
    #[error("node {node} sent an undecodable answer: {reason}")]
    Malformed {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
}

/// Where envelopes that a peer did not take go next (the node's router).
pub trait Reroute: Send + Sync + 'static {
    /// Routes `envelopes`, which node `from` did not take, again with the directory as it is now.
    /// With `map_moved`, `from` refused them only because the sender's map was older (it now
    /// has the newer one): they go again even to `from`.
    fn reroute(&self, from: NodeId, envelopes: Vec<Envelope>, map_moved: bool);
}

#[derive(Default)]
struct PeerQueue {
    pending: Vec<(Instant, Envelope)>,
    sending: bool,
}

/// Outbound messages to peers (see the module doc).
pub struct Peers {
    transport: Arc<RaftTransport>,
    directory: Arc<Directory>,
    queues: Mutex<HashMap<NodeId, PeerQueue>>,
    last_ok: Mutex<HashMap<NodeId, Instant>>,
    reroute: Mutex<Option<Weak<dyn Reroute>>>,
    /// Envelopes sent to peers, and batches they went in.
    stats: Mutex<PeerStats>,
}

/// Counters of the outbound path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Envelopes sent.
    pub envelopes: u64,
    /// `Deliver` requests they were batched into.
    pub batches: u64,
    /// Of the envelopes sent, location updates forwarded to a group on a peer.
    pub updates: u64,
    /// Envelopes dropped (too old, or no route).
    pub dropped: u64,
}

impl Peers {
    /// Peers reached through `transport`, addressed by `directory`.
    pub fn new(transport: Arc<RaftTransport>, directory: Arc<Directory>) -> Arc<Self> {
        Arc::new(Peers {
            transport,
            directory,
            queues: Mutex::new(HashMap::new()),
            last_ok: Mutex::new(HashMap::new()),
            reroute: Mutex::new(None),
            stats: Mutex::new(PeerStats::default()),
        })
    }

    /// Sets where bounced envelopes go.
    pub fn set_reroute(&self, r: Weak<dyn Reroute>) {
        *self.reroute.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }

    /// Counters since start.
    pub fn stats(&self) -> PeerStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When `node` last answered anything.
    pub fn last_ok(&self, node: NodeId) -> Option<Instant> {
        self.last_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .copied()
    }

    /// Where `node` is reachable now: its cluster map entry, a host name looked up.
    async fn addr_of(&self, node: NodeId) -> Result<SocketAddr, PeerError> {
        let info = self.directory.node(node).ok_or(PeerError::UnknownNode(node))?;
        self.transport.resolve(&info.raft).await.map_err(|e| match e {
            nearby_raft::error::TransportError::BadAddress { addr } => PeerError::BadAddress { node, addr },
            other => PeerError::Unreachable {
                node,
                reason: other.to_string(),
            },
        })
    }

    /// Sends one request to `node` and waits (at most [`CALL_TIMEOUT`]) for its answer.
    pub async fn call(&self, node: NodeId, req: &PeerRequest) -> Result<PeerResponse, PeerError> {
        self.call_within(node, req, CALL_TIMEOUT).await
    }

    /// [`Peers::call`] with a longer bound, for requests that take long by nature (a new
    /// replica catching up).
    pub async fn call_within(
        &self,
        node: NodeId,
        req: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, PeerError> {
        let addr = self.addr_of(node).await?;
        self.call_addr_within(addr, Some(node), req, timeout).await
    }

    /// Sends one request to the node at `addr` (checked to be `node`, if given).
    pub async fn call_addr(
        &self,
        addr: SocketAddr,
        node: Option<NodeId>,
        req: &PeerRequest,
    ) -> Result<PeerResponse, PeerError> {
        self.call_addr_within(addr, node, req, CALL_TIMEOUT).await
    }

    /// [`Peers::call_addr`] with its own timeout.
    pub async fn call_addr_within(
        &self,
        addr: SocketAddr,
        node: Option<NodeId>,
        req: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, PeerError> {
        let who = node.unwrap_or(0);
        let bytes = nearby_index::codec::encode(req).map_err(|e| PeerError::Malformed {
            node: who,
            reason: e.to_string(),
        })?;
        let answer = tokio::time::timeout(timeout, self.transport.call_peer(addr, node, bytes))
            .await
            .map_err(|_| PeerError::Unreachable {
                node: who,
                reason: format!("no answer within {timeout:?}"),
            })?
            .map_err(|e| PeerError::Unreachable {
                node: who,
                reason: e.to_string(),
            })?;
        let resp: PeerResponse = nearby_index::codec::decode(&answer).map_err(|e| PeerError::Malformed {
            node: who,
            reason: e.to_string(),
        })?;
        if let Some(n) = node {
            self.last_ok
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(n, Instant::now());
        }
        if let PeerResponse::Stale(map) = &resp {
            self.directory.install(map.as_ref().clone());
        }
        Ok(resp)
    }

    /// Queues `envelope` for `node`; a sender task takes it with whatever else is queued. A
    /// queue at [`MAX_QUEUE`] (a peer that cannot keep up) drops its oldest location first.
    pub fn send(self: &Arc<Self>, node: NodeId, envelope: Envelope) {
        let start = {
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            let q = queues.entry(node).or_default();
            if q.pending.len() >= MAX_QUEUE {
                let oldest_location = q
                    .pending
                    .iter()
                    .position(|(_, e)| matches!(e.msg, GroupMessage::Update { .. }));
                match oldest_location {
                    Some(i) => {
                        q.pending.remove(i);
                    }
                    None if matches!(envelope.msg, GroupMessage::Update { .. }) => {
                        self.stats.lock().unwrap_or_else(|p| p.into_inner()).dropped += 1;
                        return;
                    }
                    None => {}
                }
                self.stats.lock().unwrap_or_else(|p| p.into_inner()).dropped += 1;
            }
            q.pending.push((Instant::now(), envelope));
            !std::mem::replace(&mut q.sending, true)
        };
        if start {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.drain(node).await });
        }
    }

    /// The sender of `node`'s queue: one batch in flight at a time, until the queue is empty.
    async fn drain(self: Arc<Self>, node: NodeId) {
        let mut failures: u32 = 0;
        loop {
            let batch = {
                let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                let Some(q) = queues.get_mut(&node) else { return };
                if q.pending.is_empty() {
                    q.sending = false;
                    return;
                }
                if q.pending.len() > MAX_BATCH {
                    q.pending.drain(..MAX_BATCH).collect()
                } else {
                    std::mem::take(&mut q.pending)
                }
            };
            let (stamps, envelopes): (Vec<Instant>, Vec<Envelope>) = batch.into_iter().unzip();
            let req = PeerRequest::Deliver {
                epoch: self.directory.epoch(),
                envelopes,
            };
            let result = self.call(node, &req).await;
            let PeerRequest::Deliver { envelopes, .. } = req else {
                return;
            };
            match result {
                Ok(PeerResponse::Delivered { bounced }) => {
                    failures = 0;
                    let updates = |list: &[Envelope]| {
                        list.iter()
                            .filter(|e| matches!(e.msg, GroupMessage::Update { .. }))
                            .count() as u64
                    };
                    // Counted before the lock: the stats are shared by every peer's sender.
                    let taken = updates(&envelopes).saturating_sub(updates(&bounced));
                    let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                    stats.batches += 1;
                    stats.envelopes += (envelopes.len() - bounced.len()) as u64;
                    stats.updates += taken;
                    drop(stats);
                    if !bounced.is_empty() {
                        self.bounce(node, bounced, false);
                    }
                }
                // The map moved on (now installed): route everything again.
                Ok(PeerResponse::Stale(_)) => self.bounce(node, envelopes, true),
                Ok(other) => {
                    tracing::warn!(node, ?other, "unexpected answer to a delivery; routing again");
                    self.bounce(node, envelopes, false);
                }
                Err(e) => {
                    failures += 1;
                    tracing::debug!(node, error = %e, failures, "delivery failed");
                    self.requeue_front(node, stamps.into_iter().zip(envelopes).collect());
                    tokio::time::sleep(Duration::from_millis(50u64 << failures.min(5))).await;
                    self.sort_out(node);
                }
            }
        }
    }

    /// Puts `batch` back at the head of `node`'s queue, ahead of newer messages.
    fn requeue_front(&self, node: NodeId, batch: Vec<(Instant, Envelope)>) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(q) = queues.get_mut(&node) {
            let newer = std::mem::replace(&mut q.pending, batch);
            q.pending.extend(newer);
        }
    }

    /// After a failed delivery to `node`: drops what is too old to be worth sending, routes
    /// again what the directory now sends elsewhere, keeps the rest in order.
    fn sort_out(&self, node: NodeId) {
        let queued = {
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            queues
                .get_mut(&node)
                .map(|q| std::mem::take(&mut q.pending))
                .unwrap_or_default()
        };
        let now = Instant::now();
        let (fresh, old): (Vec<_>, Vec<_>) = queued
            .into_iter()
            .partition(|(at, env)| now.duration_since(*at) < ttl_of(&env.msg));
        if !old.is_empty() {
            self.stats.lock().unwrap_or_else(|p| p.into_inner()).dropped += old.len() as u64;
            tracing::debug!(
                node,
                dropped = old.len(),
                "gave up messages for an unreachable peer"
            );
        }
        let (stay, moved): (Vec<_>, Vec<_>) = fresh
            .into_iter()
            .partition(|(_, env)| self.directory.leader(env.to) == Some(node));
        self.requeue_front(node, stay);
        if !moved.is_empty() {
            self.bounce(node, moved.into_iter().map(|(_, e)| e).collect(), false);
        }
    }

    /// Routes `envelopes` again (they could not be delivered at `from`), except locations that
    /// would now go elsewhere (see the module doc).
    fn bounce(&self, from: NodeId, mut envelopes: Vec<Envelope>, map_moved: bool) {
        let before = envelopes.len();
        envelopes.retain(|e| routed_again(&e.msg, from, map_moved, self.directory.leader(e.to)));
        if envelopes.len() < before {
            let n = before - envelopes.len();
            tracing::debug!(
                node = from,
                dropped = n,
                "locations meant for an ended run dropped"
            );
            self.stats.lock().unwrap_or_else(|p| p.into_inner()).dropped += n as u64;
        }
        if envelopes.is_empty() {
            return;
        }
        let target = self
            .reroute
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(Weak::upgrade);
        match target {
            Some(r) => r.reroute(from, envelopes, map_moved),
            None => {
                self.stats.lock().unwrap_or_else(|p| p.into_inner()).dropped += envelopes.len() as u64;
            }
        }
    }
}

/// Whether `msg`, not delivered at `from` (`map_moved`: because `from` had a newer map), may be
/// routed again to its group's `leader` now: not if it was meant for one run of the group and
/// would go elsewhere (see the module doc).
fn routed_again(msg: &GroupMessage, from: NodeId, map_moved: bool, leader: Option<NodeId>) -> bool {
    let for_one_run = matches!(
        msg,
        GroupMessage::Snapshot { .. }
            | GroupMessage::Cell(
                crate::messages::CellMessage::Seen { .. } | crate::messages::CellMessage::Contents { .. },
            )
    );
    !for_one_run || (map_moved && leader == Some(from))
}

/// Whether `msg` carries positions, to friends or strangers: a newer one follows.
fn is_location(msg: &GroupMessage) -> bool {
    matches!(
        msg,
        GroupMessage::Update { .. }
            | GroupMessage::Snapshot { .. }
            | GroupMessage::Cell(
                crate::messages::CellMessage::Publish { .. }
                    | crate::messages::CellMessage::Seen { .. }
                    | crate::messages::CellMessage::Contents { .. },
            )
    )
}

fn ttl_of(msg: &GroupMessage) -> Duration {
    // A stranger's channel and listeners remember withdrawals for twice a location's TTL
    // (`strangers::WITHDRAWN_MEMORY`).
    if is_location(msg) {
        LOCATION_TTL
    } else {
        MESSAGE_TTL
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Barrier, CellMessage};
    use nearby_client::proto::GoneReason;
    use nearby_index::geo::LatLng;
    use nearby_index::ttl::LatestLocation;

    #[test]
    fn what_was_meant_for_one_run_goes_nowhere_else_and_the_rest_goes_wherever_its_group_is() {
        let at = LatestLocation {
            loc: LatLng::new(52.52, 13.405).expect("ll"),
            updated_at: Millis(1),
        };
        let update = GroupMessage::Update {
            from: 1,
            at,
            viewers: vec![2],
            decided_at: 5,
        };
        let seen = GroupMessage::Cell(CellMessage::Seen {
            cell: 9,
            user: 1,
            name: "s".into(),
            at,
        });
        let revoke = GroupMessage::Revoke {
            from: 1,
            reason: GoneReason::Hidden,
            viewers: vec![2],
            at: 6,
            ack: Some(Barrier {
                group: 1,
                index: 6,
                part: 0,
            }),
        };
        let snapshot = GroupMessage::Snapshot {
            viewer: 2,
            asked: vec![1],
            entries: vec![],
            decided_at: 5,
        };
        for one_run in [&seen, &snapshot] {
            // Refused by node 2 (it no longer leads the group), or node 2 unreachable while the
            // map moved the group to node 3: meant for a run that ended.
            assert!(!routed_again(one_run, 2, false, Some(3)));
            assert!(!routed_again(one_run, 2, false, Some(2)));
            assert!(!routed_again(one_run, 2, true, Some(3)));
            // Node 2 only had a newer map, and still leads the group: the same run.
            assert!(routed_again(one_run, 2, true, Some(2)));
        }
        assert!(routed_again(&revoke, 2, false, Some(3)));
        assert!(
            routed_again(&update, 2, false, Some(3)),
            "the viewer's group judges it"
        );
        assert!(routed_again(&revoke, 2, true, None));
    }
}
