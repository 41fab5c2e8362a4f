//! The node's write-ahead log: one append-only log on real files, shared by every shard group the
//! node hosts.
//!
//! # Why one log per node
//!
//! A node hosts many groups. One log per group would cost one file and one `fdatasync` per group
//! per write; one shared log lets the writes of all groups that arrive while a sync is running
//! share the next one (group commit), which is what makes many small groups cheap.
//!
//! # Files
//!
//! `DIR/NNNNNNNNNNNNNNNNNNNN.wal` segments (see [`frame`] for the byte format), written in order.
//! The newest segment is *active* (appended with `pwrite`, read with `pread`); when it passes
//! [`WalOptions::segment_bytes`] it is synced and *sealed* and a new one starts. Sealed segments
//! are read through a read-only `memmap2` map. Every segment starts with a *checkpoint* record
//! holding each group's vote, committed id and purge point, so deleting old segments never loses
//! that metadata: segments are deleted oldest-first, once every entry in them is purged.
//!
//! # Durability contract
//!
//! - [`Wal::append`] writes the records before returning (so they can be read back at once) and
//!   calls the openraft callback only after they are `fdatasync`ed. Concurrent appends coalesce
//!   into one sync, done by the dedicated sync thread.
//! - [`Wal::save_vote`] and [`Wal::purge`] return only after their record is synced.
//! - An I/O error on write or sync *poisons* the log: after a failed `fdatasync` the page cache
//!   can no longer be trusted, so every later call fails ([`WalError::Poisoned`]) and the node
//!   must restart and recover from the files. That includes writes made *before* the failure
//!   whose own sync comes after it: a later `fdatasync` that succeeds says nothing about pages
//!   the kernel already dropped, so nothing written before a failed sync is ever acknowledged.
//!
//! # A full disk
//!
//! A write refused for want of space ([`WalError::NoSpace`]) is undone and does not poison the
//! log. The group's writes ([`Wal::append`], votes, truncations) wait for space instead of
//! failing, since openraft takes any storage error for the end of the replica: the group stalls
//! on this node (its peers elect another leader if it led) and carries on once space returns.
//! Before that point [`Wal::space_low`] tells the node to refuse new proposals with a clear
//! error: below [`WalOptions::min_free_bytes`] free, or after a write was refused, until one
//! succeeds again. Reads never need space.
//!
//! # Recovery
//!
//! [`Wal::open`] replays every segment. Damage in the newest segment after which no valid record
//! follows is a torn write (the write was never acknowledged): it is cut off and reported in the
//! [`RecoveryReport`]. Any other damage — a bad checksum in a sealed segment, or valid records
//! after a bad one — is corruption of acknowledged data: `open` fails with
//! [`WalError::Corruption`] naming the file and offset, and applies nothing. (The replica's data
//! can then be rebuilt from its peers.)

pub(crate) mod frame;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use memmap2::Mmap;
use openraft::storage::LogFlushed;
use serde::{Deserialize, Serialize};

use self::frame::{Check, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use crate::error::WalError;
use crate::{Entry, GroupId, LogId, TypeConfig, Vote};

/// Tunables of the log.
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// A segment is sealed and a new one started once it grows past this many bytes.
    pub segment_bytes: u64,
    /// Below this much free space on the log's file system, [`Wal::space_low`] says so and the
    /// node refuses new proposals: the rest is kept for what Raft must still write (votes,
    /// entries from other leaders, a new segment's checkpoint).
    pub min_free_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes: 64 << 20,
            min_free_bytes: 64 << 20,
        }
    }
}

/// How often a write waiting for space tries again.
const SPACE_RETRY: Duration = Duration::from_millis(100);

/// What a write waiting out a full disk tells the log: that it waits (at most every 10 s), and
/// that it goes on. Shared by the log's writes and the state machine's snapshots.
pub(crate) struct SpaceWait {
    what: &'static str,
    warned: Option<Instant>,
}

impl SpaceWait {
    pub(crate) fn new(what: &'static str) -> Self {
        SpaceWait { what, warned: None }
    }

    /// `e` (a [`WalError::NoSpace`]) stopped the write; it will try again.
    pub(crate) fn waiting(&mut self, e: &WalError) {
        if self
            .warned
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
        {
            tracing::warn!(error = %e, "{} waits for disk space", self.what);
            self.warned = Some(Instant::now());
        }
    }

