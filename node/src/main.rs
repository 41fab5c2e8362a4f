//! `nearby-node`: the nearby server binary. Parses flags, sets up logging, runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nearby_node::cluster::Bootstrap;
use nearby_node::config::NodeConfig;
use nearby_node::secrets;

#[derive(Parser)]
#[command(name = "nearby-node", version, about = "The nearby server")]
struct Cli {
    /// Log lines as text, or as one JSON object per line (for a log pipeline).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "NEARBY_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

/// How log lines are written to stderr.
/// `--driver`: what carries client connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DriverArg {
    /// nearby's batched driver on quinn-proto.
    Batched,
    /// quinn's task per connection.
    Tasks,
}

impl From<DriverArg> for nearby_node::service::Driver {
    fn from(d: DriverArg) -> Self {
        match d {
            DriverArg::Batched => nearby_node::service::Driver::Batched,
            DriverArg::Tasks => nearby_node::service::Driver::Tasks,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (with `message`),
    /// and the spans it happened in.
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a complete cluster with all defaults: one node, or `--nodes N` processes.
    Dev {
        /// Data directory.
        #[arg(long, default_value = "./nearby-data", env = "NEARBY_DATA")]
        data: PathBuf,
        /// UDP address of the client service (of node 1 with `--nodes`).
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: SocketAddr,
        /// UDP address of the node-to-node transport (of node 1 with `--nodes`).
        #[arg(long, default_value = "127.0.0.1:7401")]
        raft_listen: SocketAddr,
        /// Where the CLI finds the endpoints and certificate (default ~/.nearby).
        #[arg(long, env = "NEARBY_HOME")]
        home: Option<PathBuf>,
        /// Shard groups the user-id space of a new cluster is cut into.
        #[arg(long, default_value_t = 4)]
        groups: u64,
        /// Nodes, each its own process with its own data directory, on 127.0.0.1, .2, .3, …
        #[arg(long, default_value_t = 1)]
        nodes: u8,
        /// Load users and relations from a bulk-import file before serving.
        #[arg(long)]
        import: Option<PathBuf>,
        /// Use quinn's default transport settings instead of nearby's (to measure them).
        #[arg(long, hide = true)]
        quinn_defaults: bool,
        /// What carries client connections: `batched` (nearby's driver) or `tasks` (quinn's task
        /// per connection, to measure against).
        #[arg(long, value_enum, default_value = "batched")]
        driver: DriverArg,
        /// Never shed updates under overload (to measure the raw ceiling).
        #[arg(long)]
        no_shed: bool,
        /// Record no location history (to measure what recording it costs).
        #[arg(long, hide = true)]
        no_history: bool,
        /// Connections (and handshakes in progress) one IP address may hold (default: the
        /// `[limits]` defaults, 1,024 and 64). Load generators run every simulated user from one
        /// address, as a carrier-grade NAT would.
        #[arg(long, value_name = "N")]
        address_limit: Option<u32>,
    },
    /// Run a node that already belongs to a cluster, or joins one (`cluster.join` in the
    /// config), from a configuration file (TOML; `NEARBY_*` environment overrides).
    Run {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Dev mode: also accept `DevLogin`, signing tokens with this key (PKCS#8, 0600).
        #[arg(long, hide = true)]
        dev_token_key: Option<PathBuf>,
        /// Load users and relations from a bulk-import file once serving.
        #[arg(long, hide = true)]
        import: Option<PathBuf>,
    },
    /// Initialise a new cluster with this node as its first member, then run it. Refused on a
    /// data directory that already belongs to a cluster.
    Init {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Shard groups the user-id space starts cut into (default: the config's `groups`).
        #[arg(long)]
        groups: Option<u64>,
        /// Dev mode: also accept `DevLogin`, signing tokens with this key (PKCS#8, 0600).
        #[arg(long, hide = true)]
        dev_token_key: Option<PathBuf>,
        /// Load users and relations from a bulk-import file once serving.
        #[arg(long, hide = true)]
        import: Option<PathBuf>,
    },
    /// Join the cluster of the node at SEED (its node-to-node address), then run. With no SEED
    /// (and no `cluster.join` in the config), wait to be added: `nodectl add-node ADDR` with this
    /// node's node-to-node address.
    Join {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// `host:port` of a node of the cluster.
        seeds: Vec<String>,
    },
    /// Make an admin API token (`[admin] token_file`; `nodectl` reads it from
    /// `NEARBY_HOME/admin-token` or `--token-file`): 32 random bytes, base64url, mode 0600.
    AdminToken {
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Check a configuration file as `run`, `init` and `join` read it (TOML, `NEARBY_*`
    /// overrides, every value's range) without starting anything, and print what the node would
    /// listen on and advertise. Exits 1 naming the field at fault. The files it names (keys,
    /// certificates) are read only when the node starts.
    CheckConfig {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the cluster map a data directory last saw (works while the node is stopped).
    Inspect {
        /// The node's data directory.
        #[arg(long)]
        data: PathBuf,
    },
    /// The cluster's certificate authority: make one, or issue a node's certificate.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Make a self-signed certificate for the client service (`cert.pem`, and `key.pem` 0600)
    /// for trying a cluster out; in production, use one from a CA the apps already trust.
    TlsCert {
        /// Directory to write the two files to.
        #[arg(long)]
        out: PathBuf,
        /// A name the certificate is for (a DNS name or an IP address); repeatable.
        #[arg(long = "name", default_value = "localhost")]
        names: Vec<String>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Make a token signing key: `token-key.pk8` (keep it with the login service) and
    /// `token.pub` (give it to every node as `auth.token_public_key`).
    Keygen {
        /// Directory to write the two files to.
        #[arg(long)]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Make a new cluster CA: `ca.pem` (give it to every node) and `ca-key.pem` (keep it with
    /// the operator, never on a node).
    Init {
        /// Directory to write the two files to.
        #[arg(long)]
        out: PathBuf,
        /// A name for the cluster, shown in the certificate.
        #[arg(long, default_value = "nearby")]
        name: String,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue node N's certificate: `node.pem` and `node-key.pem` (0600), with a copy of `ca.pem`
    /// and the cluster's `pseudonym.key` (0600; the same for every node of the CA).
    Issue {
        /// The directory holding `ca.pem` and `ca-key.pem`.
        #[arg(long)]
        ca: PathBuf,
        /// The node's id; the certificate is valid for this node only.
        #[arg(long)]
        node_id: u64,
        /// Directory to write the files to.
        #[arg(long)]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        );
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().with_current_span(false).init(),
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    // Signal handlers are installed when `shutdown::signal()` is called, which needs a runtime.
    let _entered = rt.enter();
    let env = |k: &str| std::env::var(k).ok();
    match cli.command {
        Cmd::Dev {
            data,
            listen,
            raft_listen,
            home,
            groups,
            nodes,
            import,
            quinn_defaults,
            driver,
            no_shed,
            no_history,
            address_limit,
        } => {
            let home = match home {
                Some(h) => h,
                None => std::env::var_os("HOME")
                    .map(|h| PathBuf::from(h).join(".nearby"))
                    .context("no --home, NEARBY_HOME or HOME to find the CLI's directory")?,
            };
            let opts = nearby_node::dev::DevOptions {
                data,
                home,
                listen,
                raft_listen,
                groups,
                nodes,
                import,
                transport: if quinn_defaults {
                    nearby_node::service::tls::Transport::QuinnDefaults
                } else {
                    nearby_node::service::tls::Transport::Tuned
                },
                driver: driver.into(),
                shed: !no_shed,
                history: !no_history,
                abuse: address_limit
                    .map(nearby_node::service::AbuseLimits::one_address)
                    .unwrap_or_default(),
                #[allow(clippy::print_stderr)] // the children's logs are this command's log
                child_log: |node, line| eprintln!("n{node} | {line}"),
            };
            #[allow(clippy::print_stdout)] // the banner is for the person who typed the command
            let ready = |banner: String| println!("{banner}");
            rt.block_on(nearby_node::dev::run(
                opts,
                ready,
                nearby_node::shutdown::signal(),
            ))
            .context("nearby-node dev failed")
        }
        Cmd::Run {
            config,
            dev_token_key,
            import,
        } => {
            let config = NodeConfig::load(&config, env)?;
            let bootstrap = if config.cluster.join.is_empty() {
                Bootstrap::Existing
            } else {
                Bootstrap::Join(config.cluster.join.clone())
            };
            rt.block_on(run_node(
                config,
                bootstrap,
                dev_token_key.as_deref(),
                import.as_deref(),
            ))
        }
        Cmd::Init {
            config,
            groups,
            dev_token_key,
            import,
        } => {
            let config = NodeConfig::load(&config, env)?;
            let groups = groups.unwrap_or(config.groups);
            anyhow::ensure!(
                (1..=4096).contains(&groups),
                "--groups {groups} is not in 1..=4096"
            );
            rt.block_on(run_node(
                config,
                Bootstrap::Init { groups },
                dev_token_key.as_deref(),
                import.as_deref(),
            ))
        }
        Cmd::Join { config, seeds } => {
            let config = NodeConfig::load(&config, env)?;
            let seeds = if seeds.is_empty() {
                config.cluster.join.clone()
            } else {
                seeds
            };
            let bootstrap = if seeds.is_empty() {
                Bootstrap::AwaitInvitation
            } else {
                Bootstrap::Join(seeds)
            };
            rt.block_on(run_node(config, bootstrap, None, None))
        }
        Cmd::Ca(CaCmd::Init { out, name, force }) => ca_init(&out, &name, force),
        Cmd::Ca(CaCmd::Issue {
            ca,
            node_id,
            out,
            force,
        }) => ca_issue(&ca, node_id, &out, force),
        Cmd::Keygen { out, force } => keygen(&out, force),
        Cmd::TlsCert { out, names, force } => tls_cert(&out, names, force),
        Cmd::AdminToken { out, force } => {
            secrets::write_admin_token(&out, force).with_context(|| format!("--out {}", out.display()))?;
            tracing::info!(path = %out.display(), "admin token written (0600)");
            Ok(())
        }
        Cmd::Inspect { data } => inspect(&data),
        Cmd::CheckConfig { config } => check_config(&config, env),
    }
}

fn check_config(path: &Path, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    let c = NodeConfig::load(path, env)?;
    let admin = c
        .admin
        .as_ref()
        .map_or("off".to_string(), |a| a.listen.to_string());
    let join = if c.cluster.join.is_empty() {
        "none".to_string()
    } else {
        c.cluster.join.join(", ")
    };
    #[allow(clippy::print_stdout)] // the command's output
    {
        println!(
            "{}: accepted — node {}, clients on {}, peers on {}, advertised as {}, admin {}, joins {}, data in {}",
            path.display(),
            c.node_id,
            c.listen,
            c.raft_listen,
            c.advertise.as_deref().unwrap_or("(its listen addresses)"),
            admin,
            join,
            c.data.display(),
        );
    }
    Ok(())
}

fn inspect(data: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(data.join("cluster/map"))
        .with_context(|| format!("no saved map under {}", data.display()))?;
    let map = nearby_raft::ClusterMap::decode_versioned(&bytes).context("the saved map does not decode")?;
    let mut out = format!("cluster {} epoch {}\nnodes:\n", map.cluster, map.epoch);
    for (id, n) in &map.nodes {
        out.push_str(&format!(
            "  {id}: {} raft={} client={}\n",
            n.state, n.info.raft, n.info.client
        ));
    }
    out.push_str("groups:\n");
    for (id, g) in &map.groups {
        let range = g.range.map_or("meta".to_string(), |r| r.to_string());
        out.push_str(&format!(
            "  {id}: {range} voters={:?} learners={:?} leader={:?} term={}\n",
            g.voters, g.learners, g.leader, g.term
        ));
    }
    #[allow(clippy::print_stdout)] // the command's output
    {
        print!("{out}");
    }
    Ok(())
}

fn read(p: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
}

/// A server certificate chain and key from the configuration's `cert` and `key` files (the key
/// readable by its owner only); errors name the key's config field, or the pair's.
fn server_tls(
    cert: &Path,
    key: &Path,
    key_field: &str,
    pair_field: &str,
) -> anyhow::Result<nearby_node::service::tls::ServerTls> {
    let key = secrets::read_secret_text(key).with_context(|| format!("config field `{key_field}`"))?;
    nearby_node::service::tls::ServerTls::from_pem(&read(cert)?, &key)
        .map_err(|e| anyhow::anyhow!("config field {pair_field}: {e}"))
}

async fn run_node(
    config: NodeConfig,
    bootstrap: Bootstrap,
    dev_token_key: Option<&Path>,
    import: Option<&Path>,
) -> anyhow::Result<()> {
    let tls = server_tls(&config.tls.cert, &config.tls.key, "tls.key", "`tls`")?;
    // One key per line: two while the issuer's key is rotated (see `nearby_node::auth`).
    let keys = read(&config.auth.token_public_key)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| nearby_index::codec::base64url_decode(l).filter(|k| k.len() == 32))
        .collect::<Option<Vec<_>>>()
        .context("config field `auth.token_public_key`: a line is not a base64url Ed25519 public key")?;
    let verifier = nearby_node::auth::TokenVerifier::with_keys(keys)
        .map_err(|e| anyhow::anyhow!("config field `auth.token_public_key`: {e}"))?;
    let node_key = secrets::read_secret_text(&config.cluster.key).context("config field `cluster.key`")?;
    let node_tls = nearby_raft::transport::NodeTls::from_pem(
        config.node_id,
        &read(&config.cluster.ca)?,
        &read(&config.cluster.cert)?,
        &node_key,
    )
    .context("config section `cluster`")?;
    let mut opts = nearby_node::node::NodeOptions::new(
        config.node_id,
        config.data.clone(),
        bootstrap,
        tls,
        node_tls,
        verifier,
        Arc::new(nearby_node::clock::SystemClock),
    );
    opts.client_listen = config.listen;
    opts.guard_clock = true;
    opts.raft_listen = config.raft_listen;
    opts.client_advertise = config.client_advertise();
    opts.raft_advertise = config.raft_advertise();
    opts.service = config.service();
    opts.driver = config.client_driver;
    opts.min_update_interval =
        std::time::Duration::from_millis(u64::from(config.limits.min_update_interval_ms));
    opts.history = config.history.config();
    opts.wal.min_free_bytes = config.limits.min_free_disk_mb.saturating_mul(1 << 20);
    opts.abuse = config.limits.abuse();
    match &config.cluster.pseudonym_key {
        Some(path) => {
            let key = secrets::read_pseudonym_key(path).context("config field `cluster.pseudonym_key`")?;
            opts.service.presence.pseudonyms = Some(nearby_node::strangers::Pseudonyms::new(&key));
        }
        None => tracing::warn!(
            "no `cluster.pseudonym_key`: this node lists no strangers nearby (see `nearby-node ca issue`)"
        ),
    }
    if let Some(admin) = &config.admin {
        let token =
            secrets::read_secret_text(&admin.token_file).context("config field `admin.token_file`")?;
        let tls = match (&admin.tls_cert, &admin.tls_key) {
            (Some(cert), Some(key)) => Some(
                server_tls(cert, key, "admin.tls_key", "`admin.tls_cert`/`admin.tls_key`")?
                    .https_config()
                    .map_err(|e| anyhow::anyhow!("config fields `admin.tls_cert`/`admin.tls_key`: {e}"))?,
            ),
            _ => None,
        };
        opts.admin = Some(nearby_node::admin::AdminOptions {
            listen: admin.listen,
            token: token.trim().to_string(),
            tls,
        });
    }
    if let Some(path) = dev_token_key {
        let bytes = secrets::read_secret(path).context("--dev-token-key")?;
        let signer = nearby_node::auth::TokenSigner::from_pkcs8(&bytes)
            .map_err(|e| anyhow::anyhow!("--dev-token-key: {e}"))?;
        opts.dev_signer = Some(Arc::new(signer));
    }
    let stop = nearby_node::shutdown::signal();
    let node = nearby_node::node::Node::start(opts).await?;
    if let Some(path) = import {
        let seed =
            nearby_raft::seed::Seed::read(path).with_context(|| format!("--import {}", path.display()))?;
        node.import(&seed).await?;
    }
    tracing::info!(endpoint = %node.client_addr(), "nearby node is ready");
    node.run(stop).await;
    Ok(())
}

fn ca_init(out: &Path, name: &str, force: bool) -> anyhow::Result<()> {
    let ca = nearby_raft::transport::ClusterCa::generate(name)?;
    let key = out.join("ca-key.pem");
    let cert = out.join("ca.pem");
    secrets::write_secret(&key, ca.key_pem().as_bytes(), force)?;
    secrets::write_public(&cert, ca.cert_pem().as_bytes(), force)?;
    tracing::info!(cert = %cert.display(), key = %key.display(), "cluster CA written; keep the key off the nodes");
    Ok(())
}

fn ca_issue(ca_dir: &Path, node_id: u64, out: &Path, force: bool) -> anyhow::Result<()> {
    anyhow::ensure!(node_id >= 1, "--node-id must be at least 1");
    let ca_pem = read(&ca_dir.join("ca.pem"))?;
    let ca_key = secrets::read_secret_text(&ca_dir.join("ca-key.pem"))?;
    let ca = nearby_raft::transport::ClusterCa::from_pem(&ca_pem, &ca_key)?;
    let tls = ca.issue_node(node_id)?;
    let (cert, key, ca_copy) = (out.join("node.pem"), out.join("node-key.pem"), out.join("ca.pem"));
    secrets::write_secret(&key, tls.key_pem().as_bytes(), force)?;
    secrets::write_public(&cert, tls.cert_pem().as_bytes(), force)?;
    if ca_copy != ca_dir.join("ca.pem") {
        secrets::write_public(&ca_copy, ca_pem.as_bytes(), force)?;
    }
    secrets::write_pseudonym_key(&out.join("pseudonym.key"), &ca_key, force)?;
    tracing::info!(node = node_id, cert = %cert.display(), key = %key.display(), "node certificate issued");
    Ok(())
}

fn tls_cert(out: &Path, names: Vec<String>, force: bool) -> anyhow::Result<()> {
    let ck = rcgen::generate_simple_self_signed(names.clone()).context("making the certificate")?;
    let (cert, key) = (out.join("cert.pem"), out.join("key.pem"));
    secrets::write_secret(&key, ck.signing_key.serialize_pem().as_bytes(), force)?;
    secrets::write_public(&cert, ck.cert.pem().as_bytes(), force)?;
    tracing::info!(cert = %cert.display(), key = %key.display(), ?names, "self-signed client service certificate written; apps must trust cert.pem");
    Ok(())
}

fn keygen(out: &Path, force: bool) -> anyhow::Result<()> {
    let signer = nearby_node::auth::TokenSigner::generate()?;
    let key = out.join("token-key.pk8");
    let public = out.join("token.pub");
    secrets::write_secret(&key, signer.pkcs8(), force)?;
    secrets::write_public(
        &public,
        format!("{}\n", signer.verifier().public_base64url()).as_bytes(),
        force,
    )?;
    tracing::info!(key = %key.display(), public = %public.display(), "token key written");
    Ok(())
}
