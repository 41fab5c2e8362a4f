//! The replicated data of one shard group and the deterministic function that changes it.
//!
//! [`GroupState`] holds, for every registered user of the group's id range, a [`UserRecord`]:
//! profile, privacy settings, friend set, pending requests in both directions, and one-way
//! follower grants, all relation sets Elias–Fano coded ([`FriendSet`]).
//! [`GroupState::apply`] is the only way it changes.
//!
//! This module never does I/O, never reads a clock and never draws randomness: applying the same
//! commands in the same order to the same state gives the same state on every replica (the
//! property tests in `tests/` check it). Who may see a user's location is decided from that
//! user's *own* record ([`UserRecord::may_see_me`]), so a relation change that has reached one
//! group but not yet the other can only hide a location, never leak one.
//!
//! # Relations across groups: durable intents
//!
//! A relation command (friendship, request, follower grant) between users of two groups is
//! applied by the group of the pair's owner ([`crate::shard::command::pair_owner`]) only, which
//! decides for both. Applying it there changes the owner's side and records the other side's
//! new state ([`Mirror`]) as an *intent* in the outbox ([`GroupState::outbox`]), numbered by the
//! entry's log index — in the same log entry, so the intent is exactly as durable as the first
//! half. The group's leader then delivers each intent to the other group as a
//! [`Command::Deliver`], in order, retrying until it is applied, and forgets it with a
//! [`Command::Delivered`]. The destination remembers the highest intent number it applied from
//! each source ([`GroupState::delivered_from`]), so a redelivery changes nothing; since one group
//! decides a pair and its intents arrive in order, the last one delivered is the latest decision,
//! and both sides converge whatever the two users did concurrently.

use std::collections::BTreeMap;

use nearby_index::error::CodecError;
use nearby_index::friends::{FriendSet, UserRange};
use nearby_index::geo::{Millis, UserId};
use serde::{Deserialize, Serialize};

use crate::shard::command::{pair_owner, Command, CommandError, CommandResult, ImportBatch, Mirror};
use crate::GroupId;

/// Everything the group stores about one of its users.
///
/// What most users never set — ghost mode, a cleared history, hides, pending requests, one-way
/// follower grants — is kept out of line ([`Rare`], read with [`UserRecord::rare`]): one pointer
/// while it is all empty, so that a record costs its name, its flags and its friend set. The
/// encoding is the same as when every field was inline (snapshots, intents and peer messages
/// read the same bytes), and two records are equal when their fields are, however they are
/// held.
#[derive(Clone, Debug, Default)]
pub struct UserRecord {
    /// Display name shown to friends (boxed: 16 bytes, no spare capacity).
    pub name: Box<str>,
    /// Whether the user shares their location at all.
    pub sharing: bool,
    /// Whether opted-in strangers nearby may see the user (coarsely).
    pub discoverable: bool,
    /// The user turned location history off: nothing is recorded.
    pub history_off: bool,
    /// Mutual friends.
    pub friends: FriendSet,
    /// The rest, while any of it is set.
    rare: Option<Box<Rare>>,
}

/// The fields of a [`UserRecord`] that most users never set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rare {
    /// Ghost mode: hidden from everyone until this time.
    pub ghost_until: Option<Millis>,
    /// The user deleted their history up to this time: nothing recorded at or before it is
    /// served again, and nodes delete such records from disk.
    pub history_cleared: Option<Millis>,
    /// Friends and followers the user hides from.
    pub hidden_from: FriendSet,
    /// Users who asked this user to be friends, not yet answered.
    pub requests_in: FriendSet,
    /// Users this user asked to be friends, not yet answered.
    pub requests_out: FriendSet,
    /// Users this user shares with one way (they may see this user).
    pub followers: FriendSet,
    /// Users who share with this user one way (this user may see them).
    pub following: FriendSet,
}

impl Rare {
    const NONE: Rare = Rare {
        ghost_until: None,
        history_cleared: None,
        hidden_from: FriendSet::new(),
        requests_in: FriendSet::new(),
        requests_out: FriendSet::new(),
        followers: FriendSet::new(),
        following: FriendSet::new(),
    };

