//! The load driver: one SDK [`Client`] per online user of a [`World`], over real QUIC and the real
//! protocol, sending locations on a schedule and recording everything that comes back.
//!
//! # A run
//!
//! 1. **Connect.** Every participant (online user) gets a token with [`Client::dev_login`],
//!    connects, applies its privacy settings (sharing off, hiding from a friend) and sends its
//!    first location; at most `connect_concurrency` participants are in this phase at once. The
//!    session start-up latency is connect → first page ([`LocationAck::Started`]).
//! 2. **Steps.** When every participant is ready, the steps run back to back. In a step at `rate`
//!    updates/s, each of the `M` participants sends every `M / rate` seconds, at its own phase
//!    (`p / M` of the interval), so updates are spread evenly rather than sent in bursts. Each
//!    update moves the user on by `period_s` *simulated* seconds, so a fast run compresses time
//!    without making anyone teleport. A participant waits for each acknowledgement (as a phone
//!    does); slots it could not keep are skipped and counted as late, never sent in a burst.
//! 3. **Drain and stop.** After the last step the driver waits `drain` (at least the oracle's
//!    deadline) for pushes in flight, then closes every client.
//!
//! Every event is recorded with its receipt time on one monotonic clock (µs since the run
//! started); the caller hands the result, a [`Truth`], to the oracle. While running, a line a
//! second goes to stderr (through `eprintln!` — progress is this tool's user interface).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use nearby_client::proto::{Coord, Event, NearbyPage};
use nearby_client::{Client, ClientConfig, ClientError, LocationAck, SdkEvent};
use nearby_index::geo::{Millis, UserId};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use crate::oracle::{latency_histogram, Micros, Outcome, PositionKind, Received, Seen, SentUpdate, Truth};
use crate::procstat::{self, ProcSample};
use crate::world::World;

mod fleet;

/// One load step: a target rate for a duration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    /// Updates per second, over all participants.
    pub rate: f64,
    /// How long the step lasts.
    pub duration: Duration,
}

/// Where and how to drive.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// `host:port` of the cluster's nodes (clients try them in turn; any node redirects).
    pub endpoints: Vec<String>,
    /// The name in the node's certificate.
    pub server_name: String,
    /// PEM certificates to trust.
    pub ca_pem: String,
    /// The load steps, run back to back.
    pub steps: Vec<Step>,
    /// Participants connecting at once.
    pub connect_concurrency: usize,
    /// Wait after the last step for pushes in flight (at least the oracle's deadline).
    pub drain: Duration,
    /// Longest wait for one update's acknowledgement before it counts as unanswered.
    pub call_timeout: Duration,
    /// Print a progress line a second to stderr.
    pub progress: bool,
    /// The server's processes (one, or every node of a cluster), to read their CPU and memory
    /// at step boundaries; several are summed.
    pub server_pids: Vec<u32>,
    /// A second process (e.g. the baseline's Redis), read the same way.
    pub extra_pid: Option<u32>,
    /// Relation and privacy changes per second during the steps (see [`crate::churn`]); 0 for
    /// none.
    pub churn: f64,
    /// Seeds the choice of changes.
    pub churn_seed: u64,
    /// The clients' connect timeout (per node tried).
    pub connect_timeout: Duration,
    /// The clients' request timeout: a node silent this long is taken for gone.
    pub request_timeout: Duration,
    /// The clients' QUIC keep-alive interval.
    pub keep_alive: Duration,
    /// The clients' QUIC idle timeout: a node silent this long is taken for gone even by a
    /// client with nothing to send.
    pub idle_timeout: Duration,
    /// Told `true` when the steps start (every participant connected).
    pub started: Option<Arc<watch::Sender<bool>>>,
    /// The cluster's pseudonym key (`pseudonym.key`): with it the world's discoverable users
    /// turn discoverable on and its listeners ask for strangers, whose pseudonyms the run maps
    /// back to users for the oracle. `None` leaves strangers out (a server without them).
    pub pseudonym_key: Option<Vec<u8>>,
    /// How the participants' clients run: SDK clients, or the batched fleet.
    pub clients: Clients,
}

/// How the simulated phones are run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Clients {
    /// One SDK `Client` per participant (its own quinn connection task, event channel and
    /// schedule task), reconnecting as an app does: what the cluster and fault runs need.
    #[default]
    Sdk,
    /// Every participant on one socket, driven by one task ([`fleet`]): the same requests, a
    /// fraction of the generator's CPU per push, no reconnection and no churn.
    Batched,
}

impl DriverConfig {
    /// A configuration with defaults: 64 connecting at once, 3 s drain, 10 s call timeout,
    /// progress on.
    pub fn new(endpoint: impl Into<String>, ca_pem: impl Into<String>, steps: Vec<Step>) -> Self {
        DriverConfig {
            endpoints: endpoint
                .into()
                .split([',', '\n'])
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(String::from)
                .collect(),
            server_name: nearby_client::DEFAULT_SERVER_NAME.to_string(),
            ca_pem: ca_pem.into(),
            steps,
            connect_concurrency: 64,
            drain: Duration::from_secs(3),
            call_timeout: Duration::from_secs(10),
            progress: true,
            server_pids: Vec::new(),
            extra_pid: None,
            churn: 0.0,
            churn_seed: 1,
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
            started: None,
            pseudonym_key: None,
            clients: Clients::Sdk,
        }
    }
}

