//! The commands a shard group accepts, how they are validated, and what applying them returns.
//!
//! A [`Command`] is the payload of one Raft log entry. Every command is validated twice:
//!
//! 1. by the proposer, against the leader's current state, *before* it is proposed
//!    ([`Command::validate`]), so that an invalid request gets a clear error and never reaches
//!    the log;
//! 2. again at apply time, against the state as of that log position, because the state may have
//!    changed between proposal and commit. A command that fails here changes nothing and applies
//!    to [`CommandResult::Rejected`]; since the check only reads replicated state it is
//!    deterministic on every replica.
//!
//! Relations between two users (friendship, requests, follower grants) touch two user records
//! that may live in two different groups. Every change of a pair's relation is decided by one
//! group, the one of the pair's owner ([`pair_owner`]), whoever of the two acts: when both users
//! live there one entry applies both sides atomically; otherwise the owner's side changes and
//! the other side's new state is left as a durable intent, delivered to the other group as a
//! [`Command::Deliver`] (see [`crate::shard::state`]). Hiding from someone is not a relation:
//! it changes only the hiding user's own record.
//!
//! This module never touches I/O and never reads a clock: times (such as a ghost-mode deadline)
//! are fields of the command, chosen by the proposer.

use std::fmt;

use nearby_index::friends::UserRange;
use nearby_index::geo::{Millis, UserId};
use serde::{Deserialize, Serialize};

use crate::shard::state::GroupState;
use crate::GroupId;

/// The longest display name accepted, in characters.
pub const MAX_NAME_CHARS: usize = 64;

/// The most relations of one kind a user may have: friends and requests sent together,
/// requests received, followers. (Bulk imports are not held to it.)
pub const MAX_RELATIONS: usize = 5_000;

/// The most users plus relations one [`ImportBatch`] may carry (it is one log entry).
pub const MAX_IMPORT_ITEMS: usize = 50_000;

/// Bulk data for a fresh cluster (the load simulator's world, a migration): one log entry that
/// registers users and makes relations. Each group applies the parts in its range; relations
/// whose in-range side is not registered are skipped and counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportBatch {
    /// Users to register, with display names (existing users are left as they are).
    pub users: Vec<(UserId, String)>,
    /// Mutual friendships.
    pub friendships: Vec<(UserId, UserId)>,
    /// One-way grants: `(user, follower)` — the follower may see the user.
    pub follows: Vec<(UserId, UserId)>,
}

impl ImportBatch {
    /// Users plus relations.
    pub fn len(&self) -> usize {
        self.users.len() + self.friendships.len() + self.follows.len()
    }

    /// Whether the batch carries nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The user of a pair whose group decides every relation change between the two: the smaller
/// id. One decider per pair means concurrent changes by both users (a request from each side, a
/// removal racing an acceptance) are ordered by one log, so both sides always converge.
pub fn pair_owner(a: UserId, b: UserId) -> UserId {
    a.min(b)
}

/// One user's side of a relation with `other`, as decided by the pair's owner group and sent to
/// the user's group (see [`Command::Deliver`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mirror {
    /// The user whose record this sets (in the receiving group).
    pub user: UserId,
    /// The other user (in the owner group).
    pub other: UserId,
    /// Mutual friends.
    pub friend: bool,
    /// `other` asked `user` and is waiting.
    pub request_in: bool,
    /// `user` asked `other` and is waiting.
    pub request_out: bool,
    /// `other` may see `user` (a one-way grant by `user`).
    pub follower: bool,
    /// `user` may see `other` (a one-way grant by `other`).
    pub following: bool,
}

impl Mirror {
    /// Whether the relation lets `other` see `user` (before privacy settings).
    pub fn other_may_see_user(&self) -> bool {
        self.friend || self.follower
    }
}