    fn is_empty(&self) -> bool {
        *self == Rare::NONE
    }
}

impl PartialEq for UserRecord {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.sharing == other.sharing
            && self.discoverable == other.discoverable
            && self.history_off == other.history_off
            && self.friends == other.friends
            && self.rare() == other.rare()
    }
}

impl Eq for UserRecord {}

/// A [`UserRecord`] as it is encoded: every field inline, in the order of the first layouts.
/// Written from borrowed fields (`Layout<&str, &FriendSet>`), read into owned ones.
#[derive(Serialize, Deserialize)]
struct Layout<Name, Set> {
    name: Name,
    sharing: bool,
    discoverable: bool,
    ghost_until: Option<Millis>,
    hidden_from: Set,
    friends: Set,
    requests_in: Set,
    requests_out: Set,
    followers: Set,
    following: Set,
    history_off: bool,
    history_cleared: Option<Millis>,
}

impl Serialize for UserRecord {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let rare = self.rare();
        Layout::<&str, &FriendSet> {
            name: &self.name,
            sharing: self.sharing,
            discoverable: self.discoverable,
            ghost_until: rare.ghost_until,
            hidden_from: &rare.hidden_from,
            friends: &self.friends,
            requests_in: &rare.requests_in,
            requests_out: &rare.requests_out,
            followers: &rare.followers,
            following: &rare.following,
            history_off: self.history_off,
            history_cleared: rare.history_cleared,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for UserRecord {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let w = Layout::<String, FriendSet>::deserialize(deserializer)?;
        let mut record = UserRecord {
            name: w.name.into_boxed_str(),
            sharing: w.sharing,
            discoverable: w.discoverable,
            history_off: w.history_off,
            friends: w.friends,
            rare: None,
        };
        record.set_rare(Rare {
            ghost_until: w.ghost_until,
            history_cleared: w.history_cleared,
            hidden_from: w.hidden_from,
            requests_in: w.requests_in,
            requests_out: w.requests_out,
            followers: w.followers,
            following: w.following,
        });
        Ok(record)
    }
}

impl UserRecord {
    /// A new user's record: sharing, nothing else set.
    pub fn new(name: &str) -> Self {
        UserRecord {
            name: name.into(),
            sharing: true,
            ..UserRecord::default()
        }
    }

    /// The fields most users never set (all empty when none is).
    pub fn rare(&self) -> &Rare {
        static NONE: Rare = Rare::NONE;
        self.rare.as_deref().unwrap_or(&NONE)
    }

    /// The fields most users never set, to change: allocated on first use. Removing needs no
    /// allocation: [`UserRecord::rare_if_set`].
    pub fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// The fields most users never set, to change, if any is set.
    pub fn rare_if_set(&mut self) -> Option<&mut Rare> {
        self.rare.as_deref_mut()
    }

    /// Holds `rare` out of line, or nothing when none of it is set (decoded records, most of
    /// which set none, allocate nothing for it).
    fn set_rare(&mut self, rare: Rare) {
        self.rare = (!rare.is_empty()).then(|| Box::new(rare));
    }

    /// Frees the rare fields once none is set.
    pub fn tidy(&mut self) {
        if self.rare.as_deref().is_some_and(Rare::is_empty) {
            self.rare = None;
        }
    }

    /// Ghost mode: hidden from everyone until this time.
    pub fn ghost_until(&self) -> Option<Millis> {
        self.rare().ghost_until
    }

    /// The time up to which the user deleted their history.
    pub fn history_cleared(&self) -> Option<Millis> {
        self.rare().history_cleared
    }

    /// Whether this user is hidden from everyone at `now` (sharing off or ghost mode).
    pub fn is_hidden(&self, now: Millis) -> bool {
        !self.sharing || self.ghost_until().is_some_and(|until| now < until)
    }

