//! One node's groups: [`RaftHost`] owns the node's shared WAL and transport and starts the
//! groups it hosts; [`Replica`] ([`ShardGroup`], [`MetaGroup`]) is the handle callers use to
//! propose commands, read state and follow what is applied.
//!
//! # Files
//!
//! ```text
//! DATA/wal/LOCK                     held while the host runs: one process per data directory
//! DATA/wal/*.wal                    the shared write-ahead log (see `wal`)
//! DATA/groups/<group>/GROUP         the replica's manifest: its kind and range, written once
//! DATA/groups/<group>/snapshot-*    each group's newest snapshot
//! ```
//!
//! The manifest pins what a replica *is*: opening a group with another kind or range than its
//! files say is refused ([`HostError::Mismatch`]) instead of silently replaying committed entries
//! against the wrong range.
//!
//! # Call order
//!
//! 1. [`RaftHost::start`] opens (and recovers) the WAL and binds the transport.
//! 2. [`RaftHost::open_shard`] / [`RaftHost::open_meta`] start each group the node hosts,
//!    recovering it from the WAL and its snapshot. A brand-new group is then
//!    [`Replica::initialize`]d on exactly one replica with its first member set; the others learn
//!    it by replication.
//! 3. [`RaftHost::shutdown`] stops every group, then the transport. The WAL is closed when the
//!    last handle is dropped. A host MUST be shut down before another is started on the same
//!    data directory (the lock file enforces it).

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nearby_index::friends::UserRange;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};

use crate::error::{HostError, ProposeError, WalError};
use crate::machine::{AppliedEntry, Machine};
use crate::meta::{ClusterMap, MetaCommand, MetaResult};
use crate::shard::command::{Command, CommandResult};
use crate::shard::state::GroupState;
use crate::store::{Applied, LogStore, Shared, StateMachine};
use crate::transport::{GroupRegistry, NetworkFactory, NodeTls, RaftTransport};
use crate::wal::{Wal, WalOptions};
use crate::{GroupId, LogId, Node, NodeId, Payload, Raft, Reply, META_GROUP};

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
    /// The node's TLS identity in the cluster (its node id must be `node_id`).
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

/// The longest silence, in milliseconds, after which a follower stands for election.
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 800;

/// How long a follower refuses to vote for anyone else after it last heard from its leader
/// (openraft's leader lease, which it sets to the longest election timeout). A leader whose
/// heartbeats a quorum answered, sent at `t`, is therefore the only leader until `t` plus this:
/// what `node` serves from live state relies on it (see `node::group::lease`).
pub const LEADER_LEASE: std::time::Duration = std::time::Duration::from_millis(ELECTION_TIMEOUT_MAX_MS);

/// nearby's openraft settings: heartbeats every 100 ms, elections after 400–800 ms of silence,
/// at most 64 entries per `AppendEntries` (a follower catching up gets many small appends rather
/// than a few it cannot write in time), snapshots sent in 256 KiB chunks with 2 s for each (at
/// openraft's 3 MiB and 200 ms, new replicas on a loaded 5-node cluster never received one: every
/// attempt timed out and started again), a snapshot every 10,000 entries, and 1,000 entries kept
/// after it for slightly lagging followers.
pub fn default_raft_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "nearby".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
        max_payload_entries: 64,
        snapshot_max_chunk_size: 256 * 1024,
        install_snapshot_timeout: 2_000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(10_000),
        max_in_snapshot_log_to_keep: 1_000,
        ..Default::default()
    }
}

/// What a replica's manifest records (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Manifest {
    /// A shard group owning a range.
    Shard(UserRange),
    /// The meta group.
    Meta,
}

impl std::fmt::Display for Manifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Manifest::Shard(r) => write!(f, "shard group of {r}"),
            Manifest::Meta => f.write_str("meta group"),
        }
    }
}

impl Manifest {
    fn encode(self) -> String {
        match self {
            Manifest::Shard(r) => format!("shard {} {}\n", r.start, r.end),
            Manifest::Meta => "meta\n".into(),
        }
    }

    fn parse(text: &str) -> Option<Manifest> {
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            ["meta"] => Some(Manifest::Meta),
            ["shard", start, end] => UserRange::new(start.parse().ok()?, end.parse().ok()?)
                .ok()
                .map(Manifest::Shard),
            _ => None,
        }
    }
}

