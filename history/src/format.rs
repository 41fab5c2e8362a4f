//! The byte format of segment files: encoding and checking of byte slices, nothing else. This
//! module never touches a file; [`crate::active`] and [`crate::sealed`] do the I/O and call it.
//!
//! All integers are little-endian. Offsets below are from the start of the file.
//!
//! ```text
//! header (64 bytes, both kinds)
//!    0  magic  b"NBHISTRY"            8  version u16 (= 1)        10  kind u16 (1 active, 2 sealed)
//!   12  block_records u32             16  seq u64                 24  count u64
//!   32  min_at u64                    40  max_at u64              48  index_crc u32
//!   52  reserved, zero (8 bytes)      60  crc32 of bytes 0..60
//!   (an active segment's header holds zeros in block_records..index_crc: its content is
//!    described by its batches, and the header is never rewritten)
//!
//! record (32 bytes): user u64 | at_ms u64 | lat f64 bits | lon f64 bits
//!
//! active body: batches, back to back from byte 64
//!   batch header (16 bytes): magic b"HBAT" | count u32 (1..=MAX_BATCH_RECORDS)
//!                            | crc32(count bytes ++ records) u32 | reserved u32 (zero)
//!   then `count` records in arrival order
//!
//! sealed body: `count` records sorted by (user, at_ms), from byte 64,
//!   then the sparse index: one 24-byte entry per block of `block_records` records:
//!   first user u64 | first at_ms u64 | crc32 of the block's record bytes u32 | reserved u32
//!   `index_crc` in the header is the crc32 of the whole index.
//! ```
//!
//! A block's position is implied by its entry's number (`HEADER_LEN + b * block_records *
//! RECORD_LEN`), so the index stores no offsets.

use crate::Record;

/// First bytes of every segment file.
pub(crate) const MAGIC: [u8; 8] = *b"NBHISTRY";
/// The only format version this code reads and writes.
pub(crate) const VERSION: u16 = 1;
/// Length of the segment header.
pub(crate) const HEADER_LEN: usize = 64;
/// Length of one encoded record.
pub(crate) const RECORD_LEN: usize = 32;
/// First bytes of every batch of an active segment.
pub(crate) const BATCH_MAGIC: [u8; 4] = *b"HBAT";
/// Length of a batch header.
pub(crate) const BATCH_HEADER_LEN: usize = 16;
/// Largest number of records in one batch (2 MiB of records).
pub(crate) const MAX_BATCH_RECORDS: usize = 65_536;
/// Records per block of a sealed segment: one sparse-index entry and one checksum per block.
pub(crate) const BLOCK_RECORDS: u32 = 64;
/// Length of one sparse-index entry.
pub(crate) const INDEX_ENTRY_LEN: usize = 24;

/// Which of the two file layouts a segment has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Append-only batches in arrival order.
    Active,
    /// Sorted records and a sparse index, written once.
    Sealed,
}

impl Kind {
    fn code(self) -> u16 {
        match self {
            Kind::Active => 1,
            Kind::Sealed => 2,
        }
    }

    fn from_code(code: u16) -> Option<Kind> {
        match code {
            1 => Some(Kind::Active),
            2 => Some(Kind::Sealed),
            _ => None,
        }
    }
}

/// The decoded segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) kind: Kind,
    /// The segment's sequence number (also in its file name).
    pub(crate) seq: u64,
    /// Sealed only: records in the segment.
    pub(crate) count: u64,
    /// Sealed only: smallest `at_ms`.
    pub(crate) min_at: u64,
    /// Sealed only: largest `at_ms`.
    pub(crate) max_at: u64,
    /// Sealed only: records per block.
    pub(crate) block_records: u32,
    /// Sealed only: crc32 of the sparse index.
    pub(crate) index_crc: u32,
}

impl Header {
    /// The header of a new active segment.
    pub(crate) fn active(seq: u64) -> Header {
        Header {
            kind: Kind::Active,
            seq,
            count: 0,
            min_at: 0,
            max_at: 0,
            block_records: 0,
            index_crc: 0,
        }
    }

    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&self.kind.code().to_le_bytes());
        b[12..16].copy_from_slice(&self.block_records.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.count.to_le_bytes());
        b[32..40].copy_from_slice(&self.min_at.to_le_bytes());
        b[40..48].copy_from_slice(&self.max_at.to_le_bytes());
        b[48..52].copy_from_slice(&self.index_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks the header at the start of `b`.
    pub(crate) fn decode(b: &[u8]) -> Result<Header, &'static str> {
        if b.len() < HEADER_LEN {
            return Err("file shorter than the segment header");
        }
        if b[0..8] != MAGIC {
            return Err("bad magic: not a history segment");
        }
        if le32(b, 60) != crc32fast::hash(&b[0..60]) {
            return Err("header checksum mismatch");
        }
        if le16(b, 8) != VERSION {
            return Err("unsupported segment format version");
        }
        let kind = Kind::from_code(le16(b, 10)).ok_or("unknown segment kind")?;
        if b[52..60].iter().any(|&x| x != 0) {
            return Err("reserved header bytes are not zero");
        }
        Ok(Header {
            kind,
            block_records: le32(b, 12),
            seq: le64(b, 16),
            count: le64(b, 24),
            min_at: le64(b, 32),
            max_at: le64(b, 40),
            index_crc: le32(b, 48),
        })
    }
}

