//! The node's core: joins the shard groups (replicated state), the per-group [`Presence`] (live
//! soft state) and the connected sessions, and routes between them.
//!
//! Every client-facing operation is a method here; the QUIC service only translates frames. On one
//! node every group is local, so a [`GroupMessage`] is delivered by a direct call; the forwarding
//! interface is the same one the cluster carries over the network between nodes.
//!
//! Locking: one mutex over all local presences (every `handle_*` is short and never awaits), and
//! each group's state read lock taken inside it. Raft applies take only the state write lock, so
//! the order is always presence → state and cannot deadlock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nearby_client::proto::{self, ErrorCode, NearbyFriend, NearbyPage, Outcome};
use nearby_index::friends::RangeTable;
use nearby_index::geo::{LatLng, Millis, UserId};
use nearby_index::query::Cursor;
use nearby_raft::{Command, CommandError, CommandResult, GroupId, ProposeError, ShardGroup};

use crate::clock::Clock;
use crate::presence::{Output, Presence, PresenceConfig};
use crate::queue::EventQueue;

/// A request's failure, as the client sees it: a stable code and a message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ServiceError {
    /// The stable code.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
}

impl ServiceError {
    /// An error with `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ServiceError {
            code,
            message: message.into(),
        }
    }

    /// As the wire's error body.
    pub fn body(&self) -> proto::ErrorBody {
        proto::ErrorBody {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

impl From<ProposeError> for ServiceError {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::Invalid(CommandError::UnknownUser { user }) => {
                ServiceError::new(ErrorCode::UnknownUser, format!("unknown user {user}"))
            }
            ProposeError::Invalid(e) => ServiceError::new(ErrorCode::InvalidArgument, e.to_string()),
            other => ServiceError::new(ErrorCode::Unavailable, other.to_string()),
        }
    }
}

/// The largest page a client may ask for; larger requests get this many.
pub const MAX_PAGE: u16 = 100;

/// Client-facing settings of a node.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Presence settings (radius, TTL).
    pub presence: PresenceConfig,
    /// Entries per page by default.
    pub page_size: u16,
    /// Events queued per session before positions are superseded.
    pub event_queue: usize,
    /// Load shedding: above these limits a share of periodic location updates is refused
    /// (`None`: never; see [`crate::service::overload`]).
    pub shed: Option<crate::service::overload::Limits>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            presence: PresenceConfig::default(),
            page_size: 20,
            event_queue: 256,
            shed: Some(crate::service::overload::Limits::default()),
        }
    }
}

/// One connected session's handle, as the core sees it.
#[derive(Clone)]
pub struct SessionSink {
    id: u64,
    /// Where the session's events go.
    pub events: Arc<EventQueue>,
}

impl SessionSink {
    /// A sink with its own queue, for backends that number their sessions themselves.
    pub fn new(id: u64, events: Arc<EventQueue>) -> Self {
        SessionSink { id, events }
    }

    /// The session's number.
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// What a location update answered (the SDK's type: the wire carries the same two answers).
pub use nearby_client::LocationAck;

/// The node's core (see the module doc).
pub struct Core {
    groups: HashMap<GroupId, ShardGroup>,
    ranges: Arc<RangeTable<GroupId>>,
    presence: Mutex<HashMap<GroupId, Presence>>,
    sessions: Mutex<HashMap<UserId, Vec<SessionSink>>>,
    next_session: AtomicU64,
    clock: Arc<dyn Clock>,
    config: ServiceConfig,
}

impl Core {
    /// A core over `groups` (all led by this node), routing users by the groups' ranges.
    pub fn new(
        groups: Vec<ShardGroup>,
        clock: Arc<dyn Clock>,
        config: ServiceConfig,
    ) -> Result<Self, String> {
        let table = RangeTable::new(groups.iter().map(|g| (g.range(), g.id())).collect())
            .map_err(|e| e.to_string())?;
        let ranges = Arc::new(table);
        let presence = groups
            .iter()
            .map(|g| {
                (
                    g.id(),
                    Presence::new(g.id(), config.presence.clone(), Arc::clone(&ranges)),
                )
            })
            .collect();
        Ok(Core {
            groups: groups.into_iter().map(|g| (g.id(), g)).collect(),
            ranges,
            presence: Mutex::new(presence),
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            clock,
            config,
        })
    }

