//! The replicated data of one shard group and the deterministic function that changes it.
//!
//! [`GroupState`] holds, for every registered user of the group's id range, a [`UserRecord`]:
//! profile, privacy settings, friend set, pending requests in both directions, and one-way
//! follower grants, all relation sets as roaring bitmaps. [`GroupState::apply`] is the only way it
//! changes.
//!
//! This module never does I/O, never reads a clock and never draws randomness: applying the same
//! commands in the same order to the same state gives the same state on every replica (the
//! property tests in `tests/` check it). Who may see a user's location is decided from that
//! user's *own* record ([`UserRecord::may_see_me`]), so a relation change that has reached one
//! group but not yet the other can only hide a location, never leak one.

use std::collections::BTreeMap;

use nearby_index::friends::{FriendSet, UserRange};
use nearby_index::geo::{Millis, UserId};
use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandResult, ImportBatch};

/// Everything the group stores about one of its users.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Display name shown to friends.
    pub name: String,
    /// Whether the user shares their location at all.
    pub sharing: bool,
    /// Whether opted-in strangers nearby may see the user (coarsely).
    pub discoverable: bool,
    /// Ghost mode: hidden from everyone until this time.
    pub ghost_until: Option<Millis>,
    /// Friends and followers the user hides from.
    pub hidden_from: FriendSet,
    /// Mutual friends.
    pub friends: FriendSet,
    /// Users who asked this user to be friends, not yet answered.
    pub requests_in: FriendSet,
    /// Users this user asked to be friends, not yet answered.
    pub requests_out: FriendSet,
    /// Users this user shares with one way (they may see this user).
    pub followers: FriendSet,
    /// Users who share with this user one way (this user may see them).
    pub following: FriendSet,
}

impl UserRecord {
    /// Whether this user is hidden from everyone at `now` (sharing off or ghost mode).
    pub fn is_hidden(&self, now: Millis) -> bool {
        !self.sharing || self.ghost_until.is_some_and(|until| now < until)
    }

    /// Whether `viewer` may see this user's location at `now`: a friend or granted follower, not
    /// hidden from, and the user shares and is not in ghost mode.
    pub fn may_see_me(&self, viewer: UserId, now: Millis) -> bool {
        !self.is_hidden(now)
            && !self.hidden_from.contains(viewer)
            && (self.friends.contains(viewer) || self.followers.contains(viewer))
    }
}

/// The replicated state of one shard group: the records of the users in its range.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupState {
    range: UserRange,
    users: BTreeMap<UserId, UserRecord>,
}

impl GroupState {
    /// An empty state for the group owning `range`.
    pub fn new(range: UserRange) -> Self {
        GroupState {
            range,
            users: BTreeMap::new(),
        }
    }

    /// The user-id range this group owns.
    pub fn range(&self) -> UserRange {
        self.range
    }

    /// The record of `user`, if registered here.
    pub fn user(&self, user: UserId) -> Option<&UserRecord> {
        self.users.get(&user)
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

    /// Applies one command. Validates first (see [`Command::validate`]); an invalid command
    /// changes nothing and returns [`CommandResult::Rejected`].
    pub fn apply(&mut self, cmd: &Command) -> CommandResult {
        if let Err(e) = cmd.validate(self) {
            return CommandResult::Rejected(e);
        }
        match cmd {
            Command::RegisterUser { user, name } => match self.users.entry(*user) {
                std::collections::btree_map::Entry::Occupied(_) => CommandResult::AlreadyRegistered,
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(UserRecord {
                        name: name.clone(),
                        sharing: true,
                        ..UserRecord::default()
                    });
                    CommandResult::Registered
                }
            },
            Command::SetName { user, name } => self.update(*user, |r| replace(&mut r.name, name.clone())),
            Command::SetSharing { user, on } => self.update(*user, |r| replace(&mut r.sharing, *on)),
            Command::SetDiscoverable { user, on } => {
                self.update(*user, |r| replace(&mut r.discoverable, *on))
            }
            Command::SetGhost { user, until } => self.update(*user, |r| replace(&mut r.ghost_until, *until)),
            Command::Hide { user, from } => self.update(*user, |r| r.hidden_from.insert(*from)),
            Command::Unhide { user, from } => self.update(*user, |r| r.hidden_from.remove(*from)),
            Command::AddFriend { from, to } => self.add_friend(*from, *to),
            Command::RemoveFriend { user, friend } => self.remove_friend(*user, *friend),
            Command::GrantFollow { user, follower } => {
                let a = self.update_if_here(*user, |r| r.followers.insert(*follower));
                let b = self.update_if_here(*follower, |r| r.following.insert(*user));
                changed(a || b)
            }
            Command::RevokeFollow { user, follower } => {
                let a = self.update_if_here(*user, |r| r.followers.remove(*follower));
                let b = self.update_if_here(*follower, |r| r.following.remove(*user));
                changed(a || b)
            }
            Command::Import(batch) => self.import(batch),
        }
    }

    fn import(&mut self, batch: &ImportBatch) -> CommandResult {
        let (mut users, mut relations, mut skipped) = (0, 0, 0);
        for (user, name) in &batch.users {
            if self.range.contains(*user) && !self.users.contains_key(user) {
                self.users.insert(
                    *user,
                    UserRecord {
                        name: name.clone(),
                        sharing: true,
                        ..UserRecord::default()
                    },
                );
                users += 1;
            }
        }
        let mut side = |state: &mut Self, user: UserId, f: &dyn Fn(&mut UserRecord)| {
            if !state.range.contains(user) {
                return;
            }
            match state.users.get_mut(&user) {
                Some(r) => {
                    f(r);
                    relations += 1;
                }
                None => skipped += 1,
            }
        };
        for &(a, b) in &batch.friendships {
            for (x, y) in [(a, b), (b, a)] {
                side(self, x, &|r: &mut UserRecord| {
                    r.requests_in.remove(y);
                    r.requests_out.remove(y);
                    r.friends.insert(y);
                });
            }
        }
        for &(user, follower) in &batch.follows {
            side(self, user, &|r: &mut UserRecord| {
                r.followers.insert(follower);
            });
            side(self, follower, &|r: &mut UserRecord| {
                r.following.insert(user);
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
            } else if r.requests_in.remove(to) {
                r.friends.insert(to);
                CommandResult::FriendshipFormed
            } else {
                r.requests_out.insert(to);
                CommandResult::FriendRequestSent
            });
        }
        if let Some(r) = self.here_mut(to) {
            let side = if r.friends.contains(from) {
                CommandResult::AlreadyFriends
            } else if r.requests_out.remove(from) {
                r.friends.insert(from);
                CommandResult::FriendshipFormed
            } else {
                r.requests_in.insert(from);
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
            let b = r.requests_in.remove(other);
            let c = r.requests_out.remove(other);
            a || b || c
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
        self.here_mut(user).is_some_and(f)
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