/// Reads a `u16` at `at`; the caller has checked that `b` is long enough.
fn le16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

/// Reads a `u32` at `at`; the caller has checked that `b` is long enough.
fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Reads a `u64` at `at`; the caller has checked that `b` is long enough.
fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Appends the 32 bytes of `r` to `out`.
pub(crate) fn encode_record(r: &Record, out: &mut Vec<u8>) {
    out.extend_from_slice(&r.user.to_le_bytes());
    out.extend_from_slice(&r.at_ms.to_le_bytes());
    out.extend_from_slice(&r.lat.to_bits().to_le_bytes());
    out.extend_from_slice(&r.lon.to_bits().to_le_bytes());
}

/// Decodes the record in the first 32 bytes of `b`; the caller has checked the length.
pub(crate) fn decode_record(b: &[u8]) -> Record {
    Record {
        user: le64(b, 0),
        at_ms: le64(b, 8),
        lat: f64::from_bits(le64(b, 16)),
        lon: f64::from_bits(le64(b, 24)),
    }
}

/// The `(user, at_ms)` sort key of the record in the first 16 bytes of `b`.
pub(crate) fn record_key(b: &[u8]) -> (u64, u64) {
    (le64(b, 0), le64(b, 8))
}

/// Bytes taken by a batch of `count` records, header included.
pub(crate) fn batch_len(count: usize) -> usize {
    BATCH_HEADER_LEN + count * RECORD_LEN
}

fn batch_crc(count_bytes: &[u8], records: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(count_bytes);
    h.update(records);
    h.finalize()
}

/// Appends one batch holding `records` (at most [`MAX_BATCH_RECORDS`], at least one) to `out`.
pub(crate) fn encode_batch(records: &[Record], out: &mut Vec<u8>) {
    debug_assert!(!records.is_empty() && records.len() <= MAX_BATCH_RECORDS);
    let start = out.len();
    out.reserve(batch_len(records.len()));
    out.extend_from_slice(&BATCH_MAGIC);
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 8]); // crc, filled below, and the reserved word
    for r in records {
        encode_record(r, out);
    }
    let crc = batch_crc(&out[start + 4..start + 8], &out[start + BATCH_HEADER_LEN..]);
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

/// Checks the batch that starts at the beginning of `b` (`b` runs to the end of the file).
/// Returns its record count, or why it is not a complete, intact batch.
pub(crate) fn check_batch(b: &[u8]) -> Result<usize, &'static str> {
    if b.len() < BATCH_HEADER_LEN {
        return Err("truncated batch header");
    }
    if b[0..4] != BATCH_MAGIC {
        return Err("bad batch magic");
    }
    let count = le32(b, 4) as usize;
    if count == 0 || count > MAX_BATCH_RECORDS {
        return Err("batch record count out of range");
    }
    if le32(b, 12) != 0 {
        return Err("reserved batch bytes are not zero");
    }
    let len = batch_len(count);
    if b.len() < len {
        return Err("truncated batch");
    }
    if le32(b, 8) != batch_crc(&b[4..8], &b[BATCH_HEADER_LEN..len]) {
        return Err("batch checksum mismatch");
    }
    Ok(count)
}

/// Where the valid prefix of an active segment ends and why.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Damage {
    /// Offset of the first batch that is not complete and intact.
    pub(crate) offset: usize,
    /// What is wrong with it.
    pub(crate) why: &'static str,
    /// Offset of an intact batch found *after* the damage, if any. Then the damage is not a torn
    /// write (only the last, unacknowledged batch can be torn) but corruption of acknowledged
    /// data.
    pub(crate) intact_batch_after: Option<usize>,
}

