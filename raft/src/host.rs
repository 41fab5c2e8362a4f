//! One node's shard groups: [`RaftHost`] owns the node's shared WAL and transport and starts the
//! groups it hosts; [`ShardGroup`] is the handle callers use to propose commands and read state.
//!
//! # Files
//!
//! ```text
//! DATA/wal/LOCK                     held while the host runs: one process per data directory
//! DATA/wal/*.wal                    the shared write-ahead log (see `wal`)
//! DATA/groups/<group>/snapshot-*    each group's newest snapshot
//! ```
//!
//! # Call order
//!
//! 1. [`RaftHost::start`] opens (and recovers) the WAL and binds the transport.
//! 2. [`RaftHost::open_group`] starts each group the node hosts, recovering it from the WAL and
//!    its snapshot. A brand-new group is then [`ShardGroup::initialize`]d on exactly one replica
//!    with the full member set; the others learn it by replication.
//! 3. [`RaftHost::shutdown`] stops every group, then the transport. The WAL is closed when the
//!    last handle is dropped. A host MUST be shut down before another is started on the same
//!    data directory (the lock file enforces it).

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use nearby_index::friends::UserRange;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};

use crate::command::{Command, CommandResult};
use crate::error::{HostError, ProposeError, WalError};
use crate::state::GroupState;
use crate::store::{Applied, LogStore, StateMachine};
use crate::transport::{GroupRegistry, NetworkFactory, NodeTls, RaftTransport};
use crate::wal::{Wal, WalOptions};
use crate::{GroupId, LogId, Node, NodeId, Raft};

/// How a host is set up.
#[derive(Clone)]
pub struct HostConfig {
    /// This node's id.
    pub node_id: NodeId,
    /// Where the WAL and snapshots live.
    pub data_dir: PathBuf,
    /// The UDP address the Raft transport binds.
    pub listen: SocketAddr,
    /// The address peers use to reach this node; the bound address if `None`.
    pub advertise: Option<String>,
    /// The node's TLS identity in the cluster.
    pub tls: NodeTls,
    /// openraft's settings, shared by all groups.
    pub raft: openraft::Config,
    /// WAL settings.
    pub wal: WalOptions,
}

impl HostConfig {
    /// A configuration with nearby's defaults for Raft timing and snapshots.
    pub fn new(node_id: NodeId, data_dir: impl Into<PathBuf>, listen: SocketAddr, tls: NodeTls) -> Self {
        HostConfig {
            node_id,
            data_dir: data_dir.into(),
            listen,
            advertise: None,
            tls,
            raft: default_raft_config(),
            wal: WalOptions::default(),
        }
    }
}

/// nearby's openraft settings: heartbeats every 100 ms, elections after 400–800 ms of silence,
/// a snapshot every 10,000 entries, and 1,000 entries kept after it for slightly lagging
/// followers.
pub fn default_raft_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "nearby".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(10_000),
        max_in_snapshot_log_to_keep: 1_000,
        ..Default::default()
    }
}

/// One node of the cluster: its WAL, its transport, and the shard groups it hosts.
pub struct RaftHost {
    id: NodeId,
    addr: String,
    data_dir: PathBuf,
    raft_config: Arc<openraft::Config>,
    wal: Arc<Wal>,
    transport: Arc<RaftTransport>,
    registry: GroupRegistry,
    groups: Mutex<HashMap<GroupId, ShardGroup>>,
    _lock: File,
}

impl RaftHost {
    /// Opens the data directory (recovering the WAL) and binds the transport.
    pub async fn start(config: HostConfig) -> Result<RaftHost, HostError> {
        let raft_config = config.raft.clone().validate().map_err(|e| HostError::Group {
            group: 0,
            reason: format!("invalid raft config: {e}"),
        })?;
        let wal_dir = config.data_dir.join("wal");
        std::fs::create_dir_all(&wal_dir).map_err(|e| WalError::io(&wal_dir, e))?;
        let lock = lock_dir(&wal_dir)?;
        let wal_opts = config.wal.clone();
        let dir = wal_dir.clone();
        let (wal, report) = tokio::task::spawn_blocking(move || Wal::open(&dir, wal_opts))
            .await
            .map_err(|e| WalError::Poisoned(format!("wal recovery task failed: {e}")))??;
        if report.torn_tail_bytes > 0 {
            tracing::warn!(
                bytes = report.torn_tail_bytes,
                "recovered the wal after a torn write"
            );
        }
        let registry: GroupRegistry = Arc::default();
        let transport = RaftTransport::bind(config.listen, &config.tls, Arc::clone(&registry))?;
        let addr = match config.advertise {
            Some(a) => a,
            None => transport.local_addr()?.to_string(),
        };
        tracing::info!(node = config.node_id, %addr, "raft host started");
        Ok(RaftHost {
            id: config.node_id,
            addr,
            data_dir: config.data_dir,
            raft_config: Arc::new(raft_config),
            wal: Arc::new(wal),
            transport,
            registry,
            groups: Mutex::new(HashMap::new()),
            _lock: lock,
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.id
    }

    /// The address peers use to reach this node.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// This node as a Raft member.
    pub fn node(&self) -> Node {
        Node::new(self.addr.clone())
    }

    /// The node's shared WAL.
    pub fn wal(&self) -> &Arc<Wal> {
        &self.wal
    }

    /// Starts the replica of `group` (owning `range`) on this node, recovering it from disk.
    pub async fn open_group(&self, group: GroupId, range: UserRange) -> Result<ShardGroup, HostError> {
        if let Some(g) = self.group(group) {
            return Ok(g);
        }
        let dir = self.data_dir.join("groups").join(group.to_string());
        let sm = StateMachine::open(group, &dir, GroupState::new(range))?;
        let applied = sm.applied();
        let log = LogStore::new(Arc::clone(&self.wal), group);
        let network = NetworkFactory::new(Arc::clone(&self.transport), group, self.id);
        let raft = Raft::new(self.id, Arc::clone(&self.raft_config), network, log, sm)
            .await
            .map_err(|e| HostError::Group {
                group,
                reason: e.to_string(),
            })?;
        self.registry
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group, raft.clone());
        let handle = ShardGroup {
            id: group,
            range,
            raft,
            applied,
        };
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group, handle.clone());
        Ok(handle)
    }

