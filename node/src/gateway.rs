//! The node's client-facing operations: nearby's [`Backend`] for the QUIC service.
//!
//! A session lives on the node that leads its user's home group; there, every operation on the
//! user's live state goes to that group's driver ([`crate::group::driver`]), and every change to
//! replicated state is proposed to the group that decides it, here or on a peer
//! ([`Router::propose`]). A node that does not lead a user's home group redirects the session to
//! the node that does.
//!
//! # What an acknowledged change means
//!
//! [`Gateway::commit`] answers `Ok` only when the change is committed in the group that decides
//! it (for a relation: the pair owner's group, whose intent then carries it to the other side
//! whatever fails) and, for a change that ends someone's permission to see the acting user,
//! only once the acting user's own record carries it and every viewer's group has confirmed
//! that nothing more about the acting user will reach that viewer (the driver's barrier). If
//! that confirmation does not come within its bound the answer is `unavailable`, not `Ok`: the
//! change stays committed and takes effect, but the promise was not kept in time, so it is not
//! made.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use nearby_client::proto::{self, Coord, ErrorCode, FriendList, NearbyPage};
use nearby_index::geo::{LatLng, Millis, UserId};
use nearby_raft::shard::command::pair_owner;
use nearby_raft::{Command, CommandResult, GroupId, Payload, Reply};
use tokio::sync::oneshot;

use crate::api::{
    page_request, Admission, Backend, Limits, LocationAck, ServiceConfig, ServiceError, SessionSink,
};
use crate::clock::Clock;
use crate::group::driver::ACK_WAIT;
use crate::group::{DriverHandle, Drivers, GroupMsg};
use crate::history::History;
use crate::queue::CloseReason;
use crate::route::peer::{HistoryOp, PeerRequest, PeerResponse, ReadAnswer, ReadQuery};
use crate::route::router::Router;
use crate::service::overload::TokenBucket;
use crate::sessions::Sessions;

/// A leader not heard from for this long is not redirected to (peers ping every second).
const REACHABLE: Duration = Duration::from_millis(1_800);

/// Messages a driver may have waiting before periodic location updates are refused.
pub const MAX_BACKLOG: usize = 20_000;

/// How long a relation change by the non-owning side waits for its own record to show it
/// before it is acknowledged anyway (it is durable from the owner's commit on).
const OWN_SIDE_WAIT: Duration = Duration::from_secs(2);

/// The node's client operations (see the module doc).
pub struct Gateway {
    router: Arc<Router>,
    drivers: Arc<Drivers>,
    sessions: Arc<Sessions>,
    clock: Arc<dyn Clock>,
    config: ServiceConfig,
    admission: Mutex<TokenBucket>,
    history: Arc<History>,
}

/// How long a command routed by an older map waits for the map that shows where its range
/// went (a split's map change follows its log entry within a round trip or two).
pub const RANGE_MOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn not_served(user: UserId) -> ServiceError {
    ServiceError::new(
        ErrorCode::InvalidArgument,
        format!("user id {user} is not served"),
    )
}

fn moved() -> ServiceError {
    ServiceError::moved()
}

fn shard_result(reply: Reply) -> Result<CommandResult, ServiceError> {
    match reply {
        Reply::Shard(CommandResult::Rejected(e)) => Err(Router::invalid(e)),
        Reply::Shard(r) => Ok(r),
        other => Err(ServiceError::new(
            ErrorCode::Internal,
            format!("unexpected reply {other}"),
        )),
    }
}

impl Gateway {
    /// A gateway admitting at most `sessions_per_s` new sessions a second (bursts of twice
    /// that): after a failover, the clients of a dead node come back at a bounded rate.
    pub fn new(
        router: Arc<Router>,
        drivers: Arc<Drivers>,
        sessions: Arc<Sessions>,
        clock: Arc<dyn Clock>,
        config: ServiceConfig,
        sessions_per_s: u32,
        history: Arc<History>,
    ) -> Self {
        Gateway {
            router,
            drivers,
            sessions,
            clock,
            config,
            admission: Mutex::new(TokenBucket::new(sessions_per_s)),
            history,
        }
    }