/// Walks the batches of an active segment (`file` includes the 64-byte header, already checked)
/// and calls `on_record(offset, record)` for each record of the valid prefix, in file order.
/// Returns the length of the valid prefix and the damage that ends it, if any.
pub(crate) fn scan_active(file: &[u8], mut on_record: impl FnMut(usize, Record)) -> (usize, Option<Damage>) {
    let mut pos = HEADER_LEN;
    while pos < file.len() {
        match check_batch(&file[pos..]) {
            Ok(count) => {
                let first = pos + BATCH_HEADER_LEN;
                for i in 0..count {
                    let at = first + i * RECORD_LEN;
                    on_record(at, decode_record(&file[at..]));
                }
                pos += batch_len(count);
            }
            Err(why) => {
                // Batches start 16-byte aligned (header 64, batch header 16, records 32), so a
                // later intact batch can only start at an aligned offset.
                let intact_batch_after = (pos + BATCH_HEADER_LEN..file.len())
                    .step_by(BATCH_HEADER_LEN)
                    .find(|&p| file[p..].starts_with(&BATCH_MAGIC) && check_batch(&file[p..]).is_ok());
                return (
                    pos,
                    Some(Damage {
                        offset: pos,
                        why,
                        intact_batch_after,
                    }),
                );
            }
        }
    }
    (pos, None)
}

/// Number of blocks of a sealed segment of `count` records.
pub(crate) fn block_count(count: u64, block_records: u32) -> u64 {
    count.div_ceil(u64::from(block_records))
}

/// Length of a sealed segment file, or `None` when it would not fit in `usize`.
fn sealed_len(count: u64, block_records: u32) -> Option<usize> {
    let data = count.checked_mul(RECORD_LEN as u64)?;
    let index = block_count(count, block_records).checked_mul(INDEX_ENTRY_LEN as u64)?;
    let total = (HEADER_LEN as u64).checked_add(data)?.checked_add(index)?;
    usize::try_from(total).ok()
}

/// Encodes a sealed segment holding `records`, which must be non-empty and sorted by
/// `(user, at_ms)`.
pub(crate) fn encode_sealed(seq: u64, records: &[Record]) -> Vec<u8> {
    debug_assert!(!records.is_empty());
    debug_assert!(records
        .windows(2)
        .all(|w| (w[0].user, w[0].at_ms) <= (w[1].user, w[1].at_ms)));
    let count = records.len() as u64;
    let n = BLOCK_RECORDS as usize;
    let len = sealed_len(count, BLOCK_RECORDS).unwrap_or(0);
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    for r in records {
        encode_record(r, &mut out);
    }
    let mut index = Vec::with_capacity(records.len().div_ceil(n) * INDEX_ENTRY_LEN);
    for (b, block) in records.chunks(n).enumerate() {
        let start = HEADER_LEN + b * n * RECORD_LEN;
        let crc = crc32fast::hash(&out[start..start + block.len() * RECORD_LEN]);
        index.extend_from_slice(&block[0].user.to_le_bytes());
        index.extend_from_slice(&block[0].at_ms.to_le_bytes());
        index.extend_from_slice(&crc.to_le_bytes());
        index.extend_from_slice(&[0u8; 4]);
    }
    let header = Header {
        kind: Kind::Sealed,
        seq,
        count,
        min_at: records.iter().map(|r| r.at_ms).min().unwrap_or(0),
        max_at: records.iter().map(|r| r.at_ms).max().unwrap_or(0),
        block_records: BLOCK_RECORDS,
        index_crc: crc32fast::hash(&index),
    };
    out[0..HEADER_LEN].copy_from_slice(&header.encode());
    out.extend_from_slice(&index);
    out
}

/// Checks what can be checked of a sealed segment without reading its records: the header, the
/// file length implied by it, and the sparse index's checksum. Block checksums are checked when a
/// block is read ([`check_block`]). On failure returns the offset of the damage and why.
pub(crate) fn check_sealed(file: &[u8]) -> Result<Header, (u64, &'static str)> {
    let h = Header::decode(file).map_err(|why| (0, why))?;
    if h.kind != Kind::Sealed {
        return Err((10, "not a sealed segment"));
    }
    if h.count == 0 || h.block_records == 0 || h.min_at > h.max_at {
        return Err((12, "impossible sealed header values"));
    }
    match sealed_len(h.count, h.block_records) {
        Some(len) if len == file.len() => {}
        _ => return Err((file.len() as u64, "file length does not match the header")),
    }
    let index = index_start(&h);
    if crc32fast::hash(&file[index..]) != h.index_crc {
        return Err((index as u64, "sparse index checksum mismatch"));
    }
    Ok(h)
}

