//! Time as an injected dependency: the node asks a [`Clock`], tests hold a [`ManualClock`] and
//! move it forward instead of sleeping.

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
}
