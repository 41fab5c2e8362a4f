//! TLS material for node-to-node traffic: a cluster certificate authority and node certificates
//! it signs, used for *mutual* TLS — a node accepts traffic only from peers holding a
//! certificate of the same cluster CA.
//!
//! # Identity
//!
//! A node certificate is bound to one node id: besides [`NODE_SERVER_NAME`] (which every node of
//! the cluster carries, so a node can be reached before its id is known, e.g. as a join seed) it
//! names [`node_name`]`(id)`. Every request a peer sends names the node it comes from, and the
//! receiver checks that the connection's certificate is valid for that node's name
//! ([`cert_is_for_node`]); a caller that knows whom it dials checks the server's certificate the
//! same way. So a node holding node 2's key can act as node 2 and nothing else: it cannot vote,
//! lead or send peer messages as node 3.
//!
//! The CA's key signs node certificates and nothing else; it stays with the operator (see
//! `docs/operations.md`), never on the nodes.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

use crate::error::TransportError;
use crate::NodeId;

/// The TLS server name every node certificate carries.
pub const NODE_SERVER_NAME: &str = "nearby-node";

/// The newest version of the node-to-node protocol this build speaks.
///
/// Versions are told apart in the TLS handshake: a node offers (and accepts) the ALPN ids
/// `nearby-raft/N` of every version from [`OLDEST_PEER_PROTOCOL`] to its newest, newest first,
/// so two nodes speak the newest version both know ([`protocol_of_alpn`]). Nodes with no version
/// in common cannot connect at all. A change of the messages or of the Raft commands that an
/// older node could not read raises this number and is used only once every node speaks it (the
/// node layer's "active protocol"): that is what lets a rolling upgrade run old and new nodes
/// side by side (`docs/architecture.md`, "Changing the node-to-node protocol").
///
/// 3 is the first versioned protocol: builds before it all said `nearby-raft/2` while their
/// messages changed, so this build refuses them (the handshake fails, and says why) rather than
/// misreading them; from 3 on, a change follows the rules and rolls. 4 adds a tool's request for
/// a replica's one-way grants (`PeerRequest::ReplicaGrants`), sent only to nodes that speak it.
/// 5 adds the request that a group's leader hand its leadership over (`PeerRequest::HandOver`),
/// sent once every node speaks it.
pub const PEER_PROTOCOL: u32 = 5;

/// The oldest version this build still speaks (see [`PEER_PROTOCOL`]).
pub const OLDEST_PEER_PROTOCOL: u32 = 3;

/// The ALPN id of protocol version `v`.
fn alpn(v: u32) -> Vec<u8> {
    format!("nearby-raft/{v}").into_bytes()
}

/// The protocol version an ALPN id names, if it is one of this transport's.
pub fn protocol_of_alpn(id: &[u8]) -> Option<u32> {
    std::str::from_utf8(id)
        .ok()?
        .strip_prefix("nearby-raft/")?
        .parse()
        .ok()
}

/// The DNS name a certificate of node `id` carries (and no other node's does).
pub fn node_name(id: NodeId) -> String {
    format!("n{id}.node.nearby")
}

fn tls_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(e.to_string())
}

/// Whether the DER certificate `cert` names node `id` (see the module doc). It does not check
/// the chain: that is the TLS handshake's job, already done for a connection's certificate.
pub fn cert_is_for_node(cert: &CertificateDer<'_>, id: NodeId) -> bool {
    let Ok(name) = ServerName::try_from(node_name(id)) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert).is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
}

/// A cluster's certificate authority: signs node certificates.
pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

impl ClusterCa {
    /// Generates a new CA named `cluster_name`.
    pub fn generate(cluster_name: &str) -> Result<Self, TransportError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("nearby cluster CA {cluster_name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // Node certificates outlive any one deploy; the operator rotates the CA deliberately.
        params.not_after = rcgen::date_time_ymd(2100, 1, 1);
        let key = KeyPair::generate().map_err(tls_err)?;
        let cert = params.self_signed(&key).map_err(tls_err)?;
        let key_pem = key.serialize_pem();
        Ok(ClusterCa {
            issuer: Issuer::new(params, key),
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem,
        })
    }

