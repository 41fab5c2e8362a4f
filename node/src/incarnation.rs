//! Which run of each group's live state other groups are talking to. A group's live state
//! ([`crate::presence::Presence`]) is soft: it lives in the driver of the group's leader and is
//! gone when that driver stops — the subscriptions it held for other groups' viewers, the
//! listeners of its cells' channels, the mirrors it kept of other channels. Each run of a driver
//! is an *incarnation*, named by a random number drawn when it starts.
//!
//! The cluster map tells other groups when a group's leader or term changes, but not when the
//! same leader restarts its driver in the same term (its lease lapsed during a pause and was
//! confirmed again), and it tells them late (the map is replicated through the meta group). So
//! a new incarnation introduces itself: it sends [`GroupMessage::Started`] to every other group,
//! and again every [`RESEND_AFTER`] to those that have not confirmed. A group that hears of an
//! incarnation it did not know forgets what it knew of the previous one and subscribes, listens
//! and publishes again ([`crate::presence::Presence::resubscribe`]) before it confirms with
//! [`GroupMessage::StartedAck`].
//!
//! Until every other group has confirmed, some group may still mirror what the predecessor's
//! channels told it, and this incarnation does not know which: it is *young*, and its channels
//! relay a withdrawal to every group rather than to the listeners they know
//! ([`crate::strangers::Strangers::set_young`]).
//!
//! Sans-IO like the presence it belongs to: calls with the time, [`Output`]s out.

use std::collections::{BTreeSet, HashMap};

use nearby_index::friends::RangeTable;
use nearby_index::geo::Millis;
use nearby_raft::GroupId;

use crate::messages::{GroupMessage, Output};

/// How often an introduction is sent again to groups that have not confirmed it.
pub const RESEND_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// A fresh incarnation number: random, so that no two runs of a group's driver — on any node,
/// before or after a restart — share one.
pub fn fresh() -> u64 {
    let mut bytes = [0u8; 8];
    let rng = ring::rand::SystemRandom::new();
    if ring::rand::SecureRandom::fill(&rng, &mut bytes).is_err() {
        // No system randomness: the wall clock's nanoseconds still differ between runs.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return nanos;
    }
    u64::from_le_bytes(bytes)
}

/// This group's incarnation, who confirmed it, and the incarnations of the others.
#[derive(Debug)]
pub struct Incarnations {
    group: GroupId,
    mine: u64,
    /// Other groups that have not confirmed `mine` yet.
    unconfirmed: BTreeSet<GroupId>,
    /// When the introduction is next sent again to them.
    resend_at: Millis,
    /// The latest incarnation heard of each other group.
    known: HashMap<GroupId, u64>,
}

impl Incarnations {
    /// The incarnation `mine` of `group`, not introduced yet (and so young).
    pub fn new(group: GroupId, mine: u64) -> Self {
        Incarnations {
            group,
            mine,
            unconfirmed: BTreeSet::new(),
            resend_at: Millis(u64::MAX),
            known: HashMap::new(),
        }
    }

    /// This group's incarnation.
    pub fn mine(&self) -> u64 {
        self.mine
    }

    /// Introduces this incarnation to every other group of `ranges`.
    pub fn introduce(&mut self, ranges: &RangeTable<GroupId>, now: Millis, out: &mut Vec<Output>) {
        self.unconfirmed = ranges
            .ranges()
            .iter()
            .map(|(_, g)| *g)
            .filter(|g| *g != self.group)
            .collect();
        self.send(now, out);
    }

    /// Whether every group has confirmed this incarnation: none can still hold what a
    /// predecessor told it.
    pub fn settled(&self) -> bool {
        self.unconfirmed.is_empty()
    }

    /// `group` introduced its incarnation `incarnation`: confirms it, and returns whether it is
    /// news (the caller then forgets what it knew of `group`'s previous incarnation, before the
    /// confirmation leaves).
    pub fn heard(&mut self, group: GroupId, incarnation: u64, out: &mut Vec<Output>) -> bool {
        let news = group != self.group && self.known.insert(group, incarnation) != Some(incarnation);
        out.push(Output::Send {
            to: group,
            msg: GroupMessage::StartedAck {
                group: self.group,
                incarnation,
            },
        });
        news
    }

