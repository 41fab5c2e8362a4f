//! A snapshot file's bytes: the framed header and chunks, then the state inside as a shard
//! group's and as the cluster map's (both versioned layouts).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = nearby_raft::store::state_machine::decode_snapshot_bytes(data);
    let _ = nearby_raft::GroupState::decode_versioned(data);
    let _ = nearby_raft::ClusterMap::decode_versioned(data);
});
