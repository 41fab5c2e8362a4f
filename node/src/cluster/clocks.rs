//! How far this node's wall clock is from the other nodes': every [`CHECK_EVERY`] each other
//! node in the map is asked its time ([`PeerRequest::Clock`]); a reading is the answer minus the
//! system clock at the request's midpoint, kept if the round trip was short enough to say
//! something. With readings from enough nodes to make a majority with this one, their median
//! is handed to the node's [`GuardedClock`], which decides whether a step of the system clock
//! is followed, ignored, or the cluster's time taken instead (see `crate::clock`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nearby_raft::NodeId;

use super::Cluster;
use crate::clock::{GuardedClock, MAX_OFFSET_MS};
use crate::route::peer::{PeerRequest, PeerResponse};

/// How often the other nodes are asked.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Readings over a longer round trip say too little (half of it is the error).
const MAX_RTT: Duration = Duration::from_millis(200);

/// How long a reading counts.
const FRESH: Duration = Duration::from_secs(5);

impl Cluster {
    /// The clock check's loop (see the module doc); returns at once without a guard.
    pub(super) async fn check_clocks(self: Arc<Self>) {
        let Some(guard) = self.clock_guard.clone() else {
            return;
        };
        let mut readings: HashMap<NodeId, (i64, Instant)> = HashMap::new();
        let mut every = nearby_raft::timers::aligned_interval(CHECK_EVERY);
        loop {
            every.tick().await;
            let others: Vec<NodeId> = self
                .directory
                .view()
                .map
                .nodes
                .keys()
                .copied()
                .filter(|n| *n != self.me)
                .collect();
            let asks = others.iter().map(|&node| {
                let guard = Arc::clone(&guard);
                let peers = Arc::clone(self.router.peers());
                async move { (node, ask(&guard, &peers, node).await) }
            });
            for (node, reading) in futures::future::join_all(asks).await {
                if let Some(r) = reading {
                    readings.insert(node, (r, Instant::now()));
                }
            }
            readings.retain(|n, (_, at)| others.contains(n) && at.elapsed() < FRESH);
            let fresh: Vec<i64> = readings.values().map(|(r, _)| *r).collect();
            if let Some((v, agreed)) = verdict(&fresh, others.len()) {
                guard.confirm(v, agreed);
            }
        }
    }
}

/// `node`'s time minus this node's system clock, if it answered quickly enough (a round waits
/// at most [`CHECK_EVERY`] for a node that does not answer).
async fn ask(guard: &GuardedClock, peers: &crate::route::peer::Peers, node: NodeId) -> Option<i64> {
    let sent = guard.source_now().0 as i64;
    let t0 = Instant::now();
    let answer = peers.call_within(node, &PeerRequest::Clock, CHECK_EVERY).await;
    let rtt = t0.elapsed();
    match answer {
        Ok(PeerResponse::Clock { now_ms }) if rtt <= MAX_RTT => {
            Some(now_ms as i64 - (sent + rtt.as_millis() as i64 / 2))
        }
        _ => None,
    }
}

/// The cluster's time minus this node's system clock from `readings` of some of the `others`:
/// none unless the nodes read and this one make a majority of the cluster; their median, and of
/// two middle readings the one nearer this node's clock (it makes a majority with this node).
/// With it, whether a majority of the cluster without this node agrees on it (readings within
/// [`MAX_OFFSET_MS`] of it): only such a verdict may move this node's time.
fn verdict(readings: &[i64], others: usize) -> Option<(i64, bool)> {
    if readings.is_empty() || (readings.len() + 1) * 2 <= others + 1 {
        return None;
    }
    let mut v = readings.to_vec();
    v.sort_unstable();
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 {
        v[mid]
    } else if v[mid - 1].abs() <= v[mid].abs() {
        v[mid - 1]
    } else {
        v[mid]
    };
    let agreeing = v.iter().filter(|r| r.abs_diff(median) <= MAX_OFFSET_MS).count();
    Some((median, agreeing * 2 > others + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_needs_a_majority_and_is_the_median() {
        // Alone with no answer, or one answer of four others: no majority.
        assert_eq!(verdict(&[], 2), None);
        assert_eq!(verdict(&[10], 4), None);
        // Three nodes: one answer makes a majority with this node, but only both others
        // agreeing may move this node's time.
        assert_eq!(verdict(&[-60_000], 2), Some((-60_000, false)));
        // Both others say this node is off: it is.
        assert_eq!(verdict(&[-60_000, -59_990], 2), Some((-59_990, true)));
        // One says so, the other agrees with this node: the one that agrees makes the majority.
        assert_eq!(verdict(&[-60_000, 3], 2), Some((3, false)));
        assert_eq!(verdict(&[-60_000, 3, 5, 7], 4), Some((3, true)));
        // Two nodes never move each other's time (they would swap clocks).
        assert_eq!(verdict(&[5_000], 1), Some((5_000, false)));
    }
}
