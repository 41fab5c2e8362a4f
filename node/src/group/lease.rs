//! The read lease of a led group: nothing derived from the group's live state leaves its driver —
//! no event to a session, no message to another group, no acknowledgement, no page — unless this
//! node is known to lead the group at that moment. Everything leaves in the order it was made,
//! the answers to authors of visibility-ending changes included: an author is never told before
//! an event or page made earlier has left.
//!
//! A deposed leader learns that it was deposed only when it hears of the new term. Cut off from
//! its quorum (a partition, a one-way cut) or frozen (a paused process, a long GC-like stall), it
//! keeps its presence and would go on serving the sessions that still reach it: a page listing a
//! friend who has since hidden from the viewer, the hide acknowledged to its author by the
//! group's new leader. The supervisor's lease check (`cluster`) stops such a driver within
//! seconds, but it is a timer: a process woken from a pause answers what waited in its sockets
//! before any timer fires.
//!
//! Raft followers refuse to vote for anyone else for [`LEADER_LEASE`] after they last heard from
//! their leader. A round of heartbeats that a quorum answered, started at `t`, therefore proves
//! that this node is the group's only leader from before `t` until `t + LEADER_LEASE`. The driver
//! serves under [`READ_LEASE`] from the start of its last confirmed round, starts the next round
//! [`RENEW_BEFORE`] ahead of the end while it is busy, and holds what it produces while it has no
//! lease. Held items leave in order once a round confirms: a round that started after an item was
//! made shows that the item was made by the only leader, and a lease valid now covers everything
//! made since its round started. A round that finds another leader drops what was held (the
//! publishers send their revocations again to the leader there is now) and answers the held
//! requests `moved` (the SDK sends them again). A leader that steps down by voting for another (a
//! leadership transfer) knows at once: its Raft state says so, and the lease ends with it.
//!
//! What a driver lets out to its sessions can still be on its way to their clients after the
//! lease ends (queued, or sent and not yet acknowledged): the lease is shared with the sessions'
//! writers as a [`DeliveryLease`], which bounds that too.
//!
//! The cost is one confirmation round per busy group every `READ_LEASE - RENEW_BEFORE`, and a
//! round trip of delay for the first output of a group that was quiet for longer than the lease.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use nearby_client::proto::{NearbyPage, StrangerPage};
use nearby_index::geo::UserId;
use nearby_raft::{ShardGroup, LEADER_LEASE};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::api::{LocationAck, ServiceError};
use crate::messages::Output;
use crate::queue::DeliveryLease;

type ServerMetrics = openraft::metrics::RaftServerMetrics<nearby_raft::NodeId, nearby_raft::Node>;

/// How long after a confirmation round started the driver serves: shorter than [`LEADER_LEASE`]
/// by a margin for the timers' granularity.
pub const READ_LEASE: Duration = Duration::from_millis(LEADER_LEASE.as_millis() as u64 * 3 / 4);

/// A busy driver starts its next round this long before its lease ends.
pub const RENEW_BEFORE: Duration = Duration::from_millis(READ_LEASE.as_millis() as u64 / 2);

/// A round not answered in this time is given up (and another started while items wait).
const ROUND_TIMEOUT: Duration = Duration::from_secs(2);

/// After a round that neither confirmed nor found another leader (a quorum out of reach), the
/// next waits this long: a cut-off leader does not spin on rounds that fail at once.
const RETRY_AFTER: Duration = Duration::from_millis(50);

/// The most items held: a driver whose rounds keep failing to conclude drops the oldest
/// (positions only matter when current; its supervisor stops it within seconds anyway).
const MAX_HELD: usize = 65_536;

const _: () = assert!(READ_LEASE.as_millis() < LEADER_LEASE.as_millis());

