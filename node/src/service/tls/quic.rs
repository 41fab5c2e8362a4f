//! The client service's QUIC-TLS session: rustls's server connection while the handshake needs
//! it, then only the secret that key updates derive from.
//!
//! quinn's own session (`quinn::crypto::rustls::TlsSession`) keeps rustls's server connection for
//! the connection's whole life — the handshake's state, its buffers and key schedule — and
//! derives the next generation of 1-RTT packet keys (ring's AES key schedules) as soon as the
//! current ones exist. A mostly idle connection needs neither:
//! - after the handshake, QUIC carries no TLS message from a client to the server: RFC 9001
//!   §6 forbids TLS's KeyUpdate, and nearby asks for no client certificate (so no
//!   post-handshake authentication). Anything that arrives is a protocol error, here as in
//!   rustls;
//! - the next generation's keys are needed only when one side updates the keys (RFC 9001 §6):
//!   quinn makes one update within a connection's first 10–1,000 packets (to find peers that
//!   get key updates wrong early), then one per ~8 M packets with AES-GCM.
//!
//! So this session lets go of rustls's connection once the handshake is complete and quinn has
//! taken everything rustls wrote, keeping the negotiated ALPN and server name and the secrets
//! that key updates derive from; and it derives a generation's keys when a packet first needs
//! them or the generation becomes current, never one ahead. A connection holds its current keys
//! and the next generation's secrets. The handshake itself is rustls's, through the same calls
//! as quinn's session. (Its configuration sends no session tickets: [`super::ServerTls`] says
//! why.)
//!
//! Measured (`cargo bench -p nearby-node --bench idle`, `docs/benchmarks.md`): with the tickets
//! gone too, an idle session costs the node 16.0–16.1 KiB instead of 21.3.

use std::any::Any;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::BytesMut;
use quinn_proto::crypto::rustls::HandshakeData;
use quinn_proto::crypto::{
    self, CryptoError, ExportKeyingMaterialError, HeaderKey, KeyPair, Keys, PacketKey, UnsupportedVersion,
};
use quinn_proto::transport_parameters::TransportParameters;
use quinn_proto::{ConnectionId, Side, TransportError, TransportErrorCode};
use rustls::quic::{KeyChange, PacketKeySet, Secrets, Suite, Version};

/// TLS's `unexpected_message` alert, as a QUIC crypto error (RFC 9001 §4.8).
const UNEXPECTED_MESSAGE: u8 = 10;

/// quinn's `crypto::ServerConfig` on rustls, starting [`ServerSession`]s.
pub(crate) struct ServerCrypto {
    /// Everything but the sessions is quinn's: the Initial keys and the Retry tag.
    quinn: quinn_proto::crypto::rustls::QuicServerConfig,
    tls: Arc<rustls::ServerConfig>,
    /// The suite Initial packets are protected with (TLS_AES_128_GCM_SHA256, RFC 9001 §5.2).
    initial: Suite,
}

impl ServerCrypto {
    /// From rustls's configuration, which must allow TLS 1.3 and QUIC's Initial suite.
    pub(crate) fn new(tls: rustls::ServerConfig) -> Result<Self, String> {
        let tls = Arc::new(tls);
        let initial = tls
            .crypto_provider()
            .cipher_suites
            .iter()
            .find(|s| s.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            .and_then(|s| s.tls13())
            .and_then(|s| s.quic_suite())
            .ok_or("QUIC needs TLS_AES_128_GCM_SHA256 for Initial packets")?;
        let quinn = quinn_proto::crypto::rustls::QuicServerConfig::try_from(Arc::clone(&tls))
            .map_err(|e| e.to_string())?;
        Ok(ServerCrypto { quinn, tls, initial })
    }
}

/// QUIC versions and the TLS key derivation each uses (as quinn's session maps them).
fn tls_version(version: u32) -> Result<Version, UnsupportedVersion> {
    match version {
        0xff00_001d..=0xff00_0020 => Ok(Version::V1Draft),
        0x0000_0001 | 0xff00_0021..=0xff00_0022 => Ok(Version::V1),
        _ => Err(UnsupportedVersion),
    }
}

fn quinn_keys(keys: rustls::quic::Keys) -> Keys {
    Keys {
        header: KeyPair {
            local: Box::new(keys.local.header),
            remote: Box::new(keys.remote.header),
        },
        packet: KeyPair {
            local: Box::new(keys.local.packet),
            remote: Box::new(keys.remote.packet),
        },
    }
}

impl crypto::ServerConfig for ServerCrypto {
    fn initial_keys(&self, version: u32, dst_cid: &ConnectionId) -> Result<Keys, UnsupportedVersion> {
        self.quinn.initial_keys(version, dst_cid)
    }

    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        self.quinn.retry_tag(version, orig_dst_cid, packet)
    }

