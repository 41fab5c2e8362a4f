//! `RaftStateMachine` for one group: applies committed entries to its [`Machine`] and keeps
//! snapshots in files.
//!
//! The applied state lives in memory in a [`Shared`], which the group's handle also holds: reads
//! never go through Raft, a subscriber is told of every applied entry in log order (the node's
//! driver of a led group reacts to commits from the apply path, on whichever node leads), and a
//! watch carries the last applied log id. The state is rebuilt on start from the newest snapshot
//! file plus the log entries openraft re-applies after it.
//!
//! # Snapshot files
//!
//! `DIR/snapshot-<index>-<term>.snap` (zero-padded, so names sort by log position): a header
//! record (the snapshot's metadata and the data's length) followed by the encoded state in chunks
//! of at most [`SNAPSHOT_CHUNK`] bytes, each a checksummed record in the WAL's framing. A state of
//! any size fits (the file is bounded by the disk, not by one record's limit).
//!
//! A snapshot is written to a temporary file, synced, renamed into place and the directory
//! synced, so a crash leaves either the old or the new snapshot, never half of one. openraft
//! builds snapshots (from the applied state) and installs them (sent by a leader) concurrently,
//! so every write happens under one lock per group and obeys one rule: **a snapshot file is
//! written only if it is newer than every snapshot file present, and only older ones are
//! deleted.** A build that finishes after a newer snapshot was installed therefore changes
//! nothing on disk, and can never delete the newer snapshot that the purged log relies on.
//!
//! The newest file *is* the current snapshot: its bytes are not kept in memory (an encoded state
//! is about as large as the state itself, and every group would hold one for good). openraft
//! asks for it only to send it to a replica that lags behind the purged log (and once at start,
//! for its metadata), and [`RaftStateMachine::get_current_snapshot`] then reads the file.

use std::fs::{self, File};
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{AnyError, EntryPayload, RaftSnapshotBuilder, StorageIOError, StoredMembership};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::error::WalError;
use crate::machine::{AppliedEntry, Machine};
use crate::wal::frame::{self, Check};
use crate::{Entry, GroupId, LogId, Node, NodeId, Reply, StorageError, TypeConfig};

/// The largest chunk of encoded state in one record of a snapshot file.
pub const SNAPSHOT_CHUNK: usize = 16 << 20;

/// The state as of the last applied entry.
#[derive(Debug)]
pub struct Applied<M> {
    /// The group's data.
    pub state: M,
    /// The last applied log id.
    pub last_applied: Option<LogId>,
    /// The last applied membership.
    pub membership: StoredMembership<NodeId, Node>,
}

/// What a group's state machine shares with the group's handle.
pub struct Shared<M> {
    applied: RwLock<Applied<M>>,
    subscriber: Mutex<Option<mpsc::UnboundedSender<AppliedEntry>>>,
    last_applied: watch::Sender<Option<LogId>>,
}

