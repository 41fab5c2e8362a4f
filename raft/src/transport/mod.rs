//! The node-to-node transport: QUIC (quinn) with mutual TLS, one connection per peer node
//! shared by every group, one bidirectional stream per request.
//!
//! It carries two kinds of traffic over the same connections:
//!
//! - **Raft RPCs** of every group ([`RpcBody::AppendEntries`], [`RpcBody::Vote`],
//!   [`RpcBody::InstallSnapshot`]), dispatched to the group's `Raft` handle by [`GroupId`];
//! - **peer messages** of the node layer ([`RpcBody::Peer`]: forwarded locations, subscriptions,
//!   proposals for a group led elsewhere, the cluster map), opaque bytes here, handed to the
//!   [`PeerHandler`] the node registers. The node layer defines and decodes them; this crate
//!   only moves and authenticates them.
//!
//! # Why QUIC and not TCP
//!
//! Many groups share a connection. Over TCP one lost packet stalls every group's messages behind
//! it (head-of-line blocking) and a large snapshot chunk delays every heartbeat queued after it;
//! QUIC streams are independent, so a stream per request gives each message its own flow. QUIC
//! also brings TLS 1.3 with it, and quinn is already the client-facing protocol, so a node runs
//! one networking stack.
//!
//! # Authentication
//!
//! Every request names the node it comes from ([`RpcRequest::from`]); the receiver checks that
//! the connection's client certificate is that node's ([`tls::cert_is_for_node`]) before it acts,
//! and that a Raft message's vote is that node's own. A caller that knows which node it dials
//! checks the server's certificate the same way. A peer that fails either check is answered
//! [`RpcResponse::Refused`].
//!
//! # Messages
//!
//! A request stream carries one [`RpcRequest`] (encoded with [`nearby_index::codec`]); the
//! sender finishes its side and reads one [`RpcResponse`] to the end. Messages are bounded by
//! [`MAX_MESSAGE_BYTES`]; a larger one is refused by `read_to_end` before it is buffered whole.
//!
//! # Failure handling
//!
//! Every Raft RPC has a deadline (openraft's `RPCOption::hard_ttl`); peer messages get the
//! caller's. A failed connection is dropped and the next request to that peer reconnects. A peer
//! that does not host the group (yet) answers [`RpcResponse::UnknownGroup`].
//!
//! # Delay, for fault tests
//!
//! [`RaftTransport::set_send_delay`] holds every outgoing request for a random time between half
//! the delay and the delay (so requests also arrive out of order): the fault harness's stand-in
//! for a slow network, which this project's test kernels cannot make (no netem). Zero, the
//! default, costs one atomic load per request. [`RaftTransport::set_cut`] sends nothing to the
//! peers it names: a partition between nodes that leaves their clients' traffic alone, for
//! cluster tests on one host that have no network namespaces to cut.
//!
//! # Addresses
//!
//! A node is dialled at the address the node layer's [`AddressBook`] gives for its id (its
//! cluster map, which a node updates when it comes back at a new address), else at the one its
//! group's Raft membership recorded when it was added. An address is `ip:port` or `host:port`;
//! a host name is looked up when it is dialled, at most every [`NAME_TTL`], so a node known by a
//! stable name (a Kubernetes StatefulSet's pod DNS name) may change its IP between runs.

pub mod network;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::error::TransportError;
use crate::{GroupId, NodeId, Raft, TypeConfig, Vote};

pub use self::network::NetworkFactory;
pub use self::tls::{ClusterCa, NodeTls};

/// The largest message accepted (a snapshot chunk plus headroom).
pub const MAX_MESSAGE_BYTES: usize = 32 << 20;

/// The groups this node serves, by id: where incoming Raft RPCs are dispatched.
pub type GroupRegistry = Arc<RwLock<HashMap<GroupId, Raft>>>;

/// Told the group of every `AppendEntries` that carries entries (a write), before it is handled:
/// the node wakes a hibernating replica with it.
pub type AppendHook = Arc<dyn Fn(GroupId) + Send + Sync>;

/// Asked before a vote request of `candidate` for `group` is handled: `false` refuses it (the
/// candidate sees an error and tries again at its next election timeout). The node refuses
/// votes for a hibernating replica whose leader is alive.
pub type VoteGate = Arc<dyn Fn(GroupId, NodeId) -> bool + Send + Sync>;

