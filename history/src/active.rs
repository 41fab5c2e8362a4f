//! The active segment: the one file of a store that is appended to, batch by batch in arrival
//! order, with an in-memory per-user index (user → record offsets) so a read never scans it.
//!
//! This module owns the active file's handle and its index. It writes only to that file (appends,
//! and the cut of a torn tail when it is opened); it never renames or deletes files — the store
//! ([`crate::store`]) does, since those steps must be ordered with the sealed segments.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::error::HistoryError;
use crate::format::{self, Header, Kind, HEADER_LEN, MAX_BATCH_RECORDS, RECORD_LEN};
use crate::Record;

/// One user's records in the active segment.
#[derive(Debug)]
struct UserRecords {
    min_at: u64,
    max_at: u64,
    /// Byte offsets of the records, ascending (arrival order). `u32` is enough: the store keeps
    /// `segment_bytes` at or below 1 GiB, so the active file stays far below 4 GiB.
    offsets: Vec<u32>,
}

/// The active segment of a store.
#[derive(Debug)]
pub(crate) struct Active {
    path: PathBuf,
    file: File,
    seq: u64,
    /// Bytes of the file that hold the header and complete, synced batches.
    len: u64,
    count: u64,
    /// Smallest and largest `at_ms`; meaningful only when `count > 0`.
    min_at: u64,
    max_at: u64,
    users: HashMap<u64, UserRecords>,
}

impl Active {
    /// Creates a new, empty active segment at `path` and syncs it (the caller syncs the
    /// directory). Fails if the file exists.
    pub(crate) fn create(path: &Path, seq: u64) -> Result<Active, HistoryError> {
        let io = |e| HistoryError::io(path, e);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        file.write_all_at(&Header::active(seq).encode(), 0).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(Active::empty(path, file, seq))
    }

    fn empty(path: &Path, file: File, seq: u64) -> Active {
        Active {
            path: path.to_path_buf(),
            file,
            seq,
            len: HEADER_LEN as u64,
            count: 0,
            min_at: 0,
            max_at: 0,
            users: HashMap::new(),
        }
    }

    /// Opens the active segment at `path` after a restart: checks its header, walks its batches
    /// to rebuild the index, and cuts off a torn tail. Returns the segment and the number of
    /// bytes cut off.
    ///
    /// Damage after which an intact batch follows is not a torn write but corruption of
    /// acknowledged data: that fails with [`HistoryError::Corrupt`] and changes nothing.
    pub(crate) fn open(path: &Path, seq: u64) -> Result<(Active, u64), HistoryError> {
        let io = |e| HistoryError::io(path, e);
        let mut file = OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        if bytes.len() > u32::MAX as usize {
            return Err(HistoryError::corrupt(path, 0, "active segment larger than 4 GiB"));
        }

        let header = match Header::decode(&bytes) {
            Ok(h) => h,
            Err(why) if bytes.len() <= HEADER_LEN => {
                // The segment was being created when the process stopped: nothing was ever
                // appended to it, so it is started again.
                warn!(path = %path.display(), why, "rewriting the torn header of an empty active segment");
                file.set_len(0).map_err(io)?;
                file.write_all_at(&Header::active(seq).encode(), 0).map_err(io)?;
                file.sync_all().map_err(io)?;
                return Ok((Active::empty(path, file, seq), bytes.len() as u64));
            }
            Err(why) => return Err(HistoryError::corrupt(path, 0, why)),
        };
        if header.kind != Kind::Active {
            return Err(HistoryError::corrupt(
                path,
                10,
                "an active segment file holds a sealed segment",
            ));
        }
        if header.seq != seq {
            return Err(HistoryError::corrupt(
                path,
                16,
                format!(
                    "header sequence number {} differs from the file name's {seq}",
                    header.seq
                ),
            ));
        }

        let mut active = Active::empty(path, file, seq);
        let (valid_len, damage) = format::scan_active(&bytes, |offset, r| active.index(offset as u32, &r));
        active.len = valid_len as u64;
        let mut torn = 0;
        if let Some(damage) = damage {
            if let Some(after) = damage.intact_batch_after {
                return Err(HistoryError::corrupt(
                    path,
                    damage.offset as u64,
                    format!(
                        "{}; an intact batch follows at byte {after}, so this is not a torn write",
                        damage.why
                    ),
                ));
            }
            torn = (bytes.len() - valid_len) as u64;
            warn!(
                path = %path.display(),
                offset = damage.offset,
                bytes = torn,
                why = damage.why,
                "cutting the torn tail of the active segment (a batch that was never acknowledged)"
            );
            active.file.set_len(active.len).map_err(io)?;
            active.file.sync_all().map_err(io)?;
        }
        Ok((active, torn))
    }