    /// The handle of a group this node hosts.
    pub fn group(&self, group: GroupId) -> Option<ShardGroup> {
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
    }

    /// Every group this node hosts, by id.
    pub fn groups(&self) -> Vec<ShardGroup> {
        let mut v: Vec<ShardGroup> = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|g| g.id);
        v
    }

    /// Stops this node's replica of `group`; its files stay, so it can be opened again.
    pub async fn close_group(&self, group: GroupId) {
        self.registry
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
        let g = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
        if let Some(g) = g {
            if let Err(e) = g.raft.shutdown().await {
                tracing::warn!(group, error = %e, "group did not shut down cleanly");
            }
        }
    }

    /// Stops every group, then the transport.
    pub async fn shutdown(&self) {
        let groups: Vec<ShardGroup> = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, g)| g)
            .collect();
        self.registry.write().unwrap_or_else(|p| p.into_inner()).clear();
        for g in groups {
            if let Err(e) = g.raft.shutdown().await {
                tracing::warn!(group = g.id, error = %e, "group did not shut down cleanly");
            }
        }
        self.transport.shutdown().await;
        tracing::info!(node = self.id, "raft host stopped");
    }
}

fn lock_dir(dir: &Path) -> Result<File, HostError> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| WalError::io(&path, e))?;
    file.try_lock().map_err(|e| {
        WalError::io(
            &path,
            std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!("data directory is in use by another process ({e})"),
            ),
        )
    })?;
    Ok(file)
}

/// A handle to one shard group replica on this node. Cheap to clone.
#[derive(Clone)]
pub struct ShardGroup {
    id: GroupId,
    range: UserRange,
    raft: Raft,
    applied: Arc<RwLock<Applied>>,
}

impl ShardGroup {
    /// The group's id.
    pub fn id(&self) -> GroupId {
        self.id
    }

    /// The user-id range the group owns.
    pub fn range(&self) -> UserRange {
        self.range
    }

    /// The openraft handle, for metrics and membership changes.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Makes a brand-new group with `members` as its voters. Call on one replica only.
    pub async fn initialize(&self, members: BTreeMap<NodeId, Node>) -> Result<(), HostError> {
        self.raft.initialize(members).await.map_err(|e| HostError::Group {
            group: self.id,
            reason: e.to_string(),
        })
    }

    /// Reads the replica's applied state. On a follower it may lag the leader.
    pub fn read<R>(&self, f: impl FnOnce(&GroupState) -> R) -> R {
        f(&self.applied.read().unwrap_or_else(|p| p.into_inner()).state)
    }

    /// Reads the group's state as the leader knows it now: confirms leadership with a quorum and
    /// waits until everything committed before the call is applied here. A new leader has the
    /// committed entries in its log at once but applies them only after committing one of its
    /// own, so a plain [`read`](Self::read) right after a failover may not yet show an
    /// acknowledged write; this does.
    pub async fn read_linearizable<R>(&self, f: impl FnOnce(&GroupState) -> R) -> Result<R, ProposeError> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(self.read(f)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(fw))) => {
                Err(ProposeError::NotLeader {
                    group: self.id,
                    leader: fw.leader_id.zip(fw.leader_node.map(|n| n.addr)),
                })
            }
            Err(e) => Err(ProposeError::Unavailable {
                group: self.id,
                reason: e.to_string(),
            }),
        }
    }

    /// The last log id applied on this replica.
    pub fn last_applied(&self) -> Option<LogId> {
        self.applied
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .last_applied
    }

    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Validates `cmd` against this replica's state, proposes it, and waits until it is
    /// committed and applied. Only the leader accepts proposals.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, ProposeError> {
        self.read(|s| cmd.validate(s))?;
        match self.raft.client_write(cmd).await {
            Ok(resp) => match resp.data {
                CommandResult::Rejected(e) => Err(ProposeError::Invalid(e)),
                other => Ok(other),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(ProposeError::NotLeader {
                group: self.id,
                leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
            }),
            Err(e) => Err(ProposeError::Unavailable {
                group: self.id,
                reason: e.to_string(),
            }),
        }
    }

    /// Waits until this replica has applied at least `index`, or `timeout` passes.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "wait_applied")
            .await
            .is_ok()
    }
}
