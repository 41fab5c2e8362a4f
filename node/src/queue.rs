//! The bounded event queue between the node and one session's event stream.
//!
//! A slow client must cost bounded memory and must not stall the node. When the queue is full, a
//! new friend position *supersedes* a queued one for the same friend (only the newest position
//! matters); failing that, the oldest queued position is dropped. Events that end or change
//! visibility (left, gone) and requests are never dropped; if the queue is full of those, the
//! session is closed with an explicit reason ([`CloseReason::Slow`]) rather than growing without
//! bound.
//!
//! A `FriendGone` (a `StrangerGone`) purges every event about that friend (that stranger) still
//! queued before it goes in: when a change that ends a viewer's permission is acknowledged to its
//! author, nothing about the author may still be on its way to that viewer from this node. The
//! queue also remembers whom its last revocations were about, for the pages the session's task
//! writes after the driver made them ([`EventQueue::revoked_since`]).
//!
//! What the connection already holds cannot be purged: bytes written to QUIC before a revocation
//! may still be in flight, or waiting for a retransmission to a client on a bad network. A writer
//! that can tell when its client has acknowledged them (the batched driver, which
//! [attaches](EventQueue::attach)) confirms each revocation once it has ([`EventQueue::fenced`]),
//! and the acknowledgement of the change that caused it waits for that ([`Fences`]); such a
//! writer closes a connection that does not acknowledge within a bound. With a writer that cannot
//! tell (quinn's task per connection), a fence is passed at once.
//!
//! A fence reaches only the sessions of the node whose driver processes the revocation. The
//! sessions of a group's *previous* leader — deposed, or cut off and not yet aware of it — still
//! hold what that leader let out, and a new leader may acknowledge a revocation as soon as it
//! runs. So a queue also carries the [`DeliveryLease`] of the driver that pushed to it: the
//! writer stops writing events shortly after the lease ends and closes a connection still
//! holding unacknowledged bytes soon after ([`DELIVERY_BOUND`]); a new leader holds its
//! acknowledgements for longer than that after it starts.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nearby_client::proto::Event;
use tokio::sync::Notify;

/// Until when what a group's driver let out may still reach clients: the driver's read lease
/// (see `group::lease`), shared with the writers of the sessions it pushes to. Extended by every
/// confirmed lease round, cut short when the driver stops.
#[derive(Debug, Default)]
pub struct DeliveryLease {
    /// Microseconds since [`epoch`] (0: never confirmed).
    until_us: AtomicU64,
}

/// How long after its lease ends a session's writer may still write events it holds: the lease
/// is checked when the driver lets an event out, and a busy writer reaches it a little later.
pub const WRITE_AFTER_LEASE: Duration = Duration::from_secs(1);

/// How long after its lease ends a session's connection must have nothing unacknowledged, or be
/// closed: a new leader of the group holds the acknowledgements of revocations for longer than
/// this after it starts (`group::driver::VIEWER_HOLD`), and starts no earlier than the lease's
/// end.
pub const DELIVERY_BOUND: Duration = Duration::from_secs(2);

/// The process's reference point for the instants a [`DeliveryLease`] holds.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// An instant on the clock leases are kept in (microseconds since the process's [`epoch`]):
/// read once per turn by a writer that asks its leases many times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LeaseClock(u64);

impl LeaseClock {
    /// `at` on the leases' clock.
    pub fn at(at: Instant) -> LeaseClock {
        LeaseClock(DeliveryLease::micros(at))
    }

    /// This instant as an [`Instant`].
    pub fn instant(self) -> Instant {
        epoch() + Duration::from_micros(self.0)
    }

    /// `after` later.
    pub fn after(self, after: Duration) -> LeaseClock {
        LeaseClock(self.0.saturating_add(after.as_micros() as u64))
    }
}

impl DeliveryLease {
    fn micros(at: Instant) -> u64 {
        // An instant before the epoch is long past: 1 keeps it apart from "never".
        (at.saturating_duration_since(epoch()).as_micros() as u64).max(1)
    }

