//! Live presence of one shard group: who of its users is where (soft state), who is watching
//! whom, and what each online user must be told. This is the routing layer of the original
//! design's per-user channels, rebuilt as plain data: a *publisher*'s home group keeps the list of
//! online viewers subscribed to it, and a *viewer*'s home group keeps what the viewer currently
//! sees.
//!
//! [`Presence`] does no I/O, spawns nothing and reads no clock: inputs are `handle_*` calls with
//! the current time and the group's replicated state passed in; outputs are [`Output`]s — events
//! for local sessions, or [`GroupMessage`]s for other groups — which the caller delivers (to the
//! local group directly on one node, over the network in a cluster).
//!
//! # Who may see whom
//!
//! A publisher's location leaves its home group only towards viewers that its *own* record
//! allows at that moment ([`nearby_raft::state::UserRecord::may_see_me`]). A relation or privacy change committed in
//! the publisher's group therefore takes effect on the very next update, whatever the state of
//! subscriptions elsewhere: a partial or delayed change can only hide a location, never leak one.
//! Subscriptions are an optimisation (send only to groups with someone watching), not a grant.
//!
//! # Call order
//!
//! 1. [`Presence::handle_connect`] when a user's first session opens (subscribes it to its
//!    friends; their groups answer with [`GroupMessage::Snapshot`]s).
//! 2. [`Presence::handle_location`] for every location update of a user of this group.
//! 3. [`Presence::handle_message`] for every message from a group (including this one).
//! 4. [`Presence::handle_committed`] after a command of this group committed.
//! 5. [`Presence::handle_tick`] when the clock passes [`Presence::next_deadline`].
//! 6. [`Presence::handle_disconnect`] when the user's last session closes.
//!
//! After each call, the caller MUST take the outputs with [`Presence::poll_outputs`] and deliver
//! them, in order.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use nearby_client::proto::{Coord, Event, FriendPosition, GoneReason};
use nearby_index::friends::{FriendSet, RangeTable};
use nearby_index::geo::{LatLng, Millis, UserId};
use nearby_index::query::{nearby_page, Cursor, NearbyQuery, Page};
use nearby_index::ttl::{LatestLocation, LocationTable, SetOutcome};
use nearby_raft::state::GroupState;
use nearby_raft::{Command, CommandResult, GroupId};

/// A message from one group's presence to another's (or its own).
#[derive(Clone, Debug, PartialEq)]
pub enum GroupMessage {
    /// `viewer` (whose home is `viewer_group`) wants the updates of `publishers`.
    Subscribe {
        /// The viewer.
        viewer: UserId,
        /// The viewer's home group, where updates go.
        viewer_group: GroupId,
        /// Users of the receiving group.
        publishers: Vec<UserId>,
    },
    /// `viewer` no longer wants the updates of `publishers`.
    Unsubscribe {
        /// The viewer.
        viewer: UserId,
        /// Users of the receiving group.
        publishers: Vec<UserId>,
    },
    /// The answer to a subscription: the latest location of each publisher the viewer may see.
    Snapshot {
        /// The viewer.
        viewer: UserId,
        /// Visible publishers with a live location.
        entries: Vec<SnapshotEntry>,
    },
    /// `from` moved; tell `viewers` (users of the receiving group), who may all see it.
    Update {
        /// The publisher.
        from: UserId,
        /// Where and when.
        at: LatestLocation,
        /// Viewers of the receiving group.
        viewers: Vec<UserId>,
    },
    /// `viewers` must stop seeing `from`.
    Revoke {
        /// The publisher.
        from: UserId,
        /// Why.
        reason: GoneReason,
        /// Viewers of the receiving group.
        viewers: Vec<UserId>,
    },
}

/// One publisher in a [`GroupMessage::Snapshot`].
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotEntry {
    /// The publisher.
    pub user: UserId,
    /// Their display name.
    pub name: String,
    /// Their latest location.
    pub at: LatestLocation,
}

