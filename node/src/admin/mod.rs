//! The admin API: one HTTP listener per node (axum) serving JSON for tools (`nodectl`),
//! Prometheus text for scrapers and the console for people ([`console`]: a live page of the
//! cluster), behind a bearer token.
//!
//! Any node answers for the whole cluster: the map says where everything is, and each node's
//! own figures are asked from it ([`crate::cluster::Cluster::cluster_stats`]). Changes
//! (operator steps) are taken by the meta group's leader, wherever the request arrived.
//!
//! The routes are one table, [`ROUTES`]: the router is built from it and `/openapi.json` is
//! generated from it, so the two cannot disagree (and a test walks every documented route on a
//! live node).
//!
//! # Security
//!
//! Every route needs `Authorization: Bearer <token>`, the token from the node's
//! `[admin] token_file` (`nearby-node admin-token` makes one; `nearby-node dev` writes it to
//! `NEARBY_HOME/admin-token`), compared in constant time — except the console's login and
//! logout, and except reads (`GET`) by a browser logged in to the console, which carry its
//! session cookie instead (see [`console`] for why a cookie never authorises a change). Without
//! either, the console's page redirects to its login form; every other route answers 401 JSON.
//! With `[admin] tls_cert`/`tls_key` the listener speaks HTTPS only (rustls; the console's
//! cookie is then `Secure`), and `nodectl --admin https://…` checks the certificate against
//! `--ca`; without them it speaks plain HTTP, which carries the token in the clear: bind it to
//! loopback or a private network then (a node says so at start when it is neither).

pub mod console;
mod views;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use serde::Deserialize;

use crate::cluster::Cluster;
use crate::metrics::ServiceMetrics;
use crate::route::peer::OperatorStep;

pub use self::views::{GroupView, GroupsView, NodeStatsView, NodeView, NodesView, StatusView};

/// How the admin API listens.
#[derive(Clone, Debug)]
pub struct AdminOptions {
    /// TCP address to bind.
    pub listen: SocketAddr,
    /// The bearer token every request must carry.
    pub token: String,
    /// Serve HTTPS with this configuration (plain HTTP if `None`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a stopping listener waits for its connections to finish.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the admin API could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The address could not be bound.
    #[error("cannot bind the admin API to {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The token is unusable.
    #[error("the admin token must be at least 16 characters")]
    WeakToken,
}

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    /// The node's part in the cluster.
    pub cluster: Arc<Cluster>,
    /// The client service's counters.
    pub metrics: Arc<ServiceMetrics>,
    token: Arc<str>,
    console: Arc<console::Console>,
}

