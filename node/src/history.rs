//! Location history on this node: one [`HistoryStore`] per shard group, in
//! `DATA/history/g<group>/`, each with one writer task that batches appends.
//!
//! # Who writes, who reads
//!
//! The node that leads a group records its users' accepted locations (unless a user turned
//! history off) in that group's store here: the records of one group end up spread over the
//! nodes that led it over time. A read merges the stores of every node holding a replica of the
//! group (this one directly, the others over the node-to-node protocol), and drops whatever the
//! user deleted (the replicated `history_cleared` mark). Deleting is a command of the user's
//! group (durable once acknowledged); the leader then purges the records from its store and asks
//! every replica's node to do the same, and a node that was unreachable purges once it has
//! caught up: every node checks its replicas' deletion marks against its stores every
//! [`RECONCILE_EVERY`] ([`History::reconcile`]).
//!
//! # Soft durability
//!
//! History is not replicated: a batch is on disk (fdatasync) within [`FLUSH`] of the location,
//! and a crash loses at most the batch being written. A node that is down makes its part of a
//! group's history unavailable until it returns (reads say `complete: false`); a node removed
//! for good takes its part with it. That is the price of keeping a history of every location
//! off the Raft log; see `docs/architecture.md`.
//!
//! # Order
//!
//! Appends and purges of one group go through one queue, in order: a purge removes every record
//! accepted before it, including those still waiting for their batch.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nearby_history::{HistoryError, HistoryStore, Record, StoreConfig};
use nearby_index::geo::{Millis, UserId};
use nearby_raft::GroupId;
use tokio::sync::{mpsc, oneshot};

/// The longest a location waits for its batch to be written.
pub const FLUSH: Duration = Duration::from_millis(100);

/// The most records in one batch (one write, one fdatasync).
pub const BATCH: usize = 4_096;

/// How a node keeps history.
#[derive(Clone, Debug)]
pub struct HistoryConfig {
    /// Whether accepted locations are recorded at all.
    pub enabled: bool,
    /// Records older than this are deleted (whole segments).
    pub max_age: Duration,
    /// What all of this node's stores may hold together; each store gets an equal share of the
    /// groups this node holds when it opens it (at least two segments).
    pub max_bytes: u64,
    /// A store's active segment is sealed past this size.
    pub segment_bytes: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            enabled: true,
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_bytes: 10 << 30,
            segment_bytes: 8 << 20,
        }
    }
}

enum Job {
    Append(Record),
    /// Move `users`' records to another group's store (a split handed them over).
    HandOver {
        users: Vec<UserId>,
        to: Arc<GroupHistory>,
        reply: oneshot::Sender<Result<u64, HistoryError>>,
    },
    Purge {
        user: UserId,
        before: Millis,
        reply: oneshot::Sender<Result<u64, HistoryError>>,
    },
}

/// One group's store and the queue of its writer.
struct GroupHistory {
    dir: PathBuf,
    config: StoreConfig,
    store: Mutex<Option<HistoryStore>>,
    /// When a failure last poisoned the store (it is opened again [`REOPEN_AFTER`] later).
    poisoned_at: Mutex<Option<std::time::Instant>>,
    jobs: mpsc::UnboundedSender<Job>,
}

/// How long after a failure poisoned a group's store (a full disk, a failed sync) it is opened
/// again from its files: recovery cuts off what the failure left half-written, and writes go on
/// once there is room, with no restart.
const REOPEN_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

impl GroupHistory {
    /// Runs `f` on the store, opening it first if needed (blocking: call off the async workers).
    fn with_store<T>(
        &self,
        f: impl FnOnce(&mut HistoryStore) -> Result<T, HistoryError>,
    ) -> Result<T, HistoryError> {
        let mut slot = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let mut poisoned_at = self.poisoned_at.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            if let Some(at) = *poisoned_at {
                if at.elapsed() < REOPEN_AFTER {
                    return Err(HistoryError::Poisoned {
                        why: "a write failed; the store opens again in a moment".into(),
                    });
                }
            }
            let store = HistoryStore::open(&self.dir, self.config.clone())?;
            let report = store.recovery();
            tracing::info!(dir = %self.dir.display(), ?report, "history store opened");
            *slot = Some(store);
        }
        let Some(store) = slot.as_mut() else {
            unreachable!("opened above")
        };
        let result = f(store);
        if store.is_poisoned() {
            // Dropped now, opened again from its files on a later call.
            tracing::warn!(dir = %self.dir.display(), "history store poisoned: opening it again in {REOPEN_AFTER:?}");
            *slot = None;
            *poisoned_at = Some(std::time::Instant::now());
        }
        result
    }
}