/// An answer that carries others' live state, or confirms what this node fanned out.
pub enum Answer {
    /// A location of the user: acknowledged once its fan-out has left (a session's first, with
    /// its first page).
    Location(
        UserId,
        oneshot::Sender<Result<LocationAck, ServiceError>>,
        Result<LocationAck, ServiceError>,
    ),
    /// A page of friends nearby, for the user.
    Page(
        UserId,
        oneshot::Sender<Result<NearbyPage, ServiceError>>,
        Result<NearbyPage, ServiceError>,
    ),
    /// A page of strangers nearby.
    Strangers(
        oneshot::Sender<Result<StrangerPage, ServiceError>>,
        Result<StrangerPage, ServiceError>,
    ),
    /// A visibility-ending change settled (its revocations confirmed, or not in time): its
    /// author is told only after everything this group made before has left — a page or an
    /// event about the author made before the change must not reach a viewer after the author
    /// was told it ended.
    Settled(
        Vec<oneshot::Sender<Result<(), ServiceError>>>,
        Result<(), ServiceError>,
    ),
}

impl Answer {
    /// Sends the answer.
    pub fn send(self) {
        match self {
            Answer::Location(_, tx, r) => drop(tx.send(r)),
            Answer::Page(_, tx, r) => drop(tx.send(r)),
            Answer::Strangers(tx, r) => drop(tx.send(r)),
            Answer::Settled(waiters, r) => {
                for w in waiters {
                    let _ = w.send(r.clone());
                }
            }
        }
    }

    /// Answers `moved`: the request goes again to the group's leader there is now.
    pub fn moved(self) {
        let gone = ServiceError::moved;
        match self {
            Answer::Location(_, tx, _) => drop(tx.send(Err(gone()))),
            Answer::Page(_, tx, _) => drop(tx.send(Err(gone()))),
            Answer::Strangers(tx, _) => drop(tx.send(Err(gone()))),
            Answer::Settled(waiters, _) => {
                for w in waiters {
                    let _ = w.send(Err(gone()));
                }
            }
        }
    }
}

/// What leaves a driver.
pub enum Item {
    /// An output of the presence (to a session, or to another group).
    Output(Output),
    /// An answer to a request.
    Answer(Answer),
}

/// The lease and what waits for it.
pub struct Lease {
    group: ShardGroup,
    /// The replica's Raft role, as its core last reported it.
    raft: tokio::sync::watch::Receiver<ServerMetrics>,
    /// Until when this node serves (from the start of the last confirmed round).
    until: Option<Instant>,
    /// The round in flight and when it started.
    round: Option<(tokio::task::JoinHandle<bool>, Instant)>,
    /// What was made without a lease, with when, in order.
    held: VecDeque<(Instant, Item)>,
    /// When something last left under the lease (a busy group renews ahead of time).
    last_out: Option<Instant>,
    /// No round before this (see [`RETRY_AFTER`]).
    not_before: Option<Instant>,
    /// The lease as the sessions' writers see it.
    delivery: Arc<DeliveryLease>,
}

impl Lease {
    /// No lease yet: the first output waits for the first round. `delivery` follows the lease.
    pub fn new(group: ShardGroup, delivery: Arc<DeliveryLease>) -> Self {
        Lease {
            delivery,
            raft: group.raft().server_metrics(),
            group,
            until: None,
            round: None,
            held: VecDeque::new(),
            last_out: None,
            not_before: None,
        }
    }

    /// Whether this node serves now: a confirmed round's lease runs and Raft still says it leads.
    fn serves(&self, now: Instant) -> bool {
        if !self.leads() {
            // Stepped down (a vote for another): what left is bounded from now.
            self.delivery.end(now.into_std());
            return false;
        }
        self.until.is_some_and(|u| now < u)
    }

    /// Whether Raft says this replica leads (a vote for another candidate ends it at once).
    fn leads(&self) -> bool {
        self.raft.borrow().state.is_leader()
    }

    /// Lets `item` leave through `out` now if the lease allows (and nothing older waits),
    /// holds it otherwise.
    pub fn emit(&mut self, item: Item, out: &mut impl FnMut(Item)) {
        let now = Instant::now();
        if self.held.is_empty() && self.serves(now) {
            self.last_out = Some(now);
            out(item);
            return;
        }
        if self.held.len() >= MAX_HELD {
            if let Some((_, old)) = self.held.pop_front() {
                tracing::warn!(
                    group = self.group.id(),
                    "no lease for long: dropping the oldest held output"
                );
                drop_item(old);
            }
        }
        self.held.push_back((now, item));
    }