/// One node of the cluster: its WAL, its transport, and the groups it hosts.
pub struct RaftHost {
    id: NodeId,
    addr: String,
    data_dir: PathBuf,
    raft_config: Arc<openraft::Config>,
    wal: Arc<Wal>,
    transport: Arc<RaftTransport>,
    registry: GroupRegistry,
    shards: Mutex<HashMap<GroupId, ShardGroup>>,
    meta: Mutex<Option<MetaGroup>>,
    _lock: File,
}

impl RaftHost {
    /// Opens the data directory (recovering the WAL) and binds the transport.
    pub async fn start(config: HostConfig) -> Result<RaftHost, HostError> {
        if config.tls.node_id() != config.node_id {
            return Err(HostError::Group {
                group: 0,
                reason: format!(
                    "the TLS identity is node {}'s, but this is node {}",
                    config.tls.node_id(),
                    config.node_id
                ),
            });
        }
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
            shards: Mutex::new(HashMap::new()),
            meta: Mutex::new(None),
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

    /// The node's shared WAL.
    pub fn wal(&self) -> &Arc<Wal> {
        &self.wal
    }

    /// The node's transport (to send and serve peer messages).
    pub fn transport(&self) -> &Arc<RaftTransport> {
        &self.transport
    }

    /// The openraft settings every group of this host uses.
    pub fn raft_config(&self) -> &openraft::Config {
        &self.raft_config
    }

    /// The replicas this node has files for, with what their manifests say, by group id.
    pub fn local_groups(&self) -> Result<Vec<(GroupId, Manifest)>, HostError> {
        let dir = self.data_dir.join("groups");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(WalError::io(&dir, e).into()),
        };
        let mut out = Vec::new();
        for ent in entries {
            let ent = ent.map_err(|e| WalError::io(&dir, e))?;
            let Some(id) = ent.file_name().to_str().and_then(|n| n.parse::<GroupId>().ok()) else {
                continue;
            };
            if let Some(m) = read_manifest(&ent.path())? {
                out.push((id, m));
            }
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    fn group_dir(&self, group: GroupId) -> PathBuf {
        self.data_dir.join("groups").join(group.to_string())
    }

    /// Checks (or, for a new replica, writes) the manifest of `group`. A shard range that
    /// starts at the same id matches (splits move where ranges end).
    fn pin_manifest(&self, group: GroupId, want: Manifest) -> Result<PathBuf, HostError> {
        let dir = self.group_dir(group);
        match read_manifest(&dir)? {
            Some(found) if found == want => {}
            Some(Manifest::Shard(found)) if matches!(want, Manifest::Shard(w) if w.start == found.start) => {}
            Some(found) => {
                return Err(HostError::Mismatch {
                    group,
                    on_disk: found.to_string(),
                    expected: want.to_string(),
                })
            }
            None => write_manifest(&dir, want)?,
        }
        Ok(dir)
    }

    async fn start_raft<M: Machine>(
        &self,
        group: GroupId,
        sm: StateMachine<M>,
    ) -> Result<Replica<M>, HostError> {
        let shared = sm.shared();
        let log = LogStore::new(Arc::clone(&self.wal), group);
        let network = NetworkFactory::new(Arc::clone(&self.transport), group);
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
        Ok(Replica {
            id: group,
            raft,
            shared,
            wal: Arc::clone(&self.wal),
            writes: Arc::default(),
        })
    }

    /// Starts the replica of shard group `group` (owning `range`) on this node, recovering it
    /// from disk. Refuses if the replica's files say it owns another range.
    pub async fn open_shard(&self, group: GroupId, range: UserRange) -> Result<ShardGroup, HostError> {
        if let Some(g) = self.shard(group) {
            return Ok(g);
        }
        if group == META_GROUP {
            return Err(HostError::Mismatch {
                group,
                on_disk: Manifest::Meta.to_string(),
                expected: Manifest::Shard(range).to_string(),
            });
        }
        let dir = self.pin_manifest(group, Manifest::Shard(range))?;
        // A group born of a split starts from its seed (see `open_split_child`).
        let initial = read_seed(&dir)?.unwrap_or_else(|| GroupState::new(range));
        let sm = StateMachine::open(group, &dir, initial)?;
        let found = sm.shared().read(|a| a.state.range());
        // A split changes where a range ends, never where it starts; the state's own range is
        // the truth once its log is applied (see `note_range`).
        if found.start != range.start {
            return Err(HostError::Mismatch {
                group,
                on_disk: format!("a snapshot of {}", Manifest::Shard(found)),
                expected: Manifest::Shard(range).to_string(),
            });
        }
        let handle = self.start_raft(group, sm).await?;
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group, handle.clone());
        Ok(handle)
    }

    /// Records in `group`'s manifest the range its state now owns (after a split applied), so
    /// a restart checks the files against the range they really hold.
    pub fn note_range(&self, group: GroupId) -> Result<(), HostError> {
        let Some(g) = self.shard(group) else {
            return Ok(());
        };
        let range = g.range();
        let dir = self.group_dir(group);
        if read_manifest(&dir)? != Some(Manifest::Shard(range)) {
            write_manifest(&dir, Manifest::Shard(range))?;
        }
        Ok(())
    }

    /// This node's replica of the group a split of `parent` makes (see [`Command::Split`]),
    /// from the seed in `parent`'s state: its manifest and seed file written (synced) first,
    /// then opened. With `stand_first` (on one replica: the parent's leader's) it is given its
    /// first membership, `members` — the same on every replica, since every replica of the
    /// parent makes the same seed at the same index — and stands in the first election; the
    /// others learn the membership from that leader, and initialize themselves only if it has
    /// not reached them within [`SPLIT_FIRST_LEADER_WAIT`]. A replica that exists already
    /// (opened before, or restarted) is returned as it is.
    ///
    /// [`Command::Split`]: crate::Command::Split
    pub async fn open_split_child(
        &self,
        seed: &crate::shard::state::SplitSeed,
        members: BTreeMap<NodeId, Node>,
        stand_first: bool,
    ) -> Result<ShardGroup, HostError> {
        let group = seed.new_group;
        if let Some(g) = self.shard(group) {
            return Ok(g);
        }
        let dir = self.group_dir(group);
        let fresh = read_manifest(&dir)?.is_none();
        if fresh {
            let state = seed.group_state();
            let bytes = state.encode_versioned().map_err(|e| HostError::Group {
                group,
                reason: format!("cannot encode the split seed: {e}"),
            })?;
            write_seed(&dir, &bytes)?;
            write_manifest(&dir, Manifest::Shard(seed.range))?;
        }
        let g = self.open_shard(group, seed.range).await?;
        if !stand_first {
            // Another replica (the parent's leader) initializes the group and stands first: its
            // leader's messages bring this replica the membership. Initializing here too would
            // start an election at once (openraft's `initialize` does), and replicas are made at
            // different moments, so a late one would depose the first leader. Only if nothing
            // came within the hold (that node failed) does this replica initialize itself.
            let waiting = g.clone();
            tokio::spawn(async move {
                tokio::time::sleep(SPLIT_FIRST_LEADER_WAIT).await;
                if is_blank(&waiting) {
                    tracing::info!(group, "no leader of the new group yet: this replica stands");
                    if let Err(e) = waiting.initialize(members).await {
                        tracing::debug!(group, error = %e, "the new group's replica not initialized");
                    }
                }
            });
            return Ok(g);
        }
        if is_blank(&g) {
            g.initialize(members).await?;
        }
        Ok(g)
    }

    /// Starts this node's replica of the meta group, recovering it from disk.
    pub async fn open_meta(&self) -> Result<MetaGroup, HostError> {
        if let Some(m) = self.meta() {
            return Ok(m);
        }
        let dir = self.pin_manifest(META_GROUP, Manifest::Meta)?;
        let sm = StateMachine::open(META_GROUP, &dir, ClusterMap::default())?;
        let handle = self.start_raft(META_GROUP, sm).await?;
        *self.meta.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle.clone());
        Ok(handle)
    }

