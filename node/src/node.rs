//! One running node: its store, its part in the cluster, its gateway and its client service,
//! started and stopped together. `nearby-node dev`, `init`, `join`, `run` and the in-process
//! tests all start a node through [`Node::start`].
//!
//! # Start order
//!
//! 1. The client endpoint is bound first, so the node knows the client address it puts in the
//!    cluster map (a redirect names it).
//! 2. The store (WAL, transport) starts and reopens the replicas the data directory holds.
//! 3. The node comes into its cluster ([`crate::cluster::Bootstrap`]): initialises one, joins
//!    one, or restarts as a member — refusing files that disagree with the map.
//! 4. The gateway and the client service start; the node then waits (bounded) until every group
//!    has a leader, so the first clients are served rather than told to retry.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nearby_raft::transport::NodeTls;
use nearby_raft::{HostConfig, NodeId, NodeInfo, Payload, RaftHost, Reply};

use crate::api::ServiceConfig;
use crate::auth::{TokenSigner, TokenVerifier};
use crate::clock::{Clock, GuardedClock, OffsetClock};
use crate::cluster::{Bootstrap, Cluster, ClusterOptions};
use crate::gateway::Gateway;
use crate::service::tls::ServerTls;
use crate::service::{Listener, Service, ServiceOptions};
use crate::sessions::Sessions;

/// Everything a node is started with.
pub struct NodeOptions {
    /// This node's id.
    pub node_id: NodeId,
    /// Data directory.
    pub data: PathBuf,
    /// UDP address of the client service.
    pub client_listen: SocketAddr,
    /// The client address other nodes redirect to; the bound address if `None`.
    pub client_advertise: Option<String>,
    /// UDP address of the node-to-node transport.
    pub raft_listen: SocketAddr,
    /// The node-to-node address peers use; the bound address if `None`.
    pub raft_advertise: Option<String>,
    /// What to do on a fresh data directory.
    pub bootstrap: Bootstrap,
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
    /// Read `clock` through a [`GuardedClock`] that ignores its steps unless the other nodes
    /// confirm them (`crate::clock`): on for a real node (`nearby-node run` and `dev`); off by
    /// default, so a test's manual clock moves when the test moves it.
    pub guard_clock: bool,
    /// QUIC transport settings of the client service.
    pub transport: crate::service::tls::Transport,
    /// What carries the client service's connections.
    pub driver: crate::service::Driver,
    /// New sessions admitted per second (after a failover, clients return at this rate).
    pub sessions_per_s: u32,
    /// openraft's settings; nearby's defaults if `None`.
    pub raft: Option<openraft::Config>,
    /// Location history (kept under `data/history`).
    pub history: crate::history::HistoryConfig,
    /// Requests per second a session may send (sustained; bursts of twice that pass).
    pub requests_per_s: u32,
    /// A session's location updates closer together than this are refused.
    pub min_update_interval: Duration,
    /// The admin API (`crate::admin`); none if `None`.
    pub admin: Option<crate::admin::AdminOptions>,
    /// The write-ahead log's settings (segment size, the disk space it keeps free).
    pub wal: nearby_raft::wal::WalOptions,
    /// Limits on connections and handshakes per address; QUIC Retry under a flood.
    pub abuse: crate::service::AbuseLimits,
    /// How long a new connection may take to say `Hello`.
    pub hello_timeout: Duration,
}