/// Where node `id` is reachable now (`ip:port` or `host:port`), if the node layer knows: the
/// address a Raft membership recorded is older (see the module doc).
pub type AddressBook = Arc<dyn Fn(NodeId) -> Option<String> + Send + Sync>;

/// How long a looked-up host name's address is used before it is looked up again.
pub const NAME_TTL: Duration = Duration::from_secs(5);

/// A boxed future answering one peer message.
pub type PeerReply = Pin<Box<dyn Future<Output = Vec<u8>> + Send + 'static>>;

/// The node layer's handler of peer messages (see the module doc).
pub trait PeerHandler: Send + Sync + 'static {
    /// Answers `message` from node `from`, whose certificate the transport has checked.
    fn handle(&self, from: NodeId, message: Vec<u8>) -> PeerReply;
}

/// One request from a node to a peer.
#[derive(Debug, Serialize, Deserialize)]
pub struct RpcRequest {
    /// The sending node; its certificate must be this node's.
    pub from: NodeId,
    /// The message.
    pub body: RpcBody,
}

/// The message of an [`RpcRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcBody {
    /// Replicate entries or heartbeat.
    AppendEntries {
        /// The group.
        group: GroupId,
        /// openraft's request.
        req: AppendEntriesRequest<TypeConfig>,
    },
    /// Request a vote.
    Vote {
        /// The group.
        group: GroupId,
        /// openraft's request.
        req: VoteRequest<NodeId>,
    },
    /// One chunk of a snapshot.
    InstallSnapshot {
        /// The group.
        group: GroupId,
        /// openraft's request.
        req: InstallSnapshotRequest<TypeConfig>,
    },
    /// A message of the node layer, for its [`PeerHandler`].
    Peer(Vec<u8>),
}

/// The answer to an [`RpcRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcResponse {
    /// Answer to [`RpcBody::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// Answer to [`RpcBody::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// Answer to [`RpcBody::InstallSnapshot`].
    InstallSnapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// Answer to [`RpcBody::Peer`].
    Peer(Vec<u8>),
    /// The peer does not host the group.
    UnknownGroup,
    /// The peer could not decode the request.
    Malformed(String),
    /// The peer refused to act: the sender is not who it claims, or nothing handles the message.
    Refused(String),
}

/// One peer address: its cached connection, the node its certificate was checked to be, and the
/// state of attempts to connect.
///
/// An attempt runs in its own task, so a caller that gives up (Raft's RPC timeouts are short)
/// does not abort it; one caller waits for it and every other call fails at once while it runs,
/// and for a backoff after it failed — a dead peer costs one attempt at a time, not one per
/// call.
#[derive(Default)]
struct Peer {
    slot: Mutex<PeerSlot>,
    /// Counts finished attempts; the caller that started one waits on it.
    attempts: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct PeerSlot {
    conn: Option<quinn::Connection>,
    verified: Option<NodeId>,
    connecting: bool,
    /// Connection attempts failed in a row.
    failures: u32,
    /// After a failed attempt, calls fail at once until then instead of trying again.
    retry_at: Option<tokio::time::Instant>,
    /// Why the last attempt failed.
    last_error: String,
}

/// How long calls to a peer fail at once after `failures` failed connection attempts in a row:
/// 100 ms, doubling, at most [`MAX_RECONNECT_BACKOFF`].
fn reconnect_backoff(failures: u32) -> Duration {
    (Duration::from_millis(100) * 2u32.saturating_pow(failures.saturating_sub(1).min(8)))
        .min(MAX_RECONNECT_BACKOFF)
}

/// The longest wait between connection attempts to an unreachable peer.
pub const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(1);

/// The node's transport endpoint: serves incoming requests and sends outgoing ones over one
/// cached connection per peer.
pub struct RaftTransport {
    me: NodeId,
    endpoint: quinn::Endpoint,
    peers: Mutex<HashMap<SocketAddr, Arc<Peer>>>,
    connect_timeout: Duration,
    handler: Arc<RwLock<Option<Arc<dyn PeerHandler>>>>,
    append_hook: Arc<RwLock<Option<AppendHook>>>,
    vote_gate: Arc<RwLock<Option<VoteGate>>>,
    address_book: RwLock<Option<AddressBook>>,
    /// The newest protocol version this node offers.
    protocol: u32,
    /// The protocol version last agreed with each node, on a connection either way.
    protocols: Protocols,
    /// Looked-up host names: the address and when it was looked up.
    names: Mutex<HashMap<String, (SocketAddr, tokio::time::Instant)>>,
    serve: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Outgoing requests wait up to this long, µs (see the module doc; 0: not at all).
    send_delay_us: AtomicU64,
    /// Peers this node sends nothing to (see the module doc; fault tests only).
    cut: RwLock<Vec<SocketAddr>>,
    /// Whether `cut` names anyone: one atomic load per request when it does not.
    any_cut: std::sync::atomic::AtomicBool,
}

impl RaftTransport {
    /// Binds `addr` as node `tls.node_id()` and starts serving requests for the groups in
    /// `registry` (and, once one is set, the peer handler).
    pub fn bind(
        addr: SocketAddr,
        tls: &NodeTls,
        registry: GroupRegistry,
    ) -> Result<Arc<Self>, TransportError> {
        let mut endpoint = quinn::Endpoint::server(tls.server_config()?, addr)
            .map_err(|source| TransportError::Bind { addr, source })?;
        endpoint.set_default_client_config(tls.client_config()?);
        let handler: Arc<RwLock<Option<Arc<dyn PeerHandler>>>> = Arc::default();
        let append_hook: Arc<RwLock<Option<AppendHook>>> = Arc::default();
        let vote_gate: Arc<RwLock<Option<VoteGate>>> = Arc::default();
        let protocols = Protocols::default();
        let transport = Arc::new(RaftTransport {
            me: tls.node_id(),
            endpoint: endpoint.clone(),
            peers: Mutex::new(HashMap::new()),
            connect_timeout: Duration::from_secs(2),
            handler: Arc::clone(&handler),
            append_hook: Arc::clone(&append_hook),
            vote_gate: Arc::clone(&vote_gate),
            address_book: RwLock::new(None),
            protocol: tls.newest_protocol(),
            protocols: protocols.clone(),
            names: Mutex::new(HashMap::new()),
            serve: Mutex::new(None),
            send_delay_us: AtomicU64::new(0),
            cut: RwLock::new(Vec::new()),
            any_cut: std::sync::atomic::AtomicBool::new(false),
        });
        let handle = tokio::spawn(serve(
            endpoint,
            registry,
            Hooks {
                handler,
                append: append_hook,
                vote: vote_gate,
                protocols,
            },
        ));
        *transport.serve.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(transport)
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.me
    }