/// A bound admin listener, not serving yet (the node puts its address in the map first).
pub struct AdminListener {
    listener: tokio::net::TcpListener,
    token: Arc<str>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl AdminListener {
    /// Binds `opts.listen`.
    pub async fn bind(opts: AdminOptions) -> Result<AdminListener, AdminError> {
        if opts.token.len() < 16 {
            return Err(AdminError::WeakToken);
        }
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .map_err(|source| AdminError::Bind {
                addr: opts.listen,
                source,
            })?;
        let ip = opts.listen.ip();
        if opts.tls.is_none() && !(ip.is_loopback() || is_private(ip)) {
            tracing::warn!(
                addr = %opts.listen,
                "the admin API speaks plain HTTP on a public or wildcard address: its token crosses \
                 the network in the clear (set [admin] tls_cert and tls_key)"
            );
        }
        Ok(AdminListener {
            listener,
            token: opts.token.into(),
            tls: opts.tls.map(tokio_rustls::TlsAcceptor::from),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(
        self,
        cluster: Arc<Cluster>,
        metrics: Arc<ServiceMetrics>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let port = self.listener.local_addr().map_or(0, |a| a.port());
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let state = AdminState {
            cluster,
            metrics,
            token: self.token,
            console: Arc::new(console::Console::new(port, self.tls.is_some(), stopping)),
        };
        let app = router(state);
        // The console's streams end when `stop` is sent: the graceful shutdown waits for every
        // connection, and a stream would never end on its own.
        let shutdown = async move {
            shutdown.await;
            let _ = stop.send(true);
        };
        match self.tls {
            None => {
                if let Err(e) = axum::serve(self.listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
                {
                    tracing::error!(error = %e, "the admin API stopped");
                }
            }
            Some(acceptor) => serve_https(self.listener, acceptor, app, shutdown).await,
        }
    }
}

/// Serves `app` over HTTPS on `listener` until `shutdown`, then waits (at most [`STOP_WAIT`])
/// for the connections in progress to finish.
async fn serve_https(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "admin API: cannot accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "admin API: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "admin API: TLS handshake timed out");
                    return;
                }
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "admin API: connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(STOP_WAIT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("admin API: connections still open at shutdown, dropped");
    }
}

/// Whether `ip` is in a private range (RFC 1918, unique-local IPv6).
fn is_private(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_private(),
        std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// What a route does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// The cluster at a glance.
    Status,
    /// Every node and its figures.
    Nodes,
    /// Every shard group.
    Groups,
    /// Move a group's leadership.
    TransferLeader,
    /// Start emptying a node.
    Drain,
    /// Stop emptying a node.
    Undrain,
    /// Take an empty node out of the cluster.
    RemoveNode,
    /// Invite a waiting node into the cluster.
    AddNode,
    /// Move a group's replica between nodes.
    MoveReplica,
    /// Split a group's range.
    Split,
    /// Merge two neighbouring groups.
    Merge,
    /// Even out the leaders' load.
    Rebalance,
    /// Operations in flight.
    Operations,
    /// Prometheus text.
    Metrics,
    /// Whether this node is caught up and serving (for load balancers and Kubernetes).
    Ready,
    /// This API's OpenAPI document.
    OpenApi,
    /// The console's page.
    Console,
    /// The console's login form.
    LoginForm,
    /// Logging in to the console.
    Login,
    /// Logging out of the console.
    Logout,
    /// The console's live feed.
    Events,
}

impl Op {
    /// Whether the route is served without any credentials (the console's login and logout,
    /// and the readiness probe, which says only "ready" or why not).
    pub fn is_public(self) -> bool {
        matches!(self, Op::LoginForm | Op::Login | Op::Logout | Op::Ready)
    }

    /// The media types of its successful answer.
    pub fn content_types(self) -> &'static [&'static str] {
        match self {
            Op::Metrics | Op::Ready => &["text/plain"],
            Op::Console | Op::LoginForm | Op::Login | Op::Logout => &["text/html"],
            Op::Events => &["text/event-stream", "application/json"],
            _ => &["application/json"],
        }
    }
}

/// One route of the API.
#[derive(Clone, Copy, Debug)]
pub struct RouteDoc {
    /// `GET` or `POST`.
    pub method: &'static str,
    /// The path, axum style (`{id}` for a parameter).
    pub path: &'static str,
    /// What it does.
    pub summary: &'static str,
    /// What it does, as a handler.
    pub op: Op,
    /// Its query parameters.
    pub query: &'static [Param],
}

/// A query parameter.
#[derive(Clone, Copy, Debug)]
pub struct Param {
    /// Its name.
    pub name: &'static str,
    /// `integer` or `boolean`.
    pub kind: &'static str,
    /// Whether it must be given.
    pub required: bool,
}

const DRY_RUN: Param = Param {
    name: "dry_run",
    kind: "boolean",
    required: false,
};

/// Every route (see the module doc).
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc {
        method: "GET",
        path: "/api/v1/status",
        summary: "The cluster at a glance: the map's epoch, the meta leader, every node with its state, addresses and figures.",
        op: Op::Status,
        query: &[],
    },
    RouteDoc {
        method: "GET",
        path: "/api/v1/nodes",
        summary: "Every node: state, addresses, version, uptime, CPU seconds, resident memory, sessions, replicas and leaders.",
        op: Op::Nodes,
        query: &[],
    },
    RouteDoc {
        method: "POST",
        path: "/api/v1/nodes",
        summary: "Adds the node waiting at `addr` (its node-to-node address; started with `nearby-node join` and no seeds): it is invited, joins, and the answer comes once the map lists it up (`node` is its id). 409 with the reason if it is not waiting, its id is already a member, or it does not answer. `dry_run` only asks it who it is.",
        op: Op::AddNode,
        query: &[
            Param {
                name: "addr",
                kind: "string",
                required: true,
            },
            DRY_RUN,
        ],
    },
    RouteDoc {
        method: "GET",
        path: "/api/v1/groups",
        summary: "Every shard group: range, replicas, leader, term, applied and last log index, users, whether it hibernates.",
        op: Op::Groups,
        query: &[],
    },
    RouteDoc {
        method: "POST",
        path: "/api/v1/groups/{id}/transfer-leader",
        summary: "Moves the group's leadership to the node `to` (a voter of it); `dry_run` only checks.",
        op: Op::TransferLeader,
        query: &[
            Param {
                name: "to",
                kind: "integer",
                required: true,
            },
            DRY_RUN,
        ],
    },
    RouteDoc {
        method: "POST",
        path: "/api/v1/nodes/{id}/drain",
        summary: "Starts emptying the node: its leaderships handed over a group per placement round, its replicas replaced elsewhere. Refused if fewer than three nodes would stay up, unless `force`. With `leaders_only`, the node is cordoned instead: its leaderships handed over the same way, none given to it, its replicas kept (before a restart).",
        op: Op::Drain,
        query: &[
            DRY_RUN,
            Param {
                name: "force",
                kind: "boolean",
                required: false,
            },
            Param {
                name: "leaders_only",
                kind: "boolean",
                required: false,
            },
        ],
    },
    RouteDoc {
        method: "POST",
        path: "/api/v1/nodes/{id}/undrain",
        summary: "Stops a drain or a cordon: the node is up again (what moved stays moved; placement spreads leaders back to it).",
        op: Op::Undrain,
        query: &[DRY_RUN],
    },
    RouteDoc {
        method: "POST",
        path: "/api/v1/nodes/{id}/remove",
        summary: "Takes a drained (or down and emptied) node out of the cluster map.",
        op: Op::RemoveNode,
        query: &[DRY_RUN],
    },
    RouteDoc {
        method: "POST",
        path: "/api/v1/groups/{id}/move",
        summary: "Starts moving the group's replica from node `from` to node `to` (leadership handed over first if `from` leads; a learner on `to` catches up and votes; `from`'s replica removed). Answers with the operation's id.",
        op: Op::MoveReplica,
        query: &[
            Param {
                name: "from",
                kind: "integer",
                required: true,
            },
            Param {
                name: "to",
                kind: "integer",
                required: true,
            },
            DRY_RUN,
        ],
    },
    RouteDoc {
        method: "POST",
        path: "/api/v1/groups/{id}/split",
        summary: "Starts splitting the group's range at `at` (default: the median of its users) into itself and a new group on the same nodes; finishes a split left half done. Answers with the operation's id.",
        op: Op::Split,
        query: &[
            Param {
                name: "at",
                kind: "integer",
                required: false,
            },
            DRY_RUN,
        ],
    },
    RouteDoc {
        method: "POST",
        path: "/api/v1/groups/{id}/merge",
        summary: "Starts merging the group `with` (the range right after this group's) into this group: its replicas moved onto this group's nodes first, then frozen, its records absorbed, and it leaves the map; finishes a merge left half done. Answers with the operation's id.",
        op: Op::Merge,
        query: &[
            Param {
                name: "with",
                kind: "integer",
                required: true,
            },
            DRY_RUN,
        ],
    },
    RouteDoc {
        method: "POST",
        path: "/api/v1/rebalance",
        summary: "Plans leadership moves that even out the load the leaders carry (users online; placement keeps replica and leader counts even by itself, and a rebalance is refused while it still has steps to take), and carries them out as an operation: at most `max_concurrent` at once (default 2), at most `per_minute` a minute touching any one node (default 30). `dry_run` shows the plan.",
        op: Op::Rebalance,
        query: &[
            Param {
                name: "max_concurrent",
                kind: "integer",
                required: false,
            },
            Param {
                name: "per_minute",
                kind: "integer",
                required: false,
            },
            DRY_RUN,
        ],
    },
    RouteDoc {
        method: "GET",
        path: "/api/v1/operations",
        summary: "Operations in flight on every node (running first), with their progress, and the last ones finished; `silent` lists nodes that did not answer.",
        op: Op::Operations,
        query: &[],
    },
    RouteDoc {
        method: "GET",
        path: "/metrics",
        summary: "Prometheus text format (0.0.4): this node's metrics.",
        op: Op::Metrics,
        query: &[],
    },
    RouteDoc {
        method: "GET",
        path: "/readyz",
        summary: "200 once this node has the cluster map and every replica it holds knows its leader and has applied its whole log (caught up and serving); 503 with the reason otherwise. No token needed.",
        op: Op::Ready,
        query: &[],
    },
    RouteDoc {
        method: "GET",
        path: "/openapi.json",
        summary: "This document.",
        op: Op::OpenApi,
        query: &[],
    },
    RouteDoc {
        method: "GET",
        path: console::PAGE_PATH,
        summary: "The console: a live page of the cluster for people (nodes and their load, ranges and leaders, activity, operations). Without a session, a redirect to the login form.",
        op: Op::Console,
        query: &[],
    },
    RouteDoc {
        method: "GET",
        path: console::LOGIN_PATH,
        summary: "The console's login form (needs no credentials).",
        op: Op::LoginForm,
        query: &[],
    },
    RouteDoc {
        method: "POST",
        path: console::LOGIN_PATH,
        summary: "Logs in to the console: the form field `token` (the admin token) sets a session cookie (HttpOnly, SameSite=Strict, 12 h) and redirects to the console; a wrong token gets the form again (401). The cookie authorises reads only.",
        op: Op::Login,
        query: &[],
    },
    RouteDoc {
        method: "POST",
        path: "/console/logout",
        summary: "Ends the console session and clears its cookie.",
        op: Op::Logout,
        query: &[],
    },
    RouteDoc {
        method: "GET",
        path: "/api/v1/events",
        summary: "The console's live feed: with `Accept: text/event-stream`, a `snapshot` event every second (nodes with CPU, memory, sessions, updates/s and pushes/s; groups with range, leader and replicas; the map's epoch; operations in flight; users with a live location by coarse H3 cell, counts only). Otherwise one snapshot as JSON, without rates.",
        op: Op::Events,
        query: &[],
    },
];