    /// The write went through.
    pub(crate) fn done(&self) {
        if self.warned.is_some() {
            tracing::info!("{} goes on: disk space is back", self.what);
        }
    }
}

/// What [`Wal::open`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files replayed.
    pub segments: usize,
    /// Records replayed.
    pub records: u64,
    /// Bytes cut off the end of the newest segment (a torn write), if any.
    pub torn_tail_bytes: u64,
}

/// Counters of the log's work since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Records written.
    pub records: u64,
    /// Writes that waited for durability (appends, votes, purges).
    pub sync_requests: u64,
    /// `fdatasync` calls made for them; `sync_requests / syncs` is the group-commit factor.
    pub syncs: u64,
    /// Writes refused for want of space (each then waited and tried again).
    pub no_space: u64,
}

#[derive(Default)]
struct Counters {
    records: AtomicU64,
    sync_requests: AtomicU64,
    syncs: AtomicU64,
    no_space: AtomicU64,
    /// `fdatasync` calls still to fail on purpose (a test's fault).
    fail_syncs: AtomicU64,
}

/// What the log knows of its file system's free space.
struct Space {
    dir: PathBuf,
    min_free: u64,
    /// A write was refused for want of space and none has succeeded since.
    refused: AtomicBool,
}

impl Space {
    /// Looks at the file system each time (a `statvfs`, about a microsecond: proposals that add
    /// data are far rarer than that matters).
    fn low(&self) -> Option<String> {
        if self.refused.load(Ordering::Relaxed) {
            return Some(format!("the disk of {} is full", self.dir.display()));
        }
        let free = match free_bytes(&self.dir) {
            Ok(free) => free,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the disk's free space");
                return None;
            }
        };
        (free < self.min_free).then(|| {
            format!(
                "the disk of {} is nearly full ({} MiB free, {} MiB kept for the log)",
                self.dir.display(),
                free >> 20,
                self.min_free >> 20
            )
        })
    }
}

/// Free bytes on the file system holding `dir`, as an unprivileged user may use them.
fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and outlives the call; `st` is valid for writes.
    if unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // `fsblkcnt_t` and `c_ulong` are 32 bits wide on some targets.
    #[allow(clippy::useless_conversion)]
    let (blocks, size) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    Ok(blocks.saturating_mul(size))
}

/// One record of the log. Every record names the group it belongs to, except checkpoints.
#[derive(Debug, Serialize, Deserialize)]
enum Record {
    /// Every group's metadata as of the start of a segment.
    Checkpoint(Vec<GroupMeta>),
    /// One log entry of a group. Writing index `i` discards the group's entries `>= i`.
    Entry { group: GroupId, entry: Entry },
    /// The group's vote.
    Vote { group: GroupId, vote: Vote },
    /// The group's committed log id.
    Committed {
        group: GroupId,
        committed: Option<LogId>,
    },
    /// Entries `>= since` of the group are discarded.
    Truncate { group: GroupId, since: u64 },
    /// Entries `<= upto` of the group are discarded (they are in a snapshot).
    Purge { group: GroupId, upto: LogId },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct GroupMeta {
    group: GroupId,
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
}

/// Where a record is: segment id, offset of its frame, and the frame's length.
#[derive(Clone, Copy, Debug)]
struct Loc {
    segment: u64,
    offset: u64,
    len: u32,
}

/// What the log knows about one group.
#[derive(Debug, Default)]
struct GroupLog {
    entries: BTreeMap<u64, (LogId, Loc)>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
}

impl GroupLog {
    fn meta(&self, group: GroupId) -> GroupMeta {
        GroupMeta {
            group,
            vote: self.vote,
            committed: self.committed,
            purged: self.purged,
        }
    }

    fn last_log_id(&self) -> Option<LogId> {
        self.entries
            .last_key_value()
            .map(|(_, (id, _))| *id)
            .or(self.purged)
    }

