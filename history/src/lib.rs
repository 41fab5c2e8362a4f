//! nearby's location history: every accepted location of a user, kept in an append-only segment
//! store on real files, separate from the Raft log. A user reads their own history by time range
//! and can delete all of it — a real deletion, after which no file holds a byte of it. Old
//! history goes by age and by a size budget.
//!
//! There is one [`HistoryStore`] per shard group per node, each in its own directory, with one
//! writer: writes take `&mut self` and block on `fdatasync`, so the node calls the store from a
//! blocking thread. History is local to the node that accepted the locations; it is not
//! replicated (the Raft log is the replicated state; this is a per-node record of what that node
//! accepted).
//!
//! # Layout
//!
//! - `format` (private): the byte format — headers, batches, records, sealed
//!   segments with their sparse index. Pure functions on byte slices, no I/O.
//! - `active` (private): the active segment — appends, the in-memory per-user index, torn-tail
//!   recovery.
//! - `sealed` (private): sealed segments — mapped with `memmap2`, checked, searched.
//! - `store` (private): [`HistoryStore`] — the directory, recovery on open, sealing, deletion,
//!   retention: everything whose crash-safety depends on the order of file operations.
//! - [`error`] holds [`HistoryError`], the typed error of every operation.
//!
//! # Files
//!
//! ```text
//! DIR/LOCK                          held with flock while a store is open
//! DIR/00000000000000000007.seg      sealed segments, immutable, sorted by (user, at_ms)
//! DIR/00000000000000000008.active   the active segment (exactly one), batches in arrival order
//! DIR/*.tmp                         a file being written; removed by open
//! ```
//!
//! The number is the segment's sequence number; a sealed segment keeps the number of the active
//! segment it came from, and the next active segment takes the next one. The directory is
//! created with mode 0700 and files with 0600: they hold where people were.
//!
//! # Format
//!
//! Little-endian, fixed-size 32-byte records (`user u64, at_ms u64, lat f64, lon f64`), a
//! 64-byte header in every file with magic `NBHISTRY`, version, kind, sequence number and its
//! own CRC32. The active segment is a list of batches, each with its own header (magic, count,
//! CRC32 over the batch): one `append` is one batch, so a batch is the unit that is either whole
//! or torn. A sealed segment holds the records sorted by `(user, at_ms)` followed by a sparse
//! index with one entry per block of 64 records (the block's first key and the CRC32 of the
//! block); its header adds the record count, min/max time and the CRC32 of the index. The exact
//! layout is in the `format` module's doc. No general-purpose serializer is involved: the
//! layout is the contract, and fixed-size records make offsets arithmetic.
//!
//! # Writing
//!
//! [`HistoryStore::append`] validates the whole batch first (NaN or out-of-range coordinates
//! refuse it, nothing is written), then does one `pwrite` of the encoded batch at the end of the
//! active segment and one `fdatasync`, then adds the records' offsets to the per-user index
//! (user → offsets, plus the user's min/max time), so reading a user's records in the active
//! segment never scans it. Records may arrive out of time order; nothing relies on the order.
//! The index costs about 4 bytes per record of the active segment plus a map entry per user
//! (about 1 MiB for a full 8 MiB segment); sealed segments cost no memory beyond their maps.
//!
//! # Sealing
//!
//! When the active segment passes `segment_bytes` (or retention finds it too old, see below) it
//! is *sealed*: its records are read back and checked, sorted by `(user, at_ms)` (stable, so
//! equal keys stay in arrival order) and written with their sparse index to `N.seg.tmp`, which is
//! fsynced and renamed to `N.seg`; the directory is fsynced; `N+1.active` is created; `N.active`
//! is removed and the directory fsynced again. A crash before the rename leaves a temp file
//! (removed on open); after it, `N.active` beside `N.seg` (open removes the active file, since the
//! sealed one is complete). Sealing is synchronous inside the `append` that crossed the
//! threshold: one sort and one write of a segment (8 MiB by default).
//!
//! # Reading
//!
//! [`HistoryStore::read`] skips sealed segments whose min/max time lie outside the range, binary
//! searches the sparse index of the others for `(user, since)`, checks each block it touches
//! against its CRC and scans forward while the user and time match; then reads the user's records
//! of the active segment by their indexed offsets. The result is sorted by time (stable, so equal
//! times come in arrival order) and cut to `limit`.
//!
//! # Deleting
//!
//! [`HistoryStore::delete_user`] rewrites every segment that holds the user: a sealed one without
//! the user's contiguous run (a new sealed file with a new index, or an unlink when nothing else
//! is left), the active one without the user's records (its index rebuilt). Each rewrite goes to a
//! temp file, is fsynced and renamed over the old file, then the directory is fsynced, so a crash
//! leaves each file either old or new, never half-written; calling it again completes it. The
//! guarantee is about *files*: afterwards the bytes of every file in the directory hold none of
//! the user's records. Blocks the filesystem freed are not overwritten, and the filesystem's
//! journal, snapshots or an SSD's remapped cells may keep copies; full erasure of the medium
//! needs encryption at rest (with the key destroyed), which is outside this crate.
//!
//! # Retention
//!
//! [`HistoryStore::enforce_retention`] removes whole sealed segments only, never rewriting one:
//! first those whose newest record (`max_at`) is older than `max_age`, then the oldest ones while
//! the directory's total exceeds `max_bytes`. The active segment is never removed; instead, if its
//! oldest record is older than `seal_after` (default one day), retention seals it first, so a
//! quiet store whose active segment never fills still ages out: a record is removed at most
//! `max_age` plus about `seal_after` after its time. Times are the records' `at_ms`, so callers
//! must stamp them with a sane clock: a record far in the future keeps its segment alive until
//! the size budget removes it. The size budget counts the files the store owns (segments, not the
//! empty LOCK); removing a segment is one unlink, so writes are not held up.
//!
//! # Recovery
//!
//! On open, temp files are removed, an already-sealed active file is removed, every sealed
//! segment's header, length and index CRC are checked (block CRCs are checked whenever a block is
//! read or rewritten), and the active segment's batches are walked to rebuild its index. The
//! first batch that is incomplete or fails its CRC ends the valid prefix:
//!
//! - if no intact batch follows it, it is a torn write — the last batch, never acknowledged
//!   because its `fdatasync` had not returned — and it is cut off (`ftruncate` + fsync);
//! - if an intact batch follows it, acknowledged data is damaged: open fails with
//!   [`HistoryError::Corrupt`] and changes nothing.
//!
//! Sealed segments are never modified by recovery. One that fails its checks is *quarantined*:
//! kept as it is, not read, logged at `warn`, counted in [`StoreStats::corrupt_segments`] and
//! listed in [`RecoveryReport::corrupt_segments`]. A damaged block found later fails the read that
//! touches it with [`HistoryError::Corrupt`]. Retention removes quarantined segments like others
//! (by age when their header is intact, by size always); [`HistoryStore::delete_user`] reports
//! [`HistoryError::DeletionIncomplete`] while one exists, since it may hold the user's records.
//!
//! # Failure contract
//!
//! A failure before a file is renamed or unlinked changes nothing and is returned. A failure
//! after the directory changed (a rename or unlink whose directory fsync failed, or an append
//! whose write or `fdatasync` failed — after which the page cache cannot be trusted) *poisons*
//! the store: every later write fails with [`HistoryError::Poisoned`] until the store is reopened,
//! which recovers from the files. Reads keep working from the in-memory state.
//!
//! # Memory maps and SIGBUS
//!
//! Sealed segments are read through read-only `memmap2` maps. A map raises SIGBUS if its file is
//! truncated underneath it, so: only this store writes in its directory — [`HistoryStore::open`]
//! takes an exclusive `flock` on `DIR/LOCK` and fails with [`HistoryError::Locked`] if another
//! store (in this process or another) holds it — and the store never modifies a sealed file in
//! place: it writes a new file and renames it over the old one, or unlinks it, and both keep the
//! mapped inode intact until the map is dropped. No other process or tool may write, truncate or
//! `fallocate` files in the directory while a store has it open.
//!
//! # Call contract
//!
//! 1. Open each directory with exactly one [`HistoryStore`]; call it from a blocking thread
//!    (`tokio::task::spawn_blocking` or a dedicated thread): every write waits for `fdatasync`.
//! 2. [`append`](HistoryStore::append) batches of accepted locations; `Ok` means durable.
//! 3. Call [`enforce_retention`](HistoryStore::enforce_retention) periodically (every few
//!    minutes) with the wall clock's `now_ms`.
//! 4. After [`HistoryError::Poisoned`], DO NOT keep writing: drop the store and open it again.