fn handler(op: Op) -> MethodRouter<AdminState> {
    match op {
        Op::Status => get(status),
        Op::Nodes => get(nodes),
        Op::Groups => get(groups),
        Op::TransferLeader => post(transfer_leader),
        Op::Drain => post(drain),
        Op::Undrain => post(undrain),
        Op::RemoveNode => post(remove_node),
        Op::AddNode => post(add_node),
        Op::MoveReplica => post(move_replica),
        Op::Split => post(split),
        Op::Merge => post(merge),
        Op::Rebalance => post(rebalance),
        Op::Operations => get(operations),
        Op::Metrics => get(metrics),
        Op::Ready => get(ready),
        Op::OpenApi => get(openapi),
        Op::Console => get(console::page),
        Op::LoginForm => get(console::login_form),
        Op::Login => post(console::login),
        Op::Logout => post(console::logout),
        Op::Events => get(console::events),
    }
}

/// The API's router: [`ROUTES`], behind the token check (but for the public ones).
pub fn router(state: AdminState) -> Router {
    let (mut private, mut public) = (Router::new(), Router::new());
    for route in ROUTES {
        if route.op.is_public() {
            public = public.route(route.path, handler(route.op));
        } else {
            private = private.route(route.path, handler(route.op));
        }
    }
    private
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route: see /openapi.json") })
        .layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
        .merge(public)
        .with_state(state)
}

