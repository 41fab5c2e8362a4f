//! `nearby-node dev`: a complete single-node cluster on defaults, so a newcomer sees nearby work
//! with one command.
//!
//! It keeps its dev material in the data directory so restarts keep working with what clients
//! already hold: `DATA/dev/token-key.pk8` (signs dev tokens), `DATA/dev/cert.pem` and
//! `DATA/dev/key.pem` (the client service's self-signed certificate). It writes where the CLI
//! looks (`$NEARBY_HOME`, default `~/.nearby`): `endpoint` (host:port), `ca.pem` (the certificate
//! to trust) and `server_name`. Dev mode also accepts `DevLogin`: a token for any user id. None of
//! this exists outside dev mode.

use std::fs;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nearby_raft::transport::{ClusterCa, NodeTls};

use crate::api::ServiceConfig;
use crate::auth::TokenSigner;
use crate::clock::SystemClock;
use crate::cluster::Bootstrap;
use crate::node::{Node, NodeError, NodeOptions};
use crate::secrets;
use crate::service::tls::ServerTls;

/// What `nearby-node dev` runs with.
#[derive(Clone, Debug)]
pub struct DevOptions {
    /// The data directory.
    pub data: PathBuf,
    /// Where the CLI finds the endpoint and certificate.
    pub home: PathBuf,
    /// The client service address (UDP).
    pub listen: SocketAddr,
    /// The Raft transport address (UDP).
    pub raft_listen: SocketAddr,
    /// How many shard groups cut the user-id space of a new cluster.
    pub groups: u64,
    /// Nodes: one in this process, or more as child processes.
    pub nodes: u8,
    /// A bulk-import file to load before serving (see `nearby_raft::seed`).
    pub import: Option<PathBuf>,
    /// QUIC transport settings of the client service.
    pub transport: crate::service::tls::Transport,
    /// What carries the client service's connections.
    pub driver: crate::service::Driver,
    /// Shed periodic updates under overload (see [`crate::service::overload`]).
    pub shed: bool,
    /// Record users' location history (see [`crate::history`]); off only to measure its cost.
    pub history: bool,
    /// Per-address limits on client connections (see [`crate::service::AbuseLimits`]).
    pub abuse: crate::service::AbuseLimits,
    /// Where a child node's log lines go with `nodes` > 1 (node, line): the command's own output,
    /// which the binary owns.
    pub child_log: fn(u8, &str),
}

/// Why the dev node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    /// The node could not start.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// Dev material could not be read or written.
    #[error("{path}: {reason}")]
    Files {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn files_err(path: &Path, e: impl std::fmt::Display) -> DevError {
    DevError::Files {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Writes a file the CLI reads (it may be replaced: it describes the running dev cluster).
fn write(path: &Path, contents: &[u8]) -> Result<(), DevError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| files_err(dir, e))?;
    }
    fs::write(path, contents).map_err(|e| files_err(path, e))
}

/// The dev cluster's admin API token: loaded, or made and stored (0600) on first start.
fn admin_token(dir: &Path) -> Result<String, DevError> {
    let path = dir.join("admin-token");
    if !path.exists() {
        secrets::write_admin_token(&path, false).map_err(|e| files_err(&path, e))?;
    }
    let token = secrets::read_secret_text(&path).map_err(|e| files_err(&path, e))?;
    Ok(token.trim().to_string())
}

/// Writes what `nodectl` reads: every node's admin API address (one per line) and the admin
/// token (0600).
fn write_admin_home(home: &Path, admins: &[String], token: &str) -> Result<(), DevError> {
    let mut list = admins.join("\n");
    list.push('\n');
    write(&home.join("admin"), list.as_bytes())?;
    let path = home.join("admin-token");
    secrets::write_secret(&path, format!("{token}\n").as_bytes(), true).map_err(|e| files_err(&path, e))
}

/// The dev token key: loaded, or made and stored (0600) on first start.
pub(crate) fn token_key(dir: &Path) -> Result<TokenSigner, DevError> {
    let path = dir.join("token-key.pk8");
    if path.exists() {
        let bytes = secrets::read_secret(&path).map_err(|e| files_err(&path, e))?;
        return TokenSigner::from_pkcs8(&bytes).map_err(|e| files_err(&path, e));
    }
    let signer = TokenSigner::generate().map_err(|e| files_err(&path, e))?;
    secrets::write_secret(&path, signer.pkcs8(), false).map_err(|e| files_err(&path, e))?;
    Ok(signer)
}