/// Why a run could not take place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The simulator's own setup failed (e.g. no UDP socket).
    #[error("setup: {0}")]
    Setup(String),
    /// The world has no online user.
    #[error("the world has no online user: raise `online` or `users`")]
    NoParticipants,
    /// A step's rate or duration is unusable.
    #[error("step {index}: {reason}")]
    BadStep {
        /// 0-based step number.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// Not one session could be opened.
    #[error("no session could be opened ({failed} failed); first error: {first}")]
    NoSession {
        /// Participants that failed.
        failed: usize,
        /// The first failure.
        first: String,
    },
}

/// Readings of the watched processes at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcReadings {
    /// When, µs since the run started.
    pub at: Micros,
    /// The server (`server_pid`).
    pub server: Option<ProcSample>,
    /// The extra process (`extra_pid`).
    pub extra: Option<ProcSample>,
    /// The load generator itself.
    pub loadsim: Option<ProcSample>,
}

/// One participant's session start-up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Startup {
    /// The participant.
    pub participant: u32,
    /// Connect (before the token request) → first page, µs.
    pub latency_us: Micros,
    /// Whether the first location got a first page (`Started`); `false` if the node still held
    /// a live location of the user and answered `Located`.
    pub started: bool,
    /// The user's friend count.
    pub degree: usize,
}

/// Everything a run recorded.
#[derive(Clone, Debug)]
pub struct RunOutput {
    /// For the oracle.
    pub truth: Truth,
    /// The CPUs this process (the load generator) may run on: its CPU use over a step, divided
    /// by these, says whether the generator itself was the limit.
    pub generator_cpus: usize,
    /// The steps' windows `[from, to)`, µs since the run started.
    pub windows: Vec<(Micros, Micros)>,
    /// The steps as asked for.
    pub steps: Vec<Step>,
    /// Session start-ups.
    pub startups: Vec<Startup>,
    /// How long the connect phase took.
    pub connect_phase: Duration,
    /// Errors, with when they happened and their code name.
    pub errors: Vec<(Micros, String)>,
    /// The first [`KEPT_MESSAGES`] errors' full messages, with when they happened: where an
    /// error came from, for a failed run's report.
    pub error_messages: Vec<(Micros, String)>,
    /// Process readings at the start of the first step and the end of every step.
    pub readings: Vec<ProcReadings>,
    /// Schedule slots skipped because the previous update was still unanswered.
    pub late_slots: u64,
    /// The radius and TTL the node announced (from the first session), metres and seconds.
    pub radius_m: f64,
    /// See `radius_m`.
    pub ttl_s: u32,
    /// The relation and privacy change cycles made during the steps.
    pub cycles: Vec<crate::churn::Cycle>,
}

/// Counters the progress line reads.
struct Live {
    updates: AtomicU64,
    pushes: AtomicU64,
    errors: AtomicU64,
    sessions: AtomicU64,
    latency: Mutex<Histogram<u64>>,
}

/// How many client errors' full messages a run keeps.
pub const KEPT_MESSAGES: usize = 64;

/// UDP endpoints the simulator's clients share.
const SHARED_ENDPOINTS: usize = 4;

/// What every participant task shares.
pub(crate) struct Shared {
    pub(crate) t0: Instant,
    /// The wall clock at `t0` (UNIX ms): the nodes stamp positions with it.
    pub(crate) t0_unix_ms: u64,
    config: DriverConfig,
    pub(crate) ids: Vec<UserId>,
    index: HashMap<UserId, u32>,
    sent: Vec<Mutex<Vec<SentUpdate>>>,
    live: Live,
    errors: Mutex<Vec<(Micros, String)>>,
    error_messages: Mutex<Vec<(Micros, String)>>,
    late: AtomicU64,
    session: Mutex<Option<(f64, u32)>>,
    period_s: f64,
    /// A few UDP endpoints shared by all clients: one quinn endpoint per client would cost
    /// ~2 MB of receive buffers each; a few spread the load over several driver tasks.
    endpoints: Vec<quinn::Endpoint>,
    /// Every participant's client, once connected (the churn acts through them).
    pub(crate) clients: Mutex<HashMap<u32, Client>>,
    /// Relation and privacy changes made during the run.
    pub(crate) changes: Mutex<Vec<crate::oracle::Change>>,
}

