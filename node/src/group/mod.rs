//! The groups this node leads, each run by one driver task (see [`driver`]).
//!
//! A led group's live state — its [`crate::presence::Presence`], its pending revocations, the
//! sessions waiting for a first page — is touched only by its driver. Everything else (sessions,
//! peers, other drivers, the supervisor that starts and stops drivers as leadership moves) talks
//! to it by sending a [`GroupMsg`] to its mailbox through a [`DriverHandle`].
//!
//! - [`driver`]: the driver task: mailbox, applied entries, presence, barriers, deadlines.
//! - [`outbox`]: delivers the group's relation intents to the groups of the other sides.
//! - [`lease`]: nothing derived from live state leaves a driver unless its node surely leads.
//! - [`hibernate`]: idle groups stop their Raft timers.

pub mod driver;
pub mod hibernate;
pub mod lease;
pub mod outbox;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use nearby_client::proto::NearbyPage;
use nearby_index::geo::{LatLng, Millis, UserId};
use nearby_raft::{GroupId, ShardGroup};
use tokio::sync::{mpsc, oneshot};

use crate::api::{LocationAck, ServiceError};
use crate::presence::GroupMessage;

/// Everything a group's driver can be told.
#[derive(Debug)]
pub enum GroupMsg {
    /// A message from a group's presence (this node's or a peer's).
    Message(GroupMessage),
    /// `user`'s first session on this node opened.
    Connect {
        /// The user.
        user: UserId,
    },
    /// `user`'s last session on this node closed.
    Disconnect {
        /// The user.
        user: UserId,
    },
    /// A location of `user`; `first` asks for the first page of the session.
    Location {
        /// The user.
        user: UserId,
        /// Where.
        loc: LatLng,
        /// Whether this starts the session.
        first: bool,
        /// The answer.
        reply: oneshot::Sender<Result<LocationAck, ServiceError>>,
    },
    /// A page of what `user` sees.
    List {
        /// The user.
        user: UserId,
        /// The page's cursor, parsed.
        cursor: Option<nearby_index::query::Cursor>,
        /// Entries per page.
        size: usize,
        /// The answer.
        reply: oneshot::Sender<Result<NearbyPage, ServiceError>>,
    },
    /// The nearest strangers of `user`, who listens to them from now on.
    Strangers {
        /// The user.
        user: UserId,
        /// Entries wanted.
        size: usize,
        /// The answer.
        reply: oneshot::Sender<Result<nearby_client::proto::StrangerPage, ServiceError>>,
    },
    /// Whether the group holds a live location of `user`.
    HasLocation {
        /// The user.
        user: UserId,
        /// The answer.
        reply: oneshot::Sender<bool>,
    },
    /// `user`'s search radius.
    SetRadius {
        /// The user.
        user: UserId,
        /// Metres.
        meters: u32,
    },
    /// Answer once the change applied at `index` has been carried out on every live stream it
    /// affects (its revocations acknowledged), or fail after the bound.
    AwaitBarrier {
        /// The change's log index in this group.
        index: u64,
        /// The answer.
        reply: oneshot::Sender<Result<(), ServiceError>>,
    },
    /// Answer once intent `seq` of group `source` has been applied here and carried out like
    /// [`GroupMsg::AwaitBarrier`].
    AwaitDelivery {
        /// The group holding the intent.
        source: GroupId,
        /// The intent's number.
        seq: u64,
        /// The answer.
        reply: oneshot::Sender<Result<(), ServiceError>>,
    },
    /// Users with a live location by coarse cell, for the admin console's activity map (see
    /// [`crate::presence::Presence::cell_counts`]).
    CellCounts {
        /// At most this many cells, the busiest.
        max: usize,
        /// The answer: (H3 cell index, users).
        reply: oneshot::Sender<Vec<(u64, u32)>>,
    },
    /// Time passed the group's next deadline.
    Tick,
}

/// How to reach a running driver.
#[derive(Clone)]
pub struct DriverHandle {
    group: ShardGroup,
    tx: mpsc::UnboundedSender<GroupMsg>,
    depth: Arc<AtomicUsize>,
    next_deadline: Arc<AtomicU64>,
    /// When the group last applied a write, as milliseconds since [`base`].
    last_write: Arc<AtomicU64>,
    activity: Arc<Activity>,
}

/// What a driver counts of its group's load, for the admin API and rebalancing.
#[derive(Debug, Default)]
pub struct Activity {
    /// Users with a session on the group's leader.
    pub online: AtomicU64,
    /// Location updates accepted since the driver started.
    pub updates: AtomicU64,
}

/// The instant activity times are counted from (the first use in this process).
pub(crate) fn base() -> std::time::Instant {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(std::time::Instant::now)
}

/// Milliseconds since [`base`].
pub(crate) fn now_ms() -> u64 {
    base().elapsed().as_millis() as u64
}

impl DriverHandle {
    /// The group's replica on this node.
    pub fn group(&self) -> &ShardGroup {
        &self.group
    }

    /// Sends `msg`; `false` if the driver has stopped.
    pub fn send(&self, msg: GroupMsg) -> bool {
        self.depth.fetch_add(1, Ordering::Relaxed);
        let ok = self.tx.send(msg).is_ok();
        if !ok {
            self.depth.fetch_sub(1, Ordering::Relaxed);
        }
        ok
    }

    /// The group's load as its driver counts it.
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// Messages waiting in the mailbox: the driver's backlog.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// How long since the group last applied a write (or its driver started).
    pub fn idle_for(&self) -> std::time::Duration {
        std::time::Duration::from_millis(now_ms().saturating_sub(self.last_write.load(Ordering::Relaxed)))
    }

    /// Whether the group's next deadline (on the node's clock) has passed at `now`.
    pub fn is_due(&self, now: Millis) -> bool {
        let d = self.next_deadline.load(Ordering::Relaxed);
        d != u64::MAX && d <= now.0
    }
}

/// The drivers running on this node, by group.
#[derive(Default)]
pub struct Drivers {
    map: RwLock<HashMap<GroupId, DriverHandle>>,
}

impl Drivers {
    /// The driver of `group`, if this node runs it.
    pub fn get(&self, group: GroupId) -> Option<DriverHandle> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
    }

    /// Every running driver.
    pub fn all(&self) -> Vec<DriverHandle> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The groups with a driver here.
    pub fn groups(&self) -> Vec<GroupId> {
        let mut g: Vec<GroupId> = self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        g.sort_unstable();
        g
    }

    pub(crate) fn insert(&self, group: GroupId, handle: DriverHandle) {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group, handle);
    }

    pub(crate) fn remove(&self, group: GroupId) -> Option<DriverHandle> {
        self.map.write().unwrap_or_else(|p| p.into_inner()).remove(&group)
    }
}