/// The client service's certificate (for `localhost` and the loopback addresses dev nodes use):
/// loaded, or made and stored on first start.
pub(crate) fn server_tls(dir: &Path) -> Result<ServerTls, DevError> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert.exists() && key.exists() {
        let c = fs::read_to_string(&cert).map_err(|e| files_err(&cert, e))?;
        let k = secrets::read_secret_text(&key).map_err(|e| files_err(&key, e))?;
        return ServerTls::from_pem(&c, &k).map_err(|e| files_err(&cert, e));
    }
    let names = [
        "localhost",
        "127.0.0.1",
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
        "127.0.0.5",
    ];
    let ck = rcgen::generate_simple_self_signed(names.map(String::from).to_vec())
        .map_err(|e| files_err(&cert, e))?;
    let (c, k) = (ck.cert.pem(), ck.signing_key.serialize_pem());
    secrets::write_secret(&key, k.as_bytes(), true).map_err(|e| files_err(&key, e))?;
    secrets::write_public(&cert, c.as_bytes(), true).map_err(|e| files_err(&cert, e))?;
    ServerTls::from_pem(&c, &k).map_err(|e| files_err(&cert, e))
}

/// The dev cluster's CA: loaded, or made and stored on first start.
pub(crate) fn dev_ca(dir: &Path) -> Result<ClusterCa, DevError> {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    if cert.exists() && key.exists() {
        let c = fs::read_to_string(&cert).map_err(|e| files_err(&cert, e))?;
        let k = secrets::read_secret_text(&key).map_err(|e| files_err(&key, e))?;
        return ClusterCa::from_pem(&c, &k).map_err(|e| files_err(&cert, e));
    }
    let ca = ClusterCa::generate("dev").map_err(|e| files_err(&cert, e))?;
    secrets::write_secret(&key, ca.key_pem().as_bytes(), true).map_err(|e| files_err(&key, e))?;
    secrets::write_public(&cert, ca.cert_pem().as_bytes(), true).map_err(|e| files_err(&cert, e))?;
    Ok(ca)
}

/// The dev cluster's pseudonym key (derived from its CA), written to `dir/pseudonym.key`.
fn dev_pseudonyms(ca: &ClusterCa, dir: &Path) -> Result<crate::strangers::Pseudonyms, DevError> {
    let path = dir.join("pseudonym.key");
    secrets::write_pseudonym_key(&path, &ca.key_pem(), true).map_err(|e| files_err(&path, e))?;
    Ok(crate::strangers::Pseudonyms::new(&secrets::derive_pseudonym_key(
        &ca.key_pem(),
    )))
}

/// Node `id`'s identity under the dev CA: loaded, or issued and stored in `dir`.
pub(crate) fn dev_node_tls(ca: &ClusterCa, dir: &Path, id: u64) -> Result<NodeTls, DevError> {
    let (cert, key) = (
        dir.join(format!("node-{id}.pem")),
        dir.join(format!("node-{id}-key.pem")),
    );
    if cert.exists() && key.exists() {
        let c = fs::read_to_string(&cert).map_err(|e| files_err(&cert, e))?;
        let k = secrets::read_secret_text(&key).map_err(|e| files_err(&key, e))?;
        return NodeTls::from_pem(id, &ca.cert_pem(), &c, &k).map_err(|e| files_err(&cert, e));
    }
    let tls = ca.issue_node(id).map_err(|e| files_err(&cert, e))?;
    secrets::write_secret(&key, tls.key_pem().as_bytes(), true).map_err(|e| files_err(&key, e))?;
    secrets::write_public(&cert, tls.cert_pem().as_bytes(), true).map_err(|e| files_err(&cert, e))?;
    Ok(tls)
}

/// What to type next, for the banner.
const NEXT_STEPS: &str = "In another shell, be two friends 3 km apart:\n\
     \n  nearby --user 1 login && nearby --user 2 login\
     \n  nearby --user 1 friends add 2 && nearby --user 2 friends add 1\
     \n  nearby --user 1 location set 52.5200 13.4050\
     \n  nearby --user 2 location set 52.5470 13.4050\
     \n  nearby --user 1 list\
     \n  nearby --user 1 watch        # then move user 2 in a third shell\n\
     \n(`nearby` is `cargo run -p nearby-client --bin nearby --`.)";

/// Writes the files the CLI reads: every node's client address (one per line), the
/// certificate to trust, and the name it carries.
fn write_home(home: &Path, endpoints: &[String], ca_pem: &str) -> Result<(), DevError> {
    let mut list = endpoints.join("\n");
    list.push('\n');
    write(&home.join("endpoint"), list.as_bytes())?;
    write(&home.join("ca.pem"), ca_pem.as_bytes())?;
    write(&home.join("server_name"), b"localhost\n")
}

