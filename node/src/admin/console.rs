//! The admin console: a live web page of the cluster for people, served by the admin API's own
//! listener — nodes and their load, the ranges on a bar of the user-id space coloured by node
//! with their leaders marked, live activity (updates/s and pushes/s per node, a map of where
//! users are by coarse H3 cell), and the operations in flight.
//!
//! Owns the page (`console.html`, plain HTML, CSS and JavaScript embedded in the binary: no
//! build step, nothing fetched from elsewhere), the login that lets a browser in, and the live
//! feed the page draws from: `GET /api/v1/events`, server-sent events, one `snapshot` event
//! every [`TICK`] ([`Snapshot`]).
//!
//! # One sampler per listener
//!
//! However many pages are open, one task per admin listener ([`Activity`]) asks every node for
//! its figures once a tick and turns the counters' differences between two ticks into rates;
//! every stream sends what it produced. It runs only while at least one stream is open.
//!
//! # Logging in
//!
//! A browser's `EventSource` cannot send an `Authorization` header, so a browser logs in once:
//! `GET /console/login` is a form, `POST /console/login` compares the token with the admin
//! token in constant time and, if it matches, sets a session cookie (`HttpOnly;
//! SameSite=Strict; Path=/`) and redirects to `/console`. A wrong token gets the form again
//! (401), without a cookie.
//!
//! The cookie holds a random session id (32 bytes from the system's CSPRNG), never the token
//! and nothing derived from it. The node keeps, in memory, the SHA-256 of each live id with its
//! expiry ([`SESSION_TTL`], at most [`MAX_SESSIONS`] at once, the oldest dropped first): a
//! restart logs everyone out, `POST /console/logout` ends a session at once, and a stolen
//! cookie is worth nothing after its expiry. Its name carries the listener's port
//! (`nearby_console_7400`), because browsers share cookies between the ports of one host.
//!
//! A session authorises **reads only** (`GET`, `HEAD`): a change (drain, transfer, …) still
//! needs the bearer header, which no other web page can make a browser send — so a cookie can
//! never be used to change the cluster from another page (cross-site request forgery), whatever
//! the browser's `SameSite` rules. The console itself changes nothing.
//!
//! # Privacy
//!
//! The map shows how many users have a live location in each H3 cell of resolution 3
//! ([`nearby_index::ACTIVITY_RESOLUTION`], ≈ 12,000 km²): counts only, never a user id or a
//! position. This module must never add either to a snapshot.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::rejection::FormRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use nearby_raft::NodeId;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{same, views, AdminState};
use crate::cluster::ops::{OperationState, OperationView};
use crate::cluster::Cluster;
use crate::route::peer::{NodeStats, MAX_ACTIVITY_CELLS};

/// The page's path.
pub const PAGE_PATH: &str = "/console";

/// The login form's path.
pub const LOGIN_PATH: &str = "/console/login";

/// How often a snapshot is taken and sent.
pub const TICK: Duration = Duration::from_secs(1);

/// How long a console session lasts after logging in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// The most sessions a node keeps at once; logging in beyond drops the oldest.
pub const MAX_SESSIONS: usize = 64;

/// The page: HTML, CSS and JavaScript in one file.
const PAGE: &str = include_str!("console.html");

/// The login form; `{{message}}` is replaced by a (escaped) message or nothing.
const LOGIN: &str = include_str!("login.html");

/// What the console needs besides the cluster: sessions, the sampler, the shutdown signal.
pub(super) struct Console {
    logins: Logins,
    activity: Arc<Activity>,
    /// Becomes `true` when the listener shuts down: every stream ends then, so the graceful
    /// shutdown does not wait for pages that would never close on their own.
    stopping: watch::Receiver<bool>,
}

impl Console {
    /// The console of the listener on `port`; `stopping` turns true on shutdown.
    /// The console of the listener on `port`; `https`: its cookies are sent over HTTPS only.
    pub(super) fn new(port: u16, https: bool, stopping: watch::Receiver<bool>) -> Self {
        Console {
            logins: Logins::new(port, https),
            activity: Arc::new(Activity::new()),
            stopping,
        }
    }