    /// Whether `viewer` may see this user's location at `now`: a friend or granted follower, not
    /// hidden from, and the user shares and is not in ghost mode.
    pub fn may_see_me(&self, viewer: UserId, now: Millis) -> bool {
        !self.is_hidden(now)
            && !self.rare().hidden_from.contains(viewer)
            && (self.friends.contains(viewer) || self.rare().followers.contains(viewer))
    }
}

/// The replicated state of one shard group: the records of the users in its range.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupState {
    range: UserRange,
    users: BTreeMap<UserId, UserRecord>,
    /// Relation changes whose other side lives in another group and has not been delivered
    /// yet, by intent number ([`GroupState::seq_base`] plus the log index of the entry that
    /// made them).
    outbox: BTreeMap<u64, Mirror>,
    /// The highest intent number applied from each source group.
    inbox: BTreeMap<GroupId, u64>,
    /// What the last split hands to the new group, until it runs on its own.
    seed: Option<SplitSeed>,
    /// Added to log indices to number intents: 0 for a group of the first ranges, the parent's
    /// split index for a group born of a split, so its intents are numbered above the ones it
    /// inherited (a destination drops any intent not above the last it applied from a source).
    seq_base: u64,
    /// Being merged into this group: it changes nothing more (see [`Command::Freeze`]).
    frozen: Option<GroupId>,
    /// The group whose records it is absorbing (see [`Command::AbsorbUsers`]).
    absorbing: Option<GroupId>,
    /// Ranges it absorbed, each with what its old group had applied from each source: an
    /// intent for a user there is new only above that (sources deliver in order per
    /// destination group, so one that delivered here and there kept two orders).
    absorbed: Vec<(UserRange, BTreeMap<GroupId, u64>)>,
}

/// The part of `r` inside `within`, if any.
fn clip(r: UserRange, within: UserRange) -> Option<UserRange> {
    UserRange::new(r.start.max(within.start), r.end.min(within.end)).ok()
}

/// The ranges of `absorbed` clipped to `within`.
fn clip_all(
    absorbed: &[(UserRange, BTreeMap<GroupId, u64>)],
    within: UserRange,
) -> Vec<(UserRange, BTreeMap<GroupId, u64>)> {
    absorbed
        .iter()
        .filter_map(|(r, inbox)| clip(*r, within).map(|c| (c, inbox.clone())))
        .collect()
}

/// What a split hands to the new group ([`Command::Split`]): the users of its range and the
/// intents they own, frozen at the split's index, identical on every replica of the parent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitSeed {
    /// The new group.
    pub new_group: GroupId,
    /// Its range.
    pub range: UserRange,
    /// The nodes of its first replicas.
    pub voters: Vec<crate::NodeId>,
    /// The log index of the split.
    pub index: u64,
    users: BTreeMap<UserId, UserRecord>,
    outbox: BTreeMap<u64, Mirror>,
    inbox: BTreeMap<GroupId, u64>,
    absorbed: Vec<(UserRange, BTreeMap<GroupId, u64>)>,
}

impl SplitSeed {
    /// How many users it hands over.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether it hands over no user.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The users it hands over, ascending by id.
    pub fn users(&self) -> impl Iterator<Item = (UserId, &UserRecord)> {
        self.users.iter().map(|(id, r)| (*id, r))
    }

    /// The new group's first state. Its intents are numbered above every one it inherits
    /// (which were numbered below the split's index); it has applied everything its parent had
    /// from each source.
    pub fn group_state(&self) -> GroupState {
        GroupState {
            users: self.users.clone(),
            outbox: self.outbox.clone(),
            inbox: self.inbox.clone(),
            seq_base: self.index,
            absorbed: self.absorbed.clone(),
            ..GroupState::new(self.range)
        }
    }
}

impl GroupState {
    /// An empty state for the group owning `range`.
    pub fn new(range: UserRange) -> Self {
        GroupState {
            range,
            users: BTreeMap::new(),
            outbox: BTreeMap::new(),
            inbox: BTreeMap::new(),
            seed: None,
            seq_base: 0,
            frozen: None,
            absorbing: None,
            absorbed: Vec::new(),
        }
    }