/// Runs the dev cluster until `shutdown` completes: one node in this process, or `nodes` child
/// processes (see [`run_many`]). `ready` gets the text telling a newcomer what to type next.
pub async fn run(
    opts: DevOptions,
    ready: impl FnOnce(String),
    shutdown: impl Future<Output = ()>,
) -> Result<(), DevError> {
    if opts.nodes > 1 {
        return run_many(opts, ready, shutdown).await;
    }
    let dev_dir = opts.data.join("dev");
    let signer = Arc::new(token_key(&dev_dir)?);
    let tls = server_tls(&dev_dir)?;
    let ca_pem = tls.chain_pem.clone();
    let ca = dev_ca(&dev_dir)?;
    let node_tls = dev_node_tls(&ca, &dev_dir, 1)?;
    let pseudonyms = dev_pseudonyms(&ca, &dev_dir)?;
    let member = crate::cluster::identity::is_member(&opts.data).map_err(|e| files_err(&opts.data, e))?;
    let bootstrap = if member {
        tracing::info!(
            groups = opts.groups,
            "the data directory holds a cluster: its ranges come from its map (`--groups` only shapes a new one)"
        );
        Bootstrap::Existing
    } else {
        Bootstrap::Init { groups: opts.groups }
    };
    let mut nopts = NodeOptions::new(
        1,
        opts.data.clone(),
        bootstrap,
        tls,
        node_tls,
        signer.verifier(),
        Arc::new(SystemClock),
    );
    nopts.client_listen = opts.listen;
    nopts.guard_clock = true;
    nopts.raft_listen = opts.raft_listen;
    nopts.dev_signer = Some(signer);
    nopts.transport = opts.transport;
    nopts.driver = opts.driver;
    nopts.service = ServiceConfig {
        shed: if opts.shed {
            ServiceConfig::default().shed
        } else {
            None
        },
        ..ServiceConfig::default()
    };
    nopts.service.presence.pseudonyms = Some(pseudonyms);
    nopts.history.enabled = opts.history;
    nopts.abuse = opts.abuse;
    // The admin API listens on TCP at the client service's (UDP) address.
    let token = admin_token(&dev_dir)?;
    nopts.admin = Some(crate::admin::AdminOptions {
        listen: opts.listen,
        token: token.clone(),
        tls: None,
    });
    let node = Node::start(nopts).await?;
    if let Some(path) = &opts.import {
        let seed = nearby_raft::seed::Seed::read(path).map_err(|e| files_err(path, e))?;
        node.import(&seed).await?;
    }
    let endpoint = node.client_addr().to_string();
    write_home(&opts.home, std::slice::from_ref(&endpoint), &ca_pem)?;
    let admin: Vec<String> = node.admin_addr().iter().map(ToString::to_string).collect();
    write_admin_home(&opts.home, &admin, &token)?;
    tracing::info!(data = %opts.data.display(), %endpoint, "nearby dev node is ready");
    ready(format!(
        "nearby dev node is ready: clients connect to {endpoint} (written to {home}).\n{NEXT_STEPS} \
         Ctrl-C stops the node.",
        home = opts.home.display()
    ));
    node.run(shutdown).await;
    tracing::info!("nearby dev node stopped");
    Ok(())
}

/// The address of node `i` (1-based) of a dev cluster: the base address's last octet plus
/// `i - 1`, the same port.
fn nth_addr(base: SocketAddr, i: u8) -> Result<SocketAddr, DevError> {
    let bad = |why: &str| DevError::Files {
        path: PathBuf::from(base.to_string()),
        reason: why.to_string(),
    };
    if base.port() == 0 {
        return Err(bad(
            "`--nodes` needs fixed ports: the nodes find each other at known addresses",
        ));
    }
    match base.ip() {
        std::net::IpAddr::V4(ip) => {
            let o = ip.octets();
            let last = o[3]
                .checked_add(i - 1)
                .ok_or_else(|| bad("the base address leaves no room for the nodes' addresses"))?;
            Ok(SocketAddr::from(([o[0], o[1], o[2], last], base.port())))
        }
        std::net::IpAddr::V6(_) => Err(bad("`--nodes` uses IPv4 loopback addresses (127.0.0.x)")),
    }
}

/// One child node: its process and where it listens.
struct Child {
    id: u8,
    client: SocketAddr,
    process: tokio::process::Child,
}