    /// The node's sessions.
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// The node's router.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    fn home(&self, user: UserId) -> Result<GroupId, ServiceError> {
        self.router
            .directory()
            .group_of(user)
            .ok_or_else(|| not_served(user))
    }

    /// The driver of `user`'s home group, which a session's user has on this node.
    fn driver(&self, user: UserId) -> Result<DriverHandle, ServiceError> {
        let group = self.home(user)?;
        self.drivers.get(group).ok_or_else(moved)
    }

    async fn ask<T>(
        &self,
        user: UserId,
        make: impl FnOnce(oneshot::Sender<T>) -> GroupMsg,
    ) -> Result<T, ServiceError> {
        let d = self.driver(user)?;
        let (tx, rx) = oneshot::channel();
        if !d.send(make(tx)) {
            return Err(moved());
        }
        rx.await.map_err(|_| moved())
    }

    /// Waits until the change at `index` of `group` (led here) has been carried out.
    async fn await_barrier(&self, group: GroupId, index: u64) -> Result<(), ServiceError> {
        let d = self.drivers.get(group).ok_or_else(moved)?;
        let (tx, rx) = oneshot::channel();
        if !d.send(GroupMsg::AwaitBarrier { index, reply: tx }) {
            return Err(moved());
        }
        rx.await.map_err(|_| moved())?
    }

    /// Waits until intent `seq` of group `source` is applied in `group` (led here) and carried
    /// out there.
    async fn await_delivery(&self, group: GroupId, source: GroupId, seq: u64) -> Result<(), ServiceError> {
        let d = self.drivers.get(group).ok_or_else(moved)?;
        let (tx, rx) = oneshot::channel();
        if !d.send(GroupMsg::AwaitDelivery {
            source,
            seq,
            reply: tx,
        }) {
            return Err(moved());
        }
        rx.await.map_err(|_| moved())?
    }

    /// Registers `user` if it has no record; the user's group may be led anywhere.
    pub async fn ensure_registered(&self, user: UserId) -> Result<(), ServiceError> {
        if user == 0 {
            return Err(ServiceError::new(
                ErrorCode::InvalidArgument,
                "user id 0 is reserved",
            ));
        }
        let group = self.home(user)?;
        if let Some(d) = self.drivers.get(group) {
            if d.group().read(|s| s.user(user).is_some()) {
                return Ok(());
            }
        }
        let cmd = Command::RegisterUser {
            user,
            name: format!("user {user}"),
        };
        let (_, reply) = self.router.propose(group, Payload::Shard(cmd)).await?;
        shard_result(reply).map(drop)
    }

    /// Commits a relation or settings change (see the module doc for when it is acknowledged).
    /// A command that reached a group its user's range has left (a split or merge the map
    /// showed here only after routing) changed nothing: it is routed again once the map moves
    /// on, within [`RANGE_MOVE_WAIT`].
    pub async fn commit(&self, cmd: Command) -> Result<CommandResult, ServiceError> {
        let deadline = tokio::time::Instant::now() + RANGE_MOVE_WAIT;
        let mut map = self.router.directory().watch();
        loop {
            map.borrow_and_update();
            match self.commit_once(cmd.clone()).await {
                Err(e) if e.range_moved() => {
                    tracing::debug!(error = %e, "routed by an older map; waiting for the new one");
                    if !matches!(tokio::time::timeout_at(deadline, map.changed()).await, Ok(Ok(()))) {
                        return Err(e);
                    }
                }
                other => return other,
            }
        }
    }

    async fn commit_once(&self, cmd: Command) -> Result<CommandResult, ServiceError> {
        let (actor, other) = cmd.users();
        let mine = self.home(actor)?;
        let Some(other) = other.filter(|_| cmd.is_two_sided()) else {
            let (index, reply) = self.router.propose(mine, Payload::Shard(cmd.clone())).await?;
            let result = shard_result(reply)?;
            // Confirmed even when it changed nothing: it may be the retry of a change whose
            // barrier is still pending (the driver settles a user's barriers in order).
            if cmd.ends_visibility() {
                self.await_barrier(mine, index).await?;
            }
            return Ok(result);
        };
        let removal = matches!(
            cmd,
            Command::RemoveFriend { .. } | Command::RevokeFollow { .. } | Command::Unfollow { .. }
        );
        if other != 0 && other != actor && !removal && !self.router.is_registered(other).await? {
            return Err(ServiceError::new(
                ErrorCode::UnknownUser,
                format!("unknown user {other}"),
            ));
        }
        let decider = self.home(pair_owner(actor, other))?;
        if decider != mine {
            // The pair's owner checks the limits of the records it holds; the acting user's
            // record is here, where the user's session is.
            if let Some(d) = self.drivers.get(mine) {
                d.group().read(|s| cmd.check_limits(s)).map_err(Router::invalid)?;
            }
        }
        let (index, reply) = self.router.propose(decider, Payload::Shard(cmd.clone())).await?;
        let result = shard_result(reply)?;
        let changed = !matches!(result, CommandResult::Unchanged | CommandResult::AlreadyFriends);
        // A visibility-ending change is confirmed even when it changed nothing: it may be the
        // retry of one whose confirmation never came.
        let ends = cmd.ends_visibility();
        if !changed && !ends {
            return Ok(result);
        }
        if decider == mine {
            // The acting user's record changed (or was confirmed) in that entry.
            if ends {
                self.await_barrier(mine, index).await?;
            }
            return Ok(result);
        }
        // The acting user's record changes when the owner's intent is delivered here. A change
        // that ends nobody's permission is durable from the owner's commit: it is acknowledged
        // after a short wait for the user's own side (so it reads its own write) either way.
        let wait = if ends {
            OWN_SIDE_WAIT + ACK_WAIT
        } else {
            OWN_SIDE_WAIT
        };
        // The intent is numbered from the decider's base (a group born of a split numbers
        // above what it inherited), which the map records.
        let seq = index
            + self
                .router
                .directory()
                .view()
                .map
                .groups
                .get(&decider)
                .map_or(0, |g| g.seq_base);
        match tokio::time::timeout(wait, self.await_delivery(mine, decider, seq)).await {
            Ok(Ok(())) => Ok(result),
            _ if !ends => Ok(result),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ServiceError::unavailable(
                "the change is committed and will take effect, but it was not confirmed in time",
            )),
        }
    }

    /// A page of the user's relations (users after `after`, at most `limit` of them, ascending)
    /// and settings, with the other users' names.
    pub async fn friends(
        &self,
        user: UserId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<FriendList, ServiceError> {
        let d = self.driver(user)?;
        let record = d
            .group()
            .read_linearizable(|s| s.user(user).cloned())
            .await?
            .ok_or_else(|| ServiceError::new(ErrorCode::UnknownUser, format!("unknown user {user}")))?;
        let sets = [
            (&record.friends, proto::Relation::Friend),
            (&record.rare().requests_in, proto::Relation::RequestReceived),
            (&record.rare().requests_out, proto::Relation::RequestSent),
            (&record.rare().followers, proto::Relation::Follower),
            (&record.rare().following, proto::Relation::Following),
        ];
        let mut ids: Vec<UserId> = sets
            .iter()
            .flat_map(|(s, _)| s.iter())
            .filter(|id| after.is_none_or(|a| *id > a))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let limit = limit.max(1);
        let next = (ids.len() > limit).then(|| ids[limit - 1]);
        ids.truncate(limit);
        let names = self.names(&ids).await;
        // By id, then in the order of the sets above.
        let mut entries = Vec::new();
        for &id in &ids {
            for (set, relation) in &sets {
                if set.contains(id) {
                    entries.push(proto::FriendEntry {
                        id,
                        name: names.get(&id).cloned(),
                        relation: *relation,
                        hidden: record.rare().hidden_from.contains(id),
                    });
                }
            }
        }
        let now = self.clock.now();
        Ok(FriendList {
            entries,
            sharing: record.sharing,
            discoverable: record.discoverable,
            ghost_until: record.ghost_until().filter(|until| *until > now),
            history: !record.history_off && self.history.enabled(),
            next,
        })
    }

    /// `user`'s history: this node's part of their home group's store and every other replica
    /// node's, merged, without what the user deleted (see [`crate::history`]).
    pub async fn read_history(
        &self,
        user: UserId,
        since: Millis,
        until: Millis,
        limit: usize,
    ) -> Result<proto::HistoryPage, ServiceError> {
        let group = self.home(user)?;
        let d = self.driver(user)?;
        let cleared = d
            .group()
            .read_linearizable(|s| s.user(user).map(|r| r.history_cleared()))
            .await?
            .ok_or_else(|| ServiceError::new(ErrorCode::UnknownUser, format!("unknown user {user}")))?;
        let since = match cleared {
            Some(c) => since.max(Millis(c.0.saturating_add(1))),
            None => since,
        };
        let limit = limit.clamp(1, proto::MAX_HISTORY_PAGE as usize);
        let failed = |e: nearby_history::HistoryError| {
            tracing::warn!(group, user, error = %e, "history read failed");
            ServiceError::unavailable("the history store of this node cannot be read")
        };
        let mut points: Vec<(Millis, f64, f64)> = self
            .history
            .read(group, user, since, until, limit + 1)
            .await
            .map_err(failed)?
            .into_iter()
            .map(|r| (Millis(r.at_ms), r.lat, r.lon))
            .collect();
        let op = HistoryOp::Read {
            since,
            until,
            limit: (limit + 1) as u32,
        };
        let mut complete = true;
        for (node, answer) in self.ask_replicas(group, user, op).await {
            match answer {
                Ok(PeerResponse::History(more)) => points.extend(more),
                other => {
                    tracing::debug!(group, node, ?other, "a node's part of a history is unavailable");
                    complete = false;
                }
            }
        }
        points.sort_by_key(|p| p.0);
        points.dedup_by_key(|p| p.0);
        let more = points.len() > limit;
        points.truncate(limit);
        Ok(proto::HistoryPage {
            points: points
                .into_iter()
                .map(|(at, lat, lon)| proto::HistoryPoint {
                    at: Coord { lat, lon },
                    recorded_at: at,
                })
                .collect(),
            more,
            complete,
        })
    }

    /// Asks every other node holding a replica of `group` to do `op` on its part of `user`'s
    /// history, at once.
    async fn ask_replicas(
        &self,
        group: GroupId,
        user: UserId,
        op: HistoryOp,
    ) -> Vec<(
        nearby_raft::NodeId,
        Result<PeerResponse, crate::route::peer::PeerError>,
    )> {
        let directory = self.router.directory();
        let others: Vec<nearby_raft::NodeId> = directory
            .view()
            .map
            .groups
            .get(&group)
            .map(|g| g.replicas().filter(|n| *n != directory.me()).collect())
            .unwrap_or_default();
        let asks = others.into_iter().map(|node| {
            let req = PeerRequest::History { group, user, op };
            let peers = self.router.peers();
            async move { (node, peers.call(node, &req).await) }
        });
        futures::future::join_all(asks).await
    }

    /// Deletes all of `user`'s history: the deletion is committed in the user's group (from
    /// then on nothing recorded before it is served, whatever happens), then every node holding
    /// a replica purges its files. A node that cannot be reached purges once it has caught up
    /// (see [`crate::history::History::reconcile`]).
    pub async fn delete_history(&self, user: UserId) -> Result<(), ServiceError> {
        let before = self.clock.now();
        self.commit(Command::DeleteHistory { user, before }).await?;
        let group = self.home(user)?;
        self.history.purge(group, user, before).await.map_err(|e| {
            tracing::warn!(group, user, error = %e, "history purge failed");
            ServiceError::unavailable(
                "the deletion is committed, but this node could not purge its files yet",
            )
        })?;
        for (node, answer) in self.ask_replicas(group, user, HistoryOp::Purge { before }).await {
            if !matches!(answer, Ok(PeerResponse::Done)) {
                tracing::warn!(group, node, ?answer, "a node did not purge a deleted history yet");
            }
        }
        Ok(())
    }

    /// Display names of `users`, asked of their groups; a group that cannot answer leaves its
    /// users unnamed.
    async fn names(&self, users: &[UserId]) -> std::collections::HashMap<UserId, String> {
        let mut by_group: std::collections::BTreeMap<GroupId, Vec<UserId>> = Default::default();
        for &u in users {
            if let Some(g) = self.router.directory().group_of(u) {
                by_group.entry(g).or_default().push(u);
            }
        }
        let mut out = std::collections::HashMap::new();
        for (g, ids) in by_group {
            match self.router.read(g, ReadQuery::Names(ids)).await {
                Ok(ReadAnswer::Names(named)) => out.extend(named),
                Ok(other) => tracing::warn!(group = g, ?other, "unexpected answer to a names read"),
                Err(e) => tracing::debug!(group = g, error = %e, "names unavailable"),
            }
        }
        out
    }
}