impl Shared {
    pub(crate) fn now(&self) -> Micros {
        u64::try_from(self.t0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    pub(crate) fn error(&self, e: &ClientError) {
        self.error_text(e.kind_name(), e);
    }

    /// Records an error by its code name, keeping its message among the first
    /// [`KEPT_MESSAGES`].
    fn error_text(&self, code: &str, message: &dyn std::fmt::Display) {
        tracing::warn!(target: "nearby_loadsim::errors", code, error = %message, "client error");
        self.error_named(code);
        let mut kept = lock(&self.error_messages);
        if kept.len() < KEPT_MESSAGES {
            kept.push((self.now(), message.to_string()));
        }
    }

    fn error_named(&self, code: &str) {
        self.live.errors.fetch_add(1, Ordering::Relaxed);
        let at = self.now();
        lock(&self.errors).push((at, code.to_string()));
    }

    /// Records an update about to be sent; returns its index.
    fn record_send(&self, p: u32, pos: Coord) -> usize {
        let mut sent = lock(&self.sent[p as usize]);
        sent.push(SentUpdate {
            sent: self.now(),
            pos,
            outcome: Outcome::Unknown,
        });
        sent.len() - 1
    }

    fn record_outcome(&self, p: u32, j: usize, outcome: Outcome) {
        if let Some(u) = lock(&self.sent[p as usize]).get_mut(j) {
            u.outcome = outcome;
        }
    }

    /// Live latency of a position event (the oracle recomputes it exactly afterwards).
    fn observe(&self, from: UserId, at: Coord, now: Micros) {
        let Some(&s) = self.index.get(&from) else { return };
        let sent_at = lock(&self.sent[s as usize])
            .iter()
            .rev()
            .take(64)
            .find(|u| u.pos.lat.to_bits() == at.lat.to_bits() && u.pos.lon.to_bits() == at.lon.to_bits())
            .map(|u| u.sent);
        if let Some(t) = sent_at {
            lock(&self.live.latency).saturating_record(now.saturating_sub(t).max(1));
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Participants whose settings before the run already hide them (sharing off, or hiding from a
/// friend): the churn leaves them alone, so each change it makes is the only one of its pair.
fn sharing_settings(world: &World, online: &[u32]) -> Vec<bool> {
    online
        .iter()
        .map(|i| world.sharing_off().binary_search(i).is_ok() || world.hidden().iter().any(|(h, _)| h == i))
        .collect()
}

/// A participant's privacy settings to apply.
#[derive(Clone, Copy, Debug, Default)]
struct Settings {
    /// Hidden from everyone: by turning sharing off, or (`ghost`) by ghost mode until turned
    /// off — the same audience, through two paths of the node.
    sharing_off: bool,
    ghost: bool,
    hide_from: Option<UserId>,
    /// Turn discoverable on.
    discoverable: bool,
    /// Ask for strangers after the first location.
    listen: bool,
}

/// What a participant task returns.
#[derive(Default)]
struct ParticipantOut {
    received: Vec<Received>,
    outages: Vec<(Micros, Micros)>,
    backoffs: Vec<(Micros, Micros)>,
    startup: Option<(Micros, bool)>,
    sharing_off: bool,
    hid_from: Option<UserId>,
    discoverable: bool,
    /// Strangers seen, under their pseudonyms (resolved when the run ends).
    strangers: Vec<StrangerSeen>,
}

/// A stranger event or page entry as it arrived: under the viewer's pseudonym.
struct StrangerSeen {
    at: Micros,
    pseudonym: String,
    distance_m: u32,
    updated_at: Millis,
}

impl StrangerSeen {
    fn of(s: &nearby_client::proto::Stranger, at: Micros) -> StrangerSeen {
        StrangerSeen {
            at,
            pseudonym: s.pseudonym.clone(),
            distance_m: s.distance_m,
            updated_at: s.updated_at,
        }
    }
}

/// What one client's event reader heard.
#[derive(Default)]
struct Heard {
    received: Vec<Received>,
    strangers: Vec<StrangerSeen>,
    outages: Vec<(Micros, Micros)>,
    /// The SDK's waits between reconnection attempts, `[from, to)`.
    backoffs: Vec<(Micros, Micros)>,
}

/// Runs `world` against the node of `config` (see the module doc).
///
/// MUST be called inside a multi-threaded tokio runtime.
pub async fn run(world: &World, config: DriverConfig) -> Result<RunOutput, DriverError> {
    let online = world.online();
    if online.is_empty() {
        return Err(DriverError::NoParticipants);
    }
    for (index, s) in config.steps.iter().enumerate() {
        if !(s.rate.is_finite() && s.rate > 0.0) {
            return Err(DriverError::BadStep {
                index,
                reason: "the rate must be a positive number of updates per second",
            });
        }
        if s.duration.is_zero() {
            return Err(DriverError::BadStep {
                index,
                reason: "the duration must not be zero",
            });
        }
    }
    let batched = config.clients == Clients::Batched;
    if batched && config.churn > 0.0 {
        return Err(DriverError::Setup(
            "churn acts through SDK clients: run it with the SDK clients".into(),
        ));
    }
    let m = online.len();
    let ids: Vec<UserId> = online.iter().map(|&i| world.id(i)).collect();
    let index: HashMap<UserId, u32> = ids.iter().enumerate().map(|(p, &id)| (id, p as u32)).collect();
    let mut endpoints = Vec::new();
    for _ in 0..if batched { 0 } else { SHARED_ENDPOINTS } {
        let bind: std::net::SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, 0).into();
        endpoints
            .push(quinn::Endpoint::client(bind).map_err(|e| DriverError::Setup(format!("udp socket: {e}")))?);
    }
    let shared = Arc::new(Shared {
        endpoints,
        t0: Instant::now(),
        t0_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        config: config.clone(),
        ids: ids.clone(),
        index,
        sent: (0..m).map(|_| Mutex::new(Vec::new())).collect(),
        live: Live {
            updates: AtomicU64::new(0),
            pushes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            latency: Mutex::new(latency_histogram()),
        },
        errors: Mutex::new(Vec::new()),
        error_messages: Mutex::new(Vec::new()),
        late: AtomicU64::new(0),
        session: Mutex::new(None),
        period_s: world.config().period_s,
        clients: Mutex::new(HashMap::new()),
        changes: Mutex::new(Vec::new()),
    });

    let gate = Arc::new(Semaphore::new(config.connect_concurrency.max(1)));
    let (ready_tx, mut ready_rx) = mpsc::channel::<bool>(m);
    let (go_tx, go_rx) = watch::channel::<Option<Instant>>(None);
    let mut tasks = Vec::with_capacity(if batched { 0 } else { m });
    let mut members = Vec::with_capacity(if batched { m } else { 0 });
    for (p, &i) in online.iter().enumerate() {
        let off = world.sharing_off().binary_search(&i);
        let settings = Settings {
            sharing_off: off.is_ok(),
            // Every other user hidden from everyone uses ghost mode instead of sharing off.
            ghost: off.is_ok_and(|k| k % 2 == 1),
            hide_from: world
                .hidden()
                .iter()
                .find(|(h, _)| *h == i)
                .map(|&(_, f)| world.id(f)),
            discoverable: config.pseudonym_key.is_some() && world.discoverable().binary_search(&i).is_ok(),
            listen: config.pseudonym_key.is_some() && world.listeners().binary_search(&i).is_ok(),
        };
        if batched {
            members.push(fleet::Member {
                mover: world.mover(i),
                settings,
            });
            continue;
        }
        tasks.push(tokio::spawn(participant(
            p as u32,
            Arc::clone(&shared),
            world.mover(i),
            settings,
            Arc::clone(&gate),
            ready_tx.clone(),
            go_rx.clone(),
        )));
    }
    let fleet = if batched {
        let fleet = fleet::Fleet::new(Arc::clone(&shared), members, ready_tx.clone())?;
        Some(tokio::spawn(fleet.run(go_rx.clone())))
    } else {
        None
    };
    drop(ready_tx);

    // The progress line runs from the connect phase to the end.
    let (stop_progress, progress_stopped) = watch::channel(false);
    let progress = config.progress.then(|| {
        tokio::spawn(progress_loop(
            Arc::clone(&shared),
            m,
            go_rx.clone(),
            progress_stopped,
        ))
    });

    let mut ok = 0usize;
    let mut done = 0usize;
    while let Some(success) = ready_rx.recv().await {
        done += 1;
        ok += usize::from(success);
        if done == m {
            break;
        }
    }
    let connect_phase = shared.t0.elapsed();
    if ok == 0 {
        let _ = go_tx.send(Some(Instant::now()));
        for t in tasks {
            let _ = t.await;
        }
        if let Some(f) = fleet {
            let _ = f.await;
        }
        let _ = stop_progress.send(true);
        let first = lock(&shared.errors)
            .first()
            .map_or_else(|| "unknown".to_string(), |e| e.1.clone());
        return Err(DriverError::NoSession { failed: m, first });
    }

    // Steps start together, a little ahead so every task sees the signal in time.
    let start = Instant::now() + Duration::from_millis(50);
    let _ = go_tx.send(Some(start));
    if let Some(started) = &config.started {
        started.send_replace(true);
    }
    let mut windows = Vec::new();
    let mut readings = Vec::new();
    let total: Duration = config.steps.iter().map(|s| s.duration).sum();
    let churn = (config.churn > 0.0).then(|| {
        // Users with settings of their own are left alone, and so is the hub: a pair that
        // churns is not judged for misses, and the hub's deliveries are what it is there for.
        let mut special = sharing_settings(world, online);
        if let Some(p) = world.hub().and_then(|h| online.binary_search(&h).ok()) {
            if let Some(s) = special.get_mut(p) {
                *s = true;
            }
        }
        let plan = crate::churn::Plan::new(world, &special, config.churn, config.churn_seed);
        tokio::spawn(crate::churn::run(Arc::clone(&shared), plan, start, start + total))
    });
    tokio::time::sleep_until(start).await;
    readings.push(read_procs(&shared));
    let mut at = start;
    for s in &config.steps {
        let from = micros(&shared, at);
        at += s.duration;
        tokio::time::sleep_until(at).await;
        readings.push(read_procs(&shared));
        windows.push((from, micros(&shared, at)));
    }

    let cycles = match churn {
        Some(churn) => churn.await.unwrap_or_default(),
        None => Vec::new(),
    };
    let mut outs = Vec::with_capacity(m);
    for t in tasks {
        outs.push(t.await.unwrap_or_default());
    }
    if let Some(f) = fleet {
        outs = f.await.unwrap_or_default();
        outs.resize_with(m, ParticipantOut::default);
    }
    let _ = stop_progress.send(true);
    if let Some(p) = progress {
        let _ = p.await;
    }

    let sharing_off: Vec<bool> = outs.iter().map(|o| o.sharing_off).collect();
    let hid: Vec<Option<UserId>> = outs.iter().map(|o| o.hid_from).collect();
    let audience = audience(world, &sharing_off, &hid);
    let related = self::audience(world, &vec![false; m], &vec![None; m]);
    let strangers: Vec<bool> = outs.iter().map(|o| o.discoverable && !o.sharing_off).collect();
    let pseudonyms = config
        .pseudonym_key
        .as_deref()
        .map(nearby_node::strangers::Pseudonyms::new);
    let mut startups = Vec::new();
    let mut received = Vec::with_capacity(m);
    let mut outages = Vec::with_capacity(m);
    let mut backoffs = Vec::with_capacity(m);
    for (p, o) in outs.into_iter().enumerate() {
        if let Some((latency_us, started)) = o.startup {
            startups.push(Startup {
                participant: p as u32,
                latency_us,
                started,
                degree: world.friends(online[p]).len(),
            });
        }
        let mut heard = o.received;
        if let Some(names) = pseudonyms.as_ref().filter(|_| !o.strangers.is_empty()) {
            // The viewer's pseudonym of every participant; one not among them is someone
            // else's (or made up): an unknown sender, 0.
            let viewer = ids[p];
            let known: HashMap<String, UserId> = ids.iter().map(|&u| (names.of(viewer, u), u)).collect();
            heard.extend(o.strangers.into_iter().map(|s| Received {
                at: s.at,
                from: known.get(&s.pseudonym).copied().unwrap_or(0),
                seen: Seen::Stranger {
                    distance_m: s.distance_m,
                    updated_at: s.updated_at,
                },
            }));
            heard.sort_by_key(|r| r.at);
        }
        received.push(heard);
        outages.push(o.outages);
        backoffs.push(o.backoffs);
    }
    let sent = shared.sent.iter().map(|s| lock(s).clone()).collect();
    let (radius_m, ttl_s) = lock(&shared.session).unwrap_or((8_000.0, 600));
    let errors = lock(&shared.errors).clone();
    let error_messages = lock(&shared.error_messages).clone();
    let changes = std::mem::take(&mut *lock(&shared.changes));
    Ok(RunOutput {
        generator_cpus: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        truth: Truth {
            ids,
            audience,
            related,
            strangers,
            sent,
            received,
            outages,
            backoffs,
            changes,
            // Nodes on this machine (loopback) stamp with its clock; others' clocks may differ.
            t0_unix_ms: all_loopback(&config.endpoints).then_some(shared.t0_unix_ms),
        },
        windows,
        steps: config.steps.clone(),
        startups,
        connect_phase,
        errors,
        error_messages,
        readings,
        late_slots: shared.late.load(Ordering::Relaxed),
        radius_m,
        ttl_s,
        cycles,
    })
}

/// Makes an idempotent call until the node answers it (a refusal is an answer), at most
/// [`SETTLE_TRIES`] times: an error without an answer leaves its outcome unknown.
async fn settled<F, Fut>(call: F) -> Result<(), ClientError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), ClientError>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match call().await {
            Err(e) if !matches!(e, ClientError::Server(_)) && tries < SETTLE_TRIES => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            done => return done,
        }
    }
}

/// How often a setting whose outcome is unknown is tried.
const SETTLE_TRIES: u32 = 5;

fn micros(shared: &Shared, at: Instant) -> Micros {
    u64::try_from(at.saturating_duration_since(shared.t0).as_micros()).unwrap_or(u64::MAX)
}

fn read_procs(shared: &Shared) -> ProcReadings {
    let read = |pid: Option<u32>| {
        pid.and_then(|pid| match procstat::sample(pid) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(pid, error = %e, "cannot read process statistics");
                None
            }
        })
    };
    ProcReadings {
        at: shared.now(),
        server: shared
            .config
            .server_pids
            .iter()
            .map(|&pid| read(Some(pid)))
            .reduce(|a, b| Some(a?.plus(b?)))
            .flatten(),
        extra: read(shared.config.extra_pid),
        loadsim: read(Some(std::process::id())),
    }
}

