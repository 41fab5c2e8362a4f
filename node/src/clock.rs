//! Time as an injected dependency: the node asks a [`Clock`], tests hold a [`ManualClock`] and
//! move it forward instead of sleeping.
//!
//! A running node reads wall time through a [`GuardedClock`]: it moves with the monotonic clock
//! and follows the system clock only while the two agree. A step of the system clock — a bad
//! time source, a VM resumed, an operator's `date -s` — is ignored until the other nodes confirm
//! it (`cluster::clocks` measures the offset from them every second): what the product promises
//! in people's time (a timed ghost mode's end, a location's stamp and expiry, "delete my history
//! up to now") never jumps with one node's clock. See `docs/operations.md`, "Clocks".

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nearby_index::geo::Millis;

/// Wall-clock time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Millis;
}

/// The system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Millis(d.as_millis() as u64)
    }
}

/// A clock that moves only when told to. Clones share the time.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: Millis) -> Self {
        ManualClock(Arc::new(AtomicU64::new(start.0)))
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Millis {
        Millis(self.0.load(Ordering::SeqCst))
    }
}

/// Another clock moved by an offset that can change at any time: a clock stepped by a
/// misbehaving time source, for fault tests (see [`crate::node::FAULT_DELAY_ENV`]).
pub struct OffsetClock {
    inner: Arc<dyn Clock>,
    offset_ms: AtomicI64,
}

impl OffsetClock {
    /// `inner`, not moved yet.
    pub fn new(inner: Arc<dyn Clock>) -> Self {
        OffsetClock {
            inner,
            offset_ms: AtomicI64::new(0),
        }
    }

    /// From now on the clock reads `offset_ms` away from `inner`.
    pub fn set_offset(&self, offset_ms: i64) {
        self.offset_ms.store(offset_ms, Ordering::SeqCst);
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> Millis {
        let t = self
            .inner
            .now()
            .0
            .saturating_add_signed(self.offset_ms.load(Ordering::SeqCst));
        Millis(t)
    }
}

/// How far the system clock may move between two readings beyond what the monotonic clock
/// moved before it counts as a step rather than a slew (NTP slews at most 0.5 ms a second).
pub const STEP_MS: u64 = 250;

/// How far a node's clock may be from the cluster's before the cluster's time is taken instead.
pub const MAX_OFFSET_MS: u64 = 500;

/// How long a step is ignored with no other node confirming that it should be (a node alone, or
/// cut off from the others): after that the system clock is followed again.
pub const HOLD_AT_MOST_MS: u64 = 30_000;

/// What a [`GuardedClock`] reads and what it does about the system clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClockStatus {
    /// The guarded time minus the system clock's, ms (0 while following it).
    pub offset_ms: i64,
    /// Whether the system clock is being ignored (a step not confirmed, or a correction by the
    /// other nodes).
    pub holding: bool,
}

/// A change in what a [`Steady`] does, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    /// Nothing new.
    None,
    /// The system clock stepped by this much; ignored from now on.
    Stepped(i64),
    /// The system clock came back to this clock's time; followed again.
    Rejoined,
    /// The other nodes agree with the system clock: this clock stepped this much to it.
    Adopted(i64),
    /// Neither this clock nor the system clock agrees with the other nodes: this clock stepped
    /// this much to the cluster's time.
    Corrected(i64),
    /// A step was ignored for [`HOLD_AT_MOST_MS`] and nobody confirmed it: the system clock is
    /// followed again, this clock stepped this much.
    GaveUp(i64),
}

/// The arithmetic of a [`GuardedClock`], on plain numbers: wall times in ms since the epoch,
/// monotonic times in ms since any fixed point.
#[derive(Clone, Debug)]
struct Steady {
    /// This clock's time at `anchor_mono`.
    anchor: u64,
    /// The monotonic time of `anchor`.
    anchor_mono: u64,
    /// Since when (monotonic) the system clock is ignored, if it is.
    holding_since: Option<u64>,
}

impl Steady {
    fn new(sys: u64, mono: u64) -> Self {
        Steady {
            anchor: sys,
            anchor_mono: mono,
            holding_since: None,
        }
    }

    fn expected(&self, mono: u64) -> u64 {
        self.anchor.saturating_add(mono.saturating_sub(self.anchor_mono))
    }

    fn follow(&mut self, sys: u64, mono: u64) {
        self.anchor = sys;
        self.anchor_mono = mono;
        self.holding_since = None;
    }