    /// The node's settings.
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// The current time on the injected clock.
    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    fn presences(&self) -> MutexGuard<'_, HashMap<GroupId, Presence>> {
        self.presence.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The group owning `user`.
    pub fn group_of(&self, user: UserId) -> Result<&ShardGroup, ServiceError> {
        self.ranges
            .locate(user)
            .and_then(|g| self.groups.get(g))
            .ok_or_else(|| {
                ServiceError::new(
                    ErrorCode::InvalidArgument,
                    format!("user id {user} is not served"),
                )
            })
    }

    /// Whether `user` has a record.
    pub fn is_registered(&self, user: UserId) -> Result<bool, ServiceError> {
        Ok(self.group_of(user)?.read(|s| s.user(user).is_some()))
    }

    /// Registers `user` if needed (a token-bearing user exists in the app by definition).
    pub async fn ensure_registered(&self, user: UserId) -> Result<(), ServiceError> {
        if user == 0 {
            return Err(ServiceError::new(
                ErrorCode::InvalidArgument,
                "user id 0 is reserved",
            ));
        }
        if self.is_registered(user)? {
            return Ok(());
        }
        let cmd = Command::RegisterUser {
            user,
            name: format!("user {user}"),
        };
        self.commit(cmd).await.map(drop)
    }

    /// Runs `f` on the presence of `group` with the group's state, then delivers its outputs.
    fn with_presence<R>(
        &self,
        group: GroupId,
        f: impl FnOnce(&mut Presence, &nearby_raft::GroupState) -> R,
    ) -> R {
        let mut presences = self.presences();
        let (r, outputs) = {
            let (Some(p), Some(g)) = (presences.get_mut(&group), self.groups.get(&group)) else {
                // Groups and presences are built together in `new`; a miss is a routing bug.
                unreachable!("group {group} has no presence");
            };
            let r = g.read(|s| f(p, s));
            (r, p.poll_outputs())
        };
        self.dispatch(&mut presences, outputs);
        r
    }

    /// Delivers outputs until no presence has more: pushes to sessions, messages to groups.
    fn dispatch(&self, presences: &mut HashMap<GroupId, Presence>, mut queue: Vec<Output>) {
        let now = self.clock.now();
        while !queue.is_empty() {
            let mut next = Vec::new();
            for out in queue {
                match out {
                    Output::Push { viewer, event } => {
                        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
                        for s in sessions.get(&viewer).into_iter().flatten() {
                            s.events.push(event.clone());
                        }
                    }
                    Output::Send { to, msg } => {
                        let (Some(p), Some(g)) = (presences.get_mut(&to), self.groups.get(&to)) else {
                            tracing::warn!(group = to, "message for a group not on this node dropped");
                            continue;
                        };
                        g.read(|s| p.handle_message(s, msg, now));
                        next.extend(p.poll_outputs());
                    }
                }
            }
            queue = next;
        }
    }

    /// A session of `user` opened. The first session of a user subscribes it to its friends.
    pub fn open_session(&self, user: UserId) -> Result<SessionSink, ServiceError> {
        let group = self.group_of(user)?.id();
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let events = Arc::new(EventQueue::new(self.config.event_queue));
        let first = {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let list = sessions.entry(user).or_default();
            list.push(SessionSink {
                id,
                events: Arc::clone(&events),
            });
            list.len() == 1
        };
        if first {
            self.with_presence(group, |p, s| p.handle_connect(s, user, None));
        }
        Ok(SessionSink { id, events })
    }

    /// A session closed. The user's last session unsubscribes it.
    pub fn close_session(&self, user: UserId, sink: &SessionSink) {
        let last = {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let Some(list) = sessions.get_mut(&user) else {
                return;
            };
            list.retain(|s| s.id != sink.id);
            let empty = list.is_empty();
            if empty {
                sessions.remove(&user);
            }
            empty
        };
        if let (true, Ok(g)) = (last, self.group_of(user)) {
            self.with_presence(g.id(), |p, _| p.handle_disconnect(user));
        }
    }

    /// Whether the node holds a live location of `user`.
    pub fn has_location(&self, user: UserId) -> bool {
        let Ok(g) = self.group_of(user) else { return false };
        self.presences()
            .get(&g.id())
            .and_then(|p| p.location(user))
            .is_some()
    }

