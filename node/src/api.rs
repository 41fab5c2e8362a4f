//! The client service's contract with the layer behind it: the [`Backend`] trait the QUIC
//! sessions call, and the types both sides share — [`ServiceError`] (what a request's failure
//! looks like to a client), [`SessionSink`] (where a session's events go), [`LocationAck`],
//! [`Limits`] and the page helpers.
//!
//! The QUIC front end (`service/`) is written against [`Backend`] so the same sessions, framing,
//! authentication and limits can sit on nearby's cluster ([`crate::gateway::Gateway`]) or on
//! another storage and routing layer — the load simulator's baseline puts the original design's
//! Redis cache and per-user Pub/Sub channels behind it, so a comparison measures that layer and
//! nothing else. This module holds no logic of either.

use std::future::Future;
use std::sync::Arc;

use nearby_client::proto::{self, Coord, ErrorCode, FriendList, NearbyFriend, NearbyPage, Outcome};
use nearby_index::geo::{Millis, UserId};
use nearby_index::query::Cursor;
use nearby_raft::{Command, CommandError, CommandResult, ProposeError};

use crate::queue::{CloseReason, EventQueue};

/// What a location update answered (the SDK's type: the wire carries the same two answers).
pub use nearby_client::LocationAck;

/// A request's failure, as the client sees it: a stable code and a message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ServiceError {
    /// The stable code.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
}

impl ServiceError {
    /// An error with `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ServiceError {
            code,
            message: message.into(),
        }
    }

    /// `Unavailable`: retry later.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    /// The user's home group stopped being led here while the request was in it: the session
    /// moves, and the session layer does not answer the request but closes the session as
    /// moved, so the SDK sends it again to the group's new leader ([`ServiceError::is_moved`]).
    pub fn moved() -> Self {
        Self::unavailable(MOVED)
    }

    /// Whether this is [`ServiceError::moved`].
    pub fn is_moved(&self) -> bool {
        self.code == ErrorCode::Unavailable && self.message == MOVED
    }

    /// As the wire's error body.
    pub fn body(&self) -> proto::ErrorBody {
        proto::ErrorBody {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

/// The message of [`ServiceError::moved`].
const MOVED: &str = "this node no longer serves your home shard; reconnect";

/// How an error about a range that moved begins ([`ServiceError::range_moved`]).
const RANGE_MOVED: &str = "the user's range moved to another group";

impl ServiceError {
    /// Whether the command reached a group that no longer owns the user (the range split or
    /// merged after it was routed): it changed nothing and may be routed again.
    pub fn range_moved(&self) -> bool {
        self.code == ErrorCode::Unavailable && self.message.starts_with(RANGE_MOVED)
    }
}

impl From<ProposeError> for ServiceError {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::Invalid(CommandError::UnknownUser { user }) => {
                ServiceError::new(ErrorCode::UnknownUser, format!("unknown user {user}"))
            }
            // Routed by a map older than a split or merge of the range: worth a retry once
            // the map shows where the user lives now (see `Gateway::commit`).
            ProposeError::Invalid(e @ CommandError::OutOfRange { .. }) => {
                ServiceError::new(ErrorCode::Unavailable, format!("{RANGE_MOVED}: {e}"))
            }
            ProposeError::Invalid(e) => ServiceError::new(ErrorCode::InvalidArgument, e.to_string()),
            other => ServiceError::unavailable(other.to_string()),
        }
    }
}

/// The largest page a client may ask for; larger requests get this many.
pub const MAX_PAGE: u16 = 100;

/// Client-facing settings of a node.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Presence settings (radius, TTL).
    pub presence: crate::presence::PresenceConfig,
    /// Entries per page by default.
    pub page_size: u16,
    /// Events queued per session before positions are superseded.
    pub event_queue: usize,
    /// Sessions one user may have open on a node at once.
    pub sessions_per_user: usize,
    /// Load shedding: above these limits a share of periodic location updates is refused
    /// (`None`: never; see [`crate::service::overload`]).
    pub shed: Option<crate::service::overload::Limits>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            presence: crate::presence::PresenceConfig::default(),
            page_size: 20,
            event_queue: 256,
            sessions_per_user: 8,
            shed: Some(crate::service::overload::Limits::default()),
        }
    }
}

/// One connected session's handle, as the backend sees it.
#[derive(Clone)]
pub struct SessionSink {
    id: u64,
    /// Where the session's events go.
    pub events: Arc<EventQueue>,
}

