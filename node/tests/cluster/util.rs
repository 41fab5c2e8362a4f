//! A cluster of real `nearby-node` processes for a test: each node its own process with its own
//! data directory, on its own loopback address (127.A.B.1, .2, …, with A.B unique to the test),
//! sharing a cluster CA, a client certificate and a token key made here. Node 1 initialises the
//! cluster; the others join it. Everything waits on conditions with deadlines.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nearby_client::proto::{Coord, Event};
use nearby_client::{Client, ClientConfig, SdkEvent};
use nearby_index::geo::{Millis, UserId};
use nearby_node::auth::{Claims, TokenSigner};
use nearby_raft::transport::ClusterCa;
use nearby_raft::{ClusterMap, GroupId, NodeId, META_GROUP};
use tokio::sync::mpsc;

/// Polls `cond` every 50 ms until it holds or `within` passes; panics naming `what`.
pub(crate) async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A second octet pair no other test of this run uses.
fn fresh_subnet() -> [u8; 2] {
    static NEXT: AtomicU8 = AtomicU8::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // The process id keeps concurrent runs (and leftovers of killed ones) apart.
    [100 + (std::process::id() % 100) as u8, 10 + n]
}

/// One node process and its log.
pub(crate) struct NodeProc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl NodeProc {
    /// Lines logged so far that contain `needle`.
    pub(crate) fn logged(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub(crate) fn log_text(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    }
}

/// The cluster (see the module doc).
pub(crate) struct TestCluster {
    pub(crate) dir: tempfile::TempDir,
    subnet: [u8; 2],
    groups: u64,
    nodes: Vec<Option<NodeProc>>,
    pub(crate) client_ca: String,
    signer: Arc<TokenSigner>,
}

fn write_secret(path: &Path, bytes: &[u8]) {
    nearby_node::secrets::write_secret(path, bytes, true).expect("write key");
}

impl TestCluster {
    /// Starts `n` nodes with `groups` shard groups and waits until every group has
    /// `min(3, n)` voters and a leader.
    pub(crate) async fn start(n: u8, groups: u64) -> TestCluster {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::TempDir::new().expect("tmp");
        let ca = ClusterCa::generate("test").expect("ca");
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).expect("ca");
        for i in 1..=n {
            let tls = ca.issue_node(u64::from(i)).expect("node cert");
            std::fs::write(dir.path().join(format!("node-{i}.pem")), tls.cert_pem()).expect("cert");
            write_secret(
                &dir.path().join(format!("node-{i}-key.pem")),
                tls.key_pem().as_bytes(),
            );
        }
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("client cert");
        std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).expect("cert");
        write_secret(
            &dir.path().join("key.pem"),
            ck.signing_key.serialize_pem().as_bytes(),
        );
        let signer = TokenSigner::generate().expect("token key");
        write_secret(&dir.path().join("token-key.pk8"), signer.pkcs8());
        std::fs::write(
            dir.path().join("token.pub"),
            format!("{}\n", signer.verifier().public_base64url()),
        )
        .expect("public key");
        let mut c = TestCluster {
            dir,
            subnet: fresh_subnet(),
            groups,
            nodes: (0..n).map(|_| None).collect(),
            client_ca: ck.cert.pem(),
            signer: Arc::new(signer),
        };
        for i in 1..=n {
            c.write_config(i, groups);
            c.spawn(i, if i == 1 { "init" } else { "run" });
            c.wait_ready(i).await;
        }
        let want = 3.min(usize::from(n));
        c.wait_map(
            "every group fully replicated with a leader",
            Duration::from_secs(60),
            |m| {
                m.groups
                    .values()
                    .all(|g| g.voters.len() == want && g.learners.is_empty() && g.leader.is_some())
            },
        )
        .await;
        // Placement then spreads leaders; tests start from the settled cluster.
        let nodes = u64::from(n).min(groups);
        c.wait_map("leaders spread over the nodes", Duration::from_secs(60), |m| {
            let mut per: std::collections::BTreeMap<NodeId, u64> =
                (1..=u64::from(n)).map(|i| (i, 0)).collect();
            for (id, g) in &m.groups {
                if *id != META_GROUP {
                    if let Some(l) = g.leader {
                        *per.entry(l).or_default() += 1;
                    }
                }
            }
            let (min, max) = (per.values().min().copied(), per.values().max().copied());
            per.values().filter(|c| **c > 0).count() as u64 >= nodes
                && max.zip(min).is_some_and(|(a, b)| a - b <= 1)
        })
        .await;
        c
    }

    /// Node `i`'s client address.
    pub(crate) fn client_addr(&self, i: u8) -> SocketAddr {
        SocketAddr::from(([127, self.subnet[0], self.subnet[1], i], 7400))
    }

    fn raft_addr(&self, i: u8) -> SocketAddr {
        SocketAddr::from(([127, self.subnet[0], self.subnet[1], i], 7401))
    }

    fn data(&self, i: u8) -> PathBuf {
        self.dir.path().join(format!("n{i}"))
    }

    /// (Re)writes node `i`'s configuration, with `groups` as its `groups` setting.
    pub(crate) fn write_config(&self, i: u8, groups: u64) {
        let d = self.dir.path();
        let join = if i == 1 {
            String::new()
        } else {
            format!("join = [\"{}\"]\n", self.raft_addr(1))
        };
        let text = format!(
            "node_id = {i}\ndata = {data:?}\nlisten = \"{client}\"\nraft_listen = \"{raft}\"\ngroups = {groups}\n\
             [cluster]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n{join}\
             [tls]\ncert = {tcert:?}\nkey = {tkey:?}\n[auth]\ntoken_public_key = {public:?}\n\
             [limits]\nshed = false\n",
            data = self.data(i),
            client = self.client_addr(i),
            raft = self.raft_addr(i),
            ca = d.join("ca.pem"),
            cert = d.join(format!("node-{i}.pem")),
            key = d.join(format!("node-{i}-key.pem")),
            tcert = d.join("cert.pem"),
            tkey = d.join("key.pem"),
            public = d.join("token.pub"),
        );
        std::fs::create_dir_all(self.data(i)).expect("data dir");
        std::fs::write(self.dir.path().join(format!("n{i}.toml")), text).expect("config");
    }

    fn spawn(&mut self, i: u8, command: &str) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nearby-node"))
            .arg(command)
            .arg("--config")
            .arg(self.dir.path().join(format!("n{i}.toml")))
            .arg("--dev-token-key")
            .arg(self.dir.path().join("token-key.pk8"))
            .env(
                "RUST_LOG",
                std::env::var("NEARBY_TEST_NODE_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn nearby-node");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let echo = std::env::var_os("NEARBY_TEST_ECHO").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    #[allow(clippy::print_stderr)]
                    {
                        eprintln!("n{i} | {line}");
                    }
                }
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        self.nodes[usize::from(i) - 1] = Some(NodeProc { child, log });
    }

    pub(crate) fn node(&self, i: u8) -> &NodeProc {
        self.nodes[usize::from(i) - 1].as_ref().expect("node is running")
    }

    async fn wait_ready(&mut self, i: u8) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let node = self.nodes[usize::from(i) - 1].as_mut().expect("spawned");
            if node.logged("nearby node is ready") > 0 {
                return;
            }
            if let Ok(Some(status)) = node.child.try_wait() {
                panic!(
                    "node {i} exited ({status}) before it was ready:\n{}",
                    node.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "node {i} not ready:\n{}",
                node.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The map as node `i` last saved it.
    pub(crate) fn map_of(&self, i: u8) -> Option<ClusterMap> {
        let bytes = std::fs::read(self.data(i).join("cluster/map")).ok()?;
        nearby_index::codec::decode(&bytes).ok()
    }

    /// The newest map any running node has saved.
    pub(crate) fn map(&self) -> ClusterMap {
        (1..=self.nodes.len() as u8)
            .filter(|i| self.nodes[usize::from(*i) - 1].is_some())
            .filter_map(|i| self.map_of(i))
            .max_by_key(|m| m.epoch)
            .unwrap_or_default()
    }

    /// Waits until the newest map satisfies `cond`.
    pub(crate) async fn wait_map(&self, what: &str, within: Duration, cond: impl Fn(&ClusterMap) -> bool) {
        wait_until(what, within, || cond(&self.map())).await;
    }

    /// The node leading `group`, as the newest map says.
    pub(crate) fn leader(&self, group: GroupId) -> NodeId {
        self.map().leader(group).expect("a leader")
    }

    /// The group owning `user`.
    pub(crate) fn group_of(&self, user: UserId) -> GroupId {
        self.map().group_of(user).expect("a group")
    }

    /// A user id of shard group `group` (the `n`th of its range).
    pub(crate) fn user_in(&self, group: GroupId, n: u64) -> UserId {
        self.map().groups[&group].range.expect("a shard group").start + n
    }

    /// Shard groups, by id.
    pub(crate) fn shard_groups(&self) -> Vec<GroupId> {
        self.map()
            .groups
            .keys()
            .copied()
            .filter(|g| *g != META_GROUP)
            .collect()
    }

    /// Kills node `i` with SIGKILL and waits for the process to be gone.
    pub(crate) fn kill(&mut self, i: u8) {
        if let Some(mut node) = self.nodes[usize::from(i) - 1].take() {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }

    /// Starts node `i` again on its data directory, and waits until it serves.
    pub(crate) async fn restart(&mut self, i: u8) {
        assert!(self.nodes[usize::from(i) - 1].is_none(), "node {i} is running");
        self.spawn(i, "run");
        self.wait_ready(i).await;
    }

    /// The configured `groups` of a new cluster.
    pub(crate) fn groups(&self) -> u64 {
        self.groups
    }

    /// A token for `user`.
    pub(crate) fn token(&self, user: UserId) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.signer.sign(Claims {
            user,
            expires_at: Millis(now + 3_600_000),
        })
    }

    /// A client of `user` that knows only the nodes `via` (1-based ids).
    pub(crate) async fn client_via(&self, user: UserId, via: &[u8]) -> Viewer {
        let endpoints: Vec<String> = via.iter().map(|i| self.client_addr(*i).to_string()).collect();
        let mut cfg = ClientConfig::new(String::new(), self.client_ca.clone(), user, self.token(user))
            .with_endpoints(endpoints);
        cfg.connect_timeout = Duration::from_secs(2);
        cfg.request_timeout = Duration::from_secs(3);
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            match Client::connect(cfg.clone()).await {
                Ok(c) => break c,
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("user {user} cannot connect via {via:?}: {e}"),
            }
        };
        let events = client.events().expect("events");
        Viewer { user, client, events }
    }

    /// A client of `user` that knows every node.
    pub(crate) async fn client(&self, user: UserId) -> Viewer {
        let all: Vec<u8> = (1..=self.nodes.len() as u8).collect();
        self.client_via(user, &all).await
    }

    /// Stops every node with SIGTERM and waits for them.
    pub(crate) async fn stop(mut self) {
        for node in self.nodes.iter_mut().flatten() {
            // SAFETY: kill(2) on a child this test spawned, with a valid signal.
            unsafe {
                libc::kill(node.child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        for node in self.nodes.iter_mut().flatten() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = node.child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = node.child.kill();
                    let _ = node.child.wait();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for node in self.nodes.iter_mut().flatten() {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }
}

/// One user's client and its events.
pub(crate) struct Viewer {
    pub(crate) user: UserId,
    pub(crate) client: Client,
    pub(crate) events: mpsc::Receiver<SdkEvent>,
}

impl Viewer {
    /// Sends a location, retrying while the cluster is between leaders.
    pub(crate) async fn at(&self, lat: f64, lon: f64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.client.update_location(Coord { lat, lon }).await {
                Ok(_) => return,
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("user {}: update failed: {e}", self.user),
            }
        }
    }

    /// The next product event within `within` (connection notices are skipped).
    pub(crate) async fn next_within(&mut self, within: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(SdkEvent::Event(e))) => return Some(e),
                Ok(Some(other)) => tracing::debug!(?other, "sdk notice"),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Waits for an event about `friend` matching `want`, skipping others, within `within`.
    pub(crate) async fn expect_about(
        &mut self,
        friend: UserId,
        within: Duration,
        want: impl Fn(&Event) -> bool,
    ) -> Event {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left).await {
                Some(e) if e.friend() == Some(friend) && want(&e) => return e,
                Some(e) => seen.push(e),
                None => break,
            }
        }
        panic!(
            "user {}: no matching event about {friend} within {within:?}; saw {seen:?}",
            self.user
        );
    }
}

impl Viewer {
    /// Waits until `friend` is on the viewer's first page (after a failover the friend comes
    /// back with their next location).
    pub(crate) async fn sees(&self, friend: UserId, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(page) = self.client.list_nearby(None, None).await {
                if page.friends.iter().any(|f| f.id == friend) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "user {} does not see {friend} within {within:?}",
                self.user
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Makes `a` and `b` friends through their clients, retrying while leaders change.
pub(crate) async fn befriend(a: &Viewer, b: &Viewer) {
    for (x, y) in [(a, b), (b, a)] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match x.client.add_friend(y.user).await {
                Ok(_) => break,
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{} add {}: {e}", x.user, y.user),
            }
        }
    }
}