    /// Whether `headers` carry the cookie of a live session.
    pub(super) fn has_session(&self, headers: &HeaderMap) -> bool {
        self.logins.session(headers, Instant::now()).is_some()
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------------

/// A session id's key in [`Logins`]: the SHA-256 of the id (so that looking one up reveals
/// nothing usable about the live ids through timing).
type SessionKey = [u8; 32];

/// The console's sessions (see the module doc).
struct Logins {
    cookie: String,
    /// The cookie's attributes (`Secure` on an HTTPS listener).
    attributes: &'static str,
    rng: SystemRandom,
    live: Mutex<HashMap<SessionKey, Instant>>,
}

fn key_of(id: &str) -> SessionKey {
    let mut key = [0u8; 32];
    key.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, id.as_bytes()).as_ref());
    key
}

impl Logins {
    fn new(port: u16, https: bool) -> Self {
        Logins {
            cookie: format!("nearby_console_{port}"),
            attributes: if https {
                "HttpOnly; Secure; SameSite=Strict; Path=/"
            } else {
                "HttpOnly; SameSite=Strict; Path=/"
            },
            rng: SystemRandom::new(),
            live: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionKey, Instant>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session at `now`: its id (64 hex digits), or `None` if the system's random
    /// source failed.
    fn open(&self, now: Instant) -> Option<String> {
        let mut bytes = [0u8; 32];
        self.rng.fill(&mut bytes).ok()?;
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut live = self.lock();
        live.retain(|_, expiry| *expiry > now);
        while live.len() >= MAX_SESSIONS {
            let Some(oldest) = live.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k) else {
                break;
            };
            live.remove(&oldest);
        }
        live.insert(key_of(&id), now + SESSION_TTL);
        Some(id)
    }

    /// The value of this listener's cookie in `headers`, if well formed.
    fn cookie_value<'h>(&self, headers: &'h HeaderMap) -> Option<&'h str> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == self.cookie)
            .map(|(_, value)| value.trim())
            .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
    }

    /// The key of the live session whose cookie `headers` carry.
    fn session(&self, headers: &HeaderMap, now: Instant) -> Option<SessionKey> {
        let key = key_of(self.cookie_value(headers)?);
        self.is_live(&key, now).then_some(key)
    }

    fn is_live(&self, key: &SessionKey, now: Instant) -> bool {
        self.lock().get(key).is_some_and(|expiry| *expiry > now)
    }

    /// Ends the session whose cookie `headers` carry, if any.
    fn close(&self, headers: &HeaderMap) {
        if let Some(value) = self.cookie_value(headers) {
            self.lock().remove(&key_of(value));
        }
    }

    fn set_cookie(&self, id: &str) -> String {
        format!(
            "{}={id}; {}; Max-Age={}",
            self.cookie,
            self.attributes,
            SESSION_TTL.as_secs()
        )
    }

    fn clear_cookie(&self) -> String {
        format!("{}=; {}; Max-Age=0", self.cookie, self.attributes)
    }
}

// ---------------------------------------------------------------------------------------------
// Pages
// ---------------------------------------------------------------------------------------------

/// Standard base64 (with padding), for the page's script hash.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The page's Content-Security-Policy: its one inline script allowed by hash, nothing loaded
/// from anywhere, connections only back to this listener.
fn page_policy() -> &'static str {
    static POLICY: OnceLock<String> = OnceLock::new();
    POLICY.get_or_init(|| {
        let script = PAGE
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map_or("", |(script, _)| script);
        let hash = ring::digest::digest(&ring::digest::SHA256, script.as_bytes());
        format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
            base64(hash.as_ref())
        )
    })
}

/// An HTML answer with the headers every console page carries.
fn html(status: StatusCode, body: String, policy: &str) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(v) = HeaderValue::from_str(policy) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    r
}