/// Who may see each participant, from the world and the settings that were applied:
/// participant `S` → participants that are friends or granted followers of `S`, unless `S`
/// turned sharing off or hides from them.
pub fn audience(world: &World, sharing_off: &[bool], hid_from: &[Option<UserId>]) -> Vec<Vec<u32>> {
    let online = world.online();
    let part: HashMap<u32, u32> = online.iter().enumerate().map(|(p, &i)| (i, p as u32)).collect();
    let mut followers: HashMap<u32, Vec<u32>> = HashMap::new();
    for &(user, follower) in world.follows() {
        followers.entry(user).or_default().push(follower);
    }
    online
        .iter()
        .enumerate()
        .map(|(p, &i)| {
            if sharing_off.get(p).copied().unwrap_or(false) {
                return Vec::new();
            }
            let hidden = hid_from
                .get(p)
                .copied()
                .flatten()
                .and_then(|id| world.index_of(id));
            let mut a: Vec<u32> = world
                .friends(i)
                .iter()
                .chain(followers.get(&i).into_iter().flatten())
                .filter(|&&v| Some(v) != hidden)
                .filter_map(|v| part.get(v).copied())
                .collect();
            a.sort_unstable();
            a.dedup();
            a
        })
        .collect()
}

async fn participant(
    p: u32,
    shared: Arc<Shared>,
    mut mover: crate::world::Mover,
    settings: Settings,
    gate: Arc<Semaphore>,
    ready: mpsc::Sender<bool>,
    mut go: watch::Receiver<Option<Instant>>,
) -> ParticipantOut {
    let mut out = ParticipantOut::default();
    let permit = gate.acquire_owned().await.ok();
    let connected_at = shared.now();
    let client = match connect(&shared, p).await {
        Ok(c) => c,
        Err(e) => {
            shared.error(&e);
            tracing::debug!(user = shared.ids[p as usize], error = %e, "cannot connect");
            let _ = ready.send(false).await;
            return out;
        }
    };
    shared.live.sessions.fetch_add(1, Ordering::Relaxed);
    lock(&shared.clients).insert(p, client.clone());
    let info = client.session();
    lock(&shared.session).get_or_insert((f64::from(info.radius_m), info.ttl_s));
    let reader = client
        .events()
        .map(|events| tokio::spawn(read_events(events, Arc::clone(&shared))));

    // The settings are the oracle's truth: a call whose outcome is unknown (no answer, the
    // connection lost) may have been applied, so it is made again (they are idempotent) until
    // the node answers.
    if settings.sharing_off {
        let hidden = settled(|| async {
            if settings.ghost {
                client
                    .set_ghost(nearby_client::proto::GhostMode::On)
                    .await
                    .map(drop)
            } else {
                client.set_sharing(false).await.map(drop)
            }
        })
        .await;
        match hidden {
            Ok(()) => out.sharing_off = true,
            Err(e) => shared.error(&e),
        }
    }
    if let Some(friend) = settings.hide_from {
        match settled(|| async { client.hide(friend).await.map(drop) }).await {
            Ok(()) => out.hid_from = Some(friend),
            Err(e) => shared.error(&e),
        }
    }
    if settings.discoverable {
        match settled(|| async { client.set_discoverable(true).await.map(drop) }).await {
            Ok(()) => out.discoverable = true,
            Err(e) => shared.error(&e),
        }
    }
    let mut pages = Vec::new();
    let first = mover.position();
    match send(&shared, &client, p, first).await {
        Some((LocationAck::Started { page, .. }, at)) => {
            out.startup = Some((at.saturating_sub(connected_at), true));
            page_entries(&page, at, &mut pages);
        }
        Some((LocationAck::Located { .. }, at)) => {
            out.startup = Some((at.saturating_sub(connected_at), false))
        }
        None => {}
    }
    let mut stranger_page = Vec::new();
    if settings.listen {
        match client.list_strangers(None).await {
            Ok(page) => {
                let at = shared.now();
                stranger_page.extend(page.strangers.iter().map(|s| StrangerSeen::of(s, at)));
            }
            Err(e) => shared.error(&e),
        }
    }
    let first_timed = Instant::now() + FIRST_TIMED_AFTER;
    drop(permit);
    let _ = ready.send(true).await;

    let start = loop {
        if let Some(start) = *go.borrow_and_update() {
            break start;
        }
        if go.changed().await.is_err() {
            break Instant::now();
        }
    };
    let m = shared.ids.len() as f64;
    let mut step_start = start;
    for step in &shared.config.steps {
        let step_end = step_start + step.duration;
        let interval = Duration::from_secs_f64(m / step.rate);
        let mut next = first_slot(step_start.into_std(), interval, p, m, first_timed.into_std());
        while next < step_end.into_std() {
            tokio::time::sleep_until(next.into()).await;
            let pos = mover.advance(shared.period_s);
            let _ = send(&shared, &client, p, pos).await;
            next = next_slot(next, interval, Instant::now().into_std(), &shared.late);
        }
        step_start = step_end;
    }
    tokio::time::sleep_until(step_start + shared.config.drain).await;
    let closed_at = shared.now();
    client.close().await;
    if let Some(reader) = reader {
        if let Ok(heard) = reader.await {
            out.received = heard.received;
            out.strangers = heard.strangers;
            out.outages = heard.outages;
            out.backoffs = heard.backoffs;
        }
    }
    out.strangers.extend(stranger_page);
    out.outages.push((closed_at, Micros::MAX));
    if !pages.is_empty() {
        out.received.extend(pages);
        out.received.sort_by_key(|r| r.at);
    }
    out
}

