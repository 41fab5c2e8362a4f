//! A WAL segment file's bytes, replayed as recovery replays them (as the newest segment, where
//! a torn tail is cut, and as a sealed one, where all damage is corruption).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = nearby_raft::wal::replay_bytes(data, true);
    let _ = nearby_raft::wal::replay_bytes(data, false);
});