    /// Stores and publishes `user`'s location. `first` asks for the first page back.
    pub fn update_location(
        &self,
        user: UserId,
        at: proto::Coord,
        first: bool,
    ) -> Result<LocationAck, ServiceError> {
        let loc = LatLng::new(at.lat, at.lon)
            .map_err(|e| ServiceError::new(ErrorCode::InvalidCoordinates, e.to_string()))?;
        let group = self.group_of(user)?.id();
        let now = self.clock.now();
        self.with_presence(group, |p, s| {
            // The node stamps updates; two in the same millisecond must both count, so a user's
            // stamps strictly increase.
            let at = match p.location(user) {
                Some(prev) if prev.updated_at >= now => Millis(prev.updated_at.0 + 1),
                _ => now,
            };
            p.handle_location(s, user, loc, at, now, first)
        });
        let next_update_s = self.presences().get(&group).map_or(30, |p| p.cadence_s(user));
        if first {
            let page = self.list(user, None, None)?;
            return Ok(LocationAck::Started { page, next_update_s });
        }
        Ok(LocationAck::Located { next_update_s })
    }

    /// A page of the friends `user` sees.
    pub fn list(
        &self,
        user: UserId,
        cursor: Option<&str>,
        page_size: Option<u16>,
    ) -> Result<NearbyPage, ServiceError> {
        let group = self.group_of(user)?.id();
        let (cursor, size) = page_request(cursor, page_size, self.config.page_size)?;
        let presences = self.presences();
        let p = presences
            .get(&group)
            .ok_or_else(|| ServiceError::new(ErrorCode::Internal, "no presence for the user's group"))?;
        let (page, names) = p
            .page(user, size, cursor.as_ref())
            .ok_or_else(|| ServiceError::new(ErrorCode::NotStarted, "no live location: send one first"))?
            .map_err(|e| ServiceError::new(ErrorCode::InvalidArgument, e.to_string()))?;
        Ok(wire_page(page, names))
    }

    /// Changes a session user's search radius.
    pub fn set_radius(&self, user: UserId, meters: u32) -> Result<(), ServiceError> {
        let group = self.group_of(user)?.id();
        self.with_presence(group, |p, _| p.set_radius(user, f64::from(meters)));
        Ok(())
    }