    /// The handle of a shard group this node hosts.
    pub fn shard(&self, group: GroupId) -> Option<ShardGroup> {
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
    }

    /// This node's replica of the meta group, if it hosts one.
    pub fn meta(&self) -> Option<MetaGroup> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The Raft of this node's replica of `group` (the meta group or a shard group), if it
    /// hosts one.
    pub fn raft_of(&self, group: GroupId) -> Option<Raft> {
        if group == META_GROUP {
            self.meta().map(|m| m.raft().clone())
        } else {
            self.shard(group).map(|g| g.raft().clone())
        }
    }

    /// Holds back new proposals to `group`'s replica here (see [`Replica::hold_writes`]); `None`
    /// if it has no replica of it or the proposals under way were not answered within `within`.
    pub async fn hold_writes(&self, group: GroupId, within: Duration) -> Option<WritesHeld> {
        if group == META_GROUP {
            self.meta()?.hold_writes(within).await
        } else {
            self.shard(group)?.hold_writes(within).await
        }
    }

    /// Every shard group this node hosts, by id.
    pub fn shards(&self) -> Vec<ShardGroup> {
        let mut v: Vec<ShardGroup> = self
            .shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|g| g.id);
        v
    }

    /// Stops this node's replica of `group` (shard or meta); its files stay, so it can be opened
    /// again.
    pub async fn close_group(&self, group: GroupId) {
        if let Some(raft) = self.detach_group(group) {
            stop_raft(group, raft).await;
        }
    }

    /// Takes `group` out of this host at once (no more messages reach it, `shard`/`meta` no
    /// longer return it) and returns its Raft, for the caller to stop ([`stop_raft`]) where
    /// waiting for it would hold other work up.
    pub fn detach_group(&self, group: GroupId) -> Option<Raft> {
        self.registry
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
        if group == META_GROUP {
            self.meta
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .map(|g| g.raft)
        } else {
            self.shards
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&group)
                .map(|g| g.raft)
        }
    }

    /// Stops every group, then the transport.
    pub async fn shutdown(&self) {
        let mut rafts: Vec<(GroupId, Raft)> = self
            .shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(id, g)| (id, g.raft))
            .collect();
        if let Some(m) = self.meta.lock().unwrap_or_else(|p| p.into_inner()).take() {
            rafts.push((META_GROUP, m.raft));
        }
        self.registry.write().unwrap_or_else(|p| p.into_inner()).clear();
        // A group waiting for disk space would never stop.
        self.wal.close();
        for (id, raft) in rafts {
            if let Err(e) = raft.shutdown().await {
                tracing::warn!(group = id, error = %e, "group did not shut down cleanly");
            }
        }
        self.transport.shutdown().await;
        tracing::info!(node = self.id, "raft host stopped");
    }
}