/// Runs `opts.nodes` nodes, each its own `nearby-node` process with its own data directory
/// (`DATA/n1`, `DATA/n2`, …) on consecutive loopback addresses (127.0.0.1, .2, … by default),
/// sharing the dev CA, client certificate and token key in `DATA/dev`. Node 1 initialises the
/// cluster on first start; the others join it. Their log lines go to `opts.child_log` (the
/// binary prefixes them with the node). A child that dies is reported, not restarted: the
/// others keep serving. On shutdown every child is stopped with SIGTERM (a clean, draining
/// stop).
pub async fn run_many(
    opts: DevOptions,
    ready: impl FnOnce(String),
    shutdown: impl Future<Output = ()>,
) -> Result<(), DevError> {
    let dev_dir = opts.data.join("dev");
    let signer = token_key(&dev_dir)?;
    let public = dev_dir.join("token.pub");
    write(
        &public,
        format!("{}\n", signer.verifier().public_base64url()).as_bytes(),
    )?;
    let tls = server_tls(&dev_dir)?;
    let ca = dev_ca(&dev_dir)?;
    dev_pseudonyms(&ca, &dev_dir)?;
    admin_token(&dev_dir)?;
    let exe = std::env::current_exe().map_err(|e| files_err(Path::new("nearby-node"), e))?;
    let node1_raft = nth_addr(opts.raft_listen, 1)?;
    let mut children: Vec<Child> = Vec::new();
    let (ready_tx, ready_rx) = tokio::sync::mpsc::unbounded_channel::<u8>();
    let mut readiness = Readiness {
        rx: ready_rx,
        seen: std::collections::BTreeSet::new(),
    };
    for i in 1..=opts.nodes {
        let (client, raft) = (nth_addr(opts.listen, i)?, nth_addr(opts.raft_listen, i)?);
        dev_node_tls(&ca, &dev_dir, u64::from(i))?;
        let dir = opts.data.join(format!("n{i}"));
        fs::create_dir_all(&dir).map_err(|e| files_err(&dir, e))?;
        let join = if i == 1 {
            String::new()
        } else {
            format!("join = [\"{node1_raft}\"]\n")
        };
        let config = format!(
            "node_id = {i}\ndata = {data:?}\nlisten = \"{client}\"\nraft_listen = \"{raft}\"\ngroups = {groups}\n\
             client_driver = \"{driver}\"\n\
             [cluster]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\npseudonym_key = {pkey:?}\n{join}\
             [tls]\ncert = {tcert:?}\nkey = {tkey:?}\n\
             [auth]\ntoken_public_key = {public:?}\n\
             [limits]\nshed = {shed}\nconnections_per_address = {conns}\nhandshakes_per_address = {hands}\n\
             [history]\nenabled = {history}\n\
             [admin]\nlisten = \"{client}\"\ntoken_file = {admin_token:?}\n",
            data = dir,
            groups = opts.groups,
            driver = match opts.driver {
                crate::service::Driver::Batched => "batched",
                crate::service::Driver::Tasks => "tasks",
            },
            ca = dev_dir.join("ca.pem"),
            cert = dev_dir.join(format!("node-{i}.pem")),
            key = dev_dir.join(format!("node-{i}-key.pem")),
            pkey = dev_dir.join("pseudonym.key"),
            tcert = dev_dir.join("cert.pem"),
            tkey = dev_dir.join("key.pem"),
            shed = opts.shed,
            conns = opts.abuse.connections_per_address,
            hands = opts.abuse.handshakes_per_address,
            history = opts.history,
            admin_token = dev_dir.join("admin-token"),
        );
        let config_path = dir.join("node.toml");
        write(&config_path, config.as_bytes())?;
        let member = crate::cluster::identity::is_member(&dir).map_err(|e| files_err(&dir, e))?;
        let mut cmd = tokio::process::Command::new(&exe);
        // The nodes log text: this process relays their lines with a node prefix.
        cmd.args(["--log-format", "text"])
            .arg(if i == 1 && !member { "init" } else { "run" })
            .arg("--config")
            .arg(&config_path)
            .arg("--dev-token-key")
            .arg(dev_dir.join("token-key.pk8"));
        if let (1, Some(import)) = (i, &opts.import) {
            cmd.arg("--import").arg(import);
        }
        cmd.stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        let mut process = cmd.spawn().map_err(|e| files_err(&exe, e))?;
        tracing::info!(node = i, pid = process.id(), %client, %raft, "started a node process");
        if let Some(stderr) = process.stderr.take() {
            let tx = ready_tx.clone();
            tokio::spawn(forward_log(i, opts.nodes, stderr, tx, opts.child_log));
        }
        children.push(Child {
            id: i,
            client,
            process,
        });
        if i == 1 {
            // The others join through node 1: wait until it serves.
            readiness.wait(&mut children, 1).await?;
        }
    }
    for i in 2..=opts.nodes {
        readiness.wait(&mut children, i).await?;
    }
    // Placement then spreads replicas and leaders; a leader moved later would lose its users'
    // live locations (soft state), so "ready" means settled.
    if let Err(e) = readiness.wait(&mut children, SETTLED).await {
        tracing::warn!(error = %e, "placement has not settled yet; serving anyway");
    }
    let endpoints: Vec<String> = children.iter().map(|c| c.client.to_string()).collect();
    write_home(&opts.home, &endpoints, &tls.chain_pem)?;
    // Each node's admin API listens on TCP at its client service's (UDP) address.
    write_admin_home(&opts.home, &endpoints, &admin_token(&dev_dir)?)?;
    tracing::info!(nodes = opts.nodes, data = %opts.data.display(), "nearby dev cluster is ready");
    ready(format!(
        "nearby dev cluster is ready: {n} nodes, each its own process, clients connect to any of \
         {list} (written to {home}).\n{NEXT_STEPS} Stop a node with `kill <pid>` (its pid is in \
         the log) and the others keep serving; Ctrl-C stops them all.",
        n = opts.nodes,
        list = endpoints.join(", "),
        home = opts.home.display()
    ));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {
                for c in &mut children {
                    if let Ok(Some(status)) = c.process.try_wait() {
                        if c.client.port() != 0 {
                            tracing::warn!(node = c.id, %status, "a node process exited; the others keep serving (it is not restarted)");
                            c.client.set_port(0);
                        }
                    }
                }
                if children.iter().all(|c| c.client.port() == 0) {
                    tracing::warn!("every node process has exited");
                    break;
                }
            }
        }
    }
    for c in &mut children {
        if let Some(pid) = c.process.id() {
            // SIGTERM: each node stops cleanly, telling its clients to reconnect.
            // SAFETY: kill(2) with a pid this process spawned and a valid signal number.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    for c in &mut children {
        match tokio::time::timeout(std::time::Duration::from_secs(10), c.process.wait()).await {
            Ok(Ok(status)) => tracing::info!(node = c.id, %status, "node process stopped"),
            _ => {
                tracing::warn!(node = c.id, "node process did not stop in time; killing it");
                let _ = c.process.kill().await;
            }
        }
    }
    tracing::info!("nearby dev cluster stopped");
    Ok(())
}

