//! Hibernation: a shard group with no write for a while stops its Raft timers on every replica —
//! no heartbeats, no election timeouts — so thousands of idle groups cost almost nothing.
//!
//! Locations are not Raft writes, so a group serving online users hibernates too: only relation
//! and settings changes wake it.
//!
//! # How a group sleeps and wakes
//!
//! - **Sleep** (decided by the leader, `cluster`): after [`IDLE_AFTER`] without a write the leader
//!   tells its live followers, who stop their timers; once all of them agreed it stops its own
//!   (a follower awake under a silent leader would depose it). A refused attempt is tried again
//!   after [`RETRY_SLEEP`].
//! - **Wake**: the leader wakes on any proposal (and tells its followers); a follower wakes on a
//!   replicated write (the transport's append hook), on the leader's word, or when the node-level
//!   liveness check finds the leader's node silent — the only way a dead leader is noticed
//!   without heartbeats, and why one dead node does not wake every group: only the groups it led.
//! - **Lease**: a sleeping leader gets no quorum acknowledgements, so its lease (when it must stop
//!   serving sessions) comes from node-level liveness instead: it holds while a majority of the
//!   group's voters' nodes answered within the lease. So does a leader that just woke, until its
//!   first heartbeats are acknowledged ([`Hibernation::lease_from_liveness`]).
//! - **Votes**: a sleeping replica refuses to vote while the leader it follows is alive (its node
//!   answers) — unless the candidate is that leader. Node-level liveness stands in for Raft's
//!   heartbeats here too: without this, a replica that lost only its own link to the leader
//!   could wake, win the vote of a sleeping one and lead beside a leader that still holds its
//!   lease.
//!
//! Sleeping only stops timers: Raft's safety never depends on them.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nearby_raft::{GroupId, Raft};

/// A group sleeps after this long without a write.
pub const IDLE_AFTER: Duration = Duration::from_secs(10);

/// How long after an attempt to put a group to sleep the next one may start.
pub const RETRY_SLEEP: Duration = Duration::from_secs(5);

/// Which local replicas sleep.
#[derive(Default)]
pub struct Hibernation {
    groups: Mutex<Groups>,
}

#[derive(Default)]
struct Groups {
    asleep: HashSet<GroupId>,
    /// When each replica last woke.
    woke: HashMap<GroupId, Instant>,
    /// When the leader last tried to put each group to sleep.
    tried: HashMap<GroupId, Instant>,
}

impl Hibernation {
    fn groups(&self) -> std::sync::MutexGuard<'_, Groups> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `group`'s local replica sleeps.
    pub fn is_asleep(&self, group: GroupId) -> bool {
        self.groups().asleep.contains(&group)
    }

    /// Whether a leader's lease on `group` is judged by node-level liveness rather than Raft
    /// acknowledgements: while it sleeps, and for `within` after it woke (its last quorum
    /// acknowledgement is as old as its sleep until the first heartbeats return).
    pub fn lease_from_liveness(&self, group: GroupId, within: Duration) -> bool {
        let g = self.groups();
        g.asleep.contains(&group) || g.woke.get(&group).is_some_and(|t| t.elapsed() < within)
    }

    /// Whether the leader may try to put `group` to sleep now (it is awake and no attempt
    /// started within [`RETRY_SLEEP`]); if so, the attempt is recorded as started.
    pub fn may_try_sleep(&self, group: GroupId) -> bool {
        let mut g = self.groups();
        if g.asleep.contains(&group) || g.tried.get(&group).is_some_and(|t| t.elapsed() < RETRY_SLEEP) {
            return false;
        }
        g.tried.insert(group, Instant::now());
        true
    }

    /// Stops the timers of `group`'s local replica; `false` if it already slept.
    pub fn sleep(&self, group: GroupId, raft: &Raft) -> bool {
        let fresh = {
            let mut g = self.groups();
            g.woke.remove(&group);
            g.asleep.insert(group)
        };
        raft.runtime_config().tick(false);
        if fresh {
            tracing::debug!(group, "hibernating");
        }
        fresh
    }

    /// Starts the timers of `group`'s local replica again, for the reason `why` (logged);
    /// `false` if it was awake.
    pub fn wake(&self, group: GroupId, raft: &Raft, why: &'static str) -> bool {
        let was = {
            let mut g = self.groups();
            let was = g.asleep.remove(&group);
            if was {
                g.woke.insert(group, Instant::now());
            }
            was
        };
        if was {
            raft.runtime_config().tick(true);
            tracing::debug!(group, why, "waking");
        }
        was
    }

    /// Forgets `group` (its replica closed).
    pub fn forget(&self, group: GroupId) {
        let mut g = self.groups();
        g.asleep.remove(&group);
        g.woke.remove(&group);
        g.tried.remove(&group);
    }

    /// Sleeping replicas.
    pub fn count(&self) -> usize {
        self.groups().asleep.len()
    }
}