    fn index(&mut self, offset: u32, r: &Record) {
        if self.count == 0 {
            self.min_at = r.at_ms;
            self.max_at = r.at_ms;
        } else {
            self.min_at = self.min_at.min(r.at_ms);
            self.max_at = self.max_at.max(r.at_ms);
        }
        self.count += 1;
        let user = self.users.entry(r.user).or_insert(UserRecords {
            min_at: r.at_ms,
            max_at: r.at_ms,
            offsets: Vec::new(),
        });
        user.min_at = user.min_at.min(r.at_ms);
        user.max_at = user.max_at.max(r.at_ms);
        user.offsets.push(offset);
    }

    /// Appends `batch` (already validated, 1..=[`MAX_BATCH_RECORDS`] records) with one write and
    /// one `fdatasync`, then indexes it. On error the file may hold part of the batch; the store
    /// poisons itself and the next open cuts it off.
    pub(crate) fn append(&mut self, batch: &[Record]) -> Result<(), HistoryError> {
        let mut buf = Vec::with_capacity(format::batch_len(batch.len()));
        format::encode_batch(batch, &mut buf);
        let io = |e| HistoryError::io(&self.path, e);
        self.file.write_all_at(&buf, self.len).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        let first = self.len as usize + format::BATCH_HEADER_LEN;
        for (i, r) in batch.iter().enumerate() {
            self.index((first + i * RECORD_LEN) as u32, r);
        }
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Whether the segment may hold records of `user` with `lo <= at_ms <= hi`.
    pub(crate) fn may_hold(&self, user: u64, lo: u64, hi: u64) -> bool {
        self.users
            .get(&user)
            .is_some_and(|u| u.min_at <= hi && u.max_at >= lo)
    }

    /// Appends to `out`, in arrival order, the records of `user` with `lo <= at_ms <= hi`.
    pub(crate) fn read(
        &self,
        user: u64,
        lo: u64,
        hi: u64,
        out: &mut Vec<Record>,
    ) -> Result<(), HistoryError> {
        let Some(u) = self.users.get(&user) else {
            return Ok(());
        };
        if u.min_at > hi || u.max_at < lo {
            return Ok(());
        }
        let mut buf = [0u8; RECORD_LEN];
        for &offset in &u.offsets {
            self.file
                .read_exact_at(&mut buf, u64::from(offset))
                .map_err(|e| HistoryError::io(&self.path, e))?;
            let r = format::decode_record(&buf);
            if r.user != user {
                // The index and the file disagree: something else wrote to the file.
                return Err(HistoryError::corrupt(
                    &self.path,
                    u64::from(offset),
                    "record does not belong to the indexed user",
                ));
            }
            if (lo..=hi).contains(&r.at_ms) {
                out.push(r);
            }
        }
        Ok(())
    }

    /// Reads back every record, in arrival order, checking every batch again.
    pub(crate) fn load_all(&self) -> Result<Vec<Record>, HistoryError> {
        let mut bytes = vec![0u8; self.len as usize];
        self.file
            .read_exact_at(&mut bytes, 0)
            .map_err(|e| HistoryError::io(&self.path, e))?;
        let mut records = Vec::with_capacity(self.count as usize);
        let (_, damage) = format::scan_active(&bytes, |_, r| records.push(r));
        if let Some(d) = damage {
            return Err(HistoryError::corrupt(&self.path, d.offset as u64, d.why));
        }
        Ok(records)
    }

    /// The bytes of an active segment file holding `records` in the given order (used to rewrite
    /// the segment without a user's records).
    pub(crate) fn encode_file(seq: u64, records: &[Record]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + format::batch_len(records.len()));
        out.extend_from_slice(&Header::active(seq).encode());
        for chunk in records.chunks(MAX_BATCH_RECORDS) {
            format::encode_batch(chunk, &mut out);
        }
        out
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// The file's length.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// Smallest `at_ms`, or `None` when empty.
    pub(crate) fn min_at(&self) -> Option<u64> {
        (self.count > 0).then_some(self.min_at)
    }
}