fn read_manifest(dir: &Path) -> Result<Option<Manifest>, HostError> {
    let path = dir.join("GROUP");
    match std::fs::read_to_string(&path) {
        Ok(text) => Manifest::parse(&text)
            .map(Some)
            .ok_or_else(|| WalError::corruption(&path, 0, format!("not a group manifest: {text:?}")).into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(WalError::io(&path, e).into()),
    }
}

/// The seed a group born of a split starts from (`DIR/SEED`: one checksummed record of the
/// state), if it has one.
fn read_seed(dir: &Path) -> Result<Option<GroupState>, HostError> {
    let path = dir.join("SEED");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(WalError::io(&path, e).into()),
    };
    use crate::wal::frame::{check, Check};
    let damaged =
        |at: usize, what: String| -> HostError { WalError::corruption(&path, at as u64, what).into() };
    // A record with the state's length, then the state in chunks (see `write_seed`).
    let (len, mut at) = match check(&bytes, 0) {
        Check::Record { payload: (a, b) } if b - a == 8 => {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[a..b]);
            (u64::from_le_bytes(word) as usize, b)
        }
        other => return Err(damaged(0, format!("split seed header damaged: {other:?}"))),
    };
    let mut data = Vec::with_capacity(len.min(bytes.len()));
    while data.len() < len {
        match check(&bytes, at) {
            Check::Record { payload: (a, b) } => {
                data.extend_from_slice(&bytes[a..b]);
                at = b;
            }
            other => return Err(damaged(at, format!("split seed chunk damaged: {other:?}"))),
        }
    }
    if data.len() != len || at != bytes.len() {
        return Err(damaged(
            at,
            format!("split seed holds {} bytes, header says {len}", data.len()),
        ));
    }
    GroupState::decode_versioned(&data)
        .map(Some)
        .map_err(|e| WalError::corruption(&path, 0, format!("undecodable split seed: {e}")).into())
}

/// Writes `DIR/SEED` atomically (temporary file, sync, rename, directory sync).
fn write_seed(dir: &Path, state: &[u8]) -> Result<(), HostError> {
    std::fs::create_dir_all(dir).map_err(|e| WalError::io(dir, e))?;
    let tmp = dir.join("SEED.tmp");
    let path = dir.join("SEED");
    let mut record = Vec::with_capacity(state.len() + 64);
    crate::wal::frame::encode_record(&(state.len() as u64).to_le_bytes(), &mut record);
    for chunk in state.chunks(crate::store::state_machine::SNAPSHOT_CHUNK) {
        crate::wal::frame::encode_record(chunk, &mut record);
    }
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &record)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| WalError::io(&path, e).into())
}