/// What a [`Presence`] asks its caller to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Push `event` to every session of `viewer` (a user of this group).
    Push {
        /// The user.
        viewer: UserId,
        /// The event.
        event: Event,
    },
    /// Deliver `msg` to the presence of group `to`.
    Send {
        /// The destination group.
        to: GroupId,
        /// The message.
        msg: GroupMessage,
    },
}

/// Settings shared by every group of a node.
#[derive(Clone, Debug)]
pub struct PresenceConfig {
    /// The largest search radius, and the default, in metres.
    pub radius_m: f64,
    /// Inactivity timeout of a location.
    pub ttl: Duration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            radius_m: 8_000.0,
            ttl: Duration::from_secs(600),
        }
    }
}

/// What an online user of this group currently sees.
#[derive(Debug, Default)]
struct Viewer {
    radius_m: f64,
    /// Everyone the viewer is subscribed to.
    publishers: FriendSet,
    /// Latest locations of publishers the viewer may see.
    known: HashMap<UserId, LatestLocation>,
    /// Display names of publishers, as learnt from snapshots.
    names: HashMap<UserId, String>,
    /// Publishers currently in range (shown).
    visible: HashSet<UserId>,
    /// Snapshots still expected after connect.
    pending: usize,
}

/// The live presence of one shard group (see the module doc).
pub struct Presence {
    group: GroupId,
    config: PresenceConfig,
    ranges: Arc<RangeTable<GroupId>>,
    locations: LocationTable,
    /// Publisher (a user of this group) → online viewers subscribed to it, with their home group.
    subscribers: HashMap<UserId, HashMap<UserId, GroupId>>,
    viewers: HashMap<UserId, Viewer>,
    outputs: Vec<Output>,
}

fn coord(loc: LatLng) -> Coord {
    Coord {
        lat: loc.lat(),
        lon: loc.lon(),
    }
}

impl Presence {
    /// The presence of `group`, routing by `ranges`.
    pub fn new(group: GroupId, config: PresenceConfig, ranges: Arc<RangeTable<GroupId>>) -> Self {
        Presence {
            group,
            locations: LocationTable::new(config.ttl),
            config,
            ranges,
            subscribers: HashMap::new(),
            viewers: HashMap::new(),
            outputs: Vec::new(),
        }
    }

    /// Takes the outputs of the calls so far, in order.
    #[must_use = "outputs must be delivered"]
    pub fn poll_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    /// The latest live location of a user of this group.
    pub fn location(&self, user: UserId) -> Option<LatestLocation> {
        self.locations.get(user)
    }

    /// Whether `user` is online here (has at least one session).
    pub fn is_online(&self, user: UserId) -> bool {
        self.viewers.contains_key(&user)
    }

    /// Whether `viewer` still waits for snapshots after connecting.
    pub fn is_starting(&self, viewer: UserId) -> bool {
        self.viewers.get(&viewer).is_some_and(|v| v.pending > 0)
    }

