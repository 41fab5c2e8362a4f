//! `RaftStateMachine` for one group: applies committed entries to [`GroupState`] and keeps
//! snapshots in files.
//!
//! The applied state lives in memory behind an `RwLock` shared with the group's handle (reads
//! never go through Raft). It is rebuilt on start from the newest snapshot file plus the log
//! entries openraft re-applies after it.
//!
//! Snapshot files: `DIR/snapshot-<index>-<term>.snap`, one checksummed record (the WAL's framing)
//! holding the snapshot's metadata and the encoded state. A snapshot is written to a temporary
//! file, synced, renamed into place and the directory synced, so a crash leaves either the old or
//! the new snapshot, never half of one; older snapshots are deleted after.

use std::fs::{self, File};
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{AnyError, EntryPayload, RaftSnapshotBuilder, StorageIOError, StoredMembership};
use serde::{Deserialize, Serialize};

use crate::command::CommandResult;
use crate::error::WalError;
use crate::state::GroupState;
use crate::wal::frame::{self, Check};
use crate::{Entry, GroupId, LogId, Node, NodeId, StorageError, TypeConfig};

/// The state as of the last applied entry, shared with readers.
#[derive(Debug)]
pub struct Applied {
    /// The group's data.
    pub state: GroupState,
    /// The last applied log id.
    pub last_applied: Option<LogId>,
    /// The last applied membership.
    pub membership: StoredMembership<NodeId, Node>,
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

#[derive(Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Arc<Vec<u8>>,
}

/// One group's state machine.
pub struct StateMachine {
    group: GroupId,
    dir: PathBuf,
    applied: Arc<RwLock<Applied>>,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
}

/// Builds snapshots of one group; shares everything with its [`StateMachine`].
pub struct SnapshotBuilder {
    group: GroupId,
    dir: PathBuf,
    applied: Arc<RwLock<Applied>>,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
}

impl StateMachine {
    /// Opens the state machine of `group` whose snapshots live in `dir`, restoring the newest
    /// snapshot if there is one. `initial` is the state of a group that has none yet.
    pub fn open(group: GroupId, dir: &Path, initial: GroupState) -> Result<Self, WalError> {
        fs::create_dir_all(dir).map_err(|e| WalError::io(dir, e))?;
        let mut applied = Applied {
            state: initial,
            last_applied: None,
            membership: StoredMembership::default(),
        };
        let mut current = None;
        if let Some(path) = newest_snapshot(dir)? {
            let bytes = fs::read(&path).map_err(|e| WalError::io(&path, e))?;
            let file: SnapshotFile = decode_framed(&bytes, &path)?;
            let state: GroupState = nearby_index::codec::decode(&file.data)
                .map_err(|e| WalError::corruption(&path, 0, format!("undecodable snapshot: {e}")))?;
            tracing::info!(group, path = %path.display(), last = ?file.meta.last_log_id, "restored snapshot");
            applied = Applied {
                state,
                last_applied: file.meta.last_log_id,
                membership: file.meta.last_membership.clone(),
            };
            current = Some(StoredSnapshot {
                meta: file.meta,
                data: Arc::new(file.data),
            });
        }
        Ok(StateMachine {
            group,
            dir: dir.to_path_buf(),
            applied: Arc::new(RwLock::new(applied)),
            current: Arc::new(Mutex::new(current)),
        })
    }

    /// The applied state, shared with readers.
    pub fn applied(&self) -> Arc<RwLock<Applied>> {
        Arc::clone(&self.applied)
    }
}

fn decode_framed<T: serde::de::DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T, WalError> {
    match frame::check(bytes, 0) {
        Check::Record { payload } if payload.1 == bytes.len() => {
            nearby_index::codec::decode(&bytes[payload.0..payload.1])
                .map_err(|e| WalError::corruption(path, 0, format!("undecodable snapshot: {e}")))
        }
        other => Err(WalError::corruption(
            path,
            0,
            format!("snapshot file damaged: {other:?}"),
        )),
    }
}