/// This node's location history (see the module doc).
pub struct History {
    dir: PathBuf,
    config: HistoryConfig,
    groups: Mutex<HashMap<GroupId, Arc<GroupHistory>>>,
    /// How many groups this node holds, for each store's share of the byte budget.
    held: std::sync::atomic::AtomicUsize,
    /// Deletion marks this process has purged already: `(group, user)` → up to when.
    purged: Mutex<HashMap<(GroupId, UserId), Millis>>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn join_error(e: tokio::task::JoinError) -> HistoryError {
    join_error_text(&e.to_string())
}

impl History {
    /// History kept under `data/history`.
    pub fn new(data: &std::path::Path, config: HistoryConfig) -> Arc<History> {
        Arc::new(History {
            dir: data.join("history"),
            config,
            groups: Mutex::new(HashMap::new()),
            held: std::sync::atomic::AtomicUsize::new(1),
            purged: Mutex::new(HashMap::new()),
        })
    }

    /// Whether this node records history.
    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// This node now holds `n` groups (each store opened from now on gets `max_bytes / n`).
    pub fn set_groups_held(&self, n: usize) {
        self.held.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    fn group(&self, group: GroupId) -> Arc<GroupHistory> {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = groups.get(&group) {
            return Arc::clone(g);
        }
        let held = self.held.load(std::sync::atomic::Ordering::Relaxed) as u64;
        let share = (self.config.max_bytes / held).max(2 * self.config.segment_bytes);
        let config = StoreConfig {
            segment_bytes: self.config.segment_bytes,
            max_age: self.config.max_age,
            max_bytes: share,
            ..StoreConfig::default()
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let g = Arc::new(GroupHistory {
            dir: self.dir.join(format!("g{group}")),
            config,
            store: Mutex::new(None),
            poisoned_at: Mutex::new(None),
            jobs: tx,
        });
        tokio::spawn(writer(group, Arc::clone(&g), rx));
        groups.insert(group, Arc::clone(&g));
        g
    }

    /// Records `user` at `at` (an accepted location of a user of `group`, led here).
    pub fn append(&self, group: GroupId, user: UserId, at: Millis, lat: f64, lon: f64) {
        if !self.config.enabled {
            return;
        }
        let record = Record {
            user,
            at_ms: at.0,
            lat,
            lon,
        };
        let _ = self.group(group).jobs.send(Job::Append(record));
    }

    /// `user`'s records in this node's store of `group` with `since <= at < until`, oldest first,
    /// at most `limit`.
    pub async fn read(
        &self,
        group: GroupId,
        user: UserId,
        since: Millis,
        until: Millis,
        limit: usize,
    ) -> Result<Vec<Record>, HistoryError> {
        let g = self.group(group);
        tokio::task::spawn_blocking(move || g.with_store(|s| s.read(user, since.0, until.0, limit)))
            .await
            .map_err(join_error)?
    }

    /// Deletes from this node's store of `group` every record of `user` at or before `before`,
    /// after every record accepted before this call; returns the records deleted.
    pub async fn purge(&self, group: GroupId, user: UserId, before: Millis) -> Result<u64, HistoryError> {
        let (reply, answer) = oneshot::channel();
        let sent = self.group(group).jobs.send(Job::Purge { user, before, reply });
        if sent.is_err() {
            return Err(join_error_text("the history writer stopped"));
        }
        let removed = answer
            .await
            .map_err(|_| join_error_text("the history writer stopped"))??;
        let mut purged = self.purged.lock().unwrap_or_else(|p| p.into_inner());
        let done = purged.entry((group, user)).or_insert(before);
        *done = (*done).max(before);
        Ok(removed)
    }

    /// Moves the records of `users` from this node's store of `from` to its store of `to`,
    /// after every record accepted before this call (a split of `from` handed the users to
    /// `to`, whose reads and deletions see only its own stores). User by user: copied (synced),
    /// then deleted from `from`, so running it again after a crash copies only what was not
    /// moved yet. Returns the records moved.
    pub async fn hand_over(
        &self,
        from: GroupId,
        to: GroupId,
        users: Vec<UserId>,
    ) -> Result<u64, HistoryError> {
        if !self.dir.join(format!("g{from}")).exists() || users.is_empty() {
            return Ok(0);
        }
        let (reply, answer) = oneshot::channel();
        let job = Job::HandOver {
            users,
            to: self.group(to),
            reply,
        };
        if self.group(from).jobs.send(job).is_err() {
            return Err(join_error_text("the history writer stopped"));
        }
        answer
            .await
            .map_err(|_| join_error_text("the history writer stopped"))?
    }

    /// Purges, in this node's store of `group`, what the group's records say was deleted:
    /// for every user with a `history_cleared` mark, what is at or before it (marks this
    /// process purged already are skipped). For a node that missed a deletion while it was down
    /// or unreachable: run every [`RECONCILE_EVERY`] for every group it holds, leading or not.
    pub async fn reconcile(&self, group: GroupId, marks: Vec<(UserId, Millis)>) {
        if !self.dir.join(format!("g{group}")).exists() {
            return;
        }
        let marks: Vec<(UserId, Millis)> = {
            let purged = self.purged.lock().unwrap_or_else(|p| p.into_inner());
            marks
                .into_iter()
                .filter(|(u, before)| purged.get(&(group, *u)).is_none_or(|done| done < before))
                .collect()
        };
        for (user, before) in marks {
            if let Err(e) = self.purge(group, user, before).await {
                tracing::warn!(group, user, error = %e, "history purge on reconcile failed");
            }
        }
    }

    /// Applies retention to every open store (whole old segments go; writes go on).
    pub async fn enforce_retention(&self, now: Millis) {
        let groups: Vec<(GroupId, Arc<GroupHistory>)> = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(g, h)| (*g, Arc::clone(h)))
            .collect();
        for (group, g) in groups {
            let result =
                tokio::task::spawn_blocking(move || g.with_store(|s| s.enforce_retention(now.0))).await;
            match result {
                Ok(Ok(stats)) => tracing::debug!(group, ?stats, "history retention"),
                Ok(Err(e)) => tracing::warn!(group, error = %e, "history retention failed"),
                Err(e) => tracing::warn!(group, error = %e, "history retention task failed"),
            }
        }
    }
}

/// How often retention runs.
pub const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// How often deletion marks are checked against this node's files (a node that missed a
/// deletion purges within this of catching up).
pub const RECONCILE_EVERY: Duration = Duration::from_secs(10);

/// Runs retention every [`RETENTION_EVERY`], each store's share of the byte budget following
/// the number of shard groups this node holds (from the map), and purges missed deletions
/// every [`RECONCILE_EVERY`].
pub fn spawn_retention(
    history: Arc<History>,
    directory: Arc<crate::route::directory::Directory>,
    host: Arc<nearby_raft::RaftHost>,
    clock: Arc<dyn crate::clock::Clock>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(RECONCILE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_retention: Option<tokio::time::Instant> = None;
        loop {
            every.tick().await;
            reconcile_all(&history, &host).await;
            if last_retention.is_some_and(|t| t.elapsed() < RETENTION_EVERY) {
                continue;
            }
            last_retention = Some(tokio::time::Instant::now());
            let view = directory.view();
            let me = directory.me();
            let held = view
                .map
                .groups
                .values()
                .filter(|g| g.range.is_some() && g.replicas().any(|n| n == me))
                .count();
            history.set_groups_held(held);
            history.enforce_retention(clock.now()).await;
        }
    })
}

/// Deletions this node missed (it was down or unreachable, or a follower): purge them from its
/// stores, from every replica's marks.
async fn reconcile_all(history: &History, host: &nearby_raft::RaftHost) {
    for replica in host.shards() {
        let marks: Vec<(UserId, Millis)> = replica.read(|s| {
            s.users()
                .filter_map(|(u, r)| r.history_cleared().map(|c| (u, c)))
                .collect()
        });
        if !marks.is_empty() {
            history.reconcile(replica.id(), marks).await;
        }
    }
}

fn join_error_text(why: &str) -> HistoryError {
    HistoryError::Io {
        path: PathBuf::from("history"),
        source: std::io::Error::other(why.to_string()),
    }
}

/// The writer of one group's store: batches appends (up to [`BATCH`] records or [`FLUSH`]),
/// writes each batch with one fdatasync, and runs purges in queue order.
async fn writer(group: GroupId, g: Arc<GroupHistory>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let mut batch: Vec<Record> = Vec::new();
    let mut pending: Option<Job> = None;
    loop {
        let first = match pending.take() {
            Some(job) => job,
            None => match jobs.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        match first {
            Job::Append(r) => {
                batch.push(r);
                let deadline = tokio::time::Instant::now() + FLUSH;
                while batch.len() < BATCH {
                    match tokio::time::timeout_at(deadline, jobs.recv()).await {
                        Ok(Some(Job::Append(r))) => batch.push(r),
                        // A purge waits for the batch before it.
                        Ok(Some(purge)) => {
                            pending = Some(purge);
                            break;
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                let records = std::mem::take(&mut batch);
                let n = records.len();
                let g2 = Arc::clone(&g);
                let result = tokio::task::spawn_blocking(move || g2.with_store(|s| s.append(&records))).await;
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(group, records = n, error = %e, "history batch not written"),
                    Err(e) => tracing::warn!(group, records = n, error = %e, "history writer task failed"),
                }
            }
            Job::HandOver { users, to, reply } => {
                let g2 = Arc::clone(&g);
                let result = tokio::task::spawn_blocking(move || {
                    let mut moved = 0u64;
                    for user in users {
                        let records = g2.with_store(|s| s.read(user, 0, u64::MAX, usize::MAX))?;
                        if records.is_empty() {
                            continue;
                        }
                        to.with_store(|s| s.append(&records))?;
                        g2.with_store(|s| s.delete_user(user))?;
                        moved += records.len() as u64;
                    }
                    Ok(moved)
                })
                .await
                .map_err(join_error)
                .and_then(|r| r);
                let _ = reply.send(result);
            }
            Job::Purge { user, before, reply } => {
                let g2 = Arc::clone(&g);
                let result = tokio::task::spawn_blocking(move || {
                    g2.with_store(|s| s.delete_before(user, before.0.saturating_add(1)))
                })
                .await
                .map_err(join_error)
                .and_then(|r| r)
                .map(|stats| stats.records_removed);
                let _ = reply.send(result);
            }
        }
    }
}
