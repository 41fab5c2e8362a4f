//! The nearby server: hosts shard groups and (from the next milestones on) the client-facing QUIC
//! service and the admin console.
//!
//! # Layout
//!
//! - [`auth`]: signed session tokens (Ed25519).
//! - [`backend`]: what the client service needs from the storage and routing layer.
//! - [`clock`]: injected time.
//! - [`config`]: the production configuration file (`nearby-node run --config`).
//! - [`core`]: joins shard groups, presence and sessions; every client operation.
//! - [`procstat`]: this process's CPU time from `/proc` (what load shedding watches).
//! - [`queue`]: the bounded per-session event queue.
//! - [`service`]: the client-facing QUIC service and its sessions.
//! - [`dev`]: `nearby-node dev`, a complete single-node cluster on defaults.
//! - [`node`]: one running node — groups, core and service started and stopped together.
//! - [`presence`]: live presence of a shard group — latest locations, subscriptions, what each
//!   online user sees — as a pure state machine.
//! - [`shutdown`]: the shutdown trigger (Ctrl-C or SIGTERM) shared by nearby's binaries.
//! - [`shards`]: how the user-id space is cut into shard-group ranges.
//!
//! The replicated store itself is the `nearby-raft` crate; the pure index is `nearby-index`.

pub mod auth;
pub mod backend;
pub mod clock;
pub mod config;
pub mod core;
pub mod dev;
pub mod node;
pub mod presence;
pub mod procstat;
pub mod queue;
pub mod service;
pub mod shards;
pub mod shutdown;