impl Backend for Gateway {
    fn now(&self) -> Millis {
        self.clock.now()
    }

    fn limits(&self) -> Limits {
        Limits {
            radius_m: self.config.presence.radius_m,
            ttl_s: self.config.presence.ttl.as_secs() as u32,
            page_size: self.config.page_size,
        }
    }

    async fn ensure_registered(&self, user: UserId) -> Result<(), ServiceError> {
        Gateway::ensure_registered(self, user).await
    }

    async fn open_session(&self, user: UserId) -> Result<Admission, ServiceError> {
        let group = self.home(user)?;
        let Some(d) = self.drivers.get(group) else {
            // Never send a client to a leader this node cannot reach: it is most likely dead,
            // and a new one is being elected.
            let directory = self.router.directory();
            let leader = directory.leader(group).filter(|l| *l != directory.me());
            let reachable = leader.is_some_and(|l| {
                self.router
                    .peers()
                    .last_ok(l)
                    .is_some_and(|t| t.elapsed() < REACHABLE)
            });
            return match (reachable, directory.leader_client_addr(group)) {
                (true, Some(addr)) => Ok(Admission::Redirect {
                    addr,
                    reason: format!("group {group} (your home shard) is led by another node"),
                }),
                _ => Err(ServiceError::unavailable(
                    "your home shard's leader is being elected; retry in a moment",
                )),
            };
        };
        let admitted = self.admission.lock().unwrap_or_else(|p| p.into_inner()).take();
        if !admitted {
            return Err(ServiceError::unavailable(
                "the node is admitting many sessions at once; retry in a moment",
            ));
        }
        // A token-bearing user exists in the app by definition: register on first sight, before
        // the driver looks the user up.
        if !d.group().read(|s| s.user(user).is_some()) {
            self.ensure_registered(user).await?;
        }
        if self.sessions.count(user) >= self.config.sessions_per_user {
            return Err(ServiceError::new(
                ErrorCode::TooManySessions,
                format!(
                    "user {user} already has {} sessions open on this node; close one first",
                    self.config.sessions_per_user
                ),
            ));
        }
        // Every session tells the driver, not only the user's first on this node: a session
        // still closing here (its group moved away, or split or merged, and came back) would
        // make a new one look like a second, and the driver serving the user now has never
        // seen it. A driver that already has the user online ignores the repeat.
        let sink = self.sessions.open(user);
        if !d.send(GroupMsg::Connect { user }) {
            self.sessions.close(user, sink.id());
            return Err(moved());
        }
        Ok(Admission::Open(sink))
    }

