//! [`HistoryStore`]: one directory of segments — the active segment, the sealed ones, the LOCK —
//! and every operation that touches more than one file: recovery on open, sealing, deletion and
//! retention. The order of file operations in each of them is what makes them crash-safe; each
//! function says which order it relies on.

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use crate::active::Active;
use crate::error::HistoryError;
use crate::format::{self, MAX_BATCH_RECORDS};
use crate::sealed::{Opened, Quarantined, Sealed};
use crate::{DeleteStats, Record, RecoveryReport, RetentionStats, StoreConfig, StoreStats};

/// Name of the lock file every open store holds.
const LOCK_FILE: &str = "LOCK";
const SEALED_EXT: &str = ".seg";
const ACTIVE_EXT: &str = ".active";
const TEMP_EXT: &str = ".tmp";

fn sealed_name(seq: u64) -> String {
    format!("{seq:020}{SEALED_EXT}")
}

fn active_name(seq: u64) -> String {
    format!("{seq:020}{ACTIVE_EXT}")
}

/// The kind and number of a segment file name, or `None` for any other name.
fn parse_name(name: &str) -> Option<(bool, u64)> {
    let (stem, sealed) = if let Some(stem) = name.strip_suffix(SEALED_EXT) {
        (stem, true)
    } else {
        (name.strip_suffix(ACTIVE_EXT)?, false)
    };
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((sealed, stem.parse().ok()?))
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(TEMP_EXT);
    PathBuf::from(name)
}

/// `fsync`s a directory, so the renames, creations and unlinks in it are durable.
fn sync_dir(dir: &Path) -> Result<(), HistoryError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| HistoryError::io(dir, e))
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A sealed segment slot: readable, or kept aside because it failed its checks.
#[derive(Debug)]
enum Segment {
    Healthy(Sealed),
    Corrupt(Quarantined),
}

impl Segment {
    fn path(&self) -> &Path {
        match self {
            Segment::Healthy(s) => s.path(),
            Segment::Corrupt(q) => &q.path,
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Segment::Healthy(s) => s.bytes(),
            Segment::Corrupt(q) => q.bytes,
        }
    }

    fn count(&self) -> u64 {
        match self {
            Segment::Healthy(s) => s.count(),
            Segment::Corrupt(q) => q.count.unwrap_or(0),
        }
    }

    fn max_at(&self) -> Option<u64> {
        match self {
            Segment::Healthy(s) => Some(s.max_at()),
            Segment::Corrupt(q) => q.max_at,
        }
    }
}

/// A location-history segment store: one directory, one writer. See the crate doc for the
/// format, the recovery rules and the call contract.
#[derive(Debug)]
pub struct HistoryStore {
    dir: PathBuf,
    config: StoreConfig,
    /// Holds the directory's lock for as long as the store is open.
    _lock: File,
    /// Sealed segments by sequence number (oldest first).
    sealed: BTreeMap<u64, Segment>,
    active: Active,
    /// Set by the first failure after which files and memory may disagree.
    poisoned: Option<String>,
    recovery: RecoveryReport,
}

