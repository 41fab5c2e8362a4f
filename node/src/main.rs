//! `nearby-node`: the nearby server binary. Parses flags, sets up logging, runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "nearby-node", version, about = "The nearby server")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a complete single-node cluster with all defaults.
    Dev {
        /// Data directory.
        #[arg(long, default_value = "./nearby-data", env = "NEARBY_DATA")]
        data: PathBuf,
        /// UDP address of the client service.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: SocketAddr,
        /// UDP address of the node-to-node Raft transport.
        #[arg(long, default_value = "127.0.0.1:7401")]
        raft_listen: SocketAddr,
        /// Where the CLI finds the endpoint and certificate (default ~/.nearby).
        #[arg(long, env = "NEARBY_HOME")]
        home: Option<PathBuf>,
        /// Number of shard groups the user-id space is cut into.
        #[arg(long, default_value_t = 4)]
        groups: u64,
        /// Load users and relations from a bulk-import file before serving.
        #[arg(long)]
        import: Option<PathBuf>,
        /// Use quinn's default transport settings instead of nearby's (to measure them).
        #[arg(long, hide = true)]
        quinn_defaults: bool,
        /// Never shed updates under overload (to measure the raw ceiling).
        #[arg(long)]
        no_shed: bool,
    },
    /// Run a node from a configuration file (TOML; `NEARBY_*` environment overrides).
    Run {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Make a token signing key: `token-key.pk8` (keep it with the login service) and
    /// `token.pub` (give it to every node as `auth.token_public_key`).
    Keygen {
        /// Directory to write the two files to.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    match cli.command {
        Cmd::Dev {
            data,
            listen,
            raft_listen,
            home,
            groups,
            import,
            quinn_defaults,
            no_shed,
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
                import,
                transport: if quinn_defaults {
                    nearby_node::service::tls::Transport::QuinnDefaults
                } else {
                    nearby_node::service::tls::Transport::Tuned
                },
                shed: !no_shed,
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
        Cmd::Run { config } => {
            let config = nearby_node::config::NodeConfig::load(&config, |k| std::env::var(k).ok())?;
            rt.block_on(run_node(config))
        }
        Cmd::Keygen { out } => keygen(&out),
    }
}

async fn run_node(config: nearby_node::config::NodeConfig) -> anyhow::Result<()> {
    use nearby_node::service::tls::ServerTls;
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
    };
    let tls = ServerTls::from_pem(&read(&config.tls.cert)?, &read(&config.tls.key)?)
        .map_err(|e| anyhow::anyhow!("config field `tls`: {e}"))?;
    let public = nearby_index::codec::base64url_decode(read(&config.auth.token_public_key)?.trim())
        .filter(|k| k.len() == 32)
        .context("config field `auth.token_public_key`: not a base64url Ed25519 public key")?;
    // One node: no peers to authenticate yet, so the cluster CA can be ephemeral.
    let ca = nearby_raft::transport::ClusterCa::generate("single-node")?;
    let node = nearby_node::node::Node::start(nearby_node::node::NodeOptions {
        node_id: config.node_id,
        data: config.data.clone(),
        client_listen: config.listen,
        raft_listen: config.raft_listen,
        groups: config.groups,
        server_tls: tls,
        node_tls: ca.issue_node()?,
        verifier: nearby_node::auth::TokenVerifier::new(public),
        dev_signer: None,
        service: config.service(),
        clock: std::sync::Arc::new(nearby_node::clock::SystemClock),
        transport: Default::default(),
    })
    .await?;
    tracing::info!(endpoint = %node.client_addr(), "nearby node is ready");
    node.run(nearby_node::shutdown::signal()).await;
    Ok(())
}

fn keygen(out: &std::path::Path) -> anyhow::Result<()> {
    let signer = nearby_node::auth::TokenSigner::generate()?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let key = out.join("token-key.pk8");
    let public = out.join("token.pub");
    std::fs::write(&key, signer.pkcs8()).with_context(|| format!("cannot write {}", key.display()))?;
    std::fs::write(&public, format!("{}\n", signer.verifier().public_base64url()))
        .with_context(|| format!("cannot write {}", public.display()))?;
    tracing::info!(key = %key.display(), public = %public.display(), "token key written");
    Ok(())
}
