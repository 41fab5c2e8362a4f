//! `nodectl`: the operator's tool, on the admin API of any node (see `docs/operations.md`).
//!
//! It finds the cluster through `NEARBY_HOME` like `nearby` (`admin`: admin API addresses, one
//! per line, tried in turn; `admin-token`: the bearer token) or `--admin ADDR` and
//! `--token-file FILE`. An address `https://host:port` is spoken to over TLS, its certificate
//! checked against `--ca FILE`; a bare `host:port` over plain HTTP. Output is for people by
//! default and JSON with `--json`; every change takes `--dry-run`; a refusal prints the node's
//! reason and exits with status 2.

// nodectl's output (stdout) and errors (stderr) are its interface.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use nearby_node::admin::{GroupsView, NodeView, NodesView, StatusView};

#[derive(Parser)]
#[command(
    name = "nodectl",
    version,
    about = "Operate a nearby cluster through its admin API"
)]
struct Cli {
    /// An admin API address (`host:port`, or `https://host:port` for a node whose admin API
    /// has a certificate); default: the addresses in NEARBY_HOME/admin.
    #[arg(long, global = true)]
    admin: Option<String>,
    /// The CA certificate (PEM) that `https://` admin APIs' certificates must chain to.
    #[arg(long, global = true, env = "NEARBY_ADMIN_CA")]
    ca: Option<PathBuf>,
    /// The file holding the admin token; default: NEARBY_HOME/admin-token.
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// Where `nearby-node dev` wrote the admin addresses and token (default ~/.nearby).
    #[arg(long, global = true, env = "NEARBY_HOME")]
    home: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The cluster at a glance: epoch, meta leader, nodes.
    Status,
    /// Every node: state, addresses, version, uptime, CPU, memory, sessions, replicas, leaders.
    Nodes,
    /// Every shard group: range, leader, term, replicas, applied index, users.
    Groups,
    /// Move a group's leadership to another node holding a voter of it.
    TransferLeader {
        /// The group.
        group: u64,
        /// The node to lead it.
        #[arg(long)]
        to: u64,
        /// Only check that the change is possible; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Empty a node: its leaderships handed over a group at a time (its clients follow), its
    /// replicas replaced on other nodes; waits, showing progress, until it holds nothing. With
    /// `--leaders-only` (before a restart), only its leaderships move and it keeps its replicas.
    Drain {
        /// The node.
        node: u64,
        /// Only hand its leaderships over (the node is cordoned: it leads nothing until
        /// `undrain`, and keeps its replicas).
        #[arg(long)]
        leaders_only: bool,
        /// Only check; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Drain even if groups are left with fewer than three replicas.
        #[arg(long)]
        force: bool,
        /// Start the drain and return without waiting.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds (exit code 3; the drain goes on).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Stop a drain: the node is up again (what moved stays moved).
    Undrain {
        /// The node.
        node: u64,
        /// Only check; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Move a group's replica from one node to another (leadership handed over first if the
    /// source leads; a learner on the target catches up and votes; the source's is removed).
    Move {
        /// The group.
        group: u64,
        /// The node holding the replica.
        #[arg(long)]
        from: u64,
        /// The node to hold it.
        #[arg(long)]
        to: u64,
        /// Only check; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Start it and return without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Split a group's range in two (at the median of its users by default): the upper part
    /// becomes a new group on the same nodes, made from the group's own replicas (nothing is
    /// copied over the network); a split left half done is finished.
    Split {
        /// The group.
        group: u64,
        /// The first user id of the new group.
        #[arg(long)]
        at: Option<u64>,
        /// Only check; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Start it and return without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Merge two neighbouring groups (the second's range starts where the first's ends): the
    /// second's replicas moved onto the first's nodes, then its records absorbed by the first;
    /// a merge left half done is finished.
    Merge {
        /// The group that stays (the lower range).
        left: u64,
        /// The group absorbed (the range right after it).
        right: u64,
        /// Only check; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Start it and return without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Even out replicas, leaders and the load the leaders carry (users online): shows the
    /// plan, then carries it out within the limits, with progress.
    Rebalance {
        /// Moves at once.
        #[arg(long, default_value_t = 2)]
        max_concurrent: u32,
        /// Moves a minute touching any one node (its clients are redirected at this pace).
        #[arg(long, default_value_t = 30)]
        rate: u32,
        /// Only show the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Start it and return without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Operations in flight (and the last ones finished) on every node.
    Operations,
    /// Is the cluster whole? Every node up and answering, every group led, placement settled,
    /// no operation running. Exit 0 if so, 1 (with what is not) if not.
    Health {
        /// Wait up to this many seconds for it to become healthy, showing what is still missing
        /// (exit 3 if it does not).
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// Add a node: the one waiting at ADDR (its node-to-node address; started with
    /// `nearby-node join --config FILE` and no seeds) is invited, joins, and placement gives it
    /// replicas and leaders.
    AddNode {
        /// The new node's node-to-node address (`host:port`, its `raft_listen`/`advertise`).
        addr: String,
        /// Only ask it who it is; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Take a drained node out of the cluster (then stop its process).
    Remove {
        /// The node.
        node: u64,
        /// Only check; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// How long a change may take to show in the map of the node `nodectl` asks.
const MAP_LAG: Duration = Duration::from_secs(5);

/// What the admin API answered.
struct Answer {
    status: u16,
    body: String,
}

/// The admin API of one cluster: its addresses (tried in turn) and token.
struct Admin {
    addrs: Vec<String>,
    token: String,
    /// How `https://` addresses are checked, once `--ca` is read.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Admin {
    fn from_cli(cli: &Cli) -> anyhow::Result<Admin> {
        let home = cli
            .home
            .clone()
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".nearby")));
        let addrs = match &cli.admin {
            Some(a) => vec![a.clone()],
            None => {
                let path = home
                    .as_ref()
                    .map(|h| h.join("admin"))
                    .context("no --admin, and no NEARBY_HOME or HOME to find the admin addresses in")?;
                let text = std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "no --admin, and cannot read {} (start `nearby-node dev`, or pass --admin)",
                        path.display()
                    )
                })?;
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect()
            }
        };
        if addrs.is_empty() {
            bail!("no admin API address to try");
        }
        let token_path = match &cli.token_file {
            Some(p) => p.clone(),
            None => home
                .map(|h| h.join("admin-token"))
                .context("no --token-file, and no NEARBY_HOME or HOME to find admin-token in")?,
        };
        let token = nearby_node::secrets::read_secret_text(&token_path)
            .with_context(|| format!("the admin token ({})", token_path.display()))?
            .trim()
            .to_string();
        let tls = match &cli.ca {
            Some(path) => Some(tls_config(path)?),
            None => None,
        };
        Ok(Admin { addrs, token, tls })
    }

    /// Sends `method path` to the first address that answers.
    fn call(&self, method: &str, path: &str) -> anyhow::Result<Answer> {
        let mut last = None;
        for addr in &self.addrs {
            match request(addr, self.tls.as_ref(), method, path, &self.token) {
                Ok(a) => return Ok(a),
                Err(e) => last = Some(e.context(format!("admin API at {addr}"))),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no admin API address to try")))
    }

    /// `GET path` as `T`, failing with the node's message on an error status.
    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<(T, String)> {
        let a = self.call("GET", path)?;
        if a.status != 200 {
            bail!("the node refused ({}): {}", a.status, error_message(&a.body));
        }
        let value =
            serde_json::from_str(&a.body).with_context(|| format!("GET {path}: not the JSON expected"))?;
        Ok((value, a.body))
    }
}

/// A TLS client that trusts the CA certificates in `ca` (PEM) and nothing else.
fn tls_config(ca: &std::path::Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let pem = std::fs::read(ca).with_context(|| format!("--ca {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.with_context(|| format!("--ca {}: not a PEM certificate", ca.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("--ca {}: not a usable CA certificate", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("--ca {}: no CERTIFICATE in it", ca.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One HTTP/1.0 exchange (the body ends with the connection): the admin API is small JSON.
/// `addr` is `host:port` (plain HTTP) or `https://host:port` (TLS, checked with `tls`).
fn request(
    addr: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    method: &str,
    path: &str,
    token: &str,
) -> anyhow::Result<Answer> {
    // `add-node` answers once the node is in (up to a minute).
    let timeout = Duration::from_secs(90);
    let (https, hostport) = match addr.strip_prefix("https://") {
        Some(rest) => (true, rest.trim_end_matches('/')),
        None => (false, addr.strip_prefix("http://").unwrap_or(addr)),
    };
    let sock = hostport
        .to_socket_addrs()
        .with_context(|| format!("{hostport} is not host:port"))?
        .next()
        .with_context(|| format!("{hostport} has no address"))?;
    let tcp = TcpStream::connect_timeout(&sock, Duration::from_secs(3))?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {hostport}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
    );
    let raw = if https {
        let config =
            tls.context("an https:// admin address needs --ca (the CA its certificate chains to)")?;
        let host = hostport
            .rsplit_once(':')
            .map_or(hostport, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .with_context(|| format!("{host} is not a host name or an IP address"))?;
        let conn = rustls::ClientConnection::new(Arc::clone(config), name)?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        stream.write_all(head.as_bytes())?;
        stream.flush()?;
        let mut raw = Vec::new();
        match stream.read_to_end(&mut raw) {
            Ok(_) => {}
            // A server that closes without TLS's close_notify: the answer is whole only if its
            // length says so (checked below).
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => return Err(e.into()),
        }
        raw
    } else {
        let mut tcp = tcp;
        tcp.write_all(head.as_bytes())?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw)?;
        raw
    };
    let text = String::from_utf8(raw).context("the answer is not UTF-8")?;
    let (head, body) = text.split_once("\r\n\r\n").context("an answer without headers")?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("an answer without a status")?;
    let length = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    if length.is_some_and(|n| n != body.len()) {
        bail!("the answer was cut short ({} of {:?} bytes)", body.len(), length);
    }
    Ok(Answer {
        status,
        body: body.to_string(),
    })
}

fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(String::from))
        .unwrap_or_else(|| body.trim().to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nodectl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let admin = Admin::from_cli(cli)?;
    match &cli.command {
        Cmd::Status => {
            let (s, raw): (StatusView, String) = admin.get("/api/v1/status")?;
            if cli.json {
                println!("{raw}");
            } else {
                println!(
                    "epoch {}  meta leader {}  groups {} ({} without a leader)  sessions {}  protocol {}  (answered by node {})\n",
                    s.epoch,
                    s.meta_leader.map_or("none".into(), |n| format!("node {n}")),
                    s.groups,
                    s.groups_without_leader,
                    s.sessions,
                    s.active_protocol,
                    s.answered_by
                );
                print_nodes(&s.nodes);
            }
        }
        Cmd::Nodes => {
            let (n, raw): (NodesView, String) = admin.get("/api/v1/nodes")?;
            if cli.json {
                println!("{raw}");
            } else {
                print_nodes(&n.nodes);
            }
        }
        Cmd::Groups => {
            let (g, raw): (GroupsView, String) = admin.get("/api/v1/groups")?;
            if cli.json {
                println!("{raw}");
            } else {
                println!(
                    "{:>5}  {:>20}  {:>20}  {:>6}  {:>5}  {:<12}  {:>8}  {:>8}  {:>8}  {:>10}  asleep",
                    "group",
                    "range start",
                    "range end",
                    "leader",
                    "term",
                    "replicas",
                    "applied",
                    "users",
                    "online",
                    "updates"
                );
                let figure = |v: Option<u64>| v.map_or("?".into(), |v| v.to_string());
                for x in &g.groups {
                    let replicas: Vec<String> = x.replicas.iter().map(ToString::to_string).collect();
                    println!(
                        "{:>5}  {:>20}  {:>20}  {:>6}  {:>5}  {:<12}  {:>8}  {:>8}  {:>8}  {:>10}  {}",
                        x.id,
                        x.range[0],
                        x.range[1],
                        x.leader.map_or("-".into(), |l| l.to_string()),
                        x.term,
                        replicas.join(","),
                        figure(x.applied),
                        figure(x.users),
                        figure(x.online),
                        figure(x.updates_total),
                        x.asleep.map_or("?", |a| if a { "yes" } else { "no" }),
                    );
                }
            }
        }
        Cmd::TransferLeader { group, to, dry_run } => {
            return change(
                &admin,
                cli.json,
                &format!("/api/v1/groups/{group}/transfer-leader?to={to}&dry_run={dry_run}"),
            );
        }
        Cmd::Drain {
            node,
            leaders_only,
            dry_run,
            force,
            no_wait,
            timeout,
        } => {
            let code = change(
                &admin,
                cli.json,
                &format!(
                    "/api/v1/nodes/{node}/drain?dry_run={dry_run}&force={force}&leaders_only={leaders_only}"
                ),
            )?;
            if code != ExitCode::SUCCESS || *dry_run || *no_wait {
                return Ok(code);
            }
            let deadline = timeout.map(|t| std::time::Instant::now() + Duration::from_secs(t));
            return wait_drained(&admin, *node, *leaders_only, cli.json, deadline);
        }
        Cmd::Undrain { node, dry_run } => {
            return change(
                &admin,
                cli.json,
                &format!("/api/v1/nodes/{node}/undrain?dry_run={dry_run}"),
            );
        }
        Cmd::Move {
            group,
            from,
            to,
            dry_run,
            no_wait,
        } => {
            let path = format!("/api/v1/groups/{group}/move?from={from}&to={to}&dry_run={dry_run}");
            return operation(&admin, cli.json, &path, *no_wait);
        }
        Cmd::Split {
            group,
            at,
            dry_run,
            no_wait,
        } => {
            let at = at.map_or(String::new(), |a| format!("&at={a}"));
            let path = format!("/api/v1/groups/{group}/split?dry_run={dry_run}{at}");
            return operation(&admin, cli.json, &path, *no_wait);
        }
        Cmd::Merge {
            left,
            right,
            dry_run,
            no_wait,
        } => {
            let path = format!("/api/v1/groups/{left}/merge?with={right}&dry_run={dry_run}");
            return operation(&admin, cli.json, &path, *no_wait);
        }
        Cmd::Rebalance {
            max_concurrent,
            rate,
            dry_run,
            no_wait,
        } => {
            let path = format!(
                "/api/v1/rebalance?max_concurrent={max_concurrent}&per_minute={rate}&dry_run={dry_run}"
            );
            return operation(&admin, cli.json, &path, *no_wait);
        }
        Cmd::Operations => {
            let (ops, raw): (serde_json::Value, String) = admin.get("/api/v1/operations")?;
            if cli.json {
                println!("{raw}");
            } else {
                println!(
                    "{:<8}  {:<9}  {:<8}  {:>7}  {:>8}  what",
                    "id", "kind", "state", "steps", "secs"
                );
                for o in ops["operations"].as_array().into_iter().flatten() {
                    println!(
                        "{:<8}  {:<9}  {:<8}  {:>3}/{:<3}  {:>8.1}  {}{}",
                        o["id"].as_str().unwrap_or("?"),
                        o["kind"].as_str().unwrap_or("?"),
                        state_word(&o["state"]),
                        o["done_steps"],
                        o["total_steps"],
                        o["elapsed_s"].as_f64().unwrap_or(0.0),
                        o["what"].as_str().unwrap_or(""),
                        failure(&o["state"]).map_or(String::new(), |w| format!(" — failed: {w}")),
                    );
                }
            }
        }
        Cmd::AddNode { addr, dry_run } => {
            return change(
                &admin,
                cli.json,
                &format!("/api/v1/nodes?addr={addr}&dry_run={dry_run}"),
            );
        }
        Cmd::Health { wait } => {
            let deadline = wait.map(|w| std::time::Instant::now() + Duration::from_secs(w));
            return health(&admin, cli.json, deadline);
        }
        Cmd::Remove { node, dry_run } => {
            return change(
                &admin,
                cli.json,
                &format!("/api/v1/nodes/{node}/remove?dry_run={dry_run}"),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What keeps the cluster from being whole (empty if it is): nodes not up or not answering,
/// groups without a leader, placement's pending steps, operations running.
fn unhealthy(admin: &Admin) -> anyhow::Result<Vec<String>> {
    let (s, _): (StatusView, String) = admin.get("/api/v1/status")?;
    let mut why = Vec::new();
    for n in &s.nodes {
        if n.state != "up" {
            why.push(format!("node {} is {}", n.id, n.state));
        } else if let Some(e) = &n.error {
            why.push(format!("node {} does not answer: {e}", n.id));
        }
    }
    if s.meta_leader.is_none() {
        why.push("the meta group has no leader".into());
    }
    if s.groups_without_leader > 0 {
        why.push(format!("{} group(s) without a leader", s.groups_without_leader));
    }
    if s.placement_pending > 0 {
        why.push(format!("placement has {} step(s) to take", s.placement_pending));
    }
    let (ops, _): (serde_json::Value, String) = admin.get("/api/v1/operations")?;
    let running = ops["operations"]
        .as_array()
        .map_or(0, |o| o.iter().filter(|o| o["state"] == "running").count());
    if running > 0 {
        why.push(format!("{running} operation(s) running"));
    }
    Ok(why)
}

/// `nodectl health [--wait SECS]`.
fn health(admin: &Admin, json: bool, deadline: Option<std::time::Instant>) -> anyhow::Result<ExitCode> {
    let mut shown = Vec::new();
    loop {
        // While waiting, a node that cannot answer yet (restarting) is one more thing to wait for.
        let why = match (unhealthy(admin), deadline) {
            (Ok(why), _) => why,
            (Err(e), Some(_)) => vec![format!("{e:#}")],
            (Err(e), None) => return Err(e),
        };
        let done = why.is_empty();
        let late = deadline.is_some_and(|d| std::time::Instant::now() >= d);
        if done || deadline.is_none() || late {
            if json {
                println!("{}", serde_json::json!({ "healthy": done, "problems": why }));
            } else if done {
                println!("healthy: every node up, every group led, placement settled, no operation running");
            } else {
                for w in &why {
                    println!("not healthy: {w}");
                }
            }
            return Ok(match (done, late) {
                (true, _) => ExitCode::SUCCESS,
                (false, true) => ExitCode::from(3),
                (false, false) => ExitCode::from(1),
            });
        }
        if why != shown && !json {
            eprintln!("waiting: {}", why.join("; "));
            shown = why;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// POSTs a change; prints what was (or would be) done, or the node's refusal (exit 2).
fn change(admin: &Admin, json: bool, path: &str) -> anyhow::Result<ExitCode> {
    let a = admin.call("POST", path)?;
    if json {
        println!("{}", a.body.trim());
    }
    if a.status != 200 {
        eprintln!("nodectl: the node refused: {}", error_message(&a.body));
        return Ok(ExitCode::from(2));
    }
    if !json {
        let v: serde_json::Value = serde_json::from_str(&a.body).unwrap_or_default();
        println!("{}", v["what"].as_str().unwrap_or("done"));
    }
    Ok(ExitCode::SUCCESS)
}

/// `running`, `done` or `failed`.
fn state_word(state: &serde_json::Value) -> &str {
    state.as_str().unwrap_or(if state.get("failed").is_some() {
        "failed"
    } else {
        "?"
    })
}

/// Why an operation failed, if it did.
fn failure(state: &serde_json::Value) -> Option<&str> {
    state.get("failed").and_then(|w| w.as_str())
}

/// Starts a long change and, unless `no_wait` (or a dry run: no operation), follows its
/// operation to the end with a progress bar; exit 2 if refused, 4 if it failed.
fn operation(admin: &Admin, json: bool, path: &str, no_wait: bool) -> anyhow::Result<ExitCode> {
    let a = admin.call("POST", path)?;
    if json {
        println!("{}", a.body.trim());
    }
    if a.status != 200 {
        eprintln!("nodectl: the node refused: {}", error_message(&a.body));
        return Ok(ExitCode::from(2));
    }
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap_or_default();
    if !json {
        println!("{}", v["what"].as_str().unwrap_or("done"));
    }
    let Some(id) = v["operation"].as_str().filter(|_| !no_wait) else {
        return Ok(ExitCode::SUCCESS);
    };
    let mut last = None;
    loop {
        let (ops, _): (serde_json::Value, String) = admin.get("/api/v1/operations")?;
        let Some(o) = ops["operations"]
            .as_array()
            .and_then(|l| l.iter().find(|o| o["id"].as_str() == Some(id)))
        else {
            bail!("operation {id} is no longer listed (its node restarted?)");
        };
        let (done, total) = (
            o["done_steps"].as_u64().unwrap_or(0),
            o["total_steps"].as_u64().unwrap_or(1),
        );
        let now = (done, o["current"].as_str().unwrap_or("").to_string());
        if last.as_ref() != Some(&now) {
            if json {
                println!("{o}");
            } else {
                let width = 30;
                let filled = (done * width / total.max(1)).min(width) as usize;
                eprintln!(
                    "[{}{}] {done}/{total} {}",
                    "#".repeat(filled),
                    ".".repeat(width as usize - filled),
                    now.1
                );
            }
            last = Some(now);
        }
        match state_word(&o["state"]) {
            "done" => {
                if !json {
                    println!(
                        "operation {id} done in {:.1} s",
                        o["elapsed_s"].as_f64().unwrap_or(0.0)
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            "failed" => {
                eprintln!(
                    "nodectl: operation {id} failed: {}",
                    failure(&o["state"]).unwrap_or("?")
                );
                return Ok(ExitCode::from(4));
            }
            _ => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// Follows a drain until the node holds nothing, printing progress (a bar on stderr; with
/// `--json`, one JSON line per change on stdout).
fn wait_drained(
    admin: &Admin,
    node: u64,
    leaders_only: bool,
    json: bool,
    deadline: Option<std::time::Instant>,
) -> anyhow::Result<ExitCode> {
    let mut first: Option<usize> = None;
    let mut last = None;
    let state = if leaders_only { "cordoned" } else { "draining" };
    // The node answering may see the map a moment after the meta leader that took the change.
    let started = std::time::Instant::now();
    loop {
        let (view, _): (NodesView, String) = admin.get("/api/v1/nodes")?;
        let Some(n) = view.nodes.iter().find(|n| n.id == node) else {
            bail!("node {node} is no longer in the cluster");
        };
        if n.state != state {
            if started.elapsed() < MAP_LAG {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            bail!(
                "node {node} is {} now, not {state} (someone undrained it?)",
                n.state
            );
        }
        let sessions = n.stats.as_ref().map(|s| s.sessions);
        let left = if leaders_only {
            n.leaders + usize::from(n.meta_leader)
        } else {
            n.replicas + n.leaders + usize::from(n.meta_replica) + usize::from(n.meta_leader)
        };
        let start = *first.get_or_insert(left.max(1));
        let now = (n.replicas, n.leaders, n.meta_replica, n.meta_leader, sessions);
        if last != Some(now) {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"node": node, "replicas": n.replicas, "leaders": n.leaders,
                        "meta_replica": n.meta_replica, "meta_leader": n.meta_leader, "sessions": sessions})
                );
            } else {
                let done = start.saturating_sub(left);
                let width = 30;
                let filled = done * width / start;
                eprintln!(
                    "[{}{}] node {node}: {} replica(s), {} leadership(s) left{}, {} session(s)",
                    "#".repeat(filled),
                    ".".repeat(width - filled),
                    n.replicas,
                    n.leaders,
                    match (n.meta_replica, n.meta_leader) {
                        (_, true) => " (and it leads the meta group)",
                        (true, false) => " (and a meta replica)",
                        _ => "",
                    },
                    sessions.map_or("?".into(), |s| s.to_string())
                );
            }
            last = Some(now);
        }
        if left == 0 {
            if !json {
                println!(
                    "{}",
                    if leaders_only {
                        format!("node {node} leads nothing now: restart it, then `nodectl undrain {node}`")
                    } else {
                        format!(
                            "node {node} holds nothing now: stop its process, then `nodectl remove {node}`"
                        )
                    }
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        if deadline.is_some_and(|d| std::time::Instant::now() > d) {
            eprintln!("nodectl: gave up waiting; node {node} is still {state} (see `nodectl nodes`)");
            return Ok(ExitCode::from(3));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn print_nodes(nodes: &[NodeView]) {
    println!(
        "{:>4}  {:<9}  {:<21}  {:<21}  {:>8}  {:>7}  {:>8}  {:>8}  {:>8}  {:>8}  {:>5}",
        "node",
        "state",
        "client",
        "admin",
        "replicas",
        "leaders",
        "sessions",
        "cpu s",
        "rss MiB",
        "uptime s",
        "proto"
    );
    for n in nodes {
        let (sessions, cpu, rss, up) = match &n.stats {
            Some(s) => (
                s.sessions.to_string(),
                format!("{:.1}", s.cpu_s),
                format!("{:.1}", s.rss_bytes as f64 / (1024.0 * 1024.0)),
                s.uptime_s.to_string(),
            ),
            None => ("?".into(), "?".into(), "?".into(), "?".into()),
        };
        println!(
            "{:>4}  {:<9}  {:<21}  {:<21}  {:>8}  {:>7}  {:>8}  {:>8}  {:>8}  {:>8}  {:>5}{}",
            n.id,
            n.state,
            n.client,
            n.admin,
            n.replicas,
            n.leaders,
            sessions,
            cpu,
            rss,
            up,
            n.protocol.map_or("?".into(), |p| p.to_string()),
            n.error.as_ref().map_or(String::new(), |e| format!("  ({e})")),
        );
    }
}