/// A change to the replicated state of a shard group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Creates a user's record with a display name. Idempotent: registering an existing user
    /// changes nothing.
    RegisterUser {
        /// The user to create.
        user: UserId,
        /// Their display name.
        name: String,
    },
    /// Changes a user's display name.
    SetName {
        /// The user.
        user: UserId,
        /// The new display name.
        name: String,
    },
    /// Turns location sharing on or off for everyone.
    SetSharing {
        /// The user.
        user: UserId,
        /// Whether the user shares their location with friends and followers.
        on: bool,
    },
    /// Lets opted-in strangers nearby see the user (coarsely), or stops it.
    SetDiscoverable {
        /// The user.
        user: UserId,
        /// Whether strangers nearby may see this user.
        on: bool,
    },
    /// Ghost mode: hide from everyone until a time, or until turned off (`until: None` turns it
    /// off; `Some(Millis(u64::MAX))` means "until turned off").
    SetGhost {
        /// The user.
        user: UserId,
        /// The end of ghost mode, chosen by the proposer; `None` ends it now.
        until: Option<Millis>,
    },
    /// Hides the user's location from one friend or follower.
    Hide {
        /// The user who hides.
        user: UserId,
        /// The one they hide from.
        from: UserId,
    },
    /// Undoes [`Command::Hide`].
    Unhide {
        /// The user who had hidden.
        user: UserId,
        /// The one they hid from.
        from: UserId,
    },
    /// `from` asks `to` to be friends. If `to` had already asked `from`, they become friends.
    AddFriend {
        /// The user who asks (or accepts).
        from: UserId,
        /// The user asked.
        to: UserId,
    },
    /// Ends a friendship, or cancels/declines a pending request, on both sides.
    RemoveFriend {
        /// The user who removes.
        user: UserId,
        /// The friend (or requester / requested) removed.
        friend: UserId,
    },
    /// One-way sharing: `follower` may see `user`'s location without `user` following back.
    GrantFollow {
        /// The user who shares.
        user: UserId,
        /// Who may now see them.
        follower: UserId,
    },
    /// Undoes [`Command::GrantFollow`].
    RevokeFollow {
        /// The user who shared.
        user: UserId,
        /// Who may no longer see them.
        follower: UserId,
    },
    /// Bulk import (see [`ImportBatch`]).
    Import(ImportBatch),
    /// The other side of a relation change decided in group `source` (the pair's owner, see
    /// [`pair_owner`]), which recorded it there as the durable intent numbered `seq` (see
    /// [`crate::shard::state::GroupState::outbox`]): sets the relation as the owner decided it.
    /// A `seq` not above the last one applied from `source` changes nothing, so redelivery after
    /// a retry or a failover is harmless.
    Deliver {
        /// The group that holds the intent.
        source: GroupId,
        /// The intent's number in `source` (the log index that created it).
        seq: u64,
        /// The relation as it now is, from this group's user's side.
        mirror: Mirror,
    },
    /// The source group's record that its intent `seq` has been applied by the destination:
    /// the intent is forgotten.
    Delivered {
        /// The intent's number.
        seq: u64,
    },
    /// `follower` stops following `user`: [`Command::RevokeFollow`] asked by the follower.
    Unfollow {
        /// The user who stops following.
        follower: UserId,
        /// The user they followed.
        user: UserId,
    },
    /// Turns recording of the user's location history on or off.
    SetHistory {
        /// The user.
        user: UserId,
        /// Whether accepted locations are recorded.
        on: bool,
    },
    /// Deletes the user's location history up to `before` (chosen by the proposer: now): from
    /// this entry on, nothing recorded at or before it is ever served, and every node holding
    /// such records deletes them from disk.
    DeleteHistory {
        /// The user.
        user: UserId,
        /// Everything recorded at or before this time goes.
        before: Millis,
    },
    /// Splits the group at `at`: from this entry on, the group owns only the ids below `at`;
    /// the users at and above it (with the relation intents they own) are frozen in the state
    /// as the seed of the new group `new_group`, owning `at..` (see
    /// [`crate::shard::state::GroupState::split_seed`]). Every replica applies it at the same
    /// index, so each makes the same seed without copying anything over the network; the new
    /// group's replicas start on `voters`.
    Split {
        /// The first user id of the new group.
        at: UserId,
        /// The new group's id.
        new_group: GroupId,
        /// The nodes of the new group's first replicas (this group's voters when proposed).
        voters: Vec<crate::NodeId>,
    },
    /// The new group of the last [`Command::Split`] is running on its own: the seed is dropped.
    SplitDone,
    /// The group is being merged into `into`, its neighbour: from this entry on it refuses every
    /// change (as out of range; its records are read and absorbed by `into`) but the record of
    /// its own intents' delivery, so its outbox empties.
    Freeze {
        /// The group that absorbs it.
        into: GroupId,
    },
    /// Records of users of group `source` (frozen, being merged into this one), copied as they
    /// are. They join the range with [`Command::AbsorbDone`]; until then nothing can change them.
    AbsorbUsers {
        /// The frozen group.
        source: GroupId,
        /// Its users' records.
        users: Vec<(UserId, crate::UserRecord)>,
    },
    /// Group `source` is absorbed: its range (next to this group's) joins this one, and so does
    /// what it had applied from each source group (`inbox`), kept apart for its users so an
    /// intent it already applied is never applied again here.
    AbsorbDone {
        /// The frozen group.
        source: GroupId,
        /// Its range.
        range: UserRange,
        /// The highest intent number it applied from each source group.
        inbox: std::collections::BTreeMap<GroupId, u64>,
    },
}

