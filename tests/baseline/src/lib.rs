//! The baseline: the original "Nearby Friends" design, faithfully — connection servers holding
//! each user's session, a Redis location cache with a TTL, friend lists in Redis sets, and one
//! Redis Pub/Sub channel per user — behind nearby's own QUIC front end
//! (`nearby_node::service`), so that a comparison with nearby measures the storage and routing
//! layer and nothing else. `docs/baseline.md` says command by command what it does and where it
//! differs from the original.
//!
//! # Layout
//!
//! - [`keys`]: the Redis schema — key and channel names, the text of values and messages (pure).
//! - [`view`]: what one online user sees on this server; merges start-up reads with channel
//!   messages and decides events (pure state machine).
//! - [`pubsub`]: the pool of Redis Pub/Sub connections shared by all sessions, with the local
//!   `channel → users` table and bounded queues.
//! - [`backend`]: [`RedisBackend`], nearby's `Backend` trait on Redis.
//! - [`import`]: bulk load of a seed file with pipelined `MSET`/`SADD`.
//! - [`server`]: runs the QUIC service over the backend with dev login (the binary's body).

pub mod backend;
pub mod import;
pub mod keys;
pub mod pubsub;
pub mod server;
pub mod view;

pub use backend::{BaselineConfig, RedisBackend};

/// Why the baseline could not start or load its data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BaselineError {
    /// A Redis command or connection failed.
    #[error("redis: cannot {what}: {source}")]
    Redis {
        /// What was being done.
        what: &'static str,
        /// Redis's error.
        source: redis::RedisError,
    },
    /// The QUIC service could not start.
    #[error(transparent)]
    Service(#[from] nearby_node::service::ServiceStartError),
    /// A file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// Anything else about the setup.
    #[error("{0}")]
    Setup(String),
}

impl BaselineError {
    /// A mapper for `map_err` naming what failed.
    pub fn redis(what: &'static str) -> impl FnOnce(redis::RedisError) -> BaselineError {
        move |source| BaselineError::Redis { what, source }
    }
}
