//! TLS identity of the client service: a certificate chain and key from PEM files, or a
//! self-signed certificate for dev mode (which `nearby-node dev` writes where the CLI trusts it).

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

mod quic;

/// Which QUIC transport settings the client service uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// nearby's settings for many small, mostly idle connections.
    #[default]
    Tuned,
    /// quinn's defaults (to measure the tuning against).
    QuinnDefaults,
}

/// The most a client connection may hold unacknowledged, bytes (the batched driver keeps it
/// nearer the congestion window: `driver::Conn::fit_send_window`).
pub(crate) const SEND_WINDOW: u64 = 512 * 1024;

/// A server certificate chain and its key.
pub struct ServerTls {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The chain as PEM, for clients to trust (dev).
    pub chain_pem: String,
}

impl ServerTls {
    /// A self-signed certificate for `localhost` and `127.0.0.1`.
    pub fn self_signed() -> Result<Self, String> {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .map_err(|e| e.to_string())?;
        let pem = ck.cert.pem();
        let key_pem = ck.signing_key.serialize_pem();
        Self::from_pem(&pem, &key_pem)
    }

    /// A chain and key from PEM text.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("certificate: {e}"))?;
        if chain.is_empty() {
            return Err("certificate: no CERTIFICATE block".into());
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("key: {e}"))?;
        Ok(ServerTls {
            chain,
            key,
            chain_pem: chain_pem.to_string(),
        })
    }

    /// rustls's configuration for an HTTPS server (the admin API): TLS 1.2 or 1.3, ALPN
    /// `http/1.1`.
    pub fn https_config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// quinn's server configuration: TLS 1.3, ALPN `nearby/1`, and — unless `transport` is
    /// [`Transport::QuinnDefaults`], kept to measure against — transport limits for many small,
    /// mostly idle connections, and a TLS session that lets go of the handshake once done
    /// ([`quic`]).
    ///
    /// `batched`: for the batched driver, which sends every connection's packets from one
    /// shared buffer, so a connection with several packets may send them in one GSO message.
    pub fn quinn_config(&self, transport: Transport, batched: bool) -> Result<quinn::ServerConfig, String> {
        self.config(transport, batched, transport == Transport::Tuned)
    }

    /// The bare quinn push's configuration (`nearby-loadsim ceiling`, the fixed reference of
    /// issue 12): nearby's transport settings on quinn's own TLS session, one datagram per
    /// transmit.
    pub fn bare_quinn_config(&self) -> Result<quinn::ServerConfig, String> {
        self.config(Transport::Tuned, false, false)
    }

    /// rustls's configuration for the QUIC service: TLS 1.3 only, ALPN `nearby/1`; `lean`:
    /// without session tickets (see below; quinn's own session, measured against, keeps
    /// rustls's default).
    fn quic_tls(&self, lean: bool) -> Result<rustls::ServerConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| e.to_string())?;
        crypto.alpn_protocols = vec![nearby_client::proto::ALPN.to_vec()];
        // No session tickets. rustls would send two per handshake and remember them in a cache
        // of 256 entries: at a node's rate of new connections a ticket is evicted long before
        // its client comes back, so resumption almost never happens, while every handshake pays
        // for making, sending and storing them (and the connection keeps the buffers that
        // carried them). A phone that changes networks keeps its connection (QUIC migration)
        // rather than resuming it.
        if lean {
            crypto.send_tls13_tickets = 0;
        }
        Ok(crypto)
    }

    fn config(
        &self,
        transport: Transport,
        batched: bool,
        lean_tls: bool,
    ) -> Result<quinn::ServerConfig, String> {
        let crypto = self.quic_tls(lean_tls)?;
        let mut config = if lean_tls {
            quinn::ServerConfig::with_crypto(Arc::new(quic::ServerCrypto::new(crypto)?))
        } else {
            let quic =
                quinn::crypto::rustls::QuicServerConfig::try_from(crypto).map_err(|e| e.to_string())?;
            quinn::ServerConfig::with_crypto(Arc::new(quic))
        };
        if transport == Transport::QuinnDefaults {
            return Ok(config);
        }
        let mut t = quinn::TransportConfig::default();
        // One control stream per client; the node opens the event stream.
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1));
        t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
        // Clients send small frames; a small window bounds what one client can make us buffer.
        t.stream_receive_window(quinn::VarInt::from_u32(128 * 1024));
        t.receive_window(quinn::VarInt::from_u32(256 * 1024));
        t.send_window(SEND_WINDOW);
        // On quinn's tasks, one datagram per transmit: pushes are small, and a connection keeps
        // its transmit buffer at the largest size it ever used, so batching (GSO) would cost
        // ~10 KiB per idle connection after the handshake's burst. The batched driver's buffer
        // is shared by all connections.
        t.enable_segmentation_offload(batched);
        // Phones update every ~30 s; silence for 3 minutes means gone.
        t.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(180)).map_err(|e| e.to_string())?,
        ));
        config.transport_config(Arc::new(t));
        Ok(config)
    }
}