    /// A quorum round confirmed the driver's leadership until `until`.
    pub fn extend(&self, until: Instant) {
        self.until_us.fetch_max(Self::micros(until), Ordering::AcqRel);
    }

    /// The driver stops serving at `now` (it stopped, or found it no longer leads).
    pub fn end(&self, now: Instant) {
        self.until_us.fetch_min(Self::micros(now), Ordering::AcqRel);
    }

    /// Until when the driver's output may be delivered; `None` before its first confirmation.
    pub fn until(&self) -> Option<Instant> {
        self.ends().map(LeaseClock::instant)
    }

    /// [`until`](Self::until) on the leases' clock.
    pub fn ends(&self) -> Option<LeaseClock> {
        match self.until_us.load(Ordering::Acquire) {
            0 => None,
            us => Some(LeaseClock(us)),
        }
    }

    /// Whether the lease ended at least `after` before `now` (never, before its first
    /// confirmation). What the writers ask on every turn: one load, no clock arithmetic.
    pub fn passed(&self, now: LeaseClock, after: Duration) -> bool {
        self.ends().is_some_and(|end| now >= end.after(after))
    }
}

/// Why a session's queue was closed: what its event writer tells the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The session itself ended (the client left, or its connection failed).
    SessionEnded,
    /// The node is shutting down: reconnect, anywhere, after a pause.
    Shutdown,
    /// The user's home group is served by another node now: reconnect there (if known).
    Moved {
        /// The client address of the node to use, if known.
        to: Option<String>,
    },
    /// The client read too slowly: its queue filled with events that may not be dropped.
    Slow,
    /// The layer behind the service failed for this session.
    Failed(String),
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::SessionEnded => f.write_str("session ended"),
            CloseReason::Shutdown => f.write_str("node shutting down"),
            CloseReason::Moved { to: Some(to) } => write!(f, "moved to {to}"),
            CloseReason::Moved { to: None } => f.write_str("moved"),
            CloseReason::Slow => f.write_str("event queue overflow: the client reads too slowly"),
            CloseReason::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// Events queued for one session.
pub struct EventQueue {
    state: Mutex<State>,
    notify: Notify,
    /// Woken (all waiters) when the queue closes.
    on_close: Notify,
    capacity: usize,
    /// Where a driver that serves many sessions hears of this one (see [`Doorbell`]).
    bell: OnceLock<(Arc<Doorbell>, u64)>,
    /// Whether the bell was rung and the driver has not looked since.
    rung: AtomicBool,
    /// How many revocations reached the queue (mirrors the state's count, for the writer).
    revocations: AtomicU64,
    /// The revocations whose bytes written before them the client has acknowledged (see
    /// [`EventQueue::fenced`]); `u64::MAX` once nothing more will be written.
    fenced: AtomicU64,
    /// Whether the writer confirms fences (see the module doc).
    fencing: AtomicBool,
    /// Woken (all waiters) when `fenced` moves.
    on_fenced: Notify,
}

/// The sessions whose queues have something new, for a driver that serves many of them from
/// one task: a queue rings once (its key joins the list) until the driver looks at it again, so
/// a burst of events for thousands of sessions costs the driver one wake-up.
#[derive(Default)]
pub struct Doorbell {
    ready: Mutex<Vec<u64>>,
    notify: Notify,
}

impl Doorbell {
    /// Moves the keys of the queues that rang into `into`.
    pub fn take(&self, into: &mut Vec<u64>) {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        into.append(&mut ready);
    }

    /// Resolves when a queue rings (at once if one rang since the last wait).
    pub async fn rung(&self) {
        self.notify.notified().await;
    }

    fn ring(&self, key: u64) {
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).push(key);
        self.notify.notify_one();
    }
}

struct State {
    events: VecDeque<Event>,
    closed: Option<CloseReason>,
    superseded: u64,
    /// The last [`REVOKED_KEPT`] revocations that reached the queue, oldest first.
    revoked: VecDeque<Revoked>,
    /// How many revocations ever reached the queue.
    revocations: u64,
    /// The lease of the driver that pushed last (see [`DeliveryLease`]).
    lease: Option<Arc<DeliveryLease>>,
}