async fn connect(shared: &Shared, p: u32) -> Result<Client, ClientError> {
    let c = &shared.config;
    let user = shared.ids[p as usize];
    // Spread logins over the nodes: each redirects to the user's home shard's leader.
    let mut endpoints = c.endpoints.clone();
    if !endpoints.is_empty() {
        let n = endpoints.len();
        endpoints.rotate_left((user as usize) % n);
    }
    let (token, _) = Client::dev_login(&endpoints, &c.server_name, &c.ca_pem, user).await?;
    let config = ClientConfig::new(String::new(), c.ca_pem.clone(), user, token).with_endpoints(endpoints);
    let mut config = config;
    config.server_name = c.server_name.clone();
    config.client_name = concat!("nearby-loadsim/", env!("CARGO_PKG_VERSION")).to_string();
    config.connect_timeout = c.connect_timeout;
    config.request_timeout = c.request_timeout;
    config.keep_alive = c.keep_alive;
    config.idle_timeout = c.idle_timeout;
    // The driver reads as fast as it can; a deep buffer keeps the client from pushing back
    // on the node while the driver's own tasks are briefly busy.
    config.event_capacity = 4_096;
    config.shared_endpoint = Some(shared.endpoints[p as usize % shared.endpoints.len()].clone());
    Client::connect(config).await
}