    fn start_session(
        self: Arc<Self>,
        version: u32,
        params: &TransportParameters,
    ) -> Box<dyn crypto::Session> {
        Box::new(ServerCrypto::session(self, version, params))
    }
}

impl ServerCrypto {
    fn session(this: Arc<Self>, version: u32, params: &TransportParameters) -> ServerSession {
        // quinn starts a session only for a version `initial_keys` accepted.
        let version = tls_version(version).unwrap_or(Version::V1);
        let mut encoded = Vec::new();
        params.write(&mut encoded);
        let state = match rustls::quic::ServerConnection::new(Arc::clone(&this.tls), version, encoded) {
            Ok(tls) => Tls::Handshaking(Box::new(tls)),
            // Only a configuration `ServerCrypto::new` would have refused; the client is told.
            Err(e) => Tls::Failed(e.to_string()),
        };
        ServerSession {
            crypto: this,
            state,
            version,
            negotiated: None,
            next: None,
            handed_out: false,
        }
    }
}

/// Where a session's TLS stands.
enum Tls {
    /// rustls runs the handshake.
    Handshaking(Box<rustls::quic::ServerConnection>),
    /// The handshake is complete and written: rustls's connection is gone.
    Done,
    /// rustls refused to start; every handshake message is answered with this error.
    Failed(String),
}

/// What the handshake negotiated, kept after rustls's connection is dropped.
struct Negotiated {
    /// The application protocol, as its place in the configuration's list.
    protocol: Option<u8>,
    server_name: Option<Box<str>>,
}

/// One connection's TLS: see the module documentation. Kept small, as every connection holds
/// one for its life.
struct ServerSession {
    crypto: Arc<ServerCrypto>,
    state: Tls,
    version: Version,
    /// Set once the ClientHello is read (quinn's `HandshakeDataReady`).
    negotiated: Option<Negotiated>,
    /// The latest 1-RTT key generation handed to quinn (or, before the first, the first it will
    /// ask for), once the handshake has made its secrets.
    next: Option<Arc<Generation>>,
    /// Whether `next` was handed out, so the one after must be derived first.
    handed_out: bool,
}

impl ServerSession {
    fn negotiate(&mut self) {
        let Tls::Handshaking(tls) = &self.state else {
            return;
        };
        let protocols = &self.crypto.tls.alpn_protocols;
        self.negotiated = Some(Negotiated {
            protocol: tls
                .alpn_protocol()
                .and_then(|p| protocols.iter().position(|q| q == p))
                .and_then(|i| u8::try_from(i).ok()),
            server_name: tls.server_name().map(Box::from),
        });
    }

    fn tls(&self) -> Option<&rustls::quic::ServerConnection> {
        match &self.state {
            Tls::Handshaking(tls) => Some(tls),
            Tls::Done | Tls::Failed(_) => None,
        }
    }
}

