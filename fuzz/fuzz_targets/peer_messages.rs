//! Node-to-node messages: Raft RPCs and their answers, peer requests and answers, and the
//! messages groups send one another.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nearby_index::codec::decode;

fuzz_target!(|data: &[u8]| {
    let _ = decode::<nearby_raft::transport::RpcRequest>(data);
    let _ = decode::<nearby_raft::transport::RpcResponse>(data);
    let _ = decode::<nearby_node::route::peer::PeerRequest>(data);
    let _ = decode::<nearby_node::route::peer::PeerResponse>(data);
    let _ = decode::<nearby_node::messages::GroupMessage>(data);
});