    /// Holds every outgoing request for a random time in `[delay / 2, delay]` from now on
    /// (zero: none). For fault tests only: see the module doc.
    pub fn set_send_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.send_delay_us.store(us, Ordering::Relaxed);
    }

    /// Sends nothing to the peers at `addrs` from now on (empty: to everyone again): a partition
    /// at the application's level, for fault tests on one host only (see the module doc).
    pub fn set_cut(&self, addrs: Vec<SocketAddr>) {
        self.any_cut.store(!addrs.is_empty(), Ordering::Relaxed);
        *self.cut.write().unwrap_or_else(|p| p.into_inner()) = addrs;
    }

    /// Registers the hook told of every write replicated to this node (see [`AppendHook`]).
    pub fn set_append_hook(&self, hook: AppendHook) {
        *self.append_hook.write().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// Registers the gate of vote requests (see [`VoteGate`]).
    pub fn set_vote_gate(&self, gate: VoteGate) {
        *self.vote_gate.write().unwrap_or_else(|p| p.into_inner()) = Some(gate);
    }

    /// The newest protocol version this node speaks (see [`tls::PEER_PROTOCOL`]).
    pub fn protocol(&self) -> u32 {
        self.protocol
    }

    /// The protocol version agreed with `node` on the last connection to or from it whose
    /// certificate was checked to be that node's; `None` if there was none since this node
    /// started.
    pub fn peer_protocol(&self, node: NodeId) -> Option<u32> {
        self.protocols.get(node)
    }

    /// Registers where nodes are reachable now (see [`AddressBook`]).
    pub fn set_address_book(&self, book: AddressBook) {
        *self.address_book.write().unwrap_or_else(|p| p.into_inner()) = Some(book);
    }

    /// Where node `node` is reachable now, if the address book knows.
    pub fn address_of(&self, node: NodeId) -> Option<String> {
        let book = self
            .address_book
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        book.and_then(|book| book(node))
    }

    /// `addr` (`ip:port`, or `host:port` looked up at most every [`NAME_TTL`]) as a socket
    /// address; of a name's addresses, the first of the endpoint's family.
    pub async fn resolve(&self, addr: &str) -> Result<SocketAddr, TransportError> {
        if let Ok(a) = addr.parse::<SocketAddr>() {
            return Ok(a);
        }
        let now = tokio::time::Instant::now();
        if let Some((a, at)) = self.names.lock().unwrap_or_else(|p| p.into_inner()).get(addr) {
            if now.duration_since(*at) < NAME_TTL {
                return Ok(*a);
            }
        }
        if !addr.contains(':') {
            return Err(TransportError::BadAddress { addr: addr.into() });
        }
        let found: Vec<SocketAddr> = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| TransportError::Connect {
                addr: addr.into(),
                reason: format!("cannot look up the host name: {e}"),
            })?
            .collect();
        let v4 = self.endpoint.local_addr().map_or(true, |a| a.is_ipv4());
        let chosen = found
            .iter()
            .find(|a| a.is_ipv4() == v4)
            .or(found.first())
            .copied()
            .ok_or_else(|| TransportError::Connect {
                addr: addr.into(),
                reason: "the host name has no address".into(),
            })?;
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if names.get(addr).is_none_or(|(a, _)| *a != chosen) {
            tracing::info!(name = addr, address = %chosen, "peer host name looked up");
        }
        names.insert(addr.into(), (chosen, now));
        Ok(chosen)
    }

