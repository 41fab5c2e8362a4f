//! The nearby server: a node of the cluster. It hosts shard groups and (on some nodes) the meta
//! group, leads some of them, serves the clients whose home groups it leads, and forwards
//! locations to the groups of their friends, here or on other nodes.
//!
//! # Layout
//!
//! Data flows one way: session → home group's driver → router → destination groups' drivers →
//! sessions.
//!
//! - [`api`]: the client service's contract with the layer behind it (`Backend`, errors, sinks,
//!   pages).
//! - [`service`]: the client-facing QUIC service and its sessions.
//! - [`gateway`]: nearby's `Backend`: client operations, sent to drivers or proposed to groups.
//! - [`group`]: one driver (task and mailbox) per led group, and its intent delivery.
//! - [`presence`]: live presence of a shard group — latest locations, subscriptions, what each
//!   online user sees — as a pure state machine the driver runs.
//! - [`route`]: the cached cluster map ([`route::directory`]), node-to-node messages and their
//!   batching ([`route::peer`]), and local-or-remote delivery ([`route::router`]).
//! - [`cluster`]: init, join and restart; the map watcher; replicas and leadership; placement;
//!   liveness; answering peers.
//! - [`sessions`]: the sessions connected to this node, by user.
//! - [`queue`]: the bounded per-session event queue and its close reasons.
//! - [`node`]: one running node — store, cluster, gateway and service started and stopped
//!   together.
//! - [`config`]: the production configuration file (`nearby-node run --config`).
//! - [`secrets`]: key files: written 0600, never overwritten, refused when others can read them.
//! - [`dev`]: `nearby-node dev`, a complete cluster (one node, or several processes) on defaults.
//! - [`auth`]: signed session tokens (Ed25519).
//! - [`clock`]: injected time.
//! - [`procstat`]: this process's CPU time from `/proc` (what load shedding watches).
//! - [`memory`]: the allocator's free memory handed back to the system after large frees.
//! - [`shutdown`]: the shutdown trigger (Ctrl-C or SIGTERM) shared by nearby's binaries.
//!
//! The replicated store itself is the `nearby-raft` crate; the pure index is `nearby-index`.

pub mod admin;
pub mod api;
pub mod auth;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod dev;
pub mod gateway;
pub mod group;
pub mod history;
pub mod incarnation;
pub mod memory;
pub mod messages;
pub mod metrics;
pub mod node;
pub mod presence;
pub mod procstat;
pub mod queue;
pub mod route;
pub mod secrets;
pub mod service;
pub mod sessions;
pub mod shutdown;
pub mod strangers;