    /// When [`Presence::handle_tick`] must next run.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.locations.next_expiry()
    }

    /// Online users of this group.
    pub fn online(&self) -> usize {
        self.viewers.len()
    }

    /// Live locations held.
    pub fn active(&self) -> usize {
        self.locations.len()
    }

    fn send_split(
        &mut self,
        users: impl IntoIterator<Item = UserId>,
        mut make: impl FnMut(Vec<UserId>) -> GroupMessage,
    ) {
        let set: FriendSet = users.into_iter().collect();
        let split = set.split_by_ranges(&self.ranges);
        for (group, ids) in split.groups {
            self.outputs.push(Output::Send {
                to: *group,
                msg: make(ids),
            });
        }
        if !split.unrouted.is_empty() {
            tracing::warn!(group = self.group, users = ?split.unrouted, "users in no range; not routed");
        }
    }

    /// A user of this group opened their first session: subscribe them to everyone they may
    /// see (friends and one-way grants), whose groups answer with snapshots.
    pub fn handle_connect(&mut self, state: &GroupState, viewer: UserId, radius_m: Option<f64>) {
        if self.viewers.contains_key(&viewer) {
            return;
        }
        let Some(record) = state.user(viewer) else {
            return;
        };
        let publishers: FriendSet = record.friends.iter().chain(record.following.iter()).collect();
        let group = self.group;
        let mut v = Viewer {
            radius_m: self.radius(radius_m),
            publishers: publishers.clone(),
            ..Viewer::default()
        };
        let split = publishers.split_by_ranges(&self.ranges);
        v.pending = split.groups.len();
        self.viewers.insert(viewer, v);
        for (to, ids) in split.groups {
            self.outputs.push(Output::Send {
                to: *to,
                msg: GroupMessage::Subscribe {
                    viewer,
                    viewer_group: group,
                    publishers: ids,
                },
            });
        }
    }

    fn radius(&self, wanted: Option<f64>) -> f64 {
        match wanted {
            Some(r) if r > 0.0 && r < self.config.radius_m => r,
            _ => self.config.radius_m,
        }
    }

    /// Changes an online viewer's search radius (capped by the node's).
    pub fn set_radius(&mut self, viewer: UserId, radius_m: f64) {
        let r = self.radius(Some(radius_m));
        if let Some(v) = self.viewers.get_mut(&viewer) {
            v.radius_m = r;
        }
        self.refresh_view(viewer, false);
    }

    /// The user's last session closed.
    pub fn handle_disconnect(&mut self, viewer: UserId) {
        let Some(v) = self.viewers.remove(&viewer) else {
            return;
        };
        self.send_split(v.publishers.iter(), |publishers| GroupMessage::Unsubscribe {
            viewer,
            publishers,
        });
    }

    /// A location update of `user` (a user of this group). Stale updates (not newer than the
    /// stored one, or already past the TTL) are ignored and return `false`. With `quiet`, the
    /// user's own view is updated without events (the caller answers with the first page).
    pub fn handle_location(
        &mut self,
        state: &GroupState,
        user: UserId,
        loc: LatLng,
        at: Millis,
        now: Millis,
        quiet: bool,
    ) -> bool {
        if at.saturating_add(self.config.ttl) <= now {
            return false;
        }
        if self.locations.set(user, loc, at) == SetOutcome::Stale {
            return false;
        }
        let latest = LatestLocation { loc, updated_at: at };
        self.publish(state, user, latest, now);
        self.refresh_view(user, quiet);
        true
    }

    /// Sends `user`'s location to every subscribed viewer its record allows now.
    fn publish(&mut self, state: &GroupState, user: UserId, at: LatestLocation, now: Millis) {
        let Some(record) = state.user(user) else {
            return;
        };
        let Some(subs) = self.subscribers.get(&user) else {
            return;
        };
        let audience: Vec<UserId> = subs
            .keys()
            .copied()
            .filter(|v| record.may_see_me(*v, now))
            .collect();
        self.send_split(audience, |viewers| GroupMessage::Update {
            from: user,
            at,
            viewers,
        });
    }

    /// Recomputes what `viewer` sees after the viewer moved or changed radius.
    fn refresh_view(&mut self, viewer: UserId, quiet: bool) {
        let Some(me) = self.locations.get(viewer) else {
            return;
        };
        let Some(v) = self.viewers.get_mut(&viewer) else {
            return;
        };
        let mut events = Vec::new();
        for (&friend, &at) in &v.known {
            let d = me.loc.distance_m(&at.loc);
            let inside = d <= v.radius_m;
            let was = v.visible.contains(&friend);
            if inside && !was {
                events.push(Event::FriendEntered(position(friend, at, d)));
            } else if !inside && was {
                events.push(Event::FriendLeft {
                    id: friend,
                    distance_m: d,
                    updated_at: at.updated_at,
                });
            }
        }
        for e in &events {
            match e {
                Event::FriendEntered(p) => {
                    v.visible.insert(p.id);
                }
                Event::FriendLeft { id, .. } => {
                    v.visible.remove(id);
                }
                _ => {}
            }
        }
        if !quiet {
            self.outputs
                .extend(events.into_iter().map(|event| Output::Push { viewer, event }));
        }
    }

    /// Handles a message from a group (possibly this one).
    pub fn handle_message(&mut self, state: &GroupState, msg: GroupMessage, now: Millis) {
        match msg {
            GroupMessage::Subscribe {
                viewer,
                viewer_group,
                publishers,
            } => {
                let mut entries = Vec::new();
                for p in publishers {
                    if !state.range().contains(p) {
                        continue;
                    }
                    self.subscribers
                        .entry(p)
                        .or_default()
                        .insert(viewer, viewer_group);
                    let Some(record) = state.user(p) else { continue };
                    if let (true, Some(at)) = (record.may_see_me(viewer, now), self.locations.get(p)) {
                        entries.push(SnapshotEntry {
                            user: p,
                            name: record.name.clone(),
                            at,
                        });
                    }
                }
                self.outputs.push(Output::Send {
                    to: viewer_group,
                    msg: GroupMessage::Snapshot { viewer, entries },
                });
            }
            GroupMessage::Unsubscribe { viewer, publishers } => {
                for p in publishers {
                    if let Some(subs) = self.subscribers.get_mut(&p) {
                        subs.remove(&viewer);
                        if subs.is_empty() {
                            self.subscribers.remove(&p);
                        }
                    }
                }
            }
            GroupMessage::Snapshot { viewer, entries } => {
                let starting = match self.viewers.get_mut(&viewer) {
                    Some(v) => {
                        let starting = v.pending > 0;
                        v.pending = v.pending.saturating_sub(1);
                        starting
                    }
                    None => return,
                };
                for e in entries {
                    if let Some(v) = self.viewers.get_mut(&viewer) {
                        v.names.insert(e.user, e.name);
                    }
                    self.learn(viewer, e.user, e.at, !starting);
                }
            }
            GroupMessage::Update { from, at, viewers } => {
                for viewer in viewers {
                    self.learn(viewer, from, at, true);
                }
            }
            GroupMessage::Revoke {
                from,
                reason,
                viewers,
            } => {
                for viewer in viewers {
                    self.forget(viewer, from, reason);
                }
            }
        }
    }

    /// `viewer` learns `friend`'s location; events unless the viewer is still starting (the
    /// first page covers those).
    fn learn(&mut self, viewer: UserId, friend: UserId, at: LatestLocation, notify: bool) {
        let me = self.locations.get(viewer);
        let Some(v) = self.viewers.get_mut(&viewer) else {
            return;
        };
        if !v.publishers.contains(friend) {
            return;
        }
        if v.known
            .get(&friend)
            .is_some_and(|old| old.updated_at >= at.updated_at)
        {
            return;
        }
        v.known.insert(friend, at);
        let Some(me) = me else {
            return;
        };
        let d = me.loc.distance_m(&at.loc);
        let inside = d <= v.radius_m;
        let was = v.visible.contains(&friend);
        let event = match (inside, was) {
            (true, true) => Some(Event::FriendMoved(position(friend, at, d))),
            (true, false) => {
                v.visible.insert(friend);
                Some(Event::FriendEntered(position(friend, at, d)))
            }
            (false, true) => {
                v.visible.remove(&friend);
                Some(Event::FriendLeft {
                    id: friend,
                    distance_m: d,
                    updated_at: at.updated_at,
                })
            }
            (false, false) => None,
        };
        if let (Some(event), true) = (event, notify) {
            self.outputs.push(Output::Push { viewer, event });
        }
    }

    fn forget(&mut self, viewer: UserId, friend: UserId, reason: GoneReason) {
        let Some(v) = self.viewers.get_mut(&viewer) else {
            return;
        };
        v.known.remove(&friend);
        if v.visible.remove(&friend) {
            self.outputs.push(Output::Push {
                viewer,
                event: Event::FriendGone { id: friend, reason },
            });
        }
    }

    /// Expires locations whose TTL passed: their viewers are told the user went inactive.
    pub fn handle_tick(&mut self, now: Millis) {
        let mut expired = Vec::new();
        self.locations.expire(now, &mut expired);
        for user in expired {
            let viewers: Vec<UserId> = self
                .subscribers
                .get(&user)
                .map(|s| s.keys().copied().collect())
                .unwrap_or_default();
            self.send_split(viewers, |viewers| GroupMessage::Revoke {
                from: user,
                reason: GoneReason::Inactive,
                viewers,
            });
        }
    }

    /// A command of this group committed with `result`; `state` is the state after it. Applies
    /// its effect on live streams: visibility changes reach viewers at once, new relations are
    /// subscribed, ended ones revoked.
    pub fn handle_committed(
        &mut self,
        state: &GroupState,
        cmd: &Command,
        result: &CommandResult,
        now: Millis,
    ) {
        let here = |u: UserId| state.range().contains(u);
        match (cmd, result) {
            (_, CommandResult::Rejected(_) | CommandResult::Unchanged) => {}
            (
                Command::SetSharing { user, .. }
                | Command::SetGhost { user, .. }
                | Command::Hide { user, .. }
                | Command::Unhide { user, .. },
                _,
            ) => self.revisit_audience(state, *user, now),
            (Command::AddFriend { from, to }, CommandResult::FriendshipFormed) => {
                // Each side subscribes to the other, and publishes to the other if it already
                // subscribed (its group may have committed first, when this side was not yet
                // allowed to be seen).
                for (a, b) in [(*from, *to), (*to, *from)] {
                    if here(a) {
                        self.subscribe_one(a, b);
                        self.revisit_audience(state, a, now);
                    }
                }
            }
            (Command::AddFriend { from, to }, CommandResult::FriendRequestSent)
                if here(*to) && self.viewers.contains_key(to) =>
            {
                self.outputs.push(Output::Push {
                    viewer: *to,
                    event: Event::FriendRequest { from: *from },
                });
            }
            (Command::RemoveFriend { user, friend }, CommandResult::FriendRemoved) => {
                for (a, b) in [(*user, *friend), (*friend, *user)] {
                    if here(a) {
                        self.unsubscribe_one(a, b, GoneReason::Unfriended);
                    }
                }
            }
            (Command::GrantFollow { user, follower }, CommandResult::Updated) => {
                if here(*follower) {
                    self.subscribe_one(*follower, *user);
                }
                if here(*user) {
                    self.revisit_audience(state, *user, now);
                }
            }
            (Command::RevokeFollow { user, follower }, CommandResult::Updated) => {
                if here(*follower) {
                    self.unsubscribe_one(*follower, *user, GoneReason::Unfriended);
                }
                if here(*user) {
                    self.revisit_audience(state, *user, now);
                }
            }
            _ => {}
        }
    }

    /// Re-decides who sees `user` after its privacy changed: viewers no longer allowed get a
    /// revocation, viewers newly allowed get the current location.
    fn revisit_audience(&mut self, state: &GroupState, user: UserId, now: Millis) {
        let Some(record) = state.user(user) else {
            return;
        };
        let Some(subs) = self.subscribers.get(&user) else {
            return;
        };
        let (allowed, denied): (Vec<UserId>, Vec<UserId>) =
            subs.keys().copied().partition(|v| record.may_see_me(*v, now));
        self.send_split(denied, |viewers| GroupMessage::Revoke {
            from: user,
            reason: GoneReason::Hidden,
            viewers,
        });
        if let Some(at) = self.locations.get(user) {
            self.send_split(allowed, |viewers| GroupMessage::Update {
                from: user,
                at,
                viewers,
            });
        }
    }

    fn subscribe_one(&mut self, viewer: UserId, publisher: UserId) {
        let group = self.group;
        let Some(v) = self.viewers.get_mut(&viewer) else {
            return;
        };
        if !v.publishers.insert(publisher) {
            return;
        }
        if let Some(&to) = self.ranges.locate(publisher) {
            self.outputs.push(Output::Send {
                to,
                msg: GroupMessage::Subscribe {
                    viewer,
                    viewer_group: group,
                    publishers: vec![publisher],
                },
            });
        }
    }

    fn unsubscribe_one(&mut self, viewer: UserId, publisher: UserId, reason: GoneReason) {
        if let Some(v) = self.viewers.get_mut(&viewer) {
            v.publishers.remove(publisher);
        }
        self.forget(viewer, publisher, reason);
        if let Some(&to) = self.ranges.locate(publisher) {
            self.outputs.push(Output::Send {
                to,
                msg: GroupMessage::Unsubscribe {
                    viewer,
                    publishers: vec![publisher],
                },
            });
        }
    }

    /// A page of what `viewer` sees, nearest first. `None` if the viewer has no live location.
    pub fn page(
        &self,
        viewer: UserId,
        page_size: usize,
        cursor: Option<&Cursor>,
    ) -> Option<Result<(Page, Vec<String>), nearby_index::error::QueryError>> {
        let me = self.locations.get(viewer)?;
        let v = self.viewers.get(&viewer)?;
        let mut query = NearbyQuery::new(me.loc, v.radius_m);
        query.page_size = page_size;
        let page = match nearby_page(&query, v.known.iter().map(|(k, at)| (*k, *at)), cursor) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let names = page
            .entries
            .iter()
            .map(|e| v.names.get(&e.user).cloned().unwrap_or_default())
            .collect();
        Some(Ok((page, names)))
    }

    /// Seconds until the node wants `viewer`'s next update: faster when a friend is close,
    /// slower when nobody the viewer may see is active.
    pub fn cadence_s(&self, viewer: UserId) -> u32 {
        let (Some(me), Some(v)) = (self.locations.get(viewer), self.viewers.get(&viewer)) else {
            return 30;
        };
        if v.known.is_empty() {
            return 60;
        }
        let closest = v
            .visible
            .iter()
            .filter_map(|f| v.known.get(f))
            .map(|at| me.loc.distance_m(&at.loc))
            .fold(f64::INFINITY, f64::min);
        if closest <= 1_000.0 {
            10
        } else {
            30
        }
    }
}

