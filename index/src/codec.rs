//! The one place the project turns values into bytes and back.
//!
//! Owns the wire/disk encoding of every serde type in the workspace: today bincode 2.0.1 with
//! its `standard()` configuration (little endian, varint integers). bincode is unmaintained
//! (RUSTSEC-2025-0141); keeping every call here means swapping it for a successor (wincode,
//! postcard, …) touches this file only. No other module, and no other crate, may call bincode
//! directly. This module never does I/O: it reads from slices and appends to `Vec<u8>`.
//!
//! Decoding is defensive: it is bounded by [`MAX_DECODE_BYTES`] (a length prefix claiming a
//! huge collection is rejected before anything that large is allocated) and it rejects trailing
//! bytes, so every accepted input is exactly one value.

use bincode::config::{self, Config};
use bincode::error::{DecodeError, EncodeError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::CodecError;

/// The most memory a single [`decode`] may claim for collections and strings (256 MiB).
pub const MAX_DECODE_BYTES: usize = 256 * 1024 * 1024;

fn encode_config() -> impl Config {
    config::standard()
}

/// Appends to a `Vec<u8>`; avoids going through `std::io::Write`.
struct VecWriter<'a>(&'a mut Vec<u8>);

impl bincode::enc::write::Writer for VecWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

fn encode_error(e: EncodeError) -> CodecError {
    CodecError::Encode {
        reason: e.to_string(),
    }
}

/// Encodes `value` into a fresh buffer.
///
/// # Errors
/// [`CodecError::Encode`] if the serialiser rejects the value.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut buf = Vec::new();
    encode_into(value, &mut buf)?;
    Ok(buf)
}

/// Appends the encoding of `value` to `buf` and returns the number of bytes written.
///
/// On error, `buf` is restored to its previous length.
///
/// # Errors
/// [`CodecError::Encode`] if the serialiser rejects the value.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, buf: &mut Vec<u8>) -> Result<usize, CodecError> {
    let before = buf.len();
    match bincode::serde::encode_into_writer(value, VecWriter(buf), encode_config()) {
        Ok(()) => Ok(buf.len() - before),
        Err(e) => {
            buf.truncate(before);
            Err(encode_error(e))
        }
    }
}

/// Decodes exactly one `T` from `bytes`.
///
/// # Errors
/// - [`CodecError::TooLarge`] if the input claims more than [`MAX_DECODE_BYTES`] of memory;
/// - [`CodecError::Decode`] if the bytes are truncated or otherwise not a valid `T` (including
///   values that fail the type's own validation, e.g. an out-of-range latitude);
/// - [`CodecError::TrailingBytes`] if a value decodes but bytes are left over.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode_with_limit::<T, MAX_DECODE_BYTES>(bytes)
}

/// [`decode`] with a smaller bound on what the bytes may claim: network frames use their own
/// frame limit, so a 10-byte frame announcing a 200 MB string fails before anything that large
/// is allocated.
pub fn decode_with_limit<T: DeserializeOwned, const LIMIT: usize>(bytes: &[u8]) -> Result<T, CodecError> {
    let config = config::standard().with_limit::<LIMIT>();
    match bincode::serde::decode_from_slice::<T, _>(bytes, config) {
        Ok((value, consumed)) if consumed == bytes.len() => Ok(value),
        Ok((_, consumed)) => Err(CodecError::TrailingBytes {
            consumed,
            trailing: bytes.len() - consumed,
        }),
        Err(DecodeError::LimitExceeded) => Err(CodecError::TooLarge {
            total: bytes.len(),
            limit: LIMIT,
        }),
        Err(e) => Err(CodecError::Decode {
            total: bytes.len(),
            reason: e.to_string(),
        }),
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64url without padding (RFC 4648 §5), for tokens carried in text.
pub fn base64url_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(B64[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// Decodes [`base64url_encode`]'s output; `None` for anything else (including non-canonical
/// trailing bits).
pub fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let sextet = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        }))
    };
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 2);
    for chunk in s.as_bytes().chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= sextet(*c)? << (18 - 6 * i);
        }
        let bytes = chunk.len() - 1;
        // Canonical form only: the unused low bits of a short final chunk must be zero.
        if n & ((1u32 << (24 - 8 * bytes)) - 1) != 0 {
            return None;
        }
        out.extend((0..bytes).map(|i| (n >> (16 - 8 * i)) as u8));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        id: u64,
        name: String,
        values: Vec<i32>,
        flag: Option<bool>,
    }

    fn sample() -> Sample {
        Sample {
            id: 42,
            name: "ünïcode".into(),
            values: vec![-1, 0, 1, i32::MAX],
            flag: Some(true),
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let bytes = encode(&s).unwrap();
        assert_eq!(decode::<Sample>(&bytes).unwrap(), s);
    }

    #[test]
    fn encode_into_appends_and_counts() {
        let mut buf = vec![0xAA, 0xBB];
        let n = encode_into(&sample(), &mut buf).unwrap();
        assert_eq!(buf.len(), 2 + n);
        assert_eq!(&buf[..2], &[0xAA, 0xBB]);
        assert_eq!(decode::<Sample>(&buf[2..]).unwrap(), sample());
        // Unsized values encode too.
        let n = encode_into("abc", &mut buf).unwrap();
        assert_eq!(n, 4);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encode(&sample()).unwrap();
        for cut in 0..bytes.len() {
            let err = decode::<Sample>(&bytes[..cut]).unwrap_err();
            assert!(matches!(err, CodecError::Decode { .. }), "cut {cut}: {err:?}");
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = encode(&sample()).unwrap();
        let len = bytes.len();
        bytes.extend_from_slice(&[0, 1, 2]);
        assert_eq!(
            decode::<Sample>(&bytes).unwrap_err(),
            CodecError::TrailingBytes {
                consumed: len,
                trailing: 3
            }
        );
    }

    #[test]
    fn huge_length_prefix_is_rejected_without_allocating() {
        // varint tag 0xFD = u64 follows: a Vec<u64> claiming 2^60 elements, with no data.
        let mut bytes = vec![0xFD];
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        // If either decode trusted the prefix, it would try to allocate 8 EiB and abort.
        // Sequences: serde pre-allocates at most a small, "cautious" capacity, so decoding runs
        // out of input long before memory.
        let err = decode::<Vec<u64>>(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::Decode { .. }), "{err:?}");
        // Strings and byte buffers are claimed up front, against MAX_DECODE_BYTES.
        let err = decode::<String>(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::TooLarge { .. }), "{err:?}");
        let err = decode::<crate::friends::FriendSet>(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::TooLarge { .. }), "{err:?}");
    }

    #[test]
    fn base64url_round_trip() {
        for len in 0..20u8 {
            let bytes: Vec<u8> = (0..len).map(|i| i.wrapping_mul(97).wrapping_add(251)).collect();
            assert_eq!(base64url_decode(&base64url_encode(&bytes)).unwrap(), bytes);
        }
        assert_eq!(base64url_encode(b"\xfb\xff"), "-_8");
        assert_eq!(base64url_decode("-_9"), None); // non-canonical trailing bits
    }
}
