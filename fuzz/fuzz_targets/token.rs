//! A session token as a client presents it in `Hello`: any string, checked against a real key.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nearby_index::geo::Millis;
use nearby_node::auth::{TokenSigner, TokenVerifier};

fn verifier() -> &'static TokenVerifier {
    static V: OnceLock<TokenVerifier> = OnceLock::new();
    V.get_or_init(|| TokenSigner::generate().expect("a signing key").verifier())
}

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        let _ = verifier().verify(token, Millis(1_700_000_000_000));
    }
});
