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
    /// Shed periodic updates under overload (see [`crate::service::overload`]).
    pub shed: bool,
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

/// Runs the dev node until `shutdown` completes. `ready` gets the text telling a newcomer what to
/// type next.
pub async fn run(
    opts: DevOptions,
    ready: impl FnOnce(String),
    shutdown: impl Future<Output = ()>,
) -> Result<(), DevError> {
    let dev_dir = opts.data.join("dev");
    let signer = Arc::new(token_key(&dev_dir)?);
    let tls = server_tls(&dev_dir)?;
    let ca_pem = tls.chain_pem.clone();
    let ca = dev_ca(&dev_dir)?;
    let node_tls = dev_node_tls(&ca, &dev_dir, 1)?;
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
    nopts.raft_listen = opts.raft_listen;
    nopts.dev_signer = Some(signer);
    nopts.transport = opts.transport;
    nopts.service = ServiceConfig {
        shed: if opts.shed {
            ServiceConfig::default().shed
        } else {
            None
        },
        ..ServiceConfig::default()
    };
    let node = Node::start(nopts).await?;
    if let Some(path) = &opts.import {
        let seed = nearby_raft::seed::Seed::read(path).map_err(|e| files_err(path, e))?;
        node.import(&seed).await?;
    }
    let endpoint = node.client_addr().to_string();
    write(&opts.home.join("endpoint"), format!("{endpoint}\n").as_bytes())?;
    write(&opts.home.join("ca.pem"), ca_pem.as_bytes())?;
    write(&opts.home.join("server_name"), b"localhost\n")?;
    tracing::info!(data = %opts.data.display(), %endpoint, "nearby dev node is ready");
    ready(format!(
        "nearby dev node is ready: clients connect to {endpoint} (written to {home}).\n\
         In another shell, be two friends 3 km apart:\n\
         \n  nearby --user 1 login && nearby --user 2 login\
         \n  nearby --user 1 friends add 2 && nearby --user 2 friends add 1\
         \n  nearby --user 1 location set 52.5200 13.4050\
         \n  nearby --user 2 location set 52.5470 13.4050\
         \n  nearby --user 1 list\
         \n  nearby --user 1 watch        # then move user 2 in a third shell\n\
         \n(`nearby` is `cargo run -p nearby-client --bin nearby --`.) Ctrl-C stops the node.",
        home = opts.home.display()
    ));
    node.run(shutdown).await;
    tracing::info!("nearby dev node stopped");
    Ok(())
}