/// Escapes text for HTML.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The login form with `message` (if any) above it.
fn login_page(status: StatusCode, message: Option<&str>) -> Response {
    let message = message.map_or(String::new(), |m| {
        format!("<p class=\"message\" role=\"alert\">{}</p>", escape(m))
    });
    html(
        status,
        LOGIN.replace("{{message}}", &message),
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'",
    )
}

/// What a browser gets for the page without a session: the login form.
pub(super) fn to_login() -> Response {
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, LOGIN_PATH),
            (header::CACHE_CONTROL, "no-store"),
        ],
    )
        .into_response()
}

/// `GET /console`.
pub(super) async fn page() -> Response {
    html(StatusCode::OK, PAGE.to_string(), page_policy())
}

/// `GET /console/login`: the form, or straight to the page for a browser already logged in.
pub(super) async fn login_form(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if s.console.has_session(&headers) {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, PAGE_PATH)]).into_response();
    }
    login_page(StatusCode::OK, None)
}

/// The login form's fields.
#[derive(Debug, Deserialize)]
pub(super) struct LoginFields {
    token: Option<String>,
}

/// `POST /console/login`: the right token opens a session; a wrong one gets the form again.
/// A post without a token (nothing typed yet) is answered like `GET`.
pub(super) async fn login(
    State(s): State<AdminState>,
    form: Result<Form<LoginFields>, FormRejection>,
) -> Response {
    let token = form
        .ok()
        .and_then(|Form(f)| f.token)
        .filter(|t| !t.trim().is_empty());
    let Some(token) = token else {
        return login_page(StatusCode::OK, None);
    };
    if !same(token.trim().as_bytes(), s.token.as_bytes()) {
        tracing::warn!("admin console: a login with a wrong token was refused");
        return login_page(StatusCode::UNAUTHORIZED, Some("That is not the admin token."));
    }
    let Some(id) = s.console.logins.open(Instant::now()) else {
        tracing::error!("admin console: no random session id (the system's random source failed)");
        return login_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            Some("The node could not start a session; see its log."),
        );
    };
    let cookie = s.console.logins.set_cookie(&id);
    let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, PAGE_PATH)]).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `POST /console/logout`: ends the session (if any) and forgets the cookie.
pub(super) async fn logout(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    s.console.logins.close(&headers);
    let mut r = login_page(StatusCode::OK, Some("Logged out."));
    if let Ok(v) = HeaderValue::from_str(&s.console.logins.clear_cookie()) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

// ---------------------------------------------------------------------------------------------
// The live feed
// ---------------------------------------------------------------------------------------------

/// One snapshot of the cluster, as the page draws it (the `snapshot` event's data).
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// Snapshots the sampler took before this one (0 for a one-off answer).
    pub seq: u64,
    /// When, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The node that answered.
    pub answered_by: NodeId,
    /// The map's epoch.
    pub epoch: u64,
    /// The meta group's leader.
    pub meta_leader: Option<NodeId>,
    /// Every node.
    pub nodes: Vec<NodeActivity>,
    /// Every shard group, by id.
    pub groups: Vec<GroupActivity>,
    /// The operations in flight (see [`operations_in_flight`]).
    pub operations: Vec<OperationView>,
    /// Users with a live location by coarse cell, the busiest first.
    pub cells: Vec<CellActivity>,
    /// Sums over the nodes that answered.
    pub totals: Totals,
}