impl crypto::Session for ServerSession {
    fn initial_keys(&self, dst_cid: &ConnectionId, side: Side) -> Keys {
        let side = match side {
            Side::Client => rustls::Side::Client,
            Side::Server => rustls::Side::Server,
        };
        quinn_keys(self.crypto.initial.keys(dst_cid, side, self.version))
    }

    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        let negotiated = self.negotiated.as_ref()?;
        Some(Box::new(HandshakeData {
            protocol: negotiated
                .protocol
                .and_then(|i| self.crypto.tls.alpn_protocols.get(usize::from(i)))
                .cloned(),
            server_name: negotiated.server_name.as_deref().map(str::to_string),
        }))
    }

    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        // No client certificates are asked for.
        None
    }

    fn early_crypto(&self) -> Option<(Box<dyn HeaderKey>, Box<dyn PacketKey>)> {
        let keys = self.tls()?.zero_rtt_keys()?;
        Some((Box::new(keys.header), Box::new(keys.packet)))
    }

    fn early_data_accepted(&self) -> Option<bool> {
        // A client's question.
        None
    }

    fn is_handshaking(&self) -> bool {
        match &self.state {
            Tls::Handshaking(tls) => tls.is_handshaking(),
            Tls::Done => false,
            Tls::Failed(_) => true,
        }
    }

    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        let tls = match &mut self.state {
            Tls::Handshaking(tls) => tls,
            Tls::Done => {
                return Err(TransportError {
                    code: TransportErrorCode::crypto(UNEXPECTED_MESSAGE),
                    frame: None,
                    reason: "a TLS message after the handshake".into(),
                })
            }
            Tls::Failed(e) => {
                return Err(TransportError {
                    code: TransportErrorCode::INTERNAL_ERROR,
                    frame: None,
                    reason: e.clone(),
                })
            }
        };
        if let Err(e) = tls.read_hs(buf) {
            return Err(match tls.alert() {
                Some(alert) => TransportError {
                    code: TransportErrorCode::crypto(alert.into()),
                    frame: None,
                    reason: e.to_string(),
                },
                None => TransportError {
                    code: TransportErrorCode::PROTOCOL_VIOLATION,
                    frame: None,
                    reason: format!("TLS error: {e}"),
                },
            });
        }
        if self.negotiated.is_none()
            && (tls.server_name().is_some() || tls.alpn_protocol().is_some() || !tls.is_handshaking())
        {
            self.negotiate();
            return Ok(true);
        }
        Ok(false)
    }

    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        let Some(encoded) = self.tls().and_then(|tls| tls.quic_transport_parameters()) else {
            return Ok(None);
        };
        TransportParameters::read(Side::Server, &mut std::io::Cursor::new(encoded))
            .map(Some)
            .map_err(Into::into)
    }

    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        let Tls::Handshaking(tls) = &mut self.state else {
            return None;
        };
        let written = buf.len();
        let keys = match tls.write_hs(buf) {
            Some(KeyChange::Handshake { keys }) => keys,
            Some(KeyChange::OneRtt { keys, next }) => {
                let key = &keys.local.packet;
                let limits = Limits {
                    tag_len: key.tag_len(),
                    confidentiality: key.confidentiality_limit(),
                    integrity: key.integrity_limit(),
                };
                self.next = Some(Arc::new(Generation::new(Box::new(next), limits)));
                keys
            }
            None => {
                if buf.len() == written && !tls.is_handshaking() {
                    // Complete, and nothing left to write: what rustls held is no longer needed.
                    if self.negotiated.is_none() {
                        self.negotiate();
                    }
                    self.state = Tls::Done;
                }
                return None;
            }
        };
        Some(quinn_keys(keys))
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn PacketKey>>> {
        let latest = self.next.as_ref()?;
        let generation = if self.handed_out {
            // quinn asks for the generation after `latest` when `latest` becomes current, so
            // `latest` is derived now if no packet needed it yet, which gives the secrets of the
            // one after.
            latest.successor()?
        } else {
            Arc::clone(latest)
        };
        self.next = Some(Arc::clone(&generation));
        self.handed_out = true;
        Some(KeyPair {
            local: Box::new(LazyKey {
                generation: Arc::clone(&generation),
                local: true,
            }),
            remote: Box::new(LazyKey {
                generation,
                local: false,
            }),
        })
    }

    fn is_valid_retry(&self, _orig_dst_cid: &ConnectionId, _header: &[u8], _payload: &[u8]) -> bool {
        // A client's check.
        false
    }

    fn export_keying_material(
        &self,
        _output: &mut [u8],
        _label: &[u8],
        _context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        // Nothing in nearby uses exported keys, and the key schedule is gone after the handshake.
        Err(ExportKeyingMaterialError)
    }
}

