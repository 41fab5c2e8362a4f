//! Length-prefixed frames: a 4-byte big-endian payload length, then the payload (one message
//! encoded with `nearby_index::codec`).
//!
//! The length is checked against the limit *before* anything is allocated for the payload, so a
//! hostile peer announcing a 4 GiB frame costs nothing. Parsing works on byte slices and returns
//! [`FrameError::Incomplete`] until a whole frame is there; only the callers touch sockets.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The largest payload a frame may carry, in bytes, in either direction.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Bytes of the length prefix.
pub const PREFIX_LEN: usize = 4;

/// Why bytes are not (yet) a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// More bytes are needed.
    #[error("incomplete frame")]
    Incomplete,
    /// The announced payload is larger than the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The payload does not decode as the expected message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A message could not be encoded (a bug, or a message over the limit).
    #[error("cannot encode a frame: {0}")]
    Encode(String),
}

/// Appends `msg` as one frame to `out`.
pub fn encode<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; PREFIX_LEN]);
    let len = match nearby_index::codec::encode_into(msg, out) {
        Ok(n) => n,
        Err(e) => {
            out.truncate(start);
            return Err(FrameError::Encode(e.to_string()));
        }
    };
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    out[start..start + PREFIX_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Encodes `msg` as one frame.
pub fn to_bytes<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode(msg, &mut out)?;
    Ok(out)
}

/// Checks whether `buf` starts with a whole frame; returns its total length (prefix included).
pub fn check(buf: &[u8]) -> Result<usize, FrameError> {
    let Some(prefix) = buf.get(..PREFIX_LEN) else {
        return Err(FrameError::Incomplete);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    if buf.len() < PREFIX_LEN + len {
        return Err(FrameError::Incomplete);
    }
    Ok(PREFIX_LEN + len)
}

/// Parses the frame at the start of `buf`: the message and the bytes it used.
pub fn parse<T: DeserializeOwned>(buf: &[u8]) -> Result<(T, usize), FrameError> {
    let total = check(buf)?;
    let msg = nearby_index::codec::decode_with_limit::<T, MAX_FRAME_LEN>(&buf[PREFIX_LEN..total])
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    Ok((msg, total))
}

/// Accumulates bytes read from a stream and yields whole messages. Holds at most one frame plus
/// one read's worth of bytes; an oversized length is refused as soon as its prefix arrives.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    start: usize,
}

impl FrameBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `Ok(None)` if more bytes are needed. After an error the stream is
    /// unusable (frame boundaries are lost) and MUST be closed.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match parse(&self.buf[self.start..]) {
            Ok((msg, used)) => {
                self.start += used;
                if self.start > MAX_FRAME_LEN {
                    self.buf.drain(..self.start);
                    self.start = 0;
                }
                Ok(Some(msg))
            }
            Err(FrameError::Incomplete) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Frees the buffer if every byte in it was consumed, so that a stream between messages
    /// holds no memory (a server keeps one per connection, mostly idle).
    pub fn release_if_consumed(&mut self) {
        if self.start == self.buf.len() {
            self.buf = Vec::new();
            self.start = 0;
        }
    }

    /// Bytes buffered but not yet consumed.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Request, RequestFrame};

    #[test]
    fn frames_round_trip_byte_by_byte() {
        let msgs = vec![
            RequestFrame {
                id: 1,
                request: Request::Ping,
            },
            RequestFrame {
                id: 2,
                request: Request::SetName { name: "Ann".into() },
            },
        ];
        let mut bytes = Vec::new();
        for m in &msgs {
            encode(m, &mut bytes).expect("encode");
        }
        let mut fb = FrameBuffer::new();
        let mut got = Vec::new();
        for b in bytes {
            fb.extend(&[b]);
            while let Some(m) = fb.next_frame::<RequestFrame>().expect("parse") {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
        assert_eq!(fb.pending(), 0);
    }

    #[test]
    fn a_consumed_buffer_is_released_and_a_partial_one_kept() {
        let mut bytes = Vec::new();
        for id in [1, 2] {
            encode(
                &RequestFrame {
                    id,
                    request: Request::Ping,
                },
                &mut bytes,
            )
            .expect("encode");
        }
        let mut fb = FrameBuffer::new();
        // The first frame and half of the second.
        let cut = bytes.len() - 2;
        fb.extend(&bytes[..cut]);
        let first = fb.next_frame::<RequestFrame>().expect("parse").expect("a frame");
        assert_eq!(first.id, 1);
        fb.release_if_consumed();
        assert!(fb.pending() > 0, "a partial frame was dropped");
        fb.extend(&bytes[cut..]);
        let second = fb.next_frame::<RequestFrame>().expect("parse").expect("a frame");
        assert_eq!(second.id, 2);
        fb.release_if_consumed();
        assert_eq!(fb.buf.capacity(), 0);
        assert_eq!(fb.pending(), 0);
    }

    #[test]
    fn an_oversized_prefix_is_refused_before_the_payload_arrives() {
        let mut fb = FrameBuffer::new();
        fb.extend(&u32::MAX.to_be_bytes());
        assert_eq!(
            fb.next_frame::<RequestFrame>(),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: MAX_FRAME_LEN
            })
        );
    }

    #[test]
    fn error_codes_travel_as_their_numbers() {
        use crate::proto::ErrorCode;
        for code in ErrorCode::ALL {
            let bytes = nearby_index::codec::encode(&code).expect("encode");
            let n: u16 = nearby_index::codec::decode(&bytes).expect("as u16");
            assert_eq!(n, code as u16);
            assert_eq!(
                nearby_index::codec::decode::<ErrorCode>(&bytes).expect("back"),
                code
            );
        }
        let unknown = nearby_index::codec::encode(&999u16).expect("encode");
        assert!(nearby_index::codec::decode::<ErrorCode>(&unknown).is_err());
    }

    #[test]
    fn a_frame_claiming_a_huge_string_fails_without_allocating_it() {
        // A 9-byte payload: Request::SetName (variant 9) whose name claims 200 MB.
        let mut payload = vec![1u8, 9, 0xfc];
        payload.extend_from_slice(&200_000_000u32.to_le_bytes());
        let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        assert!(parse::<RequestFrame>(&bytes).is_err());
    }

    #[test]
    fn garbage_is_malformed() {
        let mut bytes = 3u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            parse::<RequestFrame>(&bytes),
            Err(FrameError::Malformed(_))
        ));
    }
}