/// One node in a [`Snapshot`]. Rates are `None` until two readings of the node exist.
#[derive(Clone, Debug, Serialize)]
pub struct NodeActivity {
    /// Its id.
    pub id: NodeId,
    /// `joining`, `up`, `draining` or `down`, as the map says.
    pub state: String,
    /// Admin API address.
    pub admin: String,
    /// Client service address.
    pub client: String,
    /// Shard-group replicas it holds, by the map.
    pub replicas: usize,
    /// Shard groups it leads, by the map.
    pub leaders: usize,
    /// Whether it leads the meta group.
    pub meta_leader: bool,
    /// Its version.
    pub version: Option<String>,
    /// Seconds since it started.
    pub uptime_s: Option<u64>,
    /// CPU used since the last reading, in % of one core.
    pub cpu_pct: Option<f64>,
    /// Resident memory, bytes.
    pub rss_bytes: Option<u64>,
    /// Users with a session on it.
    pub sessions: Option<u64>,
    /// Location updates accepted per second, since the last reading.
    pub updates_per_s: Option<f64>,
    /// Events pushed to sessions per second, since the last reading.
    pub pushes_per_s: Option<f64>,
    /// Location updates accepted since it started.
    pub updates_total: Option<u64>,
    /// Events pushed since it started.
    pub pushes_total: Option<u64>,
    /// Users with a live location in the groups it leads.
    pub located: Option<u64>,
    /// Why it did not answer.
    pub error: Option<String>,
}

/// One shard group in a [`Snapshot`].
#[derive(Clone, Debug, Serialize)]
pub struct GroupActivity {
    /// Its id.
    pub id: u64,
    /// First user id it owns, in decimal (a JavaScript number cannot hold every `u64`).
    pub start: String,
    /// First user id after its range, in decimal.
    pub end: String,
    /// Where its range starts on the id space, 0 to 1 (for drawing).
    pub from: f64,
    /// Where its range ends on the id space, 0 to 1.
    pub to: f64,
    /// Its leader, by the map.
    pub leader: Option<NodeId>,
    /// Voters.
    pub voters: Vec<NodeId>,
    /// Learners (replicas catching up).
    pub learners: Vec<NodeId>,
    /// Users registered, if its leader answered.
    pub users: Option<u64>,
}

/// One coarse cell in a [`Snapshot`]: how many, never who or exactly where.
#[derive(Clone, Debug, Serialize)]
pub struct CellActivity {
    /// The H3 cell index, in hexadecimal.
    pub cell: String,
    /// Its centre's latitude.
    pub lat: f64,
    /// Its centre's longitude.
    pub lng: f64,
    /// Users with a live location in it.
    pub users: u32,
}

/// Sums over the nodes that answered.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    /// Sessions.
    pub sessions: u64,
    /// Location updates per second.
    pub updates_per_s: f64,
    /// Pushes per second.
    pub pushes_per_s: f64,
    /// Users with a live location.
    pub located: u64,
}

/// How long a finished operation stays on the page (so its bar is seen full, or its failure).
const FINISHED_SHOWN_MS: u64 = 60_000;

/// The operations in flight on every node, with their progress, and those that finished in
/// the last [`FINISHED_SHOWN_MS`] (the page shows `id`, `kind`, `what`, `current`, `state`,
/// `done_steps` of `total_steps`, `elapsed_s`).
pub async fn operations_in_flight(cluster: &Cluster) -> Vec<OperationView> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let (all, _silent) = cluster.cluster_operations().await;
    all.into_iter()
        .filter(|o| {
            let ended_ms = o.started_ms + (o.elapsed_s * 1000.0) as u64;
            o.state == OperationState::Running || ended_ms + FINISHED_SHOWN_MS >= now_ms
        })
        .collect()
}

/// A node's counters at one reading.
#[derive(Clone, Copy, Debug)]
struct Reading {
    at: Instant,
    uptime_s: u64,
    cpu_s: f64,
    updates: u64,
    pushes: u64,
}

/// `(now - before) / seconds`, or `None` if the counter went back (the node restarted).
fn rate(now: f64, before: f64, seconds: f64) -> Option<f64> {
    (now >= before && seconds > 0.0).then(|| (now - before) / seconds)
}

/// 2⁶⁴, the size of the user-id space.
const ID_SPACE: f64 = 18_446_744_073_709_551_616.0;

