//! The client-facing QUIC service: accepts connections, runs one [`session`] per connection, and
//! shuts down by telling every session to reconnect elsewhere.
//!
//! This module owns the socket and its limits; a transport carries the connections — [`driver`]
//! (nearby's own, on quinn-proto: one task for all of them, packets sent in batches; the
//! default) or [`tasks`] (quinn's tasks per connection; the original design's baseline runs on
//! it); [`session`] is one client's session over either; everything a request *does* is behind
//! [`Backend`] (nearby's is [`crate::gateway::Gateway`]).

pub mod driver;
pub mod overload;
pub mod session;
mod tasks;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use self::driver::AbuseLimits;
use crate::api::Backend;
use crate::auth::{TokenSigner, TokenVerifier};
use crate::metrics::ServiceMetrics;

/// What carries the service's connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Driver {
    /// nearby's driver on quinn-proto: one task owns the socket and every connection, and sends
    /// the packets of a wake-up in batches (`sendmmsg`, GSO).
    #[default]
    Batched,
    /// quinn's: a task per connection and two per session, a system call per packet.
    Tasks,
}

/// How the service runs.
pub struct ServiceOptions {
    /// What carries the connections.
    pub driver: Driver,
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
    /// Limits on connections and handshakes per address, and when to ask for a QUIC Retry
    /// (the batched driver; quinn's tasks apply only `max_connections`).
    pub abuse: AbuseLimits,
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
            driver: Driver::default(),
            listen,
            tls,
            verifier,
            dev_signer: None,
            dev_token_ttl: Duration::from_secs(24 * 3600),
            max_connections: 100_000,
            requests_per_s: 20,
            min_update_interval: Duration::from_millis(250),
            hello_timeout: Duration::from_secs(10),
            abuse: AbuseLimits::default(),
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
    transport: Bound,
    core: Arc<B>,
    ctx: Arc<session::Context<B>>,
}

/// The bound socket, with what carries its connections.
enum Bound {
    Batched(driver::Bound),
    Tasks(quinn::Endpoint),
}

impl Bound {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Bound::Batched(b) => b.local_addr(),
            Bound::Tasks(e) => e.local_addr(),
        }
    }
}

/// Socket buffer the client service asks the kernel for, each way. Linux's default (~208 KiB)
/// holds about two thousand small packets: a burst of updates and acknowledgements from many
/// sessions overflows it while the endpoint is busy, and every dropped packet costs a QUIC
/// retransmission after a timeout — tens to hundreds of milliseconds of latency. The kernel caps
/// the request at `net.core.rmem_max` / `wmem_max` (see `docs/operations.md`).
pub const SOCKET_BUFFER: usize = 4 << 20;

/// A UDP socket bound to `addr` with [`SOCKET_BUFFER`]-sized buffers (as far as the kernel
/// allows; a smaller grant is logged, not fatal).
pub(crate) fn bind_socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
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
    Ok(socket)
}

/// A quinn server endpoint on `addr` (see [`bind_socket`]).
pub fn server_endpoint(config: quinn::ServerConfig, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = bind_socket(addr)?;
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
    transport: Bound,
    opts: ServiceOptions,
}

impl Listener {
    /// Binds the endpoint.
    pub fn bind(opts: ServiceOptions) -> Result<Listener, ServiceStartError> {
        let batched = opts.driver == Driver::Batched;
        let server_config = opts
            .tls
            .quinn_config(opts.transport, batched)
            .map_err(ServiceStartError::Tls)?;
        let bind_err = |source| ServiceStartError::Bind {
            addr: opts.listen,
            source,
        };
        let transport = match opts.driver {
            Driver::Batched => {
                Bound::Batched(driver::Bound::bind(opts.listen, server_config, opts.abuse).map_err(bind_err)?)
            }
            Driver::Tasks => Bound::Tasks(server_endpoint(server_config, opts.listen).map_err(bind_err)?),
        };
        Ok(Listener { transport, opts })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.transport.local_addr()
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
            transport: self.transport,
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
        self.transport.local_addr()
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
        match self.transport {
            Bound::Batched(bound) => {
                // A task of its own, on a runtime worker: where `run` is awaited may be the
                // thread that blocks on the runtime, and every wake-up from a worker would then
                // be a thread switch.
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let mut task = tokio::spawn(driver::run(bound, Arc::clone(&self.ctx), async move {
                    let _ = stopped.await;
                }));
                tokio::pin!(shutdown);
                let ended = tokio::select! {
                    ended = &mut task => ended,
                    () = &mut shutdown => {
                        let _ = stop.send(());
                        task.await
                    }
                };
                match ended {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "the client service's socket failed"),
                    Err(e) => tracing::error!(error = %e, "the client service's driver failed"),
                }
            }
            Bound::Tasks(endpoint) => tasks::run(endpoint, Arc::clone(&self.ctx), shutdown).await,
        }
        ticker.abort();
        if let Some(probe) = probe {
            probe.abort();
        }
    }
}