impl fmt::Display for Command {
    // The log prints entries with `Display`; keep it short and free of display names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::RegisterUser { user, .. } => write!(f, "register({user})"),
            Command::SetName { user, .. } => write!(f, "set_name({user})"),
            Command::SetSharing { user, on } => write!(f, "sharing({user}, {on})"),
            Command::SetDiscoverable { user, on } => write!(f, "discoverable({user}, {on})"),
            Command::SetGhost { user, until } => write!(f, "ghost({user}, {until:?})"),
            Command::Hide { user, from } => write!(f, "hide({user} from {from})"),
            Command::Unhide { user, from } => write!(f, "unhide({user} from {from})"),
            Command::AddFriend { from, to } => write!(f, "add_friend({from} -> {to})"),
            Command::RemoveFriend { user, friend } => write!(f, "remove_friend({user} x {friend})"),
            Command::GrantFollow { user, follower } => write!(f, "grant_follow({user} -> {follower})"),
            Command::RevokeFollow { user, follower } => {
                write!(f, "revoke_follow({user} -> {follower})")
            }
            Command::Import(b) => write!(
                f,
                "import({} users, {} friendships, {} follows)",
                b.users.len(),
                b.friendships.len(),
                b.follows.len()
            ),
            Command::Deliver { source, seq, mirror } => {
                write!(f, "deliver({source}#{seq}: {} x {})", mirror.user, mirror.other)
            }
            Command::Delivered { seq } => write!(f, "delivered(#{seq})"),
            Command::Unfollow { follower, user } => write!(f, "unfollow({follower} -> {user})"),
            Command::SetHistory { user, on } => write!(f, "history({user}, {on})"),
            Command::DeleteHistory { user, before } => write!(f, "delete_history({user}, {before:?})"),
            Command::Split {
                at,
                new_group,
                voters,
            } => {
                write!(f, "split(at {at} into group {new_group} on {voters:?})")
            }
            Command::SplitDone => f.write_str("split_done"),
            Command::Freeze { into } => write!(f, "freeze(into {into})"),
            Command::AbsorbUsers { source, users } => write!(f, "absorb({} users of {source})", users.len()),
            Command::AbsorbDone { source, range, .. } => write!(f, "absorb_done({source}: {range})"),
        }
    }
}