    /// The group it is being merged into, once frozen.
    pub fn frozen(&self) -> Option<GroupId> {
        self.frozen
    }

    /// The group whose records it is absorbing, until the merge is done.
    pub fn absorbing(&self) -> Option<GroupId> {
        self.absorbing
    }

    /// The highest intent number applied from `source` for `user`: from the table of the
    /// range `user` was absorbed with, if any, else the group's own.
    pub fn delivered_to(&self, user: UserId, source: GroupId) -> u64 {
        let table = self
            .absorbed
            .iter()
            .find(|(r, _)| r.contains(user))
            .map_or(&self.inbox, |(_, t)| t);
        table.get(&source).copied().unwrap_or(0)
    }

    /// What the last split hands to its new group, while it is held (see [`SplitSeed`]).
    pub fn split_seed(&self) -> Option<&SplitSeed> {
        self.seed.as_ref()
    }

    /// Added to a log index to number the intent its entry leaves (see the field's doc).
    pub fn seq_base(&self) -> u64 {
        self.seq_base
    }

    /// Intents not yet delivered, in order: `(number, the other side's new state)`.
    pub fn outbox(&self) -> impl Iterator<Item = (u64, &Mirror)> {
        self.outbox.iter().map(|(seq, m)| (*seq, m))
    }

    /// The highest intent number applied from each source group (the group's own table; see
    /// [`GroupState::delivered_to`] for absorbed ranges).
    pub fn inbox(&self) -> &BTreeMap<GroupId, u64> {
        &self.inbox
    }

    /// The highest intent number applied from `source`.
    pub fn delivered_from(&self, source: GroupId) -> u64 {
        self.inbox.get(&source).copied().unwrap_or(0)
    }

    /// The user-id range this group owns.
    pub fn range(&self) -> UserRange {
        self.range
    }

    /// The record of `user`, if registered here — or handed over by a split that is not done
    /// yet (frozen: its group's sessions keep being served until they move; every change is
    /// refused here, as out of range).
    pub fn user(&self, user: UserId) -> Option<&UserRecord> {
        self.users
            .get(&user)
            .or_else(|| self.seed.as_ref().and_then(|s| s.users.get(&user)))
    }

    /// All registered users, ascending by id.
    pub fn users(&self) -> impl Iterator<Item = (UserId, &UserRecord)> {
        self.users.iter().map(|(id, r)| (*id, r))
    }

