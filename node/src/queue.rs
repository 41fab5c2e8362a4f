//! The bounded event queue between the node and one session's event stream.
//!
//! A slow client must cost bounded memory and must not stall the node. When the queue is full, a
//! new friend position *supersedes* a queued one for the same friend (only the newest position
//! matters); failing that, the oldest queued position is dropped. Events that end or change
//! visibility (left, gone) and requests are never dropped; if the queue is full of those, the
//! session is closed with an explicit reason rather than growing without bound.

use std::collections::VecDeque;
use std::sync::Mutex;

use nearby_client::proto::Event;
use tokio::sync::Notify;

/// Events queued for one session.
pub struct EventQueue {
    state: Mutex<State>,
    notify: Notify,
    capacity: usize,
}

struct State {
    events: VecDeque<Event>,
    closed: Option<&'static str>,
    superseded: u64,
}

/// What [`EventQueue::pop`] yields.
#[derive(Debug, PartialEq)]
pub enum Popped {
    /// The next event.
    Event(Event),
    /// The queue is closed, for this reason.
    Closed(&'static str),
}

fn is_position(e: &Event) -> bool {
    matches!(e, Event::FriendMoved(_))
}

impl EventQueue {
    /// A queue holding at most `capacity` events.
    pub fn new(capacity: usize) -> Self {
        EventQueue {
            state: Mutex::new(State {
                events: VecDeque::new(),
                closed: None,
                superseded: 0,
            }),
            notify: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `event`; never blocks.
    pub fn push(&self, event: Event) {
        let mut s = self.lock();
        if s.closed.is_some() {
            return;
        }
        if s.events.len() >= self.capacity {
            // Only the friend's *latest* queued event may be replaced, and only if it is a
            // position: replacing an earlier one would move the new position ahead of a later
            // "left" or "gone".
            let friend = event.friend();
            let same = s
                .events
                .iter()
                .rposition(|e| e.friend() == friend)
                .filter(|&i| is_position(&s.events[i]) && is_position(&event));
            if let Some(i) = same {
                s.events[i] = event;
                s.superseded += 1;
                drop(s);
                self.notify.notify_one();
                return;
            }
            match s.events.iter().position(is_position) {
                Some(i) => {
                    s.events.remove(i);
                    s.superseded += 1;
                }
                None => {
                    s.closed = Some("event queue overflow: the client reads too slowly");
                    s.events.clear();
                    drop(s);
                    self.notify.notify_one();
                    return;
                }
            }
        }
        s.events.push_back(event);
        drop(s);
        self.notify.notify_one();
    }

    /// Closes the queue: the reader gets `reason` next, whatever is still queued.
    pub fn close(&self, reason: &'static str) {
        let mut s = self.lock();
        s.closed.get_or_insert(reason);
        drop(s);
        self.notify.notify_one();
    }

    /// Waits for the next event, or the close.
    pub async fn pop(&self) -> Popped {
        loop {
            let notified = self.notify.notified();
            {
                let mut s = self.lock();
                if let Some(reason) = s.closed {
                    return Popped::Closed(reason);
                }
                if let Some(e) = s.events.pop_front() {
                    return Popped::Event(e);
                }
            }
            notified.await;
        }
    }

    /// Positions dropped or replaced because the reader was slow.
    pub fn superseded(&self) -> u64 {
        self.lock().superseded
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearby_client::proto::{Coord, FriendPosition, GoneReason};
    use nearby_index::geo::Millis;

    fn moved(id: u64, t: u64) -> Event {
        Event::FriendMoved(FriendPosition {
            id,
            at: Coord { lat: 0.0, lon: 0.0 },
            distance_m: 1.0,
            updated_at: Millis(t),
        })
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
    async fn a_queue_full_of_undroppable_events_closes() {
        let q = EventQueue::new(2);
        for id in 0..3 {
            q.push(Event::FriendGone {
                id,
                reason: GoneReason::Inactive,
            });
        }
        assert!(matches!(q.pop().await, Popped::Closed(_)));
    }
}