impl HistoryStore {
    /// Opens the store in `dir`, creating the directory (mode 0700) if it is missing, and
    /// recovers it:
    ///
    /// 1. takes the directory's `LOCK` (fails with [`HistoryError::Locked`] if it is held);
    /// 2. removes `*.tmp` files (writes that never reached their rename);
    /// 3. removes an active segment whose sealed twin exists (a seal that stopped after its
    ///    rename);
    /// 4. maps and checks every sealed segment; one that fails is quarantined — kept as it is,
    ///    not read, logged at `warn` and listed in [`RecoveryReport::corrupt_segments`];
    /// 5. opens the active segment, cutting off its torn tail (or creates one).
    pub fn open(dir: &Path, config: StoreConfig) -> Result<Self, HistoryError> {
        config.validate()?;
        let existed = dir.is_dir();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| HistoryError::io(dir, e))?;
        if !existed {
            // The new directory's entry in its parent must be durable too, or a crash could lose
            // the whole directory along with every synced file in it.
            let parent = dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            sync_dir(parent)?;
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| HistoryError::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(HistoryError::Locked {
                    path: dir.to_path_buf(),
                })
            }
            Err(TryLockError::Error(e)) => return Err(HistoryError::io(&lock_path, e)),
        }

        let mut report = RecoveryReport::default();
        let mut sealed_files = BTreeMap::new();
        let mut active_files = BTreeMap::new();
        let mut dir_changed = false;
        for entry in fs::read_dir(dir).map_err(|e| HistoryError::io(dir, e))? {
            let entry = entry.map_err(|e| HistoryError::io(dir, e))?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                warn!(path = %path.display(), "ignoring a file with a non-UTF-8 name in the history directory");
                continue;
            };
            if name == LOCK_FILE {
                continue;
            }
            if name.ends_with(TEMP_EXT) {
                info!(path = %path.display(), "removing a temporary file left by an interrupted write");
                fs::remove_file(&path).map_err(|e| HistoryError::io(&path, e))?;
                report.removed_temp_files += 1;
                dir_changed = true;
                continue;
            }
            match parse_name(&name) {
                Some((true, seq)) => {
                    sealed_files.insert(seq, path);
                }
                Some((false, seq)) => {
                    active_files.insert(seq, path);
                }
                None => warn!(path = %path.display(), "ignoring an unknown file in the history directory"),
            }
        }

        // A seal renames the sealed file into place, syncs the directory and only then removes
        // the active file, so an active file with a sealed twin is already fully sealed.
        let stale: Vec<u64> = active_files
            .keys()
            .filter(|seq| sealed_files.contains_key(seq))
            .copied()
            .collect();
        for seq in stale {
            if let Some(path) = active_files.remove(&seq) {
                info!(path = %path.display(), "removing an active segment that was already sealed");
                fs::remove_file(&path).map_err(|e| HistoryError::io(&path, e))?;
                report.removed_stale_active += 1;
                dir_changed = true;
            }
        }
        if active_files.len() > 1 {
            return Err(HistoryError::corrupt(
                dir,
                0,
                format!(
                    "more than one active segment: {:?}",
                    active_files.values().collect::<Vec<_>>()
                ),
            ));
        }

        let mut sealed = BTreeMap::new();
        for (seq, path) in sealed_files {
            match Sealed::open(&path, seq)? {
                Opened::Healthy(s) => {
                    sealed.insert(seq, Segment::Healthy(s));
                }
                Opened::Corrupt(q) => {
                    warn!(
                        path = %q.path.display(),
                        offset = q.offset,
                        why = q.why,
                        "sealed history segment failed its checks; it is kept as it is and not read"
                    );
                    report.corrupt_segments.push(q.path.clone());
                    sealed.insert(seq, Segment::Corrupt(q));
                }
            }
        }
        let next_seq = sealed.keys().next_back().map_or(1, |s| s + 1);

        let active = match active_files.pop_first() {
            Some((seq, path)) => {
                if seq < next_seq {
                    return Err(HistoryError::corrupt(
                        &path,
                        0,
                        format!("active segment {seq} is not newer than the newest sealed segment"),
                    ));
                }
                let (active, torn) = Active::open(&path, seq)?;
                report.torn_tail_bytes = torn;
                active
            }
            None => {
                let active = Active::create(&dir.join(active_name(next_seq)), next_seq)?;
                dir_changed = true;
                active
            }
        };
        if dir_changed {
            sync_dir(dir)?;
        }
        report.sealed_segments = sealed.len();
        info!(
            dir = %dir.display(),
            sealed = report.sealed_segments,
            corrupt = report.corrupt_segments.len(),
            active_records = active.count(),
            torn_tail_bytes = report.torn_tail_bytes,
            "opened history store"
        );
        Ok(HistoryStore {
            dir: dir.to_path_buf(),
            config,
            _lock: lock,
            sealed,
            active,
            poisoned: None,
            recovery: report,
        })
    }

    /// Whether a failure poisoned the store: it must be dropped and opened again.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// What [`open`](Self::open) found and repaired.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `batch` durably: every record is validated first (a NaN or out-of-range
    /// coordinate refuses the whole batch and writes nothing), then the batch is written with one
    /// write and one `fdatasync`. Returns once the batch is durable. An empty batch does nothing.
    ///
    /// If the active segment then exceeds `segment_bytes` it is sealed. A failed seal does not
    /// fail the append (the batch is already durable, and an error would invite a duplicate
    /// retry): it is logged and retried at the next append, or, if it failed after its rename,
    /// poisons the store so the next call reports it.
    pub fn append(&mut self, batch: &[Record]) -> Result<(), HistoryError> {
        self.check_writable()?;
        for (index, r) in batch.iter().enumerate() {
            r.validate(index)?;
        }
        if batch.is_empty() {
            return Ok(());
        }
        if batch.len() > MAX_BATCH_RECORDS {
            return Err(HistoryError::BatchTooLarge {
                len: batch.len(),
                max: MAX_BATCH_RECORDS,
            });
        }
        if let Err(e) = self.active.append(batch) {
            return Err(self.poison(e));
        }
        if self.active.len() > self.config.segment_bytes {
            if let Err(e) = self.seal_active() {
                warn!(error = %e, poisoned = self.poisoned.is_some(), "sealing the active history segment failed");
            }
        }
        Ok(())
    }

    /// The records of `user` with `since_ms <= at_ms < until_ms`, ascending by time (records
    /// with equal times in arrival order), at most `limit`.
    ///
    /// Sealed segments whose min/max time lie outside the range are skipped; quarantined ones
    /// are not read (they were reported at open). A damaged block on the way fails the read with
    /// [`HistoryError::Corrupt`] rather than returning a silently shortened history.
    pub fn read(
        &self,
        user: u64,
        since_ms: u64,
        until_ms: u64,
        limit: usize,
    ) -> Result<Vec<Record>, HistoryError> {
        if since_ms >= until_ms || limit == 0 {
            return Ok(Vec::new());
        }
        let (lo, hi) = (since_ms, until_ms - 1);
        let mut out = Vec::new();
        for segment in self.sealed.values() {
            if let Segment::Healthy(s) = segment {
                if s.overlaps(lo, hi) {
                    s.read(user, lo, hi, &mut out)?;
                }
            }
        }
        self.active.read(user, lo, hi, &mut out)?;
        // Stable: records with equal times stay in arrival order (segment order, then file order).
        out.sort_by_key(|r| r.at_ms);
        out.truncate(limit);
        Ok(out)
    }

    /// Deletes every record of `user`, for real: every segment holding one is rewritten without
    /// them (or removed when nothing else is left), so afterwards no file in the directory holds
    /// any byte of them. Each rewrite is crash-safe: new file, fsync, rename over the old one,
    /// fsync of the directory. A crash part-way leaves some segments rewritten and others not;
    /// calling it again finishes the job.
    ///
    /// Fails with [`HistoryError::DeletionIncomplete`] — after deleting everything it could — if a
    /// corrupt segment might still hold the user's records.
    pub fn delete_user(&mut self, user: u64) -> Result<DeleteStats, HistoryError> {
        self.delete_range(user, 0, u64::MAX)
    }

    /// Deletes the records of `user` with `at_ms < before_ms`, as [`delete_user`](Self::delete_user)
    /// does.
    pub fn delete_before(&mut self, user: u64, before_ms: u64) -> Result<DeleteStats, HistoryError> {
        match before_ms.checked_sub(1) {
            Some(hi) => self.delete_range(user, 0, hi),
            None => Ok(DeleteStats::default()),
        }
    }

    /// Deletes the records of `user` with `lo <= at_ms <= hi`.
    fn delete_range(&mut self, user: u64, lo: u64, hi: u64) -> Result<DeleteStats, HistoryError> {
        self.check_writable()?;
        let mut stats = DeleteStats::default();
        let mut incomplete = Vec::new();
        let seqs: Vec<u64> = self.sealed.keys().copied().collect();
        for seq in seqs {
            let Some(segment) = self.sealed.get(&seq) else {
                continue;
            };
            let s = match segment {
                Segment::Corrupt(q) => {
                    incomplete.push(q.path.clone());
                    continue;
                }
                Segment::Healthy(s) if !s.overlaps(lo, hi) => continue,
                Segment::Healthy(s) => s,
            };
            let found = s.run(user, lo, hi).and_then(|run| {
                if run.is_empty() {
                    Ok(None)
                } else {
                    s.records().map(|all| Some((run, all)))
                }
            });
            let (run, mut records) = match found {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(e @ HistoryError::Corrupt { .. }) => {
                    warn!(error = %e, user, "cannot delete from a damaged sealed segment");
                    incomplete.push(s.path().to_path_buf());
                    continue;
                }
                Err(e) => return Err(e),
            };
            let path = s.path().to_path_buf();
            stats.records_removed += run.len() as u64;
            records.drain(run);
            if records.is_empty() {
                self.remove_sealed(seq)?;
                stats.segments_removed += 1;
            } else {
                let bytes = format::encode_sealed(seq, &records);
                self.install(&path, &bytes)?;
                match Sealed::open(&path, seq) {
                    Ok(Opened::Healthy(s)) => {
                        self.sealed.insert(seq, Segment::Healthy(s));
                    }
                    Ok(Opened::Corrupt(q)) => {
                        let e = HistoryError::corrupt(&q.path, q.offset, q.why);
                        return Err(self.poison(e));
                    }
                    Err(e) => return Err(self.poison(e)),
                }
                stats.segments_rewritten += 1;
            }
        }

        if self.active.may_hold(user, lo, hi) {
            let records = self.active.load_all()?;
            let before = records.len();
            let kept: Vec<Record> = records
                .into_iter()
                .filter(|r| !(r.user == user && (lo..=hi).contains(&r.at_ms)))
                .collect();
            let removed = before - kept.len();
            if removed > 0 {
                let (seq, path) = (self.active.seq(), self.active.path().to_path_buf());
                self.install(&path, &Active::encode_file(seq, &kept))?;
                match Active::open(&path, seq) {
                    Ok((active, _)) => self.active = active,
                    Err(e) => return Err(self.poison(e)),
                }
                stats.records_removed += removed as u64;
                stats.segments_rewritten += 1;
            }
        }
        info!(
            user,
            records = stats.records_removed,
            rewritten = stats.segments_rewritten,
            removed = stats.segments_removed,
            "deleted location history"
        );
        if !incomplete.is_empty() {
            return Err(HistoryError::DeletionIncomplete {
                user,
                paths: incomplete,
            });
        }
        Ok(stats)
    }

    /// Enforces retention at time `now_ms` (milliseconds since the Unix epoch; passed in so tests
    /// and the node decide the clock):
    ///
    /// 1. if the active segment's oldest record is older than `seal_after`, it is sealed, so an
    ///    idle store's records do not escape the age limit by sitting in a never-full segment;
    /// 2. every sealed segment whose newest record is older than `max_age` is removed;
    /// 3. while the directory's total exceeds `max_bytes`, the oldest sealed segment (lowest
    ///    sequence number, i.e. written first) is removed. The active segment is never removed,
    ///    so the newest data stays.
    ///
    /// Only whole segments are removed (an unlink each, then one directory fsync), so the call is
    /// short unless step 1 seals.
    pub fn enforce_retention(&mut self, now_ms: u64) -> Result<RetentionStats, HistoryError> {
        self.check_writable()?;
        let mut stats = RetentionStats::default();
        let seal_cutoff = now_ms.saturating_sub(millis(self.config.seal_after));
        if self.active.min_at().is_some_and(|min| min < seal_cutoff) {
            self.seal_active()?;
            stats.sealed_active = true;
        }

        let age_cutoff = now_ms.saturating_sub(millis(self.config.max_age));
        let expired: Vec<u64> = self
            .sealed
            .iter()
            .filter(|(_, s)| s.max_at().is_some_and(|max| max < age_cutoff))
            .map(|(&seq, _)| seq)
            .collect();
        for seq in expired {
            stats.add(self.remove_sealed_unsynced(seq)?);
        }
        while self.total_bytes() > self.config.max_bytes {
            let Some(&seq) = self.sealed.keys().next() else {
                break;
            };
            stats.add(self.remove_sealed_unsynced(seq)?);
        }
        if stats.segments_removed > 0 {
            if let Err(e) = sync_dir(&self.dir) {
                return Err(self.poison(e));
            }
            info!(
                segments = stats.segments_removed,
                records = stats.records_removed,
                bytes = stats.bytes_removed,
                "history retention removed segments"
            );
        }
        for segment in self.sealed.values() {
            if let Segment::Corrupt(q) = segment {
                if q.max_at.is_none() {
                    warn!(path = %q.path.display(), "a corrupt history segment of unknown age is kept until the size budget removes it");
                }
            }
        }
        Ok(stats)
    }

    /// Seals the active segment now if it holds any record (the store also seals on its own,
    /// past `segment_bytes` and in [`enforce_retention`](Self::enforce_retention)).
    pub fn seal(&mut self) -> Result<(), HistoryError> {
        self.check_writable()?;
        self.seal_active()
    }

    /// Counts of segments, records and bytes.
    pub fn stats(&self) -> StoreStats {
        let healthy = self
            .sealed
            .values()
            .filter(|s| matches!(s, Segment::Healthy(_)))
            .count();
        StoreStats {
            sealed_segments: healthy,
            corrupt_segments: self.sealed.len() - healthy,
            active_records: self.active.count(),
            records: self.sealed.values().map(Segment::count).sum::<u64>() + self.active.count(),
            bytes: self.total_bytes(),
        }
    }

    fn total_bytes(&self) -> u64 {
        self.sealed.values().map(Segment::bytes).sum::<u64>() + self.active.len()
    }

    fn check_writable(&self) -> Result<(), HistoryError> {
        match &self.poisoned {
            Some(why) => Err(HistoryError::Poisoned { why: why.clone() }),
            None => Ok(()),
        }
    }

    /// Records the first failure after which files and memory may disagree.
    fn poison(&mut self, e: HistoryError) -> HistoryError {
        if self.poisoned.is_none() {
            tracing::error!(error = %e, dir = %self.dir.display(), "history store poisoned; reopen it to recover");
            self.poisoned = Some(e.to_string());
        }
        e
    }

    /// Replaces (or creates) `path` with `bytes`: writes `path.tmp`, fsyncs it, renames it over
    /// `path` and fsyncs the directory. A failure before the rename changes nothing (the temp file
    /// is removed); a failure after it poisons the store, since the caller's in-memory state no
    /// longer matches the directory.
    fn install(&mut self, path: &Path, bytes: &[u8]) -> Result<(), HistoryError> {
        let tmp = temp_path(path);
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(bytes)?;
                f.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(HistoryError::io(&tmp, e));
        }
        if let Err(e) = sync_dir(&self.dir) {
            return Err(self.poison(e));
        }
        Ok(())
    }

    /// Seals the active segment, if it holds records. The order is what makes a crash anywhere
    /// safe:
    ///
    /// 1. read back and check every batch, sort by `(user, at_ms)`, encode;
    /// 2. write `N.seg.tmp`, fsync, rename to `N.seg`, fsync the directory (a crash before the
    ///    rename leaves a temp file that open removes);
    /// 3. create and sync `N+1.active`, fsync the directory;
    /// 4. remove `N.active`, fsync the directory (a crash before this leaves `N.active` beside
    ///    its sealed twin, which open removes).
    ///
    /// A failure in step 1–2 before the rename changes nothing; one after it poisons the store.
    fn seal_active(&mut self) -> Result<(), HistoryError> {
        if self.active.count() == 0 {
            return Ok(());
        }
        let seq = self.active.seq();
        let mut records = self.active.load_all()?;
        records.sort_by_key(|r| (r.user, r.at_ms));
        let path = self.dir.join(sealed_name(seq));
        self.install(&path, &format::encode_sealed(seq, &records))?;
        let sealed = match Sealed::open(&path, seq) {
            Ok(Opened::Healthy(s)) => s,
            Ok(Opened::Corrupt(q)) => {
                let e = HistoryError::corrupt(&q.path, q.offset, q.why);
                return Err(self.poison(e));
            }
            Err(e) => return Err(self.poison(e)),
        };
        let next = seq + 1;
        let fresh = Active::create(&self.dir.join(active_name(next)), next)
            .and_then(|fresh| sync_dir(&self.dir).map(|()| fresh));
        let fresh = match fresh {
            Ok(fresh) => fresh,
            Err(e) => return Err(self.poison(e)),
        };
        let old = std::mem::replace(&mut self.active, fresh);
        self.sealed.insert(seq, Segment::Healthy(sealed));
        let removed = fs::remove_file(old.path())
            .map_err(|e| HistoryError::io(old.path(), e))
            .and_then(|()| sync_dir(&self.dir));
        if let Err(e) = removed {
            return Err(self.poison(e));
        }
        debug!(seq, records = records.len(), "sealed history segment");
        Ok(())
    }

    /// Unlinks sealed segment `seq` and syncs the directory.
    fn remove_sealed(&mut self, seq: u64) -> Result<(), HistoryError> {
        self.remove_sealed_unsynced(seq)?;
        if let Err(e) = sync_dir(&self.dir) {
            return Err(self.poison(e));
        }
        Ok(())
    }

    /// Unlinks sealed segment `seq`; the caller syncs the directory. Returns the segment's
    /// `(records, bytes)`.
    fn remove_sealed_unsynced(&mut self, seq: u64) -> Result<(u64, u64), HistoryError> {
        let Some(segment) = self.sealed.get(&seq) else {
            return Ok((0, 0));
        };
        let path = segment.path().to_path_buf();
        fs::remove_file(&path).map_err(|e| HistoryError::io(&path, e))?;
        let removed = (segment.count(), segment.bytes());
        // Dropping the segment unmaps it; the unlinked inode is freed then.
        self.sealed.remove(&seq);
        Ok(removed)
    }
}

impl RetentionStats {
    fn add(&mut self, (records, bytes): (u64, u64)) {
        self.segments_removed += 1;
        self.records_removed += records;
        self.bytes_removed += bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_name(&sealed_name(7)), Some((true, 7)));
        assert_eq!(parse_name(&active_name(u64::MAX)), Some((false, u64::MAX)));
        assert_eq!(parse_name("7.seg"), None);
        assert_eq!(parse_name("00000000000000000007.seg.tmp"), None);
        assert_eq!(parse_name("LOCK"), None);
    }
}