    fn purge(&mut self, upto: LogId) {
        if self.purged.is_some_and(|p| p.index >= upto.index) {
            return;
        }
        self.purged = Some(upto);
        self.entries = self.entries.split_off(&(upto.index + 1));
    }
}

struct Segment {
    id: u64,
    path: PathBuf,
    file: Arc<File>,
    len: u64,
    /// Highest entry index each group has in this segment.
    max_index: HashMap<GroupId, u64>,
    /// Read-only map, made on first read after sealing.
    map: Option<Arc<Mmap>>,
}

struct Inner {
    dir: PathBuf,
    opts: WalOptions,
    active: Segment,
    sealed: BTreeMap<u64, Segment>,
    groups: HashMap<GroupId, GroupLog>,
    poisoned: Option<String>,
}

enum Waiter {
    Log(LogFlushed<TypeConfig>),
    Notify(tokio::sync::oneshot::Sender<Result<(), String>>),
}

struct SyncRequest {
    file: Arc<File>,
    waiter: Waiter,
}

/// The node's shared write-ahead log. Cheap to share (`Arc<Wal>`); every method is safe to call
/// from any task.
pub struct Wal {
    inner: Arc<Mutex<Inner>>,
    sync_tx: Mutex<mpsc::Sender<SyncRequest>>,
    counters: Arc<Counters>,
    space: Space,
    /// Set when the node stops: writes waiting for space give up.
    closing: AtomicBool,
}

enum Source {
    File(Arc<File>),
    Map(Arc<Mmap>),
}

impl Wal {
    /// Opens (or creates) the log in `dir` and replays it. See the module doc for what counts as
    /// a torn tail and what as corruption.
    pub fn open(dir: &Path, opts: WalOptions) -> Result<(Wal, RecoveryReport), WalError> {
        fs::create_dir_all(dir).map_err(|e| WalError::io(dir, e))?;
        let mut ids = Vec::new();
        for ent in fs::read_dir(dir).map_err(|e| WalError::io(dir, e))? {
            let ent = ent.map_err(|e| WalError::io(dir, e))?;
            let name = ent.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".wal")) else {
                continue;
            };
            if let Ok(id) = stem.parse::<u64>() {
                ids.push(id);
            }
        }
        ids.sort_unstable();