/// An error answer: `{"error": "…"}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

/// Equal strings in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authenticate(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if same(t.trim().as_bytes(), state.token.as_bytes()) => next.run(request).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "wrong admin token").into_response(),
        // A console session: reads only (see `console` for why).
        None if matches!(*request.method(), Method::GET | Method::HEAD)
            && state.console.has_session(request.headers()) =>
        {
            next.run(request).await
        }
        None if request.uri().path() == console::PAGE_PATH => console::to_login(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the admin API needs `Authorization: Bearer <admin token>`",
        )
        .into_response(),
    }
}

async fn status(State(s): State<AdminState>) -> Json<StatusView> {
    Json(views::status(&s.cluster).await)
}

async fn nodes(State(s): State<AdminState>) -> Json<NodesView> {
    Json(views::nodes(&s.cluster).await)
}

async fn groups(State(s): State<AdminState>) -> Json<GroupsView> {
    Json(views::groups(&s.cluster).await)
}

/// The query of a change.
#[derive(Debug, Deserialize)]
struct ChangeQuery {
    to: Option<u64>,
    from: Option<u64>,
    at: Option<u64>,
    with: Option<u64>,
    max_concurrent: Option<u32>,
    per_minute: Option<u32>,
    addr: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    leaders_only: bool,
}

