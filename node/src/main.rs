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
            };
            #[allow(clippy::print_stdout)] // the banner is for the person who typed the command
            let ready = |banner: String| println!("{banner}");
            rt.block_on(nearby_node::dev::run(opts, ready, shutdown_signal()))
                .context("nearby-node dev failed")
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