/// One generation of 1-RTT packet keys, derived from its secrets when a packet first needs them
/// (or when it becomes current). rustls advances a generation's secrets to the next one's only
/// while deriving its keys, so the derivation makes the next generation too, and the secrets
/// move on to it: each generation's are held once, by the first generation not yet derived.
struct Generation {
    /// This generation's secrets, until its keys are derived.
    secrets: Mutex<Option<Box<Secrets>>>,
    keys: OnceLock<PacketKeySet>,
    /// The generation after this one, made by the derivation.
    next: OnceLock<Arc<Generation>>,
    limits: Limits,
}

impl Generation {
    fn new(secrets: Box<Secrets>, limits: Limits) -> Self {
        Generation {
            secrets: Mutex::new(Some(secrets)),
            keys: OnceLock::new(),
            next: OnceLock::new(),
            limits,
        }
    }

    fn keys(&self) -> &PacketKeySet {
        self.keys.get_or_init(|| {
            let mut held = self
                .secrets
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // Taken only here, and `OnceLock` runs this once per generation.
            let Some(mut secrets) = held.take() else {
                unreachable!("a generation's keys are derived once");
            };
            let keys = secrets.next_packet_keys();
            let _ = self.next.set(Arc::new(Generation::new(secrets, self.limits)));
            keys
        })
    }

    /// The generation after this one (this one is derived first if no packet needed it yet).
    fn successor(&self) -> Option<Arc<Generation>> {
        self.keys();
        self.next.get().cloned()
    }
}

/// What quinn asks of a key besides using it — the same for every generation of a connection
/// (they share the cipher suite), so asking does not derive the keys. quinn reads the limits
/// of a new generation as it installs it: deriving for that would hold the next generation's keys
/// after every key update (and quinn makes one within the first 10–1,000 packets).
#[derive(Clone, Copy)]
struct Limits {
    tag_len: usize,
    confidentiality: u64,
    integrity: u64,
}

/// One direction of a [`Generation`].
struct LazyKey {
    generation: Arc<Generation>,
    local: bool,
}

impl LazyKey {
    // quinn implements its `PacketKey` for the box, not for rustls's key itself.
    #[allow(clippy::borrowed_box)]
    fn key(&self) -> &Box<dyn rustls::quic::PacketKey> {
        let keys = self.generation.keys();
        if self.local {
            &keys.local
        } else {
            &keys.remote
        }
    }
}

impl PacketKey for LazyKey {
    fn encrypt(&self, packet: u64, buf: &mut [u8], header_len: usize) {
        PacketKey::encrypt(self.key(), packet, buf, header_len)
    }

    fn decrypt(&self, packet: u64, header: &[u8], payload: &mut BytesMut) -> Result<(), CryptoError> {
        PacketKey::decrypt(self.key(), packet, header, payload)
    }

    fn tag_len(&self) -> usize {
        self.generation.limits.tag_len
    }

    fn confidentiality_limit(&self) -> u64 {
        self.generation.limits.confidentiality
    }