    /// How many users are registered.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether no user is registered.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Applies one command, the entry at log index `index`. Validates first (see
    /// [`Command::validate`]); an invalid command changes nothing and returns
    /// [`CommandResult::Rejected`]. A relation command with a side outside the range leaves an
    /// intent numbered `index` in the outbox (see the module doc).
    pub fn apply(&mut self, cmd: &Command, index: u64) -> CommandResult {
        if let Err(e) = cmd.validate(self) {
            return CommandResult::Rejected(e);
        }
        match cmd {
            Command::Deliver { source, seq, mirror } => {
                if *seq <= self.delivered_to(mirror.user, *source) {
                    return CommandResult::Unchanged;
                }
                let table = match self.absorbed.iter_mut().find(|(r, _)| r.contains(mirror.user)) {
                    Some((_, t)) => t,
                    None => &mut self.inbox,
                };
                table.insert(*source, *seq);
                return self.set_mirror(mirror);
            }
            Command::Freeze { into } => return changed(self.frozen.replace(*into) != Some(*into)),
            Command::AbsorbUsers { source, users } => {
                self.absorbing = Some(*source);
                for (u, r) in users {
                    self.users.insert(*u, r.clone());
                }
                return CommandResult::Updated;
            }
            Command::AbsorbDone { range, inbox, .. } => {
                let joined = UserRange::new(self.range.start.min(range.start), self.range.end.max(range.end));
                let Ok(joined) = joined else {
                    return CommandResult::Rejected(CommandError::OutOfRange { range: *range });
                };
                self.range = joined;
                self.absorbed.push((*range, inbox.clone()));
                self.absorbing = None;
                // This group's own intents for the range it absorbed are for itself now: applied
                // here, in order, at this entry. Delivered later, one would land after newer
                // changes of the same pair that this group now applies to both sides at once,
                // and undo them. Intents are whole states of the other side, the latest last, so
                // applying one the absorbed group had applied already changes nothing.
                let mut own = Vec::new();
                self.outbox.retain(|_, m| {
                    let absorbed = range.contains(m.user);
                    if absorbed {
                        own.push(*m);
                    }
                    !absorbed
                });
                for m in own {
                    self.set_mirror(&m);
                }
                return CommandResult::Updated;
            }
            Command::Delivered { seq } => {
                return changed(self.outbox.remove(seq).is_some());
            }
            Command::Split {
                at,
                new_group,
                voters,
            } => return self.split(*at, *new_group, voters, index),
            Command::SplitDone => return changed(self.seed.take().is_some()),
            _ => {}
        }
        let result = self.apply_sides(cmd);
        // A change leaves an intent; so does a visibility-ending one that changed nothing here (a
        // retry): the other side must carry it too, and the retry is confirmed by its delivery.
        let changed = !matches!(
            result,
            CommandResult::Unchanged | CommandResult::AlreadyFriends | CommandResult::Rejected(_)
        );
        let retried_end = cmd.ends_visibility() && !matches!(result, CommandResult::Rejected(_));
        if let (true, true, (a, Some(b))) = (changed || retried_end, cmd.is_two_sided(), cmd.users()) {
            // Validation put the owner here; the other side may be elsewhere.
            let (owner, other) = if pair_owner(a, b) == a { (a, b) } else { (b, a) };
            if !self.range.contains(other) {
                if let Some(m) = self.mirror_of(other, owner) {
                    self.outbox.insert(self.seq_base + index, m);
                }
            }
        }
        result
    }

    /// [`Command::Split`] (validated): the ids from `at` on, their records and the intents
    /// their users own, leave the range for the seed.
    fn split(
        &mut self,
        at: UserId,
        new_group: GroupId,
        voters: &[crate::NodeId],
        index: u64,
    ) -> CommandResult {
        let (Ok(kept), Ok(range)) = (
            UserRange::new(self.range.start, at),
            UserRange::new(at, self.range.end),
        ) else {
            return CommandResult::Rejected(CommandError::OutOfRange { range: self.range });
        };
        let users = self.users.split_off(&at);
        let (moved, stay): (BTreeMap<u64, Mirror>, BTreeMap<u64, Mirror>) = std::mem::take(&mut self.outbox)
            .into_iter()
            .partition(|(_, m)| range.contains(m.other));
        self.outbox = stay;
        let n = users.len() as u64;
        let absorbed = clip_all(&self.absorbed, range);
        self.absorbed = clip_all(&self.absorbed, kept);
        self.range = kept;
        self.seed = Some(SplitSeed {
            new_group,
            range,
            voters: voters.to_vec(),
            index,
            users,
            outbox: moved,
            inbox: self.inbox.clone(),
            absorbed,
        });
        CommandResult::Split { users: n }
    }

    /// `user`'s side of its relation with `owner` (a user of this group), as `owner`'s record
    /// implies it.
    fn mirror_of(&self, user: UserId, owner: UserId) -> Option<Mirror> {
        let o = self.users.get(&owner)?;
        Some(Mirror {
            user,
            other: owner,
            friend: o.friends.contains(user),
            request_in: o.rare().requests_out.contains(user),
            request_out: o.rare().requests_in.contains(user),
            follower: o.rare().following.contains(user),
            following: o.rare().followers.contains(user),
        })
    }

    /// Sets a user of this group's side of a relation as its owner group decided it.
    fn set_mirror(&mut self, m: &Mirror) -> CommandResult {
        let Some(r) = self.here_mut(m.user) else {
            return CommandResult::Unchanged;
        };
        let toggle = |set: &mut FriendSet, on: bool| {
            if on {
                set.insert(m.other)
            } else {
                set.remove(m.other)
            }
        };
        let mut did = toggle(&mut r.friends, m.friend);
        let rare = if m.request_in || m.request_out || m.follower || m.following {
            Some(r.rare_mut())
        } else {
            r.rare_if_set()
        };
        if let Some(rare) = rare {
            did |= toggle(&mut rare.requests_in, m.request_in);
            did |= toggle(&mut rare.requests_out, m.request_out);
            did |= toggle(&mut rare.followers, m.follower);
            did |= toggle(&mut rare.following, m.following);
        }
        r.tidy();
        changed(did)
    }

