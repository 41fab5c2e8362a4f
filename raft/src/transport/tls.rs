//! TLS material for node-to-node traffic: a cluster certificate authority and node certificates
//! it signs, used for *mutual* TLS — a node accepts Raft traffic only from peers holding a
//! certificate of the same cluster CA.
//!
//! Every node certificate names [`NODE_SERVER_NAME`]; peers verify that name rather than a host
//! name, because nodes are addressed by IP and move between hosts. What identifies a node to Raft
//! is its node id, carried in the membership; what the certificate proves is "a node of this
//! cluster".

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::TransportError;

/// The TLS server name every node certificate carries and every peer verifies.
pub const NODE_SERVER_NAME: &str = "nearby-node";

/// ALPN protocol of the node-to-node Raft transport.
pub const RAFT_ALPN: &[u8] = b"nearby-raft/1";

fn tls_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(e.to_string())
}

/// A cluster's certificate authority: signs node certificates.
pub struct ClusterCa {
    params: CertificateParams,
    key: KeyPair,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl ClusterCa {
    /// Generates a new CA (for a dev cluster or tests; production loads one from files).
    pub fn generate(cluster_name: &str) -> Result<Self, TransportError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("nearby cluster CA {cluster_name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(tls_err)?;
        let cert = params.self_signed(&key).map_err(tls_err)?;
        Ok(ClusterCa {
            params,
            key,
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
        })
    }

    /// The CA certificate (DER), the trust root of the cluster.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate (PEM), for clients and tools that trust the cluster.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// Issues the TLS identity of one node.
    pub fn issue_node(&self) -> Result<NodeTls, TransportError> {
        let mut params = CertificateParams::new(vec![NODE_SERVER_NAME.to_string()]).map_err(tls_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, NODE_SERVER_NAME);
        let key = KeyPair::generate().map_err(tls_err)?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(tls_err)?;
        Ok(NodeTls {
            ca: self.cert_der.clone(),
            cert: cert.der().clone(),
            key: key.serialize_der(),
        })
    }
}

/// One node's TLS identity: the cluster CA it trusts, its certificate and key.
#[derive(Clone)]
pub struct NodeTls {
    ca: CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl NodeTls {
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
        crypto.alpn_protocols = vec![RAFT_ALPN.to_vec()];
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
        crypto.alpn_protocols = vec![RAFT_ALPN.to_vec()];
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
    t.keep_alive_interval(Some(std::time::Duration::from_secs(2)));
    t.max_idle_timeout(Some(quinn::VarInt::from_u32(10_000).into()));
    // Many groups' RPCs share one connection, each on its own stream.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(4096));
    t
}
