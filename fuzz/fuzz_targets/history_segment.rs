//! A location-history segment file's bytes, as an active segment (scanned batch by batch) and
//! as a sealed one (header, sparse index, blocks, records).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = nearby_history::fuzz::active_segment(data);
    let _ = nearby_history::fuzz::sealed_segment(data);
});