    /// Applies the sides of `cmd` that are in this group's range.
    fn apply_sides(&mut self, cmd: &Command) -> CommandResult {
        match cmd {
            Command::RegisterUser { user, name } => match self.users.entry(*user) {
                std::collections::btree_map::Entry::Occupied(_) => CommandResult::AlreadyRegistered,
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(UserRecord::new(name));
                    CommandResult::Registered
                }
            },
            Command::SetName { user, name } => {
                self.update(*user, |r| replace(&mut r.name, name.as_str().into()))
            }
            Command::SetSharing { user, on } => self.update(*user, |r| replace(&mut r.sharing, *on)),
            Command::SetDiscoverable { user, on } => {
                self.update(*user, |r| replace(&mut r.discoverable, *on))
            }
            Command::SetGhost { user, until } => {
                self.update(*user, |r| replace(&mut r.rare_mut().ghost_until, *until))
            }
            Command::Hide { user, from } => self.update(*user, |r| r.rare_mut().hidden_from.insert(*from)),
            Command::Unhide { user, from } => self.update(*user, |r| {
                r.rare_if_set().is_some_and(|x| x.hidden_from.remove(*from))
            }),
            Command::AddFriend { from, to } => self.add_friend(*from, *to),
            Command::RemoveFriend { user, friend } => self.remove_friend(*user, *friend),
            Command::GrantFollow { user, follower } => {
                let a = self.update_if_here(*user, |r| r.rare_mut().followers.insert(*follower));
                let b = self.update_if_here(*follower, |r| r.rare_mut().following.insert(*user));
                changed(a || b)
            }
            Command::RevokeFollow { user, follower } | Command::Unfollow { follower, user } => {
                let a = self.update_if_here(*user, |r| {
                    r.rare_if_set().is_some_and(|x| x.followers.remove(*follower))
                });
                let b = self.update_if_here(*follower, |r| {
                    r.rare_if_set().is_some_and(|x| x.following.remove(*user))
                });
                changed(a || b)
            }
            Command::SetHistory { user, on } => self.update(*user, |r| replace(&mut r.history_off, !on)),
            Command::DeleteHistory { user, before } => self.update(*user, |r| {
                // Never moves back: a delayed retry cannot bring old records back.
                let cleared = r.history_cleared().max(Some(*before));
                replace(&mut r.rare_mut().history_cleared, cleared)
            }),
            Command::Import(batch) => self.import(batch),
            // Handled by `apply`; a nested delivery is refused by validation.
            Command::Deliver { .. }
            | Command::Delivered { .. }
            | Command::Split { .. }
            | Command::SplitDone
            | Command::Freeze { .. }
            | Command::AbsorbUsers { .. }
            | Command::AbsorbDone { .. } => CommandResult::Unchanged,
        }
    }

    fn import(&mut self, batch: &ImportBatch) -> CommandResult {
        let (mut users, mut relations, mut skipped) = (0, 0, 0);
        for (user, name) in &batch.users {
            if self.range.contains(*user) && !self.users.contains_key(user) {
                self.users.insert(*user, UserRecord::new(name));
                users += 1;
            }
        }
        // Each user's sides of this batch, gathered so that every set is coded once per batch
        // (a coded set's insert rewrites the whole set).
        let mut friends: BTreeMap<UserId, Vec<UserId>> = BTreeMap::new();
        for &(a, b) in &batch.friendships {
            friends.entry(a).or_default().push(b);
            friends.entry(b).or_default().push(a);
        }
        let mut followers: BTreeMap<UserId, Vec<UserId>> = BTreeMap::new();
        let mut following: BTreeMap<UserId, Vec<UserId>> = BTreeMap::new();
        for &(user, follower) in &batch.follows {
            followers.entry(user).or_default().push(follower);
            following.entry(follower).or_default().push(user);
        }
        let mut side = |state: &mut Self, user: UserId, sides: &[UserId], f: &dyn Fn(&mut UserRecord)| {
            if !state.range.contains(user) {
                return;
            }
            match state.users.get_mut(&user) {
                Some(r) => {
                    f(r);
                    relations += sides.len() as u64;
                }
                None => skipped += sides.len() as u64,
            }
        };
        for (x, ys) in &friends {
            side(self, *x, ys, &|r: &mut UserRecord| {
                if let Some(rare) = r.rare_if_set() {
                    for y in ys {
                        rare.requests_in.remove(*y);
                        rare.requests_out.remove(*y);
                    }
                }
                r.friends.insert_all(ys);
                r.tidy();
            });
        }
        for (user, ids) in &followers {
            side(self, *user, ids, &|r: &mut UserRecord| {
                r.rare_mut().followers.insert_all(ids);
            });
        }
        for (follower, ids) in &following {
            side(self, *follower, ids, &|r: &mut UserRecord| {
                r.rare_mut().following.insert_all(ids);
            });
        }
        CommandResult::Imported {
            users,
            relations,
            skipped,
        }
    }

    /// Each side decides from its own record; in a consistent state both reach the same result.
    fn add_friend(&mut self, from: UserId, to: UserId) -> CommandResult {
        let mut result = None;
        if let Some(r) = self.here_mut(from) {
            result = Some(if r.friends.contains(to) {
                CommandResult::AlreadyFriends
            } else if r.rare_if_set().is_some_and(|x| x.requests_in.remove(to)) {
                r.friends.insert(to);
                r.tidy();
                CommandResult::FriendshipFormed
            } else {
                r.rare_mut().requests_out.insert(to);
                CommandResult::FriendRequestSent
            });
        }
        if let Some(r) = self.here_mut(to) {
            let side = if r.friends.contains(from) {
                CommandResult::AlreadyFriends
            } else if r.rare_if_set().is_some_and(|x| x.requests_out.remove(from)) {
                r.friends.insert(from);
                r.tidy();
                CommandResult::FriendshipFormed
            } else {
                r.rare_mut().requests_in.insert(from);
                CommandResult::FriendRequestSent
            };
            // The acting user's side speaks for the command when both are here.
            result.get_or_insert(side);
        }
        // validate() guaranteed at least one side is here.
        result.unwrap_or(CommandResult::Unchanged)
    }

    fn remove_friend(&mut self, user: UserId, friend: UserId) -> CommandResult {
        let unlink = |r: &mut UserRecord, other: UserId| {
            let a = r.friends.remove(other);
            let b = r.rare_if_set().is_some_and(|x| {
                let b = x.requests_in.remove(other);
                let c = x.requests_out.remove(other);
                b || c
            });
            a || b
        };
        let a = self.update_if_here(user, |r| unlink(r, friend));
        let b = self.update_if_here(friend, |r| unlink(r, user));
        if a || b {
            CommandResult::FriendRemoved
        } else {
            CommandResult::Unchanged
        }
    }

    fn here_mut(&mut self, user: UserId) -> Option<&mut UserRecord> {
        if self.range.contains(user) {
            self.users.get_mut(&user)
        } else {
            None
        }
    }

    /// Applies `f` to `user`'s record (validated to exist) and reports whether it changed.
    fn update(&mut self, user: UserId, f: impl FnOnce(&mut UserRecord) -> bool) -> CommandResult {
        changed(self.update_if_here(user, f))
    }

    fn update_if_here(&mut self, user: UserId, f: impl FnOnce(&mut UserRecord) -> bool) -> bool {
        self.here_mut(user).is_some_and(|r| {
            let did = f(r);
            r.tidy();
            did
        })
    }
}