    /// Sends `body` to node `node` — at the address book's address for it, else at `known` —
    /// checked to be that node, and waits for its answer.
    pub async fn call_node(
        &self,
        node: NodeId,
        known: &str,
        body: RpcBody,
    ) -> Result<RpcResponse, TransportError> {
        let addr = match self.address_of(node) {
            Some(now) => self.resolve(&now).await?,
            None => self.resolve(known).await?,
        };
        self.call(addr, Some(node), body).await
    }

    /// Registers the handler of peer messages (replacing any earlier one).
    pub fn set_peer_handler(&self, handler: Arc<dyn PeerHandler>) {
        *self.handler.write().unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint.local_addr().map_err(|source| TransportError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })
    }

    /// Stops serving and closes every connection.
    pub async fn shutdown(&self) {
        if let Some(h) = self.serve.lock().unwrap_or_else(|p| p.into_inner()).take() {
            h.abort();
        }
        self.endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
        // Bounded: a peer that never acknowledges the close does not hold shutdown up.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    /// A connection to `addr`, checked to be node `expect`'s if given.
    async fn connection(
        &self,
        addr: SocketAddr,
        expect: Option<NodeId>,
    ) -> Result<quinn::Connection, TransportError> {
        let peer = {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(peers.entry(addr).or_default())
        };
        let connect_err = |reason: String| TransportError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let mut finished = peer.attempts.subscribe();
        {
            let mut slot = peer.slot.lock().unwrap_or_else(|p| p.into_inner());
            if slot.conn.as_ref().is_some_and(|c| c.close_reason().is_none()) {
                return self.checked(&mut slot, addr, expect);
            }
            if slot.connecting {
                return Err(connect_err("a connection attempt is under way".into()));
            }
            let now = tokio::time::Instant::now();
            if let Some(at) = slot.retry_at.filter(|at| *at > now) {
                return Err(connect_err(format!(
                    "unreachable ({} attempts failed, last: {}); next attempt in {:?}",
                    slot.failures,
                    slot.last_error,
                    at - now
                )));
            }
            slot.connecting = true;
            finished.mark_unchanged();
        }
        tokio::spawn(Self::attempt(
            self.endpoint.clone(),
            addr,
            self.connect_timeout,
            Arc::clone(&peer),
        ));
        // The attempt reports through `attempts` however long this caller stays.
        let _ = finished.changed().await;
        let mut slot = peer.slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.conn.as_ref().is_some_and(|c| c.close_reason().is_none()) {
            self.checked(&mut slot, addr, expect)
        } else {
            Err(connect_err(slot.last_error.clone()))
        }
    }

    /// One connection attempt to `addr`; its outcome goes into `peer`'s slot.
    async fn attempt(endpoint: quinn::Endpoint, addr: SocketAddr, within: Duration, peer: Arc<Peer>) {
        let outcome = async {
            let connecting = endpoint
                .connect(addr, tls::NODE_SERVER_NAME)
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(within, connecting)
                .await
                .map_err(|_| "timed out".to_string())?
                .map_err(|e| connect_failure(&e))
        }
        .await;
        {
            let mut slot = peer.slot.lock().unwrap_or_else(|p| p.into_inner());
            slot.connecting = false;
            match outcome {
                Ok(conn) => {
                    tracing::debug!(%addr, "connected to peer");
                    slot.conn = Some(conn);
                    slot.verified = None;
                    slot.failures = 0;
                    slot.retry_at = None;
                }
                Err(reason) => {
                    slot.failures = slot.failures.saturating_add(1);
                    slot.retry_at = Some(tokio::time::Instant::now() + reconnect_backoff(slot.failures));
                    tracing::debug!(%addr, failures = slot.failures, %reason, "cannot connect to peer");
                    slot.last_error = reason;
                }
            }
        }
        peer.attempts.send_modify(|n| *n += 1);
    }

    /// The slot's connection, once its certificate is checked to be node `expect`'s.
    fn checked(
        &self,
        slot: &mut PeerSlot,
        addr: SocketAddr,
        expect: Option<NodeId>,
    ) -> Result<quinn::Connection, TransportError> {
        let Some(conn) = slot.conn.clone() else {
            return Err(TransportError::Connect {
                addr: addr.to_string(),
                reason: "no connection".into(),
            });
        };
        if let Some(id) = expect {
            if slot.verified != Some(id) {
                if !peer_cert(&conn).is_some_and(|c| tls::cert_is_for_node(&c, id)) {
                    slot.conn = None;
                    conn.close(quinn::VarInt::from_u32(1), b"wrong node");
                    return Err(TransportError::WrongPeer {
                        addr: addr.to_string(),
                        expected: id,
                    });
                }
                slot.verified = Some(id);
                self.protocols.agreed(id, &conn);
            }
        }
        Ok(conn)
    }

    /// Sends `body` to the node at `addr` (checked to be node `expect`, if given) and waits for
    /// its answer.
    pub async fn call(
        &self,
        addr: SocketAddr,
        expect: Option<NodeId>,
        body: RpcBody,
    ) -> Result<RpcResponse, TransportError> {
        if self.any_cut.load(Ordering::Relaxed)
            && self.cut.read().unwrap_or_else(|p| p.into_inner()).contains(&addr)
        {
            return Err(TransportError::Rpc {
                addr: addr.to_string(),
                reason: "cut off from this peer by a fault test".into(),
            });
        }
        let delay = self.send_delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            // Jitter from the clock's nanoseconds: random enough to reorder, no generator.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::from(d.subsec_nanos()));
            let us = delay - nanos % (delay / 2 + 1);
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
        let conn = self.connection(addr, expect).await?;
        let rpc_err = |reason: String| TransportError::Rpc {
            addr: addr.to_string(),
            reason,
        };
        let req = RpcRequest { from: self.me, body };
        let bytes = nearby_index::codec::encode(&req).map_err(|e| rpc_err(e.to_string()))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| rpc_err(e.to_string()))?;
        send.write_all(&bytes).await.map_err(|e| rpc_err(e.to_string()))?;
        send.finish().map_err(|e| rpc_err(e.to_string()))?;
        let answer = recv
            .read_to_end(MAX_MESSAGE_BYTES)
            .await
            .map_err(|e| rpc_err(e.to_string()))?;
        nearby_index::codec::decode(&answer).map_err(|e| TransportError::Malformed {
            addr: addr.to_string(),
            reason: e.to_string(),
        })
    }

    /// Sends a peer message to the node at `addr` (node `expect`, if known) and returns the
    /// handler's answer.
    pub async fn call_peer(
        &self,
        addr: SocketAddr,
        expect: Option<NodeId>,
        message: Vec<u8>,
    ) -> Result<Vec<u8>, TransportError> {
        match self.call(addr, expect, RpcBody::Peer(message)).await? {
            RpcResponse::Peer(answer) => Ok(answer),
            RpcResponse::Refused(reason) | RpcResponse::Malformed(reason) => Err(TransportError::Rpc {
                addr: addr.to_string(),
                reason,
            }),
            other => Err(TransportError::Malformed {
                addr: addr.to_string(),
                reason: format!("unexpected answer to a peer message: {other:?}"),
            }),
        }
    }
}

