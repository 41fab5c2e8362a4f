//! The latest-location table: each user's newest location, dropped after a time-to-live.
//!
//! Owns [`LocationTable`]: one [`LatestLocation`] per user plus an ordered expiry queue, so
//! that expiring users costs time proportional to what expires, never a scan of everyone.
//! This module never reads a clock, never spawns a timer and never sleeps: the caller passes
//! the time of each update and of each [`LocationTable::expire`] call, and may use
//! [`LocationTable::next_expiry`] to decide when to call again.
//!
//! # The expiry structure
//!
//! A binary min-heap of `(expiry, user)` entries with *lazy invalidation*. Refreshing a user
//! pushes a new entry and leaves the old one in place; an entry is *live* only while the table
//! still holds that user with exactly that expiry, so a stale entry can never expire a
//! refreshed user. Two invariants keep this honest:
//!
//! 1. **The head is live.** After every `set`, `remove` and `expire`, stale entries at the head
//!    are popped. So [`LocationTable::next_expiry`] is exact, not a lower bound.
//! 2. **Bounded garbage.** When the heap holds more than `2 × users + 1024` entries it is
//!    rebuilt from the table in O(n); this happens at most once per ~n pushes, so memory stays
//!    O(n) even under a client that floods updates, at amortised O(1) extra cost per push.
//!
//! A heap was chosen over a timer wheel because update times are not monotonic across users
//! (late, older updates are legal), a heap needs no tick granularity, and at 10⁶ users its
//! `log n` is ~20 comparisons — measured in `docs/index.md`.
//!
//! | operation | cost |
//! |---|---|
//! | `set`, `remove` | O(log n) amortised |
//! | `get`, `len`, `next_expiry` | O(1) |
//! | `expire` | O((e + s) log n): `e` users expired, `s` stale entries discarded (each entry is discarded once in its life) |
//!
//! A table made [`LocationTable::with_cell_counts`] also keeps [`CellCounts`] (located users by
//! coarse cell) in step with every `set`, `remove` and `expire`, for one or two point-to-cell
//! conversions per change.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::BinaryHeap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::activity::CellCounts;
use crate::geo::{duration_ms, LatLng, Millis, UserId};

/// Extra stale heap entries tolerated before a rebuild, so tiny tables do not rebuild often.
const COMPACT_SLACK: usize = 1024;

/// A user's newest known location and when it was taken.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatestLocation {
    /// Where the user was.
    pub loc: LatLng,
    /// When the user was there (the update's own time, not the time it arrived).
    pub updated_at: Millis,
}

/// What [`LocationTable::set`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a Stale outcome means the update was ignored"]
pub enum SetOutcome {
    /// The user had no location; now they have one.
    Inserted,
    /// The user's location was replaced by a newer one.
    Updated,
    /// The update is not newer than the stored one (older or equal `at`) and was ignored.
    Stale,
}

/// Each user's latest location, with a time-to-live.
///
/// Usage, by a single-threaded driver (e.g. the raft state machine):
///
/// 1. Call [`set`](Self::set) for every location update, with the update's own time.
/// 2. Call [`expire`](Self::expire) with the current time whenever the clock reaches
///    [`next_expiry`](Self::next_expiry) (or on any tick); it removes and reports every user
///    whose `updated_at + ttl <= now`.
///
/// The table keeps no tombstones: once a user expired or was removed, an old update that
/// arrives late is inserted again (and expires again at its own `at + ttl`). Callers that must
/// not resurrect users should drop updates with `at + ttl <= now` before calling `set`.
#[derive(Debug, Clone)]
pub struct LocationTable {
    ttl: Duration,
    ttl_ms: u64,
    users: crate::hash::Map<UserId, LatestLocation>,
    /// Min-heap of `(expiry ms, user)`; see the module doc for the invariants.
    queue: BinaryHeap<Reverse<(u64, UserId)>>,
    /// The users of `users` by coarse cell, if asked for.
    cells: Option<CellCounts>,
}

