//! nearby's replicated store: shard groups and the cluster map on openraft, with the project's
//! own write-ahead log on real files and a QUIC transport shared by every group of a node.
//!
//! A *shard group* owns one range of user ids and is one Raft group: a handful of replicas on
//! different nodes. The *meta group* ([`META_GROUP`]) is one more Raft group, on the first
//! nodes of the cluster, holding the cluster map: which nodes exist, which group owns which
//! range, and where each group's replicas and leader are. A *node* ([`RaftHost`]) hosts many
//! groups of both kinds (multi-raft). Everything that is expensive per group in a naive design
//! is shared per node instead:
//!
//! - one write-ahead log ([`wal::Wal`]) holds the log records of every group on the node, so many
//!   groups' writes share one `fdatasync` (group commit);
//! - one QUIC endpoint ([`transport::RaftTransport`]) carries every group's Raft messages and the
//!   node layer's own peer messages, with one connection per peer node, keyed by [`GroupId`].
//!
//! What a group *stores* is plain, I/O-free data — [`shard::GroupState`] (profiles, privacy
//! settings, friend sets, pending requests, follower grants, relation intents) or
//! [`meta::ClusterMap`] — behind the [`Machine`] trait; the openraft traits are thin adapters over
//! it and over the WAL. Both kinds share one [`TypeConfig`]: a log entry is a [`Payload`] that
//! names its kind, so one WAL and one transport serve both.
//!
//! # Layout
//!
//! - [`shard`]: a user range's commands, their validation and results, and its state.
//! - [`meta`]: the cluster map's commands and state.
//! - [`machine`]: the [`Machine`] trait joining both kinds to the state machine adapter.
//! - [`wal`]: the node's shared write-ahead log: segments, checksums, group commit, recovery.
//! - [`store`]: openraft's `RaftLogStorage` (over the WAL) and `RaftStateMachine` (over a
//!   [`Machine`], with snapshots on disk).
//! - [`transport`]: the node-to-node transport over QUIC with mutual TLS: Raft RPCs, and peer
//!   messages handed to the node layer's registered handler.
//! - [`timers`]: openraft's runtime with timers on a coarse grid, so hundreds of groups share
//!   their wake-ups.
//! - [`seed`]: the bulk-import file (a world to load into a fresh cluster).
//! - [`host`]: [`RaftHost`], one node's set of groups, and [`Replica`], the handle callers use
//!   to propose commands, read state and follow what is applied.
//! - [`error`]: the crate's typed errors.
//!
//! # Durability
//!
//! A command is acknowledged to its caller only after a quorum of replicas has it in their WAL
//! (fsynced) and the leader has applied it. Votes are fsynced before they are answered. Latest
//! locations are *not* stored here: they are soft state held by the serving node (see
//! `docs/architecture.md`).

pub mod error;
pub mod host;
pub mod machine;
pub mod meta;
pub mod seed;
pub mod shard;
pub mod store;
pub mod timers;
pub mod transport;
pub mod wal;

#[doc(hidden)]
pub mod test_support;

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use error::{ProposeError, WalError};
pub use host::{HostConfig, MetaGroup, RaftHost, Replica, ShardGroup, WritesHeld, LEADER_LEASE};
pub use machine::{AppliedEntry, Machine};
pub use meta::{ClusterMap, MetaCommand, MetaResult};
pub use shard::command::{Command, CommandError, CommandResult, ImportBatch};
pub use shard::state::{GroupState, Rare, UserRecord};

/// Identifies a node of the cluster. Stable for the node's lifetime; never reused.
pub type NodeId = u64;

/// Identifies a Raft group. Stable for the group's lifetime; never reused.
pub type GroupId = u64;

/// The meta group: the one Raft group that holds the cluster map.
pub const META_GROUP: GroupId = 0;

/// How to reach a node: its Raft transport address, the address its clients use, and its admin
/// address (each `host:port`). Carried in every group's membership, so a redirect can name the
/// client address of a group's leader.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node-to-node (Raft and peer message) address.
    pub raft: String,
    /// The client service address.
    pub client: String,
    /// The admin API address (empty if the node serves none).
    pub admin: String,
}

impl NodeInfo {
    /// A node reachable at these addresses.
    pub fn new(raft: impl Into<String>, client: impl Into<String>, admin: impl Into<String>) -> Self {
        NodeInfo {
            raft: raft.into(),
            client: client.into(),
            admin: admin.into(),
        }
    }
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} client={}", self.raft, self.client)
    }
}

/// How peers reach a node (openraft's `Node`).
pub type Node = NodeInfo;

/// One log entry's payload: a command for a shard group or for the meta group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// A command of a shard group.
    Shard(Command),
    /// A command of the meta group.
    Meta(MetaCommand),
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Shard(c) => c.fmt(f),
            Payload::Meta(c) => c.fmt(f),
        }
    }
}

/// What applying a [`Payload`] returned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// A shard group's result.
    Shard(CommandResult),
    /// The meta group's result.
    Meta(MetaResult),
    /// The payload was for the other kind of group; nothing changed.
    WrongKind,
    /// A blank or membership entry: no payload to apply.
    Empty,
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Shard(r) => r.fmt(f),
            Reply::Meta(r) => r.fmt(f),
            Reply::WrongKind => f.write_str("wrong kind of group"),
            Reply::Empty => f.write_str("nothing to apply"),
        }
    }
}

openraft::declare_raft_types!(
    /// openraft's type configuration, shared by shard groups and the meta group.
    pub TypeConfig:
        D = Payload,
        R = Reply,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        Responder = openraft::impls::OneshotResponder<TypeConfig>,
        AsyncRuntime = timers::CoarseTimers,
);

/// The Raft handle of one group.
pub type Raft = openraft::Raft<TypeConfig>;

/// A log entry of a group.
pub type Entry = openraft::Entry<TypeConfig>;

/// openraft's log id, specialised to nearby's node ids.
pub type LogId = openraft::LogId<NodeId>;

/// openraft's vote, specialised to nearby's node ids.
pub type Vote = openraft::Vote<NodeId>;

/// openraft's storage error, specialised to nearby's node ids.
pub type StorageError = openraft::StorageError<NodeId>;