/// Takes one snapshot; `before` holds each node's previous reading (updated here).
async fn snapshot(c: &Cluster, before: &mut HashMap<NodeId, Reading>, seq: u64) -> Snapshot {
    let stats = c.cluster_stats().await;
    let now = Instant::now();
    let by_node: HashMap<NodeId, &NodeStats> = stats
        .iter()
        .filter_map(|(n, s)| s.as_ref().ok().map(|s| (*n, s)))
        .collect();
    let mut totals = Totals::default();
    let nodes: Vec<NodeActivity> = views::node_views(c, &stats)
        .into_iter()
        .map(|v| {
            let s = by_node.get(&v.id).copied();
            let reading = s.map(|s| Reading {
                at: now,
                uptime_s: s.uptime_s,
                cpu_s: s.cpu_s,
                updates: s.updates_total,
                pushes: s.pushes_total,
            });
            let prev = before.get(&v.id).copied();
            let (mut cpu_pct, mut updates_per_s, mut pushes_per_s) = (None, None, None);
            if let (Some(r), Some(p)) = (reading, prev) {
                let dt = r.at.duration_since(p.at).as_secs_f64();
                if r.uptime_s >= p.uptime_s {
                    cpu_pct = rate(r.cpu_s, p.cpu_s, dt).map(|x| x * 100.0);
                    updates_per_s = rate(r.updates as f64, p.updates as f64, dt);
                    pushes_per_s = rate(r.pushes as f64, p.pushes as f64, dt);
                }
            }
            match reading {
                Some(r) => before.insert(v.id, r),
                None => before.remove(&v.id),
            };
            let located = s.map(|s| s.cells.iter().map(|(_, n)| u64::from(*n)).sum::<u64>());
            if let Some(s) = s {
                totals.sessions += s.sessions;
            }
            totals.updates_per_s += updates_per_s.unwrap_or(0.0);
            totals.pushes_per_s += pushes_per_s.unwrap_or(0.0);
            totals.located += located.unwrap_or(0);
            NodeActivity {
                id: v.id,
                state: v.state,
                admin: v.admin,
                client: v.client,
                replicas: v.replicas,
                leaders: v.leaders,
                meta_leader: v.meta_leader,
                version: s.map(|s| s.version.clone()),
                uptime_s: s.map(|s| s.uptime_s),
                cpu_pct,
                rss_bytes: s.map(|s| s.rss_bytes),
                sessions: s.map(|s| s.sessions),
                updates_per_s,
                pushes_per_s,
                updates_total: s.map(|s| s.updates_total),
                pushes_total: s.map(|s| s.pushes_total),
                located,
                error: v.error,
            }
        })
        .collect();
    before.retain(|id, _| by_node.contains_key(id));
    let groups = views::group_views(c, &stats)
        .into_iter()
        .map(|g| GroupActivity {
            id: g.id,
            start: g.range[0].to_string(),
            end: g.range[1].to_string(),
            from: g.range[0] as f64 / ID_SPACE,
            to: g.range[1] as f64 / ID_SPACE,
            leader: g.leader,
            voters: g.voters,
            learners: g.learners,
            users: g.users,
        })
        .collect();
    // Each group is led by one node, so the nodes' counts add up without double counting.
    let mut sum: HashMap<u64, u32> = HashMap::new();
    for s in by_node.values() {
        for &(cell, n) in &s.cells {
            let e = sum.entry(cell).or_insert(0);
            *e = e.saturating_add(n);
        }
    }
    let mut cells: Vec<(u64, u32)> = sum.into_iter().collect();
    nearby_index::activity::busiest(&mut cells, MAX_ACTIVITY_CELLS);
    let cells = cells
        .into_iter()
        .filter_map(|(cell, users)| {
            let centre = nearby_index::activity::cell_centre(cell)?;
            Some(CellActivity {
                cell: format!("{cell:x}"),
                lat: centre.lat(),
                lng: centre.lon(),
                users,
            })
        })
        .collect();
    let view = c.directory().view();
    Snapshot {
        seq,
        at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        answered_by: c.directory().me(),
        epoch: view.map.epoch,
        meta_leader: view.map.leader(nearby_raft::META_GROUP),
        nodes,
        groups,
        operations: operations_in_flight(c).await,
        cells,
        totals,
    }
}

