//! Toy backends behind the real client service, with known faults.
//!
//! - [`Mode::Leaky`] pushes every update to every other online user, friend or not, in range or
//!   not.
//! - [`Mode::Correct`] keeps friends from the seed, latest locations and what each viewer sees,
//!   and pushes `FriendEntered` / `FriendMoved` / `FriendLeft` like the node does — optionally
//!   dropping every `n`-th push.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nearby_client::proto::{Coord, ErrorCode, Event, FriendList, FriendPosition, NearbyFriend, NearbyPage};
use nearby_index::geo::{LatLng, Millis, UserId};
use nearby_node::api::{Admission, Backend, Limits, LocationAck, ServiceError, SessionSink};
use nearby_node::queue::{CloseReason, EventQueue};
use nearby_raft::seed::Seed;
use nearby_raft::{Command, CommandResult};

#[derive(Clone, Copy, Debug)]
pub(crate) enum Mode {
    Leaky,
    Correct { drop_every: Option<u64> },
}

pub(crate) struct Toy {
    mode: Mode,
    radius_m: f64,
    /// Publisher → who may see it (friends and granted followers).
    audience: HashMap<UserId, HashSet<UserId>>,
    /// Viewer → publishers it may see.
    sees: HashMap<UserId, HashSet<UserId>>,
    state: Mutex<State>,
    next_session: AtomicU64,
    pushes: AtomicU64,
}

#[derive(Default)]
struct State {
    sessions: HashMap<UserId, SessionSink>,
    locations: HashMap<UserId, (LatLng, Millis)>,
    visible: HashMap<UserId, HashSet<UserId>>,
}

fn position(id: UserId, (loc, at): (LatLng, Millis), distance_m: f64) -> FriendPosition {
    FriendPosition {
        id,
        at: Coord {
            lat: loc.lat(),
            lon: loc.lon(),
        },
        distance_m,
        updated_at: at,
    }
}

