//! Where things are and how messages get there.
//!
//! - [`directory`]: the node's cached copy of the cluster map, and leader hints.
//! - [`peer`]: the messages nodes exchange, and the batching queue per peer.
//! - [`router`]: a group message or proposal to the group's driver here, or to its leader's node.

pub mod directory;
pub mod peer;
pub mod router;