    async fn close_session(&self, user: UserId, sink: SessionSink) {
        if self.sessions.close(user, sink.id()) {
            if let Ok(d) = self.driver(user) {
                d.send(GroupMsg::Disconnect { user });
            }
        }
    }

    async fn has_location(&self, user: UserId) -> bool {
        self.ask(user, |reply| GroupMsg::HasLocation { user, reply })
            .await
            .unwrap_or(false)
    }

    async fn update_location(
        &self,
        user: UserId,
        at: Coord,
        first: bool,
    ) -> Result<LocationAck, ServiceError> {
        let loc = LatLng::new(at.lat, at.lon)
            .map_err(|e| ServiceError::new(ErrorCode::InvalidCoordinates, e.to_string()))?;
        let d = self.driver(user)?;
        if !first && d.depth() > MAX_BACKLOG {
            return Err(ServiceError::new(
                ErrorCode::RateLimited,
                "the node is overloaded: this update was not applied; send the next one as usual",
            ));
        }
        let (reply, rx) = oneshot::channel();
        if !d.send(GroupMsg::Location {
            user,
            loc,
            first,
            reply,
        }) {
            return Err(moved());
        }
        rx.await.map_err(|_| moved())?
    }

    async fn list(
        &self,
        user: UserId,
        cursor: Option<String>,
        page_size: Option<u16>,
    ) -> Result<NearbyPage, ServiceError> {
        let (cursor, size) = page_request(cursor.as_deref(), page_size, self.config.page_size)?;
        self.ask(user, |reply| GroupMsg::List {
            user,
            cursor,
            size,
            reply,
        })
        .await?
    }