/// A snapshot, serialised once for every stream.
type Published = Option<Arc<str>>;

/// The sampler of one listener (see the module doc): takes a snapshot every [`TICK`] while
/// anyone listens.
pub(super) struct Activity {
    tx: watch::Sender<Published>,
    /// Whether the sampler task runs; changed only under this lock, with the listener count
    /// read under it too, so a new stream never finds a sampler that is about to stop.
    running: Mutex<bool>,
}

impl Activity {
    fn new() -> Self {
        Activity {
            tx: watch::channel(None).0,
            running: Mutex::new(false),
        }
    }

    /// Listens to the snapshots, starting the sampler if it does not run.
    fn subscribe(
        self: &Arc<Self>,
        cluster: &Arc<Cluster>,
        stopping: &watch::Receiver<bool>,
    ) -> watch::Receiver<Published> {
        let rx = self.tx.subscribe();
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if !*running {
            *running = true;
            tokio::spawn(sample(Arc::clone(self), Arc::clone(cluster), stopping.clone()));
        }
        rx
    }
}

/// The sampler task: a snapshot per tick until nobody listens or the listener stops.
async fn sample(activity: Arc<Activity>, cluster: Arc<Cluster>, mut stopping: watch::Receiver<bool>) {
    let mut before = HashMap::new();
    let mut seq = 0;
    let mut next = tokio::time::Instant::now();
    loop {
        {
            let mut running = activity.running.lock().unwrap_or_else(|p| p.into_inner());
            if activity.tx.receiver_count() == 0 || *stopping.borrow() {
                *running = false;
                return;
            }
        }
        seq += 1;
        let snap = snapshot(&cluster, &mut before, seq).await;
        match serde_json::to_string(&snap) {
            Ok(json) => {
                activity.tx.send_replace(Some(json.into()));
            }
            Err(e) => tracing::error!(error = %e, "admin console: a snapshot did not serialise"),
        }
        // A slow round (a node not answering) delays the next one rather than bunching them.
        next = (next + TICK).max(tokio::time::Instant::now());
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            changed = stopping.changed() => {
                if changed.is_err() {
                    // The listener is gone without a word: nobody will read another snapshot.
                    *activity.running.lock().unwrap_or_else(|p| p.into_inner()) = false;
                    return;
                }
            }
        }
    }
}

/// Whether `headers` ask for an event stream (as `EventSource` does).
fn wants_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

/// What a stream remembers between events.
struct Feed {
    snapshots: watch::Receiver<Published>,
    stopping: watch::Receiver<bool>,
    /// The session the stream was opened with (`None`: the bearer token).
    session: Option<SessionKey>,
    state: AdminState,
    first: bool,
    ended: bool,
}

impl Feed {
    /// The next event, or `None` when the stream ends: the listener stops, or the session
    /// ended (then after a `logout` event, so the page knows to log in again).
    async fn next(&mut self) -> Option<Event> {
        if self.ended {
            return None;
        }
        if std::mem::take(&mut self.first) {
            if let Some(json) = self.snapshots.borrow_and_update().clone() {
                return Some(Event::default().event("snapshot").data(&*json));
            }
        }
        loop {
            tokio::select! {
                changed = self.snapshots.changed() => changed.ok()?,
                _ = self.stopping.wait_for(|s| *s) => return None,
            }
            if let Some(key) = &self.session {
                if !self.state.console.logins.is_live(key, Instant::now()) {
                    self.ended = true;
                    return Some(Event::default().event("logout").data("the session ended"));
                }
            }
            if let Some(json) = self.snapshots.borrow_and_update().clone() {
                return Some(Event::default().event("snapshot").data(&*json));
            }
        }
    }
}

