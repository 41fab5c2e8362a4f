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
//! Relations between two users (friendship, requests, follower grants, hiding) touch two user
//! records that may live in two different groups. A relation command is therefore written so that
//! each group applies *its own side* — the side(s) whose user id is in the group's range — and both
//! sides reach the same decision from their own state. Proposing the same command to both groups
//! (in the order the node's orchestration chooses) gives both halves; when both users live in the
//! same group one entry applies both sides atomically.
//!
//! This module never touches I/O and never reads a clock: times (such as a ghost-mode deadline)
//! are fields of the command, chosen by the proposer.

use std::fmt;

use nearby_index::friends::UserRange;
use nearby_index::geo::{Millis, UserId};
use serde::{Deserialize, Serialize};

use crate::state::GroupState;

/// The longest display name accepted, in characters.
pub const MAX_NAME_CHARS: usize = 64;

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
    /// A display name that is empty, too long, or has control characters.
    #[error("invalid display name: {reason}")]
    InvalidName {
        /// What is wrong with it.
        reason: String,
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
            | Command::SetGhost { user, .. } => (user, None),
            Command::Hide { user, from } | Command::Unhide { user, from } => (user, Some(from)),
            Command::AddFriend { from, to } => (from, Some(to)),
            Command::RemoveFriend { user, friend } => (user, Some(friend)),
            Command::GrantFollow { user, follower } | Command::RevokeFollow { user, follower } => {
                (user, Some(follower))
            }
            // An import acts for nobody; validation looks at its contents.
            Command::Import(_) => (0, None),
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
        )
    }

    /// Checks the command against `state`: ids valid, at least one side in the group's range,
    /// every in-range side registered (except for registration itself), names well formed.
    ///
    /// The same check runs at apply time, so a command that passes here and fails there (because
    /// the state moved on) is rejected deterministically on every replica.
    pub fn validate(&self, state: &GroupState) -> Result<(), CommandError> {
        let range = state.range();
        if let Command::Import(batch) = self {
            return validate_import(batch);
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