/// The first byte of a versioned snapshot: never the first byte of the first layout's encoding
/// (a varint, which never starts with 255).
const VERSIONED: u8 = 0xff;

/// The snapshot layout this version writes (3: splits; 2: history settings).
const LAYOUT: u8 = 3;

impl GroupState {
    /// The state as snapshot data: [`VERSIONED`], the layout number, then the encoding.
    pub fn encode_versioned(&self) -> Result<Vec<u8>, CodecError> {
        let mut out = vec![VERSIONED, LAYOUT];
        nearby_index::codec::encode_into(self, &mut out)?;
        Ok(out)
    }

    /// Snapshot data of this layout or of the first one (written before user records had
    /// history settings), which is converted.
    pub fn decode_versioned(bytes: &[u8]) -> Result<Self, CodecError> {
        match bytes {
            [VERSIONED, LAYOUT, rest @ ..] => nearby_index::codec::decode(rest),
            [VERSIONED, 2, rest @ ..] => {
                nearby_index::codec::decode::<legacy::GroupStateV2>(rest).map(GroupState::from)
            }
            [VERSIONED, other, ..] => Err(CodecError::Decode {
                total: bytes.len(),
                reason: format!("snapshot layout {other} is newer than this version knows ({LAYOUT})"),
            }),
            _ => nearby_index::codec::decode::<legacy::GroupStateV1>(bytes).map(GroupState::from),
        }
    }
}