/// `GET /api/v1/events`: a `snapshot` event every [`TICK`] for a client that accepts
/// `text/event-stream`; any other client gets one snapshot as JSON (without rates, which need
/// two readings).
pub(super) async fn events(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if *s.console.stopping.borrow() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if !wants_stream(&headers) {
        return Json(snapshot(&s.cluster, &mut HashMap::new(), 0).await).into_response();
    }
    let bearer = headers.contains_key(header::AUTHORIZATION);
    let session = if bearer {
        None
    } else {
        s.console.logins.session(&headers, Instant::now())
    };
    let feed = Feed {
        snapshots: s.console.activity.subscribe(&s.cluster, &s.console.stopping),
        stopping: s.console.stopping.clone(),
        session,
        state: s,
        first: true,
        ended: false,
    };
    let stream = futures::stream::unfold(feed, |mut feed| async move {
        let event = feed.next().await?;
        Some((Ok::<_, Infallible>(event), feed))
    });
    let mut r = Sse::new(stream).keep_alive(KeepAlive::default()).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(value).expect("header value"),
        );
        h
    }

    #[test]
    fn a_session_lives_until_it_expires_or_is_closed() {
        let logins = Logins::new(7400, false);
        let t0 = Instant::now();
        let id = logins.open(t0).expect("random");
        assert_eq!(id.len(), 64);
        let h = with_cookie(&format!("other=1; nearby_console_7400={id}; x=y"));
        assert!(logins.session(&h, t0).is_some());
        assert!(logins.session(&h, t0 + SESSION_TTL).is_none(), "expired");
        // Another listener's cookie, a made-up id, a malformed one: no session.
        assert!(logins
            .session(&with_cookie(&format!("nearby_console_7401={id}")), t0)
            .is_none());
        assert!(logins
            .session(
                &with_cookie(&format!("nearby_console_7400={}", "0".repeat(64))),
                t0
            )
            .is_none());
        assert!(logins
            .session(&with_cookie("nearby_console_7400=../../etc"), t0)
            .is_none());
        logins.close(&h);
        assert!(logins.session(&h, t0).is_none(), "logged out");
    }

    #[test]
    fn sessions_are_capped_oldest_first() {
        let logins = Logins::new(1, false);
        let t0 = Instant::now();
        let first = logins.open(t0).expect("random");
        for i in 1..=MAX_SESSIONS {
            logins.open(t0 + Duration::from_secs(i as u64)).expect("random");
        }
        assert_eq!(logins.lock().len(), MAX_SESSIONS);
        assert!(logins
            .session(&with_cookie(&format!("nearby_console_1={first}")), t0)
            .is_none());
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_never_the_token_and_secure_over_https() {
        let logins = Logins::new(9, true);
        let c = logins.set_cookie("ab");
        for part in [
            "nearby_console_9=ab",
            "HttpOnly",
            "Secure",
            "SameSite=Strict",
            "Path=/",
        ] {
            assert!(c.contains(part), "{c}");
        }
        assert!(logins.clear_cookie().contains("Max-Age=0"));
        // Over plain HTTP a Secure cookie would never come back: the console could not log in.
        assert!(!Logins::new(9, false).set_cookie("ab").contains("Secure"));
    }

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn the_page_has_one_inline_script_allowed_by_hash_and_fetches_nothing_elsewhere() {
        assert_eq!(PAGE.matches("<script").count(), 1, "one inline script");
        assert!(page_policy().contains("script-src 'sha256-"));
        // The SVG namespace is a name, not an address the page loads.
        let page = PAGE.replace("http://www.w3.org/2000/svg", "");
        for external in ["://", "src=", "@import", "url("] {
            assert!(!page.contains(external), "the page loads something: {external}");
        }
        assert!(LOGIN.contains("{{message}}") && !LOGIN.contains("<script"));
    }

    #[test]
    fn messages_are_escaped() {
        assert_eq!(escape("<a href='x'>&\""), "&lt;a href=&#39;x&#39;&gt;&amp;&quot;");
    }

    #[test]
    fn rates_need_a_counter_that_did_not_go_back() {
        assert_eq!(rate(30.0, 10.0, 2.0), Some(10.0));
        assert_eq!(rate(5.0, 10.0, 2.0), None);
        assert_eq!(rate(5.0, 1.0, 0.0), None);
    }
}
