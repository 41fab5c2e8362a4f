//! The node-to-node Raft transport: QUIC (quinn) with mutual TLS, one connection per peer node
//! shared by every shard group, one bidirectional stream per RPC.
//!
//! # Why QUIC and not TCP
//!
//! Many groups share a connection. Over TCP one lost packet stalls every group's messages behind
//! it (head-of-line blocking) and a large snapshot chunk delays every heartbeat queued after it;
//! QUIC streams are independent, so a stream per RPC gives each group's message its own flow.
//! QUIC also brings TLS 1.3 with it, and quinn is already the client-facing protocol, so a node
//! runs one networking stack.
//!
//! # Messages
//!
//! A request stream carries one [`RpcRequest`] (encoded with [`nearby_index::codec`]); the
//! sender finishes its side and reads one [`RpcResponse`] to the end. Messages are bounded by
//! [`MAX_MESSAGE_BYTES`]; a larger one is refused by `read_to_end` before it is buffered whole.
//!
//! # Failure handling
//!
//! Every RPC has a deadline (openraft's `RPCOption::hard_ttl`). A failed connection is dropped
//! and the next RPC to that peer reconnects; openraft's backoff spaces the retries. A peer that
//! does not host the group (yet) answers [`RpcResponse::UnknownGroup`].

pub mod network;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
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
use crate::{GroupId, NodeId, Raft, TypeConfig};

pub use self::network::NetworkFactory;
pub use self::tls::{ClusterCa, NodeTls};

/// The largest RPC message accepted (a snapshot chunk plus headroom).
pub const MAX_MESSAGE_BYTES: usize = 32 << 20;

/// The groups this node serves, by id: where incoming RPCs are dispatched.
pub type GroupRegistry = Arc<RwLock<HashMap<GroupId, Raft>>>;

/// One RPC from a group's leader or candidate to a peer replica.
#[derive(Debug, Serialize, Deserialize)]
pub struct RpcRequest {
    /// The group addressed.
    pub group: GroupId,
    /// The message.
    pub body: RpcBody,
}

/// The Raft message of an [`RpcRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcBody {
    /// Replicate entries or heartbeat.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Request a vote.
    Vote(VoteRequest<NodeId>),
    /// One chunk of a snapshot.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
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
    /// The peer does not host the group.
    UnknownGroup,
    /// The peer could not decode the request.
    Malformed(String),
}

/// The node's transport endpoint: serves incoming RPCs to the registry's groups and sends
/// outgoing ones over one cached connection per peer.
pub struct RaftTransport {
    endpoint: quinn::Endpoint,
    peers: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Option<quinn::Connection>>>>>,
    connect_timeout: Duration,
    serve: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl RaftTransport {
    /// Binds `addr` and starts serving RPCs for the groups in `registry`.
    pub fn bind(
        addr: SocketAddr,
        tls: &NodeTls,
        registry: GroupRegistry,
    ) -> Result<Arc<Self>, TransportError> {
        let mut endpoint = quinn::Endpoint::server(tls.server_config()?, addr)
            .map_err(|source| TransportError::Bind { addr, source })?;
        endpoint.set_default_client_config(tls.client_config()?);
        let transport = Arc::new(RaftTransport {
            endpoint: endpoint.clone(),
            peers: Mutex::new(HashMap::new()),
            connect_timeout: Duration::from_secs(2),
            serve: Mutex::new(None),
        });
        let handle = tokio::spawn(serve(endpoint, registry));
        *transport.serve.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(transport)
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

    async fn connection(&self, addr: SocketAddr) -> Result<quinn::Connection, TransportError> {
        let slot = {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(peers.entry(addr).or_default())
        };
        let mut slot = slot.lock().await;
        if let Some(conn) = slot.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let connect_err = |reason: String| TransportError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let connecting = self
            .endpoint
            .connect(addr, tls::NODE_SERVER_NAME)
            .map_err(|e| connect_err(e.to_string()))?;
        let conn = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| connect_err("timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        tracing::debug!(%addr, "connected to peer");
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Sends one request to the node at `addr` and waits for its answer.
    pub async fn call(&self, addr: SocketAddr, req: &RpcRequest) -> Result<RpcResponse, TransportError> {
        let conn = self.connection(addr).await?;
        let rpc_err = |reason: String| TransportError::Rpc {
            addr: addr.to_string(),
            reason,
        };
        let bytes = nearby_index::codec::encode(req).map_err(|e| rpc_err(e.to_string()))?;
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
}

impl Drop for RaftTransport {
    fn drop(&mut self) {
        if let Some(h) = self.serve.lock().unwrap_or_else(|p| p.into_inner()).take() {
            h.abort();
        }
    }
}

/// Accepts peer connections until the endpoint closes; each connection's streams are served
/// concurrently, so one slow group never delays another's messages.
async fn serve(endpoint: quinn::Endpoint, registry: GroupRegistry) {
    let mut conns = JoinSet::new();
    while let Some(incoming) = endpoint.accept().await {
        let registry = Arc::clone(&registry);
        conns.spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "peer handshake failed");
                    return;
                }
            };
            let peer = conn.remote_address();
            let mut streams = JoinSet::new();
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        streams.spawn(handle_stream(send, recv, Arc::clone(&registry)));
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

async fn handle_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, registry: GroupRegistry) {
    let response = match recv.read_to_end(MAX_MESSAGE_BYTES).await {
        Ok(bytes) => match nearby_index::codec::decode::<RpcRequest>(&bytes) {
            Ok(req) => dispatch(req, &registry).await,
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

async fn dispatch(req: RpcRequest, registry: &GroupRegistry) -> RpcResponse {
    let raft = registry
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&req.group)
        .cloned();
    let Some(raft) = raft else {
        return RpcResponse::UnknownGroup;
    };
    match req.body {
        RpcBody::AppendEntries(r) => RpcResponse::AppendEntries(raft.append_entries(r).await),
        RpcBody::Vote(r) => RpcResponse::Vote(raft.vote(r).await),
        RpcBody::InstallSnapshot(r) => RpcResponse::InstallSnapshot(raft.install_snapshot(r).await),
    }
}