        let mut report = RecoveryReport::default();
        let mut groups: HashMap<GroupId, GroupLog> = HashMap::new();
        let mut segments = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let last = i + 1 == ids.len();
            let path = segment_path(dir, id);
            let seg = replay_segment(&path, id, last, &mut groups, &mut report)?;
            segments.push(seg);
        }
        report.segments = segments.len();

        let active = match segments.pop() {
            Some(seg) => seg,
            None => create_segment(dir, 1, &groups)?,
        };
        let sealed = segments.into_iter().map(|s| (s.id, s)).collect();
        let space = Space {
            dir: dir.to_path_buf(),
            min_free: opts.min_free_bytes,
            refused: AtomicBool::new(false),
        };
        let inner = Arc::new(Mutex::new(Inner {
            dir: dir.to_path_buf(),
            opts,
            active,
            sealed,
            groups,
            poisoned: None,
        }));
        let (tx, rx) = mpsc::channel();
        let sync_inner = Arc::clone(&inner);
        let counters = Arc::new(Counters::default());
        let sync_counters = Arc::clone(&counters);
        std::thread::Builder::new()
            .name("wal-sync".into())
            .spawn(move || sync_loop(rx, sync_inner, &sync_counters))
            .map_err(|e| WalError::io(dir, e))?;
        tracing::info!(dir = %dir.display(), ?report, "wal opened");
        Ok((
            Wal {
                inner,
                sync_tx: Mutex::new(tx),
                counters,
                space,
                closing: AtomicBool::new(false),
            },
            report,
        ))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the index half-updated in a way that
        // matters more than the panic itself; keep serving rather than cascade.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn request_sync(&self, file: Arc<File>, waiter: Waiter) -> Result<(), WalError> {
        self.counters.sync_requests.fetch_add(1, Ordering::Relaxed);
        let tx = self.sync_tx.lock().unwrap_or_else(|p| p.into_inner());
        tx.send(SyncRequest { file, waiter })
            .map_err(|_| WalError::Poisoned("the wal sync thread has stopped".into()))
    }

    /// Writes records (not yet synced) and returns the file a sync must cover.
    fn write(&self, records: &[Record]) -> Result<Arc<File>, WalError> {
        let mut inner = self.lock();
        match inner.write(records) {
            Ok(()) => self.space.refused.store(false, Ordering::Relaxed),
            Err(e) => {
                if matches!(e, WalError::NoSpace { .. }) {
                    self.space.refused.store(true, Ordering::Relaxed);
                    self.counters.no_space.fetch_add(1, Ordering::Relaxed);
                }
                return Err(e);
            }
        }
        self.counters
            .records
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(Arc::clone(&inner.active.file))
    }

    /// [`Wal::write`], waiting out a full disk (see the module doc) unless the node is
    /// stopping.
    async fn write_when_space(&self, records: &[Record]) -> Result<Arc<File>, WalError> {
        let mut wait = SpaceWait::new("wal write");
        loop {
            match self.write(records) {
                Err(e @ WalError::NoSpace { .. }) => {
                    if self.closing.load(Ordering::Relaxed) {
                        return Err(e);
                    }
                    wait.waiting(&e);
                    tokio::time::sleep(SPACE_RETRY).await;
                }
                other => {
                    if other.is_ok() {
                        wait.done();
                    }
                    return other;
                }
            }
        }
    }

    /// Why new proposals should be refused for want of disk space, if they should: the file
    /// system holding the log has less than [`WalOptions::min_free_bytes`] free, or a write was
    /// refused as the disk was full and none has succeeded since.
    pub fn space_low(&self) -> Option<String> {
        self.space.low()
    }

    /// The node is stopping: writes waiting for disk space give up (with
    /// [`WalError::NoSpace`]) so their groups can shut down.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    /// Test hook: the next `n` `fdatasync` calls of the log fail as a failing disk's would.
    #[doc(hidden)]
    pub fn fail_next_syncs(&self, n: u64) {
        self.counters.fail_syncs.store(n, Ordering::Relaxed);
    }

    async fn write_and_sync(&self, records: &[Record]) -> Result<(), WalError> {
        let file = self.write_when_space(records).await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.request_sync(file, Waiter::Notify(tx))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(WalError::Poisoned(msg)),
            Err(_) => Err(WalError::Poisoned("the wal sync thread has stopped".into())),
        }
    }

    /// Appends a group's entries; `callback` is called once they are durable. Entries must be
    /// consecutive; writing index `i` discards the group's entries `>= i` first (Raft's rule
    /// for a conflicting suffix).
    pub async fn append(
        &self,
        group: GroupId,
        entries: impl IntoIterator<Item = Entry>,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), WalError> {
        let records: Vec<Record> = entries
            .into_iter()
            .map(|entry| Record::Entry { group, entry })
            .collect();
        let file = self.write_when_space(&records).await?;
        self.request_sync(file, Waiter::Log(callback))
    }

    /// Durably records the group's vote.
    pub async fn save_vote(&self, group: GroupId, vote: Vote) -> Result<(), WalError> {
        self.write_and_sync(&[Record::Vote { group, vote }]).await
    }

    /// Records the group's committed log id. Not synced on its own: losing it only means
    /// re-applying from an older point after a crash.
    pub async fn save_committed(&self, group: GroupId, committed: Option<LogId>) -> Result<(), WalError> {
        self.write_when_space(&[Record::Committed { group, committed }])
            .await
            .map(drop)
    }

    /// Discards the group's entries `>= since`.
    pub async fn truncate(&self, group: GroupId, since: u64) -> Result<(), WalError> {
        self.write_when_space(&[Record::Truncate { group, since }])
            .await
            .map(drop)
    }

    /// Discards the group's entries `<= upto` (they are in a durable snapshot) and deletes every
    /// old segment that no longer holds a live entry.
    pub async fn purge(&self, group: GroupId, upto: LogId) -> Result<(), WalError> {
        self.write_and_sync(&[Record::Purge { group, upto }]).await?;
        let doomed = self.lock().take_dead_segments();
        for seg in doomed {
            tracing::debug!(segment = seg.id, "deleting purged wal segment");
            fs::remove_file(&seg.path).map_err(|e| WalError::io(&seg.path, e))?;
        }
        Ok(())
    }

    /// The group's vote, if it ever voted.
    pub fn vote(&self, group: GroupId) -> Option<Vote> {
        self.lock().groups.get(&group).and_then(|g| g.vote)
    }

    /// The group's last saved committed log id.
    pub fn committed(&self, group: GroupId) -> Option<LogId> {
        self.lock().groups.get(&group).and_then(|g| g.committed)
    }

    /// The group's last purged log id and last log id.
    pub fn log_state(&self, group: GroupId) -> (Option<LogId>, Option<LogId>) {
        let inner = self.lock();
        match inner.groups.get(&group) {
            Some(g) => (g.purged, g.last_log_id()),
            None => (None, None),
        }
    }

    /// Reads the group's entries with indexes in `range` that are present, in order.
    pub fn read(&self, group: GroupId, range: impl RangeBounds<u64>) -> Result<Vec<Entry>, WalError> {
        let wanted: Vec<(Loc, Source, PathBuf)> = {
            let mut inner = self.lock();
            let locs: Vec<Loc> = match inner.groups.get(&group) {
                Some(g) => g
                    .entries
                    .range((range.start_bound().cloned(), range.end_bound().cloned()))
                    .map(|(_, (_, loc))| *loc)
                    .collect(),
                None => return Ok(Vec::new()),
            };
            let mut out = Vec::with_capacity(locs.len());
            for loc in locs {
                let (src, path) = inner.source(loc.segment)?;
                out.push((loc, src, path));
            }
            out
        };
        let mut entries = Vec::with_capacity(wanted.len());
        let mut buf = Vec::new();
        for (loc, src, path) in wanted {
            let bytes: &[u8] = match &src {
                Source::Map(map) => map
                    .get(loc.offset as usize..loc.offset as usize + loc.len as usize)
                    .ok_or_else(|| {
                        WalError::corruption(&path, loc.offset, "record beyond the end of the segment")
                    })?,
                Source::File(file) => {
                    buf.resize(loc.len as usize, 0);
                    file.read_exact_at(&mut buf, loc.offset)
                        .map_err(|e| WalError::io(&path, e))?;
                    &buf
                }
            };
            match decode_at(bytes, 0, &path, loc.offset)? {
                Record::Entry { entry, .. } => entries.push(entry),
                other => {
                    return Err(WalError::corruption(
                        &path,
                        loc.offset,
                        format!("expected an entry record, found {other:?}"),
                    ))
                }
            }
        }
        Ok(entries)
    }

    /// What the log has done since it was opened.
    pub fn stats(&self) -> WalStats {
        WalStats {
            records: self.counters.records.load(Ordering::Relaxed),
            sync_requests: self.counters.sync_requests.load(Ordering::Relaxed),
            syncs: self.counters.syncs.load(Ordering::Relaxed),
            no_space: self.counters.no_space.load(Ordering::Relaxed),
        }
    }

    /// The number of segment files currently on disk.
    pub fn segment_count(&self) -> usize {
        self.lock().sealed.len() + 1
    }
}

