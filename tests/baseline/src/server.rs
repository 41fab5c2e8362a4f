//! A running baseline server: the Redis backend, nearby's QUIC client service over it with dev
//! login (a self-signed certificate and a throw-away token key, made at every start), and the
//! `NEARBY_HOME` files the `nearby` CLI reads (`endpoint`, `ca.pem`, `server_name`), as
//! `nearby-node dev` writes them.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nearby_node::auth::TokenSigner;
use nearby_node::service::tls::ServerTls;
use nearby_node::service::{Service, ServiceOptions};

use crate::{BaselineConfig, BaselineError, RedisBackend};

/// What a baseline server is started with.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Redis `host:port`.
    pub redis: String,
    /// UDP address of the client service.
    pub listen: SocketAddr,
    /// Where the CLI finds the endpoint and certificate.
    pub home: PathBuf,
    /// A seed file to load into Redis before serving.
    pub import: Option<PathBuf>,
    /// Backend settings.
    pub config: BaselineConfig,
    /// Shed periodic updates under overload, like nearby (the QUIC front end is shared).
    pub shed: bool,
    /// A session's updates closer together than this are refused, like nearby's (`None`: the
    /// front end's default).
    pub min_update_interval: Option<std::time::Duration>,
}

/// A started server.
pub struct Server {
    service: Service<RedisBackend>,
    backend: Arc<RedisBackend>,
    addr: SocketAddr,
    ca_pem: String,
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> BaselineError {
    BaselineError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn write(path: &Path, contents: &str) -> Result<(), BaselineError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    }
    std::fs::write(path, contents).map_err(|e| file_err(path, e))
}

impl Server {
    /// Connects to Redis, imports the seed if any, binds the service and writes the home files.
    pub async fn start(opts: ServerOptions) -> Result<Server, BaselineError> {
        let backend = RedisBackend::connect(&format!("redis://{}", opts.redis), opts.config).await?;
        if let Some(path) = &opts.import {
            let seed = nearby_raft::seed::Seed::read(path).map_err(|e| file_err(path, e))?;
            let started = std::time::Instant::now();
            tracing::info!(
                users = seed.users.len(),
                friendships = seed.friendships.len(),
                "importing"
            );
            let done = backend.import(&seed).await?;
            tracing::info!(?done, elapsed = ?started.elapsed(), "import done");
        }
        let backend = Arc::new(backend);
        let tls = ServerTls::self_signed().map_err(BaselineError::Setup)?;
        let ca_pem = tls.chain_pem.clone();
        let signer = Arc::new(TokenSigner::generate().map_err(|e| BaselineError::Setup(e.to_string()))?);
        let mut sopts = ServiceOptions::new(opts.listen, tls, signer.verifier());
        // The original design serves each user from a handler of its own: quinn's task per
        // connection stands for that. nearby's batched driver is nearby's, not the baseline's.
        sopts.driver = nearby_node::service::Driver::Tasks;
        sopts.dev_signer = Some(signer);
        if !opts.shed {
            sopts.shed = None;
        }
        if let Some(interval) = opts.min_update_interval {
            sopts.min_update_interval = interval;
        }
        let service = Service::bind(sopts, Arc::clone(&backend))?;
        let addr = service
            .local_addr()
            .map_err(|e| BaselineError::Setup(format!("client service address: {e}")))?;
        write(&opts.home.join("endpoint"), &format!("{addr}\n"))?;
        write(&opts.home.join("ca.pem"), &ca_pem)?;
        write(&opts.home.join("server_name"), "localhost\n")?;
        Ok(Server {
            service,
            backend,
            addr,
            ca_pem,
        })
    }

    /// Where clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The certificate clients trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The backend, for counters.
    pub fn backend(&self) -> &Arc<RedisBackend> {
        &self.backend
    }

    /// Serves until `shutdown` completes, then tells sessions to reconnect and stops.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        self.service.run(shutdown).await;
        tracing::info!(stats = ?self.backend.stats(), "baseline stopped");
    }
}