/// Takes `step` (or checks it) on the meta leader; 409 with the reason if refused.
async fn change(
    s: &AdminState,
    step: OperatorStep,
    dry_run: bool,
) -> Result<Json<serde_json::Value>, ApiError> {
    match s.cluster.operate_anywhere(&step, dry_run).await {
        // A long step answers once started: `operation` names it (`GET /api/v1/operations`).
        Ok(o) => {
            if !dry_run {
                // Read your writes: what this node answers next shows the change.
                s.cluster.catch_up_map().await;
            }
            Ok(Json(serde_json::json!({
                "done": !dry_run && o.operation.is_none(),
                "what": o.what,
                "operation": o.operation,
            })))
        }
        Err(why) => Err(ApiError::new(StatusCode::CONFLICT, why)),
    }
}

/// A query parameter the route needs, or 400 naming it.
fn required(value: Option<u64>, what: &str) -> Result<u64, ApiError> {
    value.ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, format!("{what} is required")))
}

async fn drain(
    State(s): State<AdminState>,
    Path(node): Path<u64>,
    Query(q): Query<ChangeQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let step = if q.leaders_only {
        OperatorStep::Cordon { node }
    } else {
        OperatorStep::Drain { node, force: q.force }
    };
    change(&s, step, q.dry_run).await
}

async fn undrain(
    State(s): State<AdminState>,
    Path(node): Path<u64>,
    Query(q): Query<ChangeQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    change(&s, OperatorStep::Undrain { node }, q.dry_run).await
}

async fn remove_node(
    State(s): State<AdminState>,
    Path(node): Path<u64>,
    Query(q): Query<ChangeQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    change(&s, OperatorStep::RemoveNode { node }, q.dry_run).await
}

async fn add_node(
    State(s): State<AdminState>,
    Query(q): Query<ChangeQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let addr = q.addr.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "`addr` (the node's node-to-node address) is required",
        )
    })?;
    match s.cluster.invite(&addr, q.dry_run).await {
        Ok(invited) => Ok(Json(serde_json::json!({
            "done": !q.dry_run,
            "what": invited.what,
            "node": invited.node,
            "raft": invited.info.raft,
            "client": invited.info.client,
            "admin": invited.info.admin,
        }))),
        Err(why) => Err(ApiError::new(StatusCode::CONFLICT, why)),
    }
}

async fn transfer_leader(
    State(s): State<AdminState>,
    Path(group): Path<u64>,
    Query(q): Query<ChangeQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let to = required(q.to, "`to` (a node id)")?;
    change(&s, OperatorStep::TransferLeader { group, to }, q.dry_run).await
}

async fn move_replica(
    State(s): State<AdminState>,
    Path(group): Path<u64>,
    Query(q): Query<ChangeQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let from = required(q.from, "`from` (a node id)")?;
    let to = required(q.to, "`to` (a node id)")?;
    change(&s, OperatorStep::Move { group, from, to }, q.dry_run).await
}

async fn split(
    State(s): State<AdminState>,
    Path(group): Path<u64>,
    Query(q): Query<ChangeQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    change(&s, OperatorStep::Split { group, at: q.at }, q.dry_run).await
}