impl Inner {
    fn check_poison(&self) -> Result<(), WalError> {
        match &self.poisoned {
            Some(msg) => Err(WalError::Poisoned(msg.clone())),
            None => Ok(()),
        }
    }

    /// Writes records to the active segment (rolling it first if it is full) and indexes them.
    fn write(&mut self, records: &[Record]) -> Result<(), WalError> {
        self.check_poison()?;
        if self.active.len >= self.opts.segment_bytes {
            self.roll()?;
        }
        let mut buf = Vec::new();
        let mut frames = Vec::with_capacity(records.len());
        let mut payload = Vec::new();
        for r in records {
            payload.clear();
            nearby_index::codec::encode_into(r, &mut payload).map_err(|e| WalError::Encode(e.to_string()))?;
            if payload.len() > frame::MAX_RECORD_LEN {
                return Err(WalError::RecordTooLarge { len: payload.len() });
            }
            let start = buf.len();
            frame::encode_record(&payload, &mut buf);
            frames.push((start, buf.len() - start));
        }
        let base = self.active.len;
        if let Err(e) = self.active.file.write_all_at(&buf, base) {
            // Undo a partial write so the next record starts at a clean boundary; if even that
            // fails the file is in an unknown state.
            if let Err(e2) = self.active.file.set_len(base) {
                self.poisoned = Some(format!("write failed ({e}) and could not be undone ({e2})"));
            }
            return Err(WalError::io(&self.active.path, e));
        }
        self.active.len += buf.len() as u64;
        for (r, (start, len)) in records.iter().zip(frames) {
            let loc = Loc {
                segment: self.active.id,
                offset: base + start as u64,
                len: len as u32,
            };
            apply_record(&mut self.groups, &mut self.active.max_index, r, loc);
        }
        Ok(())
    }

    /// Seals the active segment (synced first) and starts a new one with a checkpoint.
    fn roll(&mut self) -> Result<(), WalError> {
        self.active
            .file
            .sync_data()
            .map_err(|e| self.poison(&self.active.path.clone(), e))?;
        let next = create_segment(&self.dir, self.active.id + 1, &self.groups)?;
        let old = std::mem::replace(&mut self.active, next);
        tracing::debug!(sealed = old.id, active = self.active.id, "wal segment rolled");
        self.sealed.insert(old.id, old);
        Ok(())
    }