/// Why a command was refused. Stable: callers map these to user-facing error codes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CommandError {
    /// User id 0 is reserved and never names a user.
    #[error("user id 0 is reserved")]
    ReservedUserId,
    /// A relation between a user and themselves.
    #[error("user {user} cannot be related to themselves")]
    SelfRelation {
        /// The user named on both sides.
        user: UserId,
    },
    /// No side of the command belongs to this group's range.
    #[error("no user of this command is in the group's range {range}")]
    OutOfRange {
        /// The group's range.
        range: UserRange,
    },
    /// The user is in this group's range but has no record.
    #[error("unknown user {user}")]
    UnknownUser {
        /// The unknown user.
        user: UserId,
    },
    /// An import batch larger than one log entry may be.
    #[error("an import batch of {items} items exceeds {max}")]
    TooLarge {
        /// Items in the batch.
        items: usize,
        /// The limit.
        max: usize,
    },
    /// A relation change proposed to the group of the pair's other user: it must go to the
    /// group of [`pair_owner`], which decides for both.
    #[error("relations of {user} and {other} are decided by the group of user {owner}")]
    NotPairOwner {
        /// The user of this group.
        user: UserId,
        /// The other user.
        other: UserId,
        /// The pair's owner.
        owner: UserId,
    },
    /// A display name that is empty, too long, or has control characters.
    #[error("invalid display name: {reason}")]
    InvalidName {
        /// What is wrong with it.
        reason: String,
    },
    /// A split while the seed of the previous one is still held.
    #[error("the group is still handing over the range it split off")]
    Splitting,
    /// A change of a group being merged, or a second merge into one.
    #[error("the group is being merged")]
    Merging,
    /// A relation beyond what one user may have (see [`MAX_RELATIONS`]).
    #[error("user {user} has {count} {what}, the most allowed")]
    TooManyRelations {
        /// The user at the limit.
        user: UserId,
        /// Which relations.
        what: String,
        /// How many they have.
        count: usize,
    },
}

/// What applying a command did, for the caller to show.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// The user's record was created.
    Registered,
    /// The user already existed; nothing changed.
    AlreadyRegistered,
    /// The setting or relation changed.
    Updated,
    /// The command was valid but changed nothing (already so).
    Unchanged,
    /// An import was applied.
    Imported {
        /// Users registered in this group.
        users: u64,
        /// Relation sides written in this group.
        relations: u64,
        /// Relation sides skipped because their in-range user is not registered.
        skipped: u64,
    },
    /// A friend request is now pending (the other side has not asked back yet).
    FriendRequestSent,
    /// Both sides have asked: they are now friends.
    FriendshipFormed,
    /// They were already friends; nothing changed.
    AlreadyFriends,
    /// The friendship or pending request was removed.
    FriendRemoved,
    /// The command failed validation at apply time and changed nothing.
    Rejected(CommandError),
    /// The group split: how many users went to the seed of the new group.
    Split {
        /// Users handed over.
        users: u64,
    },
}

impl fmt::Display for CommandResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandResult::Rejected(e) => write!(f, "rejected: {e}"),
            other => write!(f, "{other:?}"),
        }
    }
}

impl Command {
    /// The user ids this command names, the acting user first.
    pub fn users(&self) -> (UserId, Option<UserId>) {
        match *self {
            Command::RegisterUser { user, .. }
            | Command::SetName { user, .. }
            | Command::SetSharing { user, .. }
            | Command::SetDiscoverable { user, .. }
            | Command::SetGhost { user, .. }
            | Command::SetHistory { user, .. }
            | Command::DeleteHistory { user, .. } => (user, None),
            Command::Hide { user, from } | Command::Unhide { user, from } => (user, Some(from)),
            Command::AddFriend { from, to } => (from, Some(to)),
            Command::RemoveFriend { user, friend } => (user, Some(friend)),
            Command::GrantFollow { user, follower } | Command::RevokeFollow { user, follower } => {
                (user, Some(follower))
            }
            Command::Deliver { mirror, .. } => (mirror.user, Some(mirror.other)),
            Command::Unfollow { follower, user } => (follower, Some(user)),
            // An import acts for nobody; validation looks at its contents.
            Command::Import(_)
            | Command::Delivered { .. }
            | Command::Split { .. }
            | Command::SplitDone
            | Command::Freeze { .. }
            | Command::AbsorbUsers { .. }
            | Command::AbsorbDone { .. } => (0, None),
        }
    }

