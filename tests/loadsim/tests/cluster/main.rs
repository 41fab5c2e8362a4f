//! Cluster tests on real processes: every node is a `nearby-node` process with its own data
//! directory on its own loopback address ([`nearby_loadsim::cluster`]); clients are the SDK over
//! real QUIC. Nothing here is threads pretending to be nodes. The `nearby-node` binary is the one
//! `cargo test --workspace` builds next to this test.

mod test_basic;
mod test_failover;
mod test_hibernate;
mod test_operate;
mod test_product;
mod util;