fn write_manifest(dir: &Path, m: Manifest) -> Result<(), HostError> {
    std::fs::create_dir_all(dir).map_err(|e| WalError::io(dir, e))?;
    let tmp = dir.join("GROUP.tmp");
    let path = dir.join("GROUP");
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        std::io::Write::write_all(&mut f, m.encode().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| WalError::io(&path, e).into())
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

/// A handle to one group replica on this node. Cheap to clone.
pub struct Replica<M> {
    id: GroupId,
    raft: Raft,
    shared: Arc<Shared<M>>,
    /// The node's log, asked for disk space before a proposal that adds data.
    wal: Arc<Wal>,
    /// Every proposal holds this shared until it is answered; a leadership hand-over holds it
    /// exclusively, so the leader's log stops growing while its successor catches up
    /// ([`Replica::hold_writes`]).
    writes: Arc<tokio::sync::RwLock<()>>,
}

impl<M> Clone for Replica<M> {
    fn clone(&self) -> Self {
        Replica {
            id: self.id,
            raft: self.raft.clone(),
            shared: Arc::clone(&self.shared),
            wal: Arc::clone(&self.wal),
            writes: Arc::clone(&self.writes),
        }
    }
}

/// Proposals of a replica held back by [`Replica::hold_writes`]; dropping it lets them go.
pub struct WritesHeld {
    _guard: tokio::sync::OwnedRwLockWriteGuard<()>,
}

/// A shard group replica.
pub type ShardGroup = Replica<GroupState>;

/// A meta group replica.
pub type MetaGroup = Replica<ClusterMap>;

fn not_leader(group: GroupId, leader: Option<NodeId>, node: Option<Node>) -> ProposeError {
    ProposeError::NotLeader {
        group,
        leader: leader.zip(node.map(|n| n.raft)),
    }
}

impl<M: Machine> Replica<M> {
    /// The group's id.
    pub fn id(&self) -> GroupId {
        self.id
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
    pub fn read<R>(&self, f: impl FnOnce(&M) -> R) -> R {
        self.shared.read(|a| f(&a.state))
    }

    /// Reads the applied state with its position in the log.
    pub fn read_applied<R>(&self, f: impl FnOnce(&Applied<M>) -> R) -> R {
        self.shared.read(f)
    }

    /// Reads the group's state as the leader knows it now: confirms leadership with a quorum and
    /// waits until everything committed before the call is applied here. A new leader has the
    /// committed entries in its log at once but applies them only after committing one of its
    /// own, so a plain [`read`](Self::read) right after a failover may not yet show an
    /// acknowledged write; this does.
    pub async fn read_linearizable<R>(&self, f: impl FnOnce(&M) -> R) -> Result<R, ProposeError> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(self.read(f)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(fw))) => {
                Err(not_leader(self.id, fw.leader_id, fw.leader_node))
            }
            Err(e) => Err(ProposeError::Unavailable {
                group: self.id,
                reason: e.to_string(),
            }),
        }
    }

    /// The last log id applied on this replica.
    pub fn last_applied(&self) -> Option<LogId> {
        self.shared.read(|a| a.last_applied)
    }

    /// The last applied log id, as a watch (wakes on every apply and snapshot install).
    pub fn watch_applied(&self) -> tokio::sync::watch::Receiver<Option<LogId>> {
        self.shared.watch_applied()
    }

    /// Every entry applied from now on, in order, replacing any earlier subscriber.
    pub fn subscribe(&self) -> tokio::sync::mpsc::UnboundedReceiver<AppliedEntry> {
        self.shared.subscribe()
    }

    /// Stops telling the current subscriber.
    pub fn unsubscribe(&self) {
        self.shared.unsubscribe()
    }

    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Proposes `payload` and waits until it is committed and applied here. Only the leader
    /// accepts proposals.
    async fn write(&self, payload: Payload) -> Result<(LogId, Reply), ProposeError> {
        let _proposing = self.writes.read().await;
        match self.raft.client_write(payload).await {
            Ok(resp) => Ok((resp.log_id, resp.data)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(not_leader(self.id, f.leader_id, f.leader_node))
            }
            Err(e) => Err(ProposeError::Unavailable {
                group: self.id,
                reason: e.to_string(),
            }),
        }
    }

    /// Holds back new proposals once every proposal under way has been answered, or `None` if
    /// they were not all answered within `within` (new ones waited meanwhile, and go on).
    ///
    /// A leadership transfer needs it: a candidate whose log misses an entry the leader appended
    /// is refused by every replica holding it, yet its higher term deposes the leader — the
    /// group is left without one until the next election timeout. Holding writes while the
    /// successor catches up and stands (Raft's dissertation, §3.10) leaves nothing to miss.
    /// Held proposals resume when the hold is dropped, and a replica that no longer leads then
    /// answers them with the new leader.
    pub async fn hold_writes(&self, within: Duration) -> Option<WritesHeld> {
        tokio::time::timeout(within, Arc::clone(&self.writes).write_owned())
            .await
            .ok()
            .map(|guard| WritesHeld { _guard: guard })
    }

    /// Builds a snapshot of everything applied so far and purges the log it covers, so a replica
    /// added later starts from the snapshot instead of replaying the entries (after a bulk
    /// import, tens of MiB of them). Returns the index the log now starts after.
    pub async fn compact(&self, timeout: Duration) -> Result<u64, ProposeError> {
        let unavailable = |reason: String| ProposeError::Unavailable {
            group: self.id,
            reason,
        };
        let Some(applied) = self.last_applied() else {
            return Ok(0);
        };
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        self.raft
            .wait(Some(timeout))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= applied.index),
                "snapshot after compaction",
            )
            .await
            .map_err(|e| unavailable(format!("snapshot not built: {e}")))?;
        self.raft
            .trigger()
            .purge_log(applied.index)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        Ok(applied.index)
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

