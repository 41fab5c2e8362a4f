//! Which run of each group's live state other groups are talking to. A group's live state
//! ([`crate::presence::Presence`]) is soft: it lives in the driver of the group's leader and is
//! gone when that driver stops — the subscriptions it held for other groups' viewers, the
//! listeners of its cells' channels, the mirrors it kept of other channels. Each run of a driver
//! is an *incarnation*, named by its Raft term and the wall-clock instant it started: runs of
//! one group are ordered (a term has one leader; its node starts a later run later), so a late
//! message from an earlier run is told apart from the current one's.
//!
//! The cluster map tells other groups when a group's leader or term changes, but not when the
//! same leader restarts its driver in the same term (its lease lapsed during a pause and was
//! confirmed again), and it tells them late (the map is replicated through the meta group). So
//! a new incarnation introduces itself: it sends [`GroupMessage::Started`] to every other group,
//! and again every [`RESEND_AFTER`] to those that have not confirmed. A group that hears of an
//! incarnation later than any it knew forgets what it knew of the earlier ones and subscribes,
//! listens and publishes again ([`crate::presence::Presence::resubscribe`]) before it confirms
//! with [`GroupMessage::StartedAck`]. These two messages carry no user's data: they leave
//! at once unless the read lease holds output they must not overtake (a confirmation must not
//! leave before the retractions forgetting the earlier run caused), so a sleeping group is not
//! woken to confirm another group's new run.
//!
//! Until every other group has confirmed, some group may still mirror what the predecessor's
//! channels told it, and this incarnation does not know which: it is *young*, and its channels
//! relay a withdrawal to every group rather than to the listeners they know
//! ([`crate::strangers::Strangers::set_young`]).
//!
//! Sans-IO like the presence it belongs to: calls with the time, [`Output`]s out.

use std::collections::{BTreeSet, HashMap};

use nearby_index::friends::RangeTable;
use nearby_raft::GroupId;

pub use crate::messages::Incarnation;
use crate::messages::{GroupMessage, Output};

/// How often an introduction is sent again to groups that have not confirmed it.
pub const RESEND_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Run `n` of a group's live state in term 1: the tests' shorthand.
#[cfg(test)]
pub(crate) fn run(n: u64) -> Incarnation {
    Incarnation {
        term: 1,
        started_ns: n,
    }
}

/// This group's incarnation, who confirmed it, and the incarnations of the others.
#[derive(Debug)]
pub struct Incarnations {
    group: GroupId,
    mine: Incarnation,
    /// Other groups that have not confirmed `mine` yet.
    unconfirmed: BTreeSet<GroupId>,
    /// The latest incarnation heard of each other group.
    known: HashMap<GroupId, Incarnation>,
}

impl Incarnations {
    /// The incarnation `mine` of `group`, not introduced yet (and so young).
    pub fn new(group: GroupId, mine: Incarnation) -> Self {
        Incarnations {
            group,
            mine,
            unconfirmed: BTreeSet::new(),
            known: HashMap::new(),
        }
    }

    /// This group's incarnation.
    pub fn mine(&self) -> Incarnation {
        self.mine
    }

    /// Introduces this incarnation to every other group of `ranges`.
    pub fn introduce(&mut self, ranges: &RangeTable<GroupId>, out: &mut Vec<Output>) {
        self.unconfirmed = ranges
            .ranges()
            .iter()
            .map(|(_, g)| *g)
            .filter(|g| *g != self.group)
            .collect();
        self.send(out);
    }

    /// Whether every group has confirmed this incarnation: none can still hold what a
    /// predecessor told it.
    pub fn settled(&self) -> bool {
        self.unconfirmed.is_empty()
    }

