//! What one online user sees, on this connection server: the friends they are subscribed to,
//! each friend's latest location as learnt from Redis, and who is in range — the state a
//! connection server of the original design keeps per session. Pure: no I/O, no clock (`now` is
//! passed in); every input returns the events to push.
//!
//! # Merging a snapshot with the channel
//!
//! A viewer subscribes to `ch:{f}` *first* and reads `f`'s state from Redis (`MGET loc:…`,
//! `hiddenby:{v}`) *after*, so no change is lost between the two. The snapshot reply and the
//! channel's messages travel on different connections, so a message published after the snapshot
//! was taken may be handled before it. Messages on one channel arrive in order and, from the
//! subscription on, every visibility change of `f` publishes one; so once a visibility message
//! (`H`/`S`, or `G`/`L`) about the viewer has arrived, it is newer than or as new as the
//! snapshot, and the snapshot's flag is ignored. Locations are merged by `updated_at`. The result
//! can only hide a location a moment too long, never show one that must not be seen.
//!
//! # Call order
//!
//! 1. [`View::add_publishers`] with the friends read at start-up (or one new friend), after
//!    subscribing to their channels;
//! 2. [`View::handle_snapshot`] with what was read after subscribing;
//! 3. [`View::handle_message`] for every message on a subscribed channel, any time;
//! 4. [`View::handle_own_location`] for every location of the viewer;
//! 5. [`View::handle_tick`] when the clock passes [`View::next_deadline`].

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use nearby_client::proto::{Coord, Event, FriendPosition, GoneReason};
use nearby_index::error::QueryError;
use nearby_index::geo::{Millis, UserId};
use nearby_index::query::{nearby_page, Cursor, NearbyQuery, Page};
use nearby_index::ttl::LatestLocation;

use crate::keys::Message;

/// What the viewer knows of one friend.
#[derive(Clone, Debug, Default)]
struct Publisher {
    name: String,
    loc: Option<LatestLocation>,
    /// The friend hides from the viewer.
    hidden: bool,
    /// `hidden` was set by a message since the subscription (the snapshot's flag is older).
    hidden_by_msg: bool,
    /// The friend turned sharing off (a `G` not yet followed by an `L`).
    off: bool,
}

impl Publisher {
    fn shown(&self) -> Option<LatestLocation> {
        if self.hidden || self.off {
            None
        } else {
            self.loc
        }
    }
}

/// One friend's state as read from Redis after subscribing.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotEntry {
    /// The friend.
    pub user: UserId,
    /// `name:{f}`.
    pub name: Option<String>,
    /// `loc:{f}`, if live.
    pub loc: Option<LatestLocation>,
    /// Whether `f` is in `hiddenby:{viewer}`.
    pub hidden: bool,
}

/// A follow-up the caller must perform (subscriptions need Redis).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FollowUp {
    /// Subscribe to `ch:{friend}` and read its snapshot.
    Subscribe(UserId),
    /// Unsubscribe from `ch:{friend}`.
    Unsubscribe(UserId),
}

/// What one online user sees (see the module doc).
#[derive(Debug)]
pub struct View {
    viewer: UserId,
    radius_m: f64,
    ttl: Duration,
    me: Option<LatestLocation>,
    publishers: HashMap<UserId, Publisher>,
    visible: HashSet<UserId>,
    next_deadline: Option<Millis>,
}

fn position(id: UserId, at: LatestLocation, distance_m: f64) -> FriendPosition {
    FriendPosition {
        id,
        at: Coord {
            lat: at.loc.lat(),
            lon: at.loc.lon(),
        },
        distance_m,
        updated_at: at.updated_at,
    }
}

impl View {
    /// An empty view of `viewer` with search radius `radius_m` and inactivity timeout `ttl`.
    pub fn new(viewer: UserId, radius_m: f64, ttl: Duration) -> Self {
        View {
            viewer,
            radius_m,
            ttl,
            me: None,
            publishers: HashMap::new(),
            visible: HashSet::new(),
            next_deadline: None,
        }
    }

    /// The viewer's latest location, if live.
    pub fn me(&self) -> Option<LatestLocation> {
        self.me
    }

    /// Whether the viewer is subscribed to `friend`.
    pub fn follows(&self, friend: UserId) -> bool {
        self.publishers.contains_key(&friend)
    }