impl<M> Shared<M> {
    /// Runs `f` on the applied state.
    pub fn read<R>(&self, f: impl FnOnce(&Applied<M>) -> R) -> R {
        f(&self.applied.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Sends every entry applied from now on to the returned receiver, replacing any earlier
    /// subscriber (whose receiver then ends). Entries already applied are not replayed: read
    /// the state for them.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<AppliedEntry> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.subscriber.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    /// Stops telling the current subscriber.
    pub fn unsubscribe(&self) {
        *self.subscriber.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The last applied log id, as a watch.
    pub fn watch_applied(&self) -> watch::Receiver<Option<LogId>> {
        self.last_applied.subscribe()
    }

    fn publish(&self, entry: impl FnOnce() -> AppliedEntry) {
        let mut sub = self.subscriber.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = sub.as_ref() {
            if tx.send(entry()).is_err() {
                *sub = None;
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct SnapshotHeader {
    meta: SnapshotMeta<NodeId, Node>,
    data_len: u64,
}

/// A snapshot file's metadata and encoded state.
type SnapshotFile = (SnapshotMeta<NodeId, Node>, Vec<u8>);

#[derive(Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Arc<Vec<u8>>,
}

/// Where a group's snapshots live, and the lock every write of them takes.
#[derive(Clone)]
struct SnapshotDir {
    dir: PathBuf,
    lock: Arc<Mutex<()>>,
    chunk: usize,
}

/// One group's state machine.
pub struct StateMachine<M> {
    group: GroupId,
    files: SnapshotDir,
    shared: Arc<Shared<M>>,
}

/// Builds snapshots of one group; shares everything with its [`StateMachine`].
pub struct SnapshotBuilder<M> {
    group: GroupId,
    files: SnapshotDir,
    shared: Arc<Shared<M>>,
}

impl<M: Machine> StateMachine<M> {
    /// Opens the state machine of `group` whose snapshots live in `dir`, restoring the newest
    /// snapshot if there is one. `initial` is the state of a group that has none yet.
    pub fn open(group: GroupId, dir: &Path, initial: M) -> Result<Self, WalError> {
        Self::open_with_chunk(group, dir, initial, SNAPSHOT_CHUNK)
    }

    /// [`StateMachine::open`] with snapshot files cut into chunks of `chunk` bytes (tests use
    /// tiny chunks to reach the multi-chunk path with small states).
    pub fn open_with_chunk(group: GroupId, dir: &Path, initial: M, chunk: usize) -> Result<Self, WalError> {
        fs::create_dir_all(dir).map_err(|e| WalError::io(dir, e))?;
        let mut applied = Applied {
            state: initial,
            last_applied: None,
            membership: StoredMembership::default(),
        };
        if let Some(path) = newest_snapshot(dir)? {
            let (meta, data) = read_snapshot(&path)?;
            let state = M::decode_state(&data)
                .map_err(|e| WalError::corruption(&path, 0, format!("undecodable snapshot: {e}")))?;
            tracing::info!(group, path = %path.display(), last = ?meta.last_log_id, "restored snapshot");
            applied = Applied {
                state,
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
            };
        }
        let (last_applied, _) = watch::channel(applied.last_applied);
        Ok(StateMachine {
            group,
            files: SnapshotDir {
                dir: dir.to_path_buf(),
                lock: Arc::default(),
                chunk: chunk.max(1),
            },
            shared: Arc::new(Shared {
                applied: RwLock::new(applied),
                subscriber: Mutex::new(None),
                last_applied,
            }),
        })
    }

    /// The applied state, shared with the group's handle.
    pub fn shared(&self) -> Arc<Shared<M>> {
        Arc::clone(&self.shared)
    }
}

fn snapshot_key(meta: &SnapshotMeta<NodeId, Node>) -> (u64, u64) {
    meta.last_log_id
        .map(|l| (l.index, l.leader_id.term))
        .unwrap_or((0, 0))
}

fn snapshot_name((index, term): (u64, u64)) -> String {
    format!("snapshot-{index:020}-{term:020}.snap")
}

fn is_snapshot_name(n: &str) -> bool {
    n.starts_with("snapshot-") && n.ends_with(".snap")
}

/// Snapshot files in `dir`, oldest first (their names sort by log position).
fn snapshot_files(dir: &Path) -> Result<Vec<PathBuf>, WalError> {
    let mut names: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| WalError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_snapshot_name)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Decodes a snapshot file's bytes as a replica's start does, then its state as a shard
/// group's and as the cluster map's: the entry point for fuzzing the snapshot decoders (`fuzz/`).
#[doc(hidden)]
pub fn decode_snapshot_bytes(bytes: &[u8]) -> bool {
    let Ok((_, data)) = parse_snapshot(bytes, Path::new("fuzz.snap")) else {
        return false;
    };
    let shard = crate::GroupState::decode_versioned(&data).is_ok();
    let map = crate::meta::ClusterMap::decode_versioned(&data).is_ok();
    shard || map
}

fn newest_snapshot(dir: &Path) -> Result<Option<PathBuf>, WalError> {
    Ok(snapshot_files(dir)?.pop())
}

/// Reads a snapshot file: its metadata and its encoded state.
fn read_snapshot(path: &Path) -> Result<SnapshotFile, WalError> {
    let bytes = fs::read(path).map_err(|e| WalError::io(path, e))?;
    parse_snapshot(&bytes, path)
}

/// Decodes a snapshot file's bytes (`path` names it in errors): its metadata and its state.
fn parse_snapshot(bytes: &[u8], path: &Path) -> Result<SnapshotFile, WalError> {
    let damaged = |offset: usize, what: String| WalError::corruption(path, offset as u64, what);
    let (start, end) = match frame::check(bytes, 0) {
        Check::Record { payload } => payload,
        other => return Err(damaged(0, format!("snapshot header damaged: {other:?}"))),
    };
    let header: SnapshotHeader = nearby_index::codec::decode(&bytes[start..end])
        .map_err(|e| damaged(0, format!("undecodable snapshot header: {e}")))?;
    let len = usize::try_from(header.data_len).map_err(|_| damaged(0, "snapshot too large".into()))?;
    let mut data = Vec::with_capacity(len.min(bytes.len()));
    let mut at = end;
    while data.len() < len {
        match frame::check(bytes, at) {
            Check::Record { payload } => {
                data.extend_from_slice(&bytes[payload.0..payload.1]);
                at = payload.1;
            }
            other => return Err(damaged(at, format!("snapshot chunk damaged: {other:?}"))),
        }
    }
    if data.len() != len || at != bytes.len() {
        return Err(damaged(
            at,
            format!("snapshot holds {} bytes, header says {len}", data.len()),
        ));
    }
    Ok((header.meta, data))
}

impl SnapshotDir {
    /// The newest snapshot file's metadata and state, read under the lock every write takes (so
    /// never a file being replaced).
    fn read_newest(&self) -> Result<Option<SnapshotFile>, WalError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        newest_snapshot(&self.dir)?
            .map(|path| read_snapshot(&path))
            .transpose()
    }

    /// Writes `snap` atomically if it is newer than every snapshot file present, then deletes
    /// the older ones. Returns whether it was written. See the module doc for why.
    fn persist(&self, snap: &StoredSnapshot) -> Result<bool, WalError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let dir = &self.dir;
        let key = snapshot_key(&snap.meta);
        let name = snapshot_name(key);
        if let Some(newest) = newest_snapshot(dir)? {
            let newest_name = newest.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if newest_name >= name.as_str() {
                tracing::debug!(
                    kept = newest_name,
                    skipped = name,
                    "a newer snapshot is already on disk"
                );
                return Ok(false);
            }
        }
        let header = SnapshotHeader {
            meta: snap.meta.clone(),
            data_len: snap.data.len() as u64,
        };
        let header = nearby_index::codec::encode(&header).map_err(|e| WalError::Encode(e.to_string()))?;
        let tmp = dir.join(format!("{name}.tmp"));
        let dst = dir.join(&name);
        let written = self.write_file(&tmp, &dst, &header, snap);
        if written.is_err() {
            // A half-written snapshot must not keep the space a full disk needs back.
            let _ = fs::remove_file(&tmp);
        }
        written?;
        for path in snapshot_files(dir)? {
            let older = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n < name.as_str());
            if older {
                fs::remove_file(&path).map_err(|e| WalError::io(&path, e))?;
            }
        }
        Ok(true)
    }

    /// Writes the snapshot to `tmp`, syncs it and renames it to `dst`.
    fn write_file(
        &self,
        tmp: &Path,
        dst: &Path,
        header: &[u8],
        snap: &StoredSnapshot,
    ) -> Result<(), WalError> {
        let dir = &self.dir;
        let mut f = std::io::BufWriter::new(File::create(tmp).map_err(|e| WalError::io(tmp, e))?);
        let mut buf = Vec::with_capacity(frame::RECORD_HEADER_LEN + self.chunk.min(snap.data.len()));
        let mut write = |payload: &[u8], f: &mut std::io::BufWriter<File>| {
            buf.clear();
            frame::encode_record(payload, &mut buf);
            f.write_all(&buf).map_err(|e| WalError::io(tmp, e))
        };
        write(header, &mut f)?;
        for chunk in snap.data.chunks(self.chunk) {
            write(chunk, &mut f)?;
        }
        let f = f.into_inner().map_err(|e| WalError::io(tmp, e.into_error()))?;
        f.sync_all().map_err(|e| WalError::io(tmp, e))?;
        fs::rename(tmp, dst).map_err(|e| WalError::io(dst, e))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| WalError::io(dir, e))
    }

    /// [`persist`](Self::persist) off the async workers. A full disk is waited out (tried again
    /// every second): openraft takes any error of a snapshot's build or install for the end of
    /// the replica.
    async fn persist_async(&self, snap: &StoredSnapshot) -> Result<bool, StorageError> {
        let signature = snap.meta.signature();
        let mut wait = crate::wal::SpaceWait::new("snapshot");
        loop {
            let files = self.clone();
            let to_write = snap.clone();
            let result = tokio::task::spawn_blocking(move || files.persist(&to_write))
                .await
                .map_err(|e| StorageIOError::write_snapshot(Some(signature.clone()), AnyError::new(&e)))?;
            match result {
                Err(e @ WalError::NoSpace { .. }) => {
                    wait.waiting(&e);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                other => {
                    if other.is_ok() {
                        wait.done();
                    }
                    return other.map_err(|e| {
                        StorageIOError::write_snapshot(Some(signature), AnyError::new(&e)).into()
                    });
                }
            }
        }
    }
}

impl<M: Machine> RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder<M> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Encoding a large state takes a while: off the async workers (apply waits for the
        // read lock meanwhile; a copy-on-write state would lift that — see docs/status.md).
        let shared = Arc::clone(&self.shared);
        let (data, last_log_id, last_membership) = tokio::task::spawn_blocking(move || {
            shared.read(|applied| {
                applied
                    .state
                    .encode_state()
                    .map(|data| (data, applied.last_applied, applied.membership.clone()))
            })
        })
        .await
        .map_err(|e| StorageError::from(StorageIOError::read_state_machine(AnyError::new(&e))))?
        .map_err(|e| StorageError::from(StorageIOError::read_state_machine(AnyError::new(&e))))?;
        let snapshot_id = match last_log_id {
            Some(l) => format!("{}-{}-{}", self.group, l.leader_id.term, l.index),
            None => format!("{}-empty", self.group),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: Arc::new(data),
        };
        let written = self.files.persist_async(&stored).await?;
        tracing::debug!(group = self.group, last = ?meta.last_log_id, written, "snapshot built");
        // openraft reads only the metadata of a snapshot it had built; the bytes go with it.
        let data = Arc::try_unwrap(stored.data).unwrap_or_else(|shared| shared.as_ref().clone());
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl<M: Machine> RaftStateMachine<TypeConfig> for StateMachine<M> {
    type SnapshotBuilder = SnapshotBuilder<M>;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, Node>), StorageError> {
        Ok(self.shared.read(|a| (a.last_applied, a.membership.clone())))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut results = Vec::new();
        let mut last = None;
        {
            let mut a = self.shared.applied.write().unwrap_or_else(|p| p.into_inner());
            for entry in entries {
                a.last_applied = Some(entry.log_id);
                last = Some(entry.log_id);
                let reply = match entry.payload {
                    EntryPayload::Blank => Reply::Empty,
                    EntryPayload::Normal(payload) => {
                        let reply = a.state.apply_payload(&payload, entry.log_id.index);
                        let r = reply.clone();
                        self.shared.publish(move || AppliedEntry::Command {
                            log_id: entry.log_id,
                            payload,
                            reply: r,
                        });
                        reply
                    }
                    EntryPayload::Membership(m) => {
                        a.membership = StoredMembership::new(Some(entry.log_id), m);
                        Reply::Empty
                    }
                };
                results.push(reply);
            }
        }
        if last.is_some() {
            self.shared.last_applied.send_replace(last);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            group: self.group,
            files: self.files.clone(),
            shared: Arc::clone(&self.shared),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let state = M::decode_state(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(
                Some(meta.signature()),
                AnyError::new(&e),
            ))
        })?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: Arc::new(data),
        };
        self.files.persist_async(&stored).await?;
        {
            let mut a = self.shared.applied.write().unwrap_or_else(|p| p.into_inner());
            a.state = state;
            a.last_applied = meta.last_log_id;
            a.membership = meta.last_membership.clone();
        }
        self.shared.last_applied.send_replace(meta.last_log_id);
        self.shared.publish(|| AppliedEntry::Snapshot {
            last: meta.last_log_id,
        });
        tracing::info!(group = self.group, last = ?meta.last_log_id, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let files = self.files.clone();
        let read = tokio::task::spawn_blocking(move || files.read_newest())
            .await
            .map_err(|e| StorageError::from(StorageIOError::read_snapshot(None, AnyError::new(&e))))?;
        let newest =
            read.map_err(|e| StorageError::from(StorageIOError::read_snapshot(None, AnyError::new(&e))))?;
        Ok(newest.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::state::GroupState;
    use crate::{Command, Payload};
    use nearby_index::friends::UserRange;
    use openraft::{CommittedLeaderId, LogId as RaftLogId};

    fn state_with(users: u64) -> GroupState {
        let mut s = GroupState::new(UserRange::new(1, u64::MAX).expect("range"));
        for u in 1..=users {
            s.apply(
                &Command::RegisterUser {
                    user: u,
                    name: format!("user number {u} with a longer display name"),
                },
                u,
            );
        }
        s
    }

    fn snap(state: &GroupState, index: u64) -> StoredSnapshot {
        StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: Some(RaftLogId::new(CommittedLeaderId::new(1, 1), index)),
                last_membership: StoredMembership::default(),
                snapshot_id: format!("t-{index}"),
            },
            data: Arc::new(state.encode_state().expect("encode")),
        }
    }

    #[test]
    fn a_stale_build_never_replaces_or_deletes_a_newer_snapshot() {
        let dir = tempfile::TempDir::new().expect("tmp");
        let sm = StateMachine::open(1, dir.path(), state_with(0)).expect("open");
        let (old, new) = (state_with(10), state_with(20));
        // The install of the newer snapshot finishes first; the build that read the state
        // earlier finishes after it.
        assert!(sm.files.persist(&snap(&new, 200)).expect("install"));
        assert!(!sm.files.persist(&snap(&old, 100)).expect("stale build"));
        assert_eq!(snapshot_files(dir.path()).expect("list").len(), 1);
        drop(sm);
        let sm = StateMachine::open(1, dir.path(), state_with(0)).expect("reopen");
        sm.shared.read(|a| {
            assert_eq!(a.state.len(), 20);
            assert_eq!(a.last_applied.map(|l| l.index), Some(200));
        });
        // A newer build replaces it and deletes the older file.
        assert!(sm.files.persist(&snap(&state_with(30), 300)).expect("newer"));
        let files = snapshot_files(dir.path()).expect("list");
        assert_eq!(files.len(), 1);
        assert!(files[0].to_string_lossy().contains(&format!("{:020}", 300)));
    }

    #[test]
    fn a_snapshot_larger_than_one_record_round_trips_through_its_file() {
        let dir = tempfile::TempDir::new().expect("tmp");
        // 4 KiB chunks: this state takes dozens of records.
        let sm = StateMachine::open_with_chunk(1, dir.path(), state_with(0), 4096).expect("open");
        let big = state_with(2_000);
        let s = snap(&big, 7);
        assert!(s.data.len() > 20 * 4096, "{} bytes", s.data.len());
        assert!(sm.files.persist(&s).expect("persist"));
        drop(sm);
        let sm = StateMachine::open(1, dir.path(), state_with(0)).expect("reopen");
        sm.shared.read(|a| assert_eq!(a.state, big));
        // A cut in the last chunk is found, never half-applied.
        let path = newest_snapshot(dir.path()).expect("list").expect("file");
        let len = fs::metadata(&path).expect("meta").len();
        let f = fs::OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(len - 10).expect("truncate");
        drop(sm);
        assert!(matches!(
            StateMachine::open(1, dir.path(), state_with(0)),
            Err(WalError::Corruption { .. })
        ));
    }

    #[tokio::test]
    async fn the_current_snapshot_is_read_from_the_newest_file() {
        let dir = tempfile::TempDir::new().expect("tmp");
        let mut sm = StateMachine::open(1, dir.path(), state_with(0)).expect("open");
        assert!(sm.get_current_snapshot().await.expect("read").is_none());

        // Installed from a leader: what openraft asks for next is that snapshot, byte for byte.
        let installed = snap(&state_with(10), 100);
        let sent = Box::new(Cursor::new(installed.data.as_ref().clone()));
        sm.install_snapshot(&installed.meta, sent).await.expect("install");
        let current = sm.get_current_snapshot().await.expect("read").expect("one");
        assert_eq!(current.meta, installed.meta);
        assert_eq!(current.snapshot.into_inner(), *installed.data);

        // A newer one written since (a build) is the current one from then on.
        let built = snap(&state_with(20), 200);
        assert!(sm.files.persist(&built).expect("persist"));
        let current = sm.get_current_snapshot().await.expect("read").expect("one");
        assert_eq!(current.meta, built.meta);
        assert_eq!(
            GroupState::decode_state(&current.snapshot.into_inner()).expect("decode"),
            state_with(20)
        );

        // The file is the only copy: damage in it is an error, never a snapshot.
        let path = newest_snapshot(dir.path()).expect("list").expect("file");
        let len = fs::metadata(&path).expect("meta").len();
        let f = fs::OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(len - 10).expect("truncate");
        assert!(sm.get_current_snapshot().await.is_err());
    }

    #[test]
    fn payloads_of_the_other_kind_change_nothing() {
        let mut s = state_with(1);
        let before = s.clone();
        let meta = Payload::Meta(crate::MetaCommand::SetNodeState {
            node: 1,
            state: crate::meta::NodeState::Down,
        });
        assert_eq!(s.apply_payload(&meta, 9), Reply::WrongKind);
        assert_eq!(s, before);
    }
}