impl Drop for RaftTransport {
    fn drop(&mut self) {
        if let Some(h) = self.serve.lock().unwrap_or_else(|p| p.into_inner()).take() {
            h.abort();
        }
    }
}

/// Why a connection attempt failed, in words an operator can act on: a peer that shares no
/// protocol version with this node is told apart (and logged as a warning), the rest as quinn
/// says.
fn connect_failure(e: &quinn::ConnectionError) -> String {
    // TLS alert 120, no_application_protocol: the ALPN ids (protocol versions) do not overlap.
    let no_common_version = matches!(e, quinn::ConnectionError::ConnectionClosed(c)
        if c.error_code == quinn::TransportErrorCode::crypto(120));
    if !no_common_version {
        return e.to_string();
    }
    let why = format!(
        "the peer speaks no node-to-node protocol version this node speaks ({}..={}): a build \
         from before versioning or too far apart (docs/operations.md, \"Rolling upgrade\")",
        tls::OLDEST_PEER_PROTOCOL,
        tls::PEER_PROTOCOL
    );
    tracing::warn!(%why, "cannot connect to a peer");
    why
}

/// The end-entity certificate the peer of `conn` presented.
fn peer_cert(conn: &quinn::Connection) -> Option<rustls::pki_types::CertificateDer<'static>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().cloned()
}