/// How many revocations a queue remembers for the answers in flight (see
/// [`EventQueue::revoked_since`]); a request is in flight for milliseconds.
const REVOKED_KEPT: usize = 256;

/// Whom a revocation that reached a session was about: what a page answered to the session after
/// it may no longer show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Revoked {
    /// A friend or followed user.
    User(u64),
    /// A stranger, by pseudonym.
    Stranger(String),
}

impl Revoked {
    fn of(who: Subject<'_>) -> Self {
        match who {
            Subject::User(u) => Revoked::User(u),
            Subject::Stranger(p) => Revoked::Stranger(p.to_owned()),
        }
    }
}

impl State {
    /// A revocation about `who` reached the queue: what is queued about where `who` is goes,
    /// and pages answered from now on forget `who` too. Returns how many revocations reached it.
    fn revoke(&mut self, who: Subject<'_>) -> u64 {
        let before = self.events.len();
        self.events.retain(|e| !is_about_location_of(e, who));
        self.superseded += (before - self.events.len()) as u64;
        if self.revoked.len() == REVOKED_KEPT {
            self.revoked.pop_front();
        }
        self.revoked.push_back(Revoked::of(who));
        self.revocations += 1;
        self.revocations
    }
}

/// What [`EventQueue::pop`] yields.
#[derive(Debug, PartialEq)]
pub enum Popped {
    /// The next event.
    Event(Event),
    /// The queue is closed, for this reason.
    Closed(CloseReason),
}

/// Whom an event is about: a friend (by id) or a stranger (by pseudonym).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject<'a> {
    /// A friend or followed user.
    User(u64),
    /// A stranger, by the pseudonym the viewer knows them by.
    Stranger(&'a str),
}

fn subject(e: &Event) -> Option<Subject<'_>> {
    e.friend()
        .map(Subject::User)
        .or_else(|| e.stranger().map(Subject::Stranger))
}

/// A position only: droppable, and replaceable by a newer one about the same subject.
fn is_position(e: &Event) -> bool {
    matches!(e, Event::FriendMoved(_) | Event::StrangerNearby(_))
}

/// Whether `e` tells where `who` is or whether they are shown.
fn is_about_location_of(e: &Event, who: Subject<'_>) -> bool {
    matches!(
        e,
        Event::FriendMoved(_)
            | Event::FriendEntered(_)
            | Event::FriendLeft { .. }
            | Event::FriendGone { .. }
            | Event::StrangerNearby(_)
            | Event::StrangerGone { .. }
    ) && subject(e) == Some(who)
}

impl EventQueue {
    /// A queue holding at most `capacity` events.
    pub fn new(capacity: usize) -> Self {
        EventQueue {
            state: Mutex::new(State {
                events: VecDeque::new(),
                closed: None,
                superseded: 0,
                revoked: VecDeque::new(),
                revocations: 0,
                lease: None,
            }),
            notify: Notify::new(),
            on_close: Notify::new(),
            capacity: capacity.max(1),
            bell: OnceLock::new(),
            rung: AtomicBool::new(false),
            revocations: AtomicU64::new(0),
            fenced: AtomicU64::new(0),
            fencing: AtomicBool::new(false),
            on_fenced: Notify::new(),
        }
    }

    /// Rings `bell` with `key` whenever an event, a revocation or the close arrives (once until
    /// [`EventQueue::try_pop`] is called again); rings at once if something is waiting already.
    /// The driver behind the bell confirms revocations ([`EventQueue::fenced`]) from now on.
    pub fn attach(&self, bell: Arc<Doorbell>, key: u64) {
        if self.bell.set((bell, key)).is_ok() {
            // Revocations before this (none: a session attaches when it authenticates) were
            // before anything was written.
            self.fenced
                .fetch_max(self.revocations.load(Ordering::Acquire), Ordering::AcqRel);
            self.fencing.store(true, Ordering::Release);
            let waiting = {
                let s = self.lock();
                s.closed.is_some() || !s.events.is_empty()
            };
            if waiting {
                self.wake();
            }
        }
    }