/// Sends one location, recording it before it leaves and its outcome after; returns the answer
/// and its arrival time.
async fn send(shared: &Shared, client: &Client, p: u32, pos: Coord) -> Option<(LocationAck, Micros)> {
    let j = shared.record_send(p, pos);
    shared.live.updates.fetch_add(1, Ordering::Relaxed);
    let answer = tokio::time::timeout(shared.config.call_timeout, client.update_location(pos)).await;
    let at = shared.now();
    match answer {
        Ok(Ok(ack)) => {
            shared.record_outcome(p, j, Outcome::Acked(at));
            Some((ack, at))
        }
        Ok(Err(e)) => {
            // A node error means the update was not stored; a lost connection may or may not.
            if matches!(
                e,
                ClientError::Server(_) | ClientError::Reconnecting | ClientError::Closed
            ) {
                shared.record_outcome(p, j, Outcome::Refused(at));
            }
            shared.error(&e);
            None
        }
        Err(_) => {
            shared.error_named("timeout");
            None
        }
    }
}

fn page_entries(page: &NearbyPage, at: Micros, out: &mut Vec<Received>) {
    out.extend(page.friends.iter().map(|f| Received {
        at,
        from: f.id,
        seen: Seen::PageEntry {
            distance_m: f.distance_m,
        },
    }));
}

