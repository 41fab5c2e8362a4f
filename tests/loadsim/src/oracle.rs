//! The correctness oracle: given everything that was sent and everything that was received, and
//! who may see whom, it counts **leaks** (an event that showed a location to someone who must not
//! see it, or outside the radius) and **misses** (an allowed, online, in-range friend that did not
//! hear of an update within the deadline).
//!
//! Pure: no clock, no I/O, no randomness. Times are microseconds on the load generator's clock
//! ([`Micros`] since the run started); the server's own timestamps (`updated_at`) are never
//! compared with them, only with each other. Updates are matched to events by the position they
//! carry (a [`crate::world::Mover`] never repeats a position), not by time.
//!
//! # What the server can know
//!
//! The server stores an update somewhere between its send time and the arrival of its
//! acknowledgement. So when the oracle asks "where was the viewer when the server handled the
//! sender's update", the answer is a *set*: every viewer update that may have been the latest one
//! stored at some instant of a window — sent before the window ends, and not superseded by a later
//! viewer update acknowledged before the window starts. Updates with no answer (lost connection)
//! may or may not have been stored. Updates the server refused were not — but the SDK sends its
//! last location again when it resumes a session, so a refused one may be stored later: it is a
//! candidate when judging what a viewer was shown, never when deciding what it must be shown.
//!
//! # Definitions
//!
//! With `R` the radius and `tol` the tolerance (a share of `R`, 1 % by default):
//!
//! - **Leak** — an event received by viewer `V` about sender `S` where
//!   - `V` may not see `S` (not a friend nor a granted follower, `S` shares nothing, or `S` hides
//!     from `V`) — for every event that carries a position, a distance or a page entry; or
//!   - it carries a position `S` never sent (or one older than the TTL); or
//!   - it carries a position (`FriendEntered`/`FriendMoved`) farther than `R·(1+tol)` from every
//!     position `V` may have had between the send of that position and the receipt; or
//!   - it is a page entry whose distance exceeds `R·(1+tol)`.
//! - **Expected delivery** — a pair (update `j` of `S`, acknowledged; viewer `V`) where `V` may
//!   see `S`, `V`'s session had started (first location acknowledged) before `j` was sent, `V` was
//!   connected from `j`'s send to the deadline, and every position `V` may have had while the
//!   server handled `j` (between `j`'s send and its acknowledgement) is within `R·(1−tol)` of `j`.
//!   Pairs in the band `R·(1±tol)` are "don't care": neither expected nor a leak.
//! - **Miss** — an expected delivery for which `V` received, within `deadline` (2 s) of `j`'s
//!   send, no `FriendEntered`/`FriendMoved` carrying update `j` or a later update of `S` (a newer
//!   position supersedes an older one, as the node's queue does), nor a `FriendLeft` stamped at
//!   or after `j`'s stamp. The **miss rate** is misses / expected deliveries.
//! - **Latency** — for each `FriendMoved` (and each `FriendEntered` not possibly caused by the
//!   viewer's own move) carrying update `j`: receipt − send of `j`.
//!
//! # Changes during the run
//!
//! With relation and privacy churn ([`Truth::changes`]), who may see whom changes while events
//! flow. Between a change's send and its acknowledgement the server may apply it at any instant,
//! so the oracle judges only what is certain:
//!
//! - an event about `S` at viewer `V` is a **leak** (`NotAllowed`) if a change *by `S`* that
//!   forbids `V` to see `S` was acknowledged to `S` before the event arrived, and no change
//!   allowing it again was sent before the event arrived — the product's promise: once a change
//!   that ends visibility is acknowledged to its author, nothing more about the author reaches
//!   that viewer;
//!   When the servers stamp positions with this machine's clock ([`Truth::t0_unix_ms`]), an
//!   event whose position the server processed *before* the acknowledgement was already on its
//!   way (in a QUIC stream, in the viewer's socket buffer, in a starved client's queue): it is
//!   counted apart ([`Verdict::in_flight_after_ack`]), not as a leak. Only an event carrying a
//!   position processed after the acknowledgement is certainly one the server should not have
//!   sent. An old position re-sent after the acknowledgement (a stale copy kept somewhere) is
//!   told apart by its age: one that arrives more than [`IN_FLIGHT_MAX_US`] after its stamp
//!   was not on its way, and is a leak. The count and its latest arrival are reported so a
//!   growth is seen.
//! - a pair touched by any change (in either direction, by either user) is judged for leaks only
//!   by that rule (and the position rules), never for misses: whether a delivery was owed while
//!   permissions moved is not certain.
//!
//! # Strangers
//!
//! A stranger event (`StrangerNearby`, or an entry of a `ListStrangers` page) names no user: the
//! driver maps its per-viewer pseudonym back to the user with the cluster's pseudonym key (an
//! unknown pseudonym — one made for another viewer, say — is an `UnknownSender` leak). It is a
//! **leak** if
//! - the stranger was not visible to strangers when it arrived: not discoverable, hidden from
//!   everyone before the run, or by a change of [`Scope::Everyone`] acknowledged before (with
//!   the same "on its way already" exception as above);
//! - the stranger hides from this viewer (before the run, or by an acknowledged change of
//!   [`Scope::Viewers`]): a hidden friend must not turn up as a stranger either;
//! - its distance is not a whole number of 500 m steps (finer than the product promises), or
//!   more than the radius (plus the tolerance) from every position the viewer may have had
//!   while the stranger was at any position the server may have held at the event's stamp.
//!
//! A friend or followed user shown as a stranger (the product never repeats them) is counted
//! apart ([`Verdict::friends_as_strangers`]). Stranger events are never expected: the live page
//! is the nearest few, so none is owed to a given viewer.

use std::collections::HashMap;

use hdrhistogram::Histogram;
use nearby_client::proto::Coord;
use nearby_index::geo::{LatLng, Millis, UserId};
use serde::{Deserialize, Serialize};

/// Microseconds since the run started, on the load generator's clock.
pub type Micros = u64;

/// The longest an event may take from the server to the reader and still count as on its way
/// ([`Verdict::in_flight_after_ack`]), µs: twice the 5 s a position may wait in a node's queue.
pub const IN_FLIGHT_MAX_US: Micros = 10_000_000;

