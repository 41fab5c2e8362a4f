//! Live presence of one shard group: who of its users is where (soft state), who is watching
//! whom, and what each online user must be told. This is the routing layer of the original
//! design's per-user channels, rebuilt as plain data: a *publisher*'s home group keeps the list of
//! online viewers subscribed to it, and a *viewer*'s home group keeps what the viewer currently
//! sees.
//!
//! [`Presence`] does no I/O, spawns nothing and reads no clock: inputs are `handle_*` calls with
//! the current time and the group's replicated state passed in; outputs are [`Output`]s — events
//! for local sessions, or [`GroupMessage`]s for groups (this one included) — which the group's
//! driver delivers, locally or over the network.
//!
//! # Who may see whom
//!
//! A publisher's location leaves its home group only towards viewers that its *own* record
//! allows at that moment ([`nearby_raft::UserRecord::may_see_me`]). A relation or privacy change
//! committed in the publisher's group therefore takes effect on the very next update, whatever
//! the state of subscriptions elsewhere: a partial or delayed change can only hide a location,
//! never leak one. Subscriptions are an optimisation (send only to groups with someone
//! watching), not a grant.
//!
//! # Revocations are ordered after everything they revoke
//!
//! When a change ends a viewer's permission, the publisher's group sends the viewer's group a
//! [`GroupMessage::Revoke`] stamped with the log index of the change, and asks for an
//! acknowledgement ([`Barrier`]). The viewer's group forgets the publisher, queues `FriendGone`
//! (which drops every event about the publisher still queued for the viewer's sessions) and
//! acknowledges. Every location a publisher group sends carries the index of the state it was
//! decided on ([`GroupMessage::Update::decided_at`]); the viewer's group drops any that was
//! decided before a revocation it has seen, so a message delayed behind a revocation (a deposed
//! leader's, say) cannot bring the publisher back. Revocations are remembered for
//! [`REVOKED_MEMORY`] whether the viewer is online or not (it may connect after one). A new run
//! of the viewer's group remembers none its predecessor processed; it drops instead any update
//! decided before the snapshot the viewer holds from that publisher group (decided after every
//! revocation acknowledged before the run began), so an update meant for the old run and
//! delivered late to the new one cannot bring the publisher back either.
//!
//! A group acknowledges only a revocation whose viewers it serves by its map: one that reached a
//! group which split or merged them away is processed there but confirmed by their group. And
//! the publisher's group revokes a viewer also where the viewer subscribed from, when that is not
//! where its own map routes it (one of the two maps is behind): the place that may hold the
//! publisher is told, whichever map is right. (The driver adds the third rule: only a confirmed
//! leader's acknowledgements leave the node.)
//!
//! # Subscriptions are soft state, rebuilt by reconciliation
//!
//! A viewer's group subscribes it to its publishers, split by the publishers' groups; each
//! answers with a [`GroupMessage::Snapshot`] listing exactly which of the requested publishers
//! the viewer may see, with their latest locations. The viewer's group *replaces* what it knew of
//! those publishers with the snapshot, so subscribing again is also a repair: after a publisher
//! group's leader changes (its new leader starts with no subscribers) the viewer's group calls
//! [`Presence::resubscribe`] and is back in step one round trip later.
//!
//! # Call order
//!
//! 1. [`Presence::set_ranges`] whenever the cluster map's ranges change, and
//!    [`Presence::set_applied`] after every entry the group applies.
//! 2. [`Presence::handle_connect`] when a user's first session opens (subscribes it to its
//!    publishers; their groups answer with snapshots).
//! 3. [`Presence::handle_location`] for every location update of a user of this group.
//! 4. [`Presence::handle_message`] for every message from a group (including this one).
//! 5. [`Presence::handle_committed`] after a command of this group was applied.
//! 6. [`Presence::handle_tick`] when the clock passes [`Presence::next_deadline`].
//! 7. [`Presence::handle_disconnect`] when the user's last session closes.
//!
//! After each call, the caller MUST take the outputs with [`Presence::poll_outputs`] and deliver
//! them, in order.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use nearby_client::proto::{Coord, Event, FriendPosition, GoneReason, Stranger, GHOST_FOREVER};
use nearby_index::activity::CellCounts;
use nearby_index::friends::{FriendSet, RangeTable};
use nearby_index::geo::{LatLng, Millis, UserId};
use nearby_index::hash::Map;
use nearby_index::query::{nearby_page, Cursor, NearbyQuery, Page};
use nearby_index::ttl::{LatestLocation, LocationTable, SetOutcome};
use nearby_raft::{Command, CommandResult, GroupId, GroupState};

use crate::incarnation::{Incarnation, Incarnations};
pub use crate::messages::{Barrier, GroupMessage, Output, SnapshotEntry};
use crate::strangers::{Ctx, Pseudonyms, Strangers, MAX_SHOWN};

/// Settings shared by every group of a node.
#[derive(Clone, Debug)]
pub struct PresenceConfig {
    /// The largest search radius, and the default, in metres.
    pub radius_m: f64,
    /// Inactivity timeout of a location.
    pub ttl: Duration,
    /// The cluster's pseudonym key for strangers; without it this node lists no strangers.
    pub pseudonyms: Option<Pseudonyms>,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            radius_m: 8_000.0,
            ttl: Duration::from_secs(600),
            pseudonyms: None,
        }
    }
}

/// What an online user of this group currently sees.
#[derive(Debug, Default)]
struct Viewer {
    radius_m: f64,
    /// Everyone the viewer is subscribed to.
    publishers: FriendSet,
    /// What the viewer knows of the publishers it may see: their latest locations, and which
    /// are in range (shown). Only publishers are here: forgetting one forgets what was known.
    /// One map, so that a friend's update costs the viewer one lookup.
    known: Map<UserId, Known>,
    /// Display names of publishers, as learnt from snapshots.
    names: Map<UserId, String>,
    /// Snapshots still expected after connect.
    pending: usize,
    /// The cadence the viewer was last told (0: not yet).
    told: u32,
    /// Per publisher group, the log index its latest snapshot for the viewer was decided at:
    /// an update that group decided earlier is older than what the viewer has.
    floors: Vec<(GroupId, u64)>,
}

/// What a viewer knows of one publisher.
#[derive(Debug, Clone, Copy)]
struct Known {
    at: LatestLocation,
    /// In range, and shown to the viewer.
    shown: bool,
}

impl Viewer {
    /// Whether an update `group` decided at `decided_at` is older than the viewer's snapshot.
    fn below_floor(&self, group: Option<GroupId>, decided_at: u64) -> bool {
        self.floors
            .iter()
            .any(|(g, floor)| Some(*g) == group && decided_at < *floor)
    }

    fn raise_floor(&mut self, group: GroupId, decided_at: u64) {
        match self.floors.iter_mut().find(|(g, _)| *g == group) {
            Some((_, floor)) => *floor = (*floor).max(decided_at),
            None => self.floors.push((group, decided_at)),
        }
    }
}

/// The cadence policy (seconds between a phone's location updates, as the node asks): fast while
/// a friend is close, slow while nobody the user may see is around. See `docs/protocol.md`.
pub mod cadence {
    /// A friend shown within [`NEAR_M`]: meeting up.
    pub const NEAR_S: u32 = 10;
    /// A friend shown within the radius.
    pub const IN_RANGE_S: u32 = 30;
    /// Friends active, none within the radius.
    pub const FAR_S: u32 = 60;
    /// No friend (or followed user) active at all.
    pub const ALONE_S: u32 = 120;
    /// "Close", in metres.
    pub const NEAR_M: f64 = 1_000.0;
}