impl LocationTable {
    /// An empty table whose entries live for `ttl` after their `updated_at`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            ttl_ms: duration_ms(ttl),
            users: crate::hash::Map::default(),
            queue: BinaryHeap::new(),
            cells: None,
        }
    }

    /// This table, also counting its users by cell (see [`CellCounts`]) from now on.
    pub fn with_cell_counts(mut self, mut counts: CellCounts) -> Self {
        for l in self.users.values() {
            counts.add(l.loc);
        }
        self.cells = Some(counts);
        self
    }

    /// The users by coarse cell, if the table was made [`with_cell_counts`](Self::with_cell_counts).
    pub fn cell_counts(&self) -> Option<&CellCounts> {
        self.cells.as_ref()
    }

    /// The time-to-live this table was built with.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Records that `user` was at `loc` at time `at`, unless a newer (or equally new) location
    /// is already stored. O(log n) amortised.
    pub fn set(&mut self, user: UserId, loc: LatLng, at: Millis) -> SetOutcome {
        let new = LatestLocation { loc, updated_at: at };
        let outcome = match self.users.entry(user) {
            Entry::Occupied(mut e) => {
                if at <= e.get().updated_at {
                    return SetOutcome::Stale;
                }
                if let Some(c) = &mut self.cells {
                    c.moved(e.get().loc, loc);
                }
                e.insert(new);
                SetOutcome::Updated
            }
            Entry::Vacant(e) => {
                if let Some(c) = &mut self.cells {
                    c.add(loc);
                }
                e.insert(new);
                SetOutcome::Inserted
            }
        };
        // Only an update can make the head stale, and only if the head is this user's old
        // entry; checking that first saves a hash lookup on most sets.
        let head_is_user = self.head_user() == Some(user);
        self.queue.push(Reverse((self.expiry_ms(at), user)));
        if head_is_user || self.needs_compaction() {
            self.tidy();
        }
        outcome
    }

    /// The user's latest location, if they have one that has not expired or been removed.
    pub fn get(&self, user: UserId) -> Option<LatestLocation> {
        self.users.get(&user).copied()
    }

    /// Forgets `user` (e.g. they turned sharing off) and returns what was stored.
    pub fn remove(&mut self, user: UserId) -> Option<LatestLocation> {
        let removed = self.users.remove(&user);
        if let (Some(c), Some(l)) = (&mut self.cells, &removed) {
            c.remove(l.loc);
        }
        if removed.is_some() && (self.head_user() == Some(user) || self.needs_compaction()) {
            self.tidy();
        }
        removed
    }

    /// Removes every user whose `updated_at + ttl <= now` and appends their ids to `out`, in
    /// ascending `(expiry, user id)` order. Costs O(log n) per expired user plus per stale queue
    /// entry discarded; never scans the table.
    pub fn expire(&mut self, now: Millis, out: &mut Vec<UserId>) {
        while let Some(&Reverse((expiry, user))) = self.queue.peek() {
            if expiry > now.0 {
                break;
            }
            self.queue.pop();
            if self.is_live(expiry, user) {
                if let (Some(l), Some(c)) = (self.users.remove(&user), &mut self.cells) {
                    c.remove(l.loc);
                }
                out.push(user);
            }
        }
        self.tidy();
    }

    /// When the next user expires, if any: the earliest `updated_at + ttl` in the table.
    /// Exact (the queue head is always live). A driver can sleep until then.
    pub fn next_expiry(&self) -> Option<Millis> {
        self.queue.peek().map(|Reverse((expiry, _))| Millis(*expiry))
    }

    /// Number of users with a location.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True if no user has a location.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Every `(user, latest location)`, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (UserId, LatestLocation)> + '_ {
        self.users.iter().map(|(u, l)| (*u, *l))
    }

    fn expiry_ms(&self, at: Millis) -> u64 {
        at.0.saturating_add(self.ttl_ms)
    }

    fn is_live(&self, expiry: u64, user: UserId) -> bool {
        self.users
            .get(&user)
            .is_some_and(|l| self.expiry_ms(l.updated_at) == expiry)
    }

    fn head_user(&self) -> Option<UserId> {
        self.queue.peek().map(|Reverse((_, user))| *user)
    }

    fn needs_compaction(&self) -> bool {
        self.queue.len() > 2 * self.users.len() + COMPACT_SLACK
    }

    /// Restores both invariants: a live head, bounded garbage.
    fn tidy(&mut self) {
        if self.needs_compaction() {
            let entries: Vec<_> = self
                .users
                .iter()
                .map(|(u, l)| Reverse((self.expiry_ms(l.updated_at), *u)))
                .collect();
            self.queue = BinaryHeap::from(entries);
            return;
        }
        while let Some(&Reverse((expiry, user))) = self.queue.peek() {
            if self.is_live(expiry, user) {
                break;
            }
            self.queue.pop();
        }
    }

    #[cfg(test)]
    fn queue_len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn p(lat: f64) -> LatLng {
        LatLng::new(lat, 0.0).unwrap()
    }

    const TTL: Duration = Duration::from_millis(100);

    #[test]
    fn cell_counts_follow_sets_removes_and_expiries() {
        let mut t = LocationTable::new(TTL);
        assert!(t.set(9, p(10.0), Millis(0)) == SetOutcome::Inserted);
        let mut t = t.with_cell_counts(CellCounts::default());
        let counts = |t: &LocationTable| t.cell_counts().map(|c| (c.len(), c.total()));
        assert_eq!(counts(&t), Some((1, 1)), "users already held are counted");
        assert!(t.set(1, p(1.0), Millis(10)) == SetOutcome::Inserted);
        assert!(t.set(2, p(1.0), Millis(10)) == SetOutcome::Inserted);
        assert_eq!(counts(&t), Some((2, 3)));
        assert!(t.set(2, p(40.0), Millis(60)) == SetOutcome::Updated);
        assert_eq!(counts(&t), Some((3, 3)));
        assert!(t.set(2, p(50.0), Millis(50)) == SetOutcome::Stale);
        assert_eq!(counts(&t), Some((3, 3)), "a stale update moves nobody");
        t.remove(1);
        assert_eq!(counts(&t), Some((2, 2)));
        let mut out = Vec::new();
        t.expire(Millis(1_000), &mut out);
        assert_eq!(counts(&t), Some((0, 0)));
        assert_eq!(LocationTable::new(TTL).cell_counts(), None);
    }

    #[test]
    fn newer_wins_older_is_stale() {
        let mut t = LocationTable::new(TTL);
        assert_eq!(t.set(1, p(1.0), Millis(10)), SetOutcome::Inserted);
        assert_eq!(t.set(1, p(2.0), Millis(20)), SetOutcome::Updated);
        assert_eq!(t.set(1, p(3.0), Millis(15)), SetOutcome::Stale);
        assert_eq!(t.set(1, p(3.0), Millis(20)), SetOutcome::Stale);
        assert_eq!(
            t.get(1),
            Some(LatestLocation {
                loc: p(2.0),
                updated_at: Millis(20)
            })
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn refresh_is_not_expired_by_old_entry() {
        let mut t = LocationTable::new(TTL);
        let _ = t.set(1, p(1.0), Millis(0));
        let _ = t.set(2, p(1.0), Millis(50));
        let _ = t.set(1, p(1.0), Millis(90)); // refresh: old expiry 100, new 190
        assert_eq!(t.next_expiry(), Some(Millis(150)));
        let mut out = vec![];
        t.expire(Millis(100), &mut out);
        assert!(out.is_empty());
        t.expire(Millis(150), &mut out);
        assert_eq!(out, vec![2]);
        t.expire(Millis(189), &mut out);
        assert_eq!(out, vec![2]);
        assert_eq!(t.next_expiry(), Some(Millis(190)));
        t.expire(Millis(190), &mut out);
        assert_eq!(out, vec![2, 1]);
        assert!(t.is_empty());
        assert_eq!(t.next_expiry(), None);
    }

    #[test]
    fn remove_then_reinsert() {
        let mut t = LocationTable::new(TTL);
        let _ = t.set(1, p(1.0), Millis(0));
        assert!(t.remove(1).is_some());
        assert_eq!(t.next_expiry(), None);
        assert!(t.remove(1).is_none());
        assert_eq!(t.set(1, p(1.0), Millis(0)), SetOutcome::Inserted);
        let mut out = vec![];
        t.expire(Millis(100), &mut out);
        assert_eq!(out, vec![1]);
    }

    #[test]
    fn garbage_stays_bounded_under_flood() {
        let mut t = LocationTable::new(TTL);
        for i in 1..=100_000u64 {
            let _ = t.set(1 + i % 3, p(0.0), Millis(i));
            assert!(t.queue_len() <= 2 * t.len() + COMPACT_SLACK + 1);
        }
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn saturating_expiry() {
        let mut t = LocationTable::new(Duration::MAX);
        let _ = t.set(1, p(0.0), Millis(5));
        assert_eq!(t.next_expiry(), Some(Millis(u64::MAX)));
        let mut out = vec![];
        t.expire(Millis(u64::MAX - 1), &mut out);
        assert!(out.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(UserId, u64),
        Remove(UserId),
        Expire(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1..16u64, 0..400u64).prop_map(|(u, at)| Op::Set(u, at)),
            1 => (1..16u64).prop_map(Op::Remove),
            2 => (0..600u64).prop_map(Op::Expire),
        ]
    }

    proptest! {
        /// The table behaves exactly like a HashMap that is scanned on every expire.
        #[test]
        fn matches_naive_model(ops in proptest::collection::vec(op(), 0..200)) {
            let ttl = 100u64;
            let mut t = LocationTable::new(Duration::from_millis(ttl));
            let mut model: HashMap<UserId, LatestLocation> = HashMap::new();
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Set(u, at) => {
                        let loc = p((i % 90) as f64);
                        let want = match model.get(&u) {
                            Some(old) if old.updated_at.0 >= at => SetOutcome::Stale,
                            Some(_) => SetOutcome::Updated,
                            None => SetOutcome::Inserted,
                        };
                        if want != SetOutcome::Stale {
                            model.insert(u, LatestLocation { loc, updated_at: Millis(at) });
                        }
                        prop_assert_eq!(t.set(u, loc, Millis(at)), want);
                    }
                    Op::Remove(u) => prop_assert_eq!(t.remove(u), model.remove(&u)),
                    Op::Expire(now) => {
                        let mut want: Vec<(u64, UserId)> = model
                            .iter()
                            .filter(|(_, l)| l.updated_at.0 + ttl <= now)
                            .map(|(u, l)| (l.updated_at.0 + ttl, *u))
                            .collect();
                        want.sort();
                        for (_, u) in &want {
                            model.remove(u);
                        }
                        let mut got = vec![];
                        t.expire(Millis(now), &mut got);
                        let want: Vec<UserId> = want.into_iter().map(|(_, u)| u).collect();
                        prop_assert_eq!(got, want);
                    }
                }
                prop_assert_eq!(t.len(), model.len());
                let next = model.values().map(|l| Millis(l.updated_at.0 + ttl)).min();
                prop_assert_eq!(t.next_expiry(), next);
                for u in 1..16 {
                    prop_assert_eq!(t.get(u), model.get(&u).copied());
                }
            }
        }
    }
}