    fn poison(&mut self, path: &Path, e: io::Error) -> WalError {
        self.poisoned = Some(format!("{}: {e}", path.display()));
        WalError::io(path, e)
    }

    fn source(&mut self, segment: u64) -> Result<(Source, PathBuf), WalError> {
        if segment == self.active.id {
            return Ok((
                Source::File(Arc::clone(&self.active.file)),
                self.active.path.clone(),
            ));
        }
        let seg = self
            .sealed
            .get_mut(&segment)
            .ok_or_else(|| WalError::Poisoned(format!("segment {segment} is indexed but gone")))?;
        if seg.map.is_none() {
            // SAFETY: sealed segments are never written again; only the WAL deletes them, and
            // an unlinked file stays mapped until the last `Arc<Mmap>` is dropped.
            let map = unsafe { Mmap::map(&*seg.file) }.map_err(|e| WalError::io(&seg.path, e))?;
            seg.map = Some(Arc::new(map));
        }
        let map = seg
            .map
            .clone()
            .ok_or_else(|| WalError::Poisoned("mmap vanished".into()))?;
        Ok((Source::Map(map), seg.path.clone()))
    }

    /// Removes from the index the oldest sealed segments whose entries are all purged.
    fn take_dead_segments(&mut self) -> Vec<Segment> {
        let mut dead = Vec::new();
        while let Some(entry) = self.sealed.first_entry() {
            let live = entry.get().max_index.iter().any(|(g, max)| {
                self.groups
                    .get(g)
                    .is_some_and(|gl| gl.purged.is_none_or(|p| p.index < *max))
            });
            if live {
                break;
            }
            dead.push(entry.remove());
        }
        dead
    }
}

/// Updates the in-memory index for one record found at `loc`.
fn apply_record(
    groups: &mut HashMap<GroupId, GroupLog>,
    max_index: &mut HashMap<GroupId, u64>,
    record: &Record,
    loc: Loc,
) {
    match record {
        Record::Checkpoint(metas) => {
            for m in metas {
                let g = groups.entry(m.group).or_default();
                g.vote = m.vote;
                g.committed = m.committed;
                if let Some(p) = m.purged {
                    g.purge(p);
                }
            }
        }
        Record::Entry { group, entry } => {
            let g = groups.entry(*group).or_default();
            let idx = entry.log_id.index;
            if g.purged.is_some_and(|p| idx <= p.index) {
                return;
            }
            g.entries.split_off(&idx);
            g.entries.insert(idx, (entry.log_id, loc));
            let m = max_index.entry(*group).or_default();
            *m = (*m).max(idx);
        }
        Record::Vote { group, vote } => groups.entry(*group).or_default().vote = Some(*vote),
        Record::Committed { group, committed } => {
            groups.entry(*group).or_default().committed = *committed;
        }
        Record::Truncate { group, since } => {
            groups.entry(*group).or_default().entries.split_off(since);
        }
        Record::Purge { group, upto } => groups.entry(*group).or_default().purge(*upto),
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.wal"))
}

fn decode_at(buf: &[u8], offset: usize, path: &Path, file_offset: u64) -> Result<Record, WalError> {
    match frame::check(buf, offset) {
        Check::Record { payload } => nearby_index::codec::decode(&buf[payload.0..payload.1])
            .map_err(|e| WalError::corruption(path, file_offset, format!("undecodable record: {e}"))),
        other => Err(WalError::corruption(path, file_offset, format!("{other:?}"))),
    }
}

/// Creates segment `id`, writes its header and a checkpoint, and syncs file and directory.
fn create_segment(dir: &Path, id: u64, groups: &HashMap<GroupId, GroupLog>) -> Result<Segment, WalError> {
    let path = segment_path(dir, id);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| WalError::io(&path, e))?;
    let mut metas: Vec<GroupMeta> = groups.iter().map(|(id, g)| g.meta(*id)).collect();
    metas.sort_by_key(|m| m.group);
    let payload = nearby_index::codec::encode(&Record::Checkpoint(metas))
        .map_err(|e| WalError::Encode(e.to_string()))?;
    let mut buf = frame::segment_header(id).to_vec();
    frame::encode_record(&payload, &mut buf);
    if let Err(e) = file.write_all_at(&buf, 0).and_then(|()| file.sync_all()) {
        // A segment that never got its checkpoint is no segment: remove it, so the next roll
        // (once there is space again) can create it afresh.
        drop(file);
        if let Err(e2) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e2, "cannot remove a half-made wal segment");
        }
        return Err(WalError::io(&path, e));
    }
    sync_dir(dir)?;
    Ok(Segment {
        id,
        path,
        file: Arc::new(file),
        len: buf.len() as u64,
        max_index: HashMap::new(),
        map: None,
    })
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| WalError::io(dir, e))
}

