//! End-to-end tests of one node over real QUIC on loopback: the SDK (or raw frames, for bad
//! input) against a node started in-process on real files, with an injected clock.

mod bad_input;
mod disk;
mod driver;
mod guard;
mod live;
mod product;
mod protocol_doc;
mod util;