    async fn friends(
        &self,
        user: UserId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<FriendList, ServiceError> {
        Gateway::friends(self, user, after, limit).await
    }

    async fn read_history(
        &self,
        user: UserId,
        since: Millis,
        until: Millis,
        limit: usize,
    ) -> Result<proto::HistoryPage, ServiceError> {
        Gateway::read_history(self, user, since, until, limit).await
    }

    async fn delete_history(&self, user: UserId) -> Result<(), ServiceError> {
        Gateway::delete_history(self, user).await
    }

    async fn strangers(
        &self,
        user: UserId,
        page_size: Option<u16>,
    ) -> Result<proto::StrangerPage, ServiceError> {
        let (_, size) = page_request(None, page_size, self.config.page_size)?;
        self.ask(user, |reply| GroupMsg::Strangers { user, size, reply })
            .await?
    }

    async fn commit(&self, cmd: Command) -> Result<CommandResult, ServiceError> {
        Gateway::commit(self, cmd).await
    }

    async fn set_radius(&self, user: UserId, meters: u32) -> Result<(), ServiceError> {
        let d = self.driver(user)?;
        if d.send(GroupMsg::SetRadius { user, meters }) {
            Ok(())
        } else {
            Err(moved())
        }
    }

    fn tick(&self) {
        let now = self.clock.now();
        for d in self.drivers.all() {
            if d.is_due(now) {
                d.send(GroupMsg::Tick);
            }
        }
    }

    fn close_all(&self, reason: CloseReason) {
        self.sessions.close_all(&reason);
    }
}
