//! nearby's replicated store: shard groups on openraft, with the project's own write-ahead log on
//! real files and a QUIC transport shared by every group of a node.
//!
//! A *shard group* owns one range of user ids and is one Raft group: a handful of replicas on
//! different nodes. A *node* ([`RaftHost`]) hosts many groups (multi-raft). Everything that is
//! expensive per group in a naive design is shared per node instead:
//!
//! - one write-ahead log ([`wal::Wal`]) holds the log records of every group on the node, so many
//!   groups' writes share one `fdatasync` (group commit);
//! - one QUIC endpoint ([`transport::RaftTransport`]) carries every group's Raft messages, with one
//!   connection per peer node and one short-lived stream per RPC, keyed by [`GroupId`].
//!
//! What a group *stores* — profiles, privacy settings, friend sets, pending requests, follower
//! grants — is the plain, I/O-free [`state::GroupState`]; the openraft traits are thin adapters
//! over it and over the WAL.
//!
//! # Layout
//!
//! - [`command`]: the typed commands a group accepts, their validation and their results.
//! - [`state`]: the state machine's data and the deterministic `apply` (no I/O, no clocks).
//! - [`wal`]: the node's shared write-ahead log: segments, checksums, group commit, recovery.
//! - [`store`]: openraft's `RaftLogStorage` (over the WAL) and `RaftStateMachine` (over
//!   [`state::GroupState`], with snapshots on disk).
//! - [`transport`]: the node-to-node Raft transport over QUIC with mutual TLS.
//! - [`seed`]: the bulk-import file (a world to load into a fresh cluster).
//! - [`host`]: [`RaftHost`], one node's set of groups, and [`ShardGroup`], the handle callers use
//!   to propose commands and read state.
//! - [`error`]: the crate's typed errors.
//!
//! # Durability
//!
//! A command is acknowledged to its caller only after a quorum of replicas has it in their WAL
//! (fsynced) and the leader has applied it. Votes are fsynced before they are answered. Latest
//! locations are *not* stored here: they are soft state held by the serving node (see
//! `docs/architecture.md`).

pub mod command;
pub mod error;
pub mod host;
pub mod seed;
pub mod state;
pub mod store;
pub mod transport;
pub mod wal;

use std::io::Cursor;

pub use command::{Command, CommandError, CommandResult, ImportBatch};
pub use error::{ProposeError, WalError};
pub use host::{HostConfig, RaftHost, ShardGroup};
pub use state::{GroupState, UserRecord};

/// Identifies a node of the cluster. Stable for the node's lifetime; never reused.
pub type NodeId = u64;

/// Identifies a shard group. Stable for the group's lifetime; never reused.
pub type GroupId = u64;

/// How peers reach a node: the node's Raft transport address (`host:port`).
pub type Node = openraft::BasicNode;

openraft::declare_raft_types!(
    /// openraft's type configuration for nearby's shard groups.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        Responder = openraft::impls::OneshotResponder<TypeConfig>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle of one shard group.
pub type Raft = openraft::Raft<TypeConfig>;

/// A log entry of a shard group.
pub type Entry = openraft::Entry<TypeConfig>;

/// openraft's log id, specialised to nearby's node ids.
pub type LogId = openraft::LogId<NodeId>;

/// openraft's vote, specialised to nearby's node ids.
pub type Vote = openraft::Vote<NodeId>;

/// openraft's storage error, specialised to nearby's node ids.
pub type StorageError = openraft::StorageError<NodeId>;