fn position(id: UserId, at: LatestLocation, distance_m: f64) -> FriendPosition {
    FriendPosition {
        id,
        at: coord(at.loc),
        distance_m,
        updated_at: at.updated_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearby_index::friends::UserRange;

    /// Two groups on one node: users 1..100 in group 1, 100..200 in group 2.
    struct World {
        states: HashMap<GroupId, GroupState>,
        presences: HashMap<GroupId, Presence>,
        pushed: Vec<(UserId, Event)>,
        now: Millis,
    }

    impl World {
        fn new() -> World {
            let r1 = UserRange::new(1, 100).expect("r1");
            let r2 = UserRange::new(100, 200).expect("r2");
            let ranges = Arc::new(RangeTable::new(vec![(r1, 1), (r2, 2)]).expect("table"));
            let mut w = World {
                states: HashMap::new(),
                presences: HashMap::new(),
                pushed: Vec::new(),
                now: Millis(1_000_000),
            };
            for (g, r) in [(1, r1), (2, r2)] {
                w.states.insert(g, GroupState::new(r));
                w.presences.insert(
                    g,
                    Presence::new(g, PresenceConfig::default(), Arc::clone(&ranges)),
                );
            }
            w
        }

        fn group(u: UserId) -> GroupId {
            if u < 100 {
                1
            } else {
                2
            }
        }

        /// Commits `cmd` in every group it concerns and lets presence react.
        fn commit(&mut self, cmd: Command) {
            let (a, b) = cmd.users();
            let mut groups = vec![Self::group(a)];
            if let Some(b) = b.filter(|_| cmd.is_two_sided()) {
                groups.push(Self::group(b));
            }
            groups.dedup();
            for g in groups {
                let state = self.states.get_mut(&g).expect("state");
                let result = state.apply(&cmd);
                let p = self.presences.get_mut(&g).expect("presence");
                p.handle_committed(&self.states[&g], &cmd, &result, self.now);
                self.drain(g);
            }
        }

        fn drain(&mut self, from: GroupId) {
            let mut queue: Vec<Output> = self.presences.get_mut(&from).expect("p").poll_outputs();
            while !queue.is_empty() {
                let mut next = Vec::new();
                for out in queue {
                    match out {
                        Output::Push { viewer, event } => self.pushed.push((viewer, event)),
                        Output::Send { to, msg } => {
                            let p = self.presences.get_mut(&to).expect("p");
                            p.handle_message(&self.states[&to], msg, self.now);
                            next.extend(p.poll_outputs());
                        }
                    }
                }
                queue = next;
            }
        }

        fn register(&mut self, users: &[UserId]) {
            for &u in users {
                self.commit(Command::RegisterUser {
                    user: u,
                    name: format!("u{u}"),
                });
            }
        }

        fn befriend(&mut self, a: UserId, b: UserId) {
            self.commit(Command::AddFriend { from: a, to: b });
            self.commit(Command::AddFriend { from: b, to: a });
        }

        fn connect(&mut self, u: UserId) {
            let g = Self::group(u);
            let p = self.presences.get_mut(&g).expect("p");
            p.handle_connect(&self.states[&g], u, None);
            self.drain(g);
        }

        fn at(&mut self, u: UserId, lat: f64, lon: f64) {
            let g = Self::group(u);
            self.now = Millis(self.now.0 + 1_000);
            let now = self.now;
            let p = self.presences.get_mut(&g).expect("p");
            assert!(p.handle_location(
                &self.states[&g],
                u,
                LatLng::new(lat, lon).expect("ll"),
                now,
                now,
                false
            ));
            self.drain(g);
        }

        fn take(&mut self, viewer: UserId) -> Vec<Event> {
            let (mine, rest): (Vec<_>, Vec<_>) = self.pushed.drain(..).partition(|(v, _)| *v == viewer);
            self.pushed = rest;
            mine.into_iter().map(|(_, e)| e).collect()
        }
    }

    // Two points about 3 km apart, and one 20 km away.
    const A: (f64, f64) = (52.5200, 13.4050);
    const B: (f64, f64) = (52.5470, 13.4050);
    const FAR: (f64, f64) = (52.7000, 13.4050);

    #[test]
    fn friends_across_groups_see_each_other_move() {
        let mut w = World::new();
        w.register(&[1, 150]);
        w.befriend(1, 150);
        w.connect(1);
        w.at(1, A.0, A.1);
        w.connect(150);
        w.at(150, B.0, B.1);
        let seen = w.take(1);
        assert!(
            matches!(&seen[..], [Event::FriendEntered(p)] if p.id == 150 && (p.distance_m - 3_002.0).abs() < 30.0),
            "{seen:?}"
        );
        // 150 connected after 1 published: it learns 1 from the snapshot, shown on its first page.
        let (page, _) = w.presences[&2].page(150, 20, None).expect("live").expect("page");
        assert_eq!(page.entries.iter().map(|e| e.user).collect::<Vec<_>>(), vec![1]);
        w.at(150, FAR.0, FAR.1);
        assert!(matches!(&w.take(1)[..], [Event::FriendLeft { id: 150, .. }]));
        w.at(150, B.0, B.1);
        assert!(matches!(&w.take(1)[..], [Event::FriendEntered(_)]));
        w.at(150, A.0, A.1 + 0.001);
        assert!(matches!(&w.take(1)[..], [Event::FriendMoved(_)]));
    }

    #[test]
    fn strangers_and_far_friends_get_nothing() {
        let mut w = World::new();
        w.register(&[1, 2, 150]);
        w.befriend(1, 150);
        for u in [1, 2, 150] {
            w.connect(u);
        }
        w.at(2, A.0, A.1);
        w.at(1, A.0, A.1);
        w.at(150, FAR.0, FAR.1);
        assert!(w.take(2).is_empty(), "a stranger got events");
        assert!(w.take(1).is_empty(), "a friend 20 km away produced an event");
        assert_eq!(
            w.presences[&1]
                .page(1, 20, None)
                .expect("live")
                .expect("page")
                .0
                .entries
                .len(),
            0
        );
    }

    #[test]
    fn hiding_sharing_off_and_unfriending_stop_updates_at_once() {
        let mut w = World::new();
        w.register(&[1, 150]);
        w.befriend(1, 150);
        w.connect(1);
        w.connect(150);
        w.at(1, A.0, A.1);
        w.at(150, B.0, B.1);
        w.take(1);
        w.take(150);

        w.commit(Command::Hide { user: 150, from: 1 });
        assert!(matches!(
            &w.take(1)[..],
            [Event::FriendGone {
                id: 150,
                reason: GoneReason::Hidden
            }]
        ));
        w.at(150, B.0 + 0.001, B.1);
        assert!(w.take(1).is_empty(), "a hidden friend's move leaked");
        w.commit(Command::Unhide { user: 150, from: 1 });
        assert!(matches!(&w.take(1)[..], [Event::FriendEntered(_)]));

        w.commit(Command::SetSharing { user: 150, on: false });
        assert!(matches!(&w.take(1)[..], [Event::FriendGone { id: 150, .. }]));
        w.at(150, B.0, B.1);
        assert!(w.take(1).is_empty(), "sharing off leaked");
        w.commit(Command::SetSharing { user: 150, on: true });
        assert!(matches!(&w.take(1)[..], [Event::FriendEntered(_)]));

        w.commit(Command::RemoveFriend { user: 1, friend: 150 });
        assert!(matches!(
            &w.take(1)[..],
            [Event::FriendGone {
                id: 150,
                reason: GoneReason::Unfriended
            }]
        ));
        assert!(matches!(
            &w.take(150)[..],
            [Event::FriendGone {
                id: 1,
                reason: GoneReason::Unfriended
            }]
        ));
        w.at(150, B.0, B.1 + 0.001);
        w.at(1, A.0, A.1 + 0.001);
        assert!(
            w.take(1).is_empty() && w.take(150).is_empty(),
            "an ex-friend leaked"
        );
    }

    #[test]
    fn a_friendship_formed_live_shows_the_friend_at_once() {
        let mut w = World::new();
        w.register(&[1, 150]);
        w.connect(1);
        w.connect(150);
        w.at(1, A.0, A.1);
        w.at(150, B.0, B.1);
        w.commit(Command::AddFriend { from: 1, to: 150 });
        assert!(matches!(&w.take(150)[..], [Event::FriendRequest { from: 1 }]));
        assert!(w.take(1).is_empty());
        w.commit(Command::AddFriend { from: 150, to: 1 });
        assert!(matches!(&w.take(1)[..], [Event::FriendEntered(p)] if p.id == 150));
        assert!(matches!(&w.take(150)[..], [Event::FriendEntered(p)] if p.id == 1));
    }

    #[test]
    fn expiry_sends_gone_to_viewers() {
        let mut w = World::new();
        w.register(&[1, 150]);
        w.befriend(1, 150);
        w.connect(1);
        w.at(1, A.0, A.1);
        w.at(150, B.0, B.1);
        assert!(matches!(&w.take(1)[..], [Event::FriendEntered(_)]));
        let deadline = w.presences[&2].next_deadline().expect("deadline");
        w.now = deadline;
        w.presences.get_mut(&2).expect("p").handle_tick(deadline);
        w.drain(2);
        assert!(matches!(
            &w.take(1)[..],
            [Event::FriendGone {
                id: 150,
                reason: GoneReason::Inactive
            }]
        ));
    }
}
