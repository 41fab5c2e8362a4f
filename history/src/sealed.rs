//! Sealed segments: immutable files of records sorted by `(user, at_ms)` with a sparse index,
//! read through a read-only memory map.
//!
//! This module maps, checks and reads sealed files. It never writes one: a sealed file is written
//! whole by the store (temp file, fsync, rename) and afterwards only replaced by another rename or
//! unlinked, never modified in place — which is what makes the map safe (see the crate doc).

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::HistoryError;
use crate::format::{self, Header, HEADER_LEN, RECORD_LEN};
use crate::Record;

/// A sealed segment that passed its open-time checks.
#[derive(Debug)]
pub(crate) struct Sealed {
    path: PathBuf,
    map: Mmap,
    header: Header,
}

/// A sealed segment that failed its open-time checks. It is kept on disk as it is, not read,
/// and reported; retention may still remove it.
#[derive(Debug)]
pub(crate) struct Quarantined {
    pub(crate) path: PathBuf,
    /// The file's length.
    pub(crate) bytes: u64,
    /// Records and newest time, when the header itself is intact.
    pub(crate) count: Option<u64>,
    pub(crate) max_at: Option<u64>,
    /// Where the damage is and what it is.
    pub(crate) offset: u64,
    pub(crate) why: &'static str,
}

/// What opening a sealed segment found.
#[derive(Debug)]
pub(crate) enum Opened {
    Healthy(Sealed),
    Corrupt(Quarantined),
}

impl Sealed {
    /// Maps and checks the sealed segment at `path`, whose file name says it is number `seq`.
    /// Checks the header, the length and the sparse index; block checksums are checked when
    /// blocks are read.
    pub(crate) fn open(path: &Path, seq: u64) -> Result<Opened, HistoryError> {
        let io = |e| HistoryError::io(path, e);
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let quarantine = |offset, why, header: Option<Header>| {
            Opened::Corrupt(Quarantined {
                path: path.to_path_buf(),
                bytes: len,
                count: header.map(|h| h.count),
                max_at: header.map(|h| h.max_at),
                offset,
                why,
            })
        };
        if len < HEADER_LEN as u64 {
            return Ok(quarantine(len, "file shorter than the segment header", None));
        }
        // SAFETY: the map is read-only and the file is never modified or truncated while it is
        // mapped: only this store writes in its directory (it holds the directory's LOCK), and it
        // writes a sealed file once, under a temporary name, before renaming it into place.
        // Afterwards the file is only replaced by a rename or unlinked, and both keep the mapped
        // inode and its bytes alive until the map is dropped. Anything else that truncates the
        // file would raise SIGBUS; the crate doc states that no other process may write here.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = Header::decode(&map).ok();
        let header = match format::check_sealed(&map) {
            Ok(h) => h,
            Err((offset, why)) => return Ok(quarantine(offset, why, header)),
        };
        if header.seq != seq {
            return Ok(quarantine(
                16,
                "header sequence number differs from the file name",
                Some(header),
            ));
        }
        Ok(Opened::Healthy(Sealed {
            path: path.to_path_buf(),
            map,
            header,
        }))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length.
    pub(crate) fn bytes(&self) -> u64 {
        self.map.len() as u64
    }

    pub(crate) fn count(&self) -> u64 {
        self.header.count
    }

    pub(crate) fn max_at(&self) -> u64 {
        self.header.max_at
    }

    /// Whether any record's time may lie in `lo..=hi` (by the segment's min/max time).
    pub(crate) fn overlaps(&self, lo: u64, hi: u64) -> bool {
        self.header.min_at <= hi && self.header.max_at >= lo
    }

    fn corrupt(&self, (offset, why): (u64, &'static str)) -> HistoryError {
        HistoryError::corrupt(&self.path, offset, why)
    }

    /// Calls `f(record_number, record_bytes)` for each record of `user` with
    /// `lo <= at_ms <= hi`, in file order: binary search of the sparse index for the block where
    /// `(user, lo)` would start, then a forward scan. Every block touched is checked against its
    /// checksum.
    fn scan(&self, user: u64, lo: u64, hi: u64, mut f: impl FnMut(usize, &[u8])) -> Result<(), HistoryError> {
        let h = &self.header;
        let blocks = format::block_count(h.count, h.block_records) as usize;
        let lower = (user, lo);
        // First block whose first key is >= lower; the run may start in the block before it.
        let (mut a, mut b) = (0, blocks);
        while a < b {
            let mid = a + (b - a) / 2;
            if format::index_entry(&self.map, h, mid).0 < lower {
                a = mid + 1;
            } else {
                b = mid;
            }
        }
        let n = h.block_records as usize;
        for block in a.saturating_sub(1)..blocks {
            let bytes = format::check_block(&self.map, h, block).map_err(|e| self.corrupt(e))?;
            for (i, rec) in bytes.chunks_exact(RECORD_LEN).enumerate() {
                let key = format::record_key(rec);
                if key < lower {
                    continue;
                }
                if key.0 != user || key.1 > hi {
                    return Ok(());
                }
                f(block * n + i, rec);
            }
        }
        Ok(())
    }

    /// Appends to `out` the records of `user` with `lo <= at_ms <= hi`, ascending by time.
    pub(crate) fn read(
        &self,
        user: u64,
        lo: u64,
        hi: u64,
        out: &mut Vec<Record>,
    ) -> Result<(), HistoryError> {
        self.scan(user, lo, hi, |_, rec| out.push(format::decode_record(rec)))
    }

    /// Record numbers of the records of `user` with `lo <= at_ms <= hi` (contiguous, since the
    /// segment is sorted by `(user, at_ms)`).
    pub(crate) fn run(&self, user: u64, lo: u64, hi: u64) -> Result<Range<usize>, HistoryError> {
        let mut run: Option<Range<usize>> = None;
        self.scan(user, lo, hi, |i, _| match &mut run {
            Some(r) => r.end = i + 1,
            None => run = Some(i..i + 1),
        })?;
        Ok(run.unwrap_or(0..0))
    }

    /// Every record, in file order, checking every block.
    pub(crate) fn records(&self) -> Result<Vec<Record>, HistoryError> {
        let h = &self.header;
        let blocks = format::block_count(h.count, h.block_records) as usize;
        let mut out = Vec::with_capacity(h.count as usize);
        for block in 0..blocks {
            let bytes = format::check_block(&self.map, h, block).map_err(|e| self.corrupt(e))?;
            out.extend(bytes.chunks_exact(RECORD_LEN).map(format::decode_record));
        }
        Ok(out)
    }
}