/// Reads one client's events until it closes: what was received, and when the session was down.
async fn read_events(mut events: mpsc::Receiver<SdkEvent>, shared: Arc<Shared>) -> Heard {
    let mut received = Vec::new();
    let mut strangers = Vec::new();
    let mut outages = Vec::new();
    let mut backoffs: Vec<(Micros, Micros)> = Vec::new();
    let mut down_since: Option<Micros> = None;
    while let Some(e) = events.recv().await {
        let at = shared.now();
        match e {
            SdkEvent::Event(e) => heard_event(&shared, e, at, &mut received, &mut strangers),
            SdkEvent::Reconnecting {
                reason,
                planned,
                after,
                ..
            } => {
                end_wait(&mut backoffs, at);
                let wait = u64::try_from(after.as_micros()).unwrap_or(u64::MAX);
                backoffs.push((at, at.saturating_add(wait)));
                if down_since.is_none() {
                    // A planned move is a redirect (the node counts those), not an error.
                    if !planned {
                        shared.error(&reason);
                    }
                    // The connection was lost a little before the client noticed.
                    down_since = Some(at.saturating_sub(1_000_000));
                }
            }
            SdkEvent::Resumed { page } => {
                end_wait(&mut backoffs, at);
                if let Some(from) = down_since.take() {
                    outages.push((from, at));
                }
                if let Some(page) = page {
                    page_entries(&page, at, &mut received);
                }
            }
            SdkEvent::Closed(_) => break,
            _ => {}
        }
    }
    if let Some(from) = down_since {
        outages.push((from, Micros::MAX));
    }
    Heard {
        received,
        strangers,
        outages,
        backoffs,
    }
}

/// How soon after its first location a participant's first timed update may come: the node
/// refuses a session's updates closer than its minimum interval (250 ms by default).
const FIRST_TIMED_AFTER: Duration = Duration::from_millis(300);