mod active;
pub mod error;
mod format;
mod sealed;
mod store;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::error::HistoryError;

/// Entry points for fuzzing the decoders of segment files (`fuzz/`): they read bytes exactly
/// as opening a store does, and must never panic, hang or allocate without bound.
#[doc(hidden)]
pub mod fuzz {
    use crate::format;

    /// An active segment's bytes, scanned as recovery scans them.
    pub fn active_segment(bytes: &[u8]) -> usize {
        let mut records = 0;
        let _ = format::scan_active(bytes, |_, _| records += 1);
        records
    }

    /// A sealed segment's bytes: the header and index checked, then every block and record read.
    pub fn sealed_segment(bytes: &[u8]) -> usize {
        let Ok(h) = format::check_sealed(bytes) else {
            return 0;
        };
        let mut records = 0;
        for b in 0..format::block_count(h.count, h.block_records) as usize {
            let _ = format::index_entry(bytes, &h, b);
            if let Ok(block) = format::check_block(bytes, &h, b) {
                records += block
                    .chunks_exact(format::RECORD_LEN)
                    .map(format::decode_record)
                    .count();
            }
        }
        records
    }
}
pub use crate::store::HistoryStore;

/// One accepted location of a user.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The user.
    pub user: u64,
    /// When the location was taken, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Latitude in degrees, `-90.0..=90.0`.
    pub lat: f64,
    /// Longitude in degrees, `-180.0..=180.0`.
    pub lon: f64,
}