/// Replays one segment into `groups`; in the newest segment a torn tail is cut off.
fn replay_segment(
    path: &Path,
    id: u64,
    newest: bool,
    groups: &mut HashMap<GroupId, GroupLog>,
    report: &mut RecoveryReport,
) -> Result<Segment, WalError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| WalError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| WalError::io(path, e))?.len();
    // SAFETY: the WAL is the only writer of its directory and is not yet running; the map is
    // dropped before the file is written again.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| WalError::io(path, e))?;
    let buf: &[u8] = &map;
    match frame::parse_segment_header(buf) {
        Some(found) if found == id => {}
        Some(found) => {
            return Err(WalError::corruption(
                path,
                0,
                format!("header names segment {found}, file name {id}"),
            ))
        }
        None if newest && buf.len() < SEGMENT_HEADER_LEN && !frame::any_record_after(buf, 0) => {
            // Crashed while creating the segment: start it again.
            drop(map);
            fs::remove_file(path).map_err(|e| WalError::io(path, e))?;
            let dir = path.parent().unwrap_or(Path::new("."));
            report.torn_tail_bytes += file_len;
            return create_segment(dir, id, groups);
        }
        None if buf.starts_with(frame::OLD_SEGMENT_MAGIC) => {
            return Err(WalError::corruption(
                path,
                0,
                "written by an older nearby (log format 1, single-kind groups); this version reads \
                 format 2: move the data directory aside and let the node rejoin its cluster",
            ))
        }
        None => return Err(WalError::corruption(path, 0, "bad segment header")),
    }
    let mut max_index = HashMap::new();
    let valid_len = replay_records(buf, id, newest, path, groups, &mut max_index, report)?;
    drop(map);
    if valid_len as u64 != file_len {
        file.set_len(valid_len as u64)
            .map_err(|e| WalError::io(path, e))?;
        file.sync_all().map_err(|e| WalError::io(path, e))?;
    }
    Ok(Segment {
        id,
        path: path.to_path_buf(),
        file: Arc::new(file),
        len: valid_len as u64,
        max_index,
        map: None,
    })
}

/// Replays the records of a segment's bytes (after its header) into `groups`, and returns where
/// the valid records end. In the newest segment, damage followed by nothing valid is a torn
/// tail (cut there); any other damage is corruption.
fn replay_records(
    buf: &[u8],
    id: u64,
    newest: bool,
    path: &Path,
    groups: &mut HashMap<GroupId, GroupLog>,
    max_index: &mut HashMap<GroupId, u64>,
    report: &mut RecoveryReport,
) -> Result<usize, WalError> {
    let mut offset = SEGMENT_HEADER_LEN;
    loop {
        match frame::check(buf, offset) {
            Check::Record { payload } => {
                let record: Record =
                    nearby_index::codec::decode(&buf[payload.0..payload.1]).map_err(|e| {
                        WalError::corruption(path, offset as u64, format!("undecodable record: {e}"))
                    })?;
                let loc = Loc {
                    segment: id,
                    offset: offset as u64,
                    len: (payload.1 - offset) as u32,
                };
                apply_record(groups, max_index, &record, loc);
                report.records += 1;
                offset = payload.1;
            }
            Check::End => return Ok(offset),
            damage => {
                if newest && !frame::any_record_after(buf, offset) {
                    tracing::warn!(
                        path = %path.display(), offset, bytes = buf.len() - offset, ?damage,
                        "cutting a torn write off the end of the wal"
                    );
                    report.torn_tail_bytes += (buf.len() - offset) as u64;
                    return Ok(offset);
                }
                return Err(WalError::corruption(path, offset as u64, format!("{damage:?}")));
            }
        }
    }
}

