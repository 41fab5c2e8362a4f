//! The sessions connected to this node, by user: where a group's driver pushes events, and how
//! sessions are told to go (shutdown, or their home group moved to another node).
//!
//! A user may have several sessions (devices) on one node; they all get the same events. The
//! registry never decides anything about visibility: the drivers have decided before they push.

use nearby_index::hash::Map;
use smallvec::SmallVec;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nearby_client::proto::Event;
use nearby_index::friends::UserRange;
use nearby_index::geo::UserId;

use crate::api::SessionSink;
use crate::queue::{CloseReason, DeliveryLease, EventQueue, Fences};

/// A user's sessions here. Nearly always one: held in the map's own entry, so that a push reaches
/// the session's queue without first reading a list elsewhere in memory.
type Devices = SmallVec<[SessionSink; 1]>;

/// The node's sessions (see the module doc).
pub struct Sessions {
    by_user: Mutex<Map<UserId, Devices>>,
    next: AtomicU64,
    queue_capacity: usize,
}

impl Sessions {
    /// An empty registry whose sessions queue at most `queue_capacity` events each.
    pub fn new(queue_capacity: usize) -> Self {
        Sessions {
            by_user: Mutex::new(Map::default()),
            next: AtomicU64::new(1),
            queue_capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Map<UserId, Devices>> {
        self.by_user.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new session of `user`; returns its sink.
    pub fn open(&self, user: UserId) -> SessionSink {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let sink = SessionSink::new(id, Arc::new(EventQueue::new(self.queue_capacity)));
        self.lock().entry(user).or_default().push(sink.clone());
        sink
    }

    /// Sessions `user` has open here.
    pub fn count(&self, user: UserId) -> usize {
        self.lock().get(&user).map_or(0, |d| d.len())
    }

    /// Forgets session `id` of `user`; returns whether it was the user's last.
    pub fn close(&self, user: UserId, id: u64) -> bool {
        let mut all = self.lock();
        let Some(list) = all.get_mut(&user) else {
            return false;
        };
        let before = list.len();
        list.retain(|s| s.id() != id);
        let removed = list.len() < before;
        if list.is_empty() {
            all.remove(&user);
        }
        removed && !all.contains_key(&user)
    }

    /// Pushes `event`, let out under `lease`, to every session of `viewer`; an event that ends
    /// visibility adds its sessions' fences to `fences` (see [`crate::queue`]).
    pub fn push(&self, viewer: UserId, event: Event, lease: &Arc<DeliveryLease>, fences: &mut Fences) {
        let all = self.lock();
        let Some(list) = all.get(&viewer) else {
            return;
        };
        let revokes = matches!(event, Event::FriendGone { .. } | Event::StrangerGone { .. });
        if let [only] = list.as_slice() {
            only.events.push_under(event, lease);
        } else {
            for s in list {
                s.events.push_under(event.clone(), lease);
            }
        }
        if revokes {
            for s in list {
                if let Some(f) = s.events.fence() {
                    fences.add(f);
                }
            }
        }
    }

    /// Drops every event about `about` still queued for `viewer`'s sessions; adds their fences
    /// to `fences`.
    pub fn purge(&self, viewer: UserId, about: crate::queue::Subject<'_>, fences: &mut Fences) {
        if let Some(list) = self.lock().get(&viewer) {
            for s in list {
                s.events.purge(about);
                if let Some(f) = s.events.fence() {
                    fences.add(f);
                }
            }
        }
    }

    /// Whether `user` has a session here.
    pub fn is_online(&self, user: UserId) -> bool {
        self.lock().contains_key(&user)
    }

    /// Users with a session here.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nobody is connected.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Closes the sessions of every user in `range` with `reason`; returns how many.
    pub fn close_range(&self, range: UserRange, reason: &CloseReason) -> usize {
        let all = self.lock();
        let mut n = 0;
        for (user, list) in all.iter() {
            if range.contains(*user) {
                for s in list {
                    s.events.close(reason.clone());
                    n += 1;
                }
            }
        }
        n
    }

    /// Closes every session with `reason`.
    pub fn close_all(&self, reason: &CloseReason) {
        for s in self.lock().values().flatten() {
            s.events.close(reason.clone());
        }
    }
}