    /// `viewer` may no longer see `about`: what is held for the viewer forgets `about` (see
    /// [`retract`]).
    pub fn retract(&mut self, viewer: UserId, about: UserId) {
        retract(&mut self.held, viewer, about);
    }

    /// Whether something waits for a round.
    pub fn holds(&self) -> bool {
        !self.held.is_empty()
    }

    /// Starts a round if something waits, or if the group is busy and its lease ends soon.
    pub fn renew(&mut self) {
        let now = Instant::now();
        if self.round.is_some() || self.not_before.is_some_and(|t| now < t) {
            return;
        }
        let busy = self.last_out.is_some_and(|t| now.duration_since(t) < READ_LEASE);
        let ending = self
            .until
            .is_none_or(|u| u.saturating_duration_since(now) < RENEW_BEFORE);
        if self.held.is_empty() && !(busy && ending) {
            return;
        }
        let group = self.group.clone();
        let task = tokio::spawn(async move {
            matches!(
                tokio::time::timeout(ROUND_TIMEOUT, group.read_linearizable(|_| ())).await,
                Ok(Ok(()))
            )
        });
        self.round = Some((task, now));
    }

    /// When the driver must wake to start a round for what it holds (none: no need).
    pub fn next_wake(&self) -> Option<Instant> {
        match self.not_before {
            Some(t) if self.round.is_none() && !self.held.is_empty() => Some(t),
            _ => None,
        }
    }

    /// Waits for the round in flight; never ready without one.
    pub async fn confirmed(&mut self) -> bool {
        match &mut self.round {
            Some((task, _)) => task.await.unwrap_or(false),
            None => std::future::pending().await,
        }
    }

    /// The round in flight ended (`leads`: a quorum confirmed it): releases what it covers
    /// through `out`, or — if this node no longer leads — drops the held outputs and answers
    /// the held requests `moved`.
    pub fn concluded(&mut self, leads: bool, out: &mut impl FnMut(Item)) {
        let Some((_, started)) = self.round.take() else {
            return;
        };
        if leads {
            let until = started + READ_LEASE;
            self.until = Some(self.until.map_or(until, |u| u.max(until)));
            let now = Instant::now();
            if self.leads() {
                self.delivery.extend(until.into_std());
            }
            let all = self.serves(now);
            while let Some((made, _)) = self.held.front() {
                if !all && *made > started {
                    break;
                }
                if let Some((_, item)) = self.held.pop_front() {
                    self.last_out = Some(now);
                    out(item);
                }
            }
            return;
        }
        if self.leads() {
            // Not confirmed, not deposed either (a quorum out of reach): a later round decides.
            tracing::debug!(
                group = self.group.id(),
                held = self.held.len(),
                "lease round inconclusive"
            );
            self.not_before = Some(Instant::now() + RETRY_AFTER);
            return;
        }
        tracing::debug!(
            group = self.group.id(),
            held = self.held.len(),
            "leadership not confirmed: held outputs dropped"
        );
        self.until = None;
        self.drop_held();
    }

    /// Drops every held output and answers every held request `moved` (the driver stops); the
    /// lease ends now.
    pub fn drop_held(&mut self) {
        self.delivery.end(std::time::Instant::now());
        for (_, item) in std::mem::take(&mut self.held) {
            drop_item(item);
        }
        if let Some((task, _)) = self.round.take() {
            task.abort();
        }
    }
}

