//! One running node: the shard groups it hosts, its core, and its client service, started and
//! stopped together. `nearby-node dev`, `nearby-node run` and the in-process tests all start a
//! node through [`Node::start`].

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nearby_raft::transport::NodeTls;
use nearby_raft::{HostConfig, NodeId, RaftHost};

use crate::auth::{TokenSigner, TokenVerifier};
use crate::clock::Clock;
use crate::core::{Core, ServiceConfig};
use crate::service::tls::ServerTls;
use crate::service::{Service, ServiceOptions};
use crate::shards::initial_ranges;

/// Everything a node is started with.
pub struct NodeOptions {
    /// This node's id.
    pub node_id: NodeId,
    /// Data directory.
    pub data: PathBuf,
    /// UDP address of the client service.
    pub client_listen: SocketAddr,
    /// UDP address of the node-to-node Raft transport.
    pub raft_listen: SocketAddr,
    /// Shard groups the user-id space is cut into (a fresh single-node cluster).
    pub groups: u64,
    /// The client service's TLS identity.
    pub server_tls: ServerTls,
    /// The node's identity towards its peers.
    pub node_tls: NodeTls,
    /// Verifies session tokens.
    pub verifier: TokenVerifier,
    /// Dev mode: issues tokens to anyone who asks.
    pub dev_signer: Option<Arc<TokenSigner>>,
    /// Client-facing settings.
    pub service: ServiceConfig,
    /// The clock (tests inject a manual one).
    pub clock: Arc<dyn Clock>,
    /// QUIC transport settings of the client service.
    pub transport: crate::service::tls::Transport,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The store could not start.
    #[error(transparent)]
    Host(#[from] nearby_raft::error::HostError),
    /// A group elected no leader in time.
    #[error("group {group} elected no leader within {waited:?}")]
    NoLeader {
        /// The group.
        group: u64,
        /// How long it waited.
        waited: Duration,
    },
    /// The client service could not start.
    #[error(transparent)]
    Service(#[from] crate::service::ServiceStartError),
    /// Anything else about the setup.
    #[error("{0}")]
    Setup(String),
}

/// A started node.
pub struct Node {
    host: RaftHost,
    core: Arc<Core>,
    service: Service<Core>,
    client_addr: SocketAddr,
}

impl Node {
    /// Starts the store (recovering it), the groups (creating them on a fresh node, with this
    /// node as their only voter), the core and the client service.
    pub async fn start(opts: NodeOptions) -> Result<Node, NodeError> {
        let host = RaftHost::start(HostConfig::new(
            opts.node_id,
            &opts.data,
            opts.raft_listen,
            opts.node_tls,
        ))
        .await?;
        match Self::start_groups(&host, opts.groups).await {
            Ok(groups) => {
                let shed = opts.service.shed;
                let core = Arc::new(Core::new(groups, opts.clock, opts.service).map_err(NodeError::Setup)?);
                let mut sopts = ServiceOptions::new(opts.client_listen, opts.server_tls, opts.verifier);
                sopts.dev_signer = opts.dev_signer;
                sopts.transport = opts.transport;
                sopts.shed = shed;
                let service = match Service::bind(sopts, Arc::clone(&core)) {
                    Ok(s) => s,
                    Err(e) => {
                        host.shutdown().await;
                        return Err(e.into());
                    }
                };
                let client_addr = service
                    .local_addr()
                    .map_err(|e| NodeError::Setup(format!("client service address: {e}")))?;
                tracing::info!(%client_addr, "client service listening");
                Ok(Node {
                    host,
                    core,
                    service,
                    client_addr,
                })
            }
            Err(e) => {
                host.shutdown().await;
                Err(e)
            }
        }
    }

    async fn start_groups(host: &RaftHost, n: u64) -> Result<Vec<nearby_raft::ShardGroup>, NodeError> {
        let members: BTreeMap<u64, nearby_raft::Node> = [(host.node_id(), host.node())].into();
        let mut groups = Vec::new();
        for (id, range) in initial_ranges(n) {
            let group = host.open_group(id, range).await?;
            if !group.raft().is_initialized().await.unwrap_or(false) {
                group.initialize(members.clone()).await?;
            }
            let waited = Duration::from_secs(10);
            group
                .raft()
                .wait(Some(waited))
                .current_leader(host.node_id(), "this node leads its groups")
                .await
                .map_err(|_| NodeError::NoLeader { group: id, waited })?;
            tracing::info!(group = id, %range, "shard group ready");
            groups.push(group);
        }
        Ok(groups)
    }

    /// Loads a bulk-import file into this node's groups (idempotent: users already registered
    /// stay as they are). Reports progress every 5 % of batches.
    pub async fn import(&self, seed: &nearby_raft::seed::Seed) -> Result<(), NodeError> {
        let groups = self.host.groups();
        let batches: Vec<(nearby_raft::ShardGroup, nearby_raft::ImportBatch)> = groups
            .iter()
            .flat_map(|g| {
                seed.batches_for(g.range())
                    .into_iter()
                    .map(move |b| (g.clone(), b))
            })
            .collect();
        let total = batches.len();
        let started = std::time::Instant::now();
        tracing::info!(
            users = seed.users.len(),
            friendships = seed.friendships.len(),
            batches = total,
            "importing"
        );
        let mut skipped = 0;
        for (i, (group, batch)) in batches.into_iter().enumerate() {
            let r = group
                .propose(nearby_raft::Command::Import(batch))
                .await
                .map_err(|e| NodeError::Setup(format!("import into group {}: {e}", group.id())))?;
            if let nearby_raft::CommandResult::Imported { skipped: s, .. } = r {
                skipped += s;
            }
            if (i + 1) % (total / 20).max(1) == 0 {
                tracing::info!(done = i + 1, of = total, "import progress");
            }
        }
        tracing::info!(elapsed = ?started.elapsed(), skipped, "import done");
        Ok(())
    }

    /// Where clients connect.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The core, for in-process tools and tests.
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Serves until `shutdown` completes, then stops cleanly: sessions are told to reconnect,
    /// groups stop, the transport closes (the WAL holds nothing unsynced that was acknowledged).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        self.service.run(shutdown).await;
        self.host.shutdown().await;
    }
}