async fn merge(
    State(s): State<AdminState>,
    Path(left): Path<u64>,
    Query(q): Query<ChangeQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let right = required(q.with, "`with` (the group to absorb)")?;
    change(&s, OperatorStep::Merge { left, right }, q.dry_run).await
}

async fn rebalance(
    State(s): State<AdminState>,
    Query(q): Query<ChangeQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let step = OperatorStep::Rebalance {
        max_concurrent: q.max_concurrent.unwrap_or(2),
        per_minute: q.per_minute.unwrap_or(30),
    };
    change(&s, step, q.dry_run).await
}

async fn operations(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let (operations, silent) = s.cluster.cluster_operations().await;
    Json(serde_json::json!({ "operations": operations, "silent": silent }))
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let mut out = String::new();
    s.metrics.render(&mut out);
    let stats = s.cluster.stats().await;
    views::render_node_metrics(&s.cluster, &stats, &mut out);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        out,
    )
        .into_response()
}

async fn ready(State(s): State<AdminState>) -> Response {
    match s.cluster.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response(),
    }
}

async fn openapi() -> Json<serde_json::Value> {
    Json(openapi_document())
}

/// The OpenAPI 3.1 document of [`ROUTES`].
pub fn openapi_document() -> serde_json::Value {
    let mut paths = serde_json::Map::new();
    for r in ROUTES {
        let mut parameters = Vec::new();
        if r.path.contains("{id}") {
            parameters.push(serde_json::json!({
                "name": "id", "in": "path", "required": true, "schema": { "type": "integer" }
            }));
        }
        for q in r.query {
            parameters.push(serde_json::json!({
                "name": q.name, "in": "query", "required": q.required, "schema": { "type": q.kind }
            }));
        }
        let content: serde_json::Map<String, serde_json::Value> =
            r.op.content_types()
                .iter()
                .map(|t| (t.to_string(), serde_json::json!({})))
                .collect();
        let mut op = if r.op.is_public() {
            serde_json::json!({
                "summary": r.summary,
                "parameters": parameters,
                "security": [],
                "responses": {
                    "200": { "description": "OK", "content": content },
                }
            })
        } else {
            serde_json::json!({
                "summary": r.summary,
                "parameters": parameters,
                "security": [{ "bearer": [] }],
                "responses": {
                    "200": { "description": "OK", "content": content },
                    "401": { "description": "No or wrong admin token" },
                }
            })
        };
        let redirect = match r.op {
            Op::Console => Some("No console session (and no token): to the login form"),
            Op::Login => Some("Logged in: the session cookie is set; to the console"),
            _ => None,
        };
        if let Some(why) = redirect {
            op["responses"]["303"] = serde_json::json!({ "description": why });
        }
        if r.op == Op::Login {
            op["responses"]["401"] = serde_json::json!({ "description": "Wrong token: the form again" });
        }
        let entry = paths
            .entry(r.path.to_string())
            .or_insert_with(|| serde_json::json!({}));
        if let Some(obj) = entry.as_object_mut() {
            obj.insert(r.method.to_ascii_lowercase(), op);
        }
    }
    serde_json::json!({
        "openapi": "3.1.0",
        "info": { "title": "nearby admin API", "version": env!("CARGO_PKG_VERSION") },
        "components": { "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } } },
        "paths": paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_lists_every_route_once_with_its_method() {
        let doc = openapi_document();
        let paths = doc["paths"].as_object().expect("paths");
        for r in ROUTES {
            assert!(
                paths[r.path][r.method.to_ascii_lowercase()].is_object(),
                "{} {} missing",
                r.method,
                r.path
            );
        }
        let ops: usize = paths.values().map(|p| p.as_object().map_or(0, |o| o.len())).sum();
        assert_eq!(ops, ROUTES.len());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abcdef0123456789", b"abcdef0123456789"));
        assert!(!same(b"abcdef0123456789", b"abcdef012345678"));
        assert!(!same(b"abcdef0123456789", b"abcdef012345678a"));
    }
}
