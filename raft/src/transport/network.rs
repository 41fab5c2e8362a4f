//! openraft's `RaftNetworkFactory`/`RaftNetwork` for one group, over the node's shared
//! [`RaftTransport`].

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::{RaftTransport, RpcBody, RpcResponse};
use crate::error::TransportError;
use crate::{GroupId, Node, NodeId, TypeConfig};

/// The longest pause of a group's replication to a peer that could not be reached.
pub const MAX_RAFT_BACKOFF: Duration = Duration::from_secs(4);

/// Makes per-peer network clients for one group.
#[derive(Clone)]
pub struct NetworkFactory {
    transport: Arc<RaftTransport>,
    group: GroupId,
    me: NodeId,
}

impl NetworkFactory {
    /// The factory for `group` on the transport's node.
    pub fn new(transport: Arc<RaftTransport>, group: GroupId) -> Self {
        let me = transport.node_id();
        NetworkFactory { transport, group, me }
    }
}

/// One group's client to one peer.
pub struct PeerClient {
    transport: Arc<RaftTransport>,
    group: GroupId,
    me: NodeId,
    target: NodeId,
    /// The address the group's membership recorded for the target (the transport's address
    /// book may know a newer one).
    known: String,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        PeerClient {
            transport: Arc::clone(&self.transport),
            group: self.group,
            me: self.me,
            target,
            known: node.raft.clone(),
        }
    }
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<NodeId, Node, RaftError<NodeId, E>>>;

impl PeerClient {
    /// Sends `body` and returns the answer, mapping transport failures to openraft's errors:
    /// unreachable (connect failed: back off), timeout, or network (retry).
    async fn call<E: std::error::Error>(
        &self,
        body: RpcBody,
        action: RPCTypes,
        option: &RPCOption,
    ) -> Result<RpcResponse, RPCError<NodeId, Node, RaftError<NodeId, E>>> {
        let ttl = option.hard_ttl();
        let call = self.transport.call_node(self.target, &self.known, body);
        match tokio::time::timeout(ttl, call).await {
            Err(_) => Err(RPCError::Timeout(Timeout {
                action,
                id: self.me,
                target: self.target,
                timeout: ttl,
            })),
            Ok(Err(
                e @ (TransportError::Connect { .. }
                | TransportError::WrongPeer { .. }
                | TransportError::BadAddress { .. }),
            )) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Ok(Err(e)) => Err(RPCError::Network(NetworkError::new(&e))),
            Ok(Ok(RpcResponse::UnknownGroup)) => {
                let e = TransportError::UnknownGroup {
                    addr: self.known.clone(),
                    group: self.group,
                };
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Ok(Ok(RpcResponse::Malformed(reason) | RpcResponse::Refused(reason))) => {
                let e = TransportError::Malformed {
                    addr: self.known.clone(),
                    reason,
                };
                Err(RPCError::Network(NetworkError::new(&e)))
            }
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    fn unexpected<E: std::error::Error>(
        &self,
        resp: &RpcResponse,
    ) -> RPCError<NodeId, Node, RaftError<NodeId, E>> {
        let e = TransportError::Malformed {
            addr: self.known.clone(),
            reason: format!("unexpected answer {resp:?}"),
        };
        RPCError::Network(NetworkError::new(&e))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    /// Between retries to a peer that could not be reached: 200 ms, doubling up to
    /// [`MAX_RAFT_BACKOFF`] — a dead node costs each group an attempt every few seconds, and a
    /// node that comes back hears from each of its groups within that.
    fn backoff(&self) -> Backoff {
        Backoff::new(
            (0u32..)
                .map(|i| (Duration::from_millis(200) * 2u32.saturating_pow(i.min(8))).min(MAX_RAFT_BACKOFF)),
        )
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        match self
            .call(
                RpcBody::AppendEntries {
                    group: self.group,
                    req: rpc,
                },
                RPCTypes::AppendEntries,
                &option,
            )
            .await?
        {
            RpcResponse::AppendEntries(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self
            .call(
                RpcBody::InstallSnapshot {
                    group: self.group,
                    req: rpc,
                },
                RPCTypes::InstallSnapshot,
                &option,
            )
            .await?
        {
            RpcResponse::InstallSnapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(&other)),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        let body = RpcBody::Vote {
            group: self.group,
            req: rpc,
        };
        match self.call(body, RPCTypes::Vote, &option).await? {
            RpcResponse::Vote(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(self.unexpected(&other)),
        }
    }
}