/// What became of one update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Outcome {
    /// The server acknowledged it at this time.
    Acked(Micros),
    /// The server refused it (an error response): it was not stored.
    Refused(Micros),
    /// No answer (connection lost, timeout): it may or may not have been stored.
    Unknown,
}

/// Whether a refused update may be what the node holds. A refusal stored nothing, but the SDK
/// sends its last location again when it resumes a session, whatever the answer to it was: a
/// refused update can be stored later. What a viewer was shown is judged with it (no false
/// leak); what a viewer must be shown, without it (no false expectation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refused {
    /// It may be held.
    MayBeHeld,
    /// It is not.
    NotHeld,
}

/// One location update a participant sent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SentUpdate {
    /// When it was sent.
    pub sent: Micros,
    /// The position sent.
    pub pos: Coord,
    /// What became of it.
    pub outcome: Outcome,
}

/// A position event's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PositionKind {
    /// `FriendEntered`.
    Entered,
    /// `FriendMoved`.
    Moved,
}

/// What a received event showed about its sender.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Seen {
    /// `FriendEntered` / `FriendMoved`: a position.
    Position {
        /// Which event.
        kind: PositionKind,
        /// The position carried.
        at: Coord,
        /// The server's stamp.
        updated_at: Millis,
    },
    /// `FriendLeft`: a distance, no position.
    Left {
        /// The server's stamp.
        updated_at: Millis,
    },
    /// `FriendGone`: visibility ended; shows nothing.
    Gone,
    /// An entry of a first page (or a resumed page): a distance.
    PageEntry {
        /// The distance the server computed.
        distance_m: f64,
    },
    /// A stranger (`StrangerNearby`, or an entry of a strangers page), its pseudonym mapped back
    /// to the user: a coarse distance and a stamp, nothing else.
    Stranger {
        /// The distance shown, metres (a whole number of steps).
        distance_m: u32,
        /// The server's stamp.
        updated_at: Millis,
    },
}

/// One received event about one sender.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Received {
    /// When it arrived.
    pub at: Micros,
    /// The sender it is about.
    pub from: UserId,
    /// What it showed.
    pub seen: Seen,
}

/// Everything the oracle judges. Participants (online users) are numbered `0..ids.len()`.
#[derive(Clone, Debug, Default)]
pub struct Truth {
    /// Participant → user id.
    pub ids: Vec<UserId>,
    /// Participant `S` → participants allowed to see `S` (ascending), after the privacy settings
    /// that were actually applied.
    pub audience: Vec<Vec<u32>>,
    /// Participant `S` → participants who are friends of `S` or follow it by the world (whatever
    /// the settings): the node never shows `S` to them as a stranger.
    pub related: Vec<Vec<u32>>,
    /// Participant → whether strangers may see it by the settings applied before the run
    /// (discoverable, and not hidden from everyone).
    pub strangers: Vec<bool>,
    /// Participant → updates, in send order.
    pub sent: Vec<Vec<SentUpdate>>,
    /// Participant (viewer) → events received, in receipt order.
    pub received: Vec<Vec<Received>>,
    /// Participant → intervals `[from, to)` without a working session (reconnects, and from the
    /// close on).
    pub outages: Vec<Vec<(Micros, Micros)>>,
    /// Participant → the SDK's waits between reconnection attempts, `[from, to)`: what part of
    /// an outage the client spent in its own backoff.
    pub backoffs: Vec<Vec<(Micros, Micros)>>,
    /// Relation and privacy changes made during the run, in send order.
    pub changes: Vec<Change>,
    /// The wall clock (UNIX ms) at time 0 of the run, when the nodes' stamps share this
    /// machine's clock: events can then be told apart by when the server processed the
    /// position they carry (see the module doc). `None` judges by arrival alone.
    pub t0_unix_ms: Option<u64>,
}

/// One change of who may see whom, made during the run.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The participant whose visibility changes (the publisher).
    pub sender: u32,
    /// The participants (viewers) it concerns.
    pub viewers: Vec<u32>,
    /// Whether they may see the sender after it.
    pub allowed: bool,
    /// Whether the sender is its author: only a change the publisher made and had acknowledged
    /// promises that nothing more reaches the viewers (a change by the viewer, such as an
    /// unfriending, hides the publisher only once the publisher's own record carries it).
    pub by_sender: bool,
    /// What else it changes: whether the viewers (or everyone) may meet the sender as a stranger.
    pub scope: Scope,
    /// When the (first) request was sent.
    pub sent: Micros,
    /// When its (last) acknowledgement arrived; `None` if it was not acknowledged.
    pub acked: Option<Micros>,
}

/// How far a [`Change`] reaches beyond the friends' view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Hiding from the viewers: they may not see the sender at all, as a stranger neither.
    Viewers,
    /// Sharing off (or ghost mode): nobody may see the sender, strangers included.
    Everyone,
    /// The friendship itself: once it ends the viewers may meet the sender as a stranger.
    Relation,
}

/// The oracle's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OracleConfig {
    /// Search radius, metres.
    pub radius_m: f64,
    /// Half-width of the "don't care" band, as a share of the radius.
    pub tolerance: f64,
    /// How long a delivery may take.
    pub deadline_us: Micros,
    /// A position older than this (plus the deadline) must not be shown.
    pub ttl_us: Micros,
    /// A user whose deliveries (as viewer or sender) are also counted apart
    /// ([`Verdict::focus`]): the world's hub.
    pub focus: Option<UserId>,
}

impl Default for OracleConfig {
    /// 8 km, ±1 %, 2 s, 10 min.
    fn default() -> Self {
        OracleConfig {
            radius_m: 8_000.0,
            tolerance: 0.01,
            deadline_us: 2_000_000,
            ttl_us: 600_000_000,
            focus: None,
        }
    }
}

/// Why an event is a leak.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeakReason {
    /// The viewer may not see the sender.
    NotAllowed {
        /// When a change by the sender forbidding it was acknowledged; `None` if the settings
        /// made before the run never allowed it.
        since_us: Option<Micros>,
        /// What the event showed.
        event: Shown,
        /// For a position: when the sender sent the update it carries (the latest one at that
        /// position), so a leak can be told from an event that was on its way before the change.
        update_sent_us: Option<Micros>,
    },
    /// The position was outside the radius of every position the viewer may have had.
    OutOfRange {
        /// The smallest distance to a candidate viewer position (or the page's distance).
        distance_m: f64,
    },
    /// A position the sender never sent.
    UnknownPosition,
    /// A sender who is not in the run.
    UnknownSender,
    /// A position older than the TTL.
    Expired,
    /// A stranger shown while strangers may not see it.
    Undiscoverable {
        /// When a change by the stranger hiding it from everyone was acknowledged; `None` if
        /// the settings made before the run never let strangers see it.
        since_us: Option<Micros>,
    },
    /// A stranger's distance finer than the step (or zero).
    FinerThanStep {
        /// The distance shown.
        distance_m: u32,
    },
}