impl Replica<GroupState> {
    /// The user-id range the group owns.
    pub fn range(&self) -> UserRange {
        self.read(|s| s.range())
    }

    /// Validates `cmd` against this replica's state, proposes it, and waits until it is
    /// committed and applied. Only the leader accepts proposals.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, ProposeError> {
        self.propose_at(cmd).await.map(|(_, r)| r)
    }

    /// [`propose`](Self::propose), also returning the entry's log id.
    pub async fn propose_at(&self, cmd: Command) -> Result<(LogId, CommandResult), ProposeError> {
        self.read(|s| cmd.validate(s).and_then(|()| cmd.check_limits(s)))?;
        if cmd.adds_data() {
            if let Some(reason) = self.wal.space_low() {
                return Err(ProposeError::Unavailable {
                    group: self.id,
                    reason: format!("{reason}; changes that add data are refused until there is room"),
                });
            }
        }
        match self.write(Payload::Shard(cmd)).await? {
            (_, Reply::Shard(CommandResult::Rejected(e))) => Err(ProposeError::Invalid(e)),
            (at, Reply::Shard(r)) => Ok((at, r)),
            (_, other) => Err(ProposeError::Unavailable {
                group: self.id,
                reason: format!("unexpected reply {other}"),
            }),
        }
    }
}

impl Replica<ClusterMap> {
    /// Proposes a change to the cluster map and waits until it is committed and applied here.
    pub async fn propose(&self, cmd: MetaCommand) -> Result<MetaResult, ProposeError> {
        match self.write(Payload::Meta(cmd)).await? {
            (_, Reply::Meta(r)) => Ok(r),
            (_, other) => Err(ProposeError::Unavailable {
                group: self.id,
                reason: format!("unexpected reply {other}"),
            }),
        }
    }
}

/// How long a replica of a split's new group that does not stand first waits for the first
/// leader's messages before it initializes the group itself.
pub const SPLIT_FIRST_LEADER_WAIT: Duration = Duration::from_secs(2);

/// Whether a replica has neither a log nor a vote: never initialized, never heard of a leader.
fn is_blank(g: &ShardGroup) -> bool {
    let m = g.raft().metrics();
    let m = m.borrow();
    m.last_log_index.is_none() && m.current_term == 0
}

/// Stops a detached group's Raft ([`RaftHost::detach_group`]); a stop that takes longer than a
/// few seconds (its core busy in a handler) is reported when it ends.
pub async fn stop_raft(group: GroupId, raft: Raft) {
    let started = std::time::Instant::now();
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(group, error = %e, "group did not shut down cleanly");
    }
    let took = started.elapsed();
    if took > std::time::Duration::from_secs(5) {
        tracing::warn!(
            group,
            secs = took.as_secs_f64(),
            "a group's Raft took long to stop"
        );
    }
}