/// Offset of the sparse index of a checked sealed segment.
pub(crate) fn index_start(h: &Header) -> usize {
    HEADER_LEN + h.count as usize * RECORD_LEN
}

/// Sparse-index entry `b` of a checked sealed segment: the key of the block's first record and
/// the block's checksum.
pub(crate) fn index_entry(file: &[u8], h: &Header, b: usize) -> ((u64, u64), u32) {
    let at = index_start(h) + b * INDEX_ENTRY_LEN;
    ((le64(file, at), le64(file, at + 8)), le32(file, at + 16))
}

/// Byte range of block `b`'s records in a checked sealed segment.
pub(crate) fn block_range(h: &Header, b: usize) -> std::ops::Range<usize> {
    let n = h.block_records as usize;
    let first = b * n;
    let last = (first + n).min(h.count as usize);
    HEADER_LEN + first * RECORD_LEN..HEADER_LEN + last * RECORD_LEN
}

/// Checks block `b` of a checked sealed segment against its index entry and returns its bytes.
pub(crate) fn check_block<'a>(file: &'a [u8], h: &Header, b: usize) -> Result<&'a [u8], (u64, &'static str)> {
    let range = block_range(h, b);
    let (_, crc) = index_entry(file, h, b);
    let bytes = &file[range.clone()];
    if crc32fast::hash(bytes) != crc {
        return Err((range.start as u64, "block checksum mismatch"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(user: u64, at_ms: u64) -> Record {
        Record {
            user,
            at_ms,
            lat: 1.5,
            lon: -2.25,
        }
    }

    #[test]
    fn header_round_trips_and_detects_damage() {
        let h = Header::active(42);
        let b = h.encode();
        assert_eq!(Header::decode(&b), Ok(h));
        for i in 0..HEADER_LEN {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert!(Header::decode(&bad).is_err(), "flip at {i} not detected");
        }
        assert!(Header::decode(&b[..63]).is_err());
    }

    #[test]
    fn batch_round_trips_and_rejects_every_truncation() {
        let records = [rec(1, 10), rec(2, 20), rec(1, 30)];
        let mut out = Vec::new();
        encode_batch(&records, &mut out);
        assert_eq!(out.len(), batch_len(3));
        assert_eq!(check_batch(&out), Ok(3));
        for cut in 0..out.len() {
            assert!(check_batch(&out[..cut]).is_err(), "cut at {cut} accepted");
        }
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 1;
            assert!(check_batch(&bad).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn scan_tells_torn_tail_from_damage_in_the_middle() {
        let mut file = Header::active(1).encode().to_vec();
        encode_batch(&[rec(1, 1)], &mut file);
        let first_end = file.len();
        encode_batch(&[rec(2, 2), rec(3, 3)], &mut file);
        let mut seen = Vec::new();
        let (len, damage) = scan_active(&file, |_, r| seen.push(r));
        assert_eq!((len, damage, seen.len()), (file.len(), None, 3));

        let torn = &file[..file.len() - 5];
        let (len, damage) = scan_active(torn, |_, _| {});
        assert_eq!(len, first_end);
        assert_eq!(damage.map(|d| d.intact_batch_after), Some(None));

        let mut middle = file.clone();
        middle[HEADER_LEN + BATCH_HEADER_LEN + 3] ^= 0xff;
        let (len, damage) = scan_active(&middle, |_, _| {});
        assert_eq!(len, HEADER_LEN);
        assert_eq!(damage.map(|d| d.intact_batch_after), Some(Some(first_end)));
    }

    #[test]
    fn sealed_segment_checks_and_indexes_blocks() {
        let records: Vec<Record> = (0..200).map(|i| rec(i / 10, i)).collect();
        let file = encode_sealed(7, &records);
        let h = check_sealed(&file).expect("valid segment");
        assert_eq!((h.seq, h.count, h.min_at, h.max_at), (7, 200, 0, 199));
        assert_eq!(block_count(h.count, h.block_records), 4);
        for b in 0..4 {
            let bytes = check_block(&file, &h, b).expect("intact block");
            let ((user, at), _) = index_entry(&file, &h, b);
            assert_eq!(record_key(bytes), (user, at));
        }
        let mut bad = file.clone();
        bad[HEADER_LEN + 5] ^= 1;
        assert!(
            check_sealed(&bad).is_ok(),
            "data damage is found per block, not at open"
        );
        assert!(check_block(&bad, &h, 0).is_err());
        let mut bad_index = file.clone();
        let last = bad_index.len() - 10;
        bad_index[last] ^= 1;
        assert!(check_sealed(&bad_index).is_err());
        assert!(check_sealed(&file[..file.len() - 1]).is_err());
    }
}