fn snapshot_name(meta: &SnapshotMeta<NodeId, Node>) -> String {
    let (index, term) = meta
        .last_log_id
        .map(|l| (l.index, l.leader_id.term))
        .unwrap_or((0, 0));
    format!("snapshot-{index:020}-{term:020}.snap")
}

fn newest_snapshot(dir: &Path) -> Result<Option<PathBuf>, WalError> {
    let mut names: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| WalError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("snapshot-") && n.ends_with(".snap"))
        })
        .collect();
    names.sort();
    Ok(names.pop())
}

/// Writes a snapshot file atomically and deletes older ones.
fn persist(dir: &Path, snap: &StoredSnapshot) -> Result<(), WalError> {
    let file = SnapshotFile {
        meta: snap.meta.clone(),
        data: snap.data.as_ref().clone(),
    };
    let payload = nearby_index::codec::encode(&file).map_err(|e| WalError::Encode(e.to_string()))?;
    let mut bytes = Vec::with_capacity(payload.len() + frame::RECORD_HEADER_LEN);
    frame::encode_record(&payload, &mut bytes);
    let name = snapshot_name(&snap.meta);
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(&name);
    let mut f = File::create(&tmp).map_err(|e| WalError::io(&tmp, e))?;
    f.write_all(&bytes).map_err(|e| WalError::io(&tmp, e))?;
    f.sync_all().map_err(|e| WalError::io(&tmp, e))?;
    fs::rename(&tmp, &dst).map_err(|e| WalError::io(&dst, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| WalError::io(dir, e))?;
    for ent in fs::read_dir(dir).map_err(|e| WalError::io(dir, e))? {
        let path = ent.map_err(|e| WalError::io(dir, e))?.path();
        let Some(n) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if n != name && n.starts_with("snapshot-") {
            fs::remove_file(&path).map_err(|e| WalError::io(&path, e))?;
        }
    }
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (data, last_log_id, last_membership) = {
            let applied = self.applied.read().unwrap_or_else(|p| p.into_inner());
            let data = nearby_index::codec::encode(&applied.state)
                .map_err(|e| StorageError::from(StorageIOError::read_state_machine(AnyError::new(&e))))?;
            (data, applied.last_applied, applied.membership.clone())
        };
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
        let dir = self.dir.clone();
        let to_write = stored.clone();
        tokio::task::spawn_blocking(move || persist(&dir, &to_write))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)))?
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)))?;
        tracing::debug!(group = self.group, last = ?meta.last_log_id, "snapshot built");
        let data = stored.data.as_ref().clone();
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(stored);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, Node>), StorageError> {
        let a = self.applied.read().unwrap_or_else(|p| p.into_inner());
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut a = self.applied.write().unwrap_or_else(|p| p.into_inner());
        let mut results = Vec::new();
        for entry in entries {
            a.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => CommandResult::Unchanged,
                EntryPayload::Normal(cmd) => a.state.apply(&cmd),
                EntryPayload::Membership(m) => {
                    a.membership = StoredMembership::new(Some(entry.log_id), m);
                    CommandResult::Unchanged
                }
            };
            results.push(result);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            group: self.group,
            dir: self.dir.clone(),
            applied: Arc::clone(&self.applied),
            current: Arc::clone(&self.current),
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
        let state: GroupState = nearby_index::codec::decode(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(
                Some(meta.signature()),
                AnyError::new(&e),
            ))
        })?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: Arc::new(data),
        };
        let dir = self.dir.clone();
        let to_write = stored.clone();
        tokio::task::spawn_blocking(move || persist(&dir, &to_write))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)))?
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)))?;
        {
            let mut a = self.applied.write().unwrap_or_else(|p| p.into_inner());
            a.state = state;
            a.last_applied = meta.last_log_id;
            a.membership = meta.last_membership.clone();
        }
        tracing::info!(group = self.group, last = ?meta.last_log_id, "snapshot installed");
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(stored);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let cur = self.current.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(cur.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data.as_ref().clone())),
        }))
    }
}
