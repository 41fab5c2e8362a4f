//! [`ClientError`]: every way an SDK call can fail, typed so an app can decide what to do —
//! show the node's message, retry later, log in again, or give up.
//!
//! The error is `Clone` because one failure (a dropped connection) is reported to every request
//! that was in flight and to the event stream at once.

use std::sync::Arc;

use crate::proto::{ErrorBody, ErrorCode, FrameError};

/// Why an SDK call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The node refused the request with a stable [`ErrorCode`] and a human message; nothing
    /// changed on the node.
    #[error("{0}")]
    Server(ErrorBody),

    /// The configuration cannot work (bad endpoint syntax, no usable certificate, …).
    #[error("invalid client configuration: {0}")]
    Config(String),

    /// The coordinates were refused before anything was sent (NaN, infinite, |lat| > 90 or
    /// |lon| > 180).
    #[error("invalid coordinates ({lat}, {lon}): {reason}")]
    InvalidCoordinates {
        /// The latitude given.
        lat: f64,
        /// The longitude given.
        lon: f64,
        /// What is wrong with them.
        reason: String,
    },

    /// The endpoint's host name did not resolve to an address.
    #[error("cannot resolve {endpoint}: {source}")]
    Resolve {
        /// The `host:port` that was looked up.
        endpoint: String,
        /// What the resolver said.
        #[source]
        source: Arc<std::io::Error>,
    },

    /// The QUIC connection could not be set up or was lost (includes TLS failures such as an
    /// untrusted certificate, and the node closing the connection).
    #[error("connection to {endpoint} failed: {reason}")]
    Connect {
        /// The `host:port` connected to.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },

    /// Connecting and authenticating did not finish in time.
    #[error("timed out after {after_ms} ms while {during}")]
    Timeout {
        /// What the client was doing.
        during: &'static str,
        /// How long it waited, in milliseconds.
        after_ms: u64,
    },

    /// The node answered something the protocol does not allow here (a bug on one side, or a
    /// version mismatch).
    #[error("protocol violation: {0}")]
    Protocol(String),

    /// The node kept redirecting: more hops than the client follows.
    #[error("too many redirects ({hops}); last pointed to {last}")]
    TooManyRedirects {
        /// Hops followed.
        hops: u32,
        /// The last address the node named.
        last: String,
    },

    /// The connection dropped while the request was in flight: it may or may not have been
    /// applied. The client is reconnecting; retry once it has (see [`ClientError::is_retryable`]).
    #[error("connection lost while the request was in flight: {reason}")]
    ConnectionLost {
        /// Why the connection ended.
        reason: String,
    },

    /// The client is between connections (reconnecting with backoff): the request was not
    /// sent. Retry after [`crate::SdkEvent::Resumed`].
    #[error("not connected: reconnecting")]
    Reconnecting,

    /// The client has stopped for good: closed by the app, or it gave up reconnecting.
    #[error("client closed")]
    Closed,
}

impl ClientError {
    /// Whether the same call may succeed if retried later, unchanged: lost connections,
    /// reconnections, timeouts, and the node's `unavailable`, `rate_limited` and `internal`.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Server(body) => matches!(
                body.code,
                ErrorCode::Unavailable | ErrorCode::RateLimited | ErrorCode::Internal
            ),
            ClientError::Resolve { .. }
            | ClientError::Connect { .. }
            | ClientError::Timeout { .. }
            | ClientError::ConnectionLost { .. }
            | ClientError::Reconnecting
            // Nodes redirect one another while a leadership moves; it settles in moments.
            | ClientError::TooManyRedirects { .. } => true,
            ClientError::Config(_)
            | ClientError::InvalidCoordinates { .. }
            | ClientError::Protocol(_)
            | ClientError::Closed => false,
        }
    }

    /// The node's error code, when the node refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(body) => Some(body.code),
            _ => None,
        }
    }

    /// A stable snake_case name for the kind of failure: the node's code name
    /// ([`ErrorCode::name`]) for [`ClientError::Server`], else the variant's name. What the CLI
    /// prints as `"code"`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            ClientError::Server(body) => body.code.name(),
            ClientError::Config(_) => "config",
            ClientError::InvalidCoordinates { .. } => "invalid_coordinates",
            ClientError::Resolve { .. } => "resolve",
            ClientError::Connect { .. } => "connect",
            ClientError::Timeout { .. } => "timeout",
            ClientError::Protocol(_) => "protocol",
            ClientError::TooManyRedirects { .. } => "too_many_redirects",
            ClientError::ConnectionLost { .. } => "connection_lost",
            ClientError::Reconnecting => "reconnecting",
            ClientError::Closed => "closed",
        }
    }

    /// Whether retrying after a fresh login may help (the token expired or was refused).
    pub fn needs_login(&self) -> bool {
        matches!(
            self.code(),
            Some(ErrorCode::TokenExpired | ErrorCode::TokenInvalid | ErrorCode::NotAuthenticated)
        )
    }
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}