/// What [`Readiness`] reports when placement has settled over all the nodes.
const SETTLED: u8 = 0;

/// Forwards a child's log to `out`, and reports readiness: the node's, and placement settled over
/// all `nodes` ([`SETTLED`]).
async fn forward_log(
    node: u8,
    nodes: u8,
    stderr: tokio::process::ChildStderr,
    ready: tokio::sync::mpsc::UnboundedSender<u8>,
    out: fn(u8, &str),
) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let settled = format!("nodes={nodes}");
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains("nearby node is ready") {
            let _ = ready.send(node);
        }
        if line.contains("placement settled") && line.contains(&settled) {
            let _ = ready.send(SETTLED);
        }
        out(node, &line);
    }
}

/// The children's readiness reports.
struct Readiness {
    rx: tokio::sync::mpsc::UnboundedReceiver<u8>,
    seen: std::collections::BTreeSet<u8>,
}

impl Readiness {
    /// Waits until node `id` (or [`SETTLED`]) has been reported (now or earlier); fails if a
    /// child exits first.
    async fn wait(&mut self, children: &mut [Child], id: u8) -> Result<(), DevError> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        while !self.seen.contains(&id) {
            tokio::select! {
                got = self.rx.recv() => match got {
                    Some(n) => {
                        self.seen.insert(n);
                    }
                    None => break,
                },
                () = tokio::time::sleep(std::time::Duration::from_millis(200)) => {
                    for c in children.iter_mut() {
                        if let Ok(Some(status)) = c.process.try_wait() {
                            return Err(DevError::Files {
                                path: PathBuf::from(format!("node {}", c.id)),
                                reason: format!("the node process exited ({status}) before it was ready; see its log above"),
                            });
                        }
                    }
                    if tokio::time::Instant::now() > deadline {
                        break;
                    }
                }
            }
        }
        if self.seen.contains(&id) {
            return Ok(());
        }
        let (path, reason) = if id == SETTLED {
            ("placement".to_string(), "did not settle within 60 s")
        } else {
            (format!("node {id}"), "the node did not become ready within 60 s")
        };
        Err(DevError::Files {
            path: PathBuf::from(path),
            reason: reason.into(),
        })
    }
}