    /// Whether the command changes both sides of a relation. Commands that only touch the acting
    /// user's own record (settings, hiding) return `false`: the other user's group never needs to
    /// see them, because who may see a user is decided from that user's own record.
    pub fn is_two_sided(&self) -> bool {
        matches!(
            self,
            Command::AddFriend { .. }
                | Command::RemoveFriend { .. }
                | Command::GrantFollow { .. }
                | Command::RevokeFollow { .. }
                | Command::Unfollow { .. }
        )
    }

    /// Whether the command only adds to what the group holds, so that a node short of disk
    /// space refuses it ([`crate::wal::Wal::space_low`]). Everything else — changes that end
    /// visibility, removals, deletions, the delivery of changes already decided, splits and
    /// merges under way — still goes through on the space kept for it: privacy and the cluster's
    /// own work come before growth.
    pub fn adds_data(&self) -> bool {
        match self {
            Command::RegisterUser { .. }
            | Command::SetName { .. }
            | Command::Unhide { .. }
            | Command::AddFriend { .. }
            | Command::GrantFollow { .. }
            | Command::Import(_) => true,
            Command::SetSharing { on, .. }
            | Command::SetDiscoverable { on, .. }
            | Command::SetHistory { on, .. } => *on,
            Command::SetGhost { until, .. } => until.is_none(),
            _ => false,
        }
    }

