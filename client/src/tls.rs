//! The client's QUIC/TLS settings: TLS 1.3 only, rustls with the *ring* provider, ALPN
//! [`crate::proto::ALPN`], and only the roots the app configured (a dev node's self-signed
//! certificate, or the cluster's CA). Builds configuration; never opens a socket.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::error::ClientError;
use crate::proto::ALPN;

/// Flow-control window of each stream the client receives on: a 64 KiB frame and its header,
/// with room to spare.
const STREAM_WINDOW: u32 = 128 * 1024;

/// The NAT-safe interval: a QUIC PING goes out only when nothing has been received for this
/// long. RFC 9308 (§3.5) reports that a packet every 30 s keeps the UDP bindings of the great
/// majority of NATs and firewalls; 25 s leaves a margin. Location updates (every 10–30 s while
/// friends are around) and their answers restart the timer, so PINGs are sent only while the
/// node asks for slower updates (60–120 s, nobody around), never between every two updates.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(25);

/// The idle timeout of a connection by default: more than two keep-alive intervals, so one
/// lost PING (or its answer) does not end a healthy connection. A node that went silent is
/// noticed sooner by the request timeout of the next update.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The quinn client configuration trusting the certificates in `ca_pem`, with the default
/// liveness settings ([`DEFAULT_KEEP_ALIVE`], [`DEFAULT_IDLE_TIMEOUT`]).
pub fn client_config(ca_pem: &str) -> Result<quinn::ClientConfig, ClientError> {
    client_config_with(ca_pem, DEFAULT_KEEP_ALIVE, DEFAULT_IDLE_TIMEOUT)
}

/// The quinn client configuration trusting the certificates in `ca_pem`, sending a keep-alive
/// every `keep_alive` when idle and giving up on a node silent for `idle_timeout`.
pub fn client_config_with(
    ca_pem: &str,
    keep_alive: Duration,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| ClientError::Config(format!("bad PEM in the CA certificates: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| ClientError::Config(format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ClientError::Config(
            "no certificate to trust: the CA PEM holds no CERTIFICATE block".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
        .map_err(|e| ClientError::Config(format!("QUIC TLS setup: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config(keep_alive, idle_timeout)?));
    Ok(config)
}

/// Keep-alives well inside the idle timeout so a quiet session (no friend moving) stays up
/// through NATs, while a dead path is noticed within the idle timeout and triggers a reconnect.
fn transport_config(
    keep_alive: Duration,
    idle_timeout: Duration,
) -> Result<quinn::TransportConfig, ClientError> {
    if keep_alive.is_zero() || keep_alive >= idle_timeout {
        return Err(ClientError::Config(format!(
            "the keep-alive ({keep_alive:?}) must be positive and shorter than the idle timeout ({idle_timeout:?})"
        )));
    }
    let idle = quinn::IdleTimeout::try_from(idle_timeout)
        .map_err(|e| ClientError::Config(format!("idle timeout {idle_timeout:?}: {e}")))?;
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(keep_alive));
    t.max_idle_timeout(Some(idle));
    // Room for one largest frame per stream, not quinn's 1.25 MiB: an app that stops reading
    // its events holds at most this much of them, and the node's own bounded queue (which
    // closes a reader that cannot keep up) takes over instead of a phone buffering megabytes.
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(quinn::VarInt::from_u32(2 * STREAM_WINDOW));
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pem_without_certificates_is_a_config_error() {
        for pem in [
            "",
            "not a pem",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ] {
            assert!(
                matches!(client_config(pem), Err(ClientError::Config(_))),
                "{pem:?}"
            );
        }
    }
}
