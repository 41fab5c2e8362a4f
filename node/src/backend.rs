//! What the client service needs from the layer that stores and routes locations.
//!
//! The QUIC front end (`service/`) is written against this trait so the same sessions, framing,
//! authentication and limits can sit on nearby's shard groups ([`crate::core::Core`]) or on
//! another storage and routing layer — the load simulator's baseline puts the original design's
//! Redis cache and per-user Pub/Sub channels behind it, so a comparison measures that layer and
//! nothing else.

use std::future::Future;

use nearby_client::proto::{Coord, FriendList, NearbyPage};
use nearby_index::geo::{Millis, UserId};
use nearby_raft::{Command, CommandResult};

use crate::core::{LocationAck, ServiceError, SessionSink};

/// Session parameters a backend announces in `Welcome`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// The search radius in force, metres.
    pub radius_m: f64,
    /// Inactivity timeout, seconds.
    pub ttl_s: u32,
    /// Default page size.
    pub page_size: u16,
}

/// The storage and routing layer behind the client service. Every method acts for an
/// authenticated user; argument checks that concern the wire (coordinates, cursors) are the
/// backend's to make, with the stable error codes.
pub trait Backend: Send + Sync + 'static {
    /// The current time on the backend's clock.
    fn now(&self) -> Millis;

    /// Session parameters.
    fn limits(&self) -> Limits;

    /// Registers `user` if it has no record (a token-bearing user exists by definition).
    fn ensure_registered(&self, user: UserId) -> impl Future<Output = Result<(), ServiceError>> + Send;

    /// A session of `user` opened: events for the user go to the returned sink.
    fn open_session(&self, user: UserId) -> impl Future<Output = Result<SessionSink, ServiceError>> + Send;

    /// A session closed.
    fn close_session(&self, user: UserId, sink: SessionSink) -> impl Future<Output = ()> + Send;

    /// Whether the backend holds a live location of `user`.
    fn has_location(&self, user: UserId) -> impl Future<Output = bool> + Send;

    /// Stores and publishes a location; `first` asks for the first page.
    fn update_location(
        &self,
        user: UserId,
        at: Coord,
        first: bool,
    ) -> impl Future<Output = Result<LocationAck, ServiceError>> + Send;

    /// A page of the friends `user` sees.
    fn list(
        &self,
        user: UserId,
        cursor: Option<String>,
        page_size: Option<u16>,
    ) -> impl Future<Output = Result<NearbyPage, ServiceError>> + Send;

    /// The user's relations.
    fn friends(&self, user: UserId) -> impl Future<Output = Result<FriendList, ServiceError>> + Send;

    /// Commits a relation or settings change.
    fn commit(&self, cmd: Command) -> impl Future<Output = Result<CommandResult, ServiceError>> + Send;

    /// Changes a session user's search radius.
    fn set_radius(&self, user: UserId, meters: u32) -> impl Future<Output = Result<(), ServiceError>> + Send;

    /// Periodic work (expiry); called a few times a second.
    fn tick(&self);

    /// Closes every session's event queue with `reason` (shutdown).
    fn close_all(&self, reason: &'static str);
}