    /// Loads a CA from its certificate and key (PEM), as [`ClusterCa::cert_pem`] and
    /// [`ClusterCa::key_pem`] wrote them.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TransportError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| tls_err(format!("CA key: {e}")))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| tls_err(format!("CA certificate: {e}")))?;
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| tls_err(format!("CA certificate: {e}")))?;
        Ok(ClusterCa {
            issuer,
            cert_der,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    /// The CA certificate (PEM): the trust root every node of the cluster is given.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA's private key (PEM). Keep it with the operator, never on a node.
    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// Issues the TLS identity of node `id`.
    pub fn issue_node(&self, id: NodeId) -> Result<NodeTls, TransportError> {
        let mut params =
            CertificateParams::new(vec![NODE_SERVER_NAME.to_string(), node_name(id)]).map_err(tls_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("nearby node {id}"));
        params.not_after = rcgen::date_time_ymd(2100, 1, 1);
        let key = KeyPair::generate().map_err(tls_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(tls_err)?;
        Ok(NodeTls {
            node: id,
            ca: self.cert_der.clone(),
            ca_pem: self.cert_pem.clone(),
            cert: cert.der().clone(),
            cert_pem: cert.pem(),
            key: key.serialize_der(),
            key_pem: key.serialize_pem(),
            newest: PEER_PROTOCOL,
            oldest: OLDEST_PEER_PROTOCOL,
        })
    }
}

/// One node's TLS identity: its id, the cluster CA it trusts, its certificate and key.
#[derive(Clone)]
pub struct NodeTls {
    node: NodeId,
    ca: CertificateDer<'static>,
    ca_pem: String,
    cert: CertificateDer<'static>,
    cert_pem: String,
    key: Vec<u8>,
    key_pem: String,
    /// The newest protocol version this node offers ([`PEER_PROTOCOL`] but in tests).
    newest: u32,
    /// The oldest it offers ([`OLDEST_PEER_PROTOCOL`] but in tests).
    oldest: u32,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl NodeTls {
    /// Loads node `id`'s identity from PEM text: the cluster CA's certificate, the node's
    /// certificate and its key. Refuses a certificate that is not node `id`'s or not signed by
    /// the CA.
    pub fn from_pem(id: NodeId, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TransportError> {
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| tls_err(format!("cluster CA certificate: {e}")))?;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| tls_err(format!("node certificate: {e}")))?;
        let key = match PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| tls_err(format!("node key: {e}")))?
        {
            PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
            _ => {
                return Err(tls_err(
                    "node key: expected a PKCS#8 key (as `nearby-node ca issue` writes)",
                ))
            }
        };
        if !cert_is_for_node(&cert, id) {
            return Err(tls_err(format!(
                "the node certificate is not node {id}'s (it does not name {})",
                node_name(id)
            )));
        }
        let tls = NodeTls {
            node: id,
            ca,
            ca_pem: ca_pem.to_string(),
            cert,
            cert_pem: cert_pem.to_string(),
            key,
            key_pem: key_pem.to_string(),
            newest: PEER_PROTOCOL,
            oldest: OLDEST_PEER_PROTOCOL,
        };
        // Building the server configuration checks that the key matches the certificate.
        tls.server_config()?;
        let roots = Arc::new(tls.roots()?);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots,
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(tls_err)?;
        verifier
            .verify_client_cert(&tls.cert, &[], rustls::pki_types::UnixTime::now())
            .map_err(|e| {
                tls_err(format!(
                    "the node certificate is not signed by the cluster CA: {e}"
                ))
            })?;
        Ok(tls)
    }

    /// The node this identity belongs to.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// This identity offering protocol versions up to `newest` (at least
    /// [`OLDEST_PEER_PROTOCOL`]) instead of [`PEER_PROTOCOL`]: for tests of mixed versions,
    /// which need a node newer than the build.
    pub fn speaking_up_to(mut self, newest: u32) -> Self {
        self.newest = newest.max(OLDEST_PEER_PROTOCOL);
        self
    }

    /// The newest protocol version this identity offers.
    pub fn newest_protocol(&self) -> u32 {
        self.newest
    }

    /// This identity offering only version `v`: an older build, for tests.
    #[cfg(test)]
    pub(crate) fn speaking_only(mut self, v: u32) -> Self {
        (self.oldest, self.newest) = (v, v);
        self
    }

    /// The ALPN ids offered and accepted: every version this node speaks, newest first.
    fn alpn_ids(&self) -> Vec<Vec<u8>> {
        (self.oldest..=self.newest).rev().map(alpn).collect()
    }

    /// The cluster CA's certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The node's certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The node's private key (PEM). Write it with mode 0600.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TransportError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(tls_err)?;
        Ok(roots)
    }

    /// quinn server configuration: TLS 1.3, client certificates required and checked against the
    /// cluster CA.
    pub(crate) fn server_config(&self) -> Result<quinn::ServerConfig, TransportError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider.clone(),
        )
        .build()
        .map_err(tls_err)?;
        let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert.clone()], self.key())
            .map_err(tls_err)?;
        crypto.alpn_protocols = self.alpn_ids();
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).map_err(tls_err)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::new(transport_config()));
        Ok(config)
    }

    /// quinn client configuration: TLS 1.3, the server checked against the cluster CA, and this
    /// node's certificate presented.
    pub(crate) fn client_config(&self) -> Result<quinn::ClientConfig, TransportError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(vec![self.cert.clone()], self.key())
            .map_err(tls_err)?;
        crypto.alpn_protocols = self.alpn_ids();
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(tls_err)?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(transport_config()));
        Ok(config)
    }
}

