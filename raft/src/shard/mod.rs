//! A shard group: the state machine of one range of user ids.
//!
//! - [`command`]: the typed commands a shard group accepts, their validation and results.
//! - [`state`]: the replicated records of the range's users and the deterministic `apply`.

pub mod command;
pub mod state;
