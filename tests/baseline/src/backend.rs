//! [`RedisBackend`]: nearby's client service on the original design's storage and routing — a
//! Redis location cache with TTL, friend sets in Redis, and one Redis Pub/Sub channel per user.
//!
//! | operation | Redis commands (the key and message texts are in [`crate::keys`]) |
//! |---|---|
//! | register | `SET name:{u} "user {u}" NX` |
//! | session opens | `EXISTS nosharing:{u}`; `SUBSCRIBE ctl:{u}` (relation news for the user's own sessions) |
//! | first location (start-up) | `SMEMBERS friends:{u}` + `SMEMBERS following:{u}`; `SUBSCRIBE ch:{f}` for each; `MULTI MGET loc:{f}… MGET name:{f}… SMEMBERS hiddenby:{u} EXEC`; first page computed here; then as below |
//! | every location | `SET loc:{u} lat,lon,at EX ttl` + `PUBLISH ch:{u} L,…` (one pipeline; nothing while sharing is off) |
//! | message on `ch:{f}` | none: distance to the viewer's latest location here, events to its sessions |
//! | friend inactive | none: a local timer per viewer (`tick`) drops friends whose last location is older than the TTL |
//! | add friend | Lua script on `friends:`, `req_in:`, `req_out:` of both; `PUBLISH ctl:{a} F,b` + `PUBLISH ctl:{b} F,a` (each side's server subscribes and reads the new friend's location), or `PUBLISH ctl:{b} Q,a` |
//! | remove friend | Lua script; `PUBLISH ch:{a} X,b` + `PUBLISH ch:{b} X,a` (the other side forgets and unsubscribes) |
//! | hide / unhide | `SADD`/`SREM hidden:{u} v` + `hiddenby:{v} u`; `PUBLISH ch:{u} H,v` / `S,v,loc` |
//! | sharing off / on | `SET nosharing:{u}` + `DEL loc:{u}` + `PUBLISH ch:{u} G` / `DEL nosharing:{u}` + `SET loc` + `PUBLISH L` |
//! | session closes (last one) | `UNSUBSCRIBE` the channels no other local user wants |
//!
//! # Locking
//!
//! Each online user has a slot: an async `op` lock that serialises everything that writes to
//! Redis for the user (locations, settings, subscriptions), and a plain mutex over its
//! [`View`] and sessions, never held across an await. Order: `op` → pool `order` → table; the
//! view's mutex is taken alone.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nearby_client::proto::{self, Coord, ErrorCode, Event, FriendList, NearbyPage};
use nearby_client::LocationAck;
use nearby_index::geo::{LatLng, Millis, UserId};
use nearby_index::ttl::LatestLocation;
use nearby_node::api::{page_request, wire_page, ServiceConfig, ServiceError, SessionSink};
use nearby_node::api::{Admission, Backend, Limits};
use nearby_node::clock::{Clock, SystemClock};
use nearby_node::queue::CloseReason;
use nearby_node::queue::EventQueue;
use nearby_raft::{Command, CommandResult};
use redis::aio::MultiplexedConnection;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::keys::{self, Channel, Message};
use crate::pubsub::{Deliver, PubSubPool};
use crate::view::{FollowUp, SnapshotEntry, View};
use crate::BaselineError;

/// How the baseline runs. Radius, TTL, page size and event queue come from nearby's own
/// defaults ([`BaselineConfig::from_service`]), so both systems are compared on one setting.
#[derive(Clone, Debug)]
pub struct BaselineConfig {
    /// Search radius, metres.
    pub radius_m: f64,
    /// Inactivity timeout: `EX` of `loc:{u}` and the local expiry of friends' locations.
    pub ttl: Duration,
    /// Entries per page by default.
    pub page_size: u16,
    /// Events queued per session before positions are superseded.
    pub event_queue: usize,
    /// Redis connections in subscribed mode, shared by all sessions.
    pub pubsub_connections: usize,
    /// Messages queued per Pub/Sub connection before new ones are dropped.
    pub pubsub_queue: usize,
    /// Redis connections for commands (each multiplexes concurrent requests).
    pub command_connections: usize,
    /// Subscription follow-ups queued (new friends, unfriendings) before new ones are dropped.
    pub control_queue: usize,
}

impl BaselineConfig {
    /// nearby's settings for radius, TTL, page size and event queue; the pool sizes' defaults.
    pub fn from_service(s: &ServiceConfig) -> Self {
        BaselineConfig {
            radius_m: s.presence.radius_m,
            ttl: s.presence.ttl,
            page_size: s.page_size,
            event_queue: s.event_queue,
            pubsub_connections: 16,
            pubsub_queue: 65_536,
            command_connections: 2,
            control_queue: 4_096,
        }
    }
}

