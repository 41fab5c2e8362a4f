//! Test harness: hosts on loopback with real files, and waiting on conditions with deadlines.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nearby_index::friends::UserRange;
use nearby_raft::host::default_raft_config;
use nearby_raft::transport::ClusterCa;
use nearby_raft::{GroupId, HostConfig, RaftHost, ShardGroup};
use tempfile::TempDir;

/// Logs of failing tests help; enable with RUST_LOG.
pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Polls `cond` until it is true or `within` passes; panics naming `what` on timeout.
pub(crate) async fn wait_until<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Several hosts in one process, each with its own data directory and loopback address.
pub(crate) struct Cluster {
    pub(crate) ca: ClusterCa,
    pub(crate) hosts: Vec<Option<RaftHost>>,
    pub(crate) dirs: Vec<TempDir>,
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) raft: openraft::Config,
    pub(crate) wal: nearby_raft::wal::WalOptions,
}

impl Cluster {
    pub(crate) async fn start(n: usize) -> Cluster {
        Self::start_with_config(n, default_raft_config(), Default::default()).await
    }

    /// Starts `n` hosts (node ids 1..=n) with the given settings.
    pub(crate) async fn start_with_config(
        n: usize,
        raft: openraft::Config,
        wal: nearby_raft::wal::WalOptions,
    ) -> Cluster {
        init_tracing();
        let ca = ClusterCa::generate("test").expect("generate CA");
        let mut c = Cluster {
            ca,
            hosts: Vec::new(),
            dirs: Vec::new(),
            addrs: Vec::new(),
            raft,
            wal,
        };
        for i in 0..n {
            c.dirs.push(TempDir::new().expect("tempdir"));
            let host = c.boot(i, "127.0.0.1:0".parse().expect("addr")).await;
            c.addrs.push(host.addr().parse().expect("bound addr"));
            c.hosts.push(Some(host));
        }
        c
    }

    fn config(&self, i: usize, listen: SocketAddr) -> HostConfig {
        let tls = self.ca.issue_node(i as u64 + 1).expect("node cert");
        let mut cfg = HostConfig::new(i as u64 + 1, self.dirs[i].path(), listen, tls);
        cfg.raft = self.raft.clone();
        cfg.wal = self.wal.clone();
        cfg
    }

    async fn boot(&self, i: usize, listen: SocketAddr) -> RaftHost {
        // A restarted node rebinds its old port; the old socket may take a moment to close.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match RaftHost::start(self.config(i, listen)).await {
                Ok(h) => return h,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "host start failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("host {i} did not start: {e}"),
            }
        }
    }

    pub(crate) fn host(&self, i: usize) -> &RaftHost {
        self.hosts[i].as_ref().expect("host is running")
    }

    /// Members map of the given host indexes.
    pub(crate) fn members(&self, idx: &[usize]) -> BTreeMap<u64, nearby_raft::Node> {
        idx.iter()
            .map(|&i| {
                (
                    i as u64 + 1,
                    nearby_raft::NodeInfo::new(self.addrs[i].to_string(), "", ""),
                )
            })
            .collect()
    }

    /// Opens `group` on every running host and initializes it on host `init` with all hosts as
    /// voters.
    pub(crate) async fn create_group(
        &self,
        group: GroupId,
        range: UserRange,
        init: usize,
    ) -> Vec<ShardGroup> {
        let all: Vec<usize> = (0..self.hosts.len()).collect();
        let mut handles = Vec::new();
        for i in &all {
            handles.push(self.host(*i).open_shard(group, range).await.expect("open group"));
        }
        handles[init]
            .initialize(self.members(&all))
            .await
            .expect("initialize");
        handles
    }

    /// Stops host `i` (its files stay).
    pub(crate) async fn stop(&mut self, i: usize) {
        if let Some(h) = self.hosts[i].take() {
            h.shutdown().await;
        }
    }

    /// Restarts host `i` on its old address and data directory.
    pub(crate) async fn restart(&mut self, i: usize) {
        assert!(self.hosts[i].is_none(), "host {i} is running");
        let host = self.boot(i, self.addrs[i]).await;
        self.hosts[i] = Some(host);
    }

    /// Waits until some running replica of `group` is leader and returns its host index.
    pub(crate) async fn leader(&self, group: GroupId) -> usize {
        let mut found = None;
        wait_until("a leader is elected", Duration::from_secs(15), || {
            found = self.hosts.iter().enumerate().find_map(|(i, h)| {
                let g = h.as_ref()?.shard(group)?;
                let m = g.raft().metrics().borrow().clone();
                (m.current_leader == Some(m.id) && m.state.is_leader()).then_some(i)
            });
            let ok = found.is_some();
            async move { ok }
        })
        .await;
        found.expect("leader")
    }

    pub(crate) async fn shutdown(mut self) {
        for i in 0..self.hosts.len() {
            self.stop(i).await;
        }
    }
}