/// Removes from `held` what would show `about` to `viewer`: events about `about` pushed to
/// the viewer, and `about`'s entries in pages answered to the viewer. Held output has not left
/// the node, so a revocation processed while it waits must reach it too: otherwise a page made
/// just before a hide left with the hidden friend in it together with — or after — the
/// acknowledgement that the hide took effect.
fn retract(held: &mut VecDeque<(Instant, Item)>, viewer: UserId, about: UserId) {
    let forget = |page: &mut NearbyPage| page.friends.retain(|f| f.id != about);
    held.retain_mut(|(_, item)| match item {
        Item::Output(Output::Push { viewer: v, event }) => *v != viewer || event.friend() != Some(about),
        Item::Answer(Answer::Page(v, _, Ok(page))) if *v == viewer => {
            forget(page);
            true
        }
        Item::Answer(Answer::Location(v, _, Ok(LocationAck::Started { page, .. }))) if *v == viewer => {
            forget(page);
            true
        }
        _ => true,
    });
}

fn drop_item(item: Item) {
    if let Item::Answer(a) = item {
        a.moved();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use nearby_client::proto::{Coord, Event, FriendPosition, NearbyFriend, Relation};
    use nearby_index::geo::Millis;

    /// A friend 100 m away, for pages in tests.
    pub(crate) fn friend(id: UserId) -> NearbyFriend {
        NearbyFriend {
            id,
            relation: Relation::Friend,
            name: format!("user {id}"),
            distance_m: 100.0,
            updated_at: Millis(1),
        }
    }

    fn moved(viewer: UserId, about: UserId) -> Item {
        Item::Output(Output::Push {
            viewer,
            event: Event::FriendMoved(FriendPosition {
                id: about,
                at: Coord { lat: 52.5, lon: 13.4 },
                distance_m: 100.0,
                updated_at: Millis(1),
            }),
        })
    }

    #[test]
    fn a_revocation_reaches_what_is_held_for_the_viewer_and_nothing_else() {
        let (viewer, other_viewer, hidden, friend_still) = (1, 2, 10, 11);
        let page = |v| {
            let (tx, rx) = oneshot::channel();
            let page = NearbyPage {
                friends: vec![friend(hidden), friend(friend_still)],
                next: None,
            };
            (Item::Answer(Answer::Page(v, tx, Ok(page))), rx)
        };
        let (first_tx, first_rx) = oneshot::channel();
        let first = Item::Answer(Answer::Location(
            viewer,
            first_tx,
            Ok(LocationAck::Started {
                page: NearbyPage {
                    friends: vec![friend(hidden)],
                    next: None,
                },
                next_update_s: 30,
            }),
        ));
        let (mine, mut mine_rx) = page(viewer);
        let (theirs, mut theirs_rx) = page(other_viewer);
        let now = Instant::now();
        let mut held: VecDeque<(Instant, Item)> = [
            moved(viewer, hidden),
            moved(viewer, friend_still),
            moved(other_viewer, hidden),
            mine,
            theirs,
            first,
        ]
        .into_iter()
        .map(|i| (now, i))
        .collect();

        retract(&mut held, viewer, hidden);

        // The event about the hidden friend to the viewer is gone; the others stay, in order.
        let pushes: Vec<(UserId, Option<UserId>)> = held
            .iter()
            .filter_map(|(_, i)| match i {
                Item::Output(Output::Push { viewer, event }) => Some((*viewer, event.friend())),
                _ => None,
            })
            .collect();
        assert_eq!(
            pushes,
            vec![(viewer, Some(friend_still)), (other_viewer, Some(hidden))]
        );
        for (_, item) in held {
            if let Item::Answer(a) = item {
                a.send();
            }
        }
        let ids = |p: NearbyPage| p.friends.iter().map(|f| f.id).collect::<Vec<_>>();
        let mine = mine_rx.try_recv().expect("answered").expect("a page");
        assert_eq!(ids(mine), vec![friend_still]);
        let theirs = theirs_rx.try_recv().expect("answered").expect("a page");
        assert_eq!(ids(theirs), vec![hidden, friend_still]);
        match first_rx.blocking_recv().expect("answered").expect("started") {
            LocationAck::Started { page, .. } => assert!(page.friends.is_empty()),
            other => panic!("{other:?}"),
        }
    }
}