    /// `group` confirmed incarnation `incarnation` of this group (an earlier one's confirmation
    /// is not this one's).
    pub fn confirmed(&mut self, group: GroupId, incarnation: u64) {
        if incarnation == self.mine {
            self.unconfirmed.remove(&group);
        }
    }

    /// When [`Incarnations::tick`] must next run.
    pub fn next_deadline(&self) -> Option<Millis> {
        (!self.settled()).then_some(self.resend_at)
    }

    /// Sends the introduction again to the groups that have not confirmed it, if due; a group
    /// gone from the map (merged away) is no longer waited for.
    pub fn tick(&mut self, ranges: &RangeTable<GroupId>, now: Millis, out: &mut Vec<Output>) {
        if self.settled() || now < self.resend_at {
            return;
        }
        let live: BTreeSet<GroupId> = ranges.ranges().iter().map(|(_, g)| *g).collect();
        self.unconfirmed.retain(|g| live.contains(g));
        self.send(now, out);
    }

    fn send(&mut self, now: Millis, out: &mut Vec<Output>) {
        for &to in &self.unconfirmed {
            out.push(Output::Send {
                to,
                msg: GroupMessage::Started {
                    group: self.group,
                    incarnation: self.mine,
                },
            });
        }
        self.resend_at = now.saturating_add(RESEND_AFTER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearby_raft::meta::initial_ranges;

    fn ranges(groups: u64) -> RangeTable<GroupId> {
        let entries = initial_ranges(groups).into_iter().map(|(g, r)| (r, g)).collect();
        RangeTable::new(entries).expect("ranges")
    }

    fn introduced_to(out: &[Output], mine: u64) -> Vec<GroupId> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send {
                    to,
                    msg: GroupMessage::Started { incarnation, .. },
                } if *incarnation == mine => Some(*to),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_incarnation_is_young_until_every_other_group_confirmed_it_and_is_sent_again_until_then() {
        let map = ranges(3);
        let mut me = Incarnations::new(1, 77);
        let mut out = Vec::new();
        assert!(me.settled(), "nothing introduced yet means nothing to wait for");
        me.introduce(&map, Millis(1_000), &mut out);
        assert_eq!(introduced_to(&out, 77), vec![2, 3]);
        assert!(!me.settled());
        assert_eq!(me.next_deadline(), Some(Millis(2_000)));

        me.confirmed(2, 77);
        me.confirmed(3, 76); // a predecessor's confirmation
        assert!(!me.settled());
        out.clear();
        me.tick(&map, Millis(1_500), &mut out);
        assert!(out.is_empty(), "not due yet");
        me.tick(&map, Millis(2_000), &mut out);
        assert_eq!(
            introduced_to(&out, 77),
            vec![3],
            "sent again only where unconfirmed"
        );
        me.confirmed(3, 77);
        assert!(me.settled());
        assert_eq!(me.next_deadline(), None);
    }

    #[test]
    fn a_group_hearing_an_incarnation_confirms_it_always_and_reports_news_once() {
        let mut me = Incarnations::new(1, 5);
        let mut out = Vec::new();
        assert!(
            me.heard(2, 40, &mut out),
            "the first incarnation heard of is news"
        );
        assert!(!me.heard(2, 40, &mut out), "a resend is not");
        assert!(me.heard(2, 41, &mut out), "a restart in the same term is");
        let acks: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Send {
                    to: 2,
                    msg:
                        GroupMessage::StartedAck {
                            group: 1,
                            incarnation,
                        },
                } => Some(*incarnation),
                _ => None,
            })
            .collect();
        assert_eq!(acks, vec![40, 40, 41], "every introduction is confirmed");
    }

    #[test]
    fn a_single_group_is_never_young_and_a_merged_away_group_is_not_waited_for() {
        let mut alone = Incarnations::new(1, 9);
        let mut out = Vec::new();
        alone.introduce(&ranges(1), Millis(0), &mut out);
        assert!(alone.settled());
        assert!(out.is_empty());

        let mut me = Incarnations::new(1, 9);
        me.introduce(&ranges(2), Millis(0), &mut out);
        assert!(!me.settled());
        me.tick(&ranges(1), Millis(1_000), &mut out);
        assert!(me.settled(), "group 2 left the map");
    }

    #[test]
    fn fresh_incarnations_differ() {
        let a = fresh();
        let b = fresh();
        assert_ne!(a, b);
    }
}