impl Default for BaselineConfig {
    fn default() -> Self {
        Self::from_service(&ServiceConfig::default())
    }
}

/// Adds a friend; returns 0 already friends, 1 friendship formed, 2 request sent.
/// KEYS: friends:a friends:b req_in:a req_out:a req_in:b req_out:b; ARGV: a b.
const ADD_FRIEND: &str = r"
if redis.call('SISMEMBER', KEYS[1], ARGV[2]) == 1 then return 0 end
if redis.call('SREM', KEYS[3], ARGV[2]) == 1 then
  redis.call('SREM', KEYS[6], ARGV[1])
  redis.call('SADD', KEYS[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[1])
  return 1
end
redis.call('SADD', KEYS[4], ARGV[2])
redis.call('SADD', KEYS[5], ARGV[1])
return 2
";

/// Removes a friendship or request; returns 2 friendship removed, 1 request removed, 0 nothing.
/// Same KEYS and ARGV as [`ADD_FRIEND`].
const REMOVE_FRIEND: &str = r"
local was = redis.call('SREM', KEYS[1], ARGV[2]) + redis.call('SREM', KEYS[2], ARGV[1])
local req = redis.call('SREM', KEYS[3], ARGV[2]) + redis.call('SREM', KEYS[4], ARGV[2])
  + redis.call('SREM', KEYS[5], ARGV[1]) + redis.call('SREM', KEYS[6], ARGV[1])
if was > 0 then return 2 elseif req > 0 then return 1 else return 0 end
";

/// One online user of this server.
struct Slot {
    op: tokio::sync::Mutex<()>,
    state: Mutex<SlotState>,
}

struct SlotState {
    sessions: Vec<SessionSink>,
    view: View,
    /// Subscribed to the friends' channels and loaded their snapshot.
    started: bool,
    /// The user's own sharing setting (read when the slot opens, changed by its commits).
    sharing: bool,
    /// Torn down: a new session makes a new slot.
    closed: bool,
}

impl SlotState {
    fn push(&self, events: Vec<Event>) {
        for e in events {
            for s in &self.sessions {
                s.events.push(e.clone());
            }
        }
    }
}

/// A subscription follow-up for the control task.
struct Op {
    viewer: UserId,
    follow: FollowUp,
}

struct Inner {
    config: BaselineConfig,
    clock: SystemClock,
    commands: Vec<MultiplexedConnection>,
    next_command: AtomicUsize,
    pool: Arc<PubSubPool>,
    users: Mutex<HashMap<UserId, Arc<Slot>>>,
    ops: mpsc::Sender<Op>,
    next_session: AtomicU64,
    malformed: AtomicU64,
    add_friend: redis::Script,
    remove_friend: redis::Script,
}

/// The original design behind nearby's [`Backend`] (see the module doc). Background tasks
/// (Pub/Sub workers, the control task) stop when it is dropped.
pub struct RedisBackend {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RedisBackend {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unavailable(what: &str) -> impl FnOnce(redis::RedisError) -> ServiceError + '_ {
    move |e| ServiceError::new(ErrorCode::Unavailable, format!("redis {what}: {e}"))
}

fn invalid(message: impl Into<String>) -> ServiceError {
    ServiceError::new(ErrorCode::InvalidArgument, message)
}

impl RedisBackend {
    /// Connects to Redis at `url` (`redis://127.0.0.1:6379`): the command connections and the
    /// Pub/Sub pool, and starts the pool's workers and the control task.
    pub async fn connect(url: &str, config: BaselineConfig) -> Result<RedisBackend, BaselineError> {
        let client = redis::Client::open(format!("{url}/?protocol=resp3"))
            .map_err(BaselineError::redis("parse the Redis address"))?;
        let mut commands = Vec::new();
        for _ in 0..config.command_connections.max(1) {
            commands.push(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(BaselineError::redis("open a command connection"))?,
            );
        }
        let (pool, receivers) =
            PubSubPool::connect(&client, config.pubsub_connections, config.pubsub_queue).await?;
        let pool = Arc::new(pool);
        let (ops, ops_rx) = mpsc::channel(config.control_queue.max(1));
        let inner = Arc::new(Inner {
            config,
            clock: SystemClock,
            commands,
            next_command: AtomicUsize::new(0),
            pool: Arc::clone(&pool),
            users: Mutex::new(HashMap::new()),
            ops,
            next_session: AtomicU64::new(1),
            malformed: AtomicU64::new(0),
            add_friend: redis::Script::new(ADD_FRIEND),
            remove_friend: redis::Script::new(REMOVE_FRIEND),
        });
        let mut tasks = pool.spawn_workers(receivers, Arc::clone(&inner));
        tasks.push(tokio::spawn(Arc::clone(&inner).control(ops_rx)));
        Ok(RedisBackend { inner, tasks })
    }

    /// Loads a bulk-import seed (see [`crate::import`]).
    pub async fn import(
        &self,
        seed: &nearby_raft::seed::Seed,
    ) -> Result<crate::import::Imported, BaselineError> {
        crate::import::import(&mut self.inner.command(), seed).await
    }

    /// Counters for logs and benchmarks.
    pub fn stats(&self) -> Stats {
        Stats {
            online: lock(&self.inner.users).len(),
            channels: self.inner.pool.channels(),
            dropped: self.inner.pool.dropped(),
            malformed: self.inner.malformed.load(Ordering::Relaxed),
        }
    }
}

/// Counters of a running backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Users with a session on this server.
    pub online: usize,
    /// Channels this server is subscribed to.
    pub channels: usize,
    /// Pub/Sub messages dropped on a full queue.
    pub dropped: u64,
    /// Pub/Sub messages that did not parse.
    pub malformed: u64,
}

impl Deliver for Inner {
    fn deliver(&self, channel: Channel, payload: &[u8], users: &[UserId]) {
        let Some(msg) = Message::decode(payload) else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let from = match channel {
            Channel::Loc(u) | Channel::Ctl(u) => u,
        };
        let now = self.clock.now();
        for &viewer in users {
            let Some(slot) = self.slot(viewer) else { continue };
            let follow = {
                let mut st = lock(&slot.state);
                let (events, follow) = st.view.handle_message(from, msg.clone(), now);
                st.push(events);
                follow
            };
            if let Some(follow) = follow {
                if self.ops.try_send(Op { viewer, follow }).is_err() {
                    tracing::warn!(viewer, ?follow, "control queue full; subscription change dropped");
                }
            }
        }
    }

    fn connection_lost(&self, index: usize) {
        tracing::error!(
            index,
            "a Redis Pub/Sub connection was lost; closing every session"
        );
        for slot in self.slots() {
            for s in &lock(&slot.state).sessions {
                s.events
                    .close(CloseReason::Failed("redis pub/sub connection lost".into()));
            }
        }
    }
}

impl Inner {
    fn command(&self) -> MultiplexedConnection {
        let i = self.next_command.fetch_add(1, Ordering::Relaxed) % self.commands.len();
        self.commands[i].clone()
    }

    fn slot(&self, user: UserId) -> Option<Arc<Slot>> {
        lock(&self.users).get(&user).cloned()
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        lock(&self.users).values().cloned().collect()
    }

    fn session_slot(&self, user: UserId) -> Result<Arc<Slot>, ServiceError> {
        self.slot(user)
            .ok_or_else(|| ServiceError::new(ErrorCode::NotAuthenticated, "no session for this user"))
    }

    /// Runs subscription follow-ups in order.
    async fn control(self: Arc<Self>, mut ops: mpsc::Receiver<Op>) {
        while let Some(op) = ops.recv().await {
            if let Err(e) = self.follow_up(op).await {
                tracing::warn!(error = %e, "subscription follow-up failed");
            }
        }
    }

    async fn follow_up(&self, op: Op) -> Result<(), ServiceError> {
        let Some(slot) = self.slot(op.viewer) else {
            return Ok(());
        };
        let _op = slot.op.lock().await;
        match op.follow {
            FollowUp::Subscribe(friend) => {
                {
                    let mut st = lock(&slot.state);
                    // Not started: the start-up reads the friend set itself.
                    if st.closed || !st.started || st.view.add_publishers([friend]).is_empty() {
                        return Ok(());
                    }
                }
                self.pool
                    .subscribe(op.viewer, [Channel::Loc(friend)])
                    .await
                    .map_err(|e| ServiceError::new(ErrorCode::Unavailable, e.to_string()))?;
                let snap = self.snapshot(op.viewer, &[friend]).await?;
                let mut st = lock(&slot.state);
                let events = st.view.handle_snapshot(snap, self.clock.now(), true);
                st.push(events);
            }
            FollowUp::Unsubscribe(friend) => {
                if lock(&slot.state).view.follows(friend) {
                    return Ok(());
                }
                self.pool
                    .unsubscribe(op.viewer, [Channel::Loc(friend)])
                    .await
                    .map_err(|e| ServiceError::new(ErrorCode::Unavailable, e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Reads, after subscribing, what `viewer` may know of `friends`: one `MULTI` of `MGET
    /// loc:…`, `MGET name:…` and `SMEMBERS hiddenby:{viewer}`.
    async fn snapshot(&self, viewer: UserId, friends: &[UserId]) -> Result<Vec<SnapshotEntry>, ServiceError> {
        if friends.is_empty() {
            return Ok(Vec::new());
        }
        let locs: Vec<String> = friends.iter().map(|f| keys::loc(*f)).collect();
        let names: Vec<String> = friends.iter().map(|f| keys::name(*f)).collect();
        let (locs, names, hidden_by): (Vec<Option<String>>, Vec<Option<String>>, HashSet<UserId>) =
            redis::pipe()
                .atomic()
                .cmd("MGET")
                .arg(&locs)
                .cmd("MGET")
                .arg(&names)
                .cmd("SMEMBERS")
                .arg(keys::hidden_by(viewer))
                .query_async(&mut self.command())
                .await
                .map_err(unavailable("start-up batch"))?;
        Ok(friends
            .iter()
            .zip(locs.into_iter().zip(names))
            .map(|(&user, (loc, name))| SnapshotEntry {
                user,
                name,
                loc: loc.as_deref().and_then(keys::decode_location),
                hidden: hidden_by.contains(&user),
            })
            .collect())
    }

    /// Start-up of a user's view (holding the slot's `op` lock): friends, subscriptions, the
    /// batch read. Quiet: the first page shows the result.
    async fn start(&self, user: UserId, slot: &Slot) -> Result<(), ServiceError> {
        let (friends, following): (Vec<UserId>, Vec<UserId>) = redis::pipe()
            .cmd("SMEMBERS")
            .arg(keys::friends(user))
            .cmd("SMEMBERS")
            .arg(keys::following(user))
            .query_async(&mut self.command())
            .await
            .map_err(unavailable("SMEMBERS"))?;
        let added = lock(&slot.state)
            .view
            .add_publishers(friends.into_iter().chain(following));
        // Subscribe first, read second: an update published in between is not lost.
        self.pool
            .subscribe(user, added.iter().map(|f| Channel::Loc(*f)))
            .await
            .map_err(|e| ServiceError::new(ErrorCode::Unavailable, e.to_string()))?;
        let snap = self.snapshot(user, &added).await?;
        let mut st = lock(&slot.state);
        // Quiet at start-up: the first page covers it.
        let _ = st.view.handle_snapshot(snap, self.clock.now(), false);
        st.started = true;
        Ok(())
    }

    /// `SET loc:{u} … EX ttl` and `PUBLISH ch:{u} L,…` in one pipeline.
    async fn publish_location(&self, user: UserId, at: &LatestLocation) -> Result<(), ServiceError> {
        redis::pipe()
            .cmd("SET")
            .arg(keys::loc(user))
            .arg(keys::encode_location(at))
            .arg("EX")
            .arg(self.config.ttl.as_secs().max(1))
            .ignore()
            .cmd("PUBLISH")
            .arg(Channel::Loc(user).to_string())
            .arg(Message::Moved(*at).encode())
            .ignore()
            .query_async::<()>(&mut self.command())
            .await
            .map_err(unavailable("SET/PUBLISH"))
    }

    async fn publish(&self, pairs: Vec<(Channel, Message)>) -> Result<(), ServiceError> {
        if pairs.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (ch, msg) in pairs {
            pipe.cmd("PUBLISH").arg(ch.to_string()).arg(msg.encode()).ignore();
        }
        pipe.query_async::<()>(&mut self.command())
            .await
            .map_err(unavailable("PUBLISH"))
    }

    async fn exists(&self, key: String) -> Result<bool, ServiceError> {
        redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut self.command())
            .await
            .map_err(unavailable("EXISTS"))
    }

    async fn require_user(&self, user: UserId) -> Result<(), ServiceError> {
        if self.exists(keys::name(user)).await? {
            Ok(())
        } else {
            Err(ServiceError::new(
                ErrorCode::UnknownUser,
                format!("unknown user {user}"),
            ))
        }
    }

    async fn open(&self, user: UserId) -> Result<SessionSink, ServiceError> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let sink = SessionSink::new(id, Arc::new(EventQueue::new(self.config.event_queue)));
        loop {
            let slot = {
                let mut users = lock(&self.users);
                let slot = users.entry(user).or_insert_with(|| {
                    Arc::new(Slot {
                        op: tokio::sync::Mutex::new(()),
                        state: Mutex::new(SlotState {
                            sessions: Vec::new(),
                            view: View::new(user, self.config.radius_m, self.config.ttl),
                            started: false,
                            sharing: true,
                            closed: false,
                        }),
                    })
                });
                Arc::clone(slot)
            };
            let _op = slot.op.lock().await;
            let first = {
                let mut st = lock(&slot.state);
                if st.closed {
                    continue; // torn down while we waited: make a new one
                }
                st.sessions.push(sink.clone());
                st.sessions.len() == 1
            };
            if first {
                let setup = async {
                    let off = self.exists(keys::no_sharing(user)).await?;
                    lock(&slot.state).sharing = !off;
                    self.pool
                        .subscribe(user, [Channel::Ctl(user)])
                        .await
                        .map_err(|e| ServiceError::new(ErrorCode::Unavailable, e.to_string()))
                };
                if let Err(e) = setup.await {
                    drop(_op);
                    self.close(user, &sink).await;
                    return Err(e);
                }
            }
            return Ok(sink);
        }
    }

    async fn close(&self, user: UserId, sink: &SessionSink) {
        let Some(slot) = self.slot(user) else { return };
        let _op = slot.op.lock().await;
        let channels: Vec<Channel> = {
            let mut st = lock(&slot.state);
            st.sessions.retain(|s| s.id() != sink.id());
            if !st.sessions.is_empty() || st.closed {
                return;
            }
            st.closed = true;
            std::iter::once(Channel::Ctl(user))
                .chain(st.view.publishers().map(Channel::Loc))
                .collect()
        };
        {
            let mut users = lock(&self.users);
            if users.get(&user).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                users.remove(&user);
            }
        }
        if let Err(e) = self.pool.unsubscribe(user, channels).await {
            tracing::warn!(user, error = %e, "unsubscribe at session end failed");
        }
    }

    async fn has_location(&self, user: UserId) -> Result<bool, ServiceError> {
        let raw: Option<String> = redis::cmd("GET")
            .arg(keys::loc(user))
            .query_async(&mut self.command())
            .await
            .map_err(unavailable("GET"))?;
        let Some(at) = raw.as_deref().and_then(keys::decode_location) else {
            return Ok(false);
        };
        // A reconnect within the TTL: the session has started already, so start the view now.
        let slot = self.session_slot(user)?;
        let _op = slot.op.lock().await;
        if !lock(&slot.state).started {
            self.start(user, &slot).await?;
        }
        let mut st = lock(&slot.state);
        if st.view.me().is_none_or(|m| m.updated_at < at.updated_at) {
            let _ = st.view.handle_own_location(at, false);
        }
        Ok(true)
    }

    async fn update_location(
        &self,
        user: UserId,
        at: Coord,
        first: bool,
    ) -> Result<LocationAck, ServiceError> {
        let loc = LatLng::new(at.lat, at.lon)
            .map_err(|e| ServiceError::new(ErrorCode::InvalidCoordinates, e.to_string()))?;
        let slot = self.session_slot(user)?;
        let _op = slot.op.lock().await;
        if !lock(&slot.state).started {
            self.start(user, &slot).await?;
        }
        let now = self.clock.now();
        let (latest, sharing) = {
            let mut st = lock(&slot.state);
            // Two updates in one millisecond must both count: stamps strictly increase.
            let stamp = match st.view.me() {
                Some(prev) if prev.updated_at >= now => Millis(prev.updated_at.0 + 1),
                _ => now,
            };
            let latest = LatestLocation {
                loc,
                updated_at: stamp,
            };
            let events = st.view.handle_own_location(latest, !first);
            st.push(events);
            (latest, st.sharing)
        };
        if sharing {
            self.publish_location(user, &latest).await?;
        }
        let next_update_s = lock(&slot.state).view.cadence_s();
        if first {
            let page = self.list(user, None, None)?;
            return Ok(LocationAck::Started { page, next_update_s });
        }
        Ok(LocationAck::Located { next_update_s })
    }

    fn list(
        &self,
        user: UserId,
        cursor: Option<&str>,
        page_size: Option<u16>,
    ) -> Result<NearbyPage, ServiceError> {
        let (cursor, size) = page_request(cursor, page_size, self.config.page_size)?;
        let slot = self.session_slot(user)?;
        let st = lock(&slot.state);
        let (page, names) = st
            .view
            .page(size, cursor.as_ref())
            .ok_or_else(|| ServiceError::new(ErrorCode::NotStarted, "no live location: send one first"))?
            .map_err(|e| invalid(e.to_string()))?;
        // The original design's view does not tell friends from followed users.
        Ok(wire_page(page, names, |_| proto::Relation::Friend))
    }

    async fn friends(
        &self,
        user: UserId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<FriendList, ServiceError> {
        #[allow(clippy::type_complexity)] // one pipeline's reply, read once
        let (exists, friends, req_in, req_out, hidden, off): (
            bool,
            Vec<UserId>,
            Vec<UserId>,
            Vec<UserId>,
            HashSet<UserId>,
            bool,
        ) = redis::pipe()
            .cmd("EXISTS")
            .arg(keys::name(user))
            .cmd("SMEMBERS")
            .arg(keys::friends(user))
            .cmd("SMEMBERS")
            .arg(keys::req_in(user))
            .cmd("SMEMBERS")
            .arg(keys::req_out(user))
            .cmd("SMEMBERS")
            .arg(keys::hidden(user))
            .cmd("EXISTS")
            .arg(keys::no_sharing(user))
            .query_async(&mut self.command())
            .await
            .map_err(unavailable("relations"))?;
        if !exists {
            return Err(ServiceError::new(
                ErrorCode::UnknownUser,
                format!("unknown user {user}"),
            ));
        }
        let mut entries: Vec<(UserId, proto::Relation)> = friends
            .into_iter()
            .map(|f| (f, proto::Relation::Friend))
            .chain(req_in.into_iter().map(|f| (f, proto::Relation::RequestReceived)))
            .chain(req_out.into_iter().map(|f| (f, proto::Relation::RequestSent)))
            .collect();
        entries.sort_by_key(|e| e.0);
        // A page: the users after `after`, at most `limit` of them.
        entries.retain(|e| after.is_none_or(|a| e.0 > a));
        let mut users: Vec<UserId> = entries.iter().map(|e| e.0).collect();
        users.dedup();
        let limit = limit.max(1);
        let next = (users.len() > limit).then(|| users[limit - 1]);
        if let Some(last) = next {
            entries.retain(|e| e.0 <= last);
        }
        let names: Vec<Option<String>> = if entries.is_empty() {
            Vec::new()
        } else {
            redis::cmd("MGET")
                .arg(entries.iter().map(|e| keys::name(e.0)).collect::<Vec<_>>())
                .query_async(&mut self.command())
                .await
                .map_err(unavailable("MGET"))?
        };
        Ok(FriendList {
            entries: entries
                .into_iter()
                .zip(names)
                .map(|((id, relation), name)| proto::FriendEntry {
                    id,
                    name,
                    relation,
                    hidden: hidden.contains(&id),
                })
                .collect(),
            sharing: !off,
            // The original design has neither strangers nor ghost mode.
            discoverable: false,
            ghost_until: None,
            history: false,
            next,
        })
    }

    /// Validates the other side of a relation.
    fn check_pair(user: UserId, other: UserId) -> Result<(), ServiceError> {
        if user == 0 || other == 0 {
            return Err(invalid("user id 0 is reserved"));
        }
        if user == other {
            return Err(invalid(format!("user {user} cannot be related to themselves")));
        }
        Ok(())
    }

    async fn commit(&self, cmd: Command) -> Result<CommandResult, ServiceError> {
        let (actor, _) = cmd.users();
        // Everything a user writes is ordered with its own locations.
        let slot = self.slot(actor);
        let _op = match &slot {
            Some(s) => Some(s.op.lock().await),
            None => None,
        };
        let relation_keys = |a: UserId, b: UserId| {
            [
                keys::friends(a),
                keys::friends(b),
                keys::req_in(a),
                keys::req_out(a),
                keys::req_in(b),
                keys::req_out(b),
            ]
        };
        match cmd {
            Command::RegisterUser { user, name } => {
                check_name(&name)?;
                let created: bool = redis::cmd("SET")
                    .arg(keys::name(user))
                    .arg(name)
                    .arg("NX")
                    .query_async::<Option<String>>(&mut self.command())
                    .await
                    .map_err(unavailable("SET NX"))?
                    .is_some();
                Ok(if created {
                    CommandResult::Registered
                } else {
                    CommandResult::AlreadyRegistered
                })
            }
            Command::SetName { user, name } => {
                check_name(&name)?;
                let old: Option<String> = redis::cmd("SET")
                    .arg(keys::name(user))
                    .arg(&name)
                    .arg("GET")
                    .query_async(&mut self.command())
                    .await
                    .map_err(unavailable("SET GET"))?;
                Ok(changed(old.as_deref() != Some(name.as_str())))
            }
            Command::AddFriend { from, to } => {
                Self::check_pair(from, to)?;
                self.require_user(to).await?;
                let code: i64 = self
                    .add_friend
                    .key(&relation_keys(from, to)[..])
                    .arg(from)
                    .arg(to)
                    .invoke_async(&mut self.command())
                    .await
                    .map_err(unavailable("add friend"))?;
                match code {
                    0 => Ok(CommandResult::AlreadyFriends),
                    1 => {
                        self.publish(vec![
                            (Channel::Ctl(from), Message::NewFriend { friend: to }),
                            (Channel::Ctl(to), Message::NewFriend { friend: from }),
                        ])
                        .await?;
                        Ok(CommandResult::FriendshipFormed)
                    }
                    _ => {
                        self.publish(vec![(Channel::Ctl(to), Message::Request { from })])
                            .await?;
                        Ok(CommandResult::FriendRequestSent)
                    }
                }
            }
            Command::RemoveFriend { user, friend } => {
                Self::check_pair(user, friend)?;
                let code: i64 = self
                    .remove_friend
                    .key(&relation_keys(user, friend)[..])
                    .arg(user)
                    .arg(friend)
                    .invoke_async(&mut self.command())
                    .await
                    .map_err(unavailable("remove friend"))?;
                match code {
                    2 => {
                        // A follower grant still lets the other side see: no revocation then.
                        let (a_follows, b_follows): (bool, bool) = redis::pipe()
                            .cmd("SISMEMBER")
                            .arg(keys::followers(user))
                            .arg(friend)
                            .cmd("SISMEMBER")
                            .arg(keys::followers(friend))
                            .arg(user)
                            .query_async(&mut self.command())
                            .await
                            .map_err(unavailable("SISMEMBER"))?;
                        let mut msgs = Vec::new();
                        if !a_follows {
                            msgs.push((Channel::Loc(user), Message::Unfriended { viewer: friend }));
                        }
                        if !b_follows {
                            msgs.push((Channel::Loc(friend), Message::Unfriended { viewer: user }));
                        }
                        self.publish(msgs).await?;
                        Ok(CommandResult::FriendRemoved)
                    }
                    1 => Ok(CommandResult::FriendRemoved),
                    _ => Ok(CommandResult::Unchanged),
                }
            }
            Command::Hide { user, from } => {
                Self::check_pair(user, from)?;
                let added = self.update_hidden("SADD", user, from).await?;
                if added {
                    self.publish(vec![(Channel::Loc(user), Message::Hide { viewer: from })])
                        .await?;
                }
                Ok(changed(added))
            }
            Command::Unhide { user, from } => {
                Self::check_pair(user, from)?;
                let removed = self.update_hidden("SREM", user, from).await?;
                if removed {
                    let at = match &slot {
                        Some(s) => {
                            let st = lock(&s.state);
                            st.view.me().filter(|_| st.sharing)
                        }
                        None => None,
                    };
                    self.publish(vec![(Channel::Loc(user), Message::Unhide { viewer: from, at })])
                        .await?;
                }
                Ok(changed(removed))
            }
            Command::SetSharing { user, on } => self.set_sharing(user, on, slot.as_deref()).await,
            // The original design has no ghost mode; one until turned off hides like sharing
            // off (what the load simulator asks of it), a timed one has no equivalent.
            Command::SetGhost {
                user,
                until: Some(proto::GHOST_FOREVER),
            } => self.set_sharing(user, false, slot.as_deref()).await,
            Command::SetGhost { user, until: None } => self.set_sharing(user, true, slot.as_deref()).await,
            other => Err(invalid(format!("{other} is not supported by the baseline"))),
        }
    }

    /// Applies `cmd` (`SADD` or `SREM`) to both sides of "`user` hides from `from`" — `from` in
    /// `user`'s hidden set, `user` in `from`'s hidden-by set — in one pipeline; returns whether
    /// `user`'s set changed.
    async fn update_hidden(
        &self,
        cmd: &'static str,
        user: UserId,
        from: UserId,
    ) -> Result<bool, ServiceError> {
        let (changed, _): (i64, i64) = redis::pipe()
            .cmd(cmd)
            .arg(keys::hidden(user))
            .arg(from)
            .cmd(cmd)
            .arg(keys::hidden_by(from))
            .arg(user)
            .query_async(&mut self.command())
            .await
            .map_err(unavailable(cmd))?;
        Ok(changed == 1)
    }

    async fn set_sharing(
        &self,
        user: UserId,
        on: bool,
        slot: Option<&Slot>,
    ) -> Result<CommandResult, ServiceError> {
        if let Some(s) = slot {
            lock(&s.state).sharing = on;
        }
        if on {
            let removed: i64 = redis::cmd("DEL")
                .arg(keys::no_sharing(user))
                .query_async(&mut self.command())
                .await
                .map_err(unavailable("DEL"))?;
            let me = slot.and_then(|s| lock(&s.state).view.me());
            if let (1, Some(at)) = (removed, me) {
                self.publish_location(user, &at).await?;
            }
            return Ok(changed(removed == 1));
        }
        let (set, _, _): (bool, i64, i64) = redis::pipe()
            .atomic()
            .cmd("SETNX")
            .arg(keys::no_sharing(user))
            .arg(1)
            .cmd("DEL")
            .arg(keys::loc(user))
            .cmd("PUBLISH")
            .arg(Channel::Loc(user).to_string())
            .arg(Message::SharingOff.encode())
            .query_async(&mut self.command())
            .await
            .map_err(unavailable("sharing off"))?;
        Ok(changed(set))
    }

    fn tick(&self) {
        let now = self.clock.now();
        for slot in self.slots() {
            let mut st = lock(&slot.state);
            if st.view.next_deadline().is_some_and(|d| d <= now) {
                let events = st.view.handle_tick(now);
                st.push(events);
            }
        }
    }
}

fn changed(did: bool) -> CommandResult {
    if did {
        CommandResult::Updated
    } else {
        CommandResult::Unchanged
    }
}

/// The display-name rule of nearby's store: 1–64 characters, not blank, no control characters.
fn check_name(name: &str) -> Result<(), ServiceError> {
    let max = nearby_raft::shard::command::MAX_NAME_CHARS;
    if name.trim().is_empty() {
        return Err(invalid("invalid display name: empty"));
    }
    if name.chars().count() > max {
        return Err(invalid(format!(
            "invalid display name: longer than {max} characters"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("invalid display name: contains control characters"));
    }
    Ok(())
}

impl Backend for RedisBackend {
    fn now(&self) -> Millis {
        self.inner.clock.now()
    }

    fn limits(&self) -> Limits {
        let c = &self.inner.config;
        Limits {
            radius_m: c.radius_m,
            ttl_s: c.ttl.as_secs() as u32,
            page_size: c.page_size,
        }
    }

    async fn ensure_registered(&self, user: UserId) -> Result<(), ServiceError> {
        if user == 0 {
            return Err(invalid("user id 0 is reserved"));
        }
        let cmd = Command::RegisterUser {
            user,
            name: format!("user {user}"),
        };
        self.inner.commit(cmd).await.map(drop)
    }

    async fn open_session(&self, user: UserId) -> Result<Admission, ServiceError> {
        // One server: every user is served here, registered on first sight.
        Backend::ensure_registered(self, user).await?;
        self.inner.open(user).await.map(Admission::Open)
    }

    async fn close_session(&self, user: UserId, sink: SessionSink) {
        self.inner.close(user, &sink).await
    }

    async fn has_location(&self, user: UserId) -> bool {
        match self.inner.has_location(user).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(user, error = %e, "cannot read the stored location");
                false
            }
        }
    }

    async fn update_location(
        &self,
        user: UserId,
        at: Coord,
        first: bool,
    ) -> Result<LocationAck, ServiceError> {
        self.inner.update_location(user, at, first).await
    }

    async fn list(
        &self,
        user: UserId,
        cursor: Option<String>,
        page_size: Option<u16>,
    ) -> Result<NearbyPage, ServiceError> {
        self.inner.list(user, cursor.as_deref(), page_size)
    }

    async fn read_history(
        &self,
        _user: UserId,
        _since: Millis,
        _until: Millis,
        _limit: usize,
    ) -> Result<proto::HistoryPage, ServiceError> {
        Err(invalid("location history is not part of the original design"))
    }

    async fn delete_history(&self, _user: UserId) -> Result<(), ServiceError> {
        Err(invalid("location history is not part of the original design"))
    }

    async fn strangers(
        &self,
        _user: UserId,
        _page_size: Option<u16>,
    ) -> Result<proto::StrangerPage, ServiceError> {
        Err(invalid("strangers nearby are not part of the original design"))
    }

    async fn friends(
        &self,
        user: UserId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<FriendList, ServiceError> {
        self.inner.friends(user, after, limit).await
    }

    async fn commit(&self, cmd: Command) -> Result<CommandResult, ServiceError> {
        self.inner.commit(cmd).await
    }

    async fn set_radius(&self, user: UserId, meters: u32) -> Result<(), ServiceError> {
        let max = self.inner.config.radius_m;
        let r = match f64::from(meters) {
            m if m <= 0.0 || m >= max => max,
            m => m,
        };
        let slot = self.inner.session_slot(user)?;
        let mut st = lock(&slot.state);
        let events = st.view.set_radius(r);
        st.push(events);
        Ok(())
    }

    fn tick(&self) {
        self.inner.tick()
    }

    fn close_all(&self, reason: CloseReason) {
        for slot in self.inner.slots() {
            for s in &lock(&slot.state).sessions {
                s.events.close(reason.clone());
            }
        }
    }
}
