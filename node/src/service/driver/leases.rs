//! The delivery leases the driver's connections write under, watched once for all of them.
//!
//! A connection that wrote events must have its client's acknowledgements by
//! [`DELIVERY_BOUND`] after the end of the lease they were let out under, or be closed (see the
//! driver's module doc). The end moves with every confirmed lease round, so a deadline per
//! connection woke every connection that ever had an event every couple of seconds, to find the
//! lease renewed. The bound is the lease's, the same for all its connections: the driver keeps
//! one deadline per lease (a handful: one per group driver that pushed here) and, when a lease
//! really ran out, checks the connections that hold it.

use std::sync::Arc;
use std::time::Instant;

use crate::queue::{DeliveryLease, LeaseClock, DELIVERY_BOUND};

/// The leases in use and, for each, the end whose bound was already handled.
#[derive(Default)]
pub(super) struct LeaseWatch {
    leases: Vec<Watched>,
}

struct Watched {
    lease: Arc<DeliveryLease>,
    /// The end whose bound was handled; the lease needs a look again only if it moves.
    swept: Option<LeaseClock>,
}

impl LeaseWatch {
    /// Watches `lease` (a connection took it); a lease watched already is not added again, and
    /// the leases nobody else holds any more are forgotten.
    pub(super) fn watch(&mut self, lease: &Arc<DeliveryLease>) {
        if !self.leases.iter().any(|w| Arc::ptr_eq(&w.lease, lease)) {
            self.leases.retain(|w| Arc::strong_count(&w.lease) > 1);
            self.leases.push(Watched {
                lease: Arc::clone(lease),
                swept: None,
            });
        }
    }

    /// The earliest bound not yet handled.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.leases
            .iter()
            .filter_map(|w| w.lease.ends().filter(|end| w.swept != Some(*end)))
            .min()
            .map(|end| end.after(DELIVERY_BOUND).instant())
    }

    /// Moves the leases whose bound passed by `now` into `due` (each end once).
    pub(super) fn due(&mut self, now: LeaseClock, due: &mut Vec<Arc<DeliveryLease>>) {
        for w in &mut self.leases {
            let Some(end) = w.lease.ends() else {
                continue;
            };
            if w.swept != Some(end) && end.after(DELIVERY_BOUND) <= now {
                w.swept = Some(end);
                due.push(Arc::clone(&w.lease));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_lease_is_due_once_per_end_and_forgotten_when_nobody_holds_it() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let at = LeaseClock::at;
        let mut watch = LeaseWatch::default();
        let mut due = Vec::new();
        let never = Arc::new(DeliveryLease::default());
        watch.watch(&never);
        assert_eq!(watch.next_deadline(), None, "never confirmed: no bound");

        let lease = Arc::new(DeliveryLease::default());
        lease.extend(now + ms(600));
        watch.watch(&lease);
        watch.watch(&lease);
        let bound = watch.next_deadline().expect("a confirmed lease has a bound");
        assert!(bound >= now + ms(600) + DELIVERY_BOUND - ms(1));
        watch.due(at(bound - ms(10)), &mut due);
        assert!(due.is_empty(), "not yet");

        lease.extend(now + ms(1_200));
        watch.due(at(bound + ms(10)), &mut due);
        assert!(due.is_empty(), "renewed: its bound moved");

        let later = watch.next_deadline().expect("still watched");
        watch.due(at(later), &mut due);
        assert_eq!(due.len(), 1, "ran out: due");
        assert!(Arc::ptr_eq(&due[0], &lease));
        due.clear();
        assert_eq!(watch.next_deadline(), None, "each end is handled once");
        watch.due(at(later + ms(5_000)), &mut due);
        assert!(due.is_empty());

        lease.extend(now + ms(10_000));
        assert!(watch.next_deadline().is_some(), "renewed after it ran out");

        drop(lease);
        drop(never);
        let next = Arc::new(DeliveryLease::default());
        watch.watch(&next);
        assert_eq!(watch.leases.len(), 1, "nobody holds the others: forgotten");
    }
}