/// Transport settings of node-to-node connections: kept alive, and closed when a peer has been
/// silent long enough that reconnecting is better than waiting.
fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // A dead peer's connection is closed after 3 s of silence, so calls fail fast (and back
    // off) instead of waiting on a connection nobody answers.
    t.keep_alive_interval(Some(std::time::Duration::from_millis(750)));
    t.max_idle_timeout(Some(quinn::VarInt::from_u32(3_000).into()));
    // Many groups' RPCs share one connection, each on its own stream.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(4096));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_names_its_node_and_no_other() {
        let ca = ClusterCa::generate("t").expect("ca");
        let n2 = ca.issue_node(2).expect("issue");
        assert!(cert_is_for_node(&n2.cert, 2));
        assert!(!cert_is_for_node(&n2.cert, 3));
        assert!(!cert_is_for_node(&n2.cert, 22));
    }

    #[test]
    fn identities_round_trip_through_pem_and_refuse_the_wrong_node_or_ca() {
        let ca = ClusterCa::generate("t").expect("ca");
        let again = ClusterCa::from_pem(&ca.cert_pem(), &ca.key_pem()).expect("reload ca");
        // A certificate issued by the reloaded CA is trusted by the original's roots.
        let n4 = again.issue_node(4).expect("issue");
        let loaded = NodeTls::from_pem(4, &ca.cert_pem(), n4.cert_pem(), n4.key_pem()).expect("load");
        assert_eq!(loaded.node_id(), 4);
        let wrong_node = NodeTls::from_pem(5, &ca.cert_pem(), n4.cert_pem(), n4.key_pem());
        assert!(wrong_node.is_err_and(|e| e.to_string().contains("not node 5")));
        let other = ClusterCa::generate("other").expect("ca");
        let wrong_ca = NodeTls::from_pem(4, &other.cert_pem(), n4.cert_pem(), n4.key_pem());
        assert!(wrong_ca.is_err_and(|e| e.to_string().contains("not signed by the cluster CA")));
    }
}