/// Who an incoming connection's certificate was checked to be.
struct Caller {
    cert: Option<rustls::pki_types::CertificateDer<'static>>,
    verified: Mutex<Option<NodeId>>,
    conn: quinn::Connection,
    protocols: Protocols,
}

impl Caller {
    /// Whether the connection may speak as node `from`.
    fn is(&self, from: NodeId) -> bool {
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if *verified == Some(from) {
            return true;
        }
        let ok = self.cert.as_ref().is_some_and(|c| tls::cert_is_for_node(c, from));
        if ok {
            *verified = Some(from);
            self.protocols.agreed(from, &self.conn);
        }
        ok
    }
}

/// What the serving side calls out to.
#[derive(Clone)]
struct Hooks {
    handler: Arc<RwLock<Option<Arc<dyn PeerHandler>>>>,
    append: Arc<RwLock<Option<AppendHook>>>,
    vote: Arc<RwLock<Option<VoteGate>>>,
    protocols: Protocols,
}

/// The protocol version agreed with each peer node (see [`tls::PEER_PROTOCOL`]).
#[derive(Clone, Default)]
struct Protocols(Arc<Mutex<HashMap<NodeId, u32>>>);

impl Protocols {
    /// Records the version `conn`'s handshake agreed on, for `node` (checked to be its peer).
    fn agreed(&self, node: NodeId, conn: &quinn::Connection) {
        let Some(v) = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol.as_deref().and_then(tls::protocol_of_alpn))
        else {
            return;
        };
        let before = self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(node, v);
        if before != Some(v) {
            tracing::info!(node, protocol = v, "node-to-node protocol agreed with a peer");
        }
    }

    fn get(&self, node: NodeId) -> Option<u32> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .copied()
    }
}

/// Accepts peer connections until the endpoint closes; each connection's streams are served
/// concurrently, so one slow group never delays another's messages.
async fn serve(endpoint: quinn::Endpoint, registry: GroupRegistry, hooks: Hooks) {
    let mut conns = JoinSet::new();
    while let Some(incoming) = endpoint.accept().await {
        let registry = Arc::clone(&registry);
        let hooks = hooks.clone();
        conns.spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "peer handshake failed");
                    return;
                }
            };
            let peer = conn.remote_address();
            let caller = Arc::new(Caller {
                cert: peer_cert(&conn),
                verified: Mutex::new(None),
                conn: conn.clone(),
                protocols: hooks.protocols.clone(),
            });
            let mut streams = JoinSet::new();
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        streams.spawn(handle_stream(
                            send,
                            recv,
                            Arc::clone(&registry),
                            hooks.clone(),
                            Arc::clone(&caller),
                        ));
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "peer connection closed");
                        break;
                    }
                }
                // Reap finished handlers so the set stays small on long-lived connections.
                while streams.try_join_next().is_some() {}
            }
        });
        while conns.try_join_next().is_some() {}
    }
}

async fn handle_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    registry: GroupRegistry,
    hooks: Hooks,
    caller: Arc<Caller>,
) {
    let response = match recv.read_to_end(MAX_MESSAGE_BYTES).await {
        Ok(bytes) => match nearby_index::codec::decode::<RpcRequest>(&bytes) {
            Ok(req) if !caller.is(req.from) => {
                RpcResponse::Refused(format!("the connection's certificate is not node {}'s", req.from))
            }
            Ok(req) => dispatch(req, &registry, &hooks).await,
            Err(e) => RpcResponse::Malformed(e.to_string()),
        },
        Err(e) => RpcResponse::Malformed(e.to_string()),
    };
    let bytes = match nearby_index::codec::encode(&response) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode an rpc response");
            return;
        }
    };
    if send.write_all(&bytes).await.is_ok() {
        let _ = send.finish();
    }
}