    /// Commits `cmd` in every group it concerns — the acting user's first, so a change that
    /// reaches only one side can only hide a location — and applies its effect on live streams.
    pub async fn commit(&self, cmd: Command) -> Result<CommandResult, ServiceError> {
        let (actor, other) = cmd.users();
        let first = self.group_of(actor)?;
        let second = match other.filter(|_| cmd.is_two_sided()) {
            Some(o) => {
                let g = self.group_of(o)?;
                let exists = g.read(|s| s.user(o).is_some());
                let removal = matches!(cmd, Command::RemoveFriend { .. } | Command::RevokeFollow { .. });
                if !exists && !removal {
                    return Err(ServiceError::new(
                        ErrorCode::UnknownUser,
                        format!("unknown user {o}"),
                    ));
                }
                // Removing a relation with a user who does not exist only cleans this side.
                (exists && g.id() != first.id()).then_some(g)
            }
            None => None,
        };
        let result = first.propose(cmd.clone()).await?;
        self.committed(first.id(), &cmd, &result);
        if let Some(g) = second {
            // The first half committed: the second must follow. Retry transient failures for a
            // while; a validation failure here would mean the two groups disagree, which the
            // checks above exclude.
            let mut delay = Duration::from_millis(10);
            let r = loop {
                match g.propose(cmd.clone()).await {
                    Ok(r) => break r,
                    Err(ProposeError::Invalid(e)) => {
                        tracing::error!(%cmd, error = %e, "second half of a relation rejected");
                        return Err(ProposeError::Invalid(e).into());
                    }
                    Err(e) if delay < Duration::from_secs(5) => {
                        tracing::warn!(%cmd, error = %e, "retrying the second half of a relation");
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            self.committed(g.id(), &cmd, &r);
        }
        Ok(result)
    }

    fn committed(&self, group: GroupId, cmd: &Command, result: &CommandResult) {
        let now = self.clock.now();
        self.with_presence(group, |p, s| p.handle_committed(s, cmd, result, now));
    }

    /// Expires locations whose TTL passed, in every group.
    pub fn tick(&self) {
        let now = self.clock.now();
        let due: Vec<GroupId> = self
            .presences()
            .iter()
            .filter(|(_, p)| p.next_deadline().is_some_and(|d| d <= now))
            .map(|(g, _)| *g)
            .collect();
        for g in due {
            self.with_presence(g, |p, _| p.handle_tick(now));
        }
    }

    /// Closes every session's event queue (shutdown).
    pub fn close_all(&self, reason: &'static str) {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        for s in sessions.values().flatten() {
            s.events.close(reason);
        }
    }

    /// The user's relations, for `ListFriends`.
    pub fn friends(&self, user: UserId) -> Result<proto::FriendList, ServiceError> {
        let g = self.group_of(user)?;
        let record = g
            .read(|s| s.user(user).cloned())
            .ok_or_else(|| ServiceError::new(ErrorCode::UnknownUser, format!("unknown user {user}")))?;
        let mut entries = Vec::new();
        let sets = [
            (&record.friends, proto::Relation::Friend),
            (&record.requests_in, proto::Relation::RequestReceived),
            (&record.requests_out, proto::Relation::RequestSent),
        ];
        for (set, relation) in sets {
            for id in set.iter() {
                let name = self
                    .group_of(id)
                    .ok()
                    .and_then(|g| g.read(|s| s.user(id).map(|r| r.name.clone())));
                entries.push(proto::FriendEntry {
                    id,
                    name,
                    relation,
                    hidden: record.hidden_from.contains(id),
                });
            }
        }
        entries.sort_by_key(|e| e.id);
        Ok(proto::FriendList {
            entries,
            sharing: record.sharing,
        })
    }
}

/// A page request's cursor, parsed, and its size: the default if none, clamped to
/// `1..=MAX_PAGE` (100 entries with the longest names still fit a 64 KiB frame).
pub fn page_request(
    cursor: Option<&str>,
    page_size: Option<u16>,
    default: u16,
) -> Result<(Option<Cursor>, usize), ServiceError> {
    let cursor = cursor
        .map(Cursor::from_token)
        .transpose()
        .map_err(|e| ServiceError::new(ErrorCode::InvalidArgument, e.to_string()))?;
    Ok((cursor, page_size.unwrap_or(default).clamp(1, MAX_PAGE) as usize))
}

/// An index page and the entries' display names, as the wire's page.
pub fn wire_page(page: nearby_index::query::Page, names: Vec<String>) -> NearbyPage {
    NearbyPage {
        friends: page
            .entries
            .iter()
            .zip(names)
            .map(|(e, name)| NearbyFriend {
                id: e.user,
                name,
                distance_m: e.distance_m,
                updated_at: e.updated_at,
            })
            .collect(),
        next: page.next.map(|c| c.to_token()),
    }
}

/// Maps a command's result to the wire's outcome.
pub fn outcome(r: &CommandResult) -> Outcome {
    match r {
        CommandResult::FriendRequestSent => Outcome::FriendRequestSent,
        CommandResult::FriendshipFormed => Outcome::FriendshipFormed,
        CommandResult::AlreadyFriends => Outcome::AlreadyFriends,
        CommandResult::FriendRemoved => Outcome::FriendRemoved,
        CommandResult::Unchanged | CommandResult::AlreadyRegistered => Outcome::Unchanged,
        CommandResult::Registered
        | CommandResult::Updated
        | CommandResult::Imported { .. }
        | CommandResult::Rejected(_) => Outcome::Updated,
    }
}

impl crate::backend::Backend for Core {
    fn now(&self) -> Millis {
        Core::now(self)
    }

    fn limits(&self) -> crate::backend::Limits {
        crate::backend::Limits {
            radius_m: self.config.presence.radius_m,
            ttl_s: self.config.presence.ttl.as_secs() as u32,
            page_size: self.config.page_size,
        }
    }

    async fn ensure_registered(&self, user: UserId) -> Result<(), ServiceError> {
        Core::ensure_registered(self, user).await
    }

    async fn open_session(&self, user: UserId) -> Result<SessionSink, ServiceError> {
        Core::open_session(self, user)
    }

    async fn close_session(&self, user: UserId, sink: SessionSink) {
        Core::close_session(self, user, &sink)
    }

    async fn has_location(&self, user: UserId) -> bool {
        Core::has_location(self, user)
    }

    async fn update_location(
        &self,
        user: UserId,
        at: proto::Coord,
        first: bool,
    ) -> Result<LocationAck, ServiceError> {
        Core::update_location(self, user, at, first)
    }

    async fn list(
        &self,
        user: UserId,
        cursor: Option<String>,
        page_size: Option<u16>,
    ) -> Result<NearbyPage, ServiceError> {
        Core::list(self, user, cursor.as_deref(), page_size)
    }

    async fn friends(&self, user: UserId) -> Result<proto::FriendList, ServiceError> {
        Core::friends(self, user)
    }

    async fn commit(&self, cmd: Command) -> Result<CommandResult, ServiceError> {
        Core::commit(self, cmd).await
    }

    async fn set_radius(&self, user: UserId, meters: u32) -> Result<(), ServiceError> {
        Core::set_radius(self, user, meters)
    }

    fn tick(&self) {
        Core::tick(self)
    }

    fn close_all(&self, reason: &'static str) {
        Core::close_all(self, reason)
    }
}