/// The live presence of one shard group (see the module doc).
pub struct Presence {
    group: GroupId,
    config: PresenceConfig,
    ranges: Arc<RangeTable<GroupId>>,
    /// The log index of the group state the latest calls were made with.
    applied: u64,
    locations: LocationTable,
    /// Publisher (a user of this group) → online viewers subscribed to it, with their home group.
    subscribers: Map<UserId, Map<UserId, GroupId>>,
    viewers: Map<UserId, Viewer>,
    /// Timed ghost modes of this group's users that have not ended yet: (end, user). Soft
    /// state: a new leader rebuilds it from the replicated records ([`Presence::load`]).
    ghosts: BTreeSet<(Millis, UserId)>,
    /// Revocations seen, online viewer or not (see [`Revoked`]).
    revoked: Revoked,
    /// Per publisher group, the highest floor any viewer here was given ([`Viewer::floors`]):
    /// an update that group decided at or above it is below no viewer's floor, so its viewers'
    /// floors need not be read (they are another cache miss per viewer and update). Only grows.
    highest_floor: Map<GroupId, u64>,
    strangers: Strangers,
    /// This run's number, who confirmed it, and the other groups' (see [`crate::incarnation`]).
    incarnations: Incarnations,
    outputs: Vec<Output>,
}

/// How long a revocation is remembered: longer than any message can be delayed in a queue or
/// on a connection (a QUIC connection silent for that long is closed), so that nothing decided
/// before it, however late, brings the publisher back.
pub const REVOKED_MEMORY: Duration = Duration::from_secs(120);

/// (viewer, publisher) → the log index, in the publisher's group, of the last revocation this
/// presence handled: news of the publisher decided before it is stale. Kept whether or not the
/// viewer is online here: a viewer who connects (or reconnects) after the revocation was
/// acknowledged may still be reached by a message sent before it.
#[derive(Default)]
struct Revoked {
    /// The index, and when it was last recorded.
    at: Map<(UserId, UserId), (u64, Millis)>,
    /// When each record was made, oldest first, to forget them after [`REVOKED_MEMORY`].
    order: std::collections::VecDeque<(Millis, UserId, UserId)>,
}

impl Revoked {
    fn record(&mut self, viewer: UserId, publisher: UserId, index: u64, now: Millis) {
        let seen = self.at.entry((viewer, publisher)).or_insert((index, now));
        *seen = (seen.0.max(index), now);
        self.order.push_back((now, viewer, publisher));
    }

    /// Whether news of `publisher` decided at `decided_at` is older than a revocation.
    fn covers(&self, viewer: UserId, publisher: UserId, decided_at: u64) -> bool {
        self.at
            .get(&(viewer, publisher))
            .is_some_and(|(at, _)| decided_at < *at)
    }

    fn expire(&mut self, now: Millis) {
        while let Some(&(when, viewer, publisher)) = self.order.front() {
            if when.saturating_add(REVOKED_MEMORY) > now {
                break;
            }
            self.order.pop_front();
            // Recorded again since: that record's own turn in `order` comes later.
            if self
                .at
                .get(&(viewer, publisher))
                .is_some_and(|(_, last)| *last == when)
            {
                self.at.remove(&(viewer, publisher));
            }
        }
    }
}

fn coord(loc: LatLng) -> Coord {
    Coord {
        lat: loc.lat(),
        lon: loc.lon(),
    }
}

impl Presence {
    /// The presence of `group`, routing by `ranges`: incarnation `incarnation` of its live
    /// state (see [`crate::incarnation`]), introduced to the other groups by
    /// [`Presence::introduce`].
    pub fn new(
        group: GroupId,
        incarnation: Incarnation,
        config: PresenceConfig,
        ranges: Arc<RangeTable<GroupId>>,
    ) -> Self {
        let strangers = Strangers::new(group, incarnation, config.pseudonyms.clone(), config.ttl);
        Presence {
            group,
            locations: LocationTable::new(config.ttl).with_cell_counts(CellCounts::default()),
            config,
            ranges,
            applied: 0,
            subscribers: Map::default(),
            viewers: Map::default(),
            ghosts: BTreeSet::new(),
            revoked: Revoked::default(),
            highest_floor: Map::default(),
            strangers,
            incarnations: Incarnations::new(group, incarnation),
            outputs: Vec::new(),
        }
    }

    /// Tells every other group that this run of the group's live state started (see
    /// [`crate::incarnation`]); young until all have confirmed.
    pub fn introduce(&mut self) {
        self.incarnations.introduce(&self.ranges, &mut self.outputs);
        self.strangers.set_young(!self.incarnations.settled());
    }

    /// Introduces this run again to the groups that have not confirmed it (see
    /// [`crate::incarnation::RESEND_AFTER`]).
    pub fn introduce_again(&mut self) {
        self.incarnations.resend(&self.ranges, &mut self.outputs);
        self.strangers.set_young(!self.incarnations.settled());
    }

    /// This run's number (see [`crate::incarnation`]).
    pub fn incarnation(&self) -> Incarnation {
        self.incarnations.mine()
    }

    /// Whether every other group has confirmed this run (see [`crate::incarnation`]).
    pub fn settled(&self) -> bool {
        self.incarnations.settled()
    }

    /// The stranger roles' context: routing and the output list.
    fn cx(&mut self) -> (&mut Strangers, Ctx<'_>) {
        (
            &mut self.strangers,
            Ctx {
                ranges: &self.ranges,
                outputs: &mut self.outputs,
            },
        )
    }

    /// Learns what the replicated records imply for live state when this presence starts (a
    /// new leader): the timed ghost modes still running at `now`, so that each ends on time
    /// here, whoever set it.
    pub fn load(&mut self, state: &GroupState, now: Millis) {
        for (user, record) in state.users() {
            self.watch_ghost(user, record.ghost_until(), now);
        }
    }

    fn watch_ghost(&mut self, user: UserId, until: Option<Millis>, now: Millis) {
        if let Some(until) = until.filter(|u| *u > now && *u != GHOST_FOREVER) {
            self.ghosts.insert((until, user));
        }
    }

    /// The group this presence belongs to.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// Routes by new ranges from now on.
    pub fn set_ranges(&mut self, ranges: Arc<RangeTable<GroupId>>) {
        self.ranges = ranges;
    }

    /// The group's state passed to later calls is as of log index `index`.
    pub fn set_applied(&mut self, index: u64) {
        self.applied = self.applied.max(index);
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

    /// When [`Presence::handle_tick`] must next run: a location expires or a ghost mode ends.
    pub fn next_deadline(&self) -> Option<Millis> {
        let ghost = self.ghosts.first().map(|(at, _)| *at);
        let channel = self.strangers.next_deadline();
        self.locations
            .next_expiry()
            .into_iter()
            .chain(ghost)
            .chain(channel)
            .min()
    }

    /// Online users of this group.
    pub fn online(&self) -> usize {
        self.viewers.len()
    }

    /// Drops what this presence holds about users outside `kept` (the group split, and the
    /// new group serves them now): their locations, subscribers and ghost timers. Their
    /// sessions are moved by the node (and disconnect from here).
    pub fn hand_over(&mut self, kept: nearby_index::friends::UserRange) {
        let gone: Vec<UserId> = self
            .subscribers
            .keys()
            .copied()
            .chain(self.viewers.keys().copied())
            .filter(|u| !kept.contains(*u))
            .collect();
        for u in gone {
            self.locations.remove(u);
        }
        self.subscribers.retain(|p, _| kept.contains(*p));
        self.ghosts.retain(|(_, u)| kept.contains(*u));
    }

    /// Online users, by id.
    pub fn online_users(&self) -> impl Iterator<Item = UserId> + '_ {
        self.viewers.keys().copied()
    }

    /// Live locations held.
    pub fn active(&self) -> usize {
        self.locations.len()
    }