/// Whether a Raft message's vote is the sender's own: a node may only lead or campaign as itself.
fn vote_is(vote: &Vote, from: NodeId) -> bool {
    vote.leader_id().voted_for() == Some(from)
}

async fn dispatch(req: RpcRequest, registry: &GroupRegistry, hooks: &Hooks) -> RpcResponse {
    let from = req.from;
    let lookup = |group: GroupId| {
        registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
    };
    let not_own = || {
        RpcResponse::Refused(format!(
            "node {from} sent a Raft message with another node's vote"
        ))
    };
    match req.body {
        RpcBody::Peer(message) => {
            let h = hooks.handler.read().unwrap_or_else(|p| p.into_inner()).clone();
            match h {
                Some(h) => RpcResponse::Peer(h.handle(from, message).await),
                None => RpcResponse::Refused("this node does not serve peer messages yet".into()),
            }
        }
        RpcBody::AppendEntries { group, req } => match lookup(group) {
            None => RpcResponse::UnknownGroup,
            Some(raft) if vote_is(&req.vote, from) => {
                if !req.entries.is_empty() {
                    let hook = hooks.append.read().unwrap_or_else(|p| p.into_inner()).clone();
                    if let Some(hook) = hook {
                        hook(group);
                    }
                }
                RpcResponse::AppendEntries(raft.append_entries(req).await)
            }
            Some(_) => not_own(),
        },
        RpcBody::Vote { group, req } => match lookup(group) {
            None => RpcResponse::UnknownGroup,
            Some(raft) if vote_is(&req.vote, from) => {
                let gate = hooks.vote.read().unwrap_or_else(|p| p.into_inner()).clone();
                if gate.is_some_and(|may| !may(group, from)) {
                    return RpcResponse::Refused(format!(
                        "group {group} sleeps here under a leader that is alive"
                    ));
                }
                RpcResponse::Vote(raft.vote(req).await)
            }
            Some(_) => not_own(),
        },
        RpcBody::InstallSnapshot { group, req } => match lookup(group) {
            None => RpcResponse::UnknownGroup,
            Some(raft) if vote_is(&req.vote, from) => {
                RpcResponse::InstallSnapshot(raft.install_snapshot(req).await)
            }
            Some(_) => not_own(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    impl PeerHandler for Echo {
        fn handle(&self, from: NodeId, message: Vec<u8>) -> PeerReply {
            Box::pin(async move {
                let mut answer = from.to_le_bytes().to_vec();
                answer.extend(message);
                answer
            })
        }
    }

    /// Sends `req` over a connection that presents `tls`'s certificate, bypassing the
    /// transport's own `from`.
    async fn send_as(tls: &NodeTls, to: SocketAddr, req: &RpcRequest) -> RpcResponse {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        ep.set_default_client_config(tls.client_config().expect("client config"));
        let conn = ep
            .connect(to, tls::NODE_SERVER_NAME)
            .expect("connect")
            .await
            .expect("handshake");
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        send.write_all(&nearby_index::codec::encode(req).expect("encode"))
            .await
            .expect("write");
        send.finish().expect("finish");
        let bytes = recv.read_to_end(MAX_MESSAGE_BYTES).await.expect("read");
        nearby_index::codec::decode(&bytes).expect("decode")
    }

    /// A transport of `tls`'s node on a loopback port, answering peer messages with [`Echo`].
    fn loopback(tls: &NodeTls) -> Arc<RaftTransport> {
        let t = RaftTransport::bind(
            "127.0.0.1:0".parse().expect("addr"),
            tls,
            GroupRegistry::default(),
        )
        .expect("bind");
        t.set_peer_handler(Arc::new(Echo));
        t
    }

    #[tokio::test]
    async fn a_peer_can_speak_only_as_the_node_its_certificate_names() {
        let ca = ClusterCa::generate("t").expect("ca");
        let server = loopback(&ca.issue_node(1).expect("tls"));
        let addr = server.local_addr().expect("addr");
        let node2 = ca.issue_node(2).expect("tls");
        let honest = RpcRequest {
            from: 2,
            body: RpcBody::Peer(b"hi".to_vec()),
        };
        match send_as(&node2, addr, &honest).await {
            RpcResponse::Peer(a) => assert_eq!(a, [&2u64.to_le_bytes()[..], b"hi"].concat()),
            other => panic!("honest peer refused: {other:?}"),
        }
        let forged = RpcRequest {
            from: 3,
            body: RpcBody::Peer(b"hi".to_vec()),
        };
        assert!(matches!(
            send_as(&node2, addr, &forged).await,
            RpcResponse::Refused(_)
        ));

        // The transport's own calls check the server too: node 1 is not node 5.
        let client = loopback(&node2);
        assert!(client.call_peer(addr, Some(1), b"x".to_vec()).await.is_ok());
        assert!(matches!(
            client.call_peer(addr, Some(5), b"x".to_vec()).await,
            Err(TransportError::WrongPeer { expected: 5, .. })
        ));
        client.shutdown().await;
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_node_is_dialled_where_the_address_book_says_by_ip_or_host_name() {
        let ca = ClusterCa::generate("t").expect("ca");
        let server = loopback(&ca.issue_node(1).expect("tls"));
        let port = server.local_addr().expect("addr").port();
        let client = loopback(&ca.issue_node(2).expect("tls"));
        let peer = || RpcBody::Peer(b"x".to_vec());
        // Where a membership recorded node 1 once: nothing listens there now.
        let stale = "127.0.0.1:9".to_string();
        assert!(client.call_node(1, &stale, peer()).await.is_err());
        // A host name, looked up (the endpoint is IPv4: the IPv4 address of "localhost").
        let named = format!("localhost:{port}");
        assert_eq!(
            client.resolve(&named).await.expect("resolve"),
            SocketAddr::from(([127, 0, 0, 1], port))
        );
        assert!(client.call_node(1, &named, peer()).await.is_ok());
        // The book's address wins over the one the caller knew.
        client.set_address_book(Arc::new(move |node| (node == 1).then(|| named.clone())));
        assert!(matches!(
            client.call_node(1, &stale, peer()).await,
            Ok(RpcResponse::Peer(_))
        ));
        assert!(matches!(
            client.resolve("no-port-here").await,
            Err(TransportError::BadAddress { .. })
        ));
        client.shutdown().await;
        server.shutdown().await;
    }

    #[tokio::test]
    async fn peers_agree_on_the_newest_protocol_both_speak_and_remember_it_per_node() {
        let ca = ClusterCa::generate("t").expect("ca");
        // Nodes 1 and 3 are a build newer than this one (they speak its version and the next);
        // node 2 is this build.
        let next = tls::PEER_PROTOCOL + 1;
        let newer = loopback(&ca.issue_node(1).expect("tls").speaking_up_to(next));
        let other_newer = loopback(&ca.issue_node(3).expect("tls").speaking_up_to(next));
        let this = loopback(&ca.issue_node(2).expect("tls"));
        assert_eq!(newer.protocol(), tls::PEER_PROTOCOL + 1);
        assert_eq!(this.peer_protocol(1), None, "nothing agreed before a connection");
        // Outgoing from the newer node: the version both speak.
        let at = |t: &RaftTransport| t.local_addr().expect("addr");
        newer
            .call_peer(at(&this), Some(2), b"x".to_vec())
            .await
            .expect("call");
        assert_eq!(newer.peer_protocol(2), Some(tls::PEER_PROTOCOL));
        // Incoming on this build's node, once the caller proved who it is.
        assert_eq!(this.peer_protocol(1), Some(tls::PEER_PROTOCOL));
        // Two newer nodes speak their newest.
        newer
            .call_peer(at(&other_newer), Some(3), b"x".to_vec())
            .await
            .expect("call");
        assert_eq!(newer.peer_protocol(3), Some(tls::PEER_PROTOCOL + 1));
        assert_eq!(other_newer.peer_protocol(1), Some(tls::PEER_PROTOCOL + 1));
        // A build from before versioning (it says only "nearby-raft/2") is refused, and the
        // error says why.
        let old = loopback(&ca.issue_node(4).expect("tls").speaking_only(2));
        match this.call_peer(at(&old), Some(4), b"x".to_vec()).await {
            Err(TransportError::Connect { reason, .. }) => {
                assert!(reason.contains("no node-to-node protocol version"), "{reason}");
            }
            other => panic!("a pre-versioning peer was spoken to: {other:?}"),
        }
        assert_eq!(this.peer_protocol(4), None);
        old.shutdown().await;
        assert_eq!(tls::protocol_of_alpn(b"nearby-raft/7"), Some(7));
        assert_eq!(tls::protocol_of_alpn(b"h3"), None);
        for t in [newer, other_newer, this] {
            t.shutdown().await;
        }
    }
}