impl NodeOptions {
    /// Options with nearby's defaults for a node `node_id` on `data`, listening on loopback
    /// ports chosen by the OS.
    pub fn new(
        node_id: NodeId,
        data: PathBuf,
        bootstrap: Bootstrap,
        server_tls: ServerTls,
        node_tls: NodeTls,
        verifier: TokenVerifier,
        clock: Arc<dyn Clock>,
    ) -> Self {
        NodeOptions {
            node_id,
            data,
            client_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            client_advertise: None,
            raft_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            raft_advertise: None,
            bootstrap,
            server_tls,
            node_tls,
            verifier,
            dev_signer: None,
            service: ServiceConfig::default(),
            clock,
            transport: Default::default(),
            driver: Default::default(),
            sessions_per_s: 5_000,
            raft: None,
            history: Default::default(),
            requests_per_s: 20,
            min_update_interval: Duration::from_millis(250),
            admin: None,
            wal: Default::default(),
            abuse: Default::default(),
            hello_timeout: Duration::from_secs(10),
            guard_clock: false,
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The store could not start.
    #[error(transparent)]
    Host(#[from] nearby_raft::error::HostError),
    /// The node could not come into its cluster.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The client service could not start.
    #[error(transparent)]
    Service(#[from] crate::service::ServiceStartError),
    /// The admin API could not start.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    /// Anything else about the setup.
    #[error("{0}")]
    Setup(String),
}

/// A started node.
pub struct Node {
    host: Arc<RaftHost>,
    cluster: Arc<Cluster>,
    gateway: Arc<Gateway>,
    service: Service<Gateway>,
    client_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    admin: Option<(tokio::task::JoinHandle<()>, tokio::sync::oneshot::Sender<()>)>,
    metrics: Arc<crate::metrics::ServiceMetrics>,
    retention: tokio::task::JoinHandle<()>,
    trimmer: tokio::task::JoinHandle<()>,
}

impl Node {
    /// Starts the node (see the start order in the module doc).
    pub async fn start(mut opts: NodeOptions) -> Result<Node, NodeError> {
        let shed = opts.service.shed;
        let mut sopts = ServiceOptions::new(opts.client_listen, opts.server_tls, opts.verifier);
        sopts.dev_signer = opts.dev_signer;
        sopts.transport = opts.transport;
        sopts.driver = opts.driver;
        sopts.shed = shed;
        sopts.min_update_interval = opts.min_update_interval;
        sopts.requests_per_s = opts.requests_per_s;
        sopts.abuse = opts.abuse;
        sopts.hello_timeout = opts.hello_timeout;
        let metrics = Arc::clone(&sopts.metrics);
        let listener = Listener::bind(sopts)?;
        let admin = match opts.admin {
            Some(a) => Some(crate::admin::AdminListener::bind(a).await?),
            None => None,
        };
        let admin_addr = match &admin {
            Some(a) => Some(
                a.local_addr()
                    .map_err(|e| NodeError::Setup(format!("admin API address: {e}")))?,
            ),
            None => None,
        };
        let client_addr = listener
            .local_addr()
            .map_err(|e| NodeError::Setup(format!("client service address: {e}")))?;
        let mut hc = HostConfig::new(opts.node_id, &opts.data, opts.raft_listen, opts.node_tls);
        hc.advertise = opts.raft_advertise;
        hc.wal = opts.wal;
        if let Some(raft) = opts.raft {
            hc.raft = raft;
        }
        let host = Arc::new(RaftHost::start(hc).await?);
        // Every part of the node reads time through `opts.clock` from here on: the source (the
        // system's), moved by the fault file in fault tests, guarded against steps.
        if let Some(file) = std::env::var_os(FAULT_DELAY_ENV) {
            let clock = Arc::new(OffsetClock::new(Arc::clone(&opts.clock)));
            opts.clock = Arc::clone(&clock) as Arc<dyn Clock>;
            watch_faults(&host, clock, file.into());
        }
        let clock_guard = opts
            .guard_clock
            .then(|| Arc::new(GuardedClock::new(Arc::clone(&opts.clock))));
        if let Some(g) = &clock_guard {
            opts.clock = Arc::clone(g) as Arc<dyn Clock>;
        }
        let info = NodeInfo::new(
            host.addr(),
            opts.client_advertise.unwrap_or_else(|| client_addr.to_string()),
            admin_addr.map(|a| a.to_string()).unwrap_or_default(),
        );
        let sessions = Arc::new(Sessions::new(opts.service.event_queue));
        let history = crate::history::History::new(&opts.data, opts.history.clone());
        let cluster = match Cluster::start(ClusterOptions {
            history: Arc::clone(&history),
            host: Arc::clone(&host),
            info,
            data: opts.data.clone(),
            bootstrap: opts.bootstrap,
            sessions: Arc::clone(&sessions),
            clock: Arc::clone(&opts.clock),
            clock_guard,
            service: opts.service.clone(),
            metrics: Arc::clone(&metrics),
        })
        .await
        {
            Ok(c) => c,
            Err(e) => {
                host.shutdown().await;
                return Err(e.into());
            }
        };
        let gateway = Arc::new(Gateway::new(
            Arc::clone(cluster.router()),
            Arc::clone(cluster.drivers()),
            sessions,
            Arc::clone(&opts.clock),
            opts.service,
            opts.sessions_per_s,
            Arc::clone(&history),
        ));
        let service = listener.attach(Arc::clone(&gateway));
        tracing::info!(%client_addr, node = opts.node_id, "client service listening");
        if !cluster.wait_for_leaders(Duration::from_secs(10)).await {
            tracing::warn!("not every group has a leader yet; clients are told to retry until they do");
        }
        let admin = admin.map(|listener| {
            tracing::info!(addr = ?admin_addr, "admin API listening");
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(
                listener.serve(Arc::clone(&cluster), Arc::clone(&metrics), async move {
                    let _ = stopped.await;
                }),
            );
            (task, stop)
        });
        let retention = crate::history::spawn_retention(
            Arc::clone(cluster.history()),
            Arc::clone(cluster.directory()),
            Arc::clone(&host),
            Arc::clone(&opts.clock),
        );
        Ok(Node {
            host,
            cluster,
            gateway,
            service,
            client_addr,
            admin_addr,
            admin,
            metrics,
            retention,
            trimmer: crate::memory::spawn_trimmer(),
        })
    }

    /// Loads a bulk-import file into the cluster's groups (idempotent: users already registered
    /// stay as they are), one stream of batches per group, all groups at once. Reports progress
    /// every 5 % of batches. Afterwards each group this node leads is compacted into a snapshot,
    /// so replicas added later copy the state instead of replaying the import entry by entry.
    pub async fn import(&self, seed: &nearby_raft::seed::Seed) -> Result<(), NodeError> {
        let view = self.cluster.directory().view();
        let per_group: Vec<(u64, Vec<nearby_raft::ImportBatch>)> = view
            .map
            .groups
            .iter()
            .filter_map(|(g, e)| e.range.map(|r| (*g, seed.batches_for(r))))
            .collect();
        let total: usize = per_group.iter().map(|(_, b)| b.len()).sum();
        let started = std::time::Instant::now();
        tracing::info!(
            users = seed.users.len(),
            friendships = seed.friendships.len(),
            groups = per_group.len(),
            batches = total,
            "importing"
        );
        let done = std::sync::atomic::AtomicUsize::new(0);
        let skipped = std::sync::atomic::AtomicU64::new(0);
        let step = (total / 20).max(1);
        let router = self.cluster.router();
        let streams = per_group.into_iter().map(|(group, batches)| {
            let (done, skipped) = (&done, &skipped);
            async move {
                for batch in batches {
                    let cmd = Payload::Shard(nearby_raft::Command::Import(batch));
                    let (_, reply) = router
                        .propose(group, cmd)
                        .await
                        .map_err(|e| NodeError::Setup(format!("import into group {group}: {e}")))?;
                    if let Reply::Shard(nearby_raft::CommandResult::Imported { skipped: s, .. }) = reply {
                        skipped.fetch_add(s, std::sync::atomic::Ordering::Relaxed);
                    }
                    let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    if n % step == 0 {
                        tracing::info!(done = n, of = total, "import progress");
                    }
                }
                Ok::<_, NodeError>(())
            }
        });
        futures::future::try_join_all(streams).await?;
        tracing::info!(
            elapsed = ?started.elapsed(),
            skipped = skipped.into_inner(),
            "import done; compacting"
        );
        for g in self.host.shards() {
            if g.leader() != Some(self.host.node_id()) {
                continue;
            }
            match g.compact(Duration::from_secs(60)).await {
                Ok(upto) => tracing::info!(group = g.id(), upto, "log compacted into a snapshot"),
                // Not fatal: the group still works, a new replica just replays more entries.
                Err(e) => tracing::warn!(group = g.id(), error = %e, "compaction after import failed"),
            }
        }
        // The import's batches, entries and snapshot buffers are freed by now, under the sets
        // and records they built: hand that memory back at once rather than at the trimmer's
        // next look.
        crate::memory::trim_if_above(0);
        Ok(())
    }

    /// Where clients connect.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The gateway, for in-process tools and tests.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// The admin API's address, if it serves one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The client service's counters.
    pub fn metrics(&self) -> &Arc<crate::metrics::ServiceMetrics> {
        &self.metrics
    }

    /// The node's part in the cluster.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Serves until `shutdown` completes (or the node finds its files disagree with the cluster
    /// map), then stops cleanly: its leaderships are handed over first (at most
    /// [`HANDOVER_WITHIN`]; `cluster::leave`), sessions are told to reconnect, drivers and groups
    /// stop, the transport closes (the WAL holds nothing unsynced that was acknowledged).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut fatal = self.cluster.fatal();
        let cluster = Arc::clone(&self.cluster);
        let stop = async move {
            tokio::select! {
                () = async {
                    shutdown.await;
                    cluster.hand_over(HANDOVER_WITHIN).await;
                } => {}
                r = fatal.wait_for(Option::is_some) => {
                    if let Ok(reason) = r {
                        tracing::error!(reason = ?*reason, "stopping");
                    }
                }
            }
        };
        self.service.run(stop).await;
        if let Some((task, stop)) = self.admin {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        self.retention.abort();
        self.trimmer.abort();
        self.cluster.shutdown().await;
        self.host.shutdown().await;
    }
}

/// The longest a stopping node waits for its leaderships to be handed over (a service manager's
/// stop timeout must be longer: the recipes in `deploy/` give 60 s).
pub const HANDOVER_WITHIN: Duration = Duration::from_secs(20);

/// Names a file that injects faults into this node (re-read every 100 ms; missing or empty:
/// none): a number of milliseconds that delays every request to other nodes, then optionally
/// `skew` and a signed number of milliseconds this node's clock is moved by, then optionally
/// `cut` and the Raft addresses of peers this node sends nothing to — e.g.
/// `0 skew -30000 cut 127.0.0.2:7401 127.0.0.3:7401`. For fault tests only (`tests/faults/`,
/// the cluster tests, `docs/reliability.md`): a slow network where the kernel has no netem, a
/// clock stepped by a misbehaving time source, a partition where the nodes share one host.
pub const FAULT_DELAY_ENV: &str = "NEARBY_FAULT_DELAY_FILE";

/// What a [`FAULT_DELAY_ENV`] file asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Faults {
    /// Every request to another node held this long.
    delay: Duration,
    /// The node's clock moved by this many milliseconds.
    skew_ms: i64,
    /// Peers (Raft addresses) this node sends nothing to.
    cut: Vec<SocketAddr>,
}

/// Reads a [`FAULT_DELAY_ENV`] file's text. Anything unreadable counts as no fault.
fn parse_faults(text: &str) -> Faults {
    let mut words = text.split_whitespace().peekable();
    let ms = words.next().and_then(|w| w.parse::<u64>().ok()).unwrap_or(0);
    let mut faults = Faults {
        delay: Duration::from_millis(ms),
        ..Faults::default()
    };
    if words.peek() == Some(&"skew") {
        words.next();
        faults.skew_ms = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    }
    if words.next() == Some("cut") {
        faults.cut = words.filter_map(|w| w.parse().ok()).collect();
    }
    faults
}

/// Follows the [`FAULT_DELAY_ENV`] file for as long as the runtime runs.
fn watch_faults(host: &Arc<RaftHost>, clock: Arc<OffsetClock>, file: std::path::PathBuf) {
    tracing::warn!(file = %file.display(), "fault injection: node-to-node requests delayed or cut, the clock moved, as that file says");
    let transport = Arc::clone(host.transport());
    tokio::spawn(async move {
        let mut now = Faults::default();
        loop {
            let want = parse_faults(&std::fs::read_to_string(&file).unwrap_or_default());
            if want != now {
                tracing::warn!(
                    delay_ms = want.delay.as_millis() as u64,
                    skew_ms = want.skew_ms,
                    cut = ?want.cut,
                    "fault injection: changed"
                );
                transport.set_send_delay(want.delay);
                transport.set_cut(want.cut.clone());
                clock.set_offset(want.skew_ms);
                now = want;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_file_gives_a_delay_a_clock_offset_and_the_peers_cut_off() {
        assert_eq!(parse_faults(""), Faults::default());
        assert_eq!(parse_faults("250\n").delay, Duration::from_millis(250));
        let f = parse_faults("0 cut 127.0.0.2:7401 nonsense 127.0.0.3:7401");
        assert_eq!((f.delay, f.skew_ms), (Duration::ZERO, 0));
        assert_eq!(
            f.cut,
            vec![
                "127.0.0.2:7401".parse::<std::net::SocketAddr>().expect("addr"),
                "127.0.0.3:7401".parse().expect("addr")
            ]
        );
        assert_eq!(parse_faults("soon cut 127.0.0.2:7401").delay, Duration::ZERO);
        let f = parse_faults("40 skew -30000 cut 127.0.0.2:7401");
        assert_eq!((f.delay, f.skew_ms), (Duration::from_millis(40), -30_000));
        assert_eq!(f.cut.len(), 1);
        assert_eq!(parse_faults("0 skew 2500\n").skew_ms, 2_500);
    }
}
