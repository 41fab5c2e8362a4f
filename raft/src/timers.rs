//! openraft's async runtime with timers on a coarse grid, so that many groups share wake-ups.
//!
//! Every group runs a tick loop that sleeps for 1.5 heartbeat intervals and wakes — even while
//! the group hibernates and its ticks are disabled (openraft only skips emitting the tick). With
//! hundreds of groups per node, each loop waking at its own moment costs a thread wake-up each
//! time: that, not the work done, is most of an idle node's CPU. [`CoarseTimers`] is tokio's
//! runtime with one change: a sleep ends at the next multiple of [`GRID`] after its deadline
//! (counted from a process-wide origin), so every group's loop wakes on the same few instants
//! and one thread wake-up serves them all.
//!
//! A sleep thus lasts up to [`GRID`] longer than asked. Raft's timers tolerate that (election
//! timeouts are randomised over hundreds of milliseconds, heartbeats are several times more
//! frequent than the shortest timeout).
//!
//! Timeouts of calls (`timeout`, `timeout_at`) are not rounded, but they last at least
//! [`MIN_CALL_TIMEOUT`]: openraft bounds every `AppendEntries` by the heartbeat interval
//! (100 ms), which a follower catching up — hundreds of entries to write and fsync on a busy
//! disk — cannot meet; the replication would time out and resend the same entries forever. A
//! dead peer is not waited for that long: the transport fails calls to it at once.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use openraft::async_runtime::TokioOneShotSender;
use openraft::{AsyncRuntime, OptionalSend, TokioInstant, TokioRuntime};

/// Sleeps end on multiples of this.
pub const GRID: Duration = Duration::from_millis(25);

/// The shortest timeout openraft's calls get (see the module doc).
pub const MIN_CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// The first instant this process asked for; the grid is counted from it.
fn origin() -> TokioInstant {
    static ORIGIN: OnceLock<TokioInstant> = OnceLock::new();
    *ORIGIN.get_or_init(TokioInstant::now)
}

/// `deadline` moved later to the next point of the grid (or kept, if on it).
pub fn on_grid(deadline: TokioInstant) -> TokioInstant {
    let origin = origin();
    let since = deadline.saturating_duration_since(origin);
    let grid = GRID.as_nanos();
    let steps = since.as_nanos().div_ceil(grid);
    let nanos = u64::try_from(steps.saturating_mul(grid)).unwrap_or(u64::MAX);
    origin + Duration::from_nanos(nanos)
}

/// A tokio interval of `period` whose ticks fall on multiples of `period` from the process-wide
/// origin: the intervals of many groups with the same period tick together. Missed ticks are
/// delayed, not burst.
pub fn aligned_interval(period: Duration) -> tokio::time::Interval {
    let origin = origin();
    let since = TokioInstant::now().saturating_duration_since(origin);
    let p = period.as_nanos().max(1);
    let next = (since.as_nanos() / p + 1).saturating_mul(p);
    let start = origin + Duration::from_nanos(u64::try_from(next).unwrap_or(u64::MAX));
    let mut every = tokio::time::interval_at(start, period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every
}

/// tokio, with sleeps ending on [`GRID`] (see the module doc).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CoarseTimers;

impl AsyncRuntime for CoarseTimers {
    type JoinError = <TokioRuntime as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = <TokioRuntime as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = <TokioRuntime as AsyncRuntime>::ThreadLocalRng;
    type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        TokioRuntime::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep_until(on_grid(TokioInstant::now() + duration))
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(on_grid(deadline))
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration.max(MIN_CALL_TIMEOUT), future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline.max(TokioInstant::now() + MIN_CALL_TIMEOUT), future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        TokioRuntime::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        TokioRuntime::thread_rng()
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        TokioRuntime::oneshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_gets_at_least_the_minimum_timeout() {
        // Asked for 100 ms, a 300 ms call completes.
        let slow = tokio::time::sleep(Duration::from_millis(300));
        assert!(CoarseTimers::timeout(Duration::from_millis(100), slow)
            .await
            .is_ok());
        // A call that never completes is given up only after the minimum.
        let start = std::time::Instant::now();
        let never = std::future::pending::<()>();
        assert!(CoarseTimers::timeout(Duration::from_millis(100), never)
            .await
            .is_err());
        assert!(start.elapsed() >= MIN_CALL_TIMEOUT);
    }

    #[tokio::test]
    async fn deadlines_move_to_the_next_grid_point_and_never_earlier() {
        let start = TokioInstant::now();
        for ms in [0u64, 1, 24, 25, 26, 149, 150, 151, 1_000] {
            let deadline = start + Duration::from_millis(ms);
            let moved = on_grid(deadline);
            assert!(moved >= deadline, "{ms} ms moved earlier");
            assert!(
                moved - deadline < GRID,
                "{ms} ms moved by a whole grid step or more"
            );
            let since = moved.duration_since(origin()).as_nanos();
            assert_eq!(since % GRID.as_nanos(), 0, "{ms} ms is not on the grid");
        }
    }
}
