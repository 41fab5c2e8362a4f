//! openraft's storage traits, implemented as thin adapters: [`log::LogStore`] over the node's
//! shared [`crate::wal::Wal`], and [`state_machine::StateMachine`] over a group's
//! [`crate::Machine`] with snapshots in files.

pub mod log;
pub mod state_machine;

pub use self::log::LogStore;
pub use self::state_machine::{Applied, Shared, StateMachine};