/// What a leaked event showed of the sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shown {
    /// A position (`FriendEntered` / `FriendMoved`).
    Position,
    /// A `FriendLeft`.
    Left,
    /// An entry of a page.
    PageEntry,
    /// A stranger entry or event.
    Stranger,
}

/// One leak, for the report.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Leak {
    /// Who saw.
    pub viewer: UserId,
    /// Whom.
    pub sender: UserId,
    /// When it arrived.
    pub at_us: Micros,
    /// Why it is a leak.
    pub reason: LeakReason,
}

/// One missed delivery, for the report.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Miss {
    /// Who should have heard.
    pub viewer: UserId,
    /// Of whom.
    pub sender: UserId,
    /// When the update was sent.
    pub sent_us: Micros,
    /// The update's index among the sender's updates.
    pub seq: usize,
}

/// Counts for one time window (or the whole run).
#[derive(Clone, Debug)]
pub struct Tally {
    /// Leaks received in the window.
    pub leaks: u64,
    /// Expected deliveries of updates sent in the window.
    pub expected: u64,
    /// Of which missed.
    pub missed: u64,
    /// Update → push latency (µs) of updates sent in the window.
    pub latency_us: Histogram<u64>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            leaks: 0,
            expected: 0,
            missed: 0,
            latency_us: latency_histogram(),
        }
    }
}

impl Tally {
    /// Misses / expected deliveries (0 when nothing was expected).
    pub fn miss_rate(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            self.missed as f64 / self.expected as f64
        }
    }

    fn add(&mut self, other: &Tally) {
        self.leaks += other.leaks;
        self.expected += other.expected;
        self.missed += other.missed;
        // Same bounds on both sides: cannot fail.
        let _ = self.latency_us.add(&other.latency_us);
    }
}

/// A histogram of microseconds from 1 µs to 1 hour, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    #[allow(clippy::expect_used)] // constant, valid bounds
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// The oracle's judgement.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    /// One tally per window asked for.
    pub windows: Vec<Tally>,
    /// The whole run.
    pub total: Tally,
    /// The first leaks found (at most [`Verdict::SAMPLES`]).
    pub leak_samples: Vec<Leak>,
    /// The first misses found (at most [`Verdict::SAMPLES`]).
    pub miss_samples: Vec<Miss>,
    /// Events that arrived after a forbidding change was acknowledged but carry a position the
    /// server processed before that acknowledgement (on their way already), and the latest of
    /// them after the acknowledgement, µs. Not leaks; see the module doc.
    pub in_flight_after_ack: (u64, Micros),
    /// Stranger events (and page entries) judged.
    pub strangers_seen: u64,
    /// Friends or followed users shown as strangers (not leaks: they may see each other; the
    /// product promises not to repeat them).
    pub friends_as_strangers: u64,
    /// The deliveries to and from [`OracleConfig::focus`] (all of them also in `total`).
    pub focus: Tally,
}

impl Verdict {
    /// How many leaks and misses are kept as examples.
    pub const SAMPLES: usize = 20;
}

/// Judges `truth` (see the module doc). `windows` are half-open `[from, to)` intervals: updates
/// count in the window of their send time, leaks in the window of their receipt.
pub fn judge(truth: &Truth, config: &OracleConfig, windows: &[(Micros, Micros)]) -> Verdict {
    Judge::new(truth, config).run(windows)
}

/// A viewer's events about one sender: (receipt, resolved update, what).
type PairEvents = Vec<(Micros, Option<u32>, Seen)>;

struct Judge<'a> {
    truth: &'a Truth,
    config: &'a OracleConfig,
    index: HashMap<UserId, u32>,
    /// Sender → its changes of [`Scope::Everyone`], in send order.
    everyone: HashMap<u32, Vec<&'a Change>>,
    /// (sender, viewer) → changes of that pair, in send order.
    changes: HashMap<(u32, u32), Vec<&'a Change>>,
    /// (sender, lat bits, lon bits) → the sender's updates with that position.
    positions: HashMap<(u32, u64, u64), Vec<u32>>,
    started: Vec<Option<Micros>>,
}

fn latlng(c: Coord) -> Option<LatLng> {
    LatLng::new(c.lat, c.lon).ok()
}

fn distance(a: Coord, b: Coord) -> f64 {
    match (latlng(a), latlng(b)) {
        (Some(a), Some(b)) => a.distance_m(&b),
        _ => f64::INFINITY,
    }
}

fn window_of(windows: &[(Micros, Micros)], t: Micros) -> Option<usize> {
    windows.iter().position(|&(a, b)| a <= t && t < b)
}