/// Participant `p`'s (of `m`) first slot in a step from `from` whose slots are `interval` apart:
/// at its own phase of the interval, so that updates are spread evenly, and not before
/// `first_timed`.
fn first_slot(
    from: std::time::Instant,
    interval: Duration,
    p: u32,
    m: f64,
    first_timed: std::time::Instant,
) -> std::time::Instant {
    (from + interval.mul_f64(f64::from(p) / m)).max(first_timed)
}

/// The slot after `slot` for slots `interval` apart, as of `now`: slots that passed while the
/// participant waited for an answer are skipped and counted in `late`, not sent in a burst.
fn next_slot(
    slot: std::time::Instant,
    interval: Duration,
    now: std::time::Instant,
    late: &AtomicU64,
) -> std::time::Instant {
    let mut next = slot + interval;
    if next < now {
        let behind = now.duration_since(next).as_secs_f64() / interval.as_secs_f64();
        let skip = behind.ceil() as u32;
        late.fetch_add(u64::from(skip), Ordering::Relaxed);
        next += interval * skip;
    }
    next
}

/// Records one pushed event as heard at `at`: a friend's position or its end in `received`, a
/// stranger in `strangers`, each counted as a push (events about nobody are not).
fn heard_event(
    shared: &Shared,
    e: Event,
    at: Micros,
    received: &mut Vec<Received>,
    strangers: &mut Vec<StrangerSeen>,
) {
    let (from, seen) = match e {
        Event::FriendMoved(f) => {
            shared.observe(f.id, f.at, at);
            (f.id, position(PositionKind::Moved, f.at, f.updated_at))
        }
        Event::FriendEntered(f) => {
            shared.observe(f.id, f.at, at);
            (f.id, position(PositionKind::Entered, f.at, f.updated_at))
        }
        Event::FriendLeft { id, updated_at, .. } => (id, Seen::Left { updated_at }),
        Event::FriendGone { id, .. } => (id, Seen::Gone),
        Event::StrangerNearby(s) => {
            shared.live.pushes.fetch_add(1, Ordering::Relaxed);
            strangers.push(StrangerSeen::of(&s, at));
            return;
        }
        _ => return,
    };
    shared.live.pushes.fetch_add(1, Ordering::Relaxed);
    received.push(Received { at, from, seen });
}

/// The client's last wait between reconnection attempts ended by `at` (the next attempt, which
/// an app's call may bring forward, is seen only when it failed or resumed: an upper bound).
fn end_wait(backoffs: &mut [(Micros, Micros)], at: Micros) {
    if let Some(last) = backoffs.last_mut() {
        last.1 = last.1.min(at);
    }
}

fn position(kind: PositionKind, at: Coord, updated_at: Millis) -> Seen {
    Seen::Position { kind, at, updated_at }
}

#[allow(clippy::print_stderr)] // the progress line is this tool's interface
async fn progress_loop(
    shared: Arc<Shared>,
    m: usize,
    go: watch::Receiver<Option<Instant>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.tick().await;
    let (mut last_updates, mut last_pushes) = (0u64, 0u64);
    let mut last_step = usize::MAX;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return,
        }
        let updates = shared.live.updates.load(Ordering::Relaxed);
        let pushes = shared.live.pushes.load(Ordering::Relaxed);
        let errors = shared.live.errors.load(Ordering::Relaxed);
        let sessions = shared.live.sessions.load(Ordering::Relaxed);
        let t = shared.t0.elapsed().as_secs_f64();
        let phase = match *go.borrow() {
            None => format!("connecting {sessions}/{m}"),
            Some(start) => {
                let now = Instant::now();
                let mut at = start;
                let mut step = None;
                for (i, s) in shared.config.steps.iter().enumerate() {
                    at += s.duration;
                    if now < at {
                        step = Some((i, s.rate));
                        break;
                    }
                }
                match step {
                    Some((i, rate)) => {
                        if i != last_step {
                            // p99 "so far" is per step.
                            lock(&shared.live.latency).reset();
                            last_step = i;
                        }
                        format!("step {}/{} @ {rate:.0}/s", i + 1, shared.config.steps.len())
                    }
                    None if now < start => "starting".to_string(),
                    None => "draining".to_string(),
                }
            }
        };
        let p99 = {
            let h = lock(&shared.live.latency);
            if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(0.99) as f64 / 1000.0
            }
        };
        eprintln!(
            "[{t:6.1}s] {phase:<22} updates {:>8}/s  pushes {:>9}/s  p99 {p99:>8.1} ms  errors {errors}  sessions {sessions}",
            updates - last_updates,
            pushes - last_pushes,
        );
        last_updates = updates;
        last_pushes = pushes;
    }
}

/// Whether every endpoint (`host:port`) is on this machine's loopback.
fn all_loopback(endpoints: &[String]) -> bool {
    !endpoints.is_empty()
        && endpoints.iter().all(|e| {
            let host = e.rsplit_once(':').map_or(e.as_str(), |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        })
}
