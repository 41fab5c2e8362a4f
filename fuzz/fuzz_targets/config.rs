//! The node's configuration file: any text, parsed and validated as `nearby-node run` does.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = nearby_node::config::NodeConfig::parse(text, std::path::Path::new("fuzz.toml"), |_| None);
    }
});