    /// The time, given the system clock's `sys` at monotonic `mono`.
    fn read(&mut self, sys: u64, mono: u64) -> (u64, Change) {
        let expected = self.expected(mono);
        let gap = sys as i64 - expected as i64;
        if gap.unsigned_abs() <= STEP_MS {
            let change = if self.holding_since.is_some() {
                Change::Rejoined
            } else {
                Change::None
            };
            self.follow(sys, mono);
            return (sys, change);
        }
        match self.holding_since {
            None => {
                self.holding_since = Some(mono);
                (expected, Change::Stepped(gap))
            }
            Some(since) if mono.saturating_sub(since) > HOLD_AT_MOST_MS => {
                self.follow(sys, mono);
                (sys, Change::GaveUp(gap))
            }
            Some(_) => (expected, Change::None),
        }
    }

    /// The other nodes' verdict: their time minus the system clock's is `peers_minus_sys`;
    /// `agreed` if a majority of the cluster, not counting this node, agrees on it (only then
    /// is the cluster's time taken: nodes whose clocks are all apart would otherwise take each
    /// other's in turn).
    fn confirm(&mut self, sys: u64, mono: u64, peers_minus_sys: i64, agreed: bool) -> Change {
        let expected = self.expected(mono);
        if peers_minus_sys.unsigned_abs() <= MAX_OFFSET_MS {
            if self.holding_since.is_none() {
                return Change::None;
            }
            self.follow(sys, mono);
            return Change::Adopted(sys as i64 - expected as i64);
        }
        // The system clock is off: keep this clock if it agrees with the cluster, else take
        // the cluster's time.
        let peers = sys.saturating_add_signed(peers_minus_sys);
        let off = peers as i64 - expected as i64;
        if off.unsigned_abs() <= MAX_OFFSET_MS {
            self.holding_since = Some(mono);
            return Change::None;
        }
        if !agreed {
            return Change::None;
        }
        self.holding_since = Some(mono);
        self.anchor = peers;
        self.anchor_mono = mono;
        Change::Corrected(off)
    }

    fn status(&self, sys: u64, mono: u64) -> ClockStatus {
        match self.holding_since {
            Some(_) => ClockStatus {
                offset_ms: self.expected(mono) as i64 - sys as i64,
                holding: true,
            },
            None => ClockStatus::default(),
        }
    }
}

/// A clock that ignores steps of its source nobody confirms (see the module doc).
pub struct GuardedClock {
    source: Arc<dyn Clock>,
    base: std::time::Instant,
    steady: std::sync::Mutex<Steady>,
}

impl GuardedClock {
    /// Guards `source` (the system clock, or a test's moved one), reading it now.
    pub fn new(source: Arc<dyn Clock>) -> Self {
        let sys = source.now().0;
        GuardedClock {
            source,
            base: std::time::Instant::now(),
            steady: std::sync::Mutex::new(Steady::new(sys, 0)),
        }
    }

    fn mono(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    fn steady(&self) -> std::sync::MutexGuard<'_, Steady> {
        self.steady.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The source's own reading (what the other nodes' offsets are measured against).
    pub fn source_now(&self) -> Millis {
        self.source.now()
    }

    /// The other nodes' time minus the source's, measured just now, and whether a majority of
    /// the cluster without this node agrees on it (`cluster::clocks`).
    pub fn confirm(&self, peers_minus_source: i64, agreed: bool) {
        let (sys, mono) = (self.source.now().0, self.mono());
        let change = self.steady().confirm(sys, mono, peers_minus_source, agreed);
        log(change, peers_minus_source);
    }

    /// What it does now.
    pub fn status(&self) -> ClockStatus {
        let (sys, mono) = (self.source.now().0, self.mono());
        self.steady().status(sys, mono)
    }
}

impl Clock for GuardedClock {
    fn now(&self) -> Millis {
        let (sys, mono) = (self.source.now().0, self.mono());
        let (t, change) = self.steady().read(sys, mono);
        log(change, 0);
        Millis(t)
    }
}

fn log(change: Change, peers_minus_source: i64) {
    match change {
        Change::None => {}
        Change::Stepped(by_ms) => tracing::warn!(
            by_ms,
            "the system clock stepped; ignoring it until the other nodes confirm it"
        ),
        Change::Rejoined => tracing::info!("the system clock is back in step; following it again"),
        Change::Adopted(by_ms) => tracing::warn!(
            by_ms,
            "the other nodes agree with the system clock's step; following it"
        ),
        Change::Corrected(by_ms) => tracing::warn!(
            by_ms,
            peers_minus_source,
            "this node's clock is off from the other nodes'; taking the cluster's time"
        ),
        Change::GaveUp(by_ms) => tracing::warn!(
            by_ms,
            "no other node confirmed or denied the system clock's step; following it again"
        ),
    }
}

