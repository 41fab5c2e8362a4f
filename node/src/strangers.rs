//! Strangers nearby: H3 cells as channels between discoverable users and the users who look
//! for strangers around them. Sans-IO like [`crate::presence`], whose group it lives in: inputs
//! are calls with the group's replicated state and the time, outputs are [`Output`]s.
//!
//! # Three roles, every group plays all of them
//!
//! - **Publisher** (the home group of a discoverable user P): on each of P's locations that P's
//!   own record allows strangers to see (`discoverable`, sharing on, not a ghost), it sends
//!   [`CellMessage::Publish`] to the owner of P's cell, and [`CellMessage::Retract`] to the
//!   owner of the cell P left. When a change ends P's visibility to strangers (discoverable off,
//!   ghost mode, sharing off) the retraction asks for an acknowledgement under the change's
//!   barrier, like a friend's revocation.
//! - **Channel** (the owner of a cell): holds the latest position of every discoverable user in
//!   the cell and the set of *listener groups*, and relays publications and retractions to
//!   them. A retraction that asks for an acknowledgement is acknowledged upstream only once
//!   every listener group has acknowledged it ([`Relay`]).
//! - **Listener** (the home group of a user V who asked for strangers): subscribes, once per
//!   group and cell, to the cells covering V's radius ([`CellMessage::Listen`]), mirrors their
//!   contents, and shows V the nearest [`MAX_SHOWN`]-bounded page, never a friend, a followed
//!   user or V itself, each under a pseudonym and at a distance rounded up to
//!   [`STRANGER_STEP_M`]. Nothing that reaches V carries a user id or a finer distance.
//!
//! # Who owns a cell, and why
//!
//! A cell's channel lives in the group whose user-id range contains a fixed 64-bit mix of the
//! cell id ([`cell_key`]). The ranges tile the id space, so the cells of one busy city are
//! spread over all groups in proportion to their ranges (a stadium is one channel among many,
//! not a node's whole load), and ownership follows the cluster map like users do: no second
//! placement scheme, no extra state to move. Channels are soft state: after a channel's leader
//! changes, listener groups listen again and publisher groups publish their users again.
//!
//! # Failover
//!
//! A channel drops every entry whose publisher group changed leader (that group's new leader
//! does not know where its users were published, so it could not retract them), and listener
//! groups drop the contents of cells whose channel changed leader. A new publisher-group leader
//! holds visibility-ending acknowledgements for the same grace as friends' revocations
//! ([`crate::group::driver::RESUBSCRIBE_GRACE`]), by which time the channels have seen the map.
//! A new run of a channel's group (a new leader, or the same leader's driver restarted) does
//! not know which groups still mirror what its predecessor told them: it introduces itself to
//! every group ([`crate::incarnation`]), each of which drops its mirrors of the group's cells
//! and listens again, and until all have confirmed it relays a withdrawal to every group, not
//! only to the listeners it knows ([`Strangers::set_young`]). A sighting relayed to a listener
//! group's earlier run never reaches the run there is now by being routed again (locations are
//! not, see [`crate::route::peer`]), and one that reaches a mirror still waiting for its contents
//! is ignored: the new run may have started after a withdrawal it never heard of.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use nearby_client::proto::{Event, Stranger, STRANGER_STEP_M};
use nearby_index::cells::CellIndexer;
use nearby_index::friends::RangeTable;
use nearby_index::geo::{LatLng, Millis, UserId};
use nearby_index::ttl::LatestLocation;
use nearby_raft::{GroupId, GroupState};

use crate::incarnation::Incarnation;

pub use crate::messages::CellMessage;
use crate::messages::{Barrier, GroupMessage, Output};

/// The most strangers a listener is shown live (and a page may hold).
pub const MAX_SHOWN: usize = 100;

/// How many cells a user left are remembered for its withdrawal (see `Strangers::left`).
pub const MAX_LEFT: usize = 8;

/// The barrier index of relayed acknowledgements: never a log index.
pub const RELAY_INDEX: u64 = u64::MAX;

/// The point of the user-id space a cell's channel lives at: a fixed mix of the cell id
/// (SplitMix64's finaliser), so neighbouring cells land far apart; kept inside the ranges'
/// span (ids 1 to `u64::MAX - 1`).
pub fn cell_key(cell: u64) -> u64 {
    let mut z = cell.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).clamp(nearby_raft::meta::FIRST_USER_ID, u64::MAX - 1)
}

/// A distance as strangers see it: rounded up to [`STRANGER_STEP_M`] (so anything up to the
/// step reads as the step).
pub fn rounded(distance_m: f64) -> u32 {
    let step = f64::from(STRANGER_STEP_M);
    let steps = (distance_m / step).ceil().max(1.0);
    (steps * step).min(f64::from(u32::MAX)) as u32
}

/// Derives per-viewer pseudonyms from the cluster's pseudonym key.
#[derive(Clone)]
pub struct Pseudonyms {
    key: ring::hmac::Key,
}

impl std::fmt::Debug for Pseudonyms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonyms(..)")
    }
}

impl Pseudonyms {
    /// Pseudonyms keyed by `secret` (the cluster's, the same on every node).
    pub fn new(secret: &[u8]) -> Self {
        Pseudonyms {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
        }
    }

    /// How `viewer` knows `user`: 16 characters of base32 (80 bits) of an HMAC of both ids. The
    /// same for the same pair everywhere and always; unrelated between viewers.
    pub fn of(&self, viewer: UserId, user: UserId) -> String {
        let mut msg = [0u8; 16];
        msg[..8].copy_from_slice(&viewer.to_be_bytes());
        msg[8..].copy_from_slice(&user.to_be_bytes());
        let tag = ring::hmac::sign(&self.key, &msg);
        base32(&tag.as_ref()[..10])
    }
}

fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

/// One discoverable user in a channel.
#[derive(Clone, Debug)]
struct Entry {
    name: String,
    at: LatestLocation,
    home: GroupId,
}

/// A cell this group owns.
#[derive(Debug, Default)]
struct Channel {
    entries: HashMap<UserId, Entry>,
    /// Listener groups, each with the run of its live state that listened: a run's
    /// successor holds none of its mirrors (see [`crate::incarnation`]).
    listeners: HashMap<GroupId, Incarnation>,
}

/// A cell this group listens to on behalf of some of its users.
#[derive(Debug, Default)]
struct Mirror {
    /// (name, where and when) of everyone in the cell, as the channel told.
    strangers: HashMap<UserId, (String, LatestLocation)>,
    /// Local listeners whose cover includes the cell.
    listeners: HashSet<UserId>,
    /// Waiting for the channel's `Contents`.
    pending: bool,
}

/// One of this group's users looking for strangers.
#[derive(Debug)]
struct Listener {
    at: LatLng,
    radius_m: f64,
    cells: Vec<u64>,
    /// Shown strangers: exact distance (never sent) and pseudonym.
    shown: HashMap<UserId, (f64, String)>,
    page: usize,
}

/// A retraction acknowledged upstream once every listener group has acknowledged it.
#[derive(Debug)]
struct Relay {
    upstream: Barrier,
    /// Parts not acknowledged yet, and the listener group each went to, with the run that
    /// listened (none: sent to every group by a young channel).
    pending: HashMap<u32, (GroupId, Option<Incarnation>)>,
}