/// Replays a segment file's bytes as recovery does, without a file: the entry point for fuzzing
/// the WAL's decoders (`fuzz/`). Returns what recovery would report.
#[doc(hidden)]
pub fn replay_bytes(bytes: &[u8], newest: bool) -> Result<RecoveryReport, WalError> {
    let path = Path::new("fuzz.wal");
    let Some(id) = frame::parse_segment_header(bytes) else {
        return Err(WalError::corruption(path, 0, "bad segment header"));
    };
    let mut report = RecoveryReport::default();
    let mut groups = HashMap::new();
    replay_records(
        bytes,
        id,
        newest,
        path,
        &mut groups,
        &mut HashMap::new(),
        &mut report,
    )?;
    Ok(report)
}

/// The sync thread: takes every waiting request, syncs each distinct file once, then answers all
/// of them. Writes that arrive while a sync runs are answered by the next one (group commit).
fn sync_loop(rx: mpsc::Receiver<SyncRequest>, inner: Arc<Mutex<Inner>>, counters: &Counters) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        // Once a sync has failed, no later one may answer `Ok`: the writes it would cover may
        // sit after records the kernel has already lost.
        let mut result: Result<(), String> = match &inner.lock().unwrap_or_else(|p| p.into_inner()).poisoned {
            Some(msg) => Err(msg.clone()),
            None => Ok(()),
        };
        let mut synced: Vec<*const File> = Vec::new();
        for req in batch.iter().take_while(|_| result.is_ok()) {
            let ptr = Arc::as_ptr(&req.file);
            if synced.contains(&ptr) {
                continue;
            }
            synced.push(ptr);
            counters.syncs.fetch_add(1, Ordering::Relaxed);
            let injected = counters
                .fail_syncs
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
            let synced_ok = if injected {
                Err(io::Error::other("injected fdatasync failure"))
            } else {
                req.file.sync_data()
            };
            if let Err(e) = synced_ok {
                let msg = format!("fdatasync failed: {e}");
                tracing::error!(%msg, "wal poisoned");
                let mut g = inner.lock().unwrap_or_else(|p| p.into_inner());
                g.poisoned.get_or_insert_with(|| msg.clone());
                result = Err(msg);
                break;
            }
        }
        for req in batch {
            match req.waiter {
                Waiter::Log(cb) => cb.log_io_completed(result.clone().map_err(io::Error::other)),
                Waiter::Notify(tx) => {
                    let _ = tx.send(result.clone());
                }
            }
        }
    }
}

/// Test hooks: byte positions of records, so tests can damage exactly one.
#[doc(hidden)]
pub fn segment_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    files.sort();
    Ok(files)
}

/// Offsets of every record frame in a segment file's bytes (test hook).
#[doc(hidden)]
pub fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = SEGMENT_HEADER_LEN;
    while let Check::Record { payload } = frame::check(bytes, at) {
        out.push(at);
        at = payload.1;
    }
    out
}

/// Bytes of a record header (test hook).
#[doc(hidden)]
pub const RECORD_HEADER_BYTES: usize = RECORD_HEADER_LEN;

#[cfg(test)]
mod tests {
    use super::*;

    /// A write made before a failed `fdatasync`, whose own sync comes after the failure, is
    /// never acknowledged, although that later sync would succeed: the kernel may already have
    /// dropped the pages of the records before it.
    #[tokio::test]
    async fn nothing_written_before_a_failed_sync_is_acknowledged() {
        let dir = tempfile::TempDir::new().expect("tmp");
        let (wal, _) = Wal::open(dir.path(), WalOptions::default()).expect("open");
        let vote = Vote::new(1, 1);
        // Written, its sync not asked for yet.
        let written_before = wal.write(&[Record::Vote { group: 2, vote }]).expect("write");
        wal.fail_next_syncs(1);
        assert!(
            matches!(wal.save_vote(1, vote).await, Err(WalError::Poisoned(_))),
            "the failed sync is reported"
        );
        let (tx, rx) = tokio::sync::oneshot::channel();
        wal.request_sync(written_before, Waiter::Notify(tx)).expect("ask");
        let answer = rx.await.expect("answered");
        assert!(
            answer.is_err(),
            "a write from before the failure must not be acknowledged, got {answer:?}"
        );
        assert!(
            matches!(wal.save_vote(3, vote).await, Err(WalError::Poisoned(_))),
            "and nothing new is written"
        );
        assert_eq!(wal.stats().syncs, 1, "no sync is even tried once poisoned");
    }
}
