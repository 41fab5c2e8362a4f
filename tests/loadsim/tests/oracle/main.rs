//! The oracle judged through real parts: the SDK over real QUIC against the real client service
//! (`nearby_node::service::Service`), backed by toy backends whose faults are known — one that
//! leaks, one that drops every tenth push, one that is correct — and by the real nearby node.

mod node;
mod toy;
mod toys;
mod util;