impl Toy {
    pub(crate) fn new(mode: Mode, seed: &Seed) -> Arc<Toy> {
        let mut audience: HashMap<UserId, HashSet<UserId>> = HashMap::new();
        for &(a, b) in &seed.friendships {
            audience.entry(a).or_default().insert(b);
            audience.entry(b).or_default().insert(a);
        }
        for &(user, follower) in &seed.follows {
            audience.entry(user).or_default().insert(follower);
        }
        let mut sees: HashMap<UserId, HashSet<UserId>> = HashMap::new();
        for (&p, viewers) in &audience {
            for &v in viewers {
                sees.entry(v).or_default().insert(p);
            }
        }
        Arc::new(Toy {
            mode,
            radius_m: 8_000.0,
            audience,
            sees,
            state: Mutex::new(State::default()),
            next_session: AtomicU64::new(1),
            pushes: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self, sink: &SessionSink, event: Event) {
        let n = self.pushes.fetch_add(1, Ordering::Relaxed) + 1;
        if let Mode::Correct { drop_every: Some(k) } = self.mode {
            if n.is_multiple_of(k) {
                return;
            }
        }
        sink.events.push(event);
    }

    fn page(&self, s: &State, user: UserId) -> NearbyPage {
        let Some(&(me, _)) = s.locations.get(&user) else {
            return NearbyPage {
                friends: Vec::new(),
                next: None,
            };
        };
        let mut friends: Vec<NearbyFriend> = s
            .visible
            .get(&user)
            .into_iter()
            .flatten()
            .filter_map(|f| {
                let &(loc, at) = s.locations.get(f)?;
                Some(NearbyFriend {
                    id: *f,
                    relation: nearby_client::proto::Relation::Friend,
                    name: format!("user {f}"),
                    distance_m: me.distance_m(&loc),
                    updated_at: at,
                })
            })
            .collect();
        friends.sort_by(|a, b| a.distance_m.total_cmp(&b.distance_m));
        friends.truncate(100);
        NearbyPage { friends, next: None }
    }

    /// Stores `user`'s location and pushes what it changes.
    fn locate(&self, user: UserId, loc: LatLng, first: bool) -> NearbyPage {
        let mut s = self.lock();
        let now = Backend::now(self);
        let at = match s.locations.get(&user) {
            Some(&(_, prev)) if prev >= now => Millis(prev.0 + 1),
            _ => now,
        };
        s.locations.insert(user, (loc, at));
        match self.mode {
            Mode::Leaky => {
                for (&v, sink) in &s.sessions {
                    if v != user {
                        let d = s.locations.get(&v).map_or(0.0, |(l, _)| l.distance_m(&loc));
                        self.push(sink, Event::FriendMoved(position(user, (loc, at), d)));
                    }
                }
            }
            Mode::Correct { .. } => {
                // The user's audience hears of the move.
                let viewers: Vec<UserId> = self.audience.get(&user).into_iter().flatten().copied().collect();
                for v in viewers {
                    let (Some(&(vloc, _)), true) = (s.locations.get(&v), s.sessions.contains_key(&v)) else {
                        continue;
                    };
                    let d = vloc.distance_m(&loc);
                    let inside = d <= self.radius_m;
                    let shown = s.visible.entry(v).or_default();
                    let event = match (inside, shown.contains(&user)) {
                        (true, true) => Some(Event::FriendMoved(position(user, (loc, at), d))),
                        (true, false) => {
                            shown.insert(user);
                            Some(Event::FriendEntered(position(user, (loc, at), d)))
                        }
                        (false, true) => {
                            shown.remove(&user);
                            Some(Event::FriendLeft {
                                id: user,
                                distance_m: d,
                                updated_at: at,
                            })
                        }
                        (false, false) => None,
                    };
                    if let (Some(e), Some(sink)) = (event, s.sessions.get(&v)) {
                        self.push(sink, e);
                    }
                }
                // The user's own view follows its move.
                let publishers: Vec<UserId> = self.sees.get(&user).into_iter().flatten().copied().collect();
                let mut events = Vec::new();
                for p in publishers {
                    let Some(&(ploc, pat)) = s.locations.get(&p) else {
                        continue;
                    };
                    let d = loc.distance_m(&ploc);
                    let inside = d <= self.radius_m;
                    let shown = s.visible.entry(user).or_default();
                    match (inside, shown.contains(&p)) {
                        (true, false) => {
                            shown.insert(p);
                            events.push(Event::FriendEntered(position(p, (ploc, pat), d)));
                        }
                        (false, true) => {
                            shown.remove(&p);
                            events.push(Event::FriendLeft {
                                id: p,
                                distance_m: d,
                                updated_at: pat,
                            });
                        }
                        _ => {}
                    }
                }
                if !first {
                    if let Some(sink) = s.sessions.get(&user) {
                        for e in events {
                            self.push(sink, e);
                        }
                    }
                }
            }
        }
        self.page(&s, user)
    }
}

impl Backend for Toy {
    fn now(&self) -> Millis {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Millis(ms)
    }

    fn limits(&self) -> Limits {
        Limits {
            radius_m: self.radius_m,
            ttl_s: 600,
            page_size: 20,
        }
    }

    async fn ensure_registered(&self, _user: UserId) -> Result<(), ServiceError> {
        Ok(())
    }

    async fn open_session(&self, user: UserId) -> Result<Admission, ServiceError> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let sink = SessionSink::new(id, Arc::new(EventQueue::new(1024)));
        self.lock().sessions.insert(user, sink.clone());
        Ok(Admission::Open(sink))
    }

    async fn close_session(&self, user: UserId, sink: SessionSink) {
        let mut s = self.lock();
        if s.sessions.get(&user).is_some_and(|cur| cur.id() == sink.id()) {
            s.sessions.remove(&user);
            s.visible.remove(&user);
        }
    }

    async fn has_location(&self, user: UserId) -> bool {
        self.lock().locations.contains_key(&user)
    }

    async fn update_location(
        &self,
        user: UserId,
        at: Coord,
        first: bool,
    ) -> Result<LocationAck, ServiceError> {
        let loc = LatLng::new(at.lat, at.lon)
            .map_err(|e| ServiceError::new(ErrorCode::InvalidCoordinates, e.to_string()))?;
        let page = self.locate(user, loc, first);
        Ok(if first {
            LocationAck::Started {
                page,
                next_update_s: 30,
            }
        } else {
            LocationAck::Located { next_update_s: 30 }
        })
    }

    async fn list(
        &self,
        user: UserId,
        _cursor: Option<String>,
        _page_size: Option<u16>,
    ) -> Result<NearbyPage, ServiceError> {
        let s = self.lock();
        Ok(self.page(&s, user))
    }

    async fn read_history(
        &self,
        _user: UserId,
        _since: Millis,
        _until: Millis,
        _limit: usize,
    ) -> Result<nearby_client::proto::HistoryPage, ServiceError> {
        Err(ServiceError::new(
            ErrorCode::InvalidArgument,
            "the toy keeps no history",
        ))
    }

    async fn delete_history(&self, _user: UserId) -> Result<(), ServiceError> {
        Err(ServiceError::new(
            ErrorCode::InvalidArgument,
            "the toy keeps no history",
        ))
    }

    async fn strangers(
        &self,
        _user: UserId,
        _page_size: Option<u16>,
    ) -> Result<nearby_client::proto::StrangerPage, ServiceError> {
        Err(ServiceError::new(
            ErrorCode::InvalidArgument,
            "the toy has no strangers",
        ))
    }

    async fn friends(
        &self,
        _user: UserId,
        _after: Option<UserId>,
        _limit: usize,
    ) -> Result<FriendList, ServiceError> {
        Ok(FriendList {
            entries: Vec::new(),
            sharing: true,
            discoverable: false,
            ghost_until: None,
            history: false,
            next: None,
        })
    }

    async fn commit(&self, _cmd: Command) -> Result<CommandResult, ServiceError> {
        Err(ServiceError::new(
            ErrorCode::Unavailable,
            "the toy backend changes nothing",
        ))
    }

    async fn set_radius(&self, _user: UserId, _meters: u32) -> Result<(), ServiceError> {
        Ok(())
    }

    fn tick(&self) {}

    fn close_all(&self, reason: CloseReason) {
        for sink in self.lock().sessions.values() {
            sink.events.close(reason.clone());
        }
    }
}