    /// Wakes the reader: a task waiting in [`EventQueue::pop`], or the attached driver.
    fn wake(&self) {
        self.notify.notify_one();
        if let Some((bell, key)) = self.bell.get() {
            if !self.rung.swap(true, Ordering::AcqRel) {
                bell.ring(*key);
            }
        }
    }

    /// The next event or the close, if there is one now. Re-arms the bell first: whatever
    /// arrives after this call rings it again.
    pub fn try_pop(&self) -> Option<Popped> {
        self.rung.store(false, Ordering::Release);
        let mut s = self.lock();
        if let Some(reason) = &s.closed {
            return Some(Popped::Closed(reason.clone()));
        }
        s.events.pop_front().map(Popped::Event)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `event`; never blocks.
    pub fn push(&self, event: Event) {
        self.push_inner(event, None);
    }

    /// Queues `event`, let out by a driver under `lease` (see [`DeliveryLease`]).
    pub fn push_under(&self, event: Event, lease: &Arc<DeliveryLease>) {
        self.push_inner(event, Some(lease));
    }

    /// The lease of the driver that pushed last, if it is not `have` (the writer's check on
    /// every wake: no clone of an `Arc` it already holds; `None` asks for it whatever it is).
    pub fn lease_if_not(&self, have: Option<&Arc<DeliveryLease>>) -> Option<Arc<DeliveryLease>> {
        let s = self.lock();
        match (&s.lease, have) {
            (Some(l), Some(h)) if Arc::ptr_eq(l, h) => None,
            (l, _) => l.clone(),
        }
    }

    fn push_inner(&self, event: Event, lease: Option<&Arc<DeliveryLease>>) {
        let mut s = self.lock();
        if s.closed.is_some() {
            return;
        }
        if let Some(l) = lease {
            if !s.lease.as_ref().is_some_and(|have| Arc::ptr_eq(have, l)) {
                s.lease = Some(Arc::clone(l));
            }
        }
        if matches!(event, Event::FriendGone { .. } | Event::StrangerGone { .. }) {
            if let Some(who) = subject(&event) {
                let n = s.revoke(who);
                self.revocations.store(n, Ordering::Release);
            }
        }
        if s.events.len() >= self.capacity {
            // Only the friend's *latest* queued event may be replaced, and only if it is a
            // position: replacing an earlier one would move the new position ahead of a later
            // "left" or "gone".
            let who = subject(&event);
            let same = s
                .events
                .iter()
                .rposition(|e| subject(e) == who)
                .filter(|&i| is_position(&s.events[i]) && is_position(&event));
            if let Some(i) = same {
                s.events[i] = event;
                s.superseded += 1;
                drop(s);
                self.wake();
                return;
            }
            match s.events.iter().position(is_position) {
                Some(i) => {
                    s.events.remove(i);
                    s.superseded += 1;
                }
                None => {
                    s.closed = Some(CloseReason::Slow);
                    s.events.clear();
                    drop(s);
                    self.wake();
                    self.on_close.notify_waiters();
                    return;
                }
            }
        }
        s.events.push_back(event);
        drop(s);
        self.wake();
    }

    /// Drops every queued event about where `who` is or whether they are shown, and remembers
    /// the revocation for the pages in flight and the writer's fence.
    pub fn purge(&self, who: Subject<'_>) {
        let n = self.lock().revoke(who);
        self.revocations.store(n, Ordering::Release);
        if self.fencing.load(Ordering::Acquire) {
            self.wake();
        }
    }

    /// The fence of the latest revocation, if the writer has not confirmed it yet: passed once
    /// everything written to the session's connection before it is acknowledged (see the module
    /// doc).
    pub fn fence(self: &Arc<Self>) -> Option<Fence> {
        if !self.fencing.load(Ordering::Acquire) {
            return None;
        }
        let mark = self.revocations.load(Ordering::Acquire);
        let fence = Fence {
            queue: Arc::clone(self),
            mark,
        };
        (!fence.passed()).then_some(fence)
    }

    /// For the writer: how many revocations reached the queue so far (cheap; no lock).
    pub fn revocations_seen(&self) -> u64 {
        self.revocations.load(Ordering::Acquire)
    }

    /// For the writer: the client has acknowledged everything written before the first `mark`
    /// revocations (`u64::MAX`: nothing more will be written — the connection is closed).
    pub fn fenced(&self, mark: u64) {
        if self.fenced.fetch_max(mark, Ordering::AcqRel) < mark {
            self.on_fenced.notify_waiters();
        }
    }

    /// A mark for [`EventQueue::revoked_since`]: how many revocations reached the queue so far.
    pub fn revocations(&self) -> u64 {
        self.lock().revocations
    }

    /// Whom the revocations that reached the queue since `mark` were about; `None` if more came
    /// than the queue remembers.
    ///
    /// A page is made by the group's driver and written by the session's task: a revocation
    /// processed between the two (its author's acknowledgement may leave right after) must
    /// reach the page too, as it reaches the queued events.
    pub fn revoked_since(&self, mark: u64) -> Option<Vec<Revoked>> {
        let s = self.lock();
        let n = usize::try_from(s.revocations.saturating_sub(mark)).ok()?;
        (n <= s.revoked.len()).then(|| s.revoked.iter().skip(s.revoked.len() - n).cloned().collect())
    }

    /// Closes the queue: the reader gets `reason` next, whatever is still queued.
    pub fn close(&self, reason: CloseReason) {
        let mut s = self.lock();
        s.closed.get_or_insert(reason);
        drop(s);
        self.wake();
        self.on_close.notify_waiters();
    }

    /// Resolves once the queue is closed (at once if it is): a writer stuck on a client that
    /// stopped reading learns of the close without waiting for its write.
    pub async fn closed(&self) {
        loop {
            // Created before the check: `notify_waiters` reaches it from here on.
            let woken = self.on_close.notified();
            if self.is_closed() {
                return;
            }
            woken.await;
        }
    }

    /// Waits for the next event, or the close.
    pub async fn pop(&self) -> Popped {
        loop {
            let notified = self.notify.notified();
            {
                let mut s = self.lock();
                if let Some(reason) = &s.closed {
                    return Popped::Closed(reason.clone());
                }
                if let Some(e) = s.events.pop_front() {
                    return Popped::Event(e);
                }
            }
            notified.await;
        }
    }

    /// Whether the queue is closed.
    pub fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// Positions dropped or replaced because the reader was slow, or purged by a `FriendGone`.
    pub fn superseded(&self) -> u64 {
        self.lock().superseded
    }
}

/// One session's revocation, until its writer confirms that what it wrote before is acknowledged
/// (see [`EventQueue::fence`]).
pub struct Fence {
    queue: Arc<EventQueue>,
    mark: u64,
}

impl Fence {
    /// Whether the writer has confirmed it.
    pub fn passed(&self) -> bool {
        self.queue.fenced.load(Ordering::Acquire) >= self.mark
    }

