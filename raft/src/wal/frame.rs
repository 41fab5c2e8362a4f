//! The WAL's on-disk framing: segment headers and checksummed records, parsed from byte slices.
//!
//! A segment file is a 16-byte header — the magic `NRBYWAL2` and the segment's id (u64 LE) —
//! followed by records. A record is a 12-byte header and a payload:
//!
//! ```text
//! +-------------+-----------------+----------------+----------------+
//! | len: u32 LE | payload crc: u32 | header crc: u32 | payload (len) |
//! +-------------+-----------------+----------------+----------------+
//! ```
//!
//! The header crc covers the first 8 bytes, so a corrupted length is caught before it is trusted;
//! the payload crc covers the payload. Both are CRC-32 (IEEE).
//!
//! This module only looks at bytes: it never touches a file (see [`super::Wal`] for that).

/// The magic at the start of every segment file. Format 2: entries carry a [`crate::Payload`]
/// (shard or meta) and members carry a [`crate::NodeInfo`].
pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"NRBYWAL2";

/// The magic of format 1, recognised only to say why it cannot be read.
pub(crate) const OLD_SEGMENT_MAGIC: &[u8; 8] = b"NRBYWAL1";

/// Bytes of the segment header: magic and segment id.
pub(crate) const SEGMENT_HEADER_LEN: usize = 16;

/// Bytes of a record header.
pub(crate) const RECORD_HEADER_LEN: usize = 12;

/// The largest payload a record may have. Larger lengths are treated as corruption.
pub(crate) const MAX_RECORD_LEN: usize = 64 << 20;

/// Appends one framed record holding `payload` to `out`.
pub(crate) fn encode_record(payload: &[u8], out: &mut Vec<u8>) {
    // MAX_RECORD_LEN is checked by the caller; a payload this large never comes from one command.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut header = [0u8; RECORD_HEADER_LEN];
    header[0..4].copy_from_slice(&len.to_le_bytes());
    header[4..8].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let hcrc = crc32fast::hash(&header[0..8]);
    header[8..12].copy_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
}

/// Writes a segment header for segment `id`.
pub(crate) fn segment_header(id: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..16].copy_from_slice(&id.to_le_bytes());
    h
}

/// Reads the segment id from a segment header, if the header is well formed.
pub(crate) fn parse_segment_header(buf: &[u8]) -> Option<u64> {
    if buf.len() < SEGMENT_HEADER_LEN || &buf[0..8] != SEGMENT_MAGIC {
        return None;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&buf[8..16]);
    Some(u64::from_le_bytes(id))
}

/// What is found at an offset of a segment.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// A whole, valid record: its payload is `buf[payload.0..payload.1]`; the next record starts
    /// at `payload.1`.
    Record {
        /// Start and end of the payload.
        payload: (usize, usize),
    },
    /// The offset is exactly the end of the data.
    End,
    /// The bytes end inside the header or the payload.
    Incomplete,
    /// The header's checksum does not match, or its length is impossible.
    BadHeader,
    /// The header is valid but the payload's checksum does not match.
    BadPayload,
}

/// Checks the record starting at `offset` of `buf`.
pub(crate) fn check(buf: &[u8], offset: usize) -> Check {
    if offset == buf.len() {
        return Check::End;
    }
    let Some(header) = buf.get(offset..offset + RECORD_HEADER_LEN) else {
        return Check::Incomplete;
    };
    let word = |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (len, pcrc, hcrc) = (word(0) as usize, word(4), word(8));
    if crc32fast::hash(&header[0..8]) != hcrc || len > MAX_RECORD_LEN {
        return Check::BadHeader;
    }
    let start = offset + RECORD_HEADER_LEN;
    let Some(payload) = buf.get(start..start + len) else {
        return Check::Incomplete;
    };
    if crc32fast::hash(payload) != pcrc {
        return Check::BadPayload;
    }
    Check::Record {
        payload: (start, start + len),
    }
}

/// Whether any valid record starts after `offset`. Used on recovery to tell a torn tail (nothing
/// valid follows the damage: the write never completed) from corruption in the middle of
/// acknowledged data (something valid follows it).
pub(crate) fn any_record_after(buf: &[u8], offset: usize) -> bool {
    (offset + 1..buf.len()).any(|p| matches!(check(buf, p), Check::Record { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            encode_record(p, &mut out);
        }
        out
    }

    #[test]
    fn records_round_trip() {
        let buf = framed(&[b"one", b"", b"three"]);
        let mut at = 0;
        let mut seen = Vec::new();
        while let Check::Record { payload } = check(&buf, at) {
            seen.push(buf[payload.0..payload.1].to_vec());
            at = payload.1;
        }
        assert_eq!(check(&buf, at), Check::End);
        assert_eq!(seen, vec![b"one".to_vec(), b"".to_vec(), b"three".to_vec()]);
    }

    #[test]
    fn damage_is_classified() {
        let buf = framed(&[b"hello world", b"second"]);
        // Cut inside the second record: incomplete.
        let cut = &buf[..buf.len() - 2];
        let second = RECORD_HEADER_LEN + 11;
        assert_eq!(check(cut, second), Check::Incomplete);
        // Flip a payload byte of the first record: bad payload, and a valid record follows.
        let mut flipped = buf.clone();
        flipped[RECORD_HEADER_LEN + 3] ^= 0x40;
        assert_eq!(check(&flipped, 0), Check::BadPayload);
        assert!(any_record_after(&flipped, 0));
        // Flip a length byte: the header checksum catches it before the length is trusted.
        let mut bad_len = buf.clone();
        bad_len[1] ^= 0x01;
        assert_eq!(check(&bad_len, 0), Check::BadHeader);
        // Zeroes after the data are not a record.
        let mut zeros = buf.clone();
        zeros.extend_from_slice(&[0u8; 64]);
        assert_eq!(check(&zeros, buf.len()), Check::BadHeader);
        assert!(!any_record_after(&zeros, buf.len()));
    }

    #[test]
    fn segment_header_round_trips() {
        assert_eq!(parse_segment_header(&segment_header(42)), Some(42));
        assert_eq!(parse_segment_header(b"NOTAWAL!xxxxxxxx"), None);
    }
}