impl Record {
    /// Refuses non-finite or out-of-range coordinates; `index` is the record's place in its batch.
    fn validate(&self, index: usize) -> Result<(), HistoryError> {
        if !(self.lat.is_finite() && (-90.0..=90.0).contains(&self.lat)) {
            return Err(HistoryError::InvalidRecord {
                index,
                field: "lat",
                value: self.lat,
            });
        }
        if !(self.lon.is_finite() && (-180.0..=180.0).contains(&self.lon)) {
            return Err(HistoryError::InvalidRecord {
                index,
                field: "lon",
                value: self.lon,
            });
        }
        Ok(())
    }
}

/// Tunables of a [`HistoryStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// The active segment is sealed once it grows past this many bytes (more than 64, at most
    /// 1 GiB). Default 8 MiB.
    pub segment_bytes: u64,
    /// Sealed segments whose newest record is older than this are removed by retention.
    /// Default 30 days.
    pub max_age: Duration,
    /// Retention removes the oldest sealed segments while the directory holds more than this
    /// many bytes; at least `segment_bytes`. Default 1 GiB.
    pub max_bytes: u64,
    /// Retention seals the active segment once its oldest record is older than this, so records
    /// of a quiet store still age out (at most about `max_age + seal_after` after their time).
    /// Default 1 day.
    pub seal_after: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            segment_bytes: 8 << 20,
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_bytes: 1 << 30,
            seal_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// `segment_bytes` is capped so record offsets in the active segment fit in `u32`.
const MAX_SEGMENT_BYTES: u64 = 1 << 30;

impl StoreConfig {
    fn validate(&self) -> Result<(), HistoryError> {
        let why = if self.segment_bytes <= format::HEADER_LEN as u64 || self.segment_bytes > MAX_SEGMENT_BYTES
        {
            format!("segment_bytes {} is not in 65..=1 GiB", self.segment_bytes)
        } else if self.max_bytes < self.segment_bytes {
            format!(
                "max_bytes {} is smaller than segment_bytes {}",
                self.max_bytes, self.segment_bytes
            )
        } else {
            return Ok(());
        };
        Err(HistoryError::InvalidConfig { why })
    }
}

/// What [`HistoryStore::delete_user`] or [`HistoryStore::delete_before`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteStats {
    /// Records deleted.
    pub records_removed: u64,
    /// Segments rewritten without the records (the active one included).
    pub segments_rewritten: usize,
    /// Sealed segments removed because nothing else was left in them.
    pub segments_removed: usize,
}

/// What [`HistoryStore::enforce_retention`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionStats {
    /// Whether the active segment was sealed because its oldest record passed `seal_after`.
    pub sealed_active: bool,
    /// Sealed segments removed.
    pub segments_removed: usize,
    /// Records in them (unknown for a quarantined segment with a damaged header: counted as 0).
    pub records_removed: u64,
    /// Their bytes.
    pub bytes_removed: u64,
}

/// Counts of a [`HistoryStore`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    /// Readable sealed segments.
    pub sealed_segments: usize,
    /// Quarantined sealed segments (failed their checks at open; not read).
    pub corrupt_segments: usize,
    /// Records in the active segment.
    pub active_records: u64,
    /// Records in all segments (those of quarantined segments with a damaged header not counted).
    pub records: u64,
    /// Bytes of all segment files.
    pub bytes: u64,
}

/// What [`HistoryStore::open`] found and repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Sealed segment files found (readable or not).
    pub sealed_segments: usize,
    /// Sealed segments that failed their checks and are quarantined.
    pub corrupt_segments: Vec<std::path::PathBuf>,
    /// Bytes cut off the end of the active segment (a torn, unacknowledged batch).
    pub torn_tail_bytes: u64,
    /// Temp files of interrupted writes that were removed.
    pub removed_temp_files: usize,
    /// Active segments removed because their sealed twin was complete (an interrupted seal).
    pub removed_stale_active: usize,
}
