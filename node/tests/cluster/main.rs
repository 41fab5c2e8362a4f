//! Cluster tests on real processes: every node is a `nearby-node` process with its own data
//! directory on its own loopback address; clients are the SDK over real QUIC. Nothing here is
//! threads pretending to be nodes.

mod test_basic;
mod test_failover;
mod util;