    /// `group` introduced its incarnation `incarnation`: confirms it, and returns whether it is
    /// news — later than any heard of before (the caller then forgets what it knew of `group`'s
    /// earlier runs, before the confirmation leaves). An earlier run's late introduction is
    /// confirmed (it is gone) and changes nothing.
    pub fn heard(&mut self, group: GroupId, incarnation: Incarnation, out: &mut Vec<Output>) -> bool {
        let news = group != self.group && self.known.get(&group).is_none_or(|k| incarnation > *k);
        if news {
            self.known.insert(group, incarnation);
        }
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
    pub fn confirmed(&mut self, group: GroupId, incarnation: Incarnation) {
        if incarnation == self.mine {
            self.unconfirmed.remove(&group);
        }
    }

    /// Sends the introduction again to the groups that have not confirmed it (the caller
    /// does every [`RESEND_AFTER`] of its own monotonic time — not the injected clock, which a
    /// test may hold still); a group gone from the map (merged away) is no longer waited for.
    pub fn resend(&mut self, ranges: &RangeTable<GroupId>, out: &mut Vec<Output>) {
        let live: BTreeSet<GroupId> = ranges.ranges().iter().map(|(_, g)| *g).collect();
        self.unconfirmed.retain(|g| live.contains(g));
        self.send(out);
    }

    fn send(&mut self, out: &mut Vec<Output>) {
        for &to in &self.unconfirmed {
            out.push(Output::Send {
                to,
                msg: GroupMessage::Started {
                    group: self.group,
                    incarnation: self.mine,
                },
            });
        }
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

    fn run(term: u64, started_ns: u64) -> Incarnation {
        Incarnation { term, started_ns }
    }

    fn introduced_to(out: &[Output], mine: Incarnation) -> Vec<GroupId> {
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
    fn an_incarnation_is_young_until_every_other_group_confirmed_it_and_is_resent_until_then() {
        let map = ranges(3);
        let mine = run(7, 77);
        let mut me = Incarnations::new(1, mine);
        let mut out = Vec::new();
        assert!(me.settled(), "nothing introduced yet means nothing to wait for");
        me.introduce(&map, &mut out);
        assert_eq!(introduced_to(&out, mine), vec![2, 3]);
        assert!(!me.settled());

        me.confirmed(2, mine);
        me.confirmed(3, run(7, 76)); // a predecessor's confirmation
        assert!(!me.settled());
        out.clear();
        me.resend(&map, &mut out);
        assert_eq!(
            introduced_to(&out, mine),
            vec![3],
            "sent again only where unconfirmed"
        );
        me.confirmed(3, mine);
        assert!(me.settled());
    }

    #[test]
    fn a_group_hearing_an_incarnation_confirms_it_always_and_reports_only_later_ones_as_news() {
        let mut me = Incarnations::new(1, run(1, 5));
        let mut out = Vec::new();
        assert!(
            me.heard(2, run(3, 40), &mut out),
            "the first incarnation heard of is news"
        );
        assert!(!me.heard(2, run(3, 40), &mut out), "a resend is not");
        assert!(me.heard(2, run(3, 41), &mut out), "a restart in the same term is");
        assert!(
            !me.heard(2, run(3, 40), &mut out),
            "an earlier run's late word is not"
        );
        assert!(me.heard(2, run(4, 1), &mut out), "a later term is");
        let acks: Vec<u64> = out
            .iter()
            .filter_map(|o| match o {
                Output::Send {
                    to: 2,
                    msg:
                        GroupMessage::StartedAck {
                            group: 1,
                            incarnation,
                        },
                } => Some(incarnation.started_ns),
                _ => None,
            })
            .collect();
        assert_eq!(acks, vec![40, 40, 41, 40, 1], "every introduction is confirmed");
    }

    #[test]
    fn a_single_group_is_never_young_and_a_merged_away_group_is_not_waited_for() {
        let mut alone = Incarnations::new(1, run(1, 9));
        let mut out = Vec::new();
        alone.introduce(&ranges(1), &mut out);
        assert!(alone.settled());
        assert!(out.is_empty());

        let mut me = Incarnations::new(1, run(1, 9));
        me.introduce(&ranges(2), &mut out);
        assert!(!me.settled());
        me.resend(&ranges(1), &mut out);
        assert!(me.settled(), "group 2 left the map");
    }

    #[test]
    fn a_later_start_in_the_same_term_is_a_later_run() {
        let a = Incarnation::starting(5);
        let b = Incarnation::starting(5);
        assert!(b >= a, "{a} then {b}");
        assert!(Incarnation::starting(6) > b);
    }
}