/// Relays kept waiting at most: beyond, the oldest are forgotten (their upstream waits are
/// bounded anyway, and give up as "not confirmed").
const MAX_RELAYS: usize = 10_000;

/// The stranger roles of one group (see the module doc).
#[derive(Debug)]
pub struct Strangers {
    group: GroupId,
    /// This run of the group's live state (see [`crate::incarnation`]), named when listening.
    incarnation: Incarnation,
    cells: CellIndexer,
    pseudonyms: Option<Pseudonyms>,
    ttl: std::time::Duration,
    covers: HashMap<(u64, u64), Vec<u64>>,
    /// Publisher role: the cell each of this group's users is published in.
    published: HashMap<UserId, u64>,
    /// Publisher role: cells each user left whose channels may still hold it — a move's
    /// retraction carries no acknowledgement and can be lost or overtaken — until the channel's
    /// entry would have expired by itself; the newest [`MAX_LEFT`]. A withdrawal is sent there
    /// too.
    left: HashMap<UserId, Vec<(u64, Millis)>>,
    /// Channel role.
    channels: HashMap<u64, Channel>,
    /// Channel entries by expiry: (updated_at + ttl, cell, user).
    expiry: BTreeSet<(Millis, u64, UserId)>,
    /// Waiting relays by slot (the low 16 bits of a part), oldest first in `relay_order`.
    relays: HashMap<u16, Relay>,
    relay_order: std::collections::VecDeque<u16>,
    next_relay: u16,
    /// Listener role.
    mirrors: HashMap<u64, Mirror>,
    listeners: HashMap<UserId, Listener>,
    /// Users whose visibility to strangers ended (a retraction that asked for an
    /// acknowledgement), with when it reached this group: a position stamped before is stale —
    /// it was published before the change — however late it arrives (a message re-routed
    /// behind the retraction, a channel's contents; positions wait at most
    /// `LOCATION_TTL` in a queue). Both roles keep it, for [`WITHDRAWN_MEMORY`].
    withdrawn: HashMap<UserId, Millis>,
    /// This run is new (see [`Strangers::set_young`]): its channels do not know who listened
    /// to its predecessor's, so a withdrawal goes to every group.
    young: bool,
}

/// How long a withdrawal is remembered, ms (see `Strangers::withdrawn`): twice the longest a
/// position waits in a node's queues before it is dropped
/// ([`crate::route::peer::LOCATION_TTL`]). Short on purpose: a user who becomes discoverable
/// again is published with their last position, stamped before the withdrawal — within this
/// time of it they reappear to strangers only with their next location.
pub const WITHDRAWN_MEMORY: u64 = 2 * crate::route::peer::LOCATION_TTL.as_millis() as u64;

/// How far apart two nodes' clocks may be: each is kept within
/// [`crate::clock::MAX_OFFSET_MS`] of the cluster's.
const CLOCK_MARGIN: std::time::Duration = std::time::Duration::from_millis(2 * crate::clock::MAX_OFFSET_MS);

/// Everything a stranger handler needs from its presence.
pub(crate) struct Ctx<'a> {
    pub(crate) ranges: &'a RangeTable<GroupId>,
    pub(crate) outputs: &'a mut Vec<Output>,
}

impl Ctx<'_> {
    fn owner(&self, cell: u64) -> Option<GroupId> {
        self.ranges.locate(cell_key(cell)).copied()
    }

    fn send(&mut self, to: GroupId, msg: CellMessage) {
        self.outputs.push(Output::Send {
            to,
            msg: GroupMessage::Cell(msg),
        });
    }

    fn push(&mut self, viewer: UserId, event: Event) {
        self.outputs.push(Output::Push { viewer, event });
    }
}

impl Strangers {
    /// The stranger roles of `group`; without pseudonym key, nobody can list strangers (users
    /// are still published, so a node with the key can serve them).
    pub fn new(
        group: GroupId,
        incarnation: Incarnation,
        pseudonyms: Option<Pseudonyms>,
        ttl: std::time::Duration,
    ) -> Self {
        Strangers {
            group,
            incarnation,
            cells: CellIndexer::default(),
            pseudonyms,
            ttl,
            covers: HashMap::new(),
            published: HashMap::new(),
            left: HashMap::new(),
            channels: HashMap::new(),
            expiry: BTreeSet::new(),
            relays: HashMap::new(),
            relay_order: std::collections::VecDeque::new(),
            next_relay: 0,
            mirrors: HashMap::new(),
            listeners: HashMap::new(),
            withdrawn: HashMap::new(),
            young: false,
        }
    }

    /// Whether this run of the group's live state is new: until every other group has
    /// confirmed it ([`crate::incarnation`]), a listener group may still mirror what the
    /// previous run's channels told it, and this run does not know which groups those are.
    /// While young, a withdrawal that asks for an acknowledgement is relayed to every
    /// group of the map and acknowledged once all of them have dropped the user.
    pub(crate) fn set_young(&mut self, young: bool) {
        self.young = young;
    }

    /// Whether a position of `user` stamped `at` predates a withdrawal seen here.
    fn stale(&self, user: UserId, at: Millis) -> bool {
        self.withdrawn.get(&user).is_some_and(|w| at <= *w)
    }

    /// A retraction that ends `user`'s visibility reached this group at `now`. Positions are
    /// stamped by the publisher group's clock, which may be up to [`CLOCK_MARGIN`] ahead of
    /// this node's (each within `MAX_OFFSET_MS` of the cluster's): the withdrawal counts from
    /// that much later.
    fn withdraw(&mut self, user: UserId, now: Millis) {
        let at = now.saturating_add(CLOCK_MARGIN);
        let w = self.withdrawn.entry(user).or_insert(at);
        *w = (*w).max(at);
    }

    /// Whether this node can show strangers (it has the cluster's pseudonym key).
    pub fn can_list(&self) -> bool {
        self.pseudonyms.is_some()
    }

