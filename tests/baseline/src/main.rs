//! `nearby-baseline`: the original design's connection server over Redis, speaking nearby's
//! client protocol. Parses flags, sets up logging, runs until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use nearby_baseline::server::{Server, ServerOptions};
use nearby_baseline::BaselineConfig;

#[derive(Parser)]
#[command(
    name = "nearby-baseline",
    version,
    about = "The original Nearby Friends design (Redis cache + per-user Pub/Sub) behind nearby's QUIC protocol"
)]
struct Cli {
    /// Redis `host:port` (a redis-server you started).
    #[arg(long, default_value = "127.0.0.1:6379")]
    redis: String,
    /// UDP address of the client service.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// Where the `nearby` CLI finds the endpoint and certificate.
    #[arg(long, env = "NEARBY_HOME")]
    home: PathBuf,
    /// Load users and relations from a bulk-import file before serving.
    #[arg(long)]
    import: Option<PathBuf>,
    /// Redis Pub/Sub connections shared by all sessions.
    #[arg(long, default_value_t = 16)]
    pubsub_connections: usize,
    /// Inactivity timeout in seconds (nearby's default).
    #[arg(long)]
    ttl_s: Option<u64>,
    /// Never shed updates under overload (to measure the raw ceiling).
    #[arg(long)]
    no_shed: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
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
    let mut config = BaselineConfig {
        pubsub_connections: cli.pubsub_connections.max(1),
        ..BaselineConfig::default()
    };
    if let Some(ttl) = cli.ttl_s {
        config.ttl = std::time::Duration::from_secs(ttl.max(1));
    }
    let opts = ServerOptions {
        redis: cli.redis,
        listen: cli.listen,
        home: cli.home.clone(),
        import: cli.import,
        config,
        shed: !cli.no_shed,
        // The same front end as nearby's, with its default limits.
        min_update_interval: None,
    };
    rt.block_on(async {
        // Installed before "ready" is announced: a stop right after it is handled cleanly.
        let stop = nearby_node::shutdown::signal();
        let server = Server::start(opts)
            .await
            .context("nearby-baseline cannot start")?;
        tracing::info!(
            endpoint = %server.local_addr(),
            home = %cli.home.display(),
            "nearby-baseline is ready"
        );
        server.run(stop).await;
        anyhow::Ok(())
    })
}