impl std::fmt::Debug for SessionSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionSink")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SessionSink {
    /// A sink numbered `id` with its own queue.
    pub fn new(id: u64, events: Arc<EventQueue>) -> Self {
        SessionSink { id, events }
    }

    /// The session's number.
    pub fn id(&self) -> u64 {
        self.id
    }
}

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

/// How a backend answers a session's opening: serve it here, or send it elsewhere.
#[derive(Clone, Debug)]
pub enum Admission {
    /// Served here; events go to the sink.
    Open(SessionSink),
    /// This node does not serve the user; the client should connect to `addr`.
    Redirect {
        /// `host:port` of the node that does.
        addr: String,
        /// Why, for logs.
        reason: String,
    },
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

    /// A session of `user` opens: served here (events go to the returned sink) or redirected.
    fn open_session(&self, user: UserId) -> impl Future<Output = Result<Admission, ServiceError>> + Send;

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

    /// A page of the user's relations: those with users after `after`, at most `limit` users.
    fn friends(
        &self,
        user: UserId,
        after: Option<UserId>,
        limit: usize,
    ) -> impl Future<Output = Result<FriendList, ServiceError>> + Send;

    /// `user`'s own location history with `since <= at < until`, oldest first, at most `limit`.
    fn read_history(
        &self,
        user: UserId,
        since: Millis,
        until: Millis,
        limit: usize,
    ) -> impl Future<Output = Result<proto::HistoryPage, ServiceError>> + Send;

    /// Deletes all of `user`'s location history (committed, then purged from every node).
    fn delete_history(&self, user: UserId) -> impl Future<Output = Result<(), ServiceError>> + Send;

    /// The nearest strangers of `user` (who listens to them from then on in this session).
    fn strangers(
        &self,
        user: UserId,
        page_size: Option<u16>,
    ) -> impl Future<Output = Result<proto::StrangerPage, ServiceError>> + Send;

    /// Commits a relation or settings change. `Ok` means acknowledged: never lost, and for a
    /// change that ends someone's permission to see the acting user, nothing more about the
    /// acting user reaches them.
    fn commit(&self, cmd: Command) -> impl Future<Output = Result<CommandResult, ServiceError>> + Send;

    /// Changes a session user's search radius.
    fn set_radius(&self, user: UserId, meters: u32) -> impl Future<Output = Result<(), ServiceError>> + Send;

    /// Periodic work (expiry); called a few times a second.
    fn tick(&self);

    /// Closes every session's event queue with `reason` (shutdown).
    fn close_all(&self, reason: CloseReason);
}

/// A page request's cursor, parsed, and its size: the default if none, clamped to
/// `1..=MAX_PAGE` (100 entries with the longest names still fit a 64 KiB frame).
pub fn page_request(
    cursor: Option<&str>,
    page_size: Option<u16>,
    default: u16,
) -> Result<(Option<Cursor>, usize), ServiceError> {
    let cursor = cursor
        .map(Cursor::from_token)
        .transpose()
        .map_err(|e| ServiceError::new(ErrorCode::InvalidArgument, e.to_string()))?;
    Ok((cursor, page_size.unwrap_or(default).clamp(1, MAX_PAGE) as usize))
}

/// An index page, the entries' display names and each entry's relation to the viewer, as the
/// wire's page.
pub fn wire_page(
    page: nearby_index::query::Page,
    names: Vec<String>,
    relation: impl Fn(UserId) -> proto::Relation,
) -> NearbyPage {
    NearbyPage {
        friends: page
            .entries
            .iter()
            .zip(names)
            .map(|(e, name)| NearbyFriend {
                id: e.user,
                relation: relation(e.user),
                name,
                distance_m: e.distance_m,
                updated_at: e.updated_at,
            })
            .collect(),
        next: page.next.map(|c| c.to_token()),
    }
}

/// Maps a command's result to the wire's outcome.
pub fn outcome(r: &CommandResult) -> Outcome {
    match r {
        CommandResult::FriendRequestSent => Outcome::FriendRequestSent,
        CommandResult::FriendshipFormed => Outcome::FriendshipFormed,
        CommandResult::AlreadyFriends => Outcome::AlreadyFriends,
        CommandResult::FriendRemoved => Outcome::FriendRemoved,
        CommandResult::Unchanged | CommandResult::AlreadyRegistered => Outcome::Unchanged,
        CommandResult::Registered
        | CommandResult::Updated
        | CommandResult::Imported { .. }
        | CommandResult::Split { .. }
        | CommandResult::Rejected(_) => Outcome::Updated,
    }
}