    /// Resolves once the writer has confirmed it.
    pub async fn wait(&self) {
        loop {
            // Created before the check: `notify_waiters` reaches it from here on.
            let woken = self.queue.on_fenced.notified();
            if self.passed() {
                return;
            }
            woken.await;
        }
    }
}

/// The fences of the revocations a group's driver has let out and not yet acknowledged to their
/// authors: an acknowledgement that leaves waits for every fence before it.
#[derive(Default)]
pub struct Fences(Vec<Fence>);

/// Fences kept before the passed ones are swept out.
const FENCES_SWEEP: usize = 64;

impl Fences {
    /// Adds `fence`.
    pub fn add(&mut self, fence: Fence) {
        if self.0.len() >= FENCES_SWEEP {
            self.0.retain(|f| !f.passed());
        }
        self.0.push(fence);
    }

    /// Takes the fences not passed yet; `None` if every one is.
    pub fn take_pending(&mut self) -> Option<Fences> {
        self.0.retain(|f| !f.passed());
        (!self.0.is_empty()).then(|| Fences(std::mem::take(&mut self.0)))
    }

    /// Resolves once every fence is passed.
    pub async fn passed(self) {
        for f in &self.0 {
            f.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearby_client::proto::{Coord, FriendPosition, GoneReason};
    use nearby_index::geo::Millis;
    use std::sync::Arc;

    fn moved(id: u64, t: u64) -> Event {
        Event::FriendMoved(FriendPosition {
            id,
            at: Coord { lat: 0.0, lon: 0.0 },
            distance_m: 1.0,
            updated_at: Millis(t),
        })
    }

    #[test]
    fn revocations_since_a_mark_are_remembered_for_pages_in_flight() {
        let q = EventQueue::new(8);
        let mark = q.revocations();
        assert_eq!(q.revoked_since(mark), Some(vec![]));
        q.purge(Subject::User(7));
        q.push(Event::StrangerGone {
            pseudonym: "p".into(),
        });
        q.push(moved(1, 1)); // not a revocation
        assert_eq!(
            q.revoked_since(mark),
            Some(vec![Revoked::User(7), Revoked::Stranger("p".into())])
        );
        let later = q.revocations();
        q.push(Event::FriendGone {
            id: 9,
            reason: GoneReason::Hidden,
        });
        assert_eq!(q.revoked_since(later), Some(vec![Revoked::User(9)]));
        // More than the queue remembers: the caller cannot know whom, and must not guess.
        for u in 0..REVOKED_KEPT as u64 {
            q.purge(Subject::User(100 + u));
        }
        assert_eq!(q.revoked_since(mark), None);
        assert_eq!(
            q.revoked_since(q.revocations() - 1),
            Some(vec![Revoked::User(99 + REVOKED_KEPT as u64)])
        );
    }

    #[tokio::test]
    async fn a_full_queue_supersedes_positions_and_keeps_visibility_events() {
        let q = EventQueue::new(3);
        q.push(moved(1, 1));
        q.push(Event::FriendGone {
            id: 2,
            reason: GoneReason::Hidden,
        });
        q.push(moved(3, 1));
        q.push(moved(1, 2)); // replaces friend 1's queued position
        q.push(moved(4, 1)); // drops the oldest position (friend 1)
        assert_eq!(q.superseded(), 2);
        let mut got = Vec::new();
        for _ in 0..3 {
            match q.pop().await {
                Popped::Event(e) => got.push(e),
                Popped::Closed(r) => panic!("closed: {r}"),
            }
        }
        assert!(matches!(got[0], Event::FriendGone { id: 2, .. }));
        assert_eq!(got[1], moved(3, 1));
        assert_eq!(got[2], moved(4, 1));
    }

    #[tokio::test]
    async fn a_new_position_never_overtakes_a_later_visibility_event() {
        let q = EventQueue::new(2);
        q.push(moved(1, 1));
        let left = Event::FriendLeft {
            id: 1,
            distance_m: 9_000.0,
            updated_at: Millis(2),
        };
        q.push(left.clone());
        // Full: friend 1's latest event is "left", so the old position is dropped instead.
        q.push(moved(1, 3));
        assert_eq!(q.pop().await, Popped::Event(left));
        assert_eq!(q.pop().await, Popped::Event(moved(1, 3)));
    }

    #[tokio::test]
    async fn gone_purges_everything_queued_about_that_friend_and_nothing_else() {
        let q = EventQueue::new(16);
        q.push(moved(1, 1));
        q.push(Event::FriendRequest { from: 1 });
        q.push(moved(2, 1));
        q.push(Event::FriendLeft {
            id: 1,
            distance_m: 8_000.0,
            updated_at: Millis(2),
        });
        q.push(Event::FriendGone {
            id: 1,
            reason: GoneReason::Hidden,
        });
        let mut got = Vec::new();
        for _ in 0..3 {
            match q.pop().await {
                Popped::Event(e) => got.push(e),
                Popped::Closed(r) => panic!("closed: {r}"),
            }
        }
        assert_eq!(got[0], Event::FriendRequest { from: 1 });
        assert_eq!(got[1], moved(2, 1));
        assert!(matches!(got[2], Event::FriendGone { id: 1, .. }));
    }

    #[tokio::test]
    async fn a_writer_waiting_on_closed_learns_of_an_overflow() {
        let q = Arc::new(EventQueue::new(1));
        let waiter = {
            let q = Arc::clone(&q);
            tokio::spawn(async move { q.closed().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        for id in 0..2 {
            q.push(Event::FriendGone {
                id,
                reason: GoneReason::Inactive,
            });
        }
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task");
        // Already closed: at once.
        q.closed().await;
    }

    #[tokio::test]
    async fn a_queue_full_of_undroppable_events_closes() {
        let q = EventQueue::new(2);
        for id in 0..3 {
            q.push(Event::FriendGone {
                id,
                reason: GoneReason::Inactive,
            });
        }
        assert_eq!(q.pop().await, Popped::Closed(CloseReason::Slow));
    }

    #[tokio::test]
    async fn a_revocation_is_fenced_until_the_attached_writer_confirms_it() {
        let q = Arc::new(EventQueue::new(8));
        q.purge(Subject::User(7));
        assert!(q.fence().is_none(), "a writer that cannot fence holds nothing");
        q.attach(Arc::new(Doorbell::default()), 1);
        assert!(
            q.fence().is_none(),
            "revocations before the writer came need no fence"
        );
        q.purge(Subject::User(8));
        q.push(Event::FriendGone {
            id: 9,
            reason: GoneReason::Hidden,
        });
        let mut fences = Fences::default();
        fences.add(q.fence().expect("the latest revocation is fenced"));
        let waiter = tokio::spawn({
            let f = q.fence().expect("fenced");
            async move { f.wait().await }
        });
        assert_eq!(q.revocations_seen(), 3);
        q.fenced(2);
        assert!(
            fences.take_pending().is_some(),
            "confirmed up to the second of three only"
        );
        fences.add(q.fence().expect("still fenced"));
        q.fenced(3);
        assert!(fences.take_pending().is_none(), "every fence passed");
        waiter.await.expect("the waiter is woken");
        q.purge(Subject::User(10));
        assert!(q.fence().is_some());
        q.fenced(u64::MAX);
        assert!(q.fence().is_none(), "a closed connection writes nothing more");
    }

    #[test]
    fn a_delivery_lease_grows_with_its_rounds_ends_when_told_and_follows_the_pushes() {
        let lease = Arc::new(DeliveryLease::default());
        assert_eq!(lease.until(), None, "no round confirmed yet");
        let now = Instant::now();
        let ms = |n| Duration::from_millis(n);
        let clock = |d| LeaseClock::at(now + ms(d));
        assert!(
            !lease.passed(clock(10_000), ms(0)),
            "a lease never confirmed never ends"
        );
        let near = |a: Option<Instant>, b: Instant| a.is_some_and(|a| a.max(b) - a.min(b) < ms(1));
        lease.extend(now + ms(600));
        lease.extend(now + ms(300)); // a round that started earlier and concluded later
        assert!(
            near(lease.until(), now + ms(600)),
            "never shortened by an older round"
        );
        lease.end(now + ms(100));
        assert!(near(lease.until(), now + ms(100)), "ended at once");
        lease.end(now + ms(400));
        assert!(near(lease.until(), now + ms(100)), "an end never extends");
        assert!(!lease.passed(clock(1_099), ms(1_000)));
        assert!(lease.passed(clock(1_101), ms(1_000)), "ended over a second ago");
        assert!(lease.ends().is_some_and(|e| e.instant() < now + ms(101)));

        // A queue carries the lease of the driver that pushed last.
        let q = EventQueue::new(4);
        assert!(q.lease_if_not(None).is_none());
        q.push_under(moved(1, 1), &lease);
        assert!(q.lease_if_not(None).is_some_and(|l| Arc::ptr_eq(&l, &lease)));
        assert!(
            q.lease_if_not(Some(&lease)).is_none(),
            "the writer holds it already"
        );
        let next_run = Arc::new(DeliveryLease::default());
        q.push_under(moved(1, 2), &next_run);
        assert!(q.lease_if_not(None).is_some_and(|l| Arc::ptr_eq(&l, &next_run)));
        assert!(q
            .lease_if_not(Some(&lease))
            .is_some_and(|l| Arc::ptr_eq(&l, &next_run)));
    }
}