/// The snapshot layout of the first release.
mod legacy {
    use super::*;

    #[derive(Deserialize)]
    pub(super) struct UserRecordV1 {
        name: String,
        sharing: bool,
        discoverable: bool,
        ghost_until: Option<Millis>,
        hidden_from: FriendSet,
        friends: FriendSet,
        requests_in: FriendSet,
        requests_out: FriendSet,
        followers: FriendSet,
        following: FriendSet,
    }

    #[derive(Deserialize)]
    pub(super) struct GroupStateV1 {
        range: UserRange,
        users: BTreeMap<UserId, UserRecordV1>,
        outbox: BTreeMap<u64, Mirror>,
        inbox: BTreeMap<GroupId, u64>,
    }

    impl From<GroupStateV1> for GroupStateV2 {
        fn from(v1: GroupStateV1) -> GroupStateV2 {
            let users = v1
                .users
                .into_iter()
                .map(|(id, r)| {
                    let mut record = UserRecord {
                        name: r.name.into_boxed_str(),
                        sharing: r.sharing,
                        discoverable: r.discoverable,
                        history_off: false,
                        friends: r.friends,
                        rare: None,
                    };
                    record.set_rare(Rare {
                        ghost_until: r.ghost_until,
                        history_cleared: None,
                        hidden_from: r.hidden_from,
                        requests_in: r.requests_in,
                        requests_out: r.requests_out,
                        followers: r.followers,
                        following: r.following,
                    });
                    (id, record)
                })
                .collect();
            GroupStateV2 {
                range: v1.range,
                users,
                outbox: v1.outbox,
                inbox: v1.inbox,
            }
        }
    }

    impl From<GroupStateV1> for GroupState {
        fn from(v1: GroupStateV1) -> GroupState {
            GroupStateV2::from(v1).into()
        }
    }

    /// Layout 2: before splits.
    #[derive(Deserialize)]
    pub(super) struct GroupStateV2 {
        range: UserRange,
        users: BTreeMap<UserId, UserRecord>,
        outbox: BTreeMap<u64, Mirror>,
        inbox: BTreeMap<GroupId, u64>,
    }

    impl From<GroupStateV2> for GroupState {
        fn from(v2: GroupStateV2) -> GroupState {
            GroupState {
                users: v2.users,
                outbox: v2.outbox,
                inbox: v2.inbox,
                ..GroupState::new(v2.range)
            }
        }
    }
}

fn replace<T: PartialEq>(slot: &mut T, value: T) -> bool {
    if *slot == value {
        false
    } else {
        *slot = value;
        true
    }
}

fn changed(did: bool) -> CommandResult {
    if did {
        CommandResult::Updated
    } else {
        CommandResult::Unchanged
    }
}
