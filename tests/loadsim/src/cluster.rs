//! A cluster of real `nearby-node` processes, for the cluster tests, the kill loop
//! (`nearby-loadsim chaos`) and the fault harness (`nearby-loadsim faults`): each node its own
//! process with its own data directory, on its own loopback address (127.A.B.1, .2, …, A.B chosen
//! so concurrent clusters never meet) or, for the fault harness, in its own network namespace
//! ([`Netns`]), sharing a cluster CA, a client certificate and a token key made here. Node 1
//! initialises the cluster; the others join it. Everything waits on conditions with deadlines;
//! nothing sleeps for luck.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nearby_client::{Client, ClientConfig};
use nearby_index::geo::{Millis, UserId};
use nearby_node::auth::{Claims, TokenSigner};
use nearby_raft::transport::ClusterCa;
use nearby_raft::{ClusterMap, GroupId, NodeId, META_GROUP};

/// Why the cluster could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// Setting up files or processes failed.
    #[error("{0}")]
    Setup(String),
    /// A condition did not hold in time.
    #[error("timed out after {within:?} waiting for: {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        within: Duration,
    },
    /// A node process exited when it should not have.
    #[error("node {node} exited ({status}); its log ends:\n{log}")]
    Exited {
        /// The node.
        node: u8,
        /// How it exited.
        status: String,
        /// The end of its log.
        log: String,
    },
}

fn setup(what: &str, e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Setup(format!("{what}: {e}"))
}

