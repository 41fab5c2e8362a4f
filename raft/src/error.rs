//! The crate's typed errors.

use std::path::{Path, PathBuf};

use crate::shard::command::CommandError;
use crate::{GroupId, NodeId};

/// An error of the write-ahead log or the snapshot files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalError {
    /// The operating system refused a file operation.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Acknowledged data failed its checksum or could not be decoded. Nothing after it was
    /// applied; the replica must be repaired (for example rebuilt from its peers).
    #[error("corruption in {path} at byte {offset}: {reason}")]
    Corruption {
        /// The damaged file.
        path: PathBuf,
        /// Where the damaged record starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The disk is full: nothing was written (a partial write was undone), and the same write
    /// may succeed once space returns.
    #[error("no space left on the disk of {path}")]
    NoSpace {
        /// The file or directory.
        path: PathBuf,
    },
    /// An earlier write or sync failed; the log refuses further writes until the node restarts
    /// and recovers from its files.
    #[error("the write-ahead log is poisoned by an earlier failure: {0}")]
    Poisoned(String),
    /// A record could not be encoded.
    #[error("cannot encode a wal record: {0}")]
    Encode(String),
    /// A single record is larger than the format allows.
    #[error("a wal record of {len} bytes is larger than the 64 MiB limit")]
    RecordTooLarge {
        /// The record's size.
        len: usize,
    },
}

/// Whether `e` says the disk (or the user's quota) is full.
pub(crate) fn is_no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl WalError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        if is_no_space(&source) {
            return WalError::NoSpace {
                path: path.to_path_buf(),
            };
        }
        WalError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn corruption(path: &Path, offset: u64, reason: impl Into<String>) -> Self {
        WalError::Corruption {
            path: path.to_path_buf(),
            offset,
            reason: reason.into(),
        }
    }
}

/// Why a proposal to a shard group did not commit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProposeError {
    /// The command is invalid; it was not proposed and changed nothing.
    #[error("invalid command: {0}")]
    Invalid(#[from] CommandError),
    /// This replica is not the group's leader; retry at the leader if one is known.
    #[error("not the leader of group {group}; leader: {leader:?}")]
    NotLeader {
        /// The group.
        group: GroupId,
        /// The current leader, if known, and its address.
        leader: Option<(NodeId, String)>,
    },
    /// The group is not hosted on this node.
    #[error("group {group} is not hosted here")]
    UnknownGroup {
        /// The group.
        group: GroupId,
    },
    /// The group failed or is shutting down.
    #[error("group {group} is unavailable: {reason}")]
    Unavailable {
        /// The group.
        group: GroupId,
        /// Why.
        reason: String,
    },
}

/// An error of starting or running a [`crate::RaftHost`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The WAL or a snapshot could not be opened or written.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// The transport could not be set up.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// A replica's files say it is another group (kind or range) than it is being opened as.
    #[error("group {group}: the data directory holds a {on_disk}, but the cluster map says it is a {expected}; refusing to start rather than replay its log against the wrong range")]
    Mismatch {
        /// The group.
        group: GroupId,
        /// What the files say.
        on_disk: String,
        /// What the caller (the map) says.
        expected: String,
    },
    /// openraft refused the configuration or failed to start a group.
    #[error("group {group}: {reason}")]
    Group {
        /// The group.
        group: GroupId,
        /// Why.
        reason: String,
    },
}

/// An error of the node-to-node transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// TLS material could not be generated or loaded.
    #[error("tls: {0}")]
    Tls(String),
    /// The endpoint could not bind its address.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The peer's address does not parse.
    #[error("bad peer address {addr:?}")]
    BadAddress {
        /// The address as given.
        addr: String,
    },
    /// Connecting to the peer failed.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The peer.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The connection or stream failed mid-request.
    #[error("rpc to {addr} failed: {reason}")]
    Rpc {
        /// The peer.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The peer answered that it does not host the group.
    #[error("peer {addr} does not host group {group}")]
    UnknownGroup {
        /// The peer.
        addr: String,
        /// The group.
        group: GroupId,
    },
    /// The peer's certificate is not the node the caller expected at that address.
    #[error("the peer at {addr} is not node {expected}")]
    WrongPeer {
        /// The peer.
        addr: String,
        /// The node expected there.
        expected: NodeId,
    },
    /// The peer sent bytes that do not decode.
    #[error("malformed message from {addr}: {reason}")]
    Malformed {
        /// The peer.
        addr: String,
        /// Why.
        reason: String,
    },
}