    fn integrity_limit(&self) -> u64 {
        self.generation.limits.integrity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::tls::{ServerTls, Transport};
    use quinn_proto::crypto::Session;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    /// A QUIC server's TLS next to a rustls QUIC client, exchanging handshake bytes directly.
    struct Pair {
        client: rustls::quic::ClientConnection,
        server: ServerSession,
        /// The client's and the server's 1-RTT packet keys (local, remote).
        client_keys: Option<rustls::quic::Keys>,
        client_next: Option<Secrets>,
        server_keys: Option<Keys>,
    }

    fn pair(alpn: &[u8]) -> Pair {
        let tls = ServerTls::self_signed().expect("certificate");
        let crypto = ServerCrypto::new(tls.quic_tls(true).expect("config")).expect("crypto");
        let params = TransportParameters::read(Side::Server, &mut &[][..]).expect("default parameters");
        let server = ServerCrypto::session(Arc::new(crypto), 1, &params);

        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(tls.chain_pem.as_bytes()) {
            roots.add(cert.expect("PEM")).expect("root");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let name = ServerName::try_from("localhost").expect("name");
        let client = rustls::quic::ClientConnection::new(Arc::new(config), Version::V1, name, Vec::new())
            .expect("client");
        Pair {
            client,
            server,
            client_keys: None,
            client_next: None,
            server_keys: None,
        }
    }

    impl Pair {
        /// Runs the handshake as quinn would: each side writes until it has nothing more, the
        /// other reads it. Stops at the first error.
        fn handshake(&mut self) -> Result<(), TransportError> {
            for _ in 0..10 {
                // Each side's flight, cut where its keys change: one read per encryption level.
                let mut flights = vec![Vec::new()];
                while let Some(change) = self.client.write_hs(flights.last_mut().expect("a flight")) {
                    if let KeyChange::OneRtt { keys, next } = change {
                        self.client_keys = Some(keys);
                        self.client_next = Some(next);
                    }
                    flights.push(Vec::new());
                }
                for flight in flights.iter().filter(|f| !f.is_empty()) {
                    self.server.read_handshake(flight)?;
                }
                let mut flights = vec![Vec::new()];
                loop {
                    let flight = flights.last_mut().expect("a flight");
                    let written = flight.len();
                    match self.server.write_handshake(flight) {
                        Some(keys) => {
                            if self.server.next.is_some() && self.server_keys.is_none() {
                                self.server_keys = Some(keys);
                            }
                            flights.push(Vec::new());
                        }
                        None if flight.len() == written => break,
                        None => {}
                    }
                }
                let sent = flights.iter().any(|f| !f.is_empty());
                for flight in flights.iter().filter(|f| !f.is_empty()) {
                    self.client
                        .read_hs(flight)
                        .expect("the client reads the server's flight");
                }
                if !self.client.is_handshaking() && !self.server.is_handshaking() && !sent {
                    return Ok(());
                }
            }
            panic!("the handshake did not finish in ten rounds");
        }
    }

    /// Seals a packet with `seal` and opens it with `open`: whether they are the two ends of
    /// one direction of one key generation.
    fn opens(seal: &dyn PacketKey, open: &dyn PacketKey, packet: u64) -> bool {
        let header = [0x40, 0x01, 0x02, 0x03];
        let payload = b"a location for a friend";
        let mut buf = header.to_vec();
        buf.extend_from_slice(payload);
        buf.resize(buf.len() + seal.tag_len(), 0);
        seal.encrypt(packet, &mut buf, header.len());
        let mut sealed = BytesMut::from(&buf[header.len()..]);
        open.decrypt(packet, &header, &mut sealed).is_ok() && &sealed[..] == payload
    }

    #[test]
    fn the_handshake_completes_and_lets_go_of_rustls() {
        let mut p = pair(nearby_client::proto::ALPN);
        p.handshake().expect("handshake");
        assert!(
            matches!(p.server.state, Tls::Done),
            "rustls's connection is still held"
        );
        // No session tickets: a node would not remember them long enough to resume.
        assert_eq!(p.client.tls13_tickets_received(), 0);
        let data = p.server.handshake_data().expect("handshake data");
        let data = data.downcast::<HandshakeData>().expect("rustls's handshake data");
        assert_eq!(data.protocol.as_deref(), Some(nearby_client::proto::ALPN));
        assert_eq!(data.server_name.as_deref(), Some("localhost"));

        // The current keys work both ways.
        let client = p.client_keys.take().expect("client 1-RTT keys");
        let server = p.server_keys.take().expect("server 1-RTT keys");
        assert!(opens(&client.local.packet, server.packet.remote.as_ref(), 7));
        assert!(opens(server.packet.local.as_ref(), &client.remote.packet, 8));
    }

    #[test]
    fn key_generations_are_derived_late_and_match_the_peers() {
        let mut p = pair(nearby_client::proto::ALPN);
        p.handshake().expect("handshake");
        let mut client_next = p.client_next.take().expect("client secrets");
        let current = p.client_keys.take().expect("client 1-RTT keys").local.packet;
        let mut server_generations = Vec::new();
        let mut client_generations = Vec::new();
        for _ in 0..3 {
            let keys = p.server.next_1rtt_keys().expect("the next generation");
            // What quinn reads as it installs a generation, answered without deriving it.
            assert_eq!(keys.local.tag_len(), 16);
            assert_eq!(
                keys.local.confidentiality_limit(),
                current.confidentiality_limit()
            );
            assert_eq!(keys.remote.integrity_limit(), current.integrity_limit());
            let latest = p.server.next.as_ref().expect("a generation");
            assert!(
                latest.keys.get().is_none(),
                "the newest generation was derived before use"
            );
            server_generations.push(keys);
            client_generations.push(client_next.next_packet_keys());
        }
        for (i, (server, client)) in server_generations.iter().zip(&client_generations).enumerate() {
            assert!(
                opens(&client.local, server.remote.as_ref(), 100 + i as u64),
                "generation {i}, client to server"
            );
            assert!(
                opens(server.local.as_ref(), &client.remote, 200 + i as u64),
                "generation {i}, server to client"
            );
        }
        // Generations are distinct keys.
        assert!(!opens(
            &client_generations[0].local,
            server_generations[1].remote.as_ref(),
            300
        ));
        assert!(!opens(
            server_generations[2].local.as_ref(),
            &client_generations[1].remote,
            301
        ));
    }

    #[test]
    fn a_tls_message_after_the_handshake_is_a_protocol_error() {
        let mut p = pair(nearby_client::proto::ALPN);
        p.handshake().expect("handshake");
        // A KeyUpdate (type 24, RFC 8446 §4.6.3), which QUIC forbids (RFC 9001 §6).
        let err = p.server.read_handshake(&[24, 0, 0, 1, 0]).expect_err("refused");
        assert_eq!(err.code, TransportErrorCode::crypto(UNEXPECTED_MESSAGE));
        assert!(!p.server.is_handshaking());
        assert!(p.server.write_handshake(&mut Vec::new()).is_none());
    }

    #[test]
    fn a_client_without_nearbys_protocol_is_refused_with_tlss_alert() {
        let mut p = pair(b"h3");
        let err = p.handshake().expect_err("refused");
        // no_application_protocol (RFC 8446 §6.2), as rustls reports it.
        assert_eq!(err.code, TransportErrorCode::crypto(120));
        assert!(matches!(p.server.state, Tls::Handshaking(_)));
    }

    /// Over real QUIC on loopback: quinn's client updates its keys, then the server does, and the
    /// connection carries data after each, in both directions.
    #[tokio::test]
    async fn a_connection_carries_data_across_key_updates() {
        let tls = ServerTls::self_signed().expect("certificate");
        let config = tls.quinn_config(Transport::Tuned, false).expect("config");
        let server = quinn::Endpoint::server(config, "127.0.0.1:0".parse().expect("addr")).expect("server");
        let addr = server.local_addr().expect("addr");
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        client.set_default_client_config(
            nearby_client::tls::client_config(&tls.chain_pem).expect("client config"),
        );

        let accept = tokio::spawn(async move {
            let conn = server.accept().await.expect("incoming").await.expect("accepted");
            let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
            let mut round = [0u8; 1];
            for i in 0..4u8 {
                recv.read_exact(&mut round).await.expect("read");
                assert_eq!(round[0], i);
                if i == 1 {
                    conn.force_key_update();
                }
                send.write_all(&[i]).await.expect("write");
            }
            send.finish().expect("finish");
            let protocol = conn
                .handshake_data()
                .and_then(|d| d.downcast::<HandshakeData>().ok())
                .and_then(|d| d.protocol);
            (conn, protocol)
        });
        let conn = client
            .connect(addr, "localhost")
            .expect("connect")
            .await
            .expect("connected");
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        let mut round = [0u8; 1];
        for i in 0..4u8 {
            if i == 1 || i == 3 {
                conn.force_key_update();
            }
            send.write_all(&[i]).await.expect("write");
            recv.read_exact(&mut round).await.expect("read");
            assert_eq!(round[0], i);
        }
        let (server_conn, protocol) = accept.await.expect("server task");
        assert_eq!(protocol.as_deref(), Some(nearby_client::proto::ALPN));
        assert!(
            server_conn.close_reason().is_none(),
            "{:?}",
            server_conn.close_reason()
        );
    }
}