impl<'a> Judge<'a> {
    fn new(truth: &'a Truth, config: &'a OracleConfig) -> Self {
        let index = truth
            .ids
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, i as u32))
            .collect();
        let mut positions: HashMap<(u32, u64, u64), Vec<u32>> = HashMap::new();
        for (s, ups) in truth.sent.iter().enumerate() {
            for (j, u) in ups.iter().enumerate() {
                positions
                    .entry((s as u32, u.pos.lat.to_bits(), u.pos.lon.to_bits()))
                    .or_default()
                    .push(j as u32);
            }
        }
        let started = truth
            .sent
            .iter()
            .map(|ups| {
                ups.iter().find_map(|u| match u.outcome {
                    Outcome::Acked(at) => Some(at),
                    _ => None,
                })
            })
            .collect();
        let mut changes: HashMap<(u32, u32), Vec<&Change>> = HashMap::new();
        for c in &truth.changes {
            for &v in &c.viewers {
                changes.entry((c.sender, v)).or_default().push(c);
            }
        }
        let mut everyone: HashMap<u32, Vec<&Change>> = HashMap::new();
        for c in truth
            .changes
            .iter()
            .filter(|c| c.scope == Scope::Everyone && c.by_sender)
        {
            everyone.entry(c.sender).or_default().push(c);
        }
        for list in changes.values_mut().chain(everyone.values_mut()) {
            list.sort_by_key(|c| c.sent);
        }
        Judge {
            truth,
            config,
            index,
            everyone,
            changes,
            positions,
            started,
        }
    }

    /// Whether `viewer` may see `sender` by the settings made before the run.
    fn allowed(&self, viewer: u32, sender: u32) -> bool {
        self.truth
            .audience
            .get(sender as usize)
            .is_some_and(|a| a.binary_search(&viewer).is_ok())
    }

    /// Whether the pair's permission changed during the run (in either direction).
    fn churned(&self, viewer: u32, sender: u32) -> bool {
        self.changes.contains_key(&(sender, viewer)) || self.changes.contains_key(&(viewer, sender))
    }

    /// Whether an event about `sender` arriving at `viewer` at `t` breaks a permission: by the
    /// settings before the run if the pair never changed, else by the changes' rule (see the
    /// module doc).
    fn forbidden(&self, viewer: u32, sender: u32, t: Micros) -> bool {
        self.forbidden_since(viewer, sender, t).is_some()
    }

    /// Like [`Self::forbidden`], saying since when: `Some(None)` if the settings before the run
    /// never allowed it, `Some(Some(a))` if a change by the sender acknowledged at `a` forbids it.
    fn forbidden_since(&self, viewer: u32, sender: u32, t: Micros) -> Option<Option<Micros>> {
        let Some(list) = self.changes.get(&(sender, viewer)) else {
            return (!self.churned(viewer, sender) && !self.allowed(viewer, sender)).then_some(None);
        };
        let mut since = None;
        for c in list.iter().take_while(|c| c.sent < t) {
            if c.allowed {
                since = None;
            } else if let Some(a) = c.acked.filter(|a| c.by_sender && *a < t) {
                since = Some(a);
            }
        }
        since.map(Some)
    }

    /// When strangers may not see `sender` at `t`: `Some(None)` by the settings before the run,
    /// `Some(Some(a))` by a change of [`Scope::Everyone`] acknowledged at `a`.
    fn undiscoverable_since(&self, sender: u32, t: Micros) -> Option<Option<Micros>> {
        if !self
            .truth
            .strangers
            .get(sender as usize)
            .copied()
            .unwrap_or(false)
        {
            return Some(None);
        }
        let mut since = None;
        for c in self
            .everyone
            .get(&sender)
            .into_iter()
            .flatten()
            .take_while(|c| c.sent < t)
        {
            if c.allowed {
                since = None;
            } else if let Some(a) = c.acked.filter(|a| *a < t) {
                since = Some(a);
            }
        }
        since.map(Some)
    }

    /// Whether `viewer` is a friend or follower of `sender` by the world.
    fn related(&self, viewer: u32, sender: u32) -> bool {
        self.truth
            .related
            .get(sender as usize)
            .is_some_and(|r| r.binary_search(&viewer).is_ok())
    }

    /// Whether an event about `sender` stamped `stamp` was on its way before `ack` (see the
    /// module doc): processed before it, and not older on arrival than [`IN_FLIGHT_MAX_US`].
    /// Counts it if so.
    fn in_flight(&self, verdict: &mut Verdict, ack: Option<Micros>, stamp: Millis, at: Micros) -> bool {
        let (Some(ack), Some(t0)) = (ack, self.truth.t0_unix_ms) else {
            return false;
        };
        let stamped_us = stamp.0.saturating_sub(t0).saturating_mul(1_000);
        if stamped_us >= ack || at.saturating_sub(stamped_us) > IN_FLIGHT_MAX_US {
            return false;
        }
        verdict.in_flight_after_ack.0 += 1;
        verdict.in_flight_after_ack.1 = verdict.in_flight_after_ack.1.max(at.saturating_sub(ack));
        true
    }

    /// Judges one stranger event (see the module doc's "Strangers").
    fn stranger(&self, verdict: &mut Verdict, v: u32, s: u32, r: &Received) -> Option<LeakReason> {
        let Seen::Stranger {
            distance_m,
            updated_at,
        } = r.seen
        else {
            return None;
        };
        verdict.strangers_seen += 1;
        if v == s {
            return Some(LeakReason::NotAllowed {
                since_us: None,
                event: Shown::Stranger,
                update_sent_us: None,
            });
        }
        if let Some(since_us) = self.undiscoverable_since(s, r.at) {
            if !self.in_flight(verdict, since_us, updated_at, r.at) {
                return Some(LeakReason::Undiscoverable { since_us });
            }
            return None;
        }
        // Friends and followers: a hidden one must not turn up as a stranger.
        match self.changes.get(&(s, v)) {
            Some(list) => {
                let latest = list.iter().take_while(|c| c.sent < r.at).last();
                if let Some(c) = latest {
                    let acked = c.acked.filter(|a| *a < r.at);
                    if c.scope == Scope::Viewers
                        && !c.allowed
                        && c.by_sender
                        && acked.is_some()
                        && !self.in_flight(verdict, acked, updated_at, r.at)
                    {
                        return Some(LeakReason::NotAllowed {
                            since_us: acked,
                            event: Shown::Stranger,
                            update_sent_us: None,
                        });
                    }
                }
            }
            None if self.related(v, s) => {
                if self.allowed(v, s) {
                    verdict.friends_as_strangers += 1;
                } else {
                    return Some(LeakReason::NotAllowed {
                        since_us: None,
                        event: Shown::Stranger,
                        update_sent_us: None,
                    });
                }
            }
            None => {}
        }
        let step = nearby_client::proto::STRANGER_STEP_M;
        if distance_m == 0 || distance_m % step != 0 {
            return Some(LeakReason::FinerThanStep { distance_m });
        }
        let far = self.config.radius_m * (1.0 + self.config.tolerance);
        if f64::from(distance_m) > far + f64::from(step) {
            return Some(LeakReason::OutOfRange {
                distance_m: f64::from(distance_m),
            });
        }
        // Where the stranger may have been: at the stamp if the server shares this clock, else
        // anywhere within the TTL.
        let (from, to) = match self.truth.t0_unix_ms {
            Some(t0) => {
                let stamped = updated_at.0.saturating_sub(t0).saturating_mul(1_000);
                (
                    stamped.saturating_sub(1_000),
                    stamped.saturating_add(1_000).min(r.at),
                )
            }
            None => (r.at.saturating_sub(self.config.ttl_us), r.at),
        };
        let mut any = false;
        let mut fresh = false;
        let mut closest = f64::INFINITY;
        for u in self.held(s, from, to, Refused::MayBeHeld) {
            any = true;
            fresh |= r.at.saturating_sub(u.sent) <= self.config.ttl_us + self.config.deadline_us;
            let d = self
                .candidates(v, u.sent, r.at, Refused::MayBeHeld)
                .map(|c| distance(c, u.pos))
                .fold(f64::INFINITY, f64::min);
            closest = closest.min(d);
        }
        if !any {
            Some(LeakReason::UnknownPosition)
        } else if !fresh {
            Some(LeakReason::Expired)
        } else if closest > far {
            Some(LeakReason::OutOfRange { distance_m: closest })
        } else {
            None
        }
    }

    /// The latest update of `sender` at `pos` sent no later than `by`.
    fn resolve(&self, sender: u32, pos: Coord, by: Micros) -> Option<u32> {
        let seqs = self
            .positions
            .get(&(sender, pos.lat.to_bits(), pos.lon.to_bits()))?;
        let sent = &self.truth.sent[sender as usize];
        seqs.iter().rev().copied().find(|&j| sent[j as usize].sent <= by)
    }

    /// Positions `viewer` may have had stored at some instant of `[from, to]` (see the module
    /// doc), refused updates included when judging what was shown ([`Refused::MayBeHeld`]).
    fn candidates(
        &self,
        viewer: u32,
        from: Micros,
        to: Micros,
        refused: Refused,
    ) -> impl Iterator<Item = Coord> + '_ {
        self.held(viewer, from, to, refused).map(|u| u.pos)
    }

    /// The updates of participant `p` that may have been its latest stored one at some instant
    /// of `[from, to]`: sent by `to`, not superseded by a later update acknowledged before
    /// `from`, and not refused unless `refused` says they may be held.
    fn held(
        &self,
        p: u32,
        from: Micros,
        to: Micros,
        refused: Refused,
    ) -> impl Iterator<Item = &SentUpdate> + '_ {
        let sent = &self.truth.sent[p as usize];
        let end = sent.partition_point(|u| u.sent <= to);
        let mut start = end;
        while start > 0 {
            start -= 1;
            if matches!(sent[start].outcome, Outcome::Acked(at) if at < from) {
                break;
            }
        }
        sent[start..end]
            .iter()
            .filter(move |u| refused == Refused::MayBeHeld || !matches!(u.outcome, Outcome::Refused(_)))
    }

    fn in_outage(&self, viewer: u32, from: Micros, to: Micros) -> bool {
        self.truth
            .outages
            .get(viewer as usize)
            .is_some_and(|o| o.iter().any(|&(a, b)| a <= to && from < b))
    }

    fn run(&self, windows: &[(Micros, Micros)]) -> Verdict {
        let mut verdict = Verdict {
            windows: vec![Tally::default(); windows.len()],
            ..Verdict::default()
        };
        let mut rest = Tally::default();
        let far = self.config.radius_m * (1.0 + self.config.tolerance);
        let near = self.config.radius_m * (1.0 - self.config.tolerance);

        // Pass 1: every event — leaks, latencies, and the per-pair index for pass 2.
        let mut pairs: Vec<HashMap<u32, PairEvents>> = vec![HashMap::new(); self.truth.ids.len()];
        let mut stamps: HashMap<(u32, u32), Millis> = HashMap::new();
        for (v, events) in self.truth.received.iter().enumerate() {
            let v = v as u32;
            for r in events {
                let leak = |reason| Leak {
                    viewer: self.truth.ids[v as usize],
                    sender: r.from,
                    at_us: r.at,
                    reason,
                };
                let mut found: Option<Leak> = None;
                let Some(&s) = self.index.get(&r.from) else {
                    if !matches!(r.seen, Seen::Gone) {
                        found = Some(leak(LeakReason::UnknownSender));
                    }
                    self.count_leak(&mut verdict, &mut rest, windows, found);
                    continue;
                };
                if matches!(r.seen, Seen::Stranger { .. }) {
                    let found = self.stranger(&mut verdict, v, s, r).map(leak);
                    self.count_leak(&mut verdict, &mut rest, windows, found);
                    continue;
                }
                let mut seq = None;
                match r.seen {
                    Seen::Gone | Seen::Stranger { .. } => {}
                    _ if self.forbidden(v, s, r.at) => {
                        let event = match r.seen {
                            Seen::Position { .. } => Shown::Position,
                            Seen::Left { .. } => Shown::Left,
                            _ => Shown::PageEntry,
                        };
                        let since_us = self.forbidden_since(v, s, r.at).flatten();
                        let stamp = match r.seen {
                            Seen::Position { updated_at, .. } | Seen::Left { updated_at } => Some(updated_at),
                            _ => None,
                        };
                        if stamp.is_some_and(|st| self.in_flight(&mut verdict, since_us, st, r.at)) {
                            continue;
                        }
                        let update_sent_us = match r.seen {
                            Seen::Position { at, .. } => self
                                .resolve(s, at, r.at)
                                .map(|j| self.truth.sent[s as usize][j as usize].sent),
                            _ => None,
                        };
                        found = Some(leak(LeakReason::NotAllowed {
                            since_us,
                            event,
                            update_sent_us,
                        }));
                    }
                    Seen::Left { .. } => {}
                    Seen::PageEntry { distance_m } => {
                        if self.truth.sent[s as usize].first().is_none_or(|u| u.sent > r.at) {
                            found = Some(leak(LeakReason::UnknownPosition));
                        } else if distance_m > far {
                            found = Some(leak(LeakReason::OutOfRange { distance_m }));
                        }
                    }
                    Seen::Position { kind, at, updated_at } => match self.resolve(s, at, r.at) {
                        None => found = Some(leak(LeakReason::UnknownPosition)),
                        Some(j) => {
                            seq = Some(j);
                            stamps.entry((s, j)).or_insert(updated_at);
                            let u = self.truth.sent[s as usize][j as usize];
                            let closest = self
                                .candidates(v, u.sent, r.at, Refused::MayBeHeld)
                                .map(|c| distance(c, at))
                                .fold(f64::INFINITY, f64::min);
                            if r.at.saturating_sub(u.sent) > self.config.ttl_us + self.config.deadline_us {
                                found = Some(leak(LeakReason::Expired));
                            } else if closest > far {
                                found = Some(leak(LeakReason::OutOfRange { distance_m: closest }));
                            } else {
                                let own_move = kind == PositionKind::Entered
                                    && self.truth.sent[v as usize]
                                        .iter()
                                        .any(|m| m.sent >= u.sent && m.sent <= r.at);
                                if !own_move {
                                    let lat = r.at.saturating_sub(u.sent).max(1);
                                    let t = match window_of(windows, u.sent) {
                                        Some(w) => &mut verdict.windows[w],
                                        None => &mut rest,
                                    };
                                    t.latency_us.saturating_record(lat);
                                }
                            }
                        }
                    },
                }
                if !matches!(r.seen, Seen::PageEntry { .. }) {
                    pairs[v as usize].entry(s).or_default().push((r.at, seq, r.seen));
                }
                self.count_leak(&mut verdict, &mut rest, windows, found);
            }
        }

        // Pass 2: every acknowledged update against every allowed viewer.
        let focus = self
            .config
            .focus
            .and_then(|f| self.truth.ids.iter().position(|&id| id == f))
            .map(|i| i as u32);
        for (s, ups) in self.truth.sent.iter().enumerate() {
            let s = s as u32;
            let audience = self.truth.audience.get(s as usize).map_or(&[][..], Vec::as_slice);
            for (j, u) in ups.iter().enumerate() {
                let Outcome::Acked(acked) = u.outcome else {
                    continue;
                };
                let deadline = u.sent + self.config.deadline_us;
                for &v in audience {
                    if v == s || self.started[v as usize].is_none_or(|t| t >= u.sent) || self.churned(v, s) {
                        continue;
                    }
                    if self.in_outage(v, u.sent, deadline) {
                        continue;
                    }
                    let mut any = false;
                    let all_near = self.candidates(v, u.sent, acked, Refused::NotHeld).all(|c| {
                        any = true;
                        distance(c, u.pos) <= near
                    });
                    if !(any && all_near) {
                        continue;
                    }
                    let stamp = stamps.get(&(s, j as u32)).copied();
                    let delivered = pairs[v as usize].get(&s).is_some_and(|evs| {
                        let from = evs.partition_point(|e| e.0 < u.sent);
                        evs[from..]
                            .iter()
                            .take_while(|e| e.0 <= deadline)
                            .any(|&(_, seq, seen)| match seen {
                                Seen::Position { .. } => seq.is_some_and(|q| q as usize >= j),
                                Seen::Left { updated_at } => stamp.is_none_or(|st| updated_at >= st),
                                _ => false,
                            })
                    });
                    let t = match window_of(windows, u.sent) {
                        Some(w) => &mut verdict.windows[w],
                        None => &mut rest,
                    };
                    t.expected += 1;
                    let focused = focus.is_some_and(|f| f == v || f == s);
                    if focused {
                        verdict.focus.expected += 1;
                        verdict.focus.missed += u64::from(!delivered);
                    }
                    if !delivered {
                        t.missed += 1;
                        if verdict.miss_samples.len() < Verdict::SAMPLES {
                            verdict.miss_samples.push(Miss {
                                viewer: self.truth.ids[v as usize],
                                sender: self.truth.ids[s as usize],
                                sent_us: u.sent,
                                seq: j,
                            });
                        }
                    }
                }
            }
        }
        let mut total = rest;
        for w in &verdict.windows {
            total.add(w);
        }
        verdict.total = total;
        verdict
    }

    fn count_leak(
        &self,
        verdict: &mut Verdict,
        rest: &mut Tally,
        windows: &[(Micros, Micros)],
        found: Option<Leak>,
    ) {
        let Some(leak) = found else { return };
        if self
            .config
            .focus
            .is_some_and(|f| f == leak.viewer || f == leak.sender)
        {
            verdict.focus.leaks += 1;
        }
        match window_of(windows, leak.at_us) {
            Some(w) => verdict.windows[w].leaks += 1,
            None => rest.leaks += 1,
        }
        if verdict.leak_samples.len() < Verdict::SAMPLES {
            verdict.leak_samples.push(leak);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: UserId = 10;
    const B: UserId = 20;
    const C: UserId = 30;

    fn at(lat: f64) -> Coord {
        Coord { lat, lon: 13.4 }
    }

    /// 0.01° of latitude ≈ 1.11 km.
    fn sent(t: Micros, lat: f64) -> SentUpdate {
        SentUpdate {
            sent: t,
            pos: at(lat),
            outcome: Outcome::Acked(t + 1_000),
        }
    }

    fn moved(t: Micros, from: UserId, lat: f64) -> Received {
        Received {
            at: t,
            from,
            seen: Seen::Position {
                kind: PositionKind::Moved,
                at: at(lat),
                updated_at: Millis(t / 1000),
            },
        }
    }

    /// A and B are friends; C is a stranger. A and B start close together.
    fn truth() -> Truth {
        Truth {
            ids: vec![A, B, C],
            audience: vec![vec![1], vec![0], vec![]],
            related: vec![vec![1], vec![0], vec![]],
            strangers: vec![false; 3],
            sent: vec![
                vec![sent(0, 52.50), sent(3_000_000, 52.51)],
                vec![sent(500, 52.52)],
                vec![sent(200_000, 52.52)],
            ],
            received: vec![vec![], vec![], vec![]],
            outages: vec![vec![], vec![], vec![]],
            backoffs: vec![vec![], vec![], vec![]],
            changes: Vec::new(),
            t0_unix_ms: None,
        }
    }

    fn judge1(t: &Truth) -> Verdict {
        judge(t, &OracleConfig::default(), &[(0, 10_000_000)])
    }

    #[test]
    fn an_update_nobody_hears_is_a_miss_and_one_heard_in_time_is_not() {
        let mut t = truth();
        // A's second update is expected at B (B started at 1.5 ms, 1.1 km away); B's only update
        // came before A had started.
        let v = judge1(&t);
        assert_eq!((v.total.expected, v.total.missed, v.total.leaks), (1, 1, 0));
        t.received[1].push(moved(3_004_000, A, 52.51));
        let v = judge1(&t);
        assert_eq!((v.total.expected, v.total.missed, v.total.leaks), (1, 0, 0));
        assert!((3_990..=4_010).contains(&v.total.latency_us.max())); // 3 significant digits
                                                                      // Too late is a miss.
        t.received[1][0].at = 5_100_000;
        assert_eq!(judge1(&t).total.missed, 1);
    }

    #[test]
    fn a_focused_user_has_its_deliveries_counted_apart() {
        let t = truth();
        let config = |focus| OracleConfig {
            focus,
            ..OracleConfig::default()
        };
        // A's update expected at B: counted for A (the sender) and for B (the viewer), not C.
        for (who, expected) in [(A, 1), (B, 1), (C, 0)] {
            let v = judge(&t, &config(Some(who)), &[(0, 10_000_000)]);
            assert_eq!((v.focus.expected, v.focus.missed), (expected, expected), "{who}");
            assert_eq!(v.total.expected, 1);
        }
    }

    #[test]
    fn with_server_stamps_an_event_processed_before_the_acknowledgement_is_in_flight_not_a_leak() {
        let mut t = truth();
        t.t0_unix_ms = Some(1_000_000);
        t.changes.push(Change {
            sender: 0,
            viewers: vec![1],
            allowed: false,
            by_sender: true,
            scope: Scope::Viewers,
            sent: 3_100_000,
            acked: Some(3_200_000),
        });
        // Arrives after the acknowledgement, stamped by the server at 3.05 s: on its way already.
        let mut late = moved(3_400_000, A, 52.51);
        if let Seen::Position { updated_at, .. } = &mut late.seen {
            *updated_at = Millis(1_000_000 + 3_050);
        }
        t.received[1].push(late);
        let v = judge1(&t);
        assert_eq!((v.total.leaks, v.in_flight_after_ack), (0, (1, 200_000)), "{v:?}");
        // Stamped at 3.3 s, after the acknowledgement: the server sent it after its promise.
        let mut leak = moved(3_500_000, A, 52.51);
        if let Seen::Position { updated_at, .. } = &mut leak.seen {
            *updated_at = Millis(1_000_000 + 3_300);
        }
        t.received[1].push(leak);
        let v = judge1(&t);
        assert_eq!((v.total.leaks, v.in_flight_after_ack.0), (1, 1), "{v:?}");
        // Stamped before it, but arriving 11 s after its stamp: an old copy re-sent, not one on
        // its way (the fault run's stale mirror).
        let mut old = moved(14_100_000, A, 52.51);
        if let Seen::Position { updated_at, .. } = &mut old.seen {
            *updated_at = Millis(1_000_000 + 3_050);
        }
        t.received[1].push(old);
        let v = judge1(&t);
        assert_eq!((v.total.leaks, v.in_flight_after_ack.0), (2, 1), "{v:?}");
    }

    #[test]
    fn after_a_change_by_the_sender_is_acknowledged_an_event_is_a_leak_until_it_is_undone() {
        let mut t = truth();
        // A hides from B at 3.1 s (acknowledged at 3.2 s) and unhides at 3.6 s.
        t.changes.push(Change {
            sender: 0,
            viewers: vec![1],
            allowed: false,
            by_sender: true,
            scope: Scope::Viewers,
            sent: 3_100_000,
            acked: Some(3_200_000),
        });
        t.changes.push(Change {
            sender: 0,
            viewers: vec![1],
            allowed: true,
            by_sender: true,
            scope: Scope::Viewers,
            sent: 3_600_000,
            acked: Some(3_700_000),
        });
        // Before the acknowledgement: the server may not have applied it yet.
        t.received[1].push(moved(3_150_000, A, 52.51));
        assert_eq!(judge1(&t).total.leaks, 0);
        // After it, until the unhide was sent: a leak.
        t.received[1].push(moved(3_300_000, A, 52.51));
        let v = judge1(&t);
        assert_eq!(v.total.leaks, 1, "{v:?}");
        assert!(matches!(v.leak_samples[0].reason, LeakReason::NotAllowed { .. }));
        // After the unhide was sent: allowed again.
        t.received[1].push(moved(3_650_000, A, 52.51));
        assert_eq!(judge1(&t).total.leaks, 1);
        // The churned pair owes no delivery: A's update at 3 s is not counted as expected.
        assert_eq!(judge1(&t).total.expected, 0);
        // A change by the viewer promises nothing about the sender.
        let mut t = truth();
        t.changes.push(Change {
            sender: 0,
            viewers: vec![1],
            allowed: false,
            by_sender: false,
            scope: Scope::Relation,
            sent: 3_100_000,
            acked: Some(3_200_000),
        });
        t.received[1].push(moved(3_300_000, A, 52.51));
        assert_eq!(judge1(&t).total.leaks, 0);
    }

    #[test]
    fn a_stranger_or_a_position_out_of_range_is_a_leak() {
        let mut t = truth();
        t.received[2].push(moved(3_004_000, A, 52.51));
        let v = judge1(&t);
        assert_eq!(v.total.leaks, 1);
        assert!(matches!(v.leak_samples[0].reason, LeakReason::NotAllowed { .. }));

        let mut t = truth();
        t.sent[0].push(sent(4_000_000, 52.70)); // 20 km north of B
        t.received[1].push(moved(4_002_000, A, 52.70));
        let v = judge1(&t);
        assert!(
            matches!(v.leak_samples[0].reason, LeakReason::OutOfRange { .. }),
            "{v:?}"
        );

        let mut t = truth();
        t.received[1].push(moved(4_002_000, A, 1.0));
        assert_eq!(judge1(&t).leak_samples[0].reason, LeakReason::UnknownPosition);
    }

    #[test]
    fn the_tolerance_band_is_neither_expected_nor_a_leak() {
        let mut t = truth();
        // 8,000 m from B's 52.52: Δlat = 8000 / 111195 ≈ 0.071946°.
        let edge = 52.52 - 8_000.0 / 111_195.08;
        t.sent[0][1].pos = at(edge);
        let v = judge1(&t);
        assert_eq!(v.total.expected, 0);
        t.received[1].push(moved(3_004_000, A, edge));
        assert_eq!(judge1(&t).total.leaks, 0);
    }

    #[test]
    fn a_newer_position_supersedes_and_a_viewer_who_moved_is_judged_by_any_possible_position() {
        let mut t = truth();
        t.sent[0].push(sent(3_500_000, 52.505));
        // Only the newer position arrives, within 2 s of the older one.
        t.received[1].push(moved(3_600_000, A, 52.505));
        let v = judge1(&t);
        assert_eq!((v.total.expected, v.total.missed), (2, 0));

        // B moves far away; an event computed against B's old position before the move was
        // acknowledged is not a leak.
        let mut t = truth();
        t.sent[1].push(SentUpdate {
            sent: 3_001_000,
            pos: at(53.5),
            outcome: Outcome::Acked(3_010_000),
        });
        t.received[1].push(moved(3_020_000, A, 52.51));
        assert_eq!(judge1(&t).total.leaks, 0);
    }

    #[test]
    fn a_refused_location_the_sdk_sends_again_on_resume_may_be_what_the_node_judges_by() {
        let mut t = truth();
        // The viewer moved 20 km north; the node refused that update, but the SDK sent it again
        // when the session resumed, and the node judged A's next position by it.
        t.sent[1].push(SentUpdate {
            sent: 2_000_000,
            pos: at(52.70),
            outcome: Outcome::Refused(2_001_000),
        });
        t.sent[0].push(sent(4_000_000, 52.69));
        t.received[1].push(moved(4_002_000, A, 52.69));
        assert_eq!(judge1(&t).total.leaks, 0);
        // Far from anywhere the viewer was, it is a leak still.
        t.sent[0].push(sent(4_100_000, 52.30));
        t.received[1].push(moved(4_102_000, A, 52.30));
        let v = judge1(&t);
        assert_eq!(v.total.leaks, 1);
        assert!(
            matches!(v.leak_samples[0].reason, LeakReason::OutOfRange { .. }),
            "{v:?}"
        );
    }

    #[test]
    fn viewers_not_started_or_disconnected_expect_nothing() {
        let mut t = truth();
        t.outages[1].push((2_000_000, u64::MAX));
        assert_eq!(judge1(&t).total.expected, 0);
        let mut t = truth();
        t.sent[1][0].outcome = Outcome::Refused(100_100);
        assert_eq!(judge1(&t).total.expected, 0);
    }

    fn stranger(t: Micros, from: UserId, distance_m: u32) -> Received {
        Received {
            at: t,
            from,
            seen: Seen::Stranger {
                distance_m,
                updated_at: Millis(t / 1000),
            },
        }
    }

    fn reasons(t: &Truth) -> Vec<LeakReason> {
        judge1(t).leak_samples.iter().map(|l| l.reason).collect()
    }

    #[test]
    fn a_discoverable_stranger_in_range_in_whole_steps_is_no_leak_and_anything_else_is() {
        // C (at 52.52) is discoverable; B (at 52.52) listens; 0 m apart reads as 500 m.
        let mut t = truth();
        t.strangers[2] = true;
        t.received[1].push(stranger(3_000_000, C, 500));
        let v = judge1(&t);
        assert_eq!(
            (v.total.leaks, v.strangers_seen, v.friends_as_strangers),
            (0, 1, 0)
        );

        // Not discoverable.
        t.strangers[2] = false;
        assert_eq!(reasons(&t), vec![LeakReason::Undiscoverable { since_us: None }]);
        t.strangers[2] = true;

        // Finer than the step.
        t.received[1][0] = stranger(3_000_000, C, 730);
        assert_eq!(reasons(&t), vec![LeakReason::FinerThanStep { distance_m: 730 }]);

        // Farther than the radius from anywhere the viewer was, where the server's stamp says
        // the stranger was (the node shares this clock).
        t.t0_unix_ms = Some(0);
        t.sent[2].push(sent(3_500_000, 52.80)); // ~31 km north
        t.received[1][0] = stranger(3_600_000, C, 8_000);
        assert!(
            matches!(reasons(&t)[..], [LeakReason::OutOfRange { .. }]),
            "{:?}",
            reasons(&t)
        );

        // A pseudonym that maps to no participant.
        let mut t = truth();
        t.received[1].push(stranger(3_000_000, 0, 500));
        assert_eq!(reasons(&t), vec![LeakReason::UnknownSender]);
    }

    #[test]
    fn a_stranger_gone_from_everyone_or_hiding_from_the_viewer_is_a_leak_a_former_friend_is_not() {
        // C hides from everyone (sharing off) at 3.1 s, acknowledged at 3.2 s.
        let mut t = truth();
        t.strangers[2] = true;
        t.changes.push(Change {
            sender: 2,
            viewers: vec![],
            allowed: false,
            by_sender: true,
            scope: Scope::Everyone,
            sent: 3_100_000,
            acked: Some(3_200_000),
        });
        t.received[1].push(stranger(3_150_000, C, 500)); // before the acknowledgement
        assert_eq!(judge1(&t).total.leaks, 0);
        t.received[1].push(stranger(3_300_000, C, 500));
        assert_eq!(
            reasons(&t),
            vec![LeakReason::Undiscoverable {
                since_us: Some(3_200_000)
            }]
        );

        // A friend shown as a stranger: counted, not a leak; hidden from that friend: a leak.
        let mut t = truth();
        t.strangers = vec![true; 3];
        t.received[1].push(stranger(3_000_000, A, 2_000));
        let v = judge1(&t);
        assert_eq!((v.total.leaks, v.friends_as_strangers), (0, 1));
        t.audience[0].clear(); // A hides from B before the run
        assert!(matches!(
            reasons(&t)[..],
            [LeakReason::NotAllowed {
                event: Shown::Stranger,
                ..
            }]
        ));

        // A unfriends B (acknowledged at 3.2 s): B may meet A as a stranger afterwards; had A
        // hidden from B instead, it would be a leak.
        for (scope, leaks) in [(Scope::Relation, 0), (Scope::Viewers, 1)] {
            let mut t = truth();
            t.strangers = vec![true; 3];
            t.changes.push(Change {
                sender: 0,
                viewers: vec![1],
                allowed: false,
                by_sender: true,
                scope,
                sent: 3_100_000,
                acked: Some(3_200_000),
            });
            t.received[1].push(stranger(3_300_000, A, 2_000));
            assert_eq!(judge1(&t).total.leaks, leaks, "{scope:?}");
        }
    }
}