    /// When a channel entry next expires.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.expiry.first().map(|(at, _, _)| *at)
    }

    fn cell_of(&self, loc: LatLng) -> u64 {
        u64::from(self.cells.cell_of(loc))
    }

    // ---------------------------------------------------------------- publisher role

    /// `user` (of this group) is at `at`: published to its cell if its record lets strangers
    /// see it now, else retracted from wherever it was.
    pub(crate) fn publish(
        &mut self,
        cx: &mut Ctx<'_>,
        state: &GroupState,
        user: UserId,
        at: LatestLocation,
        now: Millis,
    ) {
        let Some(record) = state.user(user) else {
            return;
        };
        if !record.discoverable || record.is_hidden(now) {
            self.retract(cx, user, None, now);
            return;
        }
        let cell = self.cell_of(at.loc);
        if let Some(old) = self.published.insert(user, cell).filter(|old| *old != cell) {
            let left = self.left.entry(user).or_default();
            left.retain(|(c, until)| *c != old && *c != cell && *until > now);
            left.push((old, now.saturating_add(self.ttl)));
            if left.len() > MAX_LEFT {
                left.remove(0);
            }
            if let Some(to) = cx.owner(old) {
                cx.send(
                    to,
                    CellMessage::Retract {
                        cell: old,
                        user,
                        ack: None,
                    },
                );
            }
        }
        if let Some(to) = cx.owner(cell) {
            tracing::debug!(
                group = self.group,
                user,
                cell,
                to,
                stamp = at.updated_at.0,
                "stranger: publish"
            );
            let msg = CellMessage::Publish {
                cell,
                user,
                name: record.name.to_string(),
                at,
                home: self.group,
            };
            cx.send(to, msg);
        }
    }

    /// Takes `user` out of its cell; with `ack` (a withdrawal), also out of the cells it left
    /// that may still hold it, each retraction acknowledged under its own part of the barrier,
    /// from `ack`'s part up, once every listener has dropped the user. Returns how many
    /// retractions were sent.
    pub(crate) fn retract(
        &mut self,
        cx: &mut Ctx<'_>,
        user: UserId,
        ack: Option<Barrier>,
        now: Millis,
    ) -> u32 {
        let mut cells: Vec<u64> = self.published.remove(&user).into_iter().collect();
        if let Some(mut left) = self.left.remove(&user) {
            left.retain(|(_, until)| *until > now);
            if ack.is_some() {
                for (c, _) in left {
                    if !cells.contains(&c) {
                        cells.push(c);
                    }
                }
            } else if !left.is_empty() {
                self.left.insert(user, left);
            }
        }
        let mut sent = 0;
        for cell in cells {
            let Some(to) = cx.owner(cell) else { continue };
            let ack = ack.map(|b| Barrier {
                part: b.part + sent,
                ..b
            });
            tracing::debug!(group = self.group, user, cell, to, ?ack, "stranger: retract");
            cx.send(to, CellMessage::Retract { cell, user, ack });
            sent += 1;
        }
        sent
    }

    /// Publishes again every user published in a cell owned by `group` (whose leader changed:
    /// the new one knows nothing), from `locations`.
    pub(crate) fn republish(
        &mut self,
        cx: &mut Ctx<'_>,
        state: &GroupState,
        group: GroupId,
        location: impl Fn(UserId) -> Option<LatestLocation>,
        now: Millis,
    ) {
        let users: Vec<UserId> = self
            .published
            .iter()
            .filter(|(_, cell)| cx.owner(**cell) == Some(group))
            .map(|(u, _)| *u)
            .collect();
        // Its channels forgot everything: nothing of ours is left there to withdraw.
        for left in self.left.values_mut() {
            left.retain(|(c, _)| cx.owner(*c) != Some(group));
        }
        self.left.retain(|_, l| !l.is_empty());
        for user in users {
            self.published.remove(&user);
            if let Some(at) = location(user) {
                self.publish(cx, state, user, at, now);
            }
        }
    }

    // ---------------------------------------------------------------- channel role

    /// Handles a message of the stranger roles (see [`CellMessage`]).
    pub(crate) fn handle(&mut self, cx: &mut Ctx<'_>, state: &GroupState, msg: CellMessage, now: Millis) {
        match msg {
            CellMessage::Publish {
                cell,
                user,
                name,
                at,
                home,
            } => {
                if self.stale(user, at.updated_at) {
                    tracing::debug!(
                        group = self.group,
                        user,
                        cell,
                        stamp = at.updated_at.0,
                        "stranger: stale publication dropped"
                    );
                    return;
                }
                let channel = self.channels.entry(cell).or_default();
                if let Some(old) = channel.entries.get(&user) {
                    if old.at.updated_at >= at.updated_at {
                        return;
                    }
                    self.expiry
                        .remove(&(old.at.updated_at.saturating_add(self.ttl), cell, user));
                }
                self.expiry
                    .insert((at.updated_at.saturating_add(self.ttl), cell, user));
                channel.entries.insert(
                    user,
                    Entry {
                        name: name.clone(),
                        at,
                        home,
                    },
                );
                for &l in channel.listeners.keys() {
                    cx.send(
                        l,
                        CellMessage::Seen {
                            cell,
                            user,
                            name: name.clone(),
                            at,
                        },
                    );
                }
            }
            CellMessage::Retract { cell, user, ack } => {
                if ack.is_some() {
                    self.withdraw(user, now);
                }
                self.drop_entry(cx, cell, user, ack);
            }
            CellMessage::Listen {
                cell,
                group,
                incarnation,
            } => {
                tracing::debug!(
                    group = self.group,
                    cell,
                    listener = group,
                    %incarnation,
                    "stranger: listen"
                );
                let channel = self.channels.entry(cell).or_default();
                // An earlier run's late word does not undo a later run's listening.
                let run = channel.listeners.entry(group).or_insert(incarnation);
                *run = (*run).max(incarnation);
                let entries = channel
                    .entries
                    .iter()
                    .map(|(u, e)| (*u, e.name.clone(), e.at))
                    .collect();
                cx.send(group, CellMessage::Contents { cell, entries });
            }
            CellMessage::Unlisten {
                cell,
                group,
                incarnation,
            } => {
                tracing::debug!(
                    group = self.group,
                    cell,
                    listener = group,
                    %incarnation,
                    "stranger: unlisten"
                );
                if let Some(channel) = self.channels.get_mut(&cell) {
                    // An earlier run's late word does not undo a later run's listening.
                    if channel.listeners.get(&group) == Some(&incarnation) {
                        channel.listeners.remove(&group);
                    }
                    if channel.listeners.is_empty() && channel.entries.is_empty() {
                        self.channels.remove(&cell);
                    }
                }
            }
            CellMessage::Contents { cell, entries } => {
                tracing::debug!(
                    group = self.group,
                    cell,
                    entries = entries.len(),
                    "stranger: contents"
                );
                let Some(mirror) = self.mirrors.get_mut(&cell) else {
                    return;
                };
                mirror.pending = false;
                let withdrawn = &self.withdrawn;
                mirror.strangers = entries
                    .into_iter()
                    .filter(|(u, _, at)| withdrawn.get(u).is_none_or(|w| at.updated_at > *w))
                    .map(|(u, n, at)| (u, (n, at)))
                    .collect();
                let listeners: Vec<UserId> = mirror.listeners.iter().copied().collect();
                for l in listeners {
                    self.refresh(cx, state, l);
                }
            }
            CellMessage::Seen { cell, user, name, at } => {
                if self.stale(user, at.updated_at) {
                    tracing::debug!(
                        group = self.group,
                        user,
                        cell,
                        stamp = at.updated_at.0,
                        "stranger: stale sighting dropped"
                    );
                    return;
                }
                tracing::debug!(
                    group = self.group,
                    user,
                    cell,
                    stamp = at.updated_at.0,
                    "stranger: seen"
                );
                let Some(mirror) = self.mirrors.get_mut(&cell) else {
                    return;
                };
                if mirror.pending {
                    // Sent before the channel had this run's `Listen` (to a run before this
                    // one): the contents, which the channel sends after, are newer — and this
                    // run may not have heard of a withdrawal that came between.
                    return;
                }
                if mirror
                    .strangers
                    .get(&user)
                    .is_some_and(|(_, old)| old.updated_at >= at.updated_at)
                {
                    return;
                }
                mirror.strangers.insert(user, (name, at));
                let listeners: Vec<UserId> = mirror.listeners.iter().copied().collect();
                for l in listeners {
                    self.seen(cx, state, l, user, at);
                }
            }
            CellMessage::Unseen { cell, user, ack } => {
                // A withdrawal ends the user's visibility in every mirror here, not only in
                // this cell's: a mirror of a cell the user left may still hold it, if that
                // move's retraction was lost or overtaken on its way.
                let cells: Vec<u64> = if ack.is_some() {
                    self.withdraw(user, now);
                    self.mirrors
                        .iter()
                        .filter(|(c, m)| **c == cell || m.strangers.contains_key(&user))
                        .map(|(c, _)| *c)
                        .collect()
                } else {
                    vec![cell]
                };
                tracing::debug!(group = self.group, user, cell, ?ack, mirrors = ?cells, "stranger: unseen");
                for cell in cells {
                    let Some(mirror) = self.mirrors.get_mut(&cell) else {
                        continue;
                    };
                    mirror.strangers.remove(&user);
                    let listeners: Vec<UserId> = mirror.listeners.iter().copied().collect();
                    for l in listeners {
                        if self
                            .listeners
                            .get(&l)
                            .is_some_and(|v| v.shown.contains_key(&user))
                        {
                            self.refresh(cx, state, l);
                        }
                    }
                }
                if let Some(barrier) = ack {
                    cx.outputs.push(Output::Send {
                        to: barrier.group,
                        msg: GroupMessage::RevokeAck { barrier },
                    });
                }
            }
        }
    }

    /// Removes `user` from channel `cell` and tells its listener groups (every other group,
    /// for a withdrawal while young: see [`Strangers::set_young`]); `ack` is relayed.
    fn drop_entry(&mut self, cx: &mut Ctx<'_>, cell: u64, user: UserId, ack: Option<Barrier>) {
        let mut listeners: BTreeMap<GroupId, Option<Incarnation>> = match self.channels.get_mut(&cell) {
            Some(channel) => {
                if let Some(old) = channel.entries.remove(&user) {
                    self.expiry
                        .remove(&(old.at.updated_at.saturating_add(self.ttl), cell, user));
                }
                channel.listeners.iter().map(|(g, i)| (*g, Some(*i))).collect()
            }
            None => BTreeMap::new(),
        };
        if ack.is_some() && self.young {
            // This group's own mirrors are this run's: they never heard the predecessor.
            for (_, g) in cx.ranges.ranges() {
                if *g != self.group {
                    listeners.entry(*g).or_insert(None);
                }
            }
        }
        let relay = ack.map(|upstream| {
            let id = self.next_relay;
            self.next_relay = self.next_relay.wrapping_add(1);
            (id, upstream)
        });
        tracing::debug!(
            group = self.group,
            user,
            cell,
            ?ack,
            young = self.young,
            ?listeners,
            "stranger: dropped from channel"
        );
        let mut pending = HashMap::new();
        for (i, (l, run)) in listeners.into_iter().enumerate() {
            let ack = relay.map(|(id, _)| {
                // One part per listener group: the relay's slot, then the group's number.
                let part = u32::from(id) | ((i as u32) << 16);
                pending.insert(part, (l, run));
                Barrier {
                    group: self.group,
                    index: RELAY_INDEX,
                    part,
                }
            });
            cx.send(l, CellMessage::Unseen { cell, user, ack });
        }
        if let Some((id, upstream)) = relay {
            if pending.is_empty() {
                cx.outputs.push(Output::Send {
                    to: upstream.group,
                    msg: GroupMessage::RevokeAck { barrier: upstream },
                });
            } else {
                while self.relays.len() >= MAX_RELAYS {
                    match self.relay_order.pop_front() {
                        Some(old) => drop(self.relays.remove(&old)),
                        None => break,
                    }
                }
                self.relays.insert(id, Relay { upstream, pending });
                self.relay_order.push_back(id);
            }
        }
    }

    /// A listener group acknowledged part `part` of a relayed retraction.
    pub(crate) fn relay_acked(&mut self, cx: &mut Ctx<'_>, part: u32) {
        let id = (part & 0xffff) as u16;
        let Some(relay) = self.relays.get_mut(&id) else {
            return;
        };
        relay.pending.remove(&part);
        if relay.pending.is_empty() {
            self.finish_relay(cx, id);
        }
    }

    fn finish_relay(&mut self, cx: &mut Ctx<'_>, id: u16) {
        if let Some(relay) = self.relays.remove(&id) {
            self.relay_order.retain(|s| *s != id);
            cx.outputs.push(Output::Send {
                to: relay.upstream.group,
                msg: GroupMessage::RevokeAck {
                    barrier: relay.upstream,
                },
            });
        }
    }

    /// Expires channel entries not updated within the TTL (a publisher group that vanished).
    pub(crate) fn expire(&mut self, cx: &mut Ctx<'_>, now: Millis) {
        self.withdrawn
            .retain(|_, w| w.0.saturating_add(WITHDRAWN_MEMORY) > now.0);
        while let Some(&(at, cell, user)) = self.expiry.first() {
            if at > now {
                break;
            }
            self.drop_entry(cx, cell, user, None);
        }
    }

    /// Group `group` has a new run of its live state (a new leader, or the same leader's
    /// driver restarted): as a channel, forget what its users published (the new run could not
    /// retract it); as a listener, forget the cells it owns and listen again; as a publisher,
    /// publish again in the cells it owns (the caller does, with [`Strangers::republish`]).
    /// With the new run's `incarnation` (it introduced itself), also stop relaying to and
    /// waiting for the runs before it as a listener — they hold no mirror any more. Without
    /// (the map changed), listeners are left alone: the new run may have listened already.
    pub(crate) fn leader_changed(
        &mut self,
        cx: &mut Ctx<'_>,
        state: &GroupState,
        group: GroupId,
        incarnation: Option<Incarnation>,
    ) {
        tracing::debug!(
            group = self.group,
            other = group,
            ?incarnation,
            "stranger: another group's run changed"
        );
        if let Some(run) = incarnation {
            // As a channel: the group's earlier runs hold no mirror (their sessions were
            // closed): nothing to relay to them, nothing to wait for from them.
            let earlier = |g: GroupId, r: Option<Incarnation>| g == group && r.is_none_or(|r| r < run);
            for channel in self.channels.values_mut() {
                channel.listeners.retain(|g, r| !earlier(*g, Some(*r)));
            }
            let done: Vec<u16> = self
                .relays
                .iter_mut()
                .filter_map(|(id, r)| {
                    r.pending.retain(|_, (to, r)| !earlier(*to, *r));
                    r.pending.is_empty().then_some(*id)
                })
                .collect();
            for id in done {
                self.finish_relay(cx, id);
            }
        }
        let stale: Vec<(u64, UserId)> = self
            .channels
            .iter()
            .flat_map(|(cell, ch)| {
                ch.entries
                    .iter()
                    .filter(|(_, e)| e.home == group)
                    .map(move |(u, _)| (*cell, *u))
            })
            .collect();
        for (cell, user) in stale {
            self.drop_entry(cx, cell, user, None);
        }
        let cells: Vec<u64> = self
            .mirrors
            .keys()
            .copied()
            .filter(|c| cx.owner(*c) == Some(group))
            .collect();
        for cell in cells {
            if let Some(mirror) = self.mirrors.get_mut(&cell) {
                mirror.strangers.clear();
                mirror.pending = true;
                let listeners: Vec<UserId> = mirror.listeners.iter().copied().collect();
                for l in listeners {
                    self.refresh(cx, state, l);
                }
            }
            cx.send(
                group,
                CellMessage::Listen {
                    cell,
                    group: self.group,
                    incarnation: self.incarnation,
                },
            );
        }
    }

    // ---------------------------------------------------------------- listener role

    /// `viewer` (of this group) at `at` wants the strangers within `radius_m`, a page of `page`:
    /// listens to the cells covering the radius. Returns whether the viewer waits for a
    /// channel's first answer.
    pub(crate) fn listen(
        &mut self,
        cx: &mut Ctx<'_>,
        state: &GroupState,
        viewer: UserId,
        at: LatLng,
        radius_m: f64,
        page: usize,
    ) {
        let cells = self.cover(at, radius_m);
        let old = match self.listeners.get_mut(&viewer) {
            Some(l) => {
                l.at = at;
                l.radius_m = radius_m;
                l.page = l.page.max(page);
                std::mem::replace(&mut l.cells, cells.clone())
            }
            None => {
                self.listeners.insert(
                    viewer,
                    Listener {
                        at,
                        radius_m,
                        cells: cells.clone(),
                        shown: HashMap::new(),
                        page,
                    },
                );
                Vec::new()
            }
        };
        if old != cells {
            for cell in old.iter().filter(|c| !cells.contains(c)) {
                self.leave_cell(cx, viewer, *cell);
            }
            for &cell in cells.iter().filter(|c| !old.contains(c)) {
                let mirror = self.mirrors.entry(cell).or_insert_with(|| Mirror {
                    pending: true,
                    ..Mirror::default()
                });
                let first = mirror.listeners.is_empty();
                mirror.listeners.insert(viewer);
                if first {
                    if let Some(to) = cx.owner(cell) {
                        cx.send(
                            to,
                            CellMessage::Listen {
                                cell,
                                group: self.group,
                                incarnation: self.incarnation,
                            },
                        );
                    }
                }
            }
        }
        self.refresh(cx, state, viewer);
    }

    /// A listener moved: its cells and what it is shown follow.
    pub(crate) fn moved(&mut self, cx: &mut Ctx<'_>, state: &GroupState, viewer: UserId, at: LatLng) {
        if let Some(l) = self.listeners.get(&viewer) {
            let (radius, page) = (l.radius_m, l.page);
            self.listen(cx, state, viewer, at, radius, page);
        }
    }

    /// Whether `viewer` still waits for a channel's first answer.
    pub fn is_pending(&self, viewer: UserId) -> bool {
        self.listeners.get(&viewer).is_some_and(|l| {
            l.cells
                .iter()
                .any(|c| self.mirrors.get(c).is_some_and(|m| m.pending))
        })
    }

    /// The viewer's session ended: it listens no more.
    pub(crate) fn stop(&mut self, cx: &mut Ctx<'_>, viewer: UserId) {
        if let Some(l) = self.listeners.remove(&viewer) {
            for cell in l.cells {
                self.leave_cell(cx, viewer, cell);
            }
        }
    }

    fn leave_cell(&mut self, cx: &mut Ctx<'_>, viewer: UserId, cell: u64) {
        let Some(mirror) = self.mirrors.get_mut(&cell) else {
            return;
        };
        mirror.listeners.remove(&viewer);
        if mirror.listeners.is_empty() {
            self.mirrors.remove(&cell);
            if let Some(to) = cx.owner(cell) {
                cx.send(
                    to,
                    CellMessage::Unlisten {
                        cell,
                        group: self.group,
                        incarnation: self.incarnation,
                    },
                );
            }
        }
    }

    fn cover(&mut self, at: LatLng, radius_m: f64) -> Vec<u64> {
        let cell = self.cells.cell_of(at);
        let key = (u64::from(cell), radius_m.to_bits());
        if let Some(c) = self.covers.get(&key) {
            return c.clone();
        }
        let cover: Vec<u64> = match self.cells.cover(cell, radius_m) {
            Ok(cells) => cells.into_iter().map(u64::from).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "no cover for a listener's radius; its own cell only");
                vec![u64::from(cell)]
            }
        };
        if self.covers.len() > 4_096 {
            self.covers.clear();
        }
        self.covers.insert(key, cover.clone());
        cover
    }

    /// Whether `viewer` (whose record is `record`) may be shown `user` as a stranger: not
    /// itself, not a friend, not someone it follows.
    fn is_stranger(record: &nearby_raft::UserRecord, viewer: UserId, user: UserId) -> bool {
        user != viewer && !record.friends.contains(user) && !record.rare().following.contains(user)
    }

    /// The `keep` strangers nearest to `viewer` within its radius with their exact distances,
    /// nearest first (ties by id), and how many strangers are in the radius in all.
    fn candidates(&self, state: &GroupState, viewer: UserId, keep: usize) -> (Vec<(f64, UserId)>, usize) {
        let (Some(l), Some(record)) = (self.listeners.get(&viewer), state.user(viewer)) else {
            return (Vec::new(), 0);
        };
        let mut out: Vec<(f64, UserId)> = l
            .cells
            .iter()
            .filter_map(|c| self.mirrors.get(c))
            .flat_map(|m| m.strangers.iter())
            .filter(|(u, _)| Self::is_stranger(record, viewer, **u))
            .map(|(u, (_, at))| (l.at.distance_m(&at.loc), *u))
            .filter(|(d, _)| *d <= l.radius_m)
            .collect();
        // A user moving between cells may be in two mirrors for a moment: count them once.
        let by_user = |a: &(f64, UserId), b: &(f64, UserId)| a.1.cmp(&b.1).then(a.0.total_cmp(&b.0));
        if l.cells.len() > 1 {
            out.sort_unstable_by(by_user);
            out.dedup_by_key(|c| c.1);
        }
        let total = out.len();
        let nearest = |a: &(f64, UserId), b: &(f64, UserId)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
        if keep < out.len() {
            out.select_nth_unstable_by(keep, nearest);
            out.truncate(keep);
        }
        out.sort_unstable_by(nearest);
        (out, total)
    }

    fn entry(&self, viewer: UserId, user: UserId) -> Option<(String, LatestLocation)> {
        let l = self.listeners.get(&viewer)?;
        l.cells
            .iter()
            .filter_map(|c| self.mirrors.get(c)?.strangers.get(&user))
            .max_by_key(|(_, at)| at.updated_at)
            .cloned()
    }

    fn stranger(&self, viewer: UserId, user: UserId, distance_m: f64) -> Option<Stranger> {
        let (name, at) = self.entry(viewer, user)?;
        let pseudonym = self.pseudonyms.as_ref()?.of(viewer, user);
        Some(Stranger {
            pseudonym,
            name,
            distance_m: rounded(distance_m),
            updated_at: at.updated_at,
        })
    }

    /// Recomputes `viewer`'s shown strangers from scratch; events for what changed.
    fn refresh(&mut self, cx: &mut Ctx<'_>, state: &GroupState, viewer: UserId) {
        let Some(page) = self.listeners.get(&viewer).map(|l| l.page) else {
            return;
        };
        let (now, _) = self.candidates(state, viewer, page);
        let keep: HashSet<UserId> = now.iter().map(|(_, u)| *u).collect();
        let gone: Vec<(UserId, String)> = self.listeners[&viewer]
            .shown
            .iter()
            .filter(|(u, _)| !keep.contains(u))
            .map(|(u, (_, p))| (*u, p.clone()))
            .collect();
        for (user, pseudonym) in gone {
            if let Some(l) = self.listeners.get_mut(&viewer) {
                l.shown.remove(&user);
            }
            cx.push(viewer, Event::StrangerGone { pseudonym });
        }
        for (d, user) in now {
            let changed = self.listeners[&viewer]
                .shown
                .get(&user)
                .is_none_or(|(old, _)| rounded(*old) != rounded(d));
            if let (true, Some(s)) = (changed, self.stranger(viewer, user, d)) {
                if let Some(l) = self.listeners.get_mut(&viewer) {
                    l.shown.insert(user, (d, s.pseudonym.clone()));
                }
                tracing::debug!(
                    group = self.group,
                    viewer,
                    user,
                    stamp = s.updated_at.0,
                    "stranger: shown"
                );
                cx.push(viewer, Event::StrangerNearby(s));
            }
        }
    }

    /// `user` moved to `at` in a cell `viewer` listens to: shown, moved, replaced or ignored.
    fn seen(
        &mut self,
        cx: &mut Ctx<'_>,
        state: &GroupState,
        viewer: UserId,
        user: UserId,
        at: LatestLocation,
    ) {
        let Some(l) = self.listeners.get(&viewer) else {
            return;
        };
        if !state
            .user(viewer)
            .is_some_and(|r| Self::is_stranger(r, viewer, user))
        {
            return;
        }
        let d = l.at.distance_m(&at.loc);
        let inside = d <= l.radius_m;
        let farthest = l.shown.values().map(|(d, _)| *d).fold(0.0, f64::max);
        let shown = l.shown.contains_key(&user);
        let fits = l.shown.len() < l.page || d < farthest;
        match (shown, inside) {
            // Left the radius: the next nearest takes its place.
            (true, false) => self.refresh(cx, state, viewer),
            (true, true) => {
                if let Some(s) = self.stranger(viewer, user, d) {
                    if let Some(l) = self.listeners.get_mut(&viewer) {
                        l.shown.insert(user, (d, s.pseudonym.clone()));
                    }
                    tracing::debug!(
                        group = self.group,
                        viewer,
                        user,
                        stamp = s.updated_at.0,
                        "stranger: moved"
                    );
                    cx.push(viewer, Event::StrangerNearby(s));
                }
            }
            (false, true) if fits => self.refresh(cx, state, viewer),
            (false, _) => {}
        }
    }

    /// The nearest `size` strangers of `viewer` and how many more are in range.
    pub fn page(&self, state: &GroupState, viewer: UserId, size: usize) -> (Vec<Stranger>, u32) {
        let (nearest, total) = self.candidates(state, viewer, size);
        let more = total.saturating_sub(nearest.len());
        tracing::debug!(group = self.group, viewer, users = ?nearest.iter().map(|(_, u)| *u).collect::<Vec<_>>(), "stranger: page");
        let page = nearest
            .into_iter()
            .filter_map(|(d, u)| self.stranger(viewer, u, d))
            .collect();
        (page, u32::try_from(more).unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::incarnation::run;

    #[test]
    fn distances_are_rounded_up_to_the_step_and_never_finer() {
        assert_eq!(rounded(0.0), 500);
        assert_eq!(rounded(1.0), 500);
        assert_eq!(rounded(500.0), 500);
        assert_eq!(rounded(500.1), 1_000);
        assert_eq!(rounded(7_999.0), 8_000);
        for d in [3.0, 777.7, 1_234.5, 4_999.9] {
            assert_eq!(rounded(d) % STRANGER_STEP_M, 0);
            assert!(f64::from(rounded(d)) >= d);
        }
    }

    #[test]
    fn pseudonyms_are_stable_per_viewer_and_unrelated_across_viewers() {
        let p = Pseudonyms::new(b"cluster secret");
        let again = Pseudonyms::new(b"cluster secret");
        assert_eq!(p.of(1, 42), again.of(1, 42), "not stable across nodes");
        assert_ne!(p.of(1, 42), p.of(2, 42), "two viewers get the same pseudonym");
        assert_ne!(p.of(1, 42), p.of(1, 43));
        assert_ne!(p.of(1, 42), Pseudonyms::new(b"another cluster").of(1, 42));
        let s = p.of(1, 42);
        assert_eq!(s.len(), 16);
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)),
            "{s}"
        );
        assert!(!s.contains("42"));
    }

    /// The listener groups a retraction was relayed to, with the part each acknowledges.
    fn relayed(outputs: &[Output]) -> Vec<(GroupId, u32)> {
        outputs
            .iter()
            .filter_map(|o| match o {
                Output::Send {
                    to,
                    msg: GroupMessage::Cell(CellMessage::Unseen { ack: Some(b), .. }),
                } => Some((*to, b.part)),
                _ => None,
            })
            .collect()
    }

    /// Whether `upstream` was acknowledged.
    fn acked(outputs: &[Output], upstream: Barrier) -> bool {
        outputs.iter().any(|o| {
            matches!(o, Output::Send { msg: GroupMessage::RevokeAck { barrier }, .. } if *barrier == upstream)
        })
    }

    /// Four groups; the stranger roles of group 1 and its state.
    fn channel_of_group_one() -> (RangeTable<GroupId>, GroupState, Strangers) {
        let ranges = nearby_raft::meta::initial_ranges(4);
        let table = RangeTable::new(ranges.iter().map(|(g, r)| (*r, *g)).collect()).expect("ranges");
        let state = GroupState::new(ranges[0].1);
        let channel = Strangers::new(1, run(1), None, std::time::Duration::from_secs(600));
        (table, state, channel)
    }

    #[test]
    fn a_publication_stamped_before_a_withdrawal_reached_the_channel_is_dropped_however_late() {
        let (table, state, mut channel) = channel_of_group_one();
        let mut outputs = Vec::new();
        let mut cx = Ctx {
            ranges: &table,
            outputs: &mut outputs,
        };
        let cell = 42;
        channel.handle(
            &mut cx,
            &state,
            CellMessage::Listen {
                cell,
                group: 2,
                incarnation: run(1),
            },
            Millis(1_000),
        );
        let publish = |stamp: u64| CellMessage::Publish {
            cell,
            user: 7,
            name: "s".into(),
            at: LatestLocation {
                loc: LatLng::new(52.52, 13.405).expect("ll"),
                updated_at: Millis(stamp),
            },
            home: 4,
        };
        let ack = Barrier {
            group: 4,
            index: 99,
            part: 0,
        };
        // "Not discoverable" reaches the channel at 2,000; a position stamped at 1,500, routed
        // again behind it, comes after.
        let retract = CellMessage::Retract {
            cell,
            user: 7,
            ack: Some(ack),
        };
        channel.handle(&mut cx, &state, retract, Millis(2_000));
        cx.outputs.clear();
        channel.handle(&mut cx, &state, publish(1_500), Millis(2_010));
        assert!(
            cx.outputs.is_empty(),
            "a stale position was relayed: {:?}",
            cx.outputs
        );
        // Nor one stamped by a clock up to the margin ahead of the channel's.
        channel.handle(&mut cx, &state, publish(2_900), Millis(2_020));
        assert!(cx.outputs.is_empty(), "{:?}", cx.outputs);
        // Discoverable again: positions stamped after it are relayed.
        channel.handle(&mut cx, &state, publish(3_500), Millis(3_510));
        assert!(
            cx.outputs.iter().any(|o| matches!(
                o,
                Output::Send {
                    to: 2,
                    msg: GroupMessage::Cell(CellMessage::Seen { user: 7, .. })
                }
            )),
            "{:?}",
            cx.outputs
        );
        // Forgotten after the memory: only the clock tells.
        let mut cx = Ctx {
            ranges: &table,
            outputs: &mut Vec::new(),
        };
        channel.expire(&mut cx, Millis(3_000 + WITHDRAWN_MEMORY));
        assert!(!channel.stale(7, Millis(1_500)));
    }

    #[test]
    fn a_withdrawal_empties_every_mirror_that_holds_the_user_and_a_move_only_its_cell() {
        let (table, state, mut listener) = channel_of_group_one();
        let at = LatestLocation {
            loc: LatLng::new(52.52, 13.405).expect("ll"),
            updated_at: Millis(1_000),
        };
        // Group 1 mirrors cells 10 and 20, and both hold user 7: the retraction of 7's move
        // from 10 to 20 was lost on its way to 10's channel.
        for cell in [10, 20] {
            let mut mirror = Mirror::default();
            mirror.strangers.insert(7, ("s".into(), at));
            mirror.strangers.insert(8, ("t".into(), at));
            listener.mirrors.insert(cell, mirror);
        }
        let holds = |l: &Strangers, cell: u64, user: UserId| l.mirrors[&cell].strangers.contains_key(&user);
        let mut outputs = Vec::new();
        let mut cx = Ctx {
            ranges: &table,
            outputs: &mut outputs,
        };
        // A move: only the cell it names.
        let moved = CellMessage::Unseen {
            cell: 20,
            user: 8,
            ack: None,
        };
        listener.handle(&mut cx, &state, moved, Millis(2_000));
        assert!(!holds(&listener, 20, 8) && holds(&listener, 10, 8));
        // "Not discoverable", relayed by 20's channel: gone from 10's mirror too, and confirmed.
        let ack = Barrier {
            group: 3,
            index: RELAY_INDEX,
            part: 5,
        };
        let withdrawn = CellMessage::Unseen {
            cell: 20,
            user: 7,
            ack: Some(ack),
        };
        listener.handle(&mut cx, &state, withdrawn, Millis(2_000));
        assert!(!holds(&listener, 20, 7));
        assert!(
            !holds(&listener, 10, 7),
            "the stale mirror still shows the withdrawn user"
        );
        assert!(acked(cx.outputs, ack));
    }

    #[test]
    fn a_sighting_that_reaches_a_mirror_waiting_for_its_contents_is_ignored() {
        let (table, state, mut listener) = channel_of_group_one();
        let at = |ms| LatestLocation {
            loc: LatLng::new(52.52, 13.405).expect("ll"),
            updated_at: Millis(ms),
        };
        // This run listened to cell 10 and waits for its contents; a sighting the channel sent
        // to the group's previous run arrives first — about a user who has since withdrawn,
        // which this run never heard (it was not a listener then).
        listener.mirrors.insert(
            10,
            Mirror {
                pending: true,
                ..Mirror::default()
            },
        );
        let mut outputs = Vec::new();
        let mut cx = Ctx {
            ranges: &table,
            outputs: &mut outputs,
        };
        let seen = |ms| CellMessage::Seen {
            cell: 10,
            user: 7,
            name: "s".into(),
            at: at(ms),
        };
        listener.handle(&mut cx, &state, seen(1_000), Millis(2_000));
        assert!(
            listener.mirrors[&10].strangers.is_empty(),
            "the old sighting was kept"
        );
        // The contents come (without the user); sightings after them count.
        let contents = CellMessage::Contents {
            cell: 10,
            entries: vec![(8, "t".into(), at(1_500))],
        };
        listener.handle(&mut cx, &state, contents, Millis(2_100));
        listener.handle(&mut cx, &state, seen(2_200), Millis(2_200));
        let mut held: Vec<UserId> = listener.mirrors[&10].strangers.keys().copied().collect();
        held.sort_unstable();
        assert_eq!(held, vec![7, 8]);
    }

    #[test]
    fn a_withdrawal_also_reaches_the_channels_of_the_cells_the_user_left() {
        let (table, mut state, mut publisher) = channel_of_group_one();
        let user = 7;
        state.apply(
            &nearby_raft::Command::RegisterUser {
                user,
                name: "s".into(),
            },
            1,
        );
        state.apply(&nearby_raft::Command::SetDiscoverable { user, on: true }, 2);
        let mut outputs = Vec::new();
        let mut cx = Ctx {
            ranges: &table,
            outputs: &mut outputs,
        };
        // Berlin, then Paris, then Rome: three cells, two of them left.
        let places = [(52.52, 13.405), (48.857, 2.352), (41.9, 12.5)];
        let mut cells = Vec::new();
        for (i, (lat, lon)) in places.into_iter().enumerate() {
            let at = LatestLocation {
                loc: LatLng::new(lat, lon).expect("ll"),
                updated_at: Millis(1_000 + i as u64),
            };
            cells.push(publisher.cell_of(at.loc));
            publisher.publish(&mut cx, &state, user, at, Millis(1_000 + i as u64));
        }
        cx.outputs.clear();
        let ack = Barrier {
            group: 1,
            index: 9,
            part: 3,
        };
        assert_eq!(publisher.retract(&mut cx, user, Some(ack), Millis(2_000)), 3);
        let mut sent: Vec<(u64, u32)> = cx
            .outputs
            .iter()
            .filter_map(|o| match o {
                Output::Send {
                    to,
                    msg:
                        GroupMessage::Cell(CellMessage::Retract {
                            cell, ack: Some(b), ..
                        }),
                } if Some(*to) == table.locate(cell_key(*cell)).copied() => Some((*cell, b.part)),
                _ => None,
            })
            .collect();
        sent.sort_by_key(|(_, part)| *part);
        assert_eq!(
            sent,
            vec![(cells[2], 3), (cells[0], 4), (cells[1], 5)],
            "the current cell, then the cells left, each under its own part"
        );
        // Once withdrawn, nothing is left to withdraw again; and a left cell is forgotten once
        // its channel's entry would have expired by itself.
        assert_eq!(publisher.retract(&mut cx, user, Some(ack), Millis(2_000)), 0);
        for (i, (lat, lon)) in places.into_iter().enumerate() {
            let at = LatestLocation {
                loc: LatLng::new(lat, lon).expect("ll"),
                updated_at: Millis(3_000 + i as u64),
            };
            publisher.publish(&mut cx, &state, user, at, Millis(3_000 + i as u64));
        }
        let after_ttl = Millis(3_001 + 600_000);
        assert_eq!(
            publisher.retract(&mut cx, user, Some(ack), after_ttl),
            2,
            "current and one left"
        );
    }

    #[test]
    fn a_listener_run_that_listened_before_its_introduction_arrived_stays_a_listener() {
        let (table, state, mut channel) = channel_of_group_one();
        let mut outputs = Vec::new();
        let mut cx = Ctx {
            ranges: &table,
            outputs: &mut outputs,
        };
        let cell = 42;
        let listen = |n| CellMessage::Listen {
            cell,
            group: 4,
            incarnation: run(n),
        };
        let listeners = |c: &Strangers| c.channels[&cell].listeners.clone();
        channel.handle(&mut cx, &state, listen(1), Millis(10));
        // Group 4's driver restarts as run 2, which listens at once; the map's news of the
        // change and run 2's introduction arrive after (the fault run's leak: the channel then
        // forgot run 2, whose mirror went stale for good).
        channel.handle(&mut cx, &state, listen(2), Millis(20));
        channel.leader_changed(&mut cx, &state, 4, None);
        channel.leader_changed(&mut cx, &state, 4, Some(run(2)));
        assert_eq!(listeners(&channel), HashMap::from([(4, run(2))]));
        // Run 1's late "unlisten" does not undo run 2's listening.
        let unlisten = |n| CellMessage::Unlisten {
            cell,
            group: 4,
            incarnation: run(n),
        };
        channel.handle(&mut cx, &state, unlisten(1), Millis(30));
        assert_eq!(listeners(&channel), HashMap::from([(4, run(2))]));
        // Nor does its late "listen" stand in for run 2's, nor its late introduction.
        channel.handle(&mut cx, &state, listen(1), Millis(40));
        channel.leader_changed(&mut cx, &state, 4, Some(run(1)));
        assert_eq!(listeners(&channel), HashMap::from([(4, run(2))]));
        // Run 3 introduces itself: run 2 holds no mirror any more.
        channel.leader_changed(&mut cx, &state, 4, Some(run(3)));
        assert!(listeners(&channel).is_empty());
    }

    #[test]
    fn a_young_channel_relays_a_withdrawal_to_every_group_and_an_old_one_to_its_listeners() {
        let upstream = Barrier {
            group: 4,
            index: 99,
            part: 0,
        };
        let retract = CellMessage::Retract {
            cell: 42,
            user: 7,
            ack: Some(upstream),
        };

        // A leader of long standing knows its listeners: none, so nobody mirrors the user.
        let (table, state, mut channel) = channel_of_group_one();
        let mut outputs = Vec::new();
        let mut cx = Ctx {
            ranges: &table,
            outputs: &mut outputs,
        };
        channel.handle(&mut cx, &state, retract.clone(), Millis(10));
        assert!(relayed(cx.outputs).is_empty(), "{:?}", cx.outputs);
        assert!(acked(cx.outputs, upstream), "{:?}", cx.outputs);

        // A new leader does not know who mirrored its predecessor's channel: every other group
        // must drop the user before the withdrawal is acknowledged.
        let (table, state, mut channel) = channel_of_group_one();
        channel.set_young(true);
        let mut outputs = Vec::new();
        let mut cx = Ctx {
            ranges: &table,
            outputs: &mut outputs,
        };
        channel.handle(&mut cx, &state, retract, Millis(10));
        let parts = relayed(cx.outputs);
        let mut to: Vec<GroupId> = parts.iter().map(|(g, _)| *g).collect();
        to.sort_unstable();
        assert_eq!(to, vec![2, 3, 4], "{:?}", cx.outputs);
        assert!(
            !acked(cx.outputs, upstream),
            "acknowledged before any group dropped the user"
        );
        for (i, (_, part)) in parts.iter().enumerate() {
            cx.outputs.clear();
            channel.relay_acked(&mut cx, *part);
            assert_eq!(
                acked(cx.outputs, upstream),
                i == parts.len() - 1,
                "{:?}",
                cx.outputs
            );
        }
        assert!(channel.stale(7, Millis(10)), "the withdrawal is remembered");
    }

    #[test]
    fn a_relayed_retraction_is_acknowledged_once_every_listener_group_dropped_or_changed_leader() {
        let (table, state, mut channel) = channel_of_group_one();
        let mut outputs = Vec::new();
        let mut cx = Ctx {
            ranges: &table,
            outputs: &mut outputs,
        };
        let cell = 42;
        for group in [2, 3] {
            let listen = CellMessage::Listen {
                cell,
                group,
                incarnation: run(1),
            };
            channel.handle(&mut cx, &state, listen, Millis(10));
        }
        let at = LatestLocation {
            loc: LatLng::new(52.52, 13.405).expect("ll"),
            updated_at: Millis(1),
        };
        channel.handle(
            &mut cx,
            &state,
            CellMessage::Publish {
                cell,
                user: 7,
                name: "s".into(),
                at,
                home: 4,
            },
            Millis(10),
        );
        let upstream = Barrier {
            group: 4,
            index: 99,
            part: 0,
        };
        cx.outputs.clear();
        channel.handle(
            &mut cx,
            &state,
            CellMessage::Retract {
                cell,
                user: 7,
                ack: Some(upstream),
            },
            Millis(10),
        );
        let parts = relayed(cx.outputs);
        assert_eq!(parts.len(), 2, "{:?}", cx.outputs);
        cx.outputs.clear();
        let part_of = |g: GroupId| {
            parts
                .iter()
                .find(|(to, _)| *to == g)
                .map(|(_, p)| *p)
                .expect("part")
        };
        channel.relay_acked(&mut cx, part_of(2));
        assert!(
            !acked(cx.outputs, upstream),
            "acknowledged before every listener group"
        );
        // The map says group 3's leader changed: that alone proves nothing (its new run may
        // have listened already), so the relay still waits for group 3.
        channel.leader_changed(&mut cx, &state, 3, None);
        assert!(!acked(cx.outputs, upstream), "{:?}", cx.outputs);
        // Group 3's new run introduced itself: the run that listened holds nothing to drop.
        channel.leader_changed(&mut cx, &state, 3, Some(run(2)));
        assert!(acked(cx.outputs, upstream), "{:?}", cx.outputs);
        // And the channel relays nothing more to it.
        cx.outputs.clear();
        channel.handle(
            &mut cx,
            &state,
            CellMessage::Publish {
                cell,
                user: 8,
                name: "t".into(),
                at,
                home: 4,
            },
            Millis(10),
        );
        let to: Vec<GroupId> = cx
            .outputs
            .iter()
            .filter_map(|o| match o {
                Output::Send { to, .. } => Some(*to),
                _ => None,
            })
            .collect();
        assert_eq!(to, vec![2]);
    }

    #[test]
    fn neighbouring_cells_land_on_different_owners() {
        let ranges = RangeTable::new(
            nearby_raft::meta::initial_ranges(8)
                .into_iter()
                .map(|(g, r)| (r, g))
                .collect(),
        )
        .expect("ranges");
        let indexer = CellIndexer::default();
        let berlin = indexer.cell_of(LatLng::new(52.52, 13.405).expect("ll"));
        let cover = indexer.cover(berlin, 8_000.0).expect("cover");
        let owners: HashSet<GroupId> = cover
            .iter()
            .filter_map(|c| ranges.locate(cell_key(u64::from(*c))).copied())
            .collect();
        assert!(owners.len() >= 5, "a city's {} cells on {owners:?}", cover.len());
    }
}