    /// Everyone the viewer is subscribed to.
    pub fn publishers(&self) -> impl Iterator<Item = UserId> + '_ {
        self.publishers.keys().copied()
    }

    /// When [`View::handle_tick`] must next run.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.next_deadline
    }

    fn deadline_of(&mut self, at: LatestLocation) {
        let d = at.updated_at.saturating_add(self.ttl);
        self.next_deadline = Some(self.next_deadline.map_or(d, |n| n.min(d)));
    }

    /// Adds friends to follow (returns those that were new).
    pub fn add_publishers(&mut self, friends: impl IntoIterator<Item = UserId>) -> Vec<UserId> {
        let mut added = Vec::new();
        for f in friends {
            if f != self.viewer && !self.publishers.contains_key(&f) {
                self.publishers.insert(f, Publisher::default());
                added.push(f);
            }
        }
        added
    }

    /// Stops following `friend`; a `FriendGone` if it was shown.
    pub fn remove_publisher(&mut self, friend: UserId, reason: GoneReason) -> Option<Event> {
        self.publishers.remove(&friend)?;
        self.visible
            .remove(&friend)
            .then_some(Event::FriendGone { id: friend, reason })
    }

    /// Merges what was read after subscribing (see the module doc). With `notify`, changes are
    /// events; without (the start-up page covers them), they are only recorded.
    pub fn handle_snapshot(&mut self, entries: Vec<SnapshotEntry>, now: Millis, notify: bool) -> Vec<Event> {
        let mut events = Vec::new();
        for e in entries {
            let Some(p) = self.publishers.get_mut(&e.user) else {
                continue;
            };
            if let Some(name) = e.name {
                p.name = name;
            }
            if !p.hidden_by_msg {
                p.hidden = e.hidden;
            }
            if let Some(at) = e.loc.filter(|at| self.live(at, now)) {
                events.extend(self.learn(e.user, at));
            } else {
                events.extend(self.reevaluate(e.user, GoneReason::Hidden));
            }
        }
        if notify {
            events
        } else {
            Vec::new()
        }
    }

    fn live(&self, at: &LatestLocation, now: Millis) -> bool {
        at.updated_at.saturating_add(self.ttl) > now
    }

    /// A message on `ch:{from}` (or, for `NewFriend`/`Request`, on the viewer's own `ctl:`
    /// channel, with `from` the viewer). Returns events and the follow-up, if any.
    pub fn handle_message(
        &mut self,
        from: UserId,
        msg: Message,
        now: Millis,
    ) -> (Vec<Event>, Option<FollowUp>) {
        let me = self.viewer;
        match msg {
            Message::NewFriend { friend } => {
                let follow = (!self.publishers.contains_key(&friend) && friend != me)
                    .then_some(FollowUp::Subscribe(friend));
                return (Vec::new(), follow);
            }
            Message::Request { from } => return (vec![Event::FriendRequest { from }], None),
            Message::Unfriended { viewer } if viewer == me => {
                let gone = self.remove_publisher(from, GoneReason::Unfriended);
                return (gone.into_iter().collect(), Some(FollowUp::Unsubscribe(from)));
            }
            _ => {}
        }
        let Some(p) = self.publishers.get_mut(&from) else {
            return (Vec::new(), None);
        };
        let event = match msg {
            Message::Moved(at) => {
                p.off = false;
                if self.live(&at, now) {
                    self.learn(from, at)
                } else {
                    None
                }
            }
            Message::SharingOff => {
                p.off = true;
                self.reevaluate(from, GoneReason::Hidden)
            }
            Message::Hide { viewer } if viewer == me => {
                p.hidden = true;
                p.hidden_by_msg = true;
                self.reevaluate(from, GoneReason::Hidden)
            }
            Message::Unhide { viewer, at } if viewer == me => {
                p.hidden = false;
                p.hidden_by_msg = true;
                match at.filter(|at| self.live(at, now)) {
                    Some(at) => self.learn(from, at),
                    None => self.reevaluate(from, GoneReason::Hidden),
                }
            }
            // About another viewer of the same friend.
            _ => None,
        };
        (event.into_iter().collect(), None)
    }

    /// Records `friend`'s newer location and decides its event.
    fn learn(&mut self, friend: UserId, at: LatestLocation) -> Option<Event> {
        let p = self.publishers.get_mut(&friend)?;
        if p.loc.is_some_and(|old| old.updated_at >= at.updated_at) {
            return self.reevaluate(friend, GoneReason::Hidden);
        }
        p.loc = Some(at);
        self.deadline_of(at);
        let moved = self.visible.contains(&friend);
        match self.reevaluate(friend, GoneReason::Hidden) {
            None if moved && self.visible.contains(&friend) => {
                let d = self.me?.loc.distance_m(&at.loc);
                Some(Event::FriendMoved(position(friend, at, d)))
            }
            other => other,
        }
    }

    /// Brings `visible` in line for `friend`: entered, left, or gone (with `reason`).
    fn reevaluate(&mut self, friend: UserId, reason: GoneReason) -> Option<Event> {
        let was = self.visible.contains(&friend);
        let shown = self.publishers.get(&friend).and_then(Publisher::shown);
        let (Some(at), Some(me)) = (shown, self.me) else {
            if was && shown.is_none() {
                self.visible.remove(&friend);
                return Some(Event::FriendGone { id: friend, reason });
            }
            return None;
        };
        let d = me.loc.distance_m(&at.loc);
        match (d <= self.radius_m, was) {
            (true, false) => {
                self.visible.insert(friend);
                Some(Event::FriendEntered(position(friend, at, d)))
            }
            (false, true) => {
                self.visible.remove(&friend);
                Some(Event::FriendLeft {
                    id: friend,
                    distance_m: d,
                    updated_at: at.updated_at,
                })
            }
            _ => None,
        }
    }

    /// The viewer moved (or started): who entered or left range. Quiet at start-up.
    pub fn handle_own_location(&mut self, at: LatestLocation, notify: bool) -> Vec<Event> {
        self.me = Some(at);
        self.deadline_of(at);
        let friends: Vec<UserId> = self.publishers.keys().copied().collect();
        let events: Vec<Event> = friends
            .into_iter()
            .filter_map(|f| self.reevaluate(f, GoneReason::Hidden))
            .collect();
        if notify {
            events
        } else {
            Vec::new()
        }
    }

    /// Changes the viewer's search radius (already capped by the caller).
    pub fn set_radius(&mut self, radius_m: f64) -> Vec<Event> {
        self.radius_m = radius_m;
        match self.me {
            Some(me) => self.handle_own_location(me, true),
            None => Vec::new(),
        }
    }

    /// Expires what the TTL ended: friends become `FriendGone(Inactive)`; the viewer's own
    /// location is forgotten (the list then needs a new one).
    pub fn handle_tick(&mut self, now: Millis) -> Vec<Event> {
        if self.next_deadline.is_none_or(|d| d > now) {
            return Vec::new();
        }
        let ttl = self.ttl;
        let dead = |at: &LatestLocation| at.updated_at.saturating_add(ttl) <= now;
        if self.me.as_ref().is_some_and(dead) {
            self.me = None;
        }
        let mut events = Vec::new();
        let mut next: Option<Millis> = self.me.map(|m| m.updated_at.saturating_add(ttl));
        let ids: Vec<UserId> = self.publishers.keys().copied().collect();
        for f in ids {
            let Some(p) = self.publishers.get_mut(&f) else {
                continue;
            };
            match p.loc {
                Some(at) if dead(&at) => {
                    p.loc = None;
                    if self.visible.remove(&f) {
                        events.push(Event::FriendGone {
                            id: f,
                            reason: GoneReason::Inactive,
                        });
                    }
                }
                Some(at) => {
                    let d = at.updated_at.saturating_add(ttl);
                    next = Some(next.map_or(d, |n| n.min(d)));
                }
                None => {}
            }
        }
        self.next_deadline = next;
        events
    }

    /// One page of friends in range, nearest first; `None` without a live own location.
    pub fn page(
        &self,
        page_size: usize,
        cursor: Option<&Cursor>,
    ) -> Option<Result<(Page, Vec<String>), QueryError>> {
        let me = self.me?;
        let mut query = NearbyQuery::new(me.loc, self.radius_m);
        query.page_size = page_size;
        let candidates = self
            .publishers
            .iter()
            .filter_map(|(id, p)| p.shown().map(|at| (*id, at)));
        Some(nearby_page(&query, candidates, cursor).map(|page| {
            let names = page
                .entries
                .iter()
                .map(|e| {
                    self.publishers
                        .get(&e.user)
                        .map(|p| p.name.clone())
                        .unwrap_or_default()
                })
                .collect();
            (page, names)
        }))
    }

    /// The battery-aware cadence, as nearby computes it: 10 s with a shown friend within 1 km,
    /// 60 s when no friend is active, else 30 s.
    pub fn cadence_s(&self) -> u32 {
        let Some(me) = self.me else { return 30 };
        let active: Vec<LatestLocation> = self.publishers.values().filter_map(Publisher::shown).collect();
        if active.is_empty() {
            return 60;
        }
        let closest = active
            .iter()
            .map(|at| me.loc.distance_m(&at.loc))
            .fold(f64::INFINITY, f64::min);
        if closest <= 1_000.0 {
            10
        } else {
            30
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearby_index::geo::LatLng;

    const TTL: Duration = Duration::from_secs(600);

    fn at(lat: f64, t: u64) -> LatestLocation {
        LatestLocation {
            loc: LatLng::new(lat, 13.405).expect("valid"),
            updated_at: Millis(t),
        }
    }

    fn started() -> View {
        let mut v = View::new(1, 8_000.0, TTL);
        v.add_publishers([2, 3]);
        v.handle_own_location(at(52.52, 100), false);
        v
    }

    #[test]
    fn moves_give_entered_moved_left_and_far_friends_nothing() {
        let mut v = started();
        let (e, _) = v.handle_message(2, Message::Moved(at(52.547, 200)), Millis(200));
        assert!(matches!(&e[..], [Event::FriendEntered(p)] if (p.distance_m - 3_002.3).abs() < 30.0));
        let (e, _) = v.handle_message(2, Message::Moved(at(52.548, 300)), Millis(300));
        assert!(matches!(e[..], [Event::FriendMoved(_)]));
        let (e, _) = v.handle_message(2, Message::Moved(at(52.7, 400)), Millis(400));
        assert!(matches!(e[..], [Event::FriendLeft { .. }]));
        let (e, _) = v.handle_message(3, Message::Moved(at(52.7, 400)), Millis(400));
        assert!(e.is_empty());
        // A stranger's channel is never followed.
        let (e, _) = v.handle_message(9, Message::Moved(at(52.52, 500)), Millis(500));
        assert!(e.is_empty());
    }

    #[test]
    fn a_hide_that_overtakes_an_older_snapshot_keeps_the_friend_hidden() {
        let mut v = started();
        // The hide was published after the snapshot was taken, but is handled first.
        let (e, _) = v.handle_message(2, Message::Hide { viewer: 1 }, Millis(150));
        assert!(e.is_empty());
        let snap = SnapshotEntry {
            user: 2,
            name: Some("two".into()),
            loc: Some(at(52.53, 120)),
            hidden: false,
        };
        let e = v.handle_snapshot(vec![snap], Millis(150), true);
        assert!(e.is_empty(), "{e:?}");
        assert!(v
            .page(20, None)
            .expect("started")
            .expect("page")
            .0
            .entries
            .is_empty());
    }

    #[test]
    fn sharing_off_hides_until_the_next_location() {
        let mut v = started();
        v.handle_message(2, Message::Moved(at(52.53, 200)), Millis(200));
        let (e, _) = v.handle_message(2, Message::SharingOff, Millis(210));
        assert!(matches!(
            e[..],
            [Event::FriendGone {
                reason: GoneReason::Hidden,
                ..
            }]
        ));
        // An older snapshot location arriving late does not bring it back.
        let snap = SnapshotEntry {
            user: 2,
            name: None,
            loc: Some(at(52.53, 205)),
            hidden: false,
        };
        assert!(v.handle_snapshot(vec![snap], Millis(220), true).is_empty());
        let (e, _) = v.handle_message(2, Message::Moved(at(52.53, 300)), Millis(300));
        assert!(matches!(e[..], [Event::FriendEntered(_)]));
    }

    #[test]
    fn unfriending_and_expiry_give_gone_with_their_reasons() {
        let mut v = started();
        v.handle_message(2, Message::Moved(at(52.53, 200)), Millis(200));
        v.handle_message(3, Message::Moved(at(52.53, 5_000)), Millis(5_000));
        let (e, f) = v.handle_message(3, Message::Unfriended { viewer: 1 }, Millis(5_000));
        assert!(matches!(
            e[..],
            [Event::FriendGone {
                id: 3,
                reason: GoneReason::Unfriended
            }]
        ));
        assert_eq!(f, Some(FollowUp::Unsubscribe(3)));
        // Another viewer's unfriending on the same channel is not ours.
        let (e, f) = v.handle_message(2, Message::Unfriended { viewer: 8 }, Millis(5_000));
        assert!(e.is_empty() && f.is_none());
        let e = v.handle_tick(Millis(200 + 600_000));
        assert!(matches!(
            e[..],
            [Event::FriendGone {
                id: 2,
                reason: GoneReason::Inactive
            }]
        ));
    }
}
