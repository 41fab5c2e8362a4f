//! The client-facing QUIC service: accepts connections, runs one [`session`] per connection, and
//! shuts down by telling every session to reconnect elsewhere.
//!
//! This module owns the endpoint and its limits; [`session`] owns the streams of one connection;
//! everything a request *does* is behind [`Backend`] (nearby's is [`crate::gateway::Gateway`]).

pub mod overload;
pub mod session;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::api::Backend;
use crate::auth::{TokenSigner, TokenVerifier};
use crate::metrics::ServiceMetrics;
use crate::queue::CloseReason;

/// How the service runs.
pub struct ServiceOptions {
    /// UDP address to bind.
    pub listen: SocketAddr,
    /// The server's TLS identity.
    pub tls: tls::ServerTls,
    /// Verifies session tokens.
    pub verifier: TokenVerifier,
    /// Dev mode only: issues tokens for `DevLogin`.
    pub dev_signer: Option<Arc<TokenSigner>>,
    /// How long dev tokens last.
    pub dev_token_ttl: Duration,
    /// Connections accepted at once; more are refused.
    pub max_connections: usize,
    /// Requests per second a session may send (sustained); bursts of twice that pass.
    pub requests_per_s: u32,
    /// A session's location updates closer together than this are refused (`rate_limited`):
    /// the node's fastest cadence is 10 s, so only a misbehaving client meets it.
    pub min_update_interval: Duration,
    /// How long a new connection may take to authenticate.
    pub hello_timeout: Duration,
    /// QUIC transport settings.
    pub transport: tls::Transport,
    /// Shed periodic location updates above these limits (`None`: never).
    pub shed: Option<overload::Limits>,
    /// Where the service counts sessions, updates, refusals, pushes and redirects.
    pub metrics: Arc<ServiceMetrics>,
}

impl ServiceOptions {
    /// Options with nearby's defaults.
    pub fn new(listen: SocketAddr, tls: tls::ServerTls, verifier: TokenVerifier) -> Self {
        ServiceOptions {
            listen,
            tls,
            verifier,
            dev_signer: None,
            dev_token_ttl: Duration::from_secs(24 * 3600),
            max_connections: 100_000,
            requests_per_s: 20,
            min_update_interval: Duration::from_millis(250),
            hello_timeout: Duration::from_secs(10),
            transport: tls::Transport::default(),
            shed: Some(overload::Limits::default()),
            metrics: Arc::default(),
        }
    }
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceStartError {
    /// TLS setup failed.
    #[error("tls: {0}")]
    Tls(String),
    /// The address could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running client service over backend `B`.
pub struct Service<B: Backend> {
    endpoint: quinn::Endpoint,
    core: Arc<B>,
    ctx: Arc<session::Context<B>>,
}

/// Socket buffer the client service asks the kernel for, each way. Linux's default (~208 KiB)
/// holds about two thousand small packets: a burst of updates and acknowledgements from many
/// sessions overflows it while the endpoint is busy, and every dropped packet costs a QUIC
/// retransmission after a timeout — tens to hundreds of milliseconds of latency. The kernel caps
/// the request at `net.core.rmem_max` / `wmem_max` (see `docs/operations.md`).
pub const SOCKET_BUFFER: usize = 4 << 20;

/// A QUIC server endpoint on `addr` with [`SOCKET_BUFFER`]-sized socket buffers (as far as the
/// kernel allows; a smaller grant is logged, not fatal).
pub fn server_endpoint(config: quinn::ServerConfig, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        // Accept IPv4 too where the address is the IPv6 wildcard, like quinn's own binding.
        let _ = socket.set_only_v6(false);
    }
    if let Err(e) = socket.set_recv_buffer_size(SOCKET_BUFFER) {
        tracing::warn!(error = %e, "cannot set the client socket's receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(SOCKET_BUFFER) {
        tracing::warn!(error = %e, "cannot set the client socket's send buffer");
    }
    // Linux reports twice the usable size it granted.
    let granted = |size: std::io::Result<usize>| size.unwrap_or(0) / 2;
    let (recv, send) = (
        granted(socket.recv_buffer_size()),
        granted(socket.send_buffer_size()),
    );
    if recv < SOCKET_BUFFER || send < SOCKET_BUFFER {
        tracing::info!(
            receive = recv,
            send,
            asked = SOCKET_BUFFER,
            "the kernel capped the client socket's buffers (raise net.core.rmem_max / wmem_max)"
        );
    }
    socket.bind(&addr.into())?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket.into(),
        runtime,
    )
}

/// A bound client endpoint that has no backend yet: a node learns its client address (to put in
/// the cluster map) before the layer behind the service exists.
pub struct Listener {
    endpoint: quinn::Endpoint,
    opts: ServiceOptions,
}

impl Listener {
    /// Binds the endpoint.
    pub fn bind(opts: ServiceOptions) -> Result<Listener, ServiceStartError> {
        let server_config = opts
            .tls
            .quinn_config(opts.transport)
            .map_err(ServiceStartError::Tls)?;
        let endpoint =
            server_endpoint(server_config, opts.listen).map_err(|source| ServiceStartError::Bind {
                addr: opts.listen,
                source,
            })?;
        Ok(Listener { endpoint, opts })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The service over `core`.
    pub fn attach<B: Backend>(self, core: Arc<B>) -> Service<B> {
        let opts = self.opts;
        let ctx = Arc::new(session::Context {
            core: Arc::clone(&core),
            verifier: opts.verifier,
            dev_signer: opts.dev_signer,
            dev_token_ttl: opts.dev_token_ttl,
            requests_per_s: opts.requests_per_s,
            min_update_interval: opts.min_update_interval,
            hello_timeout: opts.hello_timeout,
            max_connections: opts.max_connections,
            connections: Default::default(),
            load: opts.shed.map(|limits| Arc::new(overload::LoadGuard::new(limits))),
            metrics: opts.metrics,
        });
        Service {
            endpoint: self.endpoint,
            core,
            ctx,
        }
    }
}

impl<B: Backend> Service<B> {
    /// Binds the endpoint.
    pub fn bind(opts: ServiceOptions, core: Arc<B>) -> Result<Service<B>, ServiceStartError> {
        Ok(Listener::bind(opts)?.attach(core))
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Serves until `shutdown` completes; then tells sessions to go, waits briefly for them, and
    /// closes the endpoint.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let core = Arc::clone(&self.core);
        let ticker = tokio::spawn(async move {
            // Expiry is driven by the injected clock; this loop only decides how often to look.
            let mut every = tokio::time::interval(Duration::from_millis(200));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                core.tick();
            }
        });
        let probe = self
            .ctx
            .load
            .as_ref()
            .map(|guard| tokio::spawn(Arc::clone(guard).probe()));
        let mut sessions = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    if self.ctx.connections.load(std::sync::atomic::Ordering::Relaxed) >= self.ctx.max_connections {
                        tracing::warn!("connection limit reached; refusing");
                        incoming.refuse();
                        continue;
                    }
                    sessions.spawn(session::serve(incoming, Arc::clone(&self.ctx)));
                }
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
                () = &mut shutdown => break,
            }
        }
        tracing::info!(
            sessions = sessions.len(),
            "client service stopping; telling sessions to reconnect"
        );
        self.core.close_all(CloseReason::Shutdown);
        let drained = tokio::time::timeout(Duration::from_secs(3), async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            sessions.abort_all();
        }
        ticker.abort();
        if let Some(probe) = probe {
            probe.abort();
        }
        self.endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}