/// Sleeps until `at` (on the process's timer, not a [`Clock`]), or forever if `None`: the
/// `select!` arm of a loop whose next deadline may not exist.
pub(crate) async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_clock_steps_both_ways_and_never_below_zero() {
        let inner = ManualClock::new(Millis(100_000));
        let clock = OffsetClock::new(Arc::new(inner.clone()));
        assert_eq!(clock.now(), Millis(100_000));
        clock.set_offset(-30_000);
        assert_eq!(clock.now(), Millis(70_000));
        inner.advance(Duration::from_secs(1));
        assert_eq!(clock.now(), Millis(71_000));
        clock.set_offset(5_000);
        assert_eq!(clock.now(), Millis(106_000));
        clock.set_offset(-200_000);
        assert_eq!(clock.now(), Millis(0));
    }

    const T: u64 = 1_800_000_000_000;

    #[test]
    fn a_slewing_system_clock_is_followed_and_a_step_is_ignored_until_it_comes_back() {
        let mut s = Steady::new(T, 0);
        // Slews (a few ms off the monotonic clock) are followed.
        assert_eq!(s.read(T + 1_003, 1_000), (T + 1_003, Change::None));
        assert_eq!(s.read(T + 1_999, 2_000), (T + 1_999, Change::None));
        // A step of a minute forward: the time goes on as if it had not happened.
        assert_eq!(s.read(T + 63_000, 3_000), (T + 2_999, Change::Stepped(60_001)));
        assert_eq!(s.read(T + 64_000, 4_000), (T + 3_999, Change::None));
        assert!(s.status(T + 64_000, 4_000).holding);
        assert_eq!(s.status(T + 64_000, 4_000).offset_ms, -60_001);
        // Back: followed again.
        assert_eq!(s.read(T + 5_000, 5_000), (T + 5_000, Change::Rejoined));
        assert_eq!(s.status(T + 5_000, 5_000), ClockStatus::default());
        // The same backwards.
        assert_eq!(s.read(T - 30_000, 6_000), (T + 6_000, Change::Stepped(-36_000)));
    }

    #[test]
    fn the_other_nodes_decide_whether_a_step_is_followed() {
        // They agree with the step: it was this node that was wrong.
        let mut s = Steady::new(T, 0);
        s.read(T + 61_000, 1_000);
        assert_eq!(s.confirm(T + 61_100, 1_100, -20, false), Change::Adopted(60_000));
        assert_eq!(s.read(T + 62_000, 2_000), (T + 62_000, Change::None));
        // They disagree with it and agree with this clock: it is held, past the usual limit.
        let mut s = Steady::new(T, 0);
        s.read(T + 61_000, 1_000);
        for at in (2_000..=40_000).step_by(1_000) {
            assert_eq!(s.confirm(T + 60_000 + at, at, -60_000, false), Change::None);
            assert_eq!(s.read(T + 60_000 + at, at).0, T + at);
        }
        // Neither: the cluster's time is taken, if the others agree on it among themselves.
        let mut s = Steady::new(T, 0);
        assert_eq!(s.confirm(T + 1_000, 1_000, 5_000, false), Change::None);
        assert_eq!(s.read(T + 1_500, 1_500), (T + 1_500, Change::None));
        assert_eq!(s.confirm(T + 2_000, 2_000, 5_000, true), Change::Corrected(5_000));
        assert_eq!(s.read(T + 3_000, 3_000), (T + 8_000, Change::None));
    }

    #[test]
    fn a_step_nobody_answers_about_is_followed_after_a_while() {
        let mut s = Steady::new(T, 0);
        assert_eq!(s.read(T + 61_000, 1_000).1, Change::Stepped(60_000));
        assert_eq!(s.read(T + 60_000 + 31_000, 31_000).0, T + 31_000);
        assert_eq!(
            s.read(T + 60_000 + 31_001 + HOLD_AT_MOST_MS, 31_001 + HOLD_AT_MOST_MS),
            (T + 60_000 + 31_001 + HOLD_AT_MOST_MS, Change::GaveUp(60_000))
        );
    }
}
