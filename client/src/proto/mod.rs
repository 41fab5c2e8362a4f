//! The nearby wire protocol: every message a client and a node exchange, and the frame codec.
//! No I/O lives here: the node's service and the SDK each own the QUIC streams and feed bytes
//! through [`frame::FrameBuffer`].
//!
//! # Connection
//!
//! QUIC (TLS 1.3) with ALPN [`ALPN`]. The client opens one bidirectional *control stream* and
//! sends [`Request`]s on it, each framed with a client-chosen [`RequestId`]; the node answers each
//! with a [`Response`] carrying the same id, in order. The first request MUST be
//! [`Request::Hello`]. After the `Welcome`, the node opens one unidirectional *event stream* and
//! pushes [`Event`]s on it, in order.
//!
//! Why a stream for events and not QUIC datagrams: events that end visibility ("left range",
//! "gone") must never be lost or overtaken by an older "moved", and a reliable ordered stream gives
//! that for free; the node bounds what it queues per session and drops *superseded* locations
//! first, so a slow client costs bounded memory (see `docs/protocol.md`).
//!
//! See `docs/protocol.md` for the start-up exchange and every error code.

pub mod frame;
pub mod message;

pub use self::frame::{FrameBuffer, FrameError, MAX_FRAME_LEN};
pub use self::message::*;

/// ALPN protocol id of the client protocol.
pub const ALPN: &[u8] = b"nearby/1";

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 2;