    /// Refuses a new relation that would take a user past [`MAX_RELATIONS`]: the asking user's
    /// friends and requests sent, the asked user's requests received, the sharing user's
    /// followers — for the sides whose records `state` holds.
    ///
    /// Checked when a command is proposed, never when it is applied: a limit that moved between
    /// versions must not make replicas replaying an old log decide differently. Concurrent
    /// requests may pass it by the few in flight.
    pub fn check_limits(&self, state: &GroupState) -> Result<(), CommandError> {
        let over = |user: UserId, what: &str, count: u64| {
            let count = usize::try_from(count).unwrap_or(usize::MAX);
            if count >= MAX_RELATIONS {
                Err(CommandError::TooManyRelations {
                    user,
                    what: what.into(),
                    count,
                })
            } else {
                Ok(())
            }
        };
        match *self {
            Command::AddFriend { from, to } => {
                if let Some(r) = state.user(from) {
                    if !r.rare().requests_in.contains(to) {
                        over(
                            from,
                            "friends and friend requests",
                            r.friends.len() + r.rare().requests_out.len(),
                        )?;
                    }
                }
                if let Some(r) = state.user(to) {
                    if !r.rare().requests_out.contains(from) {
                        over(to, "friend requests waiting", r.rare().requests_in.len())?;
                    }
                }
                Ok(())
            }
            Command::GrantFollow { user, .. } => match state.user(user) {
                Some(r) => over(user, "followers", r.rare().followers.len()),
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Whether applying the command can end someone's permission to see the acting user: the
    /// changes whose acknowledgement promises that nothing more about the acting user reaches
    /// the viewers concerned.
    pub fn ends_visibility(&self) -> bool {
        match self {
            Command::SetSharing { on, .. } | Command::SetDiscoverable { on, .. } => !on,
            Command::SetGhost { until, .. } => until.is_some(),
            Command::Hide { .. } | Command::RemoveFriend { .. } | Command::RevokeFollow { .. } => true,
            _ => false,
        }
    }

    /// The user whose visibility to strangers the command may change (sharing, ghost mode,
    /// discoverable), if it is such a change.
    pub fn strangers_user(&self) -> Option<UserId> {
        match self {
            Command::SetSharing { user, .. }
            | Command::SetGhost { user, .. }
            | Command::SetDiscoverable { user, .. } => Some(*user),
            _ => None,
        }
    }

    /// Checks the command against `state`: ids valid, at least one side in the group's range,
    /// every in-range side registered (except for registration itself), names well formed.
    ///
    /// The same check runs at apply time, so a command that passes here and fails there (because
    /// the state moved on) is rejected deterministically on every replica.
    pub fn validate(&self, state: &GroupState) -> Result<(), CommandError> {
        let range = state.range();
        match self {
            Command::Delivered { .. } => return Ok(()),
            // A frozen group (being merged) changes nothing more but its outbox's bookkeeping.
            _ if state.frozen().is_some() => return Err(CommandError::OutOfRange { range }),
            Command::Import(batch) => return validate_import(batch),
            Command::Freeze { into } => {
                if state.split_seed().is_some() {
                    return Err(CommandError::Splitting);
                }
                // A group in the middle of absorbing another is not given away itself.
                if state.absorbing().is_some() || *into == 0 {
                    return Err(CommandError::Merging);
                }
                return Ok(());
            }
            Command::AbsorbUsers { source, users } => {
                if state.absorbing().is_some_and(|a| a != *source) {
                    return Err(CommandError::Merging);
                }
                // Records of users outside this group's range only: its own are never replaced.
                if users.iter().any(|(u, _)| range.contains(*u) || *u == 0) {
                    return Err(CommandError::OutOfRange { range });
                }
                return Ok(());
            }
            Command::AbsorbDone {
                source,
                range: theirs,
                ..
            } => {
                if state.absorbing().is_some_and(|a| a != *source) {
                    return Err(CommandError::Merging);
                }
                if theirs.start != range.end && theirs.end != range.start {
                    return Err(CommandError::OutOfRange { range: *theirs });
                }
                return Ok(());
            }
            Command::Split { at, .. } => {
                if state.split_seed().is_some() {
                    return Err(CommandError::Splitting);
                }
                if *at <= range.start || *at >= range.end {
                    return Err(CommandError::OutOfRange { range });
                }
                return Ok(());
            }
            Command::SplitDone => return Ok(()),
            _ => {}
        }
        let (user, other) = self.users();
        if user == 0 || other == Some(0) {
            return Err(CommandError::ReservedUserId);
        }
        if other == Some(user) {
            return Err(CommandError::SelfRelation { user });
        }
        match self {
            Command::RegisterUser { name, .. } | Command::SetName { name, .. } => {
                check_name(name)?;
            }
            _ => {}
        }
        // Single-sided commands belong to the acting user's group only.
        let sides = [Some(user), other.filter(|_| self.is_two_sided())];
        let mut any_in_range = false;
        for side in sides.into_iter().flatten() {
            if !range.contains(side) {
                continue;
            }
            any_in_range = true;
            let registering = matches!(self, Command::RegisterUser { .. });
            if !registering && state.user(side).is_none() {
                return Err(CommandError::UnknownUser { user: side });
            }
        }
        if !any_in_range {
            return Err(CommandError::OutOfRange { range });
        }
        if let (true, Some(other)) = (self.is_two_sided(), other) {
            let owner = pair_owner(user, other);
            if !range.contains(owner) {
                let mine = if range.contains(user) { user } else { other };
                return Err(CommandError::NotPairOwner {
                    user: mine,
                    other: if mine == user { other } else { user },
                    owner,
                });
            }
        }
        Ok(())
    }
}

fn validate_import(batch: &ImportBatch) -> Result<(), CommandError> {
    if batch.len() > MAX_IMPORT_ITEMS {
        return Err(CommandError::TooLarge {
            items: batch.len(),
            max: MAX_IMPORT_ITEMS,
        });
    }
    for (user, name) in &batch.users {
        if *user == 0 {
            return Err(CommandError::ReservedUserId);
        }
        check_name(name)?;
    }
    for &(a, b) in batch.friendships.iter().chain(&batch.follows) {
        if a == 0 || b == 0 {
            return Err(CommandError::ReservedUserId);
        }
        if a == b {
            return Err(CommandError::SelfRelation { user: a });
        }
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), CommandError> {
    if name.trim().is_empty() {
        return Err(CommandError::InvalidName {
            reason: "empty".into(),
        });
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(CommandError::InvalidName {
            reason: format!("longer than {MAX_NAME_CHARS} characters"),
        });
    }
    if name.chars().any(char::is_control) {
        return Err(CommandError::InvalidName {
            reason: "contains control characters".into(),
        });
    }
    Ok(())
}