/// Waits, polling every 50 ms, until `cond` holds or `within` passes.
pub async fn wait_until(
    what: &str,
    within: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<(), ClusterError> {
    let deadline = Instant::now() + within;
    while !cond() {
        if Instant::now() >= deadline {
            return Err(ClusterError::Timeout {
                what: what.to_string(),
                within,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// `GET path` from a node's admin API (HTTP/1.0 over a plain TCP connection, like `nodectl`),
/// with a bearer `token` if given: the status code and the whole response, or `None` if no
/// answer came within a second.
pub async fn admin_get(addr: &str, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
        let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut response = String::new();
        s.read_to_string(&mut response).await.ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, response))
    };
    tokio::time::timeout(Duration::from_secs(1), exchange)
        .await
        .ok()
        .flatten()
}

/// One counter from a node's `/metrics` (HTTP/1.0 over a plain TCP connection, like `nodectl`).
pub async fn scrape(addr: &str, token: &str, name: &str) -> Option<u64> {
    let (_, body) = admin_get(addr, "/metrics", Some(token)).await?;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// A second octet pair unlikely to be used by another cluster on this machine: derived from the
/// process id, and distinct for every call in one process.
pub fn fresh_subnet() -> [u8; 2] {
    static NEXT: AtomicU8 = AtomicU8::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    [100 + (std::process::id() % 100) as u8, 10u8.wrapping_add(n)]
}

/// The `nearby-node` binary next to the running executable (tests run from `deps/`, binaries
/// sit one level up in the same target directory).
pub fn node_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("nearby-node"), dir.parent()?.join("nearby-node")]
        .into_iter()
        .find(|p| p.exists())
}

/// The per-address connection and handshake limits of nodes under simulated load: every
/// simulated client comes from one address (loopback, or the load's namespace), like phones
/// behind a NAT, and the defaults (tested with the guard) refuse part of a burst of handshakes
/// whenever a loaded machine slows them down.
pub const SIMULATOR_ADDRESS_LIMIT: u32 = 4_096;

/// One node process and its log.
pub struct NodeProc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl NodeProc {
    /// Lines logged so far that contain `needle`.
    pub fn logged(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The last lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log[log.len().saturating_sub(lines)..].join("\n")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the process `signal`.
    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on a child this cluster spawned and has not waited for (a waited-for
        // node is dropped), with a valid signal.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
    }

    /// Waits up to `within` for the process to exit; kills it if it has not (`false`).
    async fn exit_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How to start a [`ProcessCluster`].
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The `nearby-node` binary.
    pub binary: PathBuf,
    /// Where the nodes' files go (created if missing).
    pub dir: PathBuf,
    /// Nodes.
    pub nodes: u8,
    /// Shard groups of the new cluster.
    pub groups: u64,
    /// Node `i` listens on `host[0].host[1].host[2].i` (by default `127.A.B.i`, see
    /// [`fresh_subnet`]).
    pub host: [u8; 3],
    /// Run every node in its own network namespace (made beforehand, see `tests/faults/`).
    pub netns: Option<Netns>,
    /// Node `i`'s data directory on a tmpfs of this many bytes, mounted here (needs root): a
    /// disk that can be filled for real.
    pub small_disk: Option<(u8, u64)>,
    /// Every node follows its delay file ([`ProcessCluster::delay_file`]): the fault harness's
    /// node-to-node delay.
    pub delay_files: bool,
    /// A bulk-import file node 1 loads once it serves.
    pub import: Option<PathBuf>,
    /// The nodes' `RUST_LOG`.
    pub log_filter: String,
    /// Echo the nodes' logs to this process's stderr, prefixed with the node.
    pub echo: bool,
}

impl ClusterOptions {
    /// `nodes` nodes with `groups` groups in `dir`, with the binary next to this executable.
    pub fn new(dir: impl Into<PathBuf>, nodes: u8, groups: u64) -> Result<Self, ClusterError> {
        let binary = node_binary().ok_or_else(|| {
            ClusterError::Setup(
                "no nearby-node binary next to this executable: build it (`cargo build -p nearby-node`)"
                    .into(),
            )
        })?;
        Ok(Self::with_binary(binary, dir, nodes, groups))
    }

    /// `nodes` nodes with `groups` groups in `dir`, running `binary`.
    pub fn with_binary(binary: PathBuf, dir: impl Into<PathBuf>, nodes: u8, groups: u64) -> Self {
        ClusterOptions {
            binary,
            dir: dir.into(),
            nodes,
            groups,
            host: {
                let [a, b] = fresh_subnet();
                [127, a, b]
            },
            netns: None,
            small_disk: None,
            delay_files: false,
            import: None,
            log_filter: std::env::var("NEARBY_TEST_NODE_LOG").unwrap_or_else(|_| DEFAULT_NODE_LOG.into()),
            echo: std::env::var_os("NEARBY_TEST_ECHO").is_some(),
        }
    }
}

/// The nodes' log filter unless `NEARBY_TEST_NODE_LOG` sets one: what operators see, plus why
/// a group sleeps and wakes (rare lines, and what a failed hibernation test is read from).
pub const DEFAULT_NODE_LOG: &str = "info,openraft=warn,nearby_node::group::hibernate=debug";

/// Where the nodes of a [`ProcessCluster`] run when each has its own network namespace: node `i`
/// runs in the namespace `{prefix}{i}` (through `ip netns exec`), listening on its address there.
/// Making the namespaces, their links and their addresses is the caller's (`tests/faults/run.sh`).
#[derive(Clone, Debug)]
pub struct Netns {
    /// Namespace names without the node's number.
    pub prefix: String,
}

impl Netns {
    /// Node `i`'s namespace.
    pub fn name(&self, i: u8) -> String {
        format!("{}{i}", self.prefix)
    }
}

/// The faults a node injects into itself (see [`ProcessCluster::set_faults`]).
#[derive(Clone, Debug, Default)]
pub struct NodeFaults {
    /// Its requests to other nodes held up to this long, ms.
    pub delay_ms: u64,
    /// Its clock moved by this much, ms.
    pub skew_ms: i64,
    /// The nodes it sends nothing to.
    pub cut: Vec<u8>,
}

/// The cluster (see the module doc).
pub struct ProcessCluster {
    opts: ClusterOptions,
    /// Small disks mounted for nodes' data, unmounted when the cluster is dropped.
    _disks: Vec<nearby_raft::test_support::SmallDisk>,
    ca: ClusterCa,
    nodes: Vec<Option<NodeProc>>,
    client_ca: String,
    signer: Arc<TokenSigner>,
    /// Nodes restarted at another address: the last byte of their IP now.
    moved: HashMap<u8, u8>,
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), ClusterError> {
    nearby_node::secrets::write_secret(path, bytes, true).map_err(|e| setup("writing a key", e))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ClusterError> {
    std::fs::write(path, bytes).map_err(|e| setup(&path.display().to_string(), e))
}

impl ProcessCluster {
    /// Starts the nodes and waits until every group has `min(3, n)` voters and a leader, and
    /// leaders are spread over the nodes.
    pub async fn start(opts: ClusterOptions) -> Result<ProcessCluster, ClusterError> {
        let dir = opts.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| setup("creating the cluster's directory", e))?;
        let n = opts.nodes;
        let groups = opts.groups;
        let ca = ClusterCa::generate("test").map_err(|e| setup("cluster CA", e))?;
        write_file(&dir.join("ca.pem"), ca.cert_pem().as_bytes())?;
        // As `nearby-node ca issue` gives every node: the cluster's pseudonym key.
        nearby_node::secrets::write_pseudonym_key(&dir.join("pseudonym.key"), &ca.key_pem(), true)
            .map_err(|e| setup("pseudonym key", e))?;
        for i in 1..=n {
            let tls = ca
                .issue_node(u64::from(i))
                .map_err(|e| setup("node certificate", e))?;
            write_file(&dir.join(format!("node-{i}.pem")), tls.cert_pem().as_bytes())?;
            write_secret(&dir.join(format!("node-{i}-key.pem")), tls.key_pem().as_bytes())?;
        }
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .map_err(|e| setup("client certificate", e))?;
        write_file(&dir.join("cert.pem"), ck.cert.pem().as_bytes())?;
        write_secret(&dir.join("key.pem"), ck.signing_key.serialize_pem().as_bytes())?;
        // Every node's admin API, behind one token (`nodectl --admin … --token-file …`).
        let token: [u8; 24] = rand::random();
        let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
        write_secret(&dir.join("admin-token"), format!("{token}\n").as_bytes())?;
        let signer = TokenSigner::generate().map_err(|e| setup("token key", e))?;
        write_secret(&dir.join("token-key.pk8"), signer.pkcs8())?;
        write_file(
            &dir.join("token.pub"),
            format!("{}\n", signer.verifier().public_base64url()).as_bytes(),
        )?;
        let mut disks = Vec::new();
        if let Some((i, bytes)) = opts.small_disk {
            let parent = dir.join(format!("n{i}"));
            let disk = nearby_raft::test_support::SmallDisk::mount(&parent, bytes)
                .map_err(|e| setup("a small disk", e))?;
            disks.push(disk);
        }
        let mut c = ProcessCluster {
            _disks: disks,
            ca,
            nodes: (0..n).map(|_| None).collect(),
            client_ca: ck.cert.pem(),
            signer: Arc::new(signer),
            moved: HashMap::new(),
            opts,
        };
        for i in 1..=n {
            c.write_config(i, groups)?;
            c.spawn(i, if i == 1 { "init" } else { "run" })?;
            c.wait_ready(i).await?;
        }
        let want = 3.min(usize::from(n));
        // Placement runs in bounded rounds: allow time in proportion to the groups.
        let within = Duration::from_secs(60) + Duration::from_millis(250) * groups as u32;
        c.wait_map("every group fully replicated with a leader", within, |m| {
            m.groups
                .values()
                .all(|g| g.voters.len() == want && g.learners.is_empty() && g.leader.is_some())
        })
        .await?;
        // Placement then spreads leaders; tests start from the settled cluster.
        let nodes = u64::from(n).min(groups);
        c.wait_map("leaders spread over the nodes", within, |m| {
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
        .await?;
        Ok(c)
    }

    /// What every replica of `group` holds for `users`: `(node, answer)` per replica the map
    /// names (see [`ProcessCluster::ask_replicas`]).
    pub async fn replica_states(
        &self,
        group: GroupId,
        users: &[UserId],
    ) -> Result<Vec<(NodeId, nearby_node::route::peer::PeerResponse)>, ClusterError> {
        let req = nearby_node::route::peer::PeerRequest::ReplicaState {
            group,
            users: users.to_vec(),
        };
        self.ask_replicas(group, &req).await
    }

    /// The one-way grants every replica of `group` holds for `users` (nodes that speak peer
    /// protocol 4; see [`ProcessCluster::ask_replicas`]).
    pub async fn replica_grants(
        &self,
        group: GroupId,
        users: &[UserId],
    ) -> Result<Vec<(NodeId, nearby_node::route::peer::PeerResponse)>, ClusterError> {
        let req = nearby_node::route::peer::PeerRequest::ReplicaGrants {
            group,
            users: users.to_vec(),
        };
        self.ask_replicas(group, &req).await
    }

    /// Asks every replica of `group` the map names `request`: `(node, answer)` each, over the
    /// node-to-node protocol with a certificate of the cluster's CA (for a tool id no node has).
    async fn ask_replicas(
        &self,
        group: GroupId,
        request: &nearby_node::route::peer::PeerRequest,
    ) -> Result<Vec<(NodeId, nearby_node::route::peer::PeerResponse)>, ClusterError> {
        use nearby_node::route::peer::PeerResponse;
        const TOOL: NodeId = u64::MAX - 1;
        let tls = self
            .ca
            .issue_node(TOOL)
            .map_err(|e| setup("tool certificate", e))?;
        // On loopback a tool address of the cluster's own; in namespaces whatever this one has.
        let bind = match self.opts.netns {
            Some(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            None => SocketAddr::from((self.ip(250), 0)),
        };
        let transport = nearby_raft::transport::RaftTransport::bind(bind, &tls, Default::default())
            .map_err(|e| setup("tool transport", e))?;
        let map = self.map();
        let replicas: Vec<NodeId> = map
            .groups
            .get(&group)
            .map(|g| g.replicas().collect())
            .unwrap_or_default();
        let req = nearby_index::codec::encode(request).map_err(|e| setup("encoding a request", e))?;
        let mut out = Vec::new();
        for node in replicas {
            let answer = match self.raft_addr_of(node) {
                Some(addr) => match transport.call_peer(addr, Some(node), req.clone()).await {
                    Ok(bytes) => nearby_index::codec::decode(&bytes)
                        .unwrap_or_else(|e| PeerResponse::Failed(format!("undecodable answer: {e}"))),
                    Err(e) => PeerResponse::Failed(e.to_string()),
                },
                None => PeerResponse::Failed(format!("node {node} is not one of this cluster's")),
            };
            out.push((node, answer));
        }
        transport.shutdown().await;
        Ok(out)
    }

    fn raft_addr_of(&self, node: NodeId) -> Option<SocketAddr> {
        let i = u8::try_from(node)
            .ok()
            .filter(|i| (1..=self.opts.nodes).contains(i))?;
        Some(self.raft_addr(i))
    }

    /// The cluster's pseudonym key (what every node derives strangers' pseudonyms from).
    pub fn pseudonym_key(&self) -> Result<Vec<u8>, ClusterError> {
        nearby_node::secrets::read_pseudonym_key(&self.opts.dir.join("pseudonym.key"))
            .map_err(|e| setup("pseudonym key", e))
    }

    /// The certificate clients trust.
    pub fn client_ca(&self) -> &str {
        &self.client_ca
    }

    /// Every node's client address, as `host:port`.
    pub fn endpoints(&self) -> Vec<String> {
        (1..=self.opts.nodes)
            .map(|i| self.client_addr(i).to_string())
            .collect()
    }

    /// Nodes in the cluster.
    pub fn size(&self) -> u8 {
        self.opts.nodes
    }

    /// Node `i`'s client address.
    pub fn client_addr(&self, i: u8) -> SocketAddr {
        SocketAddr::from((self.ip(i), 7400))
    }

    /// Node `i`'s IP address.
    pub fn ip(&self, i: u8) -> [u8; 4] {
        let h = self.opts.host;
        [h[0], h[1], h[2], self.moved.get(&i).copied().unwrap_or(i)]
    }

    /// The namespaces the nodes run in, if they have their own.
    pub fn netns(&self) -> Option<&Netns> {
        self.opts.netns.as_ref()
    }

    /// Node `i`'s admin API address.
    pub fn admin_addr(&self, i: u8) -> SocketAddr {
        SocketAddr::from((self.ip(i), 7402))
    }

    /// The file holding the admin API's token.
    pub fn admin_token_file(&self) -> PathBuf {
        self.opts.dir.join("admin-token")
    }

    /// The `nodectl` next to the node binary.
    pub fn nodectl(&self) -> PathBuf {
        self.opts.binary.with_file_name("nodectl")
    }

    fn raft_addr(&self, i: u8) -> SocketAddr {
        SocketAddr::from((self.ip(i), 7401))
    }

    /// The file node `i` reads its node-to-node faults from (a delay in ms, peers cut off; see
    /// [`nearby_node::node::FAULT_DELAY_ENV`]).
    pub fn delay_file(&self, i: u8) -> PathBuf {
        self.opts.dir.join(format!("n{i}.delay"))
    }

    /// Cuts node `i` off from the other nodes (`false`: heals every cut): neither side sends the
    /// other anything, while clients still reach every node — a partition where the nodes share
    /// one host. Needs [`ClusterOptions::delay_files`]; the nodes re-read their files every 100 ms.
    pub fn cut_off(&self, i: u8, cut: bool) -> Result<(), ClusterError> {
        for j in 1..=self.size() {
            let peers: Vec<u8> = match (cut, j == i) {
                (false, _) => Vec::new(),
                (true, true) => (1..=self.size()).filter(|k| *k != i).collect(),
                (true, false) => vec![i],
            };
            self.set_faults(
                j,
                &NodeFaults {
                    cut: peers,
                    ..NodeFaults::default()
                },
            )?;
        }
        Ok(())
    }

    /// Writes node `i`'s fault file ([`nearby_node::node::FAULT_DELAY_ENV`]): what it replaces
    /// heals.
    pub fn set_faults(&self, i: u8, faults: &NodeFaults) -> Result<(), ClusterError> {
        let mut text = faults.delay_ms.to_string();
        if faults.skew_ms != 0 {
            text.push_str(&format!(" skew {}", faults.skew_ms));
        }
        if !faults.cut.is_empty() {
            text.push_str(" cut");
            for k in &faults.cut {
                text.push_str(&format!(" {}", self.raft_addr(*k)));
            }
        }
        text.push('\n');
        let file = self.delay_file(i);
        std::fs::write(&file, text).map_err(|e| setup(&file.display().to_string(), e))
    }

    /// Node `i`'s data directory (on its small disk if it has one).
    pub fn data(&self, i: u8) -> PathBuf {
        let dir = self.opts.dir.join(format!("n{i}"));
        match self.opts.small_disk {
            Some((d, _)) if d == i => dir.join("disk"),
            _ => dir,
        }
    }

    /// (Re)writes node `i`'s configuration, with `groups` as its `groups` setting.
    pub fn write_config(&self, i: u8, groups: u64) -> Result<(), ClusterError> {
        let d = &self.opts.dir;
        let join = if i == 1 {
            String::new()
        } else {
            format!("join = [\"{}\"]\n", self.raft_addr(1))
        };
        let text = format!(
            "node_id = {i}\ndata = {data:?}\nlisten = \"{client}\"\nraft_listen = \"{raft}\"\ngroups = {groups}\n\
             [cluster]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\npseudonym_key = {pkey:?}\n{join}\
             [tls]\ncert = {tcert:?}\nkey = {tkey:?}\n[auth]\ntoken_public_key = {public:?}\n\
             [limits]\nshed = false\nmin_update_interval_ms = 0\n\
             connections_per_address = {limit}\nhandshakes_per_address = {limit}\n\
             [admin]\nlisten = \"{admin}\"\ntoken_file = {admin_token:?}\n",
            limit = SIMULATOR_ADDRESS_LIMIT,
            data = self.data(i),
            client = self.client_addr(i),
            raft = self.raft_addr(i),
            ca = d.join("ca.pem"),
            cert = d.join(format!("node-{i}.pem")),
            key = d.join(format!("node-{i}-key.pem")),
            pkey = d.join("pseudonym.key"),
            tcert = d.join("cert.pem"),
            tkey = d.join("key.pem"),
            public = d.join("token.pub"),
            admin = self.admin_addr(i),
            admin_token = d.join("admin-token"),
        );
        std::fs::create_dir_all(self.data(i)).map_err(|e| setup("data directory", e))?;
        write_file(&self.opts.dir.join(format!("n{i}.toml")), text.as_bytes())
    }

    fn spawn(&mut self, i: u8, command: &str) -> Result<(), ClusterError> {
        let mut cmd = match &self.opts.netns {
            // `ip netns exec` enters the namespace and execs the node: the child is the node.
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &ns.name(i)]).arg(&self.opts.binary);
                cmd
            }
            None => Command::new(&self.opts.binary),
        };
        cmd.arg(command)
            .arg("--config")
            .arg(self.opts.dir.join(format!("n{i}.toml")))
            .arg("--dev-token-key")
            .arg(self.opts.dir.join("token-key.pk8"));
        if let (1, "init", Some(import)) = (i, command, &self.opts.import) {
            cmd.arg("--import").arg(import);
        }
        if self.opts.delay_files {
            cmd.env(nearby_node::node::FAULT_DELAY_ENV, self.delay_file(i));
        }
        let mut child = cmd
            .env("RUST_LOG", &self.opts.log_filter)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| setup("starting nearby-node", e))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| ClusterError::Setup("no stderr".into()))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let echo = self.opts.echo;
        // Every run of node i appends to n<i>.log beside its configuration: what is kept when a
        // run fails.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.opts.dir.join(format!("n{i}.log")))
            .map_err(|e| setup("node log file", e))?;
        std::thread::spawn(move || {
            use std::io::Write;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(file, "{line}");
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
        Ok(())
    }

    /// Node `i`'s process, if it is running.
    pub fn node(&self, i: u8) -> Option<&NodeProc> {
        self.nodes.get(usize::from(i).checked_sub(1)?)?.as_ref()
    }

    /// Whether node `i` is running.
    pub fn is_running(&self, i: u8) -> bool {
        self.node(i).is_some()
    }

    async fn wait_ready(&mut self, i: u8) -> Result<(), ClusterError> {
        let within = Duration::from_secs(60);
        let deadline = Instant::now() + within;
        loop {
            let Some(node) = self.nodes[usize::from(i) - 1].as_mut() else {
                return Err(ClusterError::Setup(format!("node {i} was not started")));
            };
            if node.logged("nearby node is ready") > 0 {
                return Ok(());
            }
            if let Ok(Some(status)) = node.child.try_wait() {
                return Err(ClusterError::Exited {
                    node: i,
                    status: status.to_string(),
                    log: node.log_tail(30),
                });
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Timeout {
                    what: format!("node {i} to be ready; its log ends:\n{}", node.log_tail(30)),
                    within,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Nodes whose process has exited without being asked to (a crash), with how.
    pub fn crashed(&mut self) -> Vec<(u8, String)> {
        let mut out = Vec::new();
        for (i, slot) in self.nodes.iter_mut().enumerate() {
            if let Some(node) = slot {
                if let Ok(Some(status)) = node.child.try_wait() {
                    out.push((i as u8 + 1, format!("{status}; log ends:\n{}", node.log_tail(30))));
                }
            }
        }
        out
    }

    /// The map as node `i` last saved it.
    pub fn map_of(&self, i: u8) -> Option<ClusterMap> {
        let bytes = std::fs::read(self.data(i).join("cluster/map")).ok()?;
        ClusterMap::decode_versioned(&bytes).ok()
    }

    /// The newest map any running node has saved.
    pub fn map(&self) -> ClusterMap {
        (1..=self.nodes.len() as u8)
            .filter(|i| self.nodes[usize::from(*i) - 1].is_some())
            .filter_map(|i| self.map_of(i))
            .max_by_key(|m| m.epoch)
            .unwrap_or_default()
    }

    /// Waits until the newest map satisfies `cond`.
    pub async fn wait_map(
        &self,
        what: &str,
        within: Duration,
        cond: impl Fn(&ClusterMap) -> bool,
    ) -> Result<(), ClusterError> {
        wait_until(what, within, || cond(&self.map())).await
    }

    /// The node leading `group`, as the newest map says.
    pub fn leader(&self, group: GroupId) -> Option<NodeId> {
        self.map().leader(group)
    }

    /// The group owning `user`.
    pub fn group_of(&self, user: UserId) -> Option<GroupId> {
        self.map().group_of(user)
    }

    /// A user id of shard group `group` (the `n`th of its range).
    pub fn user_in(&self, group: GroupId, n: u64) -> Option<UserId> {
        Some(self.map().groups.get(&group)?.range?.start + n)
    }

    /// Shard groups, by id.
    pub fn shard_groups(&self) -> Vec<GroupId> {
        self.map()
            .groups
            .keys()
            .copied()
            .filter(|g| *g != META_GROUP)
            .collect()
    }

    /// Kills node `i` with SIGKILL and waits for the process to be gone.
    pub fn kill(&mut self, i: u8) {
        if let Some(mut node) = self
            .nodes
            .get_mut(usize::from(i).wrapping_sub(1))
            .and_then(Option::take)
        {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }

    /// Sends node `i`'s process `signal` (`SIGSTOP` pauses it, `SIGCONT` lets it go on).
    pub fn signal(&self, i: u8, signal: libc::c_int) {
        if let Some(node) = self.node(i) {
            node.signal(signal);
        }
    }

    /// Lines of every node's log files (all its runs) that tell of a panic, with the node.
    pub fn panics(&self) -> Vec<String> {
        self.logged_ever("panicked")
    }

    /// Lines of every node's log files (all its runs) that contain `needle`, with the node.
    pub fn logged_ever(&self, needle: &str) -> Vec<String> {
        (1..=self.opts.nodes)
            .flat_map(|i| {
                let log =
                    std::fs::read_to_string(self.opts.dir.join(format!("n{i}.log"))).unwrap_or_default();
                log.lines()
                    .filter(|l| l.contains(needle))
                    .map(|l| format!("node {i}: {l}"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Stops node `i` as an operator does (SIGTERM) and waits up to `within` for it to exit;
    /// `false` if it had to be killed.
    pub async fn terminate(&mut self, i: u8, within: Duration) -> bool {
        let Some(mut node) = self
            .nodes
            .get_mut(usize::from(i).wrapping_sub(1))
            .and_then(Option::take)
        else {
            return true;
        };
        node.signal(libc::SIGTERM);
        node.exit_within(within).await
    }

    /// Starts node `i` again on its data directory, and waits until it serves.
    pub async fn restart(&mut self, i: u8) -> Result<(), ClusterError> {
        if self.is_running(i) {
            return Err(ClusterError::Setup(format!("node {i} is running")));
        }
        self.spawn(i, "run")?;
        self.wait_ready(i).await
    }

    /// Starts node `i` again on its data directory at another IP address (last byte `last`, on
    /// the cluster's loopback network), as a rescheduled pod is, and waits until it serves.
    pub async fn restart_at(&mut self, i: u8, last: u8) -> Result<(), ClusterError> {
        if self.opts.netns.is_some() {
            return Err(ClusterError::Setup(
                "nodes in namespaces keep their addresses".into(),
            ));
        }
        if last <= self.opts.nodes || self.moved.values().any(|m| *m == last) {
            return Err(ClusterError::Setup(format!("address .{last} is taken")));
        }
        self.moved.insert(i, last);
        self.write_config(i, self.opts.groups)?;
        self.restart(i).await
    }

    /// The configured `groups` of the new cluster.
    pub fn groups(&self) -> u64 {
        self.opts.groups
    }

    /// A token for `user`, valid for an hour.
    pub fn token(&self, user: UserId) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.signer.sign(Claims {
            user,
            expires_at: Millis(now + 3_600_000),
        })
    }

    /// A connected client of `user` that knows only the nodes `via` (1-based ids); retries
    /// while the cluster answers "retry" (an election), for up to 20 s.
    pub async fn client_via(&self, user: UserId, via: &[u8]) -> Result<Client, nearby_client::ClientError> {
        self.connect(self.client_config(user, via)).await
    }

    /// The configuration of a client of `user` that knows only the nodes `via` (1-based ids).
    pub fn client_config(&self, user: UserId, via: &[u8]) -> ClientConfig {
        let endpoints: Vec<String> = via.iter().map(|i| self.client_addr(*i).to_string()).collect();
        let mut cfg = ClientConfig::new(String::new(), self.client_ca.clone(), user, self.token(user))
            .with_endpoints(endpoints);
        cfg.connect_timeout = Duration::from_secs(2);
        cfg.request_timeout = Duration::from_secs(3);
        cfg
    }

    /// Connects with `cfg`, retrying while the cluster answers "retry" (an election), for up to
    /// 20 s.
    pub async fn connect(&self, cfg: ClientConfig) -> Result<Client, nearby_client::ClientError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match Client::connect(cfg.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stops every node with SIGTERM and waits for them.
    pub async fn stop(mut self) {
        for node in self.nodes.iter_mut().flatten() {
            node.signal(libc::SIGTERM);
        }
        for node in self.nodes.iter_mut().flatten() {
            node.exit_within(Duration::from_secs(10)).await;
        }
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        for node in self.nodes.iter_mut().flatten() {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
        if std::thread::panicking() {
            self.keep_logs();
        }
    }
}

impl ProcessCluster {
    /// A test failed: copies every node's log out of the (temporary) cluster directory into
    /// `$TMPDIR/nearby-cluster-failed-<pid>-<n>/` and logs where, with each log's last lines —
    /// what a CI run that failed once can still be diagnosed from.
    fn keep_logs(&self) {
        static KEPT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = KEPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let kept = std::env::temp_dir().join(format!("nearby-cluster-failed-{}-{n}", std::process::id()));
        if std::fs::create_dir_all(&kept).is_err() {
            return;
        }
        for i in 1..=self.opts.nodes {
            let name = format!("n{i}.log");
            // The file has every run of the node, unless the test's directory is gone already
            // (its guard dropped first); then the running process's lines, kept in memory.
            if std::fs::copy(self.opts.dir.join(&name), kept.join(&name)).is_err() {
                if let Some(node) = self.node(i) {
                    let lines = node.log.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
                    let _ = std::fs::write(kept.join(&name), lines);
                }
            }
            let log = std::fs::read_to_string(kept.join(&name)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(KEPT_TAIL)..].join("\n");
            tracing::error!("node {i}'s log ends:\n{tail}");
        }
        tracing::error!(dir = %kept.display(), "the failed test's node logs are kept");
    }
}

/// How many of each node's last log lines a failed test shows.
const KEPT_TAIL: usize = 80;
