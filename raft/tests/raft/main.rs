//! Integration tests of nearby's replicated store, through real parts: real files in temp
//! directories, real QUIC connections on loopback, openraft's own store suite.

mod cluster;
mod commands;
mod store_suite;
mod util;
mod wal;
