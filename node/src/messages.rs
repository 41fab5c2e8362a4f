//! The messages between groups' live state, and what a group's live state asks its driver to
//! do: the vocabulary [`crate::presence`] (friends) and [`crate::strangers`] (strangers nearby)
//! share with the driver ([`crate::group::driver`]) and the router, which carry them between
//! groups on this node and over the network. Plain data: no logic lives here.

use nearby_client::proto::{Event, GoneReason};
use nearby_index::geo::UserId;
use nearby_index::ttl::LatestLocation;
use nearby_raft::GroupId;
use serde::{Deserialize, Serialize};

/// Names one revocation message of one visibility-ending change: the publisher's group, the
/// change's log index there, and the message's number among the change's revocations. Each
/// revocation is acknowledged with its own token, so a repeated acknowledgement (a resent batch)
/// cannot stand in for another one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Barrier {
    /// The publisher's group.
    pub group: GroupId,
    /// The change's log index in that group.
    pub index: u64,
    /// The revocation's number among the change's.
    pub part: u32,
}

/// A message from one group's presence to another's (or its own).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GroupMessage {
    /// `viewer` (whose home is `viewer_group`) wants the updates of `publishers`, and the
    /// receiving group's verdict on each of them.
    Subscribe {
        /// The viewer.
        viewer: UserId,
        /// The viewer's home group, where updates go.
        viewer_group: GroupId,
        /// Users of the receiving group.
        publishers: Vec<UserId>,
    },
    /// `viewer` no longer wants the updates of `publishers`.
    Unsubscribe {
        /// The viewer.
        viewer: UserId,
        /// Users of the receiving group.
        publishers: Vec<UserId>,
    },
    /// The answer to a subscription: of the publishers `asked`, those the viewer may see that
    /// have a live location. The viewer forgets every asked publisher not listed.
    Snapshot {
        /// The viewer.
        viewer: UserId,
        /// The publishers the subscription named.
        asked: Vec<UserId>,
        /// Visible publishers with a live location.
        entries: Vec<SnapshotEntry>,
        /// The log index of the state the verdicts were decided on.
        decided_at: u64,
    },
    /// `from` moved; tell `viewers` (users of the receiving group), who may all see it.
    Update {
        /// The publisher.
        from: UserId,
        /// Where and when.
        at: LatestLocation,
        /// Viewers of the receiving group.
        viewers: Vec<UserId>,
        /// The log index of the state the audience was decided on.
        decided_at: u64,
    },
    /// `viewers` must stop seeing `from`.
    Revoke {
        /// The publisher.
        from: UserId,
        /// Why.
        reason: GoneReason,
        /// Viewers of the receiving group.
        viewers: Vec<UserId>,
        /// The log index of the publisher group's state that revoked it: anything decided
        /// earlier is stale.
        at: u64,
        /// Acknowledge with [`GroupMessage::RevokeAck`] once done, if set.
        ack: Option<Barrier>,
    },
    /// A revocation asked for by `barrier` is done: the viewers' sessions hold nothing more
    /// about the publisher.
    RevokeAck {
        /// The change.
        barrier: Barrier,
    },
    /// Strangers nearby: between the publisher, channel and listener roles of groups (see
    /// [`crate::strangers`]).
    Cell(CellMessage),
    /// A new run of `group`'s live state started (see [`crate::incarnation`]): whatever the
    /// receiver knew of an earlier one — subscriptions, listeners, mirrors — is gone. Confirmed
    /// with [`GroupMessage::StartedAck`].
    Started {
        /// The group.
        group: GroupId,
        /// The run: its term and start.
        incarnation: Incarnation,
    },
    /// `group` has forgotten what it knew of runs before `incarnation` of the receiving group.
    StartedAck {
        /// The confirming group.
        group: GroupId,
        /// The run it confirms.
        incarnation: Incarnation,
    },
}

/// One publisher in a [`GroupMessage::Snapshot`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// The publisher.
    pub user: UserId,
    /// Their display name.
    pub name: String,
    /// Their latest location.
    pub at: LatestLocation,
}

/// What a [`crate::presence::Presence`] asks its caller to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Push `event` to every session of `viewer` (a user of this group).
    Push {
        /// The user.
        viewer: UserId,
        /// The event.
        event: Event,
    },
    /// Drop every event about `about` still queued for `viewer`'s sessions (a revocation).
    Purge {
        /// The user (of this group).
        viewer: UserId,
        /// The publisher.
        about: UserId,
    },
    /// Deliver `msg` to the presence of group `to`.
    Send {
        /// The destination group.
        to: GroupId,
        /// The message.
        msg: GroupMessage,
    },
}

/// A message between the stranger roles of two groups (see the module doc).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CellMessage {
    /// `user` (of group `home`) is at `at` in `cell`: store it and tell the listener groups.
    Publish {
        /// The cell (an H3 index).
        cell: u64,
        /// The publisher.
        user: UserId,
        /// Their display name.
        name: String,
        /// Where and when.
        at: LatestLocation,
        /// The publisher's home group.
        home: GroupId,
    },
    /// `user` is no longer in `cell` (moved, hidden, inactive); acknowledge under `ack` once
    /// every listener group has dropped it.
    Retract {
        /// The cell.
        cell: u64,
        /// The publisher.
        user: UserId,
        /// The change's barrier, if the retraction ends a permission.
        ack: Option<Barrier>,
    },
    /// Group `group` has users who want the strangers of `cell`.
    Listen {
        /// The cell.
        cell: u64,
        /// The listener group.
        group: GroupId,
        /// The run of the listener group's live state that listens (see
        /// [`crate::incarnation`]).
        incarnation: Incarnation,
    },
    /// Group `group` no longer listens to `cell`.
    Unlisten {
        /// The cell.
        cell: u64,
        /// The listener group.
        group: GroupId,
        /// The run that listened.
        incarnation: Incarnation,
    },
    /// The answer to `Listen`: everyone in the cell now.
    Contents {
        /// The cell.
        cell: u64,
        /// (publisher, name, where and when).
        entries: Vec<(UserId, String, LatestLocation)>,
    },
    /// `user` is at `at` in `cell` (relayed by the channel).
    Seen {
        /// The cell.
        cell: u64,
        /// The publisher.
        user: UserId,
        /// Their display name.
        name: String,
        /// Where and when.
        at: LatestLocation,
    },
    /// `user` left `cell` (relayed); acknowledge under `ack` once dropped.
    Unseen {
        /// The cell.
        cell: u64,
        /// The publisher.
        user: UserId,
        /// Acknowledge with [`GroupMessage::RevokeAck`], if set.
        ack: Option<Barrier>,
    },
}

/// One run of a group's live state (see [`crate::incarnation`]): ordered by term, then by when
/// it started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Incarnation {
    /// The Raft term its leader leads in.
    pub term: u64,
    /// When it started, ns since the Unix epoch (wall clock: a run of the same term after its
    /// node restarted comes later).
    pub started_ns: u64,
}

impl Incarnation {
    /// A run starting now, in `term`.
    pub fn starting(term: u64) -> Self {
        let started_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Incarnation { term, started_ns }
    }
}

impl std::fmt::Display for Incarnation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.term, self.started_ns)
    }
}