    /// Users with a live location, counted by coarse H3 cell
    /// ([`nearby_index::ACTIVITY_RESOLUTION`]): at most `max` cells, the busiest first. Counts
    /// only, never who or where exactly; kept as locations change, so this costs O(cells).
    pub fn cell_counts(&self, max: usize) -> Vec<(u64, u32)> {
        self.locations
            .cell_counts()
            .map(|c| c.busiest(max))
            .unwrap_or_default()
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

    /// Sends one `Subscribe` per publisher group for `viewer`'s `publishers`; returns how many
    /// groups were asked.
    fn subscribe_to(&mut self, viewer: UserId, publishers: &FriendSet) -> usize {
        let group = self.group;
        let split = publishers.split_by_ranges(&self.ranges);
        let asked = split.groups.len();
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
        asked
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
        let publishers: FriendSet = record
            .friends
            .iter()
            .chain(record.rare().following.iter())
            .collect();
        let pending = self.subscribe_to(viewer, &publishers);
        let v = Viewer {
            radius_m: self.radius(radius_m),
            publishers,
            pending,
            ..Viewer::default()
        };
        self.viewers.insert(viewer, v);
    }

    /// Subscribes every online viewer again to its publishers in `group` (whose leader
    /// changed: the new leader starts with no subscribers). The snapshots that answer replace
    /// what the viewers knew of those publishers. `incarnation`: the new run of `group`'s live
    /// state, when it introduced itself (see [`Strangers::leader_changed`]).
    pub fn resubscribe(
        &mut self,
        state: &GroupState,
        group: GroupId,
        incarnation: Option<Incarnation>,
        now: Millis,
    ) {
        {
            let locations = &self.locations;
            let (strangers, mut cx) = (
                &mut self.strangers,
                Ctx {
                    ranges: &self.ranges,
                    outputs: &mut self.outputs,
                },
            );
            strangers.leader_changed(&mut cx, state, group, incarnation);
            strangers.republish(&mut cx, state, group, |u| locations.get(u), now);
        }
        let viewers: Vec<(UserId, FriendSet)> = self
            .viewers
            .iter()
            .map(|(id, v)| {
                let mine: FriendSet = v
                    .publishers
                    .iter()
                    .filter(|p| self.ranges.locate(*p) == Some(&group))
                    .collect();
                (*id, mine)
            })
            .filter(|(_, set)| !set.is_empty())
            .collect();
        for (viewer, publishers) in viewers {
            self.subscribe_to(viewer, &publishers);
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
        let (strangers, mut cx) = self.cx();
        strangers.stop(&mut cx, viewer);
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
        let (strangers, mut cx) = self.cx();
        strangers.publish(&mut cx, state, user, latest, now);
        strangers.moved(&mut cx, state, user, loc);
        true
    }

    /// `viewer` (online here, with a live location) asks for strangers: it listens to the
    /// cells covering its radius from now on. `Some(page)` at once, or `None` while a channel's
    /// first answer is awaited (ask [`Presence::strangers_page`] once
    /// [`Presence::strangers_pending`] is false, or after a bound).
    pub fn listen_strangers(&mut self, state: &GroupState, viewer: UserId, size: usize) -> bool {
        let (Some(me), Some(v)) = (self.locations.get(viewer), self.viewers.get(&viewer)) else {
            return false;
        };
        let radius = v.radius_m;
        let (strangers, mut cx) = self.cx();
        strangers.listen(&mut cx, state, viewer, me.loc, radius, size.min(MAX_SHOWN));
        true
    }

    /// Whether `viewer` waits for a channel's first answer.
    pub fn strangers_pending(&self, viewer: UserId) -> bool {
        self.strangers.is_pending(viewer)
    }

    /// The nearest `size` strangers of `viewer` and how many more are in range.
    pub fn strangers_page(&self, state: &GroupState, viewer: UserId, size: usize) -> (Vec<Stranger>, u32) {
        self.strangers.page(state, viewer, size)
    }

    /// Whether this node can list strangers (it has the pseudonym key).
    pub fn can_list_strangers(&self) -> bool {
        self.strangers.can_list()
    }

    /// A listener group acknowledged part `part` of a retraction this group relayed.
    pub fn relay_acked(&mut self, part: u32) {
        let (strangers, mut cx) = self.cx();
        strangers.relay_acked(&mut cx, part);
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
        let decided_at = self.applied;
        self.send_split(audience, |viewers| GroupMessage::Update {
            from: user,
            at,
            viewers,
            decided_at,
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
        for (&friend, k) in &mut v.known {
            let d = me.loc.distance_m(&k.at.loc);
            let inside = d <= v.radius_m;
            if inside && !k.shown {
                events.push(Event::FriendEntered(position(friend, k.at, d)));
            } else if !inside && k.shown {
                events.push(left(friend, k.at, v.radius_m));
            }
            k.shown = inside;
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
                let mut asked = Vec::with_capacity(publishers.len());
                for p in publishers {
                    if !state.range().contains(p) {
                        continue;
                    }
                    asked.push(p);
                    self.subscribers
                        .entry(p)
                        .or_default()
                        .insert(viewer, viewer_group);
                    let Some(record) = state.user(p) else { continue };
                    if let (true, Some(at)) = (record.may_see_me(viewer, now), self.locations.get(p)) {
                        entries.push(SnapshotEntry {
                            user: p,
                            name: record.name.to_string(),
                            at,
                        });
                    }
                }
                self.outputs.push(Output::Send {
                    to: viewer_group,
                    msg: GroupMessage::Snapshot {
                        viewer,
                        asked,
                        entries,
                        decided_at: self.applied,
                    },
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
            GroupMessage::Snapshot {
                viewer,
                asked,
                entries,
                decided_at,
            } => self.take_snapshot(viewer, asked, entries, decided_at),
            GroupMessage::Update {
                from,
                at,
                viewers,
                decided_at,
            } => {
                // An update its group decided before the snapshot the viewer has — one meant for
                // an earlier run of this group, delivered late — may show a publisher who has
                // since revoked the viewer: the snapshot knows, this run may never have heard.
                let group = self.ranges.locate(from).copied();
                let older_than_a_snapshot = group
                    .and_then(|g| self.highest_floor.get(&g))
                    .is_some_and(|highest| decided_at < *highest);
                for viewer in viewers {
                    if self.is_revoked(viewer, from, decided_at)
                        || older_than_a_snapshot
                            && self
                                .viewers
                                .get(&viewer)
                                .is_some_and(|v| v.below_floor(group, decided_at))
                    {
                        continue;
                    }
                    self.learn(viewer, from, at, true);
                }
            }
            GroupMessage::Revoke {
                from,
                reason,
                viewers,
                at,
                ack,
            } => {
                // Acknowledged only for viewers this group serves (by its map): a revocation
                // that reached a group which handed them over (a split or merge the publisher's
                // group has not seen yet) is not confirmed by it. Their group is told when it
                // is sent again.
                let ours = viewers
                    .iter()
                    .all(|v| self.ranges.locate(*v) == Some(&self.group));
                tracing::debug!(
                    group = self.group,
                    from,
                    ?viewers,
                    at,
                    ?ack,
                    online = viewers.iter().filter(|v| self.viewers.contains_key(v)).count(),
                    "revocation"
                );
                for viewer in viewers {
                    if at > 0 {
                        self.revoked.record(viewer, from, at, now);
                    }
                    // Whatever is still queued about the publisher goes, shown or not (a
                    // "left" may be waiting behind an exact position).
                    if ack.is_some() && self.viewers.contains_key(&viewer) {
                        self.outputs.push(Output::Purge { viewer, about: from });
                    }
                    self.forget(viewer, from, reason);
                }
                match ack {
                    Some(barrier) if ours => self.outputs.push(Output::Send {
                        to: barrier.group,
                        msg: GroupMessage::RevokeAck { barrier },
                    }),
                    Some(barrier) => {
                        tracing::debug!(
                            group = self.group,
                            ?barrier,
                            "a revocation for viewers served elsewhere: not acknowledged here"
                        );
                    }
                    None => {}
                }
            }
            // Barriers are the driver's business; presence only routes acknowledgements.
            GroupMessage::RevokeAck { .. } => {}
            GroupMessage::Started { group, incarnation } => {
                tracing::debug!(
                    group = self.group,
                    from = group,
                    %incarnation,
                    "another group's run introduced itself"
                );
                // Forget the earlier run first: the confirmation leaves after what this causes.
                let mut confirmation = Vec::new();
                if self.incarnations.heard(group, incarnation, &mut confirmation) {
                    self.resubscribe(state, group, Some(incarnation), now);
                }
                self.outputs.extend(confirmation);
            }
            GroupMessage::StartedAck { group, incarnation } => {
                self.incarnations.confirmed(group, incarnation);
                self.strangers.set_young(!self.incarnations.settled());
            }
            GroupMessage::Cell(m) => {
                let (strangers, mut cx) = self.cx();
                strangers.handle(&mut cx, state, m, now);
            }
        }
    }

    fn is_revoked(&self, viewer: UserId, publisher: UserId, decided_at: u64) -> bool {
        self.revoked.covers(viewer, publisher, decided_at)
    }

    /// Replaces what `viewer` knew of the publishers `asked` with the snapshot.
    fn take_snapshot(
        &mut self,
        viewer: UserId,
        asked: Vec<UserId>,
        entries: Vec<SnapshotEntry>,
        decided_at: u64,
    ) {
        let Some(v) = self.viewers.get_mut(&viewer) else {
            return;
        };
        let starting = v.pending > 0;
        v.pending = v.pending.saturating_sub(1);
        if let Some(&group) = asked.first().and_then(|p| self.ranges.locate(*p)) {
            v.raise_floor(group, decided_at);
            let highest = self.highest_floor.entry(group).or_default();
            *highest = (*highest).max(decided_at);
        }
        let listed: HashSet<UserId> = entries.iter().map(|e| e.user).collect();
        for p in asked {
            if !listed.contains(&p) {
                // Not visible (any more), or no live location: forget what was known.
                self.forget(viewer, p, GoneReason::Inactive);
            }
        }
        for e in entries {
            if self.is_revoked(viewer, e.user, decided_at) {
                continue;
            }
            if let Some(v) = self.viewers.get_mut(&viewer) {
                v.names.insert(e.user, e.name);
            }
            self.learn(viewer, e.user, e.at, !starting);
        }
    }

    /// `viewer` learns `friend`'s location; events unless the viewer is still starting (the
    /// first page covers those).
    fn learn(&mut self, viewer: UserId, friend: UserId, at: LatestLocation, notify: bool) {
        let me = self.locations.get(viewer);
        let Some(v) = self.viewers.get_mut(&viewer) else {
            return;
        };
        // Known publishers are publishers (forgetting one forgets what was known): only one not
        // heard from yet is looked up in the set.
        let known = match v.known.entry(friend) {
            Entry::Occupied(e) => {
                debug_assert!(v.publishers.contains(friend), "{friend} known, not a publisher");
                if e.get().at.updated_at >= at.updated_at {
                    return;
                }
                let known = e.into_mut();
                known.at = at;
                known
            }
            Entry::Vacant(e) => {
                if !v.publishers.contains(friend) {
                    return;
                }
                e.insert(Known { at, shown: false })
            }
        };
        let Some(me) = me else {
            return;
        };
        let d = me.loc.distance_m(&at.loc);
        let inside = d <= v.radius_m;
        let was = std::mem::replace(&mut known.shown, inside);
        let event = match (inside, was) {
            (true, true) => Some(Event::FriendMoved(position(friend, at, d))),
            (true, false) => Some(Event::FriendEntered(position(friend, at, d))),
            (false, true) => Some(left(friend, at, v.radius_m)),
            (false, false) => None,
        };
        if let (Some(event), true) = (event, notify) {
            self.outputs.push(Output::Push { viewer, event });
            if inside {
                self.retune(viewer, d);
            }
        }
    }

    fn forget(&mut self, viewer: UserId, friend: UserId, reason: GoneReason) {
        let Some(v) = self.viewers.get_mut(&viewer) else {
            return;
        };
        if v.known.remove(&friend).is_some_and(|k| k.shown) {
            self.outputs.push(Output::Push {
                viewer,
                event: Event::FriendGone { id: friend, reason },
            });
        }
    }

    /// Tells `viewer` at once to update at [`cadence::NEAR_S`] when a friend's move brings
    /// them close (meeting up should not wait for a slow phone's next update). Every other
    /// change waits for the viewer's next update, whose answer carries it: one packet fewer.
    ///
    /// Only the friend that moved, `distance_m` away now, can make the cadence faster: any
    /// other friend already that close made it [`cadence::NEAR_S`] when it came (here) or at
    /// the viewer's last update ([`Presence::tell_cadence`]). So this costs one comparison per
    /// push, not a scan of the viewer's friends (which was the hottest function of a profile).
    fn retune(&mut self, viewer: UserId, distance_m: f64) {
        if distance_m > cadence::NEAR_M {
            return;
        }
        let Some(v) = self.viewers.get_mut(&viewer) else {
            return;
        };
        let c = cadence::NEAR_S;
        if v.told != 0 && c < v.told {
            v.told = c;
            self.outputs.push(Output::Push {
                viewer,
                event: Event::Cadence { next_update_s: c },
            });
        }
    }

    /// The cadence to tell `viewer` in the answer to its update; remembered.
    pub fn tell_cadence(&mut self, viewer: UserId) -> u32 {
        let c = self.cadence_s(viewer);
        if let Some(v) = self.viewers.get_mut(&viewer) {
            v.told = c;
        }
        c
    }

    /// Expires locations whose TTL passed (their viewers are told the user went inactive), and
    /// ends the ghost modes whose time is up: the viewers the user's record allows again get
    /// the user's current location, without anyone acting.
    pub fn handle_tick(&mut self, state: &GroupState, now: Millis) {
        while let Some(&(until, user)) = self.ghosts.first() {
            if until > now {
                break;
            }
            self.ghosts.pop_first();
            // Set again or turned off meanwhile: that change decided what viewers see.
            let still = state.user(user).is_some_and(|r| r.ghost_until() == Some(until));
            if let (true, Some(at)) = (still, self.locations.get(user)) {
                self.publish(state, user, at, now);
                let (strangers, mut cx) = self.cx();
                strangers.publish(&mut cx, state, user, at, now);
            }
        }
        {
            let (strangers, mut cx) = self.cx();
            strangers.expire(&mut cx, now);
        }
        self.revoked.expire(now);
        let mut expired = Vec::new();
        self.locations.expire(now, &mut expired);
        for user in expired {
            let (strangers, mut cx) = self.cx();
            strangers.retract(&mut cx, user, None, now);
            let viewers: Vec<UserId> = self
                .subscribers
                .get(&user)
                .map(|s| s.keys().copied().collect())
                .unwrap_or_default();
            // Not a revocation of permission: later news of the user is welcome again.
            self.send_split(viewers, |viewers| GroupMessage::Revoke {
                from: user,
                reason: GoneReason::Inactive,
                viewers,
                at: 0,
                ack: None,
            });
        }
    }

    /// The command at log index `index` of this group was applied with `result`; `state` is the
    /// state after it. Applies its effect on live streams: new relations are subscribed, ended
    /// ones unsubscribed, and every viewer of a user whose audience may have changed is
    /// re-decided — revoked (with an acknowledgement asked under `Barrier { group, index }`) or
    /// sent the current location.
    pub fn handle_committed(
        &mut self,
        state: &GroupState,
        index: u64,
        cmd: &Command,
        result: &CommandResult,
        now: Millis,
    ) {
        self.set_applied(index);
        // A visibility-ending change that changed nothing (a retry after an answer was lost)
        // still revokes: its first attempt's revocations may never have been confirmed.
        let ends = cmd.ends_visibility()
            || matches!(cmd, Command::Deliver { mirror, .. } if !mirror.other_may_see_user());
        match result {
            CommandResult::Rejected(_) => return,
            CommandResult::Unchanged if !ends => return,
            _ => {}
        }
        let here = |u: UserId| state.range().contains(u);
        if let Command::SetGhost { user, until } = cmd {
            self.watch_ghost(*user, *until, now);
        }
        let touched: Vec<UserId> = match cmd {
            Command::SetSharing { user, .. }
            | Command::SetGhost { user, .. }
            | Command::Hide { user, .. }
            | Command::Unhide { user, .. } => vec![*user],
            Command::Deliver { mirror, .. } => vec![mirror.user],
            Command::AddFriend { .. }
            | Command::RemoveFriend { .. }
            | Command::GrantFollow { .. }
            | Command::RevokeFollow { .. }
            | Command::Unfollow { .. } => {
                let (a, b) = cmd.users();
                [Some(a), b].into_iter().flatten().filter(|u| here(*u)).collect()
            }
            _ => Vec::new(),
        };
        let mut barrier = Barrier {
            group: self.group,
            index,
            part: 0,
        };
        for user in touched {
            self.refresh_relations(state, user);
            let targets = revocation_targets(state, cmd, user);
            self.revisit_audience(state, user, now, &mut barrier, &targets);
        }
        // Strangers: a privacy change publishes the user again, or retracts it (acknowledged
        // under the change's barrier when it ends a permission).
        if let Some(user) = cmd.strangers_user() {
            let visible = state
                .user(user)
                .is_some_and(|r| r.discoverable && !r.is_hidden(now));
            let at = self.locations.get(user);
            let (strangers, mut cx) = self.cx();
            match (visible, at) {
                (true, Some(at)) => strangers.publish(&mut cx, state, user, at, now),
                (true, None) => {}
                (false, _) => {
                    // The last part of this change's barrier, if it asks for one.
                    strangers.retract(&mut cx, user, ends.then_some(barrier), now);
                }
            }
        }
        // A request someone received is news for them.
        let request = match (cmd, result) {
            (Command::AddFriend { from, to }, CommandResult::FriendRequestSent) if here(*to) => {
                Some((*to, *from))
            }
            (Command::Deliver { mirror, .. }, CommandResult::Updated) if mirror.request_in => {
                Some((mirror.user, mirror.other))
            }
            _ => None,
        };
        if let Some((to, from)) = request.filter(|(to, _)| self.viewers.contains_key(to)) {
            self.outputs.push(Output::Push {
                viewer: to,
                event: Event::FriendRequest { from },
            });
        }
    }

    /// Brings an online `user`'s subscriptions in line with its record: subscribes to new
    /// publishers (friends and grants), unsubscribes from and forgets former ones.
    fn refresh_relations(&mut self, state: &GroupState, user: UserId) {
        let Some(record) = state.user(user) else {
            return;
        };
        let Some(v) = self.viewers.get(&user) else {
            return;
        };
        let now: FriendSet = record
            .friends
            .iter()
            .chain(record.rare().following.iter())
            .collect();
        let added: FriendSet = now.iter().filter(|p| !v.publishers.contains(*p)).collect();
        let removed: Vec<UserId> = v.publishers.iter().filter(|p| !now.contains(*p)).collect();
        for p in removed {
            if let Some(v) = self.viewers.get_mut(&user) {
                v.publishers.remove(p);
            }
            self.forget(user, p, GoneReason::Unfriended);
            if let Some(&to) = self.ranges.locate(p) {
                self.outputs.push(Output::Send {
                    to,
                    msg: GroupMessage::Unsubscribe {
                        viewer: user,
                        publishers: vec![p],
                    },
                });
            }
        }
        if !added.is_empty() {
            if let Some(v) = self.viewers.get_mut(&user) {
                for p in added.iter() {
                    v.publishers.insert(p);
                }
            }
            self.subscribe_to(user, &added);
        }
    }

    /// Re-decides who sees `user` after its privacy or relations changed: viewers no longer
    /// allowed — the subscribers this leader knows, and `targets`, every viewer the change may
    /// have ended (whether subscribed here or not: a new leader knows no subscribers) — get a
    /// revocation, each acknowledged under its own part of `barrier`; subscribers allowed get
    /// the current location.
    fn revisit_audience(
        &mut self,
        state: &GroupState,
        user: UserId,
        now: Millis,
        barrier: &mut Barrier,
        targets: &[UserId],
    ) {
        let Some(record) = state.user(user) else {
            return;
        };
        let subs: Vec<UserId> = self
            .subscribers
            .get(&user)
            .map(|s| s.keys().copied().collect())
            .unwrap_or_default();
        let (allowed, mut denied): (Vec<UserId>, Vec<UserId>) =
            subs.into_iter().partition(|v| record.may_see_me(*v, now));
        denied.extend(targets.iter().copied().filter(|v| !record.may_see_me(*v, now)));
        denied.sort_unstable();
        denied.dedup();
        // Viewers who lost the relation read "unfriended"; the others (hidden from, sharing off,
        // ghost mode) read "hidden".
        let relation_gone =
            |v: &UserId| !record.friends.contains(*v) && !record.rare().followers.contains(*v);
        let (unfriended, hidden): (Vec<UserId>, Vec<UserId>) = denied.into_iter().partition(relation_gone);
        let at = barrier.index;
        let mut revoke = |viewers, reason| {
            let ack = *barrier;
            barrier.part += 1;
            GroupMessage::Revoke {
                from: user,
                reason,
                viewers,
                at,
                ack: Some(ack),
            }
        };
        for (viewers, reason) in [(unfriended, GoneReason::Unfriended), (hidden, GoneReason::Hidden)] {
            // A viewer that subscribed from a group other than the one this map routes it to
            // (one of the two maps is behind a split or merge) may hold the user there: that
            // group is told too, under a part of its own.
            let mut elsewhere: BTreeMap<GroupId, Vec<UserId>> = BTreeMap::new();
            if let Some(subscribed) = self.subscribers.get(&user) {
                for v in &viewers {
                    if let Some(&g) = subscribed.get(v).filter(|g| self.ranges.locate(*v) != Some(*g)) {
                        elsewhere.entry(g).or_default().push(*v);
                    }
                }
            }
            self.send_split(viewers, |viewers| revoke(viewers, reason));
            for (to, viewers) in elsewhere {
                let msg = revoke(viewers, reason);
                self.outputs.push(Output::Send { to, msg });
            }
        }
        if let Some(at) = self.locations.get(user) {
            let decided_at = self.applied;
            self.send_split(allowed, |viewers| GroupMessage::Update {
                from: user,
                at,
                viewers,
                decided_at,
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
        let page = match nearby_page(&query, v.known.iter().map(|(k, known)| (*k, known.at)), cursor) {
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

    /// Seconds until the node wants `viewer`'s next update (see [`cadence`]).
    pub fn cadence_s(&self, viewer: UserId) -> u32 {
        let (Some(me), Some(v)) = (self.locations.get(viewer), self.viewers.get(&viewer)) else {
            return cadence::IN_RANGE_S;
        };
        if v.known.is_empty() {
            return cadence::ALONE_S;
        }
        let closest = v
            .known
            .values()
            .filter(|k| k.shown)
            .map(|k| me.loc.distance_m(&k.at.loc))
            .fold(f64::INFINITY, f64::min);
        if closest <= cadence::NEAR_M {
            cadence::NEAR_S
        } else if closest.is_finite() {
            cadence::IN_RANGE_S
        } else {
            cadence::FAR_S
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

/// Every viewer whose permission to see `user` (a user of this group) the command may have
/// ended, named by the command or by `user`'s record — not only those subscribed at this leader.
fn revocation_targets(state: &GroupState, cmd: &Command, user: UserId) -> Vec<UserId> {
    match cmd {
        Command::Hide { user: u, from } if *u == user => vec![*from],
        Command::RemoveFriend { user: a, friend: b } if *a == user => vec![*b],
        Command::RemoveFriend { user: a, friend: b } if *b == user => vec![*a],
        Command::RevokeFollow { user: u, follower } | Command::Unfollow { user: u, follower }
            if *u == user =>
        {
            vec![*follower]
        }
        Command::Deliver { mirror, .. } if mirror.user == user && !mirror.other_may_see_user() => {
            vec![mirror.other]
        }
        Command::SetSharing { on: false, .. } | Command::SetGhost { until: Some(_), .. } => state
            .user(user)
            .map(|r| r.friends.iter().chain(r.rare().followers.iter()).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// A friend left the radius: the event names the radius, never the distance beyond it (a friend
/// 300 km away must not read "300 km").
fn left(id: UserId, at: LatestLocation, radius_m: f64) -> Event {
    Event::FriendLeft {
        id,
        distance_m: radius_m,
        updated_at: at.updated_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::incarnation::run;
    use nearby_index::friends::UserRange;
    use nearby_raft::shard::command::pair_owner;
    use std::collections::HashMap;

    /// Two groups as a cluster runs them: users 1..100 in group 1, 100..200 in group 2;
    /// relation changes decided by the pair owner's group and delivered to the other.
    struct World {
        states: HashMap<GroupId, GroupState>,
        index: HashMap<GroupId, u64>,
        presences: HashMap<GroupId, Presence>,
        pushed: Vec<(UserId, Event)>,
        acks: Vec<Barrier>,
        /// Messages to groups this world does not run.
        elsewhere: Vec<(GroupId, GroupMessage)>,
        now: Millis,
    }

    impl World {
        fn new() -> World {
            let r1 = UserRange::new(1, 100).expect("r1");
            let r2 = UserRange::new(100, 200).expect("r2");
            let ranges = Arc::new(RangeTable::new(vec![(r1, 1), (r2, 2)]).expect("table"));
            let mut w = World {
                states: HashMap::new(),
                index: HashMap::new(),
                presences: HashMap::new(),
                pushed: Vec::new(),
                acks: Vec::new(),
                elsewhere: Vec::new(),
                now: Millis(1_000_000),
            };
            for (g, r) in [(1, r1), (2, r2)] {
                w.states.insert(g, GroupState::new(r));
                w.index.insert(g, 0);
                w.presences.insert(
                    g,
                    Presence::new(g, run(1), PresenceConfig::default(), Arc::clone(&ranges)),
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

        fn apply(&mut self, g: GroupId, cmd: &Command) {
            let index = self.index.get_mut(&g).expect("index");
            *index += 1;
            let i = *index;
            let state = self.states.get_mut(&g).expect("state");
            let result = state.apply(cmd, i);
            let p = self.presences.get_mut(&g).expect("presence");
            p.handle_committed(&self.states[&g], i, cmd, &result, self.now);
            self.drain(g);
        }

        /// Commits `cmd` where the node would (the pair owner's group for a relation) and
        /// delivers the intents it leaves.
        fn commit(&mut self, cmd: Command) {
            let target = match cmd.users() {
                (a, Some(b)) if cmd.is_two_sided() => pair_owner(a, b),
                (a, _) => a,
            };
            let g = Self::group(target);
            self.apply(g, &cmd);
            let intents: Vec<(u64, nearby_raft::shard::command::Mirror)> =
                self.states[&g].outbox().map(|(s, m)| (s, *m)).collect();
            for (seq, mirror) in intents {
                let deliver = Command::Deliver {
                    source: g,
                    seq,
                    mirror,
                };
                self.apply(Self::group(mirror.user), &deliver);
                self.apply(g, &Command::Delivered { seq });
            }
        }

        fn drain(&mut self, from: GroupId) {
            let mut queue: Vec<Output> = self.presences.get_mut(&from).expect("p").poll_outputs();
            while !queue.is_empty() {
                let mut next = Vec::new();
                for out in queue {
                    match out {
                        Output::Push { viewer, event } => self.pushed.push((viewer, event)),
                        Output::Purge { .. } => {}
                        Output::Send {
                            msg: GroupMessage::RevokeAck { barrier },
                            ..
                        } => self.acks.push(barrier),
                        Output::Send { to, msg } if !self.presences.contains_key(&to) => {
                            self.elsewhere.push((to, msg));
                        }
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

        /// Runs group `g`'s tick at its next deadline.
        fn tick(&mut self, g: GroupId) {
            let deadline = self.presences[&g].next_deadline().expect("deadline");
            self.now = self.now.max(deadline);
            let p = self.presences.get_mut(&g).expect("p");
            p.handle_tick(&self.states[&g], self.now);
            self.drain(g);
        }

        /// Users 1 (group 1) and 150 (group 2), friends; 1 online at `A`, 150 at `B`, in range.
        fn friends_in_range() -> Self {
            let mut w = World::new();
            w.register(&[1, 150]);
            w.befriend(1, 150);
            w.connect(1);
            w.at(1, A.0, A.1);
            w.at(150, B.0, B.1);
            w
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

        /// An update of user 150 (group 2) to viewer 1, decided at group 2's current state:
        /// to be delivered late.
        fn late_update_of_150_to_1(&self) -> GroupMessage {
            GroupMessage::Update {
                from: 150,
                at: LatestLocation {
                    loc: LatLng::new(B.0, B.1 + 0.002).expect("ll"),
                    updated_at: Millis(self.now.0 + 500),
                },
                viewers: vec![1],
                decided_at: self.index[&2],
            }
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
        // Leaving names the radius, never the distance beyond it.
        assert!(
            matches!(&w.take(1)[..], [Event::FriendLeft { id: 150, distance_m, .. }] if *distance_m == 8_000.0)
        );
        w.at(150, B.0, B.1);
        assert!(matches!(&w.take(1)[..], [Event::FriendEntered(_)]));
        w.at(150, A.0, A.1 + 0.001);
        assert!(matches!(&w.take(1)[..], [Event::FriendMoved(_)]));
    }

    #[test]
    fn an_update_is_sent_once_per_destination_group_however_many_viewers_it_has() {
        let mut w = World::new();
        let friends: Vec<UserId> = (2..40).chain(100..140).collect();
        w.register(&[1]);
        w.register(&friends);
        for &f in &friends {
            w.befriend(1, f);
            w.connect(f);
            w.at(f, B.0, B.1);
        }
        w.connect(1);
        w.now = Millis(w.now.0 + 1_000);
        let now = w.now;
        let p = w.presences.get_mut(&1).expect("p");
        let ll = LatLng::new(A.0, A.1).expect("ll");
        assert!(p.handle_location(&w.states[&1], 1, ll, now, now, false));
        let mut sends: Vec<(GroupId, usize)> = p
            .poll_outputs()
            .into_iter()
            .filter_map(|o| match o {
                Output::Send {
                    to,
                    msg: GroupMessage::Update { viewers, .. },
                } => Some((to, viewers.len())),
                _ => None,
            })
            .collect();
        sends.sort_unstable();
        // 76 viewers in two groups: two messages, each naming its group's viewers.
        assert_eq!(sends, vec![(1, 38), (2, 40)]);
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
    fn hiding_sharing_off_and_unfriending_stop_updates_at_once_and_are_acknowledged() {
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
        assert!(
            w.acks.iter().any(|b| b.group == 2),
            "the viewer's group acknowledged the revocation"
        );
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

        // 150 unfriends 1: decided in group 1 (the pair's owner), delivered to group 2.
        w.commit(Command::RemoveFriend { user: 150, friend: 1 });
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
    fn an_update_decided_before_a_revocation_is_dropped_even_if_it_arrives_after() {
        let mut w = World::friends_in_range();
        w.take(1);
        // An update of 150 decided at group 2's current state, held back in the network ...
        let late = w.late_update_of_150_to_1();
        // ... while 150 hides from 1.
        w.commit(Command::Hide { user: 150, from: 1 });
        assert!(matches!(&w.take(1)[..], [Event::FriendGone { .. }]));
        let p = w.presences.get_mut(&1).expect("p");
        p.handle_message(&w.states[&1], late, w.now);
        w.drain(1);
        assert!(w.take(1).is_empty(), "a stale update leaked after the revocation");
    }

    #[test]
    fn a_new_run_of_the_viewers_group_drops_an_update_decided_before_its_snapshot() {
        let mut w = World::friends_in_range();
        w.take(1);
        // An update of 150 to viewer 1, meant for group 1's run of now, held back ...
        let late = w.late_update_of_150_to_1();
        // ... while 150 hides from 1: that run forgets 150 and acknowledges, then ends (its
        // leader deposed). The next run starts from the replicated state: it never heard it.
        w.commit(Command::Hide { user: 150, from: 1 });
        assert!(w.acks.iter().any(|b| b.group == 2), "acknowledged");
        let ranges = Arc::clone(&w.presences[&1].ranges);
        w.presences
            .insert(1, Presence::new(1, run(2), PresenceConfig::default(), ranges));
        w.connect(1);
        w.at(1, A.0, A.1);
        w.take(1);
        // The late update reaches the new run (routed again), after its snapshot.
        let p = w.presences.get_mut(&1).expect("p");
        p.handle_message(&w.states[&1], late, w.now);
        w.drain(1);
        assert!(w.take(1).is_empty(), "an update older than the snapshot leaked");
        let (page, _) = w.presences[&1].page(1, 20, None).expect("live").expect("page");
        assert!(page.entries.is_empty(), "{page:?}");
    }

    #[test]
    fn an_update_reaches_the_viewers_whose_snapshot_is_older_and_no_other() {
        let mut w = World::new();
        w.register(&[1, 2, 150]);
        w.befriend(1, 150);
        w.befriend(2, 150);
        w.at(150, B.0, B.1);
        w.connect(1);
        w.at(1, A.0, A.1);
        // Decided after 1's snapshot: group 2 then moves on (a registration) before 2's.
        let between = w.late_update_of_150_to_1();
        w.register(&[160]);
        w.connect(2);
        w.at(2, A.0, A.1);
        w.take(1);
        w.take(2);
        let GroupMessage::Update {
            from, at, decided_at, ..
        } = between
        else {
            unreachable!("an update");
        };
        let update = |viewers| GroupMessage::Update {
            from,
            at,
            viewers,
            decided_at,
        };
        let p = w.presences.get_mut(&1).expect("p");
        p.handle_message(&w.states[&1], update(vec![1, 2]), w.now);
        w.drain(1);
        assert!(
            matches!(&w.take(1)[..], [Event::FriendMoved(_)]),
            "1's snapshot is older than the update"
        );
        assert!(w.take(2).is_empty(), "2's snapshot is newer than the update");
        // Decided at the newest snapshot: every viewer takes it.
        let newest = GroupMessage::Update {
            from,
            at: LatestLocation {
                loc: LatLng::new(B.0, B.1 + 0.004).expect("ll"),
                updated_at: Millis(w.now.0 + 900),
            },
            viewers: vec![1, 2],
            decided_at: w.index[&2],
        };
        let p = w.presences.get_mut(&1).expect("p");
        p.handle_message(&w.states[&1], newest, w.now);
        w.drain(1);
        assert!(matches!(&w.take(1)[..], [Event::FriendMoved(_)]));
        assert!(matches!(&w.take(2)[..], [Event::FriendMoved(_)]));
    }

    #[test]
    fn a_revocation_is_remembered_for_a_viewer_who_connects_after_it() {
        let mut w = World::new();
        w.register(&[1, 150]);
        w.befriend(1, 150);
        w.at(150, B.0, B.1);
        // An update of 150 to viewer 1 decided now, held back in the network (from a session
        // of 1 that closed) ...
        let late = w.late_update_of_150_to_1();
        // ... while 150 hides from 1, who is offline; the revocation is acknowledged.
        w.commit(Command::Hide { user: 150, from: 1 });
        assert!(w.acks.iter().any(|b| b.group == 2), "acknowledged");
        // 1 comes online: its snapshot leaves 150 out; then the late update arrives.
        w.connect(1);
        w.at(1, A.0, A.1);
        let p = w.presences.get_mut(&1).expect("p");
        p.handle_message(&w.states[&1], late, w.now);
        w.drain(1);
        assert!(
            w.take(1).is_empty(),
            "a stale update leaked to a viewer who reconnected"
        );
        let (page, _) = w.presences[&1].page(1, 20, None).expect("live").expect("page");
        assert!(page.entries.is_empty(), "{page:?}");
    }

    #[test]
    fn a_group_acknowledges_a_revocation_only_for_viewers_it_serves() {
        let mut w = World::new();
        w.register(&[1, 150]);
        let barrier = |part| Barrier {
            group: 2,
            index: 7,
            part,
        };
        let revoke = |viewers: Vec<UserId>, part| GroupMessage::Revoke {
            from: 150,
            reason: GoneReason::Hidden,
            viewers,
            at: 7,
            ack: Some(barrier(part)),
        };
        // Group 1 serves 1, not 150 (a group that split or merged it away, as a publisher with
        // an older map may believe): only its own viewers are confirmed.
        for (viewers, part, acked) in [
            (vec![1], 0, true),
            (vec![150], 1, false),
            (vec![1, 150], 2, false),
        ] {
            let p = w.presences.get_mut(&1).expect("p");
            p.handle_message(&w.states[&1], revoke(viewers.clone(), part), w.now);
            let outputs = p.poll_outputs();
            let ack = outputs.iter().any(|o| {
                matches!(o, Output::Send { to: 2, msg: GroupMessage::RevokeAck { barrier: b } } if *b == barrier(part))
            });
            assert_eq!(ack, acked, "viewers {viewers:?}: {outputs:?}");
        }
    }

    #[test]
    fn a_viewer_subscribed_from_a_group_the_map_does_not_name_is_revoked_there_too() {
        let mut w = World::new();
        w.register(&[1, 150]);
        w.befriend(1, 150);
        w.at(150, B.0, B.1);
        // Viewer 1 subscribed from group 7, which serves it by a newer map than group 2's.
        let p = w.presences.get_mut(&2).expect("p");
        p.handle_message(
            &w.states[&2],
            GroupMessage::Subscribe {
                viewer: 1,
                viewer_group: 7,
                publishers: vec![150],
            },
            w.now,
        );
        w.drain(2);
        assert!(
            matches!(&w.elsewhere[..], [(7, GroupMessage::Snapshot { entries, .. })] if entries.len() == 1),
            "{:?}",
            w.elsewhere
        );
        w.elsewhere.clear();
        w.acks.clear();
        w.commit(Command::Hide { user: 150, from: 1 });
        let to_7: Vec<&GroupMessage> = w
            .elsewhere
            .iter()
            .filter(|(g, _)| *g == 7)
            .map(|(_, m)| m)
            .collect();
        assert!(
            matches!(&to_7[..], [GroupMessage::Revoke { viewers, ack: Some(b), .. }] if viewers == &vec![1] && b.group == 2),
            "{to_7:?}"
        );
        // The group the map names (1) was told as well, under another part.
        assert_eq!(w.acks.iter().filter(|b| b.group == 2).count(), 1);
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
    fn resubscribing_after_a_leader_change_repairs_what_a_viewer_knows() {
        let mut w = World::friends_in_range();
        w.take(1);
        // Group 2 gets a new leader: fresh presence, no subscribers, no locations.
        let ranges = Arc::clone(&w.presences[&2].ranges);
        w.presences
            .insert(2, Presence::new(2, run(2), PresenceConfig::default(), ranges));
        // 150 hides from 1 at the new leader, which does not know 1 is watching: the hide names
        // its viewer, so the revocation reaches 1's group anyway.
        w.commit(Command::Hide { user: 150, from: 1 });
        assert!(matches!(&w.take(1)[..], [Event::FriendGone { id: 150, .. }]));
        // Group 1 learns of the new leader and subscribes again: the snapshot agrees.
        let now = w.now;
        w.presences
            .get_mut(&1)
            .expect("p")
            .resubscribe(&w.states[&1], 2, None, now);
        w.drain(1);
        assert!(w.take(1).is_empty());
        let (page, _) = w.presences[&1].page(1, 20, None).expect("live").expect("page");
        assert!(page.entries.is_empty());
    }

    #[test]
    fn a_stale_known_location_is_forgotten_when_the_snapshot_leaves_it_out() {
        let mut w = World::friends_in_range();
        w.take(1);
        // Group 2 gets a new leader that never saw 150's location: the snapshot of a
        // resubscription does not list 150, so 1 stops showing the old position.
        let ranges = Arc::clone(&w.presences[&2].ranges);
        w.presences
            .insert(2, Presence::new(2, run(2), PresenceConfig::default(), ranges));
        let now = w.now;
        w.presences
            .get_mut(&1)
            .expect("p")
            .resubscribe(&w.states[&1], 2, None, now);
        w.drain(1);
        assert!(matches!(&w.take(1)[..], [Event::FriendGone { id: 150, .. }]));
    }

    #[test]
    fn a_restarted_group_introduces_itself_and_the_others_repair_without_a_map_change() {
        let mut w = World::friends_in_range();
        assert!(matches!(&w.take(1)[..], [Event::FriendEntered(_)]));
        // Group 2's driver restarts under the same leader and term (the map does not change):
        // a new run, which never saw 150's location and knows nobody watches 150.
        let ranges = Arc::clone(&w.presences[&2].ranges);
        let mut fresh = Presence::new(2, run(2), PresenceConfig::default(), ranges);
        fresh.set_applied(w.index[&2]);
        w.presences.insert(2, fresh);
        let now = w.now;
        w.presences.get_mut(&2).expect("p").introduce();
        assert!(!w.presences[&2].settled(), "young until group 1 confirms");
        w.drain(2);
        assert!(w.presences[&2].settled(), "group 1 confirmed");
        // Group 1 forgot the old run's news and subscribed again: the snapshot has no location.
        assert!(matches!(&w.take(1)[..], [Event::FriendGone { id: 150, .. }]));
        // And the new run knows 1 watches: 150's next move reaches 1.
        w.at(150, B.0 + 0.001, B.1);
        assert!(matches!(&w.take(1)[..], [Event::FriendEntered(p)] if p.id == 150));
        // A resent introduction of the same run changes nothing.
        let again = GroupMessage::Started {
            group: 2,
            incarnation: run(2),
        };
        w.presences
            .get_mut(&1)
            .expect("p")
            .handle_message(&w.states[&1], again, now);
        w.drain(1);
        assert!(w.take(1).is_empty());
    }

    #[test]
    fn a_timed_ghost_mode_ends_by_itself_and_friends_see_the_user_again() {
        let mut w = World::friends_in_range();
        assert!(matches!(&w.take(1)[..], [Event::FriendEntered(_)]));
        let until = Millis(w.now.0 + 60_000);
        w.commit(Command::SetGhost {
            user: 150,
            until: Some(until),
        });
        assert!(matches!(
            &w.take(1)[..],
            [Event::FriendGone {
                id: 150,
                reason: GoneReason::Hidden
            }]
        ));
        // Moving while a ghost reaches nobody.
        w.at(150, B.0 + 0.001, B.1);
        assert!(w.take(1).is_empty());
        assert_eq!(w.presences[&2].next_deadline(), Some(until));
        w.tick(2);
        match &w.take(1)[..] {
            [Event::FriendEntered(p)] => assert_eq!(p.id, 150),
            other => panic!("expected the user back, got {other:?}"),
        }
    }

    #[test]
    fn a_new_leader_ends_a_ghost_mode_set_under_the_previous_one() {
        let mut w = World::new();
        w.register(&[1, 150]);
        w.befriend(1, 150);
        let until = Millis(w.now.0 + 60_000);
        w.commit(Command::SetGhost {
            user: 150,
            until: Some(until),
        });
        // Group 2's leader changes: its successor starts from the replicated state alone.
        let ranges = Arc::clone(&w.presences[&2].ranges);
        let mut fresh = Presence::new(2, run(2), PresenceConfig::default(), ranges);
        fresh.set_applied(w.index[&2]);
        fresh.load(&w.states[&2], w.now);
        w.presences.insert(2, fresh);
        w.connect(1);
        w.at(1, A.0, A.1);
        w.at(150, B.0, B.1);
        assert!(w.take(1).is_empty(), "a ghost is seen");
        w.tick(2);
        assert!(matches!(&w.take(1)[..], [Event::FriendEntered(p)] if p.id == 150));
    }

    #[test]
    fn a_follower_sees_the_followed_who_does_not_see_back_until_revoked_or_unfollowed() {
        let mut w = World::new();
        w.register(&[1, 150]);
        // 150 lets 1 follow.
        w.commit(Command::GrantFollow {
            user: 150,
            follower: 1,
        });
        w.connect(1);
        w.connect(150);
        w.at(1, A.0, A.1);
        w.at(150, B.0, B.1);
        assert!(matches!(&w.take(1)[..], [Event::FriendEntered(p)] if p.id == 150));
        assert!(w.take(150).is_empty(), "the followed sees the follower");
        w.at(1, A.0 + 0.001, A.1);
        assert!(w.take(150).is_empty(), "the followed sees the follower move");
        w.commit(Command::RevokeFollow {
            user: 150,
            follower: 1,
        });
        assert!(matches!(
            &w.take(1)[..],
            [Event::FriendGone {
                id: 150,
                reason: GoneReason::Unfriended
            }]
        ));
        w.at(150, B.0 + 0.001, B.1);
        assert!(w.take(1).is_empty());
        // Again, and this time the follower stops following.
        w.commit(Command::GrantFollow {
            user: 150,
            follower: 1,
        });
        // The grant alone shows the followed user's current location.
        assert!(matches!(&w.take(1)[..], [Event::FriendEntered(p)] if p.id == 150));
        w.commit(Command::Unfollow {
            follower: 1,
            user: 150,
        });
        assert!(matches!(&w.take(1)[..], [Event::FriendGone { id: 150, .. }]));
        w.at(150, B.0 + 0.002, B.1);
        assert!(w.take(1).is_empty());
    }

    #[test]
    fn a_friend_coming_close_speeds_the_viewer_up_at_once_and_slowing_waits_for_the_next_update() {
        let mut w = World::new();
        w.register(&[1, 150]);
        w.befriend(1, 150);
        w.connect(1);
        w.at(1, A.0, A.1);
        let told = w.presences.get_mut(&1).expect("p").tell_cadence(1);
        assert_eq!(told, cadence::ALONE_S, "nobody active");
        w.at(150, B.0, B.1); // 3 km: in range
        assert!(
            matches!(&w.take(1)[..], [Event::FriendEntered(_)]),
            "no push for 120 -> 30"
        );
        assert_eq!(w.presences[&1].cadence_s(1), cadence::IN_RANGE_S);
        w.at(150, A.0 + 0.005, A.1); // 560 m
        match &w.take(1)[..] {
            [Event::FriendMoved(_), Event::Cadence { next_update_s }] => {
                assert_eq!(*next_update_s, cadence::NEAR_S)
            }
            other => panic!("expected a move then a faster cadence, got {other:?}"),
        }
        w.at(150, B.0, B.1);
        assert!(
            matches!(&w.take(1)[..], [Event::FriendMoved(_)]),
            "slowing is pushed"
        );
        assert_eq!(
            w.presences.get_mut(&1).expect("p").tell_cadence(1),
            cadence::IN_RANGE_S
        );
        w.at(150, A.0 + 0.5, A.1); // 55 km: out of range
        w.take(1);
        assert_eq!(w.presences[&1].cadence_s(1), cadence::FAR_S);
    }

    #[test]
    fn expiry_sends_gone_to_viewers() {
        let mut w = World::friends_in_range();
        assert!(matches!(&w.take(1)[..], [Event::FriendEntered(_)]));
        let deadline = w.presences[&2].next_deadline().expect("deadline");
        w.now = deadline;
        w.tick(2);
        assert!(matches!(
            &w.take(1)[..],
            [Event::FriendGone {
                id: 150,
                reason: GoneReason::Inactive
            }]
        ));
    }
}
